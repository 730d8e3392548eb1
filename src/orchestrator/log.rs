//! A build's log as the steps write it: each line goes into the journal, and is durable,
//! before any listener sees it.

use async_trait::async_trait;
use image_builder_state::{BuildId, Journal};

use crate::registry::Progress;

/// Appends lines to one build's journaled log.
#[derive(Clone)]
pub struct BuildLog {
    journal: Journal,
    id: BuildId,
}

impl BuildLog {
    /// The log of build `id`.
    pub fn new(journal: Journal, id: BuildId) -> Self {
        Self { journal, id }
    }

    /// Appends one line (a newline is added) and waits until it is durable. A journal failure
    /// is reported here and not to the step: the transition that follows will fail the same
    /// way and stop the build, to be resumed after a restart.
    pub async fn line(&self, text: impl Into<String>) {
        let mut bytes = text.into().into_bytes();
        bytes.push(b'\n');
        if let Err(e) = self.journal.log(self.id, bytes).await {
            tracing::error!(build_id = %self.id, error = %e, "cannot journal a log line");
        }
    }
}

#[async_trait]
impl Progress for BuildLog {
    async fn line(&self, text: String) {
        BuildLog::line(self, text).await;
    }
}
