//! The shared test environment: one real registry per test binary with a small busybox image
//! in it, and helpers to start the real service binary and talk to it over gRPC.

#![allow(dead_code)]

use std::sync::OnceLock;

use image_builder::proto::builder as pb;
use image_builder::proto::builder::image_builder_client::ImageBuilderClient;
use image_builder::testkit::{self, BaseImage, LocalRegistry, Service};
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
        "insecureRegistries": [registry],
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
    let mut stream = client
        .logs(pb::LogsRequest {
            build_id: build_id.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut log = Vec::new();
    while let Some(chunk) = stream.message().await? {
        log.extend_from_slice(&chunk.content);
    }
    Ok(log)
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
