//! The scenario file format (YAML). `scenarios/README.md` documents every field; this module
//! is its schema. Unknown fields are errors, so a typo never silently skips a check.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::fault::Fault;
pub use super::vocabulary::{CallName, CloneMode, CodeName, StateName, StatusName};

/// One scenario: the environment it needs and the steps to play.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// A short name.
    pub name: String,
    /// What risk the scenario covers.
    #[serde(default)]
    pub description: String,
    /// What to set up before the first step.
    #[serde(default)]
    pub environment: Environment,
    /// What to do and check, in order.
    pub steps: Vec<Step>,
}

/// Where the fault proxy sits.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProxyMode {
    /// No proxy: the service talks to the registry directly.
    #[default]
    None,
    /// Everything (base images and workspace repository) goes through the proxy.
    All,
    /// Base images go through the proxy, the workspace repository does not: the copy to the
    /// workspace repository then streams every blob through the proxy.
    Base,
}

/// The environment of a scenario.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Environment {
    /// Images pushed to the registry as `base/<name>:1`, referred to as `${base.<name>}`.
    #[serde(default)]
    pub base_images: Vec<BaseImageSpec>,
    /// Git repositories, referred to as `${git.<name>}`.
    #[serde(default)]
    pub git: Vec<GitSpec>,
    /// Where the fault proxy sits.
    #[serde(default)]
    pub proxy: ProxyMode,
    /// Service config keys set on top of the scenario's defaults.
    #[serde(default)]
    pub config: serde_json::Map<String, serde_json::Value>,
    /// `FAILPOINTS` for the service's first start.
    #[serde(default)]
    pub failpoints: String,
    /// Users the registry demands (htpasswd basic auth); base images are pushed as the first.
    #[serde(default)]
    pub registry_users: Vec<UserSpec>,
    /// The installation's credentials (`pullSecretFile`) for the scenario's registry.
    #[serde(default)]
    pub pull_secret: Option<UserSpec>,
    /// Make the registry an ECR registry: a moto server hands out the token the registry
    /// demands, the registry is reached under an ECR host name, and the service runs with
    /// `enableAdditionalECRAuth`.
    #[serde(default)]
    pub ecr: bool,
}

/// A user name and password.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserSpec {
    /// The user.
    pub user: String,
    /// The password.
    pub password: String,
}

/// A request's `BuildRegistryAuth`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSpec {
    /// `total.allow_all`.
    #[serde(default)]
    pub allow_all: bool,
    /// `selective.allow_baserep`.
    #[serde(default)]
    pub allow_baserep: bool,
    /// `selective.allow_workspacerep`.
    #[serde(default)]
    pub allow_workspacerep: bool,
    /// `selective.any_of` (`${…}` expanded).
    #[serde(default)]
    pub any_of: Vec<String>,
    /// `additional`: host to `user:password` (the runner encodes it).
    #[serde(default)]
    pub additional: BTreeMap<String, String>,
}

/// A base image to make and push.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseImageSpec {
    /// Its name.
    pub name: String,
    /// MiB of incompressible payload, to make copies take time.
    #[serde(default)]
    pub payload_mb: usize,
}

/// A git repository to make.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitSpec {
    /// Its name.
    pub name: String,
    /// Files of the first commit on `main` (path to content; `${…}` is expanded).
    pub files: BTreeMap<String, String>,
}

/// A Dockerfile source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerfileSpec {
    /// The repository's name in the environment.
    pub repo: String,
    /// `head`, `branch` or `commit`.
    #[serde(default)]
    pub mode: CloneMode,
    /// The branch or commit.
    #[serde(default)]
    pub target: String,
    /// The Dockerfile path.
    #[serde(default = "default_dockerfile")]
    pub path: String,
    /// The context path.
    #[serde(default = "default_context")]
    pub context: String,
    /// The Dockerfile version (part of the cache key).
    #[serde(default = "default_version")]
    pub version: String,
}

fn default_dockerfile() -> String {
    "Dockerfile".into()
}
fn default_context() -> String {
    ".".into()
}
fn default_version() -> String {
    "1".into()
}

/// A Build request.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildSpec {
    /// The name later steps use; with `count`, the group's name.
    #[serde(rename = "as")]
    pub name: String,
    /// An image reference source.
    #[serde(default, rename = "ref")]
    pub reference: Option<String>,
    /// A Dockerfile source.
    #[serde(default)]
    pub dockerfile: Option<DockerfileSpec>,
    /// Build even if the workspace image exists.
    #[serde(default)]
    pub force_rebuild: bool,
    /// Submit this many requests at once (names `<as>.0`, `<as>.1`, …).
    #[serde(default)]
    pub count: Option<usize>,
    /// With `count`: give each request its own Dockerfile version, so each is its own build.
    #[serde(default)]
    pub distinct: bool,
    /// The request's registry auth.
    #[serde(default)]
    pub auth: Option<AuthSpec>,
}

/// A step: an action or an assertion.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    /// Submit a Build (the stream is followed in the background).
    Build(BuildSpec),
    /// Wait until builds end; optionally assert their status.
    Wait {
        /// A build or group name.
        build: String,
        /// `done_success` or `done_failure`.
        #[serde(default)]
        status: Option<StatusName>,
        /// Seconds before giving up (default 180).
        #[serde(default)]
        timeout_s: Option<u64>,
    },
    /// Wait until a build's log contains a text.
    WaitLog {
        /// The build.
        build: String,
        /// The text.
        contains: String,
    },
    /// Attach a Logs listener.
    Listen {
        /// The listener's name.
        #[serde(rename = "as")]
        name: String,
        /// The build.
        build: String,
        /// Read nothing until detached or checked (a slow client).
        #[serde(default)]
        slow: bool,
    },
    /// Drop a listener's stream.
    Detach {
        /// The listener.
        listener: String,
    },
    /// Stop the service cleanly (SIGTERM) and start it again.
    Restart {
        /// `FAILPOINTS` for the new process.
        #[serde(default)]
        failpoints: String,
    },
    /// Kill the service with SIGKILL and start it again.
    Kill {
        /// `FAILPOINTS` for the new process.
        #[serde(default)]
        failpoints: String,
    },
    /// Add a fault rule to the proxy.
    Fault(Fault),
    /// Remove every fault rule.
    ClearFaults {},
    /// Wait until the service reaches a named failpoint (configured with `pause`).
    Advance {
        /// The failpoint, e.g. `transition.resolved.after`.
        point: String,
    },
    /// Assert a build's final status and message.
    ExpectStatus {
        /// The build.
        build: String,
        /// `done_success` or `done_failure`.
        status: StatusName,
        /// Text the final message contains.
        #[serde(default)]
        message_contains: Option<String>,
    },
    /// Assert a build's log.
    ExpectLog {
        /// The build.
        build: String,
        /// Texts the log contains.
        #[serde(default)]
        contains: Vec<String>,
        /// Texts the log does not contain.
        #[serde(default)]
        not_contains: Vec<String>,
        /// `(text, n)`: the text appears exactly n times.
        #[serde(default)]
        count: BTreeMap<String, usize>,
        /// Lines `<prefix>1` … `<prefix>N` each appear once and in order (no gap, no duplicate).
        #[serde(default)]
        sequence: Option<Sequence>,
    },
    /// Assert every listener of a build received the whole log, byte for byte.
    ExpectListeners {
        /// The build.
        build: String,
    },
    /// Assert the workspace image of a build exists, optionally with a file's content.
    ExpectImage {
        /// The build.
        build: String,
        /// A file in the image.
        #[serde(default)]
        file: Option<String>,
        /// The file's exact content.
        #[serde(default)]
        content: Option<String>,
    },
    /// Assert the builds of a group (or listed builds) share one build id.
    ExpectSameBuild {
        /// Build or group names.
        builds: Vec<String>,
    },
    /// Assert how many builds the service has (ListBuilds): builds actually executed.
    ExpectBuilds {
        /// The number.
        count: usize,
    },
    /// Assert no more than this many builds ran at once (read from the journal; the service
    /// is stopped for the read and started again).
    ExpectConcurrency {
        /// The limit.
        at_most: usize,
    },
    /// Assert the gRPC status code of a call.
    ExpectCall {
        /// `build`, `resolve_base_image`, `resolve_workspace_image` or `logs`.
        call: CallName,
        /// The image reference (build, resolves).
        #[serde(default, rename = "ref")]
        reference: Option<String>,
        /// A Dockerfile source (build, resolve_workspace_image).
        #[serde(default)]
        dockerfile: Option<DockerfileSpec>,
        /// The build id (logs).
        #[serde(default)]
        build_id: Option<String>,
        /// The expected code, e.g. `invalid_argument`, `not_found`, `ok`.
        code: CodeName,
    },
    /// Assert a metric's value.
    ExpectMetric {
        /// The series, e.g. `gitpod_image_builder_builds_done_total{success="true"}`.
        name: String,
        /// The value.
        value: f64,
    },
    /// Assert the proxy served at least this many faults.
    ExpectFaultsServed {
        /// The number.
        at_least: u64,
    },
    /// Assert the service's own log (stderr) contains a text.
    ExpectServiceLog {
        /// The text.
        contains: String,
    },
    /// Start `image-builder builds logs --follow` for a build, as an operator would.
    FollowLogs {
        /// The follower's name.
        #[serde(rename = "as")]
        name: String,
        /// The build.
        build: String,
    },
    /// Wait for a `follow_logs` command to end; assert it printed exactly the build's log.
    ExpectFollowed {
        /// The follower.
        follower: String,
    },
    /// Cancel a build through the ops API.
    Cancel {
        /// The build.
        build: String,
        /// Why.
        #[serde(default)]
        reason: String,
    },
    /// Retry a failed or cancelled build through the ops API; later `wait`s follow the new
    /// attempt.
    Retry {
        /// The build.
        build: String,
    },
    /// Assert a build's state and attempt through the ops API.
    ExpectState {
        /// The build.
        build: String,
        /// The state, e.g. `cancelled`.
        state: StateName,
        /// The attempt, if given.
        #[serde(default)]
        attempt: Option<u32>,
    },
    /// Rewrite the installation's credentials file (`pullSecretFile`) with this password.
    RotatePullSecret {
        /// The new password.
        password: String,
    },
    /// Assert none of these values is anywhere under the data dir, in the service's own log,
    /// in any build's log or in the metrics.
    ExpectNoLeak {
        /// The secret values.
        values: Vec<String>,
    },
}

/// Numbered lines expected once each, in order.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sequence {
    /// The line's prefix, e.g. `tick-`.
    pub prefix: String,
    /// The last number.
    pub count: usize,
}

impl Step {
    /// The step's kind, as written in the file.
    pub fn kind(&self) -> &'static str {
        match self {
            Step::Build(_) => "build",
            Step::Wait { .. } => "wait",
            Step::WaitLog { .. } => "wait_log",
            Step::Listen { .. } => "listen",
            Step::Detach { .. } => "detach",
            Step::Restart { .. } => "restart",
            Step::Kill { .. } => "kill",
            Step::Fault(_) => "fault",
            Step::ClearFaults {} => "clear_faults",
            Step::Advance { .. } => "advance",
            Step::ExpectStatus { .. } => "expect_status",
            Step::ExpectLog { .. } => "expect_log",
            Step::ExpectListeners { .. } => "expect_listeners",
            Step::ExpectImage { .. } => "expect_image",
            Step::ExpectSameBuild { .. } => "expect_same_build",
            Step::ExpectBuilds { .. } => "expect_builds",
            Step::ExpectConcurrency { .. } => "expect_concurrency",
            Step::ExpectCall { .. } => "expect_call",
            Step::ExpectMetric { .. } => "expect_metric",
            Step::ExpectFaultsServed { .. } => "expect_faults_served",
            Step::ExpectServiceLog { .. } => "expect_service_log",
            Step::RotatePullSecret { .. } => "rotate_pull_secret",
            Step::Cancel { .. } => "cancel",
            Step::FollowLogs { .. } => "follow_logs",
            Step::ExpectFollowed { .. } => "expect_followed",
            Step::Retry { .. } => "retry",
            Step::ExpectState { .. } => "expect_state",
            Step::ExpectNoLeak { .. } => "expect_no_leak",
        }
    }

    /// Whether the step needs to control the service process or the proxy (not possible
    /// against a `--target` service).
    pub fn needs_process_control(&self) -> bool {
        matches!(
            self,
            Step::Restart { .. }
                | Step::Kill { .. }
                | Step::Fault(_)
                | Step::ClearFaults {}
                | Step::Advance { .. }
                | Step::ExpectConcurrency { .. }
                | Step::ExpectFaultsServed { .. }
                | Step::ExpectServiceLog { .. }
                | Step::ExpectMetric { .. }
                | Step::RotatePullSecret { .. }
                | Step::ExpectNoLeak { .. }
        )
    }
}

/// Parses a scenario file's text.
pub fn parse(text: &str) -> Result<Scenario, String> {
    serde_saphyr::from_str(text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name: typed
environment:
  base_images: [{name: busybox}]
  git:
    - name: app
      files: {Dockerfile: "FROM ${base.busybox}\n"}
steps:
  - build: {as: b, dockerfile: {repo: app, mode: branch, target: main}}
  - wait: {build: b, status: done_success}
  - expect_call: {call: resolve_base_image, ref: "x", code: invalid_argument}
  - expect_state: {build: b, state: checking_cache}
"#;

    #[test]
    fn names_parse_into_their_types() {
        let scenario = parse(GOOD).unwrap();
        assert_eq!(scenario.steps.len(), 4);
        match &scenario.steps[0] {
            Step::Build(spec) => {
                assert_eq!(spec.dockerfile.as_ref().unwrap().mode, CloneMode::Branch);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            scenario.steps[1],
            Step::Wait {
                status: Some(StatusName::DoneSuccess),
                ..
            }
        ));
        assert!(matches!(
            scenario.steps[2],
            Step::ExpectCall {
                call: CallName::ResolveBaseImage,
                code: CodeName::InvalidArgument,
                ..
            }
        ));
        assert!(matches!(
            scenario.steps[3],
            Step::ExpectState {
                state: StateName::CheckingCache,
                ..
            }
        ));
    }

    #[test]
    fn a_misspelt_name_fails_at_parse_time_naming_the_line() {
        for (good, bad) in [
            ("status: done_success", "status: done_sucess"),
            ("code: invalid_argument", "code: invalid_argumnt"),
            ("call: resolve_base_image", "call: resolve_base"),
            ("state: checking_cache", "state: checking"),
            ("mode: branch", "mode: brnch"),
        ] {
            let text = GOOD.replace(good, bad);
            let line = text.lines().position(|l| l.contains(bad)).unwrap() + 1;
            let err = parse(&text).unwrap_err();
            let misspelt = bad.split(": ").nth(1).unwrap();
            assert!(err.contains(misspelt), "{bad}: {err}");
            assert!(err.contains(&format!("line {line}")), "{bad}: {err}");
        }
    }
}
