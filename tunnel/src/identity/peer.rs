//! Who is on the other end: a [`PeerIdentity`] parsed from a certificate.

use std::time::{Duration, SystemTime};

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry::{
    OID_X509_COMMON_NAME, OID_X509_ORGANIZATION_NAME, OID_X509_ORGANIZATIONAL_UNIT,
};
use x509_parser::prelude::FromDer;
use x509_parser::x509::X509Name;

use super::error::{IdentityError, excerpt};
use super::names::{Claims, IdentityKind, URI_PREFIX};

/// How far back `notBefore` is set when a certificate is issued, so that a device whose clock
/// is this much behind the issuer's still accepts a brand-new certificate.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(5 * 60);

/// The identity a Remoteler certificate carries (see the module docs for the encoding).
///
/// [`PeerIdentity::from_der`] checks the encoding only. Whether the certificate is signed by
/// a CA we trust, and valid now, is checked by the TLS handshake (or
/// [`super::verify_client_chain`]); take identities only from certificates that passed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// What the certificate identifies.
    pub kind: IdentityKind,
    /// The node, user, proxy or (for [`IdentityKind::Cluster`]) leaf cluster name.
    pub name: String,
    /// The cluster whose CA issued the certificate.
    pub cluster: String,
    /// The user's roles (empty for other kinds).
    pub roles: Vec<String>,
    /// The OS logins the user may use (empty for other kinds).
    pub logins: Vec<String>,
    /// Start of validity (already backdated by [`CLOCK_SKEW_ALLOWANCE`] at issue).
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Serial number, lowercase hex without separators or leading zero bytes.
    pub serial: String,
}

impl PeerIdentity {
    /// Parses and checks the identity of a DER leaf certificate; rejects anything that does
    /// not follow the encoding exactly.
    pub fn from_der(der: &[u8]) -> Result<PeerIdentity, IdentityError> {
        let bad = |detail: String| IdentityError::NotAnIdentity { detail };
        let (rest, cert) =
            X509Certificate::from_der(der).map_err(|e| IdentityError::BadCertificate {
                detail: e.to_string(),
            })?;
        if !rest.is_empty() {
            return Err(IdentityError::BadCertificate {
                detail: "trailing bytes after the certificate".into(),
            });
        }
        if cert.is_ca() {
            return Err(bad("it is a CA certificate, not a leaf".into()));
        }

        let san = cert
            .subject_alternative_name()
            .map_err(|e| bad(format!("bad subject alternative names ({e})")))?
            .ok_or_else(|| bad("it has no subject alternative names".into()))?;
        let mut uris = san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::URI(uri) if has_scheme(uri) => Some(*uri),
                _ => None,
            });
        let (Some(uri), None) = (uris.next(), uris.next()) else {
            return Err(bad(
                "expected exactly one remoteler:// subject alternative name".into(),
            ));
        };
        let claims = Claims::from_uri(uri)?;

        let subject = subject_fields(cert.subject()).map_err(&bad)?;
        let expected = [
            claims.name.as_str(),
            claims.cluster.as_str(),
            claims.kind.as_str(),
        ];
        if subject != expected {
            return Err(bad(format!(
                "its subject (CN, O, OU) = {subject:?} disagrees with its identity URI {:?}",
                excerpt(uri)
            )));
        }
        let issuer_cluster =
            single(cert.issuer(), &OID_X509_ORGANIZATION_NAME, "issuer O").map_err(&bad)?;
        if issuer_cluster != claims.cluster {
            return Err(bad(format!(
                "it claims cluster {:?} but was issued by the CA of cluster {:?}",
                claims.cluster,
                excerpt(issuer_cluster)
            )));
        }

        let eku = cert
            .extended_key_usage()
            .map_err(|e| bad(format!("bad extended key usage ({e})")))?
            .map(|ext| ext.value);
        let (has_eku, wanted) = match claims.kind {
            IdentityKind::Proxy => (eku.is_some_and(|e| e.server_auth), "serverAuth"),
            _ => (eku.is_some_and(|e| e.client_auth), "clientAuth"),
        };
        if !has_eku {
            return Err(bad(format!(
                "a {} certificate needs extended key usage {wanted}",
                claims.kind
            )));
        }

        let validity = cert.validity();
        Ok(PeerIdentity {
            kind: claims.kind,
            name: claims.name,
            cluster: claims.cluster,
            roles: claims.roles,
            logins: claims.logins,
            not_before: from_timestamp(validity.not_before.timestamp()),
            not_after: from_timestamp(validity.not_after.timestamp()),
            serial: serial_hex(cert.raw_serial()),
        })
    }

    /// Checks the validity period against `now`, with errors that say which clock to fix.
    /// The TLS handshake already does this; this is for certificates used outside it and for
    /// telling a user that a stored certificate has expired before dialling.
    pub fn check_valid_at(&self, now: SystemTime) -> Result<(), IdentityError> {
        if now < self.not_before {
            return Err(IdentityError::NotYetValid {
                not_before: self.not_before,
                now,
            });
        }
        if now > self.not_after {
            return Err(IdentityError::Expired {
                not_after: self.not_after,
                now,
            });
        }
        Ok(())
    }
}

/// True for a URI whose scheme is `remoteler` in any letter case; a case variant then fails
/// the exact parse instead of being silently ignored.
fn has_scheme(uri: &str) -> bool {
    let scheme = &URI_PREFIX[..URI_PREFIX.len() - 2];
    uri.get(..scheme.len())
        .is_some_and(|s| s.eq_ignore_ascii_case(scheme))
}

/// `[CN, O, OU]` of a subject that has exactly these three attributes, once each.
fn subject_fields<'a>(name: &'a X509Name<'_>) -> Result<[&'a str; 3], String> {
    if name.iter_attributes().count() != 3 {
        return Err("its subject must have exactly CN, O and OU".into());
    }
    Ok([
        single(name, &OID_X509_COMMON_NAME, "subject CN")?,
        single(name, &OID_X509_ORGANIZATION_NAME, "subject O")?,
        single(name, &OID_X509_ORGANIZATIONAL_UNIT, "subject OU")?,
    ])
}

fn single<'a>(
    name: &'a X509Name<'_>,
    oid: &x509_parser::der_parser::oid::Oid<'static>,
    what: &str,
) -> Result<&'a str, String> {
    let mut values = name.iter_by_oid(oid);
    match (values.next(), values.next()) {
        (Some(value), None) => value
            .as_str()
            .map_err(|_| format!("its {what} is not a string")),
        _ => Err(format!("expected exactly one {what}")),
    }
}

fn from_timestamp(secs: i64) -> SystemTime {
    match u64::try_from(secs) {
        Ok(secs) => SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
        Err(_) => SystemTime::UNIX_EPOCH
            .checked_sub(Duration::from_secs(secs.unsigned_abs()))
            .unwrap_or(SystemTime::UNIX_EPOCH),
    }
}

fn serial_hex(raw: &[u8]) -> String {
    let start = raw
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    raw[start..].iter().map(|b| format!("{b:02x}")).collect()
}
