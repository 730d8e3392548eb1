//! Registry credentials against a registry that demands basic auth (htpasswd): installation
//! credentials from a docker config file (re-read when it changes), per-request auth with
//! mk3's rules, pushes with the installation's credentials only, censoring, and a scan that
//! finds no credential anywhere it must not be.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

mod common;

use std::time::Duration;

use base64::Engine;
use common::*;
use image_builder::proto::builder as pb;
use image_builder_testkit::{self as testkit, BaseImage, LocalRegistry, Service};
use tonic::Code;

const INSTALL_PW: &str = "inst-marker-4b1d0c";
const VISITOR_PW: &str = "req-marker-9e2c71";

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn pull_secret(host: &str, password: &str) -> String {
    serde_json::json!({"auths": {host: {"auth": b64(&format!("builder:{password}"))}}}).to_string()
}

fn with_auth(mut request: pb::BuildRequest, auth: pb::BuildRegistryAuth) -> pb::BuildRequest {
    request.auth = Some(auth);
    request
}

fn selective(any_of: &[&str]) -> pb::BuildRegistryAuth {
    pb::BuildRegistryAuth {
        mode: Some(pb::build_registry_auth::Mode::Selective(
            pb::BuildRegistryAuthSelective {
                any_of: any_of
                    .iter()
                    .map(std::string::ToString::to_string)
                    .collect(),
                ..Default::default()
            },
        )),
        additional: Default::default(),
    }
}

fn additional(host: &str) -> pb::BuildRegistryAuth {
    pb::BuildRegistryAuth {
        mode: None,
        additional: [(host.to_owned(), b64(&format!("visitor:{VISITOR_PW}")))].into(),
    }
}

async fn log_of(
    client: &mut pb::image_builder_client::ImageBuilderClient<tonic::transport::Channel>,
    id: &str,
    censored: bool,
) -> String {
    String::from_utf8(logs_with(client, id, censored).await.unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_follow_mk3_rules_rotate_without_restart_and_never_leak() {
    let registry =
        LocalRegistry::start_with_users(&[("builder", INSTALL_PW), ("visitor", VISITOR_PW)])
            .unwrap();
    let host = registry.addr().to_owned();
    let creds = format!("builder:{INSTALL_PW}");
    let mut bases = Vec::new();
    for tag in 1..=5 {
        let image = BaseImage::busybox(tag * 1024).unwrap();
        bases.push(
            testkit::push_image_as(
                &image,
                &host,
                &format!("private/busybox:{tag}"),
                Some(&creds),
            )
            .unwrap(),
        );
    }
    let secrets_dir = tempfile::tempdir().unwrap();
    let secret_file = secrets_dir.path().join("config.json");
    std::fs::write(&secret_file, pull_secret(&host, INSTALL_PW)).unwrap();
    let mut config = config(&host, "creds");
    config["pullSecretFile"] = secret_file.display().to_string().into();
    let mut service = Service::start(binary(), config).unwrap();
    let mut client = service.client().await.unwrap();
    let mut seen = String::new();

    // No auth in the request: the private registry gets no installation credentials.
    let err = build_all(&mut client, ref_build(&bases[0]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("unauthorized"), "{}", err.message());
    seen.push_str(err.message());

    // Selective auth naming the registry: installation credentials pull and push.
    let allowed = build_all(
        &mut client,
        with_auth(ref_build(&bases[0]), selective(&[&host])),
    )
    .await
    .unwrap();
    assert_eq!(
        status(allowed.last().unwrap()),
        pb::BuildStatus::DoneSuccess,
        "{allowed:?}"
    );
    let allowed_id = build_id(&allowed[0]);

    // The request's own credentials pull; the push still uses the installation's.
    let own = build_all(
        &mut client,
        with_auth(ref_build(&bases[1]), additional(&host)),
    )
    .await
    .unwrap();
    assert_eq!(
        status(own.last().unwrap()),
        pb::BuildStatus::DoneSuccess,
        "{own:?}"
    );

    // The credential file is rotated to a wrong password, then back, without a restart.
    std::fs::write(&secret_file, pull_secret(&host, "wrong-password-0")).unwrap();
    let err = build_all(
        &mut client,
        with_auth(ref_build(&bases[2]), selective(&[&host])),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.code(),
        Code::Unauthenticated,
        "the new file is used: {err:?}"
    );
    seen.push_str(err.message());
    tokio::time::sleep(Duration::from_millis(20)).await;
    std::fs::write(&secret_file, pull_secret(&host, INSTALL_PW)).unwrap();
    let rotated = build_all(
        &mut client,
        with_auth(ref_build(&bases[2]), selective(&[&host])),
    )
    .await
    .unwrap();
    assert_eq!(
        status(rotated.last().unwrap()),
        pb::BuildStatus::DoneSuccess,
        "{rotated:?}"
    );

    // A build that needs its request's credentials, interrupted by a crash, cannot get them
    // back: it fails saying they must be supplied again.
    service.set_env(&[("FAILPOINTS", "transition.resolved.after=pause")]);
    service.kill_and_restart().unwrap();
    let mut client = service.client().await.unwrap();
    let (_stream, lost_id) = start_build(
        &mut client,
        with_auth(ref_build(&bases[3]), additional(&host)),
    )
    .await;
    wait_for_service_log(
        &service,
        "failpoint reached failpoint=transition.resolved.after",
    )
    .await;
    service.kill();
    service.set_env(&[]);
    service.kill_and_restart().unwrap();
    let mut client = service.client().await.unwrap();
    let lost_log = log_of(&mut client, &lost_id, false).await;
    assert!(
        lost_log.contains("submit the build again with them"),
        "{lost_log}"
    );
    let list = client
        .list_builds(pb::ListBuildsRequest {})
        .await
        .unwrap()
        .into_inner();
    let lost = list.builds.iter().find(|b| b.build_id == lost_id).unwrap();
    assert_eq!(lost.status, pb::BuildStatus::DoneFailure as i32);

    // Censored logs hide the registry host; no log shows a credential.
    let plain = log_of(&mut client, &allowed_id, false).await;
    let censored = log_of(&mut client, &allowed_id, true).await;
    assert!(plain.contains(&host), "{plain}");
    assert!(!censored.contains(&host), "{censored}");
    assert!(censored.contains("[registry]"), "{censored}");
    for build in &list.builds {
        seen.push_str(&log_of(&mut client, &build.build_id, false).await);
    }
    seen.push_str(&format!("{allowed:?}{own:?}{rotated:?}"));
    seen.push_str(
        &reqwest::get(service.metrics_url())
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );

    service.stop();
    seen.push_str(&service.log());
    for marker in [
        INSTALL_PW,
        VISITOR_PW,
        &b64(&format!("builder:{INSTALL_PW}")),
        &b64(&format!("visitor:{VISITOR_PW}")),
    ] {
        assert!(
            !seen.contains(marker),
            "a credential leaked into logs, errors or metrics"
        );
        let at_rest = testkit::files_containing(&service.data_dir(), marker.as_bytes());
        assert!(at_rest.is_empty(), "a credential is at rest in {at_rest:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dockerfile_build_pulls_and_pushes_a_private_registry_with_no_credential_at_rest() {
    // The FROM image lives in one private registry, the installation's repositories in another.
    let images = LocalRegistry::start_with_users(&[("builder", INSTALL_PW)]).unwrap();
    let installation = LocalRegistry::start_with_users(&[("builder", INSTALL_PW)]).unwrap();
    let host = images.addr().to_owned();
    let base = testkit::push_image_as(
        &BaseImage::busybox(0).unwrap(),
        &host,
        "private/busybox:1",
        Some(&format!("builder:{INSTALL_PW}")),
    )
    .unwrap();
    let repo = testkit::GitRepo::new(&[(
        "Dockerfile",
        &format!("FROM {base}\nRUN echo private-build > /ran.txt\n"),
    )])
    .unwrap();
    let secrets_dir = tempfile::tempdir().unwrap();
    let secret_file = secrets_dir.path().join("config.json");
    let token = b64(&format!("builder:{INSTALL_PW}"));
    let file = serde_json::json!({"auths": {
        host.clone(): {"auth": token},
        installation.addr(): {"auth": token},
    }});
    std::fs::write(&secret_file, file.to_string()).unwrap();
    let mut config = config(installation.addr(), "private-dockerfile");
    config["registry"]["insecure"] = serde_json::json!([host, installation.addr()]);
    config["pullSecretFile"] = secret_file.display().to_string().into();
    let service = Service::start(binary(), config).unwrap();
    let mut client = service.client().await.unwrap();

    let denied = build_all(&mut client, head_build(&repo.uri()))
        .await
        .unwrap();
    assert_eq!(
        status(denied.last().unwrap()),
        pb::BuildStatus::DoneFailure,
        "FROM a private image needs allowed credentials"
    );
    let built = build_all(
        &mut client,
        with_auth(head_build(&repo.uri()), selective(&[&host])),
    )
    .await
    .unwrap();
    let id = build_id(&built[0]);
    let log = log_of(&mut client, &id, false).await;
    assert_eq!(
        status(built.last().unwrap()),
        pb::BuildStatus::DoneSuccess,
        "{log}"
    );
    let shm: Vec<_> = std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().contains(&id))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        shm.is_empty(),
        "the builder's credentials file is removed: {shm:?}"
    );
    let everything = format!("{log}{}{denied:?}{built:?}", service.log());
    assert!(
        !everything.contains(INSTALL_PW)
            && !everything.contains(&b64(&format!("builder:{INSTALL_PW}")))
    );
    for marker in [INSTALL_PW.to_owned(), b64(&format!("builder:{INSTALL_PW}"))] {
        let at_rest = testkit::files_containing(&service.data_dir(), marker.as_bytes());
        assert!(at_rest.is_empty(), "a credential is at rest in {at_rest:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registry_with_token_auth_is_served_through_the_bearer_flow() {
    let tokens = testkit::TokenServer::start("builder", INSTALL_PW)
        .await
        .unwrap();
    let registry = LocalRegistry::start_with_token_auth(&tokens).unwrap();
    let host = registry.addr().to_owned();
    let base = testkit::push_image_as(
        &BaseImage::busybox(0).unwrap(),
        &host,
        "tokens/busybox:1",
        Some(&format!("builder:{INSTALL_PW}")),
    )
    .unwrap();
    let secrets_dir = tempfile::tempdir().unwrap();
    let secret_file = secrets_dir.path().join("config.json");
    std::fs::write(&secret_file, pull_secret(&host, INSTALL_PW)).unwrap();
    let mut config = config(&host, "token-auth");
    config["pullSecretFile"] = secret_file.display().to_string().into();
    let service = Service::start(binary(), config).unwrap();
    let mut client = service.client().await.unwrap();

    let err = build_all(&mut client, ref_build(&base)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let built = build_all(
        &mut client,
        with_auth(ref_build(&base), selective(&[&host])),
    )
    .await
    .unwrap();
    let id = build_id(&built[0]);
    let log = log_of(&mut client, &id, false).await;
    assert_eq!(
        status(built.last().unwrap()),
        pb::BuildStatus::DoneSuccess,
        "{log}"
    );
    let workspace = &built.last().unwrap().r#ref;
    let inspected =
        testkit::skopeo_inspect_as(workspace, Some(&format!("builder:{INSTALL_PW}"))).unwrap();
    assert_eq!(
        inspected["Digest"],
        testkit::skopeo_inspect_as(&base, Some(&format!("builder:{INSTALL_PW}"))).unwrap()["Digest"]
    );
    assert!(!log.contains(INSTALL_PW) && !service.log().contains(INSTALL_PW));
}
