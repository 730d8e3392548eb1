//! The boundary between the orchestrator and the adapters that carry a build out.
//!
//! The orchestrator sequences four steps (resolve, check the cache, build the base image,
//! push the workspace image) and knows them only through these traits. An adapter (the
//! registry, an executor) implements them, writes through a [`StepLog`], and reports
//! failure as a classified [`StepError`]. Nothing here imports the orchestrator or an
//! adapter: every arrow points into this module.
//!
//! Every step must be safe to run twice: a crash can interrupt it anywhere and a restart runs
//! it again.

mod error;
mod lane;
mod log;

use std::sync::Arc;

use async_trait::async_trait;
use image_builder_state::{BuildId, BuildView, DockerfileSource};

pub use error::{Class, StepError, StepErrorKind};
pub use lane::{CallerId, Lane};
pub use log::{Progress, StepLog, StepOutput, Tail, Untracked};

use crate::credentials::{BuildSecrets, GitCredentials, Keychain};

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
        log: &dyn StepLog,
    ) -> Result<(), StepError>;

    /// Readies a build whose step runs again after a restart: stops what the previous run
    /// left behind that cannot be taken over (a local builder orphaned by the crash, a
    /// half-made work directory) and keeps what can (a builder Job, which the step attaches
    /// to). Returns how many builders were stopped.
    async fn before_resume(&self, id: BuildId) -> usize;

    /// Stops everything the build runs, wherever it runs (a cancel). Returns how many
    /// builders were stopped.
    async fn stop(&self, id: BuildId) -> usize;

    /// Removes what a build that ended leaves behind (work directories, builder Jobs and
    /// their Secrets).
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
        progress: &dyn Progress,
    ) -> Result<String, StepError>;
}

/// What a Dockerfile source holds right now, named by git's own hashes: the content a build
/// of it would see (`builds.baseImageKey: content`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceContent {
    /// The commit the source's target names now.
    pub commit: String,
    /// The Dockerfile's blob id (a hash of its bytes).
    pub dockerfile: String,
    /// The context directory's tree id (a hash of every file under it, names and modes).
    pub context: String,
}

/// Reads the content of Dockerfile sources without checking them out.
#[async_trait]
pub trait ReadSource: Send + Sync {
    /// The content `source` names now, fetched with `credentials` (a caller waits on it).
    async fn content(
        &self,
        source: &DockerfileSource,
        credentials: Option<&GitCredentials>,
    ) -> Result<SourceContent, StepError>;
}

/// The adapters a build is carried out with.
#[derive(Clone)]
pub struct Steps {
    /// Resolves reference sources.
    pub resolver: Arc<dyn Resolve>,
    /// Looks images up.
    pub cache: Arc<dyn CheckCache>,
    /// Builds base images.
    pub builder: Arc<dyn BuildBase>,
    /// Copies base images to workspace refs.
    pub pusher: Arc<dyn Push>,
    /// Reads Dockerfile sources for content keys; `None` keys them as mk3 does.
    pub content: Option<Arc<dyn ReadSource>>,
}
