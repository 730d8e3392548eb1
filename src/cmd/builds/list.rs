//! `builds list`: builds, newest first, filtered.

use image_builder::client::OpsClient;
use image_builder::proto::ops as pb;

use super::{status_error, time};

/// What `builds list` asks for.
pub(super) struct Filter {
    pub(super) states: Vec<String>,
    pub(super) workspace_ref: Option<String>,
    pub(super) triggered_by: Option<String>,
    pub(super) limit: u32,
}

/// Lists the builds `filter` names, as a table or JSON.
pub(super) async fn run(client: &mut OpsClient, filter: Filter, json: bool) -> anyhow::Result<()> {
    let Filter {
        states,
        workspace_ref,
        triggered_by,
        limit,
    } = filter;
    let list = client
        .list_builds(pb::ListBuildsRequest {
            states,
            workspace_ref: workspace_ref.unwrap_or_default(),
            triggered_by: triggered_by.unwrap_or_default(),
            page_size: limit,
            ..Default::default()
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if json {
        println!(
            "{}",
            serde_json::json!(list.builds.iter().map(summary_json).collect::<Vec<_>>())
        );
    } else {
        println!(
            "{:<36}  {:<14}  {:>7}  {:<20}  WORKSPACE REF",
            "BUILD ID", "STATE", "ATTEMPT", "CREATED"
        );
        for b in &list.builds {
            println!(
                "{:<36}  {:<14}  {:>7}  {:<20}  {}",
                b.build_id,
                b.state,
                b.attempt,
                time(b.created_at_ms),
                b.workspace_ref
            );
        }
    }
    Ok(())
}

fn summary_json(b: &pb::BuildSummary) -> serde_json::Value {
    serde_json::json!({
        "build_id": b.build_id, "state": b.state, "attempt": b.attempt,
        "workspace_ref": b.workspace_ref, "base_ref": b.base_ref, "triggered_by": b.triggered_by,
        "created_at_ms": b.created_at_ms, "finished_at_ms": b.finished_at_ms, "failure": b.failure,
    })
}
