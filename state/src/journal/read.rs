//! The read side of the journal: durable records, log bytes, views and summaries. Readers
//! see only what is durable (below each build's frontier) and never wait for a sync; a build
//! found damaged while being read is marked so (see `damage.rs`).

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::watch;

use super::{Damage, Error, Journal, Result};
use crate::build::BuildId;
use crate::record::{self, Record};
use crate::view::{BuildView, Summary};

impl Journal {
    /// The first sequence number of build `id` that is not durable, if it has records in
    /// flight or written since open.
    fn frontier(&self, id: BuildId) -> Option<u64> {
        self.shared.frontier.lock().get(&id).copied()
    }

    /// A build's durable records from `from_seq` on, in order.
    pub fn records(&self, id: BuildId, from_seq: u64) -> Result<Vec<(u64, Record)>> {
        self.records_batch(id, from_seq, usize::MAX)
    }

    /// A build's durable records from `from_seq` on, in order, about `max_bytes` of them at
    /// most (at least one, if there is one): how readers keep their memory bounded.
    pub fn records_batch(
        &self,
        id: BuildId,
        from_seq: u64,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Record)>> {
        // Twice at most: a read that finds damage is done again up to it.
        for _ in 0..2 {
            let limit = self.damage(id).map(|d| d.readable_until);
            if limit.is_some_and(|limit| from_seq >= limit) {
                return Err(self.damaged_error(id));
            }
            // Past the readable part may be a page the store cannot read: never read there.
            let until = limit.unwrap_or(u64::MAX);
            let mut raw = match self.shared.store.records(id, from_seq..until, max_bytes) {
                Ok(raw) => raw,
                Err(e) => match self.damage_from(id, from_seq, e.into()) {
                    Error::Damaged { .. } => continue,
                    other => return Err(other),
                },
            };
            if let Some(frontier) = self.frontier(id) {
                raw.retain(|(seq, _)| *seq < frontier);
            }
            let mut records = Vec::with_capacity(raw.len());
            for (seq, bytes) in raw {
                match Record::decode(&bytes) {
                    Ok(record) => records.push((seq, record)),
                    Err(e) => {
                        let reason = format!("record {seq} does not decode: {e}");
                        let error = self.mark_damaged(id, seq, reason);
                        if records.is_empty() {
                            return Err(error);
                        }
                        break;
                    }
                }
            }
            return Ok(records);
        }
        Err(self.damaged_error(id))
    }

    /// Up to `len` durable bytes of a build's log from `offset`, which the caller knows to be
    /// durable (a record it read names them). Needs no lock: durable log bytes never change.
    pub fn read_log(&self, id: BuildId, offset: u64, len: usize) -> Result<Vec<u8>> {
        let bytes = self.shared.store.read_log(id, offset, len)?;
        if bytes.len() < len {
            return Err(Error::LogMissing {
                id,
                offset: offset + bytes.len() as u64,
            });
        }
        Ok(bytes)
    }

    /// Whether a build has durable records (one key lookup, no fold).
    pub fn exists(&self, id: BuildId) -> Result<bool> {
        Ok(self.damage(id).is_some() || self.last_seq(id)?.is_some())
    }

    /// The sequence number of a build's newest durable record.
    pub fn last_seq(&self, id: BuildId) -> Result<Option<u64>> {
        let last = self.shared.store.last_seq(id)?;
        Ok(match self.frontier(id) {
            Some(0) => None,
            Some(frontier) => last.map(|last| last.min(frontier - 1)),
            None => last,
        })
    }

    /// The durable view of a build, folded from its records.
    /// A damaged build has no view: [`Error::Damaged`] (see [`Journal::readable_view`]).
    pub fn view(&self, id: BuildId) -> Result<Option<BuildView>> {
        let records = self.records(id, 0)?;
        if self.damage(id).is_some() {
            return Err(self.damaged_error(id));
        }
        if records.is_empty() {
            return Ok(None);
        }
        BuildView::fold(id, records.iter().map(|(seq, r)| (*seq, r)))
            .map(Some)
            .map_err(|source| self.damage_from(id, 0, Error::Fold { id, source }))
    }

    /// Every build's summary, newest first. A damaged build is listed with its damage, from
    /// what is readable of it (with no more than its id when nothing is).
    pub fn summaries(&self) -> Result<Vec<Summary>> {
        let mut damaged: HashMap<BuildId, Damage> = self.lock_damaged().clone();
        let mut summaries = self
            .shared
            .store
            .summaries()?
            .into_iter()
            .map(|(id, bytes)| {
                let mut summary: Summary = record::decode(&bytes).map_err(|e| Error::Record {
                    id,
                    seq: u64::MAX,
                    source: Arc::new(e),
                })?;
                if let Some(damage) = damaged.remove(&id) {
                    summary.failure = Some(damage.reason.clone());
                    summary.damage = Some(damage);
                }
                Ok(summary)
            })
            .collect::<Result<Vec<_>>>()?;
        if !damaged.is_empty() {
            summaries.extend(damaged.into_iter().map(|(id, damage)| {
                let mut summary = match self.readable_view(id) {
                    Some(view) => view.summary(),
                    None => Summary {
                        id,
                        last_seq: 0,
                        phase: crate::machine::Phase::Queued,
                        base_ref: String::new(),
                        workspace_ref: String::new(),
                        triggered_by: String::new(),
                        created_at_ms: id.created_at_ms(),
                        finished_at_ms: None,
                        failure: None,
                        attempt: 0,
                        damage: None,
                    },
                };
                summary.failure = Some(damage.reason.clone());
                summary.damage = Some(damage);
                summary
            }));
            summaries.sort_by_key(|s| std::cmp::Reverse(s.id));
        }
        Ok(summaries)
    }

    /// Every build not yet in a final phase, oldest first: what a restart resumes. Read from
    /// the store's index of unfinished builds, and every build written since the last open
    /// (whose index entry a crash may have cut short) is looked at too; so start-up does not
    /// read the summaries of every build ever kept. A store without a complete index (one
    /// written before it existed) is read summary by summary once, and its index completed.
    pub fn unfinished(&self) -> Result<Vec<BuildView>> {
        let store = &self.shared.store;
        let ids = match store.unfinished()? {
            Some(mut ids) => {
                // Their summaries agree with their records since the open's repair pass.
                for id in store.written_since_last_open().unwrap_or_default() {
                    let summary: Option<Summary> = store
                        .summary(id)?
                        .and_then(|bytes| record::decode(&bytes).ok());
                    if summary.is_none_or(|s| !s.phase.is_final()) {
                        ids.push(id);
                    }
                }
                ids.sort();
                ids.dedup();
                ids
            }
            None => {
                let mut ids: Vec<BuildId> = self
                    .summaries()?
                    .into_iter()
                    .filter(|s| !s.phase.is_final() && s.damage.is_none())
                    .map(|s| s.id)
                    .collect();
                ids.sort();
                store.complete_unfinished_index(&ids)?;
                tracing::info!(
                    unfinished = ids.len(),
                    "indexed the unfinished builds of a store written before the index existed"
                );
                ids
            }
        };
        let mut views = Vec::new();
        for id in ids {
            match self.view(id) {
                Ok(Some(view)) if !view.phase().is_final() => views.push(view),
                Ok(_) => {}
                // Logged when found; a damaged build is never resumed.
                Err(Error::Damaged { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(views)
    }

    /// Bytes the store takes on disk.
    pub fn size_on_disk(&self) -> Result<u64> {
        Ok(self.shared.store.size_on_disk()?)
    }

    /// A receiver whose value counts the group commits so far (durable or failed): how
    /// benchmarks and tests see commits shared. Followers wake on their own build's commits
    /// instead ([`Journal::follow`]).
    pub fn commits(&self) -> watch::Receiver<u64> {
        self.shared.generation.subscribe()
    }
}

pub(super) fn decode_records(id: BuildId, raw: Vec<(u64, Vec<u8>)>) -> Result<Vec<(u64, Record)>> {
    raw.into_iter()
        .map(|(seq, bytes)| {
            Record::decode(&bytes)
                .map(|r| (seq, r))
                .map_err(|e| Error::Record {
                    id,
                    seq,
                    source: Arc::new(e),
                })
        })
        .collect()
}
