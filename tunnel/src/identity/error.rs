//! The one error type of `tunnel::identity`.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::pin::CaPin;

/// Everything that can go wrong with certificates, keys and trust.
///
/// Messages are lower-case, say what is wrong and what to do, and name the file for file
/// errors. They never contain key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// A file could not be read.
    #[error("cannot read {what} {}: {}", .path.display(), explain_io(.source, *.what, .path))]
    ReadFile {
        /// What the file holds.
        what: FileRole,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A file or directory could not be written.
    #[error("cannot write {what} {}: {}", .path.display(), explain_io(.source, *.what, .path))]
    WriteFile {
        /// What the file holds.
        what: FileRole,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A private key file can be read or written by other users.
    #[error(
        "{what} {} is accessible by other users (mode {mode:04o}); run `chmod 600 {}` and check \
         who could have copied it",
        .path.display(),
        .path.display()
    )]
    KeyFileTooOpen {
        /// What the file holds.
        what: FileRole,
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },

    /// Saving would replace a file that must not be replaced.
    #[error(
        "refusing to overwrite {what} {}: it already exists; a cluster keeps its CA key for its \
         whole life (every agent and user trusts it), remove the file yourself only if you \
         really mean to create a new cluster",
        .path.display()
    )]
    AlreadyExists {
        /// What the file holds.
        what: FileRole,
        /// The file.
        path: PathBuf,
    },

    /// A file's contents are not what they should be.
    #[error("{what} {} is not usable: {detail}", .path.display())]
    BadFile {
        /// What the file holds.
        what: FileRole,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },

    /// A key (not from a file) could not be parsed or is of an unsupported type.
    #[error(
        "unusable key: {detail}; remoteler uses ECDSA P-256 keys (P-384 and Ed25519 are also accepted)"
    )]
    BadKey {
        /// What is wrong with it.
        detail: String,
    },

    /// A certificate could not be parsed.
    #[error("cannot parse certificate: {detail}")]
    BadCertificate {
        /// What is wrong with it.
        detail: String,
    },

    /// A certificate parsed but is not a Remoteler identity (see the module docs for the
    /// encoding).
    #[error("certificate is not a valid remoteler identity: {detail}")]
    NotAnIdentity {
        /// What is wrong with it.
        detail: String,
    },

    /// A cluster, node, user, proxy, role or login name breaks the naming rules.
    #[error(
        "invalid {field} {value:?}: {reason}; names are 1 to {max} characters from a-z, 0-9, \
         '.', '_', '-' and do not start with '.' or '-'",
        max = super::names::MAX_NAME_LEN
    )]
    InvalidName {
        /// Which kind of name.
        field: &'static str,
        /// The offending value (shortened, so that a peer cannot flood the log).
        value: String,
        /// The rule it breaks.
        reason: &'static str,
    },

    /// A role or login list is too long.
    #[error("too many {field}: {count}, at most {max} are allowed in one certificate")]
    TooMany {
        /// Which list.
        field: &'static str,
        /// How many were given.
        count: usize,
        /// The limit.
        max: usize,
    },

    /// A proxy host name is neither a DNS name nor an IP address.
    #[error("invalid proxy host name {value:?}: expected a DNS name or an IP address")]
    InvalidHost {
        /// The offending value.
        value: String,
    },

    /// A CA pin string is malformed.
    #[error("invalid CA pin {found:?}: expected `sha256:` followed by 64 hex digits")]
    InvalidPin {
        /// What was given (shortened).
        found: String,
    },

    /// The server's chain has no CA certificate with the pinned public key.
    #[error(
        "the server's CA does not match ca_pin: expected {expected}, the server presented {}; \
         check ca_pin against the pin printed by `remoteler-proxy init` on the proxy (a \
         mismatch can also mean that someone is intercepting the connection)",
        list_pins(.presented)
    )]
    PinMismatch {
        /// The pin the client was configured with.
        expected: CaPin,
        /// The pins of the certificates the server sent after its leaf.
        presented: Vec<CaPin>,
    },

    /// A requested certificate lifetime makes no sense.
    #[error("invalid certificate lifetime: {detail}")]
    InvalidValidity {
        /// What is wrong with it.
        detail: String,
    },

    /// A certificate has expired (or this machine's clock is ahead).
    #[error(
        "certificate expired at {} and this machine's clock says {}; get a new certificate \
         (`remoteler login` for a user, join again for a node), or fix the clock if it is wrong",
        fmt_time(*.not_after),
        fmt_time(*.now)
    )]
    Expired {
        /// The end of the certificate's validity.
        not_after: SystemTime,
        /// The time the check was made at.
        now: SystemTime,
    },

    /// A certificate is not valid yet: one of the two clocks is wrong by more than the
    /// allowance.
    #[error(
        "certificate is not valid before {} but this machine's clock says {}; this clock or the \
         clock of the proxy that issued it is wrong by more than {} minutes: synchronise both \
         (NTP)",
        fmt_time(*.not_before),
        fmt_time(*.now),
        super::peer::CLOCK_SKEW_ALLOWANCE.as_secs() / 60
    )]
    NotYetValid {
        /// The start of the certificate's validity (already backdated).
        not_before: SystemTime,
        /// The time the check was made at.
        now: SystemTime,
    },

    /// The system random number generator failed.
    #[error(
        "the system random number generator failed; the system may be out of entropy or sandboxed"
    )]
    Random,

    /// rcgen refused to build a certificate or key.
    #[error("cannot create certificate or key: {0}")]
    Generate(#[from] rcgen::Error),

    /// rustls refused a configuration or a certificate.
    #[error("tls: {0}")]
    Tls(rustls::Error),

    /// A certificate verifier could not be built.
    #[error("cannot build certificate verifier: {0}; give at least one CA certificate")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

impl From<rustls::Error> for IdentityError {
    /// Turns the certificate errors an operator can act on (expiry, clock skew, pin mismatch)
    /// into their own variants; everything else stays [`IdentityError::Tls`].
    fn from(err: rustls::Error) -> Self {
        use rustls::CertificateError as C;
        match &err {
            rustls::Error::InvalidCertificate(C::ExpiredContext { time, not_after }) => {
                IdentityError::Expired {
                    not_after: from_unix(not_after),
                    now: from_unix(time),
                }
            }
            rustls::Error::InvalidCertificate(C::NotValidYetContext { time, not_before }) => {
                IdentityError::NotYetValid {
                    not_before: from_unix(not_before),
                    now: from_unix(time),
                }
            }
            rustls::Error::InvalidCertificate(C::Other(other)) => {
                match other.0.downcast_ref::<IdentityError>() {
                    Some(IdentityError::PinMismatch {
                        expected,
                        presented,
                    }) => IdentityError::PinMismatch {
                        expected: *expected,
                        presented: presented.clone(),
                    },
                    _ => IdentityError::Tls(err),
                }
            }
            _ => IdentityError::Tls(err),
        }
    }
}

/// What a file holds; used in error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FileRole {
    /// The cluster CA certificate (`ca.crt`).
    CaCertificate,
    /// The cluster CA private key (`ca.key`).
    CaKey,
    /// A leaf certificate chain.
    Certificate,
    /// A leaf private key.
    PrivateKey,
    /// A directory that holds identity files.
    Directory,
    /// The cluster's SSH user CA key (`ssh_user_ca.key`, OpenSSH format).
    SshCaKey,
    /// The cluster's SSH host CA key (`ssh_host_ca.key`, OpenSSH format).
    SshHostCaKey,
}

impl fmt::Display for FileRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileRole::CaCertificate => "CA certificate",
            FileRole::CaKey => "CA key",
            FileRole::Certificate => "certificate",
            FileRole::PrivateKey => "private key",
            FileRole::Directory => "directory",
            FileRole::SshCaKey => "SSH user CA key",
            FileRole::SshHostCaKey => "SSH host CA key",
        })
    }
}

fn explain_io(err: &io::Error, what: FileRole, path: &Path) -> String {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match err.kind() {
        io::ErrorKind::PermissionDenied => format!(
            "permission denied; run the command as the user that owns {}",
            dir.display()
        ),
        io::ErrorKind::NotFound => match what {
            FileRole::CaCertificate | FileRole::CaKey => {
                "no such file; create the cluster with `remoteler-proxy init`, or point the data \
                 directory at an existing cluster"
                    .to_owned()
            }
            FileRole::Certificate | FileRole::PrivateKey => {
                "no such file; join the cluster (agent) or log in (`remoteler login`) first"
                    .to_owned()
            }
            FileRole::Directory => "no such directory".to_owned(),
            FileRole::SshCaKey | FileRole::SshHostCaKey => {
                "no such file; the proxy creates it on its first start (or `remoteler-proxy init` \
                 for a new cluster)"
                    .to_owned()
            }
        },
        _ => err.to_string(),
    }
}

fn list_pins(pins: &[CaPin]) -> String {
    if pins.is_empty() {
        return "no CA certificate".to_owned();
    }
    pins.iter()
        .map(CaPin::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn from_unix(t: &rustls_pki_types::UnixTime) -> SystemTime {
    SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(t.as_secs())
}

/// Formats a time as RFC 3339 UTC with whole seconds, e.g. `2025-01-31T12:00:00Z`.
pub(crate) fn fmt_time(t: SystemTime) -> String {
    let secs = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_secs()).map_or(i64::MIN, |s| -s),
    };
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("{secs} seconds after 1970-01-01T00:00:00Z"),
    }
}

/// Shortens a string from a peer or a user before it goes into an error message.
pub(crate) fn excerpt(s: &str) -> String {
    const MAX: usize = 80;
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s.to_owned(),
    }
}
