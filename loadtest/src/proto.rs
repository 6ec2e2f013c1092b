//! What the controller and its worker processes say to each other: one JSON object per
//! line, commands on the worker's stdin, messages on its stdout.

use std::net::SocketAddr;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// What a worker process does.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerSpec {
    /// Simulated agents.
    Agents(AgentsSpec),
    /// Simulated users with sessions.
    Users(UsersSpec),
    /// Plain TCP connections to the baseline echo server.
    Plain(PlainSpec),
}

/// A worker of plain TCP connections (the baseline).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlainSpec {
    /// Worker number.
    pub worker: usize,
    /// The echo server.
    pub addr: SocketAddr,
    /// Connections.
    pub count: usize,
    /// Connects in flight at once.
    pub concurrency: usize,
    /// Loopback source addresses to rotate through.
    pub sources: usize,
}

/// A worker of simulated agents.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentsSpec {
    /// Worker number (picks its source addresses).
    pub worker: usize,
    /// Where joins go (the proxy's tunnel listener).
    pub join_addr: SocketAddr,
    /// Where tunnels go (the proxy's tunnel listener, or a relay in front of it).
    pub tunnel_addr: SocketAddr,
    /// `sha256:...`.
    pub ca_pin: String,
    /// A node join token with enough uses.
    pub token: String,
    /// Node name prefix; node i is `<prefix><i>`.
    pub prefix: String,
    /// First node index of this worker.
    pub first: usize,
    /// Nodes of this worker.
    pub count: usize,
    /// Keepalive interval of the simulated agents (ms).
    pub keepalive_ms: u64,
    /// Missed keepalives before a tunnel is dead.
    pub keepalive_count: u32,
    /// Reconnect backoff floor (ms), as the agent's `[backoff] min`.
    pub backoff_min_ms: u64,
    /// Reconnect backoff cap (ms), as the agent's `[backoff] max`.
    pub backoff_max_ms: u64,
    /// Joins and first connects in flight at once in this worker.
    pub concurrency: usize,
    /// Loopback source addresses to rotate through.
    pub sources: usize,
}

/// A worker of simulated users.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UsersSpec {
    /// Worker number.
    pub worker: usize,
    /// The proxy's users listener (or a relay in front of it).
    pub users_addr: SocketAddr,
    /// `sha256:...`.
    pub ca_pin: String,
    /// User name.
    pub user: String,
    /// Password.
    pub password: String,
    /// Node name prefix.
    pub prefix: String,
    /// Nodes (tunnels) there are; session s goes to node `s % nodes`.
    pub nodes: usize,
    /// First session index of this worker.
    pub first: usize,
    /// Sessions of this worker.
    pub count: usize,
    /// Session setups in flight at once in this worker.
    pub concurrency: usize,
    /// Round trips per session.
    pub rounds: usize,
    /// Bytes per round-trip message.
    pub msg_bytes: usize,
    /// Bytes each session sends (and gets echoed) in the all-streams phase.
    pub bulk_bytes: u64,
    /// Loopback source addresses to rotate through.
    pub sources: usize,
}

/// Controller → worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Agents: join every node.
    Join,
    /// Agents: open every tunnel and keep them up (reconnecting) from now on.
    Connect,
    /// Agents: drop every tunnel's connection at once (no GOAWAY).
    Cut,
    /// Agents: counters and connect times so far.
    Report,
    /// Users: log in and open every session.
    Setup,
    /// Users: round trips on every session.
    Rounds,
    /// Users: every session sends `bulk_bytes` at once.
    Bulk,
    /// Users: one session alone sends this many bytes.
    Single {
        /// Bytes.
        bytes: u64,
    },
    /// Exit.
    Stop,
}

/// A recorded histogram, as (value, count) pairs.
pub type Buckets = Vec<(u64, u64)>;

/// Turns a histogram into its non-empty buckets.
pub fn buckets(h: &Histogram<u64>) -> Buckets {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

/// Worker → controller.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Message {
    /// Agents: a few times a second.
    Progress(AgentCounters),
    /// Agents: all joins finished.
    Joined {
        /// Joins that succeeded.
        ok: usize,
        /// Joins that failed for good.
        failed: usize,
        /// Last error seen.
        last_error: Option<String>,
        /// Time of each successful join (µs), retries included.
        #[serde(default)]
        join_us: Buckets,
    },
    /// Agents: answer to `Report`.
    Report {
        /// Counters.
        counters: AgentCounters,
        /// Time from TCP connect to the proxy's HELLO of each tunnel that came up (µs).
        connect_us: Buckets,
        /// CLOCK_MONOTONIC ns of every tunnel that came up, since the start.
        connect_times_ns: Vec<u64>,
    },
    /// Users: every session set up (or failed).
    SetupDone {
        /// Login time (ms).
        login_ms: f64,
        /// Sessions up.
        ok: usize,
        /// Sessions that failed to open.
        failed: usize,
        /// Setup times (µs).
        setup_us: Buckets,
        /// Last error seen.
        last_error: Option<String>,
    },
    /// Users: round trips done.
    RoundsDone {
        /// Round-trip times (µs).
        rtt_us: Buckets,
        /// Sessions whose round trips failed.
        failed: usize,
        /// Last error seen.
        last_error: Option<String>,
    },
    /// Users: the all-streams phase.
    BulkDone {
        /// Bytes/s of each stream that finished.
        per_stream_bps: Vec<f64>,
        /// Earliest start (CLOCK_MONOTONIC ns).
        start_ns: u64,
        /// Latest end.
        end_ns: u64,
        /// Bytes echoed back in all.
        bytes: u64,
        /// Streams that failed.
        failed: usize,
        /// Last error seen.
        last_error: Option<String>,
    },
    /// Users: the one-stream phase.
    SingleDone {
        /// Bytes echoed back.
        bytes: u64,
        /// Time from the first byte sent to the last byte back (ns).
        elapsed_ns: u64,
        /// Error, if it failed.
        error: Option<String>,
    },
    /// A worker could not go on.
    Fatal {
        /// Why.
        error: String,
    },
}

/// What a worker of agents counts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AgentCounters {
    /// Tunnels up now.
    pub up: usize,
    /// Tunnels that came up since the start (first connects and reconnects).
    pub connects: u64,
    /// Of `connects`, those that resumed a detached session (RESUME) instead of a new one.
    pub resumed: u64,
    /// Tunnels that went down.
    pub disconnects: u64,
    /// Connection attempts that failed (TCP, TLS, or closed before HELLO).
    pub failures: u64,
    /// Joins done.
    pub joined: usize,
    /// Last failure, for the operator.
    pub last_error: Option<String>,
}
