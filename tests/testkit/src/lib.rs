//! The test kit of image-builder: the real parts the service is run against in tests,
//! benchmarks, the demo and self-hosted scenarios. Debian's `docker-registry` on loopback
//! (htpasswd or token auth), a fault-injecting proxy, moto for ECR, a git HTTP server, and the
//! service binary as a child process, and a real single-node Kubernetes (`cluster`). Never linked into the product: the service's own crate
//! does not depend on this one (`scripts/test.sh` checks it).
//!
//! Child processes are started from one long-lived thread with `PR_SET_PDEATHSIG`, so they die
//! with the process that started them, even when it is killed.

// A test rig: a broken environment is a failed test, so it may panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod bench;
pub mod cluster;
pub mod demo;
mod fault_proxy;
mod git_http;
mod moto;
mod observability;
pub mod pki;
mod process;
mod registry;
pub mod self_hosted;
mod service;
mod token_server;

pub use fault_proxy::{Event, Fault, FaultKind, FaultProxy};
pub use git_http::GitHttpServer;
pub use image_builder_scenario::fixtures::{
    BaseImage, Error, GitRepo, Ownership, Result, UnpackedImage, files_containing, push_image,
    push_image_as, read_file_from_image, read_file_from_image_as, skopeo_inspect,
    skopeo_inspect_as,
};
pub use moto::{MOTO_ACCOUNT, MotoServer, alias_loopback};
pub use observability::{Jaeger, Prometheus};
pub use process::free_port;
pub use registry::LocalRegistry;
pub use self_hosted::SelfHosted;
pub use service::{Service, random_hex, read_logs};
pub use token_server::{TOKEN_ISSUER, TOKEN_SERVICE, TokenServer};
