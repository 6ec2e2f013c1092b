//! The running proxy: listeners, TLS, dispatch on ALPN and certificate, draining.
//!
//! Thread-per-core: [`run`] starts one thread per worker, each with its own monoio runtime
//! (io_uring, epoll where io_uring is missing), its own `SO_REUSEPORT` listeners and its own
//! [`Context`]. A node's tunnel lives on the node's owner core
//! ([`NodeDirectory::owner_core`]); a connection that lands on another core is moved there
//! (socket and TLS state together, `Handoff`) once it is authenticated and, for a user,
//! once its first OPEN names the node, so a session's bytes never cross threads. The
//! [`NodeDirectory`], the counters, the audit log and the state file are what cores share.

mod clusters;
mod control;
mod hostcert;
mod resume;
mod sessions;
mod tunnels;

/// The checks the proxy applies to the requests it reads before authentication, as far as
/// they need no runtime and no state; public for the `control_lines` fuzz target.
#[doc(hidden)]
pub mod checks {
    pub use super::clusters::{check_cluster_join, check_ssh_host_ca};
    pub use super::control::{Registration, check_join, check_register, public_key};
}

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use config::ProxyConfig;
use frame::{ErrorCode, Role, Session, SessionConfig};
use monoio::net::{TcpListener, TcpStream};
use tunnel::control::{
    ALPN_API, ALPN_CLUSTER_JOIN, ALPN_HOSTCERT, ALPN_JOIN, ALPN_LOGIN, ALPN_REGISTER, ALPN_SESSION,
    ALPN_TUNNEL,
};
use tunnel::identity::{ClientAuth, ClusterCa, IdentityKind, PeerIdentity, TlsIdentity};
use tunnel::mux::{Tunnel, drive};
use tunnel::tls::{self, TlsConnection, TransferableTls};

use self::sessions::FirstRequest;
use crate::admin;
use crate::audit::AuditLog;
use crate::datadir::DataDir;
use crate::directory::{CoreDirectory, NodeDirectory};
use crate::error::ProxyError;
use crate::roles::Policy;
use crate::shutdown::Shutdown;
use crate::sshca::{SshHostCa, SshUserCa};
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
    /// Prometheus metrics, unless `listen.metrics = "off"`.
    pub metrics: Option<SocketAddr>,
}

impl std::fmt::Display for ListenAddrs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "users={} tunnels={} auth={}",
            self.users, self.tunnels, self.auth
        )?;
        if let Some(metrics) = self.metrics {
            write!(f, " metrics={metrics}")?;
        }
        Ok(())
    }
}

/// One worker's TCP listeners.
#[derive(Debug)]
struct WorkerListeners {
    users: std::net::TcpListener,
    tunnels: std::net::TcpListener,
    auth: std::net::TcpListener,
}

/// Sockets bound before the runtimes start, so a caller (a test) can bind port 0 and read
/// the addresses back, and so "address in use" is reported before anything else happens.
/// Each worker gets its own listener of each kind, on the same address (`SO_REUSEPORT`: the
/// kernel spreads connections over them).
#[derive(Debug)]
pub struct Listeners {
    workers: Vec<WorkerListeners>,
    metrics: Option<std::net::TcpListener>,
    admin: std::os::unix::net::UnixListener,
    admin_path: std::path::PathBuf,
}

/// Listen queue length: a proxy whose agents all reconnect at once (a restart) must not
/// drop SYNs (the load test saw thousands of listen overflows with the default of 128, each
/// costing the agent a 1 s TCP retransmit). The kernel caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: i32 = 4096;

fn socket_for(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    Ok(socket)
}

/// `count` listening sockets on `addr` sharing it with `SO_REUSEPORT`, non-blocking, with
/// [`LISTEN_BACKLOG`]. `SO_REUSEPORT` would let a second proxy (of the same user) silently
/// share the port, so the address is first bound once without it: that fails while anyone
/// listens there.
fn listen_shared(addr: SocketAddr, count: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    if addr.port() != 0 {
        let probe = socket_for(addr)?;
        probe.bind(&addr.into())?;
    }
    let mut bound = addr;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let socket = socket_for(bound)?;
        socket.set_reuse_port(true)?;
        socket.bind(&bound.into())?;
        socket.listen(LISTEN_BACKLOG)?;
        socket.set_nonblocking(true)?;
        let listener: std::net::TcpListener = socket.into();
        bound = listener.local_addr()?; // port 0 resolved by the first
        out.push(listener);
    }
    Ok(out)
}

/// `TCP_DEFER_ACCEPT` for about `hello`: the kernel hands a connection to `accept` only once
/// its first bytes (the ClientHello) have arrived, or that time has passed. A connection that
/// sends nothing waits in the kernel, not in the accept queue ahead of clients that speak,
/// and takes no handshake slot meanwhile. Best effort: without it, the hello deadline alone
/// applies.
fn defer_accept(listener: &std::net::TcpListener, hello: Duration) {
    use std::os::fd::AsRawFd;
    let secs = libc::c_int::try_from(hello.as_secs().max(1)).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt on a listening socket we own, with a live c_int of the right size.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&secs as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "TCP_DEFER_ACCEPT not set");
    }
}

impl Listeners {
    /// Binds the three TCP listeners of `config.listen` (one of each per worker, see
    /// `workers`) and the admin socket in the data directory. Refuses to start when another
    /// process listens on one of the ports or another proxy answers on the admin socket.
    pub fn bind(config: &ProxyConfig) -> Result<Listeners, ProxyError> {
        let workers = config.workers.resolve().get();
        let bind = |addr: SocketAddr, key: &str| {
            let listeners = listen_shared(addr, workers).map_err(|e| {
                ProxyError::Other(format!(
                    "cannot listen on {addr} (`listen.{key}`): {e}; is another proxy running, \
                     or is the port taken? Pick another address with --{key} or in the config file"
                ))
            })?;
            for l in &listeners {
                defer_accept(l, config.limits.hello_timeout);
            }
            Ok::<_, ProxyError>(listeners)
        };
        let users = bind(config.listen.users, "users")?;
        let tunnels = bind(config.listen.tunnels, "tunnels")?;
        let auth = bind(config.listen.auth, "auth")?;
        let metrics = match config.listen.metrics.addr() {
            None => None,
            Some(addr) => Some(listen_shared(addr, 1).map_err(|e| {
                ProxyError::Other(format!(
                    "cannot listen on {addr} (`listen.metrics`): {e}; pick another address with \
                     --metrics or `listen.metrics`, or turn metrics off with `--metrics off`"
                ))
            })?.remove(0)),
        };
        let data = DataDir::new(&config.data_dir);
        let (admin, admin_path) = admin::bind(&data)?;
        let workers = users
            .into_iter()
            .zip(tunnels)
            .zip(auth)
            .map(|((users, tunnels), auth)| WorkerListeners {
                users,
                tunnels,
                auth,
            })
            .collect();
        Ok(Listeners {
            workers,
            metrics,
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
        let first = self
            .workers
            .first()
            .ok_or_else(|| ProxyError::Other("no worker listeners bound".into()))?;
        Ok(ListenAddrs {
            users: addr(&first.users)?,
            tunnels: addr(&first.tunnels)?,
            auth: addr(&first.auth)?,
            metrics: self.metrics.as_ref().map(addr).transpose()?,
        })
    }

    /// How many workers the listeners were bound for.
    pub fn workers(&self) -> usize {
        self.workers.len()
    }
}

/// Counters for `status` and the metrics, shared by every core. Relaxed atomics: they are
/// statistics, ordered with nothing else.
#[derive(Debug, Default)]
pub struct Stats {
    /// Sessions (user streams to nodes) running now.
    pub sessions_active: AtomicU64,
    /// Sessions since start.
    pub sessions_total: AtomicU64,
    /// Connections in the TLS handshake (or the first request) now.
    pub handshakes: AtomicU32,
    /// Logins verifying a password now.
    pub logins: AtomicU32,
    /// Connections moved to their owner core since start.
    pub handoffs: AtomicU64,
    /// TLS handshakes completed.
    pub handshakes_ok: AtomicU64,
    /// TLS handshakes refused for the client's certificate.
    pub handshakes_bad_certificate: AtomicU64,
    /// TLS handshakes failed otherwise (timeout, garbage, connection lost).
    pub handshakes_failed: AtomicU64,
    /// Connections dropped at accept: `limits.max_handshakes_in_progress`.
    pub dropped_handshake_limit: AtomicU64,
    /// Connections dropped at accept: `limits.max_handshakes_per_source`.
    pub dropped_source_handshake_limit: AtomicU64,
    /// Addresses refused joins and logins after too many failures.
    pub auth_sources_blocked: AtomicU64,
    /// Tunnels refused: `limits.max_tunnels`.
    pub dropped_tunnel_limit: AtomicU64,
    /// Tunnels and sessions refused while draining.
    pub dropped_draining: AtomicU64,
    /// Connections refused for their certificate's identity, or a tunnel's ANNOUNCE.
    pub dropped_access_denied: AtomicU64,
    /// Failed accepts (out of descriptors, mostly).
    pub accept_errors: AtomicU64,
    /// Tunnels connected (not counting resumptions).
    pub tunnels_connected: AtomicU64,
    /// Tunnels resumed.
    pub tunnels_resumed: AtomicU64,
    /// Users' connections and leaf clusters' tunnels detached (their connection lost).
    pub connections_detached: [AtomicU64; 2],
    /// Users' connections and leaf clusters' tunnels resumed.
    pub connections_resumed: [AtomicU64; 2],
    /// Tunnels ended.
    pub tunnels_disconnected: AtomicU64,
    /// Bytes from users, counted when their sessions end.
    pub bytes_from_users: AtomicU64,
    /// Bytes to users, counted when their sessions end.
    pub bytes_to_users: AtomicU64,
    /// Session requests refused, by error code name.
    refusals: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    /// Each core's thread id, for its CPU time in `/proc`.
    core_threads: Vec<std::sync::atomic::AtomicI32>,
}

impl Stats {
    /// Counters for `workers` cores.
    pub fn new(workers: usize) -> Self {
        Stats {
            core_threads: (0..workers)
                .map(|_| std::sync::atomic::AtomicI32::new(0))
                .collect(),
            ..Default::default()
        }
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Adds one to a counter.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a refused session request.
    pub fn refused(&self, code: frame::ErrorCode) {
        let mut map = self
            .refusals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // "connect failed" -> "connect_failed": a label value a query can type.
        *map.entry(code.name().replace(' ', "_")).or_default() += 1;
    }

    /// Refused session requests by code name.
    pub fn refusals(&self) -> Vec<(String, u64)> {
        let map = self
            .refusals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// Records the calling thread as core `core`'s.
    fn register_core_thread(&self, core: usize) {
        if let Some(slot) = self.core_threads.get(core) {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            slot.store(tid, Ordering::Relaxed);
        }
    }

    /// User + system CPU time of core `core`'s thread, in clock ticks; 0 when unknown.
    pub fn core_cpu_ticks(&self, core: usize) -> u64 {
        let Some(tid) = self
            .core_threads
            .get(core)
            .map(|t| t.load(Ordering::Relaxed))
        else {
            return 0;
        };
        if tid == 0 {
            return 0;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")) else {
            return 0;
        };
        // Fields after the parenthesised name: state is field 3; utime and stime are 14, 15.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            return 0;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        field(11) + field(12)
    }
}

/// A connection on its way to the core that owns its node (see the module documentation), or
/// an order for that core.
pub(crate) enum Handoff {
    /// Close the node's tunnel: the node was removed.
    CloseNode { node: String, reason: String },
    /// Close this cluster's user's connections (attached or waiting to be resumed) whose
    /// certificate is no longer accepted: the user was removed or locked. Sent to every core.
    CloseUser { user: String },
    /// An agent's tunnel, authenticated.
    Tunnel {
        conn: TransferableTls,
        peer: SocketAddr,
        identity: PeerIdentity,
    },
    /// A leaf cluster's tunnel resuming a session this core holds; `input` holds its HELLO.
    ClusterTunnel {
        conn: TransferableTls,
        input: BytesMut,
        peer: SocketAddr,
        identity: PeerIdentity,
    },
    /// A user's connection, authenticated; `input` holds the frames read so far (HELLO and
    /// the first OPEN), which the session still has to process.
    Session {
        conn: TransferableTls,
        input: BytesMut,
        peer: SocketAddr,
        identity: PeerIdentity,
    },
}

/// A user's connection being served on this core.
struct UserConnection {
    tunnel: Tunnel,
    /// Whose it is (only the same user may resume it), with the certificate it was last
    /// attached with: checked again when the user is removed or locked.
    identity: PeerIdentity,
}

/// What the cores share, built once by [`run`].
#[derive(Clone)]
struct Shared {
    cluster: String,
    ca: Arc<ClusterCa>,
    ca_pin: String,
    config: Arc<ProxyConfig>,
    store: StateStore,
    audit: Arc<AuditLog>,
    guard: Arc<crate::guard::SourceGuard>,
    revocations: Arc<crate::revocation::Revocations>,
    login_lockout: Arc<crate::lockout::LoginLockout>,
    state_writer: Arc<crate::state_writer::StateWriter>,
    policy: Arc<Policy>,
    ssh_ca: Arc<SshUserCa>,
    ssh_host_ca: Arc<SshHostCa>,
    directory: Arc<NodeDirectory>,
    stats: Arc<Stats>,
    started: Instant,
    addrs: ListenAddrs,
    shutdown: Shutdown,
    dummy_hash: String,
    inboxes: Arc<[flume::Sender<Handoff>]>,
    session_homes: Arc<resume::SessionHomes>,
    tls_users: Arc<rustls::ServerConfig>,
    tls_tunnels: Arc<rustls::ServerConfig>,
    tls_auth: Arc<rustls::ServerConfig>,
    /// The state file's modification time when it was read at start.
    state_modified: Option<std::time::SystemTime>,
}

/// What every handler of one runtime (one core) shares.
pub struct Context {
    /// This core's index, 0 to `workers - 1`.
    pub core: usize,
    /// Cluster name.
    pub cluster: String,
    /// The cluster CA.
    pub ca: Arc<ClusterCa>,
    /// `sha256:...` of the CA.
    pub ca_pin: String,
    /// The configuration.
    pub config: Arc<ProxyConfig>,
    /// Tokens and users.
    pub store: StateStore,
    /// The audit log.
    pub audit: Arc<AuditLog>,
    /// Per-address limits: handshakes, failed joins and logins.
    pub guard: Arc<crate::guard::SourceGuard>,
    /// Removed nodes, removed and locked users.
    pub revocations: Arc<crate::revocation::Revocations>,
    /// Accounts locked out after failed logins.
    pub login_lockout: Arc<crate::lockout::LoginLockout>,
    /// Saves changes to the state file (token uses).
    pub state_writer: Arc<crate::state_writer::StateWriter>,
    /// The roles: who may reach which node as which login.
    pub policy: Arc<Policy>,
    /// The SSH user CA, for the SSH certificates issued at login.
    pub ssh_ca: Arc<SshUserCa>,
    /// The SSH host CA, for the nodes' host certificates.
    pub ssh_host_ca: Arc<SshHostCa>,
    /// Nodes: the shared directory and this core's tunnels.
    pub directory: CoreDirectory,
    /// Counters of the whole process.
    pub stats: Arc<Stats>,
    /// When the proxy started.
    pub started: Instant,
    /// Bound addresses.
    pub addrs: ListenAddrs,
    /// Stop request.
    pub shutdown: Shutdown,
    /// Each core's inbox, for [`Handoff`]s.
    inboxes: Arc<[flume::Sender<Handoff>]>,
    /// Set once draining began: no new tunnels or sessions.
    pub draining: Cell<bool>,
    /// Agents' tunnels whose connection was lost, by node, waiting for the agent to come back
    /// within `resume.grace` and resume them.
    pub detached: RefCell<HashMap<String, Rc<resume::Detached>>>,
    /// Users' connections whose connection was lost, by user and the client's session id,
    /// waiting for the client to come back within `resume.grace` and resume them.
    detached_users: RefCell<HashMap<resume::SessionKey, Rc<resume::Detached>>>,
    /// Leaf clusters' tunnels whose connection was lost, by the leaf's session id.
    detached_clusters: RefCell<HashMap<[u8; 16], Rc<resume::Detached>>>,
    /// This core's attached leaf cluster tunnels, by the leaf's session id, with the leaf's
    /// name: for a leaf that resumes before this side saw its old connection fail.
    cluster_tunnels: RefCell<HashMap<[u8; 16], (String, Tunnel)>>,
    /// Which core serves which user connection (shared by the cores).
    session_homes: Arc<resume::SessionHomes>,
    /// This core's agent tunnels by the end of their node certificate's validity (Unix
    /// seconds) and directory id, with the node's name: see `tunnels::close_expired_tunnels`.
    node_expiries: RefCell<std::collections::BTreeMap<(u64, u64), Box<str>>>,
    /// Users' session connections, for GOAWAY on drain and for a client resuming before
    /// this side saw its old connection fail.
    user_tunnels: RefCell<HashMap<u64, UserConnection>>,
    user_tunnel_ids: Cell<u64>,
    /// An argon2 hash with the default parameters, verified against for unknown users so a
    /// wrong user name costs the same time as a wrong password.
    pub dummy_hash: String,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("core", &self.core)
            .field("cluster", &self.cluster)
            .field("addrs", &self.addrs)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// Session settings for the proxy's side of a tunnel or user connection.
    pub fn session_config(&self) -> SessionConfig {
        self.session_config_as(Role::Proxy, false)
    }

    /// Session settings from the configuration for a session in `role` (the proxy's own
    /// side, or a leaf's cluster tunnel to its root, which dials), without resumption.
    pub fn session_config_as(&self, role: Role, dialer: bool) -> SessionConfig {
        let c = &self.config;
        let mut s = SessionConfig::new(role, dialer);
        s.initial_window = c.flow.window();
        s.max_frame = c.flow.max_frame();
        s.max_streams = c.limits.max_streams_per_tunnel;
        s.max_buffered = c.limits.max_buffered_per_connection;
        s.max_pending_opens = c.limits.max_pending_opens;
        s.max_announce = c.limits.max_announce_bytes;
        s.keepalive_interval = c.keepalive.interval;
        s.keepalive_count = c.keepalive.count;
        // Refusals and leaf clusters' tunnels do not resume; agents' tunnels and users'
        // connections do: see `resumable_session_config`.
        s.resume_grace = Duration::ZERO;
        s
    }

    /// Session settings for an agent's tunnel or a user's connection: like
    /// `session_config`, but a lost connection detaches the session for `resume.grace` so the
    /// peer can come back and resume it.
    pub fn resumable_session_config(&self) -> SessionConfig {
        let mut s = self.session_config();
        s.resume_grace = self.config.resume.grace;
        s
    }

    /// A new session with a random id.
    pub fn new_session(&self) -> Session {
        Session::new(self.session_config(), self.session_id(), Instant::now())
    }

    /// A new session for an agent's tunnel or a user's connection (resumable).
    pub fn new_resumable_session(&self) -> Session {
        Session::new(
            self.resumable_session_config(),
            self.session_id(),
            Instant::now(),
        )
    }

    /// A resumable session for a user's connection: as [`Context::new_resumable_session`],
    /// but an ANNOUNCE from the user ends it (a user has no nodes to announce).
    pub fn new_user_session(&self) -> Session {
        let mut config = self.resumable_session_config();
        config.peer_may_announce = false;
        Session::new(config, self.session_id(), Instant::now())
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

    /// The deadline for a new connection's whole ClientHello (`limits.hello_timeout`, at most
    /// the handshake deadline).
    pub fn hello_timeout(&self) -> Duration {
        self.config
            .limits
            .hello_timeout
            .min(self.config.limits.handshake_timeout)
    }

    fn add_user_tunnel(&self, tunnel: &Tunnel, user: &PeerIdentity) -> u64 {
        let id = self.user_tunnel_ids.get() + 1;
        self.user_tunnel_ids.set(id);
        let connection = UserConnection {
            tunnel: tunnel.clone(),
            identity: user.clone(),
        };
        self.user_tunnels.borrow_mut().insert(id, connection);
        id
    }

    /// The user connection `id` was resumed with the certificate `user` (maybe a new one).
    fn update_user_tunnel(&self, id: u64, user: &PeerIdentity) {
        if let Some(c) = self.user_tunnels.borrow_mut().get_mut(&id) {
            c.identity = user.clone();
        }
    }

    /// Why `identity`'s certificate may not be used now, if it may not: outside its validity
    /// period (a resumed TLS session or a long connection can outlive it), or revoked (a node
    /// or user of this cluster that was removed or locked). Checked at every connection and
    /// every OPEN.
    pub(crate) fn certificate_refusal(&self, identity: &PeerIdentity) -> Option<String> {
        if let Err(e) = identity.check_valid_at(std::time::SystemTime::now()) {
            return Some(match (&e, identity.kind) {
                (
                    tunnel::identity::IdentityError::Expired { not_after, .. },
                    IdentityKind::User,
                ) => expired_reason(*not_after),
                (tunnel::identity::IdentityError::Expired { not_after, .. }, _) => format!(
                    "the certificate of {} {} expired at {}; it must join again with a new token",
                    identity.kind.as_str(),
                    identity.name,
                    crate::util::rfc3339(*not_after)
                ),
                _ => format!("the certificate of {}: {e}", identity.name),
            });
        }
        if identity.cluster != self.cluster {
            return None; // a trusted root's user on a leaf: the root revokes its own users
        }
        let revoked = match identity.kind {
            IdentityKind::Node => self.revocations.check(identity),
            IdentityKind::User => self.revocations.check_user(identity),
            _ => Ok(()),
        };
        revoked.err()
    }

    /// This core's attached user connection that `user`'s client calls `session_id`.
    fn attached_user_tunnel(&self, session_id: [u8; 16], user: &PeerIdentity) -> Option<Tunnel> {
        self.user_tunnels
            .borrow()
            .values()
            .find(|c| {
                c.identity.name == user.name
                    && c.identity.cluster == user.cluster
                    && !c.tunnel.is_detached()
                    && c.tunnel.peer_id() == Some(session_id)
            })
            .map(|c| c.tunnel.clone())
    }

    /// This core's users' connections.
    fn user_tunnel_handles(&self) -> Vec<Tunnel> {
        self.user_tunnels
            .borrow()
            .values()
            .map(|c| c.tunnel.clone())
            .collect()
    }

    fn remove_user_tunnel(&self, id: u64) {
        self.user_tunnels.borrow_mut().remove(&id);
    }

    /// Moves `conn` to core `core`, wrapped by `wrap`; hands the connection back when it
    /// cannot move (it failed already, or the process is out of descriptors).
    fn move_to(
        &self,
        core: usize,
        conn: TlsConnection,
        wrap: impl FnOnce(TransferableTls) -> Handoff,
    ) -> Result<(), TlsConnection> {
        let Some(inbox) = self.inboxes.get(core) else {
            return Err(conn);
        };
        let moving = conn.into_transferable().map_err(|e| {
            tracing::debug!(core, error = %e.error(), "connection not moved to its owner core");
            e.into_connection()
        })?;
        self.stats.handoffs.fetch_add(1, Ordering::Relaxed);
        // Fails only once that core has stopped (shutdown): the connection is dropped, the
        // peer reconnects to the next proxy.
        let _ = inbox.send(wrap(moving));
        Ok(())
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
            ListenerKind::Tunnels => &[ALPN_TUNNEL, ALPN_JOIN, ALPN_CLUSTER_JOIN, ALPN_HOSTCERT],
            ListenerKind::Auth => &[ALPN_REGISTER, ALPN_JOIN, ALPN_HOSTCERT],
        };
        list.iter().map(|p| p.to_vec()).collect()
    }
}

/// Runs the proxy until `shutdown` is triggered and the drain is over: one thread with its
/// own monoio runtime per worker listener set in `listeners`. Prints
/// `ready users=.. tunnels=.. auth=..` on stdout and writes the same line to
/// `<data_dir>/proxy.ready` once every worker accepts.
pub fn run(
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
    let stale = store.remove_stale_temporaries()?;
    if !stale.is_empty() {
        tracing::info!(files = ?stale, "removed temporary state files left by a proxy or command that died while saving");
    }
    // Fail now, not at the first join, if the state file is bad.
    let state_modified = crate::revocation::modified(&data.state());
    let revocations = crate::revocation::Revocations::default();
    let state = store.read()?;
    revocations.load(&state);
    revocations.load_users(&state);
    let addrs = listeners.addrs()?;
    let workers = listeners.workers();

    let policy = Policy::new(&config.roles);
    let (ssh_ca, created) = SshUserCa::load_or_create(data.root(), ca.cluster())?;
    if created {
        tracing::info!(
            path = %SshUserCa::path(data.root()).display(),
            "created the SSH user CA (this data directory predates SSH certificates); \
             `remoteler-proxy export ssh-user-ca` prints the line for sshd's TrustedUserCAKeys"
        );
    }
    let (ssh_host_ca, created) = SshHostCa::load_or_create(data.root(), ca.cluster())?;
    if created {
        tracing::info!(
            path = %SshHostCa::path(data.root()).display(),
            "created the SSH host CA (this data directory predates host certificates); \
             `remoteler-proxy export ssh-host-ca` prints the known_hosts line"
        );
    }
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..workers).map(|_| flume::unbounded()).unzip();
    let state_writer = Arc::new(crate::state_writer::StateWriter::start(store.clone())?);
    let shared = Shared {
        state_writer: state_writer.clone(),
        revocations: Arc::new(revocations),
        login_lockout: Arc::new(crate::lockout::LoginLockout::new(
            config.limits.login_lockout_failures,
            config.limits.login_lockout,
        )),
        guard: Arc::new(crate::guard::SourceGuard::new(
            config.limits.max_handshakes_in_progress,
            config.limits.max_handshakes_per_source,
        )),
        policy: Arc::new(policy),
        ssh_ca: Arc::new(ssh_ca),
        ssh_host_ca: Arc::new(ssh_host_ca),
        cluster: ca.cluster().to_owned(),
        ca_pin: ca.pin().to_string(),
        ca: Arc::new(ca),
        directory: Arc::new(NodeDirectory::new(config.nodes.clone(), workers)),
        config: Arc::new(config),
        store,
        audit,
        stats: Arc::new(Stats::new(workers)),
        started: Instant::now(),
        addrs,
        shutdown: shutdown.clone(),
        dummy_hash: dummy_hash(),
        inboxes: senders.into(),
        session_homes: Arc::default(),
        tls_users,
        tls_tunnels,
        tls_auth,
        state_modified,
    };

    let Listeners {
        workers: sets,
        metrics,
        admin,
        admin_path,
    } = listeners;
    let mut admin = Some((admin, metrics));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), ProxyError>>();
    let mut threads = Vec::with_capacity(workers);
    for (core, (set, inbox)) in sets.into_iter().zip(receivers).enumerate() {
        let shared = shared.clone();
        let admin = admin.take();
        let ready = ready_tx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("core-{core}"))
            .spawn(move || worker(core, shared, set, admin, inbox, ready));
        match spawned {
            Ok(handle) => threads.push(handle),
            Err(e) => {
                shutdown.trigger();
                let _ = ready_tx.send(Err(ProxyError::Other(format!(
                    "cannot start worker thread {core}: {e}"
                ))));
                break;
            }
        }
    }
    drop(ready_tx);
    let mut result = Ok(());
    for _ in 0..workers {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                shutdown.trigger();
                result = Err(e);
                break;
            }
            Err(_) => break, // every sender is gone: a worker ended before it was ready
        }
    }
    if result.is_ok() && !shutdown.is_triggered() {
        let ready = format!("ready {addrs}");
        crate::state::write_atomic(&data.ready_file(), format!("{ready}\n").as_bytes(), 0o644)?;
        {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{ready}");
            let _ = out.flush();
        }
        tracing::info!(
            cluster = %shared.cluster,
            users = %addrs.users,
            tunnels = %addrs.tunnels,
            auth = %addrs.auth,
            workers,
            "proxy ready"
        );
    }
    let audit = shared.audit.clone();
    drop(shared);
    for thread in threads {
        match thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                if result.is_ok() {
                    result = Err(e);
                }
            }
            Err(_) => {
                if result.is_ok() {
                    result = Err(ProxyError::Other("a worker thread panicked".into()));
                }
            }
        }
    }
    state_writer.close();
    audit.close(); // every record written and synced before the process exits
    let _ = std::fs::remove_file(data.ready_file());
    let _ = std::fs::remove_file(&admin_path);
    tracing::info!("proxy stopped");
    result
}

/// The admin socket and the metrics listener, served by core 0.
type CoreZeroListeners = (
    std::os::unix::net::UnixListener,
    Option<std::net::TcpListener>,
);

/// One worker: its runtime, its listeners, its inbox; the admin socket on core 0.
fn worker(
    core: usize,
    shared: Shared,
    listeners: WorkerListeners,
    admin: Option<CoreZeroListeners>,
    inbox: flume::Receiver<Handoff>,
    ready: std::sync::mpsc::Sender<Result<(), ProxyError>>,
) -> Result<(), ProxyError> {
    let runtime = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build();
    let mut runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            let message = format!("cannot start the monoio runtime of core {core}: {e}");
            let _ = ready.send(Err(ProxyError::Other(message.clone())));
            return Err(ProxyError::Other(message));
        }
    };
    shared.stats.register_core_thread(core);
    if shared.config.pin_workers {
        pin_to_cpu(core);
    }
    runtime.block_on(async move {
        let started = serve_core(core, shared, listeners, admin, inbox).await;
        let (ctx, loops) = match started {
            Ok(v) => {
                let _ = ready.send(Ok(()));
                v
            }
            Err(e) => {
                let message = e.to_string();
                let _ = ready.send(Err(e));
                return Err(ProxyError::Other(message));
            }
        };
        ctx.shutdown.wait().await;
        drain(&ctx).await;
        for l in loops {
            l.await;
        }
        tracing::debug!(core, "core stopped");
        Ok(())
    })
}

/// Binds this thread (worker `core`) to the `core`th CPU the process may run on, so that a
/// worker keeps its caches and its interrupts' CPU (`pin_workers`). A failure is logged: the
/// worker runs unpinned.
fn pin_to_cpu(core: usize) {
    let allowed = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(parse_cpu_list)
        })
        .unwrap_or_default();
    let Some(&cpu) = allowed.get(core % allowed.len().max(1)) else {
        tracing::warn!(
            core,
            "pin_workers: cannot read the CPUs this process may use; not pinned"
        );
        return;
    };
    match monoio::utils::bind_to_cpu_set([cpu]) {
        Ok(()) => tracing::info!(core, cpu, "worker pinned to its CPU (`pin_workers`)"),
        Err(e) => {
            tracing::warn!(core, cpu, error = %e, "pin_workers: cannot pin the worker; it runs unpinned")
        }
    }
}

/// `0-3,8,10-11` (as in /proc/self/status) to the CPU numbers, in order.
fn parse_cpu_list(text: &str) -> Vec<usize> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let (from, to) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(from), Ok(to)) = (from.trim().parse::<usize>(), to.trim().parse::<usize>()) {
            cpus.extend(from..=to.min(from + 4096));
        }
    }
    cpus
}

/// Builds core `core`'s context and starts its accept loops, its inbox and (core 0) the
/// admin socket.
async fn serve_core(
    core: usize,
    shared: Shared,
    listeners: WorkerListeners,
    admin: Option<CoreZeroListeners>,
    inbox: flume::Receiver<Handoff>,
) -> Result<(Rc<Context>, Vec<monoio::task::JoinHandle<()>>), ProxyError> {
    let ctx = Rc::new(Context {
        core,
        cluster: shared.cluster,
        ca_pin: shared.ca_pin,
        ca: shared.ca,
        directory: CoreDirectory::new(shared.directory, core),
        config: shared.config,
        store: shared.store,
        audit: shared.audit,
        guard: shared.guard,
        revocations: shared.revocations,
        login_lockout: shared.login_lockout,
        state_writer: shared.state_writer,
        policy: shared.policy,
        ssh_ca: shared.ssh_ca,
        ssh_host_ca: shared.ssh_host_ca,
        stats: shared.stats,
        started: shared.started,
        addrs: shared.addrs,
        shutdown: shared.shutdown,
        inboxes: shared.inboxes,
        draining: Cell::new(false),
        detached: RefCell::new(HashMap::new()),
        detached_users: RefCell::new(HashMap::new()),
        detached_clusters: RefCell::new(HashMap::new()),
        cluster_tunnels: RefCell::new(HashMap::new()),
        node_expiries: RefCell::default(),
        session_homes: shared.session_homes,
        user_tunnels: RefCell::new(HashMap::new()),
        user_tunnel_ids: Cell::new(0),
        dummy_hash: shared.dummy_hash,
    });
    let to_monoio = |l: std::net::TcpListener| {
        TcpListener::from_std(l).map_err(|e| {
            ProxyError::Other(format!("cannot register a listener with the runtime: {e}"))
        })
    };
    let users = to_monoio(listeners.users)?;
    let tunnels = to_monoio(listeners.tunnels)?;
    let auth = to_monoio(listeners.auth)?;
    let mut loops = vec![
        monoio::spawn(accept_loop(
            ctx.clone(),
            users,
            shared.tls_users,
            ListenerKind::Users,
        )),
        monoio::spawn(accept_loop(
            ctx.clone(),
            tunnels,
            shared.tls_tunnels,
            ListenerKind::Tunnels,
        )),
        monoio::spawn(accept_loop(
            ctx.clone(),
            auth,
            shared.tls_auth,
            ListenerKind::Auth,
        )),
        monoio::spawn(inbox_loop(ctx.clone(), inbox)),
        monoio::spawn(tunnels::close_expired_tunnels(ctx.clone())),
    ];
    for trusted in &ctx.config.trusted_clusters {
        if !trusted.enabled {
            if core == 0 {
                tracing::info!(cluster = %trusted.name, "trusted cluster disabled (`enabled = false`); no tunnel to it");
            }
            continue;
        }
        if trusted.name.as_str() == ctx.cluster {
            return Err(ProxyError::Other(format!(
                "`trusted_clusters` names this cluster itself ({}); a trusted cluster is another \
                 (root) cluster",
                ctx.cluster
            )));
        }
        loops.push(monoio::spawn(clusters::run_cluster_agent(
            ctx.clone(),
            trusted.clone(),
        )));
    }
    if let Some((admin, metrics)) = admin {
        let admin = monoio::net::UnixListener::from_std(admin)
            .map_err(|e| ProxyError::Other(format!("cannot register the admin socket: {e}")))?;
        loops.push(monoio::spawn(admin::serve(ctx.clone(), admin)));
        loops.push(monoio::spawn(watch_removals(
            ctx.clone(),
            shared.state_modified,
        )));
        if let Some(metrics) = metrics {
            let metrics = to_monoio(metrics)?;
            loops.push(monoio::spawn(crate::metrics::serve(ctx.clone(), metrics)));
        }
    }
    Ok((ctx, loops))
}

/// What a user whose certificate expired during a connection is told.
pub(crate) fn expired_reason(not_after: std::time::SystemTime) -> String {
    format!(
        "your certificate expired at {}; run `remoteler login` again",
        crate::util::rfc3339(not_after)
    )
}

/// Closes the connections of this cluster's user `user` on this core (live, or waiting to be
/// resumed) whose certificate is no longer accepted (the user was removed or locked).
fn close_user(ctx: &Context, user: &str) {
    let refused: Vec<(Tunnel, Option<[u8; 16]>, PeerIdentity, String)> = ctx
        .user_tunnels
        .borrow()
        .values()
        .filter(|c| c.identity.name == user && c.identity.cluster == ctx.cluster)
        .filter_map(|c| {
            let why = ctx.certificate_refusal(&c.identity)?;
            Some((
                c.tunnel.clone(),
                c.tunnel.peer_id(),
                c.identity.clone(),
                why,
            ))
        })
        .collect();
    for (tunnel, peer_id, identity, why) in refused {
        tracing::info!(user = %identity.name, serial = %identity.serial, reason = %why, "closing a user's connection");
        if let Some(id) = peer_id {
            let key = resume::SessionKey::new(&identity, id);
            let waiting = ctx.detached_users.borrow_mut().remove(&key);
            if let Some(waiting) = waiting {
                waiting.cancel(&why);
            }
        }
        tunnel.close(ErrorCode::ACCESS_DENIED, &why);
    }
}

/// Closes a removed node's tunnel on this core (live, or waiting to be resumed).
fn close_node(ctx: &Context, node: &str, reason: &str) {
    if let Some(waiting) = ctx.detached.borrow_mut().remove(node) {
        waiting.cancel(reason);
        waiting.tunnel.close(ErrorCode::ACCESS_DENIED, reason);
    }
    if let Some(tunnel) = ctx.directory.local_tunnel(node) {
        tracing::info!(%node, reason, "closing the tunnel of a removed node");
        tunnel.close(ErrorCode::ACCESS_DENIED, reason);
    }
}

/// Core 0: applies `nodes rm` made while the proxy runs (see [`crate::revocation`]).
async fn watch_removals(ctx: Rc<Context>, mut seen: Option<std::time::SystemTime>) {
    let path = DataDir::new(&ctx.config.data_dir).state();
    loop {
        monoio::select! {
            _ = monoio::time::sleep(crate::revocation::CHECK_INTERVAL) => {}
            _ = ctx.shutdown.wait() => break,
        }
        let modified = crate::revocation::modified(&path);
        if modified == seen {
            continue;
        }
        seen = modified;
        let store = ctx.store.clone();
        let Some(read) = crate::blocking::run(move || store.read()).await else {
            continue;
        };
        let state = match read {
            Ok(state) => state,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the state file to apply node removals");
                continue;
            }
        };
        for node in ctx.revocations.load(&state) {
            let Some(revoked) = state.revoked_nodes.iter().find(|r| r.name == node) else {
                continue;
            };
            let reason = format!(
                "node {node} was removed (`remoteler-proxy nodes rm`) at {}",
                crate::util::rfc3339_unix(revoked.revoked_unix)
            );
            tracing::info!(%node, "node removed; refusing its certificate from now on");
            ctx.audit.record(
                "node.removed",
                serde_json::json!({ "node": node, "revoked_unix": revoked.revoked_unix }),
            );
            ctx.directory.forget(&node);
            let owner = ctx.directory.owner_core(&node);
            if let Some(inbox) = ctx.inboxes.get(owner) {
                let _ = inbox.send(Handoff::CloseNode { node, reason });
            }
        }
        for change in ctx.revocations.load_users(&state) {
            apply_user_change(&ctx, change);
        }
    }
}

/// Audits a user's removal, lock or unlock that the state file shows, and acts on it: a
/// removed or locked user's connections end on every core (a user's connections may be on
/// any), an unlock lifts a lockout after failed logins.
fn apply_user_change(ctx: &Context, change: crate::revocation::UserChange) {
    use crate::revocation::UserChange;
    let user = change.user().to_owned();
    let (event, at) = match &change {
        UserChange::Removed { at, .. } => ("user.removed", *at),
        UserChange::Locked { at, .. } => ("user.locked", *at),
        UserChange::Unlocked { at, .. } => ("user.unlocked", *at),
    };
    tracing::info!(%user, event, at = %crate::util::rfc3339_unix(at), "user access changed");
    ctx.audit.record(
        event,
        serde_json::json!({ "user": user, "at": crate::util::rfc3339_unix(at), "at_unix": at }),
    );
    if let UserChange::Unlocked { .. } = change {
        ctx.login_lockout.unlock(&user);
        return;
    }
    for inbox in ctx.inboxes.iter() {
        let _ = inbox.send(Handoff::CloseUser { user: user.clone() });
    }
}

/// Serves the connections other cores move to this one.
async fn inbox_loop(ctx: Rc<Context>, inbox: flume::Receiver<Handoff>) {
    loop {
        let next = monoio::select! {
            next = inbox.recv_async() => next,
            _ = ctx.shutdown.wait() => break,
        };
        let Ok(handoff) = next else { break };
        match handoff {
            Handoff::CloseNode { node, reason } => close_node(&ctx, &node, &reason),
            Handoff::CloseUser { user } => close_user(&ctx, &user),
            Handoff::Tunnel {
                conn,
                peer,
                identity,
            } => match conn.attach() {
                Ok(conn) => drop(monoio::spawn(tunnels::serve_tunnel(
                    ctx.clone(),
                    conn,
                    peer,
                    identity,
                ))),
                Err(e) => tracing::debug!(%peer, error = %e, "moved tunnel connection lost"),
            },
            Handoff::ClusterTunnel {
                conn,
                input,
                peer,
                identity,
            } => match conn.attach() {
                Ok(conn) => drop(monoio::spawn(clusters::serve_cluster_tunnel(
                    ctx.clone(),
                    conn,
                    input,
                    peer,
                    identity,
                ))),
                Err(e) => tracing::debug!(%peer, error = %e, "moved cluster tunnel lost"),
            },
            Handoff::Session {
                conn,
                input,
                peer,
                identity,
            } => match conn.attach() {
                Ok(conn) => drop(monoio::spawn(sessions::serve_session(
                    ctx.clone(),
                    conn,
                    input,
                    peer,
                    identity,
                ))),
                Err(e) => tracing::debug!(%peer, error = %e, "moved user connection lost"),
            },
        }
    }
}

async fn drain(ctx: &Rc<Context>) {
    ctx.draining.set(true);
    let deadline = Instant::now() + ctx.config.drain.timeout;
    let tunnels = ctx.directory.tunnels();
    tracing::info!(
        tunnels = tunnels.len(),
        sessions = Stats::get(&ctx.stats.sessions_active),
        core = ctx.core,
        timeout_secs = ctx.config.drain.timeout.as_secs(),
        "draining: GOAWAY to every tunnel and user connection"
    );
    for t in &tunnels {
        t.goaway("proxy shutting down");
    }
    // Tunnels waiting for their agent to resume them will not be resumed by this process.
    for (_, waiting) in ctx.detached.borrow_mut().drain() {
        waiting.cancel("proxy shutting down");
        waiting
            .tunnel
            .close(ErrorCode::GOING_AWAY, "proxy shutting down");
    }
    let detached_clusters: Vec<_> = ctx.detached_clusters.borrow_mut().drain().collect();
    for waiting in ctx
        .detached_users
        .borrow_mut()
        .drain()
        .map(|(_, w)| w)
        .chain(detached_clusters.into_iter().map(|(_, w)| w))
    {
        waiting.cancel("proxy shutting down");
        waiting
            .tunnel
            .close(ErrorCode::GOING_AWAY, "proxy shutting down");
    }
    let users = ctx.user_tunnel_handles();
    for t in &users {
        t.goaway("proxy shutting down");
    }
    while Stats::get(&ctx.stats.sessions_active) > 0 && Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(50)).await;
    }
    if Stats::get(&ctx.stats.sessions_active) > 0 {
        tracing::warn!(
            sessions = Stats::get(&ctx.stats.sessions_active),
            core = ctx.core,
            "drain timeout (`drain.timeout`) passed; closing the remaining sessions"
        );
    }
    // Users first, with a code that ends their session at once (a GOAWAY GOING_AWAY only
    // says "draining") and a reason they can act on; closing the tunnels first would reach
    // them as "node side: stream reset" instead.
    let users = ctx.user_tunnel_handles();
    let why = format!(
        "the proxy stopped: sessions still open when its drain timeout ({}s, `drain.timeout`) \
         passed are closed; connect again",
        ctx.config.drain.timeout.as_secs()
    );
    for t in users {
        t.close(ErrorCode::CANCELLED, &why);
    }
    for t in ctx.directory.tunnels() {
        t.close(ErrorCode::GOING_AWAY, "proxy stopped");
    }
    // Let the drivers flush their GOAWAYs.
    let flush_deadline = Instant::now() + Duration::from_secs(2);
    while (ctx.directory.local_tunnel_count() > 0 || !ctx.user_tunnels.borrow().is_empty())
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
                // Debug only below: a flood must not become a flood of log lines; the
                // metrics count what was dropped.
                let Some(admission) = ctx.guard.enter(peer.ip()) else {
                    Stats::bump(&ctx.stats.dropped_source_handshake_limit);
                    tracing::debug!(
                        %peer,
                        listener = kind.name(),
                        "too many handshakes in progress from this source group (`limits.max_handshakes_per_source`); dropping the connection"
                    );
                    continue;
                };
                if let Some(evicted) = admission.evicted {
                    // The table was full: the oldest connection of the group holding the most
                    // makes room (its task sees the eviction and closes it).
                    Stats::bump(&ctx.stats.dropped_handshake_limit);
                    tracing::debug!(
                        %peer,
                        listener = kind.name(),
                        %evicted,
                        "handshake table full (`limits.max_handshakes_in_progress`); evicted the oldest connection of the source group holding the most"
                    );
                }
                let slot = HandshakeSlot::take(ctx.stats.clone(), admission.slot);
                monoio::spawn(handle_connection(
                    ctx.clone(),
                    tcp,
                    peer,
                    tls.clone(),
                    kind,
                    slot,
                ));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                Stats::bump(&ctx.stats.accept_errors);
                tracing::warn!(listener = kind.name(), error = %e, "accept failed");
                monoio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    tracing::debug!(listener = kind.name(), "stopped accepting");
}

/// Holds one of `limits.max_handshakes_in_progress`, and one of its source group's
/// `limits.max_handshakes_per_source`, while alive: from accept through TLS to the first
/// request (a join or login line, a user's first OPEN), or to the check of a client
/// certificate. A newer connection may evict it when the table is full.
pub(super) struct HandshakeSlot {
    stats: Arc<Stats>,
    source: crate::guard::SourceSlot,
}

impl HandshakeSlot {
    fn take(stats: Arc<Stats>, source: crate::guard::SourceSlot) -> Self {
        stats.handshakes.fetch_add(1, Ordering::Relaxed);
        HandshakeSlot { stats, source }
    }

    /// Runs `work` unless this connection is evicted from the handshake table first (`None`).
    pub(super) async fn unless_evicted<F: std::future::Future>(
        &self,
        work: F,
    ) -> Option<F::Output> {
        monoio::select! {
            out = work => Some(out),
            () = self.source.evicted() => None,
        }
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.stats.handshakes.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn handle_connection(
    ctx: Rc<Context>,
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    kind: ListenerKind,
    slot: HandshakeSlot,
) {
    // This task lives as long as its connection (a tunnel: days): everything but the tunnel's
    // own service is boxed so that the task is not sized for the largest of them.
    let accept = tls::accept_within(tcp, tls, ctx.hello_timeout(), ctx.handshake_timeout());
    let conn = match Box::pin(slot.unless_evicted(accept)).await {
        None => {
            Stats::bump(&ctx.stats.handshakes_failed);
            tracing::debug!(%peer, listener = kind.name(), "evicted from the full handshake table during tls");
            return;
        }
        Some(Ok(conn)) => {
            Stats::bump(&ctx.stats.handshakes_ok);
            conn
        }
        Some(Err(e)) => {
            if e.is_certificate_error() {
                Stats::bump(&ctx.stats.handshakes_bad_certificate);
                tracing::warn!(%peer, listener = kind.name(), error = %e, "tls handshake refused: bad client certificate");
            } else {
                Stats::bump(&ctx.stats.handshakes_failed);
                tracing::debug!(%peer, listener = kind.name(), error = %e, "tls handshake failed");
            }
            return;
        }
    };
    let alpn = conn.alpn_protocol().unwrap_or_default();
    let identity = conn
        .peer_certificates()
        .and_then(|chain| chain.into_iter().next())
        .map(|leaf| PeerIdentity::from_der(&leaf));
    let protocol = String::from_utf8_lossy(&alpn).into_owned();
    match (kind, alpn.as_slice()) {
        (ListenerKind::Tunnels | ListenerKind::Auth, p) if p == ALPN_JOIN => {
            Box::pin(control::serve_join(ctx, conn, peer, slot)).await;
        }
        (ListenerKind::Tunnels, p) if p == ALPN_CLUSTER_JOIN => {
            Box::pin(clusters::serve_cluster_join(ctx, conn, peer, slot)).await;
        }
        (ListenerKind::Tunnels, p)
            if p == ALPN_TUNNEL
                && matches!(&identity, Some(Ok(id)) if id.kind == IdentityKind::Cluster) =>
        {
            // A leaf cluster's tunnel: served on any core (the directory says which core holds
            // the tunnel that announced which leaf node). Its certificate gives nothing else.
            match check_identity(&ctx, identity, IdentityKind::Cluster) {
                Ok(id) => drop(monoio::spawn(clusters::accept_cluster_tunnel(
                    ctx, conn, peer, id,
                ))),
                Err(why) => Box::pin(refuse_frames(&ctx, conn, peer, &protocol, &why)).await,
            }
        }
        (ListenerKind::Users, p) if p == ALPN_LOGIN => {
            Box::pin(control::serve_login(ctx, conn, peer, slot)).await;
        }
        (ListenerKind::Tunnels, p) if p == ALPN_TUNNEL => {
            match check_identity(&ctx, identity, IdentityKind::Node) {
                Ok(id) => {
                    let owner = ctx.directory.owner_core(&id.name);
                    if owner != ctx.core {
                        // A tunnel served on the wrong core would split its node's state;
                        // a connection that cannot move is dropped and the agent retries.
                        let _ = ctx.move_to(owner, conn, |conn| Handoff::Tunnel {
                            conn,
                            peer,
                            identity: id,
                        });
                        return;
                    }
                    // A task of its own, sized for the tunnel only: this one (sized for the
                    // handshake and every other protocol) ends here and frees its memory.
                    drop(monoio::spawn(tunnels::serve_tunnel(ctx, conn, peer, id)))
                }
                Err(why) => Box::pin(refuse_frames(&ctx, conn, peer, &protocol, &why)).await,
            }
        }
        (ListenerKind::Users, p) if p == ALPN_SESSION => {
            match check_identity(&ctx, identity, IdentityKind::User) {
                Ok(id) => {
                    let mut conn = conn;
                    let mut input = BytesMut::new();
                    let first = Box::pin(slot.unless_evicted(monoio::time::timeout(
                        ctx.handshake_timeout(),
                        sessions::peek_first_request(&mut conn, &mut input),
                    )))
                    .await;
                    let Some(first) = first else {
                        tracing::debug!(%peer, "evicted from the full handshake table before the first request");
                        return;
                    };
                    drop(slot);
                    let first = first.ok().flatten();
                    let owner = match first {
                        Some(FirstRequest::Open(cluster, node)) => {
                            if cluster.is_empty() || cluster == ctx.cluster {
                                Some(ctx.directory.owner_core(&node))
                            } else {
                                ctx.directory.cluster_owner(&cluster, &node)
                            }
                        }
                        Some(FirstRequest::Resume(session)) => ctx
                            .session_homes
                            .core_of(&resume::SessionKey::new(&id, session)),
                        None => None,
                    };
                    let conn = match owner.filter(|&core| core != ctx.core) {
                        Some(core) => match ctx.move_to(core, conn, |conn| Handoff::Session {
                            conn,
                            input: input.clone(),
                            peer,
                            identity: id.clone(),
                        }) {
                            Ok(()) => return,
                            Err(conn) => conn,
                        },
                        None => conn,
                    };
                    Box::pin(sessions::serve_session(ctx, conn, input, peer, id)).await
                }
                Err(why) => Box::pin(refuse_frames(&ctx, conn, peer, &protocol, &why)).await,
            }
        }
        (ListenerKind::Users, p) if p == ALPN_API => {
            match check_identity(&ctx, identity, IdentityKind::User) {
                Ok(id) => Box::pin(control::serve_api(ctx, conn, peer, id, slot)).await,
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
        (ListenerKind::Tunnels | ListenerKind::Auth, p) if p == ALPN_HOSTCERT => {
            let id = check_identity(&ctx, identity, IdentityKind::Node);
            Box::pin(hostcert::serve_host_cert(ctx, conn, peer, id, slot)).await;
        }
        (ListenerKind::Auth, p) if p == ALPN_REGISTER => {
            match check_identity(&ctx, identity, IdentityKind::Node) {
                Ok(id) => Box::pin(control::serve_register(ctx, conn, peer, id, slot)).await,
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
    // The handshake verified the validity period only if it was a full one: checked again
    // here, with the removals and locks.
    if let Some(why) = ctx.certificate_refusal(&identity) {
        return Err(why);
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
    Stats::bump(&ctx.stats.dropped_access_denied);
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

#[cfg(test)]
mod tests {
    use super::parse_cpu_list;

    #[test]
    fn cpu_lists_as_the_kernel_writes_them() {
        assert_eq!(parse_cpu_list("0-3,8,10-11\n"), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(parse_cpu_list("5"), vec![5]);
        assert_eq!(parse_cpu_list(""), Vec::<usize>::new());
        assert_eq!(parse_cpu_list("x,2"), vec![2]);
    }
}
