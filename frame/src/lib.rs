//! The Remoteler tunnel protocol: the v1 wire format ([`codec`]) and the stream
//! multiplexer ([`Session`]) that runs on top of it.
//!
//! Sans-IO, like quinn-proto: this crate has no sockets, no runtime and no clock. Bytes come
//! in as `&mut BytesMut`, frames go out as [`Transmit`] values (header + payload `Bytes`, the
//! payload never copied), and time comes in as an [`std::time::Instant`] argument. That is
//! what lets the codec and the multiplexer be tested, property-tested and fuzzed without a
//! network, and what lets every binary (proxy, agent, client, load test) drive the same
//! code from its own event loop.
//!
//! What it does not do: TLS, sockets, timers, authentication and routing live in the
//! `tunnel` and `proxy` crates. The wire format is written down in `docs/protocol.md`.

#![forbid(unsafe_code)]

pub mod codec;
mod error;
mod session;

pub use codec::{
    Announce, Frame, Hello, Kind, Limits, NodeInfo, Open, PROTOCOL_VERSION, Resume, ResumeStream,
    Role, decode,
};
pub use error::{DecodeError, EndReason, Error, ErrorCode, NameError, ProtocolError, StreamError};
pub use session::{
    COPY_DATA_BELOW, DEFAULT_KEEPALIVE_COUNT, DEFAULT_KEEPALIVE_INTERVAL, DEFAULT_MAX_BUFFERED,
    DEFAULT_MAX_FRAME, DEFAULT_MAX_PENDING_OPENS, DEFAULT_MAX_STREAMS, DEFAULT_RESUME_GRACE,
    DEFAULT_WINDOW, Event, Received, Session, SessionConfig, Transmit,
};
