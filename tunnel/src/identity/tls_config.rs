//! rustls configurations for the proxy, the agent and the client.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use super::error::{FileRole, IdentityError};
use super::files;
use super::keys::PrivateKey;
use super::peer::PeerIdentity;
use super::pin::CaPin;

/// Whether a server asks for a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Mutual TLS: a client must present a certificate that chains to one of the roots
    /// (tunnel and user listeners).
    Required,
    /// A client may present a certificate (it is then verified like `Required`) or none; a
    /// request without one must carry a join token or a password (login and join).
    Optional,
}

/// A certificate chain (leaf first) and its private key: what a proxy, agent or client
/// presents. `Debug` never shows the key.
pub struct TlsIdentity {
    /// Leaf first, then the CA certificate.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKey,
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("certificates", &self.chain.len())
            .field("key", &"MASKED")
            .finish()
    }
}

impl TlsIdentity {
    /// Reads a PEM chain and a PEM private key (which must not be readable by other users).
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<TlsIdentity, IdentityError> {
        let chain = files::read_certificates(cert_path, FileRole::Certificate)?;
        let key = files::read_private_key(key_path, FileRole::PrivateKey)?;
        Ok(TlsIdentity { chain, key })
    }

    /// Writes the key (mode 0600) and then the chain, each atomically, replacing old files.
    pub fn save(&self, cert_path: &Path, key_path: &Path) -> Result<(), IdentityError> {
        files::write_private_file(key_path, &self.key, FileRole::PrivateKey)?;
        files::write_public_file(
            cert_path,
            files::certificates_to_pem(&self.chain).as_bytes(),
            FileRole::Certificate,
        )
    }

    /// The identity in the leaf certificate.
    pub fn identity(&self) -> Result<PeerIdentity, IdentityError> {
        let leaf = self
            .chain
            .first()
            .ok_or_else(|| IdentityError::BadCertificate {
                detail: "the certificate chain is empty".into(),
            })?;
        PeerIdentity::from_der(leaf)
    }
}

/// ring's TLS 1.3 suites, AES-128-GCM first. Every byte of a session is encrypted and
/// decrypted twice on its way (user leg and tunnel leg), and AES-128 runs 10 rounds where
/// AES-256 runs 14: on the test machine (AMD EPYC, VAES) AES-128-GCM seals 16 KiB records
/// about 13 % faster (`openssl speed`: 4.4 against 3.9 GB/s per core; the GHASH half costs
/// the same). AES-128 is the suite TLS 1.3 requires every implementation to support.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    })
}

/// Only TLS 1.3: the agent, the client and the proxy are all ours.
const VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

fn root_store(roots: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, IdentityError> {
    let mut store = RootCertStore::empty();
    for root in roots {
        store.add(root.clone())?;
    }
    Ok(Arc::new(store))
}

/// The server side (the proxy). `client_roots` are the CAs whose certificates clients may
/// present: the cluster CA, plus the CA of a trusted root cluster where one is configured.
/// `chain` should be `[leaf, cluster CA]` (see [`super::ClusterCa::chain`]) so that pinned
/// clients can learn the CA.
///
/// No TLS session is ever resumed: a resumed handshake skips the client certificate's
/// verification (rustls takes the chain from the ticket or cache as it was), so a session
/// ticket would let a certificate outlive its `notAfter` or its revocation. Every connection
/// is a full handshake, and the certificate is checked again.
pub fn server_config(
    client_roots: &[CertificateDer<'static>],
    chain: Vec<CertificateDer<'static>>,
    key: &PrivateKey,
    client_auth: ClientAuth,
) -> Result<ServerConfig, IdentityError> {
    let provider = provider();
    let builder =
        WebPkiClientVerifier::builder_with_provider(root_store(client_roots)?, provider.clone());
    let verifier = match client_auth {
        ClientAuth::Required => builder.build()?,
        ClientAuth::Optional => builder.allow_unauthenticated().build()?,
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(VERSIONS)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key.to_rustls())?;
    // Our order, not the client's: agents and clients built before AES-128 came first still
    // offer AES-256 first, and the proxy carries both legs of every session.
    config.ignore_client_order = true;
    config.enable_secret_extraction = true; // see `record_layer_after_handshake`
    // No resumption (see above): no stateful cache, no TLS 1.3 tickets; the default ticketer
    // never produces stateless tickets, and stays so.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// After the handshake our own record layer (`tls::record`) seals and opens the records, with
/// the keys rustls negotiated: one copy per byte instead of rustls's two and an allocation per
/// record, and no handshake state kept for an idle tunnel's life. rustls hands the keys over
/// only when the config allows it.
fn record_layer_after_handshake(config: &mut ClientConfig) {
    config.enable_secret_extraction = true;
}

/// A client that verifies the server against `ca_certs` (the cluster CA it stored), and
/// presents `client_identity` (chain and key) if given.
pub fn client_config_trusting(
    ca_certs: &[CertificateDer<'static>],
    client_identity: Option<(Vec<CertificateDer<'static>>, &PrivateKey)>,
) -> Result<ClientConfig, IdentityError> {
    let provider = provider();
    let verifier =
        WebPkiServerVerifier::builder_with_provider(root_store(ca_certs)?, provider.clone())
            .build()?;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(VERSIONS)?
        .with_webpki_verifier(verifier);
    let mut config = match client_identity {
        Some((chain, key)) => {
            // The CA certificates are the server's trust anchors already: sending them costs
            // bytes in every handshake and, on the proxy, memory for the connection's life
            // (rustls keeps the peer's chain), about 500 B per idle tunnel.
            let chain: Vec<_> = chain
                .into_iter()
                .enumerate()
                .filter(|(i, cert)| *i == 0 || !ca_certs.contains(cert))
                .map(|(_, cert)| cert)
                .collect();
            builder.with_client_auth_cert(chain, key.to_rustls())?
        }
        None => builder.with_no_client_auth(),
    };
    // The proxy resumes no TLS session (see `server_config`): a session cache would only
    // hold memory and offer tickets the server never accepts.
    config.resumption = Resumption::disabled();
    record_layer_after_handshake(&mut config);
    Ok(config)
}

/// A first-contact client (join, first login) that knows only the CA pin. It accepts the
/// server only if a certificate of the server's chain has the pinned public key and the leaf
/// is validly signed by it for the dialled name; handshake signatures are checked as usual.
/// After a successful handshake, [`LearnedCa::certificate`] holds that CA certificate, to
/// store and use with [`client_config_trusting`] from then on. Session resumption is off, so
/// every handshake goes through the pin check.
pub fn client_config_pinned(pin: CaPin) -> Result<(ClientConfig, LearnedCa), IdentityError> {
    let provider = provider();
    let learned = LearnedCa::default();
    let verifier = Arc::new(PinnedCaVerifier {
        pin,
        provider: provider.clone(),
        learned: learned.clone(),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(VERSIONS)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.resumption = Resumption::disabled();
    record_layer_after_handshake(&mut config);
    Ok((config, learned))
}

/// Checks a client certificate chain (leaf first) against `roots` at `now`, outside a TLS
/// handshake, and returns its identity. A leaf cluster uses this for a root user's
/// certificate that the root proxy passes along with a stream.
pub fn verify_client_chain(
    roots: &[CertificateDer<'static>],
    chain: &[CertificateDer<'_>],
    now: SystemTime,
) -> Result<PeerIdentity, IdentityError> {
    let (leaf, intermediates) =
        chain
            .split_first()
            .ok_or_else(|| IdentityError::BadCertificate {
                detail: "the certificate chain is empty".into(),
            })?;
    let verifier =
        WebPkiClientVerifier::builder_with_provider(root_store(roots)?, provider()).build()?;
    let since_epoch =
        now.duration_since(SystemTime::UNIX_EPOCH)
            .map_err(|_| IdentityError::InvalidValidity {
                detail: "the verification time is before 1970".into(),
            })?;
    verifier.verify_client_cert(leaf, intermediates, UnixTime::since_unix_epoch(since_epoch))?;
    PeerIdentity::from_der(leaf)
}

/// The CA certificate a pinned client saw in an accepted handshake.
#[derive(Debug, Clone, Default)]
pub struct LearnedCa(Arc<Mutex<Option<CertificateDer<'static>>>>);

impl LearnedCa {
    /// The CA certificate that matched the pin, once a handshake has accepted the server.
    pub fn certificate(&self) -> Option<CertificateDer<'static>> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, cert: CertificateDer<'static>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(cert);
    }
}

#[derive(Debug)]
struct PinnedCaVerifier {
    pin: CaPin,
    provider: Arc<CryptoProvider>,
    learned: LearnedCa,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut presented = Vec::new();
        let mut ca = None;
        for cert in intermediates {
            // A certificate we cannot parse cannot be the pinned CA either.
            let Ok(pin) = CaPin::of_certificate(cert) else {
                continue;
            };
            presented.push(pin);
            if pin == self.pin {
                ca = Some(cert);
                break;
            }
        }
        let Some(ca) = ca else {
            let err = IdentityError::PinMismatch {
                expected: self.pin,
                presented,
            };
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(err))),
            ));
        };
        let ca = ca.clone().into_owned();
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone())?;
        let webpki =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| {
                    rustls::Error::General(format!(
                        "cannot build a verifier for the pinned CA: {e}"
                    ))
                })?;
        let verified = webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        self.learned.set(ca);
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
