//! The task that drives one build: run the step of the current phase, journal the event it
//! produced, repeat until a final phase. The journal decides whether an edge exists.

use std::sync::Arc;

use image_builder_state::{BuildSource, BuildView, Event, Phase, now_ms};
use tracing::Instrument;

use super::{BuildLog, Inner, StepError};

/// Drives build `view` to a final phase, or until shutdown (it then resumes at next start).
pub(super) async fn drive(inner: Arc<Inner>, view: BuildView, resumed: bool) {
    let span = tracing::info_span!("build", build_id = %view.id);
    run(inner, view, resumed).instrument(span).await
}

async fn run(inner: Arc<Inner>, mut view: BuildView, resumed: bool) {
    let id = view.id;
    let log = BuildLog::new(inner.journal.clone(), id);
    if resumed {
        log.line(format!(
            "image-builder restarted; resuming this build at its last recorded step ({})",
            view.phase()
        ))
        .await;
    }
    while !view.phase().is_final() {
        let event = tokio::select! {
            biased;
            () = inner.shutdown.cancelled() => {
                tracing::info!(phase = %view.phase(), "stopping for shutdown; the build resumes at next start");
                return;
            }
            event = step(&inner, &view, &log) => event,
        };
        if let Event::Failed { reason } = &event {
            log.line(format!("build failed: {reason}")).await;
        }
        view = match inner.journal.transition(id, event).await {
            Ok(view) => view,
            Err(e) => {
                // Nothing more can be recorded; the build stays where the journal has it and
                // resumes at the next start.
                tracing::error!(error = %e, "cannot journal the build's next transition; stopping it");
                inner.forget_flight(&view.workspace_ref, id);
                return;
            }
        };
        tracing::info!(phase = %view.phase(), "build moved");
    }
    let seconds = (now_ms() - view.created_at_ms).max(0) as f64 / 1000.0;
    inner
        .metrics
        .build_done(view.phase() == Phase::Done, seconds);
    inner.forget_flight(&view.workspace_ref, id);
}

/// Runs the step of the build's current phase and says what happened.
async fn step(inner: &Inner, view: &BuildView, log: &BuildLog) -> Event {
    let phase = view.phase();
    let outcome = match phase {
        Phase::Resolving => resolve(inner, view, log).await,
        Phase::CheckingCache => check_cache(inner, view, log).await,
        Phase::Building => {
            log.line(format!("building base image {}", view.base_ref))
                .await;
            inner
                .steps
                .builder
                .build(view, log)
                .await
                .map(|()| Event::Built)
        }
        Phase::Pushing => {
            log.line(format!(
                "copying {} to {}",
                view.base_ref, view.workspace_ref
            ))
            .await;
            let pushed = inner
                .steps
                .pusher
                .push(&view.base_ref, &view.workspace_ref, log)
                .await;
            pushed.map(|digest| Event::Pushed { digest })
        }
        Phase::Done | Phase::Failed | Phase::Cancelled => unreachable_final(phase),
    };
    outcome.unwrap_or_else(|e| Event::Failed {
        reason: format!("{} failed: {e}", phase_action(phase)),
    })
}

async fn resolve(inner: &Inner, view: &BuildView, log: &BuildLog) -> Result<Event, StepError> {
    match &view.spec.source {
        BuildSource::Reference { reference } => {
            log.line(format!("resolving base image {reference}")).await;
            match inner.steps.cache.lookup(&view.base_ref).await? {
                Some(_) => {
                    log.line(format!("base image is {}", view.base_ref)).await;
                    Ok(Event::Resolved)
                }
                None => Ok(Event::Failed {
                    reason: format!(
                        "base image {} no longer exists in its registry",
                        view.base_ref
                    ),
                }),
            }
        }
        BuildSource::Dockerfile(_) => {
            log.line(format!("base image will be {}", view.base_ref))
                .await;
            Ok(Event::Resolved)
        }
    }
}

async fn check_cache(inner: &Inner, view: &BuildView, log: &BuildLog) -> Result<Event, StepError> {
    if view.spec.force_rebuild {
        log.line("force_rebuild is set: not looking for an existing workspace image")
            .await;
        return Ok(Event::CacheMiss);
    }
    match inner.steps.cache.lookup(&view.workspace_ref).await? {
        Some(digest) => {
            log.line(format!(
                "workspace image {} exists ({digest})",
                view.workspace_ref
            ))
            .await;
            Ok(Event::CacheHit)
        }
        None => {
            log.line(format!(
                "workspace image {} does not exist yet",
                view.workspace_ref
            ))
            .await;
            Ok(Event::CacheMiss)
        }
    }
}

fn phase_action(phase: Phase) -> &'static str {
    match phase {
        Phase::Resolving => "resolving the base image",
        Phase::CheckingCache => "checking for an existing workspace image",
        Phase::Building => "building the base image",
        Phase::Pushing => "pushing the workspace image",
        Phase::Done | Phase::Failed | Phase::Cancelled => "finishing",
    }
}

/// The loop never runs a step in a final phase.
fn unreachable_final(phase: Phase) -> Result<Event, StepError> {
    Err(StepError::Unsupported(format!(
        "no step runs in final phase {phase}"
    )))
}
