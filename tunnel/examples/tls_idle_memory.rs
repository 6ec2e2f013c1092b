//! Memory per idle, established `tunnel::tls` connection end.
//!
//! Opens N loopback TLS connections with mutual TLS inside one process (both ends here),
//! exchanges a message each way on each, then leaves every end idle with a read pending (as a
//! tunnel's mux driver would), and reports the growth of the process's RSS and of its live heap
//! divided by the number of connection ends (2 N).
//!
//! ```text
//! cargo run --release -p tunnel --example tls_idle_memory -- [N] [--legacy]
//! ```
//!
//! N defaults to 2000 (4000 connection ends, 4000 descriptors). `--legacy` uses monoio's epoll
//! driver instead of io_uring.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    rc::Rc,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::BytesMut;
use monoio::net::{TcpListener, TcpStream};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::{
    RootCertStore,
    client::ClientConfig,
    server::{ServerConfig, WebPkiClientVerifier},
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tunnel::tls::{self, TlsConnection};

/// Counts live heap bytes, to tell the heap apart from the rest of the RSS.
struct CountingAlloc;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the counter is only
// arithmetic on the sizes the caller passes.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const DEADLINE: Duration = Duration::from_secs(30);
const BATCH: usize = 100;

fn main() -> anyhow::Result<()> {
    let mut n = 2000usize;
    let mut legacy = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--legacy" => legacy = true,
            other => n = other.parse()?,
        }
    }
    if legacy {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()?
            .block_on(measure(n, "legacy (epoll)"))
    } else {
        let driver = if monoio::utils::detect_uring() {
            "io_uring"
        } else {
            "legacy (epoll), io_uring unavailable"
        };
        monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .build()?
            .block_on(measure(n, driver))
    }
}

async fn measure(n: usize, driver: &str) -> anyhow::Result<()> {
    let (server_config, client_config) = configs()?;
    let listener = Rc::new(TcpListener::bind("127.0.0.1:0")?);
    let addr = listener.local_addr()?;
    let idle_readers = Rc::new(Cell::new(0usize));

    // Warm up: per-core scratch buffers, allocator arenas, lazily built tables.
    let mut warm = Vec::new();
    open(
        &listener,
        addr,
        &server_config,
        &client_config,
        2 * BATCH,
        &mut warm,
    )
    .await?;
    drop(warm);
    settle().await;

    let (rss_before, heap_before) = (rss_bytes()?, LIVE.load(Ordering::Relaxed));
    let mut conns = Vec::with_capacity(2 * n);
    while conns.len() < 2 * n {
        let batch = BATCH.min(n - conns.len() / 2);
        open(
            &listener,
            addr,
            &server_config,
            &client_config,
            batch,
            &mut conns,
        )
        .await?;
    }
    settle().await;
    let (rss_held, heap_held) = (rss_bytes()?, LIVE.load(Ordering::Relaxed));

    // Now park a reader on every end, as a mux driver does between frames.
    for conn in conns {
        let idle = Rc::clone(&idle_readers);
        monoio::spawn(async move {
            let (mut reader, _writer) = conn.split();
            idle.set(idle.get() + 1);
            let mut buf = BytesMut::new();
            let _ = reader.read(&mut buf).await;
            idle.set(idle.get() - 1);
        });
    }
    settle().await;
    anyhow::ensure!(idle_readers.get() == 2 * n, "not every reader is idle");
    let (rss_reading, heap_reading) = (rss_bytes()?, LIVE.load(Ordering::Relaxed));

    let ends = (2 * n) as f64;
    let per = |after: usize, before: usize| (after.saturating_sub(before)) as f64 / ends;
    println!(
        "driver: {driver}; {n} connections, {} connection ends",
        2 * n
    );
    println!(
        "idle, connection objects held:    {:>7.0} B RSS per end, {:>7.0} B live heap per end",
        per(rss_held, rss_before),
        per(heap_held, heap_before)
    );
    println!(
        "idle, a read pending on every end: {:>7.0} B RSS per end, {:>7.0} B live heap per end",
        per(rss_reading, rss_before),
        per(heap_reading, heap_before)
    );
    Ok(())
}

/// Opens `count` connections at once, exchanges a message each way on each, and keeps both
/// ends in `into`.
async fn open(
    listener: &Rc<TcpListener>,
    addr: std::net::SocketAddr,
    server_config: &Arc<ServerConfig>,
    client_config: &Arc<ClientConfig>,
    count: usize,
    into: &mut Vec<TlsConnection>,
) -> anyhow::Result<()> {
    // One acceptor (several tasks accepting on one listener would share one waker on the
    // epoll driver), one task per server end, one per client end.
    let acceptor = {
        let listener = Rc::clone(listener);
        let server_config = Arc::clone(server_config);
        monoio::spawn(async move {
            let mut servers = Vec::with_capacity(count);
            for _ in 0..count {
                let (tcp, _) = listener.accept().await?;
                let server_config = Arc::clone(&server_config);
                servers.push(monoio::spawn(async move {
                    let mut server = tls::accept(tcp, server_config, DEADLINE).await?;
                    let mut buf = BytesMut::new();
                    server.read(&mut buf).await?;
                    server.write_all(&[b"hello from the proxy"]).await?;
                    anyhow::Ok(server)
                }));
            }
            anyhow::Ok(servers)
        })
    };
    let mut clients = Vec::with_capacity(count);
    for _ in 0..count {
        let client_config = Arc::clone(client_config);
        clients.push(monoio::spawn(async move {
            let tcp = TcpStream::connect_addr(addr).await?;
            let name = ServerName::try_from("localhost")?;
            let mut conn = tls::connect(tcp, client_config, name, DEADLINE).await?;
            conn.write_all(&[b"hello from the agent"]).await?;
            let mut buf = BytesMut::new();
            conn.read(&mut buf).await?;
            anyhow::Ok(conn)
        }));
    }
    for client in clients {
        into.push(client.await?);
    }
    for server in acceptor.await? {
        into.push(server.await?);
    }
    Ok(())
}

/// Lets pending work finish and gives freed memory back to the system where glibc can.
async fn settle() {
    monoio::time::sleep(Duration::from_millis(200)).await;
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn rss_bytes() -> anyhow::Result<usize> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("/proc/self/statm has no resident field"))?
        .parse()?;
    // SAFETY: sysconf takes no pointers.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Ok(pages * usize::try_from(page)?)
}

fn configs() -> anyhow::Result<(Arc<ServerConfig>, Arc<ClientConfig>)> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "memory test ca");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

    let leaf = |names: Vec<String>, usage| -> anyhow::Result<(CertificateDer<'static>, Vec<u8>)> {
        let mut params = CertificateParams::new(names)?;
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca)?;
        Ok((cert.der().clone(), key.serialize_der()))
    };
    let (server_cert, server_key) = leaf(
        vec!["localhost".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (client_cert, client_key) =
        leaf(vec!["node-1".into()], ExtendedKeyUsagePurpose::ClientAuth)?;

    let mut roots = RootCertStore::empty();
    roots.add(ca.der().clone())?;
    let roots = Arc::new(roots);
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(&provider))
            .build()?;
    let server = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![server_cert],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key)),
        )?;
    let client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![client_cert],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(client_key)),
        )?;
    Ok((Arc::new(server), Arc::new(client)))
}
