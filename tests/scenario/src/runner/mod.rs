//! Plays one scenario: has its environment made (see [`super::environment`]), runs its steps
//! in order and reports each one. Steps are played by concern: `builds.rs` (submit, wait,
//! assert results), `logs.rs` (listeners and followers), `process.rs` (restarts, kills,
//! failpoints, metrics, the store), `faults.rs` (the registry proxy, credential rotation),
//! `calls.rs` (single calls and the ops API).

use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use image_builder_state::{Journal, Phase};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::environment::{
    Environment, FaultInjector, ServiceProcess, Setup, expand, write_pull_secret,
};
use super::fixtures;
use super::model::{self, DockerfileSpec, Scenario, Step};
use image_builder_proto::LOG_OFFSET_METADATA;
use image_builder_proto::builder as pb;
use image_builder_proto::contentservice as cs;

/// The outcome of one step.
#[derive(Debug)]
pub enum Outcome {
    /// The step did what it should.
    Passed,
    /// It did not; why.
    Failed(String),
    /// It was not run; why.
    Skipped(String),
}

/// The outcome of a scenario, step by step.
#[derive(Debug)]
pub struct Report {
    /// The scenario's name.
    pub name: String,
    /// Each step: index, kind, outcome, time taken.
    pub steps: Vec<(usize, &'static str, Outcome, Duration)>,
    /// Set up failed before any step ran.
    pub setup_error: Option<String>,
}

impl Report {
    /// True when set-up worked and no step failed.
    pub fn passed(&self) -> bool {
        self.setup_error.is_none() && !self.steps.iter().any(|s| matches!(s.2, Outcome::Failed(_)))
    }
}

type Check = Result<(), String>;

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)*) => {
        if !$cond {
            return Err(format!($($fmt)*));
        }
    };
}

// Each step kind is played in the module of its concern (the macro above is theirs too).
mod builds;
mod calls;
mod faults;
mod logs;
mod process;

/// A Build call followed in the background.
struct Tracked {
    state: Arc<Mutex<CallState>>,
    ended: watch::Receiver<bool>,
}

#[derive(Default)]
struct CallState {
    build_id: String,
    responses: Vec<pb::BuildResponse>,
    error: Option<tonic::Status>,
}

/// A Logs listener.
struct Listener {
    build: String,
    slow: Option<tonic::Streaming<pb::LogsResponse>>,
    reader: Option<JoinHandle<Result<Vec<u8>, tonic::Status>>>,
}

struct Playback {
    env: Environment,
    /// Running `builds logs --follow` commands by name, with their build.
    followers: HashMap<String, (String, tokio::process::Child)>,
    builds: HashMap<String, Tracked>,
    groups: HashMap<String, Vec<String>>,
    listeners: HashMap<String, Listener>,
}

/// Runs the scenario in `path`.
pub async fn run_file(path: &Path, setup: &dyn Setup) -> Report {
    let name = path.display().to_string();
    let scenario = match std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {name}: {e}"))
        .and_then(|text| {
            model::parse(&text).map_err(|e| format!("{name} is not a valid scenario: {e}"))
        }) {
        Ok(scenario) => scenario,
        Err(e) => {
            return Report {
                name,
                steps: Vec::new(),
                setup_error: Some(e),
            };
        }
    };
    run(scenario, setup).await
}

/// Runs a parsed scenario.
pub async fn run(scenario: Scenario, setup: &dyn Setup) -> Report {
    let mut report = Report {
        name: scenario.name.clone(),
        steps: Vec::new(),
        setup_error: None,
    };
    let mut world = match setup.set_up(&scenario.environment).await {
        Ok(env) => Playback {
            env,
            followers: HashMap::new(),
            builds: HashMap::new(),
            groups: HashMap::new(),
            listeners: HashMap::new(),
        },
        Err(e) => {
            report.setup_error = Some(e);
            return report;
        }
    };
    let mut failed = false;
    for (i, step) in scenario.steps.iter().enumerate() {
        let started = Instant::now();
        let outcome = if failed {
            Outcome::Skipped("an earlier step failed".into())
        } else if !setup.controls_service() && step.needs_process_control() {
            Outcome::Skipped("needs control of the service process (not with --target)".into())
        } else {
            match world.step(step).await {
                Ok(()) => Outcome::Passed,
                Err(e) => {
                    failed = true;
                    Outcome::Failed(e)
                }
            }
        };
        report
            .steps
            .push((i + 1, step.kind(), outcome, started.elapsed()));
    }
    if failed && let Some(service) = &world.env.service {
        report.steps.push((
            0,
            "service log (last lines)",
            Outcome::Skipped(last_lines(&service.log(), 30)),
            Duration::ZERO,
        ));
    }
    if failed {
        let tails = world.build_log_tails().await;
        if !tails.is_empty() {
            report.steps.push((
                0,
                "build logs (last lines)",
                Outcome::Skipped(tails),
                Duration::ZERO,
            ));
        }
    }
    report
}

/// The last `n` lines of `text`.
fn last_lines(text: &str, n: usize) -> String {
    let mut lines: Vec<&str> = text.lines().rev().take(n).collect();
    lines.reverse();
    lines.join("\n")
}

impl Playback {
    async fn ops(&self) -> Result<image_builder_proto::client::OpsClient, String> {
        let connector = self.env.client.connector().map_err(|e| e.to_string())?;
        connector
            .ops(&self.env.grpc_url)
            .await
            .map_err(|e| e.to_string())
    }

    async fn client(&self) -> Result<image_builder_proto::client::BuilderClient, String> {
        let connector = self.env.client.connector().map_err(|e| e.to_string())?;
        connector
            .builder(&self.env.grpc_url)
            .await
            .map_err(|e| e.to_string())
    }

    async fn step(&mut self, step: &Step) -> Check {
        match step {
            Step::Build(_)
            | Step::Wait { .. }
            | Step::WaitLog { .. }
            | Step::ExpectStatus { .. }
            | Step::ExpectImage { .. }
            | Step::ExpectTopLayer { .. }
            | Step::ExpectSameBuild { .. }
            | Step::ExpectBuilds { .. } => self.build_step(step).await,
            Step::Listen { .. }
            | Step::Detach { .. }
            | Step::ExpectLog { .. }
            | Step::ExpectListeners { .. }
            | Step::FollowLogs { .. }
            | Step::ExpectFollowed { .. } => self.log_step(step).await,
            Step::Restart { .. }
            | Step::Kill { .. }
            | Step::WaitForPoint { .. }
            | Step::ExpectMetric { .. }
            | Step::ExpectServiceLog { .. }
            | Step::ExpectConcurrency { .. }
            | Step::ExpectNoLeak { .. } => self.process_step(step).await,
            Step::Fault(_)
            | Step::ClearFaults { .. }
            | Step::ExpectFaultsServed { .. }
            | Step::RotatePullSecret { .. }
            | Step::Commit { .. } => self.fault_step(step).await,
            Step::ExpectCall { .. }
            | Step::Cancel { .. }
            | Step::Retry { .. }
            | Step::ExpectState { .. } => self.call_step(step).await,
        }
    }
}
