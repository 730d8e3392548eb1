//! How [`SledStore`](super::SledStore) lays its data out in sled: the trees, their keys, and
//! the value of a run of records.

use super::Error;
use crate::build::BuildId;
use crate::store::Ended;

pub(super) const JOURNAL_TREE: &str = "journal.v1";
/// The folder of log segments inside the store's folder.
pub(super) const LOGS_DIR: &str = "logs";
pub(super) const SUMMARY_TREE: &str = "summary.v1";
pub(super) const UNFINISHED_TREE: &str = "unfinished.v1";
/// The key that says the index of unfinished builds is complete (not a build id's length).
pub(super) const INDEX_COMPLETE: &[u8] = b"complete";
pub(super) const DAMAGE_TREE: &str = "damage.v1";
pub(super) const FINISHED_TREE: &str = "finished.v1";

/// The key of an entry of the index of finished builds: the time, big-endian with its sign
/// bit flipped (so keys sort by it, times before the epoch included), and the build.
pub(super) fn finished_key((at_ms, id): Ended) -> [u8; 24] {
    let mut key = [0u8; 24];
    key[..8].copy_from_slice(&((at_ms as u64) ^ SIGN_BIT).to_be_bytes());
    key[8..].copy_from_slice(id.as_bytes());
    key
}

pub(super) const SIGN_BIT: u64 = 1 << 63;

pub(super) fn split_finished_key(key: &[u8]) -> Result<Ended, Error> {
    let (at, id) = split_key::<8, 16>(FINISHED_TREE, key)?;
    Ok((
        (u64::from_be_bytes(at) ^ SIGN_BIT) as i64,
        BuildId::from_bytes(id),
    ))
}

pub(super) fn record_key(id: BuildId, seq: u64) -> [u8; 24] {
    let mut key = [0u8; 24];
    key[..16].copy_from_slice(id.as_bytes());
    key[16..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// The last byte of a run's key: the key of the run's last record, then this (a single
/// record's key has no 25th byte), so a run sorts right after where its last record would.
pub(super) const RUN_MARK: u8 = 1;

/// A checkpoint writes each build's records as runs of this many records at most (one sled
/// value each instead of one per record: sled copies a node per insert and writes every value
/// into its own log, and keeps a page entry per node in memory) ...
pub(super) const RUN_RECORDS: usize = 8;

/// ... and of about this many bytes at most. Both bound what a damaged value costs its build:
/// sled drops a value whose checksum fails, with all it wrote after it.
pub(super) const RUN_BYTES: usize = 64 << 10;

/// The key of a run of a build's records whose last record is `last`.
pub(super) fn run_key(id: BuildId, last: u64) -> [u8; 25] {
    let mut key = [RUN_MARK; 25];
    key[..24].copy_from_slice(&record_key(id, last));
    key
}

/// The build and sequence number of a key of the journal tree: a record's, or the last
/// record's of a run.
pub(super) fn split_record_key(key: &[u8]) -> Result<(BuildId, u64), Error> {
    let key = match key {
        [record @ .., RUN_MARK] if record.len() == 24 => record,
        _ => key,
    };
    let (id, seq) = split_key::<16, 8>(JOURNAL_TREE, key)?;
    Ok((BuildId::from_bytes(id), u64::from_be_bytes(seq)))
}

/// A run's value: for each record, its sequence number (8 bytes, little endian), its length
/// (4) and its bytes.
pub(super) fn encode_run(records: &[(u64, &[u8])]) -> Vec<u8> {
    let size = records.iter().map(|(_, r)| 12 + r.len()).sum();
    let mut value = Vec::with_capacity(size);
    for (seq, record) in records {
        value.extend_from_slice(&seq.to_le_bytes());
        value.extend_from_slice(&(record.len() as u32).to_le_bytes());
        value.extend_from_slice(record);
    }
    value
}

/// The records an entry of the journal tree holds, in order: one for a record's key, the
/// run's for a run's. A run that does not parse is corruption (sled's checksums passed, so
/// the bytes are as written, but not as this store writes them).
pub(super) fn stored_records<'a>(
    key: &[u8],
    value: &'a [u8],
) -> Result<Vec<(u64, &'a [u8])>, Error> {
    let (_, last) = split_record_key(key)?;
    if key.len() == 24 {
        return Ok(vec![(last, value)]);
    }
    let corrupt = || Error::Corrupt(format!("a run of {} bytes does not parse", value.len()));
    let mut records = Vec::new();
    let mut rest = value;
    while !rest.is_empty() {
        let (seq, tail) = rest.split_at_checked(8).ok_or_else(corrupt)?;
        let (len, tail) = tail.split_at_checked(4).ok_or_else(corrupt)?;
        let seq = u64::from_le_bytes(seq.try_into().map_err(|_| corrupt())?);
        let len = u32::from_le_bytes(len.try_into().map_err(|_| corrupt())?) as usize;
        let (record, tail) = tail.split_at_checked(len).ok_or_else(corrupt)?;
        records.push((seq, record));
        rest = tail;
    }
    if records.last().map(|(seq, _)| *seq) != Some(last) {
        return Err(corrupt());
    }
    Ok(records)
}

/// A key of exactly `A` + `B` bytes, in its two parts.
pub(super) fn split_key<const A: usize, const B: usize>(
    keyspace: &'static str,
    key: &[u8],
) -> Result<([u8; A], [u8; B]), Error> {
    let bad = || Error::BadKey {
        keyspace,
        len: key.len(),
    };
    if key.len() != A + B {
        return Err(bad());
    }
    let (a, b) = key.split_at(A);
    Ok((
        a.try_into().map_err(|_| bad())?,
        b.try_into().map_err(|_| bad())?,
    ))
}

pub(super) fn id_key(keyspace: &'static str, key: &[u8]) -> Result<BuildId, Error> {
    let id: [u8; 16] = key.try_into().map_err(|_| Error::BadKey {
        keyspace,
        len: key.len(),
    })?;
    Ok(BuildId::from_bytes(id))
}
