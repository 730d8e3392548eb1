//! `builds cancel`: stop a build.

use image_builder::client::OpsClient;
use image_builder::proto::ops as pb;

use super::{print_reply, status_error};

/// Asks the service to stop a build, saying why.
pub(super) async fn run(
    client: &mut OpsClient,
    build_id: String,
    reason: String,
    json: bool,
) -> anyhow::Result<()> {
    let r = client
        .cancel_build(pb::CancelBuildRequest { build_id, reason })
        .await
        .map_err(status_error)?
        .into_inner();
    let doc = serde_json::json!({"build_id": r.build_id, "message": r.message, "joined_clients": r.joined_clients});
    print_reply(json, &doc, &r.message);
    Ok(())
}
