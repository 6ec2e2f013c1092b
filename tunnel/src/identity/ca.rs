//! The cluster CA: generate, save, load, issue.

use std::fmt;
use std::fs::DirBuilder;
use std::net::IpAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use x509_parser::der_parser::asn1_rs::Tag;
use x509_parser::prelude::FromDer;

use super::error::{FileRole, IdentityError, excerpt};
use super::files::{self, Replace};
use super::keys::{PrivateKey, PublicKey};
use super::names::{Claims, IdentityKind, validate_name};
use super::peer::CLOCK_SKEW_ALLOWANCE;
use super::pin::CaPin;

/// File name of the CA certificate in the data directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA private key in the data directory (mode 0600).
pub const CA_KEY_FILE: &str = "ca.key";
/// Lifetime of a new cluster CA: ten years. There is no CA rotation yet, so it is long.
pub const CA_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Default lifetime of a user certificate from `remoteler login`: 12 hours.
pub const DEFAULT_USER_TTL: Duration = Duration::from_secs(12 * 3600);

/// Host names every proxy certificate is valid for, besides those the caller passes, so that
/// local tools and tests can always reach the proxy on loopback.
const ALWAYS_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];
/// Key usages of the CA certificate; also what the issuer is told it may do.
const CA_KEY_USAGES: [KeyUsagePurpose; 3] = [
    KeyUsagePurpose::KeyCertSign,
    KeyUsagePurpose::CrlSign,
    KeyUsagePurpose::DigitalSignature,
];
/// Random bytes in a serial number (RFC 5280 allows up to 20).
const SERIAL_LEN: usize = 16;

/// When a certificate is valid. Times are whole seconds (what X.509 stores), so a certificate
/// parsed back has exactly these times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    not_before: SystemTime,
    not_after: SystemTime,
}

impl Validity {
    /// From `now - CLOCK_SKEW_ALLOWANCE` to `now + ttl`. `now` is an argument so that tests
    /// and callers with a fake clock can use it; call sites pass `SystemTime::now()`.
    pub fn for_ttl(now: SystemTime, ttl: Duration) -> Result<Validity, IdentityError> {
        if ttl.is_zero() {
            return Err(IdentityError::InvalidValidity {
                detail: "the lifetime is zero".into(),
            });
        }
        let not_before = now.checked_sub(CLOCK_SKEW_ALLOWANCE);
        let not_after = now.checked_add(ttl);
        match (not_before, not_after) {
            (Some(not_before), Some(not_after)) => Validity::between(not_before, not_after),
            _ => Err(IdentityError::InvalidValidity {
                detail: format!("a lifetime of {} s from now is out of range", ttl.as_secs()),
            }),
        }
    }

    /// Exactly these times (rounded down to whole seconds), without backdating. Lets tests
    /// issue certificates that are already expired or not valid yet.
    pub fn between(
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Validity, IdentityError> {
        let not_before = whole_seconds(not_before)?;
        let not_after = whole_seconds(not_after)?;
        if not_after <= not_before {
            return Err(IdentityError::InvalidValidity {
                detail: "not_after must be later than not_before".into(),
            });
        }
        to_asn1_time(not_after)?;
        Ok(Validity {
            not_before,
            not_after,
        })
    }

    /// Start of validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
}

fn whole_seconds(t: SystemTime) -> Result<SystemTime, IdentityError> {
    let since_epoch =
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map_err(|_| IdentityError::InvalidValidity {
                detail: "times before 1970 are not supported".into(),
            })?;
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(since_epoch.as_secs()))
}

fn to_asn1_time(t: SystemTime) -> Result<time::OffsetDateTime, IdentityError> {
    let out_of_range = || IdentityError::InvalidValidity {
        detail: "a time is beyond the year 9999".into(),
    };
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|_| out_of_range())?
        .as_secs();
    let secs = i64::try_from(secs).map_err(|_| out_of_range())?;
    let t = time::OffsetDateTime::from_unix_timestamp(secs).map_err(|_| out_of_range())?;
    if t.year() > 9999 {
        return Err(out_of_range());
    }
    Ok(t)
}

/// A cluster's certificate authority: the key that signs every proxy, node, user and cluster
/// certificate of the cluster. `Debug` shows the cluster and the pin, never the key.
pub struct ClusterCa {
    cluster: String,
    cert: CertificateDer<'static>,
    /// What the issuer needs of the CA certificate: its subject and key usages.
    params: CertificateParams,
    key: PrivateKey,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa")
            .field("cluster", &self.cluster)
            .field("pin", &self.pin())
            .field("key", &"MASKED")
            .finish()
    }
}

fn ca_subject(cluster: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("{cluster} CA"));
    dn.push(DnType::OrganizationName, cluster);
    dn
}

fn random_serial() -> Result<SerialNumber, IdentityError> {
    let mut serial = [0u8; SERIAL_LEN];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut serial)
        .map_err(|_| IdentityError::Random)?;
    // Positive (top bit clear) and no leading zero byte, so the DER integer is exactly
    // SERIAL_LEN bytes and prints the same length every time.
    serial[0] = (serial[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&serial))
}

impl ClusterCa {
    /// A new CA for `cluster`, valid for [`CA_TTL`] from now.
    pub fn generate(cluster: &str) -> Result<ClusterCa, IdentityError> {
        Self::generate_with_validity(cluster, Validity::for_ttl(SystemTime::now(), CA_TTL)?)
    }

    /// A new CA for `cluster` with the given validity.
    pub fn generate_with_validity(
        cluster: &str,
        validity: Validity,
    ) -> Result<ClusterCa, IdentityError> {
        validate_name("cluster name", cluster)?;
        let key = PrivateKey::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = ca_subject(cluster);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = CA_KEY_USAGES.to_vec();
        params.not_before = to_asn1_time(validity.not_before)?;
        params.not_after = to_asn1_time(validity.not_after)?;
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(key.key_pair())?;
        Ok(ClusterCa {
            cluster: cluster.to_owned(),
            cert: cert.der().clone(),
            params,
            key,
        })
    }

    /// Loads `ca.crt` and `ca.key` from `dir`. Checks that the certificate is a Remoteler CA
    /// certificate, that the key belongs to it, and that the key file is not readable by
    /// other users.
    pub fn load(dir: &Path) -> Result<ClusterCa, IdentityError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let bad_cert = |detail: String| IdentityError::BadFile {
            what: FileRole::CaCertificate,
            path: cert_path.clone(),
            detail,
        };
        let mut certs = files::read_certificates(&cert_path, FileRole::CaCertificate)?;
        if certs.len() != 1 {
            return Err(bad_cert(format!(
                "it holds {} certificates, expected exactly one",
                certs.len()
            )));
        }
        let cert = certs.remove(0);
        let key = files::read_private_key(&key_path, FileRole::CaKey)?;

        let (rest, parsed) = x509_parser::certificate::X509Certificate::from_der(&cert)
            .map_err(|e| bad_cert(format!("cannot parse it ({e})")))?;
        if !rest.is_empty() {
            return Err(bad_cert("trailing bytes after the certificate".into()));
        }
        if !parsed.is_ca() {
            return Err(bad_cert(
                "it is not a CA certificate (basicConstraints CA:FALSE)".into(),
            ));
        }
        let cluster = ca_cluster_name(&parsed).map_err(bad_cert)?;
        if parsed.public_key().raw != key.public_key().to_spki_der().as_slice() {
            return Err(IdentityError::BadFile {
                what: FileRole::CaKey,
                path: key_path,
                detail: format!(
                    "it is not the key of the CA certificate {}; restore the pair from the same \
                     backup",
                    cert_path.display()
                ),
            });
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = ca_subject(&cluster);
        params.key_usages = CA_KEY_USAGES.to_vec();
        Ok(ClusterCa {
            cluster,
            cert,
            params,
            key,
        })
    }

    /// Writes `ca.key` (mode 0600, refusing to replace an existing one) and then `ca.crt` into
    /// `dir`, creating `dir` with mode 0700 if it is missing. Both writes are atomic.
    pub fn save(&self, dir: &Path) -> Result<(), IdentityError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| IdentityError::WriteFile {
                what: FileRole::Directory,
                path: dir.to_owned(),
                source,
            })?;
        files::write_atomic(
            &dir.join(CA_KEY_FILE),
            self.key.to_pem().as_bytes(),
            0o600,
            Replace::No,
            FileRole::CaKey,
        )?;
        files::write_public_file(
            &dir.join(CA_CERT_FILE),
            self.certificate_pem().as_bytes(),
            FileRole::CaCertificate,
        )
    }

    /// The cluster's name.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// The CA certificate (DER).
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The CA certificate as PEM text.
    pub fn certificate_pem(&self) -> String {
        files::certificates_to_pem(std::slice::from_ref(&self.cert))
    }

    /// The pin agents and users configure as `ca_pin`.
    pub fn pin(&self) -> CaPin {
        CaPin::of_spki(&self.key.public_key().to_spki_der())
    }

    /// `[leaf, CA certificate]`: the chain a server sends, so that a pinned client can learn
    /// the CA, and the chain a client sends.
    pub fn chain(&self, leaf: CertificateDer<'static>) -> Vec<CertificateDer<'static>> {
        vec![leaf, self.cert.clone()]
    }

    /// A proxy server certificate for `hosts` (DNS names or IP addresses) plus `localhost`,
    /// `127.0.0.1` and `::1`; extended key usage serverAuth.
    pub fn issue_proxy(
        &self,
        name: &str,
        hosts: &[impl AsRef<str>],
        key: &PublicKey,
        validity: Validity,
    ) -> Result<CertificateDer<'static>, IdentityError> {
        let mut sans = Vec::new();
        for host in ALWAYS_HOSTS
            .iter()
            .copied()
            .chain(hosts.iter().map(AsRef::as_ref))
        {
            let san = host_san(host)?;
            if !sans.contains(&san) {
                sans.push(san);
            }
        }
        self.issue(self.claims(IdentityKind::Proxy, name), sans, key, validity)
    }

    /// A node certificate for an agent that joined; extended key usage clientAuth.
    pub fn issue_node(
        &self,
        name: &str,
        key: &PublicKey,
        validity: Validity,
    ) -> Result<CertificateDer<'static>, IdentityError> {
        self.issue(
            self.claims(IdentityKind::Node, name),
            Vec::new(),
            key,
            validity,
        )
    }

    /// A user certificate carrying the user's roles and allowed logins; extended key usage
    /// clientAuth. Call sites use a short lifetime ([`DEFAULT_USER_TTL`]).
    pub fn issue_user(
        &self,
        name: &str,
        roles: &[String],
        logins: &[String],
        key: &PublicKey,
        validity: Validity,
    ) -> Result<CertificateDer<'static>, IdentityError> {
        let mut claims = self.claims(IdentityKind::User, name);
        claims.roles = roles.to_vec();
        claims.logins = logins.to_vec();
        self.issue(claims, Vec::new(), key, validity)
    }

    /// A cluster certificate: this (root) cluster's CA vouching for leaf cluster `name` when
    /// its proxy connects to ours; extended key usage clientAuth. Like every certificate this
    /// CA signs, its `O` is this cluster; the leaf's own name is the identity's name.
    pub fn issue_cluster(
        &self,
        name: &str,
        key: &PublicKey,
        validity: Validity,
    ) -> Result<CertificateDer<'static>, IdentityError> {
        self.issue(
            self.claims(IdentityKind::Cluster, name),
            Vec::new(),
            key,
            validity,
        )
    }

    fn claims(&self, kind: IdentityKind, name: &str) -> Claims {
        Claims {
            kind,
            cluster: self.cluster.clone(),
            name: name.to_owned(),
            roles: Vec::new(),
            logins: Vec::new(),
        }
    }

    fn issue(
        &self,
        claims: Claims,
        mut sans: Vec<SanType>,
        key: &PublicKey,
        validity: Validity,
    ) -> Result<CertificateDer<'static>, IdentityError> {
        claims.validate()?;
        let uri = claims.to_uri().try_into()?;
        sans.insert(0, SanType::URI(uri));

        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, claims.name.as_str());
        params
            .distinguished_name
            .push(DnType::OrganizationName, claims.cluster.as_str());
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, claims.kind.as_str());
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![match claims.kind {
            IdentityKind::Proxy => ExtendedKeyUsagePurpose::ServerAuth,
            _ => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        params.use_authority_key_identifier_extension = true;
        params.not_before = to_asn1_time(validity.not_before)?;
        params.not_after = to_asn1_time(validity.not_after)?;
        params.serial_number = Some(random_serial()?);

        let issuer = Issuer::from_params(&self.params, self.key.key_pair());
        Ok(params.signed_by(key, &issuer)?.der().clone())
    }
}

fn host_san(host: &str) -> Result<SanType, IdentityError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let invalid = || IdentityError::InvalidHost {
        value: excerpt(host),
    };
    if host.contains('*') {
        return Err(invalid());
    }
    let dns = rustls_pki_types::DnsName::try_from(host).map_err(|_| invalid())?;
    let lower = dns.as_ref().to_ascii_lowercase();
    Ok(SanType::DnsName(lower.try_into().map_err(|_| invalid())?))
}

/// The cluster name of a CA certificate we made: subject exactly `CN=<cluster> CA, O=<cluster>`
/// as UTF8Strings, which is also what `ca_subject` rebuilds for the issuer.
/// Checks that `der` is one CA certificate as `remoteler-proxy init` makes them
/// (basicConstraints CA:TRUE, subject `CN=<cluster> CA, O=<cluster>`) and returns its cluster name. A root uses it on the CA a leaf presents at its join.
pub fn ca_certificate_cluster(der: &[u8]) -> Result<String, IdentityError> {
    let bad = |detail: String| IdentityError::BadCertificate { detail };
    let (rest, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| bad(format!("cannot parse it ({e})")))?;
    if !rest.is_empty() {
        return Err(bad("trailing bytes after the certificate".into()));
    }
    if !cert.is_ca() {
        return Err(bad(
            "it is not a CA certificate (basicConstraints CA:FALSE)".into(),
        ));
    }
    ca_cluster_name(&cert).map_err(bad)
}

fn ca_cluster_name(cert: &x509_parser::certificate::X509Certificate<'_>) -> Result<String, String> {
    let not_ours = || {
        format!(
            "its subject {:?} is not `CN=<cluster> CA, O=<cluster>`; only CA certificates made \
             by remoteler-proxy are supported",
            excerpt(&cert.subject().to_string())
        )
    };
    let attrs: Vec<_> = cert.subject().iter_attributes().collect();
    let [cn, o] = attrs.as_slice() else {
        return Err(not_ours());
    };
    let (Some(cn_value), Some(cluster)) = (utf8(cn), utf8(o)) else {
        return Err(not_ours());
    };
    if *cn.attr_type() != x509_parser::oid_registry::OID_X509_COMMON_NAME
        || *o.attr_type() != x509_parser::oid_registry::OID_X509_ORGANIZATION_NAME
        || cn_value != format!("{cluster} CA")
        || validate_name("cluster name", cluster).is_err()
    {
        return Err(not_ours());
    }
    Ok(cluster.to_owned())
}

fn utf8<'a>(attr: &x509_parser::x509::AttributeTypeAndValue<'a>) -> Option<&'a str> {
    if attr.attr_value().tag() != Tag::Utf8String {
        return None;
    }
    attr.as_str().ok()
}
