//! What a build is asked to do, as journaled: the request without any credential.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The identity of one build: a UUIDv7, so that byte order is creation order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BuildId(Uuid);

impl BuildId {
    /// A fresh id, ordered after every id made before it by this clock.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// The 16 bytes used as the key prefix of this build's records.
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    /// When the id was made, ms since the epoch (a UUIDv7 starts with it).
    pub fn created_at_ms(&self) -> i64 {
        let b = self.0.as_bytes();
        let mut ms = [0u8; 8];
        ms[2..].copy_from_slice(&b[..6]);
        i64::from_be_bytes(ms)
    }

    /// Rebuilds an id from its key bytes.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(Uuid::from_bytes(bytes))
    }
}

impl Default for BuildId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for BuildId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// The text given is not a build id.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a build id (expected a UUID such as 0190b7a2-8c5e-7d3a-9f1e-2b4c6d8e0f12)")]
pub struct ParseBuildIdError(String);

impl FromStr for BuildId {
    type Err = ParseBuildIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s)
            .map(Self)
            .map_err(|_| ParseBuildIdError(s.to_owned()))
    }
}

/// Where a build's image comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BuildSource {
    /// An existing image, by reference (`BuildSourceReference`).
    Reference {
        /// The reference as the client gave it.
        reference: String,
    },
    /// A Dockerfile in a git repository (`BuildSourceDockerfile` with a git initializer).
    Dockerfile(DockerfileSource),
}

/// A Dockerfile build context taken from git, without credentials.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerfileSource {
    /// The repository to clone.
    pub remote_uri: String,
    /// How `clone_target` is to be read.
    pub target_mode: CloneTargetMode,
    /// The commit or branch to check out, as the client gave it (part of the cache key).
    pub clone_target: String,
    /// The Dockerfile, relative to the checkout.
    pub dockerfile_path: String,
    /// The build context, relative to the checkout.
    pub context_path: String,
    /// The client's version tag of the Dockerfile (part of the cache key).
    pub dockerfile_version: String,
    /// Whether the request carried git credentials (kept in memory only, never journaled).
    pub git_auth: bool,
}

impl DockerfileSource {
    /// The first path of the request that leaves the checkout on its face (absolute, or
    /// climbing out with `..`); symlinks that leave it can only be seen in the checkout.
    pub fn path_escape(&self) -> Option<PathEscape> {
        for (field, path) in [
            ("dockerfile_path", &self.dockerfile_path),
            ("context_path", &self.context_path),
        ] {
            let p = std::path::Path::new(path);
            let why = if p.is_absolute() {
                "it is absolute"
            } else if p.components().any(|c| c == std::path::Component::ParentDir) {
                "it climbs out with .."
            } else {
                continue;
            };
            return Some(PathEscape {
                field,
                path: path.clone(),
                why,
            });
        }
        None
    }

    /// Whether the remote names a repository on the service's own machine (a path or a
    /// `file://` URL), which only `builds.allowLocalRepositories` permits.
    pub fn remote_is_local(&self) -> bool {
        is_local_remote(&self.remote_uri)
    }
}

/// Whether a git remote names a repository on the service's own machine (a path or a
/// `file://` URL).
pub fn is_local_remote(uri: &str) -> bool {
    uri.starts_with("file://") || uri.starts_with('/')
}

/// A path of a request that leaves the repository; see [`DockerfileSource::path_escape`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field} {path:?} leaves the repository ({why}); give a path inside it")]
pub struct PathEscape {
    /// The request field.
    pub field: &'static str,
    /// The path given.
    pub path: String,
    /// How it leaves.
    pub why: &'static str,
}

/// How the clone target of a Dockerfile build is read (mk3's `CloneTargetMode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CloneTargetMode {
    /// The remote's default branch.
    RemoteHead,
    /// A commit by hash.
    RemoteCommit,
    /// A branch of the remote.
    RemoteBranch,
    /// A branch created locally.
    LocalBranch,
}

/// The journaled part of a build request: everything needed to run it again, and no credential.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildSpec {
    /// Where the image comes from.
    pub source: BuildSource,
    /// Build even if the workspace image exists.
    pub force_rebuild: bool,
    /// Who asked, as the client said.
    pub triggered_by: String,
    /// The supervisor image the client named (kept for compatibility; mk3 ignores it too).
    pub supervisor_ref: String,
    /// Whether the request carried per-request registry credentials, which are never journaled:
    /// a resumed build that needs them must ask for them again.
    pub had_request_auth: bool,
}
