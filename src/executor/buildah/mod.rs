//! buildah as the local builder: `bud` with vfs storage, its storage under the data dir, then
//! `push` to the base ref. Every step's result stays in that storage (`--layers`), so a later
//! build sharing its first steps takes them from there (buildah says `Using cache`); the
//! [`LayerCache`](super::layer_cache::LayerCache) bounds it.
//!
//! Every buildah command runs as root of a user namespace mapped from the service user's
//! subordinate ids ([`UserNamespace`]): its storage belongs to that unprivileged host id, and
//! so does every file of every layer. RUN steps run in containers of their own (buildah's
//! rootless isolation: runc, with pid, mount, network, ipc and uts namespaces of their own,
//! pivot_root into the image) inside that namespace: root in RUN is an unprivileged id on the
//! host. Their network is slirp4netns, a user-mode stack that reaches the outside world
//! but not the host's loopback, so not the service's ports.
//!
//! Files: this one (the commands), `setup.rs` (its directories and configuration, written at
//! start).

use std::path::{Path, PathBuf};
use std::time::Duration;

use image_builder_state::BuildId;
use tokio::process::Command;

mod setup;

use super::LayerCacheUse;
use super::user_namespace::UserNamespace;
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
    /// The registries configuration or the storage directories could not be written.
    #[error("cannot prepare {path}: {source}")]
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

/// A buildah with its own storage, in its user namespace.
#[derive(Debug, Clone)]
pub struct Buildah {
    dir: PathBuf,
    namespace: UserNamespace,
}

impl Buildah {
    /// A buildah keeping its storage in `dir`, speaking plain HTTP to `insecure_registries`,
    /// running in `namespace`. A storage that root of the namespace does not own (one a
    /// service without user namespaces made) is removed: it is a cache, and its files would
    /// be out of the namespace's reach.
    pub fn new(
        dir: PathBuf,
        insecure_registries: &[String],
        namespace: UserNamespace,
    ) -> Result<Self, Error> {
        let buildah = Self { dir, namespace };
        buildah.prepare_dirs()?;
        let conf = buildah.registries_conf();
        let mut text = String::from(
            "# Written by image-builder at start from registry.insecure.\n\
             unqualified-search-registries = [\"docker.io\"]\n\
             short-name-mode = \"permissive\"\n",
        );
        for host in insecure_registries {
            text.push_str(&format!(
                "\n[[registry]]\nlocation = {host:?}\ninsecure = true\n"
            ));
        }
        std::fs::write(&conf, text).map_err(|source| Error::Config { path: conf, source })?;
        buildah.write_lookaside_conf()?;
        buildah.write_network_helper()?;
        Ok(buildah)
    }

    /// The user namespace buildah runs in.
    pub fn namespace(&self) -> &UserNamespace {
        &self.namespace
    }

    fn command(&self) -> Command {
        let mut cmd = self.namespace.command("buildah");
        cmd.envs(self.environment()).args(self.global_args());
        cmd
    }

    /// The environment every buildah command of this storage runs with: the helpers first
    /// on PATH, its registries configuration, temporary directory, home and isolation.
    pub fn environment(&self) -> Vec<(&'static str, std::ffi::OsString)> {
        let mut path = self.helpers_dir().into_os_string();
        if let Some(rest) = std::env::var_os("PATH") {
            path.push(":");
            path.push(rest);
        }
        vec![
            ("PATH", path),
            ("CONTAINERS_REGISTRIES_CONF", self.registries_conf().into()),
            ("TMPDIR", self.temp_dir().into()),
            ("HOME", self.dir.join("home").into()),
            ("XDG_RUNTIME_DIR", self.dir.join("runtime").into()),
            ("BUILDAH_ISOLATION", "rootless".into()),
            ("LC_ALL", "C".into()),
        ]
    }

    /// The options every buildah command of this storage starts with.
    pub fn global_args(&self) -> Vec<std::ffi::OsString> {
        vec![
            "--root".into(),
            self.storage().into(),
            "--runroot".into(),
            self.dir.join("runroot").into(),
            "--storage-driver".into(),
            "vfs".into(),
        ]
    }

    /// Pulls the images the Dockerfile names ([`super::BASE_IMAGES_AWK`]) with the credentials
    /// in `auth_file`, each afresh (`--policy always`: a moved tag is seen, layers already
    /// held are not fetched again), logging buildah's output. One that cannot be pulled is
    /// said in the log and left to [`Self::build`], which pulls what it lacks with no
    /// credential and says why that fails, if it does.
    pub async fn pull_base_images(
        &self,
        id: BuildId,
        dockerfile: &Path,
        auth_file: &Path,
        log: &dyn StepLog,
    ) -> Result<(), Error> {
        for image in super::base_images(dockerfile).await {
            log.line(format!("pulling base image {image}")).await;
            let mut cmd = self.command();
            cmd.env("REGISTRY_AUTH_FILE", auth_file);
            cmd.args(["pull", "--policy", "always", &image]);
            match self.run(cmd, "pull", id, log).await {
                Err(Error::Failed { status, .. }) => {
                    log.line(format!(
                        "could not pull {image} ({status}); the build pulls what it lacks without credentials"
                    ))
                    .await;
                }
                other => other?,
            }
        }
        Ok(())
    }

    /// Builds the context into the local image `tag`, logging buildah's output line by line,
    /// with no credential at all: base images come from the storage ([`Self::pull_base_images`]
    /// put them there), and only one missing from it is pulled, anonymously.
    /// Every step's result is kept in the storage; with [`LayerCacheUse::WriteOnly`] none is
    /// taken from it (`--no-cache`): every step runs again.
    pub async fn build(
        &self,
        id: BuildId,
        context: &BuildContext,
        tag: &str,
        cache: LayerCacheUse,
        log: &dyn StepLog,
    ) -> Result<(), Error> {
        let mut cmd = self.command();
        cmd.args([
            "bud",
            "--isolation",
            "rootless",
            "--pull=false",
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
