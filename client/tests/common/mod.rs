//! What the end-to-end tests of `remoteler` share: the real proxy and agent binaries, a
//! cluster with one agent node, a TCP echo server, child processes that are reaped.
//!
//! The proxy and agent binaries are taken from the same target directory as `remoteler`
//! (built with `cargo build -p proxy -p agent` first if missing), or from
//! `REMOTELER_PROXY_BIN` / `REMOTELER_AGENT_BIN`.
#![allow(dead_code)] // each test file uses its own part

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const CLIENT: &str = env!("CARGO_BIN_EXE_remoteler");
pub const PASSWORD: &str = "forward-test-password";
pub const WAIT: Duration = Duration::from_secs(30);

/// A sibling binary of `remoteler` in target/<profile>/, built if missing.
pub fn sibling(name: &str, package: &str, env: &str) -> PathBuf {
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

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Kills and reaps the child when dropped (a failed assertion must not leave processes).
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Lines of a child's pipe, as they come.
pub fn lines(pipe: impl Read + Send + 'static) -> Receiver<String> {
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

pub fn wait_line(rx: &Receiver<String>, what: &str, pred: impl Fn(&str) -> bool) -> String {
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
pub fn echo_server() -> SocketAddr {
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

pub struct Cluster {
    pub proxy: Reaped,
    pub proxy_bin: PathBuf,
    pub listen: [String; 3],
    /// The proxy's Prometheus address.
    pub metrics: String,
    pub pin: String,
    pub _agent: Reaped,
    pub tmp: tempfile::TempDir,
}

impl Cluster {
    pub fn data(&self) -> PathBuf {
        self.tmp.path().join("proxy")
    }

    pub fn home(&self) -> PathBuf {
        self.tmp.path().join("home")
    }

    /// The proxy's sample `name` (with its labels) from /metrics.
    pub fn metric(&self, name: &str) -> u64 {
        let mut conn = TcpStream::connect(&self.metrics).unwrap();
        conn.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut body = String::new();
        conn.read_to_string(&mut body).unwrap();
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no sample {name} in:\n{body}"))
    }

    /// Logs alice in with `remoteler login` into `home`, through `proxy` (the users'
    /// listener, or a relay in front of it).
    pub fn login(&self, home: &Path, proxy: &str) {
        let login = Command::new(CLIENT)
            .args(["login", "--proxy", proxy, "--user", "alice"])
            .args(["--ca-pin", &self.pin, "--password-file"])
            .arg(self.tmp.path().join("alice.pw"))
            .env("REMOTELER_HOME", home)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(login.status.success(), "login: {}", text(&login));
    }

    /// Stops the proxy (SIGTERM) and starts it again on the same ports; waits until the
    /// agent is back.
    pub fn restart_proxy(&mut self) {
        // SAFETY: kill on the pid of our own child.
        unsafe { libc::kill(self.proxy.0.id() as i32, libc::SIGTERM) };
        let _ = self.proxy.0.wait();
        let listen = self.listen.each_ref().map(String::as_str);
        let log = self.tmp.path().join("proxy.log");
        self.proxy = start_proxy(&self.proxy_bin, &self.data(), &log, listen).0;
        self.wait_online();
    }

    pub fn wait_online(&self) {
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
    pub fn forward(&self, args: &[&str]) -> (Reaped, SocketAddr, Receiver<String>) {
        forward_from(&self.home(), args)
    }
}

/// `remoteler forward ARGS...` with the login in `home`, its stdout readiness line read:
/// (child, address, stderr).
pub fn forward_from(home: &Path, args: &[&str]) -> (Reaped, SocketAddr, Receiver<String>) {
    let mut child = Command::new(CLIENT)
        .arg("forward")
        .args(args)
        .env("REMOTELER_HOME", home)
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

/// `remoteler-proxy start` on `listen` (users, tunnels, auth); waits for its `ready` line.
pub fn start_proxy(bin: &Path, data: &Path, log: &Path, listen: [&str; 3]) -> (Reaped, String) {
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
            "127.0.0.1:0",
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

/// proxy + agent of node `node-f` (forwards `echo` and `ssh` to `echo`) + alice logged in.
pub fn cluster(echo: SocketAddr) -> Cluster {
    cluster_with(echo, false).0
}

/// [`cluster`], and with `agent_relay` the agent's tunnel goes through a [`Relay`] and the
/// agent notices a dead connection quickly (keepalive 1 s x 3, reconnects after 0.2 to 1 s)
/// while the proxy keeps its default keepalive (10 s x 3).
pub fn cluster_with(echo: SocketAddr, agent_relay: bool) -> (Cluster, Option<Relay>) {
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
    let relay = agent_relay.then(|| Relay::start(&addr("tunnels")));
    let mut agent = Command::new(agent_bin);
    match &relay {
        None => {
            agent
                .args(["start", "--proxy", &addr("tunnels"), "--token", &token])
                .args(["--ca-pin", &pin, "--node-name", "node-f", "--data-dir"])
                .arg(tmp.path().join("agent"))
                .args(["--forward", &format!("echo={echo}")])
                // `remoteler proxy ssh` asks for the service "ssh": the echo server stands in
                // for sshd where a test checks the bytes, not ssh.
                .args(["--forward", &format!("ssh={echo}")])
                // No sshd here: no host certificate (and never the machine's /etc/ssh).
                .args(["--ssh-host-key", ""]);
        }
        Some(relay) => {
            let file = tmp.path().join("agent.toml");
            let config = format!(
                "node_name = \"node-f\"\nproxy = \"{}\"\ndata_dir = \"{}\"\nssh_host_key = \"\"\n\
                 [join]\ntoken = \"{token}\"\nca_pin = \"{pin}\"\n\
                 [[forwards]]\nname = \"echo\"\ntarget = \"{echo}\"\n\
                 [[forwards]]\nname = \"ssh\"\ntarget = \"{echo}\"\n\
                 [keepalive]\ninterval = \"1s\"\ncount = 3\n\
                 [backoff]\nmin = \"200ms\"\nmax = \"1s\"\n",
                relay.addr,
                tmp.path().join("agent").display()
            );
            std::fs::write(&file, config).unwrap();
            agent.arg("start").arg("--config").arg(file);
        }
    }
    let agent = agent
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(tmp.path().join("agent.log")).unwrap())
        .spawn()
        .unwrap();
    let agent = Reaped(agent);
    let cluster = Cluster {
        proxy,
        proxy_bin: proxy_bin.clone(),
        listen: [addr("users"), addr("tunnels"), addr("auth")],
        metrics: addr("metrics"),
        pin,
        _agent: agent,
        tmp,
    };
    cluster.login(&cluster.home(), &cluster.listen[0]);
    cluster.wait_online();
    (cluster, relay)
}

/// One relayed connection: both sockets, and whether it is stalled.
struct Relayed {
    sockets: [TcpStream; 2],
    stalled: Arc<AtomicBool>,
}

/// A TCP relay in front of one of the proxy's listeners, which can cut or stall the
/// connections it carries.
pub struct Relay {
    pub addr: SocketAddr,
    conns: Arc<Mutex<Vec<Relayed>>>,
    refusing: Arc<AtomicBool>,
    /// Connections relayed so far.
    pub accepted: Arc<AtomicUsize>,
}

impl Relay {
    pub fn start(upstream: &str) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let upstream: SocketAddr = upstream.parse().unwrap();
        let conns: Arc<Mutex<Vec<Relayed>>> = Arc::default();
        let refusing: Arc<AtomicBool> = Arc::default();
        let accepted: Arc<AtomicUsize> = Arc::default();
        let (c, r, a) = (conns.clone(), refusing.clone(), accepted.clone());
        std::thread::spawn(move || {
            for down in listener.incoming() {
                let Ok(down) = down else { continue };
                if r.load(Ordering::SeqCst) {
                    drop(down); // the link is down: nothing gets through
                    continue;
                }
                let Ok(up) = TcpStream::connect(upstream) else {
                    continue;
                };
                a.fetch_add(1, Ordering::SeqCst);
                let stalled = Arc::new(AtomicBool::new(false));
                for (from, to) in [(&down, &up), (&up, &down)] {
                    let (mut from, mut to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
                    let stalled = stalled.clone();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 << 10];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            // A stalled link delivers nothing, ever, and closes nothing.
                            while stalled.load(Ordering::SeqCst) {
                                std::thread::sleep(Duration::from_millis(50));
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(Shutdown::Write);
                    });
                }
                c.lock().unwrap().push(Relayed {
                    sockets: [down, up],
                    stalled,
                });
            }
        });
        Relay {
            addr,
            conns,
            refusing,
            accepted,
        }
    }

    /// Closes every relayed connection, both ways (both ends see the close at once).
    pub fn cut(&self) {
        for conn in self.conns.lock().unwrap().drain(..) {
            for s in &conn.sockets {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }

    /// Every relayed connection stops carrying bytes and stays open: only keepalives notice.
    /// New connections go through.
    pub fn stall(&self) {
        for conn in self.conns.lock().unwrap().drain(..) {
            conn.stalled.store(true, Ordering::SeqCst);
        }
    }

    /// While set, new connections are closed at once (the proxy is out of reach).
    pub fn refuse(&self, refusing: bool) {
        self.refusing.store(refusing, Ordering::SeqCst);
    }
}
