//! The build lifecycle as a state machine (statig). Only the edges below exist; every other
//! event in a state is rejected, so an illegal transition cannot be journaled.
//!
//! ```text
//!   Queued ──Admitted──▶ Resolving ──Resolved──▶ CheckingCache ──CacheHit──────────────────────────▶ Done
//!                                │                                              ▲
//!                                └──CacheMiss──▶ Building ──Built──▶ Pushing ──Pushed
//!
//!   any working state ──Failed──▶ Failed        any working state ──Cancelled──▶ Cancelled
//!   Failed | Cancelled ──Retried──▶ Queued (a new attempt of the same build)
//! ```
//!
//! Working states are Queued, Resolving, CheckingCache, Building and Pushing; Done, Failed and
//! Cancelled are final: Done accepts no event, Failed and Cancelled only Retried. A build waits in Queued until the concurrency limit
//! admits it.
// statig generates `State` and `Superstate` (a variant per handler) without docs.
#![allow(missing_docs)]

use serde::{Deserialize, Serialize};
use statig::prelude::*;

/// Something that happened to a build; applying it moves the build along one edge.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// The concurrency limit let the build start.
    Admitted,
    /// The source resolved to a base image and a workspace ref.
    Resolved,
    /// The workspace image already exists and no rebuild was asked for.
    CacheHit,
    /// The workspace image must be made.
    CacheMiss,
    /// The base image exists in the registry (built, or already there).
    Built,
    /// The workspace image was pushed and confirmed under this manifest digest.
    Pushed {
        /// The manifest digest of the workspace image.
        digest: String,
    },
    /// The build cannot finish.
    Failed {
        /// What failed, for a person.
        reason: String,
    },
    /// Someone stopped the build.
    Cancelled {
        /// Why, as the canceller said.
        reason: String,
    },
    /// An operator ran a failed or cancelled build again.
    Retried,
}

impl Event {
    /// A short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Admitted => "admitted",
            Event::Resolved => "resolved",
            Event::CacheHit => "cache_hit",
            Event::CacheMiss => "cache_miss",
            Event::Built => "built",
            Event::Pushed { .. } => "pushed",
            Event::Failed { .. } => "failed",
            Event::Cancelled { .. } => "cancelled",
            Event::Retried => "retried",
        }
    }
}

/// Where a build is in its lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Phase {
    /// Waiting for a build slot.
    Queued,
    /// Finding the base image.
    Resolving,
    /// Looking for the workspace image in the registry.
    CheckingCache,
    /// Making the base image.
    Building,
    /// Copying the base image to the workspace ref.
    Pushing,
    /// The workspace image exists.
    Done,
    /// The build ended without an image.
    Failed,
    /// The build was stopped.
    Cancelled,
}

impl Phase {
    /// True for Done, Failed and Cancelled: the build has ended. Done accepts no event any
    /// more; Failed and Cancelled accept only `Retried`, which starts a new attempt.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Done | Phase::Failed | Phase::Cancelled)
    }

    /// Every phase, in lifecycle order.
    pub const ALL: [Phase; 8] = [
        Phase::Queued,
        Phase::Resolving,
        Phase::CheckingCache,
        Phase::Building,
        Phase::Pushing,
        Phase::Done,
        Phase::Failed,
        Phase::Cancelled,
    ];

    /// The phase's name as people read it.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Queued => "queued",
            Phase::Resolving => "resolving",
            Phase::CheckingCache => "checking_cache",
            Phase::Building => "building",
            Phase::Pushing => "pushing",
            Phase::Done => "done",
            Phase::Failed => "failed",
            Phase::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An event was applied in a state that has no edge for it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("event {event} is not allowed in phase {phase}")]
pub struct IllegalTransition {
    /// The phase the build was in.
    pub phase: Phase,
    /// The rejected event's name.
    pub event: &'static str,
}

/// The statig machine's shared storage (none: the lifecycle needs no data of its own).
#[derive(Clone, Debug, Default)]
pub struct Lifecycle;

/// The context handed to the machine with each event: set when no state had an edge for it.
#[derive(Debug, Default)]
pub struct Rejected(bool);

#[state_machine(
    initial = "State::queued()",
    state(derive(Clone, Debug, PartialEq, Eq))
)]
impl Lifecycle {
    #[state(superstate = "working")]
    fn queued(event: &Event) -> Outcome<State> {
        match event {
            Event::Admitted => Transition(State::resolving()),
            _ => Super,
        }
    }

    #[state(superstate = "working")]
    fn resolving(event: &Event) -> Outcome<State> {
        match event {
            Event::Resolved => Transition(State::checking_cache()),
            _ => Super,
        }
    }

    #[state(superstate = "working")]
    fn checking_cache(event: &Event) -> Outcome<State> {
        match event {
            Event::CacheHit => Transition(State::done()),
            Event::CacheMiss => Transition(State::building()),
            _ => Super,
        }
    }

    #[state(superstate = "working")]
    fn building(event: &Event) -> Outcome<State> {
        match event {
            Event::Built => Transition(State::pushing()),
            _ => Super,
        }
    }

    #[state(superstate = "working")]
    fn pushing(event: &Event) -> Outcome<State> {
        match event {
            Event::Pushed { .. } => Transition(State::done()),
            _ => Super,
        }
    }

    #[superstate(superstate = "any")]
    fn working(event: &Event) -> Outcome<State> {
        match event {
            Event::Failed { .. } => Transition(State::failed()),
            Event::Cancelled { .. } => Transition(State::cancelled()),
            _ => Super,
        }
    }

    #[state(superstate = "any")]
    fn done(event: &Event) -> Outcome<State> {
        let _ = event;
        Super
    }

    #[state(superstate = "any")]
    fn failed(event: &Event) -> Outcome<State> {
        match event {
            Event::Retried => Transition(State::queued()),
            _ => Super,
        }
    }

    #[state(superstate = "any")]
    fn cancelled(event: &Event) -> Outcome<State> {
        match event {
            Event::Retried => Transition(State::queued()),
            _ => Super,
        }
    }

    /// Reached only by events no state above handled: the edge does not exist.
    #[superstate]
    fn any(context: &mut Rejected, event: &Event) -> Outcome<State> {
        let _ = event;
        context.0 = true;
        Handled
    }
}

/// A build's lifecycle: the statig machine behind a small, fallible API.
#[derive(Clone)]
pub struct Machine {
    inner: statig::blocking::StateMachine<Lifecycle>,
}

impl Default for Machine {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Machine").field(&self.phase()).finish()
    }
}

impl Machine {
    /// A new build, in Queued.
    pub fn new() -> Self {
        Self {
            inner: Lifecycle.state_machine(),
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        match self.inner.state() {
            State::Queued {} => Phase::Queued,
            State::Resolving {} => Phase::Resolving,
            State::CheckingCache {} => Phase::CheckingCache,
            State::Building {} => Phase::Building,
            State::Pushing {} => Phase::Pushing,
            State::Done {} => Phase::Done,
            State::Failed {} => Phase::Failed,
            State::Cancelled {} => Phase::Cancelled,
        }
    }

    /// Would `event` be accepted now? Leaves the machine unchanged.
    pub fn check(&self, event: &Event) -> Result<Phase, IllegalTransition> {
        self.clone().apply(event)
    }

    /// Moves along the edge for `event`, or rejects it and stays put.
    pub fn apply(&mut self, event: &Event) -> Result<Phase, IllegalTransition> {
        let before = self.phase();
        let mut rejected = Rejected::default();
        self.inner.handle_with_context(event, &mut rejected);
        if rejected.0 {
            return Err(IllegalTransition {
                phase: before,
                event: event.name(),
            });
        }
        Ok(self.phase())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail() -> Event {
        Event::Failed { reason: "x".into() }
    }

    #[test]
    fn happy_path_reaches_done() {
        let mut m = Machine::new();
        assert_eq!(m.phase(), Phase::Queued);
        assert_eq!(m.apply(&Event::Admitted), Ok(Phase::Resolving));
        assert_eq!(m.apply(&Event::Resolved), Ok(Phase::CheckingCache));
        assert_eq!(m.apply(&Event::CacheMiss), Ok(Phase::Building));
        assert_eq!(m.apply(&Event::Built), Ok(Phase::Pushing));
        let pushed = Event::Pushed {
            digest: "sha256:1".into(),
        };
        assert_eq!(m.apply(&pushed), Ok(Phase::Done));
    }

    #[test]
    fn cache_hit_skips_the_build() {
        let mut m = Machine::new();
        m.apply(&Event::Admitted).unwrap();
        m.apply(&Event::Resolved).unwrap();
        assert_eq!(m.apply(&Event::CacheHit), Ok(Phase::Done));
    }

    #[test]
    fn illegal_edges_are_rejected_and_leave_the_phase() {
        let mut m = Machine::new();
        let err = m.apply(&Event::Resolved).unwrap_err();
        assert_eq!(err.phase, Phase::Queued);
        assert_eq!(err.event, "resolved");
        m.apply(&Event::Admitted).unwrap();
        let err = m.apply(&Event::Built).unwrap_err();
        assert_eq!(err.phase, Phase::Resolving);
        assert_eq!(err.event, "built");
        assert_eq!(m.phase(), Phase::Resolving);
        assert!(m.apply(&Event::Admitted).is_err(), "admitted only once");
    }

    #[test]
    fn final_phases_accept_nothing() {
        let mut m = Machine::new();
        m.apply(&fail()).unwrap();
        assert_eq!(m.phase(), Phase::Failed);
        for e in [
            Event::Resolved,
            fail(),
            Event::Cancelled { reason: "y".into() },
        ] {
            assert!(m.apply(&e).is_err());
            assert_eq!(m.phase(), Phase::Failed);
        }
    }

    #[test]
    fn every_working_phase_can_fail_and_be_cancelled() {
        let paths: [&[Event]; 5] = [
            &[],
            &[Event::Admitted],
            &[Event::Admitted, Event::Resolved],
            &[Event::Admitted, Event::Resolved, Event::CacheMiss],
            &[
                Event::Admitted,
                Event::Resolved,
                Event::CacheMiss,
                Event::Built,
            ],
        ];
        for path in paths {
            for (end, phase) in [
                (fail(), Phase::Failed),
                (Event::Cancelled { reason: "r".into() }, Phase::Cancelled),
            ] {
                let mut m = Machine::new();
                for e in path {
                    m.apply(e).unwrap();
                }
                assert_eq!(m.apply(&end), Ok(phase));
            }
        }
    }
}
