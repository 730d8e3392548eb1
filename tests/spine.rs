//! The spine end to end: the real binary against a real registry, checked with skopeo.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

mod common;

use common::*;
use image_builder::proto::builder as pb;
use image_builder_testkit::{self as testkit, BaseImage, LocalRegistry, Service};
use tonic::Code;

#[tokio::test]
async fn ref_build_succeeds_and_second_build_is_a_cache_hit() {
    let shared = shared();
    let service = service("cachehit");
    let mut client = service.client().await.unwrap();

    let first = build_all(&mut client, ref_build(&shared.base))
        .await
        .unwrap();
    assert!(first.len() >= 2, "{first:?}");
    assert_eq!(status(&first[0]), pb::BuildStatus::Running);
    let id = build_id(&first[0]);
    assert!(!id.is_empty(), "running carries the build id");
    let last = first.last().unwrap();
    assert_eq!(status(last), pb::BuildStatus::DoneSuccess, "{last:?}");
    assert_eq!(build_id(last), id);
    let base_digest = testkit::skopeo_inspect(&shared.base).unwrap()["Digest"].clone();
    assert_eq!(
        last.base_ref,
        format!(
            "{}/base/busybox@{}",
            shared.registry.addr(),
            base_digest.as_str().unwrap()
        )
    );
    assert!(
        last.r#ref
            .starts_with(&format!("{}/cachehit/workspace:", shared.registry.addr()))
    );

    // An independent client sees the workspace image, with the base image's content.
    let inspected = testkit::skopeo_inspect(&last.r#ref).unwrap();
    assert_eq!(inspected["Digest"], base_digest);

    let second = build_all(&mut client, ref_build(&shared.base))
        .await
        .unwrap();
    assert_eq!(second.len(), 1, "a cache hit answers at once: {second:?}");
    assert_eq!(status(&second[0]), pb::BuildStatus::DoneSuccess);
    assert_eq!(second[0].r#ref, last.r#ref);

    let log = String::from_utf8(logs_all(&mut client, &id).await.unwrap()).unwrap();
    assert!(log.contains("pushed manifest"), "{log}");

    assert_eq!(
        metric(&service, "gitpod_image_builder_builds_started_total").await,
        Some(1.0)
    );
    assert_eq!(
        metric(
            &service,
            "gitpod_image_builder_builds_done_total{success=\"true\"}"
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        metric(&service, "image_builder_cache_hits_total").await,
        Some(1.0)
    );
}

/// A cache hit of a reference resolved before asks its two questions at once: the workspace
/// image is looked up while the base's tag is still being resolved (held back here by the
/// proxy). The tag is still asked every time: once it moves, the next Build builds.
#[tokio::test]
async fn a_known_reference_asks_its_two_questions_at_once_and_a_moved_tag_is_built() {
    use image_builder_testkit::{Event, Fault, FaultKind, FaultProxy};

    let registry = LocalRegistry::start().unwrap();
    testkit::push_image(
        &BaseImage::busybox(0).unwrap(),
        registry.addr(),
        "base/busybox:1",
    )
    .unwrap();
    let proxy = FaultProxy::start(registry.addr()).await.unwrap();
    let service = Service::start(binary(), config(proxy.addr(), "early")).unwrap();
    let mut client = service.client().await.unwrap();
    let base = format!("{}/base/busybox:1", proxy.addr());
    let first = build_all(&mut client, ref_build(&base)).await.unwrap();
    let built = first.last().unwrap();
    assert_eq!(status(built), pb::BuildStatus::DoneSuccess, "{first:?}");

    let tag = "/v2/base/busybox/manifests/1";
    proxy.inject(Fault {
        path_contains: tag.into(),
        method: None,
        kind: FaultKind::Latency { ms: 1500 },
        times: Some(1),
    });
    let seen = proxy.events().len();
    let hit = build_all(&mut client, ref_build(&base)).await.unwrap();
    assert_eq!(hit.len(), 1, "a cache hit: {hit:?}");
    assert_eq!(hit[0].r#ref, built.r#ref);
    let events = proxy.events().split_off(seen);
    let workspace = format!(
        "/v2/early/workspace/manifests/{}",
        built.r#ref.rsplit_once(':').unwrap().1
    );
    let at = |wanted: &dyn Fn(&Event) -> bool| {
        events
            .iter()
            .position(wanted)
            .unwrap_or_else(|| panic!("not in {events:#?}"))
    };
    let looked_up = at(&|e| matches!(e, Event::Arrived(_, p) if *p == workspace));
    let resolved = at(&|e| matches!(e, Event::Answered(_, p) if p == tag));
    assert!(
        looked_up < resolved,
        "the workspace image was asked about while the tag was resolved: {events:#?}"
    );

    // The tag moves: the image of its last base exists, but the next Build builds.
    let moved = testkit::push_image(
        &BaseImage::busybox(1024).unwrap(),
        registry.addr(),
        "base/busybox:1",
    )
    .unwrap();
    let rebuilt = build_all(&mut client, ref_build(&base)).await.unwrap();
    assert_eq!(status(&rebuilt[0]), pb::BuildStatus::Running, "{rebuilt:?}");
    let last = rebuilt.last().unwrap();
    assert_eq!(status(last), pb::BuildStatus::DoneSuccess, "{rebuilt:?}");
    let moved_digest = testkit::skopeo_inspect(&moved).unwrap()["Digest"].clone();
    assert_eq!(
        last.base_ref.rsplit_once('@').unwrap().1,
        moved_digest.as_str().unwrap()
    );
    assert_ne!(last.r#ref, built.r#ref);
}

#[tokio::test]
async fn concurrent_builds_of_one_image_share_one_build() {
    let shared = shared();
    let service = service("dedup");
    let calls = (0..6).map(|_| {
        let url = service.grpc_url();
        let base = shared.base.clone();
        tokio::spawn(async move {
            let mut client = pb::image_builder_client::ImageBuilderClient::connect(url)
                .await
                .unwrap();
            build_all(&mut client, ref_build(&base)).await.unwrap()
        })
    });
    let mut ids = std::collections::BTreeSet::new();
    for call in calls.collect::<Vec<_>>() {
        let responses = call.await.unwrap();
        let last = responses.last().unwrap();
        assert_eq!(status(last), pb::BuildStatus::DoneSuccess, "{responses:?}");
        // A call may arrive after the image exists and be a cache hit (no id); every call that
        // saw a build saw the same one.
        if responses.len() > 1 {
            ids.insert(build_id(&responses[0]));
        }
    }
    assert_eq!(ids.len(), 1, "{ids:?}");
    let mut client = service.client().await.unwrap();
    let list = client
        .list_builds(pb::ListBuildsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        list.builds.len(),
        1,
        "one build executed: {:?}",
        list.builds
    );
    assert_eq!(
        metric(&service, "gitpod_image_builder_builds_started_total").await,
        Some(1.0)
    );
}

#[tokio::test]
async fn finished_builds_and_their_logs_survive_a_restart() {
    let shared = shared();
    let mut service = service("restart");
    let mut client = service.client().await.unwrap();
    let responses = build_all(&mut client, ref_build(&shared.base))
        .await
        .unwrap();
    let id = build_id(&responses[0]);
    let log_before = logs_all(&mut client, &id).await.unwrap();
    assert!(!log_before.is_empty());

    let exit = service.stop().expect("the service was running");
    assert!(
        exit.success(),
        "clean shutdown on SIGTERM: {exit}\n{}",
        service.log()
    );
    service.kill_and_restart().unwrap();
    let mut client = service.client().await.unwrap();
    let list = client
        .list_builds(pb::ListBuildsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.builds.len(), 1);
    let build = &list.builds[0];
    assert_eq!(build.build_id, id);
    assert_eq!(build.status, pb::BuildStatus::DoneSuccess as i32);
    assert_eq!(build.r#ref, responses.last().unwrap().r#ref);
    assert!(
        build.started_at > 1_700_000_000,
        "seconds since the epoch: {}",
        build.started_at
    );

    // A listener after the restart gets the same bytes, by id and by ref.
    assert_eq!(logs_all(&mut client, &id).await.unwrap(), log_before);
    let mut by_ref = client
        .logs(pb::LogsRequest {
            build_ref: build.r#ref.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut replay = Vec::new();
    while let Some(chunk) = by_ref.message().await.unwrap() {
        replay.extend(chunk.content);
    }
    assert_eq!(replay, log_before);
}

#[tokio::test]
async fn sigkill_in_the_middle_of_a_copy_resumes_under_the_same_build_id() {
    // The base image lives in another registry than the workspace repository, so the copy
    // streams every byte of a large layer, which keeps the window to kill in wide.
    let source = LocalRegistry::start().unwrap();
    let big = BaseImage::busybox(160 << 20).unwrap();
    let base = testkit::push_image(&big, source.addr(), "big/busybox:1").unwrap();
    let target = LocalRegistry::start().unwrap();
    let mut config = config(target.addr(), "resume");
    config["registry"]["insecure"] = serde_json::json!([source.addr(), target.addr()]);
    let mut service = Service::start(binary(), config).unwrap();
    let mut client = service.client().await.unwrap();

    let mut stream = client.build(ref_build(&base)).await.unwrap().into_inner();
    let running = stream.message().await.unwrap().unwrap();
    let id = build_id(&running);
    assert!(!id.is_empty());

    // Wait, on the journaled log, for the copy of the large blob to begin; then kill.
    let mut logs = follow_logs(&mut client, &id).await;
    let mut seen = String::new();
    while !seen
        .lines()
        .any(|l| l.contains("copying") && l.contains("bytes from"))
    {
        let chunk = logs
            .message()
            .await
            .unwrap()
            .expect("the log ended before the copy began");
        seen.push_str(&String::from_utf8_lossy(&chunk.content));
    }
    service.kill();
    assert!(
        stream.message().await.is_err(),
        "the stream breaks with the process"
    );

    service.kill_and_restart().unwrap();
    let mut client = service.client().await.unwrap();
    let log = String::from_utf8(logs_all(&mut client, &id).await.unwrap()).unwrap();
    assert!(
        log.starts_with(&seen),
        "the log before the crash is kept, byte for byte"
    );
    assert_eq!(
        log.matches(
            "image-builder restarted; resuming this build at its last recorded step (pushing)"
        )
        .count(),
        1,
        "{log}"
    );
    let list = client
        .list_builds(pb::ListBuildsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.builds.len(), 1, "{:?}", list.builds);
    assert_eq!(list.builds[0].build_id, id);
    assert_eq!(list.builds[0].status, pb::BuildStatus::DoneSuccess as i32);

    // A client coming back after the restart gets the finished image.
    let again = build_all(&mut client, ref_build(&base)).await.unwrap();
    assert_eq!(status(again.last().unwrap()), pb::BuildStatus::DoneSuccess);
    let inspected = testkit::skopeo_inspect(&list.builds[0].r#ref).unwrap();
    let base_digest = testkit::skopeo_inspect(&base).unwrap()["Digest"].clone();
    assert_eq!(inspected["Digest"], base_digest);
}

#[tokio::test]
async fn a_client_reconnecting_after_a_restart_joins_the_resumed_build() {
    let source = LocalRegistry::start().unwrap();
    let big = BaseImage::busybox(96 << 20).unwrap();
    let base = testkit::push_image(&big, source.addr(), "big/busybox:2").unwrap();
    let target = LocalRegistry::start().unwrap();
    let mut config = config(target.addr(), "rejoin");
    config["registry"]["insecure"] = serde_json::json!([source.addr(), target.addr()]);
    let mut service = Service::start(binary(), config).unwrap();
    let mut client = service.client().await.unwrap();
    let (_stream, id) = start_build(&mut client, ref_build(&base)).await;
    service.kill();

    service.kill_and_restart().unwrap();
    let mut client = service.client().await.unwrap();
    let responses = build_all(&mut client, ref_build(&base)).await.unwrap();
    let last = responses.last().unwrap();
    assert_eq!(status(last), pb::BuildStatus::DoneSuccess, "{responses:?}");
    if responses.len() > 1 {
        assert_eq!(build_id(&responses[0]), id, "joined the resumed build");
        assert!(
            responses[0].message.contains("joined"),
            "{:?}",
            responses[0].message
        );
    }
    let list = client
        .list_builds(pb::ListBuildsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.builds.len(), 1, "{:?}", list.builds);
    assert_eq!(list.builds[0].build_id, id);
}

#[tokio::test]
async fn bad_requests_get_precise_codes_and_resolve_calls_answer_as_mk3() {
    let shared = shared();
    let service = service("codes");
    let mut client = service.client().await.unwrap();

    let err = build_all(&mut client, pb::BuildRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("source"), "{}", err.message());

    let dockerfile = pb::BuildRequest {
        source: Some(pb::BuildSource {
            from: Some(pb::build_source::From::File(
                pb::BuildSourceDockerfile::default(),
            )),
        }),
        ..Default::default()
    };
    let err = build_all(&mut client, dockerfile).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    let missing = format!("{}/base/busybox:nope", shared.registry.addr());
    let err = build_all(&mut client, ref_build(&missing))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("busybox:nope"), "{}", err.message());

    let err = client
        .resolve_base_image(pb::ResolveBaseImageRequest {
            r#ref: "Not A Reference!".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    let resolved = client
        .resolve_base_image(pb::ResolveBaseImageRequest {
            r#ref: shared.base.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        resolved.r#ref.contains("/base/busybox@sha256:"),
        "{}",
        resolved.r#ref
    );

    let request = pb::ResolveWorkspaceImageRequest {
        source: Some(ref_source(&shared.base)),
        ..Default::default()
    };
    let before = client
        .resolve_workspace_image(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(before.status, pb::BuildStatus::Unknown as i32);
    assert_eq!(before.base_ref, resolved.r#ref);
    let built = build_all(&mut client, ref_build(&shared.base))
        .await
        .unwrap();
    assert_eq!(
        built.last().unwrap().r#ref,
        before.r#ref,
        "Build makes the ref Resolve announced"
    );
    let after = client
        .resolve_workspace_image(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.status, pb::BuildStatus::DoneSuccess as i32);

    for (build_id, code) in [
        ("0190b7a2-8c5e-7d3a-9f1e-2b4c6d8e0f12", Code::NotFound),
        ("not-an-id", Code::InvalidArgument),
        ("", Code::InvalidArgument),
    ] {
        let err = client
            .logs(pb::LogsRequest {
                build_id: build_id.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{build_id:?}: {err:?}");
    }
    let err = client
        .logs(pb::LogsRequest {
            build_ref: "127.0.0.1:1/nothing:here".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[test]
fn a_bad_config_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            r#"{"baseImageRepository":"r/b","workspaceImageRepository":"r/w","grpcAdress":"x"}"#,
            "grpcAdress",
        ),
        (
            r#"{"baseImageRepository":"r/b","workspaceImageRepository":"r/w","metricsAddress":"nope"}"#,
            "metricsAddress",
        ),
        (
            r#"{"baseImageRepository":"r/b"}"#,
            "workspaceImageRepository",
        ),
    ];
    for (text, key) in cases {
        let path = dir.path().join("config.json");
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(binary())
            .args(["run", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{text}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(key), "{text}: {stderr}");
    }
}
