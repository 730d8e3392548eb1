//! Registry credentials: the installation's (a docker config file, re-read when it changes),
//! a request's own (`BuildRegistryAuth`, kept in memory only), and which of them a registry
//! gets (mk3's rules). Also the redaction of every known credential value from log lines.
//!
//! mk3's rules: a request allows installation credentials for every registry
//! (`total.allow_all`) or for some (`selective`: the base repository's registry, the workspace
//! repository's registry, `any_of` hosts); a registry it does not allow gets none. The
//! request's `additional` credentials are used where no installation credential applies.
//! Pushes (base and workspace repositories) always use the installation's credentials.

pub mod ecr;
pub mod redact;

use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use base64::Engine;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;
use sha2::Digest;

pub use redact::{Needles, StreamRedactor};

/// A credential for one registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    /// User name and password (or token used as a password).
    Basic {
        /// The user.
        user: String,
        /// The password.
        password: String,
    },
    /// A bearer token (docker config `identitytoken`).
    Bearer(String),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    /// The form oci-client takes.
    pub fn registry_auth(&self) -> RegistryAuth {
        match self {
            Secret::Basic { user, password } => RegistryAuth::Basic(user.clone(), password.clone()),
            Secret::Bearer(token) => RegistryAuth::Bearer(token.clone()),
        }
    }

    /// `base64(user:password)`, as docker config files and buildah auth files hold it.
    pub fn basic_token(&self) -> Option<String> {
        match self {
            Secret::Basic { user, password } => {
                Some(base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
            }
            Secret::Bearer(_) => None,
        }
    }

    /// The values that must never appear in a log.
    pub fn sensitive_values(&self) -> Vec<String> {
        match self {
            Secret::Basic { password, .. } => {
                let mut values = vec![password.clone()];
                values.extend(self.basic_token());
                values
            }
            Secret::Bearer(token) => vec![token.clone()],
        }
    }

    /// Reads a base64 `user:password` value.
    pub fn from_basic_token(token: &str) -> Option<Self> {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(token.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (user, password) = text.split_once(':')?;
        Some(Secret::Basic {
            user: user.to_owned(),
            password: password.to_owned(),
        })
    }
}

/// The registry host of an image reference or repository, the docker way.
pub fn registry_host(reference: &str) -> String {
    match reference.parse::<oci_client::Reference>() {
        Ok(r) => normalize_host(r.registry()),
        Err(_) => normalize_host(reference.split('/').next().unwrap_or(reference)),
    }
}

/// `https://index.docker.io/v1/` and friends are `docker.io`; schemes and paths go.
pub fn normalize_host(host: &str) -> String {
    let host = host
        .trim()
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = host.split('/').next().unwrap_or(host);
    match host {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_owned()
        }
        other => other.to_ascii_lowercase(),
    }
}

/// The docker config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// It cannot be read.
    #[error("cannot read pullSecretFile {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It is not a docker config.
    #[error(
        "pullSecretFile {path} is not a docker config (.dockerconfigjson with \"auths\"): {detail}"
    )]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong (never a credential).
        detail: String,
    },
}

#[derive(Deserialize)]
struct ConfigFile {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

fn parse_config(path: &Path, text: &[u8]) -> Result<HashMap<String, Secret>, Error> {
    let file: ConfigFile = serde_json::from_slice(text).map_err(|e| Error::Parse {
        path: path.to_owned(),
        // serde_json's message names the position, not the content.
        detail: format!("invalid JSON at line {} column {}", e.line(), e.column()),
    })?;
    let mut auths = HashMap::new();
    for (host, entry) in file.auths {
        let secret = if let Some(token) = entry.identitytoken.filter(|t| !t.is_empty()) {
            Some(Secret::Bearer(token))
        } else if let (Some(user), Some(password)) = (entry.username, entry.password) {
            Some(Secret::Basic { user, password })
        } else {
            entry.auth.as_deref().and_then(Secret::from_basic_token)
        };
        match secret {
            Some(secret) => {
                auths.insert(normalize_host(&host), secret);
            }
            None => {
                tracing::warn!(registry = %normalize_host(&host), "pullSecretFile entry has no usable credential; ignored");
            }
        }
    }
    Ok(auths)
}

struct Loaded {
    /// SHA-256 of the bytes last parsed: a rotation is seen whatever the file's size and
    /// modification time say (a same-length write within one mtime tick changes neither).
    digest: Option<[u8; 32]>,
    auths: HashMap<String, Secret>,
}

/// The installation's credentials: a docker config file, re-read whenever it changes.
pub struct DockerConfig {
    path: PathBuf,
    loaded: Mutex<Loaded>,
}

impl DockerConfig {
    /// Reads the file; fails when it cannot be read or parsed.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let config = Self {
            path: path.to_owned(),
            loaded: Mutex::new(Loaded {
                digest: None,
                auths: HashMap::new(),
            }),
        };
        config.refresh()?;
        Ok(config)
    }

    /// Re-reads the file and parses it again if its content changed. A file that went bad
    /// keeps the last good credentials (and says so in the service log).
    fn refresh(&self) -> Result<(), Error> {
        let text = std::fs::read(&self.path).map_err(|source| Error::Read {
            path: self.path.clone(),
            source,
        })?;
        let digest: [u8; 32] = sha2::Sha256::digest(&text).into();
        let mut loaded = self.loaded.lock();
        if loaded.digest == Some(digest) {
            return Ok(());
        }
        let auths = parse_config(&self.path, &text)?;
        tracing::info!(path = %self.path.display(), registries = auths.len(), "loaded registry credentials");
        *loaded = Loaded {
            digest: Some(digest),
            auths,
        };
        Ok(())
    }

    /// The credential for a registry host, from the file as it is now.
    pub fn lookup(&self, host: &str) -> Option<Secret> {
        if let Err(e) = self.refresh() {
            tracing::warn!(error = %e, "keeping the last good registry credentials");
        }
        let loaded = self.loaded.lock();
        loaded.auths.get(&normalize_host(host)).cloned()
    }

    /// Every credential value, for redaction.
    pub fn sensitive_values(&self) -> Vec<String> {
        let loaded = self.loaded.lock();
        loaded
            .auths
            .values()
            .flat_map(Secret::sensitive_values)
            .collect()
    }

    /// Every registry host the file has a credential for.
    pub fn hosts(&self) -> Vec<String> {
        if let Err(e) = self.refresh() {
            tracing::warn!(error = %e, "keeping the last good registry credentials");
        }
        let loaded = self.loaded.lock();
        loaded.auths.keys().cloned().collect()
    }
}

/// What a request allows, and the credentials it brought (`BuildRegistryAuth`). In memory only.
#[derive(Clone, Default, Debug)]
pub struct RequestAuth {
    /// `total.allow_all`.
    pub allow_all: bool,
    /// `selective.allow_baserep`: the base repository's registry.
    pub allow_base_repository: bool,
    /// `selective.allow_workspacerep`: the workspace repository's registry.
    pub allow_workspace_repository: bool,
    /// `selective.any_of`: more hosts allowed installation credentials.
    pub allowed: Vec<String>,
    /// The request's own credentials by host (`additional`).
    pub additional: HashMap<String, Secret>,
}

impl RequestAuth {
    /// True if the request brought credentials of its own.
    pub fn has_own(&self) -> bool {
        !self.additional.is_empty()
    }
}

/// Which credentials a registry gets.
pub struct Credentials {
    installation: Option<DockerConfig>,
    ecr: Option<ecr::Ecr>,
    base_host: String,
    workspace_host: String,
}

impl Credentials {
    /// Installation credentials from `pull_secret_file`, if one is configured, for an
    /// installation with these base and workspace repositories.
    pub fn new(
        pull_secret_file: Option<&Path>,
        base_repository: &str,
        workspace_repository: &str,
    ) -> Result<Self, Error> {
        Ok(Self {
            installation: pull_secret_file.map(DockerConfig::open).transpose()?,
            ecr: None,
            base_host: registry_host(base_repository),
            workspace_host: registry_host(workspace_repository),
        })
    }

    /// Adds ECR tokens for ECR hosts (`enableAdditionalECRAuth`), from AWS or `endpoint`.
    pub fn with_ecr(mut self, endpoint: Option<String>) -> Self {
        self.ecr = Some(ecr::Ecr::new(endpoint));
        self
    }

    async fn ecr_token(&self, host: &str) -> Option<Secret> {
        match &self.ecr {
            Some(ecr) => ecr.credential(host).await,
            None => None,
        }
    }

    /// Drops a credential a registry refused if a fresh one can be had (ECR). True if so.
    pub async fn renew(&self, host: &str) -> bool {
        match &self.ecr {
            Some(ecr) => ecr.renew(host).await,
            None => false,
        }
    }

    /// The credential for pulling from `host` on behalf of `request`. ECR hosts are allowed
    /// by default, as in mk3: IAM decides what the installation may read.
    pub async fn for_pull(&self, host: &str, request: &RequestAuth) -> Option<Secret> {
        let host = normalize_host(host);
        let allowed = request.allow_all
            || (request.allow_base_repository && host == self.base_host)
            || (request.allow_workspace_repository && host == self.workspace_host)
            || request.allowed.iter().any(|h| normalize_host(h) == host);
        let installation = if allowed {
            self.installation.as_ref().and_then(|c| c.lookup(&host))
        } else {
            None
        };
        if let Some(secret) = installation {
            return Some(secret);
        }
        if let Some(token) = self.ecr_token(&host).await {
            return Some(token);
        }
        request.additional.get(&host).cloned()
    }

    /// The credential for pushing to `host`: the installation's, never a request's.
    pub async fn for_push(&self, host: &str) -> Option<Secret> {
        match self.installation.as_ref().and_then(|c| c.lookup(host)) {
            Some(secret) => Some(secret),
            None => self.ecr_token(host).await,
        }
    }

    /// The credentials a builder needs for a request, by host, in the docker config format
    /// (`{"auths": {host: {"auth": …}}}`): pulls as the request allows, and the installation's
    /// credential for `push_host`, which wins where both apply.
    pub async fn builder_auth_file(
        &self,
        request: &RequestAuth,
        push_host: &str,
    ) -> serde_json::Value {
        let mut hosts: Vec<String> = request.additional.keys().cloned().collect();
        hosts.extend(request.allowed.iter().map(|h| normalize_host(h)));
        hosts.extend([self.base_host.clone(), self.workspace_host.clone()]);
        if let Some(c) = &self.installation {
            hosts.extend(c.hosts());
        }
        let mut auths = serde_json::Map::new();
        for host in hosts {
            let pushed = if host == normalize_host(push_host) {
                self.for_push(&host).await
            } else {
                None
            };
            let secret = match pushed {
                Some(secret) => Some(secret),
                None => self.for_pull(&host, request).await,
            };
            if let Some(token) = secret.and_then(|s| s.basic_token()) {
                auths.insert(host, serde_json::json!({ "auth": token }));
            }
        }
        serde_json::json!({ "auths": auths })
    }

    /// Every credential value this service knows of for `request`, for redaction.
    pub fn sensitive_values(&self, request: &RequestAuth) -> Vec<String> {
        let mut values: Vec<String> = request
            .additional
            .values()
            .flat_map(Secret::sensitive_values)
            .collect();
        if let Some(c) = &self.installation {
            values.extend(c.sensitive_values());
        }
        values.retain(|v| v.len() >= 4);
        values
    }
}

/// The credentials a registry client presents, by registry host.
#[async_trait]
pub trait Keychain: Send + Sync {
    /// The credential for reading from `host`, if any.
    async fn pull(&self, host: &str) -> Option<Secret>;
    /// The credential for writing to `host`, if any.
    async fn push(&self, host: &str) -> Option<Secret>;
    /// Drops a credential `host` refused, if a fresh one can be had; true if so.
    async fn renew(&self, host: &str) -> bool {
        let _ = host;
        false
    }
}

/// No credentials anywhere.
pub struct NoCredentials;

#[async_trait]
impl Keychain for NoCredentials {
    async fn pull(&self, _host: &str) -> Option<Secret> {
        None
    }
    async fn push(&self, _host: &str) -> Option<Secret> {
        None
    }
}

/// The keychain of one request: mk3's rules over the installation's and the request's
/// credentials.
pub struct RequestKeychain<'a> {
    /// Installation credentials.
    pub credentials: &'a Credentials,
    /// What the request allows and brought.
    pub request: &'a RequestAuth,
}

#[async_trait]
impl Keychain for RequestKeychain<'_> {
    async fn pull(&self, host: &str) -> Option<Secret> {
        self.credentials.for_pull(host, self.request).await
    }
    async fn push(&self, host: &str) -> Option<Secret> {
        self.credentials.for_push(host).await
    }
    async fn renew(&self, host: &str) -> bool {
        self.credentials.renew(host).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn docker_config_forms_are_read_and_hosts_normalised() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let text = serde_json::json!({"auths": {
            "https://index.docker.io/v1/": {"auth": b64("hub:hubpw")},
            "reg.example.com:5000": {"username": "u", "password": "p:w"},
            "token.example.com": {"identitytoken": "tok"},
            "empty.example.com": {}
        }});
        std::fs::write(&path, text.to_string()).unwrap();
        let config = DockerConfig::open(&path).unwrap();
        assert_eq!(
            config.lookup("docker.io"),
            Some(Secret::Basic {
                user: "hub".into(),
                password: "hubpw".into()
            })
        );
        assert_eq!(
            config.lookup("REG.example.com:5000"),
            Some(Secret::Basic {
                user: "u".into(),
                password: "p:w".into()
            })
        );
        assert_eq!(
            config.lookup("token.example.com"),
            Some(Secret::Bearer("tok".into()))
        );
        assert_eq!(config.lookup("empty.example.com"), None);
    }

    #[test]
    fn a_changed_file_is_read_again_and_a_broken_one_keeps_the_last_good() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            serde_json::json!({"auths": {"r": {"auth": b64("a:1")}}}).to_string(),
        )
        .unwrap();
        let config = DockerConfig::open(&path).unwrap();
        assert_eq!(
            config.lookup("r"),
            Some(Secret::Basic {
                user: "a".into(),
                password: "1".into()
            })
        );
        std::fs::write(
            &path,
            serde_json::json!({"auths": {"r": {"auth": b64("a:22")}}}).to_string(),
        )
        .unwrap();
        assert_eq!(
            config.lookup("r"),
            Some(Secret::Basic {
                user: "a".into(),
                password: "22".into()
            })
        );
        // A rotation of the same length within the same mtime tick is still seen.
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::fs::write(
            &path,
            serde_json::json!({"auths": {"r": {"auth": b64("a:33")}}}).to_string(),
        )
        .unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert_eq!(
            config.lookup("r"),
            Some(Secret::Basic {
                user: "a".into(),
                password: "33".into()
            })
        );
        std::fs::write(&path, "{not json").unwrap();
        assert_eq!(
            config.lookup("r"),
            Some(Secret::Basic {
                user: "a".into(),
                password: "33".into()
            })
        );
        let err = DockerConfig::open(&path).err().unwrap().to_string();
        assert!(err.contains("not a docker config"), "{err}");
    }

    #[tokio::test]
    async fn mk3_rules_decide_which_registry_gets_installation_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            serde_json::json!({"auths": {"reg.example.com": {"auth": b64("inst:pw")}}}).to_string(),
        )
        .unwrap();
        let creds =
            Credentials::new(Some(&path), "base-registry/base", "reg.example.com/ws").unwrap();
        let installation = Some(Secret::Basic {
            user: "inst".into(),
            password: "pw".into(),
        });
        assert_eq!(
            creds
                .for_pull("reg.example.com", &RequestAuth::default())
                .await,
            None,
            "nothing allowed by default"
        );
        let all = RequestAuth {
            allow_all: true,
            ..Default::default()
        };
        assert_eq!(creds.for_pull("reg.example.com", &all).await, installation);
        let selective = RequestAuth {
            allowed: vec!["reg.example.com".into()],
            ..Default::default()
        };
        assert_eq!(
            creds.for_pull("reg.example.com", &selective).await,
            installation
        );
        let own = Secret::Basic {
            user: "me".into(),
            password: "mine".into(),
        };
        let other = RequestAuth {
            allowed: vec!["elsewhere".into()],
            additional: HashMap::from([("reg.example.com".to_owned(), own.clone())]),
            ..Default::default()
        };
        assert_eq!(
            creds.for_pull("reg.example.com", &other).await,
            Some(own),
            "additional when not allowed"
        );
        assert_eq!(
            creds.for_push("reg.example.com").await,
            installation,
            "pushes use the installation's"
        );
        let workspace = RequestAuth {
            allow_workspace_repository: true,
            ..Default::default()
        };
        assert_eq!(
            creds.for_pull("reg.example.com", &workspace).await,
            installation,
            "allow_workspacerep"
        );
        let base = RequestAuth {
            allow_base_repository: true,
            ..Default::default()
        };
        assert_eq!(
            creds.for_pull("reg.example.com", &base).await,
            None,
            "the base repository is elsewhere"
        );
    }
}
