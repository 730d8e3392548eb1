//! The scenario runner pointed at a service it did not start (`--target`): steps that need no
//! process control run, the others are skipped and said to be.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

mod common;

use common::*;

#[test]
fn a_scenario_plays_against_a_running_service_with_target() {
    let shared = shared();
    let service =
        image_builder_testkit::Service::start(binary(), config(shared.registry.addr(), "target"))
            .unwrap();
    let target = service.grpc_address().to_owned();
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/happy-ref.yaml");
    let out = std::process::Command::new(binary())
        .args(["scenario", "run"])
        .arg(&file)
        .args(["--target", &target, "--registry", shared.registry.addr()])
        .envs(service.client_options().env())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("skip   7 expect_metric: needs control of the service process"),
        "{stdout}"
    );
    assert!(stdout.contains("ok     2 wait"), "{stdout}");
    assert!(
        stdout.lines().any(|l| l == "1 passed, 0 failed"),
        "{stdout}"
    );
    assert!(
        service.log().contains("build accepted"),
        "the build ran on the target service"
    );
}
