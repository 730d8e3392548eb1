//! The one narrow seam between the journal and the disk. [`Store`] speaks bytes under two
//! keyspaces (records by build and sequence, summaries by build) and keeps each build's log
//! bytes in an append-only segment file; [`SledStore`] is the implementation (sled for the
//! keyspaces, plain files for the segments), and the only file that names sled.
//!
//! Why log bytes are not sled values: measured on this machine, 200 sled values of 64 KiB
//! took 1.58× their size on disk and 5.6 ms per durable insert (sled keeps large values in
//! blob files of their own). A segment is the log itself: it grows by exactly the bytes
//! written, costs one `fdatasync` per commit, and replays at the speed of `pread`.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::build::BuildId;

/// The disk failed us.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The embedded database reported an error.
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    /// A key that this store did not write.
    #[error("store: malformed key of {len} bytes in {keyspace}")]
    BadKey {
        /// Which keyspace.
        keyspace: &'static str,
        /// Its length.
        len: usize,
    },
    /// The store's file system is (nearly) full: the write was refused before anything was
    /// written, so that the records that end builds still fit.
    #[error(
        "store: no room for {what} in {}: {free} bytes are free there, and {reserve} are kept free for the journal's records",
        path.display()
    )]
    DiskFull {
        /// The store's directory (or its segments').
        path: PathBuf,
        /// Bytes free.
        free: u64,
        /// What was refused.
        what: String,
        /// Bytes the refused write had to leave free.
        reserve: u64,
    },
    /// A log segment file could not be written, synced, read or removed.
    #[error("store: log segment {path}: {source}")]
    Segment {
        /// The segment file.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
}

/// Bytes a log append leaves free on the store's file system at least, so that the records
/// which end a build (its failure, say) still fit when build output has filled the disk.
pub const RESERVED_BYTES: u64 = 4 << 20;

/// Bytes a new build leaves free at least: below this, new builds are refused while running
/// ones can still end (their records are small and need no room of their own).
pub const NEW_BUILD_RESERVED_BYTES: u64 = 2 << 20;

/// Refuses a write of `needed` bytes (`what`) into `dir` that would leave less than
/// `reserve` bytes free on its file system.
fn ensure_room(dir: &Path, what: &str, needed: u64, reserve: u64) -> Result<(), Error> {
    let free = free_bytes(dir).or_else(|| free_bytes(dir.parent()?));
    match free {
        Some(free) if free < needed + reserve => Err(Error::DiskFull {
            path: dir.to_owned(),
            free,
            what: what.to_owned(),
            reserve,
        }),
        _ => Ok(()),
    }
}

impl Error {
    /// The I/O error underneath, if the file system refused us.
    pub fn io(&self) -> Option<&std::io::Error> {
        match self {
            Error::Segment { source, .. } => Some(source),
            Error::Sled(sled::Error::Io(e)) => Some(e),
            _ => None,
        }
    }

    /// The file this error is about, if it names one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Error::Segment { path, .. } | Error::DiskFull { path, .. } => Some(path),
            _ => None,
        }
    }

    /// Whether the file system ran out of space (or quota).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, Error::DiskFull { .. })
            || self.io().is_some_and(|e| {
                e.kind() == std::io::ErrorKind::StorageFull
                || e.raw_os_error() == Some(28) // ENOSPC
                || e.raw_os_error() == Some(122) // EDQUOT
            })
    }
}

/// What a record counts for against a batch's `max_bytes` at least: small records take more
/// memory decoded than stored.
pub const RECORD_FLOOR_BYTES: usize = 128;

/// Bytes free for an unprivileged writer on the file system holding `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: statvfs(3) with a NUL-terminated path and a buffer of the right type; the buffer
    // is read only when the call succeeded.
    let stat = unsafe {
        if libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) != 0 {
            return None;
        }
        stat.assume_init()
    };
    Some(stat.f_bavail as u64 * stat.f_frsize as u64)
}

/// Writes that go to disk together.
#[derive(Debug, Default)]
pub struct WriteBatch {
    /// Records to append: build, sequence number, encoded record.
    pub records: Vec<(BuildId, u64, Vec<u8>)>,
    /// Summaries to put: build, encoded summary.
    pub summaries: Vec<(BuildId, Vec<u8>)>,
    /// Builds whose summary goes away.
    pub removed_summaries: Vec<BuildId>,
    /// Builds whose records, summary and log segment go away (retention).
    pub removed_builds: Vec<BuildId>,
}

/// Bytes for one build's log segment, at an offset in its log.
#[derive(Debug)]
pub struct LogBytes {
    /// The build.
    pub id: BuildId,
    /// Where the bytes start in the build's log.
    pub offset: u64,
    /// The bytes.
    pub bytes: Vec<u8>,
}

impl WriteBatch {
    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
            && self.summaries.is_empty()
            && self.removed_summaries.is_empty()
            && self.removed_builds.is_empty()
    }

    /// Adds everything `other` holds to this batch.
    pub fn extend(&mut self, other: WriteBatch) {
        self.records.extend(other.records);
        self.summaries.extend(other.summaries);
        self.removed_summaries.extend(other.removed_summaries);
        self.removed_builds.extend(other.removed_builds);
    }
}

/// Durable storage for journals. Records become visible at once and durable at
/// [`Store::sync`]; log bytes are durable when [`Store::append_logs`] returns, so the journal
/// writes a record naming log bytes only after they are on disk.
pub trait Store: Send + Sync + 'static {
    /// Writes log bytes into their builds' segments and makes them durable.
    fn append_logs(&self, logs: &[LogBytes]) -> Result<(), Error>;
    /// Applies a batch of records (not yet durable).
    fn write(&self, batch: WriteBatch) -> Result<(), Error>;
    /// Makes every record written so far durable.
    fn sync(&self) -> Result<(), Error>;
    /// A build's records with sequence numbers from `from_seq` on, in order, stopping after
    /// the record that brings the total size to `max_bytes` or more (at least one record;
    /// each counts as [`RECORD_FLOOR_BYTES`] at least).
    fn records(
        &self,
        id: BuildId,
        from_seq: u64,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, Error>;
    /// Up to `len` bytes of a build's log segment from `offset`; fewer only where the
    /// segment ends.
    fn read_log(&self, id: BuildId, offset: u64, len: usize) -> Result<Vec<u8>, Error>;
    /// Refuses a new build when the store's file system has less than
    /// [`NEW_BUILD_RESERVED_BYTES`] free.
    fn ensure_room_for_build(&self) -> Result<(), Error>;
    /// Removes the log segments of builds not in `keep` (left by a removal that crashed
    /// between its records and its segment). Returns how many went.
    fn prune_logs(&self, keep: &[BuildId]) -> Result<usize, Error>;
    /// The sequence number of a build's last record.
    fn last_seq(&self, id: BuildId) -> Result<Option<u64>, Error>;
    /// Every build that has records, oldest first.
    fn journal_ids(&self) -> Result<Vec<BuildId>, Error>;
    /// One build's summary.
    fn summary(&self, id: BuildId) -> Result<Option<Vec<u8>>, Error>;
    /// Every summary, newest build first.
    fn summaries(&self) -> Result<Vec<(BuildId, Vec<u8>)>, Error>;
    /// Bytes the store takes on disk.
    fn size_on_disk(&self) -> Result<u64, Error>;
}

/// [`Store`] on sled: tree `journal.v1` keyed by build id and big-endian sequence number, tree
/// `summary.v1` keyed by build id. Build ids are UUIDv7, so key order is creation order. Log
/// segments are files `logs/<build id>.log` beside sled's own files, written at the offsets
/// the journal gives (bytes past the durable length, left by a crash, are overwritten by the
/// next append and never read).
pub struct SledStore {
    db: sled::Db,
    journal: sled::Tree,
    summary: sled::Tree,
    segments: Segments,
}

/// The directory of log segments.
struct Segments {
    dir: PathBuf,
    /// Open for reading: a replay reads a segment in many small pieces.
    readers: Mutex<HashMap<BuildId, std::sync::Arc<File>>>,
}

/// Readers kept open at most; the oldest is closed first.
const MAX_OPEN_READERS: usize = 256;

impl Segments {
    fn path(&self, id: BuildId) -> PathBuf {
        self.dir.join(format!("{id}.log"))
    }

    fn err(&self, id: BuildId) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::Segment {
            path: self.path(id),
            source,
        }
    }

    /// Opens (or creates) a build's segment for writing; the folder is made on first use, so
    /// that opening a store to inspect it writes nothing.
    fn open_for_append(&self, id: BuildId) -> std::io::Result<File> {
        let open = || {
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(self.path(id))
        };
        open().or_else(|e| {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(e);
            }
            std::fs::create_dir_all(&self.dir)?;
            open()
        })
    }

    /// Writes each build's bytes at their offsets and syncs every file written, and the
    /// directory where a segment was created.
    fn append(&self, logs: &[LogBytes]) -> Result<(), Error> {
        let needed: u64 = logs.iter().map(|l| l.bytes.len() as u64).sum();
        ensure_room(
            &self.dir,
            &format!("{needed} bytes of build log"),
            needed,
            RESERVED_BYTES,
        )?;
        let mut files: HashMap<BuildId, File> = HashMap::new();
        let mut created = false;
        for LogBytes { id, offset, bytes } in logs {
            let id = *id;
            let file = match files.entry(id) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    created |= *offset == 0;
                    let file = self.open_for_append(id).map_err(self.err(id))?;
                    e.insert(file)
                }
            };
            file.write_all_at(bytes, *offset).map_err(self.err(id))?;
        }
        for (id, file) in &files {
            file.sync_data().map_err(self.err(*id))?;
        }
        if created {
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(|source| Error::Segment {
                    path: self.dir.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    fn reader(&self, id: BuildId) -> Result<Option<std::sync::Arc<File>>, Error> {
        let mut readers = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(file) = readers.get(&id) {
            return Ok(Some(file.clone()));
        }
        let file = match File::open(self.path(id)) {
            Ok(file) => std::sync::Arc::new(file),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.err(id)(e)),
        };
        if readers.len() >= MAX_OPEN_READERS {
            // UUIDv7 order is age order: close the oldest build's reader.
            if let Some(oldest) = readers.keys().min().copied() {
                readers.remove(&oldest);
            }
        }
        readers.insert(id, file.clone());
        Ok(Some(file))
    }

    fn read(&self, id: BuildId, offset: u64, len: usize) -> Result<Vec<u8>, Error> {
        let Some(file) = self.reader(id)? else {
            return Ok(Vec::new());
        };
        let mut buf = vec![0u8; len];
        let mut filled = 0;
        while filled < len {
            match file.read_at(&mut buf[filled..], offset + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.err(id)(e)),
            }
        }
        buf.truncate(filled);
        Ok(buf)
    }

    fn remove(&self, id: BuildId) -> Result<(), Error> {
        self.readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        match std::fs::remove_file(self.path(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(self.err(id)(e)),
            _ => Ok(()),
        }
    }

    /// Every build with a segment file.
    fn ids(&self) -> Result<Vec<BuildId>, Error> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(Error::Segment {
                    path: self.dir.clone(),
                    source,
                });
            }
        };
        Ok(entries
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_suffix(".log")?
                    .parse::<BuildId>()
                    .ok()
            })
            .collect())
    }

    fn size(&self) -> u64 {
        std::fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }
}

const JOURNAL_TREE: &str = "journal.v1";
/// The folder of log segments inside the store's folder.
const LOGS_DIR: &str = "logs";
const SUMMARY_TREE: &str = "summary.v1";

fn record_key(id: BuildId, seq: u64) -> [u8; 24] {
    let mut key = [0u8; 24];
    key[..16].copy_from_slice(id.as_bytes());
    key[16..].copy_from_slice(&seq.to_be_bytes());
    key
}

fn split_record_key(key: &[u8]) -> Result<(BuildId, u64), Error> {
    let bad = || Error::BadKey {
        keyspace: JOURNAL_TREE,
        len: key.len(),
    };
    let id: [u8; 16] = key
        .get(..16)
        .and_then(|k| k.try_into().ok())
        .ok_or_else(bad)?;
    let seq: [u8; 8] = key
        .get(16..)
        .and_then(|k| k.try_into().ok())
        .ok_or_else(bad)?;
    Ok((BuildId::from_bytes(id), u64::from_be_bytes(seq)))
}

fn summary_id(key: &[u8]) -> Result<BuildId, Error> {
    let id: [u8; 16] = key.try_into().map_err(|_| Error::BadKey {
        keyspace: SUMMARY_TREE,
        len: key.len(),
    })?;
    Ok(BuildId::from_bytes(id))
}

impl SledStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            // sled's own background flush is not our durability: every commit syncs itself.
            .flush_every_ms(None)
            .open()?;
        Self::from_db(db, dir)
    }

    /// Opens an existing store without writing to it: for inspecting the store of a stopped
    /// service. Fails if another process holds the store.
    pub fn open_existing(dir: &Path) -> Result<Self, Error> {
        let db = sled::Config::new()
            .path(dir)
            .create_new(false)
            .flush_every_ms(None)
            .open()?;
        Self::from_db(db, dir)
    }

    fn from_db(db: sled::Db, dir: &Path) -> Result<Self, Error> {
        Ok(Self {
            journal: db.open_tree(JOURNAL_TREE)?,
            summary: db.open_tree(SUMMARY_TREE)?,
            db,
            segments: Segments {
                dir: dir.join(LOGS_DIR),
                readers: Mutex::new(HashMap::new()),
            },
        })
    }
}

impl Store for SledStore {
    fn append_logs(&self, logs: &[LogBytes]) -> Result<(), Error> {
        self.segments.append(logs)
    }

    fn write(&self, batch: WriteBatch) -> Result<(), Error> {
        let mut records = sled::Batch::default();
        for (id, seq, value) in batch.records {
            records.insert(&record_key(id, seq)[..], value);
        }
        let mut summaries = sled::Batch::default();
        for (id, value) in batch.summaries {
            summaries.insert(&id.as_bytes()[..], value);
        }
        for id in batch.removed_summaries.iter().chain(&batch.removed_builds) {
            summaries.remove(&id.as_bytes()[..]);
        }
        for id in &batch.removed_builds {
            for key in self
                .journal
                .range(record_key(*id, 0)..=record_key(*id, u64::MAX))
                .keys()
            {
                records.remove(key?);
            }
        }
        self.journal.apply_batch(records)?;
        self.summary.apply_batch(summaries)?;
        for id in &batch.removed_builds {
            self.segments.remove(*id)?;
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), Error> {
        self.db.flush()?;
        Ok(())
    }

    fn records(
        &self,
        id: BuildId,
        from_seq: u64,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, Error> {
        let start = record_key(id, from_seq);
        let end = record_key(id, u64::MAX);
        let mut out = Vec::new();
        let mut size = 0usize;
        for entry in self.journal.range(start..=end) {
            let (key, value) = entry?;
            let (_, seq) = split_record_key(&key)?;
            size += value.len().max(RECORD_FLOOR_BYTES);
            out.push((seq, value.to_vec()));
            if size >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    fn read_log(&self, id: BuildId, offset: u64, len: usize) -> Result<Vec<u8>, Error> {
        self.segments.read(id, offset, len)
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

    fn last_seq(&self, id: BuildId) -> Result<Option<u64>, Error> {
        match self.journal.scan_prefix(id.as_bytes()).next_back() {
            Some(entry) => Ok(Some(split_record_key(&entry?.0)?.1)),
            None => Ok(None),
        }
    }

    fn journal_ids(&self) -> Result<Vec<BuildId>, Error> {
        let mut ids = Vec::new();
        let mut next = self.journal.first()?;
        while let Some((key, _)) = next {
            let (id, _) = split_record_key(&key)?;
            ids.push(id);
            // Skip the rest of this build's records in one seek.
            next = self.journal.get_gt(record_key(id, u64::MAX))?;
        }
        Ok(ids)
    }

    fn summary(&self, id: BuildId) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.summary.get(id.as_bytes())?.map(|v| v.to_vec()))
    }

    fn size_on_disk(&self) -> Result<u64, Error> {
        Ok(self.db.size_on_disk()? + self.segments.size())
    }

    fn summaries(&self) -> Result<Vec<(BuildId, Vec<u8>)>, Error> {
        self.summary
            .iter()
            .rev()
            .map(|entry| {
                let (key, value) = entry?;
                Ok((summary_id(&key)?, value.to_vec()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let seqs: Vec<u64> = store
            .records(a, 0, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(seqs, [0, 1, 2, 256, 300]);
        assert_eq!(store.records(a, 2, usize::MAX).unwrap().len(), 3);
        assert_eq!(
            store.records(a, 0, 2 * RECORD_FLOOR_BYTES).unwrap().len(),
            2,
            "stops at max_bytes"
        );
        assert_eq!(
            store.records(a, 0, 0).unwrap().len(),
            1,
            "at least one record"
        );
        assert_eq!(store.last_seq(a).unwrap(), Some(300));
        assert_eq!(store.journal_ids().unwrap(), [a, b]);
        assert_eq!(store.last_seq(BuildId::new()).unwrap(), None);
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
}
