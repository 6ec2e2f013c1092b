//! Direct mode: the proxy dials this node's sshd itself; the agent only registers the
//! address with heartbeats over mutual TLS to the proxy's auth listener.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use config::{AgentConfig, HostPort};
use tracing::{debug, info};
use tunnel::control::{self, ALPN_REGISTER, Ack, RegisterRequest};

use crate::AgentError;
use crate::net;
use crate::stop::Stop;
use crate::store::NodeIdentity;
use crate::tunnel_mode::TunnelEnd;

/// How long the proxy keeps the node registered without a heartbeat; a heartbeat is sent
/// every third of it, so two may be lost before the node shows offline.
pub const REGISTER_TTL: Duration = Duration::from_secs(30);

/// Time allowed for the proxy's answer to one heartbeat.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// The heartbeat this agent sends.
pub fn register_request(config: &AgentConfig, ssh_address: &HostPort) -> RegisterRequest {
    RegisterRequest {
        ssh_address: ssh_address.to_string(),
        labels: config
            .labels
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        ttl_secs: REGISTER_TTL.as_secs(),
    }
}

/// Connects to the auth listener and sends heartbeats until the connection fails or `stop`.
pub async fn run_once(
    config: &AgentConfig,
    auth: &HostPort,
    ssh_address: &HostPort,
    node: &NodeIdentity,
    stop: &Stop,
) -> Result<TunnelEnd, AgentError> {
    let tls_config = node.client_config(ALPN_REGISTER)?;
    let ended = |uptime, reason: String| Ok(TunnelEnd { uptime, reason });
    let conn = monoio::select! {
        conn = net::connect_tls(auth, tls_config, ALPN_REGISTER) => conn,
        _ = stop.wait() => return ended(Duration::ZERO, "stopped".into()),
    };
    let conn = match conn {
        Ok(conn) => conn,
        Err(e) => return ended(Duration::ZERO, e.to_string()),
    };
    let started = Instant::now();
    let (mut reader, mut writer) = conn.split();
    let request = register_request(config, ssh_address);
    let mut buf = BytesMut::new();
    let mut first = true;
    loop {
        let exchange = async {
            control::write_line(&mut writer, &request).await?;
            control::read_reply::<Ack>(&mut reader, &mut buf).await
        };
        let result = monoio::select! {
            r = monoio::time::timeout(ACK_TIMEOUT, exchange) => r,
            _ = stop.wait() => {
                let _ = writer.close().await;
                return ended(started.elapsed(), "agent shutting down".into());
            }
        };
        match result {
            Ok(Ok(Ack {})) => {
                if first {
                    info!(auth = %auth, ssh_address = %ssh_address, node = %config.node_name, "registered with the proxy");
                    first = false;
                } else {
                    debug!("heartbeat acknowledged");
                }
            }
            Ok(Err(e)) => return ended(started.elapsed(), format!("registration failed: {e}")),
            Err(_) => {
                return ended(
                    started.elapsed(),
                    format!("the proxy did not answer a heartbeat within {ACK_TIMEOUT:?}"),
                );
            }
        }
        monoio::select! {
            _ = monoio::time::sleep(REGISTER_TTL / 3) => {}
            _ = stop.wait() => {
                let _ = writer.close().await;
                return ended(started.elapsed(), "agent shutting down".into());
            }
        }
    }
}
