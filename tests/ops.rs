//! The ops API and the CLI: inspect, cancel (also across a restart), retry, follow logs across
//! a restart, and read the store of a stopped service.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use image_builder::proto::builder as pb;
use image_builder::proto::ops;
use image_builder_testkit::{
    self as testkit, Fault, FaultKind, FaultProxy, GitRepo, LocalRegistry, Service,
};

/// `image-builder builds ARGS` against `service`, with its operator token.
fn cli(service: &Service, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(binary())
        .arg("builds")
        .args(args)
        .env("IMAGE_BUILDER_ADDRESS", addr(service))
        .envs(service.client_options().env())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn addr(service: &Service) -> String {
    service.grpc_address().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_stops_the_builder_and_ends_the_build_for_every_client() {
    let shared = shared();
    let repo = GitRepo::new(&[(
        "Dockerfile",
        &format!("FROM {}\nRUN echo sleeping-now && sleep 313\n", shared.base),
    )])
    .unwrap();
    let service = service("ops-cancel");
    let mut client = service.client().await.unwrap();
    let (mut first, id) = start_build(&mut client, head_build(&repo.uri())).await;
    let joined = {
        let mut client = service.client().await.unwrap();
        let request = head_build(&repo.uri());
        tokio::spawn(async move { build_all(&mut client, request).await.unwrap() })
    };
    wait_for_log(&mut client, &id, "sleeping-now\n").await;
    assert!(!processes_with("sleep 313").is_empty());

    let (ok, stdout, stderr) = cli(&service, &["cancel", &id, "--reason", "operator says stop"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("including 1 that joined it"), "{stdout}");

    let mut last = None;
    while let Some(r) = first.message().await.unwrap() {
        last = Some(r);
    }
    let last = last.unwrap();
    assert_eq!(status(&last), pb::BuildStatus::DoneFailure);
    assert!(
        last.message.contains("build cancelled: operator says stop"),
        "{}",
        last.message
    );
    let joined = joined.await.unwrap();
    assert_eq!(build_id(&joined[0]), id);
    assert_eq!(
        status(joined.last().unwrap()),
        pb::BuildStatus::DoneFailure,
        "the joined client hears it too"
    );
    assert!(
        processes_with("sleep 313").is_empty(),
        "the builder was stopped"
    );
    assert!(
        !service.data_dir().join("work").join(&id).exists(),
        "the work directory is gone"
    );

    let (ok, stdout, _) = cli(&service, &["show", &id, "--output", "json"]);
    assert!(ok);
    let shown: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(shown["state"], "cancelled");
    assert_eq!(shown["failure"], "operator says stop");
    assert_eq!(shown["requests"][0]["action"], "cancel");
    assert_eq!(
        shown["requests"][0]["identity"], "operator token",
        "who asked is journaled: the identity, never the token"
    );
    let (ok, _, stderr) = cli(&service, &["cancel", &id]);
    assert!(
        !ok && stderr.contains("FailedPrecondition") && stderr.contains("nothing to cancel"),
        "{stderr}"
    );
    let (ok, watched, _) = cli(&service, &["watch", &id]);
    assert!(
        ok && watched.contains(&format!("build {id} ended cancelled: operator says stop")),
        "{watched}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_interrupted_by_a_crash_still_ends_cancelled() {
    let shared = shared();
    let repo = GitRepo::new(&[(
        "Dockerfile",
        &format!("FROM {}\nRUN echo hi\n", shared.base),
    )])
    .unwrap();
    let mut service = Service::start_with_env(
        binary(),
        config(shared.registry.addr(), "ops-cancel-crash"),
        &[("FAILPOINTS", "transition.resolved.after=pause")],
    )
    .unwrap();
    let mut client = service.client().await.unwrap();
    let (_stream, id) = start_build(&mut client, head_build(&repo.uri())).await;
    wait_for_service_log(
        &service,
        "failpoint reached failpoint=transition.resolved.after",
    )
    .await;
    let mut ops = ops_client(&service).await;
    ops.cancel_build(ops::CancelBuildRequest {
        build_id: id.clone(),
        reason: "halt".into(),
    })
    .await
    .unwrap();
    service.kill();
    service.set_env(&[]);
    service.kill_and_restart().unwrap();
    let mut ops = ops_client(&service).await;
    let mut journal = ops
        .journal(ops::JournalRequest {
            build_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut last_state = String::new();
    while let Some(record) = journal.message().await.unwrap() {
        last_state = record.state;
    }
    assert_eq!(last_state, "cancelled");
    let build = ops
        .get_build(ops::GetBuildRequest { build_id: id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(build.state, "cancelled");
    assert_eq!(build.failure, "halt");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_that_failed_on_a_transient_fault_succeeds_when_retried() {
    let registry = LocalRegistry::start().unwrap();
    let proxy = FaultProxy::start(registry.addr()).await.unwrap();
    let base = testkit::push_image(
        &testkit::BaseImage::busybox(0).unwrap(),
        registry.addr(),
        "base/busybox:1",
    )
    .unwrap();
    let via = format!("{}/base/busybox:1", proxy.addr());
    let _ = base;
    let mut config = config(proxy.addr(), "ops-retry");
    config["registry"]["retryBudget"] = "2s".into();
    let service = Service::start(binary(), config).unwrap();
    let mut client = service.client().await.unwrap();
    proxy.inject(Fault {
        path_contains: "/ops-retry/workspace/blobs/".into(),
        method: None,
        kind: FaultKind::Status {
            code: 503,
            retry_after: None,
        },
        times: None,
    });
    let failed = build_all(&mut client, ref_build(&via)).await.unwrap();
    let id = build_id(&failed[0]);
    assert_eq!(status(failed.last().unwrap()), pb::BuildStatus::DoneFailure);
    let first_log = String::from_utf8(logs_all(&mut client, &id).await.unwrap()).unwrap();
    proxy.clear();

    let (ok, stdout, stderr) = cli(&service, &["retry", &id]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("attempt 2"), "{stdout}");
    let log = String::from_utf8(logs_all(&mut client, &id).await.unwrap()).unwrap();
    assert!(
        log.starts_with(&first_log),
        "the first attempt's log is kept"
    );
    assert!(log.contains("==== attempt 2 of build"), "{log}");
    let mut ops = ops_client(&service).await;
    let build = ops
        .get_build(ops::GetBuildRequest {
            build_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((build.state.as_str(), build.attempt), ("done", 2));
    let asked: Vec<(&str, &str)> = build
        .requests
        .iter()
        .map(|r| (r.action.as_str(), r.identity.as_str()))
        .collect();
    assert_eq!(
        asked,
        [("retry", "operator token")],
        "who asked is journaled"
    );
    let list = client
        .list_builds(pb::ListBuildsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.builds.len(), 1, "the same build, not a new one");
    let (ok, _, stderr) = cli(&service, &["retry", &id]);
    assert!(
        !ok && stderr.contains("only a failed or cancelled build"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_follow_survives_a_restart_and_the_store_reads_offline() {
    let shared = shared();
    let repo = GitRepo::new(&[(
        "Dockerfile",
        &format!(
            "FROM {}\nRUN for i in $(seq 1 40); do echo tick-$i; sleep 0.1; done\n",
            shared.base
        ),
    )])
    .unwrap();
    let port = testkit::free_port().unwrap();
    let mut config = config(shared.registry.addr(), "ops-follow");
    config["grpcAddress"] = format!("127.0.0.1:{port}").into();
    let mut service = Service::start(binary(), config).unwrap();
    let mut client = service.client().await.unwrap();
    let (_stream, id) = start_build(&mut client, head_build(&repo.uri())).await;
    let follower = Command::new(binary())
        .args([
            "builds",
            "logs",
            "--follow",
            &id,
            "--address",
            &format!("127.0.0.1:{port}"),
        ])
        .envs(service.client_options().env())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_log(&mut client, &id, "tick-10\n").await;
    service.kill();
    service.kill_and_restart().unwrap();
    let out = tokio::task::spawn_blocking(move || follower.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(out.status.success());
    let followed = String::from_utf8(out.stdout).unwrap();
    let mut client = service.client().await.unwrap();
    let full = String::from_utf8(logs_all(&mut client, &id).await.unwrap()).unwrap();
    assert_eq!(followed, full, "the follower got every byte once");
    let ticks = full.lines().filter(|l| l.starts_with("tick-")).count();
    assert!(ticks >= 40, "{full}");

    let (ok, stdout, _) = cli(&service, &["list", "--state", "done", "--output", "json"]);
    assert!(ok);
    let listed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(listed[0]["build_id"], id.as_str());

    service.stop();
    let data_dir = service.data_dir();
    let run = |args: &[&str]| {
        let out = Command::new(binary())
            .arg("store")
            .args(args)
            .arg("--data-dir")
            .arg(&data_dir)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, listing) = run(&["inspect"]);
    assert!(
        ok && listing.contains(&id) && listing.contains("done"),
        "{listing}"
    );
    let (ok, journal) = run(&["inspect", &id]);
    assert!(
        ok && journal.contains("tick-40") && journal.contains("=> done"),
        "{journal}"
    );
    let (ok, report) = run(&["check"]);
    assert!(ok && report.contains("0 problems"), "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_removes_old_builds_while_new_ones_run() {
    let shared = shared();
    let mut config = config(shared.registry.addr(), "ops-retention");
    config["builds"]["retention"] = "2s".into();
    let service = Service::start(binary(), config).unwrap();
    let mut client = service.client().await.unwrap();
    let old = build_all(&mut client, ref_build(&shared.base))
        .await
        .unwrap();
    let old_id = build_id(&old[0]);
    let repo = GitRepo::new(&[(
        "Dockerfile",
        &format!("FROM {}\nRUN echo long && sleep 4\n", shared.base),
    )])
    .unwrap();
    let (mut running, running_id) = start_build(&mut client, head_build(&repo.uri())).await;
    let mut gone = false;
    for _ in 0..200 {
        let list = client
            .list_builds(pb::ListBuildsRequest {})
            .await
            .unwrap()
            .into_inner();
        if !list.builds.iter().any(|b| b.build_id == old_id) {
            assert!(
                list.builds.iter().any(|b| b.build_id == running_id),
                "the running build stays"
            );
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "the old build was removed");
    let err = client
        .logs(pb::LogsRequest {
            build_id: old_id,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "its log went with it");
    let mut last = None;
    while let Some(r) = running.message().await.unwrap() {
        last = Some(r);
    }
    assert_eq!(
        status(&last.unwrap()),
        pb::BuildStatus::DoneSuccess,
        "the running build was not held up"
    );
}

/// Flips one byte in sled's file at `needle`'s first occurrence.
fn flip_at(db: &std::path::Path, needle: &[u8]) {
    let mut bytes = std::fs::read(db).unwrap();
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("the key is in sled's file");
    bytes[at + 2] ^= 0x20;
    std::fs::write(db, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flipped_byte_in_the_store_loses_no_build_silently() {
    let shared = shared();
    let mut service = service("ops-damage");
    let mut client = service.client().await.unwrap();
    let whole = build_all(&mut client, ref_build(&shared.base))
        .await
        .unwrap();
    let whole = build_id(&whole[0]);
    // A clean stop checkpoints: `whole` is in sled's file before what follows.
    service.stop();
    service.kill_and_restart().unwrap();
    let client = service.client().await.unwrap();
    let mut ops = ops_client(&service).await;
    let dockerfile_build = |word: &'static str| {
        let repo = GitRepo::new(&[(
            "Dockerfile",
            &format!("FROM {}\nRUN echo {word}-output\n", shared.base),
        )])
        .unwrap();
        let request = head_build(&repo.uri());
        let mut client = client.clone();
        async move {
            let all = build_all(&mut client, request).await.unwrap();
            assert_eq!(status(all.last().unwrap()), pb::BuildStatus::DoneSuccess);
            (build_id(&all[0]), repo)
        }
    };
    let (cut, _cut_repo) = dockerfile_build("cut").await;
    let (lost, _lost_repo) = dockerfile_build("lost").await;
    let get = |ops: &mut ops::build_ops_client::BuildOpsClient<_>, id: &str| {
        let mut ops = ops.clone();
        let id = id.to_owned();
        async move {
            ops.get_build(ops::GetBuildRequest { build_id: id })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let cut_before = get(&mut ops, &cut).await;
    // A clean stop checkpoints the write-ahead log into sled's file (after a kill the newest
    // records would still be in the log too, and come back from there).
    service.stop();

    // The damaged byte is in the record that ended `cut`: sled will drop it and everything
    // written after it (all of `lost`) when it reopens, and say nothing.
    let cut_id: image_builder_state::BuildId = cut.parse().unwrap();
    let mut key = cut_id.as_bytes().to_vec();
    key.extend_from_slice(&(cut_before.records - 1).to_be_bytes());
    flip_at(&service.data_dir().join("store").join("db"), &key);

    service.kill_and_restart().unwrap();
    wait_for_service_log(&service, "image-builder serving").await;
    assert!(
        service.log().contains("2 builds in the store are damaged"),
        "{}",
        service.log()
    );
    let mut client = service.client().await.unwrap();
    let mut ops = ops_client(&service).await;

    let (ok, stdout, stderr) = cli(
        &service,
        &["list", "--state", "damaged", "--output", "json"],
    );
    assert!(ok, "{stderr}");
    let listed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let listed: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["build_id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [lost.as_str(), cut.as_str()], "newest first");

    let lost_now = get(&mut ops, &lost).await;
    assert_eq!(lost_now.state, "damaged");
    assert!(
        lost_now.failure.contains("lost all of its records"),
        "{}",
        lost_now.failure
    );
    let cut_now = get(&mut ops, &cut).await;
    assert_eq!(cut_now.state, "damaged");
    assert_eq!(
        cut_now.workspace_ref, cut_before.workspace_ref,
        "what is readable is shown"
    );
    assert!(
        cut_now.failure.contains("lost records"),
        "{}",
        cut_now.failure
    );
    assert_eq!(get(&mut ops, &whole).await.state, "done");

    // The log of the cut build is served whole up to the damage, then DataLoss.
    let mut stream = follow_logs(&mut client, &cut).await;
    let mut log = Vec::new();
    let end = loop {
        match stream.message().await {
            Ok(Some(chunk)) => log.extend_from_slice(&chunk.content),
            Ok(None) => break None,
            Err(status) => break Some(status),
        }
    };
    let end = end.expect("the stream ends with an error, not as if the log were whole");
    assert_eq!(end.code(), tonic::Code::DataLoss, "{end:?}");
    assert!(end.message().contains(&cut), "{}", end.message());
    assert!(String::from_utf8_lossy(&log).contains("cut-output"));
    let lost_logs = logs_all(&mut client, &lost).await.unwrap_err();
    assert_eq!(lost_logs.code(), tonic::Code::DataLoss, "{lost_logs:?}");
    let retry = ops
        .retry_build(ops::RetryBuildRequest {
            build_id: cut.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(retry.code(), tonic::Code::DataLoss, "{retry:?}");

    // The service goes on building.
    let again = build_all(&mut client, ref_build(&shared.base))
        .await
        .unwrap();
    assert_eq!(status(again.last().unwrap()), pb::BuildStatus::DoneSuccess);

    // `store check` on the stopped service names both and fails.
    let check = |data_dir: &std::path::Path| {
        Command::new(binary())
            .args(["store", "check", "--data-dir"])
            .arg(data_dir)
            .output()
            .unwrap()
    };
    let running = check(&service.data_dir());
    assert!(!running.status.success());
    assert!(
        String::from_utf8_lossy(&running.stderr).contains("is the service still running"),
        "{}",
        String::from_utf8_lossy(&running.stderr)
    );
    service.stop();
    let report = check(&service.data_dir());
    let stdout = String::from_utf8_lossy(&report.stdout);
    assert!(!report.status.success(), "{stdout}");
    for id in [&cut, &lost] {
        assert!(stdout.contains(&format!("build {id}: damaged")), "{stdout}");
    }
    assert!(!stdout.contains(&whole), "{stdout}");
}
