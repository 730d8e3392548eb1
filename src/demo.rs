//! `image-builder demo`: the main job on a fresh machine. Starts Debian's docker-registry on
//! loopback, pushes a small busybox image to it, starts this binary's `run` on a generated
//! config, builds a workspace image through the gRPC API, and prints its status, its log, the
//! build list, a second (cached) build and skopeo's view of the result.

use anyhow::Context;
use image_builder::proto::builder as pb;
use image_builder::testkit::{self, BaseImage, LocalRegistry, Service};

fn status_name(status: i32) -> &'static str {
    pb::BuildStatus::try_from(status)
        .map(|s| s.as_str_name())
        .unwrap_or("?")
}

async fn build(
    client: &mut pb::image_builder_client::ImageBuilderClient<tonic::transport::Channel>,
    reference: &str,
) -> anyhow::Result<String> {
    let request = pb::BuildRequest {
        source: Some(pb::BuildSource {
            from: Some(pb::build_source::From::Ref(pb::BuildSourceReference {
                r#ref: reference.into(),
            })),
        }),
        triggered_by: "demo".into(),
        ..Default::default()
    };
    let mut stream = client.build(request).await?.into_inner();
    let mut build_id = String::new();
    while let Some(response) = stream.message().await? {
        let id = response
            .info
            .as_ref()
            .map(|i| i.build_id.clone())
            .unwrap_or_default();
        if !id.is_empty() {
            build_id = id;
        }
        println!(
            "  {:<13} ref={} build_id={} message={:?}",
            status_name(response.status),
            response.r#ref,
            if build_id.is_empty() { "-" } else { &build_id },
            response.message
        );
    }
    Ok(build_id)
}

/// Runs the demo; with `keep`, leaves everything running until Ctrl-C.
pub async fn run(keep: bool) -> anyhow::Result<()> {
    println!("== starting docker-registry on loopback");
    let registry = LocalRegistry::start().context("cannot start docker-registry")?;
    let addr = registry.addr().to_owned();
    println!("   registry at {addr}");
    println!("== making a busybox base image with umoci and pushing it with skopeo");
    let image = BaseImage::busybox(0)?;
    let base = testkit::push_image(&image, &addr, "demo/busybox:latest")?;
    println!("   pushed {base}");

    let config = serde_json::json!({
        "baseImageRepository": format!("{addr}/base-images"),
        "workspaceImageRepository": format!("{addr}/workspace-images"),
        "insecureRegistries": [addr],
    });
    println!("== starting image-builder run --config (config: {config})");
    let binary = std::env::current_exe()?;
    let service = Service::start(&binary, config)?;
    println!(
        "   gRPC at {}, metrics at {}",
        service.grpc_url(),
        service.metrics_url()
    );
    let mut client = service.client().await?;

    println!("== Build {base}");
    let build_id = build(&mut client, &base).await?;

    println!("== Logs of build {build_id}");
    let mut logs = client
        .logs(pb::LogsRequest {
            build_id: build_id.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    while let Some(chunk) = logs.message().await? {
        print!("  | {}", String::from_utf8_lossy(&chunk.content));
    }

    println!("== ListBuilds");
    let list = client
        .list_builds(pb::ListBuildsRequest {})
        .await?
        .into_inner();
    for b in &list.builds {
        println!("  {} {:<13} {}", b.build_id, status_name(b.status), b.r#ref);
    }

    println!("== Build {base} again (expect a cache hit)");
    build(&mut client, &base).await?;

    let workspace_ref = list
        .builds
        .first()
        .map(|b| b.r#ref.clone())
        .unwrap_or_default();
    println!("== skopeo inspect {workspace_ref}");
    let inspected = testkit::skopeo_inspect(&workspace_ref)?;
    println!(
        "  digest={} layers={}",
        inspected["Digest"],
        inspected["Layers"]
            .as_array()
            .map(Vec::len)
            .unwrap_or_default()
    );

    if keep {
        println!(
            "== running; Ctrl-C to stop (registry {addr}, gRPC {})",
            service.grpc_url()
        );
        tokio::signal::ctrl_c().await?;
    }
    println!("== done");
    drop(service);
    drop(registry);
    Ok(())
}
