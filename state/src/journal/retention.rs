//! Retention: which builds ended before a cutoff, and removing a build for good.

use std::collections::HashMap;

use super::{Error, Journal, Result};
use crate::build::BuildId;
use crate::record;
use crate::store::{self, WriteBatch};
use crate::view::Summary;

impl Journal {
    /// Removes a finished build and its log for good (retention). Refused for a build that has
    /// not ended.
    pub async fn remove(&self, id: BuildId) -> Result<()> {
        let pending = {
            // A damaged build goes whatever its phase: it never moves again.
            let (mut heads, view) = if self.damage(id).is_some() {
                (self.lock_heads(), None)
            } else {
                let (heads, view) = self.lock_head(id)?;
                (heads, Some(view))
            };
            if let Some(view) = view.as_ref().filter(|v| !v.phase().is_final()) {
                return Err(Error::Illegal {
                    id,
                    source: crate::machine::IllegalTransition {
                        phase: view.phase(),
                        event: "removed",
                    },
                });
            }
            heads.remove(&id);
            self.shared.removed.lock().insert(id);
            // A damaged build's index entry, if any, goes at the next sweep (found stale).
            let ended = view
                .and_then(|v| v.finished_at_ms())
                .map(|at| ((at, id), false));
            let batch = WriteBatch {
                removed_builds: vec![id],
                finished: ended.into_iter().collect(),
                ..WriteBatch::default()
            };
            self.committer
                .queue(&self.shared, Vec::new(), batch, false)?
        };
        self.wait(pending).await?;
        self.lock_damaged().remove(&id);
        Ok(())
    }

    /// What retention removes at `cutoff_ms`: builds that ended before it, and damaged
    /// builds known damaged since before it, oldest first. Read from the store's index of
    /// finished builds by end time, so a sweep reads the summaries of the builds it finds
    /// and no other (a store without a complete index is read summary by summary once, and
    /// its index completed). Entries found stale (their build removed, or retried since) are
    /// dropped from the index.
    pub async fn ended_before(&self, cutoff_ms: i64) -> Result<Vec<BuildId>> {
        let store = &self.shared.store;
        let entries = match store.finished_before(cutoff_ms)? {
            Some(entries) => entries,
            None => {
                let all: Vec<store::Ended> = self
                    .summaries()?
                    .into_iter()
                    .filter(|s| s.damage.is_none() && s.phase.is_final())
                    .filter_map(|s| Some((s.finished_at_ms?, s.id)))
                    .collect();
                store.complete_finished_index(&all)?;
                tracing::info!(
                    finished = all.len(),
                    "indexed the finished builds of a store written before the index existed"
                );
                let mut before: Vec<_> =
                    all.into_iter().filter(|(at, _)| *at < cutoff_ms).collect();
                before.sort();
                before
            }
        };
        let damaged: HashMap<BuildId, i64> = self
            .lock_damaged()
            .iter()
            .map(|(id, damage)| (*id, damage.found_at_ms))
            .collect();
        let mut ended = Vec::new();
        let mut stale = WriteBatch::default();
        for (at, id) in entries {
            if damaged.contains_key(&id) {
                // A damaged build goes by when it was found damaged (below).
                continue;
            }
            let current: Option<Summary> = store
                .summary(id)?
                .and_then(|bytes| record::decode(&bytes).ok());
            match current {
                Some(s) if s.phase.is_final() && s.finished_at_ms == Some(at) => ended.push(id),
                _ => stale.finished.push(((at, id), false)),
            }
        }
        ended.extend(
            damaged
                .iter()
                .filter(|(_, found_at)| **found_at < cutoff_ms)
                .map(|(id, _)| *id),
        );
        if !stale.is_empty() {
            tracing::debug!(
                stale = stale.finished.len(),
                "dropping stale entries of the index of finished builds"
            );
            self.committer
                .queue(&self.shared, Vec::new(), stale, false)?
                .wait()
                .await?;
        }
        Ok(ended)
    }
}
