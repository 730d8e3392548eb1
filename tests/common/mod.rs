//! The shared test environment: one real registry per test binary with a small busybox image
//! in it, and helpers to start the real service binary and talk to it over gRPC.

#![allow(dead_code)]

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use image_builder::proto::builder as pb;
use image_builder::proto::builder::image_builder_client::ImageBuilderClient;
use image_builder_testkit::{self as testkit, BaseImage, LocalRegistry, Service};
use tonic::transport::Channel;

/// A registry with `base/busybox:1` in it, shared by the tests of one binary.
pub struct Shared {
    pub registry: LocalRegistry,
    pub base: String,
}

pub fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let registry = LocalRegistry::start().expect("start docker-registry");
        let image = BaseImage::busybox(0).expect("make the busybox image");
        let base =
            testkit::push_image(&image, registry.addr(), "base/busybox:1").expect("push busybox");
        Shared { registry, base }
    })
}

/// The service binary under test.
pub fn binary() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_image-builder"))
}

/// A config whose repositories are unique to `name`, so tests never share cache hits.
pub fn config(registry: &str, name: &str) -> serde_json::Value {
    serde_json::json!({
        "baseImageRepository": format!("{registry}/{name}/base"),
        "workspaceImageRepository": format!("{registry}/{name}/workspace"),
        "registry": {"insecure": [registry]},
        "builds": {"allowLocalRepositories": true},
    })
}

/// Starts the real service against the shared registry.
pub fn service(name: &str) -> Service {
    let shared = shared();
    Service::start(binary(), config(shared.registry.addr(), name)).expect("start image-builder")
}

/// A Build request for an image reference.
pub fn ref_build(reference: &str) -> pb::BuildRequest {
    pb::BuildRequest {
        source: Some(ref_source(reference)),
        triggered_by: "tests".into(),
        ..Default::default()
    }
}

/// A BuildSource naming an image reference.
pub fn ref_source(reference: &str) -> pb::BuildSource {
    pb::BuildSource {
        from: Some(pb::build_source::From::Ref(pb::BuildSourceReference {
            r#ref: reference.into(),
        })),
    }
}

/// Every message of a Build stream.
pub async fn build_all(
    client: &mut ImageBuilderClient<Channel>,
    request: pb::BuildRequest,
) -> Result<Vec<pb::BuildResponse>, tonic::Status> {
    let mut stream = client.build(request).await?.into_inner();
    let mut all = Vec::new();
    while let Some(response) = stream.message().await? {
        all.push(response);
    }
    Ok(all)
}

/// The whole log of a build, as one Logs listener receives it.
pub async fn logs_all(
    client: &mut ImageBuilderClient<Channel>,
    build_id: &str,
) -> Result<Vec<u8>, tonic::Status> {
    logs_with(client, build_id, false).await
}

/// The whole log of a build, censored (`LogsRequest.censored`) or not.
pub async fn logs_with(
    client: &mut ImageBuilderClient<Channel>,
    build_id: &str,
    censored: bool,
) -> Result<Vec<u8>, tonic::Status> {
    testkit::read_logs(
        client,
        pb::LogsRequest {
            build_id: build_id.into(),
            censored,
            ..Default::default()
        },
    )
    .await
}

pub fn status(response: &pb::BuildResponse) -> pb::BuildStatus {
    pb::BuildStatus::try_from(response.status).expect("a known status")
}

pub fn build_id(response: &pb::BuildResponse) -> String {
    response
        .info
        .as_ref()
        .map(|i| i.build_id.clone())
        .unwrap_or_default()
}

/// The value of a metric line `name{labels} value` in Prometheus text.
pub async fn metric(service: &Service, series: &str) -> Option<f64> {
    let text = reqwest::get(service.metrics_url())
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A Build request for a Dockerfile in a git repository.
pub fn dockerfile_build(
    uri: &str,
    mode: image_builder::proto::contentservice::CloneTargetMode,
    target: &str,
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
                        target_mode: mode as i32,
                        clone_taget: target.into(),
                        ..Default::default()
                    })),
                }),
                dockerfile_version: "1".into(),
                dockerfile_path: dockerfile.into(),
                context_path: context.into(),
            })),
        }),
        triggered_by: "tests".into(),
        ..Default::default()
    }
}

/// A Dockerfile build of the repository's default branch, `Dockerfile` at the root.
pub fn head_build(uri: &str) -> pb::BuildRequest {
    dockerfile_build(
        uri,
        image_builder::proto::contentservice::CloneTargetMode::RemoteHead,
        "",
        "Dockerfile",
        ".",
    )
}

/// A Logs stream of a build: its log from byte 0, then live.
pub async fn follow_logs(
    client: &mut ImageBuilderClient<Channel>,
    build_id: &str,
) -> tonic::Streaming<pb::LogsResponse> {
    client
        .logs(pb::LogsRequest {
            build_id: build_id.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// Waits on a Logs stream until a line contains `needle`; returns what was read.
pub async fn wait_for_log(
    client: &mut ImageBuilderClient<Channel>,
    build_id: &str,
    needle: &str,
) -> String {
    let mut stream = follow_logs(client, build_id).await;
    let mut seen = String::new();
    while !seen.contains(needle) {
        let chunk = stream
            .message()
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("the log ended without {needle:?}:\n{seen}"));
        seen.push_str(&String::from_utf8_lossy(&chunk.content));
    }
    seen
}

/// Pids of live processes whose command line contains `needle`.
pub fn processes_with(needle: &str) -> Vec<u32> {
    processes_where("cmdline", |cmdline| {
        String::from_utf8_lossy(cmdline)
            .replace('\0', " ")
            .contains(needle)
    })
}

/// Pids of live processes whose `/proc/<pid>/<file>` (`cmdline`, `environ`, ...) `matches`.
pub fn processes_where(file: &str, matches: impl Fn(&[u8]) -> bool) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if std::fs::read(entry.path().join(file)).is_ok_and(|bytes| matches(&bytes)) {
            pids.push(pid);
        }
    }
    pids
}

/// Waits (up to two minutes: a builder Job on a busy machine) until the service's own log has a
/// line with `needle` (a failpoint reached, say).
pub async fn wait_for_service_log(service: &Service, needle: &str) {
    for _ in 0..2400 {
        if service.log().contains(needle) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the service never logged {needle:?}:\n{}", service.log());
}

/// Starts a Build call and takes its first answer: the stream, and the build id it names.
pub async fn start_build(
    client: &mut ImageBuilderClient<Channel>,
    request: pb::BuildRequest,
) -> (tonic::Streaming<pb::BuildResponse>, String) {
    let mut stream = client.build(request).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().expect("a first answer");
    (stream, build_id(&first))
}

/// A client of the service's ops API, with the service's operator token.
pub async fn ops_client(service: &Service) -> image_builder::client::OpsClient {
    service.ops().await.unwrap()
}

/// A build as the ops API shows it (GetBuild, as the operator).
pub async fn ops_build(service: &Service, id: &str) -> image_builder::proto::ops::Build {
    ops_client(service)
        .await
        .get_build(image_builder::proto::ops::GetBuildRequest {
            build_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Polls `check` every 300 ms until it gives a value, for at most 60 s; panics with `what`
/// and the last thing seen otherwise.
pub async fn eventually<T>(what: &str, mut check: impl AsyncFnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match check().await {
            Ok(value) => return value,
            Err(last) if Instant::now() > deadline => panic!("{what}: {last}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}
