//! Why a journal operation failed.

use std::sync::Arc;

use crate::build::BuildId;
use crate::machine::IllegalTransition;
use crate::record;
use crate::store;
use crate::view::FoldError;

/// Why a journal operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The store failed to write, sync or read.
    #[error("{0}")]
    Store(Arc<store::Error>),
    /// A stored record or summary does not decode.
    #[error("build {id}, record {seq}: {source}")]
    Record {
        /// The build.
        id: BuildId,
        /// The record's sequence number.
        seq: u64,
        /// What is wrong with it.
        source: Arc<record::Error>,
    },
    /// A build's records do not fold into a valid build.
    #[error("build {id}: {source}")]
    Fold {
        /// The build.
        id: BuildId,
        /// What is wrong.
        source: FoldError,
    },
    /// The build does not exist.
    #[error("build {0} does not exist")]
    NotFound(BuildId),
    /// The build exists already.
    #[error("build {0} exists already")]
    Exists(BuildId),
    /// The event is not allowed in the build's current phase.
    #[error("build {id}: {source}")]
    Illegal {
        /// The build.
        id: BuildId,
        /// The refused edge.
        source: IllegalTransition,
    },
    /// The build's journal is damaged: what is readable was served, the rest cannot be.
    #[error(
        "build {id} is damaged: its journal can be read up to record {readable_until} only ({reason})"
    )]
    Damaged {
        /// The build.
        id: BuildId,
        /// Records before this one are readable.
        readable_until: u64,
        /// What is wrong.
        reason: String,
    },
    /// The committer thread is gone (the journal is shutting down).
    #[error("the journal is closed")]
    Closed,
    /// Log bytes in the segment do not match the checksum their record keeps.
    #[error(
        "build {id}: log bytes {offset} to {} fail their checksum (record {seq}): the log segment file was damaged",
        offset + len
    )]
    LogCorrupt {
        /// The build.
        id: BuildId,
        /// The record that names the bytes.
        seq: u64,
        /// Where they start.
        offset: u64,
        /// How many.
        len: u64,
    },
    /// A durable record names log bytes its segment does not hold (the file was cut short
    /// or removed behind the service's back).
    #[error(
        "build {id}: the log segment ends before byte {offset}, which the journal says is durable"
    )]
    LogMissing {
        /// The build.
        id: BuildId,
        /// The first byte missing.
        offset: u64,
    },
}

impl Error {
    /// Whether the store failed because its file system is full.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, Error::Store(e) if e.is_disk_full())
    }
}

impl From<store::Error> for Error {
    fn from(e: store::Error) -> Self {
        Error::Store(Arc::new(e))
    }
}
