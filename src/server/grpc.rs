//! The gRPC port: mk3's service and the ops service behind a start-up gate, grpc.health.v1,
//! server reflection, plain HTTP/2 or TLS, and the drain at shutdown.
//!
//! Health follows the service's life: `NOT_SERVING` while the store opens and unfinished
//! builds resume (the API answers `UNAVAILABLE` meanwhile, so a Build for a resumed build's
//! image can only join it), `SERVING` after, `NOT_SERVING` again as soon as shutdown starts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use futures::TryStreamExt;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::{Code, Request, Status};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use super::grpc_metrics::GrpcMetricsLayer;
use crate::api::status::refuse;
use crate::api::{ImageBuilderService, OpsService};
use crate::telemetry::Metrics;
use crate::tls::ServerTls;

/// How long open gRPC streams get to finish after a shutdown signal. Build and Logs streams of
/// builds that stop for the restart would wait forever; their clients reconnect and resume.
const DRAIN_GRACE: Duration = Duration::from_secs(3);

/// The services health is reported for: the whole server (`""`) and each API.
const HEALTH_SERVICES: [&str; 3] = ["", "builder.ImageBuilder", "imagebuilder.ops.v1.BuildOps"];

/// Refuses calls until the service is ready.
#[derive(Clone)]
pub struct Gate(Arc<AtomicBool>);

impl tonic::service::Interceptor for Gate {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if self.0.load(Ordering::Acquire) {
            Ok(request)
        } else {
            Err(refuse(
                Code::Unavailable,
                "image-builder is starting (resuming unfinished builds); try again in a moment",
            ))
        }
    }
}

/// The gRPC server's state as the rest of the service changes it.
pub struct Readiness {
    gate: Arc<AtomicBool>,
    health: HealthReporter,
}

impl Readiness {
    /// Opens the API and reports `SERVING`.
    pub async fn ready(&self) {
        self.gate.store(true, Ordering::Release);
        self.set(ServingStatus::Serving).await;
    }

    /// Reports `NOT_SERVING`: shutdown has started.
    pub async fn stopping(&self) {
        self.set(ServingStatus::NotServing).await;
    }

    async fn set(&self, status: ServingStatus) {
        for service in HEALTH_SERVICES {
            self.health.set_service_status(service, status).await;
        }
    }
}

/// Serves the gRPC API on `listener` until `stop` fires, then lets open streams finish for
/// [`DRAIN_GRACE`]. Returns at once with the [`Readiness`] handle (the API refuses calls and
/// health says `NOT_SERVING` until [`Readiness::ready`]) and the task that serves.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    builder: ImageBuilderService,
    ops: OpsService,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> anyhow::Result<(Readiness, tokio::task::JoinHandle<anyhow::Result<()>>)> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let gate = Gate(Arc::new(AtomicBool::new(false)));
    let readiness = Readiness {
        gate: Arc::clone(&gate.0),
        health,
    };
    readiness.set(ServingStatus::NotServing).await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // v1 for today's clients, v1alpha for older grpcurl and grpc_cli.
    let reflection_v1 = reflection()
        .build_v1()
        .context("cannot describe the API for server reflection")?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .context("cannot describe the API for server reflection")?;
    let router = tonic::transport::Server::builder()
        .layer(GrpcMetricsLayer(metrics))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(InterceptedService::new(builder.into_server(), gate.clone()))
        .add_service(InterceptedService::new(ops.into_server(), gate));
    let task = tokio::spawn(async move {
        let stopped = stop.clone().cancelled_owned();
        let served = async {
            match tls {
                Some(tls) => {
                    let incoming = tls.incoming(listener, stop.clone());
                    router.serve_with_incoming_shutdown(incoming, stopped).await
                }
                None => {
                    // tonic sets TCP_NODELAY only on listeners it binds itself; without it
                    // every small response waits out delayed ACKs (~40 ms).
                    let incoming = TcpListenerStream::new(listener).map_ok(|stream| {
                        let _ = stream.set_nodelay(true);
                        stream
                    });
                    router.serve_with_incoming_shutdown(incoming, stopped).await
                }
            }
        };
        let drain_deadline = async {
            stop.cancelled().await;
            tokio::time::sleep(DRAIN_GRACE).await;
        };
        tokio::select! {
            served = served => served.context("the gRPC server failed"),
            () = drain_deadline => {
                tracing::info!(?DRAIN_GRACE, "closing gRPC streams still open after the drain period");
                Ok(())
            }
        }
    });
    Ok((readiness, task))
}
