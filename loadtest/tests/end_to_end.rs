//! Runs `remoteler-loadtest tunnels` and `sessions` end to end against the real proxy
//! binary (built by cargo: `target/<profile>/remoteler-proxy`, or `REMOTELER_PROXY_BIN`),
//! and checks the JSON reports: no tunnel lost, no session failed; and `rtt` against the
//! harness's echo server.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// `target/<profile>/remoteler-proxy`, built with `cargo build -p proxy` if missing.
fn proxy_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("REMOTELER_PROXY_BIN") {
        return PathBuf::from(p);
    }
    // The harness binary lives in target/<profile>/; the proxy is built next to it.
    let harness = PathBuf::from(env!("CARGO_BIN_EXE_remoteler-loadtest"));
    let dir = harness.parent().expect("target/<profile>");
    let proxy = dir.join("remoteler-proxy");
    if !proxy.exists() {
        let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug");
        let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cargo.args(["build", "-p", "proxy"]);
        if profile != "debug" {
            cargo.args(["--profile", profile]);
        }
        let status = cargo.status().expect("run cargo build -p proxy");
        assert!(status.success(), "cargo build -p proxy failed");
    }
    assert!(proxy.exists(), "no proxy binary at {}", proxy.display());
    proxy
}

fn run(args: &[&str], json: &Path) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_remoteler-loadtest"))
        .args(args)
        .arg("--proxy-bin")
        .arg(proxy_bin())
        .arg("--json")
        .arg(json)
        .output()
        .expect("run remoteler-loadtest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "remoteler-loadtest {args:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("remoteler-loadtest"), "no table: {stdout}");
    let text = std::fs::read_to_string(json).expect("JSON report");
    serde_json::from_str(&text).expect("JSON report parses")
}

#[test]
fn tunnels_and_sessions_end_to_end() {
    let dir = tempfile::tempdir().unwrap();

    let tunnels = run(
        &[
            "tunnels",
            "--count",
            "50",
            "--hold-rounds",
            "2",
            "--keepalive",
            "500ms",
        ],
        &dir.path().join("tunnels.json"),
    );
    let result = &tunnels["result"];
    assert_eq!(result["lost_tunnels"], 0, "{tunnels:#}");
    assert_eq!(result["disconnects"], 0, "{tunnels:#}");
    assert_eq!(result["proxy_status_tunnels"], 50, "{tunnels:#}");
    assert_eq!(tunnels["connect"]["up"], 50, "{tunnels:#}");
    assert!(
        tunnels["proxy_memory"]["after_hold"]["rss_kib"]
            .as_u64()
            .unwrap()
            > 0
    );

    let sessions = run(
        &[
            "sessions",
            "--tunnels",
            "5",
            "--sessions",
            "20",
            "--rounds",
            "10",
            "--bulk-bytes",
            "256KiB",
            "--single-bytes",
            "4MiB",
        ],
        &dir.path().join("sessions.json"),
    );
    assert_eq!(sessions["result"]["failed_sessions"], 0, "{sessions:#}");
    assert_eq!(sessions["setup"]["ok"], 20, "{sessions:#}");
    assert_eq!(
        sessions["round_trips"]["latency"]["count"], 200,
        "{sessions:#}"
    );
    assert_eq!(sessions["all_streams"]["streams"], 20, "{sessions:#}");
    assert!(sessions["one_stream"]["bytes_per_sec"].as_f64().unwrap() > 0.0);
}

/// `rtt` against the harness's own echo server: every paced round trip is counted, none fails.
#[test]
fn rtt_against_an_echo_server() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let mut echo = Command::new(env!("CARGO_BIN_EXE_remoteler-loadtest"))
        .args(["echo-server", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start echo-server");
    let mut line = String::new();
    BufReader::new(echo.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening ")
        .expect("listening ADDR")
        .to_owned();
    let json = dir.path().join("rtt.json");
    let out = Command::new(env!("CARGO_BIN_EXE_remoteler-loadtest"))
        .args([
            "rtt",
            "--target",
            &addr,
            "--connections",
            "20",
            "--duration",
            "1s",
        ])
        .args(["--warmup", "200ms", "--rate", "1000", "--json"])
        .arg(&json)
        .output()
        .expect("run rtt");
    let _ = echo.kill();
    let _ = echo.wait();
    assert!(
        out.status.success(),
        "rtt failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rtt = &report["rtt"];
    assert_eq!(rtt["errors"], 0, "{report:#}");
    assert_eq!(rtt["connected"], 20, "{report:#}");
    // 1,000/s for 1 s: allow for timer granularity and a slow machine.
    let count = rtt["count"].as_u64().unwrap();
    assert!(
        (300..=1100).contains(&count),
        "{count} round trips: {report:#}"
    );
    assert!(rtt["p50_us"].as_f64().unwrap() > 0.0);
    assert!(rtt["p99_us"].as_f64().unwrap() >= rtt["p50_us"].as_f64().unwrap());
}

/// `relay` as a script runs it: prints its address, relays with a delay, and answers
/// SIGUSR1 / SIGUSR2 with `stalled N` / `resumed N`; a connection stalled in between gets its
/// bytes afterwards.
#[test]
fn relay_stalls_on_signals() {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};
    let echo = TcpListener::bind("127.0.0.1:0").unwrap();
    let echo_addr = echo.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in echo.incoming() {
            let mut conn = conn.unwrap();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = conn.read(&mut buf) {
                    if conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let mut relay = Command::new(env!("CARGO_BIN_EXE_remoteler-loadtest"))
        .args([
            "relay", "--to", &echo_addr, "--delay", "20ms", "--jitter", "5ms",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the relay");
    let mut lines = BufReader::new(relay.stdout.take().unwrap()).lines();
    let mut next_line = || lines.next().unwrap().unwrap();
    let line = next_line();
    let addr = line.strip_prefix("listening ").expect("listening ADDR");
    let mut conn = TcpStream::connect(addr).unwrap();
    let started = std::time::Instant::now();
    conn.write_all(b"ping").unwrap();
    let mut got = [0u8; 4];
    conn.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(30),
        "no delay added"
    );

    let pid = i32::try_from(relay.id()).unwrap();
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR1) }, 0);
    assert_eq!(next_line(), "stalled 1");
    conn.write_all(b"held").unwrap();
    conn.set_read_timeout(Some(std::time::Duration::from_millis(500)))
        .unwrap();
    assert!(conn.read(&mut got).is_err(), "bytes moved during the stall");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR2) }, 0);
    assert_eq!(next_line(), "resumed 1");
    conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    conn.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"held");
    relay.kill().unwrap();
    relay.wait().unwrap();
}
