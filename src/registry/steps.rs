//! The registry as the orchestrator's resolve, cache-check and push steps.

use async_trait::async_trait;

use super::Registry;
use super::{Keychain, Progress};
use crate::orchestrator::{BuildLog, CheckCache, Push, Resolve, StepError};

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
        log: &BuildLog,
    ) -> Result<String, StepError> {
        Ok(self.copy(from, to, keychain, log).await?)
    }
}
