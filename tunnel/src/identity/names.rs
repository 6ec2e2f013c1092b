//! Names and the `remoteler://` URI that carries an identity in a certificate.

use std::fmt;
use std::str::FromStr;

use super::error::{IdentityError, excerpt};

/// Longest cluster, node, user, proxy, role or login name, in bytes. Long enough for a fully
/// qualified host name as a cluster name, short enough that a certificate stays small.
pub const MAX_NAME_LEN: usize = 128;

/// Most roles, and most logins, one user certificate may carry. A certificate is parsed from
/// the network before it is trusted; this bounds what a peer can make us allocate.
pub const MAX_LIST_LEN: usize = 64;

/// URI scheme of the subject alternative name that carries the identity.
pub(crate) const URI_PREFIX: &str = "remoteler://";

/// What a certificate identifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum IdentityKind {
    /// An edge device's agent, after it joined the cluster.
    Node,
    /// A person, after `remoteler login`.
    User,
    /// A leaf cluster, toward the root cluster it is trusted by.
    Cluster,
    /// The proxy itself (server certificate).
    Proxy,
}

impl IdentityKind {
    /// All kinds, in the order of the enum.
    pub const ALL: [IdentityKind; 4] = [
        IdentityKind::Node,
        IdentityKind::User,
        IdentityKind::Cluster,
        IdentityKind::Proxy,
    ];

    /// The lower-case word used in certificates (`OU` and the URI path).
    pub fn as_str(self) -> &'static str {
        match self {
            IdentityKind::Node => "node",
            IdentityKind::User => "user",
            IdentityKind::Cluster => "cluster",
            IdentityKind::Proxy => "proxy",
        }
    }

    /// The name of this kind's name, for error messages ("node name").
    pub(crate) fn name_field(self) -> &'static str {
        match self {
            IdentityKind::Node => "node name",
            IdentityKind::User => "user name",
            IdentityKind::Cluster => "cluster name",
            IdentityKind::Proxy => "proxy name",
        }
    }
}

impl fmt::Display for IdentityKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for IdentityKind {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        IdentityKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| IdentityError::NotAnIdentity {
                detail: format!(
                    "unknown identity kind {:?}, expected node, user, cluster or proxy",
                    excerpt(s)
                ),
            })
    }
}

/// Checks a cluster, node, user, proxy, role or login name against the naming rules (see the
/// module docs). `field` names the kind of name in the error ("node name", "role").
pub fn validate_name(field: &'static str, value: &str) -> Result<(), IdentityError> {
    let fail = |reason| {
        Err(IdentityError::InvalidName {
            field,
            value: excerpt(value),
            reason,
        })
    };
    if value.is_empty() {
        return fail("it is empty");
    }
    if value.len() > MAX_NAME_LEN {
        return fail("it is too long");
    }
    if value.starts_with(['.', '-']) {
        return fail("it starts with '.' or '-'");
    }
    if !value
        .bytes()
        .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'))
    {
        return fail("it contains a character that is not allowed");
    }
    Ok(())
}

fn validate_list(
    field: &'static str,
    one: &'static str,
    items: &[String],
) -> Result<(), IdentityError> {
    if items.len() > MAX_LIST_LEN {
        return Err(IdentityError::TooMany {
            field,
            count: items.len(),
            max: MAX_LIST_LEN,
        });
    }
    for (i, item) in items.iter().enumerate() {
        validate_name(one, item)?;
        if items[..i].contains(item) {
            return Err(IdentityError::InvalidName {
                field: one,
                value: excerpt(item),
                reason: "it is listed twice",
            });
        }
    }
    Ok(())
}

/// What a leaf certificate says about its holder; the part of [`super::PeerIdentity`] that
/// the issuer chooses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Claims {
    pub(crate) kind: IdentityKind,
    pub(crate) cluster: String,
    pub(crate) name: String,
    pub(crate) roles: Vec<String>,
    pub(crate) logins: Vec<String>,
}

impl Claims {
    /// Checks every name and list; roles and logins only exist for users.
    pub(crate) fn validate(&self) -> Result<(), IdentityError> {
        validate_name("cluster name", &self.cluster)?;
        validate_name(self.kind.name_field(), &self.name)?;
        if self.kind != IdentityKind::User && !(self.roles.is_empty() && self.logins.is_empty()) {
            return Err(IdentityError::NotAnIdentity {
                detail: format!("a {} certificate cannot carry roles or logins", self.kind),
            });
        }
        validate_list("roles", "role", &self.roles)?;
        validate_list("logins", "login", &self.logins)?;
        Ok(())
    }

    /// `remoteler://<cluster>/<kind>/<name>[?roles=..&logins=..]`; call after `validate`.
    pub(crate) fn to_uri(&self) -> String {
        let mut uri = format!("{URI_PREFIX}{}/{}/{}", self.cluster, self.kind, self.name);
        if self.kind == IdentityKind::User {
            uri.push_str("?roles=");
            uri.push_str(&self.roles.join(","));
            uri.push_str("&logins=");
            uri.push_str(&self.logins.join(","));
        }
        uri
    }

    /// The exact inverse of `to_uri`; anything `to_uri` cannot produce is an error.
    pub(crate) fn from_uri(uri: &str) -> Result<Claims, IdentityError> {
        let bad = |what: &str| IdentityError::NotAnIdentity {
            detail: format!("identity URI {:?}: {what}", excerpt(uri)),
        };
        let rest = uri
            .strip_prefix(URI_PREFIX)
            .ok_or_else(|| bad("does not start with remoteler://"))?;
        let (path, query) = match rest.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (rest, None),
        };
        let mut parts = path.split('/');
        let (Some(cluster), Some(kind), Some(name), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("expected remoteler://<cluster>/<kind>/<name>"));
        };
        let kind: IdentityKind = kind.parse()?;
        let (roles, logins) = match (kind, query) {
            (IdentityKind::User, Some(query)) => {
                let (roles, logins) = query
                    .strip_prefix("roles=")
                    .and_then(|q| q.split_once("&logins="))
                    .ok_or_else(|| bad("expected ?roles=<list>&logins=<list>"))?;
                (split_list(roles), split_list(logins))
            }
            (IdentityKind::User, None) => return Err(bad("a user URI needs ?roles=..&logins=..")),
            (_, Some(_)) => return Err(bad("only a user URI has a query")),
            (_, None) => (Vec::new(), Vec::new()),
        };
        let claims = Claims {
            kind,
            cluster: cluster.to_owned(),
            name: name.to_owned(),
            roles,
            logins,
        };
        claims.validate()?;
        Ok(claims)
    }
}

fn split_list(list: &str) -> Vec<String> {
    if list.is_empty() {
        return Vec::new();
    }
    // An empty item ("a,,b") stays in and fails validation as an empty name.
    list.split(',').map(str::to_owned).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(roles: &[&str], logins: &[&str]) -> Claims {
        Claims {
            kind: IdentityKind::User,
            cluster: "example.com".into(),
            name: "alice".into(),
            roles: roles.iter().map(|s| s.to_string()).collect(),
            logins: logins.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn uri_round_trip() {
        for claims in [
            user(&[], &[]),
            user(&["dev", "ops"], &["root", "ubuntu"]),
            user(&["dev"], &[]),
        ] {
            let uri = claims.to_uri();
            assert_eq!(Claims::from_uri(&uri).unwrap(), claims, "{uri}");
        }
        assert_eq!(
            user(&["dev", "ops"], &["root"]).to_uri(),
            "remoteler://example.com/user/alice?roles=dev,ops&logins=root"
        );
    }

    #[test]
    fn uri_rejects_near_misses() {
        for uri in [
            "remoteler://example.com/user/alice",
            "remoteler://example.com/node/n1?roles=&logins=",
            "remoteler://example.com/user/alice?logins=&roles=",
            "remoteler://example.com/user/alice?roles=a,,b&logins=",
            "remoteler://example.com/user/alice?roles=a,a&logins=",
            "remoteler://example.com/user/Alice?roles=&logins=",
            "remoteler://example.com/user/alice/x?roles=&logins=",
            "remoteler://example.com/robot/r1",
            "remoteler://example.com/node/-n1",
            "remoteler://example.com/node/..",
            "remoteler:///node/n1",
            "https://example.com/node/n1",
        ] {
            assert!(Claims::from_uri(uri).is_err(), "{uri} was accepted");
        }
    }

    #[test]
    fn names() {
        for ok in ["a", "node-r1", "leaf.example.com", "ec2-user", "_apt", "0"] {
            validate_name("name", ok).unwrap();
        }
        let long = "a".repeat(MAX_NAME_LEN + 1);
        for bad in [
            "",
            "-x",
            ".x",
            "A",
            "a b",
            "a/b",
            "a,b",
            "a?b",
            "é",
            long.as_str(),
        ] {
            assert!(validate_name("name", bad).is_err(), "{bad:?} was accepted");
        }
    }
}
