//! The three load tests and the plain-TCP baseline.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::env::{self, Common, Env};
use crate::net::mono_ns;
use crate::pool::Pool;
use crate::procfs;
use crate::progress::Progress;
use crate::proto::{self, Message, PlainSpec, UsersSpec, WorkerSpec};
use crate::report::{Report, jain, latency, latency_line, merge, mibps};

fn kib_per(delta_kib: i64, n: usize) -> f64 {
    delta_kib as f64 / n.max(1) as f64
}

fn mem_json(m: procfs::Memory) -> Value {
    json!({ "rss_kib": m.rss_kib, "hwm_kib": m.hwm_kib })
}

/// `tunnels`: open N tunnels, hold them, count losses, memory and idle CPU.
pub fn tunnels(
    common: Common,
    count: usize,
    hold_rounds: u32,
    baseline: bool,
) -> anyhow::Result<bool> {
    let mut env = Env::start(common)?;
    let mut report = Report::new("tunnels");
    let mem_start = env.proxy.memory()?;
    let token = env.proxy.node_token(count)?;
    let mut pool = Pool::default();
    let overflows0 = procfs::listen_overflows();
    let joins = env.spawn_agents(&mut pool, count, &token)?;
    let overflows_joins = procfs::listen_overflows() - overflows0;
    std::thread::sleep(Duration::from_millis(500));
    let mem_before = env.proxy.memory()?;
    let files_before = env.proxy.open_files();
    let timeout = Duration::from_secs(120 + count as u64 / 10);
    let overflows1 = procfs::listen_overflows();
    let connect = env.connect_agents(&mut pool, count, timeout)?;
    let overflows_connect = procfs::listen_overflows() - overflows1;
    // Let the last audit records and handshakes finish before reading memory.
    pool.idle(Duration::from_secs(1), |_| {})?;
    let mem_connected = env.proxy.memory()?;
    let files_connected = env.proxy.open_files();

    let hold = env.common.keepalive * hold_rounds;
    env.progress.step(&format!(
        "holding {} tunnels for {hold_rounds} keepalive rounds ({:.1} s)",
        connect.up,
        hold.as_secs_f64()
    ));
    let cpu0 = env.proxy.cpu_seconds()?;
    let t0 = Instant::now();
    let progress = &mut env.progress;
    pool.idle(hold, |p| {
        let t = p.totals();
        progress.update(|| format!("holding: up {}, lost {}", t.up, t.disconnects));
    })?;
    let cpu1 = env.proxy.cpu_seconds()?;
    let held_secs = t0.elapsed().as_secs_f64();
    let idle_cpu_pct = (cpu1 - cpu0) / held_secs * 100.0;
    let agents = env::agent_report(&mut pool)?;
    let (status_tunnels, _) = env.proxy.status()?;
    let mem_held = env.proxy.memory()?;
    let up = agents.counters.up;
    let lost = count.saturating_sub(up.min(usize::try_from(status_tunnels).unwrap_or(0)));
    let ok = lost == 0 && agents.counters.disconnects == 0 && status_tunnels == count as u64;
    pool.shutdown();

    let delta_connected = mem_connected.rss_kib as i64 - mem_before.rss_kib as i64;
    let delta_held = mem_held.rss_kib as i64 - mem_before.rss_kib as i64;
    report.row("tunnels asked", count.to_string());
    report.row(
        "joins",
        format!(
            "{} ok, {} failed in {:.1} s ({:.0} joins/s)",
            joins.ok,
            joins.failed,
            joins.secs,
            joins.ok as f64 / joins.secs.max(1e-9)
        ),
    );
    report.row("join time", latency_line(&joins.latency));
    report.row(
        "connect",
        format!(
            "{} up in {:.2} s = {:.0} tunnels/s ({} failed attempts)",
            connect.up,
            connect.secs,
            connect.rate(),
            connect.failures
        ),
    );
    report.row("connect time (TCP → HELLO)", latency_line(&connect.latency));
    report.row(
        "hold",
        format!(
            "{hold_rounds} rounds of keepalive {:?} ({held_secs:.1} s)",
            env.common.keepalive
        ),
    );
    report.row(
        "after hold",
        format!(
            "agents up {up}, disconnects {}, proxy status {status_tunnels} up",
            agents.counters.disconnects
        ),
    );
    report.row("lost tunnels", lost.to_string());
    report.row(
        "proxy RSS",
        format!(
            "start {} KiB, before tunnels {} KiB, all up {} KiB, after hold {} KiB, peak (VmHWM) {} KiB",
            mem_start.rss_kib,
            mem_before.rss_kib,
            mem_connected.rss_kib,
            mem_held.rss_kib,
            mem_held.hwm_kib
        ),
    );
    report.row(
        "RSS per tunnel",
        format!(
            "{:.2} KiB (all up), {:.2} KiB (after hold)",
            kib_per(delta_connected, count),
            kib_per(delta_held, count)
        ),
    );
    report.row(
        "proxy open files",
        format!("{files_before} before, {files_connected} with tunnels up"),
    );
    report.row(
        "listen queue overflows",
        format!("{overflows_joins} during joins, {overflows_connect} during connects (TcpExt ListenOverflows, machine-wide)"),
    );
    report.row(
        "proxy CPU while idle",
        format!("{idle_cpu_pct:.2} % of one core"),
    );
    if let Some(e) = &agents.counters.last_error {
        report.row("last agent error", e.clone());
    }
    report.set("count", json!(count));
    report.set("joins", joins.json());
    report.set("connect", connect.json());
    report.set(
        "hold",
        json!({
            "rounds": hold_rounds, "keepalive_ms": env.common.keepalive.as_millis() as u64,
            "secs": held_secs,
        }),
    );
    report.set(
        "result",
        json!({
            "agents_up": up, "disconnects": agents.counters.disconnects,
            "proxy_status_tunnels": status_tunnels, "lost_tunnels": lost, "ok": ok,
        }),
    );
    report.set(
        "proxy_memory",
        json!({
            "start": mem_json(mem_start), "before_tunnels": mem_json(mem_before),
            "all_up": mem_json(mem_connected), "after_hold": mem_json(mem_held),
            "kib_per_tunnel_all_up": kib_per(delta_connected, count),
            "kib_per_tunnel_after_hold": kib_per(delta_held, count),
        }),
    );
    report.set(
        "proxy_open_files",
        json!({ "before": files_before, "all_up": files_connected }),
    );
    report.set("proxy_idle_cpu_pct_of_one_core", json!(idle_cpu_pct));
    report.set(
        "listen_overflows",
        json!({ "joins": overflows_joins, "connects": overflows_connect }),
    );
    let log = proxy_log_evidence(&env);
    report.row("proxy log", log.to_string());
    report.set("proxy_log", log);
    report.set("last_agent_error", json!(agents.counters.last_error));
    let common = env.common.clone();
    env.finish();
    drop(env);
    if baseline {
        let b = tcp_baseline(&common, count)?;
        report.section("baseline: plain TCP to a trivial monoio echo server");
        report.row(
            "RSS per connection",
            format!(
                "{:.2} KiB ({} connections, {} failed)",
                b["kib_per_connection"].as_f64().unwrap_or(0.0),
                b["connections"],
                b["failed"]
            ),
        );
        report.set("baseline_plain_tcp", b);
    }
    report.print();
    report.write_json(common.json.as_deref())?;
    Ok(ok)
}

/// Counts of proxy log lines that point at overload.
fn proxy_log_evidence(env: &Env) -> Value {
    json!({
        "too_many_handshakes": env.proxy.log_count("too many handshakes in progress"),
        "accept_failed": env.proxy.log_count("accept failed"),
        "work_dir": env.work_path.display().to_string(),
    })
}

/// Memory per idle plain TCP connection in a trivial monoio echo server.
pub fn tcp_baseline(common: &Common, count: usize) -> anyhow::Result<Value> {
    let mut progress = Progress::default();
    let exe = std::env::current_exe()?;
    let mut server = Command::new(exe)
        .arg("echo-server")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start the echo server")?;
    let result = (|| {
        let addr = env::listening_line(&mut server)?;
        let pid = server.id();
        std::thread::sleep(Duration::from_millis(200));
        let before = procfs::memory(pid)?;
        let mut pool = Pool::default();
        let per = common.per_worker.max(1);
        let workers = count.div_ceil(per).max(1);
        for w in 0..workers {
            let n = count / workers + usize::from(w < count % workers);
            pool.spawn(&WorkerSpec::Plain(PlainSpec {
                worker: w,
                addr,
                count: n,
                concurrency: (common.concurrency / workers).max(1),
                sources: common.sources,
            }))?;
        }
        progress.step(&format!(
            "baseline: {count} plain TCP connections to the echo server"
        ));
        pool.broadcast(&proto::Command::Connect)?;
        let answers = pool.collect(
            Duration::from_secs(120 + count as u64 / 50),
            |m| match m {
                Message::Joined { ok, failed, .. } => Some((ok, failed)),
                _ => None,
            },
            |_| {},
        )?;
        std::thread::sleep(Duration::from_millis(500));
        let after = procfs::memory(pid)?;
        pool.shutdown();
        let ok: usize = answers.iter().map(|a| a.0).sum();
        let failed: usize = answers.iter().map(|a| a.1).sum();
        let delta = after.rss_kib as i64 - before.rss_kib as i64;
        Ok(json!({
            "connections": ok, "failed": failed,
            "server_rss_before_kib": before.rss_kib, "server_rss_after_kib": after.rss_kib,
            "kib_per_connection": kib_per(delta, ok),
            "read_buffer_bytes": crate::baseline::ECHO_BUFFER,
        }))
    })();
    let _ = server.kill();
    let _ = server.wait();
    result
}

/// `baseline`: only the plain TCP figure.
pub fn baseline(common: Common, count: usize) -> anyhow::Result<bool> {
    let b = tcp_baseline(&common, count)?;
    let mut report = Report::new("baseline");
    report.row(
        "RSS per plain TCP connection",
        format!(
            "{:.2} KiB ({} connections, {} failed)",
            b["kib_per_connection"].as_f64().unwrap_or(0.0),
            b["connections"],
            b["failed"]
        ),
    );
    let ok = b["failed"].as_u64() == Some(0);
    report.set("baseline_plain_tcp", b);
    report.print();
    report.write_json(common.json.as_deref())?;
    Ok(ok)
}

/// What `sessions` measures beyond the common options.
#[derive(Debug, Clone)]
pub struct SessionsArgs {
    /// K.
    pub tunnels: usize,
    /// M.
    pub sessions: usize,
    /// Message size.
    pub msg_bytes: usize,
    /// Round trips per session.
    pub rounds: usize,
    /// Bytes per stream in the all-streams phase (0 skips it).
    pub bulk_bytes: u64,
    /// Bytes of the one-stream phase (0 skips it).
    pub single_bytes: u64,
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).context("histogram")
}

/// `sessions`: M user sessions over K tunnels.
pub fn sessions(common: Common, args: SessionsArgs) -> anyhow::Result<bool> {
    let mut env = Env::start(common)?;
    let mut report = Report::new("sessions");
    let token = env.proxy.node_token(args.tunnels)?;
    let password = format!("pw-{:016x}", fastrand::u64(..));
    env.proxy.add_user("loadtest", &password)?;
    let mut agents = Pool::default();
    let joins = env.spawn_agents(&mut agents, args.tunnels, &token)?;
    let connect = env.connect_agents(
        &mut agents,
        args.tunnels,
        Duration::from_secs(120 + args.tunnels as u64 / 10),
    )?;

    let per = env.common.per_worker.clamp(1, 6000);
    let workers = args.sessions.div_ceil(per).max(1);
    let mut users = Pool::default();
    let mut first = 0;
    for w in 0..workers {
        let n = args.sessions / workers + usize::from(w < args.sessions % workers);
        users.spawn(&WorkerSpec::Users(UsersSpec {
            worker: w,
            users_addr: env.users_addr,
            ca_pin: env.proxy.ca_pin.clone(),
            user: "loadtest".to_owned(),
            password: password.clone(),
            prefix: "node-".to_owned(),
            nodes: args.tunnels,
            first,
            count: n,
            concurrency: (env.common.concurrency / workers).max(1),
            rounds: args.rounds,
            msg_bytes: args.msg_bytes,
            bulk_bytes: args.bulk_bytes,
            sources: env.common.sources,
        }))?;
        first += n;
    }
    env.progress.step(&format!(
        "{workers} user worker(s): login, then {} sessions over {} tunnels",
        args.sessions, args.tunnels
    ));
    let started = Instant::now();
    let overflows0 = procfs::listen_overflows();
    users.broadcast(&proto::Command::Setup)?;
    let setups = users.collect(
        Duration::from_secs(300 + args.sessions as u64 / 10),
        |m| match m {
            Message::SetupDone {
                login_ms,
                ok,
                failed,
                setup_us,
                last_error,
            } => Some((login_ms, ok, failed, setup_us, last_error)),
            _ => None,
        },
        |_| {},
    )?;
    let setup_secs = started.elapsed().as_secs_f64();
    let setup_overflows = procfs::listen_overflows() - overflows0;
    let mut setup_hist = histogram()?;
    let mut sessions_ok = 0;
    let mut setup_failed = 0;
    let mut login_ms: f64 = 0.0;
    let mut errors = Vec::new();
    for (l, ok, failed, h, e) in &setups {
        merge(&mut setup_hist, h);
        sessions_ok += ok;
        setup_failed += failed;
        login_ms = login_ms.max(*l);
        errors.extend(e.clone());
    }
    let (_, active) = env.proxy.status()?;
    env.progress.step(&format!(
        "{sessions_ok} sessions up in {setup_secs:.1} s ({setup_failed} failed); proxy says {active} active; setup {}",
        latency_line(&setup_hist)
    ));

    let started = Instant::now();
    users.broadcast(&proto::Command::Rounds)?;
    let rounds = users.collect(
        Duration::from_secs(600),
        |m| match m {
            Message::RoundsDone {
                rtt_us,
                failed,
                last_error,
            } => Some((rtt_us, failed, last_error)),
            _ => None,
        },
        |_| {},
    )?;
    let rounds_secs = started.elapsed().as_secs_f64();
    let mut rtt_hist = histogram()?;
    let mut rounds_failed = 0;
    for (h, failed, e) in &rounds {
        merge(&mut rtt_hist, h);
        rounds_failed += failed;
        errors.extend(e.clone());
    }
    env.progress.step(&format!(
        "round trips: {} in {rounds_secs:.1} s ({:.0}/s); {}",
        rtt_hist.len(),
        rtt_hist.len() as f64 / rounds_secs.max(1e-9),
        latency_line(&rtt_hist)
    ));

    let mut bulk_failed = 0;
    let mut bulk_json = Value::Null;
    if args.bulk_bytes > 0 {
        users.broadcast(&proto::Command::Bulk)?;
        let bulks = users.collect(
            Duration::from_secs(900),
            |m| match m {
                Message::BulkDone {
                    per_stream_bps,
                    start_ns,
                    end_ns,
                    bytes,
                    failed,
                    last_error,
                } => Some((per_stream_bps, start_ns, end_ns, bytes, failed, last_error)),
                _ => None,
            },
            |_| {},
        )?;
        let mut rates = Vec::new();
        let (mut start, mut end, mut bytes) = (u64::MAX, 0u64, 0u64);
        for (r, s, e, b, failed, err) in bulks {
            rates.extend(r);
            start = start.min(s);
            end = end.max(e);
            bytes += b;
            bulk_failed += failed;
            errors.extend(err);
        }
        let secs = end.saturating_sub(start) as f64 / 1e9;
        let aggregate = bytes as f64 / secs.max(1e-9);
        let fairness = jain(&rates);
        let mut sorted = rates.clone();
        sorted.sort_by(f64::total_cmp);
        let pick = |q: f64| -> f64 {
            if sorted.is_empty() {
                return 0.0;
            }
            let i = ((sorted.len() - 1) as f64 * q).round() as usize;
            sorted[i.min(sorted.len() - 1)]
        };
        env.progress.step(&format!(
            "all streams: {} streams x {} bytes in {secs:.2} s = {} aggregate; Jain {fairness:.3}",
            rates.len(),
            args.bulk_bytes,
            mibps(aggregate)
        ));
        report.section("all streams at once (each sends bulk bytes, echoed back)");
        report.row(
            "streams",
            format!("{} ({} failed)", rates.len(), bulk_failed),
        );
        report.row(
            "aggregate",
            format!(
                "{} ({} bytes each way in {secs:.2} s)",
                mibps(aggregate),
                bytes
            ),
        );
        report.row(
            "per stream",
            format!(
                "min {}  median {}  max {}",
                mibps(pick(0.0)),
                mibps(pick(0.5)),
                mibps(pick(1.0))
            ),
        );
        report.row("fairness (Jain's index)", format!("{fairness:.4}"));
        bulk_json = json!({
            "streams": rates.len(), "failed": bulk_failed, "bytes_per_stream": args.bulk_bytes,
            "secs": secs, "aggregate_bytes_per_sec": aggregate,
            "per_stream_bytes_per_sec": { "min": pick(0.0), "median": pick(0.5), "max": pick(1.0) },
            "jain_index": fairness,
        });
    }

    let mut single_json = Value::Null;
    let mut single_failed = false;
    if args.single_bytes > 0 {
        users.send(
            0,
            &proto::Command::Single {
                bytes: args.single_bytes,
            },
        )?;
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut answer = None;
        while answer.is_none() && Instant::now() < deadline {
            if let Some((
                0,
                Message::SingleDone {
                    bytes,
                    elapsed_ns,
                    error,
                },
            )) = users.next(Duration::from_millis(200))?
            {
                answer = Some((bytes, elapsed_ns, error));
            }
        }
        let (bytes, elapsed_ns, error) =
            answer.unwrap_or((0, 0, Some("no answer within 600 s".into())));
        let bps = bytes as f64 / (elapsed_ns as f64 / 1e9).max(1e-9);
        single_failed = error.is_some();
        report.section("one stream alone");
        match &error {
            None => report.row(
                "throughput",
                format!(
                    "{} ({bytes} bytes echoed in {:.2} s)",
                    mibps(bps),
                    elapsed_ns as f64 / 1e9
                ),
            ),
            Some(e) => report.row("throughput", format!("FAILED: {e}")),
        }
        single_json = json!({
            "bytes": bytes, "secs": elapsed_ns as f64 / 1e9, "bytes_per_sec": bps, "error": error,
        });
    }
    users.shutdown();
    let agents_after = env::agent_report(&mut agents)?;
    agents.shutdown();

    let failed_sessions = setup_failed + rounds_failed + bulk_failed + usize::from(single_failed);
    let ok = failed_sessions == 0 && connect.all_up && agents_after.counters.disconnects == 0;
    let mut table = Report::new("sessions");
    table.row(
        "tunnels",
        format!(
            "{} asked, {} joined, {} up in {:.2} s",
            args.tunnels, joins.ok, connect.up, connect.secs
        ),
    );
    table.row(
        "sessions",
        format!(
            "{} asked, {sessions_ok} up in {setup_secs:.1} s, {setup_failed} failed to open; proxy status {active} active",
            args.sessions
        ),
    );
    table.row("login", format!("{login_ms:.0} ms (slowest worker)"));
    table.row("session setup", latency_line(&setup_hist));
    table.row(
        "listen queue overflows",
        format!("{setup_overflows} during setup (TcpExt ListenOverflows, machine-wide)"),
    );
    table.row(
        "round trips",
        format!(
            "{} x {} bytes per session, {} in {rounds_secs:.1} s ({:.0}/s), {rounds_failed} sessions failed",
            args.rounds,
            args.msg_bytes,
            rtt_hist.len(),
            rtt_hist.len() as f64 / rounds_secs.max(1e-9)
        ),
    );
    table.row("round-trip time", latency_line(&rtt_hist));
    table.row("failed sessions", failed_sessions.to_string());
    if let Some(settings) = env.common.relay {
        table.row(
            "relay",
            format!(
                "{} ms one way ± {} ms, loss {} (users leg: {}, tunnels leg: {})",
                settings.delay_ms,
                settings.jitter_ms,
                settings.loss,
                env.common.relay_users,
                env.common.relay_tunnels
            ),
        );
    }
    if let Some(e) = errors.first() {
        table.row("an error seen", e.clone());
    }
    table.rows_from(report);
    table.set("tunnels", json!(args.tunnels));
    table.set("sessions", json!(args.sessions));
    table.set("joins", joins.json());
    table.set("connect", connect.json());
    table.set(
        "setup",
        json!({
            "ok": sessions_ok, "failed": setup_failed, "secs": setup_secs,
            "proxy_sessions_active": active, "login_ms": login_ms,
            "listen_overflows": setup_overflows,
            "latency": latency(&setup_hist),
        }),
    );
    table.set(
        "round_trips",
        json!({
            "rounds_per_session": args.rounds, "msg_bytes": args.msg_bytes,
            "failed_sessions": rounds_failed, "secs": rounds_secs,
            "per_sec": rtt_hist.len() as f64 / rounds_secs.max(1e-9),
            "latency": latency(&rtt_hist),
        }),
    );
    table.set("all_streams", bulk_json);
    table.set("one_stream", single_json);
    table.set(
        "relay",
        match env.common.relay {
            Some(s) => json!({
                "delay_ms_one_way": s.delay_ms, "jitter_ms": s.jitter_ms, "loss": s.loss,
                "users_leg": env.common.relay_users, "tunnels_leg": env.common.relay_tunnels,
            }),
            None => Value::Null,
        },
    );
    table.set(
        "result",
        json!({ "failed_sessions": failed_sessions, "tunnel_disconnects": agents_after.counters.disconnects, "ok": ok }),
    );
    table.set("errors", json!(errors.iter().take(5).collect::<Vec<_>>()));
    table.print();
    table.write_json(env.json_path())?;
    env.finish();
    Ok(ok)
}

/// Which storm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StormEvent {
    /// SIGTERM the proxy and start it again on the same ports and data directory.
    Restart,
    /// Every agent drops its connection at once.
    Cut,
}

/// `storm`: N tunnels up, then a restart or a cut; time until all are back.
pub fn storm(
    common: Common,
    count: usize,
    event: StormEvent,
    timeout: Duration,
) -> anyhow::Result<bool> {
    let mut env = Env::start(common)?;
    let mut report = Report::new("storm");
    let token = env.proxy.node_token(count)?;
    let mut pool = Pool::default();
    let joins = env.spawn_agents(&mut pool, count, &token)?;
    let connect = env.connect_agents(
        &mut pool,
        count,
        Duration::from_secs(120 + count as u64 / 10),
    )?;
    let before = env::agent_report(&mut pool)?;
    let c0 = before.counters.connects;
    let f0 = before.counters.failures;
    let up0 = before.counters.up;

    let overflows0 = procfs::listen_overflows();
    let t0 = mono_ns();
    let started = Instant::now();
    let (mut stop_secs, mut start_secs) = (0.0, 0.0);
    match event {
        StormEvent::Restart => {
            env.progress
                .step(&format!("{up0} tunnels up; SIGTERM to the proxy"));
            stop_secs = env.proxy.stop()?.as_secs_f64();
            start_secs = env.proxy.start()?.as_secs_f64();
            env.progress.step(&format!(
                "proxy stopped (drained) in {stop_secs:.2} s, started again in {start_secs:.2} s"
            ));
        }
        StormEvent::Cut => {
            env.progress
                .step(&format!("{up0} tunnels up; cutting every connection"));
            pool.broadcast(&proto::Command::Cut)?;
        }
    }
    let progress = &mut env.progress;
    let all_back = pool.wait_until(
        timeout,
        |t| t.up >= count && t.connects >= c0 + count as u64,
        |p| {
            let t = p.totals();
            progress.update(|| {
                format!(
                    "up {}/{count}, reconnected {}, failed attempts {}",
                    t.up,
                    t.connects.saturating_sub(c0),
                    t.failures.saturating_sub(f0)
                )
            })
        },
    )?;
    let observed_secs = started.elapsed().as_secs_f64();
    let overflows = procfs::listen_overflows() - overflows0;
    // Let the proxy register the last ones before asking it.
    pool.idle(Duration::from_millis(500), |_| {})?;
    let after = env::agent_report(&mut pool)?;
    let (status_tunnels, _) = env.proxy.status()?;
    pool.shutdown();
    let mut times: Vec<u64> = after.times.iter().copied().filter(|&t| t >= t0).collect();
    times.sort_unstable();
    let last = times.last().copied().unwrap_or(t0);
    let recovery_secs = (last - t0) as f64 / 1e9;
    let buckets_len = usize::try_from((last - t0) / 1_000_000_000).unwrap_or(0) + 1;
    let mut buckets = vec![0u64; buckets_len];
    for t in &times {
        let b = usize::try_from((t - t0) / 1_000_000_000).unwrap_or(0);
        if let Some(slot) = buckets.get_mut(b) {
            *slot += 1;
        }
    }
    let reconnects = after.counters.connects - c0;
    let resumed = after.counters.resumed - before.counters.resumed;
    let failed_attempts = after.counters.failures - f0;
    let ok = all_back && status_tunnels == count as u64;

    report.row(
        "tunnels",
        format!("{count} asked, {up0} up before the storm"),
    );
    report.row(
        "event",
        match event {
            StormEvent::Restart => format!(
                "proxy restart: SIGTERM → exit {stop_secs:.2} s, start → ready {start_secs:.2} s"
            ),
            StormEvent::Cut => "every agent cut its connection at once".to_owned(),
        },
    );
    report.row(
        "agent backoff",
        format!(
            "min {:?}, max {:?} (agent::backoff::Backoff, reset after {:?} up)",
            env.common.backoff_min,
            env.common.backoff_max,
            agent::backoff::STABLE_AFTER
        ),
    );
    report.row(
        "all back",
        if all_back {
            format!("yes, {recovery_secs:.2} s after the event (last tunnel up)")
        } else {
            format!(
                "NO: {} of {count} up after {observed_secs:.0} s",
                after.counters.up
            )
        },
    );
    report.row(
        "reconnects",
        format!(
            "{reconnects} tunnels came up ({resumed} resumed their session), {failed_attempts} attempts failed"
        ),
    );
    report.row("proxy status", format!("{status_tunnels} tunnels up"));
    report.row(
        "listen queue overflows",
        format!("{overflows} (TcpExt ListenOverflows, machine-wide)"),
    );
    report.row(
        "reconnect time (TCP → HELLO)",
        latency_line(&after.connect_latency),
    );
    report.row(
        "per second",
        buckets
            .iter()
            .enumerate()
            .map(|(i, n)| format!("{i}s:{n}"))
            .collect::<Vec<_>>()
            .join(" "),
    );
    if let Some(e) = &after.counters.last_error {
        report.row("last agent error", e.clone());
    }
    report.set("count", json!(count));
    report.set(
        "event",
        json!(match event {
            StormEvent::Restart => "restart",
            StormEvent::Cut => "cut",
        }),
    );
    report.set("joins", joins.json());
    report.set("connect", connect.json());
    report.set(
        "restart",
        json!({ "stop_secs": stop_secs, "start_secs": start_secs }),
    );
    report.set(
        "backoff",
        json!({
            "min_ms": env.common.backoff_min.as_millis() as u64,
            "max_ms": env.common.backoff_max.as_millis() as u64,
        }),
    );
    report.set(
        "result",
        json!({
            "all_back": all_back, "recovery_secs": recovery_secs, "reconnects": reconnects,
            "resumed": resumed,
            "failed_attempts": failed_attempts, "proxy_status_tunnels": status_tunnels,
            "reconnects_per_second": buckets, "ok": ok, "listen_overflows": overflows,
            "connect_latency_all": latency(&after.connect_latency),
        }),
    );
    report.set("last_agent_error", json!(after.counters.last_error));
    let log = proxy_log_evidence(&env);
    report.row("proxy log", log.to_string());
    report.set("proxy_log", log);
    report.print();
    report.write_json(env.json_path())?;
    env.finish();
    Ok(ok)
}
