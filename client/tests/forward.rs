//! `remoteler forward` end to end with the real binaries: a proxy, an agent behind its tunnel
//! that forwards `echo` to a TCP echo server of the test, and the client. Several concurrent
//! local connections move data byte-exact over one user connection; a service the agent does
//! not forward is refused with the agent's reason; SIGTERM stops the forward cleanly.
//!
//! The proxy and agent binaries are taken from the same target directory as `remoteler`
//! (built with `cargo build -p proxy -p agent` first if missing), or from
//! `REMOTELER_PROXY_BIN` / `REMOTELER_AGENT_BIN`.
#![allow(clippy::unwrap_used)] // test harness: a failed unwrap is a failed test

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{WAIT, cluster, echo_server, wait_line};

/// Sends `len` bytes of a pattern unique to `seed` and checks the echo, byte for byte; then
/// half-closes and expects the far side's end of data.
fn round_trip(addr: SocketAddr, seed: u8, len: usize) {
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    let conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(WAIT)).unwrap();
    let mut writer = conn.try_clone().unwrap();
    let sent = data.clone();
    let send = std::thread::spawn(move || {
        for chunk in sent.chunks(7_919) {
            writer.write_all(chunk).unwrap();
        }
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut back = Vec::with_capacity(len);
    (&conn).read_to_end(&mut back).unwrap();
    send.join().unwrap();
    assert_eq!(back.len(), len, "connection {seed}: echo length");
    assert!(back == data, "connection {seed}: echo differs");
}

#[test]
fn forward_carries_concurrent_connections_and_reports_refusals() {
    let echo = echo_server();
    let mut cluster = cluster(echo);

    let (mut fwd, addr, err) = cluster.forward(&["--listen", "127.0.0.1:0", "node-f", "echo"]);
    let workers: Vec<_> = (0..8u8)
        .map(|seed| std::thread::spawn(move || round_trip(addr, seed, 3 << 20)))
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    // Small exchanges after the bulk ones, on the same (kept) proxy connection.
    round_trip(addr, 100, 10);

    // All those streams went over one user connection: one client address in the audit log.
    // The proxy's audit writer appends a moment after the event: wait for the records.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (audit, sessions) = loop {
        let audit = std::fs::read_to_string(cluster.data().join("audit.log")).unwrap();
        let sessions: Vec<serde_json::Value> = audit
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|r| r["event"] == "session.start")
            .collect();
        if sessions.len() >= 9 || std::time::Instant::now() > deadline {
            break (audit, sessions);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        sessions.len(),
        9,
        "one session per local connection: {audit}"
    );
    let peers: std::collections::BTreeSet<&str> = sessions
        .iter()
        .map(|r| r["client_addr"].as_str().unwrap())
        .collect();
    assert_eq!(
        peers.len(),
        1,
        "streams used several connections: {peers:?}"
    );

    // The proxy restarts: the forward notices its connection ended, and the next local
    // connection dials the proxy again.
    cluster.restart_proxy();
    wait_line(&err, "the connection ended", |l| {
        l.contains("connection to the proxy ended")
    });
    round_trip(addr, 101, 64 << 10);

    // SIGTERM: a clean stop.
    // SAFETY: kill on the pid of our own child.
    unsafe { libc::kill(fwd.0.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = fwd.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "forward did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "forward exited with {status}");
    assert!(
        TcpStream::connect(addr).is_err(),
        "still listening after stop"
    );

    // A service the agent does not forward: the local connection closes and stderr says why.
    let (_fwd, addr, err) = cluster.forward(&["node-f", "nosuch"]);
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(WAIT)).unwrap();
    let mut rest = Vec::new();
    let _ = conn.read_to_end(&mut rest);
    assert!(rest.is_empty(), "a refused stream carried data");
    let line = wait_line(&err, "refused", |l| l.contains("refused"));
    assert!(
        line.contains("node-f/nosuch") && line.contains("does not forward service \"nosuch\""),
        "refusal line: {line}"
    );
    // An unknown node: the proxy's reason.
    let (_fwd, addr, err) = cluster.forward(&["node-zz", "echo"]);
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(WAIT)).unwrap();
    let _ = conn.read_to_end(&mut Vec::new());
    let line = wait_line(&err, "refused", |l| l.contains("refused"));
    assert!(line.contains("node-zz"), "refusal line: {line}");
}
