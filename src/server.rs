//! Opening the service (keys -> key check -> store -> sequencer) and running
//! the tonic server with health checking and reflection until shutdown.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::api::access::AccessService;
use crate::api::audit::AuditService;
use crate::api::coverage::CoverageService;
use crate::api::grpc::{MAX_HEADER_LIST_BYTES, Methods};
use crate::api::keys::KeyService;
use crate::api::patient::PatientService;
use crate::api::{Edge, GrpcService};
use crate::app::{AccessControl, App, KeyManager};
use crate::auth::Authenticator;
use crate::auth::limits::Limits;
use crate::auth::policy::{Policy, PolicyError};
use crate::auth::tls::TlsError;
use crate::clock::Clock;
use crate::config::{ConfigError, ServiceConfig};
use crate::keystore::{self, KeyError, KeyPaths, KeySource};
use crate::storage::{self, FailSyncs, OpenStore, Pipeline, Sequencer, StorageError};

/// The encoded FileDescriptorSet of proto/, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/carevault_descriptor.bin"));

/// The names of carevault's own services, as health checking reports them.
pub const SERVICE_NAMES: [&str; 5] =
    [PatientService::NAME, CoverageService::NAME, AuditService::NAME, AccessService::NAME, KeyService::NAME];

/// Why the service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Key files or key check.
    #[error(transparent)]
    Keys(#[from] KeyError),
    /// The database.
    #[error("database: {0}")]
    Storage(#[from] StorageError),
    /// Networking.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Reflection set-up.
    #[error("reflection: {0}")]
    Reflection(String),
    /// Settings that do not fit together.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The policy file.
    #[error("{path}: {source}")]
    Policy {
        /// The file ("embedded default" for the built-in one).
        path: String,
        /// What is wrong, with its line.
        source: PolicyError,
    },
    /// TLS files.
    #[error("tls: {0}")]
    Tls(#[from] TlsError),
}

/// Test hooks and injected dependencies for [`open`].
pub struct OpenOptions {
    /// Time source.
    pub clock: Arc<dyn Clock>,
    /// Fault injection for fail-closed tests (inert without the `testing` feature).
    pub fail_syncs: FailSyncs,
}

impl OpenOptions {
    /// The options of a real server: the system clock, no injected faults.
    pub fn system() -> OpenOptions {
        OpenOptions { clock: Arc::new(crate::clock::SystemClock), fail_syncs: FailSyncs::never() }
    }
}

/// An opened service, ready to serve.
pub struct Service {
    /// The gRPC edge.
    pub edge: Edge,
    /// The sequencer (head, sync counts).
    pub sequencer: Sequencer,
    tls: Option<tonic::transport::ServerTlsConfig>,
    pipeline: Pipeline,
}

impl Service {
    /// Stops background jobs and the sequencer (after a final sync) without
    /// serving: for offline commands that used the app directly.
    pub async fn close(self) {
        self.edge.app().stop_jobs();
        let Service { edge, sequencer, pipeline, .. } = self;
        let _only_after_jobs = edge.app().wait_jobs().await;
        drop(edge);
        drop(sequencer);
        pipeline.join().await;
    }
}

/// Reads and validates the policy: the file if configured, else the embedded default.
pub fn load_policy(file: Option<&std::path::Path>) -> Result<Policy, ServerError> {
    match file {
        None => Policy::default_policy()
            .map_err(|source| ServerError::Policy { path: "embedded default policy".into(), source }),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| ServerError::Policy {
                path: path.display().to_string(),
                source: PolicyError { line: 0, message: format!("cannot read: {e}") },
            })?;
            Policy::from_toml(&text).map_err(|source| ServerError::Policy { path: path.display().to_string(), source })
        }
    }
}

/// What the configuration names, read and checked without creating or
/// changing anything: the policy and the TLS files.
pub struct Loaded {
    policy: Policy,
    tls: Option<tonic::transport::ServerTlsConfig>,
}

/// Checks the configuration and reads the policy and TLS files.
pub fn load(config: &ServiceConfig) -> Result<Loaded, ServerError> {
    config.validate()?;
    let policy = load_policy(config.policy_file.as_deref())?;
    let tls = config.tls.as_ref().map(|t| t.load()).transpose()?;
    Ok(Loaded { policy, tls })
}

/// Opens keys, checks them against the data directory, opens the store and
/// starts the sequencer. A wrong key fails here, before the store is opened.
pub async fn open(config: &ServiceConfig, options: OpenOptions) -> Result<Service, ServerError> {
    open_loaded(config, load(config)?, options).await
}

/// [`open`] with the configuration already [`load`]ed.
pub async fn open_loaded(config: &ServiceConfig, loaded: Loaded, options: OpenOptions) -> Result<Service, ServerError> {
    let Loaded { policy, tls } = loaded;
    let key_paths = KeyPaths { dir: config.key_dir.clone() };
    let source = config.key_source.clone().unwrap_or_else(|| KeySource::Files(key_paths.clone()));
    let has_data = config.store.has_data().await?;
    let local = keystore::open_for_store(&source, &config.data_dir, has_data, config.store.writes_on_open())?;
    let issuer_path = config.issuer_public_key.clone().unwrap_or_else(|| key_paths.issuer_public());
    let issuer = keystore::parse_ed25519_public_pem(&issuer_path)?;
    let (store, pipeline) = storage::open(OpenStore {
        location: &config.store,
        cache_bytes: config.cache_bytes,
        clock: options.clock.clone(),
        fail_syncs: options.fail_syncs,
    })
    .await?;
    let sequencer = store.sequencer().clone();
    let access = AccessControl {
        policy,
        limits: Limits::new(config.limits),
        break_glass_micros: i64::try_from(config.break_glass_secs.saturating_mul(1_000_000)).unwrap_or(i64::MAX),
    };
    let keys = KeyManager::load(&store, source, config.data_dir.clone(), local).await?.with_key_cache(config.key_cache);
    let app = App::new(store, keys, options.clock.clone(), access).with_checkpoint_policy(config.checkpoints.clone());
    let auth = Authenticator::new(issuer, &config.tokens);
    let edge = Edge::new(app, Arc::new(auth), options.clock);
    Ok(Service { edge, sequencer, tls, pipeline })
}

/// How often health probes the store.
const STORE_PROBE: std::time::Duration = std::time::Duration::from_secs(1);

/// Reads the chain head every [`STORE_PROBE`] (bounded by the same time) and
/// reports every service NOT_SERVING while that fails, SERVING again once it
/// succeeds (unless the store failed for good: that stays NOT_SERVING).
async fn probe_store(
    app: crate::app::App,
    reporter: tonic_health::server::HealthReporter,
    failed: tokio::sync::watch::Receiver<bool>,
) {
    let mut serving = true;
    loop {
        if !app.sleep_unless_stopped(STORE_PROBE).await || *failed.borrow() {
            return;
        }
        let ok = matches!(tokio::time::timeout(STORE_PROBE, app.store().audit_head()).await, Ok(Ok(_)));
        if ok == serving {
            continue;
        }
        serving = ok;
        let status = if ok { tonic_health::ServingStatus::Serving } else { tonic_health::ServingStatus::NotServing };
        if ok {
            tracing::info!("the store is reachable again: serving");
        } else {
            tracing::error!("the store is unreachable: health reports NOT_SERVING until it is back");
        }
        for name in SERVICE_NAMES.into_iter().chain([""]) {
            reporter.set_service_status(name, status).await;
        }
    }
}

/// Serves on `listener` until `shutdown` completes, then finishes in-flight
/// requests, stops the sequencer after a final sync, and returns.
pub async fn run(
    listener: TcpListener,
    service: Service,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    run_with(listener, service, |routes| routes, shutdown).await
}

/// [`run`], with services `extend` adds beside carevault's on the same
/// server (`carevault bench` adds its echo floor this way; `serve` adds none).
pub async fn run_with(
    listener: TcpListener,
    service: Service,
    extend: impl FnOnce(tonic::service::Routes) -> tonic::service::Routes,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    for name in SERVICE_NAMES {
        health_reporter.set_service_status(name, tonic_health::ServingStatus::Serving).await;
    }
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;
    let Service { edge, sequencer, tls, pipeline } = service;
    // A failed write or sync stops every commit until a restart: say so.
    let mut failed = sequencer.failed();
    let reporter = health_reporter.clone();
    tokio::spawn(async move {
        while failed.changed().await.is_ok() {
            if *failed.borrow() {
                for name in SERVICE_NAMES.into_iter().chain([""]) {
                    reporter.set_service_status(name, tonic_health::ServingStatus::NotServing).await;
                }
                tracing::error!("the store failed: every call is refused until the server is restarted");
                return;
            }
        }
    });
    // An unreachable database (PostgreSQL down, a network partition) fails
    // every call closed; health says so while it lasts.
    tokio::spawn(probe_store(edge.app().clone(), health_reporter.clone(), sequencer.failed()));
    // A rewrap job interrupted by a stop or a crash continues now.
    edge.app().resume_jobs();
    edge.app().watch_jobs();
    // The log key exists before the first call is served, so the chain's
    // first entries are the same on every start.
    match edge.app().ensure_log_key().await {
        Ok(()) => edge.app().watch_checkpoints(),
        Err(e) => tracing::error!(error = %e, "cannot create the audit log key: no checkpoints are signed"),
    }
    // Every request's metadata up to this size reaches carevault, so an
    // over-long token is refused (and audited) by carevault, not by HTTP/2.
    let mut builder = tonic::transport::Server::builder().http2_max_header_list_size(MAX_HEADER_LIST_BYTES);
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let routes = tonic::service::Routes::new(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(GrpcService::<PatientService>::new(edge.clone()))
        .add_service(GrpcService::<CoverageService>::new(edge.clone()))
        .add_service(GrpcService::<AuditService>::new(edge.clone()))
        .add_service(GrpcService::<AccessService>::new(edge.clone()))
        .add_service(GrpcService::<KeyService>::new(edge.clone()));
    let result = builder
        .add_routes(extend(routes))
        // TCP_NODELAY: without it, Nagle's algorithm and delayed ACKs add ~40 ms to replies
        // written in more than one segment.
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await;
    edge.app().stop_jobs();
    drop(edge);
    drop(sequencer);
    drop(health_reporter);
    // The pipeline stops (after a final sync) once every handle is gone.
    pipeline.join().await;
    result.map_err(ServerError::from)
}
