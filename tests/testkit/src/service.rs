//! The `image-builder` binary as a child process: started with a config, killed, restarted.

use parking_lot::Mutex;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use tonic::transport::Channel;

use super::process::spawn;
use super::{Error, Result};
use image_builder::proto::builder::image_builder_client::ImageBuilderClient;

/// A running (or stopped) service process with its config and data directory.
pub struct Service {
    binary: PathBuf,
    dir: tempfile::TempDir,
    child: Option<Child>,
    grpc_address: String,
    metrics_address: String,
    log: Arc<Mutex<String>>,
    env: Vec<(String, String)>,
}

impl Service {
    /// Writes `config` (a JSON object; `dataDir`, `grpcAddress` and `metricsAddress` default to
    /// a temp dir and free ports) and starts `binary run --config` with it.
    pub fn start(binary: &Path, config: serde_json::Value) -> Result<Self> {
        let mut service = Self::start_stopped(binary, config)?;
        service.launch()?;
        Ok(service)
    }

    fn start_stopped(binary: &Path, mut config: serde_json::Value) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("image-builder-")
            .tempdir()?;
        if let Some(map) = config.as_object_mut() {
            map.entry("dataDir")
                .or_insert_with(|| dir.path().join("data").display().to_string().into());
            map.entry("grpcAddress")
                .or_insert_with(|| "127.0.0.1:0".into());
            map.entry("metricsAddress")
                .or_insert_with(|| "127.0.0.1:0".into());
            // The ops API needs an operator: the test kit's clients hold this token.
            let access = map.entry("access").or_insert_with(|| serde_json::json!({}));
            if let Some(access) = access.as_object_mut()
                && !access.contains_key("operatorTokenFile")
                && !access.contains_key("operators")
            {
                let path = dir.path().join("operator-token");
                std::fs::write(&path, random_hex()?)?;
                access.insert(
                    "operatorTokenFile".into(),
                    path.display().to_string().into(),
                );
            }
        }
        std::fs::write(dir.path().join("config.json"), config.to_string())?;
        Ok(Self {
            binary: binary.to_owned(),
            dir,
            child: None,
            grpc_address: String::new(),
            metrics_address: String::new(),
            log: Arc::new(Mutex::new(String::new())),
            env: Vec::new(),
        })
    }

    fn launch(&mut self) -> Result<()> {
        let mut command = Command::new(&self.binary);
        command
            .arg("run")
            .arg("--config")
            .arg(self.config_path())
            // The start is detected from an info line, whatever RUST_LOG the caller runs with.
            .env(
                "RUST_LOG",
                std::env::var("IMAGE_BUILDER_SERVICE_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env_remove("IMAGE_BUILDER_LOG_FORMAT")
            .env_remove("FAILPOINTS")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = spawn(command)?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| Error::Timeout("no stderr".into()))?;
        let (ready, announced) = mpsc::channel();
        let log = Arc::clone(&self.log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr)
                .lines()
                .map_while(std::result::Result::ok)
            {
                if line.contains("image-builder serving") {
                    let _ = ready.send(line.clone());
                }
                let mut log = log.lock();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let line = announced
            .recv_timeout(Duration::from_secs(60))
            .map_err(|_| {
                let _ = child.kill();
                Error::Timeout(format!(
                    "image-builder did not start within 60 s; its output:\n{}",
                    self.log()
                ))
            })?;
        self.grpc_address = field(&line, "grpc_address").unwrap_or_default();
        self.metrics_address = field(&line, "metrics_address").unwrap_or_default();
        self.child = Some(child);
        Ok(())
    }

    /// The config file the service runs with.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.json")
    }

    /// The service's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `HOST:PORT` of the gRPC API.
    pub fn grpc_address(&self) -> &str {
        &self.grpc_address
    }

    /// `http://HOST:PORT` of the gRPC API.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc_address)
    }

    /// `http://HOST:PORT/metrics`.
    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.metrics_address)
    }

    /// The operator token file the service runs with, if it has one.
    pub fn operator_token_file(&self) -> Option<PathBuf> {
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.config_path()).ok()?).ok()?;
        config["access"]["operatorTokenFile"]
            .as_str()
            .map(PathBuf::from)
    }

    /// How the product's own clients (CLI, scenario runner) reach this service: with its
    /// operator token.
    pub fn client_options(&self) -> image_builder::client::ClientOptions {
        image_builder::client::ClientOptions {
            token_file: self.operator_token_file(),
            ..Default::default()
        }
    }

    /// A connected ops client, with the operator token.
    pub async fn ops(&self) -> Result<image_builder::client::OpsClient> {
        let connector = self
            .client_options()
            .connector()
            .map_err(|e| Error::Command {
                command: "read the operator token".into(),
                detail: e.to_string(),
            })?;
        connector
            .ops(&self.grpc_url())
            .await
            .map_err(|e| Error::Command {
                command: format!("connect {}", self.grpc_url()),
                detail: e.to_string(),
            })
    }

    /// A connected mk3 client.
    pub async fn client(&self) -> Result<ImageBuilderClient<Channel>> {
        ImageBuilderClient::connect(self.grpc_url())
            .await
            .map_err(|e| Error::Command {
                command: format!("connect {}", self.grpc_url()),
                detail: e.to_string(),
            })
    }

    /// Everything the service wrote to stderr, across restarts.
    pub fn log(&self) -> String {
        self.log.lock().clone()
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: no chance to flush or drain.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for a clean exit (SIGKILL after 30 s).
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait().ok()
    }

    /// SIGKILLs the service (see [`Service::kill`]) and starts it again on the same config
    /// and data directory (new ports): a crash and a restart, never a clean stop.
    pub fn kill_and_restart(&mut self) -> Result<()> {
        self.kill();
        self.launch()
    }

    /// Sets the environment of the next (re)start, e.g. `FAILPOINTS`; the previous one is
    /// dropped.
    pub fn set_env(&mut self, env: &[(&str, &str)]) {
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    /// Starts the service with `env` set for the first start only (see [`Service::set_env`]).
    pub fn start_with_env(
        binary: &Path,
        config: serde_json::Value,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let mut service = Self::start_stopped(binary, config)?;
        service.set_env(env);
        service.launch()?;
        Ok(service)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The value of `name=value` in a tracing fmt line.
fn field(line: &str, name: &str) -> Option<String> {
    let line = strip_ansi(line);
    let start = line.find(&format!("{name}="))? + name.len() + 1;
    let value: String = line[start..]
        .chars()
        .take_while(|c| !c.is_whitespace())
        .collect();
    Some(value)
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Everything one Logs call streams, until the build ends.
pub async fn read_logs(
    client: &mut ImageBuilderClient<Channel>,
    request: impl tonic::IntoRequest<image_builder::proto::builder::LogsRequest>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut stream = client.logs(request).await?.into_inner();
    let mut log = Vec::new();
    while let Some(chunk) = stream.message().await? {
        log.extend_from_slice(&chunk.content);
    }
    Ok(log)
}

/// 32 hex digits from the kernel's random source (tokens, trace ids).
pub fn random_hex() -> Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
