//! `carevault serve` and `carevault init`.

use anyhow::Context;
use carevault::auth::TokenRules;
use carevault::auth::limits::LimitSettings;
use carevault::auth::tls::{ClientAuth, ServerTls};
use carevault::cli::{DirArgs, KeyCustodyArgs, ServeArgs};
use carevault::config::ServiceConfig;
use carevault::keystore::{self, KeyPaths, KeySource};
use carevault::server::{self, OpenOptions};
use carevault::storage::Location;

/// Creates the key and data directories and the first keys when they do not
/// exist yet (and the store holds nothing yet).
async fn provision(
    data_dir: &std::path::Path,
    key_dir: &std::path::Path,
    source: &KeySource,
    store: &Location,
) -> anyhow::Result<()> {
    let has_data = store.has_data().await.with_context(|| format!("store {}", store.describe()))?;
    let fresh_data = !data_dir.join("keycheck.json").exists() && !has_data;
    let key_paths = KeyPaths { dir: key_dir.to_path_buf() };
    let files = matches!(source, KeySource::Files(_));
    if fresh_data && files {
        if keystore::ensure_keys(&key_paths)? {
            eprintln!("created keys in {} (keep this directory secret and backed up separately)", key_dir.display());
        }
    } else {
        keystore::ensure_issuer(&key_paths)?;
        if files && keystore::master_versions(&key_paths)?.is_empty() {
            anyhow::bail!(keystore::KeyError::NoMasterKey(key_dir.to_path_buf()));
        }
    }
    keystore::open_for_store(source, data_dir, has_data, store.writes_on_open())?;
    Ok(())
}

fn print_welcome(data_dir: &std::path::Path, key_dir: &std::path::Path, store: &Location) {
    eprintln!("data directory: {}", data_dir.display());
    if *store != Location::default_for(data_dir) {
        eprintln!("store:          {}", store.describe());
    }
    eprintln!("key directory:  {}", key_dir.display());
    eprintln!(
        "mint a dev token: carevault token issue --key-dir {} --sub you@example.org --role front_desk (PHI calls also need x-purpose-of-use, e.g. client --purpose TREAT)",
        key_dir.display()
    );
}

/// Creates directories and keys (and, on PostgreSQL, the schema and the
/// chain's genesis entry), then exits.
pub async fn init(dirs: DirArgs) -> anyhow::Result<()> {
    let (data_dir, key_dir) = super::dirs(&dirs);
    let store = super::store(dirs.store.as_deref(), &data_dir)?;
    let source = super::key_source(&KeyCustodyArgs::default(), &key_dir)?;
    provision(&data_dir, &key_dir, &source, &store).await?;
    if let Location::Postgres(_) = store {
        let config = ServiceConfig { store: store.clone(), ..ServiceConfig::new(data_dir.clone(), key_dir.clone()) };
        let service = server::open(&config, OpenOptions::system()).await?;
        service.close().await;
    }
    print_welcome(&data_dir, &key_dir, &store);
    Ok(())
}

/// Runs the service until SIGINT or SIGTERM. Nothing is created on disk
/// before the port is bound.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let (data_dir, key_dir) = super::dirs(&args.dirs);
    let source = super::key_source(&args.custody, &key_dir)?;
    let store = super::store(args.dirs.store.as_deref(), &data_dir)?;
    let config = ServiceConfig {
        store: store.clone(),
        data_dir: data_dir.clone(),
        key_dir: key_dir.clone(),
        key_source: Some(source.clone()),
        listen: args.listen,
        issuer_public_key: args.issuer_public_key,
        tokens: TokenRules {
            max_lifetime_secs: args.max_token_lifetime.as_secs(),
            leeway_secs: args.clock_skew.as_secs(),
            issuer: args.token_issuer,
            audience: args.token_audience,
        },
        cache_bytes: args.cache_mb.saturating_mul(1024 * 1024),
        key_cache: args.key_cache,
        tls: args.tls_cert.zip(args.tls_key).map(|(cert, key)| ServerTls {
            cert,
            key,
            client_ca: args.tls_client_ca,
            client_auth: if args.require_client_cert { ClientAuth::Required } else { ClientAuth::Optional },
        }),
        insecure_plaintext: args.insecure_plaintext,
        policy_file: args.policy,
        limits: LimitSettings {
            per_principal_per_sec: args.rate_limit,
            burst: args.rate_burst,
            max_concurrent: args.max_concurrent,
        },
        break_glass_secs: args.break_glass_ttl.as_secs(),
        checkpoints: carevault::app::checkpoints::CheckpointPolicy {
            origin: args.log_origin,
            every_entries: args.checkpoint_every,
            interval: args.checkpoint_interval,
        },
    };
    let loaded = server::load(&config)?;
    let listener = tokio::net::TcpListener::bind(config.listen).await.with_context(|| {
        format!("cannot listen on {} (is another server using it? choose another with --listen)", config.listen)
    })?;
    provision(&data_dir, &key_dir, &source, &store).await?;
    let service = server::open_loaded(&config, loaded, OpenOptions::system()).await?;
    print_welcome(&data_dir, &key_dir, &store);
    tracing::info!(addr = %listener.local_addr()?, tls = config.tls.is_some(), "carevault listening");
    server::run(listener, service, shutdown_signal()).await?;
    tracing::info!("carevault stopped cleanly");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown requested; finishing in-flight requests");
}
