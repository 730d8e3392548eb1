//! Scenario-driven integration tests: YAML files that name an environment and a list of steps
//! (builds, listeners, restarts, crashes, faults, assertions), played by [`runner`] against the
//! real service. `image-builder scenario run FILE...` prints a line per step and a final
//! `N passed, M failed`.

pub mod environment;
mod fault;
pub mod fixtures;
pub mod model;
pub mod runner;
mod vocabulary;

use std::path::PathBuf;

pub use environment::{Environment, Setup, Target};
pub use fault::{Fault, FaultKind};
pub use runner::{Outcome, Report};

/// Runs every file and prints the results; returns the number of failed scenarios.
pub async fn run_files(files: &[PathBuf], setup: &dyn Setup) -> usize {
    let mut passed = 0;
    let mut failed = 0;
    for file in files {
        let report = runner::run_file(file, setup).await;
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

/// Prints a scenario's report, a line per step.
pub fn print_report(file: &std::path::Path, report: &Report) {
    print!("{}", format_report(file, report));
}

/// A scenario's report, a line per step.
pub fn format_report(file: &std::path::Path, report: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "scenario {} ({})", report.name, file.display());
    if let Some(e) = &report.setup_error {
        let _ = writeln!(out, "  FAIL  set-up: {e}");
    }
    for (i, kind, outcome, took) in &report.steps {
        let _ = match outcome {
            Outcome::Passed => writeln!(out, "  ok    {i:>2} {kind} ({:.2}s)", took.as_secs_f64()),
            Outcome::Failed(why) => writeln!(out, "  FAIL  {i:>2} {kind}: {why}"),
            Outcome::Skipped(why) if *i == 0 => writeln!(out, "  ----  {kind}:\n{why}"),
            Outcome::Skipped(why) => writeln!(out, "  skip  {i:>2} {kind}: {why}"),
        };
    }
    let _ = writeln!(
        out,
        "  => {}",
        if report.passed() { "passed" } else { "FAILED" }
    );
    out
}
