//! `image-builder-testkit demo`: the main job on a fresh machine. Starts Debian's docker-registry on
//! loopback, pushes a small busybox image to it, starts `image-builder run` on a generated
//! config, builds a workspace image from the image and one from a Dockerfile in a local git
//! repository (buildah), through the gRPC API, and prints their status, their logs, the build
//! list, a second (cached) build and skopeo's view of the result.

use crate::{self as testkit, BaseImage, LocalRegistry, Service};
use anyhow::Context;
use image_builder::proto::builder as pb;

fn status_name(status: i32) -> &'static str {
    pb::BuildStatus::try_from(status)
        .map(|s| s.as_str_name())
        .unwrap_or("?")
}

type Client = pb::image_builder_client::ImageBuilderClient<tonic::transport::Channel>;

fn ref_source(reference: &str) -> pb::BuildSource {
    pb::BuildSource {
        from: Some(pb::build_source::From::Ref(pb::BuildSourceReference {
            r#ref: reference.into(),
        })),
    }
}

fn git_source(uri: &str) -> pb::BuildSource {
    use image_builder::proto::contentservice as cs;
    pb::BuildSource {
        from: Some(pb::build_source::From::File(pb::BuildSourceDockerfile {
            source: Some(cs::WorkspaceInitializer {
                spec: Some(cs::workspace_initializer::Spec::Git(cs::GitInitializer {
                    remote_uri: uri.into(),
                    target_mode: cs::CloneTargetMode::RemoteBranch as i32,
                    clone_taget: "main".into(),
                    ..Default::default()
                })),
            }),
            dockerfile_version: "1".into(),
            dockerfile_path: "Dockerfile".into(),
            context_path: ".".into(),
        })),
    }
}

async fn print_logs(client: &mut Client, build_id: &str) -> anyhow::Result<()> {
    let mut logs = client
        .logs(pb::LogsRequest {
            build_id: build_id.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut text = Vec::new();
    while let Some(chunk) = logs.message().await? {
        text.extend(chunk.content);
    }
    for line in String::from_utf8_lossy(&text).lines() {
        println!("  | {line}");
    }
    Ok(())
}

async fn build(client: &mut Client, source: pb::BuildSource) -> anyhow::Result<String> {
    let request = pb::BuildRequest {
        source: Some(source),
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
/// Runs the demo with the service binary at `binary`; with `keep`, leaves everything running
/// until Ctrl-C.
pub async fn run(binary: &std::path::Path, keep: bool) -> anyhow::Result<()> {
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
        "registry": {"insecure": [addr]},
        // The demo's build context is a git repository it makes on this machine.
        "builds": {"allowLocalRepositories": true},
    });
    println!("== starting image-builder run --config (config: {config})");
    let service = Service::start(binary, config)?;
    println!(
        "   gRPC at {}, metrics at {}",
        service.grpc_url(),
        service.metrics_url()
    );
    let mut client = service.client().await?;

    println!("== Build from the image {base}");
    let build_id = build(&mut client, ref_source(&base)).await?;
    println!("== Logs of build {build_id}");
    print_logs(&mut client, &build_id).await?;

    println!("== Build from a Dockerfile in a local git repository (buildah)");
    let repo = testkit::GitRepo::new(&[
        (
            "Dockerfile",
            &format!(
                "FROM {base}\nCOPY motd /etc/motd\nRUN echo \"built by image-builder\" >> /etc/motd && cat /etc/motd\n"
            ),
        ),
        ("motd", "hello from the demo\n"),
    ])?;
    let dockerfile_build_id = build(&mut client, git_source(&repo.uri())).await?;
    println!("== Logs of build {dockerfile_build_id}");
    print_logs(&mut client, &dockerfile_build_id).await?;

    println!("== ListBuilds");
    let list = client
        .list_builds(pb::ListBuildsRequest {})
        .await?
        .into_inner();
    for b in &list.builds {
        println!("  {} {:<13} {}", b.build_id, status_name(b.status), b.r#ref);
    }

    println!("== Build from the image {base} again (expect a cache hit)");
    build(&mut client, ref_source(&base)).await?;

    // Newest first: the Dockerfile build.
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
    let motd = testkit::read_file_from_image(&workspace_ref, "/etc/motd")?;
    println!(
        "  /etc/motd in the workspace image: {:?}",
        String::from_utf8_lossy(&motd)
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
