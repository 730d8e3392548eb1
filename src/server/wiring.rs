//! The composition root's parts: the journal opened in the data dir, the adapters the
//! configuration asks for (registry, executor, content keys) behind the step traits, and the
//! orchestrator over them.

use std::sync::Arc;

use anyhow::Context;
use image_builder_state::Journal;

use super::{BUILDAH_DIR, KEYS_DIR, STORE_DIR, WORK_DIR, private_dir};
use crate::config::{BaseImageKey, Config, ExecutorConfig};
use crate::context::{ContentKeys, GitCheckouts};
use crate::credentials::Credentials;
use crate::executor::LocalExecutor;
use crate::executor::buildah::Buildah;
use crate::executor::kubernetes::KubernetesExecutor;
use crate::executor::layer_cache::LayerCache;
use crate::executor::user_namespace::UserNamespace;
use crate::orchestrator::{Limits, Orchestrator, Repositories};
use crate::registry::{Registry, RetryPolicy};
use crate::steps::{BuildBase, ReadSource, Steps};
use crate::telemetry::Metrics;

/// Opens the journal in the data dir (made, and the store private to the service); returns
/// it with how long the open took, in ms.
pub(super) fn open_journal(config: &Config) -> anyhow::Result<(Journal, u64)> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create dataDir {}", config.data_dir.display()))?;
    let store = config.data_dir.join(STORE_DIR);
    private_dir(&store)?;
    let opening = std::time::Instant::now();
    let journal = Journal::open(&store)
        .with_context(|| format!("cannot open the build store in {}", store.display()))?;
    Ok((journal, opening.elapsed().as_millis() as u64))
}

/// The adapters a configuration asks for, made and connected.
pub(super) struct Adapters {
    /// The installation's credentials and pull secret.
    credentials: Arc<Credentials>,
    /// The step traits' implementations.
    steps: Steps,
    /// The Kubernetes executor, when builds run as Jobs (its orphan sweep runs beside).
    pub(super) kubernetes: Option<Arc<KubernetesExecutor>>,
}

impl Adapters {
    /// Makes the credentials, the registry client, the executor and the content keys.
    pub(super) async fn make(config: &Config, metrics: &Arc<Metrics>) -> anyhow::Result<Self> {
        let credentials = Arc::new(credentials(config)?);
        let retry = RetryPolicy {
            budget: config.registry.retry_budget,
            ..RetryPolicy::default()
        };
        let registry = Arc::new(
            Registry::with_policy(&config.registry.insecure, retry, config.registry.timeout)
                .with_requests_per_host(config.registry.requests_per_host)
                .with_metrics(Arc::clone(metrics)),
        );
        let (builder, kubernetes) = executor(config, &credentials, metrics).await?;
        let content = match config.builds.base_image_key {
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
        Ok(Self {
            credentials,
            steps,
            kubernetes,
        })
    }
}

/// The installation's credentials: the pull secret, and ECR when asked for.
fn credentials(config: &Config) -> anyhow::Result<Credentials> {
    let credentials = Credentials::new(
        config.pull_secret_file.as_deref(),
        &config.base_image_repository,
        &config.workspace_image_repository,
    )
    .context("cannot use pullSecretFile")?;
    Ok(if config.enable_additional_ecr_auth {
        credentials.with_ecr(config.registry.ecr_endpoint.clone())
    } else {
        credentials
    })
}

/// The executor `executor` names: buildah in a user namespace here, or Kubernetes Jobs (then
/// also returned as itself, for its orphan sweep).
async fn executor(
    config: &Config,
    credentials: &Arc<Credentials>,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<(Arc<dyn BuildBase>, Option<Arc<KubernetesExecutor>>)> {
    match &config.executor {
        ExecutorConfig::Local(local) => {
            let namespace = UserNamespace::of_current_user()
                .context("the local executor cannot run builds in a user namespace")?;
            let buildah = Buildah::new(
                config.data_dir.join(BUILDAH_DIR),
                &config.registry.insecure,
                namespace,
            )?;
            let cache = Arc::new(LayerCache::new(
                buildah,
                local.layer_cache_size.as_u64(),
                Some(Arc::clone(metrics)),
            ));
            let checkouts = GitCheckouts::new(config.data_dir.join(WORK_DIR));
            let local = LocalExecutor::new(checkouts, cache, Arc::clone(credentials));
            Ok((Arc::new(local), None))
        }
        ExecutorConfig::Kubernetes(k8s) => {
            let executor = Arc::new(
                KubernetesExecutor::connect(
                    (**k8s).clone(),
                    installation_key(config),
                    Arc::clone(credentials),
                    config.registry.insecure.clone(),
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
            Ok((Arc::clone(&executor) as Arc<dyn BuildBase>, Some(executor)))
        }
    }
}

/// The orchestrator over `journal` and the adapters, with the configuration's limits.
pub(super) fn orchestrator(
    config: &Config,
    journal: Journal,
    adapters: Adapters,
    metrics: &Arc<Metrics>,
) -> Orchestrator {
    let limits = Limits {
        build_timeout: config.builds.timeout,
        max_concurrent_builds: config.builds.max_concurrent,
        max_log_bytes: config.builds.max_log_bytes,
        allow_local_repositories: config.builds.allow_local_repositories,
    };
    let repos = Repositories {
        base: config.base_image_repository.clone(),
        workspace: config.workspace_image_repository.clone(),
    };
    Orchestrator::new(
        journal,
        adapters.steps,
        adapters.credentials,
        repos,
        limits,
        Arc::clone(metrics),
    )
}

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
