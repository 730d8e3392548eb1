//! Logs listeners that stop reading, through the real service and through its peer: a bare
//! tonic server (the same gRPC stack, nothing of the service's) that streams the same log from
//! a file in the same pieces. Each side is a process of its own, and the two take turns:
//! - 200 listeners (one connection each) open a Logs stream of a 12.7 MB log and never read:
//!   the server's RSS growth, per listener;
//! - one listener reads the whole log, seven times: the replay rate (median).
//!
//! `cargo bench --bench listeners` (needs root, buildah, docker-registry: `scripts/setup.sh`).
//! `LISTENERS` sets how many listeners (200), `ROUNDS` how many turns each side takes (3),
//! `SERVICE_BINARY` another build of the service to measure (an earlier commit's).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench: a failed unwrap is a failed run

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::Stream;
use image_builder::proto::builder as pb;
use image_builder::proto::builder::image_builder_client::ImageBuilderClient;
use image_builder::proto::builder::image_builder_server::{ImageBuilder, ImageBuilderServer};
use image_builder_state::journal::LOG_PIECE_BYTES;
use image_builder_testkit::bench::{
    DockerfileBench, dockerfile_build, env_or, mib, percentile, status_kib,
};
use image_builder_testkit::{self as testkit, GitRepo, Service};
use tonic::{Request, Response, Status};

/// Replays of the whole log by one listener in a turn (their median is the turn's figure).
const REPLAYS: usize = 7;

/// Set in the peer's environment: the log file it serves.
const PEER_FILE: &str = "LISTENERS_BENCH_PEER_FILE";

fn main() {
    if let Ok(file) = std::env::var(PEER_FILE) {
        return peer::serve(PathBuf::from(file));
    }
    let listeners = env_or("LISTENERS", 200);
    let rounds = env_or("ROUNDS", 3);
    let bench = DockerfileBench::start(Path::new(env!("CARGO_TARGET_TMPDIR"))).unwrap();
    let (base, data) = (bench.base.clone(), &bench.data);
    let config = bench.config("bench-listeners");
    // `SERVICE_BINARY` runs another build of the service (an earlier commit's, for a
    // before-and-after comparison run in turn with this one).
    let binary = std::env::var("SERVICE_BINARY")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_image-builder").to_owned());
    let service = Service::start(Path::new(&binary), config).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();

    // 200,000 lines of 63 bytes (12.7 MB), as the logs bench builds.
    let dockerfile = format!(
        "FROM {base}\nRUN seq 100000 299999 | sed 's/$/ of the build output, as a compiler would print it ...../'\n"
    );
    let repo = GitRepo::new(&[("Dockerfile", &dockerfile)]).unwrap();
    let (id, log) = runtime.block_on(async {
        let mut client = service.client().await.unwrap();
        let request = dockerfile_build(&repo.uri(), "200k", "Dockerfile", ".");
        let mut stream = client.build(request).await.unwrap().into_inner();
        let mut id = String::new();
        while let Some(r) = stream.message().await.unwrap() {
            if let Some(info) = r.info.filter(|i| !i.build_id.is_empty()) {
                id = info.build_id;
            }
        }
        let log = testkit::read_logs(
            &mut client,
            pb::LogsRequest {
                build_id: id.clone(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        (id, log)
    });
    let file = data.path().join("200k.log");
    std::fs::write(&file, &log).unwrap();
    let mut service = service;

    // Each turn on fresh processes (the service killed and started again): memory a turn freed
    // stays with the allocator and would hide the next turn's cost.
    let mut sides = [Side::default(), Side::default()];
    for _ in 0..rounds {
        service.kill_and_restart().unwrap();
        let peer = peer::Process::start(&file);
        for (side, (url, pid)) in sides.iter_mut().zip([
            (service.grpc_url(), service.pid().unwrap()),
            (peer.url(), peer.pid()),
        ]) {
            let turn = runtime.block_on(measure(&url, pid, &id, log.len(), listeners));
            side.connections.push(turn.connections);
            side.streams.push(turn.streams);
            side.replay.push(turn.replay);
        }
    }
    let [service_side, peer_side] = sides;
    let per_listener = |kib: &[u64]| median(kib) as f64 / listeners as f64;
    let rate = |side: &Side| {
        let mut times = side.replay.clone();
        log.len() as f64 / 1e6 / percentile(&mut times, 0.5).as_secs_f64()
    };
    println!(
        "log: {:.1} MB in pieces of at most {} KiB; {listeners} listeners, {rounds} rounds each side on fresh processes, alternated",
        log.len() as f64 / 1e6,
        LOG_PIECE_BYTES / 1024
    );
    println!(
        "| row | image-builder | bare tonic server (peer) | ratio | goal |\n|---|---|---|---|---|"
    );
    let total = |side: &Side| -> Vec<u64> {
        side.connections
            .iter()
            .zip(&side.streams)
            .map(|(c, s)| c + s)
            .collect()
    };
    let (service_total, peer_total) = (total(&service_side), total(&peer_side));
    println!(
        "| a listener that stops reading: RSS growth (KiB), median | {:.0} | {:.0} | {:.2}× | ≤ 160 KiB |",
        per_listener(&service_total),
        per_listener(&peer_total),
        median(&service_total) as f64 / median(&peer_total) as f64
    );
    println!(
        "| of it, its connection (KiB) / its stream (KiB) | {:.0} / {:.0} | {:.0} / {:.0} | | |",
        per_listener(&service_side.connections),
        per_listener(&service_side.streams),
        per_listener(&peer_side.connections),
        per_listener(&peer_side.streams),
    );
    println!(
        "| all {listeners} (MiB), each round | {} | {} | | < 32 MiB |",
        rounds_mib(&service_total),
        rounds_mib(&peer_total)
    );
    let (service_mbs, peer_mbs) = (rate(&service_side), rate(&peer_side));
    println!(
        "| one listener replaying the whole log (MB/s), median | {service_mbs:.0} | {peer_mbs:.0} | {:.2}× | unchanged |",
        service_mbs / peer_mbs
    );
}

/// What one side measured, a figure per round.
#[derive(Default)]
struct Side {
    /// RSS growth (KiB) with the listeners' connections open, before any call.
    connections: Vec<u64>,
    /// RSS growth (KiB) once each connection has a Logs stream it does not read.
    streams: Vec<u64>,
    /// How long one listener took to read the whole log.
    replay: Vec<Duration>,
}

fn median(values: &[u64]) -> u64 {
    let mut values = values.to_vec();
    values.sort_unstable();
    values[values.len() / 2]
}

fn rounds_mib(growth: &[u64]) -> String {
    growth
        .iter()
        .map(|kib| format!("{:.1}", mib(*kib)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One turn of one side.
struct Turn {
    connections: u64,
    streams: u64,
    replay: Duration,
}

/// One turn of one side: the RSS growth (KiB) with `listeners` connections, then with a Logs
/// stream on each that is never read, then the time one listener takes to read the whole log.
async fn measure(url: &str, pid: u32, id: &str, log_bytes: usize, listeners: usize) -> Turn {
    let request = || pb::LogsRequest {
        build_id: id.to_owned(),
        ..Default::default()
    };
    let before = settled_rss(pid).await;
    let mut clients = Vec::new();
    for _ in 0..listeners {
        let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = ImageBuilderClient::new(channel);
        // A call the server answers at once, so the connection is made and used.
        let _ = client.list_builds(pb::ListBuildsRequest {}).await;
        clients.push(client);
    }
    let connected = settled_rss(pid).await;
    let mut streams = Vec::new();
    for client in &mut clients {
        streams.push(client.logs(request()).await.unwrap().into_inner());
    }
    let listening = settled_rss(pid).await;
    drop(streams);
    drop(clients);
    let mut client = ImageBuilderClient::connect(url.to_owned()).await.unwrap();
    let mut replays = Vec::new();
    for _ in 0..REPLAYS {
        let started = Instant::now();
        let read = testkit::read_logs(&mut client, request()).await.unwrap();
        replays.push(started.elapsed());
        assert_eq!(read.len(), log_bytes);
    }
    let replay = percentile(&mut replays, 0.5);
    Turn {
        connections: connected.saturating_sub(before),
        streams: listening.saturating_sub(connected),
        replay,
    }
}

/// The process's RSS (KiB) once it stopped changing by more than 1% over half a second (at
/// most 15 s): the servers fill the listeners' windows at their own pace.
async fn settled_rss(pid: u32) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = status_kib(pid, "VmRSS:");
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = status_kib(pid, "VmRSS:");
        if now.abs_diff(last) * 100 <= last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// The peer: mk3's Logs call on a bare tonic server, streaming one file in the pieces the
/// service's journal reader yields.
mod peer {
    use super::*;

    /// The peer running in a process of its own (this bench's binary again).
    pub struct Process {
        child: std::process::Child,
        port: u16,
    }

    impl Process {
        pub fn start(file: &Path) -> Self {
            let mut child = std::process::Command::new(std::env::current_exe().unwrap())
                .env(PEER_FILE, file)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let mut line = String::new();
            std::io::BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            let port = line.trim().parse().unwrap();
            Self { child, port }
        }

        pub fn url(&self) -> String {
            format!("http://127.0.0.1:{}", self.port)
        }

        pub fn pid(&self) -> u32 {
            self.child.id()
        }
    }

    impl Drop for Process {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Serves the file until killed; prints the port first.
    pub fn serve(file: PathBuf) {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            println!("{}", listener.local_addr().unwrap().port());
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            tonic::transport::Server::builder()
                .add_service(ImageBuilderServer::new(FileLogs { file }))
                .serve_with_incoming(incoming)
                .await
                .unwrap();
        });
    }

    struct FileLogs {
        file: PathBuf,
    }

    type Answers<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

    #[tonic::async_trait]
    impl ImageBuilder for FileLogs {
        async fn resolve_base_image(
            &self,
            _: Request<pb::ResolveBaseImageRequest>,
        ) -> Result<Response<pb::ResolveBaseImageResponse>, Status> {
            Err(Status::unimplemented("the peer serves Logs only"))
        }

        async fn resolve_workspace_image(
            &self,
            _: Request<pb::ResolveWorkspaceImageRequest>,
        ) -> Result<Response<pb::ResolveWorkspaceImageResponse>, Status> {
            Err(Status::unimplemented("the peer serves Logs only"))
        }

        type BuildStream = Answers<pb::BuildResponse>;

        async fn build(
            &self,
            _: Request<pb::BuildRequest>,
        ) -> Result<Response<Self::BuildStream>, Status> {
            Err(Status::unimplemented("the peer serves Logs only"))
        }

        type LogsStream = Answers<pb::LogsResponse>;

        async fn logs(
            &self,
            _: Request<pb::LogsRequest>,
        ) -> Result<Response<Self::LogsStream>, Status> {
            use tokio::io::AsyncReadExt;
            let file = tokio::fs::File::open(&self.file).await?;
            let pieces = futures::stream::unfold(file, |mut file| async move {
                let mut content = vec![0; LOG_PIECE_BYTES];
                let mut filled = 0;
                while filled < content.len() {
                    match file.read(&mut content[filled..]).await {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) => return Some((Err(Status::from(e)), file)),
                    }
                }
                if filled == 0 {
                    return None;
                }
                content.truncate(filled);
                Some((Ok(pb::LogsResponse { content }), file))
            });
            Ok(Response::new(Box::pin(pieces)))
        }

        async fn list_builds(
            &self,
            _: Request<pb::ListBuildsRequest>,
        ) -> Result<Response<pb::ListBuildsResponse>, Status> {
            Ok(Response::new(pb::ListBuildsResponse::default()))
        }
    }
}
