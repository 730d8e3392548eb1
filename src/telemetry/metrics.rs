//! Every metric the service exports, with mk3's names where mk3 had them.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The `success` label of finished builds.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DoneLabels {
    /// "true" or "false", as mk3 writes it.
    pub success: String,
}

/// The service's metrics and the registry that renders them.
pub struct Metrics {
    registry: Registry,
    builds_started: Counter,
    builds_done: Family<DoneLabels, Counter>,
    build_duration: Histogram,
    cache_hits: Counter,
    orphan_jobs_deleted: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let builds_started = Counter::default();
        let builds_done = Family::<DoneLabels, Counter>::default();
        let build_duration = Histogram::new(exponential_buckets(1.0, 2.0, 14));
        let cache_hits = Counter::default();
        let orphan_jobs_deleted = Counter::default();
        // prometheus-client appends `_total` to counters.
        registry.register(
            "gitpod_image_builder_builds_started",
            "Builds started (mk3 name)",
            builds_started.clone(),
        );
        registry.register(
            "gitpod_image_builder_builds_done",
            "Builds finished, by success (mk3 name)",
            builds_done.clone(),
        );
        registry.register(
            "image_builder_build_duration_seconds",
            "Time from accepting a build to its end",
            build_duration.clone(),
        );
        registry.register(
            "image_builder_cache_hits",
            "Build requests answered from an existing workspace image",
            cache_hits.clone(),
        );
        registry.register(
            "image_builder_orphan_jobs_deleted",
            "Builder Jobs of this installation that no unfinished build knew, deleted by the sweep",
            orphan_jobs_deleted.clone(),
        );
        Self {
            registry,
            builds_started,
            builds_done,
            build_duration,
            cache_hits,
            orphan_jobs_deleted,
        }
    }

    /// A new build was accepted.
    pub fn build_started(&self) {
        self.builds_started.inc();
    }

    /// A build ended after `seconds`.
    pub fn build_done(&self, success: bool, seconds: f64) {
        self.builds_done
            .get_or_create(&DoneLabels {
                success: success.to_string(),
            })
            .inc();
        self.build_duration.observe(seconds);
    }

    /// A build request was answered from the cache.
    pub fn cache_hit(&self) {
        self.cache_hits.inc();
    }

    /// The orphan sweep deleted `n` builder Jobs.
    pub fn orphan_jobs_deleted(&self, n: usize) {
        self.orphan_jobs_deleted.inc_by(n as u64);
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
