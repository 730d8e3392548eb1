//! The service under many builds at once, through the real binary, gRPC and a loopback
//! registry, each figure beside its peer in the same run:
//! - **a burst of distinct builds**: BENCH_DISTINCT (500) Builds of distinct image refs at
//!   once: the time each waits for its `running` answer, while a prober asks for a cache hit
//!   of another ref every 20 ms (its latency meanwhile, beside the same prober on the idle
//!   service); the service's RSS idle and at its peak, per build in flight; beside it, the
//!   registry's own floor: the same two questions per Build (the source's manifest, then a
//!   workspace ref it lacks), all at once from one async HTTP client;
//! - **throughput**: BENCH_COPIES (2000) distinct reference builds from BENCH_CLIENTS (32)
//!   clients, each building one after another, vs `skopeo copy` of the same kind of image
//!   between the same repositories with as many copies at once (BENCH_SKOPEO copies).
//!
//! `cargo bench --bench scale` (needs skopeo, umoci and docker-registry: `scripts/setup.sh`).
//! The service runs with `builds.maxConcurrent` = BENCH_CLIENTS, so both sides copy as many
//! images at once, and `registry.requestsPerHost` = BENCH_PER_HOST (the service's default
//! unless set).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use image_builder::proto::builder as pb;
use image_builder_testkit::bench::{
    distinct_images, env_or, head_manifest, manifest_url, mib, ms, percentile, reference_build,
    service_config, status_kib,
};
use image_builder_testkit::{LocalRegistry, Service};
use tonic::transport::Channel;

type Client = pb::image_builder_client::ImageBuilderClient<Channel>;

/// One Build to its end: the time to its first answer, the whole time, the final status.
async fn build(client: &mut Client, reference: &str) -> (Duration, Duration, pb::BuildStatus) {
    let start = Instant::now();
    let mut stream = client
        .build(reference_build(reference))
        .await
        .unwrap()
        .into_inner();
    let mut first = None;
    let mut status = pb::BuildStatus::Unknown;
    while let Some(r) = stream.message().await.unwrap() {
        first.get_or_insert_with(|| start.elapsed());
        status = r.status();
        if status == pb::BuildStatus::DoneFailure {
            eprintln!("{reference} failed: {}", r.message);
        }
    }
    (first.unwrap(), start.elapsed(), status)
}

/// Cache hits of `reference` every 20 ms until `stop`: their latencies.
async fn probe(mut client: Client, reference: String, stop: Arc<AtomicBool>) -> Vec<Duration> {
    let mut samples = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let (_, took, status) = build(&mut client, &reference).await;
        assert_eq!(status, pb::BuildStatus::DoneSuccess);
        samples.push(took);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    samples
}

/// `skopeo copy` of each of `images` to `target_repository`, `at_once` copies at a time; the
/// time of all but the first, which is copied alone before the clock starts, so the layer the
/// images share is in the target repository before the copies at once look for it (as it is in
/// the service's workspace repository by then): docker-registry 2.8 answers a blob check that
/// races a concurrent copy's link of the same blob with 500.
fn skopeo_copies(images: &[String], target_repository: &str, at_once: usize) -> Duration {
    let copy = |i: usize| {
        let image = &images[i];
        let status = std::process::Command::new("skopeo")
            .args([
                "copy",
                "--quiet",
                "--src-tls-verify=false",
                "--dest-tls-verify=false",
                &format!("docker://{image}"),
                &format!("docker://{target_repository}:c{i}"),
            ])
            .status()
            .unwrap();
        assert!(status.success(), "skopeo copy {image}");
    };
    copy(0);
    let next = AtomicUsize::new(1);
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..at_once {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= images.len() {
                        break;
                    }
                    copy(i);
                }
            });
        }
    });
    start.elapsed()
}

fn row(what: &str, n: usize, samples: &mut [Duration]) {
    let (p50, p99) = (percentile(samples, 0.5), percentile(samples, 0.99));
    let max = samples.iter().max().copied().unwrap_or_default();
    println!(
        "| {what} | {n} | {:.1} | {:.1} | {:.1} |",
        ms(p50),
        ms(p99),
        ms(max)
    );
}

fn main() {
    let distinct = env_or("BENCH_DISTINCT", 500);
    let copies = env_or("BENCH_COPIES", 2000);
    let clients = env_or("BENCH_CLIENTS", 32);
    let skopeo = env_or("BENCH_SKOPEO", 320);
    let registry = LocalRegistry::start().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let total = 1 + distinct + copies + skopeo + 1;
    let made = Instant::now();
    let images = runtime
        .block_on(distinct_images(registry.addr(), "bench/many", total))
        .unwrap();
    eprintln!(
        "made {total} distinct images in {:.1} s",
        made.elapsed().as_secs_f64()
    );
    let (probe_ref, rest) = images.split_first().unwrap();
    let (burst_refs, rest) = rest.split_at(distinct);
    let (copy_refs, skopeo_refs) = rest.split_at(copies);

    let mut config = service_config(registry.addr(), "bench");
    config["builds"]["maxConcurrent"] = clients.into();
    config["registry"]["requestsPerHost"] = env_or(
        "BENCH_PER_HOST",
        image_builder::config::DEFAULT_REGISTRY_REQUESTS_PER_HOST,
    )
    .into();
    let service = Service::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_image-builder")),
        config,
    )
    .unwrap();
    let pid = service.pid().unwrap();

    // The prober's ref is built once, so every later Build of it is a cache hit.
    let (idle_probes, idle_kib) = runtime.block_on(async {
        let mut client = service.client().await.unwrap();
        build(&mut client, probe_ref).await;
        let stop = Arc::new(AtomicBool::new(false));
        let prober = tokio::spawn(probe(client, probe_ref.clone(), stop.clone()));
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.store(true, Ordering::Relaxed);
        (prober.await.unwrap(), status_kib(pid, "VmRSS:"))
    });

    // The burst: every Build at once, each on the same channel, the prober beside them.
    let (mut running, burst_done, mut busy_probes, peak_kib) = runtime.block_on(async {
        let client = service.client().await.unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let prober = tokio::spawn(probe(
            service.client().await.unwrap(),
            probe_ref.clone(),
            stop.clone(),
        ));
        let peak = Arc::new(AtomicU64::new(0));
        let sampler = {
            let (peak, stop) = (peak.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(status_kib(pid, "VmRSS:"), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        let start = Instant::now();
        let builds: Vec<_> = burst_refs
            .iter()
            .map(|reference| {
                let (mut client, reference) = (client.clone(), reference.clone());
                tokio::spawn(async move { build(&mut client, &reference).await })
            })
            .collect();
        let mut running = Vec::with_capacity(builds.len());
        for b in builds {
            let (first, _, status) = b.await.unwrap();
            assert_eq!(status, pb::BuildStatus::DoneSuccess);
            running.push(first);
        }
        let done = start.elapsed();
        stop.store(true, Ordering::Relaxed);
        sampler.await.unwrap();
        (
            running,
            done,
            prober.await.unwrap(),
            peak.load(Ordering::Relaxed),
        )
    });

    // The registry's floor for the burst: each Build's two questions, asked by one client with
    // nothing else running (the workspace refs asked about do not exist, as for new builds).
    let mut registry_pairs = runtime.block_on(async {
        let http = reqwest::Client::new();
        let pairs: Vec<_> = burst_refs
            .iter()
            .enumerate()
            .map(|(i, reference)| {
                let http = http.clone();
                let source = manifest_url(reference);
                let missing = format!(
                    "http://{}/v2/bench/workspace/manifests/floor-{i}",
                    registry.addr()
                );
                tokio::spawn(async move {
                    let start = Instant::now();
                    assert!(head_manifest(&http, &source).await.unwrap());
                    assert!(!head_manifest(&http, &missing).await.unwrap());
                    start.elapsed()
                })
            })
            .collect();
        let mut samples = Vec::with_capacity(pairs.len());
        for pair in pairs {
            samples.push(pair.await.unwrap());
        }
        samples
    });

    // Throughput: `clients` clients, each building the next ref as soon as its last ended.
    let service_copies = runtime.block_on(async {
        let client = service.client().await.unwrap();
        let next = Arc::new(AtomicUsize::new(0));
        let refs = Arc::new(copy_refs.to_vec());
        let start = Instant::now();
        let workers: Vec<_> = (0..clients)
            .map(|_| {
                let (mut client, next, refs) = (client.clone(), next.clone(), refs.clone());
                tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(reference) = refs.get(i) else { break };
                        let (_, _, status) = build(&mut client, reference).await;
                        assert_eq!(status, pb::BuildStatus::DoneSuccess);
                    }
                })
            })
            .collect();
        for w in workers {
            w.await.unwrap();
        }
        start.elapsed()
    });
    let by_skopeo = skopeo_copies(
        skopeo_refs,
        &format!("{}/bench/skopeo-target", registry.addr()),
        clients,
    );

    let mut idle_probes = idle_probes;
    println!("| {distinct} distinct Builds at once | calls | p50 ms | p99 ms | max ms |");
    println!("|---|---:|---:|---:|---:|");
    let (running_p99, floor_p99) = (
        ms(percentile(&mut running, 0.99)),
        ms(percentile(&mut registry_pairs, 0.99)),
    );
    row("time to the `running` answer", distinct, &mut running);
    row(
        "the registry alone: each Build's two HEADs, all at once",
        distinct,
        &mut registry_pairs,
    );
    let n = busy_probes.len();
    row("cache hit of another ref, meanwhile", n, &mut busy_probes);
    let n = idle_probes.len();
    row("cache hit of that ref, service idle", n, &mut idle_probes);
    println!();
    println!(
        "all {distinct} done in {:.1} s; service RSS {:.1} MiB idle, {:.1} MiB at the peak: {:.1} KiB per build in flight",
        burst_done.as_secs_f64(),
        mib(idle_kib),
        mib(peak_kib),
        peak_kib.saturating_sub(idle_kib) as f64 / distinct as f64
    );
    println!();
    println!(
        "`running` p99 / the registry's own p99 for the same questions: {:.2}x (goal: p99 < 1 s)",
        running_p99 / floor_p99
    );
    println!();
    let ours = copies as f64 / service_copies.as_secs_f64();
    let theirs = skopeo as f64 / by_skopeo.as_secs_f64();
    println!("| distinct reference builds, {clients} at once | builds | s | builds/s |");
    println!("|---|---:|---:|---:|");
    println!(
        "| image-builder (Build to its end, gRPC) | {copies} | {:.1} | {ours:.1} |",
        service_copies.as_secs_f64()
    );
    println!(
        "| `skopeo copy` (a process each) | {skopeo} | {:.1} | {theirs:.1} |",
        by_skopeo.as_secs_f64()
    );
    println!();
    println!(
        "image-builder / skopeo copy: {:.2}x (goal >= 5x)",
        ours / theirs
    );
}
