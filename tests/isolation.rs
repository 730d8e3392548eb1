//! A hostile Dockerfile takes nothing, on either executor: its RUN step runs a static program
//! of this test's own (`tests/isolation/attack.c`) that tries what an attacker would, against
//! the real service, buildah, registry and (for Jobs) the test cluster, and every attempt must
//! fail; root in RUN must be an unprivileged id on the host, read from the host's side while
//! the step runs. A Dockerfile that needs root inside its image still builds an image whose
//! files have the owners and modes it gave them.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::*;
use image_builder::proto::builder as pb;
use image_builder_testkit::cluster::{self, ClusterAccess, POD_GATEWAY};
use image_builder_testkit::{
    self as testkit, GitHttpServer, GitRepo, LocalRegistry, Ownership, Service, UnpackedImage,
};

/// Capabilities no RUN step may hold, even in its own user namespace: each would let it act
/// on the host or on other processes beyond its files (capabilities(7) numbers).
const FORBIDDEN_CAPABILITIES: [(u32, &str); 8] = [
    (12, "CAP_NET_ADMIN"),
    (13, "CAP_NET_RAW"),
    (16, "CAP_SYS_MODULE"),
    (17, "CAP_SYS_RAWIO"),
    (19, "CAP_SYS_PTRACE"),
    (21, "CAP_SYS_ADMIN"),
    (25, "CAP_SYS_TIME"),
    (27, "CAP_MKNOD"),
];

/// The attack program, built static so that it runs in any image.
fn attack_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> = std::sync::OnceLock::new();
    let (_, binary) = BUILT.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("attack");
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/isolation/attack.c");
        let out = std::process::Command::new("cc")
            .args(["-static", "-O2", "-o"])
            .arg(&binary)
            .arg(&source)
            .output()
            .expect("run cc");
        assert!(
            out.status.success(),
            "cc failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (dir, binary)
    });
    binary.clone()
}

/// Seconds the attack program waits after its last line, for [`AttackWatch`].
const HOLD_SECONDS: u32 = 5;

/// A repository whose Dockerfile copies the attack program in and runs it with `args`.
fn attack_repo(base: &str, args: &[String]) -> GitRepo {
    attack_repo_between(&format!("FROM {base}\n"), args, "")
}

/// A repository whose Dockerfile is `head`, then a step that copies the attack program in and
/// one that runs it with `args` (holding [`HOLD_SECONDS`] at its end), then `tail`.
fn attack_repo_between(head: &str, args: &[String], tail: &str) -> GitRepo {
    let mut all = vec!["--hold".to_owned(), HOLD_SECONDS.to_string()];
    all.extend_from_slice(args);
    let args = all;
    let repo = GitRepo::new(&[(
        "Dockerfile",
        &format!(
            "{head}COPY attack /attack\nRUN [\"/attack\", {}]\n{tail}",
            args.iter()
                .map(|a| format!("{a:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )])
    .unwrap();
    let copied = repo.path().join("attack");
    std::fs::copy(attack_binary(), &copied).unwrap();
    std::fs::set_permissions(&copied, std::fs::Permissions::from_mode(0o755)).unwrap();
    repo.commit(&[], "the attack program").unwrap();
    repo
}

/// The port of `http://host:port`.
fn port(url: &str) -> u16 {
    url.trim_start_matches("http://")
        .split(['/', ':'])
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

/// Every IPv4 address of this machine but loopback's.
fn host_addresses() -> Vec<String> {
    let out = std::process::Command::new("hostname")
        .arg("-I")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|a| a.parse::<std::net::Ipv4Addr>().is_ok())
        .map(str::to_owned)
        .collect()
}

/// What the attack program printed: its verdicts, checked one by one.
struct Verdicts<'a> {
    log: &'a str,
}

impl<'a> Verdicts<'a> {
    fn lines(&self) -> impl Iterator<Item = &'a str> {
        self.log
            .lines()
            .filter_map(|l| l.strip_prefix("ATTACK "))
            .filter(|l| *l != "done" && *l != "holding")
    }

    /// Asserts that the program ran to its end, that nothing it tried worked, and that it
    /// tried each of `attempts` (line prefixes).
    fn all_blocked(&self, attempts: &[String]) {
        assert!(
            self.log.contains("ATTACK done\n"),
            "the attack did not run to its end:\n{}",
            self.log
        );
        let open: Vec<_> = self.lines().filter(|l| l.contains(": OPEN")).collect();
        assert!(open.is_empty(), "a RUN step got through: {open:#?}");
        for attempt in attempts {
            assert!(
                self.lines()
                    .any(|l| l.starts_with(attempt.as_str()) && l.contains(": blocked")),
                "{attempt:?} was not tried:\n{}",
                self.log
            );
        }
    }

    /// The value of `REPORT <name> <value>`.
    fn report(&self, name: &str) -> &'a str {
        let prefix = format!("REPORT {name} ");
        self.log
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .unwrap_or_else(|| panic!("no {name} reported:\n{}", self.log))
            .trim()
    }

    /// Asserts that RUN holds none of [`FORBIDDEN_CAPABILITIES`], and that its uid map (as
    /// RUN reads it) maps a bounded range, not every id.
    fn unprivileged(&self) {
        let map = uid_map(self.report("uid_map"));
        assert_eq!(map[0], 0, "uid_map {map:?}");
        assert!(
            map[2] < u64::from(u32::MAX),
            "uid_map {map:?} maps every id"
        );
        for set in ["CapEff", "CapBnd"] {
            let bits = u64::from_str_radix(self.report(set), 16).unwrap();
            for (bit, name) in FORBIDDEN_CAPABILITIES {
                assert_eq!(bits & (1 << bit), 0, "{set} {bits:#x} holds {name}");
            }
        }
    }
}

/// The first line of a uid map: inside id, outside id, count.
fn uid_map(text: &str) -> Vec<u64> {
    text.split_whitespace()
        .take(3)
        .map(|n| n.parse().unwrap())
        .collect()
}

/// Reads the uid map of process `pid` as the host sees it (`/proc/<pid>/uid_map` read from
/// the initial user namespace): for the attack program, where root of RUN really is.
fn host_uid_map(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/uid_map")).unwrap_or_default()
}

/// A watch, on a thread of its own, over this machine's processes for the attack program run
/// with a nonce: once it runs, a function of its pid (on the host) is called while it holds.
struct AttackWatch<T> {
    given_up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Option<T>>,
}

impl<T: Send + 'static> AttackWatch<T> {
    fn start(nonce: &str, seen: impl FnOnce(u32) -> T + Send + 'static) -> Self {
        let given_up = std::sync::Arc::<std::sync::atomic::AtomicBool>::default();
        let (nonce, stop) = (nonce.to_owned(), std::sync::Arc::clone(&given_up));
        let task = tokio::task::spawn_blocking(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let attack = processes_where("cmdline", |cmdline| {
                    cmdline.starts_with(b"/attack\0")
                        && String::from_utf8_lossy(cmdline).contains(&nonce)
                });
                if let Some(&pid) = attack.first() {
                    return Some(seen(pid));
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            None
        });
        Self { given_up, task }
    }

    /// What the watch saw, once the build's log `log` is known: `None` when the attack never
    /// ran (its log has no `ATTACK holding`).
    async fn finish(self, log: &str) -> Option<T> {
        if !log.contains("ATTACK holding") {
            self.given_up
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        self.task.await.unwrap()
    }
}

/// Builds `request` (a repository from [`attack_repo`] with `nonce` among the attack's
/// arguments), reading the attack's uid map from the host's side meanwhile; the last answer,
/// the log and that map.
async fn attack_build(
    service: &Service,
    request: pb::BuildRequest,
    nonce: &str,
) -> (pb::BuildResponse, String, String) {
    let watch = AttackWatch::start(nonce, host_uid_map);
    let (last, log) = build_and_log(service, request).await;
    let map = watch.finish(&log).await.unwrap_or_default();
    (last, log, map)
}

/// Asserts that root in RUN is a non-zero id on the host.
fn root_is_not_the_hosts(host_map: &str, log: &str) {
    assert!(
        !host_map.is_empty(),
        "the attack was never seen running:\n{log}"
    );
    let map = uid_map(host_map);
    assert_eq!(map[0], 0, "{host_map}");
    assert_ne!(map[1], 0, "root in RUN is the host's root: {host_map}");
}

async fn build_and_log(
    service: &Service,
    request: pb::BuildRequest,
) -> (pb::BuildResponse, String) {
    let mut client = service.client().await.unwrap();
    let responses = build_all(&mut client, request).await.unwrap();
    let id = build_id(&responses[0]);
    let log = String::from_utf8(logs_all(&mut client, &id).await.unwrap()).unwrap();
    (responses.last().unwrap().clone(), log)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_local_run_step_cannot_escape_read_secrets_devices_or_reach_the_service() {
    let shared = shared();
    let service = service("isolation-local");
    let secret_dir = tempfile::tempdir().unwrap();
    let secret = secret_dir.path().join("host-secret");
    std::fs::write(&secret, "host-secret-8d1f\n").unwrap();
    // Readable by everyone on the host: only the container's walls keep it.
    std::fs::set_permissions(secret_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let data = service.data_dir();
    let secrets = [
        secret.display().to_string(),
        data.join("store/db").display().to_string(),
        data.join("buildah/registries.conf").display().to_string(),
    ];
    let ports = [
        port(&service.grpc_url()),
        port(&service.metrics_url()),
        port(&format!("http://{}", shared.registry.addr())),
    ];
    // The step's own loopback, slirp4netns's alias of the host's (10.0.2.2), and every other
    // address of the host.
    let mut hosts = vec!["127.0.0.1".to_owned(), "10.0.2.2".to_owned()];
    hosts.extend(host_addresses());
    let targets: Vec<String> = hosts
        .iter()
        .flat_map(|h| ports.iter().map(move |p| format!("{h}:{p}")))
        .collect();
    let attack = Attack::new(&secrets, targets);
    let repo = attack.repo(&shared.base);
    attack.run(&service, head_build(&repo.uri())).await;
}

/// A fresh namespace `prefix-…` of the test cluster (Pod Security `baseline` enforced): the
/// cluster, the namespace and the `executor` config of a service building there.
async fn test_namespace(prefix: &'static str) -> (ClusterAccess, String, serde_json::Value) {
    let cluster = tokio::task::spawn_blocking(cluster::shared)
        .await
        .unwrap()
        .unwrap();
    let access = cluster.clone();
    let (namespace, executor) = tokio::task::spawn_blocking(move || {
        let namespace = access.create_namespace(prefix)?;
        let executor = access.executor_config(&namespace)?;
        anyhow::Ok((namespace, executor))
    })
    .await
    .unwrap()
    .unwrap();
    (cluster, namespace, executor)
}

/// The service building as Jobs in a namespace of its own in the test cluster (Pod Security
/// `baseline` enforced), with a registry where builder pods reach it (the pod gateway) holding
/// the busybox base.
struct JobService {
    cluster: ClusterAccess,
    namespace: String,
    service: Service,
    base: String,
    registry: LocalRegistry,
    _secrets: tempfile::TempDir,
}

impl JobService {
    /// With an open registry.
    async fn start(name: &str) -> Self {
        Self::start_with_registry(name, false).await
    }

    /// With a registry that, when `private`, serves only `builder` with [`REGISTRY_PASSWORD`],
    /// the installation's pull secret.
    async fn start_with_registry(name: &str, private: bool) -> Self {
        let users = [("builder", REGISTRY_PASSWORD)];
        let registry = LocalRegistry::start_for_pods(if private { &users } else { &[] }).unwrap();
        let (cluster, namespace, executor) = test_namespace("isolation").await;
        let image = testkit::BaseImage::busybox(0).unwrap();
        let creds = private.then(|| format!("builder:{REGISTRY_PASSWORD}"));
        let base =
            testkit::push_image_as(&image, registry.addr(), "base/busybox:1", creds.as_deref())
                .unwrap();
        let mut config = common::config(registry.addr(), name);
        config["executor"] = executor;
        let secrets = tempfile::tempdir().unwrap();
        if private {
            config["pullSecretFile"] = pull_secret_file(secrets.path(), registry.addr())
                .display()
                .to_string()
                .into();
        }
        let kubeconfig = cluster.kubeconfig.display().to_string();
        let service =
            Service::start_with_env(binary(), config, &[("KUBECONFIG", kubeconfig.as_str())])
                .unwrap();
        Self {
            cluster,
            namespace,
            service,
            base,
            registry,
            _secrets: secrets,
        }
    }
}

/// One attack: the secret files it tries to read (after the chroot escape and directly) and
/// the addresses it tries to reach, besides [`COMMON_ATTEMPTS`].
struct Attack {
    secrets: Vec<String>,
    targets: Vec<String>,
    /// An argument of its own, to find its process among the host's.
    nonce: String,
}

impl Attack {
    fn new(secrets: &[String], targets: Vec<String>) -> Self {
        Self {
            secrets: secrets.to_vec(),
            targets,
            nonce: format!("/nonexistent/{}", testkit::random_hex().unwrap()),
        }
    }

    /// A repository whose Dockerfile, on `base`, runs this attack.
    fn repo(&self, base: &str) -> GitRepo {
        let mut args = self.secrets.clone();
        args.extend([self.nonce.clone(), "--".into()]);
        args.extend(self.targets.iter().cloned());
        attack_repo(base, &args)
    }

    /// Builds `request` (of [`Attack::repo`]) and asserts that the build succeeded, that every
    /// attempt was made and failed, that root in RUN is no root of the host and holds no
    /// forbidden capability, and that RUN saw only its own few processes.
    async fn run(&self, service: &Service, request: pb::BuildRequest) {
        let (last, log, host_map) = attack_build(service, request, &self.nonce).await;
        assert_eq!(status(&last), pb::BuildStatus::DoneSuccess, "{log}");
        root_is_not_the_hosts(&host_map, &log);
        let verdicts = Verdicts { log: &log };
        let mut attempts: Vec<String> = COMMON_ATTEMPTS.map(str::to_owned).to_vec();
        attempts.extend(self.secrets.iter().map(|s| format!("read-secret {s}")));
        attempts.extend(self.targets.iter().map(|t| format!("connect {t}")));
        verdicts.all_blocked(&attempts);
        verdicts.unprivileged();
        let seen: usize = verdicts.report("processes").parse().unwrap();
        assert!(seen < 10, "{seen} processes visible to RUN");
    }
}

/// What every attack tries, whatever the executor.
const COMMON_ATTEMPTS: [&str; 11] = [
    "chroot-escape",
    "credentials-in-dev-shm",
    "service-account-token",
    "read-device",
    "mknod-device",
    "mount-device",
    "mount-proc",
    "see-processes",
    "write /proc/sys/vm/drop_caches",
    "write /proc/sys/kernel/core_pattern",
    "write /sys/kernel/mm/transparent_hugepage/enabled",
];

#[tokio::test(flavor = "multi_thread")]
async fn a_run_step_in_a_job_cannot_escape_read_the_builders_credentials_or_reach_the_node() {
    let job = JobService::start("isolation-k8s").await;
    let (cluster, service, base) = (&job.cluster, &job.service, &job.base);
    // The node's own ports: the API server's (from the kubeconfig) and the kubelet's (from
    // its config beside it), on the node's loopback and on the pod gateway.
    let kubeconfig_text = std::fs::read_to_string(&cluster.kubeconfig).unwrap();
    let api = kubeconfig_text
        .split("https://127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .parse::<u16>()
        .unwrap();
    let kubelet_config =
        std::fs::read_to_string(cluster.kubeconfig.parent().unwrap().join("kubelet.yaml")).unwrap();
    let kubelet = kubelet_config
        .lines()
        .find_map(|l| l.strip_prefix("port: "))
        .unwrap()
        .trim()
        .parse::<u16>()
        .unwrap();
    let ports = [
        port(&service.grpc_url()),
        port(&service.metrics_url()),
        api,
        kubelet,
    ];
    let targets: Vec<String> = ["127.0.0.1", POD_GATEWAY]
        .iter()
        .flat_map(|h| ports.iter().map(move |p| format!("{h}:{p}")))
        .collect();
    // The builder's credentials files, where its container has them.
    let secrets = [
        "/var/run/image-builder/auth.json".to_owned(),
        "/var/run/image-builder/git-basic".to_owned(),
    ];
    let attack = Attack::new(&secrets, targets);
    let repo = attack.repo(base);
    let (user, password) = ("builder", "isolation-git-pw-5c1e");
    let git = GitHttpServer::start_for_pods(&repo, Some((user, password))).unwrap();
    let uri = git
        .uri()
        .replace("http://", &format!("http://{user}:{password}@"));
    attack.run(service, head_build(&uri)).await;
}

/// A Dockerfile whose RUN step needs root inside the image: users, chown to them, a file made
/// by one of them, a setuid and a setgid file.
fn root_inside_dockerfile(base: &str) -> String {
    let run = [
        "echo 'root:x:0:0::/root:/bin/sh' > /etc/passwd",
        "echo 'alice:x:1001:1001::/home/alice:/bin/sh' >> /etc/passwd",
        "echo 'bob:x:1002:1002::/:/bin/sh' >> /etc/passwd",
        "printf 'root:x:0:\\nalice:x:1001:\\nbob:x:1002:\\nstaff:x:50:bob\\n' > /etc/group",
        "mkdir -p /home/alice /srv/shared /usr/local/bin",
        "chown 1001:1001 /home/alice && chmod 0750 /home/alice",
        "su alice -c 'echo mine > /home/alice/made-by-alice'",
        "echo shared > /srv/shared/bobs && chown 1002:50 /srv/shared/bobs && chmod 0640 /srv/shared/bobs",
        "cp /bin/busybox /usr/local/bin/suid-tool && chmod 4755 /usr/local/bin/suid-tool",
        "touch /srv/nobodys && chown 65534:65534 /srv/nobodys && chmod 2600 /srv/nobodys",
    ]
    .join(" && ");
    format!("FROM {base}\nRUN {run}\n")
}

/// Asserts that the pushed image `reference` (of [`root_inside_dockerfile`]) has the owners,
/// groups and modes its RUN step gave.
fn assert_owners_and_modes(reference: &str, log: &str) {
    let image = UnpackedImage::fetch(reference, None, Ownership::AsInTheImage).unwrap();
    let expected = [
        ("/home/alice", 1001, 1001, 0o40750),
        ("/home/alice/made-by-alice", 1001, 1001, 0o100644),
        ("/srv/shared/bobs", 1002, 50, 0o100640),
        ("/usr/local/bin/suid-tool", 0, 0, 0o104755),
        ("/srv/nobodys", 65534, 65534, 0o102600),
        ("/etc/passwd", 0, 0, 0o100644),
    ];
    for (file, uid, gid, mode) in expected {
        let meta = std::fs::symlink_metadata(image.path(file))
            .unwrap_or_else(|e| panic!("{file}: {e}\n{log}"));
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode()),
            (uid, gid, mode),
            "{file}: owner, group and mode (octal {:o})",
            meta.mode()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_local_build_that_needs_root_inside_gets_the_owners_and_modes_it_set() {
    let shared = shared();
    let service = service("isolation-root-inside");
    let repo = GitRepo::new(&[("Dockerfile", &root_inside_dockerfile(&shared.base))]).unwrap();
    let (last, log) = build_and_log(&service, head_build(&repo.uri())).await;
    assert_eq!(status(&last), pb::BuildStatus::DoneSuccess, "{log}");
    assert_owners_and_modes(&last.base_ref, &log);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_in_a_job_that_needs_root_inside_gets_the_owners_and_modes_it_set() {
    let job = JobService::start("isolation-k8s-root-inside").await;
    let repo = GitRepo::new(&[("Dockerfile", &root_inside_dockerfile(&job.base))]).unwrap();
    let git = GitHttpServer::start_for_pods(&repo, None).unwrap();
    let (last, log) = build_and_log(&job.service, head_build(&git.uri())).await;
    assert_eq!(status(&last), pb::BuildStatus::DoneSuccess, "{log}");
    assert_owners_and_modes(&last.base_ref, &log);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_builds_namespace_admits_the_builder_pod_and_refuses_a_privileged_one() {
    use image_builder::config::KubernetesConfig;
    use image_builder::executor::LayerCacheUse;
    use image_builder::executor::kubernetes::manifest::{self, Attempt};
    use image_builder_state::{BuildId, CloneTargetMode, DockerfileSource};
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, PostParams};

    let (cluster, namespace, executor) = test_namespace("admission").await;
    let mut executor = executor;
    executor.as_object_mut().unwrap().remove("kind");
    let config: KubernetesConfig = serde_json::from_value(executor).unwrap();
    let source = DockerfileSource {
        remote_uri: "http://10.213.0.1:1/repo.git".into(),
        target_mode: CloneTargetMode::RemoteHead,
        clone_target: String::new(),
        dockerfile_path: "Dockerfile".into(),
        context_path: ".".into(),
        dockerfile_version: String::new(),
        git_auth: false,
    };
    let attempt = Attempt {
        id: BuildId::new(),
        attempt: 1,
        source: &source,
        tag: "10.213.0.1:1/base:x",
        insecure_registries: &[],
        cache: LayerCacheUse::ReadWrite,
    };
    let job = manifest::job(&config, "admission", &attempt);
    let template = job.spec.unwrap().template;
    let pod = |spec| Pod {
        metadata: kube::api::ObjectMeta {
            name: Some("builder".into()),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    };
    let kube_config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&cluster.kubeconfig).unwrap(),
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(kube::Client::try_from(kube_config).unwrap(), &namespace);
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    // The test namespaces enforce what deploy/namespace.yaml enforces.
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/namespace.yaml"),
    )
    .unwrap();
    assert!(
        shipped.contains(&format!(
            "pod-security.kubernetes.io/enforce: {}\n",
            cluster::POD_SECURITY
        )),
        "{shipped}"
    );
    // The builder pod as the executor makes it is admitted under Pod Security `baseline`...
    let spec = template.spec.unwrap();
    pods.create(&dry_run, &pod(spec.clone())).await.unwrap();
    // ...and the privileged builder of before is refused by the API server itself.
    let mut privileged = spec;
    let security = privileged.containers[0].security_context.as_mut().unwrap();
    security.privileged = Some(true);
    security.allow_privilege_escalation = None;
    let refused = pods.create(&dry_run, &pod(privileged)).await.unwrap_err();
    let text = refused.to_string();
    assert!(
        text.contains("violates PodSecurity \"baseline") && text.contains("privileged"),
        "{text}"
    );
}

/// The password of the private registry in the credential tests: no file, environment or
/// command line may hold it, or its basic-auth token, while a RUN step runs.
const REGISTRY_PASSWORD: &str = "isolation-registry-pw-3e9b";

/// The credential of [`REGISTRY_PASSWORD`] as docker config files and basic auth carry it.
fn registry_token() -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("builder:{REGISTRY_PASSWORD}"))
}

/// A pull secret file (in `dir`) with the installation's credential for `host`.
fn pull_secret_file(dir: &Path, host: &str) -> PathBuf {
    let file = dir.join("config.json");
    let auths = serde_json::json!({"auths": {host: {"auth": registry_token()}}});
    std::fs::write(&file, auths.to_string()).unwrap();
    file
}

/// Two base images in the private registry at `host`, and a Dockerfile of two stages on
/// them that needs both: the first stage's base named through a global ARG, its RUN step the
/// attack program (holding, with `nonce`), the second stage's base named only after that
/// step, so that the step that runs the Dockerfile would need credentials to pull it.
fn two_private_stages(host: &str, nonce: &str) -> (GitRepo, String) {
    let creds = format!("builder:{REGISTRY_PASSWORD}");
    let push = |size, name| {
        let image = testkit::BaseImage::busybox(size).unwrap();
        testkit::push_image_as(&image, host, name, Some(&creds)).unwrap()
    };
    let first = push(0, "private/first:1");
    let second = push(1024, "private/second:1");
    let head = format!("ARG FIRST={first}\nFROM $FIRST AS first\n");
    let tail = format!("FROM {second}\nCOPY --from=first /attack /attack\n");
    (
        attack_repo_between(&head, &[nonce.to_owned()], &tail),
        second,
    )
}

/// Asserts that the build of [`two_private_stages`] pulled both private bases before its
/// RUN step ran, and succeeded.
fn pulled_every_base_with_credentials(last: &pb::BuildResponse, log: &str, second: &str) {
    assert_eq!(status(last), pb::BuildStatus::DoneSuccess, "{log}");
    assert!(log.contains("ATTACK holding"), "{log}");
    assert!(
        log.contains(&format!("pulling base image {second}")),
        "the second stage's base was not pulled before the build:\n{log}"
    );
}

/// Every process of this machine whose environment or command line holds one of
/// `needles`, but this test's own.
fn processes_holding(needles: &[String]) -> Vec<String> {
    let me = std::process::id();
    ["environ", "cmdline"]
        .into_iter()
        .flat_map(|file| {
            processes_where(file, |bytes| {
                needles
                    .iter()
                    .any(|n| bytes.windows(n.len()).any(|w| w == n.as_bytes()))
            })
            .into_iter()
            .filter(move |pid| *pid != me)
            .map(move |pid| format!("/proc/{pid}/{file}"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn while_a_local_run_step_runs_no_registry_credential_is_on_the_host() {
    let registry = LocalRegistry::start_with_users(&[("builder", REGISTRY_PASSWORD)]).unwrap();
    let host = registry.addr().to_owned();
    let secrets = tempfile::tempdir().unwrap();
    let mut config = common::config(&host, "isolation-no-credential");
    config["pullSecretFile"] = pull_secret_file(secrets.path(), &host)
        .display()
        .to_string()
        .into();
    let service = Service::start(binary(), config).unwrap();
    let nonce = format!("/nonexistent/{}", testkit::random_hex().unwrap());
    let (repo, second) = two_private_stages(&host, &nonce);
    let needles = vec![REGISTRY_PASSWORD.to_owned(), registry_token()];
    // Where a builder's credentials file could be (the shared memory, the service's data
    // dir: buildah's storage and configuration are there), and every process's environment
    // and arguments.
    let roots = [PathBuf::from("/dev/shm"), service.data_dir()];
    let checkout_nonce = nonce.clone();
    let watch = AttackWatch::start(&nonce, move |_| {
        // The same search finds the nonce in the checkout's Dockerfile.
        let checkout = testkit::files_containing(&roots[1], checkout_nonce.as_bytes());
        let mut found = processes_holding(&needles);
        for root in &roots {
            for needle in &needles {
                found.extend(
                    testkit::files_containing(root, needle.as_bytes())
                        .into_iter()
                        .map(|f| f.display().to_string()),
                );
            }
        }
        (found, checkout)
    });
    let (last, log) = build_and_log(&service, head_build(&repo.uri())).await;
    let seen = watch.finish(&log).await;
    let (found, checkout) = seen.expect("the RUN step was never seen running");
    assert!(
        checkout.iter().any(|f| f.ends_with("Dockerfile")),
        "the search of the data dir found not even the Dockerfile: {checkout:?}"
    );
    assert!(
        found.is_empty(),
        "while RUN ran, these held the registry credential: {found:?}"
    );
    pulled_every_base_with_credentials(&last, &log, &second);
    drop(secrets);
}

#[tokio::test(flavor = "multi_thread")]
async fn while_a_run_step_runs_in_a_job_its_container_holds_no_registry_credential() {
    let job = JobService::start_with_registry("isolation-k8s-no-credential", true).await;
    let host = job.registry.addr().to_owned();
    let nonce = format!("/nonexistent/{}", testkit::random_hex().unwrap());
    let (repo, second) = two_private_stages(&host, &nonce);
    let needles = [REGISTRY_PASSWORD.to_owned(), registry_token()];
    // What a RUN step that left its container entirely would find in the builder's: every
    // file (the Secret's mounts included, were there any) and every process's environment
    // and arguments, read through `kubectl exec` while the step runs.
    let watch = {
        let (cluster, namespace) = (job.cluster.clone(), job.namespace.clone());
        let patterns = format!("{}\n", needles.join("\n"));
        let checkout_pattern = format!("{nonce}\n");
        AttackWatch::start(&nonce, move |_| {
            let pod = cluster
                .kubectl(&["-n", &namespace, "get", "pods", "-o", "name"], "")
                .unwrap();
            let pod = pod.trim();
            let exec = |script: &str, stdin: &str| {
                cluster
                    .kubectl(
                        &[
                            "-n", &namespace, "exec", "-i", pod, "-c", "builder", "--", "sh", "-c",
                            script,
                        ],
                        stdin,
                    )
                    .unwrap()
            };
            let grep = "grep -rlsF -D skip -f - / --exclude-dir=proc --exclude-dir=sys; true";
            let files = exec(grep, &patterns);
            // The same search finds the nonce in the checkout's Dockerfile.
            let checkout = exec(grep, &checkout_pattern);
            let processes = exec(
                "for f in /proc/[0-9]*/environ /proc/[0-9]*/cmdline; do echo \"$f\"; tr '\\0' ' ' <\"$f\"; echo; done",
                "",
            );
            (pod.to_owned(), files, processes, checkout)
        })
    };
    let git = GitHttpServer::start_for_pods(&repo, None).unwrap();
    let (last, log) = build_and_log(&job.service, head_build(&git.uri())).await;
    let seen = watch.finish(&log).await;
    let (pod, files, processes, checkout) = seen.expect("the RUN step was never seen running");
    assert!(
        checkout.contains("/workspace/src/Dockerfile"),
        "the search of the builder's files found not even the Dockerfile: {checkout}"
    );
    assert!(
        files.trim().is_empty(),
        "files of the builder container of {pod} hold the registry credential:\n{files}"
    );
    assert!(
        processes.contains("/attack"),
        "the builder's processes were not read:\n{processes}"
    );
    for needle in &needles {
        assert!(
            !processes.contains(needle.as_str()),
            "a process of the builder container of {pod} holds the registry credential:\n{processes}"
        );
    }
    pulled_every_base_with_credentials(&last, &log, &second);
}
