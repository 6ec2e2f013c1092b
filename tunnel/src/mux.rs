//! The mux driver: runs a [`frame::Session`] over a [`TlsConnection`] and hands streams to
//! the application as async handles.
//!
//! One [`Tunnel`] is a cheap `Rc` handle to a session and the wakers of the tasks using it.
//! [`drive`] is the tunnel's only I/O task: it reads from TLS into the session, writes what
//! the session emits, runs its timers, and wakes stream tasks when their stream becomes
//! readable or writable. Stream tasks ([`MuxStream::read`], [`MuxStream::write`]) only touch
//! the session in memory. Everything runs on one thread (one core); the shared state is
//! borrowed only between `.await`s, never across one.
//!
//! When the transport fails, [`drive`] returns and the session stays: call [`drive`] again
//! with a new connection after [`Tunnel::reattach`] and the streams carry on (RESUME).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use frame::{
    Announce, Error as FrameError, ErrorCode, Event, Frame, Limits, Open, Received, Role, Session,
};

use crate::tls::{TlsConnection, TlsError};

/// Ciphertext waiting for the socket beyond which the driver stops pulling frames from the
/// session: the session keeps them (bounded by flow control) instead of the TLS buffer.
const WRITE_HIGH_WATER: usize = 256 * 1024;

/// Most frame bytes handed to TLS in one call (whole frames; one may run past it). TLS sends
/// each call's records with one `send`, so this is also the size of a send: with 64 KiB frames,
/// three frames per `sendto` took the proxy from about 32,000 to 8,000 calls per GB.
const WRITE_BATCH: usize = 192 * 1024;

/// Why a stream operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// The peer refused the OPEN.
    #[error("open refused by peer: {code}: {reason}")]
    Refused {
        /// Code from the peer.
        code: ErrorCode,
        /// Reason from the peer.
        reason: String,
    },
    /// The stream was aborted (by the peer, or because the tunnel ended).
    #[error("stream reset: {code}: {reason}")]
    Reset {
        /// Code.
        code: ErrorCode,
        /// Reason.
        reason: String,
    },
    /// The tunnel session ended.
    #[error("{0}")]
    Ended(FrameError),
    /// The session refused the call (e.g. draining, too many streams).
    #[error("{0}")]
    Session(FrameError),
}

#[derive(Default)]
struct StreamWaiters {
    reader: Option<Waker>,
    writer: Option<Waker>,
    opened: Option<Result<(), StreamError>>,
    ended: Option<StreamError>,
    closed: bool,
}

struct Shared {
    session: Session,
    driver: Option<Waker>,
    driver_notified: bool,
    incoming: VecDeque<(u32, Open)>,
    incoming_waker: Option<Waker>,
    /// A B-tree rather than a hash map: 24 bytes inline instead of 48, and no allocation
    /// while the tunnel has no stream.
    streams: BTreeMap<u32, StreamWaiters>,
    /// The peer's latest inventory as its encoded frame (one allocation), decoded when
    /// asked: decoded, an agent's one-node ANNOUNCE is seven allocations (about 320 bytes)
    /// held by every idle tunnel, and it is read only when it changes or the tunnel resumes.
    announce: Option<Bytes>,
    announce_version: u64,
    /// The task waiting for a new inventory (one per tunnel in the proxy); others, rarer, in
    /// `announce_wakers`: a `Vec` alone would allocate 64 bytes for the usual single waker.
    announce_waker: Option<Waker>,
    announce_wakers: Vec<Waker>,
    connected: bool,
    connected_waker: Option<Waker>,
    transport_dead: bool,
    /// Registered with this core's keepalive ticker.
    ticked: bool,
    /// Which of the ticker's entries for this session is the live one (see `ticker`).
    wheel_entry: u32,
}

impl Shared {
    fn wake_driver(&mut self) {
        self.driver_notified = true;
        if let Some(w) = self.driver.take() {
            w.wake();
        }
    }

    /// Turns session events into wakeups; called by the driver after every input.
    fn dispatch(&mut self) {
        while let Some(event) = self.session.poll_event() {
            match event {
                Event::Connected { .. } | Event::Resumed { .. } => {
                    self.connected = true;
                    if let Some(w) = self.connected_waker.take() {
                        w.wake();
                    }
                }
                Event::TransportDead => self.transport_dead = true,
                Event::IncomingOpen { stream, request } => {
                    self.streams.insert(stream, StreamWaiters::default());
                    self.incoming.push_back((stream, request));
                    if let Some(w) = self.incoming_waker.take() {
                        w.wake();
                    }
                }
                Event::Opened { stream } => self.settle(stream, |w| w.opened = Some(Ok(()))),
                Event::OpenFailed {
                    stream,
                    code,
                    reason,
                } => self.settle(stream, |w| {
                    w.opened = Some(Err(StreamError::Refused { code, reason }));
                }),
                Event::Readable { stream } => self.settle(stream, |_| {}),
                Event::Writable { stream } => self.settle(stream, |_| {}),
                Event::Reset {
                    stream,
                    code,
                    reason,
                } => self.settle(stream, |w| {
                    let err = StreamError::Reset { code, reason };
                    if w.opened.is_none() {
                        w.opened = Some(Err(err.clone()));
                    }
                    w.ended = Some(err);
                }),
                Event::Closed { stream } => self.settle(stream, |w| w.closed = true),
                Event::Announce(announce) => {
                    self.announce = Some(encode_announce(announce));
                    self.announce_version += 1;
                    self.wake_announce_waiters();
                }
                Event::GoAway { .. } => {}
                Event::Ended(err) => {
                    for w in self.streams.values_mut() {
                        w.ended.get_or_insert(StreamError::Ended(err.clone()));
                        if w.opened.is_none() {
                            w.opened = Some(Err(StreamError::Ended(err.clone())));
                        }
                    }
                    self.wake_all();
                }
            }
        }
    }

    fn settle(&mut self, stream: u32, update: impl FnOnce(&mut StreamWaiters)) {
        if let Some(w) = self.streams.get_mut(&stream) {
            update(w);
            if let Some(r) = w.reader.take() {
                r.wake();
            }
            if let Some(r) = w.writer.take() {
                r.wake();
            }
        }
    }

    fn wake_all(&mut self) {
        for w in self.streams.values_mut() {
            if let Some(r) = w.reader.take() {
                r.wake();
            }
            if let Some(r) = w.writer.take() {
                r.wake();
            }
        }
        for w in self
            .incoming_waker
            .take()
            .into_iter()
            .chain(self.connected_waker.take())
        {
            w.wake();
        }
        self.wake_announce_waiters();
    }

    fn wake_announce_waiters(&mut self) {
        if let Some(w) = self.announce_waker.take() {
            w.wake();
        }
        for w in self.announce_wakers.drain(..) {
            w.wake();
        }
    }

    /// Gives back the buffers of empty queues and maps (they keep their capacity, and a
    /// B-tree its emptied root node, when drained): a tunnel that once carried streams
    /// holds none of that while idle. Called from the keepalive tick, not per operation.
    fn release_idle_buffers(&mut self) {
        if self.incoming.is_empty() {
            self.incoming = VecDeque::new();
        }
        if self.streams.is_empty() {
            self.streams = BTreeMap::new();
        }
        if self.announce_wakers.is_empty() {
            self.announce_wakers = Vec::new();
        }
    }

    fn ended_error(&self) -> Option<StreamError> {
        self.session.end_reason().map(StreamError::Ended)
    }
}

/// A handle to one tunnel's session; clones share it.
#[derive(Clone)]
pub struct Tunnel {
    shared: Rc<RefCell<Shared>>,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.shared.borrow();
        f.debug_struct("Tunnel")
            .field("streams", &s.session.stream_count())
            .field("ended", &s.session.is_ended())
            .finish()
    }
}

impl Tunnel {
    /// Wraps a session; run [`drive`] to connect it to a transport.
    pub fn new(session: Session) -> Self {
        Tunnel {
            shared: Rc::new(RefCell::new(Shared {
                session,
                driver: None,
                driver_notified: false,
                incoming: VecDeque::new(),
                incoming_waker: None,
                streams: BTreeMap::new(),
                announce: None,
                announce_version: 0,
                announce_waker: None,
                announce_wakers: Vec::new(),
                connected: false,
                connected_waker: None,
                transport_dead: false,
                ticked: false,
                wheel_entry: 0,
            })),
        }
    }

    /// Runs `f` with the session (for queries such as `rtt`, `stream_count`, `peer_id`).
    pub fn with_session<T>(&self, f: impl FnOnce(&Session) -> T) -> T {
        f(&self.shared.borrow().session)
    }

    /// Waits until the peer's HELLO (or RESUME) has arrived; false if the session ended.
    pub async fn connected(&self) -> bool {
        poll_fn(|cx| {
            let mut s = self.shared.borrow_mut();
            if s.connected {
                Poll::Ready(true)
            } else if s.session.is_ended() {
                Poll::Ready(false)
            } else {
                s.connected_waker = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// The peer's role, once connected.
    pub fn peer_role(&self) -> Option<Role> {
        self.shared.borrow().session.peer_role()
    }

    /// Opens a stream and waits for the peer's answer.
    pub async fn open(&self, request: Open) -> Result<MuxStream, StreamError> {
        let id = {
            let mut s = self.shared.borrow_mut();
            let id = s.session.open(request).map_err(StreamError::Session)?;
            s.streams.insert(id, StreamWaiters::default());
            s.wake_driver();
            id
        };
        let stream = MuxStream {
            tunnel: self.clone(),
            id,
            done: Cell::new(false),
        };
        poll_fn(|cx| {
            let mut s = self.shared.borrow_mut();
            let Some(w) = s.streams.get_mut(&id) else {
                return Poll::Ready(Err(StreamError::Reset {
                    code: ErrorCode::INTERNAL,
                    reason: "stream vanished".into(),
                }));
            };
            match w.opened.take() {
                Some(result) => Poll::Ready(result),
                None => {
                    w.writer = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await?;
        Ok(stream)
    }

    /// The next stream the peer asks to open; `None` once the session has ended.
    pub async fn incoming(&self) -> Option<Incoming> {
        poll_fn(|cx| {
            let mut s = self.shared.borrow_mut();
            if let Some((id, request)) = s.incoming.pop_front() {
                return Poll::Ready(Some(Incoming {
                    tunnel: self.clone(),
                    id,
                    request,
                }));
            }
            if s.session.is_ended() {
                return Poll::Ready(None);
            }
            s.incoming_waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Sends our inventory (and again after every reconnect).
    pub fn announce(&self, announce: &Announce) -> Result<(), FrameError> {
        let mut s = self.shared.borrow_mut();
        s.session.announce(announce)?;
        s.wake_driver();
        Ok(())
    }

    /// The peer's latest inventory and its version (bumped on each ANNOUNCE).
    pub fn peer_announce(&self) -> (u64, Option<Announce>) {
        let s = self.shared.borrow();
        (
            s.announce_version,
            s.announce.as_ref().and_then(decode_announce),
        )
    }

    /// Waits until the peer's inventory version differs from `seen`, or the session ends.
    pub async fn announce_changed(&self, seen: u64) -> u64 {
        poll_fn(|cx| {
            let mut s = self.shared.borrow_mut();
            if s.announce_version != seen || s.session.is_ended() {
                Poll::Ready(s.announce_version)
            } else {
                // A task that polls again (a select loop) must not pile up copies of its waker.
                let waker = cx.waker();
                match &s.announce_waker {
                    None => s.announce_waker = Some(waker.clone()),
                    Some(w) if w.will_wake(waker) => {}
                    Some(_) => {
                        if !s.announce_wakers.iter().any(|w| w.will_wake(waker)) {
                            s.announce_wakers.push(waker.clone());
                        }
                    }
                }
                Poll::Pending
            }
        })
        .await
    }

    /// Starts draining (GOAWAY): the peer opens no new streams.
    pub fn goaway(&self, reason: &str) {
        let mut s = self.shared.borrow_mut();
        s.session.goaway(reason);
        s.wake_driver();
    }

    /// Ends the session: streams are reset, the peer gets GOAWAY with `code`.
    pub fn close(&self, code: ErrorCode, reason: &str) {
        let mut s = self.shared.borrow_mut();
        s.session.close(code, reason);
        s.dispatch();
        s.wake_driver();
    }

    /// Whether the session is over.
    pub fn is_ended(&self) -> bool {
        self.shared.borrow().session.is_ended()
    }

    /// Marks the transport as gone (the driver does this itself when it returns).
    pub fn transport_lost(&self) {
        let mut s = self.shared.borrow_mut();
        s.session.transport_lost(Instant::now());
        s.dispatch();
        // A detached session's next timer is the end of its grace, maybe sooner than its
        // next keepalive.
        ticker::reschedule(&self.shared, &mut s);
    }

    /// Gives up the current transport as if the keepalive had found it dead: the driver
    /// returns [`DriveOutcome::TransportLost`] and the session detaches (or ends, without
    /// resumption). For a peer that reconnects to resume before this side noticed its old
    /// connection fail.
    pub fn abandon_transport(&self) {
        let mut s = self.shared.borrow_mut();
        s.transport_dead = true;
        s.wake_driver();
    }

    /// Whether the last transport was given up because the peer went silent (the keepalive
    /// failed, or [`Tunnel::abandon_transport`]) rather than because it failed or closed;
    /// until [`Tunnel::reattach`].
    pub fn transport_went_silent(&self) -> bool {
        self.shared.borrow().transport_dead
    }

    /// Prepares a detached session for a new transport; then call [`drive`] with it.
    pub fn reattach(&self) -> Result<(), FrameError> {
        let mut s = self.shared.borrow_mut();
        s.connected = false;
        s.transport_dead = false;
        s.session.reattach(Instant::now())?;
        ticker::reschedule(&self.shared, &mut s);
        Ok(())
    }

    /// Advances timers of a detached session (grace expiry) without a transport.
    pub fn tick(&self) {
        let mut s = self.shared.borrow_mut();
        s.session.handle_timeout(Instant::now());
        s.dispatch();
    }

    /// Whether the session waits for a new transport ([`Tunnel::reattach`]).
    pub fn is_detached(&self) -> bool {
        self.shared.borrow().session.is_detached()
    }

    /// The peer's session id (from its HELLO): an acceptor matches a reconnecting peer's
    /// HELLO against it to find the session to reattach.
    pub fn peer_id(&self) -> Option<[u8; 16]> {
        self.shared.borrow().session.peer_id()
    }

    /// While the session is detached, runs its grace timer: returns once it was reattached or
    /// the grace period ended it (its streams are then reset).
    pub async fn expire_while_detached(&self) {
        loop {
            let deadline = {
                let s = self.shared.borrow();
                if !s.session.is_detached() {
                    return;
                }
                s.session.poll_timeout()
            };
            let Some(at) = deadline else { return };
            monoio::time::sleep_until(monoio::time::Instant::from_std(at)).await;
            self.tick();
        }
    }
}

fn encode_announce(announce: Announce) -> Bytes {
    let frame = Frame::Announce(announce);
    let mut encoded = BytesMut::with_capacity(frame::codec::HEADER_LEN + frame.payload_len());
    frame.encode(&mut encoded);
    encoded.freeze()
}

fn decode_announce(encoded: &Bytes) -> Option<Announce> {
    // Our own encoding of a frame the session already decoded and checked against its
    // limits, so it decodes again; no limit of its own applies here.
    let limits = Limits {
        max_data: 0,
        max_announce: usize::MAX,
    };
    match frame::decode(&mut BytesMut::from(&encoded[..]), &limits) {
        Ok(Some(Frame::Announce(announce))) => Some(announce),
        other => {
            debug_assert!(false, "a stored ANNOUNCE did not decode: {other:?}");
            None
        }
    }
}

/// A stream the peer asked to open.
#[derive(Debug)]
pub struct Incoming {
    tunnel: Tunnel,
    id: u32,
    /// What the peer asked for.
    pub request: Open,
}

impl Incoming {
    /// The stream id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Accepts the stream.
    pub fn accept(self) -> Result<MuxStream, StreamError> {
        let mut s = self.tunnel.shared.borrow_mut();
        s.session.accept(self.id).map_err(StreamError::Session)?;
        s.wake_driver();
        drop(s);
        Ok(MuxStream {
            tunnel: self.tunnel,
            id: self.id,
            done: Cell::new(false),
        })
    }

    /// Refuses the stream; `reason` reaches the peer.
    pub fn reject(self, code: ErrorCode, reason: &str) {
        let mut s = self.tunnel.shared.borrow_mut();
        let _ = s.session.reject(self.id, code, reason);
        s.streams.remove(&self.id);
        s.wake_driver();
    }
}

/// One open stream. Dropping it without [`finish`](MuxStream::finish) resets the stream.
#[derive(Debug)]
pub struct MuxStream {
    tunnel: Tunnel,
    id: u32,
    done: Cell<bool>,
}

impl MuxStream {
    /// The stream id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The tunnel this stream belongs to.
    pub fn tunnel(&self) -> &Tunnel {
        &self.tunnel
    }

    /// Bytes sent and received so far.
    pub fn bytes(&self) -> (u64, u64) {
        self.tunnel
            .shared
            .borrow()
            .session
            .stream_bytes(self.id)
            .unwrap_or((0, 0))
    }

    /// The next bytes from the peer; `Ok(None)` after the peer's FIN. Cancel-safe.
    pub async fn read(&self) -> Result<Option<Bytes>, StreamError> {
        poll_fn(|cx| {
            let mut s = self.tunnel.shared.borrow_mut();
            let received = s.session.recv(self.id);
            match received {
                Ok(Received::Data(bytes)) => {
                    if s.session.has_transmit() {
                        s.wake_driver(); // a WINDOW is due
                    }
                    Poll::Ready(Ok(Some(bytes)))
                }
                Ok(Received::Finished) => {
                    if s.session.has_transmit() {
                        s.wake_driver(); // the final WINDOW is due
                    }
                    Poll::Ready(Ok(None))
                }
                Ok(Received::Nothing) => {
                    if let Some(w) = s.streams.get_mut(&self.id) {
                        w.reader = Some(cx.waker().clone());
                    }
                    Poll::Pending
                }
                Err(_) => Poll::Ready(Err(self.gone(&mut s))),
            }
        })
        .await
    }

    /// Sends all of `data`, waiting for credit as needed. Cancel-safe in the sense that what
    /// was already queued stays queued. The session queues no more than the stream's credit
    /// (the peer's window capped at ours) and its memory budget allow, so a caller that
    /// awaits this before reading more (a splice) stops reading while the peer does not.
    pub async fn write(&self, mut data: Bytes) -> Result<(), StreamError> {
        poll_fn(|cx| {
            let mut s = self.tunnel.shared.borrow_mut();
            while !data.is_empty() {
                match s.session.send(self.id, data.clone()) {
                    Ok(0) => {
                        if let Some(w) = s.streams.get_mut(&self.id) {
                            w.writer = Some(cx.waker().clone());
                        }
                        return Poll::Pending;
                    }
                    Ok(n) => {
                        data.advance(n);
                        s.wake_driver();
                    }
                    Err(_) => return Poll::Ready(Err(self.gone(&mut s))),
                }
            }
            Poll::Ready(Ok(()))
        })
        .await
    }

    /// Half-closes our direction: FIN after every queued byte.
    pub fn finish(&self) {
        let mut s = self.tunnel.shared.borrow_mut();
        if s.session.finish(self.id).is_ok() {
            s.wake_driver();
        }
        self.done.set(true);
    }

    /// Waits until the stream is fully closed (both FINs, all bytes acknowledged) or reset.
    pub async fn closed(&self) -> Result<(), StreamError> {
        poll_fn(|cx| {
            let mut s = self.tunnel.shared.borrow_mut();
            match s.streams.get_mut(&self.id) {
                Some(w) if w.closed => Poll::Ready(Ok(())),
                Some(w) => match &w.ended {
                    Some(e) => Poll::Ready(Err(e.clone())),
                    None => {
                        w.reader = Some(cx.waker().clone());
                        Poll::Pending
                    }
                },
                None => Poll::Ready(Ok(())),
            }
        })
        .await
    }

    /// Aborts the stream with a code and a reason for the peer's logs.
    pub fn reset(&self, code: ErrorCode, reason: &str) {
        let mut s = self.tunnel.shared.borrow_mut();
        let _ = s.session.reset(self.id, code, reason);
        s.streams.remove(&self.id);
        s.wake_driver();
        self.done.set(true);
    }

    fn gone(&self, s: &mut Shared) -> StreamError {
        let stored = s.streams.get(&self.id).and_then(|w| w.ended.clone());
        stored
            .or_else(|| s.ended_error())
            .unwrap_or(StreamError::Reset {
                code: ErrorCode::CANCELLED,
                reason: "stream closed".into(),
            })
    }
}

impl Drop for MuxStream {
    fn drop(&mut self) {
        let Ok(mut s) = self.tunnel.shared.try_borrow_mut() else {
            return;
        };
        let closed = s.streams.get(&self.id).is_some_and(|w| w.closed);
        if !self.done.get() && !closed && s.session.stream_bytes(self.id).is_some() {
            let _ = s
                .session
                .reset(self.id, ErrorCode::CANCELLED, "stream handle dropped");
            s.wake_driver();
        }
        if closed || s.session.stream_bytes(self.id).is_none() {
            s.streams.remove(&self.id);
        }
    }
}

/// Why [`drive`] returned.
#[derive(Debug)]
pub enum DriveOutcome {
    /// The session ended (closed by either side, protocol error, grace expired).
    Ended(FrameError),
    /// The transport failed or went silent. The session is detached and may be resumed, or,
    /// without resumption, ended ([`Tunnel::is_ended`]).
    TransportLost(Option<TlsError>),
}

/// Runs the session over `conn` until the transport fails or the session ends. `input`
/// holds bytes already read from the connection (e.g. a HELLO the acceptor peeked at).
pub async fn drive(tunnel: &Tunnel, conn: TlsConnection, mut input: BytesMut) -> DriveOutcome {
    let (mut reader, mut writer) = conn.split();
    let shared = &tunnel.shared;
    ticker::register(shared);
    let outcome = loop {
        // Feed what we have, act on events, queue what the session wants to send.
        let ended = {
            let mut s = shared.borrow_mut();
            if !input.is_empty() {
                let _ = s.session.handle_input(&mut input, Instant::now());
                if input.is_empty() {
                    input = BytesMut::new(); // an idle tunnel holds no read buffer
                }
            }
            s.dispatch();
            let mut failed = None;
            // Allocated per turn, not kept in the driver: an idle tunnel holds no batch.
            let mut batch: Vec<frame::Transmit> = Vec::new();
            while writer.pending() < WRITE_HIGH_WATER {
                // Frames go to TLS in batches: encrypted together, they fill whole records
                // (a full DATA frame alone is a 16 KiB record plus a 9-byte one), and small
                // frames waiting at the same moment share one record and one send.
                let mut bytes = 0;
                while bytes < WRITE_BATCH {
                    let Some(t) = s.session.poll_transmit() else {
                        break;
                    };
                    bytes += t.len();
                    batch.push(t);
                }
                if batch.is_empty() {
                    break;
                }
                let parts: Vec<&[u8]> = batch
                    .iter()
                    .flat_map(|t| [t.header(), &t.payload()[..]])
                    .collect();
                let queued = writer.queue(&parts);
                drop(parts);
                batch.clear();
                if let Err(e) = queued {
                    failed = Some(e);
                    break;
                }
            }
            if let Some(e) = failed {
                break DriveOutcome::TransportLost(Some(e));
            }
            if s.transport_dead {
                break DriveOutcome::TransportLost(None);
            }
            s.driver_notified = false;
            s.session.is_ended()
        };
        if ended {
            // Boxed, as is the alert read below: they run once, at the end, and a timeout
            // (a 640-byte, 128-byte-aligned `Sleep` with its future) would otherwise size
            // this future, which lives as long as the tunnel, at 1,152 bytes instead of 520.
            let close = monoio::time::timeout(std::time::Duration::from_secs(5), writer.close());
            let _ = Box::pin(close).await;
            let err = ended_reason(tunnel);
            return DriveOutcome::Ended(err);
        }
        let notified = poll_fn(|cx| {
            let mut s = shared.borrow_mut();
            if s.driver_notified {
                Poll::Ready(())
            } else {
                s.driver = Some(cx.waker().clone());
                Poll::Pending
            }
        });
        let flushing = writer.pending() > 0;
        let flush = async {
            if flushing {
                writer.flush().await
            } else {
                std::future::pending().await
            }
        };
        monoio::select! {
            read = reader.read(&mut input) => match read {
                Ok(0) => break DriveOutcome::TransportLost(None),
                Ok(_) => {}
                Err(e) => break DriveOutcome::TransportLost(Some(e)),
            },
            flushed = flush => if let Err(e) = flushed {
                break DriveOutcome::TransportLost(Some(e));
            },
            _ = notified => {}
        }
    };
    // A write that fails (the peer reset the connection) often hides why: a TLS alert (say,
    // "certificate expired") may already wait in our receive buffer. Read it if it is there.
    let outcome = match outcome {
        DriveOutcome::TransportLost(Some(TlsError::Io { .. }))
        | DriveOutcome::TransportLost(None) => {
            let mut rest = BytesMut::new();
            let why = std::time::Duration::from_millis(200);
            match Box::pin(monoio::time::timeout(why, reader.read(&mut rest))).await {
                Ok(Err(e @ TlsError::Tls { .. })) => DriveOutcome::TransportLost(Some(e)),
                _ => outcome,
            }
        }
        other => other,
    };
    tunnel.transport_lost();
    // A transport error is the more useful account even when it also ended the session
    // (no resumption): callers check `Tunnel::is_ended` for the session's fate.
    match outcome {
        DriveOutcome::TransportLost(None) if tunnel.is_ended() => {
            DriveOutcome::Ended(ended_reason(tunnel))
        }
        other => other,
    }
}

fn ended_reason(tunnel: &Tunnel) -> FrameError {
    let s = tunnel.shared.borrow();
    // The session records why it ended; fall back to a generic reason if it was closed
    // without one.
    s.session
        .end_reason()
        .unwrap_or(FrameError::Ended(frame::EndReason::ClosedLocally {
            code: ErrorCode::NO_ERROR,
            reason: "tunnel ended".into(),
        }))
}

#[cfg(test)]
mod tests {
    use frame::NodeInfo;

    use super::*;

    #[test]
    fn a_stored_inventory_reads_back_as_it_arrived() {
        let node = |name: &str, online| NodeInfo {
            name: name.into(),
            online,
            tunnel: !online,
            labels: vec![("env".into(), "prod".into()), ("rack".into(), "r7".into())],
            services: vec!["ssh".into(), "https".into()],
        };
        for announce in [
            Announce::default(),
            Announce {
                cluster: String::new(),
                nodes: vec![node("node-r1", true)],
            },
            Announce {
                cluster: "leaf.example.com".into(),
                nodes: (0..500)
                    .map(|i| node(&format!("n{i}"), i % 3 == 0))
                    .collect(),
            },
        ] {
            let stored = encode_announce(announce.clone());
            assert_eq!(decode_announce(&stored), Some(announce));
        }
    }
}

/// One timer per core instead of one per tunnel: every [`ticker::TICK`] a single task runs the
/// due keepalive and grace timers of every session of its core and wakes the drivers that have
/// something to send. A tunnel's driver then waits on its socket and its wakeups only, and an
/// idle tunnel costs no timer entry (and no timer-sized state in its driver's future) between
/// ticks; keepalive intervals are seconds, so a tick of a tenth of a second is precise enough.
mod ticker {
    use std::cell::{Cell, RefCell};
    use std::rc::{Rc, Weak};
    use std::time::{Duration, Instant};

    use super::Shared;

    /// Resolution of keepalive and grace timers.
    pub(super) const TICK: Duration = Duration::from_millis(100);
    /// Slots of the timer wheel: 1024 ticks = 102.4 s ahead. A session due later waits in the
    /// farthest slot and is put back where it belongs when that slot comes round.
    const SLOTS: u64 = 1024;

    /// A session and the number of its live entry: when a session's timer moves earlier
    /// (`reschedule`), it gets a new entry and the old one is dropped when its slot comes.
    type Entry = (Weak<RefCell<Shared>>, u32);

    /// A timer wheel: each session waits in the slot of the tick its next timer falls in, so
    /// a tick looks only at the sessions due then (a tenth of a second's worth), not at every
    /// session of the core (which, at 10,000 tunnels, was a fifth of an idle proxy's CPU).
    struct Wheel {
        slots: Vec<Vec<Entry>>,
        /// The last tick processed, counted from `start`.
        tick: u64,
        start: Option<Instant>,
    }

    impl Wheel {
        /// Files `entry` under the tick of `due` (at least the next one).
        fn insert(&mut self, entry: Entry, due: Instant, now: Instant) {
            if self.slots.is_empty() {
                self.slots.resize_with(SLOTS as usize, Vec::new);
            }
            let ahead = due.saturating_duration_since(now).as_micros() / TICK.as_micros();
            let ahead = (ahead as u64 + 1).min(SLOTS - 1);
            let slot = (self.tick + ahead) % SLOTS;
            if let Some(list) = self.slots.get_mut(slot as usize) {
                list.push(entry);
            }
        }
    }

    thread_local! {
        static WHEEL: RefCell<Wheel> = const {
            RefCell::new(Wheel { slots: Vec::new(), tick: 0, start: None })
        };
        static RUNNING: Cell<bool> = const { Cell::new(false) };
    }

    /// Puts a session under this core's ticker (once; a reattached session stays registered).
    pub(super) fn register(shared: &Rc<RefCell<Shared>>) {
        let due = {
            let mut s = shared.borrow_mut();
            if s.ticked {
                return;
            }
            s.ticked = true;
            (s.session.poll_timeout(), s.wheel_entry)
        };
        let now = Instant::now();
        WHEEL.with(|w| {
            let mut w = w.borrow_mut();
            w.start.get_or_insert(now);
            w.insert((Rc::downgrade(shared), due.1), due.0.unwrap_or(now), now);
        });
        if !RUNNING.with(|r| r.replace(true)) {
            monoio::spawn(run());
        }
    }

    /// Files a registered session again for its current next timer, which may now be earlier
    /// than the slot it waits in (a reattached session's keepalive after a long grace).
    pub(super) fn reschedule(shared: &Rc<RefCell<Shared>>, s: &mut Shared) {
        if !s.ticked {
            return;
        }
        s.wheel_entry = s.wheel_entry.wrapping_add(1);
        let now = Instant::now();
        let due = s.session.poll_timeout().unwrap_or(now);
        let entry = (Rc::downgrade(shared), s.wheel_entry);
        WHEEL.with(|w| w.borrow_mut().insert(entry, due, now));
    }

    async fn run() {
        loop {
            monoio::time::sleep(TICK).await;
            let now = Instant::now();
            // Every tick up to now, so a late wake-up (a busy core) skips no slot.
            let (from, to) = WHEEL.with(|w| {
                let w = w.borrow();
                let start = w.start.unwrap_or(now);
                let elapsed =
                    (now.saturating_duration_since(start).as_micros() / TICK.as_micros()) as u64;
                (w.tick, elapsed.max(w.tick).min(w.tick + SLOTS))
            });
            for tick in from + 1..=to {
                // Taken out while ticking: sessions woken below cannot register meanwhile
                // (their drivers run only after this task yields).
                let due_now = WHEEL.with(|w| {
                    let mut w = w.borrow_mut();
                    w.tick = tick;
                    w.slots
                        .get_mut((tick % SLOTS) as usize)
                        .map(std::mem::take)
                        .unwrap_or_default()
                });
                for (weak, number) in due_now {
                    let Some(shared) = weak.upgrade() else {
                        continue; // the tunnel is gone
                    };
                    let next = match shared.try_borrow_mut() {
                        Err(_) => Some(now),                      // busy right now: look again next tick
                        Ok(s) if s.wheel_entry != number => None, // superseded
                        Ok(mut s) => {
                            if s.session.is_ended() {
                                s.ticked = false;
                                None
                            } else {
                                if s.session.poll_timeout().is_some_and(|at| at <= now) {
                                    s.session.handle_timeout(now);
                                    s.dispatch();
                                    s.release_idle_buffers();
                                    s.wake_driver();
                                }
                                Some(s.session.poll_timeout().unwrap_or(now))
                            }
                        }
                    };
                    if let Some(due) = next {
                        WHEEL.with(|w| w.borrow_mut().insert((weak, number), due, now));
                    }
                }
            }
        }
    }
}
