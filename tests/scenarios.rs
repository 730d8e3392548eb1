//! Every file in `scenarios/` is one test, played by the real runner with the test kit's
//! self-hosted setup (as `image-builder-testkit scenario run FILE` plays it) against the real
//! service binary, registry, buildah and git. A failure names the file and shows the runner's
//! step-by-step report.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

use std::path::PathBuf;

use libtest_mimic::{Arguments, Failed, Trial};

fn main() {
    let args = Arguments::from_args();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("scenarios/ exists")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    let mut trials: Vec<Trial> = files
        .into_iter()
        .map(|file| {
            let name = file
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            Trial::test(name, move || play(&file))
        })
        .collect();
    trials.push(Trial::test(
        "a failed scenario's report shows the last lines of its builds' logs",
        a_failed_report_shows_build_log_tails,
    ));
    libtest_mimic::run(&args, trials).exit();
}

/// A scenario that expects the wrong end of a failing build fails, and its report carries
/// what the build printed (the reason a flaky run failed must not leave with its store).
fn a_failed_report_shows_build_log_tails() -> Result<(), Failed> {
    let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let file = dir.path().join("expects-the-wrong-end.yaml");
    std::fs::write(
        &file,
        r#"name: expects the wrong end
environment:
  base_images:
    - name: busybox
  git:
    - name: app
      files:
        Dockerfile: |
          FROM ${base.busybox}
          RUN echo printed-before-failing && exit 3
steps:
  - build: {as: b, dockerfile: {repo: app}}
  - wait: {build: b, status: done_success}
"#,
    )
    .map_err(|e| format!("write the scenario: {e}"))?;
    let setup = image_builder_testkit::SelfHosted {
        binary: PathBuf::from(env!("CARGO_BIN_EXE_image-builder")),
    };
    let runtime = tokio::runtime::Runtime::new().map_err(|e| format!("runtime: {e}"))?;
    let report = runtime.block_on(image_builder_scenario::runner::run_file(&file, &setup));
    let text = image_builder_scenario::format_report(&file, &report);
    if report.passed() {
        return Err(format!("the scenario passed: {text}").into());
    }
    let tails = text
        .split_once("build logs (last lines)")
        .map(|(_, tails)| tails)
        .ok_or_else(|| format!("no build logs in the report: {text}"))?;
    if !tails.contains("--- b (") || !tails.contains("printed-before-failing") {
        return Err(format!("the build's last lines are not in the report: {text}").into());
    }
    Ok(())
}

fn play(file: &std::path::Path) -> Result<(), Failed> {
    let setup = image_builder_testkit::SelfHosted {
        binary: PathBuf::from(env!("CARGO_BIN_EXE_image-builder")),
    };
    let runtime = tokio::runtime::Runtime::new().map_err(|e| format!("runtime: {e}"))?;
    let report = runtime.block_on(image_builder_scenario::runner::run_file(file, &setup));
    if report.passed() {
        return Ok(());
    }
    Err(image_builder_scenario::format_report(file, &report).into())
}
