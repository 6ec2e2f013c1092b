//! Dialling the proxy's user listener with TLS and the ALPN of the exchange.

use std::net::ToSocketAddrs;
use std::sync::Arc;
use std::time::Duration;

use config::HostPort;
use monoio::net::TcpStream;
use rustls_pki_types::ServerName;
use tunnel::tls::{self, TlsConnection};

use crate::ClientError;

/// Time allowed for the TCP connect of one address.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Parses a proxy address given by the user.
pub fn parse_proxy(text: &str) -> Result<HostPort, ClientError> {
    text.parse::<HostPort>()
        .map_err(|e| ClientError::msg(format!("--proxy: {e}")))
}

/// TCP + TLS to `addr` with `config` (whose `alpn_protocols` is `[alpn]`); checks the ALPN.
pub async fn connect(
    addr: &HostPort,
    config: Arc<rustls::ClientConfig>,
    alpn: &[u8],
) -> Result<TlsConnection, ClientError> {
    let unreachable =
        |detail: String| ClientError::msg(format!("cannot reach the proxy at {addr}: {detail}"));
    let server_name = ServerName::try_from(addr.host().to_owned())
        .map_err(|_| ClientError::msg(format!("{:?} is not a valid host name", addr.host())))?;
    let addrs: Vec<_> = addr
        .to_socket_addrs()
        .map_err(|e| unreachable(e.to_string()))?
        .collect();
    let mut last = "the name has no addresses".to_owned();
    let mut tcp = None;
    for sockaddr in addrs {
        match monoio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect_addr(sockaddr)).await {
            Ok(Ok(s)) => {
                tcp = Some(s);
                break;
            }
            Ok(Err(e)) => last = format!("{sockaddr}: {e}"),
            Err(_) => last = format!("{sockaddr}: no answer within {CONNECT_TIMEOUT:?}"),
        }
    }
    let tcp = tcp.ok_or_else(|| unreachable(last))?;
    let conn = tls::connect(tcp, config, server_name, HANDSHAKE_TIMEOUT)
        .await
        .map_err(|e| {
            ClientError::msg(format!(
                "tls handshake with the proxy at {addr} failed: {e}"
            ))
        })?;
    if conn.alpn_protocol().as_deref() != Some(alpn) {
        return Err(ClientError::msg(format!(
            "the server at {addr} did not agree on protocol {}; is this the proxy's user port (3023 by default)?",
            String::from_utf8_lossy(alpn)
        )));
    }
    Ok(conn)
}
