//! Names belong to whoever was given them: node tokens bound to names, node names owned by
//! the key that joined them, leaf cluster names owned by their CA, tokens of the wrong kind
//! not spent, refused joins not written to disk. Real binary, crafted joins.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;

use common::*;
use tunnel::control::{ALPN_CLUSTER_JOIN, ClusterJoinRequest, ControlError, JoinResponse};
use tunnel::identity::{ClusterCa, PrivateKey};

fn refusal(result: Result<Credential, ControlError>) -> (String, String) {
    match result {
        Err(ControlError::Refused(body)) => (body.code, body.message),
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("expected a refusal, got a certificate"),
    }
}

/// A source group (/24) of its own per test step: refused joins count against their group
/// (`guard::AUTH_FAILURE_LIMIT`), and this test is not about that.
fn source(n: u8) -> IpAddr {
    [127, 13, n, 1].into()
}

async fn join_as(
    proxy: &Proxy,
    n: u8,
    token: &str,
    node: &str,
) -> Result<Credential, ControlError> {
    join_with_key(
        proxy,
        source(n),
        token,
        node,
        PrivateKey::generate().unwrap(),
    )
    .await
}

/// Waits until `node` shows as a tunnel node in `nodes ls`.
async fn wait_online(proxy: &Proxy, node: &str) {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let text = stdout(&cli(&proxy.data, &["nodes", "ls"]));
        if text
            .lines()
            .any(|l| l.starts_with(node) && l.contains("tunnel") && l.contains("yes"))
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{node} never came online: {text}"
        );
        monoio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[test]
fn node_names_belong_to_the_key_that_joined_them() {
    let echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = Proxy::start(Some(&format!(
        "[[nodes]]\nname = \"node-a\"\naddress = \"{}\"\n",
        echo.local_addr().unwrap()
    )));
    let (first, _) = token_with_id(&proxy, &["--kind", "node"]);
    let (spare, spare_id) = token_with_id(&proxy, &["--kind", "node", "--uses", "5"]);
    let (bound, bound_id) = token_with_id(&proxy, &["--kind", "node", "--node", "edge-*"]);
    let (replace, _) = token_with_id(
        &proxy,
        &["--kind", "node", "--node", "node-r1", "--replace"],
    );

    let listing = stdout(&cli(&proxy.data, &["tokens", "ls"]));
    let row = |id: &str| {
        listing
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap()
            .to_owned()
    };
    assert!(row(&bound_id).ends_with(" edge-*"), "{listing}");
    assert!(row(&spare_id).ends_with(" -"), "{listing}");
    assert!(listing.contains(" node-r1 (replace)"), "{listing}");

    block_on(async {
        // The real node-r1 joins and brings its tunnel up.
        let key = PrivateKey::generate().unwrap();
        let kept = PrivateKey::from_der(&key.to_rustls()).unwrap();
        let real = join_with_key(&proxy, source(1), &first, "node-r1", key)
            .await
            .unwrap();
        let _tunnel = agent(&proxy, &real, "node-r1").await;
        wait_online(&proxy, "node-r1").await;

        // An impostor with a valid token for a new device: node-r1 is owned by another key.
        let (code, message) = refusal(join_as(&proxy, 2, &spare, "node-r1").await);
        assert_eq!(code, "name_taken", "{message}");
        assert!(
            message.contains("another key")
                && message.contains("tokens add --kind node --node node-r1 --replace")
                && message.contains("nodes rm node-r1"),
            "{message}"
        );
        // A static node's name.
        let (code, message) = refusal(join_as(&proxy, 3, &spare, "node-a").await);
        assert_eq!(code, "name_taken", "{message}");
        assert!(message.contains("static node"), "{message}");
        // The real node, having lost its certificate but kept its key, joins again (its
        // tunnel is still up).
        join_with_key(&proxy, source(7), &spare, "node-r1", kept)
            .await
            .unwrap();
        // A live tunnel whose key the state file does not know (a node joined before keys
        // were recorded): the tunnel alone keeps the name.
        let mut state = state_json(&proxy);
        state.as_object_mut().unwrap().remove("node_keys");
        std::fs::write(
            proxy.data.join("state.json"),
            serde_json::to_vec_pretty(&state).unwrap(),
        )
        .unwrap();
        let (code, message) = refusal(join_as(&proxy, 4, &spare, "node-r1").await);
        assert_eq!(code, "name_taken", "{message}");
        assert!(message.contains("live tunnel"), "{message}");
        assert_eq!(
            uses_left(&proxy, &spare_id),
            4,
            "a refused join spent a use"
        );

        // A token bound to `edge-*` joins an edge name and nothing else.
        let (code, message) = refusal(join_as(&proxy, 5, &bound, "node-b").await);
        assert_eq!(code, "token_wrong_node", "{message}");
        assert_eq!(uses_left(&proxy, &bound_id), 1);
        join_as(&proxy, 6, &bound, "edge-1").await.unwrap();

        // With the operator's consent (`--replace`), a new key takes the name over...
        join_as(&proxy, 8, &replace, "node-r1").await.unwrap();
        // ...and owns it from then on: the old key is now the stranger.
        let (code, _) = refusal(join_as(&proxy, 9, &spare, "node-r1").await);
        assert_eq!(code, "name_taken");
    });

    let audit = proxy.audit_when(|records| {
        records
            .iter()
            .filter(|r| r["event"] == "join" && r["code"] == "name_taken")
            .count()
            >= 4
    });
    let taken = audit
        .iter()
        .find(|r| r["event"] == "join" && r["code"] == "name_taken")
        .unwrap();
    assert_eq!(taken["success"], false);
    assert_eq!(taken["node"], "node-r1");
    assert!(
        taken["reason"].as_str().unwrap().contains("--replace"),
        "{taken}"
    );
    assert!(
        audit
            .iter()
            .any(|r| r["event"] == "join" && r["code"] == "token_wrong_node")
    );
}

/// A leaf's cluster join: `ca_pem` as the leaf's CA, with the proof of its key made by
/// `prover` (the leaf's CA, or an impostor's), for the root `test.example`.
async fn cluster_join_proved(
    proxy: &Proxy,
    n: u8,
    token: &str,
    leaf: &str,
    ca_pem: String,
    prover: Option<&ClusterCa>,
) -> Result<JoinResponse, ControlError> {
    let key = PrivateKey::generate().unwrap();
    let ca_proof_pem = prover.map_or_else(String::new, |ca| {
        let validity = tunnel::identity::Validity::for_ttl(
            std::time::SystemTime::now(),
            std::time::Duration::from_secs(600),
        )
        .unwrap();
        let proof = ca
            .issue_cluster("test.example", &key.public_key(), validity)
            .unwrap();
        tunnel::identity::certificates_to_pem(&[proof])
    });
    let request = ClusterJoinRequest {
        token: token.into(),
        cluster: leaf.into(),
        ca_pem,
        public_key: tunnel::control::to_hex(&key.public_key().to_spki_der()),
        ca_proof_pem,
        ssh_host_ca: None,
    };
    exchange_from(proxy, source(n), ALPN_CLUSTER_JOIN, &request).await
}

/// An honest leaf's cluster join with its CA `ca`.
async fn cluster_join(
    proxy: &Proxy,
    n: u8,
    token: &str,
    leaf: &str,
    ca: &ClusterCa,
) -> Result<JoinResponse, ControlError> {
    cluster_join_proved(proxy, n, token, leaf, ca.certificate_pem(), Some(ca)).await
}

fn code_of<T>(result: Result<T, ControlError>) -> (String, String) {
    match result {
        Err(ControlError::Refused(body)) => (body.code, body.message),
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("expected a refusal, got an answer"),
    }
}

#[test]
fn leaf_names_belong_to_the_ca_that_joined_them() {
    let proxy = Proxy::start(None);
    let (first, _) = token_with_id(&proxy, &["--kind", "trusted-cluster"]);
    let (spare, spare_id) = token_with_id(&proxy, &["--kind", "trusted-cluster", "--uses", "5"]);
    let (replace, _) = token_with_id(&proxy, &["--kind", "trusted-cluster", "--replace"]);
    let real = ClusterCa::generate("leaf.example").unwrap();
    let fake = ClusterCa::generate("leaf.example").unwrap();

    block_on(async {
        cluster_join(&proxy, 20, &first, "leaf.example", &real)
            .await
            .unwrap();
        // Another CA for the same leaf name: refused, with what the operator can do.
        let (code, message) =
            code_of(cluster_join(&proxy, 21, &spare, "leaf.example", &fake).await);
        assert_eq!(code, "name_taken", "{message}");
        assert!(
            message.contains("another CA")
                && message.contains("tokens add --kind trusted-cluster --replace")
                && message.contains("clusters rm leaf.example"),
            "{message}"
        );
        // What is presented as the leaf's CA must be one CA certificate of that leaf.
        let key = PrivateKey::generate().unwrap();
        let validity = tunnel::identity::Validity::for_ttl(
            std::time::SystemTime::now(),
            std::time::Duration::from_secs(3600),
        )
        .unwrap();
        let not_a_ca = tunnel::identity::certificates_to_pem(&[fake
            .issue_node("node-x", &key.public_key(), validity)
            .unwrap()]);
        let other_cluster = ClusterCa::generate("other.example").unwrap();
        for (n, pem, expected) in [
            (22, not_a_ca, "not a CA certificate"),
            (
                23,
                other_cluster.certificate_pem(),
                "not of the joining leaf",
            ),
            (
                24,
                format!("{}{}", fake.certificate_pem(), real.certificate_pem()),
                "2 certificates",
            ),
            (25, "junk".to_owned(), "no PEM certificate"),
        ] {
            let (code, message) = code_of(
                cluster_join_proved(&proxy, n, &spare, "leaf.example", pem, Some(&fake)).await,
            );
            assert_eq!(code, "bad_request", "{message}");
            assert!(message.contains(expected), "{expected}: {message}");
        }
        // The real leaf's CA certificate is public (its proxy shows it in every handshake):
        // presented without proof of its key, or with a proof by another CA, it is refused.
        for (n, prover) in [(28, None), (29, Some(&fake))] {
            let (code, message) = code_of(
                cluster_join_proved(
                    &proxy,
                    n,
                    &spare,
                    "leaf.example",
                    real.certificate_pem(),
                    prover,
                )
                .await,
            );
            assert_eq!(code, "bad_ca_proof", "{message}");
        }
        assert_eq!(
            uses_left(&proxy, &spare_id),
            5,
            "a refused join spent a use"
        );
        // The leaf's own CA may join again (a leaf that lost its stored certificate).
        cluster_join(&proxy, 26, &spare, "leaf.example", &real)
            .await
            .unwrap();
        // With `--replace`, another CA takes the name over.
        cluster_join(&proxy, 27, &replace, "leaf.example", &fake)
            .await
            .unwrap();
    });
    let leaves = state_json(&proxy)["trusted_leaves"].clone();
    assert_eq!(leaves.as_array().unwrap().len(), 1);
    assert_eq!(
        leaves[0]["ca_pem"].as_str().unwrap(),
        fake.certificate_pem().as_str()
    );
    let audit = proxy.audit_when(|records| {
        records
            .iter()
            .any(|r| r["event"] == "cluster.join" && r["code"] == "name_taken")
    });
    let taken = audit
        .iter()
        .find(|r| r["event"] == "cluster.join" && r["code"] == "name_taken")
        .unwrap();
    assert_eq!(taken["success"], false);
    assert_eq!(taken["cluster"], "leaf.example");
}

#[test]
fn a_token_of_the_wrong_kind_is_refused_and_not_spent() {
    let proxy = Proxy::start(None);
    let (node, node_id) = token_with_id(&proxy, &["--kind", "node"]);
    let (cluster, cluster_id) = token_with_id(&proxy, &["--kind", "trusted-cluster"]);
    let ca = ClusterCa::generate("leaf.example").unwrap();
    block_on(async {
        let (code, message) = refusal(join_as(&proxy, 30, &cluster, "node-x").await);
        assert_eq!(code, "token_wrong_kind", "{message}");
        assert!(message.contains("--kind node"), "{message}");
        let (code, message) = code_of(cluster_join(&proxy, 31, &node, "leaf.example", &ca).await);
        assert_eq!(code, "token_wrong_kind", "{message}");
        assert!(message.contains("--kind trusted-cluster"), "{message}");
        assert_eq!(uses_left(&proxy, &node_id), 1);
        assert_eq!(uses_left(&proxy, &cluster_id), 1);
        // Both still work for what they are.
        join_as(&proxy, 32, &node, "node-x").await.unwrap();
        cluster_join(&proxy, 33, &cluster, "leaf.example", &ca)
            .await
            .unwrap();
    });
}

/// The state file's identity: a write replaces it (new inode) and changes its mtime.
fn file_id(proxy: &Proxy) -> (u64, i64, i64) {
    let meta = std::fs::metadata(proxy.data.join("state.json")).unwrap();
    (meta.ino(), meta.mtime(), meta.mtime_nsec())
}

#[test]
fn refused_joins_do_not_write_the_state_file() {
    let proxy = Proxy::start(None);
    let (cluster, _) = token_with_id(&proxy, &["--kind", "trusted-cluster"]);
    let (expired, expired_id) = token_with_id(&proxy, &["--kind", "node"]);
    let (bound, _) = token_with_id(&proxy, &["--kind", "node", "--node", "edge-1"]);
    let (good, _) = token_with_id(&proxy, &["--kind", "node", "--uses", "2"]);
    // Expire one token by hand (no waiting): its expiry is in the past.
    let mut state = state_json(&proxy);
    for t in state["tokens"].as_array_mut().unwrap() {
        if t["id"] == expired_id.as_str() {
            t["expires_unix"] = serde_json::json!(t["created_unix"].as_u64().unwrap() - 10);
        }
    }
    std::fs::write(
        proxy.data.join("state.json"),
        serde_json::to_vec_pretty(&state).unwrap(),
    )
    .unwrap();
    let before = file_id(&proxy);
    block_on(async {
        join_as(&proxy, 40, &good, "node-r1").await.unwrap();
    });
    let after_good = file_id(&proxy);
    assert_ne!(
        before, after_good,
        "a successful join did not save its token use"
    );
    block_on(async {
        let wrong = "00".repeat(32);
        for (n, token, node, expected) in [
            (41, wrong.as_str(), "node-x", "token_invalid"),
            (42, cluster.as_str(), "node-x", "token_wrong_kind"),
            (43, expired.as_str(), "node-x", "token_expired"),
            (44, bound.as_str(), "node-x", "token_wrong_node"),
            (45, good.as_str(), "node-r1", "name_taken"),
            (46, good.as_str(), "-bad", "bad_node_name"),
        ] {
            for _ in 0..3 {
                let (code, _) = refusal(join_as(&proxy, n, token, node).await);
                assert_eq!(code, expected);
            }
        }
        let ca = ClusterCa::generate("leaf.example").unwrap();
        let (code, _) = code_of(
            cluster_join_proved(&proxy, 47, &wrong, "leaf.example", String::new(), Some(&ca)).await,
        );
        assert_eq!(code, "bad_request");
        let (code, _) = code_of(cluster_join(&proxy, 48, &wrong, "leaf.example", &ca).await);
        assert_eq!(code, "token_invalid");
    });
    assert_eq!(
        file_id(&proxy),
        after_good,
        "a refused join wrote the state file"
    );
    block_on(async {
        join_as(&proxy, 49, &good, "node-r2").await.unwrap();
    });
    assert_ne!(file_id(&proxy), after_good);
}

/// The secret appears on the `token:` line and nowhere else: not on a command line, not in a
/// configuration snippet.
fn assert_secret_only_on_its_line(text: &str, secret: &str) {
    for line in text.lines() {
        if line.contains(secret) {
            assert_eq!(line, format!("token: {secret}"), "{text}");
        }
    }
}

#[test]
fn tokens_add_prints_what_is_configured_and_no_token_on_a_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let out = cli(
        &data,
        &[
            "init",
            "--cluster",
            "root.example",
            "--host",
            "proxy.example",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let config = tmp.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "cluster_name = \"root.example\"\ndata_dir = {:?}\n[listen]\ntunnels = \"0.0.0.0:4024\"\n",
            data.display().to_string()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let mut all = vec!["tokens", "add"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--config", config.to_str().unwrap()]);
        let out = std::process::Command::new(bin())
            .args(&all)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    let field = |text: &str, name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).map(str::to_owned))
            .unwrap()
    };

    let text = run(&["--kind", "node", "--node", "edge-1"]);
    let secret = field(&text, "token: ");
    let command = text
        .lines()
        .find(|l| l.trim_start().starts_with("remoteler-agent start"))
        .unwrap_or_else(|| panic!("no agent command: {text}"));
    assert!(
        command.contains("--proxy proxy.example:4024")
            && command.contains("--token-file ")
            && !command.contains("--token ")
            && command.contains("--node-name edge-1"),
        "{command}"
    );
    assert_secret_only_on_its_line(&text, &secret);

    let text = run(&["--kind", "trusted-cluster"]);
    let secret = field(&text, "token: ");
    assert_secret_only_on_its_line(&text, &secret);
    assert!(text.contains("proxy = \"proxy.example:4024\""), "{text}");
    assert!(text.contains("token_file = \""), "{text}");
    assert!(!text.contains("token = \""), "{text}");
    let role_map = text
        .lines()
        .find(|l| l.trim_start().starts_with("role_map"))
        .unwrap();
    assert!(
        role_map.contains("remote = \"dev\"") && !role_map.contains("\"*\""),
        "{role_map}"
    );
    // The snippet is a valid leaf configuration once the token file exists.
    let token_file = field(&text, "  token_file = ").trim_matches('"').to_owned();
    let snippet: String = text
        .lines()
        .skip_while(|l| l.trim() != "[[trusted_clusters]]")
        .take_while(|l| l.starts_with("  "))
        .map(|l| format!("{}\n", l.trim().replace(&token_file, "/dev/null")))
        .collect();
    let leaf = tmp.path().join("leaf.toml");
    std::fs::write(
        &leaf,
        format!(
            "cluster_name = \"leaf.example\"\ndata_dir = {:?}\n[[roles]]\nname = \"dev\"\n\
             allow = {{ nodes = [\"*\"] }}\n{snippet}",
            tmp.path().join("leafdata").display().to_string()
        ),
    )
    .unwrap();
    config::ProxyConfig::load(&leaf).unwrap_or_else(|e| panic!("{e}:\n{snippet}"));

    // Without a configuration file, the running proxy's tunnel port.
    let proxy = Proxy::start(None);
    let out = cli(&proxy.data, &["tokens", "add", "--kind", "node"]);
    let text = stdout(&out);
    assert!(
        text.contains(&format!("--proxy 127.0.0.1:{} ", proxy.tunnels.port())),
        "{text}"
    );
}

/// A real leaf proxy joins a real root with the printed snippet's keys (`token_file`): its
/// join carries the proof of its CA's key, and its tunnel comes up.
#[test]
fn a_real_leaf_joins_with_a_token_file_and_its_ca_proof() {
    let root = Proxy::start(None);
    let (secret, _) = token_with_id(&root, &["--kind", "trusted-cluster"]);
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("leaf");
    let out = cli(
        &data,
        &["init", "--cluster", "leaf.example", "--host", "127.0.0.1"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let token_file = tmp.path().join("root.token");
    std::fs::write(&token_file, format!("{secret}\n")).unwrap();
    std::fs::set_permissions(
        &token_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let config = tmp.path().join("leaf.toml");
    std::fs::write(
        &config,
        format!(
            "cluster_name = \"leaf.example\"\ndata_dir = {:?}\n[[roles]]\nname = \"dev\"\n\
             allow = {{ nodes = [\"*\"] }}\n[[trusted_clusters]]\nname = \"test.example\"\n\
             proxy = \"{}\"\ntoken_file = {:?}\nca_pin = \"{}\"\n\
             role_map = [{{ remote = \"dev\", local = [\"dev\"] }}]\n",
            data.display().to_string(),
            root.tunnels,
            token_file.display().to_string(),
            root.pin
        ),
    )
    .unwrap();
    let log = std::fs::File::create(tmp.path().join("leaf.log")).unwrap();
    let mut leaf = std::process::Command::new(bin())
        .args(["start", "--config", config.to_str().unwrap()])
        .args(["--users", "127.0.0.1:0", "--tunnels", "127.0.0.1:0"])
        .args(["--auth", "127.0.0.1:0", "--metrics", "off"])
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + DEADLINE * 3;
    let connected = loop {
        let audit = root.audit();
        if audit
            .iter()
            .any(|r| r["event"] == "cluster.connect" && r["cluster"] == "leaf.example")
        {
            break true;
        }
        if std::time::Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let _ = leaf.kill();
    let _ = leaf.wait();
    assert!(
        connected,
        "the leaf never connected; root audit: {:#?}\nleaf log: {}",
        root.audit(),
        std::fs::read_to_string(tmp.path().join("leaf.log")).unwrap_or_default()
    );
    assert!(
        root.audit()
            .iter()
            .any(|r| r["event"] == "cluster.join" && r["success"] == true)
    );
}
