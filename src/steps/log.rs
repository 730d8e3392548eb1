//! What a step writes to: progress lines, and the raw output of the processes it runs.

use std::collections::VecDeque;
use std::sync::Arc;

use async_trait::async_trait;
use image_builder_state::BuilderProgress;
use parking_lot::Mutex;

use super::{Lane, StepError};

/// Output lines a [`Tail`] keeps for error messages.
const TAIL_LINES: usize = 6;

/// Longest line a [`Tail`] keeps, in characters.
const TAIL_LINE_CHARS: usize = 512;

/// Where a step reports what it does, one line at a time.
#[async_trait]
pub trait Progress: Send + Sync {
    /// Records one line of progress (a newline is added).
    async fn line(&self, text: String);

    /// Whose work this is; a build's, unless said otherwise.
    fn lane(&self) -> Lane {
        Lane::Build
    }
}

/// A build's log as a step sees it: progress lines, and streams for the output of the
/// processes the step runs. The log redacts credentials and bounds its size; a step writes
/// whatever it has.
#[async_trait]
pub trait StepLog: Progress {
    /// A writer for one output stream of a process. What it writes (redacted) also goes to
    /// `tail`, for the step's error message.
    fn output(&self, tail: Tail) -> Box<dyn StepOutput>;

    /// A writer for the output of a builder that runs outside the service (a Kubernetes
    /// Job), picking up where `from` says the log stands: each write journals, with its
    /// bytes, how much of that output the log now holds, so that after a restart the step
    /// reads the output on from exactly there.
    fn builder_output(&self, tail: Tail, from: BuilderProgress) -> Box<dyn StepOutput>;

    /// Journals `progress` (the builder the step is about to make) and returns once it and
    /// everything written before it are durable.
    async fn record_builder(&self, progress: BuilderProgress) -> Result<(), StepError>;
}

/// One output stream of a process on its way into a build's log.
#[async_trait]
pub trait StepOutput: Send {
    /// Takes bytes as a read of the pipe gave them (cut anywhere).
    async fn write(&mut self, bytes: &[u8]);

    /// The stream has ended: passes on what was held back.
    async fn finish(self: Box<Self>);
}

/// Progress outside any build, for a caller waiting on the answer (a ResolveBaseImage
/// request, the cache check before a Build is accepted): to the service's own log only.
pub struct Untracked;

#[async_trait]
impl Progress for Untracked {
    async fn line(&self, text: String) {
        tracing::info!("{text}");
    }

    fn lane(&self) -> Lane {
        Lane::Caller
    }
}

/// The last lines written through a process's outputs, shared by its stdout and stderr.
#[derive(Clone, Default)]
pub struct Tail(Arc<Mutex<VecDeque<String>>>);

impl Tail {
    /// The last non-blank lines, oldest first (already redacted).
    pub fn lines(&self) -> Vec<String> {
        self.0
            .lock()
            .iter()
            .filter(|l| !l.trim().is_empty())
            .cloned()
            .collect()
    }

    /// Keeps the last lines of `redacted`, each cut at a bounded length.
    pub fn remember(&self, redacted: &[u8]) {
        let mut lines = redacted
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .rev()
            .take(TAIL_LINES)
            .collect::<Vec<_>>();
        lines.reverse();
        let mut tail = self.0.lock();
        for line in lines {
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            let text = String::from_utf8_lossy(line);
            tail.push_back(
                text.trim_end_matches('\r')
                    .chars()
                    .take(TAIL_LINE_CHARS)
                    .collect(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn a_tail_keeps_the_last_non_blank_lines_bounded() {
        let tail = Tail::default();
        for i in 0..10 {
            tail.remember(format!("line {i}\n\r\n").as_bytes());
        }
        tail.remember("x".repeat(2000).as_bytes());
        let lines = tail.lines();
        assert!(lines.len() <= TAIL_LINES);
        assert_eq!(lines.last().unwrap().len(), TAIL_LINE_CHARS);
        assert!(lines.iter().any(|l| l == "line 9"), "{lines:?}");
        assert!(!lines.iter().any(|l| l == "line 0"), "{lines:?}");
    }
}
