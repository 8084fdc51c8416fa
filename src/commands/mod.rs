//! Command implementations (binary edge: errors are `anyhow`).

pub mod bench;
pub mod certs;
pub mod client;
pub mod serve;
pub mod token;
pub mod verify;

use std::path::PathBuf;

use anyhow::Context;
use carevault::auth::tls::ClientTls;
use carevault::cli::{DirArgs, TlsClientArgs};
use carevault::config::{default_data_dir, default_key_dir};
use tonic::transport::Channel;

/// Data and key directories with defaults applied.
pub fn dirs(args: &DirArgs) -> (PathBuf, PathBuf) {
    (args.data_dir.clone().unwrap_or_else(default_data_dir), args.key_dir.clone().unwrap_or_else(default_key_dir))
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
    endpoint.connect().await.with_context(|| format!("cannot connect to {url}"))
}
