//! `remoteler proxy ssh` keeps its session through a lost connection to the proxy, end to end
//! with the real binaries: proxy (two cores), agent, and the client, with a relay of the test
//! between client and proxy that can cut every connection (FIN both ways) or stall them
//! (a link that died without FIN or RST: bytes stop, nothing closes). The agent forwards
//! `ssh` to an echo server, so the test checks every byte that went through.
#![allow(clippy::unwrap_used)] // test harness: a failed unwrap is a failed test

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{CLIENT, Reaped, Relay, cluster, echo_server, lines, wait_line};

fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add((i >> 16) as u8))
        .collect()
}

/// Audit records of `event`, once at least `min` are there (the writer appends a moment
/// after the event).
fn audit_records(cluster: &common::Cluster, event: &str, min: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let audit = std::fs::read_to_string(cluster.data().join("audit.log")).unwrap();
        let records: Vec<serde_json::Value> = audit
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|r| r["event"] == event)
            .collect();
        if records.len() >= min || Instant::now() > deadline {
            return records;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `remoteler proxy ssh ARGS... root@node-f:22` through the relay: (child, stdin, stdout).
fn proxy_ssh(
    home: &std::path::Path,
    args: &[&str],
) -> (
    Reaped,
    std::process::ChildStdin,
    std::process::ChildStdout,
    std::sync::mpsc::Receiver<String>,
) {
    let mut child = Command::new(CLIENT)
        .args(["proxy", "ssh"])
        .args(args)
        .arg("root@node-f:22")
        .env("REMOTELER_HOME", home)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = lines(child.stderr.take().unwrap());
    (Reaped(child), stdin, stdout, stderr)
}

/// Sends `len` bytes of [`pattern`] through `remoteler proxy ssh` (through the echo server),
/// paced at about 4 MiB/s, while `during` runs with a function that waits until the echo
/// has brought back at least so many bytes; returns what came back, the exit status and the
/// time it all took.
fn paced_echo(
    home: &std::path::Path,
    len: usize,
    during: impl FnOnce(&dyn Fn(usize)),
) -> (Vec<u8>, std::process::ExitStatus, Duration) {
    let (mut child, mut stdin, mut stdout, _stderr) = proxy_ssh(home, &[]);
    let started = Instant::now();
    let writer = std::thread::spawn(move || {
        for chunk in pattern(len).chunks(64 << 10) {
            stdin.write_all(chunk).unwrap();
            std::thread::sleep(Duration::from_millis(15));
        }
        drop(stdin); // end of input: the session closes once the echo is back
    });
    let received = Arc::new(AtomicUsize::new(0));
    let reader = {
        let received = received.clone();
        std::thread::spawn(move || {
            let mut back = Vec::with_capacity(len);
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match stdout.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        back.extend_from_slice(&buf[..n]);
                        received.store(back.len(), Ordering::SeqCst);
                    }
                }
            }
            back
        })
    };
    during(&|at_least| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while received.load(Ordering::SeqCst) < at_least {
            let now = received.load(Ordering::SeqCst);
            assert!(Instant::now() < deadline, "stuck at {now} bytes");
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    writer.join().unwrap();
    let back = reader.join().unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(30));
    (back, status, started.elapsed())
}

fn wait_exit(child: &mut Reaped, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "remoteler proxy ssh did not exit within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn proxy_ssh_resumes_after_cut_and_stalled_connections_and_ends_past_the_grace() {
    let echo = echo_server();
    let cluster = cluster(echo);
    let relay = Relay::start(&cluster.listen[0]);
    let home = cluster.tmp.path().join("home-relay");
    cluster.login(&home, &relay.addr.to_string());

    // A stream of 12 MiB, paced so that it is in flight through a cut and a stall.
    const LEN: usize = 12 << 20;
    let (back, status, elapsed) = paced_echo(&home, LEN, |wait_received| {
        wait_received(2 << 20);
        // Both ends see the connection close: the client dials again at once and resumes.
        relay.cut();
        wait_received(5 << 20);
        assert!(
            relay.accepted.load(Ordering::SeqCst) >= 2,
            "the client did not reconnect"
        );
        // The link dies silently: the client's keepalive (3 s x 3) notices, it reconnects,
        // and the proxy, whose own keepalive would take 30 s, gives the old connection up.
        relay.stall();
    });
    assert_eq!(back.len(), LEN, "echo length after two reconnects");
    assert!(back == pattern(LEN), "echo differs after two reconnects");
    assert!(status.success(), "proxy ssh exited with {status}");
    assert!(
        relay.accepted.load(Ordering::SeqCst) >= 3,
        "no reconnect after the stall"
    );
    // Resumed by take-over, not by the proxy's keepalive (30 s) plus a grace.
    assert!(elapsed < Duration::from_secs(28), "took {elapsed:?}");
    eprintln!("12 MiB through a cut and a stall in {elapsed:?}");
    let detached = audit_records(&cluster, "user.detached", 2);
    let resumed = audit_records(&cluster, "user.resumed", 2);
    assert!(detached.len() >= 2, "user.detached records: {detached:?}");
    assert!(resumed.len() >= 2, "user.resumed records: {resumed:?}");
    assert!(resumed.iter().all(|r| r["user"] == "alice"), "{resumed:?}");
    assert!(cluster.metric("remoteler_connection_detaches_total{kind=\"user\"}") >= 2);
    assert!(cluster.metric("remoteler_connection_resumes_total{kind=\"user\"}") >= 2);
    assert_eq!(
        cluster.metric("remoteler_connection_resumes_total{kind=\"cluster\"}"),
        0
    );
    let ends = audit_records(&cluster, "session.end", 1);
    assert_eq!(ends.len(), 1, "one session from start to end: {ends:?}");
    assert_eq!(ends[0]["bytes_from_user"], LEN as u64, "{ends:?}");
    assert_eq!(ends[0]["bytes_to_user"], LEN as u64, "{ends:?}");

    // Out of reach for longer than the client's grace: the session ends, and says why.
    let (mut child, mut stdin, mut stdout, stderr) = proxy_ssh(&home, &["--resume-grace", "2s"]);
    stdin.write_all(b"ping\n").unwrap();
    let mut pong = [0u8; 5];
    stdout.read_exact(&mut pong).unwrap();
    assert_eq!(&pong, b"ping\n");
    relay.refuse(true);
    relay.stall();
    let status = wait_exit(&mut child, Duration::from_secs(30));
    assert!(!status.success(), "a session past its grace must fail");
    let why = wait_line(&stderr, "the reason", |l| {
        l.contains("could not be resumed")
    });
    assert!(why.contains("node-f"), "{why}");
    eprintln!("client: {why}");
    relay.refuse(false);
}

#[test]
fn agent_tunnel_resumes_when_the_agent_notices_a_dead_link_first() {
    let echo = echo_server();
    let (cluster, relay) = common::cluster_with(echo, true);
    let relay = relay.unwrap();
    const LEN: usize = 8 << 20;
    let (back, status, elapsed) = paced_echo(&cluster.home(), LEN, |wait_received| {
        wait_received(1 << 20);
        // The agent's link dies silently. The agent notices within 3 s and reconnects; the
        // proxy (keepalive 10 s x 3) has not noticed yet and gives the old connection up for
        // the new one, so the session through the tunnel carries on.
        relay.stall();
    });
    assert_eq!(back.len(), LEN, "echo length across the agent's reconnect");
    assert!(
        back == pattern(LEN),
        "echo differs across the agent's reconnect"
    );
    assert!(status.success(), "proxy ssh exited with {status}");
    assert!(
        relay.accepted.load(Ordering::SeqCst) >= 2,
        "the agent did not reconnect"
    );
    assert!(elapsed < Duration::from_secs(25), "took {elapsed:?}");
    let resumed = audit_records(&cluster, "tunnel.resumed", 1);
    assert_eq!(resumed.len(), 1, "{resumed:?}");
    assert_eq!(resumed[0]["node"], "node-f");
    let disconnects = audit_records(&cluster, "tunnel.disconnect", 0);
    assert!(
        disconnects.is_empty(),
        "the tunnel was replaced, not resumed: {disconnects:?}"
    );
    eprintln!("8 MiB across the agent's silent link loss in {elapsed:?}");
}

#[test]
fn forward_streams_survive_a_cut_connection() {
    let echo = echo_server();
    let cluster = cluster(echo);
    let relay = Relay::start(&cluster.listen[0]);
    let home = cluster.tmp.path().join("home-relay");
    cluster.login(&home, &relay.addr.to_string());
    let (_forward, addr, err) =
        common::forward_from(&home, &["--listen", "127.0.0.1:0", "node-f", "echo"]);

    // One local connection, open across the cut: its stream resumes with the session.
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let data = pattern(2 << 20);
    let (first, second) = data.split_at(1 << 20);
    let mut back = vec![0u8; first.len()];
    conn.write_all(first).unwrap();
    conn.read_exact(&mut back).unwrap();
    assert!(back == first, "echo before the cut differs");
    relay.cut();
    conn.write_all(second).unwrap();
    let mut back = vec![0u8; second.len()];
    conn.read_exact(&mut back).unwrap();
    assert!(back == second, "echo after the cut differs");
    assert!(
        relay.accepted.load(Ordering::SeqCst) >= 2,
        "the forward did not reconnect"
    );
    let resumed = audit_records(&cluster, "user.resumed", 1);
    assert_eq!(resumed.len(), 1, "{resumed:?}");
    drop(conn);
    let ended: Vec<String> = err
        .try_iter()
        .filter(|l| l.contains("connection to the proxy ended"))
        .collect();
    assert!(
        ended.is_empty(),
        "the session ended instead of resuming: {ended:?}"
    );
}
