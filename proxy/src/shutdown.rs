//! Stopping the proxy: a handle any thread can trigger (the signal thread, a test), and
//! futures on the runtime that wake when it is.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Poll, Waker};

#[derive(Debug, Default)]
struct Inner {
    triggered: AtomicBool,
    wakers: Mutex<Vec<Waker>>,
}

/// A shutdown request shared between threads; clones share it. Waking a monoio task from
/// another thread works because monoio is built with its `sync` feature.
#[derive(Debug, Clone, Default)]
pub struct Shutdown(Arc<Inner>);

impl Shutdown {
    /// A handle that has not been triggered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the proxy to drain and stop. Idempotent.
    pub fn trigger(&self) {
        self.0.triggered.store(true, Ordering::SeqCst);
        let wakers =
            std::mem::take(&mut *self.0.wakers.lock().unwrap_or_else(PoisonError::into_inner));
        for w in wakers {
            w.wake();
        }
    }

    /// Whether [`trigger`](Self::trigger) was called.
    pub fn is_triggered(&self) -> bool {
        self.0.triggered.load(Ordering::SeqCst)
    }

    /// Completes once triggered.
    pub async fn wait(&self) {
        poll_fn(|cx| {
            if self.is_triggered() {
                return Poll::Ready(());
            }
            let mut wakers = self.0.wakers.lock().unwrap_or_else(PoisonError::into_inner);
            if self.is_triggered() {
                return Poll::Ready(());
            }
            if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
                wakers.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }
}

/// Routes SIGTERM and SIGINT to `shutdown`: blocks both signals in the calling thread (so
/// call this before any other thread is started; threads inherit the mask) and starts a
/// thread that waits for them. A second signal exits at once with status 130.
pub fn install_signal_handler(shutdown: Shutdown) -> std::io::Result<()> {
    // SAFETY: plain libc calls on a local, initialised sigset.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        set
    };
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut seen = 0;
            loop {
                let mut signal: libc::c_int = 0;
                // SAFETY: `set` is initialised; `signal` is a valid out pointer.
                let rc = unsafe { libc::sigwait(&set, &mut signal) };
                if rc != 0 {
                    continue;
                }
                seen += 1;
                if seen > 1 {
                    eprintln!("remoteler-proxy: second signal, exiting without draining");
                    std::process::exit(130);
                }
                tracing::info!(signal, "signal received; draining");
                shutdown.trigger();
            }
        })?;
    Ok(())
}
