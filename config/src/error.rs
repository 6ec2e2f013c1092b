//! The one public error type, and the small pieces it is built from.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// Why a configuration file could not be turned into a configuration.
///
/// Every message starts with the file's path, names the key (a dotted path such as
/// `keepalive.count` or `nodes[2].address`) when there is one, says what was expected and what
/// was found, and ends with the line and column when they are known:
///
/// ```text
/// /etc/remoteler/proxy.toml: key `keepalive.count`: expected an integer from 1 to 100, found 0 (line 7, column 9)
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read: it is missing, unreadable or not UTF-8.
    #[error(
        "{}: cannot read the configuration file: {}; {hint}",
        path.display(),
        lowercase_first(&source.to_string())
    )]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// What the operating system said.
        source: io::Error,
        /// What to do about it.
        hint: &'static str,
    },

    /// The file is not valid TOML (a missing quote, a duplicate key, ...).
    #[error("{}: invalid toml: {message}{}", path.display(), Location::suffix(location))]
    Syntax {
        /// The file the text came from.
        path: PathBuf,
        /// What the TOML parser said.
        message: String,
        /// Where in the file, when known.
        location: Option<Location>,
    },

    /// A key that this file type does not have, most often a typo.
    #[error(
        "{}: key `{key}`: expected {expected}, found an unknown key{}",
        path.display(),
        Location::suffix(location)
    )]
    UnknownKey {
        /// The file the text came from.
        path: PathBuf,
        /// The dotted path of the unknown key.
        key: String,
        /// The keys that are allowed at that place, e.g. "one of `count`, `interval`".
        expected: String,
        /// Where in the file, when known.
        location: Option<Location>,
    },

    /// A key has a value of the wrong type or outside its limits, a required key is missing, or
    /// two keys contradict each other.
    #[error(
        "{}: key `{key}`: expected {expected}, found {found}{}",
        path.display(),
        Location::suffix(location)
    )]
    Invalid {
        /// The file the text came from.
        path: PathBuf,
        /// The dotted path of the offending key.
        key: String,
        /// What the key must hold.
        expected: String,
        /// What it held instead.
        found: String,
        /// Where in the file, when known.
        location: Option<Location>,
    },

    /// The file named by `join.token_file` could not be read or holds no usable token.
    #[error("{}: key `join.token_file`: {problem}", path.display())]
    TokenFile {
        /// The token file.
        path: PathBuf,
        /// What went wrong, never including the token itself.
        problem: String,
    },
}

/// OS messages start with a capital ("No such file or directory"); ours do not.
pub(crate) fn lowercase_first(message: &str) -> String {
    let mut chars = message.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

impl ConfigError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            Self::Read { path, .. }
            | Self::Syntax { path, .. }
            | Self::UnknownKey { path, .. }
            | Self::Invalid { path, .. }
            | Self::TokenFile { path, .. } => path,
        }
    }

    /// The dotted path of the key the error is about, if it is about one key.
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::UnknownKey { key, .. } | Self::Invalid { key, .. } => Some(key),
            Self::TokenFile { .. } => Some("join.token_file"),
            Self::Read { .. } | Self::Syntax { .. } => None,
        }
    }

    /// Where in the file, when known.
    pub fn location(&self) -> Option<Location> {
        match self {
            Self::Syntax { location, .. }
            | Self::UnknownKey { location, .. }
            | Self::Invalid { location, .. } => *location,
            Self::Read { .. } | Self::TokenFile { .. } => None,
        }
    }

    pub(crate) fn read(path: &Path, source: io::Error) -> Self {
        let hint = match source.kind() {
            io::ErrorKind::NotFound => {
                "create it (config/examples/ has a commented example of each file, \
                 docs/configuration.md describes every key) or pass the right path"
            }
            io::ErrorKind::PermissionDenied => {
                "make it readable by the user that runs this program (the file may hold a join \
                 token, so prefer changing its owner over making it world-readable)"
            }
            io::ErrorKind::InvalidData => "save it as UTF-8 text",
            io::ErrorKind::IsADirectory => "pass the path of the file, not of its directory",
            _ => "check the path and the file's permissions",
        };
        Self::Read {
            path: path.to_owned(),
            source,
            hint,
        }
    }
}

/// A line and column in a configuration file, both counted from 1; columns count characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Line number, from 1.
    pub line: usize,
    /// Column number in characters, from 1.
    pub column: usize,
}

impl Location {
    fn suffix(location: &Option<Location>) -> String {
        match location {
            Some(location) => format!(" ({location})"),
            None => String::new(),
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

/// A value that does not meet its rules, without knowing which key or file it came from.
///
/// Returned by the checked constructors (`NodeName::new`, `HostPort::from_str`, ...) so that
/// command-line flags get the same wording as the file: `expected ..., found ...`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected {expected}, found {found}")]
pub struct InvalidValue {
    /// What the value must be.
    pub expected: String,
    /// What it was.
    pub found: String,
}

impl InvalidValue {
    pub(crate) fn new(expected: impl Into<String>, found: impl Into<String>) -> Self {
        Self {
            expected: expected.into(),
            found: found.into(),
        }
    }
}

/// One step of a key path: a table key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    Key(String),
    Index(usize),
}

/// Where a value sits in the document: `nodes[2].labels.env`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct KeyPath(pub(crate) Vec<Segment>);

impl KeyPath {
    pub(crate) fn key(key: &str) -> Self {
        Self(vec![Segment::Key(key.to_owned())])
    }

    /// The document itself; a parent's `within` names it.
    pub(crate) fn root() -> Self {
        Self(Vec::new())
    }

    pub(crate) fn child(&self, segment: Segment) -> Self {
        let mut segments = self.0.clone();
        segments.push(segment);
        Self(segments)
    }

    pub(crate) fn parent(&self) -> Option<Self> {
        let (_, rest) = self.0.split_last()?;
        Some(Self(rest.to_vec()))
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Index(index) => write!(f, "[{index}]")?,
                Segment::Key(key) => {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    let bare = !key.is_empty()
                        && key
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
                    if bare {
                        f.write_str(key)?;
                    } else {
                        write!(f, "{key:?}")?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// An [`InvalidValue`] with the key it belongs to; becomes a [`ConfigError`] once the loader
/// adds the file and the location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldError {
    pub(crate) key: KeyPath,
    pub(crate) value: InvalidValue,
}

impl FieldError {
    pub(crate) fn new(key: &str, value: InvalidValue) -> Self {
        Self {
            key: KeyPath::key(key),
            value,
        }
    }

    /// The error of a required key that is absent.
    pub(crate) fn missing(key: &str, expected: impl Into<String>) -> Self {
        Self::new(
            key,
            InvalidValue::new(expected, "nothing (the key is required)"),
        )
    }

    /// `logins` becomes `logins[2]`: the error is about one element of an array.
    pub(crate) fn with_index(mut self, index: usize) -> Self {
        self.key.0.push(Segment::Index(index));
        self
    }

    fn prefixed(mut self, segment: Segment) -> Self {
        self.key.0.insert(0, segment);
        self
    }
}

/// Puts a nested conversion's error under its parent key.
pub(crate) trait WithinKey<T> {
    /// `interval` becomes `keepalive.interval`.
    fn within(self, key: &str) -> Result<T, FieldError>;
    /// `address` becomes `[2].address` (then `nodes[2].address` with `within`).
    fn at_index(self, index: usize) -> Result<T, FieldError>;
}

impl<T> WithinKey<T> for Result<T, FieldError> {
    fn within(self, key: &str) -> Result<T, FieldError> {
        self.map_err(|e| e.prefixed(Segment::Key(key.to_owned())))
    }

    fn at_index(self, index: usize) -> Result<T, FieldError> {
        self.map_err(|e| e.prefixed(Segment::Index(index)))
    }
}

/// Names the key of a value check.
pub(crate) trait ForKey<T> {
    fn for_key(self, key: &str) -> Result<T, FieldError>;
}

impl<T> ForKey<T> for Result<T, InvalidValue> {
    fn for_key(self, key: &str) -> Result<T, FieldError> {
        self.map_err(|value| FieldError::new(key, value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_paths_print_like_toml() {
        let path = KeyPath::key("nodes")
            .child(Segment::Index(2))
            .child(Segment::Key("labels".into()))
            .child(Segment::Key("team/x".into()));
        assert_eq!(path.to_string(), "nodes[2].labels.\"team/x\"");
    }

    #[test]
    fn nested_errors_get_their_parents_key() {
        let result: Result<(), FieldError> =
            Err(FieldError::new("address", InvalidValue::new("a", "b")));
        let err = result.at_index(2).within("nodes").unwrap_err();
        assert_eq!(err.key.to_string(), "nodes[2].address");
    }
}
