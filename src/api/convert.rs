//! Protobuf messages to domain types and back. Validation of what clients send lives here, so
//! that a bad request is refused with a message naming the field.

use image_builder_state::view::Summary;
use image_builder_state::{BuildSource, BuildSpec, CloneTargetMode, DockerfileSource, Phase};

use crate::orchestrator::Error;
use crate::proto::builder as pb;
use crate::proto::contentservice as cs;

/// The domain source of a request's `source` field.
pub fn source(source: Option<&pb::BuildSource>) -> Result<BuildSource, Error> {
    let from = source.and_then(|s| s.from.as_ref()).ok_or_else(|| {
        Error::InvalidRequest("source is required: set source.ref or source.file".into())
    })?;
    match from {
        pb::build_source::From::Ref(r) => {
            if r.r#ref.trim().is_empty() {
                return Err(Error::InvalidRequest(
                    "source.ref.ref is empty: name an image, e.g. alpine:3.20".into(),
                ));
            }
            Ok(BuildSource::Reference {
                reference: r.r#ref.trim().to_owned(),
            })
        }
        pb::build_source::From::File(f) => dockerfile(f).map(BuildSource::Dockerfile),
    }
}

fn dockerfile(f: &pb::BuildSourceDockerfile) -> Result<DockerfileSource, Error> {
    use cs::workspace_initializer::Spec;
    let spec = f
        .source
        .as_ref()
        .and_then(|i| i.spec.as_ref())
        .ok_or_else(|| {
            Error::InvalidRequest("source.file.source is required: give a git initializer".into())
        })?;
    let git = match spec {
        Spec::Git(git) => git,
        other => {
            let name = match other {
                Spec::Empty(_) => "empty",
                Spec::Snapshot(_) => "snapshot",
                Spec::Prebuild(_) => "prebuild",
                Spec::Composite(_) => "composite",
                Spec::Download(_) => "download",
                Spec::Backup(_) => "backup",
                Spec::Git(_) => "git",
            };
            return Err(Error::InvalidRequest(format!(
                "source.file.source is a {name} initializer; Dockerfile builds take their context from a git initializer only"
            )));
        }
    };
    if git.remote_uri.trim().is_empty() {
        return Err(Error::InvalidRequest(
            "source.file.source.git.remote_uri is empty".into(),
        ));
    }
    let target_mode = match cs::CloneTargetMode::try_from(git.target_mode) {
        Ok(cs::CloneTargetMode::RemoteHead) => CloneTargetMode::RemoteHead,
        Ok(cs::CloneTargetMode::RemoteCommit) => CloneTargetMode::RemoteCommit,
        Ok(cs::CloneTargetMode::RemoteBranch) => CloneTargetMode::RemoteBranch,
        Ok(cs::CloneTargetMode::LocalBranch) => CloneTargetMode::LocalBranch,
        Err(_) => {
            return Err(Error::InvalidRequest(format!(
                "source.file.source.git.target_mode {} is not a CloneTargetMode",
                git.target_mode
            )));
        }
    };
    Ok(DockerfileSource {
        remote_uri: git.remote_uri.clone(),
        target_mode,
        clone_target: git.clone_taget.clone(),
        dockerfile_path: f.dockerfile_path.clone(),
        context_path: f.context_path.clone(),
        dockerfile_version: f.dockerfile_version.clone(),
    })
}

/// The journaled spec of a Build request (credentials are left behind here).
pub fn build_spec(req: &pb::BuildRequest) -> Result<BuildSpec, Error> {
    let source = source(req.source.as_ref())?;
    if matches!(source, BuildSource::Dockerfile(_)) {
        return Err(Error::InvalidRequest(
            "Dockerfile sources (source.file) are not supported by this version of image-builder yet; build from an image with source.ref".into(),
        ));
    }
    Ok(BuildSpec {
        source,
        force_rebuild: req.force_rebuild,
        triggered_by: req.triggered_by.clone(),
        supervisor_ref: req.supervisor_ref.clone(),
        had_request_auth: req.auth.is_some(),
    })
}

/// mk3's status of a build in a phase.
pub fn status(phase: Phase) -> pb::BuildStatus {
    match phase {
        Phase::Resolving | Phase::CheckingCache | Phase::Building | Phase::Pushing => {
            pb::BuildStatus::Running
        }
        Phase::Done => pb::BuildStatus::DoneSuccess,
        Phase::Failed | Phase::Cancelled => pb::BuildStatus::DoneFailure,
    }
}

/// A stored build as mk3's `BuildInfo`.
pub fn build_info(s: &Summary) -> pb::BuildInfo {
    pb::BuildInfo {
        r#ref: s.workspace_ref.clone(),
        status: status(s.phase) as i32,
        started_at: s.created_at_ms / 1000,
        base_ref: s.base_ref.clone(),
        build_id: s.id.to_string(),
        log_info: None,
    }
}
