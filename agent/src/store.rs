//! The agent's identity in its data directory, and the join that creates it.
//!
//! | file | contents | mode |
//! |---|---|---|
//! | `node.key` | the node's private key, PKCS#8 PEM | 0600 |
//! | `node.crt` | the node certificate chain (leaf, CA), PEM | 0644 |
//! | `ca.crt` | the cluster CA certificate, PEM | 0644 |
//!
//! Each is written atomically. The key never leaves the machine: the join sends its public key.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::BytesMut;
use config::{AgentConfig, HostPort, Secret};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tracing::{info, warn};
use tunnel::control::{self, ALPN_JOIN, ControlError, JoinRequest, JoinResponse};
use tunnel::identity::{
    self, CaPin, FileRole, IdentityKind, PeerIdentity, PrivateKey, TlsIdentity,
};

use crate::AgentError;
use crate::net::{self, DialError};

/// The node's private key file in the data directory.
pub const NODE_KEY_FILE: &str = "node.key";
/// The node's certificate chain file in the data directory.
pub const NODE_CERT_FILE: &str = "node.crt";
/// The cluster CA certificate file in the data directory.
pub const CA_CERT_FILE: &str = identity::CA_CERT_FILE;

/// What the agent presents and trusts once it has joined.
#[derive(Debug)]
pub struct NodeIdentity {
    /// Certificate chain and key.
    pub tls: TlsIdentity,
    /// The cluster CA certificates the proxy's certificate must chain to.
    pub ca: Vec<CertificateDer<'static>>,
    /// The identity in the certificate.
    pub identity: PeerIdentity,
}

impl NodeIdentity {
    /// A rustls client config presenting the node certificate, trusting the stored CA, and
    /// offering exactly `alpn`.
    pub fn client_config(&self, alpn: &[u8]) -> Result<Arc<rustls::ClientConfig>, AgentError> {
        let mut config = identity::client_config_trusting(
            &self.ca,
            Some((self.tls.chain.clone(), &self.tls.key)),
        )?;
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(Arc::new(config))
    }
}

/// Creates the data directory (mode 0700) if it does not exist.
pub fn ensure_data_dir(dir: &Path) -> Result<(), AgentError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| AgentError::DataDir {
            path: dir.to_owned(),
            source,
        })
}

/// Reads the stored identity; `None` if the agent has not joined yet (no `node.crt` and no
/// `node.key`). Checks that it is a node certificate for `node_name`.
pub fn load(dir: &Path, node_name: &str) -> Result<Option<NodeIdentity>, AgentError> {
    let cert_path = dir.join(NODE_CERT_FILE);
    let key_path = dir.join(NODE_KEY_FILE);
    let ca_path = dir.join(CA_CERT_FILE);
    let present = [&cert_path, &key_path, &ca_path].map(|p| p.exists());
    match present {
        [false, false, _] => return Ok(None),
        [true, true, true] => {}
        _ => {
            return Err(AgentError::PartialIdentity {
                dir: dir.to_owned(),
            });
        }
    }
    let tls = TlsIdentity::load(&cert_path, &key_path)?;
    let ca = identity::read_certificates(&ca_path, FileRole::Certificate)?;
    let peer = tls.identity()?;
    check_identity(&peer, node_name, dir)?;
    Ok(Some(NodeIdentity {
        tls,
        ca,
        identity: peer,
    }))
}

fn check_identity(peer: &PeerIdentity, node_name: &str, dir: &Path) -> Result<(), AgentError> {
    if peer.kind != IdentityKind::Node || peer.name != node_name {
        return Err(AgentError::WrongNode {
            dir: dir.to_owned(),
            stored: format!("{} {}", peer.kind.as_str(), peer.name),
            configured: node_name.to_owned(),
        });
    }
    Ok(())
}

/// Whether a stored certificate is past its end (then the agent joins again if it can).
pub fn is_expired(node: &NodeIdentity, now: SystemTime) -> bool {
    now > node.identity.not_after
}

/// Why a join attempt failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JoinError {
    /// Could not reach the proxy (retried).
    #[error(transparent)]
    Dial(#[from] DialError),
    /// The exchange broke off (retried).
    #[error("join exchange failed: {0}")]
    Exchange(ControlError),
    /// The proxy said no, or sent something unusable (not retried).
    #[error(transparent)]
    Fatal(AgentError),
}

/// Trades the join token for a node certificate at `addr`, verifying the proxy with the CA
/// pin, and stores the identity in `config.data_dir`.
pub async fn join(
    config: &AgentConfig,
    addr: &HostPort,
    token: &Secret,
) -> Result<NodeIdentity, JoinError> {
    let fatal = |e: AgentError| JoinError::Fatal(e);
    let pin: CaPin = config
        .join
        .ca_pin
        .to_string()
        .parse()
        .map_err(|e| fatal(AgentError::Identity(e)))?;
    let (mut tls_config, learned) =
        identity::client_config_pinned(pin).map_err(|e| fatal(e.into()))?;
    tls_config.alpn_protocols = vec![ALPN_JOIN.to_vec()];
    // A join again (certificate expired or lost) keeps the node's key: the proxy gives a name
    // to the key that joined it, and a new key would need the operator's `--replace` token.
    let key_path = config.data_dir.join(NODE_KEY_FILE);
    let kept = key_path
        .exists()
        .then(|| identity::read_private_key(&key_path, FileRole::PrivateKey))
        .and_then(|read| {
            read.map_err(|e| {
                tracing::warn!(error = %e, "cannot reuse the stored node key; joining with a new one (the proxy refuses it for a name joined before unless the token was made with --replace)")
            })
            .ok()
        });
    let key = match kept {
        Some(key) => key,
        None => PrivateKey::generate().map_err(|e| fatal(e.into()))?,
    };
    let request = JoinRequest {
        token: token.expose().to_owned(),
        node: config.node_name.as_str().to_owned(),
        public_key: control::to_hex(&key.public_key().to_spki_der()),
    };
    info!(proxy = %addr, node = %config.node_name, "joining the cluster (token MASKED)");
    let conn = net::connect_tls(addr, Arc::new(tls_config), ALPN_JOIN).await?;
    let (mut reader, mut writer) = conn.split();
    control::write_line(&mut writer, &request)
        .await
        .map_err(JoinError::Exchange)?;
    drop(request);
    let mut buf = BytesMut::new();
    let response: JoinResponse = match control::read_reply(&mut reader, &mut buf).await {
        Ok(r) => r,
        Err(ControlError::Refused(body)) => {
            return Err(fatal(AgentError::JoinRefused {
                node: config.node_name.to_string(),
                code: body.code,
                message: body.message,
            }));
        }
        Err(e) => return Err(JoinError::Exchange(e)),
    };
    let _ = writer.close().await;
    let node = identity_from_response(&response, key, pin, learned.certificate(), config)
        .map_err(fatal)?;
    let dir = &config.data_dir;
    ensure_data_dir(dir).map_err(fatal)?;
    identity::write_public_file(
        &dir.join(CA_CERT_FILE),
        response.ca_pem.as_bytes(),
        FileRole::Certificate,
    )
    .map_err(|e| fatal(e.into()))?;
    node.tls
        .save(&dir.join(NODE_CERT_FILE), &dir.join(NODE_KEY_FILE))
        .map_err(|e| fatal(e.into()))?;
    info!(
        node = %node.identity.name,
        cluster = %node.identity.cluster,
        data_dir = %dir.display(),
        "joined the cluster; identity stored"
    );
    Ok(node)
}

fn bad_response(detail: impl Into<String>) -> AgentError {
    AgentError::BadJoinResponse(detail.into())
}

/// Checks the proxy's answer: the CA it sends is the pinned one (and the one the handshake
/// showed), the chain is a node certificate for our name on our key.
fn identity_from_response(
    response: &JoinResponse,
    key: PrivateKey,
    pin: CaPin,
    learned: Option<CertificateDer<'static>>,
    config: &AgentConfig,
) -> Result<NodeIdentity, AgentError> {
    let ca = parse_pem_certs(&response.ca_pem, "ca_pem")?;
    let ca_cert = ca
        .first()
        .ok_or_else(|| bad_response("ca_pem holds no certificate"))?;
    if CaPin::of_certificate(ca_cert)? != pin {
        return Err(bad_response(
            "the CA certificate in the answer does not match join.ca_pin",
        ));
    }
    if learned.as_ref().is_some_and(|l| l != ca_cert) {
        return Err(bad_response(
            "the CA certificate in the answer is not the one the TLS handshake showed",
        ));
    }
    let chain = parse_pem_certs(&response.certificate_pem, "certificate_pem")?;
    let leaf = chain
        .first()
        .ok_or_else(|| bad_response("certificate_pem holds no certificate"))?;
    // The pin is the digest of a SubjectPublicKeyInfo: equal pins, equal keys.
    if CaPin::of_certificate(leaf)? != CaPin::of_spki(&key.public_key().to_spki_der()) {
        return Err(bad_response(
            "the node certificate is not for the key this agent sent",
        ));
    }
    let tls = TlsIdentity { chain, key };
    let peer = tls.identity()?;
    if peer.cluster != response.cluster {
        warn!(
            certificate = %peer.cluster,
            answer = %response.cluster,
            "the join answer names another cluster than the certificate; using the certificate's"
        );
    }
    check_identity(&peer, config.node_name.as_str(), &config.data_dir)?;
    Ok(NodeIdentity {
        tls,
        ca,
        identity: peer,
    })
}

fn parse_pem_certs(pem: &str, field: &str) -> Result<Vec<CertificateDer<'static>>, AgentError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad_response(format!("{field} is not valid PEM: {e}")))
}

/// Where the identity files live (for messages).
pub fn files(dir: &Path) -> [PathBuf; 3] {
    [
        dir.join(NODE_KEY_FILE),
        dir.join(NODE_CERT_FILE),
        dir.join(CA_CERT_FILE),
    ]
}
