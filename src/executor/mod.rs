//! Executors make base images. The local executor, the embedded default, checks a Dockerfile
//! source out of git and builds it with buildah on this machine, then pushes it to its base
//! ref. Reference sources need no build.

pub mod buildah;
pub mod process;

use std::sync::Arc;

use async_trait::async_trait;
use image_builder_state::{BuildId, BuildSource, BuildView};

use crate::context::GitCheckouts;
use crate::credentials::Credentials;
use crate::orchestrator::{Build, BuildLog, BuildSecrets, StepError};
use buildah::Buildah;

/// Builds on this machine: git checkouts plus buildah.
pub struct LocalExecutor {
    checkouts: GitCheckouts,
    buildah: Buildah,
    credentials: Arc<Credentials>,
}

impl LocalExecutor {
    /// An executor with work directories under `checkouts` and buildah storage in `buildah`,
    /// giving buildah the registry credentials each build may use.
    pub fn new(checkouts: GitCheckouts, buildah: Buildah, credentials: Arc<Credentials>) -> Self {
        Self {
            checkouts,
            buildah,
            credentials,
        }
    }
}

/// A docker config file for one build's builder, in memory-backed storage when the machine
/// has it (`/dev/shm`), never under the data dir, readable by us only, removed when dropped.
struct AuthFile {
    path: std::path::PathBuf,
}

impl AuthFile {
    fn write(id: BuildId, content: &serde_json::Value) -> std::io::Result<Self> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            std::path::PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let path = dir.join(format!("image-builder-{id}.auth.json"));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        file.write_all(content.to_string().as_bytes())?;
        Ok(Self { path })
    }
}

impl Drop for AuthFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[async_trait]
impl Build for LocalExecutor {
    async fn build(
        &self,
        build: &BuildView,
        secrets: &BuildSecrets,
        log: &BuildLog,
    ) -> Result<(), StepError> {
        let source = match &build.spec.source {
            BuildSource::Reference { .. } => {
                log.line(format!(
                    "nothing to build: the base image is the existing image {}",
                    build.base_ref
                ))
                .await;
                return Ok(());
            }
            BuildSource::Dockerfile(source) => source,
        };
        if source.git_auth && secrets.git.is_none() {
            return Err(StepError::CredentialsLost(
                "the git credentials of this build are not kept across a restart of the service; submit the build again with them".into(),
            ));
        }
        let context = self
            .checkouts
            .checkout(build.id, source, secrets.git.as_ref(), log)
            .await?;
        let auth = self
            .credentials
            .builder_auth_file(
                &secrets.registry,
                &crate::credentials::registry_host(&build.base_ref),
            )
            .await;
        let auth = AuthFile::write(build.id, &auth).map_err(|e| {
            StepError::Unsupported(format!("cannot write the builder's credentials file: {e}"))
        })?;
        log.line(format!("building {} with buildah", build.base_ref))
            .await;
        self.buildah
            .build(build.id, &context, &build.base_ref, &auth.path, log)
            .await?;
        log.line(format!("pushing {}", build.base_ref)).await;
        self.buildah
            .push(build.id, &build.base_ref, &auth.path, log)
            .await?;
        drop(auth);
        self.buildah.remove(&build.base_ref).await;
        self.checkouts.remove(build.id).await;
        Ok(())
    }

    async fn stop_leftovers(&self, id: BuildId) -> usize {
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
