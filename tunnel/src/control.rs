//! What a TLS connection to the proxy is for, chosen by ALPN, and the small JSON requests
//! that run before (or instead of) the frame protocol.
//!
//! | ALPN                  | client certificate | then                                         |
//! |-----------------------|--------------------|----------------------------------------------|
//! | `remoteler-join/1`    | none               | one [`JoinRequest`] → [`JoinResponse`]       |
//! | `remoteler-cluster-join/1` | none          | one [`ClusterJoinRequest`] → [`JoinResponse`] |
//! | `remoteler-login/1`   | none               | one [`LoginRequest`] → [`LoginResponse`]     |
//! | `remoteler-tunnel/1`  | node (or cluster)  | the frame protocol; the agent is the dialer  |
//! | `remoteler-session/1` | user               | the frame protocol; one OPEN per connection  |
//! | `remoteler-register/1`| node               | [`RegisterRequest`] heartbeats → [`Ack`]     |
//! | `remoteler-api/1`     | user               | one [`ApiRequest`] → [`ApiResponse`]         |
//! | `remoteler-hostcert/1`| node               | one [`HostCertRequest`] → [`HostCertResponse`] |
//!
//! A JSON message is one line of at most [`MAX_REQUEST_BYTES`] (its newline not counted),
//! answered by one line holding either `{"ok": ...}` or `{"error": {"code": ..., "message":
//! ...}}`. The proxy reads at most one request line before authentication and under the
//! handshake deadline, so an unauthenticated peer can make it hold at most that many bytes
//! plus what one read of the TLS connection returns. The fuzz target `control_lines` checks
//! the line splitting ([`take_line`]) and parsing ([`parse_line`]) on arbitrary bytes in
//! arbitrary reads.

use bytes::BytesMut;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::tls::{TlsError, TlsReader, TlsWriter};

/// ALPN of a join (token → node certificate).
pub const ALPN_JOIN: &[u8] = b"remoteler-join/1";
/// ALPN of a leaf cluster's join (trusted-cluster token → cluster certificate), on the root's
/// tunnel listener.
pub const ALPN_CLUSTER_JOIN: &[u8] = b"remoteler-cluster-join/1";
/// ALPN of a login (password → user certificate).
pub const ALPN_LOGIN: &[u8] = b"remoteler-login/1";
/// ALPN of an agent's (or leaf cluster's) reverse tunnel.
pub const ALPN_TUNNEL: &[u8] = b"remoteler-tunnel/1";
/// ALPN of a user's session leg (one stream to a node).
pub const ALPN_SESSION: &[u8] = b"remoteler-session/1";
/// ALPN of a directly dialled node's registration heartbeats (auth listener).
pub const ALPN_REGISTER: &[u8] = b"remoteler-register/1";
/// ALPN of a user's queries (list nodes, clusters).
pub const ALPN_API: &[u8] = b"remoteler-api/1";

/// ALPN of a node's request for an SSH host certificate (tunnel and auth listeners).
pub const ALPN_HOSTCERT: &[u8] = b"remoteler-hostcert/1";

/// Longest JSON line accepted: a join or login request is a few hundred bytes; 64 KiB
/// leaves room for a large node list in a response while capping what a peer can send.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Join: an agent trades a join token for a node certificate on its own key.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// The join token (secret; never logged).
    pub token: String,
    /// The node name to be certified.
    pub node: String,
    /// The agent's public key, SubjectPublicKeyInfo DER, hex.
    pub public_key: String,
}

impl std::fmt::Debug for JoinRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinRequest")
            .field("node", &self.node)
            .field("token", &"MASKED")
            .finish()
    }
}

impl JoinRequest {
    /// For logs: everything but the token.
    pub fn redacted(&self) -> String {
        format!("join request for node {:?} (token MASKED)", self.node)
    }
}

/// Cluster join: a leaf cluster's proxy trades a `trusted-cluster` token for a cluster
/// certificate (kind cluster, named after the leaf) signed by the root's CA, on its own key.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClusterJoinRequest {
    /// The join token (secret; never logged).
    pub token: String,
    /// The leaf's cluster name.
    pub cluster: String,
    /// The leaf's CA certificate, PEM (the root records it).
    pub ca_pem: String,
    /// The leaf proxy's public key for the cluster certificate, SubjectPublicKeyInfo DER, hex.
    pub public_key: String,
    /// Proof that the leaf holds the key of `ca_pem` (whose certificate anyone who reaches the
    /// leaf can copy): a short-lived `cluster` certificate, PEM, that the leaf's CA issued for
    /// `public_key`, named after the root cluster.
    #[serde(default)]
    pub ca_proof_pem: String,
    /// The leaf's SSH host CA public key (`ssh-ed25519 AAAA...`): the root hands it to its
    /// users for the leaf's node names only (`*.LEAF` in their known_hosts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_host_ca: Option<String>,
}

impl std::fmt::Debug for ClusterJoinRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterJoinRequest")
            .field("cluster", &self.cluster)
            .field("token", &"MASKED")
            .finish_non_exhaustive()
    }
}

/// The node certificate chain and the cluster CA.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct JoinResponse {
    /// Cluster name.
    pub cluster: String,
    /// The node certificate chain (leaf, CA), PEM.
    pub certificate_pem: String,
    /// The cluster CA certificate, PEM.
    pub ca_pem: String,
}

/// Login: a user trades a password for a short-lived user certificate on its own key.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    /// User name.
    pub user: String,
    /// Password (secret; never logged).
    pub password: String,
    /// The client's public key, SubjectPublicKeyInfo DER, hex.
    pub public_key: String,
    /// Requested lifetime in seconds; the proxy caps it.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// The client's SSH public key, an OpenSSH line (`ssh-ed25519 AAAA...`), for an SSH user
    /// certificate; absent, none is issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_public_key: Option<String>,
    /// Asks for the cluster's SSH host CA in the answer (a client from before host
    /// certificates does not ask, and gets the answer it knows).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ssh_host_ca: bool,
}

impl std::fmt::Debug for LoginRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginRequest")
            .field("user", &self.user)
            .field("password", &"MASKED")
            .field("ttl_secs", &self.ttl_secs)
            .field("ssh_public_key", &self.ssh_public_key)
            .field("ssh_host_ca", &self.ssh_host_ca)
            .finish()
    }
}

/// The user certificate chain and the cluster CA.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LoginResponse {
    /// Cluster name.
    pub cluster: String,
    /// The user certificate chain (leaf, CA), PEM.
    pub certificate_pem: String,
    /// The cluster CA certificate, PEM.
    pub ca_pem: String,
    /// Expiry, seconds since the Unix epoch.
    pub expires_unix: u64,
    /// The user's roles.
    pub roles: Vec<String>,
    /// The OpenSSH user certificate for the request's `ssh_public_key` (a `*-cert.pub` line),
    /// signed by the cluster's SSH user CA; same validity as the X.509 certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_certificate: Option<String>,
    /// Its principals: the SSH logins the user's roles permit (empty without a certificate).
    /// Like the other `ssh_*` fields, absent from the JSON when empty, so a client that asks
    /// for no SSH certificate gets the answer it knew before SSH certificates existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_logins: Vec<String>,
    /// Why no SSH certificate was issued although one was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_note: Option<String>,
    /// The cluster's SSH host CA public key (`ssh-ed25519 AAAA... remoteler-host-ca@CLUSTER`)
    /// for the client's known_hosts, when the request set `ssh_host_ca`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_host_ca: Option<String>,
}

/// A heartbeat of a node the proxy dials directly (agent given the auth address).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// The address (host:port) the proxy should dial for the node's sshd.
    pub ssh_address: String,
    /// Labels.
    #[serde(default)]
    pub labels: Vec<(String, String)>,
    /// Seconds until the proxy should consider the node offline without another heartbeat.
    pub ttl_secs: u64,
}

/// A node asks for an OpenSSH host certificate for the host key of the sshd it serves. The
/// certificate's principals come from the node's TLS certificate, not from the request: there
/// is no field to name them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HostCertRequest {
    /// The sshd's host public key, an OpenSSH line (`ssh-ed25519 AAAA...`).
    pub host_key: String,
}

/// The host certificate.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HostCertResponse {
    /// The `*-cert.pub` line for sshd's `HostCertificate`.
    pub certificate: String,
    /// The names it is valid for: the node's name and `NAME.CLUSTER`.
    pub principals: Vec<String>,
    /// Expiry, seconds since the Unix epoch.
    pub expires_unix: u64,
}

/// An empty success.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct Ack {}

/// A user's query.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum ApiRequest {
    /// Nodes of this cluster (or of a trusted leaf cluster).
    ListNodes {
        /// Leaf cluster name; `None` for this cluster.
        #[serde(default)]
        cluster: Option<String>,
    },
    /// Who the proxy thinks the caller is.
    WhoAmI,
    /// The trusted leaf clusters the caller may reach.
    ListClusters,
    /// The SSH host CAs of the trusted leaf clusters the caller may reach, for known_hosts.
    SshHostCas,
}

/// One trusted leaf cluster as a user sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClusterView {
    /// The leaf's name.
    pub name: String,
    /// Whether its proxy holds a tunnel to this one now.
    pub online: bool,
    /// Nodes it announces.
    pub nodes: usize,
}

/// One node as a user sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeView {
    /// Node name.
    pub name: String,
    /// `tunnel` or `direct`.
    pub via: String,
    /// Whether it can be reached now.
    pub online: bool,
    /// Labels.
    pub labels: Vec<(String, String)>,
}

/// Answer to an [`ApiRequest`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum ApiResponse {
    /// The nodes.
    Nodes(Vec<NodeView>),
    /// The caller.
    WhoAmI {
        /// User name.
        user: String,
        /// Cluster.
        cluster: String,
        /// Roles.
        roles: Vec<String>,
    },
    /// The trusted leaf clusters.
    Clusters(Vec<ClusterView>),
    /// Leaf cluster name and its SSH host CA public key line, for each leaf that sent one.
    SshHostCas(Vec<(String, String)>),
}

/// A refusal, sent instead of a response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    /// Stable machine-readable code, e.g. `token_expired`, `bad_password`, `not_allowed`.
    pub code: String,
    /// What is wrong and what to do, for the user.
    pub message: String,
}

/// The envelope of every response line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum Reply<T> {
    /// Success.
    Ok(T),
    /// Refusal.
    Error(ErrorBody),
}

/// Why a control exchange failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// The TLS connection failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The peer closed before a whole line arrived.
    #[error("connection closed before a complete request line")]
    Closed,
    /// The line exceeded [`MAX_REQUEST_BYTES`].
    #[error("request line longer than {MAX_REQUEST_BYTES} bytes")]
    TooLong,
    /// The line was not the JSON expected.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// The peer answered with an error.
    #[error("{}", .0.message)]
    Refused(ErrorBody),
}

/// Reads one JSON line of at most [`MAX_REQUEST_BYTES`] (newline not counted). Bytes after
/// the newline stay in `buf` for whatever protocol follows.
pub async fn read_line<T: DeserializeOwned>(
    reader: &mut TlsReader,
    buf: &mut BytesMut,
) -> Result<T, ControlError> {
    let mut scanned = 0;
    loop {
        if let Some(line) = take_line(buf, &mut scanned)? {
            return parse_line(&line);
        }
        if reader.read(buf).await? == 0 {
            return Err(ControlError::Closed);
        }
    }
}

/// The line splitting of [`read_line`], without I/O: takes the first complete line (with
/// its newline) out of `buf`; `Ok(None)` while more bytes are needed;
/// [`ControlError::TooLong`] once more than [`MAX_REQUEST_BYTES`] arrived without a newline.
///
/// A line is accepted only if its newline is within the first `MAX_REQUEST_BYTES + 1` bytes,
/// however many bytes one read delivered. `scanned` (0 for a new line) is how much of `buf` is
/// known to hold no newline: each call looks only at the bytes added since the last one, so a
/// peer sending a line one byte per read costs linear time, not quadratic.
pub fn take_line(
    buf: &mut BytesMut,
    scanned: &mut usize,
) -> Result<Option<BytesMut>, ControlError> {
    let window = buf.len().min(MAX_REQUEST_BYTES + 1);
    let from = (*scanned).min(window);
    if let Some(pos) = buf[from..window].iter().position(|&b| b == b'\n') {
        *scanned = 0;
        return Ok(Some(buf.split_to(from + pos + 1)));
    }
    *scanned = window;
    if buf.len() > MAX_REQUEST_BYTES {
        return Err(ControlError::TooLong);
    }
    Ok(None)
}

/// The parsing of [`read_line`]: one line from [`take_line`] (its newline, if any, is not
/// part of the JSON) into the request type.
pub fn parse_line<T: DeserializeOwned>(line: &[u8]) -> Result<T, ControlError> {
    let json = line.strip_suffix(b"\n").unwrap_or(line);
    serde_json::from_slice(json).map_err(|e| ControlError::Malformed(e.to_string()))
}

/// Writes one JSON line and flushes it.
pub async fn write_line<T: Serialize>(
    writer: &mut TlsWriter,
    value: &T,
) -> Result<(), ControlError> {
    let mut line = serde_json::to_vec(value).map_err(|e| ControlError::Malformed(e.to_string()))?;
    line.push(b'\n');
    writer.write_all(&[&line]).await?;
    Ok(())
}

/// Reads a reply line and turns a refusal into [`ControlError::Refused`].
pub async fn read_reply<T: DeserializeOwned>(
    reader: &mut TlsReader,
    buf: &mut BytesMut,
) -> Result<T, ControlError> {
    match read_line::<Reply<T>>(reader, buf).await? {
        Reply::Ok(value) => Ok(value),
        Reply::Error(body) => Err(ControlError::Refused(body)),
    }
}

/// Hex encoding of bytes (public keys in requests).
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex decoding; `None` on odd length or a non-hex digit.
pub fn from_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A line is held to the cap however the bytes arrive: a read that brings the cap and a
    /// newline past it at once does not sneak a longer line in (found by the `control_lines`
    /// fuzz target).
    #[test]
    fn a_line_longer_than_the_cap_is_refused_whatever_the_reads() {
        let mut long = vec![b' '; MAX_REQUEST_BYTES];
        long.extend_from_slice(b"{}\n");
        let mut buf = BytesMut::from(&long[..]);
        assert!(matches!(
            take_line(&mut buf, &mut 0),
            Err(ControlError::TooLong)
        ));

        let mut exact = vec![b' '; MAX_REQUEST_BYTES - 2];
        exact.extend_from_slice(b"{}\nrest");
        let mut buf = BytesMut::new();
        let mut scanned = 0;
        for chunk in exact.chunks(1000) {
            buf.extend_from_slice(chunk);
            if let Some(line) = take_line(&mut buf, &mut scanned).unwrap() {
                assert_eq!(line.len(), MAX_REQUEST_BYTES + 1);
                let _: Ack = parse_line(&line).unwrap();
                assert_eq!(&buf[..], b"rest");
                return;
            }
        }
        panic!("the line at the cap was not taken");
    }

    /// A login that asks for no SSH certificate gets the JSON a client from before SSH
    /// certificates can read (its `LoginResponse` denies unknown fields).
    #[test]
    fn a_login_without_ssh_fields_keeps_the_old_shape() {
        let response = LoginResponse {
            cluster: "c".into(),
            certificate_pem: String::new(),
            ca_pem: String::new(),
            expires_unix: 1,
            roles: vec!["access".into()],
            ssh_certificate: None,
            ssh_logins: Vec::new(),
            ssh_note: None,
            ssh_host_ca: None,
        };
        let json = serde_json::to_value(&response).unwrap();
        let keys: Vec<&String> = json.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "ca_pem",
                "certificate_pem",
                "cluster",
                "expires_unix",
                "roles"
            ]
        );
        let request: LoginRequest =
            serde_json::from_str(r#"{"user":"a","password":"p","public_key":"00","ttl_secs":60}"#)
                .unwrap();
        assert_eq!(request.ssh_public_key, None);
    }
}
