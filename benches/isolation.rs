//! What isolating RUN steps costs on the local executor, each figure beside its peers in the
//! same run, alternating, the median of [`RUNS`]: a cold build with quiet output and a build
//! whose RUN prints 200,000 lines, each pushed, three ways:
//! - through the service (buildah in a user namespace, RUN in rootless isolation);
//! - `buildah bud` + `push` by hand the same way ([`ByHand::UserNamespace`]);
//! - `buildah bud` + `push` by hand as the host's root, RUN in runc containers
//!   ([`ByHand::HostRoot`]): no user namespace, the service's way before.
//!
//!
//! Then the same two builds as Jobs on the test cluster, three ways again:
//! - through the service (a pod in a user namespace of its own: clone, builder and registry
//!   steps);
//! - that pod by hand: the same pod spec and Secret, made directly, timed from its creation to
//!   its end (no service: no Job, no log following, no journal);
//! - a privileged pod without a user namespace running `git clone`, `buildah bud --isolation
//!   chroot` and `buildah push` in one container, as builder pods did before.
//!
//! `cargo bench --bench isolation` (needs root, buildah, docker-registry, subordinate ids:
//! `scripts/setup.sh`; the cluster is started, or taken from `IMAGE_BUILDER_TEST_KUBECONFIG`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench: a failed unwrap is a failed run

use std::path::Path;
use std::time::{Duration, Instant};

use image_builder_testkit::bench::{
    ByHand, DockerfileBench, build_successfully, buildah_by_hand, dockerfile_build, percentile,
};
use image_builder_testkit::cluster::{self, ClusterAccess};
use image_builder_testkit::{GitHttpServer, GitRepo, LocalRegistry, Service};

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

    println!(
        "| measurement, median of {RUNS} (s) | image-builder | by hand, user namespace | by hand, host root | image-builder ÷ host root | namespace ÷ host root | goal |"
    );
    println!("|---|---:|---:|---:|---:|---:|---|");
    for (name, dockerfile) in builds(&base) {
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
                        let request = dockerfile_build(
                            &repo.uri(),
                            &format!("{}-{i}", name.len()),
                            "Dockerfile",
                            ".",
                        );
                        service_runs
                            .push(runtime.block_on(build_successfully(&mut client, request)));
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
    drop(client);
    drop(service);
    jobs(&runtime);
}

/// The two builds, as Dockerfiles on top of `base`.
fn builds(base: &str) -> [(&'static str, String); 2] {
    [
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
    ]
}

/// The Job rows: see the module's doc.
fn jobs(runtime: &tokio::runtime::Runtime) {
    let cluster = cluster::shared().unwrap();
    let builder_image = cluster.builder_image().unwrap();
    let namespace = cluster.create_namespace("bench-jobs").unwrap();
    let privileged_ns = cluster.create_namespace("bench-privileged").unwrap();
    kubectl(
        &cluster,
        &[
            "label",
            "namespace",
            &privileged_ns,
            "--overwrite",
            "pod-security.kubernetes.io/enforce=privileged",
        ],
        None,
    );
    let registry = LocalRegistry::start_for_pods(&[]).unwrap();
    let base = image_builder_testkit::push_image(
        &image_builder_testkit::BaseImage::busybox(0).unwrap(),
        registry.addr(),
        "bench/busybox:1",
    )
    .unwrap();
    let executor = cluster.executor_config(&namespace).unwrap();
    let mut config = image_builder_testkit::bench::service_config(registry.addr(), "bench-jobs");
    config["executor"] = executor.clone();
    let kubeconfig = cluster.kubeconfig.display().to_string();
    let service = Service::start_with_env(
        Path::new(env!("CARGO_BIN_EXE_image-builder")),
        config,
        &[("KUBECONFIG", kubeconfig.as_str())],
    )
    .unwrap();
    let mut client = runtime.block_on(service.client()).unwrap();
    let mut k8s: serde_json::Value = executor;
    k8s.as_object_mut().unwrap().remove("kind");
    let k8s: image_builder::config::KubernetesConfig = serde_json::from_value(k8s).unwrap();

    // Every run of every side builds a Dockerfile of its own (nothing cached), all in one
    // repository served once.
    let mut files = Vec::new();
    for (b, (_, dockerfile)) in builds(&base).iter().enumerate() {
        let (from, steps) = dockerfile.split_once('\n').unwrap();
        for side in ["service", "pod", "privileged"] {
            for i in 0..RUNS {
                files.push((
                    format!("{side}-{b}-{i}/Dockerfile"),
                    format!("{from}\nENV BENCH_RUN={side}-{b}-{i}\n{steps}"),
                ));
            }
        }
    }
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(p, c)| (p.as_str(), c.as_str()))
        .collect();
    let repo = GitRepo::new(&refs).unwrap();
    let git = GitHttpServer::start_for_pods(&repo, None).unwrap();
    let insecure = [registry.addr().to_owned()];

    println!();
    println!(
        "| as a Job, median of {RUNS} (s) | image-builder | its pod by hand (user namespace) | privileged pod, no user namespace | image-builder ÷ privileged | pod ÷ privileged |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for (b, (name, _)) in builds(&base).iter().enumerate() {
        let (mut service_runs, mut pod_runs, mut privileged_runs) = (vec![], vec![], vec![]);
        for i in 0..RUNS {
            let dir = |side: &str| format!("{side}-{b}-{i}");
            let tag = |side: &str| format!("{}/bench-jobs/{side}:{b}-{i}", registry.addr());
            for turn in 0..3 {
                match (i + turn) % 3 {
                    0 => {
                        let request = dockerfile_build(
                            &git.uri(),
                            &format!("{b}-{i}"),
                            &format!("{}/Dockerfile", dir("service")),
                            ".",
                        );
                        service_runs
                            .push(runtime.block_on(build_successfully(&mut client, request)));
                    }
                    1 => {
                        let source = image_builder_state::DockerfileSource {
                            remote_uri: git.uri(),
                            target_mode: image_builder_state::CloneTargetMode::RemoteHead,
                            clone_target: String::new(),
                            dockerfile_path: format!("{}/Dockerfile", dir("pod")),
                            context_path: ".".into(),
                            dockerfile_version: String::new(),
                            git_auth: false,
                        };
                        let tag = tag("pod");
                        let attempt = image_builder::executor::kubernetes::manifest::Attempt {
                            id: image_builder_state::BuildId::new(),
                            attempt: 1,
                            source: &source,
                            tag: &tag,
                            insecure_registries: &insecure,
                            cache: image_builder::executor::LayerCacheUse::ReadWrite,
                        };
                        pod_runs.push(pod_by_hand(&cluster, &namespace, &k8s, &attempt));
                    }
                    _ => {
                        privileged_runs.push(privileged_pod(
                            &cluster,
                            &privileged_ns,
                            &builder_image,
                            &git.uri(),
                            &dir("privileged"),
                            &tag("privileged"),
                            registry.addr(),
                        ));
                    }
                }
            }
        }
        let [service, pod, privileged] = [&mut service_runs, &mut pod_runs, &mut privileged_runs]
            .map(|runs| percentile(runs, 0.5));
        let secs = Duration::as_secs_f64;
        println!(
            "| {name} + push | {:.2} | {:.2} | {:.2} | {:.2}× | {:.2}× |",
            secs(&service),
            secs(&pod),
            secs(&privileged),
            secs(&service) / secs(&privileged),
            secs(&pod) / secs(&privileged),
        );
    }
}

/// Runs kubectl as the cluster's admin, with `stdin`; panics when it fails.
fn kubectl(cluster: &ClusterAccess, args: &[&str], stdin: Option<&str>) -> String {
    cluster.kubectl(args, stdin.unwrap_or_default()).unwrap()
}

/// Creates `pod` (JSON) in `namespace`, waits until it has ended, deletes it; the time from
/// its creation to its end. Panics when it failed.
fn run_pod(cluster: &ClusterAccess, namespace: &str, pod: &serde_json::Value) -> Duration {
    let name = pod["metadata"]["name"].as_str().unwrap().to_owned();
    let start = Instant::now();
    kubectl(
        cluster,
        &["-n", namespace, "create", "-f", "-"],
        Some(&pod.to_string()),
    );
    let phase = loop {
        let phase = kubectl(
            cluster,
            &[
                "-n",
                namespace,
                "get",
                "pod",
                &name,
                "-o",
                "jsonpath={.status.phase}",
            ],
            None,
        );
        if phase == "Succeeded" || phase == "Failed" {
            break phase;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = start.elapsed();
    let logs = kubectl(
        cluster,
        &["-n", namespace, "logs", &name, "--all-containers"],
        None,
    );
    assert_eq!(phase, "Succeeded", "{name}: {logs}");
    kubectl(
        cluster,
        &["-n", namespace, "delete", "pod", &name, "--wait=false"],
        None,
    );
    took
}

/// The service's builder pod for `attempt`, made by hand with its Secret (no credentials).
fn pod_by_hand(
    cluster: &ClusterAccess,
    namespace: &str,
    config: &image_builder::config::KubernetesConfig,
    attempt: &image_builder::executor::kubernetes::manifest::Attempt<'_>,
) -> Duration {
    use image_builder::executor::kubernetes::manifest;
    let job = manifest::job(config, "bench", attempt);
    let none = serde_json::json!({"auths": {}});
    let mut secret = serde_json::to_value(manifest::secret(&job, &none, None)).unwrap();
    secret["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("ownerReferences");
    kubectl(
        cluster,
        &["-n", namespace, "create", "-f", "-"],
        Some(&secret.to_string()),
    );
    let name = job.metadata.name.clone().unwrap();
    let pod = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": job.spec.unwrap().template.spec.unwrap(),
    });
    let took = run_pod(cluster, namespace, &pod);
    kubectl(
        cluster,
        &[
            "-n",
            namespace,
            "delete",
            "secret",
            &manifest::secret_name(&name),
            "--wait=false",
        ],
        None,
    );
    took
}

/// A privileged pod without a user namespace: clone, `buildah bud --isolation chroot`, push.
fn privileged_pod(
    cluster: &ClusterAccess,
    namespace: &str,
    image: &str,
    remote: &str,
    dir: &str,
    tag: &str,
    registry: &str,
) -> Duration {
    let script = format!(
        "set -e; mkdir -p /etc/containers/registries.conf.d; printf '[[registry]]\\nlocation = \"{registry}\"\\ninsecure = true\\n' > /etc/containers/registries.conf.d/bench.conf; git clone --quiet --depth 1 {remote} /w; buildah bud --isolation chroot --layers=false --format docker -f /w/{dir}/Dockerfile -t {tag} /w; buildah push {tag} docker://{tag}"
    );
    let name = format!("privileged-{}", uuid::Uuid::now_v7().simple());
    let pod = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "containers": [{
                "name": "builder",
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "command": ["/bin/sh", "-c", script],
                "securityContext": {"privileged": true},
                "volumeMounts": [{"name": "storage", "mountPath": "/var/lib/containers"}],
            }],
            "volumes": [{"name": "storage", "emptyDir": {}}],
        },
    });
    run_pod(cluster, namespace, &pod)
}
