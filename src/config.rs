//! Typed configuration, resolved once at start-up from flags and environment
//! (clap fills it; see `cli.rs`).

use std::net::SocketAddr;
use std::path::PathBuf;

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Where sled and keycheck.json live.
    pub data_dir: PathBuf,
    /// Where the master keys (and the dev issuer key) live.
    pub key_dir: PathBuf,
    /// Listen address.
    pub listen: SocketAddr,
    /// Token issuer public key (PEM); defaults to the dev issuer's in the key dir.
    pub issuer_public_key: Option<PathBuf>,
    /// Longest token lifetime accepted, seconds.
    pub max_token_lifetime_secs: u64,
    /// Clock skew allowed on exp/nbf, seconds.
    pub clock_skew_secs: u64,
    /// sled page cache size, bytes.
    pub cache_bytes: u64,
}

/// The default data directory: `$XDG_DATA_HOME/carevault` or `~/.local/share/carevault`.
pub fn default_data_dir() -> PathBuf {
    dirs::data_dir().unwrap_or_else(|| PathBuf::from(".")).join("carevault")
}

/// The default key directory: `$XDG_CONFIG_HOME/carevault/keys` or `~/.config/carevault/keys`.
pub fn default_key_dir() -> PathBuf {
    dirs::config_dir().unwrap_or_else(|| PathBuf::from(".")).join("carevault").join("keys")
}
