//! Arbitrary bytes from a peer: into `frame::decode` in a loop (default and tiny limits),
//! then into a `Session` after a valid HELLO, read in pieces of varying size, with the
//! application answering every event. Nothing may panic; whatever decodes must re-encode
//! to a frame that decodes to the same value.

#![no_main]

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use frame::{
    Error, ErrorCode, Event, Frame, Hello, Limits, Open, Received, Role, Session, SessionConfig,
    decode,
};
use libfuzzer_sys::fuzz_target;

/// Read sizes the session sees, in turn: single bytes, a header's worth, big reads.
const READ_SIZES: [usize; 6] = [1, 3, 9, 29, 97, 1000];

fuzz_target!(|data: &[u8]| {
    decode_loop(data, &Limits::default());
    decode_loop(
        data,
        &Limits {
            max_data: 1,
            max_announce: 16,
        },
    );
    into_session(data);
});

fn decode_loop(data: &[u8], limits: &Limits) {
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.len();
        match decode(&mut buf, limits) {
            Ok(Some(frame)) => {
                let consumed = before - buf.len();
                let encoded = frame.to_bytes();
                // v1 ignores HELLO's reserved byte and tail and unknown ANNOUNCE node flags,
                // so a re-encoding may be shorter than the input, never longer.
                assert!(
                    encoded.len() <= consumed,
                    "{frame:?} re-encodes to {} bytes, decoded from {consumed}",
                    encoded.len()
                );
                let mut again = BytesMut::from(&encoded[..]);
                assert_eq!(decode(&mut again, limits), Ok(Some(frame)));
                assert!(again.is_empty());
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "an incomplete frame consumed bytes");
                return;
            }
            Err(_) => return,
        }
    }
}

fn into_session(data: &[u8]) {
    let mut now = Instant::now();
    let mut config = SessionConfig::new(Role::Proxy, false);
    config.initial_window = 4096;
    config.max_streams = 8;
    config.max_pending_opens = 4;
    config.keepalive_interval = Duration::from_secs(1);
    let mut session = Session::new(config, [0xB0; 16], now);
    // A stream of our own, so that frames for an even id have something to act on.
    let ours = session
        .open(Open {
            node: "node-1".into(),
            service: "ssh".into(),
            ..Open::default()
        })
        .ok();

    let hello = Frame::Hello(Hello {
        version_min: 1,
        version_max: 1,
        role: Role::Agent,
        capabilities: 0,
        initial_window: 4096,
        max_frame: 1024,
        max_streams: 8,
        session_id: [0xA0; 16],
        resuming: false,
    });
    let mut input = BytesMut::new();
    hello.encode(&mut input);
    if session.handle_input(&mut input, now).is_err() {
        panic!("a valid HELLO was refused");
    }

    let mut rest = data;
    let mut turn = 0;
    while !rest.is_empty() {
        let n = READ_SIZES[turn % READ_SIZES.len()].min(rest.len());
        turn += 1;
        input.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        let result = session.handle_input(&mut input, now);
        react(&mut session, ours, turn);
        drain(&mut session);
        if let Err(err) = result {
            // The session has ended; it keeps saying so and never panics.
            assert!(session.is_ended(), "{err}");
            assert!(session.handle_input(&mut input, now).is_err());
            return;
        }
        if turn % 16 == 0 {
            now += Duration::from_millis(700);
            session.handle_timeout(now);
        }
    }
}

/// Answers every event the way an application would, alternating choices by `turn`.
fn react(session: &mut Session, ours: Option<u32>, turn: usize) {
    let mut readable = Vec::new();
    while let Some(event) = session.poll_event() {
        match event {
            Event::IncomingOpen { stream, .. } => {
                let _ = if turn.is_multiple_of(3) {
                    session.reject(stream, ErrorCode::ACCESS_DENIED, "no")
                } else {
                    session.accept(stream)
                };
                let _ = session.send(stream, Bytes::from_static(b"welcome"));
            }
            Event::Readable { stream } => readable.push(stream),
            Event::Opened { stream } | Event::Writable { stream } => {
                let _ = session.send(stream, Bytes::from(vec![0x42; 300]));
                if turn.is_multiple_of(5) {
                    let _ = session.finish(stream);
                }
            }
            Event::Ended(Error::Stream { .. }) => panic!("a stream error ended the session"),
            _ => {}
        }
    }
    for stream in readable {
        for _ in 0..8 {
            match session.recv(stream) {
                Ok(Received::Data(_)) => {}
                Ok(Received::Finished) => {
                    let _ = session.finish(stream);
                    break;
                }
                Ok(Received::Nothing) | Err(_) => break,
            }
        }
    }
    if let Some(stream) = ours
        && turn.is_multiple_of(7)
    {
        let _ = session.reset(stream, ErrorCode::CANCELLED, "bye");
    }
}

fn drain(session: &mut Session) {
    let mut out = BytesMut::new();
    while let Some(t) = session.poll_transmit() {
        t.write_to(&mut out);
    }
    // What we send must always be valid frames.
    let limits = Limits {
        max_data: 0x1_0000,
        max_announce: 0x40_0000,
    };
    while let Some(frame) = decode(&mut out, &limits).expect("the session sent an invalid frame") {
        let _ = frame;
    }
    assert!(out.is_empty(), "the session sent a partial frame");
}
