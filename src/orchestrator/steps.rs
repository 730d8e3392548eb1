//! The four steps a build takes, as traits, so the orchestrator never touches a registry or a
//! builder itself. Every step must be safe to run twice: a crash can interrupt it anywhere and
//! a restart runs it again.

use async_trait::async_trait;
use image_builder_state::{BuildId, BuildView};

use super::log::BuildLog;
use crate::context::{self, GitCredentials};
use crate::credentials::{Keychain, RequestAuth};
use crate::executor::buildah;
use crate::registry::{self, Progress};

/// A step failed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The registry said no, or could not be reached.
    #[error(transparent)]
    Registry(#[from] registry::Error),
    /// The request asks for something this service does not do.
    #[error("{0}")]
    Unsupported(String),
    /// The build context could not be checked out.
    #[error(transparent)]
    Context(#[from] context::Error),
    /// The builder failed.
    #[error(transparent)]
    Builder(#[from] buildah::Error),
    /// The build needs credentials that were not kept (they never are, across a restart).
    #[error("{0}")]
    CredentialsLost(String),
}

/// What a build needs but the journal must never hold. In memory only: lost on restart.
#[derive(Debug, Clone, Default)]
pub struct BuildSecrets {
    /// Credentials for cloning the build context.
    pub git: Option<GitCredentials>,
    /// What the request allows of the installation's registry credentials, and its own.
    pub registry: RequestAuth,
    /// The user-info the request's git remote URL carried, for mk3's ref hash.
    pub remote_userinfo: Option<crate::context::UrlUserinfo>,
}

/// Finds the base image of a reference source.
#[async_trait]
pub trait Resolve: Send + Sync {
    /// Resolves `reference` to its pinned form, `registry/repository@sha256:…`, reporting
    /// retries to `progress`.
    async fn resolve(
        &self,
        reference: &str,
        keychain: &dyn Keychain,
        progress: &dyn Progress,
    ) -> Result<String, StepError>;
}

/// Looks images up in the registry (the cache check, and confirming a base image).
#[async_trait]
pub trait CheckCache: Send + Sync {
    /// The manifest digest of `reference`, or `None` when the registry does not have it,
    /// reporting retries to `progress`.
    async fn lookup(
        &self,
        reference: &str,
        keychain: &dyn Keychain,
        progress: &dyn Progress,
    ) -> Result<Option<String>, StepError>;
}

/// Makes the base image of a build exist.
#[async_trait]
pub trait BuildBase: Send + Sync {
    /// Builds and pushes `build.base_ref` (or confirms there is nothing to build), logging as
    /// it goes.
    async fn build(
        &self,
        build: &BuildView,
        secrets: &BuildSecrets,
        log: &BuildLog,
    ) -> Result<(), StepError>;

    /// Stops whatever an earlier run of this build left behind (a builder orphaned by a crash,
    /// a half-made work directory). Returns how many processes were stopped.
    async fn stop_leftovers(&self, id: BuildId) -> usize;

    /// Removes what a finished build leaves on this machine.
    async fn clean(&self, id: BuildId);
}

/// Puts the workspace image in place.
#[async_trait]
pub trait Push: Send + Sync {
    /// Copies `from` to `to` and returns the manifest digest `to` has afterwards.
    async fn push(
        &self,
        from: &str,
        to: &str,
        keychain: &dyn Keychain,
        log: &BuildLog,
    ) -> Result<String, StepError>;
}

/// The adapters a build is carried out with.
#[derive(Clone)]
pub struct Steps {
    /// Resolves reference sources.
    pub resolver: std::sync::Arc<dyn Resolve>,
    /// Looks images up.
    pub cache: std::sync::Arc<dyn CheckCache>,
    /// Builds base images.
    pub builder: std::sync::Arc<dyn BuildBase>,
    /// Copies base images to workspace refs.
    pub pusher: std::sync::Arc<dyn Push>,
}
