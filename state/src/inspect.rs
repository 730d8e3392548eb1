//! Offline inspection of a store: read every build without writing anything, and name every
//! record that does not decode and every journal that does not fold. For when the service
//! will not start.

use crate::build::BuildId;
use crate::journal::damage_reports;
use crate::record::{self, Record};
use crate::store::{self, Store, StoreRead};
use crate::view::{BuildView, Damage, FoldError, Summary};

/// Something wrong in a store.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    /// A record's bytes are not a record.
    #[error("build {id}, record {seq}: {source}")]
    Undecodable {
        /// The build.
        id: BuildId,
        /// The record.
        seq: u64,
        /// Why.
        source: record::Error,
    },
    /// The records do not fold into a build.
    #[error("build {id}: {source}")]
    Unfoldable {
        /// The build.
        id: BuildId,
        /// Why.
        source: FoldError,
    },
    /// The store cannot read a build's records from this one on (sled reports corruption).
    #[error("build {id}, records {seq} and later: unreadable: {reason}")]
    Unreadable {
        /// The build.
        id: BuildId,
        /// The first record that cannot be read.
        seq: u64,
        /// What the store said.
        reason: String,
    },
    /// Records the witness saw durable are gone, or the service found the build damaged.
    #[error("build {id}: damaged, readable up to record {}: {}", damage.readable_until, damage.reason)]
    Damaged {
        /// The build.
        id: BuildId,
        /// What is wrong.
        damage: Damage,
    },
    /// The log bytes a record names are missing from the segment or fail their checksum.
    #[error("build {id}, record {seq}: {reason}")]
    BadLog {
        /// The build.
        id: BuildId,
        /// The record naming the bytes.
        seq: u64,
        /// What is wrong.
        reason: String,
    },
    /// The summary kept for listing disagrees with the records (the service repairs this at
    /// start).
    #[error("build {id}: the listing summary is stale or unreadable (repaired at the next start)")]
    StaleSummary {
        /// The build.
        id: BuildId,
    },
    /// An unfinished build the index of unfinished builds does not name: a restart would
    /// not resume it.
    #[error(
        "build {id}: unfinished, but missing from the index of unfinished builds, so a restart would not resume it (a defect of image-builder: please report it)"
    )]
    Unindexed {
        /// The build.
        id: BuildId,
    },
    /// A finished build the index of finished builds does not name: retention would never
    /// remove it.
    #[error(
        "build {id}: finished, but missing from the index of finished builds, so retention would never remove it (put back at the next start if a crash cut it short)"
    )]
    UnindexedFinished {
        /// The build.
        id: BuildId,
    },
}

/// One build as read from the store.
pub struct Inspected {
    /// The build.
    pub id: BuildId,
    /// Its records, each decoded or not.
    pub records: Vec<(u64, Result<Record, record::Error>)>,
    /// Its fold, when every record decoded.
    pub view: Result<BuildView, FoldError>,
    /// Where the store stopped being able to read the build's records, and why.
    pub unreadable: Option<(u64, String)>,
}

/// Reads one build.
pub fn build(store: &dyn StoreRead, id: BuildId) -> Result<Inspected, store::Error> {
    let mut records: Vec<(u64, Result<Record, record::Error>)> = Vec::new();
    let mut unreadable = None;
    let mut next = 0;
    // One record at a time, so that a page the store cannot read costs only what is in it.
    loop {
        match store.records(id, next..u64::MAX, 0) {
            Ok(raw) => {
                let Some((seq, bytes)) = raw.into_iter().next() else {
                    break;
                };
                records.push((seq, Record::decode(&bytes)));
                next = seq + 1;
            }
            Err(e) if e.is_corruption() => {
                unreadable = Some((next, e.to_string()));
                break;
            }
            Err(e) => return Err(e),
        }
    }
    let decoded: Option<Vec<(u64, &Record)>> = records
        .iter()
        .map(|(seq, r)| r.as_ref().ok().map(|r| (*seq, r)))
        .collect();
    let view = match decoded {
        Some(ok) if unreadable.is_none() => BuildView::fold(id, ok),
        _ => Err(FoldError::Empty),
    };
    Ok(Inspected {
        id,
        records,
        view,
        unreadable,
    })
}

/// The log bytes `record` names in its build's segment, checked against the record's length
/// (and checksum, format 3); `None` for a record that names none.
pub fn named_log(
    store: &dyn StoreRead,
    id: BuildId,
    record: &Record,
) -> Option<Result<Vec<u8>, String>> {
    let (offset, len, crc32) = match record {
        Record::LogAppended { offset, len } => (*offset, *len, None),
        Record::LogChecked { offset, len, crc32 } => (*offset, *len, Some(*crc32)),
        _ => return None,
    };
    let data = match store.read_log(id, offset, len as usize) {
        Ok(data) => data,
        Err(e) => return Some(Err(format!("log bytes at {offset} unreadable: {e}"))),
    };
    Some(if data.len() as u64 != len {
        Err(format!(
            "log bytes at {offset}: the segment holds {} of the {len} bytes the journal says are durable",
            data.len()
        ))
    } else if crc32.is_some_and(|crc| crc != crc32fast::hash(&data)) {
        Err(format!(
            "log bytes {offset} to {} fail their checksum: the segment file was damaged",
            offset + len
        ))
    } else {
        Ok(data)
    })
}

/// Reads every build, oldest first.
pub fn builds(store: &dyn StoreRead) -> Result<Vec<Inspected>, store::Error> {
    store
        .journal_ids()?
        .into_iter()
        .map(|id| build(store, id))
        .collect()
}

/// Every problem in the store: each record that cannot be read or decoded, each journal
/// that does not fold, each build that lost records the witness saw durable, each build the
/// service found damaged, each stale summary.
pub fn check(store: &dyn Store) -> Result<Vec<Problem>, store::Error> {
    let mut problems = Vec::new();
    for (id, damage) in damage_reports(store)? {
        problems.push(Problem::Damaged { id, damage });
    }
    let indexed = store.unfinished()?;
    let ended = store.finished_before(i64::MAX)?;
    for inspected in builds(store)? {
        let id = inspected.id;
        let mut decoded = true;
        for (seq, record) in inspected.records {
            match record {
                Err(source) => {
                    decoded = false;
                    problems.push(Problem::Undecodable { id, seq, source });
                }
                Ok(record) => {
                    if let Some(Err(reason)) = named_log(store, id, &record) {
                        problems.push(Problem::BadLog { id, seq, reason });
                    }
                }
            }
        }
        if let Some((seq, reason)) = inspected.unreadable {
            decoded = false;
            problems.push(Problem::Unreadable { id, seq, reason });
        }
        match inspected.view {
            Ok(view) => {
                let stored = store
                    .summary(id)?
                    .and_then(|bytes| record::decode::<Summary>(&bytes).ok());
                if stored.as_ref() != Some(&view.summary()) {
                    problems.push(Problem::StaleSummary { id });
                }
                let unindexed = indexed
                    .as_ref()
                    .is_some_and(|ids| ids.binary_search(&id).is_err());
                if !view.phase().is_final() && unindexed {
                    problems.push(Problem::Unindexed { id });
                }
                let unindexed_ended = view.finished_at_ms().is_some_and(|at| {
                    ended
                        .as_ref()
                        .is_some_and(|all| all.binary_search(&(at, id)).is_err())
                });
                if unindexed_ended {
                    problems.push(Problem::UnindexedFinished { id });
                }
            }
            Err(source) if decoded => problems.push(Problem::Unfoldable { id, source }),
            Err(_) => {}
        }
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::{BuildSource, BuildSpec};
    use crate::machine::Event;
    use crate::store::{SledStore, StoreWrite, WriteBatch};

    #[test]
    fn every_bad_record_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let (good, bad, illegal) = (BuildId::new(), BuildId::new(), BuildId::new());
        let created = Record::Created {
            spec: BuildSpec {
                source: BuildSource::Reference {
                    reference: "x".into(),
                },
                force_rebuild: false,
                triggered_by: String::new(),
                supervisor_ref: String::new(),
                had_request_auth: false,
            },
            base_ref: "b".into(),
            workspace_ref: "w".into(),
            at_ms: 1,
        };
        let view = BuildView::fold(good, [(0, &created)]).unwrap();
        let mut batch = WriteBatch::default();
        for id in [good, bad, illegal] {
            batch.records.push((id, 0, created.encode().unwrap()));
        }
        batch.put_summary(good, record::encode(&view.summary()).unwrap(), None);
        batch.records.push((bad, 1, vec![7, 7]));
        let pushed = Record::Transition {
            event: Event::Pushed { digest: "d".into() },
            at_ms: 2,
        };
        batch.records.push((illegal, 1, pushed.encode().unwrap()));
        store.write(batch).unwrap();
        let problems: Vec<String> = check(&store)
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert!(
            problems
                .iter()
                .any(|p| p.contains(&format!("build {bad}, record 1: record format version 7"))),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains(&format!(
                "build {illegal}: record 1: event pushed is not allowed in phase queued"
            ))),
            "{problems:?}"
        );
        assert!(
            !problems.iter().any(|p| p.contains(&good.to_string())),
            "{problems:?}"
        );
    }
}
