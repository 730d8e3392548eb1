//! Logs for every listener: attached before, during and after the build, after a restart, a
//! slow one and one that reconnects from its offset all receive the same bytes, in order, with
//! no gap and no duplicate; the slow one, which stops reading after its first message while
//! a log many times the HTTP/2 window goes by, holds up neither the build nor the others.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

mod common;

use common::*;
use image_builder::api::image_builder::LOG_OFFSET_METADATA;
use image_builder::proto::builder as pb;
use image_builder_testkit::{GitRepo, Service};
use tokio_stream::StreamExt;
use tonic::Request;

/// Lines written at a pace (listeners attach while they come), then the rest at once.
const PACED_TICKS: usize = 300;
const TICKS: usize = 3_000_000;
/// The log is at least this long: many times any HTTP/2 window between the service and a
/// client (hyper's stream and connection windows are a few MiB at most), so a listener that
/// stops reading would hold the service's writes up if anything waited for it.
const LOG_AT_LEAST: usize = 32 << 20;
/// Longer than the build and every listener need; past it the test fails rather than hangs.
const PATIENCE: std::time::Duration = std::time::Duration::from_secs(600);

#[tokio::test(flavor = "multi_thread")]
async fn every_listener_gets_the_same_bytes() {
    let shared = shared();
    let run = format!(
        "for i in $(seq 1 {PACED_TICKS}); do echo tick-$i; if [ $((i % 50)) = 0 ]; then sleep 0.3; fi; done; \
         seq {} {TICKS} | sed 's/^/tick-/'",
        PACED_TICKS + 1
    );
    let repo =
        GitRepo::new(&[("Dockerfile", &format!("FROM {}\nRUN {run}\n", shared.base))]).unwrap();
    let mut config = config(shared.registry.addr(), "listeners");
    config["builds"]["maxLogBytes"] = (64u64 << 20).into();
    let mut service = Service::start(binary(), config).unwrap();
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
    // Slow: attached now, reads its first message and then nothing until every other
    // listener is done.
    let mut slow = logs(&mut client, None).await;
    let slow_first = slow.message().await.unwrap().unwrap().content;
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

    // The build finishes, and the other listeners read the whole log, while the slow
    // listener reads nothing.
    let finished = tokio::time::timeout(PATIENCE, async {
        let mut last = None;
        while let Some(r) = build.message().await.unwrap() {
            last = Some(r);
        }
        last.unwrap()
    })
    .await
    .expect("the build finishes while a listener does not read");
    assert_eq!(status(&finished), pb::BuildStatus::DoneSuccess);
    let after = collect(logs(&mut client, None).await).await;
    assert!(
        after.len() >= LOG_AT_LEAST,
        "the log is {} bytes, not many times an HTTP/2 window",
        after.len()
    );
    let (before, during, reconnecting) = tokio::time::timeout(PATIENCE, async {
        (
            before.await.unwrap(),
            during.await.unwrap(),
            reconnecting.await.unwrap(),
        )
    })
    .await
    .expect("the other listeners finish while a listener does not read");
    let mut slow_all = slow_first;
    slow_all.extend(collect(slow).await);
    service.kill_and_restart().unwrap();
    let mut client = service.client().await.unwrap();
    let after_restart = collect(logs(&mut client, None).await).await;

    let text = String::from_utf8(after.clone()).unwrap();
    let ticks = text.lines().filter(|l| l.starts_with("tick-"));
    let mut expected = (1..=TICKS).map(|i| format!("tick-{i}"));
    for (n, tick) in ticks.enumerate() {
        assert_eq!(
            Some(tick),
            expected.next().as_deref(),
            "line {n}: every line once, in order"
        );
    }
    assert_eq!(expected.next(), None, "every line is in the log");
    for (name, got) in [
        ("before", before),
        ("during", during),
        ("slow", slow_all),
        ("reconnecting", reconnecting),
        ("after restart", after_restart),
    ] {
        if got != after {
            let same = got.iter().zip(&after).take_while(|(a, b)| a == b).count();
            panic!(
                "{name} listener differs from the log ({} bytes against {}) from byte {same}: {:?}",
                got.len(),
                after.len(),
                String::from_utf8_lossy(&got[same..got.len().min(same + 200)])
            );
        }
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
