//! The program's log: `tracing` to stderr, text or JSON lines (`log.format`), filtered by
//! `log.level`. Secrets never reach it: requests that carry one are logged by their
//! non-secret fields only.

use config::{LogConfig, LogFormat};
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber; a second call (tests) is ignored.
pub fn init(log: &LogConfig) {
    let filter = EnvFilter::try_new(log.level.as_str()).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        // SAFETY: isatty on a constant descriptor.
        .with_ansi(unsafe { libc::isatty(2) } == 1);
    let _ = match log.format {
        LogFormat::Json => builder.json().try_init(),
        _ => builder.try_init(),
    };
}
