//! The stream multiplexer: one [`Session`] per tunnel, a state machine driven with bytes and
//! time passed in.
//!
//! # Calling order
//!
//! A driver owns one transport (a TLS connection) and one `Session`, and loops:
//!
//! 1. Bytes read from the transport go to [`Session::handle_input`]. An `Err` means the
//!    peer broke the protocol: flush what [`Session::poll_transmit`] still yields (a GOAWAY
//!    naming the error), then close the transport.
//! 2. Drain [`Session::poll_event`] and act on each event: accept or reject incoming OPENs,
//!    [`Session::recv`] from streams that became readable until it returns
//!    [`Received::Nothing`], [`Session::send`] to streams that became writable.
//! 3. Write every [`Transmit`] from [`Session::poll_transmit`] to the transport, in order.
//! 4. Wait for input or for [`Session::poll_timeout`]; when that instant passes, call
//!    [`Session::handle_timeout`], then go to 2.
//!
//! When the transport fails, call [`Session::transport_lost`]. The streams stay; after a new
//! transport is up within the grace period, call [`Session::reattach`] and go on from 3:
//! the two sides exchange HELLO (flag RESUMING) and RESUME, and each resends exactly the
//! bytes the other lacks.
//!
//! # Flow control and acknowledgement
//!
//! Each stream has credit in each direction: the receiver grants `initial_window` bytes and
//! sends WINDOW as the application consumes. A WINDOW increment both extends the credit and
//! acknowledges that many bytes, so the sender keeps every sent byte until it is
//! acknowledged (at most one window per stream: [`Session::send`] accepts no more than the
//! credit) and can resend it after a reconnect. A stalled reader stalls only its stream.
//!
//! The credit we take is the peer's window capped at our own: a peer announcing 4 GiB cannot
//! make us queue more for it than we let it queue for us. Across streams, the session holds
//! at most [`SessionConfig::max_buffered`] each way (see [`DEFAULT_MAX_BUFFERED`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use slab::Slab;

use crate::codec::{
    self, Announce, Frame, HEADER_LEN, Hello, Kind, Limits, MAX_DATA_PAYLOAD, MAX_REASON_LEN,
    MAX_STREAM_ID, Open, PROTOCOL_VERSION, Resume, ResumeStream, Role,
};
use crate::error::{EndReason, Error, ErrorCode, ProtocolError, StreamError};

/// Credit granted to each new stream: 1 MiB keeps a 20 ms round trip at 50 MB/s per stream.
pub const DEFAULT_WINDOW: u32 = 0x10_0000;
/// Largest DATA payload accepted: 16 KiB, one TLS record.
pub const DEFAULT_MAX_FRAME: u32 = 0x4000;
/// Streams a peer may hold open on one tunnel at once.
pub const DEFAULT_MAX_STREAMS: u32 = 1024;
/// Incoming OPENs the application has not answered yet.
pub const DEFAULT_MAX_PENDING_OPENS: u32 = 64;
/// Time between PINGs.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Intervals without any frame from the peer before the transport is declared dead.
pub const DEFAULT_KEEPALIVE_COUNT: u32 = 3;
/// Control frames queued for a peer that does not read, beyond which its further OPENs are a
/// protocol error: refusals must not grow without bound.
const MAX_CONTROL_BACKLOG: usize = 4096;
/// How long streams wait for a lost transport to come back.
pub const DEFAULT_RESUME_GRACE: Duration = Duration::from_secs(30);
/// Stream bytes one session may hold each way, across its streams: 256 MiB. Inbound, unread
/// bytes beyond it are a protocol error of the peer (LIMIT_EXCEEDED); outbound, `send` takes no
/// more than fits (queued plus sent but unacknowledged). Windows alone bound a stream, not a
/// tunnel: 1,024 streams × 1 MiB is 1 GiB each way; this bounds the tunnel at a quarter of
/// that while leaving room for 256 streams whose readers stall with a full window.
pub const DEFAULT_MAX_BUFFERED: u32 = 0x1000_0000;

/// DATA payloads shorter than this are copied out of the buffer they were decoded from. A
/// payload is a view of the driver's read buffer (a whole read's worth, up to 256 KiB), and a
/// view keeps that buffer alive until the application reads it: without the copy, a stream
/// that stops reading would pin a large buffer per small frame, far beyond its window. With
/// it, what unread DATA pins is at most its own size times read buffer ÷ this (16× for
/// 256 KiB reads); frames at least this long (bulk) stay zero-copy.
pub const COPY_DATA_BELOW: usize = 0x4000;

/// Settings of one session. Everything the peer can make us hold is capped here.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// What this side is, as told to the peer.
    pub role: Role,
    /// Whether this side dialled the transport: dialers open odd stream ids, acceptors even.
    pub dialer: bool,
    /// Credit we grant each stream (bytes the peer may send before we consume).
    pub initial_window: u32,
    /// Largest DATA payload we accept.
    pub max_frame: u32,
    /// Streams the peer may hold open with us at once; more OPENs are refused.
    pub max_streams: u32,
    /// Incoming OPENs not yet accepted or rejected; more are refused.
    pub max_pending_opens: u32,
    /// Largest ANNOUNCE we accept (and send).
    pub max_announce: u32,
    /// Whether the peer may send ANNOUNCE at all. A proxy's side of a user's connection says
    /// no: a user has no inventory, and decoding a large ANNOUNCE costs CPU and memory, so
    /// one is a protocol error from its header alone.
    pub peer_may_announce: bool,
    /// Time between PINGs.
    pub keepalive_interval: Duration,
    /// Intervals without a frame from the peer before the transport is dead.
    pub keepalive_count: u32,
    /// How long streams survive a lost transport; zero ends the session at once.
    pub resume_grace: Duration,
    /// The session's memory budget: stream bytes it holds each way across its streams
    /// ([`DEFAULT_MAX_BUFFERED`] says how each way is enforced).
    pub max_buffered: u32,
}

impl SessionConfig {
    /// Defaults for a side with the given role and dialling direction.
    pub fn new(role: Role, dialer: bool) -> Self {
        SessionConfig {
            role,
            dialer,
            initial_window: DEFAULT_WINDOW,
            max_frame: DEFAULT_MAX_FRAME,
            max_streams: DEFAULT_MAX_STREAMS,
            max_pending_opens: DEFAULT_MAX_PENDING_OPENS,
            max_announce: codec::Limits::default().max_announce as u32,
            peer_may_announce: true,
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_count: DEFAULT_KEEPALIVE_COUNT,
            resume_grace: DEFAULT_RESUME_GRACE,
            max_buffered: DEFAULT_MAX_BUFFERED,
        }
    }
}

/// What happened, for the driver to act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The peer's HELLO arrived on a fresh session.
    Connected {
        /// What the peer is.
        role: Role,
    },
    /// A reattached transport carries the session again.
    Resumed {
        /// Streams that survived.
        streams: usize,
    },
    /// The transport was declared dead by the keepalive; the driver should drop it and, if
    /// it dials, reconnect and call [`Session::reattach`].
    TransportDead,
    /// The peer asks to open a stream; answer with [`Session::accept`] or [`Session::reject`].
    IncomingOpen {
        /// The new stream.
        stream: u32,
        /// What the peer wants the stream connected to.
        request: Open,
    },
    /// Our OPEN was accepted; the stream carries data now.
    Opened {
        /// The stream.
        stream: u32,
    },
    /// Our OPEN was refused.
    OpenFailed {
        /// The stream (now gone).
        stream: u32,
        /// Why, as a code.
        code: ErrorCode,
        /// Why, in words from the peer.
        reason: String,
    },
    /// Data or the peer's FIN arrived on a stream whose receive queue was empty; call
    /// [`Session::recv`] until it returns [`Received::Nothing`].
    Readable {
        /// The stream.
        stream: u32,
    },
    /// Credit came back on a stream that had used it up.
    Writable {
        /// The stream.
        stream: u32,
    },
    /// The stream was aborted by the peer, or by the session ending.
    Reset {
        /// The stream (now gone).
        stream: u32,
        /// Why, as a code.
        code: ErrorCode,
        /// Why, in words.
        reason: String,
    },
    /// Both directions finished and every byte was acknowledged; the stream is gone.
    Closed {
        /// The stream.
        stream: u32,
    },
    /// The peer's inventory; it replaces the previous one.
    Announce(Announce),
    /// The peer drains: open no new streams here.
    GoAway {
        /// Code from the peer.
        code: ErrorCode,
        /// Reason from the peer.
        reason: String,
    },
    /// The session is over; every stream has been reset. The driver closes the transport
    /// after flushing [`Session::poll_transmit`].
    Ended(Error),
}

/// What [`Session::recv`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Received {
    /// Stream bytes, in order, as a view of the buffer they arrived in.
    Data(Bytes),
    /// The peer finished sending and every byte has been read.
    Finished,
    /// Nothing to read now; a `Readable` event says when there is.
    Nothing,
}

/// One frame to write to the transport: a header and a payload, the payload never copied.
#[derive(Clone, Debug)]
pub struct Transmit {
    header: [u8; HEADER_LEN],
    payload: Bytes,
}

impl Transmit {
    fn data(stream: u32, payload: Bytes) -> Self {
        let mut header = [0u8; HEADER_LEN];
        codec::encode_header(Kind::Data, 0, stream, payload.len(), &mut &mut header[..]);
        Transmit { header, payload }
    }

    fn control(frame: &Frame) -> Self {
        let mut encoded = BytesMut::with_capacity(HEADER_LEN + frame.payload_len());
        frame.encode(&mut encoded);
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(&encoded[..HEADER_LEN]);
        encoded.advance(HEADER_LEN);
        Transmit {
            header,
            payload: encoded.freeze(),
        }
    }

    /// The stream the frame is for (0 for connection frames).
    pub fn stream(&self) -> u32 {
        u32::from_be_bytes([
            self.header[5],
            self.header[6],
            self.header[7],
            self.header[8],
        ])
    }

    /// The frame header.
    pub fn header(&self) -> &[u8] {
        &self.header
    }

    /// The payload.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Encoded length of the frame.
    pub fn len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }

    /// Whether the frame is empty (it never is: there is always a header).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Appends the whole frame to `dst` (a copy; for buffers and tests).
    pub fn write_to(&self, dst: &mut impl bytes::BufMut) {
        dst.put_slice(&self.header);
        dst.put_slice(&self.payload);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Our HELLO is queued; waiting for the peer's.
    Handshake {
        resuming: bool,
    },
    /// Both HELLOs said RESUMING; waiting for the peer's RESUME before any stream frame.
    AwaitResume,
    Open,
    Detached {
        since: Instant,
    },
    Ended,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StreamPhase {
    /// We sent OPEN; waiting for OPEN_OK.
    OpeningLocal,
    /// The peer sent OPEN; the application has not answered.
    OpeningRemote,
    Open,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LocalFin {
    NotYet,
    /// `finish` was called; FIN goes out after the last byte.
    Pending,
    Sent,
}

#[derive(Debug)]
struct Stream {
    id: u32,
    phase: StreamPhase,
    /// Kept while our OPEN is unanswered, to resend it if the transport drops.
    request: Option<Open>,
    /// Whether our OPEN for this stream was ever queued; a stream reset before that is
    /// dropped silently (a RESET would name a stream the peer never heard of).
    open_sent: bool,
    /// Sent and kept for resending: bytes `base..next`.
    unacked: VecDeque<Bytes>,
    /// Accepted from the application, not yet sent: bytes `next..written`.
    unsent: VecDeque<Bytes>,
    /// Acknowledged by the peer (consumed by its application). The FIN counts as one unit at
    /// offset `written`, so a stream whose FIN was acknowledged has `acked == written + 1`.
    acked: u64,
    /// First byte still kept: bytes below it were acknowledged or are known to be received.
    base: u64,
    next: u64,
    written: u64,
    /// Credit: we may have written up to this offset.
    limit: u64,
    fin: LocalFin,
    blocked: bool,
    queued: bool,
    inbox: VecDeque<Bytes>,
    received: u64,
    consumed: u64,
    /// Credit the peer knows about (absolute offset).
    granted: u64,
    /// Consumed bytes not yet reported in a WINDOW.
    unreported: u64,
    fin_received: bool,
    /// The application has read the peer's FIN (it counts as one consumed unit).
    fin_consumed: bool,
}

impl Stream {
    fn new(id: u32, phase: StreamPhase, window: u32, request: Option<Open>) -> Self {
        Stream {
            id,
            phase,
            request,
            open_sent: false,
            unacked: VecDeque::new(),
            unsent: VecDeque::new(),
            acked: 0,
            base: 0,
            next: 0,
            written: 0,
            limit: 0,
            fin: LocalFin::NotYet,
            blocked: false,
            queued: false,
            inbox: VecDeque::new(),
            received: 0,
            consumed: 0,
            granted: u64::from(window),
            unreported: 0,
            fin_received: false,
            fin_consumed: false,
        }
    }

    fn has_output(&self) -> bool {
        self.phase == StreamPhase::Open
            && (!self.unsent.is_empty() || self.fin == LocalFin::Pending)
    }

    /// Both FINs are through and acknowledged both ways: nothing can be lost any more.
    fn is_complete(&self) -> bool {
        self.phase == StreamPhase::Open
            && self.fin == LocalFin::Sent
            && self.acked == self.written + 1
            && self.fin_consumed
    }

    /// Where the sent data and the FIN end, in acknowledgement units.
    fn sent_end(&self) -> u64 {
        self.next + u64::from(self.fin == LocalFin::Sent)
    }

    /// Bytes kept to send or resend (queued plus sent and unacknowledged).
    fn held_out(&self) -> u64 {
        self.written - self.base
    }

    /// Received bytes the application has not read.
    fn held_in(&self) -> u64 {
        self.received - (self.consumed - u64::from(self.fin_consumed))
    }

    /// Drops kept bytes below `offset` (acknowledged, or known to be at the peer); returns
    /// how many.
    fn release_to(&mut self, offset: u64) -> u64 {
        let target = offset.min(self.next);
        let released = target.saturating_sub(self.base);
        let mut n = released;
        self.base = self.base.max(target);
        while n > 0 {
            let Some(front) = self.unacked.front_mut() else {
                break;
            };
            let len = front.len() as u64;
            if len <= n {
                n -= len;
                self.unacked.pop_front();
            } else {
                front.advance(n as usize);
                n = 0;
            }
        }
        released
    }

    fn check_invariants(&self) {
        debug_assert!(self.acked <= self.sent_end() && self.next <= self.written);
        debug_assert!(self.base <= self.next);
        debug_assert_eq!(
            self.unacked.iter().map(|b| b.len() as u64).sum::<u64>(),
            self.next - self.base
        );
        debug_assert_eq!(
            self.unsent.iter().map(|b| b.len() as u64).sum::<u64>(),
            self.written - self.next
        );
        debug_assert!(self.consumed <= self.received + u64::from(self.fin_consumed));
    }
}

#[derive(Clone, Copy, Debug)]
struct Peer {
    session_id: [u8; 16],
    role: Role,
    /// The window the peer's HELLO announced: its RESUME's credit limits count from it.
    initial_window: u32,
    /// The credit we take per stream: the peer's window, capped at our own
    /// (`SessionConfig::initial_window`). A peer cannot make us hold more for it than we
    /// would let it make us hold: without the cap, a peer announcing 4 GiB and never reading
    /// has us queue 4 GiB per stream.
    send_window: u32,
    max_frame: u32,
    max_streams: u32,
}

/// The multiplexer of one tunnel. See the module documentation for the calling order.
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    limits: Limits,
    local_id: [u8; 16],
    peer: Option<Peer>,
    phase: Phase,
    streams: Slab<Stream>,
    /// Stream id to slab key. A B-tree rather than a hash map: 24 bytes inline instead of
    /// 48 and no allocation while the tunnel has no stream (most tunnels, most of the time).
    ids: BTreeMap<u32, usize>,
    next_local_id: u32,
    highest_peer_id: u32,
    pending_opens: u32,
    control: VecDeque<Transmit>,
    /// The PONG owed for the latest PING; older ones are superseded, so a peer that floods
    /// PINGs without reading cannot grow our queue.
    pending_pong: Option<u64>,
    /// Our keepalive PING (number `ping_counter`) is due. A slot rather than an entry of
    /// `control`, so that a keepalive tick of an idle tunnel allocates no queue.
    ping_due: bool,
    /// Streams with bytes or a FIN to send, served round robin one frame at a time.
    sendable: VecDeque<(usize, u32)>,
    /// Stream bytes held across streams, against `config.max_buffered`: received and not
    /// read (`Stream::held_in`), and kept to send or resend (`Stream::held_out`). Each is at
    /// most the budget, so a `u32` holds it.
    held_in: u32,
    held_out: u32,
    events: VecDeque<Event>,
    /// What an idle tunnel does not use, allocated on first use (see [`Cold`]).
    cold: Option<Box<Cold>>,
    goaway_received: bool,
    next_keepalive: Instant,
    heard_since_tick: bool,
    /// A PING arrived since the last keepalive tick: our PONG to it already shows the peer
    /// we are alive, so this tick sends no PING of its own (one PING and one PONG per
    /// interval per tunnel instead of two of each, once the two sides' ticks settle).
    pinged_since_tick: bool,
    missed: u32,
    ping_counter: u64,
    /// When PING number `ping_counter` was sent, until its PONG arrives.
    ping_sent: Option<Instant>,
    rtt: Option<Duration>,
}

/// Session state that a tunnel holds only around rare events (a reconnect, a drain, the
/// end, an agent's inventory), boxed so that tens of thousands of idle sessions do not each
/// carry it inline (about 150 bytes).
#[derive(Debug, Default)]
struct Cold {
    /// Stream control frames made while waiting for the peer's RESUME.
    deferred: Vec<Transmit>,
    /// Our latest ANNOUNCE, sent again after a reconnect.
    last_announce: Option<Transmit>,
    /// The GOAWAY we sent, sent again after a reconnect.
    goaway_sent: Option<(ErrorCode, String)>,
    /// Why the session ended.
    ended: Option<Error>,
}

impl Session {
    /// A new session whose HELLO is queued at once. `local_id` names the session across
    /// reconnects and should be random (the driver has the random source, not this crate).
    pub fn new(mut config: SessionConfig, local_id: [u8; 16], now: Instant) -> Self {
        // RESUME lists every stream with a u16 count.
        config.max_streams = config.max_streams.min(codec::MAX_RESUME_STREAMS as u32);
        let limits = Limits {
            max_data: (config.max_frame as usize).min(MAX_DATA_PAYLOAD),
            max_announce: config.max_announce as usize,
        };
        let mut session = Session {
            next_local_id: if config.dialer { 1 } else { 2 },
            next_keepalive: now + config.keepalive_interval,
            config,
            limits,
            local_id,
            peer: None,
            phase: Phase::Handshake { resuming: false },
            streams: Slab::new(),
            ids: BTreeMap::new(),
            highest_peer_id: 0,
            pending_opens: 0,
            control: VecDeque::new(),
            pending_pong: None,
            ping_due: false,
            sendable: VecDeque::new(),
            held_in: 0,
            held_out: 0,
            events: VecDeque::new(),
            cold: None,
            goaway_received: false,
            heard_since_tick: false,
            pinged_since_tick: false,
            missed: 0,
            ping_counter: 0,
            ping_sent: None,
            rtt: None,
        };
        session.queue_hello(false);
        session
    }

    /// This side's session id.
    pub fn local_id(&self) -> [u8; 16] {
        self.local_id
    }

    /// The peer's session id, once its HELLO arrived.
    pub fn peer_id(&self) -> Option<[u8; 16]> {
        self.peer.map(|p| p.session_id)
    }

    /// The peer's role, once its HELLO arrived.
    pub fn peer_role(&self) -> Option<Role> {
        self.peer.map(|p| p.role)
    }

    /// The last measured round trip (PING to PONG).
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    /// Streams currently held.
    pub fn stream_count(&self) -> usize {
        self.streams.len()
    }

    /// Whether the session is over.
    pub fn is_ended(&self) -> bool {
        self.phase == Phase::Ended
    }

    /// Why the session ended, once it has.
    pub fn end_reason(&self) -> Option<Error> {
        self.ended().cloned()
    }

    /// Whether the transport is gone and the session waits for [`Session::reattach`].
    pub fn is_detached(&self) -> bool {
        matches!(self.phase, Phase::Detached { .. })
    }

    /// Whether the peer sent GOAWAY.
    pub fn peer_going_away(&self) -> bool {
        self.goaway_received
    }

    /// Bytes sent (accepted from the application) and received on a stream.
    pub fn stream_bytes(&self, stream: u32) -> Option<(u64, u64)> {
        let s = &self.streams[*self.ids.get(&stream)?];
        Some((s.written, s.received))
    }

    /// Bytes the application may still [`send`](Session::send) on a stream before it must
    /// wait for a `Writable` event: the stream's credit, within the session's budget.
    pub fn send_capacity(&self, stream: u32) -> usize {
        self.ids
            .get(&stream)
            .map(|&k| {
                let s = &self.streams[k];
                if s.phase == StreamPhase::Open && s.fin == LocalFin::NotYet {
                    s.limit.saturating_sub(s.written).min(self.budget_room()) as usize
                } else {
                    0
                }
            })
            .unwrap_or(0)
    }

    /// Stream bytes the session holds across its streams: `(inbound, outbound)`, received
    /// and not yet read, and queued or sent and not yet acknowledged. Each stays within
    /// [`SessionConfig::max_buffered`].
    pub fn buffered(&self) -> (u64, u64) {
        (u64::from(self.held_in), u64::from(self.held_out))
    }

    /// Bytes of send credit a stream has: its credit limit minus what was written; how much
    /// the peer still lets us queue on it (for tests and diagnostics).
    pub fn stream_credit(&self, stream: u32) -> Option<u64> {
        let s = &self.streams[*self.ids.get(&stream)?];
        Some(s.limit.saturating_sub(s.written))
    }

    // ---- inputs -------------------------------------------------------------------------

    /// Decodes and handles every complete frame at the front of `buf`, leaving an incomplete
    /// tail in place. An error ends the session (a GOAWAY naming it is queued).
    pub fn handle_input(&mut self, buf: &mut BytesMut, now: Instant) -> Result<(), Error> {
        if let Some(err) = self.ended() {
            return Err(err.clone());
        }
        if self.is_detached() {
            return Ok(());
        }
        loop {
            if !self.config.peer_may_announce
                && buf.len() >= HEADER_LEN
                && buf[3] == Kind::Announce as u8
            {
                return Err(self.fail(ProtocolError::AnnounceNotAccepted.into()));
            }
            let frame = match codec::decode(buf, &self.limits) {
                Ok(Some(frame)) => frame,
                Ok(None) => {
                    self.check_budget();
                    return Ok(());
                }
                Err(err) => return Err(self.fail(err.into())),
            };
            self.heard_since_tick = true;
            if let Err(err) = self.handle_frame(frame, now) {
                return Err(self.fail(err));
            }
            if self.phase == Phase::Ended {
                return Ok(());
            }
        }
    }

    fn handle_frame(&mut self, frame: Frame, now: Instant) -> Result<(), Error> {
        if let Phase::Handshake { resuming } = self.phase {
            return match frame {
                Frame::Hello(hello) => self.handle_hello(hello, resuming),
                Frame::GoAway { code, reason } => {
                    self.handle_goaway(code, reason);
                    Ok(())
                }
                other => Err(ProtocolError::ExpectedHello(other.kind()).into()),
            };
        }
        if self.phase == Phase::AwaitResume {
            return match frame {
                Frame::Resume(resume) => self.handle_resume(resume),
                Frame::Ping { opaque } => {
                    self.pending_pong = Some(opaque);
                    self.pinged_since_tick = true;
                    Ok(())
                }
                Frame::Pong { opaque } => {
                    self.handle_pong(opaque, now);
                    Ok(())
                }
                Frame::GoAway { code, reason } => {
                    self.handle_goaway(code, reason);
                    Ok(())
                }
                Frame::Announce(announce) => {
                    self.events.push_back(Event::Announce(announce));
                    Ok(())
                }
                other => Err(ProtocolError::WrongState {
                    kind: other.kind(),
                    stream: other.stream(),
                    state: "waiting for RESUME",
                }
                .into()),
            };
        }
        match frame {
            Frame::Hello(_) => Err(ProtocolError::DuplicateHello.into()),
            Frame::Resume(_) => {
                Err(ProtocolError::UnexpectedResume("no reconnect is under way").into())
            }
            Frame::Announce(announce) => {
                self.events.push_back(Event::Announce(announce));
                Ok(())
            }
            Frame::Ping { opaque } => {
                self.pending_pong = Some(opaque);
                self.pinged_since_tick = true;
                Ok(())
            }
            Frame::Pong { opaque } => {
                self.handle_pong(opaque, now);
                Ok(())
            }
            Frame::GoAway { code, reason } => {
                self.handle_goaway(code, reason);
                Ok(())
            }
            Frame::Open { stream, open } => self.handle_open(stream, open),
            Frame::OpenOk { stream } => self.handle_open_ok(stream),
            Frame::OpenFail {
                stream,
                code,
                reason,
            } => {
                if let Some(key) = self.live(Kind::OpenFail, stream)? {
                    if self.streams[key].phase != StreamPhase::OpeningLocal {
                        return Err(self.wrong_state(Kind::OpenFail, key));
                    }
                    self.remove(key);
                    self.events.push_back(Event::OpenFailed {
                        stream,
                        code,
                        reason,
                    });
                }
                Ok(())
            }
            Frame::Data { stream, payload } => self.handle_data(stream, payload),
            Frame::Window { stream, increment } => self.handle_window(stream, increment),
            Frame::Fin { stream } => {
                if let Some(key) = self.live(Kind::Fin, stream)? {
                    let s = &mut self.streams[key];
                    if s.phase != StreamPhase::Open || s.fin_received {
                        return Err(self.wrong_state(Kind::Fin, key));
                    }
                    s.fin_received = true;
                    if s.inbox.is_empty() {
                        self.events.push_back(Event::Readable { stream });
                    }
                }
                Ok(())
            }
            Frame::Reset {
                stream,
                code,
                reason,
            } => {
                if let Some(key) = self.live(Kind::Reset, stream)? {
                    if self.streams[key].phase == StreamPhase::OpeningRemote {
                        self.pending_opens -= 1;
                    }
                    self.remove(key);
                    self.events.push_back(Event::Reset {
                        stream,
                        code,
                        reason,
                    });
                }
                Ok(())
            }
        }
    }

    fn handle_hello(&mut self, hello: Hello, we_resume: bool) -> Result<(), Error> {
        let version = hello.version_max.min(PROTOCOL_VERSION);
        if version < hello.version_min.max(PROTOCOL_VERSION) {
            return Err(ProtocolError::VersionMismatch {
                ours_min: PROTOCOL_VERSION,
                ours_max: PROTOCOL_VERSION,
                theirs_min: hello.version_min,
                theirs_max: hello.version_max,
            }
            .into());
        }
        if hello.initial_window == 0 || hello.max_frame == 0 || hello.max_streams == 0 {
            return Err(ProtocolError::WrongState {
                kind: Kind::Hello,
                stream: 0,
                state: "announcing a zero window, frame size or stream limit",
            }
            .into());
        }
        let same_peer = self.peer.map(|p| p.session_id) == Some(hello.session_id);
        self.peer = Some(Peer {
            session_id: hello.session_id,
            role: hello.role,
            initial_window: hello.initial_window,
            send_window: hello.initial_window.min(self.config.initial_window),
            max_frame: hello.max_frame.min(MAX_DATA_PAYLOAD as u32),
            max_streams: hello.max_streams,
        });
        if we_resume && !same_peer {
            // The peer restarted, or never saw our first HELLO: our streams cannot go on,
            // and its stream ids start again.
            self.reset_all(
                ErrorCode::RESUME_FAILED,
                "peer restarted; the stream could not be resumed",
            );
            self.highest_peer_id = 0;
        }
        if we_resume && hello.resuming {
            // Both sides resume: both send RESUME (empty after a restart), so neither waits
            // for a RESUME that never comes nor gets one it does not expect.
            self.phase = Phase::AwaitResume;
            let resume = self.resume_frame();
            self.push_control(&Frame::Resume(resume));
            for s in self.streams.iter_mut().map(|(_, s)| s) {
                // RESUME tells the peer our credit; nothing is owed any more.
                s.granted = s.consumed + u64::from(self.config.initial_window);
                s.unreported = 0;
            }
            return Ok(());
        }
        if we_resume && same_peer {
            // The peer kept our id but is not resuming: it dropped the session's streams.
            self.reset_all(
                ErrorCode::RESUME_FAILED,
                "peer restarted; the stream could not be resumed",
            );
            self.highest_peer_id = 0;
        }
        self.phase = Phase::Open;
        self.events.push_back(Event::Connected { role: hello.role });
        Ok(())
    }

    fn resume_frame(&self) -> Resume {
        let window = u64::from(self.config.initial_window);
        let peer_opened = |id: u32| (id % 2 == 1) != self.config.dialer;
        Resume {
            last_peer_stream: self.highest_peer_id,
            streams: self
                .streams
                .iter()
                .map(|(_, s)| ResumeStream {
                    stream: s.id,
                    received: s.received,
                    credit_limit: s.consumed + window,
                    fin_received: s.fin_received,
                    accepted: peer_opened(s.id) && s.phase == StreamPhase::Open,
                })
                .collect(),
        }
    }

    fn handle_resume(&mut self, resume: Resume) -> Result<(), Error> {
        let listed: HashMap<u32, ResumeStream> =
            resume.streams.iter().map(|e| (e.stream, *e)).collect();
        let peer_window = self.peer_window();
        let send_window = self.send_window();
        // In id order, so that OPENs sent again keep increasing ids.
        let mut keys: Vec<usize> = self.streams.iter().map(|(k, _)| k).collect();
        keys.sort_by_key(|&k| self.streams[k].id);
        for key in keys {
            let id = self.streams[key].id;
            let ours = self.is_local_id(id);
            match listed.get(&id) {
                Some(entry) => {
                    let s = &mut self.streams[key];
                    // The peer's credit limit is what it consumed plus its window.
                    let peer_acked = entry.credit_limit.saturating_sub(peer_window);
                    if peer_acked < s.acked
                        || peer_acked > s.sent_end()
                        || entry.received < s.base
                        || entry.received > s.next
                    {
                        return Err(ProtocolError::AckBeyondSent {
                            stream: id,
                            acked: entry.received.max(peer_acked),
                            sent: s.sent_end(),
                        }
                        .into());
                    }
                    // Bytes the peer holds need not be sent again; the rest are.
                    s.acked = peer_acked;
                    let released = s.release_to(entry.received);
                    while let Some(chunk) = s.unacked.pop_back() {
                        s.unsent.push_front(chunk);
                    }
                    s.next = entry.received;
                    // Our credit is capped at our own window, as on a fresh stream.
                    s.limit = entry.credit_limit.min(peer_acked + send_window);
                    if s.fin == LocalFin::Sent && !entry.fin_received {
                        s.fin = LocalFin::Pending;
                    }
                    if ours && s.phase == StreamPhase::OpeningLocal && entry.accepted {
                        s.phase = StreamPhase::Open;
                        s.request = None;
                        self.events.push_back(Event::Opened { stream: id });
                    }
                    s.check_invariants();
                    self.released(released);
                    self.schedule(key);
                    self.maybe_complete(key);
                }
                None if ours && id > resume.last_peer_stream => {
                    // Our OPEN never arrived: send it again.
                    if let Some(request) = self.streams[key].request.clone() {
                        self.push_control(&Frame::Open {
                            stream: id,
                            open: request,
                        });
                        self.streams[key].open_sent = true;
                    }
                }
                None => {
                    let s = &mut self.streams[key];
                    // A peer that forgot a stream after both FINs had crossed completed it:
                    // it had every byte and our FIN. Keep what our application has not read.
                    if s.phase == StreamPhase::Open && s.fin == LocalFin::Sent && s.fin_received {
                        s.acked = s.written + 1;
                        let released = s.release_to(s.next);
                        self.released(released);
                        self.maybe_complete(key);
                        continue;
                    }
                    let phase = s.phase;
                    if phase == StreamPhase::OpeningRemote {
                        self.pending_opens -= 1;
                    }
                    self.remove(key);
                    let reason =
                        "the peer no longer had the stream after the reconnect".to_string();
                    let code = ErrorCode::RESUME_FAILED;
                    self.events.push_back(match phase {
                        StreamPhase::OpeningLocal => Event::OpenFailed {
                            stream: id,
                            code,
                            reason,
                        },
                        _ => Event::Reset {
                            stream: id,
                            code,
                            reason,
                        },
                    });
                }
            }
        }
        self.phase = Phase::Open;
        // A stream we opened and reset while waiting for this RESUME, whose OPEN the peer
        // never saw (its id is above `last_peer_stream`), must stay unknown to the peer: its
        // deferred RESET (or any other frame) would name a stream that was never opened.
        let last = resume.last_peer_stream;
        let deferred = self
            .cold
            .as_mut()
            .map(|c| std::mem::take(&mut c.deferred))
            .unwrap_or_default();
        for t in deferred {
            let id = t.stream();
            let unseen =
                id != 0 && self.is_local_id(id) && id > last && !self.ids.contains_key(&id);
            if !unseen {
                self.control.push_back(t);
            }
        }
        self.events.push_back(Event::Resumed {
            streams: self.streams.len(),
        });
        Ok(())
    }

    fn handle_open(&mut self, stream: u32, open: Open) -> Result<(), Error> {
        if self.is_local_id(stream) {
            return Err(ProtocolError::BadStreamId {
                stream,
                problem: "the id has the parity of the streams we open",
            }
            .into());
        }
        if stream <= self.highest_peer_id {
            return Err(ProtocolError::BadStreamId {
                stream,
                problem: "stream ids must increase; this one was used before",
            }
            .into());
        }
        self.highest_peer_id = stream;
        let refuse = if self.goaway_sent().is_some() {
            Some((
                ErrorCode::GOING_AWAY,
                "tunnel is draining; open the stream elsewhere".to_string(),
            ))
        } else if self.streams.len() >= self.config.max_streams as usize {
            Some((
                ErrorCode::LIMIT_EXCEEDED,
                format!(
                    "at most {} streams per tunnel (limits.max_streams_per_tunnel)",
                    self.config.max_streams
                ),
            ))
        } else if self.pending_opens >= self.config.max_pending_opens {
            Some((
                ErrorCode::LIMIT_EXCEEDED,
                format!(
                    "at most {} unanswered opens (limits.max_pending_opens)",
                    self.config.max_pending_opens
                ),
            ))
        } else {
            None
        };
        if let Some((code, reason)) = refuse {
            if self.control.len() >= MAX_CONTROL_BACKLOG {
                return Err(ProtocolError::WrongState {
                    kind: Kind::Open,
                    stream,
                    state: "refused while the peer reads none of our refusals (backlog full)",
                }
                .into());
            }
            self.push_stream_control(&Frame::OpenFail {
                stream,
                code,
                reason,
            });
            return Ok(());
        }
        let key = self.streams.insert(Stream::new(
            stream,
            StreamPhase::OpeningRemote,
            self.config.initial_window,
            None,
        ));
        self.ids.insert(stream, key);
        self.pending_opens += 1;
        self.events.push_back(Event::IncomingOpen {
            stream,
            request: open,
        });
        Ok(())
    }

    fn handle_open_ok(&mut self, stream: u32) -> Result<(), Error> {
        let Some(key) = self.live(Kind::OpenOk, stream)? else {
            return Ok(());
        };
        if self.streams[key].phase != StreamPhase::OpeningLocal {
            return Err(self.wrong_state(Kind::OpenOk, key));
        }
        let window = self.send_window();
        let s = &mut self.streams[key];
        s.phase = StreamPhase::Open;
        s.request = None;
        s.limit = window;
        self.schedule(key);
        self.events.push_back(Event::Opened { stream });
        Ok(())
    }

    fn handle_data(&mut self, stream: u32, payload: Bytes) -> Result<(), Error> {
        let Some(key) = self.live(Kind::Data, stream)? else {
            return Ok(());
        };
        let s = &mut self.streams[key];
        if s.phase != StreamPhase::Open || s.fin_received {
            return Err(self.wrong_state(Kind::Data, key));
        }
        let end = s.received + payload.len() as u64;
        if end > s.granted {
            return Err(ProtocolError::FlowControl {
                stream,
                offset: end,
                limit: s.granted,
            }
            .into());
        }
        if payload.is_empty() {
            return Ok(());
        }
        let held = u64::from(self.held_in) + payload.len() as u64;
        if held > u64::from(self.config.max_buffered) {
            return Err(ProtocolError::MemoryBudget {
                stream,
                held,
                limit: self.config.max_buffered,
            }
            .into());
        }
        self.held_in = held as u32;
        let s = &mut self.streams[key];
        s.received = end;
        let payload = if payload.len() < COPY_DATA_BELOW {
            Bytes::copy_from_slice(&payload)
        } else {
            payload
        };
        let was_empty = s.inbox.is_empty();
        s.inbox.push_back(payload);
        if was_empty {
            self.events.push_back(Event::Readable { stream });
        }
        Ok(())
    }

    fn handle_window(&mut self, stream: u32, increment: u32) -> Result<(), Error> {
        let Some(key) = self.live(Kind::Window, stream)? else {
            return Ok(());
        };
        let s = &mut self.streams[key];
        let acked = s.acked + u64::from(increment);
        if acked > s.sent_end() {
            return Err(ProtocolError::AckBeyondSent {
                stream,
                acked,
                sent: s.sent_end(),
            }
            .into());
        }
        s.acked = acked;
        let released = s.release_to(acked);
        s.limit += u64::from(increment);
        if s.blocked && s.fin == LocalFin::NotYet && s.limit > s.written {
            s.blocked = false;
            self.events.push_back(Event::Writable { stream });
        }
        s.check_invariants();
        self.released(released);
        self.maybe_complete(key);
        Ok(())
    }

    fn handle_pong(&mut self, opaque: u64, now: Instant) {
        if let Some(at) = self.ping_sent {
            if opaque == self.ping_counter {
                self.rtt = Some(now.saturating_duration_since(at));
                self.ping_sent = None;
            }
        }
    }

    fn handle_goaway(&mut self, code: ErrorCode, reason: String) {
        self.goaway_received = true;
        if code == ErrorCode::NO_ERROR || code == ErrorCode::GOING_AWAY {
            self.events.push_back(Event::GoAway { code, reason });
        } else {
            // An error GOAWAY is the peer's last word before it closes.
            self.end(EndReason::ClosedByPeer { code, reason }.into(), false);
        }
    }

    /// Advances timers: keepalive PINGs, death of a silent transport, expiry of a detached
    /// session. Call when [`Session::poll_timeout`] has passed; early calls are harmless.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.phase {
            Phase::Ended => {}
            Phase::Detached { since } => {
                if now >= since + self.config.resume_grace {
                    let grace = self.config.resume_grace;
                    self.end(EndReason::ResumeExpired { grace }.into(), false);
                }
            }
            _ => {
                if now < self.next_keepalive {
                    return;
                }
                if self.heard_since_tick {
                    self.missed = 0;
                } else {
                    self.missed += 1;
                }
                self.heard_since_tick = false;
                if self.missed >= self.config.keepalive_count {
                    self.events.push_back(Event::TransportDead);
                    let (interval, count) =
                        (self.config.keepalive_interval, self.config.keepalive_count);
                    if self.config.resume_grace.is_zero() {
                        self.end(EndReason::KeepaliveTimeout { interval, count }.into(), true);
                    } else {
                        self.detach(now);
                    }
                    return;
                }
                if !std::mem::take(&mut self.pinged_since_tick) {
                    self.ping_counter += 1;
                    self.ping_sent = Some(now);
                    self.ping_due = true;
                }
                self.flush_credit();
                while self.next_keepalive <= now {
                    self.next_keepalive += self.config.keepalive_interval;
                }
                self.release_idle_buffers();
            }
        }
    }

    /// The next instant [`Session::handle_timeout`] should run, if any.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Ended => None,
            Phase::Detached { since } => Some(since + self.config.resume_grace),
            _ => Some(self.next_keepalive),
        }
    }

    /// The transport failed. Streams wait up to the grace period for [`Session::reattach`];
    /// with a zero grace, or after a GOAWAY either way, the session ends.
    pub fn transport_lost(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Ended | Phase::Detached { .. }) {
            return;
        }
        // A side that sent or received GOAWAY is draining: the connection closing is the end.
        if self.config.resume_grace.is_zero()
            || self.goaway_sent().is_some()
            || self.goaway_received
        {
            self.end(EndReason::TransportLost.into(), false);
        } else {
            self.detach(now);
        }
    }

    fn detach(&mut self, now: Instant) {
        self.phase = Phase::Detached { since: now };
        // Everything queued is regenerated from stream state by RESUME.
        self.control.clear();
        if let Some(cold) = &mut self.cold {
            cold.deferred.clear();
        }
        self.pending_pong = None;
        self.ping_due = false;
        self.ping_sent = None;
    }

    /// A new transport is up for a detached session: queues HELLO (flag RESUMING); RESUME
    /// follows once the peer's HELLO shows it still holds this session.
    pub fn reattach(&mut self, now: Instant) -> Result<(), Error> {
        match self.phase {
            Phase::Detached { .. } => {}
            Phase::Ended => {
                return Err(self.ended().cloned().unwrap_or(Error::Ended(
                    EndReason::ClosedLocally {
                        code: ErrorCode::NO_ERROR,
                        reason: "ended".into(),
                    },
                )));
            }
            _ => {
                return Err(Error::Stream {
                    stream: 0,
                    reason: StreamError::Invalid(
                        "reattach on a session that is not detached".into(),
                    ),
                });
            }
        }
        self.phase = Phase::Handshake { resuming: true };
        self.control.clear();
        self.next_keepalive = now + self.config.keepalive_interval;
        self.missed = 0;
        self.heard_since_tick = false;
        self.pinged_since_tick = false;
        self.queue_hello(true);
        if let Some(announce) = self.cold.as_ref().and_then(|c| c.last_announce.clone()) {
            self.control.push_back(announce);
        }
        if let Some((code, reason)) = self.goaway_sent().cloned() {
            self.push_control(&Frame::GoAway { code, reason });
        }
        Ok(())
    }

    // ---- application calls --------------------------------------------------------------

    /// Opens a stream; the answer comes as `Opened` or `OpenFailed`.
    pub fn open(&mut self, request: Open) -> Result<u32, Error> {
        if self.phase == Phase::Ended {
            return Err(self.stream_err(0, StreamError::SessionEnded));
        }
        if self.goaway_sent().is_some() || self.goaway_received {
            return Err(self.stream_err(0, StreamError::GoingAway));
        }
        if self.streams.len() >= codec::MAX_RESUME_STREAMS {
            let max = codec::MAX_RESUME_STREAMS as u32;
            return Err(self.stream_err(0, StreamError::TooManyStreams(max)));
        }
        if let Some(peer) = self.peer {
            if self.streams.len() >= peer.max_streams as usize {
                return Err(self.stream_err(0, StreamError::TooManyStreams(peer.max_streams)));
            }
        }
        codec::validate_open(&request).map_err(|e| self.stream_err(0, StreamError::Invalid(e)))?;
        let id = self.next_local_id;
        if id > MAX_STREAM_ID {
            return Err(self.stream_err(
                0,
                StreamError::Invalid("stream ids exhausted; reconnect the tunnel".into()),
            ));
        }
        self.next_local_id += 2;
        // While a reconnect is under way the OPEN is sent once the peer's RESUME shows it
        // has not seen this id.
        let open_sent = self.may_send_stream_frames();
        if open_sent {
            self.push_control(&Frame::Open {
                stream: id,
                open: request.clone(),
            });
        }
        let key = self.streams.insert(Stream::new(
            id,
            StreamPhase::OpeningLocal,
            self.config.initial_window,
            Some(request),
        ));
        self.streams[key].open_sent = open_sent;
        self.ids.insert(id, key);
        Ok(id)
    }

    /// Accepts a stream announced by `IncomingOpen`.
    pub fn accept(&mut self, stream: u32) -> Result<(), Error> {
        let key = self.key(stream)?;
        if self.streams[key].phase != StreamPhase::OpeningRemote {
            return Err(self.stream_err(
                stream,
                StreamError::Invalid("stream is not waiting to be accepted".into()),
            ));
        }
        let window = self.send_window();
        let s = &mut self.streams[key];
        s.phase = StreamPhase::Open;
        s.limit = window;
        self.pending_opens -= 1;
        self.push_stream_control(&Frame::OpenOk { stream });
        Ok(())
    }

    /// Refuses a stream announced by `IncomingOpen`; the reason reaches the peer's logs.
    pub fn reject(&mut self, stream: u32, code: ErrorCode, reason: &str) -> Result<(), Error> {
        let key = self.key(stream)?;
        if self.streams[key].phase != StreamPhase::OpeningRemote {
            return Err(self.stream_err(
                stream,
                StreamError::Invalid("stream is not waiting to be accepted".into()),
            ));
        }
        self.pending_opens -= 1;
        self.remove(key);
        let reason = clip_reason(reason);
        self.push_stream_control(&Frame::OpenFail {
            stream,
            code,
            reason,
        });
        Ok(())
    }

    /// Queues bytes on a stream, up to its credit; returns how many were taken (zero-copy:
    /// the `Bytes` is kept, sliced, not copied). When it returns less than offered the
    /// stream is blocked until a `Writable` event.
    pub fn send(&mut self, stream: u32, data: Bytes) -> Result<usize, Error> {
        let key = self.key(stream)?;
        let s = &mut self.streams[key];
        if s.phase != StreamPhase::Open {
            return Err(self.stream_err(stream, StreamError::NotOpen));
        }
        if s.fin != LocalFin::NotYet {
            return Err(self.stream_err(stream, StreamError::Finished));
        }
        let credit = s.limit.saturating_sub(s.written);
        let room = u64::from(self.config.max_buffered).saturating_sub(u64::from(self.held_out));
        let capacity = credit.min(room) as usize;
        let n = capacity.min(data.len());
        if n == capacity {
            // Credit or budget used up: say so when it comes back. A send the budget cuts
            // short fills it exactly, which is how `released` knows to wake streams.
            s.blocked = true;
        }
        if n > 0 {
            s.unsent.push_back(data.slice(..n));
            s.written += n as u64;
            self.held_out += n as u32; // within the budget: `n` ≤ `room`
            self.schedule(key);
        }
        self.check_budget();
        Ok(n)
    }

    /// Half-closes the stream: FIN goes out after every byte already queued.
    pub fn finish(&mut self, stream: u32) -> Result<(), Error> {
        let key = self.key(stream)?;
        let s = &mut self.streams[key];
        if s.phase != StreamPhase::Open {
            return Err(self.stream_err(stream, StreamError::NotOpen));
        }
        if s.fin != LocalFin::NotYet {
            return Ok(());
        }
        s.fin = LocalFin::Pending;
        self.schedule(key);
        Ok(())
    }

    /// Aborts a stream: queued bytes are dropped and the peer gets RESET.
    pub fn reset(&mut self, stream: u32, code: ErrorCode, reason: &str) -> Result<(), Error> {
        let key = self.key(stream)?;
        let s = &self.streams[key];
        let peer_knows = s.phase != StreamPhase::OpeningLocal || s.open_sent;
        if s.phase == StreamPhase::OpeningRemote {
            self.pending_opens -= 1;
        }
        self.remove(key);
        if !peer_knows {
            return Ok(());
        }
        let reason = clip_reason(reason);
        self.push_stream_control(&Frame::Reset {
            stream,
            code,
            reason,
        });
        Ok(())
    }

    /// Takes the next bytes received on a stream. Consuming returns credit to the peer.
    pub fn recv(&mut self, stream: u32) -> Result<Received, Error> {
        let key = self.key(stream)?;
        // The peer's credit is the smaller of the two windows (it caps ours at its own, as
        // we do), so WINDOWs go out at a quarter of that: a quarter of our own, larger one
        // would leave the peer waiting for the keepalive's flush.
        let window = match self.peer {
            Some(p) => self.config.initial_window.min(p.initial_window),
            None => self.config.initial_window,
        };
        let threshold = u64::from(window / 4).max(1);
        let s = &mut self.streams[key];
        let Some(chunk) = s.inbox.pop_front() else {
            if s.fin_received && s.phase == StreamPhase::Open {
                // Reading the FIN consumes one unit, acknowledged at once (with any bytes
                // read before the FIN came) so that the peer can forget the stream.
                if !s.fin_consumed {
                    s.fin_consumed = true;
                    s.consumed += 1;
                    s.unreported += 1;
                }
                if s.unreported > 0 {
                    self.report_credit(key);
                }
                self.maybe_complete(key);
                return Ok(Received::Finished);
            }
            return Ok(Received::Nothing);
        };
        s.consumed += chunk.len() as u64;
        s.unreported += chunk.len() as u64;
        self.held_in -= chunk.len() as u32;
        let s = &mut self.streams[key];
        // Batch WINDOWs, but never leave the last bytes of a finished stream unacknowledged.
        let drained = s.fin_received && s.consumed == s.received;
        if s.unreported >= threshold || drained {
            self.report_credit(key);
        }
        Ok(Received::Data(chunk))
    }

    /// Sends the peer our inventory (it replaces the last one, and is sent again after a
    /// reconnect).
    pub fn announce(&mut self, announce: &Announce) -> Result<(), Error> {
        codec::validate_announce(announce, self.limits.max_announce)
            .map_err(|e| self.stream_err(0, StreamError::Invalid(e)))?;
        let transmit = Transmit::control(&Frame::Announce(announce.clone()));
        if matches!(
            self.phase,
            Phase::Handshake { .. } | Phase::AwaitResume | Phase::Open
        ) {
            self.control.push_back(transmit.clone());
        }
        self.cold().last_announce = Some(transmit);
        Ok(())
    }

    /// Starts draining: the peer opens no new streams here, existing ones go on.
    pub fn goaway(&mut self, reason: &str) {
        let reason = clip_reason(reason);
        self.cold().goaway_sent = Some((ErrorCode::GOING_AWAY, reason.clone()));
        // While detached, `reattach` sends it after the new HELLO.
        if matches!(
            self.phase,
            Phase::Handshake { .. } | Phase::AwaitResume | Phase::Open
        ) {
            self.push_control(&Frame::GoAway {
                code: ErrorCode::GOING_AWAY,
                reason,
            });
        }
    }

    /// Ends the session now: every stream is reset and the peer gets GOAWAY with `code`.
    pub fn close(&mut self, code: ErrorCode, reason: &str) {
        let reason = clip_reason(reason);
        self.end(EndReason::ClosedLocally { code, reason }.into(), true);
    }

    // ---- outputs ------------------------------------------------------------------------

    /// The next frame to write: control frames first, then one DATA (or FIN) frame per
    /// stream in turn, so a bulk stream cannot starve an interactive one.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if let Some(t) = self.control.pop_front() {
            return Some(t);
        }
        if let Some(opaque) = self.pending_pong.take() {
            if self.phase != Phase::Ended {
                return Some(Transmit::control(&Frame::Pong { opaque }));
            }
        }
        if std::mem::take(&mut self.ping_due) && self.phase != Phase::Ended {
            return Some(Transmit::control(&Frame::Ping {
                opaque: self.ping_counter,
            }));
        }
        if !self.may_send_stream_frames() {
            return None;
        }
        let max_frame = self
            .peer
            .map(|p| p.max_frame as usize)
            .unwrap_or(DEFAULT_MAX_FRAME as usize);
        while let Some((key, id)) = self.sendable.pop_front() {
            let Some(s) = self.streams.get_mut(key).filter(|s| s.id == id) else {
                continue;
            };
            s.queued = false;
            if !s.has_output() {
                continue;
            }
            let transmit = if let Some(front) = s.unsent.front_mut() {
                let room = s.limit.saturating_sub(s.next) as usize;
                let n = front.len().min(max_frame).min(room);
                if n == 0 {
                    continue;
                }
                let chunk = if n == front.len() {
                    s.unsent.pop_front().unwrap_or_default()
                } else {
                    front.split_to(n)
                };
                s.next += n as u64;
                s.unacked.push_back(chunk.clone());
                Transmit::data(id, chunk)
            } else {
                s.fin = LocalFin::Sent;
                Transmit::control(&Frame::Fin { stream: id })
            };
            s.check_invariants();
            self.schedule(key);
            self.maybe_complete(key);
            return Some(transmit);
        }
        None
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Whether [`Session::poll_transmit`] has something now.
    pub fn has_transmit(&self) -> bool {
        !self.control.is_empty()
            || self.pending_pong.is_some()
            || (self.ping_due && self.phase != Phase::Ended)
            || (self.may_send_stream_frames() && !self.sendable.is_empty())
    }

    // ---- internals ----------------------------------------------------------------------

    fn cold(&mut self) -> &mut Cold {
        self.cold.get_or_insert_with(Box::default)
    }

    fn ended(&self) -> Option<&Error> {
        self.cold.as_ref()?.ended.as_ref()
    }

    fn goaway_sent(&self) -> Option<&(ErrorCode, String)> {
        self.cold.as_ref()?.goaway_sent.as_ref()
    }

    /// Gives back the buffers of queues that are empty now. Queues keep their capacity when
    /// drained; a tunnel that had a burst of events, control frames or streams (a connect,
    /// an ssh session) would otherwise hold them while idle, for hours: 800 bytes for four
    /// events, 1.5 KiB for four streams. Called on each keepalive tick, not per frame, so a
    /// busy tunnel does not free and reallocate them on every turn.
    fn release_idle_buffers(&mut self) {
        if self.control.is_empty() {
            self.control = VecDeque::new();
        }
        if self.events.is_empty() {
            self.events = VecDeque::new();
        }
        if self.sendable.is_empty() {
            self.sendable = VecDeque::new();
        }
        if self.streams.is_empty() {
            self.streams = Slab::new();
        }
        if self.ids.is_empty() {
            // A B-tree keeps its emptied root node.
            self.ids = BTreeMap::new();
        }
        if let Some(cold) = &mut self.cold {
            if cold.deferred.is_empty() {
                cold.deferred = Vec::new();
            }
        }
    }

    fn queue_hello(&mut self, resuming: bool) {
        let hello = Hello {
            version_min: PROTOCOL_VERSION,
            version_max: PROTOCOL_VERSION,
            role: self.config.role,
            capabilities: 0,
            initial_window: self.config.initial_window,
            max_frame: self.limits.max_data as u32,
            max_streams: self.config.max_streams,
            session_id: self.local_id,
            resuming,
        };
        self.push_control(&Frame::Hello(hello));
    }

    fn may_send_stream_frames(&self) -> bool {
        matches!(
            self.phase,
            Phase::Open | Phase::Handshake { resuming: false }
        )
    }

    fn push_control(&mut self, frame: &Frame) {
        self.control.push_back(Transmit::control(frame));
    }

    /// Stream control frames (OPEN_OK, OPEN_FAIL, WINDOW, RESET) made before our RESUME is
    /// built are dropped: RESUME carries their effect (acceptance, credit, which streams
    /// exist). Those made after it, while we wait for the peer's RESUME, wait with the DATA.
    /// Returns whether the frame's effect will reach the peer.
    fn push_stream_control(&mut self, frame: &Frame) -> bool {
        match self.phase {
            Phase::Open | Phase::Handshake { resuming: false } => self.push_control(frame),
            Phase::AwaitResume => self.cold().deferred.push(Transmit::control(frame)),
            Phase::Detached { .. } | Phase::Handshake { resuming: true } | Phase::Ended => {
                return false;
            }
        }
        true
    }

    /// The credit each stream starts with toward the peer (its window, capped at ours).
    fn send_window(&self) -> u64 {
        u64::from(self.peer.map(|p| p.send_window).unwrap_or(0))
    }

    /// The window the peer announced, from which its RESUME counts its credit limits.
    fn peer_window(&self) -> u64 {
        u64::from(self.peer.map(|p| p.initial_window).unwrap_or(0))
    }

    fn is_local_id(&self, id: u32) -> bool {
        (id % 2 == 1) == self.config.dialer
    }

    /// The slab key of a live stream; `None` for a stream that existed and is gone (late
    /// frames for it are dropped); an error for one that never existed.
    fn live(&self, kind: Kind, stream: u32) -> Result<Option<usize>, Error> {
        if let Some(&key) = self.ids.get(&stream) {
            return Ok(Some(key));
        }
        let seen = if self.is_local_id(stream) {
            stream < self.next_local_id
        } else {
            stream <= self.highest_peer_id
        };
        if seen {
            Ok(None)
        } else {
            Err(ProtocolError::UnknownStream { kind, stream }.into())
        }
    }

    fn key(&self, stream: u32) -> Result<usize, Error> {
        self.ids.get(&stream).copied().ok_or(Error::Stream {
            stream,
            reason: StreamError::Unknown,
        })
    }

    fn stream_err(&self, stream: u32, reason: StreamError) -> Error {
        Error::Stream { stream, reason }
    }

    fn wrong_state(&self, kind: Kind, key: usize) -> Error {
        let s = &self.streams[key];
        let state = match (s.phase, s.fin_received) {
            (StreamPhase::OpeningLocal, _) => "waiting for OPEN_OK",
            (StreamPhase::OpeningRemote, _) => "not yet accepted",
            (StreamPhase::Open, true) => "finished by the peer",
            (StreamPhase::Open, false) => "open",
        };
        ProtocolError::WrongState {
            kind,
            stream: s.id,
            state,
        }
        .into()
    }

    fn schedule(&mut self, key: usize) {
        let s = &mut self.streams[key];
        if !s.queued && s.has_output() {
            s.queued = true;
            self.sendable.push_back((key, s.id));
        }
    }

    fn report_credit(&mut self, key: usize) {
        if matches!(
            self.phase,
            Phase::Detached { .. } | Phase::Handshake { resuming: true }
        ) {
            return; // the RESUME we are about to build carries the credit
        }
        let s = &mut self.streams[key];
        let mut owed = s.unreported;
        s.unreported = 0;
        s.granted += owed;
        let id = s.id;
        while owed > 0 {
            let increment = owed.min(u64::from(u32::MAX)) as u32;
            owed -= u64::from(increment);
            self.push_stream_control(&Frame::Window {
                stream: id,
                increment,
            });
        }
    }

    /// Reports consumed bytes on every stream; on each keepalive tick so that a sender is
    /// never left holding acknowledged bytes for long.
    fn flush_credit(&mut self) {
        let owed: Vec<usize> = self
            .streams
            .iter()
            .filter(|(_, s)| s.unreported > 0)
            .map(|(k, _)| k)
            .collect();
        for key in owed {
            self.report_credit(key);
        }
    }

    fn maybe_complete(&mut self, key: usize) {
        if self.streams.get(key).is_some_and(Stream::is_complete) {
            let id = self.streams[key].id;
            self.remove(key);
            self.events.push_back(Event::Closed { stream: id });
        }
    }

    fn remove(&mut self, key: usize) {
        let s = self.streams.remove(key);
        self.ids.remove(&s.id);
        self.held_in -= s.held_in() as u32;
        self.released(s.held_out());
    }

    /// How many more bytes `send` may queue across streams.
    fn budget_room(&self) -> u64 {
        u64::from(self.config.max_buffered).saturating_sub(u64::from(self.held_out))
    }

    /// Outbound bytes were let go (acknowledged, or their stream is gone): streams that
    /// the budget held back may go on.
    fn released(&mut self, bytes: u64) {
        let was_full = self.held_out >= self.config.max_buffered;
        self.held_out -= bytes as u32;
        if bytes == 0 || !was_full {
            return;
        }
        for (_, s) in self.streams.iter_mut() {
            if s.blocked && s.fin == LocalFin::NotYet && s.limit > s.written {
                s.blocked = false;
                self.events.push_back(Event::Writable { stream: s.id });
            }
        }
    }

    /// Debug builds: the budget counters agree with the streams.
    fn check_budget(&self) {
        if cfg!(debug_assertions) {
            let (held_in, held_out) = self
                .streams
                .iter()
                .fold((0, 0), |(i, o), (_, s)| (i + s.held_in(), o + s.held_out()));
            debug_assert_eq!(
                (u64::from(self.held_in), u64::from(self.held_out)),
                (held_in, held_out)
            );
            debug_assert!(self.held_in <= self.config.max_buffered);
            debug_assert!(self.held_out <= self.config.max_buffered);
        }
    }

    fn reset_all(&mut self, code: ErrorCode, reason: &str) {
        let ids: Vec<u32> = self.streams.iter().map(|(_, s)| s.id).collect();
        self.streams.clear();
        self.ids.clear();
        self.sendable.clear();
        self.held_in = 0;
        self.held_out = 0;
        self.pending_opens = 0;
        for stream in ids {
            self.events.push_back(Event::Reset {
                stream,
                code,
                reason: reason.to_string(),
            });
        }
    }

    fn fail(&mut self, err: Error) -> Error {
        self.end(err.clone(), true);
        err
    }

    fn end(&mut self, err: Error, tell_peer: bool) {
        if self.phase == Phase::Ended {
            return;
        }
        let code = err.code();
        // The peer prints its own "peer closed the tunnel: CODE:" before our reason, so a
        // close of ours sends the caller's reason alone, not our local account of it.
        let reason = match &err {
            Error::Ended(EndReason::ClosedLocally { reason, .. }) => reason.clone(),
            other => clip_reason(&other.to_string()),
        };
        self.control.clear();
        if tell_peer && !self.is_detached() {
            self.push_control(&Frame::GoAway {
                code,
                reason: reason.clone(),
            });
        }
        self.phase = Phase::Ended;
        self.reset_all(code, &reason);
        self.cold().ended = Some(err.clone());
        self.events.push_back(Event::Ended(err));
    }
}

fn clip_reason(reason: &str) -> String {
    let mut end = reason.len().min(MAX_REASON_LEN);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end]
        .chars()
        .map(|c| if c.is_control() && c != '\t' { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test: a failed unwrap is a failed test

    use super::*;

    /// Moves every queued frame from `from` to `to`; whether any moved.
    fn deliver(from: &mut Session, to: &mut Session, now: Instant) -> bool {
        let mut buf = BytesMut::new();
        while let Some(t) = from.poll_transmit() {
            t.write_to(&mut buf);
        }
        let moved = !buf.is_empty();
        to.handle_input(&mut buf, now).unwrap();
        moved
    }

    fn settle(a: &mut Session, b: &mut Session, now: Instant) {
        while deliver(a, b, now) | deliver(b, a, now) {}
        while a.poll_event().is_some() {}
        while b.poll_event().is_some() {}
    }

    #[test]
    fn an_idle_session_gives_its_queue_buffers_back_on_the_keepalive_tick() {
        let now = Instant::now();
        let config = |role, dialer| SessionConfig::new(role, dialer);
        let mut agent = Session::new(config(Role::Agent, true), [1; 16], now);
        let mut proxy = Session::new(config(Role::Proxy, false), [2; 16], now);
        settle(&mut agent, &mut proxy, now);
        // A stream that comes and goes leaves capacity behind in every queue and map.
        let request = Open {
            node: "node-a".into(),
            service: "ssh".into(),
            ..Open::default()
        };
        let id = agent.open(request).unwrap();
        settle(&mut agent, &mut proxy, now);
        proxy.accept(id).unwrap();
        settle(&mut agent, &mut proxy, now);
        agent.send(id, Bytes::from_static(b"hello")).unwrap();
        agent.finish(id).unwrap();
        settle(&mut agent, &mut proxy, now);
        proxy.finish(id).unwrap();
        while proxy.recv(id).unwrap() != Received::Finished {}
        settle(&mut agent, &mut proxy, now);
        while agent.recv(id).unwrap() != Received::Finished {}
        settle(&mut agent, &mut proxy, now);
        assert_eq!((agent.stream_count(), proxy.stream_count()), (0, 0));
        assert!(proxy.streams.capacity() > 0 && proxy.events.capacity() > 0);

        let tick = now + DEFAULT_KEEPALIVE_INTERVAL;
        proxy.handle_timeout(tick);
        agent.handle_timeout(tick);
        settle(&mut agent, &mut proxy, tick);
        for s in [&proxy, &agent] {
            assert_eq!(s.streams.capacity(), 0, "stream slab kept");
            assert_eq!(s.events.capacity(), 0, "event queue kept");
            assert_eq!(s.control.capacity(), 0, "control queue kept");
            assert_eq!(s.sendable.capacity(), 0, "send queue kept");
            assert!(s.ids.is_empty());
        }
        // The keepalive went out without a queue: the tick's PING was answered.
        assert!(agent.rtt().is_some() || proxy.rtt().is_some());
    }

    #[test]
    fn a_peer_that_may_not_announce_is_refused_from_the_header() {
        let now = Instant::now();
        let mut client = Session::new(SessionConfig::new(Role::Client, true), [1; 16], now);
        let mut config = SessionConfig::new(Role::Proxy, false);
        config.peer_may_announce = false;
        let mut proxy = Session::new(config, [2; 16], now);
        settle(&mut client, &mut proxy, now);
        // Only the header of a 1 MiB ANNOUNCE has arrived: that is enough to refuse it.
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[0x10, 0x00, 0x00, Kind::Announce as u8, 0, 0, 0, 0, 0]);
        let err = proxy.handle_input(&mut buf, now).unwrap_err();
        assert_eq!(err, Error::Protocol(ProtocolError::AnnounceNotAccepted));
        assert_eq!(err.code(), ErrorCode::PROTOCOL);
        assert!(proxy.is_ended());
        // The default still takes an agent's inventory.
        let mut agent = Session::new(SessionConfig::new(Role::Agent, true), [3; 16], now);
        let mut proxy = Session::new(SessionConfig::new(Role::Proxy, false), [4; 16], now);
        settle(&mut agent, &mut proxy, now);
        agent.announce(&Announce::default()).unwrap();
        deliver(&mut agent, &mut proxy, now);
        assert!(!proxy.is_ended());
    }

    /// The session is inline in the shared state of every tunnel (tens of thousands per
    /// proxy): growing it is a decision, not an accident (docs/benchmarks.md, per-tunnel
    /// memory).
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn the_session_struct_stays_within_its_budget() {
        let size = std::mem::size_of::<Session>();
        assert!(size <= 416, "Session is {size} bytes, budget 416");
    }
}
