//! A build's log as the steps write it: each line goes into the journal, and is durable,
//! before any listener sees it. Past the configured size, one truncation marker is written and
//! further lines are dropped; the build goes on.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use image_builder_state::{BuildId, Journal};

use crate::registry::Progress;

/// The line written once when a build's log reaches its size limit.
pub const TRUNCATION_MARKER: &str = "[image-builder] log truncated here: the build log reached maxLogBytes; later output is dropped, the build goes on\n";

#[derive(Debug)]
struct Budget {
    len: u64,
    truncated: bool,
}

/// Appends lines to one build's journaled log.
#[derive(Clone)]
pub struct BuildLog {
    journal: Journal,
    id: BuildId,
    limit: u64,
    budget: Arc<Mutex<Budget>>,
    redacted: Arc<Vec<String>>,
}

impl BuildLog {
    /// The log of build `id`, which holds `len` bytes already, kept under `limit` bytes.
    pub fn new(journal: Journal, id: BuildId, len: u64, limit: u64) -> Self {
        let room = limit.saturating_sub(TRUNCATION_MARKER.len() as u64);
        Self {
            journal,
            id,
            limit,
            budget: Arc::new(Mutex::new(Budget {
                len,
                truncated: len > room,
            })),
            redacted: Arc::new(Vec::new()),
        }
    }

    /// The same log, with these credential values (and any URL user-info) removed from every
    /// line before it is journaled.
    pub fn redacting(mut self, values: Vec<String>) -> Self {
        self.redacted = Arc::new(values);
        self
    }

    /// Appends one line (a newline is added) and waits until it is durable. A journal failure
    /// is reported here and not to the step: the transition that follows fails the same way
    /// and stops the build, to be resumed after a restart.
    pub async fn line(&self, text: impl Into<String>) {
        let mut bytes = crate::credentials::redact(&text.into(), &self.redacted).into_bytes();
        bytes.push(b'\n');
        let bytes = {
            let mut budget = self.budget.lock().unwrap_or_else(|p| p.into_inner());
            if budget.truncated {
                return;
            }
            let room = self.limit.saturating_sub(TRUNCATION_MARKER.len() as u64);
            if budget.len + bytes.len() as u64 > room {
                budget.truncated = true;
                TRUNCATION_MARKER.as_bytes().to_vec()
            } else {
                budget.len += bytes.len() as u64;
                bytes
            }
        };
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
