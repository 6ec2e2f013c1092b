//! The `remoteler` binary against an in-test fake proxy (login, API, session listeners on one
//! port): login files, status, ls, config, the ProxyCommand bridge, refusals, logout, and the
//! expired-login message that must come before any connection.
#![allow(clippy::unwrap_used)] // test harness: a failed unwrap is a failed test

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::BytesMut;
use frame::{ErrorCode, Role, Session, SessionConfig};
use monoio::net::TcpListener;
use tunnel::control::{
    self, ApiRequest, ApiResponse, ErrorBody, LoginRequest, LoginResponse, NodeView, Reply,
};
use tunnel::identity::{
    ClientAuth, ClusterCa, PeerIdentity, PrivateKey, PublicKey, Validity, server_config,
};
use tunnel::mux::{Tunnel, drive};
use tunnel::tls;

const CLUSTER: &str = "test.example";
const PASSWORD: &str = "correct horse battery staple";
const DEADLINE: Duration = Duration::from_secs(10);

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
            out.push(if i <= chunk.len() {
                T[((n >> (18 - 6 * i)) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out
}

fn pem(der: &[u8]) -> String {
    let mut s = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in base64(der).as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(line).unwrap());
        s.push('\n');
    }
    s + "-----END CERTIFICATE-----\n"
}

/// Starts the fake proxy on its own thread; returns its address and CA pin.
fn fake_proxy() -> (SocketAddr, String) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
            .block_on(async move {
                let ca = Arc::new(ClusterCa::generate(CLUSTER).unwrap());
                let validity =
                    Validity::for_ttl(SystemTime::now(), Duration::from_secs(3600)).unwrap();
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
                server.alpn_protocols = vec![
                    control::ALPN_LOGIN.to_vec(),
                    control::ALPN_API.to_vec(),
                    control::ALPN_SESSION.to_vec(),
                ];
                let server = Arc::new(server);
                let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                tx.send((listener.local_addr().unwrap(), ca.pin().to_string()))
                    .unwrap();
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        return;
                    };
                    let server = server.clone();
                    let ca = ca.clone();
                    monoio::spawn(async move {
                        let Ok(conn) = tls::accept(tcp, server, DEADLINE).await else {
                            return;
                        };
                        let peer = conn
                            .peer_certificates()
                            .and_then(|c| PeerIdentity::from_der(&c[0]).ok());
                        match conn.alpn_protocol().as_deref() {
                            Some(control::ALPN_LOGIN) => serve_login(conn, &ca).await,
                            Some(control::ALPN_API) if peer.is_some() => serve_api(conn).await,
                            Some(control::ALPN_SESSION) if peer.is_some() => {
                                serve_session(conn).await
                            }
                            _ => {}
                        }
                    });
                }
            });
    });
    rx.recv().unwrap()
}

async fn serve_login(conn: tls::TlsConnection, ca: &ClusterCa) {
    let (mut reader, mut writer) = conn.split();
    let mut buf = BytesMut::new();
    let request: LoginRequest = control::read_line(&mut reader, &mut buf).await.unwrap();
    let reply = if request.password != PASSWORD {
        Reply::Error(ErrorBody {
            code: "bad_password".into(),
            message: "wrong user or password".into(),
        })
    } else {
        let key =
            PublicKey::from_spki_der(&control::from_hex(&request.public_key).unwrap()).unwrap();
        let ttl = Duration::from_secs(request.ttl_secs.unwrap_or(3600));
        let validity = Validity::for_ttl(SystemTime::now(), ttl).unwrap();
        let cert = ca
            .issue_user(
                &request.user,
                &["dev".into()],
                &["root".into()],
                &key,
                validity,
            )
            .unwrap();
        Reply::Ok(LoginResponse {
            cluster: CLUSTER.into(),
            certificate_pem: ca.chain(cert).iter().map(|c| pem(c)).collect(),
            ca_pem: ca.certificate_pem(),
            expires_unix: validity
                .not_after()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
            roles: vec!["dev".into()],
            ssh_certificate: None,
            ssh_logins: Vec::new(),
            ssh_note: None,
            ssh_host_ca: None,
        })
    };
    control::write_line(&mut writer, &reply).await.unwrap();
    let _ = writer.close().await;
}

async fn serve_api(conn: tls::TlsConnection) {
    let (mut reader, mut writer) = conn.split();
    let mut buf = BytesMut::new();
    let request: ApiRequest = control::read_line(&mut reader, &mut buf).await.unwrap();
    let reply = match request {
        ApiRequest::ListNodes { .. } => Reply::Ok(ApiResponse::Nodes(vec![
            NodeView {
                name: "node-a".into(),
                via: "direct".into(),
                online: true,
                labels: vec![],
            },
            NodeView {
                name: "node-r1".into(),
                via: "tunnel".into(),
                online: false,
                labels: vec![("env".into(), "prod".into()), ("site".into(), "w2".into())],
            },
        ])),
        ApiRequest::WhoAmI => Reply::Ok(ApiResponse::WhoAmI {
            user: "alice".into(),
            cluster: CLUSTER.into(),
            roles: vec![],
        }),
        ApiRequest::ListClusters => Reply::Ok(ApiResponse::Clusters(vec![])),
        ApiRequest::SshHostCas => Reply::Ok(ApiResponse::SshHostCas(vec![])),
    };
    control::write_line(&mut writer, &reply).await.unwrap();
    let _ = writer.close().await;
}

/// Accepts one stream: node-r1 echoes, anything else is unknown.
async fn serve_session(conn: tls::TlsConnection) {
    let tunnel = Tunnel::new(Session::new(
        SessionConfig::new(Role::Proxy, false),
        [5; 16],
        Instant::now(),
    ));
    let driver = {
        let tunnel = tunnel.clone();
        monoio::spawn(async move { drive(&tunnel, conn, BytesMut::new()).await })
    };
    if let Some(incoming) = tunnel.incoming().await {
        let open = incoming.request.clone();
        if open.node != "node-r1" || open.service != "ssh" || open.user != "alice" {
            incoming.reject(
                ErrorCode::NODE_UNKNOWN,
                &format!("no node named {} in cluster {CLUSTER}", open.node),
            );
        } else {
            let stream = incoming.accept().unwrap();
            // Echo, prefixed with the login the client asked for.
            stream
                .write(format!("login={};", open.login).into())
                .await
                .unwrap();
            while let Ok(Some(bytes)) = stream.read().await {
                stream.write(bytes).await.unwrap();
            }
            stream.finish();
            let _ = stream.closed().await;
        }
    }
    let _ = monoio::time::timeout(Duration::from_secs(5), driver).await;
}

fn remoteler(home: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_remoteler"))
        .args(args)
        .env("REMOTELER_HOME", home)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_vec();
    // From another thread: the bridge echoes, so reading and writing must overlap.
    let feeder = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    eprintln!(
        "remoteler {args:?}: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn login_ls_config_bridge_logout() {
    let (addr, pin) = fake_proxy();
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let pwfile = dir.path().join("pw");
    std::fs::write(&pwfile, format!("{PASSWORD}\n")).unwrap();
    let proxy = addr.to_string();
    let pwfile_s = pwfile.to_str().unwrap();

    // A first login without a pin is refused before dialling.
    let out = remoteler(
        &home,
        &[
            "login",
            "--proxy",
            &proxy,
            "--user",
            "alice",
            "--password-file",
            pwfile_s,
        ],
        b"",
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--ca-pin"),
        "{}",
        text(&out.stderr)
    );

    // Wrong password: the proxy's message, nothing stored.
    let bad = dir.path().join("bad");
    std::fs::write(&bad, "nope\n").unwrap();
    let out = remoteler(
        &home,
        &[
            "login",
            "--proxy",
            &proxy,
            "--user",
            "alice",
            "--password-file",
            bad.to_str().unwrap(),
            "--ca-pin",
            &pin,
        ],
        b"",
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("wrong user or password"),
        "{}",
        text(&out.stderr)
    );
    assert!(!home.join("user.key").exists());

    // No password file and no terminal.
    let out = remoteler(
        &home,
        &[
            "login", "--proxy", &proxy, "--user", "alice", "--ca-pin", &pin,
        ],
        b"",
    );
    assert!(
        text(&out.stderr).contains("--password-file"),
        "{}",
        text(&out.stderr)
    );

    let out = remoteler(
        &home,
        &[
            "login",
            "--proxy",
            &proxy,
            "--user",
            "alice",
            "--password-file",
            pwfile_s,
            "--ca-pin",
            &pin,
            "--ttl",
            "2h",
        ],
        b"",
    );
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("logged in to test.example as alice"));
    let mode = |f: &str| {
        std::fs::metadata(home.join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("user.key"), 0o600);
    assert!(home.join("user.crt").is_file() && home.join("ca.crt").is_file());
    let profile: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(home.join("profile.json")).unwrap()).unwrap();
    assert_eq!(profile["proxy"], proxy.as_str());
    assert_eq!(profile["user"], "alice");
    assert_eq!(profile["cluster"], CLUSTER);
    let expires = profile["expires_unix"].as_u64().unwrap();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        expires > now + 7000 && expires <= now + 7300,
        "ttl not honoured: {expires} vs {now}"
    );

    // A second login to the same proxy trusts the stored CA: no pin needed.
    let out = remoteler(
        &home,
        &[
            "login",
            "--proxy",
            &proxy,
            "--user",
            "alice",
            "--password-file",
            pwfile_s,
        ],
        b"",
    );
    assert!(out.status.success());

    let out = remoteler(&home, &["status"], b"");
    assert!(out.status.success());
    let s = text(&out.stdout);
    for want in [
        "user:    alice",
        "cluster: test.example",
        &format!("proxy:   {proxy}"),
        "roles:   dev",
        "logins:  root",
        "valid until",
    ] {
        assert!(s.contains(want), "{want:?} missing from {s}");
    }

    let out = remoteler(&home, &["ls"], b"");
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout),
        "NAME     VIA     ONLINE  LABELS\nnode-a   direct  yes\nnode-r1  tunnel  no      env=prod,site=w2\n"
    );
    let out = remoteler(&home, &["ls", "--json"], b"");
    let nodes: Vec<NodeView> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(nodes.len(), 2);

    let out = remoteler(&home, &["config"], b"");
    assert!(out.status.success());
    let config = text(&out.stdout);
    let exe = env!("CARGO_BIN_EXE_remoteler");
    let host_line = format!(
        "Host node-a node-r1 *.{CLUSTER}\n    ProxyCommand env REMOTELER_HOME=\"{}\" \"{exe}\" proxy ssh %r@%h:%p\n",
        home.display()
    );
    assert!(config.contains(&host_line), "{config}");
    assert!(config.contains("Include "), "{config}");

    // The bridge: stdin goes to the node and back.
    let out = remoteler(
        &home,
        &["proxy", "ssh", "root@node-r1:22"],
        b"SSH-2.0-test\r\nhello",
    );
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), "login=root;SSH-2.0-test\r\nhello");
    // The cluster suffix of `Host *.CLUSTER` is stripped; a large payload is byte-exact.
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let out = remoteler(
        &home,
        &["proxy", "ssh", &format!("ubuntu@node-r1.{CLUSTER}:22")],
        &big,
    );
    assert!(out.status.success());
    assert_eq!(&out.stdout[..13], b"login=ubuntu;");
    assert!(out.stdout[13..] == big[..], "bridge bytes differ");

    // Without a login (a ProxyCommand without %r) nothing is sent: the proxy would refuse it.
    let out = remoteler(&home, &["proxy", "ssh", "node-r1:22"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("needs LOGIN@NODE")
            && text(&out.stderr).contains("ssh user@node-r1"),
        "{}",
        text(&out.stderr)
    );
    let out = remoteler(
        &home,
        &["forward", "--listen", "127.0.0.1:0", "node-r1", "ssh"],
        b"",
    );
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("root@node-r1 ssh"),
        "{}",
        text(&out.stderr)
    );

    let out = remoteler(&home, &["proxy", "ssh", "root@node-x:22"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!(
            "remoteler: node-x: node unknown (0x0100): no node named node-x in cluster {CLUSTER}\n"
        )
    );

    let out = remoteler(&home, &["logout"], b"");
    assert!(out.status.success());
    assert!(!home.join("user.key").exists() && !home.join("user.crt").exists());
    let out = remoteler(&home, &["ls"], b"");
    assert!(
        text(&out.stderr).contains("not logged in"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn expired_login_is_reported_before_any_connection() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    // A proxy address that records any connection attempt.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let proxy = listener.local_addr().unwrap().to_string();
    std::fs::write(
        home.join("profile.json"),
        format!(
            r#"{{"proxy":"{proxy}","user":"alice","cluster":"{CLUSTER}","roles":["dev"],"logins":["root"],"expires_unix":1700000000}}"#
        ),
    )
    .unwrap();
    std::fs::write(home.join("user.key"), "not read").unwrap();
    std::fs::write(home.join("user.crt"), "not read").unwrap();
    let want = format!(
        "remoteler: your login to {CLUSTER} expired at 2023-11-14T22:13:20Z; run `remoteler login --proxy {proxy} --user alice`\n"
    );
    for args in [
        &["ls"][..],
        &["config"],
        &["ssh", "node-r1", "true"],
        &["proxy", "ssh", "root@node-r1:22"],
    ] {
        let out = remoteler(home, args, b"");
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert_eq!(text(&out.stderr), want, "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    let out = remoteler(home, &["status"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains("expires: EXPIRED at 2023-11-14T22:13:20Z"),
        "{}",
        text(&out.stdout)
    );
    assert!(
        matches!(listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "a command dialled the proxy with an expired login"
    );
}
