//! What the Kubernetes executor asks the cluster for: one Job per build attempt, named and
//! labelled after the build and attempt so that it is found again after any restart, and a
//! Secret with the attempt's credentials, owned by the Job. Credentials live in the Secret's
//! data only: never in the pod spec, its environment or its arguments.

use std::collections::BTreeMap;

use image_builder_state::{BuildId, CloneTargetMode, DockerfileSource};
use k8s_openapi::ByteString;
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, PodSecurityContext, PodSpec,
    PodTemplateSpec, SeccompProfile, Secret, SecretVolumeSource, SecurityContext, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use crate::config::KubernetesConfig;
use crate::executor::LayerCacheUse;

/// Marks every object this service makes.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "image-builder");
/// Names the installation (so that two installations in one namespace leave each other's
/// Jobs alone).
pub const INSTALLATION_LABEL: &str = "image-builder.gitpod.io/installation";
/// Names the build.
pub const BUILD_LABEL: &str = "image-builder.gitpod.io/build-id";
/// Names the attempt.
pub const ATTEMPT_LABEL: &str = "image-builder.gitpod.io/attempt";
/// The builder's container.
pub const CONTAINER: &str = "builder";
/// Where the attempt's Secret is mounted in the builder.
const SECRETS_DIR: &str = "/var/run/image-builder";

/// The Job of attempt `attempt` of build `id`: the same name every time it is asked for.
pub fn job_name(id: BuildId, attempt: u32) -> String {
    format!("ib-{}-{attempt}", hex::encode(id.as_bytes()))
}

/// The Secret of a Job.
pub fn secret_name(job: &str) -> String {
    format!("{job}-auth")
}

/// The labels of one attempt's objects.
pub fn labels(installation: &str, id: BuildId, attempt: u32) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned()),
        (INSTALLATION_LABEL.to_owned(), installation.to_owned()),
        (BUILD_LABEL.to_owned(), id.to_string()),
        (ATTEMPT_LABEL.to_owned(), attempt.to_string()),
    ])
}

/// A label selector for every object of this installation (optionally one build's).
pub fn selector(installation: &str, id: Option<BuildId>) -> String {
    let mut selector = format!(
        "{}={},{INSTALLATION_LABEL}={installation}",
        MANAGED_BY.0, MANAGED_BY.1
    );
    if let Some(id) = id {
        selector.push_str(&format!(",{BUILD_LABEL}={id}"));
    }
    selector
}

/// What one attempt builds.
pub struct Attempt<'a> {
    /// The build.
    pub id: BuildId,
    /// Its attempt.
    pub attempt: u32,
    /// Where the Dockerfile comes from.
    pub source: &'a DockerfileSource,
    /// The image to build and push (the base ref).
    pub tag: &'a str,
    /// Registries spoken to over plain HTTP.
    pub insecure_registries: &'a [String],
    /// Whether steps may be taken from the layer cache repository.
    pub cache: LayerCacheUse,
}

/// The Job that runs an attempt's builder.
pub fn job(config: &KubernetesConfig, installation: &str, attempt: &Attempt<'_>) -> Job {
    let name = job_name(attempt.id, attempt.attempt);
    let labels = labels(installation, attempt.id, attempt.attempt);
    let source = attempt.source;
    let mode = match source.target_mode {
        CloneTargetMode::RemoteHead => "head",
        CloneTargetMode::RemoteCommit => "commit",
        CloneTargetMode::RemoteBranch | CloneTargetMode::LocalBranch => "branch",
    };
    let env = [
        ("IB_REMOTE", source.remote_uri.as_str()),
        ("IB_MODE", mode),
        ("IB_TARGET", source.clone_target.as_str()),
        ("IB_DOCKERFILE", source.dockerfile_path.as_str()),
        ("IB_CONTEXT", source.context_path.as_str()),
        ("IB_TAG", attempt.tag),
        ("IB_INSECURE", &attempt.insecure_registries.join(" ")),
        (
            "IB_CACHE",
            config.layer_cache_repository.as_deref().unwrap_or_default(),
        ),
        (
            "IB_FORCE",
            match attempt.cache {
                LayerCacheUse::ReadWrite => "",
                LayerCacheUse::WriteOnly => "1",
            },
        ),
    ]
    .into_iter()
    .map(|(name, value)| EnvVar {
        name: name.to_owned(),
        value: Some(value.to_owned()),
        value_from: None,
    })
    .collect();
    let container = Container {
        name: CONTAINER.to_owned(),
        image: Some(config.builder_image.clone()),
        image_pull_policy: Some("IfNotPresent".to_owned()),
        command: Some(vec!["/bin/sh".into(), "-c".into(), SCRIPT.into()]),
        env: Some(env),
        resources: config.resources.clone(),
        security_context: Some(builder_security()),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "secrets".into(),
                mount_path: SECRETS_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "storage".into(),
                mount_path: "/var/lib/containers".into(),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    };
    let pod = PodSpec {
        restart_policy: Some("Never".into()),
        // A builder has nothing to save when it is stopped: a cancel takes effect at once.
        termination_grace_period_seconds: Some(5),
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        service_account_name: config.service_account.clone(),
        // A user namespace of its own: root in the pod, and in every RUN step, is an
        // unprivileged id on the node.
        host_users: Some(false),
        security_context: Some(PodSecurityContext {
            seccomp_profile: Some(SeccompProfile {
                type_: "Localhost".into(),
                localhost_profile: Some(config.seccomp_profile.clone()),
            }),
            ..PodSecurityContext::default()
        }),
        node_selector: (!config.node_selector.is_empty()).then(|| config.node_selector.clone()),
        tolerations: (!config.tolerations.is_empty()).then(|| config.tolerations.clone()),
        containers: vec![container],
        volumes: Some(vec![
            Volume {
                name: "secrets".into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(secret_name(&name)),
                    default_mode: Some(0o400),
                    ..SecretVolumeSource::default()
                }),
                ..Volume::default()
            },
            Volume {
                name: "storage".into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Volume::default()
            },
        ]),
        ..PodSpec::default()
    };
    Job {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(config.namespace.clone()),
            labels: Some(labels.clone()),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            active_deadline_seconds: Some(
                i64::try_from(config.pod_timeout.as_secs()).unwrap_or(i64::MAX),
            ),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..JobSpec::default()
        }),
        status: None,
    }
}

/// Capabilities the builder keeps, each for one step of making the nested user namespace
/// buildah runs in (see [`SCRIPT`]); everything else is dropped:
/// - `SETUID`, `SETGID`: `newuidmap`/`newgidmap` write the namespace's id maps, and the
///   builder becomes root of it;
/// - `SETFCAP`: the kernel asks for it to map the pod's root into a namespace.
///
/// Inside that namespace buildah holds every capability, over the pod's ids only. RUN
/// steps run there in runc containers (pid, mount, ipc and uts namespaces of their own,
/// pivot_root into the image). `procMount: Unmasked` lets runc mount a fresh `/proc` for
/// them (the kernel refuses it under a masked one); Pod Security `baseline` allows it for
/// user-namespaced pods.
pub const BUILDER_CAPABILITIES: [&str; 3] = ["SETUID", "SETGID", "SETFCAP"];

fn builder_security() -> SecurityContext {
    SecurityContext {
        privileged: Some(false),
        allow_privilege_escalation: Some(false),
        proc_mount: Some("Unmasked".into()),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: Some(BUILDER_CAPABILITIES.map(str::to_owned).to_vec()),
        }),
        ..SecurityContext::default()
    }
}

/// The Secret of an attempt, owned by its Job (garbage collection removes both): the
/// builder's registry credentials file and, when the request had them, the git credentials
/// as a basic-auth token.
pub fn secret(job: &Job, auth_file: &serde_json::Value, git_basic: Option<String>) -> Secret {
    let name = job.metadata.name.clone().unwrap_or_default();
    let owner = OwnerReference {
        api_version: "batch/v1".into(),
        kind: "Job".into(),
        name: name.clone(),
        uid: job.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    };
    let mut data = BTreeMap::from([(
        "auth.json".to_owned(),
        ByteString(auth_file.to_string().into_bytes()),
    )]);
    if let Some(token) = git_basic {
        data.insert("git-basic".into(), ByteString(token.into_bytes()));
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(secret_name(&name)),
            namespace: job.metadata.namespace.clone(),
            labels: job.metadata.labels.clone(),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        data: Some(data),
        type_: Some("Opaque".into()),
        ..Secret::default()
    }
}

/// The builder: clones the context (credentials from the Secret, into git's environment
/// only), checks that the Dockerfile and context stay inside the checkout, builds with
/// buildah and pushes. With a layer cache repository, every step's result is pushed there and
/// looked up there first (`--layers --cache-to/--cache-from`), so a pod reuses what any other
/// pod built; a forced rebuild (`IB_FORCE`) only pushes there (`--cache-to`): its pod starts
/// with empty storage, so every step runs. Everything it needs comes from `IB_*` variables,
/// always quoted.
const SCRIPT: &str = r#"set -eu
secrets=/var/run/image-builder
export GIT_TERMINAL_PROMPT=0 GIT_ASKPASS=/bin/false LC_ALL=C
for host in $IB_INSECURE; do
  mkdir -p /etc/containers/registries.conf.d
  printf '[[registry]]\nlocation = "%s"\ninsecure = true\n' "$host" >> /etc/containers/registries.conf.d/image-builder.conf
done
if [ -s "$secrets/git-basic" ]; then
  GIT_CONFIG_COUNT=1 GIT_CONFIG_KEY_0=http.extraHeader
  GIT_CONFIG_VALUE_0="Authorization: Basic $(cat "$secrets/git-basic")"
  export GIT_CONFIG_COUNT GIT_CONFIG_KEY_0 GIT_CONFIG_VALUE_0
fi
echo "cloning $IB_REMOTE"
case "$IB_MODE" in
  head) git clone --quiet --depth 1 -- "$IB_REMOTE" /workspace ;;
  branch) git clone --quiet --depth 1 --branch "$IB_TARGET" -- "$IB_REMOTE" /workspace ;;
  commit) git init --quiet /workspace
          # That commit alone where the server serves commits by id, else the whole history.
          if git -C /workspace fetch --quiet --no-tags --depth 1 -- "$IB_REMOTE" "$IB_TARGET"; then
            git -C /workspace checkout --quiet --detach FETCH_HEAD
            rm -f /workspace/.git/FETCH_HEAD
          else
            echo "the server does not serve that commit alone; fetching the whole repository"
            git -C /workspace fetch --quiet --no-tags -- "$IB_REMOTE" "+refs/heads/*:refs/remotes/origin/*"
            git -C /workspace checkout --quiet --detach "$IB_TARGET"
          fi ;;
esac
unset GIT_CONFIG_VALUE_0
root=$(realpath /workspace)
inside() {
  real=$(realpath -e "/workspace/$2" 2>/dev/null) || { echo "the $1 $2 does not exist in the repository" >&2; exit 2; }
  case "$real/" in "$root"/*) echo "$real" ;; *) echo "the $1 $2 leaves the repository" >&2; exit 2 ;; esac
}
dockerfile=$(inside Dockerfile "${IB_DOCKERFILE:-Dockerfile}")
context=$(inside context "${IB_CONTEXT:-.}")
set -- --layers=false
if [ -n "$IB_CACHE" ] && [ -n "$IB_FORCE" ]; then
  set -- --layers --cache-to "$IB_CACHE"
  echo "building $IB_TAG with buildah; force_rebuild is set: every step runs again (the layer cache $IB_CACHE is written, not read)"
elif [ -n "$IB_CACHE" ]; then
  set -- --layers --cache-from "$IB_CACHE" --cache-to "$IB_CACHE"
  echo "building $IB_TAG with buildah; steps found in the layer cache $IB_CACHE are not run again"
else
  echo "building $IB_TAG with buildah"
fi
# buildah runs as root of a user namespace nested in the pod's (mapped before it starts: no
# privilege is gained across exec), where it holds the capabilities it needs over the pod's
# ids only. RUN steps are runc containers there, on the pod's network.
nested() {
  unshare --map-users=0,0,65536 --map-groups=0,0,65536 --setuid 0 --setgid 0 \
    --mount --propagation private -- "$@"
}
nested buildah bud --isolation oci --network host "$@" --format docker --authfile "$secrets/auth.json" -f "$dockerfile" -t "$IB_TAG" "$context"
echo "pushing $IB_TAG"
# Pushing the same content again is harmless; a registry answering "blob unknown" to a
# manifest while another builder pushes the same layer to the same repository is not final.
for attempt in 1 2 3 4; do
  nested buildah push --authfile "$secrets/auth.json" "$IB_TAG" "docker://$IB_TAG" && exit 0
  [ "$attempt" = 4 ] && exit 1
  echo "push attempt $attempt failed; trying again"
  sleep "$attempt"
done
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> KubernetesConfig {
        serde_json::from_str(
            r#"{"namespace": "builds", "builderImage": "r/builder:1", "podTimeout": "10m"}"#,
        )
        .unwrap()
    }

    fn source() -> DockerfileSource {
        DockerfileSource {
            remote_uri: "https://git.example/r.git".into(),
            target_mode: CloneTargetMode::RemoteBranch,
            clone_target: "main".into(),
            dockerfile_path: "sub/Dockerfile".into(),
            context_path: "sub".into(),
            dockerfile_version: String::new(),
            git_auth: true,
        }
    }

    #[test]
    fn a_job_is_named_and_labelled_by_build_and_attempt_and_takes_credentials_only_from_its_secret()
    {
        let id = BuildId::new();
        let source = source();
        let attempt = Attempt {
            id,
            attempt: 3,
            source: &source,
            tag: "reg.example/base:abc",
            insecure_registries: &[],
            cache: LayerCacheUse::ReadWrite,
        };
        let job = job(&config(), "inst", &attempt);
        let name = job.metadata.name.clone().unwrap();
        assert_eq!(name, job_name(id, 3));
        assert!(name.len() <= 52, "room for the pod's suffix: {name}");
        let labels = job.metadata.labels.clone().unwrap();
        assert_eq!(labels[BUILD_LABEL], id.to_string());
        assert_eq!(labels[ATTEMPT_LABEL], "3");
        let spec = job.spec.clone().unwrap();
        assert_eq!(
            (spec.backoff_limit, spec.active_deadline_seconds),
            (Some(0), Some(600))
        );
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.automount_service_account_token, Some(false));
        // Unprivileged, in a user namespace of its own, never on the node's network.
        assert_eq!((pod.host_users, pod.host_network), (Some(false), None));
        let seccomp = pod
            .security_context
            .clone()
            .unwrap()
            .seccomp_profile
            .unwrap();
        assert_eq!(
            (seccomp.type_.as_str(), seccomp.localhost_profile.as_deref()),
            ("Localhost", Some("image-builder/builder.json"))
        );
        let security = pod.containers[0].security_context.clone().unwrap();
        assert_eq!(
            (security.privileged, security.allow_privilege_escalation),
            (Some(false), Some(false))
        );
        let caps = security.capabilities.unwrap();
        assert_eq!(caps.drop.unwrap(), ["ALL"]);
        assert_eq!(caps.add.unwrap(), BUILDER_CAPABILITIES);
        // Credentials reach the builder as files of the Secret's volume, read-only, never as
        // variables (the pod spec and `kubectl describe` show those).
        let container = &pod.containers[0];
        let env = container.env.clone().unwrap();
        assert!(env.iter().all(|v| v.value_from.is_none()), "{env:?}");
        let mount = container.volume_mounts.clone().unwrap();
        assert!(
            mount
                .iter()
                .any(|m| m.name == "secrets" && m.read_only == Some(true))
        );
        let volumes = pod.volumes.clone().unwrap();
        let secret_volume = volumes.iter().find_map(|v| v.secret.clone()).unwrap();
        assert_eq!(secret_volume.default_mode, Some(0o400));

        let secret = secret(
            &job,
            &serde_json::json!({"auths": {"reg.example": {"auth": "c2VjcmV0"}}}),
            Some("Ym9iOnB3".into()),
        );
        assert_eq!(
            secret.metadata.name.as_deref(),
            Some(secret_name(&name).as_str())
        );
        let owner = &secret.metadata.owner_references.unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str()),
            ("Job", name.as_str())
        );
        let data = secret.data.unwrap();
        assert!(data.contains_key("auth.json") && data.contains_key("git-basic"));
    }

    #[test]
    fn a_forced_rebuild_asks_the_builder_to_take_nothing_from_the_layer_cache() {
        let source = source();
        let env_of = |cache| {
            let attempt = Attempt {
                id: BuildId::new(),
                attempt: 1,
                source: &source,
                tag: "reg.example/base:abc",
                insecure_registries: &[],
                cache,
            };
            let job = job(&config(), "inst", &attempt);
            let pod = job.spec.unwrap().template.spec.unwrap();
            pod.containers[0]
                .env
                .clone()
                .unwrap()
                .into_iter()
                .find(|v| v.name == "IB_FORCE")
                .and_then(|v| v.value)
        };
        assert_eq!(env_of(LayerCacheUse::WriteOnly).as_deref(), Some("1"));
        assert_eq!(env_of(LayerCacheUse::ReadWrite).as_deref(), Some(""));
        // The script reads the cache only when the build is not forced.
        let forced = SCRIPT
            .split("if [ -n \"$IB_CACHE\" ] && [ -n \"$IB_FORCE\" ]; then")
            .nth(1)
            .and_then(|rest| rest.split("elif").next())
            .unwrap();
        assert!(
            forced.contains("--cache-to") && !forced.contains("--cache-from"),
            "{forced}"
        );
    }

    #[test]
    fn the_selector_scopes_to_the_installation_and_build() {
        let id = BuildId::new();
        let all = selector("inst", None);
        assert_eq!(
            all,
            "app.kubernetes.io/managed-by=image-builder,image-builder.gitpod.io/installation=inst"
        );
        assert!(selector("inst", Some(id)).ends_with(&format!("build-id={id}")));
    }
}
