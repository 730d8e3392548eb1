//! The journal's log path against a real store on disk: bytes go to segments, readers get them
//! back in bounded pieces from any offset, and a store written by format version 1 (one record
//! per line, the release before segments) stays readable and appendable.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

use std::path::Path;

use image_builder_state::journal::{Entry, INLINE_LOG_BYTES, LOG_PIECE_BYTES};
use image_builder_state::testing::{new_build, spec};
use image_builder_state::{BuildId, Event, Journal, Phase, Record};

async fn read_all(journal: &Journal, id: BuildId, from: u64) -> Vec<u8> {
    let mut reader = journal.read(id, 0, from);
    let mut out = Vec::new();
    let mut expected_offset = from;
    while let Some(entry) = reader.next().await {
        let Entry::Log { offset, bytes, .. } = entry.unwrap() else {
            continue;
        };
        assert_eq!(offset, expected_offset, "pieces come in order, with no gap");
        assert!(bytes.len() <= LOG_PIECE_BYTES, "a piece is bounded");
        expected_offset += bytes.len() as u64;
        out.extend(bytes);
    }
    out
}

#[tokio::test]
async fn log_bytes_live_in_segments_and_replay_from_any_offset() {
    let dir = tempfile::tempdir().unwrap();
    let id = BuildId::new();
    let mut expected = Vec::new();
    let mut inline = 0;
    let mut pieces = 0;
    {
        let journal = Journal::open(dir.path()).unwrap();
        journal
            .create(id, spec(), "b".into(), "w".into())
            .await
            .unwrap();
        for i in 0..40u32 {
            // Chunks of uneven sizes, some larger than a piece.
            let chunk: Vec<u8> = (0..(i * 7919 % 150_000))
                .map(|j| b'a' + ((i + j) % 26) as u8)
                .collect();
            assert_eq!(
                journal.log(id, chunk.clone()).await.unwrap(),
                expected.len() as u64
            );
            if chunk.len() < INLINE_LOG_BYTES {
                inline += chunk.len();
            } else {
                pieces += chunk.len().div_ceil(LOG_PIECE_BYTES);
            }
            expected.extend(chunk);
        }
        journal
            .transition(id, Event::Failed { reason: "r".into() })
            .await
            .unwrap();
        // The records hold only the small chunks' bytes: the rest is in the segment, named by
        // a record of a few bytes (offset, length, checksum) a piece.
        let records: usize = journal
            .records(id, 0)
            .unwrap()
            .iter()
            .map(|(_, r)| r.encode().unwrap().len())
            .sum();
        assert!(
            records < 1024 + inline + 24 * pieces,
            "records take {records} bytes ({inline} inline, {pieces} pieces)"
        );
    }
    let journal = Journal::open(dir.path()).unwrap();
    assert_eq!(
        journal.view(id).unwrap().unwrap().log_len,
        expected.len() as u64
    );
    assert_eq!(read_all(&journal, id, 0).await, expected);
    for from in [1u64, 65_535, 65_536, 100_001, expected.len() as u64 - 1] {
        assert_eq!(
            read_all(&journal, id, from).await,
            expected[from as usize..],
            "replay from byte {from}"
        );
    }
    assert!(
        read_all(&journal, id, expected.len() as u64 + 10)
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn a_segment_cut_short_behind_the_journal_is_an_error_not_a_silent_gap() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(dir.path()).unwrap();
    let id = new_build(&journal).await;
    journal.log(id, vec![b'x'; 10_000]).await.unwrap();
    journal
        .transition(id, Event::Failed { reason: "r".into() })
        .await
        .unwrap();
    let segment = dir.path().join("logs").join(format!("{id}.log"));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap()
        .set_len(5000)
        .unwrap();
    let mut reader = journal.read(id, 0, 0);
    let err = loop {
        match reader
            .next()
            .await
            .expect("the reader fails before it ends")
        {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert!(err.to_string().contains("ends before byte 5000"), "{err}");
}

#[tokio::test]
async fn a_follower_reads_a_long_journal_in_batches_and_sees_a_retry_after_an_ending() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(dir.path()).unwrap();
    let id = new_build(&journal).await;
    for _ in 0..3000 {
        journal.log(id, b"line of output\n".to_vec()).await.unwrap();
    }
    journal
        .transition(id, Event::Failed { reason: "r".into() })
        .await
        .unwrap();
    journal.transition(id, Event::Retried).await.unwrap();
    journal.log(id, b"second attempt\n".to_vec()).await.unwrap();
    journal
        .transition(id, Event::Cancelled { reason: "c".into() })
        .await
        .unwrap();
    let mut follower = journal.follow(id, 0);
    let mut seqs = 0u64;
    while let Some(next) = follower.next().await {
        assert_eq!(next.unwrap().0, seqs);
        seqs += 1;
    }
    assert_eq!(seqs, 3005);
    assert_eq!(follower.view().unwrap().phase(), Phase::Cancelled);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to.join(entry.file_name()));
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// `tests/fixtures/store-v1` was written by the release before log segments (record format
/// version 1): a finished build with 100 one-line log records, and a build left in Resolving
/// with one.
#[tokio::test]
async fn a_store_written_by_the_previous_release_reads_and_takes_new_appends() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-v1");
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture, dir.path());
    let done: BuildId = "01a21817-85d3-7786-8e2a-182406d24c06".parse().unwrap();
    let running: BuildId = "01a21817-865b-7109-900b-d7035d411314".parse().unwrap();

    let journal = Journal::open(dir.path()).unwrap();
    let view = journal.view(done).unwrap().unwrap();
    assert_eq!(view.phase(), Phase::Done);
    let expected: String = (0..100)
        .map(|i| format!("line {i} of a per-line log\n"))
        .collect();
    assert_eq!(view.log_len, expected.len() as u64);
    assert_eq!(read_all(&journal, done, 0).await, expected.as_bytes());
    assert_eq!(read_all(&journal, done, 7).await, expected.as_bytes()[7..]);
    assert!(matches!(
        journal.records(done, 3).unwrap()[0].1,
        Record::Log { .. }
    ));

    // The unfinished build goes on in the new format: old inline records, then a segment.
    let unfinished = journal.unfinished().unwrap();
    assert_eq!(unfinished.len(), 1);
    assert_eq!(unfinished[0].phase(), Phase::Resolving);
    journal.log(running, b"resumed\n".to_vec()).await.unwrap();
    journal
        .transition(running, Event::Failed { reason: "r".into() })
        .await
        .unwrap();
    drop(journal);
    let journal = Journal::open(dir.path()).unwrap();
    assert_eq!(
        read_all(&journal, running, 0).await,
        b"resolving\nresumed\n"
    );
    assert_eq!(read_all(&journal, running, 12).await, b"sumed\n");
}

/// `tests/fixtures/store-v2` was written by the release with log segments but no checksums
/// (record format version 2, no witness file): a finished build with a 10,000-byte segment
/// chunk and an inline line, and a build left in Building with a 5,000-byte chunk.
#[tokio::test]
async fn a_store_of_format_two_reads_and_takes_checked_appends() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-v2");
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture, dir.path());
    let done: BuildId = "01a21893-0b37-7713-b72e-3a5bf6e90b50".parse().unwrap();
    let running: BuildId = "01a21893-0b44-72cf-bfd0-c2cf78bbad2c".parse().unwrap();
    let big: Vec<u8> = (0..10_000u32).map(|i| b'a' + (i % 26) as u8).collect();

    let journal = Journal::open(dir.path()).unwrap();
    assert!(journal.damaged().is_empty(), "{:?}", journal.damaged());
    assert_eq!(journal.view(done).unwrap().unwrap().phase(), Phase::Done);
    let mut expected = big.clone();
    expected.extend_from_slice(b"small line\n");
    assert_eq!(read_all(&journal, done, 0).await, expected);
    assert_eq!(read_all(&journal, done, 9_999).await, expected[9_999..]);
    assert!(
        journal
            .records(done, 0)
            .unwrap()
            .iter()
            .any(|(_, r)| matches!(r, Record::LogAppended { .. }))
    );

    let unfinished = journal.unfinished().unwrap();
    assert_eq!(unfinished.len(), 1);
    assert_eq!(unfinished[0].phase(), Phase::Building);
    journal.log(running, vec![b'y'; 6000]).await.unwrap();
    journal
        .transition(running, Event::Failed { reason: "r".into() })
        .await
        .unwrap();
    drop(journal);
    let journal = image_builder_state::testing::when_unlocked(|| Journal::open(dir.path()));
    let mut expected = vec![b'z'; 5000];
    expected.extend(vec![b'y'; 6000]);
    assert_eq!(read_all(&journal, running, 0).await, expected);
    assert!(
        journal
            .records(running, 0)
            .unwrap()
            .iter()
            .any(|(_, r)| matches!(r, Record::LogChecked { len: 6000, .. }))
    );
}
