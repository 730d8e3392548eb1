//! The local executor's layer cache: buildah's storage under the data dir, where `bud
//! --layers` keeps the result of every step of every build (and the base images it pulled),
//! bounded in size by `executor.layerCacheSize`.
//!
//! Builds share the storage; trimming it has it to itself. Removing an image while another
//! build commits on top of its layers, or has just chosen it as a cached step, fails that
//! build (containers/storage: "layer not known"), so a trim waits for the builds using the
//! storage to end, and builds that start meanwhile wait for the trim (a fair lock: a trim is
//! never starved). A trim goes down to [`LOW_WATER_PERCENT`] of the limit, so that it is rare.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::{Mutex, RwLock, RwLockReadGuard};

use super::buildah::Buildah;
use crate::telemetry::Metrics;

/// A trim removes images until the storage holds at most this share of the limit.
pub const LOW_WATER_PERCENT: u64 = 80;

/// buildah's storage, bounded.
pub struct LayerCache {
    buildah: Buildah,
    limit: u64,
    access: RwLock<()>,
    trimming: Mutex<()>,
    layer_sizes: Arc<parking_lot::Mutex<LayerSizes>>,
    metrics: Option<Arc<Metrics>>,
}

/// Bytes of each layer directory measured before, by name: a committed layer never changes,
/// so each is walked once, not at every measure.
type LayerSizes = HashMap<OsString, u64>;

/// A layer directory changed this recently may still be written (a build committing it, a
/// working container): it is walked at every measure until it is this old.
const SETTLED: std::time::Duration = std::time::Duration::from_secs(60);

/// Where the vfs driver keeps one directory per layer, under the storage root.
const LAYER_DIRS: &str = "vfs/dir";

/// What one trim did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Trimmed {
    /// Images removed.
    pub images: usize,
    /// Bytes on disk before.
    pub before: u64,
    /// Bytes on disk after.
    pub after: u64,
}

impl LayerCache {
    /// The cache in `buildah`'s storage, holding at most `limit` bytes on disk.
    pub fn new(buildah: Buildah, limit: u64, metrics: Option<Arc<Metrics>>) -> Self {
        Self {
            buildah,
            limit,
            access: RwLock::new(()),
            trimming: Mutex::new(()),
            layer_sizes: Arc::default(),
            metrics,
        }
    }

    /// The builder using this storage.
    pub fn buildah(&self) -> &Buildah {
        &self.buildah
    }

    /// The storage for one build's `bud` and `push`: held until the guard drops.
    pub async fn share(&self) -> RwLockReadGuard<'_, ()> {
        self.access.read().await
    }

    /// At start, before any build: removes the working containers and temporary files of
    /// builders a stop or a crash interrupted (the containers hold layers nothing else uses),
    /// then trims.
    pub async fn tidy(&self) {
        {
            let _alone = self.access.write().await;
            if let Err(e) = self.buildah.remove_containers().await {
                tracing::warn!(error = %e, "cannot remove the builders' leftover containers");
            }
            match self.buildah.remove_temp_files().await {
                Ok(0) => {}
                Ok(removed) => tracing::info!(removed, "removed temporary files left by builders"),
                Err(e) => tracing::warn!(error = %e, "cannot remove the builders' temporary files"),
            }
        }
        self.trim().await;
    }

    /// When the storage holds more than the limit, removes the oldest images until it holds
    /// at most [`LOW_WATER_PERCENT`] of it. One trim at a time; a trim asked for while one
    /// runs is that one. Failures are logged: a full cache costs disk, never a build.
    pub async fn trim(&self) -> Trimmed {
        let Ok(_one) = self.trimming.try_lock() else {
            return Trimmed::default();
        };
        let before = self.measure().await;
        if before <= self.limit {
            return Trimmed {
                images: 0,
                before,
                after: before,
            };
        }
        let _alone = self.access.write().await;
        let trimmed = self.evict(before).await;
        tracing::info!(
            images = trimmed.images,
            before_bytes = trimmed.before,
            after_bytes = trimmed.after,
            limit_bytes = self.limit,
            "trimmed the layer cache"
        );
        if let Some(metrics) = &self.metrics {
            metrics
                .layer_cache_evicted(trimmed.images, trimmed.before.saturating_sub(trimmed.after));
        }
        trimmed
    }

    /// Removes the oldest images until the storage fits; the caller has it to itself.
    async fn evict(&self, before: u64) -> Trimmed {
        let target = self.limit / 100 * LOW_WATER_PERCENT;
        let mut trimmed = Trimmed {
            images: 0,
            before,
            after: before,
        };
        // Containers left by builders that were killed hold layers too; none is a live
        // build's while the storage is ours alone.
        if let Err(e) = self.buildah.remove_containers().await {
            tracing::warn!(error = %e, "cannot remove the builders' leftover containers");
        }
        let images = match self.buildah.images().await {
            Ok(images) => images,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the layer cache's images");
                return trimmed;
            }
        };
        trimmed.after = self.measure().await;
        for image in images {
            if trimmed.after <= target {
                break;
            }
            match self.buildah.remove_image(&image.id).await {
                Ok(()) => trimmed.images += 1,
                Err(e) => {
                    tracing::warn!(image = %image.id, error = %e, "cannot remove an image from the layer cache");
                }
            }
            // An image whose layers newer images build on frees nothing until they go too.
            trimmed.after = self.measure().await;
        }
        trimmed
    }

    /// Bytes the storage takes on disk (blocks allocated; a file with several links counted
    /// once), recorded in the metrics. Layers measured before are not walked again.
    pub async fn measure(&self) -> u64 {
        let root = self.buildah.storage();
        let sizes = Arc::clone(&self.layer_sizes);
        let bytes = tokio::task::spawn_blocking(move || storage_usage(&root, &mut sizes.lock()))
            .await
            .unwrap_or_default();
        if let Some(metrics) = &self.metrics {
            metrics.layer_cache_size(bytes);
        }
        bytes
    }
}

/// Bytes allocated on disk under the storage `root`: its layer directories from `known` when
/// measured before (entries of layers that are gone are dropped), the rest walked.
fn storage_usage(root: &Path, known: &mut LayerSizes) -> u64 {
    let layers = root.join(LAYER_DIRS);
    let mut present = LayerSizes::new();
    let mut unsettled = 0;
    for entry in std::fs::read_dir(&layers).into_iter().flatten().flatten() {
        let name = entry.file_name();
        if let Some(bytes) = known.get(&name) {
            present.insert(name, *bytes);
            continue;
        }
        let settled = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|changed| changed.elapsed().ok())
            .is_some_and(|age| age >= SETTLED);
        let bytes = disk_usage(entry.path());
        if settled {
            present.insert(name, bytes);
        } else {
            unsettled += bytes;
        }
    }
    *known = present;
    let rest = walkdir::WalkDir::new(root)
        .into_iter()
        .filter_entry(|e| e.path() != layers)
        .flatten()
        .filter_map(|entry| entry.metadata().ok())
        .map(|meta| std::os::unix::fs::MetadataExt::blocks(&meta) * 512)
        .sum::<u64>();
    rest + unsettled + known.values().sum::<u64>()
}

/// Bytes allocated on disk under `root`; files that vanish while it is walked are skipped.
fn disk_usage(root: PathBuf) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut linked = HashSet::new();
    walkdir::WalkDir::new(root)
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.metadata().ok())
        .filter(|meta| {
            meta.nlink() <= 1 || meta.is_dir() || linked.insert((meta.dev(), meta.ino()))
        })
        .map(|meta| meta.blocks() * 512)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_usage_counts_a_file_with_two_links_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), vec![7u8; 64 * 1024]).unwrap();
        let one = disk_usage(dir.path().to_owned());
        std::fs::hard_link(dir.path().join("a"), dir.path().join("b")).unwrap();
        assert_eq!(disk_usage(dir.path().to_owned()), one);
        std::fs::write(dir.path().join("c"), vec![7u8; 64 * 1024]).unwrap();
        assert!(disk_usage(dir.path().to_owned()) >= one + 64 * 1024);
        assert_eq!(disk_usage(dir.path().join("missing")), 0);
    }

    #[test]
    fn storage_usage_walks_a_layer_once_and_forgets_removed_ones() {
        let root = tempfile::tempdir().unwrap();
        let layer = root.path().join(LAYER_DIRS).join("layer-a");
        std::fs::create_dir_all(&layer).unwrap();
        std::fs::write(layer.join("file"), vec![1u8; 64 * 1024]).unwrap();
        let mut known = LayerSizes::new();
        let first = storage_usage(root.path(), &mut known);
        assert!(first >= 64 * 1024, "{first}");
        assert!(
            known.is_empty(),
            "a layer written a moment ago is not settled"
        );
        // Settled: an hour old.
        let an_hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        std::fs::File::open(&layer)
            .unwrap()
            .set_modified(an_hour_ago)
            .unwrap();
        assert_eq!(storage_usage(root.path(), &mut known), first);
        assert_eq!(known.len(), 1);
        // A committed layer does not change: what is known stands (here: a pretend size).
        known.insert("layer-a".into(), 1 << 30);
        assert!(storage_usage(root.path(), &mut known) >= 1 << 30);
        std::fs::remove_dir_all(&layer).unwrap();
        assert!(storage_usage(root.path(), &mut known) < first);
        assert!(known.is_empty());
    }
}
