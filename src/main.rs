//! The `image-builder` command: `run` serves the API; `demo` shows a real build end to end.

mod demo;

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
    /// Start a local registry and the service, run one build through the gRPC API and show its
    /// status and log (the README's first command).
    Demo {
        /// Keep the registry and service running until Ctrl-C.
        #[arg(long)]
        keep: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    image_builder::telemetry::init_tracing();
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
        Commands::Run { config } => match Config::load(&config) {
            Ok(config) => runtime.block_on(image_builder::server::run(config)),
            Err(e) => Err(anyhow::anyhow!("{e}")),
        },
        Commands::Demo { keep } => runtime.block_on(demo::run(keep)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("image-builder: {e:#}");
            ExitCode::FAILURE
        }
    }
}
