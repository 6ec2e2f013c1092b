//! ALPN_HOSTCERT: a node asks for an OpenSSH host certificate for its sshd's host key.
//!
//! The node authenticates with its node certificate (mutual TLS, checked like a tunnel's:
//! cluster, kind, revocation). The certificate is issued for the name in that TLS certificate
//! and nothing else: the request carries only the host key, so a node cannot have its sshd
//! certified as another node.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::SystemTime;

use bytes::BytesMut;
use tunnel::control::{ErrorBody, HostCertRequest, HostCertResponse, Reply};
use tunnel::identity::PeerIdentity;
use tunnel::tls::TlsConnection;

use super::control::{error, read_request, refuse_line, reply};
use super::{Context, HandshakeSlot};
use crate::sshca::{HOST_CERT_TTL, SshCertError, SshHostCa};
use crate::util;

/// Serves one request: `node` is the result of checking the client certificate.
pub(super) async fn serve_host_cert(
    ctx: Rc<Context>,
    conn: TlsConnection,
    peer: SocketAddr,
    node: Result<PeerIdentity, String>,
    slot: HandshakeSlot,
) {
    let node = match node {
        Ok(node) => node,
        Err(why) => {
            let protocol = String::from_utf8_lossy(tunnel::control::ALPN_HOSTCERT).into_owned();
            refuse_line(&ctx, conn, peer, &protocol, "not_allowed", &why).await;
            return;
        }
    };
    let (mut reader, mut writer) = conn.split();
    let mut buf = BytesMut::new();
    let answer = match read_request::<HostCertRequest>(&ctx, &mut reader, &mut buf, slot).await {
        Ok(request) => issue(&ctx.ssh_host_ca, &node, &request, SystemTime::now()),
        Err(body) => Err(body),
    };
    match &answer {
        Ok(response) => {
            tracing::info!(%peer, node = %node.name, principals = ?response.principals, "ssh host certificate issued");
            ctx.audit.record(
                "ssh.host_cert",
                serde_json::json!({
                    "node": node.name, "peer": peer.to_string(), "principals": response.principals,
                    "expires": util::rfc3339_unix(response.expires_unix), "by": "node",
                }),
            );
        }
        Err(body) => {
            tracing::info!(%peer, node = %node.name, code = %body.code, reason = %body.message, "ssh host certificate refused");
        }
    }
    let answer = match answer {
        Ok(response) => Reply::Ok(response),
        Err(body) => Reply::Error(body),
    };
    reply(&mut writer, &answer).await;
}

/// The certificate for `request` from the node `node` authenticated as: principals are the
/// node's own name and `NAME.CLUSTER`.
pub fn issue(
    ca: &SshHostCa,
    node: &PeerIdentity,
    request: &HostCertRequest,
    now: SystemTime,
) -> Result<HostCertResponse, ErrorBody> {
    let cert = ca
        .issue_host(&request.host_key, &node.name, now, HOST_CERT_TTL)
        .map_err(|e| match e {
            SshCertError::BadPublicKey(detail) => error(
                "bad_public_key",
                format!(
                    "host_key is not an OpenSSH public key line ({detail}); send the sshd's \
                     host key, e.g. the contents of /etc/ssh/ssh_host_ed25519_key.pub"
                ),
            ),
            other => {
                tracing::error!(node = %node.name, error = %other, "cannot sign an SSH host certificate");
                error("internal", other.to_string())
            }
        })?;
    Ok(HostCertResponse {
        certificate: cert.line,
        principals: cert.principals,
        expires_unix: util::unix_secs(cert.not_after),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;
    use tunnel::identity::IdentityKind;

    fn node(name: &str) -> PeerIdentity {
        PeerIdentity {
            kind: IdentityKind::Node,
            name: name.into(),
            cluster: "example.com".into(),
            roles: Vec::new(),
            logins: Vec::new(),
            not_before: UNIX_EPOCH,
            not_after: UNIX_EPOCH,
            serial: "01".into(),
        }
    }

    fn host_key() -> String {
        let seed = util::random_bytes::<32>().unwrap();
        ssh_key::PrivateKey::from(ssh_key::private::Ed25519Keypair::from_seed(&seed))
            .public_key()
            .to_openssh()
            .unwrap()
    }

    /// The principals are the name of the TLS identity that asked, whatever the request says:
    /// a request cannot even carry a principal (unknown fields are refused), and a host key
    /// commented with another node's name changes nothing.
    #[test]
    fn the_certificate_names_the_tls_identity_and_the_request_cannot_choose() {
        let ca = SshHostCa::generate("example.com").unwrap();
        let request = HostCertRequest {
            host_key: format!("{} root@node-b", host_key()),
        };
        let now = SystemTime::now();
        let response = issue(&ca, &node("node-r1"), &request, now).unwrap();
        assert_eq!(response.principals, ["node-r1", "node-r1.example.com"]);
        let cert = ssh_key::Certificate::from_openssh(&response.certificate).unwrap();
        assert_eq!(cert.valid_principals(), &response.principals[..]);
        assert_eq!(cert.cert_type(), ssh_key::certificate::CertType::Host);

        let smuggled = format!(
            r#"{{"host_key":{:?},"principals":["node-b"]}}"#,
            request.host_key
        );
        assert!(tunnel::control::parse_line::<HostCertRequest>(smuggled.as_bytes()).is_err());

        let bad = HostCertRequest {
            host_key: "ssh-ed25519 !!!".into(),
        };
        assert_eq!(
            issue(&ca, &node("node-r1"), &bad, now).unwrap_err().code,
            "bad_public_key"
        );
    }
}
