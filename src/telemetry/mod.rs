//! Observability: structured logs (tracing), and the Prometheus metrics with their HTTP
//! endpoint. Metric names are defined in [`metrics`] and nowhere else.

pub mod metrics;
pub mod traces;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

pub use metrics::Metrics;

/// Installs the process-wide tracing subscriber: human-readable lines on stderr, filtered by
/// `RUST_LOG` (default `info`); `IMAGE_BUILDER_LOG_FORMAT=json` switches to JSON lines. With
/// `traces`, this crate's spans (info and up, whatever `RUST_LOG` says) are exported too.
pub fn init_tracing(traces: Option<&traces::Exporter>) {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let lines = if std::env::var("IMAGE_BUILDER_LOG_FORMAT").as_deref() == Ok("json") {
        lines.json().boxed()
    } else {
        lines.boxed()
    };
    let spans = traces.map(|exporter| {
        tracing_opentelemetry::layer()
            .with_tracer(exporter.tracer())
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target("image_builder", tracing::Level::INFO),
            )
    });
    // A second init (tests, embedding) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(lines.with_filter(filter))
        .with(spans)
        .try_init();
}

/// Serves `GET /metrics` in the Prometheus text format until `shutdown` fires.
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = Arc::clone(&metrics);
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.render(),
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// Binds a listener, saying which address could not be bound.
pub async fn bind(what: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for {what}: {e}"))
}
