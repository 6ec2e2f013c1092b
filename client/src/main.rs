//! `remoteler`: parses the command line and runs one command of the `client` library.

use std::os::unix::process::CommandExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use client::cli::{Args, Command, ProxyCommand};
use client::home::{Home, USER_KEY_FILE};
use client::{ClientError, block_on};

fn main() {
    tunnel::allocator::tune_for_receive_buffers();
    let args: Args = argh::from_env();
    if let Err(e) = run(args) {
        eprintln!("remoteler: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), ClientError> {
    let home = Home::from_env()?;
    let now = SystemTime::now();
    match args.command {
        Command::Login(login) => {
            let prompt = format!("password for {} at {}: ", login.user, login.proxy);
            let password = client::read_password(login.password_file.as_deref(), &prompt)?;
            let profile = block_on(client::login(&home, &login, password))??;
            println!(
                "logged in to {} as {} (roles: {}); {}",
                profile.cluster,
                profile.user,
                if profile.roles.is_empty() {
                    "none".to_owned()
                } else {
                    profile.roles.join(", ")
                },
                client::remaining(&profile, now)
            );
        }
        Command::Status(_) => {
            let profile = home.require_profile()?;
            print!(
                "{}",
                client::status_text(&profile, now, home.file(USER_KEY_FILE).exists())
            );
            if profile.check_not_expired(now).is_err() {
                std::process::exit(1);
            }
        }
        Command::Logout(_) => {
            let profile = home.profile()?;
            let removed = home.remove_credentials()?;
            match (profile, removed) {
                (Some(p), true) => println!(
                    "logged out of {} (removed the key and certificate in {})",
                    p.cluster,
                    home.dir().display()
                ),
                (None, true) => println!(
                    "removed the key and certificate in {}",
                    home.dir().display()
                ),
                (_, false) => println!("not logged in"),
            }
        }
        Command::Ls(ls) => {
            let profile = home.valid_profile(now)?;
            let nodes = block_on(client::list_nodes(&home, &profile, ls.cluster.as_deref()))??;
            if ls.json {
                let text = serde_json::to_string_pretty(&nodes)
                    .map_err(|e| ClientError::msg(format!("cannot encode the node list: {e}")))?;
                println!("{text}");
            } else {
                print!("{}", client::nodes_table(&nodes));
            }
        }
        Command::Clusters(c) => {
            let profile = home.valid_profile(now)?;
            let clusters = block_on(client::list_clusters(&home, &profile))??;
            if c.json {
                let text = serde_json::to_string_pretty(&clusters).map_err(|e| {
                    ClientError::msg(format!("cannot encode the cluster list: {e}"))
                })?;
                println!("{text}");
            } else {
                print!("{}", client::clusters_table(&clusters));
            }
        }
        Command::Ssh(ssh) => {
            let profile = home.valid_profile(now)?;
            if let Some(cluster) = &ssh.cluster {
                // It goes into the ProxyCommand, which ssh runs with a shell.
                config::ClusterName::new(cluster.as_str())
                    .map_err(|e| ClientError::msg(format!("--cluster: {e}")))?;
            }
            let leaf = ssh.cluster.as_deref().filter(|c| *c != profile.cluster);
            let cluster = leaf.unwrap_or(&profile.cluster);
            let dest = client::ssh::Destination::parse(&ssh.destination, cluster)
                .map_err(ClientError::msg)?;
            let proxy_command =
                client::ssh::proxy_command(&current_exe()?, remoteler_home().as_deref(), leaf);
            let mut options = match home.ssh_identity() {
                Some((key, cert)) => {
                    client::ssh::identity_options(&absolute(&key), &absolute(&cert))
                }
                None => Vec::new(),
            };
            // Verified against the cluster's host CA (the login wrote known_hosts); a leaf's
            // nodes only when `remoteler config` found the leaf's CA.
            let known_hosts = home.file(client::home::KNOWN_HOSTS_FILE);
            let verified = match leaf {
                None => home.ssh_host_ca().is_some(),
                Some(leaf) => std::fs::read_to_string(&known_hosts)
                    .is_ok_and(|t| t.contains(&format!("@cert-authority *.{leaf} "))),
            };
            if verified && known_hosts.exists() {
                options.extend(client::ssh::verify_options(&absolute(&known_hosts)));
            }
            options.extend(ssh.option.iter().cloned());
            let args = client::ssh::ssh_args(
                &ssh.destination,
                &dest.node,
                cluster,
                &proxy_command,
                &options,
                &ssh.command,
            );
            let err = std::process::Command::new("ssh").args(&args).exec();
            return Err(ClientError::msg(format!(
                "cannot run ssh: {err}; install the OpenSSH client (package openssh-client)"
            )));
        }
        Command::Proxy(proxy) => match proxy.command {
            ProxyCommand::Ssh(p) => {
                let profile = home.valid_profile(now)?;
                // When its session is over, ssh closes our stdin and sends SIGHUP at once; the
                // default action would kill us before the stream is closed cleanly, and the
                // proxy would record a reset instead of a normal end. The stdin EOF that follows
                // ends the bridge properly.
                // SAFETY: setting a signal to SIG_IGN before any other thread exists installs no
                // handler code and touches no Rust state.
                unsafe { libc::signal(libc::SIGHUP, libc::SIG_IGN) };
                block_on(client::proxy_ssh(
                    &home,
                    &profile,
                    &p.destination,
                    p.cluster.as_deref(),
                    p.resume_grace
                        .unwrap_or(client::reconnect::DEFAULT_RESUME_GRACE),
                ))??;
            }
        },
        Command::Forward(f) => {
            let profile = home.valid_profile(now)?;
            let spec = client::forward::ForwardSpec::parse(
                &f.listen,
                &f.node,
                &f.service,
                &profile.cluster,
            )?;
            install_stop_handlers();
            block_on(async move {
                let listener = client::forward::bind(spec.listen)?;
                client::forward::run(home, spec, listener, stop_requested()).await
            })??;
        }
        Command::Config(_) => {
            let profile = home.valid_profile(now)?;
            let nodes = block_on(client::list_nodes(&home, &profile, None))??;
            let names: Vec<String> = nodes.into_iter().map(|n| n.name).collect();
            let exe = current_exe()?;
            let proxy_command = client::ssh::proxy_command(&exe, remoteler_home().as_deref(), None);
            // Every trusted leaf cluster that is online now, with its nodes.
            let mut leaves = Vec::new();
            // A proxy from before leaf host CAs does not know the request: none then.
            let leaf_cas =
                block_on(client::leaf_ssh_host_cas(&home, &profile))?.unwrap_or_default();
            // A proxy from before trusted clusters does not know the request: no leaves then.
            let clusters = block_on(client::list_clusters(&home, &profile))?.unwrap_or_else(|e| {
                eprintln!("remoteler: no trusted clusters listed: {e}");
                Vec::new()
            });
            for leaf in clusters {
                if !leaf.online {
                    continue;
                }
                // Names from the proxy go into a ProxyCommand (run by a shell) and Host lines.
                if config::ClusterName::new(leaf.name.as_str()).is_err() {
                    eprintln!(
                        "remoteler: skipping trusted cluster {:?}: not a valid cluster name",
                        leaf.name
                    );
                    continue;
                }
                let nodes = match block_on(client::list_nodes(&home, &profile, Some(&leaf.name)))? {
                    Ok(nodes) => nodes,
                    Err(e) => {
                        eprintln!("remoteler: skipping trusted cluster {}: {e}", leaf.name);
                        continue;
                    }
                };
                leaves.push(client::ssh::LeafHosts {
                    proxy_command: client::ssh::proxy_command(
                        &exe,
                        remoteler_home().as_deref(),
                        Some(&leaf.name),
                    ),
                    nodes: nodes
                        .into_iter()
                        .map(|n| n.name)
                        .filter(|n| config::NodeName::new(n.as_str()).is_ok())
                        .collect(),
                    host_ca: leaf_cas
                        .iter()
                        .find(|(name, _)| *name == leaf.name)
                        .map(|(_, ca)| ca.clone()),
                    cluster: leaf.name,
                });
            }
            let hint = match remoteler_home() {
                Some(dir) => dir.display().to_string(),
                None => "~/.remoteler".to_owned(),
            };
            let identity = home
                .ssh_identity()
                .map(|(key, cert)| (absolute(&key), absolute(&cert)));
            let known_hosts = match home.ssh_host_ca() {
                Some(ca) => Some(absolute(&home.write_known_hosts(
                    &client::ssh::known_hosts(&profile.cluster, &names, &ca, &leaves),
                )?)),
                None => {
                    eprintln!(
                        "remoteler: the proxy sent no SSH host CA at login; nodes' host keys \
                         are not verified by the cluster (log in again after upgrading the proxy)"
                    );
                    None
                }
            };
            let logins = if profile.ssh_logins.is_empty() {
                &profile.logins
            } else {
                &profile.ssh_logins
            };
            let user = match logins.as_slice() {
                [only] if config::NodeName::new(only.as_str()).is_ok() => Some(only.as_str()),
                _ => None,
            };
            print!(
                "{}",
                client::ssh::ssh_config(
                    &profile.cluster,
                    &names,
                    &proxy_command,
                    &hint,
                    identity.as_ref().map(|(k, c)| (k.as_path(), c.as_path())),
                    &leaves,
                    known_hosts.as_deref(),
                    user,
                )
            );
        }
    }
    Ok(())
}

/// ssh resolves relative identity paths against its own working directory, which may differ.
fn absolute(path: &std::path::Path) -> std::path::PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

fn current_exe() -> Result<std::path::PathBuf, ClientError> {
    std::env::current_exe()
        .map_err(|e| ClientError::msg(format!("cannot find the path of this program: {e}")))
}

/// The REMOTELER_HOME the user chose, made absolute (ssh may run the ProxyCommand elsewhere).
fn remoteler_home() -> Option<std::path::PathBuf> {
    let dir = std::env::var_os("REMOTELER_HOME").filter(|d| !d.is_empty())?;
    std::path::absolute(dir).ok()
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::SeqCst);
}

/// Ctrl-C and SIGTERM stop `forward` cleanly (the proxy sees the connection closed, not cut).
fn install_stop_handlers() {
    let handler = on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(signal, handler);
        }
    }
}

async fn stop_requested() {
    while !STOP.load(Ordering::SeqCst) {
        monoio::time::sleep(Duration::from_millis(100)).await;
    }
}
