//! The `image-builder` command: `run` serves the API; `builds` and `store` are the SRE's
//! commands; `scenario run --target` (with the `scenario` feature) tests a running
//! installation.

mod cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use image_builder::config::Config;

/// A durable, mk3-compatible workspace image builder.
#[derive(Parser)]
#[command(name = "image-builder", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Serve the gRPC API with the given configuration.
    Run {
        /// The JSON configuration file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Inspect, follow, cancel and retry the builds of a running service (ops API).
    Builds {
        #[command(flatten)]
        connection: cmd::builds::Connection,
        #[command(subcommand)]
        command: cmd::builds::BuildsCommand,
    },
    /// Read the store of a stopped service (read-only).
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Scenario-driven tests of a running installation (see scenarios/README.md). Only in
    /// builds with the `scenario` feature: the release build carries no test runner.
    #[cfg(feature = "scenario")]
    Scenario {
        #[command(subcommand)]
        command: ScenarioCommand,
    },
    /// Ask a running service whether it serves (grpc.health.v1): exit 0 when it does. For
    /// probes (Kubernetes exec probes, load balancers' checks).
    Health {
        /// The service's gRPC address.
        #[arg(long, env = "IMAGE_BUILDER_ADDRESS", default_value = "127.0.0.1:8080")]
        address: String,
        /// The service to ask about (`builder.ImageBuilder`, ...); the whole server when empty.
        #[arg(long, default_value = "")]
        service: String,
        #[command(flatten)]
        client: image_builder::client::ClientOptions,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Print every build, or one build's journal.
    Inspect {
        /// The service's dataDir.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// A build id: print its records.
        build_id: Option<String>,
    },
    /// Verify every record decodes and every journal folds, naming each bad record.
    Check {
        /// The service's dataDir.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
    },
}

#[cfg(feature = "scenario")]
#[derive(Subcommand)]
enum ScenarioCommand {
    /// Play scenario files against a running service; steps that need to control the
    /// service process or a fault proxy are skipped (the test kit's `image-builder-testkit
    /// scenario run` starts everything itself and plays them all).
    Run {
        /// Scenario files (YAML).
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// The running service (host:port).
        #[arg(long, value_name = "ADDR")]
        target: String,
        /// The registry (host:port, plain HTTP) to push the scenarios' base images to.
        #[arg(long, value_name = "ADDR")]
        registry: Option<String>,
        #[command(flatten)]
        client: image_builder::client::ClientOptions,
    },
}

/// Bounds the freed memory glibc keeps at the top of the heap. By default it raises that bound
/// as large blocks come and go (up to 32 MiB), so what start-up allocates for a moment stayed
/// resident: 8 MiB of an idle service's 34 MiB. A fixed 1 MiB gives it back (idle: 26 MiB).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn bound_retained_heap() {
    // SAFETY: mallopt only sets a tunable of the allocator; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn bound_retained_heap() {}

fn main() -> ExitCode {
    bound_retained_heap();
    let cli = Cli::parse();
    // `run` reads its config first: it says whether traces are exported, and the exporter
    // starts outside the async runtime (it runs on a thread of its own).
    let mut run_config = None;
    let mut traces = None;
    if let Commands::Run { config } = &cli.command {
        let config = match Config::load(config) {
            Ok(config) => config,
            Err(e) => {
                eprintln!("image-builder: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(tracing) = &config.tracing {
            match image_builder::telemetry::traces::Exporter::start(tracing) {
                Ok(exporter) => traces = Some(exporter),
                Err(e) => {
                    eprintln!("image-builder: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        run_config = Some(config);
    }
    image_builder::telemetry::init_tracing(traces.as_ref());
    // Named crash points for tests (see orchestrator/task.rs), from the FAILPOINTS variable.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("image-builder: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Commands::Run { .. } => match run_config {
            Some(config) => runtime.block_on(image_builder::server::run(config)),
            None => Err(anyhow::anyhow!("no configuration")),
        },
        Commands::Store {
            command: StoreCommand::Inspect { data_dir, build_id },
        } => cmd::store::inspect(&data_dir, build_id.as_deref()),
        Commands::Store {
            command: StoreCommand::Check { data_dir },
        } => cmd::store::check(&data_dir),
        Commands::Builds {
            connection,
            command,
        } => runtime.block_on(cmd::builds::run(connection, command)),
        #[cfg(feature = "scenario")]
        Commands::Scenario {
            command:
                ScenarioCommand::Run {
                    files,
                    target,
                    registry,
                    client,
                },
        } => {
            let setup = image_builder_scenario::Target {
                address: target,
                registry,
                client,
                cli_binary: std::env::current_exe()
                    .unwrap_or_else(|_| PathBuf::from("image-builder")),
            };
            match runtime.block_on(image_builder_scenario::run_files(&files, &setup)) {
                0 => Ok(()),
                failed => Err(anyhow::anyhow!("{failed} scenario(s) failed")),
            }
        }
        Commands::Health {
            address,
            service,
            client,
        } => runtime.block_on(health(&address, service, &client)),
    };
    drop(runtime);
    if let Some(traces) = traces {
        traces.shutdown();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("image-builder: {e:#}");
            // Where the error was made, when RUST_BACKTRACE (or RUST_LIB_BACKTRACE) asks for
            // it: the release binary's symbols and line tables are in `image-builder.debug`
            // beside it (scripts/release.sh), which the backtrace finds there.
            let backtrace = e.backtrace();
            if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
                eprintln!("backtrace:\n{backtrace}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Exits 0 when the service at `address` reports `SERVING` for `service`.
async fn health(
    address: &str,
    service: String,
    client: &image_builder::client::ClientOptions,
) -> anyhow::Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    let channel = client.connector()?.channel(address).await?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.clone(),
        })
        .await
        .map_err(|e| anyhow::anyhow!("{:?}: {}", e.code(), e.message()))?
        .into_inner()
        .status();
    let shown = if service.is_empty() {
        "image-builder"
    } else {
        &service
    };
    if status == ServingStatus::Serving {
        println!("{shown}: SERVING");
        Ok(())
    } else {
        Err(anyhow::anyhow!("{shown}: {}", status.as_str_name()))
    }
}
