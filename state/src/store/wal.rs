//! The store's write-ahead log: what makes a group commit cost one `fdatasync`.
//!
//! Why it exists: a sled flush took about 1 ms here, 14× a raw `fdatasync` of the same bytes
//! (sled writes out whole IO buffers and syncs its own metadata besides the data just written),
//! and a group commit waited for one. Now every batch is appended to this log before sled
//! applies it, and a sync is one `fdatasync` of this file. Sled itself is flushed only at a
//! checkpoint (the log past [`CHECKPOINT_BYTES`] or [`CHECKPOINT_EVERY`] old, and when the store
//! closes): the log is sealed (the next entries go to a new file), sled takes what the sealed
//! file holds, off the commit path, is flushed, and the sealed file is removed. At open, every
//! entry is applied to sled again, in order: each is idempotent (puts and removals of whole
//! keys, removals of whole builds), so sled then holds everything the log made durable,
//! whatever sled had written of it before the crash.
//!
//! Format: files `wal.<generation, 20 digits>` in the store's folder, each a run of entries:
//! payload length (4 bytes, little endian), CRC-32 of the payload (4), the payload (one
//! [`WriteBatch`], bincode), then [`FILL`] bytes. Reading a file stops at the first entry that
//! is cut short (the fill's length, all ones, runs past any file's end) or fails its checksum:
//! a torn tail, never synced, so never acknowledged.
//!
//! Filled ahead: a file is written full of [`FILL`] an [`EXTENT`] at a time ahead of its
//! entries, so an entry overwrites blocks already allocated and written, and its `fdatasync`
//! has no file size or extent to record: a commit pays for the data alone (15–30% faster here
//! than an append; BENCHMARKS.md). The commit that passes the fill pays for the next extent.
//! The fill is not zeros: a zero header would pass its checksum as an empty entry, and a
//! binary from before the fill reads its files alike (it stops at the fill as at a torn tail).

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::WriteBatch;

/// The log is checkpointed into sled once it holds this many bytes.
pub(super) const CHECKPOINT_BYTES: u64 = 16 << 20;

/// … or once its oldest entry is this old, so a start replays little.
pub(super) const CHECKPOINT_EVERY: Duration = Duration::from_secs(30);

const PREFIX: &str = "wal.";
/// The encoding buffer kept between appends, at most.
const MAX_KEPT_BUFFER: usize = 1 << 20;
const HEADER_BYTES: usize = 8;

/// The fill is written ahead of the entries this much at a time.
pub(super) const EXTENT: u64 = 1 << 20;

/// What a file holds past its entries.
pub(super) const FILL: u8 = 0xff;

/// What the fill is written from.
static FILLED: [u8; 64 << 10] = [FILL; 64 << 10];

/// The log being written.
pub(super) struct Wal {
    dir: PathBuf,
    file: File,
    generation: u64,
    /// Where the next entry goes: every entry so far is before it.
    bytes: u64,
    /// The file's length: [`FILL`] from `bytes` on.
    filled: u64,
    /// When the first entry of this file was written.
    first_entry: Option<Instant>,
    /// The last entry's encoding, kept for the next.
    buffer: Vec<u8>,
}

/// What the logs in a folder held at open.
pub(super) struct Replay {
    /// Every intact entry, oldest first.
    pub batches: Vec<WriteBatch>,
    /// How many entries there were (kept once `batches` is taken).
    pub entries: usize,
    /// The newest generation found (0 if none).
    pub generation: u64,
    /// The files read.
    pub files: Vec<PathBuf>,
}

/// The generation a log file's name gives, if it names one.
pub(super) fn generation_of(path: &Path) -> Option<u64> {
    path.file_name()?
        .to_str()?
        .strip_prefix(PREFIX)?
        .parse()
        .ok()
}

fn invalid(path: &Path, detail: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("write-ahead log {}: {detail}", path.display()),
    )
}

/// Reads every log file in `dir`, oldest generation first.
pub(super) fn replay(dir: &Path) -> std::io::Result<Replay> {
    let mut files: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            Some((generation_of(&path)?, path))
        })
        .collect();
    files.sort();
    let mut batches = Vec::new();
    for (_, path) in &files {
        let mut bytes = Vec::new();
        File::open(path)?.read_to_end(&mut bytes)?;
        let mut rest = &bytes[..];
        while rest.len() >= HEADER_BYTES {
            let (header, body) = rest.split_at(HEADER_BYTES);
            let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
            let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
            let Some(payload) = body.get(..len) else {
                break;
            };
            if crc32fast::hash(payload) != crc {
                break;
            }
            // A checksummed entry that does not decode was written by a different format:
            // refuse to open rather than skip what was acknowledged.
            let (batch, _) =
                bincode::serde::decode_from_slice(payload, bincode::config::standard())
                    .map_err(|e| invalid(path, e))?;
            batches.push(batch);
            rest = &body[len..];
        }
    }
    Ok(Replay {
        entries: batches.len(),
        batches,
        generation: files.last().map_or(0, |(g, _)| *g),
        files: files.into_iter().map(|(_, p)| p).collect(),
    })
}

/// Removes sealed log files whose entries sled holds, flushed. Their removal is made durable
/// by the next file's start (it syncs the folder); a crash before that replays them again,
/// before the newer files, which is harmless: every entry is idempotent.
pub(super) fn remove(sealed: &[PathBuf]) -> std::io::Result<()> {
    for path in sealed {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

impl Wal {
    /// Starts log file `generation` in `dir`, durably named in the folder, then removes
    /// `older` (their entries must be in sled, flushed, before this is called).
    pub(super) fn start(dir: &Path, generation: u64, older: &[PathBuf]) -> std::io::Result<Self> {
        let path = dir.join(format!("{PREFIX}{generation:020}"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)?;
        let mut wal = Self {
            dir: dir.to_owned(),
            file,
            generation,
            bytes: 0,
            filled: 0,
            first_entry: None,
            buffer: Vec::new(),
        };
        wal.fill_ahead(EXTENT)?;
        wal.file.sync_all()?;
        File::open(dir)?.sync_all()?;
        remove(older)?;
        Ok(wal)
    }

    /// Writes [`FILL`] past the file's end up to the next multiple of [`EXTENT`] at or past
    /// `end` (not durable: the next sync makes it so, with the entry that needed it).
    fn fill_ahead(&mut self, end: u64) -> std::io::Result<()> {
        let to = end.next_multiple_of(EXTENT);
        while self.filled < to {
            let n = usize::try_from(to - self.filled).map_or(FILLED.len(), |n| n.min(FILLED.len()));
            self.file.write_all_at(&FILLED[..n], self.filled)?;
            self.filled += n as u64;
        }
        Ok(())
    }

    /// Appends `batch` (not yet durable: see [`Wal::sync`]).
    pub(super) fn append(&mut self, batch: &WriteBatch) -> std::io::Result<()> {
        // Encoded behind room for its header, in a buffer kept from one entry to the next.
        let mut entry = std::mem::take(&mut self.buffer);
        entry.clear();
        entry.resize(HEADER_BYTES, 0);
        bincode::serde::encode_into_std_write(batch, &mut entry, bincode::config::standard())
            .map_err(|e| invalid(&self.path(), e))?;
        let payload = &entry[HEADER_BYTES..];
        let len = u32::try_from(payload.len())
            .map_err(|_| invalid(&self.path(), "a batch of 4 GiB or more"))?;
        let crc = crc32fast::hash(payload);
        entry[..4].copy_from_slice(&len.to_le_bytes());
        entry[4..HEADER_BYTES].copy_from_slice(&crc.to_le_bytes());
        let end = self.bytes + entry.len() as u64;
        if end > self.filled {
            self.fill_ahead(end)?;
        }
        self.file.write_all_at(&entry, self.bytes)?;
        self.bytes = end;
        self.first_entry.get_or_insert_with(Instant::now);
        // A large batch's buffer is not kept.
        if entry.capacity() <= MAX_KEPT_BUFFER {
            self.buffer = entry;
        }
        Ok(())
    }

    /// Makes every entry appended so far durable: one `fdatasync`.
    pub(super) fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Whether the log should be checkpointed into sled.
    pub(super) fn due(&self) -> bool {
        self.bytes >= CHECKPOINT_BYTES
            || self
                .first_entry
                .is_some_and(|t| t.elapsed() >= CHECKPOINT_EVERY)
    }

    /// Whether anything was appended since the last checkpoint.
    pub(super) fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// Starts the next file, durably named, and returns this one's path: remove it (with
    /// [`remove`]) once sled holds, flushed, every entry it has. Until then a start replays
    /// both, oldest first.
    pub(super) fn seal(&mut self) -> std::io::Result<PathBuf> {
        let old = self.path();
        *self = Self::start(&self.dir, self.generation + 1, &[])?;
        Ok(old)
    }

    fn path(&self) -> PathBuf {
        self.dir.join(format!("{PREFIX}{:020}", self.generation))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::BuildId;

    fn batch(n: u64) -> WriteBatch {
        WriteBatch {
            records: vec![(BuildId::new(), n, vec![n as u8; 10])],
            ..WriteBatch::default()
        }
    }

    /// The numbers of the batches the logs in `dir` replay, in order.
    fn replayed(dir: &Path) -> Vec<u64> {
        replay(dir)
            .unwrap()
            .batches
            .iter()
            .map(|b| b.records[0].1)
            .collect()
    }

    #[test]
    fn entries_read_back_in_order_across_files_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::start(dir.path(), 1, &[]).unwrap();
        wal.append(&batch(1)).unwrap();
        wal.append(&batch(2)).unwrap();
        // A crash between sled's flush and the removal leaves two files: both replay.
        let kept = wal.path();
        let mut next = Wal::start(dir.path(), 2, &[]).unwrap();
        next.append(&batch(3)).unwrap();
        let last = next.bytes;
        next.append(&batch(4)).unwrap();
        next.sync().unwrap();
        let end = next.bytes;
        drop((wal, next));
        // Cut the last entry short, as a crash in the middle of its write would: its payload
        // is still the fill it was.
        let newest = dir.path().join(format!("{PREFIX}{:020}", 2));
        let file = OpenOptions::new().write(true).open(&newest).unwrap();
        let payload = last + HEADER_BYTES as u64;
        let torn = vec![FILL; usize::try_from(end - payload).unwrap()];
        file.write_all_at(&torn, payload).unwrap();
        let replay = replay(dir.path()).unwrap();
        let seqs: Vec<u64> = replay.batches.iter().map(|b| b.records[0].1).collect();
        assert_eq!(seqs, [1, 2, 3]);
        assert_eq!(replay.generation, 2);
        assert_eq!(replay.files, [kept, newest]);
    }

    #[test]
    fn a_flipped_byte_ends_the_file_there() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::start(dir.path(), 7, &[]).unwrap();
        for n in 1..=3 {
            wal.append(&batch(n)).unwrap();
        }
        let (path, end) = (wal.path(), wal.bytes);
        drop(wal);
        let mut bytes = std::fs::read(&path).unwrap();
        let second = usize::try_from(end).unwrap() / 3 + HEADER_BYTES + 2;
        bytes[second] ^= 0x40;
        std::fs::write(&path, bytes).unwrap();
        assert_eq!(replayed(dir.path()), [1]);
    }

    #[test]
    fn entries_overwrite_the_fill_ahead_and_past_an_extent_more_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::start(dir.path(), 1, &[]).unwrap();
        let path = wal.path();
        let length = || std::fs::metadata(&path).unwrap().len();
        assert_eq!(length(), EXTENT, "a new file is the fill, one extent long");
        let mut n = 0;
        while wal.bytes <= EXTENT {
            n += 1;
            wal.append(&batch(n)).unwrap();
            if wal.bytes < EXTENT {
                assert_eq!(length(), EXTENT, "entries within the fill keep the length");
            }
        }
        assert_eq!(
            length(),
            2 * EXTENT,
            "the entry past the fill wrote the next extent"
        );
        let bytes = std::fs::read(&path).unwrap();
        let end = usize::try_from(wal.bytes).unwrap();
        assert!(bytes[end..].iter().all(|b| *b == FILL));
        wal.sync().unwrap();
        assert_eq!(
            replayed(dir.path()),
            (1..=n).collect::<Vec<_>>(),
            "the fill is no entry"
        );
    }

    #[test]
    fn a_sealed_file_replays_before_the_next_until_it_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::start(dir.path(), 1, &[]).unwrap();
        wal.append(&batch(1)).unwrap();
        assert!(!wal.is_empty());
        let sealed = wal.seal().unwrap();
        assert!(wal.is_empty() && !wal.due());
        wal.append(&batch(2)).unwrap();
        assert_eq!(replayed(dir.path()), [1, 2]);
        remove(&[sealed]).unwrap();
        assert_eq!(replayed(dir.path()), [2]);
        assert_eq!(replay(dir.path()).unwrap().generation, 2);
    }
}
