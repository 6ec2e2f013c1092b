//! Copies bytes between a tunnel stream and a TCP connection, both ways, without copying
//! bulk payloads: a TCP read lands in a fresh `BytesMut` that is frozen and handed to the
//! stream as is (a short read is copied into a right-sized buffer instead); a stream read is a
//! `Bytes` view of the TLS plaintext, written to TCP as is. Reads grow from 64 to 256 KiB
//! while the target fills them (`tunnel::read_size`).

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use bytes::BytesMut;
use frame::ErrorCode;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Splitable};
use monoio::net::TcpStream;
use tunnel::mux::{MuxStream, StreamError};
use tunnel::read_size::ReadSize;

use crate::stop::Stop;

/// Bytes asked of a TCP read while the target sends little: one 64 KiB DATA frame. A buffer
/// of this size exists only while a stream is open and waits for its target to send (idle
/// streams hold this much each). Reads of 16 KiB cost the agent 2.4 times the CPU per byte of
/// 64 KiB ones (benches/compare.sh, download), the limit of a small board.
const READ_MIN: usize = 64 * 1024;

/// Bytes asked of a TCP read while the target fills every read (a download): four 64 KiB DATA
/// frames, which the tunnel encrypts and sends with one system call. Only a stream whose last
/// read filled its buffer asks this much (see [`ReadSize`]).
const READ_MAX: usize = 256 * 1024;

/// How long a stream whose both directions are done waits for the peer's acknowledgement.
const CLOSE_WAIT: Duration = Duration::from_secs(30);

/// What a finished splice moved and how it ended.
#[derive(Debug, Default)]
pub struct SpliceReport {
    /// Bytes from TCP into the stream.
    pub to_stream: u64,
    /// Bytes from the stream into TCP.
    pub to_tcp: u64,
    /// Why it ended abnormally, if it did.
    pub error: Option<String>,
}

/// Splices `stream` with `tcp` until both directions are finished or one fails. The end of
/// one direction is passed on as a half-close (FIN, or TCP shutdown of writing); a failure
/// resets the stream with the reason.
pub async fn splice(stream: MuxStream, tcp: TcpStream) -> SpliceReport {
    let stream = Rc::new(stream);
    let failed: Rc<RefCell<Option<String>>> = Rc::default();
    // Given when the stream -> TCP direction fails: the other direction stops reading TCP.
    let abort = Stop::default();
    let to_tcp_bytes = Rc::new(Cell::new(0u64));
    let (mut tcp_read, mut tcp_write) = tcp.into_split();

    // stream -> TCP, in its own task.
    let to_tcp = {
        let stream = stream.clone();
        let failed = failed.clone();
        let abort = abort.clone();
        let counter = to_tcp_bytes.clone();
        monoio::spawn(async move {
            loop {
                match stream.read().await {
                    Ok(Some(bytes)) => {
                        let len = bytes.len() as u64;
                        let (res, _) = tcp_write.write_all(bytes).await;
                        if let Err(e) = res {
                            let reason = format!("writing to the target: {e}");
                            stream.reset(ErrorCode::CANCELLED, &reason);
                            record(&failed, reason);
                            abort.trigger();
                            return;
                        }
                        counter.set(counter.get() + len);
                    }
                    Ok(None) => {
                        let _ = tcp_write.shutdown().await;
                        return;
                    }
                    Err(e) => {
                        record(&failed, stream_error_text(&e));
                        abort.trigger();
                        let _ = tcp_write.shutdown().await;
                        return;
                    }
                }
            }
        })
    };

    // TCP -> stream, here.
    let mut to_stream = 0u64;
    let mut size = ReadSize::new(READ_MIN, READ_MAX);
    loop {
        let asked = size.next();
        let buf = BytesMut::with_capacity(asked);
        // Dropping the read on abort may lose bytes the kernel had: the stream is being
        // reset anyway.
        let (res, buf) = monoio::select! {
            read = tcp_read.read(buf) => read,
            _ = abort.wait() => break,
        };
        match res {
            Ok(0) => {
                stream.finish();
                break;
            }
            Ok(n) => {
                to_stream += n as u64;
                size.record(asked, n);
                // The stream keeps what it sends until the proxy acknowledges it (a WINDOW
                // comes only after a quarter of the window): a keystroke must not pin a whole
                // read buffer meanwhile.
                let data = if ReadSize::worth_copying(asked, n) {
                    bytes::Bytes::copy_from_slice(&buf[..n])
                } else {
                    buf.freeze()
                };
                if let Err(e) = stream.write(data).await {
                    record(&failed, stream_error_text(&e));
                    break;
                }
            }
            Err(e) => {
                let reason = format!("reading from the target: {e}");
                stream.reset(ErrorCode::CANCELLED, &reason);
                record(&failed, reason);
                break;
            }
        }
    }
    let _ = to_tcp.await;
    let error = failed.borrow().clone();
    match &error {
        Some(reason) => stream.reset(ErrorCode::CANCELLED, reason),
        None => {
            let _ = monoio::time::timeout(CLOSE_WAIT, stream.closed()).await;
        }
    }
    SpliceReport {
        to_stream,
        to_tcp: to_tcp_bytes.get(),
        error,
    }
}

fn stream_error_text(e: &StreamError) -> String {
    format!("tunnel side: {e}")
}

fn record(failed: &RefCell<Option<String>>, reason: String) {
    failed.borrow_mut().get_or_insert(reason);
}
