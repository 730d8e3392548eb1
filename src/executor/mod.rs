//! Executors make base images. The local executor is the embedded default; Dockerfile builds
//! (buildah) arrive with the Dockerfile-build issue, until then they are refused at the edge.

use async_trait::async_trait;
use image_builder_state::{BuildSource, BuildView};

use crate::orchestrator::{Build, BuildLog, StepError};

/// Builds on this machine.
#[derive(Debug, Default)]
pub struct LocalExecutor;

#[async_trait]
impl Build for LocalExecutor {
    async fn build(&self, build: &BuildView, log: &BuildLog) -> Result<(), StepError> {
        match &build.spec.source {
            BuildSource::Reference { .. } => {
                log.line(format!(
                    "nothing to build: the base image is the existing image {}",
                    build.base_ref
                ))
                .await;
                Ok(())
            }
            BuildSource::Dockerfile(_) => Err(StepError::Unsupported(
                "Dockerfile builds are not supported by this version of image-builder".into(),
            )),
        }
    }
}
