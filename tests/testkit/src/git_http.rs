//! A private git remote over HTTP with basic auth (git http-backend behind a small Python
//! server), for tests of git credentials.

use std::process::{Child, Command, Stdio};

use super::Result;
use super::process::{free_port, spawn, wait_for_port};
use image_builder_scenario::fixtures::GitRepo;
use image_builder_scenario::fixtures::run;

const SERVER: &str = include_str!("git_http_server.py");

/// Serves a bare copy of a repository at `http://HOST:PORT/repo.git`, HOST loopback or the
/// test cluster's pod gateway.
pub struct GitHttpServer {
    child: Child,
    host: &'static str,
    port: u16,
    _dir: tempfile::TempDir,
}

impl GitHttpServer {
    /// Serves `repo` to anyone, on loopback.
    pub fn start_public(repo: &GitRepo) -> Result<Self> {
        Self::serve(repo, "", "127.0.0.1")
    }

    /// Serves `repo` on loopback to clients that authenticate as `user` / `password`.
    pub fn start(repo: &GitRepo, user: &str, password: &str) -> Result<Self> {
        Self::serve(repo, &format!("{user}:{password}"), "127.0.0.1")
    }

    /// Serves `repo` where the test cluster's pods reach it (its
    /// [`POD_GATEWAY`](crate::cluster::POD_GATEWAY)), to anyone or to `user` / `password`.
    pub fn start_for_pods(repo: &GitRepo, credentials: Option<(&str, &str)>) -> Result<Self> {
        let auth = credentials
            .map(|(u, p)| format!("{u}:{p}"))
            .unwrap_or_default();
        Self::serve(repo, &auth, crate::cluster::POD_GATEWAY)
    }

    fn serve(repo: &GitRepo, auth: &str, host: &'static str) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("git-http-").tempdir()?;
        let bare = dir.path().join("repo.git");
        run(
            "git",
            &[
                "clone",
                "--quiet",
                "--bare",
                repo.path().to_str().unwrap_or_default(),
                bare.to_str().unwrap_or_default(),
            ],
        )?;
        let script = dir.path().join("server.py");
        std::fs::write(&script, SERVER)?;
        let port = free_port()?;
        let mut command = Command::new("python3");
        command
            .arg(&script)
            .arg(dir.path())
            .arg(port.to_string())
            .arg(host)
            .env("GIT_HTTP_AUTH", auth)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = spawn(command)?;
        wait_for_port(&format!("{host}:{port}"), "git http server", &mut child)?;
        Ok(Self {
            child,
            host,
            port,
            _dir: dir,
        })
    }

    /// The clone URL.
    pub fn uri(&self) -> String {
        format!("http://{}:{}/repo.git", self.host, self.port)
    }
}

impl Drop for GitHttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
