//! Certificates, pins, files and real rustls handshakes of `tunnel::identity`.
#![allow(clippy::unwrap_used)] // test harness: a failed unwrap is a failed test

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};
use sha2::{Digest, Sha256};
use tunnel::identity::{
    CA_CERT_FILE, CA_KEY_FILE, CLOCK_SKEW_ALLOWANCE, CaPin, ClientAuth, ClusterCa, IdentityError,
    IdentityKind, PeerIdentity, PrivateKey, PublicKey, TlsIdentity, Validity, client_config_pinned,
    client_config_trusting, server_config, verify_client_chain,
};

const CLUSTER: &str = "example.com";
const PROXY_HOST: &str = "proxy.example.com";
const HOUR: Duration = Duration::from_secs(3600);

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn hours(n: u32) -> Validity {
    Validity::for_ttl(SystemTime::now(), n * HOUR).unwrap()
}

/// A fresh key and a certificate from `issue`, as the chain `[leaf, CA]`.
fn identity_of(
    ca: &ClusterCa,
    issue: impl FnOnce(&PublicKey) -> Result<CertificateDer<'static>, IdentityError>,
) -> TlsIdentity {
    let key = PrivateKey::generate().unwrap();
    let leaf = issue(&key.public_key()).unwrap();
    TlsIdentity {
        chain: ca.chain(leaf),
        key,
    }
}

fn proxy_identity(ca: &ClusterCa, host: &str) -> TlsIdentity {
    identity_of(ca, |k| ca.issue_proxy("proxy", &[host], k, hours(24)))
}

fn node_identity(ca: &ClusterCa, name: &str) -> TlsIdentity {
    identity_of(ca, |k| ca.issue_node(name, k, hours(24)))
}

fn proxy_config(ca: &ClusterCa, auth: ClientAuth) -> ServerConfig {
    let proxy = proxy_identity(ca, PROXY_HOST);
    server_config(&[ca.certificate().clone()], proxy.chain, &proxy.key, auth).unwrap()
}

#[derive(Debug)]
enum Side {
    Client,
    Server,
}

/// Runs a handshake between in-memory connections, moving TLS records through byte buffers.
/// On failure, says which side failed first and with what error.
fn handshake(
    client_config: ClientConfig,
    server_config: ServerConfig,
    server_name: &str,
) -> Result<(ClientConnection, ServerConnection), (Side, rustls::Error)> {
    let name = ServerName::try_from(server_name.to_owned()).unwrap();
    let mut client = ClientConnection::new(Arc::new(client_config), name).unwrap();
    let mut server = ServerConnection::new(Arc::new(server_config)).unwrap();
    for _ in 0..16 {
        let mut buf = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut buf).unwrap();
        }
        let mut rd = buf.as_slice();
        while !rd.is_empty() {
            server.read_tls(&mut rd).unwrap();
        }
        server
            .process_new_packets()
            .map_err(|e| (Side::Server, e))?;

        let mut buf = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut buf).unwrap();
        }
        let mut rd = buf.as_slice();
        while !rd.is_empty() {
            client.read_tls(&mut rd).unwrap();
        }
        client
            .process_new_packets()
            .map_err(|e| (Side::Client, e))?;

        if !client.is_handshaking()
            && !server.is_handshaking()
            && !client.wants_write()
            && !server.wants_write()
        {
            return Ok((client, server));
        }
    }
    panic!("handshake did not finish");
}

fn expect_failure(
    result: Result<(ClientConnection, ServerConnection), (Side, rustls::Error)>,
) -> (Side, rustls::Error) {
    match result {
        Ok(_) => panic!("the handshake succeeded but should have failed"),
        Err(failure) => failure,
    }
}

// ---- issue and parse ----------------------------------------------------------------------

fn round_trip(
    kind: IdentityKind,
    name: &str,
    roles: &[&str],
    logins: &[&str],
    issue: impl FnOnce(
        &ClusterCa,
        &PublicKey,
        Validity,
    ) -> Result<CertificateDer<'static>, IdentityError>,
) {
    let ca = ClusterCa::generate(CLUSTER).unwrap();
    let key = PrivateKey::generate().unwrap();
    let now = SystemTime::now();
    let validity = Validity::for_ttl(now, 12 * HOUR).unwrap();
    let cert = issue(&ca, &key.public_key(), validity).unwrap();
    let id = PeerIdentity::from_der(&cert).unwrap();
    assert_eq!(id.serial.len(), 32, "16 random serial bytes: {}", id.serial);
    assert!(
        id.serial
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    let expected = PeerIdentity {
        kind,
        name: name.to_owned(),
        cluster: CLUSTER.to_owned(),
        roles: strings(roles),
        logins: strings(logins),
        not_before: validity.not_before(),
        not_after: validity.not_after(),
        serial: id.serial.clone(),
    };
    assert_eq!(id, expected);
    let backdate = now.duration_since(id.not_before).unwrap();
    // Rounded down to whole seconds: at least the allowance, less than a second more.
    assert!(
        backdate >= CLOCK_SKEW_ALLOWANCE
            && backdate < CLOCK_SKEW_ALLOWANCE + Duration::from_secs(1),
        "{backdate:?}"
    );
    let lifetime = id.not_after.duration_since(now).unwrap();
    assert!(
        lifetime > 12 * HOUR - Duration::from_secs(1) && lifetime <= 12 * HOUR,
        "{lifetime:?}"
    );
    id.check_valid_at(now).unwrap();
}

#[test]
fn node_round_trip() {
    round_trip(IdentityKind::Node, "node-r1", &[], &[], |ca, k, v| {
        ca.issue_node("node-r1", k, v)
    });
}

#[test]
fn user_round_trip() {
    round_trip(
        IdentityKind::User,
        "alice",
        &["dev", "ops"],
        &["root", "ubuntu"],
        |ca, k, v| {
            ca.issue_user(
                "alice",
                &strings(&["dev", "ops"]),
                &strings(&["root", "ubuntu"]),
                k,
                v,
            )
        },
    );
}

#[test]
fn user_without_roles_or_logins_round_trip() {
    round_trip(IdentityKind::User, "bob", &[], &[], |ca, k, v| {
        ca.issue_user("bob", &[], &[], k, v)
    });
}

#[test]
fn cluster_round_trip() {
    round_trip(
        IdentityKind::Cluster,
        "leaf.example.org",
        &[],
        &[],
        |ca, k, v| ca.issue_cluster("leaf.example.org", k, v),
    );
}

#[test]
fn proxy_round_trip() {
    round_trip(IdentityKind::Proxy, "proxy-1", &[], &[], |ca, k, v| {
        ca.issue_proxy("proxy-1", &[PROXY_HOST, "10.0.0.1"], k, v)
    });
}

#[test]
fn serials_differ() {
    let ca = ClusterCa::generate(CLUSTER).unwrap();
    let key = PrivateKey::generate().unwrap().public_key();
    let a = PeerIdentity::from_der(&ca.issue_node("n", &key, hours(1)).unwrap()).unwrap();
    let b = PeerIdentity::from_der(&ca.issue_node("n", &key, hours(1)).unwrap()).unwrap();
    assert_ne!(a.serial, b.serial);
}

#[test]
fn issue_rejects_bad_names() {
    let ca = ClusterCa::generate(CLUSTER).unwrap();
    let key = PrivateKey::generate().unwrap().public_key();
    assert!(matches!(
        ca.issue_node("Node1", &key, hours(1)),
        Err(IdentityError::InvalidName { .. })
    ));
    assert!(matches!(
        ca.issue_node("-n", &key, hours(1)),
        Err(IdentityError::InvalidName { .. })
    ));
    let err = ca
        .issue_user("alice", &strings(&["dev,ops"]), &[], &key, hours(1))
        .unwrap_err();
    assert!(
        err.to_string().contains("invalid role \"dev,ops\""),
        "{err}"
    );
    let err = ca
        .issue_user("alice", &[], &strings(&["root", "root"]), &key, hours(1))
        .unwrap_err();
    assert!(err.to_string().contains("listed twice"), "{err}");
    let many: Vec<String> = (0..65).map(|i| format!("r{i}")).collect();
    assert!(matches!(
        ca.issue_user("alice", &many, &[], &key, hours(1)),
        Err(IdentityError::TooMany { .. })
    ));
    assert!(matches!(
        ca.issue_proxy("p", &["bad host!"], &key, hours(1)),
        Err(IdentityError::InvalidHost { .. })
    ));
    assert!(matches!(
        ClusterCa::generate("Bad Cluster"),
        Err(IdentityError::InvalidName { .. })
    ));
    assert!(matches!(
        Validity::for_ttl(SystemTime::now(), Duration::ZERO),
        Err(IdentityError::InvalidValidity { .. })
    ));
}

#[test]
fn public_key_der_round_trip() {
    let key = PrivateKey::generate().unwrap().public_key();
    assert_eq!(PublicKey::from_spki_der(&key.to_spki_der()).unwrap(), key);
    let mut der = key.to_spki_der();
    der.push(0);
    assert!(PublicKey::from_spki_der(&der).is_err());
    assert!(PublicKey::from_spki_der(b"not a key").is_err());
}

/// Certificates made directly with rcgen, breaking one rule of the encoding each.
mod forged {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, SanType,
    };

    struct Spec {
        cn: &'static str,
        o: &'static str,
        ou: &'static str,
        uris: Vec<&'static str>,
        eku: Option<ExtendedKeyUsagePurpose>,
        issuer_o: &'static str,
        is_ca: bool,
    }

    fn good() -> Spec {
        Spec {
            cn: "alice",
            o: CLUSTER,
            ou: "user",
            uris: vec!["remoteler://example.com/user/alice?roles=dev&logins=root"],
            eku: Some(ExtendedKeyUsagePurpose::ClientAuth),
            issuer_o: CLUSTER,
            is_ca: false,
        }
    }

    fn make(spec: Spec) -> CertificateDer<'static> {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::default();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "forger CA");
        ca_params
            .distinguished_name
            .push(DnType::OrganizationName, spec.issuer_o);
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = Issuer::new(ca_params, ca_key);

        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, spec.cn);
        params
            .distinguished_name
            .push(DnType::OrganizationName, spec.o);
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, spec.ou);
        params.subject_alt_names = spec
            .uris
            .iter()
            .map(|u| SanType::URI(u.to_string().try_into().unwrap()))
            .collect();
        params.extended_key_usages = spec.eku.into_iter().collect();
        if spec.is_ca {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        }
        let key = KeyPair::generate().unwrap();
        params.signed_by(&key, &issuer).unwrap().der().clone()
    }

    #[test]
    fn the_good_one_parses() {
        let id = PeerIdentity::from_der(&make(good())).unwrap();
        assert_eq!(
            (id.kind, id.name.as_str(), id.roles, id.logins),
            (
                IdentityKind::User,
                "alice",
                strings(&["dev"]),
                strings(&["root"])
            )
        );
    }

    #[test]
    fn each_broken_rule_is_rejected() {
        let cases: Vec<(&str, Spec)> = vec![
            (
                "subject CN",
                Spec {
                    cn: "bob",
                    ..good()
                },
            ),
            (
                "subject O",
                Spec {
                    o: "other.com",
                    ..good()
                },
            ),
            (
                "subject OU",
                Spec {
                    ou: "node",
                    ..good()
                },
            ),
            (
                "no URI",
                Spec {
                    uris: vec![],
                    ..good()
                },
            ),
            (
                "two URIs",
                Spec {
                    uris: vec![
                        good().uris[0],
                        "remoteler://example.com/user/alice?roles=admin&logins=root",
                    ],
                    ..good()
                },
            ),
            (
                "URI case trick",
                Spec {
                    uris: vec![
                        good().uris[0],
                        "REMOTELER://example.com/user/alice?roles=admin&logins=root",
                    ],
                    ..good()
                },
            ),
            (
                "bad URI",
                Spec {
                    uris: vec!["remoteler://example.com/user/alice?roles=dev&logins=root&x=y"],
                    ..good()
                },
            ),
            (
                "no EKU",
                Spec {
                    eku: None,
                    ..good()
                },
            ),
            (
                "wrong EKU",
                Spec {
                    eku: Some(ExtendedKeyUsagePurpose::ServerAuth),
                    ..good()
                },
            ),
            (
                "issuer of another cluster",
                Spec {
                    issuer_o: "other.com",
                    ..good()
                },
            ),
            (
                "CA certificate",
                Spec {
                    is_ca: true,
                    ..good()
                },
            ),
        ];
        for (what, spec) in cases {
            let result = PeerIdentity::from_der(&make(spec));
            assert!(result.is_err(), "{what}: accepted as {result:?}");
        }
        assert!(matches!(
            PeerIdentity::from_der(b"garbage"),
            Err(IdentityError::BadCertificate { .. })
        ));
    }
}

// ---- pins -------------------------------------------------------------------------------

/// Made with `openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256`; pin computed
/// with `openssl x509 -pubkey -noout | openssl pkey -pubin -outform der | sha256sum`.
const GOLDEN_CA: &str = "-----BEGIN CERTIFICATE-----
MIIBoTCCAUegAwIBAgIUK//uAokAF/F++NgLojDqTLR/Fn0wCgYIKoZIzj0EAwIw
JTESMBAGA1UEAwwJZ29sZGVuIENBMQ8wDQYDVQQKDAZnb2xkZW4wIBcNMjYxMTI2
MDEyMTIwWhgPMjEyNjExMDIwMTIxMjBaMCUxEjAQBgNVBAMMCWdvbGRlbiBDQTEP
MA0GA1UECgwGZ29sZGVuMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEtLj3LxnU
eBci+NmPgDFz0UmfbRqZuFAfyt6vEBLnuY6F2u97dDpG/N+yJ5IUqrkGAPetTEow
n+3PKHccM8rvL6NTMFEwHQYDVR0OBBYEFPWPhF2roAV1j54QGJo9mX84W8weMB8G
A1UdIwQYMBaAFPWPhF2roAV1j54QGJo9mX84W8weMA8GA1UdEwEB/wQFMAMBAf8w
CgYIKoZIzj0EAwIDSAAwRQIgTqzw+R+x1flrgX5l/a1TRMF9LGuOngLNEfjNMDPP
95gCIQCNhzgDiyAgF2P53P1TiW2Rzeqo/iXVXlKPcti7Kr8veQ==
-----END CERTIFICATE-----
";
const GOLDEN_PIN: &str = "sha256:cab556934193953d467fa427c93d5a8d292865706b50018cf0136e3fb874b301";

#[test]
fn pin_matches_openssl() {
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::from_pem_slice(GOLDEN_CA.as_bytes()).unwrap();
    assert_eq!(CaPin::of_certificate(&der).unwrap().to_string(), GOLDEN_PIN);
}

#[test]
fn pin_format_accepts() {
    let pin: CaPin = GOLDEN_PIN.parse().unwrap();
    assert_eq!(pin.to_string(), GOLDEN_PIN);
    let upper = format!("sha256:{}", GOLDEN_PIN["sha256:".len()..].to_uppercase());
    assert_eq!(upper.parse::<CaPin>().unwrap(), pin);
    assert_eq!(format!("{pin:?}"), format!("CaPin({GOLDEN_PIN})"));
}

#[test]
fn pin_format_rejects() {
    let hex = &GOLDEN_PIN["sha256:".len()..];
    let cases = [
        String::new(),
        hex.to_owned(),
        format!("SHA256:{hex}"),
        format!("sha1:{hex}"),
        format!("sha256:{}", &hex[..63]),
        format!("sha256:{hex}0"),
        format!("sha256:{}g", &hex[..63]),
        format!("sha256: {}", &hex[..63]),
        format!(" sha256:{hex}"),
        format!("sha256:{hex}\n"),
        format!("sha256:{}é", &hex[..62]),
    ];
    for case in cases {
        let err = case.parse::<CaPin>().unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("expected `sha256:` followed by 64 hex digits"),
            "{case:?}: {msg}"
        );
    }
}

// ---- files ------------------------------------------------------------------------------

fn dir_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn save_load_keeps_the_pin() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let ca = ClusterCa::generate(CLUSTER).unwrap();
    ca.save(&dir).unwrap();

    let loaded = ClusterCa::load(&dir).unwrap();
    assert_eq!(loaded.pin(), ca.pin());
    assert_eq!(loaded.certificate(), ca.certificate());
    assert_eq!(loaded.cluster(), CLUSTER);

    // The pin is the SHA-256 of the SubjectPublicKeyInfo in the PEM file, computed here
    // independently of CaPin.
    let pem = fs::read(dir.join(CA_CERT_FILE)).unwrap();
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::from_pem_slice(&pem).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let digest = Sha256::digest(cert.public_key().raw);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(ca.pin().to_string(), format!("sha256:{hex}"));

    // Certificates issued by the loaded CA verify against the original CA certificate.
    let node = node_identity(&loaded, "n1");
    let id =
        verify_client_chain(&[ca.certificate().clone()], &node.chain, SystemTime::now()).unwrap();
    assert_eq!((id.kind, id.name.as_str()), (IdentityKind::Node, "n1"));
}

#[test]
fn key_file_is_private_and_no_temp_files_remain() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = ClusterCa::generate(CLUSTER).unwrap();
    ca.save(tmp.path()).unwrap();
    let mode = |name: &str| {
        fs::metadata(tmp.path().join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(CA_KEY_FILE), 0o600);
    assert_eq!(mode(CA_CERT_FILE), 0o644);
    assert_eq!(dir_entries(tmp.path()), [CA_CERT_FILE, CA_KEY_FILE]);

    // A second save must not replace the key, and must not leave a temporary file behind.
    let key_before = fs::read(tmp.path().join(CA_KEY_FILE)).unwrap();
    let other = ClusterCa::generate(CLUSTER).unwrap();
    let err = other.save(tmp.path()).unwrap_err();
    assert!(matches!(err, IdentityError::AlreadyExists { .. }), "{err}");
    assert!(err.to_string().contains(CA_KEY_FILE), "{err}");
    assert_eq!(fs::read(tmp.path().join(CA_KEY_FILE)).unwrap(), key_before);
    assert_eq!(dir_entries(tmp.path()), [CA_CERT_FILE, CA_KEY_FILE]);
}

#[test]
fn tls_identity_save_load_replaces_atomically() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = ClusterCa::generate(CLUSTER).unwrap();
    let (cert, key) = (tmp.path().join("node.crt"), tmp.path().join("node.key"));
    node_identity(&ca, "n1").save(&cert, &key).unwrap();
    node_identity(&ca, "n2").save(&cert, &key).unwrap();
    let loaded = TlsIdentity::load(&cert, &key).unwrap();
    assert_eq!(loaded.identity().unwrap().name, "n2");
    assert_eq!(loaded.chain.len(), 2);
    assert_eq!(
        fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(dir_entries(tmp.path()), ["node.crt", "node.key"]);
}

#[test]
fn open_key_file_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    ClusterCa::generate(CLUSTER)
        .unwrap()
        .save(tmp.path())
        .unwrap();
    let key = tmp.path().join(CA_KEY_FILE);
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let err = ClusterCa::load(tmp.path()).unwrap_err();
    assert!(
        matches!(err, IdentityError::KeyFileTooOpen { mode: 0o644, .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains(&format!("chmod 600 {}", key.display())),
        "{err}"
    );
}

#[test]
fn missing_ca_names_the_file_and_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let err = ClusterCa::load(tmp.path()).unwrap_err();
    let msg = err.to_string();
    let path = tmp.path().join(CA_CERT_FILE);
    assert!(
        msg.starts_with(&format!(
            "cannot read CA certificate {}: no such file",
            path.display()
        )),
        "{msg}"
    );
    assert!(msg.contains("remoteler-proxy init"), "{msg}");
}

#[test]
fn mismatched_key_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    ClusterCa::generate(CLUSTER)
        .unwrap()
        .save(tmp.path())
        .unwrap();
    ClusterCa::generate(CLUSTER)
        .unwrap()
        .save(other.path())
        .unwrap();
    fs::copy(other.path().join(CA_KEY_FILE), tmp.path().join(CA_KEY_FILE)).unwrap();
    let err = ClusterCa::load(tmp.path()).unwrap_err();
    assert!(
        err.to_string()
            .contains("is not the key of the CA certificate"),
        "{err}"
    );
}

#[test]
fn debug_never_shows_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = ClusterCa::generate(CLUSTER).unwrap();
    ca.save(tmp.path()).unwrap();
    let key_pem = fs::read_to_string(tmp.path().join(CA_KEY_FILE)).unwrap();
    // A line from the middle of the base64 body of the key.
    let secret = key_pem.lines().nth(2).unwrap();
    assert!(secret.len() > 20);
    let key = PrivateKey::from_pem(&key_pem).unwrap();
    let node = node_identity(&ca, "n1");
    for debug in [
        format!("{ca:?}"),
        format!("{key:?}"),
        format!("{node:?}"),
        format!("{ca:#?}"),
    ] {
        assert!(debug.contains("MASKED"), "{debug}");
        assert!(!debug.contains(secret), "{debug}");
    }
}

// ---- TLS handshakes -----------------------------------------------------------------------

#[test]
fn mutual_tls_with_node_certificate() {
    let ca = ClusterCa::generate(CLUSTER).unwrap();
    let node = node_identity(&ca, "node-r1");
    let client = client_config_trusting(
        &[ca.certificate().clone()],
        Some((node.chain.clone(), &node.key)),
    )
    .unwrap();
    let (client, server) =
        handshake(client, proxy_config(&ca, ClientAuth::Required), PROXY_HOST).unwrap();

    let seen_by_proxy = PeerIdentity::from_der(&server.peer_certificates().unwrap()[0]).unwrap();
    assert_eq!(
        (seen_by_proxy.kind, seen_by_proxy.name.as_str()),
        (IdentityKind::Node, "node-r1")
    );
    // The node's stored chain holds the CA too; the proxy trusts it already, so only the
    // leaf travels (and rustls keeps only it for the connection's life).
    assert_eq!(node.chain.len(), 2, "the stored chain is leaf + CA");
    assert_eq!(server.peer_certificates().unwrap().len(), 1);
    let seen_by_node = PeerIdentity::from_der(&client.peer_certificates().unwrap()[0]).unwrap();
    assert_eq!(
        (seen_by_node.kind, seen_by_node.cluster.as_str()),
        (IdentityKind::Proxy, CLUSTER)
    );
}

#[test]
fn loopback_names_always_work() {
    let ca = ClusterCa::generate(CLUSTER).unwrap();
    for name in ["localhost", "127.0.0.1", "::1", PROXY_HOST] {
        let client = client_config_trusting(&[ca.certificate().clone()], None).unwrap();
        handshake(client, proxy_config(&ca, ClientAuth::Optional), name).unwrap();
    }
}

#[test]
fn required_client_auth_refuses_anonymous_clients() {
    let ca = ClusterCa::generate(CLUSTER).unwrap();
    let client = client_config_trusting(&[ca.certificate().clone()], None).unwrap();
    let (side, err) = expect_failure(handshake(
        client,
        proxy_config(&ca, ClientAuth::Required),
        PROXY_HOST,
    ));
    assert!(matches!(side, Side::Server), "{side:?} {err}");
    assert!(
        matches!(err, rustls::Error::NoCertificatesPresented),
        "{err}"
    );
}

#[test]
fn optional_client_auth_accepts_anonymous_and_verifies_presented() {
    let ca = ClusterCa::generate(CLUSTER).unwrap();
    let client = client_config_trusting(&[ca.certificate().clone()], None).unwrap();
    let (_, server) =
        handshake(client, proxy_config(&ca, ClientAuth::Optional), PROXY_HOST).unwrap();
    assert!(server.peer_certificates().is_none());

    let stranger_ca = ClusterCa::generate("stranger.net").unwrap();
    let stranger = node_identity(&stranger_ca, "n1");
    let client = client_config_trusting(
        &[ca.certificate().clone()],
        Some((stranger.chain, &stranger.key)),
    )
    .unwrap();
    let (side, err) = expect_failure(handshake(
        client,
        proxy_config(&ca, ClientAuth::Optional),
        PROXY_HOST,
    ));
    assert!(matches!(side, Side::Server), "{side:?} {err}");
}

#[test]
fn pinned_client_with_right_pin_learns_the_ca() {
    let ca = ClusterCa::generate(CLUSTER).unwrap();
    let (client, learned) = client_config_pinned(ca.pin()).unwrap();
    assert_eq!(learned.certificate(), None);
    let (client_conn, _) =
        handshake(client, proxy_config(&ca, ClientAuth::Optional), PROXY_HOST).unwrap();
    assert_eq!(learned.certificate().as_ref(), Some(ca.certificate()));
    let id = PeerIdentity::from_der(&client_conn.peer_certificates().unwrap()[0]).unwrap();
    assert_eq!(id.kind, IdentityKind::Proxy);

    // The learned CA is enough for the next, regular connection.
    let client = client_config_trusting(&[learned.certificate().unwrap()], None).unwrap();
    handshake(client, proxy_config(&ca, ClientAuth::Optional), PROXY_HOST).unwrap();
}

#[test]
fn pinned_client_with_wrong_pin_is_refused() {
    let ca = ClusterCa::generate(CLUSTER).unwrap();
    let other = ClusterCa::generate(CLUSTER).unwrap();
    let (client, learned) = client_config_pinned(other.pin()).unwrap();
    let (side, err) = expect_failure(handshake(
        client,
        proxy_config(&ca, ClientAuth::Optional),
        PROXY_HOST,
    ));
    assert!(matches!(side, Side::Client), "{side:?} {err}");
    let err = IdentityError::from(err);
    match &err {
        IdentityError::PinMismatch {
            expected,
            presented,
        } => {
            assert_eq!(*expected, other.pin());
            assert_eq!(presented, &[ca.pin()]);
        }
        _ => panic!("expected a pin mismatch, got {err}"),
    }
    assert!(err.to_string().contains(&other.pin().to_string()), "{err}");
    assert_eq!(learned.certificate(), None);
}

#[test]
fn pinned_client_refuses_a_copied_ca_certificate() {
    // A man in the middle sends the real CA certificate (it is public) with a leaf signed by
    // its own key: the pin matches, the signature must not.
    let ca = ClusterCa::generate(CLUSTER).unwrap();
    let mitm_ca = ClusterCa::generate(CLUSTER).unwrap();
    let mitm = proxy_identity(&mitm_ca, PROXY_HOST);
    let chain = vec![mitm.chain[0].clone(), ca.certificate().clone()];
    let server = server_config(
        &[mitm_ca.certificate().clone()],
        chain,
        &mitm.key,
        ClientAuth::Optional,
    )
    .unwrap();
    let (client, learned) = client_config_pinned(ca.pin()).unwrap();
    let (side, err) = expect_failure(handshake(client, server, PROXY_HOST));
    assert!(matches!(side, Side::Client), "{side:?} {err}");
    assert!(matches!(err, rustls::Error::InvalidCertificate(_)), "{err}");
    assert_eq!(learned.certificate(), None);
}

#[test]
fn pinned_client_refuses_a_server_that_hides_its_ca() {
    let ca = ClusterCa::generate(CLUSTER).unwrap();
    let proxy = proxy_identity(&ca, PROXY_HOST);
    let server = server_config(
        &[ca.certificate().clone()],
        vec![proxy.chain[0].clone()],
        &proxy.key,
        ClientAuth::Optional,
    )
    .unwrap();
    let (client, _) = client_config_pinned(ca.pin()).unwrap();
    let (_, err) = expect_failure(handshake(client, server, PROXY_HOST));
    assert!(matches!(
        IdentityError::from(err),
        IdentityError::PinMismatch { .. }
    ));
}

#[test]
fn client_certificate_from_another_ca_is_refused() {
    let ca = ClusterCa::generate(CLUSTER).unwrap();
    let stranger_ca = ClusterCa::generate(CLUSTER).unwrap();
    let stranger = node_identity(&stranger_ca, "node-r1");
    let client = client_config_trusting(
        &[ca.certificate().clone()],
        Some((stranger.chain, &stranger.key)),
    )
    .unwrap();
    let (side, err) = expect_failure(handshake(
        client,
        proxy_config(&ca, ClientAuth::Required),
        PROXY_HOST,
    ));
    assert!(matches!(side, Side::Server), "{side:?} {err}");
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer | rustls::CertificateError::BadSignature
            )
        ),
        "{err}"
    );
}

#[test]
fn extra_client_root_is_trusted() {
    // A root cluster's CA added to the proxy's client roots (trusted clusters).
    let ca = ClusterCa::generate(CLUSTER).unwrap();
    let root_ca = ClusterCa::generate("root.example.com").unwrap();
    let user = identity_of(&root_ca, |k| {
        root_ca.issue_user("alice", &strings(&["admin"]), &[], k, hours(1))
    });
    let proxy = proxy_identity(&ca, PROXY_HOST);
    let roots = [ca.certificate().clone(), root_ca.certificate().clone()];
    let server = server_config(&roots, proxy.chain, &proxy.key, ClientAuth::Required).unwrap();
    let client =
        client_config_trusting(&[ca.certificate().clone()], Some((user.chain, &user.key))).unwrap();
    let (_, server) = handshake(client, server, PROXY_HOST).unwrap();
    let id = PeerIdentity::from_der(&server.peer_certificates().unwrap()[0]).unwrap();
    assert_eq!(
        (id.cluster.as_str(), id.name.as_str()),
        ("root.example.com", "alice")
    );
}

#[test]
fn expired_user_certificate_is_refused_with_a_clear_error() {
    let ca = ClusterCa::generate(CLUSTER).unwrap();
    let now = SystemTime::now();
    let validity = Validity::between(now - 13 * HOUR, now - HOUR).unwrap();
    let user = identity_of(&ca, |k| {
        ca.issue_user(
            "alice",
            &strings(&["dev"]),
            &strings(&["root"]),
            k,
            validity,
        )
    });
    let client =
        client_config_trusting(&[ca.certificate().clone()], Some((user.chain, &user.key))).unwrap();
    let (side, err) = expect_failure(handshake(
        client,
        proxy_config(&ca, ClientAuth::Required),
        PROXY_HOST,
    ));
    assert!(matches!(side, Side::Server), "{side:?} {err}");
    let err = IdentityError::from(err);
    assert!(matches!(err, IdentityError::Expired { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.starts_with("certificate expired at ") && msg.contains("remoteler login"),
        "{msg}"
    );
}

#[test]
fn future_certificate_names_the_clock() {
    let ca = ClusterCa::generate(CLUSTER).unwrap();
    let now = SystemTime::now();
    let validity = Validity::between(now + HOUR, now + 2 * HOUR).unwrap();
    let node = identity_of(&ca, |k| ca.issue_node("n1", k, validity));
    let client =
        client_config_trusting(&[ca.certificate().clone()], Some((node.chain, &node.key))).unwrap();
    let (_, err) = expect_failure(handshake(
        client,
        proxy_config(&ca, ClientAuth::Required),
        PROXY_HOST,
    ));
    let err = IdentityError::from(err);
    assert!(matches!(err, IdentityError::NotYetValid { .. }), "{err}");
    assert!(err.to_string().contains("synchronise both (NTP)"), "{err}");
}

#[test]
fn small_clock_skew_is_tolerated_large_is_not() {
    let ca = ClusterCa::generate(CLUSTER).unwrap();
    let node = node_identity(&ca, "n1");
    let roots = [ca.certificate().clone()];
    let now = SystemTime::now();
    // A verifier whose clock is 4 minutes behind the issuer's accepts a brand-new certificate.
    verify_client_chain(&roots, &node.chain, now - Duration::from_secs(4 * 60)).unwrap();
    let err =
        verify_client_chain(&roots, &node.chain, now - Duration::from_secs(10 * 60)).unwrap_err();
    assert!(matches!(err, IdentityError::NotYetValid { .. }), "{err}");
    let err = verify_client_chain(&roots, &node.chain, now + 25 * HOUR).unwrap_err();
    assert!(matches!(err, IdentityError::Expired { .. }), "{err}");
}

#[test]
fn server_certificate_for_another_name_is_refused() {
    let ca = ClusterCa::generate(CLUSTER).unwrap();
    let client = client_config_trusting(&[ca.certificate().clone()], None).unwrap();
    let (side, err) = expect_failure(handshake(
        client,
        proxy_config(&ca, ClientAuth::Optional),
        "other.example.com",
    ));
    assert!(matches!(side, Side::Client), "{side:?} {err}");
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                    | rustls::CertificateError::NotValidForNameContext { .. }
            )
        ),
        "{err}"
    );

    // The pinned client checks the name too.
    let (client, _) = client_config_pinned(ca.pin()).unwrap();
    let (_, err) = expect_failure(handshake(
        client,
        proxy_config(&ca, ClientAuth::Optional),
        "other.example.com",
    ));
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                    | rustls::CertificateError::NotValidForNameContext { .. }
            )
        ),
        "{err}"
    );
}

#[test]
fn node_certificate_cannot_serve() {
    // clientAuth-only certificates are not accepted as a server's.
    let ca = ClusterCa::generate(CLUSTER).unwrap();
    let node = node_identity(&ca, "localhost");
    let server = server_config(
        &[ca.certificate().clone()],
        node.chain,
        &node.key,
        ClientAuth::Optional,
    )
    .unwrap();
    let client = client_config_trusting(&[ca.certificate().clone()], None).unwrap();
    let (side, err) = expect_failure(handshake(client, server, "localhost"));
    assert!(matches!(side, Side::Client), "{side:?} {err}");
}

/// A resumed handshake skips the client certificate's verification (rustls takes the chain
/// from the session as it was): the proxy must resume nothing, so that an expired or revoked
/// certificate cannot come back through a session ticket. The client here keeps a session
/// store on purpose, as a crafted client would.
#[test]
fn the_proxy_resumes_no_tls_session() {
    let ca = ClusterCa::generate(CLUSTER).unwrap();
    let user = identity_of(&ca, |k| {
        ca.issue_user("alice", &strings(&["dev"]), &[], k, hours(1))
    });
    let server = proxy_config(&ca, ClientAuth::Optional);
    let mut client =
        client_config_trusting(&[ca.certificate().clone()], Some((user.chain, &user.key))).unwrap();
    client.resumption = rustls::client::Resumption::in_memory_sessions(16);
    for round in 0..3 {
        let (client, _) = handshake(client.clone(), server.clone(), PROXY_HOST).unwrap();
        assert_eq!(
            client.handshake_kind(),
            Some(rustls::HandshakeKind::Full),
            "handshake {round} was not a full one"
        );
    }
}
