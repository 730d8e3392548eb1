//! ECR credentials (`enableAdditionalECRAuth`): for hosts of the form
//! `<12 digits>.dkr.ecr.<region>.amazonaws.com`, a token from `GetAuthorizationToken`
//! (aws-sdk-ecr, AWS credentials from the environment as usual), cached per region and
//! refreshed well before it expires; [`Ecr::renew`] drops a token a registry refused so the
//! next request fetches a new one.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use aws_sdk_ecr::config::Region;
use tokio::sync::Mutex;

use super::Secret;

/// Tokens are used for at most this long, or half their lifetime if that is shorter (mk3
/// refreshes every 4 h; ECR tokens live 12 h).
const MAX_TOKEN_AGE: Duration = Duration::from_secs(4 * 60 * 60);

/// The region of an ECR registry host, if it is one.
pub fn ecr_region(host: &str) -> Option<String> {
    let host = host.split(':').next()?;
    let rest = host.strip_suffix(".amazonaws.com")?;
    let mut parts = rest.split('.');
    let account = parts.next()?;
    if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if parts.next()? != "dkr" || parts.next()? != "ecr" {
        return None;
    }
    let region = parts.next()?;
    let valid = !region.is_empty()
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    (valid && parts.next().is_none()).then(|| region.to_owned())
}

struct Cached {
    secret: Secret,
    use_until: Instant,
}

/// Fetches and caches ECR tokens.
pub struct Ecr {
    endpoint: Option<String>,
    tokens: Mutex<HashMap<String, Cached>>,
}

impl Ecr {
    /// ECR auth against AWS, or against `endpoint` (a test server such as moto) if given.
    pub fn new(endpoint: Option<String>) -> Self {
        Self {
            endpoint,
            tokens: Mutex::new(HashMap::new()),
        }
    }

    /// The credential for an ECR host; `None` for other hosts or when no token can be had
    /// (the reason goes to the service log, never a credential).
    pub async fn credential(&self, host: &str) -> Option<Secret> {
        let region = ecr_region(host)?;
        let mut tokens = self.tokens.lock().await;
        if let Some(cached) = tokens.get(&region)
            && Instant::now() < cached.use_until
        {
            return Some(cached.secret.clone());
        }
        match self.fetch(&region).await {
            Ok((secret, lifetime)) => {
                tracing::info!(%region, "fetched an ECR token");
                let age = lifetime
                    .map(|l| l / 2)
                    .unwrap_or(MAX_TOKEN_AGE)
                    .min(MAX_TOKEN_AGE);
                tokens.insert(
                    region,
                    Cached {
                        secret: secret.clone(),
                        use_until: Instant::now() + age,
                    },
                );
                Some(secret)
            }
            Err(e) => {
                tracing::warn!(%region, error = %e, "cannot get an ECR token");
                None
            }
        }
    }

    /// Forgets the token of an ECR host, after a registry refused it. True if `host` is ECR.
    pub async fn renew(&self, host: &str) -> bool {
        let Some(region) = ecr_region(host) else {
            return false;
        };
        self.tokens.lock().await.remove(&region);
        tracing::info!(%region, "dropped the ECR token a registry refused; fetching a new one");
        true
    }

    async fn fetch(&self, region: &str) -> Result<(Secret, Option<Duration>), String> {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(Region::new(region.to_owned()));
        if let Some(endpoint) = &self.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        let client = aws_sdk_ecr::Client::new(&loader.load().await);
        let answer = client.get_authorization_token().send().await.map_err(|e| {
            format!(
                "GetAuthorizationToken failed: {}",
                aws_sdk_ecr::error::DisplayErrorContext(&e)
            )
        })?;
        let data = answer
            .authorization_data()
            .first()
            .ok_or("GetAuthorizationToken returned no authorization data")?;
        let token = data
            .authorization_token()
            .ok_or("GetAuthorizationToken returned no token")?;
        let secret = Secret::from_basic_token(token)
            .ok_or("the ECR token is not base64 of user:password")?;
        // A lifetime that is already over (test servers answer 2015-01-01) is unknown.
        let lifetime = data
            .expires_at()
            .and_then(|at| SystemTime::try_from(*at).ok())
            .and_then(|at| at.duration_since(SystemTime::now()).ok())
            .filter(|l| !l.is_zero());
        Ok((secret, lifetime))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ecr_hosts_have_a_region() {
        assert_eq!(
            ecr_region("123456789012.dkr.ecr.us-east-1.amazonaws.com").as_deref(),
            Some("us-east-1")
        );
        assert_eq!(
            ecr_region("123456789012.dkr.ecr.eu-west-3.amazonaws.com:5000").as_deref(),
            Some("eu-west-3")
        );
        for host in [
            "docker.io",
            "12345.dkr.ecr.us-east-1.amazonaws.com",
            "123456789012.dkr.ecr.amazonaws.com",
            "123456789012.dkr.ecr.us-east-1.amazonaws.com.evil.org",
        ] {
            assert_eq!(ecr_region(host), None, "{host}");
        }
    }
}
