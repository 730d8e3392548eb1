//! The indexes [`SledStore`](super::SledStore) keeps beside the journal (unfinished builds,
//! finished builds by the time they ended): reading one whole, completing one written before
//! it existed, and the batches that change them.

use super::Error;
use super::keys::INDEX_COMPLETE;

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

/// Removes an index tree from the store in `dir` (closed), as a store written before the
/// index existed has none: for tests of the journal's way of completing it. Whether there was
/// one.
#[cfg(test)]
pub(crate) fn drop_index_tree(dir: &std::path::Path, unfinished: bool) -> Result<bool, Error> {
    use super::keys::{FINISHED_TREE, UNFINISHED_TREE};
    let db = sled::open(dir)?;
    let dropped = db.drop_tree(if unfinished {
        UNFINISHED_TREE
    } else {
        FINISHED_TREE
    })?;
    db.flush()?;
    Ok(dropped)
}
