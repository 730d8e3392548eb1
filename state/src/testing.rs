//! Helpers for the tests and benchmarks of this crate and of the service; compiled only for
//! tests or with the `test-util` feature, never into the product.

use crate::build::{BuildId, BuildSource, BuildSpec};
use crate::journal::Journal;

/// A build of the image reference `alpine`, triggered by `test`.
pub fn spec() -> BuildSpec {
    BuildSpec {
        source: BuildSource::Reference {
            reference: "alpine".into(),
        },
        force_rebuild: false,
        triggered_by: "test".into(),
        supervisor_ref: String::new(),
        had_request_auth: false,
    }
}

/// Creates a build of [`spec`] in `journal` (base ref `b`, workspace ref `w`); panics if the
/// journal refuses, as a test should.
pub async fn new_build(journal: &Journal) -> BuildId {
    let id = BuildId::new();
    create_build(journal, id).await;
    id
}

/// Creates build `id` of [`spec`] in `journal` (base ref `b`, workspace ref `w`); panics if
/// the journal refuses, as a test should.
pub async fn create_build(journal: &Journal, id: BuildId) {
    #[allow(clippy::unwrap_used)]
    journal
        .create(id, spec(), "b".into(), "w".into())
        .await
        .unwrap();
}

/// Runs `open` until the store's lock is free, for at most two seconds: sled's I/O threads
/// can hold its files for a moment after the last handle is dropped, so a test that reopens a
/// store in the same process may find it still locked.
pub fn when_unlocked<T, E: std::fmt::Display>(mut open: impl FnMut() -> Result<T, E>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match open() {
            Ok(opened) => return opened,
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            #[allow(clippy::panic)]
            Err(e) => panic!("cannot open the store: {e}"),
        }
    }
}

/// Copies a folder as a crash at this moment would leave it (nothing is flushed first).
#[allow(clippy::unwrap_used)]
pub fn crash_copy(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            crash_copy(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
