//! What was written since the last checkpoint, held in memory over sled: records, summaries
//! and index entries. Durable through the write-ahead log (records) or derived from what is
//! (a summary is refolded from its build's records at open), it goes into sled at a
//! checkpoint. Why: applying each commit's records and summaries to sled cost three times the
//! commit's `fdatasync` here (sled allocates per key and writes out its IO buffers with a
//! synchronous `sync_file_range` each), and a commit waited for it; now a commit is the log's
//! append and sync plus a map insert.
//!
//! Two layers: the live one takes writes; a checkpoint seals it (the write-ahead log starts a
//! new file at that moment) and writes the sealed layer into sled off the commit path, while
//! a new live layer takes the next commits. Bounded: a checkpoint is due once the live layer
//! holds [`MAX_BYTES`], and a commit that finds the live layer full while the sealed one is
//! still being written helps write it first, so at most two layers are held.
//!
//! Readers look here first (live over sealed), then in sled, and merge by key: a checkpoint
//! running between the two looks can only make them see an entry twice (never miss one), and
//! duplicates merge. A build removed while a sealed layer holds some of it is not read from
//! that layer, and not written from it into sled.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use super::Ended;
use crate::build::BuildId;

/// A checkpoint is due once the live layer's entries take this many bytes.
pub(super) const MAX_BYTES: usize = 8 << 20;

/// Records, summaries and index entries written in one interval between checkpoints.
#[derive(Default)]
pub(super) struct Layer {
    records: BTreeMap<(BuildId, u64), Vec<u8>>,
    summaries: BTreeMap<BuildId, Vec<u8>>,
    /// Whether each build of `summaries` is unfinished, for the index of unfinished builds.
    unfinished: BTreeMap<BuildId, bool>,
    /// Entries of the index of finished builds, put (`true`) or removed.
    finished: BTreeMap<Ended, bool>,
    bytes: usize,
}

/// What a checkpoint writes of one build: its records (by sequence number), its index
/// entries (unfinished or not; finished-index entries put or removed), then its summary.
pub(super) struct BuildEntries<'a> {
    pub id: BuildId,
    pub records: Vec<(u64, &'a [u8])>,
    pub unfinished: Option<bool>,
    pub finished: Vec<(Ended, bool)>,
    pub summary: Option<&'a [u8]>,
}

/// What an entry counts for against [`MAX_BYTES`]: its value and its key.
fn held(key_bytes: usize, value: &[u8]) -> usize {
    key_bytes + value.len()
}

impl Layer {
    fn put_record(&mut self, id: BuildId, seq: u64, value: Vec<u8>) {
        self.bytes += held(24, &value);
        if let Some(old) = self.records.insert((id, seq), value) {
            self.bytes -= held(24, &old);
        }
    }

    fn put_summary(&mut self, id: BuildId, value: Vec<u8>) {
        self.bytes += held(16, &value);
        if let Some(old) = self.summaries.insert(id, value) {
            self.bytes -= held(16, &old);
        }
    }

    fn remove_summary(&mut self, id: BuildId) {
        self.unfinished.remove(&id);
        if let Some(old) = self.summaries.remove(&id) {
            self.bytes -= held(16, &old);
        }
    }

    fn remove_build(&mut self, id: BuildId) {
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

    fn is_empty(&self) -> bool {
        self.records.is_empty()
            && self.summaries.is_empty()
            && self.unfinished.is_empty()
            && self.finished.is_empty()
    }

    fn records(
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

    fn last_seq(&self, id: BuildId) -> Option<u64> {
        self.records
            .range((id, 0)..=(id, u64::MAX))
            .next_back()
            .map(|((_, seq), _)| *seq)
    }

    /// Everything held, build by build in id order (creation order), for a checkpoint to
    /// write into sled (a build may have index entries here and nothing else).
    pub(super) fn builds(&self) -> Vec<BuildEntries<'_>> {
        fn entry<'a, 'b>(
            builds: &'b mut BTreeMap<BuildId, BuildEntries<'a>>,
            id: BuildId,
        ) -> &'b mut BuildEntries<'a> {
            builds.entry(id).or_insert_with(|| BuildEntries {
                id,
                records: Vec::new(),
                unfinished: None,
                finished: Vec::new(),
                summary: None,
            })
        }
        let mut builds: BTreeMap<BuildId, BuildEntries<'_>> = BTreeMap::new();
        for ((id, seq), value) in &self.records {
            entry(&mut builds, *id).records.push((*seq, value));
        }
        for (id, open) in &self.unfinished {
            entry(&mut builds, *id).unfinished = Some(*open);
        }
        for (ended, put) in &self.finished {
            entry(&mut builds, ended.1).finished.push((*ended, *put));
        }
        for (id, value) in &self.summaries {
            entry(&mut builds, *id).summary = Some(value);
        }
        builds.into_values().collect()
    }
}

/// The live layer, and the sealed one a checkpoint is writing into sled.
#[derive(Default)]
pub(super) struct Pending {
    live: Layer,
    sealed: Option<Arc<Layer>>,
    /// Builds removed since `sealed` was sealed: what it holds of them is gone.
    removed: HashSet<BuildId>,
    /// Builds whose summary was removed since `sealed` was sealed.
    removed_summaries: HashSet<BuildId>,
}

impl Pending {
    pub(super) fn put_record(&mut self, id: BuildId, seq: u64, value: Vec<u8>) {
        self.live.put_record(id, seq, value);
    }

    /// A build's summary is rewritten at each of its commits: only the newest is held.
    pub(super) fn put_summary(&mut self, id: BuildId, value: Vec<u8>) {
        self.live.put_summary(id, value);
    }

    /// Whether `id` is unfinished, as its newest summary says.
    pub(super) fn put_unfinished(&mut self, id: BuildId, unfinished: bool) {
        self.live.unfinished.insert(id, unfinished);
    }

    /// Puts (`true`) or removes an entry of the index of finished builds.
    pub(super) fn put_finished(&mut self, entry: Ended, put: bool) {
        if self.live.finished.insert(entry, put).is_none() {
            self.live.bytes += 25;
        }
    }

    pub(super) fn remove_summary(&mut self, id: BuildId) {
        self.live.remove_summary(id);
        if self.sealed.is_some() {
            self.removed_summaries.insert(id);
        }
    }

    /// Forgets everything of `id` (its removal goes to sled directly).
    pub(super) fn remove_build(&mut self, id: BuildId) {
        self.live.remove_build(id);
        if self.sealed.is_some() {
            self.removed.insert(id);
        }
    }

    /// Whether a checkpoint writing the sealed layer must leave `id` out (`summary`: only
    /// its summary).
    pub(super) fn is_removed(&self, id: BuildId, summary: bool) -> bool {
        self.removed.contains(&id) || (summary && self.removed_summaries.contains(&id))
    }

    /// The live layer holds nothing.
    pub(super) fn live_is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// The live layer is due for a checkpoint.
    pub(super) fn full(&self) -> bool {
        self.live.bytes >= MAX_BYTES
    }

    /// The layer a checkpoint is writing, if one is.
    pub(super) fn sealed(&self) -> Option<Arc<Layer>> {
        self.sealed.clone()
    }

    /// Seals the live layer for a checkpoint and starts a new one; `false` (and nothing
    /// changes) while the layer sealed before is still being written.
    pub(super) fn seal(&mut self) -> bool {
        if self.sealed.is_some() {
            return false;
        }
        self.sealed = Some(Arc::new(std::mem::take(&mut self.live)));
        true
    }

    /// The sealed layer is in sled: forget it.
    pub(super) fn sealed_written(&mut self) {
        self.sealed = None;
        self.removed.clear();
        self.removed_summaries.clear();
    }

    /// The sealed layer, if any, unless `id` was removed since.
    fn sealed_of(&self, id: BuildId) -> Option<&Layer> {
        self.sealed
            .as_deref()
            .filter(|_| !self.removed.contains(&id))
    }

    /// What `pick` takes from both layers, by key: the sealed layer's, less what `gone` says
    /// was removed since it was sealed, then the live layer's over it.
    fn overlay<K: Ord, V>(
        &self,
        pick: impl Fn(&Layer) -> Vec<(K, V)>,
        gone: impl Fn(&K) -> bool,
    ) -> BTreeMap<K, V> {
        let mut all: BTreeMap<K, V> = match &self.sealed {
            Some(sealed) => pick(sealed).into_iter().filter(|(k, _)| !gone(k)).collect(),
            None => BTreeMap::new(),
        };
        all.extend(pick(&self.live));
        all
    }

    /// Whether each build whose summary is held is unfinished.
    pub(super) fn unfinished(&self) -> BTreeMap<BuildId, bool> {
        self.overlay(
            |layer| {
                layer
                    .unfinished
                    .iter()
                    .map(|(id, open)| (*id, *open))
                    .collect()
            },
            |id| self.is_removed(*id, true),
        )
    }

    /// The index entries held for builds that ended before `cutoff_ms`: put or removed.
    pub(super) fn finished_before(&self, cutoff_ms: i64) -> Vec<(Ended, bool)> {
        let before = |layer: &Layer| -> Vec<(Ended, bool)> {
            layer
                .finished
                .iter()
                .take_while(|((at, _), _)| *at < cutoff_ms)
                .map(|(entry, put)| (*entry, *put))
                .collect()
        };
        let gone = |(_, id): &Ended| self.removed.contains(id);
        self.overlay(before, gone).into_iter().collect()
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
        let live = self.live.records(id, seqs.clone(), max_bytes, floor);
        match self.sealed_of(id) {
            Some(sealed) => merge_records(
                live,
                sealed.records(id, seqs, max_bytes, floor),
                max_bytes,
                floor,
            ),
            None => live,
        }
    }

    pub(super) fn last_seq(&self, id: BuildId) -> Option<u64> {
        let sealed = self.sealed_of(id).and_then(|s| s.last_seq(id));
        self.live.last_seq(id).max(sealed)
    }

    pub(super) fn ids(&self) -> HashSet<BuildId> {
        let mut ids: HashSet<BuildId> = self.live.records.keys().map(|(id, _)| *id).collect();
        if let Some(sealed) = &self.sealed {
            ids.extend(
                sealed
                    .records
                    .keys()
                    .map(|(id, _)| *id)
                    .filter(|id| !self.removed.contains(id)),
            );
        }
        ids
    }

    pub(super) fn summary(&self, id: BuildId) -> Option<Vec<u8>> {
        if let Some(summary) = self.live.summaries.get(&id) {
            return Some(summary.clone());
        }
        if self.is_removed(id, true) {
            return None;
        }
        self.sealed.as_ref()?.summaries.get(&id).cloned()
    }

    pub(super) fn summaries(&self) -> BTreeMap<BuildId, Vec<u8>> {
        self.overlay(
            |layer| {
                let all = layer.summaries.iter();
                all.map(|(id, value)| (*id, value.clone())).collect()
            },
            |id| self.is_removed(*id, true),
        )
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
    if sled.is_empty() {
        return pending;
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
            pending.live.bytes, 216,
            "one summary held, however often rewritten"
        );
        pending.put_record(id, 0, vec![0; 100]);
        pending.remove_build(id);
        assert_eq!(pending.live.bytes, 0);
        assert!(pending.live_is_empty() && !pending.full());
    }

    #[test]
    fn a_sealed_layer_reads_under_the_live_one_and_a_build_removed_since_is_gone_from_it() {
        let mut pending = Pending::default();
        let (kept, removed) = (BuildId::new(), BuildId::new());
        for id in [kept, removed] {
            pending.put_record(id, 0, vec![0]);
            pending.put_summary(id, vec![1]);
            pending.put_unfinished(id, true);
        }
        pending.put_finished((5, removed), true);
        assert!(pending.seal());
        assert!(!pending.seal(), "one sealed layer at a time");
        pending.put_record(kept, 1, vec![2]);
        pending.put_summary(kept, vec![3]);
        pending.remove_build(removed);
        pending.put_finished((5, removed), false);
        let seqs: Vec<u64> = pending
            .records(kept, 0..10, usize::MAX, 1)
            .into_iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(seqs, [0, 1], "sealed and live, in order");
        assert_eq!(pending.last_seq(kept), Some(1));
        assert_eq!(pending.summary(kept), Some(vec![3]), "the live one wins");
        assert_eq!(pending.last_seq(removed), None);
        assert_eq!(pending.summary(removed), None);
        assert_eq!(pending.ids(), HashSet::from([kept]));
        assert_eq!(pending.summaries().into_keys().collect::<Vec<_>>(), [kept]);
        assert_eq!(pending.unfinished(), BTreeMap::from([(kept, true)]));
        assert_eq!(pending.finished_before(10), [((5, removed), false)]);
        assert!(pending.is_removed(removed, false));
        pending.sealed_written();
        assert!(!pending.is_removed(removed, false));
        assert_eq!(pending.records(kept, 0..10, usize::MAX, 1).len(), 1);
    }
}
