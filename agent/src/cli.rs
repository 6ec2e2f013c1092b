//! Command-line arguments of `remoteler-agent` and how they override the configuration file.

use std::collections::BTreeMap;
use std::path::PathBuf;

use argh::FromArgs;
use config::{
    AgentConfig, AgentMode, CaPin, DEFAULT_FORWARD_NAME, Forward, Forwards, HostPort, JoinConfig,
    JoinToken, Labels, NodeName, Secret, ServiceName,
};

/// remoteler-agent: the edge agent of a Remoteler cluster.
#[derive(FromArgs, Debug, PartialEq)]
pub struct Args {
    #[argh(subcommand)]
    /// what to do
    pub command: Command,
}

/// Subcommands.
#[derive(FromArgs, Debug, PartialEq)]
#[argh(subcommand)]
pub enum Command {
    /// Run the agent.
    Start(StartArgs),
}

/// Join the cluster if needed, then keep the tunnel (or registration) up. Flags override the
/// configuration file.
#[derive(FromArgs, PartialEq, Default)]
#[argh(subcommand, name = "start")]
pub struct StartArgs {
    /// configuration file (TOML); without it, --node-name, --ca-pin and --proxy or --auth are
    /// required
    #[argh(option)]
    pub config: Option<PathBuf>,
    /// the proxy's tunnel listener, HOST:PORT (reverse tunnel mode)
    #[argh(option)]
    pub proxy: Option<String>,
    /// the proxy's auth listener, HOST:PORT (direct mode: the proxy dials this node)
    #[argh(option)]
    pub auth: Option<String>,
    /// in direct mode, the HOST:PORT the proxy dials for ssh (default: the ssh forward's
    /// target)
    #[argh(option)]
    pub ssh_address: Option<String>,
    /// join token (visible to other users in `ps`: prefer --token-file)
    #[argh(option)]
    pub token: Option<String>,
    /// file holding the join token
    #[argh(option)]
    pub token_file: Option<PathBuf>,
    /// the cluster CA's pin, sha256:<64 hex digits> (printed by `remoteler-proxy init`)
    #[argh(option)]
    pub ca_pin: Option<String>,
    /// this node's name, what users type after `ssh`
    #[argh(option)]
    pub node_name: Option<String>,
    /// where the node key and certificates are kept
    #[argh(option)]
    pub data_dir: Option<PathBuf>,
    /// a label KEY=VALUE (repeatable; adds to or overrides the file's labels)
    #[argh(option)]
    pub label: Vec<String>,
    /// a forward NAME=HOST:PORT (repeatable; replaces the file's forwards)
    #[argh(option)]
    pub forward: Vec<String>,
    /// the local sshd's host public key to have certified by the cluster (default
    /// /etc/ssh/ssh_host_ed25519_key.pub if it exists; "" for none)
    #[argh(option)]
    pub ssh_host_key: Option<PathBuf>,
    /// where to write its host certificate, for sshd's HostCertificate (default: beside the
    /// key, `*-cert.pub`)
    #[argh(option)]
    pub ssh_host_cert: Option<PathBuf>,
}

impl std::fmt::Debug for StartArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StartArgs")
            .field("config", &self.config)
            .field("proxy", &self.proxy)
            .field("auth", &self.auth)
            .field("token", &self.token.as_ref().map(|_| "MASKED"))
            .field("token_file", &self.token_file)
            .field("node_name", &self.node_name)
            .field("data_dir", &self.data_dir)
            .field("label", &self.label)
            .field("forward", &self.forward)
            .field("ssh_host_key", &self.ssh_host_key)
            .field("ssh_host_cert", &self.ssh_host_cert)
            .finish_non_exhaustive()
    }
}

fn flag_err(flag: &str, detail: impl std::fmt::Display) -> String {
    format!("--{flag}: {detail}")
}

impl StartArgs {
    /// The configuration: the file's (if any) with every given flag applied on top.
    pub fn to_config(&self) -> Result<AgentConfig, String> {
        if self.proxy.is_some() && self.auth.is_some() {
            return Err("give either --proxy (reverse tunnel) or --auth (direct), not both".into());
        }
        if self.token.is_some() && self.token_file.is_some() {
            return Err("give either --token or --token-file, not both".into());
        }
        let node_name = self
            .node_name
            .as_deref()
            .map(NodeName::new)
            .transpose()
            .map_err(|e| flag_err("node-name", e))?;
        let ca_pin = self
            .ca_pin
            .as_deref()
            .map(str::parse::<CaPin>)
            .transpose()
            .map_err(|e| flag_err("ca-pin", e))?;
        let parse_addr = |flag: &str, v: &Option<String>| {
            v.as_deref()
                .map(str::parse::<HostPort>)
                .transpose()
                .map_err(|e| flag_err(flag, e))
        };
        let proxy = parse_addr("proxy", &self.proxy)?;
        let auth = parse_addr("auth", &self.auth)?;
        let ssh_address = parse_addr("ssh-address", &self.ssh_address)?;
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => {
                if t.is_empty() || !t.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(flag_err(
                        "token",
                        "expected printable ascii characters without spaces (not shown)",
                    ));
                }
                Some(JoinToken::Inline(Secret::new(t.clone())))
            }
            (None, Some(path)) => Some(JoinToken::File(path.clone())),
            (None, None) => None,
        };

        let mut config = match &self.config {
            Some(path) => AgentConfig::load(path).map_err(|e| e.to_string())?,
            None => {
                let node_name = node_name.clone().ok_or(
                    "--node-name is required without --config (what users type after `ssh`)",
                )?;
                let ca_pin = ca_pin.clone().ok_or(
                    "--ca-pin is required without --config (printed by `remoteler-proxy init`)",
                )?;
                let mode = match (&proxy, &auth) {
                    (Some(proxy), _) => AgentMode::Tunnel {
                        proxy: proxy.clone(),
                    },
                    (None, Some(auth)) => AgentMode::Direct {
                        auth: auth.clone(),
                        // Set below, once the forwards are known.
                        ssh_address: auth.clone(),
                    },
                    (None, None) => {
                        return Err("--proxy HOST:PORT (reverse tunnel) or --auth HOST:PORT \
                                    (direct) is required without --config"
                            .into());
                    }
                };
                AgentConfig::new(
                    node_name,
                    mode,
                    JoinConfig {
                        token: JoinToken::None,
                        ca_pin,
                    },
                )
            }
        };
        let file_ssh_address = match &config.mode {
            AgentMode::Direct { ssh_address, .. } if self.config.is_some() => {
                Some(ssh_address.clone())
            }
            _ => None,
        };
        if let Some(n) = node_name {
            config.node_name = n;
        }
        if let Some(pin) = ca_pin {
            config.join.ca_pin = pin;
        }
        if let Some(token) = token {
            config.join.token = token;
        }
        if let Some(dir) = &self.data_dir {
            config.data_dir = dir.clone();
        }
        if self.ssh_host_key.is_some() || self.ssh_host_cert.is_some() {
            let (key, cert) = match config.host_cert.paths() {
                Some((key, cert)) => (Some(key.to_owned()), Some(cert.to_owned())),
                None => (Some(PathBuf::new()), None),
            };
            let key = self.ssh_host_key.clone().or(key);
            // A new key gets the certificate path derived from it unless one is given.
            let cert = self
                .ssh_host_cert
                .clone()
                .or(if self.ssh_host_key.is_some() {
                    None
                } else {
                    cert
                });
            config.host_cert = config::HostCertConfig::from_paths(key, cert);
        }
        if !self.label.is_empty() {
            let mut labels: BTreeMap<String, String> = config.labels.as_map().clone();
            for label in &self.label {
                let (k, v) = label.split_once('=').ok_or_else(|| {
                    flag_err("label", format!("expected KEY=VALUE, found {label:?}"))
                })?;
                labels.insert(k.to_owned(), v.to_owned());
            }
            config.labels = Labels::try_from(labels).map_err(|e| flag_err("label", e))?;
        }
        if !self.forward.is_empty() {
            let mut list = Vec::new();
            for forward in &self.forward {
                let (name, target) = forward.split_once('=').ok_or_else(|| {
                    flag_err(
                        "forward",
                        format!(
                            "expected NAME=HOST:PORT such as ssh=127.0.0.1:22, found {forward:?}"
                        ),
                    )
                })?;
                list.push(Forward {
                    name: ServiceName::new(name).map_err(|e| flag_err("forward", e))?,
                    target: target.parse().map_err(|e| flag_err("forward", e))?,
                });
            }
            config.forwards = Forwards::new(list).map_err(|e| flag_err("forward", e))?;
        }
        if let Some(proxy) = proxy {
            if ssh_address.is_some() {
                return Err("--ssh-address is only used with --auth (direct mode)".into());
            }
            config.mode = AgentMode::Tunnel { proxy };
        } else if let Some(auth) = auth.or_else(|| match &config.mode {
            AgentMode::Direct { auth, .. } => Some(auth.clone()),
            AgentMode::Tunnel { .. } => None,
        }) {
            let ssh_address = ssh_address
                .or(file_ssh_address)
                .or_else(|| {
                    config
                        .forwards
                        .get(DEFAULT_FORWARD_NAME)
                        .map(|f| f.target.clone())
                })
                .ok_or(
                    "--ssh-address is required with --auth when no forward is named \"ssh\" \
                     (the HOST:PORT the proxy dials)",
                )?;
            config.mode = AgentMode::Direct { auth, ssh_address };
        } else if ssh_address.is_some() {
            return Err("--ssh-address is only used with --auth (direct mode)".into());
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const PIN: &str = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn parse(args: &[&str]) -> Result<StartArgs, String> {
        let mut all = vec!["start"];
        all.extend_from_slice(args);
        match Args::from_args(&["remoteler-agent"], &all) {
            Ok(Args {
                command: Command::Start(s),
            }) => Ok(s),
            Err(e) => Err(e.output),
        }
    }

    #[test]
    fn flags_alone_make_a_config() {
        let args = parse(&[
            "--proxy",
            "proxy.example.com:3024",
            "--node-name",
            "node-r1",
            "--ca-pin",
            PIN,
            "--token-file",
            "/run/token",
            "--label",
            "env=prod",
            "--label",
            "site=w2",
            "--forward",
            "ssh=127.0.0.1:2222",
            "--forward",
            "web=10.0.0.5:80",
            "--data-dir",
            "/tmp/agent",
        ])
        .unwrap();
        let c = args.to_config().unwrap();
        assert_eq!(c.node_name.as_str(), "node-r1");
        assert_eq!(
            c.mode,
            AgentMode::Tunnel {
                proxy: "proxy.example.com:3024".parse().unwrap()
            }
        );
        assert_eq!(c.join.token, JoinToken::File("/run/token".into()));
        assert_eq!(c.labels.get("env"), Some("prod"));
        assert_eq!(c.labels.get("site"), Some("w2"));
        assert_eq!(c.forwards.as_slice().len(), 2);
        assert_eq!(
            c.forwards.get("ssh").unwrap().target.to_string(),
            "127.0.0.1:2222"
        );
        assert_eq!(c.data_dir, PathBuf::from("/tmp/agent"));
        assert_eq!(c.join.ca_pin.to_string(), PIN);
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(
            &file,
            format!(
                "node_name = \"node-a\"\nproxy = \"p:3024\"\nlabels = {{ env = \"dev\", keep = \"1\" }}\n\
                 [join]\ntoken = \"filetoken\"\nca_pin = \"{PIN}\"\n"
            ),
        )
        .unwrap();
        let args = parse(&[
            "--config",
            file.to_str().unwrap(),
            "--node-name",
            "node-b",
            "--label",
            "env=prod",
            "--auth",
            "10.0.0.1:3025",
            "--token",
            "flagtoken",
        ])
        .unwrap();
        let c = args.to_config().unwrap();
        assert_eq!(c.node_name.as_str(), "node-b");
        assert_eq!(c.labels.get("env"), Some("prod"));
        assert_eq!(c.labels.get("keep"), Some("1"));
        assert_eq!(
            c.mode,
            AgentMode::Direct {
                auth: "10.0.0.1:3025".parse().unwrap(),
                ssh_address: "127.0.0.1:22".parse().unwrap()
            }
        );
        assert_eq!(c.join.token, JoinToken::Inline(Secret::new("flagtoken")));
    }

    #[test]
    fn auth_mode_takes_ssh_address() {
        let args = parse(&[
            "--auth",
            "10.0.0.1:3025",
            "--node-name",
            "n",
            "--ca-pin",
            PIN,
            "--ssh-address",
            "10.0.0.7:22",
        ])
        .unwrap();
        let c = args.to_config().unwrap();
        assert_eq!(
            c.mode,
            AgentMode::Direct {
                auth: "10.0.0.1:3025".parse().unwrap(),
                ssh_address: "10.0.0.7:22".parse().unwrap()
            }
        );
    }

    #[test]
    fn bad_flags_name_the_flag() {
        let base = ["--proxy", "p:3024"];
        let cases: &[(&[&str], &str)] = &[
            (
                &["--node-name", "n", "--ca-pin", PIN, "--label", "novalue"],
                "--label",
            ),
            (
                &["--node-name", "n", "--ca-pin", PIN, "--forward", "ssh"],
                "--forward",
            ),
            (
                &[
                    "--node-name",
                    "n",
                    "--ca-pin",
                    PIN,
                    "--forward",
                    "ssh=nohostport",
                ],
                "--forward",
            ),
            (&["--node-name", "Bad Name", "--ca-pin", PIN], "--node-name"),
            (&["--node-name", "n", "--ca-pin", "md5:00"], "--ca-pin"),
            (&["--auth", "a:1"], "not both"),
            (&["--token", "a", "--token-file", "f"], "not both"),
            (
                &["--node-name", "n", "--ca-pin", PIN, "--token", "has space"],
                "--token",
            ),
            (
                &[
                    "--node-name",
                    "n",
                    "--ca-pin",
                    PIN,
                    "--ssh-address",
                    "10.0.0.1:22",
                ],
                "only used with --auth",
            ),
        ];
        for (extra, want) in cases {
            let mut all = base.to_vec();
            all.extend_from_slice(extra);
            let err = parse(&all).unwrap().to_config().unwrap_err();
            assert!(err.contains(want), "{extra:?}: {err}");
            assert!(!err.contains("has space"), "token leaked: {err}");
        }
    }

    #[test]
    fn required_flags_without_a_file() {
        let err = parse(&["--proxy", "p:1", "--ca-pin", PIN])
            .unwrap()
            .to_config()
            .unwrap_err();
        assert!(err.contains("--node-name"), "{err}");
        let err = parse(&["--proxy", "p:1", "--node-name", "n"])
            .unwrap()
            .to_config()
            .unwrap_err();
        assert!(err.contains("--ca-pin"), "{err}");
        let err = parse(&["--node-name", "n", "--ca-pin", PIN])
            .unwrap()
            .to_config()
            .unwrap_err();
        assert!(err.contains("--proxy"), "{err}");
    }

    #[test]
    fn debug_hides_the_token() {
        let args = parse(&["--token", "s3cr3t-token"]).unwrap();
        assert!(!format!("{args:?}").contains("s3cr3t"));
    }
}
