//! The pass run when a journal opens: builds that lost records or do not fold are found
//! damaged, summaries agree with records, and log segments whose builds are gone are removed.

use std::collections::HashMap;
use std::sync::Arc;

use super::damage;
use super::{Error, Result};
use crate::build::BuildId;
use crate::record;
use crate::store::{Store, WriteBatch};
use crate::view::{BuildView, Damage, Summary};

/// Runs the open-time pass and returns every damaged build. What it costs grows with the
/// builds written since the last open (the witness, the write-ahead log), not with the store:
/// damage in older builds is found when they are read (or by `store check`). New damage is
/// durable before the witness starts afresh.
pub(super) fn find_damage(store: &dyn Store) -> Result<Vec<(BuildId, Damage)>> {
    let mut found: HashMap<BuildId, Damage> = HashMap::new();
    let mut add = |id, damage: Damage| {
        let worse = found
            .get(&id)
            .is_none_or(|known| damage.readable_until < known.readable_until);
        if worse {
            found.insert(id, damage);
        }
    };
    for (id, damage) in damage::lost_records(store)? {
        add(id, damage);
    }
    let scope = store.written_since_last_open();
    for (id, damage) in repair_summaries(store, scope.as_deref())? {
        add(id, damage);
    }
    let mut all: HashMap<BuildId, Damage> = damage::stored(store)?.into_iter().collect();
    let new: Vec<(BuildId, Damage)> = found
        .into_iter()
        .filter(|(id, damage)| {
            all.get(id)
                .is_none_or(|known| damage.readable_until < known.readable_until)
        })
        .collect();
    if !new.is_empty() {
        for (id, damage) in &new {
            tracing::error!(
                build_id = %id,
                readable_until = damage.readable_until,
                reason = %damage.reason,
                "build is damaged: it is served up to the record named and takes no new record"
            );
        }
        store.write(damage::batch(&new)?)?;
        store.sync()?;
        all.extend(new);
    }
    store.start_witness()?;
    // A damaged build's segment stays, even with no record left to name it: it is evidence.
    let pruned = match &scope {
        None => {
            let mut keep = store.journal_ids()?;
            keep.extend(all.keys());
            keep.sort();
            store.prune_logs(&keep)?
        }
        Some(ids) => {
            let mut pruned = 0;
            for &id in ids {
                if !all.contains_key(&id) && store.last_seq(id)?.is_none() {
                    store.remove_log(id)?;
                    pruned += 1;
                }
            }
            pruned
        }
    };
    if pruned > 0 {
        tracing::info!(
            pruned,
            "removed log segments whose builds were already removed"
        );
    }
    Ok(all.into_iter().collect())
}

/// Makes the summaries of `scope` (every build when `None`) agree with their records:
/// missing, stale or unreadable summaries are refolded; summaries of builds without records
/// are dropped. Returns the builds whose records do not fold (their records are never
/// rewritten). A summary can only lag records written since the last open, which checked
/// every other: so the store's scope keeps this pass from growing with history.
fn repair_summaries(
    store: &dyn Store,
    scope: Option<&[BuildId]>,
) -> Result<Vec<(BuildId, Damage)>> {
    let mut damaged = Vec::new();
    let mut batch = WriteBatch::default();
    let ids = match scope {
        Some(ids) => ids.to_vec(),
        None => store.journal_ids()?,
    };
    for &id in &ids {
        let Some(last_seq) = store.last_seq(id)? else {
            if scope.is_some() && store.summary(id)?.is_some() {
                batch.removed_summaries.push(id);
            }
            continue;
        };
        let current = store
            .summary(id)?
            .and_then(|bytes| record::decode::<Summary>(&bytes).ok())
            .filter(|s| s.last_seq == last_seq);
        // A summary that survived has its index entries too: a checkpoint writes each
        // build's entries before its summary, and sled keeps a prefix of what it was given.
        if current.is_some() {
            continue;
        }
        let folded = store
            .records(id, 0..u64::MAX, usize::MAX)
            .map_err(Error::from)
            .and_then(|raw| super::decode_records(id, raw))
            .and_then(|records| {
                BuildView::fold(id, records.iter().map(|(seq, r)| (*seq, r)))
                    .map_err(|source| Error::Fold { id, source })
            });
        match folded {
            Ok(view) => {
                tracing::info!(build_id = %id, "rebuilt the build's summary from its journal");
                let bytes = view.encoded_summary().map_err(|e| Error::Record {
                    id,
                    seq: last_seq,
                    source: Arc::new(e),
                })?;
                batch.put_summary(id, bytes, view.finished_at_ms());
            }
            Err(e) => match damage::locate(store, id)? {
                Some(damage) => damaged.push((id, damage)),
                None => return Err(e),
            },
        }
    }
    if scope.is_none() {
        for (id, _) in store.summaries()? {
            if ids.binary_search(&id).is_err() {
                batch.removed_summaries.push(id);
            }
        }
    }
    if !batch.is_empty() {
        store.write(batch)?;
        store.sync()?;
        // Repaired summaries and index entries are derived, so no log holds them, and the
        // witness is about to forget which builds needed them: into sled now, or a second
        // crash soon after this start would leave them stale for good.
        store.checkpoint()?;
    }
    Ok(damaged)
}
