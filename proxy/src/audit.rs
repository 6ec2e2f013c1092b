//! The audit log: one JSON object per line, appended.
//!
//! Each record is `{"time": "<RFC 3339 UTC>", "event": "<name>", ...fields}` followed by a
//! newline. Events: `join`, `login`, `tunnel.connect`, `tunnel.disconnect`, `tunnel.refused`,
//! `session.start`, `session.end`, `access.denied`.
//!
//! # Durability
//!
//! [`AuditLog::record`] encodes the record and queues it for the log's writer thread, so no
//! core ever waits for the disk (a tunnel storm is thousands of records a second, and an
//! `fdatasync` takes milliseconds). The writer takes everything queued, hands it to the kernel
//! in one `write(2)` on the `O_APPEND` file and `fdatasync`s it: group commit, one sync per
//! batch however many cores recorded. Records reach the disk in the order they were queued.
//!
//! * A clean stop (SIGTERM, drain) writes and syncs every record before the process exits.
//! * `kill -9` or a crash loses the records still queued: those of the last moments (the
//!   writer starts on a batch as soon as the previous sync ends; a few milliseconds on a
//!   local disk). It never corrupts or loses earlier records: appends never rewrite bytes
//!   already in the file, and a batch is whole lines.
//! * A power loss can also lose the batch being synced, and on some file systems leave a torn
//!   last line; readers skip a last line that does not parse.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::SystemTime;

use serde_json::{Map, Value};

use crate::error::ProxyError;
use crate::util;

/// Most bytes one batch writes: bounds the writer's buffer during a storm.
const MAX_BATCH_BYTES: usize = 1 << 20;

/// An open audit log.
#[derive(Debug)]
pub struct AuditLog {
    /// `None` once closed (the `Mutex` lets `close(&self)` take it; held only for a send).
    queue: Mutex<Option<Sender<Vec<u8>>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    path: PathBuf,
}

impl AuditLog {
    /// Opens (creating, mode 0600) the log at `path` for appending and starts its writer
    /// thread.
    pub fn open(path: &Path) -> Result<AuditLog, ProxyError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| ProxyError::io("cannot open the audit log", path, e))?;
        let (queue, queued) = channel();
        let writer_path = path.to_owned();
        let writer = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || write_batches(file, &writer_path, queued))
            .map_err(|e| ProxyError::io("cannot start the audit log's writer thread", path, e))?;
        Ok(AuditLog {
            queue: Mutex::new(Some(queue)),
            writer: Mutex::new(Some(writer)),
            path: path.to_owned(),
        })
    }

    /// Writes and syncs everything queued, then stops the writer. Records after this are
    /// dropped with an error in the log. Also done on drop.
    pub fn close(&self) {
        let queue = self
            .queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        drop(queue);
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(writer) = writer {
            let _ = writer.join();
        }
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues one record for the writer (see the module documentation). A failure is logged,
    /// not returned: the proxy keeps serving, and the operator sees the error.
    pub fn record(&self, event: &str, fields: Value) {
        let mut object = Map::new();
        object.insert(
            "time".into(),
            Value::String(util::rfc3339(SystemTime::now())),
        );
        object.insert("event".into(), Value::String(event.into()));
        if let Value::Object(fields) = fields {
            object.extend(fields);
        }
        let mut line = match serde_json::to_vec(&Value::Object(object)) {
            Ok(line) => line,
            Err(e) => {
                tracing::error!(event, error = %e, "cannot encode an audit record");
                return;
            }
        };
        line.push(b'\n');
        let queue = self
            .queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let sent = queue.as_ref().map(|q| q.send(line));
        if !matches!(sent, Some(Ok(()))) {
            tracing::error!(
                event,
                path = %self.path.display(),
                "audit record dropped: the audit log is closed or its writer stopped"
            );
        }
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        self.close();
    }
}

/// The writer thread: batches of whole records, one `write(2)` and one `fdatasync` each,
/// until every sender is gone and the queue is empty.
fn write_batches(mut file: File, path: &Path, queued: Receiver<Vec<u8>>) {
    let mut batch = Vec::new();
    while let Ok(first) = queued.recv() {
        batch.clear();
        batch.extend_from_slice(&first);
        while batch.len() < MAX_BATCH_BYTES {
            match queued.try_recv() {
                Ok(line) => batch.extend_from_slice(&line),
                Err(_) => break,
            }
        }
        if let Err(e) = append(&mut file, &batch) {
            tracing::error!(
                path = %path.display(),
                error = %e,
                "cannot write the audit log; check the disk and the file's permissions"
            );
        }
    }
}

fn append(file: &mut File, batch: &[u8]) -> std::io::Result<()> {
    // One write(2) for the batch: with O_APPEND the kernel places it at the end in one piece.
    // A short write (disk full) is reported, not continued: at most the last line of the file
    // is partial, and readers skip it.
    let n = file.write(batch)?;
    if n != batch.len() {
        return Err(std::io::Error::other(format!(
            "short write ({n} of {} bytes); the disk may be full",
            batch.len()
        )));
    }
    file.sync_data()
}
