//! The write path through the write-ahead log and the pending overlay, the log's replay at
//! open, and checkpoints into sled (see `store/wal.rs` and `store/pending.rs` for why).

use super::*;

impl SledStore {
    /// Applies every entry of the write-ahead log to sled, in order, and notes their builds
    /// as written since the last open.
    pub(super) fn replay(&mut self) -> Result<wal::Replay, Error> {
        let mut replay = wal::replay(&self.dir).map_err(self.wal_error())?;
        let mut named = Vec::new();
        let entries = replay.batches.len();
        for batch in std::mem::take(&mut replay.batches) {
            named.extend(batch.records.iter().map(|(id, _, _)| *id));
            named.extend(batch.summaries.iter().map(|(id, _)| *id));
            named.extend(&batch.removed_summaries);
            named.extend(&batch.removed_builds);
            named.extend(batch.damage.iter().map(|(id, _)| *id));
            self.apply(batch)?;
        }
        replay.entries = entries;
        if entries > 0 {
            tracing::info!(entries, "applied the store's write-ahead log");
            let known = self.written_since_last_open.get_or_insert_with(Vec::new);
            known.extend(named);
            known.sort();
            known.dedup();
        }
        Ok(replay)
    }

    /// Writes `batch` into sled (not flushed).
    pub(super) fn apply(&self, batch: WriteBatch) -> Result<(), Error> {
        let mut records = sled::Batch::default();
        for (id, seq, value) in batch.records {
            records.insert(&record_key(id, seq)[..], value);
        }
        let mut damage = sled::Batch::default();
        for (id, value) in batch.damage {
            damage.insert(&id.as_bytes()[..], value);
        }
        let mut summaries = sled::Batch::default();
        for (id, value) in batch.summaries {
            summaries.insert(&id.as_bytes()[..], value);
        }
        let finished = index_batch(
            batch
                .finished
                .into_iter()
                .map(|(e, put)| (finished_key(e), put)),
        );
        let mut unfinished = index_batch(
            batch
                .unfinished
                .into_iter()
                .map(|(id, open)| (*id.as_bytes(), open)),
        );
        for id in batch.removed_summaries.iter().chain(&batch.removed_builds) {
            summaries.remove(&id.as_bytes()[..]);
            unfinished.remove(&id.as_bytes()[..]);
        }
        for id in &batch.removed_builds {
            damage.remove(&id.as_bytes()[..]);
            for key in self
                .journal
                .range(record_key(*id, 0)..=record_key(*id, u64::MAX))
                .keys()
            {
                records.remove(key?);
            }
        }
        self.journal.apply_batch(records)?;
        // The index before the summaries: a summary that survives a crash has its entry.
        self.unfinished.apply_batch(unfinished)?;
        self.finished.apply_batch(finished)?;
        self.summary.apply_batch(summaries)?;
        self.damage.apply_batch(damage)?;
        for id in &batch.removed_builds {
            self.segments.remove(*id)?;
        }
        Ok(())
    }

    /// Writes what is pending into sled, flushes sled and starts the next log file, if
    /// anything was written since the last checkpoint (or only when that is due).
    pub(super) fn fold(&self, only_if_due: bool) -> Result<(), Error> {
        // Holding the log keeps writers out until the new file is started.
        let mut wal = self.wal.lock();
        let Some(log) = wal.as_mut() else {
            return Ok(());
        };
        let (builds, unfinished, finished) = {
            let pending = self.pending.lock();
            let idle = log.is_empty() && pending.is_empty();
            if idle || (only_if_due && !log.due() && !pending.full()) {
                return Ok(());
            }
            (
                pending.entries(),
                pending.unfinished(),
                pending.finished_before(i64::MAX),
            )
        };
        // Into sled while still pending: a reader between the two sees them twice, never
        // not at all. Build by build, each one's records then its summary, key by key rather
        // than as one atomic batch (the log covers a checkpoint cut short): damage to sled's
        // file then costs what was written after it, as it did when every commit went to
        // sled, not the whole checkpoint, and builds before it stay whole.
        // Each build's index entry goes before its summary: a summary that survives a crash
        // has its entry.
        let mut unfinished = unfinished;
        let mut finished: HashMap<BuildId, Vec<(Ended, bool)>> =
            finished
                .into_iter()
                .fold(HashMap::new(), |mut by_build, entry| {
                    by_build.entry(entry.0.1).or_default().push(entry);
                    by_build
                });
        for (id, records, summary) in builds {
            for (seq, value) in records {
                self.journal.insert(&record_key(id, seq)[..], value)?;
            }
            if let Some(open) = unfinished.remove(&id) {
                set_index_key(&self.unfinished, id.as_bytes(), open)?;
            }
            for (entry, put) in finished.remove(&id).unwrap_or_default() {
                set_index_key(&self.finished, &finished_key(entry), put)?;
            }
            if let Some(summary) = summary {
                self.summary.insert(&id.as_bytes()[..], summary)?;
            }
        }
        self.unfinished.apply_batch(index_batch(
            unfinished
                .into_iter()
                .map(|(id, open)| (*id.as_bytes(), open)),
        ))?;
        self.finished.apply_batch(index_batch(
            finished
                .into_values()
                .flatten()
                .map(|(e, put)| (finished_key(e), put)),
        ))?;
        self.pending.lock().clear();
        self.db.flush()?;
        log.rotate().map_err(self.wal_error())
    }

    /// Writes a live batch: logged, its records and summaries held pending, the rest (rare:
    /// removals, damage reports) applied to sled at once. Without a log (a read-only store),
    /// the batch goes to sled directly.
    pub(super) fn write_logged(&self, mut batch: WriteBatch) -> Result<(), Error> {
        // Logged, then applied, under one lock: the log's order is the store's.
        let mut wal = self.wal.lock();
        let Some(log) = wal.as_mut() else {
            drop(wal);
            return self.apply(batch);
        };
        // Summaries are derived from records (refolded at open if lost): not logged.
        let summaries = std::mem::take(&mut batch.summaries);
        let unfinished = std::mem::take(&mut batch.unfinished);
        let finished = std::mem::take(&mut batch.finished);
        if !batch.is_empty() {
            log.append(&batch).map_err(self.wal_error())?;
        }
        let records = std::mem::take(&mut batch.records);
        {
            let mut pending = self.pending.lock();
            for id in &batch.removed_summaries {
                pending.remove_summary(*id);
            }
            for id in &batch.removed_builds {
                pending.remove_build(*id);
            }
            for (id, seq, value) in records {
                pending.put_record(id, seq, value);
            }
            for (id, value) in summaries {
                pending.put_summary(id, value);
            }
            for (id, open) in unfinished {
                pending.put_unfinished(id, open);
            }
            for (entry, put) in finished {
                pending.put_finished(entry, put);
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        self.apply(batch)
    }
}
