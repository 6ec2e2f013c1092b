//! Byte pumps between two streams: a user's `MuxStream` and an agent's `MuxStream`, or a
//! user's `MuxStream` and a TCP connection to a node's sshd.
//!
//! Payloads pass through as the `Bytes` they arrived in (no copy). A side's end of data
//! (`read` returns `None`, or TCP EOF) becomes a half-close (FIN, or TCP `shutdown`) of the
//! other side; both directions must end before the splice is over. An error on either side
//! stops both directions, and the caller resets what is still open with the reason.
//!
//! `MuxStream::finish` and `reset` take `&mut self` while the other direction reads the same
//! stream with `&self`, so the streams sit in a `RefCell`: reads borrow it only inside one
//! poll (a `MuxStream` read is cancel-safe, so it is recreated on every poll), writes hold a
//! shared borrow, and `finish` happens only after this direction's last write finished.

use std::cell::{Cell, RefCell};
use std::future::{Future, poll_fn};
use std::pin::pin;
use std::task::Poll;

use bytes::{Bytes, BytesMut};
use frame::ErrorCode;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Splitable};
use monoio::net::TcpStream;
use tunnel::mux::{MuxStream, StreamError};

/// TCP read size: a few frames' worth, so one read fills several DATA frames.
const TCP_READ_SIZE: usize = 64 * 1024;

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

async fn read_mux(stream: &RefCell<MuxStream>) -> Result<Option<Bytes>, StreamError> {
    poll_fn(|cx| {
        let Ok(s) = stream.try_borrow() else {
            return Poll::Ready(Err(busy()));
        };
        let read = pin!(s.read());
        read.poll(cx)
    })
    .await
}

async fn write_mux(stream: &RefCell<MuxStream>, mut data: Bytes) -> Result<(), StreamError> {
    // Like `read_mux`, the borrow lasts one poll. `MuxStream::write` keeps the rest of its
    // buffer inside its future, so it is only ever handed what the stream takes at once
    // (`send_capacity`), or, when that is zero, polled once to register for credit: then it
    // takes nothing.
    poll_fn(|cx| {
        loop {
            if data.is_empty() {
                return Poll::Ready(Ok(()));
            }
            let Ok(s) = stream.try_borrow() else {
                return Poll::Ready(Err(busy()));
            };
            let capacity = s
                .tunnel()
                .with_session(|session| session.send_capacity(s.id()));
            let chunk = if capacity == 0 {
                data.clone()
            } else {
                data.split_to(capacity.min(data.len()))
            };
            let write = pin!(s.write(chunk));
            match write.poll(cx) {
                Poll::Ready(Ok(())) if capacity == 0 => data.clear(),
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending if capacity == 0 => return Poll::Pending,
                Poll::Pending => {
                    return Poll::Ready(Err(StreamError::Reset {
                        code: ErrorCode::INTERNAL,
                        reason: "stream took less than its send capacity".into(),
                    }));
                }
            }
        }
    })
    .await
}

fn busy() -> StreamError {
    StreamError::Reset {
        code: ErrorCode::INTERNAL,
        reason: "stream busy".into(),
    }
}

fn finish_mux(stream: &RefCell<MuxStream>) -> Result<(), String> {
    match stream.try_borrow_mut() {
        Ok(s) => {
            s.finish();
            Ok(())
        }
        Err(_) => Err("cannot half-close a stream that is in use".into()),
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
    from: &RefCell<MuxStream>,
    to: &RefCell<MuxStream>,
    count: &Cell<u64>,
    from_name: &str,
    to_name: &str,
) -> Result<(), String> {
    loop {
        match read_mux(from).await {
            Ok(Some(bytes)) => {
                let n = bytes.len() as u64;
                write_mux(to, bytes)
                    .await
                    .map_err(|e| format!("{to_name} side: {e}"))?;
                count.set(count.get() + n);
            }
            Ok(None) => return finish_mux(to),
            Err(e) => return Err(format!("{from_name} side: {e}")),
        }
    }
}

fn reset_open(stream: &RefCell<MuxStream>, reason: &str) {
    if let Ok(s) = stream.try_borrow_mut() {
        s.reset(ErrorCode::CANCELLED, reason);
    }
}

/// Waits (bounded) until both sides have acknowledged everything, so the streams are gone
/// from their sessions before the handles are dropped.
async fn settle(streams: &[&RefCell<MuxStream>]) {
    for s in streams {
        let closed = poll_fn(|cx| match s.try_borrow() {
            Ok(s) => pin!(s.closed()).poll(cx),
            Err(_) => Poll::Ready(Ok(())),
        });
        let _ = monoio::time::timeout(std::time::Duration::from_secs(10), closed).await;
    }
}

/// Splices two streams both ways. `names` label the sides in the error.
pub async fn splice_streams(a: MuxStream, b: MuxStream, names: (&str, &str)) -> SpliceOutcome {
    let a = RefCell::new(a);
    let b = RefCell::new(b);
    let forward = Cell::new(0);
    let backward = Cell::new(0);
    let result = both(
        mux_to_mux(&a, &b, &forward, names.0, names.1),
        mux_to_mux(&b, &a, &backward, names.1, names.0),
    )
    .await;
    match &result {
        Ok(()) => settle(&[&a, &b]).await,
        Err(e) => {
            let reason = format!("session aborted: {e}");
            reset_open(&a, &reason);
            reset_open(&b, &reason);
        }
    }
    SpliceOutcome {
        forward: forward.get(),
        backward: backward.get(),
        error: result.err(),
    }
}

/// Splices a stream and a TCP connection both ways: `forward` counts stream → TCP.
pub async fn splice_tcp(stream: MuxStream, tcp: TcpStream, names: (&str, &str)) -> SpliceOutcome {
    let stream = RefCell::new(stream);
    let (mut rd, mut wr) = tcp.into_split();
    let forward = Cell::new(0);
    let backward = Cell::new(0);
    let to_tcp = async {
        loop {
            match read_mux(&stream).await {
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
                Ok(0) => return finish_mux(&stream),
                Ok(n) => {
                    write_mux(&stream, buf.freeze())
                        .await
                        .map_err(|e| format!("{} side: {e}", names.0))?;
                    backward.set(backward.get() + n as u64);
                }
                Err(e) => return Err(format!("{} side: {e}", names.1)),
            }
        }
    };
    let result = both(to_tcp, from_tcp).await;
    match &result {
        Ok(()) => settle(&[&stream]).await,
        Err(e) => reset_open(&stream, &format!("session aborted: {e}")),
    }
    SpliceOutcome {
        forward: forward.get(),
        backward: backward.get(),
        error: result.err(),
    }
}
