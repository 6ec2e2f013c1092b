//! What a node may make the proxy dial, who may open what, and what a leaf may make the root
//! hold: the holes of issue 13 items 7, 11 and 14, each driven by a crafted peer against the
//! real `remoteler-proxy` binary.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use tunnel::control::{self, ALPN_REGISTER, Ack, ControlError, RegisterRequest};
use tunnel::identity::{ClusterCa, PrivateKey, Validity};

/// A node certificate for `node`, signed with the proxy's own CA (as a join would give it).
fn node_credential(proxy: &Proxy, node: &str) -> Credential {
    let ca = ClusterCa::load(&proxy.data).unwrap();
    let key = PrivateKey::generate().unwrap();
    let validity =
        Validity::for_ttl(std::time::SystemTime::now(), Duration::from_secs(3600)).unwrap();
    let leaf = ca.issue_node(node, &key.public_key(), validity).unwrap();
    Credential {
        chain: ca.chain(leaf),
        key,
    }
}

/// One registration heartbeat for `address`: the proxy's answer.
async fn register(proxy: &Proxy, cred: &Credential, address: &str) -> Result<Ack, ControlError> {
    let conn = connect(proxy.auth, cred.config(&proxy.ca), ALPN_REGISTER)
        .await
        .unwrap();
    let (mut reader, mut writer) = conn.split();
    let heartbeat = RegisterRequest {
        ssh_address: address.into(),
        labels: Vec::new(),
        ttl_secs: 30,
    };
    control::write_line(&mut writer, &heartbeat).await?;
    let mut buf = bytes::BytesMut::new();
    control::read_reply(&mut reader, &mut buf).await
}

fn refused(result: Result<Ack, ControlError>, code: &str, says: &str) {
    match result {
        Err(ControlError::Refused(body)) => {
            assert_eq!(body.code, code, "{}", body.message);
            assert!(body.message.contains(says), "{}", body.message);
        }
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("expected a refusal of code {code}, the registration was accepted"),
    }
}

#[test]
fn a_registration_names_only_the_agents_own_address() {
    let static_sshd = tcp_echo_server();
    // The agents connect from 127.0.0.1; the operator allows exactly that loopback address.
    let proxy = Proxy::start(Some(&format!(
        "[auth]\nregister_networks = [\"127.0.0.1/32\"]\n\
         [[nodes]]\nname = \"node-s\"\naddress = \"{static_sshd}\"\n"
    )));
    proxy.add_user("alice", "pw");
    let echo = tcp_echo_server();
    let direct = node_credential(&proxy, "node-d");
    block_on(async {
        // Another host's sshd (another node, or a port scan target): not the agent's address.
        refused(
            register(&proxy, &direct, "10.0.0.7:22").await,
            "address_not_allowed",
            "not the agent's own address",
        );
        // Another loopback address than the listed one.
        refused(
            register(&proxy, &direct, &format!("127.0.0.2:{}", echo.port())).await,
            "address_not_allowed",
            "loopback",
        );
        // The proxy's own metrics listener, on an address the operator allows.
        refused(
            register(&proxy, &direct, &proxy.metrics.to_string()).await,
            "address_not_allowed",
            "listen.metrics",
        );
        // Cloud metadata, whatever the operator lists.
        refused(
            register(&proxy, &direct, "169.254.169.254:80").await,
            "address_not_allowed",
            "link-local",
        );
        refused(
            register(&proxy, &direct, &format!("localhost:{}", echo.port())).await,
            "address_not_allowed",
            "IP address",
        );
        // A static node's name is not taken over by a registration.
        let impostor = node_credential(&proxy, "node-s");
        refused(
            register(&proxy, &impostor, &format!("127.0.0.1:{}", echo.port())).await,
            "name_taken",
            "static",
        );
        // Nor a name with a live tunnel.
        let tunnelled = node_credential(&proxy, "node-t");
        let _tunnel = agent(&proxy, &tunnelled, "node-t").await;
        let deadline = std::time::Instant::now() + DEADLINE;
        loop {
            match register(&proxy, &tunnelled, &format!("127.0.0.1:{}", echo.port())).await {
                Err(ControlError::Refused(body)) if body.code == "name_taken" => break,
                Ok(_) if std::time::Instant::now() < deadline => {
                    // The tunnel is not in the directory yet.
                    monoio::time::sleep(Duration::from_millis(20)).await;
                }
                other => panic!("expected name_taken for a tunnelled node, got {other:?}"),
            }
        }

        // Its own address is accepted, and sessions reach it.
        register(&proxy, &direct, &format!("127.0.0.1:{}", echo.port()))
            .await
            .unwrap();
        let user = login(&proxy, "alice", "pw").await.unwrap();
        let (_t, stream, session_id) = open(&proxy, &user, "node-d").await.unwrap();
        let data = random_bytes(1000);
        assert!(echo_roundtrip(stream, data.clone()).await == data[..]);
        // The static node still reaches its own sshd.
        let (_t, stream, _) = open(&proxy, &user, "node-s").await.unwrap();
        assert!(echo_roundtrip(stream, data.clone()).await == data[..]);

        let id = session_id
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        // Both sessions' records: the audit writer appends each a moment after its event.
        let audit = proxy.audit_when(|records| {
            let started = |f: &dyn Fn(&serde_json::Value) -> bool| {
                records
                    .iter()
                    .any(|r| r["event"] == "session.start" && f(r))
            };
            started(&|r| r["session_id"] == id.as_str()) && started(&|r| r["node"] == "node-s")
        });
        let start = audit
            .iter()
            .find(|r| r["event"] == "session.start" && r["session_id"] == id.as_str())
            .unwrap();
        assert_eq!(start["node"], "node-d");
        assert_eq!(
            start["address"],
            format!("127.0.0.1:{}", echo.port()),
            "{start}"
        );
        let static_start = audit
            .iter()
            .find(|r| r["event"] == "session.start" && r["node"] == "node-s")
            .unwrap();
        assert_eq!(static_start["address"], static_sshd.to_string());
        // Every refusal is audited with its reason.
        let refusals: Vec<&serde_json::Value> = audit
            .iter()
            .filter(|r| r["event"] == "node.register" && r["success"] == false)
            .collect();
        for address in [
            "10.0.0.7:22",
            "169.254.169.254:80",
            &proxy.metrics.to_string(),
        ] {
            assert!(
                refusals
                    .iter()
                    .any(|r| r["address"] == address && r["code"] == "address_not_allowed"),
                "no audited refusal for {address}: {refusals:#?}"
            );
        }
        assert!(
            refusals
                .iter()
                .any(|r| r["node"] == "node-s" && r["code"] == "name_taken")
        );
        assert!(audit.iter().any(|r| r["event"] == "node.register"
            && r["success"] == true
            && r["node"] == "node-d"));
    });
}

#[test]
fn loopback_is_refused_unless_listed() {
    let proxy = Proxy::start(Some("[auth]\nregister_networks = [\"0.0.0.0/0\"]\n"));
    let echo = tcp_echo_server();
    let direct = node_credential(&proxy, "node-d");
    block_on(async {
        // Every address is allowed, but loopback is not listed explicitly: it is the proxy's
        // own host.
        refused(
            register(&proxy, &direct, &format!("127.0.0.1:{}", echo.port())).await,
            "address_not_allowed",
            "loopback",
        );
    });
}

#[test]
fn an_ssh_session_must_name_its_login() {
    let proxy = Proxy::start(None);
    proxy.add_user("alice", "pw");
    let node = node_credential(&proxy, "node-r1");
    block_on(async {
        let _agent = agent(&proxy, &node, "node-r1").await;
        let user = login(&proxy, "alice", "pw").await.unwrap();
        // The node is up and alice may reach it as root.
        let deadline = std::time::Instant::now() + DEADLINE;
        let stream = loop {
            match open_as(&proxy, &user, "node-r1", "root").await {
                Ok((_t, stream, _)) => break stream,
                Err(e) => {
                    assert!(std::time::Instant::now() < deadline, "{e}");
                    monoio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        drop(stream);
        // A crafted OPEN without a login is refused before any role or route.
        match open_as(&proxy, &user, "node-r1", "").await {
            Err(tunnel::mux::StreamError::Refused { code, reason }) => {
                assert_eq!(code, frame::ErrorCode::ACCESS_DENIED);
                assert!(reason.contains("ssh user@node-r1"), "{reason}");
            }
            Err(e) => panic!("expected ACCESS_DENIED, got {e}"),
            Ok(_) => panic!("an OPEN without a login reached the node"),
        }
        // The same for a leaf cluster's node: the root refuses it before passing it on.
        let conn = connect(
            proxy.users,
            user.config(&proxy.ca),
            tunnel::control::ALPN_SESSION,
        )
        .await
        .unwrap();
        let (tunnel, _driver) = run_session(conn, frame::Role::Client);
        let refused = tunnel
            .open(frame::Open {
                session_id: rand_id(),
                cluster: "leaf.example".into(),
                node: "node-a".into(),
                service: "ssh".into(),
                user: "alice".into(),
                login: String::new(),
                client_addr: String::new(),
                credential: bytes::Bytes::new(),
            })
            .await;
        match refused {
            Err(tunnel::mux::StreamError::Refused { code, reason }) => {
                assert_eq!(code, frame::ErrorCode::ACCESS_DENIED, "{reason}");
                assert!(reason.contains("ssh user@node-a"), "{reason}");
            }
            Err(e) => panic!("expected ACCESS_DENIED, got {e}"),
            Ok(_) => panic!("an OPEN without a login was passed to a leaf"),
        }
    });
    let audit = proxy.audit_when(|records| {
        records
            .iter()
            .filter(|r| r["event"] == "access.denied" && r["login"] == "")
            .count()
            >= 2
    });
    let denied = audit
        .iter()
        .find(|r| r["event"] == "access.denied" && r["node"] == "node-r1")
        .unwrap();
    assert!(
        denied["reason"]
            .as_str()
            .unwrap()
            .contains("ssh user@node-r1"),
        "{denied}"
    );
    assert!(
        !audit
            .iter()
            .any(|r| r["event"] == "session.start" && r["login"] == ""),
        "a session without a login was started"
    );
}

/// A leaf cluster `leaf` joined with a trusted-cluster token: its cluster certificate.
async fn join_leaf(proxy: &Proxy, leaf: &str) -> Credential {
    let out = cli(&proxy.data, &["tokens", "add", "--kind", "trusted-cluster"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let token = stdout(&out)
        .lines()
        .find_map(|l| l.strip_prefix("token: ").map(str::to_owned))
        .unwrap();
    let leaf_ca = ClusterCa::generate(leaf).unwrap();
    let key = PrivateKey::generate().unwrap();
    let conn = connect(
        proxy.tunnels,
        pinned(proxy.pin),
        tunnel::control::ALPN_CLUSTER_JOIN,
    )
    .await
    .unwrap();
    let (mut reader, mut writer) = conn.split();
    let request = tunnel::control::ClusterJoinRequest {
        token,
        cluster: leaf.into(),
        ca_pem: leaf_ca.certificate_pem(),
        public_key: control::to_hex(&key.public_key().to_spki_der()),
        // The proof that the leaf holds its CA's key: a short-lived cluster certificate its CA
        // issued for the join key, named after the root.
        ca_proof_pem: tunnel::identity::certificates_to_pem(&[leaf_ca
            .issue_cluster(
                "test.example",
                &key.public_key(),
                tunnel::identity::Validity::for_ttl(
                    std::time::SystemTime::now(),
                    Duration::from_secs(600),
                )
                .unwrap(),
            )
            .unwrap()]),
        ssh_host_ca: None,
    };
    control::write_line(&mut writer, &request).await.unwrap();
    let mut buf = bytes::BytesMut::new();
    let response: tunnel::control::JoinResponse =
        control::read_reply(&mut reader, &mut buf).await.unwrap();
    Credential {
        chain: parse_chain(&response.certificate_pem),
        key,
    }
}

/// A leaf's cluster tunnel announcing `nodes` nodes named `PREFIX-N`.
async fn leaf_tunnel(
    proxy: &Proxy,
    cred: &Credential,
    leaf: &str,
    prefix: &str,
    nodes: usize,
) -> (
    tunnel::mux::Tunnel,
    monoio::task::JoinHandle<tunnel::mux::DriveOutcome>,
) {
    let (tunnel, driver) = tunnel_session(proxy, cred, frame::Role::Cluster).await;
    if tunnel.connected().await {
        let _ = tunnel.announce(&frame::Announce {
            cluster: leaf.into(),
            nodes: (0..nodes)
                .map(|i| frame::NodeInfo {
                    name: format!("{prefix}-{i}"),
                    online: true,
                    tunnel: true,
                    labels: Vec::new(),
                    services: vec!["ssh".into()],
                })
                .collect(),
        });
    }
    (tunnel, driver)
}

/// Why a tunnel the proxy refuses ended.
async fn ended_because(driver: monoio::task::JoinHandle<tunnel::mux::DriveOutcome>) -> String {
    match monoio::time::timeout(DEADLINE, driver).await {
        Ok(tunnel::mux::DriveOutcome::Ended(e)) => e.to_string(),
        Ok(other) => panic!("expected the proxy to close the tunnel, got {other:?}"),
        Err(_) => panic!("the proxy kept a tunnel it should have refused"),
    }
}

#[test]
fn a_leaf_cluster_holds_a_bounded_share_of_the_root() {
    let proxy = Proxy::start(Some(
        "[limits]\nmax_tunnels = 3\nmax_tunnels_per_cluster = 2\nmax_announced_nodes = 5\n",
    ));
    block_on(async {
        let leaf = join_leaf(&proxy, "leaf.example").await;
        let (_t1, _d1) = leaf_tunnel(&proxy, &leaf, "leaf.example", "a", 3).await;
        audit_until(&proxy, |r| {
            r.iter().any(|r| r["event"] == "cluster.connect")
        })
        .await;
        // 3 + 3 nodes: more than the leaf may announce over all its tunnels.
        let (_t2, d2) = leaf_tunnel(&proxy, &leaf, "leaf.example", "b", 3).await;
        let why = ended_because(d2).await;
        assert!(why.contains("max_announced_nodes"), "{why}");
        // 3 + 2 fit.
        let (t3, _d3) = leaf_tunnel(&proxy, &leaf, "leaf.example", "c", 2).await;
        audit_until(&proxy, |r| {
            r.iter().filter(|r| r["event"] == "cluster.connect").count() == 2
        })
        .await;
        // A third tunnel of the leaf: more than `max_tunnels_per_cluster`.
        let (_t4, d4) = leaf_tunnel(&proxy, &leaf, "leaf.example", "d", 0).await;
        let why = ended_because(d4).await;
        assert!(why.contains("max_tunnels_per_cluster"), "{why}");
        // A later ANNOUNCE that grows the leaf past the cap closes that tunnel.
        t3.announce(&frame::Announce {
            cluster: "leaf.example".into(),
            nodes: (0..3)
                .map(|i| frame::NodeInfo {
                    name: format!("c-{i}"),
                    online: true,
                    ..frame::NodeInfo::default()
                })
                .collect(),
        })
        .unwrap();
        let deadline = std::time::Instant::now() + DEADLINE;
        while !t3.is_ended() {
            assert!(
                std::time::Instant::now() < deadline,
                "the grown ANNOUNCE was kept"
            );
            monoio::time::sleep(Duration::from_millis(20)).await;
        }
        let (_t5, _d5) = leaf_tunnel(&proxy, &leaf, "leaf.example", "e", 1).await;
        audit_until(&proxy, |r| {
            r.iter().filter(|r| r["event"] == "cluster.connect").count() == 3
        })
        .await;

        // Leaf tunnels count in `max_tunnels`: 2 leaf tunnels + 1 agent = 3, the fourth is
        // refused.
        let a1 = node_credential(&proxy, "node-1");
        let _agent1 = agent(&proxy, &a1, "node-1").await;
        audit_until(&proxy, |r| {
            r.iter()
                .any(|r| r["event"] == "tunnel.connect" && r["node"] == "node-1")
        })
        .await;
        let a2 = node_credential(&proxy, "node-2");
        let (_t, driver) = tunnel_session(&proxy, &a2, frame::Role::Agent).await;
        let why = ended_because(driver).await;
        assert!(why.contains("limits.max_tunnels"), "{why}");
    });
    let audit = proxy.audit();
    let refusals: Vec<&str> = audit
        .iter()
        .filter(|r| r["event"] == "cluster.refused")
        .filter_map(|r| r["reason"].as_str())
        .collect();
    assert!(
        refusals.iter().any(|r| r.contains("max_announced_nodes"))
            && refusals
                .iter()
                .any(|r| r.contains("max_tunnels_per_cluster")),
        "{refusals:#?}"
    );
}

#[test]
fn a_user_may_not_announce_and_holds_a_fair_share_of_a_node() {
    let proxy = Proxy::start(Some("[limits]\nmax_streams_per_user_per_node = 2\n"));
    proxy.add_user("alice", "pw");
    proxy.add_user("bob", "pw");
    let node = node_credential(&proxy, "node-r1");
    block_on(async {
        let _agent = agent(&proxy, &node, "node-r1").await;
        let alice = login(&proxy, "alice", "pw").await.unwrap();
        let bob = login(&proxy, "bob", "pw").await.unwrap();
        let deadline = std::time::Instant::now() + DEADLINE;
        let first = loop {
            match open(&proxy, &alice, "node-r1").await {
                Ok(v) => break v,
                Err(e) => {
                    assert!(std::time::Instant::now() < deadline, "{e}");
                    monoio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        let second = open(&proxy, &alice, "node-r1").await.unwrap();
        match open(&proxy, &alice, "node-r1").await {
            Err(tunnel::mux::StreamError::Refused { code, reason }) => {
                assert_eq!(code, frame::ErrorCode::LIMIT_EXCEEDED, "{reason}");
                assert!(reason.contains("max_streams_per_user_per_node"), "{reason}");
            }
            Err(e) => panic!("expected LIMIT_EXCEEDED, got {e}"),
            Ok(_) => panic!("alice got more than her share of node-r1's streams"),
        }
        // Bob still gets his.
        let (_b, stream, _) = open(&proxy, &bob, "node-r1").await.unwrap();
        let data = random_bytes(1000);
        assert!(echo_roundtrip(stream, data.clone()).await == data[..]);
        // A slot comes back when its session ends.
        drop(first);
        let deadline = std::time::Instant::now() + DEADLINE;
        let _third = loop {
            match open(&proxy, &alice, "node-r1").await {
                Ok(v) => break v,
                Err(e) => {
                    assert!(std::time::Instant::now() < deadline, "{e}");
                    monoio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        drop(second);

        // A user's ANNOUNCE ends the user's connection with a protocol error.
        let conn = connect(
            proxy.users,
            alice.config(&proxy.ca),
            tunnel::control::ALPN_SESSION,
        )
        .await
        .unwrap();
        let (tunnel, driver) = run_session(conn, frame::Role::Client);
        assert!(tunnel.connected().await);
        tunnel
            .announce(&frame::Announce {
                cluster: String::new(),
                nodes: vec![frame::NodeInfo {
                    name: "node-r1".into(),
                    ..frame::NodeInfo::default()
                }],
            })
            .unwrap();
        let why = ended_because(driver).await;
        assert!(why.contains("may not announce"), "{why}");
    });
}

/// The proxy's resident memory, KiB.
fn rss_kib(proxy: &Proxy) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", proxy.child.id())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Figure, not a test (docs/security.md): the root's RSS before and after a hostile leaf opens
/// 10 cluster tunnels that each announce 1 MiB of nodes with 32 one-letter labels (the most
/// memory per announced byte). Run with
/// `cargo test -p proxy --release --test dial -- --ignored --nocapture leaf_announce_rss`.
#[test]
#[ignore = "a figure for docs/security.md, not a check"]
fn leaf_announce_rss() {
    let proxy = Proxy::start(Some(""));
    block_on(async {
        let leaf = join_leaf(&proxy, "leaf.example").await;
        monoio::time::sleep(Duration::from_millis(500)).await;
        let before = rss_kib(&proxy);
        let mut tunnels = Vec::new();
        for t in 0..10 {
            let node = |i: usize| frame::NodeInfo {
                name: format!("t{t}-{i}"),
                online: true,
                tunnel: true,
                labels: (0..32).map(|j| (format!("k{j}"), "v".into())).collect(),
                services: vec!["ssh".into()],
            };
            let mut announce = frame::Announce {
                cluster: "leaf.example".into(),
                nodes: Vec::new(),
            };
            let mut len = announce.encoded_len();
            loop {
                let one = frame::Announce {
                    cluster: String::new(),
                    nodes: vec![node(announce.nodes.len())],
                };
                let more = one.encoded_len() - frame::Announce::default().encoded_len();
                if len + more > 1 << 20 {
                    break;
                }
                len += more;
                announce.nodes.push(one.nodes.into_iter().next().unwrap());
            }
            let (tunnel, driver) = tunnel_session(&proxy, &leaf, frame::Role::Cluster).await;
            if tunnel.connected().await {
                let _ = tunnel.announce(&announce);
            }
            if t == 0 {
                eprintln!(
                    "each ANNOUNCE: {} nodes, {} bytes",
                    announce.nodes.len(),
                    announce.encoded_len()
                );
            }
            tunnels.push((tunnel, driver));
        }
        audit_until(&proxy, |r| {
            r.iter()
                .filter(|r| r["event"] == "cluster.connect" || r["event"] == "cluster.refused")
                .count()
                >= 10
        })
        .await;
        monoio::time::sleep(Duration::from_secs(2)).await;
        let after = rss_kib(&proxy);
        let up = tunnels.iter().filter(|(t, _)| !t.is_ended()).count();
        eprintln!(
            "root RSS: {} MiB before, {} MiB after 10 x 1 MiB ANNOUNCE ({} tunnels kept): +{} MiB",
            before / 1024,
            after / 1024,
            up,
            after.saturating_sub(before) / 1024
        );
    });
}
