//! The journal: appends records to builds, makes them durable with group commit, and serves
//! only durable records back.
//!
//! Appends are checked against the build's current view (an illegal transition is refused
//! before it is written), numbered, and handed to the committer. Its thread takes every append
//! waiting at that moment, writes them in one batch and syncs once, so many concurrent builds
//! share one fsync; an append that finds nothing else under way commits itself (`commit.rs`).
//! An append's future resolves only after that sync.
//!
//! Written-but-not-yet-durable data is never visible, and readers never wait for a sync: the
//! journal keeps a durable frontier for every build with records in flight (the next sequence
//! number not yet durable), and readers see only the records below it. Summaries are written
//! after the sync of the records they reflect (they are derived, and repaired at open).
//!
//! Build output is kept beside the records: [`Journal::log`] puts a chunk of
//! [`INLINE_LOG_BYTES`] or more in the build's log segment, durable before the records that
//! name it (`LogChecked`) are written; a smaller chunk is kept in its `Log` record, so that
//! many builds printing a little each share one sync.
//!
//! Files: this one (opening, appends), `output.rs` (build output), `retention.rs` (what
//! ended before a cutoff, removal), `read.rs` (durable reads, views, summaries), `commit.rs`
//! (the committer), `follow.rs` (readers that tail a build), `repair.rs` (the pass run at
//! open), `damage.rs` (builds the store cannot give back whole), `error.rs`.

mod commit;
mod damage;
mod error;
mod follow;
mod output;
mod read;
mod repair;
mod retention;

use parking_lot::{Mutex, MutexGuard};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use tokio::sync::watch;

use commit::{Committer, Ticket};
pub use follow::{Entry, Follower, LOG_PIECE_BYTES, Reader};

use crate::build::{BuildId, BuildSpec};
use crate::machine::Event;
use crate::now_ms;
use crate::record::{OperatorAction, OperatorRequest, Record};
use crate::store::{self, LogBytes, SledStore, Store, WriteBatch};
use crate::view::BuildView;
pub use crate::view::Damage;
pub use damage::damage_reports;
pub use error::Error;
use read::decode_records;

/// Log chunks smaller than this stay inside their record instead of going to the segment.
pub const INLINE_LOG_BYTES: usize = 4096;

pub(crate) type Result<T, E = Error> = std::result::Result<T, E>;

/// Told of each group commit (how many appends it carried, how many records they wrote, how
/// long it took from when the committer took its first append to the sync) and of the build
/// log bytes made durable (metrics).
pub trait CommitObserver: Send + Sync {
    /// One group commit finished (successfully or not).
    fn committed(&self, appends: usize, records: usize, took: std::time::Duration);
    /// `bytes` of build log were made durable.
    fn log_written(&self, bytes: u64);
}

pub(super) struct Shared {
    store: Arc<dyn Store>,
    /// For each build with records written since open: the first sequence number that is not
    /// durable yet. Readers see records below it only. Held for map operations only.
    frontier: Mutex<HashMap<BuildId, u64>>,
    /// Views of builds appended to by this process, including not-yet-durable records.
    heads: Mutex<HashMap<BuildId, BuildView>>,
    /// Builds removed by this process: no record may be appended to them again (an append
    /// racing a removal would otherwise leave records without their build). Taken after
    /// `heads`.
    removed: Mutex<std::collections::HashSet<BuildId>>,
    /// Bumped after every durable group commit.
    generation: watch::Sender<u64>,
    /// The builds someone follows, each with a channel told after every commit that carried
    /// records of it (or removed it): a follower wakes for its own build's commits only, so
    /// a commit costs work for the builds in it, not for every build someone listens to.
    /// An entry lives while a follower of its build does. Held for map operations only.
    followed: Mutex<HashMap<BuildId, watch::Sender<()>>>,
    /// Told of every group commit (metrics), once set.
    observer: std::sync::OnceLock<Arc<dyn CommitObserver>>,
    /// Damaged builds (see `damage.rs`): loaded at open, added to when a read finds damage.
    damaged: Mutex<HashMap<BuildId, Damage>>,
}

/// The durable journal of every build. Cheap to clone; the store closes when the last clone
/// is dropped (after the committer has finished every queued commit).
#[derive(Clone)]
pub struct Journal {
    committer: Arc<Committer>,
    shared: Arc<Shared>,
}

impl Journal {
    /// Opens the journal stored in `dir` (sled), repairing summaries from records.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::with_store(Arc::new(SledStore::open(dir)?))
    }

    /// Tells `observer` of every group commit from now on (the first observer set stays).
    pub fn observe_commits(&self, observer: Arc<dyn CommitObserver>) {
        let _ = self.shared.observer.set(observer);
    }

    /// Opens a journal over any store, repairing summaries from records.
    pub fn with_store(store: Arc<dyn Store>) -> Result<Self> {
        let (generation, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            store,
            frontier: Mutex::new(HashMap::new()),
            heads: Mutex::new(HashMap::new()),
            removed: Mutex::new(std::collections::HashSet::new()),
            generation,
            followed: Mutex::new(HashMap::new()),
            damaged: Mutex::new(HashMap::new()),
            observer: std::sync::OnceLock::new(),
        });
        let damaged = repair::find_damage(&*shared.store)?;
        if !damaged.is_empty() {
            tracing::warn!(
                damaged = damaged.len(),
                "the store holds damaged builds; list them with `builds list --state damaged`"
            );
        }
        *shared.damaged.lock() = damaged.into_iter().collect();
        let committer =
            Committer::start(&shared).map_err(|e| Error::Store(Arc::new(store::Error::Io(e))))?;
        let committer = Arc::new(committer);
        Ok(Self { committer, shared })
    }

    /// Records a new build. Resolves once durable.
    pub async fn create(
        &self,
        id: BuildId,
        spec: BuildSpec,
        base_ref: String,
        workspace_ref: String,
    ) -> Result<BuildView> {
        let record = Record::Created {
            spec,
            base_ref,
            workspace_ref,
            at_ms: now_ms(),
        };
        self.shared.store.ensure_room_for_build()?;
        let pending = {
            let mut heads = self.lock_heads();
            if heads.contains_key(&id) || self.shared.store.last_seq(id)?.is_some() {
                return Err(Error::Exists(id));
            }
            let view =
                BuildView::fold(id, [(0, &record)]).map_err(|source| Error::Fold { id, source })?;
            let pending = self.enqueue(&view, vec![(0, record)], Vec::new())?;
            heads.insert(id, view.clone());
            (pending, view)
        };
        self.wait(pending.0).await?;
        Ok(pending.1)
    }

    /// Moves a build along one edge. Refused, and nothing written, if the edge does not exist.
    pub async fn transition(&self, id: BuildId, event: Event) -> Result<BuildView> {
        self.append(id, |view| {
            view.check(&event)
                .map_err(|source| Error::Illegal { id, source })?;
            Ok(vec![Record::Transition {
                event,
                at_ms: now_ms(),
            }])
        })
        .await
    }

    /// Records that `identity` asked for a build to stop, and why, in one commit. Refused for
    /// a build that has ended.
    pub async fn request_cancel(
        &self,
        id: BuildId,
        reason: String,
        identity: String,
    ) -> Result<BuildView> {
        self.append(id, |view| {
            let cancel = Event::Cancelled {
                reason: reason.clone(),
            };
            view.check(&cancel)
                .map_err(|source| Error::Illegal { id, source })?;
            let at_ms = now_ms();
            Ok(vec![
                Record::Requested(OperatorRequest {
                    action: OperatorAction::Cancel,
                    identity,
                    at_ms,
                }),
                Record::CancelRequested { reason, at_ms },
            ])
        })
        .await
    }

    /// Starts the next attempt of a failed or cancelled build, recording that `identity`
    /// asked for it, in one commit. Refused for a build that is not failed or cancelled.
    pub async fn retry(&self, id: BuildId, identity: String) -> Result<BuildView> {
        self.append(id, |view| {
            view.check(&Event::Retried)
                .map_err(|source| Error::Illegal { id, source })?;
            let at_ms = now_ms();
            Ok(vec![
                Record::Requested(OperatorRequest {
                    action: OperatorAction::Retry,
                    identity,
                    at_ms,
                }),
                Record::Transition {
                    event: Event::Retried,
                    at_ms,
                },
            ])
        })
        .await
    }

    /// Records the trace of the build's current attempt, so that a restart continues it.
    pub async fn traced(&self, id: BuildId, trace_id: String, span_id: String) -> Result<()> {
        self.append_with(
            id,
            |view, _| {
                Ok(vec![Record::Traced {
                    attempt: view.attempt,
                    trace_id,
                    span_id,
                }])
            },
            |_| (),
        )
        .await
    }

    async fn append(
        &self,
        id: BuildId,
        make: impl FnOnce(&BuildView) -> Result<Vec<Record>>,
    ) -> Result<BuildView> {
        self.append_with(id, |view, _| make(view), BuildView::clone)
            .await
    }

    /// Appends the records `make` gives (it may also give log bytes they name), and returns
    /// what `answer` takes from the build's view after them (no copy of the view unless it
    /// takes one: a log append, the hot path, takes nothing).
    async fn append_with<R>(
        &self,
        id: BuildId,
        make: impl FnOnce(&BuildView, &mut Vec<LogBytes>) -> Result<Vec<Record>>,
        answer: impl FnOnce(&BuildView) -> R,
    ) -> Result<R> {
        let (pending, answer) = {
            let (mut heads, mut view) = self.lock_head(id)?;
            if self.is_removed(id) {
                return Err(Error::NotFound(id));
            }
            let mut logs = Vec::new();
            let records = make(&view, &mut logs)?;
            let mut numbered = Vec::with_capacity(records.len());
            for record in records {
                let seq = view.next_seq;
                view.apply(seq, &record)
                    .map_err(|source| Error::Fold { id, source })?;
                numbered.push((seq, record));
            }
            let pending = self.enqueue(&view, numbered, logs)?;
            let answer = answer(&view);
            heads.insert(id, view);
            (pending, answer)
        };
        self.wait(pending).await?;
        Ok(answer)
    }

    /// Encodes records and the new summary and queues them for the committer. Called with the
    /// heads lock held, so the queue order is the sequence order of every build.
    fn enqueue(
        &self,
        view: &BuildView,
        records: Vec<(u64, Record)>,
        logs: Vec<LogBytes>,
    ) -> Result<Ticket> {
        let mut batch = WriteBatch::default();
        let id = view.id;
        let encode_err = |seq, e| Error::Record {
            id,
            seq,
            source: Arc::new(e),
        };
        if let Some((first, _)) = records.first() {
            // Everything before the first record queued is durable (or in flight, and then
            // the frontier is set already).
            self.shared.frontier.lock().entry(id).or_insert(*first);
        }
        for (seq, record) in records {
            let bytes = record.encode().map_err(|e| encode_err(seq, e))?;
            batch.records.push((id, seq, bytes));
        }
        let summary = view
            .encoded_summary()
            .map_err(|e| encode_err(view.next_seq, e))?;
        batch.put_summary(id, summary, view.finished_at_ms());
        self.committer.queue(&self.shared, logs, batch, false)
    }

    async fn wait(&self, pending: Ticket) -> Result<()> {
        let result = pending.wait().await;
        if result.is_err() {
            // What we queued may not be on disk: forget the in-memory heads and refold from
            // the store on next use.
            self.lock_heads().clear();
        }
        result
    }

    fn is_removed(&self, id: BuildId) -> bool {
        self.shared.removed.lock().contains(&id)
    }

    fn lock_damaged(&self) -> MutexGuard<'_, HashMap<BuildId, Damage>> {
        self.shared.damaged.lock()
    }

    fn lock_heads(&self) -> MutexGuard<'_, HashMap<BuildId, BuildView>> {
        self.shared.heads.lock()
    }

    /// The heads lock and build `id`'s current view. A build this process has not appended
    /// to yet is folded from the store before the lock is taken, so appenders of other builds
    /// never wait on the store.
    fn lock_head(
        &self,
        id: BuildId,
    ) -> Result<(MutexGuard<'_, HashMap<BuildId, BuildView>>, BuildView)> {
        let loaded = if self.lock_heads().contains_key(&id) {
            None
        } else {
            self.view(id)?
        };
        let heads = self.lock_heads();
        let view = match heads.get(&id) {
            Some(view) => view.clone(),
            None => loaded.ok_or(Error::NotFound(id))?,
        };
        Ok((heads, view))
    }

    /// Waits until everything appended before this call is durable (an empty commit).
    pub async fn barrier(&self) -> Result<()> {
        self.empty_commit(false).await
    }

    /// Folds everything durable into the store's long-term form now (a write-ahead log into
    /// sled), between two commits: a clean stop calls it last, so the next start has nothing
    /// to replay.
    pub async fn checkpoint(&self) -> Result<()> {
        self.empty_commit(true).await
    }

    async fn empty_commit(&self, checkpoint: bool) -> Result<()> {
        self.committer
            .queue(&self.shared, Vec::new(), WriteBatch::default(), checkpoint)?
            .wait()
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::Phase;
    use crate::record::{self, BuilderProgress};
    use crate::store::StoreWrite;
    use crate::testing::{new_build, spec};

    #[tokio::test]
    async fn a_build_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let id = BuildId::new();
        {
            let journal = Journal::open(dir.path()).unwrap();
            crate::testing::create_build(&journal, id).await;
            journal.transition(id, Event::Admitted).await.unwrap();
            journal.transition(id, Event::Resolved).await.unwrap();
            assert_eq!(journal.log(id, b"one\n".to_vec()).await.unwrap(), 0);
            assert_eq!(journal.log(id, b"two\n".to_vec()).await.unwrap(), 4);
        }
        let journal = crate::testing::when_unlocked(|| Journal::open(dir.path()));
        let view = journal.view(id).unwrap().unwrap();
        assert_eq!(view.phase(), Phase::CheckingCache);
        assert_eq!(view.log_len, 8);
        assert_eq!(journal.unfinished().unwrap().len(), 1);
        assert_eq!(journal.summaries().unwrap()[0].phase, Phase::CheckingCache);
    }

    #[tokio::test]
    async fn an_illegal_transition_is_refused_and_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let id = new_build(&journal).await;
        let err = journal.transition(id, Event::Built).await.unwrap_err();
        assert!(matches!(err, Error::Illegal { .. }), "{err}");
        assert_eq!(journal.records(id, 0).unwrap().len(), 1);
        assert!(matches!(
            journal.transition(BuildId::new(), Event::Resolved).await,
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            journal.create(id, spec(), "b".into(), "w".into()).await,
            Err(Error::Exists(_))
        ));
    }

    #[tokio::test]
    async fn a_stale_summary_is_rebuilt_from_the_records() {
        let dir = tempfile::tempdir().unwrap();
        let id = BuildId::new();
        {
            let store = SledStore::open(dir.path()).unwrap();
            let created = Record::Created {
                spec: spec(),
                base_ref: "b".into(),
                workspace_ref: "w".into(),
                at_ms: 1,
            };
            let admitted = Record::Transition {
                event: Event::Admitted,
                at_ms: 2,
            };
            let view = BuildView::fold(id, [(0, &created)]).unwrap();
            let mut batch = WriteBatch::default();
            batch.records.push((id, 0, created.encode().unwrap()));
            batch.records.push((id, 1, admitted.encode().unwrap()));
            // The summary says Queued at seq 0: one record behind.
            batch
                .summaries
                .push((id, record::encode(&view.summary()).unwrap()));
            batch
                .summaries
                .push((BuildId::new(), vec![record::FORMAT_VERSION]));
            store.write(batch).unwrap();
            store.sync().unwrap();
        }
        let journal = crate::testing::when_unlocked(|| Journal::open(dir.path()));
        let summaries = journal.summaries().unwrap();
        assert_eq!(summaries.len(), 1, "orphan summary dropped");
        assert_eq!(summaries[0].phase, Phase::Resolving);
        assert_eq!(summaries[0].last_seq, 1);
    }

    #[tokio::test]
    async fn unfinished_builds_come_from_the_index_and_a_store_without_one_gets_it() {
        let dir = tempfile::tempdir().unwrap();
        let (queued, running, done) = (BuildId::new(), BuildId::new(), BuildId::new());
        {
            let journal = Journal::open(dir.path()).unwrap();
            for id in [queued, running, done] {
                crate::testing::create_build(&journal, id).await;
            }
            for event in [Event::Admitted, Event::Resolved] {
                journal.transition(running, event).await.unwrap();
            }
            for event in [Event::Admitted, Event::Resolved, Event::CacheHit] {
                journal.transition(done, event).await.unwrap();
            }
            let ids: Vec<BuildId> = journal.unfinished().unwrap().iter().map(|v| v.id).collect();
            assert_eq!(ids, [queued, running]);
        }
        // A store as a release before the index left it: no index at all.
        let dropped = crate::testing::when_unlocked(|| store::drop_index_tree(dir.path(), true));
        assert!(dropped);
        let journal = crate::testing::when_unlocked(|| Journal::open(dir.path()));
        assert_eq!(journal.shared.store.unfinished().unwrap(), None);
        let ids: Vec<BuildId> = journal.unfinished().unwrap().iter().map(|v| v.id).collect();
        assert_eq!(ids, [queued, running], "found from the summaries");
        assert_eq!(
            journal.shared.store.unfinished().unwrap(),
            Some(vec![queued, running]),
            "and the index completed"
        );
        let cancel = Event::Cancelled {
            reason: "no longer wanted".into(),
        };
        journal.transition(queued, cancel).await.unwrap();
        let ids: Vec<BuildId> = journal.unfinished().unwrap().iter().map(|v| v.id).collect();
        assert_eq!(ids, [running]);
    }

    #[tokio::test]
    async fn retention_reads_the_index_of_finished_builds_and_drops_stale_entries() {
        let dir = tempfile::tempdir().unwrap();
        let (done, failed, running) = (BuildId::new(), BuildId::new(), BuildId::new());
        let indexed = |journal: &Journal| -> Vec<BuildId> {
            let entries = journal.shared.store.finished_before(i64::MAX).unwrap();
            entries.unwrap().into_iter().map(|(_, id)| id).collect()
        };
        {
            let journal = Journal::open(dir.path()).unwrap();
            for id in [done, failed, running] {
                crate::testing::create_build(&journal, id).await;
                journal.transition(id, Event::Admitted).await.unwrap();
            }
            let fail = || Event::Failed { reason: "r".into() };
            journal.transition(done, Event::Resolved).await.unwrap();
            journal.transition(done, Event::CacheHit).await.unwrap();
            journal.transition(failed, fail()).await.unwrap();
            let ended_at = journal
                .view(done)
                .unwrap()
                .unwrap()
                .finished_at_ms()
                .unwrap();
            assert_eq!(
                journal.ended_before(i64::MAX).await.unwrap(),
                [done, failed]
            );
            assert!(journal.ended_before(ended_at).await.unwrap().is_empty());
            // Retried: its entry is stale, and the sweep that finds it drops it.
            journal.retry(failed, "sre".into()).await.unwrap();
            assert_eq!(indexed(&journal), [done, failed]);
            assert_eq!(journal.ended_before(i64::MAX).await.unwrap(), [done]);
            assert_eq!(indexed(&journal), [done]);
            journal.remove(done).await.unwrap();
            assert!(indexed(&journal).is_empty(), "removed with its build");
            journal.transition(failed, fail()).await.unwrap();
            assert_eq!(indexed(&journal), [failed], "ended again: indexed again");
        }
        // A store as a release before the index left it: no index at all.
        let dropped = crate::testing::when_unlocked(|| store::drop_index_tree(dir.path(), false));
        assert!(dropped);
        let journal = crate::testing::when_unlocked(|| Journal::open(dir.path()));
        assert_eq!(
            journal.shared.store.finished_before(i64::MAX).unwrap(),
            None
        );
        assert_eq!(
            journal.ended_before(i64::MAX).await.unwrap(),
            [failed],
            "from the summaries"
        );
        assert_eq!(indexed(&journal), [failed], "and the index completed");
        assert_ne!(
            journal.view(running).unwrap().unwrap().phase(),
            Phase::Failed
        );
    }

    #[tokio::test]
    async fn crashes_lose_no_finished_build_from_the_index_even_two_in_a_row() {
        let dir = tempfile::tempdir().unwrap();
        let [live, first, second] = ["live", "first", "second"].map(|d| dir.path().join(d));
        let journal = Journal::open(&live).unwrap();
        let id = new_build(&journal).await;
        journal
            .transition(id, Event::Cancelled { reason: "r".into() })
            .await
            .unwrap();
        // The service dies with the build's summary and index entry only in memory, waiting
        // for a checkpoint; the start after it refolds both, and the service dies again at
        // once.
        crate::testing::crash_copy(&live, &first);
        let repaired = Journal::open(&first).unwrap();
        assert_eq!(repaired.summaries().unwrap()[0].phase, Phase::Cancelled);
        assert_eq!(repaired.ended_before(i64::MAX).await.unwrap(), [id]);
        crate::testing::crash_copy(&first, &second);
        let again = Journal::open(&second).unwrap();
        assert_eq!(again.summaries().unwrap()[0].phase, Phase::Cancelled);
        assert_eq!(again.ended_before(i64::MAX).await.unwrap(), [id]);
        drop((journal, repaired));
    }

    #[tokio::test]
    async fn a_finished_build_can_be_removed_and_an_unfinished_one_cannot() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let (done, running) = (BuildId::new(), BuildId::new());
        for id in [done, running] {
            crate::testing::create_build(&journal, id).await;
            journal.log(id, b"x\n".to_vec()).await.unwrap();
        }
        journal
            .transition(done, Event::Failed { reason: "r".into() })
            .await
            .unwrap();
        assert!(journal.remove(running).await.is_err());
        journal.remove(done).await.unwrap();
        assert!(journal.view(done).unwrap().is_none());
        assert!(
            matches!(
                journal.transition(done, Event::Retried).await,
                Err(Error::NotFound(_))
            ),
            "nothing is appended to a removed build"
        );
        assert_eq!(journal.summaries().unwrap().len(), 1);
        assert_eq!(journal.records(running, 0).unwrap().len(), 2);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_store_stays_bounded_when_old_builds_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let round = |journal: Journal| async move {
            let mut ids = Vec::new();
            for _ in 0..100 {
                let id = new_build(&journal).await;
                for _ in 0..10 {
                    journal.log(id, vec![b'x'; 2048]).await.unwrap();
                }
                journal
                    .transition(id, Event::Failed { reason: "r".into() })
                    .await
                    .unwrap();
                ids.push(id);
            }
            for id in ids {
                journal.remove(id).await.unwrap();
            }
            journal.size_on_disk().unwrap()
        };
        let mut sizes = Vec::new();
        for _ in 0..60 {
            sizes.push(round(journal.clone()).await);
        }
        // Each round writes ~2 MiB of logs and removes them. Sled takes them at checkpoints
        // (one every eight rounds or so), lays out its file in 512 KiB segments and reuses
        // them: its size climbs over the first few checkpoints to where it settles (about
        // 6 MiB here), then swings by a few segments. After that warm-up (40 rounds) it must
        // not grow past it by more than two rounds' worth; a store that kept what was removed
        // would grow by 40 MiB in the last twenty.
        println!("store size after each round: {sizes:?}");
        let (warm_up, after) = sizes.split_at(40);
        let settled = warm_up.iter().max().copied().unwrap_or(0);
        let peak = after.iter().max().copied().unwrap_or(0);
        assert!(
            peak < settled + (4 << 20),
            "the store grew from {settled} to {peak} bytes after the warm-up: {sizes:?}"
        );
        assert!(journal.summaries().unwrap().is_empty());
    }

    /// 32 builds appending at once share group commits.
    async fn builds_share_commits() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let journal = journal.clone();
            tasks.push(tokio::spawn(async move {
                let id = new_build(&journal).await;
                for i in 0..10 {
                    journal
                        .log(id, format!("{i}\n").into_bytes())
                        .await
                        .unwrap();
                }
                id
            }));
        }
        for task in tasks {
            let id = task.await.unwrap();
            let view = journal.view(id).unwrap().unwrap();
            assert_eq!(view.log_len, 20);
            assert_eq!(view.next_seq, 11);
            let logged: Vec<u8> = journal
                .records(id, 1)
                .unwrap()
                .into_iter()
                .flat_map(|(_, record)| match record {
                    Record::Log { data, .. } => data,
                    other => panic!("not a log record: {other:?}"),
                })
                .collect();
            assert_eq!(logged, b"0\n1\n2\n3\n4\n5\n6\n7\n8\n9\n", "in order");
        }
        // 32 builds x 11 appends, but far fewer syncs.
        let commits = *journal.commits().borrow();
        assert!(commits < 352 / 2, "{commits} commits for 352 appends");
    }

    #[tokio::test]
    async fn concurrent_builds_share_commits() {
        builds_share_commits().await;
    }

    /// Where an append may commit itself (a worker of a multi-threaded runtime), appends
    /// queued meanwhile still share the committer thread's group commits.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_builds_share_commits_beside_appends_that_commit_themselves() {
        builds_share_commits().await;
    }

    /// Queues a log append to `id` by hand and returns its ticket unwaited: on a
    /// multi-threaded runtime with nothing else under way, the append holds the committer's
    /// turn until the ticket is waited for or dropped.
    fn held_append(journal: &Journal, id: BuildId, data: &[u8]) -> Ticket {
        let (mut heads, mut view) = journal.lock_head(id).unwrap();
        let seq = view.next_seq;
        let record = Record::Log {
            offset: view.log_len,
            data: data.to_vec(),
        };
        view.apply(seq, &record).unwrap();
        let ticket = journal
            .enqueue(&view, vec![(seq, record)], Vec::new())
            .unwrap();
        heads.insert(id, view);
        ticket
    }

    /// An append whose caller would commit it but drops it unwritten (a best-effort write that
    /// is not waited for) is written by the committer thread, before what was queued after it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_append_dropped_before_its_caller_committed_it_is_still_written() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let id = new_build(&journal).await;
        let ticket = held_append(&journal, id, b"first\n");
        assert!(
            matches!(ticket, Ticket::Lead(_)),
            "a lone append on a multi-threaded runtime commits itself"
        );
        // Queued while the dropped one still holds the turn: written after it.
        let next = journal.clone();
        let second = tokio::spawn(async move { next.log(id, b"second\n".to_vec()).await });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            !second.is_finished(),
            "nothing is written before the held turn"
        );
        drop(ticket);
        let second = tokio::time::timeout(std::time::Duration::from_secs(10), second)
            .await
            .expect("the dropped append gives the turn back");
        assert_eq!(second.unwrap().unwrap(), 6);
        let logged: Vec<(u64, Record)> = journal.records(id, 1).unwrap();
        assert!(
            matches!(
                &logged[..],
                [
                    (1, Record::Log { offset: 0, .. }),
                    (2, Record::Log { offset: 6, .. })
                ]
            ),
            "{logged:?}"
        );
        drop(journal);
        let reopened = Journal::open(dir.path()).unwrap();
        assert_eq!(
            reopened.view(id).unwrap().unwrap().log_len,
            13,
            "both durable"
        );
    }

    /// A log append to an ended build and the build's removal, queued in that order and
    /// taken into one group commit: the build is gone, with nothing of it left behind (the
    /// store applies a batch's removals before its puts, so the group must not hold the
    /// append's record and summary beside the removal).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_append_committed_with_its_builds_removal_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let holder = new_build(&journal).await;
        let ended = new_build(&journal).await;
        journal
            .transition(ended, Event::Failed { reason: "r".into() })
            .await
            .unwrap();
        let turn = held_append(&journal, holder, b"hold\n");
        let late = {
            let journal = journal.clone();
            tokio::spawn(async move { journal.log(ended, b"late output\n".to_vec()).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let removal = {
            let journal = journal.clone();
            tokio::spawn(async move { journal.remove(ended).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!late.is_finished() && !removal.is_finished(), "both queued");
        turn.wait().await.unwrap();
        late.await.unwrap().unwrap();
        removal.await.unwrap().unwrap();
        let check = |journal: &Journal| {
            assert!(journal.view(ended).unwrap().is_none(), "no view of it");
            assert!(
                journal.records(ended, 0).unwrap().is_empty(),
                "no record of it"
            );
            let listed: Vec<BuildId> = journal.summaries().unwrap().iter().map(|s| s.id).collect();
            assert_eq!(listed, vec![holder], "only the other build is listed");
        };
        check(&journal);
        journal.checkpoint().await.unwrap();
        check(&journal);
        drop(journal);
        check(&Journal::open(dir.path()).unwrap());
    }

    #[tokio::test]
    async fn a_follower_sees_every_record_once_then_ends() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let id = new_build(&journal).await;
        journal.log(id, b"early\n".to_vec()).await.unwrap();
        let mut follower = journal.follow(id, 0);
        let writer = {
            let journal = journal.clone();
            tokio::spawn(async move {
                for i in 0..50 {
                    journal
                        .log(id, format!("{i}\n").into_bytes())
                        .await
                        .unwrap();
                }
                journal
                    .transition(id, Event::Failed { reason: "r".into() })
                    .await
                    .unwrap();
            })
        };
        let mut seqs = Vec::new();
        while let Some(next) = follower.next().await {
            seqs.push(next.unwrap().0);
        }
        writer.await.unwrap();
        assert_eq!(seqs, (0..53).collect::<Vec<u64>>());
        assert_eq!(follower.view().unwrap().phase(), Phase::Failed);

        let mut late = journal.follow(id, 50);
        let mut tail = Vec::new();
        while let Some(next) = late.next().await {
            tail.push(next.unwrap().0);
        }
        assert_eq!(tail, [50, 51, 52]);

        let mut unknown = journal.follow(BuildId::new(), 0);
        assert!(matches!(
            unknown.next().await,
            Some(Err(Error::NotFound(_)))
        ));
        assert!(unknown.next().await.is_none());
    }

    #[tokio::test]
    async fn builder_progress_commits_with_its_log_bytes_and_belongs_to_one_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let id = BuildId::new();
        let progress = |attempt, consumed| BuilderProgress {
            attempt,
            builder: "builds/ib-job-1".into(),
            consumed,
        };
        {
            let journal = Journal::open(dir.path()).unwrap();
            crate::testing::create_build(&journal, id).await;
            journal.builder_progress(id, progress(1, 0)).await.unwrap();
            let small = journal
                .log_with_progress(id, b"step 1\n".to_vec(), Some(progress(1, 7)))
                .await
                .unwrap();
            let large = journal
                .log_with_progress(
                    id,
                    vec![b'x'; INLINE_LOG_BYTES + 10],
                    Some(progress(1, 9000)),
                )
                .await
                .unwrap();
            assert_eq!((small, large), (0, 7));
            // Output that was all held back or dropped still moves the cursor.
            journal
                .log_with_progress(id, Vec::new(), Some(progress(1, 9100)))
                .await
                .unwrap();
            let err = journal
                .builder_progress(id, progress(2, 0))
                .await
                .unwrap_err();
            assert!(err.to_string().contains("attempt 2"), "{err}");
        }
        let journal = crate::testing::when_unlocked(|| Journal::open(dir.path()));
        let view = journal.view(id).unwrap().unwrap();
        assert_eq!(view.builder_progress(), Some(&progress(1, 9100)));
        assert_eq!(view.log_len, 7 + INLINE_LOG_BYTES as u64 + 10);

        journal.transition(id, Event::Admitted).await.unwrap();
        journal
            .transition(id, Event::Failed { reason: "r".into() })
            .await
            .unwrap();
        let view = journal.transition(id, Event::Retried).await.unwrap();
        assert_eq!(view.builder_progress(), None, "a new attempt starts afresh");
        journal.builder_progress(id, progress(2, 0)).await.unwrap();
        assert_eq!(
            journal.view(id).unwrap().unwrap().builder_progress(),
            Some(&progress(2, 0))
        );
    }
}
