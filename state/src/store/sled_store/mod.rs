//! [`SledStore`]: the [`Store`](super::Store) on sled and log segment files; this folder is the only place
//! that names sled (`checkpoint.rs`: the write-ahead log's replay and checkpoints, and the
//! live write path through the log and the pending overlay).

mod checkpoint;
mod index;
#[cfg(test)]
pub(crate) use index::drop_index_tree;
mod keys;
mod read;

use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::pending::Pending;
use super::segments::Segments;
use super::wal::{self, Wal};
use super::witness::{self, Witness, Witnessed};
use super::{
    Ended, Error, LogBytes, NEW_BUILD_RESERVED_BYTES, StoreRead, StoreRecovery, StoreWrite,
    WriteBatch, ensure_room,
};
use crate::build::BuildId;
use index::{complete_index, index_batch, set_index_key};
use keys::{
    DAMAGE_TREE, FINISHED_TREE, JOURNAL_TREE, LOGS_DIR, RUN_BYTES, RUN_RECORDS, SUMMARY_TREE,
    UNFINISHED_TREE, encode_run, finished_key, record_key, run_key, split_record_key,
    stored_records,
};

/// sled's errors as the store's own: only this folder knows sled.
impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Io(e) => Error::Io(e),
            e @ sled::Error::Corruption { .. } => Error::Corrupt(e.to_string()),
            e => Error::Database(e.to_string()),
        }
    }
}

/// [`Store`](super::Store) on sled: tree `journal.v1` keyed by build id and big-endian sequence number, tree
/// `summary.v1` keyed by build id. Build ids are UUIDv7, so key order is creation order. Log
/// segments are files `logs/<build id>.log` beside sled's own files, written at the offsets
/// the journal gives (bytes past the durable length, left by a crash, are overwritten by the
/// next append and never read). Every batch goes through the write-ahead log (`wal.rs`) first
/// and its records and summaries wait in memory (`pending.rs`) for the next checkpoint, which
/// writes them into sled, off the commit path, and flushes it.
pub struct SledStore {
    db: sled::Db,
    journal: sled::Tree,
    summary: sled::Tree,
    /// The index of unfinished builds: an empty value under each one's id, and
    /// [`INDEX_COMPLETE`] once it names them all.
    unfinished: sled::Tree,
    /// The index of finished builds by the time they ended: an empty value under each
    /// [`finished_key`], and [`INDEX_COMPLETE`] once it names them all.
    finished: sled::Tree,
    damage: sled::Tree,
    segments: Segments,
    dir: PathBuf,
    /// What the witness saw before this open.
    witnessed: Vec<(BuildId, Witnessed)>,
    /// The witness, once started (never for a read-only store).
    witness: Mutex<Option<Witness>>,
    /// The newest record written per build since the last sync: witnessed after the next.
    unwitnessed: Mutex<HashMap<BuildId, u64>>,
    /// The write-ahead log (none for a read-only store, whose writes go to sled alone).
    wal: Mutex<Option<Wal>>,
    /// Records and summaries written since the last checkpoint (only with a log).
    pending: Mutex<Pending>,
    /// Log files sealed for the checkpoint under way: removed once sled holds them.
    sealed_logs: Mutex<Vec<PathBuf>>,
    /// Held while a sealed layer is written into sled: one checkpoint at a time.
    folding: Mutex<()>,
    /// Taken by a removal, and by a checkpoint for each build it writes (see
    /// `write_sealed_layer`). Taken after the log, before the pending layers.
    removal_gate: Mutex<()>,
    /// The builds written since the last open's checks, if the store can tell.
    written_since_last_open: Option<Vec<BuildId>>,
}

/// The most sled keeps of the store in memory (its page cache). sled's default, 1 GiB, let
/// the service's memory grow with every log it journaled until that much: the journal is
/// read mostly at its tail, and a cold read comes from the page cache of the kernel.
pub const CACHE_BYTES: u64 = 16 << 20;

impl SledStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .cache_capacity(CACHE_BYTES)
            // sled's own background flush is not our durability: the write-ahead log is, and
            // checkpoints flush sled.
            .flush_every_ms(None)
            .open()?;
        let created = !db.was_recovered();
        let mut store = Self::from_db(db, dir)?;
        if created {
            // A new store has no builds: its indexes are complete.
            store.complete_unfinished_index(&[])?;
            store.complete_finished_index(&[])?;
        }
        let replay = store.replay()?;
        // What the log held is in sled now: flush it, then start the next log file and
        // remove the old ones.
        if replay.entries > 0 {
            store.db.flush()?;
        }
        let wal =
            Wal::start(dir, replay.generation + 1, &replay.files).map_err(store.wal_error())?;
        store.wal = Mutex::new(Some(wal));
        Ok(store)
    }

    /// Opens an existing store without checkpointing or logging: for inspecting the store of
    /// a stopped service. What its write-ahead log holds is applied to sled in memory, so the
    /// store reads as the service left it. Fails if another process holds the store.
    pub fn open_existing(dir: &Path) -> Result<Self, Error> {
        let db = sled::Config::new()
            .path(dir)
            .create_new(false)
            .flush_every_ms(None)
            .open()?;
        let mut store = Self::from_db(db, dir)?;
        store.replay()?;
        Ok(store)
    }

    fn from_db(db: sled::Db, dir: &Path) -> Result<Self, Error> {
        let witness_path = dir.join(witness::FILE_NAME);
        let witnessed: Vec<_> = witness::read(dir)
            .map_err(|source| Error::Witness {
                path: witness_path.clone(),
                source,
            })?
            .into_iter()
            .collect();
        let written_since_last_open = witness_path.exists().then(|| {
            let mut ids: Vec<BuildId> = witnessed.iter().map(|(id, _)| *id).collect();
            ids.sort();
            ids
        });
        Ok(Self {
            journal: db.open_tree(JOURNAL_TREE)?,
            summary: db.open_tree(SUMMARY_TREE)?,
            unfinished: db.open_tree(UNFINISHED_TREE)?,
            finished: db.open_tree(FINISHED_TREE)?,
            damage: db.open_tree(DAMAGE_TREE)?,
            db,
            segments: Segments::new(dir.join(LOGS_DIR)),
            dir: dir.to_owned(),
            witnessed,
            witness: Mutex::new(None),
            unwitnessed: Mutex::new(HashMap::new()),
            wal: Mutex::new(None),
            pending: Mutex::new(Pending::default()),
            sealed_logs: Mutex::new(Vec::new()),
            folding: Mutex::new(()),
            removal_gate: Mutex::new(()),
            written_since_last_open,
        })
    }

    fn witness_error(&self) -> impl FnOnce(std::io::Error) -> Error + '_ {
        |source| Error::Witness {
            path: self.dir.join(witness::FILE_NAME),
            source,
        }
    }

    fn wal_error(&self) -> impl FnOnce(std::io::Error) -> Error + '_ {
        |source| Error::Wal {
            path: self.dir.clone(),
            source,
        }
    }
}

impl Drop for SledStore {
    /// A clean close leaves nothing to replay.
    fn drop(&mut self) {
        if let Err(e) = self.checkpoint_now() {
            tracing::warn!(error = %e, "could not checkpoint the store on close; the next start replays its log");
        }
    }
}

impl StoreWrite for SledStore {
    fn append_logs(&self, logs: &[LogBytes]) -> Result<(), Error> {
        self.segments.append(logs)
    }

    fn write(&self, batch: WriteBatch) -> Result<(), Error> {
        if !batch.removed_builds.is_empty() {
            // Witnessed before they go: a crash between the two must not look like a loss.
            let removed: Vec<_> = batch
                .removed_builds
                .iter()
                .map(|&id| (id, Witnessed::Removed))
                .collect();
            let mut unwitnessed = self.unwitnessed.lock();
            for id in &batch.removed_builds {
                unwitnessed.remove(id);
            }
            if let Some(witness) = self.witness.lock().as_mut() {
                witness.note(&removed).map_err(self.witness_error())?;
            }
        }
        let written: Vec<(BuildId, u64)> = batch
            .records
            .iter()
            .map(|(id, seq, _)| (*id, *seq))
            .collect();
        self.write_logged(batch)?;
        // Only what was written: the next sync witnesses it as durable.
        let mut unwitnessed = self.unwitnessed.lock();
        for (id, seq) in written {
            let newest = unwitnessed.entry(id).or_insert(seq);
            *newest = (*newest).max(seq);
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), Error> {
        // Taken before the flush: what is written meanwhile waits for the next sync.
        let synced: Vec<_> = self
            .unwitnessed
            .lock()
            .drain()
            .map(|(id, seq)| (id, Witnessed::Through(seq)))
            .collect();
        match self.wal.lock().as_ref() {
            Some(log) => log.sync().map_err(self.wal_error())?,
            None => {
                self.db.flush()?;
            }
        }
        if let Some(witness) = self.witness.lock().as_mut() {
            witness.note(&synced).map_err(self.witness_error())?;
        }
        Ok(())
    }

    fn seal_if_due(&self) -> Result<bool, Error> {
        // A live layer full while the last one is still being written: help write that one
        // first, so at most two are held.
        let backlog = {
            let pending = self.pending.lock();
            pending.sealed().is_some() && pending.full()
        };
        if backlog {
            self.write_sealed_layer()?;
        }
        self.seal(true)
    }

    fn write_sealed(&self) -> Result<(), Error> {
        self.write_sealed_layer()
    }

    fn checkpoint(&self) -> Result<(), Error> {
        self.checkpoint_now()
    }

    fn ensure_room_for_build(&self) -> Result<(), Error> {
        let dir = self.segments.dir.parent().unwrap_or(&self.segments.dir);
        ensure_room(dir, "a new build", 0, NEW_BUILD_RESERVED_BYTES)
    }

    fn prune_logs(&self, keep: &[BuildId]) -> Result<usize, Error> {
        let mut pruned = 0;
        for id in self.segments.ids()? {
            if keep.binary_search(&id).is_err() {
                self.segments.remove(id)?;
                pruned += 1;
            }
        }
        Ok(pruned)
    }

    fn remove_log(&self, id: BuildId) -> Result<(), Error> {
        self.segments.remove(id)
    }

    fn complete_unfinished_index(&self, ids: &[BuildId]) -> Result<(), Error> {
        complete_index(&self.unfinished, ids.iter().map(|id| *id.as_bytes()))
    }

    fn complete_finished_index(&self, entries: &[Ended]) -> Result<(), Error> {
        complete_index(&self.finished, entries.iter().map(|&e| finished_key(e)))
    }
}

impl StoreRecovery for SledStore {
    fn witnessed(&self) -> Vec<(BuildId, Witnessed)> {
        self.witnessed.clone()
    }

    fn start_witness(&self) -> Result<(), Error> {
        let witness = Witness::start(&self.dir).map_err(self.witness_error())?;
        *self.witness.lock() = Some(witness);
        Ok(())
    }

    fn written_since_last_open(&self) -> Option<Vec<BuildId>> {
        self.written_since_last_open.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RECORD_FLOOR_BYTES;

    /// The write-ahead log files of a store as they were at one moment, to put back into a
    /// crash copy: a crash after a checkpoint's flush, before its log file was removed.
    struct WalFiles(Vec<(std::ffi::OsString, Vec<u8>)>);

    impl WalFiles {
        fn copy(dir: &Path) -> Self {
            let files = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| wal::generation_of(p).is_some())
                .map(|p| {
                    (
                        p.file_name().unwrap().to_owned(),
                        std::fs::read(&p).unwrap(),
                    )
                })
                .collect();
            Self(files)
        }

        fn put_back(&self, dir: &Path) {
            for (name, bytes) in &self.0 {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
        }
    }

    /// Reads of a store holding builds `a` and `b` with records 0, 1, 2, 256, 300 each.
    fn reads_back_in_order_and_alone(store: &SledStore, a: BuildId, b: BuildId, when: &str) {
        let seqs: Vec<u64> = store
            .records(a, 0..u64::MAX, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(seqs, [0, 1, 2, 256, 300], "{when}");
        assert_eq!(
            store.records(a, 2..u64::MAX, usize::MAX).unwrap(),
            [(2, vec![2]), (256, vec![0]), (300, vec![44])],
            "{when}"
        );
        assert_eq!(
            store.records(a, 1..256, usize::MAX).unwrap().len(),
            2,
            "{when}: nothing past the end"
        );
        assert_eq!(
            store
                .records(a, 0..u64::MAX, 2 * RECORD_FLOOR_BYTES)
                .unwrap()
                .len(),
            2,
            "{when}: stops at max_bytes"
        );
        assert_eq!(
            store.records(a, 0..u64::MAX, 0).unwrap().len(),
            1,
            "{when}: at least one record"
        );
        assert_eq!(store.last_seq(a).unwrap(), Some(300), "{when}");
        assert_eq!(store.journal_ids().unwrap(), [a, b], "{when}");
        assert_eq!(store.last_seq(BuildId::new()).unwrap(), None, "{when}");
    }

    #[test]
    fn records_of_one_build_read_back_in_order_and_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let (a, b) = (BuildId::new(), BuildId::new());
        let mut batch = WriteBatch::default();
        for seq in [0u64, 1, 2, 256, 300] {
            batch.records.push((a, seq, vec![seq as u8]));
            batch.records.push((b, seq, vec![0xff]));
        }
        store.write(batch).unwrap();
        store.sync().unwrap();
        reads_back_in_order_and_alone(&store, a, b, "pending");
        store.checkpoint().unwrap();
        reads_back_in_order_and_alone(&store, a, b, "in sled, as runs");
        drop(store);
        let store = SledStore::open(dir.path()).unwrap();
        reads_back_in_order_and_alone(&store, a, b, "reopened");
    }

    /// A checkpoint writes each build's records as runs of `RUN_RECORDS`: reads find
    /// every record, from any start inside a run, beside records stored one per key (a store
    /// written before runs) and records replayed from a log whose records a checkpoint had
    /// already written (a crash before the log's removal).
    #[test]
    fn records_in_runs_read_back_whole_from_any_start() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        let store = SledStore::open(&live).unwrap();
        let id = BuildId::new();
        let record = |seq: u64| vec![seq as u8; if seq.is_multiple_of(7) { 20 << 10 } else { 100 }];
        // Records 0..10 one per key, as before runs.
        let mut old = sled::Batch::default();
        for seq in 0..10 {
            old.insert(&record_key(id, seq)[..], record(seq));
        }
        store.journal.apply_batch(old).unwrap();
        let mut batch = WriteBatch::default();
        for seq in 10..200 {
            batch.records.push((id, seq, record(seq)));
        }
        store.write(batch).unwrap();
        store.sync().unwrap();
        // The log as it is before the checkpoint removes it.
        let logs = WalFiles::copy(&live);
        store.checkpoint().unwrap();
        let keys = store.journal.scan_prefix(id.as_bytes()).count();
        assert!(
            (10 + 190 / RUN_RECORDS..=10 + 190 / RUN_RECORDS + 12).contains(&keys),
            "10 single records, then 190 records in runs of {RUN_RECORDS} and 64 KiB at most: {keys} keys"
        );
        let expect =
            |from: u64| -> Vec<(u64, Vec<u8>)> { (from..200).map(|s| (s, record(s))).collect() };
        let check = |store: &SledStore, when: &str| {
            for from in [0, 5, 10, 11, 63, 64, 65, 150, 199] {
                assert_eq!(
                    store.records(id, from..u64::MAX, usize::MAX).unwrap(),
                    expect(from),
                    "{when}: from {from}"
                );
            }
            let mut paged = Vec::new();
            let mut next = 0;
            while let Some(last) = store
                .records(id, next..u64::MAX, 50 << 10)
                .unwrap()
                .into_iter()
                .inspect(|r| paged.push(r.clone()))
                .last()
            {
                next = last.0 + 1;
            }
            assert_eq!(paged, expect(0), "{when}: read in pages");
            assert_eq!(store.last_seq(id).unwrap(), Some(199), "{when}");
        };
        check(&store, "after the checkpoint");
        // A crash after the checkpoint's flush, before its log file went: a start replays
        // the log over the runs that hold its records.
        let crashed = dir.path().join("crashed");
        crate::testing::crash_copy(&live, &crashed);
        logs.put_back(&crashed);
        drop(store);
        let reopened = SledStore::open(&crashed).unwrap();
        check(&reopened, "after a replay over runs");
        assert_eq!(
            reopened.journal.scan_prefix(id.as_bytes()).count(),
            keys,
            "each record in one key"
        );
    }

    /// A run that does not parse, found by a log replay at open: the store opens, and reads
    /// of that build fail there as corruption (the journal reports the build damaged) instead
    /// of the whole store refusing to open.
    #[test]
    fn a_replay_over_a_run_that_does_not_parse_still_opens() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        let store = SledStore::open(&live).unwrap();
        let (id, other) = (BuildId::new(), BuildId::new());
        let mut batch = WriteBatch::default();
        for seq in 0..4 {
            batch.records.push((id, seq, vec![seq as u8]));
            batch.records.push((other, seq, vec![seq as u8]));
        }
        store.write(batch).unwrap();
        store.sync().unwrap();
        let logs = WalFiles::copy(&live);
        store.checkpoint().unwrap();
        store
            .journal
            .insert(&run_key(id, 3)[..], &b"not a run"[..])
            .unwrap();
        store.db.flush().unwrap();
        let crashed = dir.path().join("crashed");
        crate::testing::crash_copy(&live, &crashed);
        logs.put_back(&crashed);
        drop(store);
        let reopened = SledStore::open(&crashed).unwrap();
        assert!(matches!(
            reopened.records(id, 0..u64::MAX, usize::MAX),
            Err(Error::Corrupt(_))
        ));
        assert_eq!(
            reopened
                .records(other, 0..u64::MAX, usize::MAX)
                .unwrap()
                .len(),
            4,
            "the other build reads whole"
        );
    }

    /// A run whose bytes are not as written (cut short, or ending elsewhere than its key
    /// says) reads as corruption, which the journal reports as damage from that record on.
    #[test]
    fn a_run_that_does_not_parse_is_corruption() {
        let id = BuildId::new();
        let run = encode_run(&[(4, b"four"), (5, b"five")]);
        assert_eq!(
            stored_records(&run_key(id, 5), &run).unwrap(),
            [(4, &b"four"[..]), (5, &b"five"[..])]
        );
        let corrupt =
            |key: &[u8], value: &[u8]| matches!(stored_records(key, value), Err(Error::Corrupt(_)));
        assert!(corrupt(&run_key(id, 5), &run[..run.len() - 1]), "cut short");
        assert!(corrupt(&run_key(id, 5), &run[..10]), "cut in a header");
        assert!(
            corrupt(&run_key(id, 6), &run),
            "the key names another last record"
        );
        assert!(corrupt(&run_key(id, 5), &[]), "empty");
    }

    #[test]
    fn log_segments_hold_exactly_the_bytes_written_and_go_with_their_build() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let (a, b) = (BuildId::new(), BuildId::new());
        let bytes = |id, offset, text: &[u8]| LogBytes {
            id,
            offset,
            bytes: text.to_vec(),
        };
        store
            .append_logs(&[
                bytes(a, 0, b"hello "),
                bytes(b, 0, b"other"),
                bytes(a, 6, b"world\n"),
            ])
            .unwrap();
        assert_eq!(store.read_log(a, 0, 100).unwrap(), b"hello world\n");
        assert_eq!(store.read_log(a, 6, 3).unwrap(), b"wor");
        assert_eq!(store.read_log(BuildId::new(), 0, 10).unwrap(), b"");
        let size = store.size_on_disk().unwrap();
        assert!(size >= 17, "{size}");

        store
            .write(WriteBatch {
                removed_builds: vec![a],
                ..WriteBatch::default()
            })
            .unwrap();
        assert_eq!(store.read_log(a, 0, 100).unwrap(), b"");
        assert_eq!(
            store.prune_logs(&[]).unwrap(),
            1,
            "b is not among the builds kept"
        );
        assert_eq!(store.read_log(b, 0, 100).unwrap(), b"");
    }

    #[test]
    fn summaries_list_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let ids: Vec<BuildId> = (0..3).map(|_| BuildId::new()).collect();
        let mut batch = WriteBatch::default();
        for id in &ids {
            batch.summaries.push((*id, vec![1]));
        }
        store.write(batch).unwrap();
        let listed: Vec<BuildId> = store
            .summaries()
            .unwrap()
            .into_iter()
            .map(|s| s.0)
            .collect();
        assert_eq!(listed, [ids[2], ids[1], ids[0]]);
    }

    #[test]
    fn the_indexes_of_unfinished_and_finished_builds_follow_summaries_through_checkpoints_and_reopens()
     {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let (running, finishing, removed) = (BuildId::new(), BuildId::new(), BuildId::new());
        let mut batch = WriteBatch::default();
        for id in [running, finishing, removed] {
            batch.put_summary(id, vec![1], None);
        }
        store.write(batch).unwrap();
        assert_eq!(
            store.unfinished().unwrap(),
            Some(vec![running, finishing, removed]),
            "pending entries count"
        );
        store.checkpoint().unwrap();
        let mut batch = WriteBatch::default();
        batch.put_summary(finishing, vec![2], Some(7));
        batch.removed_builds.push(removed);
        store.write(batch).unwrap();
        assert_eq!(store.unfinished().unwrap(), Some(vec![running]));
        let ended = Some(vec![(7, finishing)]);
        assert_eq!(store.finished_before(8).unwrap(), ended, "pending");
        assert_eq!(store.finished_before(7).unwrap(), Some(vec![]));
        store.checkpoint().unwrap();
        assert_eq!(store.unfinished().unwrap(), Some(vec![running]));
        assert_eq!(store.finished_before(8).unwrap(), ended, "in sled");
        // Removed while pending, over an entry in sled: gone from both.
        let mut batch = WriteBatch::default();
        batch.finished.push(((7, finishing), false));
        store.write(batch).unwrap();
        assert_eq!(store.finished_before(8).unwrap(), Some(vec![]));
        let mut batch = WriteBatch::default();
        batch.finished.push(((9, running), true));
        store.write(batch).unwrap();
        drop(store);
        let reopened = SledStore::open(dir.path()).unwrap();
        assert_eq!(reopened.unfinished().unwrap(), Some(vec![running]));
        assert_eq!(
            reopened.finished_before(i64::MAX).unwrap(),
            Some(vec![(9, running)])
        );
    }

    #[test]
    fn a_build_removed_while_its_records_wait_sealed_stays_removed() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        let store = SledStore::open(&live).unwrap();
        let (kept, removed) = (BuildId::new(), BuildId::new());
        let mut batch = WriteBatch::default();
        for id in [kept, removed] {
            batch.records.push((id, 0, vec![1]));
            batch.put_summary(id, vec![2], Some(5));
        }
        store.write(batch).unwrap();
        store.sync().unwrap();
        assert!(store.seal(false).unwrap(), "sealed for a checkpoint");
        let mut batch = WriteBatch {
            removed_builds: vec![removed],
            ..WriteBatch::default()
        };
        batch.finished.push(((5, removed), false));
        batch.records.push((kept, 1, vec![3]));
        store.write(batch).unwrap();
        store.sync().unwrap();
        let check = |store: &SledStore, when: &str| {
            assert_eq!(store.last_seq(removed).unwrap(), None, "{when}");
            assert_eq!(store.summary(removed).unwrap(), None, "{when}");
            assert_eq!(store.last_seq(kept).unwrap(), Some(1), "{when}");
            assert_eq!(store.journal_ids().unwrap(), [kept], "{when}");
            assert_eq!(store.summaries().unwrap().len(), 1, "{when}");
            assert_eq!(
                store.finished_before(10).unwrap(),
                Some(vec![(5, kept)]),
                "{when}"
            );
        };
        check(&store, "sealed, not yet in sled");
        // The service dies here: both log files replay, the removal after the records.
        let crashed = dir.path().join("crashed");
        crate::testing::crash_copy(&live, &crashed);
        let reopened = SledStore::open(&crashed).unwrap();
        assert_eq!(reopened.last_seq(removed).unwrap(), None);
        assert_eq!(reopened.last_seq(kept).unwrap(), Some(1));
        drop(reopened);
        store.write_sealed().unwrap();
        check(&store, "written into sled");
        drop(store);
        let reopened = crate::testing::when_unlocked(|| SledStore::open(&live));
        check(&reopened, "reopened");
    }

    #[test]
    fn a_sync_is_durable_through_the_log_alone_and_a_start_replays_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        let store = SledStore::open(&live).unwrap();
        let (kept, removed) = (BuildId::new(), BuildId::new());
        let mut batch = WriteBatch::default();
        for seq in 0..3 {
            batch.records.push((kept, seq, vec![seq as u8]));
            batch.records.push((removed, seq, vec![9]));
        }
        batch.summaries.push((kept, vec![7]));
        store.write(batch).unwrap();
        store.sync().unwrap();
        store
            .write(WriteBatch {
                removed_builds: vec![removed],
                ..WriteBatch::default()
            })
            .unwrap();
        store.sync().unwrap();
        // The service dies here: sled was never flushed, so its files lack all of it.
        let crashed = dir.path().join("crashed");
        crate::testing::crash_copy(&live, &crashed);
        let reopened = SledStore::open(&crashed).unwrap();
        let seqs: Vec<u64> = reopened
            .records(kept, 0..u64::MAX, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(seqs, [0, 1, 2]);
        assert_eq!(
            reopened.summary(kept).unwrap(),
            None,
            "summaries are not logged: the journal refolds them at open"
        );
        assert_eq!(reopened.last_seq(removed).unwrap(), None);
        let mut named = reopened.written_since_last_open().unwrap();
        named.sort();
        let mut expected = vec![kept, removed];
        expected.sort();
        assert_eq!(named, expected, "the replayed builds are the ones to check");
        // Replayed into sled and flushed at that open: a second start replays nothing.
        drop(reopened);
        let again = SledStore::open(&crashed).unwrap();
        assert_eq!(again.last_seq(kept).unwrap(), Some(2));
        assert_eq!(
            again.written_since_last_open(),
            None,
            "no witness, nothing replayed"
        );
        drop(store);
    }
}
