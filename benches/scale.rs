//! The service under many builds at once, through the real binary, gRPC and a loopback
//! registry, each figure beside its peer in the same run:
//! - **a burst of distinct builds**: BENCH_DISTINCT (500) Builds of distinct image refs at
//!   once: the time each waits for its `running` answer, while a prober asks for a cache hit
//!   of another ref every 20 ms (its latency meanwhile, beside the same prober on the idle
//!   service); the service's RSS idle and at its peak, per build in flight; beside it, the
//!   registry's own floor: the same two questions per Build (the source's manifest, then a
//!   workspace ref it lacks), all at once from one async HTTP client;
//! - **throughput**: BENCH_COPIES (2000) distinct reference builds from BENCH_CLIENTS (32)
//!   clients, each building one after another, in rounds taken in turn with its peer: the
//!   same registry requests a reference build makes (the source's manifest, the workspace
//!   ref it lacks, a mount of the image's config, its layers once known in the target, the
//!   manifest's push), as many copies at once, from one process (one async HTTP client: the
//!   registry's own floor for the work); and, printed for reference, `skopeo copy` with as
//!   many copies at once (BENCH_SKOPEO copies, a process each).
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
    CpuMeter, distinct_images, env_or, head_manifest, manifest_url, mib, ms, percentile,
    reference_build, service_config, status_kib,
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

/// The registry requests of a reference build, made by hand for each of `images` into
/// `target_repository`, `at_once` copies at a time from one HTTP client: the source's
/// manifest, a HEAD of the target tag it lacks, a mount of the config and of each layer not
/// yet mounted into the target (as the service remembers the blobs a repository holds), and
/// the manifest's push. Returns the time taken and the requests made.
async fn registry_copies(
    registry: &str,
    images: &[String],
    target_repository: &str,
    at_once: usize,
) -> (Duration, usize) {
    use futures::StreamExt;
    type Once = Arc<tokio::sync::OnceCell<()>>;
    let http = reqwest::Client::new();
    // Each layer is mounted once, by the first copy that needs it, and the others wait for
    // it, as the service shares a blob copy in flight (docker-registry 2.8 loses a blob
    // mounted into one repository many times at once).
    let layers: Arc<std::sync::Mutex<std::collections::HashMap<String, Once>>> = Arc::default();
    let requests = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mount = |http: reqwest::Client, digest: String, repository: String| async move {
        let mounted = http
            .post(format!(
                "http://{registry}/v2/{target_repository}/blobs/uploads/?mount={digest}&from={repository}"
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(
            mounted.status(),
            reqwest::StatusCode::CREATED,
            "mount {digest}"
        );
    };
    futures::stream::iter(images)
        .for_each_concurrent(at_once, |image| {
            let (http, layers, requests) = (http.clone(), layers.clone(), requests.clone());
            async move {
                let (repository, tag) = image
                    .split_once('/')
                    .and_then(|(_, path)| path.rsplit_once(':'))
                    .unwrap();
                let (manifest, media_type) =
                    image_builder_testkit::bench::manifest_of(&http, registry, repository, tag)
                        .await
                        .unwrap();
                // The source's tag is unique among all the bench's images.
                let target_tag = format!("copy-{tag}");
                let target =
                    format!("http://{registry}/v2/{target_repository}/manifests/{target_tag}");
                assert!(!head_manifest(&http, &target).await.unwrap());
                let config = manifest["config"]["digest"].as_str().unwrap().to_owned();
                mount(http.clone(), config, repository.to_owned()).await;
                let mut made = 4;
                for layer in manifest["layers"].as_array().unwrap() {
                    let digest = layer["digest"].as_str().unwrap().to_owned();
                    let once = layers
                        .lock()
                        .unwrap()
                        .entry(digest.clone())
                        .or_default()
                        .clone();
                    once.get_or_init(|| async {
                        made += 1;
                        mount(http.clone(), digest, repository.to_owned()).await;
                    })
                    .await;
                }
                let pushed = http
                    .put(&target)
                    .header("Content-Type", media_type)
                    .body(serde_json::to_vec(&manifest).unwrap())
                    .send()
                    .await
                    .unwrap();
                assert!(
                    pushed.status().is_success(),
                    "push {target}: {}",
                    pushed.status()
                );
                requests.fetch_add(made, Ordering::Relaxed);
            }
        })
        .await;
    (start.elapsed(), requests.load(Ordering::Relaxed))
}

/// The registry requests the service has made so far (all hosts, outcomes and retries).
async fn service_requests(service: &Service) -> f64 {
    let text = reqwest::get(service.metrics_url())
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("image_builder_registry_requests_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
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
    let rounds = env_or("BENCH_ROUNDS", 4).max(1);
    let registry = LocalRegistry::start().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let total = 1 + distinct + 2 * copies + skopeo + 1;
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
    let (copy_refs, rest) = rest.split_at(copies);
    let (peer_refs, skopeo_refs) = rest.split_at(copies);

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

    // Throughput: `clients` clients, each building the next ref as soon as its last ended,
    // in rounds taken in turn with the same registry requests made by hand.
    let (mut service_copies, mut peer_copies) = (Duration::ZERO, Duration::ZERO);
    let (mut service_made, mut peer_made) = (0.0, 0);
    // CPU spent by the service, the registry and this process (the clients) during each side's
    // rounds: what says whether the two cores bound the rate.
    let (mut service_cpu, mut peer_cpu) = (vec![0.0; 3], vec![0.0; 2]);
    let per_round = copies.div_ceil(rounds);
    for (ours, theirs) in copy_refs.chunks(per_round).zip(peer_refs.chunks(per_round)) {
        let meter = CpuMeter::start(&[pid, registry.pid(), std::process::id()]);
        let (took, made) = runtime.block_on(async {
            let client = service.client().await.unwrap();
            let before = service_requests(&service).await;
            let next = Arc::new(AtomicUsize::new(0));
            let refs = Arc::new(ours.to_vec());
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
            let took = start.elapsed();
            (took, service_requests(&service).await - before)
        });
        for (total, used) in service_cpu.iter_mut().zip(meter.per_call_ms(copies)) {
            *total += used;
        }
        service_copies += took;
        service_made += made;
        let meter = CpuMeter::start(&[registry.pid(), std::process::id()]);
        let (took, made) = runtime.block_on(registry_copies(
            registry.addr(),
            theirs,
            "bench/peer-target",
            clients,
        ));
        for (total, used) in peer_cpu.iter_mut().zip(meter.per_call_ms(copies)) {
            *total += used;
        }
        peer_copies += took;
        peer_made += made;
    }
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
    let floor = copies as f64 / peer_copies.as_secs_f64();
    let theirs = skopeo as f64 / by_skopeo.as_secs_f64();
    println!(
        "| distinct reference builds, {clients} at once, {rounds} rounds in turn | builds | s | builds/s | registry requests per build |"
    );
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| image-builder (Build to its end, gRPC) | {copies} | {:.1} | {ours:.1} | {:.2} |",
        service_copies.as_secs_f64(),
        service_made / copies as f64
    );
    println!(
        "| the same registry requests by hand, one process | {copies} | {:.1} | {floor:.1} | {:.2} |",
        peer_copies.as_secs_f64(),
        peer_made as f64 / copies as f64
    );
    println!(
        "| `skopeo copy` (a process each), for reference | {skopeo} | {:.1} | {theirs:.1} | - |",
        by_skopeo.as_secs_f64()
    );
    println!();
    println!(
        "image-builder / the same registry requests by hand: {:.2}x (against skopeo copy: {:.2}x)",
        ours / floor,
        ours / theirs
    );
    println!();
    println!(
        "| CPU per build, {clients} at once | service ms | registry ms | clients ms | sum ms | 2 cores' ms per build at that rate |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    println!(
        "| image-builder | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
        service_cpu[0],
        service_cpu[1],
        service_cpu[2],
        service_cpu.iter().sum::<f64>(),
        2000.0 / ours
    );
    println!(
        "| the same registry requests by hand | - | {:.2} | {:.2} | {:.2} | {:.2} |",
        peer_cpu[0],
        peer_cpu[1],
        peer_cpu.iter().sum::<f64>(),
        2000.0 / floor
    );
}
