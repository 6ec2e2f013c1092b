//! The agent's file: modes, join tokens and secrets, forwards, backoff.

use std::path::Path;
use std::time::Duration;

use config::{AgentConfig, AgentMode, ConfigError, JoinToken, Secret};

const PATH: &str = "/etc/remoteler/agent.toml";
const PIN: &str = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
const TOKEN: &str = "tok-5f1e2d3c4b5a69788796a5b4c3d2e1f0";

fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
    AgentConfig::from_toml_str(text, PATH)
}

fn error(text: &str) -> ConfigError {
    match parse(text) {
        Ok(config) => panic!("expected an error for:\n{text}\ngot {config:?}"),
        Err(e) => e,
    }
}

/// A tunnel-mode agent with `rest` appended at the top level (before `[join]`).
fn tunnel_agent(rest: &str) -> String {
    format!(
        "node_name = \"node-r1\"\nproxy = \"proxy.example.com:3024\"\n{rest}\n[join]\nca_pin = \"{PIN}\"\n"
    )
}

fn assert_rule(err: &ConfigError, key: &str, expected: &str, found: &str) {
    let message = err.to_string();
    assert_eq!(err.key(), Some(key), "{message}");
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
}

#[test]
fn defaults_are_applied() {
    let config = parse(&tunnel_agent("")).unwrap();
    assert_eq!(config.node_name.as_str(), "node-r1");
    assert!(config.labels.is_empty());
    match &config.mode {
        AgentMode::Tunnel { proxy } => assert_eq!(proxy.to_string(), "proxy.example.com:3024"),
        other => panic!("expected tunnel mode, found {other:?}"),
    }
    assert_eq!(config.data_dir, Path::new("/var/lib/remoteler-agent"));
    assert_eq!(config.join.token, JoinToken::None);
    assert_eq!(config.join.ca_pin.to_string(), PIN);
    let forwards: Vec<_> = config.forwards.iter().collect();
    assert_eq!(forwards.len(), 1);
    assert_eq!(forwards[0].name.as_str(), "ssh");
    assert_eq!(forwards[0].target.to_string(), "127.0.0.1:22");
    assert_eq!(config.keepalive.interval, Duration::from_secs(10));
    assert_eq!(config.keepalive.count, 3);
    assert_eq!(config.backoff.min(), Duration::from_secs(1));
    assert_eq!(config.backoff.max(), Duration::from_secs(60));
    assert_eq!(config.flow.window(), 1 << 20);
    assert_eq!(config.flow.max_frame(), 64 << 10);
    assert_eq!(config.log.format, config::LogFormat::Text);
}

#[test]
fn auth_mode_dials_the_ssh_forward_by_default() {
    let text = format!(
        "node_name = \"node-c\"\nauth = \"10.0.0.1:3025\"\n[join]\nca_pin = \"{PIN}\"\n\
         [[forwards]]\nname = \"web\"\ntarget = \"127.0.0.1:8080\"\n\
         [[forwards]]\nname = \"ssh\"\ntarget = \"10.0.0.7:2222\"\n"
    );
    let config = parse(&text).unwrap();
    match &config.mode {
        AgentMode::Direct { auth, ssh_address } => {
            assert_eq!(auth.to_string(), "10.0.0.1:3025");
            assert_eq!(ssh_address.to_string(), "10.0.0.7:2222");
        }
        other => panic!("expected auth mode, found {other:?}"),
    }
    assert_eq!(config.forwards.get("web").unwrap().target.port(), 8080);

    let text =
        format!("node_name = \"node-c\"\nauth = \"10.0.0.1:3025\"\n[join]\nca_pin = \"{PIN}\"\n");
    match parse(&text).unwrap().mode {
        AgentMode::Direct { ssh_address, .. } => {
            assert_eq!(ssh_address.to_string(), "127.0.0.1:22")
        }
        other => panic!("expected auth mode, found {other:?}"),
    }
}

#[test]
fn proxy_and_auth_are_exclusive() {
    let both = format!(
        "node_name = \"n\"\nproxy = \"p:3024\"\nauth = \"p:3025\"\n[join]\nca_pin = \"{PIN}\"\n"
    );
    assert_rule(
        &error(&both),
        "auth",
        "either `proxy`",
        "both `proxy` and `auth`",
    );

    let neither = format!("node_name = \"n\"\n[join]\nca_pin = \"{PIN}\"\n");
    assert_rule(
        &error(&neither),
        "proxy",
        "either `proxy`",
        "nothing (the key is required)",
    );

    let stray = tunnel_agent("ssh_address = \"10.0.0.7:22\"");
    assert_rule(
        &error(&stray),
        "ssh_address",
        "only used with `auth`",
        "\"10.0.0.7:22\"",
    );

    let no_ssh = format!(
        "node_name = \"n\"\nauth = \"p:3025\"\n[join]\nca_pin = \"{PIN}\"\n\
         [[forwards]]\nname = \"web\"\ntarget = \"127.0.0.1:80\"\n"
    );
    assert_rule(
        &error(&no_ssh),
        "ssh_address",
        "no forward is named \"ssh\"",
        "nothing",
    );
}

#[test]
fn the_token_never_appears_in_debug_output() {
    let text = format!(
        "node_name = \"n\"\nproxy = \"p:3024\"\n[join]\ntoken = \"{TOKEN}\"\nca_pin = \"{PIN}\"\n"
    );
    let config = parse(&text).unwrap();
    let debug = format!("{config:?}");
    assert!(!debug.contains(TOKEN), "{debug}");
    assert!(debug.contains("MASKED"), "{debug}");
    assert!(!format!("{config:#?}").contains(TOKEN));
    match &config.join.token {
        JoinToken::Inline(secret) => {
            assert_eq!(secret.expose(), TOKEN);
            assert_eq!(format!("{secret:?}"), "MASKED");
            assert_eq!(format!("{secret}"), "MASKED");
        }
        other => panic!("expected an inline token, found {other:?}"),
    }
    let loaded = config.join.token.load().unwrap().unwrap();
    assert_eq!(loaded.expose(), TOKEN);
}

#[test]
fn token_errors_never_show_the_token() {
    let cases = [
        format!("token = \"{TOKEN} {TOKEN}\""),
        format!("token = [\"{TOKEN}\"]"),
        "token = 123456789".to_owned(),
        format!("token = {{ value = \"{TOKEN}\" }}"),
    ];
    for case in cases {
        let text =
            format!("node_name = \"n\"\nproxy = \"p:3024\"\n[join]\nca_pin = \"{PIN}\"\n{case}\n");
        let err = error(&text);
        let message = err.to_string();
        assert_eq!(err.key(), Some("join.token"), "{message}");
        assert!(!message.contains(TOKEN), "{message}");
        assert!(!message.contains("123456789"), "{message}");
        assert!(!format!("{err:?}").contains(TOKEN), "{err:?}");
    }
    let empty = format!(
        "node_name = \"n\"\nproxy = \"p:3024\"\n[join]\nca_pin = \"{PIN}\"\ntoken = \"\"\n"
    );
    assert_rule(
        &error(&empty),
        "join.token",
        "a join token of 1 to 512",
        "an empty token",
    );
}

#[test]
fn token_and_token_file_are_exclusive() {
    let text = format!(
        "node_name = \"n\"\nproxy = \"p:3024\"\n[join]\nca_pin = \"{PIN}\"\ntoken = \"{TOKEN}\"\ntoken_file = \"/etc/remoteler/token\"\n"
    );
    let err = error(&text);
    assert_rule(
        &err,
        "join.token_file",
        "either `token` or `token_file`",
        "both",
    );
    assert!(!err.to_string().contains(TOKEN));
}

#[test]
fn token_file_is_resolved_and_read_on_demand() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        format!(
            "node_name = \"n\"\nproxy = \"p:3024\"\ndata_dir = \"state\"\n[join]\nca_pin = \"{PIN}\"\ntoken_file = \"join-token\"\n"
        ),
    )
    .unwrap();
    let config = AgentConfig::load(&path).unwrap();
    assert_eq!(config.data_dir, dir.path().join("state"));
    let token_path = dir.path().join("join-token");
    assert_eq!(config.join.token, JoinToken::File(token_path.clone()));

    // Not there yet: the error names the file and says what to do, and loading the config
    // did not need it.
    let err = config.join.token.load().unwrap_err();
    assert_eq!(err.path(), token_path);
    assert!(
        err.to_string().contains("remoteler-proxy tokens add"),
        "{err}"
    );

    std::fs::write(&token_path, format!("{TOKEN}\n")).unwrap();
    let secret: Secret = config.join.token.load().unwrap().unwrap();
    assert_eq!(secret.expose(), TOKEN);

    std::fs::write(&token_path, format!("{TOKEN} trailing words\n")).unwrap();
    let err = config.join.token.load().unwrap_err();
    assert!(!err.to_string().contains(TOKEN), "{err}");
}

#[test]
fn every_rule_names_file_key_expectation_and_finding() {
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "labels = { \"Bad Key\" = \"x\" }",
            "labels.\"Bad Key\"",
            "a label key",
            "\"Bad Key\"",
        ),
        ("data_dir = \"\"", "data_dir", "a path", "\"\""),
        (
            "[keepalive]\ncount = 0",
            "keepalive.count",
            "an integer from 1 to 100",
            "0",
        ),
        (
            "[keepalive]\ninterval = \"fast\"",
            "keepalive.interval",
            "a duration such as",
            "\"fast\"",
        ),
        (
            "[backoff]\nmin = \"10ms\"",
            "backoff.min",
            "a duration from 100ms to 1h",
            "\"10ms\"",
        ),
        (
            "[backoff]\nmax = \"2h\"",
            "backoff.max",
            "a duration from 100ms to 1h",
            "\"2h\"",
        ),
        (
            "[backoff]\nmin = \"10s\"\nmax = \"5s\"",
            "backoff.max",
            "no shorter than `backoff.min` (10s)",
            "\"5s\"",
        ),
        (
            "[flow]\nmax_frame = \"1MiB\"",
            "flow.max_frame",
            "a size from 1KiB to 64KiB",
            "\"1MiB\"",
        ),
        (
            "[log]\nformat = \"yaml\"",
            "log.format",
            "\"text\" or \"json\"",
            "\"yaml\"",
        ),
        (
            "forwards = []",
            "forwards",
            "1 to 64 forwards",
            "0 forwards",
        ),
        (
            "[[forwards]]\nname = \"ssh\"",
            "forwards[0].target",
            "host:port",
            "nothing",
        ),
        (
            "[[forwards]]\ntarget = \"127.0.0.1:22\"",
            "forwards[0].name",
            "a service name",
            "nothing",
        ),
        (
            "[[forwards]]\nname = \"SSH\"\ntarget = \"127.0.0.1:22\"",
            "forwards[0].name",
            "a service name of 1 to 63",
            "\"SSH\"",
        ),
        (
            "[[forwards]]\nname = \"ssh\"\ntarget = \"localhost\"",
            "forwards[0].target",
            "a host and port",
            "\"localhost\"",
        ),
        (
            "[[forwards]]\nname = \"ssh\"\ntarget = \"x:22\"\nport = 22",
            "forwards[0].port",
            "one of `name`, `target`",
            "an unknown key",
        ),
    ];
    for (rest, key, expected, found) in cases {
        assert_rule(&error(&tunnel_agent(rest)), key, expected, found);
    }

    let cases: &[(String, &str, &str, &str)] = &[
        (
            format!("proxy = \"p:1\"\n[join]\nca_pin = \"{PIN}\"\n"),
            "node_name",
            "a node name",
            "nothing",
        ),
        (
            format!("node_name = \"Node 1\"\nproxy = \"p:1\"\n[join]\nca_pin = \"{PIN}\"\n"),
            "node_name",
            "a node name of 1 to 63",
            "\"Node 1\"",
        ),
        (
            format!("node_name = \"n\"\nproxy = \"p\"\n[join]\nca_pin = \"{PIN}\"\n"),
            "proxy",
            "a host and port",
            "\"p\"",
        ),
        (
            format!("node_name = \"n\"\nauth = \"p:x\"\n[join]\nca_pin = \"{PIN}\"\n"),
            "auth",
            "a port from 1 to 65535",
            "\"p:x\"",
        ),
        (
            "node_name = \"n\"\nproxy = \"p:1\"\n".to_owned(),
            "join",
            "a [join] table",
            "nothing",
        ),
        (
            "node_name = \"n\"\nproxy = \"p:1\"\n[join]\n".to_owned(),
            "join.ca_pin",
            "\"sha256:\" followed by 64 lowercase hex digits",
            "nothing",
        ),
        (
            "node_name = \"n\"\nproxy = \"p:1\"\n[join]\nca_pin = \"sha256:ABC\"\n".to_owned(),
            "join.ca_pin",
            "\"sha256:\" followed by 64 lowercase hex digits",
            "\"sha256:ABC\"",
        ),
        (
            format!(
                "node_name = \"n\"\nproxy = \"p:1\"\n[join]\nca_pin = \"{PIN}\"\npin = \"x\"\n"
            ),
            "join.pin",
            "`ca_pin`",
            "an unknown key",
        ),
    ];
    for (text, key, expected, found) in cases {
        assert_rule(&error(text), key, expected, found);
    }
}

#[test]
fn duplicate_forwards_name_both_entries() {
    let text = tunnel_agent(
        "[[forwards]]\nname = \"ssh\"\ntarget = \"127.0.0.1:22\"\n\
         [[forwards]]\nname = \"web\"\ntarget = \"127.0.0.1:80\"\n\
         [[forwards]]\nname = \"ssh\"\ntarget = \"127.0.0.1:2222\"",
    );
    let err = error(&text);
    assert_rule(
        &err,
        "forwards[2].name",
        "not already used by `forwards[0].name`",
        "\"ssh\"",
    );
    assert_eq!(err.location().map(|l| l.line), Some(10), "{err}");
}

#[test]
fn quick_start_matches_a_minimal_file() {
    let file = parse(&tunnel_agent("")).unwrap();
    let quick = AgentConfig::new(file.node_name.clone(), file.mode.clone(), file.join.clone());
    assert_eq!(quick, file);
}

/// `ssh_host_key` / `ssh_host_cert`: default the local ed25519 host key with its certificate
/// beside it; a set key derives the certificate path the OpenSSH way; "" turns it off;
/// relative paths are the file's directory's.
#[test]
fn ssh_host_key_and_cert() {
    use config::HostCertConfig;
    let config = parse(&tunnel_agent("")).unwrap();
    assert_eq!(
        config.host_cert,
        HostCertConfig::Default {
            host_key: "/etc/ssh/ssh_host_ed25519_key.pub".into(),
            cert: "/etc/ssh/ssh_host_ed25519_key-cert.pub".into(),
        }
    );
    let config = parse(&tunnel_agent("ssh_host_key = \"keys/host.pub\"")).unwrap();
    assert_eq!(
        config.host_cert,
        HostCertConfig::Configured {
            host_key: "/etc/remoteler/keys/host.pub".into(),
            cert: "/etc/remoteler/keys/host-cert.pub".into(),
        }
    );
    let config = parse(&tunnel_agent(
        "ssh_host_key = \"/k.pub\"\nssh_host_cert = \"/var/lib/remoteler-agent/c.pub\"",
    ))
    .unwrap();
    assert_eq!(
        config.host_cert.paths().unwrap().1,
        Path::new("/var/lib/remoteler-agent/c.pub")
    );
    let config = parse(&tunnel_agent("ssh_host_key = \"\"")).unwrap();
    assert_eq!(config.host_cert, HostCertConfig::Off);
    let err = error(&tunnel_agent("ssh_host_cert = \"\""));
    assert_eq!(err.key(), Some("ssh_host_cert"), "{err}");
}
