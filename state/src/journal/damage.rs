//! Damaged builds: journals the store can no longer give back whole.
//!
//! A build is damaged when its records stop decoding or folding, when sled reports a corrupt
//! page while reading them, or when the store's witness saw records made durable that the
//! store no longer holds (sled drops everything after a damaged byte when it reopens; see
//! `store/witness.rs`). A damaged build keeps what can be read: its journal and log are served
//! up to the first unreadable record, then readers get [`Error::Damaged`]. It is never resumed
//! and takes no new record; retention removes it like a finished build. The report is kept in
//! the store, so the build stays listed as damaged across restarts.

use super::{Error, Journal};
use crate::build::BuildId;
use crate::now_ms;
use crate::record::{self, Record};
use crate::store::{self, Store, StoreRead, Witnessed, WriteBatch};
use crate::view::{BuildView, Damage};

impl Damage {
    fn new(readable_until: u64, reason: String) -> Self {
        Self {
            readable_until,
            reason,
            found_at_ms: now_ms(),
        }
    }

    /// The damage with the shorter readable part of the two.
    fn worst(self, other: Self) -> Self {
        if other.readable_until < self.readable_until {
            other
        } else {
            self
        }
    }
}

/// Whether a store error means the data is corrupt (as opposed to the disk being busy, full
/// or gone for a moment): only then is a build marked damaged.
fn is_corruption(e: &store::Error) -> bool {
    e.is_corruption()
}

/// Folds decoded records one by one and says where the first one that does not fit is.
fn first_unfoldable(id: BuildId, records: &[(u64, Record)]) -> Option<(u64, String)> {
    let mut view: Option<BuildView> = None;
    for (seq, record) in records {
        let folded = match &mut view {
            None => BuildView::fold(id, [(*seq, record)]).map(|v| view = Some(v)),
            Some(v) => v.apply(*seq, record),
        };
        if let Err(e) = folded {
            return Some((*seq, format!("record {seq} does not fit the build: {e}")));
        }
    }
    None
}

/// Reads one build whole, record by record, and says where it first fails to read, decode
/// or fold, if it does. `Err` only for a store error that is not corruption.
pub(super) fn locate(store: &dyn StoreRead, id: BuildId) -> Result<Option<Damage>, Error> {
    let mut decoded = Vec::new();
    let mut next = 0;
    loop {
        let raw = match store.records(id, next..u64::MAX, 0) {
            Ok(raw) => raw,
            Err(e) if is_corruption(&e) => {
                return Ok(Some(Damage::new(
                    next,
                    format!("the store cannot read record {next} or later: {e}"),
                )));
            }
            Err(e) => return Err(e.into()),
        };
        let Some((seq, bytes)) = raw.into_iter().next() else {
            break;
        };
        match Record::decode(&bytes) {
            Ok(record) => decoded.push((seq, record)),
            Err(e) => {
                return Ok(Some(Damage::new(
                    seq,
                    format!("record {seq} does not decode: {e}"),
                )));
            }
        }
        next = seq + 1;
    }
    Ok(first_unfoldable(id, &decoded).map(|(seq, reason)| Damage::new(seq, reason)))
}

/// Compares what the store's witness saw durable before this open with what the store holds
/// now: every build that lost records is damaged.
pub(super) fn lost_records(store: &dyn Store) -> Result<Vec<(BuildId, Damage)>, store::Error> {
    let mut lost = Vec::new();
    for (id, witnessed) in store.witnessed() {
        let Witnessed::Through(durable) = witnessed else {
            continue;
        };
        let held = store.last_seq(id)?;
        if held.is_some_and(|held| held >= durable) {
            continue;
        }
        let readable_until = held.map_or(0, |held| held + 1);
        let what = if readable_until == 0 {
            format!("all of its records (0 to {durable})")
        } else {
            format!("records {readable_until} to {durable}")
        };
        lost.push((
            id,
            Damage::new(
                readable_until,
                format!(
                    "the store lost {what}, which were durable: its database file was damaged, \
                     and sled dropped everything written after the damage when it reopened"
                ),
            ),
        ));
    }
    Ok(lost)
}

/// Decodes the damage reports kept in the store; one that does not decode is reported as
/// damage of its own.
pub(super) fn stored(store: &dyn StoreRead) -> Result<Vec<(BuildId, Damage)>, store::Error> {
    Ok(store
        .damage()?
        .into_iter()
        .map(|(id, bytes)| {
            let damage = record::decode::<Damage>(&bytes).unwrap_or_else(|e| {
                Damage::new(0, format!("its damage report does not decode either: {e}"))
            });
            (id, damage)
        })
        .collect())
}

/// What a stopped service's store says is damaged, without changing it: the reports kept in
/// it and the records its witness saw durable that it no longer holds (for `store check`).
pub fn damage_reports(store: &dyn Store) -> Result<Vec<(BuildId, Damage)>, store::Error> {
    let mut all: std::collections::BTreeMap<BuildId, Damage> = stored(store)?.into_iter().collect();
    for (id, damage) in lost_records(store)? {
        let worse = all
            .get(&id)
            .is_none_or(|known| damage.readable_until < known.readable_until);
        if worse {
            all.insert(id, damage);
        }
    }
    Ok(all.into_iter().collect())
}

/// The batch that keeps these reports.
pub(super) fn batch(reports: &[(BuildId, Damage)]) -> Result<WriteBatch, Error> {
    let mut batch = WriteBatch::default();
    for (id, damage) in reports {
        let bytes = record::encode(damage).map_err(|e| Error::Record {
            id: *id,
            seq: damage.readable_until,
            source: std::sync::Arc::new(e),
        })?;
        batch.damage.push((*id, bytes));
    }
    Ok(batch)
}

impl Journal {
    /// What is wrong with a build, if it is damaged.
    pub fn damage(&self, id: BuildId) -> Option<Damage> {
        self.lock_damaged().get(&id).cloned()
    }

    /// Every damaged build, newest first.
    pub fn damaged(&self) -> Vec<(BuildId, Damage)> {
        let mut all: Vec<_> = self
            .lock_damaged()
            .iter()
            .map(|(id, d)| (*id, d.clone()))
            .collect();
        all.sort_by_key(|(id, _)| std::cmp::Reverse(*id));
        all
    }

    /// The build as folded from the records that can still be read, if any can.
    pub fn readable_view(&self, id: BuildId) -> Option<BuildView> {
        let records = self.records(id, 0).ok()?;
        BuildView::fold(id, records.iter().map(|(seq, r)| (*seq, r))).ok()
    }

    /// The error readers get past the readable part of a damaged build.
    pub(super) fn damaged_error(&self, id: BuildId) -> Error {
        match self.damage(id) {
            Some(damage) => Error::Damaged {
                id,
                readable_until: damage.readable_until,
                reason: damage.reason,
            },
            None => Error::NotFound(id),
        }
    }

    /// Marks a build damaged from record `readable_until` on (keeping an earlier mark if
    /// there is one), keeps the report in the store (without waiting for it), and returns the
    /// error its readers get.
    pub(super) fn mark_damaged(&self, id: BuildId, readable_until: u64, reason: String) -> Error {
        let damage = Damage::new(readable_until, reason);
        let damage = match self.lock_damaged().remove(&id) {
            Some(known) => known.worst(damage),
            None => damage,
        };
        tracing::error!(
            build_id = %id,
            readable_until = damage.readable_until,
            reason = %damage.reason,
            "build is damaged: it is served up to the record named and takes no new record"
        );
        self.lock_damaged().insert(id, damage.clone());
        self.lock_heads().remove(&id);
        if let Ok(batch) = batch(&[(id, damage)]) {
            // Best effort: if this is lost, the damage is found again on the next read.
            let _ = self.committer.queue(&self.shared, Vec::new(), batch, false);
        }
        self.damaged_error(id)
    }

    /// Marks a build damaged if `error` says its data is corrupt; returns the error to give.
    pub(super) fn damage_from(&self, id: BuildId, at_seq: u64, error: Error) -> Error {
        match &error {
            Error::Store(e) if is_corruption(e) => {
                let readable_until = match locate(&*self.shared.store, id) {
                    Ok(Some(found)) => found.readable_until,
                    _ => at_seq,
                };
                self.mark_damaged(id, readable_until, error.to_string())
            }
            Error::Record { seq, source, .. } => {
                self.mark_damaged(id, *seq, format!("record {seq} does not decode: {source}"))
            }
            Error::Fold { source, .. } => {
                let seq = source.seq();
                self.mark_damaged(
                    id,
                    seq,
                    format!("record {seq} does not fit the build: {source}"),
                )
            }
            Error::LogMissing { .. } | Error::LogCorrupt { .. } => {
                let reason = error.to_string();
                self.mark_damaged(id, at_seq, reason)
            }
            _ => error,
        }
    }
}
