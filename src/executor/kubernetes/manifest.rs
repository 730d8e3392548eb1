//! What the Kubernetes executor asks the cluster for: one Job per build attempt, named and
//! labelled after the build and attempt so that it is found again after any restart, and a
//! Secret with the attempt's credentials, owned by the Job. Credentials live in the Secret's
//! data only: never in the pod spec, its environment or its arguments.
//!
//! The Dockerfile is hostile. The pod runs in a user namespace of its own, unprivileged, and
//! splits the attempt into three steps; the one that runs the Dockerfile holds no credential:
//! - init container `clone`: the git credentials; clones the context;
//! - `builder`: no credential at all; builds, RUN steps included;
//! - `registry`, beside it: the registry credentials (pulls, the layer cache, the push);
//!   first pulls the images the Dockerfile names and the steps the layer cache holds, then
//!   waits for the build, writes the cache and pushes the image; it runs nothing of the
//!   Dockerfile (its `buildah bud` has `/bin/false` for a runtime).
//!
//! The steps hand over through emptyDir volumes that RUN never sees (it runs in the image's
//! root, pivot_root'ed), and the builder's log carries the other steps' output, so the
//! build's log is one stream.

use std::collections::BTreeMap;

use image_builder_state::{BuildId, CloneTargetMode, DockerfileSource};
use k8s_openapi::ByteString;
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, KeyToPath, PodSecurityContext, PodSpec,
    PodTemplateSpec, SeccompProfile, Secret, SecretVolumeSource, SecurityContext, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use super::scripts::{BUILD_SCRIPT, CLONE_SCRIPT, REGISTRY_SCRIPT, buildah_step_prelude};
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
/// The builder's container: it runs the Dockerfile, with no credential, and its log is the
/// build's (the other steps' output is replayed into it).
pub const CONTAINER: &str = "builder";
/// The init container that clones the build context, with the git credentials alone.
pub const CLONE_CONTAINER: &str = "clone";
/// The container that speaks to registries, with their credentials alone: pulls what the
/// build needs before it, writes the layer cache and pushes the image after it.
pub const REGISTRY_CONTAINER: &str = "registry";
/// Where each container finds its own credentials file.
const SECRETS_DIR: &str = "/var/run/image-builder";
/// The Secret's keys: the git credentials (clone) and the registry credentials (registry).
const GIT_KEY: &str = "git-basic";
const REGISTRY_AUTH_KEY: &str = "registry-auth.json";
/// The name a registry credentials file has in the container that gets it.
const AUTH_FILE: &str = "auth.json";
/// The pod's volumes: one per credentials file, the checkout, buildah's storage (shared by
/// the builder and registry steps), and the hand-off between steps (output and status).
const GIT_SECRET: &str = "git-secret";
const REGISTRY_SECRET: &str = "registry-secret";
const WORKSPACE: &str = "workspace";
const STORAGE: &str = "storage";
const HANDOFF: &str = "handoff";
const STORAGE_DIR: &str = "/var/lib/containers";
const HANDOFF_DIR: &str = "/handoff";

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

/// The Job that runs an attempt's builder: a pod of three containers, each with only the
/// credentials of its own step (see the module's doc).
pub fn job(config: &KubernetesConfig, installation: &str, attempt: &Attempt<'_>) -> Job {
    let name = job_name(attempt.id, attempt.attempt);
    let labels = labels(installation, attempt.id, attempt.attempt);
    let source = attempt.source;
    let mode = match source.target_mode {
        CloneTargetMode::RemoteHead => "head",
        CloneTargetMode::RemoteCommit => "commit",
        CloneTargetMode::RemoteBranch | CloneTargetMode::LocalBranch => "branch",
    };
    let insecure = attempt.insecure_registries.join(" ");
    let cache = config.layer_cache_repository.as_deref().unwrap_or_default();
    let force = match attempt.cache {
        LayerCacheUse::ReadWrite => "",
        LayerCacheUse::WriteOnly => "1",
    };
    // The builder and the registry step read the same variables.
    let env = [
        ("IB_DOCKERFILE", source.dockerfile_path.as_str()),
        ("IB_CONTEXT", source.context_path.as_str()),
        ("IB_INSECURE", insecure.as_str()),
        ("IB_CACHE", cache),
        ("IB_FORCE", force),
        ("IB_TAG", attempt.tag),
    ];
    let clone = step(
        config,
        CLONE_CONTAINER,
        CLONE_SCRIPT,
        &[
            ("IB_REMOTE", source.remote_uri.as_str()),
            ("IB_MODE", mode),
            ("IB_TARGET", source.clone_target.as_str()),
        ],
        &[
            (GIT_SECRET, SECRETS_DIR),
            (WORKSPACE, "/workspace"),
            (HANDOFF, HANDOFF_DIR),
        ],
        clone_security(),
    );
    let buildah_step = |name: &str, script: &str, secret: Option<&str>| {
        let mut mounts = vec![
            (WORKSPACE, "/workspace"),
            (STORAGE, STORAGE_DIR),
            (HANDOFF, HANDOFF_DIR),
        ];
        mounts.extend(secret.map(|volume| (volume, SECRETS_DIR)));
        let mut container = step(
            config,
            name,
            &format!("{}{script}", buildah_step_prelude()),
            &env,
            &mounts,
            builder_security(),
        );
        // The checkout is the clone's: every later step only reads it.
        for mount in container.volume_mounts.iter_mut().flatten() {
            if mount.name == WORKSPACE {
                mount.read_only = Some(true);
            }
        }
        container
    };
    let builder = buildah_step(CONTAINER, BUILD_SCRIPT, None);
    let registry = buildah_step(REGISTRY_CONTAINER, REGISTRY_SCRIPT, Some(REGISTRY_SECRET));
    let secret_volume = |volume: &str, key: &str, path: &str| Volume {
        name: volume.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret_name(&name)),
            default_mode: Some(0o400),
            items: Some(vec![KeyToPath {
                key: key.into(),
                path: path.into(),
                mode: None,
            }]),
            // A build without git credentials has no `git-basic`.
            optional: Some(key == GIT_KEY),
        }),
        ..Volume::default()
    };
    let empty_dir = |volume: &str| Volume {
        name: volume.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
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
        init_containers: Some(vec![clone]),
        containers: vec![builder, registry],
        volumes: Some(vec![
            secret_volume(GIT_SECRET, GIT_KEY, GIT_KEY),
            secret_volume(REGISTRY_SECRET, REGISTRY_AUTH_KEY, AUTH_FILE),
            empty_dir(WORKSPACE),
            empty_dir(STORAGE),
            empty_dir(HANDOFF),
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

/// One container of the builder pod: the builder image running `script` with `env`, the
/// volumes `mounts` (name, path) and `security`.
fn step(
    config: &KubernetesConfig,
    name: &str,
    script: &str,
    env: &[(&str, &str)],
    mounts: &[(&str, &str)],
    security: SecurityContext,
) -> Container {
    Container {
        name: name.to_owned(),
        image: Some(config.builder_image.clone()),
        image_pull_policy: Some("IfNotPresent".to_owned()),
        command: Some(vec!["/bin/sh".into(), "-c".into(), script.into()]),
        env: Some(
            env.iter()
                .map(|(name, value)| EnvVar {
                    name: (*name).to_owned(),
                    value: Some((*value).to_owned()),
                    value_from: None,
                })
                .collect(),
        ),
        resources: config.resources.clone(),
        security_context: Some(security),
        volume_mounts: Some(
            mounts
                .iter()
                .map(|(volume, path)| VolumeMount {
                    name: (*volume).to_owned(),
                    mount_path: (*path).to_owned(),
                    read_only: Some(volume.ends_with("-secret")),
                    ..VolumeMount::default()
                })
                .collect(),
        ),
        ..Container::default()
    }
}

/// The clone step needs no capability at all, and no more than the runtime's default
/// seccomp profile: it runs git.
fn clone_security() -> SecurityContext {
    SecurityContext {
        privileged: Some(false),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..SecurityContext::default()
    }
}

/// Capabilities the builder keeps, each for one step of making the nested user namespace
/// buildah runs in (see `BUILD_SCRIPT`); the push step holds the same; everything else is
/// dropped:
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

/// The Secret of an attempt, owned by its Job (garbage collection removes both): the registry
/// step's credentials file and, when the request had them, the git credentials as a
/// basic-auth token. Each container mounts its own key only; the builder none.
pub fn secret(job: &Job, registry_auth: &serde_json::Value, git_basic: Option<String>) -> Secret {
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
        REGISTRY_AUTH_KEY.to_owned(),
        ByteString(registry_auth.to_string().into_bytes()),
    )]);
    if let Some(token) = git_basic {
        data.insert(GIT_KEY.into(), ByteString(token.into_bytes()));
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
        // Credentials reach each step as a file of the Secret, read-only, never as variables
        // (the pod spec and `kubectl describe` show those); each step mounts its own key only.
        let volumes = pod.volumes.clone().unwrap();
        let keys_of = |container: &Container| -> Vec<String> {
            let env = container.env.clone().unwrap();
            assert!(env.iter().all(|v| v.value_from.is_none()), "{env:?}");
            container
                .volume_mounts
                .clone()
                .unwrap()
                .iter()
                .filter_map(|m| {
                    let volume = volumes.iter().find(|v| v.name == m.name).unwrap();
                    let secret = volume.secret.clone()?;
                    assert_eq!(m.read_only, Some(true));
                    assert_eq!(secret.default_mode, Some(0o400));
                    Some(secret.items.unwrap()[0].key.clone())
                })
                .collect()
        };
        let init = pod.init_containers.clone().unwrap();
        assert_eq!(init.len(), 1);
        assert_eq!(init[0].name, CLONE_CONTAINER);
        assert_eq!(keys_of(&init[0]), ["git-basic"]);
        // The step that runs the Dockerfile holds no credential, and no file of the Secret.
        assert_eq!(pod.containers[0].name, CONTAINER);
        assert!(keys_of(&pod.containers[0]).is_empty());
        assert!(
            pod.containers[0]
                .volume_mounts
                .iter()
                .flatten()
                .all(|m| m.mount_path != SECRETS_DIR)
        );
        assert_eq!(pod.containers[1].name, REGISTRY_CONTAINER);
        assert_eq!(keys_of(&pod.containers[1]), ["registry-auth.json"]);
        // Only the clone writes the checkout.
        for container in &pod.containers {
            let workspace = container
                .volume_mounts
                .iter()
                .flatten()
                .find(|m| m.name == WORKSPACE)
                .unwrap();
            assert_eq!(workspace.read_only, Some(true), "{}", container.name);
        }
        // The clone runs git with no capability at all.
        let clone = init[0].security_context.clone().unwrap();
        assert_eq!(clone.capabilities.unwrap().add, None);

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
        assert_eq!(
            data.keys().collect::<Vec<_>>(),
            ["git-basic", "registry-auth.json"]
        );
    }

    #[test]
    fn a_forced_rebuild_takes_nothing_from_the_layer_cache_and_the_credentialed_step_runs_nothing()
    {
        let source = source();
        let pod_of = |cache| {
            let attempt = Attempt {
                id: BuildId::new(),
                attempt: 1,
                source: &source,
                tag: "reg.example/base:abc",
                insecure_registries: &[],
                cache,
            };
            job(&config(), "inst", &attempt)
                .spec
                .unwrap()
                .template
                .spec
                .unwrap()
        };
        let force_of = |container: &Container| {
            container
                .env
                .clone()
                .unwrap()
                .into_iter()
                .find(|v| v.name == "IB_FORCE")
                .and_then(|v| v.value)
        };
        let forced = pod_of(LayerCacheUse::WriteOnly);
        let unforced = pod_of(LayerCacheUse::ReadWrite);
        let registry = |pod: &PodSpec| pod.containers[1].clone();
        assert_eq!(force_of(&registry(&forced)).as_deref(), Some("1"));
        assert_eq!(force_of(&registry(&unforced)).as_deref(), Some(""));
        // The cache is read before the build, and not when it is forced, and written after
        // it, by the registry step alone; the builder never names it to buildah.
        let (before, after) = REGISTRY_SCRIPT.split_once("/handoff/fetch.status").unwrap();
        let reads = before
            .split("if [ -n \"$IB_CACHE\" ] && [ -z \"$IB_FORCE\" ]; then")
            .nth(1)
            .unwrap();
        assert!(reads.contains("--cache-from"), "{REGISTRY_SCRIPT}");
        assert!(after.contains("--cache-to"), "{REGISTRY_SCRIPT}");
        assert!(!BUILD_SCRIPT.contains("--cache-"), "{BUILD_SCRIPT}");
        // Every buildah bud of the step with credentials runs nothing of the Dockerfile.
        let buds = REGISTRY_SCRIPT
            .split("buildah bud")
            .skip(1)
            .collect::<Vec<_>>();
        assert_eq!(buds.len(), 2);
        for bud in buds {
            assert!(bud.starts_with(" $RUN_NOTHING "), "{bud}");
        }
        assert!(
            buildah_step_prelude().contains("RUN_NOTHING=\"--isolation oci --runtime /bin/false")
        );
        assert!(!BUILD_SCRIPT.contains("auth"), "{BUILD_SCRIPT}");
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
