//! The orchestrator: the only place that sequences build steps.
//!
//! A request is resolved to its base and workspace refs, answered from the cache when the
//! workspace image exists, joined to the running build of the same workspace ref (single
//! flight), or journaled as a new build. New builds wait as Queued until the concurrency limit
//! admits them, in order; then a task drives each to a final phase. At start every unfinished
//! build is resumed from its last journaled phase (running ones are admitted before queued
//! ones).

mod flight;
mod lifecycle;
mod log;
mod phases;
mod queries;
mod submit;
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
pub use log::BuildLog;

use crate::credentials::{
    BuildSecrets, CredentialPolicy, Credentials, GitCredentials, UrlUserinfo,
};
use crate::refs::{self, DockerfileKey};
use crate::steps::{StepError, Steps, Untracked};
use crate::telemetry::Metrics;
use crate::telemetry::traces::TraceParent;

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
    start: task::Start,
    cancel: CancellationToken,
    /// The client's trace, for a new build whose Build request carried a `traceparent`.
    parent: Option<TraceParent>,
}

/// The refs a source resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedRefs {
    /// The base image.
    pub base_ref: String,
    /// The workspace image.
    pub workspace_ref: String,
    /// With content keys: the commit whose content the refs name, which the build must check
    /// out (its branch may move meanwhile).
    pub commit: Option<String>,
}

/// What a cancel did.
#[derive(Debug, Clone)]
pub struct CancelOutcome {
    /// Build calls other than the first that were following the build.
    pub joined: usize,
}

/// What a retry did.
#[derive(Debug, Clone)]
pub struct RetryOutcome {
    /// The new attempt's number.
    pub attempt: u32,
    /// Whether the original request carried credentials of its own, which are not kept.
    pub needs_request_credentials: bool,
}

/// Reference sources whose last base ref is kept for the next resolve's early lookup (a few
/// hundred bytes each).
const LAST_BASES: usize = 1024;

struct Inner {
    journal: Journal,
    steps: Steps,
    credentials: CredentialPolicy,
    repos: Repositories,
    limits: Limits,
    metrics: Arc<Metrics>,
    flights: Mutex<HashMap<String, Flight>>,
    /// The base ref each reference source resolved to last: its workspace image is asked
    /// about beside the next resolve (see [`Orchestrator::resolve_and_look_up`]).
    last_bases: quick_cache::sync::Cache<String, String>,
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
            credentials: CredentialPolicy::new(credentials),
            repos,
            limits,
            metrics,
            flights: Mutex::new(HashMap::new()),
            last_bases: quick_cache::sync::Cache::new(LAST_BASES),
            secrets: Mutex::new(HashMap::new()),
            admissions,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        tokio::spawn(admit(
            Arc::downgrade(&inner),
            queue,
            slots,
            Arc::clone(&inner.metrics),
        ));
        Self { inner }
    }

    /// The service's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
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
            self.spawn(view, task::Start::Resumed, cancel, None);
        }
        Ok(count)
    }

    /// What `LogsRequest.censored` hides: every known credential value and the
    /// installation's registry hosts.
    pub fn censored(&self) -> crate::credentials::Redactions {
        let repos = &self.inner.repos;
        self.inner
            .credentials
            .censored([repos.base.as_str(), repos.workspace.as_str()])
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
    fn spawn(
        &self,
        view: BuildView,
        start: task::Start,
        cancel: CancellationToken,
        parent: Option<TraceParent>,
    ) {
        if self
            .inner
            .admissions
            .send(Admission {
                view,
                start,
                cancel,
                parent,
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
    metrics: Arc<Metrics>,
) {
    // Builds waiting for a slot, in the order they came. A build cancelled while it waits
    // leaves the line at once (its task journals Cancelled without a slot): it never waits
    // for the builds before it to finish.
    let mut waiting: std::collections::VecDeque<Admission> = std::collections::VecDeque::new();
    loop {
        metrics.queue_depth(waiting.len());
        while let Some(at) = waiting.iter().position(|a| a.cancel.is_cancelled()) {
            let Some(admission) = waiting.remove(at) else {
                break;
            };
            if !start(&inner, admission, None) {
                return;
            }
        }
        let any_cancelled = async {
            if waiting.is_empty() {
                std::future::pending::<()>().await;
            }
            futures::future::select_all(waiting.iter().map(|a| Box::pin(a.cancel.cancelled())))
                .await;
        };
        let slot = async {
            if waiting.is_empty() {
                std::future::pending::<()>().await;
            }
            Arc::clone(&slots).acquire_owned().await
        };
        tokio::select! {
            next = queue.recv() => match next {
                Some(admission) => waiting.push_back(admission),
                None => return,
            },
            slot = slot => {
                let Ok(slot) = slot else { return };
                let Some(admission) = waiting.pop_front() else { continue };
                if !start(&inner, admission, Some(slot)) {
                    return;
                }
            }
            () = any_cancelled => {}
        }
    }
}

/// Spawns the task of an admitted build; false once the orchestrator is gone or stopping.
fn start(
    inner: &std::sync::Weak<Inner>,
    admission: Admission,
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
) -> bool {
    let Some(inner) = inner.upgrade() else {
        return false;
    };
    if inner.shutdown.is_cancelled() {
        return false;
    }
    let Admission {
        view,
        start,
        cancel,
        parent,
    } = admission;
    let tasks = inner.tasks.clone();
    tasks.spawn(task::drive(inner, view, start, slot, cancel, parent));
    true
}

impl Inner {
    /// The in-memory secrets of a build (`None` after a restart: they are never stored).
    fn secrets_of(&self, id: BuildId) -> Option<BuildSecrets> {
        self.secrets.lock().get(&id).cloned()
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

#[cfg(test)]
mod tests;
