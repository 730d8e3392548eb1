//! What isolating RUN steps costs on the local executor, each figure beside its peers in the
//! same run, alternating, the median of [`RUNS`]: a cold build with quiet output and a build
//! whose RUN prints 200,000 lines, each pushed, three ways:
//! - through the service (buildah in a user namespace, RUN in rootless isolation);
//! - `buildah bud` + `push` by hand the same way ([`ByHand::UserNamespace`]);
//! - `buildah bud` + `push` by hand as the host's root, RUN in runc containers
//!   ([`ByHand::HostRoot`]): no user namespace, the service's way before.
//!
//! `cargo bench --bench isolation` (needs root, buildah, docker-registry, subordinate ids:
//! `scripts/setup.sh`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench: a failed unwrap is a failed run

use std::path::Path;
use std::time::{Duration, Instant};

use image_builder::proto::builder as pb;
use image_builder_testkit::bench::{
    ByHand, DockerfileBench, buildah_by_hand, dockerfile_build, percentile,
};
use image_builder_testkit::{GitRepo, Service};

/// Runs of each build on each side.
const RUNS: usize = 5;

fn main() {
    let bench = DockerfileBench::start(Path::new(env!("CARGO_TARGET_TMPDIR"))).unwrap();
    let (registry, base) = (&bench.registry, bench.base.clone());
    let service = Service::start(
        Path::new(env!("CARGO_BIN_EXE_image-builder")),
        bench.config("bench-isolation"),
    )
    .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut client = runtime.block_on(service.client()).unwrap();
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let host_root_dir = tempfile::tempdir_in(tmp).unwrap();
    let namespace_dir = tempfile::tempdir_in(tmp).unwrap();

    let builds = [
        (
            "cold build with quiet output",
            format!("FROM {base}\nRUN echo built > /built\n"),
        ),
        (
            "200k-line build",
            format!(
                "FROM {base}\nRUN seq 100000 299999 | sed 's/$/ of the build output, as a compiler would print it ...../'\n"
            ),
        ),
    ];
    println!(
        "| measurement, median of {RUNS} (s) | image-builder | by hand, user namespace | by hand, host root | image-builder ÷ host root | namespace ÷ host root | goal |"
    );
    println!("|---|---:|---:|---:|---:|---:|---|");
    for (name, dockerfile) in builds {
        let repo = GitRepo::new(&[("Dockerfile", &dockerfile)]).unwrap();
        let (mut service_runs, mut namespace_runs, mut host_runs) = (vec![], vec![], vec![]);
        for i in 0..RUNS {
            // Every run builds new content on every side (an `ENV` of its own), so none
            // takes a step from its layer cache.
            let (from, steps) = dockerfile.split_once('\n').unwrap();
            let tag = |side: &str| {
                format!(
                    "{}/bench-isolation/{side}:{}-{i}",
                    registry.addr(),
                    name.len()
                )
            };
            let fresh =
                |side: &str| format!("{from}\nENV BENCH_RUN={side}-{}-{i}\n{steps}", name.len());
            // The order turns each run, so that no side always runs on a warm machine.
            for turn in 0..3 {
                match (i + turn) % 3 {
                    0 => {
                        repo.commit(&[("Dockerfile", &fresh("host"))], "a run")
                            .unwrap();
                        host_runs.push(buildah_by_hand(
                            host_root_dir.path(),
                            repo.path(),
                            &tag("host"),
                            ByHand::HostRoot,
                        ));
                    }
                    1 => {
                        repo.commit(&[("Dockerfile", &fresh("ns"))], "a run")
                            .unwrap();
                        namespace_runs.push(buildah_by_hand(
                            namespace_dir.path(),
                            repo.path(),
                            &tag("ns"),
                            ByHand::UserNamespace,
                        ));
                    }
                    _ => {
                        repo.commit(&[("Dockerfile", &fresh("service"))], "a run")
                            .unwrap();
                        service_runs.push(runtime.block_on(build(
                            &mut client,
                            &repo.uri(),
                            &format!("{}-{i}", name.len()),
                        )));
                    }
                }
            }
        }
        let [service, namespace, host] = [&mut service_runs, &mut namespace_runs, &mut host_runs]
            .map(|runs| percentile(runs, 0.5));
        let secs = Duration::as_secs_f64;
        println!(
            "| {name} + push | {:.2} | {:.2} | {:.2} | {:.2}× | {:.2}× | {} |",
            secs(&service),
            secs(&namespace),
            secs(&host),
            secs(&service) / secs(&host),
            secs(&namespace) / secs(&host),
            if name.starts_with("cold") {
                "≤ 1.10×"
            } else {
                "—"
            },
        );
    }
}

/// Builds `uri` through the service to the end; returns the time it took.
async fn build(
    client: &mut image_builder::proto::builder::image_builder_client::ImageBuilderClient<
        tonic::transport::Channel,
    >,
    uri: &str,
    version: &str,
) -> Duration {
    let start = Instant::now();
    let mut stream = client
        .build(dockerfile_build(uri, version, "Dockerfile", "."))
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(r) = stream.message().await.unwrap() {
        last = Some(r);
    }
    let last = last.unwrap();
    assert_eq!(last.status, pb::BuildStatus::DoneSuccess as i32, "{last:?}");
    start.elapsed()
}
