//! `remoteler forward` end to end with the real binaries: a proxy, an agent behind its tunnel
//! that forwards `echo` to a TCP echo server of the test, and the client. Several concurrent
//! local connections move data byte-exact over one user connection; a service the agent does
//! not forward is refused with the agent's reason; SIGTERM stops the forward cleanly.
//!
//! The proxy and agent binaries are taken from the same target directory as `remoteler`
//! (built with `cargo build -p proxy -p agent` first if missing), or from
//! `REMOTELER_PROXY_BIN` / `REMOTELER_AGENT_BIN`.
#![allow(clippy::unwrap_used)] // test harness: a failed unwrap is a failed test

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

const CLIENT: &str = env!("CARGO_BIN_EXE_remoteler");
const PASSWORD: &str = "forward-test-password";
const WAIT: Duration = Duration::from_secs(30);

/// A sibling binary of `remoteler` in target/<profile>/, built if missing.
fn sibling(name: &str, package: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let dir = Path::new(CLIENT).parent().unwrap();
    let bin = dir.join(name);
    if !bin.exists() {
        let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug");
        let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cargo.args(["build", "-p", package]);
        if profile != "debug" {
            cargo.args(["--profile", profile]);
        }
        assert!(
            cargo.status().unwrap().success(),
            "cargo build -p {package}"
        );
    }
    assert!(bin.exists(), "no binary at {}", bin.display());
    bin
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Kills and reaps the child when dropped (a failed assertion must not leave processes).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Lines of a child's pipe, as they come.
fn lines(pipe: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_line(rx: &Receiver<String>, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) if pred(&line) => return line,
            Ok(line) => seen.push(line),
            Err(_) => break,
        }
    }
    panic!("no line with {what}; saw: {seen:#?}");
}

/// A TCP echo server on loopback, one thread per connection.
fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut write = conn.try_clone().unwrap();
                let _ = std::io::copy(&mut conn, &mut write);
                let _ = write.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

struct Cluster {
    proxy: Reaped,
    proxy_bin: PathBuf,
    listen: [String; 3],
    _agent: Reaped,
    tmp: tempfile::TempDir,
}

impl Cluster {
    fn data(&self) -> PathBuf {
        self.tmp.path().join("proxy")
    }

    fn home(&self) -> PathBuf {
        self.tmp.path().join("home")
    }

    /// Stops the proxy (SIGTERM) and starts it again on the same ports; waits until the
    /// agent is back.
    fn restart_proxy(&mut self) {
        // SAFETY: kill on the pid of our own child.
        unsafe { libc::kill(self.proxy.0.id() as i32, libc::SIGTERM) };
        let _ = self.proxy.0.wait();
        let listen = self.listen.each_ref().map(String::as_str);
        let log = self.tmp.path().join("proxy.log");
        self.proxy = start_proxy(&self.proxy_bin, &self.data(), &log, listen).0;
        self.wait_online();
    }

    fn wait_online(&self) {
        let deadline = Instant::now() + WAIT;
        loop {
            let out = Command::new(&self.proxy_bin)
                .args(["nodes", "ls", "--data-dir"])
                .arg(self.data())
                .output()
                .unwrap();
            if String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.starts_with("node-f ") && l.contains(" yes"))
            {
                return;
            }
            assert!(Instant::now() < deadline, "node-f never came online");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `remoteler forward ARGS...`, its stdout readiness line read: (child, address, stderr).
    fn forward(&self, args: &[&str]) -> (Reaped, SocketAddr, Receiver<String>) {
        let mut child = Command::new(CLIENT)
            .arg("forward")
            .args(args)
            .env("REMOTELER_HOME", self.home())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = lines(child.stdout.take().unwrap());
        let err = lines(child.stderr.take().unwrap());
        let child = Reaped(child);
        let ready = wait_line(&out, "forwarding", |l| l.starts_with("forwarding "));
        let addr = ready.split_whitespace().nth(1).unwrap().parse().unwrap();
        (child, addr, err)
    }
}

/// `remoteler-proxy start` on `listen` (users, tunnels, auth); waits for its `ready` line.
fn start_proxy(bin: &Path, data: &Path, log: &Path, listen: [&str; 3]) -> (Reaped, String) {
    let mut proxy = Command::new(bin)
        .args(["start", "--data-dir"])
        .arg(data)
        .args([
            "--users",
            listen[0],
            "--tunnels",
            listen[1],
            "--auth",
            listen[2],
            "--metrics",
            "off",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        )
        .spawn()
        .unwrap();
    let out = lines(proxy.stdout.take().unwrap());
    let proxy = Reaped(proxy);
    let ready = wait_line(&out, "ready", |l| l.starts_with("ready "));
    (proxy, ready)
}

/// proxy + agent of node `node-f` (forwards `echo` to `echo`) + alice logged in.
fn cluster(echo: SocketAddr) -> Cluster {
    let proxy_bin = sibling("remoteler-proxy", "proxy", "REMOTELER_PROXY_BIN");
    let agent_bin = sibling("remoteler-agent", "agent", "REMOTELER_AGENT_BIN");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("proxy");
    let p = |args: &[&str]| {
        let out = Command::new(&proxy_bin)
            .args(args)
            .arg("--data-dir")
            .arg(&data)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "remoteler-proxy {args:?}: {}",
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let init = p(&["init", "--cluster", "fwd.test", "--host", "127.0.0.1"]);
    let pin = init
        .lines()
        .find_map(|l| l.strip_prefix("CA pin: "))
        .unwrap()
        .to_owned();
    let (proxy, ready) = start_proxy(
        &proxy_bin,
        &data,
        &tmp.path().join("proxy.log"),
        ["127.0.0.1:0"; 3],
    );
    let addr = |key: &str| -> String {
        ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .unwrap()
            .to_owned()
    };
    let pw = tmp.path().join("alice.pw");
    std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
    p(&[
        "users", "add", "alice", "--roles", "access", "--logins", "root",
    ]
    .into_iter()
    .chain(["--password-file", pw.to_str().unwrap()])
    .collect::<Vec<_>>());
    let token = p(&["tokens", "add", "--kind", "node"])
        .lines()
        .find_map(|l| l.strip_prefix("token: "))
        .unwrap()
        .to_owned();
    let agent = Command::new(agent_bin)
        .args(["start", "--proxy", &addr("tunnels"), "--token", &token])
        .args(["--ca-pin", &pin, "--node-name", "node-f", "--data-dir"])
        .arg(tmp.path().join("agent"))
        .args(["--forward", &format!("echo={echo}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(tmp.path().join("agent.log")).unwrap())
        .spawn()
        .unwrap();
    let agent = Reaped(agent);
    let login = Command::new(CLIENT)
        .args(["login", "--proxy", &addr("users"), "--user", "alice"])
        .args(["--ca-pin", &pin, "--password-file"])
        .arg(&pw)
        .env("REMOTELER_HOME", tmp.path().join("home"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(login.status.success(), "login: {}", text(&login));
    let cluster = Cluster {
        proxy,
        proxy_bin: proxy_bin.clone(),
        listen: [addr("users"), addr("tunnels"), addr("auth")],
        _agent: agent,
        tmp,
    };
    cluster.wait_online();
    cluster
}

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
