//! ALPN_SESSION: a user's leg. Each OPEN names a node; the proxy authorizes, routes
//! (tunnel, or a direct TCP dial) and splices. An OPEN naming a trusted leaf cluster is
//! authorized for the cluster only and passed through the leaf's tunnel with the user's
//! certificate; the leaf decides and audits it (see `clusters`). A leaf serves the OPENs its
//! root passes with [`handle_open`] too, once it has checked the certificate and mapped the
//! roles.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use frame::{ErrorCode, Open};
use tunnel::identity::PeerIdentity;
use tunnel::mux::{DriveOutcome, Incoming, StreamError, drive};
use tunnel::tls::TlsConnection;

use super::resume;
use super::{Context, Stats};
use crate::directory::{ClusterRoute, Route, StreamSlot};
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

/// What a user connection's first frames ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum FirstRequest {
    /// A session to a node: `(cluster, node)` of its first OPEN.
    Open(String, String),
    /// To resume the client's session with this id (HELLO with RESUMING, no OPEN follows
    /// until the session is back).
    Resume([u8; 16]),
}

/// Reads a user connection's first frames, up to its first OPEN or a resuming HELLO, into
/// `input` without consuming them, and returns what they ask for: the connection belongs on
/// the node's owner core (for a leaf cluster's node, the core holding the leaf tunnel that
/// announced it), or on the core that holds the session it resumes. `None` when the client
/// sends something else first, or nothing.
pub(super) async fn peek_first_request(
    conn: &mut TlsConnection,
    input: &mut BytesMut,
) -> Option<FirstRequest> {
    let limits = frame::Limits::default();
    loop {
        let mut view = input.clone();
        for _ in 0..PEEK_MAX_FRAMES {
            match frame::decode(&mut view, &limits) {
                Ok(Some(frame::Frame::Open { open, .. })) => {
                    return Some(FirstRequest::Open(open.cluster, open.node));
                }
                Ok(Some(frame::Frame::Hello(hello))) if hello.resuming => {
                    return Some(FirstRequest::Resume(hello.session_id));
                }
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

/// The client's HELLO at the start of `input`, if it is there whole.
pub(super) fn hello_in(input: &BytesMut) -> Option<frame::Hello> {
    match frame::decode(&mut input.clone(), &frame::Limits::default()) {
        Ok(Some(frame::Frame::Hello(hello))) => Some(hello),
        _ => None,
    }
}

/// Serves a user's connection: its OPENs, until the session ends. A lost connection
/// detaches the session for `resume.grace`; the client's next connection (on any core, moved
/// here) resumes it and the streams carry on.
pub(super) async fn serve_session(
    ctx: Rc<Context>,
    conn: TlsConnection,
    input: BytesMut,
    peer: SocketAddr,
    mut user: PeerIdentity,
) {
    let owner = format!("{}@{}", user.name, user.cluster);
    let hello = hello_in(&input);
    if let Some(id) = hello.as_ref().filter(|h| h.resuming).map(|h| h.session_id) {
        let key = resume::SessionKey::new(&user, id);
        let detached = || {
            let waiting = ctx.detached_users.borrow().get(&key).cloned();
            waiting.filter(|w| w.resumable_by(id, &owner))
        };
        let attached = ctx.attached_user_tunnel(id, &user);
        if let Some(waiting) = Box::pin(resume::take_over(detached, attached)).await {
            ctx.detached_users.borrow_mut().remove(&key);
            tracing::info!(%peer, user = %user.name, "user reconnected; resuming the connection's sessions");
            waiting.hand_over((conn, input, peer));
            return;
        }
        // Served as a new session: the client learns from our HELLO that we do not hold
        // its session, and its streams end with RESUME_FAILED.
        tracing::info!(%peer, user = %user.name, "user asked to resume a connection this proxy does not hold (grace expired, or the proxy restarted)");
    }
    // The leaf of a trusted cluster checks the user's certificate itself: it goes along with
    // OPENs that name one.
    let mut credential = leaf_certificate(&conn);
    let client_key = hello.map(|h| resume::SessionKey::new(&user, h.session_id));
    if let Some(key) = &client_key {
        ctx.session_homes.insert(key.clone(), ctx.core);
    }
    let tunnel = tunnel::mux::Tunnel::new(ctx.new_user_session());
    let registration = ctx.add_user_tunnel(&tunnel, &user);
    let driven = tunnel.clone();
    let mut driver = monoio::spawn(async move { drive(&driven, conn, input).await });
    tracing::debug!(%peer, user = %user.name, "user connection up");
    let mut peer = peer;
    let reason = loop {
        let outcome = Box::pin(serve_opens(
            &ctx,
            &tunnel,
            &mut driver,
            &user,
            &peer.to_string(),
            &credential,
        ))
        .await;
        let reason = outcome_reason(&outcome);
        let (true, false, Some(key)) = (tunnel.is_detached(), ctx.draining.get(), &client_key)
        else {
            break reason;
        };
        let grace = ctx.config.resume.grace;
        tracing::info!(
            %peer, user = %user.name, %reason, grace_secs = grace.as_secs(),
            "user connection lost; its sessions wait for the client to resume"
        );
        Stats::bump(&ctx.stats.connections_detached[0]);
        ctx.audit.record(
            "user.detached",
            serde_json::json!({
                "user": user.name, "user_cluster": user.cluster,
                "client_addr": peer.to_string(), "reason": reason,
            }),
        );
        let next = resume::await_resume(
            &ctx.detached_users,
            key.clone(),
            &tunnel,
            &owner,
            &reason,
            grace,
        )
        .await;
        let (conn, input, new_peer) = match next {
            Ok(transport) => transport,
            Err((why, _)) => break why,
        };
        // The new connection's certificate (checked at its handshake, and of the same user)
        // may be a newer one: from now on its expiry and revocation count.
        let resumed_with = leaf_certificate(&conn);
        if let Ok(id) = PeerIdentity::from_der(&resumed_with) {
            if id.name == user.name && id.cluster == user.cluster {
                user = id;
                credential = resumed_with;
                ctx.update_user_tunnel(registration, &user);
            }
        }
        if let Err(e) = tunnel.reattach() {
            break format!("{reason}; cannot resume: {e}");
        }
        tracing::info!(%peer, %new_peer, user = %user.name, "user connection resumed");
        Stats::bump(&ctx.stats.connections_resumed[0]);
        ctx.audit.record(
            "user.resumed",
            serde_json::json!({
                "user": user.name, "user_cluster": user.cluster,
                "client_addr": new_peer.to_string(), "previous_client_addr": peer.to_string(),
            }),
        );
        peer = new_peer;
        let driven = tunnel.clone();
        driver = monoio::spawn(async move { drive(&driven, conn, input).await });
    };
    if !tunnel.is_ended() {
        tunnel.close(ErrorCode::GOING_AWAY, "connection lost");
    }
    ctx.remove_user_tunnel(registration);
    if let Some(key) = &client_key {
        ctx.session_homes.remove(key, ctx.core);
    }
    tracing::debug!(%peer, user = %user.name, %reason, "user connection closed");
}

/// The client's certificate (leaf), as the bytes passed on to a trusted leaf cluster.
fn leaf_certificate(conn: &TlsConnection) -> Bytes {
    conn.peer_certificates()
        .and_then(|chain| chain.into_iter().next())
        .map(|leaf| Bytes::copy_from_slice(leaf.as_ref()))
        .unwrap_or_default()
}

/// Serves the OPENs of a user's connection until its transport ends (the session ended, or
/// it is detached). The connection ends when the user's certificate expires: a session may
/// not outlive the certificate that opened it.
async fn serve_opens(
    ctx: &Rc<Context>,
    tunnel: &tunnel::mux::Tunnel,
    driver: &mut monoio::task::JoinHandle<DriveOutcome>,
    user: &PeerIdentity,
    client_addr: &str,
    credential: &Bytes,
) -> DriveOutcome {
    let mut expiry = std::pin::pin!(until_expired(user.not_after));
    loop {
        if tunnel.is_ended() {
            return driver.await;
        }
        monoio::select! {
            outcome = &mut *driver => return outcome,
            () = &mut expiry => {
                let why = super::expired_reason(user.not_after);
                tracing::info!(user = %user.name, serial = %user.serial, %client_addr, "closing a user connection: its certificate expired");
                tunnel.close(ErrorCode::ACCESS_DENIED, &why);
                expiry.set(until_expired(SystemTime::now() + Duration::from_secs(3600)));
            }
            incoming = tunnel.incoming() => {
                if let Some(incoming) = incoming {
                    monoio::spawn(handle_open(
                        ctx.clone(),
                        incoming,
                        user.clone(),
                        client_addr.to_owned(),
                        credential.clone(),
                    ));
                }
            }
        }
    }
}

/// Returns once `not_after` has passed (by the wall clock: certificates are checked
/// against it).
pub(super) async fn until_expired(not_after: SystemTime) {
    loop {
        let now = SystemTime::now();
        match not_after.duration_since(now) {
            // `check_valid_at` accepts `not_after` itself: one more millisecond.
            Ok(left) => monoio::time::sleep(left + Duration::from_millis(1)).await,
            Err(_) => return,
        }
    }
}

pub(super) fn outcome_reason(outcome: &DriveOutcome) -> String {
    match outcome {
        DriveOutcome::Ended(e) => e.to_string(),
        DriveOutcome::TransportLost(Some(e)) => format!("transport lost: {e}"),
        DriveOutcome::TransportLost(None) => {
            "transport lost: connection closed or keepalive timed out".into()
        }
    }
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
    client_addr: &str,
    code: ErrorCode,
    reason: &str,
) {
    let session_id = util::to_hex(&incoming.request.session_id);
    let node = incoming.request.node.clone();
    ctx.stats.refused(code);
    let login = incoming.request.login.clone();
    let cluster = incoming.request.cluster.clone();
    tracing::info!(%session_id, user = %user.name, %cluster, %node, %login, %client_addr, code = code.name(), %reason, "session refused");
    if code == ErrorCode::ACCESS_DENIED {
        ctx.audit.record(
            "access.denied",
            serde_json::json!({
                "session_id": session_id, "user": user.name, "user_cluster": user.cluster,
                "roles": user.roles, "cluster": cluster, "node": node,
                "login": login, "client_addr": client_addr, "reason": reason,
            }),
        );
    }
    incoming.reject(code, reason);
}

/// Where an authorized session goes: the agent's stream, a TCP connection to the node, or a
/// trusted leaf cluster's stream (which audits the session itself).
/// A tunnel's stream holds one of the user's slots of that tunnel
/// (`limits.max_streams_per_user_per_node`) until it ends.
enum Target {
    Tunnel(tunnel::mux::MuxStream, StreamSlot),
    Direct(monoio::net::TcpStream),
    Leaf(tunnel::mux::MuxStream, StreamSlot),
}

/// Serves one OPEN of `user` (a local user, or on a leaf a root user with mapped roles)
/// coming from `client_addr`; `credential` is the user's certificate, passed on to a leaf.
pub(super) async fn handle_open(
    ctx: Rc<Context>,
    incoming: Incoming,
    user: PeerIdentity,
    client_addr: String,
    credential: Bytes,
) {
    let request = incoming.request.clone();
    // The certificate is checked at every OPEN, not only at the handshake: it may have
    // expired, or the user been removed or locked, since.
    if let Some(why) = ctx.certificate_refusal(&user) {
        reject(
            &ctx,
            incoming,
            &user,
            &client_addr,
            ErrorCode::ACCESS_DENIED,
            &why,
        );
        return;
    }
    let target = match connect_target(&ctx, &request, &user, &client_addr, credential).await {
        Ok(target) => target,
        Err((code, reason)) => {
            reject(&ctx, incoming, &user, &client_addr, code, &reason);
            return;
        }
    };
    let Ok(user_stream) = incoming.accept() else {
        return; // the user's connection ended meanwhile; dropping the target closes it
    };
    let active = ActiveSession::new(&ctx);
    let (via, node, _slot) = match target {
        Target::Leaf(leaf, _slot) => {
            // The session is the leaf's: it writes session.start and session.end to its own
            // audit log; this cluster's log has no record of it (only the program log does).
            let session_id = util::to_hex(&request.session_id);
            tracing::info!(%session_id, user = %user.name, cluster = %request.cluster, node = %request.node, %client_addr, "session passed to trusted cluster");
            let (outcome, settle) =
                splice::splice_streams(user_stream, leaf, ("user", "cluster")).await;
            tracing::info!(
                %session_id, user = %user.name, cluster = %request.cluster, node = %request.node,
                bytes_from_user = outcome.forward, bytes_to_user = outcome.backward,
                reason = outcome.error.as_deref().unwrap_or("closed"), "session through trusted cluster ended"
            );
            drop(active);
            settle.wait().await;
            return;
        }
        Target::Tunnel(agent, slot) => ("tunnel", Ok(agent), Some(slot)),
        Target::Direct(tcp) => ("direct", Err(tcp), None),
    };
    // The address actually connected to (a host name's resolved address), for the audit.
    let dialled = node.as_ref().err().and_then(|tcp| tcp.peer_addr().ok());
    let started = session_start(&ctx, &request, &user, &client_addr, via, dialled);
    let (outcome, settle) = match node {
        Ok(agent) => splice::splice_streams(user_stream, agent, ("user", "node")).await,
        Err(tcp) => splice::splice_tcp(user_stream, tcp, ("user", "node")).await,
    };
    session_end(&ctx, &request, &user, &client_addr, via, started, &outcome);
    drop(active);
    settle.wait().await;
}

/// Authorizes a request for a node of trusted leaf cluster `request.cluster` (the cluster
/// only: the leaf decides about the node) and opens a stream through the leaf's tunnel.
async fn connect_leaf(
    ctx: &Context,
    request: &Open,
    user: &PeerIdentity,
    client_addr: &str,
    credential: Bytes,
) -> Result<Target, (ErrorCode, String)> {
    let (leaf, node) = (&request.cluster, &request.node);
    ctx.policy
        .check_cluster(user, leaf)
        .map_err(|denied| (ErrorCode::ACCESS_DENIED, denied.0))?;
    let tunnel = match ctx.directory.cluster_route(leaf, node) {
        ClusterRoute::Tunnel(tunnel) => tunnel,
        ClusterRoute::OtherCore(_) => {
            return Err((
                ErrorCode::CONNECT_FAILED,
                format!(
                    "node {node}.{leaf} is served by another core of this proxy than this                      connection's first node; open one connection per node (remoteler does)"
                ),
            ));
        }
        ClusterRoute::NodeOffline => {
            return Err((
                ErrorCode::NODE_OFFLINE,
                format!("cluster {leaf} reports node {node} offline"),
            ));
        }
        ClusterRoute::NodeUnknown => {
            return Err((
                ErrorCode::NODE_UNKNOWN,
                format!(
                    "cluster {leaf} has no node named {node}; `remoteler ls --cluster {leaf}`                      lists them"
                ),
            ));
        }
        ClusterRoute::ClusterOffline(since) => {
            let when = since
                .map(|s| format!(" (its tunnel went down at {})", util::rfc3339(s)))
                .unwrap_or_default();
            return Err((
                ErrorCode::CLUSTER_UNKNOWN,
                format!(
                    "trusted cluster {leaf} is not connected to cluster {}{when}; it is offline, \
                     no longer trusts this cluster, or was never joined; `remoteler clusters` \
                     lists the connected ones",
                    ctx.cluster
                ),
            ));
        }
    };
    let slot = stream_slot(
        ctx,
        user,
        &format!("cluster:{leaf}"),
        &format!("cluster {leaf}"),
    )?;
    let open = Open {
        session_id: request.session_id,
        cluster: leaf.clone(),
        node: node.clone(),
        service: request.service.clone(),
        user: user.name.clone(),
        login: request.login.clone(),
        client_addr: client_addr.to_owned(),
        credential,
    };
    open_through(&tunnel, open, &format!("cluster {leaf}"))
        .await
        .map(|stream| Target::Leaf(stream, slot))
}

/// One of `user`'s stream slots through the tunnel to `target` (see
/// [`crate::directory::CoreDirectory::take_stream_slot`]), or the refusal naming the limit.
fn stream_slot(
    ctx: &Context,
    user: &PeerIdentity,
    target: &str,
    what: &str,
) -> Result<StreamSlot, (ErrorCode, String)> {
    let max = ctx.config.limits.max_streams_per_user_per_node;
    let owner = format!("{}@{}", user.name, user.cluster);
    ctx.directory
        .take_stream_slot(&owner, target, max)
        .ok_or_else(|| {
            (
                ErrorCode::LIMIT_EXCEEDED,
                format!(
                    "user {} already holds {max} streams to {what}, its share of the tunnel \
                     (`limits.max_streams_per_user_per_node`); close some sessions and retry",
                    user.name
                ),
            )
        })
}

/// Opens a stream through `tunnel` to `what` ("node X", "cluster X"), or says why not.
async fn open_through(
    tunnel: &tunnel::mux::Tunnel,
    open: Open,
    what: &str,
) -> Result<tunnel::mux::MuxStream, (ErrorCode, String)> {
    match monoio::time::timeout(CONNECT_TIMEOUT, tunnel.open(open)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(StreamError::Refused { code, reason })) => {
            Err((code, format!("{what} refused: {reason}")))
        }
        Ok(Err(e)) => Err((
            ErrorCode::CONNECT_FAILED,
            format!("cannot open a stream to {what} through its tunnel: {e}"),
        )),
        Err(_) => Err((
            ErrorCode::CONNECT_FAILED,
            format!(
                "{what} did not answer within {}s",
                CONNECT_TIMEOUT.as_secs()
            ),
        )),
    }
}

/// Authorizes the request and connects to its node, or says why not (code and reason for
/// the user, who sees them as the session's error).
async fn connect_target(
    ctx: &Context,
    request: &Open,
    user: &PeerIdentity,
    client_addr: &str,
    credential: Bytes,
) -> Result<Target, (ErrorCode, String)> {
    let node = &request.node;
    if ctx.draining.get() {
        return Err((
            ErrorCode::GOING_AWAY,
            "the proxy is shutting down; retry in a moment".into(),
        ));
    }
    // Before any route: on the root for a leaf's node too (the leaf checks again, with the
    // login against its roles).
    ctx.policy
        .check_open_names_login(user, node, &request.service, &request.login)
        .map_err(|denied| (ErrorCode::ACCESS_DENIED, denied.0))?;
    if !request.cluster.is_empty() && request.cluster != ctx.cluster {
        if user.cluster != ctx.cluster {
            // A root's user on a leaf: trust is not transitive.
            return Err((
                ErrorCode::CLUSTER_UNKNOWN,
                format!(
                    "cluster {} does not pass sessions of cluster {}'s users on to other clusters",
                    ctx.cluster, user.cluster
                ),
            ));
        }
        return connect_leaf(ctx, request, user, client_addr, credential).await;
    }
    let route = ctx.directory.route(node);
    if let Some(labels) = route.labels() {
        ctx.policy
            .check(user, node, labels, &request.login)
            .map_err(|denied| (ErrorCode::ACCESS_DENIED, denied.0))?;
    }
    match route {
        Route::Tunnel(entry) => {
            let slot = stream_slot(ctx, user, node, &format!("node {node}"))?;
            let open = Open {
                session_id: request.session_id,
                cluster: String::new(),
                node: node.clone(),
                service: request.service.clone(),
                user: user.name.clone(),
                login: request.login.clone(),
                client_addr: client_addr.to_owned(),
                credential: Bytes::new(),
            };
            open_through(&entry.tunnel, open, &format!("node {node}"))
                .await
                .map(|stream| Target::Tunnel(stream, slot))
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
    client_addr: &str,
    via: &str,
    dialled: Option<SocketAddr>,
) -> Instant {
    let session_id = util::to_hex(&request.session_id);
    let address = dialled.map(|a| a.to_string());
    tracing::info!(
        %session_id, user = %user.name, user_cluster = %user.cluster, node = %request.node,
        login = %request.login, %via, address = address.as_deref().unwrap_or("-"),
        %client_addr, "session start"
    );
    ctx.audit.record(
        "session.start",
        serde_json::json!({
            "session_id": session_id, "user": user.name, "user_cluster": user.cluster,
            "roles": user.roles, "node": request.node, "login": request.login,
            "service": request.service, "via": via, "address": address,
            "client_addr": client_addr,
        }),
    );
    Instant::now()
}

fn session_end(
    ctx: &Context,
    request: &Open,
    user: &PeerIdentity,
    client_addr: &str,
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
        %session_id, user = %user.name, node = %request.node, %via, %client_addr,
        bytes_from_user = outcome.forward, bytes_to_user = outcome.backward,
        duration_ms = duration.as_millis() as u64, %reason, "session end"
    );
    ctx.audit.record(
        "session.end",
        serde_json::json!({
            "session_id": session_id, "user": user.name, "user_cluster": user.cluster,
            "roles": user.roles, "node": request.node, "login": request.login, "via": via,
            "client_addr": client_addr, "bytes_from_user": outcome.forward, "bytes_to_user": outcome.backward,
            "duration_ms": duration.as_millis() as u64, "reason": reason,
        }),
    );
}

/// Connects to `address`, trying each resolved address in turn. Host names are resolved on a
/// helper thread: `getaddrinfo` blocks, and the core must not.
pub(super) async fn dial(address: &config::HostPort) -> std::io::Result<monoio::net::TcpStream> {
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
