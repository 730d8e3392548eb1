//! The one narrow seam between the journal and the disk. [`Store`] speaks bytes under two
//! keyspaces (records by build and sequence, summaries by build); [`SledStore`] is the sled
//! implementation, and the only file that names sled.

use std::path::Path;

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
    /// Builds whose records and summary go away (retention).
    pub removed_builds: Vec<BuildId>,
}

impl WriteBatch {
    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
            && self.summaries.is_empty()
            && self.removed_summaries.is_empty()
            && self.removed_builds.is_empty()
    }
}

/// Durable storage for journals. Writes become visible at once and durable at [`Store::sync`].
pub trait Store: Send + Sync + 'static {
    /// Applies a batch (not yet durable).
    fn write(&self, batch: WriteBatch) -> Result<(), Error>;
    /// Makes everything written so far durable.
    fn sync(&self) -> Result<(), Error>;
    /// A build's records with sequence numbers from `from_seq` on, in order.
    fn records(&self, id: BuildId, from_seq: u64) -> Result<Vec<(u64, Vec<u8>)>, Error>;
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
/// `summary.v1` keyed by build id. Build ids are UUIDv7, so key order is creation order.
pub struct SledStore {
    db: sled::Db,
    journal: sled::Tree,
    summary: sled::Tree,
}

const JOURNAL_TREE: &str = "journal.v1";
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
        Self::from_db(db)
    }

    /// Opens an existing store without writing to it: for inspecting the store of a stopped
    /// service. Fails if another process holds the store.
    pub fn open_existing(dir: &Path) -> Result<Self, Error> {
        let db = sled::Config::new()
            .path(dir)
            .create_new(false)
            .flush_every_ms(None)
            .open()?;
        Self::from_db(db)
    }

    fn from_db(db: sled::Db) -> Result<Self, Error> {
        Ok(Self {
            journal: db.open_tree(JOURNAL_TREE)?,
            summary: db.open_tree(SUMMARY_TREE)?,
            db,
        })
    }
}

impl Store for SledStore {
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
        Ok(())
    }

    fn sync(&self) -> Result<(), Error> {
        self.db.flush()?;
        Ok(())
    }

    fn records(&self, id: BuildId, from_seq: u64) -> Result<Vec<(u64, Vec<u8>)>, Error> {
        let start = record_key(id, from_seq);
        let end = record_key(id, u64::MAX);
        self.journal
            .range(start..=end)
            .map(|entry| {
                let (key, value) = entry?;
                let (_, seq) = split_record_key(&key)?;
                Ok((seq, value.to_vec()))
            })
            .collect()
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
        Ok(self.db.size_on_disk()?)
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
            .records(a, 0)
            .unwrap()
            .into_iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(seqs, [0, 1, 2, 256, 300]);
        assert_eq!(store.records(a, 2).unwrap().len(), 3);
        assert_eq!(store.last_seq(a).unwrap(), Some(300));
        assert_eq!(store.journal_ids().unwrap(), [a, b]);
        assert_eq!(store.last_seq(BuildId::new()).unwrap(), None);
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
