//! Real parts to run the service against, for the integration tests, the benchmarks and the
//! demo: Debian's `docker-registry` on loopback, small base images made with umoci and pushed
//! with skopeo, git repositories as build contexts, and the service binary as a child process. The service never uses this module.
//!
//! Child processes are started from one long-lived thread with `PR_SET_PDEATHSIG`, so they die
//! with the process that started them, even when it is killed.
// A test rig: a broken environment is a failed test, so it may panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fault_proxy;
mod git;
mod git_http;
mod image;
mod moto;
mod process;
mod registry;
mod service;
mod token_server;

pub use fault_proxy::{Fault, FaultKind, FaultProxy};
pub use git::GitRepo;
pub use git_http::GitHttpServer;
pub use image::{
    BaseImage, push_image, push_image_as, read_file_from_image, read_file_from_image_as,
    skopeo_inspect, skopeo_inspect_as,
};
pub use moto::{MOTO_ACCOUNT, MotoServer, alias_loopback};
pub use process::free_port;
pub use registry::LocalRegistry;
pub use service::{Service, read_logs};
pub use token_server::{TOKEN_ISSUER, TOKEN_SERVICE, TokenServer};

/// A testkit operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command could not be started or failed.
    #[error("{command}: {detail}")]
    Command {
        /// The command line.
        command: String,
        /// What happened.
        detail: String,
    },
    /// File system or socket trouble.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Something did not become ready in time.
    #[error("{0}")]
    Timeout(String),
}

/// Every file under `dir` (recursively) whose bytes contain `needle`: for scans that prove a
/// secret is not at rest.
pub fn files_containing(dir: &std::path::Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file()
                && std::fs::read(&path).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
            {
                found.push(path);
            }
        }
    }
    found
}

/// Results of the testkit.
pub type Result<T, E = Error> = std::result::Result<T, E>;
