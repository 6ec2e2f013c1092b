//! `state.json`: join tokens and users, shared by the CLI and the running proxy.
//!
//! Every change is a read-modify-write under an exclusive `flock` on `state.lock`, and the
//! file is replaced atomically (temporary file in the same directory, `fsync`, `rename`,
//! `fsync` of the directory). So `remoteler-proxy tokens add` and a join consuming a token at
//! the same moment never lose each other's write, and a crash leaves the old or the new file,
//! never half of one. The running proxy reads the file again for every join and login (both
//! are rare), so changes made with the CLI apply at once, without a restart.
//!
//! Secrets are never stored: a token is kept as the SHA-256 of its secret, a password as an
//! argon2id PHC string.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::datadir::DataDir;
use crate::error::ProxyError;
use crate::util;

/// Version of the state file layout.
pub const STATE_VERSION: u32 = 1;

/// Expired tokens are kept this long (so a late join hears `token_expired`, not
/// `token_invalid`), then dropped at the next change.
const EXPIRED_TOKEN_RETENTION_SECS: u64 = 24 * 3600;

/// The whole state file.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// Layout version ([`STATE_VERSION`]).
    pub version: u32,
    /// The cluster, as `init` created it.
    pub cluster: String,
    /// The host names and addresses the proxy certificate was issued for.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Join tokens.
    #[serde(default)]
    pub tokens: Vec<Token>,
    /// Users.
    #[serde(default)]
    pub users: Vec<User>,
    /// Nodes removed with `remoteler-proxy nodes rm`: their certificates issued up to then
    /// are refused.
    #[serde(default)]
    pub revoked_nodes: Vec<RevokedNode>,
    /// Leaf clusters that joined this (root) cluster with a `trusted-cluster` token.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_leaves: Vec<TrustedLeaf>,
}

/// A leaf cluster that joined this one: its proxy may hold cluster tunnels here.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TrustedLeaf {
    /// The leaf's cluster name (the name in its cluster certificate).
    pub name: String,
    /// The leaf's CA certificate, PEM, as it sent it at the join (kept for the record and
    /// for operators; the root never trusts it for anything).
    pub ca_pem: String,
    /// When it joined, Unix seconds.
    pub joined_unix: u64,
    /// The id of the token it joined with.
    pub token_id: String,
    /// The leaf's SSH host CA public key as it sent it at the join (checked to be one OpenSSH
    /// public key), handed to this cluster's users for the leaf's node names only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_host_ca: Option<String>,
}

/// A node whose certificates issued at or before `revoked_unix` are refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokedNode {
    /// The node name.
    pub name: String,
    /// Unix seconds of `nodes rm`.
    pub revoked_unix: u64,
}

/// What a token lets its bearer do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    /// Join as a node (agent).
    Node,
    /// Join as a trusted leaf cluster (`--kind trusted-cluster`).
    TrustedCluster,
}

impl TokenKind {
    /// The word used on the command line and in `tokens ls`.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::Node => "node",
            TokenKind::TrustedCluster => "trusted-cluster",
        }
    }
}

/// A join token as stored: its secret only as a hash.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Token {
    /// Public identifier, for `tokens ls`, `tokens rm` and the audit log.
    pub id: String,
    /// What it is for.
    pub kind: TokenKind,
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
    /// Creation, Unix seconds.
    pub created_unix: u64,
    /// Expiry, Unix seconds.
    pub expires_unix: u64,
    /// Joins left.
    pub uses_left: u32,
}

/// A user as stored.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// Name.
    pub name: String,
    /// Roles.
    pub roles: Vec<String>,
    /// OS logins the user may use.
    pub logins: Vec<String>,
    /// argon2id PHC string.
    pub password_hash: String,
    /// Creation, Unix seconds.
    pub created_unix: u64,
}

impl fmt::Debug for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("User")
            .field("name", &self.name)
            .field("roles", &self.roles)
            .field("logins", &self.logins)
            .field("password_hash", &"MASKED")
            .finish()
    }
}

/// Why a join token was refused; `code()` is the wire code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No such token.
    #[error(
        "the join token is not valid for this cluster; create one with `remoteler-proxy tokens add --kind node`"
    )]
    Invalid,
    /// It expired.
    #[error("the join token expired at {}; create a new one with `remoteler-proxy tokens add --kind node`", util::rfc3339_unix(*.0))]
    Expired(u64),
    /// Every use was consumed.
    #[error(
        "the join token has been used up; create a new one with `remoteler-proxy tokens add --kind node`"
    )]
    UsedUp,
}

impl TokenError {
    /// Stable code for the wire and the audit log.
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::Invalid => "token_invalid",
            TokenError::Expired(_) => "token_expired",
            TokenError::UsedUp => "token_used_up",
        }
    }
}

/// A token that was accepted (and one use consumed).
#[derive(Debug, Clone)]
pub struct TokenUse {
    /// Token id.
    pub id: String,
    /// Its kind.
    pub kind: TokenKind,
    /// Uses left after this one.
    pub uses_left: u32,
}

impl State {
    /// Finds the token whose secret is `secret`, comparing hashes in constant time, and
    /// consumes one use.
    pub fn consume_token(&mut self, secret: &str, now: u64) -> Result<TokenUse, TokenError> {
        let presented = util::sha256_hex(secret.as_bytes());
        let mut found = None;
        for (i, token) in self.tokens.iter().enumerate() {
            // Look at every token so the time taken does not say which one matched.
            if util::constant_time_eq(presented.as_bytes(), token.secret_sha256.as_bytes()) {
                found = Some(i);
            }
        }
        let token = found
            .and_then(|i| self.tokens.get_mut(i))
            .ok_or(TokenError::Invalid)?;
        if now >= token.expires_unix {
            return Err(TokenError::Expired(token.expires_unix));
        }
        if token.uses_left == 0 {
            return Err(TokenError::UsedUp);
        }
        token.uses_left -= 1;
        Ok(TokenUse {
            id: token.id.clone(),
            kind: token.kind,
            uses_left: token.uses_left,
        })
    }

    /// The user named `name`.
    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.iter().find(|u| u.name == name)
    }

    fn prune(&mut self, now: u64) {
        self.tokens
            .retain(|t| t.expires_unix.saturating_add(EXPIRED_TOKEN_RETENTION_SECS) > now);
    }
}

/// Reads and changes `state.json` under its lock.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: DataDir,
}

struct LockGuard(File);

impl Drop for LockGuard {
    fn drop(&mut self) {
        // SAFETY: the descriptor is open for the life of `self.0`.
        unsafe {
            libc::flock(self.0.as_raw_fd(), libc::LOCK_UN);
        }
    }
}

impl StateStore {
    /// The store of the data directory `dir`.
    pub fn new(dir: DataDir) -> Self {
        StateStore { dir }
    }

    fn lock(&self, exclusive: bool) -> Result<LockGuard, ProxyError> {
        let path = self.dir.state_lock();
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| ProxyError::io("cannot open the state lock", &path, e))?;
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        loop {
            // SAFETY: flock on a descriptor we own.
            let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
            if rc == 0 {
                return Ok(LockGuard(file));
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != ErrorKind::Interrupted {
                return Err(ProxyError::io("cannot lock", &path, err));
            }
        }
    }

    /// Writes a fresh state file for a new cluster; refuses to replace an existing one.
    pub fn create(&self, cluster: &str, hosts: &[String]) -> Result<(), ProxyError> {
        let _guard = self.lock(true)?;
        if self.dir.state().exists() {
            return Err(ProxyError::Other(format!(
                "{} already exists; refusing to overwrite the tokens and users of an existing cluster",
                self.dir.state().display()
            )));
        }
        let state = State {
            version: STATE_VERSION,
            cluster: cluster.to_owned(),
            hosts: hosts.to_vec(),
            ..State::default()
        };
        self.write(&state)
    }

    /// Removes the temporary files of writers that died between creating and renaming theirs
    /// (`kill -9` during a save leaves `.state.json.tmp.<pid>`); returns their names. Safe
    /// under the exclusive lock: every save of `state.json` holds it.
    pub fn remove_stale_temporaries(&self) -> Result<Vec<String>, ProxyError> {
        let _guard = self.lock(true)?;
        let state = self.dir.state();
        let prefix = format!(
            ".{}.tmp.",
            state
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        let dir = state.parent().unwrap_or(Path::new("."));
        let entries = std::fs::read_dir(dir).map_err(|e| ProxyError::io("cannot list", dir, e))?;
        let mut removed = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) {
                std::fs::remove_file(entry.path())
                    .map_err(|e| ProxyError::io("cannot remove", entry.path(), e))?;
                removed.push(name);
            }
        }
        Ok(removed)
    }

    /// A snapshot of the state.
    pub fn read(&self) -> Result<State, ProxyError> {
        let _guard = self.lock(false)?;
        self.read_unlocked()
    }

    /// Runs `change` on the current state under the exclusive lock and writes the result if
    /// `change` succeeds. Whatever `change` returns is passed back, including its error (the
    /// file is then left alone).
    pub fn update<T, E: From<ProxyError>>(
        &self,
        change: impl FnOnce(&mut State) -> Result<T, E>,
    ) -> Result<T, E> {
        let _guard = self.lock(true)?;
        let mut state = self.read_unlocked()?;
        state.prune(util::unix_now());
        let out = change(&mut state)?;
        self.write(&state)?;
        Ok(out)
    }

    /// Reads the state; the caller holds the lock.
    fn read_unlocked(&self) -> Result<State, ProxyError> {
        let path = self.dir.state();
        let mut text = String::new();
        match File::open(&path) {
            Ok(mut f) => f
                .read_to_string(&mut text)
                .map_err(|e| ProxyError::io("cannot read", &path, e))?,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(ProxyError::NotInitialized {
                    dir: self.dir.root().to_owned(),
                    file: "state.json",
                });
            }
            Err(e) => return Err(ProxyError::io("cannot read", &path, e)),
        };
        let state: State = serde_json::from_str(&text).map_err(|e| ProxyError::BadState {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        if state.version != STATE_VERSION {
            return Err(ProxyError::BadState {
                path,
                detail: format!(
                    "version {} is not the version {STATE_VERSION} this proxy reads",
                    state.version
                ),
            });
        }
        Ok(state)
    }

    fn write(&self, state: &State) -> Result<(), ProxyError> {
        let path = self.dir.state();
        let mut text = serde_json::to_vec_pretty(state).map_err(|e| ProxyError::BadState {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        text.push(b'\n');
        write_atomic(&path, &text, 0o600)
    }
}

/// Replaces `path` with `contents`: temporary file in the same directory, `fsync`, `rename`,
/// `fsync` of the directory. The new file gets the owner of the directory: an operator who
/// runs `remoteler-proxy users add` as root must not leave a file the proxy's service user
/// can no longer read.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), ProxyError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(contents)?;
        let (dir_meta, file_meta) = (std::fs::metadata(dir)?, f.metadata()?);
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        if root && (dir_meta.uid(), dir_meta.gid()) != (file_meta.uid(), file_meta.gid()) {
            std::os::unix::fs::fchown(&f, Some(dir_meta.uid()), Some(dir_meta.gid()))?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        ProxyError::io("cannot write", path, e)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_file_written_by_root_belongs_to_the_directory_owner() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return; // only root can hand a file to another user
        }
        let dir = tempfile::tempdir().unwrap();
        let nobody = 65534;
        std::os::unix::fs::chown(dir.path(), Some(nobody), Some(nobody)).unwrap();
        let path = dir.path().join("state.json");
        write_atomic(&path, b"{}", 0o600).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (nobody, nobody));
        assert_eq!(meta.mode() & 0o777, 0o600);
    }

    use super::*;

    fn token(secret: &str, expires: u64, uses: u32) -> Token {
        Token {
            id: "t1".into(),
            kind: TokenKind::Node,
            secret_sha256: util::sha256_hex(secret.as_bytes()),
            created_unix: 0,
            expires_unix: expires,
            uses_left: uses,
        }
    }

    #[test]
    fn token_checks() {
        let mut state = State {
            tokens: vec![token("good", 100, 1)],
            ..State::default()
        };
        assert_eq!(
            state.consume_token("bad", 10).unwrap_err(),
            TokenError::Invalid
        );
        assert_eq!(
            state.consume_token("good", 100).unwrap_err().code(),
            "token_expired"
        );
        assert_eq!(state.consume_token("good", 10).unwrap().uses_left, 0);
        assert_eq!(
            state.consume_token("good", 10).unwrap_err(),
            TokenError::UsedUp
        );
    }
}
