//! Command implementations (binary edge: errors are `anyhow`).

pub mod backup;
pub mod bench;
pub mod certs;
pub mod client;
pub mod echo;
pub mod keys;
pub mod output;
pub mod proof;
pub mod serve;
pub mod token;
pub mod verify;
pub mod witness;

use std::path::PathBuf;

use anyhow::Context;
use carevault::auth::tls::ClientTls;
use carevault::cli::{DirArgs, KeyCustodyArgs, TlsClientArgs};
use carevault::config::{default_data_dir, default_key_dir};
use carevault::keystore::{KeyPaths, KeySource};
use tonic::transport::Channel;

/// Data and key directories with defaults applied.
pub fn dirs(args: &DirArgs) -> (PathBuf, PathBuf) {
    (args.data_dir.clone().unwrap_or_else(default_data_dir), args.key_dir.clone().unwrap_or_else(default_key_dir))
}

/// The store `--store` names (default: sled under `data_dir`).
pub fn store(store: Option<&str>, data_dir: &std::path::Path) -> anyhow::Result<carevault::storage::Location> {
    match store {
        None => Ok(carevault::storage::Location::default_for(data_dir)),
        Some(s) => Ok(carevault::storage::Location::parse(s, data_dir)?),
    }
}

/// Connects to `url` (http:// or https://), with TLS settings from the flags.
pub async fn connect(url: &str, tls: &TlsClientArgs) -> anyhow::Result<Channel> {
    let mut endpoint = Channel::from_shared(url.to_string()).with_context(|| format!("bad server URL {url}"))?;
    let wants_tls = url.starts_with("https://") || tls.tls_ca.is_some() || tls.tls_client_cert.is_some();
    if wants_tls {
        if url.starts_with("http://") {
            anyhow::bail!("TLS options given but the URL is http://; use https://");
        }
        let config = ClientTls {
            ca: tls.tls_ca.clone(),
            identity: tls.tls_client_cert.clone().zip(tls.tls_client_key.clone()),
            domain: tls.tls_domain.clone(),
        }
        .load()?;
        endpoint = endpoint.tls_config(config).context("TLS configuration")?;
    }
    endpoint.connect().await.map_err(|e| {
        let hint = connect_hint(&anyhow::Error::new(e));
        anyhow::anyhow!("cannot connect to {url}: {hint}")
    })
}

/// The cause of a failed connection, and what to do about it.
fn connect_hint(e: &anyhow::Error) -> String {
    let text: String = e.chain().map(ToString::to_string).collect::<Vec<_>>().join(": ");
    let what = if text.contains("UnknownIssuer") || text.contains("BadSignature") {
        "the server's certificate is not signed by a CA this client trusts: pass the CA that issued it with --tls-ca (for `carevault certs dev`, its ca.pem)"
    } else if text.contains("NotValidForName") {
        "the server's certificate does not name this host: connect with a name it was issued for, or pass --tls-domain"
    } else if text.contains("InvalidContentType") || text.contains("corrupt message") {
        "the server does not speak TLS on this port: use an http:// URL, or start the server with --tls-cert and --tls-key"
    } else if text.contains("Connection refused") || text.contains("ConnectionRefused") {
        "nothing is listening there: is the server running, and on this address?"
    } else {
        return text;
    };
    format!("{what} ({})", e.chain().last().map(ToString::to_string).unwrap_or_default())
}

/// The master key source the flags ask for; reads the process environment
/// (CREDENTIALS_DIRECTORY, CAREVAULT_MASTER_KEY_<N>) here, at the binary's edge.
pub fn key_source(args: &KeyCustodyArgs, key_dir: &std::path::Path) -> anyhow::Result<KeySource> {
    if let Some(cmd) = &args.master_key_command {
        return Ok(KeySource::Command(cmd.clone()));
    }
    if args.master_key_credentials {
        let dir = std::env::var_os("CREDENTIALS_DIRECTORY")
            .context("--master-key-credentials needs $CREDENTIALS_DIRECTORY (set by systemd LoadCredential=)")?;
        return Ok(KeySource::Credentials(dir.into()));
    }
    if args.insecure_dev_env_keys {
        let mut vars = std::collections::BTreeMap::new();
        for (name, value) in std::env::vars() {
            if let Some(v) = name.strip_prefix("CAREVAULT_MASTER_KEY_").and_then(|v| v.parse::<u32>().ok()) {
                vars.insert(v, value);
            }
        }
        tracing::warn!("master keys from environment variables: development only");
        return Ok(KeySource::InsecureDevEnv(vars));
    }
    Ok(KeySource::Files(KeyPaths { dir: key_dir.to_path_buf() }))
}
