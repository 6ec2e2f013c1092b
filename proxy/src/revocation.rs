//! Removed nodes (`remoteler-proxy nodes rm`): the CLI records the removal in the state file;
//! the running proxy notices the change (core 0 looks at the file's modification time every
//! [`CHECK_INTERVAL`]), refuses the node's certificates from then on and closes its tunnel.
//!
//! A removal names the node and the time: every certificate of that node issued at or before
//! it is refused. A certificate issued later (the node joined again with a new token) is
//! accepted, so removing and re-joining needs no other cleanup.

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tunnel::identity::{CLOCK_SKEW_ALLOWANCE, PeerIdentity};

use crate::state::State;

/// How often the proxy looks for a changed state file.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The removed nodes, shared by every core.
#[derive(Debug, Default)]
pub struct Revocations {
    removed: RwLock<HashMap<String, u64>>,
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
        let issued = (node.not_before + CLOCK_SKEW_ALLOWANCE)
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if issued > at {
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

/// The state file's modification time, if it can be read.
pub fn modified(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::RevokedNode;
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
}
