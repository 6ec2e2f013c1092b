//! `tunnel::tls` against real rustls configs (mutual TLS with throwaway certificates), on real
//! loopback sockets, on both monoio drivers.
#![allow(clippy::unwrap_used)] // test harness: a failed unwrap is a failed test

mod common;

use common::{
    Ca, localhost,
    pair::{
        DEADLINE, Driver, Pki, connect_pair, exchange_both_ways, listen, read_and_check, relay,
        run, write_pattern,
    },
    pattern, provider,
};

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::BytesMut;
use monoio::{
    io::{AsyncWriteRent, AsyncWriteRentExt},
    net::TcpStream,
};
use rcgen::ExtendedKeyUsagePurpose;
use rustls::{
    client::ClientConfig,
    server::{ServerConfig, WebPkiClientVerifier},
};
use tunnel::tls::{self, TlsConnection, TlsError};

// ---------------------------------------------------------------------------------------------
// 1. Bidirectional bulk transfer

fn bidirectional(driver: Driver) {
    run(driver, || async {
        const TOTAL: u64 = 16 * 1024 * 1024;
        let pki = Pki::new();
        let started = Instant::now();
        exchange_both_ways(pki.server_config(), pki.client_config(), TOTAL).await;
        eprintln!("{driver:?}: 2 x 16 MiB in {:?}", started.elapsed());
    });
}

#[test]
fn bidirectional_16_mib_fusion() {
    bidirectional(Driver::Fusion);
}

#[test]
fn bidirectional_16_mib_legacy() {
    bidirectional(Driver::Legacy);
}

/// The mux's shape: one task, one select loop, reading and flushing concurrently, with both
/// peers writing much more than the socket buffers hold.
fn single_task_select(driver: Driver) {
    run(driver, || async {
        const TOTAL: u64 = 4 * 1024 * 1024;
        let pki = Pki::new();
        let (client, server) = connect_pair(&pki).await;

        async fn pump(conn: TlsConnection, seed_out: u64, seed_in: u64) {
            let (mut rd, mut wr) = conn.split();
            let mut sent = 0u64;
            let mut received = 0u64;
            let mut peer_done = false;
            let mut closed = false;
            let mut buf = BytesMut::new();
            while !(peer_done && closed) {
                // Queue more while little is pending, like a mux pulling frames.
                while sent < TOTAL && wr.pending() < 256 * 1024 {
                    let len = (32 * 1024).min((TOTAL - sent) as usize);
                    let bytes = pattern(seed_out, sent, len);
                    wr.queue(&[&bytes[..4], &bytes[4..]]).unwrap();
                    sent += len as u64;
                }
                if sent == TOTAL && wr.pending() == 0 && !closed {
                    wr.close().await.unwrap();
                    closed = true;
                }
                monoio::select! {
                    r = rd.read(&mut buf), if !peer_done => {
                        let n = r.unwrap();
                        if n == 0 {
                            peer_done = true;
                        } else {
                            assert_eq!(&buf[..], &pattern(seed_in, received, n)[..]);
                            received += n as u64;
                            buf.clear();
                        }
                    }
                    r = wr.flush(), if wr.pending() > 0 => r.unwrap(),
                    _ = monoio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
            assert_eq!(received, TOTAL);
        }

        let a = monoio::spawn(pump(client, 10, 20));
        pump(server, 20, 10).await;
        a.await;
    });
}

#[test]
fn single_task_select_loop_fusion() {
    single_task_select(Driver::Fusion);
}

#[test]
fn single_task_select_loop_legacy() {
    single_task_select(Driver::Legacy);
}

// ---------------------------------------------------------------------------------------------
// 2. Peer certificates

#[test]
fn peer_certificates_visible_after_mutual_tls() {
    run(Driver::Fusion, || async {
        let pki = Pki::new();
        let (client, server) = connect_pair(&pki).await;
        let seen_by_server = server.peer_certificates().expect("client certificate");
        assert_eq!(seen_by_server[0], pki.client.chain[0]);
        let seen_by_client = client.peer_certificates().expect("server certificate");
        assert_eq!(seen_by_client[0], pki.server.chain[0]);
        assert_eq!(server.peer_addr(), client.local_addr());
        assert_eq!(client.peer_addr(), server.local_addr());
        assert_eq!(
            client.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        let (reader, _writer) = server.split();
        assert_eq!(reader.peer_certificates().unwrap()[0], pki.client.chain[0]);
    });
}

// ---------------------------------------------------------------------------------------------
// 3. Client certificate required

/// Connects with `client_config` and returns the client's error, from the handshake or from
/// the first read (in TLS 1.3 the client finishes before the server has judged its
/// certificate).
async fn client_outcome(addr: SocketAddr, client_config: Arc<ClientConfig>) -> TlsError {
    let tcp = TcpStream::connect_addr(addr).await.unwrap();
    match tls::connect(tcp, client_config, localhost(), DEADLINE).await {
        Err(e) => e,
        Ok(mut conn) => {
            let mut buf = BytesMut::new();
            match monoio::time::timeout(DEADLINE, conn.read(&mut buf)).await {
                Ok(Err(e)) => e,
                other => panic!("a refused client read {other:?}"),
            }
        }
    }
}

fn server_rejects(driver: Driver) {
    run(driver, || async {
        let pki = Pki::new();
        let other_ca = Ca::new("some other ca");
        let stranger = other_ca.leaf(&["node-x"], ExtendedKeyUsagePurpose::ClientAuth);
        let (listener, addr) = listen().await;
        let server_config = pki.server_config();

        // The server loop: accepts three connections one after the other, echoes on the good
        // ones, reports the outcome of each.
        let server = monoio::spawn(async move {
            let mut outcomes = Vec::new();
            for _ in 0..3 {
                let (tcp, _) = listener.accept().await.unwrap();
                match tls::accept(tcp, server_config.clone(), DEADLINE).await {
                    Err(e) => outcomes.push(Err(e)),
                    Ok(mut conn) => {
                        let mut buf = BytesMut::new();
                        match conn.read(&mut buf).await {
                            Ok(n) if n > 0 => {
                                conn.write_all(&[&buf[..]]).await.unwrap();
                                conn.close().await.unwrap();
                                outcomes.push(Ok(()));
                            }
                            Ok(_) => outcomes.push(Ok(())),
                            Err(e) => outcomes.push(Err(e)),
                        }
                    }
                }
            }
            outcomes
        });

        let no_cert = client_outcome(addr, pki.client_config_with(None)).await;
        eprintln!("client without certificate: {no_cert}");
        assert!(no_cert.is_certificate_error(), "{no_cert}");

        let wrong_ca = client_outcome(addr, pki.client_config_with(Some(&stranger))).await;
        eprintln!("client from another ca: {wrong_ca}");
        assert!(wrong_ca.is_certificate_error(), "{wrong_ca}");

        // A good client is still served.
        let tcp = TcpStream::connect_addr(addr).await.unwrap();
        let mut good = tls::connect(tcp, pki.client_config(), localhost(), DEADLINE)
            .await
            .unwrap();
        good.write_all(&[b"ping"]).await.unwrap();
        let mut buf = BytesMut::new();
        good.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..], b"ping");

        let outcomes = server.await;
        let first = outcomes[0].as_ref().unwrap_err();
        eprintln!("server, client without certificate: {first}");
        assert!(
            matches!(
                first,
                TlsError::Tls {
                    source: rustls::Error::NoCertificatesPresented,
                    ..
                }
            ),
            "{first}"
        );
        let second = outcomes[1].as_ref().unwrap_err();
        eprintln!("server, client from another ca: {second}");
        assert!(
            matches!(
                second,
                TlsError::Tls {
                    source: rustls::Error::InvalidCertificate(
                        rustls::CertificateError::UnknownIssuer
                    ),
                    ..
                }
            ),
            "{second}"
        );
        assert!(second.to_string().contains("UnknownIssuer"), "{second}");
        assert!(outcomes[2].is_ok());
    });
}

#[test]
fn server_rejects_missing_or_foreign_client_certificate() {
    server_rejects(Driver::Fusion);
}

#[test]
fn server_rejects_missing_or_foreign_client_certificate_legacy() {
    server_rejects(Driver::Legacy);
}

// ---------------------------------------------------------------------------------------------
// 4. Garbage from the network

fn garbage_inputs() -> Vec<Vec<u8>> {
    vec![
        // 100 pseudo-random bytes.
        pattern(99, 0, 100),
        // A handshake record header announcing 64 bytes of nonsense.
        [&[0x16, 0x03, 0x01, 0x00, 0x40][..], &[0xAB; 64][..]].concat(),
        // An application-data record before any handshake.
        [&[0x17, 0x03, 0x03, 0x00, 0x20][..], &[0x00; 32][..]].concat(),
        // A record header claiming an impossible length.
        vec![0x16, 0x03, 0x01, 0xFF, 0xFF, 1, 2, 3],
        // Half a record header, then close.
        vec![0x16, 0x03],
    ]
}

async fn good_connection_still_works(pki: &Pki) {
    let (mut client, mut server) = connect_pair(pki).await;
    client.write_all(&[b"still ", b"alive"]).await.unwrap();
    let mut buf = BytesMut::new();
    while buf.len() < 11 {
        server.read(&mut buf).await.unwrap();
    }
    assert_eq!(&buf[..], b"still alive");
}

fn garbage(driver: Driver) {
    run(driver, || async {
        let pki = Pki::new();
        for junk in garbage_inputs() {
            // A raw client sends junk to a TLS server.
            let (listener, addr) = listen().await;
            let server_config = pki.server_config();
            let server = monoio::spawn(async move {
                let (tcp, _) = listener.accept().await.unwrap();
                tls::accept(tcp, server_config, DEADLINE).await
            });
            let mut raw = TcpStream::connect_addr(addr).await.unwrap();
            let (r, _) = raw.write_all(junk.clone()).await;
            r.unwrap();
            raw.shutdown().await.unwrap();
            let err = server.await.expect_err("the server accepted junk");
            eprintln!("server given {} junk bytes: {err}", junk.len());
            drop(raw);

            // A raw server answers a TLS client with junk.
            let (listener, addr) = listen().await;
            let raw_server = monoio::spawn(async move {
                let (mut tcp, _) = listener.accept().await.unwrap();
                let (r, _) = tcp.write_all(junk).await;
                r.unwrap();
                // Keep the connection open a moment: the client must fail on the junk itself.
                monoio::time::sleep(Duration::from_millis(100)).await;
            });
            let tcp = TcpStream::connect_addr(addr).await.unwrap();
            let err = tls::connect(tcp, pki.client_config(), localhost(), DEADLINE)
                .await
                .expect_err("the client accepted junk");
            eprintln!("client given junk: {err}");
            raw_server.await;
        }
        good_connection_still_works(&pki).await;
    });
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    garbage(Driver::Fusion);
}

#[test]
fn garbage_is_an_error_not_a_panic_legacy() {
    garbage(Driver::Legacy);
}

/// The monoio-rustls failure: garbage arrives while the reader's own side has a large write
/// pending. The read fails, the write fails or completes, nothing panics.
fn garbage_mid_stream(driver: Driver) {
    run(driver, || async {
        let pki = Pki::new();
        let (server_listener, server_addr) = listen().await;
        let (relay_listener, relay_addr) = listen().await;
        let server_config = pki.server_config();
        let server = monoio::spawn(async move {
            let (tcp, _) = server_listener.accept().await.unwrap();
            let conn = tls::accept(tcp, server_config, DEADLINE).await.unwrap();
            let (_rd, mut wr) = conn.split();
            // Stream to the client until it goes away; never read.
            let block = vec![0x5A; 64 * 1024];
            let mut result = Ok(());
            for _ in 0..512 {
                result = wr.write_all(&[&block]).await;
                if result.is_err() {
                    break;
                }
            }
            result
        });
        // After 200 KiB, the relay swaps a chunk for junk of the same length.
        monoio::spawn(relay(
            relay_listener,
            server_addr,
            16 * 1024,
            Duration::ZERO,
            |forwarded, chunk| {
                if (200 * 1024..216 * 1024).contains(&forwarded) {
                    Some(vec![0x17; chunk.len()])
                } else {
                    Some(chunk)
                }
            },
        ));

        let tcp = TcpStream::connect_addr(relay_addr).await.unwrap();
        let client = tls::connect(tcp, pki.client_config(), localhost(), DEADLINE)
            .await
            .unwrap();
        let (mut rd, mut wr) = client.split();
        // A big write towards a server that does not read: it stays pending.
        let writer = monoio::spawn(async move {
            let block = vec![0xA5; 1024 * 1024];
            let mut result = Ok(());
            for _ in 0..64 {
                result = wr.write_all(&[&block[..12], &block[12..]]).await;
                if result.is_err() {
                    break;
                }
            }
            result
        });
        let mut buf = BytesMut::new();
        let err = loop {
            buf.clear();
            match monoio::time::timeout(DEADLINE, rd.read(&mut buf)).await {
                Ok(Ok(0)) => panic!("clean end of stream after junk"),
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => break e,
                Err(_) => panic!("the read hung after junk"),
            }
        };
        eprintln!("reader after junk: {err}");
        assert!(matches!(err, TlsError::Tls { .. }), "{err}");
        // The same error again, not a panic, on the next read.
        assert!(rd.read(&mut buf).await.is_err());
        // The pending write ends (with an error: the session is dead) instead of hanging.
        let write_result = monoio::time::timeout(DEADLINE, writer)
            .await
            .expect("writer hung");
        assert!(write_result.is_err());
        drop(rd);
        let _ = monoio::time::timeout(DEADLINE, server).await;

        good_connection_still_works(&pki).await;
    });
}

#[test]
fn garbage_mid_stream_with_write_pending() {
    garbage_mid_stream(Driver::Fusion);
}

#[test]
fn garbage_mid_stream_with_write_pending_legacy() {
    garbage_mid_stream(Driver::Legacy);
}

// ---------------------------------------------------------------------------------------------
// 5. Cancelled reads

fn cancelled_reads(driver: Driver) {
    run(driver, || async {
        const TOTAL: u64 = 40 * 1024;
        let pki = Pki::new();
        let (server_listener, server_addr) = listen().await;
        let (relay_listener, relay_addr) = listen().await;
        let server_config = pki.server_config();
        let server = monoio::spawn(async move {
            let (tcp, _) = server_listener.accept().await.unwrap();
            let mut conn = tls::accept(tcp, server_config, DEADLINE).await.unwrap();
            let mut sent = 0u64;
            let mut step = 0u64;
            while sent < TOTAL {
                let len = (1 + (step * 613) % 3000).min(TOTAL - sent) as usize;
                let bytes = pattern(5, sent, len);
                conn.write_all(&[&bytes]).await.unwrap();
                sent += len as u64;
                step += 1;
                if step % 4 == 0 {
                    monoio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            conn.close().await.unwrap();
        });
        // The relay dribbles the server's records out 7 bytes at a time, so most reads are
        // cancelled in the middle of a record.
        monoio::spawn(relay(
            relay_listener,
            server_addr,
            7,
            Duration::from_micros(100),
            |_, chunk| Some(chunk),
        ));

        let tcp = TcpStream::connect_addr(relay_addr).await.unwrap();
        let mut client = tls::connect(tcp, pki.client_config(), localhost(), DEADLINE)
            .await
            .unwrap();
        let mut received = BytesMut::new();
        let mut cancelled = 0u32;
        let started = Instant::now();
        loop {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "transfer stalled"
            );
            match monoio::time::timeout(Duration::from_micros(300), client.read(&mut received))
                .await
            {
                Err(_) => cancelled += 1,
                Ok(Ok(0)) => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("read failed: {e}"),
            }
        }
        server.await;
        eprintln!("{driver:?}: {cancelled} reads cancelled");
        assert!(cancelled >= 100, "only {cancelled} reads were cancelled");
        assert_eq!(received.len() as u64, TOTAL);
        assert_eq!(&received[..], &pattern(5, 0, TOTAL as usize)[..]);
    });
}

#[test]
fn cancelled_reads_lose_and_duplicate_nothing() {
    cancelled_reads(Driver::Fusion);
}

#[test]
fn cancelled_reads_lose_and_duplicate_nothing_legacy() {
    cancelled_reads(Driver::Legacy);
}

// ---------------------------------------------------------------------------------------------
// 6. Handshake deadline

#[test]
fn handshake_deadline() {
    run(Driver::Fusion, || async {
        let pki = Pki::new();
        let deadline = Duration::from_millis(400);

        // Silent client.
        let (listener, addr) = listen().await;
        let _silent = TcpStream::connect_addr(addr).await.unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let started = Instant::now();
        let err = tls::accept(tcp, pki.server_config(), deadline)
            .await
            .expect_err("a silent client completed a handshake");
        assert!(matches!(err, TlsError::HandshakeTimeout { .. }), "{err}");
        assert!(started.elapsed() < deadline + Duration::from_secs(3));
        let text = err.to_string();
        eprintln!("{text}");
        assert!(text.contains("did not finish within") && text.contains("handshake_timeout"));

        // A client dribbling a ClientHello one byte every 50 ms.
        let (listener, addr) = listen().await;
        let dribbler = monoio::spawn(async move {
            let mut tcp = TcpStream::connect_addr(addr).await.unwrap();
            let hello = [
                0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xFC, 0x03, 0x03,
            ];
            for byte in hello.iter().cycle().take(40) {
                let (r, _) = tcp.write_all(vec![*byte]).await;
                if r.is_err() {
                    break;
                }
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let started = Instant::now();
        let err = tls::accept(tcp, pki.server_config(), deadline)
            .await
            .expect_err("a dribbling client completed a handshake");
        assert!(matches!(err, TlsError::HandshakeTimeout { .. }), "{err}");
        assert!(started.elapsed() < deadline + Duration::from_secs(3));
        dribbler.await;

        // And a client whose server never answers.
        let (listener, addr) = listen().await;
        let tcp = TcpStream::connect_addr(addr).await.unwrap();
        let _held = listener.accept().await.unwrap();
        let err = tls::connect(tcp, pki.client_config(), localhost(), deadline)
            .await
            .expect_err("handshake with a mute server");
        assert!(matches!(err, TlsError::HandshakeTimeout { .. }), "{err}");
    });
}

/// `accept_within`: a silent or trickling client is let go at the hello deadline, well before
/// the handshake deadline; an honest client completes under the same short hello deadline.
#[test]
fn hello_deadline() {
    run(Driver::Fusion, || async {
        let pki = Pki::new();
        let hello = Duration::from_millis(300);
        let deadline = Duration::from_secs(60);

        let (listener, addr) = listen().await;
        let _silent = TcpStream::connect_addr(addr).await.unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let err = tls::accept_within(tcp, pki.server_config(), hello, deadline)
            .await
            .expect_err("a silent client completed a handshake");
        assert!(matches!(err, TlsError::HelloTimeout { .. }), "{err}");
        assert!(err.to_string().contains("limits.hello_timeout"), "{err}");

        // Half a ClientHello record, then nothing.
        let (listener, addr) = listen().await;
        let mut partial = TcpStream::connect_addr(addr).await.unwrap();
        let (r, _) = partial
            .write_all(vec![0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
            .await;
        r.unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let err = tls::accept_within(tcp, pki.server_config(), hello, deadline)
            .await
            .expect_err("a partial ClientHello completed a handshake");
        assert!(matches!(err, TlsError::HelloTimeout { .. }), "{err}");

        // An honest client.
        let (listener, addr) = listen().await;
        let client = monoio::spawn({
            let config = pki.client_config();
            async move {
                let tcp = TcpStream::connect_addr(addr).await.unwrap();
                tls::connect(tcp, config, localhost(), deadline).await
            }
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let server = tls::accept_within(tcp, pki.server_config(), hello, deadline).await;
        assert!(server.is_ok(), "{:?}", server.err());
        assert!(client.await.is_ok());
    });
}

// ---------------------------------------------------------------------------------------------
// 7. Peer closes mid-transfer

fn peer_closes_mid_transfer(driver: Driver) {
    run(driver, || async {
        let pki = Pki::new();

        // The peer's TlsConnection is dropped mid-stream: no close_notify.
        let (mut client, server) = connect_pair(&pki).await;
        let dropper = monoio::spawn(async move {
            let mut server = server;
            let block = vec![1u8; 300 * 1024];
            server.write_all(&[&block]).await.unwrap();
            drop(server);
        });
        let mut buf = BytesMut::new();
        let mut total = 0;
        let err = loop {
            match monoio::time::timeout(DEADLINE, client.read(&mut buf)).await {
                Err(_) => panic!("the read hung after the peer went away"),
                Ok(Ok(0)) => panic!("a clean end without close_notify"),
                Ok(Ok(n)) => total += n,
                Ok(Err(e)) => break e,
            }
        };
        dropper.await;
        eprintln!("after {total} bytes: {err}");
        assert_eq!(total, 300 * 1024);
        assert!(matches!(err, TlsError::TruncatedByPeer { .. }), "{err}");
        // Writing to the gone peer fails, it does not panic (it may take a write or two for
        // the reset to arrive).
        let mut write_failed = false;
        for _ in 0..50 {
            if client.write_all(&[&[0u8; 1024][..]]).await.is_err() {
                write_failed = true;
                break;
            }
            monoio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(write_failed);

        // The TCP connection is cut in the middle of a record.
        let (server_listener, server_addr) = listen().await;
        let (relay_listener, relay_addr) = listen().await;
        let server_config = pki.server_config();
        let server = monoio::spawn(async move {
            let (tcp, _) = server_listener.accept().await.unwrap();
            let mut conn = tls::accept(tcp, server_config, DEADLINE).await.unwrap();
            let block = vec![2u8; 256 * 1024];
            let _ = conn.write_all(&[&block]).await;
            // Wait for the client to go.
            let mut buf = BytesMut::new();
            let _ = monoio::time::timeout(DEADLINE, conn.read(&mut buf)).await;
        });
        let cut_at = 100_000u64 + 3;
        monoio::spawn(relay(
            relay_listener,
            server_addr,
            4096,
            Duration::ZERO,
            move |forwarded, chunk| (forwarded < cut_at).then_some(chunk),
        ));
        let tcp = TcpStream::connect_addr(relay_addr).await.unwrap();
        let mut client = tls::connect(tcp, pki.client_config(), localhost(), DEADLINE)
            .await
            .unwrap();
        let mut buf = BytesMut::new();
        let err = loop {
            buf.clear();
            match monoio::time::timeout(DEADLINE, client.read(&mut buf)).await {
                Err(_) => panic!("the read hung after the cut"),
                Ok(Ok(0)) => panic!("a clean end after a cut"),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => break e,
            }
        };
        eprintln!("after the cut: {err}");
        assert!(matches!(err, TlsError::TruncatedByPeer { .. }), "{err}");
        drop(client);
        server.await;

        good_connection_still_works(&pki).await;
    });
}

#[test]
fn peer_closing_mid_transfer_is_an_error() {
    peer_closes_mid_transfer(Driver::Fusion);
}

#[test]
fn peer_closing_mid_transfer_is_an_error_legacy() {
    peer_closes_mid_transfer(Driver::Legacy);
}

// ---------------------------------------------------------------------------------------------
// Clean close

#[test]
fn close_notify_is_a_clean_end_and_writes_after_close_fail() {
    run(Driver::Fusion, || async {
        let pki = Pki::new();
        let (mut client, mut server) = connect_pair(&pki).await;
        client.write_all(&[b"bye"]).await.unwrap();
        client.close().await.unwrap();
        let err = client.write_all(&[b"more"]).await.unwrap_err();
        assert!(matches!(err, TlsError::WriteAfterClose { .. }), "{err}");

        let mut buf = BytesMut::new();
        assert_eq!(server.read(&mut buf).await.unwrap(), 3);
        assert_eq!(server.read(&mut buf).await.unwrap(), 0);
        assert_eq!(server.read(&mut buf).await.unwrap(), 0);
        // The server may still answer after the client's close_notify (half-close).
        server.write_all(&[b"late reply"]).await.unwrap();
        server.close().await.unwrap();
        let mut reply = BytesMut::new();
        while client.read(&mut reply).await.unwrap() > 0 {}
        assert_eq!(&reply[..], b"late reply");
    });
}

#[test]
fn socket_options() {
    run(Driver::Fusion, || async {
        let pki = Pki::new();
        let (client, _server) = connect_pair(&pki).await;
        client.set_notsent_lowat(16 * 1024).unwrap();
        client.set_nodelay(false).unwrap();
        client.set_nodelay(true).unwrap();
    });
}

// ---------------------------------------------------------------------------------------------
// TLS 1.2 and write shapes

#[test]
fn tls12_transfer_with_client_certificate() {
    run(Driver::Fusion, || async {
        let pki = Pki::new();
        let verifier = WebPkiClientVerifier::builder_with_provider(pki.ca.roots(), provider())
            .build()
            .unwrap();
        let server_config = Arc::new(
            ServerConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS12])
                .unwrap()
                .with_client_cert_verifier(verifier)
                .with_single_cert(pki.server.chain.clone(), pki.server.key())
                .unwrap(),
        );
        let (listener, addr) = listen().await;
        let server = monoio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let conn = tls::accept(tcp, server_config, DEADLINE).await.unwrap();
            assert!(conn.peer_certificates().is_some());
            let (mut rd, mut wr) = conn.split();
            // Echo until the client closes.
            let mut buf = BytesMut::new();
            while rd.read(&mut buf).await.unwrap() > 0 {
                wr.write_all(&[&buf[..]]).await.unwrap();
                buf.clear();
            }
            wr.close().await.unwrap();
        });
        let tcp = TcpStream::connect_addr(addr).await.unwrap();
        let conn = tls::connect(tcp, pki.client_config(), localhost(), DEADLINE)
            .await
            .unwrap();
        assert_eq!(
            conn.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_2)
        );
        let (mut rd, mut wr) = conn.split();
        let reader = monoio::spawn(async move { read_and_check(&mut rd, 3, 1 << 20).await });
        write_pattern(&mut wr, 3, 1 << 20).await;
        assert_eq!(reader.await, 1 << 20);
        server.await;
    });
}

#[test]
fn many_small_parts_and_one_huge_queue() {
    run(Driver::Fusion, || async {
        let pki = Pki::new();
        let (client, server) = connect_pair(&pki).await;
        let (mut rd, _server_wr) = server.split();
        let (_client_rd, mut wr) = client.split();
        let total = 24 * 1024 * 1024 + 77;
        let data = pattern(8, 0, total);
        let reader = monoio::spawn(async move {
            let mut got = BytesMut::new();
            while rd.read(&mut got).await.unwrap() > 0 {}
            got
        });
        // 1000 parts of 1..=7 bytes, then one 24 MiB part queued at once: the kernel cannot take
        // it all, so most of it waits in `pending`.
        let mut offset = 0;
        let mut parts: Vec<&[u8]> = Vec::new();
        for i in 0..1000 {
            let len = 1 + i % 7;
            parts.push(&data[offset..offset + len]);
            offset += len;
        }
        wr.queue(&parts).unwrap();
        wr.queue(&[&data[offset..]]).unwrap();
        assert!(wr.pending() > 0);
        wr.flush().await.unwrap();
        assert_eq!(wr.pending(), 0);
        wr.close().await.unwrap();
        let got = reader.await;
        assert_eq!(got.len(), total);
        assert!(got[..] == data[..]);
    });
}

/// A batch shaped like the mux driver's: frame headers of 9 bytes, each followed by a payload
/// that may end anywhere in a record, be shorter than one, or run past the send piece. The
/// records are gathered across the slices, so every boundary case of the gathering is here.
#[test]
fn frame_shaped_batches_arrive_whole_and_in_order() {
    run(Driver::Fusion, || async {
        let pki = Pki::new();
        let (client, server) = connect_pair(&pki).await;
        let (mut rd, _server_wr) = server.split();
        let (_client_rd, mut wr) = client.split();
        let payloads = [
            16 * 1024,
            64 * 1024,
            1,
            16 * 1024 - 9,
            100_000,
            7,
            320 * 1024 + 5,
            0,
            16 * 1024 + 1,
        ];
        let total: usize = payloads.iter().map(|p| 9 + p).sum::<usize>() * 3;
        let data = pattern(9, 0, total);
        let reader = monoio::spawn(async move {
            let mut got = BytesMut::new();
            while rd.read(&mut got).await.unwrap() > 0 {}
            got
        });
        let mut offset = 0;
        for _batch in 0..3 {
            let mut parts: Vec<&[u8]> = Vec::new();
            for len in payloads {
                parts.push(&data[offset..offset + 9]);
                parts.push(&data[offset + 9..offset + 9 + len]);
                offset += 9 + len;
            }
            wr.queue(&parts).unwrap();
        }
        assert_eq!(offset, total);
        wr.flush().await.unwrap();
        wr.close().await.unwrap();
        let got = reader.await;
        assert_eq!(got.len(), total);
        assert!(got[..] == data[..]);
    });
}
