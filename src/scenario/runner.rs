//! Plays one scenario: sets up its environment (registry, fault proxy, base images, git
//! repositories, the service), runs its steps in order and reports each one.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use image_builder_state::{Journal, Phase};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use super::model::{self, DockerfileSpec, ProxyMode, Scenario, Step};
use crate::api::image_builder::LOG_OFFSET_METADATA;
use crate::proto::builder as pb;
use crate::proto::builder::image_builder_client::ImageBuilderClient;
use crate::proto::contentservice as cs;
use crate::testkit::{self, BaseImage, FaultProxy, GitRepo, LocalRegistry, Service};

/// How a scenario is run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `image-builder` binary to start as the service.
    pub binary: PathBuf,
    /// Play against this running service (`host:port`) instead of starting one.
    pub target: Option<String>,
    /// With `target`: the registry (`host:port`, plain HTTP) base images are pushed to.
    pub registry: Option<String>,
}

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

/// The ECR host name ECR scenarios reach their registry by (moto's default account).
const ECR_NAME: &str = "123456789012.dkr.ecr.us-east-1.amazonaws.com";

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
    /// The `image-builder` binary (for CLI steps).
    binary: PathBuf,
    /// Running `builds logs --follow` commands by name, with their build.
    followers: HashMap<String, (String, tokio::process::Child)>,
    /// The service's environment at every start (AWS settings under ECR), beside FAILPOINTS.
    base_env: Vec<(String, String)>,
    _moto: Option<testkit::MotoServer>,
    /// `user:password` of the registry's first user, for checks with skopeo.
    registry_creds: Option<String>,
    pull_secret: Option<(PathBuf, String, Vec<String>)>,
    _secrets_dir: tempfile::TempDir,
    _registry: Option<LocalRegistry>,
    proxy: Option<FaultProxy>,
    vars: Vec<(String, String)>,
    repos: HashMap<String, GitRepo>,
    service: Option<Service>,
    grpc_url: String,
    builds: HashMap<String, Tracked>,
    groups: HashMap<String, Vec<String>>,
    listeners: HashMap<String, Listener>,
}

/// Runs the scenario in `path`.
pub async fn run_file(path: &Path, options: &Options) -> Report {
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
    run(scenario, options).await
}

/// Runs a parsed scenario.
pub async fn run(scenario: Scenario, options: &Options) -> Report {
    let mut report = Report {
        name: scenario.name.clone(),
        steps: Vec::new(),
        setup_error: None,
    };
    let mut world = match World::set_up(&scenario, options).await {
        Ok(world) => world,
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
        } else if options.target.is_some() && step.needs_process_control() {
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
    if failed && let Some(service) = &world.service {
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

fn parse_status(text: &str) -> Result<pb::BuildStatus, String> {
    pb::BuildStatus::from_str_name(text).ok_or_else(|| {
        format!("{text:?} is not a BuildStatus (done_success, done_failure, running, unknown)")
    })
}

impl World {
    async fn set_up(scenario: &Scenario, options: &Options) -> Result<Self, String> {
        let env = &scenario.environment;
        let ecr_token = testkit::MotoServer::token_password();
        let moto = match (env.ecr, &options.target) {
            (true, None) => {
                testkit::alias_loopback(ECR_NAME)
                    .map_err(|e| format!("alias {ECR_NAME} to loopback in /etc/hosts: {e}"))?;
                Some(testkit::MotoServer::start().map_err(|e| format!("moto: {e}"))?)
            }
            _ => None,
        };
        let (registry, registry_addr) = match (&options.target, &options.registry) {
            (Some(_), Some(addr)) => (None, addr.clone()),
            (Some(_), None) => (None, String::new()),
            (None, _) => {
                let mut users: Vec<(&str, &str)> = env
                    .registry_users
                    .iter()
                    .map(|u| (u.user.as_str(), u.password.as_str()))
                    .collect();
                if env.ecr {
                    users.insert(0, ("AWS", ecr_token.as_str()));
                }
                let registry = LocalRegistry::start_with_users(&users)
                    .map_err(|e| format!("registry: {e}"))?;
                let addr = registry.addr().to_owned();
                (Some(registry), addr)
            }
        };
        let proxy = match (env.proxy, &options.target) {
            (ProxyMode::None, _) | (_, Some(_)) => None,
            _ => Some(
                FaultProxy::start(&registry_addr)
                    .await
                    .map_err(|e| format!("fault proxy: {e}"))?,
            ),
        };
        let mut proxy_addr = proxy
            .as_ref()
            .map(|p| p.addr().to_owned())
            .unwrap_or_default();
        // Under ECR, the service reaches the registry (or the proxy) by an ECR host name.
        let direct_addr = registry_addr.clone();
        let mut registry_addr = registry_addr;
        if moto.is_some() {
            let port = |addr: &str| addr.rsplit(':').next().unwrap_or_default().to_owned();
            registry_addr = format!("{ECR_NAME}:{}", port(&registry_addr));
            if !proxy_addr.is_empty() {
                proxy_addr = format!("{ECR_NAME}:{}", port(&proxy_addr));
            }
        }
        let via_base = if proxy.is_some() {
            &proxy_addr
        } else {
            &registry_addr
        };
        let via_workspace = if env.proxy == ProxyMode::All {
            &proxy_addr
        } else {
            &registry_addr
        };
        let mut vars = vec![
            ("${registry}".to_owned(), registry_addr.clone()),
            ("${proxy}".to_owned(), proxy_addr.clone()),
        ];
        for image in &env.base_images {
            ensure!(
                !registry_addr.is_empty(),
                "base images need a registry: pass --registry with --target"
            );
            let made = BaseImage::busybox(image.payload_mb << 20)
                .map_err(|e| format!("base image {}: {e}", image.name))?;
            let creds = if env.ecr {
                Some(format!("AWS:{ecr_token}"))
            } else {
                env.registry_users
                    .first()
                    .map(|u| format!("{}:{}", u.user, u.password))
            };
            testkit::push_image_as(
                &made,
                &direct_addr,
                &format!("base/{}:1", image.name),
                creds.as_deref(),
            )
            .map_err(|e| format!("push base image {}: {e}", image.name))?;
            vars.push((
                format!("${{base.{}}}", image.name),
                format!("{via_base}/base/{}:1", image.name),
            ));
        }
        let mut repos = HashMap::new();
        for spec in &env.git {
            let files: Vec<(String, String)> = spec
                .files
                .iter()
                .map(|(path, content)| (path.clone(), expand(&vars, content)))
                .collect();
            let borrowed: Vec<(&str, &str)> = files
                .iter()
                .map(|(p, c)| (p.as_str(), c.as_str()))
                .collect();
            let repo = GitRepo::new(&borrowed)
                .map_err(|e| format!("git repository {}: {e}", spec.name))?;
            vars.push((format!("${{git.{}}}", spec.name), repo.uri()));
            repos.insert(spec.name.clone(), repo);
        }
        let secrets_dir = tempfile::Builder::new()
            .prefix("scenario-secrets-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        let mut base_env: Vec<(String, String)> = Vec::new();
        let (service, grpc_url) = match &options.target {
            Some(target) => (None, format!("http://{target}")),
            None => {
                let mut config = serde_json::json!({
                    "baseImageRepository": format!("{via_workspace}/base-images"),
                    "workspaceImageRepository": format!("{via_workspace}/workspace"),
                    "insecureRegistries": [registry_addr, proxy_addr],
                    // The environment's git repositories live on this machine.
                    "allowLocalRepositories": true,
                });
                if proxy_addr.is_empty() {
                    config["insecureRegistries"] = serde_json::json!([registry_addr]);
                }
                if let Some(user) = &env.pull_secret {
                    let path = secrets_dir.path().join("pull-secret.json");
                    write_pull_secret(&path, &[registry_addr.as_str(), proxy_addr.as_str()], user)?;
                    config["pullSecretFile"] = path.display().to_string().into();
                }
                // A fixed port, so that clients such as `builds logs --follow` find the service
                // again after a restart.
                let port = testkit::free_port().map_err(|e| format!("free port: {e}"))?;
                config["grpcAddress"] = format!("127.0.0.1:{port}").into();
                let mut service_env = vec![("FAILPOINTS", env.failpoints.as_str())];
                if let Some(moto) = &moto {
                    config["enableAdditionalECRAuth"] = true.into();
                    config["ecrEndpoint"] = moto.endpoint().into();
                    service_env.extend([
                        ("AWS_ACCESS_KEY_ID", "testing"),
                        ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_EC2_METADATA_DISABLED", "true"),
                    ]);
                }
                for (key, value) in &env.config {
                    config[key] = value.clone();
                }
                base_env = service_env
                    .iter()
                    .filter(|(k, _)| *k != "FAILPOINTS")
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                let service = Service::start_with_env(&options.binary, config, &service_env)
                    .map_err(|e| format!("service: {e}"))?;
                let url = service.grpc_url();
                (Some(service), url)
            }
        };
        Ok(Self {
            binary: options.binary.clone(),
            followers: HashMap::new(),
            base_env,
            _moto: moto,
            registry_creds: if env.ecr {
                Some(format!("AWS:{ecr_token}"))
            } else {
                env.registry_users
                    .first()
                    .map(|u| format!("{}:{}", u.user, u.password))
            },
            pull_secret: env.pull_secret.as_ref().map(|u| {
                (
                    secrets_dir.path().join("pull-secret.json"),
                    u.user.clone(),
                    vec![registry_addr.clone(), proxy_addr.clone()],
                )
            }),
            _secrets_dir: secrets_dir,
            _registry: registry,
            proxy,
            vars,
            repos,
            service,
            grpc_url,
            builds: HashMap::new(),
            groups: HashMap::new(),
            listeners: HashMap::new(),
        })
    }

    async fn ops(
        &self,
    ) -> Result<crate::proto::ops::build_ops_client::BuildOpsClient<Channel>, String> {
        crate::proto::ops::build_ops_client::BuildOpsClient::connect(self.grpc_url.clone())
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", self.grpc_url))
    }

    async fn client(&self) -> Result<ImageBuilderClient<Channel>, String> {
        ImageBuilderClient::connect(self.grpc_url.clone())
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", self.grpc_url))
    }

    /// Starts the (stopped) service again with its environment and these failpoints.
    fn start_again(&mut self, failpoints: &str) -> Check {
        let base_env = self.base_env.clone();
        let mut env: Vec<(&str, &str)> = base_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        env.push(("FAILPOINTS", failpoints));
        let service = self.service()?;
        service.set_env(&env);
        service.restart().map_err(|e| format!("restart: {e}"))?;
        self.grpc_url = service.grpc_url();
        Ok(())
    }

    fn service(&mut self) -> Result<&mut Service, String> {
        self.service
            .as_mut()
            .ok_or_else(|| "no service process to control".to_owned())
    }

    fn proxy(&self) -> Result<&FaultProxy, String> {
        self.proxy
            .as_ref()
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
                r#ref: expand(&self.vars, r),
            }),
            (None, Some(d)) => {
                let repo = self
                    .repos
                    .get(&d.repo)
                    .ok_or_else(|| format!("no git repository named {:?}", d.repo))?;
                let mode = match d.mode.as_str() {
                    "head" => cs::CloneTargetMode::RemoteHead,
                    "branch" => cs::CloneTargetMode::RemoteBranch,
                    "commit" => cs::CloneTargetMode::RemoteCommit,
                    other => {
                        return Err(format!(
                            "dockerfile.mode {other:?} is not head, branch or commit"
                        ));
                    }
                };
                pb::build_source::From::File(pb::BuildSourceDockerfile {
                    source: Some(cs::WorkspaceInitializer {
                        spec: Some(cs::workspace_initializer::Spec::Git(cs::GitInitializer {
                            remote_uri: repo.uri(),
                            target_mode: mode as i32,
                            clone_taget: expand(&self.vars, &d.target),
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
                let want = status.as_deref().map(parse_status).transpose()?;
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
                let needle = expand(&self.vars, contains);
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
                fault.path_contains = expand(&self.vars, &fault.path_contains);
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
                let want = parse_status(status)?;
                let (got, message) = self.final_status(build).await?;
                ensure!(
                    got == want,
                    "{build} ended {} ({message}), expected {}",
                    got.as_str_name(),
                    want.as_str_name()
                );
                if let Some(text) = message_contains {
                    let text = expand(&self.vars, text);
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
                    let text = expand(&self.vars, text);
                    ensure!(log.contains(&text), "{build}'s log lacks {text:?}:\n{log}");
                }
                for text in not_contains {
                    let text = expand(&self.vars, text);
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
                let creds = self.registry_creds.as_deref();
                testkit::skopeo_inspect_as(&reference, creds)
                    .map_err(|e| format!("{reference} is not in the registry: {e}"))?;
                if let Some(file) = file {
                    let bytes = testkit::read_file_from_image_as(&reference, file, creds)
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
                let want = parse_code(code)?;
                let mut client = self.client().await?;
                let got = match call.as_str() {
                    "build" => {
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
                    "resolve_base_image" => {
                        let r = reference
                            .as_deref()
                            .map(|r| expand(&self.vars, r))
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
                    "resolve_workspace_image" => {
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
                    "logs" => {
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
                    other => {
                        return Err(format!(
                            "call {other:?} is not build, resolve_base_image, resolve_workspace_image or logs"
                        ));
                    }
                };
                ensure!(got == want, "{call} answered {got:?}, expected {want:?}");
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
                let (path, user, hosts) = self
                    .pull_secret
                    .clone()
                    .ok_or("the scenario has no pull_secret in its environment")?;
                let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
                write_pull_secret(
                    &path,
                    &hosts,
                    &model::UserSpec {
                        user,
                        password: password.clone(),
                    },
                )
            }
            Step::ExpectNoLeak { values } => self.expect_no_leak(values).await,
            Step::FollowLogs { name, build } => {
                let id = self.build_id(build).await?;
                let address = self.grpc_url.trim_start_matches("http://").to_owned();
                let child = tokio::process::Command::new(&self.binary)
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
                    &got.state == state,
                    "{build} is {}, expected {state}",
                    got.state
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
                any_of: spec.any_of.iter().map(|h| expand(&self.vars, h)).collect(),
            })
        };
        let additional = spec
            .additional
            .iter()
            .map(|(host, creds)| {
                (
                    expand(&self.vars, host),
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
            let at_rest = testkit::files_containing(&data_dir, value.as_bytes());
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

fn parse_code(text: &str) -> Result<tonic::Code, String> {
    let code = match text {
        "ok" => tonic::Code::Ok,
        "invalid_argument" => tonic::Code::InvalidArgument,
        "not_found" => tonic::Code::NotFound,
        "unauthenticated" => tonic::Code::Unauthenticated,
        "permission_denied" => tonic::Code::PermissionDenied,
        "unavailable" => tonic::Code::Unavailable,
        "failed_precondition" => tonic::Code::FailedPrecondition,
        "internal" => tonic::Code::Internal,
        other => return Err(format!("{other:?} is not a known status code name")),
    };
    Ok(code)
}

/// Writes a docker config file with one credential for each host.
fn write_pull_secret(path: &Path, hosts: &[&str], user: &model::UserSpec) -> Check {
    use base64::Engine;
    let token = base64::engine::general_purpose::STANDARD
        .encode(format!("{}:{}", user.user, user.password));
    let auths: serde_json::Map<String, serde_json::Value> = hosts
        .iter()
        .filter(|h| !h.is_empty())
        .map(|h| (h.to_string(), serde_json::json!({ "auth": token })))
        .collect();
    std::fs::write(path, serde_json::json!({ "auths": auths }).to_string())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Replaces `${…}` variables.
fn expand(vars: &[(String, String)], text: &str) -> String {
    let mut out = text.to_owned();
    for (name, value) in vars {
        out = out.replace(name, value);
    }
    out
}
