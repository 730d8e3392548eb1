//! What was written since the last checkpoint, held in memory over sled: records and
//! summaries. Durable through the write-ahead log (records) or derived from what is (a
//! summary is refolded from its build's records at open), it goes into sled in one pass at the
//! checkpoint. Why: applying each commit's records and summaries to sled cost three times the
//! commit's `fdatasync` here (sled allocates per key and writes out its IO buffers with a
//! synchronous `sync_file_range` each), and a commit waited for it; now a commit is the log's
//! append and sync plus a map insert. Bounded: a checkpoint is due once this holds
//! [`MAX_BYTES`].
//!
//! Readers look here first, then in sled, and merge by key: a checkpoint running between the
//! two looks can only make them see an entry twice (never miss one), and duplicates merge.

use std::collections::{BTreeMap, HashSet};

use super::Ended;
use crate::build::BuildId;

/// A checkpoint is due once the entries held take this many bytes.
pub(super) const MAX_BYTES: usize = 8 << 20;

/// What a checkpoint writes of one build: its records (by sequence number), then its summary.
pub(super) type BuildEntries = (BuildId, Vec<(u64, Vec<u8>)>, Option<Vec<u8>>);

/// Records and summaries not yet in sled.
#[derive(Default)]
pub(super) struct Pending {
    records: BTreeMap<(BuildId, u64), Vec<u8>>,
    summaries: BTreeMap<BuildId, Vec<u8>>,
    /// Whether each build of `summaries` is unfinished, for the index of unfinished builds.
    unfinished: BTreeMap<BuildId, bool>,
    /// Entries of the index of finished builds, put (`true`) or removed.
    finished: BTreeMap<Ended, bool>,
    bytes: usize,
}

/// What an entry counts for against [`MAX_BYTES`]: its value and its key.
fn held(key_bytes: usize, value: &[u8]) -> usize {
    key_bytes + value.len()
}

impl Pending {
    pub(super) fn put_record(&mut self, id: BuildId, seq: u64, value: Vec<u8>) {
        self.bytes += held(24, &value);
        if let Some(old) = self.records.insert((id, seq), value) {
            self.bytes -= held(24, &old);
        }
    }

    /// A build's summary is rewritten at each of its commits: only the newest is held.
    pub(super) fn put_summary(&mut self, id: BuildId, value: Vec<u8>) {
        self.bytes += held(16, &value);
        if let Some(old) = self.summaries.insert(id, value) {
            self.bytes -= held(16, &old);
        }
    }

    /// Whether `id` is unfinished, as its newest summary says.
    pub(super) fn put_unfinished(&mut self, id: BuildId, unfinished: bool) {
        self.unfinished.insert(id, unfinished);
    }

    /// Puts (`true`) or removes an entry of the index of finished builds.
    pub(super) fn put_finished(&mut self, entry: Ended, put: bool) {
        self.finished.insert(entry, put);
    }

    /// The index entries held for builds that ended before `cutoff_ms`: put or removed.
    pub(super) fn finished_before(&self, cutoff_ms: i64) -> Vec<(Ended, bool)> {
        self.finished
            .iter()
            .take_while(|((at, _), _)| *at < cutoff_ms)
            .map(|(entry, put)| (*entry, *put))
            .collect()
    }

    pub(super) fn remove_summary(&mut self, id: BuildId) {
        self.unfinished.remove(&id);
        if let Some(old) = self.summaries.remove(&id) {
            self.bytes -= held(16, &old);
        }
    }

    /// Forgets everything of `id` (its removal goes to sled directly).
    pub(super) fn remove_build(&mut self, id: BuildId) {
        self.remove_summary(id);
        let keys: Vec<_> = self
            .records
            .range((id, 0)..=(id, u64::MAX))
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            if let Some(old) = self.records.remove(&key) {
                self.bytes -= held(24, &old);
            }
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.records.is_empty()
            && self.summaries.is_empty()
            && self.unfinished.is_empty()
            && self.finished.is_empty()
    }

    /// Whether each build whose summary is held is unfinished.
    pub(super) fn unfinished(&self) -> BTreeMap<BuildId, bool> {
        self.unfinished.clone()
    }

    pub(super) fn full(&self) -> bool {
        self.bytes >= MAX_BYTES
    }

    /// Everything held, build by build in id order (creation order), for the checkpoint to
    /// write into sled; it stays here until [`clear`].
    ///
    /// [`clear`]: Pending::clear
    pub(super) fn entries(&self) -> Vec<BuildEntries> {
        let mut builds: Vec<BuildEntries> = Vec::new();
        for ((id, seq), value) in &self.records {
            match builds.last_mut() {
                Some((last, records, _)) if last == id => records.push((*seq, value.clone())),
                _ => builds.push((*id, vec![(*seq, value.clone())], None)),
            }
        }
        for (id, value) in &self.summaries {
            match builds.binary_search_by_key(id, |(build, _, _)| *build) {
                Ok(i) => builds[i].2 = Some(value.clone()),
                Err(i) => builds.insert(i, (*id, Vec::new(), Some(value.clone()))),
            }
        }
        builds
    }

    pub(super) fn clear(&mut self) {
        *self = Self::default();
    }

    /// `id`'s records with sequence numbers in `seqs`, in order, up to `max_bytes` (each
    /// counting at least `floor`).
    pub(super) fn records(
        &self,
        id: BuildId,
        seqs: std::ops::Range<u64>,
        max_bytes: usize,
        floor: usize,
    ) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        let mut size = 0;
        if seqs.is_empty() {
            return out;
        }
        for ((_, seq), value) in self.records.range((id, seqs.start)..(id, seqs.end)) {
            size += value.len().max(floor);
            out.push((*seq, value.clone()));
            if size >= max_bytes {
                break;
            }
        }
        out
    }

    pub(super) fn last_seq(&self, id: BuildId) -> Option<u64> {
        self.records
            .range((id, 0)..=(id, u64::MAX))
            .next_back()
            .map(|((_, seq), _)| *seq)
    }

    pub(super) fn ids(&self) -> HashSet<BuildId> {
        self.records.keys().map(|(id, _)| *id).collect()
    }

    pub(super) fn summary(&self, id: BuildId) -> Option<Vec<u8>> {
        self.summaries.get(&id).cloned()
    }

    pub(super) fn summaries(&self) -> BTreeMap<BuildId, Vec<u8>> {
        self.summaries.clone()
    }
}

/// Merges records read from here (`pending`, read first) and from sled: by sequence number,
/// in order, up to `max_bytes` (each counting at least `floor`).
pub(super) fn merge_records(
    pending: Vec<(u64, Vec<u8>)>,
    sled: Vec<(u64, Vec<u8>)>,
    max_bytes: usize,
    floor: usize,
) -> Vec<(u64, Vec<u8>)> {
    if pending.is_empty() {
        return sled;
    }
    let mut all: BTreeMap<u64, Vec<u8>> = sled.into_iter().collect();
    for (seq, value) in pending {
        all.entry(seq).or_insert(value);
    }
    let mut out = Vec::new();
    let mut size = 0;
    for (seq, value) in all {
        size += value.len().max(floor);
        out.push((seq, value));
        if size >= max_bytes {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewritten_and_removed_entries_stop_counting_toward_a_checkpoint() {
        let mut pending = Pending::default();
        let id = BuildId::new();
        for _ in 0..100_000 {
            pending.put_summary(id, vec![0; 200]);
        }
        assert_eq!(
            pending.bytes, 216,
            "one summary held, however often rewritten"
        );
        pending.put_record(id, 0, vec![0; 100]);
        pending.remove_build(id);
        assert_eq!(pending.bytes, 0);
        assert!(pending.is_empty() && !pending.full());
    }
}
