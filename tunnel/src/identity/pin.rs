//! The `sha256:` CA pin.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};
use x509_parser::prelude::FromDer;

use super::error::{IdentityError, excerpt};

/// A pin of a cluster CA: `sha256:` and the lowercase hex SHA-256 of the DER
/// SubjectPublicKeyInfo of the CA certificate (see the module docs for why the public key and
/// not the whole certificate).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CaPin([u8; 32]);

impl CaPin {
    const PREFIX: &'static str = "sha256:";

    /// The pin of a DER certificate's public key.
    pub fn of_certificate(der: &[u8]) -> Result<CaPin, IdentityError> {
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).map_err(|e| {
            IdentityError::BadCertificate {
                detail: e.to_string(),
            }
        })?;
        Ok(CaPin::of_spki(cert.public_key().raw))
    }

    /// The pin of a DER SubjectPublicKeyInfo.
    pub fn of_spki(spki_der: &[u8]) -> CaPin {
        CaPin(Sha256::digest(spki_der).into())
    }

    /// The 32 digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for CaPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(Self::PREFIX)?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for CaPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaPin({self})")
    }
}

impl FromStr for CaPin {
    type Err = IdentityError;

    /// Accepts `sha256:` followed by exactly 64 hex digits (either case); nothing else, not
    /// even surrounding white space.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || IdentityError::InvalidPin { found: excerpt(s) };
        let hex = s.strip_prefix(Self::PREFIX).ok_or_else(invalid)?.as_bytes();
        if hex.len() != 64 {
            return Err(invalid());
        }
        let mut digest = [0u8; 32];
        for (byte, pair) in digest.iter_mut().zip(hex.chunks_exact(2)) {
            let (Some(hi), Some(lo)) = (hex_value(pair[0]), hex_value(pair[1])) else {
                return Err(invalid());
            };
            *byte = hi << 4 | lo;
        }
        Ok(CaPin(digest))
    }
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}
