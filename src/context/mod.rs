//! Build contexts: a git checkout of a Dockerfile source in a per-build work directory under
//! the data dir, with the Dockerfile and context resolved strictly inside it. Git credentials
//! reach git through its environment only: never the command line, the journal, the log or
//! the work directory.

mod content;

pub use content::ContentKeys;

use std::path::{Path, PathBuf};

use image_builder_state::build::PathEscape;
use image_builder_state::{BuildId, CloneTargetMode, DockerfileSource};
use tokio::process::Command;

use base64::Engine;

use crate::credentials::GitCredentials;
use crate::process::{self, Finished};
use crate::steps::{StepError, StepErrorKind, StepLog};

/// The build context could not be made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A path of the request leaves the repository.
    #[error(transparent)]
    Escape(PathEscape),
    /// git failed; its own last lines say why (they are in the build log too).
    #[error("git {action} failed ({status}): {tail}")]
    Git {
        /// What git was doing.
        action: &'static str,
        /// git's exit status.
        status: String,
        /// git's last output lines.
        tail: String,
    },
    /// The Dockerfile is not in the checkout.
    #[error("the Dockerfile {0:?} does not exist in the repository")]
    NoDockerfile(String),
    /// The context directory is not in the checkout.
    #[error("the build context {0:?} is not a directory of the repository")]
    NoContext(String),
    /// The work directory could not be prepared.
    #[error("cannot prepare the work directory {path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl From<Error> for StepError {
    fn from(err: Error) -> Self {
        let kind = match &err {
            Error::Escape(_) => StepErrorKind::Invalid,
            Error::NoDockerfile(_) | Error::NoContext(_) => StepErrorKind::Missing,
            Error::Git { .. } | Error::Io { .. } => StepErrorKind::Failed,
        };
        StepError::from_source(kind, err)
    }
}

/// A checked-out build context.
#[derive(Debug, Clone)]
pub struct BuildContext {
    /// The Dockerfile, inside the checkout.
    pub dockerfile: PathBuf,
    /// The context directory, inside the checkout.
    pub context: PathBuf,
}

/// Refuses request paths that leave the checkout on their face (the request's own check,
/// [`DockerfileSource::path_escape`], made again here for a journaled request resumed).
/// Symlinks that leave it are caught after the checkout.
fn validate_paths(source: &DockerfileSource) -> Result<(), Error> {
    source
        .path_escape()
        .map_or(Ok(()), |e| Err(Error::Escape(e)))
}

/// Makes per-build git checkouts under one directory.
#[derive(Debug, Clone)]
pub struct GitCheckouts {
    root: PathBuf,
}

impl GitCheckouts {
    /// Checkouts live in `root/<build id>`.
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// The work directory of a build.
    pub fn workdir(&self, id: BuildId) -> PathBuf {
        self.root.join(id.to_string())
    }

    /// Removes a build's work directory, if any.
    pub async fn remove(&self, id: BuildId) {
        let dir = self.workdir(id);
        if let Err(e) = tokio::fs::remove_dir_all(&dir).await
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(build_id = %id, dir = %dir.display(), error = %e, "cannot remove work directory");
        }
    }

    /// Clones the source into a fresh work directory and resolves its Dockerfile and context.
    /// Safe to run again: an earlier, interrupted checkout is removed first.
    pub async fn checkout(
        &self,
        id: BuildId,
        source: &DockerfileSource,
        credentials: Option<&GitCredentials>,
        log: &dyn StepLog,
    ) -> Result<BuildContext, Error> {
        validate_paths(source)?;
        let dir = self.workdir(id);
        self.remove(id).await;
        tokio::fs::create_dir_all(&self.root)
            .await
            .map_err(|source| Error::Io {
                path: self.root.clone(),
                source,
            })?;
        let target = source.clone_target.as_str();
        log.line(format!(
            "cloning {} ({})",
            source.remote_uri,
            match source.target_mode {
                CloneTargetMode::RemoteHead => "default branch".to_owned(),
                CloneTargetMode::RemoteCommit => format!("commit {target}"),
                CloneTargetMode::RemoteBranch | CloneTargetMode::LocalBranch =>
                    format!("branch {target}"),
            }
        ))
        .await;
        let dir_arg = dir.as_os_str();
        match source.target_mode {
            CloneTargetMode::RemoteHead => {
                let mut cmd = git(credentials);
                cmd.args(["clone", "--depth", "1", "--", &source.remote_uri])
                    .arg(dir_arg);
                run_git(cmd, "clone", id, log).await?;
            }
            CloneTargetMode::RemoteBranch | CloneTargetMode::LocalBranch => {
                let mut cmd = git(credentials);
                cmd.args([
                    "clone",
                    "--depth",
                    "1",
                    "--branch",
                    target,
                    "--",
                    &source.remote_uri,
                ])
                .arg(dir_arg);
                run_git(cmd, "clone", id, log).await?;
            }
            CloneTargetMode::RemoteCommit => {
                if fetch_one_commit(&dir, source, credentials, id, log)
                    .await
                    .is_ok()
                {
                    return resolve(&dir, source);
                }
                log.line(
                    "the server does not serve that commit alone; cloning the whole repository"
                        .into(),
                )
                .await;
                self.remove(id).await;
                let mut cmd = git(credentials);
                cmd.args(["clone", "--no-checkout", "--", &source.remote_uri])
                    .arg(dir_arg);
                run_git(cmd, "clone", id, log).await?;
                let mut cmd = git(None);
                cmd.arg("-C")
                    .arg(dir_arg)
                    .args(["checkout", "--quiet", "--detach", target]);
                run_git(cmd, "checkout", id, log).await?;
            }
        }
        // The API took any credential out of the remote URL already (`UrlUserinfo`); should
        // the URL name anyone at all, the checkout still forgets it. A URL that names no one
        // leaves nothing to forget, and no git process to run for it.
        if source.remote_uri.contains('@') {
            let mut cmd = git(None);
            cmd.arg("-C")
                .arg(dir_arg)
                .args(["remote", "remove", "origin"]);
            run_git(cmd, "remote remove", id, log).await?;
        }
        resolve(&dir, source)
    }
}

/// Checks out only the commit `source` names (`git fetch --depth 1 <remote> <id>`, which
/// servers allow for commits their branches reach), into an empty repository in `dir` that
/// remembers no remote.
async fn fetch_one_commit(
    dir: &Path,
    source: &DockerfileSource,
    credentials: Option<&GitCredentials>,
    id: BuildId,
    log: &dyn StepLog,
) -> Result<(), Error> {
    let mut cmd = git(None);
    cmd.args(["init", "--quiet"]).arg(dir);
    run_git(cmd, "init", id, log).await?;
    let mut cmd = git(credentials);
    cmd.arg("-C").arg(dir).args([
        "fetch",
        "--quiet",
        "--no-tags",
        "--depth",
        "1",
        "--",
        &source.remote_uri,
        &source.clone_target,
    ]);
    run_git(cmd, "fetch", id, log).await?;
    let mut cmd = git(None);
    cmd.arg("-C")
        .arg(dir)
        .args(["checkout", "--quiet", "--detach", "FETCH_HEAD"]);
    run_git(cmd, "checkout", id, log).await?;
    // FETCH_HEAD names the remote; the checkout keeps nothing of it.
    let _ = tokio::fs::remove_file(dir.join(".git/FETCH_HEAD")).await;
    Ok(())
}

/// A git command that never prompts, with credentials (if any) in its environment.
fn git(credentials: Option<&GitCredentials>) -> Command {
    let mut cmd = Command::new("git");
    cmd.env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "/bin/false")
        .env("LC_ALL", "C");
    if let Some(c) = credentials {
        let token =
            base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.user, c.password));
        cmd.env("GIT_CONFIG_COUNT", "1")
            .env("GIT_CONFIG_KEY_0", "http.extraHeader")
            .env(
                "GIT_CONFIG_VALUE_0",
                format!("Authorization: Basic {token}"),
            );
    }
    cmd
}

async fn run_git(
    cmd: Command,
    action: &'static str,
    id: BuildId,
    log: &dyn StepLog,
) -> Result<(), Error> {
    let Finished { status, tail } =
        process::run_logged(cmd, id, log)
            .await
            .map_err(|e| Error::Git {
                action,
                status: "not started".into(),
                tail: e.to_string(),
            })?;
    if status.success() {
        return Ok(());
    }
    Err(Error::Git {
        action,
        status: status.to_string(),
        tail: tail.join(" / "),
    })
}

/// Resolves the Dockerfile and context inside the checkout, following symlinks.
fn resolve(root: &Path, source: &DockerfileSource) -> Result<BuildContext, Error> {
    let io = |source| Error::Io {
        path: root.to_owned(),
        source,
    };
    let root = root.canonicalize().map_err(io)?;
    let inside = |field: &'static str, path: &str| -> Result<Option<PathBuf>, Error> {
        let joined = root.join(if path.is_empty() { "." } else { path });
        match joined.canonicalize() {
            Ok(real) if real.starts_with(&root) => Ok(Some(real)),
            Ok(_) => Err(Error::Escape(PathEscape {
                field,
                path: path.to_owned(),
                why: "a symlink points outside it",
            })),
            Err(_) => Ok(None),
        }
    };
    let dockerfile_path = if source.dockerfile_path.is_empty() {
        "Dockerfile"
    } else {
        &source.dockerfile_path
    };
    let dockerfile = inside("dockerfile_path", dockerfile_path)?
        .filter(|p| p.is_file())
        .ok_or_else(|| Error::NoDockerfile(dockerfile_path.to_owned()))?;
    let context = inside("context_path", &source.context_path)?
        .filter(|p| p.is_dir())
        .ok_or_else(|| Error::NoContext(source.context_path.clone()))?;
    Ok(BuildContext {
        dockerfile,
        context,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(dockerfile: &str, context: &str) -> DockerfileSource {
        DockerfileSource {
            remote_uri: "file:///x".into(),
            target_mode: CloneTargetMode::RemoteHead,
            clone_target: String::new(),
            dockerfile_path: dockerfile.into(),
            context_path: context.into(),
            dockerfile_version: String::new(),
            git_auth: false,
        }
    }

    #[test]
    fn paths_that_leave_on_their_face_are_refused() {
        assert!(validate_paths(&source("Dockerfile", ".")).is_ok());
        assert!(validate_paths(&source("sub/Dockerfile", "sub")).is_ok());
        for (d, c) in [
            ("/etc/passwd", "."),
            ("../Dockerfile", "."),
            ("Dockerfile", "a/../../b"),
        ] {
            let err = validate_paths(&source(d, c)).unwrap_err();
            assert!(matches!(err, Error::Escape(_)), "{d} {c}: {err}");
        }
    }

    #[test]
    fn symlinks_out_of_the_checkout_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repo");
        std::fs::create_dir_all(root.join("ctx")).unwrap();
        std::fs::write(root.join("Dockerfile"), "FROM x\n").unwrap();
        std::fs::write(dir.path().join("outside"), "secret").unwrap();
        std::os::unix::fs::symlink("../outside", root.join("Evil")).unwrap();
        std::os::unix::fs::symlink("/", root.join("rootctx")).unwrap();
        let ok = resolve(&root, &source("Dockerfile", "ctx")).unwrap();
        assert!(ok.dockerfile.ends_with("repo/Dockerfile"));
        assert!(matches!(
            resolve(&root, &source("Evil", ".")),
            Err(Error::Escape(_))
        ));
        assert!(matches!(
            resolve(&root, &source("Dockerfile", "rootctx")),
            Err(Error::Escape(_))
        ));
        assert!(matches!(
            resolve(&root, &source("Missing", ".")),
            Err(Error::NoDockerfile(_))
        ));
    }
}
