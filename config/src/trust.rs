//! `[[trusted_clusters]]` of a leaf proxy: the root clusters it joins, and how their users'
//! roles map onto this cluster's roles.

use std::path::PathBuf;

use serde::Deserialize;

use crate::agent::{JoinConfig, RawJoin};
use crate::error::{FieldError, ForKey, InvalidValue, WithinKey};
use crate::value::{ClusterName, HostPort, RoleName, Secret, parse_key, quoted};

/// Most `[[trusted_clusters]]` entries.
pub const MAX_TRUSTED_CLUSTERS: usize = 64;
/// Most `role_map` rules of one trusted cluster.
pub const MAX_ROLE_MAP_RULES: usize = 256;
/// Longest `role_map` pattern: a regex is compiled once at start, but its size is still ours
/// to bound.
pub const MAX_ROLE_PATTERN_LEN: usize = 256;

/// One `[[trusted_clusters]]` entry on a leaf: a root cluster whose users may reach this
/// cluster's nodes through the root's proxy.
#[derive(Debug, Clone, PartialEq)]
pub struct TrustedCluster {
    /// `name`: the root cluster's name (its `cluster_name`).
    pub name: ClusterName,
    /// `proxy`: the root proxy's tunnel listener, host:port.
    pub proxy: HostPort,
    /// `token` / `token_file` and `ca_pin`: the `trusted-cluster` token for the one join, and
    /// the root CA's pin. After the join the token is never read again.
    pub join: JoinConfig,
    /// `enabled`, default true: false closes the tunnel (at the next start) and the root's
    /// users lose access.
    pub enabled: bool,
    /// `role_map`: root roles to local roles; a root user none of whose roles maps gets
    /// nothing here.
    pub role_map: RoleMap,
}

/// What `remote` of a `role_map` rule matches.
#[derive(Debug, Clone)]
pub enum RolePattern {
    /// This role name exactly.
    Exact(String),
    /// `*`: every role.
    Any,
    /// `^...$`: a regular expression over the whole role name; `$1` etc. in `local` expand to
    /// its groups.
    Regex(regex::Regex),
}

impl PartialEq for RolePattern {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Exact(a), Self::Exact(b)) => a == b,
            (Self::Any, Self::Any) => true,
            (Self::Regex(a), Self::Regex(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
}

/// One `role_map` rule: `{ remote = "...", local = ["..."] }`.
#[derive(Debug, Clone, PartialEq)]
pub struct RoleMapRule {
    /// `remote`: which root roles the rule applies to.
    pub remote: RolePattern,
    /// `local`: the local roles they become (templates with `$1` for a regex).
    pub local: Vec<String>,
}

/// A trusted cluster's `role_map`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoleMap {
    /// The rules; every matching rule contributes its local roles.
    pub rules: Vec<RoleMapRule>,
}

impl RoleMap {
    /// The local roles of a root user holding `remote`: the union, in rule order and without
    /// repeats, of the `local` lists of every rule that matches one of the roles. A `$N` that
    /// expands to something that is not a valid role name is dropped (it could name no role).
    pub fn map(&self, remote: &[String]) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let mut push = |name: String| {
            if RoleName::new(name.as_str()).is_ok() && !out.contains(&name) {
                out.push(name);
            }
        };
        for rule in &self.rules {
            for role in remote {
                match &rule.remote {
                    RolePattern::Exact(name) if name == role => {
                        rule.local.iter().cloned().for_each(&mut push)
                    }
                    RolePattern::Any => rule.local.iter().cloned().for_each(&mut push),
                    RolePattern::Regex(re) => {
                        if let Some(caps) = re.captures(role) {
                            for template in &rule.local {
                                let mut expanded = String::new();
                                caps.expand(template, &mut expanded);
                                push(expanded);
                            }
                        }
                    }
                    RolePattern::Exact(_) => {}
                }
            }
        }
        out
    }
}

// ---- raw file structure ---------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTrustedCluster {
    name: Option<String>,
    proxy: Option<String>,
    token: Option<Secret>,
    token_file: Option<PathBuf>,
    ca_pin: Option<String>,
    enabled: Option<bool>,
    role_map: Option<Vec<RawRoleMapRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoleMapRule {
    remote: Option<String>,
    local: Option<Vec<String>>,
}

// ---- conversion -----------------------------------------------------------------------------

pub(crate) fn trusted_clusters(
    raw: Vec<RawTrustedCluster>,
) -> Result<Vec<TrustedCluster>, FieldError> {
    if raw.len() > MAX_TRUSTED_CLUSTERS {
        return Err(FieldError {
            key: crate::error::KeyPath::root(),
            value: InvalidValue::new(
                format!("at most {MAX_TRUSTED_CLUSTERS} trusted clusters"),
                format!("{} entries", raw.len()),
            ),
        });
    }
    let mut out: Vec<TrustedCluster> = Vec::with_capacity(raw.len());
    for (index, raw) in raw.into_iter().enumerate() {
        let cluster = trusted_cluster(raw).at_index(index)?;
        if let Some(first) = out.iter().position(|c| c.name == cluster.name) {
            return Err(FieldError::new(
                "name",
                InvalidValue::new(
                    format!("a cluster name not already used by `trusted_clusters[{first}].name`"),
                    quoted(cluster.name.as_str()),
                ),
            ))
            .at_index(index);
        }
        out.push(cluster);
    }
    Ok(out)
}

fn trusted_cluster(raw: RawTrustedCluster) -> Result<TrustedCluster, FieldError> {
    let name = parse_key::<ClusterName>(raw.name.as_deref(), "name")?.ok_or_else(|| {
        FieldError::missing("name", "the root cluster's name (its `cluster_name`)")
    })?;
    let proxy = parse_key::<HostPort>(raw.proxy.as_deref(), "proxy")?.ok_or_else(|| {
        FieldError::missing(
            "proxy",
            "the root proxy's tunnel listener as host:port, e.g. \"root.example.com:3024\"",
        )
    })?;
    let join = JoinConfig::try_from(RawJoin {
        token: raw.token,
        token_file: raw.token_file,
        ca_pin: raw.ca_pin,
    })?;
    let role_map = role_map(raw.role_map.unwrap_or_default()).within("role_map")?;
    Ok(TrustedCluster {
        name,
        proxy,
        join,
        enabled: raw.enabled.unwrap_or(true),
        role_map,
    })
}

fn role_map(raw: Vec<RawRoleMapRule>) -> Result<RoleMap, FieldError> {
    if raw.len() > MAX_ROLE_MAP_RULES {
        return Err(FieldError {
            key: crate::error::KeyPath::root(),
            value: InvalidValue::new(
                format!("at most {MAX_ROLE_MAP_RULES} rules"),
                format!("{} rules", raw.len()),
            ),
        });
    }
    let mut rules = Vec::with_capacity(raw.len());
    for (index, raw) in raw.into_iter().enumerate() {
        rules.push(role_map_rule(raw).at_index(index)?);
    }
    Ok(RoleMap { rules })
}

fn role_map_rule(raw: RawRoleMapRule) -> Result<RoleMapRule, FieldError> {
    let text = raw.remote.ok_or_else(|| {
        FieldError::missing(
            "remote",
            "a root role name, \"*\" for every role, or a regular expression \"^...$\"",
        )
    })?;
    let remote = role_pattern(&text).for_key("remote")?;
    let local = raw.local.ok_or_else(|| {
        FieldError::missing(
            "local",
            "a list of this cluster's role names, e.g. [\"dev\"]",
        )
    })?;
    if local.is_empty() || local.len() > MAX_ROLE_MAP_RULES {
        return Err(FieldError::new(
            "local",
            InvalidValue::new(
                format!("1 to {MAX_ROLE_MAP_RULES} local role names"),
                format!("{} names", local.len()),
            ),
        ));
    }
    for (index, name) in local.iter().enumerate() {
        let templated = matches!(remote, RolePattern::Regex(_)) && name.contains('$');
        if !templated {
            RoleName::new(name.as_str())
                .map(drop)
                .for_key("local")
                .map_err(|e| e.with_index(index))?;
        }
    }
    Ok(RoleMapRule { remote, local })
}

fn role_pattern(text: &str) -> Result<RolePattern, InvalidValue> {
    if text == "*" {
        return Ok(RolePattern::Any);
    }
    if text.starts_with('^') || text.ends_with('$') {
        let expected = "a regular expression anchored at both ends (\"^...$\") of at most 256 \
                        characters";
        if !(text.starts_with('^') && text.ends_with('$')) || text.len() > MAX_ROLE_PATTERN_LEN {
            return Err(InvalidValue::new(expected, quoted(text)));
        }
        // The first and last characters say nothing about alternations (`^admin|ops$` would
        // match `devops`): the whole pattern is wrapped so that it matches whole names only.
        return regex::Regex::new(&format!("^(?:{text})$"))
            .map(RolePattern::Regex)
            .map_err(|e| InvalidValue::new(expected, format!("{} ({e})", quoted(text))));
    }
    RoleName::new(text).map(|n| RolePattern::Exact(n.as_str().to_owned()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn rule(remote: &str, local: &[&str]) -> RawRoleMapRule {
        RawRoleMapRule {
            remote: Some(remote.into()),
            local: Some(local.iter().map(|s| (*s).to_owned()).collect()),
        }
    }

    fn roles(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn exact_any_and_regex_with_substitution() {
        let map = role_map(vec![
            rule("admin", &["ops"]),
            rule("^team-(.+)$", &["$1-dev", "viewer"]),
            rule("*", &["viewer"]),
        ])
        .unwrap();
        assert_eq!(map.map(&roles(&["admin"])), ["ops", "viewer"]);
        assert_eq!(
            map.map(&roles(&["team-blue", "team-red"])),
            ["blue-dev", "viewer", "red-dev"]
        );
        assert_eq!(map.map(&roles(&[])), Vec::<String>::new());
        let strict = role_map(vec![rule("admin", &["ops"])]).unwrap();
        assert!(strict.map(&roles(&["dev"])).is_empty(), "no rule, no role");
        assert!(strict.map(&roles(&["admin2"])).is_empty(), "exact is exact");
        // A regex must match the whole name.
        let anchored = role_map(vec![rule("^dev$", &["dev"])]).unwrap();
        assert!(anchored.map(&roles(&["devops"])).is_empty());
        // Anchors at the ends do not anchor each alternative: the whole name must match.
        let alternation = role_map(vec![rule("^admin|ops$", &["ops"])]).unwrap();
        assert!(alternation.map(&roles(&["devops"])).is_empty());
        assert!(alternation.map(&roles(&["administrator"])).is_empty());
        assert_eq!(alternation.map(&roles(&["ops"])), ["ops"]);
        assert_eq!(alternation.map(&roles(&["admin"])), ["ops"]);
        // An expansion that is not a role name is dropped.
        let bad = role_map(vec![rule("^x(.*)$", &["$1"])]).unwrap();
        assert!(bad.map(&roles(&["x"])).is_empty());
        assert!(bad.map(&roles(&["xUPPER"])).is_empty());
        assert_eq!(bad.map(&roles(&["xok"])), ["ok"]);
    }

    #[test]
    fn bad_rules_are_refused() {
        let err = role_map(vec![rule("^team-(", &["x"])]).unwrap_err();
        assert_eq!(err.key.to_string(), "[0].remote");
        let err = role_map(vec![rule("team-.*$", &["x"])]).unwrap_err();
        assert!(err.value.expected.contains("anchored"), "{err:?}");
        let err = role_map(vec![rule("Admin", &["x"])]).unwrap_err();
        assert_eq!(err.key.to_string(), "[0].remote");
        let err = role_map(vec![rule("admin", &["$1"])]).unwrap_err();
        assert_eq!(err.key.to_string(), "[0].local[0]");
        let err = role_map(vec![rule("admin", &[])]).unwrap_err();
        assert_eq!(err.key.to_string(), "[0].local");
        assert!(
            role_map(vec![RawRoleMapRule {
                remote: None,
                local: Some(vec![])
            }])
            .is_err()
        );
    }
}
