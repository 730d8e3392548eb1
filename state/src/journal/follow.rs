//! Readers that tail one build: [`Follower`] yields its durable records, [`Reader`] the same
//! with log records turned into their durable bytes. Both read the store in bounded batches, only as fast as their caller
//! asks, and wake on each durable commit: a reader's memory does not grow with the log.

use std::collections::VecDeque;

use tokio::sync::watch;

use super::{Error, Journal, Result};
use crate::build::BuildId;
use crate::record::Record;
use crate::view::BuildView;

/// Bytes of records a follower reads from the store at once (each record counts as at least
/// [`store::RECORD_FLOOR_BYTES`](crate::store::RECORD_FLOOR_BYTES), about what it takes in
/// memory once decoded).
const RECORD_BATCH_BYTES: usize = 32 * 1024;

/// The largest piece of log a [`Reader`] returns at once.
pub const LOG_PIECE_BYTES: usize = 64 * 1024;

impl Journal {
    /// Follows a build's durable records from `from_seq` on: what is stored now, then each
    /// record as it becomes durable, ending after the record that puts the build in a final
    /// phase. No gap, no duplicate, and a slow follower holds up nobody.
    pub fn follow(&self, id: BuildId, from_seq: u64) -> Follower {
        Follower {
            journal: self.clone(),
            commits: self.commits(),
            id,
            from_seq,
            read_seq: 0,
            view: None,
            buffer: VecDeque::new(),
            ended: false,
            failed: None,
        }
    }
}

/// A reader that tails one build's journal; see [`Journal::follow`].
pub struct Follower {
    journal: Journal,
    commits: watch::Receiver<u64>,
    id: BuildId,
    from_seq: u64,
    read_seq: u64,
    view: Option<BuildView>,
    buffer: VecDeque<(u64, Record)>,
    ended: bool,
    /// Why the follower stops, given once the records before it were returned.
    failed: Option<Error>,
}

impl Follower {
    /// The next record, waiting for it if need be; `None` once the build has ended and every
    /// record was returned. The first call fails with [`Error::NotFound`] for an unknown build.
    pub async fn next(&mut self) -> Option<Result<(u64, Record)>> {
        loop {
            if let Some(record) = self.buffer.pop_front() {
                return Some(Ok(record));
            }
            if let Some(error) = self.failed.take() {
                return Some(Err(error));
            }
            if self.ended {
                return None;
            }
            // Mark the current generation seen before reading, so a commit that lands after
            // the read wakes us.
            self.commits.borrow_and_update();
            let records =
                match self
                    .journal
                    .records_batch(self.id, self.read_seq, RECORD_BATCH_BYTES)
                {
                    Ok(records) => records,
                    Err(e) => return Some(Err(e)),
                };
            if records.is_empty() {
                if self.view.is_none() {
                    self.ended = true;
                    return Some(Err(Error::NotFound(self.id)));
                }
                if self.commits.changed().await.is_err() {
                    return Some(Err(Error::Closed));
                }
                continue;
            }
            for (seq, record) in records {
                let id = self.id;
                let folded = match &mut self.view {
                    None => BuildView::fold(id, [(seq, &record)]).map(|v| self.view = Some(v)),
                    Some(view) => view.apply(seq, &record),
                };
                if let Err(source) = folded {
                    self.ended = true;
                    let error = Error::Fold { id, source };
                    self.failed = Some(self.journal.damage_from(id, seq, error));
                    break;
                }
                self.read_seq = seq + 1;
                if seq >= self.from_seq {
                    self.buffer.push_back((seq, record));
                }
                // Ended means ended as of the newest durable record: a retried build's
                // earlier final phase does not stop a reader from seeing the attempts after
                // it. A batch may hold more than the build's first ending, so look after each.
            }
            if self.view.as_ref().is_some_and(|v| v.phase().is_final())
                && self.read_seq >= self.last_durable_seq_plus_one()
                && self.journal.damage(self.id).is_none()
            {
                self.ended = true;
            }
        }
    }

    /// One past the newest durable record: whether a batch reached the end of the journal.
    fn last_durable_seq_plus_one(&self) -> u64 {
        match self.journal.last_seq(self.id) {
            Ok(Some(seq)) => seq + 1,
            // An error here shows again on the next read; say "not at the end" meanwhile.
            Ok(None) | Err(_) => u64::MAX,
        }
    }

    /// The build as folded from every record read so far.
    pub fn view(&self) -> Option<&BuildView> {
        self.view.as_ref()
    }

    /// The build this follower reads.
    pub fn id(&self) -> BuildId {
        self.id
    }
}

/// Where a log piece comes from: bytes a record holds (format 1) or a durable extent of the
/// build's segment (format 2), from `at` to `end`, or a checksummed piece of the segment
/// (format 3), read whole and checked before any of it is served.
enum Extent {
    Inline {
        seq: u64,
        offset: u64,
        data: Vec<u8>,
        start: usize,
    },
    Segment {
        seq: u64,
        at: u64,
        end: u64,
    },
    Checked {
        seq: u64,
        offset: u64,
        len: u64,
        crc32: u32,
        at: u64,
    },
}

/// What a [`Reader`] yields: a record, or a piece of log that a record names.
#[derive(Debug)]
pub enum Entry {
    /// A record that is not a log record.
    Record {
        /// Its sequence number.
        seq: u64,
        /// The record (boxed: a `Created` record is large, log pieces are the common case).
        record: Box<Record>,
    },
    /// At most [`LOG_PIECE_BYTES`] of log, from the log record `seq`.
    Log {
        /// The log record these bytes belong to.
        seq: u64,
        /// Where they start in the whole log.
        offset: u64,
        /// The bytes.
        bytes: Vec<u8>,
    },
}

impl Journal {
    /// Reads a build's durable journal from record `from_seq` and log byte `from_byte` on,
    /// log records as their bytes in bounded pieces, following it live until the build ends.
    pub fn read(&self, id: BuildId, from_seq: u64, from_byte: u64) -> Reader {
        Reader {
            records: self.follow(id, from_seq),
            from_byte,
            extent: None,
        }
    }
}

/// A reader of one build's durable journal with its log bytes; see [`Journal::read`].
pub struct Reader {
    records: Follower,
    from_byte: u64,
    extent: Option<Extent>,
}

impl Reader {
    /// The next entry, waiting for it if need be; `None` once the build has ended and every
    /// entry was returned.
    pub async fn next(&mut self) -> Option<Result<Entry>> {
        loop {
            if let Some(extent) = self.extent.take() {
                return Some(self.piece(extent));
            }
            let (seq, record) = match self.records.next().await? {
                Ok(next) => next,
                Err(e) => return Some(Err(e)),
            };
            let Some((offset, len)) = record.log_extent() else {
                return Some(Ok(Entry::Record {
                    seq,
                    record: Box::new(record),
                }));
            };
            let end = offset + len;
            if end <= self.from_byte {
                continue;
            }
            let at = self.from_byte.max(offset);
            self.extent = Some(match record {
                Record::Log { data, .. } => Extent::Inline {
                    seq,
                    offset,
                    data,
                    start: (at - offset) as usize,
                },
                Record::LogChecked { crc32, .. } => Extent::Checked {
                    seq,
                    offset,
                    len,
                    crc32,
                    at,
                },
                _ => Extent::Segment { seq, at, end },
            });
        }
    }

    /// The next piece of `extent`; what is left of it stays for the next call.
    fn piece(&mut self, extent: Extent) -> Result<Entry> {
        let (seq, at, bytes) = match extent {
            Extent::Checked {
                seq,
                offset,
                len,
                crc32,
                at,
            } => {
                let journal = &self.records.journal;
                let id = self.records.id();
                let data = journal
                    .read_log(id, offset, len as usize)
                    .map_err(|e| journal.damage_from(id, seq, e))?;
                if crc32fast::hash(&data) != crc32 {
                    let corrupt = Error::LogCorrupt {
                        id,
                        seq,
                        offset,
                        len,
                    };
                    return Err(journal.damage_from(id, seq, corrupt));
                }
                // Checked whole: served from memory like bytes kept in a record.
                return self.piece(Extent::Inline {
                    seq,
                    offset,
                    data,
                    start: (at - offset) as usize,
                });
            }
            Extent::Inline {
                seq,
                offset,
                data,
                start,
            } => {
                let end = (start + LOG_PIECE_BYTES).min(data.len());
                let bytes = data[start..end].to_vec();
                if end < data.len() {
                    self.extent = Some(Extent::Inline {
                        seq,
                        offset,
                        data,
                        start: end,
                    });
                }
                (seq, offset + start as u64, bytes)
            }
            Extent::Segment { seq, at, end } => {
                let len = (end - at).min(LOG_PIECE_BYTES as u64);
                let id = self.records.id();
                let bytes = self
                    .records
                    .journal
                    .read_log(id, at, len as usize)
                    .map_err(|e| self.records.journal.damage_from(id, seq, e))?;
                if at + len < end {
                    self.extent = Some(Extent::Segment {
                        seq,
                        at: at + len,
                        end,
                    });
                }
                (seq, at, bytes)
            }
        };
        self.from_byte = at + bytes.len() as u64;
        Ok(Entry::Log {
            seq,
            offset: at,
            bytes,
        })
    }

    /// The build as folded from every record read so far.
    pub fn view(&self) -> Option<&BuildView> {
        self.records.view()
    }
}
