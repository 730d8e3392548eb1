//! The observability peers, on loopback ports: Debian's Prometheus scraping a target, and
//! Jaeger v2 (built from its Go module by `scripts/peers/go-tools.sh`) receiving OTLP.
//! Both answer their HTTP query APIs; both stop when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use super::process::{free_port, spawn, wait_for_port};
use super::{Error, Result};

/// A process, killed when dropped.
struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Prometheus scraping one target every second.
pub struct Prometheus {
    _child: Peer,
    addr: String,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` (`host:port`, path `/metrics`).
    pub fn start(target: &str) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("prometheus-").tempdir()?;
        let addr = format!("127.0.0.1:{}", free_port()?);
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: image-builder\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )?;
        let mut command = Command::new("prometheus");
        command
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log"))?);
        let mut child = spawn(command)?;
        wait_for_port(&addr, "prometheus", &mut child)?;
        Ok(Self {
            _child: Peer(child),
            addr,
            dir,
        })
    }

    /// `http://127.0.0.1:PORT`, the HTTP API.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Prometheus's own log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }
}

/// Jaeger v2 with in-memory storage: OTLP/HTTP in, the query HTTP API out.
pub struct Jaeger {
    _child: Peer,
    otlp: String,
    query: String,
    dir: tempfile::TempDir,
}

impl Jaeger {
    /// The Jaeger binary the test command built (`IMAGE_BUILDER_JAEGER_BIN`).
    pub fn binary() -> Result<PathBuf> {
        std::env::var_os("IMAGE_BUILDER_JAEGER_BIN")
            .map(PathBuf::from)
            .ok_or_else(|| Error::Command {
                command: "jaeger".into(),
                detail: "IMAGE_BUILDER_JAEGER_BIN is not set: run the tests with scripts/test.sh, which builds Jaeger (scripts/peers/go-tools.sh)".into(),
            })
    }

    /// Starts Jaeger on free loopback ports and waits until its query API answers.
    pub fn start() -> Result<Self> {
        let binary = Self::binary()?;
        let dir = tempfile::Builder::new().prefix("jaeger-").tempdir()?;
        let otlp = format!("127.0.0.1:{}", free_port()?);
        let query = format!("127.0.0.1:{}", free_port()?);
        let query_grpc = format!("127.0.0.1:{}", free_port()?);
        let config = dir.path().join("jaeger.yaml");
        std::fs::write(
            &config,
            format!(
                r#"service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
extensions:
  jaeger_query:
    storage:
      traces: memory
    http:
      endpoint: "{query}"
    grpc:
      endpoint: "{query_grpc}"
  jaeger_storage:
    backends:
      memory:
        memory:
          max_traces: 10000
receivers:
  otlp:
    protocols:
      http:
        endpoint: "{otlp}"
processors:
  batch:
    timeout: 200ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memory
"#
            ),
        )?;
        let mut command = Command::new(binary);
        command
            .arg("--config")
            .arg(format!("file:{}", config.display()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("jaeger.log"))?);
        let mut child = spawn(command)?;
        wait_for_port(&otlp, "jaeger (OTLP)", &mut child)?;
        wait_for_port(&query, "jaeger (query)", &mut child)?;
        Ok(Self {
            _child: Peer(child),
            otlp,
            query,
            dir,
        })
    }

    /// `http://127.0.0.1:PORT`, where OTLP/HTTP is received.
    pub fn otlp_url(&self) -> String {
        format!("http://{}", self.otlp)
    }

    /// `http://127.0.0.1:PORT`, the query HTTP API (`/api/traces/{id}`).
    pub fn query_url(&self) -> String {
        format!("http://{}", self.query)
    }

    /// Jaeger's own log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("jaeger.log")).unwrap_or_default()
    }
}
