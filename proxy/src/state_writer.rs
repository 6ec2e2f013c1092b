//! One thread applies the running proxy's changes to `state.json` (a token used by a join), in
//! arrival order and in batches: everything queued while the previous write ran is applied to
//! one read of the file and saved with one write and one `fsync` (group commit).
//!
//! Why a thread of its own: the update is a locked read-modify-write with `fsync`s (milliseconds);
//! a core must not wait for it, and threads racing for the file lock are not served in order
//! (a join could starve behind hundreds of others during a reconnect storm; the load test saw
//! joins time out that way). An answer is given only once the change is on disk.
//!
//! A change that fails (a refused join) leaves the state as it was and is not written: when
//! every change of a batch failed, the file is not touched at all, so unauthenticated traffic
//! never makes the proxy write to disk.

use std::future::poll_fn;
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Poll, Waker};
use std::thread::JoinHandle;

use crate::error::ProxyError;
use crate::state::{State, StateStore};

/// Most changes saved by one write.
const MAX_BATCH: usize = 512;

struct Job {
    /// Applies the change to the state read for this batch; keeps its result for `done`;
    /// returns whether it changed the state.
    apply: Box<dyn FnOnce(&mut State) -> bool + Send>,
    /// The batch is on disk (`Ok`), or it could not be read or written (`Err`).
    done: Box<dyn FnOnce(Result<(), String>) + Send>,
}

/// The writer thread and its queue.
pub struct StateWriter {
    queue: Mutex<Option<Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for StateWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateWriter").finish_non_exhaustive()
    }
}

struct Slot<T> {
    output: Option<T>,
    result: Option<Result<T, String>>,
    waker: Option<Waker>,
}

impl StateWriter {
    /// Starts the writer for `store`.
    pub fn start(store: StateStore) -> Result<Self, ProxyError> {
        let (queue, jobs) = channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("state-writer".into())
            .spawn(move || {
                while let Ok(first) = jobs.recv() {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match jobs.try_recv() {
                            Ok(job) => batch.push(job),
                            Err(_) => break,
                        }
                    }
                    let mut done = Vec::with_capacity(batch.len());
                    let mut applies = Vec::with_capacity(batch.len());
                    for job in batch {
                        applies.push(job.apply);
                        done.push(job.done);
                    }
                    let written = store
                        .update_if_changed(|state| {
                            let mut changed = false;
                            for apply in applies {
                                changed |= apply(state);
                            }
                            changed
                        })
                        .map(|_| ())
                        .map_err(|e| e.to_string());
                    for d in done {
                        d(written.clone());
                    }
                }
            })
            .map_err(|e| ProxyError::Other(format!("cannot start the state writer thread: {e}")))?;
        Ok(StateWriter {
            queue: Mutex::new(Some(queue)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Applies `change` to the state and, if it succeeds, saves it; returns what `change`
    /// returned once it is on disk, or why the state could not be read or written. A `change`
    /// that returns `Err` must leave the state as it found it: it is not saved for it (another
    /// change of the same batch may still be).
    pub async fn update<T: Send + 'static, E: Send + 'static>(
        &self,
        change: impl FnOnce(&mut State) -> Result<T, E> + Send + 'static,
    ) -> Result<Result<T, E>, String> {
        let slot = Arc::new(Mutex::new(Slot {
            output: None,
            result: None,
            waker: None,
        }));
        let (for_apply, for_done) = (slot.clone(), slot.clone());
        let job = Job {
            apply: Box::new(move |state| {
                let out = change(state);
                let changed = out.is_ok();
                lock(&for_apply).output = Some(out);
                changed
            }),
            done: Box::new(move |written| {
                let mut slot = lock(&for_done);
                let output = slot.output.take();
                slot.result = Some(match (written, output) {
                    (Ok(()), Some(out)) => Ok(out),
                    (Ok(()), None) => Err("the change was not applied".into()),
                    (Err(e), _) => Err(e),
                });
                if let Some(w) = slot.waker.take() {
                    w.wake();
                }
            }),
        };
        let sent = lock(&self.queue).as_ref().map(|q| q.send(job));
        if !matches!(sent, Some(Ok(()))) {
            return Err("the state writer has stopped".into());
        }
        poll_fn(|cx| {
            let mut slot = lock(&slot);
            if let Some(result) = slot.result.take() {
                return Poll::Ready(result);
            }
            slot.waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Finishes the queued changes and stops the thread. Also done on drop.
    pub fn close(&self) {
        drop(lock(&self.queue).take());
        if let Some(thread) = lock(&self.thread).take() {
            let _ = thread.join();
        }
    }
}

impl Drop for StateWriter {
    fn drop(&mut self) {
        self.close();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datadir::DataDir;

    #[test]
    fn changes_are_saved_in_order_and_answered_after_the_write() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let data = DataDir::new(dir.path());
        let store = StateStore::new(data);
        store
            .create("c.test", &[])
            .unwrap_or_else(|e| panic!("{e}"));
        let writer = StateWriter::start(store.clone()).unwrap_or_else(|e| panic!("{e}"));
        let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        let results = rt.block_on(async {
            let mut tasks = Vec::new();
            let writer = Rc::new(writer);
            for i in 0..200u32 {
                let writer = writer.clone();
                tasks.push(monoio::spawn(async move {
                    writer
                        .update(move |state| {
                            state.hosts.push(format!("h{i}"));
                            Ok::<_, ()>(state.hosts.len())
                        })
                        .await
                        .map(|r| r.unwrap_or_default())
                }));
            }
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap_or_else(|e| panic!("{e}")));
            }
            out
        });
        // Every change applied exactly once, each answer the length right after its own push.
        let mut lengths = results.clone();
        lengths.sort_unstable();
        assert_eq!(lengths, (1..=200).collect::<Vec<_>>());
        let state = store.read().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(state.hosts.len(), 200, "every change is on disk");
    }

    use std::rc::Rc;
}
