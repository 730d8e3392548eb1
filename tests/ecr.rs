//! ECR auth against a moto server on loopback: the service asks moto for a token and a
//! registry that demands exactly that token accepts it; when the registry refuses a token in
//! the middle of a push (as when a push outlives its token), the token is renewed and the push
//! goes on.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

mod common;

use common::*;
use image_builder::proto::builder as pb;
use image_builder_testkit::{
    self as testkit, BaseImage, Fault, FaultKind, FaultProxy, LocalRegistry, MotoServer, Service,
};

const ECR_NAME: &str = "123456789012.dkr.ecr.us-east-1.amazonaws.com";

#[tokio::test(flavor = "multi_thread")]
async fn an_ecr_token_from_moto_is_used_and_renewed_when_refused_mid_push() {
    testkit::alias_loopback(ECR_NAME)
        .expect("map the ECR host name to 127.0.0.1 in /etc/hosts (needs root)");
    let moto = MotoServer::start().unwrap();
    let token = MotoServer::token_password();
    let registry = LocalRegistry::start_with_users(&[("AWS", &token)]).unwrap();
    let proxy = FaultProxy::start(registry.addr()).await.unwrap();
    let port = proxy.addr().rsplit(':').next().unwrap().to_owned();
    let ecr = format!("{ECR_NAME}:{port}");
    testkit::push_image_as(
        &BaseImage::busybox(0).unwrap(),
        registry.addr(),
        "ecr/busybox:1",
        Some(&format!("AWS:{token}")),
    )
    .unwrap();
    let base = format!("{ecr}/ecr/busybox:1");

    let mut config = config(&ecr, "ecr");
    config["enableAdditionalECRAuth"] = true.into();
    config["registry"]["ecrEndpoint"] = moto.endpoint().into();
    let service = Service::start_with_env(
        binary(),
        config,
        &[
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ],
    )
    .unwrap();
    let mut client = service.client().await.unwrap();

    // The registry refuses the workspace manifest push once, as it would an expired token.
    proxy.inject(Fault {
        path_contains: "/ecr/workspace/manifests/".into(),
        method: Some("PUT".into()),
        kind: FaultKind::Status {
            code: 401,
            retry_after: None,
        },
        times: Some(1),
    });
    let responses = build_all(&mut client, ref_build(&base)).await.unwrap();
    let id = build_id(&responses[0]);
    let log = String::from_utf8(logs_all(&mut client, &id).await.unwrap()).unwrap();
    assert_eq!(
        status(responses.last().unwrap()),
        pb::BuildStatus::DoneSuccess,
        "{log}\n{}",
        service.log()
    );
    assert!(
        log.contains("renewed the registry token and trying once more"),
        "{log}"
    );
    assert_eq!(proxy.served(), 1);
    let fetched = service.log().matches("fetched an ECR token").count();
    assert!(
        fetched >= 2,
        "a token at first, a new one after the refusal: {fetched}"
    );
    assert!(
        !log.contains(&token) && !service.log().contains(&token),
        "the token never shows"
    );
}
