//! The files of the proxy's data directory.
//!
//! | file | what | mode |
//! |---|---|---|
//! | `ca.crt`, `ca.key` | the cluster CA ([`tunnel::identity::ClusterCa`]) | 0644, 0600 |
//! | `proxy.crt`, `proxy.key` | the proxy's server chain (leaf, CA) and key | 0644, 0600 |
//! | `state.json` | join tokens (hashes only), users (argon2 hashes), init facts | 0600 |
//! | `state.lock` | `flock` taken around every read-modify-write of `state.json` | 0600 |
//! | `audit.log` | the audit log (unless `audit.path` says otherwise) | 0600 |
//! | `admin.sock` | the running proxy's admin socket | 0600 |
//! | `proxy.ready` | `ready users=.. tunnels=.. auth=..` while the proxy runs | 0644 |

use std::path::{Path, PathBuf};

/// Paths inside one data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// The data directory at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DataDir { root: root.into() }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The proxy's certificate chain.
    pub fn proxy_cert(&self) -> PathBuf {
        self.root.join("proxy.crt")
    }

    /// The proxy's private key.
    pub fn proxy_key(&self) -> PathBuf {
        self.root.join("proxy.key")
    }

    /// The CA private key.
    pub fn ca_key(&self) -> PathBuf {
        self.root.join(tunnel::identity::CA_KEY_FILE)
    }

    /// The CA certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join(tunnel::identity::CA_CERT_FILE)
    }

    /// Tokens and users.
    pub fn state(&self) -> PathBuf {
        self.root.join("state.json")
    }

    /// The lock around `state.json`.
    pub fn state_lock(&self) -> PathBuf {
        self.root.join("state.lock")
    }

    /// The admin socket.
    pub fn admin_socket(&self) -> PathBuf {
        self.root.join("admin.sock")
    }

    /// The readiness file.
    pub fn ready_file(&self) -> PathBuf {
        self.root.join("proxy.ready")
    }
}
