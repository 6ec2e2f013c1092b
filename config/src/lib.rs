//! Typed configuration for `remoteler-proxy` and `remoteler-agent`.
//!
//! What it does: reads a TOML file ([`ProxyConfig::load`], [`AgentConfig::load`]) or a string
//! (`from_toml_str`), rejects unknown keys, checks every value against its documented limits,
//! and fills in every default, so the binaries get runtime types with no `Option` left to
//! unwrap and no value left to check. Raw serde structs (private) are converted with `TryFrom`
//! into those types ("parse, don't validate"). Every default and limit is a named constant
//! (see [`defaults`]); `docs/configuration.md` documents each key.
//!
//! Errors are one type, [`ConfigError`], whose messages name the file, the key as a dotted path,
//! what was expected and what was found, and the line and column:
//!
//! ```text
//! /etc/remoteler/proxy.toml: key `keepalive.count`: expected an integer from 1 to 100, found 0 (line 7, column 9)
//! ```
//!
//! Secrets (join tokens) are a [`Secret`], which prints `MASKED`.
//!
//! What it does not do: it opens no socket and resolves no host name (addresses to dial are
//! kept as [`HostPort`], resolved when dialled), reads no file other than the one it is given
//! (a `join.token_file` is read only when [`JoinToken::load`] is called), does not create
//! `data_dir`, does not look at command-line flags or environment variables (the binaries
//! overwrite the public fields after loading), and writes no configuration back.

#![forbid(unsafe_code)]

mod agent;
mod common;
pub mod defaults;
mod document;
mod error;
mod proxy;
mod trust;
mod value;

pub use agent::{
    AgentConfig, AgentMode, BackoffConfig, Forward, Forwards, HostCertConfig, JoinConfig, JoinToken,
};
pub use common::{FlowConfig, KeepaliveConfig, LogConfig, LogFilter, LogFormat};
pub use defaults::*;
pub use error::{ConfigError, InvalidValue, Location};
pub use proxy::{
    AuditConfig, AuthConfig, DrainConfig, LimitsConfig, ListenConfig, MetricsListen, ProxyConfig,
    ResumeConfig, RoleConfig, RoleLogin, RoleRules, StaticNode, Workers,
};
pub use trust::{
    MAX_ROLE_MAP_RULES, MAX_TRUSTED_CLUSTERS, RoleMap, RoleMapRule, RolePattern, TrustedCluster,
};
pub use value::{
    CaPin, ClusterName, HostPort, IpNetwork, Labels, MAX_LABEL_KEY_LEN, MAX_LABEL_VALUE_LEN,
    MAX_LABELS, NodeName, RoleName, Secret, ServiceName, parse_duration, parse_size,
};
