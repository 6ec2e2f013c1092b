//! Two multiplexer sessions joined by an in-memory pipe with a fake clock, delay, black
//! holes and cuts: flow control, keepalive, GOAWAY, resets, caps and resumption.

#![allow(clippy::unwrap_used)] // test harness: a failed unwrap is a failed test

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use frame::{
    Announce, EndReason, Error, ErrorCode, Event, Frame, Hello, NodeInfo, Open, ProtocolError,
    Received, Role, Session, SessionConfig, StreamError,
};

const TICK: Duration = Duration::from_millis(1);

fn config(role: Role, dialer: bool) -> SessionConfig {
    let mut c = SessionConfig::new(role, dialer);
    c.initial_window = 64 * 1024;
    c.max_frame = 4096;
    c.keepalive_interval = Duration::from_secs(1);
    c.keepalive_count = 3;
    c.resume_grace = Duration::from_secs(5);
    c
}

fn request(node: &str) -> Open {
    Open {
        session_id: [7; 16],
        node: node.into(),
        service: "ssh".into(),
        user: "alice".into(),
        ..Open::default()
    }
}

/// Deterministic pseudo-random numbers (xorshift), so every failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, len: usize) -> Bytes {
        (0..len)
            .map(|_| self.next() as u8)
            .collect::<Vec<u8>>()
            .into()
    }
}

/// One side's application: it accepts opens, reads every stream it is not told to ignore,
/// and pushes queued bytes whenever there is credit.
#[derive(Default)]
struct App {
    auto_accept: bool,
    events: Vec<Event>,
    streams: BTreeSet<u32>,
    received: BTreeMap<u32, Vec<u8>>,
    finished: BTreeSet<u32>,
    outbox: BTreeMap<u32, VecDeque<Bytes>>,
    finish_when_sent: BTreeSet<u32>,
    paused: BTreeSet<u32>,
}

struct Side {
    session: Session,
    app: App,
    /// Bytes read from the transport that do not form a whole frame yet.
    input: BytesMut,
    error: Option<Error>,
}

impl Side {
    fn new(config: SessionConfig, id: u8, now: Instant) -> Self {
        Side {
            session: Session::new(config, [id; 16], now),
            app: App {
                auto_accept: true,
                ..App::default()
            },
            input: BytesMut::new(),
            error: None,
        }
    }

    /// Drains events and lets the application react; returns whether anything happened.
    fn react(&mut self) -> bool {
        let mut busy = false;
        while let Some(event) = self.session.poll_event() {
            busy = true;
            match &event {
                Event::IncomingOpen { stream, .. } if self.app.auto_accept => {
                    self.session.accept(*stream).unwrap();
                    self.app.streams.insert(*stream);
                }
                Event::Opened { stream } => {
                    self.app.streams.insert(*stream);
                }
                Event::OpenFailed { stream, .. }
                | Event::Reset { stream, .. }
                | Event::Closed { stream } => {
                    self.app.streams.remove(stream);
                }
                _ => {}
            }
            self.app.events.push(event);
        }
        for stream in self.app.streams.clone() {
            if self.session.stream_bytes(stream).is_none() {
                continue;
            }
            if !self.app.paused.contains(&stream) {
                loop {
                    match self.session.recv(stream).unwrap() {
                        Received::Data(bytes) => {
                            busy = true;
                            self.app
                                .received
                                .entry(stream)
                                .or_default()
                                .extend_from_slice(&bytes)
                        }
                        Received::Finished => {
                            busy |= self.app.finished.insert(stream);
                            break;
                        }
                        Received::Nothing => break,
                    }
                }
            }
            if self.session.stream_bytes(stream).is_none() {
                continue;
            }
            if let Some(queue) = self.app.outbox.get_mut(&stream) {
                while let Some(chunk) = queue.front_mut() {
                    let capacity = self.session.send_capacity(stream);
                    if capacity == 0 {
                        break;
                    }
                    let taken = self.session.send(stream, chunk.clone()).unwrap();
                    busy |= taken > 0;
                    let _ = chunk.split_to(taken);
                    if chunk.is_empty() {
                        queue.pop_front();
                    }
                }
                if queue.is_empty() && self.app.finish_when_sent.remove(&stream) {
                    self.session.finish(stream).unwrap();
                    busy = true;
                }
            }
        }
        busy
    }

    fn queue(&mut self, stream: u32, data: Bytes, chunk: usize, finish: bool) {
        let queue = self.app.outbox.entry(stream).or_default();
        let mut data = data;
        while !data.is_empty() {
            queue.push_back(data.split_to(chunk.min(data.len())));
        }
        if finish {
            self.app.finish_when_sent.insert(stream);
        }
    }

    fn saw(&self, pred: impl Fn(&Event) -> bool) -> bool {
        self.app.events.iter().any(pred)
    }
}

/// Two sides and the pipe between them.
struct Pair {
    now: Instant,
    a: Side,
    b: Side,
    a_to_b: VecDeque<(Instant, Bytes)>,
    b_to_a: VecDeque<(Instant, Bytes)>,
    delay: Duration,
    /// While set, everything written is silently lost (a dead link without FIN).
    black_hole: bool,
    /// While set, the transport is down: nothing is written or delivered.
    down: bool,
    /// Bytes written since the last cut, each way; a cut can be placed at a byte count.
    written: [u64; 2],
    /// Bytes lost in flight by cuts, so a test can show its cuts did lose something.
    lost: u64,
}

impl Pair {
    fn new(config_a: SessionConfig, config_b: SessionConfig) -> Self {
        let now = Instant::now();
        Pair {
            now,
            a: Side::new(config_a, 0xA, now),
            b: Side::new(config_b, 0xB, now),
            a_to_b: VecDeque::new(),
            b_to_a: VecDeque::new(),
            delay: Duration::ZERO,
            black_hole: false,
            down: false,
            written: [0, 0],
            lost: 0,
        }
    }

    fn standard() -> Self {
        Pair::new(config(Role::Agent, true), config(Role::Proxy, false))
    }

    /// One round: reactions, transmissions, deliveries, timers, one tick of the clock.
    fn step(&mut self) -> bool {
        let mut busy = self.a.react() | self.b.react();
        if !self.down {
            busy |= Self::transmit(
                &mut self.a,
                &mut self.a_to_b,
                self.now + self.delay,
                self.black_hole,
                &mut self.written[0],
            );
            busy |= Self::transmit(
                &mut self.b,
                &mut self.b_to_a,
                self.now + self.delay,
                self.black_hole,
                &mut self.written[1],
            );
            busy |= Self::deliver(&mut self.a_to_b, &mut self.b, self.now);
            busy |= Self::deliver(&mut self.b_to_a, &mut self.a, self.now);
        }
        for side in [&mut self.a, &mut self.b] {
            if side.session.poll_timeout().is_some_and(|t| t <= self.now) {
                side.session.handle_timeout(self.now);
                busy = true;
            }
        }
        if !busy {
            self.now += TICK;
        }
        busy || !self.a_to_b.is_empty() || !self.b_to_a.is_empty()
    }

    fn transmit(
        side: &mut Side,
        pipe: &mut VecDeque<(Instant, Bytes)>,
        at: Instant,
        lost: bool,
        written: &mut u64,
    ) -> bool {
        let mut busy = false;
        while let Some(t) = side.session.poll_transmit() {
            busy = true;
            let mut buf = BytesMut::new();
            t.write_to(&mut buf);
            *written += buf.len() as u64;
            if !lost {
                pipe.push_back((at, buf.freeze()));
            }
        }
        busy
    }

    fn deliver(pipe: &mut VecDeque<(Instant, Bytes)>, to: &mut Side, now: Instant) -> bool {
        let mut busy = false;
        while pipe.front().is_some_and(|(at, _)| *at <= now) {
            let (_, bytes) = pipe.pop_front().unwrap();
            busy = true;
            to.input.extend_from_slice(&bytes);
            if to.error.is_none() {
                if let Err(e) = to.session.handle_input(&mut to.input, now) {
                    to.error = Some(e);
                }
            }
        }
        busy
    }

    /// Runs until nothing moves (or `limit` of fake time passes).
    fn settle(&mut self, limit: Duration) {
        let end = self.now + limit;
        let mut idle_ticks = 0;
        while self.now < end {
            if self.step() {
                idle_ticks = 0;
            } else {
                idle_ticks += 1;
                if idle_ticks > 5 + self.delay.as_millis() as usize {
                    return;
                }
            }
        }
    }

    /// Advances fake time by `d`, stepping as it goes.
    fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            if self.step() {
                continue;
            }
        }
    }

    /// The link breaks: bytes in flight and half-read frames are lost; both sides notice.
    fn cut(&mut self) {
        self.lost += self
            .a_to_b
            .iter()
            .chain(&self.b_to_a)
            .map(|(_, b)| b.len() as u64)
            .sum::<u64>();
        self.a_to_b.clear();
        self.b_to_a.clear();
        self.a.input.clear();
        self.b.input.clear();
        self.a.session.transport_lost(self.now);
        self.b.session.transport_lost(self.now);
        self.down = true;
        self.written = [0, 0];
    }

    /// A new transport: both sides reattach (in the product the acceptor picks the detached
    /// session by the session id in the dialer's HELLO).
    fn reconnect(&mut self) {
        self.down = false;
        self.a.session.reattach(self.now).unwrap();
        self.b.session.reattach(self.now).unwrap();
    }
}

fn open_stream(pair: &mut Pair, node: &str) -> u32 {
    let id = pair.a.session.open(request(node)).unwrap();
    pair.settle(Duration::from_secs(1));
    assert!(
        pair.a.saw(|e| *e == Event::Opened { stream: id }),
        "stream {id} did not open"
    );
    id
}

#[test]
fn handshake_then_transfer_both_ways_and_close_cleanly() {
    let mut pair = Pair::standard();
    pair.settle(Duration::from_secs(1));
    assert!(pair.a.saw(|e| *e == Event::Connected { role: Role::Proxy }));
    assert!(pair.b.saw(|e| *e == Event::Connected { role: Role::Agent }));

    let id = pair.a.session.open(request("node-r1")).unwrap();
    assert_eq!(id % 2, 1, "the dialer opens odd ids");
    pair.settle(Duration::from_secs(1));
    let incoming = pair.b.app.events.iter().find_map(|e| match e {
        Event::IncomingOpen { stream, request } => Some((*stream, request.clone())),
        _ => None,
    });
    assert_eq!(incoming, Some((id, request("node-r1"))));

    let mut rng = Rng(1);
    let up = rng.bytes(1_500_000);
    let down = rng.bytes(700_000);
    pair.a.queue(id, up.clone(), 10_000, true);
    pair.b.queue(id, down.clone(), 3_000, true);
    pair.settle(Duration::from_secs(30));

    assert_eq!(pair.b.app.received[&id], up);
    assert_eq!(pair.a.app.received[&id], down);
    assert!(pair.a.saw(|e| *e == Event::Closed { stream: id }));
    assert!(pair.b.saw(|e| *e == Event::Closed { stream: id }));
    assert_eq!(pair.a.session.stream_count(), 0);
    assert_eq!(pair.b.session.stream_count(), 0);
}

#[test]
fn data_frames_respect_the_peers_max_frame() {
    let mut pair = Pair::standard();
    let id = open_stream(&mut pair, "node-a");
    pair.a
        .session
        .send(id, Bytes::from(vec![1u8; 10_000]))
        .unwrap();
    let mut sizes = vec![];
    while let Some(t) = pair.a.session.poll_transmit() {
        if t.header()[3] == 0x06 {
            sizes.push(t.payload().len());
        }
    }
    assert_eq!(sizes, vec![4096, 4096, 1808]);
}

#[test]
fn a_stalled_stream_does_not_stall_its_neighbour() {
    let mut pair = Pair::standard();
    let stalled = open_stream(&mut pair, "node-a");
    let flowing = open_stream(&mut pair, "node-b");
    pair.b.app.paused.insert(stalled);
    let mut rng = Rng(2);
    let data_stalled = rng.bytes(1_000_000);
    let data_flowing = rng.bytes(1_000_000);
    pair.a.queue(stalled, data_stalled.clone(), 8192, true);
    pair.a.queue(flowing, data_flowing.clone(), 8192, true);
    pair.settle(Duration::from_secs(30));

    assert_eq!(
        pair.b.app.received[&flowing], data_flowing,
        "the neighbour got everything"
    );
    assert!(!pair.b.app.received.contains_key(&stalled));
    let window = 64 * 1024;
    let (sent, received) = pair.b.session.stream_bytes(stalled).unwrap();
    assert_eq!(
        received, window,
        "the stalled stream holds exactly one window at the receiver"
    );
    assert_eq!(sent, 0);
    assert_eq!(pair.a.session.send_capacity(stalled), 0);
    let (written, _) = pair.a.session.stream_bytes(stalled).unwrap();
    assert_eq!(written, window, "the sender holds at most one window");

    pair.b.app.paused.remove(&stalled);
    pair.settle(Duration::from_secs(30));
    assert_eq!(pair.b.app.received[&stalled], data_stalled);
    assert!(pair.a.saw(|e| *e == Event::Writable { stream: stalled }));
}

#[test]
fn round_robin_interleaves_streams_frame_by_frame() {
    let mut pair = Pair::standard();
    let s1 = open_stream(&mut pair, "node-a");
    let s2 = open_stream(&mut pair, "node-b");
    pair.a
        .session
        .send(s1, Bytes::from(vec![1u8; 40_000]))
        .unwrap();
    pair.a
        .session
        .send(s2, Bytes::from(vec![2u8; 8_000]))
        .unwrap();
    let mut order = vec![];
    while let Some(t) = pair.a.session.poll_transmit() {
        if t.header()[3] == 0x06 {
            order.push(u32::from_be_bytes(t.header()[5..9].try_into().unwrap()));
        }
    }
    // The small stream is done after two turns; it never waits behind the bulk one.
    assert_eq!(&order[..4], &[s1, s2, s1, s2]);
    assert!(order[4..].iter().all(|&s| s == s1));
}

#[test]
fn keepalive_pings_keep_an_idle_tunnel_alive() {
    let mut pair = Pair::standard();
    pair.run_for(Duration::from_secs(20));
    assert!(!pair.a.saw(|e| *e == Event::TransportDead));
    assert!(!pair.b.saw(|e| *e == Event::TransportDead));
    assert!(
        pair.a.session.rtt().is_some(),
        "PONGs measured a round trip"
    );
}

#[test]
fn an_idle_tunnel_costs_one_ping_and_one_pong_per_interval() {
    let mut pair = Pair::standard();
    pair.settle(Duration::from_secs(1));
    let interval = config(Role::Agent, true).keepalive_interval;
    let before = pair.written[0] + pair.written[1];
    let rounds = 20;
    pair.run_for(interval * rounds);
    let bytes = pair.written[0] + pair.written[1] - before;
    // A PING or a PONG is a 9-byte header and 8 bytes of payload. Both sides pinging on every
    // tick would be 4 frames (68 bytes) per interval; a side that was pinged since its last
    // tick only answers, so an idle tunnel settles at 2 frames (34 bytes).
    let per_interval = bytes as f64 / f64::from(rounds);
    assert!(
        per_interval <= 34.0 * 1.25,
        "{per_interval:.1} bytes of keepalive per interval; expected about 34"
    );
    assert!(
        per_interval >= 34.0 * 0.75,
        "{per_interval:.1} bytes: no keepalive at all?"
    );
    assert!(!pair.a.saw(|e| *e == Event::TransportDead));
    assert!(!pair.b.saw(|e| *e == Event::TransportDead));
}

#[test]
fn a_silent_link_is_declared_dead_within_interval_times_count() {
    let mut cfg_a = config(Role::Agent, true);
    cfg_a.resume_grace = Duration::ZERO;
    let mut pair = Pair::new(cfg_a, config(Role::Proxy, false));
    pair.settle(Duration::from_secs(1));
    pair.black_hole = true;
    let start = pair.now;
    while !pair.a.saw(|e| *e == Event::TransportDead) {
        pair.step();
        assert!(
            pair.now - start <= Duration::from_secs(4) + TICK * 10,
            "not detected in time"
        );
    }
    assert!(
        pair.now - start >= Duration::from_secs(2),
        "declared dead too early"
    );
    assert!(pair.a.saw(|e| matches!(
        e,
        Event::Ended(Error::Ended(EndReason::KeepaliveTimeout { count: 3, .. }))
    )));
    assert!(pair.a.session.is_ended());
}

#[test]
fn goaway_refuses_new_streams_and_lets_existing_ones_finish() {
    let mut pair = Pair::standard();
    let existing = open_stream(&mut pair, "node-a");
    // An OPEN already on its way when the peer starts draining is refused.
    let racing = pair.a.session.open(request("node-b")).unwrap();
    pair.b.session.goaway("proxy restarting");
    pair.settle(Duration::from_secs(1));
    assert!(pair.a.saw(|e| matches!(e, Event::GoAway { code: ErrorCode::GOING_AWAY, reason } if reason == "proxy restarting")));
    assert!(pair.a.saw(|e| matches!(e, Event::OpenFailed { stream, code: ErrorCode::GOING_AWAY, .. } if *stream == racing)));
    assert!(matches!(
        pair.a.session.open(request("node-c")),
        Err(Error::Stream {
            reason: StreamError::GoingAway,
            ..
        })
    ));

    let data = Rng(3).bytes(300_000);
    pair.a.queue(existing, data.clone(), 5000, true);
    pair.b.queue(existing, Bytes::from_static(b"bye"), 10, true);
    pair.settle(Duration::from_secs(10));
    assert_eq!(pair.b.app.received[&existing], data);
    assert!(pair.b.saw(|e| *e == Event::Closed { stream: existing }));
    assert_eq!(pair.b.session.stream_count(), 0, "drained");
}

#[test]
fn reset_aborts_one_stream_with_its_reason_and_spares_the_rest() {
    let mut pair = Pair::standard();
    let doomed = open_stream(&mut pair, "node-a");
    let other = open_stream(&mut pair, "node-b");
    let mut rng = Rng(4);
    pair.a.queue(doomed, rng.bytes(500_000), 4000, true);
    let data = rng.bytes(500_000);
    pair.a.queue(other, data.clone(), 4000, true);
    pair.step();
    pair.step();
    pair.a
        .session
        .reset(doomed, ErrorCode::CANCELLED, "user hung up")
        .unwrap();
    pair.a.app.outbox.remove(&doomed);
    pair.a.app.streams.remove(&doomed);
    pair.settle(Duration::from_secs(10));
    assert!(pair.b.saw(|e| matches!(e, Event::Reset { stream, code: ErrorCode::CANCELLED, reason } if *stream == doomed && reason == "user hung up")));
    assert_eq!(pair.b.app.received[&other], data);
    assert!(
        pair.a.error.is_none() && pair.b.error.is_none(),
        "late frames of the reset stream are no error"
    );
}

#[test]
fn rejected_open_reports_code_and_reason() {
    let mut pair = Pair::standard();
    pair.b.app.auto_accept = false;
    let id = pair.a.session.open(request("node-x")).unwrap();
    pair.settle(Duration::from_secs(1));
    pair.b
        .session
        .reject(id, ErrorCode::NODE_UNKNOWN, "no node named node-x")
        .unwrap();
    pair.settle(Duration::from_secs(1));
    assert!(pair.a.saw(|e| *e
        == Event::OpenFailed {
            stream: id,
            code: ErrorCode::NODE_UNKNOWN,
            reason: "no node named node-x".into()
        }));
    assert_eq!(pair.b.session.stream_count(), 0);
}

#[test]
fn stream_and_pending_open_caps_refuse_politely() {
    let mut cfg_b = config(Role::Proxy, false);
    cfg_b.max_pending_opens = 3;
    cfg_b.max_streams = 5;
    let mut pair = Pair::new(config(Role::Agent, true), cfg_b);
    pair.b.app.auto_accept = false;
    // Opened before the peer's HELLO arrived: the peer enforces its caps.
    let ids: Vec<u32> = (0..5)
        .map(|i| pair.a.session.open(request(&format!("n{i}"))).unwrap())
        .collect();
    pair.settle(Duration::from_secs(1));
    let refused: Vec<u32> = pair
        .a
        .app
        .events
        .iter()
        .filter_map(|e| match e {
            Event::OpenFailed {
                stream,
                code: ErrorCode::LIMIT_EXCEEDED,
                ..
            } => Some(*stream),
            _ => None,
        })
        .collect();
    assert_eq!(refused, ids[3..].to_vec(), "only max_pending_opens wait");
    for id in &ids[..3] {
        pair.b.session.accept(*id).unwrap();
    }
    pair.settle(Duration::from_secs(1));
    pair.a.session.open(request("n5")).unwrap();
    pair.a.session.open(request("n6")).unwrap();
    // After the HELLO the opener knows the cap and refuses locally.
    assert!(matches!(
        pair.a.session.open(request("n7")),
        Err(Error::Stream {
            reason: StreamError::TooManyStreams(5),
            ..
        })
    ));
    assert!(pair.a.error.is_none() && pair.b.error.is_none());
}

/// Feeds raw frames to a fresh acceptor session, after a valid HELLO.
fn raw_peer(frames: &[Frame]) -> (Session, Result<(), Error>) {
    let now = Instant::now();
    let mut cfg = config(Role::Proxy, false);
    cfg.max_announce = 4096;
    let mut session = Session::new(cfg, [1; 16], now);
    let mut buf = BytesMut::new();
    Frame::Hello(hello()).encode(&mut buf);
    for f in frames {
        f.encode(&mut buf);
    }
    let result = session.handle_input(&mut buf, now);
    (session, result)
}

fn hello() -> Hello {
    Hello {
        version_min: 1,
        version_max: 1,
        role: Role::Agent,
        capabilities: 0,
        initial_window: 65536,
        max_frame: 4096,
        max_streams: 100,
        session_id: [9; 16],
        resuming: false,
    }
}

fn goaway_code(session: &mut Session) -> Option<ErrorCode> {
    let mut code = None;
    while let Some(t) = session.poll_transmit() {
        let mut buf = BytesMut::new();
        t.write_to(&mut buf);
        if let Ok(Some(Frame::GoAway { code: c, .. })) =
            frame::decode(&mut buf, &frame::Limits::default())
        {
            code = Some(c);
        }
    }
    code
}

#[test]
fn data_beyond_the_window_is_a_flow_control_error() {
    let now = Instant::now();
    let mut session = Session::new(config(Role::Proxy, false), [1; 16], now);
    let mut buf = BytesMut::new();
    Frame::Hello(hello()).encode(&mut buf);
    Frame::Open {
        stream: 1,
        open: request("node-a"),
    }
    .encode(&mut buf);
    session.handle_input(&mut buf, now).unwrap();
    session.accept(1).unwrap();
    for _ in 0..16 {
        Frame::Data {
            stream: 1,
            payload: Bytes::from(vec![0u8; 4096]),
        }
        .encode(&mut buf);
    }
    session.handle_input(&mut buf, now).unwrap(); // exactly the window: fine
    Frame::Data {
        stream: 1,
        payload: Bytes::from_static(b"x"),
    }
    .encode(&mut buf);
    let err = session.handle_input(&mut buf, now).unwrap_err();
    assert_eq!(
        err,
        Error::Protocol(ProtocolError::FlowControl {
            stream: 1,
            offset: 65537,
            limit: 65536
        })
    );
    assert!(session.is_ended());
    assert_eq!(goaway_code(&mut session), Some(ErrorCode::FLOW_CONTROL));
}

#[test]
fn acknowledging_unsent_bytes_is_a_flow_control_error() {
    let (mut session, result) = raw_peer(&[Frame::Open {
        stream: 1,
        open: request("node-a"),
    }]);
    result.unwrap();
    session.accept(1).unwrap();
    session.send(1, Bytes::from_static(b"hello")).unwrap();
    while session.poll_transmit().is_some() {}
    let mut buf = BytesMut::new();
    Frame::Window {
        stream: 1,
        increment: 6,
    }
    .encode(&mut buf);
    let err = session.handle_input(&mut buf, Instant::now()).unwrap_err();
    assert_eq!(
        err,
        Error::Protocol(ProtocolError::AckBeyondSent {
            stream: 1,
            acked: 6,
            sent: 5
        })
    );
    assert_eq!(goaway_code(&mut session), Some(ErrorCode::FLOW_CONTROL));
}

#[test]
fn protocol_violations_end_the_session_with_a_named_error() {
    let cases: Vec<(Vec<Frame>, &str)> = vec![
        (
            vec![Frame::Open {
                stream: 2,
                open: request("a"),
            }],
            "parity",
        ),
        (
            vec![
                Frame::Open {
                    stream: 3,
                    open: request("a"),
                },
                Frame::Open {
                    stream: 1,
                    open: request("b"),
                },
            ],
            "used before",
        ),
        (
            vec![Frame::Data {
                stream: 5,
                payload: Bytes::from_static(b"x"),
            }],
            "never opened",
        ),
        (vec![Frame::Hello(hello())], "HELLO received twice"),
        (
            vec![Frame::Resume(frame::Resume::default())],
            "unexpected RESUME",
        ),
        (
            vec![
                Frame::Open {
                    stream: 1,
                    open: request("a"),
                },
                Frame::Data {
                    stream: 1,
                    payload: Bytes::from_static(b"x"),
                },
            ],
            "not yet accepted",
        ),
    ];
    for (frames, expected) in cases {
        let (mut session, result) = raw_peer(&frames);
        let err = result.expect_err(expected);
        assert!(
            err.to_string().contains(expected),
            "{err} should mention {expected:?}"
        );
        assert!(session.is_ended());
        assert_eq!(
            goaway_code(&mut session),
            Some(ErrorCode::PROTOCOL),
            "{expected}"
        );
    }
}

#[test]
fn the_first_frame_must_be_hello_and_versions_must_overlap() {
    let now = Instant::now();
    let mut session = Session::new(config(Role::Proxy, false), [1; 16], now);
    let mut buf = BytesMut::from(&Frame::Ping { opaque: 1 }.to_bytes()[..]);
    let err = session.handle_input(&mut buf, now).unwrap_err();
    assert!(err.to_string().contains("expected HELLO"), "{err}");

    let mut session = Session::new(config(Role::Proxy, false), [1; 16], now);
    let future = Hello {
        version_min: 2,
        version_max: 3,
        ..hello()
    };
    let mut buf = BytesMut::from(&Frame::Hello(future).to_bytes()[..]);
    let err = session.handle_input(&mut buf, now).unwrap_err();
    assert!(
        err.to_string()
            .contains("we speak 1..=1, peer speaks 2..=3"),
        "{err}"
    );
    assert_eq!(goaway_code(&mut session), Some(ErrorCode::VERSION_MISMATCH));
}

#[test]
fn frames_over_the_size_caps_are_refused_from_the_header_alone() {
    let now = Instant::now();
    let mut session = Session::new(config(Role::Proxy, false), [1; 16], now);
    let mut buf = BytesMut::from(&Frame::Hello(hello()).to_bytes()[..]);
    session.handle_input(&mut buf, now).unwrap();
    // A DATA header announcing 1 MiB: refused before any payload byte arrives.
    buf.extend_from_slice(&[0x10, 0x00, 0x00, 0x06, 0x00, 0x00, 0x00, 0x00, 0x01]);
    let err = session.handle_input(&mut buf, now).unwrap_err();
    assert!(
        err.to_string().contains("exceeds the limit of 4096"),
        "{err}"
    );
    assert_eq!(goaway_code(&mut session), Some(ErrorCode::FRAME_TOO_LARGE));

    // An inventory over the receiver's max_announce.
    let big = Announce {
        cluster: String::new(),
        nodes: (0..400)
            .map(|i| NodeInfo {
                name: format!("node-{i:04}"),
                online: true,
                ..NodeInfo::default()
            })
            .collect(),
    };
    let (_, result) = raw_peer(&[Frame::Announce(big.clone())]);
    assert!(
        result
            .unwrap_err()
            .to_string()
            .contains("ANNOUNCE frame of")
    );
    // The sender refuses to send it in the first place.
    let mut cfg = config(Role::Agent, true);
    cfg.max_announce = 4096;
    let mut sender = Session::new(cfg, [2; 16], now);
    let err = sender.announce(&big).unwrap_err();
    assert!(
        err.to_string().contains("exceeds the limit of 4096"),
        "{err}"
    );
}

#[test]
fn announce_reaches_the_peer_and_is_sent_again_after_a_reconnect() {
    let mut pair = Pair::standard();
    let inventory = Announce {
        cluster: String::new(),
        nodes: vec![NodeInfo {
            name: "node-r1".into(),
            online: true,
            tunnel: true,
            labels: vec![("env".into(), "edge".into())],
            services: vec!["ssh".into()],
        }],
    };
    pair.a.session.announce(&inventory).unwrap();
    pair.settle(Duration::from_secs(1));
    assert_eq!(
        pair.b
            .app
            .events
            .iter()
            .filter(|e| **e == Event::Announce(inventory.clone()))
            .count(),
        1
    );
    pair.cut();
    pair.run_for(Duration::from_millis(100));
    pair.reconnect();
    pair.settle(Duration::from_secs(1));
    assert_eq!(
        pair.b
            .app
            .events
            .iter()
            .filter(|e| **e == Event::Announce(inventory.clone()))
            .count(),
        2
    );
}

/// The heart of resumption: cut the link at random moments during transfers in both
/// directions on several streams, some opened just before a cut, and check every byte
/// arrives exactly once, in order, and every stream closes cleanly.
#[test]
fn streams_survive_cuts_and_every_byte_arrives_exactly_once() {
    let mut lost = 0;
    for seed in 1..=12u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut pair = Pair::standard();
        pair.delay = Duration::from_millis(1 + rng.below(10));
        pair.settle(Duration::from_secs(1));
        let mut expected_ab: BTreeMap<u32, Bytes> = BTreeMap::new();
        let mut expected_ba: BTreeMap<u32, Bytes> = BTreeMap::new();
        let mut cuts = 0;
        for round in 0..6 {
            // Open a stream (from either side) and queue data both ways.
            let (opener_is_a, node) = (rng.below(2) == 0, format!("node-{round}"));
            let id = if opener_is_a {
                pair.a.session.open(request(&node)).unwrap()
            } else {
                pair.b.session.open(request(&node)).unwrap()
            };
            let up_len = rng.below(400_000) as usize + 1;
            let down_len = rng.below(200_000) as usize;
            let (up, down) = (rng.bytes(up_len), rng.bytes(down_len));
            let (opener, acceptor) = if opener_is_a {
                (&mut pair.a, &mut pair.b)
            } else {
                (&mut pair.b, &mut pair.a)
            };
            opener.app.streams.insert(id);
            let _ = acceptor;
            opener.queue(id, up.clone(), 1 + rng.below(20_000) as usize, true);
            if opener_is_a {
                expected_ab.insert(id, up);
                expected_ba.insert(id, down.clone());
                pair.b.queue(id, down, 1 + rng.below(9_000) as usize, true);
            } else {
                expected_ba.insert(id, up);
                expected_ab.insert(id, down.clone());
                pair.a.queue(id, down, 1 + rng.below(9_000) as usize, true);
            }
            // Let it run a random while, then cut mid-flight.
            let steps = rng.below(400);
            for _ in 0..steps {
                pair.step();
            }
            pair.cut();
            cuts += 1;
            pair.run_for(Duration::from_millis(rng.below(2000)));
            pair.reconnect();
        }
        pair.settle(Duration::from_secs(120));
        assert!(pair.a.error.is_none(), "seed {seed}: {:?}", pair.a.error);
        assert!(pair.b.error.is_none(), "seed {seed}: {:?}", pair.b.error);
        for (id, data) in &expected_ab {
            let got = pair.b.app.received.get(id).cloned().unwrap_or_default();
            assert_eq!(
                got.len(),
                data.len(),
                "seed {seed} stream {id}: length a->b after {cuts} cuts"
            );
            assert!(
                got == data[..],
                "seed {seed} stream {id}: bytes a->b differ"
            );
        }
        for (id, data) in &expected_ba {
            let got = pair.a.app.received.get(id).cloned().unwrap_or_default();
            assert_eq!(
                got.len(),
                data.len(),
                "seed {seed} stream {id}: length b->a"
            );
            assert!(
                got == data[..],
                "seed {seed} stream {id}: bytes b->a differ"
            );
        }
        for id in expected_ab.keys() {
            assert!(
                pair.a.saw(|e| *e == Event::Closed { stream: *id }),
                "seed {seed}: a did not close {id}"
            );
            assert!(
                pair.b.saw(|e| *e == Event::Closed { stream: *id }),
                "seed {seed}: b did not close {id}"
            );
        }
        assert!(
            !pair
                .a
                .saw(|e| matches!(e, Event::Reset { .. } | Event::OpenFailed { .. })),
            "seed {seed}"
        );
        assert!(pair.a.saw(|e| matches!(e, Event::Resumed { .. })));
        assert_eq!(pair.a.session.stream_count(), 0, "seed {seed}");
        assert_eq!(pair.b.session.stream_count(), 0, "seed {seed}");
        lost += pair.lost;
    }
    assert!(
        lost > 200_000,
        "the cuts lost only {lost} bytes in flight: the test proves little"
    );
}

#[test]
fn a_restarted_peer_cannot_resume_and_streams_end_with_a_clear_code() {
    let mut pair = Pair::standard();
    let id = open_stream(&mut pair, "node-a");
    pair.a.queue(id, Rng(5).bytes(100_000), 1000, false);
    pair.step();
    pair.cut();
    // The acceptor lost its state (process restart): a fresh session answers.
    pair.b = Side::new(config(Role::Proxy, false), 0xC, pair.now);
    pair.down = false;
    pair.a.session.reattach(pair.now).unwrap();
    pair.settle(Duration::from_secs(2));
    assert!(pair.a.saw(|e| matches!(e, Event::Reset { stream, code: ErrorCode::RESUME_FAILED, .. } if *stream == id)));
    assert!(pair.a.error.is_none() && pair.b.error.is_none());
    // The tunnel itself carries on with new streams.
    let again = open_stream(&mut pair, "node-a");
    assert!(again > id);
}

#[test]
fn past_the_grace_period_the_session_ends_and_streams_are_reset() {
    let mut pair = Pair::standard();
    let id = open_stream(&mut pair, "node-a");
    pair.cut();
    pair.run_for(Duration::from_secs(4));
    assert!(!pair.a.session.is_ended(), "still within the 5 s grace");
    pair.run_for(Duration::from_secs(2));
    assert!(pair.a.session.is_ended());
    assert!(pair.a.saw(|e| matches!(e, Event::Reset { stream, code: ErrorCode::RESUME_FAILED, .. } if *stream == id)));
    assert!(pair.a.saw(|e| matches!(
        e,
        Event::Ended(Error::Ended(EndReason::ResumeExpired { .. }))
    )));
    assert!(pair.a.session.reattach(pair.now).is_err());
}

#[test]
fn error_goaway_from_the_peer_ends_the_session() {
    let mut pair = Pair::standard();
    let id = open_stream(&mut pair, "node-a");
    pair.b
        .session
        .close(ErrorCode::INTERNAL, "shutting down hard");
    pair.settle(Duration::from_secs(1));
    assert!(pair.a.session.is_ended());
    assert!(
        pair.a
            .saw(|e| matches!(e, Event::Reset { stream, .. } if *stream == id))
    );
    assert!(pair.a.saw(|e| matches!(e, Event::Ended(Error::Ended(EndReason::ClosedByPeer { code: ErrorCode::INTERNAL, reason })) if reason.contains("shutting down hard"))));
}

#[test]
fn bytes_read_before_the_fin_arrives_are_acknowledged_without_waiting_for_a_tick() {
    let mut pair = Pair::standard();
    let id = open_stream(&mut pair, "node-a");
    pair.a
        .session
        .send(id, Bytes::from_static(b"last words"))
        .unwrap();
    pair.settle(Duration::from_millis(50));
    assert_eq!(pair.b.app.received[&id], b"last words");
    pair.a.session.finish(id).unwrap();
    pair.b.app.finish_when_sent.insert(id);
    pair.b.app.outbox.entry(id).or_default();
    // Well within one keepalive interval (1 s): no tick may be needed to close.
    pair.settle(Duration::from_millis(100));
    assert!(
        pair.a.saw(|e| *e == Event::Closed { stream: id }),
        "closing waited for a keepalive tick"
    );
}

/// A small DATA payload is copied out of the read buffer (a view would keep the whole buffer
/// alive while the stream is not read); a bulk one stays a view of it (zero copy).
#[test]
fn small_data_is_copied_out_of_the_read_buffer_and_bulk_data_is_not() {
    let now = Instant::now();
    let mut cfg = config(Role::Proxy, false);
    cfg.initial_window = 1 << 20;
    cfg.max_frame = 64 * 1024;
    let mut session = Session::new(cfg, [1; 16], now);
    let mut peer_hello = hello();
    peer_hello.max_frame = 64 * 1024;
    let mut buf = BytesMut::new();
    Frame::Hello(peer_hello).encode(&mut buf);
    Frame::Open {
        stream: 1,
        open: request("node-r1"),
    }
    .encode(&mut buf);
    session.handle_input(&mut buf, now).unwrap();
    session.accept(1).unwrap();

    let small = Bytes::from(vec![1u8; 100]);
    let bulk = Bytes::from(vec![2u8; frame::COPY_DATA_BELOW]);
    let mut read = BytesMut::with_capacity(256 * 1024);
    for payload in [&small, &bulk] {
        Frame::Data {
            stream: 1,
            payload: payload.clone(),
        }
        .encode(&mut read);
    }
    let region = read.as_ptr() as usize..read.as_ptr() as usize + read.capacity();
    session.handle_input(&mut read, now).unwrap();
    let mut got = Vec::new();
    while let Received::Data(data) = session.recv(1).unwrap() {
        got.push(data);
    }
    assert_eq!(got.concat(), [small.to_vec(), bulk.to_vec()].concat());
    let inside = |b: &Bytes| region.contains(&(b.as_ptr() as usize));
    assert!(
        !inside(&got[0]),
        "the 100-byte payload still points into the read buffer"
    );
    assert!(inside(&got[1]), "the bulk payload was copied");
}

/// A peer that announces a 4 GiB window and never reads (never sends WINDOW) gets no more
/// credit than our own window: the sender queues at most one window for it, before and after
/// a reconnect, however much its application offers.
#[test]
fn a_peer_announcing_a_huge_window_gets_at_most_our_own_window() {
    let own = 64 * 1024;
    let mut greedy = config(Role::Client, false);
    greedy.initial_window = u32::MAX;
    let mut pair = Pair::new(config(Role::Agent, true), greedy);
    let id = open_stream(&mut pair, "node-r1");
    pair.b.app.paused.insert(id); // never reads, so never sends WINDOW
    pair.a.queue(id, Rng(9).bytes(4_000_000), 16 * 1024, false);
    pair.settle(Duration::from_secs(5));

    let (written, _) = pair.a.session.stream_bytes(id).unwrap();
    assert_eq!(written, own, "the sender queued beyond its own window");
    assert_eq!(pair.a.session.stream_credit(id), Some(0));
    assert_eq!(pair.a.session.buffered(), (0, own));
    let (_, received) = pair.b.session.stream_bytes(id).unwrap();
    assert_eq!(received, own);

    // Resumption restores the same cap: the RESUME's credit limit counts from the peer's
    // announced window, ours from our own.
    pair.cut();
    pair.run_for(Duration::from_millis(100));
    pair.reconnect();
    pair.settle(Duration::from_secs(5));
    assert!(pair.a.saw(|e| matches!(e, Event::Resumed { .. })));
    assert_eq!(pair.a.session.stream_bytes(id).unwrap().0, own);
    assert_eq!(pair.a.session.stream_credit(id), Some(0));

    // Once it reads, credit comes back a window at a time and every byte arrives.
    pair.b.app.paused.remove(&id);
    pair.settle(Duration::from_secs(30));
    assert_eq!(pair.b.app.received[&id].len(), 4_000_000);
    pair.run_for(Duration::from_secs(2)); // the keepalive flushes the last, small credit
    assert_eq!(pair.a.session.buffered(), (0, 0));
}

/// Windows bound a stream; the memory budget bounds the session: a peer that reads none of
/// many streams makes us queue at most `max_buffered`, and the streams go on (`Writable`)
/// once it reads.
#[test]
fn outbound_bytes_across_streams_stay_within_the_memory_budget() {
    let budget = 200 * 1024;
    let mut sender = config(Role::Agent, true);
    sender.max_buffered = budget;
    let mut pair = Pair::new(sender, config(Role::Proxy, false));
    let ids: Vec<u32> = (0..8)
        .map(|i| open_stream(&mut pair, &format!("node-{i}")))
        .collect();
    let mut rng = Rng(11);
    let data: Vec<Bytes> = ids.iter().map(|_| rng.bytes(300_000)).collect();
    for (id, bytes) in ids.iter().zip(&data) {
        pair.b.app.paused.insert(*id);
        pair.a.queue(*id, bytes.clone(), 10_000, true);
    }
    pair.settle(Duration::from_secs(5));
    // 8 × 64 KiB of credit, but only 200 KiB of budget.
    assert_eq!(pair.a.session.buffered(), (0, u64::from(budget)));
    for id in &ids {
        pair.b.app.paused.remove(id);
    }
    pair.settle(Duration::from_secs(60));
    for (id, bytes) in ids.iter().zip(&data) {
        assert_eq!(&pair.b.app.received[id], bytes, "stream {id}");
    }
    assert_eq!(pair.a.session.buffered(), (0, 0));
}

/// Inbound, the budget is the peer's to respect: unread DATA across streams beyond it ends
/// the session with LIMIT_EXCEEDED, though each stream stayed within its window.
#[test]
fn unread_data_beyond_the_memory_budget_is_a_protocol_error() {
    let now = Instant::now();
    let mut cfg = config(Role::Proxy, false);
    cfg.max_buffered = 100 * 1024;
    let mut session = Session::new(cfg, [1; 16], now);
    let mut buf = BytesMut::new();
    Frame::Hello(hello()).encode(&mut buf);
    for stream in [1, 3] {
        Frame::Open {
            stream,
            open: request("node-a"),
        }
        .encode(&mut buf);
    }
    session.handle_input(&mut buf, now).unwrap();
    session.accept(1).unwrap();
    session.accept(3).unwrap();
    let chunk = Bytes::from(vec![0u8; 4096]);
    for _ in 0..16 {
        Frame::Data {
            stream: 1,
            payload: chunk.clone(),
        }
        .encode(&mut buf);
    }
    for _ in 0..9 {
        Frame::Data {
            stream: 3,
            payload: chunk.clone(),
        }
        .encode(&mut buf);
    }
    session.handle_input(&mut buf, now).unwrap(); // 100 KiB: exactly the budget
    assert_eq!(session.buffered(), (100 * 1024, 0));
    Frame::Data {
        stream: 3,
        payload: Bytes::from_static(b"x"),
    }
    .encode(&mut buf);
    let err = session.handle_input(&mut buf, now).unwrap_err();
    assert_eq!(
        err,
        Error::Protocol(ProtocolError::MemoryBudget {
            stream: 3,
            held: 100 * 1024 + 1,
            limit: 100 * 1024,
        })
    );
    assert_eq!(goaway_code(&mut session), Some(ErrorCode::LIMIT_EXCEEDED));
}
