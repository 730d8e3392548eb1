//! The local executor, the embedded default: checks a Dockerfile source out of git and
//! builds it with buildah on this machine, then pushes it to its base ref.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use image_builder_state::{BuildId, BuildView};
use sha2::{Digest, Sha256};

use super::LayerCacheUse;
use super::layer_cache::LayerCache;
use super::user_namespace::UserNamespace;
use crate::context::GitCheckouts;
use crate::credentials::BuildSecrets;
use crate::credentials::Credentials;
use crate::process;
use crate::steps::{BuildBase, StepError, StepErrorKind, StepLog};

/// Builds on this machine: git checkouts plus buildah, with its layer cache.
pub struct LocalExecutor {
    checkouts: GitCheckouts,
    cache: Arc<LayerCache>,
    credentials: Arc<Credentials>,
    auth_files: AuthFiles,
    /// Stops (a scan of every process, then the work directory's removal, both on blocking
    /// threads) that run at once: every unfinished build is stopped at start, and without a
    /// bound each would take a thread of its own (a hundred resumed builds held a hundred
    /// threads and 50 MiB for their ten idle seconds).
    stops: Arc<tokio::sync::Semaphore>,
}

/// Stops run at once, at most: as many as the blocking work keeps cores busy.
const STOPS_AT_ONCE: usize = 2;

impl LocalExecutor {
    /// An executor with work directories under `checkouts`, building with the buildah of
    /// `cache`, giving it the registry credentials each build may use. Removes the
    /// credentials files a killed run of this installation left behind, and tidies the
    /// cache in the background (builds wait for it).
    pub fn new(
        checkouts: GitCheckouts,
        cache: Arc<LayerCache>,
        credentials: Arc<Credentials>,
    ) -> Self {
        let auth_files = AuthFiles::new(cache.buildah().dir());
        let stale = auth_files.sweep();
        if stale > 0 {
            tracing::info!(
                stale,
                "removed builder credentials files left by a previous run"
            );
        }
        let tidying = Arc::clone(&cache);
        tokio::spawn(async move { tidying.tidy().await });
        Self {
            checkouts,
            cache,
            credentials,
            auth_files,
            stops: Arc::new(tokio::sync::Semaphore::new(STOPS_AT_ONCE)),
        }
    }
}

/// Where builders' credentials files go: memory-backed storage when the machine has it
/// (`/dev/shm`), never under the data dir. Their names carry a key of this installation (its
/// buildah storage path), so that the files a killed run left behind are found and removed at
/// the next start, and another installation's never are.
struct AuthFiles {
    dir: PathBuf,
    prefix: String,
}

impl AuthFiles {
    fn new(installation: &Path) -> Self {
        let dir = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let path = installation
            .canonicalize()
            .unwrap_or_else(|_| installation.to_owned());
        let key = hex::encode(&Sha256::digest(path.as_os_str().as_encoded_bytes())[..8]);
        Self {
            dir,
            prefix: format!("image-builder-{key}-"),
        }
    }

    /// Removes the files of this installation: at start, none of them belongs to a live build.
    fn sweep(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        entries
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.starts_with(&self.prefix) && n.ends_with(AUTH_SUFFIX))
            })
            .filter(|e| std::fs::remove_file(e.path()).is_ok())
            .count()
    }

    /// A new file for build `id`, readable by its owner only (root of the builder's user
    /// namespace), removed when dropped.
    fn write(
        &self,
        id: BuildId,
        content: &serde_json::Value,
        owner: &UserNamespace,
    ) -> std::io::Result<AuthFile> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let nonce = uuid::Uuid::now_v7().simple();
        let path = self
            .dir
            .join(format!("{}{id}-{nonce}{AUTH_SUFFIX}", self.prefix));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let file_guard = AuthFile { path };
        owner.give(&file_guard.path)?;
        file.write_all(content.to_string().as_bytes())?;
        Ok(file_guard)
    }
}

const AUTH_SUFFIX: &str = ".auth.json";

/// One build's credentials file for its builder; removed when dropped.
struct AuthFile {
    path: PathBuf,
}

impl Drop for AuthFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[async_trait]
impl BuildBase for LocalExecutor {
    async fn build(
        &self,
        build: &BuildView,
        secrets: &BuildSecrets,
        log: &dyn StepLog,
    ) -> Result<(), StepError> {
        let Some(source) = super::dockerfile_source(build, log).await else {
            return Ok(());
        };
        super::require_git_credentials(source, secrets)?;
        let context = self
            .checkouts
            .checkout(build.id, source, secrets.git.as_ref(), log)
            .await?;
        let namespace = self.cache.buildah().namespace();
        // Each credentials file exists only while the step that needs it runs: the pulls
        // before the Dockerfile runs, and the push after it. RUN steps run with none on disk.
        let write_auth = |content: serde_json::Value| {
            self.auth_files
                .write(build.id, &content, namespace)
                .map_err(|e| {
                    StepError::new(
                        StepErrorKind::Failed,
                        format!("cannot write the builder's credentials file: {e}"),
                    )
                })
        };
        // The installation's own registry holds base images built before: its credential
        // pulls from it whatever the request allows.
        let own_hosts = [crate::credentials::registry_host(&build.base_ref)];
        let pull_auth = write_auth(
            self.credentials
                .pull_auth_file(&secrets.registry, &own_hosts)
                .await,
        )?;
        let built = {
            let _shared = self.cache.share().await;
            let buildah = self.cache.buildah();
            let cache = LayerCacheUse::of(build);
            async {
                buildah
                    .pull_base_images(build.id, &context.dockerfile, &pull_auth.path, log)
                    .await?;
                drop(pull_auth);
                log.line(match cache {
                    LayerCacheUse::ReadWrite => format!(
                        "building {} with buildah; steps found in its layer cache are not run again",
                        build.base_ref
                    ),
                    LayerCacheUse::WriteOnly => format!(
                        "building {} with buildah; force_rebuild is set: every step runs again (the layer cache is written, not read)",
                        build.base_ref
                    ),
                })
                .await;
                buildah
                    .build(build.id, &context, &build.base_ref, cache, log)
                    .await?;
                // Asked for now, not before the build: an ECR token is fresh for the push.
                let push_auth = write_auth(self.credentials.push_auth_file(&own_hosts).await)?;
                log.line(format!("pushing {}", build.base_ref)).await;
                Ok::<_, StepError>(
                    buildah
                        .push(build.id, &build.base_ref, &push_auth.path, log)
                        .await?,
                )
            }
            .await
        };
        self.checkouts.remove(build.id).await;
        // In the background: a trim waits for the other builds using the storage to end.
        let cache = Arc::clone(&self.cache);
        tokio::spawn(async move { cache.trim().await });
        built
    }

    /// Nothing local survives a restart in a usable state: the builder is stopped and the
    /// step runs again from the start.
    async fn before_resume(&self, id: BuildId) -> usize {
        self.stop(id).await
    }

    async fn stop(&self, id: BuildId) -> usize {
        // The semaphore is never closed; without a permit the stop runs all the same.
        let _turn = self.stops.acquire().await.ok();
        let stopped = tokio::task::spawn_blocking(move || process::stop_build_processes(id))
            .await
            .unwrap_or_default();
        self.checkouts.remove(id).await;
        stopped
    }

    async fn clean(&self, id: BuildId) {
        self.checkouts.remove(id).await;
    }
}
