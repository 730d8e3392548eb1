//! buildah as the local builder: `bud` with vfs storage, its storage under the data dir, then
//! `push` to the base ref. Every step's result stays in that storage (`--layers`), so a later
//! build sharing its first steps takes them from there (buildah says `Using cache`); the
//! [`LayerCache`](super::layer_cache::LayerCache) bounds it. RUN steps run with OCI isolation (runc): their own pid, mount and
//! network namespaces, on buildah's private bridge network, so a Dockerfile can reach the
//! outside world but not the service's loopback ports, and cannot see its processes. (Chroot
//! isolation, used before, shared the host's network and pid namespaces.)

use std::path::{Path, PathBuf};
use std::time::Duration;

use image_builder_state::BuildId;
use tokio::process::Command;

use super::LayerCacheUse;
use crate::context::BuildContext;
use crate::process::{self, Finished};
use crate::steps::{StepError, StepErrorKind, StepLog};

/// buildah failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// buildah could not be started.
    #[error("cannot run buildah: {0} (is it installed? the README's setup installs it)")]
    Start(std::io::Error),
    /// buildah ran and failed; its last lines say why.
    #[error("buildah {action} failed ({status}): {tail}")]
    Failed {
        /// `bud` or `push`.
        action: &'static str,
        /// The exit status.
        status: String,
        /// buildah's last lines.
        tail: String,
    },
    /// The registries configuration could not be written.
    #[error("cannot write {path}: {source}")]
    Config {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl From<Error> for StepError {
    /// Every buildah failure is permanent for this request: the builder ran (or could not
    /// start) and said no; the registry faults it meets while pushing are in its output.
    fn from(err: Error) -> Self {
        StepError::from_source(StepErrorKind::Failed, err)
    }
}

/// Times a push is tried before its failure fails the build.
pub const PUSH_ATTEMPTS: u32 = 3;

/// A buildah with its own storage.
#[derive(Debug, Clone)]
pub struct Buildah {
    dir: PathBuf,
}

impl Buildah {
    /// A buildah keeping its storage in `dir`, speaking plain HTTP to `insecure_registries`.
    pub fn new(dir: PathBuf, insecure_registries: &[String]) -> Result<Self, Error> {
        let buildah = Self { dir };
        let conf = buildah.registries_conf();
        let mut text = String::from(
            "# Written by image-builder at start from insecureRegistries.\n\
             unqualified-search-registries = [\"docker.io\"]\n\
             short-name-mode = \"permissive\"\n",
        );
        for host in insecure_registries {
            text.push_str(&format!(
                "\n[[registry]]\nlocation = {host:?}\ninsecure = true\n"
            ));
        }
        std::fs::create_dir_all(buildah.temp_dir())
            .and_then(|()| std::fs::write(&conf, text))
            .map_err(|source| Error::Config { path: conf, source })?;
        Ok(buildah)
    }

    fn registries_conf(&self) -> PathBuf {
        self.dir.join("registries.conf")
    }

    /// Where buildah keeps its temporary files (a RUN step's runtime directory, pulled
    /// layers): inside its own directory rather than `/var/tmp`, so that what a killed builder
    /// leaves is found and removed at the next start ([`Buildah::remove_temp_files`]).
    fn temp_dir(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    /// Removes what killed builders left in the temporary directory. Only while no build runs.
    pub async fn remove_temp_files(&self) -> std::io::Result<usize> {
        let mut removed = 0;
        let mut entries = tokio::fs::read_dir(self.temp_dir()).await?;
        while let Some(entry) = entries.next_entry().await? {
            let path = entry.path();
            let gone = if entry.file_type().await?.is_dir() {
                tokio::fs::remove_dir_all(&path).await
            } else {
                tokio::fs::remove_file(&path).await
            };
            if gone.is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new("buildah");
        cmd.env("CONTAINERS_REGISTRIES_CONF", self.registries_conf())
            .env("TMPDIR", self.temp_dir())
            .env("BUILDAH_ISOLATION", "oci")
            .env("LC_ALL", "C")
            .arg("--root")
            .arg(self.storage())
            .arg("--runroot")
            .arg(self.dir.join("runroot"))
            .args(["--storage-driver", "vfs"]);
        cmd
    }

    /// Builds the context into the local image `tag`, logging buildah's output line by line.
    /// Every step's result is kept in the storage; with [`LayerCacheUse::WriteOnly`] none is
    /// taken from it (`--no-cache`): every step runs again.
    pub async fn build(
        &self,
        id: BuildId,
        context: &BuildContext,
        tag: &str,
        cache: LayerCacheUse,
        auth_file: &Path,
        log: &dyn StepLog,
    ) -> Result<(), Error> {
        let mut cmd = self.command();
        cmd.env("REGISTRY_AUTH_FILE", auth_file);
        cmd.args([
            "bud",
            "--isolation",
            "oci",
            "--layers",
            "--format",
            "docker",
        ]);
        if cache == LayerCacheUse::WriteOnly {
            cmd.arg("--no-cache");
        }
        cmd.arg("-f")
            .arg(&context.dockerfile)
            .args(["-t", tag])
            .arg(&context.context);
        self.run(cmd, "bud", id, log).await
    }

    /// Pushes the local image `tag` to the registry under the same name, trying again (up to
    /// [`PUSH_ATTEMPTS`] in all, 1 s then 2 s apart) when buildah fails: a push is idempotent,
    /// and a registry receiving the same layer from several builds at once was seen to lose it
    /// for one of them (docker-registry 2.8: "manifest blob unknown" on the manifest upload).
    pub async fn push(
        &self,
        id: BuildId,
        tag: &str,
        auth_file: &Path,
        log: &dyn StepLog,
    ) -> Result<(), Error> {
        let mut attempt = 1;
        loop {
            let mut cmd = self.command();
            cmd.env("REGISTRY_AUTH_FILE", auth_file);
            cmd.args(["push", tag, &format!("docker://{tag}")]);
            match self.run(cmd, "push", id, log).await {
                Err(Error::Failed { status, .. }) if attempt < PUSH_ATTEMPTS => {
                    let wait = Duration::from_secs(1 << (attempt - 1));
                    log.line(format!(
                        "buildah push failed ({status}); pushing again in {}s (attempt {} of {PUSH_ATTEMPTS})",
                        wait.as_secs(),
                        attempt + 1
                    ))
                    .await;
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Every image in the storage, intermediate steps included, oldest first.
    pub async fn images(&self) -> Result<Vec<StoredImage>, Error> {
        let mut cmd = self.command();
        cmd.args(["images", "--all", "--json", "--no-trunc"]);
        let out = self.quiet(cmd, "images").await?;
        // buildah prints nothing at all, not `[]`, for an empty storage.
        let text = String::from_utf8_lossy(&out);
        if text.trim().is_empty() {
            return Ok(Vec::new());
        }
        let mut images: Vec<StoredImage> =
            serde_json::from_str(&text).map_err(|e| Error::Failed {
                action: "images",
                status: "exit status: 0".into(),
                tail: format!("cannot read its listing: {e}"),
            })?;
        images.sort_by(|a, b| (a.created, &a.created_at).cmp(&(b.created, &b.created_at)));
        Ok(images)
    }

    /// Removes the image `id` and the layers no other image or container uses.
    pub async fn remove_image(&self, id: &str) -> Result<(), Error> {
        let mut cmd = self.command();
        cmd.args(["rmi", "--force", id]);
        self.quiet(cmd, "rmi").await.map(drop)
    }

    /// Removes every working container: those of builders that were stopped or killed
    /// (buildah removes its own when a build ends). Only while no build runs.
    pub async fn remove_containers(&self) -> Result<(), Error> {
        let mut cmd = self.command();
        cmd.args(["rm", "--all"]);
        self.quiet(cmd, "rm").await.map(drop)
    }

    /// Runs a buildah command whose output is not a build's: returns its stdout.
    async fn quiet(&self, cmd: Command, action: &'static str) -> Result<Vec<u8>, Error> {
        let out = process::output(cmd).await.map_err(Error::Start)?;
        if out.status.success() {
            return Ok(out.stdout);
        }
        Err(Error::Failed {
            action,
            status: out.status.to_string(),
            tail: process::complaint(&out.stderr, &[]),
        })
    }

    async fn run(
        &self,
        cmd: Command,
        action: &'static str,
        id: BuildId,
        log: &dyn StepLog,
    ) -> Result<(), Error> {
        let started = std::time::Instant::now();
        let Finished { status, tail } = process::run_logged(cmd, id, log)
            .await
            .map_err(Error::Start)?;
        tracing::info!(build_id = %id, action, %status, elapsed_ms = started.elapsed().as_millis() as u64, "buildah finished");
        if status.success() {
            return Ok(());
        }
        Err(Error::Failed {
            action,
            status: status.to_string(),
            tail: tail.join(" / "),
        })
    }

    /// Where buildah keeps its storage.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory holding buildah's images, layers and containers.
    pub fn storage(&self) -> PathBuf {
        self.dir.join("root")
    }
}

/// One image in buildah's storage, as `buildah images --json` lists it.
#[derive(Debug, serde::Deserialize)]
pub struct StoredImage {
    /// The image id (the config's digest, hex).
    pub id: String,
    /// When it was made, in seconds since the epoch.
    pub created: i64,
    /// When it was made, RFC 3339 with nanoseconds: orders images made in the same second.
    #[serde(rename = "createdatraw", default)]
    pub created_at: String,
}
