//! The Kubernetes executor against a real single-node cluster (see the test kit's `cluster`):
//! Dockerfile builds as Jobs, credentials only in a Secret, and every restart case: the
//! service SIGKILLed while the Job is pending, while it runs, after it finished but before
//! the result was journaled, and down for longer than the Job takes. In each the restarted
//! service attaches to the same Job and the build ends as the Job did, with one log.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::*;
use image_builder::executor::kubernetes::manifest;
use image_builder::proto::builder as pb;
use image_builder_state::BuildId;
use image_builder_testkit::cluster::{self, ClusterAccess};
use image_builder_testkit::{self as testkit, GitHttpServer, GitRepo, Service};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};

const GIT_USER: &str = "builder";
const GIT_PASSWORD: &str = "kube-git-s3cret-4711";

/// The registry builder pods push to, on the test cluster's pod gateway (builder pods have
/// no host network), with the busybox base image; shared by the tests of this binary.
fn pods_shared() -> &'static Shared {
    static SHARED: std::sync::OnceLock<Shared> = std::sync::OnceLock::new();
    SHARED.get_or_init(|| {
        // The gateway's address exists once the cluster runs.
        cluster::shared().expect("the test cluster");
        let registry = testkit::LocalRegistry::start_for_pods(&[]).expect("start docker-registry");
        let image = testkit::BaseImage::busybox(0).expect("make the busybox image");
        let base =
            testkit::push_image(&image, registry.addr(), "base/busybox:1").expect("push busybox");
        Shared { registry, base }
    })
}

/// One namespace per test, in the shared cluster.
struct Rig {
    cluster: ClusterAccess,
    client: Client,
    namespace: String,
    builder_image: String,
}

impl Rig {
    async fn new(name: &str) -> Self {
        let cluster = tokio::task::spawn_blocking(cluster::shared)
            .await
            .unwrap()
            .unwrap();
        let builder_image = {
            let cluster = cluster.clone();
            tokio::task::spawn_blocking(move || cluster.builder_image())
                .await
                .unwrap()
                .unwrap()
        };
        let config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&cluster.kubeconfig).unwrap(),
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .unwrap();
        let client = Client::try_from(config).unwrap();
        let namespace = format!(
            "{name}-{}",
            &uuid::Uuid::now_v7().simple().to_string()[24..]
        );
        let ns: Namespace = serde_json::from_value(cluster::namespace(&namespace)).unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap();
        Self {
            cluster,
            client,
            namespace,
            builder_image,
        }
    }

    fn config(&self, name: &str) -> serde_json::Value {
        let mut config = common::config(pods_shared().registry.addr(), name);
        config["executor"] = serde_json::json!({
            "kind": "kubernetes",
            "namespace": self.namespace,
            "builderImage": self.builder_image,
            "seccompProfile": cluster::SECCOMP_PROFILE,
            "podTimeout": "5m",
        });
        config
    }

    /// The service's environment: the cluster's kubeconfig, and `extra`.
    fn env<'a>(&'a self, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let kubeconfig = self.cluster.kubeconfig.to_str().unwrap();
        let mut env = vec![("KUBECONFIG", kubeconfig)];
        env.extend_from_slice(extra);
        env
    }

    /// Starts the service with `config` and `extra` environment.
    fn start(&self, config: serde_json::Value, extra: &[(&str, &str)]) -> Service {
        Service::start_with_env(binary(), config, &self.env(extra)).unwrap()
    }

    fn service(&self, name: &str) -> Service {
        self.start(self.config(name), &[])
    }

    /// Restarts `service` (after a SIGKILL).
    fn restart(&self, service: &mut Service) {
        service.set_env(&self.env(&[]));
        service.kill_and_restart().unwrap();
    }

    fn jobs(&self) -> Api<Job> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Every Job ever made for `id` is gone (deleting is asynchronous: waits for it).
    async fn wait_until_no_jobs(&self, id: &str) {
        let params = ListParams::default().labels(&format!("{}={id}", manifest::BUILD_LABEL));
        for _ in 0..120 {
            let jobs = self.jobs().list(&params).await.unwrap();
            let secrets = Api::<Secret>::namespaced(self.client.clone(), &self.namespace)
                .list(&params)
                .await
                .unwrap();
            if jobs.items.is_empty() && secrets.items.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!("the jobs or secrets of build {id} were never deleted");
    }
}

/// A repository whose Dockerfile prints `start`, waits `seconds`, prints `end`, behind a
/// git server that wants credentials.
fn repository(seconds: u32) -> (GitRepo, GitHttpServer) {
    let dockerfile = format!(
        "FROM {}\nCOPY greeting.txt /greeting.txt\nRUN echo start-of-run && sleep {seconds} && echo end-of-run\n",
        pods_shared().base
    );
    let repo = GitRepo::new(&[
        ("Dockerfile", dockerfile.as_str()),
        ("greeting.txt", "hello from a job\n"),
    ])
    .unwrap();
    let server = GitHttpServer::start_for_pods(&repo, Some((GIT_USER, GIT_PASSWORD))).unwrap();
    (repo, server)
}

/// A Build request of the repository, with the git credentials in the remote URL.
fn request(server: &GitHttpServer) -> pb::BuildRequest {
    let uri = server
        .uri()
        .replace("http://", &format!("http://{GIT_USER}:{GIT_PASSWORD}@"));
    head_build(&uri)
}

async fn finish(service: &Service, id: &str) -> (pb::BuildStatus, String, String) {
    let mut client = service.client().await.unwrap();
    let log = String::from_utf8(logs_all(&mut client, id).await.unwrap()).unwrap();
    let build = ops_build(service, id).await;
    let status = match build.state.as_str() {
        "done" => pb::BuildStatus::DoneSuccess,
        "failed" | "cancelled" | "damaged" => pb::BuildStatus::DoneFailure,
        _ => pb::BuildStatus::Running,
    };
    (status, log, build.failure)
}

/// Waits until the build has ended; its status, log and failure.
async fn ended(service: &Service, id: &str) -> (pb::BuildStatus, String, String) {
    for _ in 0..600 {
        let (status, log, failure) = finish(service, id).await;
        if status != pb::BuildStatus::Running {
            return (status, log, failure);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("build {id} never ended");
}

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

/// One log: the builder's output appears exactly once, and one Job ran the attempt.
fn assert_one_log(log: &str) {
    for line in [
        "STEP 1/3: FROM",
        "\nstart-of-run\n",
        "\nend-of-run\n",
        "\npushing ",
    ] {
        assert_eq!(count(log, line), 1, "{line:?} in\n{log}");
    }
    assert_eq!(count(log, "started builder job"), 1, "{log}");
    assert!(!log.contains(GIT_PASSWORD), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dockerfile_builds_as_a_job_whose_credentials_stay_in_its_secret() {
    let rig = Rig::new("build").await;
    let (_repo, server) = repository(3);
    let service = rig.service("k8s-build");
    let mut client = service.client().await.unwrap();
    let (_stream, id) = start_build(&mut client, request(&server)).await;
    wait_for_log(&mut client, &id, "\nstart-of-run\n").await;

    // While it runs: the Job names the build and attempt; no credential is in its spec, and
    // the Secret that holds them is owned by the Job.
    let name = manifest::job_name(id.parse::<BuildId>().unwrap(), 1);
    let job = rig.jobs().get(&name).await.unwrap();
    let spec = serde_json::to_string(&job).unwrap();
    assert!(!spec.contains(GIT_PASSWORD), "{spec}");
    let secret = Api::<Secret>::namespaced(rig.client.clone(), &rig.namespace)
        .get(&manifest::secret_name(&name))
        .await
        .unwrap();
    assert_eq!(
        secret.metadata.owner_references.unwrap()[0].name,
        name,
        "the Secret belongs to the Job"
    );

    let (status, log, failure) = ended(&service, &id).await;
    assert_eq!(status, pb::BuildStatus::DoneSuccess, "{failure}\n{log}");
    assert_one_log(&log);
    let image = testkit::files_containing(&service.data_dir(), GIT_PASSWORD.as_bytes());
    assert!(image.is_empty(), "the password is in {image:?}");
    // The build is over: its Job and Secret are deleted.
    rig.wait_until_no_jobs(&id).await;
}

/// Where in a Job's life the service is killed.
#[derive(Debug, Clone, Copy)]
enum KillWhen {
    /// Right after the Job was created: its pod is still pending.
    Pending,
    /// While the builder runs.
    Running,
    /// After the builder finished, before the step's result was journaled.
    FinishedNotJournaled,
    /// While it runs, and the service stays down until the Job has finished.
    DownLongerThanTheJob,
}

async fn restart_case(when: KillWhen) {
    let rig = Rig::new(&format!("{when:?}").to_lowercase()).await;
    let (_repo, server) = repository(4);
    let name = format!("k8s-{when:?}").to_lowercase();
    let failpoints: &[(&str, &str)] = match when {
        KillWhen::FinishedNotJournaled => &[("FAILPOINTS", "transition.built.before=pause")],
        _ => &[],
    };
    let mut service = rig.start(rig.config(&name), failpoints);
    let mut client = service.client().await.unwrap();
    let (_stream, id) = start_build(&mut client, request(&server)).await;
    let job_name = manifest::job_name(id.parse::<BuildId>().unwrap(), 1);
    match when {
        KillWhen::Pending => wait_for_log(&mut client, &id, "started builder job").await,
        KillWhen::Running | KillWhen::DownLongerThanTheJob => {
            wait_for_log(&mut client, &id, "\nstart-of-run\n").await
        }
        KillWhen::FinishedNotJournaled => {
            wait_for_service_log(&service, "failpoint reached").await;
            String::new()
        }
    };
    service.kill();
    if matches!(when, KillWhen::DownLongerThanTheJob) {
        let done = kube::runtime::wait::await_condition(
            rig.jobs(),
            &job_name,
            kube::runtime::wait::conditions::is_job_completed(),
        );
        tokio::time::timeout(Duration::from_secs(120), done)
            .await
            .unwrap()
            .unwrap();
    }
    rig.restart(&mut service);
    let (status, log, failure) = ended(&service, &id).await;
    assert_eq!(
        status,
        pb::BuildStatus::DoneSuccess,
        "{when:?}: {failure}\n{log}"
    );
    assert_one_log(&log);
    assert_eq!(
        count(&log, "attaching to builder job"),
        1,
        "{when:?}: {log}"
    );
    rig.wait_until_no_jobs(&id).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_while_the_job_is_pending_attaches_to_it() {
    restart_case(KillWhen::Pending).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_while_the_job_runs_attaches_and_the_log_goes_on_without_gap_or_duplicate() {
    restart_case(KillWhen::Running).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_after_the_job_finished_but_before_the_result_was_journaled_attaches() {
    restart_case(KillWhen::FinishedNotJournaled).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_down_longer_than_the_job_takes_finds_its_result() {
    restart_case(KillWhen::DownLongerThanTheJob).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_pod_fails_the_attempt_and_a_retry_runs_a_new_job() {
    let rig = Rig::new("evicted").await;
    // A public repository: a retry has the whole request again (credentials are never kept
    // once an attempt ends).
    let (repo, _) = repository(20);
    let server = GitHttpServer::start_for_pods(&repo, None).unwrap();
    let service = rig.service("k8s-evicted");
    let mut client = service.client().await.unwrap();
    let (_stream, id) = start_build(&mut client, head_build(&server.uri())).await;
    wait_for_log(&mut client, &id, "\nstart-of-run\n").await;
    let pods = Api::<Pod>::namespaced(rig.client.clone(), &rig.namespace);
    let job_name = manifest::job_name(id.parse::<BuildId>().unwrap(), 1);
    let list = pods
        .list(&ListParams::default().labels(&format!("job-name={job_name}")))
        .await
        .unwrap();
    let pod = list.items[0].metadata.name.clone().unwrap();
    pods.delete(&pod, &DeleteParams::default()).await.unwrap();

    let (status, log, failure) = ended(&service, &id).await;
    assert_eq!(status, pb::BuildStatus::DoneFailure, "{log}");
    assert!(failure.contains("went away"), "{failure}");
    assert!(failure.contains(&pod), "{failure}");

    let mut ops = ops_client(&service).await;
    let retried = ops
        .retry_build(image_builder::proto::ops::RetryBuildRequest {
            build_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retried.attempt, 2);
    // Same request, new attempt, new Job; the attempt ends as its Job does.
    let (status, log, failure) = ended(&service, &id).await;
    assert_eq!(status, pb::BuildStatus::DoneSuccess, "{failure}\n{log}");
    assert_eq!(count(&log, "started builder job"), 2, "{log}");
    rig.wait_until_no_jobs(&id).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_deletes_the_job_and_its_secret() {
    let rig = Rig::new("cancel").await;
    let (_repo, server) = repository(60);
    let service = rig.service("k8s-cancel");
    let mut client = service.client().await.unwrap();
    let (_stream, id) = start_build(&mut client, request(&server)).await;
    wait_for_log(&mut client, &id, "\nstart-of-run\n").await;
    let mut ops = ops_client(&service).await;
    ops.cancel_build(image_builder::proto::ops::CancelBuildRequest {
        build_id: id.clone(),
        reason: "not needed".into(),
    })
    .await
    .unwrap();
    let (status, _, failure) = ended(&service, &id).await;
    assert_eq!(status, pb::BuildStatus::DoneFailure);
    assert!(failure.contains("not needed"), "{failure}");
    rig.wait_until_no_jobs(&id).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_no_build_knows_is_deleted_by_the_sweep_and_counted() {
    let rig = Rig::new("orphan").await;
    let mut config = rig.config("k8s-orphan");
    config["executor"]["orphanGrace"] = "2s".into();
    let service = rig.start(config, &[]);
    let log = service.log();
    let installation = log
        .split("installation=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the service names its installation")
        .to_owned();

    // A Job with this installation's labels, for a build the journal has never seen (as after
    // a store was wiped), and one of another installation, which must stay.
    let orphan_id = BuildId::new();
    let mut orphan: Job = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "orphan"},
        "spec": {"backoffLimit": 0, "template": {"spec": {
            "restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "c", "image": cluster::BUSYBOX_IMAGE,
                            "imagePullPolicy": "Never", "command": ["sleep", "600"]}]}}}
    }))
    .unwrap();
    orphan.metadata.labels = Some(manifest::labels(&installation, orphan_id, 1));
    let mut foreign = orphan.clone();
    foreign.metadata.name = Some("foreign".into());
    foreign.metadata.labels = Some(manifest::labels("another", orphan_id, 1));
    for job in [&orphan, &foreign] {
        rig.jobs()
            .create(&PostParams::default(), job)
            .await
            .unwrap();
    }

    // Deleted by the sweep: gone, or on its way out (a foreground deletion keeps the Job until
    // the kubelet has stopped its pod, which a busy node can take a while to do).
    eventually("the orphan is deleted", async || {
        match rig
            .jobs()
            .get_opt("orphan")
            .await
            .map_err(|e| e.to_string())?
        {
            Some(job) if job.metadata.deletion_timestamp.is_none() => Err(format!(
                "what the service said of jobs:\n{}",
                service
                    .log()
                    .lines()
                    .filter(|line| line.contains("job"))
                    .collect::<Vec<_>>()
                    .join("\n")
            )),
            _ => Ok(()),
        }
    })
    .await;
    let foreign = rig.jobs().get_opt("foreign").await.unwrap();
    assert!(
        foreign.is_some_and(|job| job.metadata.deletion_timestamp.is_none()),
        "another installation's Job was touched"
    );
    // Counted once the sweep is done with it (its Secret is deleted after the Job).
    let counted = eventually("the orphan is counted", async || {
        match metric(&service, "image_builder_orphan_jobs_deleted_total").await {
            Some(n) if n > 0.0 => Ok(n),
            seen => Err(format!("the counter reads {seen:?}")),
        }
    })
    .await;
    assert_eq!(counted, 1.0);
}

/// `deploy/image-builder.yaml`, applied to the test cluster with what this cluster needs: the
/// test's image, registry and namespace in the ConfigMap, and (the test node runs no
/// kube-proxy, so no pod can reach a service IP) the host network with the API server's
/// loopback address for the in-cluster config. Then a build through the deployed service.
#[tokio::test(flavor = "multi_thread")]
async fn the_deployed_service_runs_a_build_through_its_jobs() {
    let rig = Rig::new("deploy").await;
    let binary = std::env::var("IMAGE_BUILDER_RELEASE_BINARY")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| binary().to_owned());
    let image = "localhost/image-builder/service:test";
    let archive = tokio::task::spawn_blocking(move || cluster::service_image(&binary, image))
        .await
        .unwrap()
        .unwrap();
    rig.cluster.import_image(&archive.path()).unwrap();
    drop(archive);

    let data = tempfile::Builder::new()
        .prefix("deployed-data-")
        .tempdir_in("/var/tmp")
        .unwrap();
    // A hostPath volume takes no fsGroup: the service's user owns it, as a provisioner's
    // volume would let it write through its group.
    std::os::unix::fs::chown(data.path(), Some(SERVICE_UID), Some(SERVICE_UID)).unwrap();
    let pv = format!("{}-data", rig.namespace);
    kubectl(
        &rig,
        &["apply", "-f", "-"],
        &serde_json::json!({
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": pv},
            "spec": {"capacity": {"storage": "10Gi"}, "accessModes": ["ReadWriteOnce"],
                     "persistentVolumeReclaimPolicy": "Retain",
                     "hostPath": {"path": data.path().display().to_string()}}
        })
        .to_string(),
    );

    // The Secret cert-manager would write: the service's certificate (for 127.0.0.1, where
    // the probes connect; server and client usages) and the CA that also signs the
    // operator's client certificate.
    let pki = tempfile::tempdir().unwrap();
    let ca = testkit::pki::Authority::create(pki.path(), "deploy-test-ca").unwrap();
    let serving = ca
        .issue(
            "serving",
            &testkit::pki::Issue {
                common_name: "image-builder",
                alt_names: &["127.0.0.1", "localhost", "image-builder"],
                ..Default::default()
            },
        )
        .unwrap();
    let operator = ca
        .issue(
            "operator",
            &testkit::pki::Issue {
                common_name: "image-builder-operator",
                client: true,
                ..Default::default()
            },
        )
        .unwrap();
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap();
    kubectl(
        &rig,
        &["-n", &rig.namespace, "apply", "-f", "-"],
        &serde_json::json!({
            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": "image-builder-tls"},
            "stringData": {"tls.crt": read(&serving.cert), "tls.key": read(&serving.key),
                           "ca.crt": read(&ca.ca())}
        })
        .to_string(),
    );

    let grpc = testkit::free_port().unwrap();
    let metrics = testkit::free_port().unwrap();
    let mut config = rig.config("k8s-deployed");
    config["grpcAddress"] = format!("0.0.0.0:{grpc}").into();
    config["tls"] = serde_json::json!({
        "certFile": "/etc/image-builder/tls/tls.crt",
        "keyFile": "/etc/image-builder/tls/tls.key",
        "clientCAFile": "/etc/image-builder/tls/ca.crt",
    });
    config["access"]["operators"] = serde_json::json!(["image-builder-operator"]);
    config["metricsAddress"] = format!("0.0.0.0:{metrics}").into();
    config["dataDir"] = "/data".into();
    config["builds"]["allowLocalRepositories"] = false.into();
    let kubeconfig = std::fs::read_to_string(&rig.cluster.kubeconfig).unwrap();
    let api_port = kubeconfig
        .split("https://127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .to_owned();
    let manifests = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/image-builder.yaml"),
    )
    .unwrap();
    let config_start = manifests.find("  config.json: |\n").unwrap();
    let config_end = config_start + manifests[config_start..].find("\n---").unwrap();
    let indented = serde_json::to_string_pretty(&config)
        .unwrap()
        .lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n");
    let manifests = format!(
        "{}  config.json: |\n{indented}{}",
        &manifests[..config_start],
        &manifests[config_end..]
    )
    .replace("localhost/image-builder/service:0.1.0", image)
    .replace("containerPort: 8080", &format!("containerPort: {grpc}"))
    .replace("\"127.0.0.1:8080\"", &format!("\"127.0.0.1:{grpc}\""))
    .replace("containerPort: 9500", &format!("containerPort: {metrics}"))
    .replace(
        "      serviceAccountName: image-builder\n",
        "      serviceAccountName: image-builder\n      hostNetwork: true\n",
    )
    .replace(
        "          env:\n",
        &format!(
            "          env:\n            - {{name: KUBERNETES_SERVICE_HOST, value: \"127.0.0.1\"}}\n            - {{name: KUBERNETES_SERVICE_PORT, value: \"{api_port}\"}}\n"
        ),
    );
    // The test cluster runs no service network, so the service's pod reaches the API server
    // on the node's loopback, through the node's network: Pod Security `baseline` refuses
    // that, so this namespace alone lets it (builder pods still ask for no privilege; the
    // other tests' namespaces enforce `baseline` on them).
    kubectl(
        &rig,
        &[
            "label",
            "namespace",
            &rig.namespace,
            "--overwrite",
            "pod-security.kubernetes.io/enforce=privileged",
        ],
        "",
    );
    kubectl(
        &rig,
        &["-n", &rig.namespace, "apply", "-f", "-"],
        &manifests,
    );
    kubectl(
        &rig,
        &[
            "-n",
            &rig.namespace,
            "rollout",
            "status",
            "statefulset/image-builder",
            "--timeout=180s",
        ],
        "",
    );
    // The service runs as the image's user, unable to write its own root file system.
    let inside = kubectl(
        &rig,
        &[
            "-n",
            &rig.namespace,
            "exec",
            "image-builder-0",
            "--",
            "sh",
            "-c",
            "id -u; touch /written 2>&1 || true; touch /tmp/written && echo tmp-writable",
        ],
        "",
    );
    assert!(
        inside.starts_with(&format!("{SERVICE_UID}\n"))
            && inside.contains("Read-only file system")
            && inside.contains("tmp-writable"),
        "{inside}"
    );

    let repo = GitRepo::new(&[(
        "Dockerfile",
        format!(
            "FROM {}\nRUN echo built-in-the-cluster > /where\n",
            pods_shared().base
        )
        .as_str(),
    )])
    .unwrap();
    let server = GitHttpServer::start_for_pods(&repo, None).unwrap();
    // Only over mTLS, with a certificate of the CA.
    let address = format!("127.0.0.1:{grpc}");
    let as_operator = image_builder::client::ClientOptions {
        tls_ca: Some(ca.ca()),
        tls_cert: Some(operator.cert.clone()),
        tls_key: Some(operator.key.clone()),
        token_file: None,
    };
    let connector = as_operator.connector().unwrap();
    let mut client = connector.builder(&address).await.unwrap();
    let responses = build_all(&mut client, head_build(&server.uri()))
        .await
        .unwrap();
    let last = responses.last().unwrap();
    let id = build_id(&responses[0]);
    let log = String::from_utf8(logs_all(&mut client, &id).await.unwrap()).unwrap();
    assert_eq!(
        status(last),
        pb::BuildStatus::DoneSuccess,
        "{last:?}\n{log}"
    );
    assert!(log.contains("started builder job"), "{log}");
    let made = testkit::read_file_from_image(&last.r#ref, "/where").unwrap();
    assert_eq!(made, b"built-in-the-cluster\n");
    // The store is on the volume.
    assert!(data.path().join("store").is_dir());
    // The operator's certificate opens the ops API; a plain-text client gets nowhere.
    let mut ops = connector.ops(&address).await.unwrap();
    let shown = ops
        .get_build(image_builder::proto::ops::GetBuildRequest {
            build_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown.state, "done");
    let plain = image_builder::client::ClientOptions::default()
        .connector()
        .unwrap();
    let refused = match plain.builder(&address).await {
        Err(_) => true,
        Ok(mut c) => c
            .list_builds(pb::ListBuildsRequest::default())
            .await
            .is_err(),
    };
    assert!(refused, "the deployed service speaks only TLS");

    kubectl(
        &rig,
        &[
            "-n",
            &rig.namespace,
            "delete",
            "statefulset",
            "image-builder",
            "--wait=true",
        ],
        "",
    );
    kubectl(
        &rig,
        &["delete", "persistentvolume", &pv, "--wait=false"],
        "",
    );
}

/// The user `deploy/Containerfile` runs the service as.
const SERVICE_UID: u32 = 65532;

/// Runs kubectl as the admin with `stdin` and returns its output; panics with it and the
/// namespace's report when it fails.
fn kubectl(rig: &Rig, args: &[&str], stdin: &str) -> String {
    rig.cluster
        .kubectl(args, stdin)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", rig.cluster.report(&rig.namespace)))
}

/// Resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib * 1024
}

/// Fifty distinct Dockerfile builds under `builds.maxConcurrent: 10`, ten and then forty at
/// once: all end right, and no more than ten Jobs exist at once while builds wait their turn.
/// The service's heap at rest after each batch is printed, not asserted: it grew 1.5 MiB over
/// the forty when the test ran alone and 19 MiB beside the other Kubernetes tests, so no bound
/// separates a leak of the size once found (kept registry answers holding their connection's
/// read buffer, 9.7 MiB here) from the machine's load; that defect has an exact test of its
/// own (`registry::known::tests::a_kept_manifest_does_not_hold_the_buffer_it_was_read_into`),
/// and the order of admission is the orchestrator's (`builds_are_admitted_in_order_within_the_limit`).
#[tokio::test(flavor = "multi_thread")]
async fn fifty_builds_run_as_jobs_within_the_limit() {
    const FIRST: usize = 10;
    const THEN: usize = 40;
    const LIMIT: usize = 10;
    let rig = Rig::new("fifty").await;
    let repo = GitRepo::new(&[(
        "Dockerfile",
        format!(
            "FROM {}\nRUN for i in $(seq 1 300); do echo output-line-$i; done\n",
            pods_shared().base
        )
        .as_str(),
    )])
    .unwrap();
    let server = GitHttpServer::start_for_pods(&repo, None).unwrap();
    let mut config = rig.config("k8s-fifty");
    config["builds"]["maxConcurrent"] = LIMIT.into();
    let service = rig.start(config, &[]);
    let pid = service.pid().unwrap();
    let mut client = service.client().await.unwrap();
    let before = (rest_heap(&service).await, rss(pid));

    let mut ids = Vec::new();
    let mut most_jobs = 0;
    let mut at_rest = Vec::new();
    for batch in [0..FIRST, FIRST..FIRST + THEN] {
        let mut streams = Vec::new();
        for i in batch {
            let mut request = head_build(&server.uri());
            if let Some(pb::build_source::From::File(file)) =
                request.source.as_mut().and_then(|s| s.from.as_mut())
            {
                file.dockerfile_version = format!("v{i}");
            }
            let (stream, id) = start_build(&mut client, request).await;
            ids.push(id);
            streams.push(stream);
        }
        // Until every build of the batch has ended, and its Jobs are gone.
        let waiting_since = std::time::Instant::now();
        loop {
            assert!(
                waiting_since.elapsed() < Duration::from_secs(900),
                "the builds did not end, or their Jobs stayed, for 15 minutes\n{}",
                rig.cluster.report(&rig.namespace)
            );
            let jobs = rig.jobs().list(&ListParams::default()).await.unwrap();
            let live = jobs
                .items
                .iter()
                .filter(|j| j.metadata.deletion_timestamp.is_none())
                .count();
            most_jobs = most_jobs.max(live);
            let mut ops = ops_client(&service).await;
            let list = ops
                .list_builds(image_builder::proto::ops::ListBuildsRequest {
                    page_size: 100,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let ended = list
                .builds
                .iter()
                .filter(|b| matches!(b.state.as_str(), "done" | "failed" | "cancelled"))
                .count();
            if ended == ids.len() && jobs.items.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        drop(streams);
        at_rest.push((rest_heap(&service).await, rss(pid)));
    }

    let mut ops = ops_client(&service).await;
    for id in &ids {
        let build = ops
            .get_build(image_builder::proto::ops::GetBuildRequest {
                build_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            build.state,
            "done",
            "{id}: {}\n{}",
            build.failure,
            rig.cluster.report(&rig.namespace)
        );
    }
    assert!(most_jobs <= LIMIT, "{most_jobs} jobs at once");
    assert!(
        most_jobs >= 2,
        "builds ran side by side: at most {most_jobs} jobs at once"
    );
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    let ((warm, warm_rss), (after, after_rss)) = (at_rest[0], at_rest[1]);
    eprintln!(
        "service heap at rest (resident size): {:.1} ({:.1}) MiB before, {:.1} ({:.1}) MiB after {FIRST} builds, {:.1} ({:.1}) MiB after {THEN} more ({most_jobs} jobs at once)",
        mib(before.0),
        mib(before.1),
        mib(warm),
        mib(warm_rss),
        mib(after),
        mib(after_rss)
    );
}

/// The service's heap in use at rest: the least of a few scrapes over two seconds, so a
/// moment's buffers (a watch event, the scrape itself) do not count.
async fn rest_heap(service: &Service) -> u64 {
    let mut least = u64::MAX;
    for _ in 0..10 {
        let heap = metric(service, "image_builder_heap_bytes")
            .await
            .expect("the service exports image_builder_heap_bytes");
        least = least.min(heap as u64);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    least
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_past_its_time_limit_fails_and_its_job_is_deleted() {
    let rig = Rig::new("timeout").await;
    let (repo, _) = repository(300);
    let server = GitHttpServer::start_for_pods(&repo, None).unwrap();
    let mut config = rig.config("k8s-timeout");
    config["builds"]["timeout"] = "15s".into();
    let service = rig.start(config, &[]);
    let mut client = service.client().await.unwrap();
    let (_stream, id) = start_build(&mut client, head_build(&server.uri())).await;
    let (status, _, failure) = ended(&service, &id).await;
    assert_eq!(status, pb::BuildStatus::DoneFailure);
    assert!(failure.contains("time limit"), "{failure}");
    rig.wait_until_no_jobs(&id).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn builder_pods_share_their_steps_through_the_layer_cache_repository() {
    let rig = Rig::new("layers").await;
    let base = &pods_shared().base;
    let steps = |last: &str| {
        format!(
            "FROM {base}\nRUN echo \"shared-$((20+1))\" | tee /shared.txt\nRUN echo \"slow-$((20+2))\" && sleep 1\nRUN echo \"{last}-$((30+1))\" | tee /last.txt\n"
        )
    };
    let repo = GitRepo::new(&[
        ("first.Dockerfile", steps("first").as_str()),
        ("second.Dockerfile", steps("second").as_str()),
    ])
    .unwrap();
    let server = GitHttpServer::start_for_pods(&repo, Some((GIT_USER, GIT_PASSWORD))).unwrap();
    let uri = server
        .uri()
        .replace("http://", &format!("http://{GIT_USER}:{GIT_PASSWORD}@"));
    let mut config = rig.config("k8s-layers");
    let cache = format!("{}/k8s-layers/cache", pods_shared().registry.addr());
    config["executor"]["layerCacheRepository"] = cache.clone().into();
    let service = rig.start(config, &[]);
    let mut client = service.client().await.unwrap();
    let mut logs = Vec::new();
    for path in ["first.Dockerfile", "second.Dockerfile"] {
        let request = dockerfile_build(
            &uri,
            image_builder::proto::contentservice::CloneTargetMode::RemoteHead,
            "",
            path,
            ".",
        );
        let (_stream, id) = start_build(&mut client, request).await;
        let (status, log, failure) = ended(&service, &id).await;
        assert_eq!(status, pb::BuildStatus::DoneSuccess, "{failure}\n{log}");
        logs.push(log);
    }
    // The first pod ran every step and filled the cache repository; the second, a new pod
    // with nothing of its own, took the two shared steps from there.
    assert_eq!(count(&logs[0], "Using cache"), 0, "{}", logs[0]);
    assert!(logs[0].contains("\nshared-21\n"), "{}", logs[0]);
    assert_eq!(count(&logs[1], "Using cache"), 2, "{}", logs[1]);
    assert!(!logs[1].contains("shared-21\n"), "{}", logs[1]);
    assert!(!logs[1].contains("slow-22\n"), "{}", logs[1]);
    assert!(logs[1].contains("\nsecond-31\n"), "{}", logs[1]);
    assert!(logs[1].contains(&cache), "{}", logs[1]);
}

#[tokio::test(flavor = "multi_thread")]
async fn under_content_keys_a_builder_pod_checks_out_the_commit_its_key_names() {
    let rig = Rig::new("content").await;
    let (repo, server) = repository(0);
    let mut config = rig.config("k8s-content");
    config["builds"]["baseImageKey"] = "content".into();
    let service = rig.start(config, &[]);
    let mut client = service.client().await.unwrap();
    let (_stream, id) = start_build(&mut client, request(&server)).await;
    let (status, log, failure) = ended(&service, &id).await;
    assert_eq!(status, pb::BuildStatus::DoneSuccess, "{failure}\n{log}");
    // The pod fetched that one commit, not the repository's history.
    assert!(!log.contains("fetching the whole repository"), "{log}");
    let shown = ops_build(&service, &id).await;
    let head = repo.head().unwrap();
    assert!(
        shown.source.contains(&head),
        "pinned to {head}: {}",
        shown.source
    );
    let list = client
        .list_builds(pb::ListBuildsRequest {})
        .await
        .unwrap()
        .into_inner();
    let built = list.builds.iter().find(|b| b.build_id == id).unwrap();
    let greeting = testkit::read_file_from_image(&built.r#ref, "/greeting.txt").unwrap();
    assert_eq!(greeting, b"hello from a job\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dockerfile_that_leaves_the_checkout_fails_the_job_saying_so() {
    let rig = Rig::new("escape").await;
    let repo = GitRepo::new(&[("Dockerfile", "FROM scratch\n")]).unwrap();
    // A symlink out of the checkout, to a file every container has.
    repo.commit_symlink("Escape", "/etc/hostname").unwrap();
    let server = GitHttpServer::start_for_pods(&repo, Some((GIT_USER, GIT_PASSWORD))).unwrap();
    let uri = server
        .uri()
        .replace("http://", &format!("http://{GIT_USER}:{GIT_PASSWORD}@"));
    let service = rig.service("k8s-escape");
    let mut client = service.client().await.unwrap();
    let request = dockerfile_build(
        &uri,
        image_builder::proto::contentservice::CloneTargetMode::RemoteHead,
        "",
        "Escape",
        ".",
    );
    let (_stream, id) = start_build(&mut client, request).await;
    let (status, log, failure) = ended(&service, &id).await;
    assert_eq!(status, pb::BuildStatus::DoneFailure, "{failure}\n{log}");
    assert!(
        log.contains("the Dockerfile Escape leaves the repository"),
        "{failure}\n{log}"
    );
    assert!(!log.contains("pulling base image"), "{log}");
    rig.wait_until_no_jobs(&id).await;
}
