//! Child processes of a build (git, buildah): their output goes into the build log as it is
//! produced, read in large pieces, and they are marked so that they can be found and stopped, whether
//! the step is dropped (timeout, cancel, shutdown) or the service crashed and restarted.

use std::collections::{HashMap, HashSet};
use std::process::{ExitStatus, Stdio};

use image_builder_state::BuildId;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tracing::Instrument;

use crate::steps::{StepLog, StepOutput, Tail};

/// Environment variable every build process carries, naming its build.
pub const BUILD_ID_ENV: &str = "IMAGE_BUILDER_BUILD_ID";

/// How much one read of a pipe takes.
const READ_BYTES: usize = 64 * 1024;

/// How a process ended, with its last output lines for the error message.
#[derive(Debug)]
pub struct Finished {
    /// The exit status.
    pub status: ExitStatus,
    /// The last lines it printed (stdout and stderr together, redacted).
    pub tail: Vec<String>,
}

/// Kills a build's processes when dropped, unless the process ended on its own.
struct StopOnDrop {
    id: BuildId,
    armed: bool,
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let stopped = stop_build_processes(self.id);
            tracing::info!(build_id = %self.id, stopped, "stopped the build's processes");
        }
    }
}

/// Runs `cmd` for build `id`, passing its output to `log` as fast as it comes (the log
/// journals it in chunks, redacted, without making the process wait on the disk).
pub async fn run_logged(cmd: Command, id: BuildId, log: &dyn StepLog) -> std::io::Result<Finished> {
    // A span per builder process (program name only: arguments may name secret files).
    let program = program_name(cmd.as_std());
    let span = tracing::info_span!(
        "process",
        otel.name = %format!("process {program}"),
        process.program = %program,
        process.exit_code = tracing::field::Empty,
    );
    let finished = run_in_group(cmd, id, log).instrument(span.clone()).await;
    if let Ok(finished) = &finished
        && let Some(code) = finished.status.code()
    {
        span.record("process.exit_code", code);
    }
    finished
}

/// The name of the program `cmd` runs: for a wrapper such as `unshare … -- buildah …`, the
/// program after `--`.
fn program_name(cmd: &std::process::Command) -> String {
    let wrapped = cmd
        .get_args()
        .skip_while(|a| *a != "--")
        .nth(1)
        .filter(|_| cmd.get_program() == "unshare");
    std::path::Path::new(wrapped.unwrap_or(cmd.get_program()))
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

async fn run_in_group(
    mut cmd: Command,
    id: BuildId,
    log: &dyn StepLog,
) -> std::io::Result<Finished> {
    cmd.env(BUILD_ID_ENV, id.to_string())
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    let mut guard = StopOnDrop { id, armed: true };
    let tail = Tail::default();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    tokio::join!(
        pump(stdout, log.output(tail.clone())),
        pump(stderr, log.output(tail.clone()))
    );
    let status = child.wait().await?;
    guard.armed = false;
    Ok(Finished {
        status,
        tail: tail.lines(),
    })
}

/// Copies one pipe into the log until it ends (or fails: the process's status tells).
async fn pump(pipe: Option<impl AsyncRead + Unpin>, mut output: Box<dyn StepOutput>) {
    if let Some(mut pipe) = pipe {
        let mut buf = vec![0u8; READ_BYTES];
        loop {
            match pipe.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => output.write(&buf[..n]).await,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read a build process's output");
                    break;
                }
            }
        }
    }
    output.finish().await;
}

/// Runs a short command whose output is not a build's (stdin closed, killed if dropped) and
/// waits for its output.
pub async fn output(mut cmd: Command) -> std::io::Result<std::process::Output> {
    cmd.stdin(Stdio::null()).kill_on_drop(true).output().await
}

/// What a failed command said last: stderr's last non-empty line that names none of `noise`,
/// at most 512 characters (a command may echo a long listing).
pub fn complaint(stderr: &[u8], noise: &[&str]) -> String {
    String::from_utf8_lossy(stderr)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty() && !noise.iter().any(|n| l.contains(n)))
        .unwrap_or_default()
        .chars()
        .take(512)
        .collect()
}

/// Finds every process of build `id` (those carrying its marker, and all their descendants)
/// and kills it. Returns how many were signalled. Used after a crash, when the builder of a
/// resumed build may still be running, orphaned.
pub fn stop_build_processes(id: BuildId) -> usize {
    let marker = format!("{BUILD_ID_ENV}={id}");
    let mut parents: HashMap<i32, Vec<i32>> = HashMap::new();
    let mut marked = Vec::new();
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Some(ppid) = parent_of(pid) {
            parents.entry(ppid).or_default().push(pid);
        }
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if environ
            .split(|b| *b == 0)
            .any(|var| var == marker.as_bytes())
        {
            marked.push(pid);
        }
    }
    let mut doomed = HashSet::new();
    let mut stack = marked;
    while let Some(pid) = stack.pop() {
        if doomed.insert(pid) {
            stack.extend(parents.get(&pid).into_iter().flatten());
        }
    }
    for &pid in &doomed {
        // SAFETY: kill(2) with a pid we just found; at worst the process is already gone.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    doomed.len()
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(1)?.parse().ok()
}
