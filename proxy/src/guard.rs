//! Per-source-address limits, shared by every core: how many handshakes one address may hold
//! at once, and how many failed joins and logins (token and password guesses) it may make.
//!
//! Both tables are bounded ([`MAX_TRACKED_SOURCES`]): an attacker with many addresses fills
//! them, and then the proxy-wide limits (`limits.max_handshakes_in_progress`, the argon2
//! concurrency cap) still hold.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Failed joins and logins one address may make within [`AUTH_FAILURE_WINDOW`] before it is
/// refused (without checking) until the window ends. Ten is generous for typing a password
/// wrong or pasting an old token, and makes guessing a 256-bit token or a password hopeless.
pub const AUTH_FAILURE_LIMIT: u32 = 10;

/// The window of [`AUTH_FAILURE_LIMIT`].
pub const AUTH_FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// Most addresses tracked in each table; beyond it, new addresses are not limited per address
/// (the proxy-wide limits still apply) and expired entries are swept.
pub const MAX_TRACKED_SOURCES: usize = 65_536;

#[derive(Debug)]
struct Failures {
    count: u32,
    since: Instant,
}

#[derive(Debug, Default)]
struct Tables {
    handshakes: HashMap<IpAddr, u32>,
    failures: HashMap<IpAddr, Failures>,
}

/// The shared limits.
#[derive(Debug)]
pub struct SourceGuard {
    per_source_handshakes: u32,
    tables: Mutex<Tables>,
}

/// One handshake slot of an address; released on drop.
#[derive(Debug)]
pub struct SourceSlot {
    guard: Arc<SourceGuard>,
    source: IpAddr,
    counted: bool,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        if !self.counted {
            return;
        }
        let mut tables = self.guard.lock();
        if let Some(n) = tables.handshakes.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                tables.handshakes.remove(&self.source);
            }
        }
    }
}

impl SourceGuard {
    /// Limits with `per_source_handshakes` handshakes in progress per address.
    pub fn new(per_source_handshakes: u32) -> Self {
        SourceGuard {
            per_source_handshakes,
            tables: Mutex::new(Tables::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Tables> {
        // Counters only: a panic elsewhere cannot leave them in a state worse than a miscount.
        self.tables.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A handshake slot for `source`, or `None` when it holds `limits.max_handshakes_per_source`.
    pub fn enter(self: &Arc<Self>, source: IpAddr) -> Option<SourceSlot> {
        let mut tables = self.lock();
        let tracked = tables.handshakes.len();
        let counted = match tables.handshakes.get_mut(&source) {
            Some(n) if *n >= self.per_source_handshakes => return None,
            Some(n) => {
                *n += 1;
                true
            }
            None if tracked < MAX_TRACKED_SOURCES => {
                tables.handshakes.insert(source, 1);
                true
            }
            None => false,
        };
        Some(SourceSlot {
            guard: self.clone(),
            source,
            counted,
        })
    }

    /// Whether `source` has used up its failed joins and logins; if so, for how much longer.
    pub fn auth_blocked(&self, source: IpAddr, now: Instant) -> Option<Duration> {
        let tables = self.lock();
        let f = tables.failures.get(&source)?;
        let ends = f.since + AUTH_FAILURE_WINDOW;
        (f.count >= AUTH_FAILURE_LIMIT && ends > now).then(|| ends - now)
    }

    /// Counts a failed join or login of `source`; returns whether it is now blocked.
    pub fn auth_failed(&self, source: IpAddr, now: Instant) -> bool {
        let mut tables = self.lock();
        if tables.failures.len() >= MAX_TRACKED_SOURCES {
            tables
                .failures
                .retain(|_, f| f.since + AUTH_FAILURE_WINDOW > now);
            if tables.failures.len() >= MAX_TRACKED_SOURCES {
                return false;
            }
        }
        let f = tables.failures.entry(source).or_insert(Failures {
            count: 0,
            since: now,
        });
        if f.since + AUTH_FAILURE_WINDOW <= now {
            *f = Failures {
                count: 0,
                since: now,
            };
        }
        f.count += 1;
        f.count >= AUTH_FAILURE_LIMIT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshakes_per_source_are_capped_and_released() {
        let guard = Arc::new(SourceGuard::new(2));
        let a: IpAddr = "127.0.0.2".parse().unwrap_or(IpAddr::from([127, 0, 0, 2]));
        let b = IpAddr::from([127, 0, 0, 3]);
        let first = guard.enter(a);
        let second = guard.enter(a);
        assert!(first.is_some() && second.is_some());
        assert!(
            guard.enter(a).is_none(),
            "a third slot for the same address"
        );
        assert!(
            guard.enter(b).is_some(),
            "another address is not limited by the first"
        );
        drop(first);
        assert!(guard.enter(a).is_some(), "a released slot is usable again");
    }

    #[test]
    fn failures_block_for_the_rest_of_the_window() {
        let guard = SourceGuard::new(1);
        let a = IpAddr::from([10, 0, 0, 1]);
        let t0 = Instant::now();
        for i in 1..AUTH_FAILURE_LIMIT {
            assert!(!guard.auth_failed(a, t0), "blocked after {i} failures");
            assert!(guard.auth_blocked(a, t0).is_none());
        }
        assert!(guard.auth_failed(a, t0));
        let left = guard.auth_blocked(a, t0 + Duration::from_secs(1));
        assert_eq!(left, Some(AUTH_FAILURE_WINDOW - Duration::from_secs(1)));
        assert!(
            guard
                .auth_blocked(IpAddr::from([10, 0, 0, 2]), t0)
                .is_none()
        );
        assert!(guard.auth_blocked(a, t0 + AUTH_FAILURE_WINDOW).is_none());
        assert!(
            !guard.auth_failed(a, t0 + AUTH_FAILURE_WINDOW),
            "a new window starts at zero"
        );
    }
}
