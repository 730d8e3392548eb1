//! Build output at volume, for real: a builder printing hundreds of thousands of lines while
//! the service is killed, listeners resuming at a byte offset across the restart, and a store
//! whose file system fills up in the middle of a build.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

mod common;

use common::*;
use image_builder::api::image_builder::LOG_OFFSET_METADATA;
use image_builder::proto::builder as pb;
use image_builder::proto::ops;
use image_builder_testkit::{self as testkit, GitRepo, Service};

const RESUMED: &str = "image-builder restarted; resuming this build at its last recorded step";

/// The numbers of the `heavy output line N` lines in `text`, in order.
fn heavy_lines(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("heavy output line "))
        .map(|n| n.parse().expect("a whole line"))
        .collect()
}

/// The rest of a build's log from byte `offset`, through the Logs extension.
async fn logs_from(service: &Service, id: &str, offset: usize) -> Vec<u8> {
    let mut client = service.client().await.unwrap();
    let mut request = tonic::Request::new(pb::LogsRequest {
        build_id: id.into(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert(LOG_OFFSET_METADATA, offset.to_string().parse().unwrap());
    testkit::read_logs(&mut client, request).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_during_heavy_output_every_byte_seen_is_kept_once_and_listeners_resume_mid_chunk() {
    let shared = shared();
    let lines = 150_000;
    let repo = GitRepo::new(&[(
        "Dockerfile",
        &format!(
            "FROM {}\nRUN seq 1 {lines} | while read i; do echo \"heavy output line $i\"; done && echo ran > /ran.txt\n",
            shared.base
        ),
    )])
    .unwrap();
    let mut service = service("logs-heavy-crash");
    let mut client = service.client().await.unwrap();
    let (_stream, id) = start_build(&mut client, head_build(&repo.uri())).await;
    let seen = wait_for_log(&mut client, &id, "heavy output line 20000\n").await;
    service.kill();
    let before = heavy_lines(&seen);
    assert!(before.len() >= 20_000, "{} lines seen", before.len());

    service.set_env(&[]);
    service.kill_and_restart().unwrap();
    let mut client = service.client().await.unwrap();
    let responses = build_all(&mut client, head_build(&repo.uri()))
        .await
        .unwrap();
    assert_eq!(
        build_id(&responses[0]),
        id,
        "the client joins the resumed build"
    );
    assert_eq!(
        status(responses.last().unwrap()),
        pb::BuildStatus::DoneSuccess
    );

    let log = String::from_utf8(logs_all(&mut client, &id).await.unwrap()).unwrap();
    assert!(
        log.starts_with(&seen),
        "what a listener saw before the kill is the log's first bytes, unchanged"
    );
    let (first_run, second_run) = log.split_once(RESUMED).expect("one resume marker");
    assert_eq!(log.matches(RESUMED).count(), 1);
    // Before the kill: lines 1..=N, each once, none missing (everything journaled, whether a
    // listener had seen it yet or not).
    let journaled = heavy_lines(first_run);
    assert!(journaled.len() >= before.len());
    assert!(
        journaled.iter().copied().eq(1..=journaled.len() as u64),
        "the first run's output is whole and in order"
    );
    // The resumed run printed everything again, after the marker.
    assert!(heavy_lines(second_run).iter().copied().eq(1..=lines));

    // A listener that broke at any byte, even in the middle of a journaled chunk, resumes
    // there after the restart with no gap and no duplicate.
    for offset in [seen.len() - 7, seen.len(), first_run.len() + 3] {
        let rest = logs_from(&service, &id, offset).await;
        assert_eq!(rest, log.as_bytes()[offset..], "resume at byte {offset}");
    }
}

/// Log bytes of an ops Journal stream from (`from_seq`, `from_log_offset`); stops after `most`
/// log messages (a stream that breaks there). Returns the bytes, and the seq and offset a
/// reader resumes from: the last log record seen (it may have more pieces) and the byte reached.
async fn journal_log(
    service: &Service,
    id: &str,
    from_seq: u64,
    from_log_offset: u64,
    most: usize,
) -> (Vec<u8>, u64, u64) {
    let mut client = ops_client(service).await;
    let mut stream = client
        .journal(ops::JournalRequest {
            build_id: id.into(),
            from_seq,
            from_log_offset,
        })
        .await
        .unwrap()
        .into_inner();
    let (mut bytes, mut seq, mut offset) = (Vec::new(), from_seq, from_log_offset);
    let mut messages = 0;
    while let Some(record) = stream.message().await.unwrap() {
        if let Some(ops::journal_record::Record::Log(chunk)) = record.record {
            assert_eq!(chunk.offset, offset, "pieces come in order, with no gap");
            offset += chunk.data.len() as u64;
            seq = record.seq;
            bytes.extend(chunk.data);
            messages += 1;
            if messages == most {
                break;
            }
        }
    }
    (bytes, seq, offset)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ops_journal_resumes_a_broken_stream_inside_a_log_record() {
    let shared = shared();
    let repo = GitRepo::new(&[(
        "Dockerfile",
        &format!(
            "FROM {}\nRUN seq 1 60000 | sed 's/^/numbered output line /'\n",
            shared.base
        ),
    )])
    .unwrap();
    let service = service("logs-journal-resume");
    let mut client = service.client().await.unwrap();
    let responses = build_all(&mut client, head_build(&repo.uri()))
        .await
        .unwrap();
    let id = build_id(&responses[0]);
    let log = logs_all(&mut client, &id).await.unwrap();
    assert!(log.len() > 1 << 20, "{} bytes", log.len());
    for most in [1, 3, 7, 12] {
        let (head, seq, offset) = journal_log(&service, &id, 0, 0, most).await;
        let (tail, _, end) = journal_log(&service, &id, seq, offset, usize::MAX).await;
        assert_eq!(end, log.len() as u64);
        assert_eq!([head, tail].concat(), log, "broken after {most} pieces");
    }
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(path: &std::path::Path, size: &str) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success(), "mount a tmpfs (the tests run as root)");
        Self(path.to_owned())
    }

    fn resize(&self, size: &str) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_fails_the_build_with_its_cause_and_new_builds_work_once_there_is_room() {
    let shared = shared();
    let data = tempfile::tempdir().unwrap();
    let store = data.path().join("store");
    let disk = Tmpfs::mount(&store, "10m");
    let mut config = config(shared.registry.addr(), "logs-disk-full");
    config["dataDir"] = data.path().display().to_string().into();
    let service = Service::start(binary(), config).unwrap();
    let mut client = service.client().await.unwrap();

    // About 15 MB of output, more than the store's file system holds.
    let loud = GitRepo::new(&[(
        "Dockerfile",
        &format!(
            "FROM {}\nRUN yes 'filler line of build output that fills the disk of the store' | head -n 220000\n",
            shared.base
        ),
    )])
    .unwrap();
    let responses = build_all(&mut client, head_build(&loud.uri()))
        .await
        .unwrap();
    let last = responses.last().unwrap();
    assert_eq!(status(last), pb::BuildStatus::DoneFailure, "{last:?}");
    for words in [
        "the build log could not be journaled",
        "bytes are free there",
        &store.join("logs").display().to_string(),
    ] {
        assert!(
            last.message.contains(words),
            "{words:?} in {:?}",
            last.message
        );
    }
    // What was journaled stays readable, and the service still answers.
    let id = build_id(&responses[0]);
    let log = String::from_utf8(logs_all(&mut client, &id).await.unwrap()).unwrap();
    assert!(
        log.contains("filler line"),
        "{}",
        &log[..log.len().min(2000)]
    );

    // Nearly no room left at all: new builds are refused with the cause, not Internal.
    let free = image_builder_state::store::free_bytes(&store).unwrap();
    let ballast = store.join("ballast");
    std::fs::write(&ballast, vec![0u8; (free - (1 << 20)) as usize]).unwrap();
    let quiet = GitRepo::new(&[(
        "Dockerfile",
        &format!("FROM {}\nRUN echo room-again\n", shared.base),
    )])
    .unwrap();
    let refused = client.build(head_build(&quiet.uri())).await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    for words in [
        "no room for a new build",
        &store.display().to_string(),
        "bytes are free",
    ] {
        assert!(
            refused.message().contains(words),
            "{words:?} in {:?}",
            refused.message()
        );
    }

    // Space returns: a new build works, without a restart.
    std::fs::remove_file(&ballast).unwrap();
    disk.resize("64m");
    let responses = build_all(&mut client, head_build(&quiet.uri()))
        .await
        .unwrap();
    let last = responses.last().unwrap();
    let id = build_id(&responses[0]);
    let log = String::from_utf8(logs_all(&mut client, &id).await.unwrap()).unwrap();
    assert_eq!(
        status(last),
        pb::BuildStatus::DoneSuccess,
        "{last:?}\n{log}"
    );
    assert!(log.contains("room-again\n"), "{log}");
    drop(service);
}
