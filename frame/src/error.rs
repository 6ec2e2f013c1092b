//! The crate's one public error type and the codes carried on the wire.

use std::time::Duration;

use crate::codec::Kind;

/// A 16-bit code carried by OPEN_FAIL, RESET and GOAWAY. Values are written down in
/// `docs/protocol.md`; unknown values from a newer peer are kept, not rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    /// Normal close, nothing went wrong.
    pub const NO_ERROR: Self = Self(0x0000);
    /// The peer broke the protocol (bad frame, frame in the wrong state).
    pub const PROTOCOL: Self = Self(0x0001);
    /// The peer sent more than its credit, or acknowledged bytes never sent.
    pub const FLOW_CONTROL: Self = Self(0x0002);
    /// A frame longer than the receiver's limit.
    pub const FRAME_TOO_LARGE: Self = Self(0x0003);
    /// A count or size the receiver caps was exceeded (streams, pending opens, inventory).
    pub const LIMIT_EXCEEDED: Self = Self(0x0004);
    /// No protocol version both sides speak.
    pub const VERSION_MISMATCH: Self = Self(0x0005);
    /// The application closed the stream early (e.g. the user hung up).
    pub const CANCELLED: Self = Self(0x0006);
    /// An internal error on the sender's side.
    pub const INTERNAL: Self = Self(0x0007);
    /// The keepalive saw no traffic for `interval x count`.
    pub const KEEPALIVE_TIMEOUT: Self = Self(0x0008);
    /// The sender is draining; open streams elsewhere.
    pub const GOING_AWAY: Self = Self(0x0009);
    /// The stream could not be carried across a reconnect (peer restarted, grace expired).
    pub const RESUME_FAILED: Self = Self(0x000A);

    /// OPEN_FAIL: no node of that name in the cluster.
    pub const NODE_UNKNOWN: Self = Self(0x0100);
    /// OPEN_FAIL: the node is known but neither its tunnel nor a direct route is up.
    pub const NODE_OFFLINE: Self = Self(0x0101);
    /// OPEN_FAIL: the requester may not reach that node or login.
    pub const ACCESS_DENIED: Self = Self(0x0102);
    /// OPEN_FAIL: the agent does not forward to that service.
    pub const TARGET_NOT_ALLOWED: Self = Self(0x0103);
    /// OPEN_FAIL: the target refused or did not answer the TCP dial.
    pub const CONNECT_FAILED: Self = Self(0x0104);
    /// OPEN_FAIL: no cluster of that name is trusted or online.
    pub const CLUSTER_UNKNOWN: Self = Self(0x0105);

    /// A short lower-case name for logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::NO_ERROR => "no error",
            Self::PROTOCOL => "protocol error",
            Self::FLOW_CONTROL => "flow control error",
            Self::FRAME_TOO_LARGE => "frame too large",
            Self::LIMIT_EXCEEDED => "limit exceeded",
            Self::VERSION_MISMATCH => "version mismatch",
            Self::CANCELLED => "cancelled",
            Self::INTERNAL => "internal error",
            Self::KEEPALIVE_TIMEOUT => "keepalive timeout",
            Self::GOING_AWAY => "going away",
            Self::RESUME_FAILED => "resume failed",
            Self::NODE_UNKNOWN => "node unknown",
            Self::NODE_OFFLINE => "node offline",
            Self::ACCESS_DENIED => "access denied",
            Self::TARGET_NOT_ALLOWED => "target not allowed",
            Self::CONNECT_FAILED => "connect failed",
            Self::CLUSTER_UNKNOWN => "cluster unknown",
            _ => "unknown code",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (0x{:04x})", self.name(), self.0)
    }
}

/// Everything that can go wrong in this crate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Bytes from the peer do not form a valid frame. The tunnel must be closed.
    #[error("malformed frame from peer: {0}")]
    Decode(#[from] DecodeError),
    /// Valid frames in an order or amount the protocol forbids. The tunnel must be closed.
    #[error("peer broke the protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// The session ended; the reason says why and who ended it.
    #[error("tunnel session ended: {0}")]
    Ended(#[from] EndReason),
    /// The application asked for something the stream cannot do now.
    #[error("stream {stream}: {reason}")]
    Stream {
        /// The stream concerned.
        stream: u32,
        /// What was wrong.
        reason: StreamError,
    },
}

impl Error {
    /// The code to send to the peer in GOAWAY when this error ends a session.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Decode(DecodeError::TooLarge { .. }) => ErrorCode::FRAME_TOO_LARGE,
            Error::Decode(DecodeError::TooMany { .. }) => ErrorCode::LIMIT_EXCEEDED,
            Error::Decode(_) => ErrorCode::PROTOCOL,
            Error::Protocol(ProtocolError::FlowControl { .. })
            | Error::Protocol(ProtocolError::AckBeyondSent { .. }) => ErrorCode::FLOW_CONTROL,
            Error::Protocol(ProtocolError::VersionMismatch { .. }) => ErrorCode::VERSION_MISMATCH,
            Error::Protocol(ProtocolError::AnnounceTooLarge { .. })
            | Error::Protocol(ProtocolError::MemoryBudget { .. }) => ErrorCode::LIMIT_EXCEEDED,
            Error::Protocol(_) => ErrorCode::PROTOCOL,
            Error::Ended(EndReason::KeepaliveTimeout { .. }) => ErrorCode::KEEPALIVE_TIMEOUT,
            Error::Ended(EndReason::ResumeExpired { .. }) => ErrorCode::RESUME_FAILED,
            Error::Ended(EndReason::ClosedLocally { code, .. })
            | Error::Ended(EndReason::ClosedByPeer { code, .. }) => *code,
            Error::Ended(EndReason::TransportLost) => ErrorCode::NO_ERROR,
            Error::Stream { .. } => ErrorCode::INTERNAL,
        }
    }
}

/// Why bytes could not be decoded into a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The frame kind byte is not one this version knows.
    #[error("unknown frame kind 0x{0:02x}")]
    UnknownKind(u8),
    /// The header announces more payload than the receiver accepts.
    #[error("{kind} frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Frame kind.
        kind: Kind,
        /// Announced payload length.
        len: usize,
        /// The receiver's limit for this kind.
        max: usize,
    },
    /// The payload length does not fit the frame kind.
    #[error("{kind} frame has {len} payload bytes, expected {expected}")]
    BadLength {
        /// Frame kind.
        kind: Kind,
        /// Actual payload length.
        len: usize,
        /// What the kind requires, in words.
        expected: &'static str,
    },
    /// A connection-level frame named a stream, or a stream frame named stream 0.
    #[error("{kind} frame on stream {stream}: {expected}")]
    BadStream {
        /// Frame kind.
        kind: Kind,
        /// Stream id found.
        stream: u32,
        /// What was expected, in words.
        expected: &'static str,
    },
    /// Flags this version does not define were set.
    #[error("{kind} frame has undefined flags 0x{flags:02x}")]
    BadFlags {
        /// Frame kind.
        kind: Kind,
        /// The flag byte.
        flags: u8,
    },
    /// A field ended before its declared length.
    #[error("{kind} frame: field `{field}` runs past the end of the payload")]
    Truncated {
        /// Frame kind.
        kind: Kind,
        /// Field name.
        field: &'static str,
    },
    /// A count the receiver caps was exceeded.
    #[error("{kind} frame: {count} {what} exceeds the limit of {max}")]
    TooMany {
        /// Frame kind.
        kind: Kind,
        /// What was counted.
        what: &'static str,
        /// Count found.
        count: usize,
        /// Limit.
        max: usize,
    },
    /// A text field was not valid (charset, length, UTF-8).
    #[error("{kind} frame: field `{field}`: {problem}")]
    BadField {
        /// Frame kind.
        kind: Kind,
        /// Field name.
        field: &'static str,
        /// What is wrong, in words.
        problem: NameError,
    },
    /// A WINDOW increment of zero, which would make no progress.
    #[error("WINDOW frame on stream {0} with a zero increment")]
    ZeroWindow(u32),
}

/// Why a name or text field is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// Empty where a value is required.
    #[error("must not be empty")]
    Empty,
    /// Too long.
    #[error("{len} bytes, at most {max} allowed")]
    TooLong {
        /// Length found.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// A character outside the allowed set.
    #[error("character {found:?} not allowed (allowed: {allowed})")]
    BadChar {
        /// The offending character.
        found: char,
        /// The allowed set, in words.
        allowed: &'static str,
    },
    /// Not UTF-8.
    #[error("not valid UTF-8")]
    NotUtf8,
}

/// Valid frames that break the rules of a session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The first frame from the peer was not HELLO, or HELLO came twice.
    #[error("expected HELLO as the first frame, got {0}")]
    ExpectedHello(Kind),
    /// HELLO arrived again on an established session.
    #[error("HELLO received twice")]
    DuplicateHello,
    /// No common version.
    #[error(
        "no common protocol version: we speak {ours_min}..={ours_max}, peer speaks {theirs_min}..={theirs_max}"
    )]
    VersionMismatch {
        /// Our lowest version.
        ours_min: u16,
        /// Our highest version.
        ours_max: u16,
        /// Peer's lowest version.
        theirs_min: u16,
        /// Peer's highest version.
        theirs_max: u16,
    },
    /// The peer sent DATA beyond the credit we granted.
    #[error("stream {stream}: peer sent up to byte {offset} but its credit ends at {limit}")]
    FlowControl {
        /// Stream.
        stream: u32,
        /// Offset the peer reached.
        offset: u64,
        /// Credit limit we granted.
        limit: u64,
    },
    /// The peer's unread DATA across streams passed the session's memory budget.
    #[error(
        "stream {stream}: peer's unread data across streams would reach {held} bytes, over the \
         connection's memory budget of {limit} bytes (SessionConfig::max_buffered)"
    )]
    MemoryBudget {
        /// The stream whose DATA passed the budget.
        stream: u32,
        /// Bytes unread across streams with that DATA.
        held: u64,
        /// The budget.
        limit: u32,
    },
    /// A WINDOW acknowledged bytes we never sent.
    #[error("stream {stream}: peer acknowledged up to byte {acked} but only {sent} were sent")]
    AckBeyondSent {
        /// Stream.
        stream: u32,
        /// Offset acknowledged.
        acked: u64,
        /// Offset sent.
        sent: u64,
    },
    /// OPEN with an id of the wrong parity or not above every earlier one.
    #[error("OPEN for stream {stream}: {problem}")]
    BadStreamId {
        /// Stream id.
        stream: u32,
        /// What is wrong.
        problem: &'static str,
    },
    /// A frame for a stream id that was never opened.
    #[error("{kind} for stream {stream}, which was never opened")]
    UnknownStream {
        /// Frame kind.
        kind: Kind,
        /// Stream id.
        stream: u32,
    },
    /// A frame that the stream's state does not allow.
    #[error("{kind} on stream {stream} while it is {state}")]
    WrongState {
        /// Frame kind.
        kind: Kind,
        /// Stream id.
        stream: u32,
        /// State in words.
        state: &'static str,
    },
    /// An inventory bigger than `limits.max_announce_bytes`.
    #[error("ANNOUNCE of {len} bytes exceeds limits.max_announce_bytes ({max})")]
    AnnounceTooLarge {
        /// Encoded size.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// ANNOUNCE from a peer that has no inventory to announce (a user's connection): refused
    /// from its header, before its payload is read or decoded.
    #[error("ANNOUNCE from a peer that may not announce nodes (only agents and leaf clusters do)")]
    AnnounceNotAccepted,
    /// RESUME when no resumption was under way, or twice.
    #[error("unexpected RESUME: {0}")]
    UnexpectedResume(&'static str),
}

/// Why a session ended without a protocol violation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EndReason {
    /// Nothing came from the peer for `interval x count`.
    #[error(
        "no traffic from peer for {count} keepalive intervals of {interval:?} (keepalive.interval, keepalive.count)"
    )]
    KeepaliveTimeout {
        /// Keepalive interval.
        interval: Duration,
        /// Missed intervals allowed.
        count: u32,
    },
    /// The transport stayed down longer than the resume grace period.
    #[error("transport not back within the resume grace period of {grace:?} (resume.grace)")]
    ResumeExpired {
        /// The grace period.
        grace: Duration,
    },
    /// The transport was lost and the session does not resume (`resume.grace` is zero, or
    /// the session was draining).
    #[error("the connection to the peer was lost and the session does not resume")]
    TransportLost,
    /// The peer sent GOAWAY with an error code and then closed.
    #[error("peer closed the tunnel: {code}: {reason}")]
    ClosedByPeer {
        /// Code from the peer.
        code: ErrorCode,
        /// Reason text from the peer.
        reason: String,
    },
    /// This side closed the session.
    #[error("closed locally: {code}: {reason}")]
    ClosedLocally {
        /// Code sent to the peer.
        code: ErrorCode,
        /// Reason sent to the peer.
        reason: String,
    },
}

/// Why an operation on one stream was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// No such stream (never opened, or already closed).
    #[error("no such stream")]
    Unknown,
    /// The stream is not open for this operation yet (OPEN not answered).
    #[error("not open yet")]
    NotOpen,
    /// `finish` was already called; nothing more may be sent.
    #[error("already finished sending")]
    Finished,
    /// The peer's credit is used up; wait for a `Writable` event.
    #[error("no send credit left; wait for a Writable event")]
    Blocked,
    /// The peer allows no more streams at once (its `max_streams`).
    #[error("peer allows at most {0} streams at once")]
    TooManyStreams(u32),
    /// A GOAWAY was sent or received; no new streams.
    #[error("tunnel is draining (GOAWAY); open the stream elsewhere")]
    GoingAway,
    /// The session is over.
    #[error("session has ended")]
    SessionEnded,
    /// A field of the request is invalid.
    #[error("invalid request: {0}")]
    Invalid(String),
}
