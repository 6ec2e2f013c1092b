//! The v1 wire format: a 9-byte header, then a payload whose layout depends on the kind.
//!
//! ```text
//!  0               1               2               3
//! +---------------+---------------+---------------+---------------+
//! |                 payload length (u24, BE)      |     kind      |
//! +---------------+---------------+---------------+---------------+
//! |     flags     |R|              stream id (u31, BE) ...        |
//! +---------------+---------------+---------------+---------------+
//! |  ... stream   |  payload ...
//! +---------------+
//! ```
//!
//! Decoding checks the header first, so a peer can never make us buffer more than the limit
//! for the frame's kind; payloads come out as [`Bytes`] views of the input buffer. Encoding
//! writes into any [`BufMut`]; DATA payloads can be sent without copying via
//! [`encode_header`]. Every layout is written down byte by byte in `docs/protocol.md`.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{DecodeError, ErrorCode, NameError};

/// Bytes in every frame header.
pub const HEADER_LEN: usize = 9;
/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 0x0001;
/// Highest stream id: the top bit of the field is reserved.
pub const MAX_STREAM_ID: u32 = 0x7FFF_FFFF;
/// Largest DATA payload any peer may ask for. 64 KiB keeps one frame well under a TLS
/// record's worth of latency for the other streams of the tunnel.
pub const MAX_DATA_PAYLOAD: usize = 0x1_0000;
/// Largest ANNOUNCE any receiver accepts, whatever its configuration (4 MiB): a leaf
/// cluster's inventory of 20,000 nodes fits; a hostile one cannot exhaust memory.
pub const MAX_ANNOUNCE_PAYLOAD: usize = 0x40_0000;
/// Longest name (node, cluster, service, user, label key): a DNS label's length.
pub const MAX_NAME_LEN: usize = 63;
/// Longest label value or free text field (login, client address).
pub const MAX_TEXT_LEN: usize = 255;
/// Longest reason text in OPEN_FAIL, RESET and GOAWAY.
pub const MAX_REASON_LEN: usize = 1024;
/// Longest credential (a user's DER certificate passed to a leaf cluster).
pub const MAX_CREDENTIAL_LEN: usize = 8192;
/// Labels per node in ANNOUNCE.
pub const MAX_LABELS: usize = 32;
/// Services per node in ANNOUNCE.
pub const MAX_SERVICES: usize = 16;
/// Nodes in one ANNOUNCE.
pub const MAX_ANNOUNCE_NODES: usize = 20_000;
/// Entries in one RESUME (its count is a u16): the most streams a session ever holds.
pub const MAX_RESUME_STREAMS: usize = 0xFFFF;
/// Bytes of a HELLO payload in v1; later versions may append fields, so up to
/// [`MAX_HELLO_PAYLOAD`] is accepted and the tail ignored.
pub const HELLO_LEN: usize = 38;
/// Largest HELLO payload accepted.
pub const MAX_HELLO_PAYLOAD: usize = 256;
/// HELLO flag: the sender is reattaching a session it already had with this peer.
pub const FLAG_RESUMING: u8 = 0x01;
const RESUME_ENTRY_LEN: usize = 21;
const RESUME_FIN_RECEIVED: u8 = 0x01;
const RESUME_ACCEPTED: u8 = 0x02;
const NODE_ONLINE: u8 = 0x01;
const NODE_TUNNEL: u8 = 0x02;

/// The frame kinds of v1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Version, role, limits; first frame each way.
    Hello = 0x01,
    /// The sender's inventory of nodes.
    Announce = 0x02,
    /// Open a stream to a target.
    Open = 0x03,
    /// The stream is open.
    OpenOk = 0x04,
    /// The stream could not be opened.
    OpenFail = 0x05,
    /// Stream bytes.
    Data = 0x06,
    /// Credit and acknowledgement.
    Window = 0x07,
    /// Half-close: the sender sends no more bytes on the stream.
    Fin = 0x08,
    /// Abort a stream.
    Reset = 0x09,
    /// Liveness probe.
    Ping = 0x0A,
    /// Answer to PING.
    Pong = 0x0B,
    /// The sender drains: no new streams.
    GoAway = 0x0C,
    /// Streams that survive a reconnect and what was received of each.
    Resume = 0x0D,
}

impl Kind {
    /// The kind for a wire byte.
    pub fn from_u8(byte: u8) -> Option<Kind> {
        Some(match byte {
            0x01 => Kind::Hello,
            0x02 => Kind::Announce,
            0x03 => Kind::Open,
            0x04 => Kind::OpenOk,
            0x05 => Kind::OpenFail,
            0x06 => Kind::Data,
            0x07 => Kind::Window,
            0x08 => Kind::Fin,
            0x09 => Kind::Reset,
            0x0A => Kind::Ping,
            0x0B => Kind::Pong,
            0x0C => Kind::GoAway,
            0x0D => Kind::Resume,
            _ => return None,
        })
    }

    /// Whether frames of this kind name a stream (id > 0) or the connection (id 0).
    pub fn is_stream_frame(self) -> bool {
        matches!(
            self,
            Kind::Open
                | Kind::OpenOk
                | Kind::OpenFail
                | Kind::Data
                | Kind::Window
                | Kind::Fin
                | Kind::Reset
        )
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Hello => "HELLO",
            Kind::Announce => "ANNOUNCE",
            Kind::Open => "OPEN",
            Kind::OpenOk => "OPEN_OK",
            Kind::OpenFail => "OPEN_FAIL",
            Kind::Data => "DATA",
            Kind::Window => "WINDOW",
            Kind::Fin => "FIN",
            Kind::Reset => "RESET",
            Kind::Ping => "PING",
            Kind::Pong => "PONG",
            Kind::GoAway => "GOAWAY",
            Kind::Resume => "RESUME",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the sender of a HELLO is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Role {
    /// An edge agent holding a reverse tunnel.
    Agent = 0x01,
    /// A proxy.
    Proxy = 0x02,
    /// A user's `remoteler` command.
    Client = 0x03,
    /// A leaf cluster's proxy holding a reverse tunnel into a root.
    Cluster = 0x04,
}

impl Role {
    fn from_u8(byte: u8) -> Option<Role> {
        Some(match byte {
            0x01 => Role::Agent,
            0x02 => Role::Proxy,
            0x03 => Role::Client,
            0x04 => Role::Cluster,
            _ => return None,
        })
    }
}

/// Limits the receiver applies while decoding; each caps memory a peer can make us hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest DATA payload accepted (the `max_frame` we announce in HELLO).
    pub max_data: usize,
    /// Largest ANNOUNCE payload accepted.
    pub max_announce: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_data: 0x4000,
            max_announce: 0x10_0000,
        }
    }
}

impl Limits {
    /// The largest payload accepted for a kind; checked before the payload is buffered.
    pub fn max_payload(&self, kind: Kind) -> usize {
        match kind {
            Kind::Hello => MAX_HELLO_PAYLOAD,
            Kind::Announce => self.max_announce.min(MAX_ANNOUNCE_PAYLOAD),
            Kind::Open => 16 + 6 * (1 + MAX_TEXT_LEN) + 2 + MAX_CREDENTIAL_LEN,
            Kind::OpenOk | Kind::Fin => 0,
            Kind::OpenFail | Kind::Reset | Kind::GoAway => 2 + 2 + MAX_REASON_LEN,
            Kind::Data => self.max_data.min(MAX_DATA_PAYLOAD),
            Kind::Window => 4,
            Kind::Ping | Kind::Pong => 8,
            Kind::Resume => 4 + 2 + RESUME_ENTRY_LEN * MAX_RESUME_STREAMS,
        }
    }
}

/// HELLO: the first frame each way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Lowest protocol version the sender speaks.
    pub version_min: u16,
    /// Highest protocol version the sender speaks.
    pub version_max: u16,
    /// What the sender is.
    pub role: Role,
    /// Capability bits; none are defined in v1 and unknown bits are ignored.
    pub capabilities: u32,
    /// Credit the sender grants each new stream, in bytes.
    pub initial_window: u32,
    /// Largest DATA payload the sender accepts.
    pub max_frame: u32,
    /// Streams the sender lets the receiver hold open at once.
    pub max_streams: u32,
    /// The sender's session id: it names the session across reconnects.
    pub session_id: [u8; 16],
    /// The sender is reattaching the session `session_id` (flag `RESUMING`).
    pub resuming: bool,
}

/// One node in an inventory.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct NodeInfo {
    /// The node's name, unique in its cluster.
    pub name: String,
    /// Whether the node can be reached now.
    pub online: bool,
    /// Whether the announcing side reaches it through a tunnel (else directly).
    pub tunnel: bool,
    /// Labels, key and value.
    pub labels: Vec<(String, String)>,
    /// Services the node forwards to (e.g. `ssh`).
    pub services: Vec<String>,
}

/// ANNOUNCE: the sender's inventory, sent on connect and on change; it replaces the last one.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Announce {
    /// The cluster the nodes belong to; empty for an agent (the receiver's own cluster).
    pub cluster: String,
    /// The nodes.
    pub nodes: Vec<NodeInfo>,
}

impl Announce {
    /// Bytes of the ANNOUNCE payload this inventory encodes to.
    pub fn encoded_len(&self) -> usize {
        let node_len = |n: &NodeInfo| {
            1 + n.name.len()
                + 1
                + 1
                + n.labels
                    .iter()
                    .map(|(k, v)| 2 + k.len() + v.len())
                    .sum::<usize>()
                + 1
                + n.services.iter().map(|s| 1 + s.len()).sum::<usize>()
        };
        1 + self.cluster.len() + 2 + self.nodes.iter().map(node_len).sum::<usize>()
    }
}

/// OPEN: what the opener wants the stream connected to, and on whose behalf.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Open {
    /// Session id for the audit logs of every cluster the stream crosses.
    pub session_id: [u8; 16],
    /// Target cluster; empty for the receiver's own.
    pub cluster: String,
    /// Target node.
    pub node: String,
    /// Target service on the node (e.g. `ssh`).
    pub service: String,
    /// The user on whose behalf the stream is opened (empty between agent and proxy only).
    pub user: String,
    /// The login the user asked for, when known.
    pub login: String,
    /// The user's address as the first proxy saw it.
    pub client_addr: String,
    /// The user's certificate (DER) when a root passes a stream to a leaf; else empty.
    pub credential: Bytes,
}

/// One stream in RESUME.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResumeStream {
    /// The stream.
    pub stream: u32,
    /// Bytes of the stream the sender has received: the receiver resends from here.
    pub received: u64,
    /// The credit limit the sender grants (absolute offset), replacing any WINDOW lost.
    pub credit_limit: u64,
    /// The sender has received the receiver's FIN.
    pub fin_received: bool,
    /// The sender accepted the receiver's OPEN (for streams the receiver opened).
    pub accepted: bool,
}

/// RESUME: sent by each side after HELLOs that both say RESUMING with the known session ids.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Resume {
    /// The highest stream id opened by the receiver that the sender has seen.
    pub last_peer_stream: u32,
    /// Every stream the sender still holds.
    pub streams: Vec<ResumeStream>,
}

/// A decoded frame. DATA payloads are views of the decode buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Frame {
    Hello(Hello),
    Announce(Announce),
    Open {
        stream: u32,
        open: Open,
    },
    OpenOk {
        stream: u32,
    },
    OpenFail {
        stream: u32,
        code: ErrorCode,
        reason: String,
    },
    Data {
        stream: u32,
        payload: Bytes,
    },
    Window {
        stream: u32,
        increment: u32,
    },
    Fin {
        stream: u32,
    },
    Reset {
        stream: u32,
        code: ErrorCode,
        reason: String,
    },
    Ping {
        opaque: u64,
    },
    Pong {
        opaque: u64,
    },
    GoAway {
        code: ErrorCode,
        reason: String,
    },
    Resume(Resume),
}

impl Frame {
    /// The frame's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Frame::Hello(_) => Kind::Hello,
            Frame::Announce(_) => Kind::Announce,
            Frame::Open { .. } => Kind::Open,
            Frame::OpenOk { .. } => Kind::OpenOk,
            Frame::OpenFail { .. } => Kind::OpenFail,
            Frame::Data { .. } => Kind::Data,
            Frame::Window { .. } => Kind::Window,
            Frame::Fin { .. } => Kind::Fin,
            Frame::Reset { .. } => Kind::Reset,
            Frame::Ping { .. } => Kind::Ping,
            Frame::Pong { .. } => Kind::Pong,
            Frame::GoAway { .. } => Kind::GoAway,
            Frame::Resume(_) => Kind::Resume,
        }
    }

    /// The stream the frame belongs to; 0 for connection frames.
    pub fn stream(&self) -> u32 {
        match *self {
            Frame::Open { stream, .. }
            | Frame::OpenOk { stream }
            | Frame::OpenFail { stream, .. }
            | Frame::Data { stream, .. }
            | Frame::Window { stream, .. }
            | Frame::Fin { stream }
            | Frame::Reset { stream, .. } => stream,
            _ => 0,
        }
    }

    fn flags(&self) -> u8 {
        match self {
            Frame::Hello(h) if h.resuming => FLAG_RESUMING,
            _ => 0,
        }
    }

    /// Bytes of payload this frame encodes to.
    pub fn payload_len(&self) -> usize {
        match self {
            Frame::Hello(_) => HELLO_LEN,
            Frame::Announce(a) => a.encoded_len(),
            Frame::Open { open, .. } => {
                16 + [
                    &open.cluster,
                    &open.node,
                    &open.service,
                    &open.user,
                    &open.login,
                    &open.client_addr,
                ]
                .iter()
                .map(|s| 1 + s.len())
                .sum::<usize>()
                    + 2
                    + open.credential.len()
            }
            Frame::OpenOk { .. } | Frame::Fin { .. } => 0,
            Frame::OpenFail { reason, .. }
            | Frame::Reset { reason, .. }
            | Frame::GoAway { reason, .. } => 4 + reason.len(),
            Frame::Data { payload, .. } => payload.len(),
            Frame::Window { .. } => 4,
            Frame::Ping { .. } | Frame::Pong { .. } => 8,
            Frame::Resume(r) => 6 + RESUME_ENTRY_LEN * r.streams.len(),
        }
    }

    /// Encodes header and payload into `dst` (copying a DATA payload; see [`encode_header`]
    /// for the zero-copy path). The frame's fields must respect this module's limits: the
    /// session validates everything the application hands it before it becomes a frame.
    pub fn encode(&self, dst: &mut impl BufMut) {
        encode_header(
            self.kind(),
            self.flags(),
            self.stream(),
            self.payload_len(),
            dst,
        );
        match self {
            Frame::Hello(h) => {
                dst.put_u16(h.version_min);
                dst.put_u16(h.version_max);
                dst.put_u8(h.role as u8);
                dst.put_u8(0);
                dst.put_u32(h.capabilities);
                dst.put_u32(h.initial_window);
                dst.put_u32(h.max_frame);
                dst.put_u32(h.max_streams);
                dst.put_slice(&h.session_id);
            }
            Frame::Announce(a) => {
                put_str8(dst, &a.cluster);
                dst.put_u16(a.nodes.len() as u16);
                for node in &a.nodes {
                    put_str8(dst, &node.name);
                    let mut flags = 0;
                    if node.online {
                        flags |= NODE_ONLINE;
                    }
                    if node.tunnel {
                        flags |= NODE_TUNNEL;
                    }
                    dst.put_u8(flags);
                    dst.put_u8(node.labels.len() as u8);
                    for (key, value) in &node.labels {
                        put_str8(dst, key);
                        put_str8(dst, value);
                    }
                    dst.put_u8(node.services.len() as u8);
                    for service in &node.services {
                        put_str8(dst, service);
                    }
                }
            }
            Frame::Open { open, .. } => {
                dst.put_slice(&open.session_id);
                for field in [
                    &open.cluster,
                    &open.node,
                    &open.service,
                    &open.user,
                    &open.login,
                    &open.client_addr,
                ] {
                    put_str8(dst, field);
                }
                dst.put_u16(open.credential.len() as u16);
                dst.put_slice(&open.credential);
            }
            Frame::OpenOk { .. } | Frame::Fin { .. } => {}
            Frame::OpenFail { code, reason, .. }
            | Frame::Reset { code, reason, .. }
            | Frame::GoAway { code, reason } => {
                dst.put_u16(code.0);
                dst.put_u16(reason.len() as u16);
                dst.put_slice(reason.as_bytes());
            }
            Frame::Data { payload, .. } => dst.put_slice(payload),
            Frame::Window { increment, .. } => dst.put_u32(*increment),
            Frame::Ping { opaque } | Frame::Pong { opaque } => dst.put_u64(*opaque),
            Frame::Resume(r) => {
                dst.put_u32(r.last_peer_stream);
                dst.put_u16(r.streams.len() as u16);
                for entry in &r.streams {
                    dst.put_u32(entry.stream);
                    dst.put_u64(entry.received);
                    dst.put_u64(entry.credit_limit);
                    let mut flags = 0;
                    if entry.fin_received {
                        flags |= RESUME_FIN_RECEIVED;
                    }
                    if entry.accepted {
                        flags |= RESUME_ACCEPTED;
                    }
                    dst.put_u8(flags);
                }
            }
        }
    }

    /// Encodes into a fresh buffer; convenient for control frames and tests.
    pub fn to_bytes(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(HEADER_LEN + self.payload_len());
        self.encode(&mut buf);
        buf.freeze()
    }
}

/// Writes a frame header. With it a DATA frame goes out as header + the payload `Bytes`
/// the application handed in, never copied before TLS.
pub fn encode_header(kind: Kind, flags: u8, stream: u32, len: usize, dst: &mut impl BufMut) {
    debug_assert!(
        len < 1 << 24,
        "payload length {len} does not fit the u24 length field"
    );
    debug_assert!(stream <= MAX_STREAM_ID);
    dst.put_uint(len as u64, 3);
    dst.put_u8(kind as u8);
    dst.put_u8(flags);
    dst.put_u32(stream);
}

/// Decodes one frame from the front of `buf`.
///
/// Returns `Ok(None)` while the frame is incomplete (nothing is consumed), `Ok(Some(frame))`
/// after removing exactly that frame's bytes, and `Err` when the bytes can never form a
/// valid frame; the connection must then be closed. The header is checked before the
/// payload is awaited, so an over-long frame fails as soon as its header arrives.
pub fn decode(buf: &mut BytesMut, limits: &Limits) -> Result<Option<Frame>, DecodeError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
    let kind = Kind::from_u8(buf[3]).ok_or(DecodeError::UnknownKind(buf[3]))?;
    let flags = buf[4];
    let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]);

    let max = limits.max_payload(kind);
    if len > max {
        return Err(DecodeError::TooLarge { kind, len, max });
    }
    let allowed_flags = if kind == Kind::Hello {
        FLAG_RESUMING
    } else {
        0
    };
    if flags & !allowed_flags != 0 {
        return Err(DecodeError::BadFlags { kind, flags });
    }
    if kind.is_stream_frame() {
        if stream == 0 || stream > MAX_STREAM_ID {
            return Err(DecodeError::BadStream {
                kind,
                stream,
                expected: "expected a stream id from 1 to 2^31-1",
            });
        }
    } else if stream != 0 {
        return Err(DecodeError::BadStream {
            kind,
            stream,
            expected: "expected stream 0",
        });
    }
    if buf.len() < HEADER_LEN + len {
        buf.reserve(HEADER_LEN + len - buf.len());
        return Ok(None);
    }
    buf.advance(HEADER_LEN);
    let payload = buf.split_to(len).freeze();
    decode_payload(kind, flags, stream, payload).map(Some)
}

fn decode_payload(
    kind: Kind,
    flags: u8,
    stream: u32,
    payload: Bytes,
) -> Result<Frame, DecodeError> {
    let exact = |expected_len: usize, expected: &'static str| {
        if payload.len() == expected_len {
            Ok(())
        } else {
            Err(DecodeError::BadLength {
                kind,
                len: payload.len(),
                expected,
            })
        }
    };
    Ok(match kind {
        Kind::Data => Frame::Data { stream, payload },
        Kind::OpenOk => {
            exact(0, "0")?;
            Frame::OpenOk { stream }
        }
        Kind::Fin => {
            exact(0, "0")?;
            Frame::Fin { stream }
        }
        Kind::Window => {
            exact(4, "4")?;
            let increment = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
            if increment == 0 {
                return Err(DecodeError::ZeroWindow(stream));
            }
            Frame::Window { stream, increment }
        }
        Kind::Ping | Kind::Pong => {
            exact(8, "8")?;
            let mut p = payload;
            let opaque = p.get_u64();
            if kind == Kind::Ping {
                Frame::Ping { opaque }
            } else {
                Frame::Pong { opaque }
            }
        }
        Kind::Hello => {
            if payload.len() < HELLO_LEN {
                return Err(DecodeError::BadLength {
                    kind,
                    len: payload.len(),
                    expected: "at least 38",
                });
            }
            let mut p = payload;
            let version_min = p.get_u16();
            let version_max = p.get_u16();
            let role_byte = p.get_u8();
            let role = Role::from_u8(role_byte).ok_or(DecodeError::BadField {
                kind,
                field: "role",
                problem: NameError::BadChar {
                    found: char::from(role_byte),
                    allowed: "1 agent, 2 proxy, 3 client, 4 cluster",
                },
            })?;
            let _reserved = p.get_u8();
            let capabilities = p.get_u32();
            let initial_window = p.get_u32();
            let max_frame = p.get_u32();
            let max_streams = p.get_u32();
            let mut session_id = [0u8; 16];
            p.copy_to_slice(&mut session_id);
            Frame::Hello(Hello {
                version_min,
                version_max,
                role,
                capabilities,
                initial_window,
                max_frame,
                max_streams,
                session_id,
                resuming: flags & FLAG_RESUMING != 0,
            })
        }
        Kind::OpenFail | Kind::Reset | Kind::GoAway => {
            let mut r = Reader { kind, buf: payload };
            let code = ErrorCode(r.u16("code")?);
            let reason = r.str16("reason", MAX_REASON_LEN)?;
            r.finish()?;
            match kind {
                Kind::OpenFail => Frame::OpenFail {
                    stream,
                    code,
                    reason,
                },
                Kind::Reset => Frame::Reset {
                    stream,
                    code,
                    reason,
                },
                _ => Frame::GoAway { code, reason },
            }
        }
        Kind::Open => {
            let mut r = Reader { kind, buf: payload };
            let mut session_id = [0u8; 16];
            r.need(16, "session_id")?;
            r.buf.copy_to_slice(&mut session_id);
            let cluster = r.name("cluster", true)?;
            let node = r.name("node", false)?;
            let service = r.name("service", false)?;
            let user = r.name("user", true)?;
            let login = r.text("login")?;
            let client_addr = r.text("client_addr")?;
            let credential_len = usize::from(r.u16("credential")?);
            if credential_len > MAX_CREDENTIAL_LEN {
                return Err(DecodeError::TooLarge {
                    kind,
                    len: credential_len,
                    max: MAX_CREDENTIAL_LEN,
                });
            }
            r.need(credential_len, "credential")?;
            let credential = r.buf.split_to(credential_len);
            r.finish()?;
            Frame::Open {
                stream,
                open: Open {
                    session_id,
                    cluster,
                    node,
                    service,
                    user,
                    login,
                    client_addr,
                    credential,
                },
            }
        }
        Kind::Announce => {
            let mut r = Reader { kind, buf: payload };
            let cluster = r.name("cluster", true)?;
            let count = usize::from(r.u16("node count")?);
            if count > MAX_ANNOUNCE_NODES {
                return Err(DecodeError::TooMany {
                    kind,
                    what: "nodes",
                    count,
                    max: MAX_ANNOUNCE_NODES,
                });
            }
            // Each node takes at least 4 bytes: refuse counts the payload cannot hold before
            // allocating for them.
            if count * 4 > r.buf.remaining() {
                return Err(DecodeError::Truncated {
                    kind,
                    field: "nodes",
                });
            }
            let mut nodes = Vec::with_capacity(count);
            for _ in 0..count {
                let name = r.name("node name", false)?;
                let flags = r.u8("node flags")?;
                let label_count = usize::from(r.u8("label count")?);
                if label_count > MAX_LABELS {
                    return Err(DecodeError::TooMany {
                        kind,
                        what: "labels",
                        count: label_count,
                        max: MAX_LABELS,
                    });
                }
                let mut labels = Vec::with_capacity(label_count);
                for _ in 0..label_count {
                    let key = r.str8("label key")?;
                    validate_label_key(&key).map_err(|problem| DecodeError::BadField {
                        kind,
                        field: "label key",
                        problem,
                    })?;
                    let value = r.str8("label value")?;
                    validate_text(&value).map_err(|problem| DecodeError::BadField {
                        kind,
                        field: "label value",
                        problem,
                    })?;
                    labels.push((key, value));
                }
                let service_count = usize::from(r.u8("service count")?);
                if service_count > MAX_SERVICES {
                    return Err(DecodeError::TooMany {
                        kind,
                        what: "services",
                        count: service_count,
                        max: MAX_SERVICES,
                    });
                }
                let mut services = Vec::with_capacity(service_count);
                for _ in 0..service_count {
                    services.push(r.name("service", false)?);
                }
                nodes.push(NodeInfo {
                    name,
                    online: flags & NODE_ONLINE != 0,
                    tunnel: flags & NODE_TUNNEL != 0,
                    labels,
                    services,
                });
            }
            r.finish()?;
            Frame::Announce(Announce { cluster, nodes })
        }
        Kind::Resume => {
            let mut r = Reader { kind, buf: payload };
            let last_peer_stream = r.u32("last_peer_stream")?;
            let count = usize::from(r.u16("stream count")?);
            if r.buf.remaining() != count * RESUME_ENTRY_LEN {
                return Err(DecodeError::BadLength {
                    kind,
                    len: r.buf.remaining() + 6,
                    expected: "6 + 21 per stream",
                });
            }
            let mut streams = Vec::with_capacity(count);
            for _ in 0..count {
                let stream = r.buf.get_u32();
                if stream == 0 || stream > MAX_STREAM_ID {
                    return Err(DecodeError::BadStream {
                        kind,
                        stream,
                        expected: "expected a stream id from 1 to 2^31-1",
                    });
                }
                let received = r.buf.get_u64();
                let credit_limit = r.buf.get_u64();
                let flags = r.buf.get_u8();
                if flags & !(RESUME_FIN_RECEIVED | RESUME_ACCEPTED) != 0 {
                    return Err(DecodeError::BadFlags { kind, flags });
                }
                streams.push(ResumeStream {
                    stream,
                    received,
                    credit_limit,
                    fin_received: flags & RESUME_FIN_RECEIVED != 0,
                    accepted: flags & RESUME_ACCEPTED != 0,
                });
            }
            Frame::Resume(Resume {
                last_peer_stream,
                streams,
            })
        }
    })
}

/// Checks a name (node, cluster, service, user): 1 to 63 bytes of `a-z 0-9 . _ -`, starting
/// with a letter or digit. Names reach logs, audit records and ssh_config host patterns, so
/// they are kept to a charset that is safe in all three.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    let first = name.chars().next().ok_or(NameError::Empty)?;
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong {
            len: name.len(),
            max: MAX_NAME_LEN,
        });
    }
    const ALLOWED: &str = "a-z 0-9 . _ - (starting with a letter or digit)";
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return Err(NameError::BadChar {
            found: first,
            allowed: ALLOWED,
        });
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')))
    {
        Some(found) => Err(NameError::BadChar {
            found,
            allowed: ALLOWED,
        }),
        None => Ok(()),
    }
}

/// Checks a label key: 1 to 63 bytes of `A-Z a-z 0-9 . _ - /`.
pub fn validate_label_key(key: &str) -> Result<(), NameError> {
    if key.is_empty() {
        return Err(NameError::Empty);
    }
    if key.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong {
            len: key.len(),
            max: MAX_NAME_LEN,
        });
    }
    match key
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/')))
    {
        Some(found) => Err(NameError::BadChar {
            found,
            allowed: "A-Z a-z 0-9 . _ - /",
        }),
        None => Ok(()),
    }
}

/// Checks free text (label value, login, client address): up to 255 bytes, no control
/// characters, so it cannot forge lines in a log.
pub fn validate_text(text: &str) -> Result<(), NameError> {
    if text.len() > MAX_TEXT_LEN {
        return Err(NameError::TooLong {
            len: text.len(),
            max: MAX_TEXT_LEN,
        });
    }
    match text.chars().find(|c| c.is_control()) {
        Some(found) => Err(NameError::BadChar {
            found,
            allowed: "printable characters",
        }),
        None => Ok(()),
    }
}

fn put_str8(dst: &mut impl BufMut, s: &str) {
    debug_assert!(s.len() <= 255);
    dst.put_u8(s.len() as u8);
    dst.put_slice(s.as_bytes());
}

/// A cursor over a payload that turns every short read into a `Truncated` error.
struct Reader {
    kind: Kind,
    buf: Bytes,
}

impl Reader {
    fn need(&self, n: usize, field: &'static str) -> Result<(), DecodeError> {
        if self.buf.remaining() < n {
            Err(DecodeError::Truncated {
                kind: self.kind,
                field,
            })
        } else {
            Ok(())
        }
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        self.need(1, field)?;
        Ok(self.buf.get_u8())
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        self.need(2, field)?;
        Ok(self.buf.get_u16())
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        self.need(4, field)?;
        Ok(self.buf.get_u32())
    }

    fn utf8(&mut self, len: usize, field: &'static str) -> Result<String, DecodeError> {
        self.need(len, field)?;
        let bytes = self.buf.split_to(len);
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::BadField {
            kind: self.kind,
            field,
            problem: NameError::NotUtf8,
        })
    }

    fn str8(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let len = usize::from(self.u8(field)?);
        self.utf8(len, field)
    }

    fn str16(&mut self, field: &'static str, max: usize) -> Result<String, DecodeError> {
        let len = usize::from(self.u16(field)?);
        if len > max {
            return Err(DecodeError::TooLarge {
                kind: self.kind,
                len,
                max,
            });
        }
        let text = self.utf8(len, field)?;
        validate_reason(&text).map_err(|problem| DecodeError::BadField {
            kind: self.kind,
            field,
            problem,
        })?;
        Ok(text)
    }

    fn name(&mut self, field: &'static str, may_be_empty: bool) -> Result<String, DecodeError> {
        let name = self.str8(field)?;
        if may_be_empty && name.is_empty() {
            return Ok(name);
        }
        validate_name(&name).map_err(|problem| DecodeError::BadField {
            kind: self.kind,
            field,
            problem,
        })?;
        Ok(name)
    }

    fn text(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let text = self.str8(field)?;
        validate_text(&text).map_err(|problem| DecodeError::BadField {
            kind: self.kind,
            field,
            problem,
        })?;
        Ok(text)
    }

    fn finish(&self) -> Result<(), DecodeError> {
        if self.buf.has_remaining() {
            Err(DecodeError::BadLength {
                kind: self.kind,
                len: self.buf.remaining(),
                expected: "no bytes after the last field",
            })
        } else {
            Ok(())
        }
    }
}

/// Checks a reason text: up to 1024 bytes, no control characters but tab.
pub fn validate_reason(text: &str) -> Result<(), NameError> {
    if text.len() > MAX_REASON_LEN {
        return Err(NameError::TooLong {
            len: text.len(),
            max: MAX_REASON_LEN,
        });
    }
    match text.chars().find(|c| c.is_control() && *c != '\t') {
        Some(found) => Err(NameError::BadChar {
            found,
            allowed: "printable characters",
        }),
        None => Ok(()),
    }
}

/// Checks an OPEN request before it is sent, with the same rules the receiver applies.
pub fn validate_open(open: &Open) -> Result<(), String> {
    let named = |field: &str, value: &str, may_be_empty: bool| {
        if may_be_empty && value.is_empty() {
            return Ok(());
        }
        validate_name(value).map_err(|e| format!("`{field}` {value:?}: {e}"))
    };
    named("cluster", &open.cluster, true)?;
    named("node", &open.node, false)?;
    named("service", &open.service, false)?;
    named("user", &open.user, true)?;
    validate_text(&open.login).map_err(|e| format!("`login`: {e}"))?;
    validate_text(&open.client_addr).map_err(|e| format!("`client_addr`: {e}"))?;
    if open.credential.len() > MAX_CREDENTIAL_LEN {
        return Err(format!(
            "`credential` of {} bytes exceeds {MAX_CREDENTIAL_LEN}",
            open.credential.len()
        ));
    }
    Ok(())
}

/// Checks an inventory before it is sent, with the same rules the receiver applies.
pub fn validate_announce(announce: &Announce, max_bytes: usize) -> Result<(), String> {
    if !announce.cluster.is_empty() {
        validate_name(&announce.cluster).map_err(|e| format!("cluster name: {e}"))?;
    }
    if announce.nodes.len() > MAX_ANNOUNCE_NODES {
        return Err(format!(
            "{} nodes exceed the limit of {MAX_ANNOUNCE_NODES}",
            announce.nodes.len()
        ));
    }
    for node in &announce.nodes {
        validate_name(&node.name).map_err(|e| format!("node name {:?}: {e}", node.name))?;
        if node.labels.len() > MAX_LABELS {
            return Err(format!("node {}: more than {MAX_LABELS} labels", node.name));
        }
        for (key, value) in &node.labels {
            validate_label_key(key)
                .map_err(|e| format!("node {}: label key {key:?}: {e}", node.name))?;
            validate_text(value).map_err(|e| format!("node {}: label {key}: {e}", node.name))?;
        }
        if node.services.len() > MAX_SERVICES {
            return Err(format!(
                "node {}: more than {MAX_SERVICES} services",
                node.name
            ));
        }
        for service in &node.services {
            validate_name(service)
                .map_err(|e| format!("node {}: service {service:?}: {e}", node.name))?;
        }
    }
    let len = announce.encoded_len();
    let max = max_bytes.min(MAX_ANNOUNCE_PAYLOAD);
    if len > max {
        return Err(format!(
            "inventory of {len} bytes exceeds the limit of {max} bytes"
        ));
    }
    Ok(())
}
