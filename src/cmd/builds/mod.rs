//! `image-builder builds …`: the SRE's view of a running service, over the ops API. One file
//! per command; this one holds the arguments and what they share.

mod cancel;
mod list;
mod logs;
mod retry;
mod show;
mod watch;

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

/// A client of the ops service at `address`.
pub(super) async fn connect(connector: &Connector, address: &str) -> anyhow::Result<OpsClient> {
    connector
        .ops(address)
        .await
        .map_err(|e| anyhow::anyhow!("{e} (set --address or IMAGE_BUILDER_ADDRESS)"))
}

/// One build as the ops service shows it.
pub(super) async fn get_build(client: &mut OpsClient, build_id: &str) -> anyhow::Result<pb::Build> {
    Ok(client
        .get_build(pb::GetBuildRequest {
            build_id: build_id.into(),
        })
        .await
        .map_err(status_error)?
        .into_inner())
}

/// A refusal of the service, for the operator.
pub(super) fn status_error(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", e.code(), e.message())
}

/// A time in ms since the epoch, as RFC 3339 (`-` for none).
pub(super) fn time(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms as u64);
    humantime_serde::re::humantime::format_rfc3339_seconds(t).to_string()
}

/// Prints an action's reply: the JSON document, or its message for people.
pub(super) fn print_reply(json: bool, doc: &serde_json::Value, message: &str) {
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
            let filter = list::Filter {
                states,
                workspace_ref,
                triggered_by,
                limit,
            };
            list::run(&mut client, filter, json).await
        }
        BuildsCommand::Show { build_id } => show::run(&mut client, build_id, json).await,
        BuildsCommand::Logs { build_id, follow } => {
            logs::run(&connector, &connection.address, &build_id, follow).await
        }
        BuildsCommand::Watch { build_id } => watch::run(&mut client, &build_id).await,
        BuildsCommand::Cancel { build_id, reason } => {
            cancel::run(&mut client, build_id, reason, json).await
        }
        BuildsCommand::Retry { build_id } => retry::run(&mut client, build_id, json).await,
    }
}
