//! Golden byte vectors for the v1 wire format, one per frame kind, written by hand from the
//! layout in `frame/src/codec.rs` and `docs/protocol.md` (never by pasting encoder output):
//! every vector must encode from its frame and decode back to it. Then the decode errors a
//! peer can provoke, and the `Ok(None)` contract for incomplete input.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use bytes::{Bytes, BytesMut};
use frame::codec::{self, HEADER_LEN};
use frame::{
    Announce, DecodeError, ErrorCode, Frame, Hello, Kind, Limits, NameError, NodeInfo, Open,
    Resume, ResumeStream, Role, decode,
};

/// Parses a hex literal; whitespace and `|` (used to separate fields) are ignored.
fn hex(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text
        .bytes()
        .filter(|b| !b.is_ascii_whitespace() && *b != b'|')
        .collect();
    assert!(
        digits.len() % 2 == 0,
        "odd number of hex digits in {text:?}"
    );
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
        .collect()
}

/// Encodes `frame`, compares with `expected`, decodes `expected` back and compares with
/// `frame`; also checks that a second frame behind it is left in the buffer untouched.
fn check(frame: &Frame, expected_hex: &str) {
    let expected = hex(expected_hex);
    let kind = frame.kind();

    let mut encoded = BytesMut::new();
    frame.encode(&mut encoded);
    assert_eq!(
        hex_string(&encoded),
        hex_string(&expected),
        "{kind}: encode differs from the golden vector"
    );
    assert_eq!(
        frame.to_bytes(),
        Bytes::from(expected.clone()),
        "{kind}: to_bytes"
    );
    assert_eq!(
        frame.payload_len(),
        expected.len() - HEADER_LEN,
        "{kind}: payload_len"
    );

    let mut buf = BytesMut::from(&expected[..]);
    let trailer = hex("000000 0b 00 00000000"); // the first 9 bytes of another frame
    buf.extend_from_slice(&trailer);
    let decoded = decode(&mut buf, &Limits::default())
        .unwrap_or_else(|e| panic!("{kind}: golden vector does not decode: {e}"))
        .unwrap_or_else(|| panic!("{kind}: golden vector decoded as incomplete"));
    assert_eq!(&decoded, frame, "{kind}: decode differs from the frame");
    assert_eq!(
        &buf[..],
        &trailer[..],
        "{kind}: decode consumed the wrong number of bytes"
    );
}

/// A frame from its header fields and a payload in hex, the length computed: for error
/// vectors whose point is not the length field.
fn raw(kind: u8, flags: u8, stream: u32, payload_hex: &str) -> Vec<u8> {
    let payload = hex(payload_hex);
    let len = payload.len();
    let mut bytes = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    bytes.extend_from_slice(&stream.to_be_bytes());
    bytes.extend_from_slice(&payload);
    bytes
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn session_id(first: u8) -> [u8; 16] {
    std::array::from_fn(|i| first + i as u8)
}

fn decode_err(bytes: &[u8]) -> DecodeError {
    decode_err_with(bytes, &Limits::default())
}

fn decode_err_with(bytes: &[u8], limits: &Limits) -> DecodeError {
    let mut buf = BytesMut::from(bytes);
    match decode(&mut buf, limits) {
        Err(e) => e,
        Ok(other) => panic!(
            "expected a decode error for {}, got {other:?}",
            hex_string(bytes)
        ),
    }
}

// ---- one vector per frame kind -----------------------------------------------------------

fn hello() -> Frame {
    Frame::Hello(Hello {
        version_min: 1,
        version_max: 2,
        role: Role::Agent,
        capabilities: 0xA1B2_C3D4,
        initial_window: 0x0010_0000,
        max_frame: 0x4000,
        max_streams: 1024,
        session_id: session_id(0x00),
        resuming: false,
    })
}

const HELLO: &str = "
    000026 | 01 | 00 | 00000000
    0001 | 0002 | 01 | 00 | a1b2c3d4 | 00100000 | 00004000 | 00000400
    000102030405060708090a0b0c0d0e0f";

#[test]
fn hello_fresh() {
    check(&hello(), HELLO);
}

#[test]
fn hello_resuming() {
    let frame = Frame::Hello(Hello {
        version_min: 1,
        version_max: 1,
        role: Role::Proxy,
        capabilities: 0,
        initial_window: 0xFFFF_FFFF,
        max_frame: 0x0001_0000,
        max_streams: 1,
        session_id: session_id(0xF0),
        resuming: true,
    });
    check(
        &frame,
        "000026 | 01 | 01 | 00000000
         0001 | 0001 | 02 | 00 | 00000000 | ffffffff | 00010000 | 00000001
         f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff",
    );
}

#[test]
fn hello_roles() {
    for (role, byte) in [
        (Role::Agent, 1u8),
        (Role::Proxy, 2),
        (Role::Client, 3),
        (Role::Cluster, 4),
    ] {
        let mut bytes = hex(HELLO);
        bytes[HEADER_LEN + 4] = byte;
        let decoded = decode(&mut BytesMut::from(&bytes[..]), &Limits::default())
            .unwrap()
            .unwrap();
        let Frame::Hello(h) = decoded else {
            panic!("not a HELLO")
        };
        assert_eq!(h.role, role);
    }
}

/// A later version may append fields to HELLO and fill the reserved byte: v1 ignores both.
#[test]
fn hello_longer_payload_and_reserved_byte_are_ignored() {
    let bytes = hex("00002a | 01 | 00 | 00000000
         0001 | 0002 | 01 | 7f | a1b2c3d4 | 00100000 | 00004000 | 00000400
         000102030405060708090a0b0c0d0e0f | deadbeef");
    let mut buf = BytesMut::from(&bytes[..]);
    assert_eq!(decode(&mut buf, &Limits::default()).unwrap(), Some(hello()));
    assert!(buf.is_empty());
}

fn announce() -> Frame {
    Frame::Announce(Announce {
        cluster: "leaf-1".into(),
        nodes: vec![
            NodeInfo {
                name: "web-1".into(),
                online: true,
                tunnel: true,
                labels: vec![
                    ("env".into(), "prod".into()),
                    ("team/a".into(), "x y".into()),
                ],
                services: vec!["ssh".into(), "http".into()],
            },
            NodeInfo {
                name: "db.2".into(),
                online: true,
                tunnel: false,
                labels: vec![("Zone".into(), "Zürich".into())],
                services: vec!["ssh".into()],
            },
        ],
    })
}

const ANNOUNCE: &str = "
    000048 | 02 | 00 | 00000000
    06 6c6561662d31 | 0002
    05 7765622d31 | 03 | 02 | 03 656e76 | 04 70726f64 | 06 7465616d2f61 | 03 782079
        | 02 | 03 737368 | 04 68747470
    04 64622e32 | 01 | 01 | 04 5a6f6e65 | 07 5ac3bc72696368
        | 01 | 03 737368";

#[test]
fn announce_two_nodes() {
    check(&announce(), ANNOUNCE);
}

#[test]
fn announce_empty_from_an_agent() {
    check(
        &Frame::Announce(Announce::default()),
        "000003 | 02 | 00 | 00000000 | 00 | 0000",
    );
}

/// Node flag bits other than online (0x01) and tunnel (0x02) are ignored, not refused.
#[test]
fn announce_unknown_node_flags_are_ignored() {
    let bytes = hex("000008 | 02 | 00 | 00000000 | 00 | 0001 | 01 61 | fe | 00 | 00");
    let decoded = decode(&mut BytesMut::from(&bytes[..]), &Limits::default())
        .unwrap()
        .unwrap();
    assert_eq!(
        decoded,
        Frame::Announce(Announce {
            cluster: String::new(),
            nodes: vec![NodeInfo {
                name: "a".into(),
                online: false,
                tunnel: true,
                ..NodeInfo::default()
            }],
        })
    );
}

fn open() -> Frame {
    Frame::Open {
        stream: 0x0102_0305,
        open: Open {
            session_id: session_id(0xF0),
            cluster: "root".into(),
            node: "web-1".into(),
            service: "ssh".into(),
            user: "alice".into(),
            login: "root".into(),
            client_addr: "203.0.113.7:52114".into(),
            credential: Bytes::from_static(&[0xDE, 0xAD, 0xBE, 0xEF]),
        },
    }
}

const OPEN: &str = "
    000042 | 03 | 00 | 01020305
    f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff
    04 726f6f74 | 05 7765622d31 | 03 737368 | 05 616c696365 | 04 726f6f74
    11 3230332e302e3131332e373a3532313134
    0004 deadbeef";

#[test]
fn open_every_field() {
    check(&open(), OPEN);
}

#[test]
fn open_minimal() {
    check(
        &Frame::Open {
            stream: 1,
            open: Open {
                node: "n".into(),
                service: "s".into(),
                ..Open::default()
            },
        },
        "00001a | 03 | 00 | 00000001
         00000000000000000000000000000000
         00 | 01 6e | 01 73 | 00 | 00 | 00 | 0000",
    );
}

#[test]
fn open_ok() {
    check(&Frame::OpenOk { stream: 2 }, "000000 | 04 | 00 | 00000002");
}

#[test]
fn open_fail() {
    check(
        &Frame::OpenFail {
            stream: 3,
            code: ErrorCode::NODE_OFFLINE,
            reason: "node offline".into(),
        },
        "000010 | 05 | 00 | 00000003 | 0101 | 000c 6e6f6465206f66666c696e65",
    );
}

#[test]
fn data() {
    check(
        &Frame::Data {
            stream: 0x7FFF_FFFF,
            payload: Bytes::from_static(b"hello"),
        },
        "000005 | 06 | 00 | 7fffffff | 68656c6c6f",
    );
}

#[test]
fn data_empty() {
    check(
        &Frame::Data {
            stream: 1,
            payload: Bytes::new(),
        },
        "000000 | 06 | 00 | 00000001",
    );
}

#[test]
fn data_largest_default() {
    let payload = Bytes::from(vec![0x5A; 0x4000]);
    let mut expected = String::from("004000 | 06 | 00 | 00000009");
    expected.push_str(&"5a".repeat(0x4000));
    check(&Frame::Data { stream: 9, payload }, &expected);
}

#[test]
fn window() {
    check(
        &Frame::Window {
            stream: 5,
            increment: 0x0001_0000,
        },
        "000004 | 07 | 00 | 00000005 | 00010000",
    );
    check(
        &Frame::Window {
            stream: 5,
            increment: u32::MAX,
        },
        "000004 | 07 | 00 | 00000005 | ffffffff",
    );
}

#[test]
fn fin() {
    check(&Frame::Fin { stream: 6 }, "000000 | 08 | 00 | 00000006");
}

#[test]
fn reset() {
    check(
        &Frame::Reset {
            stream: 9,
            code: ErrorCode::CANCELLED,
            reason: "user hung up\t(ctrl-c)".into(),
        },
        "000019 | 09 | 00 | 00000009 | 0006
         0015 757365722068756e67207570 09 286374726c2d6329",
    );
}

#[test]
fn ping() {
    check(
        &Frame::Ping {
            opaque: 0x0123_4567_89AB_CDEF,
        },
        "000008 | 0a | 00 | 00000000 | 0123456789abcdef",
    );
}

#[test]
fn pong() {
    check(
        &Frame::Pong {
            opaque: 0xFEDC_BA98_7654_3210,
        },
        "000008 | 0b | 00 | 00000000 | fedcba9876543210",
    );
}

#[test]
fn goaway() {
    check(
        &Frame::GoAway {
            code: ErrorCode::GOING_AWAY,
            reason: "draining".into(),
        },
        "00000c | 0c | 00 | 00000000 | 0009 | 0008 647261696e696e67",
    );
}

/// Codes this version does not know are carried, not refused.
#[test]
fn goaway_unknown_code_empty_reason() {
    check(
        &Frame::GoAway {
            code: ErrorCode(0xBEEF),
            reason: String::new(),
        },
        "000004 | 0c | 00 | 00000000 | beef | 0000",
    );
}

fn resume() -> Frame {
    Frame::Resume(Resume {
        last_peer_stream: 4,
        streams: vec![
            ResumeStream {
                stream: 1,
                received: 0x0010_0005,
                credit_limit: 0x0020_0000,
                fin_received: true,
                accepted: false,
            },
            ResumeStream {
                stream: 2,
                received: 0,
                credit_limit: 0x0001_0000_0000,
                fin_received: false,
                accepted: true,
            },
        ],
    })
}

const RESUME: &str = "
    000030 | 0d | 00 | 00000000
    00000004 | 0002
    00000001 | 0000000000100005 | 0000000000200000 | 01
    00000002 | 0000000000000000 | 0000000100000000 | 02";

#[test]
fn resume_two_entries() {
    check(&resume(), RESUME);
}

#[test]
fn resume_both_flags_and_empty() {
    check(
        &Frame::Resume(Resume {
            last_peer_stream: 0,
            streams: vec![ResumeStream {
                stream: 0x7FFF_FFFF,
                received: u64::MAX,
                credit_limit: 1,
                fin_received: true,
                accepted: true,
            }],
        }),
        "00001b | 0d | 00 | 00000000 | 00000000 | 0001
         7fffffff | ffffffffffffffff | 0000000000000001 | 03",
    );
    check(
        &Frame::Resume(Resume::default()),
        "000006 | 0d | 00 | 00000000 | 00000000 | 0000",
    );
}

/// Several frames back to back come out one at a time, in order.
#[test]
fn back_to_back_frames_decode_in_order() {
    let vectors = [HELLO, ANNOUNCE, OPEN, RESUME];
    let frames = [hello(), announce(), open(), resume()];
    let mut buf = BytesMut::new();
    for v in vectors {
        buf.extend_from_slice(&hex(v));
    }
    for expected in frames {
        assert_eq!(
            decode(&mut buf, &Limits::default()).unwrap(),
            Some(expected)
        );
    }
    assert!(buf.is_empty());
    assert_eq!(decode(&mut buf, &Limits::default()).unwrap(), None);
}

/// The zero-copy header writer produces the same bytes as a whole DATA frame.
#[test]
fn encode_header_matches_data_frame() {
    let mut header = BytesMut::new();
    codec::encode_header(Kind::Data, 0, 0x7FFF_FFFF, 5, &mut header);
    assert_eq!(&header[..], &hex("000005 | 06 | 00 | 7fffffff")[..]);
}

/// Kind bytes: the table in docs/protocol.md.
#[test]
fn kind_bytes() {
    let table = [
        (0x01, Kind::Hello),
        (0x02, Kind::Announce),
        (0x03, Kind::Open),
        (0x04, Kind::OpenOk),
        (0x05, Kind::OpenFail),
        (0x06, Kind::Data),
        (0x07, Kind::Window),
        (0x08, Kind::Fin),
        (0x09, Kind::Reset),
        (0x0A, Kind::Ping),
        (0x0B, Kind::Pong),
        (0x0C, Kind::GoAway),
        (0x0D, Kind::Resume),
    ];
    for (byte, kind) in table {
        assert_eq!(Kind::from_u8(byte), Some(kind));
        assert_eq!(kind as u8, byte);
    }
    for byte in (0x00..=0xFF).filter(|b| !(0x01..=0x0D).contains(b)) {
        assert_eq!(Kind::from_u8(byte), None, "0x{byte:02x}");
    }
}

// ---- decode errors -----------------------------------------------------------------------

#[test]
fn unknown_kind() {
    assert_eq!(
        decode_err(&hex("000000 | 0e | 00 | 00000000")),
        DecodeError::UnknownKind(0x0E)
    );
    assert_eq!(
        decode_err(&hex("000000 | 00 | 00 | 00000000")),
        DecodeError::UnknownKind(0x00)
    );
    assert_eq!(
        decode_err(&hex("ffffff | ff | ff | ffffffff")),
        DecodeError::UnknownKind(0xFF)
    );
}

/// An oversized DATA frame fails from its header alone: no payload byte is awaited.
#[test]
fn oversized_data_fails_from_the_header() {
    assert_eq!(
        decode_err(&hex("004001 | 06 | 00 | 00000001")),
        DecodeError::TooLarge {
            kind: Kind::Data,
            len: 0x4001,
            max: 0x4000,
        }
    );
    assert_eq!(
        decode_err(&hex("ffffff | 06 | 00 | 00000001")),
        DecodeError::TooLarge {
            kind: Kind::Data,
            len: 0xFF_FFFF,
            max: 0x4000,
        }
    );
    // A smaller configured limit is honoured...
    let small = Limits {
        max_data: 16,
        max_announce: 64,
    };
    assert_eq!(
        decode_err_with(&hex("000011 | 06 | 00 | 00000001"), &small),
        DecodeError::TooLarge {
            kind: Kind::Data,
            len: 17,
            max: 16,
        }
    );
    // ...and a larger one is capped at 64 KiB whatever the configuration says.
    let huge = Limits {
        max_data: 1 << 24,
        max_announce: 1 << 30,
    };
    assert_eq!(
        decode_err_with(&hex("010001 | 06 | 00 | 00000001"), &huge),
        DecodeError::TooLarge {
            kind: Kind::Data,
            len: 0x1_0001,
            max: 0x1_0000,
        }
    );
    assert_eq!(
        decode_err_with(&hex("400001 | 02 | 00 | 00000000"), &huge),
        DecodeError::TooLarge {
            kind: Kind::Announce,
            len: 0x40_0001,
            max: 0x40_0000,
        }
    );
}

/// Every kind with a fixed or capped size refuses one byte more, from the header alone.
#[test]
fn every_kind_has_a_size_cap() {
    let limits = Limits::default();
    let caps = [
        (Kind::Hello, 256),
        (Kind::Announce, 0x10_0000),
        (Kind::Open, 16 + 6 * 256 + 2 + 8192),
        (Kind::OpenOk, 0),
        (Kind::OpenFail, 4 + 1024),
        (Kind::Data, 0x4000),
        (Kind::Window, 4),
        (Kind::Fin, 0),
        (Kind::Reset, 4 + 1024),
        (Kind::Ping, 8),
        (Kind::Pong, 8),
        (Kind::GoAway, 4 + 1024),
        (Kind::Resume, 6 + 21 * 0xFFFF),
    ];
    for (kind, max) in caps {
        assert_eq!(limits.max_payload(kind), max, "{kind}");
        let len = max + 1;
        let stream = if kind.is_stream_frame() { 1u32 } else { 0 };
        let mut header = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind as u8,
            0,
        ];
        header.extend_from_slice(&stream.to_be_bytes());
        assert_eq!(
            decode_err(&header),
            DecodeError::TooLarge { kind, len, max },
            "{kind}"
        );
    }
}

#[test]
fn nonzero_stream_on_connection_frames() {
    for (kind, len) in [
        (0x01u8, 38u8),
        (0x02, 3),
        (0x0A, 8),
        (0x0B, 8),
        (0x0C, 4),
        (0x0D, 6),
    ] {
        let bytes = [0, 0, len, kind, 0, 0, 0, 0, 1];
        let kind = Kind::from_u8(kind).unwrap();
        assert_eq!(
            decode_err(&bytes),
            DecodeError::BadStream {
                kind,
                stream: 1,
                expected: "expected stream 0",
            },
            "{kind}"
        );
    }
    assert_eq!(
        decode_err(&hex("000008 | 0a | 00 | 80000000")),
        DecodeError::BadStream {
            kind: Kind::Ping,
            stream: 0x8000_0000,
            expected: "expected stream 0",
        }
    );
}

#[test]
fn stream_zero_or_reserved_bit_on_stream_frames() {
    for kind in 0x03u8..=0x09 {
        let kind = Kind::from_u8(kind).unwrap();
        let len = if kind == Kind::Window { 4 } else { 0 };
        for stream in [0u32, 0x8000_0000, 0xFFFF_FFFF] {
            let mut bytes = vec![0, 0, len, kind as u8, 0];
            bytes.extend_from_slice(&stream.to_be_bytes());
            assert_eq!(
                decode_err(&bytes),
                DecodeError::BadStream {
                    kind,
                    stream,
                    expected: "expected a stream id from 1 to 2^31-1",
                },
                "{kind} on stream {stream:#x}"
            );
        }
    }
}

#[test]
fn undefined_flags() {
    assert_eq!(
        decode_err(&hex("000005 | 06 | 01 | 00000001")),
        DecodeError::BadFlags {
            kind: Kind::Data,
            flags: 0x01,
        }
    );
    // HELLO defines only RESUMING (0x01).
    assert_eq!(
        decode_err(&hex("000026 | 01 | 03 | 00000000")),
        DecodeError::BadFlags {
            kind: Kind::Hello,
            flags: 0x03,
        }
    );
    assert_eq!(
        decode_err(&hex("000008 | 0a | 80 | 00000000")),
        DecodeError::BadFlags {
            kind: Kind::Ping,
            flags: 0x80,
        }
    );
    // RESUME entry flags: only FIN_RECEIVED (0x01) and ACCEPTED (0x02).
    assert_eq!(
        decode_err(&raw(
            0x0D,
            0x00,
            0,
            "00000000 | 0001
             00000001 | 0000000000000000 | 0000000000000000 | 04"
        )),
        DecodeError::BadFlags {
            kind: Kind::Resume,
            flags: 0x04,
        }
    );
}

#[test]
fn window_increment_zero() {
    assert_eq!(
        decode_err(&raw(0x07, 0x00, 7, "00000000")),
        DecodeError::ZeroWindow(7)
    );
}

#[test]
fn fixed_length_kinds_refuse_other_lengths() {
    assert_eq!(
        decode_err(&raw(0x07, 0x00, 1, "000001")),
        DecodeError::BadLength {
            kind: Kind::Window,
            len: 3,
            expected: "4",
        }
    );
    assert_eq!(
        decode_err(&raw(0x0B, 0x00, 0, "00000000000000")),
        DecodeError::BadLength {
            kind: Kind::Pong,
            len: 7,
            expected: "8",
        }
    );
}

#[test]
fn truncated_open_fields() {
    // The cluster name says 5 bytes, 2 follow.
    assert_eq!(
        decode_err(&raw(
            0x03,
            0x00,
            1,
            "00000000000000000000000000000000 | 05 6162"
        )),
        DecodeError::Truncated {
            kind: Kind::Open,
            field: "cluster",
        }
    );
    // The session id itself is cut short.
    assert_eq!(
        decode_err(&raw(0x03, 0x00, 1, "00000000")),
        DecodeError::Truncated {
            kind: Kind::Open,
            field: "session_id",
        }
    );
    // Everything but the credential length.
    assert_eq!(
        decode_err(&raw(
            0x03,
            0x00,
            1,
            "00000000000000000000000000000000
             00 | 01 6e | 01 73 | 00 | 00 | 00 | 00"
        )),
        DecodeError::Truncated {
            kind: Kind::Open,
            field: "credential",
        }
    );
    // The credential says 4 bytes, 2 follow.
    assert_eq!(
        decode_err(&raw(
            0x03,
            0x00,
            1,
            "00000000000000000000000000000000
             00 | 01 6e | 01 73 | 00 | 00 | 00 | 0004 dead"
        )),
        DecodeError::Truncated {
            kind: Kind::Open,
            field: "credential",
        }
    );
    // A credential longer than 8192 bytes.
    assert_eq!(
        decode_err(&raw(
            0x03,
            0x00,
            1,
            "00000000000000000000000000000000
             00 | 01 6e | 01 73 | 00 | 00 | 00 | 2001"
        )),
        DecodeError::TooLarge {
            kind: Kind::Open,
            len: 0x2001,
            max: 8192,
        }
    );
    // A byte after the last field.
    assert_eq!(
        decode_err(&raw(
            0x03,
            0x00,
            1,
            "00000000000000000000000000000000
             00 | 01 6e | 01 73 | 00 | 00 | 00 | 0000 | 00"
        )),
        DecodeError::BadLength {
            kind: Kind::Open,
            len: 1,
            expected: "no bytes after the last field",
        }
    );
}

#[test]
fn open_field_rules() {
    // An empty node name.
    assert_eq!(
        decode_err(&raw(
            0x03,
            0x00,
            1,
            "00000000000000000000000000000000
             00 | 00 | 01 73 | 00 | 00 | 00 | 0000"
        )),
        DecodeError::BadField {
            kind: Kind::Open,
            field: "node",
            problem: NameError::Empty,
        }
    );
    // A newline in the login would forge a log line.
    let err = decode_err(&raw(
        0x03,
        0x00,
        1,
        "00000000000000000000000000000000
         00 | 01 6e | 01 73 | 00 | 03 610a62 | 00 | 0000",
    ));
    assert!(
        matches!(
            err,
            DecodeError::BadField {
                kind: Kind::Open,
                field: "login",
                problem: NameError::BadChar { found: '\n', .. },
            }
        ),
        "{err:?}"
    );
    // Invalid UTF-8 in the client address.
    assert_eq!(
        decode_err(&raw(
            0x03,
            0x00,
            1,
            "00000000000000000000000000000000
             00 | 01 6e | 01 73 | 00 | 00 | 02 c328 | 0000"
        )),
        DecodeError::BadField {
            kind: Kind::Open,
            field: "client_addr",
            problem: NameError::NotUtf8,
        }
    );
}

#[test]
fn bad_node_name_charset_in_announce() {
    // "Web": names are lower case.
    let err = decode_err(&raw(0x02, 0x00, 0, "00 | 0001 | 03 576562 | 01 | 00 | 00"));
    assert!(
        matches!(
            err,
            DecodeError::BadField {
                kind: Kind::Announce,
                field: "node name",
                problem: NameError::BadChar { found: 'W', .. },
            }
        ),
        "{err:?}"
    );
    // "-a": a name starts with a letter or digit.
    let err = decode_err(&raw(0x02, 0x00, 0, "00 | 0001 | 02 2d61 | 01 | 00 | 00"));
    assert!(
        matches!(
            err,
            DecodeError::BadField {
                problem: NameError::BadChar { found: '-', .. },
                ..
            }
        ),
        "{err:?}"
    );
    // "a b": no spaces.
    let err = decode_err(&raw(0x02, 0x00, 0, "00 | 0001 | 03 612062 | 01 | 00 | 00"));
    assert!(
        matches!(
            err,
            DecodeError::BadField {
                problem: NameError::BadChar { found: ' ', .. },
                ..
            }
        ),
        "{err:?}"
    );
    // A 64-byte name.
    let bytes = raw(
        0x02,
        0x00,
        0,
        &format!("00 | 0001 | 40 {} | 01 | 00 | 00", "61".repeat(64)),
    );
    assert_eq!(
        decode_err(&bytes),
        DecodeError::BadField {
            kind: Kind::Announce,
            field: "node name",
            problem: NameError::TooLong { len: 64, max: 63 },
        }
    );
    // A label key with a space.
    let err = decode_err(&raw(
        0x02,
        0x00,
        0,
        "00 | 0001 | 01 61 | 01 | 01 | 02 6120 | 00 | 00",
    ));
    assert!(
        matches!(
            err,
            DecodeError::BadField {
                field: "label key",
                problem: NameError::BadChar { found: ' ', .. },
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn too_many_labels_services_nodes() {
    assert_eq!(
        decode_err(&raw(0x02, 0x00, 0, "00 | 0001 | 01 61 | 01 | 21 | 00")),
        DecodeError::TooMany {
            kind: Kind::Announce,
            what: "labels",
            count: 33,
            max: 32,
        }
    );
    assert_eq!(
        decode_err(&raw(0x02, 0x00, 0, "00 | 0001 | 01 61 | 01 | 00 | 11")),
        DecodeError::TooMany {
            kind: Kind::Announce,
            what: "services",
            count: 17,
            max: 16,
        }
    );
    assert_eq!(
        decode_err(&raw(0x02, 0x00, 0, "00 | 4e21")),
        DecodeError::TooMany {
            kind: Kind::Announce,
            what: "nodes",
            count: 20_001,
            max: 20_000,
        }
    );
    // A node count the payload cannot hold is refused before anything is allocated.
    assert_eq!(
        decode_err(&raw(0x02, 0x00, 0, "00 | 4e20")),
        DecodeError::Truncated {
            kind: Kind::Announce,
            field: "nodes",
        }
    );
}

#[test]
fn resume_wrong_length() {
    // One entry announced, 20 bytes follow instead of 21.
    assert_eq!(
        decode_err(&raw(
            0x0D,
            0x00,
            0,
            "00000000 | 0001
             00000001 | 0000000000000000 | 00000000000000"
        )),
        DecodeError::BadLength {
            kind: Kind::Resume,
            len: 25,
            expected: "6 + 21 per stream",
        }
    );
    // No entry announced, one follows.
    assert_eq!(
        decode_err(&raw(
            0x0D,
            0x00,
            0,
            "00000000 | 0000
             00000001 | 0000000000000000 | 0000000000000000 | 00"
        )),
        DecodeError::BadLength {
            kind: Kind::Resume,
            len: 27,
            expected: "6 + 21 per stream",
        }
    );
    // Shorter than the fixed part.
    assert_eq!(
        decode_err(&raw(0x0D, 0x00, 0, "000000")),
        DecodeError::Truncated {
            kind: Kind::Resume,
            field: "last_peer_stream",
        }
    );
    // An entry for stream 0.
    assert_eq!(
        decode_err(&raw(
            0x0D,
            0x00,
            0,
            "00000000 | 0001
             00000000 | 0000000000000000 | 0000000000000000 | 00"
        )),
        DecodeError::BadStream {
            kind: Kind::Resume,
            stream: 0,
            expected: "expected a stream id from 1 to 2^31-1",
        }
    );
}

#[test]
fn hello_shorter_than_38() {
    assert_eq!(
        decode_err(&hex("000025 | 01 | 00 | 00000000
             0001 | 0002 | 01 | 00 | a1b2c3d4 | 00100000 | 00004000 | 00000400
             000102030405060708090a0b0c0d0e")),
        DecodeError::BadLength {
            kind: Kind::Hello,
            len: 37,
            expected: "at least 38",
        }
    );
    assert_eq!(
        decode_err(&hex("000000 | 01 | 00 | 00000000")),
        DecodeError::BadLength {
            kind: Kind::Hello,
            len: 0,
            expected: "at least 38",
        }
    );
}

#[test]
fn bad_role() {
    for role in [0x00u8, 0x05, 0xFF] {
        let mut bytes = hex(HELLO);
        bytes[HEADER_LEN + 4] = role;
        assert_eq!(
            decode_err(&bytes),
            DecodeError::BadField {
                kind: Kind::Hello,
                field: "role",
                problem: NameError::BadChar {
                    found: char::from(role),
                    allowed: "1 agent, 2 proxy, 3 client, 4 cluster",
                },
            },
            "role byte {role:#04x}"
        );
    }
}

#[test]
fn reason_rules() {
    // A reason longer than 1024 bytes.
    assert_eq!(
        decode_err(&raw(0x0C, 0x00, 0, "0000 | 0401")),
        DecodeError::TooLarge {
            kind: Kind::GoAway,
            len: 1025,
            max: 1024,
        }
    );
    // A carriage return in a RESET reason.
    let err = decode_err(&raw(0x09, 0x00, 1, "0000 | 0003 610d62"));
    assert!(
        matches!(
            err,
            DecodeError::BadField {
                kind: Kind::Reset,
                field: "reason",
                problem: NameError::BadChar { found: '\r', .. },
            }
        ),
        "{err:?}"
    );
    // The reason length runs past the payload.
    assert_eq!(
        decode_err(&raw(0x05, 0x00, 1, "0000 | 0003 6162")),
        DecodeError::Truncated {
            kind: Kind::OpenFail,
            field: "reason",
        }
    );
    // OPEN_OK and FIN carry nothing.
    assert_eq!(
        decode_err(&raw(0x08, 0x00, 1, "00")),
        DecodeError::TooLarge {
            kind: Kind::Fin,
            len: 1,
            max: 0,
        }
    );
}

// ---- incomplete input --------------------------------------------------------------------

/// Every strict prefix of every golden vector is `Ok(None)` and leaves the buffer as it was.
#[test]
fn every_strict_prefix_is_incomplete_and_consumes_nothing() {
    let data_16k = {
        let mut v = hex("004000 | 06 | 00 | 00000009");
        v.extend(std::iter::repeat_n(0x5A, 0x4000));
        v
    };
    let vectors: Vec<Vec<u8>> = [
        HELLO,
        ANNOUNCE,
        OPEN,
        RESUME,
        "000000 | 04 | 00 | 00000002",
        "000010 | 05 | 00 | 00000003 | 0101 | 000c 6e6f6465206f66666c696e65",
        "000005 | 06 | 00 | 7fffffff | 68656c6c6f",
        "000004 | 07 | 00 | 00000005 | 00010000",
        "000000 | 08 | 00 | 00000006",
        "000019 | 09 | 00 | 00000009 | 0006 | 0015 757365722068756e67207570 09 286374726c2d6329",
        "000008 | 0a | 00 | 00000000 | 0123456789abcdef",
        "000008 | 0b | 00 | 00000000 | fedcba9876543210",
        "00000c | 0c | 00 | 00000000 | 0009 | 0008 647261696e696e67",
    ]
    .iter()
    .map(|v| hex(v))
    .chain([data_16k])
    .collect();
    for vector in vectors {
        let mut checked = 0;
        for end in 0..vector.len() {
            // The big DATA vector: every header prefix, then a sample of payload prefixes.
            if end > 64 && end % 1021 != 0 && end != vector.len() - 1 {
                continue;
            }
            let mut buf = BytesMut::from(&vector[..end]);
            let result = decode(&mut buf, &Limits::default());
            assert_eq!(
                result,
                Ok(None),
                "prefix of {end} of {} bytes of kind 0x{:02x}",
                vector.len(),
                vector[3]
            );
            assert_eq!(
                &buf[..],
                &vector[..end],
                "a prefix of {end} bytes was consumed"
            );
            checked += 1;
        }
        assert!(checked >= HEADER_LEN.min(vector.len()));
        // And the whole vector does decode.
        let mut buf = BytesMut::from(&vector[..]);
        assert!(decode(&mut buf, &Limits::default()).unwrap().is_some());
        assert!(buf.is_empty());
    }
}
