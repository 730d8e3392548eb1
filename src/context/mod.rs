//! Build contexts: a git checkout of a Dockerfile source in a per-build work directory under
//! the data dir, with the Dockerfile and context resolved strictly inside it. Git credentials
//! reach git through its environment only: never the command line, the journal, the log or
//! the work directory.

use std::path::{Component, Path, PathBuf};

use base64::Engine;
use image_builder_state::{BuildId, CloneTargetMode, DockerfileSource};
use tokio::process::Command;

use crate::executor::process::{self, Finished};
use crate::orchestrator::BuildLog;

/// Credentials for cloning over HTTP(S), from the request's `GitConfig`. Kept in memory only.
#[derive(Clone)]
pub struct GitCredentials {
    /// The user name.
    pub user: String,
    /// The password or token.
    pub password: String,
}

/// The user-info of a git remote URL as the client sent it (`user:password` in
/// `https://user:password@host/r.git`, still percent-encoded). Split off at the edge: the
/// journal, replies and git's argv get the URL without it; git gets the credential through
/// its environment; mk3's ref hash puts it back, so refs match what mk3 computes.
#[derive(Clone)]
pub struct UrlUserinfo(String);

impl std::fmt::Debug for UrlUserinfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UrlUserinfo(<redacted>)")
    }
}

impl UrlUserinfo {
    /// Splits the user-info off `uri` when it holds a credential: a password, or on http(s)
    /// any user (a token sent as the user name). Returns the URI without it.
    pub fn split(uri: &str) -> (String, Option<Self>) {
        let Some((scheme, rest)) = uri.split_once("://") else {
            return (uri.to_owned(), None);
        };
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let Some(at) = rest[..authority_end].rfind('@') else {
            return (uri.to_owned(), None);
        };
        let userinfo = &rest[..at];
        let web = matches!(scheme, "http" | "https");
        if !(web || userinfo.contains(':')) {
            return (uri.to_owned(), None);
        }
        (
            format!("{scheme}://{}", &rest[at + 1..]),
            Some(Self(userinfo.to_owned())),
        )
    }

    /// `uri` (split by [`UrlUserinfo::split`]) as the client sent it.
    pub fn restore(&self, uri: &str) -> String {
        match uri.split_once("://") {
            Some((scheme, rest)) => format!("{scheme}://{}@{rest}", self.0),
            None => uri.to_owned(),
        }
    }

    /// The credential, percent-decoded.
    pub fn credentials(&self) -> GitCredentials {
        let (user, password) = self.0.split_once(':').unwrap_or((&self.0, ""));
        GitCredentials {
            user: percent_decode(user),
            password: percent_decode(password),
        }
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl std::fmt::Debug for GitCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GitCredentials(<redacted>)")
    }
}

/// The build context could not be made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A path of the request leaves the repository.
    #[error("{field} {path:?} leaves the repository ({why}); give a path inside it")]
    Escape {
        /// The request field.
        field: &'static str,
        /// The path given.
        path: String,
        /// How it leaves.
        why: &'static str,
    },
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

/// A checked-out build context.
#[derive(Debug, Clone)]
pub struct BuildContext {
    /// The Dockerfile, inside the checkout.
    pub dockerfile: PathBuf,
    /// The context directory, inside the checkout.
    pub context: PathBuf,
}

/// Refuses request paths that leave the checkout on their face (absolute, or with `..`).
/// Symlinks that leave it are caught after the checkout.
pub fn validate_paths(source: &DockerfileSource) -> Result<(), Error> {
    for (field, path) in [
        ("dockerfile_path", &source.dockerfile_path),
        ("context_path", &source.context_path),
    ] {
        let p = Path::new(path);
        if p.is_absolute() {
            return Err(Error::Escape {
                field,
                path: path.clone(),
                why: "it is absolute",
            });
        }
        if p.components().any(|c| c == Component::ParentDir) {
            return Err(Error::Escape {
                field,
                path: path.clone(),
                why: "it climbs out with ..",
            });
        }
    }
    Ok(())
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
        log: &BuildLog,
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
        // The remote URL may carry credentials; the checkout must not keep them.
        let mut cmd = git(None);
        cmd.arg("-C")
            .arg(dir_arg)
            .args(["remote", "remove", "origin"]);
        run_git(cmd, "remote remove", id, log).await?;
        resolve(&dir, source)
    }
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
    log: &BuildLog,
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
            Ok(_) => Err(Error::Escape {
                field,
                path: path.to_owned(),
                why: "a symlink points outside it",
            }),
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

    #[test]
    fn url_userinfo_is_split_off_restored_exactly_and_decoded() {
        let sent = "https://bob:p%40ss:w@git.example:8443/r.git";
        let (bare, info) = UrlUserinfo::split(sent);
        assert_eq!(bare, "https://git.example:8443/r.git");
        let info = info.unwrap();
        assert_eq!(info.restore(&bare), sent);
        let c = info.credentials();
        assert_eq!((c.user.as_str(), c.password.as_str()), ("bob", "p@ss:w"));
        assert!(!format!("{info:?}").contains("bob"));

        let (bare, info) = UrlUserinfo::split("https://TOKEN@host/r.git");
        assert_eq!(bare, "https://host/r.git");
        assert_eq!(info.unwrap().credentials().user, "TOKEN");
        // An ssh user is no secret; no user-info at all stays as it is.
        for uri in ["ssh://git@host/r.git", "https://host/a@b", "/srv/r.git"] {
            let (bare, info) = UrlUserinfo::split(uri);
            assert_eq!((bare.as_str(), info.is_none()), (uri, true));
        }
    }

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
            assert!(matches!(err, Error::Escape { .. }), "{d} {c}: {err}");
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
            Err(Error::Escape { .. })
        ));
        assert!(matches!(
            resolve(&root, &source("Dockerfile", "rootctx")),
            Err(Error::Escape { .. })
        ));
        assert!(matches!(
            resolve(&root, &source("Missing", ".")),
            Err(Error::NoDockerfile(_))
        ));
        let creds = GitCredentials {
            user: "u".into(),
            password: "p".into(),
        };
        assert_eq!(format!("{creds:?}"), "GitCredentials(<redacted>)");
    }
}
