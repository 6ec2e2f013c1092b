//! The admin socket, `<data_dir>/admin.sock` (mode 0600): how `remoteler-proxy status` and
//! `nodes ls` ask the running proxy.
//!
//! Protocol: the client connects, sends one JSON line, reads one JSON line, and the proxy
//! closes the connection.
//!
//! | request | answer |
//! |---|---|
//! | `{"request":"status"}` | `{"ok":`[`StatusView`]`}` |
//! | `{"request":"nodes"}` | `{"ok":[...]}`, a list of [`crate::directory::NodeRecord`] |
//! | `{"request":"clusters"}` | `{"ok":[...]}`, a list of [`crate::directory::ClusterRecord`]: the trusted leaf clusters |
//!
//! A refusal is `{"error":{"code":"...","message":"..."}}` (the envelope of
//! `tunnel::control::Reply`). Requests are at most [`MAX_ADMIN_REQUEST`] bytes. The socket's
//! mode (and the data directory's 0700) is the access control: whoever can open it is the
//! operator.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use serde::{Deserialize, Serialize};
use tunnel::control::{ErrorBody, Reply};

use crate::datadir::DataDir;
use crate::error::ProxyError;
use crate::server::{Context, Stats};

/// Longest request line.
pub const MAX_ADMIN_REQUEST: usize = 4096;
/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A question to the running proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case", deny_unknown_fields)]
pub enum AdminRequest {
    /// [`StatusView`].
    Status,
    /// Every node.
    Nodes,
    /// Trusted leaf clusters: every leaf that joined, online or not.
    Clusters,
}

/// The listeners, as bound.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenersView {
    /// Users.
    pub users: String,
    /// Tunnels.
    pub tunnels: String,
    /// Auth.
    pub auth: String,
}

/// Answer to [`AdminRequest::Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusView {
    /// Cluster name.
    pub cluster: String,
    /// The CA pin agents and users configure.
    pub ca_pin: String,
    /// Listeners.
    pub listeners: ListenersView,
    /// Tunnels up.
    pub tunnels_up: u64,
    /// Worker threads (cores), and the tunnels each holds.
    #[serde(default)]
    pub tunnels_per_core: Vec<u64>,
    /// Connections moved to their node's owner core since start.
    #[serde(default)]
    pub handoffs: u64,
    /// Sessions running.
    pub sessions_active: u64,
    /// Sessions since start.
    pub sessions_total: u64,
    /// Seconds since start.
    pub uptime_secs: u64,
    /// Process id.
    pub pid: u32,
    /// Proxy version.
    pub version: String,
    /// Whether the proxy is draining.
    pub draining: bool,
}

/// Binds the admin socket, replacing a stale one. Refuses when a proxy answers on it.
pub(crate) fn bind(data: &DataDir) -> Result<(UnixListener, PathBuf), ProxyError> {
    let path = data.admin_socket();
    if path.exists() {
        if still_answers(&path) {
            return Err(ProxyError::Other(format!(
                "another proxy is running with data directory {} (its admin socket {} answers); \
                 stop it first, or use another --data-dir",
                data.root().display(),
                path.display()
            )));
        }
        std::fs::remove_file(&path)
            .map_err(|e| ProxyError::io("cannot remove the stale admin socket", &path, e))?;
    }
    let listener = UnixListener::bind(&path)
        .map_err(|e| ProxyError::io("cannot bind the admin socket", &path, e))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| ProxyError::io("cannot set the mode of", &path, e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| ProxyError::io("cannot configure the admin socket", &path, e))?;
    Ok((listener, path))
}

/// How long a socket that accepts connections is watched before it counts as another proxy's.
const STALE_SOCKET_WATCH: Duration = Duration::from_secs(2);

/// Whether a proxy listens on the admin socket at `path`. A socket that accepts a connection
/// is watched for [`STALE_SOCKET_WATCH`]: after `kill -9` or a crash, the kernel tears down the
/// dead proxy's io_uring (and the accept it had pending on the socket) asynchronously, so the
/// socket goes on accepting for some milliseconds after the process is gone (up to 11 ms seen
/// by `proxy/tests/durability.rs`); a restart in that moment must not take it for a live proxy.
/// A live proxy accepts for the whole watch.
fn still_answers(path: &Path) -> bool {
    let deadline = std::time::Instant::now() + STALE_SOCKET_WATCH;
    loop {
        if UnixStream::connect(path).is_err() {
            return false;
        }
        if std::time::Instant::now() >= deadline {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Serves the admin socket until shutdown.
pub(crate) async fn serve(ctx: Rc<Context>, listener: monoio::net::UnixListener) {
    loop {
        let accepted = monoio::select! {
            a = listener.accept() => a,
            _ = ctx.shutdown.wait() => break,
        };
        match accepted {
            Ok((stream, _)) => {
                monoio::spawn(answer(ctx.clone(), stream));
            }
            Err(e) => {
                tracing::warn!(error = %e, "admin socket accept failed");
                monoio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn read_request(stream: &mut monoio::net::UnixStream) -> Result<AdminRequest, ErrorBody> {
    let mut line: Vec<u8> = Vec::new();
    loop {
        if let Some(pos) = line.iter().position(|&b| b == b'\n') {
            return serde_json::from_slice(&line[..pos]).map_err(|e| ErrorBody {
                code: "bad_request".into(),
                message: format!(
                    "expected {{\"request\":\"status\"}} or {{\"request\":\"nodes\"}}: {e}"
                ),
            });
        }
        if line.len() > MAX_ADMIN_REQUEST {
            return Err(ErrorBody {
                code: "bad_request".into(),
                message: format!("request longer than {MAX_ADMIN_REQUEST} bytes"),
            });
        }
        let buf = Vec::with_capacity(1024);
        let (res, buf) = stream.read(buf).await;
        match res {
            Ok(0) | Err(_) => {
                return Err(ErrorBody {
                    code: "bad_request".into(),
                    message: "connection closed before a complete request line".into(),
                });
            }
            Ok(_) => line.extend_from_slice(&buf),
        }
    }
}

fn status(ctx: &Context) -> StatusView {
    StatusView {
        cluster: ctx.cluster.clone(),
        ca_pin: ctx.ca_pin.clone(),
        listeners: ListenersView {
            users: ctx.addrs.users.to_string(),
            tunnels: ctx.addrs.tunnels.to_string(),
            auth: ctx.addrs.auth.to_string(),
        },
        tunnels_up: ctx.directory.tunnel_count() as u64,
        tunnels_per_core: ctx
            .directory
            .tunnels_per_core()
            .into_iter()
            .map(|n| n as u64)
            .collect(),
        handoffs: Stats::get(&ctx.stats.handoffs),
        sessions_active: Stats::get(&ctx.stats.sessions_active),
        sessions_total: Stats::get(&ctx.stats.sessions_total),
        uptime_secs: ctx.started.elapsed().as_secs(),
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").into(),
        draining: ctx.draining.get(),
    }
}

/// The leaves with tunnels (or seen) in this run, plus those that joined and never connected.
fn clusters(ctx: &Context) -> Vec<crate::directory::ClusterRecord> {
    let mut out = ctx.directory.clusters();
    if let Ok(state) = ctx.store.read() {
        for leaf in state.trusted_leaves {
            if !out.iter().any(|c| c.name == leaf.name) {
                out.push(crate::directory::ClusterRecord {
                    name: leaf.name,
                    online: false,
                    tunnels: 0,
                    nodes: 0,
                    since_unix: None,
                    peers: Vec::new(),
                    last_heartbeat_unix: None,
                    rtt_ms: None,
                });
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

async fn answer(ctx: Rc<Context>, mut stream: monoio::net::UnixStream) {
    let request = monoio::time::timeout(REQUEST_TIMEOUT, read_request(&mut stream))
        .await
        .unwrap_or_else(|_| {
            Err(ErrorBody {
                code: "timeout".into(),
                message: format!("no request within {}s", REQUEST_TIMEOUT.as_secs()),
            })
        });
    let body = match request {
        Ok(AdminRequest::Status) => serde_json::to_vec(&Reply::Ok(status(&ctx))),
        Ok(AdminRequest::Nodes) => serde_json::to_vec(&Reply::Ok(ctx.directory.list())),
        Ok(AdminRequest::Clusters) => serde_json::to_vec(&Reply::Ok(clusters(&ctx))),
        Err(e) => serde_json::to_vec(&Reply::<()>::Error(e)),
    };
    let Ok(mut body) = body else { return };
    body.push(b'\n');
    let _ = monoio::time::timeout(Duration::from_secs(5), stream.write_all(body)).await;
}

/// Why the CLI could not ask the proxy.
#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    /// Nobody listens on the socket.
    #[error(
        "the proxy is not running (nothing answers on {}); start it with `remoteler-proxy start`",
        .0.display()
    )]
    NotRunning(PathBuf),
    /// Anything else.
    #[error("{0}")]
    Failed(String),
}

/// Sends `request` to the proxy of `data` and returns its answer.
pub fn ask<T: for<'de> Deserialize<'de>>(
    data: &DataDir,
    request: AdminRequest,
) -> Result<T, AdminClientError> {
    let path = data.admin_socket();
    let mut stream = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
            return Err(AdminClientError::NotRunning(path));
        }
        Err(e) => {
            return Err(AdminClientError::Failed(format!(
                "cannot connect to {}: {e}",
                path.display()
            )));
        }
    };
    let failed = |e: std::io::Error| {
        AdminClientError::Failed(format!("admin socket {}: {e}", path.display()))
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(failed)?;
    let mut line =
        serde_json::to_vec(&request).map_err(|e| AdminClientError::Failed(e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(failed)?;
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    reader.read_line(&mut answer).map_err(failed)?;
    match serde_json::from_str::<Reply<T>>(&answer) {
        Ok(Reply::Ok(v)) => Ok(v),
        Ok(Reply::Error(body)) => Err(AdminClientError::Failed(format!(
            "the proxy refused: {}: {}",
            body.code, body.message
        ))),
        Err(e) => Err(AdminClientError::Failed(format!(
            "unexpected answer from the proxy: {e}"
        ))),
    }
}
