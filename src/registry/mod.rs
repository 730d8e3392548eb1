//! The registry adapter: resolves references to digests, looks up images, and copies an image
//! from one reference to another, over oci-client. The only module that speaks the OCI
//! distribution protocol.
//!
//! Files: this one (the client, resolving and looking up), `copy.rs` (copying an image),
//! `session.rs` (a client per credential), `attempts.rs` (one try of each request),
//! `retry.rs`, `coalesce.rs` (identical questions in flight), `limits.rs` (requests per host),
//! `known.rs` (content seen lately), `anonymous.rs` (registries that need no credentials),
//! `steps.rs` (the build steps' side).

mod anonymous;
mod attempts;
mod coalesce;
mod copy;
mod error;
mod known;
mod limits;
mod retry;
mod session;
mod steps;

use oci_client::manifest::{
    IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE,
};

pub use crate::credentials::{Keychain, NoCredentials};
use crate::steps::Progress;
use crate::telemetry::Metrics;
use oci_client::{Client, Reference};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use attempts::{lookup_once, resolve_once};
use coalesce::{Coalescer, Question};
pub use error::Error;
use limits::DEFAULT_PER_HOST;
use limits::HostLimits;
use retry::Resource;
pub use retry::RetryPolicy;
use session::Session;

/// Media types we accept when resolving: single-platform manifests and indexes.
const RESOLVE_MEDIA_TYPES: &[&str] = &[
    OCI_IMAGE_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

/// A registry client for every registry the service talks to.
pub struct Registry {
    http: reqwest::Client,
    insecure: Vec<String>,
    retry: RetryPolicy,
    timeout: Duration,
    metrics: Option<Arc<Metrics>>,
    /// One client per credential (by fingerprint), so connections and registry tokens are
    /// reused across builds; at most [`MAX_CLIENTS`], then started afresh.
    clients: parking_lot::Mutex<HashMap<[u8; 32], Client>>,
    /// Identical lookups and resolutions in flight.
    lookups: Coalescer<Option<String>>,
    resolutions: Coalescer<String>,
    /// Identical blob copies (one blob into one repository) in flight.
    blob_copies: Coalescer<()>,
    /// Requests in flight per host and lane.
    limits: HostLimits,
    /// Registries that need no credentials.
    open_hosts: anonymous::OpenHosts,
    /// Manifests by digest and repositories' blobs, seen lately.
    known: known::KnownContent,
    /// References parsed lately: parsing is a regular-expression match that cost a cache hit
    /// about a sixth of its CPU, and the same few references come back all the time.
    parsed: quick_cache::sync::Cache<String, Reference>,
}

/// Parsed references kept, at most (a few hundred bytes each).
const PARSED_REFERENCES: usize = 1024;

/// The parts of an index resolution needs.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestKind {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<oci_client::manifest::ImageIndexEntry>>,
}

/// Parses a reference the docker way (`alpine` is `docker.io/library/alpine:latest`).
pub fn parse_reference(reference: &str) -> Result<Reference, Error> {
    reference
        .parse()
        .map_err(|e: oci_client::ParseError| Error::BadReference {
            reference: reference.to_owned(),
            detail: e.to_string(),
        })
}

/// `registry/repository@digest`: the pinned form mk3 answers with (of a blob, too: which
/// repository holds it).
fn pinned(reference: &Reference, digest: &str) -> String {
    format!(
        "{}/{}@{}",
        reference.registry(),
        reference.repository(),
        digest
    )
}

impl Registry {
    /// A client that speaks plain HTTP to `insecure_registries` and HTTPS to the rest, with
    /// default retries and timeouts.
    pub fn new(insecure_registries: &[String]) -> Self {
        Self::with_policy(
            insecure_registries,
            RetryPolicy::default(),
            Duration::from_secs(60),
        )
    }

    /// A client with the given retry policy; `timeout` bounds each wait for a registry's
    /// answer (connecting, and each read), so a stalled registry is a transient fault.
    pub fn with_policy(
        insecure_registries: &[String],
        retry: RetryPolicy,
        timeout: Duration,
    ) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .timeout(timeout)
            .build()
            .unwrap_or_default();
        Self {
            http,
            insecure: insecure_registries.to_vec(),
            retry,
            timeout,
            metrics: None,
            clients: parking_lot::Mutex::new(HashMap::new()),
            lookups: Coalescer::default(),
            resolutions: Coalescer::default(),
            blob_copies: Coalescer::default(),
            limits: HostLimits::new(DEFAULT_PER_HOST),
            open_hosts: anonymous::OpenHosts::default(),
            known: known::KnownContent::default(),
            parsed: quick_cache::sync::Cache::new(PARSED_REFERENCES),
        }
    }

    /// [`parse_reference`], remembering the last [`PARSED_REFERENCES`] references parsed.
    /// What a reference means does not change, so the cache is never stale.
    fn parse(&self, reference: &str) -> Result<Reference, Error> {
        if let Some(parsed) = self.parsed.get(reference) {
            return Ok(parsed);
        }
        let parsed = parse_reference(reference)?;
        self.parsed.insert(reference.to_owned(), parsed.clone());
        Ok(parsed)
    }

    /// Sends at most `per_host` requests at once to one registry host for builds, and as
    /// many for callers waiting on an answer; more wait their turn, first come first served.
    pub fn with_requests_per_host(mut self, per_host: usize) -> Self {
        self.limits = HostLimits::new(per_host);
        self
    }

    /// Counts every registry request in `metrics` (by host, outcome and whether it was a
    /// retry).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Resolves a reference to `registry/repository@sha256:…`; an index resolves to its
    /// linux/amd64 manifest. Transient faults are retried. A manifest read on the way is kept
    /// for the copy that may follow.
    pub async fn resolve(
        &self,
        reference: &str,
        keychain: &dyn Keychain,
        progress: &dyn Progress,
    ) -> Result<String, Error> {
        self.ask_manifest(
            &self.resolutions,
            "resolve",
            reference,
            keychain,
            progress,
            resolve_once,
        )
        .await
    }

    /// Runs `op`; if a registry refused a credential that can be renewed (an ECR token),
    /// renews it and runs `op` once more.
    async fn renewing<T, F, Fut>(
        &self,
        keychain: &dyn Keychain,
        hosts: &[&str],
        progress: &dyn Progress,
        op: F,
    ) -> Result<T, Error>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, Error>>,
    {
        match op().await {
            Err(err @ Error::Unauthorized { .. }) => {
                let mut renewed = false;
                for host in hosts {
                    renewed |= keychain.renew(host).await;
                }
                if !renewed {
                    return Err(err);
                }
                progress
                    .line(format!(
                        "{err}; renewed the registry token and trying once more"
                    ))
                    .await;
                op().await
            }
            other => other,
        }
    }

    /// The manifest digest of an image, or `None` if the registry does not have it.
    /// Transient faults are retried.
    pub async fn lookup(
        &self,
        reference: &str,
        keychain: &dyn Keychain,
        progress: &dyn Progress,
    ) -> Result<Option<String>, Error> {
        self.ask_manifest(
            &self.lookups,
            "lookup",
            reference,
            keychain,
            progress,
            lookup_once,
        )
        .await
    }

    /// Asks `once` about `reference`'s manifest with the keychain's pull credential: retried,
    /// shared with identical questions in flight, asked again once after a renewed credential.
    async fn ask_manifest<T, F>(
        &self,
        in_flight: &Coalescer<T>,
        kind: &'static str,
        reference: &str,
        keychain: &dyn Keychain,
        progress: &dyn Progress,
        once: F,
    ) -> Result<T, Error>
    where
        T: Clone,
        F: AsyncFn(&Registry, &Session, &Reference, &str) -> Result<T, Error>,
    {
        let image = self.parse(reference)?;
        self.renewing(keychain, &[image.registry()], progress, || async {
            let secret = keychain.pull(image.registry()).await;
            let question = Question::new(kind, &image.whole(), secret.as_ref(), progress.lane());
            in_flight
                .answer(question, || async {
                    let session = self.session(&image, secret.as_ref()).await;
                    self.retrying(Resource::Manifest(&image), progress, || {
                        once(self, &session, &image, reference)
                    })
                    .await
                })
                .await
        })
        .await
    }
}

/// The error of a failed request about `reference`, classified (transient or not).
fn fail(reference: &Reference, what: &str, err: oci_client::errors::OciDistributionError) -> Error {
    Error::classify(reference.registry(), what, err)
}

#[cfg(test)]
mod tests {
    use super::{Error, Registry, parse_reference};

    #[test]
    fn a_remembered_reference_reads_as_a_fresh_parse_and_a_bad_one_is_refused_each_time() {
        let registry = Registry::new(&[]);
        for reference in ["alpine", "r.example:5000/a/b:1", "r.example/a@sha256:00"] {
            let fresh = parse_reference(reference).map(|r| r.whole());
            assert_eq!(
                registry.parse(reference).map(|r| r.whole()).ok(),
                fresh.clone().ok()
            );
            assert_eq!(
                registry.parse(reference).map(|r| r.whole()).ok(),
                fresh.ok()
            );
        }
        assert_eq!(
            registry.parse("alpine").unwrap().whole(),
            "docker.io/library/alpine:latest"
        );
        for _ in 0..2 {
            assert!(matches!(
                registry.parse("Not A Reference"),
                Err(Error::BadReference { .. })
            ));
        }
    }
}
