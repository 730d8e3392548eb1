//! Reading [`SledStore`]: what is durable, from the pending layer first and sled after it
//! (see `pending.rs`), and log bytes from the builds' segments.

use super::index::read_index;
use super::keys::{
    DAMAGE_TREE, SUMMARY_TREE, UNFINISHED_TREE, finished_key, id_key, record_key, run_key,
    split_finished_key, split_record_key, stored_records,
};
use super::{Ended, Error, SledStore, StoreRead};
use crate::build::BuildId;
use crate::store::{RECORD_FLOOR_BYTES, pending};

impl StoreRead for SledStore {
    fn records(
        &self,
        id: BuildId,
        seqs: std::ops::Range<u64>,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, Error> {
        // Pending first, then sled: see `pending.rs`.
        let pending = self
            .pending
            .lock()
            .records(id, seqs.clone(), max_bytes, RECORD_FLOOR_BYTES);
        // From the first key whose last record is at or past the start (a run that holds
        // the start has its key there), in order: each record lives in one key.
        let mut out = Vec::new();
        let mut size = 0usize;
        'keys: for entry in self
            .journal
            .range(record_key(id, seqs.start).as_slice()..=run_key(id, u64::MAX).as_slice())
        {
            let (key, value) = entry?;
            for (seq, record) in stored_records(&key, &value)? {
                if seq < seqs.start {
                    continue;
                }
                if seq >= seqs.end {
                    break 'keys;
                }
                size += record.len().max(RECORD_FLOOR_BYTES);
                out.push((seq, record.to_vec()));
                if size >= max_bytes {
                    break 'keys;
                }
            }
        }
        Ok(pending::merge_records(
            pending,
            out,
            max_bytes,
            RECORD_FLOOR_BYTES,
        ))
    }

    fn read_log(&self, id: BuildId, offset: u64, len: usize) -> Result<Vec<u8>, Error> {
        self.segments.read(id, offset, len)
    }

    fn last_seq(&self, id: BuildId) -> Result<Option<u64>, Error> {
        let pending = self.pending.lock().last_seq(id);
        let stored = match self.journal.scan_prefix(id.as_bytes()).next_back() {
            Some(entry) => Some(split_record_key(&entry?.0)?.1),
            None => None,
        };
        Ok(pending.max(stored))
    }

    fn journal_ids(&self) -> Result<Vec<BuildId>, Error> {
        // Pending first, then sled: see `pending.rs`.
        let pending = self.pending.lock().ids();
        let mut ids = Vec::new();
        let mut next = self.journal.first()?;
        while let Some((key, _)) = next {
            let (id, _) = split_record_key(&key)?;
            ids.push(id);
            // Skip the rest of this build's records in one seek.
            next = self.journal.get_gt(run_key(id, u64::MAX))?;
        }
        if pending.iter().any(|id| ids.binary_search(id).is_err()) {
            ids.extend(pending);
            ids.sort();
            ids.dedup();
        }
        Ok(ids)
    }

    fn summary(&self, id: BuildId) -> Result<Option<Vec<u8>>, Error> {
        if let Some(summary) = self.pending.lock().summary(id) {
            return Ok(Some(summary));
        }
        Ok(self.summary.get(id.as_bytes())?.map(|v| v.to_vec()))
    }

    fn size_on_disk(&self) -> Result<u64, Error> {
        Ok(self.db.size_on_disk()? + self.segments.size())
    }

    fn summaries(&self) -> Result<Vec<(BuildId, Vec<u8>)>, Error> {
        let mut pending = self.pending.lock().summaries();
        let stored = self
            .summary
            .iter()
            .rev()
            .map(|entry| {
                let (key, value) = entry?;
                let id = id_key(SUMMARY_TREE, &key)?;
                Ok((id, pending.remove(&id).unwrap_or_else(|| value.to_vec())))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        if pending.is_empty() {
            return Ok(stored);
        }
        let mut all = stored;
        all.extend(pending);
        all.sort_by_key(|(id, _)| std::cmp::Reverse(*id));
        Ok(all)
    }

    fn damage(&self) -> Result<Vec<(BuildId, Vec<u8>)>, Error> {
        self.damage
            .iter()
            .map(|entry| {
                let (key, value) = entry?;
                Ok((id_key(DAMAGE_TREE, &key)?, value.to_vec()))
            })
            .collect()
    }

    fn unfinished(&self) -> Result<Option<Vec<BuildId>>, Error> {
        // Pending first: a checkpoint between the two reads writes the same flags to sled.
        let pending = self.pending.lock().unfinished();
        read_index(
            &self.unfinished,
            None,
            |key| id_key(UNFINISHED_TREE, key),
            pending,
        )
    }

    fn finished_before(&self, cutoff_ms: i64) -> Result<Option<Vec<Ended>>, Error> {
        // Pending first: a checkpoint between the two reads writes the same entries to sled.
        let pending = self.pending.lock().finished_before(cutoff_ms);
        let end = finished_key((cutoff_ms, BuildId::from_bytes([0; 16])));
        read_index(&self.finished, Some(&end), split_finished_key, pending)
    }
}
