//! The repair pass run when a journal opens: summaries agree with records, and log segments
//! whose builds are gone are removed.

use std::sync::Arc;

use super::{Error, Result, decode_records};
use crate::record;
use crate::store::{Store, WriteBatch};
use crate::view::{BuildView, Summary};

/// Makes every summary agree with its build's records: missing, stale or unreadable summaries
/// are refolded; summaries of builds without records are dropped. A build whose records do not
/// fold is reported and left alone (its records are never rewritten).
pub(super) fn repair_summaries(store: &dyn Store) -> Result<()> {
    let mut batch = WriteBatch::default();
    let ids = store.journal_ids()?;
    for &id in &ids {
        let Some(last_seq) = store.last_seq(id)? else {
            continue;
        };
        let current = store
            .summary(id)?
            .and_then(|bytes| record::decode::<Summary>(&bytes).ok())
            .filter(|s| s.last_seq == last_seq);
        if current.is_some() {
            continue;
        }
        let records = match decode_records(id, store.records(id, 0, usize::MAX)?) {
            Ok(records) => records,
            Err(e) => {
                tracing::error!(build_id = %id, error = %e, "journal record unreadable; build left as it is");
                continue;
            }
        };
        match BuildView::fold(id, records.iter().map(|(seq, r)| (*seq, r))) {
            Ok(view) => {
                tracing::info!(build_id = %id, "rebuilt the build's summary from its journal");
                let bytes = record::encode(&view.summary()).map_err(|e| Error::Record {
                    id,
                    seq: last_seq,
                    source: Arc::new(e),
                })?;
                batch.summaries.push((id, bytes));
            }
            Err(source) => {
                tracing::error!(build_id = %id, error = %source, "journal does not fold; build left as it is")
            }
        }
    }
    for (id, _) in store.summaries()? {
        if ids.binary_search(&id).is_err() {
            batch.removed_summaries.push(id);
        }
    }
    if !batch.is_empty() {
        store.write(batch)?;
        store.sync()?;
    }
    let pruned = store.prune_logs(&ids)?;
    if pruned > 0 {
        tracing::info!(
            pruned,
            "removed log segments whose builds were already removed"
        );
    }
    Ok(())
}
