//! The agent against an in-test fake proxy built from `tunnel` and `frame`: join, announce,
//! forwarding, refusal of services that are not configured, reconnection with backoff.
#![allow(clippy::unwrap_used)] // test harness: a failed unwrap is a failed test

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use config::{
    AgentConfig, AgentMode, BackoffConfig, Forward, Forwards, JoinConfig, JoinToken, Labels,
    NodeName, Secret, ServiceName,
};
use frame::{Announce, ErrorCode, Open, Role, Session, SessionConfig};
use monoio::net::TcpListener;
use tunnel::control::{self, JoinRequest, JoinResponse, Reply};
use tunnel::identity::{
    ClientAuth, ClusterCa, PeerIdentity, PrivateKey, PublicKey, Validity, server_config,
};
use tunnel::mux::{StreamError, Tunnel, drive};
use tunnel::tls;

const DEADLINE: Duration = Duration::from_secs(10);
const TOKEN: &str = "join-token-for-tests-0123456789";
const CLUSTER: &str = "test.example";

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .unwrap()
        .block_on(f)
}

// ---- PEM for the join answer ----------------------------------------------------------------

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn pem(der: &[u8]) -> String {
    let b64 = base64(der);
    let mut s = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(line).unwrap());
        s.push('\n');
    }
    s.push_str("-----END CERTIFICATE-----\n");
    s
}

// ---- the fake proxy -------------------------------------------------------------------------

/// One tunnel the agent opened.
struct TunnelConn {
    tunnel: Tunnel,
    accepted_at: Instant,
    peer: PeerIdentity,
    kill: agent::Stop,
}

#[derive(Default)]
struct ProxyState {
    joins: usize,
    join_nodes: Vec<String>,
    /// The public key of each join, hex.
    join_keys: Vec<String>,
    tunnels: VecDeque<TunnelConn>,
}

struct FakeProxy {
    addr: SocketAddr,
    ca: Rc<ClusterCa>,
    state: Rc<RefCell<ProxyState>>,
}

impl FakeProxy {
    fn start() -> FakeProxy {
        let ca = Rc::new(ClusterCa::generate(CLUSTER).unwrap());
        let validity = Validity::for_ttl(SystemTime::now(), Duration::from_secs(3600)).unwrap();
        let key = PrivateKey::generate().unwrap();
        let cert = ca
            .issue_proxy("proxy", &["127.0.0.1"], &key.public_key(), validity)
            .unwrap();
        let mut server = server_config(
            &[ca.certificate().clone()],
            ca.chain(cert),
            &key,
            ClientAuth::Optional,
        )
        .unwrap();
        server.alpn_protocols = vec![control::ALPN_JOIN.to_vec(), control::ALPN_TUNNEL.to_vec()];
        let server = Arc::new(server);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state: Rc<RefCell<ProxyState>> = Rc::default();
        {
            let state = state.clone();
            let ca = ca.clone();
            monoio::spawn(async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        return;
                    };
                    let server = server.clone();
                    let state = state.clone();
                    let ca = ca.clone();
                    monoio::spawn(async move {
                        let Ok(conn) = tls::accept(tcp, server, DEADLINE).await else {
                            return;
                        };
                        match conn.alpn_protocol().as_deref() {
                            Some(control::ALPN_JOIN) => serve_join(conn, &ca, &state).await,
                            Some(control::ALPN_TUNNEL) => serve_tunnel(conn, &state).await,
                            _ => {}
                        }
                    });
                }
            });
        }
        FakeProxy { addr, ca, state }
    }

    fn pin(&self) -> config::CaPin {
        self.ca.pin().to_string().parse().unwrap()
    }

    fn joins(&self) -> usize {
        self.state.borrow().joins
    }

    /// Waits for the agent's next tunnel (with its first ANNOUNCE received).
    async fn next_tunnel(&self) -> TunnelConn {
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(t) = self.state.borrow_mut().tunnels.pop_front() {
                return t;
            }
            assert!(
                Instant::now() < until,
                "no tunnel from the agent within 20s"
            );
            monoio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

async fn serve_join(conn: tls::TlsConnection, ca: &ClusterCa, state: &RefCell<ProxyState>) {
    let (mut reader, mut writer) = conn.split();
    let mut buf = BytesMut::new();
    let request: JoinRequest = control::read_line(&mut reader, &mut buf).await.unwrap();
    let reply = if request.token != TOKEN {
        Reply::Error(control::ErrorBody {
            code: "bad_token".into(),
            message: "unknown join token".into(),
        })
    } else {
        let key =
            PublicKey::from_spki_der(&control::from_hex(&request.public_key).unwrap()).unwrap();
        let validity = Validity::for_ttl(SystemTime::now(), Duration::from_secs(3600)).unwrap();
        let cert = ca.issue_node(&request.node, &key, validity).unwrap();
        let chain: String = ca.chain(cert).iter().map(|c| pem(c)).collect();
        let mut s = state.borrow_mut();
        s.joins += 1;
        s.join_nodes.push(request.node.clone());
        s.join_keys.push(request.public_key.clone());
        Reply::Ok(JoinResponse {
            cluster: CLUSTER.into(),
            certificate_pem: chain,
            ca_pem: ca.certificate_pem(),
        })
    };
    control::write_line(&mut writer, &reply).await.unwrap();
    let _ = writer.close().await;
}

async fn serve_tunnel(conn: tls::TlsConnection, state: &Rc<RefCell<ProxyState>>) {
    let peer = PeerIdentity::from_der(&conn.peer_certificates().unwrap()[0]).unwrap();
    let mut cfg = SessionConfig::new(Role::Proxy, false);
    cfg.keepalive_interval = Duration::from_secs(1);
    let tunnel = Tunnel::new(Session::new(cfg, [7; 16], Instant::now()));
    let kill = agent::Stop::default();
    let driver = {
        let tunnel = tunnel.clone();
        let kill = kill.clone();
        monoio::spawn(async move {
            // Dropping the driver on `kill` drops the TLS connection: the agent sees the
            // socket close without any goodbye.
            monoio::select! {
                _ = drive(&tunnel, conn, BytesMut::new()) => {}
                _ = kill.wait() => {}
            }
        })
    };
    let accepted_at = Instant::now();
    let seen = tunnel.announce_changed(0).await;
    if seen == 0 {
        return;
    }
    state.borrow_mut().tunnels.push_back(TunnelConn {
        tunnel,
        accepted_at,
        peer,
        kill,
    });
    driver.await;
}

// ---- the agent under test -------------------------------------------------------------------

struct AgentRun {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl AgentRun {
    fn start(config: AgentConfig) -> AgentRun {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            block_on(async move {
                agent::run(config, async move {
                    while !flag.load(Ordering::SeqCst) {
                        monoio::time::sleep(Duration::from_millis(10)).await;
                    }
                })
                .await
                .map_err(|e| e.to_string())
            })
        });
        AgentRun {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> Result<(), String> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for AgentRun {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn agent_config(proxy: &FakeProxy, data_dir: &Path, forwards: Vec<(&str, String)>) -> AgentConfig {
    let mut c = AgentConfig::new(
        NodeName::new("node-r1").unwrap(),
        AgentMode::Tunnel {
            proxy: proxy.addr.to_string().parse().unwrap(),
        },
        JoinConfig {
            token: JoinToken::Inline(Secret::new(TOKEN)),
            ca_pin: proxy.pin(),
        },
    );
    c.data_dir = data_dir.to_owned();
    c.labels = Labels::try_from(
        [
            ("env".to_owned(), "prod".to_owned()),
            ("site".to_owned(), "w2".to_owned()),
        ]
        .into_iter()
        .collect::<std::collections::BTreeMap<_, _>>(),
    )
    .unwrap();
    c.forwards = Forwards::new(
        forwards
            .into_iter()
            .map(|(name, target)| Forward {
                name: ServiceName::new(name).unwrap(),
                target: target.parse().unwrap(),
            })
            .collect(),
    )
    .unwrap();
    c.backoff = BackoffConfig::new(Duration::from_millis(200), Duration::from_millis(400)).unwrap();
    c
}

/// A blocking TCP echo server on its own thread; counts connections.
fn echo_server() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            counter.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 32 * 1024];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if conn.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = conn.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (addr, count)
}

fn open(service: &str) -> Open {
    Open {
        session_id: [9; 16],
        node: "node-r1".into(),
        service: service.into(),
        user: "alice".into(),
        login: "root".into(),
        ..Open::default()
    }
}

fn pattern(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add((i >> 11) as u8))
        .collect::<Vec<_>>()
        .into()
}

// ---- tests ----------------------------------------------------------------------------------

#[test]
fn join_stores_identity_once_and_announces() {
    block_on(async {
        let proxy = FakeProxy::start();
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("agent-data");
        let (echo, _) = echo_server();
        let config = agent_config(
            &proxy,
            &data,
            vec![("ssh", echo.to_string()), ("web", "127.0.0.1:1".into())],
        );

        let run = AgentRun::start(config.clone());
        let t = proxy.next_tunnel().await;
        assert_eq!(proxy.joins(), 1);
        assert_eq!(proxy.state.borrow().join_nodes, vec!["node-r1".to_owned()]);
        assert_eq!(t.peer.name, "node-r1");
        assert_eq!(t.peer.cluster, CLUSTER);

        // (2) the announce
        let (_, announce) = t.tunnel.peer_announce();
        let Announce { cluster, nodes } = announce.unwrap();
        assert_eq!(cluster, "");
        assert_eq!(nodes.len(), 1);
        let node = &nodes[0];
        assert_eq!(node.name, "node-r1");
        assert!(node.online && node.tunnel);
        assert_eq!(
            node.labels,
            vec![
                ("env".to_owned(), "prod".to_owned()),
                ("site".to_owned(), "w2".to_owned())
            ]
        );
        assert_eq!(node.services, vec!["ssh".to_owned(), "web".to_owned()]);

        // (1) the stored identity
        let mode = |f: &str| {
            std::fs::metadata(data.join(f))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("node.key"), 0o600, "node.key must be private");
        assert!(data.join("node.crt").is_file());
        assert!(data.join("ca.crt").is_file());
        let dir_mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);
        run.stop().unwrap();

        // A second start uses the stored identity: no second join, not even with a token.
        let run = AgentRun::start(config.clone());
        let t2 = proxy.next_tunnel().await;
        assert_eq!(t2.peer.name, "node-r1");
        assert_eq!(
            proxy.joins(),
            1,
            "the agent joined again although it had an identity"
        );
        run.stop().unwrap();

        // ... and without any token at all.
        let mut no_token = config;
        no_token.join.token = JoinToken::None;
        let run = AgentRun::start(no_token);
        proxy.next_tunnel().await;
        assert_eq!(proxy.joins(), 1);
        run.stop().unwrap();
    });
}

#[test]
fn an_expired_certificate_is_renewed_with_the_same_key() {
    block_on(async {
        let proxy = FakeProxy::start();
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("agent-data");
        let (echo, _) = echo_server();
        let config = agent_config(&proxy, &data, vec![("ssh", echo.to_string())]);
        let run = AgentRun::start(config.clone());
        proxy.next_tunnel().await;
        run.stop().unwrap();
        // The stored certificate runs out; the key stays.
        let key = tunnel::identity::read_private_key(
            &data.join("node.key"),
            tunnel::identity::FileRole::PrivateKey,
        )
        .unwrap();
        let now = SystemTime::now();
        let past = Validity::between(
            now - Duration::from_secs(7200),
            now - Duration::from_secs(3600),
        )
        .unwrap();
        let expired = proxy
            .ca
            .issue_node("node-r1", &key.public_key(), past)
            .unwrap();
        let chain: String = proxy.ca.chain(expired).iter().map(|c| pem(c)).collect();
        std::fs::write(data.join("node.crt"), chain).unwrap();

        let run = AgentRun::start(config);
        proxy.next_tunnel().await;
        run.stop().unwrap();
        let state = proxy.state.borrow();
        assert_eq!(state.joins, 2, "the agent did not join again");
        // The proxy gives a name to the key that joined it: a renewal keeps the key.
        assert_eq!(state.join_keys[0], state.join_keys[1]);
    });
}

#[test]
fn wrong_token_is_a_clear_error_and_no_token_is_required_to_join() {
    block_on(async {
        let proxy = FakeProxy::start();
        let dir = tempfile::tempdir().unwrap();
        let mut config = agent_config(&proxy, dir.path(), vec![("ssh", "127.0.0.1:22".into())]);
        config.join.token = JoinToken::Inline(Secret::new("not-the-token"));
        let run = AgentRun::start(config.clone());
        let until = Instant::now() + Duration::from_secs(10);
        while !run.thread.as_ref().unwrap().is_finished() {
            assert!(
                Instant::now() < until,
                "agent kept running after a refused join"
            );
            monoio::time::sleep(Duration::from_millis(10)).await;
        }
        let err = run.stop().unwrap_err();
        assert!(err.contains("unknown join token"), "{err}");
        assert!(!err.contains("not-the-token"), "token leaked: {err}");
        assert!(!dir.path().join("node.key").exists());

        config.join.token = JoinToken::None;
        let err = AgentRun::start(config).stop().unwrap_err();
        assert!(err.contains("no join token"), "{err}");
    });
}

#[test]
fn ssh_stream_reaches_local_target_byte_exact() {
    block_on(async {
        let proxy = FakeProxy::start();
        let dir = tempfile::tempdir().unwrap();
        let (echo, connections) = echo_server();
        let run = AgentRun::start(agent_config(
            &proxy,
            dir.path(),
            vec![("ssh", echo.to_string())],
        ));
        let t = proxy.next_tunnel().await;

        let stream = Rc::new(t.tunnel.open(open("ssh")).await.unwrap());
        let data = pattern(1024 * 1024);
        let writer = {
            let stream = stream.clone();
            let mut data = data.clone();
            monoio::spawn(async move {
                while !data.is_empty() {
                    let piece = data.split_to(data.len().min(10_000));
                    stream.write(piece).await.unwrap();
                }
                // Half-close: the echo server sees EOF, closes, and the agent finishes the
                // stream, so our read ends with `None`.
                stream.finish();
            })
        };
        let mut got = Vec::with_capacity(data.len());
        loop {
            let next = monoio::time::timeout(Duration::from_secs(20), stream.read()).await;
            match next.expect("echo stalled") {
                Ok(Some(bytes)) => got.extend_from_slice(&bytes),
                Ok(None) => break,
                Err(e) => panic!("stream failed after {} bytes: {e}", got.len()),
            }
        }
        writer.await;
        assert_eq!(got.len(), data.len());
        assert!(got == data[..], "bytes differ");
        assert_eq!(connections.load(Ordering::SeqCst), 1);
        run.stop().unwrap();
    });
}

#[test]
fn unconfigured_service_is_refused_and_nothing_is_dialled() {
    block_on(async {
        let proxy = FakeProxy::start();
        let dir = tempfile::tempdir().unwrap();
        let (echo, connections) = echo_server();
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = closed.local_addr().unwrap();
        drop(closed);
        let run = AgentRun::start(agent_config(
            &proxy,
            dir.path(),
            vec![("ssh", echo.to_string()), ("dead", dead.to_string())],
        ));
        let t = proxy.next_tunnel().await;

        for service in ["telnet", "ssh2", "sshd", "localhost"] {
            match t.tunnel.open(open(service)).await {
                Err(StreamError::Refused { code, reason }) => {
                    assert_eq!(code, ErrorCode::TARGET_NOT_ALLOWED, "{service}: {reason}");
                    assert!(reason.contains("allowed: ssh, dead"), "{reason}");
                }
                other => panic!("{service}: expected a refusal, got {other:?}"),
            }
        }
        assert_eq!(
            connections.load(Ordering::SeqCst),
            0,
            "the agent dialled something"
        );

        // A configured target that does not answer: CONNECT_FAILED with the OS error.
        match t.tunnel.open(open("dead")).await {
            Err(StreamError::Refused { code, reason }) => {
                assert_eq!(code, ErrorCode::CONNECT_FAILED, "{reason}");
                assert!(reason.to_lowercase().contains("refused"), "{reason}");
            }
            other => panic!("expected CONNECT_FAILED, got {other:?}"),
        }
        // The tunnel is still fine afterwards.
        let stream = t.tunnel.open(open("ssh")).await.unwrap();
        stream.write(Bytes::from_static(b"ping")).await.unwrap();
        let echoed = stream.read().await.unwrap().unwrap();
        assert_eq!(&echoed[..], b"ping");
        run.stop().unwrap();
    });
}

#[test]
fn agent_reconnects_within_backoff_bounds_when_the_proxy_drops_it() {
    block_on(async {
        let proxy = FakeProxy::start();
        let dir = tempfile::tempdir().unwrap();
        let run = AgentRun::start(agent_config(
            &proxy,
            dir.path(),
            vec![("ssh", "127.0.0.1:22".into())],
        ));
        let mut t = proxy.next_tunnel().await;
        for round in 0..3 {
            let dropped_at = Instant::now();
            t.kill.trigger();
            let next = proxy.next_tunnel().await;
            let waited = next.accepted_at.duration_since(dropped_at);
            // backoff.min = 200ms, max = 400ms; allow time for TCP + TLS on a busy machine.
            assert!(
                waited >= Duration::from_millis(190),
                "round {round}: reconnected after {waited:?}, before backoff.min"
            );
            assert!(
                waited <= Duration::from_millis(400 + 1500),
                "round {round}: reconnected after {waited:?}"
            );
            assert_eq!(next.peer.name, "node-r1");
            t = next;
        }
        // A graceful session close from the proxy (GOAWAY) is also followed by a reconnect.
        let closed_at = Instant::now();
        t.tunnel.close(ErrorCode::GOING_AWAY, "proxy restarting");
        let next = proxy.next_tunnel().await;
        assert!(next.accepted_at.duration_since(closed_at) >= Duration::from_millis(190));
        assert_eq!(proxy.joins(), 1);
        run.stop().unwrap();
    });
}
