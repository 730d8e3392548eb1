//! The orchestrator with fake steps, in process: single flight, admission order, the cache,
//! cancel and retry. The integration tests run the same paths against the real parts.

use std::collections::HashSet;

use async_trait::async_trait;
use image_builder_state::Phase;
use tokio::sync::Semaphore;

use super::*;
use crate::credentials::Keychain;
use crate::steps::{
    BuildBase, CheckCache, Progress, Push, Resolve, StepError, StepErrorKind, StepLog,
};

/// A registry in memory and a builder that waits for the test to let each build through.
struct Fakes {
    /// Images the fake registry holds.
    images: Mutex<HashSet<String>>,
    /// Base refs, in the order their builds entered the builder.
    entered: Mutex<Vec<String>>,
    /// Builds inside the builder now, and the most there ever were.
    inside: Mutex<(usize, usize)>,
    /// One permit lets one build out of the builder.
    gate: Semaphore,
    /// How the builder fails its next builds, one kind each, before it succeeds again.
    failures: Mutex<Vec<StepErrorKind>>,
    /// How often each reference's tag moved: each move gives it another digest.
    moves: Mutex<HashMap<String, usize>>,
    /// Every reference looked up, in order.
    lookups: Mutex<Vec<String>>,
    /// While set, a resolve answers only after a lookup was made for it (one permit each).
    resolve_after_lookup: std::sync::atomic::AtomicBool,
    looked_up: Semaphore,
}

impl Default for Fakes {
    fn default() -> Self {
        Self {
            images: Mutex::default(),
            entered: Mutex::default(),
            inside: Mutex::default(),
            gate: Semaphore::new(0),
            failures: Mutex::default(),
            moves: Mutex::default(),
            lookups: Mutex::default(),
            resolve_after_lookup: std::sync::atomic::AtomicBool::new(false),
            looked_up: Semaphore::new(0),
        }
    }
}

/// What the fake registry pins `reference` to now.
fn pinned(reference: &str, moves: usize) -> String {
    format!(
        "registry.test/{reference}@sha256:{:0>64}",
        reference.len() + moves
    )
}

#[async_trait]
impl Resolve for Fakes {
    async fn resolve(
        &self,
        reference: &str,
        _: &dyn Keychain,
        _: &dyn Progress,
    ) -> Result<String, StepError> {
        if self
            .resolve_after_lookup
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            let permit = self.looked_up.acquire().await;
            permit.map(tokio::sync::SemaphorePermit::forget).ok();
        }
        // Every image it resolves exists (as a base image does).
        let moves = self.moves.lock().get(reference).copied().unwrap_or(0);
        let pinned = pinned(reference, moves);
        self.images.lock().insert(pinned.clone());
        Ok(pinned)
    }
}

#[async_trait]
impl CheckCache for Fakes {
    async fn lookup(
        &self,
        reference: &str,
        _: &dyn Keychain,
        _: &dyn Progress,
    ) -> Result<Option<String>, StepError> {
        self.lookups.lock().push(reference.to_owned());
        self.looked_up.add_permits(1);
        Ok(self
            .images
            .lock()
            .contains(reference)
            .then(|| "sha256:cafe".to_owned()))
    }
}

#[async_trait]
impl BuildBase for Fakes {
    async fn build(
        &self,
        build: &BuildView,
        _: &BuildSecrets,
        _: &dyn StepLog,
    ) -> Result<(), StepError> {
        self.entered.lock().push(build.base_ref.clone());
        let failure = self.failures.lock().pop();
        if let Some(kind) = failure {
            return Err(StepError::new(
                kind,
                format!("the fake builder says {kind:?}"),
            ));
        }
        {
            let mut inside = self.inside.lock();
            inside.0 += 1;
            inside.1 = inside.1.max(inside.0);
        }
        let permit = self.gate.acquire().await;
        permit.map(tokio::sync::SemaphorePermit::forget).ok();
        self.inside.lock().0 -= 1;
        Ok(())
    }

    async fn before_resume(&self, _: BuildId) -> usize {
        0
    }

    async fn stop(&self, _: BuildId) -> usize {
        0
    }

    async fn clean(&self, _: BuildId) {}
}

#[async_trait]
impl Push for Fakes {
    async fn push(
        &self,
        _: &str,
        to: &str,
        _: &dyn Keychain,
        _: &dyn Progress,
    ) -> Result<String, StepError> {
        self.images.lock().insert(to.to_owned());
        Ok("sha256:cafe".to_owned())
    }
}

struct Rig {
    orchestrator: Orchestrator,
    fakes: Arc<Fakes>,
    _dir: tempfile::TempDir,
}

fn rig(max_concurrent_builds: usize) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(dir.path()).unwrap();
    let fakes = Arc::new(Fakes::default());
    let steps = Steps {
        resolver: fakes.clone(),
        cache: fakes.clone(),
        builder: fakes.clone(),
        pusher: fakes.clone(),
        content: None,
    };
    let base = "registry.test/base";
    let workspace = "registry.test/workspace";
    let orchestrator = Orchestrator::new(
        journal,
        steps,
        Arc::new(Credentials::new(None, base, workspace).unwrap()),
        Repositories {
            base: base.into(),
            workspace: workspace.into(),
        },
        Limits {
            build_timeout: Duration::from_secs(20),
            max_concurrent_builds,
            max_log_bytes: 1 << 20,
            allow_local_repositories: false,
        },
        Arc::new(Metrics::new()),
    );
    Rig {
        orchestrator,
        fakes,
        _dir: dir,
    }
}

fn spec(reference: &str) -> BuildSpec {
    BuildSpec {
        source: BuildSource::Reference {
            reference: reference.into(),
        },
        force_rebuild: false,
        triggered_by: "unit".into(),
        supervisor_ref: String::new(),
        had_request_auth: false,
    }
}

async fn submit(orchestrator: &Orchestrator, reference: &str) -> (BuildId, bool) {
    match orchestrator
        .submit(spec(reference), BuildSecrets::default(), None)
        .await
        .unwrap()
    {
        Submitted::Running { id, joined, .. } => (id, joined),
        Submitted::CacheHit { .. } => panic!("{reference}: unexpected cache hit"),
    }
}

/// Waits until the build ends; returns its final view.
async fn ended(orchestrator: &Orchestrator, id: BuildId) -> BuildView {
    let mut follower = orchestrator.follow(id, 0);
    while let Some(next) = follower.next().await {
        next.unwrap();
    }
    orchestrator.view(id).unwrap()
}

/// Waits until `n` builds have entered the builder.
async fn entered(fakes: &Fakes, n: usize) {
    for _ in 0..500 {
        if fakes.entered.lock().len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "{} builds entered the builder, expected {n}",
        fakes.entered.lock().len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_for_one_image_join_one_build() {
    let rig = rig(4);
    let (first, joined) = submit(&rig.orchestrator, "alpine").await;
    assert!(!joined);
    entered(&rig.fakes, 1).await;
    let (second, joined) = submit(&rig.orchestrator, "alpine").await;
    assert!(joined, "the second request joins the running build");
    assert_eq!(first, second);
    rig.fakes.gate.add_permits(1);
    assert_eq!(ended(&rig.orchestrator, first).await.phase(), Phase::Done);
    assert_eq!(rig.fakes.entered.lock().len(), 1, "built once");

    // Done: the image exists, so the next request is answered from the cache.
    let again = rig
        .orchestrator
        .submit(spec("alpine"), BuildSecrets::default(), None)
        .await
        .unwrap();
    assert!(matches!(again, Submitted::CacheHit { .. }));
}

/// Builds `reference` to done, so that its workspace image exists.
async fn built(rig: &Rig, reference: &str) {
    let (id, _) = submit(&rig.orchestrator, reference).await;
    rig.fakes.gate.add_permits(1);
    assert_eq!(ended(&rig.orchestrator, id).await.phase(), Phase::Done);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reference_resolved_before_has_its_workspace_image_asked_about_while_it_resolves() {
    let rig = rig(4);
    built(&rig, "busybox:1").await;
    // From now on a resolve answers only once a lookup went out: a lookup that waits for
    // the resolve never comes.
    rig.fakes.looked_up.forget_permits(usize::MAX);
    rig.fakes
        .resolve_after_lookup
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let submitted = tokio::time::timeout(
        Duration::from_secs(20),
        rig.orchestrator
            .submit(spec("busybox:1"), BuildSecrets::default(), None),
    )
    .await
    .expect("the workspace image was asked about only after the resolve")
    .unwrap();
    let Submitted::CacheHit { workspace_ref, .. } = submitted else {
        panic!("the image built before is a cache hit");
    };
    assert_eq!(
        rig.fakes.lookups.lock().last(),
        Some(&workspace_ref),
        "one lookup, of the workspace image the resolve names"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_moved_tag_is_built_though_the_image_of_its_last_base_exists() {
    let rig = rig(4);
    built(&rig, "busybox:1").await;
    let Submitted::CacheHit {
        workspace_ref: before,
        ..
    } = rig
        .orchestrator
        .submit(spec("busybox:1"), BuildSecrets::default(), None)
        .await
        .unwrap()
    else {
        panic!("the image built before is a cache hit");
    };

    rig.fakes.moves.lock().insert("busybox:1".into(), 1);
    rig.fakes.lookups.lock().clear();
    let (id, joined) = submit(&rig.orchestrator, "busybox:1").await;
    assert!(!joined);
    let view = rig.orchestrator.view(id).unwrap();
    assert_eq!(
        view.base_ref,
        pinned("busybox:1", 1),
        "the moved tag is seen"
    );
    assert_ne!(view.workspace_ref, before);
    assert_eq!(
        *rig.fakes.lookups.lock(),
        [before, view.workspace_ref.clone()],
        "the early lookup (of the last base's image) is not taken; the new one is asked about"
    );
    rig.fakes.gate.add_permits(1);
    assert_eq!(ended(&rig.orchestrator, id).await.phase(), Phase::Done);
}

#[tokio::test(flavor = "multi_thread")]
async fn builds_are_admitted_in_order_within_the_limit() {
    let rig = rig(1);
    let mut ids = Vec::new();
    for reference in ["one", "two", "three"] {
        ids.push(submit(&rig.orchestrator, reference).await.0);
    }
    entered(&rig.fakes, 1).await;
    for (n, id) in ids.iter().enumerate() {
        rig.fakes.gate.add_permits(1);
        assert_eq!(ended(&rig.orchestrator, *id).await.phase(), Phase::Done);
        if n + 1 < ids.len() {
            entered(&rig.fakes, n + 2).await;
        }
    }
    let order: Vec<String> = rig.fakes.entered.lock().clone();
    let expected: Vec<String> = ["one", "two", "three"]
        .iter()
        .map(|r| pinned(r, 0))
        .collect();
    assert_eq!(order, expected, "admitted in the order they came");
    assert_eq!(rig.fakes.inside.lock().1, 1, "never more than one at once");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_queued_build_ends_and_its_retry_runs_to_done() {
    let rig = rig(1);
    let (running, _) = submit(&rig.orchestrator, "busy").await;
    entered(&rig.fakes, 1).await;
    let (queued, _) = submit(&rig.orchestrator, "waiting").await;
    assert_eq!(
        rig.orchestrator.view(queued).unwrap().phase(),
        Phase::Queued
    );

    rig.orchestrator
        .cancel(queued, "not needed".into(), "test".into())
        .await
        .unwrap();
    let view = ended(&rig.orchestrator, queued).await;
    assert_eq!(view.phase(), Phase::Cancelled);
    assert_eq!(view.failure.as_deref(), Some("not needed"));
    assert_eq!(
        rig.orchestrator.view(running).unwrap().phase(),
        Phase::Building,
        "the queued build ended without waiting for the slot the running one holds"
    );
    let err = rig
        .orchestrator
        .cancel(queued, "again".into(), "test".into())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict(_)), "{err}");

    rig.fakes.gate.add_permits(2);
    assert_eq!(ended(&rig.orchestrator, running).await.phase(), Phase::Done);
    let retried = rig.orchestrator.retry(queued, "test".into()).await.unwrap();
    assert_eq!(retried.attempt, 2);
    let view = ended(&rig.orchestrator, queued).await;
    assert_eq!(
        view.phase(),
        Phase::Done,
        "{:?} {:?}",
        view.failure,
        rig.fakes.entered.lock()
    );
    assert_eq!(view.attempt, 2);
    let asked: Vec<(&str, &str)> = view
        .requests
        .iter()
        .map(|r| (r.action.name(), r.identity.as_str()))
        .collect();
    assert_eq!(asked, [("cancel", "test"), ("retry", "test")]);
    let err = rig
        .orchestrator
        .retry(running, "test".into())
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Conflict(_) | Error::Journal(_)),
        "a build that succeeded is not retried: {err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_step_fails_the_attempt_and_a_retry_runs_a_new_one() {
    let rig = rig(2);
    rig.fakes.failures.lock().push(StepErrorKind::Unavailable);
    let (id, _) = submit(&rig.orchestrator, "flaky").await;
    let view = ended(&rig.orchestrator, id).await;
    assert_eq!(view.phase(), Phase::Failed);
    let reason = view.failure.unwrap_or_default();
    assert!(
        reason.starts_with("building the base image failed: the fake builder says Unavailable"),
        "{reason}"
    );
    let retried = rig.orchestrator.retry(id, "test".into()).await.unwrap();
    assert_eq!(retried.attempt, 2);
    rig.fakes.gate.add_permits(1);
    let view = ended(&rig.orchestrator, id).await;
    assert_eq!((view.phase(), view.attempt), (Phase::Done, 2));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_step_stopped_from_outside_cancels_the_build_instead_of_failing_it() {
    let rig = rig(2);
    rig.fakes.failures.lock().push(StepErrorKind::Cancelled);
    let (id, _) = submit(&rig.orchestrator, "stopped").await;
    let view = ended(&rig.orchestrator, id).await;
    assert_eq!(view.phase(), Phase::Cancelled);
    let reason = view.failure.unwrap_or_default();
    assert!(
        reason.starts_with("building the base image was stopped: the fake builder says Cancelled"),
        "{reason}"
    );
}
