//! `builder.ImageBuilder`, mk3's service, over the orchestrator.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use image_builder_state::journal::{Entry, Reader};
use image_builder_state::{BuildId, Phase, now_ms};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;

use super::convert;
use super::status::refuse;
use crate::credentials::StreamRedactor;
use crate::orchestrator::{Error, Orchestrator, Submitted};
use crate::proto::builder as pb;
use crate::proto::builder::image_builder_server::ImageBuilder;
use crate::telemetry::Metrics;
use crate::telemetry::traces::TraceParent;

/// How many messages a stream buffers for a slow client before its feeder waits. The feeder
/// reads from the journal, so waiting holds up nobody else.
const STREAM_BUFFER: usize = 64;

/// A server stream of `T`.
pub(super) type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// mk3's gRPC service.
#[derive(Clone)]
pub struct ImageBuilderService {
    orchestrator: Orchestrator,
}

impl ImageBuilderService {
    /// The service over `orchestrator`.
    pub fn new(orchestrator: Orchestrator) -> Self {
        Self { orchestrator }
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> pb::image_builder_server::ImageBuilderServer<Self> {
        pb::image_builder_server::ImageBuilderServer::new(self)
    }
}

/// Runs `feed` as a task writing into a bounded stream; the task ends when the client goes.
pub(super) fn feed_stream<T, F>(
    name: &'static str,
    feed: impl FnOnce(mpsc::Sender<Result<T, Status>>) -> F,
) -> ResponseStream<T>
where
    T: Send + 'static,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    tokio::spawn(feed(tx).instrument(tracing::debug_span!("stream", rpc = name)));
    Box::pin(ReceiverStream::new(rx))
}

/// Streams a build's durable journal from record `from_seq` and log byte `from_byte`, live
/// until the build ends: each entry through `map` (`None` skips it), then `map(None, ..)` once
/// at the end for anything held back. A journal error ends the stream with its status.
///
/// Pull-based: the store is read only when the client takes the next message, so a listener
/// holds one batch of records and one log piece at most, whatever the log's size and however
/// slowly it reads.
pub(super) fn stream_journal<T, F>(
    orchestrator: &Orchestrator,
    id: BuildId,
    from_seq: u64,
    from_byte: u64,
    map: F,
) -> ResponseStream<T>
where
    T: Send + 'static,
    F: FnMut(Option<Entry>, &Reader) -> Option<T> + Send + 'static,
{
    let reader = orchestrator.read(id, from_seq, from_byte);
    let listening = Listening::new(orchestrator.metrics());
    Box::pin(futures::stream::unfold(
        Some((reader, map, listening)),
        |state| async move {
            let (mut reader, mut map, listening) = state?;
            loop {
                match reader.next().await {
                    Some(Ok(entry)) => {
                        if let Some(item) = map(Some(entry), &reader) {
                            return Some((Ok(item), Some((reader, map, listening))));
                        }
                    }
                    Some(Err(e)) => return Some((Err(Status::from(Error::from(e))), None)),
                    None => return map(None, &reader).map(|item| (Ok(item), None)),
                }
            }
        },
    ))
}

/// Counts an open log or journal stream in the metrics while it lives.
struct Listening(Arc<Metrics>);

impl Listening {
    fn new(metrics: &Arc<Metrics>) -> Self {
        metrics.listeners_changed(1);
        Self(Arc::clone(metrics))
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.0.listeners_changed(-1);
    }
}

pub use image_builder_proto::LOG_OFFSET_METADATA;

fn log_offset(metadata: &tonic::metadata::MetadataMap) -> Result<u64, Status> {
    match metadata.get(LOG_OFFSET_METADATA) {
        None => Ok(0),
        Some(value) => parse_log_offset(value.as_bytes()),
    }
}

/// The value of [`LOG_OFFSET_METADATA`]: a whole number of bytes, or `InvalidArgument` with a
/// bounded echo of what was sent.
pub fn parse_log_offset(value: &[u8]) -> Result<u64, Status> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| {
            refuse(
                Code::InvalidArgument,
                format!(
                    "metadata {LOG_OFFSET_METADATA} must be a byte offset (a whole number), got {}",
                    convert::echo(&String::from_utf8_lossy(value))
                ),
            )
        })
}

pub(super) fn parse_build_id(text: &str) -> Result<BuildId, Status> {
    text.parse().map_err(|_| {
        refuse(Code::InvalidArgument, format!(
            "build_id {} is not a build id (expected a UUID such as 0190b7a2-8c5e-7d3a-9f1e-2b4c6d8e0f12)",
            convert::echo(text)
        ))
    })
}

#[tonic::async_trait]
impl ImageBuilder for ImageBuilderService {
    #[tracing::instrument(skip_all, fields(rpc = "ResolveBaseImage"))]
    async fn resolve_base_image(
        &self,
        request: Request<pb::ResolveBaseImageRequest>,
    ) -> Result<Response<pb::ResolveBaseImageResponse>, Status> {
        crate::steps::CallerId::of_peer(request.remote_addr())
            .serve(async move {
                let req = request.into_inner();
                let request = convert::registry_auth(req.auth.as_ref())?;
                let resolved = self
                    .orchestrator
                    .resolve_base(convert::image_ref("ref", &req.r#ref)?, &request)
                    .await?;
                Ok(Response::new(pb::ResolveBaseImageResponse {
                    r#ref: resolved,
                }))
            })
            .await
    }

    #[tracing::instrument(skip_all, fields(rpc = "ResolveWorkspaceImage"))]
    async fn resolve_workspace_image(
        &self,
        request: Request<pb::ResolveWorkspaceImageRequest>,
    ) -> Result<Response<pb::ResolveWorkspaceImageResponse>, Status> {
        crate::steps::CallerId::of_peer(request.remote_addr())
            .serve(async move {
                let req = request.into_inner();
                let (source, remote_userinfo) = convert::source(req.source.as_ref())?;
                let git =
                    convert::source_git_credentials(req.source.as_ref(), remote_userinfo.as_ref())?;
                let request = convert::registry_auth(req.auth.as_ref())?;
                let (refs, found) = self
                    .orchestrator
                    .resolve_and_look_up(&source, remote_userinfo.as_ref(), git.as_ref(), &request)
                    .await?;
                let status = if found.is_some() {
                    pb::BuildStatus::DoneSuccess
                } else {
                    pb::BuildStatus::Unknown
                };
                Ok(Response::new(pb::ResolveWorkspaceImageResponse {
                    r#ref: refs.workspace_ref,
                    status: status as i32,
                    base_ref: refs.base_ref,
                }))
            })
            .await
    }

    type BuildStream = ResponseStream<pb::BuildResponse>;

    #[tracing::instrument(skip_all, fields(rpc = "Build", build_id))]
    async fn build(
        &self,
        request: Request<pb::BuildRequest>,
    ) -> Result<Response<Self::BuildStream>, Status> {
        crate::steps::CallerId::of_peer(request.remote_addr())
            .serve(async move {
                // W3C Trace Context: the new build's trace continues the client's.
                let parent = request
                    .metadata()
                    .get("traceparent")
                    .and_then(|v| v.to_str().ok())
                    .and_then(TraceParent::parse);
                let req = request.into_inner();
                let (spec, secrets) = convert::build_request(&req)?;
                let submitted = self.orchestrator.submit(spec, secrets, parent).await?;
                let (id, joined, base_ref, workspace_ref, created_at_ms) = match submitted {
                    Submitted::CacheHit {
                        base_ref,
                        workspace_ref,
                    } => {
                        let done = pb::BuildResponse {
                            r#ref: workspace_ref.clone(),
                            status: pb::BuildStatus::DoneSuccess as i32,
                            message: "the workspace image exists already (cache hit)".into(),
                            base_ref: base_ref.clone(),
                            info: Some(pb::BuildInfo {
                                r#ref: workspace_ref,
                                status: pb::BuildStatus::DoneSuccess as i32,
                                started_at: now_ms() / 1000,
                                base_ref,
                                build_id: String::new(),
                                log_info: None,
                            }),
                        };
                        let stream: Self::BuildStream = Box::pin(futures::stream::iter([Ok(done)]));
                        return Ok(Response::new(stream));
                    }
                    Submitted::Running {
                        id,
                        joined,
                        base_ref,
                        workspace_ref,
                        created_at_ms,
                    } => (id, joined, base_ref, workspace_ref, created_at_ms),
                };
                tracing::Span::current().record("build_id", tracing::field::display(id));
                tracing::info!(joined, "build stream opened");
                let info = move |status: pb::BuildStatus| pb::BuildInfo {
                    r#ref: workspace_ref.clone(),
                    status: status as i32,
                    started_at: created_at_ms / 1000,
                    base_ref: base_ref.clone(),
                    build_id: id.to_string(),
                    log_info: None,
                };
                let orchestrator = self.orchestrator.clone();
                let stream = feed_stream("Build", move |tx| async move {
                    let response = |status: pb::BuildStatus, message: String| {
                        let info = info(status);
                        pb::BuildResponse {
                            r#ref: info.r#ref.clone(),
                            status: status as i32,
                            message,
                            base_ref: info.base_ref.clone(),
                            info: Some(info),
                        }
                    };
                    let message = if joined {
                        format!("joined the running build {id} of this workspace image")
                    } else {
                        format!("build {id} started")
                    };
                    if tx
                        .send(Ok(response(pb::BuildStatus::Running, message)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let mut follower = orchestrator.follow(id, 0);
                    while let Some(next) = follower.next().await {
                        if let Err(e) = next {
                            let _ = tx.send(Err(Status::from(Error::from(e)))).await;
                            return;
                        }
                    }
                    let Some(view) = follower.view() else { return };
                    let last = match view.phase() {
                        Phase::Done => response(
                            pb::BuildStatus::DoneSuccess,
                            format!("workspace image {} is ready", view.workspace_ref),
                        ),
                        phase => response(
                            pb::BuildStatus::DoneFailure,
                            match &view.failure {
                                Some(reason) if phase == Phase::Cancelled => {
                                    format!("build cancelled: {reason}")
                                }
                                Some(reason) => reason.clone(),
                                None => format!("build ended in phase {phase}"),
                            },
                        ),
                    };
                    let _ = tx.send(Ok(last)).await;
                });
                Ok(Response::new(stream))
            })
            .await
    }

    type LogsStream = ResponseStream<pb::LogsResponse>;

    #[tracing::instrument(skip_all, fields(rpc = "Logs", build_id))]
    async fn logs(
        &self,
        request: Request<pb::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let from_byte = log_offset(request.metadata())?;
        let req = request.into_inner();
        let id = if !req.build_id.trim().is_empty() {
            parse_build_id(req.build_id.trim())?
        } else if !req.build_ref.trim().is_empty() {
            self.orchestrator.find_by_ref(req.build_ref.trim())?
        } else {
            return Err(refuse(
                Code::InvalidArgument,
                "name the build: set build_id, or build_ref (the workspace image ref)",
            ));
        };
        // Answer NotFound as the call's status, not inside the stream.
        self.orchestrator.ensure_exists(id)?;
        tracing::Span::current().record("build_id", tracing::field::display(id));
        let mut censor = req
            .censored
            .then(|| StreamRedactor::new(self.orchestrator.censored()));
        let stream = stream_journal(&self.orchestrator, id, 0, from_byte, move |entry, _| {
            let bytes = match entry {
                Some(Entry::Log { bytes, .. }) => bytes,
                Some(Entry::Record { .. }) => return None,
                None => Vec::new(),
            };
            let content = match censor.as_mut() {
                None => bytes,
                Some(censor) => {
                    let mut out = Vec::with_capacity(bytes.len());
                    if bytes.is_empty() {
                        censor.finish(&mut out);
                    } else {
                        censor.push(&bytes, &mut out);
                    }
                    out
                }
            };
            (!content.is_empty()).then_some(pb::LogsResponse { content })
        });
        Ok(Response::new(stream))
    }

    #[tracing::instrument(skip_all, fields(rpc = "ListBuilds"))]
    async fn list_builds(
        &self,
        _request: Request<pb::ListBuildsRequest>,
    ) -> Result<Response<pb::ListBuildsResponse>, Status> {
        let builds = self
            .orchestrator
            .list()?
            .iter()
            .map(convert::build_info)
            .collect();
        Ok(Response::new(pb::ListBuildsResponse { builds }))
    }
}
