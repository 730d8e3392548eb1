//! `image-builder builds …`: the SRE's view of a running service, over the ops API.

use std::io::Write;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use image_builder::client::{ClientOptions, Connector, OpsClient};
use image_builder::proto::ops as pb;

/// How results are printed.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// One JSON document for programs.
    Json,
}

/// Where the service is and how to print.
#[derive(Args)]
pub struct Connection {
    /// The service's gRPC address.
    #[arg(
        long,
        env = "IMAGE_BUILDER_ADDRESS",
        default_value = "127.0.0.1:8080",
        global = true
    )]
    address: String,
    /// Output format.
    #[arg(long, value_enum, default_value = "table", global = true)]
    output: Output,
    #[command(flatten)]
    client: ClientOptions,
}

/// `builds` subcommands.
#[derive(Subcommand)]
pub enum BuildsCommand {
    /// Builds, newest first.
    List {
        /// Only builds in these states (queued, resolving, checking_cache, building, pushing,
        /// done, failed, cancelled, damaged).
        #[arg(long = "state")]
        states: Vec<String>,
        /// Only builds of this workspace image.
        #[arg(long)]
        workspace_ref: Option<String>,
        /// Only builds triggered by this.
        #[arg(long)]
        triggered_by: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// One build in detail.
    Show {
        /// The build id.
        build_id: String,
    },
    /// A build's log; with --follow, live until the build ends, across service restarts.
    Logs {
        /// The build id.
        build_id: String,
        /// Keep following (reconnects from where it was if the service restarts).
        #[arg(long, short)]
        follow: bool,
    },
    /// A live progress line (state, elapsed, last log line) until the build ends.
    Watch {
        /// The build id.
        build_id: String,
    },
    /// Stop a build.
    Cancel {
        /// The build id.
        build_id: String,
        /// Why (kept in the journal and shown to its clients).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Run a failed or cancelled build again.
    Retry {
        /// The build id.
        build_id: String,
    },
}

async fn connect(connector: &Connector, address: &str) -> anyhow::Result<OpsClient> {
    connector
        .ops(address)
        .await
        .map_err(|e| anyhow::anyhow!("{e} (set --address or IMAGE_BUILDER_ADDRESS)"))
}

fn status_error(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", e.code(), e.message())
}

fn time(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms as u64);
    humantime_serde::re::humantime::format_rfc3339_seconds(t).to_string()
}

fn summary_json(b: &pb::BuildSummary) -> serde_json::Value {
    serde_json::json!({
        "build_id": b.build_id, "state": b.state, "attempt": b.attempt,
        "workspace_ref": b.workspace_ref, "base_ref": b.base_ref, "triggered_by": b.triggered_by,
        "created_at_ms": b.created_at_ms, "finished_at_ms": b.finished_at_ms, "failure": b.failure,
    })
}

fn build_json(b: &pb::Build) -> serde_json::Value {
    serde_json::json!({
        "build_id": b.build_id, "state": b.state, "attempt": b.attempt, "source": b.source,
        "force_rebuild": b.force_rebuild, "triggered_by": b.triggered_by,
        "had_request_auth": b.had_request_auth, "base_ref": b.base_ref,
        "workspace_ref": b.workspace_ref, "failure": b.failure, "created_at_ms": b.created_at_ms,
        "finished_at_ms": b.finished_at_ms, "log_bytes": b.log_bytes,
        "cancel_requested": b.cancel_requested, "digest": b.digest, "trace_id": b.trace_id,
        "requests": b.requests.iter().map(|r| serde_json::json!({"action": r.action, "identity": r.identity, "at_ms": r.at_ms})).collect::<Vec<_>>(),
        "phases": b.phases.iter().map(|p| serde_json::json!({"phase": p.phase, "entered_at_ms": p.entered_at_ms})).collect::<Vec<_>>(),
    })
}

/// Prints an action's reply: the JSON document, or its message for people.
fn print_reply(json: bool, doc: &serde_json::Value, message: &str) {
    if json {
        println!("{doc}");
    } else {
        println!("{message}");
    }
}

/// Runs a `builds` subcommand.
pub async fn run(connection: Connection, command: BuildsCommand) -> anyhow::Result<()> {
    let connector = connection.client.connector()?;
    let mut client = connect(&connector, &connection.address).await?;
    let json = matches!(connection.output, Output::Json);
    match command {
        BuildsCommand::List {
            states,
            workspace_ref,
            triggered_by,
            limit,
        } => {
            let list = client
                .list_builds(pb::ListBuildsRequest {
                    states,
                    workspace_ref: workspace_ref.unwrap_or_default(),
                    triggered_by: triggered_by.unwrap_or_default(),
                    page_size: limit,
                    ..Default::default()
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::json!(list.builds.iter().map(summary_json).collect::<Vec<_>>())
                );
            } else {
                println!(
                    "{:<36}  {:<14}  {:>7}  {:<20}  WORKSPACE REF",
                    "BUILD ID", "STATE", "ATTEMPT", "CREATED"
                );
                for b in &list.builds {
                    println!(
                        "{:<36}  {:<14}  {:>7}  {:<20}  {}",
                        b.build_id,
                        b.state,
                        b.attempt,
                        time(b.created_at_ms),
                        b.workspace_ref
                    );
                }
            }
        }
        BuildsCommand::Show { build_id } => {
            let b = client
                .get_build(pb::GetBuildRequest { build_id })
                .await
                .map_err(status_error)?
                .into_inner();
            if json {
                println!("{}", build_json(&b));
            } else {
                println!(
                    "build      {}\nstate      {} (attempt {})\nsource     {}\ntriggered  {}\nbase       {}\nworkspace  {}",
                    b.build_id,
                    b.state,
                    b.attempt,
                    b.source,
                    b.triggered_by,
                    b.base_ref,
                    b.workspace_ref
                );
                if !b.failure.is_empty() {
                    println!("failure    {}", b.failure);
                }
                if !b.cancel_requested.is_empty() {
                    println!("cancel     requested: {}", b.cancel_requested);
                }
                for r in &b.requests {
                    println!(
                        "requested  {} by {} at {}",
                        r.action,
                        r.identity,
                        time(r.at_ms)
                    );
                }
                if !b.trace_id.is_empty() {
                    println!("trace      {}", b.trace_id);
                }
                println!("log        {} bytes\nphases", b.log_bytes);
                for (i, p) in b.phases.iter().enumerate() {
                    let took = b.phases.get(i + 1).map(|n| n.entered_at_ms).unwrap_or(
                        if b.finished_at_ms > 0 {
                            p.entered_at_ms
                        } else {
                            image_builder_state::now_ms()
                        },
                    ) - p.entered_at_ms;
                    println!(
                        "  {:<14} {}  {:>8.2}s",
                        p.phase,
                        time(p.entered_at_ms),
                        took as f64 / 1000.0
                    );
                }
            }
        }
        BuildsCommand::Logs { build_id, follow } => {
            logs(&connector, &connection.address, &build_id, follow).await?;
        }
        BuildsCommand::Watch { build_id } => watch(&mut client, &build_id).await?,
        BuildsCommand::Cancel { build_id, reason } => {
            let r = client
                .cancel_build(pb::CancelBuildRequest { build_id, reason })
                .await
                .map_err(status_error)?
                .into_inner();
            let doc = serde_json::json!({"build_id": r.build_id, "message": r.message, "joined_clients": r.joined_clients});
            print_reply(json, &doc, &r.message);
        }
        BuildsCommand::Retry { build_id } => {
            let r = client
                .retry_build(pb::RetryBuildRequest { build_id })
                .await
                .map_err(status_error)?
                .into_inner();
            let doc = serde_json::json!({"build_id": r.build_id, "attempt": r.attempt, "message": r.message});
            print_reply(json, &doc, &r.message);
        }
    }
    Ok(())
}

/// Prints a build's log from the journal; with `follow`, reconnects after a broken stream
/// (a restarting service) from the next record, so nothing is lost or repeated.
async fn logs(
    connector: &Connector,
    address: &str,
    build_id: &str,
    follow: bool,
) -> anyhow::Result<()> {
    let mut client = connect(connector, address).await?;
    let build = client
        .get_build(pb::GetBuildRequest {
            build_id: build_id.into(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    // Without --follow, stop at what the build held when asked: its records and log bytes.
    let stop_at = (!follow).then_some((build.records, build.log_bytes));
    // Where to resume after a break: a log record may have been cut between its pieces, so
    // resume at that record, from the byte reached.
    let mut next = 0u64;
    let mut offset = 0u64;
    let mut out = std::io::stdout();
    let mut broken_since: Option<std::time::Instant> = None;
    loop {
        let stream = match client
            .journal(pb::JournalRequest {
                build_id: build_id.into(),
                from_seq: next,
                from_log_offset: offset,
            })
            .await
        {
            Ok(stream) => Some(stream.into_inner()),
            Err(e) if follow && e.code() == tonic::Code::Unavailable => None,
            Err(e) => return Err(status_error(e)),
        };
        if let Some(mut stream) = stream {
            broken_since = None;
            loop {
                match stream.message().await {
                    Ok(Some(record)) => {
                        next = record.seq + 1;
                        if let Some(pb::journal_record::Record::Log(chunk)) = record.record {
                            out.write_all(&chunk.data)?;
                            out.flush()?;
                            offset = chunk.offset + chunk.data.len() as u64;
                            next = record.seq;
                        }
                        if stop_at.is_some_and(|(records, bytes)| {
                            record.seq + 1 >= records && offset >= bytes
                        }) {
                            return Ok(());
                        }
                    }
                    Ok(None) => return Ok(()),
                    Err(e) if follow => {
                        tracing::debug!(error = %e, "log stream broke; reconnecting");
                        break;
                    }
                    Err(e) => return Err(status_error(e)),
                }
            }
        }
        let since = *broken_since.get_or_insert_with(std::time::Instant::now);
        if since.elapsed() > Duration::from_secs(120) {
            anyhow::bail!(
                "the service has been unreachable for 2 minutes; giving up (resume with the same command)"
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        if let Ok(c) = connect(connector, address).await {
            client = c;
        }
    }
}

async fn watch(client: &mut OpsClient, build_id: &str) -> anyhow::Result<()> {
    let build = client
        .get_build(pb::GetBuildRequest {
            build_id: build_id.into(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut stream = client
        .journal(pb::JournalRequest {
            build_id: build_id.into(),
            from_seq: 0,
            from_log_offset: 0,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut state = build.state.clone();
    let mut last_line = String::new();
    let mut out = std::io::stdout();
    while let Some(record) = stream.message().await.map_err(status_error)? {
        state = record.state.clone();
        if let Some(pb::journal_record::Record::Log(chunk)) = &record.record
            && let Some(line) = String::from_utf8_lossy(&chunk.data)
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
        {
            last_line = line.chars().take(80).collect();
        }
        let elapsed = (image_builder_state::now_ms() - build.created_at_ms).max(0) as f64 / 1000.0;
        write!(out, "\r\x1b[2K{state:<14} {elapsed:>7.1}s  {last_line}")?;
        out.flush()?;
    }
    writeln!(out)?;
    let end = client
        .get_build(pb::GetBuildRequest {
            build_id: build_id.into(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    println!(
        "build {} ended {}{}",
        end.build_id,
        end.state,
        if end.failure.is_empty() {
            String::new()
        } else {
            format!(": {}", end.failure)
        }
    );
    let _ = state;
    Ok(())
}
