//! Moving an established connection to another thread (another core's monoio runtime).
//!
//! See "Moving a connection to another core" in the [module documentation](super) for the
//! contract. What travels is everything the connection is: a descriptor of the socket, the
//! rustls session, the received bytes not yet delivered and the ciphertext not yet sent.
//! Nothing of the source runtime travels: no readiness wait, no driver registration, no
//! per-core buffer (those only hold bytes during a synchronous step, never between calls).

use std::{
    cell::RefCell,
    error::Error,
    fmt,
    net::SocketAddr,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    rc::Rc,
};

use monoio::net::TcpStream;
use rustls_pki_types::CertificateDer;

use super::{
    Fault, Peer, Shared, Socket, State, TlsConnection, TlsError, TlsReader, TlsWriter,
    session::Session, sys,
};

/// An established TLS connection on its way to another thread: made by
/// [`TlsConnection::into_transferable`] on the source thread, turned back into a connection by
/// [`attach`](Self::attach) inside the destination thread's monoio runtime.
///
/// It owns the socket: dropping it closes the connection (without a close_notify; the peer sees
/// a truncated stream). It holds no reference to either runtime.
pub struct TransferableTls {
    /// The socket. The only descriptor of it once the source runtime has closed its own.
    fd: OwnedFd,
    session: Session,
    /// Received ciphertext rustls has not consumed yet (a partial record), byte for byte as the
    /// connection held it: rustls locates what it kept by offset into these bytes.
    incoming: Vec<u8>,
    /// Plaintext decrypted but not yet read.
    plain: Vec<u8>,
    /// Ciphertext committed but not yet taken by the kernel, in order.
    out: Vec<u8>,
    peer_closed: bool,
    close_notify_sent: bool,
    peer: Peer,
    local: Option<SocketAddr>,
}

// The point of the type; checked here so that a field that stops being `Send` fails the build
// of this crate, not of the proxy.
const _: () = {
    const fn assert_send<T: Send>() {}
    assert_send::<TransferableTls>();
};

impl TlsConnection {
    /// Detaches this connection from the current thread's runtime so that it can be sent to
    /// another thread and [attached](TransferableTls::attach) there. Call it inside the monoio
    /// runtime that owns the connection (as for dropping it: that is where its socket is
    /// registered).
    ///
    /// Nothing is lost or duplicated: bytes already received but not read (plaintext, or the
    /// start of a record) and bytes queued but not yet sent travel with the connection and are
    /// delivered, or sent first, on the destination thread. Pending output is not flushed
    /// here, so a peer that does not read cannot hold the move up; [`TransferableTls::pending`]
    /// says how much travels.
    ///
    /// A split connection must be [reunited](Self::reunite) first. On failure the connection is
    /// handed back unchanged in the [`TransferError`]:
    ///
    /// * a connection that has already failed (a protocol error, a reset, a peer that closed
    ///   TCP without close_notify) is refused with the failure it recorded: it has nothing left
    ///   to deliver;
    /// * the process is out of descriptors (`EMFILE`): the move needs one more for a moment
    ///   (see the module documentation); try again later or serve the connection here.
    pub fn into_transferable(self) -> Result<TransferableTls, TransferError> {
        let peer = self.reader.shared.peer;
        if let Err(error) = self.check_transferable() {
            return Err(TransferError::new(self, error));
        }
        // The source runtime's `TcpStream` cannot give its descriptor up while a cancelled
        // io_uring poll still holds it (monoio's `into_raw_fd` would panic), so the connection
        // leaves with a duplicate and the original is closed by its own runtime.
        let fd = match sys::duplicate(self.reader.shared.fd()) {
            Ok(fd) => fd,
            Err(e) => {
                let error = TlsError::Io {
                    peer,
                    source: std::io::Error::new(
                        e.kind(),
                        format!("duplicating the socket to move it to another thread: {e}"),
                    ),
                };
                return Err(TransferError::new(self, error));
            }
        };
        let TlsConnection { reader, writer } = self;
        let TlsReader {
            shared,
            ready: read_wait,
            maybe_readable,
        } = reader;
        let TlsWriter {
            shared: writer_shared,
            ready: write_wait,
        } = writer;
        // Cancels the readiness waits in flight in this runtime (see `sys::ReadinessWait`).
        drop(read_wait);
        drop(write_wait);
        drop(writer_shared);
        let shared = match Rc::try_unwrap(shared) {
            Ok(shared) => shared,
            Err(shared) => {
                // Both halves were consumed above, so nothing else holds the state; should that
                // ever change, the caller gets its connection back rather than a panic.
                let mut connection = TlsConnection::from_rc(shared);
                connection.reader.maybe_readable = maybe_readable;
                let error = Fault::Internal("the connection's state is shared elsewhere".into())
                    .into_error(peer);
                return Err(TransferError::new(connection, error));
            }
        };
        let Shared {
            tcp: mut socket,
            peer,
            local,
            state,
        } = shared;
        // No shutdown: the socket lives on through `fd`. Dropping monoio's stream closes its
        // descriptor: at once on the legacy driver, after removing it from this runtime's
        // epoll set; on io_uring once the ring has completed the cancelled polls.
        socket.handed_off = true;
        drop(socket);
        let State {
            session,
            incoming,
            plain,
            mut out,
            out_sent,
            peer_closed,
            close_notify_sent,
            ..
        } = state.into_inner();
        out.drain(..out_sent.min(out.len()));
        if out.is_empty() {
            out = Vec::new();
        }
        Ok(TransferableTls {
            fd,
            session,
            incoming,
            plain,
            out,
            peer_closed,
            close_notify_sent,
            peer,
            local,
        })
    }

    /// Puts the halves of a [split](Self::split) connection back together, for instance to
    /// [move](Self::into_transferable) it. Fails, handing both back, if they do not belong to
    /// the same connection.
    pub fn reunite(reader: TlsReader, writer: TlsWriter) -> Result<Self, ReuniteError> {
        if Rc::ptr_eq(&reader.shared, &writer.shared) {
            Ok(Self { reader, writer })
        } else {
            Err(ReuniteError { reader, writer })
        }
    }

    fn check_transferable(&self) -> Result<(), TlsError> {
        let shared = &self.reader.shared;
        let state = shared.state.borrow();
        if let Some(fault) = state.read_fault.as_ref().or(state.write_fault.as_ref()) {
            return Err(fault.clone().into_error(shared.peer));
        }
        if state.session.is_handshaking() {
            return Err(
                Fault::Internal("moving a connection whose handshake is not done".into())
                    .into_error(shared.peer),
            );
        }
        Ok(())
    }
}

impl TransferableTls {
    /// Makes the connection usable again on the current thread. Call it inside the destination
    /// thread's monoio runtime (either driver; monoio panics outside a runtime, as for any
    /// socket it is given).
    ///
    /// On io_uring nothing is registered; on the legacy driver the socket joins this runtime's
    /// epoll set, which reports at once whatever is already waiting. The first read tries the
    /// socket before waiting, after handing out any plaintext that travelled. Ciphertext that
    /// travelled unsent goes out now as far as the kernel takes it, the rest with the next
    /// `flush`, `queue` or `close`, before anything new.
    ///
    /// If the runtime refuses the socket (the epoll set cannot grow), the connection is closed
    /// and the error says why.
    pub fn attach(self) -> Result<TlsConnection, TlsError> {
        let Self {
            fd,
            session,
            incoming,
            plain,
            out,
            peer_closed,
            close_notify_sent,
            peer,
            local,
        } = self;
        let stream =
            TcpStream::from_std(std::net::TcpStream::from(fd)).map_err(|e| TlsError::Io {
                peer,
                source: std::io::Error::new(
                    e.kind(),
                    format!("registering a socket moved from another thread: {e}"),
                ),
            })?;
        let state = State {
            session,
            incoming,
            plain,
            out,
            out_sent: 0,
            sent_any: true,
            peer_closed,
            close_notify_sent,
            read_fault: None,
            write_fault: None,
            write_waiter: None,
        };
        let connection = TlsConnection::from_shared(Shared {
            tcp: Socket::new(stream),
            peer,
            local,
            state: RefCell::new(state),
        });
        {
            let shared = &connection.writer.shared;
            let fd = shared.fd();
            let mut state = shared.state.borrow_mut();
            if state.pending() > 0 {
                // A failure is the writer's to report, as after a read.
                if let Err(fault) = state.try_send_out(fd) {
                    state.fail_write(fault);
                }
            }
        }
        Ok(connection)
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer.0
    }

    /// Our end's address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local
    }

    /// The peer's certificate chain, end-entity first.
    pub fn peer_certificates(&self) -> Option<Vec<CertificateDer<'static>>> {
        self.session.peer_certificates().map(<[_]>::to_vec)
    }

    /// Received bytes travelling with the connection that no read has delivered yet: plaintext
    /// decrypted before the move, and the start of a record still being received.
    pub fn buffered_input(&self) -> usize {
        self.incoming.len() + self.plain.len()
    }

    /// Ciphertext travelling with the connection that the kernel has not taken yet; sent
    /// first on the destination thread.
    pub fn pending(&self) -> usize {
        self.out.len()
    }
}

impl AsFd for TransferableTls {
    /// The socket, for socket options or diagnostics. Reading or writing it directly would
    /// corrupt the TLS stream.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl fmt::Debug for TransferableTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransferableTls")
            .field("peer", &self.peer)
            .field("local", &self.local)
            .field("session", &self.session)
            .field("buffered_input", &self.buffered_input())
            .field("pending", &self.pending())
            .finish_non_exhaustive()
    }
}

/// [`TlsConnection::into_transferable`] refused: why, and the connection, unchanged.
///
/// Converts into the [`TlsError`] (dropping the connection) for `?`.
pub struct TransferError {
    connection: Box<TlsConnection>,
    error: TlsError,
}

impl TransferError {
    fn new(connection: TlsConnection, error: TlsError) -> Self {
        Self {
            connection: Box::new(connection),
            error,
        }
    }

    /// Why the connection cannot move.
    pub fn error(&self) -> &TlsError {
        &self.error
    }

    /// The connection, usable (or failed) as before.
    pub fn into_connection(self) -> TlsConnection {
        *self.connection
    }

    /// The connection and the reason.
    pub fn into_parts(self) -> (TlsConnection, TlsError) {
        (*self.connection, self.error)
    }
}

impl fmt::Debug for TransferError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransferError")
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for TransferError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot move the connection to another thread: {}",
            self.error
        )
    }
}

impl Error for TransferError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&self.error)
    }
}

impl From<TransferError> for TlsError {
    fn from(e: TransferError) -> Self {
        e.error
    }
}

/// [`TlsConnection::reunite`] was given halves of two different connections; both are handed
/// back.
pub struct ReuniteError {
    /// The reading half given.
    pub reader: TlsReader,
    /// The writing half given.
    pub writer: TlsWriter,
}

impl fmt::Debug for ReuniteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReuniteError")
            .field("reader_peer", &self.reader.peer_addr())
            .field("writer_peer", &self.writer.peer_addr())
            .finish()
    }
}

impl fmt::Display for ReuniteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tried to reunite the halves of two different tls connections (reader from {}, writer from {})",
            self.reader.shared.peer, self.writer.shared.peer
        )
    }
}

impl Error for ReuniteError {}
