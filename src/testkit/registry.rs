//! Debian's `docker-registry` (the CNCF distribution registry) on a loopback port.

use std::process::{Child, Command, Stdio};

use super::Result;
use super::process::{free_port, spawn, wait_for_port};

/// A registry serving plain HTTP on 127.0.0.1, storing into a temporary directory. Stopped
/// when dropped.
pub struct LocalRegistry {
    child: Child,
    addr: String,
    dir: tempfile::TempDir,
}

impl LocalRegistry {
    /// Starts a registry and waits until it listens.
    pub fn start() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("registry-").tempdir()?;
        let addr = format!("127.0.0.1:{}", free_port()?);
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                dir.path().join("data").display()
            ),
        )?;
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

    /// `127.0.0.1:PORT`.
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
