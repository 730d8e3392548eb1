//! Plays one scenario: has its environment made (see [`super::environment`]), runs its steps
//! in order and reports each one.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use image_builder_state::{Journal, Phase};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use super::environment::{
    Environment, FaultInjector, ServiceProcess, Setup, expand, write_pull_secret,
};
use super::fixtures;
use super::model::{self, DockerfileSpec, Scenario, Step};
use crate::api::image_builder::LOG_OFFSET_METADATA;
use crate::proto::builder as pb;
use crate::proto::builder::image_builder_client::ImageBuilderClient;
use crate::proto::contentservice as cs;

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

struct World {
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
        Ok(env) => World {
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
        let log = service.log();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        report.steps.push((
            0,
            "service log (last lines)",
            Outcome::Skipped(tail.into_iter().rev().collect::<Vec<_>>().join("\n")),
            Duration::ZERO,
        ));
    }
    report
}

/// The Build status a scenario names.
fn proto_status(name: model::StatusName) -> pb::BuildStatus {
    match name {
        model::StatusName::Unknown => pb::BuildStatus::Unknown,
        model::StatusName::Running => pb::BuildStatus::Running,
        model::StatusName::DoneSuccess => pb::BuildStatus::DoneSuccess,
        model::StatusName::DoneFailure => pb::BuildStatus::DoneFailure,
    }
}

impl World {
    async fn ops(
        &self,
    ) -> Result<crate::proto::ops::build_ops_client::BuildOpsClient<Channel>, String> {
        crate::proto::ops::build_ops_client::BuildOpsClient::connect(self.env.grpc_url.clone())
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", self.env.grpc_url))
    }

    async fn client(&self) -> Result<ImageBuilderClient<Channel>, String> {
        ImageBuilderClient::connect(self.env.grpc_url.clone())
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", self.env.grpc_url))
    }

    /// Starts the (stopped) service again with its environment and these failpoints.
    fn start_again(&mut self, failpoints: &str) -> Check {
        let url = self.service()?.start(failpoints)?;
        self.env.grpc_url = url;
        Ok(())
    }

    fn service(&mut self) -> Result<&mut dyn ServiceProcess, String> {
        match self.env.service.as_mut() {
            Some(service) => Ok(service.as_mut()),
            None => Err("no service process to control".to_owned()),
        }
    }

    fn proxy(&self) -> Result<&dyn FaultInjector, String> {
        self.env
            .faults
            .as_deref()
            .ok_or_else(|| "the scenario has no fault proxy: set environment.proxy".to_owned())
    }

    /// Build names behind a build or group name.
    fn members(&self, name: &str) -> Result<Vec<String>, String> {
        if let Some(group) = self.groups.get(name) {
            return Ok(group.clone());
        }
        ensure!(self.builds.contains_key(name), "no build named {name:?}");
        Ok(vec![name.to_owned()])
    }

    fn source(
        &self,
        reference: Option<&str>,
        dockerfile: Option<&DockerfileSpec>,
        version: Option<&str>,
    ) -> Result<pb::BuildSource, String> {
        let from = match (reference, dockerfile) {
            (Some(r), None) => pb::build_source::From::Ref(pb::BuildSourceReference {
                r#ref: expand(&self.env.vars, r),
            }),
            (None, Some(d)) => {
                let repo = self
                    .env
                    .repos
                    .get(&d.repo)
                    .ok_or_else(|| format!("no git repository named {:?}", d.repo))?;
                let mode = match d.mode {
                    model::CloneMode::Head => cs::CloneTargetMode::RemoteHead,
                    model::CloneMode::Branch => cs::CloneTargetMode::RemoteBranch,
                    model::CloneMode::Commit => cs::CloneTargetMode::RemoteCommit,
                };
                pb::build_source::From::File(pb::BuildSourceDockerfile {
                    source: Some(cs::WorkspaceInitializer {
                        spec: Some(cs::workspace_initializer::Spec::Git(cs::GitInitializer {
                            remote_uri: repo.uri(),
                            target_mode: mode as i32,
                            clone_taget: expand(&self.env.vars, &d.target),
                            ..Default::default()
                        })),
                    }),
                    dockerfile_version: version
                        .map(str::to_owned)
                        .unwrap_or_else(|| d.version.clone()),
                    dockerfile_path: d.path.clone(),
                    context_path: d.context.clone(),
                })
            }
            (None, None) => return Err("name a source: ref or dockerfile".into()),
            (Some(_), Some(_)) => return Err("give ref or dockerfile, not both".into()),
        };
        Ok(pb::BuildSource { from: Some(from) })
    }

    async fn step(&mut self, step: &Step) -> Check {
        match step {
            Step::Build(spec) => self.build(spec).await,
            Step::Wait {
                build,
                status,
                timeout_s,
            } => {
                let want = status.map(proto_status);
                let timeout = Duration::from_secs(timeout_s.unwrap_or(180));
                for name in self.members(build)? {
                    let (got, message) = tokio::time::timeout(timeout, self.final_status(&name))
                        .await
                        .map_err(|_| format!("{name} did not end within {timeout:?}"))??;
                    if let Some(want) = want {
                        ensure!(
                            got == want,
                            "{name} ended {} ({message}), expected {}",
                            got.as_str_name(),
                            want.as_str_name()
                        );
                    }
                }
                Ok(())
            }
            Step::WaitLog { build, contains } => {
                let id = self.build_id(build).await?;
                let mut client = self.client().await?;
                let mut stream = client
                    .logs(pb::LogsRequest {
                        build_id: id,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| format!("Logs: {e}"))?
                    .into_inner();
                let mut seen = Vec::new();
                let needle = expand(&self.env.vars, contains);
                while !String::from_utf8_lossy(&seen).contains(&needle) {
                    match stream.message().await.map_err(|e| format!("Logs: {e}"))? {
                        Some(chunk) => seen.extend(chunk.content),
                        None => return Err(format!("{build}'s log ended without {needle:?}")),
                    }
                }
                Ok(())
            }
            Step::Listen { name, build, slow } => {
                let id = self.build_id(build).await?;
                let mut client = self.client().await?;
                let stream = client
                    .logs(pb::LogsRequest {
                        build_id: id,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| format!("Logs: {e}"))?
                    .into_inner();
                let listener = if *slow {
                    Listener {
                        build: build.clone(),
                        slow: Some(stream),
                        reader: None,
                    }
                } else {
                    Listener {
                        build: build.clone(),
                        slow: None,
                        reader: Some(tokio::spawn(drain(stream))),
                    }
                };
                self.listeners.insert(name.clone(), listener);
                Ok(())
            }
            Step::Detach { listener } => {
                let l = self
                    .listeners
                    .remove(listener)
                    .ok_or_else(|| format!("no listener named {listener:?}"))?;
                if let Some(reader) = l.reader {
                    reader.abort();
                }
                Ok(())
            }
            Step::Restart { failpoints } => {
                self.service()?.stop();
                self.start_again(failpoints)
            }
            Step::Kill { failpoints } => {
                self.service()?.kill();
                self.start_again(failpoints)
            }
            Step::Fault(fault) => {
                let mut fault = fault.clone();
                fault.path_contains = expand(&self.env.vars, &fault.path_contains);
                self.proxy()?.inject(fault);
                Ok(())
            }
            Step::ClearFaults {} => {
                self.proxy()?.clear();
                Ok(())
            }
            Step::Advance { point } => {
                let needle = format!("failpoint reached failpoint={point}");
                let service = self.service()?;
                for _ in 0..1200 {
                    if service.log().contains(&needle) {
                        return Ok(());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(format!(
                    "the service did not reach failpoint {point} within 60 s (is it configured with pause?)"
                ))
            }
            Step::ExpectStatus {
                build,
                status,
                message_contains,
            } => {
                let want = proto_status(*status);
                let (got, message) = self.final_status(build).await?;
                ensure!(
                    got == want,
                    "{build} ended {} ({message}), expected {}",
                    got.as_str_name(),
                    want.as_str_name()
                );
                if let Some(text) = message_contains {
                    let text = expand(&self.env.vars, text);
                    ensure!(
                        message.contains(&text),
                        "{build}'s message {message:?} lacks {text:?}"
                    );
                }
                Ok(())
            }
            Step::ExpectLog {
                build,
                contains,
                not_contains,
                count,
                sequence,
            } => {
                let log = String::from_utf8_lossy(&self.full_log(build).await?).into_owned();
                for text in contains {
                    let text = expand(&self.env.vars, text);
                    ensure!(log.contains(&text), "{build}'s log lacks {text:?}:\n{log}");
                }
                for text in not_contains {
                    let text = expand(&self.env.vars, text);
                    ensure!(
                        !log.contains(&text),
                        "{build}'s log contains {text:?}:\n{log}"
                    );
                }
                for (text, n) in count {
                    let found = log.matches(text.as_str()).count();
                    ensure!(
                        found == *n,
                        "{build}'s log has {text:?} {found} times, expected {n}:\n{log}"
                    );
                }
                if let Some(seq) = sequence {
                    let got: Vec<&str> =
                        log.lines().filter(|l| l.starts_with(&seq.prefix)).collect();
                    let want: Vec<String> = (1..=seq.count)
                        .map(|i| format!("{}{i}", seq.prefix))
                        .collect();
                    ensure!(
                        got == want,
                        "{build}'s {}N lines are not 1..{} once each in order: {got:?}",
                        seq.prefix,
                        seq.count
                    );
                }
                Ok(())
            }
            Step::ExpectListeners { build } => {
                let full = self.full_log(build).await?;
                let names: Vec<String> = self
                    .listeners
                    .iter()
                    .filter(|(_, l)| &l.build == build)
                    .map(|(n, _)| n.clone())
                    .collect();
                ensure!(!names.is_empty(), "no listener of {build}");
                for name in names {
                    let l = self.listeners.remove(&name).ok_or("listener vanished")?;
                    let got = match (l.slow, l.reader) {
                        (Some(stream), _) => drain(stream).await,
                        (None, Some(reader)) => {
                            reader.await.map_err(|e| format!("listener {name}: {e}"))?
                        }
                        (None, None) => return Err(format!("listener {name} was detached")),
                    }
                    .map_err(|e| format!("listener {name}: {e}"))?;
                    ensure!(
                        got == full,
                        "listener {name} got {} bytes that differ from the {}-byte log",
                        got.len(),
                        full.len()
                    );
                }
                Ok(())
            }
            Step::ExpectImage {
                build,
                file,
                content,
            } => {
                let reference = self.workspace_ref(build).await?;
                let creds = self.env.registry_creds.as_deref();
                fixtures::skopeo_inspect_as(&reference, creds)
                    .map_err(|e| format!("{reference} is not in the registry: {e}"))?;
                if let Some(file) = file {
                    let bytes = fixtures::read_file_from_image_as(&reference, file, creds)
                        .map_err(|e| format!("{file} in {reference}: {e}"))?;
                    if let Some(content) = content {
                        let got = String::from_utf8_lossy(&bytes);
                        ensure!(
                            got == content.as_str(),
                            "{file} holds {got:?}, expected {content:?}"
                        );
                    }
                }
                Ok(())
            }
            Step::ExpectSameBuild { builds } => {
                let mut ids = std::collections::BTreeSet::new();
                for name in builds {
                    for member in self.members(name)? {
                        let id = self.build_id(&member).await?;
                        ids.insert(id);
                    }
                }
                ensure!(ids.len() == 1, "the builds have ids {ids:?}, expected one");
                Ok(())
            }
            Step::ExpectBuilds { count } => {
                let list = self
                    .client()
                    .await?
                    .list_builds(pb::ListBuildsRequest {})
                    .await
                    .map_err(|e| format!("ListBuilds: {e}"))?;
                let n = list.into_inner().builds.len();
                ensure!(n == *count, "the service has {n} builds, expected {count}");
                Ok(())
            }
            Step::ExpectConcurrency { at_most } => self.expect_concurrency(*at_most).await,
            Step::ExpectCall {
                call,
                reference,
                dockerfile,
                build_id,
                code,
            } => {
                let want = code.code();
                let mut client = self.client().await?;
                let got = match call {
                    model::CallName::Build => {
                        let source = self
                            .source(reference.as_deref(), dockerfile.as_ref(), None)
                            .ok();
                        let request = pb::BuildRequest {
                            source,
                            ..Default::default()
                        };
                        match client.build(request).await {
                            Ok(mut stream) => loop {
                                match stream.get_mut().message().await {
                                    Ok(Some(_)) => {}
                                    Ok(None) => break tonic::Code::Ok,
                                    Err(e) => break e.code(),
                                }
                            },
                            Err(e) => e.code(),
                        }
                    }
                    model::CallName::ResolveBaseImage => {
                        let r = reference
                            .as_deref()
                            .map(|r| expand(&self.env.vars, r))
                            .unwrap_or_default();
                        code_of(
                            client
                                .resolve_base_image(pb::ResolveBaseImageRequest {
                                    r#ref: r,
                                    ..Default::default()
                                })
                                .await,
                        )
                    }
                    model::CallName::ResolveWorkspaceImage => {
                        let source = self
                            .source(reference.as_deref(), dockerfile.as_ref(), None)
                            .ok();
                        code_of(
                            client
                                .resolve_workspace_image(pb::ResolveWorkspaceImageRequest {
                                    source,
                                    ..Default::default()
                                })
                                .await,
                        )
                    }
                    model::CallName::Logs => {
                        let id = build_id.clone().unwrap_or_default();
                        code_of(
                            client
                                .logs(pb::LogsRequest {
                                    build_id: id,
                                    ..Default::default()
                                })
                                .await,
                        )
                    }
                };
                ensure!(got == want, "{call:?} answered {got:?}, expected {want:?}");
                Ok(())
            }
            Step::ExpectMetric { name, value } => {
                let url = self.service()?.metrics_url();
                let text = reqwest::get(&url)
                    .await
                    .map_err(|e| format!("{url}: {e}"))?
                    .text()
                    .await
                    .map_err(|e| format!("{url}: {e}"))?;
                let got = text
                    .lines()
                    .find(|l| l.starts_with(name.as_str()) && l[name.len()..].starts_with(' '))
                    .and_then(|l| l.rsplit(' ').next())
                    .and_then(|v| v.parse::<f64>().ok());
                ensure!(
                    got == Some(*value),
                    "metric {name} is {got:?}, expected {value}"
                );
                Ok(())
            }
            Step::ExpectFaultsServed { at_least } => {
                let served = self.proxy()?.served();
                ensure!(
                    served >= *at_least,
                    "the proxy served {served} faults, expected at least {at_least}"
                );
                Ok(())
            }
            Step::RotatePullSecret { password } => {
                let secret = self
                    .env
                    .pull_secret
                    .clone()
                    .ok_or("the scenario has no pull_secret in its environment")?;
                let hosts: Vec<&str> = secret.hosts.iter().map(String::as_str).collect();
                write_pull_secret(
                    &secret.path,
                    &hosts,
                    &model::UserSpec {
                        user: secret.user,
                        password: password.clone(),
                    },
                )
            }
            Step::ExpectNoLeak { values } => self.expect_no_leak(values).await,
            Step::FollowLogs { name, build } => {
                let id = self.build_id(build).await?;
                let address = self.env.grpc_url.trim_start_matches("http://").to_owned();
                let child = tokio::process::Command::new(&self.env.cli_binary)
                    .args(["builds", "logs", "--follow", &id, "--address", &address])
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .kill_on_drop(true)
                    .spawn()
                    .map_err(|e| format!("cannot start builds logs --follow: {e}"))?;
                self.followers.insert(name.clone(), (build.clone(), child));
                Ok(())
            }
            Step::ExpectFollowed { follower } => {
                let (build, child) = self
                    .followers
                    .remove(follower)
                    .ok_or_else(|| format!("no follower named {follower:?}"))?;
                let out = tokio::time::timeout(Duration::from_secs(180), child.wait_with_output())
                    .await
                    .map_err(|_| format!("{follower} did not end within 180 s"))?
                    .map_err(|e| format!("{follower}: {e}"))?;
                ensure!(
                    out.status.success(),
                    "{follower} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let full = self.full_log(&build).await?;
                ensure!(
                    out.stdout == full,
                    "{follower} printed {} bytes that differ from the {}-byte log",
                    out.stdout.len(),
                    full.len()
                );
                Ok(())
            }
            Step::Cancel { build, reason } => {
                let id = self.build_id(build).await?;
                self.ops()
                    .await?
                    .cancel_build(crate::proto::ops::CancelBuildRequest {
                        build_id: id,
                        reason: reason.clone(),
                    })
                    .await
                    .map_err(|e| format!("CancelBuild: {}", e.message()))?;
                Ok(())
            }
            Step::Retry { build } => {
                let id = self.build_id(build).await?;
                self.ops()
                    .await?
                    .retry_build(crate::proto::ops::RetryBuildRequest { build_id: id })
                    .await
                    .map_err(|e| format!("RetryBuild: {}", e.message()))?;
                // The first attempt's stream has ended; follow the build by its journal now.
                let t = self.tracked(build)?;
                t.state.lock().responses.clear();
                Ok(())
            }
            Step::ExpectState {
                build,
                state,
                attempt,
            } => {
                let id = self.build_id(build).await?;
                let got = self
                    .ops()
                    .await?
                    .get_build(crate::proto::ops::GetBuildRequest { build_id: id })
                    .await
                    .map_err(|e| format!("GetBuild: {}", e.message()))?
                    .into_inner();
                ensure!(
                    got.state == state.as_str(),
                    "{build} is {}, expected {}",
                    got.state,
                    state.as_str()
                );
                if let Some(attempt) = attempt {
                    ensure!(
                        got.attempt == *attempt,
                        "{build} is on attempt {}, expected {attempt}",
                        got.attempt
                    );
                }
                Ok(())
            }
            Step::ExpectServiceLog { contains } => {
                let log = self.service()?.log();
                ensure!(
                    log.contains(contains.as_str()),
                    "the service log lacks {contains:?}"
                );
                Ok(())
            }
        }
    }

    fn auth(&self, spec: &model::AuthSpec) -> pb::BuildRegistryAuth {
        use base64::Engine;
        let mode = if spec.allow_all {
            pb::build_registry_auth::Mode::Total(pb::BuildRegistryAuthTotal { allow_all: true })
        } else {
            pb::build_registry_auth::Mode::Selective(pb::BuildRegistryAuthSelective {
                allow_baserep: spec.allow_baserep,
                allow_workspacerep: spec.allow_workspacerep,
                any_of: spec
                    .any_of
                    .iter()
                    .map(|h| expand(&self.env.vars, h))
                    .collect(),
            })
        };
        let additional = spec
            .additional
            .iter()
            .map(|(host, creds)| {
                (
                    expand(&self.env.vars, host),
                    base64::engine::general_purpose::STANDARD.encode(creds),
                )
            })
            .collect();
        pb::BuildRegistryAuth {
            mode: Some(mode),
            additional,
        }
    }

    async fn build(&mut self, spec: &model::BuildSpec) -> Check {
        let count = spec.count.unwrap_or(1);
        let mut names = Vec::new();
        for i in 0..count {
            let name = if spec.count.is_some() {
                format!("{}.{i}", spec.name)
            } else {
                spec.name.clone()
            };
            let version = spec.distinct.then(|| format!("v{i}"));
            let request = pb::BuildRequest {
                source: Some(self.source(
                    spec.reference.as_deref(),
                    spec.dockerfile.as_ref(),
                    version.as_deref(),
                )?),
                force_rebuild: spec.force_rebuild,
                triggered_by: "scenario".into(),
                auth: spec.auth.as_ref().map(|a| self.auth(a)),
                ..Default::default()
            };
            let tracked = self.follow(request).await?;
            self.builds.insert(name.clone(), tracked);
            names.push(name);
        }
        if spec.count.is_some() {
            self.groups.insert(spec.name.clone(), names);
        }
        Ok(())
    }

    /// Submits a Build and follows its stream in the background.
    async fn follow(&self, request: pb::BuildRequest) -> Result<Tracked, String> {
        let mut client = self.client().await?;
        let state = Arc::new(Mutex::new(CallState::default()));
        let (ended_tx, ended) = watch::channel(false);
        let (first_tx, first) = tokio::sync::oneshot::channel();
        let shared = Arc::clone(&state);
        tokio::spawn(async move {
            let mut first_tx = Some(first_tx);
            let mut record = |f: &mut dyn FnMut(&mut CallState)| {
                f(&mut shared.lock());
                if let Some(tx) = first_tx.take() {
                    let _ = tx.send(());
                }
            };
            match client.build(request).await {
                Ok(stream) => {
                    let mut stream = stream.into_inner();
                    loop {
                        match stream.message().await {
                            Ok(Some(r)) => record(&mut |s| {
                                if let Some(info) = &r.info
                                    && !info.build_id.is_empty()
                                {
                                    s.build_id = info.build_id.clone();
                                }
                                s.responses.push(r.clone());
                            }),
                            Ok(None) => break,
                            Err(e) => {
                                record(&mut |s| s.error = Some(e.clone()));
                                break;
                            }
                        }
                    }
                }
                Err(e) => record(&mut |s| s.error = Some(e.clone())),
            }
            let _ = ended_tx.send(true);
        });
        // The first message (running, or the cache hit) or the call's error arrives before
        // the call counts as submitted, so later steps see its build id.
        let _ = first.await;
        Ok(Tracked { state, ended })
    }

    fn tracked(&self, name: &str) -> Result<&Tracked, String> {
        self.builds
            .get(name)
            .ok_or_else(|| format!("no build named {name:?}"))
    }

    async fn build_id(&self, name: &str) -> Result<String, String> {
        let t = self.tracked(name)?;
        let state = t.state.lock();
        if !state.build_id.is_empty() {
            return Ok(state.build_id.clone());
        }
        match &state.error {
            Some(e) => Err(format!(
                "{name}'s Build call failed: {} {}",
                e.code(),
                e.message()
            )),
            None => Err(format!(
                "{name} has no build id (a cache hit starts no build)"
            )),
        }
    }

    /// The final status of a build and its message: from its stream, or (when the stream
    /// broke with the service) from the journal through Logs and ListBuilds.
    async fn final_status(&self, name: &str) -> Result<(pb::BuildStatus, String), String> {
        let t = self.tracked(name)?;
        let mut ended = t.ended.clone();
        ended
            .wait_for(|e| *e)
            .await
            .map_err(|_| "stream task vanished")?;
        let (last, error, id) = {
            let s = t.state.lock();
            (
                s.responses.last().cloned(),
                s.error.clone(),
                s.build_id.clone(),
            )
        };
        if let Some(last) = &last {
            let status = pb::BuildStatus::try_from(last.status).unwrap_or(pb::BuildStatus::Unknown);
            if matches!(
                status,
                pb::BuildStatus::DoneSuccess | pb::BuildStatus::DoneFailure
            ) {
                return Ok((status, last.message.clone()));
            }
        }
        if id.is_empty() {
            return Err(format!("{name}'s Build call failed: {error:?}"));
        }
        // The stream broke (restart): the journal has the answer. Logs ends when the build does.
        self.full_log(name).await?;
        let list = self
            .client()
            .await?
            .list_builds(pb::ListBuildsRequest {})
            .await
            .map_err(|e| format!("ListBuilds: {e}"))?;
        let info = list
            .into_inner()
            .builds
            .into_iter()
            .find(|b| b.build_id == id)
            .ok_or_else(|| format!("build {id} is not listed"))?;
        Ok((
            pb::BuildStatus::try_from(info.status).unwrap_or(pb::BuildStatus::Unknown),
            String::from("(stream ended with the service; status from ListBuilds)"),
        ))
    }

    async fn workspace_ref(&self, name: &str) -> Result<String, String> {
        let t = self.tracked(name)?;
        if let Some(r) = t.state.lock().responses.last() {
            return Ok(r.r#ref.clone());
        }
        let id = self.build_id(name).await?;
        let list = self
            .client()
            .await?
            .list_builds(pb::ListBuildsRequest {})
            .await
            .map_err(|e| format!("ListBuilds: {e}"))?;
        list.into_inner()
            .builds
            .into_iter()
            .find(|b| b.build_id == id)
            .map(|b| b.r#ref)
            .ok_or_else(|| format!("build {id} is not listed"))
    }

    async fn full_log(&self, name: &str) -> Result<Vec<u8>, String> {
        let id = self.build_id(name).await?;
        let mut client = self.client().await?;
        let mut request = tonic::Request::new(pb::LogsRequest {
            build_id: id,
            ..Default::default()
        });
        request.metadata_mut().insert(
            LOG_OFFSET_METADATA,
            tonic::metadata::MetadataValue::from_static("0"),
        );
        let stream = client
            .logs(request)
            .await
            .map_err(|e| format!("Logs: {e}"))?
            .into_inner();
        drain(stream).await.map_err(|e| format!("Logs: {e}"))
    }

    async fn expect_no_leak(&mut self, values: &[String]) -> Check {
        let mut seen = String::new();
        let names: Vec<String> = self.builds.keys().cloned().collect();
        for name in names {
            if self.build_id(&name).await.is_ok() {
                seen.push_str(&String::from_utf8_lossy(&self.full_log(&name).await?));
            }
            let t = self.tracked(&name)?;
            let s = t.state.lock();
            seen.push_str(&format!("{:?}{:?}", s.responses, s.error));
        }
        let service = self.service()?;
        let metrics = reqwest::get(service.metrics_url())
            .await
            .map_err(|e| e.to_string())?
            .text()
            .await
            .map_err(|e| e.to_string())?;
        seen.push_str(&metrics);
        seen.push_str(&service.log());
        let data_dir = service.data_dir();
        for value in values {
            ensure!(
                !seen.contains(value.as_str()),
                "a secret value is in a log, an answer or the metrics"
            );
            let at_rest = fixtures::files_containing(&data_dir, value.as_bytes());
            ensure!(
                at_rest.is_empty(),
                "a secret value is at rest in {at_rest:?}"
            );
        }
        Ok(())
    }

    async fn expect_concurrency(&mut self, at_most: usize) -> Check {
        let service = self.service()?;
        service.stop();
        let store = service.data_dir().join(crate::server::STORE_DIR);
        let spans = {
            let journal = Journal::open(&store).map_err(|e| format!("journal: {e}"))?;
            let mut spans = Vec::new();
            for summary in journal.summaries().map_err(|e| format!("journal: {e}"))? {
                let view = journal
                    .view(summary.id)
                    .map_err(|e| format!("journal: {e}"))?
                    .ok_or("build vanished")?;
                if let (Some(start), Some(end)) =
                    (view.entered_at_ms(Phase::Resolving), view.finished_at_ms())
                {
                    spans.push((start, end));
                }
            }
            spans
        };
        self.start_again("")?;
        let most = spans
            .iter()
            .map(|(start, _)| {
                spans
                    .iter()
                    .filter(|(s, e)| s <= start && start < e)
                    .count()
            })
            .max()
            .unwrap_or(0);
        ensure!(
            most <= at_most,
            "{most} builds ran at once, expected at most {at_most}: {spans:?}"
        );
        Ok(())
    }
}

async fn drain(mut stream: tonic::Streaming<pb::LogsResponse>) -> Result<Vec<u8>, tonic::Status> {
    let mut all = Vec::new();
    while let Some(chunk) = stream.message().await? {
        all.extend(chunk.content);
    }
    Ok(all)
}

fn code_of<T>(result: Result<T, tonic::Status>) -> tonic::Code {
    match result {
        Ok(_) => tonic::Code::Ok,
        Err(e) => e.code(),
    }
}
