//! The task that drives one build: run the step of the current phase, journal the event it
//! produced, repeat until a final phase. The journal decides whether an edge exists.
//!
//! Failpoints (the `fail` crate, configured with the `FAILPOINTS` environment variable when the
//! `failpoints` feature is on) sit on both sides of every transition:
//! `transition.<event>.before` and `transition.<event>.after`, e.g.
//! `FAILPOINTS=transition.resolved.after=pause` holds a build just after it entered
//! CheckingCache, for a test to kill the process there.

use std::sync::Arc;
use std::time::{Duration, Instant};

use image_builder_state::{BuildView, Event, Phase, now_ms};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::phases::{phase_action, step};
use super::{BuildLog, Inner};
use crate::telemetry::Metrics;
use crate::telemetry::traces::{self, TraceParent};

/// How a build's task starts.
#[derive(Debug, Clone, Copy)]
pub(super) enum Start {
    /// Just accepted by a Build call, which asked the registry at `checked`: the base ref
    /// resolved and the workspace image was absent.
    Accepted {
        /// When the call asked.
        checked: Instant,
    },
    /// A new attempt of a failed or cancelled build.
    Retried,
    /// After a restart, from the build's last journaled phase.
    Resumed,
}

/// How long what the accepting call learnt from the registry stands in for the first
/// Resolving and CheckingCache steps (a build admitted at once; one that waited for a slot
/// asks again).
const ACCEPTED_CHECK_FRESH_FOR: Duration = Duration::from_secs(2);

impl Start {
    /// Whether the registry was asked about this build a moment ago.
    pub(super) fn freshly_checked(self) -> bool {
        matches!(self, Start::Accepted { checked } if checked.elapsed() < ACCEPTED_CHECK_FRESH_FOR)
    }
}

/// Drives build `view` to a final phase, or until shutdown (it then resumes at next start).
/// `slot` is its place under the concurrency limit, held until the task ends.
pub(super) async fn drive(
    inner: Arc<Inner>,
    view: BuildView,
    start: Start,
    slot: Option<OwnedSemaphorePermit>,
    cancel: CancellationToken,
    parent: Option<TraceParent>,
) {
    let span = attempt_span(&inner, &view, parent.as_ref()).await;
    run(inner, view, start, cancel).instrument(span).await;
    drop(slot);
}

/// The root span of this run of the build's attempt. A new attempt starts a trace (under the
/// client's, if it sent one) and journals it before its first step; a run after a restart
/// continues the journaled one.
async fn attempt_span(
    inner: &Inner,
    view: &BuildView,
    client: Option<&TraceParent>,
) -> tracing::Span {
    let id = view.id.to_string();
    let parent = match (&view.trace, client) {
        (Some((trace_id, span_id)), _) => traces::Parent::Journaled { trace_id, span_id },
        (None, Some(client)) => traces::Parent::Client(client),
        (None, None) => traces::Parent::None,
    };
    let span = traces::attempt_span(&id, view.attempt, &view.workspace_ref, parent);
    if view.trace.is_none()
        && let Some((trace_id, span_id)) = traces::ids(&span)
        && let Err(e) = inner.journal.traced(view.id, trace_id, span_id).await
    {
        tracing::warn!(build_id = %id, error = %e, "cannot journal the build's trace; a restart starts a new one");
    }
    span
}

/// Evaluates a named failpoint; a `pause` or `sleep` action blocks this worker only.
pub(super) fn failpoint(name: &str) {
    #[cfg(feature = "failpoints")]
    if fail::list().iter().any(|(point, _)| point == name) {
        // Scenario runners wait for this line before they act (kill the process, say).
        tracing::info!(failpoint = %name, "failpoint reached");
        tokio::task::block_in_place(|| fail::fail_point!(name));
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

async fn run(inner: Arc<Inner>, mut view: BuildView, start: Start, cancel: CancellationToken) {
    let resumed = matches!(start, Start::Resumed);
    let id = view.id;
    let secrets = inner.secrets_of(id);
    let log = BuildLog::new(
        inner.journal.clone(),
        id,
        view.log_len,
        inner.limits.max_log_bytes,
        inner.credentials.sensitive_values(secrets.as_ref()),
    );
    if resumed {
        log.line(format!(
            "image-builder restarted; resuming this build at its last recorded step ({})",
            view.phase()
        ))
        .await;
        let stopped = inner.steps.builder.before_resume(id).await;
        if stopped > 0 {
            log.line(format!(
                "stopped {stopped} builder processes left running by the previous run"
            ))
            .await;
        }
    }
    let secrets_lost = secrets.is_none() && view.spec.had_request_auth;
    let secrets = secrets.unwrap_or_default();
    let mut in_state = InState::new(&inner.metrics, view.phase());
    while !view.phase().is_final() {
        let event = if view.cancel_requested.is_some() || cancel.is_cancelled() {
            match stop_for_cancel(&inner, id, &log).await {
                Some(event) => event,
                None => {
                    // The cancel finishes at the next start; meanwhile nobody may join.
                    inner.forget(&view.workspace_ref, id, view.attempt);
                    return;
                }
            }
        } else if view.phase() == Phase::Queued {
            Event::Admitted
        } else {
            let deadline = deadline(&inner, &view);
            let state = traces::state_span(&format!("{:?}", view.phase()));
            let event = tokio::select! {
                biased;
                () = inner.shutdown.cancelled() => {
                    tracing::info!(phase = %view.phase(), "stopping for shutdown; the build resumes at next start");
                    return;
                }
                // Dropping the step stops its processes; the next turn journals the cancel.
                () = cancel.cancelled() => continue,
                () = tokio::time::sleep(deadline) => Event::Failed {
                    reason: format!(
                        "the build exceeded its time limit of {} (builds.timeout) while {}",
                        humantime_serde::re::humantime::format_duration(inner.limits.build_timeout),
                        phase_action(view.phase())
                    ),
                },
                event = step(&inner, &view, &secrets, secrets_lost, &log, start).instrument(state.clone()) => event,
            };
            traces::end_state(&state, event.name(), matches!(event, Event::Failed { .. }));
            event
        };
        if let Event::Failed { reason } = &event {
            log.line(format!("build failed: {reason}")).await;
        }
        // The log of this step is durable before anyone sees the build move on.
        let event = match log.flush().await {
            Ok(()) => event,
            Err(e) if matches!(event, Event::Failed { .. } | Event::Cancelled { .. }) => {
                tracing::error!(error = %e, "the build ends without the rest of its log");
                event
            }
            Err(e) => Event::Failed {
                reason: log_failure(&e),
            },
        };
        // A build about to end takes no more joiners: one who joined now would be answered
        // with this build's end, though it asked after it (and maybe for a rebuild).
        if view
            .check(&event)
            .is_ok_and(image_builder_state::Phase::is_final)
        {
            inner.forget_flight(&view.workspace_ref, id, view.attempt);
        }
        let name = event.name();
        failpoint(&format!("transition.{name}.before"));
        view = match inner.journal.transition(id, event).await {
            Ok(view) => view,
            Err(e) => {
                // Nothing more can be recorded; the build stays where the journal has it and
                // resumes at the next start.
                tracing::error!(error = %e, "cannot journal the build's next transition; stopping it");
                inner.forget(&view.workspace_ref, id, view.attempt);
                return;
            }
        };
        in_state.moved(view.phase());
        tracing::info!(phase = %view.phase(), "build moved");
        failpoint(&format!("transition.{name}.after"));
    }
    inner.steps.builder.clean(id).await;
    let seconds = (now_ms() - view.created_at_ms).max(0) as f64 / 1000.0;
    inner
        .metrics
        .build_done(view.phase() == Phase::Done, seconds);
    inner.forget(&view.workspace_ref, id, view.attempt);
}

/// The builds-by-state gauge and per-state durations, for the state this task has its build
/// in; the build leaves it when the task ends, whatever way.
struct InState<'a> {
    metrics: &'a Metrics,
    state: Option<(Phase, Instant)>,
}

impl<'a> InState<'a> {
    fn new(metrics: &'a Metrics, phase: Phase) -> Self {
        let mut tracked = Self {
            metrics,
            state: None,
        };
        tracked.moved(phase);
        tracked
    }

    fn moved(&mut self, phase: Phase) {
        self.leave();
        if !phase.is_final() {
            self.metrics.state_entered(phase.as_str());
            self.state = Some((phase, Instant::now()));
        }
    }

    fn leave(&mut self) {
        if let Some((phase, since)) = self.state.take() {
            self.metrics.state_left(phase.as_str(), since.elapsed());
        }
    }
}

impl Drop for InState<'_> {
    fn drop(&mut self) {
        self.leave();
    }
}

/// Finishes a cancel whose intent is journaled: stops what the build left running, removes its
/// work directory, and says Cancelled with the canceller's reason. `None` if the journal
/// cannot be read (the cancel finishes at the next start).
async fn stop_for_cancel(
    inner: &Inner,
    id: image_builder_state::BuildId,
    log: &BuildLog,
) -> Option<Event> {
    let stopped = inner.steps.builder.stop(id).await;
    let reason = match inner.journal.view(id) {
        Ok(Some(view)) => view.cancel_requested.unwrap_or_else(|| "cancelled".into()),
        Ok(None) => return None,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the cancel request");
            return None;
        }
    };
    log.line(format!(
        "build cancelled: {reason} (builders stopped: {stopped})"
    ))
    .await;
    Some(Event::Cancelled { reason })
}

/// Why a build whose output cannot be journaled fails, in words an operator can act on.
fn log_failure(e: &super::log::Error) -> String {
    let mut reason = format!("the build stopped: {e}");
    if e.is_disk_full() {
        reason.push_str(
            "; free space there: new builds work again as soon as there is room, without a restart",
        );
    }
    reason
}

/// Time left before the build's limit, counted from its admission (which survives restarts).
fn deadline(inner: &Inner, view: &BuildView) -> Duration {
    let admitted = view
        .entered_at_ms(Phase::Resolving)
        .unwrap_or(view.created_at_ms);
    let limit = inner.limits.build_timeout.as_millis() as i64;
    Duration::from_millis((admitted + limit - now_ms()).max(0) as u64)
}
