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
//! `keycheck.json`, a copy of the key state (the store holds the key state
//! itself, shared by every process on it; this copy lets the master keys be
//! checked before the store is opened):
//!
//! ```json
//! {"format": 2, "primary": 2, "blind_index_version": 1,
//!  "master_keys": {"1": {"kcv": "<hex>", "state": "retired"},
//!                  "2": {"kcv": "<hex>", "state": "active"}}}
//! ```
//!
//! `state` is `active` (loaded, can decrypt), `retired` (not loaded: nothing
//! may depend on it) or `destroyed` (material removed). Format 1 (written
//! before rotation existed: `"master_keys": {"1": "<hex KCV>"}`, every version
//! active, primary the highest) is read and rewritten as format 2.
//! `blind_index_slot` (absent: 0) is the index slot of the current blind
//! index; `blind_index_next` names the version whose index is being built in
//! the other slot, and `blind_index_previous` the version whose old entries
//! are being dropped (both absent outside a blind-index key rotation).
//! `pre_erasure_versions` (absent when empty) lists the master versions that
//! wrapped data keys before the store had erasure buckets: until they are
//! destroyed, an erasure cannot promise old log bytes are unopenable.
//!
//! The data directory also holds `erasure-keys` (mode 0600), the erasure
//! bucket keys (format in `crypto::shred`), created with the store and
//! rewritten whole (temporary file, fsync, rename, directory fsync) by every
//! erasure, under an exclusive lock on `erasure-keys.lock`: processes that
//! share a database share this directory.

pub mod custody;

pub use custody::{Destroyed, KeySource};

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
        "this data directory needs master key version {0}, which the key source does not have. Refusing to start; nothing was modified"
    )]
    MissingVersion(u32),
    /// A database exists without a key-check file.
    #[error(
        "{0}: the store holds data but this data directory has no keycheck.json; refusing to guess which key protects it (a server sharing a PostgreSQL database with others needs copies of keycheck.json and erasure-keys from the first server's data directory)"
    )]
    NoKeyCheck(PathBuf),
    /// A server joining a store that holds data has no erasure-bucket keys.
    #[error(
        "{0}: the store holds data but this data directory has no erasure-keys; every server on one database needs the same erasure-keys file (share the data directory, or copy erasure-keys from the first server's)"
    )]
    NoErasureKeys(PathBuf),
    /// The erasure-bucket keys cannot open the store's data keys.
    #[error(
        "{0}: erasure-keys does not open this store's data keys (it belongs to another store, or to a server that initialized the database at the same moment as another); use the erasure-keys of the server that initialized it"
    )]
    ForeignErasureKeys(PathBuf),
    /// The key state stored in the store is not valid.
    #[error("the key state stored in the store is malformed")]
    StoredState,
    /// Reading or writing the key state in the store failed.
    #[error("the key state in the store: {0}")]
    Store(String),
    /// The key command failed.
    #[error("--master-key-command failed for version {0} (exit code {1:?})")]
    Command(u32, Option<i32>),
    /// A new version is not available from a source carevault cannot write to.
    #[error("master key version {0} is not provisioned in the key source; provision it there first, then rotate")]
    NotProvisioned(u32),
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
    /// The log key file for a version.
    pub fn log(&self, version: u32) -> PathBuf {
        self.dir.join(format!("log-{version}.key"))
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

pub(crate) fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeyError> {
    let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// Replaces `dir/name` atomically and durably: a temporary file with `mode`,
/// fsync, rename over the old one, directory fsync. The old content is gone
/// from the file system's namespace once this returns.
pub(crate) fn write_atomic(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> Result<(), KeyError> {
    let path = dir.join(name);
    let tmp = unique_tmp(dir, name);
    let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, &path).map_err(io(&path))?;
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// A temporary file name beside `dir/name` no other writer uses (several
/// processes may share a data directory).
fn unique_tmp(dir: &Path, name: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

/// The erasure-keys file of a data directory.
pub const ERASURE_KEYS_FILE: &str = "erasure-keys";

/// The lock file that serializes changes of `erasure-keys` between the
/// processes sharing a data directory.
const ERASURE_KEYS_LOCK: &str = "erasure-keys.lock";

/// Writes the erasure bucket keys (atomically, mode 0600).
pub fn write_erasure_keys(data_dir: &Path, keys: &crypto::ShredKeys) -> Result<(), KeyError> {
    write_atomic(data_dir, ERASURE_KEYS_FILE, &keys.encode(), 0o600)
}

/// Reads the erasure bucket keys of a data directory.
pub fn read_erasure_keys(data_dir: &Path) -> Result<crypto::ShredKeys, KeyError> {
    let path = data_dir.join(ERASURE_KEYS_FILE);
    if !path.exists() {
        return Err(KeyError::NoErasureKeys(data_dir.to_path_buf()));
    }
    let bytes = read_private(&path)?;
    crypto::ShredKeys::decode(&bytes).map_err(|_| KeyError::Malformed(path))
}

/// Changes the erasure bucket keys: under an exclusive lock on
/// `erasure-keys.lock` (held by one process at a time, whichever shares the
/// directory), reads the file as it is now, applies `change` and writes the
/// result back atomically. Returns what was written.
pub fn update_erasure_keys(
    data_dir: &Path,
    change: impl FnOnce(&crypto::ShredKeys) -> Result<crypto::ShredKeys, crypto::CryptoError>,
) -> Result<crypto::ShredKeys, KeyError> {
    let lock = lock_exclusive(&data_dir.join(ERASURE_KEYS_LOCK))?;
    let current = read_erasure_keys(data_dir)?;
    let next = change(&current).map_err(|_| KeyError::Malformed(data_dir.join(ERASURE_KEYS_FILE)))?;
    write_erasure_keys(data_dir, &next)?;
    drop(lock);
    Ok(next)
}

/// Takes an exclusive `flock` on the lock file at `path` (created if
/// absent), held until the returned file is dropped: how the processes
/// sharing a data directory take turns changing a file in it.
fn lock_exclusive(path: &Path) -> Result<fs::File, KeyError> {
    let lock =
        fs::OpenOptions::new().write(true).create(true).truncate(false).mode(0o600).open(path).map_err(io(path))?;
    lock.lock().map_err(io(path))?;
    Ok(lock)
}

/// Creates `erasure-keys` with new keys unless it exists (another process
/// sharing the directory may create it at the same moment: the first file
/// wins and every process reads that one).
fn create_erasure_keys(data_dir: &Path) -> Result<crypto::ShredKeys, KeyError> {
    let path = data_dir.join(ERASURE_KEYS_FILE);
    let keys =
        crypto::ShredKeys::generate(crypto::shred::DEFAULT_BUCKETS).map_err(|_| KeyError::Malformed(path.clone()))?;
    let tmp = unique_tmp(data_dir, ERASURE_KEYS_FILE);
    write_new(&tmp, &keys.encode(), 0o600)?;
    let linked = fs::hard_link(&tmp, &path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            fs::File::open(data_dir).and_then(|d| d.sync_all()).map_err(io(data_dir))?;
            Ok(keys)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read_erasure_keys(data_dir),
        Err(e) => Err(KeyError::Io { path, source: e }),
    }
}

/// Reads the erasure bucket keys, creating them for a store that has none.
/// A store whose database predates them gets its active versions recorded in
/// `pre_erasure_versions`.
fn open_erasure_keys(data_dir: &Path, state: &mut KeyState) -> Result<crypto::ShredKeys, KeyError> {
    if data_dir.join(ERASURE_KEYS_FILE).exists() {
        return read_erasure_keys(data_dir);
    }
    if data_dir.join("db").exists() {
        state.pre_erasure_versions = state.active();
        state.write(data_dir)?;
    }
    create_erasure_keys(data_dir)
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
    let mut created = ensure_issuer(paths)?;
    if master_versions(paths)?.is_empty() {
        let key = MasterKey::generate().map_err(|_| KeyError::Malformed(paths.master(1)))?;
        write_new(&paths.master(1), key.to_hex().as_bytes(), 0o600)?;
        created = true;
    }
    Ok(created)
}

/// Creates the key directory and the dev token issuer key pair if missing
/// (master keys may come from elsewhere). Returns true if anything was created.
pub fn ensure_issuer(paths: &KeyPaths) -> Result<bool, KeyError> {
    if !paths.dir.exists() {
        create_dir_private(&paths.dir)?;
    }
    if paths.issuer_private().exists() {
        return Ok(false);
    }
    let pair = crypto::generate_issuer_key().map_err(|_| KeyError::Malformed(paths.issuer_private()))?;
    write_new(&paths.issuer_private(), &pair.pkcs8_der, 0o600)?;
    let public = paths.issuer_public();
    if public.exists() {
        fs::remove_file(&public).map_err(io(&public))?;
    }
    write_new(&public, ed25519_public_pem(&pair.public_key).as_bytes(), 0o644)?;
    Ok(true)
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

/// The life-cycle state of a master key version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VersionState {
    /// Loaded; can decrypt (and wrap, if primary).
    Active,
    /// Not loaded; nothing depends on it.
    Retired,
    /// Material removed.
    Destroyed,
}

impl VersionState {
    /// The name used in keycheck.json and `keys status`.
    pub fn as_str(self) -> &'static str {
        match self {
            VersionState::Active => "active",
            VersionState::Retired => "retired",
            VersionState::Destroyed => "destroyed",
        }
    }
}

/// One version's record in the key state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// Key-check value (hex); reveals nothing about the key.
    pub kcv: String,
    /// Life-cycle state.
    pub state: VersionState,
}

/// The key state of a data directory (`keycheck.json`, format 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyState {
    /// Always 2 when written.
    pub format: u32,
    /// Counts the changes of the key state (absent: 0). Every change, an
    /// erasure's included, moves it, so processes that share the store see
    /// that theirs is stale.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub generation: u64,
    /// The version new data keys are wrapped with.
    pub primary: u32,
    /// The version the blind-index key is derived from.
    pub blind_index_version: u32,
    /// Every version ever used, by number.
    pub master_keys: BTreeMap<u32, VersionInfo>,
    /// Versions that wrapped data keys before erasure buckets existed (see the module docs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pre_erasure_versions: Vec<u32>,
    /// The index slot (0 or 1) of the current blind index (absent: 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub blind_index_slot: u8,
    /// A blind index being built in the other slot, from this version (blind-index key rotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blind_index_next: Option<u32>,
    /// The previous blind index's version while its entries are being dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blind_index_previous: Option<u32>,
    /// The audit log's origin: the first line of its checkpoints and the
    /// name of its log keys (absent until the first log key exists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_origin: Option<String>,
    /// Every log key version: its public key and state. The newest active
    /// one signs checkpoints; retired ones still verify older checkpoints.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub log_keys: BTreeMap<u32, LogKeyInfo>,
}

/// One log key version's record in the key state (the private key is kept
/// by the key source, never here or in the store).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogKeyInfo {
    /// The Ed25519 public key, base64.
    pub public_key: String,
    /// Active (signs, if newest) or retired (verifies only).
    pub state: VersionState,
    /// When it was created (µs since the epoch).
    pub created_micros: i64,
}

impl LogKeyInfo {
    /// The raw public key.
    pub fn public(&self) -> Option<[u8; 32]> {
        base64::engine::general_purpose::STANDARD.decode(&self.public_key).ok()?.try_into().ok()
    }
}

fn is_zero(v: &u8) -> bool {
    *v == 0
}

fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}

#[derive(Deserialize)]
struct KeyCheckV1 {
    master_keys: BTreeMap<String, String>,
    blind_index_version: u32,
}

impl KeyState {
    /// Verifier keys of every log key version (none before the first).
    pub fn log_verifiers(&self) -> Vec<crate::audit::note::Verifier> {
        let Some(origin) = &self.log_origin else { return Vec::new() };
        self.log_keys.values().filter_map(|k| crate::audit::note::Verifier::new(origin, k.public()?).ok()).collect()
    }

    /// The log key that signs: the newest active version.
    pub fn signing_log_key(&self) -> Option<(u32, &LogKeyInfo)> {
        self.log_keys.iter().rev().find(|(_, k)| k.state == VersionState::Active).map(|(v, k)| (*v, k))
    }

    /// Active versions, ascending.
    pub fn active(&self) -> Vec<u32> {
        self.master_keys.iter().filter(|(_, i)| i.state == VersionState::Active).map(|(v, _)| *v).collect()
    }

    /// The bytes stored in the store: compact JSON (the same document as
    /// `keycheck.json`, without whitespace).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses [`KeyState::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<KeyState, KeyError> {
        let state: KeyState = serde_json::from_slice(bytes).map_err(|_| KeyError::StoredState)?;
        if state.format != 2 || !state.master_keys.contains_key(&state.primary) {
            return Err(KeyError::StoredState);
        }
        Ok(state)
    }

    /// Reads `keycheck.json` of a data directory.
    pub fn load(data_dir: &Path) -> Result<KeyState, KeyError> {
        KeyState::read(&data_dir.join("keycheck.json"))
    }

    fn read(path: &Path) -> Result<KeyState, KeyError> {
        let text = fs::read_to_string(path).map_err(io(path))?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|_| KeyError::Malformed(path.into()))?;
        if value.get("format").and_then(|f| f.as_u64()) == Some(1) {
            let v1: KeyCheckV1 = serde_json::from_value(value).map_err(|_| KeyError::Malformed(path.into()))?;
            let mut master_keys = BTreeMap::new();
            for (v, kcv) in v1.master_keys {
                let v: u32 = v.parse().map_err(|_| KeyError::Malformed(path.into()))?;
                master_keys.insert(v, VersionInfo { kcv, state: VersionState::Active });
            }
            let primary = *master_keys.keys().last().ok_or_else(|| KeyError::Malformed(path.into()))?;
            return Ok(KeyState {
                format: 2,
                generation: 0,
                primary,
                blind_index_version: v1.blind_index_version,
                master_keys,
                pre_erasure_versions: Vec::new(),
                blind_index_slot: 0,
                blind_index_next: None,
                blind_index_previous: None,
                log_origin: None,
                log_keys: BTreeMap::new(),
            });
        }
        serde_json::from_value(value).map_err(|_| KeyError::Malformed(path.into()))
    }

    /// Writes the state atomically (temporary file, fsync, rename, directory fsync).
    pub fn write(&self, data_dir: &Path) -> Result<(), KeyError> {
        let path = data_dir.join("keycheck.json");
        let text = serde_json::to_string_pretty(self).map_err(|_| KeyError::Malformed(path.clone()))?;
        write_atomic(data_dir, "keycheck.json", text.as_bytes(), 0o644)
    }

    /// Builds the keyring of the active versions, fetching each from `source`
    /// and checking it against its key-check value.
    pub fn keyring(&self, source: &KeySource) -> Result<Keyring, KeyError> {
        let mut masters = Vec::new();
        for v in self.active() {
            let key = source.fetch(v)?.ok_or(KeyError::MissingVersion(v))?;
            let ring = Keyring::new(vec![(v, key.clone_key())], v, v).map_err(|_| KeyError::MissingVersion(v))?;
            if ring.key_check_value(v).as_deref() != Some(self.master_keys[&v].kcv.as_str()) {
                return Err(KeyError::WrongKey(v));
            }
            masters.push((v, key));
        }
        Keyring::new(masters, self.primary, self.blind_index_version)
            .and_then(|ring| ring.with_blind_slots(self.blind_index_slot, self.blind_index_next))
            .map_err(|e| match e {
                crate::crypto::CryptoError::UnknownKeyVersion(v) => KeyError::MissingVersion(v),
                _ => KeyError::MissingVersion(self.primary),
            })
    }
}

/// What the data directory holds before the store is opened: the key
/// state of `keycheck.json` (checked against the key source), if there is
/// one, and the erasure bucket keys.
pub struct LocalKeys {
    /// The key state of `keycheck.json`, if there is one.
    pub state: Option<KeyState>,
    /// Its keyring, every active version checked against its key-check value,
    /// if it was checked before the store is opened (see [`open_for_store`]).
    pub ring: Option<Keyring>,
    /// The erasure bucket keys.
    pub shreds: crypto::ShredKeys,
}

/// Opens the keyring for a data directory, checking every active version
/// against the directory's key-check values before anything in it is opened.
/// On a fresh data directory, creates it with version 1 (created in the
/// source if it is key files) and writes the key state.
pub fn open_for_data_dir(source: &KeySource, data_dir: &Path) -> Result<LocalKeys, KeyError> {
    open_for_store(source, data_dir, data_dir.join("db").exists(), true)
}

/// [`open_for_data_dir`] for a store kept elsewhere (`--store`): whether
/// it already holds data is `store_has_data`. A data directory without
/// `keycheck.json` next to a store with data is refused if
/// `check_before_open` (the store changes files on open, so a wrong key must
/// be caught first); otherwise the store's own key state is used, checked
/// once it is open, and `erasure-keys` must be there. Without
/// `check_before_open`, a `keycheck.json` beside a store with data is not
/// checked either (it may be older than the store's key state, which is what
/// counts): the store's state is, once it is open.
pub fn open_for_store(
    source: &KeySource,
    data_dir: &Path,
    store_has_data: bool,
    check_before_open: bool,
) -> Result<LocalKeys, KeyError> {
    let check_path = data_dir.join("keycheck.json");
    if check_path.exists() {
        let mut state = KeyState::read(&check_path)?;
        let ring = if check_before_open || !store_has_data { Some(state.keyring(source)?) } else { None };
        let shreds = open_erasure_keys(data_dir, &mut state)?;
        return Ok(LocalKeys { state: Some(state), ring, shreds });
    }
    if store_has_data {
        if check_before_open {
            return Err(KeyError::NoKeyCheck(data_dir.to_path_buf()));
        }
        return Ok(LocalKeys { state: None, ring: None, shreds: read_erasure_keys(data_dir)? });
    }
    let key = match source {
        KeySource::Files(paths) => {
            let first =
                master_versions(paths)?.first().copied().ok_or_else(|| KeyError::NoMasterKey(paths.dir.clone()))?;
            if first != 1 {
                return Err(KeyError::MissingVersion(1));
            }
            source.fetch(1)?.ok_or(KeyError::MissingVersion(1))?
        }
        _ => source.fetch(1)?.ok_or(KeyError::NotProvisioned(1))?,
    };
    let ring = Keyring::new(vec![(1, key)], 1, 1).map_err(|_| KeyError::MissingVersion(1))?;
    let kcv = ring.key_check_value(1).ok_or(KeyError::MissingVersion(1))?;
    let state = KeyState {
        format: 2,
        generation: 0,
        primary: 1,
        blind_index_version: 1,
        master_keys: [(1, VersionInfo { kcv, state: VersionState::Active })].into_iter().collect(),
        pre_erasure_versions: Vec::new(),
        blind_index_slot: 0,
        blind_index_next: None,
        blind_index_previous: None,
        log_origin: None,
        log_keys: BTreeMap::new(),
    };
    create_dir_private(data_dir)?;
    state.write(data_dir)?;
    let shreds = create_erasure_keys(data_dir)?;
    Ok(LocalKeys { state: Some(state), ring: Some(ring), shreds })
}

/// The checkpoint this data directory's log key signed last (`checkpoint-state`).
pub const SIGNED_HEAD_FILE: &str = "checkpoint-state";

/// The lock serializing changes of [`SIGNED_HEAD_FILE`] between processes.
const SIGNED_HEAD_LOCK: &str = "checkpoint-state.lock";

/// The newest checkpoint signed from this data directory: its size and
/// root. Kept beside the keys, not in the store, so a store rewritten behind
/// carevault's back cannot make it sign a checkpoint inconsistent with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedHead {
    /// Tree size.
    pub size: u64,
    /// Root hash.
    pub root: [u8; 32],
}

/// Reads [`SIGNED_HEAD_FILE`] (`carevault checkpoint-state v1`, size, base64 root; one per line).
pub fn read_signed_head(data_dir: &Path) -> Result<Option<SignedHead>, KeyError> {
    let path = data_dir.join(SIGNED_HEAD_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(KeyError::Io { path, source: e }),
    };
    let bad = || KeyError::Malformed(path.clone());
    let mut lines = text.lines();
    if lines.next() != Some("carevault checkpoint-state v1") {
        return Err(bad());
    }
    let size = lines.next().and_then(|l| l.parse().ok()).ok_or_else(bad)?;
    let root = lines
        .next()
        .and_then(|l| base64::engine::general_purpose::STANDARD.decode(l).ok())
        .and_then(|b| b.try_into().ok())
        .ok_or_else(bad)?;
    Ok(Some(SignedHead { size, root }))
}

/// Records `next` as the newest signed checkpoint, under the lock, if the
/// file still holds `seen` (else returns what it holds now, unchanged).
pub fn advance_signed_head(
    data_dir: &Path,
    seen: Option<SignedHead>,
    next: SignedHead,
) -> Result<Result<(), Option<SignedHead>>, KeyError> {
    let lock = lock_exclusive(&data_dir.join(SIGNED_HEAD_LOCK))?;
    let now = read_signed_head(data_dir)?;
    if now != seen {
        return Ok(Err(now));
    }
    let text = format!(
        "carevault checkpoint-state v1\n{}\n{}\n",
        next.size,
        base64::engine::general_purpose::STANDARD.encode(next.root)
    );
    write_atomic(data_dir, SIGNED_HEAD_FILE, text.as_bytes(), 0o600)?;
    drop(lock);
    Ok(Ok(()))
}
