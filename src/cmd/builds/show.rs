//! `builds show`: one build in detail.

use image_builder::client::OpsClient;
use image_builder::proto::ops as pb;

use super::{get_build, time};

/// Prints one build, for people or as JSON.
pub(super) async fn run(
    client: &mut OpsClient,
    build_id: String,
    json: bool,
) -> anyhow::Result<()> {
    let b = get_build(client, &build_id).await?;
    if json {
        println!("{}", build_json(&b));
    } else {
        println!(
            "build      {}\nstate      {} (attempt {})\nsource     {}\ntriggered  {}\nbase       {}\nworkspace  {}",
            b.build_id, b.state, b.attempt, b.source, b.triggered_by, b.base_ref, b.workspace_ref
        );
        if !b.failure.is_empty() {
            println!("failure    {}", b.failure);
        }
        if !b.cancel_requested.is_empty() {
            println!("cancel     requested: {}", b.cancel_requested);
        }
        for r in &b.requests {
            println!(
                "requested  {} by {} at {}",
                r.action,
                r.identity,
                time(r.at_ms)
            );
        }
        if !b.trace_id.is_empty() {
            println!("trace      {}", b.trace_id);
        }
        println!("log        {} bytes\nphases", b.log_bytes);
        for (i, p) in b.phases.iter().enumerate() {
            let took =
                b.phases
                    .get(i + 1)
                    .map(|n| n.entered_at_ms)
                    .unwrap_or(if b.finished_at_ms > 0 {
                        p.entered_at_ms
                    } else {
                        image_builder_state::now_ms()
                    })
                    - p.entered_at_ms;
            println!(
                "  {:<14} {}  {:>8.2}s",
                p.phase,
                time(p.entered_at_ms),
                took as f64 / 1000.0
            );
        }
    }
    Ok(())
}

fn build_json(b: &pb::Build) -> serde_json::Value {
    serde_json::json!({
        "build_id": b.build_id, "state": b.state, "attempt": b.attempt, "source": b.source,
        "force_rebuild": b.force_rebuild, "triggered_by": b.triggered_by,
        "had_request_auth": b.had_request_auth, "base_ref": b.base_ref,
        "workspace_ref": b.workspace_ref, "failure": b.failure, "created_at_ms": b.created_at_ms,
        "finished_at_ms": b.finished_at_ms, "log_bytes": b.log_bytes,
        "cancel_requested": b.cancel_requested, "digest": b.digest, "trace_id": b.trace_id,
        "requests": b.requests.iter().map(|r| serde_json::json!({"action": r.action, "identity": r.identity, "at_ms": r.at_ms})).collect::<Vec<_>>(),
        "phases": b.phases.iter().map(|p| serde_json::json!({"phase": p.phase, "entered_at_ms": p.entered_at_ms})).collect::<Vec<_>>(),
    })
}
