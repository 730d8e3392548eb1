//! Executors make base images. The local executor, the embedded default, checks a Dockerfile
//! source out of git and builds it with buildah on this machine, then pushes it to its base
//! ref. Reference sources need no build.

pub mod buildah;
pub mod process;

use async_trait::async_trait;
use image_builder_state::{BuildId, BuildSource, BuildView};

use crate::context::GitCheckouts;
use crate::orchestrator::{Build, BuildLog, BuildSecrets, StepError};
use buildah::Buildah;

/// Builds on this machine: git checkouts plus buildah.
#[derive(Debug, Clone)]
pub struct LocalExecutor {
    checkouts: GitCheckouts,
    buildah: Buildah,
}

impl LocalExecutor {
    /// An executor with work directories under `checkouts` and buildah storage in `buildah`.
    pub fn new(checkouts: GitCheckouts, buildah: Buildah) -> Self {
        Self { checkouts, buildah }
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
        log.line(format!("building {} with buildah", build.base_ref))
            .await;
        self.buildah
            .build(build.id, &context, &build.base_ref, log)
            .await?;
        log.line(format!("pushing {}", build.base_ref)).await;
        self.buildah.push(build.id, &build.base_ref, log).await?;
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
