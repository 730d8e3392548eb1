//! Every file in `scenarios/` is one test, played by the real runner (`image-builder scenario
//! run FILE`) against the real service, registry, buildah and git. A failure names the file
//! and shows the runner's step-by-step report.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

use std::path::PathBuf;
use std::process::Command;

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
    let out = Command::new(env!("CARGO_BIN_EXE_image-builder"))
        .args(["scenario", "run"])
        .arg(file)
        .env("RUST_LOG", "warn")
        .output()
        .map_err(|e| format!("cannot run image-builder: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
    .into())
}
