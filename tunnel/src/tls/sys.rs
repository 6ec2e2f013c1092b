//! Socket calls that never block and never leave an operation in flight, the readiness waits
//! that stand in for them while the socket has nothing to give, and the per-core scratch
//! buffers.

use std::{
    cell::RefCell,
    future::Future,
    io,
    os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd},
    pin::Pin,
    rc::Rc,
    task::{Context, Poll},
    thread::LocalKey,
};

use bytes::BytesMut;
use monoio::net::TcpStream;

/// Reads what the kernel has for `fd` into `buf` without waiting (`MSG_DONTWAIT`, whatever the
/// socket's blocking mode: monoio leaves io_uring sockets blocking). `Ok(0)` is the peer's FIN;
/// `WouldBlock` means nothing is there now.
pub(super) fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid, writable region of `buf.len()` bytes for the duration of the
    // call.
    unsafe { recv_raw(fd, buf.as_mut_ptr(), buf.len()) }
}

/// [`recv`] into the spare capacity of `buf` (at most `max` bytes, room reserved first),
/// growing its length by what arrived.
pub(super) fn recv_into_spare(fd: RawFd, buf: &mut BytesMut, max: usize) -> io::Result<usize> {
    buf.reserve(max);
    let spare = buf.spare_capacity_mut();
    let len = spare.len().min(max);
    // SAFETY: the spare capacity is a valid, writable region of at least `len` bytes for the
    // duration of the call (the kernel writes bytes, never reads them).
    let n = unsafe { recv_raw(fd, spare.as_mut_ptr().cast(), len) }?;
    // SAFETY: the kernel initialized the first `n` (at most `len`) bytes of the spare capacity,
    // which directly follow the initialized bytes.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// `recv` with `MSG_DONTWAIT`, retried when interrupted by a signal.
///
/// # Safety
/// `ptr` must be valid for writes of `len` bytes for the duration of the call.
unsafe fn recv_raw(fd: RawFd, ptr: *mut u8, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: the caller guarantees `ptr..ptr + len` is writable; `fd` is an open socket
        // owned by the caller's `TcpStream` (a closed one gives `EBADF`, not harm).
        let n = unsafe { libc::recv(fd, ptr.cast(), len, libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(n.unsigned_abs());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Takes the per-core receive buffer for a read straight into a fresh buffer (see
/// `State::receive_established`); empty, with whatever capacity it kept.
pub(super) fn take_recv_buffer() -> BytesMut {
    take_per_core(&RECV_SPARE)
}

/// Gives a receive buffer that was not handed to a caller back for the next read.
pub(super) fn give_back_recv_buffer(mut buf: BytesMut) {
    buf.clear();
    keep_per_core(&RECV_SPARE, buf, BytesMut::capacity);
}

/// Takes a per-core buffer out of its slot (a fresh one if the slot is busy, which the
/// synchronous callers never make it).
fn take_per_core<T: Default>(key: &'static LocalKey<RefCell<T>>) -> T {
    key.try_with(|cell| {
        cell.try_borrow_mut()
            .map(|mut b| std::mem::take(&mut *b))
            .ok()
    })
    .ok()
    .flatten()
    .unwrap_or_default()
}

/// Puts a buffer back into its per-core slot if it is larger than what the slot holds.
fn keep_per_core<T>(key: &'static LocalKey<RefCell<T>>, buf: T, capacity: fn(&T) -> usize) {
    let _ = key.try_with(|cell| {
        if let Ok(mut slot) = cell.try_borrow_mut() {
            if capacity(&slot) < capacity(&buf) {
                *slot = buf;
            }
        }
    });
}

/// Sends as much of `buf` as the kernel takes now. `MSG_NOSIGNAL`: a peer that has gone away
/// gives `EPIPE`, not a process-killing `SIGPIPE`.
pub(super) fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is a valid, readable region of `buf.len()` bytes for the duration of
        // the call, and `fd` is an open socket owned by the caller's `TcpStream`.
        let n = unsafe {
            libc::send(
                fd,
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return Ok(n.unsigned_abs());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// `shutdown(2)`; errors (typically `ENOTCONN` after a reset) are of no use to the caller.
pub(super) fn shutdown(fd: RawFd, how: libc::c_int) {
    // SAFETY: shutdown takes no pointers; `fd` is an open socket owned by the caller.
    unsafe {
        libc::shutdown(fd, how);
    }
}

/// A second descriptor for the socket behind `fd` (`F_DUPFD_CLOEXEC`): what a connection takes
/// with it to another thread, while monoio keeps the first one until its ring lets go of it.
pub(super) fn duplicate(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: `fd` is an open socket owned by the caller's `TcpStream`, which outlives this
    // call; the borrow ends before the function returns.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    borrowed.try_clone_to_owned()
}

/// Runs `f` with a `TcpStream`'s descriptor seen as a socket2 socket, for options monoio does
/// not expose.
pub(super) fn with_socket<R>(tcp: &TcpStream, f: impl FnOnce(socket2::SockRef<'_>) -> R) -> R {
    // SAFETY: the descriptor belongs to `tcp`, which is borrowed for the whole call, so it
    // stays open while the `BorrowedFd` exists.
    let fd = unsafe { BorrowedFd::borrow_raw(tcp.as_raw_fd()) };
    f(socket2::SockRef::from(&fd))
}

type ReadyFuture = Pin<Box<dyn Future<Output = io::Result<()>>>>;

/// Which readiness a [`ReadinessWait`] waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Direction {
    Read,
    Write,
}

/// A readiness wait that outlives the future awaiting it.
///
/// On io_uring a readiness wait is a `PollAdd` in the ring. Dropping monoio's future asks the
/// ring to cancel it (the workspace enables monoio's `async-cancel`; without it the entry
/// would stay in the ring until the socket became ready), which costs a cancel entry, two
/// completions and a fresh `PollAdd` on the next call: a read wrapped in a timeout that fires
/// every second would pay that every second. So the wait is kept here and resumed by the next
/// caller: a connection has at most one wait per direction in flight, whatever its callers
/// cancel. It holds no buffer (a few dozen bytes for the boxed future).
///
/// Dropping the `ReadinessWait` itself (a closed connection, or one handed to another thread)
/// does cancel the `PollAdd`. Until the ring reports it done, monoio keeps the entry's clone of
/// the descriptor open, which is why a hand-off moves a duplicate descriptor rather than
/// monoio's own (see `TlsConnection::into_transferable`). A `PollAdd` only observes: whether
/// it is cancelled or completes, it takes no data and no readiness from other waiters.
///
/// On the legacy (epoll) driver the wait asks for `relaxed = false`: monoio then checks the
/// socket with `poll(2)` before trusting its edge-triggered readiness flag, which our own
/// `recv`/`send` calls never clear.
pub(super) struct ReadinessWait {
    direction: Direction,
    pending: Option<ReadyFuture>,
}

impl std::fmt::Debug for ReadinessWait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadinessWait")
            .field("direction", &self.direction)
            .field("in_flight", &self.pending.is_some())
            .finish()
    }
}

impl ReadinessWait {
    pub(super) fn new(direction: Direction) -> Self {
        Self {
            direction,
            pending: None,
        }
    }

    /// Waits until the socket is (probably) ready. Cancel-safe: dropping the returned future
    /// keeps the wait for the next call.
    pub(super) fn wait<'a>(
        &'a mut self,
        tcp: &'a Rc<TcpStream>,
    ) -> impl Future<Output = io::Result<()>> + 'a {
        std::future::poll_fn(move |cx| self.poll_ready(tcp, cx))
    }

    fn poll_ready(&mut self, tcp: &Rc<TcpStream>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let direction = self.direction;
        let fut = self.pending.get_or_insert_with(|| {
            let tcp = Rc::clone(tcp);
            match direction {
                Direction::Read => Box::pin(async move { tcp.readable(false).await }),
                Direction::Write => Box::pin(async move { tcp.writable(false).await }),
            }
        });
        let result = std::task::ready!(fut.as_mut().poll(cx));
        self.pending = None;
        Poll::Ready(result)
    }
}

/// Returns `Pending` once, after asking to be polled again: lets the other tasks of the core
/// run. Holds nothing, so dropping it is harmless.
pub(super) async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await;
}

/// Size of one `recv` into the per-core buffer: sixteen full TLS records. Per core, not per
/// connection. Each `recv` is a system call and a turn of the caller's loop; 256 KiB rather
/// than 64 KiB cut the receiving side's `recvfrom` calls per GB by 3x in the session benchmark
/// (docs/benchmarks.md) while a busy sender keeps the socket that full.
pub(super) const RECV_CHUNK: usize = 256 * 1024;

/// Ciphertext is sent once this much has been encrypted (and at the end of each `queue`), so
/// the per-core ciphertext buffer stays bounded whatever the caller writes at once. Larger than
/// what the mux driver queues at once (`mux::WRITE_BATCH` of whole frames, one of up to 64 KiB
/// running past it), so that a batch goes out in one `send`.
pub(super) const SEND_PIECE: usize = 320 * 1024;

/// The most a full TLS record takes on the wire beyond its plaintext (header, tag, padding).
pub(super) const RECORD_OVERHEAD: usize = 5 + 1 + 64;

/// Plaintext bytes per full TLS record.
pub(super) const RECORD_PLAINTEXT: usize = 16 * 1024;

thread_local! {
    /// Received ciphertext while it is decrypted; one per core, never per connection.
    static RECV_SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// Plaintext gathered from several slices into whole records.
    static PLAIN_SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// Ciphertext between encryption and `send`.
    static CIPHER_SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// The next read's buffer on an established connection, kept while no read has handed
    /// it to a caller; one per core.
    static RECV_SPARE: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Scratch {
    Recv,
    Plain,
    Cipher,
}

/// Lends the per-core buffer `which` (taken out of its slot and put back, so a nested call,
/// which the synchronous callers never make, would get a fresh buffer rather than a panic).
pub(super) fn with_scratch<R>(which: Scratch, f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    let key = match which {
        Scratch::Recv => &RECV_SCRATCH,
        Scratch::Plain => &PLAIN_SCRATCH,
        Scratch::Cipher => &CIPHER_SCRATCH,
    };
    let mut buf = take_per_core(key);
    let result = f(&mut buf);
    keep_per_core(key, buf, Vec::capacity);
    result
}
