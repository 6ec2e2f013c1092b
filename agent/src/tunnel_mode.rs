//! Tunnel mode: one reverse tunnel to the proxy, kept up forever; streams the proxy opens
//! are forwarded to the configured targets, and nothing else is ever dialled.

use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use config::{AgentConfig, Forwards, HostPort};
use frame::{Announce, ErrorCode, NodeInfo, Role, Session, SessionConfig};
use tracing::{debug, info, warn};
use tunnel::control::ALPN_TUNNEL;
use tunnel::mux::{self, DriveOutcome, Incoming, Tunnel};

use crate::net;
use crate::splice;
use crate::stop::Stop;
use crate::store::NodeIdentity;
use crate::{AgentError, random_id, short_hex};

/// Time a closing tunnel gets to send its GOAWAY before the connection is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// What the agent tells the proxy about itself.
pub fn announcement(config: &AgentConfig) -> Announce {
    Announce {
        cluster: String::new(),
        nodes: vec![NodeInfo {
            name: config.node_name.to_string(),
            online: true,
            tunnel: true,
            labels: config
                .labels
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            services: config.forwards.iter().map(|f| f.name.to_string()).collect(),
        }],
    }
}

/// The frame session settings from the configuration.
pub fn session_config(config: &AgentConfig) -> SessionConfig {
    let mut c = SessionConfig::new(Role::Agent, true);
    c.initial_window = config.flow.window();
    c.max_frame = config.flow.max_frame();
    c.keepalive_interval = config.keepalive.interval;
    c.keepalive_count = config.keepalive.count;
    c.resume_grace = config.resume.grace;
    c
}

/// How one tunnel ended.
#[derive(Debug)]
pub struct TunnelEnd {
    /// How long it was up (zero if it never came up).
    pub uptime: Duration,
    /// Why it ended.
    pub reason: String,
}

/// A session whose connection was lost, kept for the next connection to resume: its
/// streams (ssh sessions in progress) carry on where they stopped if the proxy still holds
/// its side; otherwise they are reset when the proxy answers as a new session.
pub struct Detached {
    tunnel: Tunnel,
    server: monoio::task::JoinHandle<()>,
    session_id: [u8; 16],
}

impl std::fmt::Debug for Detached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detached")
            .field("session", &short_hex(&self.session_id))
            .finish()
    }
}

/// Connects one tunnel and serves it until it ends or `stop` is given. A session detached by
/// a lost connection is left in `kept` for the next call to resume.
pub async fn run_once(
    config: &AgentConfig,
    proxy: &HostPort,
    node: &NodeIdentity,
    stop: &Stop,
    kept: &mut Option<Detached>,
) -> Result<TunnelEnd, AgentError> {
    let tls_config = node.client_config(ALPN_TUNNEL)?;
    let conn = monoio::select! {
        conn = net::connect_tls(proxy, tls_config, ALPN_TUNNEL) => conn,
        _ = stop.wait() => return Ok(TunnelEnd { uptime: Duration::ZERO, reason: "stopped".into() }),
    };
    let conn = match conn {
        Ok(conn) => conn,
        Err(e) => {
            return Ok(TunnelEnd {
                uptime: Duration::ZERO,
                reason: e.to_string(),
            });
        }
    };
    let started = Instant::now();
    let resumable = match kept.take() {
        Some(old) => {
            old.tunnel.tick(); // ends it if the grace period passed
            if old.tunnel.is_ended() || old.tunnel.reattach().is_err() {
                let _ = old.server.await;
                None
            } else {
                info!(session = %short_hex(&old.session_id), "resuming the session over the new connection");
                Some(old)
            }
        }
        None => None,
    };
    let (tunnel, server, session_id) = match resumable {
        Some(old) => (old.tunnel, old.server, old.session_id),
        None => {
            let session_id = random_id()?;
            let tunnel = Tunnel::new(Session::new(session_config(config), session_id, started));
            if let Err(e) = tunnel.announce(&announcement(config)) {
                // Names and labels were checked when the configuration was read; a failure
                // here is a limit of the protocol (for instance the announce size).
                return Err(AgentError::Announce(e.to_string()));
            }
            let forwards = Rc::new(config.forwards.clone());
            let server = monoio::spawn(serve(tunnel.clone(), forwards));
            (tunnel, server, session_id)
        }
    };
    let driver = {
        let tunnel = tunnel.clone();
        monoio::spawn(async move { mux::drive(&tunnel, conn, BytesMut::new()).await })
    };
    let connected = monoio::select! {
        up = tunnel.connected() => up,
        _ = stop.wait() => false,
    };
    if connected {
        info!(
            proxy = %proxy,
            session = %short_hex(&session_id),
            node = %config.node_name,
            "tunnel up"
        );
    }
    let mut driver = driver;
    let outcome = monoio::select! {
        outcome = &mut driver => Some(outcome),
        _ = stop.wait() => None,
    };
    let reason = match outcome {
        Some(DriveOutcome::Ended(e)) => e.to_string(),
        Some(DriveOutcome::TransportLost(Some(e))) => format!("connection lost: {e}"),
        Some(DriveOutcome::TransportLost(None)) => {
            "connection lost: the proxy closed it or stopped answering".to_owned()
        }
        None => {
            // The driver sends the GOAWAY and closes TLS once it sees the session ended.
            tunnel.close(ErrorCode::GOING_AWAY, "agent shutting down");
            let _ = monoio::time::timeout(CLOSE_GRACE, driver).await;
            "agent shutting down".to_owned()
        }
    };
    if tunnel.is_detached() && !stop.is_stopped() {
        // Keep the session: the next connection resumes it. Its grace timer runs meanwhile,
        // so streams do not wait forever if the proxy stays out of reach.
        let expiring = tunnel.clone();
        monoio::spawn(async move { expiring.expire_while_detached().await });
        *kept = Some(Detached {
            tunnel,
            server,
            session_id,
        });
    } else {
        if !tunnel.is_ended() {
            tunnel.close(ErrorCode::CANCELLED, "tunnel connection lost");
        }
        let _ = server.await;
    }
    Ok(TunnelEnd {
        uptime: if connected {
            started.elapsed()
        } else {
            Duration::ZERO
        },
        reason,
    })
}

/// Answers the proxy's OPENs until the session ends.
async fn serve(tunnel: Tunnel, forwards: Rc<Forwards>) {
    while let Some(incoming) = tunnel.incoming().await {
        let forwards = forwards.clone();
        monoio::spawn(async move { handle_open(incoming, &forwards).await });
    }
}

/// One OPEN: only a configured service is dialled.
async fn handle_open(incoming: Incoming, forwards: &Forwards) {
    let id = incoming.id();
    let request = &incoming.request;
    let session = short_hex(&request.session_id);
    let service = request.service.clone();
    let user = request.user.clone();
    let Some(forward) = forwards.get(&service) else {
        let allowed: Vec<&str> = forwards.iter().map(|f| f.name.as_str()).collect();
        let reason = format!(
            "this agent does not forward service {service:?}; allowed: {}",
            allowed.join(", ")
        );
        warn!(stream = id, session = %session, service = %service, user = %user, "refused stream: service not forwarded");
        incoming.reject(ErrorCode::TARGET_NOT_ALLOWED, &reason);
        return;
    };
    let target = forward.target.clone();
    debug!(stream = id, session = %session, service = %service, target = %target, "dialling target");
    let tcp = match net::connect_tcp(&target).await {
        Ok(tcp) => tcp,
        Err(e) => {
            let reason = format!("{service}: {e}");
            warn!(stream = id, session = %session, service = %service, user = %user, error = %e, "stream refused: target unreachable");
            incoming.reject(ErrorCode::CONNECT_FAILED, &reason);
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    let stream = match incoming.accept() {
        Ok(stream) => stream,
        Err(e) => {
            warn!(stream = id, session = %session, error = %e, "cannot accept stream");
            return;
        }
    };
    info!(stream = id, session = %session, service = %service, user = %user, target = %target, "stream open");
    let report = splice::splice(stream, tcp).await;
    match report.error {
        None => info!(
            stream = id,
            session = %session,
            bytes_in = report.to_tcp,
            bytes_out = report.to_stream,
            "stream closed"
        ),
        Some(reason) => info!(
            stream = id,
            session = %session,
            bytes_in = report.to_tcp,
            bytes_out = report.to_stream,
            reason = %reason,
            "stream aborted"
        ),
    }
}

/// Whether a forward target is dialled on this host only (the proxy cannot dial it).
pub fn is_loopback(addr: &HostPort) -> bool {
    match addr.ip() {
        Some(ip) => ip.is_loopback(),
        None => addr.host().eq_ignore_ascii_case("localhost"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn loopback_detection() {
        for (addr, loopback) in [
            ("127.0.0.1:22", true),
            ("127.1.2.3:22", true),
            ("[::1]:22", true),
            ("localhost:22", true),
            ("10.0.0.7:22", false),
            ("node-a.internal:22", false),
        ] {
            assert_eq!(is_loopback(&addr.parse().unwrap()), loopback, "{addr}");
        }
    }
}
