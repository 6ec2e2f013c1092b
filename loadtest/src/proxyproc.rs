//! The real `remoteler-proxy` under test: a cluster created with `init` in a work
//! directory, a config file the harness writes (ports, keepalive), `start` as a child
//! process, tokens and users made with the CLI, and `status` read back.

use std::fs::{File, OpenOptions};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::procfs;

/// How long `start` may take to write `proxy.ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Settings written into the proxy's config file.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// `[keepalive] interval`.
    pub keepalive: Duration,
    /// `[keepalive] count`.
    pub keepalive_count: u32,
    /// `[log] level`.
    pub log_level: String,
    /// `[limits] max_streams_per_tunnel`.
    pub max_streams_per_tunnel: u32,
    /// `workers` (0: one per core).
    pub workers: u16,
}

/// A proxy process and its cluster.
#[derive(Debug)]
pub struct ProxyProcess {
    bin: PathBuf,
    data_dir: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
    /// Users' listener.
    pub users: SocketAddr,
    /// Tunnels' listener.
    pub tunnels: SocketAddr,
    /// CA pin.
    pub ca_pin: String,
}

fn free_port() -> anyhow::Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("probe a free port")?;
    Ok(l.local_addr()?)
}

fn run_cli(bin: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {} {}", bin.display(), args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{} {} failed ({}): {}",
            bin.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl ProxyProcess {
    /// `init` a cluster in `work/data` and write `work/proxy.toml`.
    pub fn create(bin: &Path, work: &Path, settings: &ProxySettings) -> anyhow::Result<Self> {
        if !bin.exists() {
            bail!(
                "no proxy binary at {}; build it with `cargo build --release -p proxy` or pass --proxy-bin",
                bin.display()
            );
        }
        let data_dir = work.join("data");
        let data = data_dir.to_string_lossy().into_owned();
        let out = run_cli(
            bin,
            &[
                "init",
                "--cluster",
                "loadtest.local",
                "--data-dir",
                &data,
                "--host",
                "127.0.0.1",
            ],
        )?;
        let ca_pin = out
            .lines()
            .find_map(|l| l.strip_prefix("CA pin: "))
            .context("`init` printed no CA pin")?
            .trim()
            .to_owned();
        let (users, tunnels, auth) = (free_port()?, free_port()?, free_port()?);
        let config_path = work.join("proxy.toml");
        let config = format!(
            "cluster_name = \"loadtest.local\"\n\
             data_dir = {data:?}\n\
             workers = {}\n\
             \n[listen]\nusers = \"{users}\"\ntunnels = \"{tunnels}\"\nauth = \"{auth}\"\nmetrics = \"off\"\n\
             \n[keepalive]\ninterval = \"{}ms\"\ncount = {}\n\
             \n[limits]\nmax_streams_per_tunnel = {}\n\
             \n[log]\nlevel = {:?}\n",
            settings.workers,
            settings.keepalive.as_millis(),
            settings.keepalive_count,
            settings.max_streams_per_tunnel,
            settings.log_level,
        );
        std::fs::write(&config_path, config).context("write the proxy config")?;
        Ok(ProxyProcess {
            bin: bin.to_owned(),
            log_path: work.join("proxy.log"),
            data_dir,
            config_path,
            child: None,
            users,
            tunnels,
            ca_pin,
        })
    }

    fn data(&self) -> String {
        self.data_dir.to_string_lossy().into_owned()
    }

    /// Starts the proxy and waits for `proxy.ready`; returns how long that took.
    pub fn start(&mut self) -> anyhow::Result<Duration> {
        let ready = self.data_dir.join("proxy.ready");
        let _ = std::fs::remove_file(&ready);
        let log: File = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .context("open the proxy log")?;
        let started = Instant::now();
        let child = Command::new(&self.bin)
            .arg("start")
            .arg("--config")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", self.bin.display()))?;
        self.child = Some(child);
        while !ready.exists() {
            let exited = match self.child.as_mut() {
                Some(child) => child.try_wait()?,
                None => None,
            };
            if let Some(status) = exited {
                bail!(
                    "the proxy exited ({status}) before it was ready; see {}",
                    self.log_path.display()
                );
            }
            if started.elapsed() > READY_TIMEOUT {
                bail!("the proxy was not ready within {READY_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(started.elapsed())
    }

    /// SIGTERM, then waits for the exit (the proxy drains); returns how long that took.
    pub fn stop(&mut self) -> anyhow::Result<Duration> {
        let Some(mut child) = self.child.take() else {
            return Ok(Duration::ZERO);
        };
        let started = Instant::now();
        let pid = libc::pid_t::try_from(child.id()).context("pid")?;
        // SAFETY: kill(2) on the pid of our own child, which we have not reaped yet.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        loop {
            if child.try_wait()?.is_some() {
                return Ok(started.elapsed());
            }
            if started.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the proxy did not stop within 60 s of SIGTERM; killed");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The running proxy's pid.
    pub fn pid(&self) -> anyhow::Result<u32> {
        self.child
            .as_ref()
            .map(|c| c.id())
            .context("the proxy is not running")
    }

    /// Resident memory now.
    pub fn memory(&self) -> anyhow::Result<procfs::Memory> {
        procfs::memory(self.pid()?)
    }

    /// CPU seconds so far.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        procfs::cpu_seconds(self.pid()?)
    }

    /// Open files now.
    pub fn open_files(&self) -> u64 {
        self.pid().map(procfs::open_files).unwrap_or(0)
    }

    /// `tokens add --kind node --uses N --ttl 1h`.
    pub fn node_token(&self, uses: usize) -> anyhow::Result<String> {
        let uses = uses.max(1).to_string();
        let out = run_cli(
            &self.bin,
            &[
                "tokens",
                "add",
                "--kind",
                "node",
                "--uses",
                &uses,
                "--ttl",
                "1h",
                "--data-dir",
                &self.data(),
            ],
        )?;
        Ok(out
            .lines()
            .find_map(|l| l.strip_prefix("token: "))
            .context("`tokens add` printed no token")?
            .trim()
            .to_owned())
    }

    /// `users add NAME --roles access --logins root --password-file F`.
    pub fn add_user(&self, name: &str, password: &str) -> anyhow::Result<()> {
        let file = self.data_dir.join(format!("{name}.password"));
        std::fs::write(&file, format!("{password}\n")).context("write the password file")?;
        run_cli(
            &self.bin,
            &[
                "users",
                "add",
                name,
                "--roles",
                "access",
                "--logins",
                "root",
                "--password-file",
                &file.to_string_lossy(),
                "--data-dir",
                &self.data(),
            ],
        )?;
        Ok(())
    }

    /// `status`: (tunnels up, sessions active).
    pub fn status(&self) -> anyhow::Result<(u64, u64)> {
        let out = run_cli(&self.bin, &["status", "--data-dir", &self.data()])?;
        let number = |prefix: &str| -> anyhow::Result<u64> {
            out.lines()
                .find_map(|l| l.strip_prefix(prefix))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("`status` printed no {prefix:?} line: {out}"))
        };
        Ok((number("tunnels:")?, number("sessions:")?))
    }

    /// Lines of the proxy's log that mention `needle` (evidence for the report).
    pub fn log_count(&self, needle: &str) -> usize {
        std::fs::read_to_string(&self.log_path)
            .map(|t| t.lines().filter(|l| l.contains(needle)).count())
            .unwrap_or(0)
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
