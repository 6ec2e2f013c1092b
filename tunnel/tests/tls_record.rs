//! Our TLS 1.3 record layer, which takes over from rustls after the handshake: key updates
//! in both directions, interoperation with rustls's own records in both roles, and a
//! tampered record. A binary of its own: it makes every connection of the process update its
//! sending key every few records.
#![allow(clippy::unwrap_used)] // test harness: a failed unwrap is a failed test

mod common;

use std::{sync::Arc, time::Duration};

use bytes::BytesMut;
use common::pair::{DEADLINE, Driver, Pki, exchange_both_ways, listen, relay, run};
use monoio::net::TcpStream;
use rustls::{client::ClientConfig, server::ServerConfig};
use tunnel::tls::{self, TlsError};

/// Records sealed with one key before the next: a 2 MiB transfer goes through dozens of keys.
const UPDATE_EVERY: u64 = 3;
const TOTAL: u64 = 2 * 1024 * 1024;

async fn both_ways(server_config: Arc<ServerConfig>, client_config: Arc<ClientConfig>) {
    exchange_both_ways(server_config, client_config, TOTAL).await;
}

/// Each side of a 2 MiB exchange seals about 130 records: at one key per 3 records, each
/// direction goes through 40 or more KeyUpdates, each answered by the peer's new key.
#[test]
fn key_updates_every_few_records_keep_both_directions_intact() {
    tls::set_key_update_after(UPDATE_EVERY);
    for driver in [Driver::Fusion, Driver::Legacy] {
        run(driver, || async {
            let (sent_before, received_before) = tls::key_updates();
            let pki = Pki::new();
            both_ways(pki.server_config(), pki.client_config()).await;
            let (sent, received) = tls::key_updates();
            assert!(sent - sent_before >= 80, "{driver:?}: {sent} sent");
            assert!(
                received - received_before >= 80,
                "{driver:?}: {received} received"
            );
        });
    }
}

/// Our records (and our KeyUpdates) are read by rustls, and rustls's records by us, with
/// either side as the server.
#[test]
fn our_records_and_rustls_records_interoperate_in_both_roles() {
    tls::set_key_update_after(UPDATE_EVERY);
    run(Driver::Fusion, || async {
        let mut pki = Pki::new();
        let ours = (pki.server_config(), pki.client_config());
        pki.record_layer = false;
        let theirs = (pki.server_config(), pki.client_config());

        let (sent_before, _) = tls::key_updates();
        both_ways(theirs.0, ours.1).await; // rustls server, our client
        both_ways(ours.0, theirs.1).await; // our server, rustls client
        let (sent, _) = tls::key_updates();
        // Only our side updates keys here (rustls would after millions of records): each of
        // its KeyUpdates was accepted by rustls, or the transfer would have failed.
        assert!(sent - sent_before >= 80, "{sent} sent");
    });
}

/// One bit flipped in a record on the way: the reader refuses it (the AEAD tag does not
/// match), and tells the writer so with a bad_record_mac alert.
#[test]
fn a_tampered_record_is_refused_and_the_peer_told_why() {
    run(Driver::Fusion, || async {
        let pki = Pki::new();
        let (server_listener, server_addr) = listen().await;
        let (relay_listener, relay_addr) = listen().await;
        let server_config = pki.server_config();
        let server = monoio::spawn(async move {
            let (tcp, _) = server_listener.accept().await.unwrap();
            let conn = tls::accept(tcp, server_config, DEADLINE).await.unwrap();
            let (mut rd, mut wr) = conn.split();
            let block = vec![0x5A; 64 * 1024];
            for _ in 0..16 {
                if wr.write_all(&[&block]).await.is_err() {
                    break;
                }
            }
            // The client's answer to the tampered record.
            let mut buf = BytesMut::new();
            loop {
                match monoio::time::timeout(DEADLINE, rd.read(&mut buf)).await {
                    Ok(Ok(0)) => panic!("clean close instead of an alert"),
                    Ok(Ok(_)) => buf.clear(),
                    Ok(Err(e)) => break e,
                    Err(_) => panic!("no alert reached the server"),
                }
            }
        });
        // Well past the handshake, flip one bit of one chunk.
        monoio::spawn(relay(
            relay_listener,
            server_addr,
            16 * 1024,
            Duration::ZERO,
            |forwarded, mut chunk| {
                if (256 * 1024..272 * 1024).contains(&forwarded) {
                    if let Some(byte) = chunk.get_mut(100) {
                        *byte ^= 0x01;
                    }
                }
                Some(chunk)
            },
        ));
        let tcp = TcpStream::connect_addr(relay_addr).await.unwrap();
        let client = tls::connect(tcp, pki.client_config(), common::localhost(), DEADLINE)
            .await
            .unwrap();
        let (mut rd, _wr) = client.split();
        let mut buf = BytesMut::new();
        let mut good = 0;
        let err = loop {
            match monoio::time::timeout(DEADLINE, rd.read(&mut buf)).await {
                Ok(Ok(0)) => panic!("clean end after a tampered record"),
                Ok(Ok(n)) => good += n,
                Ok(Err(e)) => break e,
                Err(_) => panic!("the read hung after a tampered record"),
            }
        };
        eprintln!("client, after {good} good bytes: {err}");
        assert!(matches!(err, TlsError::Tls { .. }), "{err}");
        assert!(err.to_string().contains("decrypt"), "{err}");
        assert!(
            good < 272 * 1024,
            "{good} bytes delivered past the tampered record"
        );
        let server_err = server.await;
        eprintln!("server: {server_err}");
        assert!(
            server_err.to_string().contains("BadRecordMac"),
            "{server_err}"
        );
    });
}

// ---------------------------------------------------------------------------------------------
// A crafted peer: rustls does the handshake on a plain socket, then the test writes and reads
// raw records with the traffic secrets rustls logged, so it can send what no well-behaved
// peer sends.

mod crafted {
    use std::{
        io::{Read, Write},
        net::{TcpListener, TcpStream},
        sync::{Arc, Mutex},
    };

    use ring::{aead, hkdf};
    use rustls::{KeyLog, ServerConfig, ServerConnection, server::WebPkiClientVerifier};

    use super::common::{Ca, Leaf};

    /// The traffic secrets rustls computed, by NSS key-log label.
    #[derive(Debug, Default)]
    struct Secrets(Mutex<Vec<(String, Vec<u8>)>>);

    impl KeyLog for Secrets {
        fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
            self.0
                .lock()
                .unwrap()
                .push((label.to_owned(), secret.to_vec()));
        }
        fn will_log(&self, _label: &str) -> bool {
            true
        }
    }

    impl Secrets {
        fn get(&self, label: &str) -> Vec<u8> {
            let all = self.0.lock().unwrap();
            all.iter().find(|(l, _)| l == label).unwrap().1.clone()
        }
    }

    struct Len(usize);
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }

    /// HKDF-Expand-Label of RFC 8446 §7.1, SHA-256, empty context.
    fn expand_label(secret: &[u8], label: &str, len: usize) -> Vec<u8> {
        let full = format!("tls13 {label}");
        let mut info = Vec::new();
        info.extend_from_slice(&(len as u16).to_be_bytes());
        info.push(full.len() as u8);
        info.extend_from_slice(full.as_bytes());
        info.push(0);
        let prk = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, secret);
        let mut out = vec![0; len];
        prk.expand(&[&info], Len(len))
            .unwrap()
            .fill(&mut out)
            .unwrap();
        out
    }

    /// One direction of the connection, AES-128-GCM-SHA256.
    pub struct Direction {
        secret: Vec<u8>,
        key: aead::LessSafeKey,
        iv: Vec<u8>,
        seq: u64,
    }

    impl Direction {
        fn new(secret: Vec<u8>) -> Self {
            let key = expand_label(&secret, "key", 16);
            let iv = expand_label(&secret, "iv", 12);
            let key =
                aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_128_GCM, &key).unwrap());
            Self {
                secret,
                key,
                iv,
                seq: 0,
            }
        }

        /// The next generation of keys (a KeyUpdate).
        pub fn update(&mut self) {
            *self = Self::new(expand_label(&self.secret, "traffic upd", 32));
        }

        fn nonce(&mut self) -> aead::Nonce {
            let mut nonce = [0u8; 12];
            nonce.copy_from_slice(&self.iv);
            for (n, s) in nonce.iter_mut().skip(4).zip(self.seq.to_be_bytes()) {
                *n ^= s;
            }
            self.seq += 1;
            aead::Nonce::assume_unique_for_key(nonce)
        }

        /// A record with this inner content type and content.
        pub fn seal(&mut self, inner_type: u8, content: &[u8]) -> Vec<u8> {
            let mut body = content.to_vec();
            body.push(inner_type);
            let len = (body.len() + 16) as u16;
            let header = [0x17, 3, 3, (len >> 8) as u8, len as u8];
            let nonce = self.nonce();
            self.key
                .seal_in_place_append_tag(nonce, aead::Aad::from(header), &mut body)
                .unwrap();
            let mut record = header.to_vec();
            record.extend_from_slice(&body);
            record
        }

        /// Reads one record from `sock`; its inner type and content.
        pub fn open(&mut self, sock: &mut TcpStream) -> (u8, Vec<u8>) {
            let mut header = [0u8; 5];
            sock.read_exact(&mut header).unwrap();
            let len = u16::from_be_bytes([header[3], header[4]]) as usize;
            let mut body = vec![0; len];
            sock.read_exact(&mut body).unwrap();
            let nonce = self.nonce();
            let plain = self
                .key
                .open_in_place(nonce, aead::Aad::from(header), &mut body)
                .unwrap();
            let at = plain.iter().rposition(|&b| b != 0).unwrap();
            (plain[at], plain[..at].to_vec())
        }
    }

    /// A rustls server on a plain socket: after the handshake, `script` gets the socket and
    /// both directions' keys (what it sends, what it receives).
    pub fn serve(
        ca: &Ca,
        server: &Leaf,
        script: impl FnOnce(TcpStream, Direction, Direction) + Send + 'static,
    ) -> (std::net::SocketAddr, std::thread::JoinHandle<()>) {
        let secrets = Arc::new(Secrets::default());
        let provider = rustls::crypto::CryptoProvider {
            cipher_suites: vec![rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256],
            ..rustls::crypto::ring::default_provider()
        };
        let provider = Arc::new(provider);
        let verifier = WebPkiClientVerifier::builder_with_provider(ca.roots(), provider.clone())
            .build()
            .unwrap();
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(server.chain.clone(), server.key())
            .unwrap();
        config.key_log = secrets.clone();
        config.send_tls13_tickets = 0;
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = std::thread::spawn(move || {
            let (mut sock, _) = listener.accept().unwrap();
            let mut conn = ServerConnection::new(config).unwrap();
            while conn.is_handshaking() {
                conn.complete_io(&mut sock).unwrap();
            }
            while conn.wants_write() {
                conn.write_tls(&mut sock).unwrap();
            }
            sock.flush().unwrap();
            let tx = Direction::new(secrets.get("SERVER_TRAFFIC_SECRET_0"));
            let rx = Direction::new(secrets.get("CLIENT_TRAFFIC_SECRET_0"));
            script(sock, tx, rx);
        });
        (addr, handle)
    }
}

/// Our client connected to a crafted server running `script`.
async fn client_of_crafted(
    script: impl FnOnce(std::net::TcpStream, crafted::Direction, crafted::Direction) + Send + 'static,
) -> (tls::TlsConnection, std::thread::JoinHandle<()>) {
    let pki = Pki::new();
    let (addr, server) = crafted::serve(&pki.ca, &pki.server, script);
    let tcp = TcpStream::connect_addr(addr).await.unwrap();
    let client = tls::connect(tcp, pki.client_config(), common::localhost(), DEADLINE)
        .await
        .unwrap();
    (client, server)
}

/// The peer's KeyUpdate asking for ours: we follow its new key, and our next record is our
/// own KeyUpdate (not requesting one back), sealed with our old key, then data with the new.
#[test]
fn a_key_update_request_is_followed_and_answered() {
    run(Driver::Fusion, || async {
        let (mut client, server) = client_of_crafted(|mut sock, mut tx, mut rx| {
            use std::io::Write;
            sock.write_all(&tx.seal(0x17, b"hello")).unwrap();
            sock.write_all(&tx.seal(0x16, &[24, 0, 0, 1, 1])).unwrap(); // update_requested
            tx.update();
            sock.write_all(&tx.seal(0x17, b"after")).unwrap();
            assert_eq!(rx.open(&mut sock), (0x16, vec![24, 0, 0, 1, 0]));
            rx.update();
            assert_eq!(rx.open(&mut sock), (0x17, b"pong".to_vec()));
        })
        .await;
        let mut got = BytesMut::new();
        while got.len() < 10 {
            client.read(&mut got).await.unwrap();
        }
        assert_eq!(&got[..], b"helloafter");
        client.write_all(&[b"pong"]).await.unwrap();
        server.join().unwrap();
    });
}

/// What no peer of ours sends, each on a connection of its own: the read fails with rustls's
/// words for it, and the crafted peer receives the alert RFC 8446 prescribes (or, after the
/// peer's own fatal alert, none).
#[test]
fn malformed_records_are_refused_with_the_right_alert() {
    // (what the peer sends, a phrase of the error, the alert description we send back)
    type Craft = fn(&mut crafted::Direction) -> Vec<u8>;
    let cases: Vec<(&str, Craft, &str, Option<u8>)> = vec![
        (
            "no content type",
            |tx| tx.seal(0, &[]),
            "InvalidContentType",
            Some(10),
        ),
        (
            "alert of 3 bytes",
            |tx| tx.seal(0x15, &[2, 40, 1]),
            "corrupt message",
            Some(50),
        ),
        (
            "Finished after the handshake",
            |tx| tx.seal(0x16, &[20, 0, 0, 0]),
            "UnexpectedMessage",
            Some(10),
        ),
        (
            "KeyUpdate not ending its record",
            |tx| tx.seal(0x16, &[24, 0, 0, 1, 0, 24, 0, 0, 1, 0]),
            "KeyEpochWithPendingFragment",
            Some(10),
        ),
        (
            "KeyUpdate with a bad value",
            |tx| tx.seal(0x16, &[24, 0, 0, 1, 7]),
            "InvalidKeyUpdate",
            Some(47),
        ),
        (
            "oversized record",
            |_| [&[0x17, 3, 3, 0x4f, 0x20][..], &[0; 64]].concat(),
            "excess record size",
            Some(22),
        ),
        (
            "ChangeCipherSpec after the handshake",
            |_| vec![0x14, 3, 3, 0, 1, 1],
            "ChangeCipherSpec",
            Some(10),
        ),
        (
            "fatal alert from the peer",
            |tx| tx.seal(0x15, &[2, 40]),
            "HandshakeFailure",
            None,
        ),
    ];
    for (what, craft, phrase, alert) in cases {
        run(Driver::Fusion, || async move {
            let (client, server) = client_of_crafted(move |mut sock, mut tx, mut rx| {
                use std::io::Write;
                sock.write_all(&craft(&mut tx)).unwrap();
                if let Some(alert) = alert {
                    assert_eq!(rx.open(&mut sock), (0x15, vec![2, alert]), "{what}");
                }
            })
            .await;
            let (mut rd, _wr) = client.split();
            let mut buf = BytesMut::new();
            let err = monoio::time::timeout(DEADLINE, rd.read(&mut buf))
                .await
                .unwrap()
                .unwrap_err();
            eprintln!("{what}: {err}");
            assert!(matches!(err, TlsError::Tls { .. }), "{what}: {err}");
            assert!(err.to_string().contains(phrase), "{what}: {err}");
            server.join().unwrap();
        });
    }
}

/// A user_canceled warning is not the end: data after it arrives.
#[test]
fn a_user_canceled_warning_does_not_end_the_connection() {
    run(Driver::Fusion, || async {
        let (mut client, server) = client_of_crafted(|mut sock, mut tx, _rx| {
            use std::io::Write;
            sock.write_all(&tx.seal(0x15, &[1, 90])).unwrap();
            sock.write_all(&tx.seal(0x17, b"still here")).unwrap();
            sock.write_all(&tx.seal(0x15, &[1, 0])).unwrap(); // close_notify
        })
        .await;
        let mut got = BytesMut::new();
        while client.read(&mut got).await.unwrap() > 0 {}
        assert_eq!(&got[..], b"still here");
        server.join().unwrap();
    });
}

/// A read appends after what the caller kept (the start of a frame, for the multiplexer):
/// whether it hands over its whole receive buffer (large reads) or copies (small ones), the
/// kept bytes stay in front and the stream stays whole.
#[test]
fn bytes_the_caller_kept_stay_in_front_of_what_a_read_appends() {
    use bytes::Buf;
    run(Driver::Fusion, || async {
        let pki = Pki::new();
        let (client, server) = common::pair::connect_pair(&pki).await;
        let (_c_rd, mut c_wr) = client.split();
        let (mut s_rd, _s_wr) = server.split();
        let send = monoio::spawn(async move {
            // Small writes, paced so that each arrives on its own, then bulk.
            let mut sent = 0u64;
            while sent < TOTAL {
                let len = if sent < 20_000 { 1_000 } else { 200_000 };
                let len = len.min((TOTAL - sent) as usize);
                let bytes = common::pattern(7, sent, len);
                c_wr.write_all(&[&bytes]).await.unwrap();
                sent += len as u64;
                if sent <= 20_000 {
                    monoio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            c_wr.close().await.unwrap();
        });
        let mut buf = BytesMut::new();
        let mut offset = 0u64; // the stream offset of buf[0]
        let (mut large, mut small) = (0, 0);
        loop {
            let before = buf.len();
            let n = s_rd.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            assert_eq!(buf.len(), before + n);
            if n >= 64 * 1024 {
                large += 1
            } else {
                small += 1
            }
            assert_eq!(
                &buf[..],
                &common::pattern(7, offset, buf.len())[..],
                "at {offset}"
            );
            // Keep an odd-sized tail, as a decoder keeps an incomplete frame.
            let keep = buf.len().min(777 + n % 5000);
            offset += (buf.len() - keep) as u64;
            buf.advance(buf.len() - keep);
        }
        assert_eq!(offset + buf.len() as u64, TOTAL);
        eprintln!("{large} large reads, {small} small");
        assert!(large > 0 && small > 0, "{large} large reads, {small} small");
        send.await;
    });
}
