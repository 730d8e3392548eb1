//! Journal records and their on-disk encoding: one format-version byte, then the record in
//! bincode 2 (serde). A record never holds a credential.
//!
//! Versions: 1 wrote build output inline, one [`Record::Log`] per line. 2 adds
//! [`Record::LogAppended`], which names bytes kept in the build's log segment file (see
//! `store/`). 3 adds [`Record::LogChecked`], the same with a checksum of the bytes, which
//! replaces it. 4 adds [`Record::BuilderOutput`], how far the log has taken a remote
//! builder's output. 5 adds [`Record::Requested`], who asked for a cancel or a retry, and
//! [`Record::Traced`], the trace of an attempt. Each layout is a prefix of the next, so all decode; a binary that knows an
//! older version refuses a newer one by name instead of misreading it.

use serde::{Deserialize, Serialize};

use crate::build::BuildSpec;
use crate::machine::Event;

/// The encoding written today. Readers reject any other version by name instead of guessing.
pub const FORMAT_VERSION: u8 = 5;

/// The oldest encoding this binary still reads.
pub const OLDEST_READABLE_VERSION: u8 = 1;

/// One entry of a build's append-only journal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    /// The build was accepted. Always the first record of a build.
    Created {
        /// The request, without credentials.
        spec: BuildSpec,
        /// The resolved base image (`name@sha256:…` or mk3's Dockerfile hash ref).
        base_ref: String,
        /// The workspace image this build makes.
        workspace_ref: String,
        /// When the build was accepted, ms since the epoch.
        at_ms: i64,
    },
    /// The build moved along one edge of the state machine.
    Transition {
        /// What happened.
        event: Event,
        /// When, ms since the epoch.
        at_ms: i64,
    },
    /// Bytes of the build log, starting at `offset` in the whole log, kept in the record
    /// itself: chunks under `journal::INLINE_LOG_BYTES` (format version 1 wrote every line
    /// this way).
    Log {
        /// Where these bytes start in the build's log.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// Someone asked for the build to stop. Journaled before anything is stopped, so a restart
    /// in the middle of a cancel finishes it. (New variants go last: bincode numbers them.)
    CancelRequested {
        /// Why, as the canceller said.
        reason: String,
        /// When, ms since the epoch.
        at_ms: i64,
    },
    /// `len` bytes of the build log, starting at `offset` in the whole log, are durable in the
    /// build's log segment. The bytes themselves are not in the record (format version 2).
    LogAppended {
        /// Where these bytes start in the build's log.
        offset: u64,
        /// How many bytes.
        len: u64,
    },
    /// `len` bytes of the build log, starting at `offset` in the whole log, are durable in the
    /// build's log segment, and their CRC-32 is `crc32`: readers check the bytes before they
    /// serve them, so a damaged segment is never served as the log (format version 3). At
    /// most [`journal::LOG_PIECE_BYTES`](crate::journal::LOG_PIECE_BYTES) bytes each.
    LogChecked {
        /// Where these bytes start in the build's log.
        offset: u64,
        /// How many bytes.
        len: u64,
        /// CRC-32 (IEEE) of the bytes.
        crc32: u32,
    },
    /// The builder of attempt `attempt` is `builder` (a Kubernetes Job, say), and the build
    /// log holds the first `consumed` bytes of its output. Journaled with `consumed` 0 before
    /// the builder is created, then in the same commit as the log bytes that took its output
    /// further, so a restart reads the builder's output on from exactly there: no gap, no
    /// duplicate (format version 4).
    BuilderOutput(BuilderProgress),
    /// An operator asked for something: who (an identity such as `certificate alice`, never
    /// a token) and what. Journaled in the same commit as what was asked (format version 5).
    Requested(OperatorRequest),
    /// The attempt `attempt` is traced as `trace_id` (32 hex digits, W3C), from `span_id`
    /// (16 hex digits), so that a restart's spans join the same trace (format version 5).
    Traced {
        /// The attempt.
        attempt: u32,
        /// The W3C trace id, 32 lower-case hex digits.
        trace_id: String,
        /// The attempt's root span, 16 lower-case hex digits.
        span_id: String,
    },
}

/// What an operator asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OperatorAction {
    /// Stop the build.
    Cancel,
    /// Run it again.
    Retry,
}

impl OperatorAction {
    /// The action's name, as listings show it.
    pub fn name(self) -> &'static str {
        match self {
            OperatorAction::Cancel => "cancel",
            OperatorAction::Retry => "retry",
        }
    }
}

/// Who asked for what, and when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorRequest {
    /// What.
    pub action: OperatorAction,
    /// Who: the identity the service authorized, never a credential.
    pub identity: String,
    /// When, ms since the epoch.
    pub at_ms: i64,
}

/// How far a build's log has taken the output of the builder of one attempt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuilderProgress {
    /// The attempt the builder runs.
    pub attempt: u32,
    /// The builder, as its executor names it (`namespace/job`).
    pub builder: String,
    /// Bytes of its output (before redaction) the log holds.
    pub consumed: u64,
}

/// A stored record could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The value was empty: not even a version byte.
    #[error("empty record: no format-version byte")]
    Empty,
    /// Written by a format this build of the service does not know.
    #[error(
        "record format version {found} is unknown (this binary reads versions {OLDEST_READABLE_VERSION} to {FORMAT_VERSION}); was the store written by a newer image-builder?"
    )]
    UnknownVersion {
        /// The version byte found.
        found: u8,
    },
    /// The bytes after the version byte are not a record.
    #[error("record does not decode: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    /// Bytes were left after the record.
    #[error("record has {0} trailing bytes")]
    Trailing(usize),
    /// The record could not be encoded.
    #[error("record does not encode: {0}")]
    Encode(#[from] bincode::error::EncodeError),
}

/// Encodes any serde value behind the format-version byte.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, Error> {
    // Measured first, so the bytes take one allocation of their size (growing a vector
    // field by field took several on the journal's hot path, and kept spare capacity).
    let mut size = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(value, &mut size, bincode::config::standard())?;
    let mut out = Vec::with_capacity(1 + size.bytes_written);
    out.push(FORMAT_VERSION);
    bincode::serde::encode_into_std_write(value, &mut out, bincode::config::standard())?;
    Ok(out)
}

/// Decodes a value written by [`encode`], checking the version byte first.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, Error> {
    let (&version, body) = bytes.split_first().ok_or(Error::Empty)?;
    if !(OLDEST_READABLE_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(Error::UnknownVersion { found: version });
    }
    let (value, used) = bincode::serde::decode_from_slice(body, bincode::config::standard())?;
    if used != body.len() {
        return Err(Error::Trailing(body.len() - used));
    }
    Ok(value)
}

impl Record {
    /// Where the log bytes this record holds or names start, and how many there are; `None`
    /// for a record that is not a log record.
    pub fn log_extent(&self) -> Option<(u64, u64)> {
        match self {
            Record::Log { offset, data } => Some((*offset, data.len() as u64)),
            Record::LogAppended { offset, len } | Record::LogChecked { offset, len, .. } => {
                Some((*offset, *len))
            }
            Record::Created { .. }
            | Record::Transition { .. }
            | Record::CancelRequested { .. }
            | Record::BuilderOutput(_)
            | Record::Requested(_)
            | Record::Traced { .. } => None,
        }
    }

    /// The stored form of this record.
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        encode(self)
    }

    /// Reads a stored record.
    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        decode(bytes)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::build::{BuildSource, CloneTargetMode, DockerfileSource};

    fn spec() -> BuildSpec {
        BuildSpec {
            source: BuildSource::Dockerfile(DockerfileSource {
                remote_uri: "file:///repo".into(),
                target_mode: CloneTargetMode::RemoteBranch,
                clone_target: "main".into(),
                dockerfile_path: "Dockerfile".into(),
                context_path: ".".into(),
                dockerfile_version: "1".into(),
                git_auth: true,
            }),
            force_rebuild: true,
            triggered_by: "me".into(),
            supervisor_ref: String::new(),
            had_request_auth: false,
        }
    }

    #[test]
    fn every_kind_round_trips() {
        let records = [
            Record::Created {
                spec: spec(),
                base_ref: "b".into(),
                workspace_ref: "w".into(),
                at_ms: 7,
            },
            Record::Transition {
                event: Event::Failed {
                    reason: "boom".into(),
                },
                at_ms: 9,
            },
            Record::Log {
                offset: 3,
                data: b"hello\n".to_vec(),
            },
            Record::LogAppended {
                offset: 9,
                len: 65536,
            },
            Record::LogChecked {
                offset: 9,
                len: 65536,
                crc32: 0xdead_beef,
            },
            Record::BuilderOutput(BuilderProgress {
                attempt: 2,
                builder: "builds/ib-x-2".into(),
                consumed: 1 << 40,
            }),
            Record::Requested(OperatorRequest {
                action: OperatorAction::Retry,
                identity: "certificate alice".into(),
                at_ms: 11,
            }),
            Record::Traced {
                attempt: 2,
                trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
                span_id: "00f067aa0ba902b7".into(),
            },
        ];
        for r in records {
            let bytes = r.encode().unwrap();
            assert_eq!(bytes[0], FORMAT_VERSION);
            assert_eq!(Record::decode(&bytes).unwrap(), r);
        }
    }

    #[test]
    fn unknown_version_is_a_clear_error() {
        let mut bytes = Record::Log {
            offset: 0,
            data: vec![1],
        }
        .encode()
        .unwrap();
        bytes[0] = 99;
        let err = Record::decode(&bytes).unwrap_err();
        assert!(matches!(err, Error::UnknownVersion { found: 99 }));
        assert!(err.to_string().contains("version 99 is unknown"));
    }

    #[test]
    fn version_one_records_still_decode() {
        let mut bytes = Record::Log {
            offset: 0,
            data: b"old\n".to_vec(),
        }
        .encode()
        .unwrap();
        bytes[0] = 1;
        assert!(matches!(Record::decode(&bytes), Ok(Record::Log { .. })));
    }

    #[test]
    fn empty_and_truncated_values_are_errors() {
        assert!(matches!(Record::decode(&[]), Err(Error::Empty)));
        let bytes = Record::Log {
            offset: 0,
            data: vec![1, 2, 3],
        }
        .encode()
        .unwrap();
        assert!(Record::decode(&bytes[..bytes.len() - 1]).is_err());
    }

    proptest! {
        #[test]
        fn logs_round_trip(offset in any::<u64>(), data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let r = Record::Log { offset, data };
            prop_assert_eq!(Record::decode(&r.encode().unwrap()).unwrap(), r);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Record::decode(&bytes);
        }

        #[test]
        fn a_flipped_or_cut_record_never_panics(
            reason in ".{0,40}",
            at in any::<prop::sample::Index>(),
            bit in 0u8..8,
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = Record::Transition {
                event: Event::Failed { reason },
                at_ms: 7,
            }
            .encode()
            .unwrap();
            let i = at.index(bytes.len());
            bytes[i] ^= 1 << bit;
            let _ = Record::decode(&bytes);
            let _ = Record::decode(&bytes[..cut.index(bytes.len())]);
        }
    }
}
