//! `remoteler-agent`: the minimal edge agent.
//!
//! It joins the cluster once (join token + CA pin → node certificate in its data directory),
//! then, depending on its mode:
//!
//! * **tunnel** (`proxy = "host:3024"`): keeps one mutual-TLS reverse tunnel to the proxy,
//!   announces its node name, labels and services, and forwards each stream the proxy opens
//!   to the configured target of that service. A stream for any other service is refused with
//!   `TARGET_NOT_ALLOWED`: the agent dials nothing but its `[[forwards]]`.
//! * **direct** (`auth = "host:3025"`): registers its `ssh_address` with heartbeats; the proxy
//!   dials the node itself.
//!
//! In both modes it keeps the local sshd's host certificate fresh ([`hostcert`]).
//!
//! Whatever goes wrong with the network, it reconnects forever with jittered exponential
//! backoff. It runs on one thread (a monoio runtime, io_uring or epoll) and holds no buffers
//! while idle beyond what the TLS session needs.
//!
//! What it does not do (yet): resume streams across a reconnect (each connection is a new
//! session), reload its configuration, rotate its certificate.

pub mod backoff;
pub mod cli;
pub mod hostcert;
pub mod net;
pub mod register;
pub mod splice;
pub mod stop;
pub mod store;
pub mod tunnel_mode;

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use config::{AgentConfig, AgentMode, ConfigError, HostPort};
use tracing::{debug, info, warn};
use tunnel::identity::IdentityError;

use crate::backoff::{Backoff, STABLE_AFTER};
pub use crate::stop::Stop;
use crate::store::JoinError;

/// Why the agent stopped for good (network failures are retried, never returned).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The data directory cannot be created.
    #[error(
        "cannot create the data directory {}: {source}; create it (mode 0700) or set `data_dir`",
        path.display()
    )]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A certificate, key or pin is unusable.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The configuration (for instance the token file) is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Not joined yet, and no token to join with.
    #[error(
        "this agent has not joined the cluster yet (no node.crt in {}) and has no join token: \
         set `join.token_file` (or --token-file) to a token from \
         `remoteler-proxy tokens add --kind node`",
        dir.display()
    )]
    NoToken {
        /// The data directory.
        dir: PathBuf,
    },
    /// The stored certificate has expired and there is no token to join again.
    #[error(
        "the node certificate in {} expired at {}; give the agent a new join token \
         (`remoteler-proxy tokens add --kind node`, then --token-file) to join again",
        dir.display(), humantime::format_rfc3339_seconds(*not_after)
    )]
    Expired {
        /// The data directory.
        dir: PathBuf,
        /// End of validity.
        not_after: SystemTime,
    },
    /// Only some of node.key, node.crt, ca.crt exist.
    #[error(
        "{} holds only part of an identity (node.key, node.crt and ca.crt go together); \
         remove the ones that are there and join again with a new token",
        dir.display()
    )]
    PartialIdentity {
        /// The data directory.
        dir: PathBuf,
    },
    /// The stored identity is for another node.
    #[error(
        "{} holds the identity of {stored} but node_name is {configured:?}; set node_name back, \
         or remove node.key, node.crt and ca.crt there and join again with a new token",
        dir.display()
    )]
    WrongNode {
        /// The data directory.
        dir: PathBuf,
        /// What the certificate says.
        stored: String,
        /// What the configuration says.
        configured: String,
    },
    /// The proxy refused the join.
    #[error(
        "the proxy refused to let node {node:?} join: {message} ({code}); check the token \
         (tokens expire; single-use tokens work once) and ask for a new one with \
         `remoteler-proxy tokens add --kind node`"
    )]
    JoinRefused {
        /// Node name.
        node: String,
        /// The proxy's code.
        code: String,
        /// The proxy's message.
        message: String,
    },
    /// The proxy's join answer is unusable.
    #[error("the proxy's answer to the join is not usable: {0}")]
    BadJoinResponse(String),
    /// The inventory cannot be announced.
    #[error("cannot announce this node: {0}")]
    Announce(String),
    /// The system random number generator failed.
    #[error("the system random number generator failed: {0}")]
    Random(String),
}

/// 16 random bytes (session ids).
pub fn random_id() -> Result<[u8; 16], AgentError> {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).map_err(|e| AgentError::Random(e.to_string()))?;
    Ok(id)
}

/// The first 8 bytes in hex: enough to grep a session id in both sides' logs.
pub fn short_hex(id: &[u8; 16]) -> String {
    id[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs the agent until `shutdown` completes. Must be called inside a monoio runtime with
/// timers enabled.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + 'static,
) -> Result<(), AgentError> {
    let stop = Stop::from_future(shutdown);
    run_until(config, &stop).await
}

/// As [`run`], with a [`Stop`] the caller triggers.
pub async fn run_until(config: AgentConfig, stop: &Stop) -> Result<(), AgentError> {
    let addr = match &config.mode {
        AgentMode::Tunnel { proxy } => proxy.clone(),
        AgentMode::Direct { auth, ssh_address } => {
            if tunnel_mode::is_loopback(ssh_address) {
                warn!(
                    ssh_address = %ssh_address,
                    "ssh_address is a loopback address: the proxy dials it, so this only works \
                     when the proxy runs on this host; set `ssh_address` to an address the \
                     proxy can reach"
                );
            }
            auth.clone()
        }
    };
    store::ensure_data_dir(&config.data_dir)?;
    let mut backoff = Backoff::new(&config.backoff);
    let Some(node) = identity(&config, &addr, &mut backoff, stop).await? else {
        return Ok(());
    };
    info!(
        node = %node.identity.name,
        cluster = %node.identity.cluster,
        "identity loaded"
    );
    backoff.reset();
    let hostcert_tls = node.client_config(tunnel::control::ALPN_HOSTCERT)?;
    monoio::spawn(hostcert::keep(
        config.clone(),
        addr.clone(),
        hostcert_tls,
        stop.clone(),
    ));
    let mut detached = None;
    loop {
        let end = match &config.mode {
            AgentMode::Tunnel { proxy } => {
                tunnel_mode::run_once(&config, proxy, &node, stop, &mut detached).await?
            }
            AgentMode::Direct { auth, ssh_address } => {
                register::run_once(&config, auth, ssh_address, &node, stop).await?
            }
        };
        if stop.is_stopped() {
            info!("agent stopped");
            return Ok(());
        }
        if end.uptime >= STABLE_AFTER {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        warn!(
            proxy = %addr,
            reason = %end.reason,
            up_for = ?end.uptime,
            attempt = backoff.failures(),
            retry_in = ?delay,
            "disconnected; reconnecting"
        );
        if !sleep_or_stop(delay, stop).await {
            info!("agent stopped");
            return Ok(());
        }
        info!(proxy = %addr, attempt = backoff.failures(), "reconnecting");
    }
}

/// The stored identity, or a new one from a join (retried with backoff on network errors).
/// `None` if stopped first.
async fn identity(
    config: &AgentConfig,
    addr: &HostPort,
    backoff: &mut Backoff,
    stop: &Stop,
) -> Result<Option<store::NodeIdentity>, AgentError> {
    let dir = &config.data_dir;
    loop {
        if let Some(node) = store::load(dir, config.node_name.as_str())? {
            if !store::is_expired(&node, SystemTime::now()) {
                debug!("already joined; the join token is not used");
                return Ok(Some(node));
            }
            warn!(
                not_after = %humantime::format_rfc3339_seconds(node.identity.not_after),
                "the node certificate has expired; joining again"
            );
            if config.join.token.load()?.is_none() {
                return Err(AgentError::Expired {
                    dir: dir.clone(),
                    not_after: node.identity.not_after,
                });
            }
        }
        let token = config
            .join
            .token
            .load()?
            .ok_or_else(|| AgentError::NoToken { dir: dir.clone() })?;
        let result = monoio::select! {
            r = store::join(config, addr, &token) => r,
            _ = stop.wait() => return Ok(None),
        };
        match result {
            Ok(node) => return Ok(Some(node)),
            Err(JoinError::Fatal(e)) => return Err(e),
            Err(e) => {
                let delay = backoff.next_delay();
                warn!(proxy = %addr, error = %e, attempt = backoff.failures(), retry_in = ?delay, "join failed; retrying");
                if !sleep_or_stop(delay, stop).await {
                    return Ok(None);
                }
            }
        }
    }
}

/// Sleeps; false if `stop` came first.
async fn sleep_or_stop(delay: Duration, stop: &Stop) -> bool {
    monoio::select! {
        _ = monoio::time::sleep(delay) => true,
        _ = stop.wait() => false,
    }
}

/// Sets up the log: lines on stderr, text or JSON, filtered by `level` (or `RUST_LOG` if set).
pub fn init_logging(log: &config::LogConfig) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_new(log.level.as_str()).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match log.format {
        config::LogFormat::Json => builder.json().try_init(),
        _ => builder.try_init(),
    };
}
