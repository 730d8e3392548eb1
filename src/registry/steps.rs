//! The registry as the orchestrator's resolve, cache-check and push steps, and how its
//! faults are classified for them.

use async_trait::async_trait;

use super::{Error, Keychain, Registry};
use crate::steps::{CheckCache, Progress, Push, Resolve, StepError, StepErrorKind};

impl From<Error> for StepError {
    fn from(err: Error) -> Self {
        // Only transient faults are retried, so what exhausted the retries was transient.
        let kind = match err.root() {
            Error::BadReference { .. } => StepErrorKind::Invalid,
            Error::NotFound { .. } => StepErrorKind::Missing,
            Error::Unauthorized { .. } => StepErrorKind::Unauthenticated,
            Error::Denied { .. } => StepErrorKind::Denied,
            Error::RateLimited { .. }
            | Error::Unavailable { .. }
            | Error::RetriesExhausted { .. } => StepErrorKind::Unavailable,
            Error::Invalid { .. } => StepErrorKind::Failed,
        };
        StepError::from_source(kind, err)
    }
}

#[async_trait]
impl Resolve for Registry {
    async fn resolve(
        &self,
        reference: &str,
        keychain: &dyn Keychain,
        progress: &dyn Progress,
    ) -> Result<String, StepError> {
        Ok(Registry::resolve(self, reference, keychain, progress).await?)
    }
}

#[async_trait]
impl CheckCache for Registry {
    async fn lookup(
        &self,
        reference: &str,
        keychain: &dyn Keychain,
        progress: &dyn Progress,
    ) -> Result<Option<String>, StepError> {
        Ok(Registry::lookup(self, reference, keychain, progress).await?)
    }
}

#[async_trait]
impl Push for Registry {
    async fn push(
        &self,
        from: &str,
        to: &str,
        keychain: &dyn Keychain,
        progress: &dyn Progress,
    ) -> Result<String, StepError> {
        Ok(self.copy(from, to, keychain, progress).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steps::Class;

    fn kind_of(err: Error) -> (StepErrorKind, Class) {
        let step = StepError::from(err);
        (step.kind(), step.class())
    }

    #[test]
    fn registry_faults_are_classified_by_what_retrying_could_change() {
        let registry = || "r.example".to_owned();
        let what = || "manifest x".to_owned();
        let cases = [
            (
                Error::RateLimited {
                    registry: registry(),
                    what: what(),
                },
                StepErrorKind::Unavailable,
            ),
            (
                Error::RetriesExhausted {
                    attempts: 3,
                    budget: std::time::Duration::from_secs(1),
                    last: Box::new(Error::Unavailable {
                        registry: registry(),
                        what: what(),
                        detail: "503".into(),
                    }),
                },
                StepErrorKind::Unavailable,
            ),
            (Error::NotFound { what: what() }, StepErrorKind::Missing),
            (
                Error::BadReference {
                    reference: "::".into(),
                    detail: "d".into(),
                },
                StepErrorKind::Invalid,
            ),
            (
                Error::Unauthorized {
                    registry: registry(),
                    what: what(),
                },
                StepErrorKind::Unauthenticated,
            ),
            (
                Error::Denied {
                    registry: registry(),
                    what: what(),
                },
                StepErrorKind::Denied,
            ),
            (
                Error::Invalid {
                    registry: registry(),
                    what: what(),
                    detail: "not json".into(),
                },
                StepErrorKind::Failed,
            ),
        ];
        for (err, kind) in cases {
            let transient = err.is_transient() || matches!(err, Error::RetriesExhausted { .. });
            let message = err.to_string();
            let (got, class) = kind_of(err);
            assert_eq!(got, kind, "{message}");
            assert_eq!(
                class == Class::Transient,
                transient,
                "the step's class agrees with the registry's own retry rule: {message}"
            );
        }
    }
}
