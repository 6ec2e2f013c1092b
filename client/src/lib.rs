//! `remoteler`, the user's command: log in to a cluster's proxy (password → short-lived
//! certificate), list nodes, and reach them with the system `ssh`, either through
//! `remoteler ssh` or through the ssh_config block of `remoteler config` (plain `ssh NODE`).
//!
//! The bytes of an ssh session travel `ssh` ⇄ `remoteler proxy ssh` (stdio) ⇄ TLS with the
//! user certificate ⇄ proxy ⇄ node. The SSH session itself stays end-to-end.
//!
//! Nodes of a trusted leaf cluster are reached through the same proxy: `remoteler ls --cluster
//! LEAF`, `remoteler ssh --cluster LEAF NODE`, or plain `ssh NODE.LEAF` after `remoteler
//! config`; the leaf decides who may reach them.
//!
//! `remoteler forward` carries any TCP program the same way: a local port whose connections
//! become streams to a service of a node (module [`forward`]).
//!
//! `remoteler proxy ssh` survives network changes: when its connection to the proxy drops, it
//! dials again and resumes the session within the grace period (module [`reconnect`]), so a
//! running ssh session only pauses.
//!
//! What it does not do (yet): several profiles at once.

pub mod cli;
pub mod forward;
pub mod home;
pub mod net;
pub mod pipe;
pub mod reconnect;
pub mod ssh;

use std::future::Future;
use std::io::{IsTerminal, Read, Write};
use std::os::fd::FromRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use frame::{Open, Role, Session, SessionConfig};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tunnel::control::{
    self, ALPN_API, ALPN_LOGIN, ALPN_SESSION, ApiRequest, ApiResponse, ClusterView, ControlError,
    LoginRequest, LoginResponse, NodeView,
};
use tunnel::identity::{self, CaPin, FileRole, IdentityError, PrivateKey, TlsIdentity};
use tunnel::mux::{self, StreamError, Tunnel};

use crate::home::{CA_FILE, Home, Profile, USER_CERT_FILE, USER_KEY_FILE};
use crate::pipe::Pipe;

/// What went wrong, for the user.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No login stored.
    #[error("not logged in; run `remoteler login --proxy HOST:3023 --user NAME`")]
    NotLoggedIn,
    /// The stored login has expired.
    #[error(
        "your login to {cluster} expired at {at}; run `remoteler login --proxy {proxy} --user {user}`"
    )]
    Expired {
        /// Cluster.
        cluster: String,
        /// Expiry, RFC 3339.
        at: String,
        /// Proxy address.
        proxy: String,
        /// User.
        user: String,
    },
    /// The proxy refused to open the stream (already formatted for stderr).
    #[error("{node}: {reason}")]
    OpenFailed {
        /// Node.
        node: String,
        /// Code and reason.
        reason: String,
    },
    /// A certificate or key problem.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// Anything else, already phrased for the user.
    #[error("{0}")]
    Other(String),
}

impl ClientError {
    /// An error with a message for the user.
    pub fn msg(text: impl Into<String>) -> ClientError {
        ClientError::Other(text.into())
    }
}

fn control_err(what: &str, e: ControlError) -> ClientError {
    match e {
        ControlError::Refused(body) => ClientError::msg(format!(
            "{what} refused by the proxy: {} ({})",
            body.message, body.code
        )),
        e => ClientError::msg(format!("{what} failed: {e}")),
    }
}

/// Runs a future on a single-threaded monoio runtime (io_uring, else epoll).
pub fn block_on<F: Future>(f: F) -> Result<F::Output, ClientError> {
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .map_err(|e| ClientError::msg(format!("cannot start the I/O runtime: {e}")))?;
    Ok(rt.block_on(f))
}

fn random_id() -> Result<[u8; 16], ClientError> {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id)
        .map_err(|e| ClientError::msg(format!("the system random number generator failed: {e}")))?;
    Ok(id)
}

fn parse_pem(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ClientError::msg(format!("the proxy sent an unusable {what}: {e}")))?;
    if certs.is_empty() {
        return Err(ClientError::msg(format!("the proxy sent no {what}")));
    }
    Ok(certs)
}

// ---- login ----------------------------------------------------------------------------------

/// Reads the password: from `file` (first line), or from the terminal.
pub fn read_password(file: Option<&Path>, prompt: &str) -> Result<String, ClientError> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ClientError::msg(format!(
                "cannot read the password file {}: {e}",
                path.display()
            ))
        })?;
        let password = text.lines().next().unwrap_or("").to_owned();
        if password.is_empty() {
            return Err(ClientError::msg(format!(
                "the password file {} is empty",
                path.display()
            )));
        }
        return Ok(password);
    }
    if !std::io::stdin().is_terminal() {
        return Err(ClientError::msg(
            "no terminal to ask for the password on; pass --password-file FILE",
        ));
    }
    rpassword::prompt_password(prompt)
        .map_err(|e| ClientError::msg(format!("cannot read the password: {e}")))
}

/// `remoteler login`.
pub async fn login(
    home: &Home,
    args: &cli::LoginArgs,
    password: String,
) -> Result<Profile, ClientError> {
    let proxy = net::parse_proxy(&args.proxy)?;
    let ttl = humantime::parse_duration(&args.ttl)
        .map_err(|e| ClientError::msg(format!("--ttl {:?}: {e} (examples: 12h, 30m)", args.ttl)))?;
    let pin = args
        .ca_pin
        .as_deref()
        .map(|p| p.parse::<CaPin>())
        .transpose()
        .map_err(|e| ClientError::msg(format!("--ca-pin: {e}")))?;
    let stored = home.profile()?.filter(|p| p.proxy == proxy.to_string());
    let (mut config, learned, trusted_ca) = match pin {
        Some(pin) => {
            let (config, learned) = identity::client_config_pinned(pin)?;
            (config, Some(learned), None)
        }
        None if stored.is_some() && home.file(CA_FILE).exists() => {
            let ca = home.ca()?;
            (identity::client_config_trusting(&ca, None)?, None, Some(ca))
        }
        None => {
            return Err(ClientError::msg(format!(
                "the first login to {proxy} needs --ca-pin sha256:... (the cluster CA's pin, \
                 printed by `remoteler-proxy init`; ask your administrator)"
            )));
        }
    };
    config.alpn_protocols = vec![ALPN_LOGIN.to_vec()];
    let key = PrivateKey::generate()?;
    let request = LoginRequest {
        user: args.user.clone(),
        password,
        public_key: control::to_hex(&key.public_key().to_spki_der()),
        ttl_secs: Some(ttl.as_secs()),
        ssh_public_key: Some(home_ssh_key(home)?),
        ssh_host_ca: true,
    };
    let conn = net::connect(&proxy, Arc::new(config), ALPN_LOGIN).await?;
    let (mut reader, mut writer) = conn.split();
    control::write_line(&mut writer, &request)
        .await
        .map_err(|e| control_err("login", e))?;
    drop(request);
    let mut buf = BytesMut::new();
    let response: LoginResponse = control::read_reply(&mut reader, &mut buf)
        .await
        .map_err(|e| control_err("login", e))?;
    let _ = writer.close().await;

    let ca = parse_pem(&response.ca_pem, "CA certificate")?;
    let chain = parse_pem(&response.certificate_pem, "user certificate")?;
    match (pin, &trusted_ca) {
        (Some(pin), _) => {
            if CaPin::of_certificate(&ca[0])? != pin {
                return Err(ClientError::msg(
                    "the proxy's CA certificate does not match --ca-pin",
                ));
            }
            if learned
                .and_then(|l| l.certificate())
                .is_some_and(|seen| seen != ca[0])
            {
                return Err(ClientError::msg(
                    "the CA certificate in the answer is not the one the TLS handshake showed",
                ));
            }
        }
        (None, Some(trusted)) => {
            if !trusted.contains(&ca[0]) {
                return Err(ClientError::msg(
                    "the proxy sent a different CA certificate than the one stored; log in with \
                     --ca-pin to trust the new one",
                ));
            }
        }
        (None, None) => {}
    }
    if CaPin::of_certificate(&chain[0])? != CaPin::of_spki(&key.public_key().to_spki_der()) {
        return Err(ClientError::msg(
            "the proxy certified another key than the one sent",
        ));
    }
    let tls = TlsIdentity { chain, key };
    let peer = tls.identity()?;
    home.create()?;
    identity::write_public_file(
        &home.file(CA_FILE),
        response.ca_pem.as_bytes(),
        FileRole::Certificate,
    )?;
    tls.save(&home.file(USER_CERT_FILE), &home.file(USER_KEY_FILE))?;
    home.save_ssh_certificate(response.ssh_certificate.as_deref())?;
    home.save_ssh_host_ca(response.ssh_host_ca.as_deref())?;
    // `remoteler ssh` verifies nodes from now on; `remoteler config` adds the node names and
    // the leaves' CAs. A file that already trusts this CA for this cluster (written by an
    // earlier login or `remoteler config`) is kept, with its leaves.
    if let Some(ca) = home.ssh_host_ca() {
        let current =
            std::fs::read_to_string(home.file(home::KNOWN_HOSTS_FILE)).unwrap_or_default();
        let cluster_line = ssh::known_hosts(&response.cluster, &[], &ca, &[]);
        if !ssh::trusts(&current, &response.cluster, &ca) {
            home.write_known_hosts(&cluster_line)?;
        }
    }
    if let Some(note) = &response.ssh_note {
        eprintln!("no SSH certificate: {note}");
    }
    let expires_unix = peer
        .not_after
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(response.expires_unix);
    let profile = Profile {
        proxy: proxy.to_string(),
        user: peer.name.clone(),
        cluster: response.cluster.clone(),
        roles: if peer.roles.is_empty() {
            response.roles.clone()
        } else {
            peer.roles.clone()
        },
        logins: peer.logins.clone(),
        ssh_logins: if response.ssh_certificate.is_some() {
            response.ssh_logins.clone()
        } else {
            Vec::new()
        },
        expires_unix,
    };
    home.save_profile(&profile)?;
    Ok(profile)
}

/// The SSH public key to send at login (made once in the home directory).
fn home_ssh_key(home: &Home) -> Result<String, ClientError> {
    home.create()?;
    home.ssh_public_key()
}

/// Human-readable remaining time.
pub fn remaining(profile: &Profile, now: SystemTime) -> String {
    match profile.expires().duration_since(now) {
        Ok(left) => {
            let mins = left.as_secs() / 60;
            format!(
                "valid until {} (in {}h{:02}m)",
                humantime::format_rfc3339_seconds(profile.expires()),
                mins / 60,
                mins % 60
            )
        }
        Err(_) => format!(
            "EXPIRED at {}; run `remoteler login --proxy {} --user {}`",
            humantime::format_rfc3339_seconds(profile.expires()),
            profile.proxy,
            profile.user
        ),
    }
}

/// `remoteler status` text.
pub fn status_text(profile: &Profile, now: SystemTime, has_key: bool) -> String {
    let none = |v: &[String]| {
        if v.is_empty() {
            "(none)".to_owned()
        } else {
            v.join(", ")
        }
    };
    let mut out = format!(
        "user:    {}\ncluster: {}\nproxy:   {}\nroles:   {}\nlogins:  {}\nssh:     {}\nexpires: {}\n",
        profile.user,
        profile.cluster,
        profile.proxy,
        none(&profile.roles),
        none(&profile.logins),
        if profile.ssh_logins.is_empty() {
            "(no certificate)".to_owned()
        } else {
            format!("certificate for {}", profile.ssh_logins.join(", "))
        },
        remaining(profile, now)
    );
    if !has_key {
        out.push_str("logged out: no key and certificate stored; run `remoteler login` again\n");
    }
    out
}

// ---- API ------------------------------------------------------------------------------------

/// A user-certificate TLS config for `alpn`.
fn user_config(home: &Home, alpn: &[u8]) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let ca = home.ca()?;
    let id = home.identity()?;
    let mut config = identity::client_config_trusting(&ca, Some((id.chain.clone(), &id.key)))?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(config))
}

/// One API request with the user certificate.
pub async fn api(
    home: &Home,
    profile: &Profile,
    request: &ApiRequest,
) -> Result<ApiResponse, ClientError> {
    let proxy = net::parse_proxy(&profile.proxy)?;
    let conn = net::connect(&proxy, user_config(home, ALPN_API)?, ALPN_API).await?;
    let (mut reader, mut writer) = conn.split();
    control::write_line(&mut writer, request)
        .await
        .map_err(|e| control_err("request", e))?;
    let mut buf = BytesMut::new();
    let response = control::read_reply(&mut reader, &mut buf)
        .await
        .map_err(|e| control_err("request", e))?;
    let _ = writer.close().await;
    Ok(response)
}

/// The nodes of the cluster, or of trusted leaf cluster `cluster`.
pub async fn list_nodes(
    home: &Home,
    profile: &Profile,
    cluster: Option<&str>,
) -> Result<Vec<NodeView>, ClientError> {
    let request = ApiRequest::ListNodes {
        cluster: cluster.map(str::to_owned),
    };
    match api(home, profile, &request).await? {
        ApiResponse::Nodes(nodes) => Ok(nodes),
        other => Err(ClientError::msg(format!(
            "the proxy answered {other:?} to a node list request"
        ))),
    }
}

/// The SSH host CAs of the trusted leaf clusters the user may reach: (leaf, public key line),
/// each checked to be one OpenSSH public key and re-encoded, since it goes into known_hosts.
pub async fn leaf_ssh_host_cas(
    home: &Home,
    profile: &Profile,
) -> Result<Vec<(String, String)>, ClientError> {
    match api(home, profile, &ApiRequest::SshHostCas).await? {
        ApiResponse::SshHostCas(cas) => Ok(cas
            .into_iter()
            .filter_map(|(leaf, line)| Some((leaf, home::one_public_key(&line)?)))
            .collect()),
        other => Err(ClientError::msg(format!(
            "the proxy answered {other:?} to a host CA request"
        ))),
    }
}

/// The trusted leaf clusters the user may reach.
pub async fn list_clusters(
    home: &Home,
    profile: &Profile,
) -> Result<Vec<ClusterView>, ClientError> {
    match api(home, profile, &ApiRequest::ListClusters).await? {
        ApiResponse::Clusters(clusters) => Ok(clusters),
        other => Err(ClientError::msg(format!(
            "the proxy answered {other:?} to a cluster list request"
        ))),
    }
}

/// The `remoteler clusters` table.
pub fn clusters_table(clusters: &[ClusterView]) -> String {
    let width = clusters
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(0)
        .max("NAME".len());
    let mut out = format!("{:width$}  ONLINE  NODES\n", "NAME");
    for c in clusters {
        out.push_str(&format!(
            "{:width$}  {:6}  {}\n",
            c.name,
            if c.online { "yes" } else { "no" },
            c.nodes
        ));
    }
    out
}

/// The `remoteler ls` table.
pub fn nodes_table(nodes: &[NodeView]) -> String {
    let rows: Vec<[String; 4]> = nodes
        .iter()
        .map(|n| {
            [
                n.name.clone(),
                n.via.clone(),
                if n.online { "yes" } else { "no" }.to_owned(),
                n.labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(","),
            ]
        })
        .collect();
    let header = ["NAME", "VIA", "ONLINE", "LABELS"].map(str::to_owned);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let line = format!(
            "{:w0$}  {:w1$}  {:w2$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

// ---- the ssh bridge -------------------------------------------------------------------------

/// How long a finished stream waits for the proxy to acknowledge the close.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// `remoteler proxy ssh`: one stream to the node's ssh service, spliced with stdin/stdout.
/// A lost connection to the proxy is dialled again and the session resumed for up to
/// `resume_grace` (zero: the session ends with the connection).
pub async fn proxy_ssh(
    home: &Home,
    profile: &Profile,
    destination: &str,
    cluster: Option<&str>,
    resume_grace: Duration,
) -> Result<(), ClientError> {
    let leaf = cluster.filter(|c| *c != profile.cluster);
    let dest = ssh::Destination::parse(destination, leaf.unwrap_or(&profile.cluster))
        .map_err(ClientError::msg)?;
    // The proxy checks the login against the user's roles, and refuses a session without one.
    let Some(login) = dest.login.clone() else {
        return Err(ClientError::msg(format!(
            "{destination:?}: no login; `remoteler proxy ssh` needs LOGIN@NODE, as ssh passes it \
             with `%r@%h:%p` in the ProxyCommand (`remoteler config` writes that); run \
             `ssh user@{}`",
            dest.node
        )));
    };
    let proxy = net::parse_proxy(&profile.proxy)?;
    let tls = user_config(home, ALPN_SESSION)?;
    let conn = net::connect(&proxy, tls.clone(), ALPN_SESSION).await?;
    let mut session_config = SessionConfig::new(Role::Client, true);
    session_config.resume_grace = resume_grace;
    session_config.keepalive_interval = reconnect::KEEPALIVE_INTERVAL;
    session_config.keepalive_count = reconnect::KEEPALIVE_COUNT;
    let tunnel = Tunnel::new(Session::new(session_config, random_id()?, Instant::now()));
    let driver = {
        let tunnel = tunnel.clone();
        monoio::spawn(async move { mux::drive(&tunnel, conn, BytesMut::new()).await })
    };
    let request = Open {
        session_id: random_id()?,
        cluster: leaf.unwrap_or_default().to_owned(),
        node: dest.node.clone(),
        service: "ssh".to_owned(),
        user: profile.user.clone(),
        login,
        client_addr: String::new(),
        credential: Bytes::new(),
    };
    let stream = match tunnel.open(request).await {
        Ok(stream) => std::rc::Rc::new(stream),
        Err(StreamError::Refused { code, reason }) => {
            return Err(ClientError::OpenFailed {
                node: dest.node,
                reason: format!("{code}: {reason}"),
            });
        }
        Err(e) => {
            // The transport's own error says more (e.g. the proxy refused our certificate).
            let why = match monoio::time::timeout(CLOSE_WAIT, driver).await {
                Ok(mux::DriveOutcome::TransportLost(Some(tls))) if tls.is_certificate_error() => {
                    format!(
                        "{tls}; the proxy did not accept your certificate: log in again with \
                         `remoteler login --proxy {} --user {}`",
                        profile.proxy, profile.user
                    )
                }
                Ok(mux::DriveOutcome::TransportLost(Some(tls))) => tls.to_string(),
                _ => e.to_string(),
            };
            return Err(ClientError::msg(format!(
                "{}: cannot open a session: {why}",
                dest.node
            )));
        }
    };
    let connection = monoio::spawn(reconnect::keep_connected(
        tunnel.clone(),
        driver,
        reconnect::Dial { proxy, tls },
    ));
    let result = splice_stdio(stream.clone()).await;
    // Let the last acknowledgements cross so both ends record a clean close, not a reset.
    let _ = monoio::time::timeout(CLOSE_WAIT, stream.closed()).await;
    tunnel.close(frame::ErrorCode::NO_ERROR, "session over");
    let _ = monoio::time::timeout(CLOSE_WAIT, connection).await;
    result.map_err(|e| match e {
        StreamError::Reset { code, reason } if code == frame::ErrorCode::RESUME_FAILED => {
            ClientError::msg(format!(
                "{}: the connection to the proxy was lost and the session could not be \
                 resumed: {reason}",
                dest.node
            ))
        }
        e => ClientError::msg(format!("{}: {e}", dest.node)),
    })
}

/// Copies stdin into the stream and the stream to stdout until both directions are done.
async fn splice_stdio(stream: std::rc::Rc<mux::MuxStream>) -> Result<(), StreamError> {
    let from_stdin = Pipe::default();
    let to_stdout = Pipe::default();
    {
        let pipe = from_stdin.clone();
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin().lock();
            loop {
                let mut buf = vec![0u8; 32 * 1024];
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        buf.truncate(n);
                        if !pipe.send_blocking(Bytes::from(buf)) {
                            break;
                        }
                    }
                }
            }
            pipe.close();
        });
    }
    let writer = {
        let pipe = to_stdout.clone();
        std::thread::spawn(move || {
            // SAFETY: fd 1 is this process's stdout, which nothing else in the process uses
            // (logs and errors go to stderr). Owning it lets us close it when the node's
            // side ends, so ssh sees end-of-file.
            let mut stdout = unsafe { std::fs::File::from_raw_fd(1) };
            while let Some(data) = pipe.recv_blocking() {
                if stdout
                    .write_all(&data)
                    .and_then(|()| stdout.flush())
                    .is_err()
                {
                    pipe.close();
                    break;
                }
            }
            drop(stdout);
        })
    };
    let upstream = {
        let stream = stream.clone();
        monoio::spawn(async move {
            while let Some(data) = from_stdin.recv().await {
                stream.write(data).await?;
            }
            stream.finish();
            Ok::<(), StreamError>(())
        })
    };
    let downstream: Result<(), StreamError> = async {
        while let Some(data) = stream.read().await? {
            if !to_stdout.send(data).await {
                break;
            }
        }
        Ok(())
    }
    .await;
    to_stdout.close();
    let _ = writer.join();
    if let Err(e) = downstream {
        stream.reset(frame::ErrorCode::CANCELLED, "client stopped");
        return Err(e);
    }
    upstream.await?;
    let _ = monoio::time::timeout(CLOSE_WAIT, stream.closed()).await;
    Ok(())
}
