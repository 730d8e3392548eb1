//! The pure core of image-builder: what a build is, the state machine it moves through, and the
//! durable journal that records every step of it.
//!
//! Nothing in this crate does network I/O or knows of gRPC, registries, git or builders. The
//! service (`src/`) drives builds; this crate decides which transitions are legal, folds journal
//! records into the current view of a build, and makes records durable before anyone hears of
//! them.

pub mod build;
pub mod inspect;
pub mod journal;
pub mod machine;
pub mod record;
pub mod store;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
pub mod view;

pub use build::{BuildId, BuildSource, BuildSpec, CloneTargetMode, DockerfileSource};
pub use journal::Journal;
pub use machine::{Event, Phase};
pub use record::{BuilderProgress, OperatorAction, OperatorRequest, Record};
pub use store::{SledStore, Store};
pub use view::BuildView;

/// The subdirectory of the service's `dataDir` that holds the store (the journal).
pub const STORE_DIR: &str = "store";

/// Milliseconds since the Unix epoch, the time unit of every journal record.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}
