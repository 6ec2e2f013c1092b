//! Jittered exponential backoff between reconnection attempts.
//!
//! The wait before attempt `n` (0-based count of failures since the last stable tunnel) is
//! drawn uniformly from `[min, cap]`, where `cap = min(max, min * 2^(n+1))`: "full jitter"
//! above a floor of `backoff.min`. The first retry is jittered too (over `[min, 2 min]`): the
//! load test showed that without it every agent of a restarted proxy came back in the same
//! instant and overflowed its listen queue. The floor keeps a flapping proxy from being hammered; the jitter
//! spreads ten thousand agents that lost the same proxy at the same moment over the whole
//! window instead of reconnecting in step.

use std::time::Duration;

use config::BackoffConfig;

/// A tunnel that stayed up at least this long counts as stable: the next failure starts the
/// backoff over from `backoff.min`.
pub const STABLE_AFTER: Duration = Duration::from_secs(30);

/// The state of one reconnect loop.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
    rng: fastrand::Rng,
}

impl Backoff {
    /// A fresh backoff with the configured bounds.
    pub fn new(config: &BackoffConfig) -> Self {
        Self::with_rng(config, fastrand::Rng::new())
    }

    /// As [`Backoff::new`] with a given random source (tests).
    pub fn with_rng(config: &BackoffConfig, rng: fastrand::Rng) -> Self {
        Backoff {
            min: config.min(),
            max: config.max(),
            failures: 0,
            rng,
        }
    }

    /// The largest wait the next call to [`Backoff::next_delay`] can return.
    pub fn cap(&self) -> Duration {
        let factor = 1u32
            .checked_shl(self.failures.saturating_add(1).min(31))
            .unwrap_or(u32::MAX);
        self.min.saturating_mul(factor).min(self.max)
    }

    /// The wait before the next attempt; counts one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let cap = self.cap();
        self.failures = self.failures.saturating_add(1);
        let span = cap.saturating_sub(self.min).as_millis();
        let span = u64::try_from(span).unwrap_or(u64::MAX);
        self.min + Duration::from_millis(self.rng.u64(0..=span))
    }

    /// Failures counted since the last reset.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Starts over from `backoff.min` (after a stable connection).
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn config(min_ms: u64, max_ms: u64) -> BackoffConfig {
        BackoffConfig::new(Duration::from_millis(min_ms), Duration::from_millis(max_ms)).unwrap()
    }

    #[test]
    fn delays_stay_within_bounds_and_grow() {
        let mut b = Backoff::with_rng(&config(100, 5_000), fastrand::Rng::with_seed(7));
        let mut caps = Vec::new();
        for _ in 0..40 {
            let cap = b.cap();
            let d = b.next_delay();
            assert!(d >= Duration::from_millis(100), "{d:?} below min");
            assert!(d <= cap, "{d:?} above cap {cap:?}");
            assert!(d <= Duration::from_millis(5_000), "{d:?} above max");
            caps.push(cap);
        }
        assert_eq!(
            caps[0],
            Duration::from_millis(200),
            "the first retry is jittered too"
        );
        assert_eq!(caps[1], Duration::from_millis(400));
        assert_eq!(caps[2], Duration::from_millis(800));
        assert_eq!(*caps.last().unwrap(), Duration::from_millis(5_000));
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut b = Backoff::with_rng(&config(100, 10_000), fastrand::Rng::with_seed(1));
        for _ in 0..10 {
            b.next_delay();
        }
        let delays: std::collections::HashSet<_> = (0..20).map(|_| b.next_delay()).collect();
        assert!(delays.len() > 10, "no jitter: {delays:?}");
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new(&config(100, 60_000));
        for _ in 0..10 {
            b.next_delay();
        }
        assert_eq!(b.cap(), Duration::from_millis(60_000));
        b.reset();
        assert_eq!(b.failures(), 0);
        assert_eq!(b.cap(), Duration::from_millis(200));
        let d = b.next_delay();
        assert!(
            (Duration::from_millis(100)..=Duration::from_millis(200)).contains(&d),
            "{d:?}"
        );
    }

    #[test]
    fn many_failures_do_not_overflow() {
        let mut b = Backoff::new(&config(100, 3_600_000));
        for _ in 0..1000 {
            assert!(b.next_delay() <= Duration::from_secs(3600));
        }
    }
}
