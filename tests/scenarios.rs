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
    let trials = files
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
    libtest_mimic::run(&args, trials).exit();
}

fn play(file: &std::path::Path) -> Result<(), Failed> {
    let setup = image_builder_testkit::SelfHosted {
        binary: PathBuf::from(env!("CARGO_BIN_EXE_image-builder")),
    };
    let runtime = tokio::runtime::Runtime::new().map_err(|e| format!("runtime: {e}"))?;
    let report = runtime.block_on(image_builder::scenario::runner::run_file(file, &setup));
    if report.passed() {
        return Ok(());
    }
    Err(image_builder::scenario::format_report(file, &report).into())
}
