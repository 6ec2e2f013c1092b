//! What the proxy does with the bytes of a connection before it knows who sent them: the
//! line splitting of `tunnel::control::read_line` with its cap, on bytes arriving in chunks
//! of any size, then JSON parsing into each request type read before authentication (join,
//! cluster join, login; register and API lines come after a certificate, but are read the
//! same way), then the checks the proxy applies to them without state.
//!
//! Input layout (so that short inputs reach lines longer than the 64 KiB cap):
//!
//! | bytes | meaning                                                                  |
//! |-------|--------------------------------------------------------------------------|
//! | 0     | ≥ 128: insert `(b - 128) % 72` KiB of filler (0 to 71 KiB)               |
//! | 1     | where the filler goes: at `b * len / 256` of the rest                    |
//! | 2     | the filler byte (a space keeps a JSON line valid)                        |
//! | 3..7  | seed of the chunk sizes the bytes arrive in (1 byte to 70 KiB)           |
//! | 7..   | the bytes the peer sends                                                 |
//!
//! Invariants checked: no panic; every line taken is at most the cap plus its newline, ends
//! with its only newline, and the lines taken are exactly the start of the stream; a refusal
//! as too long comes only when more than the cap arrived without a newline; every request
//! that parses re-serializes to JSON that parses to the same request; a key the checks accept
//! re-encodes to exactly the bytes sent; a name they accept follows the naming rules; a
//! request's `Debug` (what a log line shows) never depends on its secret.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use serde::{Serialize, de::DeserializeOwned};
use tunnel::control::{
    ApiRequest, ClusterJoinRequest, ControlError, HostCertRequest, JoinRequest, LoginRequest,
    MAX_REQUEST_BYTES, RegisterRequest, from_hex, parse_line, take_line,
};

/// The cluster name the cluster-join check compares the leaf's name against.
const OWN_CLUSTER: &str = "root.example.com";

fuzz_target!(|data: &[u8]| {
    if data.len() < 7 {
        return;
    }
    let stream = build_stream(data);
    let mut sizes = ChunkSizes(u32::from_le_bytes([data[3], data[4], data[5], data[6]]) | 1);

    let mut buf = BytesMut::new();
    let mut scanned = 0;
    let mut taken = 0usize; // bytes of `stream` handed out as lines
    let mut fed = 0usize;
    'feed: while fed < stream.len() {
        let n = sizes.next().min(stream.len() - fed);
        buf.extend_from_slice(&stream[fed..fed + n]);
        fed += n;
        loop {
            match take_line(&mut buf, &mut scanned) {
                Ok(Some(line)) => {
                    assert!(
                        line.len() <= MAX_REQUEST_BYTES + 1,
                        "a line of {} bytes was accepted; the cap is {MAX_REQUEST_BYTES} plus the newline",
                        line.len()
                    );
                    assert_eq!(line.last(), Some(&b'\n'));
                    assert!(!line[..line.len() - 1].contains(&b'\n'));
                    assert_eq!(&line[..], &stream[taken..taken + line.len()]);
                    taken += line.len();
                    check_line(&line);
                }
                Ok(None) => {
                    assert!(buf.len() <= MAX_REQUEST_BYTES);
                    assert!(!buf.contains(&b'\n'));
                    break;
                }
                Err(ControlError::TooLong) => {
                    assert!(buf.len() > MAX_REQUEST_BYTES);
                    assert!(!buf[..=MAX_REQUEST_BYTES].contains(&b'\n'));
                    break 'feed;
                }
                Err(e) => panic!("take_line failed with {e}"),
            }
        }
    }
    // What stays in the buffer is the unread rest of the stream.
    assert_eq!(&buf[..], &stream[taken..fed]);
});

/// The bytes the peer sends: the input after the header, with the filler inserted.
fn build_stream(data: &[u8]) -> Vec<u8> {
    let rest = &data[7..];
    if data[0] < 128 {
        return rest.to_vec();
    }
    let filler = usize::from((data[0] - 128) % 72) * 1024;
    let at = usize::from(data[1]) * rest.len() / 256;
    let mut stream = Vec::with_capacity(rest.len() + filler);
    stream.extend_from_slice(&rest[..at]);
    stream.resize(at + filler, data[2]);
    stream.extend_from_slice(&rest[at..]);
    stream
}

/// Sizes of the reads the bytes arrive in: mostly small, sometimes a TLS record, sometimes
/// more than the cap at once (a read returns all the plaintext that is available).
struct ChunkSizes(u32);

impl ChunkSizes {
    fn next(&mut self) -> usize {
        // xorshift32
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.0 = x;
        let n = (x >> 8) as usize;
        match x & 3 {
            0 | 1 => 1 + n % 64,
            2 => 1 + n % 16_384,
            _ => 1 + n % 70_000,
        }
    }
}

fn check_line(line: &[u8]) {
    if let Some(request) = parse::<JoinRequest>(line) {
        let mut blank = request.clone();
        blank.token = String::new();
        assert_eq!(format!("{request:?}"), format!("{blank:?}"));
        assert_eq!(request.redacted(), blank.redacted());
        match proxy::server::checks::check_join(&request) {
            Ok(key) => {
                name_follows_the_rules(&request.node);
                key_is_what_was_sent(&key, &request.public_key);
            }
            Err(body) => refusal_is_readable(&body),
        }
    }
    if let Some(request) = parse::<ClusterJoinRequest>(line) {
        let mut blank = request.clone();
        blank.token = String::new();
        assert_eq!(format!("{request:?}"), format!("{blank:?}"));
        match proxy::server::checks::check_cluster_join(OWN_CLUSTER, &request) {
            Ok((certificates, key)) => {
                assert!(!certificates.is_empty());
                assert_ne!(request.cluster, OWN_CLUSTER);
                key_is_what_was_sent(&key, &request.public_key);
            }
            Err(body) => refusal_is_readable(&body),
        }
        // The leaf's host CA goes into users' known_hosts: one line or a refusal.
        if let Some(ca) = &request.ssh_host_ca {
            match proxy::server::checks::check_ssh_host_ca(ca) {
                Ok(line) => assert!(!line.chars().any(char::is_control)),
                Err(body) => refusal_is_readable(&body),
            }
        }
    }
    if let Some(request) = parse::<HostCertRequest>(line) {
        drop(format!("{request:?}"));
    }
    if let Some(request) = parse::<LoginRequest>(line) {
        let mut blank = request.clone();
        blank.password = String::new();
        assert_eq!(format!("{request:?}"), format!("{blank:?}"));
        match proxy::server::checks::public_key(&request.public_key) {
            Ok(key) => key_is_what_was_sent(&key, &request.public_key),
            Err(body) => refusal_is_readable(&body),
        }
    }
    if let Some(request) = parse::<RegisterRequest>(line) {
        match proxy::server::checks::check_register(&request) {
            Ok((address, labels, ttl)) => {
                drop(address.to_string());
                assert!(labels.len() <= request.labels.len());
                assert!(ttl.as_secs() >= 1);
            }
            Err(body) => refusal_is_readable(&body),
        }
    }
    if let Some(request) = parse::<ApiRequest>(line) {
        drop(format!("{request:?}"));
    }
}

/// Parses a line as the proxy does; a request that parses survives a round trip through its
/// own JSON.
fn parse<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(line: &[u8]) -> Option<T> {
    let request: T = parse_line(line).ok()?;
    let json = serde_json::to_vec(&request).expect("a parsed request serializes");
    let again: T = parse_line(&json).expect("a re-serialized request parses");
    assert!(again == request, "round trip changed the request");
    Some(request)
}

fn name_follows_the_rules(name: &str) {
    assert!(!name.is_empty() && name.len() <= tunnel::identity::MAX_NAME_LEN);
    assert!(!name.starts_with(['.', '-']));
    assert!(
        name.bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'))
    );
}

fn key_is_what_was_sent(key: &tunnel::identity::PublicKey, hex: &str) {
    let sent = from_hex(hex).expect("an accepted key is hex");
    assert_eq!(key.to_spki_der(), sent);
}

fn refusal_is_readable(body: &tunnel::control::ErrorBody) {
    assert!(!body.code.is_empty() && !body.message.is_empty());
}
