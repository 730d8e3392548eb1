//! Starting child processes that cannot outlive us, and running commands to completion.

use parking_lot::Mutex;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::{OnceLock, mpsc};

use super::{Error, Result};
use image_builder_scenario::fixtures::describe;

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, so children are
/// forked by one thread that lives as long as the process.
fn keeper() -> &'static Mutex<mpsc::Sender<SpawnRequest>> {
    static KEEPER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("testkit-keeper".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
                    unsafe {
                        command.pre_exec(|| {
                            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                            Ok(())
                        });
                    }
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("spawn the testkit keeper thread");
        Mutex::new(tx)
    })
}

/// Spawns `command` as a child that is killed when this process dies.
pub(crate) fn spawn(command: Command) -> Result<Child> {
    let line = describe(&command);
    let (reply, answer) = mpsc::channel();
    keeper()
        .lock()
        .send((command, reply))
        .map_err(|_| Error::Command {
            command: line.clone(),
            detail: "the keeper thread is gone".into(),
        })?;
    answer
        .recv()
        .map_err(|_| Error::Command {
            command: line.clone(),
            detail: "the keeper thread is gone".into(),
        })?
        .map_err(|e| Error::Command {
            command: line,
            detail: e.to_string(),
        })
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits until something listens on `addr`.
pub(crate) fn wait_for_port(addr: &str, what: &str, child: &mut Child) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Error::Command {
                command: what.into(),
                detail: format!("exited with {status} before listening on {addr}"),
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Err(Error::Timeout(format!(
        "{what} did not listen on {addr} within 30 s"
    )))
}
