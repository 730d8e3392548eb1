//! The steps of a scenario: actions and assertions, one variant each.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{BuildStepSpec, CallName, CodeName, DockerfileSpec, StateName, StatusName};
use crate::Fault;

/// A step: an action or an assertion.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    /// Submit a Build (the stream is followed in the background).
    Build(BuildStepSpec),
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
    /// Wait until the service reaches a named failpoint (configured with `pause`). Spelt
    /// `advance` before (still read).
    #[serde(alias = "advance")]
    WaitForPoint {
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
    /// Assert a build's workspace image ends in a layer of its own (`differs_from`) or in the
    /// same layer as another build's (`same_as`). Each image is read by the digest its build
    /// journaled, so a tag pushed over since does not matter.
    ExpectTopLayer {
        /// The build.
        build: String,
        /// A build whose image's top layer must differ.
        #[serde(default)]
        differs_from: Option<String>,
        /// A build whose image's top layer must be the same.
        #[serde(default)]
        same_as: Option<String>,
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
    /// Assert no more than this many builds ran at once, and at least `at_least` at some
    /// moment (read from the journal's admission and end times of finished builds; the
    /// service is stopped for the read and started again). Fails when no build finished.
    ExpectConcurrency {
        /// The limit.
        at_most: usize,
        /// Builds that must have run side by side at some moment, so that the limit was
        /// exercised. Default: 1.
        #[serde(default)]
        at_least: Option<usize>,
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
    /// Commit changed files to one of the scenario's git repositories.
    Commit {
        /// The repository's name in the environment.
        repo: String,
        /// Path → new content (`${…}` variables expanded).
        files: std::collections::BTreeMap<String, String>,
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
            Step::WaitForPoint { .. } => "wait_for_point",
            Step::ExpectStatus { .. } => "expect_status",
            Step::ExpectLog { .. } => "expect_log",
            Step::ExpectListeners { .. } => "expect_listeners",
            Step::ExpectImage { .. } => "expect_image",
            Step::ExpectTopLayer { .. } => "expect_top_layer",
            Step::ExpectSameBuild { .. } => "expect_same_build",
            Step::ExpectBuilds { .. } => "expect_builds",
            Step::ExpectConcurrency { .. } => "expect_concurrency",
            Step::ExpectCall { .. } => "expect_call",
            Step::ExpectMetric { .. } => "expect_metric",
            Step::ExpectFaultsServed { .. } => "expect_faults_served",
            Step::ExpectServiceLog { .. } => "expect_service_log",
            Step::RotatePullSecret { .. } => "rotate_pull_secret",
            Step::Commit { .. } => "commit",
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
                | Step::WaitForPoint { .. }
                | Step::ExpectConcurrency { .. }
                | Step::ExpectFaultsServed { .. }
                | Step::ExpectServiceLog { .. }
                | Step::ExpectMetric { .. }
                | Step::RotatePullSecret { .. }
                | Step::ExpectNoLeak { .. }
        )
    }
}
