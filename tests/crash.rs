//! Crash anywhere, lose nothing: the service is killed with SIGKILL in each working state of a
//! Dockerfile build, restarted, and each build ends as it would have without the crash, under
//! the same build id, with one line in its log saying it was resumed.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

mod common;

use common::*;
use image_builder::proto::builder as pb;
use image_builder_testkit::{self as testkit, BaseImage, GitRepo, LocalRegistry, Service};

const RESUMED: &str = "image-builder restarted; resuming this build at its last recorded step";

fn repo(base: &str, run: &str) -> GitRepo {
    GitRepo::new(&[
        (
            "Dockerfile",
            &format!("FROM {base}\nRUN {run} && echo ran > /ran.txt\n"),
        ),
        ("README", "context\n"),
    ])
    .unwrap()
}

/// After the restart: the build ends done_success under `id`, alone, resumed once from
/// `phase`, and its image has the file its RUN step wrote.
async fn assert_resumed_to_success(
    service: &mut Service,
    id: &str,
    phase: &str,
    rejoin: Option<pb::BuildRequest>,
) -> String {
    service.set_env(&[]);
    service.kill_and_restart().unwrap();
    let mut client = service.client().await.unwrap();
    if let Some(request) = rejoin {
        // A client coming back while the resumed build runs joins it.
        let responses = build_all(&mut client, request).await.unwrap();
        assert_eq!(build_id(&responses[0]), id, "{responses:?}");
        assert!(
            responses[0].message.contains("joined the running build"),
            "{responses:?}"
        );
        assert_eq!(
            status(responses.last().unwrap()),
            pb::BuildStatus::DoneSuccess
        );
    }
    let log = String::from_utf8(logs_all(&mut client, id).await.unwrap()).unwrap();
    assert_eq!(log.matches(RESUMED).count(), 1, "{log}");
    assert!(log.contains(&format!("{RESUMED} ({phase})")), "{log}");
    let list = client
        .list_builds(pb::ListBuildsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.builds.len(), 1, "{:?}", list.builds);
    let build = &list.builds[0];
    assert_eq!(build.build_id, id);
    assert_eq!(build.status, pb::BuildStatus::DoneSuccess as i32, "{log}");
    let ran = testkit::read_file_from_image(&build.r#ref, "/ran.txt").unwrap();
    assert_eq!(ran, b"ran\n");
    log
}

/// Starts a build with a failpoint pausing it right after `event`, kills the service there.
async fn crash_after(event: &str, phase_logged: &str, phase: &str, name: &str) {
    let shared = shared();
    let repo = repo(&shared.base, "echo building");
    let failpoint = format!("transition.{event}.after=pause");
    let mut service = Service::start_with_env(
        binary(),
        config(shared.registry.addr(), name),
        &[("FAILPOINTS", &failpoint)],
    )
    .unwrap();
    let mut client = service.client().await.unwrap();
    let (_stream, id) = start_build(&mut client, head_build(&repo.uri())).await;
    wait_for_service_log(&service, &format!("build moved phase={phase_logged}")).await;
    service.kill();
    assert_resumed_to_success(&mut service, &id, phase, None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_in_resolving() {
    crash_after("admitted", "resolving", "resolving", "crash-resolving").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_in_checking_cache() {
    crash_after(
        "resolved",
        "checking_cache",
        "checking_cache",
        "crash-cache",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_in_building_mid_run_step_and_the_orphaned_builder_is_stopped() {
    let shared = shared();
    // A first step that finishes before the kill: the resumed build takes it from the layer
    // cache, and runs only the step the kill interrupted.
    let repo = GitRepo::new(&[(
        "Dockerfile",
        &format!(
            "FROM {}\nRUN echo \"first-$((1+1))\" | tee /first.txt\nRUN echo sleeping-now && sleep 7 && echo ran > /ran.txt\n",
            shared.base
        ),
    )])
    .unwrap();
    let mut service = service("crash-building");
    let mut client = service.client().await.unwrap();
    let (_stream, id) = start_build(&mut client, head_build(&repo.uri())).await;
    wait_for_log(&mut client, &id, "sleeping-now\n").await;
    service.kill();
    let orphans = processes_with("sleep 7");
    assert!(
        !orphans.is_empty(),
        "the RUN step outlived the service, as after a real crash"
    );

    let log =
        assert_resumed_to_success(&mut service, &id, "building", Some(head_build(&repo.uri())))
            .await;
    assert!(
        log.contains("builder processes left running by the previous run"),
        "{log}"
    );
    assert_eq!(log.matches("\nfirst-2\n").count(), 1, "{log}");
    assert_eq!(log.matches("Using cache").count(), 1, "{log}");
    assert_eq!(log.matches("\nsleeping-now\n").count(), 2, "{log}");
    // What the killed builder left in buildah's temporary directory (kept under the data dir,
    // not in /var/tmp) was removed at the restart.
    let temp = service.data_dir().join("buildah/tmp");
    let left: Vec<_> = std::fs::read_dir(&temp)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left in {}: {left:?}", temp.display());
    assert!(
        service
            .log()
            .contains("removed temporary files left by builders"),
        "{}",
        service.log()
    );
    for pid in orphans {
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false);
        assert!(!alive, "orphan {pid} was stopped");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_in_pushing_mid_upload() {
    // Base images in one registry, workspace images in another: the copy streams every byte.
    let source = LocalRegistry::start().unwrap();
    let big = BaseImage::busybox(96 << 20).unwrap();
    let base = testkit::push_image(&big, source.addr(), "big/busybox:1").unwrap();
    let target = LocalRegistry::start().unwrap();
    let repo = repo(&base, "echo small-change");
    let config = serde_json::json!({
        "baseImageRepository": format!("{}/crash-push/base", source.addr()),
        "workspaceImageRepository": format!("{}/crash-push/workspace", target.addr()),
        "registry": {"insecure": [source.addr(), target.addr()]},
        "builds": {"allowLocalRepositories": true},
    });
    let mut service = Service::start(binary(), config).unwrap();
    let mut client = service.client().await.unwrap();
    let (_stream, id) = start_build(&mut client, head_build(&repo.uri())).await;
    let seen = wait_for_log(&mut client, &id, "bytes from").await;
    assert!(seen.contains("copying"), "{seen}");
    service.kill();
    let log = assert_resumed_to_success(&mut service, &id, "pushing", None).await;
    assert!(
        log.starts_with(&seen),
        "the log before the crash is kept byte for byte"
    );
}

/// Files in /dev/shm whose names carry build `id`: its builder's credentials files.
fn credentials_files_of(id: &str) -> Vec<std::path::PathBuf> {
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().contains(id))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_builder_credentials_file_left_by_a_kill_is_removed_at_the_next_start() {
    let shared = shared();
    let repo = repo(&shared.base, "echo sleeping-now && sleep 4");
    let mut service = service("crash-auth-file");
    let mut client = service.client().await.unwrap();
    let (_stream, id) = start_build(&mut client, head_build(&repo.uri())).await;
    // The file exists while the base image is pulled (never while RUN runs).
    wait_for_log(&mut client, &id, "pulling base image").await;
    service.kill();
    let stale = credentials_files_of(&id);
    assert_eq!(stale.len(), 1, "the killed run's file is left: {stale:?}");

    assert_resumed_to_success(&mut service, &id, "building", None).await;
    assert!(
        !stale[0].exists(),
        "{} outlived the run that wrote it",
        stale[0].display()
    );
    assert!(credentials_files_of(&id).is_empty());
}
