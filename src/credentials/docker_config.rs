//! The installation's docker config file (`pullSecretFile`), re-read when its content changes.

use super::*;

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
