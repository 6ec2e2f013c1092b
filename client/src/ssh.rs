//! Running the system `ssh` through Remoteler: destination parsing, the ProxyCommand, and the
//! ssh_config block printed by `remoteler config`.

use std::path::Path;

/// `[LOGIN@]NODE[:PORT]` as ssh's `%r@%h:%p` gives it to `remoteler proxy ssh`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// The OS login, if given.
    pub login: Option<String>,
    /// The node name (a `.CLUSTER` suffix already stripped).
    pub node: String,
    /// The port ssh would have dialled; the agent decides where `ssh` goes, so it is
    /// informational only.
    pub port: Option<u16>,
}

impl Destination {
    /// Parses `[LOGIN@]NODE[:PORT]`; a trailing `.CLUSTER` on the node is removed, so the
    /// `Host *.CLUSTER` pattern of `remoteler config` works.
    pub fn parse(text: &str, cluster: &str) -> Result<Destination, String> {
        let (login, rest) = match text.rsplit_once('@') {
            Some((login, rest)) => (Some(login), rest),
            None => (None, text),
        };
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
                let port = port
                    .parse::<u16>()
                    .map_err(|_| format!("{text:?}: port {port} is out of range"))?;
                (host, Some(port))
            }
            _ => (rest, None),
        };
        let suffix = format!(".{cluster}");
        let node = match host.strip_suffix(&suffix) {
            Some(node) if !cluster.is_empty() && !node.is_empty() => node,
            _ => host,
        };
        if node.is_empty() {
            return Err(format!("{text:?}: expected [LOGIN@]NODE[:PORT]"));
        }
        if login.is_some_and(str::is_empty) {
            return Err(format!("{text:?}: empty login before '@'"));
        }
        Ok(Destination {
            login: login.map(str::to_owned),
            node: node.to_owned(),
            port,
        })
    }
}

/// Quotes a path for the shell that ssh runs a ProxyCommand with, and escapes ssh's `%`
/// tokens: double quotes (as ssh_config examples do), or single quotes if the path holds a
/// character that is special inside double quotes.
pub fn quote_for_proxy_command(path: &str) -> String {
    let escaped = path.replace('%', "%%");
    if escaped.contains(['"', '$', '`', '\\', '!']) {
        format!("'{}'", escaped.replace('\'', r"'\''"))
    } else {
        format!("\"{escaped}\"")
    }
}

/// The ProxyCommand that runs this program as the bridge. `home` is passed along when the
/// user chose a non-default directory (REMOTELER_HOME), since ssh may run with another
/// environment; `cluster` names a trusted leaf cluster whose nodes it reaches.
pub fn proxy_command(exe: &Path, home: Option<&Path>, cluster: Option<&str>) -> String {
    let exe = quote_for_proxy_command(&exe.to_string_lossy());
    // Cluster names are [a-z0-9.-]: nothing to quote.
    let cluster = cluster.map_or_else(String::new, |c| format!(" --cluster {c}"));
    match home {
        Some(home) => format!(
            "env REMOTELER_HOME={} {exe} proxy ssh{cluster} %r@%h:%p",
            quote_for_proxy_command(&home.to_string_lossy())
        ),
        None => format!("{exe} proxy ssh{cluster} %r@%h:%p"),
    }
}

/// The nodes of one trusted leaf cluster for [`ssh_config`]: its name, its nodes, and the
/// ProxyCommand (with `--cluster`) that reaches them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafHosts {
    /// The leaf cluster's name.
    pub cluster: String,
    /// Its nodes.
    pub nodes: Vec<String>,
    /// `proxy_command(.., Some(cluster))`.
    pub proxy_command: String,
    /// The leaf's SSH host CA public key line, when the root passed it on; without it, its
    /// nodes' host keys are not verified by a CA.
    pub host_ca: Option<String>,
}

/// The known_hosts file of `remoteler config`: one `@cert-authority` line per cluster whose
/// SSH host CA is known. The root's CA covers the names `ssh_config` gives its nodes (the bare
/// names, and `*.CLUSTER`, which also matches the `NODE.CLUSTER` HostKeyAlias) but not the
/// names under a leaf (`!*.LEAF`): a leaf's nodes are vouched for by the leaf's CA alone, and
/// a leaf's CA only for names under the leaf.
pub fn known_hosts(cluster: &str, nodes: &[String], host_ca: &str, leaves: &[LeafHosts]) -> String {
    let mut patterns: Vec<String> = nodes.to_vec();
    patterns.push(format!("*.{cluster}"));
    patterns.extend(leaves.iter().map(|l| format!("!*.{}", l.cluster)));
    let mut out = format!(
        "# Remoteler: SSH host CAs, written by `remoteler login` and `remoteler config`; \
         rewritten each time.\n@cert-authority {} {}\n",
        patterns.join(","),
        host_ca.trim()
    );
    for leaf in leaves {
        if let Some(ca) = &leaf.host_ca {
            out.push_str(&format!(
                "@cert-authority *.{} {}\n",
                leaf.cluster,
                ca.trim()
            ));
        }
    }
    out
}

/// Whether the known_hosts text `current` (of [`known_hosts`]) already trusts `host_ca` for the
/// nodes of `cluster`.
pub fn trusts(current: &str, cluster: &str, host_ca: &str) -> bool {
    let suffix = format!(" {}", host_ca.trim());
    current.lines().any(|line| {
        line.strip_prefix("@cert-authority ")
            .and_then(|rest| rest.strip_suffix(suffix.as_str()))
            .is_some_and(|patterns| patterns.split(',').any(|p| p == format!("*.{cluster}")))
    })
}

/// The `-o` options that make ssh verify the node's host certificate against the cluster's
/// host CA in `known_hosts`, and refuse any other host key.
pub fn verify_options(known_hosts: &Path) -> Vec<String> {
    vec![
        format!("UserKnownHostsFile={}", quote_for_ssh_config(known_hosts)),
        "StrictHostKeyChecking=yes".to_owned(),
    ]
}

/// A path for an ssh_config line or a `-o` option: double-quoted, `%` escaped.
fn quote_for_ssh_config(path: &Path) -> String {
    format!("\"{}\"", path.to_string_lossy().replace('%', "%%"))
}

/// The `-o` options that make ssh use the login's SSH key and certificate, and only them.
pub fn identity_options(key: &Path, cert: &Path) -> Vec<String> {
    vec![
        format!("IdentityFile={}", quote_for_ssh_config(key)),
        format!("CertificateFile={}", quote_for_ssh_config(cert)),
        "IdentitiesOnly=yes".to_owned(),
    ]
}

/// The arguments for `ssh` (without the program name) for `remoteler ssh`.
pub fn ssh_args(
    destination: &str,
    node: &str,
    cluster: &str,
    proxy_command: &str,
    options: &[String],
    command: &[String],
) -> Vec<String> {
    let mut args = vec![
        "-o".to_owned(),
        format!("ProxyCommand={proxy_command}"),
        "-o".to_owned(),
        format!("HostKeyAlias={node}.{cluster}"),
    ];
    for option in options {
        args.extend(["-o".to_owned(), option.clone()]);
    }
    args.push(destination.to_owned());
    if !command.is_empty() {
        // Everything after the destination is the remote command, even if it looks like an
        // option.
        args.extend(command.iter().cloned());
    }
    args
}

/// The ssh_config block printed by `remoteler config`.
/// `identity` is the SSH key and certificate of the login, when it has one; `known_hosts` the
/// file of [`known_hosts`], when the cluster's host CA is known (then ssh verifies every node
/// against it, `StrictHostKeyChecking yes`); `user` the login when the user has only one.
/// Nodes of trusted leaf clusters come first as `NODE.LEAF` (ssh takes the first value it
/// finds for an option, and a leaf's name may end in the root's).
#[allow(clippy::too_many_arguments)]
pub fn ssh_config(
    cluster: &str,
    nodes: &[String],
    proxy_command: &str,
    home_hint: &str,
    identity: Option<(&Path, &Path)>,
    leaves: &[LeafHosts],
    known_hosts: Option<&Path>,
    user: Option<&str>,
) -> String {
    let mut identity_lines = identity.map_or_else(String::new, |(key, cert)| {
        format!(
            "    IdentityFile {}\n    CertificateFile {}\n    IdentitiesOnly yes\n",
            quote_for_ssh_config(key),
            quote_for_ssh_config(cert)
        )
    });
    if let Some(user) = user {
        identity_lines.push_str(&format!("    User {user}\n"));
    }
    let verify_lines = known_hosts.map_or_else(String::new, |path| {
        format!(
            "    UserKnownHostsFile {}\n    StrictHostKeyChecking yes\n",
            quote_for_ssh_config(path)
        )
    });
    let mut hosts: Vec<String> = nodes.to_vec();
    hosts.push(format!("*.{cluster}"));
    let mut out = String::new();
    out.push_str(&format!(
        "# Remoteler cluster {cluster}: generated by `remoteler config`.\n\
         # Save it and include it from ~/.ssh/config, for example:\n\
         #   remoteler config > {home_hint}/ssh_config\n\
         #   echo 'Include {home_hint}/ssh_config' >> ~/.ssh/config\n\
         # (Include must come before any `Host` line of ~/.ssh/config.) Then `ssh NODE` works.\n\
         # Run `remoteler config` again when nodes are added.\n"
    ));
    for leaf in leaves {
        let mut names: Vec<String> = leaf
            .nodes
            .iter()
            .map(|n| format!("{n}.{}", leaf.cluster))
            .collect();
        names.push(format!("*.{}", leaf.cluster));
        out.push_str(&format!(
            "# Trusted cluster {}: `ssh NODE.{}`.\n",
            leaf.cluster, leaf.cluster
        ));
        out.push_str(&format!("Host {}\n", names.join(" ")));
        out.push_str(&format!("    ProxyCommand {}\n", leaf.proxy_command));
        out.push_str(&identity_lines);
        if leaf.host_ca.is_some() {
            out.push_str(&verify_lines);
        }
        out.push('\n');
    }
    out.push_str(&format!("Host {}\n", hosts.join(" ")));
    out.push_str(&format!("    ProxyCommand {proxy_command}\n"));
    out.push_str(&identity_lines);
    out.push_str(&verify_lines);
    for node in nodes {
        // The same known_hosts entry as `remoteler ssh NODE`.
        out.push_str(&format!(
            "\nHost {node}\n    HostKeyAlias {node}.{cluster}\n"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn destinations() {
        let d = |t| Destination::parse(t, "example.com");
        assert_eq!(
            d("root@node-r1:22").unwrap(),
            Destination {
                login: Some("root".into()),
                node: "node-r1".into(),
                port: Some(22)
            }
        );
        assert_eq!(
            d("node-r1").unwrap(),
            Destination {
                login: None,
                node: "node-r1".into(),
                port: None
            }
        );
        assert_eq!(
            d("ubuntu@node-r1.example.com:2222").unwrap().node,
            "node-r1"
        );
        assert_eq!(d("node-r1.other.org").unwrap().node, "node-r1.other.org");
        assert!(d("root@:22").is_err());
        assert!(d("@node").is_err());
        assert!(d("node:99999").is_err());
        assert!(d(".example.com").unwrap().node == ".example.com");
    }

    #[test]
    fn quoting() {
        assert_eq!(
            quote_for_proxy_command("/usr/bin/remoteler"),
            "\"/usr/bin/remoteler\""
        );
        assert_eq!(
            quote_for_proxy_command("/opt/my tools/remoteler"),
            "\"/opt/my tools/remoteler\""
        );
        assert_eq!(quote_for_proxy_command("/x/100%/r"), "\"/x/100%%/r\"");
        assert_eq!(
            quote_for_proxy_command("/x/$HOME/it's"),
            r#"'/x/$HOME/it'\''s'"#
        );
    }

    #[test]
    fn ssh_arguments() {
        let pc = proxy_command(Path::new("/usr/bin/remoteler"), None, None);
        assert_eq!(pc, "\"/usr/bin/remoteler\" proxy ssh %r@%h:%p");
        let args = ssh_args(
            "root@node-r1",
            "node-r1",
            "example.com",
            &pc,
            &["BatchMode=yes".into()],
            &["ls".into(), "-la".into()],
        );
        assert_eq!(
            args,
            [
                "-o",
                "ProxyCommand=\"/usr/bin/remoteler\" proxy ssh %r@%h:%p",
                "-o",
                "HostKeyAlias=node-r1.example.com",
                "-o",
                "BatchMode=yes",
                "root@node-r1",
                "ls",
                "-la"
            ]
        );
    }

    #[test]
    fn config_block() {
        let pc = proxy_command(
            Path::new("/usr/bin/remoteler"),
            Some(Path::new("/tmp/h")),
            None,
        );
        let leaf_pc = proxy_command(
            Path::new("/usr/bin/remoteler"),
            Some(Path::new("/tmp/h")),
            Some("leaf.example.com"),
        );
        assert_eq!(
            leaf_pc,
            "env REMOTELER_HOME=\"/tmp/h\" \"/usr/bin/remoteler\" proxy ssh --cluster leaf.example.com %r@%h:%p"
        );
        let text = ssh_config(
            "example.com",
            &["node-a".into(), "node-r1".into()],
            &pc,
            "~/.remoteler",
            Some((
                Path::new("/tmp/h/ssh_key"),
                Path::new("/tmp/h/ssh_key-cert.pub"),
            )),
            &[LeafHosts {
                cluster: "leaf.example.com".into(),
                nodes: vec!["node-a".into()],
                proxy_command: leaf_pc.clone(),
                host_ca: None,
            }],
            Some(Path::new("/tmp/h/known_hosts")),
            Some("root"),
        );
        assert!(
            text.contains("    User root\n    UserKnownHostsFile \"/tmp/h/known_hosts\"\n    StrictHostKeyChecking yes\n"),
            "{text}"
        );
        // A leaf without a known host CA is not held to one it cannot meet.
        let leaf_end = text.find("\nHost node-a node-r1").unwrap();
        assert!(
            !text[..leaf_end].contains("StrictHostKeyChecking"),
            "{text}"
        );
        // The leaf's block comes before `*.example.com`, which its names also match.
        let leaf_block = text
            .find("\nHost node-a.leaf.example.com *.leaf.example.com\n")
            .unwrap();
        assert!(
            leaf_block < text.find("\nHost node-a node-r1").unwrap(),
            "{text}"
        );
        assert!(
            text.contains(&format!("    ProxyCommand {leaf_pc}\n")),
            "{text}"
        );
        assert!(
            text.contains("    IdentityFile \"/tmp/h/ssh_key\"\n    CertificateFile \"/tmp/h/ssh_key-cert.pub\"\n    IdentitiesOnly yes\n"),
            "{text}"
        );
        assert!(text.contains("\nHost node-a node-r1 *.example.com\n    ProxyCommand env REMOTELER_HOME=\"/tmp/h\" \"/usr/bin/remoteler\" proxy ssh %r@%h:%p\n"), "{text}");
        assert!(
            text.contains("\nHost node-r1\n    HostKeyAlias node-r1.example.com\n"),
            "{text}"
        );
        assert!(text.contains("Include ~/.remoteler/ssh_config"), "{text}");
        for line in text.lines() {
            assert!(
                line.is_empty()
                    || line.starts_with('#')
                    || line.starts_with("Host ")
                    || line.starts_with("    "),
                "{line}"
            );
        }
    }

    #[test]
    fn known_hosts_trusts_each_ca_for_its_own_names() {
        let leaf = LeafHosts {
            cluster: "leaf.example.com".into(),
            nodes: vec!["node-a".into()],
            proxy_command: String::new(),
            host_ca: Some("ssh-ed25519 BBBB remoteler-host-ca@leaf.example.com".into()),
        };
        let text = known_hosts(
            "example.com",
            &["node-a".into(), "node-r1".into()],
            "ssh-ed25519 AAAA remoteler-host-ca@example.com\n",
            &[leaf],
        );
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines,
            [
                "@cert-authority node-a,node-r1,*.example.com,!*.leaf.example.com ssh-ed25519 AAAA remoteler-host-ca@example.com",
                "@cert-authority *.leaf.example.com ssh-ed25519 BBBB remoteler-host-ca@leaf.example.com",
            ]
        );
        assert!(trusts(
            &text,
            "example.com",
            "ssh-ed25519 AAAA remoteler-host-ca@example.com"
        ));
        assert!(trusts(
            &text,
            "leaf.example.com",
            "ssh-ed25519 BBBB remoteler-host-ca@leaf.example.com"
        ));
        assert!(!trusts(
            &text,
            "example.com",
            "ssh-ed25519 CCCC remoteler-host-ca@example.com"
        ));
        assert!(!trusts(
            &text,
            "other.com",
            "ssh-ed25519 AAAA remoteler-host-ca@example.com"
        ));
        assert_eq!(
            verify_options(Path::new("/h/known_hosts")),
            [
                "UserKnownHostsFile=\"/h/known_hosts\"",
                "StrictHostKeyChecking=yes"
            ]
        );
    }
}
