//! The cluster's SSH CAs: the user CA, an ed25519 key that signs OpenSSH user certificates,
//! and the host CA, which signs the nodes' sshd host keys ([`SshHostCa`]).
//!
//! An sshd whose `TrustedUserCAKeys` holds [`SshUserCa::public_line`] accepts a user who shows
//! a certificate from this CA, as any of the certificate's principals, and needs no
//! `authorized_keys`. The principals are the logins the user's roles permit
//! ([`crate::roles::Policy::logins_for`]), so a login outside the roles is refused by sshd
//! itself, whatever the proxy is told.
//!
//! The key is stored in the data directory as `ssh_user_ca.key`, OpenSSH private key format,
//! mode 0600. `remoteler-proxy init` creates it; for a data directory made by an older version,
//! the proxy creates it on its first start ([`SshUserCa::load_or_create`]). The host CA key
//! is `ssh_host_ca.key` beside it, made the same way.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ssh_key::certificate::{Builder, CertType};
use ssh_key::private::Ed25519Keypair;
use ssh_key::{LineEnding, PrivateKey, PublicKey};
use tunnel::identity::FileRole;

use crate::error::ProxyError;
use crate::util;

/// The file name of the user CA key in the data directory.
pub const SSH_USER_CA_FILE: &str = "ssh_user_ca.key";
/// The file name of the host CA key in the data directory.
pub const SSH_HOST_CA_FILE: &str = "ssh_host_ca.key";
/// Lifetime of a host certificate; the agent asks for a new one when two thirds of it have
/// passed (`agent::hostcert`), so a proxy that is down for days does not leave nodes without.
pub const HOST_CERT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// The extensions every certificate carries: what `ssh-keygen -s` grants by default, less X11
/// forwarding and `~/.ssh/rc`, which sessions through a tunnel do not need.
const EXTENSIONS: [&str; 3] = [
    "permit-agent-forwarding",
    "permit-port-forwarding",
    "permit-pty",
];

/// What distinguishes the two SSH CAs of a cluster: file, file role, comment.
#[derive(Debug, Clone, Copy)]
struct CaKind {
    file: &'static str,
    role: FileRole,
    /// `remoteler-user-ca` or `remoteler-host-ca`: the public key's comment, before `@CLUSTER`.
    comment: &'static str,
    /// For messages: "SSH user CA", "SSH host CA".
    what: &'static str,
}

const USER: CaKind = CaKind {
    file: SSH_USER_CA_FILE,
    role: FileRole::SshCaKey,
    comment: "remoteler-user-ca",
    what: "SSH user CA",
};

const HOST: CaKind = CaKind {
    file: SSH_HOST_CA_FILE,
    role: FileRole::SshHostCaKey,
    comment: "remoteler-host-ca",
    what: "SSH host CA",
};

/// One CA key of either kind: storage and the public line.
#[derive(Debug)]
struct CaKey {
    key: PrivateKey,
    cluster: String,
    kind: CaKind,
}

fn ssh_error(what: &str, e: ssh_key::Error) -> ProxyError {
    ProxyError::Other(format!("{what}: {e}"))
}

impl CaKey {
    fn generate(kind: CaKind, cluster: &str) -> Result<CaKey, ProxyError> {
        let seed = util::random_bytes::<32>().map_err(|_| {
            ProxyError::Other(format!("cannot get random bytes for the {} key", kind.what))
        })?;
        let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
        key.set_comment(format!("{}@{cluster}", kind.comment));
        Ok(CaKey {
            key,
            cluster: cluster.to_owned(),
            kind,
        })
    }

    fn save(&self, data_dir: &Path) -> Result<(), ProxyError> {
        let text = self
            .key
            .to_openssh(LineEnding::LF)
            .map_err(|e| ssh_error(&format!("cannot encode the {} key", self.kind.what), e))?;
        tunnel::identity::create_private_file(
            &data_dir.join(self.kind.file),
            text.as_bytes(),
            self.kind.role,
        )?;
        Ok(())
    }

    fn load(kind: CaKind, data_dir: &Path, cluster: &str) -> Result<CaKey, ProxyError> {
        let path = data_dir.join(kind.file);
        let bytes = tunnel::identity::read_private_file(&path, kind.role)?;
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
        Ok(CaKey {
            key,
            cluster: cluster.to_owned(),
            kind,
        })
    }

    fn load_or_create(
        kind: CaKind,
        data_dir: &Path,
        cluster: &str,
    ) -> Result<(CaKey, bool), ProxyError> {
        if data_dir.join(kind.file).exists() {
            return Ok((Self::load(kind, data_dir, cluster)?, false));
        }
        let ca = Self::generate(kind, cluster)?;
        ca.save(data_dir)?;
        Ok((ca, true))
    }

    fn public_line(&self) -> Result<String, ProxyError> {
        let mut public = self.key.public_key().clone();
        public.set_comment(format!("{}@{}", self.kind.comment, self.cluster));
        public.to_openssh().map_err(|e| {
            ssh_error(
                &format!("cannot encode the {} public key", self.kind.what),
                e,
            )
        })
    }

    /// Signs a certificate of `cert_type` for `public_key` (an OpenSSH public key line).
    #[allow(clippy::too_many_arguments)]
    fn sign(
        &self,
        cert_type: CertType,
        public_key: &str,
        key_id: &str,
        principals: &[String],
        extensions: &[&str],
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
            .cert_type(cert_type)
            .map_err(sign)?
            .key_id(key_id)
            .map_err(sign)?
            .comment(format!("{key_id}@{}", self.cluster))
            .map_err(sign)?;
        for principal in principals {
            builder.valid_principal(principal.as_str()).map_err(sign)?;
        }
        for extension in extensions {
            builder.extension(*extension, "").map_err(sign)?;
        }
        let certificate = builder.sign(&self.key).map_err(sign)?;
        certificate.to_openssh().map_err(sign)
    }
}

/// The SSH user CA.
#[derive(Debug)]
pub struct SshUserCa(CaKey);

impl SshUserCa {
    /// A new CA key for `cluster`.
    pub fn generate(cluster: &str) -> Result<SshUserCa, ProxyError> {
        CaKey::generate(USER, cluster).map(SshUserCa)
    }

    /// The key file in `data_dir`.
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(SSH_USER_CA_FILE)
    }

    /// Writes the key to `data_dir` atomically with mode 0600; refuses to overwrite an
    /// existing one.
    pub fn save(&self, data_dir: &Path) -> Result<(), ProxyError> {
        self.0.save(data_dir)
    }

    /// Reads the key from `data_dir`; refuses a file that others may read.
    pub fn load(data_dir: &Path, cluster: &str) -> Result<SshUserCa, ProxyError> {
        CaKey::load(USER, data_dir, cluster).map(SshUserCa)
    }

    /// Reads the key from `data_dir`, creating it first when the data directory predates SSH
    /// certificates; says whether it created it.
    pub fn load_or_create(data_dir: &Path, cluster: &str) -> Result<(SshUserCa, bool), ProxyError> {
        CaKey::load_or_create(USER, data_dir, cluster).map(|(ca, created)| (SshUserCa(ca), created))
    }

    /// The line for sshd's `TrustedUserCAKeys`: `ssh-ed25519 AAAA... remoteler-user-ca@CLUSTER`.
    pub fn public_line(&self) -> Result<String, ProxyError> {
        self.0.public_line()
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
        self.0.sign(
            CertType::User,
            public_key,
            user,
            principals,
            &EXTENSIONS,
            not_before,
            not_after,
        )
    }
}

/// The SSH host CA: signs the host keys of the nodes' sshds, so that a user's `ssh` verifies a
/// node by name instead of trusting its key on first use.
///
/// A client whose known_hosts holds `@cert-authority PATTERNS` + [`SshHostCa::public_line`]
/// accepts a host key certified by this CA for the name it dialled. The principals of a
/// certificate are the node's name and `NAME.CLUSTER` ([`host_principals`]); the name comes
/// from the node's TLS certificate (or the operator), never from what the node asks for.
#[derive(Debug)]
pub struct SshHostCa(CaKey);

/// A signed host certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCertificate {
    /// The `*-cert.pub` line.
    pub line: String,
    /// Its principals.
    pub principals: Vec<String>,
    /// End of validity.
    pub not_after: SystemTime,
}

/// The names a host certificate of `node` in `cluster` is valid for: the bare name (what
/// `ssh NODE` dials) and `NODE.CLUSTER` (the `HostKeyAlias` `remoteler config` and `remoteler
/// ssh` set, and what `ssh NODE.CLUSTER` dials).
pub fn host_principals(node: &str, cluster: &str) -> Vec<String> {
    vec![node.to_owned(), format!("{node}.{cluster}")]
}

impl SshHostCa {
    /// A new CA key for `cluster`.
    pub fn generate(cluster: &str) -> Result<SshHostCa, ProxyError> {
        CaKey::generate(HOST, cluster).map(SshHostCa)
    }

    /// The key file in `data_dir`.
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(SSH_HOST_CA_FILE)
    }

    /// Writes the key to `data_dir` atomically with mode 0600; refuses to overwrite an
    /// existing one.
    pub fn save(&self, data_dir: &Path) -> Result<(), ProxyError> {
        self.0.save(data_dir)
    }

    /// Reads the key from `data_dir`; refuses a file that others may read.
    pub fn load(data_dir: &Path, cluster: &str) -> Result<SshHostCa, ProxyError> {
        CaKey::load(HOST, data_dir, cluster).map(SshHostCa)
    }

    /// Reads the key from `data_dir`, creating it first when the data directory predates host
    /// certificates; says whether it created it.
    pub fn load_or_create(data_dir: &Path, cluster: &str) -> Result<(SshHostCa, bool), ProxyError> {
        CaKey::load_or_create(HOST, data_dir, cluster).map(|(ca, created)| (SshHostCa(ca), created))
    }

    /// The public key line, `ssh-ed25519 AAAA... remoteler-host-ca@CLUSTER`; a known_hosts
    /// line is `@cert-authority PATTERNS ` followed by it.
    pub fn public_line(&self) -> Result<String, ProxyError> {
        self.0.public_line()
    }

    /// The known_hosts line that trusts this CA for every node of the cluster:
    /// `@cert-authority *.CLUSTER ssh-ed25519 AAAA...`.
    pub fn known_hosts_line(&self) -> Result<String, ProxyError> {
        Ok(format!(
            "@cert-authority *.{} {}",
            self.0.cluster,
            self.public_line()?
        ))
    }

    /// Signs an OpenSSH host certificate for `host_key` (an sshd's `ssh_host_*_key.pub` line)
    /// as node `node`: principals [`host_principals`], key id `node`, valid from `now` (less a
    /// minute for clock skew) for `ttl`. `node` must be the name the caller authenticated
    /// (the node's TLS certificate) or the operator named.
    pub fn issue_host(
        &self,
        host_key: &str,
        node: &str,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<HostCertificate, SshCertError> {
        config::NodeName::new(node).map_err(|e| SshCertError::BadNodeName(e.to_string()))?;
        let principals = host_principals(node, &self.0.cluster);
        let not_before = now.checked_sub(CLOCK_SKEW).unwrap_or(now);
        let not_after = now + ttl;
        let line = self.0.sign(
            CertType::Host,
            host_key,
            node,
            &principals,
            &[],
            not_before,
            not_after,
        )?;
        Ok(HostCertificate {
            line,
            principals,
            not_after,
        })
    }
}

/// How far before "now" a host certificate's validity starts: a node whose clock is a little
/// behind the proxy's still accepts it.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

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
    /// The node name is not one the cluster accepts.
    #[error("bad node name: {0}")]
    BadNodeName(String),
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
            ca.0.key.public_key().key_data(),
            "signed by the CA"
        );
        let fingerprint = ca.0.key.public_key().fingerprint(Default::default());
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

    /// A host certificate names the node it was issued for and nothing else: the principals
    /// are the node's name and NAME.CLUSTER, whatever the host key's comment says.
    #[test]
    fn signs_a_host_certificate_for_the_node_name_only() {
        let ca = SshHostCa::generate("example.com").unwrap();
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let host_key = format!("{} node-b.example.com", user_key());
        let cert = ca
            .issue_host(&host_key, "node-r1", now, HOST_CERT_TTL)
            .unwrap();
        assert_eq!(cert.principals, ["node-r1", "node-r1.example.com"]);
        let parsed = ssh_key::Certificate::from_openssh(&cert.line).unwrap();
        assert_eq!(parsed.cert_type(), CertType::Host);
        assert_eq!(parsed.key_id(), "node-r1");
        assert_eq!(parsed.valid_principals(), &cert.principals[..]);
        assert_eq!(parsed.valid_after(), 1_800_000_000 - 60);
        assert_eq!(
            parsed.valid_before(),
            1_800_000_000 + HOST_CERT_TTL.as_secs()
        );
        assert!(parsed.extensions().is_empty());
        let fingerprint = ca.0.key.public_key().fingerprint(Default::default());
        parsed.validate_at(1_800_000_100, [&fingerprint]).unwrap();
        assert!(
            ca.known_hosts_line()
                .unwrap()
                .starts_with("@cert-authority *.example.com ssh-ed25519 AAAA")
        );
        // A pattern character or a list would widen what the certificate covers.
        for bad in ["*", "node-r1,node-b", "!node-b", ""] {
            assert!(
                matches!(
                    ca.issue_host(&host_key, bad, now, HOST_CERT_TTL),
                    Err(SshCertError::BadNodeName(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_host_ca_is_a_separate_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let (user, _) = SshUserCa::load_or_create(dir.path(), "c").unwrap();
        let (host, created) = SshHostCa::load_or_create(dir.path(), "c").unwrap();
        assert!(created);
        assert_ne!(user.public_line().unwrap(), host.public_line().unwrap());
        assert!(
            host.public_line()
                .unwrap()
                .ends_with(" remoteler-host-ca@c")
        );
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(SshHostCa::path(dir.path()))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let (again, created) = SshHostCa::load_or_create(dir.path(), "c").unwrap();
        assert!(!created);
        assert_eq!(again.public_line().unwrap(), host.public_line().unwrap());
    }
}
