//! Per-account lockout after failed password logins (`limits.login_lockout_failures`,
//! `limits.login_lockout`): guessing one account's password from many addresses stops after a
//! few tries, whatever the per-address limits of [`crate::guard`] allow.
//!
//! Only existing users are counted (a login for an unknown name never enters the table), so
//! the table holds at most one entry per user. While an account is locked out its logins are
//! refused without checking the password, so the lockout also stops the guessing (and the
//! Argon2 work it costs). It ends after `limits.login_lockout`, at a successful login after
//! it, or with `remoteler-proxy users unlock`. The state is in memory, shared by every core:
//! a restart lifts every lockout.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

/// Failed logins per account, shared by every core.
#[derive(Debug)]
pub struct LoginLockout {
    failures: u32,
    duration: Duration,
    accounts: Mutex<HashMap<String, Account>>,
}

#[derive(Debug, Clone, Copy)]
struct Account {
    /// Failed logins in a row (a success or the end of a lockout resets it).
    failed: u32,
    /// The last failure: a run of failures older than the lockout duration is forgotten.
    last: Instant,
    /// Locked out until then.
    until: Option<(Instant, SystemTime)>,
}

/// An account that is locked out now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockedOut {
    /// When the lockout ends by itself.
    pub until: SystemTime,
    /// How many failures started it (`limits.login_lockout_failures`).
    pub failures: u32,
}

impl LoginLockout {
    /// Locks an account out for `duration` after `failures` failed logins in a row.
    pub fn new(failures: u32, duration: Duration) -> Self {
        LoginLockout {
            failures,
            duration,
            accounts: Mutex::new(HashMap::new()),
        }
    }

    fn accounts(&self) -> std::sync::MutexGuard<'_, HashMap<String, Account>> {
        self.accounts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `user` is locked out at `now`; an expired lockout is forgotten.
    pub fn check(&self, user: &str, now: Instant) -> Option<LockedOut> {
        let mut accounts = self.accounts();
        let account = accounts.get(user)?;
        match account.until {
            Some((until, wall)) if now < until => Some(LockedOut {
                until: wall,
                failures: self.failures,
            }),
            Some(_) => {
                accounts.remove(user);
                None
            }
            None => None,
        }
    }

    /// Counts a failed login of the existing user `user`; returns the lockout it starts,
    /// if this failure reaches `limits.login_lockout_failures`.
    pub fn failed(&self, user: &str, now: Instant) -> Option<LockedOut> {
        let mut accounts = self.accounts();
        let account = accounts.entry(user.to_owned()).or_insert(Account {
            failed: 0,
            last: now,
            until: None,
        });
        if account.until.is_some() {
            return None; // counted while locked out: nothing was checked
        }
        if now.saturating_duration_since(account.last) > self.duration {
            account.failed = 0;
        }
        account.failed = account.failed.saturating_add(1);
        account.last = now;
        if account.failed < self.failures {
            return None;
        }
        let wall = SystemTime::now() + self.duration;
        account.until = Some((now + self.duration, wall));
        Some(LockedOut {
            until: wall,
            failures: self.failures,
        })
    }

    /// A successful login of `user`: its run of failures ends.
    pub fn succeeded(&self, user: &str) {
        self.accounts().remove(user);
    }

    /// `users unlock`: lifts `user`'s lockout and forgets its failures; whether it was
    /// locked out.
    pub fn unlock(&self, user: &str) -> bool {
        self.accounts()
            .remove(user)
            .is_some_and(|a| a.until.is_some())
    }

    /// Lifts `user`'s lockout if it began no later than the second `unlocked_unix` of a
    /// `users unlock` (one the proxy has not applied yet: a login reads the state file before
    /// the watcher does).
    pub fn unlock_if_before(&self, user: &str, unlocked_unix: u64) {
        let mut accounts = self.accounts();
        let began = accounts
            .get(user)
            .and_then(|a| a.until)
            .and_then(|(_, wall)| wall.checked_sub(self.duration))
            .and_then(|began| began.duration_since(std::time::UNIX_EPOCH).ok());
        if began.is_some_and(|began| began.as_secs() <= unlocked_unix) {
            accounts.remove(user);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locked_out_after_the_failures_until_unlocked_or_expired() {
        let lockout = LoginLockout::new(3, Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(lockout.failed("alice", t0), None);
        assert_eq!(lockout.failed("alice", t0), None);
        assert!(lockout.check("alice", t0).is_none());
        let locked = lockout.failed("alice", t0).unwrap();
        assert_eq!(locked.failures, 3);
        assert!(
            lockout
                .check("alice", t0 + Duration::from_secs(59))
                .is_some()
        );
        assert!(
            lockout.check("bob", t0).is_none(),
            "other accounts untouched"
        );
        assert!(
            lockout
                .check("alice", t0 + Duration::from_secs(61))
                .is_none()
        );
        assert_eq!(lockout.failed("alice", t0 + Duration::from_secs(62)), None);

        for _ in 0..3 {
            lockout.failed("bob", t0);
        }
        assert!(lockout.check("bob", t0).is_some());
        assert!(lockout.unlock("bob"));
        assert!(lockout.check("bob", t0).is_none());
        assert!(!lockout.unlock("bob"));
    }

    #[test]
    fn old_failures_are_forgotten_and_success_resets() {
        let lockout = LoginLockout::new(2, Duration::from_secs(60));
        let t0 = Instant::now();
        lockout.failed("alice", t0);
        assert_eq!(lockout.failed("alice", t0 + Duration::from_secs(120)), None);
        lockout.succeeded("alice");
        assert_eq!(lockout.failed("alice", t0 + Duration::from_secs(121)), None);
        assert!(
            lockout
                .failed("alice", t0 + Duration::from_secs(122))
                .is_some()
        );
        lockout.unlock_if_before("alice", crate::util::unix_now() - 3600);
        assert!(
            lockout
                .check("alice", t0 + Duration::from_secs(122))
                .is_some()
        );
        lockout.unlock_if_before("alice", crate::util::unix_now());
        assert!(
            lockout
                .check("alice", t0 + Duration::from_secs(122))
                .is_none()
        );
    }
}
