//! `image-builder run`: wires config, journal, adapters, orchestrator and the gRPC and metrics
//! endpoints together, resumes unfinished builds, serves until SIGINT or SIGTERM, then drains.
//! [`run`] reads top to bottom; `wiring.rs` makes the journal, the adapters and the
//! orchestrator, `background.rs` the tasks beside the API, `grpc.rs` owns the gRPC port.

mod background;
mod grpc;
mod grpc_metrics;
mod wiring;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::api::access::Access;
use crate::api::{ImageBuilderService, OpsService};
use crate::config::Config;
use crate::orchestrator::Orchestrator;
use crate::telemetry::{self, Metrics};
use crate::tls::ServerTls;

/// How long running steps get to stop after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

pub use image_builder_state::STORE_DIR;

/// The subdirectory of `dataDir` that holds per-build work directories (git checkouts).
pub const WORK_DIR: &str = "work";

/// The subdirectory of `dataDir` that holds buildah's storage and registries configuration.
pub const BUILDAH_DIR: &str = "buildah";

/// Where content keys' bare repositories live, under the data dir (`builds.baseImageKey: content`).
pub const KEYS_DIR: &str = "keys";

/// Runs the service until a shutdown signal: checks the files it needs, opens the store,
/// makes the adapters and the orchestrator, opens the API once unfinished builds are resumed,
/// and drains on the way out.
pub async fn run(config: Config) -> anyhow::Result<()> {
    for key in &config.legacy_keys {
        tracing::warn!(%key, "the config file uses a key of the flat layout");
    }
    // Files that must be usable are checked before anything else starts.
    let tls = load_tls(&config)?;
    let access = Arc::new(Access::from_config(&config.access)?);
    let metrics = Arc::new(Metrics::new());
    let (journal, store_open_ms) = wiring::open_journal(&config)?;
    journal.observe_commits(Arc::clone(&metrics) as _);
    let adapters = wiring::Adapters::make(&config, &metrics).await?;
    let kubernetes = adapters.kubernetes.clone();
    let orchestrator = wiring::orchestrator(&config, journal, adapters, &metrics);
    let grpc_listener = telemetry::bind("gRPC", config.grpc_address).await?;
    let grpc_address = grpc_listener.local_addr()?;
    let metrics_listener = telemetry::bind("metrics", config.metrics_address).await?;
    say_how_grpc_is_protected(tls.as_deref(), grpc_address);

    let shutdown = CancellationToken::new();
    let stop_serving = CancellationToken::new();
    let (readiness, server) = grpc::serve(
        grpc_listener,
        tls,
        ImageBuilderService::new(orchestrator.clone()),
        OpsService::new(orchestrator.clone(), access),
        Arc::clone(&metrics),
        stop_serving.clone(),
    )
    .await?;
    // The API opens once unfinished builds are resumed, so a Build call for a resumed build's
    // image joins it.
    let resumed = resume(&orchestrator)?;
    readiness.ready().await;
    tracing::info!(
        %grpc_address,
        metrics_address = %metrics_listener.local_addr()?,
        data_dir = %config.data_dir.display(),
        resumed = resumed.builds,
        damaged = resumed.damaged,
        store_open_ms,
        resume_ms = resumed.took_ms,
        "image-builder serving"
    );

    background::start(&orchestrator, &config, kubernetes, &metrics, &shutdown);
    let metrics_task = tokio::spawn(telemetry::serve_metrics(
        metrics_listener,
        metrics,
        shutdown.clone(),
    ));
    let served = drain(&orchestrator, readiness, server, shutdown, stop_serving).await;
    served.context("the gRPC server task failed")??;
    let _ = metrics_task.await;
    tracing::info!("stopped");
    Ok(())
}

/// The `tls` files, loaded (a bad file stops the start, naming it).
fn load_tls(config: &Config) -> anyhow::Result<Option<Arc<ServerTls>>> {
    config
        .tls
        .as_ref()
        .map(|tls| ServerTls::load(tls).map(Arc::new))
        .transpose()
        .context("cannot use the `tls` files")
}

/// Says in the log how the gRPC port is protected, and warns when plain text is served
/// beyond loopback.
fn say_how_grpc_is_protected(tls: Option<&ServerTls>, grpc_address: std::net::SocketAddr) {
    match tls {
        Some(tls) if tls.is_mutual() => {
            tracing::info!("gRPC speaks TLS and asks every client for a certificate (mTLS)");
        }
        Some(_) => tracing::info!("gRPC speaks TLS"),
        None if !grpc_address.ip().is_loopback() => tracing::warn!(
            %grpc_address,
            "gRPC serves plain text on an address other machines reach (allowInsecure): \
             anyone on the network can read builds and their logs; set `tls`"
        ),
        None => {}
    }
}

/// What resuming the unfinished builds found.
struct Resumed {
    builds: usize,
    damaged: usize,
    took_ms: u64,
}

/// Resumes every unfinished build (before the API opens) and warns of damaged ones.
fn resume(orchestrator: &Orchestrator) -> anyhow::Result<Resumed> {
    #[cfg(feature = "failpoints")]
    fail::fail_point!("server.resume");
    let resuming = std::time::Instant::now();
    let builds = orchestrator.resume_unfinished()?;
    let took_ms = resuming.elapsed().as_millis() as u64;
    let damaged = orchestrator.damaged_count();
    if damaged > 0 {
        tracing::warn!(
            damaged,
            "{damaged} builds in the store are damaged (served up to their damage, never \
             resumed): `image-builder builds list --state damaged` lists them with the reason; \
             `image-builder store check`, with the service stopped, names every bad record"
        );
    }
    Ok(Resumed {
        builds,
        damaged,
        took_ms,
    })
}

/// Serves until `shutdown` (or until the server gives up on its own), then drains: health
/// says `NOT_SERVING`, the port stops taking calls, build steps stop, and what the
/// write-ahead log holds goes into the store. Returns how the server task ended.
async fn drain(
    orchestrator: &Orchestrator,
    readiness: grpc::Readiness,
    mut server: tokio::task::JoinHandle<anyhow::Result<()>>,
    shutdown: CancellationToken,
    stop_serving: CancellationToken,
) -> Result<anyhow::Result<()>, tokio::task::JoinError> {
    let stop_builds = {
        let orchestrator = orchestrator.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            tracing::info!("shutting down: stopping intake and build steps");
            orchestrator.shutdown(SHUTDOWN_GRACE).await;
        })
    };
    let served = tokio::select! {
        () = shutdown.cancelled() => {
            // Health says NOT_SERVING before the port stops taking calls, so load balancers
            // and probes watching it see the shutdown coming.
            readiness.stopping().await;
            stop_serving.cancel();
            (&mut server).await
        }
        // The server gave up on its own (it cannot accept): stop the builds, then say why.
        served = &mut server => {
            shutdown.cancel();
            served
        }
    };
    let _ = stop_builds.await;
    // Last: what the write-ahead log holds goes into the store, so the next start replays
    // nothing.
    if let Err(e) = orchestrator.journal().checkpoint().await {
        tracing::warn!(error = %e, "could not checkpoint the store; the next start replays its log");
    }
    served
}

/// Makes `dir` (and its parents) and keeps it to the service's user (mode 0700): the data
/// dir is reachable by the local builder's user namespace, the journal and the content keys'
/// clones of users' repositories are not.
fn private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
        .with_context(|| format!("cannot make {} private to the service", dir.display()))
}
