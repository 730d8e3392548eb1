//! Which credentials a registry gets: a request's rules (mk3's) over the installation's
//! credentials, ECR tokens and the request's own.

use super::*;

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

    /// The credentials of the steps that pull for a request (a build's base images, its layer
    /// cache), by host, in the docker config format (`{"auths": {host: {"auth": …}}}`): pulls
    /// as the request allows, and the installation's credential for each of `own_hosts` (a
    /// layer cache's), which wins where both apply. No step that runs a Dockerfile gets it.
    pub async fn pull_auth_file(
        &self,
        request: &RequestAuth,
        own_hosts: &[String],
    ) -> serde_json::Value {
        let own_hosts: Vec<String> = own_hosts.iter().map(|h| normalize_host(h)).collect();
        let mut hosts: Vec<String> = request.additional.keys().cloned().collect();
        hosts.extend(request.allowed.iter().map(|h| normalize_host(h)));
        hosts.extend([self.base_host.clone(), self.workspace_host.clone()]);
        hosts.extend(own_hosts.iter().cloned());
        if let Some(c) = &self.installation {
            hosts.extend(c.hosts());
        }
        hosts.sort();
        hosts.dedup();
        let mut auths = serde_json::Map::new();
        for host in hosts {
            let own = if own_hosts.contains(&host) {
                self.for_push(&host).await
            } else {
                None
            };
            let secret = match own {
                Some(secret) => Some(secret),
                None => self.for_pull(&host, request).await,
            };
            if let Some(token) = secret.and_then(|s| s.basic_token()) {
                auths.insert(host, serde_json::json!({ "auth": token }));
            }
        }
        serde_json::json!({ "auths": auths })
    }

    /// The installation's credentials for pushing to each of `hosts` (the base image's
    /// registry, a layer cache's), alone, in the docker config format: what a push step gets.
    pub async fn push_auth_file(&self, hosts: &[String]) -> serde_json::Value {
        let mut auths = serde_json::Map::new();
        for host in hosts.iter().map(|h| normalize_host(h)) {
            if let Some(token) = self.for_push(&host).await.and_then(|s| s.basic_token()) {
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
