//! What a node may make the proxy dial, who may open what, and what a leaf may make the root
//! hold: the holes of issue 13 items 7, 11 and 14, each driven by a crafted peer against the
//! real `remoteler-proxy` binary.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
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

/// A plain TCP echo server on 127.0.0.1 (a stand-in for a node's sshd).
fn tcp_echo_server() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
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
        let audit = proxy.audit_when(|records| {
            records
                .iter()
                .any(|r| r["event"] == "session.start" && r["session_id"] == id.as_str())
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
