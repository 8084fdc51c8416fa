//! Connecting: a libpq-style `postgres://` / `postgresql://` URL, TLS with
//! rustls, and a pool of connections (deadpool-postgres).
//!
//! The URL takes tokio-postgres's options (user, password, dbname, host
//! (several, comma-separated), port, sslmode, target_session_attrs,
//! connect_timeout, keepalives, application_name, ...) and two of libpq's
//! that tokio-postgres lacks:
//!
//! - `sslrootcert=PATH`: the CA certificates (PEM) the server's certificate
//!   must chain to, instead of the system's roots;
//! - `sslmode=verify-full` and `verify-ca`, both meaning `require` here:
//!   rustls always checks the certificate chain and the host name.
//!
//! and one of carevault's own: `pool_max_conns=N` (1-1024, default 16, the
//! name pgx's pool uses), the most connections one process opens.
//!
//! `sslmode=prefer` (tokio-postgres's default) uses TLS where the server
//! offers it, and then the certificate must verify; `require` refuses a
//! server without TLS; `disable` never uses it.

use std::str::FromStr;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};

use crate::storage::StorageError;

/// Most connections one process opens by default (reads share them; the
/// commit pipeline takes one per batch); `pool_max_conns` changes it.
pub const POOL_SIZE: usize = 16;

/// A store URL split into what tokio-postgres parses and what carevault does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedUrl {
    /// The URL without carevault's own options.
    pub url: String,
    /// `sslrootcert`, if given.
    pub root_cert: Option<std::path::PathBuf>,
    /// `pool_max_conns` (default [`POOL_SIZE`]).
    pub pool_size: usize,
}

/// Whether `s` is a PostgreSQL URL.
pub fn is_postgres_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// Takes carevault's options out of the query string (and maps libpq's
/// verify modes), leaving the rest for tokio-postgres.
pub fn parse_url(url: &str) -> Result<ParsedUrl, StorageError> {
    if !is_postgres_url(url) {
        return Err(StorageError::BadLocation("a PostgreSQL store is a postgres:// or postgresql:// URL".into()));
    }
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut kept = Vec::new();
    let mut root_cert = None;
    let mut pool_size = POOL_SIZE;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "sslrootcert" => root_cert = Some(std::path::PathBuf::from(v)),
            "pool_max_conns" => {
                pool_size = v.parse().ok().filter(|n| (1..=1024).contains(n)).ok_or_else(|| {
                    StorageError::BadLocation(format!("pool_max_conns={v:?}: must be a number from 1 to 1024"))
                })?;
            }
            "sslmode" if v == "verify-full" || v == "verify-ca" => kept.push("sslmode=require".to_string()),
            _ => kept.push(pair.to_string()),
        }
    }
    let url = if kept.is_empty() { base.to_string() } else { format!("{base}?{}", kept.join("&")) };
    Ok(ParsedUrl { url, root_cert, pool_size })
}

/// The URL with any password replaced, for messages and logs.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let (authority, tail) = rest.split_once('/').map_or((rest, None), |(a, t)| (a, Some(t)));
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{hosts}"),
            None => format!("{userinfo}@{hosts}"),
        },
        None => authority.to_string(),
    };
    let mut out = format!("{scheme}://{authority}");
    if let Some(t) = tail {
        let t = t
            .split('&')
            .map(|p| if p.starts_with("password=") || p.contains("?password=") { redact_param(p) } else { p.into() })
            .collect::<Vec<_>>()
            .join("&");
        out.push('/');
        out.push_str(&t);
    }
    out
}

fn redact_param(p: &str) -> String {
    match p.split_once("password=") {
        Some((before, _)) => format!("{before}password=***"),
        None => p.to_string(),
    }
}

fn tls_config(root_cert: Option<&std::path::Path>) -> Result<rustls::ClientConfig, StorageError> {
    let mut roots = rustls::RootCertStore::empty();
    match root_cert {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| StorageError::BadLocation(format!("sslrootcert {}: {e}", path.display())))?;
            let mut n = 0;
            for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
                let cert: rustls::pki_types::CertificateDer<'static> =
                    cert.map_err(|e| StorageError::BadLocation(format!("sslrootcert {}: {e}", path.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| StorageError::BadLocation(format!("sslrootcert {}: {e}", path.display())))?;
                n += 1;
            }
            if n == 0 {
                return Err(StorageError::BadLocation(format!("sslrootcert {}: no certificate in it", path.display())));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                // A system certificate rustls cannot use is skipped, as libpq would.
                let _ = roots.add(cert);
            }
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StorageError::BadLocation(format!("tls: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A pool of connections to `url` (none is opened until one is needed);
/// with `read_only`, every transaction on them is read only.
pub fn pool(url: &str, read_only: bool) -> Result<Pool, StorageError> {
    let parsed = parse_url(url)?;
    let mut config = tokio_postgres::Config::from_str(&parsed.url)
        .map_err(|e| StorageError::BadLocation(format!("{}: {e}", redacted(url))))?;
    if config.get_application_name().is_none() {
        config.application_name("carevault");
    }
    if read_only {
        let options = config.get_options().map(|o| format!("{o} ")).unwrap_or_default();
        config.options(format!("{options}-c default_transaction_read_only=on"));
    }
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls_config(parsed.root_cert.as_deref())?);
    let manager = Manager::from_config(config, tls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    Pool::builder(manager)
        .max_size(parsed.pool_size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| StorageError::Io(format!("postgresql connection pool: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carevaults_options_are_taken_out_and_verify_modes_mean_require() {
        let p =
            parse_url("postgres://u@h1,h2/db?sslmode=verify-full&sslrootcert=/ca.pem&target_session_attrs=read-write")
                .unwrap();
        assert_eq!(p.url, "postgres://u@h1,h2/db?sslmode=require&target_session_attrs=read-write");
        assert_eq!(p.root_cert.as_deref(), Some(std::path::Path::new("/ca.pem")));
        assert_eq!(p.pool_size, POOL_SIZE);
        let sized = parse_url("postgres://h/db?pool_max_conns=4&application_name=x").unwrap();
        assert_eq!((sized.url.as_str(), sized.pool_size), ("postgres://h/db?application_name=x", 4));
        for bad in ["0", "1025", "many", ""] {
            let e = parse_url(&format!("postgres://h/db?pool_max_conns={bad}")).unwrap_err().to_string();
            assert!(e.contains("pool_max_conns"), "{e}");
        }
        assert!(tokio_postgres::Config::from_str(&p.url).is_ok());
        assert_eq!(parse_url("postgresql://h/db").unwrap().url, "postgresql://h/db");
        assert!(parse_url("sled:/x").is_err());
    }

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(redacted("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redacted("postgres://h/db?user=u&password=secret"), "postgres://h/db?user=u&password=***");
        assert_eq!(redacted("postgres://u@h/db"), "postgres://u@h/db");
    }
}
