//! `executor`: where builds run, with each executor's own settings: `{"kind": "local", ...}`
//! (buildah on this machine) or `{"kind": "kubernetes", ...}` (a Job per build attempt).

use std::time::Duration;

use serde::Deserialize;

use super::builds::DEFAULT_BUILD_TIMEOUT;
use super::{Error, invalid, validate_repository};

/// Where builds run.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum ExecutorConfig {
    /// buildah on the service's own machine.
    Local(LocalConfig),
    /// One Kubernetes Job per build attempt, in the cluster of the in-cluster config or
    /// `KUBECONFIG`.
    Kubernetes(Box<KubernetesConfig>),
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        Self::Local(LocalConfig::default())
    }
}

/// The local executor's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct LocalConfig {
    /// Disk the layer cache (buildah's storage under the data dir: every step of every build,
    /// and the base images pulled) may hold; past it the oldest images are removed. Bytes, or
    /// a size such as `"20 GiB"`. Default 10 GiB.
    pub layer_cache_size: bytesize::ByteSize,
}

impl Default for LocalConfig {
    fn default() -> Self {
        Self {
            layer_cache_size: bytesize::ByteSize::gib(10),
        }
    }
}

/// The Kubernetes executor's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KubernetesConfig {
    /// The namespace builder Jobs and their Secrets are made in (required).
    pub namespace: String,
    /// The image builder pods run: buildah and git (required).
    pub builder_image: String,
    /// The service account of builder pods. Default: the namespace's default. Builder pods
    /// never mount its token.
    #[serde(default)]
    pub service_account: Option<String>,
    /// Requests and limits of the builder container. Default: none.
    #[serde(default)]
    pub resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,
    /// Labels a node must carry to run builder pods. Default: any node.
    #[serde(default)]
    pub node_selector: std::collections::BTreeMap<String, String>,
    /// Taints builder pods tolerate. Default: none.
    #[serde(default)]
    pub tolerations: Vec<k8s_openapi::api::core::v1::Toleration>,
    /// How long a builder pod may run before Kubernetes stops it (the Job's
    /// `activeDeadlineSeconds`). Default `60m`.
    #[serde(default = "default_pod_timeout", with = "humantime_serde")]
    pub pod_timeout: Duration,
    /// Kept so that a config naming it gets a precise answer: builder pods run in user
    /// namespaces, which Kubernetes refuses on the node's network, so only `false` is valid.
    #[serde(default)]
    pub host_network: bool,
    /// The seccomp profile of builder pods, a `Localhost` profile under the kubelet's
    /// `seccomp` directory on every node (`deploy/seccomp/builder.json`: the runtime's
    /// default plus the namespace calls buildah's nested user namespace needs). Default
    /// `image-builder/builder.json`.
    #[serde(default = "default_seccomp_profile")]
    pub seccomp_profile: String,
    /// A builder Job carrying this installation's labels that no build in the journal
    /// knows is deleted once it is this old. Default `10m`.
    #[serde(default = "default_orphan_grace", with = "humantime_serde")]
    pub orphan_grace: Duration,
    /// A repository builder pods share their layer cache through (`buildah bud --layers
    /// --cache-from/--cache-to`), e.g. `registry.example.com/image-builder-cache`, so any
    /// pod reuses the steps any other built. On a host the builders can push to (the base
    /// image repository's). Default: none, every pod builds every step.
    #[serde(default)]
    pub layer_cache_repository: Option<String>,
}

fn default_pod_timeout() -> Duration {
    DEFAULT_BUILD_TIMEOUT
}

fn default_orphan_grace() -> Duration {
    Duration::from_secs(10 * 60)
}

fn default_seccomp_profile() -> String {
    "image-builder/builder.json".to_owned()
}

impl ExecutorConfig {
    pub(super) fn validate(&self) -> Result<(), Error> {
        match self {
            Self::Local(local) => local.validate(),
            Self::Kubernetes(k8s) => k8s.validate(),
        }
    }
}

impl LocalConfig {
    fn validate(&self) -> Result<(), Error> {
        if self.layer_cache_size.as_u64() == 0 {
            return Err(invalid(
                "executor.layerCacheSize",
                "must be more than zero, e.g. \"10 GiB\"",
            ));
        }
        Ok(())
    }
}

impl KubernetesConfig {
    fn validate(&self) -> Result<(), Error> {
        if !is_dns_label(&self.namespace) {
            return Err(invalid(
                "executor.namespace",
                format!(
                    "{:?} is not a namespace name (lower-case letters, digits and '-', at most 63)",
                    self.namespace
                ),
            ));
        }
        if self.builder_image.parse::<oci_client::Reference>().is_err() {
            return Err(invalid(
                "executor.builderImage",
                format!("{:?} is not an image reference", self.builder_image),
            ));
        }
        if self.host_network {
            return Err(invalid(
                "executor.hostNetwork",
                "builder pods run in user namespaces (hostUsers: false), which Kubernetes does not allow on the node's network: serve registries and git where pods reach them and remove the key",
            ));
        }
        let profile = &self.seccomp_profile;
        if profile.is_empty() || profile.starts_with('/') || profile.split('/').any(|p| p == "..") {
            return Err(invalid(
                "executor.seccompProfile",
                "must be a path relative to the kubelet's seccomp directory, e.g. \"image-builder/builder.json\"",
            ));
        }
        if self.pod_timeout.as_secs() == 0 {
            return Err(invalid(
                "executor.podTimeout",
                "must be at least one second, e.g. \"60m\"",
            ));
        }
        if let Some(cache) = &self.layer_cache_repository {
            validate_repository("executor.layerCacheRepository", cache)?;
        }
        Ok(())
    }
}

/// A Kubernetes DNS label (RFC 1123), as namespace names are.
fn is_dns_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}
