//! Single flight: one build in flight per workspace ref, joined by every Build call for that
//! ref until it ends, and the guard that keeps a half-made flight from outliving a failure.

use std::sync::Arc;

use image_builder_state::BuildId;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Inner;

/// A build in flight for a workspace ref; `created` turns true once its record is durable.
#[derive(Clone)]
pub(super) struct Flight {
    pub(super) id: BuildId,
    /// The attempt of the build this flight is for.
    pub(super) attempt: u32,
    pub(super) created: watch::Receiver<bool>,
    /// Build calls that joined this build after the one that started it.
    pub(super) joined: Arc<std::sync::atomic::AtomicUsize>,
    /// Fires when someone cancels the build.
    pub(super) cancel: CancellationToken,
}

impl Flight {
    pub(super) fn new(id: BuildId, attempt: u32, created: watch::Receiver<bool>) -> Self {
        Self {
            id,
            attempt,
            created,
            joined: Arc::default(),
            cancel: CancellationToken::new(),
        }
    }
}

/// Forgets a flight when dropped (an error, a panic), unless [`ForgetUnlessKept::keep`] was
/// called once the flight's build is durable.
pub(super) struct ForgetUnlessKept<'a> {
    inner: &'a Inner,
    workspace_ref: &'a str,
    id: BuildId,
    attempt: u32,
    kept: bool,
}

impl<'a> ForgetUnlessKept<'a> {
    pub(super) fn new(inner: &'a Inner, workspace_ref: &'a str, flight: &Flight) -> Self {
        Self {
            inner,
            workspace_ref,
            id: flight.id,
            attempt: flight.attempt,
            kept: false,
        }
    }

    /// The flight's build is durable: the flight stays.
    pub(super) fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for ForgetUnlessKept<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.inner
                .forget_flight(self.workspace_ref, self.id, self.attempt);
        }
    }
}
