//! End to end: the real `remoteler-proxy` binary on 127.0.0.1:0 in a temporary data
//! directory, real TLS, and the agent's and user's sides written with `tunnel` + `frame`.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;
use frame::{ErrorCode, Role};
use tunnel::control::{
    self, ALPN_API, ALPN_REGISTER, ALPN_SESSION, ALPN_TUNNEL, Ack, ApiRequest, ApiResponse,
    ControlError, RegisterRequest,
};
use tunnel::identity::{ClusterCa, PrivateKey, Validity};
use tunnel::mux::{DriveOutcome, StreamError};

fn refusal_code(result: Result<Credential, ControlError>) -> String {
    match result {
        Err(ControlError::Refused(body)) => body.code,
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("expected a refusal, got a certificate"),
    }
}

#[test]
fn join_tunnel_login_session_audit_status() {
    let echo = tcp_echo_server();
    let mut proxy = Proxy::start(Some(&format!(
        "[[nodes]]\nname = \"node-a\"\naddress = \"{echo}\"\nlabels = {{ env = \"lab\" }}\n"
    )));
    proxy.add_user("alice", "correct horse");
    let token = proxy.token(&["--ttl", "15m"]);

    block_on(async {
        // (1) join with a valid token: a node certificate for that node.
        let cred = join(&proxy, &token, "node-r1").await.unwrap();
        let identity = tunnel::identity::PeerIdentity::from_der(&cred.chain[0]).unwrap();
        assert_eq!(identity.name, "node-r1");
        assert_eq!(identity.cluster, "test.example");
        assert_eq!(identity.kind, tunnel::identity::IdentityKind::Node);

        // (2) the tunnel announces node-r1; alice logs in; 1 MiB echoed through the agent.
        let agent_tunnel = agent(&proxy, &cred, "node-r1").await;
        let user = login(&proxy, "alice", "correct horse").await.unwrap();
        // The directory learns of the node right after the ANNOUNCE; retry briefly.
        let (_user_tunnel, stream, session_id) = {
            let mut tries = 0;
            loop {
                match open(&proxy, &user, "node-r1").await {
                    Ok(v) => break v,
                    Err(e) if tries < 50 => {
                        tries += 1;
                        let _ = e;
                        monoio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => panic!("OPEN to node-r1 failed: {e}"),
                }
            }
        };
        let data = random_bytes(1 << 20);
        let got = echo_roundtrip(stream, data.clone()).await;
        assert!(got == data[..], "echo through the tunnel is not byte-exact");

        // (3) an unknown node: OPEN_FAIL NODE_UNKNOWN naming the node.
        match open(&proxy, &user, "node-nope").await {
            Err(StreamError::Refused { code, reason }) => {
                assert_eq!(code, ErrorCode::NODE_UNKNOWN);
                assert!(reason.contains("node-nope"), "{reason}");
                assert!(reason.contains("test.example"), "{reason}");
            }
            Err(e) => panic!("expected NODE_UNKNOWN, got {e}"),
            Ok(_) => panic!("expected NODE_UNKNOWN, got a stream"),
        }

        // (4) a static [[nodes]] entry is dialled directly.
        let (_t, stream, _) = open(&proxy, &user, "node-a").await.unwrap();
        let data = random_bytes(256 * 1024);
        let got = echo_roundtrip(stream, data.clone()).await;
        assert!(
            got == data[..],
            "echo through the direct route is not byte-exact"
        );

        // (7) status through the admin socket reports the tunnel; nodes ls shows both.
        let out = cli(&proxy.data, &["status"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        assert!(text.contains("tunnels:   1 up"), "{text}");
        assert!(text.contains("cluster:   test.example"), "{text}");
        assert!(text.contains(&proxy.pin.to_string()), "{text}");
        let out = cli(&proxy.data, &["nodes", "ls"]);
        let text = stdout(&out);
        let r1 = text.lines().find(|l| l.starts_with("node-r1")).unwrap();
        assert!(
            r1.contains("tunnel") && r1.contains("yes") && r1.contains("env=test"),
            "{text}"
        );
        let a = text.lines().find(|l| l.starts_with("node-a")).unwrap();
        assert!(
            a.contains("direct") && a.contains(&echo.to_string()),
            "{text}"
        );

        // (6) audit: session.start/end with the byte counts, joins and logins.
        let wanted = tunnel::control::to_hex(&session_id);
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        let end = loop {
            let found = proxy
                .audit()
                .into_iter()
                .find(|r| r["event"] == "session.end" && r["session_id"] == wanted.as_str());
            if let Some(r) = found {
                break r;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no session.end in the audit log"
            );
            monoio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(end["bytes_from_user"], 1 << 20);
        assert_eq!(end["bytes_to_user"], 1 << 20);
        assert_eq!(
            end["user"], "alice",
            "the certificate's user, not the request's"
        );
        assert_eq!(end["node"], "node-r1");
        assert_eq!(end["via"], "tunnel");
        assert!(end["time"].as_str().unwrap().ends_with('Z'));
        let audit = proxy.audit();
        assert!(audit.iter().any(|r| r["event"] == "session.start"
            && r["session_id"] == wanted.as_str()
            && r["client_addr"].as_str().unwrap().starts_with("127.0.0.1:")));
        assert!(
            audit
                .iter()
                .any(|r| r["event"] == "join" && r["success"] == true)
        );
        assert!(
            audit
                .iter()
                .any(|r| r["event"] == "login" && r["success"] == true)
        );
        assert!(
            audit
                .iter()
                .any(|r| r["event"] == "tunnel.connect" && r["node"] == "node-r1")
        );
        let text = std::fs::read_to_string(proxy.data.join("audit.log")).unwrap();
        assert!(!text.contains(&token), "the audit log holds a token");
        assert!(
            !text.contains("correct horse"),
            "the audit log holds a password"
        );

        // The agent goes away: node-r1 is offline, and an OPEN says so.
        agent_tunnel.close(ErrorCode::NO_ERROR, "test over");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match open(&proxy, &user, "node-r1").await {
                Err(StreamError::Refused { code, reason }) if code == ErrorCode::NODE_OFFLINE => {
                    assert!(reason.contains("offline since"), "{reason}");
                    break;
                }
                _ => {}
            }
            assert!(
                std::time::Instant::now() < deadline,
                "node-r1 never went offline"
            );
            monoio::time::sleep(Duration::from_millis(50)).await;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !proxy
            .audit()
            .iter()
            .any(|r| r["event"] == "tunnel.disconnect")
        {
            assert!(
                std::time::Instant::now() < deadline,
                "no tunnel.disconnect audited"
            );
            monoio::time::sleep(Duration::from_millis(50)).await;
        }
    });

    let log = proxy.log();
    assert!(!log.contains(&token), "the log holds a token");
    assert!(!log.contains("correct horse"), "the log holds a password");
    let status = proxy.stop(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}: {}", proxy.log());
    assert!(!proxy.data.join("proxy.ready").exists());
}

#[test]
fn tokens_logins_and_certificates_are_checked() {
    // node-b4 registers its sshd on 127.0.0.1: loopback is allowed only when listed.
    let proxy = Proxy::start(Some("[auth]\nregister_networks = [\"127.0.0.0/8\"]\n"));
    proxy.add_user("bob", "s3cret");
    let single = proxy.token(&[]);
    let short = proxy.token(&["--ttl", "1s"]);

    block_on(async {
        // A single-use token works once, then says token_used_up.
        let cred = join(&proxy, &single, "node-b1").await.unwrap();
        assert_eq!(
            refusal_code(join(&proxy, &single, "node-b2").await),
            "token_used_up"
        );
        // A wrong token.
        let wrong = "00".repeat(32);
        assert_eq!(
            refusal_code(join(&proxy, &wrong, "node-b3").await),
            "token_invalid"
        );
        // A bad node name is refused before the token is spent.
        let spare = proxy.token(&[]);
        assert_eq!(
            refusal_code(join(&proxy, &spare, "-oProxyCommand").await),
            "bad_node_name"
        );
        let direct = join(&proxy, &spare, "node-b4").await.unwrap();
        // An expired token.
        monoio::time::sleep(Duration::from_millis(2100)).await;
        assert_eq!(
            refusal_code(join(&proxy, &short, "node-b5").await),
            "token_expired"
        );

        // Wrong password and unknown user get the same answer.
        assert_eq!(
            refusal_code(login(&proxy, "bob", "nope").await),
            "bad_password"
        );
        assert_eq!(
            refusal_code(login(&proxy, "nobody", "nope").await),
            "bad_password"
        );

        // (5) a certificate from another CA is refused at the TLS handshake...
        let other = ClusterCa::generate("test.example").unwrap();
        let key = PrivateKey::generate().unwrap();
        let validity =
            Validity::for_ttl(std::time::SystemTime::now(), Duration::from_secs(3600)).unwrap();
        let leaf = other
            .issue_node("node-evil", &key.public_key(), validity)
            .unwrap();
        let forged = Credential {
            chain: other.chain(leaf),
            key,
        };
        let refused = match connect(proxy.tunnels, forged.config(&proxy.ca), ALPN_TUNNEL).await {
            Err(_) => true,
            Ok(mut conn) => {
                // TLS 1.3: the client learns of the refusal at its first read.
                let mut buf = bytes::BytesMut::new();
                !matches!(
                    monoio::time::timeout(DEADLINE, conn.read(&mut buf)).await,
                    Ok(Ok(n)) if n > 0
                )
            }
        };
        assert!(refused, "a certificate of another CA was accepted");

        // ...and a node certificate on the users listener is refused with a reason.
        let conn = connect(proxy.users, cred.config(&proxy.ca), ALPN_SESSION)
            .await
            .unwrap();
        let (_t, driver) = run_session(conn, Role::Client);
        match monoio::time::timeout(DEADLINE, driver).await.unwrap() {
            DriveOutcome::Ended(e) => {
                let text = e.to_string();
                assert!(text.contains("user certificate is required"), "{text}");
            }
            other => panic!("expected the proxy to end the session, got {other:?}"),
        }

        // The proxy keeps serving: the joined node's tunnel still comes up.
        let tunnel = agent(&proxy, &cred, "node-b1").await;
        assert!(!tunnel.is_ended());
        let user = login(&proxy, "bob", "s3cret").await.unwrap();
        let (_u, stream, _) = loop {
            if let Ok(v) = open(&proxy, &user, "node-b1").await {
                break v;
            }
            monoio::time::sleep(Duration::from_millis(20)).await;
        };
        let data = random_bytes(1000);
        assert!(echo_roundtrip(stream, data.clone()).await == data[..]);

        // A node that registers on the auth listener is dialled directly at its address.
        let echo = tcp_echo_server();
        let conn = connect(proxy.auth, direct.config(&proxy.ca), ALPN_REGISTER)
            .await
            .unwrap();
        let (mut reader, mut writer) = conn.split();
        let heartbeat = RegisterRequest {
            ssh_address: echo.to_string(),
            labels: vec![("site".into(), "lab".into())],
            ttl_secs: 30,
        };
        control::write_line(&mut writer, &heartbeat).await.unwrap();
        let mut buf = bytes::BytesMut::new();
        let _: Ack = control::read_reply(&mut reader, &mut buf).await.unwrap();
        let (_r, stream, _) = open(&proxy, &user, "node-b4").await.unwrap();
        assert!(echo_roundtrip(stream, data.clone()).await == data[..]);
        let out = cli(&proxy.data, &["nodes", "ls"]);
        let text = stdout(&out);
        let b4 = text.lines().find(|l| l.starts_with("node-b4")).unwrap();
        assert!(b4.contains("direct") && b4.contains("site=lab"), "{text}");

        // A second tunnel for the same node replaces the first (which gets GOAWAY and
        // ends), and the node stays online through the new one.
        let replacement = agent(&proxy, &cred, "node-b1").await;
        let deadline = std::time::Instant::now() + DEADLINE;
        while !tunnel.is_ended() {
            assert!(
                std::time::Instant::now() < deadline,
                "the old tunnel was not closed"
            );
            monoio::time::sleep(Duration::from_millis(20)).await;
        }
        let (_u, stream, _) = open(&proxy, &user, "node-b1").await.unwrap();
        assert!(echo_roundtrip(stream, data.clone()).await == data[..]);
        assert!(!replacement.is_ended());

        // An agent whose ANNOUNCE names another node than its certificate is refused.
        let liar = agent(&proxy, &cred, "node-other").await;
        let deadline = std::time::Instant::now() + DEADLINE;
        while !liar.is_ended() {
            assert!(
                std::time::Instant::now() < deadline,
                "a lying ANNOUNCE was accepted"
            );
            monoio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(matches!(
            open(&proxy, &user, "node-other").await,
            Err(StreamError::Refused { code, .. }) if code == ErrorCode::NODE_UNKNOWN
        ));
    });

    let audit = proxy.audit_when(|records| {
        records.iter().any(|r| r["event"] == "tunnel.refused")
            && records
                .iter()
                .any(|r| r["event"] == "tunnel.disconnect" && r["replaced"] == true)
    });
    for code in ["token_used_up", "token_invalid", "token_expired"] {
        assert!(
            audit
                .iter()
                .any(|r| r["event"] == "join" && r["code"] == code),
            "no audited join failure {code}"
        );
    }
    assert!(
        audit
            .iter()
            .any(|r| r["event"] == "login" && r["success"] == false)
    );
    assert!(audit.iter().any(|r| r["event"] == "access.denied"));
    assert!(
        audit.iter().any(|r| r["event"] == "tunnel.refused"
            && r["reason"].as_str().unwrap().contains("node-other"))
    );
    assert!(
        audit
            .iter()
            .any(|r| r["event"] == "tunnel.disconnect" && r["replaced"] == true)
    );

    // tokens ls never shows a secret.
    let out = cli(&proxy.data, &["tokens", "ls"]);
    let text = stdout(&out);
    assert!(
        !text.contains(&single) && text.contains("used up"),
        "{text}"
    );
}

#[test]
fn cli_refuses_what_it_should() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    let out = cli(&data, &["status"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not running"), "{}", stderr(&out));
    let out = cli(&data, &["init", "--cluster", "c.example"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli(&data, &["init", "--cluster", "c.example"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("refusing to overwrite"),
        "{}",
        stderr(&out)
    );
    let out = cli(&data, &["users", "add", "carol", "--roles", "dev"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--password-file"), "{}", stderr(&out));
    let out = cli(&data, &["tokens", "add", "--kind", "cluster"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("unknown token kind"),
        "{}",
        stderr(&out)
    );
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&data).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o700);
}

/// Roles against the real binary: deny by label wins over allow-all, logins are checked, the
/// API lists only reachable nodes, `max_cert_ttl` caps the certificate, the SSH certificate
/// carries the roles' logins, undefined roles get nothing, and the audit records the roles.
#[test]
fn roles_decide_sessions_listing_and_certificates() {
    let echo = tcp_echo_server();
    let mut proxy = Proxy::start(Some(&format!(
        r#"
[[nodes]]
name = "node-a"
address = "{echo}"
labels = {{ env = "lab" }}
[[nodes]]
name = "node-p"
address = "{echo}"
labels = {{ env = "prod" }}
[[roles]]
name = "dev"
logins = ["{{{{user.logins}}}}", "ubuntu"]
max_cert_ttl = "10m"
allow = {{ nodes = ["*"] }}
deny = {{ labels = {{ env = "prod" }} }}
"#
    )));
    let config = proxy.config_path();
    let config = config.to_str().unwrap();
    // A role the file does not define is refused when the file is given.
    let out = proxy.users_add("eve", "pw", &["--roles", "devs", "--config", config]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--roles: devs not defined in"),
        "{}",
        stderr(&out)
    );
    let out = proxy.users_add(
        "alice",
        "pw",
        &["--roles", "dev", "--logins", "root", "--config", config],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = proxy.users_add("carol", "pw", &["--roles", "intern", "--logins", "root"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("warning: role \"intern\""),
        "{}",
        stderr(&out)
    );

    let ssh_key = {
        let seed: [u8; 32] = rand_id().repeat(2).try_into().unwrap();
        ssh_key::PrivateKey::from(ssh_key::private::Ed25519Keypair::from_seed(&seed))
            .public_key()
            .to_openssh()
            .unwrap()
    };
    block_on(async {
        let (alice, response) = login_with(&proxy, "alice", "pw", Some(ssh_key.clone()))
            .await
            .unwrap();
        // Asked for 1h; the role allows 10 minutes.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let left = response.expires_unix - now;
        assert!(left <= 600, "{left}s");
        assert_eq!(response.ssh_logins, vec!["root", "ubuntu"]);
        let cert = ssh_key::Certificate::from_openssh(response.ssh_certificate.as_deref().unwrap())
            .unwrap();
        assert_eq!(cert.key_id(), "alice");
        assert_eq!(
            cert.valid_principals(),
            &["root".to_owned(), "ubuntu".to_owned()]
        );
        assert_eq!(cert.valid_before(), response.expires_unix);

        let (_t, stream, _) = open_as(&proxy, &alice, "node-a", "ubuntu").await.unwrap();
        let data = random_bytes(4096);
        assert!(echo_roundtrip(stream, data.clone()).await == data[..]);
        for (node, login, code, wanted) in [
            (
                "node-p",
                "root",
                ErrorCode::ACCESS_DENIED,
                "role dev of user alice denies node node-p (labels match env=prod)",
            ),
            (
                "node-a",
                "admin",
                ErrorCode::ACCESS_DENIED,
                "may reach node node-a but not as login \"admin\"",
            ),
            ("node-zz", "root", ErrorCode::NODE_UNKNOWN, "node-zz"),
        ] {
            match open_as(&proxy, &alice, node, login).await {
                Err(StreamError::Refused { code: got, reason }) => {
                    assert_eq!(got, code, "{reason}");
                    assert!(reason.contains(wanted), "{reason}");
                }
                Err(e) => panic!("{node}: expected a refusal, got {e}"),
                Ok(_) => panic!("{node} as {login}: expected a refusal, got a stream"),
            }
        }
        assert_eq!(list_nodes(&proxy, &alice).await, vec!["node-a"]);

        // carol's only role is not defined: no node, no SSH certificate.
        let (carol, response) = login_with(&proxy, "carol", "pw", Some(ssh_key.clone()))
            .await
            .unwrap();
        assert!(response.ssh_certificate.is_none());
        assert!(response.ssh_note.unwrap().contains("permit no SSH login"));
        assert!(list_nodes(&proxy, &carol).await.is_empty());
        match open(&proxy, &carol, "node-a").await {
            Err(StreamError::Refused { code, reason }) => {
                assert_eq!(code, ErrorCode::ACCESS_DENIED);
                assert!(
                    reason.contains("roles (intern) are not defined"),
                    "{reason}"
                );
            }
            _ => panic!("carol reached node-a"),
        }
    });
    let audit = proxy.audit_when(|records| {
        records
            .iter()
            .filter(|r| r["event"] == "access.denied")
            .count()
            >= 3
    });
    assert!(audit.iter().any(|r| r["event"] == "session.start"
        && r["user"] == "alice"
        && r["roles"] == serde_json::json!(["dev"])
        && r["login"] == "ubuntu"));
    let denied: Vec<_> = audit
        .iter()
        .filter(|r| r["event"] == "access.denied")
        .collect();
    assert_eq!(denied.len(), 3, "{denied:?}");
    assert!(denied.iter().any(|r| r["node"] == "node-p"
        && r["roles"] == serde_json::json!(["dev"])
        && r["reason"].as_str().unwrap().contains("deny wins")));

    // The audit command reads what the proxy wrote.
    let out = cli(
        &proxy.data,
        &["audit", "--event", "access.denied", "--user", "carol"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(text.contains("carol") && text.contains("node-a"), "{text}");
    let status = proxy.stop(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}: {}", proxy.log());
}

async fn list_nodes(proxy: &Proxy, cred: &Credential) -> Vec<String> {
    let conn = connect(proxy.users, cred.config(&proxy.ca), ALPN_API)
        .await
        .unwrap();
    let (mut reader, mut writer) = conn.split();
    control::write_line(&mut writer, &ApiRequest::ListNodes { cluster: None })
        .await
        .unwrap();
    let mut buf = bytes::BytesMut::new();
    match control::read_reply(&mut reader, &mut buf).await.unwrap() {
        ApiResponse::Nodes(nodes) => nodes.into_iter().map(|n| n.name).collect(),
        other => panic!("expected nodes, got {other:?}"),
    }
}

/// Thread-per-core: with two workers, tunnels live on their node's owner core and user
/// connections that land on the other core are moved there; every node answers byte-exact,
/// both cores hold tunnels, and a connection that asks for nodes of two cores gets a clear
/// refusal for the second instead of crossing threads.
#[test]
fn tunnels_and_sessions_on_every_core() {
    let mut proxy = Proxy::start(Some("workers = 2\n"));
    proxy.add_user("alice", "correct horse");
    let token = proxy.token(&["--ttl", "15m", "--uses", "16"]);
    let nodes: Vec<String> = (0..12).map(|i| format!("node-{i}")).collect();

    block_on(async {
        let mut agents = Vec::new();
        for node in &nodes {
            let cred = join(&proxy, &token, node).await.unwrap();
            agents.push(agent(&proxy, &cred, node).await);
        }
        let user = login(&proxy, "alice", "correct horse").await.unwrap();
        for node in &nodes {
            let (_t, stream, _) = open_retrying(&proxy, &user, node).await;
            let data = random_bytes(64 * 1024);
            let got = echo_roundtrip(stream, data.clone()).await;
            assert!(got == data[..], "echo through {node} is not byte-exact");
        }

        let out = cli(&proxy.data, &["status"]);
        let text = stdout(&out);
        assert!(text.contains("tunnels:   12 up"), "{text}");
        let workers = text.lines().find(|l| l.starts_with("workers:")).unwrap();
        assert!(workers.starts_with("workers:   2 "), "{text}");
        let per_core: Vec<u64> = workers
            .split("tunnels per core: ")
            .nth(1)
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect();
        assert_eq!(per_core.len(), 2, "{text}");
        assert!(
            per_core.iter().all(|&n| n > 0),
            "a core holds no tunnel: {text}"
        );
        assert_eq!(per_core.iter().sum::<u64>(), 12, "{text}");
        let moved: u64 = workers
            .split("; ")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        // 24 connections, each landing on either listener: none moved would be a 1 in 2^24.
        assert!(
            moved > 0,
            "no connection was moved to its node's core: {text}"
        );

        // The same figures, and more, for Prometheus.
        let (status, body) = proxy.http_get("/metrics");
        assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
        let sample = |name: &str| -> u64 {
            body.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or_else(|| panic!("no sample {name} in:\n{body}"))
        };
        assert_eq!(
            sample("remoteler_tunnels{core=\"0\"}") + sample("remoteler_tunnels{core=\"1\"}"),
            12
        );
        assert_eq!(sample("remoteler_tunnel_connects_total"), 12);
        assert_eq!(sample("remoteler_sessions_total"), 12);
        assert_eq!(
            sample("remoteler_session_bytes_total{direction=\"from_user\"}"),
            12 * 64 * 1024
        );
        assert_eq!(sample("remoteler_core_handoffs_total"), moved);
        assert!(sample("remoteler_handshakes_total{result=\"ok\"}") >= 24);
        assert!(sample("remoteler_core_cpu_ticks_total{core=\"0\"}") < 1_000_000);
        assert!(sample("process_open_fds") > 24);
        assert!(
            body.contains("# TYPE remoteler_sessions_total counter"),
            "{body}"
        );
        let (status, _) = proxy.http_get("/other");
        assert_eq!(status, "HTTP/1.1 404 Not Found");

        // One connection, nodes of both cores: the second is refused with a clear reason.
        let (tunnel, stream, _) = open_retrying(&proxy, &user, &nodes[0]).await;
        let mut refused = None;
        for node in &nodes[1..] {
            let request = frame::Open {
                session_id: rand_id(),
                cluster: String::new(),
                node: node.clone(),
                service: "ssh".into(),
                user: String::new(),
                login: "root".into(),
                client_addr: String::new(),
                credential: bytes::Bytes::new(),
            };
            if let Err(StreamError::Refused { code, reason }) = tunnel.open(request).await {
                refused = Some((code, reason));
                break;
            }
        }
        let (code, reason) = refused.expect("every node on one core, or nothing refused");
        assert_eq!(code, ErrorCode::CONNECT_FAILED);
        assert!(reason.contains("one connection per node"), "{reason}");
        let (_, body) = proxy.http_get("/metrics");
        assert!(
            body.contains("remoteler_sessions_refused_total{code=\"connect_failed\"} 1"),
            "{body}"
        );
        let data = random_bytes(4096);
        let got = echo_roundtrip(stream, data.clone()).await;
        assert!(
            got == data[..],
            "the first stream suffered from the refusal"
        );
        drop(agents);
    });
    let status = proxy.stop(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}: {}", proxy.log());
}

/// `open`, retried while the directory has not yet learnt of the node (and only then).
async fn open_retrying(
    proxy: &Proxy,
    user: &Credential,
    node: &str,
) -> (tunnel::mux::Tunnel, tunnel::mux::MuxStream, [u8; 16]) {
    let mut tries = 0;
    loop {
        match open(proxy, user, node).await {
            Ok(v) => return v,
            Err(StreamError::Refused { code, .. })
                if tries < 100
                    && (code == ErrorCode::NODE_UNKNOWN || code == ErrorCode::NODE_OFFLINE) =>
            {
                tries += 1;
                monoio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("OPEN to {node} failed: {e}"),
        }
    }
}

/// Hostile sources: an address that opens connections and sends nothing holds at most
/// `limits.max_handshakes_per_source` of the handshake slots, so others are still served;
/// an address that guesses tokens is refused after ten failures, even with a valid token,
/// while other addresses join normally; both show in the metrics and the audit log.
#[test]
fn hostile_sources_are_limited_per_address() {
    let proxy = Proxy::start(Some(
        "[limits]\nmax_handshakes_per_source = 8\nhandshake_timeout = \"30s\"\nhello_timeout = \"30s\"\n",
    ));
    let token = proxy.token(&["--ttl", "15m", "--uses", "4"]);
    // Three /24s: sources are limited by group.
    let flooder: std::net::IpAddr = [127, 0, 2, 1].into();
    let guesser: std::net::IpAddr = [127, 0, 3, 1].into();
    let honest: std::net::IpAddr = [127, 0, 4, 1].into();

    // 40 silent connections from one address: 8 get a slot, the rest are closed at once.
    let silent: Vec<std::net::TcpStream> = (0..40)
        .map(|_| {
            // One byte of a TLS record: the kernel hands the connection over (the
            // listeners defer accept until data arrives), and it never completes a hello.
            let mut c = tcp_from(flooder, proxy.tunnels);
            c.write_all(&[0x16]).unwrap();
            c
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let closed = loop {
        let closed = silent
            .iter()
            .filter(|c| {
                c.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
                matches!((&**c).read(&mut [0u8; 1]), Ok(0))
            })
            .count();
        if closed >= 32 || std::time::Instant::now() > deadline {
            break closed;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        closed, 32,
        "connections beyond the per-address limit must be closed"
    );

    block_on(async {
        // The silent connections hold their slots; an honest address still joins.
        join_from(&proxy, honest, &token, "node-h1").await.unwrap();
        // A flooder's new connection is refused outright.
        assert!(join_from(&proxy, flooder, &token, "node-f1").await.is_err());

        // Ten wrong tokens from one address, then even the right one is refused.
        for i in 0..10 {
            let refused = join_from(&proxy, guesser, &format!("{i:064x}"), "node-g").await;
            assert_eq!(refusal_code(refused), "token_invalid", "guess {i}");
        }
        let refused = join_from(&proxy, guesser, &token, "node-g").await;
        match refused {
            Err(ControlError::Refused(body)) => {
                assert_eq!(body.code, "rate_limited");
                assert!(body.message.contains("127.0.3.1"), "{}", body.message);
                assert!(body.message.contains("127.0.3.0/24"), "{}", body.message);
                assert!(
                    body.message.contains("refused for another"),
                    "{}",
                    body.message
                );
            }
            other => panic!("expected rate_limited, got {:?}", other.map(|_| ())),
        }
        // Another address is not affected.
        join_from(&proxy, honest, &token, "node-h2").await.unwrap();
    });

    let (_, body) = proxy.http_get("/metrics");
    assert!(
        body.contains("remoteler_connections_dropped_total{reason=\"source_handshake_limit\"} 33"),
        "{body}"
    );
    assert!(
        body.contains("remoteler_auth_sources_blocked_total 1"),
        "{body}"
    );
    let audit = proxy.audit_when(|records| {
        records
            .iter()
            .any(|r| r["event"] == "join" && r["code"] == "rate_limited")
    });
    let blocked = audit
        .iter()
        .filter(|r| r["event"] == "join" && r["source_blocked"] == true)
        .count();
    assert_eq!(
        blocked, 2,
        "the 10th failure and the refused 11th: {audit:#?}"
    );
    drop(silent);
}

/// `nodes rm` while the proxy runs: the node's tunnel is closed within seconds, its old
/// certificate is refused (audited), other nodes carry on, and a new join brings it back.
#[test]
fn removed_node_is_refused_and_its_tunnel_closed() {
    let proxy = Proxy::start(Some("workers = 2\n"));
    proxy.add_user("alice", "correct horse");
    let token = proxy.token(&["--ttl", "15m", "--uses", "3"]);
    block_on(async {
        let cred = join(&proxy, &token, "node-gone").await.unwrap();
        let keep_cred = join(&proxy, &token, "node-keep").await.unwrap();
        let gone = agent(&proxy, &cred, "node-gone").await;
        let _keep = agent(&proxy, &keep_cred, "node-keep").await;
        let user = login(&proxy, "alice", "correct horse").await.unwrap();
        let (_t, stream, _) = open_retrying(&proxy, &user, "node-gone").await;
        let data = random_bytes(4096);
        assert!(echo_roundtrip(stream, data.clone()).await == data[..]);

        let out = cli(&proxy.data, &["nodes", "rm", "node-gone"]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(stdout(&out).contains("join it again"), "{}", stdout(&out));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !gone.is_ended() {
            assert!(
                std::time::Instant::now() < deadline,
                "the removed node's tunnel is still up"
            );
            monoio::time::sleep(Duration::from_millis(50)).await;
        }
        // Gone from the listing, refused as a session target, its old certificate refused.
        let out = cli(&proxy.data, &["nodes", "ls"]);
        assert!(!stdout(&out).contains("node-gone"), "{}", stdout(&out));
        match open(&proxy, &user, "node-gone").await {
            Err(StreamError::Refused { code, .. }) => assert_eq!(code, ErrorCode::NODE_UNKNOWN),
            _ => panic!("a session to a removed node was not refused"),
        }
        let again = agent_unchecked(&proxy, &cred).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !again.is_ended() {
            assert!(
                std::time::Instant::now() < deadline,
                "the removed node's certificate was accepted"
            );
            monoio::time::sleep(Duration::from_millis(50)).await;
        }
        // Another node was not touched.
        let (_t, stream, _) = open_retrying(&proxy, &user, "node-keep").await;
        assert!(echo_roundtrip(stream, data.clone()).await == data[..]);
        // Joined again with the token: back.
        let fresh = join(&proxy, &token, "node-gone").await.unwrap();
        let _back = agent(&proxy, &fresh, "node-gone").await;
        let (_t, stream, _) = open_retrying(&proxy, &user, "node-gone").await;
        assert!(echo_roundtrip(stream, data.clone()).await == data[..]);
    });
    let audit = proxy.audit_when(|records| {
        records.iter().any(|r| {
            r["event"] == "access.denied"
                && r["reason"]
                    .as_str()
                    .is_some_and(|s| s.contains("node-gone was removed"))
        })
    });
    assert!(
        audit
            .iter()
            .any(|r| r["event"] == "node.removed" && r["node"] == "node-gone")
    );
}

/// A tunnel connection with `cred`, without waiting for it to be accepted.
async fn agent_unchecked(proxy: &Proxy, cred: &Credential) -> tunnel::mux::Tunnel {
    let conn = connect(proxy.tunnels, cred.config(&proxy.ca), ALPN_TUNNEL)
        .await
        .unwrap();
    run_session(conn, Role::Agent).0
}

/// The CPUs in a `Cpus_allowed_list:` line of a /proc status file.
fn allowed_cpus(status: &str) -> Vec<usize> {
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap();
    let mut cpus = Vec::new();
    for part in list.trim().split(',') {
        let (from, to) = part.split_once('-').unwrap_or((part, part));
        cpus.extend(from.parse::<usize>().unwrap()..=to.parse::<usize>().unwrap());
    }
    cpus
}

#[test]
fn pinned_workers_run_on_their_own_cpus() {
    let ours = allowed_cpus(&std::fs::read_to_string("/proc/self/status").unwrap());
    let proxy = Proxy::start(Some("workers = 2\npin_workers = true\n"));
    let tasks = std::path::Path::new("/proc")
        .join(proxy.child.id().to_string())
        .join("task");
    let mut pinned = Vec::new();
    for task in std::fs::read_dir(tasks).unwrap() {
        let task = task.unwrap().path();
        let name = std::fs::read_to_string(task.join("comm")).unwrap();
        let Some(core) = name.trim().strip_prefix("core-") else {
            continue;
        };
        let core: usize = core.parse().unwrap();
        let cpus = allowed_cpus(&std::fs::read_to_string(task.join("status")).unwrap());
        assert_eq!(cpus, vec![ours[core % ours.len()]], "worker core-{core}");
        pinned.push(core);
    }
    pinned.sort_unstable();
    assert_eq!(pinned, vec![0, 1], "both workers found and pinned");
    assert!(
        proxy.log().contains("worker pinned to its CPU"),
        "{}",
        proxy.log()
    );
}
