//! Cluster identities: the cluster CA, the certificates it issues to proxies, nodes, users and
//! other clusters, the `sha256:` CA pin, and the rustls configurations built from them. The
//! proxy, the agent and the `remoteler` client all use this module, so they agree on what a
//! certificate means.
//!
//! It does not decide who may do what (authorization lives in the proxy) and it does not talk
//! to the network: it turns certificates into [`PeerIdentity`] values and builds the rustls
//! configurations that `tunnel::tls` drives.
//!
//! # The cluster CA
//!
//! Every cluster has one CA: an ECDSA P-256 key and a self-signed certificate with subject
//! `CN=<cluster> CA, O=<cluster>`, `basicConstraints CA:TRUE, pathlen:0` (it signs leaf
//! certificates only) and key usage `keyCertSign, cRLSign, digitalSignature`. It lives in the
//! data directory as two PEM files:
//!
//! | file | contents | mode |
//! |---|---|---|
//! | `ca.crt` | the CA certificate | 0644 |
//! | `ca.key` | the CA private key, PKCS#8 | 0600 |
//!
//! Both are written atomically (temporary file in the same directory, `fsync`, `rename`,
//! `fsync` of the directory), so a crash leaves either the old file or the new one, never half
//! a file. [`ClusterCa::save`] refuses to replace an existing `ca.key`: losing it would cut off
//! every agent and user of the cluster. Private key files that other users can read are
//! refused on load (like OpenSSH does), with a message that says how to fix the mode.
//!
//! # Identity encoding
//!
//! A leaf certificate carries its identity twice, in two places that must agree exactly:
//!
//! * the subject: `CN=<name>, O=<cluster>, OU=<kind>` (human-readable, shows up in
//!   `openssl x509 -text` and in other tools), and
//! * exactly one URI subject alternative name with the scheme `remoteler`, the source of
//!   truth:
//!
//! ```text
//! remoteler://<cluster>/<kind>/<name>
//! remoteler://<cluster>/user/<name>?roles=<role>,<role>&logins=<login>,<login>
//! ```
//!
//! `<kind>` is one of `node`, `user`, `cluster`, `proxy`. Only `user` certificates carry the
//! query, and then always both keys, in that order; an empty list is written as nothing
//! (`roles=&logins=root`). Example: `remoteler://example.com/user/alice?roles=dev,ops&logins=root,ubuntu`.
//!
//! Every name (cluster, node, user, proxy, role, login) is 1 to [`MAX_NAME_LEN`] characters
//! from `[a-z0-9._-]`, and does not start with `.` or `-` (so a name is never a path like `..`
//! nor an option like `-oProxyCommand` when it reaches a shell command or a file name). None of
//! `/ ? & = ,` can occur in a name, so the URI splits without escaping and without ambiguity;
//! a list holds at most [`MAX_LIST_LEN`] entries and no duplicates. The parser
//! ([`PeerIdentity::from_der`]) rejects anything else: a second `remoteler` URI, a URI that
//! does not match the grammar, a subject that disagrees with the URI, a CA certificate, a
//! missing extended key usage (`serverAuth` for `proxy`, `clientAuth` for the others), and a
//! certificate whose issuer's `O` is not the cluster it claims. That last rule ties the
//! cluster name to the CA that signed the certificate: once the TLS layer has checked the
//! signature, a CA can only vouch for identities of its own cluster.
//!
//! Validity: `notBefore` is backdated by [`CLOCK_SKEW_ALLOWANCE`] (5 minutes) so that an edge
//! device whose clock is a little behind the proxy's still accepts a certificate issued a
//! moment ago; `notAfter` is the issue time plus the requested lifetime (users: 12 hours by
//! default, [`DEFAULT_USER_TTL`]). Serial numbers are 16 random bytes from the system random
//! number generator. A clock that is off by more than the allowance produces an error that
//! names both times and says to fix the clock ([`IdentityError::NotYetValid`],
//! [`IdentityError::Expired`]).
//!
//! # The CA pin
//!
//! `ca_pin = "sha256:<64 lowercase hex digits>"` is the SHA-256 digest of the DER encoding of
//! the CA certificate's **SubjectPublicKeyInfo** (not of the whole certificate), the same
//! definition as HPKP and `kubeadm --discovery-token-ca-cert-hash`. Hashing the public key
//! rather than the certificate keeps the pin valid when the CA certificate is re-issued with
//! the same key (for example to extend its lifetime). Compute it with
//!
//! ```text
//! openssl x509 -in ca.crt -pubkey -noout | openssl pkey -pubin -outform der | sha256sum
//! ```
//!
//! Uppercase hex digits are accepted on input; the pin is always printed in lowercase.
//!
//! A first contact (an agent joining with a token, a user's first login) uses
//! [`client_config_pinned`]: the server must send its CA certificate in its chain (the proxy
//! always sends `[leaf, CA]`); the client accepts the server only if one certificate of that
//! chain has the pinned public key **and** the leaf is validly signed by that certificate for
//! the name the client dialled, with the usual TLS handshake signature checks. A
//! man-in-the-middle can copy the CA certificate but cannot sign a leaf with it, so it is
//! refused. The CA certificate learned this way ([`LearnedCa`]) is stored by the client and
//! used with [`client_config_trusting`] from then on.
//!
//! # TLS
//!
//! Only TLS 1.3 is offered (all three programs are ours; TLS 1.2 would only add code paths),
//! with rustls' `ring` provider. The proxy's tunnel and user listeners use
//! [`ClientAuth::Required`] (mutual TLS against the cluster CA, plus the CA of a trusted root
//! cluster where one is configured); login and join use [`ClientAuth::Optional`], where a
//! request without a certificate must carry a token or a password instead.
//!
//! # What is not here (yet)
//!
//! Revocation (CRLs): certificates are short-lived instead. CA rotation. OpenSSH user
//! certificates. Signing requests with proof of possession: the proxy certifies a public key
//! sent over a TLS connection that was authenticated with a join token or a password.

mod ca;
mod error;
mod files;
mod keys;
mod names;
mod peer;
mod pin;
mod tls_config;

pub use ca::{
    CA_CERT_FILE, CA_KEY_FILE, CA_TTL, ClusterCa, DEFAULT_USER_TTL, Validity,
    ca_certificate_cluster,
};
pub use error::{FileRole, IdentityError};
pub use files::{
    certificates_to_pem, create_private_file, read_certificates, read_private_file,
    read_private_key, write_private_file, write_public_file,
};
pub use keys::{PrivateKey, PublicKey};
pub use names::{IdentityKind, MAX_LIST_LEN, MAX_NAME_LEN, validate_name};
pub use peer::{CLOCK_SKEW_ALLOWANCE, PeerIdentity};
pub use pin::CaPin;
pub use tls_config::{
    ClientAuth, LearnedCa, TlsIdentity, client_config_pinned, client_config_trusting,
    server_config, verify_client_chain,
};
