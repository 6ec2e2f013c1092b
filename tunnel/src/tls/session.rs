//! The rustls side of a connection, driven through rustls's unbuffered API.
//!
//! rustls's unbuffered connections own no ciphertext buffer: the caller passes the received
//! bytes in as a slice and takes encoded records out into its own buffer. That is what lets an
//! idle connection hold nothing but keys and state: the received bytes live in the per-core
//! scratch buffer while they are processed, and only a trailing partial record (if any) is kept.
//!
//! [`Session::drive`] runs the state machine until it needs something from the network
//! (`Outcome`), handing decrypted plaintext to a [`PlainSink`] and encoded records to an
//! outgoing `Vec`. Nothing here touches a socket or awaits.
//!
//! Once the handshake is done, [`Session::establish`] hands the connection to our own record
//! layer ([`super::record`]) and rustls keeps only what derives the next keys.

use std::{fmt, sync::Arc};

use bytes::BytesMut;
use rustls::{
    client::{ClientConnectionData, UnbufferedClientConnection},
    pki_types::{CertificateDer, ServerName},
    server::{ServerConnectionData, UnbufferedServerConnection},
    unbuffered::{
        ConnectionState, EncodeError, EncodeTlsData, EncryptError, ReadEarlyData,
        UnbufferedConnectionCommon, UnbufferedStatus, WriteTraffic,
    },
};

use super::{
    error::Fault,
    record::{Negotiated, RecordLayer},
};

/// Where [`Session::drive`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// The handshake needs more bytes from the peer.
    Blocked,
    /// Application data may be sent; every complete record given was processed.
    Traffic,
    /// Both sides sent close_notify: nothing more can be sent or received.
    Closed,
}

/// Receives decrypted application data.
pub(super) trait PlainSink {
    fn put(&mut self, plaintext: &[u8]);
    /// Makes room for `additional` more bytes at once.
    fn reserve(&mut self, additional: usize);
    /// The caller's own buffer, which an established connection reads into without a copy;
    /// `Err(self)` for a sink that is not one.
    fn direct(&mut self) -> Result<&mut BytesMut, &mut dyn PlainSink>;
}

impl PlainSink for Vec<u8> {
    fn put(&mut self, plaintext: &[u8]) {
        self.extend_from_slice(plaintext);
    }

    /// Nothing: this is the connection's own buffer for plaintext decrypted during the
    /// handshake, which must not keep spare capacity on an idle connection.
    fn reserve(&mut self, _additional: usize) {}

    fn direct(&mut self) -> Result<&mut BytesMut, &mut dyn PlainSink> {
        Err(self)
    }
}

impl PlainSink for BytesMut {
    fn put(&mut self, plaintext: &[u8]) {
        self.extend_from_slice(plaintext);
    }

    fn reserve(&mut self, additional: usize) {
        BytesMut::reserve(self, additional);
    }

    fn direct(&mut self) -> Result<&mut BytesMut, &mut dyn PlainSink> {
        Ok(self)
    }
}

/// Counts what went into another sink.
pub(super) struct Counting<'a> {
    pub(super) inner: &'a mut dyn PlainSink,
    pub(super) count: usize,
}

impl PlainSink for Counting<'_> {
    fn put(&mut self, plaintext: &[u8]) {
        self.count += plaintext.len();
        self.inner.put(plaintext);
    }

    fn reserve(&mut self, additional: usize) {
        self.inner.reserve(additional);
    }

    fn direct(&mut self) -> Result<&mut BytesMut, &mut dyn PlainSink> {
        Err(self)
    }
}

/// Encrypts application data into records; the object-safe face of rustls's `WriteTraffic`,
/// which is generic over the connection side.
pub(super) trait Encrypt {
    /// Encrypts `plaintext` (fragmented into records) into `out`, preceded by any TLS message
    /// rustls has queued (a key update). Returns the bytes written.
    fn encrypt(&mut self, plaintext: &[u8], out: &mut [u8]) -> Result<usize, EncryptError>;
    /// Whether [`encrypt_gathered`](Self::encrypt_gathered) works (our record layer's does).
    fn gathers(&self) -> bool {
        false
    }
    /// Seals one record gathered from `pieces` (at most a record's plaintext in all), without
    /// first copying them together; `None` if this encrypter cannot (rustls's own).
    fn encrypt_gathered(
        &mut self,
        _pieces: &[&[u8]],
        _out: &mut [u8],
    ) -> Option<Result<usize, EncryptError>> {
        None
    }
    /// Encodes a close_notify alert into `out`.
    fn close_notify(&mut self, out: &mut [u8]) -> Result<usize, EncryptError>;
}

impl<D> Encrypt for WriteTraffic<'_, D> {
    fn encrypt(&mut self, plaintext: &[u8], out: &mut [u8]) -> Result<usize, EncryptError> {
        WriteTraffic::encrypt(self, plaintext, out)
    }

    fn close_notify(&mut self, out: &mut [u8]) -> Result<usize, EncryptError> {
        self.queue_close_notify(out)
    }
}

/// What a writer does once the connection is in the traffic state: encrypt into the given
/// outgoing buffer (or send directly) through the given [`Encrypt`].
pub(super) type WriteFn<'w> =
    &'w mut dyn FnMut(&mut dyn Encrypt, &mut Vec<u8>) -> Result<(), Fault>;

/// Fresh space to encode one handshake flight into; grown on demand from rustls's answer.
const ENCODE_GUESS: usize = 4096;

/// What [`Session::drive`] did.
pub(super) struct Driven {
    /// Bytes at the front of the input that rustls is done with (also after an error). The
    /// rest must be passed again, first and unchanged, on the next call: rustls may already
    /// have decrypted part of it in place and locates it by offset.
    pub(super) consumed: usize,
    pub(super) result: Result<Outcome, Fault>,
}

/// Everything [`Session::drive`] produces besides its outcome.
pub(super) struct Sink<'a> {
    /// Encoded records to send, in order, after whatever is already there.
    pub(super) out: &'a mut Vec<u8>,
    /// Decrypted application data.
    pub(super) plain: &'a mut dyn PlainSink,
    /// Set once the peer's close_notify has been processed.
    pub(super) peer_closed: &'a mut bool,
}

/// A connection's TLS state: rustls while handshaking (boxed: it is large, and given back
/// once the handshake is done), then our record layer.
pub(super) enum Session {
    Client(Box<UnbufferedClientConnection>, Extraction),
    Server(Box<UnbufferedServerConnection>, Extraction),
    Established(Box<RecordLayer>),
    /// Only while [`Session::establish`] moves the state; never seen outside it.
    Moving,
}

/// Whether the config lets rustls hand the keys over after the handshake
/// (`enable_secret_extraction`); without it the connection stays on rustls throughout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Extraction(bool);

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (side, handshaking) = match self {
            Self::Client(c, _) => ("client", c.is_handshaking()),
            Self::Server(s, _) => ("server", s.is_handshaking()),
            Self::Established(r) => return r.fmt(f),
            Self::Moving => ("moving", false),
        };
        f.debug_struct("Session")
            .field("side", &side)
            .field("handshaking", &handshaking)
            .finish()
    }
}

impl Session {
    pub(super) fn client(
        config: Arc<rustls::ClientConfig>,
        server_name: ServerName<'static>,
    ) -> Result<Self, rustls::Error> {
        let extraction = Extraction(config.enable_secret_extraction);
        UnbufferedClientConnection::new(config, server_name)
            .map(|c| Self::Client(Box::new(c), extraction))
    }

    pub(super) fn server(config: Arc<rustls::ServerConfig>) -> Result<Self, rustls::Error> {
        let extraction = Extraction(config.enable_secret_extraction);
        UnbufferedServerConnection::new(config).map(|s| Self::Server(Box::new(s), extraction))
    }

    pub(super) fn is_handshaking(&self) -> bool {
        match self {
            Self::Client(c, _) => c.is_handshaking(),
            Self::Server(s, _) => s.is_handshaking(),
            Self::Established(_) | Self::Moving => false,
        }
    }

    pub(super) fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        match self {
            Self::Client(c, _) => c.peer_certificates(),
            Self::Server(s, _) => s.peer_certificates(),
            Self::Established(r) => r.peer_certificates(),
            Self::Moving => None,
        }
    }

    pub(super) fn alpn_protocol(&self) -> Option<&[u8]> {
        match self {
            Self::Client(c, _) => c.alpn_protocol(),
            Self::Server(s, _) => s.alpn_protocol(),
            Self::Established(r) => r.alpn_protocol(),
            Self::Moving => None,
        }
    }

    pub(super) fn protocol_version(&self) -> Option<rustls::ProtocolVersion> {
        match self {
            Self::Client(c, _) => c.protocol_version(),
            Self::Server(s, _) => s.protocol_version(),
            Self::Established(_) => Some(rustls::ProtocolVersion::TLSv1_3),
            Self::Moving => None,
        }
    }

    /// Once the handshake is done and everything rustls produced has been taken out (the last
    /// `drive` reached the traffic state): moves the connection to our record layer, keeping
    /// the peer's certificates and the ALPN protocol. A TLS 1.2 connection, or one whose config
    /// does not allow the keys out, stays on rustls. On failure the session is unusable.
    pub(super) fn establish(&mut self) -> Result<(), Fault> {
        let tls13 = self.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3);
        match self {
            Self::Client(_, Extraction(true)) | Self::Server(_, Extraction(true)) if tls13 => {}
            _ => return Ok(()),
        }
        let negotiated = Negotiated {
            peer_certificates: self.peer_certificates().map(<[_]>::to_vec),
            alpn_protocol: self.alpn_protocol().map(<[u8]>::to_vec),
        };
        let layer = match std::mem::replace(self, Self::Moving) {
            Self::Client(c, _) => {
                let kernel = c.dangerous_into_kernel_connection().map_err(Fault::Tls)?;
                RecordLayer::client(kernel, negotiated)?
            }
            Self::Server(s, _) => {
                let kernel = s.dangerous_into_kernel_connection().map_err(Fault::Tls)?;
                RecordLayer::server(kernel, negotiated)?
            }
            other => {
                *self = other;
                return Ok(());
            }
        };
        *self = Self::Established(Box::new(layer));
        Ok(())
    }

    /// After [`drive`](Self::drive) failed with a TLS error, appends the alert owed to the
    /// peer (if any) to `out`. Call at most once, with the bytes kept.
    pub(super) fn encode_alert(&mut self, incoming: &mut [u8], out: &mut Vec<u8>) {
        match self {
            Self::Client(c, _) => encode_alert(&mut ***c, incoming, out),
            Self::Server(s, _) => encode_alert(&mut ***s, incoming, out),
            Self::Established(r) => r.encode_alert(out),
            Self::Moving => {}
        }
    }

    /// Processes every complete record at the front of `incoming` and runs the state machine
    /// until it waits for the network. Returns how many bytes of `incoming` were consumed (the
    /// rest is a partial record, or a handshake message still being assembled, which must be
    /// passed again, first, on the next call, whatever the call is for: rustls panics on a
    /// buffer shorter than what it kept) and where it stopped.
    ///
    /// When the connection reaches the traffic state and `write` is given, `write` is called
    /// once with the means to encrypt.
    pub(super) fn drive(
        &mut self,
        incoming: &mut [u8],
        sink: &mut Sink<'_>,
        write: Option<WriteFn<'_>>,
    ) -> Driven {
        match self {
            Self::Client(c, _) => drive(&mut ***c, incoming, sink, write),
            Self::Server(s, _) => drive(&mut ***s, incoming, sink, write),
            Self::Established(r) => r.drive(incoming, sink, write),
            Self::Moving => Driven {
                consumed: 0,
                result: Err(Fault::Internal("tls state lost while moving".into())),
            },
        }
    }
}

/// After rustls returned an error: encodes the fatal alert it queued, if any, into `out`.
///
/// Exactly one more `process_tls_records` call: rustls hands out queued messages before it
/// looks at input, so the call returns the alert without deframing anything. A second call
/// would deframe the offending bytes again and queue a second fatal alert, which rustls
/// asserts never happens.
fn encode_alert<D, C: Process<D>>(conn: &mut C, incoming: &mut [u8], out: &mut Vec<u8>) {
    let status = conn.process(incoming);
    if let Ok(ConnectionState::EncodeTlsData(mut encode)) = status.state {
        let _ = encode_into(&mut encode, out);
    }
}

fn encode_into<D>(encode: &mut EncodeTlsData<'_, D>, out: &mut Vec<u8>) -> Result<(), Fault> {
    let start = out.len();
    let mut room = ENCODE_GUESS;
    loop {
        out.resize(start + room, 0);
        let tail = out.get_mut(start..).unwrap_or_default();
        match encode.encode(tail) {
            Ok(written) => {
                out.truncate(start + written);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(e)) if e.required_size > room => {
                room = e.required_size;
            }
            Err(e) => {
                out.truncate(start);
                return Err(Fault::Internal(format!("encoding a handshake record: {e}")));
            }
        }
    }
}

/// `process_tls_records` exists per side in rustls; this makes it callable generically.
trait Process<D> {
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, D>;

    /// Delivers 0-RTT data; returns the extra bytes to discard. Only a server whose config
    /// enables early data gets any; it is the peer's data like any other, delivered in order.
    fn early_data(
        early: &mut ReadEarlyData<'_, '_, D>,
        sink: &mut dyn PlainSink,
    ) -> Result<usize, Fault>;
}

impl Process<ClientConnectionData> for UnbufferedConnectionCommon<ClientConnectionData> {
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, ClientConnectionData> {
        self.process_tls_records(incoming)
    }

    fn early_data(
        _early: &mut ReadEarlyData<'_, '_, ClientConnectionData>,
        _sink: &mut dyn PlainSink,
    ) -> Result<usize, Fault> {
        Err(Fault::Internal("a client was handed 0-rtt data".into()))
    }
}

impl Process<ServerConnectionData> for UnbufferedConnectionCommon<ServerConnectionData> {
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, ServerConnectionData> {
        self.process_tls_records(incoming)
    }

    fn early_data(
        early: &mut ReadEarlyData<'_, '_, ServerConnectionData>,
        sink: &mut dyn PlainSink,
    ) -> Result<usize, Fault> {
        let mut discard = 0;
        while let Some(record) = early.next_record() {
            let record = record.map_err(Fault::Tls)?;
            discard += record.discard;
            sink.put(record.payload);
        }
        Ok(discard)
    }
}

fn drive<D, C: Process<D>>(
    conn: &mut C,
    incoming: &mut [u8],
    sink: &mut Sink<'_>,
    write: Option<WriteFn<'_>>,
) -> Driven {
    let mut consumed = 0;
    let result = drive_inner(conn, incoming, &mut consumed, sink, write);
    Driven { consumed, result }
}

fn drive_inner<D, C: Process<D>>(
    conn: &mut C,
    incoming: &mut [u8],
    consumed: &mut usize,
    sink: &mut Sink<'_>,
    mut write: Option<WriteFn<'_>>,
) -> Result<Outcome, Fault> {
    loop {
        let rest = incoming.get_mut(*consumed..).unwrap_or_default();
        let status = conn.process(rest);
        // rustls says what to discard even with an error, and needs it honoured: the bytes it
        // keeps (fragments of a handshake message) are located by offset in what we pass next.
        *consumed += status.discard;
        let state = status.state.map_err(Fault::Tls)?;
        let mut extra = 0;
        match state {
            ConnectionState::ReadTraffic(mut traffic) => {
                while let Some(record) = traffic.next_record() {
                    let record = record.map_err(Fault::Tls)?;
                    extra += record.discard;
                    sink.plain.put(record.payload);
                }
            }
            ConnectionState::ReadEarlyData(mut early) => {
                extra += C::early_data(&mut early, sink.plain)?;
            }
            ConnectionState::PeerClosed => *sink.peer_closed = true,
            ConnectionState::Closed => {
                *sink.peer_closed = true;
                return Ok(Outcome::Closed);
            }
            ConnectionState::EncodeTlsData(mut encode) => encode_into(&mut encode, sink.out)?,
            // The records already sit in `sink.out`, which the caller sends in order before
            // anything encoded later: as far as rustls is concerned they are transmitted.
            ConnectionState::TransmitTlsData(transmit) => transmit.done(),
            ConnectionState::BlockedHandshake => return Ok(Outcome::Blocked),
            ConnectionState::WriteTraffic(mut traffic) => {
                if let Some(write) = write.take() {
                    write(&mut traffic, sink.out)?;
                }
                return Ok(Outcome::Traffic);
            }
            other => {
                return Err(Fault::Internal(format!(
                    "unexpected rustls state {other:?}"
                )));
            }
        }
        *consumed += extra;
    }
}
