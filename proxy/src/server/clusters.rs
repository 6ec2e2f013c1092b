//! Trusted clusters, both sides.
//!
//! **Root.** A leaf's proxy joins once over `ALPN_CLUSTER_JOIN` with a `trusted-cluster`
//! token ([`serve_cluster_join`]): the root records the leaf (state file) and signs a cluster
//! certificate for the leaf proxy's key with the root CA. From then on the leaf holds cluster
//! tunnels (`ALPN_TUNNEL` with that certificate, [`serve_cluster_tunnel`]), one per core of the
//! leaf proxy, each announcing the leaf nodes that core owns. The directory records which root
//! core holds the tunnel that announced which leaf node; a user connection whose first OPEN
//! names the leaf moves to that core (see `sessions`), so a session's bytes stay on one thread.
//!
//! **Leaf.** Every core runs a cluster agent per enabled `[[trusted_clusters]]` entry
//! ([`run_cluster_agent`]): it joins if no certificate is stored yet (core 0 only; the others
//! wait for the files), then keeps an mTLS tunnel to the root with the agent's reconnect
//! backoff, keepalive and GOAWAY handling, and re-announces its inventory when it changes. An
//! OPEN from the root is served on that core ([`handle_cluster_open`]): the user's certificate
//! it carries is verified against the stored root CA, the roles are mapped with `role_map`,
//! and the session then goes through the same authorization, audit and dial as a local user's.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use config::TrustedCluster;
use frame::{Announce, ErrorCode, NodeInfo, Role, Session};
use rustls::pki_types::{CertificateDer, ServerName};
use tunnel::control::{
    ALPN_CLUSTER_JOIN, ALPN_TUNNEL, ClusterJoinRequest, JoinResponse, Reply, read_reply, write_line,
};
use tunnel::identity::{FileRole, IdentityKind, PeerIdentity, PrivateKey, TlsIdentity, Validity};
use tunnel::mux::{Incoming, Tunnel, drive};
use tunnel::tls::TlsConnection;

use super::Handoff;
use super::control::{FAILURE_DELAY, error, read_request, reply};
use super::resume;
use super::sessions::{hello_in, outcome_reason};
use super::tunnels::peek_hello;
use super::{Context, Stats};
use crate::state::JoinRefused;
use crate::util;

/// Lifetime of a cluster certificate issued at a cluster join.
pub const CLUSTER_CERT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// How often a leaf core compares its inventory with what it last announced.
const INVENTORY_POLL: Duration = Duration::from_secs(2);
/// How long a leaf waits for the root's TCP connect.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnect backoff of a cluster tunnel: first delay, and the cap (doubling in between,
/// each delay jittered down to half so a restarted root is not hit by every leaf at once).
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A tunnel up this long resets the backoff.
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// How often the root checks that a connected leaf is still trusted (state file).
const TRUST_RECHECK: Duration = Duration::from_secs(5);
/// Time a closing tunnel gets to send its GOAWAY.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

// ---- root: join -------------------------------------------------------------------------------

/// ALPN_CLUSTER_JOIN: a `trusted-cluster` token for a cluster certificate.
pub(super) async fn serve_cluster_join(
    ctx: Rc<Context>,
    conn: TlsConnection,
    peer: SocketAddr,
    slot: super::HandshakeSlot,
) {
    let (mut reader, mut writer) = conn.split();
    let mut buf = BytesMut::new();
    let request: ClusterJoinRequest = match read_request(&ctx, &mut reader, &mut buf, slot).await {
        Ok(r) => r,
        Err(body) => {
            reply(&mut writer, &Reply::<JoinResponse>::Error(body)).await;
            return;
        }
    };
    let leaf = request.cluster.clone();
    let attempt = super::control::begin_attempt(&ctx, peer, "joins");
    let joined = if let Err(body) = &attempt {
        Err(body.clone())
    } else {
        let (store, ca, cluster) = (ctx.store.clone(), ctx.ca.clone(), ctx.cluster.clone());
        crate::blocking::run(move || cluster_join(&store, &ca, &cluster, &request))
            .await
            .unwrap_or_else(|| {
                Err(error(
                    "internal",
                    "the join could not be processed (helper thread failed); try again",
                ))
            })
    };
    match joined {
        Ok((response, token_id)) => {
            tracing::info!(%peer, cluster = %leaf, token = %token_id, "trusted cluster joined");
            ctx.audit.record(
                "cluster.join",
                serde_json::json!({
                    "success": true, "cluster": leaf, "peer": peer.to_string(), "token_id": token_id,
                }),
            );
            reply(&mut writer, &Reply::Ok(response)).await;
        }
        Err(body) => {
            let blocked = super::control::count_failure(&ctx, peer, attempt, &body);
            tracing::info!(%peer, cluster = %leaf, code = %body.code, "trusted cluster join refused");
            ctx.audit.record(
                "cluster.join",
                serde_json::json!({
                    "success": false, "cluster": leaf, "peer": peer.to_string(),
                    "code": body.code, "reason": body.message, "source_blocked": blocked,
                }),
            );
            monoio::time::sleep(FAILURE_DELAY).await;
            reply(&mut writer, &Reply::<JoinResponse>::Error(body)).await;
        }
    }
}

/// The checks of a cluster join request that need no state: the leaf's name (which must
/// differ from this cluster's, `cluster`), its CA certificates and its public key.
pub fn check_cluster_join(
    cluster: &str,
    request: &ClusterJoinRequest,
) -> Result<(Vec<CertificateDer<'static>>, tunnel::identity::PublicKey), tunnel::control::ErrorBody>
{
    let leaf = request.cluster.as_str();
    config::ClusterName::new(leaf)
        .map_err(|e| error("bad_cluster_name", format!("cluster: {e}")))?;
    if leaf == cluster {
        return Err(error(
            "bad_cluster_name",
            format!(
                "the leaf cluster has the root's own name {cluster:?}; cluster names must differ"
            ),
        ));
    }
    // The leaf's CA: exactly one CA certificate of the leaf cluster itself. The root trusts it
    // for nothing, but it is what owns the leaf's name here (see `State::admit_leaf`).
    let leaf_ca = certs_from_pem(&request.ca_pem)
        .ok()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| error("bad_request", "ca_pem holds no PEM certificate"))?;
    if leaf_ca.len() != 1 {
        return Err(error(
            "bad_request",
            format!(
                "ca_pem holds {} certificates; send the leaf cluster's one CA certificate",
                leaf_ca.len()
            ),
        ));
    }
    let ca_cluster = tunnel::identity::ca_certificate_cluster(&leaf_ca[0])
        .map_err(|e| error("bad_request", format!("ca_pem: {e}")))?;
    if ca_cluster != leaf {
        return Err(error(
            "bad_request",
            format!("ca_pem is the CA of cluster {ca_cluster:?}, not of the joining leaf {leaf:?}"),
        ));
    }
    let der = tunnel::control::from_hex(&request.public_key).ok_or_else(|| {
        error(
            "bad_public_key",
            "public_key is not hex; send the SubjectPublicKeyInfo DER as lowercase hex",
        )
    })?;
    let key = tunnel::identity::PublicKey::from_spki_der(&der)
        .map_err(|e| error("bad_public_key", e.to_string()))?;
    check_ca_proof(cluster, leaf, &leaf_ca, &der, &request.ca_proof_pem)?;
    Ok((leaf_ca, key))
}

/// Lifetime of the proof a leaf sends with its cluster join ([`check_ca_proof`]).
const CA_PROOF_TTL: Duration = Duration::from_secs(600);

/// Checks that the joining leaf holds its CA's key: `proof_pem` must be a `cluster`
/// certificate for `root`, issued by `leaf_ca` (signature and validity checked now) on the
/// join's public key (`spki`). A CA certificate alone proves nothing: it is public.
fn check_ca_proof(
    root: &str,
    leaf: &str,
    leaf_ca: &[CertificateDer<'static>],
    spki: &[u8],
    proof_pem: &str,
) -> Result<(), tunnel::control::ErrorBody> {
    let bad = |why: String| {
        error(
            "bad_ca_proof",
            format!(
                "ca_proof_pem: {why}; a leaf proxy proves it holds its CA's key with a \
                 certificate its CA issues for the join's key (leaf proxies older than this \
                 root do not: upgrade the leaf)"
            ),
        )
    };
    let proof = certs_from_pem(proof_pem)
        .ok()
        .filter(|c| c.len() == 1)
        .ok_or_else(|| bad("expected one PEM certificate".into()))?;
    let identity = tunnel::identity::verify_client_chain(leaf_ca, &proof, SystemTime::now())
        .map_err(|e| bad(format!("not issued by the leaf's CA: {e}")))?;
    if identity.kind != IdentityKind::Cluster || identity.cluster != leaf || identity.name != root {
        return Err(bad(format!(
            "it is a {} certificate for {:?} of cluster {:?}; expected a cluster certificate \
             for {root:?} of cluster {leaf:?}",
            identity.kind, identity.name, identity.cluster
        )));
    }
    let same_key = tunnel::identity::CaPin::of_certificate(&proof[0])
        .is_ok_and(|pin| pin == tunnel::identity::CaPin::of_spki(spki));
    if !same_key {
        return Err(bad("it is not for the join's public_key".into()));
    }
    Ok(())
}

fn cluster_join(
    store: &crate::state::StateStore,
    ca: &tunnel::identity::ClusterCa,
    cluster: &str,
    request: &ClusterJoinRequest,
) -> Result<(JoinResponse, String), tunnel::control::ErrorBody> {
    let leaf = request.cluster.as_str();
    let (leaf_ca, key) = check_cluster_join(cluster, request)?;
    let ssh_host_ca = request
        .ssh_host_ca
        .as_deref()
        .map(check_ssh_host_ca)
        .transpose()?;
    let internal = |e: String| {
        tracing::error!(error = %e, "cannot complete a cluster join");
        error("internal", format!("cannot complete the join: {e}"))
    };
    let ca_pem = tunnel::identity::certificates_to_pem(&leaf_ca);
    // Written only when the join is admitted: a refused one leaves the file alone.
    let token_id = store
        .update(|state| -> Result<String, StateOrBody> {
            let used = state
                .admit_leaf(
                    &request.token,
                    leaf,
                    &ca_pem,
                    ssh_host_ca.clone(),
                    util::unix_now(),
                )
                .map_err(|e| {
                    let text = match &e {
                        JoinRefused::Token(_) => e
                            .to_string()
                            .replace("--kind node", "--kind trusted-cluster"),
                        _ => e.to_string(),
                    };
                    error(e.code(), text)
                })?;
            Ok(used.id)
        })
        .map_err(|e: StateOrBody| e.0)?;
    let validity = Validity::for_ttl(SystemTime::now(), CLUSTER_CERT_TTL)
        .map_err(|e| internal(e.to_string()))?;
    let cert = ca
        .issue_cluster(leaf, &key, validity)
        .map_err(|e| internal(e.to_string()))?;
    Ok((
        JoinResponse {
            cluster: cluster.to_owned(),
            certificate_pem: tunnel::identity::certificates_to_pem(&ca.chain(cert)),
            ca_pem: ca.certificate_pem(),
        },
        token_id,
    ))
}

/// The error of a state update during a cluster join: already a wire error.
struct StateOrBody(tunnel::control::ErrorBody);

impl From<tunnel::control::ErrorBody> for StateOrBody {
    fn from(e: tunnel::control::ErrorBody) -> Self {
        StateOrBody(e)
    }
}

impl From<crate::error::ProxyError> for StateOrBody {
    fn from(e: crate::error::ProxyError) -> Self {
        tracing::error!(error = %e, "cannot read or update the state file during a cluster join");
        StateOrBody(error(
            "internal",
            "the proxy cannot read its state; the operator should check its log",
        ))
    }
}

/// A leaf's SSH host CA line, as it goes into users' known_hosts: one OpenSSH public key,
/// re-encoded (so no second line or pattern can ride along).
pub fn check_ssh_host_ca(line: &str) -> Result<String, tunnel::control::ErrorBody> {
    // The comment is free text to the parser, newlines included.
    if line.trim().chars().any(char::is_control) {
        return Err(error(
            "bad_request",
            "ssh_host_ca must be a single line without control characters",
        ));
    }
    ssh_key::PublicKey::from_openssh(line.trim())
        .and_then(|key| key.to_openssh())
        .map_err(|e| {
            error(
                "bad_request",
                format!("ssh_host_ca is not an OpenSSH public key line: {e}"),
            )
        })
}

fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())
}

// ---- root: cluster tunnels ----------------------------------------------------------------------

/// Whether `leaf` joined this cluster (and was not removed since). The state file is read on
/// a helper thread: another core or the CLI may hold its lock.
async fn is_trusted_leaf(ctx: &Context, leaf: &str) -> Result<bool, String> {
    let (store, leaf) = (ctx.store.clone(), leaf.to_owned());
    let state = crate::blocking::run(move || store.read())
        .await
        .ok_or_else(|| "the state file could not be read (helper thread failed)".to_owned())?
        .map_err(|e| {
            tracing::error!(error = %e, "cannot read the state file for a cluster tunnel");
            "the proxy cannot read its state".to_owned()
        })?;
    Ok(state.trusted_leaves.iter().any(|l| l.name == leaf))
}

/// What one leaf may hold in this (root) proxy's directory.
fn leaf_caps(ctx: &Context) -> crate::directory::LeafCaps {
    crate::directory::LeafCaps {
        tunnels: ctx.config.limits.max_tunnels_per_cluster as usize,
        nodes: ctx.config.limits.max_announced_nodes as usize,
    }
}

/// Checks a leaf's ANNOUNCE: its own cluster's nodes.
/// Takes the decoded copy: a leaf's inventory can be thousands of nodes, and a second copy of
/// it would only be garbage.
fn check_cluster_announce(leaf: &str, announce: Option<Announce>) -> Result<Vec<NodeInfo>, String> {
    let Some(announce) = announce else {
        return Err(
            "no ANNOUNCE in time; a leaf cluster announces its nodes right after HELLO".into(),
        );
    };
    if announce.cluster != leaf {
        return Err(format!(
            "the ANNOUNCE is for cluster {:?} but the certificate is for leaf cluster {leaf:?}",
            announce.cluster
        ));
    }
    Ok(announce.nodes)
}

/// ALPN_TUNNEL with a cluster certificate: a leaf's reverse tunnel, served on the core it
/// landed on, unless it resumes a session another core holds: then it moves there.
pub(super) async fn accept_cluster_tunnel(
    ctx: Rc<Context>,
    mut conn: TlsConnection,
    peer: SocketAddr,
    identity: PeerIdentity,
) {
    let mut input = BytesMut::new();
    let hello = peek_hello(&ctx, &mut conn, &mut input).await;
    let home = hello
        .filter(|h| h.resuming)
        .and_then(|h| {
            let key = resume::SessionKey::new(&identity, h.session_id);
            ctx.session_homes.core_of(&key)
        })
        .filter(|&core| core != ctx.core);
    let conn = match home {
        Some(core) => match ctx.move_to(core, conn, |conn| Handoff::ClusterTunnel {
            conn,
            input: input.clone(),
            peer,
            identity: identity.clone(),
        }) {
            Ok(()) => return,
            Err(conn) => conn,
        },
        None => conn,
    };
    serve_cluster_tunnel(ctx, conn, input, peer, identity).await
}

/// Serves a leaf's tunnel on this core: a new session, or the resumption of one this core
/// holds (`input` holds the leaf's HELLO).
pub(super) async fn serve_cluster_tunnel(
    ctx: Rc<Context>,
    conn: TlsConnection,
    input: BytesMut,
    peer: SocketAddr,
    identity: PeerIdentity,
) {
    let leaf = identity.name.clone();
    let hello = hello_in(&input);
    if let Some(id) = hello.as_ref().filter(|h| h.resuming).map(|h| h.session_id) {
        let detached = || {
            let waiting = ctx.detached_clusters.borrow().get(&id).cloned();
            waiting.filter(|w| w.resumable_by(id, &leaf))
        };
        let attached = ctx
            .cluster_tunnels
            .borrow()
            .get(&id)
            .filter(|(name, t)| *name == leaf && !t.is_detached())
            .map(|(_, t)| t.clone());
        if let Some(waiting) = Box::pin(resume::take_over(detached, attached)).await {
            ctx.detached_clusters.borrow_mut().remove(&id);
            tracing::info!(cluster = %leaf, %peer, "leaf cluster reconnected; resuming its tunnel");
            waiting.hand_over((conn, input, peer));
            return;
        }
    }
    let leaf_session = hello.as_ref().map(|h| h.session_id);
    let home_key = hello.map(|h| resume::SessionKey::new(&identity, h.session_id));
    let tunnel = Tunnel::new(ctx.new_resumable_session());
    let limits = &ctx.config.limits;
    let refusal = if ctx.draining.get() {
        Stats::bump(&ctx.stats.dropped_draining);
        Some((
            ErrorCode::GOING_AWAY,
            "the proxy is shutting down".to_owned(),
        ))
    } else if ctx.directory.held_tunnel_count() >= limits.max_tunnels as usize {
        Stats::bump(&ctx.stats.dropped_tunnel_limit);
        Some((
            ErrorCode::LIMIT_EXCEEDED,
            format!(
                "the proxy holds its maximum of {} tunnels (`limits.max_tunnels`)",
                limits.max_tunnels
            ),
        ))
    } else if ctx.directory.cluster_tunnel_count(&leaf) >= limits.max_tunnels_per_cluster as usize {
        Stats::bump(&ctx.stats.dropped_tunnel_limit);
        Some((
            ErrorCode::LIMIT_EXCEEDED,
            format!(
                "leaf cluster {leaf} already holds {} tunnels (`limits.max_tunnels_per_cluster` \
                 of the root; a leaf opens one per worker of its own)",
                limits.max_tunnels_per_cluster
            ),
        ))
    } else {
        match is_trusted_leaf(&ctx, &leaf).await {
            Ok(true) => None,
            Ok(false) => Some((
                ErrorCode::ACCESS_DENIED,
                format!(
                    "cluster {leaf:?} is not a trusted leaf of cluster {:?} (it never joined, or \
                     was removed); join again with a `remoteler-proxy tokens add --kind \
                     trusted-cluster` token",
                    ctx.cluster
                ),
            )),
            Err(why) => Some((ErrorCode::INTERNAL, why)),
        }
    };
    if let Some((code, why)) = refusal {
        Stats::bump(&ctx.stats.dropped_access_denied);
        tracing::warn!(%peer, cluster = %leaf, reason = %why, "cluster tunnel refused");
        ctx.audit.record(
            "cluster.refused",
            serde_json::json!({ "cluster": leaf, "peer": peer.to_string(), "reason": why }),
        );
        tunnel.close(code, &why);
        let _ = monoio::time::timeout(ctx.handshake_timeout(), drive(&tunnel, conn, input)).await;
        return;
    }
    let driven = tunnel.clone();
    let driver = monoio::spawn(async move { drive(&driven, conn, input).await });
    let _ = monoio::time::timeout(ctx.handshake_timeout(), tunnel.announce_changed(0)).await;
    let (version, announce) = tunnel.peer_announce();
    let nodes = match check_cluster_announce(&leaf, announce) {
        Ok(nodes) => nodes,
        Err(why) => {
            tracing::warn!(%peer, cluster = %leaf, reason = %why, "cluster tunnel refused");
            ctx.audit.record(
                "cluster.refused",
                serde_json::json!({ "cluster": leaf, "peer": peer.to_string(), "reason": why }),
            );
            tunnel.close(ErrorCode::ACCESS_DENIED, &why);
            let _ = driver.await;
            return;
        }
    };
    let id = ctx.directory.next_tunnel_id();
    let started = Instant::now();
    let count = nodes.len();
    if let Err(why) =
        ctx.directory
            .attach_cluster_tunnel(&leaf, id, peer, &tunnel, nodes, leaf_caps(&ctx))
    {
        Stats::bump(&ctx.stats.dropped_tunnel_limit);
        tracing::warn!(%peer, cluster = %leaf, reason = %why, "cluster tunnel refused");
        ctx.audit.record(
            "cluster.refused",
            serde_json::json!({ "cluster": leaf, "peer": peer.to_string(), "reason": why }),
        );
        tunnel.close(ErrorCode::LIMIT_EXCEEDED, &why);
        let _ = driver.await;
        return;
    }
    if let Some(key) = &home_key {
        ctx.session_homes.insert(key.clone(), ctx.core);
    }
    if let Some(session) = leaf_session {
        ctx.cluster_tunnels
            .borrow_mut()
            .insert(session, (leaf.clone(), tunnel.clone()));
    }
    tracing::info!(cluster = %leaf, %peer, tunnel_id = id, nodes = count, core = ctx.core, "cluster tunnel connected");
    ctx.audit.record(
        "cluster.connect",
        serde_json::json!({
            "cluster": leaf, "peer": peer.to_string(), "tunnel_id": id, "nodes": count,
        }),
    );
    // Heartbeat for `clusters ls`, and the trust check: a leaf removed with `clusters rm` loses
    // its tunnels within TRUST_RECHECK. Ends by itself within one interval of the tunnel; not
    // waited for.
    drop({
        let (ctx, tunnel, leaf) = (ctx.clone(), tunnel.clone(), leaf.clone());
        monoio::spawn(async move {
            let mut checked = Instant::now();
            while !tunnel.is_ended() {
                monoio::time::sleep(ctx.config.keepalive.interval.min(TRUST_RECHECK)).await;
                if tunnel.is_ended() {
                    break;
                }
                let rtt = tunnel.with_session(|s| s.rtt());
                ctx.directory.cluster_heartbeat(&leaf, id, rtt);
                if checked.elapsed() < TRUST_RECHECK {
                    continue;
                }
                checked = Instant::now();
                let trusted = is_trusted_leaf(&ctx, &leaf).await;
                if let Ok(false) = trusted {
                    let why = format!(
                        "cluster {leaf:?} is no longer a trusted leaf of cluster {:?} \
                         (`remoteler-proxy clusters rm`)",
                        ctx.cluster
                    );
                    tracing::warn!(cluster = %leaf, tunnel_id = id, "cluster tunnel closed: trust removed");
                    tunnel.close(ErrorCode::ACCESS_DENIED, &why);
                }
            }
        })
    });
    let watcher = {
        let (ctx, tunnel, leaf) = (ctx.clone(), tunnel.clone(), leaf.clone());
        monoio::spawn(async move {
            let mut seen = version;
            loop {
                seen = tunnel.announce_changed(seen).await;
                if tunnel.is_ended() {
                    break;
                }
                let max_nodes = leaf_caps(&ctx).nodes;
                let checked = check_cluster_announce(&leaf, tunnel.peer_announce().1)
                    .map_err(|why| (ErrorCode::ACCESS_DENIED, why))
                    .and_then(|nodes| {
                        ctx.directory
                            .update_cluster_tunnel(&leaf, id, nodes, max_nodes)
                            .map_err(|why| (ErrorCode::LIMIT_EXCEEDED, why))
                    });
                if let Err((code, why)) = checked {
                    tracing::warn!(cluster = %leaf, reason = %why, "cluster tunnel closed: bad ANNOUNCE");
                    ctx.audit.record(
                        "cluster.refused",
                        serde_json::json!({ "cluster": leaf, "tunnel_id": id, "reason": why }),
                    );
                    tunnel.close(code, &why);
                    break;
                }
            }
        })
    };
    // Trust is one-way: a leaf opens nothing in the root.
    let rejecter = {
        let tunnel = tunnel.clone();
        monoio::spawn(async move {
            while let Some(incoming) = tunnel.incoming().await {
                incoming.reject(
                    ErrorCode::ACCESS_DENIED,
                    "a root cluster accepts no streams from its leaf clusters",
                );
            }
        })
    };
    let mut driver = driver;
    let mut peer = peer;
    let reason = loop {
        let outcome = (&mut driver).await;
        let reason = outcome_reason(&outcome);
        let (true, false, Some(session)) = (tunnel.is_detached(), ctx.draining.get(), leaf_session)
        else {
            break reason;
        };
        // The leaf's nodes are offline for new sessions meanwhile; the sessions through the
        // tunnel pause.
        ctx.directory.detach_cluster_tunnel(&leaf, id);
        let grace = ctx.config.resume.grace;
        tracing::info!(
            cluster = %leaf, %peer, tunnel_id = id, %reason, grace_secs = grace.as_secs(),
            "cluster tunnel connection lost; waiting for the leaf to resume"
        );
        Stats::bump(&ctx.stats.connections_detached[1]);
        ctx.audit.record(
            "cluster.detached",
            serde_json::json!({
                "cluster": leaf, "peer": peer.to_string(), "tunnel_id": id, "reason": reason,
            }),
        );
        let next = resume::await_resume(
            &ctx.detached_clusters,
            session,
            &tunnel,
            &leaf,
            &reason,
            grace,
        )
        .await;
        let (conn, input, new_peer) = match next {
            Ok(transport) => transport,
            Err((why, _)) => break why,
        };
        if let Err(e) = tunnel.reattach() {
            break format!("{reason}; cannot resume: {e}");
        }
        peer = new_peer;
        let nodes = check_cluster_announce(&leaf, tunnel.peer_announce().1).unwrap_or_default();
        if let Err(why) =
            ctx.directory
                .attach_cluster_tunnel(&leaf, id, peer, &tunnel, nodes, leaf_caps(&ctx))
        {
            break format!("{reason}; cannot resume: {why}");
        }
        tracing::info!(cluster = %leaf, %peer, tunnel_id = id, "cluster tunnel resumed");
        Stats::bump(&ctx.stats.connections_resumed[1]);
        ctx.audit.record(
            "cluster.resumed",
            serde_json::json!({ "cluster": leaf, "peer": peer.to_string(), "tunnel_id": id }),
        );
        let driven = tunnel.clone();
        driver = monoio::spawn(async move { drive(&driven, conn, input).await });
    };
    if !tunnel.is_ended() {
        tunnel.close(ErrorCode::GOING_AWAY, "transport lost");
    }
    watcher.await;
    rejecter.await;
    if let Some(key) = &home_key {
        ctx.session_homes.remove(key, ctx.core);
    }
    if let Some(session) = leaf_session {
        let mut attached = ctx.cluster_tunnels.borrow_mut();
        if attached.get(&session).is_some_and(|(_, t)| {
            t.with_session(|s| s.local_id()) == tunnel.with_session(|s| s.local_id())
        }) {
            attached.remove(&session);
        }
    }
    ctx.directory.detach_cluster_tunnel(&leaf, id);
    tracing::info!(cluster = %leaf, %peer, tunnel_id = id, %reason, "cluster tunnel disconnected");
    ctx.audit.record(
        "cluster.disconnect",
        serde_json::json!({
            "cluster": leaf, "peer": peer.to_string(), "tunnel_id": id, "reason": reason,
            "duration_ms": started.elapsed().as_millis() as u64,
        }),
    );
}

// ---- leaf: stored trust ---------------------------------------------------------------------------

/// Where a leaf keeps what its join to root cluster `root` gave it: `<data_dir>/trusted/<root>/`.
pub fn trust_dir(data_dir: &Path, root: &str) -> PathBuf {
    data_dir.join("trusted").join(root)
}

/// The root CA, the leaf proxy's cluster certificate chain and its key.
struct StoredTrust {
    root_ca: CertificateDer<'static>,
    identity: TlsIdentity,
}

fn load_trust(dir: &Path, root: &str, leaf: &str) -> Result<Option<StoredTrust>, String> {
    let (ca, cert, key) = (
        dir.join("ca.crt"),
        dir.join("cluster.crt"),
        dir.join("cluster.key"),
    );
    if !cert.exists() || !key.exists() || !ca.exists() {
        return Ok(None);
    }
    let root_ca = tunnel::identity::read_certificates(&ca, FileRole::CaCertificate)
        .map_err(|e| e.to_string())?
        .into_iter()
        .next()
        .ok_or_else(|| format!("{} holds no certificate", ca.display()))?;
    let identity = TlsIdentity::load(&cert, &key).map_err(|e| e.to_string())?;
    let id = identity.identity().map_err(|e| e.to_string())?;
    if id.kind != IdentityKind::Cluster || id.name != leaf || id.cluster != root {
        return Err(format!(
            "{} is a {} certificate of {:?} issued by cluster {:?}, not a cluster certificate \
             of {leaf:?} issued by {root:?}; delete {} to join again",
            cert.display(),
            id.kind.as_str(),
            id.name,
            id.cluster,
            dir.display()
        ));
    }
    if id.not_after < SystemTime::now() {
        return Err(format!(
            "the cluster certificate in {} expired at {}; delete the directory and join again \
             with a new trusted-cluster token",
            dir.display(),
            util::rfc3339(id.not_after)
        ));
    }
    Ok(Some(StoredTrust { root_ca, identity }))
}

/// Joins `trusted` once and stores the result; the token is not needed afterwards.
async fn join_root(ctx: &Context, trusted: &TrustedCluster, dir: &Path) -> Result<(), String> {
    let token = trusted
        .join
        .token
        .load()
        .map_err(|e| e.to_string())?
        .ok_or_else(|| {
            format!(
                "no certificate for trusted cluster {} in {} and no `token` or `token_file` to \
                 join with; create one on the root with `remoteler-proxy tokens add --kind \
                 trusted-cluster`",
                trusted.name,
                dir.display()
            )
        })?;
    let pin: tunnel::identity::CaPin = trusted
        .join
        .ca_pin
        .to_string()
        .parse()
        .map_err(|e: tunnel::identity::IdentityError| e.to_string())?;
    let (mut tls, learned) =
        tunnel::identity::client_config_pinned(pin).map_err(|e| e.to_string())?;
    tls.alpn_protocols = vec![ALPN_CLUSTER_JOIN.to_vec()];
    let conn = connect(ctx, &trusted.proxy, Arc::new(tls), ALPN_CLUSTER_JOIN).await?;
    let key = PrivateKey::generate().map_err(|e| e.to_string())?;
    // The root takes our CA certificate as the owner of our name only with proof that we
    // hold its key: our CA certifies the join's key, for the root's name.
    let proof = Validity::for_ttl(SystemTime::now(), CA_PROOF_TTL)
        .and_then(|v| {
            ctx.ca
                .issue_cluster(trusted.name.as_str(), &key.public_key(), v)
        })
        .map_err(|e| format!("cannot make the CA proof for the join: {e}"))?;
    let request = ClusterJoinRequest {
        token: token.expose().to_owned(),
        cluster: ctx.cluster.clone(),
        ca_pem: ctx.ca.certificate_pem(),
        public_key: tunnel::control::to_hex(&key.public_key().to_spki_der()),
        ca_proof_pem: tunnel::identity::certificates_to_pem(&[proof]),
        ssh_host_ca: ctx.ssh_host_ca.public_line().ok(),
    };
    let (mut reader, mut writer) = conn.split();
    let mut buf = BytesMut::new();
    let exchange = async {
        write_line(&mut writer, &request).await?;
        read_reply::<JoinResponse>(&mut reader, &mut buf).await
    };
    let response = monoio::time::timeout(ctx.handshake_timeout() * 3, exchange)
        .await
        .map_err(|_| "the root did not answer the join in time".to_owned())?
        .map_err(|e| format!("the root refused the join: {e}"))?;
    let _ = writer.close().await;
    let root_ca = learned
        .certificate()
        .ok_or_else(|| "the root's CA was not learned during the handshake".to_owned())?;
    let sent_ca = certs_from_pem(&response.ca_pem)
        .map_err(|e| format!("the root's ca_pem is unreadable: {e}"))?;
    if sent_ca.first() != Some(&root_ca) {
        return Err("the root's ca_pem is not the CA its TLS certificate chains to".into());
    }
    if response.cluster != trusted.name.as_str() {
        return Err(format!(
            "the root at {} is cluster {:?}, but `trusted_clusters.name` says {:?}; fix the name",
            trusted.proxy, response.cluster, trusted.name
        ));
    }
    let chain = certs_from_pem(&response.certificate_pem)
        .map_err(|e| format!("the root's certificate_pem is unreadable: {e}"))?;
    let identity = TlsIdentity { chain, key };
    let id = identity.identity().map_err(|e| e.to_string())?;
    if id.kind != IdentityKind::Cluster || id.name != ctx.cluster {
        return Err(format!(
            "the root issued a {} certificate for {:?}, not a cluster certificate for {:?}",
            id.kind.as_str(),
            id.name,
            ctx.cluster
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    }
    identity
        .save(&dir.join("cluster.crt"), &dir.join("cluster.key"))
        .map_err(|e| e.to_string())?;
    tunnel::identity::write_public_file(
        &dir.join("ca.crt"),
        tunnel::identity::certificates_to_pem(&[root_ca]).as_bytes(),
        FileRole::CaCertificate,
    )
    .map_err(|e| e.to_string())?;
    Ok(())
}

/// TCP then TLS to `addr`, checking the ALPN the root agreed on.
async fn connect(
    ctx: &Context,
    addr: &config::HostPort,
    tls: Arc<rustls::ClientConfig>,
    alpn: &[u8],
) -> Result<TlsConnection, String> {
    let name = ServerName::try_from(addr.host().to_owned())
        .map_err(|_| format!("{} is not a valid server name", addr.host()))?;
    let tcp = monoio::time::timeout(DIAL_TIMEOUT, super::sessions::dial(addr))
        .await
        .map_err(|_| format!("{addr} did not accept a connection within {DIAL_TIMEOUT:?}"))?
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let conn = tunnel::tls::connect(tcp, tls, name, ctx.handshake_timeout())
        .await
        .map_err(|e| format!("tls with {addr}: {e}"))?;
    if conn.alpn_protocol().as_deref() != Some(alpn) {
        return Err(format!(
            "{addr} does not speak {} (is it the root's tunnel listener?)",
            String::from_utf8_lossy(alpn)
        ));
    }
    Ok(conn)
}

// ---- leaf: cluster agent ---------------------------------------------------------------------------

/// What a leaf core needs to answer OPENs of one root.
struct RootTrust {
    root: String,
    root_ca: CertificateDer<'static>,
    role_map: config::RoleMap,
}

/// Jittered exponential backoff.
struct Backoff(u32);

impl Backoff {
    fn next_delay(&mut self) -> Duration {
        let exp = BACKOFF_MIN
            .saturating_mul(1 << self.0.min(16))
            .min(BACKOFF_MAX);
        self.0 = self.0.saturating_add(1);
        let jitter = util::random_bytes::<2>()
            .map(u16::from_le_bytes)
            .unwrap_or(0);
        // Between half and all of it.
        exp / 2 + exp / 2 * u32::from(jitter) / u32::from(u16::MAX)
    }
}

async fn sleep_or_shutdown(ctx: &Context, delay: Duration) -> bool {
    monoio::select! {
        _ = monoio::time::sleep(delay) => true,
        _ = ctx.shutdown.wait() => false,
    }
}

/// A leaf core's cluster agent for root `trusted`: runs until shutdown.
pub(super) async fn run_cluster_agent(ctx: Rc<Context>, trusted: TrustedCluster) {
    let root = trusted.name.to_string();
    let dir = trust_dir(&ctx.config.data_dir, &root);
    let mut backoff = Backoff(0);
    let stored = loop {
        match load_trust(&dir, &root, &ctx.cluster) {
            Ok(Some(stored)) => break stored,
            Ok(None) if ctx.core == 0 => match join_root(&ctx, &trusted, &dir).await {
                Ok(()) => {
                    tracing::info!(cluster = %root, dir = %dir.display(), "joined trusted root cluster; certificate stored");
                    ctx.audit.record(
                        "cluster.join",
                        serde_json::json!({
                            "success": true, "cluster": root, "proxy": trusted.proxy.to_string(),
                        }),
                    );
                    continue;
                }
                Err(why) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(cluster = %root, proxy = %trusted.proxy, reason = %why, retry_in = ?delay, "cannot join the trusted root cluster");
                    ctx.audit.record(
                        "cluster.join",
                        serde_json::json!({
                            "success": false, "cluster": root, "proxy": trusted.proxy.to_string(),
                            "reason": why,
                        }),
                    );
                    if !sleep_or_shutdown(&ctx, delay).await {
                        return;
                    }
                }
            },
            Ok(None) => {
                // Core 0 joins; the others pick up its files.
                if !sleep_or_shutdown(&ctx, Duration::from_millis(500)).await {
                    return;
                }
            }
            Err(why) => {
                tracing::error!(cluster = %root, reason = %why, "cannot use the stored trust of the root cluster; no tunnel to it");
                return;
            }
        }
    };
    let trust = Rc::new(RootTrust {
        root: root.clone(),
        root_ca: stored.root_ca.clone(),
        role_map: trusted.role_map.clone(),
    });
    let mut tls = match tunnel::identity::client_config_trusting(
        std::slice::from_ref(&stored.root_ca),
        Some((stored.identity.chain.clone(), &stored.identity.key)),
    ) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(cluster = %root, error = %e, "cannot build the TLS client for the root cluster");
            return;
        }
    };
    tls.alpn_protocols = vec![ALPN_TUNNEL.to_vec()];
    let tls = Arc::new(tls);
    let mut backoff = Backoff(0);
    let mut kept = None;
    loop {
        let (uptime, reason) = tunnel_once(&ctx, &trusted, tls.clone(), &trust, &mut kept).await;
        if ctx.shutdown.is_triggered() {
            return;
        }
        if uptime >= STABLE_AFTER {
            backoff = Backoff(0);
        }
        // A detached session waits for the next connection: dial again at once.
        let delay = if kept.is_some() {
            Duration::ZERO
        } else {
            backoff.next_delay()
        };
        tracing::warn!(cluster = %root, proxy = %trusted.proxy, %reason, up_for = ?uptime, retry_in = ?delay, core = ctx.core, resuming = kept.is_some(), "cluster tunnel down; reconnecting");
        if !sleep_or_shutdown(&ctx, delay).await {
            return;
        }
    }
}

/// The leaf nodes this core owns, as the root should see them.
fn inventory(ctx: &Context) -> Announce {
    let nodes = ctx
        .directory
        .list()
        .into_iter()
        .filter(|n| ctx.directory.owner_core(&n.name) == ctx.core)
        .map(|n| NodeInfo {
            tunnel: n.via == "tunnel",
            name: n.name,
            online: n.online,
            labels: n.labels,
            services: vec!["ssh".into()],
        })
        .collect();
    Announce {
        cluster: ctx.cluster.clone(),
        nodes,
    }
}

/// A leaf's cluster session whose connection was lost, kept for the next connection to
/// resume: the root users' sessions through it carry on if the root still holds its side.
struct KeptCluster {
    tunnel: Tunnel,
    /// Serves the root's OPENs.
    server: monoio::task::JoinHandle<()>,
    announced: Announce,
}

/// One cluster tunnel connection, from connect to its end: (how long it was up, why it
/// ended). A session detached by a lost connection is left in `kept` for the next call.
async fn tunnel_once(
    ctx: &Rc<Context>,
    trusted: &TrustedCluster,
    tls: Arc<rustls::ClientConfig>,
    trust: &Rc<RootTrust>,
    kept: &mut Option<KeptCluster>,
) -> (Duration, String) {
    let root = trusted.name.as_str();
    let conn = monoio::select! {
        c = connect(ctx, &trusted.proxy, tls, ALPN_TUNNEL) => c,
        _ = ctx.shutdown.wait() => return (Duration::ZERO, "shutting down".into()),
    };
    let conn = match conn {
        Ok(c) => c,
        Err(why) => return (Duration::ZERO, why),
    };
    let config = &ctx.config;
    let resumable = match kept.take() {
        Some(old) => {
            old.tunnel.tick(); // ends it if the grace period passed
            if old.tunnel.is_ended() || old.tunnel.reattach().is_err() {
                old.server.await;
                None
            } else {
                Some(old)
            }
        }
        None => None,
    };
    let resuming = resumable.is_some();
    let (tunnel, server, mut announced) = match resumable {
        Some(old) => (old.tunnel, old.server, old.announced),
        None => {
            let mut session = ctx.session_config_as(Role::Cluster, true);
            session.resume_grace = config.resume.grace;
            let id = util::random_bytes::<16>().unwrap_or_default();
            let tunnel = Tunnel::new(Session::new(session, id, Instant::now()));
            let announced = inventory(ctx);
            if let Err(e) = tunnel.announce(&announced) {
                return (
                    Duration::ZERO,
                    format!("cannot announce the inventory: {e}"),
                );
            }
            let server = {
                let (ctx, tunnel, trust) = (ctx.clone(), tunnel.clone(), trust.clone());
                monoio::spawn(async move {
                    while let Some(incoming) = tunnel.incoming().await {
                        monoio::spawn(handle_cluster_open(ctx.clone(), incoming, trust.clone()));
                    }
                })
            };
            (tunnel, server, announced)
        }
    };
    let driver = {
        let tunnel = tunnel.clone();
        monoio::spawn(async move { drive(&tunnel, conn, BytesMut::new()).await })
    };
    let started = Instant::now();
    let up = monoio::select! {
        up = tunnel.connected() => up,
        _ = ctx.shutdown.wait() => false,
    };
    if up && resuming {
        tracing::info!(cluster = %root, proxy = %trusted.proxy, core = ctx.core, "cluster tunnel reconnected; resuming its sessions");
    } else if up {
        tracing::info!(cluster = %root, proxy = %trusted.proxy, core = ctx.core, nodes = announced.nodes.len(), "cluster tunnel up");
        ctx.audit.record(
            "cluster.connect",
            serde_json::json!({
                "cluster": root, "proxy": trusted.proxy.to_string(), "core": ctx.core,
                "nodes": announced.nodes.len(),
            }),
        );
    }
    let mut driver = driver;
    let outcome = loop {
        monoio::select! {
            outcome = &mut driver => break Some(outcome),
            _ = ctx.shutdown.wait() => break None,
            _ = monoio::time::sleep(INVENTORY_POLL) => {
                let now = inventory(ctx);
                if now != announced {
                    if let Err(e) = tunnel.announce(&now) {
                        tracing::warn!(cluster = %root, error = %e, "cannot announce the changed inventory");
                    }
                    announced = now;
                }
            }
        }
    };
    let reason = match outcome {
        Some(outcome) => outcome_reason(&outcome),
        None => {
            // Drain like the proxy's own listeners: GOAWAY (the root opens nothing new here),
            // then the root users' sessions get up to `drain.timeout` to finish.
            tunnel.goaway("leaf proxy shutting down");
            let deadline = Instant::now() + config.drain.timeout;
            while tunnel.with_session(|s| s.stream_count()) > 0
                && !tunnel.is_ended()
                && Instant::now() < deadline
            {
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
            tunnel.close(ErrorCode::GOING_AWAY, "leaf proxy shutting down");
            let _ = monoio::time::timeout(CLOSE_GRACE, driver).await;
            "leaf proxy shutting down".to_owned()
        }
    };
    let uptime = if up {
        started.elapsed()
    } else {
        Duration::ZERO
    };
    if tunnel.is_detached() && !ctx.shutdown.is_triggered() {
        // Keep the session: the next connection resumes it. Its grace timer runs meanwhile,
        // so the root users' streams do not wait forever if the root stays out of reach.
        let expiring = tunnel.clone();
        monoio::spawn(async move { expiring.expire_while_detached().await });
        *kept = Some(KeptCluster {
            tunnel,
            server,
            announced,
        });
        return (uptime, reason);
    }
    if !tunnel.is_ended() {
        tunnel.close(ErrorCode::CANCELLED, "tunnel connection lost");
    }
    server.await;
    let uptime = if up {
        started.elapsed()
    } else {
        Duration::ZERO
    };
    if up {
        ctx.audit.record(
            "cluster.disconnect",
            serde_json::json!({
                "cluster": root, "proxy": trusted.proxy.to_string(), "core": ctx.core,
                "reason": reason, "duration_ms": uptime.as_millis() as u64,
            }),
        );
    }
    (uptime, reason)
}

// ---- leaf: an OPEN from the root ---------------------------------------------------------------

/// Checks the root user's certificate of an OPEN and maps its roles; the user as this cluster
/// sees them (home cluster = the root, roles = the mapped ones).
fn root_user(
    cluster: &str,
    trust: &RootTrust,
    request: &frame::Open,
    now: SystemTime,
) -> Result<PeerIdentity, (ErrorCode, String)> {
    let denied = |why: String| (ErrorCode::ACCESS_DENIED, why);
    if request.cluster != cluster {
        return Err((
            ErrorCode::CLUSTER_UNKNOWN,
            format!(
                "cluster {} serves only its own nodes, not cluster {:?}",
                cluster, request.cluster
            ),
        ));
    }
    if request.credential.is_empty() {
        return Err(denied(format!(
            "the root cluster {} sent no user certificate with the request",
            trust.root
        )));
    }
    let cert = CertificateDer::from(request.credential.to_vec());
    let user = tunnel::identity::verify_client_chain(
        std::slice::from_ref(&trust.root_ca),
        &[cert],
        now,
    )
    .map_err(|e| {
        denied(format!(
            "the user certificate passed by root cluster {} does not verify against its CA: {e}",
            trust.root
        ))
    })?;
    if user.kind != IdentityKind::User || user.cluster != trust.root {
        return Err(denied(format!(
            "the certificate passed by root cluster {} is a {} certificate of cluster {:?}, not \
             a user of {}",
            trust.root,
            user.kind.as_str(),
            user.cluster,
            trust.root
        )));
    }
    if user.name != request.user {
        return Err(denied(format!(
            "the request names user {:?} but the certificate is user {:?}",
            request.user, user.name
        )));
    }
    let mapped = trust.role_map.map(&user.roles);
    if mapped.is_empty() {
        return Err(denied(format!(
            "access denied: no role of user {} of cluster {} ({}) maps to a role of cluster {} \
             (`trusted_clusters.role_map`)",
            user.name,
            trust.root,
            if user.roles.is_empty() {
                "no roles".to_owned()
            } else {
                user.roles.join(", ")
            },
            cluster
        )));
    }
    Ok(PeerIdentity {
        roles: mapped,
        ..user
    })
}

/// An OPEN a root passed through its cluster tunnel: verified, mapped, then served like a local
/// user's, with this cluster's audit log.
async fn handle_cluster_open(ctx: Rc<Context>, incoming: Incoming, trust: Rc<RootTrust>) {
    match root_user(&ctx.cluster, &trust, &incoming.request, SystemTime::now()) {
        Ok(user) => {
            let client_addr = incoming.request.client_addr.clone();
            super::sessions::handle_open(ctx, incoming, user, client_addr, Bytes::new()).await
        }
        Err((code, reason)) => {
            let request = &incoming.request;
            let session_id = util::to_hex(&request.session_id);
            ctx.stats.refused(code);
            tracing::info!(%session_id, user = %request.user, cluster = %trust.root, node = %request.node, code = code.name(), %reason, "session from the root cluster refused");
            ctx.audit.record(
                "access.denied",
                serde_json::json!({
                    "session_id": session_id, "user": request.user, "user_cluster": trust.root,
                    "cluster": request.cluster, "node": request.node, "login": request.login,
                    "client_addr": request.client_addr, "reason": reason,
                }),
            );
            incoming.reject(code, &reason);
        }
    }
}

// ---- root: the user API -------------------------------------------------------------------------

/// `remoteler ls --cluster LEAF`: the nodes the leaf announces, if the user may reach the leaf.
pub(super) fn list_leaf_nodes(
    ctx: &Context,
    user: &PeerIdentity,
    leaf: &str,
) -> Reply<tunnel::control::ApiResponse> {
    if let Err(denied) = ctx.policy.check_cluster(user, leaf) {
        return Reply::Error(error("not_allowed", denied.0));
    }
    match ctx.directory.cluster_nodes(leaf) {
        Some(nodes) => Reply::Ok(tunnel::control::ApiResponse::Nodes(
            nodes
                .into_iter()
                .map(|n| tunnel::control::NodeView {
                    name: n.name,
                    via: n.via,
                    online: n.online,
                    labels: n.labels,
                })
                .collect(),
        )),
        None => Reply::Error(error(
            "cluster_unknown",
            format!(
                "no trusted cluster named {leaf:?} is connected to cluster {}; `remoteler \
                 clusters` lists them",
                ctx.cluster
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tunnel::identity::ClusterCa;

    const HOUR: Duration = Duration::from_secs(3600);

    struct Setup {
        root: ClusterCa,
        trust: RootTrust,
    }

    fn setup() -> Setup {
        let root = ClusterCa::generate("root.test").unwrap();
        let text = "cluster_name = \"leaf\"\n[[trusted_clusters]]\nname = \"root.test\"\n\
                    proxy = \"r:3024\"\nca_pin = \"sha256:0000000000000000000000000000000000000000000000000000000000000000\"\n\
                    role_map = [{ remote = \"dev\", local = [\"leaf-dev\"] }, { remote = \"^team-(.+)$\", local = [\"$1\"] }]\n";
        let config = config::ProxyConfig::from_toml_str(text, "/t/proxy.toml").unwrap();
        let trust = RootTrust {
            root: "root.test".into(),
            root_ca: root.certificate().clone(),
            role_map: config.trusted_clusters[0].role_map.clone(),
        };
        Setup { root, trust }
    }

    fn user_cert(ca: &ClusterCa, name: &str, roles: &[&str], validity: Validity) -> Bytes {
        let key = PrivateKey::generate().unwrap();
        let roles: Vec<String> = roles.iter().map(|r| (*r).to_owned()).collect();
        let cert = ca
            .issue_user(name, &roles, &["root".into()], &key.public_key(), validity)
            .unwrap();
        Bytes::copy_from_slice(cert.as_ref())
    }

    fn open(user: &str, credential: Bytes) -> frame::Open {
        frame::Open {
            cluster: "leaf".into(),
            node: "node-a".into(),
            service: "ssh".into(),
            user: user.into(),
            login: "root".into(),
            client_addr: "10.0.0.9:5555".into(),
            credential,
            ..frame::Open::default()
        }
    }

    fn valid() -> Validity {
        Validity::for_ttl(SystemTime::now(), HOUR).unwrap()
    }

    #[test]
    fn a_root_user_is_verified_and_mapped() {
        let s = setup();
        let cert = user_cert(&s.root, "alice", &["team-blue", "dev", "intern"], valid());
        let user = root_user("leaf", &s.trust, &open("alice", cert), SystemTime::now()).unwrap();
        assert_eq!(user.name, "alice");
        assert_eq!(user.cluster, "root.test", "the home cluster stays the root");
        assert_eq!(user.roles, ["leaf-dev", "blue"]);
        assert_eq!(user.logins, ["root"]);
    }

    #[test]
    fn refusals() {
        let s = setup();
        let now = SystemTime::now();
        let denied = |request: frame::Open, expected: &str| {
            let (code, why) = root_user("leaf", &s.trust, &request, now).unwrap_err();
            assert_eq!(code, ErrorCode::ACCESS_DENIED, "{why}");
            assert!(why.contains(expected), "expected {expected:?} in {why:?}");
        };
        let alice = user_cert(&s.root, "alice", &["dev"], valid());
        // No credential.
        denied(open("alice", Bytes::new()), "sent no user certificate");
        // Garbage.
        denied(
            open("alice", Bytes::from_static(b"not der")),
            "does not verify",
        );
        // The certificate of another CA that calls itself root.test.
        let impostor = ClusterCa::generate("root.test").unwrap();
        denied(
            open("alice", user_cert(&impostor, "alice", &["dev"], valid())),
            "does not verify",
        );
        // Expired.
        let past = SystemTime::now() - 10 * HOUR;
        let old = Validity::between(past, past + HOUR).unwrap();
        denied(
            open("alice", user_cert(&s.root, "alice", &["dev"], old)),
            "does not verify",
        );
        // Not a user: the root's cluster certificate for some leaf.
        let key = PrivateKey::generate().unwrap();
        let cluster_cert = s
            .root
            .issue_cluster("leaf", &key.public_key(), valid())
            .unwrap();
        denied(
            open("alice", Bytes::copy_from_slice(cluster_cert.as_ref())),
            "not a user",
        );
        // Someone else's certificate.
        denied(open("mallory", alice.clone()), "names user \"mallory\"");
        // No role maps.
        denied(
            open("carol", user_cert(&s.root, "carol", &["intern"], valid())),
            "maps to a role of cluster leaf",
        );
        // Another cluster than this leaf.
        let mut other = open("alice", alice);
        other.cluster = "elsewhere".into();
        let (code, _) = root_user("leaf", &s.trust, &other, now).unwrap_err();
        assert_eq!(code, ErrorCode::CLUSTER_UNKNOWN);
    }

    /// A leaf's SSH host CA goes into users' known_hosts: one key, re-encoded, or refused; a
    /// second line (a CA for every host) cannot ride along.
    #[test]
    fn a_leaf_host_ca_is_one_public_key() {
        let key =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ";
        assert_eq!(
            super::check_ssh_host_ca(&format!("{key} remoteler-host-ca@leaf\n")).unwrap(),
            format!("{key} remoteler-host-ca@leaf")
        );
        for bad in [
            format!("{key} c\n@cert-authority * {key}"),
            format!("@cert-authority * {key}"),
            "ssh-ed25519 !!!".to_owned(),
        ] {
            assert_eq!(
                super::check_ssh_host_ca(&bad).unwrap_err().code,
                "bad_request",
                "{bad:?}"
            );
        }
    }
}
