//! `image-builder run`: wires config, journal, adapters, orchestrator and the gRPC and metrics
//! endpoints together, resumes unfinished builds, serves until SIGINT or SIGTERM, then drains.
//! `grpc.rs` owns the gRPC port.

mod grpc;
mod grpc_metrics;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use image_builder_state::{BuildId, Journal};
use tokio_util::sync::CancellationToken;

use crate::api::access::Access;
use crate::api::{ImageBuilderService, OpsService};
use crate::config::{BaseImageKey, Config, ExecutorConfig};
use crate::context::{ContentKeys, GitCheckouts};
use crate::credentials::Credentials;
use crate::executor::LocalExecutor;
use crate::executor::buildah::Buildah;
use crate::executor::kubernetes::{KnownBuilds, KubernetesExecutor, sweep_orphans};
use crate::executor::layer_cache::LayerCache;
use crate::executor::user_namespace::UserNamespace;
use crate::orchestrator::{Limits, Orchestrator, Repositories};
use crate::registry::{Registry, RetryPolicy};
use crate::steps::{BuildBase, ReadSource, Steps};
use crate::telemetry::{self, Metrics};
use crate::tls::ServerTls;

/// How long running steps get to stop after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

pub use image_builder_state::STORE_DIR;

/// The subdirectory of `dataDir` that holds per-build work directories (git checkouts).
pub const WORK_DIR: &str = "work";

/// The subdirectory of `dataDir` that holds buildah's storage and registries configuration.
pub const BUILDAH_DIR: &str = "buildah";

/// Where content keys' bare repositories live, under the data dir (`baseImageKey: content`).
pub const KEYS_DIR: &str = "keys";

/// Runs the service until a shutdown signal.
pub async fn run(config: Config) -> anyhow::Result<()> {
    // Files that must be usable are checked before anything else starts.
    let tls = match &config.tls {
        Some(tls) => Some(Arc::new(
            ServerTls::load(tls).context("cannot use the `tls` files")?,
        )),
        None => None,
    };
    let access = Arc::new(Access::from_config(&config)?);
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create dataDir {}", config.data_dir.display()))?;
    let store = config.data_dir.join(STORE_DIR);
    private_dir(&store)?;
    let opening = std::time::Instant::now();
    let journal = Journal::open(&store)
        .with_context(|| format!("cannot open the build store in {}", store.display()))?;
    let store_open_ms = opening.elapsed().as_millis() as u64;
    let retry = RetryPolicy {
        budget: config.registry_retry_budget,
        ..RetryPolicy::default()
    };
    let mut credentials = Credentials::new(
        config.pull_secret_file.as_deref(),
        &config.base_image_repository,
        &config.workspace_image_repository,
    )
    .context("cannot use pullSecretFile")?;
    if config.enable_additional_ecr_auth {
        credentials = credentials.with_ecr(config.ecr_endpoint.clone());
    }
    let credentials = Arc::new(credentials);
    let metrics = Arc::new(Metrics::new());
    journal.observe_commits(Arc::clone(&metrics) as _);
    let registry = Arc::new(
        Registry::with_policy(&config.insecure_registries, retry, config.registry_timeout)
            .with_requests_per_host(config.registry_requests_per_host)
            .with_metrics(Arc::clone(&metrics)),
    );
    let (builder, kubernetes): (Arc<dyn BuildBase>, _) = match &config.executor {
        ExecutorConfig::Local => {
            let namespace = UserNamespace::of_current_user()
                .context("the local executor cannot run builds in a user namespace")?;
            let buildah = Buildah::new(
                config.data_dir.join(BUILDAH_DIR),
                &config.insecure_registries,
                namespace,
            )?;
            let cache = Arc::new(LayerCache::new(
                buildah,
                config.layer_cache_size.as_u64(),
                Some(Arc::clone(&metrics)),
            ));
            let checkouts = GitCheckouts::new(config.data_dir.join(WORK_DIR));
            let local = LocalExecutor::new(checkouts, cache, Arc::clone(&credentials));
            (Arc::new(local), None)
        }
        ExecutorConfig::Kubernetes(k8s) => {
            let executor = Arc::new(
                KubernetesExecutor::connect(
                    (**k8s).clone(),
                    installation_key(&config),
                    Arc::clone(&credentials),
                    config.insecure_registries.clone(),
                )
                .await
                .context("cannot use the Kubernetes executor")?,
            );
            tracing::info!(
                namespace = %k8s.namespace,
                image = %k8s.builder_image,
                installation = %executor.installation(),
                "builds run as Kubernetes jobs"
            );
            (Arc::clone(&executor) as Arc<dyn BuildBase>, Some(executor))
        }
    };
    let content = match config.base_image_key {
        BaseImageKey::Mk3 => None,
        BaseImageKey::Content => {
            let keys = config.data_dir.join(KEYS_DIR);
            private_dir(&keys)?;
            Some(Arc::new(ContentKeys::new(keys)) as Arc<dyn ReadSource>)
        }
    };
    let steps = Steps {
        resolver: registry.clone(),
        cache: registry.clone(),
        builder,
        pusher: registry,
        content,
    };
    let limits = Limits {
        build_timeout: config.build_timeout,
        max_concurrent_builds: config.max_concurrent_builds,
        max_log_bytes: config.max_log_bytes,
        allow_local_repositories: config.allow_local_repositories,
    };
    let repos = Repositories {
        base: config.base_image_repository.clone(),
        workspace: config.workspace_image_repository.clone(),
    };
    let orchestrator = Orchestrator::new(
        journal,
        steps,
        credentials,
        repos,
        limits,
        Arc::clone(&metrics),
    );

    let grpc_listener = telemetry::bind("gRPC", config.grpc_address).await?;
    let grpc_address = grpc_listener.local_addr()?;
    let metrics_listener = telemetry::bind("metrics", config.metrics_address).await?;
    match &tls {
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
    #[cfg(feature = "failpoints")]
    fail::fail_point!("server.resume");
    let resuming = std::time::Instant::now();
    let resumed = orchestrator.resume_unfinished()?;
    let resume_ms = resuming.elapsed().as_millis() as u64;
    let damaged = orchestrator.damaged_count();
    if damaged > 0 {
        tracing::warn!(
            damaged,
            "{damaged} builds in the store are damaged (served up to their damage, never \
             resumed): `image-builder builds list --state damaged` lists them with the reason; \
             `image-builder store check`, with the service stopped, names every bad record"
        );
    }
    readiness.ready().await;
    tracing::info!(
        %grpc_address,
        metrics_address = %metrics_listener.local_addr()?,
        data_dir = %config.data_dir.display(),
        resumed,
        damaged,
        store_open_ms,
        resume_ms,
        "image-builder serving"
    );

    tokio::spawn(signal_shutdown(shutdown.clone()));
    tokio::spawn(retention(
        orchestrator.clone(),
        config.retention,
        shutdown.clone(),
    ));
    if let Some(executor) = kubernetes {
        tokio::spawn(sweep_orphan_jobs(
            executor,
            orchestrator.clone(),
            Arc::clone(&metrics),
            shutdown.clone(),
        ));
    }
    let metrics_task = tokio::spawn(telemetry::serve_metrics(
        metrics_listener,
        metrics,
        shutdown.clone(),
    ));
    let stop_builds = {
        let orchestrator = orchestrator.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            tracing::info!("shutting down: stopping intake and build steps");
            orchestrator.shutdown(SHUTDOWN_GRACE).await;
        })
    };
    let mut server = server;
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
    served.context("the gRPC server task failed")??;
    let _ = metrics_task.await;
    tracing::info!("stopped");
    Ok(())
}

/// Removes builds past `retention` in the background, every tenth of it (between 1 s and an
/// hour).
/// Makes `dir` (and its parents) and keeps it to the service's user (mode 0700): the data
/// dir is reachable by the local builder's user namespace, the journal and the content keys'
/// clones of users' repositories are not.
fn private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
        .with_context(|| format!("cannot make {} private to the service", dir.display()))
}

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

/// Names this installation in the labels of the Kubernetes objects it makes: its
/// repositories and store, so two installations sharing a namespace leave each other alone.
fn installation_key(config: &Config) -> String {
    use sha2::Digest;
    let store = config
        .data_dir
        .canonicalize()
        .unwrap_or_else(|_| config.data_dir.clone());
    let mut hash = sha2::Sha256::new();
    for part in [
        config.base_image_repository.as_bytes(),
        config.workspace_image_repository.as_bytes(),
        store.as_os_str().as_encoded_bytes(),
    ] {
        hash.update(part);
        hash.update([0]);
    }
    hex::encode(&hash.finalize()[..8])
}

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
