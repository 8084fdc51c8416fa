//! Where master keys come from (custody). carevault never links a KMS or HSM
//! SDK: an operator picks one of these sources.
//!
//! | source | version N is | new versions (rotate) | destroy |
//! |---|---|---|---|
//! | key files (default) | `<key-dir>/master-<N>.key`, 64 hex digits, mode 0600 (refused otherwise) | generated and written by carevault | file removed |
//! | command (`--master-key-command`) | stdout of `sh -c COMMAND` with `CAREVAULT_KEY_VERSION=N` in its environment: 64 hex digits | provisioned by the operator first, then fetched | operator removes it from the KMS |
//! | systemd credentials (`--master-key-credentials`, `$CREDENTIALS_DIRECTORY`) | file `carevault-master-<N>` in that directory | provisioned by the operator (`LoadCredentialEncrypted=`) | operator removes the credential |
//! | environment (`--insecure-dev-env-keys` only) | `CAREVAULT_MASTER_KEY_<N>` | provisioned by the operator | operator unsets it |
//!
//! Log keys (Ed25519, signing the audit trail's checkpoints) are kept the
//! same way, by version: `<key-dir>/log-<N>.key` (64 hex digits: the seed),
//! the command with `CAREVAULT_KEY_KIND=log` (`master` for master keys),
//! credential `carevault-log-<N>`, or `CAREVAULT_LOG_KEY_<N>`. Never in the store.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::{KeyError, KeyPaths, read_private, write_new};
use crate::crypto::MasterKey;

/// A master key source.
#[derive(Clone)]
pub enum KeySource {
    /// Key files in a directory.
    Files(KeyPaths),
    /// An operator command printing the key for `CAREVAULT_KEY_VERSION`.
    Command(String),
    /// systemd credentials directory.
    Credentials(PathBuf),
    /// Keys from environment variables, read by the CLI edge (development only).
    InsecureDevEnv(BTreeMap<u32, String>),
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never prints key material (the dev environment source holds keys).
        f.write_str(&self.describe())
    }
}

/// The kinds of key a source holds, by version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    /// Master keys (wrap data keys).
    Master,
    /// Log keys (sign checkpoints of the audit trail).
    Log,
}

impl KeyKind {
    fn name(self) -> &'static str {
        match self {
            KeyKind::Master => "master",
            KeyKind::Log => "log",
        }
    }

    fn env_var(self, v: u32) -> String {
        match self {
            KeyKind::Master => format!("CAREVAULT_MASTER_KEY_{v}"),
            KeyKind::Log => format!("CAREVAULT_LOG_KEY_{v}"),
        }
    }
}

/// What destroying a version did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destroyed {
    /// carevault removed the material (key file deleted and synced).
    Removed,
    /// The material is held outside carevault; the operator must remove it there.
    OperatorMustRemove,
}

impl KeySource {
    /// A short name for messages and `keys status`.
    pub fn describe(&self) -> String {
        match self {
            KeySource::Files(p) => format!("key files in {}", p.dir.display()),
            KeySource::Command(_) => "operator command".into(),
            KeySource::Credentials(d) => format!("systemd credentials in {}", d.display()),
            KeySource::InsecureDevEnv(_) => "environment variables (insecure, development only)".into(),
        }
    }

    /// Fetches version `v`; `Ok(None)` when the source does not have it.
    pub fn fetch(&self, v: u32) -> Result<Option<MasterKey>, KeyError> {
        let Some((text, what)) = self.fetch_text(KeyKind::Master, v)? else { return Ok(None) };
        MasterKey::from_hex(text.trim()).map(Some).map_err(|_| KeyError::Malformed(what))
    }

    /// Fetches log key version `v` (an Ed25519 seed, 64 hex digits), like a master key.
    pub fn fetch_log(&self, v: u32) -> Result<Option<crate::crypto::SigningKey>, KeyError> {
        let Some((text, what)) = self.fetch_text(KeyKind::Log, v)? else { return Ok(None) };
        let seed = zeroize::Zeroizing::new(hex::decode(text.trim()).map_err(|_| KeyError::Malformed(what.clone()))?);
        crate::crypto::SigningKey::from_seed(&seed).map(Some).map_err(|_| KeyError::Malformed(what))
    }

    /// The material for a new log key version `v`: generated and written for
    /// key files; fetched (provisioned by the operator first) otherwise.
    pub fn create_log(&self, v: u32) -> Result<crate::crypto::SigningKey, KeyError> {
        if let KeySource::Files(paths) = self {
            let path = paths.log(v);
            if !path.exists() {
                let mut seed = zeroize::Zeroizing::new([0u8; 32]);
                crate::crypto::random_fill(seed.as_mut()).map_err(|_| KeyError::Malformed(path.clone()))?;
                write_new(&path, hex::encode(seed.as_ref()).as_bytes(), 0o600)?;
            }
        }
        self.fetch_log(v)?.ok_or(KeyError::NotProvisioned(v))
    }

    /// The text a source holds for version `v` of a kind of key, and where it came from.
    fn fetch_text(&self, kind: KeyKind, v: u32) -> Result<Option<(zeroize::Zeroizing<String>, PathBuf)>, KeyError> {
        let text_of = |bytes: zeroize::Zeroizing<Vec<u8>>, what: &PathBuf| {
            std::str::from_utf8(&bytes)
                .map(|t| zeroize::Zeroizing::new(t.to_string()))
                .map_err(|_| KeyError::Malformed(what.clone()))
        };
        match self {
            KeySource::Files(paths) => {
                let path = match kind {
                    KeyKind::Master => paths.master(v),
                    KeyKind::Log => paths.log(v),
                };
                if !path.exists() {
                    return Ok(None);
                }
                Ok(Some((text_of(read_private(&path)?, &path)?, path)))
            }
            KeySource::Credentials(dir) => {
                let path = dir.join(format!("carevault-{}-{v}", kind.name()));
                if !path.exists() {
                    return Ok(None);
                }
                // systemd decrypts credentials into a private, read-only mount; the mode check still applies.
                Ok(Some((text_of(read_private(&path)?, &path)?, path)))
            }
            KeySource::InsecureDevEnv(vars) => {
                let what = PathBuf::from(format!("${}", kind.env_var(v)));
                let text = match kind {
                    KeyKind::Master => vars.get(&v).cloned(),
                    KeyKind::Log => std::env::var(kind.env_var(v)).ok(),
                };
                Ok(text.map(|t| (zeroize::Zeroizing::new(t), what)))
            }
            KeySource::Command(cmd) => {
                let what = PathBuf::from("--master-key-command");
                let out = std::process::Command::new("sh")
                    .args(["-c", cmd])
                    .env("CAREVAULT_KEY_VERSION", v.to_string())
                    .env("CAREVAULT_KEY_KIND", kind.name())
                    .stdin(std::process::Stdio::null())
                    .stderr(std::process::Stdio::inherit())
                    .output()
                    .map_err(|source| KeyError::Io { path: what.clone(), source })?;
                let stdout = zeroize::Zeroizing::new(out.stdout);
                if !out.status.success() {
                    return Err(KeyError::Command(v, out.status.code()));
                }
                let text = text_of(stdout, &what)?;
                if text.trim().is_empty() {
                    return Ok(None);
                }
                Ok(Some((text, what)))
            }
        }
    }

    /// The material for a new version `v`: generated and written for key
    /// files; fetched (it must be provisioned first) for the other sources.
    pub fn create(&self, v: u32) -> Result<MasterKey, KeyError> {
        match self {
            KeySource::Files(paths) => {
                let path = paths.master(v);
                if path.exists() {
                    // A file left by an earlier, interrupted rotation: use it.
                    return self.fetch(v)?.ok_or(KeyError::MissingVersion(v));
                }
                let key = MasterKey::generate().map_err(|_| KeyError::Malformed(path.clone()))?;
                write_new(&path, key.to_hex().as_bytes(), 0o600)?;
                Ok(key)
            }
            _ => self.fetch(v)?.ok_or(KeyError::NotProvisioned(v)),
        }
    }

    /// Removes version `v`'s material where carevault holds it.
    pub fn destroy(&self, v: u32) -> Result<Destroyed, KeyError> {
        match self {
            KeySource::Files(paths) => {
                let path = paths.master(v);
                if path.exists() {
                    std::fs::remove_file(&path).map_err(|source| KeyError::Io { path: path.clone(), source })?;
                    std::fs::File::open(&paths.dir)
                        .and_then(|d| d.sync_all())
                        .map_err(|source| KeyError::Io { path: paths.dir.clone(), source })?;
                }
                Ok(Destroyed::Removed)
            }
            _ => Ok(Destroyed::OperatorMustRemove),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_source_passes_the_version_and_reads_stdout() {
        let key = "ab".repeat(32);
        let src = KeySource::Command(format!("test \"$CAREVAULT_KEY_VERSION\" = 2 && echo {key}"));
        assert!(src.fetch(2).unwrap().is_some());
        assert!(matches!(src.fetch(3), Err(KeyError::Command(3, Some(1)))));
        let empty = KeySource::Command("true".into());
        assert!(empty.fetch(1).unwrap().is_none());
        let log = KeySource::Command(format!("test \"$CAREVAULT_KEY_KIND\" = log && echo {key}"));
        assert!(log.fetch_log(1).unwrap().is_some());
        assert!(log.fetch(1).is_err(), "a master key is not a log key");
        assert!(matches!(empty.create(1), Err(KeyError::NotProvisioned(1))));
    }

    #[test]
    fn credentials_and_env_sources_read_their_versions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("carevault-master-1");
        std::fs::write(&file, "cd".repeat(32)).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o400)).unwrap();
        let src = KeySource::Credentials(dir.path().to_path_buf());
        assert!(src.fetch(1).unwrap().is_some());
        assert!(src.fetch(2).unwrap().is_none());
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o444)).unwrap();
        assert!(matches!(src.fetch(1), Err(KeyError::Permissions(_))));
        let env = KeySource::InsecureDevEnv([(1, "ef".repeat(32))].into_iter().collect());
        assert!(env.fetch(1).unwrap().is_some());
        assert_eq!(env.destroy(1).unwrap(), Destroyed::OperatorMustRemove);
    }
}
