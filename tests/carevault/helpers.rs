//! Test harness: a real server on 127.0.0.1:0 over temporary directories.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use carevault::auth::limits::LimitSettings;
use carevault::auth::tls::{ClientAuth, ClientTls, ServerTls, dev_files, write_dev_certs};
use carevault::auth::token::{self, TokenSpec};
use carevault::clock::{Clock, SystemClock};
use carevault::config::ServiceConfig;
use carevault::keystore::{self, KeyPaths};
use carevault::proto::v1 as pb;
use carevault::proto::v1::access_service_client::AccessServiceClient;
use carevault::proto::v1::audit_service_client::AuditServiceClient;
use carevault::proto::v1::coverage_service_client::CoverageServiceClient;
use carevault::proto::v1::patient_service_client::PatientServiceClient;
use carevault::server::{self, OpenOptions};
use tonic::transport::Channel;

/// Token roles claims the test policy maps to narrow test roles (named like
/// the permission each grants; no purpose required). Space-separated.
pub const ALL_SCOPES: &str = "patients.read patients.write coverage.read coverage.write audit.read";

/// The policy in-process test servers run with: the embedded default's
/// mappings to built-in roles, plus narrow test roles.
pub const TEST_POLICY: &str = r#"
[roles.t_patients_read]
permissions = ["patients.read", "fields.identity", "fields.contact", "fields.ssn"]
require_purpose = false

[roles.t_patients_write]
permissions = ["patients.write", "fields.identity", "fields.contact", "fields.ssn"]
require_purpose = false

[roles.t_coverage_read]
permissions = ["coverage.read"]
require_purpose = false

[roles.t_coverage_write]
permissions = ["coverage.write"]
require_purpose = false

[roles.t_audit_read]
permissions = ["audit.read"]

# A care team cleared for restricted (confidential) patients.
[roles.vip_care]
permissions = ["patients.read", "coverage.read", "restricted.access", "fields.identity", "fields.contact"]
purposes = ["TREAT"]

[[principals]]
token_role = "vip_care"
roles = ["vip_care"]

[[principals]]
token_role = "patients.read"
roles = ["t_patients_read"]

[[principals]]
token_role = "patients.write"
roles = ["t_patients_write"]

[[principals]]
token_role = "coverage.read"
roles = ["t_coverage_read"]

[[principals]]
token_role = "coverage.write"
roles = ["t_coverage_write"]

[[principals]]
token_role = "audit.read"
roles = ["t_audit_read"]

[[principals]]
token_role = "front_desk"
roles = ["front_desk"]

[[principals]]
token_role = "clinician"
roles = ["clinician"]

[[principals]]
token_role = "billing"
roles = ["billing"]

[[principals]]
token_role = "compliance"
roles = ["compliance"]

[[principals]]
token_role = "key_admin"
roles = ["key_admin"]
"#;

pub struct TestServer {
    pub addr: SocketAddr,
    pub channel: Channel,
    pub data_dir: PathBuf,
    pub key_dir: PathBuf,
    pub fail_syncs: Arc<AtomicBool>,
    issuer_der: Vec<u8>,
    /// With TLS: the dev CA files (ca.pem, server.*, client.*), see `certs dev`.
    pub tls_dir: Option<PathBuf>,
    /// The server's clock; tokens are minted at its time.
    clock: Arc<dyn Clock>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<()>>,
    _tmp: Option<tempfile::TempDir>,
}

/// How a test server differs from the default.
pub struct Options {
    pub clock: Arc<dyn Clock>,
    /// Serve mutual TLS with certificates from `certs dev` (client cert required or optional).
    pub mtls: Option<ClientAuth>,
    pub limits: LimitSettings,
    pub break_glass_secs: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            clock: Arc::new(SystemClock),
            mtls: None,
            limits: LimitSettings { per_principal_per_sec: 0, burst: 0, max_concurrent: 4096 },
            break_glass_secs: 3600,
        }
    }
}

/// A TLS channel to `addr` trusting `ca`, presenting `identity` (cert, key) if given.
pub async fn tls_channel(
    addr: SocketAddr,
    ca: &std::path::Path,
    identity: Option<(PathBuf, PathBuf)>,
) -> Result<Channel, tonic::transport::Error> {
    let tls = ClientTls { ca: Some(ca.to_path_buf()), identity, domain: Some("localhost".into()) }.load().unwrap();
    Channel::from_shared(format!("https://localhost:{}", addr.port())).unwrap().tls_config(tls)?.connect().await
}

/// Runs `open` until sled's file lock is free. A database a test just
/// dropped keeps its lock until sled's background flusher thread notices, a
/// moment later (longer on a loaded machine).
pub async fn open_when_unlocked<T, E: std::fmt::Debug>(mut open: impl FnMut() -> Result<T, E>) -> T {
    for _ in 0..100 {
        match open() {
            Ok(v) => return v,
            Err(e) if format!("{e:?}").contains("Locked") || format!("{e:?}").contains("could not acquire lock") => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => panic!("open failed: {e:?}"),
        }
    }
    panic!("the database stayed locked for 10 s")
}

/// [`open_when_unlocked`] for `server::open`.
pub async fn open_service_when_unlocked(cfg: &ServiceConfig, options: impl Fn() -> OpenOptions) -> server::Service {
    for _ in 0..100 {
        match server::open(cfg, options()).await {
            Ok(v) => return v,
            Err(e) if format!("{e:?}").contains("Locked") || format!("{e:?}").contains("could not acquire lock") => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => panic!("open failed: {e:?}"),
        }
    }
    panic!("the database stayed locked for 10 s")
}

/// The engines the black-box suite runs on: each test binary says which
/// (`crate::ENGINE`): `tests/carevault` on sled, `tests/postgres` on PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// sled under the data directory.
    Sled,
    /// A database of its own on the test process's shared PostgreSQL cluster.
    Postgres,
}

/// The store a test server over `data_dir` uses: sled under it, or (on
/// PostgreSQL) a fresh database, remembered beside the data directory so a
/// restarted server finds the same one.
pub fn store_for(data_dir: &std::path::Path) -> carevault::storage::Location {
    match crate::ENGINE {
        Engine::Sled => carevault::storage::Location::default_for(data_dir),
        Engine::Postgres => {
            let parent = data_dir.parent().unwrap();
            std::fs::create_dir_all(parent).unwrap();
            let remembered = parent.join(format!("{}.store-url", data_dir.file_name().unwrap().to_string_lossy()));
            let url = match std::fs::read_to_string(&remembered) {
                Ok(url) => url,
                Err(_) => {
                    let cluster = crate::pg::shared().expect("PostgreSQL is needed for the PostgreSQL suite");
                    let url = cluster.fresh_database();
                    std::fs::write(&remembered, &url).unwrap();
                    url
                }
            };
            carevault::storage::Location::Postgres(url)
        }
    }
}

/// The stopped store of a test server over `data_dir`, opened for reading
/// through the engine-neutral reads (sled: its files; PostgreSQL: its database).
pub async fn stored(data_dir: &std::path::Path) -> Box<dyn carevault::storage::Backend> {
    match store_for(data_dir) {
        carevault::storage::Location::Sled(db) => {
            Box::new(open_when_unlocked(|| carevault::storage::sled::SledStore::open(&db, 8 << 20)).await)
        }
        carevault::storage::Location::Postgres(url) => {
            Box::new(carevault::storage::postgres::PgStore::open_existing(&url).await.unwrap())
        }
    }
}

/// A client on the PostgreSQL database at `url`, for tests that reach past carevault.
pub async fn sql(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

/// Overwrites a stored version's sealed bytes behind carevault's back (a
/// stopped server's store), as someone with write access to the store could.
pub async fn danger_put_record(
    data_dir: &std::path::Path,
    record: carevault::storage::RecordRef,
    version: u64,
    value: Vec<u8>,
) {
    match store_for(data_dir) {
        carevault::storage::Location::Sled(db) => {
            let store = open_when_unlocked(|| carevault::storage::sled::SledStore::open(&db, 8 << 20)).await;
            store.danger_put_record_raw(record, version, value).unwrap();
        }
        carevault::storage::Location::Postgres(url) => {
            let n = sql(&url)
                .await
                .execute(
                    "UPDATE record_versions SET sealed = $1 WHERE kind = $2 AND id = $3 AND version = $4",
                    &[&value, &i16::from(record.kind.tag()), &record.id.as_slice(), &i64::try_from(version).unwrap()],
                )
                .await
                .unwrap();
            assert_eq!(n, 1);
        }
    }
}

/// Overwrites a patient's wrapped data key behind carevault's back (a stopped server's store).
pub async fn danger_put_dek(data_dir: &std::path::Path, patient: [u8; 16], value: Vec<u8>) {
    match store_for(data_dir) {
        carevault::storage::Location::Sled(db) => {
            let store = open_when_unlocked(|| carevault::storage::sled::SledStore::open(&db, 8 << 20)).await;
            store.danger_put_dek_raw(&patient, value).unwrap();
        }
        carevault::storage::Location::Postgres(url) => {
            let n = sql(&url)
                .await
                .execute("UPDATE data_keys SET wrapped = $1 WHERE patient = $2", &[&value, &patient.as_slice()])
                .await
                .unwrap();
            assert_eq!(n, 1);
        }
    }
}

/// Every stored audit entry of `store`, in order.
pub async fn stored_entries(store: &dyn carevault::storage::Backend) -> Vec<carevault::storage::StoredAuditEntry> {
    let head = store.audit_head().await.unwrap().map_or(0, |h| h.0);
    let mut out: Vec<carevault::storage::StoredAuditEntry> = Vec::new();
    while out.len() as u64 <= head {
        let page = store.audit_entries(out.len() as u64, head, 10_000).await.unwrap();
        if page.is_empty() {
            break;
        }
        out.extend(page);
    }
    out
}

/// What a load was told succeeded: each patient's highest acknowledged
/// version, and the request ids of acknowledged reads.
#[derive(Default)]
pub struct Acked {
    /// patient id -> highest acknowledged version
    pub versions: std::collections::HashMap<String, u64>,
    /// request ids of acknowledged reads
    pub reads: std::collections::HashSet<String>,
}

/// Checks a stopped store against what was acknowledged: the chain
/// verifies, every acknowledged read has its ok entry, and every patient is
/// stored at its acknowledged version (`exactly`) or later. Returns the entries.
pub async fn check_acknowledged(
    store: &dyn carevault::storage::Backend,
    acked: &Acked,
    exactly: bool,
) -> Vec<carevault::audit::AuditEntry> {
    let raw: Vec<_> = stored_entries(store).await.into_iter().map(|e| e.raw()).collect();
    let report = carevault::audit::verify_chain(raw.clone(), None);
    assert!(report.is_ok(), "the chain: {report:?}");
    let entries: Vec<carevault::audit::AuditEntry> =
        raw.iter().map(|r| carevault::audit::AuditEntry::decode(&r.bytes).unwrap()).collect();
    let reads: std::collections::HashSet<&str> = entries
        .iter()
        .filter(|e| e.action == "patient.read" && e.outcome == "ok")
        .map(|e| e.request_id.as_str())
        .collect();
    for rid in &acked.reads {
        assert!(reads.contains(rid.as_str()), "acknowledged read {rid} has no audit entry");
    }
    for (id, version) in &acked.versions {
        let bytes = *uuid::Uuid::parse_str(id).unwrap().as_bytes();
        let head = store.head(carevault::storage::RecordRef::patient(bytes)).await.unwrap();
        let stored = head.map_or(0, |h| h.version);
        if exactly {
            assert_eq!(stored, *version, "{id} is at its acknowledged version");
        } else {
            assert!(stored >= *version, "acknowledged {id} v{version} lost (stored v{stored})");
        }
    }
    entries
}

/// The `--store` flag a CLI subprocess over `data_dir` needs ([`store_for`]).
pub fn store_args(data_dir: &std::path::Path) -> Vec<String> {
    match store_for(data_dir) {
        carevault::storage::Location::Sled(_) => Vec::new(),
        carevault::storage::Location::Postgres(url) => vec!["--store".into(), url],
    }
}

/// Calls `check` every 50 ms until it yields a value, for at most 30 s.
pub async fn eventually<T, F: std::future::Future<Output = Option<T>>>(mut check: impl FnMut() -> F) -> Option<T> {
    for _ in 0..600 {
        if let Some(v) = check().await {
            return Some(v);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    None
}

/// A test server configuration; writes [`TEST_POLICY`] beside the data directory.
pub fn config(data_dir: PathBuf, key_dir: PathBuf) -> ServiceConfig {
    let parent = data_dir.parent().unwrap().to_path_buf();
    std::fs::create_dir_all(&parent).unwrap();
    let policy = parent.join("test-policy.toml");
    std::fs::write(&policy, TEST_POLICY).unwrap();
    ServiceConfig {
        cache_bytes: 16 * 1024 * 1024,
        policy_file: Some(policy),
        limits: LimitSettings { per_principal_per_sec: 0, burst: 0, max_concurrent: 4096 },
        store: store_for(&data_dir),
        ..ServiceConfig::new(data_dir, key_dir)
    }
}

impl TestServer {
    pub async fn start() -> TestServer {
        let tmp = tempfile::tempdir().unwrap();
        let data_dir = tmp.path().join("data");
        let key_dir = tmp.path().join("keys");
        let mut s = TestServer::start_in(data_dir, key_dir, Arc::new(SystemClock)).await;
        s._tmp = Some(tmp);
        s
    }

    pub async fn start_with(options: Options) -> TestServer {
        let tmp = tempfile::tempdir().unwrap();
        let data_dir = tmp.path().join("data");
        let key_dir = tmp.path().join("keys");
        let mut s = TestServer::start_opts(data_dir, key_dir, options).await;
        s._tmp = Some(tmp);
        s
    }

    pub async fn start_in(data_dir: PathBuf, key_dir: PathBuf, clock: Arc<dyn Clock>) -> TestServer {
        TestServer::start_opts(data_dir, key_dir, Options { clock, ..Options::default() }).await
    }

    pub async fn start_opts(data_dir: PathBuf, key_dir: PathBuf, options: Options) -> TestServer {
        let paths = KeyPaths { dir: key_dir.clone() };
        keystore::ensure_keys(&paths).unwrap();
        let issuer_der = std::fs::read(paths.issuer_private()).unwrap();
        let fail_syncs = Arc::new(AtomicBool::new(false));
        let mut cfg = config(data_dir.clone(), key_dir.clone());
        cfg.limits = options.limits;
        cfg.break_glass_secs = options.break_glass_secs;
        let tls_dir = options.mtls.map(|mode| {
            let dir = data_dir.parent().unwrap().join("tls");
            if !dir.join(dev_files::CA_CERT).exists() {
                write_dev_certs(&dir).unwrap();
            }
            cfg.tls = Some(ServerTls {
                cert: dir.join(dev_files::SERVER_CERT),
                key: dir.join(dev_files::SERVER_KEY),
                client_ca: Some(dir.join(dev_files::CA_CERT)),
                client_auth: mode,
            });
            dir
        });
        let clock = options.clock.clone();
        let service = open_service_when_unlocked(&cfg, || OpenOptions {
            clock: options.clock.clone(),
            fail_syncs: carevault::storage::FailSyncs::danger_while(fail_syncs.clone()),
        })
        .await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            server::run(listener, service, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        let channel = match &tls_dir {
            None => Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap(),
            Some(dir) => tls_channel(
                addr,
                &dir.join(dev_files::CA_CERT),
                Some((dir.join(dev_files::CLIENT_CERT), dir.join(dev_files::CLIENT_KEY))),
            )
            .await
            .unwrap(),
        };
        TestServer {
            addr,
            channel,
            data_dir,
            key_dir,
            fail_syncs,
            issuer_der,
            tls_dir,
            clock,
            shutdown: Some(tx),
            handle: Some(handle),
            _tmp: None,
        }
    }

    /// Stops the server and waits until the database is closed.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.unwrap();
        }
    }

    /// Stops, then keeps the temporary directory alive in the returned guard.
    pub async fn stop_keep(mut self) -> (PathBuf, PathBuf, Option<tempfile::TempDir>) {
        self.stop().await;
        (self.data_dir.clone(), self.key_dir.clone(), self._tmp.take())
    }

    /// A token for `sub` whose roles claim is the space-separated `roles`.
    pub fn token(&self, sub: &str, roles: &str) -> String {
        let roles: Vec<&str> = roles.split_whitespace().collect();
        let now = self.clock.now_micros().div_euclid(1_000_000);
        token::issue(&self.issuer_der, &TokenSpec::new(sub, &roles), now).unwrap()
    }

    pub fn admin(&self) -> String {
        self.token("tester", ALL_SCOPES)
    }

    pub fn patients(&self) -> PatientServiceClient<Channel> {
        PatientServiceClient::new(self.channel.clone())
    }

    pub fn coverages(&self) -> CoverageServiceClient<Channel> {
        CoverageServiceClient::new(self.channel.clone())
    }

    pub fn audit(&self) -> AuditServiceClient<Channel> {
        AuditServiceClient::new(self.channel.clone())
    }

    pub fn access(&self) -> AccessServiceClient<Channel> {
        AccessServiceClient::new(self.channel.clone())
    }

    pub fn issuer_der(&self) -> &[u8] {
        &self.issuer_der
    }

    /// Every audit event, oldest first (itself audited, as the last entry).
    pub async fn all_events(&self) -> Vec<pb::AuditEvent> {
        let mut out = Vec::new();
        let mut page_token = String::new();
        loop {
            let r = self
                .audit()
                .list_audit_events(req(
                    pb::ListAuditEventsRequest { page_size: 1000, page_token, ..Default::default() },
                    &self.admin(),
                ))
                .await
                .unwrap()
                .into_inner();
            out.extend(r.events);
            if r.next_page_token.is_empty() {
                return out;
            }
            page_token = r.next_page_token;
        }
    }

    /// The newest audit event whose action is `action`.
    pub async fn last_event(&self, action: &str) -> pb::AuditEvent {
        self.all_events().await.into_iter().rev().find(|e| e.action == action).expect("an audit event for the action")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub fn now_secs() -> i64 {
    i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()).unwrap()
}

/// A 10-minute token signed by `issuer_der` with the space-separated roles claim.
pub fn mint(issuer_der: &[u8], sub: &str, roles: &str) -> String {
    let roles: Vec<&str> = roles.split_whitespace().collect();
    token::issue(issuer_der, &TokenSpec::new(sub, &roles), now_secs()).unwrap()
}

/// A request with a bearer token and purpose of use TREAT.
pub fn req<T>(msg: T, token: &str) -> tonic::Request<T> {
    req_for(msg, token, Some("TREAT"))
}

/// A request with a bearer token and the given purpose of use (or none).
pub fn req_for<T>(msg: T, token: &str, purpose: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    if let Some(p) = purpose {
        r.metadata_mut().insert("x-purpose-of-use", p.parse().unwrap());
    }
    r
}

pub fn name(family: &str, given: &str) -> pb::HumanName {
    pb::HumanName { family: family.into(), given: vec![given.into()], ..Default::default() }
}

/// A valid patient with distinctive values.
pub fn patient(family: &str, given: &str, birth_date: &str, mrn: &str) -> pb::Patient {
    pb::Patient {
        names: vec![pb::HumanName { r#use: pb::NameUse::Official as i32, ..name(family, given) }],
        gender: pb::AdministrativeGender::Female as i32,
        birth_date: birth_date.into(),
        identifiers: vec![pb::Identifier {
            system: "https://hospital.example/mrn".into(),
            value: mrn.into(),
            r#type: pb::IdentifierType::Mr as i32,
        }],
        telecom: vec![
            pb::ContactPoint {
                system: pb::ContactPointSystem::Phone as i32,
                value: "+1 (555) 010-0199".into(),
                r#use: pb::ContactPointUse::Mobile as i32,
            },
            pb::ContactPoint {
                system: pb::ContactPointSystem::Email as i32,
                value: "pat@example.org".into(),
                r#use: pb::ContactPointUse::Home as i32,
            },
        ],
        addresses: vec![pb::Address {
            r#use: pb::AddressUse::Home as i32,
            lines: vec!["12 Elm Street".into()],
            city: "Springfield".into(),
            state: "IL".into(),
            postal_code: "62701".into(),
            country: "US".into(),
        }],
        preferred_language: "en".into(),
        contacts: vec![pb::PatientContact {
            relationship: pb::ContactRelationship::NextOfKin as i32,
            name: Some(name("Kin", "Close")),
            telecom: vec![],
        }],
        ..Default::default()
    }
}

pub fn coverage(patient_id: &str, member_id: &str, order: i32) -> pb::Coverage {
    pb::Coverage {
        patient_id: patient_id.into(),
        status: pb::CoverageStatus::Active as i32,
        r#type: pb::CoverageType::Ppo as i32,
        payor: Some(pb::Payor { name: "Acme Health".into(), payer_id: "60054".into() }),
        subscriber_id: member_id.into(),
        relationship: pb::SubscriberRelationship::Patient as i32,
        group_number: "GRP-1".into(),
        plan_name: "Acme PPO Gold".into(),
        period: Some(pb::Period { start: "2026-01-01".into(), end: "2026-12-31".into() }),
        order,
        ..Default::default()
    }
}

pub async fn create(s: &TestServer, p: pb::Patient) -> pb::Patient {
    s.patients()
        .create_patient(req(pb::CreatePatientRequest { patient: Some(p) }, &s.admin()))
        .await
        .unwrap()
        .into_inner()
        .patient
        .unwrap()
}

/// Adds a coverage with the admin token and returns it as stored.
pub async fn create_coverage(s: &TestServer, c: pb::Coverage) -> pb::Coverage {
    s.coverages()
        .create_coverage(req(pb::CreateCoverageRequest { coverage: Some(c) }, &s.admin()))
        .await
        .unwrap()
        .into_inner()
        .coverage
        .unwrap()
}

/// Field names in a status's google.rpc.BadRequest details.
pub fn bad_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// Starts the `carevault serve` binary on 127.0.0.1:0 over the given
/// directories; returns the child and the address it printed.
pub fn spawn_binary_server(data: &std::path::Path, keys: &std::path::Path) -> (std::process::Child, String) {
    let (child, addr, _) = spawn_binary_server_logging(data, keys, "warn,carevault::commands=info", &[]);
    (child, addr)
}

/// Like [`spawn_binary_server`] with the log filter `filter` (empty: the
/// server's default) and `extra` arguments; every JSON log line the server
/// writes is collected.
pub fn spawn_binary_server_logging(
    data: &std::path::Path,
    keys: &std::path::Path,
    filter: &str,
    extra: &[&str],
) -> (std::process::Child, String, std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>) {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_carevault"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json", "--cache-mb", "32"])
        .args(store_args(data))
        .args(extra)
        .env("CAREVAULT_DATA_DIR", data)
        .env("CAREVAULT_KEY_DIR", keys)
        .env_remove("CAREVAULT_LOG");
    if !filter.is_empty() {
        cmd.env("CAREVAULT_LOG", filter);
    }
    let mut child = cmd.stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("server exited before listening").unwrap();
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
            && v["fields"]["message"] == "carevault listening"
        {
            break v["fields"]["addr"].as_str().unwrap().to_string();
        }
    };
    let logged = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = logged.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                sink.lock().unwrap().push(v);
            }
        }
    });
    (child, addr, logged)
}

/// Runs one search with the admin token.
pub async fn search(s: &TestServer, criterion: pb::search_patients_request::Criterion) -> pb::SearchPatientsResponse {
    let r = pb::SearchPatientsRequest { criterion: Some(criterion), show_deleted: false, page_size: 0 };
    s.patients().search_patients(req(r, &s.admin())).await.unwrap().into_inner()
}

/// Every stored audit entry of a store, as the verifier takes them.
pub fn raw_chain(store: &carevault::storage::sled::SledStore) -> Vec<carevault::audit::RawEntry> {
    store.audit_all().map(|e| e.map(carevault::storage::StoredAuditEntry::raw)).collect::<Result<_, _>>().unwrap()
}

/// How many calls of `action` with `outcome` the trail accounts for: one per
/// entry of the call itself, plus, for refusals counted together, the count
/// each `access.refused` entry gives for that action.
pub fn accounted(events: &[pb::AuditEvent], outcome: pb::AuditOutcome, action: &str) -> u64 {
    let prefix = format!("{action}=");
    events
        .iter()
        .filter(|e| e.outcome == outcome as i32)
        .map(|e| {
            if e.action == action {
                1
            } else if e.action == "access.refused" {
                e.details.iter().find_map(|d| d.strip_prefix(&prefix)).map_or(0, |n| n.parse::<u64>().unwrap())
            } else {
                0
            }
        })
        .sum()
}

/// A codec that sends the given bytes as the request message and returns the reply's bytes.
#[derive(Clone, Copy, Default)]
pub struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, n).to_vec()))
    }
}

/// Calls `path` (e.g. "/carevault.v1.PatientService/GetPatient") with `body`
/// as the encoded request, a bearer token (if any) and purpose TREAT.
pub async fn raw_call(
    channel: &Channel,
    path: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone()).max_encoding_message_size(16 << 20);
    grpc.ready().await.unwrap();
    let mut r = tonic::Request::new(body);
    if let Some(t) = token {
        r.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r.metadata_mut().insert("x-purpose-of-use", "TREAT".parse().unwrap());
    let path = tonic::codegen::http::uri::PathAndQuery::try_from(path).unwrap();
    grpc.unary(r, path, RawCodec).await.map(tonic::Response::into_inner)
}

/// The description of each field violation in a status's BadRequest details.
pub fn violations(status: &tonic::Status) -> Vec<(String, String)> {
    use tonic_types::StatusExt;
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| (v.field, v.description)).collect())
        .unwrap_or_default()
}
