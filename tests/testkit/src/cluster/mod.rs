//! A real single-node Kubernetes for the tests: etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler, containerd and a kubelet, all on loopback, in a work directory of their
//! own. Kubernetes, etcd, containerd and runc are built from their Go modules by
//! `scripts/peers/kubernetes.sh` (cached by version); the CNI plugins are Debian's.
//!
//! What this machine needs, found by trying: cgroups v1 with the `cgroupfs` driver (the
//! kubelet refuses cgroup v1 unless told `failCgroupV1: false`), and `restrict_oom_score_adj`
//! in containerd's CRI config since root lacks `CAP_SYS_RESOURCE`. Pods that must reach
//! loopback services use the host network; the others get a bridge whose traffic cannot leave
//! the machine (no masquerade, and a firewall rule drops whatever it sends outside its own
//! subnet).
//!
//! Dropping the [`Cluster`] stops the kubelet, then every container, then the rest, and
//! removes the mounts, network namespaces, bridge and firewall rule it made.

mod images;
mod pki;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub use images::NodeImages;
pub use pki::NODE_NAME;
use pki::Pki;

use crate::process::spawn;
use image_builder_scenario::fixtures::run;

/// The pod network's bridge and subnet (no masquerade: nothing it sends leaves the machine).
const BRIDGE: &str = "ibtest0";
const POD_SUBNET: &str = "10.213.0.0/24";
/// The bridge's own address on the node, the pods' gateway: where the tests' registries and
/// git servers listen so that builder pods (which have no host network) reach them.
pub const POD_GATEWAY: &str = "10.213.0.1";
/// The Pod Security level every test namespace enforces: builder pods (user namespaces, no
/// privilege, the builder's seccomp profile) must be admitted under it.
pub const POD_SECURITY: &str = "baseline";
/// The builder's seccomp profile, as builder pods name it (`localhostProfile`), under the
/// kubelet's `seccomp` directory.
pub const SECCOMP_PROFILE: &str = "image-builder/builder.json";
/// The service network: no kube-proxy runs, so nothing may rely on it.
const SERVICE_SUBNET: &str = "10.214.0.0/24";
/// The name containerd gives the sandbox ("pause") image; the node images provide it.
pub const PAUSE_IMAGE: &str = "localhost/image-builder-test/pause:1";
/// ctr waits forever for a containerd that is gone unless told otherwise.
const CTR_TIMEOUTS: [&str; 4] = ["--connect-timeout", "5s", "--timeout", "120s"];
/// A busybox image on the node.
pub const BUSYBOX_IMAGE: &str = "localhost/image-builder-test/busybox:1";

/// A test namespace: it enforces Pod Security [`POD_SECURITY`], so that the API server
/// itself refuses a builder pod that asks for more (privilege, host network, ...).
pub fn namespace(name: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": name,
            "labels": {
                "pod-security.kubernetes.io/enforce": POD_SECURITY,
                "pod-security.kubernetes.io/enforce-version": "latest",
            },
        },
    })
}

/// A running single-node cluster.
pub struct Cluster {
    dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    kubeconfig: PathBuf,
    children: Vec<(&'static str, Child)>,
    firewall: bool,
}

/// Where the node's binaries are (Kubernetes, etcd, containerd, ctr, runc):
/// `IMAGE_BUILDER_KUBERNETES_BIN`, or what the peer script builds (or finds cached).
pub fn kubernetes_bin() -> Result<PathBuf> {
    static BIN: std::sync::OnceLock<std::result::Result<PathBuf, String>> =
        std::sync::OnceLock::new();
    BIN.get_or_init(|| match std::env::var("IMAGE_BUILDER_KUBERNETES_BIN") {
        Ok(dir) => Ok(PathBuf::from(dir)),
        Err(_) => peer_script("kubernetes.sh").map_err(|e| format!("{e:#}")),
    })
    .clone()
    .map_err(|e| anyhow::anyhow!(e))
}

/// The path of one of the node's programs (`kubectl`, `ctr`, ...), built with the cluster.
pub fn node_tool(name: &str) -> Result<String> {
    Ok(path(&kubernetes_bin()?.join(name)))
}

/// Runs `scripts/peers/<name>` (it builds or finds its peer, cached) and returns the path it
/// prints.
fn peer_script(name: &str) -> Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../scripts/peers")
        .join(name);
    let out = Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed ({})", script.display(), out.status);
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

impl Cluster {
    /// Starts a cluster in a fresh temporary directory and waits until its node is Ready
    /// and the default service account exists.
    pub fn start() -> Result<Self> {
        let tmp = tempfile::Builder::new()
            .prefix("ib-cluster-")
            .tempdir_in("/var/tmp")?;
        let dir = tmp.path().to_owned();
        let mut cluster = Self {
            dir,
            _tmp: Some(tmp),
            kubeconfig: PathBuf::new(),
            children: Vec::new(),
            firewall: false,
        };
        if let Err(e) = cluster.bring_up() {
            let kept = cluster.keep_dir();
            return Err(e.context(format!(
                "the cluster's files are kept in {}",
                kept.display()
            )));
        }
        Ok(cluster)
    }

    /// The admin's kubeconfig.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// containerd's socket, for `ctr`.
    pub fn containerd_socket(&self) -> PathBuf {
        self.dir.join("containerd/containerd.sock")
    }

    /// The cluster's work directory (logs of each component under `logs/`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs kubectl as the admin and returns its output.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let kubeconfig = path(&self.kubeconfig);
        let mut all = vec!["--kubeconfig", kubeconfig.as_str()];
        all.extend_from_slice(args);
        Ok(run(&node_tool("kubectl")?, &all)?)
    }

    /// Imports a `docker-archive` tarball into the node's containerd, for pods with
    /// `imagePullPolicy: Never`.
    pub fn import_image(&self, archive: &Path) -> Result<()> {
        self.access().import_image(archive)
    }

    fn ctr(&self, args: &[&str]) -> Result<String> {
        ctr(&self.containerd_socket(), args)
    }

    fn bring_up(&mut self) -> Result<()> {
        let started = Instant::now();
        let bin = kubernetes_bin()?;
        let dir = self.dir.clone();
        std::fs::create_dir_all(dir.join("logs"))?;
        let pki = Pki::create(&dir.join("pki"))?;

        let etcd_port = crate::free_port()?;
        let etcd_peer = crate::free_port()?;
        self.run(
            "etcd",
            Command::new(bin.join("etcd")).args([
                "--data-dir",
                &path(&dir.join("etcd")),
                "--listen-client-urls",
                &format!("http://127.0.0.1:{etcd_port}"),
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{etcd_port}"),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{etcd_peer}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{etcd_peer}"),
                "--initial-cluster",
                &format!("default=http://127.0.0.1:{etcd_peer}"),
                "--unsafe-no-fsync",
            ]),
        )?;

        let api_port = crate::free_port()?;
        let server = format!("https://127.0.0.1:{api_port}");
        let apiserver = pki.pair("apiserver");
        let kubelet_client = pki.pair("apiserver-kubelet-client");
        let sa = pki.service_account_keys();
        self.run(
            "kube-apiserver",
            Command::new(bin.join("kube-apiserver")).args([
                &format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                &format!("--secure-port={api_port}"),
                &format!("--tls-cert-file={}", path(&apiserver.cert)),
                &format!("--tls-private-key-file={}", path(&apiserver.key)),
                &format!("--client-ca-file={}", path(&pki.ca())),
                &format!(
                    "--kubelet-client-certificate={}",
                    path(&kubelet_client.cert)
                ),
                &format!("--kubelet-client-key={}", path(&kubelet_client.key)),
                "--kubelet-preferred-address-types=Hostname",
                &format!("--service-account-key-file={}", path(&sa.cert)),
                &format!("--service-account-signing-key-file={}", path(&sa.key)),
                "--service-account-issuer=https://kubernetes.default.svc",
                &format!("--service-cluster-ip-range={SERVICE_SUBNET}"),
                "--authorization-mode=Node,RBAC",
                "--allow-privileged=true",
                "--endpoint-reconciler-type=none",
            ]),
        )?;

        self.kubeconfig = dir.join("admin.kubeconfig");
        write_kubeconfig(&self.kubeconfig, &server, &pki, "admin")?;
        let node_kubeconfig = dir.join("node.kubeconfig");
        write_kubeconfig(&node_kubeconfig, &server, &pki, "node")?;
        self.wait("the API server to be ready", Duration::from_secs(60), |c| {
            Ok(c.kubectl(&["get", "--raw", "/readyz"])?.trim() == "ok")
        })?;

        let admin = path(&self.kubeconfig);
        self.run(
            "kube-controller-manager",
            Command::new(bin.join("kube-controller-manager")).args([
                &format!("--kubeconfig={admin}"),
                "--leader-elect=false",
                "--secure-port=0",
                "--controllers=*,-node-ipam-controller",
                &format!("--service-account-private-key-file={}", path(&sa.key)),
                &format!("--root-ca-file={}", path(&pki.ca())),
                "--use-service-account-credentials=false",
            ]),
        )?;
        self.run(
            "kube-scheduler",
            Command::new(bin.join("kube-scheduler")).args([
                &format!("--kubeconfig={admin}"),
                "--leader-elect=false",
                "--secure-port=0",
            ]),
        )?;

        self.start_containerd(&bin)?;
        NodeImages::get()?.import(self)?;
        self.start_kubelet(&bin, &pki, &node_kubeconfig)?;
        self.wait("the node to be Ready", Duration::from_secs(120), |c| {
            let ready = c.kubectl(&[
                "get",
                "node",
                NODE_NAME,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ]);
            Ok(ready.is_ok_and(|s| s.trim() == "True"))
        })?;
        self.wait(
            "the default service account",
            Duration::from_secs(60),
            |c| Ok(c.kubectl(&["get", "serviceaccount", "default"]).is_ok()),
        )?;
        tracing::info!(
            dir = %self.dir.display(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "test cluster ready"
        );
        Ok(())
    }

    fn start_containerd(&mut self, bin: &Path) -> Result<()> {
        let dir = self.dir.join("containerd");
        let cni_conf = self.dir.join("cni/net.d");
        std::fs::create_dir_all(&cni_conf)?;
        std::fs::write(
            cni_conf.join("10-ibtest.conflist"),
            serde_json::to_string_pretty(&serde_json::json!({
                "cniVersion": "0.4.0",
                "name": "ibtest",
                "plugins": [{
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": true,
                    "ipMasq": false,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_SUBNET}]],
                        "dataDir": path(&self.dir.join("cni/ipam")),
                    },
                }],
            }))?,
        )?;
        // The bridge and its address exist before any pod, so that registries and git
        // servers can listen there from the start (the bridge plugin takes it as it is).
        let _ = Command::new("ip").args(["link", "delete", BRIDGE]).status();
        run("ip", &["link", "add", BRIDGE, "type", "bridge"])?;
        run(
            "ip",
            &["addr", "add", &format!("{POD_GATEWAY}/24"), "dev", BRIDGE],
        )?;
        run("ip", &["link", "set", BRIDGE, "up"])?;
        // Nothing a pod sends may leave the machine: drop what the pod subnet sends anywhere
        // but to itself.
        run(
            "iptables",
            &[
                "-I", "FORWARD", "-s", POD_SUBNET, "!", "-d", POD_SUBNET, "-j", "DROP",
            ],
        )
        .context("adding the pod network's firewall rule")?;
        self.firewall = true;

        let config = format!(
            r#"version = 3
root = "{root}"
state = "{state}"
[grpc]
  address = "{socket}"
[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = "{PAUSE_IMAGE}"
[plugins.'io.containerd.cri.v1.runtime']
  restrict_oom_score_adj = true
  disable_apparmor = true
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "{cni}"
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
      BinaryName = "{runc}"
"#,
            root = path(&dir.join("root")),
            state = path(&dir.join("state")),
            socket = path(&self.containerd_socket()),
            cni = path(&cni_conf),
            runc = path(&bin.join("runc")),
        );
        std::fs::create_dir_all(&dir)?;
        let config_file = dir.join("config.toml");
        std::fs::write(&config_file, config)?;
        // Its runc shim is looked up on PATH first: ours, not a distribution's older one.
        let search = std::env::var("PATH").unwrap_or_default();
        self.run(
            "containerd",
            Command::new(bin.join("containerd"))
                .arg("--config")
                .arg(&config_file)
                .env("PATH", format!("{}:{search}", path(bin))),
        )?;
        self.wait("containerd", Duration::from_secs(30), |c| {
            Ok(c.ctr(&["version"]).is_ok())
        })
    }

    fn start_kubelet(&mut self, bin: &Path, pki: &Pki, kubeconfig: &Path) -> Result<()> {
        let serving = pki.pair("kubelet");
        let port = crate::free_port()?;
        let healthz = crate::free_port()?;
        let config = format!(
            r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: {port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {healthz}
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: "unix://{socket}"
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: "{ca}"
authorization:
  mode: Webhook
tlsCertFile: "{cert}"
tlsPrivateKeyFile: "{key}"
evictionHard:
  memory.available: "100Mi"
  nodefs.available: "1%"
  nodefs.inodesFree: "1%"
  imagefs.available: "1%"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
maxPods: 110
"#,
            ca = path(&pki.ca()),
            cert = path(&serving.cert),
            key = path(&serving.key),
            socket = path(&self.containerd_socket()),
        );
        let config_file = self.dir.join("kubelet.yaml");
        std::fs::write(&config_file, config)?;
        let root = self.dir.join("kubelet");
        // The builder's seccomp profile, installed as an operator would (deploy/seccomp).
        let profile = root.join("seccomp").join(SECCOMP_PROFILE);
        std::fs::create_dir_all(profile.parent().unwrap_or(&root))?;
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/seccomp/builder.json"),
            &profile,
        )?;
        self.run(
            "kubelet",
            Command::new(bin.join("kubelet")).args([
                &format!("--config={}", path(&config_file)),
                &format!("--kubeconfig={}", path(kubeconfig)),
                &format!("--hostname-override={NODE_NAME}"),
                &format!("--root-dir={}", path(&root)),
                &format!("--cert-dir={}", path(&self.dir.join("kubelet-pki"))),
                "--v=1",
            ]),
        )
    }

    /// Starts a component with its output in `logs/<name>.log`.
    fn run(&mut self, name: &'static str, command: &mut Command) -> Result<()> {
        let log = std::fs::File::create(self.dir.join(format!("logs/{name}.log")))?;
        command
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let taken = std::mem::replace(command, Command::new("true"));
        let child = spawn(taken).with_context(|| format!("starting {name}"))?;
        self.children.push((name, child));
        Ok(())
    }

    /// Polls `ready` until it says yes, failing early when a component has exited.
    fn wait(
        &mut self,
        what: &str,
        limit: Duration,
        mut ready: impl FnMut(&Self) -> Result<bool>,
    ) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if ready(self).unwrap_or(false) {
                return Ok(());
            }
            for (name, child) in &mut self.children {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "{name} exited ({status}) while waiting for {what}; its log: {}",
                        self.dir.join(format!("logs/{name}.log")).display()
                    );
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "gave up waiting for {what} after {limit:?}; logs in {}",
                    self.dir.join("logs").display()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Keeps the work directory (logs) after the cluster stops, for a failed test.
    pub fn keep_dir(&mut self) -> PathBuf {
        if let Some(tmp) = self._tmp.take() {
            return tmp.keep();
        }
        self.dir.clone()
    }

    fn stop(&mut self) {
        // The kubelet first, so that it restarts nothing; then every container.
        self.kill("kubelet");
        if let Ok(tasks) = self.ctr(&["tasks", "list", "--quiet"]) {
            for task in tasks.lines().filter(|t| !t.is_empty()) {
                let _ = self.ctr(&["tasks", "kill", "--signal", "SIGKILL", task]);
                let _ = self.ctr(&["tasks", "delete", "--force", task]);
            }
        }
        if let Ok(containers) = self.ctr(&["containers", "list", "--quiet"]) {
            for container in containers.lines().filter(|c| !c.is_empty()) {
                let _ = self.ctr(&["containers", "delete", container]);
            }
        }
        for name in [
            "containerd",
            "kube-scheduler",
            "kube-controller-manager",
            "kube-apiserver",
            "etcd",
        ] {
            self.kill(name);
        }
        unmount_below(&self.dir);
        remove_pod_netns();
        let _ = Command::new("ip").args(["link", "delete", BRIDGE]).status();
        if self.firewall {
            let _ = Command::new("iptables")
                .args([
                    "-D", "FORWARD", "-s", POD_SUBNET, "!", "-d", POD_SUBNET, "-j", "DROP",
                ])
                .status();
            self.firewall = false;
        }
    }

    fn kill(&mut self, name: &str) {
        for (_, child) in self.children.iter_mut().filter(|(n, _)| *n == name) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Writes a kubeconfig for the client certificate `name`.
fn write_kubeconfig(file: &Path, server: &str, pki: &Pki, name: &str) -> Result<()> {
    let pair = pki.pair(name);
    let text = format!(
        r#"apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: {server}
    certificate-authority: "{ca}"
users:
- name: {name}
  user:
    client-certificate: "{cert}"
    client-key: "{key}"
contexts:
- name: test
  context:
    cluster: test
    user: {name}
    namespace: default
current-context: test
"#,
        ca = path(&pki.ca()),
        cert = path(&pair.cert),
        key = path(&pair.key),
    );
    std::fs::write(file, text)?;
    Ok(())
}

/// Unmounts everything mounted below `dir` (pods' volumes, containerd's snapshots), deepest
/// first.
fn unmount_below(dir: &Path) {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    let mut below: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .filter(|m| Path::new(m).starts_with(dir))
        .collect();
    below.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for mount in below {
        let _ = Command::new("umount").args(["--lazy", mount]).status();
    }
}

/// Removes the network namespaces containerd made for pods (`cni-…`).
fn remove_pod_netns() {
    let Ok(entries) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with("cni-") {
            let _ = Command::new("ip").args(["netns", "delete", name]).status();
        }
    }
}

/// Runs ctr against the node's containerd, in Kubernetes' namespace.
fn ctr(socket: &Path, args: &[&str]) -> Result<String> {
    let socket = path(socket);
    let mut all = CTR_TIMEOUTS.to_vec();
    all.extend(["--address", socket.as_str(), "--namespace", "k8s.io"]);
    all.extend_from_slice(args);
    Ok(run(&node_tool("ctr")?, &all)?)
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Where a test reaches a cluster: the admin's kubeconfig and the node's containerd.
#[derive(Debug, Clone)]
pub struct ClusterAccess {
    /// The admin's kubeconfig.
    pub kubeconfig: PathBuf,
    /// The node's containerd socket (to import images).
    pub containerd_socket: PathBuf,
}

/// Names the shared cluster's kubeconfig, set by `image-builder-testkit cluster`.
pub const KUBECONFIG_ENV: &str = "IMAGE_BUILDER_TEST_KUBECONFIG";
/// Names the shared cluster's containerd socket.
pub const CONTAINERD_ENV: &str = "IMAGE_BUILDER_TEST_CONTAINERD_SOCKET";

impl Cluster {
    /// How to reach this cluster.
    pub fn access(&self) -> ClusterAccess {
        ClusterAccess {
            kubeconfig: self.kubeconfig.clone(),
            containerd_socket: self.containerd_socket(),
        }
    }

    /// The shell lines that point tests at this cluster.
    pub fn env_lines(&self) -> String {
        format!(
            "export {KUBECONFIG_ENV}={}\nexport {CONTAINERD_ENV}={}\n",
            self.kubeconfig.display(),
            self.containerd_socket().display()
        )
    }
}

/// The cluster the tests of this process share: the one the test command started (named by
/// [`KUBECONFIG_ENV`] and [`CONTAINERD_ENV`]), or else one started here on first use and
/// stopped when the process exits.
pub fn shared() -> Result<ClusterAccess> {
    static SHARED: std::sync::OnceLock<std::result::Result<ClusterAccess, String>> =
        std::sync::OnceLock::new();
    static OWNED: parking_lot::Mutex<Option<Cluster>> = parking_lot::Mutex::new(None);
    extern "C" fn stop_owned() {
        drop(OWNED.lock().take());
    }
    SHARED
        .get_or_init(|| {
            if let (Ok(kubeconfig), Ok(socket)) =
                (std::env::var(KUBECONFIG_ENV), std::env::var(CONTAINERD_ENV))
            {
                return Ok(ClusterAccess {
                    kubeconfig: kubeconfig.into(),
                    containerd_socket: socket.into(),
                });
            }
            let cluster = Cluster::start().map_err(|e| format!("{e:#}"))?;
            let access = cluster.access();
            *OWNED.lock() = Some(cluster);
            // SAFETY: registers a function with no arguments that only drops our cluster.
            unsafe { libc::atexit(stop_owned) };
            Ok(access)
        })
        .clone()
        .map_err(|e| anyhow::anyhow!("cannot start the test cluster: {e}"))
}

impl ClusterAccess {
    /// Imports a docker archive into the node's containerd.
    pub fn import_image(&self, archive: &Path) -> Result<()> {
        ctr(
            &self.containerd_socket,
            &["images", "import", &path(archive)],
        )
        .map(drop)
    }
}

/// The builder image for the Kubernetes executor, made by `scripts/peers/builder-image.sh`
/// (cached by version): its docker archive and the image name inside.
pub fn builder_image() -> Result<(PathBuf, String)> {
    let archive = peer_script("builder-image.sh")?;
    let name = std::fs::read_to_string(archive.with_file_name("image-name"))?;
    Ok((archive, name.trim().to_owned()))
}

impl ClusterAccess {
    /// Runs kubectl as the admin with `stdin`; its output, or what it said when it failed.
    pub fn kubectl(&self, args: &[&str], stdin: &str) -> Result<String> {
        use std::io::Write;
        let mut child = Command::new(node_tool("kubectl")?)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        if let Some(mut input) = child.stdin.take() {
            input.write_all(stdin.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Imports the builder image into the node (once per process); returns its name.
    pub fn builder_image(&self) -> Result<String> {
        static IMPORTED: std::sync::OnceLock<std::result::Result<String, String>> =
            std::sync::OnceLock::new();
        IMPORTED
            .get_or_init(|| {
                let (archive, name) = builder_image().map_err(|e| format!("{e:#}"))?;
                self.import_image(&archive).map_err(|e| format!("{e:#}"))?;
                Ok(name)
            })
            .clone()
            .map_err(|e| anyhow::anyhow!("cannot provide the builder image: {e}"))
    }
}

/// A docker archive in a folder of its own, removed with the value.
pub struct ImageArchive {
    dir: tempfile::TempDir,
}

impl ImageArchive {
    /// The archive's path.
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("image.tar")
    }
}

/// The service's own container image, made as a user makes it: `deploy/Containerfile` built
/// with buildah (in a storage of its own) on the builder image's Debian, from a context that
/// holds `binary` (the release build) and its debug file when there is one. Saved as a docker
/// archive named `name`; the buildah storage is removed before it returns, the archive with
/// the value.
pub fn service_image(binary: &Path, name: &str) -> Result<ImageArchive> {
    let (builder, _) = builder_image()?;
    let image = ImageArchive {
        dir: tempfile::Builder::new()
            .prefix("service-image-")
            .tempdir_in("/var/tmp")?,
    };
    let dir = image.dir.path();
    let context = dir.join("context");
    std::fs::create_dir_all(&context)?;
    std::fs::copy(binary, context.join("image-builder"))?;
    let debug = binary.with_file_name("image-builder.debug");
    if debug.is_file() {
        std::fs::copy(&debug, context.join("image-builder.debug"))?;
    }
    let containerfile = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/Containerfile");
    let storage = [
        "--root".to_owned(),
        path(&dir.join("storage")),
        "--runroot".to_owned(),
        path(&dir.join("run")),
        "--storage-driver".to_owned(),
        "vfs".to_owned(),
    ];
    let buildah = |args: &[&str]| -> Result<String> {
        let mut all: Vec<&str> = storage.iter().map(String::as_str).collect();
        all.extend_from_slice(args);
        Ok(run("buildah", &all)?.trim().to_owned())
    };
    buildah(&[
        "bud",
        "--quiet",
        "--build-arg",
        &format!("BASE=docker-archive:{}", path(&builder)),
        "-f",
        &path(&containerfile),
        "-t",
        name,
        &path(&context),
    ])?;
    buildah(&[
        "push",
        "--quiet",
        name,
        &format!("docker-archive:{}:{name}", path(&image.path())),
    ])?;
    std::fs::remove_dir_all(dir.join("storage"))?;
    std::fs::remove_dir_all(&context)?;
    Ok(image)
}

impl ClusterAccess {
    /// What a failing test should print about the cluster: the node's conditions (disk and
    /// memory pressure), the pods and recent events of `namespace`, their containers' last
    /// words, and the free space where the node keeps its containers. Never fails: a part
    /// that cannot be read says why in its place.
    pub fn report(&self, namespace: &str) -> String {
        let kubeconfig = path(&self.kubeconfig);
        let kubectl = |args: &[&str]| {
            let mut all = vec!["--kubeconfig", &kubeconfig];
            all.extend_from_slice(args);
            node_tool("kubectl")
                .and_then(|kubectl| Ok(run(&kubectl, &all)?))
                .unwrap_or_else(|e| format!("({e:#})"))
        };
        let mut report = String::new();
        for (title, text) in [
            (
                "node conditions",
                kubectl(&[
                    "get",
                    "nodes",
                    "-o",
                    "jsonpath={range .items[*].status.conditions[*]}{.type}={.status} {.message}{\"\\n\"}{end}",
                ]),
            ),
            (
                "pods",
                kubectl(&["-n", namespace, "get", "pods", "-o", "wide"]),
            ),
            (
                "events",
                kubectl(&["-n", namespace, "get", "events", "--sort-by=.lastTimestamp"]),
            ),
            (
                "containers' last lines",
                kubectl(&["-n", namespace, "get", "pods", "-o", "name"])
                    .lines()
                    .filter(|pod| pod.starts_with("pod/"))
                    .map(|pod| {
                        kubectl(&[
                            "-n",
                            namespace,
                            "logs",
                            "--all-containers",
                            "--prefix",
                            "--tail=20",
                            pod,
                        ])
                    })
                    .collect::<Vec<_>>()
                    .join("\n"),
            ),
            (
                "free space",
                run("df", &["-h", "/var/tmp", "/tmp"]).unwrap_or_else(|e| format!("({e:#})")),
            ),
        ] {
            let _ = writeln!(report, "--- {title}\n{}", text.trim_end());
        }
        report
    }

    /// Makes a fresh namespace named `prefix-<random>` and returns its name.
    pub fn create_namespace(&self, prefix: &str) -> Result<String> {
        let name = format!(
            "{prefix}-{}",
            &uuid::Uuid::now_v7().simple().to_string()[20..]
        );
        let manifest = tempfile::Builder::new().suffix(".json").tempfile()?;
        std::fs::write(manifest.path(), namespace(&name).to_string())?;
        run(
            &node_tool("kubectl")?,
            &[
                "--kubeconfig",
                &path(&self.kubeconfig),
                "create",
                "-f",
                &path(manifest.path()),
            ],
        )?;
        Ok(name)
    }

    /// The `executor` config of a service whose builds run in `namespace` of this cluster
    /// (builder pods on the pod network: registries and git servers listen on
    /// [`POD_GATEWAY`]).
    pub fn executor_config(&self, namespace: &str) -> Result<serde_json::Value> {
        Ok(serde_json::json!({
            "kind": "kubernetes",
            "namespace": namespace,
            "builderImage": self.builder_image()?,
            "seccompProfile": SECCOMP_PROFILE,
            "podTimeout": "10m",
        }))
    }
}
