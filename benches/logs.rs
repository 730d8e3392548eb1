//! Build output at volume, through the real service, each figure beside its peer in the same
//! run:
//! - a Dockerfile whose RUN prints 200,000 lines (about 12.6 MB), built and pushed through
//!   gRPC, vs `buildah bud` + `buildah push` by hand (same storage and isolation options,
//!   output to a file), the median of 5 runs each, alternating (which side goes first changes
//!   every run), every run of either side the same Dockerfile with an `ENV` of its own;
//!   then the same for a cold build with quiet output;
//! - the store's growth for that build vs the log's bytes;
//! - one Logs listener replaying a 16 MiB log vs reading the same bytes from a file;
//! - 200 Logs listeners on that log that never read (one connection each): the service's RSS
//!   growth, and cache-hit Build latency meanwhile;
//! - one output line of 300 MB with no newline: the service's peak RSS above idle.
//!
//! `cargo bench --bench logs` (needs root, buildah, docker-registry: `scripts/setup.sh`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

use std::path::Path;
use std::time::{Duration, Instant};

use image_builder::proto::builder as pb;
use image_builder::proto::builder::image_builder_client::ImageBuilderClient;
use image_builder_testkit::bench::{
    ByHand, DockerfileBench, buildah_by_hand, dockerfile_build, du_bytes, mib, percentile,
    status_kib,
};
use image_builder_testkit::{self as testkit, GitRepo, Service};
use tonic::transport::Channel;

fn dockerfile_request(uri: &str, version: &str) -> pb::BuildRequest {
    dockerfile_build(uri, version, "Dockerfile", ".")
}

/// Builds to the end; returns the build id and the final answer.
async fn build(
    client: &mut ImageBuilderClient<Channel>,
    request: pb::BuildRequest,
) -> (String, pb::BuildResponse) {
    image_builder_testkit::bench::build_to_end(client, request).await
}

async fn replay(client: &mut ImageBuilderClient<Channel>, id: &str) -> usize {
    let request = pb::LogsRequest {
        build_id: id.into(),
        ..Default::default()
    };
    testkit::read_logs(client, request).await.unwrap().len()
}

/// Runs of the 200k-line build on each side.
const RUNS: usize = 5;

fn main() {
    let bench = DockerfileBench::start(Path::new(env!("CARGO_TARGET_TMPDIR"))).unwrap();
    let (registry, base, data) = (&bench.registry, bench.base.clone(), &bench.data);
    let mut config = bench.config("bench-logs");
    config["builds"]["maxLogBytes"] = (64u64 << 20).into();
    let service = Service::start(Path::new(env!("CARGO_BIN_EXE_image-builder")), config).unwrap();
    let pid = service.pid().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut client = runtime.block_on(service.client()).unwrap();

    // 200,000 lines of 63 bytes: numbers 100000.. padded by sed.
    let lines_200k = format!(
        "FROM {base}\nRUN seq 100000 299999 | sed 's/$/ of the build output, as a compiler would print it ...../'\n"
    );
    let repo = GitRepo::new(&[("Dockerfile", &lines_200k)]).unwrap();
    let store = data.path().join("store");
    let idle_kib = status_kib(pid, "VmRSS:");
    let store_before = du_bytes(&store);
    let (id_200k, last) =
        runtime.block_on(build(&mut client, dockerfile_request(&repo.uri(), "200k")));
    assert_eq!(last.status, pb::BuildStatus::DoneSuccess as i32, "{last:?}");
    let store_growth = du_bytes(&store) - store_before;
    let phases_of = |id: &str| {
        runtime.block_on(async {
            let mut ops = service.ops().await.unwrap();
            let build = ops
                .get_build(image_builder::proto::ops::GetBuildRequest {
                    build_id: id.to_owned(),
                })
                .await
                .unwrap()
                .into_inner();
            let mut spans = Vec::new();
            for pair in build.phases.windows(2) {
                spans.push(format!(
                    "{} {} ms",
                    pair[0].phase,
                    pair[1].entered_at_ms - pair[0].entered_at_ms
                ));
            }
            spans.join(", ")
        })
    };
    let phases = phases_of(&id_200k);
    let log_200k = runtime.block_on(replay(&mut client, &id_200k));

    // Both sides, alternating (which goes first changes every run), and the medians: RUN steps
    // in their own network namespace make single runs vary by ±0.5 s on this machine. The
    // first build above (store growth, log size, phases) is not among them: every timed run
    // on either side has the same shape, an `ENV` of its own before the steps, so neither
    // takes a step from its layer cache.
    let by_hand_dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    // A cold build with quiet output, where the service's own work shows most.
    let quiet = format!("FROM {base}\nRUN echo built > /built\n");
    let repo_quiet = GitRepo::new(&[("Dockerfile", &quiet)]).unwrap();
    let mut last_id = String::new();
    let mut alternate = |repo: &GitRepo, name: &str| {
        let dockerfile = std::fs::read_to_string(repo.path().join("Dockerfile")).unwrap();
        let (mut service_runs, mut by_hand_runs) = (Vec::new(), Vec::new());
        for i in 0..RUNS {
            let (from, steps) = dockerfile.split_once('\n').unwrap();
            let fresh = format!("{from}\nENV BENCH_RUN={name}-{i}\n{steps}");
            repo.commit(&[("Dockerfile", &fresh)], "a run of its own")
                .unwrap();
            let mut by_hand = || {
                by_hand_runs.push(buildah_by_hand(
                    by_hand_dir.path(),
                    repo.path(),
                    &format!("{}/bench-logs/by-hand:{name}-{i}", registry.addr()),
                    ByHand::UserNamespace,
                ));
            };
            if i % 2 == 0 {
                by_hand();
            }
            let start = Instant::now();
            let (id, last) = runtime.block_on(build(
                &mut client,
                dockerfile_request(&repo.uri(), &format!("{name}-{i}")),
            ));
            service_runs.push(start.elapsed());
            last_id = id;
            assert_eq!(last.status, pb::BuildStatus::DoneSuccess as i32, "{last:?}");
            if i % 2 == 1 {
                by_hand();
            }
        }
        (
            percentile(&mut service_runs, 0.5),
            percentile(&mut by_hand_runs, 0.5),
        )
    };
    let (service_200k, by_hand) = alternate(&repo, "200k");
    let (quiet_service, quiet_by_hand) = alternate(&repo_quiet, "quiet");
    let quiet_phases = phases_of(&last_id);

    // A 16 MiB log: 262,144 lines of 64 bytes.
    let lines_16m = format!(
        "FROM {base}\nRUN seq 100000 362143 | sed 's/$/ of the build output, padded to sixty-four bytes ..../'\n"
    );
    let repo_16m = GitRepo::new(&[("Dockerfile", &lines_16m)]).unwrap();
    let (id_16m, last) = runtime.block_on(build(
        &mut client,
        dockerfile_request(&repo_16m.uri(), "16m"),
    ));
    assert_eq!(last.status, pb::BuildStatus::DoneSuccess as i32, "{last:?}");
    let start = Instant::now();
    let log_16m = runtime.block_on(replay(&mut client, &id_16m));
    let replay_time = start.elapsed();
    let file = by_hand_dir.path().join("16m.log");
    std::fs::write(&file, vec![b'x'; log_16m]).unwrap();
    let start = Instant::now();
    let read_back = std::fs::read(&file).unwrap().len();
    let file_time = start.elapsed();
    assert_eq!(read_back, log_16m);

    // 200 listeners that never read, one connection each.
    let before_listeners = status_kib(pid, "VmRSS:");
    let url = service.grpc_url();
    let (streams, mut hits) = runtime.block_on(async {
        let mut streams = Vec::new();
        for _ in 0..200 {
            let mut c = ImageBuilderClient::connect(url.clone()).await.unwrap();
            let stream = c
                .logs(pb::LogsRequest {
                    build_id: id_16m.clone(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            streams.push((c, stream));
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        // A cache hit of another ref while they sit there.
        let mut hits = Vec::new();
        for _ in 0..20 {
            let t = Instant::now();
            let (_, last) = build(&mut client, dockerfile_request(&repo.uri(), "200k")).await;
            assert_eq!(last.status, pb::BuildStatus::DoneSuccess as i32);
            hits.push(t.elapsed());
        }
        (streams, hits)
    });
    let with_listeners = status_kib(pid, "VmRSS:");
    drop(streams);

    // One 300 MB line with no newline.
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
    let before_line = status_kib(pid, "VmRSS:");
    let one_line = format!("FROM {base}\nRUN head -c 300000000 /dev/zero | tr '\\0' x\n");
    let repo_line = GitRepo::new(&[("Dockerfile", &one_line)]).unwrap();
    let start = Instant::now();
    let (_, last) = runtime.block_on(build(
        &mut client,
        dockerfile_request(&repo_line.uri(), "line"),
    ));
    let line_time = start.elapsed();
    assert_eq!(last.status, pb::BuildStatus::DoneSuccess as i32, "{last:?}");
    let peak_line = status_kib(pid, "VmHWM:");

    let mb = |bytes: usize, d: Duration| bytes as f64 / d.as_secs_f64() / 1e6;
    println!("| measurement | image-builder | peer | ratio | goal |");
    println!("|---|---:|---:|---:|---|");
    println!(
        "| 200k-line build + push, end to end, median of {RUNS} (s) | {:.2} | {:.2} (`buildah bud` + `push` by hand) | {:.2}× | ≤ 1.15× |",
        service_200k.as_secs_f64(),
        by_hand.as_secs_f64(),
        service_200k.as_secs_f64() / by_hand.as_secs_f64()
    );
    println!(
        "| cold build with quiet output + push, end to end, median of {RUNS} (s) | {:.2} | {:.2} (`buildah bud` + `push` by hand) | {:.2}× | ≤ 1.05× |",
        quiet_service.as_secs_f64(),
        quiet_by_hand.as_secs_f64(),
        quiet_service.as_secs_f64() / quiet_by_hand.as_secs_f64()
    );
    println!(
        "| store growth for that build (MB) | {:.1} | {:.1} (its log) | {:.2}× | ≤ 1.25× |",
        store_growth as f64 / 1e6,
        log_200k as f64 / 1e6,
        store_growth as f64 / log_200k as f64
    );
    println!(
        "| one listener replays a {:.1} MB log (MB/s) | {:.0} | {:.0} (read from a file) | {:.3}× | ≥ 100 MB/s |",
        log_16m as f64 / 1e6,
        mb(log_16m, replay_time),
        mb(read_back, file_time),
        mb(log_16m, replay_time) / mb(read_back, file_time)
    );
    println!(
        "| 200 non-reading listeners on that log: RSS growth (MiB) | {:.1} | – | – | < 64 MiB |",
        mib(with_listeners.saturating_sub(before_listeners))
    );
    println!(
        "| cache-hit Build meanwhile, p50 / p99 (ms) | {:.1} / {:.1} | – | – | – |",
        percentile(&mut hits, 0.5).as_secs_f64() * 1000.0,
        percentile(&mut hits, 0.99).as_secs_f64() * 1000.0
    );
    println!(
        "| one 300 MB line without a newline: peak RSS above idle (MiB) | {:.1} (build {:.1} s) | – | – | < 64 MiB |",
        mib(peak_line.saturating_sub(before_line)),
        line_time.as_secs_f64()
    );
    println!();
    println!("200k-line build, time per phase: {phases}");
    println!("last quiet cold build, time per phase: {quiet_phases}");
    println!(
        "service RSS: idle {:.1} MiB, before the listeners {:.1} MiB",
        mib(idle_kib),
        mib(before_listeners)
    );
}
