//! Reading a TOML file into a raw struct, and turning every failure into a [`ConfigError`] that
//! names the file, the key and the line.
//!
//! The document is parsed once into toml's spanned tree. That tree feeds serde, and stays around
//! so that an error can be placed: serde reports a byte span, from which we find the key path;
//! validation reports a key path, from which we find the line.

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::error::{ConfigError, FieldError, KeyPath, Location, Segment, lowercase_first};

/// A parsed file: the text, the spanned tree and the path for messages.
pub(crate) struct Document<'a> {
    path: &'a Path,
    text: &'a str,
    root: Spanned<DeTable<'a>>,
}

impl<'a> Document<'a> {
    /// Parses `text` and deserializes it into `Raw`.
    pub(crate) fn parse<Raw: Deserialize<'a>>(
        text: &'a str,
        path: &'a Path,
    ) -> Result<(Raw, Self), ConfigError> {
        let root = DeTable::parse(text).map_err(|e| syntax_error(path, text, &e))?;
        let document = Self { path, text, root };
        let raw = Raw::deserialize(toml::de::Deserializer::from(document.root.clone()))
            .map_err(|e| document.serde_error(&e))?;
        Ok((raw, document))
    }

    /// The directory relative paths in the file are resolved against.
    pub(crate) fn base_dir(&self) -> Option<&Path> {
        self.path.parent()
    }

    /// A validation error, placed at its key.
    pub(crate) fn field_error(&self, error: FieldError) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            location: self.locate(&error.key),
            key: error.key.to_string(),
            expected: error.value.expected,
            found: error.value.found,
        }
    }

    /// Where a key's value is written; for a key that is absent, where its table is.
    fn locate(&self, key: &KeyPath) -> Option<Location> {
        let entries = self.entries();
        let mut key = key.clone();
        loop {
            // The last entry recorded for a path is its value: the more precise place to point at.
            if let Some((_, span)) = entries.iter().rev().find(|(path, _)| *path == key) {
                return Some(location(self.text, span.start));
            }
            key = key.parent().filter(|parent| !parent.0.is_empty())?;
        }
    }

    /// The key whose name or value covers `offset`: the innermost one.
    fn key_at(&self, offset: usize) -> Option<KeyPath> {
        self.entries()
            .into_iter()
            .filter(|(_, span)| span.contains(&offset) || (span.is_empty() && span.start == offset))
            .min_by_key(|(_, span)| span.len())
            .map(|(path, _)| path)
    }

    /// Every key and value of the document with its span, keys before their values.
    fn entries(&self) -> Vec<(KeyPath, Range<usize>)> {
        let mut entries = Vec::new();
        collect_table(self.root.get_ref(), &KeyPath::default(), &mut entries);
        entries
    }

    fn serde_error(&self, error: &toml::de::Error) -> ConfigError {
        let message = error.message();
        let offset = error.span().map(|span| span.start);
        let location = offset.map(|offset| location(self.text, offset));
        let key = offset.and_then(|offset| self.key_at(offset));
        let path = self.path.to_owned();

        if let (Some(key), Some(rest)) = (&key, message.strip_prefix("unknown field ")) {
            let allowed = rest
                .split_once(", expected ")
                .map_or(Vec::new(), |(_, allowed)| backquoted(allowed));
            let expected = match allowed.as_slice() {
                [] => "no key here".to_owned(),
                [only] => format!("`{only}`"),
                many => format!(
                    "one of {}",
                    many.iter()
                        .map(|name| format!("`{name}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            return ConfigError::UnknownKey {
                path,
                key: key.to_string(),
                expected,
                location,
            };
        }

        let mismatch = message
            .strip_prefix("invalid type: ")
            .or_else(|| message.strip_prefix("invalid value: "))
            .and_then(|rest| rest.rsplit_once(", expected "));
        if let (Some(key), Some((found, expected))) = (&key, mismatch) {
            return ConfigError::Invalid {
                path,
                key: key.to_string(),
                expected: friendly_expected(expected),
                found: friendly_found(found),
                location,
            };
        }

        ConfigError::Syntax {
            path,
            message: lowercase_first(message),
            location,
        }
    }
}

fn collect_table(table: &DeTable<'_>, prefix: &KeyPath, out: &mut Vec<(KeyPath, Range<usize>)>) {
    for (key, value) in table.iter() {
        let path = prefix.child(Segment::Key(key.get_ref().to_string()));
        out.push((path.clone(), key.span()));
        collect_value(value, &path, out);
    }
}

fn collect_value(
    value: &Spanned<DeValue<'_>>,
    path: &KeyPath,
    out: &mut Vec<(KeyPath, Range<usize>)>,
) {
    out.push((path.clone(), value.span()));
    match value.get_ref() {
        DeValue::Table(table) => collect_table(table, path, out),
        DeValue::Array(array) => {
            for (index, item) in array.iter().enumerate() {
                collect_value(item, &path.child(Segment::Index(index)), out);
            }
        }
        _ => {}
    }
}

fn syntax_error(path: &Path, text: &str, error: &toml::de::Error) -> ConfigError {
    let mut message = lowercase_first(error.message());
    let span = error.span();
    if let Some(span) = &span {
        // "duplicate key" says little without the key.
        if let Some(snippet) = text.get(span.clone()).filter(|s| {
            !s.is_empty() && s.len() <= 64 && !s.contains('\n') && !message.contains(*s)
        }) {
            message.push_str(&format!(" (at `{snippet}`)"));
        }
    }
    ConfigError::Syntax {
        path: PathBuf::from(path),
        message,
        location: span.map(|span| location(text, span.start)),
    }
}

/// Line and column (from 1, columns in characters) of a byte offset.
fn location(text: &str, offset: usize) -> Location {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    Location {
        line: before.matches('\n').count() + 1,
        column: before[line_start..].chars().count() + 1,
    }
}

/// The names between backquotes in serde's "`a`, `b` or `c`".
fn backquoted(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

/// serde names Rust types; the reader of the message wrote TOML.
fn friendly_expected(expected: &str) -> String {
    match expected {
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" | "i8" | "i16" | "i32" | "i64" | "i128"
        | "isize" => "an integer".to_owned(),
        "a sequence" => "an array".to_owned(),
        "a map" | "map" => "a table".to_owned(),
        "path string" => "a path (a string)".to_owned(),
        "a boolean" | "a string" => expected.to_owned(),
        other if other.starts_with("struct ") => "a table".to_owned(),
        other => other.to_owned(),
    }
}

fn friendly_found(found: &str) -> String {
    match found {
        "sequence" => "an array".to_owned(),
        "map" => "a table".to_owned(),
        other => other.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_count_lines_and_characters_from_one() {
        let text = "a = 1\nbé = 2\n";
        assert_eq!(location(text, 0), Location { line: 1, column: 1 });
        assert_eq!(location(text, 6), Location { line: 2, column: 1 });
        // 'é' is two bytes but one column.
        assert_eq!(location(text, 10), Location { line: 2, column: 4 });
        assert_eq!(location(text, 999), Location { line: 3, column: 1 });
    }

    #[test]
    fn backquoted_names_are_extracted() {
        assert_eq!(backquoted("`count` or `interval`"), ["count", "interval"]);
        assert_eq!(backquoted("one of `a`, `b`, `c`"), ["a", "b", "c"]);
    }
}
