//! Cache-hit Build latency through the real service and gRPC (p50, p99), beside `skopeo
//! inspect` of the same ref and a bare registry HEAD, all in the same run against the same
//! loopback registry.
//!
//! `cargo bench --bench cache_hit` (BENCH_CALLS sets the number of Build calls, default 300).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

use std::time::{Duration, Instant};

use image_builder::proto::builder as pb;
use image_builder::registry::{NoCredentials, Registry};
use image_builder::steps::Untracked;
use image_builder_testkit::{self as testkit, BaseImage, LocalRegistry, Service};

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn request(reference: &str) -> pb::BuildRequest {
    pb::BuildRequest {
        source: Some(pb::BuildSource {
            from: Some(pb::build_source::From::Ref(pb::BuildSourceReference {
                r#ref: reference.into(),
            })),
        }),
        ..Default::default()
    }
}

async fn build(
    client: &mut pb::image_builder_client::ImageBuilderClient<tonic::transport::Channel>,
    reference: &str,
) -> Vec<pb::BuildResponse> {
    let mut stream = client.build(request(reference)).await.unwrap().into_inner();
    let mut all = Vec::new();
    while let Some(r) = stream.message().await.unwrap() {
        all.push(r);
    }
    all
}

fn main() {
    let calls: usize = std::env::var("BENCH_CALLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let registry = LocalRegistry::start().unwrap();
    let image = BaseImage::busybox(0).unwrap();
    let base = testkit::push_image(&image, registry.addr(), "bench/busybox:1").unwrap();
    let config = serde_json::json!({
        "baseImageRepository": format!("{}/bench/base", registry.addr()),
        "workspaceImageRepository": format!("{}/bench/workspace", registry.addr()),
        "insecureRegistries": [registry.addr()],
    });
    let service = Service::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_image-builder")),
        config,
    )
    .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();

    let (mut hits, workspace_ref) = runtime.block_on(async {
        let mut client = service.client().await.unwrap();
        let first = build(&mut client, &base).await;
        let workspace_ref = first.last().unwrap().r#ref.clone();
        let mut samples = Vec::with_capacity(calls);
        for _ in 0..calls {
            let start = Instant::now();
            let r = build(&mut client, &base).await;
            samples.push(start.elapsed());
            assert_eq!(r.len(), 1, "every call is a cache hit");
        }
        (samples, workspace_ref)
    });

    let mut heads = runtime.block_on(async {
        let registry_client = Registry::new(&[registry.addr().to_owned()]);
        let mut samples = Vec::with_capacity(calls);
        for _ in 0..calls {
            let start = Instant::now();
            registry_client
                .lookup(&workspace_ref, &NoCredentials, &Untracked)
                .await
                .unwrap()
                .unwrap();
            samples.push(start.elapsed());
        }
        samples
    });

    let skopeo_runs = (calls / 10).max(10);
    let mut skopeo: Vec<Duration> = (0..skopeo_runs)
        .map(|_| {
            let start = Instant::now();
            testkit::skopeo_inspect(&workspace_ref).unwrap();
            start.elapsed()
        })
        .collect();

    let (h50, h99) = (percentile(&mut hits, 0.5), percentile(&mut hits, 0.99));
    let (r50, r99) = (percentile(&mut heads, 0.5), percentile(&mut heads, 0.99));
    let (s50, s99) = (percentile(&mut skopeo, 0.5), percentile(&mut skopeo, 0.99));
    println!("| measurement | runs | p50 ms | p99 ms | p50 vs skopeo |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| cache-hit Build via gRPC | {calls} | {:.2} | {:.2} | {:.2} |",
        ms(h50),
        ms(h99),
        ms(h50) / ms(s50)
    );
    println!(
        "| registry manifest lookup (oci-client, in process) | {calls} | {:.2} | {:.2} | {:.2} |",
        ms(r50),
        ms(r99),
        ms(r50) / ms(s50)
    );
    println!(
        "| `skopeo inspect` of the same ref (new process each) | {skopeo_runs} | {:.2} | {:.2} | 1.00 |",
        ms(s50),
        ms(s99)
    );
}
