//! A build's log as the steps write it, on its way to the journal.
//!
//! Writers (a step's lines, a builder process's output) redact what they write and count it
//! against `builds.maxLogBytes`, then hand it to the build's one log writer task through a bounded
//! queue. The writer cuts the stream into chunks, closed at [`CHUNK_BYTES`] or [`CHUNK_AGE`]
//! after their first byte, whichever comes first, and journals each chunk while the next one
//! fills. So a builder never waits on an fsync, unless the journal falls behind by the whole
//! queue: then the writers wait (back pressure), and memory stays bounded.
//!
//! Listeners read only durable chunks. [`BuildLog::flush`] waits until everything written
//! before it is durable: the build's task calls it before every transition, so a build's log
//! is whole in the journal before the build is seen to move on.

use parking_lot::Mutex;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use image_builder_state::{BuildId, BuilderProgress, Journal, journal};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::credentials::{Redactions, StreamRedactor};
use crate::steps::{Progress, StepError, StepErrorKind, StepLog, StepOutput, Tail};

/// The line written once when a build's log reaches its size limit.
pub const TRUNCATION_MARKER: &str = "[image-builder] log truncated here: the build log reached builds.maxLogBytes; later output is dropped, the build goes on\n";

/// A chunk is journaled once it holds this many bytes...
pub const CHUNK_BYTES: usize = 64 * 1024;
/// ...or this long after its first byte, whichever comes first.
pub const CHUNK_AGE: Duration = Duration::from_millis(20);
/// Pieces of at most [`CHUNK_BYTES`] waiting for the writer: with the chunk being filled and
/// the one being journaled, what a build's log holds in memory at most.
const QUEUE_PIECES: usize = 16;

/// The build log could not be journaled.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The journal refused or failed a chunk; later output was dropped.
    #[error("the build log could not be journaled: {0}")]
    Journal(#[from] journal::Error),
    /// The writer task is gone (the service is shutting down).
    #[error("the build log's writer has stopped")]
    Closed,
}

impl Error {
    /// Whether the store's file system is full.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, Error::Journal(e) if e.is_disk_full())
    }

    /// The file the store failed on, if it names one.
    pub fn store_path(&self) -> Option<&std::path::Path> {
        match self {
            Error::Journal(journal::Error::Store(e)) => e.path(),
            _ => None,
        }
    }
}

enum Message {
    /// Redacted bytes, and how far they take the builder's output when they come from it.
    Bytes(Vec<u8>, Option<BuilderProgress>),
    Flush(oneshot::Sender<Result<(), Error>>),
}

#[derive(Debug)]
struct Budget {
    len: u64,
    truncated: bool,
}

/// What every handle of one build's log shares.
struct Shared {
    limit: u64,
    budget: Mutex<Budget>,
    needles: Redactions,
}

/// Writes one build's log. Cheap to clone; the writer task ends (after journaling what it
/// holds) when the last clone is dropped.
#[derive(Clone)]
pub struct BuildLog {
    queue: mpsc::Sender<Message>,
    shared: Arc<Shared>,
}

impl BuildLog {
    /// The log of build `id`, which holds `len` bytes already, kept under `limit` bytes, with
    /// `redacted` values (and any URL user-info) removed from everything written. Starts the
    /// build's log writer task.
    pub fn new(journal: Journal, id: BuildId, len: u64, limit: u64, redacted: Vec<String>) -> Self {
        let room = limit.saturating_sub(TRUNCATION_MARKER.len() as u64);
        let (queue, pieces) = mpsc::channel(QUEUE_PIECES);
        tokio::spawn(write_chunks(journal, id, pieces));
        Self {
            queue,
            shared: Arc::new(Shared {
                limit,
                budget: Mutex::new(Budget {
                    len,
                    truncated: len > room,
                }),
                needles: Redactions::new(redacted),
            }),
        }
    }

    /// Writes one line (a newline is added). Waits only if the journal is a whole queue
    /// behind.
    pub async fn line(&self, text: impl Into<String>) {
        let mut text = text.into().into_bytes();
        text.push(b'\n');
        let redacted = self.shared.needles.redact(&text);
        self.write_redacted(redacted, None).await;
    }

    /// Waits until everything written before this call is durable; says why not if it
    /// cannot be (then later output is dropped, and the build must fail).
    pub async fn flush(&self) -> Result<(), Error> {
        let (done, wait) = oneshot::channel();
        self.queue
            .send(Message::Flush(done))
            .await
            .map_err(|_| Error::Closed)?;
        wait.await.unwrap_or(Err(Error::Closed))
    }

    /// Counts redacted bytes against the budget and queues what fits, with the builder
    /// `progress` they make (which moves on even when the bytes are dropped).
    async fn write_redacted(&self, bytes: Vec<u8>, progress: Option<BuilderProgress>) {
        let bytes = self.admit(bytes).unwrap_or_default();
        let mut pieces = bytes.chunks(CHUNK_BYTES).peekable();
        if pieces.peek().is_none() {
            if progress.is_some() {
                let _ = self.queue.send(Message::Bytes(Vec::new(), progress)).await;
            }
            return;
        }
        let mut progress = progress;
        while let Some(piece) = pieces.next() {
            let last = pieces.peek().is_none();
            let mark = if last { progress.take() } else { None };
            if self
                .queue
                .send(Message::Bytes(piece.to_vec(), mark))
                .await
                .is_err()
            {
                return;
            }
        }
    }

    /// What of `bytes` fits under `builds.maxLogBytes`: all of it, or the lines that fit and the
    /// truncation marker once, or nothing after that.
    fn admit(&self, mut bytes: Vec<u8>) -> Option<Vec<u8>> {
        let mut budget = self.shared.budget.lock();
        if budget.truncated || bytes.is_empty() {
            return None;
        }
        let room = self
            .shared
            .limit
            .saturating_sub(TRUNCATION_MARKER.len() as u64);
        let left = room.saturating_sub(budget.len) as usize;
        if bytes.len() <= left {
            budget.len += bytes.len() as u64;
            return Some(bytes);
        }
        // Keep the whole lines that fit, so the marker starts a line of its own.
        let keep = memchr::memrchr(b'\n', &bytes[..left]).map_or(0, |nl| nl + 1);
        bytes.truncate(keep);
        bytes.extend_from_slice(TRUNCATION_MARKER.as_bytes());
        budget.truncated = true;
        budget.len += bytes.len() as u64;
        Some(bytes)
    }
}

#[async_trait]
impl Progress for BuildLog {
    async fn line(&self, text: String) {
        BuildLog::line(self, text).await;
    }
}

#[async_trait]
impl StepLog for BuildLog {
    fn output(&self, tail: Tail) -> Box<dyn StepOutput> {
        Box::new(Output {
            log: self.clone(),
            redactor: StreamRedactor::new(self.shared.needles.clone()),
            tail,
            source: None,
        })
    }

    fn builder_output(&self, tail: Tail, from: BuilderProgress) -> Box<dyn StepOutput> {
        Box::new(Output {
            log: self.clone(),
            redactor: StreamRedactor::new(self.shared.needles.clone()),
            tail,
            source: Some(Source {
                start: from.consumed,
                taken: 0,
                progress: from,
            }),
        })
    }

    async fn record_builder(&self, progress: BuilderProgress) -> Result<(), StepError> {
        let queued = self
            .queue
            .send(Message::Bytes(Vec::new(), Some(progress)))
            .await;
        if queued.is_err() {
            return Err(StepError::new(
                StepErrorKind::Failed,
                Error::Closed.to_string(),
            ));
        }
        self.flush()
            .await
            .map_err(|e| StepError::from_source(StepErrorKind::Failed, e))
    }
}

/// One output stream of a process on its way into the build log.
struct Output {
    log: BuildLog,
    redactor: StreamRedactor,
    tail: Tail,
    /// Set for a builder's output: how far it has been taken.
    source: Option<Source>,
}

/// Where a builder's output stream stands.
struct Source {
    /// Bytes of the output consumed before this stream began.
    start: u64,
    /// Bytes this stream has taken in.
    taken: u64,
    /// The progress the next bytes are journaled with.
    progress: BuilderProgress,
}

#[async_trait]
impl StepOutput for Output {
    async fn write(&mut self, bytes: &[u8]) {
        let mut out = Vec::with_capacity(bytes.len() + 64);
        self.redactor.push(bytes, &mut out);
        if let Some(source) = &mut self.source {
            source.taken += bytes.len() as u64;
        }
        self.pass_on(out).await;
    }

    /// Ends the stream with a newline when it had none.
    async fn finish(mut self: Box<Self>) {
        let mut out = Vec::new();
        self.redactor.finish(&mut out);
        if !out.is_empty() && !out.ends_with(b"\n") {
            out.push(b'\n');
        }
        self.pass_on(out).await;
    }
}

impl Output {
    async fn pass_on(&mut self, out: Vec<u8>) {
        // Output the redactor still holds back is not consumed yet: after a restart it is
        // read again.
        let held = self.redactor.pending() as u64;
        let progress = self.source.as_mut().and_then(|source| {
            let consumed = source.start + source.taken - held;
            (consumed != source.progress.consumed).then(|| {
                source.progress.consumed = consumed;
                source.progress.clone()
            })
        });
        if out.is_empty() && progress.is_none() {
            return;
        }
        self.tail.remember(&out);
        self.log.write_redacted(out, progress).await;
    }
}

type Append = Pin<Box<dyn Future<Output = Result<u64, journal::Error>> + Send>>;
type Waiters = Vec<oneshot::Sender<Result<(), Error>>>;

/// The build's log writer: fills a chunk from the queue, journals it while the next fills,
/// answers flushes once what came before them is durable.
async fn write_chunks(journal: Journal, id: BuildId, mut pieces: mpsc::Receiver<Message>) {
    let mut chunk: Vec<u8> = Vec::new();
    // The builder progress the chunk's bytes make, journaled with them.
    let mut progress: Option<BuilderProgress> = None;
    let mut opened: Option<Instant> = None;
    let mut waiting: Waiters = Vec::new();
    let mut in_flight: Option<(Append, Waiters)> = None;
    let mut failed: Option<Error> = None;
    let mut closed = false;
    loop {
        if let Some(e) = &failed {
            chunk.clear();
            progress = None;
            opened = None;
            for waiter in waiting.drain(..) {
                let _ = waiter.send(Err(e.clone()));
            }
        }
        let due = !waiting.is_empty()
            || closed
            || chunk.len() >= CHUNK_BYTES
            || opened.is_some_and(|t| t.elapsed() >= CHUNK_AGE);
        let empty = chunk.is_empty() && progress.is_none();
        if in_flight.is_none() && !empty && due {
            let data = std::mem::take(&mut chunk);
            let mark = progress.take();
            opened = None;
            let journal = journal.clone();
            let append: Append =
                Box::pin(async move { journal.log_with_progress(id, data, mark).await });
            in_flight = Some((append, std::mem::take(&mut waiting)));
        }
        let empty = chunk.is_empty() && progress.is_none();
        if in_flight.is_none() && empty {
            for waiter in waiting.drain(..) {
                let _ = waiter.send(Ok(()));
            }
            if closed {
                return;
            }
        }
        let deadline = opened.map(|t| t + CHUNK_AGE);
        tokio::select! {
            result = async {
                match in_flight.as_mut() {
                    Some((append, _)) => append.await,
                    None => std::future::pending().await,
                }
            }, if in_flight.is_some() => {
                let waiters = in_flight.take().map(|(_, waiters)| waiters).unwrap_or_default();
                let result = result.map(drop).map_err(Error::from);
                if let Err(e) = &result {
                    tracing::error!(build_id = %id, error = %e, "cannot journal build output; later output is dropped");
                    failed = Some(e.clone());
                }
                for waiter in waiters {
                    let _ = waiter.send(result.clone());
                }
            }
            message = pieces.recv(), if !closed && chunk.len() < CHUNK_BYTES => match message {
                Some(Message::Bytes(bytes, mark)) if failed.is_none() => {
                    opened.get_or_insert_with(Instant::now);
                    chunk.extend_from_slice(&bytes);
                    if mark.is_some() {
                        progress = mark;
                    }
                }
                Some(Message::Bytes(..)) => {}
                Some(Message::Flush(done)) => match (&failed, chunk.is_empty() && progress.is_none(), &mut in_flight) {
                    (Some(e), _, _) => { let _ = done.send(Err(e.clone())); }
                    (None, true, Some((_, waiters))) => waiters.push(done),
                    (None, true, None) => { let _ = done.send(Ok(())); }
                    (None, false, _) => waiting.push(done),
                },
                None => closed = true,
            },
            () = sleep_until(deadline), if deadline.is_some() && in_flight.is_none() => {}
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(deadline) = deadline {
        tokio::time::sleep_until(deadline).await;
    }
}

#[cfg(test)]
mod tests {
    use image_builder_state::{Event, Record};

    use super::*;

    async fn journal_with_build() -> (tempfile::TempDir, Journal, BuildId) {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let id = image_builder_state::testing::new_build(&journal).await;
        (dir, journal, id)
    }

    async fn whole_log(journal: &Journal, id: BuildId) -> Vec<u8> {
        journal
            .transition(
                id,
                Event::Failed {
                    reason: "end".into(),
                },
            )
            .await
            .unwrap();
        let mut reader = journal.read(id, 0, 0);
        let mut out = Vec::new();
        while let Some(entry) = reader.next().await {
            if let journal::Entry::Log { bytes, .. } = entry.unwrap() {
                out.extend(bytes);
            }
        }
        out
    }

    fn log_records(journal: &Journal, id: BuildId) -> usize {
        journal
            .records(id, 0)
            .unwrap()
            .iter()
            .filter(|(_, r)| matches!(r, Record::LogChecked { .. }))
            .count()
    }

    #[tokio::test]
    async fn many_lines_become_few_chunks_and_flush_makes_them_durable() {
        let (_dir, journal, id) = journal_with_build().await;
        let log = BuildLog::new(journal.clone(), id, 0, u64::MAX, Vec::new());
        let mut expected = String::new();
        let started = Instant::now();
        for i in 0..20_000 {
            let line = format!("output line {i}");
            log.line(line.clone()).await;
            expected.push_str(&line);
            expected.push('\n');
        }
        log.flush().await.unwrap();
        let elapsed = started.elapsed();
        assert_eq!(
            journal.view(id).unwrap().unwrap().log_len,
            expected.len() as u64,
            "flush returns once every byte before it is durable"
        );
        // A chunk closes when full, when CHUNK_AGE has passed since its first byte, or at the
        // final flush, and the journal names each in records of LOG_PIECE_BYTES at most: however
        // slowly this machine writes the lines, no more records than that.
        let records = log_records(&journal, id);
        let full = expected.len().div_ceil(CHUNK_BYTES);
        let aged = (elapsed.as_millis() / CHUNK_AGE.as_millis()) as usize + 1;
        let chunks = full + aged + 1;
        let most = expected.len().div_ceil(journal::LOG_PIECE_BYTES) + chunks;
        assert!(
            records <= most,
            "{records} log records for {} bytes written in {elapsed:?}: at most {most}",
            expected.len()
        );
        assert_eq!(whole_log(&journal, id).await, expected.as_bytes());
    }

    #[tokio::test]
    async fn a_builders_output_is_consumed_only_as_far_as_it_is_journaled() {
        let (_dir, journal, id) = journal_with_build().await;
        let limit = TRUNCATION_MARKER.len() as u64 + 40;
        let log = BuildLog::new(journal.clone(), id, 0, limit, vec!["hunter2-secret".into()]);
        let from = BuilderProgress {
            attempt: 1,
            builder: "builds/ib-job".into(),
            consumed: 100,
        };
        log.record_builder(from.clone()).await.unwrap();
        let consumed = || {
            journal
                .view(id)
                .unwrap()
                .unwrap()
                .builder_progress()
                .map(|p| p.consumed)
        };
        assert_eq!(consumed(), Some(100));

        let mut out = log.builder_output(Tail::default(), from);
        out.write(b"step 1\nlogin hunter").await;
        log.flush().await.unwrap();
        // "login hunter" may be the start of a credential: held back, so not consumed.
        assert_eq!(consumed(), Some(107));
        out.write(b"2-secret ok\n").await;
        log.flush().await.unwrap();
        assert_eq!(consumed(), Some(131));
        // Past builds.maxLogBytes the bytes are dropped, but the output is consumed all the same.
        out.write(&[b'x'; 100]).await;
        out.write(b"\n").await;
        out.finish().await;
        log.flush().await.unwrap();
        assert_eq!(consumed(), Some(232));
        let text = String::from_utf8(whole_log(&journal, id).await).unwrap();
        assert!(text.starts_with("step 1\nlogin [redacted] ok\n"), "{text}");
        assert!(text.ends_with(TRUNCATION_MARKER), "{text}");
    }

    #[tokio::test]
    async fn a_credential_split_across_two_pipe_reads_is_redacted() {
        let (_dir, journal, id) = journal_with_build().await;
        let log = BuildLog::new(
            journal.clone(),
            id,
            0,
            u64::MAX,
            vec!["hunter2-secret".into()],
        );
        let tail = Tail::default();
        let mut out = log.output(tail.clone());
        out.write(b"login with hunter").await;
        out.write(b"2-secret done\nnext line").await;
        out.finish().await;
        log.flush().await.unwrap();
        let text = String::from_utf8(whole_log(&journal, id).await).unwrap();
        assert_eq!(text, "login with [redacted] done\nnext line\n");
        assert_eq!(tail.lines(), ["login with [redacted] done", "next line"]);
    }

    #[tokio::test]
    async fn the_budget_holds_across_chunks_and_the_marker_starts_a_line() {
        let (_dir, journal, id) = journal_with_build().await;
        let limit = 100_000u64;
        let log = BuildLog::new(journal.clone(), id, 0, limit, Vec::new());
        let mut out = log.output(Tail::default());
        for _ in 0..1000 {
            out.write("0123456789012345678\n".repeat(10).as_bytes())
                .await;
        }
        out.finish().await;
        log.line("after the limit").await;
        log.flush().await.unwrap();
        let text = String::from_utf8(whole_log(&journal, id).await).unwrap();
        assert!(text.len() as u64 <= limit, "{}", text.len());
        assert!(text.ends_with(&format!("\n{TRUNCATION_MARKER}")));
        assert_eq!(text.matches(TRUNCATION_MARKER).count(), 1);
        assert!(!text.contains("after the limit"));
    }

    #[tokio::test]
    async fn a_journal_failure_is_reported_by_flush() {
        let (_dir, journal, id) = journal_with_build().await;
        let log = BuildLog::new(journal.clone(), id, 0, u64::MAX, Vec::new());
        journal
            .transition(id, Event::Failed { reason: "x".into() })
            .await
            .unwrap();
        journal.remove(id).await.unwrap();
        log.line("to a removed build").await;
        let err = log.flush().await.unwrap_err();
        assert!(err.to_string().contains("could not be journaled"), "{err}");
        log.line("dropped").await;
        assert!(log.flush().await.is_err(), "later output is refused too");
    }
}
