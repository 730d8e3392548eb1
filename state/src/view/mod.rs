//! A build's current view: the fold of its journal records. Nothing here is stored that the
//! records do not say; [`Summary`] is the compact form kept for listing, rebuilt from the
//! records whenever it disagrees with them.

mod summary;

use serde::{Deserialize, Serialize};

use crate::build::{BuildId, BuildSpec};
use crate::machine::{Event, IllegalTransition, Machine, Phase};
use crate::record::{BuilderProgress, OperatorRequest, Record};

pub use summary::{Damage, Summary};

/// The records of a build do not fold into a valid build.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FoldError {
    /// The journal of the build holds no record.
    #[error("the journal holds no record")]
    Empty,
    /// The first record is not `Created`.
    #[error("record {seq} comes before the build was created")]
    NotCreatedFirst {
        /// The offending record's sequence number.
        seq: u64,
    },
    /// A second `Created` record.
    #[error("record {seq} creates the build a second time")]
    CreatedTwice {
        /// The offending record's sequence number.
        seq: u64,
    },
    /// Sequence numbers are not 0, 1, 2, …
    #[error("record {found} follows record {}: a record is missing", expected.wrapping_sub(1))]
    SeqGap {
        /// The sequence number that should have come.
        expected: u64,
        /// The one that came.
        found: u64,
    },
    /// A transition the state machine does not have.
    #[error("record {seq}: {source}")]
    Illegal {
        /// The offending record's sequence number.
        seq: u64,
        /// The rejected edge.
        source: IllegalTransition,
    },
    /// A log chunk that does not start where the log ended.
    #[error("record {seq}: log chunk at byte {found}, but the log ends at byte {expected}")]
    LogGap {
        /// The offending record's sequence number.
        seq: u64,
        /// Where the log ended.
        expected: u64,
        /// Where the chunk claims to start.
        found: u64,
    },
    /// Builder progress for an attempt that is not the build's current one.
    #[error(
        "record {seq}: names attempt {found} (builder progress or trace), but the build is on attempt {expected}"
    )]
    OtherAttempt {
        /// The offending record's sequence number.
        seq: u64,
        /// The build's attempt.
        expected: u32,
        /// The attempt the record names.
        found: u32,
    },
}

impl FoldError {
    /// The first record that did not fit: the records before it fold (0 for an empty
    /// journal).
    pub fn seq(&self) -> u64 {
        match self {
            FoldError::Empty => 0,
            FoldError::NotCreatedFirst { seq }
            | FoldError::CreatedTwice { seq }
            | FoldError::Illegal { seq, .. }
            | FoldError::LogGap { seq, .. }
            | FoldError::OtherAttempt { seq, .. } => *seq,
            FoldError::SeqGap { expected, .. } => *expected,
        }
    }
}

/// When the build entered each phase it passed through.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseEntry {
    /// The phase entered.
    pub phase: Phase,
    /// When, ms since the epoch.
    pub at_ms: i64,
}

/// Everything known about a build, folded from its records.
#[derive(Clone, Debug)]
pub struct BuildView {
    /// The build.
    pub id: BuildId,
    /// What was asked.
    pub spec: BuildSpec,
    /// The base image.
    pub base_ref: String,
    /// The workspace image.
    pub workspace_ref: String,
    /// When the build was accepted.
    pub created_at_ms: i64,
    /// The phases passed through, with their entry times; the last is the current one.
    pub phases: Vec<PhaseEntry>,
    /// Why the build failed or was cancelled.
    pub failure: Option<String>,
    /// The workspace image's manifest digest, once pushed.
    pub digest: Option<String>,
    /// Bytes of log so far: the offset of the next chunk.
    pub log_len: u64,
    /// The sequence number the next record gets.
    pub next_seq: u64,
    /// The attempt running or last run: 1, then one more per retry.
    pub attempt: u32,
    /// A cancel was asked for (and the build has not ended since).
    pub cancel_requested: Option<String>,
    /// How far the log has taken the output of the current attempt's builder, for executors
    /// whose builders outlive the service (see [`BuildView::builder_progress`]).
    builder: Option<BuilderProgress>,
    /// Every cancel and retry an operator asked for, oldest first: who and when.
    pub requests: Vec<OperatorRequest>,
    /// The trace of the current attempt, once it is traced: (trace id, root span id).
    pub trace: Option<(String, String)>,
    machine: Machine,
}

impl BuildView {
    /// Starts a view from a build's `Created` record.
    fn created(id: BuildId, record: &Record) -> Option<Self> {
        let Record::Created {
            spec,
            base_ref,
            workspace_ref,
            at_ms,
        } = record
        else {
            return None;
        };
        Some(Self {
            id,
            spec: spec.clone(),
            base_ref: base_ref.clone(),
            workspace_ref: workspace_ref.clone(),
            created_at_ms: *at_ms,
            phases: vec![PhaseEntry {
                phase: Phase::Queued,
                at_ms: *at_ms,
            }],
            failure: None,
            digest: None,
            log_len: 0,
            next_seq: 1,
            attempt: 1,
            cancel_requested: None,
            builder: None,
            requests: Vec::new(),
            trace: None,
            machine: Machine::new(),
        })
    }

    /// Folds a build's records, in sequence order, into its view.
    pub fn fold<'a>(
        id: BuildId,
        records: impl IntoIterator<Item = (u64, &'a Record)>,
    ) -> Result<Self, FoldError> {
        let mut records = records.into_iter();
        let (seq, first) = records.next().ok_or(FoldError::Empty)?;
        if seq != 0 {
            return Err(FoldError::SeqGap {
                expected: 0,
                found: seq,
            });
        }
        let mut view = Self::created(id, first).ok_or(FoldError::NotCreatedFirst { seq })?;
        for (seq, record) in records {
            view.apply(seq, record)?;
        }
        Ok(view)
    }

    /// Applies the record that follows this view, or says why it cannot follow.
    pub fn apply(&mut self, seq: u64, record: &Record) -> Result<(), FoldError> {
        if seq != self.next_seq {
            return Err(FoldError::SeqGap {
                expected: self.next_seq,
                found: seq,
            });
        }
        match record {
            Record::Created { .. } => return Err(FoldError::CreatedTwice { seq }),
            Record::Transition { event, at_ms } => {
                let phase = self
                    .machine
                    .apply(event)
                    .map_err(|source| FoldError::Illegal { seq, source })?;
                match event {
                    Event::Failed { reason } | Event::Cancelled { reason } => {
                        self.failure = Some(reason.clone());
                        self.cancel_requested = None;
                    }
                    Event::Pushed { digest } => self.digest = Some(digest.clone()),
                    Event::Retried => {
                        self.attempt += 1;
                        self.failure = None;
                        self.trace = None;
                    }
                    _ => {}
                }
                self.phases.push(PhaseEntry {
                    phase,
                    at_ms: *at_ms,
                });
            }
            Record::Log { offset, data } => self.extend_log(seq, *offset, data.len() as u64)?,
            Record::LogAppended { offset, len } | Record::LogChecked { offset, len, .. } => {
                self.extend_log(seq, *offset, *len)?;
            }
            Record::CancelRequested { reason, .. } => {
                if !self.phase().is_final() {
                    self.cancel_requested = Some(reason.clone());
                }
            }
            Record::BuilderOutput(progress) => {
                if progress.attempt != self.attempt {
                    return Err(FoldError::OtherAttempt {
                        seq,
                        expected: self.attempt,
                        found: progress.attempt,
                    });
                }
                self.builder = Some(progress.clone());
            }
            Record::Requested(request) => self.requests.push(request.clone()),
            Record::Traced {
                attempt,
                trace_id,
                span_id,
            } => {
                if *attempt != self.attempt {
                    return Err(FoldError::OtherAttempt {
                        seq,
                        expected: self.attempt,
                        found: *attempt,
                    });
                }
                self.trace = Some((trace_id.clone(), span_id.clone()));
            }
        }
        self.next_seq += 1;
        Ok(())
    }

    fn extend_log(&mut self, seq: u64, offset: u64, len: u64) -> Result<(), FoldError> {
        if offset != self.log_len {
            return Err(FoldError::LogGap {
                seq,
                expected: self.log_len,
                found: offset,
            });
        }
        self.log_len += len;
        Ok(())
    }

    /// The builder of the current attempt and how much of its output the log holds; `None`
    /// before one was journaled for this attempt.
    pub fn builder_progress(&self) -> Option<&BuilderProgress> {
        self.builder
            .as_ref()
            .filter(|progress| progress.attempt == self.attempt)
    }

    /// Would this event be accepted now?
    pub fn check(&self, event: &Event) -> Result<Phase, IllegalTransition> {
        self.machine.check(event)
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.machine.phase()
    }

    /// When the build entered `phase` last, if it did.
    pub fn entered_at_ms(&self, phase: Phase) -> Option<i64> {
        self.phases
            .iter()
            .rev()
            .find(|p| p.phase == phase)
            .map(|p| p.at_ms)
    }

    /// When the build reached a final phase, if it has.
    pub fn finished_at_ms(&self) -> Option<i64> {
        self.phase()
            .is_final()
            .then(|| self.phases.last().map(|p| p.at_ms))
            .flatten()
    }

    /// The compact form kept for listing.
    pub fn summary(&self) -> Summary {
        Summary {
            id: self.id,
            last_seq: self.next_seq - 1,
            phase: self.phase(),
            base_ref: self.base_ref.clone(),
            workspace_ref: self.workspace_ref.clone(),
            triggered_by: self.spec.triggered_by.clone(),
            created_at_ms: self.created_at_ms,
            finished_at_ms: self.finished_at_ms(),
            failure: self.failure.clone(),
            attempt: self.attempt,
            damage: None,
        }
    }

    /// [`BuildView::summary`], encoded as stored (`record::encode`), without copying the
    /// view's strings first: the journal encodes one at every append.
    pub fn encoded_summary(&self) -> Result<Vec<u8>, crate::record::Error> {
        /// [`Summary`]'s stored fields, in its order, borrowed.
        #[derive(Serialize)]
        struct Stored<'a> {
            id: BuildId,
            last_seq: u64,
            phase: Phase,
            base_ref: &'a str,
            workspace_ref: &'a str,
            triggered_by: &'a str,
            created_at_ms: i64,
            finished_at_ms: Option<i64>,
            failure: Option<&'a str>,
            attempt: u32,
        }
        crate::record::encode(&Stored {
            id: self.id,
            last_seq: self.next_seq - 1,
            phase: self.phase(),
            base_ref: &self.base_ref,
            workspace_ref: &self.workspace_ref,
            triggered_by: &self.spec.triggered_by,
            created_at_ms: self.created_at_ms,
            finished_at_ms: self.finished_at_ms(),
            failure: self.failure.as_deref(),
            attempt: self.attempt,
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::build::BuildSource;

    fn created() -> Record {
        Record::Created {
            spec: BuildSpec {
                source: BuildSource::Reference {
                    reference: "alpine".into(),
                },
                force_rebuild: false,
                triggered_by: String::new(),
                supervisor_ref: String::new(),
                had_request_auth: false,
            },
            base_ref: "b".into(),
            workspace_ref: "w".into(),
            at_ms: 1,
        }
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            Just(Event::Admitted),
            Just(Event::Resolved),
            Just(Event::CacheHit),
            Just(Event::CacheMiss),
            Just(Event::Built),
            Just(Event::Pushed {
                digest: "sha256:d".into()
            }),
            Just(Event::Failed { reason: "f".into() }),
            Just(Event::Cancelled { reason: "c".into() }),
            Just(Event::Retried),
        ]
    }

    /// A journal as the service writes it: only accepted transitions, logs at the log's end.
    fn journal() -> impl Strategy<Value = Vec<Record>> {
        proptest::collection::vec(
            prop_oneof![
                event().prop_map(Some),
                proptest::collection::vec(any::<u8>(), 0..16).prop_map(|_| None)
            ],
            0..40,
        )
        .prop_map(|steps| {
            let mut records = vec![created()];
            let mut machine = Machine::new();
            let mut log_len = 0u64;
            for (i, step) in steps.into_iter().enumerate() {
                match step {
                    Some(event) if machine.apply(&event).is_ok() => {
                        records.push(Record::Transition {
                            event,
                            at_ms: i as i64 + 2,
                        });
                    }
                    Some(_) => {}
                    None => {
                        let data = format!("line {i}\n").into_bytes();
                        records.push(Record::Log {
                            offset: log_len,
                            data: data.clone(),
                        });
                        log_len += data.len() as u64;
                    }
                }
            }
            records
        })
    }

    proptest! {
        #[test]
        fn every_prefix_of_a_journal_folds(records in journal()) {
            let id = BuildId::new();
            for end in 1..=records.len() {
                let view = BuildView::fold(id, records[..end].iter().enumerate().map(|(i, r)| (i as u64, r)));
                let view = view.unwrap();
                prop_assert_eq!(view.next_seq, end as u64);
                prop_assert_eq!(view.phases.last().map(|p| p.phase), Some(view.phase()));
                // The summary encoded in place is the summary, byte for byte.
                let encoded = view.encoded_summary().unwrap();
                prop_assert_eq!(&encoded, &crate::record::encode(&view.summary()).unwrap());
                prop_assert_eq!(crate::record::decode::<Summary>(&encoded).unwrap(), view.summary());
            }
        }

        #[test]
        fn random_events_never_panic_and_illegal_ones_are_named(events in proptest::collection::vec(event(), 0..20)) {
            let mut view = BuildView::fold(BuildId::new(), [(0, &created())]).unwrap();
            for event in events {
                let before = view.phase();
                let seq = view.next_seq;
                match view.apply(seq, &Record::Transition { event, at_ms: 0 }) {
                    Ok(()) => prop_assert!(!before.is_final() || view.phase() == Phase::Queued),
                    Err(FoldError::Illegal { seq: s, .. }) => {
                        prop_assert_eq!(s, seq);
                        prop_assert_eq!(view.phase(), before);
                    }
                    Err(other) => prop_assert!(false, "unexpected {other}"),
                }
            }
        }
    }

    #[test]
    fn a_log_gap_is_detected() {
        let created = created();
        let chunk = Record::Log {
            offset: 5,
            data: vec![b'x'],
        };
        let err = BuildView::fold(BuildId::new(), [(0, &created), (1, &chunk)]).unwrap_err();
        assert_eq!(
            err,
            FoldError::LogGap {
                seq: 1,
                expected: 0,
                found: 5
            }
        );
    }

    #[test]
    fn a_missing_record_is_detected() {
        let created = created();
        let t = Record::Transition {
            event: Event::Resolved,
            at_ms: 2,
        };
        let err = BuildView::fold(BuildId::new(), [(0, &created), (2, &t)]).unwrap_err();
        assert_eq!(
            err,
            FoldError::SeqGap {
                expected: 1,
                found: 2
            }
        );
    }

    #[test]
    fn a_journal_must_start_with_created() {
        let t = Record::Transition {
            event: Event::Resolved,
            at_ms: 2,
        };
        assert_eq!(
            BuildView::fold(BuildId::new(), [(0, &t)]).unwrap_err(),
            FoldError::NotCreatedFirst { seq: 0 }
        );
        assert_eq!(
            BuildView::fold(BuildId::new(), []).unwrap_err(),
            FoldError::Empty
        );
    }
}
