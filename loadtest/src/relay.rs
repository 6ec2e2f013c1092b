//! A userspace TCP relay that adds one-way delay, jitter and "loss" (this kernel has no
//! netem). Each direction of each connection is a FIFO of chunks, each released at
//! `max(previous release, arrival + delay ± jitter)`: jitter never reorders bytes, as on a
//! real TCP path. A byte stream cannot lose bytes, so a "lost" chunk (probability `loss`) is
//! held back one retransmission timeout ([`LOSS_PENALTY`]) instead, which is what loss
//! costs a TCP connection. At most [`MAX_QUEUED`] bytes wait per direction (then the relay
//! stops reading, and TCP flow control pushes back on the sender).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use anyhow::Context as _;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Splitable};
use monoio::net::TcpListener;
use monoio::time::Instant;
use serde::{Deserialize, Serialize};

use crate::net::{self, SourcePool};
use crate::sync::Signal;

/// What a "lost" chunk is delayed by: Linux's minimum retransmission timeout.
pub const LOSS_PENALTY: Duration = Duration::from_millis(200);
/// Bytes waiting per direction before the relay stops reading.
pub const MAX_QUEUED: usize = 4 << 20;
/// Bytes per read.
const READ_CHUNK: usize = 64 * 1024;

/// How the relay degrades the path.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct RelaySettings {
    /// One-way delay (ms); the round trip gets twice this.
    pub delay_ms: f64,
    /// Uniform jitter ± this (ms).
    pub jitter_ms: f64,
    /// Probability that a chunk is "lost" (held back [`LOSS_PENALTY`]).
    pub loss: f64,
}

/// `relay`: listens on 127.0.0.1:0, prints `listening ADDR`, relays to `upstream`.
pub fn serve(upstream: SocketAddr, settings: RelaySettings) -> anyhow::Result<()> {
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .context("monoio runtime")?;
    rt.block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").context("bind")?;
        println!("listening {}", listener.local_addr()?);
        use std::io::Write;
        std::io::stdout().flush()?;
        let sources = Rc::new(SourcePool::for_worker(249, 16));
        loop {
            let (down, _) = match listener.accept().await {
                Ok(a) => a,
                Err(_) => {
                    monoio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let sources = sources.clone();
            monoio::spawn(async move {
                let Ok(up) = net::connect_from(Some(sources.pick()), upstream).await else {
                    return;
                };
                let _ = down.set_nodelay(true);
                let _ = up.set_nodelay(true);
                let (down_r, down_w) = down.into_split();
                let (up_r, up_w) = up.into_split();
                monoio::spawn(direction(down_r, up_w, settings));
                direction(up_r, down_w, settings).await;
            });
        }
    })
}

#[derive(Default)]
struct Queue {
    chunks: VecDeque<(Instant, Vec<u8>)>,
    bytes: usize,
    eof: bool,
    closed: bool,
    last_release: Option<Instant>,
}

async fn direction<R: AsyncReadRent + 'static, W: AsyncWriteRent + 'static>(
    mut from: R,
    mut to: W,
    settings: RelaySettings,
) {
    let queue: Rc<RefCell<Queue>> = Rc::default();
    let signal = Signal::default();
    let writer = {
        let queue = queue.clone();
        let signal = signal.clone();
        monoio::spawn(async move {
            loop {
                let seen = signal.generation();
                let next = queue.borrow_mut().chunks.pop_front();
                match next {
                    Some((at, chunk)) => {
                        monoio::time::sleep_until(at).await;
                        let len = chunk.len();
                        let (res, _) = to.write_all(chunk).await;
                        queue.borrow_mut().bytes -= len;
                        if res.is_err() {
                            queue.borrow_mut().closed = true;
                            signal.raise();
                            return;
                        }
                        signal.raise();
                    }
                    None if queue.borrow().eof => {
                        let _ = to.shutdown().await;
                        return;
                    }
                    None => signal.changed(seen).await,
                }
            }
        })
    };
    let mut rng = fastrand::Rng::new();
    loop {
        let seen = signal.generation();
        if queue.borrow().closed {
            break;
        }
        if queue.borrow().bytes >= MAX_QUEUED {
            signal.changed(seen).await;
            continue;
        }
        let (res, buf) = from.read(Vec::with_capacity(READ_CHUNK)).await;
        match res {
            Ok(n) if n > 0 => {
                let jitter = (rng.f64() * 2.0 - 1.0) * settings.jitter_ms;
                let mut delay_ms = (settings.delay_ms + jitter).max(0.0);
                if settings.loss > 0.0 && rng.f64() < settings.loss {
                    delay_ms += LOSS_PENALTY.as_secs_f64() * 1e3;
                }
                let mut at = Instant::now() + Duration::from_secs_f64(delay_ms / 1e3);
                let mut q = queue.borrow_mut();
                if let Some(last) = q.last_release {
                    at = at.max(last);
                }
                q.last_release = Some(at);
                q.bytes += n;
                q.chunks.push_back((at, buf));
            }
            _ => {
                queue.borrow_mut().eof = true;
                signal.raise();
                break;
            }
        }
        signal.raise();
    }
    let _ = writer.await;
}
