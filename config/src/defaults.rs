//! Every default and every limit, by name. `docs/configuration.md` lists the same numbers.

use std::time::Duration;

// ---- proxy: identity and files --------------------------------------------------------------

/// Where the proxy keeps its CA, certificates, tokens and audit log when `data_dir` is absent.
pub const DEFAULT_PROXY_DATA_DIR: &str = "/var/lib/remoteler";
/// The proxy's audit log, relative to `data_dir`, when `audit.path` is absent.
pub const DEFAULT_AUDIT_FILE: &str = "audit.log";
/// Most worker threads (`workers`); beyond this a typo, not a machine.
pub const MAX_WORKERS: u16 = 1024;

// ---- proxy: listeners -----------------------------------------------------------------------

/// Where users' `remoteler` connects.
pub const DEFAULT_USER_LISTEN: &str = "0.0.0.0:3023";
/// Where agents and leaf clusters open their reverse tunnels.
pub const DEFAULT_TUNNEL_LISTEN: &str = "0.0.0.0:3024";
/// Where agents that are dialled directly register (the private network).
pub const DEFAULT_AUTH_LISTEN: &str = "0.0.0.0:3025";
/// Where Prometheus scrapes metrics; loopback only, metrics are not for the world.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:3026";

// ---- both: keepalive ------------------------------------------------------------------------

/// Time between two PINGs on an idle tunnel.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered PINGs after which a tunnel is declared dead.
pub const DEFAULT_KEEPALIVE_COUNT: u32 = 3;
/// Shortest keepalive interval: tens of thousands of tunnels pinging faster would be the load.
pub const MIN_KEEPALIVE_INTERVAL: Duration = Duration::from_millis(100);
/// Longest keepalive interval: a dead tunnel must not hold its node name for hours.
pub const MAX_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(3600);
/// Fewest missed PINGs before a tunnel is dead.
pub const MIN_KEEPALIVE_COUNT: u32 = 1;
/// Most missed PINGs before a tunnel is dead.
pub const MAX_KEEPALIVE_COUNT: u32 = 100;

// ---- both: flow control ---------------------------------------------------------------------

/// Credit each stream starts with: the bytes a peer may send before it must wait for WINDOW.
pub const DEFAULT_WINDOW: u32 = 1 << 20;
/// Largest DATA payload in one frame: the protocol's limit. Each frame costs a header, a wake-up
/// of the stream's task and, at the far end, a write to the target; 64 KiB rather than 16 KiB
/// took the agent from about 62,000 to 16,000 io_uring writes per GB uploaded
/// (docs/benchmarks.md). A receiver holds at most one partial frame, and only while data flows.
pub const DEFAULT_MAX_FRAME: u32 = 64 << 10;
/// Smallest window: below this one round trip cannot fill a link.
pub const MIN_WINDOW: u32 = 16 << 10;
/// Largest window: the sender keeps one window of unacknowledged bytes per stream for
/// resumption, so this bounds memory per stream.
pub const MAX_WINDOW: u32 = 64 << 20;
/// Smallest DATA payload limit: smaller frames waste the header.
pub const MIN_MAX_FRAME: u32 = 1 << 10;
/// Largest DATA payload limit: the receiver buffers one whole frame before decoding it.
pub const MAX_MAX_FRAME: u32 = 64 << 10;

// ---- proxy: limits on what peers can make the proxy hold ------------------------------------

/// Most streams open at once on one tunnel.
pub const DEFAULT_MAX_STREAMS_PER_TUNNEL: u32 = 1024;
/// Upper bound for `limits.max_streams_per_tunnel`.
pub const MAX_MAX_STREAMS_PER_TUNNEL: u32 = 65_535;
/// Stream bytes one connection (a tunnel or a user's connection) may make the proxy hold each
/// way, across its streams: 256 MiB, room for 256 streams stalled with a full 1 MiB window
/// while windows alone would allow 1,024 of them (1 GiB). Inbound, unread bytes beyond it end
/// the connection (LIMIT_EXCEEDED); outbound, sending waits. The same as
/// `frame::DEFAULT_MAX_BUFFERED`.
pub const DEFAULT_MAX_BUFFERED_PER_CONNECTION: u32 = 256 << 20;
/// Smallest `limits.max_buffered_per_connection`: one stream with the largest window fits.
pub const MIN_MAX_BUFFERED_PER_CONNECTION: u32 = MAX_WINDOW;
/// Largest `limits.max_buffered_per_connection` (the session counts it in 32 bits).
pub const MAX_MAX_BUFFERED_PER_CONNECTION: u32 = 3 << 30;
/// Most OPENs sent on one tunnel and not yet answered.
pub const DEFAULT_MAX_PENDING_OPENS: u32 = 64;
/// Upper bound for `limits.max_pending_opens`.
pub const MAX_MAX_PENDING_OPENS: u32 = 65_536;
/// Time a new connection has to finish TLS and HELLO.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Shortest handshake timeout.
pub const MIN_HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(100);
/// Longest handshake timeout: a slow-loris peer holds a handshake slot this long.
pub const MAX_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(300);
/// Time a new connection has to send its whole TLS ClientHello: an honest client sends it
/// at once, so a silent connection is let go long before `limits.handshake_timeout`.
pub const DEFAULT_HELLO_TIMEOUT: Duration = Duration::from_secs(2);
/// Most connections in TLS/HELLO at once, per proxy.
pub const DEFAULT_MAX_HANDSHAKES_IN_PROGRESS: u32 = 1024;
/// Upper bound for `limits.max_handshakes_in_progress`.
pub const MAX_MAX_HANDSHAKES_IN_PROGRESS: u32 = 65_536;
/// Most connections in TLS/HELLO at once from one source address: a quarter of the
/// proxy-wide default, so one address that opens connections and sends nothing cannot take
/// every handshake slot, while a site whose agents share one NAT address still reconnects
/// hundreds at a time.
pub const DEFAULT_MAX_HANDSHAKES_PER_SOURCE: u32 = 256;
/// Largest ANNOUNCE (an agent's or leaf cluster's inventory) the proxy accepts.
pub const DEFAULT_MAX_ANNOUNCE_BYTES: u32 = 1 << 20;
/// Smallest `limits.max_announce_bytes`.
pub const MIN_MAX_ANNOUNCE_BYTES: u32 = 1 << 10;
/// Largest `limits.max_announce_bytes`: an ANNOUNCE is held whole in memory.
pub const MAX_MAX_ANNOUNCE_BYTES: u32 = 64 << 20;
/// Most tunnels the proxy holds at once; past it, new tunnels are refused.
pub const DEFAULT_MAX_TUNNELS: u32 = 100_000;
/// Upper bound for `limits.max_tunnels`.
pub const MAX_MAX_TUNNELS: u32 = 1_000_000;
/// Failed password logins in a row that lock an account out (`limits.login_lockout_failures`).
pub const DEFAULT_LOGIN_LOCKOUT_FAILURES: u32 = 10;
/// Upper bound for `limits.login_lockout_failures`.
pub const MAX_LOGIN_LOCKOUT_FAILURES: u32 = 1_000;
/// How long an account stays locked out (`limits.login_lockout`); `users unlock` lifts it
/// sooner.
pub const DEFAULT_LOGIN_LOCKOUT: Duration = Duration::from_secs(15 * 60);
/// Shortest `limits.login_lockout`.
pub const MIN_LOGIN_LOCKOUT: Duration = Duration::from_secs(1);
/// Longest `limits.login_lockout`.
pub const MAX_LOGIN_LOCKOUT: Duration = Duration::from_secs(24 * 3600);
/// Most tunnels one leaf cluster holds at once. A leaf proxy opens one per worker of its own
/// (one per core by default), so this is a leaf with up to 64 cores; a leaf needing more is
/// refused its extra tunnels, and an operator raises it.
pub const DEFAULT_MAX_TUNNELS_PER_CLUSTER: u32 = 64;
/// Upper bound for `limits.max_tunnels_per_cluster`: the most workers a proxy runs.
pub const MAX_MAX_TUNNELS_PER_CLUSTER: u32 = MAX_WORKERS as u32;
/// Most nodes one leaf cluster announces over all its tunnels: what the root keeps of a leaf
/// is bounded by this and `limits.max_announce_bytes`, not by how many tunnels it opens.
pub const DEFAULT_MAX_ANNOUNCED_NODES: u32 = 10_000;
/// Upper bound for `limits.max_announced_nodes`.
pub const MAX_MAX_ANNOUNCED_NODES: u32 = 1_000_000;
/// `limits.max_streams_per_user_per_node` is `max_streams_per_tunnel` divided by this unless
/// set: one user gets a quarter of a node's stream slots, so at least four users can always
/// open streams to a node one of them is flooding. A fixed share rather than a dynamic one:
/// it is predictable, costs one counter per user and node, and an operator can reason about it.
pub const DEFAULT_STREAMS_PER_USER_DIVISOR: u32 = 4;

// ---- proxy: auth listener -------------------------------------------------------------------

/// `auth.register_networks` when absent: none, so a directly dialled agent may register only
/// its own source address.
pub const DEFAULT_REGISTER_NETWORKS: &[&str] = &[];
/// Most entries in `auth.register_networks`; each registration is checked against all of them.
pub const MAX_REGISTER_NETWORKS: usize = 256;

// ---- proxy: resumption and draining ---------------------------------------------------------

/// How long the streams of a dropped tunnel wait for it to come back.
pub const DEFAULT_RESUME_GRACE: Duration = Duration::from_secs(30);
/// Longest resume grace: unacknowledged bytes are held this long.
pub const MAX_RESUME_GRACE: Duration = Duration::from_secs(3600);
/// How long a draining proxy waits for sessions to end before closing them.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest drain timeout.
pub const MAX_DRAIN_TIMEOUT: Duration = Duration::from_secs(3600);

// ---- agent ----------------------------------------------------------------------------------

/// Where the agent keeps its key and certificate when `data_dir` is absent.
pub const DEFAULT_AGENT_DATA_DIR: &str = "/var/lib/remoteler-agent";
/// The forward an agent gets when the file has no `[[forwards]]`: its service name...
pub const DEFAULT_FORWARD_NAME: &str = "ssh";
/// ...and its target, the local sshd.
pub const DEFAULT_FORWARD_TARGET: &str = "127.0.0.1:22";
/// The sshd host key the agent has certified when `ssh_host_key` is absent (used only if the
/// file exists); its certificate goes beside it as `ssh_host_ed25519_key-cert.pub`.
pub const DEFAULT_SSH_HOST_KEY: &str = "/etc/ssh/ssh_host_ed25519_key.pub";
/// Most forwards one agent may have; each is announced.
pub const MAX_FORWARDS: usize = 64;
/// First wait before reconnecting after a tunnel drops.
pub const DEFAULT_BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest wait between reconnection attempts.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Shortest `backoff.min`: ten thousand agents retrying faster are a stampede.
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest `backoff.max`: a node should not stay unreachable for hours after the proxy is back.
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// Longest inline join token, in characters.
pub const MAX_TOKEN_LEN: usize = 512;

// ---- both: logging --------------------------------------------------------------------------

/// Log filter when `log.level` is absent.
pub const DEFAULT_LOG_LEVEL: &str = "info";

// ---- proxy: roles ---------------------------------------------------------------------------

/// The role every cluster has without a `[[roles]]` entry: every node, the user's own logins.
/// A `[[roles]]` entry with this name replaces it.
pub const BUILTIN_ROLE: &str = "access";
/// In a role's `logins`: the logins set on the user (`remoteler-proxy users add --logins`).
pub const USER_LOGINS_TEMPLATE: &str = "{{user.logins}}";
/// `max_cert_ttl` of a role that does not set one (and of the built-in role): the default
/// lifetime of a user certificate.
pub const DEFAULT_ROLE_MAX_CERT_TTL: Duration = Duration::from_secs(12 * 3600);
/// Shortest `max_cert_ttl`.
pub const MIN_ROLE_MAX_CERT_TTL: Duration = Duration::from_secs(60);
/// Longest `max_cert_ttl`: a stolen certificate is useful until it expires or the user is
/// locked (`users lock`), whichever comes first.
pub const MAX_ROLE_MAX_CERT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Most `[[roles]]` entries, and most patterns or logins in one role.
pub const MAX_ROLES: usize = 256;
