//! The shipped binary (`scripts/release.sh`, which the test command runs and names in
//! `IMAGE_BUILDER_RELEASE_BINARY`): at most 40 MB, and its backtraces still name our source
//! files and lines, from the debug file kept beside it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

use std::path::PathBuf;
use std::process::Command;

/// The largest binary we ship.
const MAX_BYTES: u64 = 40_000_000;

fn shipped() -> PathBuf {
    let path = std::env::var("IMAGE_BUILDER_RELEASE_BINARY").expect(
        "IMAGE_BUILDER_RELEASE_BINARY names the shipped binary: run the suite with scripts/test.sh",
    );
    PathBuf::from(path)
}

#[test]
fn the_shipped_binary_is_at_most_40_mb_and_carries_no_debug_info_of_its_own() {
    let binary = shipped();
    let size = std::fs::metadata(&binary).unwrap().len();
    assert!(
        size <= MAX_BYTES,
        "{} is {size} bytes; at most {MAX_BYTES} ship",
        binary.display()
    );
    let sections = Command::new("objdump")
        .arg("--section-headers")
        .arg(&binary)
        .output()
        .unwrap();
    let sections = String::from_utf8_lossy(&sections.stdout);
    assert!(sections.contains(".gnu_debuglink"), "{sections}");
    assert!(!sections.contains(".debug_line"), "{sections}");
    assert!(
        binary.with_file_name("image-builder.debug").is_file(),
        "the debug file is not beside {}",
        binary.display()
    );
}

#[test]
fn a_fatal_error_with_rust_backtrace_names_our_functions_with_file_and_line() {
    // A start that fails: the gRPC port is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let data = tempfile::tempdir().unwrap();
    let config = data.path().join("config.json");
    std::fs::write(
        &config,
        serde_json::json!({
            "baseImageRepository": "127.0.0.1:5000/base-images",
            "workspaceImageRepository": "127.0.0.1:5000/workspace-images",
            "dataDir": data.path().join("data"),
            "grpcAddress": taken.local_addr().unwrap().to_string(),
            "metricsAddress": "127.0.0.1:0",
        })
        .to_string(),
    )
    .unwrap();
    let out = Command::new(shipped())
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("backtrace:"), "{stderr}");
    // A frame of our crate, followed by the source file and line it stands at.
    let lines: Vec<&str> = stderr.lines().collect();
    let ours = lines.windows(2).any(|pair| {
        pair[0].contains("image_builder")
            && pair[1].trim_start().starts_with("at ")
            && pair[1].contains("/src/")
            && pair[1].contains(".rs:")
    });
    assert!(
        ours,
        "no frame of image_builder with its source line:\n{stderr}"
    );
}
