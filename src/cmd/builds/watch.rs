//! `builds watch`: a live progress line until the build ends.

use std::io::Write;

use image_builder::client::OpsClient;
use image_builder::proto::ops as pb;

use super::{get_build, status_error};

/// Prints the build's state, elapsed time and last log line on one line until it ends.
pub(super) async fn run(client: &mut OpsClient, build_id: &str) -> anyhow::Result<()> {
    let build = get_build(client, build_id).await?;
    let mut stream = client
        .journal(pb::JournalRequest {
            build_id: build_id.into(),
            from_seq: 0,
            from_log_offset: 0,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut state = build.state.clone();
    let mut last_line = String::new();
    let mut out = std::io::stdout();
    while let Some(record) = stream.message().await.map_err(status_error)? {
        state = record.state.clone();
        if let Some(pb::journal_record::Record::Log(chunk)) = &record.record
            && let Some(line) = String::from_utf8_lossy(&chunk.data)
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
        {
            last_line = line.chars().take(80).collect();
        }
        let elapsed = (image_builder_state::now_ms() - build.created_at_ms).max(0) as f64 / 1000.0;
        write!(out, "\r\x1b[2K{state:<14} {elapsed:>7.1}s  {last_line}")?;
        out.flush()?;
    }
    writeln!(out)?;
    let end = get_build(client, build_id).await?;
    println!(
        "build {} ended {}{}",
        end.build_id,
        end.state,
        if end.failure.is_empty() {
            String::new()
        } else {
            format!(": {}", end.failure)
        }
    );
    let _ = state;
    Ok(())
}
