//! What can go wrong talking to a registry, sorted by what the caller should do about it.

use oci_client::errors::{OciDistributionError, OciErrorCode};

/// A registry operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The reference is not a valid image reference.
    #[error("{reference:?} is not a valid image reference: {detail}")]
    BadReference {
        /// What was given.
        reference: String,
        /// Why it does not parse.
        detail: String,
    },
    /// The image, manifest or blob does not exist.
    #[error("{what} was not found in the registry")]
    NotFound {
        /// What was looked for.
        what: String,
    },
    /// The registry wants credentials we do not have, or rejected the ones we sent.
    #[error("registry {registry} refused the request as unauthorized while accessing {what}")]
    Unauthorized {
        /// The registry host.
        registry: String,
        /// What was accessed.
        what: String,
    },
    /// The credentials were accepted but do not allow this.
    #[error("registry {registry} denied access to {what}")]
    Denied {
        /// The registry host.
        registry: String,
        /// What was accessed.
        what: String,
    },
    /// The registry asked us to slow down (HTTP 429).
    #[error("registry {registry} is rate limiting requests (HTTP 429) while accessing {what}")]
    RateLimited {
        /// The registry host.
        registry: String,
        /// What was accessed.
        what: String,
    },
    /// Transient faults went on past the retry budget.
    #[error("gave up after {attempts} attempts within the registry retry budget of {} (registry.retryBudget); last fault: {last}", humantime_serde::re::humantime::format_duration(*budget))]
    RetriesExhausted {
        /// Attempts made.
        attempts: u32,
        /// The budget.
        budget: std::time::Duration,
        /// The last fault.
        last: Box<Error>,
    },
    /// A transient fault: 5xx, connection refused or reset, timeout.
    #[error("registry {registry} is unavailable while accessing {what}: {detail}")]
    Unavailable {
        /// The registry host.
        registry: String,
        /// What was accessed.
        what: String,
        /// The fault.
        detail: String,
    },
    /// The registry answered something we cannot use (invalid manifest, unsupported media type).
    #[error("registry {registry} returned an unusable answer for {what}: {detail}")]
    Invalid {
        /// The registry host.
        registry: String,
        /// What was accessed.
        what: String,
        /// What is wrong.
        detail: String,
    },
}

impl Error {
    /// True for faults that may pass if the request is made again later.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::RateLimited { .. } | Error::Unavailable { .. })
    }

    /// The fault behind a [`Error::RetriesExhausted`], or the error itself.
    pub fn root(&self) -> &Error {
        match self {
            Error::RetriesExhausted { last, .. } => last.root(),
            other => other,
        }
    }

    /// Sorts an oci-client error by what it means for the caller.
    pub(crate) fn classify(registry: &str, what: &str, err: OciDistributionError) -> Self {
        let registry = registry.to_owned();
        let what = what.to_owned();
        match err {
            OciDistributionError::UnauthorizedError { .. }
            | OciDistributionError::AuthenticationFailure(_) => {
                Error::Unauthorized { registry, what }
            }
            OciDistributionError::ImageManifestNotFoundError(_) => Error::NotFound { what },
            OciDistributionError::RegistryError { envelope, .. } => {
                let code = envelope.errors.first().map(|e| &e.code);
                match code {
                    Some(
                        OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::BlobUnknown
                        | OciErrorCode::NotFound,
                    ) => Error::NotFound { what },
                    Some(OciErrorCode::Unauthorized) => Error::Unauthorized { registry, what },
                    Some(OciErrorCode::Denied) => Error::Denied { registry, what },
                    Some(OciErrorCode::Toomanyrequests) => Error::RateLimited { registry, what },
                    _ => Error::Invalid {
                        registry,
                        what,
                        detail: envelope.to_string(),
                    },
                }
            }
            OciDistributionError::ServerError { code, message, .. } => match code {
                401 => Error::Unauthorized { registry, what },
                403 => Error::Denied { registry, what },
                404 => Error::NotFound { what },
                429 => Error::RateLimited { registry, what },
                500..=599 | 408 => Error::Unavailable {
                    registry,
                    what,
                    detail: format!("HTTP {code} {}", message.trim()),
                },
                _ => Error::Invalid {
                    registry,
                    what,
                    detail: format!("HTTP {code} {}", message.trim()),
                },
            },
            OciDistributionError::RequestError(e) => {
                if e.status().is_some_and(|s| s.as_u16() == 404) {
                    return Error::NotFound { what };
                }
                if e.status().is_some_and(|s| s.as_u16() == 429) {
                    return Error::RateLimited { registry, what };
                }
                Error::Unavailable {
                    registry,
                    what,
                    detail: transport_detail(&e),
                }
            }
            OciDistributionError::IoError(e) => Error::Unavailable {
                registry,
                what,
                detail: e.to_string(),
            },
            other => Error::Invalid {
                registry,
                what,
                detail: other.to_string(),
            },
        }
    }
}

/// reqwest's top-level message hides the cause ("error sending request"); name the root.
fn transport_detail(e: &reqwest::Error) -> String {
    let mut detail = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        detail = format!("{detail}: {s}");
        source = s.source();
    }
    detail
}
