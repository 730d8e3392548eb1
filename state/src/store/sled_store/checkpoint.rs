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
        // A record a checkpoint already wrote into a run (the log it came from was not
        // removed before a crash) stays there alone: each record lives in one key.
        let mut records = sled::Batch::default();
        for (id, seq, value) in batch.records {
            if !self.in_a_run(id, seq)? {
                records.insert(&record_key(id, seq)[..], value);
            }
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
            for key in self.journal.scan_prefix(id.as_bytes()).keys() {
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

    /// Whether sled holds record `seq` of build `id` in a run. A run that does not parse
    /// holds nothing here: the open goes on, and the build reads as damaged there.
    fn in_a_run(&self, id: BuildId, seq: u64) -> Result<bool, Error> {
        let Some((key, value)) = self.journal.get_gt(record_key(id, seq))? else {
            return Ok(false);
        };
        if key.len() != 25 || split_record_key(&key)?.0 != id {
            return Ok(false);
        }
        Ok(stored_records(&key, &value)
            .is_ok_and(|records| records.first().is_some_and(|(first, _)| *first <= seq)))
    }

    /// Seals the live layer and the log file that holds it for a checkpoint, if anything was
    /// written since the last one (or only when one is due). Returns whether a sealed layer
    /// waits for [`SledStore::write_sealed_layer`]. Quick: the commit path calls it.
    pub(super) fn seal(&self, only_if_due: bool) -> Result<bool, Error> {
        // Holding the log keeps writers out until the new file is started.
        let mut wal = self.wal.lock();
        let Some(log) = wal.as_mut() else {
            return Ok(false);
        };
        let mut pending = self.pending.lock();
        if pending.sealed().is_some() {
            return Ok(true);
        }
        let idle = log.is_empty() && pending.live_is_empty();
        if idle || (only_if_due && !log.due() && !pending.full()) {
            return Ok(false);
        }
        let sealed = log.seal().map_err(self.wal_error())?;
        self.sealed_logs.lock().push(sealed);
        pending.seal();
        Ok(true)
    }

    /// Writes the sealed layer, if any, into sled, flushes sled and removes the sealed log
    /// files; readers see the layer until it is in sled. Runs off the commit path (the
    /// journal's checkpoint thread), or on it when the live layer fills before this is done.
    pub(super) fn write_sealed_layer(&self) -> Result<(), Error> {
        let _folding = self.folding.lock();
        let Some(sealed) = self.pending.lock().sealed() else {
            return Ok(());
        };
        // Build by build, each one's records, then its index entries, then its summary, key
        // by key rather than as one atomic batch (the log covers a checkpoint cut short):
        // damage to sled's file then costs what was written after it, as it did when every
        // commit went to sled, not the whole checkpoint, and builds before it stay whole. A
        // summary that survives a crash has its index entries. A build removed since the
        // layer was sealed is left out, under the gate its removal takes, so what the removal
        // took out of sled is never written back.
        for build in sealed.builds() {
            let _gate = self.removal_gate.lock();
            let pending = self.pending.lock();
            if pending.is_removed(build.id, false) {
                continue;
            }
            let summary_removed = pending.is_removed(build.id, true);
            drop(pending);
            for run in runs(&build.records) {
                if let Some((last, _)) = run.last() {
                    self.journal
                        .insert(&run_key(build.id, *last)[..], encode_run(run))?;
                }
            }
            if let Some(open) = build.unfinished.filter(|_| !summary_removed) {
                set_index_key(&self.unfinished, build.id.as_bytes(), open)?;
            }
            for (entry, put) in build.finished {
                set_index_key(&self.finished, &finished_key(entry), put)?;
            }
            if let Some(summary) = build.summary.filter(|_| !summary_removed) {
                self.summary.insert(&build.id.as_bytes()[..], summary)?;
            }
        }
        self.db.flush()?;
        let written = std::mem::take(&mut *self.sealed_logs.lock());
        self.pending.lock().sealed_written();
        wal::remove(&written).map_err(|e| {
            // Kept for the next checkpoint to remove: a sealed file left behind would replay,
            // at the next start, records of builds removed since.
            self.sealed_logs.lock().extend(written);
            self.wal_error()(e)
        })
    }

    /// Everything written so far into sled, flushed, now, whether due or not (a clean stop).
    pub(super) fn checkpoint_now(&self) -> Result<(), Error> {
        self.write_sealed_layer()?;
        if self.seal(false)? {
            self.write_sealed_layer()?;
        }
        Ok(())
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
        let removes = !batch.removed_summaries.is_empty() || !batch.removed_builds.is_empty();
        // A removal and a checkpoint writing a sealed layer take turns (see `write_sealed_layer`).
        let _gate = removes.then(|| self.removal_gate.lock());
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

/// A build's records in runs of [`RUN_RECORDS`] and about [`RUN_BYTES`] at most (one record
/// at least each), in order; the same records always give the same runs, so a checkpoint
/// written again after a failure writes the same keys.
fn runs<'a, 'b>(records: &'b [(u64, &'a [u8])]) -> Vec<&'b [(u64, &'a [u8])]> {
    let mut runs = Vec::new();
    let mut start = 0;
    let mut size = 0;
    for (i, (_, record)) in records.iter().enumerate() {
        if i > start && (i - start == RUN_RECORDS || size + record.len() > RUN_BYTES) {
            runs.push(&records[start..i]);
            start = i;
            size = 0;
        }
        size += record.len();
    }
    if start < records.len() {
        runs.push(&records[start..]);
    }
    runs
}
