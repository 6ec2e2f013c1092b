//! The user's Remoteler directory: `$REMOTELER_HOME`, or `~/.remoteler/`.
//!
//! | file | contents | mode |
//! |---|---|---|
//! | `profile.json` | proxy address, user, cluster, roles, logins, expiry | 0600 |
//! | `user.key` | the user's private key, PKCS#8 PEM | 0600 |
//! | `user.crt` | the user certificate chain (leaf, CA), PEM | 0644 |
//! | `ca.crt` | the cluster CA certificate, PEM | 0644 |
//! | `ssh_key` | the user's SSH key (ed25519, OpenSSH format), made at the first login | 0600 |
//! | `ssh_key.pub` | its public key | 0644 |
//! | `ssh_key-cert.pub` | the OpenSSH user certificate of the last login | 0644 |
//!
//! The directory is created with mode 0700.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tunnel::identity::{self, FileRole, TlsIdentity};

use crate::ClientError;

/// Profile file name.
pub const PROFILE_FILE: &str = "profile.json";
/// User key file name.
pub const USER_KEY_FILE: &str = "user.key";
/// User certificate chain file name.
pub const USER_CERT_FILE: &str = "user.crt";
/// Cluster CA file name.
pub const CA_FILE: &str = "ca.crt";
/// SSH private key file name.
pub const SSH_KEY_FILE: &str = "ssh_key";
/// SSH public key file name.
pub const SSH_PUBLIC_KEY_FILE: &str = "ssh_key.pub";
/// SSH certificate file name: ssh's own convention for the key's certificate.
pub const SSH_CERT_FILE: &str = "ssh_key-cert.pub";
/// The cluster's SSH host CA public key, from the login.
pub const SSH_HOST_CA_FILE: &str = "ssh_host_ca.pub";
/// The known_hosts file `remoteler config` and `remoteler ssh` point ssh at: `@cert-authority`
/// lines for the cluster's (and trusted leaves') nodes.
pub const KNOWN_HOSTS_FILE: &str = "known_hosts";

/// Where the profile lives.
#[derive(Debug, Clone)]
pub struct Home {
    dir: PathBuf,
}

/// What `remoteler login` stored about the current login.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The proxy's user listener, HOST:PORT.
    pub proxy: String,
    /// User name.
    pub user: String,
    /// Cluster name.
    pub cluster: String,
    /// Roles from the certificate.
    #[serde(default)]
    pub roles: Vec<String>,
    /// OS logins the user may use.
    #[serde(default)]
    pub logins: Vec<String>,
    /// The principals of the SSH certificate: the logins the user's roles permit.
    #[serde(default)]
    pub ssh_logins: Vec<String>,
    /// End of the certificate's validity, seconds since the Unix epoch.
    pub expires_unix: u64,
}

impl Profile {
    /// The expiry as a time.
    pub fn expires(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.expires_unix)
    }

    /// The error for an expired login, if it has expired at `now`.
    pub fn check_not_expired(&self, now: SystemTime) -> Result<(), ClientError> {
        if now >= self.expires() {
            return Err(ClientError::Expired {
                cluster: self.cluster.clone(),
                at: humantime::format_rfc3339_seconds(self.expires()).to_string(),
                proxy: self.proxy.clone(),
                user: self.user.clone(),
            });
        }
        Ok(())
    }
}

impl Home {
    /// `$REMOTELER_HOME`, else `$HOME/.remoteler`.
    pub fn from_env() -> Result<Home, ClientError> {
        if let Some(dir) = std::env::var_os("REMOTELER_HOME").filter(|d| !d.is_empty()) {
            return Ok(Home {
                dir: PathBuf::from(dir),
            });
        }
        let home = std::env::var_os("HOME")
            .filter(|d| !d.is_empty())
            .ok_or_else(|| {
                ClientError::msg("neither REMOTELER_HOME nor HOME is set; set REMOTELER_HOME to a directory for the login files")
            })?;
        Ok(Home {
            dir: Path::new(&home).join(".remoteler"),
        })
    }

    /// A given directory.
    pub fn at(dir: impl Into<PathBuf>) -> Home {
        Home { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A file in the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Creates the directory (0700) if needed.
    pub fn create(&self) -> Result<(), ClientError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| {
                ClientError::msg(format!(
                    "cannot create {}: {e}; set REMOTELER_HOME to a writable directory",
                    self.dir.display()
                ))
            })
    }

    /// The stored profile; `None` if there is none.
    pub fn profile(&self) -> Result<Option<Profile>, ClientError> {
        let path = self.file(PROFILE_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(ClientError::msg(format!(
                    "cannot read {}: {e}",
                    path.display()
                )));
            }
        };
        serde_json::from_str(&text).map(Some).map_err(|e| {
            ClientError::msg(format!(
                "{} is damaged ({e}); run `remoteler login` again",
                path.display()
            ))
        })
    }

    /// The profile of a login, or the error telling the user to log in.
    pub fn require_profile(&self) -> Result<Profile, ClientError> {
        self.profile()?.ok_or(ClientError::NotLoggedIn)
    }

    /// The profile of a valid login: not logged in and expired are errors, found before any
    /// connection is attempted.
    pub fn valid_profile(&self, now: SystemTime) -> Result<Profile, ClientError> {
        let profile = self.require_profile()?;
        profile.check_not_expired(now)?;
        if !self.file(USER_KEY_FILE).exists() || !self.file(USER_CERT_FILE).exists() {
            return Err(ClientError::NotLoggedIn);
        }
        Ok(profile)
    }

    /// Writes the profile atomically.
    pub fn save_profile(&self, profile: &Profile) -> Result<(), ClientError> {
        let mut text = serde_json::to_string_pretty(profile)
            .map_err(|e| ClientError::msg(format!("cannot encode the profile: {e}")))?;
        text.push('\n');
        write_atomic(&self.file(PROFILE_FILE), text.as_bytes(), 0o600)
    }

    /// The user's certificate chain and key.
    pub fn identity(&self) -> Result<TlsIdentity, ClientError> {
        TlsIdentity::load(&self.file(USER_CERT_FILE), &self.file(USER_KEY_FILE))
            .map_err(ClientError::from)
    }

    /// The stored cluster CA certificates.
    pub fn ca(&self) -> Result<Vec<CertificateDer<'static>>, ClientError> {
        identity::read_certificates(&self.file(CA_FILE), FileRole::Certificate)
            .map_err(ClientError::from)
    }

    /// The SSH public key line to have certified, making the key pair (once) if there is
    /// none yet.
    pub fn ssh_public_key(&self) -> Result<String, ClientError> {
        let path = self.file(SSH_KEY_FILE);
        let encode =
            |e: ssh_key::Error| ClientError::msg(format!("cannot encode the SSH key: {e}"));
        let key = match std::fs::read_to_string(&path) {
            Ok(text) => ssh_key::PrivateKey::from_openssh(text).map_err(|e| {
                ClientError::msg(format!(
                    "{} is not an OpenSSH private key ({e}); delete it and log in again",
                    path.display()
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut seed = [0u8; 32];
                getrandom::fill(&mut seed).map_err(|e| {
                    ClientError::msg(format!("no random bytes for the SSH key: {e}"))
                })?;
                let mut key =
                    ssh_key::PrivateKey::from(ssh_key::private::Ed25519Keypair::from_seed(&seed));
                key.set_comment("remoteler");
                let text = key.to_openssh(ssh_key::LineEnding::LF).map_err(encode)?;
                write_atomic(&path, text.as_bytes(), 0o600)?;
                key
            }
            Err(e) => {
                return Err(ClientError::msg(format!(
                    "cannot read {}: {e}",
                    path.display()
                )));
            }
        };
        let mut line = key.public_key().to_openssh().map_err(encode)?;
        line.push('\n');
        write_atomic(&self.file(SSH_PUBLIC_KEY_FILE), line.as_bytes(), 0o644)?;
        Ok(line.trim_end().to_owned())
    }

    /// Stores the SSH certificate of a login, or removes the previous one when the login
    /// brought none (so ssh never offers a certificate of older roles).
    pub fn save_ssh_certificate(&self, certificate: Option<&str>) -> Result<(), ClientError> {
        let path = self.file(SSH_CERT_FILE);
        match certificate {
            Some(line) => write_atomic(&path, format!("{}\n", line.trim_end()).as_bytes(), 0o644),
            None => match std::fs::remove_file(&path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(ClientError::msg(format!(
                    "cannot remove {}: {e}",
                    path.display()
                ))),
            },
        }
    }

    /// Stores the cluster's SSH host CA public key from a login (one OpenSSH public key
    /// line), or removes an older one when the proxy sent none.
    pub fn save_ssh_host_ca(&self, line: Option<&str>) -> Result<(), ClientError> {
        let path = self.file(SSH_HOST_CA_FILE);
        match line {
            Some(line) => {
                // It goes into known_hosts: one well-formed key, nothing else.
                let line = one_public_key(line).ok_or_else(|| {
                    ClientError::msg(
                        "the proxy's SSH host CA is not one OpenSSH public key line; not \
                         stored (nodes' host keys are not verified until it is)",
                    )
                })?;
                write_atomic(&path, format!("{line}\n").as_bytes(), 0o644)
            }
            None => match std::fs::remove_file(&path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(ClientError::msg(format!(
                    "cannot remove {}: {e}",
                    path.display()
                ))),
            },
        }
    }

    /// The cluster's SSH host CA public key line, if the login stored one.
    pub fn ssh_host_ca(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.file(SSH_HOST_CA_FILE)).ok()?;
        one_public_key(&text)
    }

    /// Replaces the known_hosts file (mode 0644) and returns its path.
    pub fn write_known_hosts(&self, text: &str) -> Result<PathBuf, ClientError> {
        let path = self.file(KNOWN_HOSTS_FILE);
        write_atomic(&path, text.as_bytes(), 0o644)?;
        Ok(path)
    }

    /// The SSH key and certificate files, when a login stored a certificate.
    pub fn ssh_identity(&self) -> Option<(PathBuf, PathBuf)> {
        let key = self.file(SSH_KEY_FILE);
        let cert = self.file(SSH_CERT_FILE);
        (key.exists() && cert.exists()).then_some((key, cert))
    }

    /// Deletes the keys and certificates; true if anything was there.
    pub fn remove_credentials(&self) -> Result<bool, ClientError> {
        let mut removed = false;
        for name in [
            USER_KEY_FILE,
            USER_CERT_FILE,
            SSH_KEY_FILE,
            SSH_PUBLIC_KEY_FILE,
            SSH_CERT_FILE,
        ] {
            let path = self.file(name);
            match std::fs::remove_file(&path) {
                Ok(()) => removed = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(ClientError::msg(format!(
                        "cannot remove {}: {e}",
                        path.display()
                    )));
                }
            }
        }
        Ok(removed)
    }
}

/// `line` as one OpenSSH public key line, re-encoded, for known_hosts; `None` if it is not
/// one, or holds a control character (the parser takes a comment's newline as part of it, and
/// a second line would be a known_hosts entry of its own).
pub fn one_public_key(line: &str) -> Option<String> {
    let line = line.trim();
    if line.chars().any(char::is_control) {
        return None;
    }
    ssh_key::PublicKey::from_openssh(line)
        .ok()?
        .to_openssh()
        .ok()
}

/// Temporary file, sync, rename.
fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), ClientError> {
    use std::io::Write;
    let err = |e: std::io::Error| ClientError::msg(format!("cannot write {}: {e}", path.display()));
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    file.write_all(contents).map_err(err)?;
    file.sync_all().map_err(err)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn profile(expires_unix: u64) -> Profile {
        Profile {
            proxy: "proxy.example.com:3023".into(),
            user: "alice".into(),
            cluster: "example.com".into(),
            roles: vec!["dev".into()],
            logins: vec!["root".into()],
            ssh_logins: vec!["root".into()],
            expires_unix,
        }
    }

    #[test]
    fn profile_round_trips_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path().join("h"));
        assert!(home.profile().unwrap().is_none());
        home.create().unwrap();
        let p = profile(2_000_000_000);
        home.save_profile(&p).unwrap();
        assert_eq!(home.profile().unwrap().unwrap(), p);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(home.file(PROFILE_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let mode = std::fs::metadata(home.dir()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn expiry_message_names_cluster_time_and_command() {
        let p = profile(1_700_000_000);
        let err = p
            .check_not_expired(SystemTime::now())
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "your login to example.com expired at 2023-11-14T22:13:20Z; run `remoteler login --proxy proxy.example.com:3023 --user alice`"
        );
        assert!(
            p.check_not_expired(UNIX_EPOCH + Duration::from_secs(1_600_000_000))
                .is_ok()
        );
    }

    #[test]
    fn damaged_profile_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path());
        std::fs::write(home.file(PROFILE_FILE), "{not json").unwrap();
        let err = home.profile().unwrap_err().to_string();
        assert!(
            err.contains("damaged") && err.contains("remoteler login"),
            "{err}"
        );
    }

    #[test]
    fn valid_profile_requires_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path());
        assert!(matches!(
            home.valid_profile(SystemTime::now()),
            Err(ClientError::NotLoggedIn)
        ));
        home.save_profile(&profile(4_000_000_000)).unwrap();
        assert!(matches!(
            home.valid_profile(SystemTime::now()),
            Err(ClientError::NotLoggedIn)
        ));
        std::fs::write(home.file(USER_KEY_FILE), "k").unwrap();
        std::fs::write(home.file(USER_CERT_FILE), "c").unwrap();
        assert!(home.valid_profile(SystemTime::now()).is_ok());
        assert!(home.remove_credentials().unwrap());
        assert!(!home.file(USER_KEY_FILE).exists());
        assert!(!home.remove_credentials().unwrap());
    }

    /// The host CA line goes into known_hosts: a newline in its comment would add an entry.
    #[test]
    fn a_host_ca_line_is_one_key_or_nothing() {
        let key =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ";
        assert_eq!(
            one_public_key(&format!("{key} ca@c\n")).as_deref(),
            Some(format!("{key} ca@c").as_str())
        );
        assert_eq!(
            one_public_key(&format!("{key} c\n@cert-authority * {key}")),
            None
        );
        assert_eq!(one_public_key("ssh-ed25519 !!!"), None);
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path());
        assert!(
            home.save_ssh_host_ca(Some(&format!("{key} x\r\n* {key}")))
                .is_err()
        );
        home.save_ssh_host_ca(Some(key)).unwrap();
        assert_eq!(home.ssh_host_ca().as_deref(), Some(key));
    }
}
