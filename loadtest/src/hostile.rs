//! `hostile-window`: the memory attack of issue 13, item 8, as a figure. One agent whose node
//! talks as fast as it is let; N logged-in users, each announcing `initial_window =
//! 0xFFFFFFFF` in its HELLO, opening one stream to that node and then reading nothing (not
//! even its socket, so it never sends WINDOW). The proxy's resident memory is sampled before,
//! at the end of the attack, and again as long after the users' connections are dropped
//! (their sessions wait, detached, for a resume that never comes). The goal: at most two of
//! the proxy's windows per stream (one queued toward the user, one unread from the node).

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::{Bytes, BytesMut};
use frame::{Announce, Event, NodeInfo, Open, Role, Session, SessionConfig};
use serde_json::json;
use tunnel::control::{ALPN_SESSION, ALPN_TUNNEL};
use tunnel::identity::CaPin;
use tunnel::mux::{Tunnel, drive};
use tunnel::tls::TlsConnection;

use crate::env::{Common, Env};
use crate::identity::{self, Credentials};
use crate::net;
use crate::report::Report;

/// The proxy's `flow.window` (its default; the harness does not change it).
const WINDOW: u64 = frame::DEFAULT_WINDOW as u64;
const NODE: &str = "node-talk";

/// What the mode measures beyond the common options.
#[derive(Debug, Clone)]
pub struct HostileArgs {
    /// Hostile users, one stream each.
    pub streams: usize,
    /// How long the attack runs before the first sample, and again after disconnecting.
    pub attack: Duration,
}

/// Runs the attack; the check passes when the proxy grew by at most two windows per stream
/// (plus 16 MiB for everything else a fresh proxy allocates under load).
pub fn run(common: Common, args: HostileArgs) -> anyhow::Result<bool> {
    let mut env = Env::start(common)?;
    let token = env.proxy.node_token(1)?;
    env.proxy.add_user("mallory", "hostile window")?;
    let pin: CaPin = env.proxy.ca_pin.parse().context("ca pin")?;
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .context("monoio runtime")?;
    let tunnels = env.tunnel_addr;
    let users = env.users_addr;
    let written = Rc::new(Cell::new(0u64));
    let samples = rt.block_on(async {
        let agent = identity::join(None, tunnels, pin, &token, NODE).await?;
        talking_agent(&agent, tunnels, written.clone()).await?;
        let user = identity::login(None, users, pin, "mallory", "hostile window").await?;
        let before = env.proxy.memory()?;
        env.progress.step(&format!(
            "proxy RSS {} KiB; {} hostile users open a stream each",
            before.rss_kib, args.streams
        ));
        let mut held = Vec::new();
        for _ in 0..args.streams {
            held.push(hostile_user(&user, users).await?);
        }
        monoio::time::sleep(args.attack).await;
        let attacked = env.proxy.memory()?;
        let node_wrote = written.get();
        env.progress.step(&format!(
            "after {:?}: proxy RSS {} KiB, the node wrote {} MiB; users disconnect",
            args.attack,
            attacked.rss_kib,
            node_wrote >> 20
        ));
        drop(held);
        monoio::time::sleep(args.attack).await;
        let detached = env.proxy.memory()?;
        anyhow::Ok((before, attacked, node_wrote, detached, written.get()))
    })?;
    let (before, attacked, node_wrote, detached, node_wrote_total) = samples;
    let streams = args.streams as f64;
    let grown = |kib: u64| kib.saturating_sub(before.rss_kib) as f64 / 1024.0;
    let windows = |kib: u64| grown(kib) * 1024.0 * 1024.0 / WINDOW as f64 / streams;
    let mut report = Report::new("hostile-window");
    report.row(
        "attack",
        format!(
            "{} users × 1 stream, HELLO initial_window 0xFFFFFFFF, never read; {:?} each phase",
            args.streams, args.attack
        ),
    );
    report.row("proxy window", format!("{} KiB", WINDOW >> 10));
    report.row("proxy RSS before", format!("{} MiB", before.rss_kib >> 10));
    report.row(
        "RSS growth, users connected",
        format!(
            "{:.1} MiB ({:.2} windows per stream; the node wrote {:.1} MiB)",
            grown(attacked.rss_kib),
            windows(attacked.rss_kib),
            node_wrote as f64 / 1048576.0
        ),
    );
    report.row(
        "RSS growth, users detached",
        format!(
            "{:.1} MiB ({:.2} windows per stream; the node wrote {:.1} MiB in all)",
            grown(detached.rss_kib),
            windows(detached.rss_kib),
            node_wrote_total as f64 / 1048576.0
        ),
    );
    let limit = 2.0 * streams * WINDOW as f64 / 1048576.0 + 16.0;
    let ok = grown(attacked.rss_kib.max(detached.rss_kib)) <= limit;
    report.row(
        "check",
        format!(
            "{} (growth ≤ 2 windows per stream + 16 MiB = {limit:.0} MiB)",
            if ok { "pass" } else { "FAIL" }
        ),
    );
    report.set(
        "hostile_window",
        json!({
            "streams": args.streams,
            "attack_secs": args.attack.as_secs_f64(),
            "window_bytes": WINDOW,
            "rss_before_kib": before.rss_kib,
            "rss_attacked_kib": attacked.rss_kib,
            "rss_detached_kib": detached.rss_kib,
            "node_wrote_bytes": node_wrote,
            "node_wrote_total_bytes": node_wrote_total,
            "ok": ok,
        }),
    );
    report.print();
    report.write_json(env.json_path())?;
    env.finish();
    Ok(ok)
}

/// The node: a tunnel that accepts every OPEN and writes to it as fast as it gets credit,
/// counting what its session took.
async fn talking_agent(
    agent: &Credentials,
    tunnels: std::net::SocketAddr,
    written: Rc<Cell<u64>>,
) -> anyhow::Result<()> {
    let conn = net::connect_tls(
        None,
        tunnels,
        agent.client_config(ALPN_TUNNEL)?,
        ALPN_TUNNEL,
    )
    .await?;
    let tunnel = Tunnel::new(Session::new(
        SessionConfig::new(Role::Agent, true),
        random_id(),
        Instant::now(),
    ));
    let driven = tunnel.clone();
    monoio::spawn(async move { drive(&driven, conn, BytesMut::new()).await });
    if !tunnel.connected().await {
        bail!("the agent's tunnel did not come up");
    }
    tunnel.announce(&Announce {
        cluster: String::new(),
        nodes: vec![NodeInfo {
            name: NODE.to_owned(),
            online: true,
            tunnel: true,
            labels: Vec::new(),
            services: vec!["ssh".to_owned()],
        }],
    })?;
    monoio::spawn(async move {
        while let Some(incoming) = tunnel.incoming().await {
            let Ok(stream) = incoming.accept() else {
                continue;
            };
            let written = written.clone();
            monoio::spawn(async move {
                let chunk = Bytes::from(vec![0x5a; 16 * 1024]);
                while stream.write(chunk.clone()).await.is_ok() {
                    written.set(written.get() + chunk.len() as u64);
                }
            });
        }
    });
    Ok(())
}

/// One hostile user: HELLO with a 4 GiB window, one OPEN to the node, then nothing: the
/// connection is returned unread (dropping it disconnects). Its session is driven by hand,
/// not by `drive`, so that what the proxy sends stays in the proxy (and the socket buffers),
/// not in this process.
async fn hostile_user(
    user: &Credentials,
    users: std::net::SocketAddr,
) -> anyhow::Result<TlsConnection> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut conn =
            net::connect_tls(None, users, user.client_config(ALPN_SESSION)?, ALPN_SESSION).await?;
        let mut config = SessionConfig::new(Role::Client, true);
        config.initial_window = u32::MAX;
        let mut session = Session::new(config, random_id(), Instant::now());
        let stream = session.open(Open {
            session_id: random_id(),
            node: NODE.to_owned(),
            service: "ssh".to_owned(),
            user: "mallory".to_owned(),
            login: "root".to_owned(),
            ..Open::default()
        })?;
        let mut input = BytesMut::new();
        loop {
            while let Some(t) = session.poll_transmit() {
                conn.write_all(&[t.header(), &t.payload()[..]]).await?;
            }
            match session.poll_event() {
                Some(Event::Opened { stream: s }) if s == stream => return Ok(conn),
                Some(Event::OpenFailed { reason, .. }) => {
                    // The directory learns of the node a moment after its ANNOUNCE.
                    if Instant::now() > deadline {
                        bail!("OPEN to {NODE} refused: {reason}");
                    }
                    monoio::time::sleep(Duration::from_millis(20)).await;
                    break;
                }
                Some(Event::Ended(e)) => bail!("the proxy ended the session: {e}"),
                Some(_) => continue,
                None => {}
            }
            if conn.read(&mut input).await? == 0 {
                bail!("the proxy closed the connection before OPEN_OK");
            }
            session.handle_input(&mut input, Instant::now())?;
        }
    }
}

fn random_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    if getrandom::fill(&mut id).is_err() {
        id = fastrand::u128(..).to_le_bytes();
    }
    id
}
