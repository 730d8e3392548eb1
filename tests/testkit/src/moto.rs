//! A moto server on loopback: a local AWS endpoint with ECR's GetAuthorizationToken, whose
//! token is `AWS:<account>-auth-token`.

use std::process::{Child, Command, Stdio};

use super::Result;
use super::process::{free_port, spawn, wait_for_port};

/// moto's default account, the one its tokens name.
pub const MOTO_ACCOUNT: &str = "123456789012";

/// A running moto server; stopped when dropped.
pub struct MotoServer {
    child: Child,
    port: u16,
}

impl MotoServer {
    /// Starts `python3 -m moto.server` on a free loopback port.
    pub fn start() -> Result<Self> {
        let port = free_port()?;
        let mut command = Command::new("python3");
        command
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = spawn(command)?;
        wait_for_port(&format!("127.0.0.1:{port}"), "moto server", &mut child)?;
        Ok(Self { child, port })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The password of the ECR token moto hands out (user `AWS`).
    pub fn token_password() -> String {
        format!("{MOTO_ACCOUNT}-auth-token")
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Makes `name` resolve to 127.0.0.1 through `/etc/hosts` (ECR hosts must look like ECR
/// hosts for the service to treat them as such). Needs root; idempotent.
pub fn alias_loopback(name: &str) -> Result<()> {
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    if hosts
        .lines()
        .any(|l| l.split_whitespace().skip(1).any(|n| n == name))
    {
        return Ok(());
    }
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open("/etc/hosts")?;
    writeln!(file, "127.0.0.1 {name}")?;
    Ok(())
}
