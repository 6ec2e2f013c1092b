//! Command-line arguments of `remoteler`.

use std::path::PathBuf;

use argh::FromArgs;

/// remoteler: reach the nodes of a Remoteler cluster with plain ssh.
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
    /// Log in.
    Login(LoginArgs),
    /// Show the login.
    Status(StatusArgs),
    /// Log out.
    Logout(LogoutArgs),
    /// List nodes.
    Ls(LsArgs),
    /// List trusted leaf clusters.
    Clusters(ClustersArgs),
    /// Run ssh.
    Ssh(SshArgs),
    /// Bridges for other programs.
    Proxy(ProxyArgs),
    /// Forward a local port to a node's service.
    Forward(ForwardArgs),
    /// Print an ssh_config block.
    Config(ConfigArgs),
}

/// Log in to a cluster's proxy and store a short-lived certificate.
#[derive(FromArgs, Debug, PartialEq)]
#[argh(subcommand, name = "login")]
pub struct LoginArgs {
    /// the proxy's user listener, HOST:PORT (port 3023 by default on the proxy)
    #[argh(option)]
    pub proxy: String,
    /// user name
    #[argh(option)]
    pub user: String,
    /// file holding the password (else it is asked on the terminal)
    #[argh(option)]
    pub password_file: Option<PathBuf>,
    /// the cluster CA's pin, sha256:<64 hex digits>; needed on the first login to a proxy
    #[argh(option)]
    pub ca_pin: Option<String>,
    /// requested lifetime of the certificate, e.g. 12h or 30m (the proxy may cap it)
    #[argh(option, default = "String::from(\"12h\")")]
    pub ttl: String,
}

/// Show who is logged in to which cluster, and until when.
#[derive(FromArgs, Debug, PartialEq)]
#[argh(subcommand, name = "status")]
pub struct StatusArgs {}

/// Delete the stored key and certificate.
#[derive(FromArgs, Debug, PartialEq)]
#[argh(subcommand, name = "logout")]
pub struct LogoutArgs {}

/// List the cluster's nodes.
#[derive(FromArgs, Debug, PartialEq)]
#[argh(subcommand, name = "ls")]
pub struct LsArgs {
    /// print JSON instead of a table
    #[argh(switch)]
    pub json: bool,
    /// list the nodes of this trusted leaf cluster instead
    #[argh(option)]
    pub cluster: Option<String>,
}

/// List the trusted leaf clusters you may reach through this cluster's proxy.
#[derive(FromArgs, Debug, PartialEq)]
#[argh(subcommand, name = "clusters")]
pub struct ClustersArgs {
    /// print JSON instead of a table
    #[argh(switch)]
    pub json: bool,
}

/// Run the system ssh to a node through the proxy.
#[derive(FromArgs, Debug, PartialEq)]
#[argh(subcommand, name = "ssh")]
pub struct SshArgs {
    /// the node is in this trusted leaf cluster
    #[argh(option)]
    pub cluster: Option<String>,
    /// an option for ssh, as ssh's own -o (e.g. -o IdentityFile=~/.ssh/id_ed25519); repeatable
    #[argh(option, short = 'o')]
    pub option: Vec<String>,
    /// the node, with an optional login: LOGIN@NODE or NODE
    #[argh(positional)]
    pub destination: String,
    /// command to run on the node (everything after NODE)
    #[argh(positional, greedy)]
    pub command: Vec<String>,
}

/// Bridges for other programs.
#[derive(FromArgs, Debug, PartialEq)]
#[argh(subcommand, name = "proxy")]
pub struct ProxyArgs {
    #[argh(subcommand)]
    /// which bridge
    pub command: ProxyCommand,
}

/// Bridges.
#[derive(FromArgs, Debug, PartialEq)]
#[argh(subcommand)]
pub enum ProxyCommand {
    /// The ssh ProxyCommand.
    Ssh(ProxySshArgs),
}

/// Connect stdin/stdout to a node's ssh service (ssh's ProxyCommand).
#[derive(FromArgs, Debug, PartialEq)]
#[argh(subcommand, name = "ssh")]
pub struct ProxySshArgs {
    /// the node is in this trusted leaf cluster
    #[argh(option)]
    pub cluster: Option<String>,
    /// how long to keep reconnecting and resume the session after the connection to the
    /// proxy drops, e.g. 30s (the default), 2m; 0 ends the session with the connection
    #[argh(option, from_str_fn(parse_grace))]
    pub resume_grace: Option<std::time::Duration>,
    /// LOGIN@NODE:PORT (login and port optional), as ssh's %r@%h:%p
    #[argh(positional)]
    pub destination: String,
}

/// Forward a local TCP port to a service of a node through the proxy (like `ssh -L`,
/// without ssh): every local connection becomes one stream over one connection to the proxy.
#[derive(FromArgs, Debug, PartialEq)]
#[argh(subcommand, name = "forward")]
pub struct ForwardArgs {
    /// the local address to listen on, IP:PORT (port 0: any free port, printed at start)
    #[argh(option, default = "String::from(\"127.0.0.1:0\")")]
    pub listen: String,
    /// the node, with an optional login: LOGIN@NODE or NODE
    #[argh(positional)]
    pub node: String,
    /// the service: the name of one of the agent's forwards, e.g. iperf (default ssh)
    #[argh(positional, default = "String::from(\"ssh\")")]
    pub service: String,
}

/// `--resume-grace`: a duration such as 30s or 2m (a bare number is seconds), at most an hour
/// (the proxy's own `resume.grace` limit).
fn parse_grace(text: &str) -> Result<std::time::Duration, String> {
    let grace = match text.trim().parse::<u64>() {
        Ok(secs) => std::time::Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(text.trim())
            .map_err(|e| format!("--resume-grace {text:?}: {e}; expected e.g. 30s or 2m"))?,
    };
    if grace > config::defaults::MAX_RESUME_GRACE {
        return Err(format!(
            "--resume-grace {text:?}: at most {}s",
            config::defaults::MAX_RESUME_GRACE.as_secs()
        ));
    }
    Ok(grace)
}

/// Print an ssh_config block so that plain `ssh NODE` goes through the proxy.
#[derive(FromArgs, Debug, PartialEq)]
#[argh(subcommand, name = "config")]
pub struct ConfigArgs {}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, String> {
        Args::from_args(&["remoteler"], args)
            .map(|a| a.command)
            .map_err(|e| e.output)
    }

    #[test]
    fn login_flags() {
        let Command::Login(l) = parse(&["login", "--proxy", "p:3023", "--user", "alice"]).unwrap()
        else {
            panic!()
        };
        assert_eq!(l.ttl, "12h");
        assert_eq!(l.password_file, None);
        assert!(
            parse(&["login", "--user", "alice"]).is_err(),
            "--proxy is required"
        );
        let Command::Login(l) = parse(&[
            "login",
            "--proxy",
            "p:3023",
            "--user",
            "a",
            "--ttl",
            "30m",
            "--password-file",
            "/f",
            "--ca-pin",
            "sha256:00",
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!(
            (l.ttl.as_str(), l.ca_pin.as_deref()),
            ("30m", Some("sha256:00"))
        );
    }

    #[test]
    fn ssh_passes_the_command_through() {
        let Command::Ssh(s) = parse(&["ssh", "root@node-r1", "ls", "-la", "/tmp"]).unwrap() else {
            panic!()
        };
        assert_eq!(s.destination, "root@node-r1");
        assert_eq!(s.command, ["ls", "-la", "/tmp"]);
    }

    #[test]
    fn proxy_ssh_and_others() {
        assert_eq!(
            parse(&["proxy", "ssh", "root@node-r1:22"]).unwrap(),
            Command::Proxy(ProxyArgs {
                command: ProxyCommand::Ssh(ProxySshArgs {
                    cluster: None,
                    resume_grace: None,
                    destination: "root@node-r1:22".into()
                })
            })
        );
        match parse(&["proxy", "ssh", "--resume-grace", "90s", "n"]).unwrap() {
            Command::Proxy(ProxyArgs {
                command: ProxyCommand::Ssh(p),
            }) => assert_eq!(p.resume_grace, Some(std::time::Duration::from_secs(90))),
            other => panic!("{other:?}"),
        }
        assert!(parse(&["proxy", "ssh", "--resume-grace", "2h", "n"]).is_err());
        assert!(parse(&["proxy", "ssh", "--resume-grace", "soon", "n"]).is_err());
        assert_eq!(
            parse(&["ls", "--json"]).unwrap(),
            Command::Ls(LsArgs {
                json: true,
                cluster: None
            })
        );
        let Command::Ls(ls) = parse(&["ls", "--cluster", "leaf"]).unwrap() else {
            panic!()
        };
        assert_eq!(ls.cluster.as_deref(), Some("leaf"));
        let Command::Ssh(s) = parse(&["ssh", "--cluster", "leaf", "node-a", "id"]).unwrap() else {
            panic!()
        };
        assert_eq!(
            (s.cluster.as_deref(), s.destination.as_str()),
            (Some("leaf"), "node-a")
        );
        let Command::Proxy(ProxyArgs {
            command: ProxyCommand::Ssh(p),
        }) = parse(&["proxy", "ssh", "--cluster", "leaf", "root@node-a.leaf:22"]).unwrap()
        else {
            panic!()
        };
        assert_eq!(p.cluster.as_deref(), Some("leaf"));
        assert_eq!(
            parse(&["clusters"]).unwrap(),
            Command::Clusters(ClustersArgs { json: false })
        );
        assert_eq!(parse(&["config"]).unwrap(), Command::Config(ConfigArgs {}));
        assert_eq!(
            parse(&["forward", "--listen", "127.0.0.1:15201", "node-r1", "iperf"]).unwrap(),
            Command::Forward(ForwardArgs {
                listen: "127.0.0.1:15201".into(),
                node: "node-r1".into(),
                service: "iperf".into(),
            })
        );
        let Command::Forward(f) = parse(&["forward", "node-r1"]).unwrap() else {
            panic!()
        };
        assert_eq!(
            (f.listen.as_str(), f.service.as_str()),
            ("127.0.0.1:0", "ssh")
        );
        assert!(parse(&["proxy"]).is_err());
        assert!(parse(&["nosuch"]).is_err());
    }
}
