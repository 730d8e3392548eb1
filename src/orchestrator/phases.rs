//! The step each phase of a build runs (resolve, check the cache, build, push) and the event
//! it ends in; `task.rs` journals the event and moves on.

use image_builder_state::{BuildSource, BuildView, Event, Phase};

use super::task::Start;
use super::{BuildLog, Inner};
use crate::credentials::BuildSecrets;
use crate::steps::{Class, StepError, StepErrorKind};

/// Runs the step of the build's current phase and says what happened.
pub(super) async fn step(
    inner: &Inner,
    view: &BuildView,
    secrets: &BuildSecrets,
    secrets_lost: bool,
    log: &BuildLog,
    start: Start,
) -> Event {
    let phase = view.phase();
    let fresh = start.freshly_checked();
    let outcome = match phase {
        Phase::Resolving => resolve(inner, view, secrets, log, fresh).await,
        Phase::CheckingCache => check_cache(inner, view, log, fresh).await,
        Phase::Building => build(inner, view, secrets, log).await,
        Phase::Pushing => {
            log.line(format!(
                "copying {} to {}",
                view.base_ref, view.workspace_ref
            ))
            .await;
            let pushed = inner
                .steps
                .pusher
                .push(
                    &view.base_ref,
                    &view.workspace_ref,
                    &inner
                        .credentials
                        .base_keychain(&view.spec.source, &secrets.registry),
                    log,
                )
                .await;
            pushed.map(|digest| Event::Pushed { digest })
        }
        Phase::Queued | Phase::Done | Phase::Failed | Phase::Cancelled => unreachable_here(phase),
    };
    outcome.unwrap_or_else(|e| {
        if e.class() == Class::Cancelled {
            return Event::Cancelled {
                reason: format!("{} was stopped: {e}", phase_action(phase)),
            };
        }
        let mut reason = format!("{} failed: {e}", phase_action(phase));
        // A registry refusing us after a restart lost the request's own credentials: say so.
        // (In Building, the builder says itself which credentials were lost.)
        if secrets_lost && e.kind() == StepErrorKind::Unauthenticated && phase != Phase::Building {
            reason.push_str("; the registry credentials of this request are not kept across a restart of the service: submit the build again with them");
        }
        Event::Failed { reason }
    })
}

async fn resolve(
    inner: &Inner,
    view: &BuildView,
    secrets: &BuildSecrets,
    log: &BuildLog,
    fresh: bool,
) -> Result<Event, StepError> {
    match &view.spec.source {
        BuildSource::Reference { reference } if fresh => {
            log.line(format!(
                "base image {reference} resolved to {} when the build was accepted",
                view.base_ref
            ))
            .await;
            Ok(Event::Resolved)
        }
        BuildSource::Reference { reference } => {
            log.line(format!("resolving base image {reference}")).await;
            match inner
                .steps
                .cache
                .lookup(
                    &view.base_ref,
                    &inner.credentials.keychain(&secrets.registry),
                    log,
                )
                .await?
            {
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

async fn check_cache(
    inner: &Inner,
    view: &BuildView,
    log: &BuildLog,
    fresh: bool,
) -> Result<Event, StepError> {
    if view.spec.force_rebuild {
        log.line("force_rebuild is set: not looking for an existing workspace image")
            .await;
        return Ok(Event::CacheMiss);
    }
    if fresh {
        log.line(format!(
            "workspace image {} does not exist yet (checked when the build was accepted)",
            view.workspace_ref
        ))
        .await;
        return Ok(Event::CacheMiss);
    }
    match inner
        .steps
        .cache
        .lookup(&view.workspace_ref, &inner.credentials.installation(), log)
        .await?
    {
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

async fn build(
    inner: &Inner,
    view: &BuildView,
    secrets: &BuildSecrets,
    log: &BuildLog,
) -> Result<Event, StepError> {
    // A builder this attempt already started (a Job that outlived a restart) is attached to,
    // whatever the registry holds by now: its output belongs in the build's log.
    if matches!(view.spec.source, BuildSource::Dockerfile(_))
        && !view.spec.force_rebuild
        && view.builder_progress().is_none()
        && let Some(digest) = inner
            .steps
            .cache
            .lookup(&view.base_ref, &inner.credentials.installation(), log)
            .await?
    {
        log.line(format!(
            "base image {} exists already ({digest}); skipping the build",
            view.base_ref
        ))
        .await;
        return Ok(Event::Built);
    }
    inner.steps.builder.build(view, secrets, log).await?;
    Ok(Event::Built)
}

pub(super) fn phase_action(phase: Phase) -> &'static str {
    match phase {
        Phase::Queued => "waiting for a build slot",
        Phase::Resolving => "resolving the base image",
        Phase::CheckingCache => "checking for an existing workspace image",
        Phase::Building => "building the base image",
        Phase::Pushing => "pushing the workspace image",
        Phase::Done | Phase::Failed | Phase::Cancelled => "finishing",
    }
}

/// The loop admits queued builds itself and never runs a step in a final phase.
fn unreachable_here(phase: Phase) -> Result<Event, StepError> {
    Err(StepError::new(
        StepErrorKind::Failed,
        format!("no step runs in phase {phase}"),
    ))
}
