//! Executors make base images (the `BuildBase` step). `local` builds with buildah on the
//! service's own machine (the embedded default); `kubernetes` runs each build attempt as a
//! Job in a cluster. Reference sources need no build.

pub mod buildah;
pub mod kubernetes;
pub mod layer_cache;
mod local;
pub mod user_namespace;

pub use local::LocalExecutor;

use image_builder_state::{BuildSource, BuildView, DockerfileSource};

use crate::credentials::BuildSecrets;
use crate::steps::{StepError, StepErrorKind, StepLog};

/// How a build uses the layer cache. A forced rebuild (`force_rebuild`) runs every step of
/// its Dockerfile again, as mk3's did (people force a rebuild for a fresh `apt-get update` or
/// download, or a new run of a flaky step), and still writes what it makes to the cache, for
/// later unforced builds to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCacheUse {
    /// Steps found in the cache are taken from it; new ones are written to it.
    ReadWrite,
    /// Every step runs; what it makes is written to the cache.
    WriteOnly,
}

impl LayerCacheUse {
    /// How `build` uses the cache: write-only when it is a forced rebuild.
    pub fn of(build: &BuildView) -> Self {
        if build.spec.force_rebuild {
            Self::WriteOnly
        } else {
            Self::ReadWrite
        }
    }
}

/// A source cloned with credentials needs them still: they are never kept across a restart
/// of the service, and a clone without them must not be tried.
fn require_git_credentials(
    source: &DockerfileSource,
    secrets: &BuildSecrets,
) -> Result<(), StepError> {
    if source.git_auth && secrets.git.is_none() {
        return Err(StepError::new(
            StepErrorKind::Unauthenticated,
            "the git credentials of this build are not kept across a restart of the service; submit the build again with them",
        ));
    }
    Ok(())
}

/// The Dockerfile a build makes its base image from; `None`, said in the log, for a reference
/// source, whose base image exists already.
async fn dockerfile_source<'a>(
    build: &'a BuildView,
    log: &dyn StepLog,
) -> Option<&'a DockerfileSource> {
    match &build.spec.source {
        BuildSource::Dockerfile(source) => Some(source),
        BuildSource::Reference { .. } => {
            log.line(format!(
                "nothing to build: the base image is the existing image {}",
                build.base_ref
            ))
            .await;
            None
        }
    }
}
