//! The one-line JSON exchanges: join, login, register heartbeats, user API.

use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use argon2::{Argon2, PasswordVerifier};
use bytes::BytesMut;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tunnel::control::{
    Ack, ApiRequest, ApiResponse, ControlError, ErrorBody, JoinRequest, JoinResponse, LoginRequest,
    LoginResponse, NodeView, RegisterRequest, Reply, from_hex, read_line, write_line,
};
use tunnel::identity::{PeerIdentity, PublicKey, Validity};
use tunnel::tls::{TlsConnection, TlsReader, TlsWriter};

use super::{Context, HandshakeSlot, Stats};
use crate::error::ProxyError;
use crate::sshca::SshCertError;
use crate::state::JoinRefused;
use crate::util;

/// Lifetime of a node certificate issued at join.
pub const NODE_CERT_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// A refused join or login waits this long before the answer, to slow down guessing.
pub(super) const FAILURE_DELAY: Duration = Duration::from_millis(500);
/// Shortest user certificate: scripts (and tests) may ask for seconds; there is no floor beyond one.
const MIN_USER_TTL: Duration = Duration::from_secs(1);
/// Longest heartbeat lifetime accepted from a registering node.
const MAX_REGISTER_TTL_SECS: u64 = 3600;

pub(super) fn error(code: &str, message: impl Into<String>) -> ErrorBody {
    ErrorBody {
        code: code.into(),
        message: message.into(),
    }
}

pub(super) async fn reply<T: Serialize>(writer: &mut TlsWriter, reply: &Reply<T>) {
    let _ = monoio::time::timeout(Duration::from_secs(10), write_line(writer, reply)).await;
    let _ = monoio::time::timeout(Duration::from_secs(5), writer.close()).await;
}

/// Reads the connection's one request line within the handshake deadline. The connection
/// holds its handshake `slot` until the line is in (so a peer that completes TLS and then
/// says nothing still counts against its source group and the table), and gives it up then.
pub(super) async fn read_request<T: DeserializeOwned>(
    ctx: &Context,
    reader: &mut TlsReader,
    buf: &mut BytesMut,
    slot: HandshakeSlot,
) -> Result<T, ErrorBody> {
    let read = monoio::time::timeout(ctx.handshake_timeout(), read_line::<T>(reader, buf));
    let Some(read) = slot.unless_evicted(read).await else {
        return Err(error(
            "busy",
            "the proxy has too many connections in their handshake and closed this one to \
             make room; try again",
        ));
    };
    drop(slot);
    match read {
        Ok(Ok(request)) => Ok(request),
        Ok(Err(ControlError::Malformed(detail))) => {
            Err(error("bad_request", format!("malformed request: {detail}")))
        }
        Ok(Err(e)) => Err(error("bad_request", e.to_string())),
        Err(_) => Err(error(
            "timeout",
            format!(
                "no complete request within {:?} (`limits.handshake_timeout`)",
                ctx.handshake_timeout()
            ),
        )),
    }
}

/// Counts a join or login from `peer` against its source group before it is checked, or
/// the refusal for a group that used up its failed joins and logins
/// ([`crate::guard::AUTH_FAILURE_LIMIT`] per [`crate::guard::AUTH_FAILURE_WINDOW`], attempts
/// in progress included); `what` is "joins" or "logins".
pub(super) fn begin_attempt(
    ctx: &Context,
    peer: SocketAddr,
    what: &str,
) -> Result<crate::guard::AuthAttempt, ErrorBody> {
    use crate::guard::{AUTH_FAILURE_LIMIT, AUTH_FAILURE_WINDOW, AttemptRefused, SourceGroup};
    let group = SourceGroup::of(peer.ip());
    ctx.guard
        .begin_attempt(peer.ip(), std::time::Instant::now())
        .map_err(|refused| {
            let message = match refused {
                AttemptRefused::Blocked(left) => format!(
                    "too many failed joins and logins from {} ({group}; {AUTH_FAILURE_LIMIT} \
                     within {}s); {what} from there are refused for another {}s without being \
                     checked",
                    peer.ip(),
                    AUTH_FAILURE_WINDOW.as_secs(),
                    left.as_secs().max(1)
                ),
                AttemptRefused::Checking { checking } => format!(
                    "{checking} joins and logins from {group} are being checked now, which with \
                     the failures of the last {}s makes the limit of {AUTH_FAILURE_LIMIT}; \
                     try again once they are answered",
                    AUTH_FAILURE_WINDOW.as_secs()
                ),
            };
            error("rate_limited", message)
        })
}

/// Settles a join or login `attempt` that ended with `body`: a failure stays counted against
/// its source group; an answer that checked nothing ("rate_limited", "busy", "internal") is
/// given back. Returns whether the group is blocked now.
pub(super) fn count_failure(
    ctx: &Context,
    peer: SocketAddr,
    attempt: Result<crate::guard::AuthAttempt, ErrorBody>,
    body: &ErrorBody,
) -> bool {
    let attempt = match attempt {
        Err(_) => return true, // refused: blocked
        Ok(attempt) => attempt,
    };
    if matches!(body.code.as_str(), "rate_limited" | "busy" | "internal") {
        drop(attempt);
        return ctx
            .guard
            .auth_blocked(peer.ip(), std::time::Instant::now())
            .is_some();
    }
    let blocked = attempt.failed();
    if blocked {
        Stats::bump(&ctx.stats.auth_sources_blocked);
        tracing::warn!(
            source = %peer.ip(),
            group = %crate::guard::SourceGroup::of(peer.ip()),
            limit = crate::guard::AUTH_FAILURE_LIMIT,
            window_secs = crate::guard::AUTH_FAILURE_WINDOW.as_secs(),
            "too many failed joins and logins from one source group; refusing it for the rest of the window"
        );
    }
    blocked
}

/// Answers a line-protocol connection that may not proceed.
pub(super) async fn refuse_line(
    ctx: &Context,
    conn: TlsConnection,
    peer: SocketAddr,
    protocol: &str,
    code: &str,
    why: &str,
) {
    tracing::warn!(%peer, alpn = %protocol, reason = %why, "connection refused");
    ctx.audit.record(
        "access.denied",
        serde_json::json!({ "peer": peer.to_string(), "protocol": protocol, "reason": why }),
    );
    let (_reader, mut writer) = conn.split();
    reply(&mut writer, &Reply::<Ack>::Error(error(code, why))).await;
}

/// A public key as a join or login request carries it: hex of the SubjectPublicKeyInfo DER.
pub fn public_key(hex: &str) -> Result<PublicKey, ErrorBody> {
    let der = from_hex(hex).ok_or_else(|| {
        error(
            "bad_public_key",
            "public_key is not hex; send the SubjectPublicKeyInfo DER as lowercase hex",
        )
    })?;
    PublicKey::from_spki_der(&der).map_err(|e| error("bad_public_key", e.to_string()))
}

#[derive(Debug)]
enum JoinFailure {
    Token(JoinRefused),
    Refused(ErrorBody),
}

impl From<ProxyError> for JoinFailure {
    fn from(e: ProxyError) -> Self {
        tracing::error!(error = %e, "cannot read or update the state file during a join");
        JoinFailure::Refused(error(
            "internal",
            "the proxy cannot read its state; the operator should check its log",
        ))
    }
}

/// ALPN_JOIN: a join token for a node certificate.
pub(super) async fn serve_join(
    ctx: Rc<Context>,
    conn: TlsConnection,
    peer: SocketAddr,
    slot: HandshakeSlot,
) {
    let (mut reader, mut writer) = conn.split();
    let mut buf = BytesMut::new();
    let request: JoinRequest = match read_request(&ctx, &mut reader, &mut buf, slot).await {
        Ok(r) => r,
        Err(body) => {
            tracing::info!(%peer, code = %body.code, "join request unreadable");
            reply(&mut writer, &Reply::<JoinResponse>::Error(body)).await;
            return;
        }
    };
    let attempt = begin_attempt(&ctx, peer, "joins");
    let joined = match &attempt {
        Err(body) => Err(JoinFailure::Refused(body.clone())),
        Ok(_) => join(&ctx, &request).await,
    };
    match joined {
        Ok((response, token_id)) => {
            tracing::info!(%peer, node = %request.node, token = %token_id, "node joined");
            ctx.audit.record(
                "join",
                serde_json::json!({
                    "success": true, "node": request.node, "peer": peer.to_string(),
                    "token_id": token_id,
                }),
            );
            reply(&mut writer, &Reply::Ok(response)).await;
        }
        Err(failure) => {
            let body = match failure {
                JoinFailure::Token(e) => error(e.code(), e.to_string()),
                JoinFailure::Refused(body) => body,
            };
            let blocked = count_failure(&ctx, peer, attempt, &body);
            tracing::info!(%peer, node = %request.node, code = %body.code, "join refused");
            ctx.audit.record(
                "join",
                serde_json::json!({
                    "success": false, "node": request.node, "peer": peer.to_string(),
                    "code": body.code, "reason": body.message, "source_blocked": blocked,
                }),
            );
            monoio::time::sleep(FAILURE_DELAY).await;
            reply(&mut writer, &Reply::<JoinResponse>::Error(body)).await;
        }
    }
}

/// The checks of a join request that need no state: the node name and the public key.
pub fn check_join(request: &JoinRequest) -> Result<PublicKey, ErrorBody> {
    config::NodeName::new(request.node.as_str())
        .map_err(|e| error("bad_node_name", format!("node name: {e}")))?;
    tunnel::identity::validate_name("node name", &request.node)
        .map_err(|e| error("bad_node_name", e.to_string()))?;
    public_key(&request.public_key)
}

async fn join(ctx: &Context, request: &JoinRequest) -> Result<(JoinResponse, String), JoinFailure> {
    let key = check_join(request).map_err(JoinFailure::Refused)?;
    let key_sha256 = util::sha256_hex(&key.to_spki_der());
    // Whether the running proxy holds the name (static, connected, detached): decided here,
    // the key the name was joined with is decided in the state file below.
    let in_use = ctx.directory.name_in_use(&request.node);
    // The token's use is saved by the state writer (a locked read-modify-write with fsyncs, in
    // order and in batches); the answer waits until it is on disk. A refused join changes
    // nothing and writes nothing.
    let (token, node) = (request.token.clone(), request.node.clone());
    let used = ctx
        .state_writer
        .update(move |state| state.admit_node(&token, &node, &key_sha256, in_use, util::unix_now()))
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "cannot update the state file during a join");
            JoinFailure::Refused(error(
                "internal",
                "the proxy cannot update its state file; the operator should check its log",
            ))
        })?
        .map_err(JoinFailure::Token)?;
    let internal = |e: tunnel::identity::IdentityError| {
        tracing::error!(error = %e, "cannot issue a node certificate");
        JoinFailure::Refused(error(
            "internal",
            format!("cannot issue the certificate: {e}"),
        ))
    };
    // A certificate counts as issued in whole seconds; one issued in the very second the node
    // was removed would be refused with the old ones, so wait for the next second.
    if let Some(at) = ctx.revocations.removed_at(&request.node) {
        let now = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        if now.as_secs() <= at {
            let wait = Duration::from_secs(at + 1).saturating_sub(now);
            monoio::time::sleep(wait).await;
        }
    }
    let validity = Validity::for_ttl(SystemTime::now(), NODE_CERT_TTL).map_err(internal)?;
    let leaf = ctx
        .ca
        .issue_node(&request.node, &key, validity)
        .map_err(internal)?;
    let chain = ctx.ca.chain(leaf);
    Ok((
        JoinResponse {
            cluster: ctx.cluster.clone(),
            certificate_pem: tunnel::identity::certificates_to_pem(&chain),
            ca_pem: ctx.ca.certificate_pem(),
        },
        used.id,
    ))
}

/// ALPN_LOGIN: a password for a user certificate.
pub(super) async fn serve_login(
    ctx: Rc<Context>,
    conn: TlsConnection,
    peer: SocketAddr,
    slot: HandshakeSlot,
) {
    let (mut reader, mut writer) = conn.split();
    let mut buf = BytesMut::new();
    let request: LoginRequest = match read_request(&ctx, &mut reader, &mut buf, slot).await {
        Ok(r) => r,
        Err(body) => {
            tracing::info!(%peer, code = %body.code, "login request unreadable");
            reply(&mut writer, &Reply::<LoginResponse>::Error(body)).await;
            return;
        }
    };
    let user = request.user.clone();
    let attempt = begin_attempt(&ctx, peer, "logins");
    let outcome = match &attempt {
        Err(body) => Err(body.clone()),
        Ok(_) => login(&ctx, peer, request).await,
    };
    match outcome {
        Ok(response) => {
            tracing::info!(%peer, %user, "user logged in");
            ctx.audit.record(
                "login",
                serde_json::json!({
                    "success": true, "user": user, "peer": peer.to_string(),
                    "roles": response.roles, "expires": util::rfc3339_unix(response.expires_unix),
                    "ssh_certificate": response.ssh_certificate.is_some(),
                    "ssh_logins": response.ssh_logins,
                }),
            );
            reply(&mut writer, &Reply::Ok(response)).await;
        }
        Err(body) => {
            let blocked = count_failure(&ctx, peer, attempt, &body);
            tracing::info!(%peer, %user, code = %body.code, "login refused");
            ctx.audit.record(
                "login",
                serde_json::json!({
                    "success": false, "user": user, "peer": peer.to_string(), "code": body.code,
                    "source_blocked": blocked,
                }),
            );
            monoio::time::sleep(FAILURE_DELAY).await;
            reply(&mut writer, &Reply::<LoginResponse>::Error(body)).await;
        }
    }
}

async fn login(
    ctx: &Context,
    peer: SocketAddr,
    request: LoginRequest,
) -> Result<LoginResponse, ErrorBody> {
    let key = public_key(&request.public_key)?;
    let state = ctx.store.read().map_err(|e| {
        tracing::error!(error = %e, "cannot read the state file during a login");
        error(
            "internal",
            "the proxy cannot read its state; the operator should check its log",
        )
    })?;
    let user = state.user(&request.user).cloned();
    if let Some(user) = &user {
        refuse_locked(ctx, user)?;
    }
    // An unknown user is checked against a dummy hash: same cost, same answer.
    let hash = user
        .as_ref()
        .map_or_else(|| ctx.dummy_hash.clone(), |u| u.password_hash.clone());
    // A fair queue: a source group runs at most two checks at once, so one group's flood
    // waits behind itself, not in front of everyone else.
    let Some(turn) = ctx
        .guard
        .check_turn(peer.ip(), crate::guard::CHECK_QUEUE_WAIT)
        .await
    else {
        return Err(error(
            "busy",
            "too many logins at once; try again in a moment",
        ));
    };
    ctx.stats.logins.fetch_add(1, Ordering::Relaxed);
    let want_host_ca = request.ssh_host_ca;
    let password = request.password;
    let verified = crate::blocking::run(move || {
        Argon2::default()
            .verify_password(password.as_bytes(), hash.as_str())
            .is_ok()
    })
    .await
    .unwrap_or(false);
    ctx.stats.logins.fetch_sub(1, Ordering::Relaxed);
    drop(turn);
    let user = match user {
        Some(user) if verified => {
            ctx.login_lockout.succeeded(&user.name);
            user
        }
        Some(user) => {
            count_account_failure(ctx, &user.name);
            return Err(error(
                "bad_password",
                format!("wrong user name or password for cluster {}", ctx.cluster),
            ));
        }
        None => {
            return Err(error(
                "bad_password",
                format!("wrong user name or password for cluster {}", ctx.cluster),
            ));
        }
    };
    // The strictest `max_cert_ttl` of the user's roles caps what the client asks for; without
    // a request the user gets that cap (the default lifetime unless a role is stricter).
    let cap = ctx.policy.max_cert_ttl(&user.roles);
    let requested = request.ttl_secs.map_or(cap, Duration::from_secs);
    let ttl = requested.min(cap).max(MIN_USER_TTL);
    let internal = |e: tunnel::identity::IdentityError| {
        tracing::error!(error = %e, "cannot issue a user certificate");
        error("internal", format!("cannot issue the certificate: {e}"))
    };
    let validity = Validity::for_ttl(SystemTime::now(), ttl).map_err(internal)?;
    let leaf = ctx
        .ca
        .issue_user(&user.name, &user.roles, &user.logins, &key, validity)
        .map_err(internal)?;
    let chain = ctx.ca.chain(leaf);
    let ssh_logins = ctx.policy.logins_for(&user.roles, &user.logins);
    let (ssh_certificate, ssh_note) = match &request.ssh_public_key {
        None => (None, None),
        Some(key) => match ctx.ssh_ca.issue(
            key,
            &user.name,
            &ssh_logins,
            validity.not_before(),
            validity.not_after(),
        ) {
            Ok(cert) => (Some(cert), None),
            Err(e @ SshCertError::BadPublicKey(_)) => {
                return Err(error("bad_public_key", e.to_string()));
            }
            Err(e) => (None, Some(e.to_string())),
        },
    };
    Ok(LoginResponse {
        cluster: ctx.cluster.clone(),
        certificate_pem: tunnel::identity::certificates_to_pem(&chain),
        ca_pem: ctx.ca.certificate_pem(),
        expires_unix: util::unix_secs(validity.not_after()),
        roles: user.roles,
        ssh_logins: if ssh_certificate.is_some() {
            ssh_logins
        } else {
            Vec::new()
        },
        ssh_certificate,
        ssh_note,
        ssh_host_ca: if want_host_ca {
            Some(ctx.ssh_host_ca.public_line().map_err(|e| {
                tracing::error!(error = %e, "cannot encode the SSH host CA public key");
                error("internal", "cannot encode the SSH host CA public key")
            })?)
        } else {
            None
        },
    })
}

/// Refuses the login of a user an operator locked (`users lock`) or who is locked out after
/// failed logins, before the password is checked: guessing stops while it lasts.
fn refuse_locked(ctx: &Context, user: &crate::state::User) -> Result<(), ErrorBody> {
    let name = &user.name;
    if let Some(at) = user.locked_unix {
        return Err(error(
            "user_locked",
            format!(
                "user {name} was locked by an operator at {} (`remoteler-proxy users lock`); \
                 ask them to run `remoteler-proxy users unlock {name}`",
                util::rfc3339_unix(at)
            ),
        ));
    }
    if let Some(at) = user.unlocked_unix {
        ctx.login_lockout.unlock_if_before(name, at);
    }
    match ctx.login_lockout.check(name, std::time::Instant::now()) {
        None => Ok(()),
        Some(locked) => Err(error(
            "locked_out",
            format!(
                "user {name} is locked out after {} failed logins in a row \
                 (`limits.login_lockout_failures`) until {} (`limits.login_lockout`); the \
                 password was not checked. Try again then, or ask an operator to run \
                 `remoteler-proxy users unlock {name}`",
                locked.failures,
                util::rfc3339(locked.until)
            ),
        )),
    }
}

/// Counts a wrong password for the existing user `name`; audits the lockout it may start.
fn count_account_failure(ctx: &Context, name: &str) {
    let Some(locked) = ctx.login_lockout.failed(name, std::time::Instant::now()) else {
        return;
    };
    tracing::warn!(
        user = %name, failures = locked.failures, until = %util::rfc3339(locked.until),
        "user locked out after failed logins (`limits.login_lockout_failures`)"
    );
    ctx.audit.record(
        "user.locked_out",
        serde_json::json!({
            "user": name, "failures": locked.failures, "until": util::rfc3339(locked.until),
        }),
    );
}

/// ALPN_REGISTER: heartbeats of a node the proxy dials directly.
pub(super) async fn serve_register(
    ctx: Rc<Context>,
    conn: TlsConnection,
    peer: SocketAddr,
    node: PeerIdentity,
    slot: HandshakeSlot,
) {
    let (mut reader, mut writer) = conn.split();
    let mut buf = BytesMut::new();
    let mut wait = ctx.handshake_timeout();
    // The address of the last accepted heartbeat: a change is audited.
    let mut registered: Option<config::HostPort> = None;
    // Held until the first heartbeat is in.
    let mut slot = Some(slot);
    loop {
        let read = monoio::time::timeout(wait, read_line::<RegisterRequest>(&mut reader, &mut buf));
        let read = match slot.take() {
            Some(slot) => slot.unless_evicted(read).await,
            None => Some(read.await),
        };
        let Some(read) = read else {
            tracing::debug!(%peer, node = %node.name, "evicted from the full handshake table before the first heartbeat");
            break;
        };
        let request = match read {
            Ok(Ok(r)) => r,
            Ok(Err(ControlError::Closed)) => break,
            Ok(Err(e)) => {
                tracing::info!(%peer, node = %node.name, error = %e, "registration stream failed");
                let body = error("bad_request", e.to_string());
                reply(&mut writer, &Reply::<Ack>::Error(body)).await;
                break;
            }
            Err(_) => {
                tracing::info!(%peer, node = %node.name, "no heartbeat in time; closing the registration connection");
                break;
            }
        };
        // A node removed while registered stops here, at its next heartbeat.
        let checked = match ctx.revocations.check(&node) {
            Ok(()) => check_register(&request).and_then(|(address, labels, ttl)| {
                let allowed = RegisterPolicy {
                    networks: &ctx.config.auth.register_networks,
                    listeners: &listener_ports(&ctx.addrs),
                }
                .check(&address, peer.ip(), is_local_address)?;
                let address = config::HostPort::new(&allowed.ip().to_string(), allowed.port())
                    .map_err(|e| error("internal", e.to_string()))?;
                ctx.directory
                    .register_direct(
                        &node.name,
                        address.clone(),
                        labels,
                        ttl,
                        ctx.config.resume.grace,
                    )
                    .map_err(|why| error("name_taken", why))?;
                Ok((address, ttl))
            }),
            Err(why) => Err(error("not_allowed", why)),
        };
        let (address, ttl) = match checked {
            Ok(v) => v,
            Err(body) => {
                tracing::warn!(%peer, node = %node.name, address = %request.ssh_address, code = %body.code, reason = %body.message, "registration refused");
                ctx.audit.record(
                    "node.register",
                    serde_json::json!({
                        "success": false, "node": node.name, "peer": peer.to_string(),
                        "address": request.ssh_address, "code": body.code, "reason": body.message,
                    }),
                );
                reply(&mut writer, &Reply::<Ack>::Error(body)).await;
                break;
            }
        };
        if registered.as_ref() != Some(&address) {
            tracing::info!(%peer, node = %node.name, address = %address, "node registered for direct dialling");
            ctx.audit.record(
                "node.register",
                serde_json::json!({
                    "success": true, "node": node.name, "peer": peer.to_string(),
                    "address": address.to_string(),
                }),
            );
            registered = Some(address);
        }
        wait = ttl + ctx.handshake_timeout();
        let written = monoio::time::timeout(
            Duration::from_secs(10),
            write_line(&mut writer, &Reply::Ok(Ack {})),
        )
        .await;
        if !matches!(written, Ok(Ok(()))) {
            break;
        }
    }
    let _ = monoio::time::timeout(Duration::from_secs(2), writer.close()).await;
}

/// A checked heartbeat: the address to dial, the labels, the lifetime.
pub type Registration = (config::HostPort, Vec<(String, String)>, Duration);

/// The checks of a registration heartbeat: address, lifetime, labels.
pub fn check_register(request: &RegisterRequest) -> Result<Registration, ErrorBody> {
    let address: config::HostPort = request
        .ssh_address
        .parse()
        .map_err(|e| error("bad_request", format!("ssh_address: {e}")))?;
    if !(1..=MAX_REGISTER_TTL_SECS).contains(&request.ttl_secs) {
        return Err(error(
            "bad_request",
            format!(
                "ttl_secs: expected 1 to {MAX_REGISTER_TTL_SECS}, found {}",
                request.ttl_secs
            ),
        ));
    }
    let map: std::collections::BTreeMap<String, String> = request.labels.iter().cloned().collect();
    let labels =
        config::Labels::try_from(map).map_err(|e| error("bad_request", format!("labels: {e}")))?;
    let labels = labels
        .iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    Ok((address, labels, Duration::from_secs(request.ttl_secs)))
}

/// The ports this proxy listens on, and what each is, for [`RegisterPolicy::listeners`].
fn listener_ports(addrs: &super::ListenAddrs) -> Vec<(&'static str, u16)> {
    let mut ports = vec![
        ("listen.users", addrs.users.port()),
        ("listen.tunnels", addrs.tunnels.port()),
        ("listen.auth", addrs.auth.port()),
    ];
    if let Some(metrics) = addrs.metrics {
        ports.push(("listen.metrics", metrics.port()));
    }
    ports
}

/// Whether `ip` is an address of this host: binding a UDP socket to it succeeds only then
/// (no packet is sent). Loopback addresses always are.
fn is_local_address(ip: IpAddr) -> bool {
    ip.is_loopback() || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// What a registering agent may make the proxy dial (`docs/security.md`, "What a node may
/// make the proxy dial"). A node's certificate lets it serve its own name, and nothing else:
/// not another node's sshd, not the proxy's own ports, not a cloud metadata service.
#[derive(Debug, Clone, Copy)]
pub struct RegisterPolicy<'a> {
    /// `auth.register_networks`: where an address may lie besides the agent's own.
    pub networks: &'a [config::IpNetwork],
    /// The ports the proxy listens on, with the key that sets each.
    pub listeners: &'a [(&'static str, u16)],
}

impl RegisterPolicy<'_> {
    /// The address to dial for `address`, registered by an agent connected from `source`, or
    /// why not. `is_local` says whether an IP address is one of this host's.
    pub fn check(
        &self,
        address: &config::HostPort,
        source: IpAddr,
        is_local: impl Fn(IpAddr) -> bool,
    ) -> Result<SocketAddr, ErrorBody> {
        let refuse = |why: String| {
            Err(error(
                "address_not_allowed",
                format!("ssh_address {address}: {why}"),
            ))
        };
        // A host name could resolve elsewhere at each dial; only an address can be checked.
        let Some(ip) = address.ip().map(|ip| ip.to_canonical()) else {
            return refuse(
                "a registration names an IP address, not a host name (the proxy checks it \
                 against the address the agent connects from); set `ssh_address` to the \
                 node's IP address"
                    .into(),
            );
        };
        let source = source.to_canonical();
        if let Some(kind) = never_dialled(ip) {
            return refuse(format!(
                "{kind} addresses are never dialled for a registered node, whatever \
                 `auth.register_networks` lists"
            ));
        }
        if let Some((key, port)) = self
            .listeners
            .iter()
            .find(|(_, port)| *port == address.port())
        {
            if is_local(ip) {
                return refuse(format!(
                    "port {port} of this proxy's host is the proxy's own `{key}` listener; a \
                     registered node is dialled at its sshd"
                ));
            }
        }
        let listed = |loopback_only: bool| {
            self.networks
                .iter()
                .any(|n| n.contains(ip) && (!loopback_only || n.is_loopback()))
        };
        if ip.is_loopback() {
            if listed(true) {
                return Ok(SocketAddr::new(ip, address.port()));
            }
            return refuse(
                "loopback addresses reach the proxy's own host; one is registered only when \
                 `auth.register_networks` lists a loopback network such as \"127.0.0.0/8\" \
                 (an agent on the proxy's host)"
                    .into(),
            );
        }
        if ip == source || listed(false) {
            return Ok(SocketAddr::new(ip, address.port()));
        }
        refuse(format!(
            "not the agent's own address ({source}, where it connects from) and in no network \
             of `auth.register_networks`; register the address the agent connects from, or \
             have the operator list the node's network"
        ))
    }
}

/// Why `ip` is never dialled for a registration, whatever the configuration says.
fn never_dialled(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            if v4.octets()[0] == 0 {
                Some("unspecified (0.0.0.0/8)")
            } else if v4.is_link_local() {
                Some("link-local (169.254.0.0/16, cloud metadata)")
            } else if v4.is_multicast() {
                Some("multicast")
            } else if v4.is_broadcast() {
                Some("broadcast")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.segments()[0] & 0xffc0 == 0xfe80 {
                Some("link-local (fe80::/10)")
            } else if v6.is_multicast() {
                Some("multicast")
            } else {
                None
            }
        }
    }
}

/// ALPN_API: a user's queries.
pub(super) async fn serve_api(
    ctx: Rc<Context>,
    conn: TlsConnection,
    peer: SocketAddr,
    user: PeerIdentity,
    slot: HandshakeSlot,
) {
    let (mut reader, mut writer) = conn.split();
    let mut buf = BytesMut::new();
    let request: ApiRequest = match read_request(&ctx, &mut reader, &mut buf, slot).await {
        Ok(r) => r,
        Err(body) => {
            reply(&mut writer, &Reply::<ApiResponse>::Error(body)).await;
            return;
        }
    };
    tracing::debug!(%peer, user = %user.name, ?request, "api request");
    let response = match request {
        ApiRequest::ListNodes { cluster } => match cluster {
            Some(c) if c != ctx.cluster => super::clusters::list_leaf_nodes(&ctx, &user, &c),
            _ => Reply::Ok(ApiResponse::Nodes(
                ctx.directory
                    .list()
                    .into_iter()
                    .filter(|n| ctx.policy.check(&user, &n.name, &n.labels, "").is_ok())
                    .map(|n| NodeView {
                        name: n.name,
                        via: n.via,
                        online: n.online,
                        labels: n.labels,
                    })
                    .collect(),
            )),
        },
        ApiRequest::ListClusters => Reply::Ok(ApiResponse::Clusters(
            ctx.directory
                .clusters()
                .into_iter()
                .filter(|c| ctx.policy.check_cluster(&user, &c.name).is_ok())
                .map(|c| tunnel::control::ClusterView {
                    name: c.name,
                    online: c.online,
                    nodes: c.nodes,
                })
                .collect(),
        )),
        ApiRequest::SshHostCas => {
            let store = ctx.store.clone();
            match crate::blocking::run(move || store.read()).await {
                Some(Ok(state)) => Reply::Ok(ApiResponse::SshHostCas(
                    state
                        .trusted_leaves
                        .into_iter()
                        .filter(|l| ctx.policy.check_cluster(&user, &l.name).is_ok())
                        .filter_map(|l| Some((l.name, l.ssh_host_ca?)))
                        .collect(),
                )),
                _ => Reply::Error(error(
                    "internal",
                    "the proxy cannot read its state; the operator should check its log",
                )),
            }
        }
        ApiRequest::WhoAmI => Reply::Ok(ApiResponse::WhoAmI {
            user: user.name.clone(),
            cluster: user.cluster.clone(),
            roles: user.roles.clone(),
        }),
    };
    reply(&mut writer, &response).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(networks: &[&str], address: &str, source: &str) -> Result<SocketAddr, String> {
        let networks: Vec<config::IpNetwork> =
            networks.iter().map(|n| n.parse().unwrap()).collect();
        let policy = RegisterPolicy {
            networks: &networks,
            listeners: &[("listen.users", 3023), ("listen.metrics", 3026)],
        };
        // This "host" has 10.0.0.1 and loopback.
        let local = |ip: IpAddr| ip.is_loopback() || ip == IpAddr::from([10, 0, 0, 1]);
        policy
            .check(&address.parse().unwrap(), source.parse().unwrap(), local)
            .map_err(|body| {
                assert_eq!(body.code, "address_not_allowed");
                body.message
            })
    }

    #[test]
    fn an_agent_registers_its_own_address_or_a_listed_network() {
        let own = check(&[], "10.0.0.5:22", "10.0.0.5").unwrap();
        assert_eq!(own, "10.0.0.5:22".parse().unwrap());
        // An IPv4 agent seen through an IPv6 socket is the same address.
        assert!(check(&[], "10.0.0.5:22", "::ffff:10.0.0.5").is_ok());
        let other = check(&[], "10.0.0.6:22", "10.0.0.5").unwrap_err();
        assert!(
            other.contains("not the agent's own address (10.0.0.5"),
            "{other}"
        );
        assert!(check(&["10.0.0.0/24"], "10.0.0.6:22", "10.0.0.5").is_ok());
        assert!(check(&["10.0.0.0/24"], "10.0.1.6:22", "10.0.0.5").is_err());
        assert!(check(&[], "[fd00::5]:22", "fd00::5").is_ok());
        assert!(check(&[], "node-a.internal:22", "10.0.0.5").is_err());
    }

    #[test]
    fn some_addresses_are_never_dialled() {
        let all = ["0.0.0.0/0", "::/0"];
        for (address, says) in [
            ("169.254.169.254:80", "link-local"),
            ("[fe80::1]:22", "link-local"),
            ("0.0.0.0:22", "unspecified"),
            ("[::]:22", "unspecified"),
            ("224.0.0.1:22", "multicast"),
            ("255.255.255.255:22", "broadcast"),
            // The proxy's own ports on any of its addresses.
            ("10.0.0.1:3026", "listen.metrics"),
            ("10.0.0.1:3023", "listen.users"),
            // Loopback needs a loopback network listed, not "everything".
            ("127.0.0.1:22", "loopback"),
            ("[::1]:22", "loopback"),
        ] {
            let source = address.rsplit_once(':').unwrap().0.trim_matches(['[', ']']);
            let why = check(&all, address, source).unwrap_err();
            assert!(why.contains(says), "{address}: {why}");
        }
        // Another host's port 3026 is not the proxy's.
        assert!(check(&all, "10.0.0.9:3026", "10.0.0.5").is_ok());
        assert!(check(&["127.0.0.0/8"], "127.0.0.1:22", "127.0.0.1").is_ok());
        assert!(check(&["127.0.0.0/8"], "127.0.0.1:3026", "127.0.0.1").is_err());
        assert!(check(&["::1/128"], "[::1]:22", "::1").is_ok());
    }
}
