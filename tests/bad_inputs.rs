//! A catalogue of malformed and hostile requests against the real service: each gets its
//! exact status code and a bounded message a person can act on, and the service builds
//! normally afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

mod common;

use common::*;
use image_builder::api::image_builder::LOG_OFFSET_METADATA;
use image_builder::proto::builder as pb;
use image_builder::proto::builder::image_builder_client::ImageBuilderClient;
use image_builder::proto::contentservice::CloneTargetMode;
use image_builder_testkit::{GitRepo, Service};
use tonic::Code;
use tonic::transport::Channel;

/// Longest message a refusal may carry (the service caps echoed input at 200 characters).
const MAX_MESSAGE: usize = 1200;

async fn refused(
    client: &mut ImageBuilderClient<Channel>,
    request: pb::BuildRequest,
) -> tonic::Status {
    match client.build(request).await {
        Ok(mut stream) => match stream.get_mut().message().await {
            Ok(first) => panic!("accepted: {first:?}"),
            Err(status) => status,
        },
        Err(status) => status,
    }
}

/// Awaits a call that must be refused as [`assert_refused`] says.
async fn expect_refused<T: std::fmt::Debug>(
    call: impl std::future::Future<Output = Result<T, tonic::Status>>,
    code: Code,
    words: &str,
    case: &str,
) {
    let refusal = call.await.expect_err(case);
    assert_refused(&refusal, code, words, case);
}

fn assert_refused(status: &tonic::Status, code: Code, words: &str, case: &str) {
    assert_eq!(status.code(), code, "{case}: {status:?}");
    assert!(
        status.message().len() <= MAX_MESSAGE,
        "{case}: a message of {} bytes",
        status.message().len()
    );
    assert!(
        status.message().contains(words),
        "{case}: {words:?} not in {:?}",
        status.message()
    );
}

fn branch_build(uri: &str, branch: &str) -> pb::BuildRequest {
    dockerfile_build(
        uri,
        CloneTargetMode::RemoteBranch,
        branch,
        "Dockerfile",
        ".",
    )
}

fn commit_build(uri: &str, commit: &str) -> pb::BuildRequest {
    dockerfile_build(
        uri,
        CloneTargetMode::RemoteCommit,
        commit,
        "Dockerfile",
        ".",
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn every_bad_request_gets_its_code_and_a_bounded_message_and_the_service_still_builds() {
    let shared = shared();
    let repo = GitRepo::new(&[
        (
            "Dockerfile",
            &format!("FROM {}\nRUN echo still-building\n", shared.base),
        ),
        ("sub/file", "x"),
    ])
    .unwrap();
    repo.commit_symlink("escape", "/etc").unwrap();
    let uri = repo.uri();
    let service = service("bad-inputs");
    let mut client = service.client().await.unwrap();
    let huge = "a".repeat(1 << 20);
    let long_tag = format!("alpine:{}", "t".repeat(10_000));

    let cases: Vec<(&str, pb::BuildRequest, Code, &str)> = vec![
        (
            "no source",
            pb::BuildRequest::default(),
            Code::InvalidArgument,
            "source is required",
        ),
        (
            "empty ref",
            ref_build("  "),
            Code::InvalidArgument,
            "is empty",
        ),
        ("ref ::", ref_build("::"), Code::InvalidArgument, "::"),
        (
            "NUL in ref",
            ref_build("alpine\0:latest"),
            Code::InvalidArgument,
            "control character",
        ),
        (
            "10k-char tag",
            ref_build(&long_tag),
            Code::InvalidArgument,
            "at most 512",
        ),
        (
            "1 MiB ref",
            ref_build(&huge),
            Code::InvalidArgument,
            "at most 512",
        ),
        (
            "dockerfile outside the checkout",
            dockerfile_build(&uri, CloneTargetMode::RemoteHead, "", "../Dockerfile", "."),
            Code::InvalidArgument,
            "dockerfile_path",
        ),
        (
            "absolute context",
            dockerfile_build(&uri, CloneTargetMode::RemoteHead, "", "Dockerfile", "/etc"),
            Code::InvalidArgument,
            "context_path",
        ),
        (
            "ext:: remote",
            head_build("ext::sh -c touch% /tmp/pwned"),
            Code::InvalidArgument,
            "remote helpers",
        ),
        (
            "remote as an option",
            head_build("--upload-pack=touch /tmp/pwned"),
            Code::InvalidArgument,
            "option",
        ),
        (
            "branch as an option",
            branch_build(&uri, "--upload-pack=touch /tmp/pwned"),
            Code::InvalidArgument,
            "not a branch name",
        ),
        (
            "branch with ..",
            branch_build(&uri, "main/../x"),
            Code::InvalidArgument,
            "not a branch name",
        ),
        (
            "commit as an option",
            commit_build(&uri, "--orphan=x"),
            Code::InvalidArgument,
            "not a commit",
        ),
    ];
    for (case, request, code, words) in cases {
        let refusal = refused(&mut client, request).await;
        assert_refused(&refusal, code, words, case);
    }

    // A symlink out of the checkout passes the request checks and fails the build, saying so.
    let escaped = build_all(
        &mut client,
        dockerfile_build(
            &uri,
            CloneTargetMode::RemoteHead,
            "",
            "Dockerfile",
            "escape",
        ),
    )
    .await
    .unwrap();
    let last = escaped.last().unwrap();
    assert_eq!(status(last), pb::BuildStatus::DoneFailure);
    assert!(last.message.contains("escape"), "{}", last.message);

    // Too many hosts in any_of.
    let mut request = ref_build(&shared.base);
    request.auth = Some(pb::BuildRegistryAuth {
        mode: Some(pb::build_registry_auth::Mode::Selective(
            pb::BuildRegistryAuthSelective {
                any_of: (0..10_000).map(|i| format!("host{i}.example")).collect(),
                ..Default::default()
            },
        )),
        ..Default::default()
    });
    let refusal = refused(&mut client, request).await;
    assert_refused(
        &refusal,
        Code::InvalidArgument,
        "at most 64",
        "10k any_of hosts",
    );

    // ResolveBaseImage bounds its ref too.
    expect_refused(
        client.resolve_base_image(pb::ResolveBaseImageRequest {
            r#ref: huge.clone(),
            ..Default::default()
        }),
        Code::InvalidArgument,
        "at most 512",
        "ResolveBaseImage 1 MiB",
    )
    .await;

    // Logs: a malformed id, an unknown one, a bad offset.
    let logs = |build_id: &str| pb::LogsRequest {
        build_id: build_id.into(),
        ..Default::default()
    };
    expect_refused(
        client.logs(logs(&huge)),
        Code::InvalidArgument,
        "not a build id",
        "Logs 1 MiB id",
    )
    .await;
    expect_refused(
        client.logs(logs("0190b7a2-8c5e-7d3a-9f1e-2b4c6d8e0f12")),
        Code::NotFound,
        "does not exist",
        "Logs unknown id",
    )
    .await;
    let mut request = tonic::Request::new(logs("0190b7a2-8c5e-7d3a-9f1e-2b4c6d8e0f12"));
    request
        .metadata_mut()
        .insert(LOG_OFFSET_METADATA, "x".repeat(4000).parse().unwrap());
    expect_refused(
        client.logs(request),
        Code::InvalidArgument,
        "byte offset",
        "Logs offset",
    )
    .await;

    // The ops API bounds what it echoes as well: a 1 MiB state filter, page token, workspace
    // ref filter, build id and cancel reason.
    let mut ops = ops_client(&service).await;
    use image_builder::proto::ops;
    expect_refused(
        ops.list_builds(ops::ListBuildsRequest {
            states: vec![huge.clone()],
            ..Default::default()
        }),
        Code::InvalidArgument,
        "is not a state",
        "ops ListBuilds 1 MiB state",
    )
    .await;
    expect_refused(
        ops.list_builds(ops::ListBuildsRequest {
            page_token: huge.clone(),
            ..Default::default()
        }),
        Code::InvalidArgument,
        "page_token",
        "ops ListBuilds 1 MiB page token",
    )
    .await;
    let listed = ops
        .list_builds(ops::ListBuildsRequest {
            workspace_ref: huge.clone(),
            ..Default::default()
        })
        .await;
    match listed {
        Ok(page) => assert!(page.get_ref().builds.is_empty(), "{page:?}"),
        Err(refusal) => assert!(
            refusal.message().len() <= MAX_MESSAGE,
            "ops ListBuilds 1 MiB workspace ref: {} bytes",
            refusal.message().len()
        ),
    }
    expect_refused(
        ops.get_build(ops::GetBuildRequest {
            build_id: huge.clone(),
        }),
        Code::InvalidArgument,
        "not a build id",
        "ops GetBuild 1 MiB id",
    )
    .await;
    let refusal = ops
        .cancel_build(ops::CancelBuildRequest {
            build_id: "0190b7a2-8c5e-7d3a-9f1e-2b4c6d8e0f12".into(),
            reason: huge.clone(),
        })
        .await
        .unwrap_err();
    assert!(
        refusal.message().len() <= MAX_MESSAGE
            && matches!(refusal.code(), Code::InvalidArgument | Code::NotFound),
        "ops CancelBuild 1 MiB reason: {:?} with {} bytes",
        refusal.code(),
        refusal.message().len()
    );

    // And the service still builds.
    let responses = build_all(&mut client, head_build(&uri)).await.unwrap();
    let last = responses.last().unwrap();
    assert_eq!(status(last), pb::BuildStatus::DoneSuccess, "{last:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn repositories_on_the_service_machine_are_refused_unless_the_config_allows_them() {
    let shared = shared();
    let repo = GitRepo::new(&[(
        "Dockerfile",
        &format!("FROM {}\nRUN echo local\n", shared.base),
    )])
    .unwrap();
    let mut config = config(shared.registry.addr(), "bad-inputs-local");
    config["builds"]
        .as_object_mut()
        .unwrap()
        .remove("allowLocalRepositories");
    let service = Service::start(binary(), config).unwrap();
    let mut client = service.client().await.unwrap();
    let path = repo.path().display().to_string();
    for uri in [repo.uri(), path, "/nonexistent/secret/place".to_owned()] {
        let refusal = refused(&mut client, head_build(&uri)).await;
        assert_refused(
            &refusal,
            Code::InvalidArgument,
            "builds.allowLocalRepositories",
            &uri,
        );
    }
}
