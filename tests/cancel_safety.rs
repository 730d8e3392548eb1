//! A client that goes away while its request is being made durable (a gRPC deadline does
//! exactly this) leaves nothing half-made: the next Build of the same image works.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::*;
use image_builder::proto::builder as pb;
use image_builder::proto::ops;
use image_builder_testkit::{GitRepo, Service};
use tonic::Code;

/// A service whose `point` sleeps for 600 ms each time it is reached.
fn service_pausing_at(point: &str, name: &str) -> Service {
    let shared = shared();
    Service::start_with_env(
        binary(),
        config(shared.registry.addr(), name),
        &[("FAILPOINTS", &format!("{point}=sleep(600)"))],
    )
    .unwrap()
}

/// The call ended at its deadline: on the client's side (DeadlineExceeded) or the server's
/// (tonic answers Cancelled).
fn gave_up(status: Option<tonic::Status>) -> bool {
    status.is_some_and(|s| matches!(s.code(), Code::DeadlineExceeded | Code::Cancelled))
}

fn with_deadline<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(Duration::from_millis(100));
    request
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_whose_client_left_during_create_can_be_built_again() {
    let shared = shared();
    let service = service_pausing_at("submit.create", "cancel-safe-submit");
    let repo = GitRepo::new(&[(
        "Dockerfile",
        &format!("FROM {}\nRUN echo made-once\n", shared.base),
    )])
    .unwrap();
    let mut client = service.client().await.unwrap();
    let gone = client.build(with_deadline(head_build(&repo.uri()))).await;
    assert!(gave_up(gone.err()), "the client gave up");

    // Whether this joins the build the first request started or starts one of its own, it
    // ends well: never ABORTED "could not be recorded".
    let responses = build_all(&mut client, head_build(&repo.uri()))
        .await
        .unwrap();
    let last = responses.last().unwrap();
    assert_eq!(status(last), pb::BuildStatus::DoneSuccess, "{responses:?}");
    let list = client
        .list_builds(pb::ListBuildsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        list.builds.len(),
        1,
        "the first request's build was recorded and run, and the second joined it: {:?}",
        list.builds
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_whose_client_left_midway_still_runs_and_the_image_can_be_built_again() {
    let shared = shared();
    let service = service_pausing_at("retry.journal", "cancel-safe-retry");
    let repo = GitRepo::new(&[(
        "Dockerfile",
        &format!("FROM {}\nRUN echo failing && exit 3\n", shared.base),
    )])
    .unwrap();
    let mut client = service.client().await.unwrap();
    let responses = build_all(&mut client, head_build(&repo.uri()))
        .await
        .unwrap();
    assert_eq!(
        status(responses.last().unwrap()),
        pb::BuildStatus::DoneFailure
    );
    let id = build_id(&responses[0]);

    let mut ops = ops_client(&service).await;
    let gone = ops
        .retry_build(with_deadline(ops::RetryBuildRequest {
            build_id: id.clone(),
        }))
        .await;
    assert!(gave_up(gone.err()), "the client gave up");

    // The retry went on without its client: attempt 2 runs and fails as the first did.
    let mut journal = ops
        .journal(ops::JournalRequest {
            build_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    while journal.message().await.unwrap().is_some() {}
    let responses = build_all(&mut client, head_build(&repo.uri()))
        .await
        .unwrap();
    let last = responses.last().unwrap();
    assert_eq!(status(last), pb::BuildStatus::DoneFailure, "{responses:?}");
    let build = ops
        .get_build(ops::GetBuildRequest {
            build_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        build.attempt,
        2,
        "{build:?}\n{responses:?}\n{}",
        service.log()
    );
    assert_eq!(build.state, "failed");
}
