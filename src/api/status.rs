//! The one place errors become gRPC status codes, with mk3's codes where mk3 had them, and
//! the one place a status is made: every handler builds its refusals with [`refuse`] (or
//! `Status::from` an error), so no message exceeds [`MAX_MESSAGE_BYTES`] whatever it quotes.
//! Nothing maps to `Unknown`.

use tonic::{Code, Status};

use crate::orchestrator;
use crate::steps::StepErrorKind;

impl From<orchestrator::Error> for Status {
    fn from(err: orchestrator::Error) -> Self {
        let code = match &err {
            orchestrator::Error::InvalidRequest(_) => Code::InvalidArgument,
            orchestrator::Error::NotFound(_) => Code::NotFound,
            orchestrator::Error::Step(e) => step_code(e.kind()),
            orchestrator::Error::Journal(image_builder_state::journal::Error::NotFound(_)) => {
                Code::NotFound
            }
            orchestrator::Error::Journal(image_builder_state::journal::Error::Illegal {
                ..
            }) => Code::FailedPrecondition,
            orchestrator::Error::Journal(image_builder_state::journal::Error::Damaged {
                ..
            }) => Code::DataLoss,
            orchestrator::Error::Journal(e) if e.is_disk_full() => Code::ResourceExhausted,
            orchestrator::Error::Journal(_) => Code::Internal,
            orchestrator::Error::JoinFailed => Code::Aborted,
            orchestrator::Error::Conflict(_) => Code::FailedPrecondition,
            orchestrator::Error::ShuttingDown => Code::Unavailable,
        };
        if code == Code::Internal {
            tracing::error!(error = %err, "request failed on an internal error");
        }
        refuse(code, err.to_string())
    }
}

/// A status with `code` and `message` cut to [`MAX_MESSAGE_BYTES`]: how every handler refuses
/// a call. Client input quoted in `message` goes through [`echo`](super::convert::echo) first.
pub fn refuse(code: Code, message: impl Into<String>) -> Status {
    Status::new(code, bounded_message(message.into()))
}

/// Longest status message sent: whatever an error quotes, a default client's metadata limit
/// is never at risk.
const MAX_MESSAGE_BYTES: usize = 1024;

/// `message`, cut at [`MAX_MESSAGE_BYTES`] (on a character boundary) with its full length said.
fn bounded_message(mut message: String) -> String {
    if message.len() > MAX_MESSAGE_BYTES {
        let total = message.len();
        let mut cut = MAX_MESSAGE_BYTES;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push_str(&format!("… ({total} bytes)"));
    }
    message
}

/// mk3's codes for the failures of a step.
fn step_code(kind: StepErrorKind) -> Code {
    match kind {
        StepErrorKind::Invalid => Code::InvalidArgument,
        StepErrorKind::Missing => Code::NotFound,
        StepErrorKind::Unauthenticated => Code::Unauthenticated,
        StepErrorKind::Denied => Code::PermissionDenied,
        StepErrorKind::Unavailable => Code::Unavailable,
        StepErrorKind::Failed => Code::FailedPrecondition,
        StepErrorKind::Cancelled => Code::Cancelled,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry;

    #[test]
    fn registry_faults_get_mk3_codes() {
        let cases = [
            (
                registry::Error::NotFound { what: "x".into() },
                Code::NotFound,
            ),
            (
                registry::Error::Unauthorized {
                    registry: "r".into(),
                    what: "x".into(),
                },
                Code::Unauthenticated,
            ),
            (
                registry::Error::RateLimited {
                    registry: "r".into(),
                    what: "x".into(),
                },
                Code::Unavailable,
            ),
            (
                registry::Error::BadReference {
                    reference: "::".into(),
                    detail: "d".into(),
                },
                Code::InvalidArgument,
            ),
        ];
        for (err, code) in cases {
            let status = Status::from(orchestrator::Error::Step(err.into()));
            assert_eq!(status.code(), code);
            assert!(!status.message().is_empty());
        }
    }

    #[test]
    fn a_refusal_is_cut_at_the_bound_on_a_character_boundary_and_says_how_long_it_was() {
        let long = "é".repeat(MAX_MESSAGE_BYTES);
        let status = refuse(Code::InvalidArgument, long.clone());
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().len() <= MAX_MESSAGE_BYTES + 32);
        assert!(
            status
                .message()
                .ends_with(&format!("({} bytes)", long.len()))
        );
        let short = refuse(Code::NotFound, "no build 1");
        assert_eq!(short.message(), "no build 1");
    }
}
