//! Log segments: one append-only file per build beside sled's files.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use super::{Error, LogBytes, RESERVED_BYTES, ensure_room};
use crate::build::BuildId;

/// The directory of log segments.
pub(super) struct Segments {
    pub(super) dir: PathBuf,
    /// Open for reading: a replay reads a segment in many small pieces.
    readers: Mutex<HashMap<BuildId, std::sync::Arc<File>>>,
}

/// Readers kept open at most; the oldest is closed first.
const MAX_OPEN_READERS: usize = 256;

impl Segments {
    /// The segments in `dir`.
    pub(super) fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            readers: Mutex::new(HashMap::new()),
        }
    }

    pub(super) fn path(&self, id: BuildId) -> PathBuf {
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
    pub(super) fn append(&self, logs: &[LogBytes]) -> Result<(), Error> {
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
        let mut readers = self.readers.lock();
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

    pub(super) fn read(&self, id: BuildId, offset: u64, len: usize) -> Result<Vec<u8>, Error> {
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

    pub(super) fn remove(&self, id: BuildId) -> Result<(), Error> {
        self.readers.lock().remove(&id);
        match std::fs::remove_file(self.path(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(self.err(id)(e)),
            _ => Ok(()),
        }
    }

    /// Every build with a segment file.
    pub(super) fn ids(&self) -> Result<Vec<BuildId>, Error> {
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

    pub(super) fn size(&self) -> u64 {
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
