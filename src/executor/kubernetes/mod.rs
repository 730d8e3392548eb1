//! The Kubernetes executor: each build attempt's base image is built by one `batch/v1` Job,
//! and the journal keeps track of the Job, not the other way round.
//!
//! - The Job's name comes from the build id and attempt, and is journaled (a
//!   `BuilderOutput` record) before the Job is created. Creating is idempotent: a Job that
//!   exists already (AlreadyExists, or found after a restart) is ours, and the step attaches
//!   to it. So no restart ever starts a second Job for one attempt.
//! - The attempt's registry (and git) credentials reach the builder in a Secret made for it,
//!   owned by the Job (garbage collection removes both), deleted once the attempt ends.
//! - The Job's pod's output is followed through `pods/log` into the build log; how much of it
//!   the log holds is journaled with the bytes, so a resumed build's log goes on with no gap
//!   and no duplicate (see `follow.rs`).
//! - Cancels, timeouts and the end of a build delete the build's Jobs (foreground) and their
//!   Secrets; `sweep.rs` deletes Jobs of this installation that no unfinished build knows.
//!
//! Why a Job, not a bare Pod: the Job controller keeps the pod's record and reports the
//! outcome as a condition (including `activeDeadlineSeconds`), and a Job owns the Secret, so
//! that deleting the Job (by us or by hand) removes everything.

mod follow;
pub mod manifest;
mod scripts;
mod sweep;

use std::sync::Arc;

use async_trait::async_trait;
use image_builder_state::{BuildId, BuildView, BuilderProgress};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{DeleteParams, ListParams, PostParams, PropagationPolicy};
use kube::{Api, Client};
use tracing::Instrument;

use crate::config::KubernetesConfig;
use crate::credentials::{BuildSecrets, Credentials, Secret as Credential};
use crate::steps::{BuildBase, StepError, StepErrorKind, StepLog, Tail};
pub use sweep::{KnownBuilds, sweep_orphans};

/// The Kubernetes API failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No cluster configuration (neither in-cluster nor `KUBECONFIG`).
    #[error("cannot find the cluster: {0} (run inside a cluster, or set KUBECONFIG)")]
    Config(String),
    /// A request to the API server failed.
    #[error("the Kubernetes API refused {what}: {source}")]
    Api {
        /// What was asked.
        what: String,
        /// Why it failed.
        source: kube::Error,
    },
}

impl From<Error> for StepError {
    fn from(err: Error) -> Self {
        let kind = match &err {
            Error::Config(_) => StepErrorKind::Failed,
            Error::Api { source, .. } => match source {
                kube::Error::Api(status) if status.code == 403 => StepErrorKind::Denied,
                kube::Error::Api(status) if status.code == 401 => StepErrorKind::Unauthenticated,
                kube::Error::Api(status) if status.code == 422 || status.code == 400 => {
                    StepErrorKind::Invalid
                }
                _ => StepErrorKind::Unavailable,
            },
        };
        StepError::from_source(kind, err)
    }
}

fn api_error(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let what = what.into();
    move |source| Error::Api { what, source }
}

fn is_status(err: &kube::Error, code: u16) -> bool {
    matches!(err, kube::Error::Api(status) if status.code == code)
}

/// Builds base images as Jobs in one namespace.
pub struct KubernetesExecutor {
    jobs: Api<Job>,
    pods: Api<Pod>,
    secrets: Api<Secret>,
    config: KubernetesConfig,
    /// This installation's label value: Jobs of other installations are never touched.
    installation: String,
    credentials: Arc<Credentials>,
    insecure_registries: Vec<String>,
}

impl KubernetesExecutor {
    /// An executor in the cluster of the in-cluster config or `KUBECONFIG`.
    /// `installation` names this installation in the labels of what it makes.
    pub async fn connect(
        config: KubernetesConfig,
        installation: String,
        credentials: Arc<Credentials>,
        insecure_registries: Vec<String>,
    ) -> Result<Self, Error> {
        let client = Client::try_default()
            .await
            .map_err(|e| Error::Config(e.to_string()))?;
        let namespace = config.namespace.clone();
        Ok(Self {
            jobs: Api::namespaced(client.clone(), &namespace),
            pods: Api::namespaced(client.clone(), &namespace),
            secrets: Api::namespaced(client, &namespace),
            config,
            installation,
            credentials,
            insecure_registries,
        })
    }

    /// The value of this installation's label on what it makes.
    pub fn installation(&self) -> &str {
        &self.installation
    }

    /// How old a Job nobody knows must be before the sweep deletes it.
    pub fn orphan_grace(&self) -> std::time::Duration {
        self.config.orphan_grace
    }

    /// The Job of this attempt: the one that exists, or a new one with its Secret.
    async fn job_for(
        &self,
        build: &BuildView,
        source: &image_builder_state::DockerfileSource,
        secrets: &BuildSecrets,
        log: &dyn StepLog,
    ) -> Result<Job, StepError> {
        let name = manifest::job_name(build.id, build.attempt);
        if let Some(job) = self
            .jobs
            .get_opt(&name)
            .await
            .map_err(api_error(format!("reading job {name}")))?
        {
            log.line(format!(
                "attaching to builder job {}/{name}",
                self.config.namespace
            ))
            .await;
            self.ensure_secret(&job, build, secrets).await?;
            return Ok(job);
        }
        super::require_git_credentials(source, secrets)?;
        let attempt = manifest::Attempt {
            id: build.id,
            attempt: build.attempt,
            source,
            tag: &build.base_ref,
            insecure_registries: &self.insecure_registries,
            cache: super::LayerCacheUse::of(build),
        };
        let wanted = manifest::job(&self.config, &self.installation, &attempt);
        let (job, created) = match self.jobs.create(&PostParams::default(), &wanted).await {
            Ok(job) => (job, true),
            // Made by an earlier run of this step that did not hear back: ours.
            Err(e) if is_status(&e, 409) => (
                self.jobs
                    .get(&name)
                    .await
                    .map_err(api_error(format!("reading job {name}")))?,
                false,
            ),
            Err(e) => return Err(api_error(format!("creating job {name}"))(e).into()),
        };
        // Said once the Job has its Secret too: a client that reads this line (and a restart
        // after it) finds the builder with the request's credentials, which are never
        // journaled and so cannot be made again after a restart.
        self.ensure_secret(&job, build, secrets).await?;
        if created {
            log.line(format!(
                "started builder job {}/{name} for {}",
                self.config.namespace, build.base_ref
            ))
            .await;
        }
        Ok(job)
    }

    /// Makes the attempt's Secret unless it exists.
    async fn ensure_secret(
        &self,
        job: &Job,
        build: &BuildView,
        secrets: &BuildSecrets,
    ) -> Result<(), StepError> {
        let name = manifest::secret_name(job.metadata.name.as_deref().unwrap_or_default());
        if self
            .secrets
            .get_opt(&name)
            .await
            .map_err(api_error(format!("reading secret {name}")))?
            .is_some()
        {
            return Ok(());
        }
        let push_host = crate::credentials::registry_host(&build.base_ref);
        let cache_hosts: Vec<String> = self
            .config
            .layer_cache_repository
            .as_deref()
            .map(crate::credentials::registry_host)
            .into_iter()
            .collect();
        // The installation's own registries (base images built before, the layer cache, the
        // push) with its credentials, whatever the request allows; other registries as the
        // request allows.
        let mut own_hosts = cache_hosts;
        own_hosts.push(push_host);
        let registry_auth = self
            .credentials
            .pull_auth_file(&secrets.registry, &own_hosts)
            .await;
        let git = secrets.git.as_ref().and_then(|g| {
            Credential::Basic {
                user: g.user.clone(),
                password: g.password.clone(),
            }
            .basic_token()
        });
        let secret = manifest::secret(job, &registry_auth, git);
        match self.secrets.create(&PostParams::default(), &secret).await {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, 409) => Ok(()),
            Err(e) => Err(api_error(format!("creating secret {name}"))(e).into()),
        }
    }

    /// Deletes the build's Jobs (their pods first: foreground) and Secrets; returns how many
    /// Jobs there were.
    async fn delete_build(&self, id: BuildId) -> usize {
        let selector = manifest::selector(&self.installation, Some(id));
        let list = ListParams::default().labels(&selector);
        let jobs = match self.jobs.list(&list).await {
            Ok(jobs) => jobs.items,
            Err(e) => {
                tracing::warn!(build_id = %id, error = %e, "cannot list the build's jobs");
                Vec::new()
            }
        };
        let foreground = DeleteParams {
            propagation_policy: Some(PropagationPolicy::Foreground),
            ..DeleteParams::default()
        };
        for job in &jobs {
            if let Some(name) = &job.metadata.name
                && let Err(e) = self.jobs.delete(name, &foreground).await
                && !is_status(&e, 404)
            {
                tracing::warn!(build_id = %id, job = %name, error = %e, "cannot delete a builder job");
            }
        }
        if let Err(e) = self
            .secrets
            .delete_collection(&DeleteParams::default(), &list)
            .await
        {
            tracing::warn!(build_id = %id, error = %e, "cannot delete the build's secrets");
        }
        jobs.len()
    }

    /// Deletes one attempt's Secret: the builder has no more use for it.
    async fn delete_secret(&self, job: &str) {
        let name = manifest::secret_name(job);
        if let Err(e) = self.secrets.delete(&name, &DeleteParams::default()).await
            && !is_status(&e, 404)
        {
            tracing::warn!(secret = %name, error = %e, "cannot delete a builder secret");
        }
    }
}

#[async_trait]
impl BuildBase for KubernetesExecutor {
    async fn build(
        &self,
        build: &BuildView,
        secrets: &BuildSecrets,
        log: &dyn StepLog,
    ) -> Result<(), StepError> {
        let Some(source) = super::dockerfile_source(build, log).await else {
            return Ok(());
        };
        let name = manifest::job_name(build.id, build.attempt);
        let handle = format!("{}/{name}", self.config.namespace);
        // The journal learns the Job's name before the Job exists.
        let from = match build.builder_progress() {
            Some(progress) if progress.builder == handle => progress.clone(),
            _ => {
                let progress = BuilderProgress {
                    attempt: build.attempt,
                    builder: handle,
                    consumed: 0,
                };
                log.record_builder(progress.clone()).await?;
                progress
            }
        };
        // One span for the builder Job, from its creation (or the attach after a restart) to
        // its end.
        let span = tracing::info_span!(
            "kubernetes job",
            otel.name = "kubernetes job",
            k8s.namespace = %self.config.namespace,
            k8s.job = %name,
        );
        let tail = Tail::default();
        let outcome = async {
            let mut watch = follow::JobWatch::new(&self.jobs, &self.pods, &name);
            self.job_for(build, source, secrets, log).await?;
            Ok::<_, StepError>(match watch.started().await? {
                Ok(pod) => {
                    follow::stream_output(&self.pods, &pod, from, log, tail.clone()).await?;
                    watch.ended().await?
                }
                Err(reason) => follow::Ended::Failed(reason),
            })
        }
        .instrument(span)
        .await?;
        self.delete_secret(&name).await;
        match outcome {
            follow::Ended::Succeeded => Ok(()),
            follow::Ended::Failed(mut reason) => {
                let lines = tail.lines();
                if !lines.is_empty() {
                    reason.push_str(&format!(": {}", lines.join(" / ")));
                }
                Err(StepError::new(StepErrorKind::Failed, reason))
            }
        }
    }

    /// A builder Job survives the service: the resumed step attaches to it.
    async fn before_resume(&self, _id: BuildId) -> usize {
        0
    }

    async fn stop(&self, id: BuildId) -> usize {
        self.delete_build(id).await
    }

    async fn clean(&self, id: BuildId) {
        self.delete_build(id).await;
    }
}
