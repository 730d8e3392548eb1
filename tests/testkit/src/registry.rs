//! Debian's `docker-registry` (the CNCF distribution registry) on a loopback port, or on the
//! test cluster's pod gateway for builds that run in pods.

use std::process::{Child, Command, Stdio};

use super::Result;
use super::process::{free_port, spawn, wait_for_port};

/// A registry serving plain HTTP on 127.0.0.1 (or the pod gateway), storing into a temporary
/// directory. Stopped when dropped.
pub struct LocalRegistry {
    child: Child,
    addr: String,
    dir: tempfile::TempDir,
}

impl LocalRegistry {
    /// Starts a registry open to everyone and waits until it listens.
    pub fn start() -> Result<Self> {
        Self::launch(&[])
    }

    /// Starts a registry that demands HTTP basic auth (htpasswd, bcrypt) from these users.
    pub fn start_with_users(users: &[(&str, &str)]) -> Result<Self> {
        Self::launch(users)
    }

    /// Starts a registry that demands bearer tokens from `tokens` (the distribution spec's
    /// token auth).
    pub fn start_with_token_auth(tokens: &super::TokenServer) -> Result<Self> {
        Self::launch_with(&[], Some(tokens), "127.0.0.1")
    }

    /// Starts a registry where the test cluster's pods reach it (its
    /// [`POD_GATEWAY`](crate::cluster::POD_GATEWAY)), demanding basic auth from `users` if
    /// there are any.
    pub fn start_for_pods(users: &[(&str, &str)]) -> Result<Self> {
        Self::launch_with(users, None, crate::cluster::POD_GATEWAY)
    }

    fn launch(users: &[(&str, &str)]) -> Result<Self> {
        Self::launch_with(users, None, "127.0.0.1")
    }

    fn launch_with(
        users: &[(&str, &str)],
        tokens: Option<&super::TokenServer>,
        host: &str,
    ) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("registry-").tempdir()?;
        let addr = format!("{host}:{}", free_port()?);
        let config = dir.path().join("config.yml");
        let mut text = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            dir.path().join("data").display()
        );
        if !users.is_empty() {
            let mut lines = String::new();
            for (user, password) in users {
                let hash = bcrypt::hash(password, 5).map_err(|e| super::Error::Command {
                    command: "bcrypt".into(),
                    detail: e.to_string(),
                })?;
                lines.push_str(&format!("{user}:{hash}\n"));
            }
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(&htpasswd, lines)?;
            text.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: image-builder-tests\n    path: {}\n",
                htpasswd.display()
            ));
        }
        if let Some(tokens) = tokens {
            let bundle = dir.path().join("token-bundle.pem");
            std::fs::write(&bundle, tokens.bundle_pem())?;
            text.push_str(&format!(
                "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                tokens.realm(),
                super::TOKEN_SERVICE,
                super::TOKEN_ISSUER,
                bundle.display()
            ));
        }
        std::fs::write(&config, text)?;
        let mut command = Command::new("docker-registry");
        command
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("registry.log"))?);
        let mut child = spawn(command)?;
        wait_for_port(&addr, "docker-registry", &mut child)?;
        Ok(Self { child, addr, dir })
    }

    /// `HOST:PORT`.
    /// The registry's process id (to read its CPU time, for one).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `host:port` of the registry.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Where the registry keeps its blobs and its log.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
