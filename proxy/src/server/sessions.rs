//! ALPN_SESSION: a user's leg. Each OPEN names a node; the proxy authorizes, routes
//! (tunnel, or a direct TCP dial) and splices.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
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

/// Most frames read while looking for a user connection's first OPEN: a client sends HELLO
/// and then its OPEN; anything longer is served where it landed.
const PEEK_MAX_FRAMES: usize = 4;
/// Most bytes read while looking for it: a HELLO and an OPEN with the largest credential
/// (`frame::codec::MAX_CREDENTIAL_LEN`) fit.
const PEEK_MAX_BYTES: usize = 16 * 1024;

/// Reads a user connection's first frames, up to its first OPEN, into `input` without
/// consuming them, and returns the node the OPEN names: the connection belongs on that node's
/// owner core. `None` when the client sends something else first, or nothing.
pub(super) async fn peek_first_open(
    conn: &mut TlsConnection,
    input: &mut BytesMut,
) -> Option<String> {
    let limits = frame::Limits::default();
    loop {
        let mut view = input.clone();
        for _ in 0..PEEK_MAX_FRAMES {
            match frame::decode(&mut view, &limits) {
                Ok(Some(frame::Frame::Open { open, .. })) => return Some(open.node),
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return None,
            }
        }
        if input.len() > PEEK_MAX_BYTES {
            return None;
        }
        match conn.read(input).await {
            Ok(n) if n > 0 => {}
            _ => return None,
        }
    }
}

pub(super) async fn serve_session(
    ctx: Rc<Context>,
    conn: TlsConnection,
    input: BytesMut,
    peer: SocketAddr,
    user: PeerIdentity,
) {
    let tunnel = tunnel::mux::Tunnel::new(ctx.new_session());
    let driven = tunnel.clone();
    let driver = monoio::spawn(async move { drive(&driven, conn, input).await });
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
        s.sessions_active.fetch_add(1, Ordering::Relaxed);
        s.sessions_total.fetch_add(1, Ordering::Relaxed);
        ActiveSession(ctx)
    }
}

impl Drop for ActiveSession<'_> {
    fn drop(&mut self) {
        self.0.stats.sessions_active.fetch_sub(1, Ordering::Relaxed);
    }
}

fn reject(
    ctx: &Context,
    incoming: Incoming,
    user: &PeerIdentity,
    peer: SocketAddr,
    code: ErrorCode,
    reason: &str,
) {
    let session_id = util::to_hex(&incoming.request.session_id);
    let node = incoming.request.node.clone();
    ctx.stats.refused(code);
    let login = incoming.request.login.clone();
    tracing::info!(%session_id, user = %user.name, %node, %login, %peer, code = code.name(), %reason, "session refused");
    if code == ErrorCode::ACCESS_DENIED {
        ctx.audit.record(
            "access.denied",
            serde_json::json!({
                "session_id": session_id, "user": user.name, "roles": user.roles, "node": node,
                "login": login, "client_addr": peer.to_string(), "reason": reason,
            }),
        );
    }
    incoming.reject(code, reason);
}

/// Where an authorized session goes: the agent's stream, or a TCP connection to the node.
enum Target {
    Tunnel(tunnel::mux::MuxStream),
    Direct(monoio::net::TcpStream),
}

async fn handle_open(ctx: Rc<Context>, incoming: Incoming, user: PeerIdentity, peer: SocketAddr) {
    let request = incoming.request.clone();
    let target = match connect_target(&ctx, &request, &user, peer).await {
        Ok(target) => target,
        Err((code, reason)) => {
            reject(&ctx, incoming, &user, peer, code, &reason);
            return;
        }
    };
    let Ok(user_stream) = incoming.accept() else {
        return; // the user's connection ended meanwhile; dropping the target closes it
    };
    let active = ActiveSession::new(&ctx);
    let via = match target {
        Target::Tunnel(_) => "tunnel",
        Target::Direct(_) => "direct",
    };
    let started = session_start(&ctx, &request, &user, peer, via);
    let (outcome, settle) = match target {
        Target::Tunnel(agent) => splice::splice_streams(user_stream, agent, ("user", "node")).await,
        Target::Direct(tcp) => splice::splice_tcp(user_stream, tcp, ("user", "node")).await,
    };
    session_end(&ctx, &request, &user, peer, via, started, &outcome);
    drop(active);
    settle.wait().await;
}

/// Authorizes the request and connects to its node, or says why not (code and reason for
/// the user, who sees them as the session's error).
async fn connect_target(
    ctx: &Context,
    request: &Open,
    user: &PeerIdentity,
    peer: SocketAddr,
) -> Result<Target, (ErrorCode, String)> {
    let node = &request.node;
    if ctx.draining.get() {
        return Err((
            ErrorCode::GOING_AWAY,
            "the proxy is shutting down; retry in a moment".into(),
        ));
    }
    if !request.cluster.is_empty() && request.cluster != ctx.cluster {
        return Err((
            ErrorCode::CLUSTER_UNKNOWN,
            format!(
                "no trusted cluster named {:?}; this proxy serves cluster {:?}",
                request.cluster, ctx.cluster
            ),
        ));
    }
    let route = ctx.directory.route(node);
    if let Some(labels) = route.labels() {
        ctx.policy
            .check(user, node, labels, &request.login)
            .map_err(|denied| (ErrorCode::ACCESS_DENIED, denied.0))?;
    }
    match route {
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
            match monoio::time::timeout(CONNECT_TIMEOUT, entry.tunnel.open(open)).await {
                Ok(Ok(stream)) => Ok(Target::Tunnel(stream)),
                Ok(Err(StreamError::Refused { code, reason })) => {
                    Err((code, format!("node {node} refused: {reason}")))
                }
                Ok(Err(e)) => Err((
                    ErrorCode::CONNECT_FAILED,
                    format!("cannot open a stream to node {node} through its tunnel: {e}"),
                )),
                Err(_) => Err((
                    ErrorCode::CONNECT_FAILED,
                    format!(
                        "node {node} did not answer within {}s",
                        CONNECT_TIMEOUT.as_secs()
                    ),
                )),
            }
        }
        Route::Direct { address, .. } => {
            if request.service != "ssh" {
                return Err((
                    ErrorCode::TARGET_NOT_ALLOWED,
                    format!(
                        "node {node} is dialled directly and offers only the service \"ssh\", not {:?}",
                        request.service
                    ),
                ));
            }
            match monoio::time::timeout(CONNECT_TIMEOUT, dial(&address)).await {
                Ok(Ok(tcp)) => {
                    let _ = tcp.set_nodelay(true);
                    Ok(Target::Direct(tcp))
                }
                Ok(Err(e)) => Err((
                    ErrorCode::CONNECT_FAILED,
                    format!("cannot connect to node {node} at {address}: {e}"),
                )),
                Err(_) => Err((
                    ErrorCode::CONNECT_FAILED,
                    format!(
                        "node {node} at {address} did not accept a connection within {}s",
                        CONNECT_TIMEOUT.as_secs()
                    ),
                )),
            }
        }
        Route::Offline { since, .. } => {
            let ago = SystemTime::now().duration_since(since).unwrap_or_default();
            Err((
                ErrorCode::NODE_OFFLINE,
                format!(
                    "node {node} is known but offline since {} ({} ago); its agent is not connected",
                    util::rfc3339(since),
                    util::human_duration(ago)
                ),
            ))
        }
        Route::OtherCore { .. } => Err((
            ErrorCode::CONNECT_FAILED,
            format!(
                "node {node} is served by another core of this proxy than this connection's \
                 first node; open one connection per node (remoteler does)"
            ),
        )),
        Route::Unknown => Err((
            ErrorCode::NODE_UNKNOWN,
            format!(
                "no node named {node} in cluster {}; `remoteler ls` lists them",
                ctx.cluster
            ),
        )),
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
            "session_id": session_id, "user": user.name, "roles": user.roles,
            "node": request.node, "login": request.login, "service": request.service, "via": via,
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
    let stats = &ctx.stats;
    stats
        .bytes_from_users
        .fetch_add(outcome.forward, Ordering::Relaxed);
    stats
        .bytes_to_users
        .fetch_add(outcome.backward, Ordering::Relaxed);
    tracing::info!(
        %session_id, user = %user.name, node = %request.node, %via, %peer,
        bytes_from_user = outcome.forward, bytes_to_user = outcome.backward,
        duration_ms = duration.as_millis() as u64, %reason, "session end"
    );
    ctx.audit.record(
        "session.end",
        serde_json::json!({
            "session_id": session_id, "user": user.name, "roles": user.roles,
            "node": request.node, "login": request.login, "via": via,
            "client_addr": peer.to_string(), "bytes_from_user": outcome.forward, "bytes_to_user": outcome.backward,
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
