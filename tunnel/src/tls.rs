//! TLS over monoio, owned here: cancel-safe, panic-free on network input, small when idle.
//!
//! # Why not an `AsyncRead` adapter
//!
//! monoio's I/O is completion-based: a read hands a buffer to the kernel and gets it back
//! when bytes arrive. A TLS stream built on that (monoio-rustls) keeps a read buffer lent to
//! the kernel for as long as a connection waits, cannot give a read back once it is cancelled,
//! and ties both halves of a split stream to one buffer. With tens of thousands of mostly idle
//! tunnels per core that is the wrong trade, so this module does its I/O by readiness:
//!
//! 1. **Wait for readiness**, not for data: monoio's `TcpStream::readable`/`writable` (an
//!    io_uring `PollAdd`, or the epoll readiness on the legacy driver). A readiness wait holds
//!    no buffer and can be abandoned at any time: it has no effect beyond waking us. The wait is
//!    kept by the connection and resumed by the next call, so a read cancelled a thousand times
//!    leaves one wait in the ring, not a thousand (see `sys::ReadinessWait`).
//! 2. **Read and write without blocking**, with `recv`/`send` and `MSG_DONTWAIT` on the raw
//!    descriptor: the call either moves bytes now or says `EAGAIN`, and nothing is ever left in
//!    flight in the kernel. Received ciphertext lands in a **per-core buffer** (one per thread,
//!    256 KiB), never one per connection. On an established connection the records are opened
//!    where they landed, each one's plaintext moved down onto the end of the last, and a read
//!    that brought 64 KiB or more hands that whole buffer to the caller (what the caller had
//!    not consumed yet goes in front of it first); a smaller one is copied into the caller's
//!    `BytesMut`. During the handshake rustls decrypts in the per-core buffer and the
//!    plaintext is copied out. Outgoing records are sealed into a per-core buffer, each gathered
//!    straight from the caller's slices (one copy per byte), and sent from it; only what the
//!    kernel does not take is copied into the connection.
//! 3. **rustls's unbuffered API for the handshake** (`UnbufferedClientConnection`/
//!    `UnbufferedServerConnection`): rustls owns no ciphertext buffer either. **Then our own
//!    record layer** (`record`): once the handshake is done, rustls hands the traffic keys
//!    over (its kernel-connection API, made for kTLS) and keeps only what derives the next
//!    keys. rustls's own post-handshake path copies every plaintext byte twice and allocates
//!    per record, and a full rustls connection keeps its deframer and queues for the
//!    connection's life. A config without `enable_secret_extraction`, or a TLS 1.2
//!    connection, stays on rustls throughout.
//!
//! An idle established connection therefore holds its keys, the peer's certificates and a
//! few small bookkeeping structures, and nothing else: no receive buffer, no send buffer. It
//! does hold the tail of a record the peer has only partly sent (at most one record, 18 KiB)
//! and any ciphertext the kernel has not accepted yet (bounded by what the caller queues; see
//! [`TlsWriter::pending`]).
//!
//! # Cancel-safety contract
//!
//! * [`TlsReader::read`] may be dropped at any `.await` (inside `monoio::time::timeout`,
//!   `monoio::select!`, ...). It suspends only in the readiness wait (and in a yield to other
//!   tasks); receiving, decrypting and appending to the caller's buffer happen synchronously
//!   between two suspensions, so a dropped read has delivered nothing and a completed one has
//!   delivered everything it decrypted. No byte is lost or delivered twice.
//! * [`TlsWriter::queue`] is synchronous: when it returns `Ok`, the data is encrypted and
//!   committed to the connection (sent or held in the pending buffer, in order).
//!   [`TlsWriter::flush`] only waits for the pending buffer to drain and may be dropped at any
//!   time; the next `flush` (or `queue`, `close`) carries on. [`TlsWriter::write_all`] is
//!   `queue` + `flush`: once it has been polled its data is committed even if it is dropped.
//! * No write is ever in flight in the kernel, so there is nothing to cancel: the io_uring
//!   hazard of a cancelled write reaching the socket anyway does not exist here.
//!
//! # Concurrency
//!
//! [`TlsConnection::split`] gives a [`TlsReader`] and a [`TlsWriter`] sharing one
//! `Rc<RefCell<..>>` state whose borrow never spans an `.await`. Both halves can be driven from
//! one task's select loop (a read future and a flush future alive at once) or moved into two
//! tasks on the same core. Reading never waits for writing and the other way round, so two
//! peers writing large amounts at each other cannot deadlock as long as each keeps reading.
//! TLS-level replies produced while reading (a key update, an alert) join the pending buffer
//! and are sent right away if the socket takes them, else by the next `flush`.
//!
//! A mux driver in one task, for example (`mux` is the sans-IO `frame` session):
//!
//! ```ignore
//! let (mut rd, mut wr) = conn.split();
//! let mut input = BytesMut::with_capacity(64 * 1024);
//! loop {
//!     // Move frames into TLS while little is pending: this bounds what one tunnel holds.
//!     while wr.pending() < HIGH_WATER {
//!         let Some((header, payload)) = mux.poll_transmit(now) else { break };
//!         wr.queue(&[&header, &payload])?; // synchronous: committed when it returns
//!     }
//!     monoio::select! {
//!         r = rd.read(&mut input) => {
//!             if r? == 0 { break; } // the peer's close_notify
//!             mux.handle_input(&mut input, now)?;
//!         }
//!         r = wr.flush(), if wr.pending() > 0 => r?,
//!         _ = monoio::time::sleep(mux.poll_timeout(now)) => mux.handle_timeout(now),
//!     }
//! }
//! ```
//!
//! Whichever branch wins, the others are dropped, and that is safe: a dropped `read` or
//! `flush` loses nothing, and the loop calls them again.
//!
//! # End of stream
//!
//! `read` returns `Ok(0)` once the peer's close_notify has been processed, whether or not TCP
//! is closed yet. A TCP FIN without a close_notify is [`TlsError::TruncatedByPeer`]: an
//! attacker can forge a FIN, so only close_notify marks the data as complete.
//!
//! # Never a panic from the network
//!
//! Every byte from the peer goes through rustls (the handshake) or the record layer (after
//! it), whose errors become [`TlsError`] values, and the code here indexes with checked
//! accessors. After a protocol error the connection sends the alert owed to the peer if the
//! socket takes it without waiting, and every later call returns the same error. A monoio
//! task that panics takes every connection of its core down with it.
//!
//! # Moving a connection to another core
//!
//! The proxy accepts a user on any core and then serves it on the core that owns the node's
//! tunnel. [`TlsConnection::into_transferable`] turns an established connection into a
//! [`TransferableTls`] (`Send`: the socket, the rustls session, the bytes in transit), and
//! [`TransferableTls::attach`] turns it back into a [`TlsConnection`] inside the destination
//! thread's runtime. The contract:
//!
//! * **When it is legal.** Any time the caller holds the whole connection (reunite split
//!   halves with [`TlsConnection::reunite`]) and the connection has not failed: between two
//!   calls, with reads or flushes cancelled or not. No read or flush can be in progress, since
//!   the move takes the connection by value. Call it inside the source runtime, attach inside
//!   the destination runtime; either can use either driver.
//! * **Nothing is lost or duplicated.** Plaintext decrypted but not read, and the start of a
//!   record only partly received, travel with the connection and come out of the first reads
//!   on the destination, before anything the socket receives later. Ciphertext committed by
//!   `queue` but not yet taken by the kernel travels too and is sent first on the destination
//!   (the move does not wait for a slow peer to read it). Whatever sits in the kernel's queues
//!   stays there: it is the same socket.
//! * **The source runtime lets go entirely.** The connection's readiness waits are dropped:
//!   on io_uring that cancels their `PollAdd`s, on the legacy driver it only forgets a waker.
//!   monoio's own descriptor is closed by the source runtime (on the legacy driver at once,
//!   after removing it from that runtime's epoll set, which is why the move must happen inside
//!   the runtime; on io_uring once the ring has completed the cancelled polls, typically on its
//!   next turn), and the connection travels with a duplicate made by `F_DUPFD_CLOEXEC`. A poll
//!   still in the source ring for that short while only observes the socket: it takes no
//!   bytes, and poll wake-ups reach every waiter, so it cannot steal readiness from the
//!   destination. The move therefore needs one spare descriptor for a moment; without one it
//!   fails and hands the connection back.
//! * **Failures hand the connection back.** [`TransferError`] carries the reason and the
//!   untouched connection. A connection that has already failed is refused with its failure.
//!   If the destination runtime cannot register the socket, `attach` closes it and says why.
//! * A dropped `TransferableTls` closes the connection without a close_notify.
//!
//! The runtime must be built with `enable_timer()` (the handshake deadline uses monoio's timer).
//! Both drivers work: io_uring and the legacy epoll driver (for hosts without io_uring).

mod error;
mod handoff;
mod record;
mod session;
mod sys;

use std::{
    cell::RefCell,
    fmt, io,
    net::SocketAddr,
    os::fd::{AsRawFd, RawFd},
    rc::Rc,
    sync::Arc,
    time::Duration,
};

use bytes::BytesMut;
use monoio::net::TcpStream;
use rustls::unbuffered::EncryptError;
use rustls_pki_types::{CertificateDer, ServerName};

use error::Fault;
pub use error::{Peer, TlsError};
pub use handoff::{ReuniteError, TransferError, TransferableTls};
#[doc(hidden)]
pub use record::{key_updates, set_key_update_after};
use session::{Counting, Encrypt, Outcome, PlainSink, Session, Sink};
use sys::{Direction, ReadinessWait, Scratch};

/// Received bytes a connection may hold while waiting for the rest of a message: a handshake
/// message of up to 64 KiB (rustls's own limit for buffered connections) spread over records,
/// plus one record. Caps what a peer that never completes a message can make us hold.
pub const MAX_PENDING_INCOMING: usize = 0x1_0000 + 2 * 18 * 1024;

/// A read on an established connection that brings at least this much plaintext hands its
/// whole receive buffer to the caller; less is copied into the caller's buffer (see
/// `State::receive_established`). Bulk transfers read 256 KiB at a time.
const HAND_OVER_FROM: usize = 64 * 1024;

/// `read` yields to other tasks after this many receive rounds that delivered no plaintext.
const MAX_ROUNDS_WITHOUT_YIELD: u32 = 8;

/// Deadlines longer than this are treated as this (monoio's timer panics on absurd ones).
const MAX_DEADLINE: Duration = Duration::from_secs(365 * 24 * 3600);

/// Opens a TLS client session over `tcp`, with mutual TLS if `config` has a client
/// certificate. Fails with [`TlsError::HandshakeTimeout`] if the handshake has not finished
/// within `deadline`. Sets `TCP_NODELAY` (the tunnel batches its own writes).
pub async fn connect(
    tcp: TcpStream,
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
    deadline: Duration,
) -> Result<TlsConnection, TlsError> {
    let session = Session::client(config, server_name).map_err(TlsError::Config)?;
    TlsConnection::new(tcp, session)?.establish(deadline).await
}

/// Accepts a TLS server session over `tcp`; client certificates are checked as `config` says.
/// Fails with [`TlsError::HandshakeTimeout`] if the handshake has not finished within
/// `deadline` (a silent peer, or one sending a byte a second, cannot hold the slot longer).
/// Sets `TCP_NODELAY`.
pub async fn accept(
    tcp: TcpStream,
    config: Arc<rustls::ServerConfig>,
    deadline: Duration,
) -> Result<TlsConnection, TlsError> {
    let session = Session::server(config).map_err(TlsError::Config)?;
    TlsConnection::new(tcp, session)?.establish(deadline).await
}

/// Like [`accept`], but the peer must also have sent its whole ClientHello within `hello`
/// (the server has answered it), or the handshake fails with [`TlsError::HelloTimeout`]: a
/// peer that connects and stays silent, or trickles its first message, is let go after
/// `hello` instead of `deadline`. A `hello` at or beyond `deadline` is `accept`.
pub async fn accept_within(
    tcp: TcpStream,
    config: Arc<rustls::ServerConfig>,
    hello: Duration,
    deadline: Duration,
) -> Result<TlsConnection, TlsError> {
    let session = Session::server(config).map_err(TlsError::Config)?;
    let conn = TlsConnection::new(tcp, session)?;
    if hello >= deadline {
        return conn.establish(deadline).await;
    }
    let shared = Rc::clone(&conn.reader.shared);
    let peer = shared.peer;
    // The server's first bytes are its answer to the ClientHello (or an alert, which ends
    // the handshake anyway).
    let silent = async {
        monoio::time::sleep(hello).await;
        if shared.state.borrow().sent_any {
            std::future::pending::<()>().await;
        }
    };
    monoio::select! {
        done = conn.establish(deadline) => done,
        () = silent => Err(TlsError::HelloTimeout { peer, deadline: hello }),
    }
}

/// An established TLS connection. Use it whole for sequential work, or [`split`] it to read
/// and write concurrently.
///
/// [`split`]: TlsConnection::split
#[derive(Debug)]
pub struct TlsConnection {
    reader: TlsReader,
    writer: TlsWriter,
}

/// The reading half of a [`TlsConnection`].
#[derive(Debug)]
pub struct TlsReader {
    shared: Rc<Shared>,
    ready: ReadinessWait,
    /// Whether a `recv` may find bytes without waiting: false after a short read or `EAGAIN`
    /// (the kernel's queue was empty then), true after readiness or a full read.
    maybe_readable: bool,
}

/// The writing half of a [`TlsConnection`].
#[derive(Debug)]
pub struct TlsWriter {
    shared: Rc<Shared>,
    ready: ReadinessWait,
}

/// What both halves share. Dropping the last half shuts the socket down (see [`Socket`]).
struct Shared {
    tcp: Socket,
    peer: Peer,
    local: Option<SocketAddr>,
    state: RefCell<State>,
}

/// The connection's socket. Dropping it shuts the socket down, unless the connection has been
/// handed to another thread (see [`TlsConnection::into_transferable`]), which then owns the
/// socket through a descriptor of its own.
struct Socket {
    stream: Rc<TcpStream>,
    handed_off: bool,
}

struct State {
    session: Session,
    /// Received bytes rustls has not consumed: the start of a record or of a handshake
    /// message. Empty, without an allocation, at a record boundary.
    incoming: Vec<u8>,
    /// Plaintext decrypted when no caller buffer was at hand (the handshake); handed out first
    /// by the next read.
    plain: Vec<u8>,
    /// Ciphertext the kernel has not taken yet; `out[out_sent..]` is pending. Released as soon
    /// as it is all sent.
    out: Vec<u8>,
    out_sent: usize,
    /// Some bytes were sent: for a server, its answer to the ClientHello has begun.
    sent_any: bool,
    /// The peer's close_notify has been processed.
    peer_closed: bool,
    /// We queued our close_notify.
    close_notify_sent: bool,
    read_fault: Option<Fault>,
    write_fault: Option<Fault>,
    /// The task waiting in `flush` for the socket to take bytes: woken when the reading side
    /// fails the whole session, which a full socket would otherwise never report.
    write_waiter: Option<std::task::Waker>,
}

/// What one receive step did.
enum Received {
    /// Nothing to read now.
    WouldBlock,
    /// The peer closed TCP.
    Eof,
    /// Bytes were received and processed.
    Data {
        /// The `recv` filled the whole chunk: more is probably waiting.
        full: bool,
        /// Plaintext bytes delivered.
        plaintext: usize,
    },
}

/// `TCP_NOTSENT_LOWAT` of every connection: the kernel reports a socket writable only while
/// less than this waits unsent, so a stream's bulk data does not queue megabytes in the kernel
/// ahead of a PING or another stream's keystroke (what `flush` has not handed over waits in
/// user space, where the multiplexer can still put other frames first). 128 KiB keeps a
/// loopback or LAN path full; [`TlsConnection::set_notsent_lowat`] changes it.
pub const DEFAULT_NOTSENT_LOWAT: u32 = 128 * 1024;

impl TlsConnection {
    fn new(tcp: TcpStream, session: Session) -> Result<Self, TlsError> {
        let peer = Peer(tcp.peer_addr().ok());
        let local = tcp.local_addr().ok();
        tcp.set_nodelay(true)
            .map_err(|source| TlsError::Io { peer, source })?;
        // Best effort: a kernel without the option still works, with a longer send queue.
        let _ = sys::with_socket(&tcp, |s| s.set_tcp_notsent_lowat(DEFAULT_NOTSENT_LOWAT));
        let state = State {
            session,
            incoming: Vec::new(),
            plain: Vec::new(),
            out: Vec::new(),
            out_sent: 0,
            sent_any: false,
            peer_closed: false,
            close_notify_sent: false,
            read_fault: None,
            write_fault: None,
            write_waiter: None,
        };
        Ok(Self::from_shared(Shared {
            tcp: Socket::new(tcp),
            peer,
            local,
            state: RefCell::new(state),
        }))
    }

    /// Both halves over `shared`, with no readiness wait in flight. The first read tries
    /// `recv` before it waits: the socket may hold bytes nobody has looked at yet.
    fn from_shared(shared: Shared) -> Self {
        Self::from_rc(Rc::new(shared))
    }

    fn from_rc(shared: Rc<Shared>) -> Self {
        Self {
            reader: TlsReader {
                shared: Rc::clone(&shared),
                ready: ReadinessWait::new(Direction::Read),
                maybe_readable: true,
            },
            writer: TlsWriter {
                shared,
                ready: ReadinessWait::new(Direction::Write),
            },
        }
    }

    async fn establish(mut self, deadline: Duration) -> Result<Self, TlsError> {
        let deadline = deadline.min(MAX_DEADLINE);
        let peer = self.reader.shared.peer;
        match monoio::time::timeout(deadline, self.handshake()).await {
            Ok(Ok(())) => Ok(self),
            Ok(Err(fault)) => Err(fault.into_error(peer)),
            Err(_elapsed) => Err(TlsError::HandshakeTimeout { peer, deadline }),
        }
    }

    async fn handshake(&mut self) -> Result<(), Fault> {
        let fd = self.reader.shared.fd();
        // Process what is there (nothing): lets a client produce its ClientHello.
        self.reader.receive_step(false, None)?;
        loop {
            if let Err(fault) = self.writer.flush_inner().await {
                // The peer may have refused us and closed: its alert says why, which is worth
                // more to an operator than the broken pipe.
                if let Err(Fault::Tls(e)) = self.reader.receive_step(true, None) {
                    return Err(Fault::Tls(e));
                }
                return Err(fault);
            }
            {
                let mut state = self.reader.shared.state.borrow_mut();
                if !state.session.is_handshaking() {
                    // Everything rustls produced is sent: our record layer takes over.
                    if !state.peer_closed {
                        if let Err(fault) = state.session.establish() {
                            return Err(state.fail(fault, fd));
                        }
                    }
                    return Ok(());
                }
                if state.peer_closed {
                    return Err(Fault::ClosedDuringHandshake);
                }
            }
            // Receive until rustls has taken something in.
            loop {
                if self.reader.maybe_readable {
                    match self.reader.receive_step(true, None)? {
                        Received::WouldBlock => self.reader.maybe_readable = false,
                        Received::Eof => {
                            let mut state = self.reader.shared.state.borrow_mut();
                            return Err(state.fail(Fault::ClosedDuringHandshake, fd));
                        }
                        Received::Data { full, .. } => {
                            self.reader.maybe_readable = full;
                            break;
                        }
                    }
                }
                self.reader.wait_readable().await?;
            }
        }
    }

    /// Separates the reading and the writing half; they may be used from one task or two.
    pub fn split(self) -> (TlsReader, TlsWriter) {
        (self.reader, self.writer)
    }

    /// See [`TlsReader::read`].
    pub async fn read(&mut self, buf: &mut BytesMut) -> Result<usize, TlsError> {
        self.reader.read(buf).await
    }

    /// See [`TlsWriter::queue`].
    pub fn queue(&mut self, parts: &[&[u8]]) -> Result<(), TlsError> {
        self.writer.queue(parts)
    }

    /// See [`TlsWriter::pending`].
    pub fn pending(&self) -> usize {
        self.writer.pending()
    }

    /// See [`TlsWriter::flush`].
    pub async fn flush(&mut self) -> Result<(), TlsError> {
        self.writer.flush().await
    }

    /// See [`TlsWriter::write_all`].
    pub async fn write_all(&mut self, parts: &[&[u8]]) -> Result<(), TlsError> {
        self.writer.write_all(parts).await
    }

    /// See [`TlsWriter::close`].
    pub async fn close(&mut self) -> Result<(), TlsError> {
        self.writer.close().await
    }

    /// The peer's certificate chain, end-entity first; `None` if the peer sent none (a client
    /// when the server does not ask for one).
    pub fn peer_certificates(&self) -> Option<Vec<CertificateDer<'static>>> {
        self.reader.shared.peer_certificates()
    }

    /// The ALPN protocol agreed on, if any.
    pub fn alpn_protocol(&self) -> Option<Vec<u8>> {
        let state = self.reader.shared.state.borrow();
        state.session.alpn_protocol().map(<[u8]>::to_vec)
    }

    /// The TLS version agreed on.
    pub fn protocol_version(&self) -> Option<rustls::ProtocolVersion> {
        self.reader.shared.state.borrow().session.protocol_version()
    }

    /// The peer's address, if the socket still knows it.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.reader.shared.peer.0
    }

    /// Our end's address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.reader.shared.local
    }

    /// Sets `TCP_NODELAY` (on by default).
    pub fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        self.writer.set_nodelay(nodelay)
    }

    /// See [`TlsWriter::set_notsent_lowat`].
    pub fn set_notsent_lowat(&self, bytes: u32) -> io::Result<()> {
        self.writer.set_notsent_lowat(bytes)
    }
}

impl TlsReader {
    /// Reads plaintext, appending it to `buf`; returns how many bytes were appended. `Ok(0)`
    /// means the peer closed the session cleanly (close_notify); a TCP close without it is
    /// [`TlsError::TruncatedByPeer`].
    ///
    /// Cancel-safe: see the module documentation. One `recv` of up to 256 KiB is processed per
    /// wake-up, so `buf` grows by at most that much plus what was decrypted during the
    /// handshake (room for all of it is reserved at once, before decrypting).
    pub async fn read(&mut self, buf: &mut BytesMut) -> Result<usize, TlsError> {
        let peer = self.shared.peer;
        // Rounds that received bytes but no plaintext: a peer streaming records without data
        // (handshake messages, alerts) must not keep the core to itself.
        let mut idle_rounds = 0u32;
        loop {
            {
                let mut state = self.shared.state.borrow_mut();
                if !state.plain.is_empty() {
                    buf.extend_from_slice(&state.plain);
                    let n = state.plain.len();
                    state.plain = Vec::new();
                    return Ok(n);
                }
                if let Some(fault) = &state.read_fault {
                    return Err(fault.clone().into_error(peer));
                }
                if state.peer_closed {
                    return Ok(0);
                }
            }
            if self.maybe_readable {
                let step = self
                    .receive_step(true, Some(buf as &mut dyn PlainSink))
                    .map_err(|f| f.into_error(peer))?;
                match step {
                    Received::WouldBlock => self.maybe_readable = false,
                    Received::Eof => {
                        let fd = self.shared.fd();
                        let mut state = self.shared.state.borrow_mut();
                        if state.peer_closed {
                            return Ok(0);
                        }
                        return Err(state.fail(Fault::Truncated, fd).into_error(peer));
                    }
                    Received::Data { full, plaintext } => {
                        self.maybe_readable = full;
                        if plaintext > 0 {
                            return Ok(plaintext);
                        }
                        // A partial record, or a TLS message without data: go round.
                        idle_rounds += 1;
                        if idle_rounds % MAX_ROUNDS_WITHOUT_YIELD == 0 {
                            sys::yield_now().await;
                        }
                        continue;
                    }
                }
            }
            self.wait_readable().await.map_err(|f| f.into_error(peer))?;
        }
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.shared.peer.0
    }

    /// The peer's certificate chain, end-entity first.
    pub fn peer_certificates(&self) -> Option<Vec<CertificateDer<'static>>> {
        self.shared.peer_certificates()
    }

    async fn wait_readable(&mut self) -> Result<(), Fault> {
        match self.ready.wait(&self.shared.tcp.stream).await {
            Ok(()) => {
                self.maybe_readable = true;
                Ok(())
            }
            Err(e) => {
                let fd = self.shared.fd();
                Err(self.shared.state.borrow_mut().fail(Fault::io(&e), fd))
            }
        }
    }

    /// One synchronous step: `recv` (if `recv_now`) into the per-core buffer after what is left
    /// from before, let rustls process every complete record, keep the rest. Plaintext goes to
    /// `sink`, or to the connection's own buffer if there is none. Failures are recorded.
    fn receive_step(
        &mut self,
        recv_now: bool,
        sink: Option<&mut dyn PlainSink>,
    ) -> Result<Received, Fault> {
        let fd = self.shared.fd();
        let mut state = self.shared.state.borrow_mut();
        match state.receive(fd, recv_now, sink) {
            Ok(received) => {
                // Replies rustls produced (alerts, key updates) go out now if they can; a
                // failure to send is the writer's to report.
                if state.pending() > 0 && state.write_fault.is_none() {
                    if let Err(fault) = state.try_send_out(fd) {
                        state.write_fault = Some(fault);
                    }
                }
                Ok(received)
            }
            Err(fault) => Err(state.fail(fault, fd)),
        }
    }
}

impl TlsWriter {
    /// Encrypts `parts` as one stream of bytes (full-size records; the slices are not
    /// concatenated first, except where a record spans two of them) and commits the records
    /// to the connection: sent right away as far as the kernel takes them, the rest kept in
    /// order for [`flush`](Self::flush). Synchronous: returns once the data is committed.
    ///
    /// The connection holds whatever the kernel did not take; a caller that queues without
    /// flushing is expected to bound that with [`pending`](Self::pending).
    pub fn queue(&mut self, parts: &[&[u8]]) -> Result<(), TlsError> {
        let peer = self.shared.peer;
        let fd = self.shared.fd();
        let mut state = self.shared.state.borrow_mut();
        state.check_writable().map_err(|f| f.into_error(peer))?;
        if parts.iter().all(|p| p.is_empty()) {
            return Ok(());
        }
        // Older records first: the direct-send path below is only taken with nothing pending.
        if state.pending() > 0 {
            if let Err(fault) = state.try_send_out(fd) {
                return Err(state.fail_write(fault).into_error(peer));
            }
        }
        let mut encrypt =
            |enc: &mut dyn Encrypt, out: &mut Vec<u8>| encrypt_parts(enc, parts, out, fd);
        match state.drive_for_write(Some(&mut encrypt)) {
            Ok(Outcome::Traffic) => Ok(()),
            Ok(_) => Err(state.fail_write(Fault::WriteAfterClose).into_error(peer)),
            Err(fault) => Err(state.fail_write(fault).into_error(peer)),
        }
    }

    /// Ciphertext bytes committed but not yet taken by the kernel.
    pub fn pending(&self) -> usize {
        self.shared.state.borrow().pending()
    }

    /// Waits until every committed byte has been handed to the kernel. Cancel-safe: dropping
    /// it loses nothing, the next `flush` continues.
    pub async fn flush(&mut self) -> Result<(), TlsError> {
        let peer = self.shared.peer;
        self.flush_inner().await.map_err(|f| f.into_error(peer))
    }

    /// [`queue`](Self::queue) then [`flush`](Self::flush). The data is committed on the first
    /// poll, so dropping this future later does not un-send it.
    pub async fn write_all(&mut self, parts: &[&[u8]]) -> Result<(), TlsError> {
        self.queue(parts)?;
        self.flush().await
    }

    /// Sends close_notify, flushes, and closes the TCP write side. The reader can go on reading
    /// until the peer's own close_notify (`Ok(0)`). Calling it again does nothing more.
    pub async fn close(&mut self) -> Result<(), TlsError> {
        let peer = self.shared.peer;
        let fd = self.shared.fd();
        {
            let mut state = self.shared.state.borrow_mut();
            if !state.close_notify_sent {
                if let Some(fault) = &state.write_fault {
                    return Err(fault.clone().into_error(peer));
                }
                let mut encrypt =
                    |enc: &mut dyn Encrypt, out: &mut Vec<u8>| encrypt_close_notify(enc, out, fd);
                match state.drive_for_write(Some(&mut encrypt)) {
                    // Closed: both close_notifys are already out; nothing to add.
                    Ok(Outcome::Traffic | Outcome::Closed) => state.close_notify_sent = true,
                    Ok(Outcome::Blocked) => {
                        return Err(state
                            .fail_write(Fault::Internal("close during the handshake".into()))
                            .into_error(peer));
                    }
                    Err(fault) => return Err(state.fail_write(fault).into_error(peer)),
                }
            }
        }
        self.flush().await?;
        sys::shutdown(fd, libc::SHUT_WR);
        Ok(())
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.shared.peer.0
    }

    /// Sets `TCP_NODELAY` (on by default).
    pub fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        self.shared.tcp.stream.set_nodelay(nodelay)
    }

    /// Sets `TCP_NOTSENT_LOWAT`: the socket reports writable only while fewer than `bytes`
    /// bytes wait unsent in the kernel. Keeps the kernel's send queue short, so that what the
    /// proxy sends next (a PING, another stream's frame) is not stuck behind megabytes of one
    /// stream's data; [`flush`](Self::flush) then waits in user space instead.
    pub fn set_notsent_lowat(&self, bytes: u32) -> io::Result<()> {
        sys::with_socket(&self.shared.tcp.stream, |s| s.set_tcp_notsent_lowat(bytes))
    }

    async fn flush_inner(&mut self) -> Result<(), Fault> {
        let fd = self.shared.fd();
        loop {
            {
                let mut state = self.shared.state.borrow_mut();
                if let Some(fault) = &state.write_fault {
                    return Err(fault.clone());
                }
                match state.try_send_out(fd) {
                    Ok(true) => return Ok(()),
                    Ok(false) => {}
                    Err(fault) => return Err(state.fail_write(fault)),
                }
            }
            let shared = &self.shared;
            let mut ready = std::pin::pin!(self.ready.wait(&shared.tcp.stream));
            let waited = std::future::poll_fn(|cx| {
                let mut state = shared.state.borrow_mut();
                if state.write_fault.is_some() {
                    state.write_waiter = None;
                    return std::task::Poll::Ready(Ok(()));
                }
                state.write_waiter = Some(cx.waker().clone());
                drop(state);
                ready.as_mut().poll(cx)
            })
            .await;
            shared.state.borrow_mut().write_waiter = None;
            if let Err(e) = waited {
                return Err(self.shared.state.borrow_mut().fail_write(Fault::io(&e)));
            }
        }
    }
}

impl Shared {
    fn fd(&self) -> RawFd {
        self.tcp.stream.as_raw_fd()
    }

    fn peer_certificates(&self) -> Option<Vec<CertificateDer<'static>>> {
        let state = self.state.borrow();
        state.session.peer_certificates().map(<[_]>::to_vec)
    }
}

impl Socket {
    fn new(stream: TcpStream) -> Self {
        Self {
            stream: Rc::new(stream),
            handed_off: false,
        }
    }
}

impl Drop for Socket {
    /// Shuts the socket down before it is closed. A readiness wait abandoned in the io_uring
    /// ring (see `sys::ReadinessWait`) keeps the socket open until it completes; `shutdown`
    /// completes it, so the peer sees the close now rather than whenever it next sends.
    ///
    /// Not after a hand-off: `shutdown` acts on the socket, not on this descriptor, and the
    /// socket now lives on in another thread.
    fn drop(&mut self) {
        if !self.handed_off {
            sys::shutdown(self.stream.as_raw_fd(), libc::SHUT_RDWR);
        }
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("peer", &self.peer)
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl State {
    fn pending(&self) -> usize {
        self.out.len().saturating_sub(self.out_sent)
    }

    fn check_writable(&self) -> Result<(), Fault> {
        if let Some(fault) = &self.write_fault {
            return Err(fault.clone());
        }
        if self.close_notify_sent {
            return Err(Fault::WriteAfterClose);
        }
        Ok(())
    }

    /// See [`TlsReader::receive_step`].
    fn receive(
        &mut self,
        fd: RawFd,
        recv_now: bool,
        sink: Option<&mut dyn PlainSink>,
    ) -> Result<Received, Fault> {
        let sink = match sink.map(|s| s.direct()) {
            Some(Ok(buf)) if recv_now && matches!(self.session, Session::Established(_)) => {
                return self.receive_established(fd, buf);
            }
            Some(Ok(buf)) => Some(buf as &mut dyn PlainSink),
            Some(Err(sink)) => Some(sink),
            None => None,
        };
        let Self {
            session,
            incoming,
            plain,
            out,
            peer_closed,
            ..
        } = self;
        let mut counting = Counting {
            inner: match sink {
                Some(sink) => sink,
                None => plain,
            },
            count: 0,
        };
        sys::with_scratch(Scratch::Recv, |scratch| {
            let keep = incoming.len();
            let end = keep + sys::RECV_CHUNK;
            if scratch.len() < end {
                scratch.resize(end, 0);
            }
            let (head, tail) = scratch.split_at_mut(keep);
            head.copy_from_slice(incoming);
            let mut filled = keep;
            let mut full = false;
            if recv_now {
                let room = tail.get_mut(..sys::RECV_CHUNK).unwrap_or_default();
                match sys::recv(fd, room) {
                    Ok(0) => return Ok(Received::Eof),
                    Ok(n) => {
                        filled += n;
                        full = n == sys::RECV_CHUNK;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return Ok(Received::WouldBlock);
                    }
                    Err(e) => return Err(Fault::io(&e)),
                }
            }
            // Plaintext is never longer than the ciphertext it came from: one allocation
            // for all the records of this read, instead of the sink growing (and copying
            // what it holds) record by record.
            counting.reserve(filled);
            let received = scratch.get_mut(..filled).unwrap_or_default();
            let mut sink = Sink {
                out,
                plain: &mut counting,
                peer_closed,
            };
            let driven = session.drive(received, &mut sink, None);
            keep_unconsumed(incoming, scratch.get(driven.consumed..filled));
            driven.result?;
            check_pending(incoming)?;
            Ok(Received::Data {
                full,
                plaintext: counting.count,
            })
        })
    }

    /// [`receive`](Self::receive) on an established connection, into `buf` without copying
    /// the plaintext: the `recv` lands in a fresh buffer (the per-core spare one) after what
    /// `buf` held and the start of a record kept from before, the records are opened where
    /// they lie (`RecordLayer::open_in_place`), and the buffer becomes `buf` if it carries
    /// [`HAND_OVER_FROM`] bytes of new plaintext or more. What `buf` held is copied once
    /// (usually the start of a frame); the new bytes not at all.
    fn receive_established(&mut self, fd: RawFd, buf: &mut BytesMut) -> Result<Received, Fault> {
        let Self {
            session,
            incoming,
            peer_closed,
            ..
        } = self;
        let Session::Established(layer) = session else {
            return Err(Fault::Internal("no record layer".into()));
        };
        let mut fresh = sys::take_recv_buffer();
        fresh.reserve(buf.len() + incoming.len() + sys::RECV_CHUNK);
        fresh.extend_from_slice(buf);
        let start = fresh.len();
        fresh.extend_from_slice(incoming);
        let received = match sys::recv_into_spare(fd, &mut fresh, sys::RECV_CHUNK) {
            Ok(0) => Ok(Received::Eof),
            Ok(n) => Ok(Received::Data {
                full: n == sys::RECV_CHUNK,
                plaintext: 0,
            }),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Received::WouldBlock),
            Err(e) => Err(Fault::io(&e)),
        };
        let Ok(Received::Data { full, .. }) = received else {
            sys::give_back_recv_buffer(fresh);
            return received;
        };
        let region = fresh.get_mut(start..).unwrap_or_default();
        let opened = layer.open_in_place(region, peer_closed);
        keep_unconsumed(incoming, region.get(opened.consumed..));
        fresh.truncate(start + opened.plaintext);
        if opened.plaintext >= HAND_OVER_FROM {
            *buf = fresh;
        } else {
            // Little arrived: copied, so that the caller's buffer stays small (a connection
            // that keeps its buffer between reads would otherwise keep a whole receive's
            // room), and the big buffer serves the next read.
            buf.extend_from_slice(fresh.get(start..).unwrap_or_default());
            sys::give_back_recv_buffer(fresh);
        }
        opened.result?;
        check_pending(incoming)?;
        Ok(Received::Data {
            full,
            plaintext: opened.plaintext,
        })
    }

    /// Runs rustls with no new input until it can send application data, then lets `write`
    /// encrypt. Messages rustls had queued (a key update) are encoded first, so the order on
    /// the wire is right.
    fn drive_for_write(&mut self, write: Option<session::WriteFn<'_>>) -> Result<Outcome, Fault> {
        let Self {
            session,
            incoming,
            plain,
            out,
            peer_closed,
            ..
        } = self;
        let mut sink = Sink {
            out,
            plain,
            peer_closed,
        };
        // The kept bytes go in again even though nothing new arrived: see `Session::drive`.
        let driven = session.drive(incoming, &mut sink, write);
        if driven.consumed > 0 {
            if driven.consumed >= incoming.len() {
                *incoming = Vec::new();
            } else {
                incoming.drain(..driven.consumed);
            }
        }
        driven.result
    }

    /// Sends pending ciphertext until it is all sent (`Ok(true)`) or the kernel takes no more
    /// (`Ok(false)`). The buffer is released once empty: an idle connection holds none.
    fn try_send_out(&mut self, fd: RawFd) -> Result<bool, Fault> {
        while self.out_sent < self.out.len() {
            let unsent = self.out.get(self.out_sent..).unwrap_or_default();
            match sys::send(fd, unsent) {
                Ok(n) => {
                    self.out_sent += n;
                    self.sent_any |= n > 0;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(Fault::io(&e)),
            }
        }
        self.out = Vec::new();
        self.out_sent = 0;
        Ok(true)
    }

    /// Records a failure of reading (or of the whole session) and returns it. For a protocol
    /// error, lets rustls encode the alert it queued and sends it if the socket takes it now.
    fn fail(&mut self, fault: Fault, fd: RawFd) -> Fault {
        match &fault {
            Fault::Tls(_) | Fault::TooLarge(_) | Fault::Internal(_) => {
                if matches!(fault, Fault::Tls(_))
                    && self.read_fault.is_none()
                    && self.write_fault.is_none()
                {
                    self.session.encode_alert(&mut self.incoming, &mut self.out);
                    let _ = self.try_send_out(fd);
                }
                self.poison(&fault);
            }
            Fault::Io(..) | Fault::Truncated | Fault::ClosedDuringHandshake => {
                self.read_fault.get_or_insert_with(|| fault.clone());
                self.incoming = Vec::new();
            }
            Fault::WriteAfterClose => {}
        }
        fault
    }

    /// Records a failure of writing and returns it. Records already encrypted may be lost, so
    /// the writing side is unusable afterwards; a protocol failure ends reading too.
    fn fail_write(&mut self, fault: Fault) -> Fault {
        match &fault {
            Fault::Tls(_) | Fault::TooLarge(_) | Fault::Internal(_) => self.poison(&fault),
            Fault::WriteAfterClose => {}
            _ => {
                self.write_fault.get_or_insert_with(|| fault.clone());
                self.out = Vec::new();
                self.out_sent = 0;
            }
        }
        fault
    }

    /// Ends both directions for good. rustls is never called again after it failed: it is
    /// not written to be (it panics on some sequences).
    fn poison(&mut self, fault: &Fault) {
        self.read_fault.get_or_insert_with(|| fault.clone());
        self.write_fault.get_or_insert_with(|| fault.clone());
        if let Some(waiter) = self.write_waiter.take() {
            waiter.wake();
        }
        self.out = Vec::new();
        self.out_sent = 0;
        self.incoming = Vec::new();
    }
}

/// Encrypts `parts` as one stream of bytes into full-size records (only the last may be
/// short) in the per-core ciphertext buffer, and sends that buffer once per
/// [`sys::SEND_PIECE`] of ciphertext and once at the end: a batch of frames becomes one
/// `send`, not one per frame or per record. Small slices (a frame header) are gathered with
/// what follows into full records rather than each becoming a record of its own; a slice that
/// starts on a record boundary is encrypted from where it lies, without the gathering copy.
fn encrypt_parts(
    enc: &mut dyn Encrypt,
    parts: &[&[u8]],
    out: &mut Vec<u8>,
    fd: RawFd,
) -> Result<(), Fault> {
    if enc.gathers() {
        return encrypt_parts_gathered(enc, parts, out, fd);
    }
    sys::with_scratch(Scratch::Plain, |staged| {
        sys::with_scratch(Scratch::Cipher, |cipher| {
            staged.clear();
            let mut sealed = Sealed {
                buf: cipher,
                used: 0,
            };
            for part in parts {
                let mut rest: &[u8] = part;
                while !rest.is_empty() {
                    if staged.is_empty() && rest.len() >= sys::RECORD_PLAINTEXT {
                        // Bounded by the room left before the next send, so that the
                        // per-core buffer never holds much more than one piece.
                        let room = sys::SEND_PIECE
                            .saturating_sub(sealed.used)
                            .max(sys::RECORD_PLAINTEXT);
                        let whole =
                            rest.len().min(room) / sys::RECORD_PLAINTEXT * sys::RECORD_PLAINTEXT;
                        let (piece, after) = rest.split_at(whole);
                        sealed.encrypt(enc, piece)?;
                        rest = after;
                    } else {
                        let take = (sys::RECORD_PLAINTEXT - staged.len()).min(rest.len());
                        let (piece, after) = rest.split_at(take);
                        staged.extend_from_slice(piece);
                        rest = after;
                        if staged.len() == sys::RECORD_PLAINTEXT {
                            sealed.encrypt(enc, staged)?;
                            staged.clear();
                        }
                    }
                    if sealed.used >= sys::SEND_PIECE {
                        sealed.send(out, fd)?;
                    }
                }
            }
            if !staged.is_empty() {
                sealed.encrypt(enc, staged)?;
                staged.clear();
            }
            sealed.send(out, fd)
        })
    })
}

/// Keeps the received bytes not consumed yet (the start of a record or of a handshake
/// message) as the connection's `incoming`, without an allocation when there are none. Kept
/// even after an error: rustls needs the same bytes to encode its alert.
fn keep_unconsumed(incoming: &mut Vec<u8>, rest: Option<&[u8]>) {
    match rest {
        Some(rest) if !rest.is_empty() => {
            incoming.clear();
            incoming.extend_from_slice(rest);
        }
        _ => *incoming = Vec::new(),
    }
}

/// Fails once a peer has made us hold more than [`MAX_PENDING_INCOMING`] unconsumed bytes.
fn check_pending(incoming: &[u8]) -> Result<(), Fault> {
    if incoming.len() > MAX_PENDING_INCOMING {
        return Err(Fault::TooLarge(MAX_PENDING_INCOMING));
    }
    Ok(())
}

/// Slices one gathered record may be sealed from; a record of many tiny frames is sealed short
/// once it has this many (rare: frames are at least 9 bytes, data frames much larger).
const MAX_PIECES_PER_RECORD: usize = 64;

/// [`encrypt_parts`] for our record layer, which seals a record straight from the slices it
/// spans: every byte is copied once, into the record it is sealed in.
fn encrypt_parts_gathered(
    enc: &mut dyn Encrypt,
    parts: &[&[u8]],
    out: &mut Vec<u8>,
    fd: RawFd,
) -> Result<(), Fault> {
    sys::with_scratch(Scratch::Cipher, |cipher| {
        let mut sealed = Sealed {
            buf: cipher,
            used: 0,
        };
        let mut pieces: [&[u8]; MAX_PIECES_PER_RECORD] = [&[]; MAX_PIECES_PER_RECORD];
        let mut count = 0;
        let mut filled = 0;
        for part in parts {
            let mut rest: &[u8] = part;
            while !rest.is_empty() {
                let take = (sys::RECORD_PLAINTEXT - filled).min(rest.len());
                let (piece, after) = rest.split_at(take);
                rest = after;
                if let Some(slot) = pieces.get_mut(count) {
                    *slot = piece;
                }
                count += 1;
                filled += take;
                if filled == sys::RECORD_PLAINTEXT || count == MAX_PIECES_PER_RECORD {
                    sealed.encrypt_gathered(enc, pieces.get(..count).unwrap_or_default())?;
                    count = 0;
                    filled = 0;
                    if sealed.used >= sys::SEND_PIECE {
                        sealed.send(out, fd)?;
                    }
                }
            }
        }
        if count > 0 {
            sealed.encrypt_gathered(enc, pieces.get(..count).unwrap_or_default())?;
        }
        sealed.send(out, fd)
    })
}

/// Records encrypted into the per-core ciphertext buffer and not yet sent: `buf[..used]`.
/// `buf` keeps its length (zero-filled once per core) so that reusing it costs nothing.
struct Sealed<'a> {
    buf: &'a mut Vec<u8>,
    used: usize,
}

impl Sealed<'_> {
    /// Appends `plaintext`, encrypted into records, after what is already there.
    fn encrypt(&mut self, enc: &mut dyn Encrypt, plaintext: &[u8]) -> Result<(), Fault> {
        let records = plaintext.len().div_ceil(sys::RECORD_PLAINTEXT).max(1);
        let estimate = plaintext.len() + records * sys::RECORD_OVERHEAD;
        self.encode(estimate, |buf| enc.encrypt(plaintext, buf))
    }

    /// Appends one record sealed from `pieces` (see [`Encrypt::encrypt_gathered`]).
    fn encrypt_gathered(&mut self, enc: &mut dyn Encrypt, pieces: &[&[u8]]) -> Result<(), Fault> {
        let len: usize = pieces.iter().map(|p| p.len()).sum();
        self.encode(len + 2 * sys::RECORD_OVERHEAD, |buf| {
            enc.encrypt_gathered(pieces, buf)
                .unwrap_or(Err(EncryptError::EncryptExhausted))
        })
    }

    fn encode(
        &mut self,
        estimate: usize,
        mut encode: impl FnMut(&mut [u8]) -> Result<usize, EncryptError>,
    ) -> Result<(), Fault> {
        if self.buf.len() < self.used + estimate {
            self.buf.resize(self.used + estimate, 0);
        }
        loop {
            let room = self.buf.get_mut(self.used..).unwrap_or_default();
            match encode(room) {
                Ok(n) => {
                    self.used += n;
                    return Ok(());
                }
                Err(EncryptError::InsufficientSize(e)) if e.required_size > room.len() => {
                    let need = self.used + e.required_size;
                    self.buf.resize(need, 0);
                }
                Err(e) => return Err(Fault::Internal(format!("encrypting: {e}"))),
            }
        }
    }

    /// Sends the records directly if nothing is pending before them, keeping what the kernel
    /// does not take (or everything, if something is pending) at the end of `out`.
    fn send(&mut self, out: &mut Vec<u8>, fd: RawFd) -> Result<(), Fault> {
        let records = self.buf.get(..self.used).unwrap_or_default();
        self.used = 0;
        if records.is_empty() {
            return Ok(());
        }
        let mut sent = 0;
        if out.is_empty() {
            match sys::send(fd, records) {
                Ok(n) => sent = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(Fault::io(&e)),
            }
        }
        out.extend_from_slice(records.get(sent..).unwrap_or_default());
        Ok(())
    }
}

fn encrypt_close_notify(enc: &mut dyn Encrypt, out: &mut Vec<u8>, fd: RawFd) -> Result<(), Fault> {
    sys::with_scratch(Scratch::Cipher, |cipher| {
        let mut sealed = Sealed {
            buf: cipher,
            used: 0,
        };
        sealed.encode(sys::RECORD_OVERHEAD * 2, |buf| enc.close_notify(buf))?;
        sealed.send(out, fd)
    })
}
