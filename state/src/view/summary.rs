//! What a listing shows of a build without folding its journal: [`Summary`], kept beside the
//! records, and the [`Damage`] the journal adds to it for a build it cannot give back whole.

use serde::{Deserialize, Serialize};

use crate::build::BuildId;
use crate::machine::Phase;

/// What is wrong with a damaged build (one the store can no longer give back whole), as kept
/// in the store beside its records; see `journal/damage.rs`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Damage {
    /// Records before this one can be read; the build is served up to here.
    pub readable_until: u64,
    /// What is wrong, for a person.
    pub reason: String,
    /// When it was found, ms since the epoch.
    pub found_at_ms: i64,
}

/// What listing a build needs, kept beside the journal for speed. Always derivable from the
/// records; `last_seq` says which records it reflects.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// The build.
    pub id: BuildId,
    /// The last record this summary reflects.
    pub last_seq: u64,
    /// The phase after that record.
    pub phase: Phase,
    /// The base image.
    pub base_ref: String,
    /// The workspace image.
    pub workspace_ref: String,
    /// Who asked.
    pub triggered_by: String,
    /// When the build was accepted.
    pub created_at_ms: i64,
    /// When it ended, if it has.
    pub finished_at_ms: Option<i64>,
    /// Why it failed or was cancelled.
    pub failure: Option<String>,
    /// The attempt running or last run.
    pub attempt: u32,
    /// Set when the build is damaged (never stored in the summary: the journal adds it).
    #[serde(skip)]
    pub damage: Option<Damage>,
}

impl Summary {
    /// What a listing says of the build: its phase, or `damaged`.
    pub fn state(&self) -> String {
        match self.damage {
            Some(_) => "damaged".to_owned(),
            None => self.phase.to_string(),
        }
    }
}
