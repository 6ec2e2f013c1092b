//! Our TLS 1.3 record layer, which takes over from rustls after the handshake: key updates
//! in both directions, interoperation with rustls's own records in both roles, and a
//! tampered record. A binary of its own: it makes every connection of the process update its
//! sending key every few records.
#![allow(clippy::unwrap_used)] // test harness: a failed unwrap is a failed test

mod common;

use std::{sync::Arc, time::Duration};

use bytes::BytesMut;
use common::pair::{
    DEADLINE, Driver, Pki, connect_pair_with, listen, read_and_check, relay, run, write_pattern,
};
use monoio::net::TcpStream;
use rustls::{client::ClientConfig, server::ServerConfig};
use tunnel::tls::{self, TlsError};

/// Records sealed with one key before the next: a 2 MiB transfer goes through dozens of keys.
const UPDATE_EVERY: u64 = 3;
const TOTAL: u64 = 2 * 1024 * 1024;

/// Sends `TOTAL` bytes each way at once and checks every byte.
async fn both_ways(server_config: Arc<ServerConfig>, client_config: Arc<ClientConfig>) {
    let (client, server) = connect_pair_with(server_config, client_config).await;
    let (mut c_rd, mut c_wr) = client.split();
    let (mut s_rd, mut s_wr) = server.split();
    let c_send = monoio::spawn(async move { write_pattern(&mut c_wr, 1, TOTAL).await });
    let s_send = monoio::spawn(async move { write_pattern(&mut s_wr, 2, TOTAL).await });
    let c_recv = monoio::spawn(async move { read_and_check(&mut c_rd, 2, TOTAL).await });
    let s_recv = monoio::spawn(async move { read_and_check(&mut s_rd, 1, TOTAL).await });
    c_send.await;
    s_send.await;
    assert_eq!(c_recv.await, TOTAL);
    assert_eq!(s_recv.await, TOTAL);
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
