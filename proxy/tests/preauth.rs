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
        ssh_host_ca: false,
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

/// A connection from `source` that sends the first byte of a TLS record and then nothing: the
/// kernel hands it to the proxy (`TCP_DEFER_ACCEPT` waits for data), and it holds a handshake
/// slot until `limits.hello_timeout`.
fn stalled_from(source: IpAddr, addr: std::net::SocketAddr) -> std::net::TcpStream {
    let mut conn = tcp_from(source, addr);
    conn.write_all(&[0x16]).unwrap();
    conn
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
        .map(|i| stalled_from([127, 0, 1, i].into(), proxy.users))
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
        .map(|i| stalled_from([127, 0, 10 + i / 8, 1 + i % 8].into(), proxy.users))
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

/// A peer that completes TLS and then says nothing still holds its handshake slot until its
/// request line is in (so it counts against its group and the table), and no longer after.
#[test]
fn the_request_line_is_read_inside_the_handshake_slot() {
    let proxy = Proxy::start(Some(
        "[limits]\nhandshake_timeout = \"5m\"\nhello_timeout = \"5m\"\n",
    ));
    block_on(async {
        let conn = connect(proxy.users, pinned(proxy.pin), ALPN_LOGIN)
            .await
            .unwrap();
        wait_handshakes(&proxy, 1);
        let (mut reader, mut writer) = conn.split();
        // An unknown user: the answer comes once the line is read.
        let request = LoginRequest {
            user: "nobody".into(),
            password: "x".into(),
            public_key: "00".into(),
            ttl_secs: None,
            ssh_public_key: None,
            ssh_host_ca: false,
        };
        control::write_line(&mut writer, &request).await.unwrap();
        let mut buf = BytesMut::new();
        let refused = control::read_reply::<LoginResponse>(&mut reader, &mut buf).await;
        assert!(
            matches!(refused, Err(ControlError::Refused(_))),
            "{refused:?}"
        );
        wait_handshakes(&proxy, 0);
    });
}

/// A burst of 100 wrong passwords from one address, all at once: at most
/// `AUTH_FAILURE_LIMIT` (10) are checked, the rest are refused unchecked; every one is
/// audited.
#[test]
fn a_burst_of_wrong_passwords_gets_at_most_ten_checked() {
    let proxy = Proxy::start(None);
    proxy.add_user("alice", "correct horse");
    let answers = block_on(async {
        let proxy = std::rc::Rc::new(proxy);
        let tasks: Vec<_> = (0..100)
            .map(|i| {
                let proxy = proxy.clone();
                monoio::spawn(async move {
                    login_from(
                        &proxy,
                        [127, 0, 5, 1].into(),
                        "alice",
                        &format!("guess {i}"),
                    )
                    .await
                })
            })
            .collect();
        let mut answers = Vec::new();
        for task in tasks {
            answers.push(task.await);
        }
        (answers, proxy)
    });
    let (answers, proxy) = answers;
    assert!(answers.iter().all(Result::is_err), "no guess may succeed");
    let audit =
        proxy.audit_when(|records| records.iter().filter(|r| r["event"] == "login").count() >= 100);
    let logins: Vec<_> = audit.iter().filter(|r| r["event"] == "login").collect();
    let checked = logins
        .iter()
        .filter(|r| r["code"] == "bad_password")
        .count();
    let unchecked = logins
        .iter()
        .filter(|r| r["code"] == "rate_limited")
        .count();
    assert!(
        (1..=10).contains(&checked),
        "{checked} of 100 guesses were checked (at most 10 allowed)"
    );
    assert_eq!(
        checked + unchecked + logins.iter().filter(|r| r["code"] == "busy").count(),
        100,
        "{logins:#?}"
    );
}

/// User names with a newline or a terminal escape sequence reach the program log escaped:
/// no forged line, no raw ESC; the audit log (JSON) keeps them exactly.
#[test]
fn hostile_user_names_cannot_forge_log_lines() {
    let proxy = Proxy::start(None);
    let forged = "x\nFAKE LINE 2026-01-01T00:00:00Z ERROR user alice logged in";
    let coloured = "\u{1b}[31mred\u{1b}[0m";
    block_on(async {
        for name in [forged, coloured] {
            let refused = login_from(&proxy, [127, 0, 6, 1].into(), name, "wrong").await;
            assert_eq!(refused, Err("bad_password".to_owned()));
        }
    });
    let audit =
        proxy.audit_when(|records| records.iter().filter(|r| r["event"] == "login").count() >= 2);
    let users: Vec<&str> = audit
        .iter()
        .filter(|r| r["event"] == "login")
        .filter_map(|r| r["user"].as_str())
        .collect();
    assert_eq!(
        users,
        vec![forged, coloured],
        "the audit log keeps names exactly"
    );
    let log = proxy.log();
    assert!(
        !log.lines().any(|l| l.starts_with("FAKE LINE")),
        "a user name forged a log line:\n{log}"
    );
    assert!(
        !log.contains('\u{1b}'),
        "an escape sequence reached the log:\n{log:?}"
    );
    assert!(
        log.contains("x\\nFAKE LINE"),
        "the name is logged, escaped:\n{log}"
    );
    assert!(
        log.contains("\\u{1b}[31mred"),
        "the name is logged, escaped:\n{log}"
    );
}

/// The same names with `log.format = "json"`: every line of the program log is one JSON
/// object, and the name comes back exactly.
#[test]
fn hostile_user_names_stay_inside_json_log_lines() {
    let proxy = Proxy::start(Some("[log]\nformat = \"json\"\n"));
    let forged = "x\nFAKE LINE\u{1b}[31m";
    block_on(async {
        let refused = login_from(&proxy, [127, 0, 6, 2].into(), forged, "wrong").await;
        assert_eq!(refused, Err("bad_password".to_owned()));
    });
    proxy.audit_when(|records| records.iter().any(|r| r["event"] == "login"));
    let log = proxy.log();
    let mut users = Vec::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(record) = serde_json::from_str::<serde_json::Value>(line) else {
            // The harness's own lines (the ready line on stdout) are not the proxy's log.
            assert!(!line.contains("FAKE LINE"), "a forged line: {line:?}");
            continue;
        };
        if let Some(user) = record["fields"]["user"].as_str() {
            users.push(user.to_owned());
        }
    }
    assert_eq!(users, vec![forged.to_owned()], "{log}");
    assert!(!log.contains('\u{1b}'));
}
