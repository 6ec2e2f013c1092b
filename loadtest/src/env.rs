//! What every mode sets up: a work directory, the proxy, relays, and the agent workers.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::net::mono_ns;
use crate::pool::Pool;
use crate::progress::Progress;
use crate::proto::{self, AgentsSpec, Message, WorkerSpec};
use crate::proxyproc::{ProxyProcess, ProxySettings};
use crate::relay::RelaySettings;
use crate::report;

/// Options every mode takes.
#[derive(Debug, Clone)]
pub struct Common {
    /// The proxy binary.
    pub proxy_bin: PathBuf,
    /// JSON report path.
    pub json: Option<PathBuf>,
    /// Parent of the work directory.
    pub work_dir: Option<PathBuf>,
    /// Keep the work directory.
    pub keep: bool,
    /// Most connections one worker process holds.
    pub per_worker: usize,
    /// Joins/connects/session setups in flight at once, all workers together.
    pub concurrency: usize,
    /// Loopback source addresses per worker.
    pub sources: usize,
    /// Keepalive interval of the proxy and of the simulated agents.
    pub keepalive: Duration,
    /// Keepalive count.
    pub keepalive_count: u32,
    /// The proxy's log level.
    pub log_level: String,
    /// The proxy's `workers` (0: one per core).
    pub proxy_workers: u16,
    /// Relay settings, if a relay is wanted.
    pub relay: Option<RelaySettings>,
    /// Put the relay on the users' leg.
    pub relay_users: bool,
    /// Put the relay on the agents' leg.
    pub relay_tunnels: bool,
    /// Agent reconnect backoff floor.
    pub backoff_min: Duration,
    /// Agent reconnect backoff cap.
    pub backoff_max: Duration,
}

/// A running test environment.
#[derive(Debug)]
pub struct Env {
    /// Options.
    pub common: Common,
    /// The proxy.
    pub proxy: ProxyProcess,
    /// Where agents dial for tunnels (the proxy or a relay).
    pub tunnel_addr: SocketAddr,
    /// Where users dial (the proxy or a relay).
    pub users_addr: SocketAddr,
    /// Progress line.
    pub progress: Progress,
    relays: Vec<Child>,
    work: Option<tempfile::TempDir>,
    /// The work directory.
    pub work_path: PathBuf,
}

impl Env {
    /// Creates the work directory and cluster, starts the proxy and any relays.
    pub fn start(common: Common) -> anyhow::Result<Env> {
        let mut progress = Progress::default();
        let parent = common.work_dir.clone().unwrap_or_else(std::env::temp_dir);
        std::fs::create_dir_all(&parent).with_context(|| parent.display().to_string())?;
        let work = tempfile::Builder::new()
            .prefix("remoteler-loadtest-")
            .tempdir_in(&parent)
            .context("create the work directory")?;
        let work_path = work.path().to_owned();
        progress.step(&format!("work directory {}", work_path.display()));
        let settings = ProxySettings {
            keepalive: common.keepalive,
            keepalive_count: common.keepalive_count,
            log_level: common.log_level.clone(),
            max_streams_per_tunnel: 65_535,
            workers: common.proxy_workers,
        };
        let mut proxy = ProxyProcess::create(&common.proxy_bin, &work_path, &settings)?;
        let took = proxy.start()?;
        progress.step(&format!(
            "proxy ready in {:.0} ms (users {}, tunnels {}, pid {})",
            took.as_secs_f64() * 1e3,
            proxy.users,
            proxy.tunnels,
            proxy.pid()?
        ));
        let mut env = Env {
            tunnel_addr: proxy.tunnels,
            users_addr: proxy.users,
            proxy,
            progress,
            relays: Vec::new(),
            work: Some(work),
            work_path,
            common,
        };
        if let Some(settings) = env.common.relay {
            if env.common.relay_users {
                env.users_addr = env.spawn_relay(env.proxy.users, settings)?;
            }
            if env.common.relay_tunnels {
                env.tunnel_addr = env.spawn_relay(env.proxy.tunnels, settings)?;
            }
            env.progress.step(&format!(
                "relay: {} ms one way ± {} ms, loss {} (users via {}, tunnels via {})",
                settings.delay_ms,
                settings.jitter_ms,
                settings.loss,
                env.users_addr,
                env.tunnel_addr
            ));
        }
        Ok(env)
    }

    fn spawn_relay(
        &mut self,
        upstream: SocketAddr,
        settings: RelaySettings,
    ) -> anyhow::Result<SocketAddr> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .arg("relay")
            .arg("--to")
            .arg(upstream.to_string())
            .arg("--delay")
            .arg(format!("{}us", (settings.delay_ms * 1e3).round()))
            .arg("--jitter")
            .arg(format!("{}us", (settings.jitter_ms * 1e3).round()))
            .arg("--loss")
            .arg(settings.loss.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start the relay")?;
        let addr = listening_line(&mut child)?;
        self.relays.push(child);
        Ok(addr)
    }

    /// Where the JSON report goes.
    pub fn json_path(&self) -> Option<&Path> {
        self.common.json.as_deref()
    }

    /// Starts agent workers for nodes `<prefix>0 .. <prefix>count-1` and joins them all.
    pub fn spawn_agents(
        &mut self,
        pool: &mut Pool,
        count: usize,
        token: &str,
    ) -> anyhow::Result<JoinResult> {
        let per = self.common.per_worker.max(1);
        let workers = count.div_ceil(per).max(1);
        let base = count / workers;
        let extra = count % workers;
        let mut first = 0;
        for w in 0..workers {
            let n = base + usize::from(w < extra);
            pool.spawn(&WorkerSpec::Agents(AgentsSpec {
                worker: w,
                join_addr: self.proxy.tunnels,
                tunnel_addr: self.tunnel_addr,
                ca_pin: self.proxy.ca_pin.clone(),
                token: token.to_owned(),
                prefix: "node-".to_owned(),
                first,
                count: n,
                keepalive_ms: u64::try_from(self.common.keepalive.as_millis()).unwrap_or(2000),
                keepalive_count: self.common.keepalive_count,
                backoff_min_ms: u64::try_from(self.common.backoff_min.as_millis()).unwrap_or(1000),
                backoff_max_ms: u64::try_from(self.common.backoff_max.as_millis())
                    .unwrap_or(60_000),
                concurrency: (self.common.concurrency / workers).max(1),
                sources: self.common.sources,
            }))?;
            first += n;
        }
        self.progress
            .step(&format!("{workers} agent worker(s): joining {count} nodes"));
        let started = Instant::now();
        pool.broadcast(&proto::Command::Join)?;
        let progress = &mut self.progress;
        let timeout = Duration::from_secs(120 + count as u64 / 5);
        let answers = pool.collect(
            timeout,
            |m| match m {
                Message::Joined {
                    ok,
                    failed,
                    last_error,
                    join_us,
                } => Some((ok, failed, last_error, join_us)),
                _ => None,
            },
            |p| {
                let t = p.totals();
                progress.update(|| format!("joined {}/{count}", t.joined));
            },
        )?;
        let secs = started.elapsed().as_secs_f64();
        let ok: usize = answers.iter().map(|a| a.0).sum();
        let failed: usize = answers.iter().map(|a| a.1).sum();
        let last_error = answers.iter().find_map(|a| a.2.clone());
        let mut latency = Histogram::new_with_bounds(1, 3_600_000_000, 3)?;
        for a in &answers {
            report::merge(&mut latency, &a.3);
        }
        self.progress.step(&format!(
            "joined {ok} nodes in {secs:.1} s ({:.0}/s), {failed} failed; join time {}",
            ok as f64 / secs.max(1e-9),
            report::latency_line(&latency)
        ));
        if let Some(e) = &last_error {
            if failed > 0 {
                self.progress.step(&format!("last join error: {e}"));
            }
        }
        Ok(JoinResult {
            ok,
            failed,
            secs,
            last_error,
            latency,
        })
    }

    /// Sends `Connect` and waits until `count` tunnels are up (or `timeout`).
    pub fn connect_agents(
        &mut self,
        pool: &mut Pool,
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<ConnectResult> {
        let t0 = mono_ns();
        let started = Instant::now();
        pool.broadcast(&proto::Command::Connect)?;
        let progress = &mut self.progress;
        let all_up = pool.wait_until(
            timeout,
            |t| t.up >= count,
            |p| {
                let t = p.totals();
                progress.update(|| {
                    format!(
                        "tunnels up {}/{count} ({:.0}/s), failed attempts {}",
                        t.up,
                        t.up as f64 / started.elapsed().as_secs_f64().max(1e-9),
                        t.failures
                    )
                })
            },
        )?;
        let report = agent_report(pool)?;
        let last = report.times.iter().copied().max().unwrap_or(t0);
        let secs = (last.saturating_sub(t0)) as f64 / 1e9;
        let up = report.counters.up;
        self.progress.step(&format!(
            "{up}/{count} tunnels up in {secs:.2} s ({:.0} tunnels/s){}; connect time {}",
            up as f64 / secs.max(1e-9),
            if all_up { "" } else { "; TIMED OUT" },
            report::latency_line(&report.connect_latency)
        ));
        Ok(ConnectResult {
            all_up,
            up,
            secs,
            latency: report.connect_latency,
            failures: report.counters.failures,
            last_error: report.counters.last_error,
        })
    }

    /// The work directory is removed unless `--keep`.
    pub fn finish(&mut self) {
        for mut r in self.relays.drain(..) {
            let _ = r.kill();
            let _ = r.wait();
        }
        let _ = self.proxy.stop();
        if let Some(work) = self.work.take() {
            if self.common.keep {
                let path = work.keep();
                self.progress
                    .step(&format!("kept the work directory {}", path.display()));
            }
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Reads `listening ADDR` from a child's stdout.
pub fn listening_line(child: &mut Child) -> anyhow::Result<SocketAddr> {
    let stdout = child.stdout.take().context("child stdout")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .context("read the child's address")?;
    let Some(addr) = line.trim().strip_prefix("listening ") else {
        bail!("the child printed {line:?} instead of its address");
    };
    addr.parse().context("the child's address")
}

/// Joins.
#[derive(Debug)]
pub struct JoinResult {
    /// Joined.
    pub ok: usize,
    /// Failed.
    pub failed: usize,
    /// Wall time.
    pub secs: f64,
    /// An error seen.
    pub last_error: Option<String>,
    /// Time per join (µs), retries included.
    pub latency: Histogram<u64>,
}

impl JoinResult {
    /// As JSON.
    pub fn json(&self) -> Value {
        json!({
            "ok": self.ok, "failed": self.failed, "secs": self.secs,
            "per_sec": self.ok as f64 / self.secs.max(1e-9), "last_error": self.last_error,
            "latency": report::latency(&self.latency),
        })
    }
}

/// First connects.
#[derive(Debug)]
pub struct ConnectResult {
    /// Whether all came up in time.
    pub all_up: bool,
    /// Up.
    pub up: usize,
    /// From `Connect` to the last tunnel up.
    pub secs: f64,
    /// Failed attempts.
    pub failures: u64,
    /// An error seen.
    pub last_error: Option<String>,
    /// TCP connect → HELLO (µs) of each tunnel up.
    pub latency: Histogram<u64>,
}

impl ConnectResult {
    /// Tunnels per second.
    pub fn rate(&self) -> f64 {
        self.up as f64 / self.secs.max(1e-9)
    }

    /// As JSON.
    pub fn json(&self) -> Value {
        json!({
            "all_up": self.all_up, "up": self.up, "secs": self.secs,
            "tunnels_per_sec": self.rate(), "failed_attempts": self.failures,
            "last_error": self.last_error, "latency": report::latency(&self.latency),
        })
    }
}

/// Summed agent reports.
#[derive(Debug)]
pub struct AgentReport {
    /// Counters.
    pub counters: proto::AgentCounters,
    /// Every connect time.
    pub times: Vec<u64>,
    /// TCP connect → HELLO (µs) of every tunnel that came up so far.
    pub connect_latency: Histogram<u64>,
}

/// Asks every agents worker for its counters and connect times.
pub fn agent_report(pool: &mut Pool) -> anyhow::Result<AgentReport> {
    pool.broadcast(&proto::Command::Report)?;
    let answers = pool.collect(
        Duration::from_secs(30),
        |m| match m {
            Message::Report {
                counters,
                connect_us,
                connect_times_ns,
            } => Some((counters, connect_us, connect_times_ns)),
            _ => None,
        },
        |_| {},
    )?;
    let mut out = AgentReport {
        counters: proto::AgentCounters::default(),
        times: Vec::new(),
        connect_latency: Histogram::new_with_bounds(1, 3_600_000_000, 3)?,
    };
    for (c, latency, times) in answers {
        report::merge(&mut out.connect_latency, &latency);
        out.counters.up += c.up;
        out.counters.connects += c.connects;
        out.counters.resumed += c.resumed;
        out.counters.disconnects += c.disconnects;
        out.counters.failures += c.failures;
        out.counters.joined += c.joined;
        if c.last_error.is_some() {
            out.counters.last_error = c.last_error;
        }
        out.times.extend(times);
    }
    Ok(out)
}
