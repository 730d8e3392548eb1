//! How many requests go to one registry host at once: at most `per_host`, in two queues. A
//! freed slot goes to the callers' queue first (an API call waiting on its answer: a Build's
//! cache check, ResolveBaseImage), except that every [`BUILD_SHARE`]th slot freed while both
//! queues wait goes to the builds', so neither starves. Builds are served first come, first
//! served; callers queue per [`Client`] and the clients take turns, so one client's burst of
//! calls does not hold up another's answer. So 500 queued builds copying from one registry
//! neither overwhelm it nor hold up a Build call's cache check for long, 500 Build calls at
//! once from one client hold up another client's cache hit by one request each at most, and
//! a slow registry only holds up the work that goes to it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::steps::{Client, Lane};

pub(super) use crate::config::DEFAULT_REGISTRY_REQUESTS_PER_HOST as DEFAULT_PER_HOST;

/// While both queues wait, one freed slot in this many goes to a build.
const BUILD_SHARE: u32 = 4;

/// Hosts whose queues are kept, at most; past it idle ones are forgotten.
const MAX_HOSTS: usize = 1024;

/// The queues of every registry host, made on first use.
pub(super) struct HostLimits {
    per_host: usize,
    hosts: Mutex<HashMap<String, Arc<Mutex<Host>>>>,
}

/// One host's free slots and waiters.
struct Host {
    free: usize,
    callers: Callers,
    builds: VecDeque<oneshot::Sender<()>>,
    /// Slots handed to callers in a row while builds waited.
    callers_in_a_row: u32,
}

/// Leave to send one request to a host; the slot frees when dropped.
pub(super) struct Slot {
    host: Arc<Mutex<Host>>,
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

    /// Waits for a slot to send one request to `host` for `lane`.
    pub(super) async fn slot(&self, host: &str, lane: Lane) -> Slot {
        let started = Instant::now();
        let host = {
            let mut hosts = self.hosts.lock();
            if hosts.len() >= MAX_HOSTS && !hosts.contains_key(host) {
                let per_host = self.per_host;
                hosts.retain(|_, h| h.lock().free < per_host);
            }
            Arc::clone(hosts.entry(host.to_owned()).or_insert_with(|| {
                Arc::new(Mutex::new(Host {
                    free: self.per_host,
                    callers: Callers::default(),
                    builds: VecDeque::new(),
                    callers_in_a_row: 0,
                }))
            }))
        };
        let granted = {
            let mut state = host.lock();
            if state.free > 0 {
                state.free -= 1;
                None
            } else {
                let (tx, rx) = oneshot::channel();
                match lane {
                    Lane::Caller => state.callers.push(Client::current(), tx),
                    Lane::Build => state.builds.push_back(tx),
                }
                Some(rx)
            }
        };
        if let Some(granted) = granted {
            let mut waiting = Waiting {
                granted: Some(granted),
                host: Arc::clone(&host),
            };
            if let Some(granted) = waiting.granted.as_mut() {
                // Senders are never dropped unsent while their receiver waits.
                let _ = granted.await;
            }
            waiting.granted = None;
        }
        Slot {
            host,
            waited: started.elapsed(),
        }
    }
}

impl Host {
    /// Hands a freed slot to the next waiter that is still waiting, or keeps it free.
    fn release(&mut self) {
        loop {
            let prefer_build = !self.builds.is_empty()
                && (self.callers.is_empty() || self.callers_in_a_row + 1 >= BUILD_SHARE);
            let next = if prefer_build {
                self.callers_in_a_row = 0;
                self.builds.pop_front()
            } else {
                let next = self.callers.pop();
                if next.is_some() && !self.builds.is_empty() {
                    self.callers_in_a_row += 1;
                }
                next
            };
            match next {
                Some(waiter) => {
                    if waiter.send(()).is_ok() {
                        return;
                    }
                }
                None => {
                    self.free += 1;
                    return;
                }
            }
        }
    }
}

/// The callers waiting for a host: a queue per client, and the clients in the order they
/// take their turns (each client with a waiter appears once).
#[derive(Default)]
struct Callers {
    queues: HashMap<Client, VecDeque<oneshot::Sender<()>>>,
    turns: VecDeque<Client>,
}

impl Callers {
    fn push(&mut self, client: Client, waiter: oneshot::Sender<()>) {
        let queue = self.queues.entry(client).or_default();
        if queue.is_empty() {
            self.turns.push_back(client);
        }
        queue.push_back(waiter);
    }

    /// The first waiter of the client whose turn it is; that client goes to the back.
    fn pop(&mut self) -> Option<oneshot::Sender<()>> {
        let client = self.turns.pop_front()?;
        let queue = self.queues.get_mut(&client)?;
        let next = queue.pop_front();
        if queue.is_empty() {
            self.queues.remove(&client);
        } else {
            self.turns.push_back(client);
        }
        next
    }

    fn is_empty(&self) -> bool {
        self.turns.is_empty()
    }
}

/// A place in a queue; if the wait is given up (the future dropped), a slot handed over
/// meanwhile goes on to the next waiter, and later hand-overs skip this one.
struct Waiting {
    granted: Option<oneshot::Receiver<()>>,
    host: Arc<Mutex<Host>>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(mut granted) = self.granted.take() {
            granted.close();
            if granted.try_recv().is_ok() {
                self.host.lock().release();
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.host.lock().release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes a slot in a task of its own, reporting `tag` when it has one.
    fn waiter(
        limits: &Arc<HostLimits>,
        host: &'static str,
        lane: Lane,
        tag: &'static str,
        order: &tokio::sync::mpsc::UnboundedSender<&'static str>,
    ) {
        let (limits, order) = (Arc::clone(limits), order.clone());
        tokio::spawn(async move {
            let slot = limits.slot(host, lane).await;
            order.send(tag).unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
            drop(slot);
        });
    }

    #[tokio::test]
    async fn callers_go_first_builds_get_their_share_and_other_hosts_are_not_held_up() {
        let limits = Arc::new(HostLimits::new(1));
        let held = limits.slot("r", Lane::Build).await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for tag in ["b1", "b2"] {
            waiter(&limits, "r", Lane::Build, tag, &tx);
            tokio::task::yield_now().await;
        }
        for tag in ["c1", "c2", "c3", "c4"] {
            waiter(&limits, "r", Lane::Caller, tag, &tx);
            tokio::task::yield_now().await;
        }
        // Another host has its own slots.
        drop(
            tokio::time::timeout(Duration::from_secs(1), limits.slot("other", Lane::Build))
                .await
                .expect("another host is not held up"),
        );
        assert!(rx.try_recv().is_err(), "no one got past the limit");
        drop(held);
        let mut order = Vec::new();
        for _ in 0..6 {
            order.push(rx.recv().await.unwrap());
        }
        // Callers first, in order; the fourth slot freed while builds wait is a build's.
        assert_eq!(order, ["c1", "c2", "c3", "b1", "c4", "b2"]);
    }

    #[tokio::test]
    async fn callers_of_different_clients_take_turns() {
        let limits = Arc::new(HostLimits::new(1));
        let held = limits.slot("r", Lane::Caller).await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let client =
            |port| Client::of_peer(Some(std::net::SocketAddr::from(([127, 0, 0, 1], port))));
        // One client's burst, then another client's single call, then the first's again.
        for (port, tag) in [(1, "a1"), (1, "a2"), (1, "a3"), (2, "b1"), (1, "a4")] {
            let (limits, tx) = (Arc::clone(&limits), tx.clone());
            tokio::spawn(client(port).serve(async move {
                let slot = limits.slot("r", Lane::Caller).await;
                tx.send(tag).unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
                drop(slot);
            }));
            tokio::task::yield_now().await;
        }
        drop(held);
        let mut order = Vec::new();
        for _ in 0..5 {
            order.push(rx.recv().await.unwrap());
        }
        assert_eq!(order, ["a1", "b1", "a2", "a3", "a4"]);
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_passes_its_slot_on() {
        let limits = Arc::new(HostLimits::new(1));
        let held = limits.slot("r", Lane::Build).await;
        // A caller that stops waiting (its client hung up) before the slot frees.
        let gave_up =
            tokio::time::timeout(Duration::from_millis(20), limits.slot("r", Lane::Caller)).await;
        assert!(gave_up.is_err());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        waiter(&limits, "r", Lane::Build, "next", &tx);
        tokio::task::yield_now().await;
        drop(held);
        assert_eq!(rx.recv().await.unwrap(), "next");
    }
}
