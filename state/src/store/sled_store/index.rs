//! The indexes [`SledStore`](super::SledStore) keeps beside the journal (unfinished builds,
//! finished builds by the time they ended): reading one whole, completing one written before
//! it existed, and the batches that change them.

use super::keys::{INDEX_COMPLETE, UNFINISHED_TREE, finished_key, id_key, split_finished_key};
use super::{Ended, Error, SledStore};
use crate::build::BuildId;

/// Reads an index (a tree of keys alone, holding [`INDEX_COMPLETE`] once it names every
/// build it should) below `end`, with the `pending` puts (`true`) and removals over it, in
/// key order; `None` while it is incomplete. Read `pending` before calling: a checkpoint
/// between the two reads then shows an entry twice, never not at all.
pub(super) fn read_index<K: Ord>(
    tree: &sled::Tree,
    end: Option<&[u8]>,
    decode: impl Fn(&[u8]) -> Result<K, Error>,
    pending: impl IntoIterator<Item = (K, bool)>,
) -> Result<Option<Vec<K>>, Error> {
    if !tree.contains_key(INDEX_COMPLETE)? {
        return Ok(None);
    }
    let keys = match end {
        Some(end) => tree.range(..end),
        None => tree.iter(),
    };
    let mut entries = std::collections::BTreeSet::new();
    for key in keys.keys() {
        let key = key?;
        if key.as_ref() != INDEX_COMPLETE {
            entries.insert(decode(&key)?);
        }
    }
    for (entry, put) in pending {
        if put {
            entries.insert(entry);
        } else {
            entries.remove(&entry);
        }
    }
    Ok(Some(entries.into_iter().collect()))
}

/// Puts `keys` into an index and marks it complete.
pub(super) fn complete_index<K: AsRef<[u8]>>(
    tree: &sled::Tree,
    keys: impl IntoIterator<Item = K>,
) -> Result<(), Error> {
    let mut batch = index_batch(keys.into_iter().map(|key| (key, true)));
    batch.insert(INDEX_COMPLETE, &[][..]);
    Ok(tree.apply_batch(batch)?)
}

/// Puts (`true`) or removes one key of an index.
pub(super) fn set_index_key(tree: &sled::Tree, key: &[u8], put: bool) -> Result<(), Error> {
    if put {
        tree.insert(key, &[][..])?;
    } else {
        tree.remove(key)?;
    }
    Ok(())
}

/// A batch that puts (`true`) or removes keys of an index.
pub(super) fn index_batch<K: AsRef<[u8]>>(
    entries: impl IntoIterator<Item = (K, bool)>,
) -> sled::Batch {
    let mut batch = sled::Batch::default();
    for (key, put) in entries {
        if put {
            batch.insert(key.as_ref(), &[][..]);
        } else {
            batch.remove(key.as_ref());
        }
    }
    batch
}

/// The indexes as the store's roles answer them (`StoreRead`, `StoreWrite`).
impl SledStore {
    /// See `StoreRead::unfinished`.
    pub(super) fn unfinished_index(&self) -> Result<Option<Vec<BuildId>>, Error> {
        // Pending first: a checkpoint between the two reads writes the same flags to sled.
        let pending = self.pending.lock().unfinished();
        read_index(
            &self.unfinished,
            None,
            |key| id_key(UNFINISHED_TREE, key),
            pending,
        )
    }

    /// See `StoreWrite::complete_unfinished_index`.
    pub(super) fn complete_unfinished(&self, ids: &[BuildId]) -> Result<(), Error> {
        complete_index(&self.unfinished, ids.iter().map(|id| *id.as_bytes()))
    }

    /// See `StoreRead::finished_before`.
    pub(super) fn finished_index_before(
        &self,
        cutoff_ms: i64,
    ) -> Result<Option<Vec<Ended>>, Error> {
        // Pending first: a checkpoint between the two reads writes the same entries to sled.
        let pending = self.pending.lock().finished_before(cutoff_ms);
        let end = finished_key((cutoff_ms, BuildId::from_bytes([0; 16])));
        read_index(&self.finished, Some(&end), split_finished_key, pending)
    }

    /// See `StoreWrite::complete_finished_index`.
    pub(super) fn complete_finished(&self, entries: &[Ended]) -> Result<(), Error> {
        complete_index(&self.finished, entries.iter().map(|&e| finished_key(e)))
    }
}

/// Removes an index tree from the store in `dir` (closed), as a store written before the
/// index existed has none: for tests of the journal's way of completing it. Whether there was
/// one.
#[cfg(test)]
pub(crate) fn drop_index_tree(dir: &std::path::Path, unfinished: bool) -> Result<bool, Error> {
    use super::keys::FINISHED_TREE;
    let db = sled::open(dir)?;
    let dropped = db.drop_tree(if unfinished {
        UNFINISHED_TREE
    } else {
        FINISHED_TREE
    })?;
    db.flush()?;
    Ok(dropped)
}
