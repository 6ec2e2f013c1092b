//! What can go wrong on a TLS connection, in words an operator can act on.

use std::{fmt, io, net::SocketAddr, time::Duration};

/// The peer of a connection, as printed in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer(pub Option<SocketAddr>);

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(addr) => write!(f, "{addr}"),
            None => f.write_str("an unknown peer"),
        }
    }
}

/// Errors of [`crate::tls`].
///
/// Certificate problems arrive as [`TlsError::Tls`] with rustls's own error inside (unknown
/// issuer, expired, not valid for the name, the peer's alert), so a log line says exactly why a
/// handshake was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The handshake did not complete in time; the peer may be slow, silent or not a TLS peer.
    #[error(
        "tls handshake with {peer} did not finish within {}s (limits.handshake_timeout)",
        deadline.as_secs_f64()
    )]
    HandshakeTimeout {
        /// Who we were talking to.
        peer: Peer,
        /// The deadline that passed.
        deadline: Duration,
    },

    /// The TLS protocol failed: a certificate was refused, the peer sent an alert, or bytes
    /// arrived that are not valid TLS. The connection is unusable afterwards.
    #[error("tls with {peer} failed: {}", describe(.source))]
    Tls {
        /// Who we were talking to.
        peer: Peer,
        /// rustls's account of it.
        source: rustls::Error,
    },

    /// The peer closed TCP during the handshake.
    #[error(
        "{peer} closed the connection during the tls handshake (is it a tls endpoint, and does it trust our certificate?)"
    )]
    ClosedDuringHandshake {
        /// Who we were talking to.
        peer: Peer,
    },

    /// The peer closed TCP without sending a TLS close_notify first, so the data may have been
    /// cut short (an attacker can forge a TCP FIN, not a close_notify). Reads return this
    /// instead of a clean end of stream.
    #[error(
        "{peer} closed the tcp connection without a tls close_notify; the data received may be truncated"
    )]
    TruncatedByPeer {
        /// Who we were talking to.
        peer: Peer,
    },

    /// The peer sent a handshake message too large to hold.
    #[error("{peer} sent a tls message larger than the {limit} bytes we buffer")]
    MessageTooLarge {
        /// Who we were talking to.
        peer: Peer,
        /// The limit, in bytes.
        limit: usize,
    },

    /// This side already sent close_notify (or the connection is closed): nothing more can be
    /// written.
    #[error("tls connection with {peer} is already closed for writing")]
    WriteAfterClose {
        /// Who we were talking to.
        peer: Peer,
    },

    /// The socket failed (reset, broken pipe, ...).
    #[error("i/o error on the tls connection with {peer}: {source}")]
    Io {
        /// Who we were talking to.
        peer: Peer,
        /// What the operating system said.
        source: io::Error,
    },

    /// The rustls configuration cannot make a connection.
    #[error("tls configuration rejected by rustls: {0}")]
    Config(#[source] rustls::Error),

    /// A state this module does not expect; please report it.
    #[error("internal error in tunnel::tls with {peer}: {detail}")]
    Internal {
        /// Who we were talking to.
        peer: Peer,
        /// What happened.
        detail: String,
    },
}

impl TlsError {
    /// The peer's address, when known.
    pub fn peer(&self) -> Option<SocketAddr> {
        match self {
            Self::HandshakeTimeout { peer, .. }
            | Self::Tls { peer, .. }
            | Self::ClosedDuringHandshake { peer }
            | Self::TruncatedByPeer { peer }
            | Self::MessageTooLarge { peer, .. }
            | Self::WriteAfterClose { peer }
            | Self::Io { peer, .. }
            | Self::Internal { peer, .. } => peer.0,
            Self::Config(_) => None,
        }
    }

    /// Whether rustls refused a certificate, ours (the peer's alert says so) or the peer's.
    pub fn is_certificate_error(&self) -> bool {
        use rustls::{AlertDescription as A, Error as E};
        match self {
            Self::Tls { source, .. } => match source {
                E::InvalidCertificate(_) | E::NoCertificatesPresented => true,
                E::AlertReceived(alert) => matches!(
                    alert,
                    A::BadCertificate
                        | A::UnsupportedCertificate
                        | A::CertificateRevoked
                        | A::CertificateExpired
                        | A::CertificateUnknown
                        | A::UnknownCA
                        | A::CertificateRequired
                        | A::AccessDenied
                ),
                _ => false,
            },
            _ => false,
        }
    }
}

/// A failure before it is dressed with the peer's address; also what a broken half remembers,
/// so later calls report the same cause.
#[derive(Debug, Clone)]
pub(super) enum Fault {
    Tls(rustls::Error),
    Io(io::ErrorKind, String),
    ClosedDuringHandshake,
    Truncated,
    TooLarge(usize),
    WriteAfterClose,
    Internal(String),
}

impl Fault {
    pub(super) fn io(e: &io::Error) -> Self {
        Self::Io(e.kind(), e.to_string())
    }

    pub(super) fn into_error(self, peer: Peer) -> TlsError {
        match self {
            Self::Tls(source) => TlsError::Tls { peer, source },
            Self::Io(kind, msg) => TlsError::Io {
                peer,
                source: io::Error::new(kind, msg),
            },
            Self::ClosedDuringHandshake => TlsError::ClosedDuringHandshake { peer },
            Self::Truncated => TlsError::TruncatedByPeer { peer },
            Self::TooLarge(limit) => TlsError::MessageTooLarge { peer, limit },
            Self::WriteAfterClose => TlsError::WriteAfterClose { peer },
            Self::Internal(detail) => TlsError::Internal { peer, detail },
        }
    }
}

/// rustls prints a certificate error of our own verifiers (a CA pin mismatch, say) with
/// `Debug`; print its own message instead, which says what to do.
fn describe(error: &rustls::Error) -> String {
    match error {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
            format!("invalid peer certificate: {other}")
        }
        other => other.to_string(),
    }
}
