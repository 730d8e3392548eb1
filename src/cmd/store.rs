//! `image-builder store inspect|check`: read the store of a stopped service, writing nothing.

use std::path::Path;

use image_builder_state::inspect;
use image_builder_state::store::SledStore;
use image_builder_state::{BuildId, Record};

fn open(data_dir: &Path) -> anyhow::Result<SledStore> {
    let dir = data_dir.join(image_builder::server::STORE_DIR);
    if !dir.is_dir() {
        anyhow::bail!(
            "{} holds no build store (expected {})",
            data_dir.display(),
            dir.display()
        );
    }
    SledStore::open_existing(&dir).map_err(|e| {
        // sled takes an exclusive lock on its files: only then is another process the cause
        // (sled wraps the lock's EWOULDBLOCK in an error of its own words).
        let locked = e.io().is_some_and(|io| {
            io.kind() == std::io::ErrorKind::WouldBlock
                || io.to_string().contains("could not acquire lock")
        });
        let hint = if locked {
            "another process holds it: is the service still running? stop it first"
        } else {
            "its files may be damaged; keep a copy of the folder before anything else touches it"
        };
        anyhow::anyhow!("cannot open the store in {}: {e} ({hint})", dir.display())
    })
}

/// Prints every build, or one build's journal.
pub fn inspect(data_dir: &Path, build_id: Option<&str>) -> anyhow::Result<()> {
    let store = open(data_dir)?;
    match build_id {
        None => {
            println!(
                "{:<36}  {:<14}  {:>7}  {:>6}  WORKSPACE REF",
                "BUILD ID", "STATE", "ATTEMPT", "RECORDS"
            );
            for (id, damage) in image_builder_state::journal::damage_reports(&store)? {
                println!(
                    "{id:<36}  {:<14}  readable up to record {}: {}",
                    "DAMAGED", damage.readable_until, damage.reason
                );
            }
            for b in inspect::builds(&store)?.iter().rev() {
                match &b.view {
                    Ok(v) => println!(
                        "{:<36}  {:<14}  {:>7}  {:>6}  {}",
                        b.id,
                        v.phase(),
                        v.attempt,
                        b.records.len(),
                        v.workspace_ref
                    ),
                    Err(e) => println!(
                        "{:<36}  {:<14}  {:>7}  {:>6}  ({e})",
                        b.id,
                        "UNREADABLE",
                        "-",
                        b.records.len()
                    ),
                }
            }
        }
        Some(id) => {
            let id: BuildId = id.parse()?;
            let b = inspect::build(&store, id)?;
            if b.records.is_empty() && b.unreadable.is_none() {
                let reports = image_builder_state::journal::damage_reports(&store)?;
                match reports.iter().find(|(damaged, _)| *damaged == id) {
                    Some((_, damage)) => anyhow::bail!(
                        "build {id} has no record left in the store: {}",
                        damage.reason
                    ),
                    None => anyhow::bail!("build {id} is not in the store"),
                }
            }
            for (seq, record) in &b.records {
                match record {
                    Ok(Record::Created {
                        spec,
                        base_ref,
                        workspace_ref,
                        at_ms,
                    }) => {
                        println!(
                            "{seq:>6}  created     at {at_ms}: {:?}; base {base_ref}; workspace {workspace_ref}",
                            spec.source
                        );
                    }
                    Ok(Record::Transition { event, at_ms }) => {
                        println!("{seq:>6}  transition  at {at_ms}: {event:?}");
                    }
                    Ok(Record::CancelRequested { reason, at_ms }) => {
                        println!("{seq:>6}  cancel      at {at_ms}: {reason}");
                    }
                    Ok(Record::BuilderOutput(p)) => {
                        println!(
                            "{seq:>6}  builder     attempt {}: {} ({} bytes of its output logged)",
                            p.attempt, p.builder, p.consumed
                        );
                    }
                    Ok(Record::Requested(r)) => {
                        println!(
                            "{seq:>6}  requested   at {}: {} by {}",
                            r.at_ms,
                            r.action.name(),
                            r.identity
                        );
                    }
                    Ok(Record::Traced {
                        attempt,
                        trace_id,
                        span_id,
                    }) => {
                        println!(
                            "{seq:>6}  traced      attempt {attempt}: trace {trace_id} span {span_id}"
                        );
                    }
                    Ok(Record::Log { offset, data }) => print_log(*seq, *offset, data),
                    Ok(
                        record @ (Record::LogAppended { offset, .. }
                        | Record::LogChecked { offset, .. }),
                    ) => match inspect::named_log(&store, id, record) {
                        Some(Ok(data)) => print_log(*seq, *offset, &data),
                        Some(Err(e)) => println!("{seq:>6}  BAD LOG     {e}"),
                        None => {}
                    },
                    Err(e) => println!("{seq:>6}  UNREADABLE  {e}"),
                }
            }
            if let Some((seq, reason)) = &b.unreadable {
                println!("{seq:>6}  UNREADABLE from here on: {reason}");
            }
            match &b.view {
                Ok(v) => println!(
                    "=> {} (attempt {}){}",
                    v.phase(),
                    v.attempt,
                    v.failure
                        .as_ref()
                        .map(|f| format!(": {f}"))
                        .unwrap_or_default()
                ),
                Err(e) => println!("=> does not fold: {e}"),
            }
        }
    }
    Ok(())
}

/// Verifies every record decodes and every journal folds; fails naming each problem.
pub fn check(data_dir: &Path) -> anyhow::Result<()> {
    let store = open(data_dir)?;
    // Counted from the keys alone: `check` is what reads every record.
    let builds = image_builder_state::store::StoreRead::journal_ids(&store)?.len();
    let problems = inspect::check(&store)?;
    for p in &problems {
        println!("{p}");
    }
    let serious = problems
        .iter()
        .filter(|p| !matches!(p, inspect::Problem::StaleSummary { .. }))
        .count();
    println!(
        "{builds} builds checked, {} problems ({serious} in journals)",
        problems.len()
    );
    if serious > 0 {
        anyhow::bail!("{serious} journal problems");
    }
    Ok(())
}

fn print_log(seq: u64, offset: u64, data: &[u8]) {
    print!(
        "{seq:>6}  log @{offset:<6} {}",
        String::from_utf8_lossy(data)
    );
    if !data.ends_with(b"\n") {
        println!();
    }
}
