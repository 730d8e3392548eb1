//! Metrics and traces, read back through real peers: Debian's Prometheus scrapes the service
//! and its HTTP API answers for every metric a dashboard needs; Jaeger v2 receives the
//! service's OTLP traces and its query API shows one trace per build attempt, a span per
//! state under the client's `traceparent`, registry and builder-process children, a resumed
//! run joining the same trace after `kill -9`, and no credential anywhere in it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

mod common;

use base64::Engine;
use common::*;
use image_builder::proto::builder as pb;
use image_builder::proto::ops;
use image_builder_testkit::{
    self as testkit, BaseImage, GitRepo, Jaeger, LocalRegistry, Prometheus, Service,
};
use serde_json::Value;

/// The vector a PromQL query answers: each series' labels and value.
async fn query(prometheus: &Prometheus, promql: &str) -> Result<Vec<(Value, f64)>, String> {
    let answer: Value = reqwest::Client::new()
        .get(format!("{}/api/v1/query", prometheus.url()))
        .query(&[("query", promql)])
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    if answer["status"] != "success" {
        return Err(answer.to_string());
    }
    Ok(answer["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|series| {
            let value = series["value"][1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN);
            (series["metric"].clone(), value)
        })
        .collect())
}

/// Waits until `promql` answers at least one series, every one at least `at_least`.
async fn expect_series(prometheus: &Prometheus, promql: &str, at_least: f64) -> Vec<(Value, f64)> {
    eventually(promql, async || {
        let series = query(prometheus, promql).await?;
        if !series.is_empty() && series.iter().all(|(_, v)| *v >= at_least) {
            Ok(series)
        } else {
            Err(format!("{series:?}\n{}", prometheus.log()))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_every_metric_a_dashboard_needs() {
    let shared = shared();
    let service = service("observed-metrics");
    let target = service
        .metrics_url()
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_owned();
    let prometheus = Prometheus::start(&target).unwrap();
    let mut client = service.client().await.unwrap();

    let built = build_all(&mut client, ref_build(&shared.base))
        .await
        .unwrap();
    assert_eq!(status(built.last().unwrap()), pb::BuildStatus::DoneSuccess);
    let again = build_all(&mut client, ref_build(&shared.base))
        .await
        .unwrap();
    assert_eq!(status(again.last().unwrap()), pb::BuildStatus::DoneSuccess);
    let missing = logs_all(&mut client, "01890a5d-ac96-774b-bcce-b302099a8057")
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    // A listener that stays open while Prometheus looks: on a build that runs a while.
    let sleeper = GitRepo::new(&[(
        "Dockerfile",
        &format!("FROM {}\nRUN echo observed && sleep 120\n", shared.base),
    )])
    .unwrap();
    let (_running, id) = start_build(&mut client, head_build(&sleeper.uri())).await;
    let mut open = follow_logs(&mut client, &id).await;
    let _first = open.message().await.unwrap();

    for (promql, at_least) in [
        // mk3's two counters.
        (r#"gitpod_image_builder_builds_started_total"#, 1.0),
        (
            r#"gitpod_image_builder_builds_done_total{success="true"}"#,
            1.0,
        ),
        // Builds by state (a gauge per unfinished state) and the queue.
        (r#"image_builder_builds{state="resolving"}"#, 0.0),
        (r#"image_builder_builds{state="pushing"}"#, 0.0),
        (r#"image_builder_queue_depth"#, 0.0),
        // Time per state.
        (
            r#"image_builder_state_duration_seconds_count{state="resolving"}"#,
            1.0,
        ),
        (
            r#"image_builder_state_duration_seconds_count{state="pushing"}"#,
            1.0,
        ),
        // The journal: commit latency and batch sizes.
        (
            r#"image_builder_journal_commit_duration_seconds_count"#,
            1.0,
        ),
        (r#"image_builder_journal_commit_appends_sum"#, 1.0),
        (r#"image_builder_journal_commit_records_sum"#, 1.0),
        // Registry requests by host, outcome and retry.
        (
            &format!(
                r#"image_builder_registry_requests_total{{host="{}",outcome="ok",retry="false"}}"#,
                shared.registry.addr()
            ),
            1.0,
        ),
        // Log bytes, listeners, cache hits.
        (r#"image_builder_log_bytes_total"#, 1.0),
        (r#"image_builder_log_listeners"#, 1.0),
        (r#"image_builder_cache_hits_total"#, 1.0),
        // The heap in use: at least what the service's own structures take.
        (r#"image_builder_heap_bytes"#, 1_048_576.0),
        // gRPC server metrics, with the status each call ended with.
        (
            r#"image_builder_grpc_server_handled_total{grpc_service="builder.ImageBuilder",grpc_method="Build",grpc_code="Ok"}"#,
            2.0,
        ),
        (
            r#"image_builder_grpc_server_handled_total{grpc_method="Logs",grpc_code="NotFound"}"#,
            1.0,
        ),
        (
            r#"image_builder_grpc_server_handling_seconds_count{grpc_method="Build"}"#,
            2.0,
        ),
    ] {
        expect_series(&prometheus, promql, at_least).await;
    }
    drop(open);
    expect_series(&prometheus, "image_builder_log_listeners == 0", 0.0).await;
}

/// A W3C traceparent of a fresh trace: (header, trace id, parent span id).
fn traceparent(seed: u8) -> (String, String, String) {
    let trace = format!("{seed:02x}").repeat(2) + &testkit::random_hex().unwrap()[4..];
    let span = testkit::random_hex().unwrap()[..16].to_owned();
    (format!("00-{trace}-{span}-01"), trace, span)
}

fn with_traceparent(request: pb::BuildRequest, header: &str) -> tonic::Request<pb::BuildRequest> {
    let mut request = tonic::Request::new(request);
    request
        .metadata_mut()
        .insert("traceparent", header.parse().unwrap());
    request
}

/// The spans Jaeger holds for `trace_id`, once `ready` says they are all there.
async fn trace(
    jaeger: &Jaeger,
    trace_id: &str,
    ready: impl Fn(&[Value]) -> bool,
) -> (Vec<Value>, String) {
    eventually(&format!("trace {trace_id} in Jaeger"), async || {
        let text = reqwest::get(format!("{}/api/traces/{trace_id}", jaeger.query_url()))
            .await
            .map_err(|e| e.to_string())?
            .text()
            .await
            .map_err(|e| e.to_string())?;
        let answer: Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
        let spans = answer["data"][0]["spans"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if ready(&spans) {
            Ok((spans, text))
        } else {
            Err(format!("{text}\n{}", jaeger.log()))
        }
    })
    .await
}

fn named<'a>(spans: &'a [Value], name: &str) -> Vec<&'a Value> {
    spans
        .iter()
        .filter(|s| s["operationName"] == name)
        .collect()
}

fn tag<'a>(span: &'a Value, key: &str) -> Option<&'a Value> {
    span["tags"]
        .as_array()?
        .iter()
        .find(|t| t["key"] == key)
        .map(|t| &t["value"])
}

fn parent(span: &Value) -> Option<String> {
    span["references"]
        .as_array()?
        .iter()
        .find(|r| r["refType"] == "CHILD_OF")
        .and_then(|r| r["spanID"].as_str())
        .map(str::to_owned)
}

fn linked(span: &Value) -> Vec<String> {
    span["references"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["refType"] == "FOLLOWS_FROM")
        .filter_map(|r| r["spanID"].as_str().map(str::to_owned))
        .collect()
}

const PASSWORD: &str = "traced-marker-7c3e91";

#[tokio::test(flavor = "multi_thread")]
async fn jaeger_shows_one_trace_per_attempt_with_a_span_per_state_resumed_runs_included() {
    let jaeger = Jaeger::start().unwrap();
    let registry = LocalRegistry::start_with_users(&[("builder", PASSWORD)]).unwrap();
    let host = registry.addr().to_owned();
    let creds = format!("builder:{PASSWORD}");
    let base = testkit::push_image_as(
        &BaseImage::busybox(0).unwrap(),
        &host,
        "private/busybox:1",
        Some(&creds),
    )
    .unwrap();
    let basic = base64::engine::general_purpose::STANDARD.encode(&creds);
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("pull-secret.json");
    std::fs::write(
        &secret,
        serde_json::json!({"auths": {&host: {"auth": basic}}}).to_string(),
    )
    .unwrap();
    let mut config = config(&host, "traced");
    config["pullSecretFile"] = secret.display().to_string().into();
    config["tracing"] = serde_json::json!({"otlpEndpoint": jaeger.otlp_url(), "sampleRatio": 1.0});
    let mut service = Service::start(binary(), config).unwrap();
    let mut client = service.client().await.unwrap();
    let selective = pb::BuildRegistryAuth {
        mode: Some(pb::build_registry_auth::Mode::Selective(
            pb::BuildRegistryAuthSelective {
                any_of: vec![host.clone()],
                ..Default::default()
            },
        )),
        additional: Default::default(),
    };

    // A build that runs straight through, under the client's trace.
    let straight = GitRepo::new(&[(
        "Dockerfile",
        &format!("FROM {base}\nRUN echo traced-straight\n"),
    )])
    .unwrap();
    let (header, trace_id, client_span) = traceparent(0xa1);
    let mut request = head_build(&straight.uri());
    request.auth = Some(selective.clone());
    let responses: Vec<pb::BuildResponse> = {
        let mut stream = client
            .build(with_traceparent(request, &header))
            .await
            .unwrap()
            .into_inner();
        let mut all = Vec::new();
        while let Some(r) = stream.message().await.unwrap() {
            all.push(r);
        }
        all
    };
    assert_eq!(
        status(responses.last().unwrap()),
        pb::BuildStatus::DoneSuccess,
        "{responses:?}"
    );
    let id = build_id(&responses[0]);
    let states = ["Resolving", "CheckingCache", "Building", "Pushing"];
    let (spans, text) = trace(&jaeger, &trace_id, |spans| {
        states.iter().all(|s| !named(spans, s).is_empty()) && !named(spans, "build").is_empty()
    })
    .await;
    assert!(spans.iter().all(|s| s["traceID"] == trace_id.as_str()));
    let root = named(&spans, "build");
    assert_eq!(root.len(), 1, "{text}");
    let root = root[0];
    assert_eq!(
        parent(root).as_deref(),
        Some(client_span.as_str()),
        "the client's traceparent is the parent"
    );
    assert_eq!(
        tag(root, "build_id").and_then(Value::as_str),
        Some(id.as_str())
    );
    assert_eq!(tag(root, "build.resumed"), Some(&Value::Bool(false)));
    let root_id = root["spanID"].as_str().unwrap();
    let mut started = Vec::new();
    for state in states {
        let span = named(&spans, state);
        assert_eq!(span.len(), 1, "{state}: {text}");
        assert_eq!(
            parent(span[0]).as_deref(),
            Some(root_id),
            "{state} hangs under the build"
        );
        started.push(span[0]["startTime"].as_u64().unwrap());
    }
    assert!(
        started.windows(2).all(|w| w[0] <= w[1]),
        "states in order: {started:?}"
    );
    // Children: registry requests and the builder's processes, under their states.
    let state_id = |name: &str| {
        named(&spans, name)[0]["spanID"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let registry_requests = named(&spans, "registry manifest");
    assert!(!registry_requests.is_empty(), "{text}");
    assert!(
        registry_requests
            .iter()
            .all(|r| tag(r, "registry.host").and_then(Value::as_str) == Some(host.as_str()))
    );
    // (A build accepted a moment ago does not ask again in CheckingCache what its Build call
    // just learnt; its copy asks in Pushing.)
    assert!(
        registry_requests
            .iter()
            .any(|r| parent(r) == Some(state_id("Pushing"))),
        "{text}"
    );
    assert!(
        named(&spans, "process buildah")
            .iter()
            .any(|p| parent(p) == Some(state_id("Building"))),
        "{text}"
    );
    assert!(
        named(&spans, "process git")
            .iter()
            .any(|p| parent(p) == Some(state_id("Building"))),
        "{text}"
    );

    // A build killed in the middle and resumed: its runs share the journaled trace.
    let resumable = GitRepo::new(&[(
        "Dockerfile",
        &format!("FROM {base}\nRUN echo traced-resumable && sleep 4\n"),
    )])
    .unwrap();
    let (header, resumed_trace, _) = traceparent(0xb2);
    let mut request = head_build(&resumable.uri());
    request.auth = Some(selective);
    let mut stream = client
        .build(with_traceparent(request, &header))
        .await
        .unwrap()
        .into_inner();
    let resumed_id = build_id(&stream.message().await.unwrap().unwrap());
    wait_for_log(&mut client, &resumed_id, "traced-resumable\n").await;
    // The first run's finished states reach Jaeger before the kill (spans are sent every
    // second): the resumed run's must hang with them under the journaled root.
    trace(&jaeger, &resumed_trace, |spans| {
        !named(spans, "Resolving").is_empty() && !named(spans, "CheckingCache").is_empty()
    })
    .await;
    drop(stream);
    service.kill();
    service.kill_and_restart().unwrap();
    let mut ops = service.ops().await.unwrap();
    let done = eventually("the resumed build ends", async || {
        let build = ops
            .get_build(ops::GetBuildRequest {
                build_id: resumed_id.clone(),
            })
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        if build.state == "done" {
            Ok(build)
        } else {
            Err(format!("{build:?}"))
        }
    })
    .await;
    assert_eq!(
        done.trace_id, resumed_trace,
        "the journal keeps the attempt's trace"
    );
    let (spans, text) = trace(&jaeger, &resumed_trace, |spans| {
        named(spans, "build")
            .iter()
            .any(|b| tag(b, "build.resumed") == Some(&Value::Bool(true)))
            && !named(spans, "Pushing").is_empty()
    })
    .await;
    let resumed_root = named(&spans, "build")
        .into_iter()
        .find(|b| tag(b, "build.resumed") == Some(&Value::Bool(true)))
        .unwrap();
    // It hangs under the journaled root of the killed run, and links to it (Jaeger shows the
    // parent that is also a link once, as the link).
    let referenced: Vec<String> = resumed_root["references"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["spanID"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(referenced.len(), 1, "{resumed_root}");
    let journaled = referenced[0].clone();
    assert!(
        parent(resumed_root).is_some_and(|p| p == journaled)
            || linked(resumed_root) == [journaled.clone()],
        "{resumed_root}"
    );
    assert!(
        named(&spans, "Resolving")
            .iter()
            .any(|s| parent(s).as_deref() == Some(journaled.as_str())),
        "the first run's states are in the same trace, under the same root: {text}"
    );
    assert!(
        named(&spans, "Pushing")
            .iter()
            .any(|s| parent(s).as_deref() == resumed_root["spanID"].as_str()),
        "{text}"
    );

    // No credential in any span of either trace, nor in the service's log.
    let (_, first_text) = trace(&jaeger, &trace_id, |_| true).await;
    for marker in [PASSWORD, basic.as_str()] {
        assert!(
            !first_text.contains(marker) && !text.contains(marker),
            "a credential is in a span"
        );
        assert!(
            !service.log().contains(marker),
            "a credential is in the service log"
        );
    }
}
