//! TLS 1.3 records after the handshake: our own record layer over the keys rustls negotiated.
//!
//! rustls runs the handshake (certificates, key exchange, the key schedule); once it is done
//! the connection is turned into rustls's "kernel connection" (the API made for kTLS), which
//! gives us the traffic keys and keeps only what it needs to derive the next ones. From then on
//! this module seals and opens records itself, with ring's AEADs, for two reasons:
//!
//! * **Copies.** rustls's unbuffered `encrypt` copies the plaintext into a fresh allocation,
//!   seals it there and copies the record out again: two copies and a `malloc` per 16 KiB
//!   record, on a path that carries every byte of every session twice. Here a record is sealed
//!   in place in the caller's buffer after one copy, gathered from the caller's slices.
//! * **Memory.** A full rustls connection keeps its deframer, buffer queues and handshake state
//!   for the connection's life, about 2 KiB more per idle tunnel than the keys themselves.
//!
//! What TLS 1.3 requires after the handshake is all here (RFC 8446 §5, §4.6): per-record nonces
//! from the IV and the sequence number, the inner content type and its zero padding, alerts
//! (close_notify ends the peer's side; any other alert ends the connection), KeyUpdate both
//! ways (ours before a key has sealed its suite's confidentiality limit of records, the peer's
//! whenever it sends one, answered when it asks), and NewSessionTicket on a client (handed to
//! rustls, which stores it for resumption). Anything else is refused with an alert. Nothing
//! here panics on input: every length is checked before it is used.

use std::fmt;

use ring::aead;
use rustls::{
    AlertDescription, ConnectionTrafficSecrets, ContentType, InvalidMessage, PeerMisbehaved,
    SupportedCipherSuite,
    client::ClientConnectionData,
    kernel::KernelConnection,
    pki_types::CertificateDer,
    server::ServerConnectionData,
    unbuffered::{EncryptError, InsufficientSizeError},
};

use super::{
    error::Fault,
    session::{Driven, Outcome, Sink},
};

/// Plaintext bytes one record may carry (RFC 8446 §5.1).
pub(super) const MAX_PLAINTEXT: usize = 0x4000;
/// A record's header: content type, legacy version, length.
const HEADER: usize = 5;
/// AEAD tag length of every TLS 1.3 suite.
const TAG: usize = 16;
/// The largest record body a peer may send (RFC 8446 §5.2: plaintext + 256).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// Bytes a record adds to its plaintext when sent from here (no padding).
pub(super) const OVERHEAD: usize = HEADER + 1 + TAG;

const APPLICATION_DATA: u8 = 0x17;
const ALERT: u8 = 0x15;
const HANDSHAKE: u8 = 0x16;
const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;
/// Our KeyUpdate message: type, 24-bit length 1, `update_not_requested`.
const KEY_UPDATE_NOT_REQUESTED: [u8; 5] = [KEY_UPDATE, 0, 0, 1, 0];

/// Records sealed with one key before we replace it: a test may make it small, so that key
/// updates happen within a few megabytes; 0 means the suite's own limit (halved).
static KEY_UPDATE_AFTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Makes every connection created afterwards in this process update its sending key after
/// `records` records (0: the cipher suite's confidentiality limit, halved). For tests of the
/// key update path; a production process never calls it.
#[doc(hidden)]
pub fn set_key_update_after(records: u64) {
    KEY_UPDATE_AFTER.store(records, std::sync::atomic::Ordering::Relaxed);
}

/// KeyUpdates sent and received by this process's connections, for tests.
static KEY_UPDATES_SENT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static KEY_UPDATES_RECEIVED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// KeyUpdates this process's connections have sent and received so far, for tests.
#[doc(hidden)]
pub fn key_updates() -> (u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    (
        KEY_UPDATES_SENT.load(Relaxed),
        KEY_UPDATES_RECEIVED.load(Relaxed),
    )
}

/// rustls's part of an established connection: it derives the next traffic secrets.
enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Kernel {
    fn suite(&self) -> SupportedCipherSuite {
        match self {
            Self::Client(k) => k.negotiated_cipher_suite(),
            Self::Server(k) => k.negotiated_cipher_suite(),
        }
    }

    fn next_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Self::Client(k) => k.update_tx_secret(),
            Self::Server(k) => k.update_tx_secret(),
        }
    }

    fn next_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Self::Client(k) => k.update_rx_secret(),
            Self::Server(k) => k.update_rx_secret(),
        }
    }
}

/// One direction's key, IV and record sequence number.
struct Keys {
    key: aead::LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
}

impl Keys {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> Result<Self, Fault> {
        let (algorithm, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => {
                return Err(Fault::Internal(
                    "no record layer for the negotiated cipher".into(),
                ));
            }
        };
        let key = aead::UnboundKey::new(algorithm, key.as_ref())
            .map_err(|_| Fault::Internal("traffic key of the wrong length".into()))?;
        let iv = <[u8; aead::NONCE_LEN]>::try_from(iv.as_ref())
            .map_err(|_| Fault::Internal("traffic iv of the wrong length".into()))?;
        Ok(Self {
            key: aead::LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The next record's nonce (RFC 8446 §5.3); the sequence number moves on.
    fn next_nonce(&mut self) -> Result<aead::Nonce, Fault> {
        let mut nonce = self.iv;
        for (n, s) in nonce.iter_mut().skip(4).zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or_else(|| Fault::Internal("record sequence number exhausted".into()))?;
        Ok(aead::Nonce::assume_unique_for_key(nonce))
    }
}

/// An established TLS 1.3 connection's record layer.
pub(super) struct RecordLayer {
    kernel: Kernel,
    tx: Keys,
    rx: Keys,
    /// Records sealed with one key before we update it.
    tx_limit: u64,
    /// Send our KeyUpdate before the next record: the key reached `tx_limit`, or the peer
    /// asked (`update_requested`).
    key_update_due: bool,
    /// The alert owed to the peer after its input failed (sent by [`Self::encode_alert`]).
    alert_due: Option<AlertDescription>,
    peer_closed: bool,
    peer_certificates: Option<Vec<CertificateDer<'static>>>,
    alpn_protocol: Option<Vec<u8>>,
}

impl fmt::Debug for RecordLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordLayer")
            .field("suite", &self.kernel.suite().suite())
            .field("tx_seq", &self.tx.seq)
            .field("rx_seq", &self.rx.seq)
            .finish_non_exhaustive()
    }
}

/// What [`RecordLayer::open_in_place`] did.
pub(super) struct Opened {
    /// Bytes at the front of the region done with: whole records.
    pub(super) consumed: usize,
    /// Plaintext now at the front of the region.
    pub(super) plaintext: usize,
    pub(super) result: Result<(), Fault>,
}

/// What the handshake left that the record layer keeps.
pub(super) struct Negotiated {
    pub(super) peer_certificates: Option<Vec<CertificateDer<'static>>>,
    pub(super) alpn_protocol: Option<Vec<u8>>,
}

impl RecordLayer {
    pub(super) fn client(
        (secrets, kernel): (
            rustls::ExtractedSecrets,
            KernelConnection<ClientConnectionData>,
        ),
        negotiated: Negotiated,
    ) -> Result<Self, Fault> {
        Self::new(secrets, Kernel::Client(kernel), negotiated)
    }

    pub(super) fn server(
        (secrets, kernel): (
            rustls::ExtractedSecrets,
            KernelConnection<ServerConnectionData>,
        ),
        negotiated: Negotiated,
    ) -> Result<Self, Fault> {
        Self::new(secrets, Kernel::Server(kernel), negotiated)
    }

    fn new(
        secrets: rustls::ExtractedSecrets,
        kernel: Kernel,
        negotiated: Negotiated,
    ) -> Result<Self, Fault> {
        let suite_limit = match kernel.suite() {
            SupportedCipherSuite::Tls13(suite) => suite.common.confidentiality_limit,
            #[allow(unreachable_patterns)]
            _ => return Err(Fault::Internal("record layer without TLS 1.3".into())),
        };
        let tx_limit = match KEY_UPDATE_AFTER.load(std::sync::atomic::Ordering::Relaxed) {
            0 => suite_limit / 2,
            n => n,
        };
        Ok(Self {
            tx: Keys::new(secrets.tx)?,
            rx: Keys::new(secrets.rx)?,
            kernel,
            tx_limit,
            key_update_due: false,
            alert_due: None,
            peer_closed: false,
            peer_certificates: negotiated.peer_certificates,
            alpn_protocol: negotiated.alpn_protocol,
        })
    }

    pub(super) fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.peer_certificates.as_deref()
    }

    pub(super) fn alpn_protocol(&self) -> Option<&[u8]> {
        self.alpn_protocol.as_deref()
    }

    /// Opens every complete record at the front of `incoming` and hands its content on;
    /// then, if `write` is given, lets it seal. Consumes whole records only.
    pub(super) fn drive(
        &mut self,
        incoming: &mut [u8],
        sink: &mut Sink<'_>,
        write: Option<super::session::WriteFn<'_>>,
    ) -> Driven {
        let opened = self.open_in_place(incoming, sink.peer_closed);
        sink.plain
            .put(incoming.get(..opened.plaintext).unwrap_or_default());
        let result = match (opened.result, write) {
            (Ok(()), Some(write)) => write(self, sink.out).map(|()| Outcome::Traffic),
            (Ok(()), None) => Ok(Outcome::Traffic),
            (Err(fault), _) => Err(fault),
        };
        Driven {
            consumed: opened.consumed,
            result,
        }
    }

    /// Opens every complete record at the front of `region` where it lies, moving each
    /// record's application data down onto the end of the last (ring's `open_within`), so
    /// that `region[..plaintext]` is the plaintext of all of them, never copied elsewhere.
    /// Alerts and handshake messages are acted on and leave nothing there. Stops at the
    /// first incomplete record or failure; `region[consumed..]` is not touched.
    pub(super) fn open_in_place(&mut self, region: &mut [u8], peer_closed: &mut bool) -> Opened {
        let mut opened = Opened {
            consumed: 0,
            plaintext: 0,
            result: Ok(()),
        };
        loop {
            let rest = region.get(opened.consumed..).unwrap_or_default();
            let Some(&[outer_type, v1, v2, len_hi, len_lo]) = rest.get(..HEADER) else {
                return opened;
            };
            let len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
            if outer_type != APPLICATION_DATA {
                opened.result = Err(self.refuse(
                    AlertDescription::UnexpectedMessage,
                    rustls::Error::InappropriateMessage {
                        expect_types: vec![ContentType::ApplicationData],
                        got_type: ContentType::from(outer_type),
                    },
                ));
                return opened;
            }
            if len > MAX_CIPHERTEXT {
                opened.result = Err(self.refuse(
                    AlertDescription::RecordOverflow,
                    rustls::Error::PeerSentOversizedRecord,
                ));
                return opened;
            }
            let end = opened.consumed + HEADER + len;
            if end > region.len() {
                return opened; // the rest of the record has not arrived
            }
            let body_at = opened.consumed + HEADER - opened.plaintext;
            opened.consumed = end;
            if self.peer_closed {
                continue; // RFC 8446 §6.1: data after close_notify is ignored
            }
            let aad = aead::Aad::from([outer_type, v1, v2, len_hi, len_lo]);
            let nonce = match self.rx.next_nonce() {
                Ok(nonce) => nonce,
                Err(fault) => {
                    opened.result = Err(fault);
                    return opened;
                }
            };
            let in_out = region.get_mut(opened.plaintext..end).unwrap_or_default();
            let Ok(inner) = self.rx.key.open_within(nonce, aad, in_out, body_at..) else {
                opened.result =
                    Err(self.refuse(AlertDescription::BadRecordMac, rustls::Error::DecryptError));
                return opened;
            };
            if let Err(fault) = self.take_inner(inner, &mut opened.plaintext, peer_closed) {
                opened.result = Err(fault);
                return opened;
            }
        }
    }

    /// Acts on one opened record (`inner`: content, content type, zero padding); application
    /// data stays where it is and counts into `plaintext`.
    fn take_inner(
        &mut self,
        inner: &[u8],
        plaintext: &mut usize,
        peer_closed: &mut bool,
    ) -> Result<(), Fault> {
        // The content type is the last non-zero byte; zeros after it are padding.
        let Some(type_at) = inner.iter().rposition(|&b| b != 0) else {
            return Err(self.refuse(
                AlertDescription::UnexpectedMessage,
                rustls::Error::InvalidMessage(InvalidMessage::InvalidContentType),
            ));
        };
        let (content, inner_type) = inner.split_at(type_at);
        if content.len() > MAX_PLAINTEXT {
            return Err(self.refuse(
                AlertDescription::RecordOverflow,
                rustls::Error::PeerSentOversizedRecord,
            ));
        }
        match inner_type.first().copied() {
            Some(APPLICATION_DATA) => {
                *plaintext += content.len();
                Ok(())
            }
            Some(ALERT) => self.on_alert(content, peer_closed),
            Some(HANDSHAKE) => self.on_handshake(content),
            other => Err(self.refuse(
                AlertDescription::UnexpectedMessage,
                rustls::Error::InappropriateMessage {
                    expect_types: vec![ContentType::ApplicationData],
                    got_type: ContentType::from(other.unwrap_or_default()),
                },
            )),
        }
    }

    fn on_alert(&mut self, content: &[u8], peer_closed: &mut bool) -> Result<(), Fault> {
        let &[_level, description] = content else {
            return Err(self.refuse(
                AlertDescription::DecodeError,
                rustls::Error::InvalidMessage(InvalidMessage::MissingData("alert")),
            ));
        };
        match AlertDescription::from(description) {
            AlertDescription::CloseNotify => {
                self.peer_closed = true;
                *peer_closed = true;
                Ok(())
            }
            // A warning in TLS 1.3 only for this one; the peer goes on (RFC 8446 §6.1).
            AlertDescription::UserCanceled => Ok(()),
            other => Err(Fault::Tls(rustls::Error::AlertReceived(other))),
        }
    }

    /// Post-handshake messages (RFC 8446 §4.6), whole within the record: a peer of ours never
    /// sends one larger than a record.
    fn on_handshake(&mut self, mut content: &[u8]) -> Result<(), Fault> {
        while !content.is_empty() {
            let Some(&[typ, a, b, c]) = content.get(..4) else {
                return Err(self.refuse_message(InvalidMessage::MessageTooShort));
            };
            let len = u32::from_be_bytes([0, a, b, c]) as usize;
            let Some(body) = content.get(4..4 + len) else {
                return Err(self.refuse_message(InvalidMessage::MessageTooShort));
            };
            content = content.get(4 + len..).unwrap_or_default();
            match typ {
                KEY_UPDATE => {
                    // It must end its record: what follows was sealed with the old key.
                    if !content.is_empty() {
                        return Err(self.refuse(
                            AlertDescription::UnexpectedMessage,
                            rustls::Error::PeerMisbehaved(
                                PeerMisbehaved::KeyEpochWithPendingFragment,
                            ),
                        ));
                    }
                    match body {
                        [0] => {}
                        [1] => self.key_update_due = true,
                        _ => {
                            return Err(self.refuse(
                                AlertDescription::IllegalParameter,
                                rustls::Error::InvalidMessage(InvalidMessage::InvalidKeyUpdate),
                            ));
                        }
                    }
                    let next = self.kernel.next_rx().map_err(Fault::Tls)?;
                    self.rx = Keys::new(next)?;
                    KEY_UPDATES_RECEIVED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                NEW_SESSION_TICKET => match &mut self.kernel {
                    Kernel::Client(kernel) => kernel
                        .handle_new_session_ticket(body)
                        .map_err(|e| self.refuse(AlertDescription::DecodeError, e))?,
                    Kernel::Server(_) => {
                        return Err(self.refuse_message(InvalidMessage::UnexpectedMessage(
                            "NewSessionTicket from a client",
                        )));
                    }
                },
                _ => {
                    return Err(self.refuse_message(InvalidMessage::UnexpectedMessage(
                        "a post-handshake message other than KeyUpdate or NewSessionTicket",
                    )));
                }
            }
        }
        Ok(())
    }

    fn refuse_message(&mut self, message: InvalidMessage) -> Fault {
        self.refuse(
            AlertDescription::UnexpectedMessage,
            rustls::Error::InvalidMessage(message),
        )
    }

    /// Records the alert to send for bad input and returns the failure.
    fn refuse(&mut self, alert: AlertDescription, error: rustls::Error) -> Fault {
        self.alert_due.get_or_insert(alert);
        Fault::Tls(error)
    }

    /// After input failed: appends the fatal alert owed to the peer, if any, to `out`.
    pub(super) fn encode_alert(&mut self, out: &mut Vec<u8>) {
        if let Some(alert) = self.alert_due.take() {
            let start = out.len();
            out.resize(start + OVERHEAD + 2, 0);
            let sealed = self.seal(ALERT, &[&[2, u8::from(alert)]], &mut out[start..]);
            out.truncate(start + sealed.unwrap_or(0));
        }
    }

    /// Seals one record of `inner_type` holding `pieces` (at most [`MAX_PLAINTEXT`] bytes in
    /// all) into the front of `out`, which the caller made large enough; returns its length.
    fn seal(
        &mut self,
        inner_type: u8,
        pieces: &[&[u8]],
        out: &mut [u8],
    ) -> Result<usize, EncryptError> {
        let len: usize = pieces.iter().map(|p| p.len()).sum();
        let total = HEADER + len + 1 + TAG;
        let Some(record) = out.get_mut(..total) else {
            return Err(InsufficientSizeError {
                required_size: total,
            }
            .into());
        };
        let body_len = u16::try_from(len + 1 + TAG).map_err(|_| EncryptError::EncryptExhausted)?;
        let (header, body) = record.split_at_mut(HEADER);
        let [hi, lo] = body_len.to_be_bytes();
        header.copy_from_slice(&[APPLICATION_DATA, 0x03, 0x03, hi, lo]);
        let mut at = 0;
        for piece in pieces {
            if let Some(dst) = body.get_mut(at..at + piece.len()) {
                dst.copy_from_slice(piece);
            }
            at += piece.len();
        }
        let (inner, tag_room) = body.split_at_mut(len + 1);
        if let Some(t) = inner.last_mut() {
            *t = inner_type;
        }
        let aad = aead::Aad::from([APPLICATION_DATA, 0x03, 0x03, hi, lo]);
        let nonce = self
            .tx
            .next_nonce()
            .map_err(|_| EncryptError::EncryptExhausted)?;
        let tag = self
            .tx
            .key
            .seal_in_place_separate_tag(nonce, aad, inner)
            .map_err(|_| EncryptError::EncryptExhausted)?;
        tag_room.copy_from_slice(tag.as_ref());
        if self.tx.seq >= self.tx_limit {
            self.key_update_due = true;
        }
        Ok(total)
    }

    /// Room a [`Self::seal_gathered`] call needs: its record and a KeyUpdate before it.
    fn room_for(&self, len: usize) -> usize {
        len + OVERHEAD + if self.key_update_due { OVERHEAD + 5 } else { 0 }
    }

    /// Sends our KeyUpdate (sealed with the old key), then switches to the next key.
    fn update_tx_key(&mut self, out: &mut [u8]) -> Result<usize, EncryptError> {
        let n = self.seal(HANDSHAKE, &[&KEY_UPDATE_NOT_REQUESTED], out)?;
        let next = self
            .kernel
            .next_tx()
            .map_err(|_| EncryptError::EncryptExhausted)?;
        self.tx = Keys::new(next).map_err(|_| EncryptError::EncryptExhausted)?;
        self.key_update_due = false;
        KEY_UPDATES_SENT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }

    /// Seals one application-data record holding `pieces` (at most [`MAX_PLAINTEXT`] bytes),
    /// preceded by our KeyUpdate when one is due. Writes nothing if `out` is too small.
    fn seal_gathered(&mut self, pieces: &[&[u8]], out: &mut [u8]) -> Result<usize, EncryptError> {
        let len: usize = pieces.iter().map(|p| p.len()).sum();
        let required_size = self.room_for(len);
        if out.len() < required_size {
            return Err(InsufficientSizeError { required_size }.into());
        }
        let mut written = 0;
        if self.key_update_due {
            written += self.update_tx_key(out)?;
        }
        written += self.seal(
            APPLICATION_DATA,
            pieces,
            out.get_mut(written..).unwrap_or_default(),
        )?;
        Ok(written)
    }
}

impl super::session::Encrypt for RecordLayer {
    fn encrypt(&mut self, plaintext: &[u8], out: &mut [u8]) -> Result<usize, EncryptError> {
        let records = plaintext.len().div_ceil(MAX_PLAINTEXT).max(1);
        // Room for a KeyUpdate before every record: nothing may be written unless all fits.
        let required_size = plaintext.len() + records * (2 * OVERHEAD + 5);
        if out.len() < required_size {
            return Err(InsufficientSizeError { required_size }.into());
        }
        let mut written = 0;
        for chunk in plaintext.chunks(MAX_PLAINTEXT) {
            let room = out.get_mut(written..).unwrap_or_default();
            written += self.seal_gathered(&[chunk], room)?;
        }
        Ok(written)
    }

    fn gathers(&self) -> bool {
        true
    }

    fn encrypt_gathered(
        &mut self,
        pieces: &[&[u8]],
        out: &mut [u8],
    ) -> Option<Result<usize, EncryptError>> {
        Some(self.seal_gathered(pieces, out))
    }

    fn close_notify(&mut self, out: &mut [u8]) -> Result<usize, EncryptError> {
        self.seal(ALERT, &[&[1, u8::from(AlertDescription::CloseNotify)]], out)
    }
}
