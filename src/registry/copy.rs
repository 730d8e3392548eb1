//! Copying an image from one reference to another: its manifest read (or taken from what was
//! seen lately), each blob once, a few side by side, mounted or streamed by `attempts.rs`, the
//! manifest pushed, and the stored digest confirmed.

use futures::{StreamExt, TryStreamExt};
use oci_client::Reference;
use oci_client::manifest::{IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE, OciDescriptor};
use serde::Deserialize;

use super::attempts::{copy_blob, lookup_once};
use super::coalesce::Question;
use super::retry::Resource;
use super::session::Session;
use super::{Error, Keychain, Registry, fail, pinned};
use crate::steps::Progress;

/// Media types we copy: single-platform manifests (the base ref is always one).
const COPY_MEDIA_TYPES: &[&str] = &[OCI_IMAGE_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE];

/// Blobs of one image copied at once, at most.
const BLOB_COPIES_AT_ONCE: usize = 4;

/// The parts of a manifest a copy needs.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestBlobs {
    #[serde(default)]
    media_type: Option<String>,
    config: OciDescriptor,
    #[serde(default)]
    layers: Vec<OciDescriptor>,
}

/// Both ends of a copy.
pub(super) struct CopyEnds<'a> {
    pub(super) source: &'a Reference,
    pub(super) reader: &'a Session,
    pub(super) target: &'a Reference,
    pub(super) writer: &'a Session,
}

impl Registry {
    /// Copies the image `from` (a single-platform manifest) to `to`, then confirms `to` exists
    /// with the same manifest digest, which it returns. `from` is read with the keychain's pull
    /// credential, `to` written with its push credential. Safe to run again after an
    /// interruption: a blob already there is mounted again (one request) or found present.
    pub async fn copy(
        &self,
        from: &str,
        to: &str,
        keychain: &dyn Keychain,
        progress: &dyn Progress,
    ) -> Result<String, Error> {
        let source = self.parse(from)?;
        let target = self.parse(to)?;
        let hosts = [source.registry(), target.registry()];
        self.renewing(keychain, &hosts, progress, || {
            self.copy_once(&source, &target, from, to, keychain, progress)
        })
        .await
    }

    async fn copy_once(
        &self,
        source: &Reference,
        target: &Reference,
        from: &str,
        to: &str,
        keychain: &dyn Keychain,
        progress: &dyn Progress,
    ) -> Result<String, Error> {
        let (source, target) = (source.clone(), target.clone());
        let reader = self
            .session(&source, keychain.pull(source.registry()).await.as_ref())
            .await;
        let writer = self
            .session(&target, keychain.push(target.registry()).await.as_ref())
            .await;
        let what = format!("image {from}");
        let (manifest, digest) = match self.known.manifest(reader.credential, &source) {
            Some(kept) => kept,
            None => {
                let (bytes, digest) = self
                    .retrying(Resource::Manifest(&source), progress, || async {
                        reader
                            .client
                            .pull_manifest_raw(&source, &reader.auth, COPY_MEDIA_TYPES)
                            .await
                            .map_err(|e| fail(&source, &what, e))
                    })
                    .await?;
                self.known
                    .keep_manifest(reader.credential, &source, &digest, &bytes);
                (bytes, digest)
            }
        };
        let blobs: ManifestBlobs =
            serde_json::from_slice(&manifest).map_err(|e| Error::Invalid {
                registry: source.registry().to_owned(),
                what: what.clone(),
                detail: format!("manifest does not list config and layers: {e}"),
            })?;
        // Each blob once: a manifest may list one twice, and two copies of one blob into one
        // repository at once are what docker-registry 2.8 was seen to lose.
        let mut all: Vec<&OciDescriptor> = Vec::with_capacity(blobs.layers.len() + 1);
        for blob in std::iter::once(&blobs.config).chain(&blobs.layers) {
            if !all.iter().any(|seen| seen.digest == blob.digest) {
                all.push(blob);
            }
        }
        let ends = CopyEnds {
            source: &source,
            reader: &reader,
            target: &target,
            writer: &writer,
        };
        // Blobs the target repository was seen to hold (an earlier copy put or found them
        // there) are taken as present; the rest are copied.
        let numbered: Vec<(usize, &OciDescriptor)> = all
            .iter()
            .enumerate()
            .map(|(i, blob)| (i + 1, *blob))
            .collect();
        let (trusted, unknown): (Vec<_>, Vec<_>) = numbered
            .iter()
            .partition(|(_, blob)| self.known.holds_blob(&target, &blob.digest));
        for (n, blob) in &trusted {
            progress
                .line(format!(
                    "blob {n}/{} {} already present (seen there before)",
                    all.len(),
                    blob.digest
                ))
                .await;
        }
        self.copy_blobs(&ends, &unknown, all.len(), progress)
            .await?;
        let media_type = blobs
            .media_type
            .unwrap_or_else(|| OCI_IMAGE_MEDIA_TYPE.to_owned());
        let content_type: reqwest::header::HeaderValue =
            media_type.parse().map_err(|_| Error::Invalid {
                registry: source.registry().to_owned(),
                what: what.clone(),
                detail: format!("media type {media_type:?} is not a header value"),
            })?;
        let push_manifest = || {
            self.retrying(Resource::Manifest(&target), progress, || async {
                writer
                    .client
                    .push_manifest_raw(&target, manifest.clone(), content_type.clone())
                    .await
                    .map_err(|e| fail(&target, &format!("manifest of {to}"), e))
            })
        };
        let location = match push_manifest().await {
            Ok(location) => location,
            // The registry may have lost a blob since it was seen there or put there
            // (deleted, collected, or lost to a race of its own): the manifest is refused as
            // naming an unknown blob. Copy every blob again, then push once more.
            Err(err) if matches!(err.root(), Error::NotFound { .. } | Error::Invalid { .. }) => {
                progress
                    .line(format!(
                        "{err}; copying the image's {} blobs again and pushing once more",
                        all.len()
                    ))
                    .await;
                for blob in &all {
                    self.known.forget_blob(&target, &blob.digest);
                }
                self.copy_blobs(&ends, &numbered, all.len(), progress)
                    .await?;
                push_manifest().await?
            }
            Err(err) => return Err(err),
        };
        progress
            .line(format!("pushed manifest {digest} to {to}"))
            .await;
        // The registry names what it stored in the manifest's location (distribution does:
        // `/v2/<name>/manifests/<digest>`); only if it does not is it asked once more.
        let found = match digest_in_location(&location) {
            Some(stored) => Some(stored.to_owned()),
            None => {
                self.retrying(Resource::Manifest(&target), progress, || {
                    lookup_once(self, &writer, &target, to)
                })
                .await?
            }
        };
        match found {
            Some(found) if found == digest => Ok(digest),
            Some(found) => Err(Error::Invalid {
                registry: target.registry().to_owned(),
                what: format!("image {to}"),
                detail: format!("after the push it has digest {found}, expected {digest}"),
            }),
            None => Err(Error::NotFound {
                what: format!("image {to} right after pushing it"),
            }),
        }
    }

    /// Copies `blobs` (each with its place among the image's `of` blobs) into the target
    /// repository, a few side by side (each still taking a slot at its host), and remembers
    /// the repository holds each one copied or found.
    async fn copy_blobs(
        &self,
        ends: &CopyEnds<'_>,
        blobs: &[(usize, &OciDescriptor)],
        of: usize,
        progress: &dyn Progress,
    ) -> Result<(), Error> {
        let same_registry = ends.source.registry() == ends.target.registry();
        let mut copies = Vec::with_capacity(blobs.len());
        for &(n, blob) in blobs {
            copies.push(async move {
                let question = Question::by_fingerprint(
                    "copy blob",
                    &pinned(ends.target, &blob.digest),
                    ends.writer.credential,
                    progress.lane(),
                );
                let copy = || {
                    self.retrying(Resource::Blob(ends.source, &blob.digest), progress, || {
                        copy_blob(ends, blob, same_registry, (n, of), progress)
                    })
                };
                let asked = std::sync::atomic::AtomicBool::new(false);
                let shared = self
                    .blob_copies
                    .answer(question, || {
                        asked.store(true, std::sync::atomic::Ordering::Relaxed);
                        copy()
                    })
                    .await;
                match shared {
                    Ok(()) if !asked.load(std::sync::atomic::Ordering::Relaxed) => {
                        progress
                            .line(format!(
                                "blob {n}/{of} {} copied there by another build at the same time",
                                blob.digest
                            ))
                            .await;
                    }
                    Ok(()) => {}
                    Err(err) if asked.load(std::sync::atomic::Ordering::Relaxed) => {
                        return Err(err);
                    }
                    // Another build's copy failed: it read another source, maybe with another
                    // credential. This one tries its own.
                    Err(_) => copy().await?,
                }
                self.known.hold_blob(ends.target, &blob.digest);
                Ok::<_, Error>(())
            });
        }
        futures::stream::iter(copies)
            .buffer_unordered(BLOB_COPIES_AT_ONCE)
            .try_collect::<()>()
            .await
    }
}

/// The digest a manifest's location names as its last path segment, if it names one.
fn digest_in_location(location: &str) -> Option<&str> {
    let last = location.split('?').next()?.rsplit('/').next()?;
    let hex = last.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(last)
}

#[cfg(test)]
mod tests {
    use super::digest_in_location;

    #[test]
    fn a_manifest_location_names_its_digest_only_when_it_is_one() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(
            digest_in_location(&format!("http://r:5000/v2/a/b/manifests/{digest}")),
            Some(digest.as_str())
        );
        assert_eq!(
            digest_in_location(&format!("/v2/a/manifests/{digest}?x=1")),
            Some(digest.as_str())
        );
        assert_eq!(digest_in_location("http://r/v2/a/manifests/latest"), None);
        assert_eq!(
            digest_in_location("http://r/v2/a/manifests/sha256:abc"),
            None
        );
    }
}
