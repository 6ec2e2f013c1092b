//! Small single-thread synchronisation helpers for the monoio workers, and the inbox that
//! carries the controller's commands from the stdin thread into the runtime.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Poll, Waker};

/// A generation counter tasks wait on: [`Signal::raise`] wakes every waiter of the current
/// generation (used for "cut every tunnel" and "stop").
#[derive(Clone, Default)]
pub struct Signal {
    inner: Rc<RefCell<(u64, Vec<Waker>)>>,
}

impl std::fmt::Debug for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signal")
            .field("generation", &self.generation())
            .finish()
    }
}

impl Signal {
    /// The current generation.
    pub fn generation(&self) -> u64 {
        self.inner.borrow().0
    }

    /// Moves to the next generation and wakes everyone waiting.
    pub fn raise(&self) {
        let wakers = {
            let mut inner = self.inner.borrow_mut();
            inner.0 += 1;
            std::mem::take(&mut inner.1)
        };
        for w in wakers {
            w.wake();
        }
    }

    /// Resolves once the generation differs from `seen`.
    pub async fn changed(&self, seen: u64) {
        poll_fn(|cx| {
            let mut inner = self.inner.borrow_mut();
            if inner.0 != seen {
                Poll::Ready(())
            } else {
                inner.1.push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

/// A counting semaphore for tasks of one thread (bounds connects in flight).
#[derive(Clone)]
pub struct Semaphore {
    inner: Rc<RefCell<(usize, VecDeque<Waker>)>>,
}

impl std::fmt::Debug for Semaphore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Semaphore")
            .field("available", &self.inner.borrow().0)
            .finish()
    }
}

/// One unit of a [`Semaphore`], given back on drop.
#[derive(Debug)]
pub struct Permit {
    sem: Semaphore,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let waker = {
            let mut inner = self.sem.inner.borrow_mut();
            inner.0 += 1;
            inner.1.pop_front()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl Semaphore {
    /// `permits` units.
    pub fn new(permits: usize) -> Self {
        Semaphore {
            inner: Rc::new(RefCell::new((permits.max(1), VecDeque::new()))),
        }
    }

    /// Waits for a unit.
    pub async fn acquire(&self) -> Permit {
        poll_fn(|cx| {
            let mut inner = self.inner.borrow_mut();
            if inner.0 > 0 {
                inner.0 -= 1;
                Poll::Ready(())
            } else {
                inner.1.push_back(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
        // A woken waiter that finds no unit (another task took it first) re-queues itself.
        Permit { sem: self.clone() }
    }
}

#[derive(Default)]
struct InboxState {
    lines: VecDeque<String>,
    closed: bool,
    waker: Option<Waker>,
}

/// Lines from another thread (the stdin reader) to a task of the runtime. Waking across
/// threads relies on monoio's `sync` feature.
#[derive(Clone, Default)]
pub struct Inbox {
    inner: Arc<Mutex<InboxState>>,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox").finish_non_exhaustive()
    }
}

impl Inbox {
    /// Starts a thread that forwards stdin lines into a new inbox; end of input closes it.
    pub fn from_stdin() -> Self {
        let inbox = Inbox::default();
        let sender = inbox.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                sender.push(Some(line));
            }
            sender.push(None);
        });
        inbox
    }

    fn push(&self, line: Option<String>) {
        let waker = {
            let mut s = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            match line {
                Some(l) => s.lines.push_back(l),
                None => s.closed = true,
            }
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// The next line; `None` once the controller closed our stdin (it is gone).
    pub async fn next(&self) -> Option<String> {
        poll_fn(|cx| {
            let mut s = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(line) = s.lines.pop_front() {
                return Poll::Ready(Some(line));
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
