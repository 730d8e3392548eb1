//! Readers that tail one build: [`Follower`] yields its durable records, [`Reader`] the same
//! with log records turned into their durable bytes. Both read the store in bounded batches, only as fast as their caller
//! asks, and wake on each durable commit of their build (never on other builds' commits): a
//! reader's memory does not grow with the log, nor its work with the builds beside it.

use std::collections::VecDeque;

use tokio::sync::watch;

use super::{Error, Journal, Result, Shared};
use crate::build::BuildId;
use crate::record::Record;
use crate::view::BuildView;

/// Bytes of records a follower reads from the store at once (each record counts as at least
/// [`store::RECORD_FLOOR_BYTES`](crate::store::RECORD_FLOOR_BYTES), what it takes in memory
/// once decoded): what a follower holds, however far behind its reader is (about 66 records,
/// 2 MiB of log named by them).
const RECORD_BATCH_BYTES: usize = 8 * 1024;

/// The largest piece of log a [`Reader`] returns at once, and of a checksummed log record.
///
/// A listener that stops reading holds a few pieces in the gRPC stack below the service (one
/// in the encoder's hands, one waiting for flow-control window, the rest of one partly sent),
/// so what it costs grows with this size: at 16 KiB a piece is one gRPC message and one chunk
/// of `proto::codec`. `cargo bench --bench listeners` measures it beside a bare tonic server
/// (BENCHMARKS.md, "Listeners that stop reading").
pub const LOG_PIECE_BYTES: usize = 16 * 1024;

impl Journal {
    /// Follows a build's durable records from `from_seq` on: what is stored now, then each
    /// record as it becomes durable, ending after the record that puts the build in a final
    /// phase. No gap, no duplicate, and a slow follower holds up nobody.
    pub fn follow(&self, id: BuildId, from_seq: u64) -> Follower {
        let commits = self
            .shared
            .followed
            .lock()
            .entry(id)
            .or_insert_with(|| watch::channel(()).0)
            .subscribe();
        Follower {
            journal: self.clone(),
            commits,
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

impl Shared {
    /// Wakes the followers of `ids` (each named once), the builds a commit carried.
    pub(super) fn wake_followers(&self, ids: &[BuildId]) {
        let followed = self.followed.lock();
        if followed.is_empty() {
            return;
        }
        for id in ids {
            if let Some(commits) = followed.get(id) {
                commits.send_replace(());
            }
        }
    }
}

/// A reader that tails one build's journal; see [`Journal::follow`].
pub struct Follower {
    journal: Journal,
    /// Changes after each commit that carried this build's records.
    commits: watch::Receiver<()>,
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

impl Drop for Follower {
    fn drop(&mut self) {
        let mut followed = self.journal.shared.followed.lock();
        // This follower's own receiver still counts: the last one removes the entry.
        if followed
            .get(&self.id)
            .is_some_and(|commits| commits.receiver_count() <= 1)
        {
            followed.remove(&self.id);
        }
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
                let bytes = if start == 0 && end == data.len() {
                    // The whole of it is the piece: served as it was read, without a copy.
                    data
                } else {
                    let bytes = data[start..end].to_vec();
                    if end < data.len() {
                        self.extent = Some(Extent::Inline {
                            seq,
                            offset,
                            data,
                            start: end,
                        });
                    }
                    bytes
                };
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

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll, Wake, Waker};

    use super::*;
    use crate::testing::new_build;

    /// Counts how often a task was woken.
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Before, every commit woke every follower, which then read its build from the store:
    /// with one listener per build in flight, each commit cost a store read per build.
    #[tokio::test]
    async fn a_follower_is_woken_by_its_own_builds_commits_only() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let (followed, other) = (new_build(&journal).await, new_build(&journal).await);
        let mut follower = journal.follow(followed, 0);
        assert_eq!(
            follower.next().await.unwrap().unwrap().0,
            0,
            "its Created record"
        );

        let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&wakes));
        let mut cx = Context::from_waker(&waker);
        let mut next = Box::pin(follower.next());
        assert!(next.as_mut().poll(&mut cx).is_pending(), "nothing new yet");
        for _ in 0..20 {
            journal
                .log(other, b"another build's line\n".to_vec())
                .await
                .unwrap();
        }
        assert_eq!(
            wakes.0.load(Ordering::SeqCst),
            0,
            "another build's commits woke the follower"
        );

        let line = b"its own line\n";
        journal.log(followed, line.to_vec()).await.unwrap();
        assert!(
            wakes.0.load(Ordering::SeqCst) >= 1,
            "its own commit did not wake it"
        );
        match next.as_mut().poll(&mut cx) {
            Poll::Ready(Some(Ok((1, record)))) => {
                assert_eq!(record.log_extent(), Some((0, line.len() as u64)));
            }
            other => panic!("expected its log record, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_builds_wake_channel_lives_as_long_as_a_follower_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let id = new_build(&journal).await;
        let followed = || journal.shared.followed.lock().contains_key(&id);
        let (first, second) = (journal.follow(id, 0), journal.follow(id, 0));
        assert!(followed());
        drop(first);
        assert!(followed(), "the second follower still waits on it");
        drop(second);
        assert!(!followed(), "no follower is left: the channel goes");
    }
}
