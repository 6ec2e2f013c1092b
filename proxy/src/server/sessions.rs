//! ALPN_SESSION: a user's leg. Each OPEN names a node; the proxy authorizes, routes
//! (tunnel, or a direct TCP dial) and splices.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use frame::{ErrorCode, Open};
use tunnel::identity::PeerIdentity;
use tunnel::mux::{Incoming, StreamError, drive};
use tunnel::tls::TlsConnection;

use super::Context;
use crate::directory::Route;
use crate::splice::{self, SpliceOutcome};
use crate::util;

/// How long the agent has to answer an OPEN, and a direct dial to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why access was denied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied(pub String);

/// Whether `user` may reach `node` as `login` (`""` when only listing). For now any valid
/// user certificate of this cluster may reach any node; roles will decide here.
pub fn authorize(user: &PeerIdentity, node: &str, login: &str) -> Result<(), Denied> {
    let _ = (user, node, login);
    Ok(())
}

pub(super) async fn serve_session(
    ctx: Rc<Context>,
    conn: TlsConnection,
    peer: SocketAddr,
    user: PeerIdentity,
) {
    let tunnel = tunnel::mux::Tunnel::new(ctx.new_session());
    let driven = tunnel.clone();
    let driver = monoio::spawn(async move { drive(&driven, conn, BytesMut::new()).await });
    let registration = ctx.add_user_tunnel(&tunnel);
    tracing::debug!(%peer, user = %user.name, "user connection up");
    while let Some(incoming) = tunnel.incoming().await {
        monoio::spawn(handle_open(ctx.clone(), incoming, user.clone(), peer));
    }
    let outcome = driver.await;
    ctx.remove_user_tunnel(registration);
    tracing::debug!(%peer, user = %user.name, ?outcome, "user connection closed");
}

/// Counts a session as active while alive.
struct ActiveSession<'a>(&'a Context);

impl<'a> ActiveSession<'a> {
    fn new(ctx: &'a Context) -> Self {
        let s = &ctx.stats;
        s.sessions_active.set(s.sessions_active.get() + 1);
        s.sessions_total.set(s.sessions_total.get() + 1);
        ActiveSession(ctx)
    }
}

impl Drop for ActiveSession<'_> {
    fn drop(&mut self) {
        let s = &self.0.stats;
        s.sessions_active
            .set(s.sessions_active.get().saturating_sub(1));
    }
}

fn reject(
    ctx: &Context,
    incoming: Incoming,
    user: &str,
    peer: SocketAddr,
    code: ErrorCode,
    reason: &str,
) {
    let session_id = util::to_hex(&incoming.request.session_id);
    let node = incoming.request.node.clone();
    tracing::info!(%session_id, %user, %node, %peer, code = code.name(), %reason, "session refused");
    if code == ErrorCode::ACCESS_DENIED {
        ctx.audit.record(
            "access.denied",
            serde_json::json!({
                "session_id": session_id, "user": user, "node": node,
                "client_addr": peer.to_string(), "reason": reason,
            }),
        );
    }
    incoming.reject(code, reason);
}

async fn handle_open(ctx: Rc<Context>, incoming: Incoming, user: PeerIdentity, peer: SocketAddr) {
    let request = incoming.request.clone();
    let node = request.node.clone();
    if ctx.draining.get() {
        reject(
            &ctx,
            incoming,
            &user.name,
            peer,
            ErrorCode::GOING_AWAY,
            "the proxy is shutting down; retry in a moment",
        );
        return;
    }
    if !request.cluster.is_empty() && request.cluster != ctx.cluster {
        let reason = format!(
            "no trusted cluster named {:?}; this proxy serves cluster {:?}",
            request.cluster, ctx.cluster
        );
        reject(
            &ctx,
            incoming,
            &user.name,
            peer,
            ErrorCode::CLUSTER_UNKNOWN,
            &reason,
        );
        return;
    }
    if let Err(denied) = authorize(&user, &node, &request.login) {
        reject(
            &ctx,
            incoming,
            &user.name,
            peer,
            ErrorCode::ACCESS_DENIED,
            &denied.0,
        );
        return;
    }
    match ctx.directory.route(&node) {
        Route::Tunnel(entry) => {
            let open = Open {
                session_id: request.session_id,
                cluster: String::new(),
                node: node.clone(),
                service: request.service.clone(),
                user: user.name.clone(),
                login: request.login.clone(),
                client_addr: peer.to_string(),
                credential: Bytes::new(),
            };
            let agent = match monoio::time::timeout(CONNECT_TIMEOUT, entry.tunnel.open(open)).await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(StreamError::Refused { code, reason })) => {
                    let reason = format!("node {node} refused: {reason}");
                    reject(&ctx, incoming, &user.name, peer, code, &reason);
                    return;
                }
                Ok(Err(e)) => {
                    let reason =
                        format!("cannot open a stream to node {node} through its tunnel: {e}");
                    reject(
                        &ctx,
                        incoming,
                        &user.name,
                        peer,
                        ErrorCode::CONNECT_FAILED,
                        &reason,
                    );
                    return;
                }
                Err(_) => {
                    let reason = format!(
                        "node {node} did not answer within {}s",
                        CONNECT_TIMEOUT.as_secs()
                    );
                    reject(
                        &ctx,
                        incoming,
                        &user.name,
                        peer,
                        ErrorCode::CONNECT_FAILED,
                        &reason,
                    );
                    return;
                }
            };
            let Ok(user_stream) = incoming.accept() else {
                return; // the user's connection ended meanwhile; dropping `agent` resets it
            };
            let active = ActiveSession::new(&ctx);
            let started = session_start(&ctx, &request, &user, peer, "tunnel");
            let (outcome, settle) =
                splice::splice_streams(user_stream, agent, ("user", "node")).await;
            session_end(&ctx, &request, &user, peer, "tunnel", started, &outcome);
            drop(active);
            settle.wait().await;
        }
        Route::Direct(address) => {
            if request.service != "ssh" {
                let reason = format!(
                    "node {node} is dialled directly and offers only the service \"ssh\", not {:?}",
                    request.service
                );
                reject(
                    &ctx,
                    incoming,
                    &user.name,
                    peer,
                    ErrorCode::TARGET_NOT_ALLOWED,
                    &reason,
                );
                return;
            }
            let dialled = monoio::time::timeout(CONNECT_TIMEOUT, dial(&address)).await;
            let tcp = match dialled {
                Ok(Ok(tcp)) => tcp,
                Ok(Err(e)) => {
                    let reason = format!("cannot connect to node {node} at {address}: {e}");
                    reject(
                        &ctx,
                        incoming,
                        &user.name,
                        peer,
                        ErrorCode::CONNECT_FAILED,
                        &reason,
                    );
                    return;
                }
                Err(_) => {
                    let reason = format!(
                        "node {node} at {address} did not accept a connection within {}s",
                        CONNECT_TIMEOUT.as_secs()
                    );
                    reject(
                        &ctx,
                        incoming,
                        &user.name,
                        peer,
                        ErrorCode::CONNECT_FAILED,
                        &reason,
                    );
                    return;
                }
            };
            let _ = tcp.set_nodelay(true);
            let Ok(user_stream) = incoming.accept() else {
                return;
            };
            let active = ActiveSession::new(&ctx);
            let started = session_start(&ctx, &request, &user, peer, "direct");
            let (outcome, settle) = splice::splice_tcp(user_stream, tcp, ("user", "node")).await;
            session_end(&ctx, &request, &user, peer, "direct", started, &outcome);
            drop(active);
            settle.wait().await;
        }
        Route::Offline { since } => {
            let ago = SystemTime::now().duration_since(since).unwrap_or_default();
            let reason = format!(
                "node {node} is known but offline since {} ({} ago); its agent is not connected",
                util::rfc3339(since),
                util::human_duration(ago)
            );
            reject(
                &ctx,
                incoming,
                &user.name,
                peer,
                ErrorCode::NODE_OFFLINE,
                &reason,
            );
        }
        Route::Unknown => {
            let reason = format!(
                "no node named {node} in cluster {}; `remoteler ls` lists them",
                ctx.cluster
            );
            reject(
                &ctx,
                incoming,
                &user.name,
                peer,
                ErrorCode::NODE_UNKNOWN,
                &reason,
            );
        }
    }
}

fn session_start(
    ctx: &Context,
    request: &Open,
    user: &PeerIdentity,
    peer: SocketAddr,
    via: &str,
) -> Instant {
    let session_id = util::to_hex(&request.session_id);
    tracing::info!(
        %session_id, user = %user.name, node = %request.node, login = %request.login, %via,
        %peer, "session start"
    );
    ctx.audit.record(
        "session.start",
        serde_json::json!({
            "session_id": session_id, "user": user.name, "node": request.node,
            "login": request.login, "service": request.service, "via": via,
            "client_addr": peer.to_string(),
        }),
    );
    Instant::now()
}

fn session_end(
    ctx: &Context,
    request: &Open,
    user: &PeerIdentity,
    peer: SocketAddr,
    via: &str,
    started: Instant,
    outcome: &SpliceOutcome,
) {
    let session_id = util::to_hex(&request.session_id);
    let reason = outcome.error.clone().unwrap_or_else(|| "closed".into());
    let duration = started.elapsed();
    tracing::info!(
        %session_id, user = %user.name, node = %request.node, %via, %peer,
        bytes_from_user = outcome.forward, bytes_to_user = outcome.backward,
        duration_ms = duration.as_millis() as u64, %reason, "session end"
    );
    ctx.audit.record(
        "session.end",
        serde_json::json!({
            "session_id": session_id, "user": user.name, "node": request.node,
            "login": request.login, "via": via, "client_addr": peer.to_string(),
            "bytes_from_user": outcome.forward, "bytes_to_user": outcome.backward,
            "duration_ms": duration.as_millis() as u64, "reason": reason,
        }),
    );
}

/// Connects to `address`, trying each resolved address in turn. Host names are resolved on a
/// helper thread: `getaddrinfo` blocks, and the core must not.
async fn dial(address: &config::HostPort) -> std::io::Result<monoio::net::TcpStream> {
    let addrs: Vec<SocketAddr> = match address.ip() {
        Some(ip) => vec![SocketAddr::new(ip, address.port())],
        None => {
            let target = address.clone();
            crate::blocking::run(move || {
                std::net::ToSocketAddrs::to_socket_addrs(&target).map(Iterator::collect)
            })
            .await
            .unwrap_or_else(|| Err(std::io::Error::other("the resolver thread failed")))?
        }
    };
    let mut last = std::io::Error::other("the host name resolved to no address");
    for addr in addrs {
        match monoio::net::TcpStream::connect_addr(addr).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = e,
        }
    }
    Err(last)
}
