//! Helpers shared by the proxy's integration tests: a proxy process in a temporary data
//! directory, and the agent's and user's side of each protocol, written with `tunnel` and
//! `frame` directly.

#![allow(clippy::unwrap_used, dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use frame::{Announce, NodeInfo, Open, Role, Session, SessionConfig};
use monoio::net::TcpStream;
use rustls_pki_types::{CertificateDer, ServerName};
use tunnel::control::{
    self, ALPN_JOIN, ALPN_LOGIN, ControlError, JoinRequest, JoinResponse, LoginRequest,
    LoginResponse,
};
use tunnel::identity::{self, CaPin, FileRole, PrivateKey};
use tunnel::mux::{DriveOutcome, MuxStream, Tunnel, drive};
use tunnel::tls::{self, TlsConnection};

pub const DEADLINE: Duration = Duration::from_secs(10);

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_remoteler-proxy")
}

/// Runs a CLI command against `dir`; returns its output.
pub fn cli(dir: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(args).arg("--data-dir").arg(dir);
    cmd.stdin(Stdio::null());
    cmd.output().unwrap()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A running proxy in its own data directory.
#[derive(Debug)]
pub struct Proxy {
    pub child: Child,
    pub tmp: tempfile::TempDir,
    pub data: PathBuf,
    pub users: SocketAddr,
    pub tunnels: SocketAddr,
    pub auth: SocketAddr,
    pub metrics: SocketAddr,
    pub pin: CaPin,
    pub ca: CertificateDer<'static>,
}

impl Proxy {
    /// `init` + `start` on 127.0.0.1:0; `config` is extra TOML appended to a config file
    /// (e.g. `[[nodes]]`), or `None` to start from flags alone.
    pub fn start(config: Option<&str>) -> Proxy {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let out = cli(
            &data,
            &["init", "--cluster", "test.example", "--host", "127.0.0.1"],
        );
        assert!(out.status.success(), "init failed: {}", stderr(&out));
        let pin_line = stdout(&out)
            .lines()
            .find_map(|l| l.strip_prefix("CA pin: ").map(str::to_owned))
            .unwrap();
        let pin: CaPin = pin_line.parse().unwrap();
        let ca = identity::read_certificates(&data.join("ca.crt"), FileRole::CaCertificate)
            .unwrap()
            .remove(0);

        if let Some(extra) = config {
            let path = tmp.path().join("proxy.toml");
            let text = format!(
                "cluster_name = \"test.example\"\ndata_dir = {:?}\n{extra}\n[keepalive]\ninterval = \"1s\"\n",
                data.display().to_string()
            );
            std::fs::write(&path, text).unwrap();
        }
        let (child, ready) = spawn(tmp.path(), &data);
        let addr = |key: &str| ready_addr(&ready, key);
        Proxy {
            users: addr("users"),
            tunnels: addr("tunnels"),
            auth: addr("auth"),
            metrics: addr("metrics"),
            child,
            tmp,
            data,
            pin,
            ca,
        }
    }

    /// Starts the proxy again on the same data directory (and configuration file, if any),
    /// after the previous process has exited (or been killed); the listeners get new ports.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let (child, ready) = spawn(self.tmp.path(), &self.data);
        self.child = child;
        self.users = ready_addr(&ready, "users");
        self.tunnels = ready_addr(&ready, "tunnels");
        self.auth = ready_addr(&ready, "auth");
        self.metrics = ready_addr(&ready, "metrics");
    }

    /// `GET path` on the metrics listener: the status line and the body.
    pub fn http_get(&self, path: &str) -> (String, String) {
        use std::io::{Read, Write};
        let mut tcp = std::net::TcpStream::connect(self.metrics).unwrap();
        write!(tcp, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
        let mut text = String::new();
        tcp.read_to_string(&mut text).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        (head.lines().next().unwrap().to_owned(), body.to_owned())
    }

    pub fn log(&self) -> String {
        log_of(self.tmp.path())
    }

    pub fn token(&self, extra: &[&str]) -> String {
        let mut args = vec!["tokens", "add", "--kind", "node"];
        args.extend_from_slice(extra);
        let out = cli(&self.data, &args);
        assert!(out.status.success(), "tokens add: {}", stderr(&out));
        stdout(&out)
            .lines()
            .find_map(|l| l.strip_prefix("token: ").map(str::to_owned))
            .unwrap()
    }

    pub fn add_user(&self, name: &str, password: &str) {
        let out = self.users_add(name, password, &["--roles", "access", "--logins", "root"]);
        assert!(out.status.success(), "users add: {}", stderr(&out));
    }

    /// `users add NAME --password-file F` with `extra` arguments.
    pub fn users_add(&self, name: &str, password: &str, extra: &[&str]) -> Output {
        let file = self.tmp.path().join(format!("{name}.pw"));
        std::fs::write(&file, format!("{password}\n")).unwrap();
        let mut args = vec![
            "users",
            "add",
            name,
            "--password-file",
            file.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        cli(&self.data, &args)
    }

    /// The configuration file, when the proxy was started with one.
    pub fn config_path(&self) -> PathBuf {
        self.tmp.path().join("proxy.toml")
    }

    /// The audit records once `done` holds for them (the proxy's writer thread appends a moment
    /// after the event); panics after 10 s.
    pub fn audit_when(
        &self,
        done: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let records = self.audit();
            if done(&records) {
                return records;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the audit log never reached the expected state: {records:#?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.data.join("audit.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// SIGTERM, then the exit status within `within`.
    pub fn stop(&mut self, within: Duration) -> std::process::ExitStatus {
        // SAFETY: kill on the pid of our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "proxy did not stop: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() || std::env::var_os("PROXY_TEST_LOG").is_some() {
            eprintln!("---- proxy log ----\n{}", self.log());
        }
    }
}

/// `remoteler-proxy start` in `tmp` (its log goes to `tmp/proxy.log`, appended) on `data`;
/// returns the process and its `ready` line once it is ready.
fn spawn(tmp: &Path, data: &Path) -> (Child, String) {
    let mut cmd = Command::new(bin());
    cmd.arg("start");
    let path = tmp.join("proxy.toml");
    if path.exists() {
        cmd.arg("--config").arg(&path);
    } else {
        cmd.arg("--data-dir").arg(data);
    }
    cmd.args([
        "--users",
        "127.0.0.1:0",
        "--tunnels",
        "127.0.0.1:0",
        "--auth",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(tmp.join("proxy.log"))
        .unwrap();
    cmd.stdout(Stdio::piped()).stderr(log).stdin(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.starts_with("ready ") {
                let _ = tx.send(line);
            }
        }
    });
    let ready = rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("proxy not ready: {}", log_of(tmp)));
    let file = std::fs::read_to_string(data.join("proxy.ready")).unwrap();
    assert_eq!(file.trim(), ready);
    (child, ready)
}

fn ready_addr(ready: &str, key: &str) -> SocketAddr {
    ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap()
        .parse()
        .unwrap()
}

fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("proxy.log")).unwrap_or_default()
}

pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .unwrap()
        .block_on(f)
}

fn server_name() -> ServerName<'static> {
    ServerName::try_from("127.0.0.1").unwrap()
}

pub async fn connect(
    addr: SocketAddr,
    mut config: rustls::ClientConfig,
    alpn: &[u8],
) -> Result<TlsConnection, tls::TlsError> {
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    tls::connect(tcp, Arc::new(config), server_name(), DEADLINE).await
}

/// A TCP connection to `addr` from the loopback address `source` (127.0.0.0/8).
pub fn tcp_from(source: std::net::IpAddr, addr: SocketAddr) -> std::net::TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::new(source, 0).into()).unwrap();
    socket.connect(&addr.into()).unwrap();
    socket.into()
}

/// `join`, from the loopback address `source`.
pub async fn join_from(
    proxy: &Proxy,
    source: std::net::IpAddr,
    token: &str,
    node: &str,
) -> Result<Credential, ControlError> {
    let key = PrivateKey::generate().unwrap();
    let tcp = tcp_from(source, proxy.tunnels);
    tcp.set_nonblocking(true).unwrap();
    let tcp = TcpStream::from_std(tcp).unwrap();
    let mut config = pinned(proxy.pin);
    config.alpn_protocols = vec![ALPN_JOIN.to_vec()];
    let conn = tls::connect(tcp, Arc::new(config), server_name(), DEADLINE).await?;
    let (mut reader, mut writer) = conn.split();
    let request = JoinRequest {
        token: token.into(),
        node: node.into(),
        public_key: control::to_hex(&key.public_key().to_spki_der()),
    };
    control::write_line(&mut writer, &request).await?;
    let mut buf = BytesMut::new();
    let response: JoinResponse = control::read_reply(&mut reader, &mut buf).await?;
    assert_eq!(response.cluster, "test.example");
    Ok(Credential {
        chain: parse_chain(&response.certificate_pem),
        key,
    })
}

pub fn pinned(pin: CaPin) -> rustls::ClientConfig {
    identity::client_config_pinned(pin).unwrap().0
}

/// A certificate chain and its key, as the agent or client keeps them.
#[derive(Debug)]
pub struct Credential {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKey,
}

impl Credential {
    pub fn config(&self, ca: &CertificateDer<'static>) -> rustls::ClientConfig {
        identity::client_config_trusting(
            std::slice::from_ref(ca),
            Some((self.chain.clone(), &self.key)),
        )
        .unwrap()
    }
}

pub fn parse_chain(pem: &str) -> Vec<CertificateDer<'static>> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chain.pem");
    std::fs::write(&path, pem).unwrap();
    identity::read_certificates(&path, FileRole::Certificate).unwrap()
}

/// The agent's join: `Ok(credential)` or the proxy's refusal.
pub async fn join(proxy: &Proxy, token: &str, node: &str) -> Result<Credential, ControlError> {
    join_from(proxy, [127, 0, 0, 1].into(), token, node).await
}

pub async fn login(proxy: &Proxy, user: &str, password: &str) -> Result<Credential, ControlError> {
    let (credential, response) = login_with(proxy, user, password, None).await?;
    assert_eq!(response.roles, vec!["access".to_string()]);
    Ok(credential)
}

/// A login that may send an SSH public key; returns the whole answer too.
pub async fn login_with(
    proxy: &Proxy,
    user: &str,
    password: &str,
    ssh_public_key: Option<String>,
) -> Result<(Credential, LoginResponse), ControlError> {
    login_for(proxy, user, password, 3600, ssh_public_key).await
}

/// A login asking for a certificate of `ttl_secs`; returns the whole answer too.
pub async fn login_for(
    proxy: &Proxy,
    user: &str,
    password: &str,
    ttl_secs: u64,
    ssh_public_key: Option<String>,
) -> Result<(Credential, LoginResponse), ControlError> {
    let key = PrivateKey::generate().unwrap();
    let conn = connect(proxy.users, pinned(proxy.pin), ALPN_LOGIN).await?;
    let (mut reader, mut writer) = conn.split();
    let request = LoginRequest {
        user: user.into(),
        password: password.into(),
        public_key: control::to_hex(&key.public_key().to_spki_der()),
        ttl_secs: Some(ttl_secs),
        ssh_public_key,
        ssh_host_ca: false,
    };
    control::write_line(&mut writer, &request).await?;
    let mut buf = BytesMut::new();
    let response: LoginResponse = control::read_reply(&mut reader, &mut buf).await?;
    Ok((
        Credential {
            chain: parse_chain(&response.certificate_pem),
            key,
        },
        response,
    ))
}

/// Runs a session over `conn` (as agent or client, the dialer); returns the tunnel and the
/// driver's task.
pub fn run_session(
    conn: TlsConnection,
    role: Role,
) -> (Tunnel, monoio::task::JoinHandle<DriveOutcome>) {
    run_session_with(conn, dialer_config(role))
}

/// The settings `run_session` uses: defaults for `role`, dialling, no resumption. Crafted
/// peers change them (a hostile window, say) and pass them to `run_session_with`.
pub fn dialer_config(role: Role) -> SessionConfig {
    let mut config = SessionConfig::new(role, true);
    config.resume_grace = Duration::ZERO;
    config
}

/// A tunnel (ALPN `remoteler-tunnel/1`) to `proxy` with `cred`, its session running as `role`
/// (an agent's or a leaf cluster's) with `dialer_config`: the tunnel and the driver's task.
pub async fn tunnel_session(
    proxy: &Proxy,
    cred: &Credential,
    role: Role,
) -> (Tunnel, monoio::task::JoinHandle<DriveOutcome>) {
    tunnel_session_with(proxy, cred, dialer_config(role)).await
}

/// `tunnel_session` with the session's settings given.
pub async fn tunnel_session_with(
    proxy: &Proxy,
    cred: &Credential,
    config: SessionConfig,
) -> (Tunnel, monoio::task::JoinHandle<DriveOutcome>) {
    let conn = connect(
        proxy.tunnels,
        cred.config(&proxy.ca),
        tunnel::control::ALPN_TUNNEL,
    )
    .await
    .unwrap();
    run_session_with(conn, config)
}

/// `run_session` with the session's settings given.
pub fn run_session_with(
    conn: TlsConnection,
    config: SessionConfig,
) -> (Tunnel, monoio::task::JoinHandle<DriveOutcome>) {
    let tunnel = Tunnel::new(Session::new(config, rand_id(), Instant::now()));
    let driven = tunnel.clone();
    let handle = monoio::spawn(async move { drive(&driven, conn, BytesMut::new()).await });
    (tunnel, handle)
}

pub fn rand_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).unwrap();
    id
}

/// The fake agent: tunnel up, node announced, every OPEN accepted and echoed.
pub async fn agent(proxy: &Proxy, cred: &Credential, node: &str) -> Tunnel {
    let tunnel = agent_with(proxy, cred, node, dialer_config(Role::Agent)).await;
    let acceptor = tunnel.clone();
    monoio::spawn(async move {
        while let Some(incoming) = acceptor.incoming().await {
            assert_eq!(incoming.request.service, "ssh");
            let stream = incoming.accept().unwrap();
            monoio::spawn(echo(stream));
        }
    });
    tunnel
}

/// A crafted agent with the session settings given: tunnel up, node announced; the caller
/// answers its OPENs (`Tunnel::incoming`).
pub async fn agent_with(
    proxy: &Proxy,
    cred: &Credential,
    node: &str,
    config: SessionConfig,
) -> Tunnel {
    let (tunnel, _driver) = tunnel_session_with(proxy, cred, config).await;
    assert!(tunnel.connected().await, "agent tunnel did not connect");
    tunnel
        .announce(&Announce {
            cluster: String::new(),
            nodes: vec![NodeInfo {
                name: node.into(),
                online: true,
                tunnel: true,
                labels: vec![("env".into(), "test".into())],
                services: vec!["ssh".into()],
            }],
        })
        .unwrap();
    tunnel
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
                let _ = stream.closed().await;
                return;
            }
            Err(_) => return,
        }
    }
}

/// The user's side: a session connection and one OPEN to `node` as root.
pub async fn open(
    proxy: &Proxy,
    cred: &Credential,
    node: &str,
) -> Result<(Tunnel, MuxStream, [u8; 16]), tunnel::mux::StreamError> {
    open_as(proxy, cred, node, "root").await
}

/// The user's side: a session connection and one OPEN to `node` as `login`.
pub async fn open_as(
    proxy: &Proxy,
    cred: &Credential,
    node: &str,
    login: &str,
) -> Result<(Tunnel, MuxStream, [u8; 16]), tunnel::mux::StreamError> {
    let conn = connect(
        proxy.users,
        cred.config(&proxy.ca),
        tunnel::control::ALPN_SESSION,
    )
    .await
    .unwrap();
    open_with(conn, node, login, dialer_config(Role::Client)).await
}

/// A crafted user: a session connection with the settings given (a hostile window, say)
/// and one OPEN to `node` as `login`; returns the driver's task too.
pub async fn open_hostile(
    proxy: &Proxy,
    cred: &Credential,
    node: &str,
    config: SessionConfig,
) -> Result<(Tunnel, MuxStream, monoio::task::JoinHandle<DriveOutcome>), tunnel::mux::StreamError> {
    let conn = connect(
        proxy.users,
        cred.config(&proxy.ca),
        tunnel::control::ALPN_SESSION,
    )
    .await
    .unwrap();
    let (tunnel, driver) = run_session_with(conn, config);
    let stream = tunnel.open(user_open(node, "root", rand_id())).await?;
    Ok((tunnel, stream, driver))
}

async fn open_with(
    conn: TlsConnection,
    node: &str,
    login: &str,
    config: SessionConfig,
) -> Result<(Tunnel, MuxStream, [u8; 16]), tunnel::mux::StreamError> {
    let (tunnel, _driver) = run_session_with(conn, config);
    let session_id = rand_id();
    let stream = tunnel.open(user_open(node, login, session_id)).await?;
    Ok((tunnel, stream, session_id))
}

/// The OPEN a user's `remoteler proxy ssh` sends for `node` as `login`.
fn user_open(node: &str, login: &str, session_id: [u8; 16]) -> Open {
    Open {
        session_id,
        cluster: String::new(),
        node: node.into(),
        service: "ssh".into(),
        user: "mallory".into(),
        login: login.into(),
        client_addr: String::new(),
        credential: Bytes::new(),
    }
}

/// Sends `data` and reads the same number of bytes back, concurrently; then half-closes and
/// expects the peer's FIN.
pub async fn echo_roundtrip(stream: MuxStream, data: Bytes) -> Vec<u8> {
    let send = async {
        for chunk in data.chunks(50_000) {
            stream.write(data.slice_ref(chunk)).await.unwrap();
        }
    };
    let receive = async {
        let mut got = Vec::with_capacity(data.len());
        while got.len() < data.len() {
            match stream.read().await.unwrap() {
                Some(b) => got.extend_from_slice(&b),
                None => panic!("FIN after {} of {} bytes", got.len(), data.len()),
            }
        }
        got
    };
    let ((), got) = monoio::join!(send, receive);
    stream.finish();
    let end = monoio::time::timeout(DEADLINE, stream.read())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(end, None, "expected the peer's FIN after the echo");
    // Not waiting for `closed()`: the last WINDOW of a finished stream waits for the
    // peer's next keepalive tick (see the note in the proxy's report).
    got
}

pub fn random_bytes(n: usize) -> Bytes {
    let mut v = vec![0u8; n];
    getrandom::fill(&mut v).unwrap();
    Bytes::from(v)
}

/// `join` from `source` with a key of the caller's (an agent that kept its key, or an
/// impostor choosing one).
pub async fn join_with_key(
    proxy: &Proxy,
    source: std::net::IpAddr,
    token: &str,
    node: &str,
    key: PrivateKey,
) -> Result<Credential, ControlError> {
    let request = JoinRequest {
        token: token.into(),
        node: node.into(),
        public_key: control::to_hex(&key.public_key().to_spki_der()),
    };
    let response: JoinResponse = exchange_from(proxy, source, ALPN_JOIN, &request).await?;
    assert_eq!(response.cluster, "test.example");
    Ok(Credential {
        chain: parse_chain(&response.certificate_pem),
        key,
    })
}

/// One request line on `alpn` at the tunnels listener from `source`, and its answer.
pub async fn exchange_from<Q: serde::Serialize, A: serde::de::DeserializeOwned>(
    proxy: &Proxy,
    source: std::net::IpAddr,
    alpn: &[u8],
    request: &Q,
) -> Result<A, ControlError> {
    let tcp = tcp_from(source, proxy.tunnels);
    tcp.set_nonblocking(true).unwrap();
    let tcp = TcpStream::from_std(tcp).unwrap();
    let mut config = pinned(proxy.pin);
    config.alpn_protocols = vec![alpn.to_vec()];
    let conn = tls::connect(tcp, Arc::new(config), server_name(), DEADLINE).await?;
    let (mut reader, mut writer) = conn.split();
    control::write_line(&mut writer, request).await?;
    let mut buf = BytesMut::new();
    control::read_reply(&mut reader, &mut buf).await
}

/// `tokens add` with `args`; returns the secret and the id.
pub fn token_with_id(proxy: &Proxy, args: &[&str]) -> (String, String) {
    let mut all = vec!["tokens", "add"];
    all.extend_from_slice(args);
    let out = cli(&proxy.data, &all);
    assert!(out.status.success(), "tokens add: {}", stderr(&out));
    let text = stdout(&out);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).map(str::to_owned))
            .unwrap_or_else(|| panic!("no {name:?} in {text}"))
    };
    (field("token: "), field("id: "))
}

/// The state file as JSON.
pub fn state_json(proxy: &Proxy) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(proxy.data.join("state.json")).unwrap()).unwrap()
}

/// Uses left of token `id`, from the state file.
pub fn uses_left(proxy: &Proxy, id: &str) -> u64 {
    state_json(proxy)["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id)
        .unwrap_or_else(|| panic!("no token {id} in the state file"))["uses_left"]
        .as_u64()
        .unwrap()
}

/// A plain TCP echo server on 127.0.0.1 (a stand-in for a node's sshd).
pub fn tcp_echo_server() -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => {
                            let _ = stream.shutdown(std::net::Shutdown::Write);
                            return;
                        }
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

/// The audit records once `done` holds, polled without blocking the test's runtime (its
/// tunnels keep their keepalive going meanwhile).
pub async fn audit_until(
    proxy: &Proxy,
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let records = proxy.audit();
        if done(&records) {
            return records;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the audit log never reached the expected state: {records:#?}"
        );
        monoio::time::sleep(Duration::from_millis(20)).await;
    }
}
