//! Limits on unauthenticated peers, shared by every core: the handshake table (connections in
//! their TLS handshake or first request, in all and per source), failed joins and logins
//! (token and password guesses) per source, and a fair queue for password checks.
//!
//! Sources are counted by **group** ([`SourceGroup`]: an IPv4 /24 or an IPv6 /64), the block
//! one host or customer commonly holds: counted by address, an attacker with a /24 would get
//! 256 quotas, and one with a /64 more than can be counted.
//!
//! Every table is bounded: the handshake table by `limits.max_handshakes_in_progress` (when it
//! is full, the oldest handshake of the group holding the most is evicted, so a flood from a
//! few groups cannot lock everyone else out), the failure table by [`MAX_TRACKED_SOURCES`]
//! (when full, the oldest entry is forgotten), the check queue by [`AUTH_FAILURE_LIMIT`] per
//! group (an attempt is reserved before it is checked).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Failed joins and logins one source group may make within [`AUTH_FAILURE_WINDOW`] before
/// it is refused (without checking) until the window ends. Ten is generous for typing a
/// password wrong or pasting an old token, and makes guessing a 256-bit token or a password
/// hopeless. Attempts in progress count: a burst gets at most ten checked.
pub const AUTH_FAILURE_LIMIT: u32 = 10;

/// The window of [`AUTH_FAILURE_LIMIT`].
pub const AUTH_FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// Most source groups tracked in the failure table; when it is full of live entries, the
/// oldest is forgotten (an attacker with that many groups gets a fresh count for one of
/// them, instead of nobody being counted any more).
pub const MAX_TRACKED_SOURCES: usize = 65_536;

/// Password checks running at once, proxy-wide: each is a thread and 19 MiB of argon2
/// memory.
pub const MAX_CONCURRENT_CHECKS: u32 = 8;

/// Password checks running at once for one source group: a group that floods waits behind
/// itself and leaves the other slots to everyone else.
pub const MAX_CHECKS_PER_GROUP: u32 = 2;

/// How long a login waits in the check queue before it is answered "busy".
pub const CHECK_QUEUE_WAIT: Duration = Duration::from_secs(10);

/// The unit the per-source limits count: the /24 of an IPv4 address, the /64 of an IPv6
/// address (an IPv4-mapped IPv6 address counts as IPv4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceGroup(IpAddr);

impl SourceGroup {
    /// The group of `ip`.
    pub fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(a) => {
                let [a, b, c, _] = a.octets();
                SourceGroup(IpAddr::V4(Ipv4Addr::new(a, b, c, 0)))
            }
            IpAddr::V6(a) => {
                let s = a.segments();
                SourceGroup(IpAddr::V6(Ipv6Addr::new(
                    s[0], s[1], s[2], s[3], 0, 0, 0, 0,
                )))
            }
        }
    }
}

impl std::fmt::Display for SourceGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(a) => write!(f, "{a}/24"),
            IpAddr::V6(a) => write!(f, "{a}/64"),
        }
    }
}

#[derive(Debug)]
struct Failures {
    /// Attempts that failed in this window.
    failed: u32,
    /// Attempts being checked now: they count against the limit until they are settled.
    pending: u32,
    since: Instant,
}

impl Failures {
    fn new(since: Instant) -> Self {
        Failures {
            failed: 0,
            pending: 0,
            since,
        }
    }
}

/// A connection in the handshake table.
#[derive(Debug)]
struct Handshake {
    group: SourceGroup,
    /// Never sent on: dropping it (eviction) tells the connection's task to stop.
    _evict: flume::Sender<()>,
}

/// A login waiting for a password check.
#[derive(Debug)]
struct Waiter {
    id: u64,
    group: SourceGroup,
    turn: flume::Sender<()>,
}

#[derive(Debug, Default)]
struct Checks {
    running: u32,
    per_group: HashMap<SourceGroup, u32>,
    waiting: VecDeque<Waiter>,
}

impl Checks {
    fn may_start(&self, group: SourceGroup) -> bool {
        self.running < MAX_CONCURRENT_CHECKS
            && self.per_group.get(&group).copied().unwrap_or(0) < MAX_CHECKS_PER_GROUP
    }

    fn start(&mut self, group: SourceGroup) {
        self.running += 1;
        *self.per_group.entry(group).or_default() += 1;
    }

    /// Ends a check of `group` and starts the waiting ones that may run now, in order of
    /// arrival, skipping groups at their own cap.
    fn finish(&mut self, group: SourceGroup) {
        self.running = self.running.saturating_sub(1);
        if let Some(n) = self.per_group.get_mut(&group) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_group.remove(&group);
            }
        }
        while self.running < MAX_CONCURRENT_CHECKS {
            let Some(i) = self.waiting.iter().position(|w| self.may_start(w.group)) else {
                break;
            };
            let Some(next) = self.waiting.remove(i) else {
                break;
            };
            self.start(next.group);
            // Its receiver lives as long as it is queued (its Drop dequeues it under this lock).
            let _ = next.turn.try_send(());
        }
    }
}

#[derive(Debug, Default)]
struct Tables {
    next_id: u64,
    /// Every connection in its handshake, oldest first.
    handshakes: BTreeMap<u64, Handshake>,
    /// The same by source group, oldest first.
    groups: HashMap<SourceGroup, BTreeSet<u64>>,
    failures: HashMap<SourceGroup, Failures>,
    checks: Checks,
}

impl Tables {
    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn remove_handshake(&mut self, id: u64) {
        let Some(h) = self.handshakes.remove(&id) else {
            return;
        };
        if let Some(ids) = self.groups.get_mut(&h.group) {
            ids.remove(&id);
            if ids.is_empty() {
                self.groups.remove(&h.group);
            }
        }
    }

    /// Evicts the oldest handshake of the group that holds the most (of equals, the group
    /// with the oldest one): a flood evicts itself, a group with one login in progress is
    /// the last to lose it.
    fn evict_one(&mut self) -> Option<SourceGroup> {
        let (_, std::cmp::Reverse(id), group) = self
            .groups
            .iter()
            .filter_map(|(g, ids)| {
                ids.first()
                    .map(|&oldest| (ids.len(), std::cmp::Reverse(oldest), *g))
            })
            .max()?;
        self.remove_handshake(id);
        Some(group)
    }
}

/// The shared limits.
#[derive(Debug)]
pub struct SourceGuard {
    max_handshakes: usize,
    per_group_handshakes: usize,
    tables: Mutex<Tables>,
}

/// A connection's place in the handshake table; released on drop. Another connection may
/// evict it when the table is full: [`SourceSlot::evicted`] then completes.
#[derive(Debug)]
pub struct SourceSlot {
    guard: Arc<SourceGuard>,
    id: u64,
    group: SourceGroup,
    evict: flume::Receiver<()>,
}

impl SourceSlot {
    /// The connection's source group.
    pub fn group(&self) -> SourceGroup {
        self.group
    }

    /// Completes once this connection has been evicted from the handshake table; its task
    /// should then close it.
    pub async fn evicted(&self) {
        // Nothing is ever sent: the only outcome is the sender's drop.
        let _ = self.evict.recv_async().await;
    }

    /// Whether the connection has been evicted.
    pub fn is_evicted(&self) -> bool {
        self.evict.is_disconnected()
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        self.guard.lock().remove_handshake(self.id);
    }
}

/// A connection let into the handshake table.
#[derive(Debug)]
pub struct Admission {
    /// Its place.
    pub slot: SourceSlot,
    /// The group of the connection evicted to make room, if the table was full.
    pub evicted: Option<SourceGroup>,
}

/// Why [`SourceGuard::begin_attempt`] refused an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptRefused {
    /// The group failed [`AUTH_FAILURE_LIMIT`] times in the window; it ends in this long.
    Blocked(Duration),
    /// The group's failures and the attempts being checked now reach the limit: try again
    /// once those are answered.
    Checking {
        /// Attempts being checked now.
        checking: u32,
    },
}

/// A join or login attempt counted against its source group before it is checked. Dropped
/// without [`AuthAttempt::failed`] (it succeeded, or was not a guess), it is given back.
#[derive(Debug)]
pub struct AuthAttempt {
    guard: Arc<SourceGuard>,
    group: SourceGroup,
    since: Instant,
    settled: bool,
}

impl AuthAttempt {
    /// The attempt failed: it stays counted. Returns whether this failure used up the
    /// group's allowance (true once per window: the group is refused from now on).
    pub fn failed(mut self) -> bool {
        self.settled = true;
        let mut tables = self.guard.lock();
        let Some(f) = tables.failures.get_mut(&self.group) else {
            return false;
        };
        if f.since != self.since {
            return false; // the entry was evicted and made again meanwhile
        }
        f.pending = f.pending.saturating_sub(1);
        f.failed += 1;
        f.failed >= AUTH_FAILURE_LIMIT
    }
}

impl Drop for AuthAttempt {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let mut tables = self.guard.lock();
        let Some(f) = tables.failures.get_mut(&self.group) else {
            return;
        };
        if f.since != self.since {
            return; // a new window (or the entry was evicted and made again)
        }
        f.pending = f.pending.saturating_sub(1);
        if f.pending == 0 && f.failed == 0 {
            tables.failures.remove(&self.group);
        }
    }
}

/// A turn at a password check (one of [`MAX_CONCURRENT_CHECKS`]); given back on drop.
#[derive(Debug)]
pub struct CheckTurn {
    guard: Arc<SourceGuard>,
    group: SourceGroup,
}

impl Drop for CheckTurn {
    fn drop(&mut self) {
        self.guard.lock().checks.finish(self.group);
    }
}

/// A place in the check queue: dequeued on drop, or, if the turn came meanwhile, the turn
/// given back.
struct Queued {
    guard: Arc<SourceGuard>,
    id: u64,
    group: SourceGroup,
    turn: Option<flume::Receiver<()>>,
}

impl Drop for Queued {
    fn drop(&mut self) {
        if self.turn.is_none() {
            return; // became a CheckTurn
        }
        let mut tables = self.guard.lock();
        let queue = &mut tables.checks.waiting;
        match queue.iter().position(|w| w.id == self.id) {
            Some(i) => drop(queue.remove(i)),
            None => tables.checks.finish(self.group),
        }
    }
}

impl SourceGuard {
    /// Limits with `max_handshakes` connections in the handshake table, `per_group` of them
    /// from one source group.
    pub fn new(max_handshakes: u32, per_group: u32) -> Self {
        SourceGuard {
            max_handshakes: usize::try_from(max_handshakes.max(1)).unwrap_or(usize::MAX),
            per_group_handshakes: usize::try_from(per_group.max(1)).unwrap_or(usize::MAX),
            tables: Mutex::new(Tables::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Tables> {
        // Counters only: a panic elsewhere cannot leave them in a state worse than a miscount.
        self.tables.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A place in the handshake table for a connection from `source`, or `None` when its
    /// group holds `limits.max_handshakes_per_source`. When the table is full
    /// (`limits.max_handshakes_in_progress`) the oldest connection of the group holding the
    /// most is evicted to make room.
    pub fn enter(self: &Arc<Self>, source: IpAddr) -> Option<Admission> {
        let group = SourceGroup::of(source);
        let mut tables = self.lock();
        let held = tables.groups.get(&group).map_or(0, BTreeSet::len);
        if held >= self.per_group_handshakes {
            return None;
        }
        let evicted = if tables.handshakes.len() >= self.max_handshakes {
            tables.evict_one()
        } else {
            None
        };
        let id = tables.next_id();
        let (evict, evicted_rx) = flume::bounded(1);
        tables.handshakes.insert(
            id,
            Handshake {
                group,
                _evict: evict,
            },
        );
        tables.groups.entry(group).or_default().insert(id);
        Some(Admission {
            slot: SourceSlot {
                guard: self.clone(),
                id,
                group,
                evict: evicted_rx,
            },
            evicted,
        })
    }

    /// Connections in the handshake table now.
    pub fn handshakes(&self) -> usize {
        self.lock().handshakes.len()
    }

    /// Whether the group of `source` has used up its failed joins and logins; if so, for how
    /// much longer.
    pub fn auth_blocked(&self, source: IpAddr, now: Instant) -> Option<Duration> {
        let tables = self.lock();
        let f = tables.failures.get(&SourceGroup::of(source))?;
        let ends = f.since + AUTH_FAILURE_WINDOW;
        (f.failed >= AUTH_FAILURE_LIMIT && ends > now).then(|| ends - now)
    }

    /// Counts a join or login attempt from `source` before it is checked, or says for how
    /// much longer its group is refused. Check and count are one step, so a burst of
    /// attempts gets at most [`AUTH_FAILURE_LIMIT`] checked.
    pub fn begin_attempt(
        self: &Arc<Self>,
        source: IpAddr,
        now: Instant,
    ) -> Result<AuthAttempt, AttemptRefused> {
        let group = SourceGroup::of(source);
        let mut tables = self.lock();
        if !tables.failures.contains_key(&group) && tables.failures.len() >= MAX_TRACKED_SOURCES {
            tables
                .failures
                .retain(|_, f| f.since + AUTH_FAILURE_WINDOW > now);
            if tables.failures.len() >= MAX_TRACKED_SOURCES {
                let oldest = tables
                    .failures
                    .iter()
                    .min_by_key(|(_, f)| f.since)
                    .map(|(g, _)| *g);
                if let Some(oldest) = oldest {
                    tables.failures.remove(&oldest);
                }
            }
        }
        let f = tables
            .failures
            .entry(group)
            .or_insert_with(|| Failures::new(now));
        if f.since + AUTH_FAILURE_WINDOW <= now {
            *f = Failures::new(now);
        }
        if f.failed >= AUTH_FAILURE_LIMIT {
            return Err(AttemptRefused::Blocked(f.since + AUTH_FAILURE_WINDOW - now));
        }
        if f.failed + f.pending >= AUTH_FAILURE_LIMIT {
            return Err(AttemptRefused::Checking {
                checking: f.pending,
            });
        }
        f.pending += 1;
        Ok(AuthAttempt {
            guard: self.clone(),
            group,
            since: f.since,
            settled: false,
        })
    }

    /// A turn at a password check for `source`: at once if fewer than
    /// [`MAX_CONCURRENT_CHECKS`] run and its group runs fewer than [`MAX_CHECKS_PER_GROUP`],
    /// else in order of arrival among the groups under their cap, within `wait`; `None`
    /// once `wait` has passed.
    pub async fn check_turn(self: &Arc<Self>, source: IpAddr, wait: Duration) -> Option<CheckTurn> {
        let group = SourceGroup::of(source);
        let mut queued = {
            let mut tables = self.lock();
            if tables.checks.may_start(group) {
                tables.checks.start(group);
                return Some(CheckTurn {
                    guard: self.clone(),
                    group,
                });
            }
            let id = tables.next_id();
            let (turn, rx) = flume::bounded(1);
            tables.checks.waiting.push_back(Waiter { id, group, turn });
            Queued {
                guard: self.clone(),
                id,
                group,
                turn: Some(rx),
            }
        };
        let rx = queued.turn.clone()?;
        match monoio::time::timeout(wait, rx.recv_async()).await {
            Ok(Ok(())) => {
                queued.turn = None;
                Some(CheckTurn {
                    guard: self.clone(),
                    group,
                })
            }
            // Timed out: `queued`'s drop dequeues it (or gives back a turn that just came).
            _ => None,
        }
    }

    /// Password checks running now.
    pub fn checks_running(&self) -> u32 {
        self.lock().checks.running
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::from([a, b, c, d])
    }

    #[test]
    fn sources_are_grouped_by_24_and_64() {
        assert_eq!(
            SourceGroup::of(v4(10, 1, 2, 3)),
            SourceGroup::of(v4(10, 1, 2, 200))
        );
        assert_ne!(
            SourceGroup::of(v4(10, 1, 2, 3)),
            SourceGroup::of(v4(10, 1, 3, 3))
        );
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap_or(v4(0, 0, 0, 0));
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap_or(v4(0, 0, 0, 1));
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap_or(v4(0, 0, 0, 2));
        assert_eq!(SourceGroup::of(a), SourceGroup::of(b));
        assert_ne!(SourceGroup::of(a), SourceGroup::of(c));
        let mapped: IpAddr = "::ffff:10.1.2.9".parse().unwrap_or(v4(0, 0, 0, 3));
        assert_eq!(SourceGroup::of(mapped), SourceGroup::of(v4(10, 1, 2, 3)));
        assert_eq!(SourceGroup::of(v4(10, 1, 2, 3)).to_string(), "10.1.2.0/24");
        assert_eq!(SourceGroup::of(a).to_string(), "2001:db8:1:2::/64");
    }

    #[test]
    fn handshakes_per_group_are_capped_and_released() {
        let guard = Arc::new(SourceGuard::new(100, 2));
        let first = guard.enter(v4(127, 0, 1, 2));
        let second = guard.enter(v4(127, 0, 1, 3));
        assert!(first.is_some() && second.is_some());
        assert!(
            guard.enter(v4(127, 0, 1, 4)).is_none(),
            "a third slot for the same /24"
        );
        assert!(
            guard.enter(v4(127, 0, 2, 2)).is_some(),
            "another /24 is not limited by the first"
        );
        drop(first);
        assert!(
            guard.enter(v4(127, 0, 1, 2)).is_some(),
            "a released slot is usable again"
        );
    }

    #[test]
    fn a_full_table_evicts_the_oldest_of_the_largest_group() {
        let guard = Arc::new(SourceGuard::new(4, 4));
        let flood: Vec<Admission> = (1..=3)
            .map(|i| guard.enter(v4(10, 0, 0, i)).expect("room"))
            .collect();
        let honest = guard.enter(v4(10, 9, 9, 9)).expect("room");
        assert!(honest.evicted.is_none());
        assert_eq!(guard.handshakes(), 4);
        let newcomer = guard.enter(v4(10, 7, 7, 7)).expect("evicts");
        assert_eq!(newcomer.evicted, Some(SourceGroup::of(v4(10, 0, 0, 1))));
        assert!(flood[0].slot.is_evicted(), "the flood's oldest goes first");
        assert!(!flood[1].slot.is_evicted() && !honest.slot.is_evicted());
        assert_eq!(guard.handshakes(), 4);
        // Dropping an evicted slot releases nothing twice.
        drop(flood);
        assert_eq!(guard.handshakes(), 2);
    }

    #[test]
    fn attempts_are_reserved_before_the_check() {
        let guard = Arc::new(SourceGuard::new(1, 1));
        let t0 = Instant::now();
        // A burst: ten attempts in flight, the eleventh refused before any is settled.
        let burst: Vec<AuthAttempt> = (0..AUTH_FAILURE_LIMIT)
            .map(|i| {
                guard
                    .begin_attempt(v4(10, 0, 0, 1), t0)
                    .unwrap_or_else(|_| panic!("attempt {i}"))
            })
            .collect();
        assert_eq!(
            guard.begin_attempt(v4(10, 0, 0, 99), t0).err(),
            Some(AttemptRefused::Checking { checking: 10 }),
            "same /24"
        );
        assert!(
            guard.begin_attempt(v4(10, 0, 1, 1), t0).is_ok(),
            "another /24"
        );
        // A success (or an answer that was no guess) gives its attempt back.
        let mut burst = burst.into_iter();
        drop(burst.next());
        let again = guard
            .begin_attempt(v4(10, 0, 0, 1), t0)
            .expect("given back");
        assert!(
            guard.begin_attempt(v4(10, 0, 0, 1), t0).is_err(),
            "full again"
        );
        drop(burst);
        drop(again);
        assert!(guard.auth_blocked(v4(10, 0, 0, 1), t0).is_none());
        assert!(
            guard.lock().failures.is_empty(),
            "empty entries are removed"
        );
    }

    #[test]
    fn failures_block_for_the_rest_of_the_window() {
        let guard = Arc::new(SourceGuard::new(1, 1));
        let a = v4(10, 0, 0, 1);
        let t0 = Instant::now();
        for i in 1..AUTH_FAILURE_LIMIT {
            let attempt = guard.begin_attempt(a, t0).expect("not blocked yet");
            assert!(!attempt.failed(), "blocked after {i} failures");
            assert!(guard.auth_blocked(a, t0).is_none());
        }
        assert!(guard.begin_attempt(a, t0).expect("tenth").failed());
        let left = guard.auth_blocked(a, t0 + Duration::from_secs(1));
        assert_eq!(left, Some(AUTH_FAILURE_WINDOW - Duration::from_secs(1)));
        assert_eq!(
            guard.begin_attempt(a, t0 + Duration::from_secs(1)).err(),
            left.map(AttemptRefused::Blocked)
        );
        assert!(guard.auth_blocked(v4(10, 0, 1, 2), t0).is_none());
        assert!(guard.auth_blocked(a, t0 + AUTH_FAILURE_WINDOW).is_none());
        assert!(
            !guard
                .begin_attempt(a, t0 + AUTH_FAILURE_WINDOW)
                .expect("a new window")
                .failed(),
            "a new window starts at zero"
        );
    }

    #[test]
    fn a_full_failure_table_evicts_the_oldest_entry() {
        let guard = Arc::new(SourceGuard::new(1, 1));
        let t0 = Instant::now();
        let group_ip = |i: usize| {
            let [_, _, b, c] = u32::try_from(i).unwrap_or(0).to_be_bytes();
            v4(10, b, c, 1)
        };
        for i in 0..MAX_TRACKED_SOURCES {
            let at = t0 + Duration::from_micros(u64::try_from(i).unwrap_or(0));
            let _ = guard
                .begin_attempt(group_ip(i), at)
                .map(AuthAttempt::failed);
        }
        assert_eq!(guard.lock().failures.len(), MAX_TRACKED_SOURCES);
        // A new group is still counted: the oldest entry makes room.
        let late = t0 + Duration::from_secs(1);
        let newcomer = v4(11, 0, 0, 1);
        for _ in 0..AUTH_FAILURE_LIMIT {
            let _ = guard.begin_attempt(newcomer, late).map(AuthAttempt::failed);
        }
        assert!(
            guard.auth_blocked(newcomer, late).is_some(),
            "counted when the table is full"
        );
        assert_eq!(guard.lock().failures.len(), MAX_TRACKED_SOURCES);
        assert!(
            !guard
                .lock()
                .failures
                .contains_key(&SourceGroup::of(group_ip(0))),
            "the oldest entry was evicted"
        );
    }

    #[test]
    fn checks_are_shared_fairly_between_groups() {
        let guard = Arc::new(SourceGuard::new(1, 1));
        let mut runtime = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let short = Duration::from_millis(1);
            let flood = v4(10, 0, 0, 1);
            let mut turns = Vec::new();
            for _ in 0..MAX_CHECKS_PER_GROUP {
                turns.push(
                    guard
                        .check_turn(flood, short)
                        .await
                        .expect("under the group cap"),
                );
            }
            assert!(
                guard.check_turn(flood, short).await.is_none(),
                "a group gets at most its cap"
            );
            for i in 0..(MAX_CONCURRENT_CHECKS - MAX_CHECKS_PER_GROUP) {
                let other = v4(10, 1, u8::try_from(i).unwrap_or(0), 1);
                turns.push(
                    guard
                        .check_turn(other, short)
                        .await
                        .expect("other groups run"),
                );
            }
            assert_eq!(guard.checks_running(), MAX_CONCURRENT_CHECKS);
            // Full: a waiting login gets the next free turn.
            let waiting = guard.check_turn(v4(10, 2, 0, 1), Duration::from_secs(5));
            let release = async {
                monoio::time::sleep(Duration::from_millis(20)).await;
                turns.pop();
            };
            let (turn, ()) = monoio::join!(waiting, release);
            assert!(turn.is_some(), "a queued check runs when a turn is free");
            drop(turn);
            drop(turns);
            assert_eq!(guard.checks_running(), 0);
        });
    }
}
