//! Dialling the proxy from a chosen loopback source address (so tens of thousands of
//! connections do not exhaust one address's ephemeral ports), then TLS with an ALPN.

use std::cell::Cell;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use monoio::net::TcpStream;
use rustls_pki_types::ServerName;
use socket2::{Domain, Protocol, Socket, Type};
use tunnel::tls::{self, TlsConnection};

/// Time allowed for TCP connect and for the TLS handshake (each), as the agent does.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Source addresses a worker rotates through: 127.`worker+1`.1.1 ..= 127.`worker+1`.`count`.1,
/// each in a /24 of its own (the proxy limits handshakes per /24, and a worker stands for
/// many sites, not one).
#[derive(Debug)]
pub struct SourcePool {
    addrs: Vec<IpAddr>,
    next: Cell<usize>,
}

impl SourcePool {
    /// The pool of worker `worker` (0-based).
    pub fn for_worker(worker: usize, count: usize) -> Self {
        let third = u8::try_from((worker % 250) + 1).unwrap_or(1);
        let addrs = (1..=count.clamp(1, 250))
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, third, u8::try_from(i).unwrap_or(1), 1)))
            .collect();
        SourcePool {
            addrs,
            next: Cell::new(0),
        }
    }

    /// The next source address.
    pub fn pick(&self) -> IpAddr {
        let i = self.next.get();
        self.next.set(i.wrapping_add(1));
        self.addrs[i % self.addrs.len()]
    }
}

/// TCP connect to `to` from `from` (port chosen by the kernel at connect time, per
/// destination, thanks to `IP_BIND_ADDRESS_NO_PORT`).
pub async fn connect_from(from: Option<IpAddr>, to: SocketAddr) -> anyhow::Result<TcpStream> {
    let Some(from) = from else {
        return monoio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect_addr(to))
            .await
            .context("tcp connect timed out")?
            .context("tcp connect");
    };
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on a socket we own with a pointer to a live c_int of the right size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!(
            "setsockopt IP_BIND_ADDRESS_NO_PORT: {}",
            std::io::Error::last_os_error()
        );
    }
    socket
        .bind(&SocketAddr::new(from, 0).into())
        .with_context(|| format!("bind {from}"))?;
    match socket.connect(&to.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e).with_context(|| format!("connect {from} -> {to}")),
    }
    let std_stream: std::net::TcpStream = socket.into();
    let stream = TcpStream::from_std(std_stream)?;
    monoio::time::timeout(CONNECT_TIMEOUT, stream.writable(false))
        .await
        .with_context(|| format!("tcp connect {from} -> {to} timed out"))??;
    // SO_ERROR tells whether the connect succeeded.
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into a live c_int with its size.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        bail!("getsockopt SO_ERROR: {}", std::io::Error::last_os_error());
    }
    if err != 0 {
        return Err(std::io::Error::from_raw_os_error(err))
            .with_context(|| format!("connect {from} -> {to}"));
    }
    Ok(stream)
}

/// TCP from `from` to `to`, then TLS verified by `config` (whose ALPN list is `[alpn]`).
pub async fn connect_tls(
    from: Option<IpAddr>,
    to: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    alpn: &[u8],
) -> anyhow::Result<TlsConnection> {
    let tcp = connect_from(from, to).await?;
    let name = ServerName::IpAddress(to.ip().into());
    let conn = tls::connect(tcp, config, name, CONNECT_TIMEOUT)
        .await
        .context("tls handshake")?;
    if conn.alpn_protocol().as_deref() != Some(alpn) {
        bail!(
            "the proxy did not agree on {}",
            String::from_utf8_lossy(alpn)
        );
    }
    Ok(conn)
}

/// Monotonic clock in nanoseconds, comparable between processes of this machine.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}
