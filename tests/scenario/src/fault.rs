//! Faults a scenario injects between the service and its registry (played by the test kit's
//! fault proxy).

use serde::Deserialize;

/// What a matching request gets instead of (or on top of) the registry's answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum FaultKind {
    /// An HTTP error status (e.g. 500, 502, 503, 429), optionally with `Retry-After` seconds.
    Status {
        /// The status code.
        code: u16,
        /// `Retry-After` in seconds, if any.
        #[serde(default)]
        retry_after: Option<u64>,
    },
    /// Forward, but cut the connection after this many bytes of the response body.
    ResetMidBody {
        /// Bytes sent before the reset.
        after_bytes: u64,
    },
    /// Forward after a delay.
    Latency {
        /// The delay in milliseconds.
        ms: u64,
    },
    /// Never answer.
    Stall,
}

/// A fault rule: which requests, what happens, how many times.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// Requests whose path contains this (empty: every request).
    #[serde(default, rename = "match")]
    pub path_contains: String,
    /// Only this HTTP method (any when absent).
    #[serde(default)]
    pub method: Option<String>,
    /// What happens.
    pub kind: FaultKind,
    /// How many matching requests get the fault (every one when absent).
    #[serde(default)]
    pub times: Option<u32>,
}
