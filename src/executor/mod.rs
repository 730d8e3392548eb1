//! Executors make base images (the `BuildBase` step). `local` builds with buildah on the
//! service's own machine (the embedded default); `kubernetes` runs each build attempt as a
//! Job in a cluster. Reference sources need no build.

pub mod buildah;
pub mod kubernetes;
pub mod layer_cache;
mod local;
pub mod user_namespace;

pub use local::LocalExecutor;

use std::path::Path;

use image_builder_state::{BuildSource, BuildView, DockerfileSource};

use crate::credentials::BuildSecrets;
use crate::steps::{StepError, StepErrorKind, StepLog};

/// The awk program that lists the images a Dockerfile names (its FROM lines and `COPY --from`,
/// global ARG defaults substituted; see its head). Both executors pull these with the build's
/// credentials in a step of their own, before the step that runs the Dockerfile, which holds
/// no credential: locally through [`base_images`], in a builder pod in its `fetch` step.
pub const BASE_IMAGES_AWK: &str = include_str!("base_images.awk");

/// The images `dockerfile` names, by [`BASE_IMAGES_AWK`]; none when awk cannot read it (the
/// build then says what is wrong with the Dockerfile).
pub async fn base_images(dockerfile: &Path) -> Vec<String> {
    let mut cmd = tokio::process::Command::new("awk");
    cmd.arg(BASE_IMAGES_AWK).arg(dockerfile);
    match crate::process::output(cmd).await {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect(),
        Ok(out) => {
            tracing::warn!(status = %out.status, "awk could not list the Dockerfile's images");
            Vec::new()
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot run awk to list the Dockerfile's images");
            Vec::new()
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    async fn images_of(dockerfile: &str) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("Dockerfile");
        std::fs::write(&path, dockerfile).unwrap();
        base_images(&path).await
    }

    #[tokio::test]
    async fn base_images_are_every_from_and_copy_from_with_global_arg_defaults_and_no_stage() {
        let dockerfile = "# syntax=docker/dockerfile:1\r\n\
            ARG BASE=reg.example:5000/private/a:1\n\
            ARG TAG=\"2\" UNSET\n\
            FROM $BASE AS build\n\
            RUN make\n\
            ARG TAG=9\n\
            from --platform=linux/amd64 reg.example:5000/private/b:${TAG} as Runtime\n\
            COPY --chown=1 --from=reg.example:5000/tools:3 /x /y\n\
            COPY --from=build /x /y\n\
            COPY --from=0 /x /y\n\
            FROM runtime\n\
            FROM scratch\n\
            FROM ${UNSET}\n\
            FROM reg.example:5000/x:$UNSET\n\
            FROM ${TAG\n\
            FROM $BASE\n";
        assert_eq!(
            images_of(dockerfile).await,
            [
                "reg.example:5000/private/a:1",
                "reg.example:5000/private/b:2",
                "reg.example:5000/tools:3",
            ]
        );
    }

    #[tokio::test]
    async fn a_missing_dockerfile_names_no_image() {
        assert!(
            base_images(Path::new("/nonexistent/Dockerfile"))
                .await
                .is_empty()
        );
    }

    #[test]
    fn the_program_can_sit_in_single_quotes() {
        assert!(!BASE_IMAGES_AWK.contains('\''));
    }
}
