//! A stop signal that any number of tasks can wait on, any number of times.

use std::cell::{Cell, RefCell};
use std::future::{Future, poll_fn};
use std::rc::Rc;
use std::task::{Poll, Waker};

/// Set once by [`Stop::trigger`]; [`Stop::wait`] is cancel-safe and may be polled again after
/// it completed (it completes at once).
#[derive(Clone, Default)]
pub struct Stop {
    inner: Rc<StopInner>,
}

#[derive(Default)]
struct StopInner {
    stopped: Cell<bool>,
    waiters: RefCell<Vec<Waker>>,
}

impl std::fmt::Debug for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stop")
            .field("stopped", &self.inner.stopped.get())
            .finish()
    }
}

impl Stop {
    /// A stop signal triggered when `shutdown` completes (a task on the current runtime
    /// waits for it).
    pub fn from_future(shutdown: impl Future<Output = ()> + 'static) -> Stop {
        let stop = Stop::default();
        let trigger = stop.clone();
        monoio::spawn(async move {
            shutdown.await;
            trigger.trigger();
        });
        stop
    }

    /// Whether the signal was given.
    pub fn is_stopped(&self) -> bool {
        self.inner.stopped.get()
    }

    /// Gives the signal and wakes every waiter.
    pub fn trigger(&self) {
        self.inner.stopped.set(true);
        for w in self.inner.waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }

    /// Completes once the signal was given.
    pub async fn wait(&self) {
        poll_fn(|cx| {
            if self.inner.stopped.get() {
                Poll::Ready(())
            } else {
                let mut waiters = self.inner.waiters.borrow_mut();
                if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                    waiters.push(cx.waker().clone());
                }
                Poll::Pending
            }
        })
        .await
    }
}
