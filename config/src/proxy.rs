//! `remoteler-proxy`'s configuration file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::{NonZeroU16, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::common::{FlowConfig, KeepaliveConfig, LogConfig, RawFlow, RawKeepalive, RawLog};
use crate::defaults::*;
use crate::document::Document;
use crate::error::{ConfigError, FieldError, ForKey, InvalidValue, WithinKey};
use crate::trust::{RawTrustedCluster, TrustedCluster, trusted_clusters};
use crate::value::{
    ClusterName, HostPort, IpNetwork, Labels, NodeName, RawDuration, RawSize, RoleName,
    duration_in, integer_in, listen_address, parse_key, quoted, size_in,
};

/// Everything `remoteler-proxy` reads from its file, every default filled in.
///
/// Relative paths in the file are resolved against the file's directory, so the meaning of a
/// file does not depend on where the proxy was started from.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyConfig {
    /// `cluster_name`, required: goes into every certificate the cluster's CA signs.
    pub cluster_name: ClusterName,
    /// `data_dir`: CA, certificates, tokens, the admin socket; default
    /// [`DEFAULT_PROXY_DATA_DIR`].
    pub data_dir: PathBuf,
    /// `workers`: how many cores run a runtime.
    pub workers: Workers,
    /// `pin_workers`: bind worker thread N to the Nth CPU the process may run on (a dedicated
    /// appliance); default false (a shared host's scheduler knows better).
    pub pin_workers: bool,
    /// `[listen]`: the four listeners.
    pub listen: ListenConfig,
    /// `[keepalive]`: liveness of tunnels and user connections.
    pub keepalive: KeepaliveConfig,
    /// `[flow]`: per-stream flow control.
    pub flow: FlowConfig,
    /// `[limits]`: caps on what peers can make the proxy hold.
    pub limits: LimitsConfig,
    /// `[auth]`: what agents on the auth listener may register.
    pub auth: AuthConfig,
    /// `[resume]`: how long streams of a dropped tunnel wait for it.
    pub resume: ResumeConfig,
    /// `[drain]`: graceful shutdown.
    pub drain: DrainConfig,
    /// `[audit]`: the audit log.
    pub audit: AuditConfig,
    /// `[log]`: the program's log.
    pub log: LogConfig,
    /// `[[nodes]]`: regular nodes the proxy dials directly; names are unique.
    pub nodes: Vec<StaticNode>,
    /// `[[roles]]`: what users may reach, and as which logins; names are unique. The built-in
    /// role [`BUILTIN_ROLE`] exists besides these unless one of them has its name.
    pub roles: Vec<RoleConfig>,
    /// `[[trusted_clusters]]`: root clusters this (leaf) cluster joins and keeps a tunnel to;
    /// names are unique.
    pub trusted_clusters: Vec<TrustedCluster>,
}

impl ProxyConfig {
    /// Reads and checks a proxy configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::read(path, e))?;
        Self::from_toml_str(&text, path)
    }

    /// Checks a proxy configuration held in memory; `path` is used in error messages and to
    /// resolve relative paths (its directory).
    pub fn from_toml_str(text: &str, path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let (raw, document) = Document::parse::<RawProxyConfig>(text, path)?;
        let mut config = Self::try_from(raw).map_err(|e| document.field_error(e))?;
        if let Some(base) = document.base_dir() {
            config.data_dir = base.join(&config.data_dir);
            config.audit.path = base.join(&config.audit.path);
            for trusted in &mut config.trusted_clusters {
                if let crate::JoinToken::File(token_file) = &mut trusted.join.token {
                    *token_file = base.join(&*token_file);
                }
            }
        }
        Ok(config)
    }

    /// The configuration of a file that sets only `cluster_name` and `data_dir`: every other
    /// value is its default. For quick starts driven by command-line flags, which then
    /// overwrite fields.
    pub fn with_data_dir(cluster_name: ClusterName, data_dir: impl Into<PathBuf>) -> Self {
        let data_dir = data_dir.into();
        Self {
            cluster_name,
            audit: AuditConfig {
                path: data_dir.join(DEFAULT_AUDIT_FILE),
            },
            data_dir,
            workers: Workers::AllCores,
            pin_workers: false,
            listen: ListenConfig::default(),
            keepalive: KeepaliveConfig::default(),
            flow: FlowConfig::default(),
            limits: LimitsConfig::default(),
            auth: AuthConfig::default(),
            resume: ResumeConfig::default(),
            drain: DrainConfig::default(),
            log: LogConfig::default(),
            nodes: Vec::new(),
            roles: Vec::new(),
            trusted_clusters: Vec::new(),
        }
    }
}

/// `workers`: how many threads (one monoio runtime each) the proxy runs. `0` or absent means
/// one per core; at most [`MAX_WORKERS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Workers {
    /// One per available core.
    #[default]
    AllCores,
    /// Exactly this many.
    Count(NonZeroU16),
}

impl Workers {
    /// The number of workers on this machine: `available_parallelism` for [`Workers::AllCores`]
    /// (1 if the machine will not say).
    pub fn resolve(self) -> NonZeroUsize {
        match self {
            Self::Count(count) => count.into(),
            Self::AllCores => std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN),
        }
    }
}

/// `[listen]`: the addresses the proxy binds. Port 0 asks for any free port (tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenConfig {
    /// `users`: where `remoteler` connects; default [`DEFAULT_USER_LISTEN`].
    pub users: SocketAddr,
    /// `tunnels`: where agents and leaf clusters connect; default [`DEFAULT_TUNNEL_LISTEN`].
    pub tunnels: SocketAddr,
    /// `auth`: where directly dialled agents register; default [`DEFAULT_AUTH_LISTEN`].
    pub auth: SocketAddr,
    /// `metrics`: Prometheus; default [`DEFAULT_METRICS_LISTEN`], `"off"` to disable.
    pub metrics: MetricsListen,
}

/// `listen.metrics`: an address, or `"off"` (also `""`) for no metrics listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsListen {
    /// No metrics listener.
    Disabled,
    /// Serve metrics here.
    Listen(SocketAddr),
}

impl MetricsListen {
    /// The address, when enabled.
    pub fn addr(self) -> Option<SocketAddr> {
        match self {
            Self::Disabled => None,
            Self::Listen(addr) => Some(addr),
        }
    }
}

fn default_address(text: &str) -> SocketAddr {
    // The defaults are constants, and a test parses each of them.
    text.parse().expect("default listen addresses parse")
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            users: default_address(DEFAULT_USER_LISTEN),
            tunnels: default_address(DEFAULT_TUNNEL_LISTEN),
            auth: default_address(DEFAULT_AUTH_LISTEN),
            metrics: MetricsListen::Listen(default_address(DEFAULT_METRICS_LISTEN)),
        }
    }
}

/// `[limits]`: every count, size and time a peer controls has a cap, so the memory and slots a
/// peer can make the proxy hold are bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Streams open at once on one tunnel, 1 to [`MAX_MAX_STREAMS_PER_TUNNEL`]; default
    /// [`DEFAULT_MAX_STREAMS_PER_TUNNEL`]. With the window, bounds the memory of one tunnel.
    pub max_streams_per_tunnel: u32,
    /// Stream bytes one connection may make the proxy hold each way across its streams,
    /// [`MIN_MAX_BUFFERED_PER_CONNECTION`] to [`MAX_MAX_BUFFERED_PER_CONNECTION`]; default
    /// [`DEFAULT_MAX_BUFFERED_PER_CONNECTION`]. Windows bound a stream; this bounds a tunnel.
    pub max_buffered_per_connection: u32,
    /// OPENs waiting for an answer on one tunnel, 1 to [`MAX_MAX_PENDING_OPENS`]; default
    /// [`DEFAULT_MAX_PENDING_OPENS`]. An agent that never answers cannot pile up sessions.
    pub max_pending_opens: u32,
    /// Connections in TLS/HELLO at once, 1 to [`MAX_MAX_HANDSHAKES_IN_PROGRESS`]; default
    /// [`DEFAULT_MAX_HANDSHAKES_IN_PROGRESS`]. Bounds the cost of a reconnect storm.
    pub max_handshakes_in_progress: u32,
    /// Of those, from one source address, 1 to [`MAX_MAX_HANDSHAKES_IN_PROGRESS`]; default
    /// [`DEFAULT_MAX_HANDSHAKES_PER_SOURCE`]. One address cannot starve everyone else.
    pub max_handshakes_per_source: u32,
    /// Time to finish TLS and HELLO, [`MIN_HANDSHAKE_TIMEOUT`] to [`MAX_HANDSHAKE_TIMEOUT`];
    /// default [`DEFAULT_HANDSHAKE_TIMEOUT`].
    pub handshake_timeout: Duration,
    /// Time to send the whole TLS ClientHello, [`MIN_HANDSHAKE_TIMEOUT`] to
    /// [`MAX_HANDSHAKE_TIMEOUT`]; default [`DEFAULT_HELLO_TIMEOUT`]. The proxy applies at most
    /// `handshake_timeout`.
    pub hello_timeout: Duration,
    /// Largest ANNOUNCE, in bytes, [`MIN_MAX_ANNOUNCE_BYTES`] to [`MAX_MAX_ANNOUNCE_BYTES`];
    /// default [`DEFAULT_MAX_ANNOUNCE_BYTES`].
    pub max_announce_bytes: u32,
    /// Tunnels held at once, agents' and leaf clusters', 1 to [`MAX_MAX_TUNNELS`]; default
    /// [`DEFAULT_MAX_TUNNELS`]. The process's open-file limit may bind first.
    pub max_tunnels: u32,
    /// Failed password logins in a row that lock the account out, 1 to
    /// [`MAX_LOGIN_LOCKOUT_FAILURES`]; default [`DEFAULT_LOGIN_LOCKOUT_FAILURES`]. Guessing one
    /// account's password from many addresses stops there.
    pub login_lockout_failures: u32,
    /// How long a locked-out account's logins are refused (without checking the password),
    /// [`MIN_LOGIN_LOCKOUT`] to [`MAX_LOGIN_LOCKOUT`]; default [`DEFAULT_LOGIN_LOCKOUT`].
    /// `remoteler-proxy users unlock` lifts it sooner.
    pub login_lockout: Duration,
    /// Tunnels one leaf cluster may hold at once, 1 to [`MAX_MAX_TUNNELS_PER_CLUSTER`];
    /// default [`DEFAULT_MAX_TUNNELS_PER_CLUSTER`]. A leaf opens one per worker of its own.
    pub max_tunnels_per_cluster: u32,
    /// Nodes one leaf cluster may announce over all its tunnels, 1 to
    /// [`MAX_MAX_ANNOUNCED_NODES`]; default [`DEFAULT_MAX_ANNOUNCED_NODES`].
    pub max_announced_nodes: u32,
    /// Streams one user may hold at once through one node's (or leaf cluster's) tunnel, 1 to
    /// [`MAX_MAX_STREAMS_PER_TUNNEL`]; default a quarter of `max_streams_per_tunnel`
    /// ([`DEFAULT_STREAMS_PER_USER_DIVISOR`]), so one user cannot take every slot.
    pub max_streams_per_user_per_node: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_streams_per_tunnel: DEFAULT_MAX_STREAMS_PER_TUNNEL,
            max_buffered_per_connection: DEFAULT_MAX_BUFFERED_PER_CONNECTION,
            max_pending_opens: DEFAULT_MAX_PENDING_OPENS,
            max_handshakes_in_progress: DEFAULT_MAX_HANDSHAKES_IN_PROGRESS,
            max_handshakes_per_source: DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            hello_timeout: DEFAULT_HELLO_TIMEOUT,
            max_announce_bytes: DEFAULT_MAX_ANNOUNCE_BYTES,
            max_tunnels: DEFAULT_MAX_TUNNELS,
            login_lockout_failures: DEFAULT_LOGIN_LOCKOUT_FAILURES,
            login_lockout: DEFAULT_LOGIN_LOCKOUT,
            max_tunnels_per_cluster: DEFAULT_MAX_TUNNELS_PER_CLUSTER,
            max_announced_nodes: DEFAULT_MAX_ANNOUNCED_NODES,
            max_streams_per_user_per_node: default_streams_per_user(DEFAULT_MAX_STREAMS_PER_TUNNEL),
        }
    }
}

/// `[auth]`: what agents that register on the auth listener (direct mode) may make the proxy
/// dial.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthConfig {
    /// `register_networks`: networks a registered `ssh_address` may lie in besides the agent's
    /// own source address; default [`DEFAULT_REGISTER_NETWORKS`] (none: an agent registers
    /// only its own address). Loopback addresses are refused unless a listed network lies
    /// wholly inside loopback (`127.0.0.0/8`, `::1/128`); link-local, multicast and
    /// unspecified addresses and the proxy's own listeners are refused whatever is listed.
    pub register_networks: Vec<IpNetwork>,
}

/// `[resume]`: stream resumption after a tunnel drops (the proxy's and the agent's; both
/// sides keep a dropped tunnel's streams for their own grace, so set them alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumeConfig {
    /// How long the streams of a dropped tunnel wait for it to reconnect, 0 (no resumption) to
    /// [`MAX_RESUME_GRACE`]; default [`DEFAULT_RESUME_GRACE`].
    pub grace: Duration,
}

impl Default for ResumeConfig {
    fn default() -> Self {
        Self {
            grace: DEFAULT_RESUME_GRACE,
        }
    }
}

/// `[drain]`: graceful shutdown (GOAWAY, then wait).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainConfig {
    /// How long to wait for sessions to end before closing them, 0 to [`MAX_DRAIN_TIMEOUT`];
    /// default [`DEFAULT_DRAIN_TIMEOUT`].
    pub timeout: Duration,
}

impl Default for DrainConfig {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_DRAIN_TIMEOUT,
        }
    }
}

/// `[audit]`: the append-only JSON-lines audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    /// The log file; default `data_dir/`[`DEFAULT_AUDIT_FILE`].
    pub path: PathBuf,
}

/// One `[[nodes]]` entry: a regular node the proxy dials directly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticNode {
    /// `name`: what users type after `ssh`.
    pub name: NodeName,
    /// `address`: its sshd, host and port; a host name is resolved at each dial.
    pub address: HostPort,
    /// `labels`: what roles match on.
    pub labels: Labels,
}

/// One `[[roles]]` entry: which nodes a user holding the role may reach, and as which logins.
///
/// A node is allowed when `allow` matches it and no `deny` of any of the user's roles does:
/// deny wins. The proxy's `roles` module applies these rules; this is only their checked form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleConfig {
    /// `name`: what `remoteler-proxy users add --roles` names.
    pub name: RoleName,
    /// `logins`: the SSH logins (OS user names) the role may use on the nodes it allows;
    /// they become the principals of the user's SSH certificate.
    pub logins: Vec<RoleLogin>,
    /// `max_cert_ttl`: the longest user certificate a holder of this role gets,
    /// [`MIN_ROLE_MAX_CERT_TTL`] to [`MAX_ROLE_MAX_CERT_TTL`]; default
    /// [`DEFAULT_ROLE_MAX_CERT_TTL`].
    pub max_cert_ttl: Duration,
    /// `allow`: the nodes the role reaches.
    pub allow: RoleRules,
    /// `deny`: the nodes no holder of the role reaches, whatever another role allows.
    pub deny: RoleRules,
}

/// One entry of a role's `logins`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleLogin {
    /// [`USER_LOGINS_TEMPLATE`]: the logins set on the user.
    UserLogins,
    /// This login.
    Name(String),
}

/// `allow` or `deny` of a role. A node matches when its name matches one of `nodes`, or when
/// `labels` is not empty and every one of its labels matches the node's label of that key.
/// Patterns and label values are exact, or globs where `*` stands for any characters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoleRules {
    /// `nodes`: node name patterns, e.g. `"node-*"`; `"*"` is every node.
    pub nodes: Vec<String>,
    /// `labels`: label key = value pattern, e.g. `{ env = "prod" }` or `{ team = "*" }`.
    pub labels: Labels,
    /// `clusters`: trusted leaf cluster name patterns, e.g. `["leaf-*"]`; `"*"` is every
    /// leaf. Without an allow here a role reaches no leaf cluster.
    pub clusters: Vec<String>,
}

impl RoleRules {
    /// Whether the rules match nothing at all.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty() && self.labels.is_empty() && self.clusters.is_empty()
    }
}

// ---- raw file structure ---------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProxyConfig {
    cluster_name: Option<String>,
    data_dir: Option<PathBuf>,
    workers: Option<i64>,
    pin_workers: Option<bool>,
    #[serde(default)]
    listen: RawListen,
    #[serde(default)]
    keepalive: RawKeepalive,
    #[serde(default)]
    flow: RawFlow,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    resume: RawResume,
    #[serde(default)]
    drain: RawDrain,
    #[serde(default)]
    audit: RawAudit,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    nodes: Vec<RawNode>,
    #[serde(default)]
    roles: Vec<RawRole>,
    #[serde(default)]
    trusted_clusters: Vec<RawTrustedCluster>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRole {
    name: Option<String>,
    logins: Option<Vec<String>>,
    max_cert_ttl: Option<RawDuration>,
    #[serde(default)]
    allow: RawRules,
    #[serde(default)]
    deny: RawRules,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRules {
    nodes: Option<Vec<String>>,
    labels: Option<BTreeMap<String, String>>,
    clusters: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    users: Option<String>,
    tunnels: Option<String>,
    auth: Option<String>,
    metrics: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_streams_per_tunnel: Option<i64>,
    max_buffered_per_connection: Option<RawSize>,
    max_pending_opens: Option<i64>,
    max_handshakes_in_progress: Option<i64>,
    max_handshakes_per_source: Option<i64>,
    handshake_timeout: Option<RawDuration>,
    hello_timeout: Option<RawDuration>,
    max_announce_bytes: Option<RawSize>,
    max_tunnels: Option<i64>,
    login_lockout_failures: Option<i64>,
    login_lockout: Option<RawDuration>,
    max_tunnels_per_cluster: Option<i64>,
    max_announced_nodes: Option<i64>,
    max_streams_per_user_per_node: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    register_networks: Option<Vec<String>>,
}

impl TryFrom<RawAuth> for AuthConfig {
    type Error = FieldError;
    fn try_from(raw: RawAuth) -> Result<Self, FieldError> {
        let texts = raw.register_networks.unwrap_or_else(|| {
            DEFAULT_REGISTER_NETWORKS
                .iter()
                .map(|n| (*n).to_owned())
                .collect()
        });
        if texts.len() > MAX_REGISTER_NETWORKS {
            return Err(FieldError::new(
                "register_networks",
                InvalidValue::new(
                    format!("at most {MAX_REGISTER_NETWORKS} networks"),
                    format!("{} networks", texts.len()),
                ),
            ));
        }
        let mut register_networks = Vec::with_capacity(texts.len());
        for (index, text) in texts.iter().enumerate() {
            let network = text
                .parse::<IpNetwork>()
                .for_key("register_networks")
                .map_err(|e| e.with_index(index))?;
            register_networks.push(network);
        }
        Ok(AuthConfig { register_networks })
    }
}

/// `limits.max_streams_per_user_per_node` when the file does not set it.
fn default_streams_per_user(max_streams_per_tunnel: u32) -> u32 {
    (max_streams_per_tunnel / DEFAULT_STREAMS_PER_USER_DIVISOR).max(1)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawResume {
    grace: Option<RawDuration>,
}

impl TryFrom<RawResume> for ResumeConfig {
    type Error = FieldError;
    fn try_from(raw: RawResume) -> Result<Self, FieldError> {
        Ok(ResumeConfig {
            grace: duration_in(
                raw.grace,
                DEFAULT_RESUME_GRACE,
                Duration::ZERO,
                MAX_RESUME_GRACE,
            )
            .for_key("grace")?,
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDrain {
    timeout: Option<RawDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    path: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: Option<String>,
    address: Option<String>,
    labels: Option<BTreeMap<String, String>>,
}

// ---- conversion -----------------------------------------------------------------------------

impl TryFrom<RawProxyConfig> for ProxyConfig {
    type Error = FieldError;

    fn try_from(raw: RawProxyConfig) -> Result<Self, FieldError> {
        let cluster_name = parse_key::<ClusterName>(raw.cluster_name.as_deref(), "cluster_name")?
            .ok_or_else(|| {
            FieldError::missing(
                "cluster_name",
                "a cluster name such as \"example.com\" (it is written into the cluster's \
                     certificates)",
            )
        })?;
        let data_dir = path_key(raw.data_dir, "data_dir")?
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PROXY_DATA_DIR));
        let workers = match integer_in(raw.workers, 0, 0, MAX_WORKERS).for_key("workers")? {
            0 => Workers::AllCores,
            count => Workers::Count(NonZeroU16::new(count).unwrap_or(NonZeroU16::MIN)),
        };
        let audit = AuditConfig {
            path: path_key(raw.audit.path, "path")
                .within("audit")?
                .unwrap_or_else(|| data_dir.join(DEFAULT_AUDIT_FILE)),
        };
        Ok(Self {
            cluster_name,
            data_dir,
            workers,
            pin_workers: raw.pin_workers.unwrap_or(false),
            listen: ListenConfig::try_from(raw.listen).within("listen")?,
            keepalive: KeepaliveConfig::try_from(raw.keepalive).within("keepalive")?,
            flow: FlowConfig::try_from(raw.flow).within("flow")?,
            limits: LimitsConfig::try_from(raw.limits).within("limits")?,
            auth: AuthConfig::try_from(raw.auth).within("auth")?,
            resume: ResumeConfig::try_from(raw.resume).within("resume")?,
            drain: DrainConfig {
                timeout: duration_in(
                    raw.drain.timeout,
                    DEFAULT_DRAIN_TIMEOUT,
                    Duration::ZERO,
                    MAX_DRAIN_TIMEOUT,
                )
                .for_key("timeout")
                .within("drain")?,
            },
            audit,
            log: LogConfig::try_from(raw.log).within("log")?,
            nodes: static_nodes(raw.nodes).within("nodes")?,
            roles: roles(raw.roles).within("roles")?,
            trusted_clusters: trusted_clusters(raw.trusted_clusters).within("trusted_clusters")?,
        })
    }
}

/// An optional path key; an empty string is refused rather than read as "here".
pub(crate) fn path_key(raw: Option<PathBuf>, key: &str) -> Result<Option<PathBuf>, FieldError> {
    match raw {
        Some(path) if path.as_os_str().is_empty() => {
            Err(FieldError::new(key, InvalidValue::new("a path", "\"\"")))
        }
        other => Ok(other),
    }
}

impl TryFrom<RawListen> for ListenConfig {
    type Error = FieldError;

    fn try_from(raw: RawListen) -> Result<Self, FieldError> {
        let address = |raw: Option<String>, key: &str, default: &str| match raw {
            None => Ok(default_address(default)),
            Some(text) => listen_address(&text).for_key(key),
        };
        let metrics = match raw.metrics.as_deref().map(str::trim) {
            None => MetricsListen::Listen(default_address(DEFAULT_METRICS_LISTEN)),
            Some("off" | "") => MetricsListen::Disabled,
            Some(text) => MetricsListen::Listen(listen_address(text).for_key("metrics")?),
        };
        let config = Self {
            users: address(raw.users, "users", DEFAULT_USER_LISTEN)?,
            tunnels: address(raw.tunnels, "tunnels", DEFAULT_TUNNEL_LISTEN)?,
            auth: address(raw.auth, "auth", DEFAULT_AUTH_LISTEN)?,
            metrics,
        };
        config.check_distinct()?;
        Ok(config)
    }
}

impl ListenConfig {
    /// Two listeners on one port would share it (SO_REUSEPORT) or fail to bind; say so now.
    fn check_distinct(&self) -> Result<(), FieldError> {
        let mut named = vec![
            ("users", self.users),
            ("tunnels", self.tunnels),
            ("auth", self.auth),
        ];
        if let MetricsListen::Listen(metrics) = self.metrics {
            named.push(("metrics", metrics));
        }
        for (i, (key, address)) in named.iter().enumerate() {
            for (earlier_key, earlier) in &named[..i] {
                let overlap = address.port() != 0
                    && address.port() == earlier.port()
                    && (address.ip() == earlier.ip()
                        || address.ip().is_unspecified()
                        || earlier.ip().is_unspecified());
                if overlap {
                    return Err(FieldError::new(
                        key,
                        InvalidValue::new(
                            format!(
                                "an address whose port is not already used by `listen.{earlier_key}` \
                                 ({earlier})"
                            ),
                            quoted(&address.to_string()),
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl TryFrom<RawLimits> for LimitsConfig {
    type Error = FieldError;

    fn try_from(raw: RawLimits) -> Result<Self, FieldError> {
        let max_streams_per_tunnel = integer_in(
            raw.max_streams_per_tunnel,
            DEFAULT_MAX_STREAMS_PER_TUNNEL,
            1,
            MAX_MAX_STREAMS_PER_TUNNEL,
        )
        .for_key("max_streams_per_tunnel")?;
        Ok(Self {
            max_streams_per_tunnel,
            max_buffered_per_connection: size_in(
                raw.max_buffered_per_connection,
                DEFAULT_MAX_BUFFERED_PER_CONNECTION,
                MIN_MAX_BUFFERED_PER_CONNECTION,
                MAX_MAX_BUFFERED_PER_CONNECTION,
            )
            .for_key("max_buffered_per_connection")?,
            max_pending_opens: integer_in(
                raw.max_pending_opens,
                DEFAULT_MAX_PENDING_OPENS,
                1,
                MAX_MAX_PENDING_OPENS,
            )
            .for_key("max_pending_opens")?,
            max_handshakes_in_progress: integer_in(
                raw.max_handshakes_in_progress,
                DEFAULT_MAX_HANDSHAKES_IN_PROGRESS,
                1,
                MAX_MAX_HANDSHAKES_IN_PROGRESS,
            )
            .for_key("max_handshakes_in_progress")?,
            max_handshakes_per_source: integer_in(
                raw.max_handshakes_per_source,
                DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
                1,
                MAX_MAX_HANDSHAKES_IN_PROGRESS,
            )
            .for_key("max_handshakes_per_source")?,
            handshake_timeout: duration_in(
                raw.handshake_timeout,
                DEFAULT_HANDSHAKE_TIMEOUT,
                MIN_HANDSHAKE_TIMEOUT,
                MAX_HANDSHAKE_TIMEOUT,
            )
            .for_key("handshake_timeout")?,
            hello_timeout: duration_in(
                raw.hello_timeout,
                DEFAULT_HELLO_TIMEOUT,
                MIN_HANDSHAKE_TIMEOUT,
                MAX_HANDSHAKE_TIMEOUT,
            )
            .for_key("hello_timeout")?,
            max_announce_bytes: size_in(
                raw.max_announce_bytes,
                DEFAULT_MAX_ANNOUNCE_BYTES,
                MIN_MAX_ANNOUNCE_BYTES,
                MAX_MAX_ANNOUNCE_BYTES,
            )
            .for_key("max_announce_bytes")?,
            max_tunnels: integer_in(raw.max_tunnels, DEFAULT_MAX_TUNNELS, 1, MAX_MAX_TUNNELS)
                .for_key("max_tunnels")?,
            login_lockout_failures: integer_in(
                raw.login_lockout_failures,
                DEFAULT_LOGIN_LOCKOUT_FAILURES,
                1,
                MAX_LOGIN_LOCKOUT_FAILURES,
            )
            .for_key("login_lockout_failures")?,
            login_lockout: duration_in(
                raw.login_lockout,
                DEFAULT_LOGIN_LOCKOUT,
                MIN_LOGIN_LOCKOUT,
                MAX_LOGIN_LOCKOUT,
            )
            .for_key("login_lockout")?,
            max_tunnels_per_cluster: integer_in(
                raw.max_tunnels_per_cluster,
                DEFAULT_MAX_TUNNELS_PER_CLUSTER,
                1,
                MAX_MAX_TUNNELS_PER_CLUSTER,
            )
            .for_key("max_tunnels_per_cluster")?,
            max_announced_nodes: integer_in(
                raw.max_announced_nodes,
                DEFAULT_MAX_ANNOUNCED_NODES,
                1,
                MAX_MAX_ANNOUNCED_NODES,
            )
            .for_key("max_announced_nodes")?,
            max_streams_per_user_per_node: integer_in(
                raw.max_streams_per_user_per_node,
                default_streams_per_user(max_streams_per_tunnel),
                1,
                MAX_MAX_STREAMS_PER_TUNNEL,
            )
            .for_key("max_streams_per_user_per_node")?,
        })
    }
}

fn static_nodes(raw: Vec<RawNode>) -> Result<Vec<StaticNode>, FieldError> {
    let mut nodes: Vec<StaticNode> = Vec::with_capacity(raw.len());
    for (index, raw) in raw.into_iter().enumerate() {
        let node = static_node(raw).at_index(index)?;
        if let Some(first) = nodes.iter().position(|other| other.name == node.name) {
            return Err(FieldError::new(
                "name",
                InvalidValue::new(
                    format!("a node name not already used by `nodes[{first}].name`"),
                    quoted(node.name.as_str()),
                ),
            ))
            .at_index(index);
        }
        nodes.push(node);
    }
    Ok(nodes)
}

fn static_node(raw: RawNode) -> Result<StaticNode, FieldError> {
    let name = parse_key::<NodeName>(raw.name.as_deref(), "name")?
        .ok_or_else(|| FieldError::missing("name", "a node name such as \"node-a\""))?;
    let address = parse_key::<HostPort>(raw.address.as_deref(), "address")?.ok_or_else(|| {
        FieldError::missing(
            "address",
            "the node's sshd as host:port, e.g. \"10.0.0.5:22\"",
        )
    })?;
    Ok(StaticNode {
        name,
        address,
        labels: Labels::from_raw(raw.labels)?,
    })
}

fn roles(raw: Vec<RawRole>) -> Result<Vec<RoleConfig>, FieldError> {
    if raw.len() > MAX_ROLES {
        return Err(FieldError {
            key: crate::error::KeyPath::root(),
            value: InvalidValue::new(
                format!("at most {MAX_ROLES} roles"),
                format!("{} roles", raw.len()),
            ),
        });
    }
    let mut roles: Vec<RoleConfig> = Vec::with_capacity(raw.len());
    for (index, raw) in raw.into_iter().enumerate() {
        let role = role(raw).at_index(index)?;
        if let Some(first) = roles.iter().position(|other| other.name == role.name) {
            return Err(FieldError::new(
                "name",
                InvalidValue::new(
                    format!("a role name not already used by `roles[{first}].name`"),
                    quoted(role.name.as_str()),
                ),
            ))
            .at_index(index);
        }
        roles.push(role);
    }
    Ok(roles)
}

fn role(raw: RawRole) -> Result<RoleConfig, FieldError> {
    let name = parse_key::<RoleName>(raw.name.as_deref(), "name")?
        .ok_or_else(|| FieldError::missing("name", "a role name such as \"dev\""))?;
    let raw_logins = raw.logins.unwrap_or_default();
    if raw_logins.len() > MAX_ROLES {
        return Err(FieldError::new(
            "logins",
            InvalidValue::new(
                format!("at most {MAX_ROLES} logins"),
                format!("{} logins", raw_logins.len()),
            ),
        ));
    }
    let mut logins = Vec::with_capacity(raw_logins.len());
    for (index, text) in raw_logins.into_iter().enumerate() {
        let login = if text == USER_LOGINS_TEMPLATE {
            RoleLogin::UserLogins
        } else {
            check_login(&text)
                .for_key("logins")
                .map_err(|e| e.with_index(index))?;
            RoleLogin::Name(text)
        };
        if !logins.contains(&login) {
            logins.push(login);
        }
    }
    Ok(RoleConfig {
        name,
        logins,
        max_cert_ttl: duration_in(
            raw.max_cert_ttl,
            DEFAULT_ROLE_MAX_CERT_TTL,
            MIN_ROLE_MAX_CERT_TTL,
            MAX_ROLE_MAX_CERT_TTL,
        )
        .for_key("max_cert_ttl")?,
        allow: rules(raw.allow).within("allow")?,
        deny: rules(raw.deny).within("deny")?,
    })
}

fn rules(raw: RawRules) -> Result<RoleRules, FieldError> {
    let nodes = raw.nodes.unwrap_or_default();
    if nodes.len() > MAX_ROLES {
        return Err(FieldError::new(
            "nodes",
            InvalidValue::new(
                format!("at most {MAX_ROLES} patterns"),
                format!("{} patterns", nodes.len()),
            ),
        ));
    }
    for (index, pattern) in nodes.iter().enumerate() {
        check_node_pattern(pattern)
            .for_key("nodes")
            .map_err(|e| e.with_index(index))?;
    }
    let clusters = raw.clusters.unwrap_or_default();
    if clusters.len() > MAX_ROLES {
        return Err(FieldError::new(
            "clusters",
            InvalidValue::new(
                format!("at most {MAX_ROLES} patterns"),
                format!("{} patterns", clusters.len()),
            ),
        ));
    }
    for (index, pattern) in clusters.iter().enumerate() {
        check_node_pattern(pattern)
            .map_err(|_| {
                InvalidValue::new(
                    "a cluster name pattern of 1 to 63 characters: lowercase letters, digits, \
                     '-', '.', and '*' for any characters (\"*\" is every trusted cluster)",
                    quoted(pattern),
                )
            })
            .for_key("clusters")
            .map_err(|e| e.with_index(index))?;
    }
    Ok(RoleRules {
        nodes,
        labels: Labels::from_raw(raw.labels)?,
        clusters,
    })
}

/// A node name pattern: a node name in which `*` may stand for any characters.
fn check_node_pattern(text: &str) -> Result<(), InvalidValue> {
    let ok = (1..=63).contains(&text.len())
        && text.chars().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.' | '_' | '*')
        });
    if ok {
        return Ok(());
    }
    Err(InvalidValue::new(
        "a node name pattern of 1 to 63 characters: lowercase letters, digits, '-', '.', '_', \
         and '*' for any characters (\"*\" is every node)",
        quoted(text),
    ))
}

/// A login: what `users add --logins` accepts (it goes into the user's certificates).
fn check_login(text: &str) -> Result<(), InvalidValue> {
    let ok = (1..=63).contains(&text.len())
        && !text.starts_with(['.', '-'])
        && text
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.' | '_'));
    if ok {
        return Ok(());
    }
    Err(InvalidValue::new(
        format!(
            "a login of 1 to 63 characters (lowercase letters, digits, '-', '.', '_', not \
             starting with '.' or '-'), or {USER_LOGINS_TEMPLATE:?} for the user's own logins"
        ),
        quoted(text),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_addresses_parse() {
        let listen = ListenConfig::default();
        assert_eq!(listen.users.port(), 3023);
        assert_eq!(listen.tunnels.port(), 3024);
        assert_eq!(listen.auth.port(), 3025);
        assert_eq!(
            listen.metrics.addr(),
            Some("127.0.0.1:3026".parse().unwrap())
        );
    }

    #[test]
    fn workers_resolve_to_at_least_one() {
        assert!(Workers::AllCores.resolve().get() >= 1);
        let four = Workers::Count(NonZeroU16::new(4).unwrap());
        assert_eq!(four.resolve().get(), 4);
    }
}
