//! `imagebuilder.ops.v1.BuildOps`: inspect, cancel, retry and replay builds. Beside mk3's
//! service on the same port; mk3's messages are untouched.

use std::sync::Arc;

use image_builder_state::view::{Damage, Summary};
use image_builder_state::{BuildId, BuildSource, BuildView, Record};
use tonic::{Code, Request, Response, Status};

use super::access::{Access, Role};
use super::image_builder::{ResponseStream, parse_build_id, stream_journal};
use super::status::refuse;
use crate::orchestrator::Orchestrator;
use crate::proto::ops as pb;
use crate::proto::ops::build_ops_server::BuildOps;
use image_builder_state::journal::Entry;

/// Default and largest page of ListBuilds.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// The operations service: reads for viewers, cancel and retry for operators (see
/// [`super::access`]).
#[derive(Clone)]
pub struct OpsService {
    orchestrator: Orchestrator,
    access: Arc<Access>,
}

impl OpsService {
    /// The service over `orchestrator`, open to the callers `access` admits.
    pub fn new(orchestrator: Orchestrator, access: Arc<Access>) -> Self {
        Self {
            orchestrator,
            access,
        }
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> pb::build_ops_server::BuildOpsServer<Self> {
        pb::build_ops_server::BuildOpsServer::new(self)
    }
}

/// A person-readable description of a build's source.
fn describe_source(source: &BuildSource) -> String {
    match source {
        BuildSource::Reference { reference } => format!("image {reference}"),
        BuildSource::Dockerfile(d) => format!(
            "Dockerfile {} (context {}) from {} at {:?} {} (version {})",
            d.dockerfile_path,
            d.context_path,
            d.remote_uri,
            d.target_mode,
            d.clone_target,
            d.dockerfile_version
        ),
    }
}

fn build(view: &BuildView) -> pb::Build {
    pb::Build {
        build_id: view.id.to_string(),
        state: view.phase().to_string(),
        attempt: view.attempt,
        source: describe_source(&view.spec.source),
        force_rebuild: view.spec.force_rebuild,
        triggered_by: view.spec.triggered_by.clone(),
        had_request_auth: view.spec.had_request_auth,
        base_ref: view.base_ref.clone(),
        workspace_ref: view.workspace_ref.clone(),
        failure: view.failure.clone().unwrap_or_default(),
        created_at_ms: view.created_at_ms,
        finished_at_ms: view.finished_at_ms().unwrap_or_default(),
        phases: view
            .phases
            .iter()
            .map(|p| pb::PhaseTiming {
                phase: p.phase.to_string(),
                entered_at_ms: p.at_ms,
            })
            .collect(),
        log_bytes: view.log_len,
        cancel_requested: view.cancel_requested.clone().unwrap_or_default(),
        digest: view.digest.clone().unwrap_or_default(),
        records: view.next_seq,
        requests: view.requests.iter().map(operator_request).collect(),
        trace_id: view
            .trace
            .as_ref()
            .map(|(trace, _)| trace.clone())
            .unwrap_or_default(),
    }
}

/// A damaged build as GetBuild shows it: what is readable of it, state `damaged`, and what is
/// wrong as its failure.
fn damaged_build(id: BuildId, readable: Option<&BuildView>, damage: &Damage) -> pb::Build {
    let mut shown = match readable {
        Some(view) => build(view),
        None => pb::Build {
            build_id: id.to_string(),
            created_at_ms: id.created_at_ms(),
            ..pb::Build::default()
        },
    };
    shown.state = DAMAGED.to_owned();
    shown.failure = damage.reason.clone();
    shown
}

/// The state a damaged build is listed in.
const DAMAGED: &str = "damaged";

fn summary(s: &Summary) -> pb::BuildSummary {
    pb::BuildSummary {
        build_id: s.id.to_string(),
        state: s.state(),
        attempt: s.attempt,
        workspace_ref: s.workspace_ref.clone(),
        base_ref: s.base_ref.clone(),
        triggered_by: s.triggered_by.clone(),
        created_at_ms: s.created_at_ms,
        finished_at_ms: s.finished_at_ms.unwrap_or_default(),
        failure: s.failure.clone().unwrap_or_default(),
    }
}

fn operator_request(r: &image_builder_state::OperatorRequest) -> pb::OperatorRequest {
    pb::OperatorRequest {
        action: r.action.name().to_owned(),
        identity: r.identity.clone(),
        at_ms: r.at_ms,
    }
}

/// A journal record as the API shows it.
pub fn journal_record(seq: u64, record: &Record, state: &str) -> pb::JournalRecord {
    use pb::journal_record::Record as R;
    let (at_ms, record) = match record {
        Record::Created { spec, at_ms, .. } => (*at_ms, R::Created(describe_source(&spec.source))),
        Record::Transition { event, at_ms } => (*at_ms, R::Transition(event.name().to_owned())),
        Record::Log { offset, data } => (
            0,
            R::Log(pb::LogChunk {
                offset: *offset,
                data: data.clone(),
            }),
        ),
        // Its bytes are in the segment; a journal reader sends them as `Log` pieces.
        Record::LogAppended { offset, .. } | Record::LogChecked { offset, .. } => (
            0,
            R::Log(pb::LogChunk {
                offset: *offset,
                data: Vec::new(),
            }),
        ),
        Record::CancelRequested { reason, at_ms } => (*at_ms, R::CancelRequested(reason.clone())),
        Record::BuilderOutput(progress) => (
            0,
            R::Builder(pb::BuilderProgress {
                attempt: progress.attempt,
                builder: progress.builder.clone(),
                consumed: progress.consumed,
            }),
        ),
        Record::Requested(request) => (request.at_ms, R::Requested(operator_request(request))),
        Record::Traced { trace_id, .. } => (0, R::Traced(trace_id.clone())),
    };
    pb::JournalRecord {
        seq,
        at_ms,
        record: Some(record),
        state: state.to_owned(),
    }
}

fn id_of(text: &str) -> Result<BuildId, Status> {
    parse_build_id(text.trim())
}

#[tonic::async_trait]
impl BuildOps for OpsService {
    #[tracing::instrument(skip_all, fields(rpc = "ops.GetBuild"))]
    async fn get_build(
        &self,
        request: Request<pb::GetBuildRequest>,
    ) -> Result<Response<pb::Build>, Status> {
        self.access.authorize(&request, Role::Viewer, "GetBuild")?;
        let id = id_of(&request.get_ref().build_id)?;
        if let Some(damage) = self.orchestrator.damage(id) {
            let readable = self.orchestrator.readable_view(id);
            return Ok(Response::new(damaged_build(id, readable.as_ref(), &damage)));
        }
        Ok(Response::new(build(&self.orchestrator.view(id)?)))
    }

    #[tracing::instrument(skip_all, fields(rpc = "ops.ListBuilds"))]
    async fn list_builds(
        &self,
        request: Request<pb::ListBuildsRequest>,
    ) -> Result<Response<pb::ListBuildsResponse>, Status> {
        self.access
            .authorize(&request, Role::Viewer, "ListBuilds")?;
        let req = request.into_inner();
        let known: Vec<&str> = image_builder_state::Phase::ALL
            .iter()
            .map(|p| p.as_str())
            .chain([DAMAGED])
            .collect();
        if let Some(bad) = req.states.iter().find(|s| !known.contains(&s.as_str())) {
            return Err(refuse(
                Code::InvalidArgument,
                format!(
                    "states: {} is not a state (one of {})",
                    super::convert::echo(bad),
                    known.join(", ")
                ),
            ));
        }
        let after = if req.page_token.is_empty() {
            None
        } else {
            Some(id_of(&req.page_token).map_err(|_| {
                refuse(
                    Code::InvalidArgument,
                    "page_token: not a token from a previous page",
                )
            })?)
        };
        let size = match req.page_size as usize {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let mut page: Vec<pb::BuildSummary> = Vec::new();
        let mut more = false;
        for s in self.orchestrator.list()? {
            if after.is_some_and(|a| s.id >= a)
                || (!req.states.is_empty() && !req.states.contains(&s.state()))
                || (req.created_after_ms > 0 && s.created_at_ms < req.created_after_ms)
                || (req.created_before_ms > 0 && s.created_at_ms >= req.created_before_ms)
                || (!req.workspace_ref.is_empty() && s.workspace_ref != req.workspace_ref)
                || (!req.triggered_by.is_empty() && s.triggered_by != req.triggered_by)
            {
                continue;
            }
            if page.len() == size {
                more = true;
                break;
            }
            page.push(summary(&s));
        }
        let next_page_token = if more {
            page.last().map(|b| b.build_id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListBuildsResponse {
            builds: page,
            next_page_token,
        }))
    }

    type JournalStream = ResponseStream<pb::JournalRecord>;

    #[tracing::instrument(skip_all, fields(rpc = "ops.Journal"))]
    async fn journal(
        &self,
        request: Request<pb::JournalRequest>,
    ) -> Result<Response<Self::JournalStream>, Status> {
        self.access.authorize(&request, Role::Viewer, "Journal")?;
        let req = request.into_inner();
        let id = id_of(&req.build_id)?;
        self.orchestrator.ensure_exists(id)?;
        let stream = stream_journal(
            &self.orchestrator,
            id,
            req.from_seq,
            req.from_log_offset,
            |entry, reader| {
                let state = reader
                    .view()
                    .map(|v| v.phase().to_string())
                    .unwrap_or_default();
                Some(match entry? {
                    Entry::Record { seq, record } => journal_record(seq, &record, &state),
                    Entry::Log { seq, offset, bytes } => pb::JournalRecord {
                        seq,
                        at_ms: 0,
                        record: Some(pb::journal_record::Record::Log(pb::LogChunk {
                            offset,
                            data: bytes,
                        })),
                        state,
                    },
                })
            },
        );
        Ok(Response::new(stream))
    }

    #[tracing::instrument(skip_all, fields(rpc = "ops.CancelBuild"))]
    async fn cancel_build(
        &self,
        request: Request<pb::CancelBuildRequest>,
    ) -> Result<Response<pb::CancelBuildResponse>, Status> {
        let identity = self
            .access
            .authorize(&request, Role::Operator, "CancelBuild")?;
        let req = request.into_inner();
        let id = id_of(&req.build_id)?;
        let cancelled = self
            .orchestrator
            .cancel(
                id,
                super::convert::cancel_reason(&req.reason)?,
                identity.to_string(),
            )
            .await?;
        let message = match cancelled.joined {
            0 => format!("build {id} is being cancelled"),
            n => format!(
                "build {id} is being cancelled for every client following it, including {n} that joined it"
            ),
        };
        Ok(Response::new(pb::CancelBuildResponse {
            build_id: id.to_string(),
            message,
            joined_clients: cancelled.joined as u32,
        }))
    }

    #[tracing::instrument(skip_all, fields(rpc = "ops.RetryBuild"))]
    async fn retry_build(
        &self,
        request: Request<pb::RetryBuildRequest>,
    ) -> Result<Response<pb::RetryBuildResponse>, Status> {
        let identity = self
            .access
            .authorize(&request, Role::Operator, "RetryBuild")?;
        let id = id_of(&request.get_ref().build_id)?;
        let retried = self.orchestrator.retry(id, identity.to_string()).await?;
        let mut message = format!("build {id} runs again as attempt {}", retried.attempt);
        if retried.needs_request_credentials {
            message.push_str("; the original request carried registry credentials of its own, which are never kept: if the build needs them, submit a new Build with them");
        }
        Ok(Response::new(pb::RetryBuildResponse {
            build_id: id.to_string(),
            attempt: retried.attempt,
            message,
        }))
    }
}
