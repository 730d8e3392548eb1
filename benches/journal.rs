//! Journal appends per second with durability (one writer; 64 concurrent builds, without and
//! with 1000 idle builds listened to, as queued builds' Build streams are), beside the
//! raw fsync rate of the same file system measured in the same run (appending, the goal's
//! peer, and overwriting a file written beforehand, as the write-ahead log does); the 64
//! builds also beside a raw group commit (64 threads whose appends one committer writes and
//! `fdatasync`s together, as the journal batches: the best the file system allows that
//! concurrency), in turn with them; and one build's output
//! throughput through its log writer (chunked, pipelined, durable at the flush) beside raw
//! `write` + `fdatasync` of 64 KiB chunks.
//!
//! The append phases and the raw fsync loop take turns, in rounds (this machine's disk swings
//! by ±20% within a minute), and each figure pools its rounds; within a round the one writer
//! and the raw loop alternate in tenths of the phase, as both are bound by `fdatasync`.
//!
//! `cargo bench --bench journal` (BENCH_SECONDS sets each phase's length, default 1;
//! BENCH_ROUNDS the rounds, default 5).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

use std::io::Write;
use std::time::{Duration, Instant};

use image_builder::orchestrator::BuildLog;
use image_builder::steps::StepLog;
use image_builder_state::Journal;
use image_builder_state::testing::new_build;

const CHUNK: usize = 128;

/// Builds that append nothing but have a listener each, in the phase that has them.
const IDLE_LISTENED: usize = 1000;

/// Turns the raw loop and the one writer take within each round's phase.
const SLICES: u32 = 10;

/// Raw `write` + `fdatasync` of [`CHUNK`] bytes for `phase`: (syncs, seconds taken).
fn fsync_loop(dir: &std::path::Path, phase: Duration) -> (u64, f64) {
    let mut file = std::fs::File::create(dir.join("fsync-probe")).unwrap();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < phase {
        file.write_all(&[7u8; CHUNK]).unwrap();
        file.sync_data().unwrap();
        n += 1;
    }
    (n, start.elapsed().as_secs_f64())
}

/// Raw `pwrite` + `fdatasync` of [`CHUNK`] bytes over a file written in full beforehand
/// (no size or extent changes for `fdatasync` to record, as the write-ahead log does) for
/// `phase`: (syncs, seconds taken).
fn fsync_overwrite_loop(dir: &std::path::Path, phase: Duration) -> (u64, f64) {
    use std::os::unix::fs::FileExt;
    const FILE: usize = 8 << 20;
    let file = std::fs::File::create(dir.join("fsync-overwrite-probe")).unwrap();
    file.write_all_at(&vec![0xff; FILE], 0).unwrap();
    file.sync_all().unwrap();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < phase {
        let at = (n as usize * CHUNK) % (FILE - CHUNK);
        file.write_all_at(&[7u8; CHUNK], at as u64).unwrap();
        file.sync_data().unwrap();
        n += 1;
    }
    (n, start.elapsed().as_secs_f64())
}

/// A raw group commit for `phase`: `writers` threads each append a [`CHUNK`]-byte record and
/// wait until it is durable; one committer takes every record waiting, writes them with one
/// `pwrite` over a file written beforehand (as the write-ahead log does) and one `fdatasync`,
/// and wakes their writers: (appends, seconds taken, syncs).
fn group_commit_loop(dir: &std::path::Path, writers: usize, phase: Duration) -> (u64, f64, u64) {
    use std::os::unix::fs::FileExt;
    use std::sync::{Arc, Condvar, Mutex};
    const FILE: usize = 64 << 20;
    #[derive(Default)]
    struct Shared {
        pending: Vec<u8>,
        queued: u64,
        durable: u64,
        stop: bool,
    }
    /// The state, the committer's wake-up (records wait) and the writers' (records durable).
    type Sync = (Mutex<Shared>, Condvar, Condvar);
    let shared: Arc<Sync> = Arc::new((
        Mutex::new(Shared::default()),
        Condvar::new(),
        Condvar::new(),
    ));
    let file = std::fs::File::create(dir.join("group-commit-probe")).unwrap();
    file.write_all_at(&vec![0xff; FILE], 0).unwrap();
    file.sync_all().unwrap();
    let start = Instant::now();
    let committer = {
        let shared = Arc::clone(&shared);
        std::thread::spawn(move || {
            let (lock, work, done) = &*shared;
            let (mut syncs, mut at) = (0u64, 0usize);
            loop {
                let (batch, upto) = {
                    let mut state = lock.lock().unwrap();
                    while state.pending.is_empty() && !state.stop {
                        state = work.wait(state).unwrap();
                    }
                    if state.pending.is_empty() {
                        return syncs;
                    }
                    (std::mem::take(&mut state.pending), state.queued)
                };
                if at + batch.len() > FILE {
                    at = 0;
                }
                file.write_all_at(&batch, at as u64).unwrap();
                file.sync_data().unwrap();
                at += batch.len();
                syncs += 1;
                lock.lock().unwrap().durable = upto;
                done.notify_all();
            }
        })
    };
    let threads: Vec<_> = (0..writers)
        .map(|_| {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || {
                let (lock, work, done) = &*shared;
                let mut n = 0u64;
                while start.elapsed() < phase {
                    let mut state = lock.lock().unwrap();
                    state.pending.extend_from_slice(&[b'x'; CHUNK]);
                    state.queued += 1;
                    let mine = state.queued;
                    work.notify_one();
                    while state.durable < mine {
                        state = done.wait(state).unwrap();
                    }
                    n += 1;
                }
                n
            })
        })
        .collect();
    let appends: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    let seconds = start.elapsed().as_secs_f64();
    shared.0.lock().unwrap().stop = true;
    shared.1.notify_all();
    let syncs = committer.join().unwrap();
    (appends, seconds, syncs)
}

/// Counts and seconds pooled over rounds.
#[derive(Default)]
struct Pooled {
    count: u64,
    seconds: f64,
    commits: u64,
}

impl Pooled {
    fn add(&mut self, (count, seconds, commits): (u64, f64, u64)) {
        self.count += count;
        self.seconds += seconds;
        self.commits += commits;
    }

    fn rate(&self) -> f64 {
        self.count as f64 / self.seconds
    }

    fn per_commit(&self) -> f64 {
        self.count as f64 / self.commits.max(1) as f64
    }
}

/// Output bytes one build writes in the throughput rows.
const OUTPUT_BYTES: usize = 256 << 20;

fn raw_chunks_mb_per_s(dir: &std::path::Path) -> f64 {
    let mut file = std::fs::File::create(dir.join("chunk-probe")).unwrap();
    let chunk = vec![b'y'; 64 << 10];
    let start = Instant::now();
    for _ in 0..OUTPUT_BYTES / chunk.len() {
        file.write_all(&chunk).unwrap();
        file.sync_data().unwrap();
    }
    OUTPUT_BYTES as f64 / start.elapsed().as_secs_f64() / 1e6
}

/// One build's output as a builder process gives it (pipe reads of 64 KiB holding 80-byte
/// lines) through the log writer, until the final flush says every byte is durable.
async fn build_output_mb_per_s(journal: &Journal) -> (f64, usize) {
    let id = new_build(journal).await;
    let log = BuildLog::new(
        journal.clone(),
        id,
        0,
        u64::MAX,
        vec!["not-in-output".into()],
    );
    let line = format!("{:079}\n", 7);
    let read = line.repeat((64 << 10) / line.len());
    let start = Instant::now();
    let mut output = log.output(Default::default());
    let mut written = 0;
    while written < OUTPUT_BYTES {
        output.write(read.as_bytes()).await;
        written += read.len();
    }
    output.finish().await;
    log.flush().await.unwrap();
    let rate = written as f64 / start.elapsed().as_secs_f64() / 1e6;
    let records = journal.records(id, 0).unwrap().len() - 1;
    (rate, records)
}

/// `writers` builds appending [`CHUNK`]-byte log chunks for `phase`: (appends, seconds taken,
/// group commits).
async fn appends(journal: &Journal, writers: usize, phase: Duration) -> (u64, f64, u64) {
    let commits_before = *journal.commits().borrow();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let journal = journal.clone();
        tasks.push(tokio::spawn(async move {
            let id = new_build(&journal).await;
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
    let seconds = start.elapsed().as_secs_f64();
    let commits = *journal.commits().borrow() - commits_before;
    (total, seconds, commits)
}

/// [`appends`] of 64 builds while each of `idle` (builds that append nothing, as queued
/// builds do) has a listener reading it live, as a Build stream or a Logs client does.
async fn appends_beside_listeners(
    journal: &Journal,
    idle: &[image_builder_state::BuildId],
    phase: Duration,
) -> (u64, f64, u64) {
    let (listening, mut ready) = tokio::sync::mpsc::channel::<()>(idle.len().max(1));
    let listeners: Vec<_> = idle
        .iter()
        .map(|&id| {
            let (journal, listening) = (journal.clone(), listening.clone());
            tokio::spawn(async move {
                let mut reader = journal.read(id, 0, 0);
                reader.next().await.unwrap().unwrap();
                listening.send(()).await.unwrap();
                // Waits for a record that never comes, until aborted.
                while let Some(next) = reader.next().await {
                    next.unwrap();
                }
            })
        })
        .collect();
    for _ in idle {
        ready.recv().await.unwrap();
    }
    let appended = appends(journal, 64, phase).await;
    for listener in listeners {
        listener.abort();
    }
    appended
}

fn main() {
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let phase = Duration::from_secs(seconds);
    // Same file system as the repository (target/), not a tmpfs.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    let journal = Journal::open(&dir.path().join("store")).unwrap();
    let idle: Vec<_> = runtime.block_on(async {
        let creates: Vec<_> = (0..IDLE_LISTENED)
            .map(|_| {
                let journal = journal.clone();
                tokio::spawn(async move { new_build(&journal).await })
            })
            .collect();
        let mut ids = Vec::with_capacity(creates.len());
        for create in creates {
            ids.push(create.await.unwrap());
        }
        ids
    });
    let (mut raw, mut single, mut many) = (Pooled::default(), Pooled::default(), Pooled::default());
    let mut overwrite = Pooled::default();
    let mut listened = Pooled::default();
    let mut grouped = Pooled::default();
    for _ in 0..rounds {
        // One writer and the raw loop compare two `fdatasync`-bound rates, so they take turns
        // in slices: a disk whose speed drifts within a second moves both alike.
        let slice = phase / SLICES;
        for _ in 0..SLICES {
            let (n, seconds) = fsync_loop(dir.path(), slice);
            raw.add((n, seconds, n));
            single.add(runtime.block_on(appends(&journal, 1, slice)));
            let (n, seconds) = fsync_overwrite_loop(dir.path(), slice);
            overwrite.add((n, seconds, n));
        }
        many.add(runtime.block_on(appends(&journal, 64, phase)));
        grouped.add(group_commit_loop(dir.path(), 64, phase));
        listened.add(runtime.block_on(appends_beside_listeners(&journal, &idle, phase)));
    }
    let fsync = raw.rate();
    let raw_chunks = raw_chunks_mb_per_s(dir.path());
    let (output, output_records) = runtime.block_on(build_output_mb_per_s(&journal));

    println!("| measurement | per second | vs raw fsync |");
    println!("|---|---:|---:|");
    println!("| raw write+fdatasync of {CHUNK} B (same fs) | {fsync:.0} | 1.00 |");
    println!(
        "| raw pwrite+fdatasync of {CHUNK} B over a file written beforehand | {:.0} | {:.2} |",
        overwrite.rate(),
        overwrite.rate() / fsync
    );
    println!(
        "| journal append, 1 writer, durable | {:.0} | {:.2} |",
        single.rate(),
        single.rate() / fsync
    );
    println!(
        "| journal append, 64 concurrent builds, durable | {:.0} | {:.2} |",
        many.rate(),
        many.rate() / fsync
    );
    println!(
        "| journal append, 64 concurrent builds, durable, {IDLE_LISTENED} idle builds listened to | {:.0} | {:.2} |",
        listened.rate(),
        listened.rate() / fsync
    );
    println!(
        "| raw group commit, 64 threads, one pwrite + fdatasync per batch over a file written beforehand | {:.0} | {:.2} |",
        grouped.rate(),
        grouped.rate() / fsync
    );
    println!();
    println!(
        "64 concurrent builds / the raw group commit: {:.2}x (with {IDLE_LISTENED} idle builds listened to: {:.2}x); raw group commit {:.1} appends/sync",
        many.rate() / grouped.rate(),
        listened.rate() / grouped.rate(),
        grouped.per_commit()
    );
    println!();
    println!(
        "{rounds} rounds of {seconds} s per phase; group commit: 1 writer {:.1} appends/sync; \
         64 builds {:.1} appends/sync ({} syncs)",
        single.per_commit(),
        many.per_commit(),
        many.commits
    );
    println!();
    println!("| measurement | MB/s | vs raw |");
    println!("|---|---:|---:|");
    println!("| raw write+fdatasync of 64 KiB chunks (same fs) | {raw_chunks:.0} | 1.00 |");
    println!(
        "| one build's output through its log writer, durable | {output:.0} | {:.2} |",
        output / raw_chunks
    );
    println!();
    println!(
        "{} MiB of output in {output_records} log records",
        OUTPUT_BYTES >> 20
    );
}
