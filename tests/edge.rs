//! The network edge, against the real binary: TLS and mTLS with certificates the test makes
//! (refused without, expired or foreign; rotation picked up), who may do what on the ops
//! API (certificate names, the operator token; who asked is journaled), the safe default
//! bind, grpc.health.v1 through start-up and shutdown, and server reflection with grpcurl.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use image_builder::client::ClientOptions;
use image_builder::proto::builder as pb;
use image_builder::proto::ops;
use image_builder_testkit::pki::{Authority, Issue, Pair};
use image_builder_testkit::{self as testkit, GitRepo, Service};
use tonic::Code;

/// Client options for `pair`'s certificate, trusting `ca`.
fn with_cert(ca: &Path, pair: &Pair) -> ClientOptions {
    ClientOptions {
        tls_ca: Some(ca.to_owned()),
        tls_cert: Some(pair.cert.clone()),
        tls_key: Some(pair.key.clone()),
        token_file: None,
    }
}

fn trusting(ca: &Path) -> ClientOptions {
    ClientOptions {
        tls_ca: Some(ca.to_owned()),
        ..ClientOptions::default()
    }
}

/// mk3's ListBuilds through a client made with `options`: whether the transport admits it.
async fn mk3_call(options: &ClientOptions, address: &str) -> Result<(), String> {
    let mut client = options
        .connector()
        .map_err(|e| e.to_string())?
        .builder(address)
        .await
        .map_err(|e| e.to_string())?;
    client
        .list_builds(pb::ListBuildsRequest::default())
        .await
        .map(drop)
        .map_err(|e| format!("{:?}: {}", e.code(), e.message()))
}

async fn ops_client(options: &ClientOptions, address: &str) -> image_builder::client::OpsClient {
    options.connector().unwrap().ops(address).await.unwrap()
}

/// A build that runs until cancelled.
fn sleeping_build(repo: &GitRepo) -> pb::BuildRequest {
    head_build(&repo.uri())
}

fn sleeping_repo() -> GitRepo {
    GitRepo::new(&[(
        "Dockerfile",
        &format!(
            "FROM {}\nRUN echo edge-sleeps && sleep 300\n",
            shared().base
        ),
    )])
    .unwrap()
}

fn client_cert(ca: &Authority, name: &str, common_name: &str, alt_names: &[&str]) -> Pair {
    ca.issue(
        name,
        &Issue {
            common_name,
            alt_names,
            client: true,
            ..Issue::default()
        },
    )
    .unwrap()
}

fn server_cert(ca: &Authority, name: &str) -> Pair {
    ca.issue(
        name,
        &Issue {
            common_name: "image-builder",
            alt_names: &["127.0.0.1", "localhost"],
            server: true,
            ..Issue::default()
        },
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn mtls_admits_only_valid_client_certificates_and_operators_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::create(&dir.path().join("ca"), "edge-test-ca").unwrap();
    let server = server_cert(&ca, "server");
    let alice = client_cert(&ca, "alice", "alice", &[]);
    let bob = client_cert(&ca, "bob", "bob", &["bob.example.com"]);
    let expired = ca
        .issue(
            "expired-alice",
            &Issue {
                common_name: "alice",
                expired: true,
                client: true,
                ..Issue::default()
            },
        )
        .unwrap();
    let other = Authority::create(&dir.path().join("other"), "someone-elses-ca").unwrap();
    let foreign = client_cert(&other, "foreign-alice", "alice", &[]);

    let mut config = config(shared().registry.addr(), "edge-mtls");
    config["tls"] = serde_json::json!({
        "certFile": server.cert, "keyFile": server.key, "clientCAFile": ca.ca(),
    });
    config["access"]["operators"] = serde_json::json!(["alice"]);
    config["access"]["viewers"] = serde_json::json!(["alice", "bob.example.com"]);
    let service = Service::start(binary(), config).unwrap();
    let address = service.grpc_address().to_owned();
    assert!(
        service
            .log()
            .contains("asks every client for a certificate"),
        "{}",
        service.log()
    );

    // The transport refuses every client without a valid certificate, whatever it asks.
    let refused = [
        ("no certificate", trusting(&ca.ca())),
        ("an expired certificate", with_cert(&ca.ca(), &expired)),
        ("a certificate of another CA", with_cert(&ca.ca(), &foreign)),
    ];
    for (what, options) in &refused {
        let result = mk3_call(options, &address).await;
        assert!(result.is_err(), "a client with {what} was admitted");
    }
    assert!(
        mk3_call(&ClientOptions::default(), &address).await.is_err(),
        "a plain-text client was admitted"
    );
    wait_for_service_log(&service, "TLS handshake refused").await;

    // Admitted: mk3's service is open to every admitted client; ops reads follow `access.viewers`.
    mk3_call(&with_cert(&ca.ca(), &alice), &address)
        .await
        .unwrap();
    mk3_call(&with_cert(&ca.ca(), &bob), &address)
        .await
        .unwrap();
    let mut bob_ops = ops_client(&with_cert(&ca.ca(), &bob), &address).await;
    bob_ops
        .list_builds(ops::ListBuildsRequest::default())
        .await
        .expect("bob is a viewer by his DNS name");

    // The scenario runner speaks mTLS with the same flags (on the service's first build).
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/happy-ref.yaml");
    let out = Command::new(binary())
        .args(["scenario", "run"])
        .arg(&scenario)
        .args(["--target", &address, "--registry", shared().registry.addr()])
        .arg("--tls-ca")
        .arg(ca.ca())
        .arg("--tls-cert")
        .arg(&alice.cert)
        .arg("--tls-key")
        .arg(&alice.key)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let played = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && played.lines().any(|l| l == "1 passed, 0 failed"),
        "{played}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let repo = sleeping_repo();
    let mut alice_mk3 = with_cert(&ca.ca(), &alice)
        .connector()
        .unwrap()
        .builder(&address)
        .await
        .unwrap();
    let (_stream, id) = start_build(&mut alice_mk3, sleeping_build(&repo)).await;
    let denied = bob_ops
        .cancel_build(ops::CancelBuildRequest {
            build_id: id.clone(),
            reason: "bob tries".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(
        denied.message().contains("`access.operators`") && denied.message().contains("\"bob\""),
        "{}",
        denied.message()
    );
    let mut alice_ops = ops_client(&with_cert(&ca.ca(), &alice), &address).await;
    alice_ops
        .cancel_build(ops::CancelBuildRequest {
            build_id: id.clone(),
            reason: "alice stops it".into(),
        })
        .await
        .unwrap();
    let build = alice_ops
        .get_build(ops::GetBuildRequest {
            build_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(build.requests.len(), 1, "{build:?}");
    assert_eq!(
        (
            build.requests[0].action.as_str(),
            build.requests[0].identity.as_str()
        ),
        ("cancel", "certificate alice")
    );

    // The CLI speaks mTLS with the same flags and prints who asked.
    let out = Command::new(binary())
        .args(["builds", "show", &id, "--address", &address, "--tls-ca"])
        .arg(ca.ca())
        .arg("--tls-cert")
        .arg(&alice.cert)
        .arg("--tls-key")
        .arg(&alice.key)
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && shown.contains("requested  cancel by certificate alice"),
        "{shown}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ... and through the environment variables.
    let out = Command::new(binary())
        .args(["builds", "cancel", &id, "--address", &address])
        .env("IMAGE_BUILDER_TLS_CA", ca.ca())
        .env("IMAGE_BUILDER_TLS_CERT", &bob.cert)
        .env("IMAGE_BUILDER_TLS_KEY", &bob.key)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("PermissionDenied"),
        "{stderr}"
    );

    // Rotation: a new serving certificate, from a new CA, is used by the next connection.
    let rotated_ca = Authority::create(&dir.path().join("rotated"), "rotated-ca").unwrap();
    let rotated = server_cert(&rotated_ca, "rotated-server");
    let alice_trusting_rotated = with_cert(&rotated_ca.ca(), &alice);
    assert!(
        mk3_call(&alice_trusting_rotated, &address).await.is_err(),
        "the rotated CA is not trusted yet"
    );
    std::fs::copy(&rotated.key, &server.key).unwrap();
    std::fs::copy(&rotated.cert, &server.cert).unwrap();
    mk3_call(&alice_trusting_rotated, &address)
        .await
        .expect("the rotated certificate serves the next connection");
    assert!(
        mk3_call(&with_cert(&ca.ca(), &alice), &address)
            .await
            .is_err(),
        "the old certificate is no longer served"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_token_opens_the_ops_api_is_reread_and_never_written_anywhere() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::create(&dir.path().join("ca"), "edge-token-ca").unwrap();
    let server = server_cert(&ca, "server");
    let token_file = dir.path().join("operator-token");
    let first = "first-operator-token-5b1d7e0c";
    let second = "second-operator-token-9f3a2c71";
    std::fs::write(&token_file, format!("{first}\n")).unwrap();

    let mut config = config(shared().registry.addr(), "edge-token");
    config["tls"] = serde_json::json!({"certFile": server.cert, "keyFile": server.key});
    config["access"]["operatorTokenFile"] = token_file.display().to_string().into();
    let service = Service::start(binary(), config).unwrap();
    let address = service.grpc_address().to_owned();

    // Plain TLS: no client certificate needed for mk3's service.
    mk3_call(&trusting(&ca.ca()), &address).await.unwrap();
    let with_token = |token: &str| {
        let file = dir.path().join(format!("client-{}", &token[..5]));
        std::fs::write(&file, token).unwrap();
        ClientOptions {
            token_file: Some(file),
            ..trusting(&ca.ca())
        }
    };

    let mut anonymous = ops_client(&trusting(&ca.ca()), &address).await;
    let refused = anonymous
        .list_builds(ops::ListBuildsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(
        refused.message().contains("operator token"),
        "{}",
        refused.message()
    );
    let mut wrong = ops_client(&with_token("not-the-operator-token-at-all"), &address).await;
    let refused = wrong
        .list_builds(ops::ListBuildsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(
        !refused.message().contains("not-the-operator"),
        "{}",
        refused.message()
    );

    let repo = sleeping_repo();
    let mut mk3 = trusting(&ca.ca())
        .connector()
        .unwrap()
        .builder(&address)
        .await
        .unwrap();
    let (_stream, id) = start_build(&mut mk3, sleeping_build(&repo)).await;
    let mut operator = ops_client(&with_token(first), &address).await;
    operator
        .cancel_build(ops::CancelBuildRequest {
            build_id: id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap();
    let build = operator
        .get_build(ops::GetBuildRequest {
            build_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(build.requests[0].identity, "operator token");

    // The token file is re-read: the old token stops working, the new one works.
    std::fs::write(&token_file, second).unwrap();
    let refused = operator
        .list_builds(ops::ListBuildsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let mut rotated = ops_client(&with_token(second), &address).await;
    rotated
        .list_builds(ops::ListBuildsRequest::default())
        .await
        .unwrap();

    // Neither token is in the service's log or anywhere in its data directory.
    let log = service.log();
    for token in [first, second] {
        assert!(!log.contains(token), "the token is in the service log");
        let at_rest = testkit::files_containing(&service.data_dir(), token.as_bytes());
        assert!(at_rest.is_empty(), "the token is in {at_rest:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_network_address_needs_tls_or_allow_insecure_and_ops_need_an_operator() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(shared().registry.addr(), "edge-bind");
    config["grpcAddress"] = "0.0.0.0:0".into();
    config["metricsAddress"] = "127.0.0.1:0".into();
    config["dataDir"] = dir.path().join("data").display().to_string().into();
    let file = dir.path().join("config.json");
    std::fs::write(&file, config.to_string()).unwrap();
    let out = Command::new(binary())
        .args(["run", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("grpcAddress") && stderr.contains("allowInsecure"),
        "{stderr}"
    );

    config["allowInsecure"] = true.into();
    // No operator and no token: nobody may use the ops API.
    config["access"]["operators"] = serde_json::json!([]);
    config.as_object_mut().unwrap().remove("dataDir");
    let service = Service::start(binary(), config).unwrap();
    assert!(
        service
            .log()
            .contains("plain text on an address other machines reach"),
        "{}",
        service.log()
    );
    let port = service
        .grpc_address()
        .rsplit(':')
        .next()
        .unwrap()
        .to_owned();
    let address = format!("127.0.0.1:{port}");
    mk3_call(&ClientOptions::default(), &address).await.unwrap();
    let mut ops = ops_client(&ClientOptions::default(), &address).await;
    let refused = ops
        .list_builds(ops::ListBuildsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("names no access.viewers and no access.operatorTokenFile"),
        "{}",
        refused.message()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn health_is_not_serving_until_resumed_then_serving_until_shutdown() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let port = testkit::free_port().unwrap();
    let mut config = config(shared().registry.addr(), "edge-health");
    config["grpcAddress"] = format!("127.0.0.1:{port}").into();
    let starting = tokio::task::spawn_blocking(move || {
        Service::start_with_env(
            binary(),
            config,
            &[("FAILPOINTS", "server.resume=sleep(4000)")],
        )
        .unwrap()
    });
    let url = format!("http://127.0.0.1:{port}");
    let channel = loop {
        match tonic::transport::Endpoint::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
        {
            Ok(channel) => break channel,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let mut health = HealthClient::new(channel.clone());
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap().status();
    assert_eq!(first, ServingStatus::NotServing);
    let mut mk3 = pb::image_builder_client::ImageBuilderClient::new(channel.clone());
    let early = mk3
        .list_builds(pb::ListBuildsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(early.code(), Code::Unavailable, "{early:?}");
    assert!(early.message().contains("starting"), "{}", early.message());

    let next = watch.message().await.unwrap().unwrap().status();
    assert_eq!(next, ServingStatus::Serving);
    let mut service = starting.await.unwrap();
    mk3.list_builds(pb::ListBuildsRequest::default())
        .await
        .unwrap();
    for name in ["builder.ImageBuilder", "imagebuilder.ops.v1.BuildOps"] {
        let status = health
            .check(HealthCheckRequest {
                service: name.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{name}");
    }
    // The probe command Kubernetes runs.
    let probe = Command::new(binary())
        .args(["health", "--address", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(
        probe.status.success() && String::from_utf8_lossy(&probe.stdout).contains("SERVING"),
        "{probe:?}"
    );

    let stopping = tokio::task::spawn_blocking(move || {
        service.stop();
        service
    });
    let last = watch.message().await.unwrap().unwrap().status();
    assert_eq!(last, ServingStatus::NotServing, "shutdown is announced");
    let service = stopping.await.unwrap();
    assert!(service.log().contains("stopped"), "{}", service.log());
    let probe = Command::new(binary())
        .args(["health", "--address", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(!probe.status.success(), "a stopped service is not healthy");
}

#[test]
fn reflection_lets_grpcurl_list_and_describe_without_the_proto_files() {
    let grpcurl = std::env::var("IMAGE_BUILDER_GRPCURL_BIN").expect(
        "IMAGE_BUILDER_GRPCURL_BIN names grpcurl: run the tests with scripts/test.sh, which \
         builds it (scripts/peers/go-tools.sh)",
    );
    let service = service("edge-reflection");
    let address = service.grpc_address().to_owned();
    let run = |args: &[&str]| {
        let out = Command::new(&grpcurl)
            .arg("-plaintext")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "grpcurl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let listed = run(&[&address, "list"]);
    for service in [
        "builder.ImageBuilder",
        "imagebuilder.ops.v1.BuildOps",
        "grpc.health.v1.Health",
    ] {
        assert!(
            listed.lines().any(|l| l == service),
            "{service} is not listed:\n{listed}"
        );
    }
    let described = run(&[&address, "describe", "builder.ImageBuilder"]);
    for rpc in [
        "rpc Build ( .builder.BuildRequest ) returns ( stream .builder.BuildResponse )",
        "rpc ResolveBaseImage",
        "rpc Logs",
    ] {
        assert!(described.contains(rpc), "{rpc}:\n{described}");
    }
    let described = run(&[&address, "describe", "builder.BuildRequest"]);
    assert!(described.contains("force_rebuild"), "{described}");
    // And a real call through reflection alone.
    let called = run(&[&address, "builder.ImageBuilder/ListBuilds"]);
    assert!(called.trim().starts_with('{'), "{called}");
}
