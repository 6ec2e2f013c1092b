//! Sections both files have: `[keepalive]`, `[flow]`, `[log]`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::defaults::*;
use crate::error::{FieldError, ForKey, InvalidValue};
use crate::value::{RawDuration, RawSize, duration_in, format_size, integer_in, quoted, size_in};

// ---- [keepalive] ----------------------------------------------------------------------------

/// `[keepalive]`: when an idle tunnel is pinged and when it is declared dead.
///
/// A tunnel that misses `count` PINGs in a row, one every `interval`, is dead: detection takes
/// at most `interval × (count + 1)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepaliveConfig {
    /// Time between two PINGs, [`MIN_KEEPALIVE_INTERVAL`] to [`MAX_KEEPALIVE_INTERVAL`].
    pub interval: Duration,
    /// Missed PINGs before the tunnel is dead, [`MIN_KEEPALIVE_COUNT`] to
    /// [`MAX_KEEPALIVE_COUNT`].
    pub count: u32,
}

impl Default for KeepaliveConfig {
    fn default() -> Self {
        Self {
            interval: DEFAULT_KEEPALIVE_INTERVAL,
            count: DEFAULT_KEEPALIVE_COUNT,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawKeepalive {
    interval: Option<RawDuration>,
    count: Option<i64>,
}

impl TryFrom<RawKeepalive> for KeepaliveConfig {
    type Error = FieldError;

    fn try_from(raw: RawKeepalive) -> Result<Self, FieldError> {
        Ok(Self {
            interval: duration_in(
                raw.interval,
                DEFAULT_KEEPALIVE_INTERVAL,
                MIN_KEEPALIVE_INTERVAL,
                MAX_KEEPALIVE_INTERVAL,
            )
            .for_key("interval")?,
            count: integer_in(
                raw.count,
                DEFAULT_KEEPALIVE_COUNT,
                MIN_KEEPALIVE_COUNT,
                MAX_KEEPALIVE_COUNT,
            )
            .for_key("count")?,
        })
    }
}

// ---- [flow] ---------------------------------------------------------------------------------

/// `[flow]`: per-stream flow control. The fields are private because they depend on each
/// other: a frame larger than the window could never be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowConfig {
    window: u32,
    max_frame: u32,
}

impl FlowConfig {
    /// Checks both limits and that `window >= max_frame`.
    pub fn new(window: u32, max_frame: u32) -> Result<Self, InvalidValue> {
        let range = |value: u32, min: u32, max: u32| {
            if (min..=max).contains(&value) {
                Ok(())
            } else {
                Err(InvalidValue::new(
                    format!(
                        "a size from {} to {}",
                        format_size(min.into()),
                        format_size(max.into())
                    ),
                    format_size(value.into()),
                ))
            }
        };
        range(window, MIN_WINDOW, MAX_WINDOW)?;
        range(max_frame, MIN_MAX_FRAME, MAX_MAX_FRAME)?;
        if window < max_frame {
            return Err(window_below_frame(window, max_frame));
        }
        Ok(Self { window, max_frame })
    }

    /// Initial credit of each stream, in bytes, [`MIN_WINDOW`] to [`MAX_WINDOW`]. Also the most
    /// unacknowledged bytes a sender keeps per stream for resumption.
    pub fn window(&self) -> u32 {
        self.window
    }

    /// Largest DATA payload, in bytes, [`MIN_MAX_FRAME`] to [`MAX_MAX_FRAME`], never above the
    /// window.
    pub fn max_frame(&self) -> u32 {
        self.max_frame
    }
}

fn window_below_frame(window: u32, max_frame: u32) -> InvalidValue {
    InvalidValue::new(
        format!(
            "a window no smaller than `flow.max_frame` ({})",
            format_size(max_frame.into())
        ),
        format_size(window.into()),
    )
}

impl Default for FlowConfig {
    fn default() -> Self {
        Self {
            window: DEFAULT_WINDOW,
            max_frame: DEFAULT_MAX_FRAME,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFlow {
    window: Option<RawSize>,
    max_frame: Option<RawSize>,
}

impl TryFrom<RawFlow> for FlowConfig {
    type Error = FieldError;

    fn try_from(raw: RawFlow) -> Result<Self, FieldError> {
        let window =
            size_in(raw.window, DEFAULT_WINDOW, MIN_WINDOW, MAX_WINDOW).for_key("window")?;
        let max_frame = size_in(
            raw.max_frame,
            DEFAULT_MAX_FRAME,
            MIN_MAX_FRAME,
            MAX_MAX_FRAME,
        )
        .for_key("max_frame")?;
        if window < max_frame {
            return Err(FieldError::new(
                "window",
                window_below_frame(window, max_frame),
            ));
        }
        Ok(Self { window, max_frame })
    }
}

// ---- [log] ----------------------------------------------------------------------------------

/// `log.format`: how log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Readable lines, for a terminal or journald.
    #[default]
    Text,
    /// One JSON object per line, for a log collector.
    Json,
}

impl FromStr for LogFormat {
    type Err = InvalidValue;

    fn from_str(text: &str) -> Result<Self, InvalidValue> {
        match text {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err(InvalidValue::new("\"text\" or \"json\"", quoted(text))),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Text => "text",
            Self::Json => "json",
        })
    }
}

const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// `log.level`: a level (`"info"`), or comma-separated directives in the syntax of
/// `tracing_subscriber::EnvFilter` (`"info,tunnel=debug"`): each is a level or `target=level`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFilter(String);

impl LogFilter {
    /// The filter as written, ready for `EnvFilter::try_new`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for LogFilter {
    fn default() -> Self {
        Self(DEFAULT_LOG_LEVEL.to_owned())
    }
}

impl FromStr for LogFilter {
    type Err = InvalidValue;

    fn from_str(text: &str) -> Result<Self, InvalidValue> {
        let level_ok = |level: &str| LEVELS.contains(&level.to_ascii_lowercase().as_str());
        let target_ok = |target: &str| {
            !target.is_empty()
                && target
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':' || c == '-')
        };
        let directive_ok = |directive: &str| match directive.split_once('=') {
            Some((target, level)) => target_ok(target) && level_ok(level),
            None => level_ok(directive),
        };
        if !text.is_empty() && text.split(',').all(directive_ok) {
            Ok(Self(text.to_owned()))
        } else {
            Err(InvalidValue::new(
                "a log level (\"off\", \"error\", \"warn\", \"info\", \"debug\", \"trace\") or \
                 directives such as \"info,tunnel=debug\"",
                quoted(text),
            ))
        }
    }
}

impl fmt::Display for LogFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `[log]`: how the binary logs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogConfig {
    /// Text or JSON lines; default text.
    pub format: LogFormat,
    /// Which events are written; default [`DEFAULT_LOG_LEVEL`].
    pub level: LogFilter,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLog {
    format: Option<String>,
    level: Option<String>,
}

impl TryFrom<RawLog> for LogConfig {
    type Error = FieldError;

    fn try_from(raw: RawLog) -> Result<Self, FieldError> {
        Ok(Self {
            format: crate::value::parse_key(raw.format.as_deref(), "format")?.unwrap_or_default(),
            level: crate::value::parse_key(raw.level.as_deref(), "level")?.unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_rejects_a_frame_larger_than_the_window() {
        assert!(FlowConfig::new(64 << 10, 16 << 10).is_ok());
        let err = FlowConfig::new(16 << 10, 32 << 10).unwrap_err();
        assert_eq!(
            err.to_string(),
            "expected a window no smaller than `flow.max_frame` (32KiB), found 16KiB"
        );
        assert!(FlowConfig::new(128 << 20, 16 << 10).is_err());
        assert!(FlowConfig::new(1 << 20, 512).is_err());
    }

    #[test]
    fn log_filters() {
        for good in [
            "info",
            "DEBUG",
            "info,tunnel=debug",
            "proxy::routing=trace,warn",
        ] {
            assert!(good.parse::<LogFilter>().is_ok(), "{good}");
        }
        for bad in [
            "",
            "verbose",
            "info,",
            "=debug",
            "tunnel=loud",
            "info tunnel=debug",
        ] {
            assert!(bad.parse::<LogFilter>().is_err(), "{bad}");
        }
    }
}
