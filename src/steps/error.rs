//! How a step failed, classified so that the orchestrator and the API edge can act on it
//! without knowing which adapter failed or how.

/// What kind of failure a step met. Each kind belongs to one [`Class`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepErrorKind {
    /// A peer was unreachable, busy or rate limiting, past the step's retries: the same
    /// request may succeed later.
    Unavailable,
    /// The request names something malformed or unsupported (a bad reference, a context
    /// path outside the repository).
    Invalid,
    /// What the request names does not exist (an image, a Dockerfile in the repository).
    Missing,
    /// The step ran and failed (the builder's exit status, an answer that breaks the
    /// protocol, a local file that cannot be written).
    Failed,
    /// A peer wants credentials the build does not have: none were given, or they were lost
    /// in a restart of the service (they are never kept).
    Unauthenticated,
    /// A peer refused the credentials the build has.
    Denied,
    /// The step was stopped from outside before it could finish.
    Cancelled,
}

/// The coarse class of a failure: what trying again could change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Trying again later may succeed unchanged.
    Transient,
    /// Trying again fails the same way until the request or its inputs change.
    Permanent,
    /// Trying again needs other credentials (or the same ones submitted again).
    NeedsCredentials,
    /// Nothing failed: the step was stopped.
    Cancelled,
}

impl StepErrorKind {
    /// The class this kind belongs to.
    pub fn class(self) -> Class {
        match self {
            Self::Unavailable => Class::Transient,
            Self::Invalid | Self::Missing | Self::Failed => Class::Permanent,
            Self::Unauthenticated | Self::Denied => Class::NeedsCredentials,
            Self::Cancelled => Class::Cancelled,
        }
    }
}

/// A step failed. The message is for people (it ends up in the build's failure reason or a
/// gRPC status) and never holds a credential; the source, when there is one, is the
/// adapter's own error.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct StepError {
    kind: StepErrorKind,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl StepError {
    /// A failure of `kind` described by `message`.
    pub fn new(kind: StepErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// An adapter's own error, classified as `kind`; its display is the message.
    pub fn from_source(
        kind: StepErrorKind,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            kind,
            message: source.to_string(),
            source: Some(Box::new(source)),
        }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> StepErrorKind {
        self.kind
    }

    /// What trying again could change.
    pub fn class(&self) -> Class {
        self.kind.class()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_the_class_its_retry_needs() {
        use StepErrorKind as K;
        let expected = [
            (K::Unavailable, Class::Transient),
            (K::Invalid, Class::Permanent),
            (K::Missing, Class::Permanent),
            (K::Failed, Class::Permanent),
            (K::Unauthenticated, Class::NeedsCredentials),
            (K::Denied, Class::NeedsCredentials),
            (K::Cancelled, Class::Cancelled),
        ];
        for (kind, class) in expected {
            let err = StepError::new(kind, "m");
            assert_eq!((err.kind(), err.class()), (kind, class));
        }
    }

    #[test]
    fn an_adapter_error_keeps_its_message_and_source() {
        let io = std::io::Error::other("disk on fire");
        let err = StepError::from_source(StepErrorKind::Failed, io);
        assert_eq!(err.to_string(), "disk on fire");
        assert!(std::error::Error::source(&err).is_some());
    }
}
