//! The one narrow seam between the journal and the disk. [`Store`] speaks bytes under two
//! keyspaces (records by build and sequence, summaries by build) and keeps each build's log
//! bytes in an append-only segment file; [`SledStore`] is the implementation (sled for the
//! keyspaces, plain files for the segments): `sled_store/` is the only folder that uses sled,
//! `segments.rs` the log files, `wal.rs` the write-ahead log, `pending.rs` what waits for the
//! checkpoint.
//!
//! Why log bytes are not sled values: measured on this machine, 200 sled values of 64 KiB
//! took 1.58× their size on disk and 5.6 ms per durable insert (sled keeps large values in
//! blob files of their own). A segment is the log itself: it grows by exactly the bytes
//! written, costs one `fdatasync` per commit, and replays at the speed of `pread`.

mod pending;
mod segments;
mod sled_store;
mod wal;
mod witness;

use std::path::{Path, PathBuf};

pub use sled_store::SledStore;
#[cfg(test)]
pub(crate) use sled_store::drop_index_tree;
pub use witness::Witnessed;

use crate::build::BuildId;

/// The disk failed us.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database's files are not as it wrote them (a checksum or a structure did not
    /// hold): the data is corrupt, not merely out of reach.
    #[error("store: corrupt: {0}")]
    Corrupt(String),
    /// The database could not read or write its files.
    #[error("store: I/O error: {0}")]
    Io(#[source] std::io::Error),
    /// The database failed otherwise (an operation it does not support, a bug it reports).
    #[error("store: {0}")]
    Database(String),
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
    /// The witness file could not be read or written.
    #[error("store: witness file {path}: {source}")]
    Witness {
        /// The witness file.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
    /// The write-ahead log could not be read, written or synced.
    #[error("store: write-ahead log in {path}: {source}")]
    Wal {
        /// The store's folder.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
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
            Error::Segment { source, .. }
            | Error::Witness { source, .. }
            | Error::Wal { source, .. }
            | Error::Io(source) => Some(source),
            _ => None,
        }
    }

    /// The file this error is about, if it names one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Error::Segment { path, .. }
            | Error::Witness { path, .. }
            | Error::Wal { path, .. }
            | Error::DiskFull { path, .. } => Some(path),
            _ => None,
        }
    }

    /// Whether the data is corrupt (as opposed to the disk being busy, full or gone for a
    /// moment).
    pub fn is_corruption(&self) -> bool {
        matches!(self, Error::Corrupt(_))
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

/// What a record counts for against a batch's `max_bytes` at least: what it takes in memory
/// once decoded (with its sequence number), which is more than most take stored.
pub const RECORD_FLOOR_BYTES: usize = std::mem::size_of::<(u64, crate::record::Record)>();

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
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct WriteBatch {
    /// Records to append: build, sequence number, encoded record.
    pub records: Vec<(BuildId, u64, Vec<u8>)>,
    /// Summaries to put: build, encoded summary.
    pub summaries: Vec<(BuildId, Vec<u8>)>,
    /// Builds whose summary goes away.
    pub removed_summaries: Vec<BuildId>,
    /// Builds whose records, summary and log segment go away (retention).
    pub removed_builds: Vec<BuildId>,
    /// Damage reports to put: build, encoded report (see `journal::Damage`).
    pub damage: Vec<(BuildId, Vec<u8>)>,
    /// For each summary put here, whether its build is unfinished (what a restart resumes):
    /// the store keeps an index of unfinished builds from it, so that finding them never
    /// reads every summary. Derived like summaries, so never logged.
    #[serde(skip)]
    pub unfinished: Vec<(BuildId, bool)>,
    /// Entries of the index of finished builds by the time they ended, put (`true`) or
    /// removed (`false`): what retention reads, so that a sweep never reads every summary.
    /// Derived like summaries, so never logged and written with them: an entry a crash
    /// loses went with its build's summary, and is put again when the summary is refolded at
    /// open; one left behind is dropped by the first sweep that finds its build gone or
    /// running again.
    #[serde(skip)]
    pub finished: Vec<(Ended, bool)>,
}

/// An entry of the index of finished builds: when the build ended (ms since the epoch) and
/// which build. Ordered by time, then by build.
pub type Ended = (i64, BuildId);

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
            && self.damage.is_empty()
            && self.unfinished.is_empty()
            && self.finished.is_empty()
    }

    /// Puts a build's summary, with when the build ended (`None` while it is unfinished)
    /// for the store's indexes.
    pub fn put_summary(&mut self, id: BuildId, summary: Vec<u8>, finished_at_ms: Option<i64>) {
        self.summaries.push((id, summary));
        self.unfinished.push((id, finished_at_ms.is_none()));
        if let Some(at) = finished_at_ms {
            self.finished.push(((at, id), true));
        }
    }

    /// Adds everything `other` holds to this batch, as written after it. A build `other`
    /// removes loses what this batch held for it: a store applies a batch's removals before
    /// its puts, so a record or summary queued before the removal would otherwise outlive its
    /// build.
    pub fn extend(&mut self, other: WriteBatch) {
        if !other.removed_builds.is_empty() {
            let gone = |id: &BuildId| other.removed_builds.contains(id);
            self.records.retain(|(id, _, _)| !gone(id));
            self.summaries.retain(|(id, _)| !gone(id));
            self.damage.retain(|(id, _)| !gone(id));
            self.unfinished.retain(|(id, _)| !gone(id));
            self.finished.retain(|((_, id), put)| !(*put && gone(id)));
        }
        self.records.extend(other.records);
        self.summaries.extend(other.summaries);
        self.removed_summaries.extend(other.removed_summaries);
        self.removed_builds.extend(other.removed_builds);
        self.damage.extend(other.damage);
        self.unfinished.extend(other.unfinished);
        self.finished.extend(other.finished);
    }
}

/// Durable storage for journals, in the roles its callers use: reading what is durable
/// ([`StoreRead`]: the store inspector needs no more), writing it ([`StoreWrite`]) and what
/// an open checks ([`StoreRecovery`]). The journal holds all three. Records become visible at once and
/// durable at [`StoreWrite::sync`]; log bytes are durable when [`StoreWrite::append_logs`]
/// returns, so the journal writes a record naming log bytes only after they are on disk.
pub trait Store: StoreRead + StoreWrite + StoreRecovery + 'static {}

impl<T: StoreRead + StoreWrite + StoreRecovery + 'static> Store for T {}

/// Reading what the store holds, its indexes included.
pub trait StoreRead: Send + Sync {
    /// A build's records with sequence numbers in `seqs`, in order, stopping after the
    /// record that brings the total size to `max_bytes` or more (at least one record; each
    /// counts as [`RECORD_FLOOR_BYTES`] at least). Nothing past `seqs.end` is read.
    fn records(
        &self,
        id: BuildId,
        seqs: std::ops::Range<u64>,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, Error>;
    /// Up to `len` bytes of a build's log segment from `offset`; fewer only where the
    /// segment ends.
    fn read_log(&self, id: BuildId, offset: u64, len: usize) -> Result<Vec<u8>, Error>;
    /// The sequence number of a build's last record.
    fn last_seq(&self, id: BuildId) -> Result<Option<u64>, Error>;
    /// Every build that has records, oldest first.
    fn journal_ids(&self) -> Result<Vec<BuildId>, Error>;
    /// One build's summary.
    fn summary(&self, id: BuildId) -> Result<Option<Vec<u8>>, Error>;
    /// Every summary, newest build first.
    fn summaries(&self) -> Result<Vec<(BuildId, Vec<u8>)>, Error>;
    /// Every damage report, by build.
    fn damage(&self) -> Result<Vec<(BuildId, Vec<u8>)>, Error>;
    /// Bytes the store takes on disk.
    fn size_on_disk(&self) -> Result<u64, Error>;
    /// The builds the index of unfinished builds names, oldest first; `None` while the store
    /// has no complete index (one written before the index existed): the journal then finds
    /// them from every summary and completes the index with
    /// [`StoreWrite::complete_unfinished_index`].
    fn unfinished(&self) -> Result<Option<Vec<BuildId>>, Error>;
    /// The entries of the index of finished builds that ended before `cutoff_ms`, oldest
    /// first; `None` while the store has no complete index (one written before it existed):
    /// the journal then finds them from every summary and completes the index with
    /// [`StoreWrite::complete_finished_index`]. An entry may be stale (its build removed,
    /// or retried since): the reader checks each against the build's summary.
    fn finished_before(&self, cutoff_ms: i64) -> Result<Option<Vec<Ended>>, Error>;
}

/// Writing: records, log bytes, the indexes completed, and the checkpoints that move them
/// into long-term form.
pub trait StoreWrite: Send + Sync {
    /// Writes log bytes into their builds' segments and makes them durable.
    fn append_logs(&self, logs: &[LogBytes]) -> Result<(), Error>;
    /// Applies a batch of records (not yet durable).
    fn write(&self, batch: WriteBatch) -> Result<(), Error>;
    /// Makes every record written so far durable.
    fn sync(&self) -> Result<(), Error>;
    /// Seals what is durable so far for a checkpoint into the store's long-term form (a
    /// write-ahead log into sled) when one is due, so that an open has little to replay.
    /// Quick; returns whether sealed data waits for [`StoreWrite::write_sealed`]. Call it
    /// between commits, never in the middle of one.
    fn seal_if_due(&self) -> Result<bool, Error>;
    /// Writes what [`StoreWrite::seal_if_due`] sealed into the long-term form: slow, so call
    /// it off the commit path. Nothing to do when nothing is sealed.
    fn write_sealed(&self) -> Result<(), Error>;
    /// Everything durable so far into the long-term form, now, whether due or not (a clean
    /// stop).
    fn checkpoint(&self) -> Result<(), Error>;
    /// Refuses a new build when the store's file system has less than
    /// [`NEW_BUILD_RESERVED_BYTES`] free.
    fn ensure_room_for_build(&self) -> Result<(), Error>;
    /// Removes the log segment of `id` if there is one (a removal cut short by a crash).
    fn remove_log(&self, id: BuildId) -> Result<(), Error>;
    /// Removes the log segments of builds not in `keep` (left by a removal that crashed
    /// between its records and its segment). Returns how many went.
    fn prune_logs(&self, keep: &[BuildId]) -> Result<usize, Error>;
    /// Completes the index of unfinished builds with `ids`, found from every summary.
    fn complete_unfinished_index(&self, ids: &[BuildId]) -> Result<(), Error>;
    /// Completes the index of finished builds with `entries`, found from every summary.
    fn complete_finished_index(&self, entries: &[Ended]) -> Result<(), Error>;
}

/// What an open checks: the witness of what was made durable before it.
pub trait StoreRecovery: Send + Sync {
    /// What the store's witness saw made durable before this open (see `witness.rs`): the
    /// journal compares it with what the store holds now.
    fn witnessed(&self) -> Vec<(BuildId, Witnessed)>;
    /// Starts witnessing afresh, once what [`StoreRecovery::witnessed`] returned was checked
    /// and any damage it showed is durable. Until then nothing is witnessed.
    fn start_witness(&self) -> Result<(), Error>;
    /// The builds written since the last open's checks (named by the witness, or by the
    /// write-ahead log replayed at this open): the only ones whose summaries may lag their
    /// records, or whose removal may have left a log segment behind. `None` when the store
    /// cannot tell, and every build must be checked.
    fn written_since_last_open(&self) -> Option<Vec<BuildId>>;
}
