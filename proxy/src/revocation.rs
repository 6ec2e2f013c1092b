//! Removed nodes (`remoteler-proxy nodes rm`) and removed or locked users (`users rm`,
//! `users lock`): the CLI records the removal in the state file; the running proxy notices the
//! change (core 0 looks at the file's modification time every [`CHECK_INTERVAL`]), refuses
//! the certificates from then on and closes the node's tunnel or the user's connections.
//!
//! A removal names the node or user and the time: every certificate of that name issued at or
//! before it is refused. A certificate issued later (the node joined again with a new token,
//! the user was added again or unlocked and logged in again) is accepted, so removing and
//! re-adding needs no other cleanup. A locked user cannot log in until `users unlock`, so no
//! certificate is issued after the lock meanwhile.

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tunnel::identity::{CLOCK_SKEW_ALLOWANCE, PeerIdentity};

use crate::state::{State, UserRevocation};

/// How often the proxy looks for a changed state file: a removed user's sessions end within
/// this (plus a moment), so well under the second the operator is promised.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// The removed nodes and the removed or locked users, shared by every core.
#[derive(Debug, Default)]
pub struct Revocations {
    removed: RwLock<HashMap<String, u64>>,
    users: RwLock<HashMap<String, UserBan>>,
}

/// What the state file says against a user's certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct UserBan {
    /// Certificates issued at or before this (Unix seconds) are refused.
    revoked_unix: u64,
    /// Why: the user was removed or locked.
    why: UserRevocation,
    /// Locked now (for the message: the user must be unlocked first).
    locked: bool,
    /// The last `users unlock`, Unix seconds.
    unlocked_unix: Option<u64>,
}

/// A change to a user's standing the proxy noticed in the state file: to audit, and to act on
/// (close the user's connections, lift a login lockout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserChange {
    /// `users rm`: certificates issued up to `at` are refused.
    Removed { user: String, at: u64 },
    /// `users lock`: every certificate is refused until `users unlock`.
    Locked { user: String, at: u64 },
    /// `users unlock`.
    Unlocked { user: String, at: u64 },
}

impl UserChange {
    /// The user it is about.
    pub fn user(&self) -> &str {
        match self {
            UserChange::Removed { user, .. }
            | UserChange::Locked { user, .. }
            | UserChange::Unlocked { user, .. } => user,
        }
    }
}

impl Revocations {
    /// Replaces the list with the state file's; returns the names newly removed (or removed
    /// again).
    pub fn load(&self, state: &State) -> Vec<String> {
        let next: HashMap<String, u64> = state
            .revoked_nodes
            .iter()
            .map(|r| (r.name.clone(), r.revoked_unix))
            .collect();
        let mut removed = self.removed.write().unwrap_or_else(PoisonError::into_inner);
        let changed = next
            .iter()
            .filter(|(name, at)| removed.get(*name) != Some(*at))
            .map(|(name, _)| name.clone())
            .collect();
        *removed = next;
        changed
    }

    /// Replaces the users' revocations and locks with the state file's; returns what changed
    /// since the last call (nothing is returned for what was already there at the first).
    pub fn load_users(&self, state: &State) -> Vec<UserChange> {
        let mut next: HashMap<String, UserBan> = state
            .revoked_users
            .iter()
            .map(|r| {
                let ban = UserBan {
                    revoked_unix: r.revoked_unix,
                    why: r.reason,
                    locked: false,
                    unlocked_unix: None,
                };
                (r.name.clone(), ban)
            })
            .collect();
        for user in &state.users {
            if let Some(ban) = next.get_mut(&user.name) {
                ban.locked = user.locked_unix.is_some();
                ban.unlocked_unix = user.unlocked_unix;
            } else if let Some(at) = user.unlocked_unix {
                // Unlocked (a login lockout lifted) but never locked by an operator.
                let ban = UserBan {
                    revoked_unix: 0,
                    why: UserRevocation::Locked,
                    locked: false,
                    unlocked_unix: Some(at),
                };
                next.insert(user.name.clone(), ban);
            }
        }
        let mut users = self.users.write().unwrap_or_else(PoisonError::into_inner);
        let mut changes = Vec::new();
        for (name, ban) in &next {
            let before = users.get(name);
            let user = name.clone();
            if before.map(|b| (b.revoked_unix, b.why)) != Some((ban.revoked_unix, ban.why))
                && ban.revoked_unix > 0
            {
                changes.push(match ban.why {
                    UserRevocation::Removed => UserChange::Removed {
                        user: user.clone(),
                        at: ban.revoked_unix,
                    },
                    UserRevocation::Locked => UserChange::Locked {
                        user: user.clone(),
                        at: ban.revoked_unix,
                    },
                });
            }
            match ban.unlocked_unix {
                Some(at) if before.and_then(|b| b.unlocked_unix) != Some(at) => {
                    changes.push(UserChange::Unlocked { user, at });
                }
                _ => {}
            }
        }
        *users = next;
        changes
    }

    /// Why the certificate of local user `user` is refused, if it is: it was issued at or
    /// before the user's removal or lock.
    pub fn check_user(&self, user: &PeerIdentity) -> Result<(), String> {
        let users = self.users.read().unwrap_or_else(PoisonError::into_inner);
        let Some(ban) = users.get(&user.name) else {
            return Ok(());
        };
        // A locked user cannot log in, so a certificate issued after the lock comes from a
        // login after `users unlock` (which the watcher may not have applied yet).
        if issued_unix(user) > ban.revoked_unix {
            return Ok(());
        }
        let at = crate::util::rfc3339_unix(ban.revoked_unix);
        if ban.locked {
            return Err(format!(
                "user {} was locked at {at} (`remoteler-proxy users lock`); an operator must \
                 unlock it (`remoteler-proxy users unlock {}`), then run `remoteler login` again",
                user.name, user.name
            ));
        }
        Err(match ban.why {
            UserRevocation::Removed => format!(
                "user {} was removed at {at} (`remoteler-proxy users rm`) and this certificate \
                 (serial {}) was issued before; it is no longer accepted",
                user.name, user.serial
            ),
            UserRevocation::Locked => format!(
                "user {} was locked at {at} (`remoteler-proxy users lock`) and this certificate \
                 (serial {}) was issued before; run `remoteler login` again",
                user.name, user.serial
            ),
        })
    }

    /// When `node` was last removed, Unix seconds.
    pub fn removed_at(&self, node: &str) -> Option<u64> {
        let removed = self.removed.read().unwrap_or_else(PoisonError::into_inner);
        removed.get(node).copied()
    }

    /// Why `node`'s certificate is refused, if it is: issued (`notBefore` plus the backdating
    /// of [`CLOCK_SKEW_ALLOWANCE`]) at or before the node's removal.
    pub fn check(&self, node: &PeerIdentity) -> Result<(), String> {
        let removed = self.removed.read().unwrap_or_else(PoisonError::into_inner);
        let Some(&at) = removed.get(&node.name) else {
            return Ok(());
        };
        if issued_unix(node) > at {
            return Ok(());
        }
        Err(format!(
            "node {} was removed at {} (`remoteler-proxy nodes rm`) and this certificate \
             (serial {}) was issued before; join it again with a new token",
            node.name,
            crate::util::rfc3339(UNIX_EPOCH + Duration::from_secs(at)),
            node.serial
        ))
    }
}

/// When a certificate was issued, Unix seconds: its `notBefore` was backdated by
/// [`CLOCK_SKEW_ALLOWANCE`].
fn issued_unix(identity: &PeerIdentity) -> u64 {
    (identity.not_before + CLOCK_SKEW_ALLOWANCE)
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The state file's modification time, if it can be read.
pub fn modified(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{RevokedNode, RevokedUser, UserRevocation};
    use tunnel::identity::IdentityKind;

    fn node(name: &str, issued_unix: u64) -> PeerIdentity {
        PeerIdentity {
            kind: IdentityKind::Node,
            name: name.into(),
            cluster: "c".into(),
            roles: Vec::new(),
            logins: Vec::new(),
            not_before: UNIX_EPOCH + Duration::from_secs(issued_unix) - CLOCK_SKEW_ALLOWANCE,
            not_after: UNIX_EPOCH + Duration::from_secs(issued_unix + 3600),
            serial: "01".into(),
        }
    }

    #[test]
    fn certificates_issued_before_the_removal_are_refused() {
        let revocations = Revocations::default();
        let state = State {
            revoked_nodes: vec![RevokedNode {
                name: "node-a".into(),
                revoked_unix: 1_000_000,
            }],
            ..State::default()
        };
        assert_eq!(revocations.load(&state), vec!["node-a".to_string()]);
        assert!(
            revocations.load(&state).is_empty(),
            "nothing new the second time"
        );
        let why = revocations.check(&node("node-a", 999_000)).unwrap_err();
        assert!(
            why.contains("node-a was removed") && why.contains("join it again"),
            "{why}"
        );
        assert!(revocations.check(&node("node-a", 1_000_000)).is_err());
        assert!(
            revocations.check(&node("node-a", 1_000_001)).is_ok(),
            "joined again later"
        );
        assert!(revocations.check(&node("node-b", 1)).is_ok());
    }

    fn user(name: &str, issued_unix: u64) -> PeerIdentity {
        PeerIdentity {
            kind: IdentityKind::User,
            ..node(name, issued_unix)
        }
    }

    fn state_with(users: &[(&str, Option<u64>, Option<u64>)], revoked: &[RevokedUser]) -> State {
        State {
            users: users
                .iter()
                .map(|&(name, locked_unix, unlocked_unix)| crate::state::User {
                    name: name.into(),
                    roles: Vec::new(),
                    logins: Vec::new(),
                    password_hash: String::new(),
                    created_unix: 0,
                    locked_unix,
                    unlocked_unix,
                })
                .collect(),
            revoked_users: revoked.to_vec(),
            ..State::default()
        }
    }

    #[test]
    fn users_removed_or_locked_refuse_older_certificates_and_report_changes() {
        let revocations = Revocations::default();
        let locked = RevokedUser {
            name: "alice".into(),
            revoked_unix: 1_000,
            reason: UserRevocation::Locked,
        };
        let removed = RevokedUser {
            name: "bob".into(),
            revoked_unix: 2_000,
            reason: UserRevocation::Removed,
        };
        let state = state_with(&[("alice", Some(1_000), None)], &[locked.clone(), removed]);
        let mut changes = revocations.load_users(&state);
        changes.sort_by(|a, b| a.user().cmp(b.user()));
        assert_eq!(
            changes,
            vec![
                UserChange::Locked {
                    user: "alice".into(),
                    at: 1_000
                },
                UserChange::Removed {
                    user: "bob".into(),
                    at: 2_000
                },
            ]
        );
        assert!(revocations.load_users(&state).is_empty(), "nothing new");
        let why = revocations.check_user(&user("alice", 999)).unwrap_err();
        assert!(why.contains("users unlock alice"), "{why}");
        let why = revocations.check_user(&user("bob", 2_000)).unwrap_err();
        assert!(why.contains("user bob was removed"), "{why}");
        assert!(
            revocations.check_user(&user("bob", 2_001)).is_ok(),
            "added again"
        );
        assert!(revocations.check_user(&user("carol", 1)).is_ok());

        // Unlocked: reported once; older certificates stay refused, newer ones pass.
        let state = state_with(&[("alice", None, Some(1_500))], &[locked]);
        assert_eq!(
            revocations.load_users(&state),
            vec![UserChange::Unlocked {
                user: "alice".into(),
                at: 1_500
            }]
        );
        let why = revocations.check_user(&user("alice", 1_000)).unwrap_err();
        assert!(why.contains("run `remoteler login` again"), "{why}");
        assert!(revocations.check_user(&user("alice", 1_501)).is_ok());
    }
}
