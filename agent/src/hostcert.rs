//! The local sshd's host certificate: the agent has the sshd's host key certified by the
//! cluster's SSH host CA and keeps the certificate where sshd's `HostCertificate` reads it, so
//! a user's `ssh NODE` verifies the node by name instead of trusting its key on first use.
//!
//! It asks (ALPN `remoteler-hostcert/1`, mutual TLS with the node certificate, on the same
//! proxy listener it talks to) when the certificate is missing, unreadable, for another key
//! or another name, or when two thirds of its validity have passed; it looks again every
//! [`CHECK_INTERVAL`]. The proxy names the certificate after the node certificate's name
//! only. The file is replaced atomically; sshd reads it when it starts or reloads (SIGHUP),
//! see docs/operations.md.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use config::{AgentConfig, HostCertConfig, HostPort};
use ssh_key::certificate::CertType;
use ssh_key::{Certificate, PublicKey};
use tracing::{debug, info, warn};
use tunnel::control::{self, ALPN_HOSTCERT, HostCertRequest, HostCertResponse};
use tunnel::identity::FileRole;

use crate::net;
use crate::stop::Stop;

/// How often the agent looks at the host key and certificate.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(600);
/// First wait after a failed request; doubles up to [`CHECK_INTERVAL`].
const RETRY_MIN: Duration = Duration::from_secs(5);
/// Time allowed for one request and its answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a new certificate is needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renew {
    /// No certificate file.
    Missing,
    /// The file is not a host certificate.
    Unreadable(String),
    /// The certificate is for another key (the host key was regenerated).
    OtherKey,
    /// The certificate does not name this node.
    OtherName,
    /// Two thirds of its validity have passed (or it is not valid yet).
    Expiring,
}

impl std::fmt::Display for Renew {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Renew::Missing => f.write_str("no host certificate yet"),
            Renew::Unreadable(e) => write!(f, "the host certificate file is unusable ({e})"),
            Renew::OtherKey => f.write_str("the host key changed"),
            Renew::OtherName => f.write_str("the host certificate names another node"),
            Renew::Expiring => f.write_str("the host certificate is due for renewal"),
        }
    }
}

/// Whether the certificate text `cert` (None: no file) still serves `host_key` for `node` at
/// `now` (seconds since the epoch).
pub fn renewal(host_key: &PublicKey, cert: Option<&str>, node: &str, now: u64) -> Option<Renew> {
    let text = match cert {
        None => return Some(Renew::Missing),
        Some(text) => text,
    };
    let cert = match Certificate::from_openssh(text.trim()) {
        Ok(cert) => cert,
        Err(e) => return Some(Renew::Unreadable(e.to_string())),
    };
    if cert.cert_type() != CertType::Host {
        return Some(Renew::Unreadable(
            "a user certificate, not a host one".into(),
        ));
    }
    if cert.public_key() != host_key.key_data() {
        return Some(Renew::OtherKey);
    }
    if !cert.valid_principals().iter().any(|p| p == node) {
        return Some(Renew::OtherName);
    }
    let (after, before) = (cert.valid_after(), cert.valid_before());
    let renew_at = after.saturating_add(before.saturating_sub(after) / 3 * 2);
    if now < after || now >= renew_at {
        return Some(Renew::Expiring);
    }
    None
}

/// Keeps the certificate fresh until `stop`. Does nothing when host certificates are off, or
/// when the default host key does not exist.
pub async fn keep(config: AgentConfig, addr: HostPort, tls: Arc<rustls::ClientConfig>, stop: Stop) {
    let Some((key_path, cert_path)) = config.host_cert.paths() else {
        return;
    };
    let default = matches!(config.host_cert, HostCertConfig::Default { .. });
    if default && !key_path.exists() {
        debug!(host_key = %key_path.display(), "no sshd host key at the default path; no host certificate (set `ssh_host_key`)");
        return;
    }
    let node = config.node_name.as_str();
    let mut retry = RETRY_MIN;
    loop {
        let wait = match check_once(key_path, cert_path, node, &addr, &tls).await {
            Ok(()) => {
                retry = RETRY_MIN;
                CHECK_INTERVAL
            }
            Err(e) => {
                warn!(host_key = %key_path.display(), host_cert = %cert_path.display(), error = %e, retry_in = ?retry, "cannot renew the sshd host certificate");
                let wait = retry;
                retry = (retry * 2).min(CHECK_INTERVAL);
                wait
            }
        };
        monoio::select! {
            _ = monoio::time::sleep(wait) => {}
            _ = stop.wait() => return,
        }
    }
}

async fn check_once(
    key_path: &Path,
    cert_path: &Path,
    node: &str,
    addr: &HostPort,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<(), String> {
    let key_text = std::fs::read_to_string(key_path).map_err(|e| {
        format!(
            "cannot read the sshd host key {}: {e}; set `ssh_host_key` to the sshd's \
             host public key (or \"\" for no host certificate)",
            key_path.display()
        )
    })?;
    let host_key = PublicKey::from_openssh(key_text.trim())
        .map_err(|e| format!("{} is not an OpenSSH public key: {e}", key_path.display()))?;
    let existing = std::fs::read_to_string(cert_path).ok();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let Some(why) = renewal(&host_key, existing.as_deref(), node, now) else {
        return Ok(());
    };
    info!(reason = %why, host_key = %key_path.display(), "asking the proxy for an sshd host certificate");
    let response = monoio::time::timeout(REQUEST_TIMEOUT, request(addr, tls, key_text.trim()))
        .await
        .map_err(|_| format!("the proxy did not answer within {REQUEST_TIMEOUT:?}"))??;
    // What we write must serve our key and name: never install a certificate sshd would
    // present for someone else.
    if let Some(problem) = renewal(&host_key, Some(&response.certificate), node, now) {
        return Err(format!("the proxy's certificate is not usable: {problem}"));
    }
    tunnel::identity::write_public_file(
        cert_path,
        format!("{}\n", response.certificate.trim()).as_bytes(),
        FileRole::Certificate,
    )
    .map_err(|e| {
        format!(
            "{e}; give the agent's user write access to {} or set `ssh_host_cert`",
            cert_path
                .parent()
                .map_or_else(|| cert_path.display(), Path::display)
        )
    })?;
    info!(
        host_cert = %cert_path.display(),
        principals = ?response.principals,
        expires = %humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(response.expires_unix)),
        "wrote the sshd host certificate; sshd uses it after its next start or reload"
    );
    Ok(())
}

async fn request(
    addr: &HostPort,
    tls: &Arc<rustls::ClientConfig>,
    host_key: &str,
) -> Result<HostCertResponse, String> {
    let conn = net::connect_tls(addr, tls.clone(), ALPN_HOSTCERT)
        .await
        .map_err(|e| e.to_string())?;
    let (mut reader, mut writer) = conn.split();
    let request = HostCertRequest {
        host_key: host_key.to_owned(),
    };
    control::write_line(&mut writer, &request)
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = BytesMut::new();
    let response = control::read_reply::<HostCertResponse>(&mut reader, &mut buf)
        .await
        .map_err(|e| format!("the proxy refused the host certificate: {e}"))?;
    let _ = writer.close().await;
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ";

    fn key(seed: u8) -> ssh_key::PrivateKey {
        ssh_key::PrivateKey::from(ssh_key::private::Ed25519Keypair::from_seed(&[seed; 32]))
    }

    /// A host certificate of `host` for `principal`, valid from 1000 for 3000 seconds.
    fn cert(host: &ssh_key::PrivateKey, principal: &str) -> String {
        let mut builder = ssh_key::certificate::Builder::new(
            vec![0; 32],
            host.public_key().key_data().clone(),
            1000,
            4000,
        )
        .unwrap();
        builder.cert_type(CertType::Host).unwrap();
        builder.valid_principal(principal).unwrap();
        builder.sign(&key(9)).unwrap().to_openssh().unwrap()
    }

    /// Renewed when the key changed, the name differs, or two thirds of the validity passed.
    #[test]
    fn renews_for_another_key_another_name_or_two_thirds() {
        let host = key(1);
        let public = host.public_key();
        let ours = cert(&host, "node-r1");
        assert_eq!(renewal(public, Some(&ours), "node-r1", 2000), None);
        assert_eq!(renewal(public, Some(&ours), "node-r1", 2999), None);
        assert_eq!(
            renewal(public, Some(&ours), "node-r1", 3000),
            Some(Renew::Expiring)
        );
        assert_eq!(
            renewal(public, Some(&ours), "node-r1", 500),
            Some(Renew::Expiring)
        );
        assert_eq!(
            renewal(public, Some(&cert(&key(2), "node-r1")), "node-r1", 2000),
            Some(Renew::OtherKey)
        );
        assert_eq!(
            renewal(public, Some(&ours), "node-b", 2000),
            Some(Renew::OtherName)
        );
    }

    #[test]
    fn a_missing_or_foreign_certificate_is_renewed() {
        let key = PublicKey::from_openssh(KEY).unwrap();
        assert_eq!(renewal(&key, None, "n", 0), Some(Renew::Missing));
        assert!(matches!(
            renewal(&key, Some("garbage"), "n", 0),
            Some(Renew::Unreadable(_))
        ));
    }
}
