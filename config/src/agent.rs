//! `remoteler-agent`'s configuration file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::common::{FlowConfig, KeepaliveConfig, LogConfig, RawFlow, RawKeepalive, RawLog};
use crate::defaults::*;
use crate::document::Document;
use crate::error::{ConfigError, FieldError, ForKey, InvalidValue, WithinKey, lowercase_first};
use crate::proxy::path_key;
use crate::value::{
    CaPin, HostPort, Labels, NodeName, RawDuration, Secret, ServiceName, duration_in,
    format_duration, parse_key, quoted,
};

/// Everything `remoteler-agent` reads from its file, every default filled in.
///
/// Relative paths in the file are resolved against the file's directory.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    /// `node_name`, required: what users type after `ssh`.
    pub node_name: NodeName,
    /// `labels`: what roles match on; announced to the proxy.
    pub labels: Labels,
    /// `proxy` or `auth`: how the proxy reaches this node.
    pub mode: AgentMode,
    /// `data_dir`: the agent's key and certificate; default [`DEFAULT_AGENT_DATA_DIR`].
    pub data_dir: PathBuf,
    /// `[join]`: how the agent joins the cluster the first time.
    pub join: JoinConfig,
    /// `[[forwards]]`: the only targets the agent will ever dial.
    pub forwards: Forwards,
    /// `[keepalive]`: liveness of the tunnel.
    pub keepalive: KeepaliveConfig,
    /// `[backoff]`: waits between reconnection attempts.
    pub backoff: BackoffConfig,
    /// `[flow]`: per-stream flow control.
    pub flow: FlowConfig,
    /// `[resume]`: how long the agent keeps a dropped tunnel's streams for the reconnect.
    pub resume: crate::proxy::ResumeConfig,
    /// `[log]`: the program's log.
    pub log: LogConfig,
    /// `ssh_host_key` and `ssh_host_cert`: the local sshd's host key, which the agent has
    /// certified by the cluster's SSH host CA, and where it writes the certificate.
    pub host_cert: HostCertConfig,
}

/// Which sshd host key the agent has certified, and where the certificate goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostCertConfig {
    /// `ssh_host_key = ""`: no host certificate.
    Off,
    /// `ssh_host_key` absent: [`DEFAULT_SSH_HOST_KEY`] if it exists, else nothing.
    Default {
        /// The key's `.pub` file.
        host_key: PathBuf,
        /// `ssh_host_cert`, or the key's path with `.pub` replaced by `-cert.pub`.
        cert: PathBuf,
    },
    /// `ssh_host_key` set: a missing file is a warning at each check.
    Configured {
        /// The key's `.pub` file.
        host_key: PathBuf,
        /// `ssh_host_cert`, or the key's path with `.pub` replaced by `-cert.pub`.
        cert: PathBuf,
    },
}

impl Default for HostCertConfig {
    fn default() -> Self {
        let host_key = PathBuf::from(DEFAULT_SSH_HOST_KEY);
        HostCertConfig::Default {
            cert: cert_path_for(&host_key),
            host_key,
        }
    }
}

impl HostCertConfig {
    /// From the two keys; `host_key` `Some("")` turns host certificates off.
    pub fn from_paths(host_key: Option<PathBuf>, cert: Option<PathBuf>) -> Self {
        match host_key {
            Some(key) if key.as_os_str().is_empty() => HostCertConfig::Off,
            Some(host_key) => HostCertConfig::Configured {
                cert: cert.unwrap_or_else(|| cert_path_for(&host_key)),
                host_key,
            },
            None => {
                let host_key = PathBuf::from(DEFAULT_SSH_HOST_KEY);
                HostCertConfig::Default {
                    cert: cert.unwrap_or_else(|| cert_path_for(&host_key)),
                    host_key,
                }
            }
        }
    }

    /// The key and certificate paths, unless off.
    pub fn paths(&self) -> Option<(&Path, &Path)> {
        match self {
            HostCertConfig::Off => None,
            HostCertConfig::Default { host_key, cert }
            | HostCertConfig::Configured { host_key, cert } => Some((host_key, cert)),
        }
    }

    fn resolve(&mut self, base: &Path) {
        if let HostCertConfig::Default { host_key, cert }
        | HostCertConfig::Configured { host_key, cert } = self
        {
            *host_key = base.join(&*host_key);
            *cert = base.join(&*cert);
        }
    }
}

/// OpenSSH's naming: `ssh_host_ed25519_key.pub` → `ssh_host_ed25519_key-cert.pub`.
pub fn cert_path_for(host_key: &Path) -> PathBuf {
    let text = host_key.to_string_lossy();
    let stem = text.strip_suffix(".pub").unwrap_or(&text);
    PathBuf::from(format!("{stem}-cert.pub"))
}

impl AgentConfig {
    /// Reads and checks an agent configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::read(path, e))?;
        Self::from_toml_str(&text, path)
    }

    /// Checks an agent configuration held in memory; `path` is used in error messages and to
    /// resolve relative paths (its directory).
    pub fn from_toml_str(text: &str, path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let (raw, document) = Document::parse::<RawAgentConfig>(text, path)?;
        let mut config = Self::try_from(raw).map_err(|e| document.field_error(e))?;
        if let Some(base) = document.base_dir() {
            config.data_dir = base.join(&config.data_dir);
            if let JoinToken::File(token_file) = &mut config.join.token {
                *token_file = base.join(&*token_file);
            }
            config.host_cert.resolve(base);
        }
        Ok(config)
    }

    /// The configuration of a file that sets only the required keys: every other value is its
    /// default (one forward, `ssh` to [`DEFAULT_FORWARD_TARGET`]). For quick starts driven by
    /// command-line flags, which then overwrite fields.
    pub fn new(node_name: NodeName, mode: AgentMode, join: JoinConfig) -> Self {
        Self {
            node_name,
            labels: Labels::new(),
            mode,
            data_dir: PathBuf::from(DEFAULT_AGENT_DATA_DIR),
            join,
            forwards: Forwards::default(),
            keepalive: KeepaliveConfig::default(),
            backoff: BackoffConfig::default(),
            flow: FlowConfig::default(),
            resume: crate::proxy::ResumeConfig::default(),
            log: LogConfig::default(),
            host_cert: HostCertConfig::default(),
        }
    }
}

/// How the proxy reaches this node: exactly one of the keys `proxy` and `auth`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentMode {
    /// `proxy = "host:port"`: the agent keeps a reverse tunnel to the proxy's tunnel listener
    /// (port 3024 by default). For nodes the proxy cannot dial (NAT).
    Tunnel {
        /// The proxy's tunnel listener.
        proxy: HostPort,
    },
    /// `auth = "host:port"`: the agent registers with the proxy's auth listener (port 3025 by
    /// default) and the proxy dials `ssh_address` directly.
    Direct {
        /// The proxy's auth listener.
        auth: HostPort,
        /// `ssh_address`: what the proxy dials; default the target of the `ssh` forward.
        ssh_address: HostPort,
    },
}

/// `[join]`: how the agent proves itself the first time, and which CA it trusts.
#[derive(Debug, Clone, PartialEq)]
pub struct JoinConfig {
    /// `token` or `token_file`, at most one of them. An agent that already holds a certificate
    /// in `data_dir` needs neither.
    pub token: JoinToken,
    /// `ca_pin`, required: the cluster CA the agent trusts, so a first join cannot be
    /// intercepted.
    pub ca_pin: CaPin,
}

/// Where the join token comes from.
#[derive(Debug, Clone)]
pub enum JoinToken {
    /// Neither `join.token` nor `join.token_file`.
    None,
    /// `join.token`, in the file itself.
    Inline(Secret),
    /// `join.token_file`: read when needed (see [`JoinToken::load`]), so the file can be
    /// deleted once the agent has joined.
    File(PathBuf),
}

impl PartialEq for JoinToken {
    /// For comparing configurations (tests, reloads). Not constant-time: a proxy checking a
    /// presented token must not use this.
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::None, Self::None) => true,
            (Self::Inline(a), Self::Inline(b)) => a.expose() == b.expose(),
            (Self::File(a), Self::File(b)) => a == b,
            _ => false,
        }
    }
}

impl JoinToken {
    /// The token, reading `token_file` if that is where it is; `None` when there is none. The
    /// file's content is trimmed and checked like an inline token.
    pub fn load(&self) -> Result<Option<Secret>, ConfigError> {
        match self {
            Self::None => Ok(None),
            Self::Inline(secret) => Ok(Some(secret.clone())),
            Self::File(path) => {
                let problem = |problem: String| ConfigError::TokenFile {
                    path: path.clone(),
                    problem,
                };
                let text = std::fs::read_to_string(path).map_err(|e| {
                    problem(format!(
                        "cannot read the join token: {}; create it with the token printed by \
                         `remoteler-proxy tokens add`, or remove `join.token_file` if the agent \
                         has already joined",
                        lowercase_first(&e.to_string())
                    ))
                })?;
                let token = text.trim();
                check_token(token).map_err(|e| problem(e.to_string()))?;
                Ok(Some(Secret::new(token)))
            }
        }
    }
}

/// A join token: 1 to [`MAX_TOKEN_LEN`] printable ASCII characters, no spaces. The error never
/// contains the token.
fn check_token(token: &str) -> Result<(), InvalidValue> {
    let ok =
        (1..=MAX_TOKEN_LEN).contains(&token.len()) && token.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        return Ok(());
    }
    let found = if token.is_empty() {
        "an empty token".to_owned()
    } else {
        format!(
            "a token of {} characters (not shown)",
            token.chars().count()
        )
    };
    Err(InvalidValue::new(
        format!("a join token of 1 to {MAX_TOKEN_LEN} printable ascii characters without spaces"),
        found,
    ))
}

/// One `[[forwards]]` entry: a service the agent forwards streams to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// `name`: the service name streams ask for, e.g. `ssh`.
    pub name: ServiceName,
    /// `target`: where the agent dials for it.
    pub target: HostPort,
}

/// The agent's forwards: at least one, at most [`MAX_FORWARDS`], names unique. The agent dials
/// nothing else, whatever a stream asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwards(Vec<Forward>);

impl Forwards {
    /// Checks the list: not empty, not too long, no name twice.
    pub fn new(forwards: Vec<Forward>) -> Result<Self, InvalidValue> {
        Self::check(forwards).map_err(|e| e.value)
    }

    fn check(forwards: Vec<Forward>) -> Result<Self, FieldError> {
        if forwards.is_empty() || forwards.len() > MAX_FORWARDS {
            return Err(FieldError::new(
                "forwards",
                InvalidValue::new(
                    format!("1 to {MAX_FORWARDS} forwards"),
                    format!("{} forwards", forwards.len()),
                ),
            ));
        }
        for (index, forward) in forwards.iter().enumerate() {
            if let Some(first) = forwards[..index]
                .iter()
                .position(|f| f.name == forward.name)
            {
                return Err(FieldError::new(
                    "name",
                    InvalidValue::new(
                        format!("a service name not already used by `forwards[{first}].name`"),
                        quoted(forward.name.as_str()),
                    ),
                ))
                .at_index(index)
                .within("forwards");
            }
        }
        Ok(Self(forwards))
    }

    /// The forward for a service name.
    pub fn get(&self, name: &str) -> Option<&Forward> {
        self.0.iter().find(|forward| forward.name.as_str() == name)
    }

    /// All forwards, in file order.
    pub fn iter(&self) -> impl Iterator<Item = &Forward> {
        self.0.iter()
    }

    /// All forwards, in file order.
    pub fn as_slice(&self) -> &[Forward] {
        &self.0
    }
}

impl Default for Forwards {
    /// One forward: `ssh` to [`DEFAULT_FORWARD_TARGET`].
    fn default() -> Self {
        Self(vec![Forward {
            name: ServiceName::new(DEFAULT_FORWARD_NAME)
                .expect("the default service name is valid"),
            target: DEFAULT_FORWARD_TARGET
                .parse()
                .expect("the default forward target is valid"),
        }])
    }
}

/// `[backoff]`: jittered exponential backoff between reconnection attempts, so thousands of
/// agents do not reconnect in step after a proxy restart. Private fields: `max >= min`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    min: Duration,
    max: Duration,
}

impl BackoffConfig {
    /// Checks both against [`MIN_BACKOFF`]..=[`MAX_BACKOFF`] and `max >= min`.
    pub fn new(min: Duration, max: Duration) -> Result<Self, InvalidValue> {
        for value in [min, max] {
            if !(MIN_BACKOFF..=MAX_BACKOFF).contains(&value) {
                return Err(backoff_range(value));
            }
        }
        if max < min {
            return Err(max_below_min(min, max));
        }
        Ok(Self { min, max })
    }

    /// First wait after a drop; default [`DEFAULT_BACKOFF_MIN`].
    pub fn min(&self) -> Duration {
        self.min
    }

    /// Longest wait; default [`DEFAULT_BACKOFF_MAX`].
    pub fn max(&self) -> Duration {
        self.max
    }
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            min: DEFAULT_BACKOFF_MIN,
            max: DEFAULT_BACKOFF_MAX,
        }
    }
}

fn backoff_range(value: Duration) -> InvalidValue {
    InvalidValue::new(
        format!(
            "a duration from {} to {}",
            format_duration(MIN_BACKOFF),
            format_duration(MAX_BACKOFF)
        ),
        quoted(&format_duration(value)),
    )
}

fn max_below_min(min: Duration, max: Duration) -> InvalidValue {
    InvalidValue::new(
        format!(
            "a duration no shorter than `backoff.min` ({})",
            format_duration(min)
        ),
        quoted(&format_duration(max)),
    )
}

// ---- raw file structure ---------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAgentConfig {
    node_name: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    proxy: Option<String>,
    auth: Option<String>,
    ssh_address: Option<String>,
    data_dir: Option<PathBuf>,
    join: Option<RawJoin>,
    forwards: Option<Vec<RawForward>>,
    #[serde(default)]
    keepalive: RawKeepalive,
    #[serde(default)]
    backoff: RawBackoff,
    #[serde(default)]
    flow: RawFlow,
    #[serde(default)]
    resume: crate::proxy::RawResume,
    #[serde(default)]
    log: RawLog,
    ssh_host_key: Option<PathBuf>,
    ssh_host_cert: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawJoin {
    pub(crate) token: Option<Secret>,
    pub(crate) token_file: Option<PathBuf>,
    pub(crate) ca_pin: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForward {
    name: Option<String>,
    target: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackoff {
    min: Option<RawDuration>,
    max: Option<RawDuration>,
}

// ---- conversion -----------------------------------------------------------------------------

const PROXY_OR_AUTH: &str = "either `proxy` (the proxy's tunnel listener, host:port, for a \
     reverse tunnel) or `auth` (its auth listener, for a node the proxy dials directly)";

impl TryFrom<RawAgentConfig> for AgentConfig {
    type Error = FieldError;

    fn try_from(raw: RawAgentConfig) -> Result<Self, FieldError> {
        let node_name = parse_key::<NodeName>(raw.node_name.as_deref(), "node_name")?
            .ok_or_else(|| FieldError::missing("node_name", "a node name such as \"node-r1\""))?;
        let labels = Labels::from_raw(raw.labels)?;
        let forwards = match raw.forwards {
            None => Forwards::default(),
            Some(raw) => forwards(raw)?,
        };
        let proxy = parse_key::<HostPort>(raw.proxy.as_deref(), "proxy")?;
        let auth = parse_key::<HostPort>(raw.auth.as_deref(), "auth")?;
        let ssh_address = parse_key::<HostPort>(raw.ssh_address.as_deref(), "ssh_address")?;
        let mode = match (proxy, auth) {
            (Some(_), Some(_)) => {
                return Err(FieldError::new(
                    "auth",
                    InvalidValue::new(
                        format!("{PROXY_OR_AUTH}, not both"),
                        "both `proxy` and `auth`",
                    ),
                ));
            }
            (None, None) => return Err(FieldError::missing("proxy", PROXY_OR_AUTH)),
            (Some(proxy), None) => {
                if let Some(ssh_address) = ssh_address {
                    return Err(FieldError::new(
                        "ssh_address",
                        InvalidValue::new(
                            "no `ssh_address` with `proxy` (the proxy reaches this node through \
                             the tunnel; `ssh_address` is only used with `auth`)",
                            quoted(&ssh_address.to_string()),
                        ),
                    ));
                }
                AgentMode::Tunnel { proxy }
            }
            (None, Some(auth)) => {
                let ssh_address = ssh_address
                    .or_else(|| forwards.get(DEFAULT_FORWARD_NAME).map(|f| f.target.clone()))
                    .ok_or_else(|| {
                        FieldError::missing(
                            "ssh_address",
                            "the host:port the proxy dials for ssh (needed with `auth` when no \
                             forward is named \"ssh\")",
                        )
                    })?;
                AgentMode::Direct { auth, ssh_address }
            }
        };
        let data_dir = path_key(raw.data_dir, "data_dir")?
            .unwrap_or_else(|| PathBuf::from(DEFAULT_AGENT_DATA_DIR));
        let join = match raw.join {
            Some(join) => JoinConfig::try_from(join).within("join")?,
            None => {
                return Err(FieldError::missing(
                    "join",
                    "a [join] table with at least `ca_pin`",
                ));
            }
        };
        Ok(Self {
            node_name,
            labels,
            mode,
            data_dir,
            join,
            forwards,
            keepalive: KeepaliveConfig::try_from(raw.keepalive).within("keepalive")?,
            backoff: BackoffConfig::try_from(raw.backoff).within("backoff")?,
            flow: FlowConfig::try_from(raw.flow).within("flow")?,
            resume: crate::proxy::ResumeConfig::try_from(raw.resume).within("resume")?,
            log: LogConfig::try_from(raw.log).within("log")?,
            host_cert: HostCertConfig::from_paths(
                raw.ssh_host_key,
                path_key(raw.ssh_host_cert, "ssh_host_cert")?,
            ),
        })
    }
}

impl TryFrom<RawJoin> for JoinConfig {
    type Error = FieldError;

    fn try_from(raw: RawJoin) -> Result<Self, FieldError> {
        let token_file = path_key(raw.token_file, "token_file")?;
        let token = match (raw.token, token_file) {
            (Some(_), Some(_)) => {
                return Err(FieldError::new(
                    "token_file",
                    InvalidValue::new(
                        "either `token` or `token_file`, not both",
                        "both `token` and `token_file`",
                    ),
                ));
            }
            (Some(token), None) => {
                check_token(token.expose()).for_key("token")?;
                JoinToken::Inline(token)
            }
            (None, Some(path)) => JoinToken::File(path),
            (None, None) => JoinToken::None,
        };
        let ca_pin = parse_key::<CaPin>(raw.ca_pin.as_deref(), "ca_pin")?.ok_or_else(|| {
            FieldError::missing(
                "ca_pin",
                "the cluster CA's pin, \"sha256:\" followed by 64 lowercase hex digits (printed \
                 by `remoteler-proxy init`)",
            )
        })?;
        Ok(Self { token, ca_pin })
    }
}

fn forwards(raw: Vec<RawForward>) -> Result<Forwards, FieldError> {
    let mut list = Vec::with_capacity(raw.len());
    for (index, raw) in raw.into_iter().enumerate() {
        let name = parse_key::<ServiceName>(raw.name.as_deref(), "name")
            .and_then(|name| {
                name.ok_or_else(|| FieldError::missing("name", "a service name such as \"ssh\""))
            })
            .at_index(index)
            .within("forwards")?;
        let target = parse_key::<HostPort>(raw.target.as_deref(), "target")
            .and_then(|target| {
                target.ok_or_else(|| {
                    FieldError::missing("target", "the host:port to dial, e.g. \"127.0.0.1:22\"")
                })
            })
            .at_index(index)
            .within("forwards")?;
        list.push(Forward { name, target });
    }
    Forwards::check(list)
}

impl TryFrom<RawBackoff> for BackoffConfig {
    type Error = FieldError;

    fn try_from(raw: RawBackoff) -> Result<Self, FieldError> {
        let min =
            duration_in(raw.min, DEFAULT_BACKOFF_MIN, MIN_BACKOFF, MAX_BACKOFF).for_key("min")?;
        let max =
            duration_in(raw.max, DEFAULT_BACKOFF_MAX, MIN_BACKOFF, MAX_BACKOFF).for_key("max")?;
        if max < min {
            return Err(FieldError::new("max", max_below_min(min, max)));
        }
        Ok(Self { min, max })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_errors_never_show_the_token() {
        let err = check_token("hunter2 xyzzy").unwrap_err();
        assert!(!err.to_string().contains("xyzzy"), "{err}");
        assert!(
            err.to_string().contains("13 characters (not shown)"),
            "{err}"
        );
        assert!(check_token(&"x".repeat(MAX_TOKEN_LEN + 1)).is_err());
        assert!(check_token("").is_err());
        assert!(check_token("abc123-_.~").is_ok());
    }

    #[test]
    fn backoff_checks_its_order() {
        let s = Duration::from_secs;
        assert!(BackoffConfig::new(s(1), s(60)).is_ok());
        assert!(BackoffConfig::new(s(60), s(1)).is_err());
        assert!(BackoffConfig::new(Duration::ZERO, s(1)).is_err());
    }

    #[test]
    fn default_forward_is_local_ssh() {
        let forwards = Forwards::default();
        let ssh = forwards.get("ssh").unwrap();
        assert_eq!(ssh.target.to_string(), "127.0.0.1:22");
        assert_eq!(forwards.as_slice().len(), 1);
    }
}
