//! Key pairs. A private key never appears in `Debug` output or in an error message.

use std::fmt;

use rcgen::{KeyPair, PublicKeyData, SignatureAlgorithm};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::prelude::FromDer;

use super::error::IdentityError;

/// A private key (ECDSA P-256 when generated here). Its `Debug` prints `MASKED`.
pub struct PrivateKey {
    pair: KeyPair,
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(MASKED)")
    }
}

impl PrivateKey {
    /// Generates a new ECDSA P-256 key from the system random number generator.
    pub fn generate() -> Result<PrivateKey, IdentityError> {
        Ok(PrivateKey {
            pair: KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
        })
    }

    /// Parses a PKCS#8 PEM private key (`-----BEGIN PRIVATE KEY-----`). To read a file, use
    /// [`super::read_private_key`], which also checks the file's mode and names it in errors.
    pub fn from_pem(pem: &str) -> Result<PrivateKey, IdentityError> {
        use rustls_pki_types::pem::PemObject;
        let der =
            PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| IdentityError::BadKey {
                detail: format!("not a PEM private key ({e})"),
            })?;
        Self::from_der(&der)
    }

    /// Wraps a DER private key (PKCS#8: ECDSA P-256, P-384 or Ed25519).
    pub fn from_der(der: &PrivateKeyDer<'_>) -> Result<PrivateKey, IdentityError> {
        let pair = KeyPair::try_from(der).map_err(|e| IdentityError::BadKey {
            detail: e.to_string(),
        })?;
        Ok(PrivateKey { pair })
    }

    /// The public half, to put into a certificate.
    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            alg: self.pair.algorithm(),
            raw: self.pair.der_bytes().to_vec(),
        }
    }

    /// The key in the form rustls takes (PKCS#8 DER). Treat the result as secret.
    pub fn to_rustls(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.pair.serialize_der()))
    }

    /// PKCS#8 PEM, for [`super::write_private_file`] only.
    pub(crate) fn to_pem(&self) -> String {
        self.pair.serialize_pem()
    }

    pub(crate) fn key_pair(&self) -> &KeyPair {
        &self.pair
    }
}

/// A public key to certify: ECDSA P-256 (what Remoteler generates), ECDSA P-384 or Ed25519.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    alg: &'static SignatureAlgorithm,
    /// The subjectPublicKey bits (an EC point or an Ed25519 key).
    raw: Vec<u8>,
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PublicKey({})",
            super::CaPin::of_spki(&self.to_spki_der())
        )
    }
}

/// The algorithms whose keys we certify.
fn supported_algorithms() -> [&'static SignatureAlgorithm; 3] {
    [
        &rcgen::PKCS_ECDSA_P256_SHA256,
        &rcgen::PKCS_ECDSA_P384_SHA384,
        &rcgen::PKCS_ED25519,
    ]
}

impl PublicKey {
    /// Parses a DER SubjectPublicKeyInfo (what an agent sends when it asks to be certified).
    ///
    /// The encoding must be canonical: it is re-encoded and compared byte for byte, so the
    /// key that ends up in the certificate is exactly the one that was sent.
    pub fn from_spki_der(der: &[u8]) -> Result<PublicKey, IdentityError> {
        let (rest, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(der).map_err(|e| {
            IdentityError::BadKey {
                detail: format!("not a DER public key ({e})"),
            }
        })?;
        if !rest.is_empty() {
            return Err(IdentityError::BadKey {
                detail: "trailing bytes after the public key".into(),
            });
        }
        let raw = spki.subject_public_key.data.to_vec();
        supported_algorithms()
            .into_iter()
            .map(|alg| PublicKey {
                alg,
                raw: raw.clone(),
            })
            .find(|candidate| candidate.to_spki_der() == der)
            .ok_or_else(|| IdentityError::BadKey {
                detail: format!(
                    "unsupported public key algorithm {}",
                    spki.algorithm.algorithm
                ),
            })
    }

    /// The DER SubjectPublicKeyInfo.
    pub fn to_spki_der(&self) -> Vec<u8> {
        self.subject_public_key_info()
    }
}

impl PublicKeyData for PublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.alg
    }
}
