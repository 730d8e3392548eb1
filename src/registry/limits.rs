//! How many requests go to one registry host at once, and who goes next. A freed slot goes
//! to the callers' queue first (an API call waiting on its answer: a Build's cache check,
//! ResolveBaseImage), except that every [`BUILD_SHARE`]th slot freed while both queues wait
//! goes to the builds', so neither starves. Builds are served first come, first served;
//! callers queue per [`CallerId`] and the clients take turns, so one client's burst of calls
//! does not hold up another's answer. So 500 queued builds copying from one registry neither
//! overwhelm it nor hold up a Build call's cache check for long, 500 Build calls at once from
//! one client hold up another client's cache hit by one request each at most, and a slow
//! registry only holds up the work that goes to it.
//!
//! How many at once adapts to the registry ([`Limit`]): `per_host` at most, fewer while the
//! callers' requests take much longer than the shortest seen lately (they queue at the
//! registry itself then, where no queue of ours can put a caller first), more again as they
//! speed up. A saturated registry close by gets few requests at once and answers a cache hit
//! soon; a distant one keeps many in flight to cover its round trip. Builds never hold the
//! last [`reserve`] slots, so a caller never waits for a build's long blob transfer.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::steps::{CallerId, Lane};

pub(super) use crate::config::DEFAULT_REGISTRY_REQUESTS_PER_HOST as DEFAULT_PER_HOST;

/// While both queues wait, one freed slot in this many goes to a build.
const BUILD_SHARE: u32 = 4;

/// Requests at once to a host, however slow it answers (unless `per_host` is lower).
const MIN_PER_HOST: usize = 4;

/// Callers' requests taking up to this many times the shortest lately met no queue.
const TOLERANCE: f64 = 2.0;

/// How far one request's time moves the limit toward what it suggests.
const SMOOTHING: f64 = 0.2;

/// How far one request's time moves the callers' recent time (about the last ten count).
const RECENT_WEIGHT: f64 = 0.1;

/// The shortest request is looked for over this window and the one before it; once no
/// caller has asked a host for this long, its limit is `per_host` again.
const WINDOW: Duration = Duration::from_secs(10);

/// Hosts whose queues are kept, at most; past it idle ones are forgotten.
const MAX_HOSTS: usize = 1024;

/// Slots of a host that builds never hold: a quarter of `per_host`, at most
/// [`MIN_PER_HOST`].
fn reserve(per_host: usize) -> usize {
    (per_host / 4).min(MIN_PER_HOST)
}

/// The queues of every registry host, made on first use.
pub(super) struct HostLimits {
    per_host: usize,
    hosts: Mutex<HashMap<String, Arc<Mutex<Host>>>>,
}

/// One host's requests in flight, its limit, and its waiters.
struct Host {
    name: String,
    callers_in_flight: usize,
    builds_in_flight: usize,
    limit: Limit,
    callers: Callers,
    builds: VecDeque<oneshot::Sender<()>>,
    /// Slots handed to callers in a row while builds waited.
    callers_in_a_row: u32,
}

/// Leave to send one request to a host; the slot frees when dropped.
pub(super) struct Slot {
    host: Arc<Mutex<Host>>,
    lane: Lane,
    /// How long the request waited for its slot.
    pub waited: Duration,
    granted: Instant,
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
                hosts.retain(|_, h| h.lock().in_flight() > 0);
            }
            Arc::clone(
                hosts
                    .entry(host.to_owned())
                    .or_insert_with(|| Arc::new(Mutex::new(Host::new(host, self.per_host)))),
            )
        };
        let granted = {
            let mut state = host.lock();
            if state.nobody_waits() && state.admits(lane, Instant::now()) {
                state.started(lane);
                None
            } else {
                let (tx, rx) = oneshot::channel();
                match lane {
                    Lane::Caller => state.callers.push(CallerId::current(), tx),
                    Lane::Build => state.builds.push_back(tx),
                }
                // The limit may have grown since the last request ended.
                state.grant();
                Some(rx)
            }
        };
        if let Some(granted) = granted {
            let mut waiting = Waiting {
                granted: Some(granted),
                host: Arc::clone(&host),
                lane,
            };
            if let Some(granted) = waiting.granted.as_mut() {
                // Senders are never dropped unsent while their receiver waits.
                let _ = granted.await;
            }
            waiting.granted = None;
        }
        let granted = Instant::now();
        Slot {
            host,
            lane,
            waited: granted - started,
            granted,
        }
    }

    /// How many requests `host` may have in flight now.
    #[cfg(test)]
    fn limit_of(&self, host: &str) -> usize {
        self.hosts
            .lock()
            .get(host)
            .map_or(self.per_host, |h| h.lock().limit.now(Instant::now()))
    }
}

impl Host {
    fn new(name: &str, per_host: usize) -> Self {
        Self {
            name: name.to_owned(),
            callers_in_flight: 0,
            builds_in_flight: 0,
            limit: Limit::new(per_host),
            callers: Callers::default(),
            builds: VecDeque::new(),
            callers_in_a_row: 0,
        }
    }

    fn in_flight(&self) -> usize {
        self.callers_in_flight + self.builds_in_flight
    }

    fn nobody_waits(&self) -> bool {
        self.callers.is_empty() && self.builds.is_empty()
    }

    /// Whether a request of `lane` may go now: while fewer than the limit are in flight, and
    /// for a build, while the reserve stays free; a caller may always use the reserve.
    fn admits(&mut self, lane: Lane, now: Instant) -> bool {
        let per_host = self.limit.per_host;
        let reserve = reserve(per_host);
        let under_limit = self.in_flight() < self.limit.now(now);
        match lane {
            Lane::Caller => under_limit || self.callers_in_flight < reserve,
            Lane::Build => under_limit && self.builds_in_flight < per_host - reserve,
        }
    }

    fn started(&mut self, lane: Lane) {
        match lane {
            Lane::Caller => self.callers_in_flight += 1,
            Lane::Build => self.builds_in_flight += 1,
        }
    }

    /// Ends one request of `lane` (`took`: how long a caller's request held its slot), then
    /// hands slots to waiters while they are admitted.
    fn release(&mut self, lane: Lane, took: Option<Duration>) {
        match lane {
            Lane::Caller => self.callers_in_flight -= 1,
            Lane::Build => self.builds_in_flight -= 1,
        }
        if let Some(took) = took {
            let now = Instant::now();
            let before = self.limit.now(now);
            self.limit.learn(took, now);
            let after = self.limit.now(now);
            if before != after {
                tracing::debug!(host = %self.name, limit = after, "registry requests at once");
            }
        }
        self.grant();
    }

    /// Hands slots to the waiters still waiting, callers first (but for the builds' share),
    /// while they are admitted.
    fn grant(&mut self) {
        loop {
            let now = Instant::now();
            let caller = !self.callers.is_empty() && self.admits(Lane::Caller, now);
            let build = !self.builds.is_empty() && self.admits(Lane::Build, now);
            let (next, lane) = if build && (!caller || self.callers_in_a_row + 1 >= BUILD_SHARE) {
                self.callers_in_a_row = 0;
                (self.builds.pop_front(), Lane::Build)
            } else if caller {
                if !self.builds.is_empty() {
                    self.callers_in_a_row += 1;
                }
                (self.callers.pop(), Lane::Caller)
            } else {
                return;
            };
            if let Some(waiter) = next
                && waiter.send(()).is_ok()
            {
                self.started(lane);
            }
        }
    }
}

/// A host's limit of requests at once, learnt from how long callers' requests take (a
/// gradient limit): while their recent time (a moving average) is up to [`TOLERANCE`] times
/// the shortest lately, it grows toward `per_host`; slower, it shrinks in proportion, to
/// [`MIN_PER_HOST`] at least. Only callers' requests teach it (small manifest requests,
/// alike in cost); builds' requests count toward it, not their time (a blob may take
/// minutes to send).
struct Limit {
    per_host: usize,
    current: f64,
    /// Callers' recent request time, in seconds (a moving average).
    recent: Option<f64>,
    /// The shortest caller's request in this window, and in the one before.
    shortest: Option<Duration>,
    shortest_before: Option<Duration>,
    window_started: Instant,
    last_learnt: Option<Instant>,
}

impl Limit {
    fn new(per_host: usize) -> Self {
        Self {
            per_host,
            current: per_host as f64,
            recent: None,
            shortest: None,
            shortest_before: None,
            window_started: Instant::now(),
            last_learnt: None,
        }
    }

    fn least(&self) -> usize {
        MIN_PER_HOST.min(self.per_host)
    }

    /// The requests allowed at once; `per_host` again once no caller has asked for a
    /// [`WINDOW`] (nothing says the registry is still busy).
    fn now(&mut self, now: Instant) -> usize {
        if self
            .last_learnt
            .is_some_and(|last| now.duration_since(last) >= WINDOW)
        {
            self.current = self.per_host as f64;
            self.recent = None;
            self.last_learnt = None;
        }
        (self.current.round() as usize).clamp(self.least(), self.per_host)
    }

    /// Learns from one caller's request that held its slot for `took`.
    fn learn(&mut self, took: Duration, now: Instant) {
        if now.duration_since(self.window_started) >= WINDOW {
            self.shortest_before = self.shortest.take();
            self.window_started = now;
        }
        let shortest = self.shortest.map_or(took, |s| s.min(took));
        self.shortest = Some(shortest);
        self.last_learnt = Some(now);
        let shortest = self.shortest_before.map_or(shortest, |b| b.min(shortest));
        let took = took.as_secs_f64();
        let recent = self
            .recent
            .map_or(took, |r| r * (1.0 - RECENT_WEIGHT) + took * RECENT_WEIGHT);
        self.recent = Some(recent);
        let gradient = (shortest.as_secs_f64() * TOLERANCE / recent.max(1e-9)).clamp(0.5, 1.0);
        // At a gradient of 1 the limit grows by its square root (room for a queue's worth);
        // at 0.5 it settles at 4, where that room is the limit's half.
        let suggested = self.current * gradient + self.current.sqrt();
        self.current = (self.current * (1.0 - SMOOTHING) + suggested * SMOOTHING)
            .clamp(self.least() as f64, self.per_host as f64);
    }
}

/// The callers waiting for a host: a queue per client, and the clients in the order they
/// take their turns (each client with a waiter appears once).
#[derive(Default)]
struct Callers {
    queues: HashMap<CallerId, VecDeque<oneshot::Sender<()>>>,
    turns: VecDeque<CallerId>,
}

impl Callers {
    fn push(&mut self, client: CallerId, waiter: oneshot::Sender<()>) {
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
    lane: Lane,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(mut granted) = self.granted.take() {
            granted.close();
            if granted.try_recv().is_ok() {
                self.host.lock().release(self.lane, None);
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let took = (self.lane == Lane::Caller).then(|| self.granted.elapsed());
        self.host.lock().release(self.lane, took);
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

    /// `n` callers' requests that each took `took`, a millisecond apart after `at`; the time
    /// of the last.
    fn learn_n(limit: &mut Limit, took: Duration, n: u32, at: Instant) -> Instant {
        let mut now = at;
        for _ in 0..n {
            now += Duration::from_millis(1);
            limit.learn(took, now);
        }
        now
    }

    #[test]
    fn the_limit_shrinks_while_the_registry_queues_and_grows_back() {
        let mut limit = Limit::new(32);
        // Quick answers, with some spread: no queue, the limit stays whole.
        let mut now = Instant::now();
        for i in 0..200 {
            now += Duration::from_millis(1);
            limit.learn(Duration::from_micros(400 + (i % 5) * 100), now);
        }
        assert_eq!(limit.now(now), 32);
        // Twenty times the shortest: the registry queues them.
        now = learn_n(&mut limit, Duration::from_millis(10), 100, now);
        assert_eq!(limit.now(now), MIN_PER_HOST);
        // Quick again: back up.
        now = learn_n(&mut limit, Duration::from_micros(500), 200, now);
        assert_eq!(limit.now(now), 32);
        // Slow again, then no caller for a window: whole again.
        now = learn_n(&mut limit, Duration::from_millis(10), 30, now);
        assert!(limit.now(now) < 16, "{}", limit.now(now));
        assert_eq!(limit.now(now + WINDOW), 32);
    }

    #[test]
    fn a_distant_registry_keeps_its_requests_in_flight() {
        // Round trips of 20 to 40 ms: slow, and spread, but not queued.
        let mut limit = Limit::new(32);
        let mut now = Instant::now();
        for i in 0..500u64 {
            now += Duration::from_millis(2);
            limit.learn(Duration::from_millis(20 + (i * 7) % 21), now);
        }
        assert_eq!(limit.now(now), 32);
    }

    #[tokio::test]
    async fn builds_leave_callers_a_reserve_even_when_the_limit_shrinks() {
        let limits = Arc::new(HostLimits::new(8));
        assert_eq!(reserve(8), 2);
        // Builds take six slots of eight; a seventh waits, two slots kept for callers.
        let mut builds = Vec::new();
        for _ in 0..6 {
            builds.push(limits.slot("r", Lane::Build).await);
        }
        // Polled by hand: pending means it waits, with no time allowed for it to get there.
        let seventh = limits.slot("r", Lane::Build);
        tokio::pin!(seventh);
        assert!(
            futures::poll!(&mut seventh).is_pending(),
            "a build took a caller's reserve"
        );
        // Callers' requests slow down (the registry queues): the limit falls below the
        // builds in flight, yet a caller still gets a slot at once, from the reserve.
        {
            let hosts = limits.hosts.lock();
            let mut host = hosts["r"].lock();
            let start = Instant::now();
            learn_n(&mut host.limit, Duration::from_micros(300), 20, start);
            learn_n(&mut host.limit, Duration::from_millis(20), 100, start);
        }
        assert_eq!(limits.limit_of("r"), MIN_PER_HOST);
        let caller = tokio::time::timeout(Duration::from_secs(1), limits.slot("r", Lane::Caller))
            .await
            .expect("a caller waited for builds' requests to end");
        // Builds' requests end; the seventh goes only once fewer than the limit are in
        // flight (three builds and the caller are not fewer than four).
        drop(builds.drain(..3));
        assert!(
            futures::poll!(&mut seventh).is_pending(),
            "past the shrunk limit"
        );
        drop(builds.pop());
        drop(
            tokio::time::timeout(Duration::from_secs(1), seventh)
                .await
                .expect("the seventh build never went"),
        );
        drop(caller);
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
            |port| CallerId::of_peer(Some(std::net::SocketAddr::from(([127, 0, 0, 1], port))));
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
