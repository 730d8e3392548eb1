//! Cache-hit Build latency through the real service and gRPC (p50, p99), beside its peers in
//! the same run against the same loopback registry: the two keep-alive HEADs mk3's protocol
//! needs (resolve the base, look up the workspace image), an in-process lookup, and `skopeo
//! inspect`. Then a burst of identical cache-hit Builds at once, beside the client's own floor
//! (as many trivial RPCs at once: grpc.health Check) and the registry's (twice as many HEADs at
//! once from one async client). Then cache hits through a registry 20 ms away (a proxy
//! delays each manifest request) beside the two HEADs through the same proxy, at once and in
//! turn. Every ratio is against the best peer measured: the two HEADs asked at once (the
//! service asks them so for a reference it resolved before). Last, the CPU each process spends
//! per call (service, registry, the bench's client), for cache hits and for the HEADs at
//! once, back to back: what says whether a goal is bound by the machine's two cores.
//!
//! `cargo bench --bench cache_hit` (BENCH_CALLS: sequential rounds, each a Build call and one
//! call of each peer in turn, default 300; BENCH_BURST: calls at once, default 1000;
//! BENCH_BURST_ROUNDS: bursts of each kind, taken in turn and pooled, default 5; "all done"
//! is the slowest round).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

use std::time::{Duration, Instant};

use image_builder::proto::builder as pb;
use image_builder::registry::{NoCredentials, Registry};
use image_builder::steps::Untracked;
use image_builder_testkit::bench::{
    CpuMeter, env_or, head_manifest, manifest_url, ms, percentile, reference_build, service_config,
};
use image_builder_testkit::{self as testkit, BaseImage, LocalRegistry, Service};

async fn build(
    client: &mut pb::image_builder_client::ImageBuilderClient<tonic::transport::Channel>,
    reference: &str,
) -> Vec<pb::BuildResponse> {
    let mut stream = client
        .build(reference_build(reference))
        .await
        .unwrap()
        .into_inner();
    let mut all = Vec::new();
    while let Some(r) = stream.message().await.unwrap() {
        all.push(r);
    }
    all
}

async fn head(http: &reqwest::Client, url: &str) {
    assert!(head_manifest(http, url).await.unwrap(), "{url}: not found");
}

/// Runs `n` copies of `call` at once; the time each took, and the whole.
async fn burst<F, Fut>(n: usize, call: F) -> (Vec<Duration>, Duration)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let started = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let call = call(i);
            tokio::spawn(async move {
                let start = Instant::now();
                call.await;
                start.elapsed()
            })
        })
        .collect();
    let mut samples = Vec::with_capacity(n);
    for task in tasks {
        samples.push(task.await.unwrap());
    }
    (samples, started.elapsed())
}

/// The service under test, its repositories `{prefix}/…` in the registry at `registry`.
fn start_service(registry: &str, prefix: &str) -> Service {
    Service::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_image-builder")),
        service_config(registry, prefix),
    )
    .unwrap()
}

/// How far away the distant registry is: each manifest request waits this long at the proxy.
const DISTANT_MS: u64 = 20;

/// Cache hits through a registry [`DISTANT_MS`] away (the fault proxy delays every manifest
/// request), beside the two HEADs through the same proxy at once and in turn, `calls` rounds
/// (at least 20), one of each in turn: (Build times, HEADs at once, HEADs in turn).
async fn distant_registry(
    registry: &LocalRegistry,
    image: &BaseImage,
    calls: usize,
) -> (Vec<Duration>, Vec<Duration>, Vec<Duration>) {
    testkit::push_image(image, registry.addr(), "distant/busybox:1").unwrap();
    let proxy = image_builder_testkit::FaultProxy::start(registry.addr())
        .await
        .unwrap();
    proxy.delay("/manifests/", DISTANT_MS);
    let service = start_service(proxy.addr(), "distant");
    let base = format!("{}/distant/busybox:1", proxy.addr());
    let mut client = service.client().await.unwrap();
    let first = build(&mut client, &base).await;
    let workspace_ref = first.last().unwrap().r#ref.clone();
    let http = reqwest::Client::new();
    let (base_url, workspace_url) = (manifest_url(&base), manifest_url(&workspace_ref));
    let (mut hits, mut at_once, mut in_turn) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..calls.max(20) {
        let start = Instant::now();
        let r = build(&mut client, &base).await;
        hits.push(start.elapsed());
        assert_eq!(r.len(), 1, "every call is a cache hit");
        let start = Instant::now();
        tokio::join!(head(&http, &base_url), head(&http, &workspace_url));
        at_once.push(start.elapsed());
        let start = Instant::now();
        head(&http, &base_url).await;
        head(&http, &workspace_url).await;
        in_turn.push(start.elapsed());
    }
    (hits, at_once, in_turn)
}

/// CPU per call of the service, the registry and the bench's own client over `calls` cache
/// hits back to back, then of the registry and the client over as many HEAD pairs at once.
async fn cpu_per_call(
    service: &Service,
    registry: &LocalRegistry,
    base: &str,
    workspace_ref: &str,
    calls: usize,
) -> (Vec<f64>, Vec<f64>) {
    let mut client = service.client().await.unwrap();
    let service_pid = service.pid().unwrap();
    let meter = CpuMeter::start(&[service_pid, registry.pid(), std::process::id()]);
    for _ in 0..calls {
        build(&mut client, base).await;
    }
    let hits = meter.per_call_ms(calls);
    let http = reqwest::Client::new();
    let (base_url, workspace_url) = (manifest_url(base), manifest_url(workspace_ref));
    let meter = CpuMeter::start(&[registry.pid(), std::process::id()]);
    for _ in 0..calls {
        tokio::join!(head(&http, &base_url), head(&http, &workspace_url));
    }
    (hits, meter.per_call_ms(calls))
}

fn main() {
    let calls = env_or("BENCH_CALLS", 300);
    let burst_size = env_or("BENCH_BURST", 1000);
    let rounds = env_or("BENCH_BURST_ROUNDS", 5);
    let registry = LocalRegistry::start().unwrap();
    let image = BaseImage::busybox(0).unwrap();
    let base = testkit::push_image(&image, registry.addr(), "bench/busybox:1").unwrap();
    let service = start_service(registry.addr(), "bench");
    let runtime = tokio::runtime::Runtime::new().unwrap();

    // The cache hit and its two peers take turns, one call each in every round, so a machine
    // whose speed drifts within seconds moves all three alike.
    let (mut hits, mut heads, mut two_heads, mut heads_at_once, workspace_ref) =
        runtime.block_on(async {
            let mut client = service.client().await.unwrap();
            let first = build(&mut client, &base).await;
            let workspace_ref = first.last().unwrap().r#ref.clone();
            let registry_client = Registry::new(&[registry.addr().to_owned()]);
            // The peer mk3's protocol sets: the two round trips of a cache hit, as bare HEADs on
            // one keep-alive connection.
            let http = reqwest::Client::new();
            let (base_url, workspace_url) = (manifest_url(&base), manifest_url(&workspace_ref));
            head(&http, &base_url).await;
            let (mut hits, mut heads, mut two_heads, mut heads_at_once) = (
                Vec::with_capacity(calls),
                Vec::with_capacity(calls),
                Vec::with_capacity(calls),
                Vec::with_capacity(calls),
            );
            for _ in 0..calls {
                let start = Instant::now();
                let r = build(&mut client, &base).await;
                hits.push(start.elapsed());
                assert_eq!(r.len(), 1, "every call is a cache hit");

                let start = Instant::now();
                registry_client
                    .lookup(&workspace_ref, &NoCredentials, &Untracked)
                    .await
                    .unwrap()
                    .unwrap();
                heads.push(start.elapsed());

                let start = Instant::now();
                head(&http, &base_url).await;
                head(&http, &workspace_url).await;
                two_heads.push(start.elapsed());

                // The same two questions asked at once (the service asks them so when it has
                // resolved the reference before): what the registry allows at best.
                let start = Instant::now();
                tokio::join!(head(&http, &base_url), head(&http, &workspace_url));
                heads_at_once.push(start.elapsed());
            }
            (hits, heads, two_heads, heads_at_once, workspace_ref)
        });

    // The burst: identical cache hits at once over one channel, beside the client's floor
    // (trivial RPCs at once over the same kind of channel), in alternating rounds so both see
    // the machine in the same state; then the registry's own capacity (HEADs at once).
    let (mut burst_hits, burst_total, mut floor, floor_total, mut registry_burst, registry_total) =
        runtime.block_on(async {
            let client = service.client().await.unwrap();
            let channel = tonic::transport::Endpoint::from_shared(service.grpc_url())
                .unwrap()
                .connect()
                .await
                .unwrap();
            let health = tonic_health::pb::health_client::HealthClient::new(channel);
            let (mut hits, mut hits_total) = (Vec::new(), Duration::ZERO);
            let (mut floor, mut floor_total) = (Vec::new(), Duration::ZERO);
            for _ in 0..rounds {
                let (samples, total) = burst(burst_size, |_| {
                    let mut client = client.clone();
                    let base = base.clone();
                    async move {
                        let r = build(&mut client, &base).await;
                        assert_eq!(r.len(), 1, "every call is a cache hit");
                    }
                })
                .await;
                hits.extend(samples);
                hits_total = hits_total.max(total);
                let (samples, total) = burst(burst_size, |_| {
                    let mut health = health.clone();
                    async move {
                        health
                            .check(tonic_health::pb::HealthCheckRequest::default())
                            .await
                            .unwrap();
                    }
                })
                .await;
                floor.extend(samples);
                floor_total = floor_total.max(total);
            }
            let http = reqwest::Client::new();
            let url = manifest_url(&workspace_ref);
            let (heads, heads_total) = burst(burst_size * 2, |_| {
                let http = http.clone();
                let url = url.clone();
                async move { head(&http, &url).await }
            })
            .await;
            (hits, hits_total, floor, floor_total, heads, heads_total)
        });

    let distant = runtime.block_on(distant_registry(&registry, &image, calls / 10));
    let (cpu_hits, cpu_heads) = runtime.block_on(cpu_per_call(
        &service,
        &registry,
        &base,
        &workspace_ref,
        calls,
    ));

    let skopeo_runs = (calls / 10).max(10);
    let mut skopeo: Vec<Duration> = (0..skopeo_runs)
        .map(|_| {
            let start = Instant::now();
            testkit::skopeo_inspect(&workspace_ref).unwrap();
            start.elapsed()
        })
        .collect();

    let (h50, h99) = (percentile(&mut hits, 0.5), percentile(&mut hits, 0.99));
    let (r50, r99) = (percentile(&mut heads, 0.5), percentile(&mut heads, 0.99));
    let (s50, s99) = (percentile(&mut skopeo, 0.5), percentile(&mut skopeo, 0.99));
    let (t50, t99) = (
        percentile(&mut two_heads, 0.5),
        percentile(&mut two_heads, 0.99),
    );
    let (a50, a99) = (
        percentile(&mut heads_at_once, 0.5),
        percentile(&mut heads_at_once, 0.99),
    );
    println!("| measurement | runs | p50 ms | p99 ms | p50 vs skopeo |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| cache-hit Build via gRPC | {calls} | {:.2} | {:.2} | {:.2} |",
        ms(h50),
        ms(h99),
        ms(h50) / ms(s50)
    );
    println!(
        "| registry manifest lookup (oci-client, in process) | {calls} | {:.2} | {:.2} | {:.2} |",
        ms(r50),
        ms(r99),
        ms(r50) / ms(s50)
    );
    println!(
        "| two keep-alive HEADs (base, workspace), bare HTTP | {calls} | {:.2} | {:.2} | {:.2} |",
        ms(t50),
        ms(t99),
        ms(t50) / ms(s50)
    );
    println!(
        "| the same two HEADs at once, bare HTTP | {calls} | {:.2} | {:.2} | {:.2} |",
        ms(a50),
        ms(a99),
        ms(a50) / ms(s50)
    );
    println!(
        "| `skopeo inspect` of the same ref (new process each) | {skopeo_runs} | {:.2} | {:.2} | 1.00 |",
        ms(s50),
        ms(s99)
    );
    println!();
    println!(
        "cache-hit Build p50 / the two HEADs at once p50: {:.2}x (goal <= 1.2x; against the HEADs in turn: {:.2}x)",
        ms(h50) / ms(a50),
        ms(h50) / ms(t50)
    );
    println!();
    let (mut distant_hits, mut distant_at_once, mut distant_in_turn) = distant;
    let (d50, d99) = (
        percentile(&mut distant_hits, 0.5),
        percentile(&mut distant_hits, 0.99),
    );
    let (o50, o99) = (
        percentile(&mut distant_at_once, 0.5),
        percentile(&mut distant_at_once, 0.99),
    );
    let (e50, e99) = (
        percentile(&mut distant_in_turn, 0.5),
        percentile(&mut distant_in_turn, 0.99),
    );
    println!(
        "| a registry {DISTANT_MS} ms away (a proxy delays each manifest request) | runs | p50 ms | p99 ms |"
    );
    println!("|---|---:|---:|---:|");
    println!(
        "| cache-hit Build via gRPC | {} | {:.1} | {:.1} |",
        distant_hits.len(),
        ms(d50),
        ms(d99)
    );
    println!(
        "| two keep-alive HEADs (base, workspace) at once | {} | {:.1} | {:.1} |",
        distant_at_once.len(),
        ms(o50),
        ms(o99)
    );
    println!(
        "| the same two HEADs in turn | {} | {:.1} | {:.1} |",
        distant_in_turn.len(),
        ms(e50),
        ms(e99)
    );
    println!();
    println!(
        "distant registry: cache-hit Build p50 / the two HEADs at once p50: {:.2}x (goal <= 1.2x; against the HEADs in turn: {:.2}x)",
        ms(d50) / ms(o50),
        ms(d50) / ms(e50)
    );
    println!();
    println!(
        "| CPU per call, back to back ({calls} calls) | service ms | registry ms | bench client ms |"
    );
    println!("|---|---:|---:|---:|");
    println!(
        "| cache-hit Build | {:.3} | {:.3} | {:.3} |",
        cpu_hits[0], cpu_hits[1], cpu_hits[2]
    );
    println!(
        "| two HEADs at once | - | {:.3} | {:.3} |",
        cpu_heads[0], cpu_heads[1]
    );
    println!();
    let (b50, b99) = (
        percentile(&mut burst_hits, 0.5),
        percentile(&mut burst_hits, 0.99),
    );
    let (f50, f99) = (percentile(&mut floor, 0.5), percentile(&mut floor, 0.99));
    let (g50, g99) = (
        percentile(&mut registry_burst, 0.5),
        percentile(&mut registry_burst, 0.99),
    );
    println!("| burst, all at once | calls | p50 ms | p99 ms | all done ms |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| identical cache-hit Builds, one channel | {rounds} x {burst_size} | {:.1} | {:.1} | {:.1} |",
        ms(b50),
        ms(b99),
        ms(burst_total)
    );
    println!(
        "| grpc.health Check (the client's floor), one channel | {rounds} x {burst_size} | {:.1} | {:.1} | {:.1} |",
        ms(f50),
        ms(f99),
        ms(floor_total)
    );
    println!(
        "| registry HEADs (the registry's capacity), one async client | {} | {:.1} | {:.1} | {:.1} |",
        burst_size * 2,
        ms(g50),
        ms(g99),
        ms(registry_total)
    );
    println!();
    println!(
        "burst p99 / the client's floor p99: {:.2}x (goal <= 2x, and p99 < 50 ms)",
        ms(b99) / ms(f99)
    );
}
