//! The progress line on stderr: rewritten in place on a terminal (at most 4 times a
//! second), one plain line every 2 s otherwise (CI logs).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// A throttled progress line.
#[derive(Debug)]
pub struct Progress {
    tty: bool,
    last: Option<Instant>,
    started: Instant,
    dirty: bool,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            tty: std::io::stderr().is_terminal(),
            last: None,
            started: Instant::now(),
            dirty: false,
        }
    }
}

impl Progress {
    /// Shows `text()` if enough time has passed since the last update.
    pub fn update(&mut self, text: impl FnOnce() -> String) {
        let every = if self.tty {
            Duration::from_millis(250)
        } else {
            Duration::from_secs(2)
        };
        if self.last.is_some_and(|l| l.elapsed() < every) {
            return;
        }
        self.last = Some(Instant::now());
        let line = format!(
            "[{:>6.1}s] {}",
            self.started.elapsed().as_secs_f64(),
            text()
        );
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{line}");
            self.dirty = true;
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }

    /// Prints a step line (always), ending any in-place line first.
    pub fn step(&mut self, text: &str) {
        self.end_line();
        eprintln!("[{:>6.1}s] {text}", self.started.elapsed().as_secs_f64());
        self.last = None;
    }

    fn end_line(&mut self) {
        if self.dirty {
            eprintln!();
            self.dirty = false;
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.end_line();
    }
}
