//! Journal appends per second with durability (one writer; 64 concurrent builds), beside the
//! raw fsync rate of the same file system measured in the same run.
//!
//! `cargo bench --bench journal` (BENCH_SECONDS sets each phase's length, default 3).

use std::io::Write;
use std::time::{Duration, Instant};

use image_builder_state::{BuildId, BuildSource, BuildSpec, Journal};

const CHUNK: usize = 128;

fn spec() -> BuildSpec {
    BuildSpec {
        source: BuildSource::Reference {
            reference: "bench".into(),
        },
        force_rebuild: false,
        triggered_by: "bench".into(),
        supervisor_ref: String::new(),
        had_request_auth: false,
    }
}

fn fsync_rate(dir: &std::path::Path, phase: Duration) -> f64 {
    let mut file = std::fs::File::create(dir.join("fsync-probe")).unwrap();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < phase {
        file.write_all(&[7u8; CHUNK]).unwrap();
        file.sync_data().unwrap();
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

async fn appends(journal: &Journal, writers: usize, phase: Duration) -> (f64, u64) {
    let commits_before = *journal.commits().borrow();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let journal = journal.clone();
        tasks.push(tokio::spawn(async move {
            let id = BuildId::new();
            journal
                .create(id, spec(), "b".into(), "w".into())
                .await
                .unwrap();
            let mut n = 0u64;
            while start.elapsed() < phase {
                journal.log(id, vec![b'x'; CHUNK]).await.unwrap();
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    let rate = total as f64 / start.elapsed().as_secs_f64();
    let commits = *journal.commits().borrow() - commits_before;
    (rate, commits.max(1))
}

fn main() {
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let phase = Duration::from_secs(seconds);
    // Same file system as the repository (target/), not a tmpfs.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    let fsync = fsync_rate(dir.path(), phase);
    let journal = Journal::open(&dir.path().join("store")).unwrap();
    let (single, single_commits) = runtime.block_on(appends(&journal, 1, phase));
    let (many, many_commits) = runtime.block_on(appends(&journal, 64, phase));
    let many_total = many * phase.as_secs_f64();

    println!("| measurement | per second | vs raw fsync |");
    println!("|---|---:|---:|");
    println!("| raw write+fdatasync of {CHUNK} B (same fs) | {fsync:.0} | 1.00 |");
    println!(
        "| journal append, 1 writer, durable | {single:.0} | {:.2} |",
        single / fsync
    );
    println!(
        "| journal append, 64 concurrent builds, durable | {many:.0} | {:.2} |",
        many / fsync
    );
    println!();
    println!(
        "group commit: 1 writer {:.1} appends/sync; 64 builds {:.1} appends/sync ({} syncs)",
        single * phase.as_secs_f64() / single_commits as f64,
        many_total / many_commits as f64,
        many_commits
    );
}
