//! The module boundaries ARCHITECTURE.md draws, checked against the source: which top-level
//! module of the service imports which, with no cycle, and the step boundary importing no
//! adapter.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed expect is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The top-level modules of `src/` and, for each, the other top-level modules its code names
/// as `crate::<module>` (comments left out).
fn module_imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph = BTreeMap::new();
    for entry in std::fs::read_dir(&src).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        let name = path
            .file_stem()
            .and_then(|n| n.to_str())
            .expect("a UTF-8 file name")
            .to_owned();
        if name == "lib" || name == "main" {
            continue;
        }
        let mut imports = BTreeSet::new();
        for file in rust_files(&path) {
            let text = std::fs::read_to_string(&file).expect("a readable source file");
            for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
                for (at, _) in line.match_indices("crate::") {
                    let rest = &line[at + "crate::".len()..];
                    let module: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !module.is_empty() && module != name {
                        imports.insert(module);
                    }
                }
            }
        }
        graph.insert(name, imports);
    }
    graph
}

fn rust_files(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_owned()];
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).expect("a readable directory") {
        files.extend(rust_files(&entry.expect("a directory entry").path()));
    }
    files.retain(|f| f.extension().is_some_and(|e| e == "rs"));
    files
}

/// A cycle through `start`, if the graph has one.
fn cycle_from(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    let mut stack = vec![(start.to_owned(), vec![start.to_owned()])];
    let mut seen = BTreeSet::new();
    while let Some((at, path)) = stack.pop() {
        for next in graph.get(&at).into_iter().flatten() {
            if next == start {
                let mut cycle = path.clone();
                cycle.push(next.clone());
                return Some(cycle);
            }
            if seen.insert(next.clone()) {
                let mut longer = path.clone();
                longer.push(next.clone());
                stack.push((next.clone(), longer));
            }
        }
    }
    None
}

#[test]
fn no_module_of_the_service_imports_itself_back() {
    let graph = module_imports();
    assert!(
        graph.contains_key("orchestrator") && graph.contains_key("steps"),
        "the module scan found the service's modules: {graph:?}"
    );
    for module in graph.keys() {
        if let Some(cycle) = cycle_from(&graph, module) {
            panic!("import cycle: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn the_adapters_and_the_step_boundary_import_no_orchestrator() {
    let graph = module_imports();
    for adapter in ["steps", "registry", "executor", "context", "process"] {
        let imports = &graph[adapter];
        assert!(
            !imports.contains("orchestrator") && !imports.contains("api"),
            "{adapter} imports {imports:?}"
        );
    }
    let boundary: Vec<_> = graph["steps"].iter().collect();
    assert_eq!(
        boundary,
        ["credentials"],
        "the step boundary names no adapter"
    );
}

#[test]
fn the_cycle_finder_finds_a_cycle() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(k, v)| {
        (
            k.to_owned(),
            v.into_iter().map(str::to_owned).collect::<BTreeSet<_>>(),
        )
    })
    .collect();
    assert_eq!(
        cycle_from(&graph, "a"),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    assert_eq!(cycle_from(&graph, "d"), None);
}

/// tonic's ways of making a `Status` (`Status::from` goes through `api/status.rs`'s
/// conversions, so it is not one of them).
const TONIC_CONSTRUCTORS: [&str; 21] = [
    "new",
    "with_details",
    "with_metadata",
    "with_details_and_metadata",
    "ok",
    "cancelled",
    "unknown",
    "invalid_argument",
    "deadline_exceeded",
    "not_found",
    "already_exists",
    "permission_denied",
    "resource_exhausted",
    "failed_precondition",
    "aborted",
    "out_of_range",
    "unimplemented",
    "internal",
    "unavailable",
    "data_loss",
    "unauthenticated",
];

/// Every status the service sends is made by `api/status.rs` (its bounded constructor or
/// `Status::from` an error), so no handler can echo a client's input unbounded.
#[test]
fn only_the_status_module_makes_a_status() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let own = src.join("api").join("status.rs");
    let mut found = Vec::new();
    for file in rust_files(&src).into_iter().filter(|f| *f != own) {
        let text = std::fs::read_to_string(&file).expect("a readable source file");
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or_default();
            let makes = code.match_indices("Status::").any(|(at, _)| {
                let own_type = code[..at]
                    .chars()
                    .next_back()
                    .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
                let name: String = code[at + "Status::".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                own_type && TONIC_CONSTRUCTORS.contains(&name.as_str())
            });
            if makes {
                found.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "statuses made outside api/status.rs (use api::status::refuse):\n{}",
        found.join("\n")
    );
}

/// Most lines a source file of the service or the state crate keeps before its tests: a file
/// longer than this holds more than one concept.
const MAX_LINES_BEFORE_TESTS: usize = 400;

/// No file in `src/` or `state/src/` keeps more than [`MAX_LINES_BEFORE_TESTS`] lines before
/// its first `#[cfg(test)]` (a file that is a test module, `tests.rs`, is all tests).
#[test]
fn no_source_file_holds_more_than_one_concept_by_length() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut long = Vec::new();
    for file in rust_files(&root.join("src"))
        .into_iter()
        .chain(rust_files(&root.join("state").join("src")))
        .filter(|f| !f.ends_with("tests.rs"))
    {
        let text = std::fs::read_to_string(&file).expect("a readable source file");
        let before_tests = text
            .lines()
            .take_while(|line| line.trim() != "#[cfg(test)]")
            .count();
        if before_tests > MAX_LINES_BEFORE_TESTS {
            long.push(format!("{} ({before_tests} lines)", file.display()));
        }
    }
    assert!(
        long.is_empty(),
        "files over {MAX_LINES_BEFORE_TESTS} lines before their tests (split them by concept):\n{}",
        long.join("\n")
    );
}
