//! Scenario-driven integration tests: YAML files that name an environment and a list of steps
//! (builds, listeners, restarts, crashes, faults, assertions), played by [`runner`] against the
//! real service. `image-builder scenario run FILE...` prints a line per step and a final
//! `N passed, M failed`.

pub mod model;
pub mod runner;

use std::path::PathBuf;

pub use runner::{Options, Outcome, Report};

/// Runs every file and prints the results; returns the number of failed scenarios.
pub async fn run_files(files: &[PathBuf], options: &Options) -> usize {
    let mut passed = 0;
    let mut failed = 0;
    for file in files {
        let report = runner::run_file(file, options).await;
        print_report(file, &report);
        if report.passed() {
            passed += 1;
        } else {
            failed += 1;
        }
    }
    println!("{passed} passed, {failed} failed");
    failed
}

fn print_report(file: &std::path::Path, report: &Report) {
    println!("scenario {} ({})", report.name, file.display());
    if let Some(e) = &report.setup_error {
        println!("  FAIL  set-up: {e}");
    }
    for (i, kind, outcome, took) in &report.steps {
        match outcome {
            Outcome::Passed => println!("  ok    {i:>2} {kind} ({:.2}s)", took.as_secs_f64()),
            Outcome::Failed(why) => println!("  FAIL  {i:>2} {kind}: {why}"),
            Outcome::Skipped(why) if *i == 0 => println!("  ----  {kind}:\n{why}"),
            Outcome::Skipped(why) => println!("  skip  {i:>2} {kind}: {why}"),
        }
    }
    println!("  => {}", if report.passed() { "passed" } else { "FAILED" });
}
