//! `image-builder-testkit`: the demo (the README's first command) and self-hosted scenarios,
//! both run against the real `image-builder` binary, which this command starts.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use image_builder_testkit::SelfHosted;

/// Runs image-builder against real parts this command starts on loopback.
#[derive(Parser)]
#[command(name = "image-builder-testkit", version, about)]
struct Cli {
    /// The `image-builder` binary (default: the one beside this command).
    #[arg(long, value_name = "FILE", global = true)]
    service_binary: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a local registry and the service, run builds through the gRPC API and show
    /// their status and logs.
    Demo {
        /// Keep the registry and service running until Ctrl-C.
        #[arg(long)]
        keep: bool,
    },
    /// Scenarios (see scenarios/README.md), with every part of their environment started
    /// here: registry, fault proxy, moto, git repositories and the service.
    Scenario {
        #[command(subcommand)]
        command: ScenarioCommand,
    },
    /// Start a single-node Kubernetes on loopback for the tests, write the shell lines that
    /// point them at it to FILE, and keep it running until SIGTERM or Ctrl-C.
    Cluster {
        /// Where to write `export IMAGE_BUILDER_TEST_KUBECONFIG=…` and the containerd socket.
        #[arg(long, value_name = "FILE")]
        env_file: PathBuf,
    },
}

#[derive(Subcommand)]
enum ScenarioCommand {
    /// Play scenario files.
    Run {
        /// Scenario files (YAML).
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    image_builder::telemetry::init_tracing(None);
    let binary = cli.service_binary.unwrap_or_else(|| {
        std::env::current_exe()
            .map(|exe| exe.with_file_name("image-builder"))
            .unwrap_or_else(|_| PathBuf::from("image-builder"))
    });
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("image-builder-testkit: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Cluster { env_file } => runtime.block_on(run_cluster(&env_file)),
        Command::Demo { keep } => runtime.block_on(image_builder_testkit::demo::run(&binary, keep)),
        Command::Scenario {
            command: ScenarioCommand::Run { files },
        } => {
            let setup = SelfHosted { binary };
            match runtime.block_on(image_builder_scenario::run_files(&files, &setup)) {
                0 => Ok(()),
                failed => Err(anyhow::anyhow!("{failed} scenario(s) failed")),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("image-builder-testkit: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a test cluster until asked to stop.
async fn run_cluster(env_file: &std::path::Path) -> anyhow::Result<()> {
    let cluster =
        tokio::task::spawn_blocking(image_builder_testkit::cluster::Cluster::start).await??;
    std::fs::write(env_file, cluster.env_lines())?;
    eprintln!(
        "image-builder-testkit: test cluster ready (logs in {}); stop it with SIGTERM",
        cluster.dir().join("logs").display()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    let _ = std::fs::remove_file(env_file);
    tokio::task::spawn_blocking(move || drop(cluster)).await?;
    Ok(())
}
