//! `remoteler-loadtest`: thousands of simulated agents and users against a real
//! `remoteler-proxy` process that the harness starts itself.
//!
//! Modes (each ends with a table on stdout and, with `--json FILE`, a JSON report; a
//! progress line goes to stderr while it works):
//!
//! * `tunnels --count N`: join N nodes, open N mutual-TLS tunnels, hold them through a few
//!   keepalive rounds; connect rate, lost tunnels, proxy memory per tunnel, idle CPU.
//! * `sessions --tunnels K --sessions M`: M user sessions over K tunnels; session setup and
//!   round-trip latency (HDR histograms), throughput of all streams and of one, fairness.
//! * `storm --count N --event restart|cut`: N tunnels up, then the proxy restarts or every
//!   connection is cut; time until all are back, reconnects per second.
//! * `baseline --count N`: memory per idle plain TCP connection in a trivial monoio echo
//!   server (the frame of reference for memory per tunnel).
//! * `rtt --target ADDR --connections N`: paced round trips against any TCP echo service
//!   (direct, through `remoteler forward`, through another tunnel); HDR percentiles. Starts no
//!   proxy: benches/compare.sh uses it side by side with rathole.
//!
//! * `hostile-window --streams N --attack 4s`: N users announce a 4 GiB window and read
//!   nothing from a stream to a node that talks fast; the proxy's RSS growth while they are
//!   connected and after they drop (issue 13, item 8; goal: ≤ 2 windows per stream).
//!
//! * `relay --listen ADDR --to ADDR [--delay 50ms] [--jitter 10ms] [--loss P]`: a TCP relay
//!   adding delay, jitter and "loss" in user space, stalled and resumed with SIGUSR1 and
//!   SIGUSR2 (scripts/faults.sh puts it in an agent's path).
//!
//! The harness re-executes itself for its helpers: `worker` (simulated agents or users, up
//! to `--per-worker` connections each, on their own loopback source addresses), `relay`
//! and `echo-server` (the baseline).
//!
//! What it does not do: drive several proxies, or measure anything but the proxy (the
//! simulated agents and users share the machine's cores with it; see docs/benchmarks.md).

mod agents;
mod baseline;
mod env;
mod flood;
mod hostile;
mod identity;
mod modes;
mod net;
mod pool;
mod procfs;
mod progress;
mod proto;
mod proxyproc;
mod relay;
mod report;
mod rtt;
mod sync;
mod users;
mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use argh::FromArgs;

use crate::env::Common;
use crate::relay::RelaySettings;

/// remoteler-loadtest: simulated agents and users against a real remoteler-proxy.
#[derive(FromArgs, Debug)]
struct Args {
    #[argh(subcommand)]
    command: Mode,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
enum Mode {
    Tunnels(TunnelsArgs),
    Sessions(SessionsCli),
    Storm(StormArgs),
    Baseline(BaselineArgs),
    HostileWindow(HostileCli),
    Rtt(RttCli),
    Flood(FloodCli),
    FloodAttacker(FloodAttackerCli),
    Worker(WorkerArgs),
    Relay(RelayArgs),
    EchoServer(EchoServerArgs),
}

/// Options every mode takes (repeated in each, argh has no flattening).
macro_rules! common_options {
    ($(#[$meta:meta])* struct $name:ident { $($field:tt)* }) => {
        $(#[$meta])*
        struct $name {
            $($field)*
            /// the proxy binary (default target/release/remoteler-proxy)
            #[argh(option, default = "PathBuf::from(\"target/release/remoteler-proxy\")")]
            proxy_bin: PathBuf,
            /// write the JSON report here
            #[argh(option)]
            json: Option<PathBuf>,
            /// directory for the work directory (default: the system temp directory)
            #[argh(option)]
            work_dir: Option<PathBuf>,
            /// keep the work directory (cluster, proxy log, audit log)
            #[argh(switch)]
            keep: bool,
            /// most connections one worker process holds (default 9000)
            #[argh(option, default = "9000")]
            per_worker: usize,
            /// joins, connects and session setups in flight at once, all workers (default 256)
            #[argh(option, default = "256")]
            concurrency: usize,
            /// loopback source addresses per worker, 127.0.W.1.. (default 8)
            #[argh(option, default = "8")]
            sources: usize,
            /// keepalive interval of the proxy (config file) and the agents (default 2s)
            #[argh(option, default = "String::from(\"2s\")")]
            keepalive: String,
            /// missed keepalives before a tunnel is dead (default 3)
            #[argh(option, default = "3")]
            keepalive_count: u32,
            /// the proxy's log level (default info)
            #[argh(option, default = "String::from(\"info\")")]
            proxy_log_level: String,
            /// the proxy's worker threads, one runtime each (default 0: one per core)
            #[argh(option, default = "0")]
            proxy_workers: u16,
            /// relay: one-way delay added between users/agents and the proxy, e.g. 10ms
            #[argh(option)]
            relay_delay: Option<String>,
            /// relay: jitter ± this, e.g. 2ms (default 0)
            #[argh(option)]
            relay_jitter: Option<String>,
            /// relay: probability a chunk is "lost" (held back 200 ms) (default 0)
            #[argh(option, default = "0.0")]
            relay_loss: f64,
            /// relay: which legs, users, tunnels or both (default users)
            #[argh(option, default = "String::from(\"users\")")]
            relay_legs: String,
            /// agents' reconnect backoff floor (default 1s, the agent's default)
            #[argh(option, default = "String::from(\"1s\")")]
            backoff_min: String,
            /// agents' reconnect backoff cap (default 60s, the agent's default)
            #[argh(option, default = "String::from(\"60s\")")]
            backoff_max: String,
        }

        impl $name {
            fn common(&self) -> anyhow::Result<Common> {
                let relay = match &self.relay_delay {
                    None => None,
                    Some(d) => Some(RelaySettings {
                        delay_ms: duration(d, "--relay-delay")?.as_secs_f64() * 1e3,
                        jitter_ms: match &self.relay_jitter {
                            Some(j) => duration(j, "--relay-jitter")?.as_secs_f64() * 1e3,
                            None => 0.0,
                        },
                        loss: self.relay_loss,
                    }),
                };
                if !(0.0..=1.0).contains(&self.relay_loss) {
                    bail!("--relay-loss: expected a probability from 0 to 1");
                }
                let (relay_users, relay_tunnels) = match self.relay_legs.as_str() {
                    "users" => (true, false),
                    "tunnels" => (false, true),
                    "both" => (true, true),
                    other => bail!("--relay-legs: expected users, tunnels or both, found {other:?}"),
                };
                Ok(Common {
                    proxy_bin: self.proxy_bin.clone(),
                    json: self.json.clone(),
                    work_dir: self.work_dir.clone(),
                    keep: self.keep,
                    per_worker: self.per_worker.clamp(1, 9500),
                    concurrency: self.concurrency.max(1),
                    sources: self.sources.clamp(1, 250),
                    keepalive: duration(&self.keepalive, "--keepalive")?,
                    keepalive_count: self.keepalive_count,
                    log_level: self.proxy_log_level.clone(),
                    proxy_workers: self.proxy_workers,
                    relay,
                    relay_users,
                    relay_tunnels,
                    backoff_min: duration(&self.backoff_min, "--backoff-min")?,
                    backoff_max: duration(&self.backoff_max, "--backoff-max")?,
                })
            }
        }
    };
}

common_options! {
    /// Open N tunnels, hold them through keepalive rounds; connect rate, losses, memory, idle CPU.
    #[derive(FromArgs, Debug)]
    #[argh(subcommand, name = "tunnels")]
    struct TunnelsArgs {
        /// tunnels to open
        #[argh(option)]
        count: usize,
        /// keepalive rounds to hold them (default 5)
        #[argh(option, default = "5")]
        hold_rounds: u32,
        /// also measure plain TCP connections to a trivial echo server (frame of reference)
        #[argh(switch)]
        baseline: bool,
    }
}

common_options! {
    /// M user sessions over K tunnels: setup and round-trip latency, throughput, fairness.
    #[derive(FromArgs, Debug)]
    #[argh(subcommand, name = "sessions")]
    struct SessionsCli {
        /// tunnels (nodes) to spread the sessions over
        #[argh(option)]
        tunnels: usize,
        /// concurrent user sessions
        #[argh(option)]
        sessions: usize,
        /// bytes per round-trip message (default 64)
        #[argh(option, default = "String::from(\"64\")")]
        bytes: String,
        /// round trips per session (default 50)
        #[argh(option, default = "50")]
        rounds: usize,
        /// bytes each session sends at once in the all-streams phase, 0 to skip (default 1MiB)
        #[argh(option, default = "String::from(\"1MiB\")")]
        bulk_bytes: String,
        /// bytes one stream sends alone, 0 to skip (default 64MiB)
        #[argh(option, default = "String::from(\"64MiB\")")]
        single_bytes: String,
    }
}

common_options! {
    /// N tunnels up, then restart the proxy or cut every tunnel; time until all are back.
    #[derive(FromArgs, Debug)]
    #[argh(subcommand, name = "storm")]
    struct StormArgs {
        /// tunnels
        #[argh(option)]
        count: usize,
        /// restart (SIGTERM and start the proxy again) or cut (agents drop their connections)
        #[argh(option, default = "String::from(\"restart\")")]
        event: String,
        /// give up after this long (default 300s)
        #[argh(option, default = "String::from(\"300s\")")]
        timeout: String,
    }
}

common_options! {
    /// Memory per idle plain TCP connection in a trivial monoio echo server.
    #[derive(FromArgs, Debug)]
    #[argh(subcommand, name = "baseline")]
    struct BaselineArgs {
        /// connections
        #[argh(option)]
        count: usize,
    }
}

common_options! {
    /// Users announcing a 4 GiB window read nothing from a talking node: the proxy's RSS.
    #[derive(FromArgs, Debug)]
    #[argh(subcommand, name = "hostile-window")]
    struct HostileCli {
        /// hostile users, one stream each (default 4)
        #[argh(option, default = "4")]
        streams: usize,
        /// how long the attack runs, and again after the users disconnect (default 4s)
        #[argh(option, default = "String::from(\"4s\")")]
        attack: String,
    }
}

/// Round trips against a TCP echo service (no proxy started): HDR percentiles per message.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "rtt")]
struct RttCli {
    /// the echo service, IP:PORT (an echo server, or a tunnel's local end in front of one)
    #[argh(option)]
    target: SocketAddr,
    /// concurrent connections (default 1)
    #[argh(option, default = "1")]
    connections: usize,
    /// measured time after the warm-up (default 10s)
    #[argh(option, default = "String::from(\"10s\")")]
    duration: String,
    /// samples discarded at the start (default 1s)
    #[argh(option, default = "String::from(\"1s\")")]
    warmup: String,
    /// bytes per message, at least 8 (default 64)
    #[argh(option, default = "String::from(\"64\")")]
    bytes: String,
    /// messages per second over all connections, paced; 0 for closed loop (default 2000)
    #[argh(option, default = "2000.0")]
    rate: f64,
    /// connection setups in flight at once (default 64)
    #[argh(option, default = "64")]
    concurrency: usize,
    /// write the JSON report here
    #[argh(option)]
    json: Option<PathBuf>,
}

/// Honest logins while attackers hold silent connections from many /24s (the handshake
/// table under a flood); prints the success rate; fails below 99 %.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "flood")]
struct FloodCli {
    /// the proxy binary (default target/release/remoteler-proxy)
    #[argh(option, default = "PathBuf::from(\"target/release/remoteler-proxy\")")]
    proxy_bin: PathBuf,
    /// attacking source groups, one address per /24 (default 64)
    #[argh(option, default = "64")]
    groups: u16,
    /// silent connections per group (default 256)
    #[argh(option, default = "256")]
    per_group: u16,
    /// attacker processes (default 2: 16,384 sockets do not fit beside the proxy's own)
    #[argh(option, default = "2")]
    attackers: u16,
    /// honest logins to run (default 200)
    #[argh(option, default = "200")]
    logins: usize,
    /// honest logins at once (default 4)
    #[argh(option, default = "4")]
    concurrency: usize,
    /// time the attack runs before the logins start (default 10s)
    #[argh(option, default = "String::from(\"10s\")")]
    warmup: String,
    /// the proxy's worker threads (default 0: one per core)
    #[argh(option, default = "0")]
    proxy_workers: u16,
}

/// (internal) an attacker process of `flood`.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "flood-attacker")]
struct FloodAttackerCli {
    /// the users' listener
    #[argh(option)]
    target: SocketAddr,
    /// first group index
    #[argh(option)]
    first_group: u16,
    /// groups
    #[argh(option)]
    groups: u16,
    /// silent connections per group
    #[argh(option)]
    per_group: u16,
}

/// (internal) a worker process of simulated agents or users.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "worker")]
struct WorkerArgs {
    /// the worker's job, JSON
    #[argh(option)]
    spec: String,
}

/// A TCP relay that adds delay, jitter and "loss", and stalls on a signal; prints
/// `listening ADDR` when ready.
#[derive(FromArgs, Debug)]
#[argh(
    subcommand,
    name = "relay",
    note = "Each chunk read is released at max(previous release, arrival + delay ± jitter), \
so bytes are never reordered; a \"lost\" chunk (probability --loss) is held back 200 ms, \
one minimum retransmission timeout, since a byte stream cannot lose bytes.

Stalls: `kill -USR1 PID` freezes every connection open at that moment (the relay neither \
reads nor writes either side of it, closes nothing) and prints `stalled N`; connections accepted later are relayed normally, as through a middlebox whose old \
flows went dead. `kill -USR2 PID` releases them and prints `resumed N`; what they held is \
delivered in order. N counts only connections whose state changed (a second SIGUSR1 freezes \
those accepted since the first; SIGUSR2 with nothing frozen prints `resumed 0`). Every line on \
stdout is flushed at once.",
    example = "remoteler-loadtest relay --listen 10.86.0.1:0 --to 10.86.0.1:3024 --delay 50ms --jitter 10ms"
)]
struct RelayArgs {
    /// address to listen on (default 127.0.0.1:0; port 0: the kernel picks, see the first line)
    #[argh(option, default = "SocketAddr::from(([127, 0, 0, 1], 0))")]
    listen: SocketAddr,
    /// where to relay every connection to, IP:PORT
    #[argh(option)]
    to: SocketAddr,
    /// one-way delay added to each direction, e.g. 50ms (default 0)
    #[argh(option, default = "String::from(\"0ms\")")]
    delay: String,
    /// uniform jitter ± this around the delay, e.g. 10ms (default 0)
    #[argh(option, default = "String::from(\"0ms\")")]
    jitter: String,
    /// probability a chunk is held back 200 ms, from 0 to 1 (default 0)
    #[argh(option, default = "0.0")]
    loss: f64,
}

/// A trivial TCP echo server (the baseline's; also the target of `rtt`); prints `listening ADDR`.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "echo-server")]
struct EchoServerArgs {
    /// address to listen on (default 127.0.0.1:0)
    #[argh(option, default = "SocketAddr::from(([127, 0, 0, 1], 0))")]
    listen: SocketAddr,
}

fn duration(text: &str, flag: &str) -> anyhow::Result<Duration> {
    humantime::parse_duration(text)
        .with_context(|| format!("{flag}: {text:?} (examples: 2s, 500ms)"))
}

/// A byte count: `4096`, `64KiB`, `1MiB`, `2GiB` (also K, M, G, KB, MB, GB as powers of 1024).
fn size(text: &str, flag: &str) -> anyhow::Result<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: u64 = number
        .parse()
        .with_context(|| format!("{flag}: {text:?} is not a size (examples: 64, 16KiB, 1MiB)"))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => bail!("{flag}: unknown unit {other:?} (use KiB, MiB or GiB)"),
    };
    n.checked_mul(factor)
        .with_context(|| format!("{flag}: {text:?} is too large"))
}

fn run(args: Args) -> anyhow::Result<bool> {
    match args.command {
        Mode::Tunnels(a) => modes::tunnels(a.common()?, a.count.max(1), a.hold_rounds, a.baseline),
        Mode::Sessions(a) => {
            let common = a.common()?;
            let args = modes::SessionsArgs {
                tunnels: a.tunnels.max(1),
                sessions: a.sessions.max(1),
                msg_bytes: usize::try_from(size(&a.bytes, "--bytes")?.max(1))?,
                rounds: a.rounds,
                bulk_bytes: size(&a.bulk_bytes, "--bulk-bytes")?,
                single_bytes: size(&a.single_bytes, "--single-bytes")?,
            };
            modes::sessions(common, args)
        }
        Mode::Storm(a) => {
            let event = match a.event.as_str() {
                "restart" => modes::StormEvent::Restart,
                "cut" => modes::StormEvent::Cut,
                other => bail!("--event: expected restart or cut, found {other:?}"),
            };
            let timeout = duration(&a.timeout, "--timeout")?;
            modes::storm(a.common()?, a.count.max(1), event, timeout)
        }
        Mode::Baseline(a) => modes::baseline(a.common()?, a.count.max(1)),
        Mode::HostileWindow(a) => {
            let args = hostile::HostileArgs {
                streams: a.streams.max(1),
                attack: duration(&a.attack, "--attack")?,
            };
            hostile::run(a.common()?, args)
        }
        Mode::Rtt(a) => {
            if !(a.rate >= 0.0 && a.rate.is_finite()) {
                bail!("--rate: expected messages per second, 0 or more");
            }
            let args = rtt::RttArgs {
                target: a.target,
                connections: a.connections.max(1),
                duration: duration(&a.duration, "--duration")?,
                warmup: duration(&a.warmup, "--warmup")?,
                bytes: usize::try_from(size(&a.bytes, "--bytes")?.max(8))?,
                rate: a.rate,
                concurrency: a.concurrency.max(1),
            };
            rtt::run(args, a.json.as_deref())
        }
        Mode::Flood(a) => flood::run(flood::FloodArgs {
            proxy_bin: a.proxy_bin,
            groups: a.groups.max(1),
            per_group: a.per_group.max(1),
            attackers: a.attackers.max(1),
            logins: a.logins.max(1),
            concurrency: a.concurrency.max(1),
            warmup: duration(&a.warmup, "--warmup")?,
            proxy_workers: a.proxy_workers,
        }),
        Mode::FloodAttacker(a) => {
            flood::attack(a.target, a.first_group, a.groups, a.per_group).map(|()| true)
        }
        Mode::Worker(a) => worker::main(&a.spec).map(|()| true),
        Mode::Relay(a) => {
            if !(0.0..=1.0).contains(&a.loss) {
                bail!(
                    "--loss: expected a probability from 0 to 1, found {}",
                    a.loss
                );
            }
            let settings = RelaySettings {
                delay_ms: duration(&a.delay, "--delay")?.as_secs_f64() * 1e3,
                jitter_ms: duration(&a.jitter, "--jitter")?.as_secs_f64() * 1e3,
                loss: a.loss,
            };
            relay::serve(a.listen, a.to, settings).map(|()| true)
        }
        Mode::EchoServer(a) => baseline::serve(a.listen).map(|()| true),
    }
}

fn main() {
    let args: Args = argh::from_env();
    match run(args) {
        Ok(true) => {}
        Ok(false) => {
            eprintln!(
                "remoteler-loadtest: the run completed but its checks failed (see the report)"
            );
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("remoteler-loadtest: {e:#}");
            std::process::exit(2);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(size("64", "x").unwrap(), 64);
        assert_eq!(size("16KiB", "x").unwrap(), 16 * 1024);
        assert_eq!(size("1MiB", "x").unwrap(), 1 << 20);
        assert!(size("1XB", "x").is_err());
    }
}
