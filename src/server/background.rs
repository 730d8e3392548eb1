//! What runs beside the API while the service serves: the shutdown signal, the retention
//! sweep and, with the Kubernetes executor, the sweep of builder Jobs nobody knows.

use std::sync::Arc;
use std::time::Duration;

use image_builder_state::BuildId;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::executor::kubernetes::{KnownBuilds, KubernetesExecutor, sweep_orphans};
use crate::orchestrator::Orchestrator;
use crate::telemetry::Metrics;

/// Starts the background tasks; each ends at `shutdown` (the signal task is what cancels it).
pub(super) fn start(
    orchestrator: &Orchestrator,
    config: &Config,
    kubernetes: Option<Arc<KubernetesExecutor>>,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) {
    tokio::spawn(signal_shutdown(shutdown.clone()));
    tokio::spawn(retention(
        orchestrator.clone(),
        config.builds.retention,
        shutdown.clone(),
    ));
    if let Some(executor) = kubernetes {
        tokio::spawn(sweep_orphan_jobs(
            executor,
            orchestrator.clone(),
            Arc::clone(metrics),
            shutdown.clone(),
        ));
    }
}

/// Removes builds past `retention`, every tenth of it (between 1 s and an hour).
async fn retention(orchestrator: Orchestrator, retention: Duration, shutdown: CancellationToken) {
    let every = (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(3600));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = orchestrator.sweep(retention).await {
            tracing::warn!(error = %e, "retention sweep failed; trying again later");
        }
    }
}

async fn signal_shutdown(shutdown: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the service");
            let _ = tokio::signal::ctrl_c().await;
            shutdown.cancel();
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown signal received");
    shutdown.cancel();
}

/// How often the orphan sweep looks for builder Jobs nobody knows, at most.
const ORPHAN_SWEEP_EVERY: Duration = Duration::from_secs(60);

impl KnownBuilds for Orchestrator {
    fn is_unfinished(&self, id: BuildId) -> bool {
        self.journal()
            .view(id)
            .ok()
            .flatten()
            .is_some_and(|view| !view.phase().is_final())
    }
}

/// Deletes builder Jobs no unfinished build knows, every [`ORPHAN_SWEEP_EVERY`] (or every
/// `orphanGrace`, when that is shorter).
async fn sweep_orphan_jobs(
    executor: Arc<KubernetesExecutor>,
    orchestrator: Orchestrator,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let every = ORPHAN_SWEEP_EVERY.min(executor.orphan_grace());
    loop {
        let deleted = sweep_orphans(&executor, &orchestrator).await;
        if deleted > 0 {
            metrics.orphan_jobs_deleted(deleted);
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}
