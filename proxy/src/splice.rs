//! Byte pumps between two streams: a user's `MuxStream` and an agent's `MuxStream`, or a
//! user's `MuxStream` and a TCP connection to a node's sshd.
//!
//! Payloads pass through as the `Bytes` they arrived in (no copy). A side's end of data
//! (`read` returns `None`, or TCP EOF) becomes a half-close (FIN, or TCP `shutdown`) of the
//! other side; both directions must end before the splice is over. An error on either side
//! stops both directions at once, and what is still open is reset with the reason.
//!
//! Backpressure: a direction reads its source only after the previous chunk was taken by
//! the destination, and a `MuxStream::write` waits while the destination stream has no
//! credit. That credit is the receiving peer's window capped at ours (`frame::Session`), and
//! the session's memory budget caps what all its streams queue. So while the receiver does
//! not read (or its session is detached, waiting for a resume), the source is not read
//! either: its unread bytes stay within the window we granted and no WINDOW re-opens it.
//! One direction holds at most two windows (one queued toward the receiver, one unread from
//! the source) and the chunk in between. Test: `proxy/tests/memory.rs`.

use std::cell::Cell;
use std::future::{Future, poll_fn};
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use frame::ErrorCode;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Splitable};
use monoio::net::TcpStream;
use tunnel::mux::MuxStream;

/// TCP read size: a few frames' worth, so one read fills several DATA frames.
const TCP_READ_SIZE: usize = 64 * 1024;
/// How long finished streams may wait for their last acknowledgement (see [`Settle`]).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How a splice ended.
#[derive(Debug)]
pub struct SpliceOutcome {
    /// Bytes from the first stream to the second.
    pub forward: u64,
    /// Bytes from the second stream to the first.
    pub backward: u64,
    /// `None` when both directions finished cleanly; else what went wrong.
    pub error: Option<String>,
}

/// Streams that finished cleanly but may still wait for the peer's last WINDOW. Awaiting
/// [`Settle::wait`] before dropping them lets their sessions forget them (a handle dropped
/// before the stream is closed leaves its bookkeeping behind).
#[derive(Debug)]
pub struct Settle(Vec<MuxStream>);

impl Settle {
    /// Waits (bounded) until every stream is closed.
    pub async fn wait(self) {
        for s in &self.0 {
            let _ = monoio::time::timeout(SETTLE_TIMEOUT, s.closed()).await;
        }
    }
}

/// Runs two futures until both succeed or one fails; a failure drops the other at once.
async fn both<A, B>(a: A, b: B) -> Result<(), String>
where
    A: Future<Output = Result<(), String>>,
    B: Future<Output = Result<(), String>>,
{
    let mut a = pin!(a);
    let mut b = pin!(b);
    let (mut a_done, mut b_done) = (false, false);
    poll_fn(|cx| {
        if !a_done {
            if let Poll::Ready(r) = a.as_mut().poll(cx) {
                r?;
                a_done = true;
            }
        }
        if !b_done {
            if let Poll::Ready(r) = b.as_mut().poll(cx) {
                r?;
                b_done = true;
            }
        }
        if a_done && b_done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await
}

async fn mux_to_mux(
    from: &MuxStream,
    to: &MuxStream,
    count: &Cell<u64>,
    names: (&str, &str),
) -> Result<(), String> {
    loop {
        match from.read().await {
            Ok(Some(bytes)) => {
                let n = bytes.len() as u64;
                to.write(bytes)
                    .await
                    .map_err(|e| format!("{} side: {e}", names.1))?;
                count.set(count.get() + n);
            }
            Ok(None) => {
                to.finish();
                return Ok(());
            }
            Err(e) => return Err(format!("{} side: {e}", names.0)),
        }
    }
}

/// Splices two streams both ways. `names` label the sides in the error.
pub async fn splice_streams(
    a: MuxStream,
    b: MuxStream,
    names: (&str, &str),
) -> (SpliceOutcome, Settle) {
    let forward = Cell::new(0);
    let backward = Cell::new(0);
    let result = both(
        mux_to_mux(&a, &b, &forward, names),
        mux_to_mux(&b, &a, &backward, (names.1, names.0)),
    )
    .await;
    if let Err(e) = &result {
        let reason = format!("session aborted: {e}");
        a.reset(ErrorCode::CANCELLED, &reason);
        b.reset(ErrorCode::CANCELLED, &reason);
    }
    let outcome = SpliceOutcome {
        forward: forward.get(),
        backward: backward.get(),
        error: result.err(),
    };
    (outcome, Settle(vec![a, b]))
}

/// Splices a stream and a TCP connection both ways: `forward` counts stream → TCP.
pub async fn splice_tcp(
    stream: MuxStream,
    tcp: TcpStream,
    names: (&str, &str),
) -> (SpliceOutcome, Settle) {
    let (mut rd, mut wr) = tcp.into_split();
    let forward = Cell::new(0);
    let backward = Cell::new(0);
    let to_tcp = async {
        loop {
            match stream.read().await {
                Ok(Some(bytes)) => {
                    let n = bytes.len() as u64;
                    let (res, _) = wr.write_all(bytes).await;
                    res.map_err(|e| format!("{} side: {e}", names.1))?;
                    forward.set(forward.get() + n);
                }
                Ok(None) => {
                    let _ = wr.shutdown().await;
                    return Ok(());
                }
                Err(e) => return Err(format!("{} side: {e}", names.0)),
            }
        }
    };
    let from_tcp = async {
        loop {
            let buf = BytesMut::with_capacity(TCP_READ_SIZE);
            let (res, buf) = rd.read(buf).await;
            match res {
                Ok(0) => {
                    stream.finish();
                    return Ok(());
                }
                Ok(n) => {
                    stream
                        .write(buf.freeze())
                        .await
                        .map_err(|e| format!("{} side: {e}", names.0))?;
                    backward.set(backward.get() + n as u64);
                }
                Err(e) => return Err(format!("{} side: {e}", names.1)),
            }
        }
    };
    let result = both(to_tcp, from_tcp).await;
    if let Err(e) = &result {
        stream.reset(ErrorCode::CANCELLED, &format!("session aborted: {e}"));
    }
    let outcome = SpliceOutcome {
        forward: forward.get(),
        backward: backward.get(),
        error: result.err(),
    };
    (outcome, Settle(vec![stream]))
}
