//! Join (token → node certificate) and login (password → user certificate), in memory.
//!
//! These mirror `agent::store::join` and `client::login` over the same wire exchange
//! (`tunnel::control`), minus the files: the real ones write the identity to a data
//! directory with fsyncs, which for thousands of simulated agents would measure our disk,
//! not the proxy.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::{Context as _, bail};
use bytes::BytesMut;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tunnel::control::{
    self, ALPN_JOIN, ALPN_LOGIN, JoinRequest, JoinResponse, LoginRequest, LoginResponse,
};
use tunnel::identity::{self, CaPin, PrivateKey};

use crate::net;

/// What a joined agent or logged-in user presents and trusts.
#[derive(Debug)]
pub struct Credentials {
    /// Certificate chain (leaf, CA).
    pub chain: Vec<CertificateDer<'static>>,
    /// The key the leaf certifies.
    pub key: PrivateKey,
    /// The cluster CA.
    pub ca: Vec<CertificateDer<'static>>,
}

impl Credentials {
    /// A mutual-TLS client config offering exactly `alpn`.
    pub fn client_config(&self, alpn: &[u8]) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let mut config =
            identity::client_config_trusting(&self.ca, Some((self.chain.clone(), &self.key)))?;
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(Arc::new(config))
    }
}

fn pem_certs(pem: &str, what: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{what} is not PEM"))?;
    if certs.is_empty() {
        bail!("{what} holds no certificate");
    }
    Ok(certs)
}

fn check(
    pin: CaPin,
    key: &PrivateKey,
    ca_pem: &str,
    chain_pem: &str,
) -> anyhow::Result<(Vec<CertificateDer<'static>>, Vec<CertificateDer<'static>>)> {
    let ca = pem_certs(ca_pem, "ca_pem")?;
    if CaPin::of_certificate(&ca[0])? != pin {
        bail!("the CA in the answer does not match the pin");
    }
    let chain = pem_certs(chain_pem, "certificate_pem")?;
    if CaPin::of_certificate(&chain[0])? != CaPin::of_spki(&key.public_key().to_spki_der()) {
        bail!("the proxy certified another key than ours");
    }
    Ok((ca, chain))
}

/// Joins node `node` with `token` at the proxy's tunnel address.
pub async fn join(
    from: Option<IpAddr>,
    proxy: SocketAddr,
    pin: CaPin,
    token: &str,
    node: &str,
) -> anyhow::Result<Credentials> {
    let (mut config, _learned) = identity::client_config_pinned(pin)?;
    config.alpn_protocols = vec![ALPN_JOIN.to_vec()];
    let key = PrivateKey::generate()?;
    let request = JoinRequest {
        token: token.to_owned(),
        node: node.to_owned(),
        public_key: control::to_hex(&key.public_key().to_spki_der()),
    };
    let conn = net::connect_tls(from, proxy, Arc::new(config), ALPN_JOIN).await?;
    let (mut reader, mut writer) = conn.split();
    control::write_line(&mut writer, &request).await?;
    let mut buf = BytesMut::new();
    let response: JoinResponse = monoio::time::timeout(
        net::CONNECT_TIMEOUT,
        control::read_reply(&mut reader, &mut buf),
    )
    .await
    .context("no join answer in time")??;
    let _ = writer.close().await;
    let (ca, chain) = check(pin, &key, &response.ca_pem, &response.certificate_pem)?;
    Ok(Credentials { chain, key, ca })
}

/// Logs `user` in at the proxy's users address.
pub async fn login(
    from: Option<IpAddr>,
    proxy: SocketAddr,
    pin: CaPin,
    user: &str,
    password: &str,
) -> anyhow::Result<Credentials> {
    let (mut config, _learned) = identity::client_config_pinned(pin)?;
    config.alpn_protocols = vec![ALPN_LOGIN.to_vec()];
    let key = PrivateKey::generate()?;
    let request = LoginRequest {
        user: user.to_owned(),
        password: password.to_owned(),
        public_key: control::to_hex(&key.public_key().to_spki_der()),
        ttl_secs: Some(3600),
        ssh_public_key: None,
        ssh_host_ca: false,
    };
    let conn = net::connect_tls(from, proxy, Arc::new(config), ALPN_LOGIN).await?;
    let (mut reader, mut writer) = conn.split();
    control::write_line(&mut writer, &request).await?;
    let mut buf = BytesMut::new();
    let response: LoginResponse = monoio::time::timeout(
        std::time::Duration::from_secs(30),
        control::read_reply(&mut reader, &mut buf),
    )
    .await
    .context("no login answer in time")??;
    let _ = writer.close().await;
    let (ca, chain) = check(pin, &key, &response.ca_pem, &response.certificate_pem)?;
    Ok(Credentials { chain, key, ca })
}
