//! The label sets of the service's metrics, and the bound on label values that come from
//! clients.

use std::collections::HashSet;

use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;

/// Distinct values one client-driven label takes at most before `other`.
pub const MAX_LABEL_VALUES: usize = 64;

/// The `state` label: a build state (`resolving`, `building`, ...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// The state, as the ops API names it.
    pub state: String,
}

/// The labels of registry requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegistryLabels {
    /// The registry host (or `other`).
    pub host: String,
    /// `ok`, `transient_error` (retried if the budget allows) or `error`.
    pub outcome: String,
    /// "true" when the request repeated a failed one.
    pub retry: String,
}

/// The labels of handled gRPC calls.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcLabels {
    /// `builder.ImageBuilder`, ... (or `other`).
    pub grpc_service: String,
    /// The method (or `other`).
    pub grpc_method: String,
    /// The status code's name (`OK`, `NotFound`, ...).
    pub grpc_code: String,
}

/// The labels of gRPC call durations.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcMethodLabels {
    /// As in [`GrpcLabels`].
    pub grpc_service: String,
    /// As in [`GrpcLabels`].
    pub grpc_method: String,
}

/// Values of one label, admitted until there are [`MAX_LABEL_VALUES`] of them.
#[derive(Default)]
pub(super) struct Bounded(Mutex<HashSet<String>>);

impl Bounded {
    /// `value` while fewer than [`MAX_LABEL_VALUES`] values were seen (or it is one of them),
    /// else `other`.
    pub(super) fn admit(&self, value: &str) -> String {
        let mut seen = self.0.lock();
        if seen.contains(value) {
            return value.to_owned();
        }
        if seen.len() < MAX_LABEL_VALUES && value.len() <= 128 {
            seen.insert(value.to_owned());
            return value.to_owned();
        }
        "other".to_owned()
    }
}

/// The `success` label of finished builds.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DoneLabels {
    /// "true" or "false", as mk3 writes it.
    pub success: String,
}
