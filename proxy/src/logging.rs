//! The program's log: `tracing` to stderr, text or JSON lines (`log.format`), filtered by
//! `log.level`. Secrets never reach it: requests that carry one are logged by their
//! non-secret fields only.
//!
//! Fields often carry what a peer sent (a user or node name from a join or login request,
//! a reason from a GOAWAY or RESET) before anyone is authenticated. The text format escapes
//! control characters in every field and message ([`EscapedFields`]), so a name with a
//! newline cannot forge a log line and an escape sequence cannot reach an operator's
//! terminal; the JSON format is escaped by its encoder.

use std::fmt;

use config::{LogConfig, LogFormat};
use tracing::field::{Field, Visit};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};

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
        _ => builder.fmt_fields(EscapedFields).try_init(),
    };
}

/// The text format's fields: tracing-subscriber's own layout, with control characters (and
/// Unicode line separators and direction overrides) in values written as escapes (`\n`,
/// `\u{1b}`).
#[derive(Debug, Clone, Copy, Default)]
pub struct EscapedFields;

impl<'a> MakeVisitor<Writer<'a>> for EscapedFields {
    type Visitor = EscapedVisitor<'a>;

    fn make_visitor(&self, target: Writer<'a>) -> Self::Visitor {
        EscapedVisitor(DefaultVisitor::new(target, true))
    }
}

/// The visitor of [`EscapedFields`].
#[derive(Debug)]
pub struct EscapedVisitor<'a>(DefaultVisitor<'a>);

impl Visit for EscapedVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        // As the default: messages bare, other strings quoted.
        if field.name() == "message" {
            self.0
                .record_debug(field, &Escaped(&format_args!("{value}")));
        } else {
            self.0.record_debug(field, &Escaped(&value));
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0
            .record_debug(field, &Escaped(&format_args!("{value}")));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.record_debug(field, &Escaped(value));
    }
}

impl VisitOutput<fmt::Result> for EscapedVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.0.finish()
    }
}

impl VisitFmt for EscapedVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        self.0.writer()
    }
}

/// Formats the inner value's `Debug` with control characters escaped, without allocating.
pub struct Escaped<'a>(pub &'a dyn fmt::Debug);

impl fmt::Debug for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write as _;
        write!(EscapingWriter(f), "{:?}", self.0)
    }
}

/// Whether `c` must not reach a log line as itself: it could end the line, move the
/// cursor, recolour the terminal or reorder what is shown.
fn must_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
        )
}

struct EscapingWriter<'a, 'b>(&'a mut fmt::Formatter<'b>);

impl fmt::Write for EscapingWriter<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(at) = rest.find(must_escape) {
            let (clean, tail) = rest.split_at(at);
            self.0.write_str(clean)?;
            let mut chars = tail.chars();
            if let Some(c) = chars.next() {
                write!(self.0, "{}", c.escape_default())?;
            }
            rest = chars.as_str();
        }
        self.0.write_str(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        let shown = format!(
            "{:?}",
            Escaped(&format_args!("x\nFAKE LINE \u{1b}[31m\r\u{202e}ok"))
        );
        assert_eq!(shown, "x\\nFAKE LINE \\u{1b}[31m\\r\\u{202e}ok");
        assert_eq!(format!("{:?}", Escaped(&"plain")), "\"plain\"");
        assert_eq!(
            format!("{:?}", Escaped(&format_args!("naïve ✓"))),
            "naïve ✓"
        );
    }
}
