//! Executors make base images (the `BuildBase` step). `local` builds with buildah on the
//! service's own machine (the embedded default); `kubernetes` runs each build attempt as a
//! Job in a cluster. Reference sources need no build.

pub mod buildah;
pub mod kubernetes;
mod local;

pub use local::LocalExecutor;
