//! One registry credential and the host it is for.

use sha2::Digest;

use super::*;

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

    /// SHA-256 of the credential: tells two credentials apart (to share a registry answer or
    /// client between callers holding the same one) without keeping another copy of it.
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut hash = sha2::Sha256::new();
        let parts: [&str; 2] = match self {
            Secret::Basic { user, password } => [user, password],
            Secret::Bearer(token) => ["", token],
        };
        hash.update([matches!(self, Secret::Bearer(_)) as u8]);
        for part in parts {
            hash.update((part.len() as u64).to_le_bytes());
            hash.update(part.as_bytes());
        }
        hash.finalize().into()
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
