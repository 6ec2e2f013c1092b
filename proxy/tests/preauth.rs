//! Unauthenticated peers: silent connections, handshake floods, password bursts and hostile
//! names, against the real proxy binary.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::*;
use monoio::net::TcpStream;
use rustls_pki_types::ServerName;
use tunnel::control::{self, ALPN_LOGIN, ControlError, LoginRequest, LoginResponse};
use tunnel::identity::PrivateKey;
use tunnel::tls;

/// A login from the loopback address `source`: the answer, or the refusal's code.
async fn login_from(
    proxy: &Proxy,
    source: IpAddr,
    user: &str,
    password: &str,
) -> Result<(), String> {
    let tcp = tcp_from(source, proxy.users);
    tcp.set_nonblocking(true).unwrap();
    let tcp = TcpStream::from_std(tcp).unwrap();
    let mut config = pinned(proxy.pin);
    config.alpn_protocols = vec![ALPN_LOGIN.to_vec()];
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let conn = tls::connect(tcp, Arc::new(config), name, DEADLINE)
        .await
        .map_err(|e| format!("tls: {e}"))?;
    let (mut reader, mut writer) = conn.split();
    let key = PrivateKey::generate().unwrap();
    let request = LoginRequest {
        user: user.into(),
        password: password.into(),
        public_key: control::to_hex(&key.public_key().to_spki_der()),
        ttl_secs: Some(600),
        ssh_public_key: None,
    };
    control::write_line(&mut writer, &request)
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = BytesMut::new();
    match control::read_reply::<LoginResponse>(&mut reader, &mut buf).await {
        Ok(_) => Ok(()),
        Err(ControlError::Refused(body)) => Err(body.code),
        Err(e) => Err(format!("read: {e}")),
    }
}

/// Whether the proxy has closed `conn` (a read returns end of stream or a reset), waiting up
/// to `within`.
fn closed_within(conn: &std::net::TcpStream, within: Duration) -> bool {
    conn.set_read_timeout(Some(within)).unwrap();
    match (&*conn).read(&mut [0u8; 1]) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// Waits until the proxy counts `n` connections in their handshake (its metrics), so the
/// test goes on once the proxy has accepted them.
fn wait_handshakes(proxy: &Proxy, n: usize) {
    let want = format!("remoteler_handshakes_in_progress {n}\n");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body) = proxy.http_get("/metrics");
        if body.contains(&want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never {n} handshakes in progress: {body}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Silent connections from many addresses of one /24 share one per-source quota: beyond
/// `limits.max_handshakes_per_source`, the group's new connections are closed at once,
/// while another /24 is still served.
#[test]
fn silent_connections_of_one_24_share_a_quota() {
    let proxy = Proxy::start(Some(
        "[limits]\nmax_handshakes_per_source = 8\nhandshake_timeout = \"5m\"\nhello_timeout = \"5m\"\n",
    ));
    proxy.add_user("alice", "correct horse");
    // Twenty addresses, one connection each, all in 127.0.1.0/24.
    let silent: Vec<std::net::TcpStream> = (1..=20)
        .map(|i| tcp_from([127, 0, 1, i].into(), proxy.users))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let closed = loop {
        let closed = silent
            .iter()
            .filter(|c| closed_within(c, Duration::from_millis(1)))
            .count();
        if closed >= 12 || Instant::now() > deadline {
            break closed;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        closed, 12,
        "a /24 holds at most 8 handshakes, whatever its addresses"
    );
    let (_, body) = proxy.http_get("/metrics");
    assert!(
        body.contains("remoteler_connections_dropped_total{reason=\"source_handshake_limit\"} 12"),
        "{body}"
    );
    block_on(async {
        assert!(
            login_from(&proxy, [127, 0, 1, 200].into(), "alice", "correct horse")
                .await
                .is_err(),
            "another address of the full /24 is refused too"
        );
        login_from(&proxy, [127, 0, 2, 1].into(), "alice", "correct horse")
            .await
            .unwrap();
    });
    drop(silent);
}

/// A connection that sends nothing, or only part of its ClientHello, is closed after
/// `limits.hello_timeout`, long before `limits.handshake_timeout`.
#[test]
fn silent_connection_is_closed_after_the_hello_timeout() {
    let proxy = Proxy::start(Some(
        "[limits]\nhandshake_timeout = \"5m\"\nhello_timeout = \"300ms\"\n",
    ));
    let silent = tcp_from([127, 0, 3, 1].into(), proxy.users);
    let mut trickle = tcp_from([127, 0, 3, 2].into(), proxy.tunnels);
    // A handshake record header announcing 512 bytes, and then nothing.
    trickle
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .unwrap();
    assert!(
        closed_within(&silent, Duration::from_secs(30)),
        "a silent connection holds its slot past limits.hello_timeout"
    );
    assert!(
        closed_within(&trickle, Duration::from_secs(30)),
        "a partial ClientHello holds its slot past limits.hello_timeout"
    );
    // An honest client is not affected.
    proxy.add_user("alice", "correct horse");
    block_on(async {
        login_from(&proxy, [127, 0, 4, 1].into(), "alice", "correct horse")
            .await
            .unwrap();
    });
}

/// With every handshake slot held by silent connections from a few groups, an honest login
/// still succeeds: the oldest connection of the group holding the most is evicted to make
/// room for it, instead of the newcomer being refused.
#[test]
fn full_handshake_table_evicts_for_an_honest_login() {
    let proxy = Proxy::start(Some(
        "[limits]\nmax_handshakes_in_progress = 16\nmax_handshakes_per_source = 8\n\
         handshake_timeout = \"5m\"\nhello_timeout = \"5m\"\n",
    ));
    proxy.add_user("alice", "correct horse");
    // Two groups of 8: the table is full.
    let silent: Vec<std::net::TcpStream> = (0..16u8)
        .map(|i| tcp_from([127, 0, 10 + i / 8, 1 + i % 8].into(), proxy.users))
        .collect();
    wait_handshakes(&proxy, 16);
    block_on(async {
        for round in 0..3 {
            login_from(&proxy, [127, 0, 20, 1].into(), "alice", "correct horse")
                .await
                .unwrap_or_else(|code| panic!("login {round} refused with a full table: {code}"));
        }
    });
    let closed = silent
        .iter()
        .filter(|c| closed_within(c, Duration::from_millis(200)))
        .count();
    assert!(closed >= 1, "an honest login evicted a silent connection");
    let (_, body) = proxy.http_get("/metrics");
    assert!(
        !body.contains("remoteler_connections_dropped_total{reason=\"handshake_limit\"} 0"),
        "{body}"
    );
}
