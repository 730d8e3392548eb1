//! Restart to serving with history: the real binary started on a store holding N finished
//! builds and U unfinished ones (written through the journal), timed from spawn to its
//! "image-builder serving" line, after a clean stop (SIGTERM) and after SIGKILL, with its
//! resident memory once serving. The unfinished builds are resumed at every start: they
//! resolve a base image at a registry that accepts connections and never answers, so they stay
//! unfinished (and journal their progress, which a start after SIGKILL replays). Issue 14's
//! goal: under 300 ms either way, not growing with history. No peer: the figure is compared
//! with the same binary on a store of one build, in the same run.
//!
//! Each stored build has a log of a few lines.
//!
//! `cargo bench --bench restart` (BENCH_BUILDS: comma-separated store sizes, default
//! `1,2000,10000`; BENCH_UNFINISHED: unfinished builds stored beside them, default 100).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench: a failed unwrap is a failed run

use std::time::{Duration, Instant};

use image_builder_state::testing::{new_build, when_unlocked};
use image_builder_state::{BuildId, BuildSource, BuildSpec, Event, Journal};
use image_builder_testkit::Service;
use image_builder_testkit::bench::{env_or, mib, ms, status_kib};

/// Log chunks each stored build has (a few lines each), as a real build's progress would.
const LOG_CHUNKS: usize = 8;

/// A registry that accepts connections and never answers: builds that ask it stay unfinished
/// (until the service's registry timeout and retry budget, minutes away).
struct SilentRegistry {
    addr: String,
    _held: std::thread::JoinHandle<()>,
}

impl SilentRegistry {
    fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let held = std::thread::spawn(move || {
            let mut open = Vec::new();
            for stream in listener.incoming().flatten() {
                open.push(stream);
            }
        });
        Self { addr, _held: held }
    }
}

/// Writes `unfinished` builds left resolving their base image at `registry` into the store
/// under `data_dir`.
async fn fill_unfinished(data_dir: &std::path::Path, unfinished: usize, registry: &str) {
    let journal = when_unlocked(|| Journal::open(&data_dir.join("store")));
    for i in 0..unfinished {
        let reference = format!("{registry}/bench/base:{i}");
        let spec = BuildSpec {
            source: BuildSource::Reference {
                reference: reference.clone(),
            },
            force_rebuild: false,
            triggered_by: "bench".into(),
            supervisor_ref: String::new(),
            had_request_auth: false,
        };
        let id = BuildId::new();
        journal
            .create(
                id,
                spec,
                format!("{registry}/bench/base@sha256:{i:064}"),
                format!("{registry}/bench/workspace:{i}"),
            )
            .await
            .unwrap();
        journal.transition(id, Event::Admitted).await.unwrap();
    }
}

/// Writes `n` builds that ended Done, each with a log, into the store under `data_dir`, 64
/// at a time.
async fn fill(data_dir: &std::path::Path, n: usize) {
    let journal = Journal::open(&data_dir.join("store")).unwrap();
    let mut left = n;
    while left > 0 {
        let batch = left.min(64);
        let tasks: Vec<_> = (0..batch)
            .map(|_| {
                let journal = journal.clone();
                tokio::spawn(async move {
                    let id = new_build(&journal).await;
                    for event in [Event::Admitted, Event::Resolved] {
                        journal.transition(id, event).await.unwrap();
                    }
                    for chunk in 0..LOG_CHUNKS {
                        let line = format!(
                            "step {chunk}: resolved, checked, copied blob sha256:{chunk:064}\n"
                        );
                        journal.log(id, line.repeat(4).into_bytes()).await.unwrap();
                    }
                    journal.transition(id, Event::CacheHit).await.unwrap();
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        left -= batch;
    }
}

/// `store_open_ms / resume_ms` of the `nth` start (from 1) in the service's log, once the
/// log holds it.
fn open_and_resume(service: &Service, nth: usize) -> String {
    let mut line = None;
    for _ in 0..200 {
        let log = service.log();
        line = log
            .lines()
            .filter(|l| l.contains("image-builder serving"))
            .nth(nth - 1)
            .map(str::to_owned);
        if line.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let line = line.unwrap_or_default();
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .unwrap_or("?")
            .to_owned()
    };
    format!("{} / {}", field("store_open_ms"), field("resume_ms"))
}

fn main() {
    let sizes: Vec<usize> = std::env::var("BENCH_BUILDS")
        .unwrap_or_else(|_| "1,2000,10000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let unfinished = env_or("BENCH_UNFINISHED", 100);
    let silent = SilentRegistry::start();
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_image-builder"));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    println!(
        "{unfinished} unfinished builds stored beside the finished ones, resumed at every start"
    );
    println!();
    println!(
        "| builds stored | first start ms | after SIGTERM ms | after SIGKILL ms | RSS serving MiB | RSS idle 3 s later MiB (of it anonymous) | store open / resume ms (SIGTERM; SIGKILL) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---|");
    for n in sizes {
        let dir = tempfile::Builder::new()
            .prefix("restart-bench-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let data = dir.path().join("data");
        runtime.block_on(fill(&data, n));
        runtime.block_on(fill_unfinished(&data, unfinished, &silent.addr));
        // The journal's sled threads let go of the files a moment after the last handle.
        std::thread::sleep(Duration::from_millis(500));
        let config = serde_json::json!({
            "baseImageRepository": format!("{}/bench/base", silent.addr),
            "workspaceImageRepository": format!("{}/bench/workspace", silent.addr),
            "dataDir": data.display().to_string(),
            "registry": {"insecure": [silent.addr]},
            "builds": {"maxConcurrent": unfinished.max(1)},
        });
        let started = Instant::now();
        let mut service = Service::start(binary, config).unwrap();
        let first = started.elapsed();
        service.stop();
        let started = Instant::now();
        service.kill_and_restart().unwrap();
        let after_term = started.elapsed();
        let term_split = open_and_resume(&service, 2);
        let rss = mib(status_kib(service.pid().unwrap(), "VmRSS:"));
        // Idle: what the service holds once start-up's garbage is given back.
        std::thread::sleep(Duration::from_secs(3));
        let idle = mib(status_kib(service.pid().unwrap(), "VmRSS:"));
        let idle_heap = mib(status_kib(service.pid().unwrap(), "RssAnon:"));
        service.kill();
        let started = Instant::now();
        service.kill_and_restart().unwrap();
        let after_kill = started.elapsed();
        let kill_split = open_and_resume(&service, 3);
        service.stop();
        println!(
            "| {n} | {:.0} | {:.0} | {:.0} | {rss:.1} | {idle:.1} ({idle_heap:.1}) | {term_split}; {kill_split} |",
            ms(first),
            ms(after_term),
            ms(after_kill)
        );
    }
}
