//! OpenTelemetry traces: `tracing` spans of this crate exported over OTLP/HTTP (protobuf), and
//! the spans of a build.
//!
//! One trace per build attempt: a root span `build` (a child of the Build request's W3C
//! `traceparent` when the client sent one), a span per state (`Resolving`, `CheckingCache`,
//! `Building`, `Pushing`) and, under them, the registry requests and builder processes. The
//! attempt's trace and root span ids are journaled (`Record::Traced`); after a restart the
//! resumed run's root span is a child of, and linked to, the journaled one, with
//! `build.resumed = true`, so the whole attempt stays one trace.
//!
//! Span fields are build ids, refs, states, hosts, outcomes and program names: never a
//! credential, token or registry password (refs and hosts never carry any; error texts are
//! not attributes).

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    SpanContext, SpanId, Status, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider,
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider,
};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::TracingConfig;

/// How often finished spans are sent.
const EXPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Longest `traceparent` value taken from a request (W3C's is 55 characters).
const MAX_TRACEPARENT: usize = 128;

/// Traces cannot be exported as configured.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The exporter refused its configuration.
    #[error("tracing.otlpEndpoint: {0}")]
    Exporter(String),
}

/// The installed exporter; [`Exporter::shutdown`] sends what is left.
pub struct Exporter {
    provider: SdkTracerProvider,
}

impl Exporter {
    /// Exports spans to `config.otlpEndpoint`, sampling `config.sampleRatio` of new traces
    /// (a sampled parent is always followed). Call outside the async runtime: the exporter
    /// runs on a thread of its own.
    pub fn start(config: &TracingConfig) -> Result<Self, Error> {
        let endpoint = traces_url(&config.otlp_endpoint);
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| Error::Exporter(e.to_string()))?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name("image-builder")
            .with_attribute(opentelemetry::KeyValue::new(
                "service.version",
                env!("CARGO_PKG_VERSION"),
            ))
            .build();
        // Spans leave within a second of ending: a process killed soon after loses little.
        let batches = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_scheduled_delay(EXPORT_EVERY)
                    .build(),
            )
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(batches)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sample_ratio,
            ))))
            .with_resource(resource)
            .build();
        Ok(Self { provider })
    }

    /// The tracer the `tracing` layer records into.
    pub fn tracer(&self) -> opentelemetry_sdk::trace::Tracer {
        self.provider.tracer("image-builder")
    }

    /// Sends the spans still buffered and stops the exporter.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("image-builder: traces not all exported at shutdown: {e}");
        }
    }
}

/// `base` with the OTLP traces path, unless it names a path already.
fn traces_url(base: &str) -> String {
    let trimmed = base.trim_end_matches('/');
    let after_scheme = trimmed.split_once("://").map_or(trimmed, |(_, rest)| rest);
    if after_scheme.contains('/') {
        trimmed.to_owned()
    } else {
        format!("{trimmed}/v1/traces")
    }
}

/// A W3C `traceparent` a client sent, checked for form (`00-<trace>-<span>-<flags>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceParent(String);

impl TraceParent {
    /// The value of a `traceparent` header, if it is one; anything else is ignored, as W3C
    /// Trace Context asks.
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim();
        if value.len() > MAX_TRACEPARENT {
            return None;
        }
        let context = propagated(value).span().span_context().clone();
        context.is_valid().then(|| Self(value.to_owned()))
    }
}

fn propagated(traceparent: &str) -> opentelemetry::Context {
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    TraceContextPropagator::new().extract(&carrier)
}

/// Where a build attempt's root span hangs.
pub enum Parent<'a> {
    /// A new trace.
    None,
    /// The client's trace (its `traceparent`).
    Client(&'a TraceParent),
    /// The attempt's journaled root span: this run resumes it after a restart.
    Journaled {
        /// 32 hex digits.
        trace_id: &'a str,
        /// 16 hex digits.
        span_id: &'a str,
    },
}

/// The root span of a run of build attempt `attempt`.
pub fn attempt_span(
    build_id: &str,
    attempt: u32,
    workspace_ref: &str,
    parent: Parent<'_>,
) -> tracing::Span {
    let resumed = matches!(parent, Parent::Journaled { .. });
    let span = tracing::info_span!(
        "build",
        build_id = %build_id,
        build.attempt = attempt,
        build.workspace_ref = %workspace_ref,
        build.resumed = resumed,
    );
    match parent {
        Parent::None => {}
        Parent::Client(traceparent) => {
            let _ = span.set_parent(propagated(&traceparent.0));
        }
        Parent::Journaled { trace_id, span_id } => {
            if let (Ok(trace), Ok(span_of)) =
                (TraceId::from_hex(trace_id), SpanId::from_hex(span_id))
            {
                let journaled = SpanContext::new(
                    trace,
                    span_of,
                    TraceFlags::SAMPLED,
                    true,
                    TraceState::default(),
                );
                let _ = span.set_parent(
                    opentelemetry::Context::new().with_remote_span_context(journaled.clone()),
                );
                span.add_link(journaled);
            }
        }
    }
    span
}

/// The trace and span id of `span`, when it is exported (tracing is on): what the journal
/// keeps to continue the trace after a restart.
pub fn ids(span: &tracing::Span) -> Option<(String, String)> {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context.is_valid().then(|| {
        (
            span_context.trace_id().to_string(),
            span_context.span_id().to_string(),
        )
    })
}

/// The span of one state of a build (`Resolving`, `Building`, ...).
pub fn state_span(state: &str) -> tracing::Span {
    tracing::info_span!("state", otel.name = %state, build.state = %state, build.event = tracing::field::Empty)
}

/// Records how a state ended: the event it produced, an error status when it failed.
pub fn end_state(span: &tracing::Span, event: &str, failed: bool) {
    span.record("build.event", event);
    if failed {
        span.set_status(Status::error(event.to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_traces_path_is_added_to_a_bare_endpoint_only() {
        assert_eq!(
            traces_url("http://127.0.0.1:4318"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://127.0.0.1:4318/"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("https://otel.example.com/custom/v1/traces"),
            "https://otel.example.com/custom/v1/traces"
        );
    }

    #[test]
    fn only_well_formed_traceparents_are_taken() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(TraceParent::parse(good).is_some());
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "not a traceparent",
        ] {
            assert!(TraceParent::parse(bad).is_none(), "{bad:?}");
        }
        assert!(TraceParent::parse(&"0".repeat(4096)).is_none());
    }
}
