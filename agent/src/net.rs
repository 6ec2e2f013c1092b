//! Dialling the proxy: TCP with a timeout, then TLS with the ALPN of the exchange.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use config::HostPort;
use monoio::net::TcpStream;
use rustls_pki_types::ServerName;
use tunnel::tls::{self, TlsConnection, TlsError};

/// Time allowed for the TCP connect of one address.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = config::DEFAULT_HANDSHAKE_TIMEOUT;

/// Why one connection attempt failed; the agent logs it and tries again after a backoff.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DialError {
    /// The host name did not resolve.
    #[error("cannot resolve {addr}: {source}")]
    Resolve {
        /// What was dialled.
        addr: String,
        /// The resolver's error.
        source: std::io::Error,
    },
    /// No address of the host accepted a TCP connection.
    #[error("cannot connect to {addr}: {detail}")]
    Connect {
        /// What was dialled.
        addr: String,
        /// The last error.
        detail: String,
    },
    /// The host part is not usable as a TLS server name.
    #[error("{host:?} is not a valid TLS server name (a DNS name or an IP address)")]
    ServerName {
        /// The host.
        host: String,
    },
    /// The TLS handshake failed.
    #[error("tls handshake with {addr} failed: {source}")]
    Tls {
        /// What was dialled.
        addr: String,
        /// The TLS error.
        source: TlsError,
    },
    /// The proxy did not agree on the protocol.
    #[error(
        "the server at {addr} did not agree on protocol {wanted}; is this the right port of a remoteler proxy?"
    )]
    Alpn {
        /// What was dialled.
        addr: String,
        /// The ALPN asked for.
        wanted: String,
    },
}

/// Resolves `addr` (blocking DNS lookup: the agent does one dial at a time).
pub fn resolve(addr: &HostPort) -> Result<Vec<SocketAddr>, DialError> {
    let resolve_err = |source| DialError::Resolve {
        addr: addr.to_string(),
        source,
    };
    let addrs: Vec<SocketAddr> = addr.to_socket_addrs().map_err(resolve_err)?.collect();
    if addrs.is_empty() {
        return Err(resolve_err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no addresses",
        )));
    }
    Ok(addrs)
}

/// Connects TCP to the first address of `addr` that answers within [`CONNECT_TIMEOUT`].
pub async fn connect_tcp(addr: &HostPort) -> Result<TcpStream, DialError> {
    let mut last = String::from("no address tried");
    // Name the address tried only when it is not already what the message shows.
    let named = addr.ip().is_none();
    let at = |sockaddr: SocketAddr| {
        if named {
            format!("{sockaddr}: ")
        } else {
            String::new()
        }
    };
    for sockaddr in resolve(addr)? {
        match monoio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect_addr(sockaddr)).await {
            Ok(Ok(tcp)) => return Ok(tcp),
            Ok(Err(e)) => last = format!("{}{e}", at(sockaddr)),
            Err(_) => last = format!("{}no answer within {CONNECT_TIMEOUT:?}", at(sockaddr)),
        }
    }
    Err(DialError::Connect {
        addr: addr.to_string(),
        detail: last,
    })
}

/// Connects TCP and TLS to `addr`, verifying the server with `config`, and checks that the
/// server agreed on `alpn`. `config.alpn_protocols` must be `[alpn]`.
pub async fn connect_tls(
    addr: &HostPort,
    config: Arc<rustls::ClientConfig>,
    alpn: &[u8],
) -> Result<TlsConnection, DialError> {
    let server_name =
        ServerName::try_from(addr.host().to_owned()).map_err(|_| DialError::ServerName {
            host: addr.host().to_owned(),
        })?;
    let tcp = connect_tcp(addr).await?;
    let conn = tls::connect(tcp, config, server_name, HANDSHAKE_TIMEOUT)
        .await
        .map_err(|source| DialError::Tls {
            addr: addr.to_string(),
            source,
        })?;
    if conn.alpn_protocol().as_deref() != Some(alpn) {
        return Err(DialError::Alpn {
            addr: addr.to_string(),
            wanted: String::from_utf8_lossy(alpn).into_owned(),
        });
    }
    Ok(conn)
}
