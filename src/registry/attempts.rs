//! Single attempts at the wire: resolve a reference, look one up, copy one blob. `retry.rs`
//! decides whether to try again.

use futures::TryStreamExt;
use oci_client::Reference;
use oci_client::client::linux_amd64_resolver;
use oci_client::manifest::{
    IMAGE_MANIFEST_LIST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE, OciDescriptor,
};

use super::copy::CopyEnds;
use super::session::Session;
use super::{Error, ManifestKind, RESOLVE_MEDIA_TYPES, Registry, fail, pinned};
use crate::steps::Progress;

/// Resolves `image` to its pinned form; a manifest read on the way (not an index) is kept in
/// `registry` for the copy that may follow.
pub(super) async fn resolve_once(
    registry: &Registry,
    session: &Session,
    image: &Reference,
    reference: &str,
) -> Result<String, Error> {
    let what = format!("image {reference}");
    let (bytes, digest) = session
        .client
        .pull_manifest_raw(image, &session.auth, RESOLVE_MEDIA_TYPES)
        .await
        .map_err(|e| fail(image, &what, e))?;
    let kind: ManifestKind = serde_json::from_slice(&bytes).map_err(|e| Error::Invalid {
        registry: image.registry().to_owned(),
        what: what.clone(),
        detail: format!("manifest is not JSON: {e}"),
    })?;
    let is_index = kind.manifests.is_some()
        || matches!(
            kind.media_type.as_deref(),
            Some(OCI_IMAGE_INDEX_MEDIA_TYPE | IMAGE_MANIFEST_LIST_MEDIA_TYPE)
        );
    if !is_index {
        let pinned = pinned(image, &digest);
        registry
            .known
            .keep_manifest(session.credential, image, &digest, &bytes);
        return Ok(pinned);
    }
    let entries = kind.manifests.unwrap_or_default();
    let chosen = linux_amd64_resolver(&entries).ok_or_else(|| Error::NotFound {
        what: format!("a linux/amd64 image in the index {reference}"),
    })?;
    Ok(pinned(image, &chosen))
}

pub(super) async fn lookup_once(
    _: &Registry,
    session: &Session,
    image: &Reference,
    reference: &str,
) -> Result<Option<String>, Error> {
    match session
        .client
        .fetch_manifest_digest(image, &session.auth)
        .await
    {
        Ok(digest) => Ok(Some(digest)),
        Err(e) => match fail(image, &format!("image {reference}"), e) {
            Error::NotFound { .. } => Ok(None),
            other => Err(other),
        },
    }
}

pub(super) async fn copy_blob(
    ends: &CopyEnds<'_>,
    blob: &OciDescriptor,
    same_registry: bool,
    (n, of): (usize, usize),
    progress: &dyn Progress,
) -> Result<(), Error> {
    let CopyEnds {
        source,
        reader,
        target,
        writer,
    } = *ends;
    let what = format!("blob {}", blob.digest);
    if same_registry {
        // Within one registry a mount does in one request what a check and a mount do in
        // two: the registry links the blob whether or not the repository held it already.
        // (Never two mounts of one blob into one repository at once: the copies are
        // coalesced, as docker-registry 2.8 was seen to lose a blob mounted so.)
        match writer.client.mount_blob(target, source, &blob.digest).await {
            Ok(()) => {
                progress
                    .line(format!(
                        "blob {n}/{of} {} mounted from {}",
                        blob.digest,
                        source.repository()
                    ))
                    .await;
                return Ok(());
            }
            // A registry may refuse a mount and offer an upload instead: check, then copy.
            Err(e) => {
                tracing::debug!(digest = %blob.digest, error = %e, "blob mount refused; checking and streaming");
            }
        }
    }
    let present = writer
        .client
        .blob_exists(target, &blob.digest)
        .await
        .map_err(|e| fail(target, &what, e))?;
    if present {
        progress
            .line(format!("blob {n}/{of} {} already present", blob.digest))
            .await;
        return Ok(());
    }
    progress
        .line(format!(
            "blob {n}/{of} {} copying {} bytes from {}",
            blob.digest,
            blob.size,
            source.registry()
        ))
        .await;
    let stream = reader
        .client
        .pull_blob_stream(source, blob)
        .await
        .map_err(|e| fail(source, &what, e))?;
    let size = u64::try_from(blob.size).ok();
    writer
        .client
        .push_blob_stream(target, stream.map_err(Into::into), &blob.digest, size)
        .await
        .map_err(|e| fail(target, &what, e))?;
    progress
        .line(format!("blob {n}/{of} {} copied", blob.digest))
        .await;
    Ok(())
}
