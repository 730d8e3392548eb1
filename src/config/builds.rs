//! `builds`: how long a build may run, how many run at once, how much log each keeps, how long
//! finished ones are kept, and how Dockerfile sources' base images are named.

use std::time::Duration;

use serde::Deserialize;

use super::{Error, MAX_COUNT, invalid};

/// The `builds` group.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct BuildsConfig {
    /// How long a build may run once admitted, e.g. `"90s"`, `"60m"`. Default `60m` (mk3's).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Builds that run at once; the rest wait in the journal as queued, in order. Default 4.
    pub max_concurrent: usize,
    /// Bytes of log kept per build; past it a truncation marker is written and the build goes
    /// on. Default 16 MiB.
    pub max_log_bytes: u64,
    /// Finished builds older than this are removed with their logs. Default `7d`.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// How a Dockerfile source's base image is named: `mk3` (default) hashes the request's
    /// fields as mk3 does, so registries filled by mk3 stay cache hits; `content` adds the
    /// Dockerfile's bytes and the context directory's files (git's hashes at the commit the
    /// target names), so a change to a COPY'd file is a new image.
    pub base_image_key: BaseImageKey,
    /// Whether Dockerfile builds may clone repositories on this machine (plain paths and
    /// `file://` URLs). Default `false`: otherwise any client could read the service's disk
    /// through a build context. Tests and the demo turn it on.
    pub allow_local_repositories: bool,
}

impl Default for BuildsConfig {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_BUILD_TIMEOUT,
            max_concurrent: 4,
            max_log_bytes: 16 << 20,
            retention: Duration::from_secs(7 * 24 * 60 * 60),
            base_image_key: BaseImageKey::default(),
            allow_local_repositories: false,
        }
    }
}

/// mk3's time limit of a build, also the Kubernetes executor's default pod deadline.
pub(super) const DEFAULT_BUILD_TIMEOUT: Duration = Duration::from_secs(60 * 60);

/// How Dockerfile sources' base images are named.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BaseImageKey {
    /// mk3's hash of the request's fields.
    #[default]
    Mk3,
    /// mk3's fields and the source's content.
    Content,
}

impl BuildsConfig {
    pub(super) fn validate(&self) -> Result<(), Error> {
        if self.timeout.is_zero() {
            return Err(invalid(
                "builds.timeout",
                "must be longer than zero, e.g. \"60m\"",
            ));
        }
        if !(1..=MAX_COUNT).contains(&self.max_concurrent) {
            return Err(invalid(
                "builds.maxConcurrent",
                format!("must be between 1 and {MAX_COUNT}"),
            ));
        }
        if self.max_log_bytes < 1024 {
            return Err(invalid("builds.maxLogBytes", "must be at least 1024"));
        }
        if self.retention.is_zero() {
            return Err(invalid(
                "builds.retention",
                "must be longer than zero, e.g. \"7d\"",
            ));
        }
        Ok(())
    }
}
