//! The scenario file format (YAML). `scenarios/README.md` documents every field; this module
//! is its schema. Unknown fields are errors, so a typo never silently skips a check.

use std::collections::BTreeMap;

use serde::Deserialize;

pub use super::vocabulary::{CallName, CloneMode, CodeName, StateName, StatusName};
pub use step::{Sequence, Step};

mod step;

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

/// Where the scenario's builds run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecutorKind {
    /// buildah on the service's machine.
    #[default]
    Local,
    /// Jobs in a Kubernetes cluster (self-hosted: the test kit's cluster; git repositories are
    /// served over HTTP so that builder pods can clone them).
    Kubernetes,
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
    /// Service config merged over the scenario's defaults (RFC 7386: a group it names
    /// keeps the keys it does not).
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
    /// Where builds run: `local` (the default) or `kubernetes`.
    #[serde(default)]
    pub executor: ExecutorKind,
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
pub struct BuildStepSpec {
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

    /// A renamed step keeps its old name readable: `advance` is `wait_for_point`.
    #[test]
    fn the_old_name_of_wait_for_point_still_reads() {
        for name in ["wait_for_point", "advance"] {
            let text = GOOD.replace(
                "  - wait: {build: b, status: done_success}",
                &format!("  - {name}: {{point: transition.resolved.after}}"),
            );
            let scenario = parse(&text).unwrap();
            assert!(
                matches!(&scenario.steps[1], Step::WaitForPoint { point } if point == "transition.resolved.after"),
                "{name}: {:?}",
                scenario.steps[1]
            );
        }
    }
}
