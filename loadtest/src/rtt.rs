//! `rtt`: round trips against any TCP echo service, e.g. an echo server directly, through
//! `remoteler forward`, or through another tunnel (benches/compare.sh), so that the latency a
//! tunnel adds can be read side by side.
//!
//! N connections are opened first (and each makes one untimed round trip, so connection and
//! channel setup of the system under test stay out of the figures). Then every connection
//! sends a `bytes`-byte message, waits for the whole echo and records the round trip in an
//! HDR histogram (nanoseconds), for `duration`, discarding the first `warmup`.
//!
//! Paced by default: `rate` messages per second over all connections, each connection at its
//! own random phase (so 1 and 1,000 connections offer the same load, and the figure is the
//! latency of interactive traffic, not the queue of a saturated system). A connection whose
//! echo is late sends its next message at once and skips the ticks it missed; the round trip
//! is timed from the actual send. `--rate 0` is closed loop: each connection sends its next
//! message as soon as the echo is back (a throughput test of small messages).

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use monoio::io::{AsyncReadRentExt, AsyncWriteRentExt};
use serde_json::json;

use crate::report::Report;
use crate::sync::{Semaphore, Signal};

/// What to measure.
#[derive(Debug, Clone)]
pub struct RttArgs {
    /// The echo service.
    pub target: SocketAddr,
    /// Concurrent connections.
    pub connections: usize,
    /// Measured time, after the warm-up.
    pub duration: Duration,
    /// Samples in this first stretch are discarded.
    pub warmup: Duration,
    /// Bytes per message (at least 8: a sequence number checks the echo).
    pub bytes: usize,
    /// Messages per second over all connections; 0 = closed loop.
    pub rate: f64,
    /// Connection setups in flight at once.
    pub concurrency: usize,
}

#[derive(Default)]
struct Totals {
    errors: Cell<u64>,
    last_error: RefCell<Option<String>>,
    connected: Cell<usize>,
}

/// Runs the measurement and prints the table; true if no connection failed.
pub fn run(args: RttArgs, json_path: Option<&std::path::Path>) -> anyhow::Result<bool> {
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .context("monoio runtime")?;
    let (hist, totals, elapsed) = rt.block_on(measure(args.clone()))?;
    let mut report = Report::new("rtt");
    let us = |v: u64| v as f64 / 1000.0;
    let q = |p: f64| us(hist.value_at_quantile(p));
    report.row("target", args.target.to_string());
    report.row("connections", args.connections.to_string());
    report.row(
        "offered load",
        if args.rate > 0.0 {
            format!("{} messages/s of {} B, paced", args.rate, args.bytes)
        } else {
            format!("closed loop, {} B messages", args.bytes)
        },
    );
    report.row(
        "round trips",
        format!(
            "{} in {:.1} s ({:.0}/s)",
            hist.len(),
            elapsed.as_secs_f64(),
            hist.len() as f64 / elapsed.as_secs_f64().max(1e-9)
        ),
    );
    report.row(
        "round trip",
        if hist.is_empty() {
            "no samples".into()
        } else {
            format!(
                "p50 {:.1} µs  p99 {:.1} µs  p99.9 {:.1} µs  max {:.1} µs",
                q(0.5),
                q(0.99),
                q(0.999),
                us(hist.max())
            )
        },
    );
    report.row("failed connections", totals.errors.get().to_string());
    if let Some(e) = totals.last_error.borrow().as_ref() {
        report.row("last error", e.clone());
    }
    report.set(
        "rtt",
        json!({
            "target": args.target.to_string(),
            "connections": args.connections,
            "connected": totals.connected.get(),
            "bytes": args.bytes,
            "rate": args.rate,
            "duration_s": elapsed.as_secs_f64(),
            "count": hist.len(),
            "p50_us": q(0.5),
            "p99_us": q(0.99),
            "p999_us": q(0.999),
            "max_us": us(hist.max()),
            "mean_us": hist.mean() / 1000.0,
            "errors": totals.errors.get(),
            "last_error": totals.last_error.borrow().clone(),
        }),
    );
    report.print();
    report.write_json(json_path)?;
    Ok(totals.errors.get() == 0 && !hist.is_empty())
}

type Outcome = (Histogram<u64>, Rc<Totals>, Duration);

async fn measure(args: RttArgs) -> anyhow::Result<Outcome> {
    let hist = Rc::new(RefCell::new(
        Histogram::<u64>::new_with_bounds(1, 120_000_000_000, 3).context("histogram")?,
    ));
    let totals = Rc::new(Totals::default());
    let ready = Signal::default();
    let started: Rc<Cell<Option<Instant>>> = Rc::default();
    let done = Rc::new(Cell::new(0usize));
    let finished = Signal::default();
    let sem = Semaphore::new(args.concurrency.max(1));
    let bytes = args.bytes.max(8);
    for index in 0..args.connections {
        let (hist, totals, ready, started, done, finished, sem, args) = (
            hist.clone(),
            totals.clone(),
            ready.clone(),
            started.clone(),
            done.clone(),
            finished.clone(),
            sem.clone(),
            args.clone(),
        );
        monoio::spawn(async move {
            let result =
                connection(index, bytes, &args, &sem, &hist, &totals, &ready, &started).await;
            if let Err(e) = result {
                totals.errors.set(totals.errors.get() + 1);
                *totals.last_error.borrow_mut() = Some(format!("connection {index}: {e:#}"));
                // A connection that failed before the start must not hold the others back.
                if started.get().is_none() {
                    totals.connected.set(totals.connected.get() + 1);
                    ready.raise();
                }
            }
            done.set(done.get() + 1);
            finished.raise();
        });
    }
    // Everyone connected (or failed): start the clock.
    loop {
        let seen = ready.generation();
        if totals.connected.get() >= args.connections {
            break;
        }
        ready.changed(seen).await;
    }
    let t0 = Instant::now();
    started.set(Some(t0));
    ready.raise();
    eprintln!(
        "rtt: {} connections to {} up; measuring {:?} after {:?} of warm-up",
        args.connections, args.target, args.duration, args.warmup
    );
    loop {
        let seen = finished.generation();
        if done.get() >= args.connections {
            break;
        }
        finished.changed(seen).await;
    }
    let elapsed = t0.elapsed().saturating_sub(args.warmup);
    let hist = hist.borrow().clone();
    Ok((hist, totals, elapsed))
}

#[allow(clippy::too_many_arguments)]
async fn connection(
    index: usize,
    bytes: usize,
    args: &RttArgs,
    sem: &Semaphore,
    hist: &RefCell<Histogram<u64>>,
    totals: &Totals,
    ready: &Signal,
    started: &Cell<Option<Instant>>,
) -> anyhow::Result<()> {
    let mut stream = {
        let _permit = sem.acquire().await;
        let stream = monoio::net::TcpStream::connect_addr(args.target)
            .await
            .context("connect")?;
        stream.set_nodelay(true).context("TCP_NODELAY")?;
        stream
    };
    let mut out = vec![0u8; bytes];
    let mut back = vec![0u8; bytes];
    let mut seq = 0u64;
    // One untimed round trip: the system under test sets up its side now.
    (out, back) = exchange(&mut stream, out, back, seq).await?;
    totals.connected.set(totals.connected.get() + 1);
    ready.raise();
    let t0 = loop {
        if let Some(t0) = started.get() {
            break t0;
        }
        let seen = ready.generation();
        ready.changed(seen).await;
    };
    let warm = t0 + args.warmup;
    let end = warm + args.duration;
    let interval =
        (args.rate > 0.0).then(|| Duration::from_secs_f64(args.connections as f64 / args.rate));
    let mut next = match interval {
        Some(i) => t0 + i.mul_f64(fastrand::f64()),
        None => t0,
    };
    let _ = index;
    loop {
        if let Some(i) = interval {
            let now = Instant::now();
            if next > now {
                monoio::time::sleep_until(monoio::time::Instant::from_std(next)).await;
            } else if now - next > i {
                // Late: skip the ticks that passed.
                let missed = ((now - next).as_secs_f64() / i.as_secs_f64()).floor();
                next += i.mul_f64(missed);
            }
            next += i;
        }
        let sent = Instant::now();
        if sent >= end {
            break;
        }
        seq += 1;
        (out, back) = exchange(&mut stream, out, back, seq).await?;
        if sent >= warm {
            let ns = sent.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
            let _ = hist.borrow_mut().record(ns.max(1));
        }
    }
    Ok(())
}

/// Sends one message carrying `seq` and reads its whole echo.
async fn exchange(
    stream: &mut monoio::net::TcpStream,
    mut out: Vec<u8>,
    back: Vec<u8>,
    seq: u64,
) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    out[..8].copy_from_slice(&seq.to_be_bytes());
    let (res, out) = stream.write_all(out).await;
    res.context("write")?;
    let (res, back) = stream.read_exact(back).await;
    res.context("read the echo (closed by the far side?)")?;
    anyhow::ensure!(
        back[..8] == out[..8],
        "the echo of message {seq} carried another sequence number"
    );
    Ok((out, back))
}
