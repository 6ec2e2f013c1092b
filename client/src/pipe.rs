//! A bounded queue of `Bytes` between a blocking thread (stdin, stdout) and a monoio task.
//!
//! stdin and stdout may be a terminal, a pipe or a file, which io_uring and epoll do not all
//! handle alike; one blocking thread per direction is simple and always right, and a
//! ProxyCommand is a single connection.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Poll, Waker};

use bytes::Bytes;

/// Bytes a pipe holds before the sender waits.
const CAPACITY: usize = 256 * 1024;

/// One direction; clones share it.
#[derive(Clone, Default)]
pub struct Pipe {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Pipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipe").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Bytes>,
    queued: usize,
    closed: bool,
    waker: Option<Waker>,
}

impl Pipe {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn notify(&self, state: &mut State) {
        if let Some(w) = state.waker.take() {
            w.wake();
        }
        self.shared.changed.notify_all();
    }

    /// Ends the pipe: the receiver gets what is queued, then `None`; senders get `false`.
    pub fn close(&self) {
        let mut s = self.lock();
        s.closed = true;
        self.notify(&mut s);
    }

    /// Blocking send; false if the pipe was closed.
    pub fn send_blocking(&self, data: Bytes) -> bool {
        let mut s = self.lock();
        while s.queued >= CAPACITY && !s.closed {
            s = self
                .shared
                .changed
                .wait(s)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if s.closed {
            return false;
        }
        s.queued += data.len();
        s.queue.push_back(data);
        self.notify(&mut s);
        true
    }

    /// Blocking receive; `None` once closed and drained.
    pub fn recv_blocking(&self) -> Option<Bytes> {
        let mut s = self.lock();
        loop {
            if let Some(data) = s.queue.pop_front() {
                s.queued -= data.len();
                self.notify(&mut s);
                return Some(data);
            }
            if s.closed {
                return None;
            }
            s = self
                .shared
                .changed
                .wait(s)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Async send; false if the pipe was closed.
    pub async fn send(&self, data: Bytes) -> bool {
        let mut data = Some(data);
        poll_fn(|cx| {
            let mut s = self.lock();
            if s.closed {
                return Poll::Ready(false);
            }
            if s.queued >= CAPACITY {
                s.waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            if let Some(data) = data.take() {
                s.queued += data.len();
                s.queue.push_back(data);
            }
            self.notify(&mut s);
            Poll::Ready(true)
        })
        .await
    }

    /// Async receive; `None` once closed and drained.
    pub async fn recv(&self) -> Option<Bytes> {
        poll_fn(|cx| {
            let mut s = self.lock();
            if let Some(data) = s.queue.pop_front() {
                s.queued -= data.len();
                self.notify(&mut s);
                return Poll::Ready(Some(data));
            }
            if s.closed {
                return Poll::Ready(None);
            }
            s.waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn thread_to_task_and_back_in_order() {
        let inbound = Pipe::default();
        let outbound = Pipe::default();
        let (i2, o2) = (inbound.clone(), outbound.clone());
        let producer = std::thread::spawn(move || {
            for n in 0..2000u32 {
                assert!(i2.send_blocking(Bytes::from(n.to_be_bytes().repeat(64))));
            }
            i2.close();
        });
        let consumer = std::thread::spawn(move || {
            let mut got = Vec::new();
            while let Some(b) = o2.recv_blocking() {
                got.push(b);
            }
            got
        });
        monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
            .block_on(async {
                while let Some(b) = inbound.recv().await {
                    assert!(outbound.send(b).await);
                }
                outbound.close();
            });
        producer.join().unwrap();
        let got = consumer.join().unwrap();
        assert_eq!(got.len(), 2000);
        for (n, b) in got.iter().enumerate() {
            assert_eq!(&b[..4], &(n as u32).to_be_bytes());
        }
    }

    #[test]
    fn closed_pipe_refuses_sends() {
        let p = Pipe::default();
        p.close();
        assert!(!p.send_blocking(Bytes::from_static(b"x")));
        assert!(p.recv_blocking().is_none());
    }
}
