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
    /// Users removed with `users rm` or locked with `users lock`: their certificates issued up
    /// to then are refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked_users: Vec<RevokedUser>,
    /// Leaf clusters that joined this (root) cluster with a `trusted-cluster` token.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_leaves: Vec<TrustedLeaf>,
    /// The key each node name was last joined with: a name belongs to that key, and a join
    /// for it with another key needs a `--replace` token.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_keys: Vec<NodeKey>,
}

/// The public key a node name was joined with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeKey {
    /// The node name.
    pub name: String,
    /// SHA-256 of the joining key's SubjectPublicKeyInfo DER, hex.
    pub public_key_sha256: String,
    /// When it joined, Unix seconds.
    pub joined_unix: u64,
    /// The id of the token it joined with.
    pub token_id: String,
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

/// A user whose certificates issued at or before `revoked_unix` are refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokedUser {
    /// The user name.
    pub name: String,
    /// Unix seconds of `users rm` or `users lock`.
    pub revoked_unix: u64,
    /// Which of the two.
    pub reason: UserRevocation,
}

/// Why a user's certificates were revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UserRevocation {
    /// `users rm`.
    Removed,
    /// `users lock`.
    Locked,
}

impl State {
    /// Records that `name`'s certificates issued up to `now` are refused (replacing an
    /// earlier record of the same user).
    pub fn revoke_user(&mut self, name: &str, now: u64, reason: UserRevocation) {
        self.revoked_users.retain(|r| r.name != name);
        self.revoked_users.push(RevokedUser {
            name: name.to_owned(),
            revoked_unix: now,
            reason,
        });
    }
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
    /// Node tokens only: the node name, or a pattern where `*` stands for any characters,
    /// that the token may join as (`tokens add --node`); none: any name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The operator's consent to take over a name that is in use (`tokens add --replace`):
    /// a static or connected node, a name joined with another key, a leaf joined with
    /// another CA.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replace: bool,
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
    /// Locked by an operator (`users lock`) at this time, Unix seconds: no login, and every
    /// certificate refused, until `users unlock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked_unix: Option<u64>,
    /// The last `users unlock`, Unix seconds: it also lifts a lockout after failed logins
    /// that began before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unlocked_unix: Option<u64>,
}

impl fmt::Debug for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("User")
            .field("name", &self.name)
            .field("roles", &self.roles)
            .field("logins", &self.logins)
            .field("locked_unix", &self.locked_unix)
            .field("unlocked_unix", &self.unlocked_unix)
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

/// Why a join was refused after its token was found; nothing was consumed or written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinRefused {
    /// The token is missing, expired or used up.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// A token of another kind.
    #[error(
        "this is a {} token, not a {} token; create one with `remoteler-proxy tokens add --kind {}`",
        .found.as_str(), .expected.as_str(), .expected.as_str()
    )]
    WrongKind {
        /// What the join needs.
        expected: TokenKind,
        /// What the token is.
        found: TokenKind,
    },
    /// The token is bound to other node names (`tokens add --node`).
    #[error(
        "this token may only join as node {pattern:?}, not {name:?}; create a token for \
         {name:?} with `remoteler-proxy tokens add --kind node --node {name}`"
    )]
    WrongName {
        /// The name asked for.
        name: String,
        /// The token's name or pattern.
        pattern: String,
    },
    /// The name belongs to someone else and the token does not say `--replace`.
    #[error("{}", taken_message(*.kind, .name, .why))]
    NameTaken {
        /// Node, or trusted cluster.
        kind: TokenKind,
        /// The name asked for.
        name: String,
        /// Why it is taken.
        why: String,
    },
}

fn taken_message(kind: TokenKind, name: &str, why: &str) -> String {
    let (what, who, remedy, remove) = match kind {
        TokenKind::Node => (
            "node",
            "agent",
            format!("remoteler-proxy tokens add --kind node --node {name} --replace"),
            format!("remoteler-proxy nodes rm {name}"),
        ),
        TokenKind::TrustedCluster => (
            "cluster",
            "leaf proxy",
            "remoteler-proxy tokens add --kind trusted-cluster --replace".to_owned(),
            format!("remoteler-proxy clusters rm {name}"),
        ),
    };
    format!(
        "{what} {name:?} is taken: {why}; to hand the name to the new {who} anyway, create a \
         token with `{remedy}`, or remove the old one first (`{remove}`)"
    )
}

impl JoinRefused {
    /// Stable code for the wire and the audit log.
    pub fn code(&self) -> &'static str {
        match self {
            JoinRefused::Token(e) => e.code(),
            JoinRefused::WrongKind { .. } => "token_wrong_kind",
            JoinRefused::WrongName { .. } => "token_wrong_node",
            JoinRefused::NameTaken { .. } => "name_taken",
        }
    }

    fn node_taken(name: &str, why: String) -> Self {
        JoinRefused::NameTaken {
            kind: TokenKind::Node,
            name: name.to_owned(),
            why,
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

/// Whether `name` matches `pattern`, where `*` stands for any run of characters (none too)
/// and everything else for itself.
pub fn name_matches(pattern: &str, name: &str) -> bool {
    let (pattern, name) = (pattern.as_bytes(), name.as_bytes());
    // Greedy matching with backtracking to the last `*`: linear in practice, and names and
    // patterns are short (at most `MAX_NAME_LEN`).
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    p = sp + 1;
                    n = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

impl State {
    /// The index of the token whose secret is `secret`, if it may still be used. Compares
    /// hashes in constant time; changes nothing.
    fn usable_token(&self, secret: &str, now: u64) -> Result<usize, TokenError> {
        let presented = util::sha256_hex(secret.as_bytes());
        let mut found = None;
        for (i, token) in self.tokens.iter().enumerate() {
            // Look at every token so the time taken does not say which one matched.
            if util::constant_time_eq(presented.as_bytes(), token.secret_sha256.as_bytes()) {
                found = Some(i);
            }
        }
        let i = found.ok_or(TokenError::Invalid)?;
        let token = &self.tokens[i];
        if now >= token.expires_unix {
            return Err(TokenError::Expired(token.expires_unix));
        }
        if token.uses_left == 0 {
            return Err(TokenError::UsedUp);
        }
        Ok(i)
    }

    /// Consumes one use of token `i` (found by [`State::usable_token`]).
    fn consume(&mut self, i: usize) -> TokenUse {
        let token = &mut self.tokens[i];
        token.uses_left -= 1;
        TokenUse {
            id: token.id.clone(),
            kind: token.kind,
            uses_left: token.uses_left,
        }
    }

    /// Admits a node join for `name` with the key whose SPKI hashes to `key_sha256`: checks
    /// the token (kind, name binding), then who owns the name. `in_use` says why the running
    /// proxy considers the name taken (static node, live or detached tunnel), if it does. On
    /// success one use of the token is consumed and the key recorded as the name's owner; on
    /// failure the state is left exactly as it was (so nothing needs to be written).
    pub fn admit_node(
        &mut self,
        secret: &str,
        name: &str,
        key_sha256: &str,
        in_use: Option<String>,
        now: u64,
    ) -> Result<TokenUse, JoinRefused> {
        let i = self.usable_token(secret, now)?;
        let token = &self.tokens[i];
        if token.kind != TokenKind::Node {
            return Err(JoinRefused::WrongKind {
                expected: TokenKind::Node,
                found: token.kind,
            });
        }
        if let Some(pattern) = token.node.as_deref().filter(|p| !name_matches(p, name)) {
            return Err(JoinRefused::WrongName {
                name: name.to_owned(),
                pattern: pattern.to_owned(),
            });
        }
        if !token.replace {
            match self.node_keys.iter().find(|k| k.name == name) {
                // The same key again (an agent that lost its certificate, not its key).
                Some(owner) if owner.public_key_sha256 == key_sha256 => {}
                Some(owner) => {
                    return Err(JoinRefused::node_taken(
                        name,
                        format!(
                            "it joined on {} with another key (token {})",
                            util::rfc3339_unix(owner.joined_unix),
                            owner.token_id
                        ),
                    ));
                }
                None => {
                    if let Some(why) = in_use {
                        return Err(JoinRefused::node_taken(name, why));
                    }
                }
            }
        }
        let used = self.consume(i);
        self.node_keys.retain(|k| k.name != name);
        self.node_keys.push(NodeKey {
            name: name.to_owned(),
            public_key_sha256: key_sha256.to_owned(),
            joined_unix: now,
            token_id: used.id.clone(),
        });
        Ok(used)
    }

    /// Admits a trusted-cluster join of leaf `name` whose CA certificate is `ca_pem` (as
    /// [`tunnel::identity::certificates_to_pem`] writes it): checks the token's kind and that
    /// the name is not owned by another CA. On success one use is consumed and the leaf
    /// recorded, with its SSH host CA line; on failure the state is left exactly as it was.
    pub fn admit_leaf(
        &mut self,
        secret: &str,
        name: &str,
        ca_pem: &str,
        ssh_host_ca: Option<String>,
        now: u64,
    ) -> Result<TokenUse, JoinRefused> {
        let i = self.usable_token(secret, now)?;
        let token = &self.tokens[i];
        if token.kind != TokenKind::TrustedCluster {
            return Err(JoinRefused::WrongKind {
                expected: TokenKind::TrustedCluster,
                found: token.kind,
            });
        }
        if !token.replace {
            if let Some(owner) = self
                .trusted_leaves
                .iter()
                .find(|l| l.name == name && l.ca_pem != ca_pem)
            {
                return Err(JoinRefused::NameTaken {
                    kind: TokenKind::TrustedCluster,
                    name: name.to_owned(),
                    why: format!(
                        "it joined on {} with another CA certificate (token {})",
                        util::rfc3339_unix(owner.joined_unix),
                        owner.token_id
                    ),
                });
            }
        }
        let used = self.consume(i);
        self.trusted_leaves.retain(|l| l.name != name);
        self.trusted_leaves.push(TrustedLeaf {
            name: name.to_owned(),
            ca_pem: ca_pem.to_owned(),
            joined_unix: now,
            token_id: used.id.clone(),
            ssh_host_ca,
        });
        Ok(used)
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

    /// Runs `change` on the current state under the exclusive lock and writes the result only
    /// if `change` says it changed something; returns that. A refused join changes nothing,
    /// so unauthenticated traffic never writes the file (and expired tokens are pruned only
    /// by writes that happen anyway).
    pub fn update_if_changed(
        &self,
        change: impl FnOnce(&mut State) -> bool,
    ) -> Result<bool, ProxyError> {
        let _guard = self.lock(true)?;
        let mut state = self.read_unlocked()?;
        state.prune(util::unix_now());
        if !change(&mut state) {
            return Ok(false);
        }
        self.write(&state)?;
        Ok(true)
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
            node: None,
            replace: false,
        }
    }

    fn code(r: Result<TokenUse, JoinRefused>) -> &'static str {
        r.map(|_| "ok").unwrap_or_else(|e| e.code())
    }

    #[test]
    fn token_checks() {
        let mut state = State {
            tokens: vec![token("good", 100, 1)],
            ..State::default()
        };
        assert_eq!(
            code(state.admit_node("bad", "n", "k", None, 10)),
            "token_invalid"
        );
        assert_eq!(
            code(state.admit_node("good", "n", "k", None, 100)),
            "token_expired"
        );
        assert_eq!(
            state
                .admit_node("good", "n", "k", None, 10)
                .unwrap()
                .uses_left,
            0
        );
        assert_eq!(
            code(state.admit_node("good", "n", "k", None, 10)),
            "token_used_up"
        );
    }

    #[test]
    fn refused_joins_change_nothing() {
        let cluster = Token {
            kind: TokenKind::TrustedCluster,
            secret_sha256: util::sha256_hex(b"leaf"),
            ..token("x", 100, 5)
        };
        let bound = Token {
            secret_sha256: util::sha256_hex(b"bound"),
            node: Some("edge-*".into()),
            ..token("x", 100, 5)
        };
        let mut state = State {
            tokens: vec![token("node", 100, 5), cluster, bound],
            ..State::default()
        };
        state.admit_node("node", "n1", "k1", None, 10).unwrap();
        state.admit_leaf("leaf", "leaf", "CA1", None, 10).unwrap();
        let before = serde_json::to_string(&state).unwrap();
        for (result, expected) in [
            (
                state.admit_node("leaf", "n2", "k", None, 10),
                "token_wrong_kind",
            ),
            (
                state.admit_leaf("node", "leaf2", "CA", None, 10),
                "token_wrong_kind",
            ),
            (
                state.admit_node("bound", "core-1", "k", None, 10),
                "token_wrong_node",
            ),
            (state.admit_node("node", "n1", "k2", None, 10), "name_taken"),
            (
                state.admit_node("node", "n3", "k3", Some("static".into()), 10),
                "name_taken",
            ),
            (
                state.admit_leaf("leaf", "leaf", "CA2", None, 10),
                "name_taken",
            ),
        ] {
            assert_eq!(code(result), expected);
            assert_eq!(
                serde_json::to_string(&state).unwrap(),
                before,
                "{expected} changed the state"
            );
        }
        // The same key may join its name again, even while the name is in use; a bound
        // token joins a name its pattern matches; the same CA may join its leaf again.
        state
            .admit_node("node", "n1", "k1", Some("live".into()), 10)
            .unwrap();
        state.admit_node("bound", "edge-7", "k7", None, 10).unwrap();
        state.admit_leaf("leaf", "leaf", "CA1", None, 10).unwrap();
        // `--replace` takes a name over, and the new key owns it from then on.
        state.tokens[0].replace = true;
        state
            .admit_node("node", "n1", "k9", Some("live".into()), 10)
            .unwrap();
        state.tokens[0].replace = false;
        assert_eq!(
            code(state.admit_node("node", "n1", "k1", None, 10)),
            "name_taken"
        );
    }

    #[test]
    fn node_patterns() {
        for (pattern, name, matches) in [
            ("node-r1", "node-r1", true),
            ("node-r1", "node-r10", false),
            ("edge-*", "edge-", true),
            ("edge-*", "edge-17", true),
            ("edge-*", "core-edge-1", false),
            ("*-lab", "a-lab", true),
            ("*-lab", "a-lab-b", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("*", "anything", true),
        ] {
            assert_eq!(name_matches(pattern, name), matches, "{pattern} vs {name}");
        }
    }
}
