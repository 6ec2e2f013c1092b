//! Certificates are checked at every use and access can be taken away: expired certificates
//! (even through a resumed TLS session), removed and locked users, accounts locked out after
//! failed logins, and users' detached sessions that another user cannot claim. The real
//! `remoteler-proxy` binary on 127.0.0.1:0, with crafted clients.

#![allow(clippy::unwrap_used)]

mod common;

use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use common::*;
use frame::{ErrorCode, Open, Role, Session, SessionConfig};
use tunnel::control::{ALPN_SESSION, ControlError, LoginResponse};
use tunnel::identity::{PeerIdentity, PrivateKey};
use tunnel::mux::{DriveOutcome, MuxStream, Tunnel, drive};

fn login_refusal(result: Result<(Credential, LoginResponse), ControlError>) -> (String, String) {
    match result {
        Err(ControlError::Refused(body)) => (body.code, body.message),
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("expected a refusal, got a certificate"),
    }
}

/// A user's connection whose session may resume (`grace`), with the session id `id`.
struct UserConn {
    tunnel: Tunnel,
    driver: monoio::task::JoinHandle<DriveOutcome>,
}

async fn user_conn(
    proxy: &Proxy,
    config: rustls::ClientConfig,
    id: [u8; 16],
    grace: Duration,
) -> Option<UserConn> {
    let conn = connect(proxy.users, config, ALPN_SESSION).await.ok()?;
    let mut session = SessionConfig::new(Role::Client, true);
    session.resume_grace = grace;
    let tunnel = Tunnel::new(Session::new(session, id, Instant::now()));
    let driven = tunnel.clone();
    let driver = monoio::spawn(async move { drive(&driven, conn, BytesMut::new()).await });
    Some(UserConn { tunnel, driver })
}

fn open_request(node: &str) -> Open {
    Open {
        session_id: rand_id(),
        cluster: String::new(),
        node: node.into(),
        service: "ssh".into(),
        user: String::new(),
        login: "root".into(),
        client_addr: String::new(),
        credential: Bytes::new(),
    }
}

/// An OPEN to `node`, retried while the node's tunnel is not listed yet.
async fn open_stream(tunnel: &Tunnel, node: &str) -> Result<MuxStream, tunnel::mux::StreamError> {
    for _ in 0..200 {
        match tunnel.open(open_request(node)).await {
            Err(tunnel::mux::StreamError::Refused { code, .. })
                if code == ErrorCode::NODE_UNKNOWN || code == ErrorCode::NODE_OFFLINE =>
            {
                monoio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
    panic!("node {node} never came online");
}

/// Writes `data` and reads it back (the fake agent echoes), leaving the stream open.
async fn echo(stream: &MuxStream, data: &[u8]) -> Result<(), String> {
    stream
        .write(Bytes::copy_from_slice(data))
        .await
        .map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    while got.len() < data.len() {
        match monoio::time::timeout(DEADLINE, stream.read()).await {
            Ok(Ok(Some(b))) => got.extend_from_slice(&b),
            Ok(Ok(None)) => return Err("FIN".into()),
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("no echo within the deadline".into()),
        }
    }
    assert_eq!(got, data);
    Ok(())
}

/// Waits (bounded) for the proxy to end a connection; returns why, as the client saw it.
async fn ended_reason(conn: UserConn) -> String {
    match monoio::time::timeout(DEADLINE, conn.driver).await {
        Ok(DriveOutcome::Ended(e)) => e.to_string(),
        Ok(other) => format!("{other:?}"),
        Err(_) => panic!("the proxy did not end the connection"),
    }
}

/// Connects with `config` and asks for `node`: the refusal's text (handshake, GOAWAY or OPEN
/// refusal), or `None` if the session opened.
async fn refusal(proxy: &Proxy, config: rustls::ClientConfig, node: &str) -> Option<String> {
    let Some(conn) = user_conn(proxy, config, rand_id(), Duration::ZERO).await else {
        return Some("tls handshake refused".into());
    };
    let opened = monoio::time::timeout(DEADLINE, conn.tunnel.open(open_request(node))).await;
    match opened {
        // Opened: the session is live only if bytes come back.
        Ok(Ok(stream)) => echo(&stream, b"still here?").await.err(),
        Ok(Err(e)) => {
            let detail = ended_reason(conn).await;
            Some(format!("{e}; {detail}"))
        }
        Err(_) => Some("no answer".into()),
    }
}

/// The core the proxy serves `node` on (the directory's hash, with `cores` workers).
fn owner_core(node: &str, cores: u64) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    node.hash(&mut hasher);
    hasher.finish() % cores
}

fn certificate_of(cred: &Credential) -> PeerIdentity {
    PeerIdentity::from_der(&cred.chain[0]).unwrap()
}

/// Issue 13, item 1: a certificate cannot outlive its `notAfter`, not through a resumed TLS
/// session (the proxy issues no tickets, and checks the validity at every connection) and not
/// by keeping a connection open (it ends at the expiry, with the reason).
#[test]
fn an_expired_certificate_is_refused_even_when_the_tls_session_resumes() {
    let proxy = Proxy::start(Some("workers = 2\n"));
    proxy.add_user("alice", "correct horse");
    let token = proxy.token(&["--ttl", "15m"]);
    block_on(async {
        let node = join(&proxy, &token, "node-x").await.unwrap();
        let _agent = agent(&proxy, &node, "node-x").await;
        let (cred, response) = login_for(&proxy, "alice", "correct horse", 2, None)
            .await
            .unwrap();
        let not_after = certificate_of(&cred).not_after;
        assert!(response.expires_unix <= 3 + now_unix(), "asked for 2 s");
        // A crafted client that keeps TLS sessions to resume them.
        let mut config = cred.config(&proxy.ca);
        config.resumption = rustls::client::Resumption::in_memory_sessions(64);

        let running = user_conn(&proxy, config.clone(), rand_id(), Duration::ZERO)
            .await
            .unwrap();
        let stream = open_stream(&running.tunnel, "node-x").await.unwrap();
        echo(&stream, b"before the expiry").await.unwrap();
        // A second connection: the session tickets of the first have been read by now.
        assert_eq!(refusal(&proxy, config.clone(), "node-x").await, None);

        // Wall-clock time must pass the certificate's end: there is no event to wait for.
        let left = not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        monoio::time::sleep(left + Duration::from_millis(1500)).await;

        for attempt in 0..3 {
            let refused = refusal(&proxy, config.clone(), "node-x").await;
            assert!(
                refused.is_some(),
                "attempt {attempt}: an expired certificate opened a session"
            );
        }
        // The connection that was open across the expiry was ended, saying why.
        let why = ended_reason(running).await;
        assert!(
            why.contains("your certificate expired at") && why.contains("remoteler login"),
            "{why}"
        );
    });
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Issue 13, item 2: `users lock` and `users rm` end the user's connections on every core
/// (attached, and detached waiting to be resumed), refuse their certificates from then on
/// (also after a restart), and are audited; unlocking or adding the user again needs a new
/// login, and other users are not touched.
#[test]
fn removed_and_locked_users_lose_access_at_once_and_for_good() {
    let mut proxy = Proxy::start(Some("workers = 2\n"));
    proxy.add_user("alice", "correct horse");
    proxy.add_user("bob", "battery staple");
    let token = proxy.token(&["--ttl", "15m", "--uses", "2"]);
    // One node on each core: a user's connection moves to its node's core.
    let names: Vec<String> = (0..64).map(|i| format!("node-{i}")).collect();
    let on = |core| {
        names
            .iter()
            .find(|n| owner_core(n, 2) == core)
            .unwrap()
            .clone()
    };
    let nodes = [on(0), on(1)];
    block_on(async {
        let mut agents = Vec::new();
        for node in &nodes {
            let cred = join(&proxy, &token, node).await.unwrap();
            agents.push(agent(&proxy, &cred, node).await);
        }
        let alice = login(&proxy, "alice", "correct horse").await.unwrap();
        let bob = login(&proxy, "bob", "battery staple").await.unwrap();

        let mut alice_conns = Vec::new();
        for node in &nodes {
            let conn = user_conn(&proxy, alice.config(&proxy.ca), rand_id(), Duration::ZERO)
                .await
                .unwrap();
            let stream = open_stream(&conn.tunnel, node).await.unwrap();
            echo(&stream, b"hello").await.unwrap();
            alice_conns.push((conn, stream));
        }
        // One of alice's connections detached, waiting for her to resume it.
        let grace = Duration::from_secs(60);
        let detached = user_conn(&proxy, alice.config(&proxy.ca), rand_id(), grace)
            .await
            .unwrap();
        let stream = open_stream(&detached.tunnel, &nodes[0]).await.unwrap();
        echo(&stream, b"hello").await.unwrap();
        detached.tunnel.abandon_transport();
        let _ = detached.driver.await;
        proxy.audit_when(|r| r.iter().any(|r| r["event"] == "user.detached"));
        let bob_conn = user_conn(&proxy, bob.config(&proxy.ca), rand_id(), Duration::ZERO)
            .await
            .unwrap();
        let bob_stream = open_stream(&bob_conn.tunnel, &nodes[1]).await.unwrap();

        let out = cli(&proxy.data, &["users", "lock", "alice"]);
        assert!(out.status.success(), "{}", stderr(&out));
        for (conn, _) in alice_conns {
            let why = ended_reason(conn).await;
            assert!(why.contains("user alice was locked at"), "{why}");
        }
        // The detached connection's session ended too (all three of alice's sessions).
        proxy.audit_when(|r| {
            r.iter()
                .filter(|r| r["event"] == "session.end" && r["user"] == "alice")
                .count()
                == 3
        });
        echo(&bob_stream, b"bob is fine").await.unwrap();
        let why = refusal(&proxy, alice.config(&proxy.ca), &nodes[0]).await;
        assert!(why.as_deref().unwrap_or("").contains("locked"), "{why:?}");
        let (code, _) = login_refusal(login_for(&proxy, "alice", "correct horse", 60, None).await);
        assert_eq!(code, "user_locked");
        let listed = stdout(&cli(&proxy.data, &["users", "ls"]));
        assert!(listed.contains("locked since"), "{listed}");

        // Unlocked: the old certificate stays refused, a new login works.
        let out = cli(&proxy.data, &["users", "unlock", "alice"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let again = login(&proxy, "alice", "correct horse").await.unwrap();
        assert_eq!(
            refusal(&proxy, again.config(&proxy.ca), &nodes[0]).await,
            None
        );
        let why = refusal(&proxy, alice.config(&proxy.ca), &nodes[0]).await;
        assert!(
            why.as_deref()
                .unwrap_or("")
                .contains("user alice was locked at"),
            "{why:?}"
        );

        // Removed: bob's connection ends, his certificate is refused.
        let out = cli(&proxy.data, &["users", "rm", "bob"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let why = ended_reason(bob_conn).await;
        assert!(why.contains("user bob was removed at"), "{why}");
        assert!(
            refusal(&proxy, bob.config(&proxy.ca), &nodes[1])
                .await
                .is_some()
        );
        drop(agents);
    });
    let audit = proxy.audit_when(|r| {
        ["user.locked", "user.unlocked", "user.removed"]
            .iter()
            .all(|e| r.iter().any(|r| r["event"] == *e))
    });
    assert!(
        audit
            .iter()
            .any(|r| r["event"] == "user.removed" && r["user"] == "bob")
    );

    // After a restart bob's old certificate is still refused; added again, he logs in anew.
    proxy.restart();
    proxy.add_user("bob", "new staple");
    block_on(async {
        let token = proxy.token(&["--ttl", "15m"]);
        let node = join(&proxy, &token, "node-r").await.unwrap();
        let _agent = agent(&proxy, &node, "node-r").await;
        let fresh = login(&proxy, "bob", "new staple").await.unwrap();
        let conn = user_conn(&proxy, fresh.config(&proxy.ca), rand_id(), Duration::ZERO)
            .await
            .unwrap();
        let stream = open_stream(&conn.tunnel, "node-r").await.unwrap();
        echo(&stream, b"bob is back").await.unwrap();
    });
}

/// Issue 13, item 2, after a restart: the certificates of a user removed while the proxy ran
/// stay refused.
#[test]
fn a_removed_users_certificate_stays_refused_after_a_restart() {
    let mut proxy = Proxy::start(Some("workers = 2\n"));
    proxy.add_user("bob", "battery staple");
    let bob = block_on(login(&proxy, "bob", "battery staple")).unwrap();
    let out = cli(&proxy.data, &["users", "rm", "bob"]);
    assert!(out.status.success(), "{}", stderr(&out));
    proxy.restart();
    block_on(async {
        let token = proxy.token(&["--ttl", "15m"]);
        let node = join(&proxy, &token, "node-r").await.unwrap();
        let _agent = agent(&proxy, &node, "node-r").await;
        let why = refusal(&proxy, bob.config(&proxy.ca), "node-r").await;
        assert!(
            why.as_deref()
                .unwrap_or("")
                .contains("user bob was removed"),
            "{why:?}"
        );
    });
}

/// Issue 13, item 10 (first half): after `limits.login_lockout_failures` wrong passwords the
/// account is locked out: even the right password is refused, without being checked; other
/// users log in; `users unlock` lifts it.
#[test]
fn an_account_is_locked_out_after_failed_logins() {
    let proxy = Proxy::start(Some(
        "[limits]\nlogin_lockout_failures = 3\nlogin_lockout = \"1h\"\n",
    ));
    proxy.add_user("alice", "correct horse");
    proxy.add_user("bob", "battery staple");
    block_on(async {
        for guess in ["a", "b", "c"] {
            let (code, _) = login_refusal(login_for(&proxy, "alice", guess, 60, None).await);
            assert_eq!(code, "bad_password");
        }
        let (code, message) =
            login_refusal(login_for(&proxy, "alice", "correct horse", 60, None).await);
        assert_eq!(code, "locked_out", "{message}");
        assert!(
            message.contains("users unlock alice") && message.contains("not checked"),
            "{message}"
        );
        login(&proxy, "bob", "battery staple").await.unwrap();

        let out = cli(&proxy.data, &["users", "unlock", "alice"]);
        assert!(out.status.success(), "{}", stderr(&out));
        login(&proxy, "alice", "correct horse").await.unwrap();
    });
    let audit = proxy.audit_when(|r| {
        r.iter().any(|r| r["event"] == "user.unlocked")
            && r.iter().any(|r| r["event"] == "user.locked_out")
    });
    let locked = audit
        .iter()
        .find(|r| r["event"] == "user.locked_out")
        .unwrap();
    assert_eq!(locked["user"], "alice");
    assert_eq!(locked["failures"], 3);
}

/// Issue 13, item 16: users' detached sessions are keyed by user and id: bob presenting
/// alice's session id (and leaving it detached) neither evicts nor takes hers, and alice
/// resumes.
#[test]
fn another_users_colliding_session_id_does_not_evict_a_detached_session() {
    let proxy = Proxy::start(Some("workers = 2\n"));
    proxy.add_user("alice", "correct horse");
    proxy.add_user("bob", "battery staple");
    let token = proxy.token(&["--ttl", "15m"]);
    block_on(async {
        let node = join(&proxy, &token, "node-x").await.unwrap();
        let _agent = agent(&proxy, &node, "node-x").await;
        let alice = login(&proxy, "alice", "correct horse").await.unwrap();
        let bob = login(&proxy, "bob", "battery staple").await.unwrap();
        let grace = Duration::from_secs(60);
        let id = rand_id();

        let a = user_conn(&proxy, alice.config(&proxy.ca), id, grace)
            .await
            .unwrap();
        let a_stream = open_stream(&a.tunnel, "node-x").await.unwrap();
        echo(&a_stream, b"alice").await.unwrap();
        a.tunnel.abandon_transport();
        let _ = a.driver.await;
        let detached = |n: usize| {
            proxy.audit_when(move |r| {
                r.iter().filter(|r| r["event"] == "user.detached").count() >= n
            })
        };
        detached(1);

        // bob claims the same id, and leaves it detached too.
        let b = user_conn(&proxy, bob.config(&proxy.ca), id, grace)
            .await
            .unwrap();
        let b_stream = open_stream(&b.tunnel, "node-x").await.unwrap();
        echo(&b_stream, b"bob").await.unwrap();
        b.tunnel.abandon_transport();
        let _ = b.driver.await;
        detached(2);

        // alice resumes her session: her stream carries on.
        a.tunnel.reattach().unwrap();
        let conn = connect(proxy.users, alice.config(&proxy.ca), ALPN_SESSION)
            .await
            .unwrap();
        let driven = a.tunnel.clone();
        let _driver = monoio::spawn(async move { drive(&driven, conn, BytesMut::new()).await });
        echo(&a_stream, b"alice again").await.unwrap();
    });
    let audit = proxy.audit_when(|r| r.iter().any(|r| r["event"] == "user.resumed"));
    let resumed: Vec<_> = audit
        .iter()
        .filter(|r| r["event"] == "user.resumed")
        .collect();
    assert_eq!(resumed.len(), 1);
    assert_eq!(resumed[0]["user"], "alice");
}

/// Issue 13, item 1, for nodes: an agent's tunnel ends when its node certificate expires,
/// and the expired certificate is refused from then on. The certificate is issued here with
/// the cluster's CA (joins give 90 days).
#[test]
fn a_node_tunnel_ends_when_its_certificate_expires() {
    let proxy = Proxy::start(Some("workers = 2\n"));
    let ca = tunnel::identity::ClusterCa::load(&proxy.data).unwrap();
    let key = PrivateKey::generate().unwrap();
    let now = SystemTime::now();
    let not_after = now + Duration::from_secs(2);
    let validity =
        tunnel::identity::Validity::between(now - Duration::from_secs(60), not_after).unwrap();
    let leaf = ca
        .issue_node("node-brief", &key.public_key(), validity)
        .unwrap();
    let cred = Credential {
        chain: ca.chain(leaf),
        key,
    };
    block_on(async {
        let (tunnel, driver) = tunnel_session(&proxy, &cred, Role::Agent).await;
        assert!(tunnel.connected().await);
        tunnel
            .announce(&frame::Announce {
                cluster: String::new(),
                nodes: vec![frame::NodeInfo {
                    name: "node-brief".into(),
                    online: true,
                    tunnel: true,
                    labels: Vec::new(),
                    services: vec!["ssh".into()],
                }],
            })
            .unwrap();
        let why = match monoio::time::timeout(Duration::from_secs(30), driver).await {
            Ok(DriveOutcome::Ended(e)) => e.to_string(),
            Ok(other) => format!("{other:?}"),
            Err(_) => panic!("the tunnel outlived its certificate"),
        };
        assert!(
            why.contains("certificate of node node-brief expired at"),
            "{why}"
        );
        assert!(SystemTime::now() > not_after);
    });
}
