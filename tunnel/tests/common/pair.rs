//! A pair of `tunnel::tls` connections over loopback, for the TLS test binaries: certificates
//! and configs, both monoio drivers, pattern streams, a tampering relay.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

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
use tunnel::tls::{self, TlsConnection};

use super::{Ca, Leaf, localhost, pattern, provider};

pub const DEADLINE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Certificates and configs

pub struct Pki {
    pub ca: Ca,
    pub server: Leaf,
    pub client: Leaf,
    /// Whether both configs let our record layer take over after the handshake (as the
    /// proxy's and the agent's do); false keeps rustls's own records throughout.
    pub record_layer: bool,
}

impl Pki {
    pub fn new() -> Self {
        let ca = Ca::new("remoteler test ca");
        let server = ca.leaf(
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let client = ca.leaf(&["node-r1"], ExtendedKeyUsagePurpose::ClientAuth);
        Self {
            ca,
            server,
            client,
            record_layer: true,
        }
    }

    /// A server that requires a client certificate from our CA.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.ca.roots(), provider())
            .build()
            .unwrap();
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.server.chain.clone(), self.server.key())
            .unwrap();
        config.enable_secret_extraction = self.record_layer;
        Arc::new(config)
    }

    pub fn client_config_with(&self, client: Option<&Leaf>) -> Arc<ClientConfig> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(self.ca.roots());
        let mut config = match client {
            Some(leaf) => builder
                .with_client_auth_cert(leaf.chain.clone(), leaf.key())
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        config.enable_secret_extraction = self.record_layer;
        Arc::new(config)
    }

    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.client_config_with(Some(&self.client))
    }
}

// ---------------------------------------------------------------------------------------------
// Runtimes

#[derive(Debug, Clone, Copy)]
pub enum Driver {
    /// io_uring when the kernel has it, else epoll.
    Fusion,
    /// epoll only, as on a qemu-user ARM agent.
    Legacy,
}

pub fn run<F, Fut>(driver: Driver, f: F)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    match driver {
        Driver::Fusion => {
            eprintln!(
                "fusion driver; io_uring available: {}",
                monoio::utils::detect_uring()
            );
            monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                .enable_timer()
                .build()
                .unwrap()
                .block_on(f())
        }
        Driver::Legacy => monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
            .block_on(f()),
    }
}

pub async fn listen() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

pub async fn connect_pair(pki: &Pki) -> (TlsConnection, TlsConnection) {
    connect_pair_with(pki.server_config(), pki.client_config()).await
}

/// A client and a server connection over loopback, with these configs.
pub async fn connect_pair_with(
    server_config: Arc<ServerConfig>,
    client_config: Arc<ClientConfig>,
) -> (TlsConnection, TlsConnection) {
    let (listener, addr) = listen().await;
    let server = monoio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        tls::accept(tcp, server_config, DEADLINE).await
    });
    let tcp = TcpStream::connect_addr(addr).await.unwrap();
    let client = tls::connect(tcp, client_config, localhost(), DEADLINE)
        .await
        .unwrap();
    let server = server.await.unwrap();
    (client, server)
}

/// Reads to the end (close_notify), checking every byte against `pattern(seed)`.
pub async fn read_and_check(reader: &mut tls::TlsReader, seed: u64, expected: u64) -> u64 {
    let mut got = 0u64;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        buf.clear();
        let n = reader.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        assert_eq!(n, buf.len());
        assert_eq!(
            &buf[..],
            &pattern(seed, got, n)[..],
            "stream {seed} differs at {got}"
        );
        got += n as u64;
    }
    assert_eq!(got, expected);
    got
}

/// Writes `total` bytes of `pattern(seed)` as frames: an 8-byte header slice and a payload
/// slice per write, then closes.
pub async fn write_pattern(writer: &mut tls::TlsWriter, seed: u64, total: u64) {
    let mut sent = 0u64;
    let mut step = 0usize;
    while sent < total {
        let len = (1 + (step * 7919) % (100 * 1024)).min((total - sent) as usize);
        let bytes = pattern(seed, sent, len);
        let header = 8.min(len);
        writer
            .write_all(&[&bytes[..header], &bytes[header..]])
            .await
            .unwrap();
        sent += len as u64;
        step += 1;
    }
    writer.close().await.unwrap();
}

/// A TCP relay between a client and a server. `tamper` sees each chunk (at most `chunk`
/// bytes) going from the server to the client, with the count of bytes already forwarded, and
/// returns what to forward (`None` ends the relay, closing both sides). Every fourth chunk is
/// followed by `pause`.
pub async fn relay(
    listener: TcpListener,
    upstream: SocketAddr,
    chunk: usize,
    pause: Duration,
    tamper: impl Fn(u64, Vec<u8>) -> Option<Vec<u8>> + 'static,
) {
    let (downstream, _) = listener.accept().await.unwrap();
    let upstream = TcpStream::connect_addr(upstream).await.unwrap();
    let (mut down_rd, mut down_wr) = downstream.into_split();
    let (mut up_rd, mut up_wr) = upstream.into_split();
    let to_server = monoio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let (r, b) = down_rd.read(buf).await;
            buf = b;
            match r {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let (r, _) = up_wr.write_all(buf[..n].to_vec()).await;
                    if r.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = up_wr.shutdown().await;
    });
    let mut forwarded = 0u64;
    let mut chunks = 0u64;
    let mut buf = vec![0u8; chunk];
    loop {
        let (r, b) = up_rd.read(buf).await;
        buf = b;
        let n = match r {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let Some(out) = tamper(forwarded, buf[..n].to_vec()) else {
            break;
        };
        forwarded += n as u64;
        let (r, _) = down_wr.write_all(out).await;
        if r.is_err() {
            break;
        }
        chunks += 1;
        if !pause.is_zero() && chunks % 4 == 0 {
            monoio::time::sleep(pause).await;
        }
    }
    let _ = down_wr.shutdown().await;
    drop(to_server);
}

/// Sends `total` bytes each way at once over a fresh pair with these configs, checking every
/// byte.
pub async fn exchange_both_ways(
    server_config: Arc<ServerConfig>,
    client_config: Arc<ClientConfig>,
    total: u64,
) {
    let (client, server) = connect_pair_with(server_config, client_config).await;
    let (mut c_rd, mut c_wr) = client.split();
    let (mut s_rd, mut s_wr) = server.split();
    let c_send = monoio::spawn(async move { write_pattern(&mut c_wr, 1, total).await });
    let s_send = monoio::spawn(async move { write_pattern(&mut s_wr, 2, total).await });
    let c_recv = monoio::spawn(async move { read_and_check(&mut c_rd, 2, total).await });
    let s_recv = monoio::spawn(async move { read_and_check(&mut s_rd, 1, total).await });
    c_send.await;
    s_send.await;
    assert_eq!(c_recv.await, total);
    assert_eq!(s_recv.await, total);
}
