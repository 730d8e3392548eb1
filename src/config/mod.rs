//! The service configuration: a JSON file, validated at start. mk3's keys
//! (`baseImageRepository`, `workspaceImageRepository`, `pullSecretFile`,
//! `enableAdditionalECRAuth`) stay where mk3 has them; where the service listens and keeps its
//! data sit beside them; everything else is grouped by what it governs (`builds`, `registry`,
//! `access`, `executor`, `tracing`), each group checking its own values. Keys of the flat
//! layout before the groups are still read, with a warning naming the new key (`legacy.rs`).
//! Unknown keys and bad values stop the process with a message naming the key.

mod access;
mod builds;
mod executor;
mod legacy;
mod registry;
mod tracing;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use access::AccessConfig;
pub use builds::{BaseImageKey, BuildsConfig};
pub use executor::{ExecutorConfig, KubernetesConfig, LocalConfig};
pub use legacy::LegacyKey;
pub use registry::{DEFAULT_REGISTRY_REQUESTS_PER_HOST, RegistryConfig};
pub use tracing::TracingConfig;

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
    /// Repository that Dockerfile builds push their base images to (required, mk3's key), e.g.
    /// `registry.example.com/base-images`.
    pub base_image_repository: String,
    /// Repository that workspace images are pushed to (required, mk3's key).
    pub workspace_image_repository: String,
    /// The installation's registry credentials (mk3's key): a docker config file
    /// (`.dockerconfigjson` with `auths`), re-read when it changes. Default: none.
    #[serde(default)]
    pub pull_secret_file: Option<PathBuf>,
    /// Use ECR tokens (`GetAuthorizationToken`, AWS credentials from the environment) for
    /// hosts `<account>.dkr.ecr.<region>.amazonaws.com` (mk3's key). Default false.
    #[serde(default, rename = "enableAdditionalECRAuth")]
    pub enable_additional_ecr_auth: bool,
    /// Where the gRPC API listens. Default `127.0.0.1:8080`; port 0 picks a free port.
    #[serde(default = "default_grpc_address")]
    pub grpc_address: SocketAddr,
    /// TLS on the gRPC port: `{"certFile", "keyFile", "clientCAFile"}`; with `clientCAFile`
    /// clients must present a certificate it signed (mTLS). Files are re-read when they
    /// change. Default: none (plain HTTP/2, loopback only unless `allowInsecure`).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Let a `grpcAddress` other than loopback serve without TLS. Default `false`.
    #[serde(default)]
    pub allow_insecure: bool,
    /// Where Prometheus metrics are served at `/metrics`. Default `127.0.0.1:9500`.
    #[serde(default = "default_metrics_address")]
    pub metrics_address: SocketAddr,
    /// Directory of the build store, build work directories and buildah's storage. Default
    /// `./image-builder-data`.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// How builds run: time limit, concurrency, log size, retention, base image naming.
    #[serde(default)]
    pub builds: BuildsConfig,
    /// How registries are spoken to: plain-HTTP hosts, timeouts, retries, ECR's endpoint.
    #[serde(default)]
    pub registry: RegistryConfig,
    /// Who may use the ops API (cancel, retry, reads).
    #[serde(default)]
    pub access: AccessConfig,
    /// Where builds run: `{"kind": "local", ...}` (buildah on this machine, the default) or
    /// `{"kind": "kubernetes", ...}` (a Job per build attempt).
    #[serde(default)]
    pub executor: ExecutorConfig,
    /// OpenTelemetry traces, exported over OTLP/HTTP: `{"otlpEndpoint", "sampleRatio"}`.
    /// Default: off.
    #[serde(default)]
    pub tracing: Option<TracingConfig>,
    /// Keys of the flat layout this file still used, each with the key that replaced it:
    /// the service warns about each at start.
    #[serde(skip)]
    pub legacy_keys: Vec<LegacyKey>,
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

fn default_grpc_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn default_metrics_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9500))
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

    /// Parses and validates a config document; keys of the flat layout are moved to their
    /// groups first (see [`Config::legacy_keys`]).
    pub fn parse(text: &str) -> Result<Self, Error> {
        let mut document: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::Invalid {
                key: ".".to_owned(),
                message: strip_position(&e.to_string()),
            })?;
        let legacy_keys = legacy::regroup(&mut document)?;
        let mut config: Config = serde_path_to_error::deserialize(document).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            // serde names an unknown or missing key in its message; the path is its parent.
            Error::Invalid {
                key,
                message: strip_position(&inner.to_string()),
            }
        })?;
        config.legacy_keys = legacy_keys;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), Error> {
        validate_repository("baseImageRepository", &self.base_image_repository)?;
        validate_repository("workspaceImageRepository", &self.workspace_image_repository)?;
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("dataDir", "must name a directory"));
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
        self.builds.validate()?;
        self.registry.validate()?;
        self.access.validate()?;
        self.executor.validate()?;
        if let Some(tracing) = &self.tracing {
            tracing.validate()?;
        }
        Ok(())
    }
}

/// The most of anything counted at once (builds, requests): far above what one service
/// runs, far below what a semaphore takes.
const MAX_COUNT: usize = 65_536;

/// The error for `key` (a dotted path) holding a value that cannot be used.
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
    use std::time::Duration;

    const MINIMAL: &str = r#"{"baseImageRepository": "127.0.0.1:5000/base", "workspaceImageRepository": "127.0.0.1:5000/ws"}"#;

    /// [`MINIMAL`] with `members` (`"key": value, ...`) added.
    fn with(members: &str) -> String {
        MINIMAL.replace('}', &format!(", {members}}}"))
    }

    /// Why `text` is refused.
    fn refusal(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn defaults_fill_what_is_not_given() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.grpc_address.to_string(), "127.0.0.1:8080");
        assert_eq!(c.metrics_address.to_string(), "127.0.0.1:9500");
        assert!(c.registry.insecure.is_empty());
        assert_eq!(c.builds.timeout, Duration::from_secs(3600));
        assert!(matches!(c.executor, ExecutorConfig::Local(_)));
        assert!(c.legacy_keys.is_empty());
        let c = Config::parse(&with(r#""builds": {"timeout": "90s"}"#)).unwrap();
        assert_eq!(c.builds.timeout, Duration::from_secs(90));
        assert_eq!(c.builds.max_concurrent, 4);
    }

    #[test]
    fn unknown_key_is_named() {
        let text = with(r#""grpcAdress": "127.0.0.1:1""#);
        let err = refusal(&text);
        assert!(err.contains("grpcAdress"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            (r#""grpcAddress": "localhost""#, "grpcAddress"),
            (
                r#""registry": {"insecure": ["http://x/"]}"#,
                "registry.insecure[0]",
            ),
            (r#""metricsAddress": 5"#, "metricsAddress"),
            (r#""builds": {"timeout": "soon"}"#, "builds.timeout"),
            (r#""builds": {"maxConcurrent": 0}"#, "builds.maxConcurrent"),
            (r#""builds": {"maxLogBytes": -1}"#, "builds.maxLogBytes"),
            (r#""builds": {"retention": "0s"}"#, "builds.retention"),
            (
                r#""registry": {"requestsPerHost": 0}"#,
                "registry.requestsPerHost",
            ),
            (r#""registry": {"timeout": "0s"}"#, "registry.timeout"),
            (r#""registry": {"insecur": []}"#, "insecur"),
            (
                r#""executor": {"kind": "local", "layerCacheSize": 0}"#,
                "executor.layerCacheSize",
            ),
        ];
        for (pair, key) in cases {
            let text = with(pair);
            let err = refusal(&text);
            assert!(err.contains(key), "{pair}: {err}");
        }
        let tagged =
            r#"{"baseImageRepository": "r/base:latest", "workspaceImageRepository": "r/ws"}"#;
        let err = refusal(tagged);
        assert!(err.contains("baseImageRepository"), "{err}");
    }

    #[test]
    fn the_kubernetes_executor_is_chosen_and_checked_by_key() {
        let c = Config::parse(MINIMAL).unwrap();
        assert!(matches!(c.executor, ExecutorConfig::Local(_)));
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
            let err = refusal(&with(executor));
            assert!(err.contains(key), "{executor}: {err}");
        }
    }

    #[test]
    fn a_network_address_without_tls_needs_allow_insecure() {
        let open = with(r#""grpcAddress": "0.0.0.0:8080""#);
        let err = refusal(&open);
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
        let bad = with(r#""tls": {"certFile": "c.pem"}"#);
        let err = refusal(&bad);
        assert!(err.contains("keyFile"), "{err}");
    }

    #[test]
    fn identities_and_tracing_are_checked() {
        let c = Config::parse(&with(r#""access": {"operators": ["alice"]}"#)).unwrap();
        assert_eq!(c.access.operators, ["alice"]);
        assert_eq!(c.access.viewers(), ["alice"]);
        for (pair, key) in [
            (
                r#""access": {"operators": ["ok", ""]}"#,
                "access.operators[1]",
            ),
            (r#""access": {"viewers": ["a\u0007"]}"#, "access.viewers[0]"),
            (
                r#""tracing": {"otlpEndpoint": "http://x:4318", "sampleRatio": 2}"#,
                "tracing.sampleRatio",
            ),
            (
                r#""tracing": {"otlpEndpoint": "x:4318"}"#,
                "tracing.otlpEndpoint",
            ),
        ] {
            let text = with(pair);
            let err = refusal(&text);
            assert!(err.contains(key), "{pair}: {err}");
        }
    }

    #[test]
    fn missing_required_key_is_named() {
        let err = refusal(r#"{"baseImageRepository": "r/base"}"#);
        assert!(err.contains("workspaceImageRepository"), "{err}");
    }

    #[test]
    fn keys_of_the_flat_layout_are_read_into_their_groups_and_named() {
        let flat = with(
            r#""insecureRegistries": ["127.0.0.1:5000"], "maxConcurrentBuilds": 2,
                "registryRetryBudget": "5s", "operators": ["alice"], "layerCacheSize": "1 GiB",
                "allowLocalRepositories": true"#,
        );
        let c = Config::parse(&flat).unwrap();
        assert_eq!(c.registry.insecure, ["127.0.0.1:5000"]);
        assert_eq!(c.builds.max_concurrent, 2);
        assert_eq!(c.registry.retry_budget, Duration::from_secs(5));
        assert_eq!(c.access.operators, ["alice"]);
        assert!(c.builds.allow_local_repositories);
        let ExecutorConfig::Local(local) = &c.executor else {
            panic!("not local: {:?}", c.executor)
        };
        assert_eq!(local.layer_cache_size, bytesize::ByteSize::gib(1));
        let warnings: Vec<String> = c.legacy_keys.iter().map(ToString::to_string).collect();
        assert_eq!(warnings.len(), 6, "{warnings:?}");
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("`maxConcurrentBuilds` is now `builds.maxConcurrent`")),
            "{warnings:?}"
        );
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("`layerCacheSize` is now `executor.layerCacheSize`")),
            "{warnings:?}"
        );
        // An old key beside a group: both are read.
        let mixed = with(r#""builds": {"timeout": "5m"}, "maxLogBytes": 4096"#);
        let c = Config::parse(&mixed).unwrap();
        assert_eq!(
            (c.builds.timeout, c.builds.max_log_bytes),
            (Duration::from_secs(300), 4096)
        );
        // A flat key's value is checked under its new name.
        let err = refusal(&with(r#""maxConcurrentBuilds": 0"#));
        assert!(err.contains("builds.maxConcurrent"), "{err}");
    }

    #[test]
    fn a_key_set_under_both_names_is_refused() {
        let both = with(r#""registry": {"timeout": "5s"}, "registryTimeout": "9s""#);
        let err = refusal(&both);
        assert!(
            err.contains("registryTimeout") && err.contains("registry.timeout"),
            "{err}"
        );
        let not_a_group = with(r#""registry": 5, "registryTimeout": "9s""#);
        let err = refusal(&not_a_group);
        assert!(err.contains("`registry`"), "{err}");
    }

    #[test]
    fn the_local_cache_size_beside_the_kubernetes_executor_is_ignored_with_a_warning() {
        let text = with(
            r#""layerCacheSize": "1 GiB", "executor": {"kind": "kubernetes", "namespace": "ns", "builderImage": "r/b:1"}"#,
        );
        let c = Config::parse(&text).unwrap();
        assert!(matches!(c.executor, ExecutorConfig::Kubernetes(_)));
        assert!(
            matches!(
                c.legacy_keys[..],
                [LegacyKey::Ignored {
                    old: "layerCacheSize",
                    ..
                }]
            ),
            "{:?}",
            c.legacy_keys
        );
    }

    #[test]
    fn every_key_of_the_flat_layout_names_a_key_the_groups_read() {
        for (old, new) in legacy::MOVES {
            let (group, key) = new.split_once('.').unwrap();
            let value = match *old {
                "buildTimeout" | "retention" | "registryTimeout" | "registryRetryBudget" => {
                    r#""9s""#
                }
                "maxConcurrentBuilds" | "maxLogBytes" | "registryRequestsPerHost" => "4096",
                "baseImageKey" => r#""content""#,
                "allowLocalRepositories" => "true",
                "insecureRegistries" | "operators" => r#"["a"]"#,
                "viewers" => r#"["b"]"#,
                "layerCacheSize" => r#""2 GiB""#,
                _ => r#""x""#,
            };
            let flat = with(&format!(r#""{old}": {value}"#));
            let grouped = if group == "executor" {
                with(&format!(
                    r#""executor": {{"kind": "local", "{key}": {value}}}"#
                ))
            } else {
                with(&format!(r#""{group}": {{"{key}": {value}}}"#))
            };
            let (flat, grouped) = (
                Config::parse(&flat).unwrap(),
                Config::parse(&grouped).unwrap(),
            );
            // The groups read the same either way (compared as printed: the groups hold
            // types without equality, such as Kubernetes' resources).
            let groups = |c: &Config| {
                format!(
                    "{:?} {:?} {:?} {:?}",
                    c.builds, c.registry, c.access, c.executor
                )
            };
            assert_eq!(groups(&flat), groups(&grouped), "{old}");
            assert_eq!(flat.legacy_keys, [LegacyKey::Moved { old, new }]);
        }
    }
}
