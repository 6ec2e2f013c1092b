//! The running proxy: listeners, TLS, dispatch on ALPN and certificate, draining.
//!
//! One [`Context`] per runtime (per core) holds what handlers need. Nothing here is a
//! global: a later thread-per-core proxy builds one context per core around the same
//! handlers, with a shared [`NodeDirectory`] implementation.

mod control;
mod sessions;
mod tunnels;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use config::ProxyConfig;
use frame::{ErrorCode, Role, Session, SessionConfig};
use monoio::net::{TcpListener, TcpStream};
use tunnel::control::{ALPN_API, ALPN_JOIN, ALPN_LOGIN, ALPN_REGISTER, ALPN_SESSION, ALPN_TUNNEL};
use tunnel::identity::{ClientAuth, ClusterCa, IdentityKind, PeerIdentity, TlsIdentity};
use tunnel::mux::{Tunnel, drive};
use tunnel::tls::{self, TlsConnection};

use crate::admin;
use crate::audit::AuditLog;
use crate::datadir::DataDir;
use crate::directory::{LocalDirectory, NodeDirectory};
use crate::error::ProxyError;
use crate::roles::Policy;
use crate::shutdown::Shutdown;
use crate::sshca::SshUserCa;
use crate::state::StateStore;

/// The addresses the proxy listens on, as bound (port 0 resolved).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddrs {
    /// Users' listener.
    pub users: SocketAddr,
    /// Tunnels' listener.
    pub tunnels: SocketAddr,
    /// Auth listener.
    pub auth: SocketAddr,
}

impl std::fmt::Display for ListenAddrs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "users={} tunnels={} auth={}",
            self.users, self.tunnels, self.auth
        )
    }
}

/// Sockets bound before the runtime starts, so a caller (a test) can bind port 0 and read
/// the addresses back, and so "address in use" is reported before anything else happens.
#[derive(Debug)]
pub struct Listeners {
    users: std::net::TcpListener,
    tunnels: std::net::TcpListener,
    auth: std::net::TcpListener,
    admin: std::os::unix::net::UnixListener,
    admin_path: std::path::PathBuf,
}

/// Listen queue length: a proxy whose agents all reconnect at once (a restart) must not
/// drop SYNs (the load test saw thousands of listen overflows with the default of 128, each
/// costing the agent a 1 s TCP retransmit). The kernel caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: i32 = 4096;

/// A bound, listening TCP socket with [`LISTEN_BACKLOG`].
fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

impl Listeners {
    /// Binds the three TCP listeners of `config.listen` and the admin socket in the data
    /// directory. Refuses to start when another proxy already answers on the admin socket.
    pub fn bind(config: &ProxyConfig) -> Result<Listeners, ProxyError> {
        let bind = |addr: SocketAddr, key: &str| {
            listen(addr).map_err(|e| {
                ProxyError::Other(format!(
                    "cannot listen on {addr} (`listen.{key}`): {e}; is another proxy running, \
                     or is the port taken? Pick another address with --{key} or in the config file"
                ))
            })
        };
        let users = bind(config.listen.users, "users")?;
        let tunnels = bind(config.listen.tunnels, "tunnels")?;
        let auth = bind(config.listen.auth, "auth")?;
        let data = DataDir::new(&config.data_dir);
        let (admin, admin_path) = admin::bind(&data)?;
        for l in [&users, &tunnels, &auth] {
            l.set_nonblocking(true).map_err(|e| {
                ProxyError::Other(format!("cannot set a listener non-blocking: {e}"))
            })?;
        }
        Ok(Listeners {
            users,
            tunnels,
            auth,
            admin,
            admin_path,
        })
    }

    /// The bound addresses.
    pub fn addrs(&self) -> Result<ListenAddrs, ProxyError> {
        let addr = |l: &std::net::TcpListener| {
            l.local_addr()
                .map_err(|e| ProxyError::Other(format!("cannot read a listener's address: {e}")))
        };
        Ok(ListenAddrs {
            users: addr(&self.users)?,
            tunnels: addr(&self.tunnels)?,
            auth: addr(&self.auth)?,
        })
    }
}

/// Counters for `status`.
#[derive(Debug, Default)]
pub struct Stats {
    /// Sessions (user streams to nodes) running now.
    pub sessions_active: Cell<u64>,
    /// Sessions since start.
    pub sessions_total: Cell<u64>,
    /// Connections in the TLS handshake (or the first request) now.
    pub handshakes: Cell<u32>,
    /// Logins verifying a password now.
    pub logins: Cell<u32>,
}

/// What every handler of one runtime shares.
pub struct Context {
    /// Cluster name.
    pub cluster: String,
    /// The cluster CA.
    pub ca: Arc<ClusterCa>,
    /// `sha256:...` of the CA.
    pub ca_pin: String,
    /// The configuration.
    pub config: ProxyConfig,
    /// Tokens and users.
    pub store: StateStore,
    /// The audit log.
    pub audit: Arc<AuditLog>,
    /// The roles: who may reach which node as which login.
    pub policy: Policy,
    /// The SSH user CA, for the SSH certificates issued at login.
    pub ssh_ca: Arc<SshUserCa>,
    /// Nodes.
    pub directory: Rc<dyn NodeDirectory>,
    /// Counters.
    pub stats: Stats,
    /// When the proxy started.
    pub started: Instant,
    /// Bound addresses.
    pub addrs: ListenAddrs,
    /// Stop request.
    pub shutdown: Shutdown,
    /// Set once draining began: no new tunnels or sessions.
    pub draining: Cell<bool>,
    /// Agents' tunnels whose connection was lost, by node, waiting for the agent to come back
    /// within `resume.grace` and resume them.
    pub detached: RefCell<HashMap<String, Rc<tunnels::Detached>>>,
    /// Users' session connections, for GOAWAY on drain.
    user_tunnels: RefCell<HashMap<u64, Tunnel>>,
    user_tunnel_ids: Cell<u64>,
    /// An argon2 hash with the default parameters, verified against for unknown users so a
    /// wrong user name costs the same time as a wrong password.
    pub dummy_hash: String,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("cluster", &self.cluster)
            .field("addrs", &self.addrs)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// Session settings for the proxy's side of a tunnel or user connection.
    pub fn session_config(&self) -> SessionConfig {
        let c = &self.config;
        let mut s = SessionConfig::new(Role::Proxy, false);
        s.initial_window = c.flow.window();
        s.max_frame = c.flow.max_frame();
        s.max_streams = c.limits.max_streams_per_tunnel;
        s.max_pending_opens = c.limits.max_pending_opens;
        s.max_announce = c.limits.max_announce_bytes;
        s.keepalive_interval = c.keepalive.interval;
        s.keepalive_count = c.keepalive.count;
        // The user's leg does not resume yet (`remoteler proxy ssh` does not reconnect);
        // agents' tunnels do: see `tunnel_session_config`.
        s.resume_grace = Duration::ZERO;
        s
    }

    /// Session settings for an agent's tunnel: like `session_config`, but a lost connection
    /// detaches the session for `resume.grace` so the agent can come back and resume it.
    pub fn tunnel_session_config(&self) -> SessionConfig {
        let mut s = self.session_config();
        s.resume_grace = self.config.resume.grace;
        s
    }

    /// A new session with a random id.
    pub fn new_session(&self) -> Session {
        Session::new(self.session_config(), self.session_id(), Instant::now())
    }

    /// A new session for an agent's tunnel (resumable).
    pub fn new_tunnel_session(&self) -> Session {
        Session::new(
            self.tunnel_session_config(),
            self.session_id(),
            Instant::now(),
        )
    }

    fn session_id(&self) -> [u8; 16] {
        crate::util::random_bytes::<16>().unwrap_or_else(|_| {
            // The id tells sessions apart in logs and names a tunnel's session when its agent
            // resumes it (only among that node's own sessions); the time is unique enough.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            nanos.to_le_bytes()
        })
    }

    /// The handshake deadline.
    pub fn handshake_timeout(&self) -> Duration {
        self.config.limits.handshake_timeout
    }

    fn add_user_tunnel(&self, tunnel: &Tunnel) -> u64 {
        let id = self.user_tunnel_ids.get() + 1;
        self.user_tunnel_ids.set(id);
        self.user_tunnels.borrow_mut().insert(id, tunnel.clone());
        id
    }

    fn remove_user_tunnel(&self, id: u64) {
        self.user_tunnels.borrow_mut().remove(&id);
    }
}

fn dummy_hash() -> String {
    let p = argon2::Params::default();
    // Any well-formed salt and output: verifying against it costs one full argon2 run.
    format!(
        "$argon2id$v=19$m={},t={},p={}$c29tZXNhbHRzb21lc2FsdA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        p.m_cost(),
        p.t_cost(),
        p.p_cost()
    )
}

/// Which listener a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ListenerKind {
    Users,
    Tunnels,
    Auth,
}

impl ListenerKind {
    fn name(self) -> &'static str {
        match self {
            ListenerKind::Users => "users",
            ListenerKind::Tunnels => "tunnels",
            ListenerKind::Auth => "auth",
        }
    }

    fn alpn(self) -> Vec<Vec<u8>> {
        let list: &[&[u8]] = match self {
            ListenerKind::Users => &[ALPN_SESSION, ALPN_API, ALPN_LOGIN],
            ListenerKind::Tunnels => &[ALPN_TUNNEL, ALPN_JOIN],
            ListenerKind::Auth => &[ALPN_REGISTER, ALPN_JOIN],
        };
        list.iter().map(|p| p.to_vec()).collect()
    }
}

/// Runs the proxy on the current monoio runtime until `shutdown` is triggered and the drain
/// is over. Prints `ready users=.. tunnels=.. auth=..` on stdout and writes the same line to
/// `<data_dir>/proxy.ready` once every listener accepts.
pub async fn run(
    config: ProxyConfig,
    listeners: Listeners,
    shutdown: Shutdown,
) -> Result<(), ProxyError> {
    let data = DataDir::new(&config.data_dir);
    let ca = ClusterCa::load(data.root()).map_err(|e| match e {
        tunnel::identity::IdentityError::ReadFile { .. } if !data.ca_key().exists() => {
            ProxyError::NotInitialized {
                dir: data.root().to_owned(),
                file: tunnel::identity::CA_KEY_FILE,
            }
        }
        other => ProxyError::Identity(other),
    })?;
    if ca.cluster() != config.cluster_name.as_str() {
        return Err(ProxyError::Other(format!(
            "the configuration says cluster_name = {:?} but the CA in {} belongs to cluster {:?}; \
             fix `cluster_name` or point `data_dir` at the right cluster",
            config.cluster_name.as_str(),
            data.root().display(),
            ca.cluster()
        )));
    }
    let identity = TlsIdentity::load(&data.proxy_cert(), &data.proxy_key())?;
    let server = |kind: ListenerKind| -> Result<Arc<rustls::ServerConfig>, ProxyError> {
        let mut c = tunnel::identity::server_config(
            std::slice::from_ref(ca.certificate()),
            identity.chain.clone(),
            &identity.key,
            ClientAuth::Optional,
        )?;
        c.alpn_protocols = kind.alpn();
        Ok(Arc::new(c))
    };
    let tls_users = server(ListenerKind::Users)?;
    let tls_tunnels = server(ListenerKind::Tunnels)?;
    let tls_auth = server(ListenerKind::Auth)?;
    let audit = Arc::new(AuditLog::open(&config.audit.path)?);
    let store = StateStore::new(data.clone());
    store.read()?; // fail now, not at the first join, if the state file is bad
    let addrs = listeners.addrs()?;

    let policy = Policy::new(&config.roles);
    let (ssh_ca, created) = SshUserCa::load_or_create(data.root(), ca.cluster())?;
    if created {
        tracing::info!(
            path = %SshUserCa::path(data.root()).display(),
            "created the SSH user CA (this data directory predates SSH certificates); \
             `remoteler-proxy export ssh-user-ca` prints the line for sshd's TrustedUserCAKeys"
        );
    }
    let ctx = Rc::new(Context {
        policy,
        ssh_ca: Arc::new(ssh_ca),
        cluster: ca.cluster().to_owned(),
        ca_pin: ca.pin().to_string(),
        ca: Arc::new(ca),
        directory: Rc::new(LocalDirectory::new(config.nodes.clone())),
        config,
        store,
        audit,
        stats: Stats::default(),
        started: Instant::now(),
        addrs,
        shutdown: shutdown.clone(),
        draining: Cell::new(false),
        detached: RefCell::new(HashMap::new()),
        user_tunnels: RefCell::new(HashMap::new()),
        user_tunnel_ids: Cell::new(0),
        dummy_hash: dummy_hash(),
    });

    let to_monoio = |l: std::net::TcpListener| {
        TcpListener::from_std(l).map_err(|e| {
            ProxyError::Other(format!("cannot register a listener with the runtime: {e}"))
        })
    };
    let users = to_monoio(listeners.users)?;
    let tunnels = to_monoio(listeners.tunnels)?;
    let auth = to_monoio(listeners.auth)?;
    let admin_listener = monoio::net::UnixListener::from_std(listeners.admin)
        .map_err(|e| ProxyError::Other(format!("cannot register the admin socket: {e}")))?;
    let admin_path = listeners.admin_path;

    let loops = vec![
        monoio::spawn(accept_loop(
            ctx.clone(),
            users,
            tls_users,
            ListenerKind::Users,
        )),
        monoio::spawn(accept_loop(
            ctx.clone(),
            tunnels,
            tls_tunnels,
            ListenerKind::Tunnels,
        )),
        monoio::spawn(accept_loop(ctx.clone(), auth, tls_auth, ListenerKind::Auth)),
        monoio::spawn(admin::serve(ctx.clone(), admin_listener)),
    ];

    let ready = format!("ready {addrs}");
    crate::state::write_atomic(&data.ready_file(), format!("{ready}\n").as_bytes(), 0o644)?;
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{ready}");
        let _ = out.flush();
    }
    tracing::info!(
        cluster = %ctx.cluster,
        users = %addrs.users,
        tunnels = %addrs.tunnels,
        auth = %addrs.auth,
        "proxy ready"
    );

    shutdown.wait().await;
    drain(&ctx).await;
    for l in loops {
        l.await;
    }
    let _ = std::fs::remove_file(data.ready_file());
    let _ = std::fs::remove_file(&admin_path);
    tracing::info!("proxy stopped");
    Ok(())
}

async fn drain(ctx: &Rc<Context>) {
    ctx.draining.set(true);
    let deadline = Instant::now() + ctx.config.drain.timeout;
    let tunnels = ctx.directory.tunnels();
    tracing::info!(
        tunnels = tunnels.len(),
        sessions = ctx.stats.sessions_active.get(),
        timeout_secs = ctx.config.drain.timeout.as_secs(),
        "draining: GOAWAY to every tunnel and user connection"
    );
    for t in &tunnels {
        t.goaway("proxy shutting down");
    }
    // Tunnels waiting for their agent to resume them will not be resumed by this process.
    for (_, waiting) in ctx.detached.borrow_mut().drain() {
        waiting.cancel();
        waiting
            .tunnel
            .close(ErrorCode::GOING_AWAY, "proxy shutting down");
    }
    let users: Vec<Tunnel> = ctx.user_tunnels.borrow().values().cloned().collect();
    for t in &users {
        t.goaway("proxy shutting down");
    }
    while ctx.stats.sessions_active.get() > 0 && Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(50)).await;
    }
    if ctx.stats.sessions_active.get() > 0 {
        tracing::warn!(
            sessions = ctx.stats.sessions_active.get(),
            "drain timeout (`drain.timeout`) passed; closing the remaining sessions"
        );
    }
    for t in ctx.directory.tunnels() {
        t.close(ErrorCode::GOING_AWAY, "proxy stopped");
    }
    let users: Vec<Tunnel> = ctx.user_tunnels.borrow().values().cloned().collect();
    for t in users {
        t.close(ErrorCode::GOING_AWAY, "proxy stopped");
    }
    // Let the drivers flush their GOAWAYs.
    let flush_deadline = Instant::now() + Duration::from_secs(2);
    while (ctx.directory.tunnel_count() > 0 || !ctx.user_tunnels.borrow().is_empty())
        && Instant::now() < flush_deadline
    {
        monoio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn accept_loop(
    ctx: Rc<Context>,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    kind: ListenerKind,
) {
    loop {
        let accepted = monoio::select! {
            a = listener.accept() => a,
            _ = ctx.shutdown.wait() => break,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let limit = ctx.config.limits.max_handshakes_in_progress;
                if ctx.stats.handshakes.get() >= limit {
                    tracing::warn!(
                        %peer,
                        listener = kind.name(),
                        limit,
                        "too many handshakes in progress (`limits.max_handshakes_in_progress`); dropping the connection"
                    );
                    continue;
                }
                monoio::spawn(handle_connection(ctx.clone(), tcp, peer, tls.clone(), kind));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(listener = kind.name(), error = %e, "accept failed");
                monoio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    tracing::debug!(listener = kind.name(), "stopped accepting");
}

/// Holds one of `limits.max_handshakes_in_progress` while alive.
struct HandshakeSlot<'a>(&'a Stats);

impl<'a> HandshakeSlot<'a> {
    fn take(stats: &'a Stats) -> Self {
        stats.handshakes.set(stats.handshakes.get() + 1);
        HandshakeSlot(stats)
    }
}

impl Drop for HandshakeSlot<'_> {
    fn drop(&mut self) {
        self.0
            .handshakes
            .set(self.0.handshakes.get().saturating_sub(1));
    }
}

async fn handle_connection(
    ctx: Rc<Context>,
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    kind: ListenerKind,
) {
    let slot = HandshakeSlot::take(&ctx.stats);
    // This task lives as long as its connection (a tunnel: days): everything but the tunnel's
    // own service is boxed so that the task is not sized for the largest of them.
    let conn = match Box::pin(tls::accept(tcp, tls, ctx.handshake_timeout())).await {
        Ok(conn) => conn,
        Err(e) => {
            if e.is_certificate_error() {
                tracing::warn!(%peer, listener = kind.name(), error = %e, "tls handshake refused: bad client certificate");
            } else {
                tracing::debug!(%peer, listener = kind.name(), error = %e, "tls handshake failed");
            }
            return;
        }
    };
    drop(slot);
    let alpn = conn.alpn_protocol().unwrap_or_default();
    let identity = conn
        .peer_certificates()
        .and_then(|chain| chain.into_iter().next())
        .map(|leaf| PeerIdentity::from_der(&leaf));
    let protocol = String::from_utf8_lossy(&alpn).into_owned();
    match (kind, alpn.as_slice()) {
        (ListenerKind::Tunnels | ListenerKind::Auth, p) if p == ALPN_JOIN => {
            Box::pin(control::serve_join(ctx, conn, peer)).await;
        }
        (ListenerKind::Users, p) if p == ALPN_LOGIN => {
            Box::pin(control::serve_login(ctx, conn, peer)).await;
        }
        (ListenerKind::Tunnels, p) if p == ALPN_TUNNEL => {
            match check_identity(&ctx, identity, IdentityKind::Node) {
                // A task of its own, sized for the tunnel only: this one (sized for the
                // handshake and every other protocol) ends here and frees its memory.
                Ok(id) => drop(monoio::spawn(tunnels::serve_tunnel(ctx, conn, peer, id))),
                Err(why) => Box::pin(refuse_frames(&ctx, conn, peer, &protocol, &why)).await,
            }
        }
        (ListenerKind::Users, p) if p == ALPN_SESSION => {
            match check_identity(&ctx, identity, IdentityKind::User) {
                Ok(id) => Box::pin(sessions::serve_session(ctx, conn, peer, id)).await,
                Err(why) => Box::pin(refuse_frames(&ctx, conn, peer, &protocol, &why)).await,
            }
        }
        (ListenerKind::Users, p) if p == ALPN_API => {
            match check_identity(&ctx, identity, IdentityKind::User) {
                Ok(id) => Box::pin(control::serve_api(ctx, conn, peer, id)).await,
                Err(why) => {
                    Box::pin(control::refuse_line(
                        &ctx,
                        conn,
                        peer,
                        &protocol,
                        "not_allowed",
                        &why,
                    ))
                    .await
                }
            }
        }
        (ListenerKind::Auth, p) if p == ALPN_REGISTER => {
            match check_identity(&ctx, identity, IdentityKind::Node) {
                Ok(id) => Box::pin(control::serve_register(ctx, conn, peer, id)).await,
                Err(why) => {
                    Box::pin(control::refuse_line(
                        &ctx,
                        conn,
                        peer,
                        &protocol,
                        "not_allowed",
                        &why,
                    ))
                    .await
                }
            }
        }
        _ => {
            tracing::info!(
                %peer,
                listener = kind.name(),
                alpn = %protocol,
                "connection without a protocol this listener serves; closing"
            );
            let mut conn = conn;
            let _ = Box::pin(monoio::time::timeout(Duration::from_secs(1), conn.close())).await;
        }
    }
}

/// Checks that a verified client certificate is of `kind` and of our cluster.
fn check_identity(
    ctx: &Context,
    identity: Option<Result<PeerIdentity, tunnel::identity::IdentityError>>,
    kind: IdentityKind,
) -> Result<PeerIdentity, String> {
    let identity = match identity {
        None => {
            return Err(format!(
                "a {} certificate of cluster {} is required here and none was presented",
                kind.as_str(),
                ctx.cluster
            ));
        }
        Some(Err(e)) => {
            return Err(format!(
                "the client certificate is not a Remoteler identity: {e}"
            ));
        }
        Some(Ok(id)) => id,
    };
    if identity.cluster != ctx.cluster {
        return Err(format!(
            "the certificate belongs to cluster {:?}, this is cluster {:?}",
            identity.cluster, ctx.cluster
        ));
    }
    if identity.kind != kind {
        return Err(format!(
            "a {} certificate is required here; {:?} presented a {} certificate",
            kind.as_str(),
            identity.name,
            identity.kind.as_str()
        ));
    }
    Ok(identity)
}

/// Refuses a frame-protocol connection: the peer gets HELLO and a GOAWAY naming the reason.
async fn refuse_frames(
    ctx: &Context,
    conn: TlsConnection,
    peer: SocketAddr,
    protocol: &str,
    why: &str,
) {
    tracing::warn!(%peer, alpn = %protocol, reason = %why, "connection refused");
    ctx.audit.record(
        "access.denied",
        serde_json::json!({ "peer": peer.to_string(), "protocol": protocol, "reason": why }),
    );
    let tunnel = Tunnel::new(ctx.new_session());
    tunnel.close(ErrorCode::ACCESS_DENIED, why);
    let _ = monoio::time::timeout(
        Duration::from_secs(5),
        drive(&tunnel, conn, BytesMut::new()),
    )
    .await;
}
