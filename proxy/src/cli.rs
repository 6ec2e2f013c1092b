//! The command line: `init`, `start`, `tokens`, `users`, `nodes`, `clusters`, `status`,
//! `export`, `ssh-host-cert`, `audit`.

use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use argh::FromArgs;
use argon2::{Argon2, PasswordHasher};
use config::ProxyConfig;
use tunnel::identity::{CaPin, ClusterCa, FileRole, PrivateKey, TlsIdentity, Validity};

use crate::admin::{self, AdminClientError, AdminRequest, StatusView};
use crate::datadir::DataDir;
use crate::directory::NodeRecord;
use crate::error::ProxyError;
use crate::roles::Policy;
use crate::sshca::{SshHostCa, SshUserCa};
use crate::state::UserRevocation;
use crate::state::{StateStore, Token, TokenKind, User};
use crate::util;

/// Lifetime of the proxy's own server certificate.
const PROXY_CERT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Longest join token lifetime.
const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// remoteler-proxy: the Remoteler proxy appliance.
#[derive(FromArgs, Debug)]
pub struct Args {
    #[argh(subcommand)]
    command: Command,
}

impl Args {
    /// Whether this runs the proxy itself (a long-lived server), not a one-shot command.
    pub fn is_server(&self) -> bool {
        matches!(self.command, Command::Start(_))
    }
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
enum Command {
    Init(InitArgs),
    Start(StartArgs),
    Tokens(TokensArgs),
    Users(UsersArgs),
    Nodes(NodesArgs),
    Clusters(ClustersArgs),
    Status(StatusArgs),
    Export(ExportArgs),
    SshHostCert(SshHostCertArgs),
    Audit(AuditArgs),
}

/// SSH host certificates for nodes whose agent does not ask for one itself (static
/// `[[nodes]]`, or a node without an agent).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "ssh-host-cert")]
struct SshHostCertArgs {
    #[argh(subcommand)]
    command: SshHostCertCommand,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
enum SshHostCertCommand {
    Sign(SshHostCertSignArgs),
}

/// Sign an sshd's host public key as node NAME (principals NAME and NAME.CLUSTER); put the
/// result where that sshd's `HostCertificate` points.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "sign")]
struct SshHostCertSignArgs {
    /// the node's name, as users type it after `ssh`
    #[argh(option)]
    node: String,
    /// the sshd's host public key, e.g. a copy of /etc/ssh/ssh_host_ed25519_key.pub
    #[argh(option)]
    host_key: PathBuf,
    /// where to write the certificate (mode 0644, atomically); default: standard output
    #[argh(option)]
    out: Option<PathBuf>,
    /// lifetime, e.g. 30d or 365d (default 30d); sign again before it ends
    #[argh(option)]
    ttl: Option<String>,
    /// data directory (default /var/lib/remoteler)
    #[argh(option)]
    data_dir: Option<PathBuf>,
    /// configuration file to take data_dir from
    #[argh(option)]
    config: Option<PathBuf>,
}

/// Print the cluster's public keys for other programs: ssh-user-ca (the line for sshd's
/// TrustedUserCAKeys), ssh-host-ca (the @cert-authority line for ssh's known_hosts).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "export")]
struct ExportArgs {
    /// what to print: ssh-user-ca or ssh-host-ca
    #[argh(positional)]
    what: String,
    /// data directory (default /var/lib/remoteler)
    #[argh(option)]
    data_dir: Option<PathBuf>,
    /// configuration file to take data_dir from
    #[argh(option)]
    config: Option<PathBuf>,
}

/// Read the audit log: a table, or the raw JSON lines with --json.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "audit")]
struct AuditArgs {
    /// only records since then: a duration back from now (1h, 30m) or an RFC 3339 time
    #[argh(option)]
    since: Option<String>,
    /// only this event: login, session.start, session.end, access.denied, join, ...
    #[argh(option)]
    event: Option<String>,
    /// only records of this user
    #[argh(option)]
    user: Option<String>,
    /// print the records as they are in the log, one JSON object per line
    #[argh(switch)]
    json: bool,
    /// data directory whose audit.log to read (default /var/lib/remoteler)
    #[argh(option)]
    data_dir: Option<PathBuf>,
    /// configuration file: its audit.path is read
    #[argh(option)]
    config: Option<PathBuf>,
}

/// Create a cluster: data directory, CA, the proxy's certificate, an empty state file.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "init")]
struct InitArgs {
    /// cluster name, e.g. example.com (goes into every certificate)
    #[argh(option)]
    cluster: String,
    /// data directory (default /var/lib/remoteler)
    #[argh(option)]
    data_dir: Option<PathBuf>,
    /// a host name or address agents and users dial, for the proxy certificate (repeat)
    #[argh(option)]
    host: Vec<String>,
}

/// Run the proxy.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "start")]
struct StartArgs {
    /// configuration file (TOML)
    #[argh(option)]
    config: Option<PathBuf>,
    /// data directory (overrides the file's data_dir)
    #[argh(option)]
    data_dir: Option<PathBuf>,
    /// users' listener address (overrides listen.users)
    #[argh(option)]
    users: Option<SocketAddr>,
    /// tunnels' listener address (overrides listen.tunnels)
    #[argh(option)]
    tunnels: Option<SocketAddr>,
    /// auth listener address (overrides listen.auth)
    #[argh(option)]
    auth: Option<SocketAddr>,
    /// worker threads, one monoio runtime each (overrides workers; 0 = one per core)
    #[argh(option)]
    workers: Option<u16>,
    /// address for Prometheus metrics, or "off" (overrides listen.metrics)
    #[argh(option)]
    metrics: Option<String>,
}

/// Manage join tokens.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "tokens")]
struct TokensArgs {
    #[argh(subcommand)]
    command: TokensCommand,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
enum TokensCommand {
    Add(TokensAdd),
    Ls(TokensLs),
    Rm(TokensRm),
}

/// Create a join token.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "add")]
struct TokensAdd {
    /// what the token is for: node, or trusted-cluster (a leaf cluster's proxy joining)
    #[argh(option)]
    kind: String,
    /// lifetime, e.g. 15m, 1h (default 15m)
    #[argh(option, default = "String::from(\"15m\")")]
    ttl: String,
    /// how many joins it allows (default 1)
    #[argh(option, default = "1")]
    uses: u32,
    /// node tokens: the only node name the token may join as; `*` stands for any characters
    /// (`edge-*`). Without it the token may join as any name that is free
    #[argh(option)]
    node: Option<String>,
    /// let the join take over a name that is taken: a static node, one with a tunnel, a node
    /// joined with another key, a leaf cluster joined with another CA
    #[argh(switch)]
    replace: bool,
    /// the proxy's tunnel address for the printed agent command (default: first --host of
    /// init, with the port of listen.tunnels from --config, else of the running proxy, else
    /// 3024)
    #[argh(option)]
    proxy: Option<String>,
    /// data directory (default /var/lib/remoteler)
    #[argh(option)]
    data_dir: Option<PathBuf>,
    /// configuration file to take data_dir from
    #[argh(option)]
    config: Option<PathBuf>,
}

/// List join tokens (never their secrets).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "ls")]
struct TokensLs {
    /// data directory (default /var/lib/remoteler)
    #[argh(option)]
    data_dir: Option<PathBuf>,
    /// configuration file to take data_dir from
    #[argh(option)]
    config: Option<PathBuf>,
}

/// Delete a join token.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "rm")]
struct TokensRm {
    /// token id, as `tokens ls` shows it
    #[argh(positional)]
    id: String,
    /// data directory (default /var/lib/remoteler)
    #[argh(option)]
    data_dir: Option<PathBuf>,
    /// configuration file to take data_dir from
    #[argh(option)]
    config: Option<PathBuf>,
}

/// Manage users.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "users")]
struct UsersArgs {
    #[argh(subcommand)]
    command: UsersCommand,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
enum UsersCommand {
    Add(UsersAdd),
    Ls(UsersLs),
    Rm(UsersRm),
    Lock(UsersLock),
    Unlock(UsersUnlock),
}

/// Add a user.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "add")]
struct UsersAdd {
    /// user name
    #[argh(positional)]
    name: String,
    /// roles, comma-separated: dev,ops
    #[argh(option)]
    roles: String,
    /// OS logins the user may use, comma-separated: root,ubuntu
    #[argh(option, default = "String::new()")]
    logins: String,
    /// read the password from this file (first line) instead of asking on the terminal
    #[argh(option)]
    password_file: Option<PathBuf>,
    /// data directory (default /var/lib/remoteler)
    #[argh(option)]
    data_dir: Option<PathBuf>,
    /// configuration file to take data_dir from
    #[argh(option)]
    config: Option<PathBuf>,
}

/// List users.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "ls")]
struct UsersLs {
    /// data directory (default /var/lib/remoteler)
    #[argh(option)]
    data_dir: Option<PathBuf>,
    /// configuration file to take data_dir from
    #[argh(option)]
    config: Option<PathBuf>,
}

/// Lock a user: no login, their certificates are refused and a running proxy ends their
/// sessions within a second, until `users unlock`.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "lock")]
struct UsersLock {
    /// user name
    #[argh(positional)]
    name: String,
    /// data directory (default /var/lib/remoteler)
    #[argh(option)]
    data_dir: Option<PathBuf>,
    /// configuration file to take data_dir from
    #[argh(option)]
    config: Option<PathBuf>,
}

/// Unlock a user locked with `users lock` or locked out after failed logins; certificates
/// issued before a lock stay refused (the user logs in again).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "unlock")]
struct UsersUnlock {
    /// user name
    #[argh(positional)]
    name: String,
    /// data directory (default /var/lib/remoteler)
    #[argh(option)]
    data_dir: Option<PathBuf>,
    /// configuration file to take data_dir from
    #[argh(option)]
    config: Option<PathBuf>,
}

/// Remove a user: their certificates are refused and a running proxy ends their sessions
/// within a second.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "rm")]
struct UsersRm {
    /// user name
    #[argh(positional)]
    name: String,
    /// data directory (default /var/lib/remoteler)
    #[argh(option)]
    data_dir: Option<PathBuf>,
    /// configuration file to take data_dir from
    #[argh(option)]
    config: Option<PathBuf>,
}

/// Nodes, as the running proxy sees them.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "nodes")]
struct NodesArgs {
    #[argh(subcommand)]
    command: NodesCommand,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
enum NodesCommand {
    Ls(NodesLs),
    Rm(NodesRm),
}

/// Remove a node: its certificate is refused from now on, a running proxy closes its tunnel
/// within a second and forgets it. It can join again with a new token.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "rm")]
struct NodesRm {
    /// the node's name
    #[argh(positional)]
    name: String,
    /// data directory (default /var/lib/remoteler)
    #[argh(option)]
    data_dir: Option<PathBuf>,
    /// configuration file to take data_dir from
    #[argh(option)]
    config: Option<PathBuf>,
}

/// List nodes: name, via, online, labels, address.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "ls")]
struct NodesLs {
    /// data directory (default /var/lib/remoteler)
    #[argh(option)]
    data_dir: Option<PathBuf>,
    /// configuration file (data_dir, and the static nodes shown when the proxy is down)
    #[argh(option)]
    config: Option<PathBuf>,
}

/// Trusted leaf clusters, as the running (root) proxy sees them.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "clusters")]
struct ClustersArgs {
    #[argh(subcommand)]
    command: ClustersCommand,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
enum ClustersCommand {
    Ls(ClustersLs),
    Rm(ClustersRm),
}

/// Stop trusting a leaf cluster: its tunnels are closed within seconds, and it cannot connect
/// again without a new join (a new trusted-cluster token).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "rm")]
struct ClustersRm {
    /// the leaf cluster's name
    #[argh(positional)]
    name: String,
    /// data directory (default /var/lib/remoteler)
    #[argh(option)]
    data_dir: Option<PathBuf>,
    /// configuration file to take data_dir from
    #[argh(option)]
    config: Option<PathBuf>,
}

/// List trusted leaf clusters: name, online, connected since, last heartbeat, nodes.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "ls")]
struct ClustersLs {
    /// print JSON instead of a table
    #[argh(switch)]
    json: bool,
    /// data directory (default /var/lib/remoteler)
    #[argh(option)]
    data_dir: Option<PathBuf>,
    /// configuration file to take data_dir from
    #[argh(option)]
    config: Option<PathBuf>,
}

/// The running proxy's state: cluster, CA pin, listeners, tunnels, sessions, uptime.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "status")]
struct StatusArgs {
    /// data directory (default /var/lib/remoteler)
    #[argh(option)]
    data_dir: Option<PathBuf>,
    /// configuration file to take data_dir from
    #[argh(option)]
    config: Option<PathBuf>,
}

/// Runs a parsed command line.
pub fn run(args: Args) -> Result<(), ProxyError> {
    match args.command {
        Command::Init(a) => init(a),
        Command::Start(a) => start(a),
        Command::Tokens(t) => match t.command {
            TokensCommand::Add(a) => tokens_add(a),
            TokensCommand::Ls(a) => tokens_ls(&data_dir(a.data_dir, a.config.as_deref())?),
            TokensCommand::Rm(a) => tokens_rm(&data_dir(a.data_dir, a.config.as_deref())?, &a.id),
        },
        Command::Users(u) => match u.command {
            UsersCommand::Add(a) => users_add(a),
            UsersCommand::Ls(a) => users_ls(&data_dir(a.data_dir, a.config.as_deref())?),
            UsersCommand::Rm(a) => users_rm(&data_dir(a.data_dir, a.config.as_deref())?, &a.name),
            UsersCommand::Lock(a) => {
                users_lock(&data_dir(a.data_dir, a.config.as_deref())?, &a.name, true)
            }
            UsersCommand::Unlock(a) => {
                users_lock(&data_dir(a.data_dir, a.config.as_deref())?, &a.name, false)
            }
        },
        Command::Nodes(n) => match n.command {
            NodesCommand::Ls(a) => nodes_ls(a),
            NodesCommand::Rm(a) => nodes_rm(a),
        },
        Command::Clusters(c) => match c.command {
            ClustersCommand::Ls(a) => clusters_ls(a),
            ClustersCommand::Rm(a) => {
                clusters_rm(&data_dir(a.data_dir, a.config.as_deref())?, &a.name)
            }
        },
        Command::Status(a) => status(&data_dir(a.data_dir, a.config.as_deref())?),
        Command::Export(a) => export(a),
        Command::SshHostCert(c) => match c.command {
            SshHostCertCommand::Sign(a) => ssh_host_cert_sign(a),
        },
        Command::Audit(a) => audit(a),
    }
}

fn data_dir(explicit: Option<PathBuf>, config: Option<&Path>) -> Result<DataDir, ProxyError> {
    if let Some(dir) = explicit {
        return Ok(DataDir::new(dir));
    }
    if let Some(path) = config {
        return Ok(DataDir::new(ProxyConfig::load(path)?.data_dir));
    }
    Ok(DataDir::new(config::DEFAULT_PROXY_DATA_DIR))
}

fn list(text: &str, what: &'static str) -> Result<Vec<String>, ProxyError> {
    let items: Vec<String> = text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    for item in &items {
        tunnel::identity::validate_name(what, item)?;
    }
    Ok(items)
}

fn ca_pin(data: &DataDir) -> Result<CaPin, ProxyError> {
    let certs = tunnel::identity::read_certificates(
        &data.ca_cert(),
        tunnel::identity::FileRole::CaCertificate,
    )?;
    let cert = certs.first().ok_or_else(|| {
        ProxyError::Other(format!("{} holds no certificate", data.ca_cert().display()))
    })?;
    Ok(CaPin::of_certificate(cert)?)
}

// ---- init -----------------------------------------------------------------------------------

fn init(args: InitArgs) -> Result<(), ProxyError> {
    let cluster = config::ClusterName::new(args.cluster.as_str())
        .map_err(|e| ProxyError::Usage(format!("--cluster: {e}")))?;
    let data = DataDir::new(
        args.data_dir
            .unwrap_or_else(|| PathBuf::from(config::DEFAULT_PROXY_DATA_DIR)),
    );
    for existing in [
        data.ca_key(),
        data.ca_cert(),
        data.proxy_key(),
        data.state(),
    ] {
        if existing.exists() {
            return Err(ProxyError::Other(format!(
                "{} already holds a cluster ({} exists); refusing to overwrite it. Use another \
                 --data-dir, or move the directory away if you really mean to start over \
                 (every agent and user would have to join again)",
                data.root().display(),
                existing.display()
            )));
        }
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data.root())
        .map_err(|e| ProxyError::io("cannot create the data directory", data.root(), e))?;
    let ca = ClusterCa::generate(cluster.as_str())?;
    ca.save(data.root())?;
    let key = PrivateKey::generate()?;
    let validity = Validity::for_ttl(SystemTime::now(), PROXY_CERT_TTL)?;
    let leaf = ca.issue_proxy("proxy", &args.host, &key.public_key(), validity)?;
    let identity = TlsIdentity {
        chain: ca.chain(leaf),
        key,
    };
    identity.save(&data.proxy_cert(), &data.proxy_key())?;
    SshUserCa::generate(cluster.as_str())?.save(data.root())?;
    SshHostCa::generate(cluster.as_str())?.save(data.root())?;
    StateStore::new(data.clone()).create(cluster.as_str(), &args.host)?;

    let dir = data.root().display();
    println!("Created cluster {cluster} in {dir}");
    println!("CA pin: {}", ca.pin());
    println!(
        "SSH user CA (for sshd's TrustedUserCAKeys): remoteler-proxy export ssh-user-ca --data-dir {dir}"
    );
    println!(
        "SSH host CA (for ssh's known_hosts; `remoteler config` writes it): remoteler-proxy export ssh-host-ca --data-dir {dir}"
    );
    println!();
    println!("Next steps:");
    println!("  remoteler-proxy start --data-dir {dir}");
    println!("  remoteler-proxy users add alice --roles access --logins root --data-dir {dir}");
    println!("  remoteler-proxy tokens add --kind node --ttl 15m --data-dir {dir}");
    Ok(())
}

// ---- start ----------------------------------------------------------------------------------

fn start(args: StartArgs) -> Result<(), ProxyError> {
    let mut config = match &args.config {
        Some(path) => {
            let mut config = ProxyConfig::load(path)?;
            if let Some(dir) = &args.data_dir {
                let default_audit = config.data_dir.join(config::DEFAULT_AUDIT_FILE);
                if config.audit.path == default_audit {
                    config.audit.path = dir.join(config::DEFAULT_AUDIT_FILE);
                }
                config.data_dir = dir.clone();
            }
            config
        }
        None => {
            let dir = args
                .data_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(config::DEFAULT_PROXY_DATA_DIR));
            let ca = ClusterCa::load(&dir)?;
            let name = config::ClusterName::new(ca.cluster()).map_err(|e| {
                ProxyError::Other(format!("the CA's cluster name is not usable: {e}"))
            })?;
            ProxyConfig::with_data_dir(name, dir)
        }
    };
    if let Some(a) = args.users {
        config.listen.users = a;
    }
    if let Some(a) = args.tunnels {
        config.listen.tunnels = a;
    }
    if let Some(a) = args.auth {
        config.listen.auth = a;
    }
    if let Some(m) = args.metrics {
        config.listen.metrics = match m.trim() {
            "off" | "" => config::MetricsListen::Disabled,
            text => config::MetricsListen::Listen(text.parse().map_err(|e| {
                ProxyError::Usage(format!(
                    "--metrics: expected an address such as 127.0.0.1:3026, or \"off\": {e}"
                ))
            })?),
        };
    }
    if let Some(n) = args.workers {
        config.workers =
            std::num::NonZeroU16::new(n).map_or(config::Workers::AllCores, config::Workers::Count);
    }
    crate::logging::init(&config.log);
    let shutdown = crate::Shutdown::new();
    crate::shutdown::install_signal_handler(shutdown.clone())
        .map_err(|e| ProxyError::Other(format!("cannot install the signal handler: {e}")))?;
    let listeners = crate::Listeners::bind(&config)?;
    crate::run(config, listeners, shutdown)
}

// ---- tokens ---------------------------------------------------------------------------------

/// The tunnels listener's port agents and leaves should dial, and where it came from:
/// `listen.tunnels` of the configuration file the command was given, else the port the running
/// proxy of the data directory listens on (its ready file), else the default.
fn tunnel_port(config: Option<&ProxyConfig>, data: &DataDir) -> (u16, String) {
    if let Some(config) = config {
        return (
            config.listen.tunnels.port(),
            "listen.tunnels of the configuration file".into(),
        );
    }
    let running = std::fs::read_to_string(data.ready_file())
        .ok()
        .and_then(|ready| {
            ready
                .split_whitespace()
                .find_map(|w| w.strip_prefix("tunnels="))
                .and_then(|a| a.parse::<SocketAddr>().ok())
        });
    if let Some(addr) = running {
        return (
            addr.port(),
            format!(
                "the running proxy's tunnel listener ({})",
                data.ready_file().display()
            ),
        );
    }
    let default = config::DEFAULT_TUNNEL_LISTEN
        .parse::<SocketAddr>()
        .map_or(3024, |a| a.port());
    (
        default,
        "the default listen.tunnels; pass --config to use the proxy's own".into(),
    )
}

fn tokens_add(args: TokensAdd) -> Result<(), ProxyError> {
    let config = args.config.as_deref().map(ProxyConfig::load).transpose()?;
    let data = match (&args.data_dir, &config) {
        (Some(dir), _) => DataDir::new(dir),
        (None, Some(config)) => DataDir::new(&config.data_dir),
        (None, None) => DataDir::new(config::DEFAULT_PROXY_DATA_DIR),
    };
    let kind = match args.kind.as_str() {
        "node" => TokenKind::Node,
        "trusted-cluster" => TokenKind::TrustedCluster,
        other => {
            return Err(ProxyError::Usage(format!(
                "--kind: unknown token kind {other:?}; this version knows: node, trusted-cluster"
            )));
        }
    };
    let ttl =
        config::parse_duration(&args.ttl).map_err(|e| ProxyError::Usage(format!("--ttl: {e}")))?;
    if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
        return Err(ProxyError::Usage(format!(
            "--ttl: expected a duration from 1s to 30 days, found {:?}",
            args.ttl
        )));
    }
    if args.uses == 0 {
        return Err(ProxyError::Usage("--uses: expected at least 1".into()));
    }
    if let Some(pattern) = &args.node {
        if kind != TokenKind::Node {
            return Err(ProxyError::Usage(
                "--node: only node tokens are bound to a node name".into(),
            ));
        }
        // Every character but `*` must be one a node name may hold.
        let literal = pattern.replace('*', "a");
        config::NodeName::new(literal.as_str())
            .map_err(|e| ProxyError::Usage(format!("--node {pattern:?}: {e}")))?;
    }
    let random = |what: &str| ProxyError::Other(format!("cannot get random bytes for the {what}"));
    let secret = util::to_hex(&util::random_bytes::<32>().map_err(|_| random("token"))?);
    let id = util::to_hex(&util::random_bytes::<4>().map_err(|_| random("token id"))?);
    let now = util::unix_now();
    let token = Token {
        id: id.clone(),
        kind,
        secret_sha256: util::sha256_hex(secret.as_bytes()),
        created_unix: now,
        expires_unix: now + ttl.as_secs(),
        uses_left: args.uses,
        node: args.node.clone(),
        replace: args.replace,
    };
    let store = StateStore::new(data.clone());
    let (hosts, cluster) = store.update(|state| {
        state.tokens.push(token);
        Ok::<_, ProxyError>((state.hosts.clone(), state.cluster.clone()))
    })?;
    let pin = ca_pin(&data)?;
    let (port, port_from) = tunnel_port(config.as_ref(), &data);
    let (proxy, proxy_from) = match args.proxy {
        Some(p) => (p, "--proxy".to_owned()),
        None => {
            let host = match hosts.first() {
                Some(h) if h.contains(':') && !h.starts_with('[') => format!("[{h}]"),
                Some(h) => h.clone(),
                None => "PROXY_HOST".into(),
            };
            (
                format!("{host}:{port}"),
                format!("host from init --host, port from {port_from}"),
            )
        }
    };
    println!("token: {secret}");
    println!("id: {id}");
    println!(
        "kind: {}, uses: {}, expires: {} (in {}){}{}",
        kind.as_str(),
        args.uses,
        util::rfc3339_unix(now + ttl.as_secs()),
        util::human_duration(ttl),
        args.node
            .as_deref()
            .map(|n| format!(", node: {n}"))
            .unwrap_or_default(),
        if args.replace {
            ", may replace a taken name"
        } else {
            ""
        }
    );
    println!("ca pin: {pin}");
    println!("proxy: {proxy} ({proxy_from})");
    println!();
    // The token goes into a file, never onto a command line (`ps` shows those to every user
    // of the machine) nor into a configuration file others may read.
    if kind == TokenKind::TrustedCluster {
        let file = format!("{}/trusted-{cluster}.token", config::DEFAULT_PROXY_DATA_DIR);
        println!(
            "The token is shown only now. On the leaf cluster's proxy, store it in a file only the \
             proxy's user can read (paste the token, then Ctrl-D):"
        );
        println!("  (umask 077; cat > {file})");
        println!("and add to the leaf's proxy configuration:");
        println!("  [[trusted_clusters]]");
        println!("  name = \"{cluster}\"");
        println!("  proxy = \"{proxy}\"");
        println!("  token_file = \"{file}\"");
        println!("  ca_pin = \"{pin}\"");
        println!(
            "  # Least privilege: map only the roles of this (root) cluster that need the leaf, each"
        );
        println!(
            "  # to a leaf role made for them (here root role \"dev\" to leaf role \"dev\"); a root"
        );
        println!(
            "  # user none of whose roles maps gets nothing. Never map \"*\" to a broad role."
        );
        println!("  role_map = [{{ remote = \"dev\", local = [\"dev\"] }}]");
        println!("and restart the leaf proxy; it joins once and keeps a tunnel to this proxy.");
        return Ok(());
    }
    let file = format!("{}/join-token", config::DEFAULT_AGENT_DATA_DIR);
    let node_name = args
        .node
        .as_deref()
        .filter(|n| !n.contains('*'))
        .unwrap_or("NODE_NAME");
    println!(
        "The token is shown only now. On the node, store it in a file only the agent's user can \
         read (paste the token, then Ctrl-D):"
    );
    println!(
        "  (umask 077; mkdir -p {}; cat > {file})",
        config::DEFAULT_AGENT_DATA_DIR
    );
    println!("then start the agent:");
    println!(
        "  remoteler-agent start --proxy {proxy} --ca-pin {pin} --token-file {file} --node-name {node_name}"
    );
    Ok(())
}

fn tokens_ls(data: &DataDir) -> Result<(), ProxyError> {
    let state = StateStore::new(data.clone()).read()?;
    let now = util::unix_now();
    println!(
        "{:<10} {:<15} {:<26} {:<9} {:<8} NODE",
        "ID", "KIND", "EXPIRES", "USES-LEFT", "STATUS"
    );
    for t in &state.tokens {
        let status = if now >= t.expires_unix {
            "expired"
        } else if t.uses_left == 0 {
            "used up"
        } else {
            "valid"
        };
        // Which names it may join as, and whether it may take over a taken one.
        let node = match (t.node.as_deref(), t.replace) {
            (Some(n), true) => format!("{n} (replace)"),
            (Some(n), false) => n.to_owned(),
            (None, true) => "any (replace)".to_owned(),
            (None, false) => "-".to_owned(),
        };
        println!(
            "{:<10} {:<15} {:<26} {:<9} {status:<8} {node}",
            t.id,
            t.kind.as_str(),
            util::rfc3339_unix(t.expires_unix),
            t.uses_left
        );
    }
    Ok(())
}

fn tokens_rm(data: &DataDir, id: &str) -> Result<(), ProxyError> {
    StateStore::new(data.clone()).update(|state| {
        let before = state.tokens.len();
        state.tokens.retain(|t| t.id != id);
        if state.tokens.len() == before {
            return Err(ProxyError::Usage(format!(
                "no token with id {id:?}; `remoteler-proxy tokens ls` lists them"
            )));
        }
        Ok(())
    })?;
    println!("token {id} removed");
    Ok(())
}

// ---- users ----------------------------------------------------------------------------------

fn read_password(file: Option<&Path>) -> Result<String, ProxyError> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ProxyError::io("cannot read the password file", path, e))?;
        let password = text.lines().next().unwrap_or("").to_owned();
        if password.is_empty() {
            return Err(ProxyError::Usage(format!(
                "{}: the first line is empty; put the password on it",
                path.display()
            )));
        }
        return Ok(password);
    }
    // SAFETY: isatty on a constant descriptor.
    if unsafe { libc::isatty(0) } != 1 {
        return Err(ProxyError::Usage(
            "no terminal to ask for the password on; pass --password-file FILE".into(),
        ));
    }
    let first = rpassword::prompt_password("Password: ")
        .map_err(|e| ProxyError::Other(format!("cannot read the password: {e}")))?;
    let second = rpassword::prompt_password("Password (again): ")
        .map_err(|e| ProxyError::Other(format!("cannot read the password: {e}")))?;
    if first != second {
        return Err(ProxyError::Usage(
            "the two passwords differ; nothing was changed".into(),
        ));
    }
    if first.is_empty() {
        return Err(ProxyError::Usage(
            "the password is empty; nothing was changed".into(),
        ));
    }
    Ok(first)
}

fn users_add(args: UsersAdd) -> Result<(), ProxyError> {
    let data = data_dir(args.data_dir, args.config.as_deref())?;
    tunnel::identity::validate_name("user name", &args.name)?;
    let roles = list(&args.roles, "role")?;
    let logins = list(&args.logins, "login")?;
    check_roles(&roles, args.config.as_deref())?;
    // Fail before asking for a password if the cluster or the user is not right.
    let store = StateStore::new(data);
    if store.read()?.user(&args.name).is_some() {
        return Err(ProxyError::Usage(format!(
            "user {} already exists; remove it first with `remoteler-proxy users rm {}`",
            args.name, args.name
        )));
    }
    let password = read_password(args.password_file.as_deref())?;
    let hash = Argon2::default()
        .hash_password(password.as_bytes())
        .map_err(|e| ProxyError::Other(format!("cannot hash the password: {e}")))?
        .to_string();
    let user = User {
        name: args.name.clone(),
        roles: roles.clone(),
        logins: logins.clone(),
        password_hash: hash,
        created_unix: util::unix_now(),
        locked_unix: None,
        unlocked_unix: None,
    };
    store.update(|state| {
        if state.user(&user.name).is_some() {
            return Err(ProxyError::Usage(format!(
                "user {} already exists",
                user.name
            )));
        }
        state.users.push(user);
        Ok(())
    })?;
    println!(
        "user {} added (roles: {}; logins: {})",
        args.name,
        roles.join(","),
        if logins.is_empty() {
            "none".into()
        } else {
            logins.join(",")
        }
    );
    Ok(())
}

/// Roles are defined in the configuration file: with `--config`, a role it does not define is
/// refused (such a user would get nothing); without it, only the built-in role can be checked,
/// and any other is accepted with a warning.
fn check_roles(roles: &[String], config: Option<&Path>) -> Result<(), ProxyError> {
    if roles.is_empty() {
        return Err(ProxyError::Usage(format!(
            "--roles: no role given; a user without roles can reach nothing. The built-in role \
             {:?} reaches every node with the user's --logins",
            config::BUILTIN_ROLE
        )));
    }
    match config {
        Some(path) => {
            let policy = Policy::new(&ProxyConfig::load(path)?.roles);
            let unknown: Vec<&str> = roles
                .iter()
                .map(String::as_str)
                .filter(|r| !policy.knows(r))
                .collect();
            if !unknown.is_empty() {
                return Err(ProxyError::Usage(format!(
                    "--roles: {} not defined in {} (roles there: {}); add a [[roles]] entry \
                     first, or the user would get no access",
                    unknown.join(", "),
                    path.display(),
                    policy.names().join(", ")
                )));
            }
        }
        None => {
            for role in roles.iter().filter(|r| *r != config::BUILTIN_ROLE) {
                eprintln!(
                    "warning: role {role:?} is not the built-in role {:?}, and without --config \
                     it cannot be checked; unless the proxy's configuration defines it in \
                     [[roles]], it gives no access",
                    config::BUILTIN_ROLE
                );
            }
        }
    }
    Ok(())
}

fn users_ls(data: &DataDir) -> Result<(), ProxyError> {
    let state = StateStore::new(data.clone()).read()?;
    println!("{:<20} {:<24} {:<24} CREATED", "NAME", "ROLES", "LOGINS");
    for u in &state.users {
        let locked = u
            .locked_unix
            .map(|at| format!("  locked since {}", util::rfc3339_unix(at)))
            .unwrap_or_default();
        println!(
            "{:<20} {:<24} {:<24} {}{locked}",
            u.name,
            u.roles.join(","),
            u.logins.join(","),
            util::rfc3339_unix(u.created_unix)
        );
    }
    Ok(())
}

fn users_rm(data: &DataDir, name: &str) -> Result<(), ProxyError> {
    let now = util::unix_now();
    StateStore::new(data.clone()).update(|state| {
        let before = state.users.len();
        state.users.retain(|u| u.name != name);
        if state.users.len() == before {
            return Err(ProxyError::Usage(format!(
                "no user named {name:?}; `remoteler-proxy users ls` lists them"
            )));
        }
        state.revoke_user(name, now, UserRevocation::Removed);
        Ok(())
    })?;
    after_revocation_second(now);
    println!(
        "user {name} removed: their certificates are refused from now on and a running proxy \
         ends their sessions within a second. Adding the user again needs a new login."
    );
    Ok(())
}

/// `users lock` (`lock`) and `users unlock`.
fn users_lock(data: &DataDir, name: &str, lock: bool) -> Result<(), ProxyError> {
    let now = util::unix_now();
    StateStore::new(data.clone()).update(|state| {
        let Some(user) = state.users.iter_mut().find(|u| u.name == name) else {
            return Err(ProxyError::Usage(format!(
                "no user named {name:?}; `remoteler-proxy users ls` lists them"
            )));
        };
        if lock {
            user.locked_unix = Some(now);
            state.revoke_user(name, now, UserRevocation::Locked);
        } else {
            user.locked_unix = None;
            user.unlocked_unix = Some(now);
        }
        Ok(())
    })?;
    if lock {
        after_revocation_second(now);
        println!(
            "user {name} locked: no login, their certificates are refused from now on and a \
             running proxy ends their sessions within a second. `remoteler-proxy users unlock \
             {name}` lifts it."
        );
    } else {
        println!(
            "user {name} unlocked (an operator's lock and any lockout after failed logins); \
             certificates issued before a lock stay refused: the user runs `remoteler login` again"
        );
    }
    Ok(())
}

/// Waits for the second after `revoked_unix` (certificates carry whole seconds, and those
/// issued in the second of a revocation are refused), so that a login after this command
/// returns gets a certificate that is accepted.
fn after_revocation_second(revoked_unix: u64) {
    let next = std::time::UNIX_EPOCH + Duration::from_secs(revoked_unix + 1);
    if let Ok(wait) = next.duration_since(SystemTime::now()) {
        std::thread::sleep(wait);
    }
}

// ---- nodes, status --------------------------------------------------------------------------

fn print_nodes(nodes: &[NodeRecord]) {
    println!(
        "{:<24} {:<7} {:<7} {:<30} {:<24} SINCE",
        "NAME", "VIA", "ONLINE", "LABELS", "ADDRESS"
    );
    for n in nodes {
        let labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "{:<24} {:<7} {:<7} {:<30} {:<24} {}",
            n.name,
            n.via,
            if n.online { "yes" } else { "no" },
            if labels.is_empty() {
                "-".into()
            } else {
                labels.join(",")
            },
            n.address.as_deref().unwrap_or("-"),
            n.since_unix.map_or_else(|| "-".into(), util::rfc3339_unix)
        );
    }
}

fn nodes_rm(args: NodesRm) -> Result<(), ProxyError> {
    let name = config::NodeName::new(args.name.as_str())
        .map_err(|e| ProxyError::Usage(format!("node name: {e}")))?;
    let data = data_dir(args.data_dir, args.config.as_deref())?;
    let store = crate::state::StateStore::new(data);
    let now = util::unix_now();
    store.update(|state| {
        state.revoked_nodes.retain(|r| r.name != name.as_str());
        state.revoked_nodes.push(crate::state::RevokedNode {
            name: name.to_string(),
            revoked_unix: now,
        });
        // The name is free again: the next join may bring any key.
        state.node_keys.retain(|k| k.name != name.as_str());
        Ok::<(), ProxyError>(())
    })?;
    println!(
        "node {name} removed: its certificate is refused from now on; a running proxy closes its \
         tunnel within a second and forgets it. To bring it back, join it again with a new token \
         (remoteler-proxy tokens add --kind node)."
    );
    Ok(())
}

fn nodes_ls(args: NodesLs) -> Result<(), ProxyError> {
    let data = data_dir(args.data_dir, args.config.as_deref())?;
    match admin::ask::<Vec<NodeRecord>>(&data, AdminRequest::Nodes) {
        Ok(nodes) => {
            print_nodes(&nodes);
            Ok(())
        }
        Err(AdminClientError::NotRunning(path)) => {
            eprintln!(
                "the proxy is not running (nothing answers on {}); showing the static nodes of the configuration",
                path.display()
            );
            let nodes: Vec<NodeRecord> = match &args.config {
                Some(path) => ProxyConfig::load(path)?
                    .nodes
                    .iter()
                    .map(|n| NodeRecord {
                        name: n.name.to_string(),
                        via: "direct".into(),
                        online: false,
                        labels: n
                            .labels
                            .iter()
                            .map(|(k, v)| (k.to_owned(), v.to_owned()))
                            .collect(),
                        address: Some(n.address.to_string()),
                        since_unix: None,
                    })
                    .collect(),
                None => Vec::new(),
            };
            print_nodes(&nodes);
            Ok(())
        }
        Err(e) => Err(ProxyError::Other(e.to_string())),
    }
}

fn clusters_rm(data: &DataDir, name: &str) -> Result<(), ProxyError> {
    StateStore::new(data.clone()).update(|state| {
        let before = state.trusted_leaves.len();
        state.trusted_leaves.retain(|l| l.name != name);
        if state.trusted_leaves.len() == before {
            return Err(ProxyError::Usage(format!(
                "no trusted leaf cluster named {name:?}; `remoteler-proxy clusters ls` lists them"
            )));
        }
        Ok(())
    })?;
    println!("trusted cluster {name} removed; a running proxy closes its tunnels within seconds");
    Ok(())
}

fn clusters_ls(args: ClustersLs) -> Result<(), ProxyError> {
    let data = data_dir(args.data_dir, args.config.as_deref())?;
    let clusters: Vec<crate::directory::ClusterRecord> =
        admin::ask(&data, AdminRequest::Clusters).map_err(|e| ProxyError::Other(e.to_string()))?;
    if args.json {
        let text = serde_json::to_string_pretty(&clusters)
            .map_err(|e| ProxyError::Other(format!("cannot encode the cluster list: {e}")))?;
        println!("{text}");
        return Ok(());
    }
    println!(
        "{:<24} {:<7} {:<7} {:<7} {:<20} {:<20} PEER",
        "NAME", "ONLINE", "NODES", "TUNNELS", "SINCE", "LAST HEARTBEAT"
    );
    for c in clusters {
        println!(
            "{:<24} {:<7} {:<7} {:<7} {:<20} {:<20} {}",
            c.name,
            if c.online { "yes" } else { "no" },
            c.nodes,
            c.tunnels,
            c.since_unix.map_or_else(|| "-".into(), util::rfc3339_unix),
            c.last_heartbeat_unix
                .map_or_else(|| "-".into(), util::rfc3339_unix),
            if c.peers.is_empty() {
                "-".to_owned()
            } else {
                c.peers.join(",")
            }
        );
    }
    Ok(())
}

fn status(data: &DataDir) -> Result<(), ProxyError> {
    let s: StatusView =
        admin::ask(data, AdminRequest::Status).map_err(|e| ProxyError::Other(e.to_string()))?;
    println!("cluster:   {}", s.cluster);
    println!("ca pin:    {}", s.ca_pin);
    println!(
        "listeners: users={} tunnels={} auth={}",
        s.listeners.users, s.listeners.tunnels, s.listeners.auth
    );
    println!("tunnels:   {} up", s.tunnels_up);
    let per_core: Vec<String> = s.tunnels_per_core.iter().map(u64::to_string).collect();
    println!(
        "workers:   {} (tunnels per core: {}; {} connections moved to their node's core)",
        s.tunnels_per_core.len(),
        per_core.join(" "),
        s.handoffs
    );
    println!(
        "sessions:  {} active ({} since start)",
        s.sessions_active, s.sessions_total
    );
    println!(
        "uptime:    {}",
        util::human_duration(Duration::from_secs(s.uptime_secs))
    );
    println!("pid:       {}", s.pid);
    println!("version:   {}", s.version);
    if s.draining {
        println!("state:     draining");
    }
    Ok(())
}

// ---- export, audit --------------------------------------------------------------------------

fn export(args: ExportArgs) -> Result<(), ProxyError> {
    let data = data_dir(args.data_dir, args.config.as_deref())?;
    match args.what.as_str() {
        "ssh-user-ca" => {
            if !SshUserCa::path(data.root()).exists() {
                return Err(ProxyError::Other(format!(
                    "{} has no SSH user CA yet ({} is missing); this data directory predates SSH \
                     certificates: start the proxy once, it creates the key",
                    data.root().display(),
                    SshUserCa::path(data.root()).display()
                )));
            }
            let ca = ClusterCa::load(data.root())?;
            println!(
                "{}",
                SshUserCa::load(data.root(), ca.cluster())?.public_line()?
            );
            Ok(())
        }
        "ssh-host-ca" => {
            let ca = ClusterCa::load(data.root())?;
            println!("{}", load_host_ca(&data, ca.cluster())?.known_hosts_line()?);
            Ok(())
        }
        other => Err(ProxyError::Usage(format!(
            "export: unknown item {other:?}; this version exports: ssh-user-ca, ssh-host-ca"
        ))),
    }
}

fn load_host_ca(data: &DataDir, cluster: &str) -> Result<SshHostCa, ProxyError> {
    if !SshHostCa::path(data.root()).exists() {
        return Err(ProxyError::Other(format!(
            "{} has no SSH host CA yet ({} is missing); this data directory predates SSH host \
             certificates: start the proxy once, it creates the key",
            data.root().display(),
            SshHostCa::path(data.root()).display()
        )));
    }
    SshHostCa::load(data.root(), cluster)
}

fn ssh_host_cert_sign(args: SshHostCertSignArgs) -> Result<(), ProxyError> {
    let data = data_dir(args.data_dir, args.config.as_deref())?;
    let ttl = match &args.ttl {
        None => crate::sshca::HOST_CERT_TTL,
        Some(text) => {
            config::parse_duration(text).map_err(|e| ProxyError::Usage(format!("--ttl: {e}")))?
        }
    };
    let host_key = std::fs::read_to_string(&args.host_key)
        .map_err(|e| ProxyError::io("cannot read the host key", &args.host_key, e))?;
    let ca = ClusterCa::load(data.root())?;
    let host_ca = load_host_ca(&data, ca.cluster())?;
    let cert = host_ca
        .issue_host(&host_key, &args.node, SystemTime::now(), ttl)
        .map_err(|e| ProxyError::Usage(format!("{}: {e}", args.host_key.display())))?;
    let line = format!("{}\n", cert.line);
    match &args.out {
        Some(out) => {
            tunnel::identity::write_public_file(out, line.as_bytes(), FileRole::Certificate)?;
            eprintln!(
                "wrote {} (principals {}, valid until {}); sshd_config: HostCertificate {}",
                out.display(),
                cert.principals.join(", "),
                humantime::format_rfc3339_seconds(cert.not_after),
                out.display()
            );
        }
        None => print!("{line}"),
    }
    Ok(())
}

fn audit(args: AuditArgs) -> Result<(), ProxyError> {
    let path = match (&args.config, &args.data_dir) {
        (Some(config), None) => ProxyConfig::load(config)?.audit.path,
        _ => data_dir(args.data_dir, None)?
            .root()
            .join(config::DEFAULT_AUDIT_FILE),
    };
    let since = args
        .since
        .as_deref()
        .map(|text| crate::audit::parse_since(text, SystemTime::now()))
        .transpose()
        .map_err(|e| ProxyError::Usage(format!("--since: {e}")))?;
    let filter = crate::audit::Filter {
        since,
        event: args.event,
        user: args.user,
    };
    let file = std::fs::File::open(&path)
        .map_err(|e| ProxyError::io("cannot open the audit log", &path, e))?;
    let (records, skipped) = crate::audit::read(std::io::BufReader::new(file), &filter)
        .map_err(|e| ProxyError::io("cannot read the audit log", &path, e))?;
    for s in &skipped {
        eprintln!(
            "warning: {}:{}: skipped: {}",
            path.display(),
            s.line,
            s.reason
        );
    }
    if args.json {
        for r in &records {
            println!("{}", r.line);
        }
    } else {
        println!("{}", crate::audit::TABLE_HEADER);
        for r in &records {
            println!("{}", crate::audit::table_row(r));
        }
    }
    Ok(())
}
