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
//!   last line; so can `kill -9` during a batch's `write(2)` of more than a page (the kernel
//!   stops a write between pages for a fatal signal). [`AuditLog::open`] ends a torn last
//!   line with a newline, so new records start on a line of their own; readers skip the line
//!   that does not parse.
//!
//! `proxy/tests/durability.rs` (`audit_log_survives_kill_9`) checks this with the real binary
//! and `kill -9` at random moments of a join storm.

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

/// Ends a torn last line (a batch cut short by a crash, `kill -9` or a full disk) with a
/// newline, so that it stays a line of its own that readers skip, and the first record
/// appended now is not glued to it and lost with it.
fn end_torn_line(file: &mut File) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    let mut last = [0u8; 1];
    file.read_exact_at(&mut last, len - 1)?;
    if last[0] != b'\n' {
        file.write_all(b"\n")?;
        file.sync_data()?;
    }
    Ok(())
}

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
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| ProxyError::io("cannot open the audit log", path, e))?;
        end_torn_line(&mut file)
            .map_err(|e| ProxyError::io("cannot end the torn last line of", path, e))?;
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

// ---- reading --------------------------------------------------------------------------------

/// Which records [`read`] keeps.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only records at or after this time.
    pub since: Option<SystemTime>,
    /// Only records of this event.
    pub event: Option<String>,
    /// Only records whose `user` is this.
    pub user: Option<String>,
}

/// One record read back.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Its `time`.
    pub time: SystemTime,
    /// Its `event`.
    pub event: String,
    /// Every field, `time` and `event` included.
    pub fields: Map<String, Value>,
    /// The line as written.
    pub line: String,
}

/// A line that could not be read; [`read`] skips it and goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub reason: String,
}

/// Parses one line of the log.
pub fn parse_line(line: &str) -> Result<Record, String> {
    let value: Value =
        serde_json::from_str(line).map_err(|e| format!("not a JSON record ({e})"))?;
    let Value::Object(fields) = value else {
        return Err("not a JSON object".into());
    };
    let text = |key: &str| fields.get(key).and_then(Value::as_str);
    let time = text("time").ok_or("no \"time\" field")?;
    let time = humantime::parse_rfc3339_weak(time)
        .map_err(|e| format!("\"time\" is not an RFC 3339 time ({e})"))?;
    let event = text("event").ok_or("no \"event\" field")?.to_owned();
    Ok(Record {
        time,
        event,
        fields,
        line: line.to_owned(),
    })
}

/// Reads every record of `reader` that `filter` keeps. A line that does not parse (a torn
/// last line after a power loss, a hand edit) is skipped and reported, never fatal.
pub fn read(
    reader: impl std::io::BufRead,
    filter: &Filter,
) -> std::io::Result<(Vec<Record>, Vec<Skipped>)> {
    let mut records = Vec::new();
    let mut skipped = Vec::new();
    for (index, line) in reader.split(b'\n').enumerate() {
        let line = line?;
        let number = index + 1;
        let Ok(line) = String::from_utf8(line) else {
            skipped.push(Skipped {
                line: number,
                reason: "not UTF-8".into(),
            });
            continue;
        };
        if line.trim().is_empty() {
            continue;
        }
        let record = match parse_line(&line) {
            Ok(record) => record,
            Err(reason) => {
                skipped.push(Skipped {
                    line: number,
                    reason,
                });
                continue;
            }
        };
        let keep = filter.since.is_none_or(|since| record.time >= since)
            && filter.event.as_ref().is_none_or(|e| *e == record.event)
            && filter.user.as_ref().is_none_or(|u| {
                record.fields.get("user").and_then(Value::as_str) == Some(u.as_str())
            });
        if keep {
            records.push(record);
        }
    }
    Ok((records, skipped))
}

/// `--since`: a duration back from `now` (`1h`, `30m`) or an RFC 3339 time.
pub fn parse_since(text: &str, now: SystemTime) -> Result<SystemTime, String> {
    if let Ok(ago) = config::parse_duration(text) {
        let epoch = SystemTime::UNIX_EPOCH;
        return Ok(now
            .checked_sub(ago)
            .filter(|t| *t >= epoch)
            .unwrap_or(epoch));
    }
    humantime::parse_rfc3339_weak(text).map_err(|_| {
        format!(
            "expected a duration such as \"1h\" or \"30m\", or an RFC 3339 time such as \
             \"2026-11-26T04:00:00Z\", found {text:?}"
        )
    })
}

/// One record as a table row: time, event, user, node, then the other fields as `key=value`.
pub fn table_row(record: &Record) -> String {
    let get = |key: &str| match record.fields.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => "-".into(),
    };
    let mut rest = Vec::new();
    for (key, value) in &record.fields {
        if matches!(key.as_str(), "time" | "event" | "user" | "node") {
            continue;
        }
        let value = match value {
            Value::String(s) if s.contains(' ') || s.is_empty() => format!("{s:?}"),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        rest.push(format!("{key}={value}"));
    }
    format!(
        "{:<24} {:<17} {:<12} {:<16} {}",
        get("time"),
        record.event,
        get("user"),
        get("node"),
        rest.join(" ")
    )
}

/// The header of [`table_row`]'s table.
pub const TABLE_HEADER: &str =
    "TIME                     EVENT             USER         NODE             DETAILS";

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = concat!(
        r#"{"time":"2026-11-26T04:00:00.000Z","event":"login","user":"alice","success":true}"#,
        "\n",
        r#"{"time":"2026-11-26T04:01:00.000Z","event":"session.start","user":"alice","node":"node-a","roles":["dev"]}"#,
        "\n",
        "garbage\n",
        "\n",
        r#"{"time":"2026-11-26T04:02:00.000Z","event":"access.denied","user":"bob","node":"db","reason":"role x denies"}"#,
        "\n",
        r#"{"event":"login"}"#,
        "\n",
        r#"[1,2]"#,
        "\n",
        r#"{"time":"2026-11-26T04:03:00.000Z","event":"session.end","user":"alice","node":"node-a","bytes_to_user":5}"#,
        "\n",
        r#"{"time":"2026-11-26T04:04:00.000Z","event":"session.st"#,
    );

    /// A log whose last batch was cut short by `kill -9` or a crash: the records appended
    /// after a restart are whole lines of their own, the torn fragment one line that readers
    /// skip.
    #[test]
    fn a_torn_last_line_is_ended_before_new_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let torn = r#"{"time":"2026-11-26T04:04:00.000Z","event":"session.st"#;
        std::fs::write(&path, format!("{}\n{torn}", LOG.lines().next().unwrap())).unwrap();
        let log = AuditLog::open(&path).unwrap();
        log.record("login", serde_json::json!({"user": "bob", "success": true}));
        log.close();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[1], torn);
        let (records, skipped) = read(text.as_bytes(), &Filter::default()).unwrap();
        let users: Vec<&str> = records
            .iter()
            .map(|r| r.fields["user"].as_str().unwrap())
            .collect();
        assert_eq!(users, ["alice", "bob"]);
        assert_eq!(skipped.len(), 1);
        // A log that ends with a whole line is left as it is.
        let before = std::fs::read(&path).unwrap();
        drop(AuditLog::open(&path).unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    fn at(text: &str) -> SystemTime {
        humantime::parse_rfc3339(text).unwrap()
    }

    #[test]
    fn reads_every_good_line_and_names_the_bad_ones() {
        let (records, skipped) = read(LOG.as_bytes(), &Filter::default()).unwrap();
        let events: Vec<&str> = records.iter().map(|r| r.event.as_str()).collect();
        assert_eq!(
            events,
            ["login", "session.start", "access.denied", "session.end"]
        );
        let lines: Vec<usize> = skipped.iter().map(|s| s.line).collect();
        assert_eq!(lines, [3, 6, 7, 9], "{skipped:?}");
        assert!(
            skipped[0].reason.contains("not a JSON record"),
            "{skipped:?}"
        );
        assert!(skipped[1].reason.contains("no \"time\""), "{skipped:?}");
        assert!(
            skipped[2].reason.contains("not a JSON object"),
            "{skipped:?}"
        );
        assert_eq!(records[1].line, LOG.lines().nth(1).unwrap());
    }

    #[test]
    fn filters_by_time_event_and_user() {
        let filter = Filter {
            since: Some(at("2026-11-26T04:01:00Z")),
            event: None,
            user: Some("alice".into()),
        };
        let (records, _) = read(LOG.as_bytes(), &filter).unwrap();
        let events: Vec<&str> = records.iter().map(|r| r.event.as_str()).collect();
        assert_eq!(events, ["session.start", "session.end"]);
        let filter = Filter {
            event: Some("access.denied".into()),
            ..Filter::default()
        };
        let (records, _) = read(LOG.as_bytes(), &filter).unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].fields["user"], "bob");
    }

    #[test]
    fn since_takes_a_duration_or_a_time() {
        let now = at("2026-11-26T05:00:00Z");
        assert_eq!(parse_since("1h", now), Ok(at("2026-11-26T04:00:00Z")));
        assert_eq!(
            parse_since("2026-11-26T04:30:00Z", now),
            Ok(at("2026-11-26T04:30:00Z"))
        );
        assert_eq!(parse_since("1000000d", now), Ok(SystemTime::UNIX_EPOCH));
        assert!(
            parse_since("yesterday", now)
                .unwrap_err()
                .contains("RFC 3339")
        );
    }

    #[test]
    fn table_rows_show_the_main_columns_then_the_rest() {
        let record = parse_line(LOG.lines().nth(4).unwrap()).unwrap();
        let row = table_row(&record);
        assert!(
            row.starts_with("2026-11-26T04:02:00.000Z access.denied"),
            "{row}"
        );
        assert!(row.contains(" bob "), "{row}");
        assert!(row.ends_with("reason=\"role x denies\""), "{row}");
    }

    #[test]
    fn what_the_writer_writes_the_reader_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path).unwrap();
        log.record(
            "session.start",
            serde_json::json!({"user": "alice", "node": "n"}),
        );
        log.close(); // the writer thread has written and synced it
        let file = std::io::BufReader::new(File::open(&path).unwrap());
        let (records, skipped) = read(file, &Filter::default()).unwrap();
        assert!(skipped.is_empty());
        assert_eq!(records[0].event, "session.start");
        assert!(records[0].time <= SystemTime::now());
    }
}
