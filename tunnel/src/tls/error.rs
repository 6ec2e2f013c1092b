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

    /// A server's peer did not send its whole ClientHello in time: a silent or trickling
    /// connection, closed early so it cannot hold a handshake slot for the full deadline.
    #[error(
        "no complete tls ClientHello from {peer} within {}s (limits.hello_timeout)",
        deadline.as_secs_f64()
    )]
    HelloTimeout {
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
            | Self::HelloTimeout { peer, .. }
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

/// rustls prints certificate errors with `Debug`; say what happened in words, and for the
/// errors a wrong clock causes (edge devices without a battery-backed clock), what to do.
fn describe(error: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    let secs = |t: &rustls_pki_types::UnixTime| t.as_secs();
    let clock = "check this machine's clock (NTP) and the peer's";
    match error {
        rustls::Error::InvalidCertificate(C::Other(other)) => {
            format!("invalid peer certificate: {other}")
        }
        rustls::Error::InvalidCertificate(C::ExpiredContext { time, not_after }) => format!(
            "the peer's certificate expired {} s before this machine's time ({} s after the \
             Unix epoch); {clock}, or renew the certificate",
            secs(time).saturating_sub(secs(not_after)),
            secs(time)
        ),
        rustls::Error::InvalidCertificate(C::NotValidYetContext { time, not_before }) => format!(
            "the peer's certificate is not valid for another {} s by this machine's time ({} s \
             after the Unix epoch): {clock}",
            secs(not_before).saturating_sub(secs(time)),
            secs(time)
        ),
        rustls::Error::InvalidCertificate(C::Expired) => {
            format!("the peer's certificate has expired; {clock}, or renew the certificate")
        }
        rustls::Error::InvalidCertificate(C::NotValidYet) => {
            format!("the peer's certificate is not valid yet: {clock}")
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrong_clock_is_named_as_the_likely_cause() {
        let at =
            |s| rustls_pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(s));
        let early = TlsError::Tls {
            peer: Peer(None),
            source: rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidYetContext {
                    time: at(1_000),
                    not_before: at(4_600),
                },
            ),
        }
        .to_string();
        assert!(early.contains("not valid for another 3600 s"), "{early}");
        assert!(early.contains("clock"), "{early}");
        let late = TlsError::Tls {
            peer: Peer(None),
            source: rustls::Error::InvalidCertificate(rustls::CertificateError::ExpiredContext {
                time: at(10_000),
                not_after: at(9_000),
            }),
        }
        .to_string();
        assert!(late.contains("expired 1000 s before"), "{late}");
        assert!(!late.contains("ExpiredContext"), "{late}");
    }
}
