//! Typed configuration, resolved once at start-up from flags and environment
//! (clap fills it; see `cli.rs`).

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::auth::TokenRules;
use crate::auth::limits::LimitSettings;
use crate::auth::tls::ServerTls;
use crate::keystore::KeySource;

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Where keycheck.json and erasure-keys live (and sled, by default).
    pub data_dir: PathBuf,
    /// The store: sled under the data directory unless `--store` says otherwise.
    pub store: crate::storage::Location,
    /// Where the master keys (and the dev issuer key) live.
    pub key_dir: PathBuf,
    /// Where master keys come from; `None`: key files in `key_dir`.
    pub key_source: Option<KeySource>,
    /// Listen address.
    pub listen: SocketAddr,
    /// Token issuer public key (PEM); defaults to the dev issuer's in the key dir.
    pub issuer_public_key: Option<PathBuf>,
    /// Issuer, audience, lifetime and skew rules for bearer tokens.
    pub tokens: TokenRules,
    /// sled page cache size, bytes.
    pub cache_bytes: u64,
    /// How many unwrapped data keys to keep in memory (0: none; see `crypto::key_cache`).
    pub key_cache: usize,
    /// TLS (and mutual TLS); `None` serves plaintext.
    pub tls: Option<ServerTls>,
    /// Allow plaintext on a non-loopback address (`--insecure-plaintext`).
    pub insecure_plaintext: bool,
    /// Access policy file (TOML); `None` uses the embedded default policy.
    pub policy_file: Option<PathBuf>,
    /// Rate and concurrency limits.
    pub limits: LimitSettings,
    /// How long a break-glass grant lasts, seconds.
    pub break_glass_secs: u64,
    /// When the audit log's checkpoints are signed, and the log's origin.
    pub checkpoints: crate::app::checkpoints::CheckpointPolicy,
}

/// Why a configuration is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Plaintext on a non-loopback address without the explicit flag.
    #[error(
        "refusing to serve plaintext on non-loopback address {0}: configure --tls-cert/--tls-key, or pass --insecure-plaintext if something else encrypts the traffic"
    )]
    PlaintextOnNetwork(SocketAddr),
    /// A log origin that cannot name a log.
    #[error("--log-origin must be 1 to 255 characters without whitespace or '+' (e.g. carevault.clinic.example/audit)")]
    BadOrigin,
}

impl ServiceConfig {
    /// A configuration over these directories with the defaults `serve` uses:
    /// key files, 127.0.0.1:0, the dev issuer and audience, one-hour tokens
    /// with 30 s skew, a 256 MiB cache, 16,384 cached data keys, plaintext on loopback, the embedded
    /// policy, default limits, one-hour break-glass grants.
    pub fn new(data_dir: PathBuf, key_dir: PathBuf) -> ServiceConfig {
        ServiceConfig {
            store: crate::storage::Location::default_for(&data_dir),
            data_dir,
            key_dir,
            key_source: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            issuer_public_key: None,
            tokens: TokenRules {
                max_lifetime_secs: 3600,
                leeway_secs: 30,
                issuer: crate::auth::token::DEFAULT_ISSUER.into(),
                audience: crate::auth::token::DEFAULT_AUDIENCE.into(),
            },
            cache_bytes: 256 << 20,
            key_cache: crate::app::DEFAULT_KEY_CACHE,
            tls: None,
            insecure_plaintext: false,
            policy_file: None,
            limits: LimitSettings::default(),
            break_glass_secs: 3600,
            checkpoints: crate::app::checkpoints::CheckpointPolicy::default(),
        }
    }

    /// Checks rules that span several settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.tls.is_none() && !self.listen.ip().is_loopback() && !self.insecure_plaintext {
            return Err(ConfigError::PlaintextOnNetwork(self.listen));
        }
        if self.checkpoints.origin.as_deref().is_some_and(|o| !crate::app::checkpoints::valid_origin(o)) {
            return Err(ConfigError::BadOrigin);
        }
        Ok(())
    }
}

/// The default data directory: `$XDG_DATA_HOME/carevault` or `~/.local/share/carevault`.
pub fn default_data_dir() -> PathBuf {
    dirs::data_dir().unwrap_or_else(|| PathBuf::from(".")).join("carevault")
}

/// The default key directory: `$XDG_CONFIG_HOME/carevault/keys` or `~/.config/carevault/keys`.
pub fn default_key_dir() -> PathBuf {
    dirs::config_dir().unwrap_or_else(|| PathBuf::from(".")).join("carevault").join("keys")
}
