//! `remoteler-hostcert/1` against the real proxy with crafted peers: a node gets a host
//! certificate for its own name only, on the tunnel and the auth listener; a user certificate
//! or a removed node gets none; the login hands out the host CA that `export ssh-host-ca`
//! prints.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::{Proxy, block_on, cli, connect, join, login_with, stderr, stdout};
use tunnel::control::{
    self, ALPN_HOSTCERT, ControlError, HostCertRequest, HostCertResponse, LoginRequest,
    LoginResponse,
};

fn host_key() -> String {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).unwrap();
    ssh_key::PrivateKey::from(ssh_key::private::Ed25519Keypair::from_seed(&seed))
        .public_key()
        .to_openssh()
        .unwrap()
}

async fn ask(
    addr: std::net::SocketAddr,
    config: rustls::ClientConfig,
    host_key: &str,
) -> Result<HostCertResponse, ControlError> {
    let conn = connect(addr, config, ALPN_HOSTCERT).await?;
    let (mut reader, mut writer) = conn.split();
    let request = HostCertRequest {
        host_key: host_key.to_owned(),
    };
    control::write_line(&mut writer, &request).await?;
    let mut buf = BytesMut::new();
    control::read_reply(&mut reader, &mut buf).await
}

#[test]
fn a_node_gets_a_host_certificate_for_its_own_name_only() {
    let proxy = Proxy::start(None);
    let exported = stdout(&cli(&proxy.data, &["export", "ssh-host-ca"]));
    let ca_line = exported
        .trim()
        .strip_prefix("@cert-authority *.test.example ")
        .unwrap_or_else(|| panic!("export ssh-host-ca: {exported}"))
        .to_owned();
    let ca = ssh_key::PublicKey::from_openssh(&ca_line).unwrap();
    proxy.add_user("alice", "alice-password-1");
    block_on(async {
        let node = join(&proxy, &proxy.token(&[]), "node-r1").await.unwrap();
        let key = host_key();
        for addr in [proxy.tunnels, proxy.auth] {
            let response = ask(addr, node.config(&proxy.ca), &format!("{key} node-b"))
                .await
                .unwrap();
            assert_eq!(response.principals, ["node-r1", "node-r1.test.example"]);
            let cert = ssh_key::Certificate::from_openssh(&response.certificate).unwrap();
            assert_eq!(cert.valid_principals(), &response.principals[..]);
            assert_eq!(cert.cert_type(), ssh_key::certificate::CertType::Host);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            cert.validate_at(now, [&ca.fingerprint(Default::default())])
                .unwrap();
        }

        // A user certificate is not a node's.
        let (user, _) = login_with(&proxy, "alice", "alice-password-1", None)
            .await
            .unwrap();
        match ask(proxy.tunnels, user.config(&proxy.ca), &key).await {
            Err(ControlError::Refused(body)) => assert_eq!(body.code, "not_allowed"),
            other => panic!("a user got a host certificate: {other:?}"),
        }

        // The login hands out the same host CA when asked.
        let conn = connect(proxy.users, common::pinned(proxy.pin), control::ALPN_LOGIN)
            .await
            .unwrap();
        let (mut reader, mut writer) = conn.split();
        let request = LoginRequest {
            user: "alice".into(),
            password: "alice-password-1".into(),
            public_key: control::to_hex(
                &tunnel::identity::PrivateKey::generate()
                    .unwrap()
                    .public_key()
                    .to_spki_der(),
            ),
            ttl_secs: Some(60),
            ssh_public_key: None,
            ssh_host_ca: true,
        };
        control::write_line(&mut writer, &request).await.unwrap();
        let mut buf = BytesMut::new();
        let response: LoginResponse = control::read_reply(&mut reader, &mut buf).await.unwrap();
        assert_eq!(response.ssh_host_ca.as_deref(), Some(ca_line.as_str()));

        // A removed node gets no more certificates.
        let out = cli(&proxy.data, &["nodes", "rm", "node-r1"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match ask(proxy.tunnels, node.config(&proxy.ca), &key).await {
                Err(ControlError::Refused(body)) if body.code == "not_allowed" => break,
                Ok(_) => {}
                Err(e) => panic!("unexpected answer: {e}"),
            }
            assert!(
                Instant::now() < deadline,
                "a removed node still gets host certificates"
            );
            monoio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}
