//! Following one builder Job: the state of its pod and of the Job come from kube-runtime
//! watchers (no polling); the pod's output comes from `pods/log` with `follow`, and goes into
//! the build log from where the journal says the log stands.
//!
//! Kubernetes cannot start a log at a byte offset (`sinceTime` has a resolution of a second
//! and `limitBytes` counts from the start), so a resumed follower reads the output from its
//! start and skips the bytes the journal already holds: a restart costs one re-read of the
//! output, and the log gets no gap and no duplicate.

use futures::{AsyncReadExt, Stream, StreamExt};
use image_builder_state::BuilderProgress;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod};
use kube::Api;
use kube::api::LogParams;
use kube::runtime::{WatchStreamExt, watcher};

use super::manifest::{CONTAINER, REGISTRY_CONTAINER};
use crate::steps::{StepError, StepErrorKind, StepLog, Tail};

/// How long one read of the builder's output may take.
const READ_BYTES: usize = 64 * 1024;

/// How long a failed Job's pod is waited for to report its builder's exit code.
const EXIT_REPORT_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// What the watchers saw.
enum Seen {
    Pod(Box<watcher::Event<Pod>>),
    Job(Box<watcher::Event<Job>>),
}

/// The pod and Job of one attempt, as the watchers last reported them.
pub(super) struct JobWatch {
    events: std::pin::Pin<Box<dyn Stream<Item = Seen> + Send>>,
    name: String,
    pod: Option<Pod>,
    /// The pod the output was read from: if it goes away, the attempt failed.
    followed: Option<String>,
    followed_gone: bool,
    job: Option<Job>,
    /// How long a failed Job's pod is waited for to report its builder's exit code.
    exit_wait: std::time::Duration,
}

/// How a builder Job ended.
pub(super) enum Ended {
    /// Its builder pushed the image.
    Succeeded,
    /// It failed, for this reason.
    Failed(String),
}

impl JobWatch {
    /// Starts watching Job `name` and its pods.
    pub(super) fn new(jobs: &Api<Job>, pods: &Api<Pod>, name: &str) -> Self {
        let pod_events = watcher(
            pods.clone(),
            watcher::Config::default().labels(&format!("job-name={name}")),
        )
        .default_backoff()
        .filter_map(|e| async move { log_error(e).map(|e| Seen::Pod(Box::new(e))) });
        let job_events = watcher(
            jobs.clone(),
            watcher::Config::default().fields(&format!("metadata.name={name}")),
        )
        .default_backoff()
        .filter_map(|e| async move { log_error(e).map(|e| Seen::Job(Box::new(e))) });
        Self::of(name, futures::stream::select(pod_events, job_events))
    }

    /// A watch of Job `name` that learns what happens from `events`.
    fn of(name: &str, events: impl Stream<Item = Seen> + Send + 'static) -> Self {
        Self {
            events: Box::pin(events),
            name: name.to_owned(),
            pod: None,
            followed: None,
            followed_gone: false,
            job: None,
            exit_wait: EXIT_REPORT_WAIT,
        }
    }

    /// Takes in what the watchers say next.
    async fn next(&mut self) -> Result<(), StepError> {
        let Some(seen) = self.events.next().await else {
            return Err(StepError::new(
                StepErrorKind::Unavailable,
                format!("lost the watch of builder job {}", self.name),
            ));
        };
        match seen {
            Seen::Pod(event) => self.pod_event(*event),
            Seen::Job(event) => match *event {
                watcher::Event::Apply(job) | watcher::Event::InitApply(job) => {
                    self.job = Some(job);
                }
                watcher::Event::Delete(_) => self.job = None,
                _ => {}
            },
        }
        Ok(())
    }

    fn pod_event(&mut self, event: watcher::Event<Pod>) {
        match event {
            watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => {
                if pod.metadata.deletion_timestamp.is_some() {
                    self.pod_gone(&pod);
                } else {
                    self.pod = Some(pod);
                }
            }
            watcher::Event::Delete(pod) => self.pod_gone(&pod),
            _ => {}
        }
    }

    fn pod_gone(&mut self, pod: &Pod) {
        let name = pod.metadata.name.as_deref();
        if self.pod.as_ref().and_then(|p| p.metadata.name.as_deref()) == name {
            self.pod = None;
        }
        if name.is_some() && self.followed.as_deref() == name {
            self.followed_gone = true;
        }
    }

    /// Waits until the builder container has started (or the Job ended without starting
    /// it); returns the pod's name, or why the attempt failed.
    pub(super) async fn started(&mut self) -> Result<Result<String, String>, StepError> {
        loop {
            if let Some(ended) = self.job_ended() {
                if let Some(pod) = self.pod.as_ref().filter(|p| container_started(p)) {
                    return Ok(Ok(pod.metadata.name.clone().unwrap_or_default()));
                }
                return Ok(Err(ended));
            }
            if let Some(pod) = self.pod.as_ref().filter(|p| container_started(p)) {
                let name = pod.metadata.name.clone().unwrap_or_default();
                self.followed = Some(name.clone());
                return Ok(Ok(name));
            }
            self.next().await?;
        }
    }

    /// Waits until the Job has ended, or the followed pod went away (evicted, deleted, its
    /// node lost): then the attempt failed.
    pub(super) async fn ended(&mut self) -> Result<Ended, StepError> {
        loop {
            if self.job.as_ref().is_some_and(|j| condition(j, "Complete")) {
                return Ok(Ended::Succeeded);
            }
            if self.followed_gone {
                return Ok(Ended::Failed(format!(
                    "builder pod {} of job {} went away before the build ended (evicted, deleted, or its node was lost)",
                    self.followed.as_deref().unwrap_or_default(),
                    self.name
                )));
            }
            if let Some(pod) = &self.pod
                && pod.status.as_ref().and_then(|s| s.reason.as_deref()) == Some("Evicted")
            {
                let message = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.message.clone())
                    .unwrap_or_default();
                return Ok(Ended::Failed(format!(
                    "builder pod of job {} was evicted: {message}",
                    self.name
                )));
            }
            if let Some((step, terminated)) = self.pod.as_ref().and_then(failed_step) {
                return Ok(Ended::Failed(format!(
                    "builder job {} failed: the {step} exited with code {}{}",
                    self.name,
                    terminated.exit_code,
                    terminated
                        .reason
                        .as_deref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                )));
            }
            if self.job_ended().is_some() {
                // The Job's controller may report the failure before the kubelet reports how
                // the builder exited: an SRE needs that code, so wait a little for it.
                self.await_exit(self.exit_wait).await;
                return Ok(Ended::Failed(self.job_ended().unwrap_or_default()));
            }
            self.next().await?;
        }
    }

    /// Takes in events until the builder's pod reports how its container ended, the pod goes
    /// away, or `within` has passed.
    async fn await_exit(&mut self, within: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while !self.followed_gone && self.pod.as_ref().and_then(terminated).is_none() {
            match tokio::time::timeout_at(deadline, self.next()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => {
                    tracing::warn!(job = %self.name, "the failed builder job's pod did not report its exit code in time");
                    return;
                }
            }
        }
    }

    /// Why the Job failed, if it has.
    fn job_ended(&self) -> Option<String> {
        let job = self.job.as_ref()?;
        let failed = job
            .status
            .as_ref()?
            .conditions
            .as_ref()?
            .iter()
            .find(|c| c.type_ == "Failed" && c.status == "True")?;
        let mut reason = format!(
            "builder job {} failed: {}",
            self.name,
            failed
                .message
                .as_deref()
                .or(failed.reason.as_deref())
                .unwrap_or("no reason given")
        );
        if let Some(terminated) = self.pod.as_ref().and_then(terminated) {
            reason.push_str(&format!(
                " (the builder exited with code {}{})",
                terminated.exit_code,
                terminated
                    .reason
                    .as_deref()
                    .map(|r| format!(", {r}"))
                    .unwrap_or_default()
            ));
        }
        Some(reason)
    }
}

fn log_error<K>(event: Result<watcher::Event<K>, watcher::Error>) -> Option<watcher::Event<K>> {
    match event {
        Ok(event) => Some(event),
        Err(e) => {
            tracing::warn!(error = %e, "watching a builder job failed; retrying");
            None
        }
    }
}

fn condition(job: &Job, kind: &str) -> bool {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == kind && c.status == "True"))
}

fn builder_state(pod: &Pod) -> Option<&k8s_openapi::api::core::v1::ContainerState> {
    state_of(pod, CONTAINER)
}

fn state_of<'a>(
    pod: &'a Pod,
    container: &str,
) -> Option<&'a k8s_openapi::api::core::v1::ContainerState> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == container)?
        .state
        .as_ref()
}

/// The first step of the pod (the builder, then the registry step) that exited with an error,
/// and how.
/// Either failing fails the attempt at once: the other may wait for it until the Job's
/// deadline (a step killed by the kernel cannot say it ended).
fn failed_step(pod: &Pod) -> Option<(&'static str, &ContainerStateTerminated)> {
    [CONTAINER, REGISTRY_CONTAINER]
        .into_iter()
        .find_map(|name| {
            state_of(pod, name)?
                .terminated
                .as_ref()
                .filter(|t| t.exit_code != 0)
                .map(|t| (name, t))
        })
}

fn container_started(pod: &Pod) -> bool {
    builder_state(pod).is_some_and(|s| s.running.is_some() || s.terminated.is_some())
}

fn terminated(pod: &Pod) -> Option<&ContainerStateTerminated> {
    builder_state(pod)?.terminated.as_ref()
}

/// Times reading the output may fail before the builder has stopped (an API server or
/// kubelet restart) and be tried again.
const REOPENS: u32 = 10;

/// Streams pod `pod`'s output into the build log, skipping the `from.consumed` bytes the log
/// already holds. Returns when the output ends with the container; a stream that breaks off
/// before is opened again, skipping what was read.
pub(super) async fn stream_output(
    pods: &Api<Pod>,
    pod: &str,
    from: BuilderProgress,
    log: &dyn StepLog,
    tail: Tail,
) -> Result<(), StepError> {
    let params = LogParams {
        container: Some(CONTAINER.to_owned()),
        follow: true,
        ..LogParams::default()
    };
    // Bytes of the output read so far (the log holds them, or the output writer does).
    let mut read = from.consumed;
    let mut output = log.builder_output(tail, from);
    let mut failures = 0;
    let mut pause = std::time::Duration::from_millis(250);
    loop {
        let broke = match pods.log_stream(pod, &params).await {
            Ok(reader) => copy_from(reader, &mut read, output.as_mut()).await.err(),
            Err(e) => Some(e.to_string()),
        };
        // The output ends when the container does, but the pod's status says so a little
        // later (more so on a busy node): read again until it does.
        let stopped = match pods.get_opt(pod).await {
            Ok(found) => found.as_ref().is_none_or(|p| terminated(p).is_some()),
            Err(_) => false,
        };
        if stopped {
            // A stream that broke off may have missed the container's last words.
            if broke.is_some() {
                let rest = LogParams {
                    follow: false,
                    ..params.clone()
                };
                if let Ok(reader) = pods.log_stream(pod, &rest).await {
                    let _ = copy_from(reader, &mut read, output.as_mut()).await;
                }
            }
            break;
        }
        if let Some(problem) = broke {
            failures += 1;
            if failures > REOPENS {
                return Err(StepError::new(
                    StepErrorKind::Unavailable,
                    format!("the output of builder pod {pod} broke off {REOPENS} times: {problem}"),
                ));
            }
            tracing::warn!(%pod, read, %problem, "the builder's output broke off; reading on");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_secs(5));
    }
    output.finish().await;
    Ok(())
}

/// Copies a log stream into `output`, skipping its first `*read` bytes and counting on.
async fn copy_from(
    reader: impl futures::AsyncRead,
    read: &mut u64,
    output: &mut dyn crate::steps::StepOutput,
) -> Result<(), String> {
    let mut reader = std::pin::pin!(reader);
    let mut buf = vec![0u8; READ_BYTES];
    let mut at = 0u64;
    loop {
        let n = reader.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(());
        }
        let end = at + n as u64;
        if end > *read {
            let start = usize::try_from(read.saturating_sub(at)).unwrap_or(n);
            output.write(&buf[start..n]).await;
            *read = end;
        }
        at = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(failed: bool) -> Job {
        let conditions = if failed {
            serde_json::json!([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                "message": "Job has reached the specified backoff limit"}])
        } else {
            serde_json::json!([])
        };
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "ib-1-1"},
            "status": {"conditions": conditions},
        }))
        .unwrap()
    }

    fn pod(state: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "ib-1-1-abcde"},
            "status": {"containerStatuses": [{
                "name": CONTAINER, "image": "b", "imageID": "", "ready": false,
                "restartCount": 0, "state": state,
            }]},
        }))
        .unwrap()
    }

    fn running() -> Pod {
        pod(serde_json::json!({"running": {}}))
    }

    fn exited(code: i32) -> Pod {
        pod(serde_json::json!({"terminated": {"exitCode": code, "reason": "Error"}}))
    }

    fn watch(events: Vec<Seen>) -> JobWatch {
        JobWatch::of(
            "ib-1-1",
            futures::stream::iter(events).chain(futures::stream::pending()),
        )
    }

    fn reason(ended: Ended) -> String {
        match ended {
            Ended::Failed(reason) => reason,
            Ended::Succeeded => panic!("the job succeeded"),
        }
    }

    #[tokio::test]
    async fn a_job_reported_failed_before_its_pod_exited_waits_for_the_exit_code() {
        let mut watch = watch(vec![
            Seen::Pod(Box::new(watcher::Event::Apply(running()))),
            Seen::Job(Box::new(watcher::Event::Apply(job(true)))),
            Seen::Pod(Box::new(watcher::Event::Apply(exited(3)))),
        ]);
        let reason = reason(watch.ended().await.unwrap());
        assert!(
            reason.contains("backoff limit")
                && reason.contains("the builder exited with code 3, Error"),
            "{reason}"
        );
    }

    #[tokio::test]
    async fn a_pod_that_never_reports_its_exit_holds_the_failure_up_only_for_a_while() {
        let mut watch = watch(vec![
            Seen::Pod(Box::new(watcher::Event::Apply(running()))),
            Seen::Job(Box::new(watcher::Event::Apply(job(true)))),
        ]);
        watch.exit_wait = std::time::Duration::from_millis(300);
        let started = tokio::time::Instant::now();
        let reason = tokio::time::timeout(std::time::Duration::from_secs(10), watch.ended())
            .await
            .expect("the failure is reported once the wait is over")
            .unwrap();
        let reason = self::reason(reason);
        assert!(
            reason.contains("backoff limit") && !reason.contains("exited"),
            "{reason}"
        );
        assert!(
            started.elapsed() >= watch.exit_wait,
            "{:?}",
            started.elapsed()
        );
    }
}
