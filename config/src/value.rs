//! Value types shared by both files: names, addresses, labels, secrets, durations and sizes.
//!
//! Each type can only hold a valid value: its constructor checks the rules, so code that holds
//! one never checks again. Every constructor is usable from command-line flags too (`FromStr`),
//! with the same wording as errors from the file.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Unexpected, Visitor};

use crate::error::{FieldError, ForKey, InvalidValue, KeyPath, Segment};

/// Longest string quoted back in an error message; longer ones are cut.
const MAX_QUOTED: usize = 80;

/// Quotes a value that was found, TOML-style, cutting very long ones.
pub(crate) fn quoted(text: &str) -> String {
    if text.chars().count() <= MAX_QUOTED {
        format!("{text:?}")
    } else {
        let cut: String = text.chars().take(MAX_QUOTED).collect();
        format!("{cut:?}... ({} characters)", text.chars().count())
    }
}

// ---------------------------------------------------------------------------------------------
// Secret

/// A secret string, such as a join token. `Debug` and `Display` print `MASKED`; the value is
/// only reachable through [`Secret::expose`], so it cannot reach a log line by accident.
///
/// It has no `PartialEq` on purpose: whoever checks a presented token should compare in
/// constant time, on `expose()`, knowingly.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself. Call this only where the value is sent or compared, never to log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MASKED")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MASKED")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SecretVisitor;

        // Every "wrong type" path is written out so that serde never quotes what was found.
        fn wrong_type<E: de::Error>(visitor: &SecretVisitor) -> E {
            E::invalid_type(Unexpected::Other("a value that is not a string"), visitor)
        }

        impl<'de> Visitor<'de> for SecretVisitor {
            type Value = Secret;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<Secret, E> {
                Ok(Secret::new(value))
            }
            fn visit_string<E: de::Error>(self, value: String) -> Result<Secret, E> {
                Ok(Secret(value))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Secret, E> {
                Err(wrong_type(&self))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Secret, E> {
                Err(wrong_type(&self))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Secret, E> {
                Err(wrong_type(&self))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Secret, E> {
                Err(wrong_type(&self))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<Secret, A::Error> {
                Err(wrong_type(&self))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<Secret, A::Error> {
                Err(wrong_type(&self))
            }
        }

        deserializer.deserialize_str(SecretVisitor)
    }
}

// ---------------------------------------------------------------------------------------------
// Durations

const DURATION_EXAMPLE: &str = "a duration such as \"10s\", \"500ms\" or \"2m\"";

/// Parses a humantime duration: `"10s"`, `"500ms"`, `"2m"`, `"1h 30m"`. A bare number is
/// refused: its unit would be a guess.
pub fn parse_duration(text: &str) -> Result<Duration, InvalidValue> {
    humantime::parse_duration(text.trim())
        .map_err(|_| InvalidValue::new(DURATION_EXAMPLE, quoted(text)))
}

/// Writes a duration the way the file does: `10s`, `1m 30s`.
pub(crate) fn format_duration(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

/// A duration as written in the file, parsed during conversion so that its error names the key.
#[derive(Debug)]
pub(crate) struct RawDuration(String);

impl<'de> Deserialize<'de> for RawDuration {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;
        impl Visitor<'_> for DurationVisitor {
            type Value = RawDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(DURATION_EXAMPLE)
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<RawDuration, E> {
                Ok(RawDuration(value.to_owned()))
            }
        }
        deserializer.deserialize_str(DurationVisitor)
    }
}

/// The duration of an optional key: its default when absent, else parsed and checked against
/// `min..=max`.
pub(crate) fn duration_in(
    raw: Option<RawDuration>,
    default: Duration,
    min: Duration,
    max: Duration,
) -> Result<Duration, InvalidValue> {
    let Some(RawDuration(text)) = raw else {
        return Ok(default);
    };
    let duration = parse_duration(&text)?;
    if duration < min || duration > max {
        return Err(InvalidValue::new(
            format!(
                "a duration from {} to {}",
                format_duration(min),
                format_duration(max)
            ),
            quoted(&text),
        ));
    }
    Ok(duration)
}

// ---------------------------------------------------------------------------------------------
// Sizes

const SIZE_EXAMPLE: &str = "a size in bytes such as 65536, \"64KiB\" or \"1MiB\"";

/// Parses a size: a plain number of bytes (`"65536"`), or a whole number followed by `B`, `KiB`,
/// `MiB` or `GiB` (`"64KiB"`, `"1 MiB"`). Decimal units (`KB`, `MB`) are refused, because
/// whether they mean 1000 or 1024 is a guess.
pub fn parse_size(text: &str) -> Result<u64, InvalidValue> {
    let invalid = || InvalidValue::new(SIZE_EXAMPLE, quoted(text));
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(digits_end);
    if digits.is_empty() {
        return Err(invalid());
    }
    let multiplier: u64 = match unit.trim_start() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "K" | "KB" | "k" | "kB" | "kb" | "M" | "MB" | "mb" | "G" | "GB" | "gb" | "Ki" | "Mi"
        | "Gi" => {
            return Err(InvalidValue::new(
                "a size with a binary unit: \"KiB\", \"MiB\" or \"GiB\" (powers of 1024)",
                quoted(text),
            ));
        }
        _ => return Err(invalid()),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|number| number.checked_mul(multiplier))
        .ok_or_else(|| InvalidValue::new("a size below 16EiB", quoted(text)))
}

/// Writes a byte count the way a reader would: `1MiB`, `16KiB`, `1500 bytes`.
pub(crate) fn format_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (size, unit) in UNITS {
        if bytes >= size && bytes % size == 0 {
            return format!("{}{unit}", bytes / size);
        }
    }
    format!("{bytes} bytes")
}

/// A size as written in the file: an integer or a string with a unit.
#[derive(Debug)]
pub(crate) enum RawSize {
    Bytes(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for RawSize {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = RawSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(SIZE_EXAMPLE)
            }
            fn visit_i64<E: de::Error>(self, value: i64) -> Result<RawSize, E> {
                Ok(RawSize::Bytes(value))
            }
            fn visit_u64<E: de::Error>(self, value: u64) -> Result<RawSize, E> {
                Ok(RawSize::Bytes(i64::try_from(value).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<RawSize, E> {
                Ok(RawSize::Text(value.to_owned()))
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

/// The size of an optional key: its default when absent, else parsed and checked against
/// `min..=max`.
pub(crate) fn size_in(
    raw: Option<RawSize>,
    default: u32,
    min: u32,
    max: u32,
) -> Result<u32, InvalidValue> {
    let (bytes, found) = match raw {
        None => return Ok(default),
        Some(RawSize::Bytes(bytes)) => (u64::try_from(bytes).ok(), bytes.to_string()),
        Some(RawSize::Text(text)) => (Some(parse_size(&text)?), quoted(&text)),
    };
    bytes
        .and_then(|bytes| u32::try_from(bytes).ok())
        .filter(|bytes| (min..=max).contains(bytes))
        .ok_or_else(|| {
            InvalidValue::new(
                format!(
                    "a size from {} to {}",
                    format_size(min.into()),
                    format_size(max.into())
                ),
                found,
            )
        })
}

// ---------------------------------------------------------------------------------------------
// Integers

/// The integer of an optional key: its default when absent, else checked against `min..=max`.
pub(crate) fn integer_in<T>(raw: Option<i64>, default: T, min: T, max: T) -> Result<T, InvalidValue>
where
    T: Copy + Into<i64> + TryFrom<i64>,
{
    let Some(value) = raw else {
        return Ok(default);
    };
    if value < min.into() || value > max.into() {
        return Err(InvalidValue::new(
            format!("an integer from {} to {}", min.into(), max.into()),
            value.to_string(),
        ));
    }
    T::try_from(value).map_err(|_| InvalidValue::new("an integer", value.to_string()))
}

// ---------------------------------------------------------------------------------------------
// Names

/// Checks a name: 1 to 63 characters from `[a-z0-9]` plus `extra`, starting with a letter or
/// digit. 63 is the longest DNS label, so a name always fits in one.
fn check_name(text: &str, extra: &[char], what: &str) -> Result<(), InvalidValue> {
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || extra.contains(&c);
    let starts_well = text
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if (1..=63).contains(&text.len()) && starts_well && text.chars().all(allowed) {
        return Ok(());
    }
    let extra: Vec<String> = extra.iter().map(|c| format!("'{c}'")).collect();
    Err(InvalidValue::new(
        format!(
            "{what} of 1 to 63 characters: lowercase letters, digits, {}, starting with a letter \
             or digit",
            extra.join(", ")
        ),
        quoted(text),
    ))
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $what:literal, [$($extra:literal),*]) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Checks the rules and wraps the name.
            pub fn new(name: impl Into<String>) -> Result<Self, InvalidValue> {
                let name = name.into();
                check_name(&name, &[$($extra),*], $what)?;
                Ok(Self(name))
            }

            /// The name.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = InvalidValue;
            fn from_str(text: &str) -> Result<Self, InvalidValue> {
                Self::new(text)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

name_type!(
    /// A cluster's name, e.g. `example.com` or `leaf-1`: 1 to 63 characters of `[a-z0-9.-]`,
    /// starting with a letter or digit. It goes into certificates and DNS-like names, hence no
    /// `_` and no upper case.
    ClusterName,
    "a cluster name",
    ['-', '.']
);

name_type!(
    /// A node's name, what users type after `ssh`: 1 to 63 characters of `[a-z0-9._-]`,
    /// starting with a letter or digit.
    NodeName,
    "a node name",
    ['-', '.', '_']
);

name_type!(
    /// A role's name, e.g. `dev`: same rules as a node name (so it is also a valid name in a
    /// user certificate).
    RoleName,
    "a role name",
    ['-', '.', '_']
);

name_type!(
    /// The name of a service an agent forwards to, e.g. `ssh`: same rules as a node name.
    ServiceName,
    "a service name",
    ['-', '.', '_']
);

// ---------------------------------------------------------------------------------------------
// Addresses

const HOST_PORT_EXAMPLE: &str =
    "a host and port such as \"node-a.internal:22\", \"10.0.0.5:22\" or \"[fd00::5]:22\"";

/// A place to dial: a host name or IP address, and a port from 1 to 65535. Host names are kept
/// as written and resolved when dialled, so a node whose address changes needs no new config.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    /// Host name or IP address, without the brackets of an IPv6 address.
    host: String,
    port: u16,
}

impl HostPort {
    /// A host and port from their parts; the host is checked like the host of a string.
    pub fn new(host: &str, port: u16) -> Result<Self, InvalidValue> {
        let text = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        text.parse()
    }

    /// The host name or IP address (an IPv6 address without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port, never 0.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The IP address, when the host is one rather than a name.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }
}

impl FromStr for HostPort {
    type Err = InvalidValue;

    fn from_str(text: &str) -> Result<Self, InvalidValue> {
        let invalid = || InvalidValue::new(HOST_PORT_EXAMPLE, quoted(text));
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let (host, port) = rest.split_once("]:").ok_or_else(invalid)?;
            host.parse::<Ipv6Addr>().map_err(|_| invalid())?;
            (host, port)
        } else {
            let (host, port) = text.rsplit_once(':').ok_or_else(invalid)?;
            if host.parse::<Ipv4Addr>().is_err() && !is_host_name(host) {
                return Err(invalid());
            }
            (host, port)
        };
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|port| *port != 0)
            .ok_or_else(|| {
                InvalidValue::new("a host and port with a port from 1 to 65535", quoted(text))
            })?;
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }
}

/// A DNS host name: labels of 1 to 63 letters, digits, '-' or '_' (not starting or ending with
/// '-'), at most 253 characters, and not all digits at the end (that would be a mistyped IPv4
/// address such as `10.0.0.256`).
fn is_host_name(host: &str) -> bool {
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    (1..=253).contains(&host.len())
        && host.split('.').all(label_ok)
        && !host
            .rsplit('.')
            .next()
            .is_some_and(|last| last.chars().all(|c| c.is_ascii_digit()))
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl ToSocketAddrs for HostPort {
    type Iter = std::vec::IntoIter<SocketAddr>;

    /// Resolves the host (a DNS query when it is a name).
    fn to_socket_addrs(&self) -> std::io::Result<Self::Iter> {
        (self.host.as_str(), self.port).to_socket_addrs()
    }
}

/// A network in CIDR notation: `10.0.0.0/8`, `fd00::/64`, `127.0.0.1/32`. The address is
/// kept as written and must have no bits set past the prefix (`10.0.0.1/8` is refused: it
/// reads like one host but means a whole network).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNetwork {
    addr: IpAddr,
    prefix: u8,
}

const IP_NETWORK_EXAMPLE: &str = "a network in CIDR notation such as \"10.0.0.0/8\", \"192.168.1.0/24\" or \"fd00::/64\" \
     (no host bits set past the prefix)";

impl IpNetwork {
    /// The network's first address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length: 0 to 32 for IPv4, 0 to 128 for IPv6.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` lies in the network. An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`) counts
    /// as its IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }

    /// Whether every address of the network is a loopback address (`127.0.0.0/8`, `::1`).
    pub fn is_loopback(&self) -> bool {
        match self.addr {
            IpAddr::V4(net) => self.prefix >= 8 && net.is_loopback(),
            IpAddr::V6(net) => self.prefix == 128 && net.is_loopback(),
        }
    }
}

impl FromStr for IpNetwork {
    type Err = InvalidValue;

    fn from_str(text: &str) -> Result<Self, InvalidValue> {
        let invalid = || InvalidValue::new(IP_NETWORK_EXAMPLE, quoted(text));
        let (addr, prefix) = text.trim().split_once('/').ok_or_else(invalid)?;
        let addr: IpAddr = addr.parse().map_err(|_| invalid())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(invalid)?;
        let network = Self { addr, prefix };
        // The network's own first address must be the one written.
        let host_bits = match addr {
            IpAddr::V4(a) => {
                u32::from(a) & !u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0) != 0
            }
            IpAddr::V6(a) => {
                u128::from(a) & !u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0) != 0
            }
        };
        if host_bits {
            return Err(invalid());
        }
        Ok(network)
    }
}

impl fmt::Display for IpNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A listening address: an IP address and a port (0 = any free port, for tests).
pub(crate) fn listen_address(text: &str) -> Result<SocketAddr, InvalidValue> {
    text.trim().parse().map_err(|_| {
        InvalidValue::new(
            "an ip address and port such as \"0.0.0.0:3023\" or \"[::]:3023\" (a listener binds \
             an address, not a host name)",
            quoted(text),
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Labels

/// Most labels one node may carry; they travel in every ANNOUNCE and are matched by every role.
pub const MAX_LABELS: usize = 32;
/// Longest label key, in characters.
pub const MAX_LABEL_KEY_LEN: usize = 63;
/// Longest label value, in characters.
pub const MAX_LABEL_VALUE_LEN: usize = 255;

/// A node's labels, which roles match on (`env = "prod"`). At most [`MAX_LABELS`]; keys are 1
/// to [`MAX_LABEL_KEY_LEN`] characters of `[a-z0-9._/-]`; values are at most
/// [`MAX_LABEL_VALUE_LEN`] printable characters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Labels(BTreeMap<String, String>);

impl Labels {
    /// No labels.
    pub fn new() -> Self {
        Self::default()
    }

    /// The value of one label.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// All labels, sorted by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_str()))
    }

    /// How many labels there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The labels as a map.
    pub fn as_map(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    /// Checks every label; the error's key is `labels`, `labels.KEY` or `labels."KEY"`.
    pub(crate) fn from_raw(raw: Option<BTreeMap<String, String>>) -> Result<Self, FieldError> {
        let map = raw.unwrap_or_default();
        if map.len() > MAX_LABELS {
            return Err(FieldError::new(
                "labels",
                InvalidValue::new(
                    format!("at most {MAX_LABELS} labels"),
                    format!("{} labels", map.len()),
                ),
            ));
        }
        for (key, value) in &map {
            let at = |value| FieldError {
                key: KeyPath::key("labels").child(Segment::Key(key.clone())),
                value,
            };
            check_label(key, value).map_err(at)?;
        }
        Ok(Self(map))
    }
}

fn check_label(key: &str, value: &str) -> Result<(), InvalidValue> {
    let key_ok = (1..=MAX_LABEL_KEY_LEN).contains(&key.len())
        && key.chars().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.' | '/')
        });
    if !key_ok {
        return Err(InvalidValue::new(
            format!(
                "a label key of 1 to {MAX_LABEL_KEY_LEN} characters: lowercase letters, digits, \
                 '-', '_', '.', '/'"
            ),
            quoted(key),
        ));
    }
    if value.chars().count() > MAX_LABEL_VALUE_LEN || value.chars().any(char::is_control) {
        return Err(InvalidValue::new(
            format!(
                "a label value of at most {MAX_LABEL_VALUE_LEN} printable characters (no control \
                 characters)"
            ),
            quoted(value),
        ));
    }
    Ok(())
}

impl TryFrom<BTreeMap<String, String>> for Labels {
    type Error = InvalidValue;

    fn try_from(map: BTreeMap<String, String>) -> Result<Self, InvalidValue> {
        Self::from_raw(Some(map)).map_err(|e| e.value)
    }
}

// ---------------------------------------------------------------------------------------------
// CA pin

/// The SHA-256 digest of the cluster CA's DER SubjectPublicKeyInfo (its public key, not the whole
/// certificate), written `sha256:` and 64 lowercase hex digits (what `remoteler-proxy init`
/// prints). An agent joining for the first time trusts only
/// a proxy whose CA matches it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CaPin([u8; 32]);

impl CaPin {
    /// The digest.
    pub fn sha256(&self) -> &[u8; 32] {
        &self.0
    }

    /// A pin from a digest.
    pub fn from_sha256(digest: [u8; 32]) -> Self {
        Self(digest)
    }
}

impl FromStr for CaPin {
    type Err = InvalidValue;

    fn from_str(text: &str) -> Result<Self, InvalidValue> {
        let invalid = || {
            InvalidValue::new(
                "\"sha256:\" followed by 64 lowercase hex digits",
                quoted(text),
            )
        };
        let hex = text.strip_prefix("sha256:").ok_or_else(invalid)?;
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(invalid());
        }
        let mut digest = [0u8; 32];
        for (byte, pair) in digest.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
            let pair = std::str::from_utf8(pair).map_err(|_| invalid())?;
            *byte = u8::from_str_radix(pair, 16).map_err(|_| invalid())?;
        }
        Ok(Self(digest))
    }
}

impl fmt::Display for CaPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for CaPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaPin({self})")
    }
}

/// Parses an optional string key with `FromStr`, naming the key in the error.
pub(crate) fn parse_key<T>(raw: Option<&str>, key: &str) -> Result<Option<T>, FieldError>
where
    T: FromStr<Err = InvalidValue>,
{
    raw.map(str::parse).transpose().for_key(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_networks_parse_and_match() {
        let net: IpNetwork = "10.0.0.0/8".parse().unwrap();
        assert!(net.contains("10.255.1.2".parse().unwrap()));
        assert!(net.contains("::ffff:10.0.0.1".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        assert!(!net.contains("::1".parse().unwrap()));
        assert!(!net.is_loopback());
        let all: IpNetwork = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("192.0.2.1".parse().unwrap()) && !all.is_loopback());
        let host: IpNetwork = "127.0.0.1/32".parse().unwrap();
        assert!(host.contains("127.0.0.1".parse().unwrap()) && host.is_loopback());
        assert!(!host.contains("127.0.0.2".parse().unwrap()));
        let v6: IpNetwork = "fd00::/64".parse().unwrap();
        assert!(v6.contains("fd00::5".parse().unwrap()));
        assert!(!v6.contains("fd00:0:0:1::5".parse().unwrap()));
        assert!("::1/128".parse::<IpNetwork>().unwrap().is_loopback());
        assert_eq!(v6.to_string(), "fd00::/64");
        for bad in [
            "10.0.0.0",
            "10.0.0.1/8",
            "10.0.0.0/33",
            "fd00::/129",
            "x/8",
            "10.0.0.0/-1",
            "",
        ] {
            let err = bad.parse::<IpNetwork>().unwrap_err();
            assert!(err.expected.contains("CIDR"), "{bad}: {err}");
        }
    }

    #[test]
    fn secrets_never_print() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?}"), "MASKED");
        assert_eq!(secret.to_string(), "MASKED");
        assert_eq!(secret.expose(), "hunter2");
    }

    #[test]
    fn durations_parse_and_reject_garbage() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        for garbage in ["", "10", "ten seconds", "-1s", "10 parsecs", "s"] {
            let err = parse_duration(garbage).unwrap_err();
            assert!(err.expected.contains("a duration"), "{garbage}: {err}");
        }
    }

    #[test]
    fn duration_limits_are_checked() {
        let raw = |s: &str| Some(RawDuration(s.to_owned()));
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(3600));
        let default = Duration::from_secs(10);
        assert_eq!(duration_in(None, default, min, max), Ok(default));
        assert_eq!(duration_in(raw("1h"), default, min, max), Ok(max));
        let err = duration_in(raw("2h"), default, min, max).unwrap_err();
        assert_eq!(
            err.to_string(),
            "expected a duration from 100ms to 1h, found \"2h\""
        );
    }

    #[test]
    fn sizes_parse_and_reject_garbage() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(64 * 1024));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("1 MiB"), Ok(1 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("512B"), Ok(512));
        for garbage in [
            "",
            "MiB",
            "1.5MiB",
            "-1",
            "1 mebibyte",
            "0x10",
            "1MiB extra",
        ] {
            let err = parse_size(garbage).unwrap_err();
            assert!(err.expected.contains("a size"), "{garbage}: {err}");
        }
        assert!(
            parse_size("1MB")
                .unwrap_err()
                .expected
                .contains("powers of 1024")
        );
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("17179869184GiB").is_err());
    }

    #[test]
    fn size_limits_are_checked() {
        let (min, max) = (16 << 10, 64 << 20);
        assert_eq!(size_in(None, 1 << 20, min, max), Ok(1 << 20));
        assert_eq!(size_in(Some(RawSize::Bytes(16384)), 0, min, max), Ok(16384));
        assert_eq!(
            size_in(Some(RawSize::Text("64MiB".into())), 0, min, max),
            Ok(max)
        );
        let err = size_in(Some(RawSize::Text("1KiB".into())), 0, min, max).unwrap_err();
        assert_eq!(
            err.to_string(),
            "expected a size from 16KiB to 64MiB, found \"1KiB\""
        );
        let err = size_in(Some(RawSize::Bytes(-1)), 0, min, max).unwrap_err();
        assert_eq!(err.found, "-1");
        assert!(size_in(Some(RawSize::Text("8GiB".into())), 0, min, max).is_err());
    }

    #[test]
    fn sizes_print_in_the_largest_whole_unit() {
        assert_eq!(format_size(1 << 20), "1MiB");
        assert_eq!(format_size(16 << 10), "16KiB");
        assert_eq!(format_size(1500), "1500 bytes");
    }

    #[test]
    fn names_follow_their_rules() {
        assert!(ClusterName::new("example.com").is_ok());
        assert!(ClusterName::new("leaf-1").is_ok());
        assert!(ClusterName::new("a_b").is_err());
        assert!(NodeName::new("node_r1.site-2").is_ok());
        assert!(NodeName::new("a".repeat(63)).is_ok());
        for bad in ["", "-a", ".a", "Node", "nöde", "a b", &"a".repeat(64)] {
            let err = NodeName::new(bad).unwrap_err();
            assert!(
                err.expected.starts_with("a node name of 1 to 63"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn host_ports_accept_names_and_addresses() {
        let parse = |s: &str| s.parse::<HostPort>();
        let name = parse("node-a.internal:22").unwrap();
        assert_eq!(
            (name.host(), name.port(), name.ip()),
            ("node-a.internal", 22, None)
        );
        let v6 = parse("[fd00::5]:2222").unwrap();
        assert_eq!(v6.host(), "fd00::5");
        assert_eq!(v6.to_string(), "[fd00::5]:2222");
        assert!(parse("10.0.0.5:22").unwrap().ip().is_some());
        for bad in [
            "",
            "node-a",
            "node-a:",
            "node-a:0",
            "node-a:65536",
            "fd00::5:22",
            "[fd00::5]",
            "-a:22",
            "a b:22",
            "10.0.0.256:22",
            ":22",
            "[node]:22",
        ] {
            assert!(parse(bad).is_err(), "{bad} was accepted");
        }
        assert_eq!(HostPort::new("::1", 22).unwrap().to_string(), "[::1]:22");
    }

    #[test]
    fn labels_are_checked() {
        let map = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>()
        };
        assert!(Labels::try_from(map(&[("env", "prod"), ("team/owner", "Ops Team")])).is_ok());
        assert!(Labels::try_from(map(&[("Env", "prod")])).is_err());
        assert!(Labels::try_from(map(&[("", "prod")])).is_err());
        assert!(Labels::try_from(map(&[("env", "a\nb")])).is_err());
        assert!(Labels::try_from(map(&[("env", &"x".repeat(256))])).is_err());
        let many: BTreeMap<_, _> = (0..33).map(|i| (format!("k{i}"), String::new())).collect();
        let err = Labels::from_raw(Some(many)).unwrap_err();
        assert_eq!(
            err.value.to_string(),
            "expected at most 32 labels, found 33 labels"
        );
    }

    #[test]
    fn ca_pins_round_trip() {
        let text = format!("sha256:{}", "0123456789abcdef".repeat(4));
        let pin: CaPin = text.parse().unwrap();
        assert_eq!(pin.to_string(), text);
        assert_eq!(pin.sha256()[0], 0x01);
        for bad in [
            "0123".to_owned(),
            format!("sha256:{}", "0123456789ABCDEF".repeat(4)),
            format!("sha256:{}", "0".repeat(63)),
            format!("sha1:{}", "0".repeat(64)),
            format!("sha256:{}", "g".repeat(64)),
        ] {
            assert!(bad.parse::<CaPin>().is_err(), "{bad} was accepted");
        }
    }
}
