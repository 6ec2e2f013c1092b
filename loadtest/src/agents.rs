//! A worker process of simulated agents: joins, then keeps one mutual-TLS tunnel per node
//! with the real agent's session settings and reconnect backoff, and echoes every stream
//! the proxy opens (the in-process echo target: no extra sockets).
//!
//! What is the agent's own code: the frame `Session`, the `tunnel` TLS and mux driver, and
//! `agent::backoff::Backoff` with `agent::backoff::STABLE_AFTER` (the reconnect policy). What
//! is mirrored: the join (in memory, see [`crate::identity`]), the session settings of
//! `agent::tunnel_mode::session_config` and the single-node ANNOUNCE of
//! `agent::tunnel_mode::announcement` (both take a whole `AgentConfig`), and the reconnect
//! loop of `agent::run_until` (which owns its connection and cannot be told to cut it).

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::BytesMut;
use config::BackoffConfig;
use frame::{Announce, NodeInfo, Role, Session, SessionConfig};
use hdrhistogram::Histogram;
use tunnel::control::ALPN_TUNNEL;
use tunnel::identity::CaPin;
use tunnel::mux::{self, DriveOutcome, MuxStream, Tunnel};

use agent::backoff::{Backoff, STABLE_AFTER};

use crate::identity;
use crate::net::{self, SourcePool};
use crate::proto::{AgentCounters, AgentsSpec, Command, Message, buckets};
use crate::sync::{Inbox, Semaphore, Signal};
use crate::worker::emit;

/// Join attempts per node before it counts as failed.
const JOIN_ATTEMPTS: u32 = 5;
/// How often progress goes to the controller.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

struct Fleet {
    spec: AgentsSpec,
    pin: CaPin,
    sources: SourcePool,
    counters: RefCell<AgentCounters>,
    connect_times: RefCell<Vec<u64>>,
    join_us: RefCell<Histogram<u64>>,
    connect_us: RefCell<Histogram<u64>>,
    configs: RefCell<Vec<Option<Arc<rustls::ClientConfig>>>>,
    sem: Semaphore,
    cut: Signal,
    stop: Signal,
    done: Signal,
    finished: Cell<usize>,
    failed_joins: Cell<usize>,
}

impl Fleet {
    fn node(&self, i: usize) -> String {
        format!("{}{}", self.spec.prefix, self.spec.first + i)
    }

    fn error(&self, e: impl std::fmt::Display) {
        self.counters.borrow_mut().last_error = Some(e.to_string());
    }
}

/// The session settings of `agent::tunnel_mode::session_config` for these flags.
fn session_config(spec: &AgentsSpec) -> SessionConfig {
    let mut c = SessionConfig::new(Role::Agent, true);
    c.keepalive_interval = Duration::from_millis(spec.keepalive_ms);
    c.keepalive_count = spec.keepalive_count;
    // resume_grace stays the default, as the agent's: a cut connection's session waits
    // for the next connection to resume it.
    c
}

fn announcement(node: &str) -> Announce {
    Announce {
        cluster: String::new(),
        nodes: vec![NodeInfo {
            name: node.to_owned(),
            online: true,
            tunnel: true,
            labels: vec![("loadtest".to_owned(), "yes".to_owned())],
            services: vec!["ssh".to_owned()],
        }],
    }
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).context("histogram")
}

fn record(h: &RefCell<Histogram<u64>>, since: Instant) {
    let us = u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX);
    let _ = h.borrow_mut().record(us.clamp(1, 3_600_000_000));
}

fn random_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    if getrandom::fill(&mut id).is_err() {
        id[..8].copy_from_slice(&net::mono_ns().to_le_bytes());
    }
    id
}

/// Runs the worker until `Stop` or the controller goes away.
pub async fn run(spec: AgentsSpec, inbox: Inbox) -> anyhow::Result<()> {
    let pin: CaPin = spec.ca_pin.parse().context("ca pin")?;
    let fleet = Rc::new(Fleet {
        sources: SourcePool::for_worker(spec.worker, spec.sources),
        sem: Semaphore::new(spec.concurrency),
        configs: RefCell::new(vec![None; spec.count]),
        spec,
        pin,
        counters: RefCell::default(),
        connect_times: RefCell::default(),
        join_us: RefCell::new(histogram()?),
        connect_us: RefCell::new(histogram()?),
        cut: Signal::default(),
        stop: Signal::default(),
        done: Signal::default(),
        finished: Cell::new(0),
        failed_joins: Cell::new(0),
    });
    {
        let fleet = fleet.clone();
        monoio::spawn(async move {
            loop {
                monoio::time::sleep(PROGRESS_EVERY).await;
                emit(&Message::Progress(fleet.counters.borrow().clone()));
            }
        });
    }
    while let Some(line) = inbox.next().await {
        let command: Command = serde_json::from_str(&line).context("command from controller")?;
        match command {
            Command::Join => join_all(&fleet).await,
            Command::Connect => {
                for i in 0..fleet.spec.count {
                    let config = fleet.configs.borrow()[i].clone();
                    if let Some(config) = config {
                        monoio::spawn(keep_tunnel(fleet.clone(), i, config));
                    }
                }
            }
            Command::Cut => fleet.cut.raise(),
            Command::Report => emit(&Message::Report {
                counters: fleet.counters.borrow().clone(),
                connect_us: buckets(&fleet.connect_us.borrow()),
                connect_times_ns: fleet.connect_times.borrow().clone(),
            }),
            Command::Stop => break,
            other => anyhow::bail!("an agents worker cannot {other:?}"),
        }
    }
    fleet.stop.raise();
    Ok(())
}

async fn join_all(fleet: &Rc<Fleet>) {
    fleet.finished.set(0);
    for i in 0..fleet.spec.count {
        let fleet = fleet.clone();
        monoio::spawn(async move {
            let ok = join_one(&fleet, i).await;
            if !ok {
                fleet.failed_joins.set(fleet.failed_joins.get() + 1);
            }
            fleet.finished.set(fleet.finished.get() + 1);
            fleet.done.raise();
        });
    }
    while fleet.finished.get() < fleet.spec.count {
        let seen = fleet.done.generation();
        if fleet.finished.get() >= fleet.spec.count {
            break;
        }
        fleet.done.changed(seen).await;
    }
    let failed = fleet.failed_joins.get();
    emit(&Message::Joined {
        ok: fleet.spec.count - failed,
        failed,
        last_error: fleet.counters.borrow().last_error.clone(),
        join_us: buckets(&fleet.join_us.borrow()),
    });
}

async fn join_one(fleet: &Fleet, i: usize) -> bool {
    let node = fleet.node(i);
    let backoff_config = match backoff_config(&fleet.spec) {
        Ok(c) => c,
        Err(e) => {
            fleet.error(e);
            return false;
        }
    };
    let mut backoff = Backoff::new(&backoff_config);
    for _ in 0..JOIN_ATTEMPTS {
        let (result, started) = {
            let _permit = fleet.sem.acquire().await;
            // Join time is the exchange itself, not the wait for a slot in the harness.
            let started = Instant::now();
            let result = identity::join(
                Some(fleet.sources.pick()),
                fleet.spec.join_addr,
                fleet.pin,
                &fleet.spec.token,
                &node,
            )
            .await;
            (result, started)
        };
        match result.and_then(|creds| creds.client_config(ALPN_TUNNEL)) {
            Ok(config) => {
                fleet.configs.borrow_mut()[i] = Some(config);
                record(&fleet.join_us, started);
                fleet.counters.borrow_mut().joined += 1;
                return true;
            }
            Err(e) => {
                fleet.error(format!("join {node}: {e:#}"));
                monoio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
    false
}

fn backoff_config(spec: &AgentsSpec) -> anyhow::Result<BackoffConfig> {
    BackoffConfig::new(
        Duration::from_millis(spec.backoff_min_ms),
        Duration::from_millis(spec.backoff_max_ms),
    )
    .map_err(|e| anyhow::anyhow!("backoff: {e}"))
}

/// One simulated agent's reconnect loop (the shape of `agent::run_until`).
async fn keep_tunnel(fleet: Rc<Fleet>, i: usize, config: Arc<rustls::ClientConfig>) {
    let node = fleet.node(i);
    let announce = announcement(&node);
    let session_config = session_config(&fleet.spec);
    let mut backoff = match backoff_config(&fleet.spec) {
        Ok(c) => Backoff::new(&c),
        Err(e) => return fleet.error(e),
    };
    let stop_gen = fleet.stop.generation();
    let mut first = Some(fleet.sem.clone());
    let mut kept: Option<Tunnel> = None;
    loop {
        let permit = match first.take() {
            Some(sem) => Some(sem.acquire().await),
            None => None,
        };
        let cut_gen = fleet.cut.generation();
        let uptime = monoio::select! {
            up = one_tunnel(&fleet, &config, &session_config, &announce, permit, cut_gen, &mut kept) => up,
            _ = fleet.stop.changed(stop_gen) => return,
        };
        if uptime >= STABLE_AFTER {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        monoio::select! {
            _ = monoio::time::sleep(delay) => {}
            _ = fleet.stop.changed(stop_gen) => return,
        }
    }
}

/// Connects and serves one tunnel until it ends or is cut; returns how long it was up. A
/// session detached by a lost connection is left in `kept` for the next call to resume, as
/// `agent::tunnel_mode::run_once` does.
async fn one_tunnel(
    fleet: &Rc<Fleet>,
    config: &Arc<rustls::ClientConfig>,
    session_config: &SessionConfig,
    announce: &Announce,
    permit: Option<crate::sync::Permit>,
    cut_gen: u64,
    kept: &mut Option<Tunnel>,
) -> Duration {
    let dialled = Instant::now();
    let conn = match net::connect_tls(
        Some(fleet.sources.pick()),
        fleet.spec.tunnel_addr,
        config.clone(),
        ALPN_TUNNEL,
    )
    .await
    {
        Ok(conn) => conn,
        Err(e) => {
            fleet.counters.borrow_mut().failures += 1;
            fleet.error(format!("connect: {e:#}"));
            return Duration::ZERO;
        }
    };
    let resumable = kept.take().and_then(|old| {
        old.tick(); // ends it if the grace period passed
        (!old.is_ended() && old.reattach().is_ok()).then_some(old)
    });
    let resuming = resumable.is_some();
    let tunnel = match resumable {
        Some(old) => old,
        None => {
            let tunnel = Tunnel::new(Session::new(
                session_config.clone(),
                random_id(),
                Instant::now(),
            ));
            if let Err(e) = tunnel.announce(announce) {
                fleet.counters.borrow_mut().failures += 1;
                fleet.error(format!("announce: {e}"));
                return Duration::ZERO;
            }
            monoio::spawn(serve_echo(tunnel.clone()));
            tunnel
        }
    };
    let up_since: Rc<Cell<Option<Instant>>> = Rc::default();
    {
        let tunnel = tunnel.clone();
        let fleet = fleet.clone();
        let up_since = up_since.clone();
        monoio::spawn(async move {
            let _permit = permit;
            if tunnel.connected().await {
                up_since.set(Some(Instant::now()));
                record(&fleet.connect_us, dialled);
                let mut c = fleet.counters.borrow_mut();
                c.up += 1;
                c.connects += 1;
                if resuming {
                    c.resumed += 1;
                }
                fleet.connect_times.borrow_mut().push(net::mono_ns());
            }
        });
    }
    let outcome = monoio::select! {
        outcome = mux::drive(&tunnel, conn, BytesMut::new()) => Some(outcome),
        _ = fleet.cut.changed(cut_gen) => None,
    };
    // A cut dropped the connection with the driver: the session detaches (or ends).
    tunnel.transport_lost();
    if tunnel.is_detached() && fleet.stop.generation() == 0 {
        let expiring = tunnel.clone();
        monoio::spawn(async move { expiring.expire_while_detached().await });
        *kept = Some(tunnel);
    } else if !tunnel.is_ended() {
        tunnel.close(frame::ErrorCode::CANCELLED, "tunnel connection lost");
    }
    let reason = match &outcome {
        Some(DriveOutcome::Ended(e)) => format!("tunnel ended: {e}"),
        Some(DriveOutcome::TransportLost(Some(e))) => format!("connection lost: {e}"),
        Some(DriveOutcome::TransportLost(None)) => "connection lost".to_owned(),
        None => "cut by the load test".to_owned(),
    };
    match up_since.get() {
        Some(since) => {
            let mut c = fleet.counters.borrow_mut();
            c.up -= 1;
            c.disconnects += 1;
            if outcome.is_some() {
                c.last_error = Some(reason);
            }
            since.elapsed()
        }
        None => {
            let mut c = fleet.counters.borrow_mut();
            c.failures += 1;
            c.last_error = Some(format!("before HELLO: {reason}"));
            Duration::ZERO
        }
    }
}

/// Accepts every stream the proxy opens and echoes it.
async fn serve_echo(tunnel: Tunnel) {
    while let Some(incoming) = tunnel.incoming().await {
        if let Ok(stream) = incoming.accept() {
            monoio::spawn(echo(stream));
        }
    }
}

async fn echo(stream: MuxStream) {
    loop {
        match stream.read().await {
            Ok(Some(bytes)) => {
                if stream.write(bytes).await.is_err() {
                    return;
                }
            }
            Ok(None) => {
                stream.finish();
                let _ = monoio::time::timeout(Duration::from_secs(30), stream.closed()).await;
                return;
            }
            Err(_) => return,
        }
    }
}
