//! What a scenario runs against. [`Setup`] makes an [`Environment`] from the scenario's
//! `environment:` section. The product knows one setup, [`Target`]: an installation that is
//! already running (`image-builder scenario run --target`), where steps that need the service
//! process or a fault proxy are skipped. The test kit (`tests/testkit`) adds the self-hosted
//! setup, which starts a registry, a fault proxy, moto and the service itself.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::fault::Fault;
use super::fixtures::{self, BaseImage, GitRepo};
use super::model;

/// `${…}` variables and their values.
pub type Vars = Vec<(String, String)>;

/// The service process of a scenario, when the runner controls it.
pub trait ServiceProcess: Send {
    /// Stops it as an operator would (SIGTERM, then waits).
    fn stop(&mut self);
    /// Kills it with SIGKILL.
    fn kill(&mut self);
    /// Starts it again with its environment and these `FAILPOINTS`; returns its gRPC URL.
    fn start(&mut self, failpoints: &str) -> Result<String, String>;
    /// Everything it printed so far.
    fn log(&self) -> String;
    /// The URL of its Prometheus metrics.
    fn metrics_url(&self) -> String;
    /// Its `dataDir`.
    fn data_dir(&self) -> PathBuf;
}

/// A proxy between the service and its registry that answers with faults on demand.
pub trait FaultInjector: Send + Sync {
    /// Adds a fault rule.
    fn inject(&self, fault: Fault);
    /// Removes every rule.
    fn clear(&self);
    /// How many requests got a fault so far.
    fn served(&self) -> u64;
}

/// The installation's pull secret file, which a step may rewrite (rotation).
#[derive(Debug, Clone)]
pub struct PullSecret {
    /// The file.
    pub path: PathBuf,
    /// The user it holds.
    pub user: String,
    /// The registry hosts it names.
    pub hosts: Vec<String>,
}

/// Everything a scenario's steps talk to.
pub struct Environment {
    /// The service's gRPC URL (`http://host:port` or `https://host:port`).
    pub grpc_url: String,
    /// How the runner's clients reach it: TLS material and the operator token.
    pub client: image_builder_proto::client::ClientOptions,
    /// The `image-builder` binary, for steps that run its CLI.
    pub cli_binary: PathBuf,
    /// `${…}` variables: `${registry}`, `${proxy}`, `${base.NAME}`, `${git.NAME}`.
    pub vars: Vars,
    /// The scenario's git repositories by name.
    pub repos: HashMap<String, GitRepo>,
    /// Where the service clones a repository from, when not from its path (builder pods
    /// clone over HTTP).
    pub remotes: HashMap<String, String>,
    /// `user:password` for reading pushed images back with skopeo, if the registry needs one.
    pub registry_creds: Option<String>,
    /// The installation's pull secret, when the scenario has one.
    pub pull_secret: Option<PullSecret>,
    /// The service process, when the runner controls it.
    pub service: Option<Box<dyn ServiceProcess>>,
    /// The fault proxy, when the scenario has one.
    pub faults: Option<Box<dyn FaultInjector>>,
    /// What must live as long as the scenario (registry, moto, temporary directories).
    pub keep: Vec<Box<dyn std::any::Any + Send>>,
}

/// Makes the environment a scenario names.
#[async_trait::async_trait]
pub trait Setup: Sync {
    /// The environment for `spec`, or why it cannot be made.
    async fn set_up(&self, spec: &model::Environment) -> Result<Environment, String>;
    /// Whether steps that control the service process (restart, kill, failpoints, the proxy)
    /// can run.
    fn controls_service(&self) -> bool;
}

/// A running installation: the service at `address`, base images pushed to `registry`.
#[derive(Debug, Clone)]
pub struct Target {
    /// The service's gRPC address, `host:port`.
    pub address: String,
    /// The registry (`host:port`, plain HTTP) base images are pushed to, if any.
    pub registry: Option<String>,
    /// The `image-builder` binary, for CLI steps.
    pub cli_binary: PathBuf,
    /// TLS material and the operator token for the runner's clients.
    pub client: image_builder_proto::client::ClientOptions,
}

#[async_trait::async_trait]
impl Setup for Target {
    async fn set_up(&self, spec: &model::Environment) -> Result<Environment, String> {
        let registry = self.registry.clone().unwrap_or_default();
        let creds = first_user(spec);
        let vars = vec![
            ("${registry}".to_owned(), registry.clone()),
            ("${proxy}".to_owned(), String::new()),
        ];
        let (vars, repos) = make_fixtures(spec, vars, &registry, &registry, creds.as_deref())?;
        let connector = self.client.connector().map_err(|e| e.to_string())?;
        Ok(Environment {
            grpc_url: connector.url(&self.address),
            client: self.client.clone(),
            cli_binary: self.cli_binary.clone(),
            vars,
            repos,
            remotes: HashMap::new(),
            registry_creds: creds,
            pull_secret: None,
            service: None,
            faults: None,
            keep: Vec::new(),
        })
    }

    fn controls_service(&self) -> bool {
        false
    }
}

/// `user:password` of the registry's first user, if it has users.
pub fn first_user(spec: &model::Environment) -> Option<String> {
    spec.registry_users
        .first()
        .map(|u| format!("{}:{}", u.user, u.password))
}

/// Pushes the environment's base images to `push_to` (as `creds`), names them `${base.NAME}`
/// as the service reaches them (at `reach_at`), and makes its git repositories
/// (`${git.NAME}`; their files may name the variables before them).
pub fn make_fixtures(
    spec: &model::Environment,
    mut vars: Vars,
    push_to: &str,
    reach_at: &str,
    creds: Option<&str>,
) -> Result<(Vars, HashMap<String, GitRepo>), String> {
    for image in &spec.base_images {
        if push_to.is_empty() {
            return Err("base images need a registry: pass --registry with --target".into());
        }
        let made = BaseImage::busybox(image.payload_mb << 20)
            .map_err(|e| format!("base image {}: {e}", image.name))?;
        fixtures::push_image_as(&made, push_to, &format!("base/{}:1", image.name), creds)
            .map_err(|e| format!("push base image {}: {e}", image.name))?;
        vars.push((
            format!("${{base.{}}}", image.name),
            format!("{reach_at}/base/{}:1", image.name),
        ));
    }
    let mut repos = HashMap::new();
    for repo_spec in &spec.git {
        let files: Vec<(String, String)> = repo_spec
            .files
            .iter()
            .map(|(path, content)| (path.clone(), expand(&vars, content)))
            .collect();
        let borrowed: Vec<(&str, &str)> = files
            .iter()
            .map(|(p, c)| (p.as_str(), c.as_str()))
            .collect();
        let repo = GitRepo::new(&borrowed)
            .map_err(|e| format!("git repository {}: {e}", repo_spec.name))?;
        vars.push((format!("${{git.{}}}", repo_spec.name), repo.uri()));
        repos.insert(repo_spec.name.clone(), repo);
    }
    Ok((vars, repos))
}

/// Writes a docker config file giving `user` on each of `hosts`.
pub fn write_pull_secret(
    path: &Path,
    hosts: &[&str],
    user: &model::UserSpec,
) -> Result<(), String> {
    use base64::Engine;
    let token = base64::engine::general_purpose::STANDARD
        .encode(format!("{}:{}", user.user, user.password));
    let auths: serde_json::Map<String, serde_json::Value> = hosts
        .iter()
        .filter(|h| !h.is_empty())
        .map(|h| ((*h).to_string(), serde_json::json!({ "auth": token })))
        .collect();
    std::fs::write(path, serde_json::json!({ "auths": auths }).to_string())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Replaces `${…}` variables.
pub fn expand(vars: &[(String, String)], text: &str) -> String {
    let mut out = text.to_owned();
    for (name, value) in vars {
        out = out.replace(name, value);
    }
    out
}
