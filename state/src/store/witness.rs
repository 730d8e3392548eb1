//! The witness: a small file beside sled that says which records sled has made durable since
//! the store was last opened, so that a store which lost them can tell.
//!
//! Why it exists: measured here, one flipped byte in sled's log makes sled's recovery stop at
//! that byte and drop everything written after it, with no error: builds vanish, or lose their
//! last records, silently. Nothing inside sled can reveal that. The witness is written after
//! each sync (never before), so it is never ahead of what sled promised; at the next open, a
//! build whose newest record is older than what the witness saw has lost records.
//!
//! Format: fixed entries of 28 bytes, appended: build id (16), sequence number (8, little
//! endian; `u64::MAX` means the build was removed), CRC-32 of those 24 bytes (4). Reading
//! stops at the first entry whose checksum fails (a torn tail after a crash). The file is not
//! synced on each append: losing its tail to a power cut only makes the check see less, never
//! raise a false alarm. Removals are witnessed before they are written, for the same reason.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::build::BuildId;

/// The witness file's name inside the store's folder.
pub(super) const FILE_NAME: &str = "witness.v1";

const ENTRY_BYTES: usize = 28;
const REMOVED: u64 = u64::MAX;

/// The file is rewritten from the latest entry of each build once it is this large and four
/// times what those entries take.
const COMPACT_AFTER_BYTES: u64 = 1 << 20;

/// What the witness saw of one build since the store was last opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Witnessed {
    /// Its records up to this sequence number were durable.
    Through(u64),
    /// It was removed.
    Removed,
}

/// The open witness file.
pub(super) struct Witness {
    path: PathBuf,
    file: File,
    bytes: u64,
    /// The latest entry per build since the store was opened: what a compaction keeps.
    latest: HashMap<BuildId, Witnessed>,
}

fn encode(id: BuildId, seq: u64) -> [u8; ENTRY_BYTES] {
    let mut entry = [0u8; ENTRY_BYTES];
    entry[..16].copy_from_slice(id.as_bytes());
    entry[16..24].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32fast::hash(&entry[..24]);
    entry[24..].copy_from_slice(&crc.to_le_bytes());
    entry
}

fn decode(entry: &[u8]) -> Option<(BuildId, Witnessed)> {
    let (body, crc) = entry.split_at(24);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return None;
    }
    let id = BuildId::from_bytes(body[..16].try_into().ok()?);
    let seq = u64::from_le_bytes(body[16..24].try_into().ok()?);
    Some((
        id,
        if seq == REMOVED {
            Witnessed::Removed
        } else {
            Witnessed::Through(seq)
        },
    ))
}

/// Reads what the witness in `dir` saw, the latest entry per build; empty if there is none.
pub(super) fn read(dir: &Path) -> std::io::Result<HashMap<BuildId, Witnessed>> {
    let mut seen = HashMap::new();
    let mut bytes = Vec::new();
    match File::open(dir.join(FILE_NAME)) {
        Ok(mut file) => file.read_to_end(&mut bytes)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(seen),
        Err(e) => return Err(e),
    };
    for entry in bytes.chunks_exact(ENTRY_BYTES) {
        let Some((id, witnessed)) = decode(entry) else {
            break;
        };
        let keep = match (seen.get(&id), witnessed) {
            (Some(Witnessed::Through(old)), Witnessed::Through(new)) => new > *old,
            _ => true,
        };
        if keep {
            seen.insert(id, witnessed);
        }
    }
    Ok(seen)
}

impl Witness {
    /// Starts an empty witness in `dir` (what it saw before was checked by the caller),
    /// durably: a crash right after must not find the old entries again.
    pub(super) fn start(dir: &Path) -> std::io::Result<Self> {
        let path = dir.join(FILE_NAME);
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)?;
        file.sync_all()?;
        File::open(dir)?.sync_all()?;
        let file = OpenOptions::new().append(true).open(&path)?;
        Ok(Self {
            path,
            file,
            bytes: 0,
            latest: HashMap::new(),
        })
    }

    /// Records that these builds' records are durable through these sequence numbers, or
    /// that they were removed.
    pub(super) fn note(&mut self, seen: &[(BuildId, Witnessed)]) -> std::io::Result<()> {
        if seen.is_empty() {
            return Ok(());
        }
        let mut out = Vec::with_capacity(seen.len() * ENTRY_BYTES);
        for &(id, witnessed) in seen {
            let seq = match witnessed {
                Witnessed::Through(seq) => seq,
                Witnessed::Removed => REMOVED,
            };
            out.extend_from_slice(&encode(id, seq));
            match witnessed {
                Witnessed::Through(_) => self.latest.insert(id, witnessed),
                Witnessed::Removed => self.latest.remove(&id),
            };
        }
        self.file.write_all(&out)?;
        self.bytes += out.len() as u64;
        let live = (self.latest.len() * ENTRY_BYTES) as u64;
        if self.bytes > COMPACT_AFTER_BYTES.max(4 * live) {
            self.compact()?;
        }
        Ok(())
    }

    /// Rewrites the file with the latest entry of each build (a removed build needs none:
    /// its records are gone, so nothing can be found missing).
    fn compact(&mut self) -> std::io::Result<()> {
        let mut out = Vec::with_capacity(self.latest.len() * ENTRY_BYTES);
        for (&id, &witnessed) in &self.latest {
            if let Witnessed::Through(seq) = witnessed {
                out.extend_from_slice(&encode(id, seq));
            }
        }
        let temp = self.path.with_extension("compacting");
        std::fs::write(&temp, &out)?;
        std::fs::rename(&temp, &self.path)?;
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.bytes = out.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_entry_of_each_build_is_read_back_and_a_torn_tail_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (BuildId::new(), BuildId::new());
        let mut w = Witness::start(dir.path()).unwrap();
        w.note(&[(a, Witnessed::Through(3)), (b, Witnessed::Through(1))])
            .unwrap();
        w.note(&[(a, Witnessed::Through(5)), (b, Witnessed::Removed)])
            .unwrap();
        drop(w);
        let seen = read(dir.path()).unwrap();
        assert_eq!(seen[&a], Witnessed::Through(5));
        assert_eq!(seen[&b], Witnessed::Removed);

        // A torn last entry and garbage after it: the entries before still count.
        let path = dir.path().join(FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(&encode(a, 9)[..20]);
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read(dir.path()).unwrap()[&a], Witnessed::Through(5));
        bytes[ENTRY_BYTES * 2 + 3] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read(dir.path()).unwrap()[&a], Witnessed::Through(3));

        // Starting again forgets everything seen before.
        Witness::start(dir.path()).unwrap();
        assert!(read(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn compaction_keeps_the_latest_entry_of_each_live_build() {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<BuildId> = (0..10).map(|_| BuildId::new()).collect();
        let mut w = Witness::start(dir.path()).unwrap();
        let rounds = COMPACT_AFTER_BYTES as usize / (ENTRY_BYTES * ids.len()) + 10;
        for round in 0..rounds as u64 {
            let seen: Vec<_> = ids
                .iter()
                .map(|&id| (id, Witnessed::Through(round)))
                .collect();
            w.note(&seen).unwrap();
        }
        w.note(&[(ids[0], Witnessed::Removed)]).unwrap();
        let size = std::fs::metadata(dir.path().join(FILE_NAME)).unwrap().len();
        assert!(size < COMPACT_AFTER_BYTES, "{size} bytes: never compacted");
        let seen = read(dir.path()).unwrap();
        assert!(
            matches!(seen.get(&ids[0]), None | Some(Witnessed::Removed)),
            "{:?}",
            seen.get(&ids[0])
        );
        for id in &ids[1..] {
            assert_eq!(seen[id], Witnessed::Through(rounds as u64 - 1));
        }
    }
}
