//! Nothing undurable is ever visible, and readers never wait for a sync: with the store's sync
//! held open in the middle of each commit, every reader answers at once and shows exactly the
//! state after the last durable commit. A property test over random appends.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::Duration;

use image_builder_state::store::{
    LogBytes, SledStore, StoreRead, StoreRecovery, StoreWrite, WriteBatch,
};
use image_builder_state::testing::spec;
use image_builder_state::{BuildId, Event, Journal};
use proptest::prelude::*;

/// A sled store whose `sync` waits for the test to let it through, and that says when a
/// batch of records has been written (visible to sled's readers, not yet durable).
struct GatedStore {
    inner: SledStore,
    open: Mutex<bool>,
    opened: Condvar,
    gated: AtomicBool,
    written: Mutex<mpsc::Sender<()>>,
}

impl GatedStore {
    fn set_open(&self, open: bool) {
        *self.open.lock().unwrap() = open;
        self.opened.notify_all();
    }
}

impl StoreWrite for GatedStore {
    fn append_logs(&self, logs: &[LogBytes]) -> Result<(), image_builder_state::store::Error> {
        self.inner.append_logs(logs)
    }
    fn write(&self, batch: WriteBatch) -> Result<(), image_builder_state::store::Error> {
        let records = !batch.records.is_empty();
        self.inner.write(batch)?;
        if records && self.gated.load(Ordering::SeqCst) {
            let _ = self.written.lock().unwrap().send(());
        }
        Ok(())
    }
    fn sync(&self) -> Result<(), image_builder_state::store::Error> {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
        drop(open);
        self.inner.sync()
    }
    fn ensure_room_for_build(&self) -> Result<(), image_builder_state::store::Error> {
        self.inner.ensure_room_for_build()
    }
    fn prune_logs(&self, keep: &[BuildId]) -> Result<usize, image_builder_state::store::Error> {
        self.inner.prune_logs(keep)
    }
    fn remove_log(&self, id: BuildId) -> Result<(), image_builder_state::store::Error> {
        self.inner.remove_log(id)
    }
    fn seal_if_due(&self) -> Result<bool, image_builder_state::store::Error> {
        self.inner.seal_if_due()
    }
    fn write_sealed(&self) -> Result<(), image_builder_state::store::Error> {
        self.inner.write_sealed()
    }
    fn checkpoint(&self) -> Result<(), image_builder_state::store::Error> {
        StoreWrite::checkpoint(&self.inner)
    }
    fn complete_finished_index(
        &self,
        entries: &[image_builder_state::store::Ended],
    ) -> Result<(), image_builder_state::store::Error> {
        self.inner.complete_finished_index(entries)
    }
    fn complete_unfinished_index(
        &self,
        ids: &[BuildId],
    ) -> Result<(), image_builder_state::store::Error> {
        self.inner.complete_unfinished_index(ids)
    }
}

impl StoreRead for GatedStore {
    fn records(
        &self,
        id: BuildId,
        seqs: std::ops::Range<u64>,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, image_builder_state::store::Error> {
        self.inner.records(id, seqs, max_bytes)
    }
    fn read_log(
        &self,
        id: BuildId,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, image_builder_state::store::Error> {
        self.inner.read_log(id, offset, len)
    }
    fn last_seq(&self, id: BuildId) -> Result<Option<u64>, image_builder_state::store::Error> {
        self.inner.last_seq(id)
    }
    fn damage(&self) -> Result<Vec<(BuildId, Vec<u8>)>, image_builder_state::store::Error> {
        self.inner.damage()
    }
    fn journal_ids(&self) -> Result<Vec<BuildId>, image_builder_state::store::Error> {
        self.inner.journal_ids()
    }
    fn summary(&self, id: BuildId) -> Result<Option<Vec<u8>>, image_builder_state::store::Error> {
        self.inner.summary(id)
    }
    fn summaries(&self) -> Result<Vec<(BuildId, Vec<u8>)>, image_builder_state::store::Error> {
        self.inner.summaries()
    }
    fn size_on_disk(&self) -> Result<u64, image_builder_state::store::Error> {
        self.inner.size_on_disk()
    }
    fn unfinished(&self) -> Result<Option<Vec<BuildId>>, image_builder_state::store::Error> {
        self.inner.unfinished()
    }
    fn finished_before(
        &self,
        cutoff_ms: i64,
    ) -> Result<Option<Vec<image_builder_state::store::Ended>>, image_builder_state::store::Error>
    {
        self.inner.finished_before(cutoff_ms)
    }
}

impl StoreRecovery for GatedStore {
    fn witnessed(&self) -> Vec<(BuildId, image_builder_state::store::Witnessed)> {
        self.inner.witnessed()
    }
    fn start_witness(&self) -> Result<(), image_builder_state::store::Error> {
        self.inner.start_witness()
    }
    fn written_since_last_open(&self) -> Option<Vec<BuildId>> {
        self.inner.written_since_last_open()
    }
}

/// What readers show of one build.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    exists: bool,
    next_seq: u64,
    log_len: u64,
    listed_last_seq: Option<u64>,
    records: usize,
}

fn seen(journal: &Journal, id: BuildId) -> Seen {
    let view = journal.view(id).unwrap();
    Seen {
        exists: journal.exists(id).unwrap(),
        next_seq: view.as_ref().map_or(0, |v| v.next_seq),
        log_len: view.as_ref().map_or(0, |v| v.log_len),
        listed_last_seq: journal
            .summaries()
            .unwrap()
            .into_iter()
            .find(|s| s.id == id)
            .map(|s| s.last_seq),
        records: journal.records(id, 0).unwrap().len(),
    }
}

#[derive(Debug, Clone)]
enum Op {
    Log(usize),
    Fail,
    Retry,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1usize..20_000).prop_map(Op::Log),
        1 => Just(Op::Fail),
        1 => Just(Op::Retry),
    ]
}

/// Runs `append` with the sync held open: once its records are written, readers must answer
/// at once with `before`; after the sync, the journal moves on.
fn gated<F>(
    runtime: &tokio::runtime::Runtime,
    store: &GatedStore,
    written: &mpsc::Receiver<()>,
    journal: &Journal,
    id: BuildId,
    append: F,
) -> Result<(), TestCaseError>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let before = seen(journal, id);
    // What retention would find: the index of finished builds may name the build only once
    // its summary says it ended, after the sync.
    let indexed = |store: &GatedStore| {
        let entries = store.inner.finished_before(i64::MAX).unwrap();
        entries.unwrap_or_default().iter().any(|(_, e)| *e == id)
    };
    let indexed_before = indexed(store);
    store.set_open(false);
    let task = runtime.spawn(append);
    written
        .recv_timeout(Duration::from_secs(10))
        .expect("the committer writes the records");
    // The committer now waits in sync with the records written: readers answer at once (a
    // reader waiting for the sync would hang here, the sync being held open) and see nothing new.
    let (answer, answered) = mpsc::channel();
    let reader = journal.clone();
    std::thread::spawn(move || {
        let _ = answer.send(seen(&reader, id));
    });
    let during = answered.recv_timeout(Duration::from_secs(5));
    let indexed_during = indexed(store);
    // Let the commit through whatever the check says, so that a failing case ends cleanly.
    store.set_open(true);
    runtime.block_on(task).unwrap();
    let during = during.map_err(|_| TestCaseError::fail("a reader waited for the held sync"))?;
    prop_assert_eq!(during, before);
    prop_assert_eq!(
        indexed_during,
        indexed_before,
        "the index of finished builds changed before the sync"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn readers_never_see_what_is_not_durable_and_never_wait_for_a_sync(ops in proptest::collection::vec(op(), 1..12)) {
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (tx, written) = mpsc::channel();
        let store = Arc::new(GatedStore {
            inner: SledStore::open(dir.path()).unwrap(),
            open: Mutex::new(true),
            opened: Condvar::new(),
            gated: AtomicBool::new(true),
            written: Mutex::new(tx),
        });
        let journal = Journal::with_store(store.clone()).unwrap();
        let id = BuildId::new();
        let j = journal.clone();
        gated(&runtime, &store, &written, &journal, id, async move {
            j.create(id, spec(), "b".into(), "w".into()).await.unwrap();
        })?;
        prop_assert!(journal.exists(id).unwrap());
        for op in ops {
            let phase = journal.view(id).unwrap().unwrap().phase();
            let j = journal.clone();
            match op {
                Op::Log(n) if !phase.is_final() => gated(&runtime, &store, &written, &journal, id, async move {
                    j.log(id, vec![b'x'; n]).await.unwrap();
                })?,
                Op::Fail if !phase.is_final() => gated(&runtime, &store, &written, &journal, id, async move {
                    j.transition(id, Event::Failed { reason: "r".into() }).await.unwrap();
                })?,
                Op::Retry if phase.is_final() => gated(&runtime, &store, &written, &journal, id, async move {
                    j.transition(id, Event::Retried).await.unwrap();
                })?,
                _ => {}
            }
        }
    }
}
