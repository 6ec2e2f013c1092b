//! The proxy's file: defaults, every validation rule, and the shape of error messages.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use config::{ConfigError, Location, MetricsListen, ProxyConfig, Workers};

const PATH: &str = "/etc/remoteler/proxy.toml";

fn parse(text: &str) -> Result<ProxyConfig, ConfigError> {
    ProxyConfig::from_toml_str(text, PATH)
}

fn error(text: &str) -> ConfigError {
    match parse(text) {
        Ok(config) => panic!("expected an error for:\n{text}\ngot {config:?}"),
        Err(e) => e,
    }
}

#[test]
fn the_documented_example_message_is_exact() {
    let err = error("cluster_name = \"example.com\"\n[keepalive]\ncount = 0\n");
    assert_eq!(
        err.to_string(),
        "/etc/remoteler/proxy.toml: key `keepalive.count`: expected an integer from 1 to 100, \
         found 0 (line 3, column 9)"
    );
    assert_eq!(err.key(), Some("keepalive.count"));
    assert_eq!(err.path(), Path::new(PATH));
    assert_eq!(err.location(), Some(Location { line: 3, column: 9 }));
}

#[test]
fn defaults_are_applied() {
    let config = parse("cluster_name = \"example.com\"\n").unwrap();
    let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
    assert_eq!(config.cluster_name.as_str(), "example.com");
    // The path for messages is absolute, so the default data_dir stays as it is.
    assert_eq!(config.data_dir, Path::new("/var/lib/remoteler"));
    assert_eq!(config.audit.path, Path::new("/var/lib/remoteler/audit.log"));
    assert_eq!(config.workers, Workers::AllCores);
    assert_eq!(config.listen.users, addr("0.0.0.0:3023"));
    assert_eq!(config.listen.tunnels, addr("0.0.0.0:3024"));
    assert_eq!(config.listen.auth, addr("0.0.0.0:3025"));
    assert_eq!(
        config.listen.metrics,
        MetricsListen::Listen(addr("127.0.0.1:3026"))
    );
    assert_eq!(config.keepalive.interval, Duration::from_secs(10));
    assert_eq!(config.keepalive.count, 3);
    assert_eq!(config.flow.window(), 1 << 20);
    assert_eq!(config.flow.max_frame(), 64 << 10);
    assert_eq!(config.limits.max_streams_per_tunnel, 1024);
    assert_eq!(config.limits.max_buffered_per_connection, 256 << 20);
    assert_eq!(config.limits.max_pending_opens, 64);
    assert_eq!(config.limits.max_handshakes_in_progress, 1024);
    assert_eq!(config.limits.handshake_timeout, Duration::from_secs(10));
    assert_eq!(config.limits.hello_timeout, Duration::from_secs(2));
    assert_eq!(config.limits.max_announce_bytes, 1 << 20);
    assert_eq!(config.limits.max_tunnels, config::DEFAULT_MAX_TUNNELS);
    assert_eq!(config.resume.grace, Duration::from_secs(30));
    assert_eq!(config.drain.timeout, Duration::from_secs(30));
    assert_eq!(config.log.format, config::LogFormat::Text);
    assert_eq!(config.log.level.as_str(), "info");
    assert!(config.nodes.is_empty());
}

#[test]
fn every_key_is_read() {
    let text = r#"
cluster_name = "leaf-1.example.com"
data_dir = "/srv/remoteler"
workers = 4
[listen]
users = "127.0.0.1:0"
tunnels = "127.0.0.1:0"
auth = "[::1]:4025"
metrics = "off"
[keepalive]
interval = "500ms"
count = 5
[flow]
window = 262144
max_frame = "64KiB"
[limits]
max_streams_per_tunnel = 10
max_buffered_per_connection = "96MiB"
max_pending_opens = 2
max_handshakes_in_progress = 3
handshake_timeout = "2m"
hello_timeout = "750ms"
max_announce_bytes = "64KiB"
max_tunnels = 20000
[resume]
grace = "0s"
[drain]
timeout = "1m 30s"
[audit]
path = "/var/log/remoteler-audit.log"
[log]
format = "json"
level = "info,tunnel=debug"
[[nodes]]
name = "node-a"
address = "10.0.0.5:22"
labels = { env = "prod", "team/owner" = "Ops Team" }
[[nodes]]
name = "node-b"
address = "[fd00::6]:2222"
"#;
    let config = parse(text).unwrap();
    assert_eq!(config.cluster_name.as_str(), "leaf-1.example.com");
    assert_eq!(config.data_dir, Path::new("/srv/remoteler"));
    assert_eq!(config.workers.resolve().get(), 4);
    assert_eq!(config.listen.users.port(), 0);
    assert_eq!(config.listen.auth, "[::1]:4025".parse().unwrap());
    assert_eq!(config.listen.metrics, MetricsListen::Disabled);
    assert_eq!(config.keepalive.interval, Duration::from_millis(500));
    assert_eq!(config.keepalive.count, 5);
    assert_eq!(config.flow.window(), 256 << 10);
    assert_eq!(config.flow.max_frame(), 64 << 10);
    assert_eq!(config.limits.max_streams_per_tunnel, 10);
    assert_eq!(config.limits.max_buffered_per_connection, 96 << 20);
    assert_eq!(config.limits.max_pending_opens, 2);
    assert_eq!(config.limits.max_handshakes_in_progress, 3);
    assert_eq!(config.limits.handshake_timeout, Duration::from_secs(120));
    assert_eq!(config.limits.hello_timeout, Duration::from_millis(750));
    assert_eq!(config.limits.max_announce_bytes, 64 << 10);
    assert_eq!(config.limits.max_tunnels, 20_000);
    assert_eq!(config.resume.grace, Duration::ZERO);
    assert_eq!(config.drain.timeout, Duration::from_secs(90));
    assert_eq!(config.audit.path, Path::new("/var/log/remoteler-audit.log"));
    assert_eq!(config.log.format, config::LogFormat::Json);
    assert_eq!(config.log.level.as_str(), "info,tunnel=debug");
    assert_eq!(config.nodes.len(), 2);
    assert_eq!(config.nodes[0].name.as_str(), "node-a");
    assert_eq!(config.nodes[0].address.to_string(), "10.0.0.5:22");
    assert_eq!(config.nodes[0].labels.get("team/owner"), Some("Ops Team"));
    assert_eq!(config.nodes[1].address.host(), "fd00::6");
    assert_eq!(config.nodes[1].address.port(), 2222);
    assert!(config.nodes[1].labels.is_empty());
}

#[test]
fn metrics_can_be_disabled_with_an_empty_string() {
    let config = parse("cluster_name = \"c\"\n[listen]\nmetrics = \"\"\n").unwrap();
    assert_eq!(config.listen.metrics.addr(), None);
}

#[test]
fn unknown_keys_are_rejected_with_line_column_and_key() {
    let cases = [
        // (text, key, line, column, an allowed key the message lists)
        (
            "cluster_name = \"c\"\n[keepalive]\ncout = 3\n",
            "keepalive.cout",
            3,
            1,
            "`count`",
        ),
        (
            "cluster_name = \"c\"\nclustername = \"d\"\n",
            "clustername",
            2,
            1,
            "`cluster_name`",
        ),
        (
            "cluster_name = \"c\"\n[[nodes]]\nname = \"a\"\naddress = \"a:22\"\n[[nodes]]\nnme = \"b\"\n",
            "nodes[1].nme",
            6,
            1,
            "`name`",
        ),
        (
            "cluster_name = \"c\"\nlisten = { users = \"0.0.0.0:1\", admin = \"x\" }\n",
            "listen.admin",
            2,
            33,
            "`metrics`",
        ),
        (
            "cluster_name = \"c\"\nlimits.max_streams = 3\n",
            "limits.max_streams",
            2,
            8,
            "`max_streams_per_tunnel`",
        ),
    ];
    for (text, key, line, column, allowed) in cases {
        let err = error(text);
        let message = err.to_string();
        assert!(matches!(err, ConfigError::UnknownKey { .. }), "{message}");
        assert_eq!(err.key(), Some(key), "{message}");
        assert_eq!(err.location(), Some(Location { line, column }), "{message}");
        assert!(
            message.starts_with(&format!("{PATH}: key `{key}`: expected ")),
            "{message}"
        );
        assert!(message.contains(allowed), "{message}");
        assert!(message.contains("found an unknown key"), "{message}");
        assert!(
            message.ends_with(&format!("(line {line}, column {column})")),
            "{message}"
        );
    }
}

#[test]
fn toml_syntax_errors_have_line_and_column() {
    let err = error("cluster_name = \"c\"\n\n[keepalive\n");
    assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
    assert_eq!(err.location().map(|l| l.line), Some(3), "{err}");
    assert!(
        err.to_string()
            .starts_with(&format!("{PATH}: invalid toml: ")),
        "{err}"
    );

    let err = error("cluster_name = \"c\"\ncluster_name = \"d\"\n");
    assert_eq!(
        err.location(),
        Some(Location { line: 2, column: 1 }),
        "{err}"
    );
    assert!(err.to_string().contains("duplicate key"), "{err}");
    assert!(err.to_string().contains("cluster_name"), "{err}");
}

/// Each rule: the text after `cluster_name = "c"`, the key, the expectation, what was found.
const RULES: &[(&str, &str, &str, &str)] = &[
    (
        "cluster_name = \"Example\"",
        "cluster_name",
        "a cluster name of 1 to 63 characters",
        "\"Example\"",
    ),
    (
        "cluster_name = \"-a\"",
        "cluster_name",
        "starting with a letter or digit",
        "\"-a\"",
    ),
    (
        "cluster_name = \"a_b\"",
        "cluster_name",
        "lowercase letters, digits, '-', '.'",
        "\"a_b\"",
    ),
    (
        "cluster_name = \"\"",
        "cluster_name",
        "1 to 63 characters",
        "\"\"",
    ),
    ("data_dir = \"\"", "data_dir", "a path", "\"\""),
    ("data_dir = 7", "data_dir", "a path", "integer `7`"),
    (
        "workers = 1025",
        "workers",
        "an integer from 0 to 1024",
        "1025",
    ),
    ("workers = -1", "workers", "an integer from 0 to 1024", "-1"),
    ("workers = \"4\"", "workers", "an integer", "string \"4\""),
    (
        "[listen]\nusers = \"localhost:3023\"",
        "listen.users",
        "an ip address and port",
        "\"localhost:3023\"",
    ),
    (
        "[listen]\ntunnels = \"0.0.0.0\"",
        "listen.tunnels",
        "an ip address and port",
        "\"0.0.0.0\"",
    ),
    (
        "[listen]\nauth = \"0.0.0.0:3023\"",
        "listen.auth",
        "not already used by `listen.users`",
        "\"0.0.0.0:3023\"",
    ),
    (
        "[listen]\nmetrics = \"0.0.0.0:3024\"",
        "listen.metrics",
        "not already used by `listen.tunnels`",
        "\"0.0.0.0:3024\"",
    ),
    (
        "[listen]\nmetrics = \"on\"",
        "listen.metrics",
        "an ip address and port",
        "\"on\"",
    ),
    (
        "[keepalive]\ncount = 0",
        "keepalive.count",
        "an integer from 1 to 100",
        "0",
    ),
    (
        "[keepalive]\ncount = 101",
        "keepalive.count",
        "an integer from 1 to 100",
        "101",
    ),
    (
        "[keepalive]\ninterval = \"10\"",
        "keepalive.interval",
        "a duration such as \"10s\"",
        "\"10\"",
    ),
    (
        "[keepalive]\ninterval = 10",
        "keepalive.interval",
        "a duration such as \"10s\"",
        "integer `10`",
    ),
    (
        "[keepalive]\ninterval = \"10ms\"",
        "keepalive.interval",
        "a duration from 100ms to 1h",
        "\"10ms\"",
    ),
    (
        "[keepalive]\ninterval = \"2h\"",
        "keepalive.interval",
        "a duration from 100ms to 1h",
        "\"2h\"",
    ),
    (
        "[flow]\nwindow = \"8KiB\"",
        "flow.window",
        "a size from 16KiB to 64MiB",
        "\"8KiB\"",
    ),
    (
        "[flow]\nwindow = \"128MiB\"",
        "flow.window",
        "a size from 16KiB to 64MiB",
        "\"128MiB\"",
    ),
    (
        "[flow]\nwindow = \"1 megabyte\"",
        "flow.window",
        "a size in bytes such as 65536",
        "\"1 megabyte\"",
    ),
    (
        "[flow]\nwindow = \"1MB\"",
        "flow.window",
        "powers of 1024",
        "\"1MB\"",
    ),
    (
        "[flow]\nwindow = -5",
        "flow.window",
        "a size from 16KiB to 64MiB",
        "-5",
    ),
    (
        "[flow]\nwindow = 1.5",
        "flow.window",
        "a size in bytes",
        "floating point `1.5`",
    ),
    (
        "[flow]\nmax_frame = 512",
        "flow.max_frame",
        "a size from 1KiB to 64KiB",
        "512",
    ),
    (
        "[flow]\nmax_frame = \"128KiB\"",
        "flow.max_frame",
        "a size from 1KiB to 64KiB",
        "\"128KiB\"",
    ),
    (
        "[flow]\nwindow = \"16KiB\"\nmax_frame = \"32KiB\"",
        "flow.window",
        "no smaller than `flow.max_frame` (32KiB)",
        "16KiB",
    ),
    (
        "[limits]\nmax_streams_per_tunnel = 0",
        "limits.max_streams_per_tunnel",
        "an integer from 1 to 65535",
        "0",
    ),
    (
        "[limits]\nmax_buffered_per_connection = \"1MiB\"",
        "limits.max_buffered_per_connection",
        "a size from 64MiB to 3GiB",
        "\"1MiB\"",
    ),
    (
        "[limits]\nmax_pending_opens = 100000",
        "limits.max_pending_opens",
        "an integer from 1 to 65536",
        "100000",
    ),
    (
        "[limits]\nmax_handshakes_in_progress = 0",
        "limits.max_handshakes_in_progress",
        "an integer from 1 to 65536",
        "0",
    ),
    (
        "[limits]\nhandshake_timeout = \"0s\"",
        "limits.handshake_timeout",
        "a duration from 100ms to 5m",
        "\"0s\"",
    ),
    (
        "[limits]\nhello_timeout = \"10m\"",
        "limits.hello_timeout",
        "a duration from 100ms to 5m",
        "\"10m\"",
    ),
    (
        "[limits]\nmax_announce_bytes = \"512B\"",
        "limits.max_announce_bytes",
        "a size from 1KiB to 64MiB",
        "\"512B\"",
    ),
    (
        "[limits]\nmax_tunnels = 0",
        "limits.max_tunnels",
        "an integer from 1 to 1000000",
        "0",
    ),
    (
        "[resume]\ngrace = \"2h\"",
        "resume.grace",
        "a duration from 0s to 1h",
        "\"2h\"",
    ),
    (
        "[resume]\ngrace = \"soon\"",
        "resume.grace",
        "a duration such as",
        "\"soon\"",
    ),
    (
        "[drain]\ntimeout = \"-1s\"",
        "drain.timeout",
        "a duration such as",
        "\"-1s\"",
    ),
    ("[audit]\npath = \"\"", "audit.path", "a path", "\"\""),
    (
        "[log]\nformat = \"xml\"",
        "log.format",
        "\"text\" or \"json\"",
        "\"xml\"",
    ),
    (
        "[log]\nlevel = \"loud\"",
        "log.level",
        "a log level",
        "\"loud\"",
    ),
    ("keepalive = 3", "keepalive", "a table", "integer `3`"),
    ("nodes = 3", "nodes", "an array", "integer `3`"),
    (
        "[[nodes]]\naddress = \"a:22\"",
        "nodes[0].name",
        "a node name",
        "nothing (the key is required)",
    ),
    (
        "[[nodes]]\nname = \"Node\"\naddress = \"a:22\"",
        "nodes[0].name",
        "a node name of 1 to 63 characters",
        "\"Node\"",
    ),
    (
        "[[nodes]]\nname = \"a\"",
        "nodes[0].address",
        "host:port",
        "nothing (the key is required)",
    ),
    (
        "[[nodes]]\nname = \"a\"\naddress = \"a\"",
        "nodes[0].address",
        "a host and port",
        "\"a\"",
    ),
    (
        "[[nodes]]\nname = \"a\"\naddress = \"a:0\"",
        "nodes[0].address",
        "a port from 1 to 65535",
        "\"a:0\"",
    ),
    (
        "[[nodes]]\nname = \"a\"\naddress = \"a:22\"\n[[nodes]]\nname = \"b\"\naddress = \"b:99999\"",
        "nodes[1].address",
        "a port from 1 to 65535",
        "\"b:99999\"",
    ),
    (
        "[[nodes]]\nname = \"a\"\naddress = \"a:22\"\nlabels = { Env = \"x\" }",
        "nodes[0].labels.Env",
        "a label key of 1 to 63 characters",
        "\"Env\"",
    ),
    (
        "[[nodes]]\nname = \"a\"\naddress = \"a:22\"\nlabels = { env = \"a\\nb\" }",
        "nodes[0].labels.env",
        "printable characters",
        "\"a\\nb\"",
    ),
    (
        "[[nodes]]\nname = \"a\"\naddress = \"a:22\"\nlabels = { env = 3 }",
        "nodes[0].labels.env",
        "a string",
        "integer `3`",
    ),
];

#[test]
fn every_rule_names_file_key_expectation_and_finding() {
    for (rest, key, expected, found) in RULES {
        let text = if rest.starts_with("cluster_name") {
            format!("{rest}\n")
        } else {
            format!("cluster_name = \"c\"\n{rest}\n")
        };
        let err = error(&text);
        let message = err.to_string();
        assert_eq!(err.key(), Some(*key), "{message}");
        assert!(
            message.starts_with(&format!("{PATH}: key `{key}`: expected ")),
            "{message}"
        );
        let (expectation, finding) = message
            .split_once(", found ")
            .unwrap_or_else(|| panic!("no \", found \" in {message}"));
        assert!(
            expectation.contains(expected),
            "{message}\nshould expect: {expected}"
        );
        assert!(
            finding.starts_with(found),
            "{message}\nshould find: {found}"
        );
        assert!(err.location().is_some(), "{message}");
        // Messages are lower case (what is quoted back from the file keeps its case).
        let first = |text: &str| text.chars().next().unwrap();
        assert!(
            !first(&expectation[expectation.find(": expected ").unwrap() + 11..]).is_uppercase()
        );
        assert!(!first(finding).is_uppercase(), "{message}");
    }
}

#[test]
fn missing_cluster_name_is_named() {
    let err = error("data_dir = \"/x\"\n");
    assert_eq!(err.key(), Some("cluster_name"));
    assert!(
        err.to_string()
            .contains("found nothing (the key is required)"),
        "{err}"
    );
}

#[test]
fn duplicate_node_names_name_both_entries() {
    let text = r#"
cluster_name = "c"
[[nodes]]
name = "node-a"
address = "10.0.0.5:22"
[[nodes]]
name = "node-b"
address = "10.0.0.6:22"
[[nodes]]
name = "node-a"
address = "10.0.0.7:22"
"#;
    let err = error(text);
    assert_eq!(
        err.to_string(),
        "/etc/remoteler/proxy.toml: key `nodes[2].name`: expected a node name not already used \
         by `nodes[0].name`, found \"node-a\" (line 10, column 8)"
    );
}

#[test]
fn too_many_labels_are_rejected() {
    let labels: Vec<String> = (0..33).map(|i| format!("k{i} = \"v\"")).collect();
    let text = format!(
        "cluster_name = \"c\"\n[[nodes]]\nname = \"a\"\naddress = \"a:22\"\n[nodes.labels]\n{}\n",
        labels.join("\n")
    );
    let err = error(&text);
    assert_eq!(err.key(), Some("nodes[0].labels"), "{err}");
    assert!(
        err.to_string()
            .contains("expected at most 32 labels, found 33 labels"),
        "{err}"
    );
}

#[test]
fn listeners_on_port_zero_may_repeat() {
    let text = "cluster_name = \"c\"\n[listen]\nusers = \"127.0.0.1:0\"\ntunnels = \"127.0.0.1:0\"\nauth = \"127.0.0.1:0\"\nmetrics = \"127.0.0.1:0\"\n";
    assert!(parse(text).is_ok());
}

#[test]
fn load_reads_files_and_resolves_relative_paths_against_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, "cluster_name = \"c\"\ndata_dir = \"state\"\n").unwrap();
    let config = ProxyConfig::load(&path).unwrap();
    assert_eq!(config.data_dir, dir.path().join("state"));
    assert_eq!(config.audit.path, dir.path().join("state/audit.log"));

    std::fs::write(
        &path,
        "cluster_name = \"c\"\n[audit]\npath = \"logs/audit.log\"\n",
    )
    .unwrap();
    let config = ProxyConfig::load(&path).unwrap();
    assert_eq!(config.audit.path, dir.path().join("logs/audit.log"));
}

#[test]
fn a_missing_file_is_named_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.toml");
    let err = ProxyConfig::load(&path).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, ConfigError::Read { .. }), "{message}");
    assert!(
        message.starts_with(&path.display().to_string()),
        "{message}"
    );
    assert!(message.contains("no such file or directory"), "{message}");
    assert!(message.contains("create it"), "{message}");
    assert!(message.contains("config/examples/"), "{message}");

    let err = ProxyConfig::load(dir.path()).unwrap_err();
    assert!(err.to_string().contains("not of its directory"), "{err}");
}

#[test]
fn a_file_that_is_not_utf8_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, b"cluster_name = \"\xff\"\n").unwrap();
    let err = ProxyConfig::load(&path).unwrap_err();
    assert!(err.to_string().contains("save it as UTF-8 text"), "{err}");
}

#[test]
fn quick_start_matches_a_minimal_file() {
    let name = config::ClusterName::new("c").unwrap();
    let quick = ProxyConfig::with_data_dir(name, "/tmp/remoteler");
    let file = parse("cluster_name = \"c\"\ndata_dir = \"/tmp/remoteler\"\n").unwrap();
    assert_eq!(quick, file);
}

#[test]
fn roles_are_read_with_their_defaults() {
    let text = r#"
cluster_name = "c"
[[roles]]
name = "dev"
logins = ["{{user.logins}}", "ubuntu", "ubuntu"]
allow = { nodes = ["dev-*"], labels = { env = "dev", team = "*" } }
deny = { nodes = ["dev-db"] }
[[roles]]
name = "nothing"
"#;
    let config = parse(text).unwrap();
    assert_eq!(config.roles.len(), 2);
    let dev = &config.roles[0];
    assert_eq!(dev.name.as_str(), "dev");
    // Repeated logins are kept once.
    assert_eq!(
        dev.logins,
        vec![
            config::RoleLogin::UserLogins,
            config::RoleLogin::Name("ubuntu".into())
        ]
    );
    assert_eq!(dev.max_cert_ttl, config::DEFAULT_ROLE_MAX_CERT_TTL);
    assert_eq!(dev.allow.nodes, vec!["dev-*".to_owned()]);
    assert_eq!(dev.allow.labels.get("team"), Some("*"));
    assert_eq!(dev.deny.nodes, vec!["dev-db".to_owned()]);
    let nothing = &config.roles[1];
    assert!(nothing.logins.is_empty());
    assert!(nothing.allow.is_empty() && nothing.deny.is_empty());
}

#[test]
fn bad_roles_name_the_key() {
    let cases = [
        (
            "[[roles]]\nlogins = []\n",
            "roles[0].name",
            "a role name such as",
        ),
        (
            "[[roles]]\nname = \"a\"\n[[roles]]\nname = \"a\"\n",
            "roles[1].name",
            "not already used by `roles[0].name`",
        ),
        (
            "[[roles]]\nname = \"a\"\nlogins = [\"root\", \"Bad User\"]\n",
            "roles[0].logins[1]",
            "{{user.logins}}",
        ),
        (
            "[[roles]]\nname = \"a\"\nlogins = [\"{{user.login}}\"]\n",
            "roles[0].logins[0]",
            "a login of 1 to 63",
        ),
        (
            "[[roles]]\nname = \"a\"\nmax_cert_ttl = \"10s\"\n",
            "roles[0].max_cert_ttl",
            "1m",
        ),
        (
            "[[roles]]\nname = \"a\"\nallow = { nodes = [\"node a\"] }\n",
            "roles[0].allow.nodes[0]",
            "node name pattern",
        ),
        (
            "[[roles]]\nname = \"a\"\ndeny = { labels = { \"Env\" = \"x\" } }\n",
            "roles[0].deny.labels.Env",
            "label key",
        ),
        (
            "[[roles]]\nname = \"a\"\nallow = { node = [\"x\"] }\n",
            "roles[0].allow.node",
            "",
        ),
    ];
    for (body, key, expected) in cases {
        let text = format!("cluster_name = \"c\"\n{body}");
        let err = error(&text);
        assert_eq!(err.key(), Some(key), "{text}\n{err}");
        assert!(err.to_string().contains(expected), "{text}\n{err}");
        assert!(err.to_string().starts_with(PATH), "{err}");
    }
}

#[test]
fn trusted_clusters_are_read_with_their_defaults() {
    let pin = format!("sha256:{}", "ab".repeat(32));
    let text = format!(
        r#"
cluster_name = "leaf"
[[trusted_clusters]]
name = "root.example.com"
proxy = "root.example.com:3024"
token_file = "root.token"
ca_pin = "{pin}"
role_map = [{{ remote = "^team-(.+)$", local = ["$1", "base"] }}, {{ remote = "*", local = ["base"] }}]
[[trusted_clusters]]
name = "other"
proxy = "10.0.0.1:3024"
token = "secret-token"
ca_pin = "{pin}"
enabled = false
[[roles]]
name = "r"
allow = {{ clusters = ["leaf-*", "*"] }}
deny = {{ clusters = ["leaf-9"] }}
"#
    );
    let config = parse(&text).unwrap();
    let [root, other] = config.trusted_clusters.as_slice() else {
        panic!("{:?}", config.trusted_clusters)
    };
    assert!(root.enabled, "enabled defaults to true");
    assert!(!other.enabled);
    assert_eq!(root.join.ca_pin.to_string(), pin);
    // A relative token file is relative to the configuration file.
    assert_eq!(
        root.join.token,
        config::JoinToken::File("/etc/remoteler/root.token".into())
    );
    assert!(format!("{other:?}").contains("MASKED"), "{other:?}");
    assert!(!format!("{other:?}").contains("secret-token"));
    assert_eq!(
        root.role_map.map(&["team-blue".into(), "x".into()]),
        ["blue", "base"]
    );
    assert_eq!(config.roles[0].allow.clusters, ["leaf-*", "*"]);
    assert_eq!(config.roles[0].deny.clusters, ["leaf-9"]);
    assert!(
        parse("cluster_name = \"c\"\n")
            .unwrap()
            .trusted_clusters
            .is_empty()
    );
}

#[test]
fn bad_trusted_clusters_name_the_key() {
    let pin = format!("sha256:{}", "ab".repeat(32));
    let entry = |extra: &str| {
        format!(
            "cluster_name = \"c\"\n[[trusted_clusters]]\nname = \"root\"\nproxy = \"r:3024\"\nca_pin = \"{pin}\"\n{extra}"
        )
    };
    let cases = [
        (
            "cluster_name = \"c\"\n[[trusted_clusters]]\nproxy = \"r:3024\"\n".to_owned(),
            "trusted_clusters[0].name",
            "root cluster's name",
        ),
        (
            "cluster_name = \"c\"\n[[trusted_clusters]]\nname = \"root\"\nproxy = \"r:3024\"\n"
                .to_owned(),
            "trusted_clusters[0].ca_pin",
            "pin",
        ),
        (
            entry("token = \"a\"\ntoken_file = \"/t\"\n"),
            "trusted_clusters[0].token_file",
            "not both",
        ),
        (
            entry("role_map = [{ remote = \"^team-($\", local = [\"x\"] }]\n"),
            "trusted_clusters[0].role_map[0].remote",
            "anchored",
        ),
        (
            entry("role_map = [{ remote = \"dev\", local = [\"Not A Role\"] }]\n"),
            "trusted_clusters[0].role_map[0].local[0]",
            "role name",
        ),
        (
            entry("role_map = [{ remote = \"dev\" }]\n"),
            "trusted_clusters[0].role_map[0].local",
            "role names",
        ),
        (
            entry("enabled = \"yes\"\n"),
            "trusted_clusters[0].enabled",
            "",
        ),
        (
            format!(
                "{}[[trusted_clusters]]\nname = \"root\"\nproxy = \"r:3024\"\nca_pin = \"{pin}\"\n",
                entry("")
            ),
            "trusted_clusters[1].name",
            "not already used",
        ),
        (
            "cluster_name = \"c\"\n[[roles]]\nname = \"a\"\nallow = { clusters = [\"Leaf\"] }\n"
                .to_owned(),
            "roles[0].allow.clusters[0]",
            "cluster name pattern",
        ),
    ];
    for (text, key, expected) in cases {
        let err = error(&text);
        assert_eq!(err.key(), Some(key), "{text}\n{err}");
        assert!(err.to_string().contains(expected), "{text}\n{err}");
    }
}

#[test]
fn login_lockout_keys() {
    let config = parse("cluster_name = \"example.com\"\n").unwrap();
    assert_eq!(config.limits.login_lockout_failures, 10);
    assert_eq!(config.limits.login_lockout, Duration::from_secs(15 * 60));
    let config =
        parse("cluster_name = \"example.com\"\n[limits]\nlogin_lockout_failures = 3\nlogin_lockout = \"90s\"\n")
            .unwrap();
    assert_eq!(config.limits.login_lockout_failures, 3);
    assert_eq!(config.limits.login_lockout, Duration::from_secs(90));
    for (text, key, expected) in [
        (
            "cluster_name = \"example.com\"\n[limits]\nlogin_lockout_failures = 0",
            "limits.login_lockout_failures",
            "an integer from 1 to 1000",
        ),
        (
            "cluster_name = \"example.com\"\n[limits]\nlogin_lockout = \"0s\"",
            "limits.login_lockout",
            "a duration from 1s to 1d",
        ),
    ] {
        let message = error(text).to_string();
        assert!(
            message.contains(key) && message.contains(expected),
            "{message}"
        );
    }
}

#[test]
fn register_networks_and_leaf_limits_parse() {
    let config = parse(
        "cluster_name = \"example.com\"\n[auth]\nregister_networks = [\"10.0.0.0/8\", \"fd00::/64\", \"127.0.0.0/8\"]\n\
         [limits]\nmax_streams_per_tunnel = 100\nmax_tunnels_per_cluster = 8\nmax_announced_nodes = 500\n",
    )
    .unwrap();
    let networks: Vec<String> = config
        .auth
        .register_networks
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(networks, ["10.0.0.0/8", "fd00::/64", "127.0.0.0/8"]);
    assert!(config.auth.register_networks[2].is_loopback());
    assert_eq!(config.limits.max_tunnels_per_cluster, 8);
    assert_eq!(config.limits.max_announced_nodes, 500);
    // Unset, the per-user share follows the per-tunnel limit.
    assert_eq!(config.limits.max_streams_per_user_per_node, 25);

    let defaults = parse("cluster_name = \"example.com\"\n").unwrap();
    assert!(defaults.auth.register_networks.is_empty());
    assert_eq!(defaults.limits.max_tunnels_per_cluster, 64);
    assert_eq!(defaults.limits.max_announced_nodes, 10_000);
    assert_eq!(defaults.limits.max_streams_per_user_per_node, 256);

    let set =
        parse("cluster_name = \"example.com\"\n[limits]\nmax_streams_per_user_per_node = 3\n")
            .unwrap();
    assert_eq!(set.limits.max_streams_per_user_per_node, 3);

    let err = error(
        "cluster_name = \"example.com\"\n[auth]\nregister_networks = [\"10.0.0.0/8\", \"10.0.0.1/8\"]\n",
    );
    assert_eq!(err.key(), Some("auth.register_networks[1]"), "{err}");
    assert!(err.to_string().contains("CIDR"), "{err}");
    let err = error("cluster_name = \"example.com\"\n[auth]\nnetworks = []\n");
    assert!(err.to_string().contains("networks"), "{err}");
    let err = error("cluster_name = \"example.com\"\n[limits]\nmax_tunnels_per_cluster = 0\n");
    assert_eq!(err.key(), Some("limits.max_tunnels_per_cluster"), "{err}");
}
