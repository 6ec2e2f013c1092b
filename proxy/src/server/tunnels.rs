//! ALPN_TUNNEL: an agent's reverse tunnel.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Instant, SystemTime};

use bytes::BytesMut;
use frame::{Announce, ErrorCode, Frame, Hello};
use tunnel::identity::PeerIdentity;
use tunnel::mux::{DriveOutcome, Tunnel, drive};
use tunnel::tls::TlsConnection;

use super::resume;
use super::sessions::outcome_reason;
use super::{Context, Stats};
use crate::directory::TunnelEntry;

/// Labels and services of an announced node.
type Inventory = (Vec<(String, String)>, Vec<String>);

/// Checks an agent's inventory: exactly one node, named as its certificate says.
fn check_announce(
    ctx: &Context,
    node: &str,
    announce: Option<&Announce>,
) -> Result<Inventory, String> {
    let Some(announce) = announce else {
        return Err(format!(
            "no ANNOUNCE within {:?} (`limits.handshake_timeout`); an agent announces its node right after HELLO",
            ctx.handshake_timeout()
        ));
    };
    if !announce.cluster.is_empty() && announce.cluster != ctx.cluster {
        return Err(format!(
            "the ANNOUNCE is for cluster {:?}; an agent of cluster {:?} announces its own node only",
            announce.cluster, ctx.cluster
        ));
    }
    let [info] = announce.nodes.as_slice() else {
        return Err(format!(
            "the ANNOUNCE lists {} nodes; an agent announces exactly one, its own",
            announce.nodes.len()
        ));
    };
    if info.name != node {
        return Err(format!(
            "the ANNOUNCE names node {:?} but the certificate is for node {node:?}",
            info.name
        ));
    }
    Ok((info.labels.clone(), info.services.clone()))
}

/// Reads the peer's first frame without consuming it, within the handshake deadline: a HELLO
/// that says RESUMING names the session the peer (an agent, a leaf cluster) wants back.
/// Anything else is left for the session to judge.
pub(super) async fn peek_hello(
    ctx: &Context,
    conn: &mut TlsConnection,
    input: &mut BytesMut,
) -> Option<Hello> {
    let peek = async {
        loop {
            match frame::decode(&mut input.clone(), &frame::Limits::default()) {
                Ok(Some(Frame::Hello(hello))) => return Some(hello),
                Ok(Some(_)) | Err(_) => return None,
                Ok(None) => {}
            }
            if input.len() > frame::codec::MAX_HELLO_PAYLOAD + frame::codec::HEADER_LEN {
                return None;
            }
            match conn.read(input).await {
                Ok(n) if n > 0 => {}
                _ => return None,
            }
        }
    };
    Box::pin(monoio::time::timeout(ctx.handshake_timeout(), peek))
        .await
        .ok()
        .flatten()
}

/// Lists `node` as online through tunnel `id`; returns the entry it replaces, if any.
fn put_online(
    ctx: &Context,
    node: &str,
    id: u64,
    tunnel: &Tunnel,
    peer: SocketAddr,
    (labels, services): Inventory,
) -> Option<TunnelEntry> {
    let entry = TunnelEntry {
        id,
        tunnel: tunnel.clone(),
        peer: Some(peer),
        since: SystemTime::now(),
        labels,
        services,
    };
    ctx.directory.attach_tunnel(node, entry)
}

/// Waits for the tunnel's driver to end while answering what the agent sends besides data:
/// a changed inventory (it must keep naming the same node) and OPENs (agents open no streams
/// toward the proxy).
async fn until_transport_ends(
    ctx: &Context,
    tunnel: &Tunnel,
    node: &str,
    id: u64,
    seen: &mut u64,
    driver: &mut monoio::task::JoinHandle<DriveOutcome>,
) -> DriveOutcome {
    loop {
        if tunnel.is_ended() {
            return driver.await;
        }
        monoio::select! {
            outcome = &mut *driver => return outcome,
            version = tunnel.announce_changed(*seen) => {
                *seen = version;
                if tunnel.is_ended() {
                    continue;
                }
                let (_, announce) = tunnel.peer_announce();
                match check_announce(ctx, node, announce.as_ref()) {
                    Ok((labels, services)) => {
                        ctx.directory.update_tunnel(node, id, labels, services)
                    }
                    Err(why) => {
                        tracing::warn!(%node, reason = %why, "tunnel closed: bad ANNOUNCE");
                        tunnel.close(ErrorCode::ACCESS_DENIED, &why);
                    }
                }
            }
            incoming = tunnel.incoming() => {
                if let Some(incoming) = incoming {
                    incoming.reject(
                        ErrorCode::ACCESS_DENIED,
                        "the proxy accepts no streams from agents",
                    );
                }
            }
        }
    }
}

// This future lives as long as the tunnel, tens of thousands at once: every await that only
// happens for a moment (handshake-time timeouts, the wait of a detached tunnel) is boxed, so
// that its state is allocated only while it runs instead of sizing this future for its whole
// life (3 KiB before; `-Zprint-type-sizes` shows it).
pub(super) async fn serve_tunnel(
    ctx: Rc<Context>,
    mut conn: TlsConnection,
    peer: SocketAddr,
    identity: PeerIdentity,
) {
    let node = identity.name.clone();
    let refuse = |why: String, code: ErrorCode| {
        tracing::warn!(%peer, %node, reason = %why, "tunnel refused");
        ctx.audit.record(
            "tunnel.refused",
            serde_json::json!({ "node": node, "peer": peer.to_string(), "reason": why }),
        );
        let tunnel = Tunnel::new(ctx.new_session());
        tunnel.close(code, &why);
        tunnel
    };
    if ctx.draining.get() {
        Stats::bump(&ctx.stats.dropped_draining);
        let t = refuse("the proxy is shutting down".into(), ErrorCode::GOING_AWAY);
        let _ = Box::pin(monoio::time::timeout(
            ctx.handshake_timeout(),
            drive(&t, conn, BytesMut::new()),
        ))
        .await;
        return;
    }
    let max = ctx.config.limits.max_tunnels as usize;
    // Leaf clusters' tunnels count too: they are tunnels the proxy holds.
    if ctx.directory.held_tunnel_count() >= max {
        Stats::bump(&ctx.stats.dropped_tunnel_limit);
        let t = refuse(
            format!("the proxy holds its maximum of {max} tunnels (`limits.max_tunnels`)"),
            ErrorCode::LIMIT_EXCEEDED,
        );
        let _ = Box::pin(monoio::time::timeout(
            ctx.handshake_timeout(),
            drive(&t, conn, BytesMut::new()),
        ))
        .await;
        return;
    }

    // A reconnecting agent asks to resume its detached session: hand the connection to the
    // task that owns it, and the users' sessions through it carry on.
    let mut input = BytesMut::new();
    let hello = peek_hello(&ctx, &mut conn, &mut input).await;
    if let Some(hello) = hello.filter(|h| h.resuming) {
        let id = hello.session_id;
        let detached = || {
            let waiting = ctx.detached.borrow().get(&node).cloned();
            waiting.filter(|w| w.resumable_by(id, &node))
        };
        let attached = ctx
            .directory
            .local_tunnel(&node)
            .filter(|t| !t.is_detached() && t.peer_id() == Some(id));
        if let Some(waiting) = Box::pin(resume::take_over(detached, attached)).await {
            ctx.detached.borrow_mut().remove(&node);
            tracing::info!(%node, %peer, "agent reconnected; resuming its tunnel");
            waiting.hand_over((conn, input, peer));
            return;
        }
    }
    // A new session: a detached one of the same node will not come back.
    let replaced = ctx.detached.borrow_mut().remove(&node);
    if let Some(old) = replaced {
        let why = format!("replaced by a new session of node {node} from {peer}");
        old.replace(&why);
        old.tunnel.close(ErrorCode::GOING_AWAY, &why);
    }

    let tunnel = Tunnel::new(ctx.new_resumable_session());
    let driven = tunnel.clone();
    let driver = monoio::spawn(async move { drive(&driven, conn, input).await });

    let _ = Box::pin(monoio::time::timeout(
        ctx.handshake_timeout(),
        tunnel.announce_changed(0),
    ))
    .await;
    // The copy of the inventory is checked, not kept: this future lives as long as the
    // tunnel (the copy was about 320 bytes of strings); the directory gets what it needs.
    let (version, checked) = {
        let (version, announce) = tunnel.peer_announce();
        (version, check_announce(&ctx, &node, announce.as_ref()))
    };
    let (labels, services) = match checked {
        Ok(v) => v,
        Err(why) => {
            Stats::bump(&ctx.stats.dropped_access_denied);
            tracing::warn!(%peer, %node, reason = %why, "tunnel refused");
            ctx.audit.record(
                "tunnel.refused",
                serde_json::json!({ "node": node, "peer": peer.to_string(), "reason": why }),
            );
            tunnel.close(ErrorCode::ACCESS_DENIED, &why);
            let _ = driver.await;
            return;
        }
    };

    let id = ctx.directory.next_tunnel_id();
    let started = Instant::now();
    if let Some(old) = put_online(&ctx, &node, id, &tunnel, peer, (labels, services)) {
        tracing::info!(%node, old_peer = ?old.peer, %peer, "a new tunnel replaces the node's old one");
        old.tunnel.close(
            ErrorCode::GOING_AWAY,
            &format!("replaced by a newer tunnel for node {node} from {peer}"),
        );
    }
    let not_after_unix = crate::util::unix_secs(identity.not_after);
    ctx.node_expiries
        .borrow_mut()
        .insert((not_after_unix, id), node.as_str().into());
    Stats::bump(&ctx.stats.tunnels_connected);
    tracing::info!(%node, %peer, tunnel_id = id, serial = %identity.serial, "tunnel connected");
    ctx.audit.record(
        "tunnel.connect",
        serde_json::json!({ "node": node, "peer": peer.to_string(), "tunnel_id": id }),
    );

    // The connected tunnel gets a task of its own, sized for what it keeps for the tunnel's
    // life: this one (sized for the handshake, the resume lookup and the checks, and holding
    // the connection and the certificate's identity as arguments) ends here.
    drop(monoio::spawn(serve_connected(Connected {
        ctx,
        tunnel,
        node,
        id,
        peer,
        driver,
        seen: version,
        started,
        not_after_unix,
    })));
}

/// What a connected agent tunnel keeps for its life.
struct Connected {
    ctx: Rc<Context>,
    tunnel: Tunnel,
    node: String,
    /// The directory's id of this tunnel.
    id: u64,
    /// The agent's address (of its latest connection).
    peer: SocketAddr,
    driver: monoio::task::JoinHandle<DriveOutcome>,
    /// The last inventory version seen.
    seen: u64,
    started: Instant,
    /// The end of the node certificate's validity, Unix seconds: its key in
    /// `Context::node_expiries`.
    not_after_unix: u64,
}

/// Serves a connected tunnel until it ends: inventory changes, detaching when the connection
/// is lost, resuming when the agent comes back. A plain `fn` returning the future, so that the
/// future holds `c` once (an `async fn` keeps a second copy of its arguments).
#[allow(clippy::manual_async_fn)] // on purpose, see above
fn serve_connected(mut c: Connected) -> impl std::future::Future<Output = ()> {
    async move {
        let ctx = &c.ctx;
        let (tunnel, node, id) = (&c.tunnel, c.node.as_str(), c.id);
        // Set when the tunnel ends while detached: whether a new session replaced it. The
        // directory forgets a detached tunnel, so asking it at the end would say "replaced".
        let mut replaced_while_detached = None;
        let reason = loop {
            // No task of its own for the inventory watch and the refusal of OPENs: a tunnel
            // costs one task (this one) besides its driver.
            let outcome = Box::pin(until_transport_ends(
                ctx,
                tunnel,
                node,
                id,
                &mut c.seen,
                &mut c.driver,
            ))
            .await;
            let reason = outcome_reason(&outcome);
            if !tunnel.is_detached() || ctx.draining.get() {
                break reason;
            }
            // The connection is gone but the session waits for the agent: the node is offline
            // (no new sessions), the sessions through it pause.
            ctx.directory.detach_tunnel(node, id);
            let grace = ctx.config.resume.grace;
            tracing::info!(
                %node, peer = %c.peer, tunnel_id = id, %reason, grace_secs = grace.as_secs(),
                "tunnel connection lost; waiting for the agent to resume"
            );
            ctx.audit.record(
                "tunnel.detached",
                serde_json::json!({
                    "node": node, "peer": c.peer.to_string(), "tunnel_id": id, "reason": reason,
                }),
            );
            let next = Box::pin(resume::await_resume(
                &ctx.detached,
                node.to_owned(),
                tunnel,
                node,
                &reason,
                grace,
            ))
            .await;
            let (conn, input, new_peer) = match next {
                Ok(transport) => transport,
                Err((why, replaced)) => {
                    replaced_while_detached = Some(replaced);
                    break why;
                }
            };
            if let Err(e) = tunnel.reattach() {
                break format!("{reason}; cannot resume: {e}");
            }
            c.peer = new_peer;
            let inventory =
                check_announce(ctx, node, tunnel.peer_announce().1.as_ref()).unwrap_or_default();
            if let Some(old) = put_online(ctx, node, id, tunnel, c.peer, inventory) {
                if old.id != id {
                    old.tunnel
                        .close(ErrorCode::GOING_AWAY, "replaced by a resumed tunnel");
                }
            }
            Stats::bump(&ctx.stats.tunnels_resumed);
            tracing::info!(%node, peer = %c.peer, tunnel_id = id, "tunnel resumed");
            ctx.audit.record(
                "tunnel.resumed",
                serde_json::json!({ "node": node, "peer": c.peer.to_string(), "tunnel_id": id }),
            );
            let driven = tunnel.clone();
            c.driver = monoio::spawn(async move { drive(&driven, conn, input).await });
        };
        if !tunnel.is_ended() {
            tunnel.close(ErrorCode::GOING_AWAY, "transport lost");
        }
        ctx.node_expiries
            .borrow_mut()
            .remove(&(c.not_after_unix, id));
        let was_current = ctx.directory.detach_tunnel(node, id);
        let replaced = replaced_while_detached.unwrap_or(!was_current);
        Stats::bump(&ctx.stats.tunnels_disconnected);
        let duration = c.started.elapsed();
        tracing::info!(
            %node, peer = %c.peer, tunnel_id = id, %reason, replaced,
            duration_secs = duration.as_secs(), "tunnel disconnected"
        );
        ctx.audit.record(
            "tunnel.disconnect",
            serde_json::json!({
                "node": node, "peer": c.peer.to_string(), "tunnel_id": id, "reason": reason,
                "replaced": replaced, "duration_ms": duration.as_millis() as u64,
            }),
        );
    }
}

/// Ends this core's agent tunnels whose node certificate expires, when it does: a tunnel may
/// not outlive the certificate it was opened with (the agent joins again for a new one). One
/// timer per core over `Context::node_expiries`, not one per tunnel (a timer is larger than an
/// idle tunnel's whole task).
pub(super) async fn close_expired_tunnels(ctx: Rc<Context>) {
    /// Looks again at least this often: a tunnel that connected meanwhile may expire first.
    const RECHECK: std::time::Duration = std::time::Duration::from_secs(10);
    loop {
        let now = crate::util::unix_now();
        let next = ctx.node_expiries.borrow().keys().next().map(|&(at, _)| at);
        let wait = match next {
            Some(at) if at < now => std::time::Duration::ZERO,
            Some(at) => std::time::Duration::from_secs(at - now + 1).min(RECHECK),
            None => RECHECK,
        };
        monoio::select! {
            _ = monoio::time::sleep(wait) => {}
            _ = ctx.shutdown.wait() => break,
        }
        let now = crate::util::unix_now();
        let due: Vec<((u64, u64), Box<str>)> = {
            let mut expiries = ctx.node_expiries.borrow_mut();
            let later = expiries.split_off(&(now, 0));
            std::mem::replace(&mut *expiries, later)
                .into_iter()
                .collect()
        };
        for ((at, id), node) in due {
            let Some(tunnel) = ctx.directory.local_tunnel_by_id(id) else {
                continue;
            };
            let why = format!(
                "the certificate of node {node} expired at {}; the agent must join again with \
                 a new token",
                crate::util::rfc3339_unix(at)
            );
            tracing::info!(%node, tunnel_id = id, reason = %why, "closing a tunnel: its certificate expired");
            tunnel.close(ErrorCode::ACCESS_DENIED, &why);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what `f` returns, without calling it.
    fn returned_size<A, R>(_: fn(A) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    fn returned_size4<A, B, C, D, R>(_: fn(A, B, C, D) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    #[test]
    fn a_connected_tunnel_task_stays_small() {
        let connected = returned_size(serve_connected);
        let setup = returned_size4(serve_tunnel);
        eprintln!("serve_connected future: {connected} B, serve_tunnel (setup): {setup} B");
        // Every idle tunnel holds one: a budget, so that growth is a decision.
        assert!(
            connected <= 512,
            "serve_connected's future is {connected} bytes"
        );
    }
}
