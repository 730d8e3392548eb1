//! Protobuf messages to domain types and back. Validation of what clients send lives here, so
//! that a bad request is refused with a message naming the field.

use image_builder_state::view::Summary;
use image_builder_state::{BuildSource, BuildSpec, CloneTargetMode, DockerfileSource, Phase};

use crate::credentials::{BuildSecrets, GitCredentials, UrlUserinfo};
use crate::credentials::{RequestAuth, Secret, normalize_host};
use crate::orchestrator::Error;
use crate::proto::builder as pb;
use crate::proto::contentservice as cs;

/// Longest image reference accepted. The distribution spec lets registries refuse repository
/// names past 255 characters; a host, a tag (128) and a digest (71) come on top.
pub const MAX_REF_BYTES: usize = 512;
/// Longest URI or path accepted.
const MAX_TEXT_BYTES: usize = 4096;
/// Longest name accepted (branch, Dockerfile version, who triggered a build).
const MAX_NAME_BYTES: usize = 256;
/// Most hosts in `auth.selective.any_of` or `auth.additional`.
const MAX_HOSTS: usize = 64;
/// Most characters of client input echoed back in a message.
const ECHO_CHARS: usize = 200;

/// `text` for an error message, quoted and escaped: at most 200 characters of it, saying how
/// long it was when cut.
pub fn echo(text: &str) -> String {
    let quoted = format!("{text:?}");
    match quoted.char_indices().nth(ECHO_CHARS) {
        None => quoted,
        Some((cut, _)) => format!("{}… ({} bytes)", &quoted[..cut], text.len()),
    }
}

/// `value` of `field`, refused when longer than `max` bytes or holding a NUL or control byte.
fn bounded<'a>(field: &str, value: &'a str, max: usize) -> Result<&'a str, Error> {
    if value.len() > max {
        return Err(Error::InvalidRequest(format!(
            "{field} is {} bytes long; at most {max} are accepted",
            value.len()
        )));
    }
    if value.bytes().any(|b| b.is_ascii_control()) {
        return Err(Error::InvalidRequest(format!(
            "{field} holds a control character: {}",
            echo(value)
        )));
    }
    Ok(value)
}

/// A cancel's reason as the operator gave it, trimmed and bounded like any name.
pub fn cancel_reason(value: &str) -> Result<String, Error> {
    bounded("reason", value.trim(), MAX_TEXT_BYTES).map(str::to_owned)
}

/// An image reference as a client sent it, trimmed and bounded.
pub fn image_ref<'a>(field: &str, value: &'a str) -> Result<&'a str, Error> {
    bounded(field, value.trim(), MAX_REF_BYTES)
}

/// The domain source of a request's `source` field, and the credential its git remote URL
/// carried (split off: the source never holds it).
pub fn source(
    source: Option<&pb::BuildSource>,
) -> Result<(BuildSource, Option<UrlUserinfo>), Error> {
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
            let reference = image_ref("source.ref.ref", &r.r#ref)?.to_owned();
            Ok((BuildSource::Reference { reference }, None))
        }
        pb::build_source::From::File(f) => {
            dockerfile(f).map(|(d, userinfo)| (BuildSource::Dockerfile(d), userinfo))
        }
    }
}

fn dockerfile(
    f: &pb::BuildSourceDockerfile,
) -> Result<(DockerfileSource, Option<UrlUserinfo>), Error> {
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
    let remote_uri = bounded(
        "source.file.source.git.remote_uri",
        &git.remote_uri,
        MAX_TEXT_BYTES,
    )?;
    let (remote_uri, userinfo) = UrlUserinfo::split(remote_uri);
    check_remote(&remote_uri)?;
    bounded(
        "source.file.source.git.clone_taget",
        &git.clone_taget,
        MAX_NAME_BYTES,
    )?;
    bounded(
        "source.file.dockerfile_path",
        &f.dockerfile_path,
        MAX_TEXT_BYTES,
    )?;
    bounded("source.file.context_path", &f.context_path, MAX_TEXT_BYTES)?;
    bounded(
        "source.file.dockerfile_version",
        &f.dockerfile_version,
        MAX_NAME_BYTES,
    )?;
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
    check_clone_target(target_mode, &git.clone_taget)?;
    let source = DockerfileSource {
        remote_uri,
        target_mode,
        clone_target: git.clone_taget.clone(),
        dockerfile_path: f.dockerfile_path.clone(),
        context_path: f.context_path.clone(),
        dockerfile_version: f.dockerfile_version.clone(),
        git_auth: git_credentials(git)?.is_some() || userinfo.is_some(),
    };
    if let Some(escape) = source.path_escape() {
        return Err(Error::InvalidRequest(format!("source.file.{escape}")));
    }
    Ok((source, userinfo))
}

/// Refuses remotes git would run a program for (`ext::…`, any `transport::address` remote
/// helper), or take as an option. Allowed: `https://`, `http://`, `ssh://`, `git://`,
/// scp-like `user@host:path`, and local repositories (`file://`, absolute paths), which the
/// orchestrator admits only when the configuration allows them.
fn check_remote(uri: &str) -> Result<(), Error> {
    const SCHEMES: [&str; 5] = ["https://", "http://", "ssh://", "git://", "file://"];
    let refuse = |why: &str| {
        Err(Error::InvalidRequest(format!(
            "source.file.source.git.remote_uri {}: {why}; use an https://, http://, ssh:// or git:// URL",
            echo(uri)
        )))
    };
    if uri.starts_with('-') {
        return refuse("it would reach git as an option");
    }
    if SCHEMES.iter().any(|s| uri.starts_with(s)) || uri.starts_with('/') {
        return Ok(());
    }
    if uri.contains("::") {
        return refuse("git remote helpers (transport::address) are not accepted");
    }
    if let Some((_, _)) = uri.split_once("://") {
        return refuse("its scheme is not one git is allowed to use here");
    }
    // scp-like `[user@]host:path`.
    if let Some((host, _)) = uri.split_once(':')
        && !host.is_empty()
        && !host.contains('/')
    {
        return Ok(());
    }
    refuse("it is not a URL")
}

/// A branch must be a branch name git accepts, a commit an object name (hex), so that
/// neither can reach git as an option.
fn check_clone_target(mode: CloneTargetMode, target: &str) -> Result<(), Error> {
    let field = "source.file.source.git.clone_taget";
    let bad = |why: &str| {
        Err(Error::InvalidRequest(format!(
            "{field} {} {why}",
            echo(target)
        )))
    };
    match mode {
        CloneTargetMode::RemoteHead => Ok(()),
        CloneTargetMode::RemoteCommit => {
            let hex = target.bytes().all(|b| b.is_ascii_hexdigit());
            if hex && (4..=64).contains(&target.len()) {
                Ok(())
            } else {
                bad("is not a commit: give its hex object name")
            }
        }
        CloneTargetMode::RemoteBranch | CloneTargetMode::LocalBranch => {
            let forbidden = |c: char| c.is_whitespace() || "~^:?*[\\".contains(c);
            if target.is_empty() {
                bad("is empty: name the branch")
            } else if target.starts_with('-')
                || target.starts_with('/')
                || target.ends_with('/')
                || target.ends_with('.')
                || target.ends_with(".lock")
                || target.contains("..")
                || target.contains("@{")
                || target.contains("//")
                || target.chars().any(forbidden)
            {
                bad("is not a branch name git accepts")
            } else {
                Ok(())
            }
        }
    }
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

/// The git credentials a source carries: its `GitConfig`'s, else those its remote URL carried
/// (`remote_userinfo`, from [`source`]).
pub fn source_git_credentials(
    source: Option<&pb::BuildSource>,
    remote_userinfo: Option<&UrlUserinfo>,
) -> Result<Option<GitCredentials>, Error> {
    let configured = match source.and_then(|s| s.from.as_ref()) {
        Some(pb::build_source::From::File(f)) => {
            match f.source.as_ref().and_then(|i| i.spec.as_ref()) {
                Some(cs::workspace_initializer::Spec::Git(git)) => git_credentials(git)?,
                _ => None,
            }
        }
        _ => None,
    };
    Ok(configured.or_else(|| remote_userinfo.map(UrlUserinfo::credentials)))
}

/// The journaled spec of a Build request, and the secrets that must stay out of the journal.
pub fn build_request(req: &pb::BuildRequest) -> Result<(BuildSpec, BuildSecrets), Error> {
    let (source, remote_userinfo) = source(req.source.as_ref())?;
    let git = source_git_credentials(req.source.as_ref(), remote_userinfo.as_ref())?;
    bounded("triggered_by", &req.triggered_by, MAX_NAME_BYTES)?;
    bounded("supervisor_ref", &req.supervisor_ref, MAX_REF_BYTES)?;
    let spec = BuildSpec {
        source,
        force_rebuild: req.force_rebuild,
        triggered_by: req.triggered_by.clone(),
        supervisor_ref: req.supervisor_ref.clone(),
        had_request_auth: req.auth.is_some(),
    };
    let registry = registry_auth(req.auth.as_ref())?;
    Ok((
        spec,
        BuildSecrets {
            git,
            registry,
            remote_userinfo,
        },
    ))
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
            if selective.any_of.len() > MAX_HOSTS {
                return Err(Error::InvalidRequest(format!(
                    "auth.selective.any_of has {} hosts; at most {MAX_HOSTS} are accepted",
                    selective.any_of.len()
                )));
            }
            for host in &selective.any_of {
                bounded("auth.selective.any_of[]", host, MAX_NAME_BYTES)?;
            }
            request.allowed = selective.any_of.clone();
        }
        None => {}
    }
    if auth.additional.len() > MAX_HOSTS {
        return Err(Error::InvalidRequest(format!(
            "auth.additional has {} hosts; at most {MAX_HOSTS} are accepted",
            auth.additional.len()
        )));
    }
    for (host, value) in &auth.additional {
        bounded("auth.additional host", host, MAX_NAME_BYTES)?;
        // The value is base64 `user:password`; a password (or token) may itself hold colons.
        let secret = Secret::from_basic_token(value).ok_or_else(|| {
            Error::InvalidRequest(format!(
                "auth.additional[{}] is not base64 of user:password",
                echo(host)
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
