//! Prometheus metrics on `listen.metrics` (default `127.0.0.1:3026`, loopback: metrics are
//! for the operator's scraper, not the world).
//!
//! `GET /metrics` answers the text exposition format (version 0.0.4); anything else gets a 404.
//! One request per connection, at most [`MAX_REQUEST`] bytes, answered by core 0. Every figure
//! is a counter or gauge the proxy keeps anyway ([`Stats`], the node directory) or reads from
//! `/proc` at scrape time (per-core CPU, memory, descriptors), so scraping costs nothing
//! between scrapes. Session byte counts are added when a session ends.

use std::fmt::Write as _;
use std::rc::Rc;
use std::time::Duration;

use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::{TcpListener, TcpStream};

use crate::server::{Context, Stats};

/// Longest request head read before answering 400.
pub const MAX_REQUEST: usize = 8 * 1024;

/// How long a scraper has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `listener` until shutdown.
pub(crate) async fn serve(ctx: Rc<Context>, listener: TcpListener) {
    loop {
        let accepted = monoio::select! {
            a = listener.accept() => a,
            _ = ctx.shutdown.wait() => break,
        };
        match accepted {
            Ok((stream, _)) => drop(monoio::spawn(answer(ctx.clone(), stream))),
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener: accept failed");
                monoio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(ctx: Rc<Context>, mut stream: TcpStream) {
    let head = monoio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream)).await;
    let (status, body) = match head {
        Ok(Some(head)) => match request_target(&head) {
            Some("/metrics") => ("200 OK", render(&ctx)),
            Some(_) => ("404 Not Found", "only /metrics is served here\n".to_owned()),
            None => ("400 Bad Request", "expected GET /metrics\n".to_owned()),
        },
        Ok(None) => (
            "400 Bad Request",
            "request head too long or cut\n".to_owned(),
        ),
        Err(_) => return,
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = monoio::time::timeout(
        Duration::from_secs(10),
        stream.write_all(response.into_bytes()),
    )
    .await;
}

/// Reads up to the blank line that ends an HTTP request head.
async fn read_head(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Some(head);
        }
        if head.len() > MAX_REQUEST {
            return None;
        }
        let (res, buf) = stream.read(Vec::with_capacity(1024)).await;
        match res {
            Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
            _ => return None,
        }
    }
}

/// The path of a `GET` (or `HEAD`) request line, query string dropped.
fn request_target(head: &[u8]) -> Option<&str> {
    let line = head.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?.trim_end();
    let mut parts = line.split(' ');
    let method = parts.next()?;
    let target = parts.next()?;
    if method != "GET" || !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    Some(target.split('?').next().unwrap_or(target))
}

/// One metric family: HELP and TYPE lines, then its samples.
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(&str, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, value) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
}

/// The exposition text.
pub(crate) fn render(ctx: &Context) -> String {
    let s = &ctx.stats;
    let get = Stats::get;
    let mut out = String::with_capacity(4096);
    let per_core = ctx.directory.tunnels_per_core();
    let core_labels: Vec<String> = (0..per_core.len())
        .map(|c| format!("core=\"{c}\""))
        .collect();
    let tunnels: Vec<(&str, u64)> = core_labels
        .iter()
        .zip(&per_core)
        .map(|(l, &n)| (l.as_str(), n as u64))
        .collect();
    family(
        &mut out,
        "remoteler_tunnels",
        "gauge",
        "Agents' tunnels up, by the core that serves them.",
        &tunnels,
    );
    let leaves = ctx.directory.clusters();
    // Cluster names are [a-z0-9.-]: nothing to escape in a label value.
    let leaf_labels: Vec<String> = leaves
        .iter()
        .map(|c| format!("cluster=\"{}\"", c.name))
        .collect();
    let online: Vec<(&str, u64)> = leaf_labels
        .iter()
        .zip(&leaves)
        .map(|(l, c)| (l.as_str(), u64::from(c.online)))
        .collect();
    family(
        &mut out,
        "remoteler_trusted_cluster_online",
        "gauge",
        "Whether a trusted leaf cluster holds a tunnel to this (root) proxy, 1 or 0 (leaves seen since start).",
        &online,
    );
    let nodes: Vec<(&str, u64)> = leaf_labels
        .iter()
        .zip(&leaves)
        .map(|(l, c)| (l.as_str(), c.nodes as u64))
        .collect();
    family(
        &mut out,
        "remoteler_trusted_cluster_nodes",
        "gauge",
        "Nodes a trusted leaf cluster announces.",
        &nodes,
    );
    family(
        &mut out,
        "remoteler_tunnel_connects_total",
        "counter",
        "Tunnels connected (new sessions, not resumptions).",
        &[("", get(&s.tunnels_connected))],
    );
    family(
        &mut out,
        "remoteler_tunnel_resumes_total",
        "counter",
        "Tunnels resumed after their agent reconnected within resume.grace.",
        &[("", get(&s.tunnels_resumed))],
    );
    for (name, help, counters) in [
        (
            "remoteler_connection_detaches_total",
            "Users' connections (kind=user) and leaf clusters' tunnels (kind=cluster) whose connection was lost while their sessions wait for resume.grace.",
            &s.connections_detached,
        ),
        (
            "remoteler_connection_resumes_total",
            "Users' connections (kind=user) and leaf clusters' tunnels (kind=cluster) resumed over a new connection.",
            &s.connections_resumed,
        ),
    ] {
        family(
            &mut out,
            name,
            "counter",
            help,
            &[
                ("kind=\"user\"", get(&counters[0])),
                ("kind=\"cluster\"", get(&counters[1])),
            ],
        );
    }
    family(
        &mut out,
        "remoteler_tunnel_disconnects_total",
        "counter",
        "Tunnels ended (agent gone, replaced, refused after connecting, or not resumed).",
        &[("", get(&s.tunnels_disconnected))],
    );
    family(
        &mut out,
        "remoteler_sessions",
        "gauge",
        "Sessions (user streams to nodes) running.",
        &[("", get(&s.sessions_active))],
    );
    family(
        &mut out,
        "remoteler_sessions_total",
        "counter",
        "Sessions started.",
        &[("", get(&s.sessions_total))],
    );
    let refused = s.refusals();
    let refused_labels: Vec<(String, u64)> = refused
        .iter()
        .map(|(code, n)| (format!("code=\"{code}\""), *n))
        .collect();
    let refused: Vec<(&str, u64)> = refused_labels
        .iter()
        .map(|(l, n)| (l.as_str(), *n))
        .collect();
    family(
        &mut out,
        "remoteler_sessions_refused_total",
        "counter",
        "Session requests refused, by error code.",
        &refused,
    );
    family(
        &mut out,
        "remoteler_session_bytes_total",
        "counter",
        "Bytes carried by ended sessions, by direction.",
        &[
            ("direction=\"from_user\"", get(&s.bytes_from_users)),
            ("direction=\"to_user\"", get(&s.bytes_to_users)),
        ],
    );
    family(
        &mut out,
        "remoteler_handshakes_in_progress",
        "gauge",
        "Connections in the TLS handshake or their first request (limits.max_handshakes_in_progress).",
        &[(
            "",
            u64::from(s.handshakes.load(std::sync::atomic::Ordering::Relaxed)),
        )],
    );
    family(
        &mut out,
        "remoteler_handshakes_total",
        "counter",
        "TLS handshakes, by result.",
        &[
            ("result=\"ok\"", get(&s.handshakes_ok)),
            (
                "result=\"bad_certificate\"",
                get(&s.handshakes_bad_certificate),
            ),
            ("result=\"failed\"", get(&s.handshakes_failed)),
        ],
    );
    family(
        &mut out,
        "remoteler_connections_dropped_total",
        "counter",
        "Connections dropped or refused before being served, by reason.",
        &[
            (
                "reason=\"handshake_limit\"",
                get(&s.dropped_handshake_limit),
            ),
            (
                "reason=\"source_handshake_limit\"",
                get(&s.dropped_source_handshake_limit),
            ),
            ("reason=\"tunnel_limit\"", get(&s.dropped_tunnel_limit)),
            ("reason=\"draining\"", get(&s.dropped_draining)),
            ("reason=\"access_denied\"", get(&s.dropped_access_denied)),
            ("reason=\"accept_error\"", get(&s.accept_errors)),
        ],
    );
    family(
        &mut out,
        "remoteler_auth_sources_blocked_total",
        "counter",
        "Times an address was refused joins and logins after too many failures.",
        &[("", get(&s.auth_sources_blocked))],
    );
    family(
        &mut out,
        "remoteler_core_handoffs_total",
        "counter",
        "Connections moved to the core that owns their node.",
        &[("", get(&s.handoffs))],
    );
    let cpu: Vec<(&str, u64)> = core_labels
        .iter()
        .enumerate()
        .map(|(core, l)| (l.as_str(), s.core_cpu_ticks(core)))
        .collect();
    family(
        &mut out,
        "remoteler_core_cpu_ticks_total",
        "counter",
        "CPU time of each core's thread, user + system, in clock ticks (USER_HZ, usually 100 per second).",
        &cpu,
    );
    let (rss, fds) = process_usage();
    family(
        &mut out,
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory of the proxy process.",
        &[("", rss)],
    );
    family(
        &mut out,
        "process_open_fds",
        "gauge",
        "Open file descriptors of the proxy process.",
        &[("", fds)],
    );
    family(
        &mut out,
        "remoteler_uptime_seconds",
        "gauge",
        "Seconds since the proxy started.",
        &[("", ctx.started.elapsed().as_secs())],
    );
    out
}

/// Resident bytes (from `/proc/self/statm`) and open descriptors (entries of `/proc/self/fd`).
fn process_usage() -> (u64, u64) {
    let page = 4096;
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|t| t.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * page);
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
    (rss, fds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_target_takes_get_paths_only() {
        assert_eq!(
            request_target(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some("/metrics")
        );
        assert_eq!(
            request_target(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Some("/metrics")
        );
        assert_eq!(request_target(b"POST /metrics HTTP/1.1\r\n\r\n"), None);
        assert_eq!(request_target(b"GET /metrics\r\n\r\n"), None);
        assert_eq!(request_target(b"\xff\xfe\r\n\r\n"), None);
    }

    #[test]
    fn family_formats_samples() {
        let mut out = String::new();
        family(
            &mut out,
            "x_total",
            "counter",
            "An x.",
            &[("a=\"1\"", 3), ("", 4)],
        );
        assert_eq!(
            out,
            "# HELP x_total An x.\n# TYPE x_total counter\nx_total{a=\"1\"} 3\nx_total 4\n"
        );
    }
}
