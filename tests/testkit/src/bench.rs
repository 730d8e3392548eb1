//! What the benchmarks share: percentiles, a process's memory, knobs from the environment,
//! and many distinct images made quickly with bare registry requests.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use image_builder::proto::builder as pb;
use sha2::Digest;

/// `http://host/v2/<repo>/manifests/<tag or digest>` of `reference` (`host/repo:tag` or
/// `host/repo@digest`, a plain-HTTP registry).
pub fn manifest_url(reference: &str) -> String {
    let (host, rest) = reference.split_once('/').expect("host/repository");
    let (repo, tag) = match rest.split_once('@') {
        Some((repo, digest)) => (repo, digest),
        None => rest.rsplit_once(':').expect("a tag or a digest"),
    };
    format!("http://{host}/v2/{repo}/manifests/{tag}")
}

/// The manifest media types a registry client accepts.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.index.v1+json";

/// A service configuration whose base and workspace repositories are `{prefix}/base` and
/// `{prefix}/workspace` in the plain-HTTP registry at `registry`; add keys as needed.
pub fn service_config(registry: &str, prefix: &str) -> serde_json::Value {
    serde_json::json!({
        "baseImageRepository": format!("{registry}/{prefix}/base"),
        "workspaceImageRepository": format!("{registry}/{prefix}/workspace"),
        "registry": {"insecure": [registry]},
    })
}

/// What a Dockerfile bench starts from: a registry holding busybox as `bench/busybox:1`, and
/// a data directory for the service in `tmp` (the bench's `CARGO_TARGET_TMPDIR`).
pub struct DockerfileBench {
    /// The plain-HTTP registry every repository of the bench lives in.
    pub registry: crate::LocalRegistry,
    /// The base image's reference, for the Dockerfiles' `FROM`.
    pub base: String,
    /// The service's data directory.
    pub data: tempfile::TempDir,
}

impl DockerfileBench {
    /// Starts the registry and pushes the base image.
    pub fn start(tmp: &std::path::Path) -> Result<Self> {
        let registry = crate::LocalRegistry::start()?;
        let base = crate::push_image(
            &crate::BaseImage::busybox(0)?,
            registry.addr(),
            "bench/busybox:1",
        )?;
        let data = tempfile::tempdir_in(tmp)?;
        Ok(Self {
            registry,
            base,
            data,
        })
    }

    /// [`service_config`] under `prefix`, with the data directory and local git repositories
    /// allowed; add keys as needed.
    pub fn config(&self, prefix: &str) -> serde_json::Value {
        let mut config = service_config(self.registry.addr(), prefix);
        config["dataDir"] = self.data.path().display().to_string().into();
        config["builds"]["allowLocalRepositories"] = true.into();
        config
    }
}

/// `HEAD` of a manifest URL: whether the registry has it. Fails on any other answer.
pub async fn head_manifest(http: &reqwest::Client, url: &str) -> Result<bool> {
    let r = http
        .head(url)
        .header("Accept", MANIFEST_ACCEPT)
        .send()
        .await
        .with_context(|| format!("HEAD {url}"))?;
    match r.status() {
        s if s.is_success() => Ok(true),
        reqwest::StatusCode::NOT_FOUND => Ok(false),
        s => bail!("HEAD {url}: {s}"),
    }
}

/// A Build request for the image `reference` (a reference build: copied, not built).
pub fn reference_build(reference: &str) -> pb::BuildRequest {
    pb::BuildRequest {
        source: Some(pb::BuildSource {
            from: Some(pb::build_source::From::Ref(pb::BuildSourceReference {
                r#ref: reference.into(),
            })),
        }),
        ..Default::default()
    }
}

/// A Build request for the Dockerfile at `dockerfile` of the repository at `uri` (its default
/// branch), built in `context`, with Dockerfile version `version`.
pub fn dockerfile_build(
    uri: &str,
    version: &str,
    dockerfile: &str,
    context: &str,
) -> pb::BuildRequest {
    use image_builder::proto::contentservice as cs;
    pb::BuildRequest {
        source: Some(pb::BuildSource {
            from: Some(pb::build_source::From::File(pb::BuildSourceDockerfile {
                source: Some(cs::WorkspaceInitializer {
                    spec: Some(cs::workspace_initializer::Spec::Git(cs::GitInitializer {
                        remote_uri: uri.into(),
                        ..Default::default()
                    })),
                }),
                dockerfile_version: version.into(),
                dockerfile_path: dockerfile.into(),
                context_path: context.into(),
            })),
        }),
        triggered_by: "bench".into(),
        ..Default::default()
    }
}

/// Builds `request` to the end through a Build stream: the build id and the final answer.
pub async fn build_to_end(
    client: &mut image_builder::proto::builder::image_builder_client::ImageBuilderClient<
        tonic::transport::Channel,
    >,
    request: pb::BuildRequest,
) -> (String, pb::BuildResponse) {
    let mut stream = client.build(request).await.unwrap().into_inner();
    let mut id = String::new();
    let mut last = None;
    while let Some(r) = stream.message().await.unwrap() {
        if let Some(info) = &r.info
            && !info.build_id.is_empty()
        {
            id = info.build_id.clone();
        }
        last = Some(r);
    }
    (id, last.unwrap())
}

/// Builds `request` to the end and asserts that it succeeded: the time it took.
pub async fn build_successfully(
    client: &mut image_builder::proto::builder::image_builder_client::ImageBuilderClient<
        tonic::transport::Channel,
    >,
    request: pb::BuildRequest,
) -> Duration {
    let start = std::time::Instant::now();
    let (_, last) = build_to_end(client, request).await;
    assert_eq!(last.status, pb::BuildStatus::DoneSuccess as i32, "{last:?}");
    start.elapsed()
}

/// The `p` quantile (0..=1) of `samples`, nearest rank; sorts them.
pub fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[i]
}

/// Milliseconds, for printing.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `name` from the environment as a number, else `default`.
pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS:`, `VmHWM:`), in KiB.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// CPU time (user and system) process `pid` has used so far; zero if it cannot be read.
pub fn cpu_time(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // The fields after the command (which may hold spaces) and its closing parenthesis:
    // utime and stime are the 12th and 13th of them, in clock ticks.
    let Some((_, after)) = stat.rsplit_once(')') else {
        return Duration::ZERO;
    };
    let ticks: u64 = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    // SAFETY: sysconf only reads a constant of the system.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_micros(ticks * 1_000_000 / per_second)
}

/// CPU time of several processes, taken together so that their deltas cover one span.
pub struct CpuMeter {
    pids: Vec<u32>,
    start: Vec<Duration>,
}

impl CpuMeter {
    /// Starts counting for `pids` (`std::process::id()` for the bench itself).
    pub fn start(pids: &[u32]) -> Self {
        Self {
            pids: pids.to_vec(),
            start: pids.iter().map(|pid| cpu_time(*pid)).collect(),
        }
    }

    /// CPU each process used since the start, divided by `calls`, in milliseconds.
    pub fn per_call_ms(&self, calls: usize) -> Vec<f64> {
        self.pids
            .iter()
            .zip(&self.start)
            .map(|(pid, start)| ms(cpu_time(*pid).saturating_sub(*start)) / calls.max(1) as f64)
            .collect()
    }
}

/// KiB as MiB, for printing.
pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Bytes of the files under `path`, as `du -sb` counts them (0 when it cannot).
pub fn du_bytes(path: &std::path::Path) -> u64 {
    let Ok(out) = std::process::Command::new("du")
        .arg("-sb")
        .arg(path)
        .output()
    else {
        return 0;
    };
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// How a by-hand buildah runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByHand {
    /// As the host's root, RUN in runc containers (OCI isolation): the service's way before
    /// user namespaces, and what the machine gives without any.
    HostRoot,
    /// As the service runs it: root of a user namespace mapped from the subordinate ids,
    /// RUN in rootless isolation with slirp4netns (the same storage preparation, environment
    /// and options as the service's, typed out).
    UserNamespace,
}

/// `buildah bud` + `buildah push` by hand (vfs storage under `root`, `--layers`), isolated
/// as `how` says, the Dockerfile of `context` built as `tag` and pushed to it; output to a
/// file. Panics when buildah fails. A `root` serves one `how` only.
pub fn buildah_by_hand(
    root: &std::path::Path,
    context: &std::path::Path,
    tag: &str,
    how: ByHand,
) -> Duration {
    use image_builder::executor::buildah::Buildah;
    use image_builder::executor::user_namespace::UserNamespace;
    use std::process::{Command, Stdio};
    let prepared = (how == ByHand::UserNamespace).then(|| {
        let namespace = UserNamespace::of_current_user().unwrap();
        let buildah = Buildah::new(root.to_owned(), &[], namespace).unwrap();
        (namespace, buildah)
    });
    let isolation = match how {
        ByHand::HostRoot => "oci",
        ByHand::UserNamespace => "rootless",
    };
    let buildah = |args: &[&str]| {
        let log = std::fs::File::create(root.join("by-hand.log")).unwrap();
        let mut cmd = match &prepared {
            None => {
                let mut cmd = Command::new("buildah");
                cmd.env("BUILDAH_ISOLATION", isolation)
                    .arg("--root")
                    .arg(root.join("root"))
                    .arg("--runroot")
                    .arg(root.join("runroot"))
                    .args(["--storage-driver", "vfs"]);
                cmd
            }
            Some((namespace, buildah)) => {
                let mut cmd = Command::new("unshare");
                cmd.args(namespace.unshare_args())
                    .arg("buildah")
                    .envs(buildah.environment())
                    .args(buildah.global_args());
                cmd
            }
        };
        let status = cmd
            .args(args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "buildah {args:?}");
    };
    let dockerfile = context.join("Dockerfile");
    let start = std::time::Instant::now();
    buildah(&[
        "bud",
        "--tls-verify=false",
        "--isolation",
        isolation,
        "--layers",
        "--format",
        "docker",
        "-f",
        dockerfile.to_str().unwrap(),
        "-t",
        tag,
        context.to_str().unwrap(),
    ]);
    buildah(&[
        "push",
        "--tls-verify=false",
        tag,
        &format!("docker://{tag}"),
    ]);
    start.elapsed()
}

const MANIFEST_TYPES: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// The single-platform manifest tagged `tag` in `repository` of the registry at `registry`
/// (plain HTTP), and its media type as the registry names it (an OCI manifest may leave it
/// out of its body).
pub async fn manifest_of(
    http: &reqwest::Client,
    registry: &str,
    repository: &str,
    tag: &str,
) -> Result<(serde_json::Value, String)> {
    let answer = http
        .get(format!("http://{registry}/v2/{repository}/manifests/{tag}"))
        .header("Accept", MANIFEST_TYPES)
        .send()
        .await?
        .error_for_status()?;
    let media_type = answer
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .with_context(|| format!("the manifest of {repository}:{tag} came without a content type"))?
        .to_owned();
    let manifest = answer
        .json()
        .await
        .with_context(|| format!("the manifest of {repository}:{tag}"))?;
    Ok((manifest, media_type))
}

/// Pushes busybox as `base` to `repository` of the registry at `registry` (plain HTTP), then
/// makes `count` distinct images there, tagged `v0`, `v1`, …: each is `base` with a config of
/// its own (a label), so they share every layer and differ in digest. Bare registry
/// requests, 32 at once: thousands take seconds, where pushing each with skopeo would take
/// minutes. Returns their references (`registry/repository:vN`).
pub async fn distinct_images(
    registry: &str,
    repository: &str,
    count: usize,
) -> Result<Vec<String>> {
    crate::push_image(
        &crate::BaseImage::busybox(0)?,
        registry,
        &format!("{repository}:base"),
    )?;
    let http = reqwest::Client::new();
    let base = format!("http://{registry}/v2/{repository}");
    let (manifest, media_type) = manifest_of(&http, registry, repository, "base").await?;
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .context("the base manifest names no config")?;
    let config: serde_json::Value = serde_json::from_slice(
        &http
            .get(format!("{base}/blobs/{config_digest}"))
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?,
    )?;
    let one = |i: usize| {
        let (http, base, media_type) = (&http, &base, &media_type);
        let (mut config, mut manifest) = (config.clone(), manifest.clone());
        async move {
            config["config"]["Labels"]["bench.variant"] = i.to_string().into();
            let bytes = serde_json::to_vec(&config)?;
            let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bytes)));
            let upload = http
                .post(format!("{base}/blobs/uploads/"))
                .send()
                .await?
                .error_for_status()?;
            let Some(location) = upload.headers().get("location") else {
                bail!("the registry gave no upload location");
            };
            let location = location.to_str()?;
            let location = if location.starts_with('/') {
                format!("http://{registry}{location}")
            } else {
                location.to_owned()
            };
            let separator = if location.contains('?') { '&' } else { '?' };
            http.put(format!("{location}{separator}digest={digest}"))
                .header("Content-Type", "application/octet-stream")
                .body(bytes.clone())
                .send()
                .await?
                .error_for_status()?;
            manifest["config"]["digest"] = digest.into();
            manifest["config"]["size"] = bytes.len().into();
            http.put(format!("{base}/manifests/v{i}"))
                .header("Content-Type", media_type.as_str())
                .body(serde_json::to_vec(&manifest)?)
                .send()
                .await?
                .error_for_status()?;
            Ok(format!("{registry}/{repository}:v{i}"))
        }
    };
    futures::stream::iter(0..count)
        .map(one)
        .buffered(32)
        .try_collect()
        .await
}
