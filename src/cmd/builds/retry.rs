//! `builds retry`: run a failed or cancelled build again.

use image_builder::client::OpsClient;
use image_builder::proto::ops as pb;

use super::{print_reply, status_error};

/// Asks the service to run a build again.
pub(super) async fn run(
    client: &mut OpsClient,
    build_id: String,
    json: bool,
) -> anyhow::Result<()> {
    let r = client
        .retry_build(pb::RetryBuildRequest { build_id })
        .await
        .map_err(status_error)?
        .into_inner();
    let doc =
        serde_json::json!({"build_id": r.build_id, "attempt": r.attempt, "message": r.message});
    print_reply(json, &doc, &r.message);
    Ok(())
}
