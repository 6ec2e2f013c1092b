//! The proxy library's error type.

use std::path::PathBuf;

/// Everything that can stop a proxy command or the proxy itself. Messages say what is wrong
/// and what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// A file or directory could not be read or written.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done, e.g. "cannot write".
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The state file holds something we cannot read.
    #[error("{}: {detail}; restore it from a backup or fix it by hand", path.display())]
    BadState {
        /// The state file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A certificate or key operation failed.
    #[error(transparent)]
    Identity(#[from] tunnel::identity::IdentityError),
    /// The configuration file is wrong.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The data directory does not hold a cluster yet.
    #[error(
        "{} holds no cluster (no {file}); run `remoteler-proxy init --cluster NAME --data-dir {}` first",
        dir.display(), dir.display()
    )]
    NotInitialized {
        /// The data directory.
        dir: PathBuf,
        /// The missing file.
        file: &'static str,
    },
    /// A command-line value is wrong.
    #[error("{0}")]
    Usage(String),
    /// Something else, with a message that says what.
    #[error("{0}")]
    Other(String),
}

impl ProxyError {
    /// An I/O error on `path`.
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ProxyError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
