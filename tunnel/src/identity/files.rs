//! Reading and atomically writing certificate and key files.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::error::{FileRole, IdentityError};
use super::keys::PrivateKey;

/// Mode of private key files.
const PRIVATE_MODE: u32 = 0o600;
/// Mode of certificate files.
const PUBLIC_MODE: u32 = 0o644;
/// Largest certificate or key file we read. Ours are a few KiB; this stops a wrong path (a
/// log file, a device) from being read whole into memory.
const MAX_FILE_LEN: u64 = 1 << 20;

/// Writes a private key file atomically with mode 0600, replacing any previous file.
pub fn write_private_file(
    path: &Path,
    key: &PrivateKey,
    what: FileRole,
) -> Result<(), IdentityError> {
    write_atomic(
        path,
        key.to_pem().as_bytes(),
        PRIVATE_MODE,
        Replace::Yes,
        what,
    )
}

/// Writes a public file (certificates) atomically with mode 0644, replacing any previous file.
pub fn write_public_file(
    path: &Path,
    contents: &[u8],
    what: FileRole,
) -> Result<(), IdentityError> {
    write_atomic(path, contents, PUBLIC_MODE, Replace::Yes, what)
}

/// Creates a private file (mode 0600) atomically from `contents`, for keys in other formats
/// (the proxy's OpenSSH SSH user CA); refuses to replace an existing file.
pub fn create_private_file(
    path: &Path,
    contents: &[u8],
    what: FileRole,
) -> Result<(), IdentityError> {
    write_atomic(path, contents, PRIVATE_MODE, Replace::No, what)
}

/// Reads a private file written by [`create_private_file`], refusing one that other users may
/// read or write, as [`read_private_key`] does.
pub fn read_private_file(path: &Path, what: FileRole) -> Result<Vec<u8>, IdentityError> {
    let (file, contents) = read_small(path, what)?;
    let meta = file.metadata().map_err(|source| IdentityError::ReadFile {
        what,
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::KeyFileTooOpen {
            what,
            path: path.to_owned(),
            mode,
        });
    }
    Ok(contents)
}

/// Whether [`write_atomic`] may replace an existing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Replace {
    Yes,
    No,
}

/// Writes `contents` to `path` so that a crash at any point leaves either the old file (or
/// none) or the complete new one: a temporary file in the same directory, created with its
/// final mode (the contents are never readable by others, not even briefly), written, synced,
/// then renamed over `path` (or hard-linked to it when `replace` is `No`, which fails if
/// `path` exists), and the directory synced so the new name survives a power cut.
pub(crate) fn write_atomic(
    path: &Path,
    contents: &[u8],
    mode: u32,
    replace: Replace,
    what: FileRole,
) -> Result<(), IdentityError> {
    let write_err = |path: &Path, source| IdentityError::WriteFile {
        what,
        path: path.to_owned(),
        source,
    };
    let dir = parent_dir(path);
    let Some(file_name) = path.file_name() else {
        return Err(write_err(
            path,
            io::Error::from(io::ErrorKind::InvalidInput),
        ));
    };
    if replace == Replace::No && path.exists() {
        return Err(IdentityError::AlreadyExists {
            what,
            path: path.to_owned(),
        });
    }

    let (tmp, mut file) = create_temp(&dir, file_name.to_string_lossy().as_ref(), mode)
        .map_err(|e| write_err(path, e))?;
    let written = (|| {
        file.write_all(contents)?;
        // The mode given to open() is masked by the umask; set it exactly.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all()
    })();
    drop(file);
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(write_err(path, e));
    }

    let placed = match replace {
        Replace::Yes => fs::rename(&tmp, path),
        Replace::No => {
            let linked = fs::hard_link(&tmp, path);
            let _ = fs::remove_file(&tmp);
            linked
        }
    };
    if let Err(e) = placed {
        let _ = fs::remove_file(&tmp);
        if e.kind() == io::ErrorKind::AlreadyExists {
            return Err(IdentityError::AlreadyExists {
                what,
                path: path.to_owned(),
            });
        }
        return Err(write_err(path, e));
    }
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| IdentityError::WriteFile {
            what: FileRole::Directory,
            path: dir.clone(),
            source: e,
        })
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Creates `.<name>.tmp-<pid>-<random>` in `dir`, exclusively.
fn create_temp(dir: &Path, name: &str, mode: u32) -> io::Result<(PathBuf, File)> {
    let mut attempts = 0;
    loop {
        let mut suffix = [0u8; 6];
        rustls::crypto::ring::default_provider()
            .secure_random
            .fill(&mut suffix)
            .map_err(|_| io::Error::other("the system random number generator failed"))?;
        let suffix: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
        let tmp = dir.join(format!(".{name}.tmp-{}-{suffix}", std::process::id()));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
        {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 8 => attempts += 1,
            Err(e) => return Err(e),
        }
    }
}

/// Reads a whole (small) file; the file handle is returned for `fstat` checks.
fn read_small(path: &Path, what: FileRole) -> Result<(File, Vec<u8>), IdentityError> {
    let read_err = |source| IdentityError::ReadFile {
        what,
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    let mut contents = Vec::new();
    (&file)
        .take(MAX_FILE_LEN + 1)
        .read_to_end(&mut contents)
        .map_err(read_err)?;
    if contents.len() as u64 > MAX_FILE_LEN {
        return Err(IdentityError::BadFile {
            what,
            path: path.to_owned(),
            detail: format!("it is larger than {MAX_FILE_LEN} bytes, so it cannot be a PEM file"),
        });
    }
    Ok((file, contents))
}

/// Reads all PEM certificates of a file, in order (a chain: leaf first).
pub fn read_certificates(
    path: &Path,
    what: FileRole,
) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let (_, contents) = read_small(path, what)?;
    let bad = |detail: String| IdentityError::BadFile {
        what,
        path: path.to_owned(),
        detail,
    };
    let certs = CertificateDer::pem_slice_iter(&contents)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("invalid PEM ({e})")))?;
    if certs.is_empty() {
        return Err(bad("it holds no `-----BEGIN CERTIFICATE-----` block".into()));
    }
    Ok(certs)
}

/// Reads a PKCS#8 PEM private key, refusing a file that other users may read or write.
pub fn read_private_key(path: &Path, what: FileRole) -> Result<PrivateKey, IdentityError> {
    let (file, contents) = read_small(path, what)?;
    let meta = file.metadata().map_err(|source| IdentityError::ReadFile {
        what,
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::KeyFileTooOpen {
            what,
            path: path.to_owned(),
            mode,
        });
    }
    let text = std::str::from_utf8(&contents).map_err(|_| IdentityError::BadFile {
        what,
        path: path.to_owned(),
        detail: "it is not a PEM text file".into(),
    })?;
    PrivateKey::from_pem(text).map_err(|e| IdentityError::BadFile {
        what,
        path: path.to_owned(),
        detail: e.to_string(),
    })
}

/// PEM text of certificates, in order (a chain as the proxy hands it to a node or user).
pub fn certificates_to_pem(certs: &[CertificateDer<'_>]) -> String {
    let mut out = String::new();
    for cert in certs {
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = base64(cert.as_ref());
        for line in b64.as_bytes().chunks(64) {
            // base64 output is ASCII.
            out.push_str(&String::from_utf8_lossy(line));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

/// Standard base64 with padding (RFC 4648 section 4).
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> shift & 0x3f) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_vectors() {
        // RFC 4648 section 10.
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
    }

    #[test]
    fn pem_round_trip() {
        let certs = vec![
            CertificateDer::from(vec![0x30, 0x03, 1, 2, 3]),
            CertificateDer::from(vec![7u8; 100]),
        ];
        let pem = certificates_to_pem(&certs);
        let back = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        assert_eq!(back, certs);
    }
}
