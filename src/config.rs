//! The service configuration: a JSON file with mk3's key names, validated at start. Unknown
//! keys and bad values stop the process with a message naming the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The JSON does not fit the schema; `key` is the path to the offending key.
    #[error("config key `{key}`: {message}")]
    Invalid {
        /// Dotted path of the key, or `.` for the whole document.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    /// Repository that Dockerfile builds push their base images to (required), e.g.
    /// `registry.example.com/base-images`.
    pub base_image_repository: String,
    /// Repository that workspace images are pushed to (required).
    pub workspace_image_repository: String,
    /// Registries (`host:port`) spoken to over plain HTTP. Default: none.
    #[serde(default)]
    pub insecure_registries: Vec<String>,
    /// Where the gRPC API listens. Default `127.0.0.1:8080`; port 0 picks a free port.
    #[serde(default = "default_grpc_address")]
    pub grpc_address: SocketAddr,
    /// Where Prometheus metrics are served at `/metrics`. Default `127.0.0.1:9500`.
    #[serde(default = "default_metrics_address")]
    pub metrics_address: SocketAddr,
    /// Directory of the build store, build work directories and buildah's storage. Default
    /// `./image-builder-data`.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// How long a build may run once admitted, e.g. `"90s"`, `"60m"`. Default `60m` (mk3's).
    #[serde(default = "default_build_timeout", with = "humantime_serde")]
    pub build_timeout: Duration,
    /// Whether Dockerfile builds may clone repositories on this machine (plain paths and
    /// `file://` URLs). Default `false`: otherwise any client could read the service's disk
    /// through a build context. Tests and the demo turn it on.
    #[serde(default)]
    pub allow_local_repositories: bool,
    /// Builds that run at once; the rest wait in the journal as queued, in order. Default 4.
    #[serde(default = "default_max_concurrent_builds")]
    pub max_concurrent_builds: usize,
    /// Bytes of log kept per build; past it a truncation marker is written and the build goes
    /// on. Default 16 MiB.
    #[serde(default = "default_max_log_bytes")]
    pub max_log_bytes: u64,
    /// Disk the local executor's layer cache (buildah's storage under the data dir: every
    /// step of every build, and the base images pulled) may hold; past it the oldest images
    /// are removed. Bytes, or a size such as `"20 GiB"`. Default 10 GiB.
    #[serde(default = "default_layer_cache_size")]
    pub layer_cache_size: bytesize::ByteSize,
    /// How a Dockerfile source's base image is named: `mk3` (default) hashes the request's
    /// fields as mk3 does, so registries filled by mk3 stay cache hits; `content` adds the
    /// Dockerfile's bytes and the context directory's files (git's hashes at the commit the
    /// target names), so a change to a COPY'd file is a new image.
    #[serde(default)]
    pub base_image_key: BaseImageKey,
    /// Time one step may spend retrying transient registry faults (5xx, 429, resets,
    /// timeouts) with exponential backoff. Default `60s`.
    #[serde(default = "default_registry_retry_budget", with = "humantime_serde")]
    pub registry_retry_budget: Duration,
    /// Requests sent to one registry host at once; calls waiting on an answer go before
    /// builds' work (see `registry/limits.rs`). Default 32.
    #[serde(default = "default_registry_requests_per_host")]
    pub registry_requests_per_host: usize,
    /// Longest wait for a registry's answer (connecting, each read); past it the request is a
    /// transient fault. Default `60s`.
    #[serde(default = "default_registry_timeout", with = "humantime_serde")]
    pub registry_timeout: Duration,
    /// The installation's registry credentials: a docker config file (`.dockerconfigjson`
    /// with `auths`), re-read when it changes. Default: none.
    #[serde(default)]
    pub pull_secret_file: Option<PathBuf>,
    /// Use ECR tokens (`GetAuthorizationToken`, AWS credentials from the environment) for
    /// hosts `<account>.dkr.ecr.<region>.amazonaws.com`. Default false (mk3's key).
    #[serde(default, rename = "enableAdditionalECRAuth")]
    pub enable_additional_ecr_auth: bool,
    /// Where ECR's API is, instead of AWS (a test server such as moto). Default: AWS.
    #[serde(default)]
    pub ecr_endpoint: Option<String>,
    /// Finished builds older than this are removed with their logs. Default `7d`.
    #[serde(default = "default_retention", with = "humantime_serde")]
    pub retention: Duration,
    /// Where builds run: `{"kind": "local"}` (buildah on this machine, the default) or
    /// `{"kind": "kubernetes", ...}` (a Job per build attempt).
    #[serde(default)]
    pub executor: ExecutorConfig,
    /// TLS on the gRPC port: `{"certFile", "keyFile", "clientCAFile"}`; with `clientCAFile`
    /// clients must present a certificate it signed (mTLS). Files are re-read when they
    /// change. Default: none (plain HTTP/2, loopback only unless `allowInsecure`).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Let a `grpcAddress` other than loopback serve without TLS. Default `false`.
    #[serde(default)]
    pub allow_insecure: bool,
    /// Who may cancel and retry builds (ops API): client certificate names (the subject's
    /// common name or any subject alternative name), or `*` for any client the transport
    /// admits. Default: nobody but the holder of `operatorTokenFile`.
    #[serde(default)]
    pub operators: Vec<String>,
    /// Who may read builds, journals and logs through the ops API, as `operators`. Default:
    /// the same as `operators`.
    #[serde(default)]
    pub viewers: Option<Vec<String>>,
    /// A file holding the operator token (at least 16 printable characters): a client that
    /// sends `authorization: Bearer <token>` is an operator. Re-read when it changes.
    #[serde(default)]
    pub operator_token_file: Option<PathBuf>,
    /// OpenTelemetry traces, exported over OTLP/HTTP: `{"otlpEndpoint", "sampleRatio"}`.
    /// Default: off.
    #[serde(default)]
    pub tracing: Option<TracingConfig>,
}

/// TLS on the gRPC port.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TlsConfig {
    /// PEM certificate chain of the service, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key of `certFile`.
    pub key_file: PathBuf,
    /// PEM CA certificates that sign client certificates; when given, every client must
    /// present one (mTLS).
    #[serde(default, rename = "clientCAFile")]
    pub client_ca_file: Option<PathBuf>,
}

/// Where traces go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TracingConfig {
    /// The OTLP/HTTP (protobuf) collector, e.g. `http://127.0.0.1:4318`; `/v1/traces` is
    /// added to a URL without a path.
    pub otlp_endpoint: String,
    /// The share of build attempts traced, 0.0 to 1.0; a Build request whose `traceparent`
    /// is sampled is always traced. Default 1.0.
    #[serde(default = "default_sample_ratio")]
    pub sample_ratio: f64,
}

fn default_sample_ratio() -> f64 {
    1.0
}

/// How Dockerfile sources' base images are named.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BaseImageKey {
    /// mk3's hash of the request's fields.
    #[default]
    Mk3,
    /// mk3's fields and the source's content.
    Content,
}

/// Where builds run.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum ExecutorConfig {
    /// buildah on the service's own machine.
    #[default]
    Local,
    /// One Kubernetes Job per build attempt, in the cluster of the in-cluster config or
    /// `KUBECONFIG`.
    Kubernetes(Box<KubernetesConfig>),
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
    #[serde(default = "default_build_timeout", with = "humantime_serde")]
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

fn default_orphan_grace() -> Duration {
    Duration::from_secs(10 * 60)
}

fn default_retention() -> Duration {
    Duration::from_secs(7 * 24 * 60 * 60)
}

fn default_registry_retry_budget() -> Duration {
    Duration::from_secs(60)
}

fn default_registry_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_build_timeout() -> Duration {
    Duration::from_secs(60 * 60)
}

fn default_registry_requests_per_host() -> usize {
    DEFAULT_REGISTRY_REQUESTS_PER_HOST
}

/// Requests to one registry host at once unless `registryRequestsPerHost` says otherwise.
pub const DEFAULT_REGISTRY_REQUESTS_PER_HOST: usize = 32;

fn default_max_concurrent_builds() -> usize {
    4
}

fn default_max_log_bytes() -> u64 {
    16 << 20
}

fn default_layer_cache_size() -> bytesize::ByteSize {
    bytesize::ByteSize::gib(10)
}

fn default_grpc_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn default_metrics_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9500))
}

fn default_seccomp_profile() -> String {
    "image-builder/builder.json".to_owned()
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("image-builder-data")
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and validates a config document.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            // serde names an unknown or missing key in its message; the path is its parent.
            Error::Invalid {
                key,
                message: strip_position(&inner.to_string()),
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), Error> {
        validate_repository("baseImageRepository", &self.base_image_repository)?;
        validate_repository("workspaceImageRepository", &self.workspace_image_repository)?;
        for (i, host) in self.insecure_registries.iter().enumerate() {
            validate_host(&format!("insecureRegistries[{i}]"), host)?;
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("dataDir", "must name a directory"));
        }
        if self.build_timeout.is_zero() {
            return Err(invalid(
                "buildTimeout",
                "must be longer than zero, e.g. \"60m\"",
            ));
        }
        if self.registry_requests_per_host == 0 {
            return Err(invalid("registryRequestsPerHost", "must be at least 1"));
        }
        if self.layer_cache_size.as_u64() == 0 {
            return Err(invalid(
                "layerCacheSize",
                "must be more than zero, e.g. \"10 GiB\"",
            ));
        }
        if let ExecutorConfig::Kubernetes(k8s) = &self.executor
            && let Some(cache) = &k8s.layer_cache_repository
        {
            validate_repository("executor.layerCacheRepository", cache)?;
        }
        if self.max_concurrent_builds == 0 {
            return Err(invalid("maxConcurrentBuilds", "must be at least 1"));
        }
        if self.retention.is_zero() {
            return Err(invalid(
                "retention",
                "must be longer than zero, e.g. \"7d\"",
            ));
        }
        if self.registry_timeout.is_zero() {
            return Err(invalid(
                "registryTimeout",
                "must be longer than zero, e.g. \"60s\"",
            ));
        }
        if self.max_log_bytes < 1024 {
            return Err(invalid("maxLogBytes", "must be at least 1024"));
        }
        if !self.grpc_address.ip().is_loopback() && self.tls.is_none() && !self.allow_insecure {
            return Err(invalid(
                "grpcAddress",
                format!(
                    "{} is reachable from other machines but `tls` is not set: set `tls` \
                     (certFile, keyFile, clientCAFile), or `allowInsecure: true` to serve \
                     plain text anyway",
                    self.grpc_address
                ),
            ));
        }
        for (key, list) in [
            ("operators", Some(&self.operators)),
            ("viewers", self.viewers.as_ref()),
        ] {
            for (i, entry) in list.into_iter().flatten().enumerate() {
                if entry.trim().is_empty()
                    || entry.len() > 256
                    || entry.chars().any(char::is_control)
                {
                    return Err(invalid(
                        &format!("{key}[{i}]"),
                        "must be a certificate name (1 to 256 printable characters) or \"*\"",
                    ));
                }
            }
        }
        if let Some(t) = &self.tracing {
            if !(0.0..=1.0).contains(&t.sample_ratio) {
                return Err(invalid(
                    "tracing.sampleRatio",
                    "must be between 0.0 and 1.0",
                ));
            }
            if !(t.otlp_endpoint.starts_with("http://") || t.otlp_endpoint.starts_with("https://"))
            {
                return Err(invalid(
                    "tracing.otlpEndpoint",
                    format!(
                        "{:?} is not a URL, e.g. \"http://127.0.0.1:4318\"",
                        t.otlp_endpoint
                    ),
                ));
            }
        }
        if let ExecutorConfig::Kubernetes(k) = &self.executor {
            if !is_dns_label(&k.namespace) {
                return Err(invalid(
                    "executor.namespace",
                    format!(
                        "{:?} is not a namespace name (lower-case letters, digits and '-', at most 63)",
                        k.namespace
                    ),
                ));
            }
            if k.builder_image.parse::<oci_client::Reference>().is_err() {
                return Err(invalid(
                    "executor.builderImage",
                    format!("{:?} is not an image reference", k.builder_image),
                ));
            }
            if k.host_network {
                return Err(invalid(
                    "executor.hostNetwork",
                    "builder pods run in user namespaces (hostUsers: false), which Kubernetes does not allow on the node's network: serve registries and git where pods reach them and remove the key",
                ));
            }
            if k.seccomp_profile.is_empty()
                || k.seccomp_profile.starts_with('/')
                || k.seccomp_profile.split('/').any(|part| part == "..")
            {
                return Err(invalid(
                    "executor.seccompProfile",
                    "must be a path relative to the kubelet's seccomp directory, e.g. \"image-builder/builder.json\"",
                ));
            }
            if k.pod_timeout.as_secs() == 0 {
                return Err(invalid(
                    "executor.podTimeout",
                    "must be at least one second, e.g. \"60m\"",
                ));
            }
        }
        Ok(())
    }
}

fn invalid(key: &str, message: impl Into<String>) -> Error {
    Error::Invalid {
        key: key.to_owned(),
        message: message.into(),
    }
}

/// A repository is a reference without tag or digest: `host[:port]/path`.
fn validate_repository(key: &str, value: &str) -> Result<(), Error> {
    let parsed: oci_client::Reference = value
        .parse()
        .map_err(|e| invalid(key, format!("{value:?} is not an image repository: {e}")))?;
    let tagged = value
        .rsplit('/')
        .next()
        .is_some_and(|last| last.contains(':'));
    if tagged || parsed.digest().is_some() {
        return Err(invalid(
            key,
            format!(
                "{value:?} must be a repository without tag or digest, e.g. registry.example.com/workspace-images"
            ),
        ));
    }
    Ok(())
}

fn validate_host(key: &str, value: &str) -> Result<(), Error> {
    let (host, port) = match value.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (value, None),
    };
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok());
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '[' | ']' | ':'));
    if !host_ok || !port_ok || value.contains('/') {
        return Err(invalid(
            key,
            format!("{value:?} is not host:port (e.g. 127.0.0.1:5000)"),
        ));
    }
    Ok(())
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

/// serde_json appends " at line L column C"; the key path says more to a person.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"{"baseImageRepository": "127.0.0.1:5000/base", "workspaceImageRepository": "127.0.0.1:5000/ws"}"#;

    #[test]
    fn defaults_fill_what_is_not_given() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.grpc_address.to_string(), "127.0.0.1:8080");
        assert_eq!(c.metrics_address.to_string(), "127.0.0.1:9500");
        assert!(c.insecure_registries.is_empty());
        assert_eq!(c.build_timeout, Duration::from_secs(3600));
        let c = Config::parse(&MINIMAL.replace('}', r#", "buildTimeout": "90s"}"#)).unwrap();
        assert_eq!(c.build_timeout, Duration::from_secs(90));
    }

    #[test]
    fn unknown_key_is_named() {
        let text = MINIMAL.replace('}', r#", "grpcAdress": "127.0.0.1:1"}"#);
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("grpcAdress"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            (r#""grpcAddress": "localhost""#, "grpcAddress"),
            (
                r#""insecureRegistries": ["http://x/"]"#,
                "insecureRegistries[0]",
            ),
            (r#""metricsAddress": 5"#, "metricsAddress"),
            (r#""buildTimeout": "soon""#, "buildTimeout"),
            (r#""maxConcurrentBuilds": 0"#, "maxConcurrentBuilds"),
            (r#""registryRequestsPerHost": 0"#, "registryRequestsPerHost"),
            (r#""maxLogBytes": -1"#, "maxLogBytes"),
        ];
        for (pair, key) in cases {
            let text = MINIMAL.replace('}', &format!(", {pair}}}"));
            let err = Config::parse(&text).unwrap_err().to_string();
            assert!(err.contains(key), "{pair}: {err}");
        }
        let tagged =
            r#"{"baseImageRepository": "r/base:latest", "workspaceImageRepository": "r/ws"}"#;
        let err = Config::parse(tagged).unwrap_err().to_string();
        assert!(err.contains("baseImageRepository"), "{err}");
    }

    #[test]
    fn the_kubernetes_executor_is_chosen_and_checked_by_key() {
        let c = Config::parse(MINIMAL).unwrap();
        assert!(matches!(c.executor, ExecutorConfig::Local));
        let with = |executor: &str| MINIMAL.replace('}', &format!(r#", "executor": {executor}}}"#));
        let c = Config::parse(&with(
            r#"{"kind": "kubernetes", "namespace": "builds", "builderImage": "r/builder:1",
                "resources": {"limits": {"memory": "2Gi"}}, "tolerations": [{"key": "k", "operator": "Exists"}],
                "podTimeout": "20m"}"#,
        ))
        .unwrap();
        let ExecutorConfig::Kubernetes(k) = c.executor else {
            panic!("not kubernetes")
        };
        assert_eq!(
            (k.namespace.as_str(), k.pod_timeout),
            ("builds", Duration::from_secs(1200))
        );
        assert!(k.resources.is_some() && k.tolerations.len() == 1);
        assert_eq!(k.seccomp_profile, "image-builder/builder.json");
        for (executor, key) in [
            (
                r#"{"kind": "kubernetes", "namespace": "Bad_NS", "builderImage": "r/b:1"}"#,
                "executor.namespace",
            ),
            (
                r#"{"kind": "kubernetes", "namespace": "ns"}"#,
                "builderImage",
            ),
            (
                r#"{"kind": "kubernetes", "namespace": "ns", "builderImage": "r/b:1", "podTimout": "1m"}"#,
                "podTimout",
            ),
            (r#"{"kind": "docker"}"#, "docker"),
            (
                r#"{"kind": "kubernetes", "namespace": "ns", "builderImage": "r/b:1", "hostNetwork": true}"#,
                "user namespaces",
            ),
            (
                r#"{"kind": "kubernetes", "namespace": "ns", "builderImage": "r/b:1", "seccompProfile": "../x.json"}"#,
                "executor.seccompProfile",
            ),
        ] {
            let err = Config::parse(&with(executor)).unwrap_err().to_string();
            assert!(err.contains(key), "{executor}: {err}");
        }
    }

    #[test]
    fn a_network_address_without_tls_needs_allow_insecure() {
        let open = MINIMAL.replace('}', r#", "grpcAddress": "0.0.0.0:8080"}"#);
        let err = Config::parse(&open).unwrap_err().to_string();
        assert!(
            err.contains("grpcAddress") && err.contains("allowInsecure"),
            "{err}"
        );
        Config::parse(&open.replace('}', r#", "allowInsecure": true}"#)).unwrap();
        let tls = open.replace(
            '}',
            r#", "tls": {"certFile": "c.pem", "keyFile": "k.pem", "clientCAFile": "ca.pem"}}"#,
        );
        let c = Config::parse(&tls).unwrap();
        assert!(c.tls.unwrap().client_ca_file.is_some());
        let bad = MINIMAL.replace('}', r#", "tls": {"certFile": "c.pem"}}"#);
        let err = Config::parse(&bad).unwrap_err().to_string();
        assert!(err.contains("keyFile"), "{err}");
    }

    #[test]
    fn identities_and_tracing_are_checked() {
        let c = Config::parse(&MINIMAL.replace('}', r#", "operators": ["alice"]}"#)).unwrap();
        assert_eq!(c.operators, ["alice"]);
        assert!(c.viewers.is_none());
        for (pair, key) in [
            (r#""operators": ["ok", ""]"#, "operators[1]"),
            (r#""viewers": ["a\u0007"]"#, "viewers[0]"),
            (
                r#""tracing": {"otlpEndpoint": "http://x:4318", "sampleRatio": 2}"#,
                "tracing.sampleRatio",
            ),
            (
                r#""tracing": {"otlpEndpoint": "x:4318"}"#,
                "tracing.otlpEndpoint",
            ),
        ] {
            let text = MINIMAL.replace('}', &format!(", {pair}}}"));
            let err = Config::parse(&text).unwrap_err().to_string();
            assert!(err.contains(key), "{pair}: {err}");
        }
    }

    #[test]
    fn missing_required_key_is_named() {
        let err = Config::parse(r#"{"baseImageRepository": "r/base"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("workspaceImageRepository"), "{err}");
    }
}
