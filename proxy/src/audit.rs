//! The audit log: one JSON object per line, appended.
//!
//! Each record is `{"time": "<RFC 3339 UTC>", "event": "<name>", ...fields}` followed by a
//! newline. Events: `join`, `login`, `tunnel.connect`, `tunnel.disconnect`, `tunnel.refused`,
//! `session.start`, `session.end`, `access.denied`.
//!
//! # Durability
//!
//! The file is opened with `O_APPEND`; each record is handed to the kernel in a single
//! `write(2)` call and then `fdatasync`ed before [`AuditLog::record`] returns. So a record for
//! which `record` returned is on disk and survives a power loss; `kill -9` (or a crash) can lose
//! at most the record being written at that moment, and can never corrupt earlier ones, since
//! appends never rewrite bytes already in the file. A torn last line (power loss during the
//! write) is possible on some file systems; readers skip a last line that does not parse.
//!
//! The `fdatasync` runs on the calling thread (a few milliseconds on a local disk); session
//! and tunnel events are rare next to data traffic, which is why that is acceptable here.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde_json::{Map, Value};

use crate::error::ProxyError;
use crate::util;

/// An open audit log.
#[derive(Debug)]
pub struct AuditLog {
    file: File,
    path: PathBuf,
}

impl AuditLog {
    /// Opens (creating, mode 0600) the log at `path` for appending.
    pub fn open(path: &Path) -> Result<AuditLog, ProxyError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| ProxyError::io("cannot open the audit log", path, e))?;
        Ok(AuditLog {
            file,
            path: path.to_owned(),
        })
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record and makes it durable (see the module documentation). A failure is
    /// logged, not returned: the proxy keeps serving, and the operator sees the error.
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
        if let Err(e) = self.append(&line) {
            tracing::error!(
                event,
                path = %self.path.display(),
                error = %e,
                "cannot write the audit log; check the disk and the file's permissions"
            );
        }
    }

    fn append(&self, line: &[u8]) -> std::io::Result<()> {
        let mut file = &self.file;
        // One write(2) for the whole record: with O_APPEND the kernel places it at the end in
        // one piece. A short write (disk full) is reported, not continued, so a record is
        // never split around someone else's.
        let n = file.write(line)?;
        if n != line.len() {
            return Err(std::io::Error::other(format!(
                "short write ({n} of {} bytes); the disk may be full",
                line.len()
            )));
        }
        file.sync_data()
    }
}
