//! What this process learnt of the registries' content and may use without asking again:
//! manifests by digest (a digest names its bytes, so they never change) and the blobs each
//! repository holds (true until the registry deletes one: a copy whose manifest is refused as
//! naming an unknown blob puts the image's blobs there again). Tags are never kept: what a
//! tag names is asked each time.
//!
//! A Build's resolve reads the base's manifest; its copy moments later needs the same bytes,
//! and the blobs a workspace repository got from the last build of the same base are there
//! for the next. Each saves the registry a request per build.

use bytes::Bytes;
use oci_client::Reference;
use quick_cache::Weighter;
use quick_cache::sync::Cache;

use super::pinned;

/// Manifest bytes kept, at most.
const MANIFEST_BYTES: u64 = 1 << 20;
/// A manifest larger than this is not kept (a single-platform manifest is a few KiB).
const LARGEST_MANIFEST: usize = 64 << 10;
/// Repository blobs remembered as present, at most (about 200 bytes each).
const BLOBS: usize = 4096;

/// A manifest read with one credential: a caller with another may not be allowed to read it.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct ManifestKey {
    credential: [u8; 32],
    /// `registry/repository@digest`.
    pinned: String,
}

/// Weighs a kept manifest by its bytes and its key.
#[derive(Clone)]
struct ByLength;

impl Weighter<ManifestKey, Bytes> for ByLength {
    fn weight(&self, key: &ManifestKey, bytes: &Bytes) -> u64 {
        (bytes.len() + key.pinned.len() + 64) as u64
    }
}

/// Manifests by digest and blobs by repository, each bounded.
pub(super) struct KnownContent {
    manifests: Cache<ManifestKey, Bytes, ByLength>,
    /// `registry/repository@digest` of blobs a repository holds.
    blobs: Cache<String, ()>,
}

impl Default for KnownContent {
    fn default() -> Self {
        Self {
            manifests: Cache::with_weighter(256, MANIFEST_BYTES, ByLength),
            blobs: Cache::new(BLOBS),
        }
    }
}

impl KnownContent {
    /// Keeps a copy of the bytes of `image`'s manifest whose (verified) digest is `digest`, as
    /// read with `credential`.
    pub(super) fn keep_manifest(
        &self,
        credential: [u8; 32],
        image: &Reference,
        digest: &str,
        bytes: &[u8],
    ) {
        if bytes.len() <= LARGEST_MANIFEST {
            let pinned = pinned(image, digest);
            // A body read off the wire may be a slice of a much larger read buffer, which the
            // kept slice would hold alive: keep a copy of its own size.
            let own = Bytes::copy_from_slice(bytes);
            self.manifests
                .insert(ManifestKey { credential, pinned }, own);
        }
    }

    /// The manifest `image` names by digest and that digest, if it was read lately with
    /// `credential`.
    pub(super) fn manifest(
        &self,
        credential: [u8; 32],
        image: &Reference,
    ) -> Option<(Bytes, String)> {
        let digest = image.digest()?;
        let pinned = pinned(image, digest);
        let bytes = self.manifests.get(&ManifestKey { credential, pinned })?;
        Some((bytes, digest.to_owned()))
    }

    /// Remembers that `image`'s repository holds the blob `digest`.
    pub(super) fn hold_blob(&self, image: &Reference, digest: &str) {
        self.blobs.insert(pinned(image, digest), ());
    }

    /// Whether `image`'s repository was seen to hold the blob `digest`.
    pub(super) fn holds_blob(&self, image: &Reference, digest: &str) -> bool {
        self.blobs.get(&pinned(image, digest)).is_some()
    }

    /// Forgets that `image`'s repository holds the blob `digest`.
    pub(super) fn forget_blob(&self, image: &Reference, digest: &str) {
        self.blobs.remove(&pinned(image, digest));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(reference: &str) -> Reference {
        reference.parse().unwrap()
    }

    #[test]
    fn a_manifest_is_found_by_its_digest_and_credential_only() {
        let known = KnownContent::default();
        let digest = format!("sha256:{}", "a".repeat(64));
        let tagged = image("r.example/a/b:1");
        known.keep_manifest([1; 32], &tagged, &digest, b"{}");
        let by_digest = image(&format!("r.example/a/b@{digest}"));
        assert_eq!(
            known.manifest([1; 32], &by_digest),
            Some((Bytes::from_static(b"{}"), digest.clone()))
        );
        assert_eq!(
            known.manifest([2; 32], &by_digest),
            None,
            "another credential"
        );
        assert_eq!(
            known.manifest([1; 32], &tagged),
            None,
            "a tag is never kept"
        );
        let other_repository = image(&format!("r.example/a/c@{digest}"));
        assert_eq!(known.manifest([1; 32], &other_repository), None);
        let big = Bytes::from(vec![b' '; LARGEST_MANIFEST + 1]);
        let big_digest = format!("sha256:{}", "b".repeat(64));
        known.keep_manifest([1; 32], &tagged, &big_digest, &big);
        let big_image = image(&format!("r.example/a/b@{big_digest}"));
        assert_eq!(known.manifest([1; 32], &big_image), None);
    }

    #[test]
    fn a_kept_manifest_does_not_hold_the_buffer_it_was_read_into() {
        let known = KnownContent::default();
        let digest = format!("sha256:{}", "c".repeat(64));
        let buffer = Bytes::from(vec![b'x'; 1 << 20]);
        let body = buffer.slice(100..1100);
        known.keep_manifest([1; 32], &image("r.example/a:1"), &digest, &body);
        drop(body);
        let (kept, _) = known
            .manifest([1; 32], &image(&format!("r.example/a@{digest}")))
            .unwrap();
        assert_eq!(kept.len(), 1000);
        let whole = buffer.as_ptr_range();
        assert!(
            !whole.contains(&kept.as_ptr()),
            "the kept manifest points into the 1 MiB read buffer"
        );
    }

    #[test]
    fn a_blob_is_held_per_repository_until_forgotten() {
        let known = KnownContent::default();
        let (a, b) = (image("r.example/a:1"), image("r.example/b:1"));
        known.hold_blob(&a, "sha256:1");
        assert!(known.holds_blob(&a, "sha256:1"));
        assert!(!known.holds_blob(&b, "sha256:1"));
        assert!(!known.holds_blob(&a, "sha256:2"));
        known.forget_blob(&a, "sha256:1");
        assert!(!known.holds_blob(&a, "sha256:1"));
    }
}
