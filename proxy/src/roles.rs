//! Roles: which nodes a user may reach, and as which SSH logins.
//!
//! A [`Policy`] is built once from the `[[roles]]` of the configuration (plus the built-in role
//! [`BUILTIN_ROLE`] unless the file defines one of that name) and is pure: no I/O, no clock.
//! The user's role names come from their certificate ([`PeerIdentity::roles`]), so a policy
//! change applies to the next session, not only to the next login.
//!
//! The rules, in the order [`Policy::check`] applies them:
//!
//! 1. Only roles this cluster defines count. A user none of whose roles is known gets nothing.
//! 2. If the `deny` of any of the user's roles matches the node, access is denied: deny wins.
//! 3. Otherwise the node must be matched by the `allow` of at least one of the user's roles.
//! 4. A login (when the session names one) must be among the logins of a role that allows the
//!    node; `{{user.logins}}` expands to the logins set on the user (carried in the
//!    certificate).
//!
//! A rule matches a node when the node's name matches one of its `nodes` patterns, or when its
//! `labels` table is not empty and the node has every label of it with a matching value.
//! Patterns are exact, or globs where `*` stands for any run of characters.
//!
//! A later trusted-cluster `role_map` maps a root cluster's role names onto these local names
//! before [`Policy::check`] sees them; nothing here depends on where the names came from.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use config::{
    BUILTIN_ROLE, DEFAULT_ROLE_MAX_CERT_TTL, RoleConfig, RoleLogin, RoleRules, USER_LOGINS_TEMPLATE,
};
use tunnel::identity::PeerIdentity;

/// Why access was denied: a sentence for the user and the audit log that names the user, the
/// node and what would allow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied(pub String);

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The roles of a cluster.
#[derive(Debug, Clone)]
pub struct Policy {
    roles: BTreeMap<String, RoleConfig>,
}

/// The built-in role: every node, the user's own logins, the default certificate lifetime.
fn builtin_role() -> RoleConfig {
    RoleConfig {
        // The constant is a valid role name; a test checks it.
        name: config::RoleName::new(BUILTIN_ROLE).expect("the built-in role name is valid"),
        logins: vec![RoleLogin::UserLogins],
        max_cert_ttl: DEFAULT_ROLE_MAX_CERT_TTL,
        allow: RoleRules {
            nodes: vec!["*".into()],
            labels: config::Labels::new(),
            // Every trusted leaf too: each leaf's `role_map` still decides what its nodes
            // allow. A role of the file reaches a leaf only with an `allow.clusters`.
            clusters: vec!["*".into()],
        },
        deny: RoleRules::default(),
    }
}

impl Policy {
    /// The policy of `roles` (the configuration's `[[roles]]`), plus the built-in role
    /// [`BUILTIN_ROLE`] unless `roles` defines a role of that name, which then replaces it.
    pub fn new(roles: &[RoleConfig]) -> Policy {
        let mut map = BTreeMap::new();
        map.insert(BUILTIN_ROLE.to_owned(), builtin_role());
        for role in roles {
            map.insert(role.name.as_str().to_owned(), role.clone());
        }
        Policy { roles: map }
    }

    /// Whether the cluster defines `role`.
    pub fn knows(&self, role: &str) -> bool {
        self.roles.contains_key(role)
    }

    /// Every role name, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.roles.keys().map(String::as_str).collect()
    }

    fn known<'a>(&'a self, roles: &'a [String]) -> impl Iterator<Item = &'a RoleConfig> + 'a {
        roles.iter().filter_map(|r| self.roles.get(r))
    }

    /// Whether a session OPEN names what its service needs before any role is consulted: an
    /// ssh session (service `ssh`, or none) must name its login. The client could otherwise
    /// skip the per-node login check by leaving it out, and the audit would record `""`.
    pub fn check_open_names_login(
        &self,
        user: &PeerIdentity,
        node: &str,
        service: &str,
        login: &str,
    ) -> Result<(), Denied> {
        if login.is_empty() && (service.is_empty() || service == "ssh") {
            return Err(Denied(format!(
                "access denied: user {} named no login for the ssh session to node {node}; an ssh \
                 session must name the login it uses on the node: run `ssh user@{node}` (or \
                 `remoteler ssh user@{node}`; the ProxyCommand of `remoteler config` passes it \
                 as %r)",
                user.name
            )));
        }
        Ok(())
    }

    /// Whether `user` may reach `node` (with `labels`) as `login`; `login == ""` asks whether
    /// the user may see and reach the node at all (listing, or a session of a service other
    /// than ssh: [`Policy::check_open_names_login`] refuses an ssh session without a login).
    pub fn check(
        &self,
        user: &PeerIdentity,
        node: &str,
        labels: &[(String, String)],
        login: &str,
    ) -> Result<(), Denied> {
        let name = &user.name;
        let known: Vec<&RoleConfig> = self.known(&user.roles).collect();
        if known.is_empty() {
            let held = if user.roles.is_empty() {
                "the user has no roles".to_owned()
            } else {
                format!(
                    "the user's roles ({}) are not defined in this cluster",
                    user.roles.join(", ")
                )
            };
            return Err(Denied(format!(
                "access denied: user {name} may not reach node {node}: {held}; an administrator \
                 can give the user one of the cluster's roles ({}) with `remoteler-proxy users \
                 add --roles`",
                self.names().join(", ")
            )));
        }
        for role in &known {
            if let Some(why) = matches(&role.deny, node, labels) {
                return Err(Denied(format!(
                    "access denied: role {} of user {name} denies node {node} ({why}); deny wins \
                     over any allow, so only removing that rule or the role from the user would \
                     allow it",
                    role.name
                )));
            }
        }
        let allowing: Vec<&RoleConfig> = known
            .iter()
            .copied()
            .filter(|role| matches(&role.allow, node, labels).is_some())
            .collect();
        if allowing.is_empty() {
            return Err(Denied(format!(
                "access denied: none of user {name}'s roles ({}) allows node {node} ({}); a role \
                 whose `allow.nodes` matches the node's name or whose `allow.labels` it has \
                 would",
                role_names(&known),
                describe_labels(labels)
            )));
        }
        if login.is_empty() {
            return Ok(());
        }
        let mut permitted: Vec<String> = Vec::new();
        for role in &allowing {
            for l in expand(&role.logins, &user.logins) {
                if l == login {
                    return Ok(());
                }
                if !permitted.contains(&l) {
                    permitted.push(l);
                }
            }
        }
        Err(Denied(format!(
            "access denied: user {name} may reach node {node} but not as login {login:?}; the \
             roles that allow the node ({}) permit {}; ask for a role with that login, or a \
             `--logins` on the user if a role has {USER_LOGINS_TEMPLATE}",
            role_names(&allowing),
            if permitted.is_empty() {
                "no login".to_owned()
            } else {
                format!("the logins {}", permitted.join(", "))
            }
        )))
    }

    /// Whether `user` may reach trusted leaf cluster `cluster` at all (the leaf then decides
    /// about its nodes with its own roles). Deny wins, as for nodes; a role reaches a leaf only
    /// when its `allow.clusters` matches the leaf's name.
    pub fn check_cluster(&self, user: &PeerIdentity, cluster: &str) -> Result<(), Denied> {
        let name = &user.name;
        let known: Vec<&RoleConfig> = self.known(&user.roles).collect();
        if let Some(role) = known
            .iter()
            .find(|role| role.deny.clusters.iter().any(|p| glob(p, cluster)))
        {
            return Err(Denied(format!(
                "access denied: role {} of user {name} denies cluster {cluster} (`deny.clusters`); \
                 deny wins over any allow",
                role.name
            )));
        }
        if known
            .iter()
            .any(|role| role.allow.clusters.iter().any(|p| glob(p, cluster)))
        {
            return Ok(());
        }
        Err(Denied(format!(
            "access denied: none of user {name}'s roles ({}) allows trusted cluster {cluster}; a \
             role with `allow.clusters = [\"{cluster}\"]` (or \"*\") would",
            if known.is_empty() {
                "none defined in this cluster".to_owned()
            } else {
                role_names(&known)
            }
        )))
    }

    /// The SSH logins that `roles` permit on some node, with `{{user.logins}}` expanded to
    /// `user_logins`: the principals of the user's SSH certificate. Sorted, without repeats.
    pub fn logins_for(&self, roles: &[String], user_logins: &[String]) -> Vec<String> {
        let mut all: Vec<String> = self
            .known(roles)
            .filter(|role| !role.allow.is_empty())
            .flat_map(|role| expand(&role.logins, user_logins))
            .collect();
        all.sort();
        all.dedup();
        all
    }

    /// The longest certificate a user holding `roles` may get: the smallest `max_cert_ttl`
    /// among the known ones (the strictest role wins, as deny does), or
    /// [`DEFAULT_ROLE_MAX_CERT_TTL`] when none is known.
    pub fn max_cert_ttl(&self, roles: &[String]) -> Duration {
        self.known(roles)
            .map(|role| role.max_cert_ttl)
            .min()
            .unwrap_or(DEFAULT_ROLE_MAX_CERT_TTL)
    }
}

fn role_names(roles: &[&RoleConfig]) -> String {
    let names: Vec<&str> = roles.iter().map(|r| r.name.as_str()).collect();
    names.join(", ")
}

fn describe_labels(labels: &[(String, String)]) -> String {
    if labels.is_empty() {
        return "it has no labels".into();
    }
    let mut text = "its labels: ".to_owned();
    for (i, (k, v)) in labels.iter().enumerate() {
        let _ = write!(text, "{}{k}={v}", if i == 0 { "" } else { ", " });
    }
    text
}

fn expand(logins: &[RoleLogin], user_logins: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for login in logins {
        match login {
            RoleLogin::Name(name) => out.push(name.clone()),
            RoleLogin::UserLogins => out.extend(user_logins.iter().cloned()),
        }
    }
    out
}

/// Which part of `rules` matches the node, if any (for the reason of a denial).
fn matches(rules: &RoleRules, node: &str, labels: &[(String, String)]) -> Option<String> {
    if let Some(pattern) = rules.nodes.iter().find(|p| glob(p, node)) {
        return Some(format!("node name matches {pattern:?}"));
    }
    if rules.labels.is_empty() {
        return None;
    }
    let all = rules.labels.iter().all(|(key, pattern)| {
        labels
            .iter()
            .any(|(k, v)| k == key && glob(pattern, v.as_str()))
    });
    all.then(|| {
        let wanted: Vec<String> = rules
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!("labels match {}", wanted.join(", "))
    })
}

/// Whether `text` matches `pattern`, where `*` stands for any run of characters (possibly
/// empty) and everything else matches itself. Linear in the lengths: the classic greedy
/// matcher that backtracks only to the last `*`.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;
    use tunnel::identity::IdentityKind;

    fn policy(toml: &str) -> Policy {
        let text = format!("cluster_name = \"c\"\n{toml}");
        let config = config::ProxyConfig::from_toml_str(&text, "/test/proxy.toml").unwrap();
        Policy::new(&config.roles)
    }

    fn user(roles: &[&str], logins: &[&str]) -> PeerIdentity {
        PeerIdentity {
            kind: IdentityKind::User,
            name: "alice".into(),
            cluster: "c".into(),
            roles: roles.iter().map(|s| (*s).to_owned()).collect(),
            logins: logins.iter().map(|s| (*s).to_owned()).collect(),
            not_before: SystemTime::UNIX_EPOCH,
            not_after: SystemTime::UNIX_EPOCH,
            serial: "01".into(),
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    const ROLES: &str = r#"
[[roles]]
name = "dev"
logins = ["{{user.logins}}", "ubuntu"]
max_cert_ttl = "8h"
allow = { nodes = ["dev-*"], labels = { env = "dev" } }
deny = { nodes = ["dev-secret"], labels = { env = "prod" } }

[[roles]]
name = "ops"
logins = ["root"]
max_cert_ttl = "1h"
allow = { nodes = ["*"] }

[[roles]]
name = "team"
logins = ["deploy"]
allow = { labels = { team = "*", tier = "web" } }
"#;

    #[test]
    fn globs() {
        assert!(glob("*", ""));
        assert!(glob("*", "anything"));
        assert!(glob("node-a", "node-a"));
        assert!(!glob("node-a", "node-ab"));
        assert!(glob("node-*", "node-"));
        assert!(glob("node-*", "node-r1"));
        assert!(!glob("node-*", "nodes"));
        assert!(glob("*-r*", "node-r1"));
        assert!(glob("a*b*c", "aXbYbZc"));
        assert!(!glob("a*b*c", "aXbYbZ"));
        assert!(glob("**", "x"));
        assert!(!glob("", "x"));
    }

    #[test]
    fn the_builtin_role_reaches_every_node_with_the_users_logins() {
        let p = Policy::new(&[]);
        assert_eq!(p.names(), vec![BUILTIN_ROLE]);
        let alice = user(&["access"], &["root", "pi"]);
        assert_eq!(p.check(&alice, "anything", &[], ""), Ok(()));
        assert_eq!(
            p.check(&alice, "node-a", &labels(&[("env", "prod")]), "pi"),
            Ok(())
        );
        let err = p.check(&alice, "node-a", &[], "admin").unwrap_err();
        assert!(err.0.contains("not as login \"admin\""), "{err}");
        assert!(err.0.contains("the logins root, pi"), "{err}");
        assert_eq!(
            p.logins_for(&alice.roles, &alice.logins),
            vec!["pi", "root"]
        );
        assert_eq!(p.max_cert_ttl(&alice.roles), DEFAULT_ROLE_MAX_CERT_TTL);
    }

    #[test]
    fn a_role_named_like_the_builtin_replaces_it() {
        let p = policy(
            "[[roles]]\nname = \"access\"\nlogins = [\"guest\"]\nallow = { nodes = [\"pub-*\"] }\n",
        );
        let u = user(&["access"], &["root"]);
        assert!(p.check(&u, "node-a", &[], "").is_err());
        assert_eq!(p.check(&u, "pub-1", &[], "guest"), Ok(()));
        assert!(p.check(&u, "pub-1", &[], "root").is_err());
    }

    #[test]
    fn names_and_labels_allow() {
        let p = policy(ROLES);
        let dev = user(&["dev"], &["alice"]);
        assert_eq!(p.check(&dev, "dev-1", &[], "ubuntu"), Ok(()));
        assert_eq!(p.check(&dev, "dev-1", &[], "alice"), Ok(()));
        // By label alone.
        assert_eq!(p.check(&dev, "box", &labels(&[("env", "dev")]), ""), Ok(()));
        let err = p
            .check(&dev, "box", &labels(&[("env", "test")]), "")
            .unwrap_err();
        assert!(
            err.0
                .contains("none of user alice's roles (dev) allows node box"),
            "{err}"
        );
        assert!(err.0.contains("its labels: env=test"), "{err}");
        // Every label of the rule must match; `*` matches any value.
        let team = user(&["team"], &[]);
        let both = labels(&[("team", "blue"), ("tier", "web")]);
        assert_eq!(p.check(&team, "x", &both, "deploy"), Ok(()));
        assert!(
            p.check(&team, "x", &labels(&[("team", "blue")]), "")
                .is_err()
        );
        assert!(
            p.check(&team, "x", &labels(&[("tier", "web")]), "")
                .is_err()
        );
    }

    #[test]
    fn deny_wins_over_allow_of_any_role() {
        let p = policy(ROLES);
        // ops allows every node, but dev denies dev-secret and env=prod for whoever holds dev.
        let both = user(&["ops", "dev"], &[]);
        let err = p.check(&both, "dev-secret", &[], "root").unwrap_err();
        assert!(
            err.0
                .contains("role dev of user alice denies node dev-secret"),
            "{err}"
        );
        assert!(err.0.contains("node name matches \"dev-secret\""), "{err}");
        let err = p
            .check(&both, "db", &labels(&[("env", "prod")]), "")
            .unwrap_err();
        assert!(err.0.contains("labels match env=prod"), "{err}");
        assert_eq!(
            p.check(&both, "db", &labels(&[("env", "stage")]), "root"),
            Ok(())
        );
        // ops alone is not denied.
        let ops = user(&["ops"], &[]);
        assert_eq!(p.check(&ops, "dev-secret", &[], "root"), Ok(()));
    }

    #[test]
    fn logins_come_from_the_roles_that_allow_the_node() {
        let p = policy(ROLES);
        let u = user(&["dev", "ops"], &["alice"]);
        // root comes from ops, which allows every node.
        assert_eq!(p.check(&u, "dev-1", &[], "root"), Ok(()));
        let team = user(&["team", "ops"], &[]);
        let web = labels(&[("team", "a"), ("tier", "web")]);
        assert_eq!(p.check(&team, "w", &web, "deploy"), Ok(()));
        // deploy comes from team, which does not allow node "other".
        assert!(p.check(&team, "other", &[], "deploy").is_err());
        assert_eq!(
            p.logins_for(&u.roles, &u.logins),
            vec!["alice", "root", "ubuntu"]
        );
    }

    #[test]
    fn unknown_roles_get_nothing() {
        let p = policy(ROLES);
        let u = user(&["intern"], &["root"]);
        let err = p.check(&u, "dev-1", &[], "").unwrap_err();
        assert!(
            err.0.contains(
                "user alice may not reach node dev-1: the user's roles (intern) are not defined"
            ),
            "{err}"
        );
        assert!(err.0.contains("access, dev, ops, team"), "{err}");
        assert!(p.logins_for(&u.roles, &u.logins).is_empty());
        let none = user(&[], &["root"]);
        assert!(
            p.check(&none, "dev-1", &[], "")
                .unwrap_err()
                .0
                .contains("has no roles")
        );
        // Unknown roles next to a known one are ignored.
        let mixed = user(&["intern", "dev"], &[]);
        assert_eq!(p.check(&mixed, "dev-1", &[], "ubuntu"), Ok(()));
    }

    #[test]
    fn user_logins_template_expands_to_the_certificates_logins() {
        let p = policy(ROLES);
        let u = user(&["dev"], &["alice", "build"]);
        assert_eq!(p.check(&u, "dev-1", &[], "build"), Ok(()));
        let nobody = user(&["dev"], &[]);
        assert!(p.check(&nobody, "dev-1", &[], "build").is_err());
        assert_eq!(p.logins_for(&nobody.roles, &nobody.logins), vec!["ubuntu"]);
    }

    #[test]
    fn the_strictest_max_cert_ttl_wins() {
        let p = policy(ROLES);
        let roles = |r: &[&str]| r.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            p.max_cert_ttl(&roles(&["dev"])),
            Duration::from_secs(8 * 3600)
        );
        assert_eq!(
            p.max_cert_ttl(&roles(&["dev", "ops"])),
            Duration::from_secs(3600)
        );
        assert_eq!(p.max_cert_ttl(&roles(&["team"])), DEFAULT_ROLE_MAX_CERT_TTL);
        assert_eq!(p.max_cert_ttl(&roles(&["nope"])), DEFAULT_ROLE_MAX_CERT_TTL);
    }

    #[test]
    fn clusters_need_an_allow_and_deny_wins() {
        let p = policy(
            "[[roles]]\nname = \"dev\"\nallow = { nodes = [\"*\"], clusters = [\"leaf-*\"] }\n\
             [[roles]]\nname = \"nolf\"\ndeny = { clusters = [\"leaf-2\"] }\n\
             [[roles]]\nname = \"local\"\nallow = { nodes = [\"*\"] }\n",
        );
        assert_eq!(p.check_cluster(&user(&["dev"], &[]), "leaf-1"), Ok(()));
        assert!(p.check_cluster(&user(&["dev"], &[]), "other").is_err());
        let err = p
            .check_cluster(&user(&["dev", "nolf"], &[]), "leaf-2")
            .unwrap_err();
        assert!(err.0.contains("role nolf"), "{err}");
        let err = p
            .check_cluster(&user(&["local"], &[]), "leaf-1")
            .unwrap_err();
        assert!(err.0.contains("allow.clusters"), "{err}");
        assert!(p.check_cluster(&user(&["nope"], &[]), "leaf-1").is_err());
        // The built-in role reaches every leaf.
        assert_eq!(
            Policy::new(&[]).check_cluster(&user(&["access"], &[]), "x"),
            Ok(())
        );
    }

    #[test]
    fn a_role_that_allows_nothing_grants_no_login() {
        let p = policy("[[roles]]\nname = \"empty\"\nlogins = [\"root\"]\n");
        let u = user(&["empty"], &[]);
        assert!(p.check(&u, "x", &[], "").is_err());
        assert!(p.logins_for(&u.roles, &u.logins).is_empty());
    }
}
