//! The committer: one thread that takes every append waiting at that moment, writes their log
//! bytes (each build on its own), then their records in one batch, and syncs once. An append's
//! future resolves only after that sync; readers never see what is written but not synced.
//! Between commits it seals a checkpoint when one is due, which a second thread writes into
//! the store's long-term form, so commits never wait for sled.

use std::collections::HashMap;
use std::sync::mpsc;

use tokio::sync::oneshot;

use super::{Error, Result, Shared};
use crate::build::BuildId;
use crate::store::{LogBytes, WriteBatch};

/// Most appends one group commit takes; the rest wait for the next.
const MAX_GROUP: usize = 4096;

/// One append waiting for the committer.
pub(super) struct Commit {
    /// Log bytes that must be durable before `batch` is written.
    pub(super) logs: Vec<LogBytes>,
    pub(super) batch: WriteBatch,
    pub(super) done: oneshot::Sender<Result<()>>,
    /// Fold everything durable into the store's long-term form after this group (a clean
    /// stop), instead of only when due.
    pub(super) checkpoint: bool,
}

/// The committer thread's queue; dropping it drains the queue and joins the thread, then the
/// checkpoint thread (which ends when the committer does).
pub(super) struct Committer {
    pub(super) queue: Option<mpsc::Sender<Commit>>,
    pub(super) thread: Option<std::thread::JoinHandle<()>>,
    pub(super) checkpoints: Option<std::thread::JoinHandle<()>>,
}

impl Committer {
    /// Queues `batch` (after `logs`, its log bytes) for the next group commit; the receiver
    /// answers once it is durable. `checkpoint`: fold everything into the store's long-term
    /// form after that commit (a clean stop).
    pub(super) fn queue(
        &self,
        logs: Vec<LogBytes>,
        batch: WriteBatch,
        checkpoint: bool,
    ) -> Result<oneshot::Receiver<Result<()>>> {
        let (done, wait) = oneshot::channel();
        let commit = Commit {
            logs,
            batch,
            done,
            checkpoint,
        };
        self.queue
            .as_ref()
            .ok_or(Error::Closed)?
            .send(commit)
            .map_err(|_| Error::Closed)?;
        Ok(wait)
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.queue = None;
        for thread in [self.thread.take(), self.checkpoints.take()]
            .into_iter()
            .flatten()
        {
            let _ = thread.join();
        }
    }
}

/// The checkpoint thread: writes each sealed checkpoint into the store's long-term form, until
/// the committer (holding the other end of `sealed`) stops.
pub(super) fn checkpoint_loop(shared: &Shared, sealed: &mpsc::Receiver<()>) {
    while sealed.recv().is_ok() {
        if let Err(e) = shared.store.write_sealed() {
            tracing::warn!(error = %e, "store checkpoint failed; the next one tries again");
        }
    }
}

/// The committer: one batch and one sync for every append waiting at that moment.
pub(super) fn commit_loop(
    shared: &Shared,
    queue: &mpsc::Receiver<Commit>,
    sealed: &mpsc::SyncSender<()>,
) {
    while let Ok(first) = queue.recv() {
        let started = std::time::Instant::now();
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(more) => group.push(more),
                Err(_) => break,
            }
        }
        // Log bytes first, each build's on its own: a build whose segment cannot be written
        // fails alone, with every later record of it in this group, and never leaves a record
        // naming bytes that are not on disk.
        let checkpoint = group.iter().any(|c| c.checkpoint);
        let mut failed: HashMap<BuildId, Error> = HashMap::new();
        let mut batch = WriteBatch::default();
        let mut waiters = Vec::with_capacity(group.len());
        for commit in group {
            let builds = || commit.batch.records.iter().map(|(id, _, _)| *id);
            if let Some(e) = builds().find_map(|id| failed.get(&id)) {
                let _ = commit.done.send(Err(e.clone()));
                continue;
            }
            if !commit.logs.is_empty()
                && let Err(e) = shared.store.append_logs(&commit.logs)
            {
                let e = Error::from(e);
                tracing::error!(error = %e, "cannot write build log bytes");
                for id in builds() {
                    failed.insert(id, e.clone());
                }
                let _ = commit.done.send(Err(e));
                continue;
            }
            batch.extend(commit.batch);
            waiters.push(commit.done);
        }
        // Records first, then the sync; the frontier moves past them only once they are
        // durable, and their summaries are written after that (derived data: a summary lost
        // to a crash is refolded at open), so no reader ever sees what is not durable.
        let written: Vec<(BuildId, u64)> = batch
            .records
            .iter()
            .map(|(id, seq, _)| (*id, *seq))
            .collect();
        let written_count = written.len();
        let removed = batch.removed_builds.clone();
        // With the summaries, the entries of the index of finished builds: a sweep that
        // found an entry before its build's summary said it ended would drop it as stale.
        let summaries = WriteBatch {
            summaries: std::mem::take(&mut batch.summaries),
            finished: std::mem::take(&mut batch.finished),
            ..WriteBatch::default()
        };
        let result = if batch.is_empty() {
            Ok(())
        } else {
            shared.store.write(batch)
        }
        .and_then(|()| shared.store.sync())
        .map_err(Error::from);
        if result.is_ok() {
            let mut frontier = shared.frontier.lock();
            for (id, seq) in written {
                let next = frontier.entry(id).or_insert(0);
                *next = (*next).max(seq + 1);
            }
            for id in removed {
                frontier.remove(&id);
            }
            drop(frontier);
            if !summaries.is_empty()
                && let Err(e) = shared.store.write(summaries)
            {
                tracing::error!(error = %e, "cannot write build summaries; they are refolded at the next start");
            }
            // Between commits, with this one's summaries written: a checkpoint then covers
            // everything written so far.
            let checkpointed = if checkpoint {
                shared.store.checkpoint()
            } else {
                shared.store.seal_if_due().map(|due| {
                    if due {
                        // Full: a signal is waiting already.
                        let _ = sealed.try_send(());
                    }
                })
            };
            if let Err(e) = checkpointed {
                tracing::warn!(error = %e, "store checkpoint failed; the next one tries again");
            }
        }
        if let Err(e) = &result {
            tracing::error!(error = %e, "journal commit failed");
        }
        if let Some(observer) = shared.observer.get() {
            observer.committed(waiters.len(), written_count, started.elapsed());
        }
        shared.generation.send_modify(|g| *g += 1);
        for waiter in waiters {
            let _ = waiter.send(result.clone());
        }
    }
}
