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
    #[allow(clippy::unwrap_used)]
    journal
        .create(id, spec(), "b".into(), "w".into())
        .await
        .unwrap();
    id
}
