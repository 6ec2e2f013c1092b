//! `flood`: honest logins while attackers hold silent TCP connections to the users'
//! listener, from many loopback source groups (issue 13, item 9).
//!
//! The orchestrator starts a proxy (default limits: 1,024 handshakes in progress, 256 per
//! source group, a 2 s ClientHello deadline), adds one user, and starts `--attackers` child
//! processes (`flood-attacker`), which together hold `--groups` x `--per-group` silent
//! connections from 127.0.G.1 (one address per /24, so the per-group limit does not bind
//! and the proxy-wide table is what is attacked), reconnecting each one the moment the
//! proxy closes it. After `--warmup`, it runs `--logins` honest logins (`--concurrency` at
//! once) from 127.0.1.x and reports how many succeeded. The attackers are other processes:
//! 16,384 sockets and the proxy's own would not fit one process's 20,000 open files. They
//! run at the lowest CPU priority (`nice 19`), standing in for attackers on other machines.

use std::cell::{Cell, RefCell};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use monoio::io::AsyncReadRent as _;
use tunnel::identity::CaPin;

use crate::proxyproc::{ProxyProcess, ProxySettings};

/// What `flood` measures.
#[derive(Debug, Clone)]
pub struct FloodArgs {
    pub proxy_bin: std::path::PathBuf,
    pub groups: u16,
    pub per_group: u16,
    pub attackers: u16,
    pub logins: usize,
    pub concurrency: usize,
    pub warmup: Duration,
    pub proxy_workers: u16,
}

/// Source address of attacking group `g` (0-based): 127.0.(100 + g % 150).1, then
/// 127.1.x.1 and on, one address per /24.
fn attack_source(g: u16) -> IpAddr {
    let second = u8::try_from(g / 150).unwrap_or(u8::MAX);
    let third = 100 + u8::try_from(g % 150).unwrap_or(0);
    IpAddr::V4(Ipv4Addr::new(127, second, third, 1))
}

/// Runs the benchmark; prints the figure; `Ok(true)` when at least 99 % of logins succeeded.
pub fn run(args: FloodArgs) -> anyhow::Result<bool> {
    let work = tempfile::tempdir().context("work directory")?;
    let settings = ProxySettings {
        keepalive: Duration::from_secs(10),
        keepalive_count: 3,
        log_level: "warn".into(),
        max_streams_per_tunnel: 1024,
        workers: args.proxy_workers,
    };
    let mut proxy = ProxyProcess::create(&args.proxy_bin, work.path(), &settings)?;
    proxy.start()?;
    proxy.add_user("honest", "correct horse battery staple")?;
    let exe = std::env::current_exe().context("own executable")?;
    let per_attacker = args.groups.div_ceil(args.attackers.max(1));
    let mut attackers: Vec<Child> = Vec::new();
    let mut first = 0u16;
    while first < args.groups {
        let count = per_attacker.min(args.groups - first);
        let child = Command::new(&exe)
            .arg("flood-attacker")
            .args(["--target", &proxy.users.to_string()])
            .args(["--first-group", &first.to_string()])
            .args(["--groups", &count.to_string()])
            .args(["--per-group", &args.per_group.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("start an attacker")?;
        attackers.push(child);
        first += count;
    }
    eprintln!(
        "flood: {} attackers, {} groups x {} silent connections; warming up {:?}",
        attackers.len(),
        args.groups,
        args.per_group,
        args.warmup
    );
    std::thread::sleep(args.warmup);
    let pin: CaPin = proxy.ca_pin.parse().context("ca pin")?;
    let users = proxy.users;
    let outcome = logins(users, pin, args.logins, args.concurrency);
    for child in &mut attackers {
        // SAFETY: kill(2) on the pid of a child we started and have not reaped.
        unsafe {
            libc::kill(i32::try_from(child.id()).unwrap_or(0), libc::SIGTERM);
        }
    }
    let mut churn = 0u64;
    for child in attackers {
        let out = child.wait_with_output().context("attacker output")?;
        let text = String::from_utf8_lossy(&out.stdout);
        churn += text
            .lines()
            .filter_map(|l| l.strip_prefix("connections "))
            .filter_map(|n| n.trim().parse::<u64>().ok())
            .sum::<u64>();
    }
    let (ok, failed, errors, mut times) = outcome?;
    times.sort_unstable();
    let pct = |p: f64| {
        times
            .get(((times.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    let total = ok + failed;
    let rate = if total == 0 {
        0.0
    } else {
        ok as f64 * 100.0 / total as f64
    };
    println!(
        "handshake flood: {} groups x {} silent connections ({} attacker connections opened in all)",
        args.groups, args.per_group, churn
    );
    println!(
        "honest logins: {ok} of {total} succeeded ({rate:.1} %); latency p50 {:.0} ms, p99 {:.0} ms",
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3
    );
    for e in errors.iter().take(5) {
        println!("  failure: {e}");
    }
    proxy.stop()?;
    Ok(rate >= 99.0)
}

type LoginOutcome = (usize, usize, Vec<String>, Vec<Duration>);

fn logins(
    users: SocketAddr,
    pin: CaPin,
    count: usize,
    concurrency: usize,
) -> anyhow::Result<LoginOutcome> {
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .context("monoio runtime")?;
    rt.block_on(async move {
        let next = Rc::new(Cell::new(0usize));
        let ok = Rc::new(Cell::new(0usize));
        let errors = Rc::new(RefCell::new(Vec::new()));
        let times = Rc::new(RefCell::new(Vec::new()));
        let mut tasks = Vec::new();
        for lane in 0..concurrency.max(1) {
            let (next, ok, errors, times) =
                (next.clone(), ok.clone(), errors.clone(), times.clone());
            tasks.push(monoio::spawn(async move {
                loop {
                    let i = next.get();
                    if i >= count {
                        break;
                    }
                    next.set(i + 1);
                    let from = IpAddr::V4(Ipv4Addr::new(
                        127,
                        0,
                        1,
                        1 + u8::try_from(lane % 200).unwrap_or(0),
                    ));
                    let t0 = Instant::now();
                    match crate::identity::login(
                        Some(from),
                        users,
                        pin,
                        "honest",
                        "correct horse battery staple",
                    )
                    .await
                    {
                        Ok(_) => {
                            ok.set(ok.get() + 1);
                            times.borrow_mut().push(t0.elapsed());
                        }
                        Err(e) => errors.borrow_mut().push(format!("{e:#}")),
                    }
                }
            }));
        }
        for t in tasks {
            t.await;
        }
        let failed = errors.borrow().len();
        let errors = errors.borrow().clone();
        let times = times.borrow().clone();
        Ok((ok.get(), failed, errors, times))
    })
}

/// `flood-attacker`: holds `groups` x `per_group` silent connections to `target`, from
/// group sources starting at `first_group`, reconnecting each as soon as it is closed,
/// until SIGTERM; then prints `connections N` (how many it opened).
pub fn attack(
    target: SocketAddr,
    first_group: u16,
    groups: u16,
    per_group: u16,
) -> anyhow::Result<()> {
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .context("monoio runtime")?;
    // The attackers share this machine's cores with the proxy; a real attacker's CPU is its
    // own. Lowest priority keeps the proxy's share what it would be against remote attackers
    // (they still open connections as fast as the proxy takes them).
    // SAFETY: nice(2) on this process only.
    unsafe {
        libc::nice(19);
    }
    let opened = Rc::new(Cell::new(0u64));
    let stop = Rc::new(Cell::new(false));
    // SIGTERM ends the attack: the handler only sets a flag the tasks poll.
    static TERM: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    extern "C" fn on_term(_: libc::c_int) {
        TERM.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    // SAFETY: installs an async-signal-safe handler (one atomic store).
    unsafe {
        libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t);
    }
    rt.block_on({
        let (opened, stop) = (opened.clone(), stop.clone());
        async move {
            for g in first_group..first_group + groups {
                let from = attack_source(g);
                for _ in 0..per_group {
                    let (opened, stop) = (opened.clone(), stop.clone());
                    monoio::spawn(async move {
                        while !stop.get() {
                            let Ok(stream) = crate::net::connect_from(Some(from), target).await
                            else {
                                monoio::time::sleep(Duration::from_millis(50)).await;
                                continue;
                            };
                            opened.set(opened.get() + 1);
                            // Silent: wait for the proxy to close it (a read of 0 or an error).
                            let mut stream = stream;
                            loop {
                                let (res, _) = stream.read(vec![0u8; 1]).await;
                                if !matches!(res, Ok(n) if n > 0) {
                                    break;
                                }
                            }
                        }
                    });
                }
            }
            while !TERM.load(std::sync::atomic::Ordering::Relaxed) {
                monoio::time::sleep(Duration::from_millis(100)).await;
            }
            stop.set(true);
        }
    });
    println!("connections {}", opened.get());
    Ok(())
}
