//! Logs listeners, the CLI's `builds logs --follow`, and assertions on what they read.

use super::*;

impl Playback {
    /// Plays one of this module's steps.
    pub(super) async fn log_step(&mut self, step: &Step) -> Check {
        match step {
            Step::Listen { name, build, slow } => {
                let id = self.build_id(build).await?;
                let mut client = self.client().await?;
                let stream = client
                    .logs(pb::LogsRequest {
                        build_id: id,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| format!("Logs: {e}"))?
                    .into_inner();
                let listener = if *slow {
                    Listener {
                        build: build.clone(),
                        slow: Some(stream),
                        reader: None,
                    }
                } else {
                    Listener {
                        build: build.clone(),
                        slow: None,
                        reader: Some(tokio::spawn(drain(stream))),
                    }
                };
                self.listeners.insert(name.clone(), listener);
                Ok(())
            }
            Step::Detach { listener } => {
                let l = self
                    .listeners
                    .remove(listener)
                    .ok_or_else(|| format!("no listener named {listener:?}"))?;
                if let Some(reader) = l.reader {
                    reader.abort();
                }
                Ok(())
            }
            Step::ExpectLog {
                build,
                contains,
                not_contains,
                count,
                sequence,
            } => {
                let log = String::from_utf8_lossy(&self.full_log(build).await?).into_owned();
                for text in contains {
                    let text = expand(&self.env.vars, text);
                    ensure!(
                        log.contains(&text),
                        "{build}'s log lacks {text:?}; it ends:\n{}",
                        tail(&log)
                    );
                }
                for text in not_contains {
                    let text = expand(&self.env.vars, text);
                    ensure!(
                        !log.contains(&text),
                        "{build}'s log contains {text:?}; it ends:\n{}",
                        tail(&log)
                    );
                }
                for (text, n) in count {
                    let found = log.matches(text.as_str()).count();
                    ensure!(
                        found == *n,
                        "{build}'s log has {text:?} {found} times, expected {n}; it ends:\n{}",
                        tail(&log)
                    );
                }
                if let Some(seq) = sequence {
                    let mut got = log.lines().filter(|l| l.starts_with(&seq.prefix));
                    for i in 1..=seq.count + 1 {
                        let want = (i <= seq.count).then(|| format!("{}{i}", seq.prefix));
                        let line = got.next();
                        ensure!(
                            line == want.as_deref(),
                            "{build}'s {}N lines are not 1..{} once each in order: line {i} is {line:?}",
                            seq.prefix,
                            seq.count
                        );
                    }
                }
                Ok(())
            }
            Step::ExpectListeners { build } => {
                let full = self.full_log(build).await?;
                let names: Vec<String> = self
                    .listeners
                    .iter()
                    .filter(|(_, l)| &l.build == build)
                    .map(|(n, _)| n.clone())
                    .collect();
                ensure!(!names.is_empty(), "no listener of {build}");
                for name in names {
                    let l = self.listeners.remove(&name).ok_or("listener vanished")?;
                    let got = match (l.slow, l.reader) {
                        (Some(stream), _) => drain(stream).await,
                        (None, Some(reader)) => {
                            reader.await.map_err(|e| format!("listener {name}: {e}"))?
                        }
                        (None, None) => return Err(format!("listener {name} was detached")),
                    }
                    .map_err(|e| format!("listener {name}: {e}"))?;
                    ensure!(
                        got == full,
                        "listener {name} got {} bytes that differ from the {}-byte log",
                        got.len(),
                        full.len()
                    );
                }
                Ok(())
            }
            Step::FollowLogs { name, build } => {
                let id = self.build_id(build).await?;
                let child = tokio::process::Command::new(&self.env.cli_binary)
                    .args(["builds", "logs", "--follow", &id, "--address"])
                    .arg(&self.env.grpc_url)
                    .envs(self.env.client.env())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .kill_on_drop(true)
                    .spawn()
                    .map_err(|e| format!("cannot start builds logs --follow: {e}"))?;
                self.followers.insert(name.clone(), (build.clone(), child));
                Ok(())
            }
            Step::ExpectFollowed { follower } => {
                let (build, child) = self
                    .followers
                    .remove(follower)
                    .ok_or_else(|| format!("no follower named {follower:?}"))?;
                let out = tokio::time::timeout(Duration::from_secs(180), child.wait_with_output())
                    .await
                    .map_err(|_| format!("{follower} did not end within 180 s"))?
                    .map_err(|e| format!("{follower}: {e}"))?;
                ensure!(
                    out.status.success(),
                    "{follower} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let full = self.full_log(&build).await?;
                ensure!(
                    out.stdout == full,
                    "{follower} printed {} bytes that differ from the {}-byte log",
                    out.stdout.len(),
                    full.len()
                );
                Ok(())
            }
            other => Err(format!("{} is not played here", other.kind())),
        }
    }

    /// The last lines of every named build's log, for a failed scenario's report.
    pub(super) async fn build_log_tails(&self) -> String {
        let mut names: Vec<&String> = self.builds.keys().collect();
        names.sort();
        let mut out = String::new();
        for name in names {
            let Ok(id) = self.build_id(name).await else {
                continue;
            };
            let tail = (self.log_tail(&id).await).unwrap_or_else(|e| format!("(no log: {e})"));
            out.push_str(&format!("--- {name} ({id})\n{tail}\n"));
        }
        out
    }

    /// The last lines of a build's log: read through Logs as far as it gives within a moment
    /// (a build still running is not waited for), the last 4 KiB kept.
    async fn log_tail(&self, id: &str) -> Result<String, String> {
        const TAIL_BYTES: usize = 4096;
        const TAIL_LINES: usize = 15;
        let mut client = self.client().await?;
        let mut stream = client
            .logs(pb::LogsRequest {
                build_id: id.to_owned(),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("Logs: {e}"))?
            .into_inner();
        let mut tail = Vec::new();
        let wait = Duration::from_secs(2);
        while let Ok(Ok(Some(chunk))) = tokio::time::timeout(wait, stream.message()).await {
            tail.extend(chunk.content);
            let excess = tail.len().saturating_sub(TAIL_BYTES);
            tail.drain(..excess);
        }
        Ok(last_lines(&String::from_utf8_lossy(&tail), TAIL_LINES))
    }
}

pub(super) async fn drain(
    mut stream: tonic::Streaming<pb::LogsResponse>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut all = Vec::new();
    while let Some(chunk) = stream.message().await? {
        all.extend(chunk.content);
    }
    Ok(all)
}

/// The end of a log, for a failure's message: a log may be tens of megabytes.
fn tail(log: &str) -> &str {
    const SHOWN: usize = 4096;
    let mut start = log.len().saturating_sub(SHOWN);
    while !log.is_char_boundary(start) {
        start += 1;
    }
    &log[start..]
}
