//! Every file under `config/examples/` parses with the type its name says, and the commented
//! `proxy.toml` really shows the defaults.

use std::path::{Path, PathBuf};

use config::{
    AgentConfig, AgentMode, BackoffConfig, ClusterName, FlowConfig, KeepaliveConfig, LogConfig,
    ProxyConfig, RoleLogin,
};

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

fn example_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(examples_dir())
        .expect("config/examples/ exists")
        .map(|entry| entry.expect("readable directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_example_parses_with_its_type() {
    let files = example_files();
    // A glob that matches nothing must fail, not pass.
    assert!(
        files.len() >= 4,
        "expected at least 4 example files in {}, found {files:?}",
        examples_dir().display()
    );
    for path in &files {
        let name = path.file_name().unwrap().to_str().unwrap();
        if name == "proxy.toml" || name.starts_with("proxy-") {
            ProxyConfig::load(path).unwrap_or_else(|e| panic!("{e}"));
        } else if name.starts_with("agent-") {
            AgentConfig::load(path).unwrap_or_else(|e| panic!("{e}"));
        } else {
            panic!("{name}: example files are named proxy.toml, proxy-*.toml or agent-*.toml");
        }
    }
}

#[test]
fn commented_proxy_example_shows_the_defaults() {
    let path = examples_dir().join("proxy.toml");
    let loaded = ProxyConfig::load(&path).unwrap();
    let defaults = ProxyConfig::with_data_dir(
        ClusterName::new("example.com").unwrap(),
        config::DEFAULT_PROXY_DATA_DIR,
    );
    // The example lists two nodes and two roles to show their shape; every other value must be
    // the default.
    assert_eq!(loaded.nodes.len(), 2);
    assert_eq!(loaded.roles.len(), 2);
    assert_eq!(loaded.roles[0].name.as_str(), "dev");
    assert_eq!(
        loaded.roles[0].logins,
        vec![RoleLogin::UserLogins, RoleLogin::Name("ubuntu".into())]
    );
    assert_eq!(loaded.roles[0].deny.labels.get("env"), Some("prod"));
    assert_eq!(
        loaded.roles[1].max_cert_ttl,
        std::time::Duration::from_secs(3600)
    );
    let loaded = ProxyConfig {
        nodes: Vec::new(),
        roles: Vec::new(),
        ..loaded
    };
    assert_eq!(loaded, defaults);
}

#[test]
fn minimal_proxy_example_is_all_defaults() {
    let loaded = ProxyConfig::load(&examples_dir().join("proxy-minimal.toml")).unwrap();
    let defaults = ProxyConfig::with_data_dir(
        ClusterName::new("example.com").unwrap(),
        config::DEFAULT_PROXY_DATA_DIR,
    );
    assert_eq!(loaded, defaults);
}

#[test]
fn agent_examples_show_the_defaults_and_their_mode() {
    let tunnel = AgentConfig::load(&examples_dir().join("agent-tunnel.toml")).unwrap();
    assert!(matches!(&tunnel.mode, AgentMode::Tunnel { proxy } if proxy.port() == 3024));
    assert_eq!(tunnel.keepalive, KeepaliveConfig::default());
    assert_eq!(tunnel.backoff, BackoffConfig::default());
    assert_eq!(tunnel.flow, FlowConfig::default());
    assert_eq!(tunnel.log, LogConfig::default());
    assert_eq!(tunnel.forwards, config::Forwards::default());
    assert_eq!(tunnel.data_dir, Path::new(config::DEFAULT_AGENT_DATA_DIR));

    let auth = AgentConfig::load(&examples_dir().join("agent-auth.toml")).unwrap();
    match &auth.mode {
        AgentMode::Direct { auth, ssh_address } => {
            assert_eq!(auth.to_string(), "10.0.0.1:3025");
            assert_eq!(ssh_address.to_string(), "10.0.0.7:22");
        }
        other => panic!("expected auth mode, found {other:?}"),
    }
}

#[test]
fn leaf_proxy_example_trusts_one_root() {
    let loaded = ProxyConfig::load(&examples_dir().join("proxy-leaf.toml")).unwrap();
    let [root] = loaded.trusted_clusters.as_slice() else {
        panic!(
            "expected one trusted cluster: {:?}",
            loaded.trusted_clusters
        );
    };
    assert_eq!(root.name.as_str(), "root.example.com");
    assert!(root.enabled);
    assert_eq!(root.role_map.map(&["admin".into()]), ["lab-ops"]);
    assert_eq!(root.role_map.map(&["team-x".into()]), ["viewer"]);
    assert!(root.role_map.map(&["intern".into()]).is_empty());
}
