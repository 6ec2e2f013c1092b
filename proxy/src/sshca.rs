//! The cluster's SSH user CA: an ed25519 key that signs OpenSSH user certificates.
//!
//! An sshd whose `TrustedUserCAKeys` holds [`SshUserCa::public_line`] accepts a user who shows
//! a certificate from this CA, as any of the certificate's principals, and needs no
//! `authorized_keys`. The principals are the logins the user's roles permit
//! ([`crate::roles::Policy::logins_for`]), so a login outside the roles is refused by sshd
//! itself, whatever the proxy is told.
//!
//! The key is stored in the data directory as `ssh_user_ca.key`, OpenSSH private key format,
//! mode 0600. `remoteler-proxy init` creates it; for a data directory made by an older version,
//! the proxy creates it on its first start ([`SshUserCa::load_or_create`]).

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use ssh_key::certificate::{Builder, CertType};
use ssh_key::private::Ed25519Keypair;
use ssh_key::{LineEnding, PrivateKey, PublicKey};
use tunnel::identity::FileRole;

use crate::error::ProxyError;
use crate::util;

/// The file name of the key in the data directory.
pub const SSH_USER_CA_FILE: &str = "ssh_user_ca.key";

/// The extensions every certificate carries: what `ssh-keygen -s` grants by default, less X11
/// forwarding and `~/.ssh/rc`, which sessions through a tunnel do not need.
const EXTENSIONS: [&str; 3] = [
    "permit-agent-forwarding",
    "permit-port-forwarding",
    "permit-pty",
];

/// The SSH user CA.
#[derive(Debug)]
pub struct SshUserCa {
    key: PrivateKey,
    cluster: String,
}

fn ssh_error(what: &str, e: ssh_key::Error) -> ProxyError {
    ProxyError::Other(format!("{what}: {e}"))
}

impl SshUserCa {
    /// A new CA key for `cluster`.
    pub fn generate(cluster: &str) -> Result<SshUserCa, ProxyError> {
        let seed = util::random_bytes::<32>().map_err(|_| {
            ProxyError::Other("cannot get random bytes for the SSH user CA key".into())
        })?;
        let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
        key.set_comment(comment(cluster));
        Ok(SshUserCa {
            key,
            cluster: cluster.to_owned(),
        })
    }

    /// The key file in `data_dir`.
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(SSH_USER_CA_FILE)
    }

    /// Writes the key to `data_dir` atomically with mode 0600; refuses to overwrite an
    /// existing one.
    pub fn save(&self, data_dir: &Path) -> Result<(), ProxyError> {
        let text = self
            .key
            .to_openssh(LineEnding::LF)
            .map_err(|e| ssh_error("cannot encode the SSH user CA key", e))?;
        tunnel::identity::create_private_file(
            &Self::path(data_dir),
            text.as_bytes(),
            FileRole::SshCaKey,
        )?;
        Ok(())
    }

    /// Reads the key from `data_dir`; refuses a file that others may read.
    pub fn load(data_dir: &Path, cluster: &str) -> Result<SshUserCa, ProxyError> {
        let path = Self::path(data_dir);
        let bytes = tunnel::identity::read_private_file(&path, FileRole::SshCaKey)?;
        let key = PrivateKey::from_openssh(bytes).map_err(|e| {
            ProxyError::Other(format!(
                "{} is not an OpenSSH private key ({e}); restore it from a backup",
                path.display()
            ))
        })?;
        if !matches!(key.algorithm(), ssh_key::Algorithm::Ed25519) || key.is_encrypted() {
            return Err(ProxyError::Other(format!(
                "{} must hold an unencrypted ed25519 key, not {} ",
                path.display(),
                key.algorithm()
            )));
        }
        Ok(SshUserCa {
            key,
            cluster: cluster.to_owned(),
        })
    }

    /// Reads the key from `data_dir`, creating it first when the data directory predates SSH
    /// certificates; says whether it created it.
    pub fn load_or_create(data_dir: &Path, cluster: &str) -> Result<(SshUserCa, bool), ProxyError> {
        if Self::path(data_dir).exists() {
            return Ok((Self::load(data_dir, cluster)?, false));
        }
        let ca = Self::generate(cluster)?;
        ca.save(data_dir)?;
        Ok((ca, true))
    }

    /// The line for sshd's `TrustedUserCAKeys`: `ssh-ed25519 AAAA... remoteler-user-ca@CLUSTER`.
    pub fn public_line(&self) -> Result<String, ProxyError> {
        let mut public = self.key.public_key().clone();
        public.set_comment(comment(&self.cluster));
        public
            .to_openssh()
            .map_err(|e| ssh_error("cannot encode the SSH user CA public key", e))
    }

    /// Signs an OpenSSH user certificate for `public_key` (an `authorized_keys`-style line):
    /// key id `user`, the given principals (at least one: a certificate without principals
    /// would be valid for every login), valid from `not_before` to `not_after`. Returns the
    /// certificate as a `*-cert.pub` line.
    pub fn issue(
        &self,
        public_key: &str,
        user: &str,
        principals: &[String],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<String, SshCertError> {
        if principals.is_empty() {
            return Err(SshCertError::NoPrincipals);
        }
        let subject = PublicKey::from_openssh(public_key.trim())
            .map_err(|e| SshCertError::BadPublicKey(e.to_string()))?;
        let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let nonce = util::random_bytes::<32>()
            .map_err(|_| SshCertError::Sign("no random bytes for the nonce".into()))?;
        let serial = u64::from_be_bytes(
            util::random_bytes::<8>()
                .map_err(|_| SshCertError::Sign("no random bytes for the serial".into()))?,
        );
        let sign = |e: ssh_key::Error| SshCertError::Sign(e.to_string());
        let mut builder = Builder::new(
            nonce.to_vec(),
            subject.key_data().clone(),
            secs(not_before),
            secs(not_after),
        )
        .map_err(sign)?;
        builder
            .serial(serial)
            .map_err(sign)?
            .cert_type(CertType::User)
            .map_err(sign)?
            .key_id(user)
            .map_err(sign)?
            .comment(format!("{user}@{}", self.cluster))
            .map_err(sign)?;
        for principal in principals {
            builder.valid_principal(principal.as_str()).map_err(sign)?;
        }
        for extension in EXTENSIONS {
            builder.extension(extension, "").map_err(sign)?;
        }
        let certificate = builder.sign(&self.key).map_err(sign)?;
        certificate.to_openssh().map_err(sign)
    }
}

fn comment(cluster: &str) -> String {
    format!("remoteler-user-ca@{cluster}")
}

/// Why no SSH certificate was issued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SshCertError {
    /// The roles permit no login.
    #[error(
        "the user's roles permit no SSH login, and a certificate without principals would be \
         valid for every login"
    )]
    NoPrincipals,
    /// The key sent is not an OpenSSH public key.
    #[error(
        "ssh_public_key is not an OpenSSH public key line ({0}); send e.g. \"ssh-ed25519 AAAA...\""
    )]
    BadPublicKey(String),
    /// Signing failed.
    #[error("cannot sign the SSH certificate: {0}")]
    Sign(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn user_key() -> String {
        let seed = util::random_bytes::<32>().unwrap();
        PrivateKey::from(Ed25519Keypair::from_seed(&seed))
            .public_key()
            .to_openssh()
            .unwrap()
    }

    #[test]
    fn signs_a_user_certificate_with_the_principals_and_validity() {
        let ca = SshUserCa::generate("example.com").unwrap();
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let later = now + Duration::from_secs(3600);
        let line = ca
            .issue(
                &user_key(),
                "alice",
                &["root".into(), "pi".into()],
                now,
                later,
            )
            .unwrap();
        assert!(
            line.starts_with("ssh-ed25519-cert-v01@openssh.com "),
            "{line}"
        );
        let cert = ssh_key::Certificate::from_openssh(&line).unwrap();
        assert_eq!(cert.cert_type(), CertType::User);
        assert_eq!(cert.key_id(), "alice");
        assert_eq!(
            cert.valid_principals(),
            &["root".to_owned(), "pi".to_owned()]
        );
        assert_eq!(cert.valid_after(), 1_800_000_000);
        assert_eq!(cert.valid_before(), 1_800_003_600);
        assert!(cert.extensions().contains_key("permit-pty"));
        assert_eq!(
            cert.signature_key(),
            ca.key.public_key().key_data(),
            "signed by the CA"
        );
        let fingerprint = ca.key.public_key().fingerprint(Default::default());
        cert.validate_at(1_800_000_100, [&fingerprint]).unwrap();
        assert!(ca.public_line().unwrap().starts_with("ssh-ed25519 AAAA"));
        assert!(
            ca.public_line()
                .unwrap()
                .ends_with(" remoteler-user-ca@example.com")
        );
    }

    /// OpenSSH's own parser reads what we sign (scripts/test.sh installs openssh-client;
    /// scripts/e2e-roles.sh then has a real sshd accept it).
    #[test]
    fn ssh_keygen_reads_the_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let ca = SshUserCa::generate("example.com").unwrap();
        let now = SystemTime::now();
        let line = ca
            .issue(
                &user_key(),
                "alice",
                &["root".into(), "ubuntu".into()],
                now,
                now + Duration::from_secs(600),
            )
            .unwrap();
        let path = dir.path().join("ssh_key-cert.pub");
        std::fs::write(&path, format!("{line}\n")).unwrap();
        let out = std::process::Command::new("ssh-keygen")
            .arg("-L")
            .arg("-f")
            .arg(&path)
            .output()
            .expect("ssh-keygen runs (install openssh-client)");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("Type: ssh-ed25519-cert-v01@openssh.com user certificate"),
            "{text}"
        );
        assert!(text.contains("Key ID: \"alice\""), "{text}");
        assert!(
            text.contains("Principals: \n                root\n                ubuntu\n"),
            "{text}"
        );
        assert!(text.contains("permit-pty"), "{text}");
        assert!(!text.contains("permit-X11-forwarding"), "{text}");
    }

    #[test]
    fn a_key_file_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        SshUserCa::generate("c").unwrap().save(dir.path()).unwrap();
        let path = SshUserCa::path(dir.path());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = SshUserCa::load(dir.path(), "c").unwrap_err().to_string();
        assert!(err.contains("SSH user CA key"), "{err}");
    }

    #[test]
    fn refuses_an_empty_principal_list_and_a_bad_key() {
        let ca = SshUserCa::generate("c").unwrap();
        let now = SystemTime::now();
        assert_eq!(
            ca.issue(&user_key(), "a", &[], now, now),
            Err(SshCertError::NoPrincipals)
        );
        assert!(matches!(
            ca.issue("ssh-ed25519 !!!", "a", &["root".into()], now, now),
            Err(SshCertError::BadPublicKey(_))
        ));
    }

    #[test]
    fn saves_with_mode_0600_loads_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, created) = SshUserCa::load_or_create(dir.path(), "c").unwrap();
        assert!(created);
        let path = SshUserCa::path(dir.path());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let (again, created) = SshUserCa::load_or_create(dir.path(), "c").unwrap();
        assert!(!created);
        assert_eq!(again.public_line().unwrap(), ca.public_line().unwrap());
        assert!(ca.save(dir.path()).is_err());
    }
}
