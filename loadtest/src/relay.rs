//! A userspace TCP relay that adds one-way delay, jitter and "loss" (this kernel has no
//! netem), and can stall. Each direction of each connection is a FIFO of chunks, each
//! released at `max(previous release, arrival + delay ± jitter)`: jitter never reorders
//! bytes, as on a real TCP path. A byte stream cannot lose bytes, so a "lost" chunk
//! (probability `loss`) is held back one retransmission timeout ([`LOSS_PENALTY`]) instead,
//! which is what loss costs a TCP connection. At most [`MAX_QUEUED`] bytes wait per direction
//! (then the relay stops reading, and TCP flow control pushes back on the sender).
//!
//! A stall ([`StallControl::stall`]; SIGUSR1 for `remoteler-loadtest relay`) freezes every
//! connection open at that moment: the relay neither reads nor writes either side of it and
//! closes nothing, like a middlebox that silently stopped forwarding its flows. Connections
//! accepted afterwards are relayed normally (a reconnect gets through, the old flows stay
//! dead) until [`StallControl::resume`] (SIGUSR2) releases the frozen ones, which then
//! deliver what they held, in order.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::rc::{Rc, Weak};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Poll, Waker};
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

/// A request to the relay from another thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StallCommand {
    /// Freeze every connection open now.
    Stall,
    /// Release every frozen connection.
    Resume,
}

#[derive(Default)]
struct ControlState {
    commands: VecDeque<StallCommand>,
    waker: Option<Waker>,
}

/// Stalls and resumes the relay's connections from any thread (the signal thread of
/// `remoteler-loadtest relay`, a test). Commands are applied in order; waking the relay's
/// runtime from another thread relies on monoio's `sync` feature.
#[derive(Clone, Default)]
pub struct StallControl {
    inner: Arc<Mutex<ControlState>>,
}

impl std::fmt::Debug for StallControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StallControl").finish_non_exhaustive()
    }
}

impl StallControl {
    /// Freezes every connection open when the relay handles the command.
    pub fn stall(&self) {
        self.send(StallCommand::Stall);
    }

    /// Releases every frozen connection.
    pub fn resume(&self) {
        self.send(StallCommand::Resume);
    }

    fn send(&self, command: StallCommand) {
        let waker = {
            let mut s = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            s.commands.push_back(command);
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    async fn next(&self) -> StallCommand {
        poll_fn(|cx| {
            let mut s = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            match s.commands.pop_front() {
                Some(c) => Poll::Ready(c),
                None => {
                    s.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await
    }
}

/// Whether one connection may move bytes; both of its directions wait on it.
#[derive(Default)]
struct Gate {
    stalled: Cell<bool>,
    changed: Signal,
}

impl Gate {
    fn set(&self, stalled: bool) -> bool {
        let was = self.stalled.replace(stalled);
        self.changed.raise();
        was != stalled
    }

    async fn open(&self) {
        loop {
            let seen = self.changed.generation();
            if !self.stalled.get() {
                return;
            }
            self.changed.changed(seen).await;
        }
    }
}

/// `relay`: listens on `listen`, prints `listening ADDR`, relays every connection to `to`.
/// SIGUSR1 stalls the connections open at that moment and prints `stalled N` (N: how many);
/// SIGUSR2 resumes them and prints `resumed N`.
pub fn serve(listen: SocketAddr, to: SocketAddr, settings: RelaySettings) -> anyhow::Result<()> {
    // Before the runtime exists, so no thread of it can take the signals.
    let control = stall_on_signals()?;
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .context("monoio runtime")?;
    rt.block_on(async move {
        let listener = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
        print_line(&format!("listening {}", listener.local_addr()?));
        run(listener, to, settings, control, |command, n| {
            print_line(&match command {
                StallCommand::Stall => format!("stalled {n}"),
                StallCommand::Resume => format!("resumed {n}"),
            });
        })
        .await;
        Ok(())
    })
}

/// A line on stdout, flushed at once: scripts wait for it.
fn print_line(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Blocks SIGUSR1 and SIGUSR2 in this thread (and so in every thread started after) and
/// starts a thread that takes them with `sigwait`: SIGUSR1 stalls, SIGUSR2 resumes.
fn stall_on_signals() -> anyhow::Result<StallControl> {
    let control = StallControl::default();
    // SAFETY: a zeroed sigset_t is valid storage; sigemptyset/sigaddset initialise it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live sigset_t we own; the signal numbers are valid.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::sigaddset(&mut set, libc::SIGUSR2);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        anyhow::bail!("pthread_sigmask: {}", std::io::Error::from_raw_os_error(rc));
    }
    let sender = control.clone();
    std::thread::Builder::new()
        .name("relay-signals".into())
        .spawn(move || {
            loop {
                let mut signal: libc::c_int = 0;
                // SAFETY: `set` was initialised above; `signal` is a live c_int.
                if unsafe { libc::sigwait(&set, &mut signal) } != 0 {
                    continue;
                }
                match signal {
                    libc::SIGUSR1 => sender.stall(),
                    libc::SIGUSR2 => sender.resume(),
                    _ => {}
                }
            }
        })
        .context("start the signal thread")?;
    Ok(control)
}

/// Relays every connection `listener` accepts to `to`, applying `control`'s commands as
/// they come; `applied(command, n)` runs after each, `n` the connections it changed.
pub async fn run(
    listener: TcpListener,
    to: SocketAddr,
    settings: RelaySettings,
    control: StallControl,
    applied: impl Fn(StallCommand, usize) + 'static,
) {
    let gates: Rc<RefCell<Vec<Weak<Gate>>>> = Rc::default();
    monoio::spawn({
        let gates = gates.clone();
        async move {
            loop {
                let command = control.next().await;
                let stall = command == StallCommand::Stall;
                let mut n = 0;
                gates.borrow_mut().retain(|g| match g.upgrade() {
                    Some(gate) => {
                        n += usize::from(gate.set(stall));
                        true
                    }
                    None => false,
                });
                applied(command, n);
            }
        }
    });
    // Loopback upstreams are dialled from a pool of loopback sources (the load test opens
    // tens of thousands of connections); any other from the address the kernel picks.
    let sources = to
        .ip()
        .is_loopback()
        .then(|| Rc::new(SourcePool::for_worker(249, 16)));
    loop {
        let (down, _) = match listener.accept().await {
            Ok(a) => a,
            Err(_) => {
                monoio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let gate = Rc::new(Gate::default());
        {
            let mut gates = gates.borrow_mut();
            gates.retain(|g| g.strong_count() > 0);
            gates.push(Rc::downgrade(&gate));
        }
        let sources = sources.clone();
        monoio::spawn(async move {
            let from = sources.as_ref().map(|s| s.pick());
            let Ok(up) = net::connect_from(from, to).await else {
                return;
            };
            let _ = down.set_nodelay(true);
            let _ = up.set_nodelay(true);
            let (down_r, down_w) = down.into_split();
            let (up_r, up_w) = up.into_split();
            monoio::spawn(direction(down_r, up_w, settings, gate.clone()));
            direction(up_r, down_w, settings, gate).await;
        });
    }
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
    gate: Rc<Gate>,
) {
    let queue: Rc<RefCell<Queue>> = Rc::default();
    let signal = Signal::default();
    let writer = {
        let queue = queue.clone();
        let signal = signal.clone();
        let gate = gate.clone();
        monoio::spawn(async move {
            loop {
                let seen = signal.generation();
                let next = queue.borrow_mut().chunks.pop_front();
                match next {
                    Some((at, chunk)) => {
                        monoio::time::sleep_until(at).await;
                        gate.open().await;
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
                        gate.open().await;
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
        gate.open().await;
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::io::{Read as _, Write as _};
    use std::net::{Shutdown, TcpListener as StdListener, TcpStream as StdStream};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::Instant as StdInstant;

    use super::*;

    const TOTAL: usize = 16 << 20;

    /// A relay on 127.0.0.1 in its own thread, to `to`; its address, its control and the
    /// commands it applied (with how many connections each changed).
    fn start_relay(
        to: SocketAddr,
        settings: RelaySettings,
    ) -> (
        SocketAddr,
        StallControl,
        mpsc::Receiver<(StallCommand, usize)>,
    ) {
        let control = StallControl::default();
        let (addr_tx, addr_rx) = mpsc::channel();
        let (applied_tx, applied_rx) = mpsc::channel();
        let relay_control = control.clone();
        std::thread::spawn(move || {
            let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                .enable_timer()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                run(listener, to, settings, relay_control, move |c, n| {
                    let _ = applied_tx.send((c, n));
                })
                .await;
            });
        });
        (addr_rx.recv().unwrap(), control, applied_rx)
    }

    /// An echo server counting the bytes it received; its address and the count.
    fn start_echo() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = StdListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(AtomicUsize::new(0));
        let count = received.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let mut conn = conn.unwrap();
                let count = count.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match conn.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        count.fetch_add(n, Ordering::SeqCst);
                        if conn.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = conn.shutdown(Shutdown::Write);
                });
            }
        });
        (addr, received)
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i % 251) as u8 ^ (i >> 16) as u8)
            .collect()
    }

    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let end = StdInstant::now() + Duration::from_secs(20);
        while !cond() {
            assert!(StdInstant::now() < end, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// During a stall neither direction moves a byte (the echo server gets nothing more and
    /// neither does the client), a connection opened during the stall works, and after the
    /// resume every byte arrives, once, in order.
    #[test]
    fn stall_freezes_both_directions_and_loses_nothing() {
        let (echo, echoed) = start_echo();
        // A long delay keeps bytes queued in the relay when the stall begins: they must wait
        // too (the writers are stalled, not only the readers).
        let settings = RelaySettings {
            delay_ms: 400.0,
            jitter_ms: 20.0,
            loss: 0.0,
        };
        let (relay, control, applied) = start_relay(echo, settings);
        let client = StdStream::connect(relay).unwrap();
        let mut reader = client.try_clone().unwrap();
        let back = Arc::new(AtomicUsize::new(0));
        let sent = pattern(TOTAL);
        let writer = {
            let mut client = client.try_clone().unwrap();
            let sent = sent.clone();
            // Paced (about 16 MiB/s) so most of it is still to come when the stall begins.
            std::thread::spawn(move || {
                for chunk in sent.chunks(16 * 1024) {
                    client.write_all(chunk).unwrap();
                    std::thread::sleep(Duration::from_millis(1));
                }
                client.shutdown(Shutdown::Write).unwrap();
            })
        };
        let read_back = {
            let back = back.clone();
            std::thread::spawn(move || {
                let mut got = Vec::with_capacity(TOTAL);
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = reader.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                    back.store(got.len(), Ordering::SeqCst);
                }
                got
            })
        };
        wait_until("1 MiB echoed", || back.load(Ordering::SeqCst) >= 1 << 20);

        control.stall();
        assert_eq!(applied.recv().unwrap(), (StallCommand::Stall, 1));
        // What was already past the relay (in the kernel, or a write in flight) settles.
        std::thread::sleep(Duration::from_millis(100));
        let (to_echo, from_echo) = (echoed.load(Ordering::SeqCst), back.load(Ordering::SeqCst));
        std::thread::sleep(Duration::from_millis(700));
        assert_eq!(
            echoed.load(Ordering::SeqCst),
            to_echo,
            "bytes reached the echo server during the stall"
        );
        assert_eq!(
            back.load(Ordering::SeqCst),
            from_echo,
            "bytes reached the client during the stall"
        );
        assert!(
            to_echo < TOTAL / 2,
            "the stall came too late to show anything ({to_echo} bytes echoed)"
        );

        // A connection opened during the stall is relayed normally.
        let mut fresh = StdStream::connect(relay).unwrap();
        fresh.write_all(b"new flows get through").unwrap();
        let mut hello = [0u8; 21];
        fresh.read_exact(&mut hello).unwrap();
        assert_eq!(&hello, b"new flows get through");
        assert_eq!(
            back.load(Ordering::SeqCst),
            from_echo,
            "the stalled connection moved"
        );

        control.resume();
        // The fresh connection was never stalled: only the old one resumes.
        assert_eq!(applied.recv().unwrap(), (StallCommand::Resume, 1));
        writer.join().unwrap();
        let got = read_back.join().unwrap();
        assert_eq!(
            got.len(),
            TOTAL,
            "bytes lost or duplicated across the stall"
        );
        assert!(got == sent, "bytes reordered or corrupted across the stall");
    }
}
