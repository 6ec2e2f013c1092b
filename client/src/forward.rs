//! `remoteler forward`: a local TCP port forwarded to a service of a node, through the proxy,
//! in the spirit of `ssh -L` but without SSH, so that any TCP program (iperf3, a database
//! client, a browser) can use a tunnel.
//!
//! Every accepted local connection becomes one stream (one OPEN naming the node and the
//! agent's `[[forwards]]` service). All streams of one `forward` share ONE user connection to
//! the proxy (TLS with the stored user certificate, ALPN session, the frame multiplexer): it
//! is opened with the first local connection and opened again, with the credentials on disk
//! at that moment, by the first local connection after it ended. A dropped connection is
//! dialled again at once and the session resumed, as in `proxy ssh` (module
//! [`crate::reconnect`]): the streams that were open carry on after the pause.
//!
//! A refused stream (unknown node, service not forwarded by the agent, access denied) closes
//! its local connection and prints the proxy's or the agent's reason on one line of stderr.

use std::cell::RefCell;
use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use frame::{ErrorCode, Open, Role, Session, SessionConfig};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Splitable};
use monoio::net::{TcpListener, TcpStream};
use tunnel::control::ALPN_SESSION;
use tunnel::mux::{self, MuxStream, StreamError, Tunnel};
use tunnel::read_size::ReadSize;

use crate::home::{Home, Profile};
use crate::{ClientError, net, random_id, user_config};

/// Bytes asked of a local TCP read while the program sends little: one 64 KiB DATA frame.
const READ_MIN: usize = 64 * 1024;
/// Bytes asked of a local TCP read while the program fills every read (an upload): four DATA
/// frames, which the tunnel encrypts and sends with one system call (see [`ReadSize`]).
const READ_MAX: usize = 256 * 1024;
/// Largest DATA payload we accept from the proxy (frame's default is 16 KiB): each DATA frame
/// costs a header, a wake-up of the stream's task and a write to the local socket, so 64 KiB
/// frames (the protocol's limit) cut the local writes of a download by 4x. The receive buffer
/// holds at most one partial frame, and only while data flows.
const MAX_FRAME: u32 = 64 * 1024;
/// How long a finished stream waits for the proxy's last acknowledgement.
const CLOSE_WAIT: Duration = Duration::from_secs(10);
/// How long the stop waits for the proxy connection to close cleanly.
const STOP_WAIT: Duration = Duration::from_secs(2);
/// Unanswered OPENs at once: the proxy refuses more than its `limits.max_pending_opens` (64 by
/// default) on one connection, so a burst of local connections waits here for its turn.
const MAX_OPENING: usize = 32;
/// The same error line is printed at most once in this interval (a program that retries a
/// refused connection in a loop must not flood the terminal).
const REPEAT_QUIET: Duration = Duration::from_secs(5);

/// What to forward where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardSpec {
    /// The local address to listen on.
    pub listen: SocketAddr,
    /// The node (a `.CLUSTER` suffix already stripped).
    pub node: String,
    /// The agent's `[[forwards]]` entry to reach.
    pub service: String,
    /// The login passed in the OPEN (for the proxy's authorization and audit), if any.
    pub login: Option<String>,
}

impl ForwardSpec {
    /// Parses the command-line arguments: `[LOGIN@]NODE`, the service and the listen address.
    pub fn parse(
        listen: &str,
        destination: &str,
        service: &str,
        cluster: &str,
    ) -> Result<ForwardSpec, ClientError> {
        let listen: SocketAddr = listen.parse().map_err(|_| {
            ClientError::msg(format!(
                "--listen {listen:?}: expected IP:PORT, e.g. 127.0.0.1:15201 (port 0 picks a free one)"
            ))
        })?;
        let dest =
            crate::ssh::Destination::parse(destination, cluster).map_err(ClientError::msg)?;
        if dest.port.is_some() {
            return Err(ClientError::msg(format!(
                "{destination:?}: name the service, not a port (the agent's [[forwards]] decide \
                 where a service goes), e.g. `remoteler forward --listen {listen} {} ssh`",
                dest.node
            )));
        }
        if service.is_empty() {
            return Err(ClientError::msg("the service name is empty"));
        }
        if service == "ssh" && dest.login.is_none() {
            return Err(ClientError::msg(format!(
                "{destination:?}: forwarding the ssh service needs the login the ssh sessions \
                 will use (the proxy checks it against your roles), e.g. `remoteler forward \
                 --listen {listen} root@{} ssh`",
                dest.node
            )));
        }
        Ok(ForwardSpec {
            listen,
            node: dest.node,
            service: service.to_owned(),
            login: dest.login,
        })
    }

    fn target(&self) -> String {
        format!("{}/{}", self.node, self.service)
    }
}

/// Binds the listener (without SO_REUSEPORT: a second `forward` on the same port must fail,
/// not share it).
pub fn bind(addr: SocketAddr) -> Result<TcpListener, ClientError> {
    let std_listener = std::net::TcpListener::bind(addr)
        .map_err(|e| ClientError::msg(format!("cannot listen on {addr}: {e}")))?;
    std_listener
        .set_nonblocking(true)
        .and_then(|()| TcpListener::from_std(std_listener))
        .map_err(|e| ClientError::msg(format!("cannot listen on {addr}: {e}")))
}

/// Runs the forward on `listener` until `shutdown` completes. Prints the readiness line
/// `forwarding ADDR -> NODE/SERVICE` on stdout once listening.
pub async fn run(
    home: Home,
    spec: ForwardSpec,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ClientError> {
    let local = listener
        .local_addr()
        .map_err(|e| ClientError::msg(format!("cannot read the listening address: {e}")))?;
    println!("forwarding {local} -> {}", spec.target());
    let ctx = Rc::new(Forward {
        home,
        spec,
        upstream: RefCell::new(None),
        last_error: RefCell::new(None),
        opening: Limit::new(MAX_OPENING),
    });
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = monoio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: say so, wait, and carry on.
                ctx.report(format!("cannot accept a connection on {local}: {e}"));
                monoio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        // Connecting here, in the accept loop, makes connections that arrive meanwhile wait
        // for the same proxy connection instead of each dialling its own.
        let tunnel = match ctx.tunnel().await {
            Ok(t) => t,
            Err(e) => {
                ctx.report(format!("{}: {e}", ctx.spec.target()));
                continue; // dropping `tcp` closes the local connection
            }
        };
        monoio::spawn(serve(ctx.clone(), tunnel, tcp, peer));
    }
    let upstream = ctx.upstream.borrow_mut().take();
    if let Some(up) = upstream {
        up.tunnel.close(ErrorCode::NO_ERROR, "forward stopped");
        let _ = monoio::time::timeout(STOP_WAIT, up.driver).await;
    }
    Ok(())
}

struct Upstream {
    tunnel: Tunnel,
    driver: monoio::task::JoinHandle<()>,
    alive: Rc<std::cell::Cell<bool>>,
}

struct Forward {
    home: Home,
    spec: ForwardSpec,
    upstream: RefCell<Option<Upstream>>,
    last_error: RefCell<Option<(String, Instant)>>,
    opening: Limit,
}

impl Forward {
    /// One line on stderr, unless it is the line printed last and that was moments ago.
    fn report(&self, line: String) {
        let mut last = self.last_error.borrow_mut();
        if let Some((text, at)) = last.as_ref()
            && *text == line
            && at.elapsed() < REPEAT_QUIET
        {
            return;
        }
        eprintln!("remoteler: {line}");
        *last = Some((line, Instant::now()));
    }

    /// The connection to the proxy: the current one, or a new one if there is none or it
    /// dropped.
    async fn tunnel(self: &Rc<Self>) -> Result<Tunnel, ClientError> {
        if let Some(up) = self.upstream.borrow().as_ref()
            && up.alive.get()
            && !up.tunnel.is_ended()
        {
            return Ok(up.tunnel.clone());
        }
        self.upstream.borrow_mut().take();
        // Read from disk each time: a `remoteler login` since the last connection counts.
        let profile: Profile = self.home.valid_profile(SystemTime::now())?;
        let proxy = net::parse_proxy(&profile.proxy)?;
        let tls = user_config(&self.home, ALPN_SESSION)?;
        let conn = net::connect(&proxy, tls.clone(), ALPN_SESSION)
            .await
            .map_err(|e| login_hint(e, &profile))?;
        // A dropped connection is dialled again and the session resumed; once the session
        // ends (proxy restart, grace over), the next local connection dials a new one.
        let mut config = SessionConfig::new(Role::Client, true);
        config.resume_grace = crate::reconnect::DEFAULT_RESUME_GRACE;
        config.keepalive_interval = crate::reconnect::KEEPALIVE_INTERVAL;
        config.keepalive_count = crate::reconnect::KEEPALIVE_COUNT;
        config.max_frame = MAX_FRAME;
        let tunnel = Tunnel::new(Session::new(config, random_id()?, Instant::now()));
        let alive = Rc::new(std::cell::Cell::new(true));
        let driver = {
            let (tunnel, alive, ctx) = (tunnel.clone(), alive.clone(), Rc::downgrade(self));
            monoio::spawn(async move {
                let driver = {
                    let tunnel = tunnel.clone();
                    monoio::spawn(async move { mux::drive(&tunnel, conn, BytesMut::new()).await })
                };
                let dial = crate::reconnect::Dial { proxy, tls };
                let outcome = crate::reconnect::keep_connected(tunnel, driver, dial).await;
                alive.set(false);
                let stopped = matches!(
                    &outcome,
                    Some(mux::DriveOutcome::Ended(frame::Error::Ended(
                        frame::EndReason::ClosedLocally { .. }
                    )))
                );
                if let (Some(ctx), false) = (ctx.upgrade(), stopped) {
                    let why = outcome.as_ref().map_or_else(
                        || "not back within the resume grace".to_owned(),
                        outcome_text,
                    );
                    ctx.report(format!(
                        "the connection to the proxy ended ({why}); the next connection dials again"
                    ));
                }
            })
        };
        *self.upstream.borrow_mut() = Some(Upstream {
            tunnel: tunnel.clone(),
            driver,
            alive,
        });
        Ok(tunnel)
    }

    fn open_request(&self) -> Result<Open, ClientError> {
        let profile = self.home.require_profile()?;
        Ok(Open {
            session_id: random_id()?,
            cluster: String::new(),
            node: self.spec.node.clone(),
            service: self.spec.service.clone(),
            user: profile.user,
            login: self.spec.login.clone().unwrap_or_default(),
            client_addr: String::new(),
            credential: Bytes::new(),
        })
    }
}

fn login_hint(e: ClientError, profile: &Profile) -> ClientError {
    ClientError::msg(format!(
        "{e} (if the proxy refused your certificate, log in again with `remoteler login \
         --proxy {} --user {}`)",
        profile.proxy, profile.user
    ))
}

fn outcome_text(outcome: &mux::DriveOutcome) -> String {
    match outcome {
        mux::DriveOutcome::Ended(e) => e.to_string(),
        mux::DriveOutcome::TransportLost(Some(e)) => e.to_string(),
        mux::DriveOutcome::TransportLost(None) => "the proxy closed the connection".into(),
    }
}

/// One local connection: open its stream, then copy both ways.
async fn serve(ctx: Rc<Forward>, tunnel: Tunnel, tcp: TcpStream, peer: SocketAddr) {
    let request = match ctx.open_request() {
        Ok(r) => r,
        Err(e) => {
            ctx.report(e.to_string());
            return;
        }
    };
    let opened = {
        let _turn = ctx.opening.acquire().await;
        tunnel.open(request).await
    };
    let stream = match opened {
        Ok(s) => s,
        Err(StreamError::Refused { code, reason }) => {
            ctx.report(format!(
                "{}: refused for {peer}: {code}: {reason}",
                ctx.spec.target()
            ));
            return;
        }
        Err(e) => {
            ctx.report(format!(
                "{}: cannot open a stream for {peer}: {e}",
                ctx.spec.target()
            ));
            return;
        }
    };
    if let Some(why) = splice(stream, tcp).await {
        ctx.report(format!(
            "{}: connection from {peer}: {why}",
            ctx.spec.target()
        ));
    }
}

/// Copies between the stream and the local connection until both directions are done.
/// The end of one direction is passed on as a half-close. Returns why it failed, if it did
/// (a local program closing its socket early is not reported: that is its right).
async fn splice(stream: MuxStream, tcp: TcpStream) -> Option<String> {
    let stream = Rc::new(stream);
    let (mut tcp_read, mut tcp_write) = tcp.into_split();
    let abort = Rc::new(Abort::default());

    // stream -> local, in its own task.
    let to_local = {
        let (stream, abort) = (stream.clone(), abort.clone());
        monoio::spawn(async move {
            let result = loop {
                match stream.read().await {
                    Ok(Some(bytes)) => {
                        let (res, _) = tcp_write.write_all(bytes).await;
                        if res.is_err() {
                            // The local program went away: stop the node's side too.
                            stream.reset(ErrorCode::CANCELLED, "the local program closed");
                            abort.trigger();
                            break Ok(());
                        }
                    }
                    Ok(None) => break Ok(()),
                    Err(e) => {
                        abort.trigger();
                        break Err(e);
                    }
                }
            };
            let _ = tcp_write.shutdown().await;
            result
        })
    };

    // local -> stream, here.
    let mut failed = None;
    let mut size = ReadSize::new(READ_MIN, READ_MAX);
    loop {
        let asked = size.next();
        let buf = BytesMut::with_capacity(asked);
        let (res, buf) = monoio::select! {
            read = tcp_read.read(buf) => read,
            () = abort.wait() => break,
        };
        match res {
            Ok(0) => {
                stream.finish();
                break;
            }
            Ok(n) => {
                size.record(asked, n);
                // The stream keeps what it sends until the proxy acknowledges it (a WINDOW
                // comes only after a quarter of the window): a small read must not pin a
                // whole read buffer meanwhile, so it travels as a right-sized copy.
                let data = if ReadSize::worth_copying(asked, n) {
                    Bytes::copy_from_slice(&buf[..n])
                } else {
                    buf.freeze()
                };
                if let Err(e) = stream.write(data).await {
                    failed = Some(format!("tunnel side: {e}"));
                    break;
                }
            }
            Err(_) => {
                stream.reset(ErrorCode::CANCELLED, "the local connection failed");
                break;
            }
        }
    }
    if let Err(e) = to_local.await {
        failed.get_or_insert(format!("tunnel side: {e}"));
    }
    match &failed {
        Some(_) => stream.reset(ErrorCode::CANCELLED, "forward stream failed"),
        None => {
            let _ = monoio::time::timeout(CLOSE_WAIT, stream.closed()).await;
        }
    }
    failed
}

/// Given by the stream -> local direction when it fails, so that the other direction stops
/// reading the local socket. One waiter.
#[derive(Default)]
struct Abort {
    given: std::cell::Cell<bool>,
    waiter: RefCell<Option<std::task::Waker>>,
}

impl Abort {
    fn trigger(&self) {
        self.given.set(true);
        if let Some(w) = self.waiter.borrow_mut().take() {
            w.wake();
        }
    }

    async fn wait(&self) {
        std::future::poll_fn(|cx| {
            if self.given.get() {
                std::task::Poll::Ready(())
            } else {
                *self.waiter.borrow_mut() = Some(cx.waker().clone());
                std::task::Poll::Pending
            }
        })
        .await
    }
}

/// A counting semaphore for tasks of one thread.
struct Limit {
    free: std::cell::Cell<usize>,
    waiters: RefCell<std::collections::VecDeque<std::task::Waker>>,
}

/// A place taken from a [`Limit`]; given back when dropped.
struct Turn<'a>(&'a Limit);

impl Limit {
    fn new(places: usize) -> Limit {
        Limit {
            free: std::cell::Cell::new(places),
            waiters: RefCell::default(),
        }
    }

    async fn acquire(&self) -> Turn<'_> {
        std::future::poll_fn(|cx| {
            if self.free.get() > 0 {
                self.free.set(self.free.get() - 1);
                std::task::Poll::Ready(Turn(self))
            } else {
                self.waiters.borrow_mut().push_back(cx.waker().clone());
                std::task::Poll::Pending
            }
        })
        .await
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.0.free.set(self.0.free.get() + 1);
        // Wake them all: a woken task that was cancelled meanwhile must not swallow the place.
        for w in self.0.waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }
}
