//! Protobuf messages to domain types and back. Validation of what clients send lives here, so
//! that a bad request is refused with a message naming the field.

use image_builder_state::view::Summary;
use image_builder_state::{BuildSource, BuildSpec, CloneTargetMode, DockerfileSource, Phase};

use crate::context::{self, GitCredentials};
use crate::credentials::{RequestAuth, Secret, normalize_host};
use crate::orchestrator::{BuildSecrets, Error};
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
    let source = DockerfileSource {
        remote_uri: git.remote_uri.clone(),
        target_mode,
        clone_target: git.clone_taget.clone(),
        dockerfile_path: f.dockerfile_path.clone(),
        context_path: f.context_path.clone(),
        dockerfile_version: f.dockerfile_version.clone(),
        git_auth: git_credentials(git)?.is_some(),
    };
    context::validate_paths(&source)
        .map_err(|e| Error::InvalidRequest(format!("source.file.{e}")))?;
    Ok(source)
}

/// The git credentials of a git initializer, if it has any.
fn git_credentials(git: &cs::GitInitializer) -> Result<Option<GitCredentials>, Error> {
    let Some(config) = git.config.as_ref() else {
        return Ok(None);
    };
    match cs::GitAuthMethod::try_from(config.authentication) {
        Ok(cs::GitAuthMethod::NoAuth) => Ok(None),
        Ok(cs::GitAuthMethod::BasicAuth) => Ok(Some(GitCredentials {
            user: config.auth_user.clone(),
            password: config.auth_password.clone(),
        })),
        Ok(cs::GitAuthMethod::BasicAuthOts) => Err(Error::InvalidRequest(
            "source.file.source.git.config.authentication BASIC_AUTH_OTS is not supported; use BASIC_AUTH".into(),
        )),
        Err(_) => Err(Error::InvalidRequest(format!(
            "source.file.source.git.config.authentication {} is not a GitAuthMethod",
            config.authentication
        ))),
    }
}

/// The journaled spec of a Build request, and the secrets that must stay out of the journal.
pub fn build_request(req: &pb::BuildRequest) -> Result<(BuildSpec, BuildSecrets), Error> {
    let source = source(req.source.as_ref())?;
    let git = match req.source.as_ref().and_then(|s| s.from.as_ref()) {
        Some(pb::build_source::From::File(f)) => {
            match f.source.as_ref().and_then(|i| i.spec.as_ref()) {
                Some(cs::workspace_initializer::Spec::Git(git)) => git_credentials(git)?,
                _ => None,
            }
        }
        _ => None,
    };
    let spec = BuildSpec {
        source,
        force_rebuild: req.force_rebuild,
        triggered_by: req.triggered_by.clone(),
        supervisor_ref: req.supervisor_ref.clone(),
        had_request_auth: req.auth.is_some(),
    };
    let registry = registry_auth(req.auth.as_ref())?;
    Ok((spec, BuildSecrets { git, registry }))
}

/// mk3's `BuildRegistryAuth` as what the request allows and brought. A request without one
/// allows no installation credential.
pub fn registry_auth(auth: Option<&pb::BuildRegistryAuth>) -> Result<RequestAuth, Error> {
    let Some(auth) = auth else {
        return Ok(RequestAuth::default());
    };
    let mut request = RequestAuth::default();
    match &auth.mode {
        Some(pb::build_registry_auth::Mode::Total(total)) => request.allow_all = total.allow_all,
        Some(pb::build_registry_auth::Mode::Selective(selective)) => {
            request.allow_base_repository = selective.allow_baserep;
            request.allow_workspace_repository = selective.allow_workspacerep;
            request.allowed = selective.any_of.clone();
        }
        None => {}
    }
    for (host, value) in &auth.additional {
        // The value is base64 `user:password`; a password (or token) may itself hold colons.
        let secret = Secret::from_basic_token(value).ok_or_else(|| {
            Error::InvalidRequest(format!(
                "auth.additional[{host:?}] is not base64 of user:password"
            ))
        })?;
        request.additional.insert(normalize_host(host), secret);
    }
    Ok(request)
}

/// mk3's status of a build in a phase.
pub fn status(phase: Phase) -> pb::BuildStatus {
    match phase {
        Phase::Queued
        | Phase::Resolving
        | Phase::CheckingCache
        | Phase::Building
        | Phase::Pushing => pb::BuildStatus::Running,
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
