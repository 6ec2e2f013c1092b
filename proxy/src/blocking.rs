//! Runs CPU-heavy work (argon2) off the runtime thread, so one login does not stall every
//! connection of the core.

use std::future::poll_fn;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Poll, Waker};

struct Slot<T> {
    result: Option<T>,
    waker: Option<Waker>,
    gone: bool,
}

/// Runs `work` on a new thread and waits for its result; `None` if the thread could not be
/// started or panicked. Callers bound how many run at once.
pub async fn run<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let slot = Arc::new(Mutex::new(Slot {
        result: None,
        waker: None,
        gone: false,
    }));
    let theirs = slot.clone();
    let spawned = std::thread::Builder::new()
        .name("proxy-blocking".into())
        .spawn(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).ok();
            let mut slot = theirs.lock().unwrap_or_else(PoisonError::into_inner);
            slot.result = result;
            slot.gone = true;
            if let Some(w) = slot.waker.take() {
                w.wake();
            }
        });
    if spawned.is_err() {
        return None;
    }
    poll_fn(|cx| {
        let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.gone {
            return Poll::Ready(slot.result.take());
        }
        slot.waker = Some(cx.waker().clone());
        Poll::Pending
    })
    .await
}
