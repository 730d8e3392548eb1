//! `builds logs`: a build's log, followed live with `--follow` across service restarts.

use std::io::Write;
use std::time::Duration;

use image_builder::client::Connector;
use image_builder::proto::ops as pb;

use super::{connect, get_build, status_error};

/// Prints a build's log from the journal; with `follow`, reconnects after a broken stream
/// (a restarting service) from the next record, so nothing is lost or repeated.
pub(super) async fn run(
    connector: &Connector,
    address: &str,
    build_id: &str,
    follow: bool,
) -> anyhow::Result<()> {
    let mut client = connect(connector, address).await?;
    let build = get_build(&mut client, build_id).await?;
    // Without --follow, stop at what the build held when asked: its records and log bytes.
    let stop_at = (!follow).then_some((build.records, build.log_bytes));
    // Where to resume after a break: a log record may have been cut between its pieces, so
    // resume at that record, from the byte reached.
    let mut next = 0u64;
    let mut offset = 0u64;
    let mut out = std::io::stdout();
    let mut broken_since: Option<std::time::Instant> = None;
    loop {
        let stream = match client
            .journal(pb::JournalRequest {
                build_id: build_id.into(),
                from_seq: next,
                from_log_offset: offset,
            })
            .await
        {
            Ok(stream) => Some(stream.into_inner()),
            Err(e) if follow && e.code() == tonic::Code::Unavailable => None,
            Err(e) => return Err(status_error(e)),
        };
        if let Some(mut stream) = stream {
            broken_since = None;
            loop {
                match stream.message().await {
                    Ok(Some(record)) => {
                        next = record.seq + 1;
                        if let Some(pb::journal_record::Record::Log(chunk)) = record.record {
                            out.write_all(&chunk.data)?;
                            out.flush()?;
                            offset = chunk.offset + chunk.data.len() as u64;
                            next = record.seq;
                        }
                        if stop_at.is_some_and(|(records, bytes)| {
                            record.seq + 1 >= records && offset >= bytes
                        }) {
                            return Ok(());
                        }
                    }
                    Ok(None) => return Ok(()),
                    Err(e) if follow => {
                        tracing::debug!(error = %e, "log stream broke; reconnecting");
                        break;
                    }
                    Err(e) => return Err(status_error(e)),
                }
            }
        }
        let since = *broken_since.get_or_insert_with(std::time::Instant::now);
        if since.elapsed() > Duration::from_secs(120) {
            anyhow::bail!(
                "the service has been unreachable for 2 minutes; giving up (resume with the same command)"
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        if let Ok(c) = connect(connector, address).await {
            client = c;
        }
    }
}
