//! Credential policy: which keychain each step of a build gets, and which values its log
//! must never show. The orchestrator asks; it decides nothing about credentials itself.

use std::sync::Arc;

use image_builder_state::BuildSource;

use super::git::{GitCredentials, UrlUserinfo};
use super::keychain::{Credentials, RequestAuth, RequestKeychain};
use super::redact::Redactions;
use super::secret::{Secret, registry_host};

/// Values shorter than this are not redacted: they would blank out ordinary words.
const MIN_REDACTED_LEN: usize = 4;

/// What a build needs but the journal must never hold. In memory only: lost on restart.
#[derive(Debug, Clone, Default)]
pub struct BuildSecrets {
    /// Credentials for cloning the build context.
    pub git: Option<GitCredentials>,
    /// What the request allows of the installation's registry credentials, and its own.
    pub registry: RequestAuth,
    /// The user-info the request's git remote URL carried, for mk3's ref hash.
    pub remote_userinfo: Option<UrlUserinfo>,
}

/// Hands out keychains by mk3's rules and lists what must be redacted.
pub struct CredentialPolicy {
    credentials: Arc<Credentials>,
    /// A request that allows every registry the installation's credentials.
    allow_all: RequestAuth,
}

impl CredentialPolicy {
    /// The policy over the installation's `credentials`.
    pub fn new(credentials: Arc<Credentials>) -> Self {
        Self {
            credentials,
            allow_all: RequestAuth {
                allow_all: true,
                ..RequestAuth::default()
            },
        }
    }

    /// The registry credentials a request gets: what it allows of the installation's, and
    /// its own.
    pub fn keychain<'a>(&'a self, request: &'a RequestAuth) -> RequestKeychain<'a> {
        RequestKeychain {
            credentials: &self.credentials,
            request,
        }
    }

    /// The installation's credentials everywhere: for its own repositories (the cache check,
    /// pushes, base images this service built).
    pub fn installation(&self) -> RequestKeychain<'_> {
        self.keychain(&self.allow_all)
    }

    /// The credentials to read a build's base image with: the request's for an image it
    /// named, the installation's for a base image this service built.
    pub fn base_keychain<'a>(
        &'a self,
        source: &BuildSource,
        request: &'a RequestAuth,
    ) -> RequestKeychain<'a> {
        match source {
            BuildSource::Reference { .. } => self.keychain(request),
            BuildSource::Dockerfile(_) => self.installation(),
        }
    }

    /// Every credential value a build's log must not show: the installation's, and the
    /// build's own when they are still known (`None` after a restart).
    pub fn sensitive_values(&self, secrets: Option<&BuildSecrets>) -> Vec<String> {
        let mut values = match secrets {
            Some(s) => self.credentials.sensitive_values(&s.registry),
            None => self.credentials.sensitive_values(&RequestAuth::default()),
        };
        if let Some(git) = secrets.and_then(|s| s.git.as_ref()) {
            values.push(git.password.clone());
            values.extend(
                Secret::Basic {
                    user: git.user.clone(),
                    password: git.password.clone(),
                }
                .basic_token(),
            );
        }
        values.retain(|v| v.len() >= MIN_REDACTED_LEN);
        values
    }

    /// What `LogsRequest.censored` hides: every known credential value, and the hosts of
    /// `repositories` (the installation's registries).
    pub fn censored<'a>(&self, repositories: impl IntoIterator<Item = &'a str>) -> Redactions {
        let hosts = repositories
            .into_iter()
            .map(registry_host)
            .collect::<Vec<_>>();
        Redactions::new(self.sensitive_values(None)).replacing(hosts, b"[registry]")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use image_builder_state::DockerfileSource;

    fn policy() -> CredentialPolicy {
        CredentialPolicy::new(Arc::new(
            Credentials::new(None, "base.example/b", "ws.example/w").unwrap(),
        ))
    }

    #[test]
    fn git_credentials_and_their_basic_token_are_redacted_short_values_are_not() {
        let secrets = BuildSecrets {
            git: Some(GitCredentials {
                user: "bob".into(),
                password: "hunter22".into(),
            }),
            ..BuildSecrets::default()
        };
        let values = policy().sensitive_values(Some(&secrets));
        assert!(values.contains(&"hunter22".to_owned()), "{values:?}");
        let token = Secret::Basic {
            user: "bob".into(),
            password: "hunter22".into(),
        }
        .basic_token()
        .unwrap();
        assert!(values.contains(&token), "{values:?}");
        let short = BuildSecrets {
            git: Some(GitCredentials {
                user: "a".into(),
                password: "b".into(),
            }),
            ..BuildSecrets::default()
        };
        assert!(
            !policy()
                .sensitive_values(Some(&short))
                .contains(&"b".to_owned())
        );
    }

    #[test]
    fn a_named_base_image_is_read_with_the_request_a_built_one_with_the_installation() {
        let policy = policy();
        let request = RequestAuth::default();
        let named = BuildSource::Reference {
            reference: "r/x:1".into(),
        };
        assert!(!policy.base_keychain(&named, &request).request.allow_all);
        let built = BuildSource::Dockerfile(DockerfileSource {
            remote_uri: "https://h/r.git".into(),
            target_mode: image_builder_state::CloneTargetMode::RemoteHead,
            clone_target: String::new(),
            dockerfile_path: String::new(),
            context_path: String::new(),
            dockerfile_version: String::new(),
            git_auth: false,
        });
        assert!(policy.base_keychain(&built, &request).request.allow_all);
    }
}
