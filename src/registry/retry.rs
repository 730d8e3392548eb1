//! Retries of transient registry faults (5xx, 429, resets, timeouts) with exponential backoff
//! and jitter (the backoff crate's policy) inside a per-step time budget, honouring
//! `Retry-After`. Final faults (401, 403, 404, invalid answers) are returned at once. Each
//! retry is one line of progress (the build log).
//!
//! oci-client does not hand response headers to its caller, so after a 429 the `Retry-After`
//! is read by a HEAD request of our own to the same resource; if that answers without the
//! header, the policy's backoff is used.

use std::future::Future;
use std::time::{Duration, Instant};

use backoff::backoff::Backoff;
use oci_client::Reference;
use tracing::Instrument;

use super::{Error, Progress, Registry};

/// How transient faults are retried.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Total time one step may spend retrying (`registry.retryBudget`).
    pub budget: Duration,
    /// The first wait.
    pub initial_interval: Duration,
    /// The longest wait between two attempts.
    pub max_interval: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            budget: Duration::from_secs(60),
            initial_interval: Duration::from_millis(250),
            max_interval: Duration::from_secs(8),
        }
    }
}

/// The resource a retried operation touches, for the `Retry-After` probe.
pub(super) enum Resource<'a> {
    /// A manifest by the reference's tag or digest.
    Manifest(&'a Reference),
    /// A blob of the reference's repository.
    Blob(&'a Reference, &'a str),
}

impl Resource<'_> {
    fn reference(&self) -> &Reference {
        match self {
            Resource::Manifest(r) | Resource::Blob(r, _) => r,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Resource::Manifest(_) => "registry manifest",
            Resource::Blob(..) => "registry blob",
        }
    }
}

impl Registry {
    /// Runs `op` until it succeeds, fails finally, or the budget is spent.
    pub(super) async fn retrying<T, F, Fut>(
        &self,
        resource: Resource<'_>,
        progress: &dyn Progress,
        mut op: F,
    ) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let policy = &self.retry;
        let mut backoff = backoff::ExponentialBackoffBuilder::new()
            .with_initial_interval(policy.initial_interval)
            .with_max_interval(policy.max_interval)
            .with_multiplier(2.0)
            .with_randomization_factor(0.5)
            .with_max_elapsed_time(Some(policy.budget))
            .build();
        let started = Instant::now();
        let mut attempts = 1;
        let host = resource.reference().resolve_registry().to_owned();
        loop {
            // One span and one count per request: a trace shows every retry.
            let span = tracing::info_span!(
                "registry",
                otel.name = resource.kind(),
                registry.host = %host,
                registry.repository = %resource.reference().repository(),
                registry.attempt = attempts,
                registry.outcome = tracing::field::Empty,
                registry.queued_ms = tracing::field::Empty,
            );
            let slot = self.limits.slot(&host, progress.lane()).await;
            span.record("registry.queued_ms", slot.waited.as_millis() as u64);
            let result = op().instrument(span.clone()).await;
            drop(slot);
            let outcome = match &result {
                Ok(_) => "ok",
                Err(err) if err.is_transient() => "transient_error",
                Err(_) => "error",
            };
            span.record("registry.outcome", outcome);
            if let Some(metrics) = &self.metrics {
                metrics.registry_request(&host, outcome, attempts > 1);
            }
            let err = match result {
                Ok(value) => return Ok(value),
                Err(err) if !err.is_transient() => return Err(err),
                Err(err) => err,
            };
            let hinted = match err {
                Error::RateLimited { .. } => self.retry_after(&resource).await,
                _ => None,
            };
            let wait = hinted.or_else(|| backoff.next_backoff());
            let exhausted = Error::RetriesExhausted {
                attempts,
                budget: policy.budget,
                last: Box::new(err.clone()),
            };
            let Some(wait) = wait else {
                return Err(exhausted);
            };
            if started.elapsed() + wait > policy.budget {
                return Err(exhausted);
            }
            progress
                .line(format!(
                    "registry fault on attempt {attempts}: {err}; retrying in {}{}",
                    humantime_serde::re::humantime::format_duration(round_ms(wait)),
                    if hinted.is_some() {
                        " (Retry-After)"
                    } else {
                        ""
                    }
                ))
                .await;
            tokio::time::sleep(wait).await;
            attempts += 1;
        }
    }

    /// The `Retry-After` (in seconds) a registry sends for `resource`, if it sends one.
    async fn retry_after(&self, resource: &Resource<'_>) -> Option<Duration> {
        let (reference, path) = match resource {
            Resource::Manifest(r) => (
                *r,
                format!("manifests/{}", r.digest().or(r.tag()).unwrap_or("latest")),
            ),
            Resource::Blob(r, digest) => (*r, format!("blobs/{digest}")),
        };
        let url = format!(
            "{}://{}/v2/{}/{path}",
            self.scheme(reference),
            reference.resolve_registry(),
            reference.repository()
        );
        let response = self.http.head(&url).send().await.ok()?;
        let seconds: u64 = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)?
            .to_str()
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Some(Duration::from_secs(seconds))
    }
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}
