//! The installation's docker config file (`pullSecretFile`), re-read when its content changes.

use std::sync::Arc;

use super::*;
use crate::reload::{ReadError, Reloading};

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

/// The installation's credentials: a docker config file, re-read whenever its content
/// changes (a file that went bad keeps the last good credentials, and the service log says so).
pub struct DockerConfig {
    file: Reloading<HashMap<String, Secret>, Error>,
}

impl From<ReadError> for Error {
    fn from(e: ReadError) -> Self {
        Error::Read {
            path: e.path,
            source: e.source,
        }
    }
}

impl DockerConfig {
    /// Reads the file; fails when it cannot be read or parsed.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let owned = path.to_owned();
        let file = Reloading::open(vec![path.to_owned()], move |bytes: &[Vec<u8>]| {
            let auths = parse_config(&owned, &bytes[0])?;
            tracing::info!(path = %owned.display(), registries = auths.len(), "loaded registry credentials");
            Ok(auths)
        })?;
        Ok(Self { file })
    }

    fn auths(&self) -> Arc<HashMap<String, Secret>> {
        let (auths, error) = self.file.current();
        if let Some(e) = error {
            tracing::warn!(error = %e, "keeping the last good registry credentials");
        }
        auths
    }

    /// The credential for a registry host, from the file as it is now.
    pub fn lookup(&self, host: &str) -> Option<Secret> {
        self.auths().get(&normalize_host(host)).cloned()
    }

    /// Every credential value, for redaction.
    pub fn sensitive_values(&self) -> Vec<String> {
        self.file
            .last()
            .values()
            .flat_map(Secret::sensitive_values)
            .collect()
    }

    /// Every registry host the file has a credential for.
    pub fn hosts(&self) -> Vec<String> {
        self.auths().keys().cloned().collect()
    }
}
