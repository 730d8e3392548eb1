//! Builds that reuse what they already did, through the real service, each figure beside its
//! peer in the same run:
//! - a rebuild whose Dockerfile differs from the first build's only in its last step, vs that
//!   first build, and vs `buildah bud --layers` + `buildah push` by hand doing the same pair
//!   in a storage of its own (the median of RUNS pairs, alternating; every pair starts from
//!   new content, an `ENV` of its own);
//! - a build resumed after SIGKILL during the third of its four RUN steps: from the restart
//!   to done, vs a full build of the same shape;
//! - content keys: ResolveWorkspaceImage under `baseImageKey: content` on a 200 MB
//!   repository (the first request, a repeat, one after a commit): the first request beside
//!   what it fetches by hand (`git clone --bare --depth 1 --filter=blob:none`), in turn, and
//!   a repeat beside the same call under mk3's key.
//!
//! `cargo bench --bench layers` (needs root, buildah, docker-registry: `scripts/setup.sh`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench: a failed unwrap is a failed run

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use image_builder::proto::builder as pb;
use image_builder::proto::builder::image_builder_client::ImageBuilderClient;
use image_builder_testkit::bench::{
    ByHand, DockerfileBench, buildah_by_hand, dockerfile_build, du_bytes, ms, percentile,
};
use image_builder_testkit::{self as testkit, GitRepo, Service};
use tonic::transport::Channel;

/// Pairs (first build, rebuild) on each side.
const RUNS: usize = 3;
/// Rounds of a content key's first request and its peer by hand.
const KEY_RUNS: usize = 7;

fn request(uri: &str, version: &str) -> pb::BuildRequest {
    dockerfile_build(uri, version, "app/Dockerfile", "app")
}

/// Four RUN steps that take real time (16 MiB written, then waits), the last one `last`.
fn dockerfile(base: &str, run: &str, last: &str) -> String {
    format!(
        "FROM {base}\nENV BENCH_RUN={run}\n\
         RUN dd if=/dev/urandom of=/one bs=1M count=16 2>/dev/null && sleep 1\n\
         RUN sleep 1 && echo two > /two\n\
         RUN echo three-started && sleep 2 && echo three > /three\n\
         RUN echo {last} > /last\n"
    )
}

/// Builds to the end through a Build stream; the time it took.
async fn build(client: &mut ImageBuilderClient<Channel>, req: pb::BuildRequest) -> Duration {
    image_builder_testkit::bench::build_successfully(client, req).await
}

/// Follows the build's log until it holds `text`.
async fn wait_for_log(client: &mut ImageBuilderClient<Channel>, id: &str, text: &str) {
    let request = pb::LogsRequest {
        build_id: id.into(),
        ..Default::default()
    };
    let mut stream = client.logs(request).await.unwrap().into_inner();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains(text) {
        let chunk = stream.message().await.unwrap();
        let chunk = chunk.unwrap_or_else(|| panic!("the log of {id} ended without {text:?}"));
        seen.extend_from_slice(&chunk.content);
    }
}

fn git(dir: &Path, args: &[&str]) -> Duration {
    let start = Instant::now();
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("LC_ALL", "C")
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {out:?}");
    start.elapsed()
}

fn main() {
    let bench = DockerfileBench::start(Path::new(env!("CARGO_TARGET_TMPDIR"))).unwrap();
    let (registry, base, data) = (&bench.registry, bench.base.clone(), &bench.data);
    let config = |key: &str| {
        let mut config = bench.config("bench-layers");
        config["builds"]["baseImageKey"] = key.into();
        config
    };
    let binary = Path::new(env!("CARGO_BIN_EXE_image-builder"));
    let mut service = Service::start(binary, config("mk3")).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut client = runtime.block_on(service.client()).unwrap();

    // First build and a rebuild that changes only the last step, on both sides.
    let repo = GitRepo::new(&[("app/Dockerfile", &dockerfile(&base, "0", "first"))]).unwrap();
    let by_hand_dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (mut first, mut rebuild, mut first_by_hand, mut rebuild_by_hand) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..RUNS {
        for (last, service_runs, by_hand_runs) in [
            ("first", &mut first, &mut first_by_hand),
            ("second", &mut rebuild, &mut rebuild_by_hand),
        ] {
            let run = format!("{i}");
            repo.commit(
                &[("app/Dockerfile", &dockerfile(&base, &run, last))],
                "a step",
            )
            .unwrap();
            by_hand_runs.push(buildah_by_hand(
                by_hand_dir.path(),
                &repo.path().join("app"),
                &format!("{}/bench-layers/by-hand:{i}-{last}", registry.addr()),
                ByHand::UserNamespace,
            ));
            let version = format!("{i}-{last}");
            service_runs.push(runtime.block_on(build(&mut client, request(&repo.uri(), &version))));
        }
    }

    // Killed during step 3 of 4, resumed: from the restart to done.
    repo.commit(
        &[("app/Dockerfile", &dockerfile(&base, "resume", "first"))],
        "resume",
    )
    .unwrap();
    let id = runtime.block_on(async {
        let mut stream = client
            .build(request(&repo.uri(), "resume"))
            .await
            .unwrap()
            .into_inner();
        let first = stream.message().await.unwrap().unwrap();
        let id = first.info.unwrap().build_id;
        wait_for_log(&mut client, &id, "\nthree-started\n").await;
        id
    });
    service.kill();
    let restarted = Instant::now();
    service.kill_and_restart().unwrap();
    let resumed = runtime.block_on(async {
        let mut client = service.client().await.unwrap();
        // The same request joins the resumed build and ends with it.
        build(&mut client, request(&repo.uri(), "resume")).await;
        restarted.elapsed()
    });
    let log = runtime.block_on(async {
        let mut client = service.client().await.unwrap();
        let request = pb::LogsRequest {
            build_id: id.clone(),
            ..Default::default()
        };
        String::from_utf8(testkit::read_logs(&mut client, request).await.unwrap()).unwrap()
    });
    let cached_steps = log.matches("Using cache").count();
    // The `ENV` and RUN steps 1-2 finished before the kill.
    assert_eq!(
        cached_steps, 3,
        "the resumed build took its finished steps from the cache:\n{log}"
    );
    service.stop();

    // Content keys on a 200 MB repository: 200 files of 1 MB of random bytes outside the
    // context, a small context beside them.
    let big = GitRepo::new(&[
        ("app/Dockerfile", &format!("FROM {base}\nCOPY main.txt /\n")),
        ("app/main.txt", "one\n"),
    ])
    .unwrap();
    let assets = big.path().join("assets");
    std::fs::create_dir_all(&assets).unwrap();
    let mut random = std::fs::File::open("/dev/urandom").unwrap();
    for i in 0..200 {
        use std::io::Read;
        let mut bytes = vec![0u8; 1 << 20];
        random.read_exact(&mut bytes).unwrap();
        std::fs::write(assets.join(format!("{i:03}.bin")), bytes).unwrap();
    }
    big.commit(&[], "200 MB of assets").unwrap();
    // The server side of a partial clone: upload-pack filters only where allowed.
    git(big.path(), &["config", "uploadpack.allowFilter", "true"]);
    let pack = git(big.path(), &["gc", "--quiet"]);
    let repo_bytes: u64 = du_bytes(&big.path().join(".git"));

    let clones = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let uri = big.uri();
    let full_clone = git(
        clones.path(),
        &["clone", "--quiet", "--depth", "1", &uri, "full"],
    );
    // The peer of a content key's first request: what it fetches, by hand (the commit's trees,
    // no blobs, into a bare repository).
    let blobless_clone = |round: usize| {
        git(
            clones.path(),
            &[
                "clone",
                "--quiet",
                "--bare",
                "--depth",
                "1",
                "--filter=blob:none",
                &uri,
                &format!("blobless-{round}"),
            ],
        )
    };

    let resolve = |service: &Service| {
        let uri = uri.clone();
        runtime.block_on(async {
            let mut client = service.client().await.unwrap();
            let start = Instant::now();
            client
                .resolve_workspace_image(pb::ResolveWorkspaceImageRequest {
                    source: request(&uri, "1").source,
                    ..Default::default()
                })
                .await
                .unwrap();
            start.elapsed()
        })
    };
    let mk3 = Service::start(binary, config("mk3")).unwrap();
    let mut mk3_times: Vec<Duration> = (0..10).map(|_| resolve(&mk3)).collect();
    drop(mk3);
    // A content key's first request (a fresh service, no repository kept) and the blob-less
    // clone by hand, in turn.
    let (mut first_keys, mut blobless) = (Vec::new(), Vec::new());
    for round in 0..KEY_RUNS {
        let _ = std::fs::remove_dir_all(data.path().join("keys"));
        let fresh = Service::start(binary, config("content")).unwrap();
        first_keys.push(resolve(&fresh));
        drop(fresh);
        blobless.push(blobless_clone(round));
    }
    let content = Service::start(binary, config("content")).unwrap();
    resolve(&content);
    let mut repeats: Vec<Duration> = (0..10).map(|_| resolve(&content)).collect();
    big.commit(&[("app/main.txt", "two\n")], "a change in the context")
        .unwrap();
    let after_commit = resolve(&content);
    let kept = du_bytes(&data.path().join("keys"));
    drop(content);

    let median = |v: &mut Vec<Duration>| percentile(v, 0.5);
    let (first_m, rebuild_m) = (median(&mut first), median(&mut rebuild));
    let (first_h, rebuild_h) = (median(&mut first_by_hand), median(&mut rebuild_by_hand));
    println!("| measurement | image-builder | peer | ratio | goal |");
    println!("|---|---:|---:|---:|---|");
    println!(
        "| rebuild with only the last of 4 RUN steps changed, median of {RUNS} (s) | {:.2} | {:.2} (the first build of the pair, same service) | {:.2}× | only the last step runs |",
        rebuild_m.as_secs_f64(),
        first_m.as_secs_f64(),
        rebuild_m.as_secs_f64() / first_m.as_secs_f64()
    );
    println!(
        "| the same rebuild (s) | {:.2} | {:.2} (`buildah bud --layers` + `push` by hand; its first build {:.2}) | {:.2}× | ≈ 1× |",
        rebuild_m.as_secs_f64(),
        rebuild_h.as_secs_f64(),
        first_h.as_secs_f64(),
        rebuild_m.as_secs_f64() / rebuild_h.as_secs_f64()
    );
    println!(
        "| resumed after SIGKILL in step 3 of 4: restart to done (s) | {:.2} ({cached_steps} finished steps from the cache: ENV, RUN 1-2) | {:.2} (a full build of the same shape) | {:.2}× | < 1× |",
        resumed.as_secs_f64(),
        first_m.as_secs_f64(),
        resumed.as_secs_f64() / first_m.as_secs_f64()
    );
    let (first_key, blobless_m) = (median(&mut first_keys), median(&mut blobless));
    println!(
        "| content key, first request on a {:.0} MB repository, median of {KEY_RUNS} (ms) | {:.0} | {:.0} (`git clone --bare --depth 1 --filter=blob:none` by hand, in turn; a full `git clone --depth 1`: {:.0}) | {:.2}× | – |",
        repo_bytes as f64 / 1e6,
        ms(first_key),
        ms(blobless_m),
        ms(full_clone),
        first_key.as_secs_f64() / blobless_m.as_secs_f64()
    );
    println!(
        "| content key, repeated, median of 10 (ms) | {:.1} | {:.1} (mk3 key, no git) | {:.1}× | – |",
        ms(median(&mut repeats)),
        ms(median(&mut mk3_times)),
        median(&mut repeats).as_secs_f64() / median(&mut mk3_times).as_secs_f64()
    );
    println!(
        "| content key after a commit in the context (ms) | {:.1} | – | – | – |",
        ms(after_commit)
    );
    println!();
    println!(
        "kept for content keys: {:.2} MB in dataDir/keys (the repository: {:.0} MB, packed in {:.1} s)",
        kept as f64 / 1e6,
        repo_bytes as f64 / 1e6,
        pack.as_secs_f64()
    );
}
