//! How many requests go to one registry host at once: at most `per_host` for builds and as
//! many again for callers waiting on an answer, each lane a first-come, first-served queue
//! (tokio's semaphore is fair). So 500 queued builds copying from one registry neither
//! overwhelm it nor delay the cache check of a Build call, and a slow registry only holds up
//! the work that goes to it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::steps::Lane;

/// Requests to one host at once per lane, unless configured (`registryRequestsPerHost`).
pub const DEFAULT_PER_HOST: usize = 32;

/// Hosts whose queues are kept, at most; past it idle ones are forgotten.
const MAX_HOSTS: usize = 1024;

/// The queues of every registry host, made on first use.
pub(super) struct HostLimits {
    per_host: usize,
    hosts: Mutex<HashMap<String, Arc<Lanes>>>,
}

/// One host's two queues.
struct Lanes {
    caller: Arc<Semaphore>,
    build: Arc<Semaphore>,
}

/// Leave to send one request to a host; the slot frees when dropped.
pub(super) struct Slot {
    _permit: Option<OwnedSemaphorePermit>,
    /// How long the request waited for its slot.
    pub waited: Duration,
}

impl HostLimits {
    pub(super) fn new(per_host: usize) -> Self {
        Self {
            per_host: per_host.max(1),
            hosts: Mutex::new(HashMap::new()),
        }
    }

    /// Waits for a slot to send one request to `host` in `lane`, behind those that asked
    /// before in the same lane.
    pub(super) async fn slot(&self, host: &str, lane: Lane) -> Slot {
        let semaphore = {
            let mut hosts = self.hosts.lock();
            if hosts.len() >= MAX_HOSTS && !hosts.contains_key(host) {
                hosts.retain(|_, lanes| !lanes.busy(self.per_host));
            }
            let lanes = hosts.entry(host.to_owned()).or_insert_with(|| {
                Arc::new(Lanes {
                    caller: Arc::new(Semaphore::new(self.per_host)),
                    build: Arc::new(Semaphore::new(self.per_host)),
                })
            });
            match lane {
                Lane::Caller => Arc::clone(&lanes.caller),
                Lane::Build => Arc::clone(&lanes.build),
            }
        };
        let started = Instant::now();
        // The semaphores are never closed, so this always holds a permit.
        let permit = semaphore.acquire_owned().await.ok();
        Slot {
            _permit: permit,
            waited: started.elapsed(),
        }
    }
}

impl Lanes {
    fn busy(&self, per_host: usize) -> bool {
        self.caller.available_permits() < per_host || self.build.available_permits() < per_host
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_build_lane_does_not_hold_up_callers_and_frees_in_order() {
        let limits = Arc::new(HostLimits::new(2));
        let held = [
            limits.slot("r", Lane::Build).await,
            limits.slot("r", Lane::Build).await,
        ];
        // Builds now queue; a caller of the same host does not.
        let caller = tokio::time::timeout(Duration::from_secs(1), limits.slot("r", Lane::Caller))
            .await
            .expect("a caller gets a slot while the build lane is full");
        drop(caller);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..3 {
            let (limits, tx) = (Arc::clone(&limits), tx.clone());
            tokio::spawn(async move {
                let slot = limits.slot("r", Lane::Build).await;
                tx.send(i).unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
                drop(slot);
            });
            // Let each waiter queue before the next.
            tokio::task::yield_now().await;
        }
        // Another host is not held up either.
        drop(limits.slot("other", Lane::Build).await);
        assert!(rx.try_recv().is_err(), "no build got past the limit");
        drop(held);
        let mut order = Vec::new();
        for _ in 0..3 {
            order.push(rx.recv().await.unwrap());
        }
        assert_eq!(order, [0, 1, 2], "first come, first served");
    }
}
