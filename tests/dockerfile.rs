//! Dockerfile builds from git, for real: local git repositories, buildah, the registry.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

mod common;

use common::*;
use image_builder::proto::builder as pb;
use image_builder::proto::contentservice::CloneTargetMode;
use image_builder_testkit::{self as testkit, GitRepo, Service};
use tonic::Code;

fn dockerfile(base: &str, run: &str) -> String {
    format!("FROM {base}\nCOPY greeting.txt /greeting.txt\nRUN {run}\n")
}

#[tokio::test]
async fn a_dockerfile_with_run_and_copy_builds_from_each_kind_of_git_target() {
    let shared = shared();
    let run = "echo 'line one' && echo 'line two' && echo 'line three' >&2 && cat /greeting.txt > /ran.txt && echo built-by-run >> /ran.txt";
    let repo = GitRepo::new(&[
        ("Dockerfile", &dockerfile(&shared.base, run)),
        ("greeting.txt", "hello from main\n"),
    ])
    .unwrap();
    let first_commit = repo.head().unwrap();
    repo.commit(&[("greeting.txt", "hello again\n")], "second")
        .unwrap();
    repo.branch("feature").unwrap();
    repo.commit(&[("greeting.txt", "hello from feature\n")], "feature")
        .unwrap();
    repo.switch("main").unwrap();

    let service = service("dockerfile");
    let mut client = service.client().await.unwrap();
    let cases = [
        (CloneTargetMode::RemoteHead, "", "hello again\n"),
        (
            CloneTargetMode::RemoteBranch,
            "feature",
            "hello from feature\n",
        ),
        (
            CloneTargetMode::RemoteCommit,
            first_commit.as_str(),
            "hello from main\n",
        ),
    ];
    for (mode, target, greeting) in cases {
        let request = dockerfile_build(&repo.uri(), mode, target, "Dockerfile", ".");
        let responses = build_all(&mut client, request.clone()).await.unwrap();
        let last = responses.last().unwrap();
        let id = build_id(&responses[0]);
        let log = String::from_utf8(logs_all(&mut client, &id).await.unwrap()).unwrap();
        assert_eq!(
            status(last),
            pb::BuildStatus::DoneSuccess,
            "{mode:?}: {last:?}\n{log}"
        );
        // buildah's own output, line by line, in the journaled log.
        for line in [
            "STEP 3/3: RUN",
            "line one\n",
            "line two\n",
            "line three\n",
            "cloning",
        ] {
            assert!(log.contains(line), "{mode:?}: {line:?} missing from\n{log}");
        }
        assert!(
            last.base_ref
                .starts_with(&format!("{}/dockerfile/base:", shared.registry.addr())),
            "{}",
            last.base_ref
        );
        let ran = testkit::read_file_from_image(&last.r#ref, "/ran.txt").unwrap();
        assert_eq!(
            String::from_utf8(ran).unwrap(),
            format!("{greeting}built-by-run\n"),
            "{mode:?}"
        );

        let again = build_all(&mut client, request).await.unwrap();
        assert_eq!(
            again.len(),
            1,
            "second build of the same source is a cache hit"
        );
    }
    // The work directories are gone once builds end.
    let work = service.data_dir().join("work");
    let left: Vec<_> = std::fs::read_dir(&work)
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn failures_end_in_done_failure_with_the_builders_own_words() {
    let shared = shared();
    let failing = GitRepo::new(&[
        (
            "Dockerfile",
            &dockerfile(&shared.base, "echo about-to-fail && exit 3"),
        ),
        ("greeting.txt", "hi\n"),
    ])
    .unwrap();
    failing.commit_symlink("Escape", "/etc/hostname").unwrap();
    let service = service("failures");
    let mut client = service.client().await.unwrap();

    let cases = [
        (
            head_build(&failing.uri()),
            "buildah bud failed",
            "about-to-fail\n",
        ),
        (
            dockerfile_build(
                &failing.uri(),
                CloneTargetMode::RemoteHead,
                "",
                "nope/Dockerfile",
                ".",
            ),
            "the Dockerfile \"nope/Dockerfile\" does not exist",
            "cloning",
        ),
        (
            head_build("file:///nonexistent/repository"),
            "git clone failed",
            "does not exist",
        ),
        (
            dockerfile_build(
                &failing.uri(),
                CloneTargetMode::RemoteBranch,
                "no-such-branch",
                "Dockerfile",
                ".",
            ),
            "git clone failed",
            "no-such-branch",
        ),
        (
            dockerfile_build(
                &failing.uri(),
                CloneTargetMode::RemoteHead,
                "",
                "Escape",
                ".",
            ),
            "leaves the repository",
            "cloning",
        ),
    ];
    for (request, message, log_line) in cases {
        let responses = build_all(&mut client, request).await.unwrap();
        let last = responses.last().unwrap();
        assert_eq!(status(last), pb::BuildStatus::DoneFailure, "{last:?}");
        assert!(
            last.message.contains(message),
            "{:?} lacks {message:?}",
            last.message
        );
        let log = String::from_utf8(
            logs_all(&mut client, &build_id(&responses[0]))
                .await
                .unwrap(),
        )
        .unwrap();
        assert!(log.contains(log_line), "log lacks {log_line:?}:\n{log}");
        if message.starts_with("buildah") {
            assert!(
                log.contains("Error: building at STEP"),
                "buildah's own error line:\n{log}"
            );
        }
        assert!(log.contains("build failed: "), "{log}");
    }
}

#[tokio::test]
async fn requests_that_escape_or_use_other_initializers_are_invalid() {
    use image_builder::proto::contentservice as cs;
    let service = service("invalid");
    let mut client = service.client().await.unwrap();
    for (dockerfile, context) in [
        ("../Dockerfile", "."),
        ("/etc/Dockerfile", "."),
        ("Dockerfile", "a/../../b"),
    ] {
        let request = dockerfile_build(
            "file:///x",
            CloneTargetMode::RemoteHead,
            "",
            dockerfile,
            context,
        );
        let err = build_all(&mut client, request).await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{dockerfile} {context}: {err:?}"
        );
        assert!(
            err.message().contains("leaves the repository"),
            "{}",
            err.message()
        );
    }
    let mut snapshot = head_build("file:///x");
    if let Some(pb::build_source::From::File(f)) =
        snapshot.source.as_mut().and_then(|s| s.from.as_mut())
    {
        f.source = Some(cs::WorkspaceInitializer {
            spec: Some(cs::workspace_initializer::Spec::Snapshot(
                cs::SnapshotInitializer::default(),
            )),
        });
    }
    let err = build_all(&mut client, snapshot).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("snapshot initializer"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn an_existing_base_image_skips_the_build() {
    let shared = shared();
    let repo = GitRepo::new(&[
        ("Dockerfile", &dockerfile(&shared.base, "echo built")),
        ("greeting.txt", "x\n"),
    ])
    .unwrap();
    // Two services share the base repository but not the workspace repository.
    let mut first_config = config(shared.registry.addr(), "skip");
    first_config["workspaceImageRepository"] =
        format!("{}/skip/ws-one", shared.registry.addr()).into();
    let mut second_config = first_config.clone();
    second_config["workspaceImageRepository"] =
        format!("{}/skip/ws-two", shared.registry.addr()).into();
    let one = Service::start(binary(), first_config).unwrap();
    let two = Service::start(binary(), second_config).unwrap();
    let mut c1 = one.client().await.unwrap();
    let mut c2 = two.client().await.unwrap();
    let r1 = build_all(&mut c1, head_build(&repo.uri())).await.unwrap();
    assert_eq!(status(r1.last().unwrap()), pb::BuildStatus::DoneSuccess);
    let r2 = build_all(&mut c2, head_build(&repo.uri())).await.unwrap();
    assert_eq!(status(r2.last().unwrap()), pb::BuildStatus::DoneSuccess);
    assert_eq!(r1.last().unwrap().base_ref, r2.last().unwrap().base_ref);
    let log = String::from_utf8(logs_all(&mut c2, &build_id(&r2[0])).await.unwrap()).unwrap();
    assert!(
        log.contains("exists already") && log.contains("skipping the build"),
        "{log}"
    );
    assert!(!log.contains("STEP 1/"), "buildah did not run:\n{log}");
}

#[tokio::test]
async fn a_build_past_its_time_limit_fails_and_its_builder_is_stopped() {
    let shared = shared();
    let repo = GitRepo::new(&[
        (
            "Dockerfile",
            &dockerfile(&shared.base, "echo sleeping && sleep 211"),
        ),
        ("greeting.txt", "x\n"),
    ])
    .unwrap();
    let mut config = config(shared.registry.addr(), "timeout");
    config["builds"]["timeout"] = "4s".into();
    let service = Service::start(binary(), config).unwrap();
    let mut client = service.client().await.unwrap();
    let responses = build_all(&mut client, head_build(&repo.uri()))
        .await
        .unwrap();
    let last = responses.last().unwrap();
    assert_eq!(status(last), pb::BuildStatus::DoneFailure);
    assert!(
        last.message.contains("time limit of 4s"),
        "{}",
        last.message
    );
    assert!(
        processes_with("sleep 211").is_empty(),
        "the RUN step was stopped"
    );
}

#[tokio::test]
async fn a_long_log_is_truncated_with_a_marker_and_the_build_goes_on() {
    let shared = shared();
    let repo = GitRepo::new(&[
        (
            "Dockerfile",
            &dockerfile(
                &shared.base,
                "for i in $(seq 1 400); do echo noisy-line-$i; done",
            ),
        ),
        ("greeting.txt", "x\n"),
    ])
    .unwrap();
    let mut config = config(shared.registry.addr(), "logcap");
    config["builds"]["maxLogBytes"] = 4096.into();
    let service = Service::start(binary(), config).unwrap();
    let mut client = service.client().await.unwrap();
    let responses = build_all(&mut client, head_build(&repo.uri()))
        .await
        .unwrap();
    assert_eq!(
        status(responses.last().unwrap()),
        pb::BuildStatus::DoneSuccess
    );
    let log = String::from_utf8(
        logs_all(&mut client, &build_id(&responses[0]))
            .await
            .unwrap(),
    )
    .unwrap();
    assert!(log.len() <= 4096, "{}", log.len());
    assert_eq!(log.matches("log truncated here").count(), 1, "{log}");
    assert!(
        log.ends_with("later output is dropped, the build goes on\n"),
        "{log}"
    );
}

#[tokio::test]
async fn the_concurrency_limit_queues_builds_in_order() {
    let shared = shared();
    let repos: Vec<GitRepo> = (0..3)
        .map(|i| {
            GitRepo::new(&[
                (
                    "Dockerfile",
                    &dockerfile(&shared.base, &format!("echo build-{i} && sleep 1")),
                ),
                ("greeting.txt", "x\n"),
            ])
            .unwrap()
        })
        .collect();
    let mut config = config(shared.registry.addr(), "queue");
    config["builds"]["maxConcurrent"] = 1.into();
    let mut service = Service::start(binary(), config).unwrap();
    let mut ids = Vec::new();
    let mut calls = Vec::new();
    for repo in &repos {
        let mut client = service.client().await.unwrap();
        let mut stream = client
            .build(head_build(&repo.uri()))
            .await
            .unwrap()
            .into_inner();
        ids.push(build_id(&stream.message().await.unwrap().unwrap()));
        calls.push(tokio::spawn(async move {
            let mut last = None;
            while let Some(r) = stream.message().await.unwrap() {
                last = Some(r);
            }
            last.unwrap()
        }));
    }
    for call in calls {
        assert_eq!(status(&call.await.unwrap()), pb::BuildStatus::DoneSuccess);
    }
    // The journal says when each build was admitted and when it ended.
    service.stop();
    let journal = image_builder_state::Journal::open(&service.data_dir().join("store")).unwrap();
    let mut spans = Vec::new();
    for id in &ids {
        let view = journal.view(id.parse().unwrap()).unwrap().unwrap();
        let admitted = view
            .entered_at_ms(image_builder_state::Phase::Resolving)
            .unwrap();
        spans.push((admitted, view.finished_at_ms().unwrap()));
    }
    for pair in spans.windows(2) {
        assert!(
            pair[1].0 >= pair[0].1,
            "admitted in order, one at a time: {spans:?}"
        );
    }
}

#[tokio::test]
async fn git_credentials_are_used_for_the_clone_and_never_written() {
    use image_builder::proto::contentservice as cs;
    let shared = shared();
    let marker = "pw-marker-7f3a9c";
    let repo = GitRepo::new(&[
        ("Dockerfile", &dockerfile(&shared.base, "echo private")),
        ("greeting.txt", "x\n"),
    ])
    .unwrap();
    let remote = testkit::GitHttpServer::start(&repo, "builder", marker).unwrap();
    let with_auth = |password: &str| {
        let mut request = head_build(&remote.uri());
        if let Some(pb::build_source::From::File(f)) =
            request.source.as_mut().and_then(|s| s.from.as_mut())
            && let Some(cs::workspace_initializer::Spec::Git(git)) =
                f.source.as_mut().and_then(|s| s.spec.as_mut())
        {
            git.config = Some(cs::GitConfig {
                authentication: cs::GitAuthMethod::BasicAuth as i32,
                auth_user: "builder".into(),
                auth_password: password.into(),
                ..Default::default()
            });
        }
        request
    };
    let mut service = service("gitauth");
    let mut client = service.client().await.unwrap();

    let denied = build_all(&mut client, head_build(&remote.uri()))
        .await
        .unwrap();
    assert_eq!(status(denied.last().unwrap()), pb::BuildStatus::DoneFailure);
    assert!(
        denied.last().unwrap().message.contains("git clone failed"),
        "{:?}",
        denied.last()
    );

    let built = build_all(&mut client, with_auth(marker)).await.unwrap();
    let id = build_id(&built[0]);
    let log = String::from_utf8(logs_all(&mut client, &id).await.unwrap()).unwrap();
    assert_eq!(
        status(built.last().unwrap()),
        pb::BuildStatus::DoneSuccess,
        "{log}"
    );
    assert!(log.contains("private\n"), "{log}");

    // After a restart, nothing has come to rest or shows in a replayed log either.
    service.kill_and_restart().unwrap();
    let mut client = service.client().await.unwrap();
    let replayed = String::from_utf8(logs_all(&mut client, &id).await.unwrap()).unwrap();
    let metrics = reqwest::get(service.metrics_url())
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for text in [
        log,
        replayed,
        metrics,
        service.log(),
        format!("{built:?}{denied:?}"),
    ] {
        assert!(!text.contains(marker), "the password leaked:\n{text}");
    }
    let leaked = testkit::files_containing(&service.data_dir(), marker.as_bytes());
    assert!(leaked.is_empty(), "the password is at rest in {leaked:?}");
}

/// Command lines and environments of the service's build processes (those carrying the
/// build marker variable), polled until `stop` is set: what they showed while they ran.
/// Returns the texts that held `needle`, and how many of their command lines named `seen`
/// (so the scan is known to have caught them at work).
fn scan_processes(
    needle: &'static str,
    seen: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(Vec<String>, usize)> {
    std::thread::spawn(move || {
        let (mut leaks, mut caught) = (Vec::new(), 0);
        let me = std::process::id().to_string();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                let pid = entry.file_name().to_string_lossy().into_owned();
                if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
                    continue;
                }
                let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
                let environ = String::from_utf8_lossy(&environ).replace('\0', " ");
                if !environ.contains("IMAGE_BUILDER_BUILD_ID=") {
                    continue;
                }
                let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                for (file, text) in [("cmdline", cmdline), ("environ", environ)] {
                    if text.contains(needle) {
                        leaks.push(format!("/proc/{pid}/{file}: {text}"));
                    }
                    if file == "cmdline" && text.contains(&seen) {
                        caught += 1;
                    }
                }
            }
        }
        (leaks, caught)
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_password_in_the_remote_url_is_used_but_never_kept_shown_or_passed_in_argv() {
    let shared = shared();
    let marker = "url-pw-marker-51c2e8";
    let repo = GitRepo::new(&[
        (
            "Dockerfile",
            &dockerfile(&shared.base, "echo from-url-auth"),
        ),
        ("greeting.txt", "x\n"),
    ])
    .unwrap();
    let remote = testkit::GitHttpServer::start(&repo, "builder", marker).unwrap();
    let bare = remote.uri();
    let sent = bare.replacen("http://", &format!("http://builder:{marker}@"), 1);
    let mut service = service("git-url-auth");
    let mut client = service.client().await.unwrap();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let host = bare.trim_start_matches("http://").to_owned();
    let scan = scan_processes(marker, host, stop.clone());
    let built = build_all(&mut client, head_build(&sent)).await.unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (leaks, caught) = scan.join().unwrap();
    let id = build_id(&built[0]);
    let log = String::from_utf8(logs_all(&mut client, &id).await.unwrap()).unwrap();
    let last = built.last().unwrap();
    assert_eq!(status(last), pb::BuildStatus::DoneSuccess, "{log}");
    assert!(log.contains("from-url-auth\n"), "{log}");
    assert!(caught > 0, "the scan saw git's processes at work");
    assert!(
        leaks.is_empty(),
        "the password showed in a process: {leaks:?}"
    );

    // mk3's base ref is the hash of the URL exactly as sent, password included.
    let expected = image_builder::refs::dockerfile_base_ref(
        &format!("{}/git-url-auth/base", shared.registry.addr()),
        &image_builder::refs::DockerfileKey {
            clone_target: "",
            context_path: ".",
            dockerfile_path: "Dockerfile",
            dockerfile_version: "1",
            remote_uri: &sent,
        },
    );
    assert_eq!(last.base_ref, expected);
    let resolved = client
        .resolve_workspace_image(pb::ResolveWorkspaceImageRequest {
            source: head_build(&sent).source,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resolved.base_ref, expected);

    let shown = ops_build(&service, &id).await;
    assert!(shown.source.contains(&bare), "{}", shown.source);
    service.stop();
    for text in [
        log,
        format!("{shown:?}{built:?}{resolved:?}"),
        service.log(),
    ] {
        assert!(!text.contains(marker), "the password leaked:\n{text}");
    }
    let leaked = testkit::files_containing(&service.data_dir(), marker.as_bytes());
    assert!(leaked.is_empty(), "the password is at rest in {leaked:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_resumed_after_a_restart_asks_again_for_the_password_its_url_carried() {
    let shared = shared();
    let marker = "url-pw-marker-resume-93d1";
    let repo = GitRepo::new(&[(
        "Dockerfile",
        &format!("FROM {}\nRUN echo sleeping-now && sleep 5\n", shared.base),
    )])
    .unwrap();
    let remote = testkit::GitHttpServer::start(&repo, "builder", marker).unwrap();
    let sent = remote
        .uri()
        .replacen("http://", &format!("http://builder:{marker}@"), 1);
    let mut service = service("git-url-auth-resume");
    let mut client = service.client().await.unwrap();
    let (_stream, id) = start_build(&mut client, head_build(&sent)).await;
    wait_for_log(&mut client, &id, "sleeping-now\n").await;
    service.kill();
    service.kill_and_restart().unwrap();
    let mut client = service.client().await.unwrap();
    let log = String::from_utf8(logs_all(&mut client, &id).await.unwrap()).unwrap();
    assert!(
        log.contains("git credentials of this build are not kept across a restart"),
        "{log}"
    );
    assert!(!log.contains(marker), "{log}");
}

#[tokio::test]
async fn the_layer_cache_keeps_to_its_size_and_builds_go_on() {
    let shared = shared();
    let limit: u64 = 12 << 20;
    let mut config = config(shared.registry.addr(), "layer-cache");
    // A size as a person writes it, parsed by the service.
    config["executor"] = serde_json::json!({"kind": "local", "layerCacheSize": "12 MiB"});
    let service = Service::start(binary(), config).unwrap();
    let mut client = service.client().await.unwrap();
    let repo = GitRepo::new(&[("Dockerfile", "FROM scratch\n")]).unwrap();
    // Each build adds a layer of its own, of 5 MiB.
    for i in 0..3 {
        repo.commit(
            &[(
                "Dockerfile",
                &format!(
                    "FROM {}\nRUN echo layer-{i} > /layer.txt && dd if=/dev/urandom of=/filler bs=1M count=5\n",
                    shared.base
                ),
            )],
            &format!("build {i}"),
        )
        .unwrap();
        let mut request = head_build(&repo.uri());
        if let Some(pb::build_source::From::File(file)) =
            request.source.as_mut().and_then(|s| s.from.as_mut())
        {
            file.dockerfile_version = format!("layer-cache-{i}");
        }
        let responses = build_all(&mut client, request).await.unwrap();
        let last = responses.last().unwrap();
        assert_eq!(status(last), pb::BuildStatus::DoneSuccess, "{last:?}");
        let layer = testkit::read_file_from_image(&last.r#ref, "/layer.txt").unwrap();
        assert_eq!(layer, format!("layer-{i}\n").into_bytes());
    }
    // Trims run after a build, in the background.
    let evicted = "image_builder_layer_cache_evicted_images_total";
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while metric(&service, evicted).await.unwrap_or(0.0) < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no trim:\n{}",
            service.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let measured = metric(&service, "image_builder_layer_cache_bytes")
        .await
        .unwrap();
    assert!(
        measured > 0.0 && measured <= limit as f64,
        "{measured} bytes"
    );
    // What du sees on disk, not only what the service says.
    let storage = service.data_dir().join("buildah/root");
    let du = std::process::Command::new("du")
        .args(["-s", "--block-size=1"])
        .arg(&storage)
        .output()
        .unwrap();
    let on_disk: u64 = String::from_utf8_lossy(&du.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(on_disk <= limit, "{on_disk} bytes in {}", storage.display());
    assert!(
        service.log().contains("trimmed the layer cache"),
        "{}",
        service.log()
    );
}

#[tokio::test]
async fn content_keys_read_a_private_repository_with_the_requests_credentials_only() {
    let shared = shared();
    let password = "content-key-pw-5c2e";
    let repo = GitRepo::new(&[
        ("Dockerfile", &dockerfile(&shared.base, "cat /greeting.txt")),
        ("greeting.txt", "private content\n"),
    ])
    .unwrap();
    let remote = testkit::GitHttpServer::start(&repo, "builder", password).unwrap();
    let mut config = config(shared.registry.addr(), "content-keys");
    config["builds"]["baseImageKey"] = "content".into();
    let mut service = Service::start(binary(), config).unwrap();
    let mut client = service.client().await.unwrap();
    let with_password = remote
        .uri()
        .replace("http://", &format!("http://builder:{password}@"));
    let resolve = |uri: String, branch: &str| pb::ResolveWorkspaceImageRequest {
        source: dockerfile_build(
            &uri,
            if branch.is_empty() {
                CloneTargetMode::RemoteHead
            } else {
                CloneTargetMode::RemoteBranch
            },
            branch,
            "Dockerfile",
            ".",
        )
        .source,
        ..Default::default()
    };
    // Without credentials git is refused, and says so as Unauthenticated.
    let refused = client
        .resolve_workspace_image(resolve(remote.uri(), ""))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    // A branch the repository does not have.
    let missing = client
        .resolve_workspace_image(resolve(with_password.clone(), "no-such-branch"))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    // With them: the refs are the content's, and the Build of the same source agrees.
    let resolved = client
        .resolve_workspace_image(resolve(with_password.clone(), ""))
        .await
        .unwrap()
        .into_inner();
    let mk3 = image_builder::refs::dockerfile_base_ref(
        &format!("{}/content-keys/base", shared.registry.addr()),
        &image_builder::refs::DockerfileKey {
            clone_target: "",
            context_path: ".",
            dockerfile_path: "Dockerfile",
            dockerfile_version: "1",
            remote_uri: &with_password,
        },
    );
    assert_ne!(resolved.base_ref, mk3, "a content key is not mk3's");
    let responses = build_all(&mut client, head_build(&with_password))
        .await
        .unwrap();
    let last = responses.last().unwrap();
    assert_eq!(status(last), pb::BuildStatus::DoneSuccess, "{last:?}");
    assert_eq!(last.base_ref, resolved.base_ref);
    assert_eq!(last.r#ref, resolved.r#ref);
    let greeting = testkit::read_file_from_image(&last.r#ref, "/greeting.txt").unwrap();
    assert_eq!(greeting, b"private content\n");
    // The password reached git through its environment only: nothing under the data dir
    // (the key repositories included) or in the service's log holds it.
    service.stop();
    let found = testkit::files_containing(&service.data_dir(), password.as_bytes());
    assert!(found.is_empty(), "the password is in {found:?}");
    assert!(!service.log().contains(password));
}
