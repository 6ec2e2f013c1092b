//! Moving an established `tunnel::tls` connection to another thread's monoio runtime
//! (`TlsConnection::into_transferable` on the source, `TransferableTls::attach` on the
//! destination), for every pair of monoio drivers: bytes in flight, a partly received record,
//! ciphertext not yet sent, refusals, and the source runtime carrying on afterwards.
#![allow(clippy::unwrap_used)] // test harness: a failed unwrap is a failed test

mod common;

use common::{Ca, localhost, pattern, provider};

use std::{
    cell::Cell,
    future::Future,
    net::SocketAddr,
    os::{
        fd::{AsFd, AsRawFd},
        unix::fs::MetadataExt,
    },
    rc::Rc,
    sync::{Arc, mpsc},
    thread,
    time::{Duration, Instant},
};

use bytes::BytesMut;
use monoio::{
    io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Splitable},
    net::{TcpListener, TcpStream},
};
use rcgen::ExtendedKeyUsagePurpose;
use rustls::{
    client::ClientConfig,
    server::{ServerConfig, WebPkiClientVerifier},
};
use rustls_pki_types::CertificateDer;
use tunnel::tls::{
    self, ReuniteError, TlsConnection, TlsError, TlsReader, TlsWriter, TransferableTls,
};

const DEADLINE: Duration = Duration::from_secs(10);

/// Every test step finishes within this or fails (rather than hanging the suite).
const LIMIT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------
// Certificates and configs (as in tests/tls.rs)

/// Mutual TLS configs for one test; `Send`, so both threads get them.
#[derive(Clone)]
struct Configs {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    client_cert: CertificateDer<'static>,
}

fn configs() -> Configs {
    let ca = Ca::new("remoteler handoff test ca");
    let server = ca.leaf(
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let client = ca.leaf(&["user-alice"], ExtendedKeyUsagePurpose::ClientAuth);
    let verifier = WebPkiClientVerifier::builder_with_provider(ca.roots(), provider())
        .build()
        .unwrap();
    let mut server_config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(server.chain.clone(), server.key())
        .unwrap();
    let mut client_config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(ca.roots())
        .with_client_auth_cert(client.chain.clone(), client.key())
        .unwrap();
    // As the proxy's and the agent's: our record layer takes over after the handshake.
    server_config.enable_secret_extraction = true;
    client_config.enable_secret_extraction = true;
    Configs {
        server: Arc::new(server_config),
        client: Arc::new(client_config),
        client_cert: client.chain[0].clone(),
    }
}

// ---------------------------------------------------------------------------------------------
// Runtimes and threads

#[derive(Debug, Clone, Copy)]
enum Driver {
    /// io_uring when the kernel has it, else epoll.
    Fusion,
    /// epoll only.
    Legacy,
}

fn run<T, F, Fut>(driver: Driver, f: F) -> T
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = T>,
{
    match driver {
        Driver::Fusion => monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
            .block_on(f()),
        Driver::Legacy => monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
            .block_on(f()),
    }
}

/// Fails the test if `f` takes longer than [`LIMIT`].
async fn within<F: Future>(what: &str, f: F) -> F::Output {
    match monoio::time::timeout(LIMIT, f).await {
        Ok(out) => out,
        Err(_) => panic!("{what}: not done within {LIMIT:?}"),
    }
}

/// What crosses from the source thread to the destination: the connection and how many bytes
/// of the incoming stream the source already read.
type Handoff = (TransferableTls, u64);

/// Thread B: its own runtime, already running when the connection arrives; attaches it there
/// and hands it to `serve`.
fn destination<T, F, Fut>(
    driver: Driver,
    inbox: mpsc::Receiver<Handoff>,
    serve: F,
) -> thread::JoinHandle<T>
where
    T: Send + 'static,
    F: FnOnce(TlsConnection, u64) -> Fut + Send + 'static,
    Fut: Future<Output = T>,
{
    thread::spawn(move || {
        run(driver, || async move {
            let (moved, offset) = within("receiving the connection", async {
                loop {
                    match inbox.try_recv() {
                        Ok(handoff) => break handoff,
                        Err(mpsc::TryRecvError::Empty) => {
                            monoio::time::sleep(Duration::from_millis(1)).await;
                        }
                        Err(mpsc::TryRecvError::Disconnected) => {
                            panic!("the source thread sent no connection")
                        }
                    }
                }
            })
            .await;
            let conn = moved.attach().unwrap();
            within("serving the moved connection", serve(conn, offset)).await
        })
    })
}

async fn listen() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

async fn connect(addr: SocketAddr, cfg: &Configs) -> TlsConnection {
    let tcp = TcpStream::connect_addr(addr).await.unwrap();
    tls::connect(tcp, cfg.client.clone(), localhost(), DEADLINE)
        .await
        .unwrap()
}

/// A client and a server on the current runtime; also the server socket's descriptor number.
async fn pair(cfg: &Configs) -> (TlsConnection, TlsConnection, i32) {
    let (listener, addr) = listen().await;
    let client_cfg = cfg.clone();
    let client = monoio::spawn(async move { connect(addr, &client_cfg).await });
    let (tcp, _) = listener.accept().await.unwrap();
    let fd = tcp.as_raw_fd();
    let server = tls::accept(tcp, cfg.server.clone(), DEADLINE)
        .await
        .unwrap();
    (client.await, server, fd)
}

// ---------------------------------------------------------------------------------------------
// Byte streams

/// Reads stream `seed` from offset `*got` until at least `at_least` bytes, never more than
/// `at_most`, checking every byte.
async fn read_checked(
    reader: &mut TlsReader,
    seed: u64,
    got: &mut u64,
    at_least: u64,
    at_most: u64,
) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    while *got < at_least {
        buf.clear();
        let n = reader.read(&mut buf).await.unwrap();
        assert!(n > 0, "stream {seed} ended at {got}, expected {at_least}");
        assert_eq!(n, buf.len());
        assert!(
            *got + n as u64 <= at_most,
            "stream {seed}: {} bytes, more than the {at_most} sent",
            *got + n as u64
        );
        assert_eq!(
            &buf[..],
            &pattern(seed, *got, n)[..],
            "stream {seed} differs at {got}"
        );
        *got += n as u64;
    }
}

/// The peer's close_notify comes next.
async fn expect_end(reader: &mut TlsReader) {
    let mut buf = BytesMut::new();
    assert_eq!(reader.read(&mut buf).await.unwrap(), 0, "{buf:?}");
}

/// Writes stream `seed` from `from` to `to` in writes of varied sizes, each a header slice and
/// a payload slice.
async fn write_pattern(writer: &mut TlsWriter, seed: u64, from: u64, to: u64) {
    let mut sent = from;
    let mut step = 0usize;
    while sent < to {
        let len = (1 + (step * 7919) % (100 * 1024)).min((to - sent) as usize);
        let bytes = pattern(seed, sent, len);
        let header = 8.min(len);
        writer
            .write_all(&[&bytes[..header], &bytes[header..]])
            .await
            .unwrap();
        sent += len as u64;
        step += 1;
    }
}

async fn read_exact(reader: &mut TlsReader, expected: &[u8]) {
    let mut buf = BytesMut::new();
    while buf.len() < expected.len() {
        assert!(reader.read(&mut buf).await.unwrap() > 0);
    }
    assert_eq!(&buf[..], expected);
}

// ---------------------------------------------------------------------------------------------
// Descriptors, as the kernel sees them

/// The inode of the socket behind descriptor `fd` of this process, if `fd` is open.
fn socket_inode(fd: i32) -> Option<u64> {
    std::fs::metadata(format!("/proc/self/fd/{fd}"))
        .ok()
        .map(|m| m.ino())
}

/// How many epoll sets of this process watch socket `inode` under descriptor number `fd`.
fn epoll_watches(fd: i32, inode: u64) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc/self/fdinfo") else {
        return 0;
    };
    let mut count = 0;
    for entry in dir.flatten() {
        // Descriptors of concurrent tests come and go: unreadable ones are skipped.
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        for line in info.lines() {
            let Some(rest) = line.strip_prefix("tfd:") else {
                continue;
            };
            let mut words = rest.split_whitespace();
            let tfd = words.next().and_then(|w| w.parse::<i32>().ok());
            let ino = words
                .find_map(|w| w.strip_prefix("ino:"))
                .and_then(|h| u64::from_str_radix(h, 16).ok());
            if tfd == Some(fd) && ino == Some(inode) {
                count += 1;
            }
        }
    }
    count
}

// ---------------------------------------------------------------------------------------------
// 1. The client streams 8 MiB while the server connection moves

fn stream_during_move(src: Driver, dst: Driver) {
    const TOTAL: u64 = 8 * 1024 * 1024;
    const BEFORE_MOVE: u64 = 1024 * 1024;
    const ANSWER: u64 = 1024 * 1024;
    let cfg = configs();
    let (outbox, inbox) = mpsc::channel::<Handoff>();

    let client_cert = cfg.client_cert.clone();
    let b = destination(dst, inbox, move |conn, offset| async move {
        assert_eq!(conn.peer_certificates().unwrap()[0], client_cert);
        assert!(conn.peer_addr().is_some());
        let (mut rd, mut wr) = conn.split();
        let mut got = offset;
        read_checked(&mut rd, 1, &mut got, TOTAL, TOTAL).await;
        write_pattern(&mut wr, 2, 0, ANSWER).await;
        wr.close().await.unwrap();
        expect_end(&mut rd).await;
        got - offset
    });

    let read_before = run(src, || async move {
        let (listener, addr) = listen().await;
        let client_cfg = cfg.clone();
        let client = monoio::spawn(async move {
            let (mut rd, mut wr) = connect(addr, &client_cfg).await.split();
            wr.write_all(&[b"hello from the client"]).await.unwrap();
            read_exact(&mut rd, b"hello from the server").await;
            // Streams on while the server stops reading, moves, and goes on in thread B.
            write_pattern(&mut wr, 1, 0, TOTAL).await;
            let mut got = 0;
            read_checked(&mut rd, 2, &mut got, ANSWER, ANSWER).await;
            expect_end(&mut rd).await;
            wr.close().await.unwrap();
        });

        let (tcp, _) = listener.accept().await.unwrap();
        let server = tls::accept(tcp, cfg.server.clone(), DEADLINE)
            .await
            .unwrap();
        let peer = server.peer_addr();
        let (mut rd, mut wr) = server.split();
        read_exact(&mut rd, b"hello from the client").await;
        wr.write_all(&[b"hello from the server"]).await.unwrap();
        let mut got = 0;
        read_checked(&mut rd, 1, &mut got, BEFORE_MOVE, TOTAL).await;

        let server = TlsConnection::reunite(rd, wr).unwrap();
        let moved = server.into_transferable().unwrap();
        assert_eq!(moved.peer_addr(), peer);
        assert_eq!(moved.pending(), 0);
        eprintln!(
            "{src:?} -> {dst:?}: moved after {got} bytes, {} received bytes travel with it",
            moved.buffered_input()
        );
        outbox.send((moved, got)).unwrap();
        within("the client", client).await;
        got
    });
    let read_after = b.join().unwrap();
    assert_eq!(read_before + read_after, TOTAL);
}

// ---------------------------------------------------------------------------------------------
// 2. The move happens with half a record received

/// Limits what a relay forwards from the client to the server.
struct Gate {
    /// Forward no more than this many bytes in all.
    limit: Cell<u64>,
    /// Bytes forwarded so far.
    forwarded: Cell<u64>,
    /// Forward in writes of at most this many bytes.
    piece: Cell<usize>,
}

/// A TCP relay: server to client freely, client to server as `gate` allows.
async fn gated_relay(listener: TcpListener, upstream: SocketAddr, gate: Rc<Gate>) {
    let (downstream, _) = listener.accept().await.unwrap();
    let upstream = TcpStream::connect_addr(upstream).await.unwrap();
    let (mut down_rd, mut down_wr) = downstream.into_split();
    let (mut up_rd, mut up_wr) = upstream.into_split();
    let to_client = monoio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let (r, b) = up_rd.read(buf).await;
            buf = b;
            match r {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if down_wr.write_all(buf[..n].to_vec()).await.0.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = down_wr.shutdown().await;
    });
    let mut held = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if held.is_empty() {
            let (r, b) = down_rd.read(buf).await;
            buf = b;
            match r {
                Ok(0) | Err(_) => break,
                Ok(n) => held.extend_from_slice(&buf[..n]),
            }
        }
        let allowed = gate.limit.get() - gate.forwarded.get();
        if allowed == 0 {
            monoio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        let n = held
            .len()
            .min(gate.piece.get())
            .min(usize::try_from(allowed).unwrap_or(usize::MAX));
        let piece: Vec<u8> = held.drain(..n).collect();
        if up_wr.write_all(piece).await.0.is_err() {
            break;
        }
        gate.forwarded.set(gate.forwarded.get() + n as u64);
    }
    let _ = up_wr.shutdown().await;
    to_client.await;
}

fn partial_record_moves(src: Driver, dst: Driver) {
    /// One record: less than 16 KiB of plaintext in one write.
    const FIRST: u64 = 10_000;
    /// Bytes of that record's 10,022 the server has when it moves.
    const HALF: u64 = 3_000;
    const TOTAL: u64 = FIRST + 20_000;
    const ANSWER: u64 = 64 * 1024;
    let cfg = configs();
    let (outbox, inbox) = mpsc::channel::<Handoff>();

    let b = destination(dst, inbox, move |conn, offset| async move {
        let (mut rd, mut wr) = conn.split();
        let mut got = offset;
        read_checked(&mut rd, 1, &mut got, TOTAL, TOTAL).await;
        write_pattern(&mut wr, 2, 0, ANSWER).await;
        wr.close().await.unwrap();
        expect_end(&mut rd).await;
    });

    run(src, || async move {
        let (server_listener, server_addr) = listen().await;
        let (relay_listener, relay_addr) = listen().await;
        let gate = Rc::new(Gate {
            limit: Cell::new(u64::MAX),
            forwarded: Cell::new(0),
            piece: Cell::new(64 * 1024),
        });
        let relay = monoio::spawn(gated_relay(relay_listener, server_addr, Rc::clone(&gate)));
        let go = Rc::new(Cell::new(false));
        let client_go = Rc::clone(&go);
        let client_cfg = cfg.clone();
        let client = monoio::spawn(async move {
            let (mut rd, mut wr) = connect(relay_addr, &client_cfg).await.split();
            wr.write_all(&[b"hello"]).await.unwrap();
            read_exact(&mut rd, b"hello").await;
            while !client_go.get() {
                monoio::time::sleep(Duration::from_millis(1)).await;
            }
            wr.write_all(&[&pattern(1, 0, FIRST as usize)])
                .await
                .unwrap();
            wr.write_all(&[&pattern(1, FIRST, (TOTAL - FIRST) as usize)])
                .await
                .unwrap();
            let mut got = 0;
            read_checked(&mut rd, 2, &mut got, ANSWER, ANSWER).await;
            expect_end(&mut rd).await;
            wr.close().await.unwrap();
        });

        let (tcp, _) = server_listener.accept().await.unwrap();
        let mut server = tls::accept(tcp, cfg.server.clone(), DEADLINE)
            .await
            .unwrap();
        let mut buf = BytesMut::new();
        while buf.len() < 5 {
            assert!(server.read(&mut buf).await.unwrap() > 0);
        }
        assert_eq!(&buf[..], b"hello");
        server.write_all(&[b"hello"]).await.unwrap();

        // Everything the client sent so far has reached the server; let half a record more.
        gate.limit.set(gate.forwarded.get() + HALF);
        go.set(true);
        within("forwarding half a record", async {
            while gate.forwarded.get() < gate.limit.get() {
                monoio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
        // The read takes the half record in and then waits for the rest: cancelled, it leaves
        // the half record in the connection and a readiness wait in flight.
        buf.clear();
        let read = monoio::time::timeout(Duration::from_millis(500), server.read(&mut buf)).await;
        assert!(
            read.is_err(),
            "a read completed from half a record: {read:?}"
        );
        assert!(buf.is_empty());

        let moved = server.into_transferable().unwrap();
        assert_eq!(moved.buffered_input() as u64, HALF);
        outbox.send((moved, 0)).unwrap();
        // The rest trickles in, a few bytes at a time, to thread B.
        gate.piece.set(7);
        gate.limit.set(u64::MAX);
        within("the client", client).await;
        within("the relay", relay).await;
    });
    b.join().unwrap();
}

// ---------------------------------------------------------------------------------------------
// 3. Refusals, and ciphertext not yet sent

/// Halves of different connections do not reunite; a failed connection does not move and
/// comes back; a connection with megabytes not yet sent moves with them.
fn refusals_and_pending_output(src: Driver, dst: Driver) {
    /// More than loopback's socket buffers hold, so that much stays pending.
    const QUEUED: u64 = 24 * 1024 * 1024;
    const TAIL: u64 = 1024 * 1024;
    let cfg = configs();
    let (outbox, inbox) = mpsc::channel::<Handoff>();

    let b = destination(dst, inbox, move |conn, _| async move {
        let pending = conn.pending();
        let (mut rd, mut wr) = conn.split();
        wr.flush().await.unwrap();
        write_pattern(&mut wr, 3, QUEUED, QUEUED + TAIL).await;
        wr.close().await.unwrap();
        expect_end(&mut rd).await;
        pending
    });

    let pending_moved = run(src, || async move {
        let (client1, server1, _) = pair(&cfg).await;
        let (client2, server2, _) = pair(&cfg).await;
        let (r1, w1) = server1.split();
        let (r2, w2) = server2.split();

        let mismatched = TlsConnection::reunite(r1, w2).unwrap_err();
        assert!(
            mismatched
                .to_string()
                .contains("two different tls connections"),
            "{mismatched}"
        );
        let ReuniteError {
            reader: r1,
            writer: w2,
        } = mismatched;
        let mut server1 = TlsConnection::reunite(r1, w1).unwrap();
        let mut server2 = TlsConnection::reunite(r2, w2).unwrap();

        // A failed connection: the peer closed TCP without close_notify.
        drop(client2);
        let mut buf = BytesMut::new();
        let err = server2.read(&mut buf).await.unwrap_err();
        assert!(matches!(err, TlsError::TruncatedByPeer { .. }), "{err}");
        let refused = server2.into_transferable().unwrap_err();
        assert!(
            matches!(refused.error(), TlsError::TruncatedByPeer { .. }),
            "{refused}"
        );
        assert!(
            refused
                .to_string()
                .starts_with("cannot move the connection"),
            "{refused}"
        );
        let mut server2 = refused.into_connection();
        let again = server2.read(&mut buf).await.unwrap_err();
        assert!(matches!(again, TlsError::TruncatedByPeer { .. }), "{again}");
        drop(server2);

        // Queued while the client does not read: most of it stays in the connection.
        let data = pattern(3, 0, QUEUED as usize);
        server1.queue(&[&data[..8], &data[8..]]).unwrap();
        let pending = server1.pending();
        assert!(pending > 0, "the kernel took all {QUEUED} bytes");
        let moved = server1.into_transferable().unwrap();
        assert_eq!(moved.pending(), pending);
        outbox.send((moved, 0)).unwrap();

        let (mut rd, mut wr) = client1.split();
        let mut got = 0;
        within(
            "reading what was pending",
            read_checked(&mut rd, 3, &mut got, QUEUED + TAIL, QUEUED + TAIL),
        )
        .await;
        expect_end(&mut rd).await;
        wr.close().await.unwrap();
        pending
    });
    let pending_attached = b.join().unwrap();
    assert!(pending_attached <= pending_moved);
}

// ---------------------------------------------------------------------------------------------
// 4. The source runtime lets go of the socket and carries on

fn source_carries_on(src: Driver, dst: Driver) {
    const EACH_WAY: u64 = 4 * 1024 * 1024;
    let cfg = configs();
    let (outbox, inbox) = mpsc::channel::<Handoff>();

    let b = destination(dst, inbox, move |conn, _| async move {
        let (mut rd, mut wr) = conn.split();
        let send = monoio::spawn(async move {
            write_pattern(&mut wr, 2, 0, EACH_WAY).await;
            wr.close().await.unwrap();
        });
        let mut got = 0;
        read_checked(&mut rd, 1, &mut got, EACH_WAY, EACH_WAY).await;
        expect_end(&mut rd).await;
        send.await;
    });

    run(src, || async move {
        let legacy = monoio::utils::is_legacy();
        let (client1, mut server1, fd) = pair(&cfg).await;
        let (client2, server2, _) = pair(&cfg).await;
        let inode = socket_inode(fd).unwrap();
        // The check below can see a registration: the legacy driver has this one.
        assert_eq!(epoll_watches(fd, inode), usize::from(legacy));

        // Nothing to read: the read waits, and is cancelled with its wait in flight.
        let mut buf = BytesMut::new();
        let read = monoio::time::timeout(Duration::from_millis(20), server1.read(&mut buf)).await;
        assert!(read.is_err());
        let moved = server1.into_transferable().unwrap();
        if legacy {
            // Deregistered and closed before `into_transferable` returned.
            assert_ne!(socket_inode(fd), Some(inode));
        }
        outbox.send((moved, 0)).unwrap();

        // Client 1 talks to thread B at once; pair 2 goes on here meanwhile.
        let (mut c1_rd, mut c1_wr) = client1.split();
        let c1_send = monoio::spawn(async move {
            write_pattern(&mut c1_wr, 1, 0, EACH_WAY).await;
            c1_wr.close().await.unwrap();
        });
        let c1_recv = monoio::spawn(async move {
            let mut got = 0;
            read_checked(&mut c1_rd, 2, &mut got, EACH_WAY, EACH_WAY).await;
            expect_end(&mut c1_rd).await;
        });
        let (mut c2_rd, mut c2_wr) = client2.split();
        let (mut s2_rd, mut s2_wr) = server2.split();
        let c2_send = monoio::spawn(async move {
            write_pattern(&mut c2_wr, 5, 0, EACH_WAY).await;
            c2_wr.close().await.unwrap();
        });
        let s2_send = monoio::spawn(async move {
            write_pattern(&mut s2_wr, 6, 0, EACH_WAY).await;
            s2_wr.close().await.unwrap();
        });
        let c2_recv = monoio::spawn(async move {
            let mut got = 0;
            read_checked(&mut c2_rd, 6, &mut got, EACH_WAY, EACH_WAY).await;
            expect_end(&mut c2_rd).await;
        });
        let s2_recv = monoio::spawn(async move {
            let mut got = 0;
            read_checked(&mut s2_rd, 5, &mut got, EACH_WAY, EACH_WAY).await;
            expect_end(&mut s2_rd).await;
        });

        // The source's own descriptor closes (io_uring: once the cancelled poll completes)
        // and no epoll set here watches it.
        let started = Instant::now();
        within("closing the source descriptor", async {
            while socket_inode(fd) == Some(inode) {
                monoio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
        eprintln!(
            "{src:?} -> {dst:?}: source descriptor closed after {:?}",
            started.elapsed()
        );
        assert_eq!(epoll_watches(fd, inode), 0);

        within("pair 2", async {
            c2_send.await;
            s2_send.await;
            c2_recv.await;
            s2_recv.await;
        })
        .await;
        within("client 1", async {
            c1_send.await;
            c1_recv.await;
        })
        .await;
    });
    b.join().unwrap();
}

// ---------------------------------------------------------------------------------------------
// 5. A poll left behind on the source steals nothing

/// What `into_transferable` makes sure never happens, done on purpose: the source runtime keeps
/// watching the socket (through a descriptor of its own, so it stays in its io_uring ring or
/// epoll set) while thread B serves the connection. Readiness reaches every waiter and a poll
/// takes no bytes, so B still gets every byte, promptly.
fn leftover_watcher(src: Driver, dst: Driver) {
    const TOTAL: u64 = 4 * 1024 * 1024;
    const ANSWER: u64 = 256 * 1024;
    let cfg = configs();
    let (outbox, inbox) = mpsc::channel::<Handoff>();
    // B reads only once the watcher has seen the bytes waiting: a B that drained the socket
    // first (a loaded machine, a fast read) left the watcher nothing to see.
    let seen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen_by_b = Arc::clone(&seen);

    let b = destination(dst, inbox, move |conn, _| async move {
        let (mut rd, mut wr) = conn.split();
        within("the watcher seeing the socket readable", async {
            while !seen_by_b.load(std::sync::atomic::Ordering::SeqCst) {
                monoio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
        let mut got = 0;
        read_checked(&mut rd, 1, &mut got, TOTAL, TOTAL).await;
        write_pattern(&mut wr, 2, 0, ANSWER).await;
        wr.close().await.unwrap();
        expect_end(&mut rd).await;
    });

    run(src, || async move {
        let (client, mut server, _) = pair(&cfg).await;
        let mut buf = BytesMut::new();
        let read = monoio::time::timeout(Duration::from_millis(20), server.read(&mut buf)).await;
        assert!(read.is_err());
        let moved = server.into_transferable().unwrap();
        let spare = moved.as_fd().try_clone_to_owned().unwrap();
        let watcher = TcpStream::from_std(std::net::TcpStream::from(spare)).unwrap();
        outbox.send((moved, 0)).unwrap();

        let done = Rc::new(Cell::new(false));
        let wakeups = Rc::new(Cell::new(0u32));
        let watching = {
            let (done, wakeups) = (Rc::clone(&done), Rc::clone(&wakeups));
            monoio::spawn(async move {
                while !done.get() {
                    let ready = watcher.readable(false);
                    if let Ok(Ok(())) =
                        monoio::time::timeout(Duration::from_millis(10), ready).await
                    {
                        wakeups.set(wakeups.get() + 1);
                        seen.store(true, std::sync::atomic::Ordering::SeqCst);
                        // Readable stays readable until B reads: do not spin on it.
                        monoio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            })
        };

        let (mut rd, mut wr) = client.split();
        write_pattern(&mut wr, 1, 0, TOTAL).await;
        let mut got = 0;
        within(
            "the answer",
            read_checked(&mut rd, 2, &mut got, ANSWER, ANSWER),
        )
        .await;
        expect_end(&mut rd).await;
        wr.close().await.unwrap();
        done.set(true);
        watching.await;
        eprintln!(
            "{src:?} -> {dst:?}: the watcher woke {} times",
            wakeups.get()
        );
        assert!(
            wakeups.get() > 0,
            "the watcher never saw the socket readable"
        );
    });
    b.join().unwrap();
}

// ---------------------------------------------------------------------------------------------

#[test]
fn transferable_is_send() {
    fn assert_send<T: Send>() {}
    assert_send::<TransferableTls>();
}

macro_rules! every_driver_pair {
    ($($name:ident => $body:ident;)*) => {$(
        mod $name {
            use super::{Driver, $body};

            #[test]
            fn fusion_to_fusion() {
                $body(Driver::Fusion, Driver::Fusion);
            }

            #[test]
            fn fusion_to_legacy() {
                $body(Driver::Fusion, Driver::Legacy);
            }

            #[test]
            fn legacy_to_fusion() {
                $body(Driver::Legacy, Driver::Fusion);
            }

            #[test]
            fn legacy_to_legacy() {
                $body(Driver::Legacy, Driver::Legacy);
            }
        }
    )*};
}

every_driver_pair! {
    stream_8_mib_during_move => stream_during_move;
    partial_record_travels => partial_record_moves;
    refusals_and_pending_output_travels => refusals_and_pending_output;
    source_runtime_carries_on => source_carries_on;
    leftover_poll_steals_nothing => leftover_watcher;
}
