//! SSH host certificates end to end, with real sshds and the real OpenSSH client: the agent
//! has its sshd's host key certified by the cluster, `remoteler config` writes known_hosts
//! with the cluster's host CA, and `ssh NODE` verifies the node with `StrictHostKeyChecking
//! yes` and no earlier known_hosts entry; a node whose sshd shows a host key certified for
//! another name, or an uncertified one, is refused by ssh itself.
//!
//! Needs root (sshd) and openssh-server; skipped with a message where either is missing.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{CLIENT, PASSWORD, Reaped, WAIT, lines, sibling, start_proxy, text, wait_line};

const SSHD: &str = "/usr/sbin/sshd";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn host_key(dir: &Path, name: &str) -> PathBuf {
    let key = dir.join(name);
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "ssh-keygen: {}", text(&out));
    key
}

/// A real sshd for `node` on `port` with host key `key` and `cert` as its HostCertificate;
/// it trusts the cluster's SSH user CA. Waits until it listens.
fn sshd(dir: &Path, node: &str, port: u16, key: &Path, cert: &Path, user_ca: &Path) -> Reaped {
    let config = dir.join(format!("sshd-{node}.conf"));
    std::fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nHostCertificate {}\n\
             TrustedUserCAKeys {}\nAuthorizedKeysFile none\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPermitRootLogin yes\n\
             PidFile {}\nSetEnv NODE_NAME={node}\n",
            key.display(),
            cert.display(),
            user_ca.display(),
            dir.join(format!("sshd-{node}.pid")).display()
        ),
    )
    .unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();
    let mut child = Command::new(SSHD)
        .args(["-D", "-e", "-f"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = lines(child.stderr.take().unwrap());
    let child = Reaped(child);
    wait_line(&err, "Server listening", |l| l.contains("Server listening"));
    child
}

fn wait_for_file(path: &Path, log: &Path) {
    let deadline = Instant::now() + WAIT;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "the agent wrote no {}; its log:\n{}",
            path.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ssh(home: &Path, config: &Path, node: &str) -> Output {
    Command::new("ssh")
        .arg("-F")
        .arg(config)
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            node,
            "echo $NODE_NAME",
        ])
        .env("REMOTELER_HOME", home)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn ssh_verifies_the_node_by_its_host_certificate() {
    // SAFETY: geteuid has no preconditions and touches no memory.
    if !Path::new(SSHD).exists() || unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root and openssh-server ({SSHD})");
        return;
    }
    let proxy_bin = sibling("remoteler-proxy", "proxy", "REMOTELER_PROXY_BIN");
    let agent_bin = sibling("remoteler-agent", "agent", "REMOTELER_AGENT_BIN");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = dir.join("proxy");
    let p = |args: &[&str]| {
        let out = Command::new(&proxy_bin)
            .args(args)
            .arg("--data-dir")
            .arg(&data)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "remoteler-proxy {args:?}: {}",
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let init = p(&["init", "--cluster", "hc.test", "--host", "127.0.0.1"]);
    let pin = init
        .lines()
        .find_map(|l| l.strip_prefix("CA pin: "))
        .unwrap()
        .to_owned();
    let user_ca = dir.join("user_ca.pub");
    std::fs::write(&user_ca, p(&["export", "ssh-user-ca"])).unwrap();
    assert!(
        p(&["export", "ssh-host-ca"]).starts_with("@cert-authority *.hc.test ssh-ed25519 "),
        "export ssh-host-ca"
    );
    let (_proxy, ready) = start_proxy(
        &proxy_bin,
        &data,
        &dir.join("proxy.log"),
        ["127.0.0.1:0"; 3],
    );
    let addr = |key: &str| -> String {
        ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .unwrap()
            .to_owned()
    };
    let pw = dir.join("alice.pw");
    std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
    p(&[
        "users", "add", "alice", "--roles", "access", "--logins", "root",
    ]
    .into_iter()
    .chain(["--password-file", pw.to_str().unwrap()])
    .collect::<Vec<_>>());

    // node-a: its agent has its sshd's host key certified.
    let key_a = host_key(dir, "host_a");
    let cert_a = dir.join("host_a-cert.pub");
    let port_a = free_port();
    let agent = |node: &str, port: u16, host_key: &str, cert: &Path| {
        let token = p(&["tokens", "add", "--kind", "node"])
            .lines()
            .find_map(|l| l.strip_prefix("token: "))
            .unwrap()
            .to_owned();
        let log = dir.join(format!("agent-{node}.log"));
        let child = Command::new(&agent_bin)
            .args(["start", "--proxy", &addr("tunnels"), "--token", &token])
            .args(["--ca-pin", &pin, "--node-name", node, "--data-dir"])
            .arg(dir.join(format!("agent-{node}")))
            .args(["--forward", &format!("ssh=127.0.0.1:{port}")])
            .args(["--ssh-host-key", host_key, "--ssh-host-cert"])
            .arg(cert)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        (Reaped(child), log)
    };
    let pub_a = format!("{}.pub", key_a.display());
    let (_agent_a, log_a) = agent("node-a", port_a, &pub_a, &cert_a);
    wait_for_file(&cert_a, &log_a);
    let _sshd_a = sshd(dir, "node-a", port_a, &key_a, &cert_a, &user_ca);

    // node-b: its sshd shows a host key certified (by the operator) for node-a.
    let key_b = host_key(dir, "host_b");
    let cert_b = dir.join("host_b-cert.pub");
    let out = Command::new(&proxy_bin)
        .args(["ssh-host-cert", "sign", "--node", "node-a", "--host-key"])
        .arg(format!("{}.pub", key_b.display()))
        .arg("--out")
        .arg(&cert_b)
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success(), "ssh-host-cert sign: {}", text(&out));
    let port_b = free_port();
    let (_agent_b, _) = agent("node-b", port_b, "", &dir.join("unused"));
    let _sshd_b = sshd(dir, "node-b", port_b, &key_b, &cert_b, &user_ca);

    // node-c: its sshd's host key is not certified at all (no certificate file).
    let key_c = host_key(dir, "host_c");
    let port_c = free_port();
    let (_agent_c, _) = agent("node-c", port_c, "", &dir.join("unused"));
    let _sshd_c = sshd(
        dir,
        "node-c",
        port_c,
        &key_c,
        &dir.join("host_c-cert.pub"),
        &user_ca,
    );

    let home = dir.join("home");
    let login = Command::new(CLIENT)
        .args(["login", "--proxy", &addr("users"), "--user", "alice"])
        .args(["--ca-pin", &pin, "--password-file"])
        .arg(&pw)
        .env("REMOTELER_HOME", &home)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(login.status.success(), "login: {}", text(&login));
    let deadline = Instant::now() + WAIT;
    let config = loop {
        let out = Command::new(CLIENT)
            .arg("config")
            .env("REMOTELER_HOME", &home)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "config: {}", text(&out));
        let config = String::from_utf8_lossy(&out.stdout).into_owned();
        if config.contains("Host node-a node-b node-c ") {
            break config;
        }
        assert!(Instant::now() < deadline, "nodes never listed:\n{config}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        config.contains("    StrictHostKeyChecking yes\n"),
        "{config}"
    );
    assert!(config.contains("    User root\n"), "{config}");
    let known_hosts = std::fs::read_to_string(home.join("known_hosts")).unwrap();
    let entries: Vec<&str> = known_hosts
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect();
    assert_eq!(entries.len(), 1, "{known_hosts}");
    assert!(
        entries[0].starts_with("@cert-authority node-a,node-b,node-c,*.hc.test ssh-ed25519 "),
        "{known_hosts}"
    );
    let ssh_config = dir.join("ssh_config");
    std::fs::write(&ssh_config, &config).unwrap();

    let a = ssh(&home, &ssh_config, "node-a");
    assert!(a.status.success(), "ssh node-a: {}", text(&a));
    assert_eq!(String::from_utf8_lossy(&a.stdout).trim(), "node-a");
    // Verified by the CA: nothing was learned on first use.
    assert_eq!(
        std::fs::read_to_string(home.join("known_hosts")).unwrap(),
        known_hosts
    );

    let b = ssh(&home, &ssh_config, "node-b");
    assert!(!b.status.success(), "ssh node-b answered: {}", text(&b));
    let err = String::from_utf8_lossy(&b.stderr);
    assert!(err.contains("Host key verification failed"), "{err}");
    assert!(b.stdout.is_empty(), "{}", text(&b));

    let c = ssh(&home, &ssh_config, "node-c");
    assert!(!c.status.success(), "ssh node-c answered: {}", text(&c));
    let err = String::from_utf8_lossy(&c.stderr);
    assert!(err.contains("Host key verification failed"), "{err}");
    assert!(c.stdout.is_empty(), "{}", text(&c));
    // Nothing learned from the refused nodes either.
    assert_eq!(
        std::fs::read_to_string(home.join("known_hosts")).unwrap(),
        known_hosts
    );
}
