//! `registry`: which registries speak plain HTTP, how long an answer may take, how long a step
//! retries transient faults, how many requests one host gets at once, and where ECR's API is.

use std::time::Duration;

use serde::Deserialize;

use super::{Error, MAX_COUNT, invalid};

/// Requests to one registry host at once unless `registry.requestsPerHost` says otherwise.
pub const DEFAULT_REGISTRY_REQUESTS_PER_HOST: usize = 32;

/// The `registry` group.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct RegistryConfig {
    /// Registries (`host:port`) spoken to over plain HTTP. Default: none.
    pub insecure: Vec<String>,
    /// Longest wait for a registry's answer (connecting, each read); past it the request is a
    /// transient fault. Default `60s`.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Time one step may spend retrying transient registry faults (5xx, 429, resets,
    /// timeouts) with exponential backoff. Default `60s`.
    #[serde(with = "humantime_serde")]
    pub retry_budget: Duration,
    /// Requests sent to one registry host at once; calls waiting on an answer go before
    /// builds' work (see `registry/limits.rs`). Default 32.
    pub requests_per_host: usize,
    /// Where ECR's API is, instead of AWS (a test server such as moto), when
    /// `enableAdditionalECRAuth` is on. Default: AWS.
    pub ecr_endpoint: Option<String>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            insecure: Vec::new(),
            timeout: Duration::from_secs(60),
            retry_budget: Duration::from_secs(60),
            requests_per_host: DEFAULT_REGISTRY_REQUESTS_PER_HOST,
            ecr_endpoint: None,
        }
    }
}

impl RegistryConfig {
    pub(super) fn validate(&self) -> Result<(), Error> {
        for (i, host) in self.insecure.iter().enumerate() {
            validate_host(&format!("registry.insecure[{i}]"), host)?;
        }
        if self.timeout.is_zero() {
            return Err(invalid(
                "registry.timeout",
                "must be longer than zero, e.g. \"60s\"",
            ));
        }
        if !(1..=MAX_COUNT).contains(&self.requests_per_host) {
            return Err(invalid(
                "registry.requestsPerHost",
                format!("must be between 1 and {MAX_COUNT}"),
            ));
        }
        Ok(())
    }
}

/// `host[:port]`, as registries are named in image references.
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
