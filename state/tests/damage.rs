//! A store with damaged files: nothing is lost silently, what is readable stays readable, and
//! the journal opens.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

use std::collections::BTreeSet;
use std::path::Path;

use image_builder_state::journal::{Error, Journal};
use image_builder_state::machine::{Event, Phase};
use image_builder_state::store::{SledStore, StoreRead, StoreWrite, WriteBatch};
use image_builder_state::testing::{new_build, when_unlocked};
use image_builder_state::{BuildId, Record, inspect};

/// Builds, each with small and large log chunks; the even ones end Done, the odd ones stay
/// in Building (a restart would resume them).
async fn fill(dir: &Path, builds: usize) -> Vec<BuildId> {
    let journal = when_unlocked(|| Journal::open(dir));
    let mut ids = Vec::new();
    for n in 0..builds {
        let id = new_build(&journal).await;
        for event in [Event::Admitted, Event::Resolved, Event::CacheMiss] {
            journal.transition(id, event).await.unwrap();
        }
        journal
            .log(id, format!("step {n}\n").into_bytes())
            .await
            .unwrap();
        journal.log(id, vec![b'x'; 8192]).await.unwrap();
        if n % 2 == 0 {
            journal.transition(id, Event::Built).await.unwrap();
            let digest = format!("sha256:{n:064}");
            journal
                .transition(id, Event::Pushed { digest })
                .await
                .unwrap();
        }
        ids.push(id);
    }
    ids
}

/// What `store check` says of the store in `dir`, a line per problem.
fn store_check(dir: &Path) -> Vec<String> {
    let store = when_unlocked(|| SledStore::open_existing(dir));
    inspect::check(&store)
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect()
}

/// Where `id` first appears in sled's file: the first write of that build.
fn first_write_of(db: &[u8], id: BuildId) -> usize {
    db.windows(16)
        .position(|w| w == id.as_bytes())
        .expect("the build's key is in sled's file")
}

async fn drain(journal: &Journal, id: BuildId) -> (Vec<u64>, Option<Error>) {
    let mut follower = journal.follow(id, 0);
    let mut seqs = Vec::new();
    while let Some(next) = follower.next().await {
        match next {
            Ok((seq, _)) => seqs.push(seq),
            Err(e) => return (seqs, Some(e)),
        }
    }
    (seqs, None)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flipped_byte_in_sleds_file_loses_no_build_silently() {
    let dir = tempfile::tempdir().unwrap();
    let ids = fill(dir.path(), 12).await;
    let cut = 7;
    let db_path = dir.path().join("db");
    let mut db = std::fs::read(&db_path).unwrap();
    let at = first_write_of(&db, ids[cut]);
    db[at + 3] ^= 0x40;
    std::fs::write(&db_path, &db).unwrap();

    // Without the witness this open sees builds 0..7 and nothing else, with no error.
    let journal = when_unlocked(|| Journal::open(dir.path()));
    let damaged: BTreeSet<BuildId> = journal.damaged().into_iter().map(|(id, _)| id).collect();
    assert_eq!(
        damaged,
        ids[cut..].iter().copied().collect(),
        "every build written after the damaged byte is reported, and only those"
    );
    for &id in &ids[..cut] {
        let view = journal.view(id).unwrap().unwrap();
        assert_eq!(view.log_len, 7 + 8192, "{id} is whole");
    }
    let (_, damage) = &journal.damaged()[0];
    assert_eq!(
        damage.readable_until, 0,
        "nothing of the newest build is left"
    );
    assert!(
        damage.reason.contains("all of its records") && damage.reason.contains("damaged"),
        "{}",
        damage.reason
    );

    // Damaged builds: listed as such, never resumed, take no record, read as DataLoss.
    let summaries = journal.summaries().unwrap();
    for &id in &ids[cut..] {
        let listed = summaries.iter().find(|s| s.id == id).expect("still listed");
        assert_eq!(listed.state(), "damaged");
        assert_eq!(listed.created_at_ms, id.created_at_ms());
        assert!(matches!(journal.view(id), Err(Error::Damaged { .. })));
        assert!(matches!(
            journal.transition(id, Event::Built).await,
            Err(Error::Damaged { .. })
        ));
        let (seqs, end) = drain(&journal, id).await;
        assert!(seqs.is_empty());
        assert!(matches!(end, Some(Error::Damaged { .. })), "{end:?}");
        assert!(journal.exists(id).unwrap());
    }
    let resumed: BTreeSet<BuildId> = journal.unfinished().unwrap().iter().map(|v| v.id).collect();
    let expected: BTreeSet<BuildId> = ids[..cut].iter().copied().skip(1).step_by(2).collect();
    assert_eq!(resumed, expected, "only intact unfinished builds resume");

    // The store goes on working, and the damage is still known after another restart.
    let fresh = new_build(&journal).await;
    journal.transition(fresh, Event::Admitted).await.unwrap();
    drop(journal);
    let journal = when_unlocked(|| Journal::open(dir.path()));
    assert_eq!(journal.damaged().len(), ids.len() - cut);
    assert_eq!(
        journal.view(fresh).unwrap().unwrap().phase(),
        Phase::Resolving
    );

    // Retention can remove a damaged build; its report goes with it.
    journal.remove(ids[cut]).await.unwrap();
    assert!(journal.damage(ids[cut]).is_none());
    drop(journal);
    let journal = when_unlocked(|| Journal::open(dir.path()));
    assert_eq!(journal.damaged().len(), ids.len() - cut - 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_record_that_does_not_decode_leaves_the_records_before_it_readable() {
    let dir = tempfile::tempdir().unwrap();
    let ids = fill(dir.path(), 2).await;
    let id = ids[0];
    let (last, bad) = {
        let store = when_unlocked(|| SledStore::open(dir.path()));
        let last = store.last_seq(id).unwrap().unwrap();
        // A record that is not one: version byte 9, as a flipped bit in a value would give.
        let mut batch = WriteBatch::default();
        batch.records.push((id, last + 1, vec![9, 1, 2, 3]));
        batch.records.push((
            id,
            last + 2,
            Record::Transition {
                event: Event::Admitted,
                at_ms: 1,
            }
            .encode()
            .unwrap(),
        ));
        store.write(batch).unwrap();
        store.sync().unwrap();
        (last, last + 1)
    };
    let journal = when_unlocked(|| Journal::open(dir.path()));
    let damage = journal
        .damage(id)
        .expect("found at open: its summary was stale");
    assert_eq!(damage.readable_until, bad);
    assert!(
        damage.reason.contains("does not decode"),
        "{}",
        damage.reason
    );
    let (seqs, end) = drain(&journal, id).await;
    assert_eq!(
        seqs,
        (0..=last).collect::<Vec<_>>(),
        "the readable part, whole"
    );
    match end {
        Some(Error::Damaged { readable_until, .. }) => assert_eq!(readable_until, bad),
        other => panic!("{other:?}"),
    }
    let readable = journal.readable_view(id).unwrap();
    assert_eq!(readable.phase(), Phase::Done);
    assert_eq!(
        journal.view(ids[1]).unwrap().unwrap().phase(),
        Phase::Building
    );

    // `store check` (offline) names it, and the journal that is fine is not named.
    drop(journal);
    let problems = store_check(dir.path());
    assert!(
        problems
            .iter()
            .any(|p| p.contains(&format!("build {id}, record {bad}"))),
        "{problems:?}"
    );
    assert!(
        !problems.iter().any(|p| p.contains(&ids[1].to_string())),
        "{problems:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn store_check_names_builds_lost_to_a_flipped_byte() {
    let dir = tempfile::tempdir().unwrap();
    let ids = fill(dir.path(), 6).await;
    let db_path = dir.path().join("db");
    let mut db = std::fs::read(&db_path).unwrap();
    let at = first_write_of(&db, ids[4]);
    db[at] ^= 1;
    std::fs::write(&db_path, &db).unwrap();
    let problems = store_check(dir.path());
    for id in &ids[4..] {
        assert!(
            problems
                .iter()
                .any(|p| p.contains(&format!("build {id}: damaged"))),
            "{id} not named: {problems:?}"
        );
    }
    assert_eq!(problems.len(), 2, "{problems:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn store_check_names_an_unfinished_build_missing_from_the_index() {
    let dir = tempfile::tempdir().unwrap();
    // Odd builds stay in Building.
    let ids = fill(dir.path(), 4).await;
    assert!(store_check(dir.path()).is_empty());
    {
        let db = sled::open(dir.path()).unwrap();
        let index = db.open_tree("unfinished.v1").unwrap();
        assert!(index.remove(ids[3].as_bytes()).unwrap().is_some());
        db.flush().unwrap();
    }
    let problems = store_check(dir.path());
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains(&format!("build {}: unfinished, but missing", ids[3]))
            && problems[0].contains("would not resume it"),
        "{problems:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flipped_byte_in_a_log_segment_is_never_served_as_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let journal = when_unlocked(|| Journal::open(dir.path()));
    let id = new_build(&journal).await;
    journal.transition(id, Event::Admitted).await.unwrap();
    let piece = image_builder_state::journal::LOG_PIECE_BYTES;
    // Three checksummed pieces in one append, then a fourth.
    let mut first = vec![b'a'; piece];
    first.extend(vec![b'b'; piece]);
    first.extend(vec![b'c'; 100]);
    journal.log(id, first).await.unwrap();
    journal.log(id, vec![b'd'; 5000]).await.unwrap();
    drop(journal);

    let segment = dir.path().join("logs").join(format!("{id}.log"));
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes[piece + 10] ^= 0x01; // inside the second piece
    std::fs::write(&segment, &bytes).unwrap();

    let journal = when_unlocked(|| Journal::open(dir.path()));
    let mut reader = journal.read(id, 0, 0);
    let mut log = Vec::new();
    let end = loop {
        match reader.next().await {
            Some(Ok(image_builder_state::journal::Entry::Log { bytes, .. })) => log.extend(bytes),
            Some(Ok(_)) => {}
            Some(Err(e)) => break Some(e),
            None => break None,
        }
    };
    assert_eq!(
        log,
        vec![b'a'; piece],
        "the first piece, whole, and nothing of the damaged one"
    );
    match end {
        Some(Error::Damaged { reason, .. }) => {
            assert!(reason.contains("fail their checksum"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(journal.damage(id).is_some(), "the build is marked damaged");
    assert_eq!(
        journal.summaries().unwrap()[0].state(),
        "damaged",
        "and listed so"
    );
    drop((reader, journal));

    let problems = store_check(dir.path());
    assert!(
        problems
            .iter()
            .any(|p| p.contains(&format!("build {id}, record 3")) && p.contains("checksum")),
        "{problems:?}"
    );
}
