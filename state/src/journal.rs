//! The journal: appends records to builds, makes them durable with group commit, and serves
//! only durable records back.
//!
//! Appends are checked against the build's current view (an illegal transition is refused
//! before it is written), numbered, and handed to one committer thread. The committer takes
//! every append waiting at that moment, writes them in one batch and syncs once, so many
//! concurrent builds share one fsync. An append's future resolves only after that sync.
//!
//! Written-but-not-yet-durable data is never visible: readers take a shared lock that the
//! committer holds exclusively from its write until its sync returns.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock, mpsc};

use tokio::sync::{oneshot, watch};

use crate::build::{BuildId, BuildSpec};
use crate::machine::{Event, IllegalTransition};
use crate::now_ms;
use crate::record::{self, Record};
use crate::store::{self, SledStore, Store, WriteBatch};
use crate::view::{BuildView, FoldError, Summary};

/// Most appends one group commit takes; the rest wait for the next.
const MAX_GROUP: usize = 4096;

/// Why a journal operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The store failed to write, sync or read.
    #[error("{0}")]
    Store(Arc<store::Error>),
    /// A stored record or summary does not decode.
    #[error("build {id}, record {seq}: {source}")]
    Record {
        /// The build.
        id: BuildId,
        /// The record's sequence number.
        seq: u64,
        /// What is wrong with it.
        source: Arc<record::Error>,
    },
    /// A build's records do not fold into a valid build.
    #[error("build {id}: {source}")]
    Fold {
        /// The build.
        id: BuildId,
        /// What is wrong.
        source: FoldError,
    },
    /// The build does not exist.
    #[error("build {0} does not exist")]
    NotFound(BuildId),
    /// The build exists already.
    #[error("build {0} exists already")]
    Exists(BuildId),
    /// The event is not allowed in the build's current phase.
    #[error("build {id}: {source}")]
    Illegal {
        /// The build.
        id: BuildId,
        /// The refused edge.
        source: IllegalTransition,
    },
    /// The committer thread is gone (the journal is shutting down).
    #[error("the journal is closed")]
    Closed,
}

impl From<store::Error> for Error {
    fn from(e: store::Error) -> Self {
        Error::Store(Arc::new(e))
    }
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// One append waiting for the committer.
struct Commit {
    batch: WriteBatch,
    done: oneshot::Sender<Result<()>>,
}

struct Shared {
    store: Arc<dyn Store>,
    /// Held shared by readers, exclusively by the committer from write to sync.
    visible: RwLock<()>,
    /// Views of builds appended to by this process, including not-yet-durable records.
    heads: Mutex<HashMap<BuildId, BuildView>>,
    /// Builds removed by this process: no record may be appended to them again (an append
    /// racing a removal would otherwise leave records without their build). Taken after
    /// `heads`.
    removed: Mutex<std::collections::HashSet<BuildId>>,
    /// Bumped after every durable group commit.
    generation: watch::Sender<u64>,
}

/// The durable journal of every build. Cheap to clone; the store closes when the last clone
/// is dropped (after the committer has finished every queued commit).
#[derive(Clone)]
pub struct Journal {
    committer: Arc<Committer>,
    shared: Arc<Shared>,
}

/// The committer thread's queue; dropping it drains the queue and joins the thread.
struct Committer {
    queue: Option<mpsc::Sender<Commit>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Committer {
    fn send(&self, commit: Commit) -> Result<()> {
        self.queue
            .as_ref()
            .ok_or(Error::Closed)?
            .send(commit)
            .map_err(|_| Error::Closed)
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.queue = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Journal {
    /// Opens the journal stored in `dir` (sled), repairing summaries from records.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::with_store(Arc::new(SledStore::open(dir)?))
    }

    /// Opens a journal over any store, repairing summaries from records.
    pub fn with_store(store: Arc<dyn Store>) -> Result<Self> {
        let (generation, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            store,
            visible: RwLock::new(()),
            heads: Mutex::new(HashMap::new()),
            removed: Mutex::new(std::collections::HashSet::new()),
            generation,
        });
        repair_summaries(&*shared.store)?;
        let (commits, queue) = mpsc::channel();
        let for_thread = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("journal-commit".into())
            .spawn(move || commit_loop(&for_thread, &queue))
            .map_err(|e| Error::Store(Arc::new(store::Error::Sled(sled::Error::Io(e)))))?;
        let committer = Arc::new(Committer {
            queue: Some(commits),
            thread: Some(thread),
        });
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
        let pending = {
            let mut heads = self.lock_heads();
            if heads.contains_key(&id) || self.read_store(|s| s.last_seq(id))?.is_some() {
                return Err(Error::Exists(id));
            }
            let view =
                BuildView::fold(id, [(0, &record)]).map_err(|source| Error::Fold { id, source })?;
            let pending = self.enqueue(&view, vec![(0, record)])?;
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

    /// Records that someone asked for a build to stop. Refused for a build that has ended.
    pub async fn request_cancel(&self, id: BuildId, reason: String) -> Result<BuildView> {
        self.append(id, |view| {
            let cancel = Event::Cancelled {
                reason: reason.clone(),
            };
            view.check(&cancel)
                .map_err(|source| Error::Illegal { id, source })?;
            Ok(vec![Record::CancelRequested {
                reason,
                at_ms: now_ms(),
            }])
        })
        .await
    }

    /// Removes a finished build and its log for good (retention). Refused for a build that has
    /// not ended.
    pub async fn remove(&self, id: BuildId) -> Result<()> {
        let pending = {
            let mut heads = self.lock_heads();
            let view = match heads.get(&id) {
                Some(view) => view.clone(),
                None => self.view(id)?.ok_or(Error::NotFound(id))?,
            };
            if !view.phase().is_final() {
                return Err(Error::Illegal {
                    id,
                    source: crate::machine::IllegalTransition {
                        phase: view.phase(),
                        event: "removed",
                    },
                });
            }
            heads.remove(&id);
            self.shared
                .removed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id);
            let (done, wait) = oneshot::channel();
            let batch = WriteBatch {
                removed_builds: vec![id],
                ..WriteBatch::default()
            };
            self.committer.send(Commit { batch, done })?;
            wait
        };
        self.wait(pending).await
    }

    /// Appends bytes to a build's log; returns the offset they start at.
    pub async fn log(&self, id: BuildId, data: Vec<u8>) -> Result<u64> {
        let mut offset = 0;
        self.append(id, |view| {
            offset = view.log_len;
            Ok(vec![Record::Log { offset, data }])
        })
        .await?;
        Ok(offset)
    }

    async fn append(
        &self,
        id: BuildId,
        make: impl FnOnce(&BuildView) -> Result<Vec<Record>>,
    ) -> Result<BuildView> {
        let (pending, view) = {
            let mut heads = self.lock_heads();
            if self.is_removed(id) {
                return Err(Error::NotFound(id));
            }
            let mut view = match heads.get(&id) {
                Some(view) => view.clone(),
                None => self.view(id)?.ok_or(Error::NotFound(id))?,
            };
            let records = make(&view)?;
            let mut numbered = Vec::with_capacity(records.len());
            for record in records {
                let seq = view.next_seq;
                view.apply(seq, &record)
                    .map_err(|source| Error::Fold { id, source })?;
                numbered.push((seq, record));
            }
            let pending = self.enqueue(&view, numbered)?;
            heads.insert(id, view.clone());
            (pending, view)
        };
        self.wait(pending).await?;
        Ok(view)
    }

    /// Encodes records and the new summary and queues them for the committer. Called with the
    /// heads lock held, so the queue order is the sequence order of every build.
    fn enqueue(
        &self,
        view: &BuildView,
        records: Vec<(u64, Record)>,
    ) -> Result<oneshot::Receiver<Result<()>>> {
        let id = view.id;
        let encode_err = |seq, e| Error::Record {
            id,
            seq,
            source: Arc::new(e),
        };
        let mut batch = WriteBatch::default();
        for (seq, record) in records {
            let bytes = record.encode().map_err(|e| encode_err(seq, e))?;
            batch.records.push((id, seq, bytes));
        }
        let summary = record::encode(&view.summary()).map_err(|e| encode_err(view.next_seq, e))?;
        batch.summaries.push((id, summary));
        let (done, wait) = oneshot::channel();
        self.committer.send(Commit { batch, done })?;
        Ok(wait)
    }

    async fn wait(&self, pending: oneshot::Receiver<Result<()>>) -> Result<()> {
        let result = pending.await.unwrap_or(Err(Error::Closed));
        if result.is_err() {
            // What we queued may not be on disk: forget the in-memory heads and refold from
            // the store on next use.
            self.lock_heads().clear();
        }
        result
    }

    fn is_removed(&self, id: BuildId) -> bool {
        self.shared
            .removed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&id)
    }

    fn lock_heads(&self) -> std::sync::MutexGuard<'_, HashMap<BuildId, BuildView>> {
        self.shared.heads.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read_store<T>(&self, f: impl FnOnce(&dyn Store) -> Result<T, store::Error>) -> Result<T> {
        let _visible = self
            .shared
            .visible
            .read()
            .unwrap_or_else(|p| p.into_inner());
        Ok(f(&*self.shared.store)?)
    }

    /// A build's durable records from `from_seq` on, in order.
    pub fn records(&self, id: BuildId, from_seq: u64) -> Result<Vec<(u64, Record)>> {
        decode_records(id, self.read_store(|s| s.records(id, from_seq))?)
    }

    /// Whether a build has durable records (one key lookup, no fold).
    pub fn exists(&self, id: BuildId) -> Result<bool> {
        Ok(self.read_store(|s| s.last_seq(id))?.is_some())
    }

    /// The durable view of a build, folded from its records.
    pub fn view(&self, id: BuildId) -> Result<Option<BuildView>> {
        let records = self.records(id, 0)?;
        if records.is_empty() {
            return Ok(None);
        }
        BuildView::fold(id, records.iter().map(|(seq, r)| (*seq, r)))
            .map(Some)
            .map_err(|source| Error::Fold { id, source })
    }

    /// Every build's summary, newest first.
    pub fn summaries(&self) -> Result<Vec<Summary>> {
        self.read_store(|s| s.summaries())?
            .into_iter()
            .map(|(id, bytes)| {
                record::decode(&bytes).map_err(|e| Error::Record {
                    id,
                    seq: u64::MAX,
                    source: Arc::new(e),
                })
            })
            .collect()
    }

    /// Every build not yet in a final phase, oldest first: what a restart resumes.
    pub fn unfinished(&self) -> Result<Vec<BuildView>> {
        let mut views = Vec::new();
        for summary in self.summaries()?.into_iter().rev() {
            if !summary.phase.is_final()
                && let Some(view) = self.view(summary.id)?
            {
                views.push(view);
            }
        }
        Ok(views)
    }

    /// Bytes the store takes on disk.
    pub fn size_on_disk(&self) -> Result<u64> {
        self.read_store(|s| s.size_on_disk())
    }

    /// A receiver that changes after every durable commit: wake on it, then read.
    pub fn commits(&self) -> watch::Receiver<u64> {
        self.shared.generation.subscribe()
    }

    /// Waits until everything appended before this call is durable (an empty commit).
    pub async fn barrier(&self) -> Result<()> {
        let (done, wait) = oneshot::channel();
        self.committer.send(Commit {
            batch: WriteBatch::default(),
            done,
        })?;
        wait.await.unwrap_or(Err(Error::Closed))
    }
}

impl Journal {
    /// Follows a build's durable records from `from_seq` on: what is stored now, then each
    /// record as it becomes durable, ending after the record that puts the build in a final
    /// phase. No gap, no duplicate, and a slow follower holds up nobody.
    pub fn follow(&self, id: BuildId, from_seq: u64) -> Follower {
        Follower {
            journal: self.clone(),
            commits: self.commits(),
            id,
            from_seq,
            read_seq: 0,
            view: None,
            buffer: VecDeque::new(),
            ended: false,
        }
    }
}

/// A reader that tails one build's journal; see [`Journal::follow`].
pub struct Follower {
    journal: Journal,
    commits: watch::Receiver<u64>,
    id: BuildId,
    from_seq: u64,
    read_seq: u64,
    view: Option<BuildView>,
    buffer: VecDeque<(u64, Record)>,
    ended: bool,
}

impl Follower {
    /// The next record, waiting for it if need be; `None` once the build has ended and every
    /// record was returned. The first call fails with [`Error::NotFound`] for an unknown build.
    pub async fn next(&mut self) -> Option<Result<(u64, Record)>> {
        loop {
            if let Some(record) = self.buffer.pop_front() {
                return Some(Ok(record));
            }
            if self.ended {
                return None;
            }
            // Mark the current generation seen before reading, so a commit that lands after
            // the read wakes us.
            self.commits.borrow_and_update();
            let records = match self.journal.records(self.id, self.read_seq) {
                Ok(records) => records,
                Err(e) => return Some(Err(e)),
            };
            if records.is_empty() {
                if self.view.is_none() {
                    self.ended = true;
                    return Some(Err(Error::NotFound(self.id)));
                }
                if self.commits.changed().await.is_err() {
                    return Some(Err(Error::Closed));
                }
                continue;
            }
            for (seq, record) in records {
                let id = self.id;
                let folded = match &mut self.view {
                    None => BuildView::fold(id, [(seq, &record)]).map(|v| self.view = Some(v)),
                    Some(view) => view.apply(seq, &record),
                };
                if let Err(source) = folded {
                    self.ended = true;
                    return Some(Err(Error::Fold { id, source }));
                }
                self.read_seq = seq + 1;
                if seq >= self.from_seq {
                    self.buffer.push_back((seq, record));
                }
            }
            // Ended means ended as of the newest durable record: a retried build's earlier
            // final phase does not stop a reader from seeing the attempts after it.
            if self.view.as_ref().is_some_and(|v| v.phase().is_final()) {
                self.ended = true;
            }
        }
    }

    /// The build as folded from every record read so far.
    pub fn view(&self) -> Option<&BuildView> {
        self.view.as_ref()
    }
}

fn decode_records(id: BuildId, raw: Vec<(u64, Vec<u8>)>) -> Result<Vec<(u64, Record)>> {
    raw.into_iter()
        .map(|(seq, bytes)| {
            Record::decode(&bytes)
                .map(|r| (seq, r))
                .map_err(|e| Error::Record {
                    id,
                    seq,
                    source: Arc::new(e),
                })
        })
        .collect()
}

/// The committer: one batch and one sync for every append waiting at that moment.
fn commit_loop(shared: &Shared, queue: &mpsc::Receiver<Commit>) {
    while let Ok(first) = queue.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(more) => group.push(more),
                Err(_) => break,
            }
        }
        let mut batch = WriteBatch::default();
        let mut waiters = Vec::with_capacity(group.len());
        for commit in group {
            batch.records.extend(commit.batch.records);
            batch.summaries.extend(commit.batch.summaries);
            batch
                .removed_summaries
                .extend(commit.batch.removed_summaries);
            batch.removed_builds.extend(commit.batch.removed_builds);
            waiters.push(commit.done);
        }
        let result = {
            let _exclusive = shared.visible.write().unwrap_or_else(|p| p.into_inner());
            let wrote = if batch.is_empty() {
                Ok(())
            } else {
                shared.store.write(batch)
            };
            wrote
                .and_then(|()| shared.store.sync())
                .map_err(Error::from)
        };
        if let Err(e) = &result {
            tracing::error!(error = %e, "journal commit failed");
        }
        shared.generation.send_modify(|g| *g += 1);
        for waiter in waiters {
            let _ = waiter.send(result.clone());
        }
    }
}

/// Makes every summary agree with its build's records: missing, stale or unreadable summaries
/// are refolded; summaries of builds without records are dropped. A build whose records do not
/// fold is reported and left alone (its records are never rewritten).
fn repair_summaries(store: &dyn Store) -> Result<()> {
    let mut batch = WriteBatch::default();
    let ids = store.journal_ids()?;
    for &id in &ids {
        let Some(last_seq) = store.last_seq(id)? else {
            continue;
        };
        let current = store
            .summary(id)?
            .and_then(|bytes| record::decode::<Summary>(&bytes).ok())
            .filter(|s| s.last_seq == last_seq);
        if current.is_some() {
            continue;
        }
        let records = match decode_records(id, store.records(id, 0)?) {
            Ok(records) => records,
            Err(e) => {
                tracing::error!(build_id = %id, error = %e, "journal record unreadable; build left as it is");
                continue;
            }
        };
        match BuildView::fold(id, records.iter().map(|(seq, r)| (*seq, r))) {
            Ok(view) => {
                tracing::info!(build_id = %id, "rebuilt the build's summary from its journal");
                let bytes = record::encode(&view.summary()).map_err(|e| Error::Record {
                    id,
                    seq: last_seq,
                    source: Arc::new(e),
                })?;
                batch.summaries.push((id, bytes));
            }
            Err(source) => {
                tracing::error!(build_id = %id, error = %source, "journal does not fold; build left as it is")
            }
        }
    }
    for (id, _) in store.summaries()? {
        if ids.binary_search(&id).is_err() {
            batch.removed_summaries.push(id);
        }
    }
    if !batch.is_empty() {
        store.write(batch)?;
        store.sync()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::BuildSource;
    use crate::machine::Phase;

    fn spec() -> BuildSpec {
        BuildSpec {
            source: BuildSource::Reference {
                reference: "alpine".into(),
            },
            force_rebuild: false,
            triggered_by: "test".into(),
            supervisor_ref: String::new(),
            had_request_auth: false,
        }
    }

    #[tokio::test]
    async fn a_build_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let id = BuildId::new();
        {
            let journal = Journal::open(dir.path()).unwrap();
            journal
                .create(id, spec(), "b".into(), "w".into())
                .await
                .unwrap();
            journal.transition(id, Event::Admitted).await.unwrap();
            journal.transition(id, Event::Resolved).await.unwrap();
            assert_eq!(journal.log(id, b"one\n".to_vec()).await.unwrap(), 0);
            assert_eq!(journal.log(id, b"two\n".to_vec()).await.unwrap(), 4);
        }
        let journal = Journal::open(dir.path()).unwrap();
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
        let id = BuildId::new();
        journal
            .create(id, spec(), "b".into(), "w".into())
            .await
            .unwrap();
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
        let journal = Journal::open(dir.path()).unwrap();
        let summaries = journal.summaries().unwrap();
        assert_eq!(summaries.len(), 1, "orphan summary dropped");
        assert_eq!(summaries[0].phase, Phase::Resolving);
        assert_eq!(summaries[0].last_seq, 1);
    }

    #[tokio::test]
    async fn a_finished_build_can_be_removed_and_an_unfinished_one_cannot() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let (done, running) = (BuildId::new(), BuildId::new());
        for id in [done, running] {
            journal
                .create(id, spec(), "b".into(), "w".into())
                .await
                .unwrap();
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
                let id = BuildId::new();
                journal
                    .create(id, spec(), "b".into(), "w".into())
                    .await
                    .unwrap();
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
        for _ in 0..6 {
            sizes.push(round(journal.clone()).await);
        }
        // Each round writes ~2 MiB of logs and removes them; over four more rounds the store
        // must grow by less than one round's worth (it reuses the space).
        let growth = sizes[5].saturating_sub(sizes[1]);
        println!("store size after each round: {sizes:?}");
        assert!(
            growth < 2 << 20,
            "the store grew by {growth} bytes over 4 rounds: {sizes:?}"
        );
        assert!(journal.summaries().unwrap().is_empty());
    }

    #[tokio::test]
    async fn concurrent_builds_share_commits() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let journal = journal.clone();
            tasks.push(tokio::spawn(async move {
                let id = BuildId::new();
                journal
                    .create(id, spec(), "b".into(), "w".into())
                    .await
                    .unwrap();
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
        }
        // 32 builds x 11 appends, but far fewer syncs.
        assert!(*journal.commits().borrow() < 352);
    }

    #[tokio::test]
    async fn a_follower_sees_every_record_once_then_ends() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let id = BuildId::new();
        journal
            .create(id, spec(), "b".into(), "w".into())
            .await
            .unwrap();
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
}
