//! What the API reads about builds: views, summaries, followers and readers, damage.

use super::*;

impl Orchestrator {
    /// The newest build of a workspace ref.
    pub fn find_by_ref(&self, workspace_ref: &str) -> Result<BuildId, Error> {
        self.inner
            .journal
            .summaries()?
            .into_iter()
            .find(|s| s.workspace_ref == workspace_ref)
            .map(|s| s.id)
            .ok_or_else(|| Error::NotFound(format!("no build of workspace image {workspace_ref}")))
    }

    /// Every build, newest first.
    pub fn list(&self) -> Result<Vec<Summary>, Error> {
        Ok(self.inner.journal.summaries()?)
    }

    /// Follows a build's durable records from `from_seq` until it ends.
    pub fn follow(&self, id: BuildId, from_seq: u64) -> Follower {
        self.inner.journal.follow(id, from_seq)
    }

    /// Reads a build's durable journal, log bytes included, from record `from_seq` and log
    /// byte `from_byte`, until it ends.
    pub fn read(&self, id: BuildId, from_seq: u64, from_byte: u64) -> Reader {
        self.inner.journal.read(id, from_seq, from_byte)
    }

    /// Fails with NotFound unless the build exists; reads no record (cheap before a stream
    /// that reads them all anyway).
    pub fn ensure_exists(&self, id: BuildId) -> Result<(), Error> {
        if self.inner.journal.exists(id)? {
            Ok(())
        } else {
            Err(Error::NotFound(format!("build {id} does not exist")))
        }
    }

    /// What is wrong with a build, if its journal is damaged.
    pub fn damage(&self, id: BuildId) -> Option<image_builder_state::view::Damage> {
        self.inner.journal.damage(id)
    }

    /// What can still be read of a damaged build.
    pub fn readable_view(&self, id: BuildId) -> Option<BuildView> {
        self.inner.journal.readable_view(id)
    }

    /// How many builds are damaged.
    pub fn damaged_count(&self) -> usize {
        self.inner.journal.damaged().len()
    }

    /// The durable view of a build.
    pub fn view(&self, id: BuildId) -> Result<BuildView, Error> {
        self.inner
            .journal
            .view(id)?
            .ok_or_else(|| Error::NotFound(format!("build {id} does not exist")))
    }
}
