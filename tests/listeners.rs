//! Logs for every listener: attached before, during and after the build, after a restart, a
//! slow one and one that reconnects from its offset all receive the same bytes, in order, with
//! no gap and no duplicate; the slow one holds up nobody.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

mod common;

use common::*;
use image_builder::api::image_builder::LOG_OFFSET_METADATA;
use image_builder::proto::builder as pb;
use image_builder_testkit::GitRepo;
use tokio_stream::StreamExt;
use tonic::Request;

const TICKS: usize = 300;

#[tokio::test(flavor = "multi_thread")]
async fn every_listener_gets_the_same_bytes() {
    let shared = shared();
    let run = format!(
        "for i in $(seq 1 {TICKS}); do echo tick-$i; if [ $((i % 50)) = 0 ]; then sleep 0.3; fi; done"
    );
    let repo =
        GitRepo::new(&[("Dockerfile", &format!("FROM {}\nRUN {run}\n", shared.base))]).unwrap();
    let mut service = service("listeners");
    let mut client = service.client().await.unwrap();
    let (mut build, id) = start_build(&mut client, head_build(&repo.uri())).await;
    let logs = |client: &mut pb::image_builder_client::ImageBuilderClient<_>,
                offset: Option<u64>| {
        let mut request = Request::new(pb::LogsRequest {
            build_id: id.clone(),
            ..Default::default()
        });
        if let Some(offset) = offset {
            request
                .metadata_mut()
                .insert(LOG_OFFSET_METADATA, offset.to_string().parse().unwrap());
        }
        let mut client = client.clone();
        async move { client.logs(request).await.unwrap().into_inner() }
    };

    // Before: attached right after the build started, read to the end in a task.
    let before = {
        let stream = logs(&mut client, None).await;
        tokio::spawn(async move { collect(stream).await })
    };
    // Slow: attached now, read nothing until the build is over.
    let slow = logs(&mut client, None).await;
    // Reconnecting: reads until tick-20, drops the stream, comes back from its offset.
    let reconnecting = {
        let mut stream = logs(&mut client, None).await;
        let mut first = Vec::new();
        while !String::from_utf8_lossy(&first).contains("tick-20\n") {
            first.extend(stream.message().await.unwrap().unwrap().content);
        }
        drop(stream);
        let rest = logs(&mut client, Some(first.len() as u64)).await;
        tokio::spawn(async move {
            first.extend(collect(rest).await);
            first
        })
    };
    // During: attached once the build is under way.
    let during = {
        let stream = logs(&mut client, None).await;
        tokio::spawn(async move { collect(stream).await })
    };

    // The build finishes although the slow listener has not read a byte.
    let mut last = None;
    while let Some(r) = build.message().await.unwrap() {
        last = Some(r);
    }
    assert_eq!(status(&last.unwrap()), pb::BuildStatus::DoneSuccess);

    let after = collect(logs(&mut client, None).await).await;
    let slow = collect(slow).await;
    service.kill_and_restart().unwrap();
    let mut client = service.client().await.unwrap();
    let after_restart = collect(logs(&mut client, None).await).await;

    let text = String::from_utf8(after.clone()).unwrap();
    let ticks: Vec<&str> = text.lines().filter(|l| l.starts_with("tick-")).collect();
    let expected: Vec<String> = (1..=TICKS).map(|i| format!("tick-{i}")).collect();
    assert_eq!(ticks, expected, "every line once, in order");
    for (name, got) in [
        ("before", before.await.unwrap()),
        ("during", during.await.unwrap()),
        ("slow", slow),
        ("reconnecting", reconnecting.await.unwrap()),
        ("after restart", after_restart),
    ] {
        assert!(
            got == after,
            "{name} listener differs from the log:\n{}",
            String::from_utf8_lossy(&got)
        );
    }

    let mut request = Request::new(pb::LogsRequest {
        build_id: id.clone(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert(LOG_OFFSET_METADATA, "minus-one".parse().unwrap());
    let err = client.logs(request).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

async fn collect(stream: tonic::Streaming<pb::LogsResponse>) -> Vec<u8> {
    let chunks: Vec<_> = stream.map(|c| c.unwrap().content).collect().await;
    chunks.concat()
}
