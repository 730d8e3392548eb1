//! The closed sets of names a scenario file uses (statuses, gRPC codes, calls, build states,
//! clone modes), as serde enums: a misspelt name fails when the file is parsed, naming the
//! field, not when its step runs.

use serde::Deserialize;

/// A Build stream's status (`wait`, `expect_status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StatusName {
    /// `unknown`.
    Unknown,
    /// `running`.
    Running,
    /// `done_success`.
    DoneSuccess,
    /// `done_failure`.
    DoneFailure,
}

/// A gRPC status code (`expect_call`), in the numeric order of the gRPC specification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)] // each is the code of the same name
pub enum CodeName {
    Ok,
    Cancelled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
}

impl CodeName {
    /// The gRPC code.
    pub fn code(self) -> tonic::Code {
        tonic::Code::from(self as i32)
    }
}

/// A call `expect_call` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallName {
    /// `Build`, read to its end.
    Build,
    /// `ResolveBaseImage`.
    ResolveBaseImage,
    /// `ResolveWorkspaceImage`.
    ResolveWorkspaceImage,
    /// `Logs`, read to its end.
    Logs,
}

/// A build's state as the ops API names it (`expect_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)] // each is the state of the same name
pub enum StateName {
    Queued,
    Resolving,
    CheckingCache,
    Building,
    Pushing,
    Done,
    Failed,
    Cancelled,
    Damaged,
}

impl StateName {
    /// The name as the ops API sends it.
    pub fn as_str(self) -> &'static str {
        match self {
            StateName::Queued => "queued",
            StateName::Resolving => "resolving",
            StateName::CheckingCache => "checking_cache",
            StateName::Building => "building",
            StateName::Pushing => "pushing",
            StateName::Done => "done",
            StateName::Failed => "failed",
            StateName::Cancelled => "cancelled",
            StateName::Damaged => "damaged",
        }
    }
}

/// How a Dockerfile source's repository is checked out (`dockerfile.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloneMode {
    /// The remote's HEAD.
    #[default]
    Head,
    /// A branch (`target`).
    Branch,
    /// A commit (`target`).
    Commit,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_map_to_the_grpc_codes_of_the_same_name() {
        let all: Vec<CodeName> = serde_json::from_str(
            r#"["ok","cancelled","unknown","invalid_argument","deadline_exceeded","not_found",
                "already_exists","permission_denied","resource_exhausted","failed_precondition",
                "aborted","out_of_range","unimplemented","internal","unavailable","data_loss",
                "unauthenticated"]"#,
        )
        .unwrap();
        let codes: Vec<tonic::Code> = all.iter().map(|c| c.code()).collect();
        assert_eq!(codes.len(), 17);
        assert_eq!(codes[3], tonic::Code::InvalidArgument);
        assert_eq!(codes[5], tonic::Code::NotFound);
        assert_eq!(codes[15], tonic::Code::DataLoss);
        assert_eq!(codes[16], tonic::Code::Unauthenticated);
        for (code, name) in codes.iter().zip(&all) {
            let spelled = format!("{code:?}");
            assert_eq!(spelled, format!("{name:?}"), "{name:?} maps to {code:?}");
        }
    }

    #[test]
    fn state_names_are_the_ops_apis() {
        for phase in image_builder_state::Phase::ALL {
            let name: StateName =
                serde_json::from_value(serde_json::json!(phase.as_str())).unwrap();
            assert_eq!(name.as_str(), phase.as_str());
        }
    }
}
