//! The orchestrator: the only place that sequences build steps.
//!
//! A request is resolved to its base and workspace refs, answered from the cache when the
//! workspace image exists, joined to the running build of the same workspace ref (single
//! flight), or journaled as a new build. New builds wait as Queued until the concurrency limit
//! admits them, in order; then a task drives each to a final phase. At start every unfinished
//! build is resumed from its last journaled phase (running ones are admitted before queued
//! ones).

mod flight;
mod log;
mod steps;
mod task;

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use image_builder_state::journal::{self, Follower, Reader};
use image_builder_state::view::Summary;
use image_builder_state::{BuildId, BuildSource, BuildSpec, BuildView, Journal};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use flight::{Flight, ForgetUnlessKept};
pub use log::{BuildLog, Output, Tail};
pub use steps::{Build, BuildSecrets, CheckCache, Push, Resolve, StepError, Steps};

use crate::context::UrlUserinfo;
use crate::credentials::{Credentials, RequestAuth, RequestKeychain};
use crate::refs::{self, DockerfileKey};
use crate::registry::Untracked;
use crate::telemetry::Metrics;

/// Why the orchestrator could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed or asks for something unsupported.
    #[error("{0}")]
    InvalidRequest(String),
    /// No build matches.
    #[error("{0}")]
    NotFound(String),
    /// A step failed while answering the request.
    #[error(transparent)]
    Step(#[from] StepError),
    /// The journal failed.
    #[error(transparent)]
    Journal(#[from] journal::Error),
    /// The build is not in a state that allows this.
    #[error("{0}")]
    Conflict(String),
    /// The build this request joined could not be recorded.
    #[error("the build this request joined could not be recorded; try again")]
    JoinFailed,
    /// The service is stopping and takes no new builds.
    #[error("the service is shutting down and accepts no new builds; try again shortly")]
    ShuttingDown,
}

/// The repositories builds push to.
#[derive(Debug, Clone)]
pub struct Repositories {
    /// Where Dockerfile builds put base images.
    pub base: String,
    /// Where workspace images go.
    pub workspace: String,
}

/// What became of a build request.
#[derive(Debug, Clone)]
pub enum Submitted {
    /// The workspace image exists; no build was started.
    CacheHit {
        /// The base image.
        base_ref: String,
        /// The existing workspace image.
        workspace_ref: String,
    },
    /// A build is under way: a new one, or one this request joined.
    Running {
        /// The build.
        id: BuildId,
        /// True when another request started it.
        joined: bool,
        /// The base image.
        base_ref: String,
        /// The workspace image being made.
        workspace_ref: String,
        /// When the build was accepted, ms since the epoch.
        created_at_ms: i64,
    },
}

/// Limits on builds, from the config.
#[derive(Debug, Clone)]
pub struct Limits {
    /// How long a build may run once admitted.
    pub build_timeout: Duration,
    /// Builds that run at once.
    pub max_concurrent_builds: usize,
    /// Bytes of log kept per build.
    pub max_log_bytes: u64,
    /// Whether Dockerfile builds may clone repositories on this machine.
    pub allow_local_repositories: bool,
}

/// A build waiting for a slot.
struct Admission {
    view: BuildView,
    resumed: bool,
    cancel: CancellationToken,
}

/// The refs a source resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedRefs {
    /// The base image.
    pub base_ref: String,
    /// The workspace image.
    pub workspace_ref: String,
}

/// What a cancel did.
#[derive(Debug, Clone)]
pub struct Cancelled {
    /// Build calls other than the first that were following the build.
    pub joined: usize,
}

/// What a retry did.
#[derive(Debug, Clone)]
pub struct Retried {
    /// The new attempt's number.
    pub attempt: u32,
    /// Whether the original request carried credentials of its own, which are not kept.
    pub needs_request_credentials: bool,
}

struct Inner {
    journal: Journal,
    steps: Steps,
    credentials: Arc<Credentials>,
    /// A request that allows every registry the installation's credentials.
    allow_all: RequestAuth,
    repos: Repositories,
    limits: Limits,
    metrics: Arc<Metrics>,
    flights: Mutex<HashMap<String, Flight>>,
    secrets: Mutex<HashMap<BuildId, BuildSecrets>>,
    admissions: mpsc::UnboundedSender<Admission>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

/// Accepts builds and drives them. Cheap to clone.
#[derive(Clone)]
pub struct Orchestrator {
    inner: Arc<Inner>,
}

impl Orchestrator {
    /// An orchestrator over `journal`, carrying builds out with `steps`. Must be called
    /// within a tokio runtime: it starts the admission task.
    pub fn new(
        journal: Journal,
        steps: Steps,
        credentials: Arc<Credentials>,
        repos: Repositories,
        limits: Limits,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (admissions, queue) = mpsc::unbounded_channel();
        let slots = Arc::new(Semaphore::new(limits.max_concurrent_builds));
        let inner = Arc::new(Inner {
            journal,
            steps,
            credentials,
            allow_all: RequestAuth {
                allow_all: true,
                ..RequestAuth::default()
            },
            repos,
            limits,
            metrics,
            flights: Mutex::new(HashMap::new()),
            secrets: Mutex::new(HashMap::new()),
            admissions,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        tokio::spawn(admit(Arc::downgrade(&inner), queue, slots));
        Self { inner }
    }

    /// The journal, for reading builds.
    pub fn journal(&self) -> &Journal {
        &self.inner.journal
    }

    /// Resumes every unfinished build from its last journaled phase. Returns how many.
    pub fn resume_unfinished(&self) -> Result<usize, Error> {
        let mut unfinished = self.inner.journal.unfinished()?;
        // Builds that were running get their slots back before queued ones; each group keeps
        // creation order (the sort is stable).
        unfinished.sort_by_key(|v| v.phase() == image_builder_state::Phase::Queued);
        let count = unfinished.len();
        for view in unfinished {
            let (_, created) = watch::channel(true);
            let flight = Flight::new(view.id, view.attempt, created);
            let cancel = flight.cancel.clone();
            self.lock_flights()
                .insert(view.workspace_ref.clone(), flight);
            tracing::info!(build_id = %view.id, phase = %view.phase(), "resuming build");
            self.spawn(view, true, cancel);
        }
        Ok(count)
    }

    /// Resolves a reference to its pinned base ref (`ResolveBaseImage`), with the registry
    /// credentials `request` allows.
    pub async fn resolve_base(
        &self,
        reference: &str,
        request: &RequestAuth,
    ) -> Result<String, Error> {
        if reference.trim().is_empty() {
            return Err(Error::InvalidRequest(
                "ref is empty: name an image, e.g. alpine:3.20".into(),
            ));
        }
        Ok(self
            .inner
            .steps
            .resolver
            .resolve(reference, &self.inner.keychain(request), &Untracked)
            .await?)
    }

    /// The refs a source resolves to (asks the registry for reference sources).
    /// `remote_userinfo` is what the request's git remote URL carried: mk3 hashes the URL as
    /// sent, so it goes back in for the hash (and nowhere else).
    pub async fn resolve_refs(
        &self,
        source: &BuildSource,
        remote_userinfo: Option<&UrlUserinfo>,
        request: &RequestAuth,
    ) -> Result<ResolvedRefs, Error> {
        let base_ref = match source {
            BuildSource::Reference { reference } => self.resolve_base(reference, request).await?,
            BuildSource::Dockerfile(d) => refs::dockerfile_base_ref(
                &self.inner.repos.base,
                &DockerfileKey {
                    clone_target: &d.clone_target,
                    context_path: &d.context_path,
                    dockerfile_path: &d.dockerfile_path,
                    dockerfile_version: &d.dockerfile_version,
                    remote_uri: &remote_userinfo
                        .map_or_else(|| d.remote_uri.clone(), |u| u.restore(&d.remote_uri)),
                },
            ),
        };
        let workspace_ref = refs::workspace_ref(&self.inner.repos.workspace, &base_ref);
        Ok(ResolvedRefs {
            base_ref,
            workspace_ref,
        })
    }

    /// The manifest digest of an image of the installation's own repositories (a workspace
    /// image, a Dockerfile build's base image), looked up with the installation's credentials
    /// as mk3 does.
    pub async fn lookup_own(&self, reference: &str) -> Result<Option<String>, Error> {
        Ok(self
            .inner
            .steps
            .cache
            .lookup(reference, &self.inner.installation(), &Untracked)
            .await?)
    }

    /// Accepts a build request: a cache hit, a join, or a new durable build. `secrets` stay
    /// in memory for the build's steps and are never journaled.
    pub async fn submit(&self, spec: BuildSpec, secrets: BuildSecrets) -> Result<Submitted, Error> {
        if self.inner.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        if let BuildSource::Dockerfile(d) = &spec.source
            && crate::api::is_local_remote(&d.remote_uri)
            && !self.inner.limits.allow_local_repositories
        {
            return Err(Error::InvalidRequest(
                "source.file.source.git.remote_uri names a repository on the service's own machine; those are refused unless the configuration sets allowLocalRepositories".into(),
            ));
        }
        let ResolvedRefs {
            base_ref,
            workspace_ref,
        } = self
            .resolve_refs(
                &spec.source,
                secrets.remote_userinfo.as_ref(),
                &secrets.registry,
            )
            .await?;
        if !spec.force_rebuild && self.lookup_own(&workspace_ref).await?.is_some() {
            self.inner.metrics.cache_hit();
            return Ok(Submitted::CacheHit {
                base_ref,
                workspace_ref,
            });
        }
        let (flight, leader) = {
            let mut flights = self.lock_flights();
            match flights.get(&workspace_ref) {
                Some(flight) => {
                    flight
                        .joined
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    (flight.clone(), None)
                }
                None => {
                    let (created, rx) = watch::channel(false);
                    let flight = Flight::new(BuildId::new(), 1, rx);
                    flights.insert(workspace_ref.clone(), flight.clone());
                    (flight, Some(created))
                }
            }
        };
        let id = flight.id;
        let Some(created) = leader else {
            let mut rx = flight.created;
            rx.wait_for(|c| *c).await.map_err(|_| Error::JoinFailed)?;
            let view = self.inner.journal.view(id)?;
            let created_at_ms = view.map(|v| v.created_at_ms).unwrap_or_default();
            return Ok(Submitted::Running {
                id,
                joined: true,
                base_ref,
                workspace_ref,
                created_at_ms,
            });
        };
        // The durable part runs in a task of its own: a caller that goes away (a deadline, a
        // dropped connection) cannot leave the flight half-made for later callers to join.
        let accept = tokio::spawn(self.clone().accept(
            spec,
            secrets,
            base_ref,
            workspace_ref,
            flight,
            created,
        ));
        accept.await.map_err(|e| {
            tracing::error!(error = %e, "accepting a build failed");
            Error::JoinFailed
        })?
    }

    /// Records the new build of `flight` and starts it; its flight is forgotten if that fails.
    async fn accept(
        self,
        spec: BuildSpec,
        secrets: BuildSecrets,
        base_ref: String,
        workspace_ref: String,
        flight: Flight,
        created: watch::Sender<bool>,
    ) -> Result<Submitted, Error> {
        let id = flight.id;
        let forget = ForgetUnlessKept::new(&self.inner, &workspace_ref, &flight);
        task::failpoint("submit.create");
        let view = self
            .inner
            .journal
            .create(id, spec, base_ref.clone(), workspace_ref.clone())
            .await?;
        forget.keep();
        self.inner.secrets.lock().insert(id, secrets);
        let _ = created.send(true);
        self.inner.metrics.build_started();
        tracing::info!(build_id = %id, %workspace_ref, "build accepted");
        let created_at_ms = view.created_at_ms;
        self.spawn(view, false, flight.cancel.clone());
        Ok(Submitted::Running {
            id,
            joined: false,
            base_ref,
            workspace_ref,
            created_at_ms,
        })
    }

    /// The newest build of a workspace ref.
    pub fn find_by_ref(&self, workspace_ref: &str) -> Result<BuildId, Error> {
        self.inner
            .journal
            .summaries()?
            .into_iter()
            .find(|s| s.workspace_ref == workspace_ref)
            .map(|s| s.id)
            .ok_or_else(|| Error::NotFound(format!("no build of workspace image {workspace_ref}")))
    }

    /// Cancels a build: the intent is journaled first, then the build's task stops its step
    /// (builder processes, work directory) and journals Cancelled. A restart in between
    /// finishes the cancel. Every client following the build sees it end.
    pub async fn cancel(&self, id: BuildId, reason: String) -> Result<Cancelled, Error> {
        let view = self.view(id)?;
        if view.phase().is_final() {
            return Err(Error::Conflict(format!(
                "build {id} has ended ({}); there is nothing to cancel",
                view.phase()
            )));
        }
        let reason = if reason.trim().is_empty() {
            "cancelled by an operator".to_owned()
        } else {
            reason
        };
        self.inner
            .journal
            .request_cancel(id, reason)
            .await
            .map_err(|e| match e {
                journal::Error::Illegal { .. } => {
                    Error::Conflict(format!("build {id} has ended; there is nothing to cancel"))
                }
                other => other.into(),
            })?;
        let flight = self.lock_flights().values().find(|f| f.id == id).map(|f| {
            (
                f.cancel.clone(),
                f.joined.load(std::sync::atomic::Ordering::Relaxed),
            )
        });
        let joined = match flight {
            Some((cancel, joined)) => {
                cancel.cancel();
                joined
            }
            None => 0,
        };
        tracing::info!(build_id = %id, joined, "build cancel requested");
        Ok(Cancelled { joined })
    }

    /// Runs a failed or cancelled build again, as its next attempt under the same id, with
    /// the installation's credentials only.
    pub async fn retry(&self, id: BuildId) -> Result<Retried, Error> {
        let view = self.view(id)?;
        if !matches!(
            view.phase(),
            image_builder_state::Phase::Failed | image_builder_state::Phase::Cancelled
        ) {
            return Err(Error::Conflict(format!(
                "build {id} is {}; only a failed or cancelled build can be retried",
                view.phase()
            )));
        }
        let (created, rx) = watch::channel(false);
        let flight = Flight::new(id, view.attempt + 1, rx);
        {
            let mut flights = self.lock_flights();
            if let Some(other) = flights.get(&view.workspace_ref) {
                return Err(Error::Conflict(format!(
                    "build {} is making the same workspace image right now; follow it instead",
                    other.id
                )));
            }
            flights.insert(view.workspace_ref.clone(), flight.clone());
        }
        // As in `submit`: the durable part finishes even if the caller goes away.
        let retry = tokio::spawn(self.clone().start_attempt(view, flight, created));
        retry.await.map_err(|e| {
            tracing::error!(error = %e, "retrying a build failed");
            Error::JoinFailed
        })?
    }

    /// Journals the next attempt of the failed or cancelled build `view` and starts it; its
    /// flight is forgotten if that fails.
    async fn start_attempt(
        self,
        view: BuildView,
        flight: Flight,
        created: watch::Sender<bool>,
    ) -> Result<Retried, Error> {
        let id = view.id;
        let forget = ForgetUnlessKept::new(&self.inner, &view.workspace_ref, &flight);
        let attempt = view.attempt + 1;
        let marker = format!(
            "==== attempt {attempt} of build {id} (retry requested; the log above is of earlier attempts) ====\n"
        );
        task::failpoint("retry.journal");
        self.inner.journal.log(id, marker.into_bytes()).await?;
        let view = self
            .inner
            .journal
            .transition(id, image_builder_state::Event::Retried)
            .await?;
        forget.keep();
        let _ = created.send(true);
        self.inner.metrics.build_started();
        let needs_request_credentials = view.spec.had_request_auth;
        self.spawn(view, false, flight.cancel.clone());
        Ok(Retried {
            attempt,
            needs_request_credentials,
        })
    }

    /// Removes finished builds that ended more than `retention` ago, with their logs. Returns
    /// how many. Live builds are never touched; each removal is one small commit, so builds
    /// running meanwhile are not held up.
    pub async fn sweep(&self, retention: Duration) -> Result<usize, Error> {
        let cutoff = image_builder_state::now_ms() - retention.as_millis() as i64;
        let old: Vec<BuildId> = self
            .list()?
            .into_iter()
            .filter(|s| match &s.damage {
                // A damaged build never ends: it goes once it has been known damaged as long.
                Some(damage) => damage.found_at_ms < cutoff,
                None => s.phase.is_final() && s.finished_at_ms.is_some_and(|at| at < cutoff),
            })
            .map(|s| s.id)
            .collect();
        let mut removed = 0;
        for id in old {
            if self.lock_flights().values().any(|f| f.id == id) {
                continue;
            }
            match self.inner.journal.remove(id).await {
                Ok(()) => removed += 1,
                // Retried meanwhile: it is live again.
                Err(journal::Error::Illegal { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if removed > 0 {
            tracing::info!(removed, ?retention, "removed builds past their retention");
        }
        Ok(removed)
    }

    /// What `LogsRequest.censored` hides: every known credential value and the
    /// installation's registry hosts.
    pub fn censored(&self) -> crate::credentials::Needles {
        let hosts = [&self.inner.repos.base, &self.inner.repos.workspace]
            .into_iter()
            .map(|repository| crate::credentials::registry_host(repository));
        crate::credentials::Needles::new(self.inner.sensitive_values(None))
            .replacing(hosts, b"[registry]")
    }

    /// Every build, newest first.
    pub fn list(&self) -> Result<Vec<Summary>, Error> {
        Ok(self.inner.journal.summaries()?)
    }

    /// Follows a build's durable records from `from_seq` until it ends.
    pub fn follow(&self, id: BuildId, from_seq: u64) -> Follower {
        self.inner.journal.follow(id, from_seq)
    }

    /// Reads a build's durable journal, log bytes included, from record `from_seq` and log
    /// byte `from_byte`, until it ends.
    pub fn read(&self, id: BuildId, from_seq: u64, from_byte: u64) -> Reader {
        self.inner.journal.read(id, from_seq, from_byte)
    }

    /// Fails with NotFound unless the build exists; reads no record (cheap before a stream
    /// that reads them all anyway).
    pub fn ensure_exists(&self, id: BuildId) -> Result<(), Error> {
        if self.inner.journal.exists(id)? {
            Ok(())
        } else {
            Err(Error::NotFound(format!("build {id} does not exist")))
        }
    }

    /// What is wrong with a build, if its journal is damaged.
    pub fn damage(&self, id: BuildId) -> Option<image_builder_state::view::Damage> {
        self.inner.journal.damage(id)
    }

    /// What can still be read of a damaged build.
    pub fn readable_view(&self, id: BuildId) -> Option<BuildView> {
        self.inner.journal.readable_view(id)
    }

    /// How many builds are damaged.
    pub fn damaged_count(&self) -> usize {
        self.inner.journal.damaged().len()
    }

    /// The durable view of a build.
    pub fn view(&self, id: BuildId) -> Result<BuildView, Error> {
        self.inner
            .journal
            .view(id)?
            .ok_or_else(|| Error::NotFound(format!("build {id} does not exist")))
    }

    /// Stops taking builds, lets running steps stop at their next await point (they resume at
    /// the next start), and waits for the build tasks up to `grace`.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.shutdown.cancel();
        self.inner.tasks.close();
        if tokio::time::timeout(grace, self.inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(?grace, "build tasks did not stop in time");
        }
    }

    /// Queues a build for a slot; the admission task starts it when one is free.
    fn spawn(&self, view: BuildView, resumed: bool, cancel: CancellationToken) {
        if self
            .inner
            .admissions
            .send(Admission {
                view,
                resumed,
                cancel,
            })
            .is_err()
        {
            tracing::error!("the admission task is gone; the build resumes at next start");
        }
    }

    fn lock_flights(&self) -> parking_lot::MutexGuard<'_, HashMap<String, Flight>> {
        self.inner.lock_flights()
    }
}

/// Admits queued builds in order, one per free slot, and starts their tasks.
async fn admit(
    inner: std::sync::Weak<Inner>,
    mut queue: mpsc::UnboundedReceiver<Admission>,
    slots: Arc<Semaphore>,
) {
    while let Some(Admission {
        view,
        resumed,
        cancel,
    }) = queue.recv().await
    {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let Some(inner) = inner.upgrade() else { return };
        if inner.shutdown.is_cancelled() {
            return;
        }
        let tasks = inner.tasks.clone();
        tasks.spawn(task::drive(inner, view, resumed, slot, cancel));
    }
}

impl Inner {
    /// The registry credentials a request gets.
    fn keychain<'a>(&'a self, request: &'a RequestAuth) -> RequestKeychain<'a> {
        RequestKeychain {
            credentials: &self.credentials,
            request,
        }
    }

    /// The installation's credentials everywhere: for its own repositories.
    fn installation(&self) -> RequestKeychain<'_> {
        self.keychain(&self.allow_all)
    }

    /// The credentials to read a build's base image with: the request's for an image it named,
    /// the installation's for a base image this service built.
    fn base_keychain<'a>(
        &'a self,
        view: &BuildView,
        request: &'a RequestAuth,
    ) -> RequestKeychain<'a> {
        match view.spec.source {
            BuildSource::Reference { .. } => self.keychain(request),
            BuildSource::Dockerfile(_) => self.installation(),
        }
    }

    /// The in-memory secrets of a build (`None` after a restart: they are never stored).
    fn secrets_of(&self, id: BuildId) -> Option<BuildSecrets> {
        self.secrets.lock().get(&id).cloned()
    }

    /// Every credential value a build's log must not show.
    fn sensitive_values(&self, secrets: Option<&BuildSecrets>) -> Vec<String> {
        let mut values = match secrets {
            Some(s) => self.credentials.sensitive_values(&s.registry),
            None => self.credentials.sensitive_values(&RequestAuth::default()),
        };
        if let Some(git) = secrets.and_then(|s| s.git.as_ref()) {
            values.push(git.password.clone());
            values.extend(
                crate::credentials::Secret::Basic {
                    user: git.user.clone(),
                    password: git.password.clone(),
                }
                .basic_token(),
            );
        }
        values.retain(|v| v.len() >= 4);
        values
    }

    /// Forgets what attempt `attempt` of a build kept in memory once it has ended.
    fn forget(&self, workspace_ref: &str, id: BuildId, attempt: u32) {
        self.forget_flight(workspace_ref, id, attempt);
        self.secrets.lock().remove(&id);
    }

    fn lock_flights(&self) -> parking_lot::MutexGuard<'_, HashMap<String, Flight>> {
        self.flights.lock()
    }

    /// Ends the flight of `workspace_ref` if it is still attempt `attempt` of build `id` (a
    /// retry's flight, for the same id, must outlive the end of the attempt before it).
    fn forget_flight(&self, workspace_ref: &str, id: BuildId, attempt: u32) {
        let mut flights = self.lock_flights();
        if flights
            .get(workspace_ref)
            .is_some_and(|f| f.id == id && f.attempt == attempt)
        {
            flights.remove(workspace_ref);
        }
    }
}
