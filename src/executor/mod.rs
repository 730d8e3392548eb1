//! Executors make base images (the `BuildBase` step). `local` builds with buildah on the
//! service's own machine (the embedded default); `kubernetes` runs each build attempt as a
//! Job in a cluster. Reference sources need no build.

pub mod buildah;
pub mod kubernetes;
mod local;

pub use local::LocalExecutor;

use image_builder_state::{BuildSource, BuildView, DockerfileSource};

use crate::steps::StepLog;

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
