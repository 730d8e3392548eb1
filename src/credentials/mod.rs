//! Credentials and the policy over them: the installation's registry credentials (a docker
//! config file, re-read when it changes; ECR tokens), a request's own (`BuildRegistryAuth`,
//! its git credentials; kept in memory only), which of them each registry and step gets
//! (mk3's rules, in [`CredentialPolicy`]), and the redaction of every known credential value
//! from log lines.
//!
//! mk3's rules: a request allows installation credentials for every registry
//! (`total.allow_all`) or for some (`selective`: the base repository's registry, the workspace
//! repository's registry, `any_of` hosts); a registry it does not allow gets none. The
//! request's `additional` credentials are used where no installation credential applies.
//! Pushes (base and workspace repositories) always use the installation's credentials.

mod docker_config;
pub mod ecr;
mod git;
mod keychain;
mod policy;
pub mod redact;
mod secret;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use base64::Engine;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

pub use docker_config::DockerConfig;
pub use git::{GitCredentials, UrlUserinfo};
pub use keychain::{Credentials, Keychain, NoCredentials, RequestAuth, RequestKeychain};
pub use policy::{BuildSecrets, CredentialPolicy};
pub use redact::{Redactions, StreamRedactor};
pub use secret::{Secret, normalize_host, registry_host};

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

    #[tokio::test]
    async fn pull_steps_get_pull_credentials_and_the_push_step_the_installations_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            serde_json::json!({"auths": {
                "push.example": {"auth": b64("pusher:push-pw")},
                "pull.example": {"auth": b64("puller:pull-pw")},
                "cache.example": {"auth": b64("cacher:cache-pw")},
            }})
            .to_string(),
        )
        .unwrap();
        let creds = Credentials::new(Some(&path), "push.example/base", "push.example/ws").unwrap();
        let request = RequestAuth {
            allow_all: true,
            ..Default::default()
        };
        let hosts = |file: &serde_json::Value| -> Vec<String> {
            file["auths"].as_object().unwrap().keys().cloned().collect()
        };
        let pull = creds
            .pull_auth_file(&request, &["cache.example".into()])
            .await;
        assert_eq!(
            hosts(&pull),
            ["cache.example", "pull.example", "push.example"]
        );
        let push = creds
            .push_auth_file(&["push.example".into(), "cache.example".into()])
            .await;
        assert_eq!(hosts(&push), ["cache.example", "push.example"]);
        assert_eq!(push["auths"]["push.example"]["auth"], b64("pusher:push-pw"));
        let push_alone = creds.push_auth_file(&["push.example".into()]).await;
        assert_eq!(hosts(&push_alone), ["push.example"]);
    }
}
