//! The committer: a thread that takes every append waiting at that moment, writes their log
//! bytes (each build on its own), then their records in one batch, and syncs once; an append
//! that finds nothing queued and no commit under way is committed the same way by its own
//! caller, without the two thread hand-offs (a lone writer then pays about one `fdatasync`).
//! An append's future resolves only after that sync; readers never see what is written but
//! not synced. Between commits the committer seals a checkpoint when one is due, which a
//! second thread writes into the store's long-term form, so commits never wait for sled.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, mpsc};

use parking_lot::{Condvar, Mutex};
use tokio::sync::oneshot;

use super::{Error, Result, Shared};
use crate::build::BuildId;
use crate::store::{LogBytes, WriteBatch};

/// Most appends one group commit takes; the rest wait for the next.
const MAX_GROUP: usize = 4096;

/// One append waiting for a commit.
pub(super) struct Commit {
    /// Log bytes that must be durable before `batch` is written.
    pub(super) logs: Vec<LogBytes>,
    pub(super) batch: WriteBatch,
    /// Told the commit's result; `None` for an append its own caller commits.
    pub(super) done: Option<oneshot::Sender<Result<()>>>,
    /// Fold everything durable into the store's long-term form after this group (a clean
    /// stop), instead of only when due.
    pub(super) checkpoint: bool,
}

/// What waits for a commit, under one lock: the appends queued for the committer thread in
/// queue order, and whether a commit is being written (by the thread or by a caller).
#[derive(Default)]
struct Queue {
    commits: VecDeque<Commit>,
    busy: bool,
    closed: bool,
}

/// Appends' way to durability. An append that finds nobody committing and nothing queued
/// commits itself, on its caller's thread (a lone writer then pays one `fdatasync` and no
/// thread hand-off); every other append waits in the queue, and the committer thread takes
/// all that wait at once into one group commit. At most one commit is written at a time, and
/// appends are committed in the order they were queued (queued under the heads lock, so in
/// each build's sequence order).
pub(super) struct Committer {
    queue: Arc<(Mutex<Queue>, Condvar)>,
    /// Wakes the checkpoint thread; a commit that seals a checkpoint sends on it.
    sealed: Option<mpsc::SyncSender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    checkpoints: Option<std::thread::JoinHandle<()>>,
}

/// A queued append: its result comes from the committer thread, or, when it leads, from its
/// own caller committing it in [`Ticket::wait`].
pub(super) enum Ticket {
    Queued(oneshot::Receiver<Result<()>>),
    Lead(Box<Lead>),
}

/// An append its caller commits: it holds the committer's turn until then (dropped unwritten,
/// it goes to the committer thread instead).
pub(super) struct Lead {
    commit: Option<Commit>,
    shared: Arc<Shared>,
    queue: Arc<(Mutex<Queue>, Condvar)>,
    sealed: mpsc::SyncSender<()>,
}

impl Committer {
    /// Starts the committer and checkpoint threads over `shared`.
    pub(super) fn start(shared: &Arc<Shared>) -> std::io::Result<Self> {
        let queue: Arc<(Mutex<Queue>, Condvar)> = Arc::default();
        let (sealed, to_write) = mpsc::sync_channel(1);
        let for_thread = Arc::clone(shared);
        let checkpoints = std::thread::Builder::new()
            .name("journal-checkpoint".into())
            .spawn(move || checkpoint_loop(&for_thread, &to_write))?;
        let for_thread = Arc::clone(shared);
        let its_queue = Arc::clone(&queue);
        let its_sealed = sealed.clone();
        let thread = std::thread::Builder::new()
            .name("journal-commit".into())
            .spawn(move || commit_loop(&for_thread, &its_queue, &its_sealed))?;
        Ok(Self {
            queue,
            sealed: Some(sealed),
            thread: Some(thread),
            checkpoints: Some(checkpoints),
        })
    }

    /// Queues `batch` (after `logs`, its log bytes) for the next commit; the ticket answers
    /// once it is durable. `checkpoint`: fold everything into the store's long-term form after
    /// that commit (a clean stop; always the committer thread's work).
    pub(super) fn queue(
        &self,
        shared: &Arc<Shared>,
        logs: Vec<LogBytes>,
        batch: WriteBatch,
        checkpoint: bool,
    ) -> Result<Ticket> {
        let mut commit = Commit {
            logs,
            batch,
            done: None,
            checkpoint,
        };
        let (lock, wake) = &*self.queue;
        let mut queue = lock.lock();
        if queue.closed {
            return Err(Error::Closed);
        }
        if !queue.busy
            && queue.commits.is_empty()
            && !checkpoint
            && on_multi_threaded_runtime()
            && let Some(sealed) = self.sealed.clone()
        {
            queue.busy = true;
            return Ok(Ticket::Lead(Box::new(Lead {
                commit: Some(commit),
                shared: Arc::clone(shared),
                queue: Arc::clone(&self.queue),
                sealed,
            })));
        }
        let (done, wait) = oneshot::channel();
        commit.done = Some(done);
        queue.commits.push_back(commit);
        drop(queue);
        wake.notify_one();
        Ok(Ticket::Queued(wait))
    }
}

/// Whether the caller runs on a multi-threaded tokio runtime: only there may an append commit
/// itself, as its worker's other tasks then go on elsewhere (and append meanwhile, to be
/// committed together). On a single thread, a lead would block everything else.
fn on_multi_threaded_runtime() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}

impl Ticket {
    /// Resolves once the append is durable (or its commit failed).
    pub(super) async fn wait(self) -> Result<()> {
        match self {
            Self::Queued(wait) => wait.await.unwrap_or(Err(Error::Closed)),
            Self::Lead(mut lead) => lead.commit(),
        }
    }
}

impl Lead {
    /// Writes and syncs this one append on the caller's thread, then gives the turn back
    /// (waking the committer thread for what was queued meanwhile).
    fn commit(&mut self) -> Result<()> {
        let Some(commit) = self.commit.take() else {
            return Err(Error::Closed);
        };
        // A commit blocks on the disk: the worker's other tasks move to another thread
        // meanwhile.
        let result =
            tokio::task::block_in_place(|| commit_group(&self.shared, vec![commit], &self.sealed));
        self.release();
        result
    }

    fn release(&self) {
        let (lock, wake) = &*self.queue;
        let mut queue = lock.lock();
        queue.busy = false;
        // The thread waits for this turn when appends queued meanwhile, or when the journal
        // closed meanwhile (it ends once no commit is under way).
        let waited_for = !queue.commits.is_empty() || queue.closed;
        drop(queue);
        if waited_for {
            wake.notify_one();
        }
    }
}

impl Drop for Lead {
    fn drop(&mut self) {
        // Never written (its caller went away first): the committer thread writes it, first
        // in the queue, as it was queued before anything waiting there.
        if let Some(commit) = self.commit.take() {
            let (lock, wake) = &*self.queue;
            let mut queue = lock.lock();
            queue.commits.push_front(commit);
            queue.busy = false;
            drop(queue);
            wake.notify_one();
        }
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        let (lock, wake) = &*self.queue;
        lock.lock().closed = true;
        wake.notify_all();
        self.sealed = None;
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

/// The committer thread: one group commit for every append waiting at that moment, until
/// the committer closes and its queue is empty.
fn commit_loop(shared: &Shared, queue: &(Mutex<Queue>, Condvar), sealed: &mpsc::SyncSender<()>) {
    let (lock, wake) = queue;
    loop {
        let group: Vec<Commit> = {
            let mut queue = lock.lock();
            while queue.busy || queue.commits.is_empty() {
                if queue.closed && !queue.busy && queue.commits.is_empty() {
                    return;
                }
                wake.wait(&mut queue);
            }
            queue.busy = true;
            let take = queue.commits.len().min(MAX_GROUP);
            queue.commits.drain(..take).collect()
        };
        let _ = commit_group(shared, group, sealed);
        lock.lock().busy = false;
    }
}

/// Writes `group` as one commit: each append's log bytes, then all their records in one
/// batch, one sync. Tells each queued append its result, and returns the result of the one
/// its caller commits (the group's result if there is none).
fn commit_group(shared: &Shared, group: Vec<Commit>, sealed: &mpsc::SyncSender<()>) -> Result<()> {
    let started = std::time::Instant::now();
    let answer = |done: Option<oneshot::Sender<Result<()>>>,
                  result: Result<()>,
                  own: &mut Option<Result<()>>| {
        match done {
            Some(done) => {
                let _ = done.send(result);
            }
            None => *own = Some(result),
        }
    };
    let mut own = None;
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
            answer(commit.done, Err(e.clone()), &mut own);
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
            answer(commit.done, Err(e), &mut own);
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
    let mut touched: Vec<BuildId> = written
        .iter()
        .map(|(id, _)| *id)
        .chain(removed.iter().copied())
        .collect();
    touched.sort_unstable();
    touched.dedup();
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
    shared.wake_followers(&touched);
    for done in waiters {
        answer(done, result.clone(), &mut own);
    }
    own.unwrap_or(result)
}
