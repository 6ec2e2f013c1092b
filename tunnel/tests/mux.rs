//! The mux driver over real TLS on loopback: many concurrent streams echoed byte-exact, and
//! a stream that survives a cut transport (through a relay the test can sever) and resumes.

#![allow(clippy::unwrap_used)] // test harness: a failed unwrap is a failed test

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use frame::{ErrorCode, Open, Role, Session, SessionConfig};
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Splitable};
use monoio::net::{TcpListener, TcpStream};
use rustls_pki_types::ServerName;
use tunnel::identity::{
    ClientAuth, ClusterCa, PrivateKey, Validity, client_config_trusting, server_config,
};
use tunnel::mux::{DriveOutcome, Tunnel, drive};
use tunnel::tls;

const DEADLINE: Duration = Duration::from_secs(10);

struct Pki {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

fn pki() -> Pki {
    let ca = ClusterCa::generate("mux.test").unwrap();
    let validity = Validity::for_ttl(SystemTime::now(), Duration::from_secs(3600)).unwrap();
    let proxy_key = PrivateKey::generate().unwrap();
    let proxy_cert = ca
        .issue_proxy("proxy", &["localhost"], &proxy_key.public_key(), validity)
        .unwrap();
    let node_key = PrivateKey::generate().unwrap();
    let node_cert = ca
        .issue_node("node-r1", &node_key.public_key(), validity)
        .unwrap();
    let roots = [ca.certificate().clone()];
    let mut server = server_config(
        &roots,
        ca.chain(proxy_cert),
        &proxy_key,
        ClientAuth::Required,
    )
    .unwrap();
    server.alpn_protocols = vec![b"t".to_vec()];
    let mut client =
        client_config_trusting(&roots, Some((ca.chain(node_cert), &node_key))).unwrap();
    client.alpn_protocols = vec![b"t".to_vec()];
    Pki {
        server: Arc::new(server),
        client: Arc::new(client),
    }
}

fn session_config(role: Role, dialer: bool) -> SessionConfig {
    let mut c = SessionConfig::new(role, dialer);
    c.keepalive_interval = Duration::from_millis(500);
    c.keepalive_count = 4;
    c.resume_grace = Duration::from_secs(10);
    c
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .unwrap()
        .block_on(f)
}

fn pattern(seed: u8, len: usize) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect::<Vec<_>>()
        .into()
}

/// Accepted streams echo every byte back and finish when the peer finishes.
fn serve_echo(tunnel: Tunnel) {
    monoio::spawn(async move {
        while let Some(incoming) = tunnel.incoming().await {
            let stream = incoming.accept().unwrap();
            monoio::spawn(async move {
                while let Ok(Some(bytes)) = stream.read().await {
                    if stream.write(bytes).await.is_err() {
                        return;
                    }
                }
                stream.finish();
                let _ = stream.closed().await;
            });
        }
    });
}

async fn connect(addr: SocketAddr, pki: &Pki) -> tls::TlsConnection {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tls::connect(
        tcp,
        pki.client.clone(),
        ServerName::try_from("localhost").unwrap(),
        DEADLINE,
    )
    .await
    .unwrap()
}

#[test]
fn many_streams_echo_byte_exact_over_tls() {
    let pki = pki();
    block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server_cfg = pki.server.clone();
        monoio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let conn = tls::accept(tcp, server_cfg, DEADLINE).await.unwrap();
            let tunnel = Tunnel::new(Session::new(
                session_config(Role::Proxy, false),
                [2; 16],
                std::time::Instant::now(),
            ));
            serve_echo(tunnel.clone());
            drive(&tunnel, conn, BytesMut::new()).await
        });
        let conn = connect(addr, &pki).await;
        let tunnel = Tunnel::new(Session::new(
            session_config(Role::Agent, true),
            [1; 16],
            std::time::Instant::now(),
        ));
        let driver = {
            let tunnel = tunnel.clone();
            monoio::spawn(async move { drive(&tunnel, conn, BytesMut::new()).await })
        };
        assert!(tunnel.connected().await);
        let mut tasks = Vec::new();
        for i in 0..8u8 {
            let tunnel = tunnel.clone();
            tasks.push(monoio::spawn(async move {
                let data = pattern(i, 2 * 1024 * 1024 + usize::from(i) * 777);
                let got = roundtrip(&tunnel, data.clone(), 10_000 + usize::from(i) * 1000).await;
                assert_eq!(got.len(), data.len(), "stream {i}: length");
                assert!(got == data[..], "stream {i}: bytes differ");
            }));
        }
        for t in tasks {
            t.await;
        }
        tunnel.close(ErrorCode::NO_ERROR, "test done");
        assert!(matches!(driver.await, DriveOutcome::Ended(_)));
    });
}

/// Writes `data` and reads the echo concurrently on one stream.
async fn roundtrip(tunnel: &Tunnel, data: Bytes, chunk: usize) -> Vec<u8> {
    let request = Open {
        node: "node-r1".into(),
        service: "echo".into(),
        ..Open::default()
    };
    let stream = Rc::new(tunnel.open(request).await.unwrap());
    let writer = stream.clone();
    let sending = monoio::spawn(async move {
        let mut data = data;
        while !data.is_empty() {
            let piece = data.split_to(chunk.min(data.len()));
            writer.write(piece).await.unwrap();
        }
        writer.finish();
    });
    let mut got = Vec::new();
    while let Some(bytes) = stream.read().await.unwrap() {
        got.extend_from_slice(&bytes);
    }
    sending.await;
    stream.closed().await.unwrap();
    got
}

/// A TCP relay between client and server whose connections the test can sever at once,
/// like a link that drops: both ends see the connection die without a TLS close_notify.
struct Relay {
    addr: SocketAddr,
    fds: Rc<RefCell<Vec<std::os::fd::RawFd>>>,
}

impl Relay {
    fn start(upstream: SocketAddr) -> Relay {
        use std::os::fd::AsRawFd;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let fds = Rc::new(RefCell::new(Vec::new()));
        let fds2 = fds.clone();
        monoio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let up = TcpStream::connect(upstream).await.unwrap();
                fds2.borrow_mut().extend([down.as_raw_fd(), up.as_raw_fd()]);
                let (down_r, down_w) = down.into_split();
                let (up_r, up_w) = up.into_split();
                monoio::spawn(copy(down_r, up_w));
                monoio::spawn(copy(up_r, down_w));
            }
        });
        Relay { addr, fds }
    }

    fn cut(&self) {
        for fd in self.fds.borrow_mut().drain(..) {
            // SAFETY: the fds belong to live relay sockets; shutdown does not close them.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }
}

async fn copy<R: AsyncReadRent, W: AsyncWriteRent>(mut from: R, mut to: W) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let (res, b) = from.read(buf).await;
        buf = b;
        let n = match res {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let (res, b) = to.write_all(buf.slice_mut(..n)).await;
        buf = b.into_inner();
        if res.is_err() {
            return;
        }
    }
}

#[test]
fn a_stream_survives_a_severed_transport_and_resumes_byte_exact() {
    let pki = pki();
    block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let server_addr = listener.local_addr().unwrap();
        let server_cfg = pki.server.clone();
        let server_tunnel = Tunnel::new(Session::new(
            session_config(Role::Proxy, false),
            [2; 16],
            std::time::Instant::now(),
        ));
        serve_echo(server_tunnel.clone());
        let st = server_tunnel.clone();
        monoio::spawn(async move {
            let mut first = true;
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok(conn) = tls::accept(tcp, server_cfg.clone(), DEADLINE).await else {
                    continue;
                };
                if !first {
                    st.reattach().unwrap();
                }
                first = false;
                if let DriveOutcome::Ended(_) = drive(&st, conn, BytesMut::new()).await {
                    return;
                }
            }
        });
        let relay = Relay::start(server_addr);

        let tunnel = Tunnel::new(Session::new(
            session_config(Role::Agent, true),
            [1; 16],
            std::time::Instant::now(),
        ));
        let conn = connect(relay.addr, &pki).await;
        let client = tunnel.clone();
        let reconnects = Rc::new(std::cell::Cell::new(0));
        let counted = reconnects.clone();
        let addr = relay.addr;
        let client_pki = Pki {
            server: pki.server.clone(),
            client: pki.client.clone(),
        };
        monoio::spawn(async move {
            let mut conn = conn;
            loop {
                match drive(&client, conn, BytesMut::new()).await {
                    DriveOutcome::Ended(_) => return,
                    DriveOutcome::TransportLost(_) => {
                        monoio::time::sleep(Duration::from_millis(50)).await;
                        conn = connect(addr, &client_pki).await;
                        client.reattach().unwrap();
                        counted.set(counted.get() + 1);
                    }
                }
            }
        });
        assert!(tunnel.connected().await);

        let data = pattern(9, 16 * 1024 * 1024);
        let progress = Rc::new(std::cell::Cell::new(0usize));
        let seen = progress.clone();
        let t = tunnel.clone();
        let expected = data.clone();
        let transfer = monoio::spawn(async move {
            let request = Open {
                node: "node-r1".into(),
                service: "echo".into(),
                ..Open::default()
            };
            let stream = Rc::new(t.open(request).await.unwrap());
            let writer = stream.clone();
            let sending = monoio::spawn(async move {
                let mut data = data;
                while !data.is_empty() {
                    let piece = data.split_to(8192.min(data.len()));
                    writer.write(piece).await.unwrap();
                }
                writer.finish();
            });
            let mut got = Vec::new();
            while let Some(bytes) = stream.read().await.unwrap() {
                got.extend_from_slice(&bytes);
                seen.set(got.len());
            }
            sending.await;
            got
        });
        // Sever the link twice while bytes are in flight both ways.
        for threshold in [2 * 1024 * 1024, 9 * 1024 * 1024] {
            while progress.get() < threshold {
                monoio::time::sleep(Duration::from_millis(2)).await;
            }
            relay.cut();
        }
        let got = transfer.await;
        assert!(
            reconnects.get() >= 2,
            "the transport was re-established {} times",
            reconnects.get()
        );
        assert_eq!(got.len(), expected.len());
        assert!(got == expected[..], "bytes differ after resumption");
        tunnel.close(ErrorCode::NO_ERROR, "done");
    });
}
