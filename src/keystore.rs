//! Key files on disk: where they live, their permissions, first-start
//! creation, and the key-check that stops a wrong master key before the data
//! directory is touched.
//!
//! Key directory (default `~/.config/carevault/keys`, outside the data directory):
//!
//! | file                  | content                                   | mode |
//! |-----------------------|-------------------------------------------|------|
//! | `master-<N>.key`      | master key version N: 64 hex digits + LF  | 0600 (refused if group/other can read) |
//! | `issuer-ed25519.pk8`  | dev token issuer private key, PKCS#8 DER  | 0600 |
//! | `issuer-ed25519.pub`  | its public key, PEM SubjectPublicKeyInfo   | 0644 |
//!
//! Data directory (default `~/.local/share/carevault`): `db/` (sled) and
//! `keycheck.json`: `{"format":1,"master_keys":{"1":"<hex KCV>"},"blind_index_version":1}`.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::crypto::{self, Keyring, MasterKey};

/// Start-up failures about keys and directories. Messages name files and
/// versions, never key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// I/O on a key or data file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A key file is readable by group or others.
    #[error("{0}: key file is readable by group or others; run `chmod 600` on it (refusing to start)")]
    Permissions(PathBuf),
    /// A key file's content is malformed.
    #[error("{0}: malformed key file")]
    Malformed(PathBuf),
    /// No master key files.
    #[error(
        "no master key (master-<N>.key) in {0}; the data directory exists, so refusing to create a new key. Point --key-dir at the keys for this data directory"
    )]
    NoMasterKey(PathBuf),
    /// A master key does not match the data directory's key-check value.
    #[error(
        "master key version {0} does not match this data directory (key-check value mismatch): wrong master key. Refusing to start; nothing was modified"
    )]
    WrongKey(u32),
    /// The data directory needs a master key version the key directory lacks.
    #[error(
        "this data directory needs master key version {0}, which is not in the key directory. Refusing to start; nothing was modified"
    )]
    MissingVersion(u32),
    /// A database exists without a key-check file.
    #[error("{0}: database present but keycheck.json missing; refusing to guess which key protects it")]
    NoKeyCheck(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io { path: path.to_path_buf(), source }
}

/// Paths of the key files.
#[derive(Debug, Clone)]
pub struct KeyPaths {
    /// The key directory.
    pub dir: PathBuf,
}

impl KeyPaths {
    /// The master key file for a version.
    pub fn master(&self, version: u32) -> PathBuf {
        self.dir.join(format!("master-{version}.key"))
    }
    /// The dev issuer private key.
    pub fn issuer_private(&self) -> PathBuf {
        self.dir.join("issuer-ed25519.pk8")
    }
    /// The dev issuer public key (PEM).
    pub fn issuer_public(&self) -> PathBuf {
        self.dir.join("issuer-ed25519.pub")
    }
}

#[derive(Serialize, Deserialize)]
struct KeyCheck {
    format: u32,
    master_keys: BTreeMap<String, String>,
    blind_index_version: u32,
}

/// Refuses a key file that group or others can read.
pub fn check_private(path: &Path) -> Result<(), KeyError> {
    let meta = fs::metadata(path).map_err(io(path))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(KeyError::Permissions(path.to_path_buf()));
    }
    Ok(())
}

/// Reads a secret file after checking its permissions.
pub fn read_private(path: &Path) -> Result<zeroize::Zeroizing<Vec<u8>>, KeyError> {
    check_private(path)?;
    Ok(zeroize::Zeroizing::new(fs::read(path).map_err(io(path))?))
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeyError> {
    let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn create_dir_private(dir: &Path) -> Result<(), KeyError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))
}

/// PEM SubjectPublicKeyInfo for a raw Ed25519 public key.
pub fn ed25519_public_pem(public_key: &[u8; 32]) -> String {
    let mut der = vec![0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];
    der.extend_from_slice(public_key);
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    format!("-----BEGIN PUBLIC KEY-----\n{b64}\n-----END PUBLIC KEY-----\n")
}

/// Parses a PEM SubjectPublicKeyInfo holding an Ed25519 key.
pub fn parse_ed25519_public_pem(path: &Path) -> Result<[u8; 32], KeyError> {
    let text = fs::read_to_string(path).map_err(io(path))?;
    let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body.trim())
        .map_err(|_| KeyError::Malformed(path.to_path_buf()))?;
    let prefix = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];
    if der.len() != 44 || der[..12] != prefix {
        return Err(KeyError::Malformed(path.to_path_buf()));
    }
    let mut k = [0u8; 32];
    k.copy_from_slice(&der[12..]);
    Ok(k)
}

/// Creates the key directory with master key v1 and a dev issuer key pair,
/// for whichever of them does not exist yet. Returns true if anything was created.
pub fn ensure_keys(paths: &KeyPaths) -> Result<bool, KeyError> {
    let mut created = false;
    if !paths.dir.exists() {
        create_dir_private(&paths.dir)?;
    }
    if master_versions(paths)?.is_empty() {
        let key = MasterKey::generate().map_err(|_| KeyError::Malformed(paths.master(1)))?;
        write_new(&paths.master(1), key.to_hex().as_bytes(), 0o600)?;
        created = true;
    }
    if !paths.issuer_private().exists() {
        let pair = crypto::generate_issuer_key().map_err(|_| KeyError::Malformed(paths.issuer_private()))?;
        write_new(&paths.issuer_private(), &pair.pkcs8_der, 0o600)?;
        let public = paths.issuer_public();
        if public.exists() {
            fs::remove_file(&public).map_err(io(&public))?;
        }
        write_new(&public, ed25519_public_pem(&pair.public_key).as_bytes(), 0o644)?;
        created = true;
    }
    Ok(created)
}

/// Master key versions present in the key directory.
pub fn master_versions(paths: &KeyPaths) -> Result<Vec<u32>, KeyError> {
    let Ok(entries) = fs::read_dir(&paths.dir) else { return Ok(Vec::new()) };
    let mut versions = Vec::new();
    for e in entries {
        let e = e.map_err(io(&paths.dir))?;
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(v) =
            name.strip_prefix("master-").and_then(|s| s.strip_suffix(".key")).and_then(|s| s.parse::<u32>().ok())
        {
            versions.push(v);
        }
    }
    versions.sort_unstable();
    Ok(versions)
}

/// Loads every master key version (primary = highest).
pub fn load_keyring(paths: &KeyPaths, blind_index_version: Option<u32>) -> Result<Keyring, KeyError> {
    let versions = master_versions(paths)?;
    let Some(&primary) = versions.last() else { return Err(KeyError::NoMasterKey(paths.dir.clone())) };
    let mut masters = Vec::new();
    for v in &versions {
        let path = paths.master(*v);
        let bytes = read_private(&path)?;
        let text = std::str::from_utf8(&bytes).map_err(|_| KeyError::Malformed(path.clone()))?;
        masters.push((*v, MasterKey::from_hex(text).map_err(|_| KeyError::Malformed(path.clone()))?));
    }
    let bi = blind_index_version.unwrap_or(versions[0]);
    Keyring::new(masters, primary, bi).map_err(|_| KeyError::MissingVersion(bi))
}

/// Opens the keyring for a data directory, checking it against the
/// directory's key-check values before anything in it is opened. On a fresh
/// data directory, creates it and writes the key-check file.
pub fn open_for_data_dir(keys: &KeyPaths, data_dir: &Path) -> Result<Keyring, KeyError> {
    let check_path = data_dir.join("keycheck.json");
    if check_path.exists() {
        let text = fs::read_to_string(&check_path).map_err(io(&check_path))?;
        let check: KeyCheck = serde_json::from_str(&text).map_err(|_| KeyError::Malformed(check_path.clone()))?;
        if master_versions(keys)?.is_empty() {
            return Err(KeyError::NoMasterKey(keys.dir.clone()));
        }
        let ring = load_keyring(keys, Some(check.blind_index_version))?;
        for (v, kcv) in &check.master_keys {
            let v: u32 = v.parse().map_err(|_| KeyError::Malformed(check_path.clone()))?;
            match ring.key_check_value(v) {
                None => return Err(KeyError::MissingVersion(v)),
                Some(actual) if actual != *kcv => return Err(KeyError::WrongKey(v)),
                Some(_) => {}
            }
        }
        // Versions added since (rotation) get their key-check recorded.
        if ring.versions().iter().any(|v| !check.master_keys.contains_key(&v.to_string())) {
            write_keycheck(&check_path, &ring)?;
        }
        return Ok(ring);
    }
    if data_dir.join("db").exists() {
        return Err(KeyError::NoKeyCheck(data_dir.to_path_buf()));
    }
    create_dir_private(data_dir)?;
    let ring = load_keyring(keys, None)?;
    write_keycheck(&check_path, &ring)?;
    Ok(ring)
}

fn write_keycheck(path: &Path, ring: &Keyring) -> Result<(), KeyError> {
    let check = KeyCheck {
        format: 1,
        master_keys: ring
            .versions()
            .into_iter()
            .filter_map(|v| ring.key_check_value(v).map(|k| (v.to_string(), k)))
            .collect(),
        blind_index_version: ring.blind_index_version(),
    };
    let text = serde_json::to_string_pretty(&check).map_err(|_| KeyError::Malformed(path.to_path_buf()))?;
    let tmp = path.with_extension("json.tmp");
    let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(text.as_bytes()).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(parent) = path.parent() {
        fs::File::open(parent).and_then(|d| d.sync_all()).map_err(io(parent))?;
    }
    Ok(())
}
