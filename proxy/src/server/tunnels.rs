//! ALPN_TUNNEL: an agent's reverse tunnel.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Instant, SystemTime};

use bytes::BytesMut;
use frame::{Announce, ErrorCode};
use tunnel::identity::PeerIdentity;
use tunnel::mux::{DriveOutcome, Tunnel, drive};
use tunnel::tls::TlsConnection;

use super::Context;
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

fn outcome_reason(outcome: &DriveOutcome) -> String {
    match outcome {
        DriveOutcome::Ended(e) => e.to_string(),
        DriveOutcome::TransportLost(Some(e)) => format!("transport lost: {e}"),
        DriveOutcome::TransportLost(None) => {
            "transport lost: connection closed or keepalive timed out".into()
        }
    }
}

pub(super) async fn serve_tunnel(
    ctx: Rc<Context>,
    conn: TlsConnection,
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
        let t = refuse("the proxy is shutting down".into(), ErrorCode::GOING_AWAY);
        let _ =
            monoio::time::timeout(ctx.handshake_timeout(), drive(&t, conn, BytesMut::new())).await;
        return;
    }
    let max = ctx.config.limits.max_tunnels as usize;
    if ctx.directory.tunnel_count() >= max {
        let t = refuse(
            format!("the proxy holds its maximum of {max} tunnels (`limits.max_tunnels`)"),
            ErrorCode::LIMIT_EXCEEDED,
        );
        let _ =
            monoio::time::timeout(ctx.handshake_timeout(), drive(&t, conn, BytesMut::new())).await;
        return;
    }

    let tunnel = Tunnel::new(ctx.new_session());
    let driven = tunnel.clone();
    let driver = monoio::spawn(async move { drive(&driven, conn, BytesMut::new()).await });

    let _ = monoio::time::timeout(ctx.handshake_timeout(), tunnel.announce_changed(0)).await;
    let (version, announce) = tunnel.peer_announce();
    let (labels, services) = match check_announce(&ctx, &node, announce.as_ref()) {
        Ok(v) => v,
        Err(why) => {
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
    let entry = TunnelEntry {
        id,
        tunnel: tunnel.clone(),
        peer: Some(peer),
        since: SystemTime::now(),
        labels,
        services,
    };
    if let Some(old) = ctx.directory.attach_tunnel(&node, entry) {
        tracing::info!(%node, old_peer = ?old.peer, %peer, "a new tunnel replaces the node's old one");
        old.tunnel.close(
            ErrorCode::GOING_AWAY,
            &format!("replaced by a newer tunnel for node {node} from {peer}"),
        );
    }
    tracing::info!(%node, %peer, tunnel_id = id, serial = %identity.serial, "tunnel connected");
    ctx.audit.record(
        "tunnel.connect",
        serde_json::json!({ "node": node, "peer": peer.to_string(), "tunnel_id": id }),
    );

    // The agent's inventory may change; it must keep naming the same node.
    let watcher = {
        let ctx = ctx.clone();
        let tunnel = tunnel.clone();
        let node = node.clone();
        monoio::spawn(async move {
            let mut seen = version;
            loop {
                seen = tunnel.announce_changed(seen).await;
                if tunnel.is_ended() {
                    break;
                }
                let (_, announce) = tunnel.peer_announce();
                match check_announce(&ctx, &node, announce.as_ref()) {
                    Ok((labels, services)) => {
                        ctx.directory.update_tunnel(&node, id, labels, services)
                    }
                    Err(why) => {
                        tracing::warn!(%node, reason = %why, "tunnel closed: bad ANNOUNCE");
                        tunnel.close(ErrorCode::ACCESS_DENIED, &why);
                        break;
                    }
                }
            }
        })
    };
    // Agents open no streams toward the proxy.
    let rejecter = {
        let tunnel = tunnel.clone();
        monoio::spawn(async move {
            while let Some(incoming) = tunnel.incoming().await {
                incoming.reject(
                    ErrorCode::ACCESS_DENIED,
                    "the proxy accepts no streams from agents",
                );
            }
        })
    };

    let outcome = driver.await;
    let reason = outcome_reason(&outcome);
    if !tunnel.is_ended() {
        tunnel.close(ErrorCode::GOING_AWAY, "transport lost");
    }
    watcher.await;
    rejecter.await;
    let was_current = ctx.directory.detach_tunnel(&node, id);
    let duration = started.elapsed();
    tracing::info!(
        %node, %peer, tunnel_id = id, %reason, replaced = !was_current,
        duration_secs = duration.as_secs(), "tunnel disconnected"
    );
    ctx.audit.record(
        "tunnel.disconnect",
        serde_json::json!({
            "node": node, "peer": peer.to_string(), "tunnel_id": id, "reason": reason,
            "replaced": !was_current, "duration_ms": duration.as_millis() as u64,
        }),
    );
}
