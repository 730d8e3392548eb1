//! Every metric the service exports, with mk3's names where mk3 had them. Label values that
//! come from clients (registry hosts, gRPC methods) are bounded: past [`MAX_LABEL_VALUES`]
//! distinct values, new ones are counted as `other`, so no client can grow the exposition.

mod labels;

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use labels::Bounded;
pub use labels::{
    DoneLabels, GrpcLabels, GrpcMethodLabels, MAX_LABEL_VALUES, RegistryLabels, StateLabels,
};

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// `metric`, registered in `registry` as `name` with `help`.
fn registered<M>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M
where
    M: prometheus_client::registry::Metric + Clone,
{
    registry.register(name, help, metric.clone());
    metric
}

fn state_durations() -> Histogram {
    Histogram::new(exponential_buckets(0.05, 2.0, 16))
}

fn call_durations() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 18))
}

/// The service's metrics and the registry that renders them.
pub struct Metrics {
    registry: Registry,
    builds_started: Counter,
    builds_done: Family<DoneLabels, Counter>,
    build_duration: Histogram,
    cache_hits: Counter,
    orphan_jobs_deleted: Counter,
    layer_cache_bytes: Gauge,
    layer_cache_evicted_images: Counter,
    layer_cache_evicted_bytes: Counter,
    builds_in_state: Family<StateLabels, Gauge>,
    queue_depth: Gauge,
    state_duration: HistogramFamily<StateLabels>,
    journal_commit_seconds: Histogram,
    journal_commit_appends: Histogram,
    journal_commit_records: Histogram,
    registry_requests: Family<RegistryLabels, Counter>,
    registry_hosts: Bounded,
    log_bytes: Counter,
    log_listeners: Gauge,
    heap_bytes: Gauge,
    grpc_handled: Family<GrpcLabels, Counter>,
    grpc_seconds: HistogramFamily<GrpcMethodLabels>,
    grpc_methods: Bounded,
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
        // prometheus-client appends `_total` to counters.
        Self {
            builds_started: registered(
                &mut registry,
                "gitpod_image_builder_builds_started",
                "Builds started (mk3 name)",
                Counter::default(),
            ),
            builds_done: registered(
                &mut registry,
                "gitpod_image_builder_builds_done",
                "Builds finished, by success (mk3 name)",
                Family::<DoneLabels, Counter>::default(),
            ),
            build_duration: registered(
                &mut registry,
                "image_builder_build_duration_seconds",
                "Time from accepting a build to its end",
                Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            ),
            cache_hits: registered(
                &mut registry,
                "image_builder_cache_hits",
                "Build requests answered from an existing workspace image",
                Counter::default(),
            ),
            orphan_jobs_deleted: registered(
                &mut registry,
                "image_builder_orphan_jobs_deleted",
                "Builder Jobs of this installation that no unfinished build knew, deleted by the sweep",
                Counter::default(),
            ),
            layer_cache_bytes: registered(
                &mut registry,
                "image_builder_layer_cache_bytes",
                "Disk the local executor's layer cache takes, as last measured",
                Gauge::default(),
            ),
            layer_cache_evicted_images: registered(
                &mut registry,
                "image_builder_layer_cache_evicted_images",
                "Images (build steps, base images) removed from the layer cache to keep it under executor.layerCacheSize",
                Counter::default(),
            ),
            layer_cache_evicted_bytes: registered(
                &mut registry,
                "image_builder_layer_cache_evicted_bytes",
                "Disk freed by removing images from the layer cache",
                Counter::default(),
            ),
            builds_in_state: registered(
                &mut registry,
                "image_builder_builds",
                "Builds in each unfinished state (queued, resolving, checking_cache, building, pushing) right now",
                Family::<StateLabels, Gauge>::default(),
            ),
            queue_depth: registered(
                &mut registry,
                "image_builder_queue_depth",
                "Builds waiting for a build slot (builds.maxConcurrent)",
                Gauge::default(),
            ),
            state_duration: registered(
                &mut registry,
                "image_builder_state_duration_seconds",
                "Time builds spent in each state, observed as they leave it",
                Family::new_with_constructor(state_durations),
            ),
            journal_commit_seconds: registered(
                &mut registry,
                "image_builder_journal_commit_duration_seconds",
                "Time of one group commit of the journal, its fdatasync included",
                Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            ),
            journal_commit_appends: registered(
                &mut registry,
                "image_builder_journal_commit_appends",
                "Appends (transitions, log chunks) carried by one group commit",
                Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            ),
            journal_commit_records: registered(
                &mut registry,
                "image_builder_journal_commit_records",
                "Records written by one group commit",
                Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            ),
            registry_requests: registered(
                &mut registry,
                "image_builder_registry_requests",
                "Registry requests (manifests, blob copies), by host, outcome and retry",
                Family::<RegistryLabels, Counter>::default(),
            ),
            log_bytes: registered(
                &mut registry,
                "image_builder_log_bytes",
                "Build log bytes made durable in the journal",
                Counter::default(),
            ),
            log_listeners: registered(
                &mut registry,
                "image_builder_log_listeners",
                "Log and journal streams open right now (mk3 Logs, ops Journal)",
                Gauge::default(),
            ),
            heap_bytes: registered(
                &mut registry,
                "image_builder_heap_bytes",
                "Bytes the allocator has handed out and not had back, read at each scrape (glibc's mallinfo2; the resident size also counts what it keeps free)",
                Gauge::default(),
            ),
            grpc_handled: registered(
                &mut registry,
                "image_builder_grpc_server_handled",
                "gRPC calls finished, by service, method and status code",
                Family::<GrpcLabels, Counter>::default(),
            ),
            grpc_seconds: registered(
                &mut registry,
                "image_builder_grpc_server_handling_seconds",
                "Time from a gRPC call's arrival to its end (streams included)",
                Family::new_with_constructor(call_durations),
            ),
            registry_hosts: Bounded::default(),
            grpc_methods: Bounded::default(),
            registry,
        }
    }

    /// A build entered unfinished state `state`.
    pub fn state_entered(&self, state: &str) {
        self.builds_in_state
            .get_or_create(&StateLabels {
                state: state.to_owned(),
            })
            .inc();
    }

    /// A build left unfinished state `state` after `spent` in it.
    pub fn state_left(&self, state: &str, spent: Duration) {
        let labels = StateLabels {
            state: state.to_owned(),
        };
        self.builds_in_state.get_or_create(&labels).dec();
        self.state_duration
            .get_or_create(&labels)
            .observe(spent.as_secs_f64());
    }

    /// `n` builds wait for a slot.
    pub fn queue_depth(&self, n: usize) {
        self.queue_depth.set(n as i64);
    }

    /// A registry request to `host` ended with `outcome`.
    pub fn registry_request(&self, host: &str, outcome: &str, retry: bool) {
        self.registry_requests
            .get_or_create(&RegistryLabels {
                host: self.registry_hosts.admit(host),
                outcome: outcome.to_owned(),
                retry: retry.to_string(),
            })
            .inc();
    }

    /// A log or journal stream opened (`1`) or closed (`-1`).
    pub fn listeners_changed(&self, by: i64) {
        self.log_listeners.inc_by(by);
    }

    /// A gRPC call to `path` (`/service/method`) ended with `code` after `took`.
    pub fn grpc_handled(&self, path: &str, code: tonic::Code, took: Duration) {
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or(("other", "other"));
        let admitted = self.grpc_methods.admit(&format!("{service}/{method}"));
        let (service, method) = admitted.split_once('/').unwrap_or(("other", "other"));
        let method_labels = GrpcMethodLabels {
            grpc_service: service.to_owned(),
            grpc_method: method.to_owned(),
        };
        self.grpc_seconds
            .get_or_create(&method_labels)
            .observe(took.as_secs_f64());
        self.grpc_handled
            .get_or_create(&GrpcLabels {
                grpc_service: method_labels.grpc_service,
                grpc_method: method_labels.grpc_method,
                grpc_code: format!("{code:?}"),
            })
            .inc();
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

    /// The layer cache takes `bytes` on disk.
    pub fn layer_cache_size(&self, bytes: u64) {
        self.layer_cache_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// A trim removed `images` from the layer cache, freeing `bytes`.
    pub fn layer_cache_evicted(&self, images: usize, bytes: u64) {
        self.layer_cache_evicted_images.inc_by(images as u64);
        self.layer_cache_evicted_bytes.inc_by(bytes);
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        if let Some(bytes) = heap_in_use() {
            self.heap_bytes
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Bytes in use on the heap: glibc's small blocks handed out plus its mmapped large ones.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn heap_in_use() -> Option<u64> {
    // SAFETY: mallinfo2 only reads the allocator's counters.
    let info = unsafe { libc::mallinfo2() };
    Some((info.uordblks + info.hblkhd) as u64)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn heap_in_use() -> Option<u64> {
    None
}

impl image_builder_state::journal::CommitObserver for Metrics {
    fn committed(&self, appends: usize, records: usize, took: Duration) {
        self.journal_commit_seconds.observe(took.as_secs_f64());
        self.journal_commit_appends.observe(appends as f64);
        self.journal_commit_records.observe(records as f64);
    }

    fn log_written(&self, bytes: u64) {
        self.log_bytes.inc_by(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_driven_label_values_are_bounded() {
        let metrics = Metrics::new();
        for i in 0..(MAX_LABEL_VALUES * 2) {
            metrics.registry_request(&format!("registry-{i}.example"), "ok", false);
            metrics.grpc_handled(
                &format!("/x.Y/Method{i}"),
                tonic::Code::Unimplemented,
                Duration::ZERO,
            );
        }
        let text = metrics.render();
        let hosts = text
            .lines()
            .filter(|l| l.starts_with("image_builder_registry_requests_total{"))
            .count();
        assert_eq!(hosts, MAX_LABEL_VALUES + 1, "{text}");
        assert!(text.contains(r#"host="other""#), "{text}");
        let methods = text
            .lines()
            .filter(|l| l.starts_with("image_builder_grpc_server_handled_total{"))
            .count();
        assert_eq!(methods, MAX_LABEL_VALUES + 1, "{text}");
    }
}
