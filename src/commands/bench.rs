//! `carevault bench`: an in-process server on a temporary directory, a
//! synthetic preload, then fixed-duration workloads at a given concurrency,
//! each through the full path (real tokens, validation, encryption, audit,
//! group commit, fdatasync).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::Context;
use carevault::auth::limits::LimitSettings;
use carevault::auth::token;
use carevault::cli::{BenchArgs, TlsClientArgs};
use carevault::config::ServiceConfig;
use carevault::keystore::{self, KeyPaths};
use carevault::proto::v1 as pb;
use carevault::proto::v1::audit_service_client::AuditServiceClient;
use carevault::proto::v1::coverage_service_client::CoverageServiceClient;
use carevault::proto::v1::patient_service_client::PatientServiceClient;
use carevault::server::{self, OpenOptions};
use tonic::transport::Channel;

const FAMILY: &[&str] = &[
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "García",
    "Miller",
    "Davis",
    "Rodríguez",
    "Martínez",
    "Hernández",
    "López",
    "González",
    "Wilson",
    "Anderson",
    "Thomas",
    "Taylor",
    "Moore",
    "Jackson",
    "Martin",
    "Lee",
    "Pérez",
    "Thompson",
    "White",
    "Harris",
    "Sánchez",
    "Clark",
    "Ramírez",
    "Lewis",
    "Robinson",
    "Nguyen",
    "O'Brien",
    "Kowalski",
    "Okafor",
    "Chen",
    "Müller",
    "Novák",
    "Haddad",
    "Kim",
    "Singh",
];
const GIVEN: &[&str] = &[
    "James",
    "Mary",
    "Robert",
    "Patricia",
    "John",
    "Jennifer",
    "Michael",
    "Linda",
    "David",
    "Elizabeth",
    "José",
    "Sofía",
    "Wei",
    "Aisha",
    "Mohammed",
    "Olga",
    "Chidi",
    "Zoë",
    "Mateo",
    "Ana",
    "Liam",
    "Noor",
    "Hiroshi",
    "Fatima",
];
const CITIES: &[(&str, &str, &str)] = &[
    ("Springfield", "IL", "62701"),
    ("Austin", "TX", "73301"),
    ("Portland", "OR", "97201"),
    ("Madison", "WI", "53703"),
    ("Tucson", "AZ", "85701"),
    ("Albany", "NY", "12207"),
];
const PAYORS: &[(&str, &str)] =
    &[("Acme Health", "60054"), ("Blue Shield", "94036"), ("Medicare Part B", "00430"), ("CarePlus", "87726")];

/// A small deterministic PRNG (xorshift64*) so runs are repeatable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[(self.next() % items.len() as u64) as usize]
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn synthetic_patient(rng: &mut Rng, i: usize) -> pb::Patient {
    let (city, state, zip) = *rng.pick(CITIES);
    let family = rng.pick(FAMILY).to_string();
    pb::Patient {
        names: vec![pb::HumanName {
            r#use: pb::NameUse::Official as i32,
            family,
            given: vec![rng.pick(GIVEN).to_string(), rng.pick(GIVEN).to_string()],
            ..Default::default()
        }],
        gender: 1 + (rng.below(4) as i32),
        birth_date: format!("{}-{:02}-{:02}", 1930 + rng.below(90), 1 + rng.below(12), 1 + rng.below(28)),
        identifiers: vec![
            pb::Identifier {
                system: "https://hospital.example/mrn".into(),
                value: format!("MRN{i:08}"),
                r#type: pb::IdentifierType::Mr as i32,
            },
            pb::Identifier {
                system: "http://hl7.org/fhir/sid/us-ssn".into(),
                value: format!("{:03}-{:02}-{:04}", 100 + rng.below(800), 10 + rng.below(89), rng.below(10_000)),
                r#type: pb::IdentifierType::Ss as i32,
            },
        ],
        telecom: vec![pb::ContactPoint {
            system: pb::ContactPointSystem::Phone as i32,
            value: format!("+1 555 {:03} {:04}", rng.below(1000), rng.below(10_000)),
            r#use: pb::ContactPointUse::Mobile as i32,
        }],
        addresses: vec![pb::Address {
            r#use: pb::AddressUse::Home as i32,
            lines: vec![format!("{} Elm Street", 1 + rng.below(9999))],
            city: city.into(),
            state: state.into(),
            postal_code: zip.into(),
            country: "US".into(),
        }],
        preferred_language: if rng.below(5) == 0 { "es".into() } else { "en".into() },
        ..Default::default()
    }
}

fn synthetic_coverage(rng: &mut Rng, patient_id: &str, order: i32, member: &str) -> pb::Coverage {
    let (name, payer_id) = *rng.pick(PAYORS);
    pb::Coverage {
        patient_id: patient_id.into(),
        status: pb::CoverageStatus::Active as i32,
        r#type: pb::CoverageType::Ppo as i32,
        payor: Some(pb::Payor { name: name.into(), payer_id: payer_id.into() }),
        subscriber_id: member.into(),
        relationship: pb::SubscriberRelationship::Patient as i32,
        group_number: format!("G{}", rng.below(100_000)),
        plan_name: format!("{name} Plan"),
        period: Some(pb::Period { start: "2025-01-01".into(), end: String::new() }),
        order,
        ..Default::default()
    }
}

/// What the workers share.
struct Target {
    channels: Vec<Channel>,
    token: String,
    /// (patient id, family, birth date, mrn)
    patients: Vec<(String, String, String, String)>,
    /// Per worker, its copies of the patients it edits (see [`EDIT_COPIES`]).
    copies: Vec<std::sync::Mutex<Vec<pb::Patient>>>,
}

/// How many patients each worker edits in the `update` workload: the first
/// this many its preload created. It keeps the message the last reply gave
/// it for each, as a desk app keeps the record on screen, and updates from
/// that copy: one UpdatePatient per update, at the version it last saw. No
/// two workers edit the same patient, so a conflict means another client.
const EDIT_COPIES: usize = 256;

fn authed<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Ok(v) = format!("Bearer {token}").parse() {
        r.metadata_mut().insert("authorization", v);
    }
    r.metadata_mut().insert("x-purpose-of-use", tonic::metadata::MetadataValue::from_static("TREAT"));
    r
}

#[derive(Clone, Copy)]
enum Op {
    Baseline,
    Echo,
    EchoBare,
    Read,
    Create,
    Update,
    Search,
    Active,
}

/// One operation; the error is the failing call's status code.
async fn one(target: &Target, w: usize, ch: &Channel, op: Op, rng: &mut Rng) -> Result<(), tonic::Code> {
    let t = &target.token;
    let pick = |rng: &mut Rng| &target.patients[rng.below(target.patients.len() as u64) as usize];
    match op {
        Op::Baseline => {
            let mut c = tonic_health::pb::health_client::HealthClient::new(ch.clone());
            c.check(tonic_health::pb::HealthCheckRequest { service: String::new() })
                .await
                .map(drop)
                .map_err(|s| s.code())
        }
        Op::Echo => {
            let id = pick(rng).0.clone();
            super::echo::get_patient(ch, authed(pb::GetPatientRequest { patient_id: id }, t), false)
                .await
                .map(drop)
                .map_err(|s| s.code())
        }
        Op::EchoBare => {
            let id = pick(rng).0.clone();
            let mut r = tonic::Request::new(pb::GetPatientRequest { patient_id: id });
            r.metadata_mut().insert("x-purpose-of-use", tonic::metadata::MetadataValue::from_static("TREAT"));
            super::echo::get_patient(ch, r, true).await.map(drop).map_err(|s| s.code())
        }
        Op::Read => {
            let id = pick(rng).0.clone();
            PatientServiceClient::new(ch.clone())
                .get_patient(authed(pb::GetPatientRequest { patient_id: id }, t))
                .await
                .map(drop)
                .map_err(|s| s.code())
        }
        Op::Create => {
            let n = rng.next() as usize;
            let p = synthetic_patient(rng, n);
            PatientServiceClient::new(ch.clone())
                .create_patient(authed(pb::CreatePatientRequest { patient: Some(p) }, t))
                .await
                .map(drop)
                .map_err(|s| s.code())
        }
        Op::Update => {
            let copies = target.copies.get(w % target.copies.len().max(1)).ok_or(tonic::Code::FailedPrecondition)?;
            let lock = || copies.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let (at, mut p) = {
                // Never empty: only non-empty slices are kept.
                let mine = lock();
                let at = rng.below(mine.len() as u64) as usize;
                (at, mine[at].clone())
            };
            p.preferred_language = if p.preferred_language == "en" { "es".into() } else { "en".into() };
            let mut c = PatientServiceClient::new(ch.clone());
            let id = p.id.clone();
            let stored = match c.update_patient(authed(pb::UpdatePatientRequest { patient: Some(p) }, t)).await {
                Ok(r) => r.into_inner().patient,
                // Someone else changed it: read the current version, as a desk app would.
                Err(s) if s.code() == tonic::Code::Aborted => {
                    c.get_patient(authed(pb::GetPatientRequest { patient_id: id }, t))
                        .await
                        .map_err(|s| s.code())?
                        .into_inner()
                        .patient
                }
                Err(s) => return Err(s.code()),
            };
            lock()[at] = stored.ok_or(tonic::Code::Internal)?;
            Ok(())
        }
        Op::Search => {
            use pb::search_patients_request::Criterion;
            let (_, family, birth, mrn) = pick(rng).clone();
            let criterion = if rng.below(2) == 0 {
                Criterion::Identifier(pb::IdentifierQuery { system: "https://hospital.example/mrn".into(), value: mrn })
            } else {
                Criterion::NameBirthDate(pb::NameBirthDateQuery { family, birth_date: birth })
            };
            let req = pb::SearchPatientsRequest { criterion: Some(criterion), show_deleted: false, page_size: 10 };
            PatientServiceClient::new(ch.clone()).search_patients(authed(req, t)).await.map(drop).map_err(|s| s.code())
        }
        Op::Active => {
            let id = pick(rng).0.clone();
            let req = pb::GetActiveCoverageRequest { patient_id: id, date: "2026-06-01".into() };
            CoverageServiceClient::new(ch.clone())
                .get_active_coverage(authed(req, t))
                .await
                .map(drop)
                .map_err(|s| s.code())
        }
    }
}

fn choose(workload: &str, rng: &mut Rng) -> Option<Op> {
    Some(match workload {
        "baseline" => Op::Baseline,
        "echo" => Op::Echo,
        "echo-bare" => Op::EchoBare,
        "read" => Op::Read,
        "create" => Op::Create,
        "update" => Op::Update,
        "search" => Op::Search,
        "active-coverage" => Op::Active,
        "mixed" => match rng.below(100) {
            0..80 => Op::Read,
            80..90 => Op::Update,
            90..95 => Op::Create,
            _ => Op::Search,
        },
        _ => return None,
    })
}

struct Outcome {
    name: String,
    ops: u64,
    errors: u64,
    /// Errors by gRPC status code.
    error_codes: std::collections::BTreeMap<String, u64>,
    secs: f64,
    latencies_us: Vec<u32>,
    audit_entries: u64,
    /// Disk syncs during the run (unknown for a remote server).
    syncs: Option<u64>,
}

impl Outcome {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.secs
    }
    fn syncs_per_op(&self) -> Option<f64> {
        self.syncs.map(|n| if self.ops > 0 { n as f64 / self.ops as f64 } else { 0.0 })
    }
    fn pct(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let idx = ((self.latencies_us.len() - 1) as f64 * p).round() as usize;
        f64::from(self.latencies_us[idx]) / 1000.0
    }
}

async fn head(target: &Target) -> u64 {
    let mut c = AuditServiceClient::new(target.channels[0].clone());
    c.get_audit_head(authed(pb::GetAuditHeadRequest {}, &target.token))
        .await
        .map(|r| r.into_inner().sequence)
        .unwrap_or(0)
}

async fn run_workload(
    target: Arc<Target>,
    name: &str,
    args: &BenchArgs,
    syncs: Option<&AtomicU64>,
) -> anyhow::Result<Outcome> {
    let mut probe = Rng(1);
    choose(name, &mut probe).with_context(|| format!("unknown workload {name}"))?;
    let head_before = head(&target).await;
    let syncs_before = syncs.map(|s| s.load(Ordering::Relaxed));
    let deadline = Instant::now() + args.duration;
    // With --ops, workers take numbered turns until that many have started.
    let turns = Arc::new(AtomicU64::new(0));
    let ops_limit = args.ops;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..args.concurrency {
        let target = target.clone();
        let name = name.to_string();
        let turns = turns.clone();
        let go_on = move || match ops_limit {
            Some(n) => turns.fetch_add(1, Ordering::Relaxed) < n,
            None => Instant::now() < deadline,
        };
        tasks.push(tokio::spawn(async move {
            let ch = target.channels[w % target.channels.len()].clone();
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (w as u64 + 1).wrapping_mul(0x1234_5678_9ABC_DEF1));
            let mut lat = Vec::new();
            let mut errors = std::collections::BTreeMap::<String, u64>::new();
            while go_on() {
                let Some(op) = choose(&name, &mut rng) else { break };
                let t0 = Instant::now();
                let result = one(&target, w, &ch, op, &mut rng).await;
                lat.push(u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX));
                if let Err(code) = result {
                    *errors.entry(format!("{code:?}")).or_default() += 1;
                }
            }
            (lat, errors)
        }));
    }
    let mut latencies_us = Vec::new();
    let mut error_codes = std::collections::BTreeMap::<String, u64>::new();
    for t in tasks {
        let (l, e) = t.await?;
        latencies_us.extend(l);
        for (code, n) in e {
            *error_codes.entry(code).or_default() += n;
        }
    }
    let errors = error_codes.values().sum();
    let secs = started.elapsed().as_secs_f64();
    latencies_us.sort_unstable();
    let head_after = head(&target).await;
    Ok(Outcome {
        name: name.to_string(),
        ops: latencies_us.len() as u64,
        errors,
        error_codes,
        secs,
        latencies_us,
        // minus the two GetAuditHead calls bracketing the run
        audit_entries: head_after.saturating_sub(head_before).saturating_sub(1),
        syncs: syncs.zip(syncs_before).map(|(s, before)| s.load(Ordering::Relaxed) - before),
    })
}

fn seconds(a: Option<pbjson_types::Timestamp>, b: Option<pbjson_types::Timestamp>) -> f64 {
    match (a, b) {
        (Some(a), Some(b)) => (b.seconds - a.seconds) as f64 + f64::from(b.nanos - a.nanos) / 1e9,
        _ => 0.0,
    }
}

/// Starts a key job (unthrottled) and runs the `read` workload while it
/// works; returns the reads' outcome and a summary line with the job's rate.
/// `rewrap` rotates the master key and rewraps every data key; `reencrypt`
/// gives every patient a new data key and re-seals every record version;
/// `blind-index` rotates the blind-index key (after a master key rotation if needed).
async fn job_under_reads(
    target: Arc<Target>,
    args: &BenchArgs,
    syncs: Option<&AtomicU64>,
    job: &str,
) -> anyhow::Result<(Outcome, String)> {
    use carevault::proto::v1::key_service_client::KeyServiceClient;
    let mut k = KeyServiceClient::new(target.channels[0].clone());
    let t = &target.token;
    match job {
        "rewrap" => {
            k.rotate_master_key(authed(pb::RotateMasterKeyRequest {}, t)).await?;
            k.start_rewrap(authed(pb::StartRewrapRequest { dry_run: false, max_per_second: 0 }, t)).await?;
        }
        "reencrypt" => {
            let start = pb::StartReencryptRequest { patient_id: String::new(), max_per_second: 0 };
            k.start_reencrypt(authed(start, t)).await?;
        }
        _ => {
            let st = k.get_key_status(authed(pb::GetKeyStatusRequest {}, t)).await?.into_inner();
            if st.primary_version == st.blind_index_version {
                k.rotate_master_key(authed(pb::RotateMasterKeyRequest {}, t)).await?;
            }
            k.rotate_blind_index_key(authed(pb::RotateBlindIndexKeyRequest {}, t)).await?;
        }
    }
    let mut reads = run_workload(target.clone(), "read", args, syncs).await?;
    reads.name = format!("read+{job}");
    loop {
        let line = match job {
            "rewrap" => {
                let j = k.get_rewrap_job(authed(pb::GetRewrapJobRequest {}, t)).await?.into_inner().job;
                let j = j.context("no job")?;
                (j.state == "completed").then(|| {
                    format!(
                        "rewrap: {} data keys to v{} in {:.1}s = {:.0}/s, while serving audited reads ({} read errors)",
                        j.done,
                        j.target_version,
                        seconds(j.start_time, j.finish_time),
                        j.rate,
                        reads.errors
                    )
                })
            }
            "reencrypt" => {
                let j = k.get_reencrypt_job(authed(pb::GetReencryptJobRequest {}, t)).await?.into_inner().job;
                let j = j.context("no job")?;
                (j.state == "completed").then(|| {
                    format!(
                        "reencrypt: {} patients ({} record versions re-sealed) in {:.1}s = {:.0} patients/s, reads ran for the first {:.0}s ({} read errors)",
                        j.done,
                        j.record_versions,
                        seconds(j.start_time, j.finish_time),
                        j.rate,
                        reads.secs,
                        reads.errors
                    )
                })
            }
            _ => {
                let j = k.get_blind_index_job(authed(pb::GetBlindIndexJobRequest {}, t)).await?.into_inner().job;
                let j = j.context("no job")?;
                (j.state == "completed").then(|| {
                    let secs = seconds(j.start_time, j.finish_time);
                    format!(
                        "blind-index: {} records re-indexed to v{} and {} old entries dropped in {:.1}s = {:.0} records/s, reads ran for the first {:.0}s ({} read errors)",
                        j.reindexed,
                        j.to_version,
                        j.dropped,
                        secs,
                        j.reindexed as f64 / secs.max(1e-9),
                        reads.secs,
                        reads.errors
                    )
                })
            }
        };
        if let Some(line) = line {
            return Ok((reads, line));
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// The in-process server a bench run started (absent with `--server`).
struct Local {
    tmp: std::path::PathBuf,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), carevault::server::ServerError>>,
    syncs: Arc<AtomicU64>,
    /// The echo floor served beside carevault's services.
    echo: super::echo::Echo,
}

/// Starts the in-process server (plaintext on loopback, or mutual TLS with
/// `--tls`); returns it with its URL, the client TLS settings and a token.
async fn start_local(args: &BenchArgs) -> anyhow::Result<(Local, String, TlsClientArgs, String)> {
    let tmp = tempfile_dir(args)?;
    let data_dir = tmp.join("data");
    let key_dir = tmp.join("keys");
    let key_paths = KeyPaths { dir: key_dir.clone() };
    keystore::ensure_keys(&key_paths)?;
    let mut config = ServiceConfig::new(data_dir.clone(), key_dir);
    config.store = super::store(args.store.as_deref(), &data_dir)?;
    config.tokens.max_lifetime_secs = 24 * 3600;
    config.cache_bytes = args.cache_mb.saturating_mul(1024 * 1024);
    config.checkpoints.every_entries = args.checkpoint_every;
    config.checkpoints.interval = args.checkpoint_interval;
    // One principal drives the whole load, so the per-principal rate limit is off.
    config.limits = LimitSettings { per_principal_per_sec: 0, burst: 0, max_concurrent: 4096 };
    let mut client_tls = TlsClientArgs::default();
    if args.tls {
        use carevault::auth::tls::{ClientAuth, ServerTls, dev_files, write_dev_certs};
        let dir = tmp.join("tls");
        if !dir.join(dev_files::CA_CERT).exists() {
            write_dev_certs(&dir)?;
        }
        config.tls = Some(ServerTls {
            cert: dir.join(dev_files::SERVER_CERT),
            key: dir.join(dev_files::SERVER_KEY),
            client_ca: Some(dir.join(dev_files::CA_CERT)),
            client_auth: ClientAuth::Required,
        });
        client_tls = TlsClientArgs {
            tls_ca: Some(dir.join(dev_files::CA_CERT)),
            tls_client_cert: Some(dir.join(dev_files::CLIENT_CERT)),
            tls_client_key: Some(dir.join(dev_files::CLIENT_KEY)),
            tls_domain: Some("localhost".into()),
        };
    }
    let service = server::open(&config, OpenOptions::system()).await?;
    let syncs = service.sequencer.sync_counter();
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let echo = super::echo::Echo::default();
    let served = echo.clone();
    let task = tokio::spawn(server::run_with(listener, service, move |routes| routes.add_service(served), async {
        let _ = stop_rx.await;
    }));
    let der = keystore::read_private(&key_paths.issuer_private())?;
    let now = i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs())?;
    let spec = token::TokenSpec {
        ttl_secs: 20 * 3600,
        ..token::TokenSpec::new("bench", &["front_desk", "compliance", "key_admin"])
    };
    let token = token::issue(&der, &spec, now)?;
    let url = if args.tls { format!("https://localhost:{}", addr.port()) } else { format!("http://{addr}") };
    Ok((Local { tmp, stop, task, syncs, echo }, url, client_tls, token))
}

/// Runs the benchmark and prints the report.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let (local, url, client_tls, token) = match &args.server {
        Some(url) => {
            let token = args.token.clone().context("--server needs --token (or CAREVAULT_TOKEN)")?;
            (None, url.clone(), args.client_tls.clone(), token)
        }
        None => {
            let (local, url, tls, token) = start_local(&args).await?;
            (Some(local), url, tls, token)
        }
    };
    if local.is_none() && args.workloads.iter().any(|w| w.starts_with("echo")) {
        anyhow::bail!("the echo workload needs the in-process server: it is the bench's own service, not carevault's");
    }
    // Without an in-process server the syncs are not visible; they are reported as unknown.
    let syncs = local.as_ref().map(|l| l.syncs.clone());
    let echo = local.as_ref().map(|l| l.echo.clone());
    let mut channels = Vec::new();
    for _ in 0..args.channels.max(1) {
        channels.push(super::connect(&url, &client_tls).await?);
    }

    // Preload.
    let t0 = Instant::now();
    let per_worker = args.patients.div_ceil(args.concurrency.max(1));
    let mut tasks = Vec::new();
    for w in 0..args.concurrency.max(1) {
        let ch = channels[w % channels.len()].clone();
        let token = token.clone();
        let echo = echo.clone();
        let start = w * per_worker;
        let end = ((w + 1) * per_worker).min(args.patients);
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0xC0FF_EE00 + w as u64);
            let mut out = Vec::new();
            let mut copies = Vec::new();
            let mut pc = PatientServiceClient::new(ch.clone());
            let mut cc = CoverageServiceClient::new(ch);
            for i in start..end {
                let p = synthetic_patient(&mut rng, i);
                let created =
                    pc.create_patient(authed(pb::CreatePatientRequest { patient: Some(p.clone()) }, &token)).await?;
                let stored = created.into_inner().patient.unwrap_or_default();
                let id = stored.id.clone();
                if copies.len() < EDIT_COPIES {
                    copies.push(stored.clone());
                }
                if let Some(echo) = &echo {
                    echo.keep(stored);
                }
                for order in 1..=(1 + rng.below(3) as i32) {
                    let c = synthetic_coverage(&mut rng, &id, order, &format!("M{i:07}{order}"));
                    cc.create_coverage(authed(pb::CreateCoverageRequest { coverage: Some(c) }, &token)).await?;
                }
                out.push((id, p.names[0].family.clone(), p.birth_date.clone(), p.identifiers[0].value.clone()));
            }
            Ok::<_, tonic::Status>((out, copies))
        }));
    }
    let mut patients = Vec::with_capacity(args.patients);
    let mut copies = Vec::new();
    for t in tasks {
        let (made, kept) = t.await?.map_err(|s| anyhow::anyhow!("preload failed: {}", s.message()))?;
        patients.extend(made);
        // Fewer patients than workers: workers share the slices there are.
        if !kept.is_empty() {
            copies.push(std::sync::Mutex::new(kept));
        }
    }
    let preload_secs = t0.elapsed().as_secs_f64();
    let target = Arc::new(Target { channels, token, patients, copies });

    let mut results = Vec::new();
    let mut job_lines = Vec::new();
    for name in &args.workloads {
        let job = match name.as_str() {
            "rewrap" | "reencrypt" | "blind-index" => {
                Some(job_under_reads(target.clone(), &args, syncs.as_deref(), name).await?)
            }
            _ => None,
        };
        match job {
            Some((reads, line)) => {
                results.push(reads);
                job_lines.push(line);
            }
            None => results.push(run_workload(target.clone(), name, &args, syncs.as_deref()).await?),
        }
    }
    let verify = if args.verify_entries > 0 { Some(verify_bench(args.verify_entries)?) } else { None };
    report(&args, &results, preload_secs, verify);
    if args.proof_entries > 0 {
        proof_bench(args.proof_entries, args.json).await?;
    }
    for line in job_lines {
        println!("{line}");
    }
    if let Some(local) = local {
        let _ = local.stop.send(());
        local.task.await??;
        if args.data_dir.is_none() {
            let _ = std::fs::remove_dir_all(&local.tmp);
        }
    }
    Ok(())
}

fn tempfile_dir(args: &BenchArgs) -> anyhow::Result<std::path::PathBuf> {
    let dir = match &args.data_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("carevault-bench-{}", uuid::Uuid::now_v7())),
    };
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Builds a sled store of `n` audit entries through the sequencer (as
/// concurrent reads would), then times inclusion proofs at random entries
/// against the whole tree: the server's part of GetInclusionProof (stored
/// subtrees, the leaves below them, the entry), without the RPC.
async fn proof_bench(n: u64, json: bool) -> anyhow::Result<()> {
    use carevault::audit::{AuditEntry, merkle};
    use carevault::storage::{Commit, Location, OpenStore, tree};
    let dir = std::env::temp_dir().join(format!("carevault-proof-bench-{}", uuid::Uuid::now_v7()));
    let location = Location::Sled(dir.join("db"));
    let clock: Arc<dyn carevault::clock::Clock> = Arc::new(carevault::clock::SystemClock);
    let (store, pipeline) = carevault::storage::open(OpenStore {
        location: &location,
        cache_bytes: 256 << 20,
        clock,
        fail_syncs: carevault::storage::FailSyncs::never(),
    })
    .await?;
    let t0 = Instant::now();
    let writers = 512u64;
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let store = store.clone();
            let count = (n.saturating_sub(1) + writers - 1 - w) / writers;
            tokio::spawn(async move {
                for _ in 0..count {
                    let e = AuditEntry {
                        actor: "desk-1@clinic.example".into(),
                        action: "patient.read".into(),
                        resource_type: "patient".into(),
                        resource_id: "01a20bfd-9fdb-77ab-bbfc-c2df3c7515b0".into(),
                        outcome: "ok".into(),
                        ..AuditEntry::default()
                    };
                    store.commit(Commit::entry(e)).await?;
                }
                Ok::<_, carevault::storage::StorageError>(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    let build = t0.elapsed().as_secs_f64();
    let size = store.tree_size().await?;
    let root = tree::root(&*store, size).await?;
    let mut times = Vec::with_capacity(1000);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..1000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let seq = x % size;
        let t = Instant::now();
        let ranges = merkle::inclusion_ranges(seq, size).context("out of range")?;
        let hashes = tree::proof(&*store, &ranges).await?;
        let entry = store.audit_entry(seq).await?.context("entry missing")?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
        merkle::verify_inclusion(seq, size, &merkle::leaf_hash(&entry.bytes), &hashes, &root)
            .map_err(|e| anyhow::anyhow!("a proof made here does not verify: {e}"))?;
    }
    times.sort_by(f64::total_cmp);
    let pct = |p: f64| times[((times.len() - 1) as f64 * p) as usize];
    if json {
        println!(
            "{}",
            serde_json::json!({"proof": {"entries": size, "build_secs": build, "p50_us": pct(0.5), "p99_us": pct(0.99), "max_us": pct(1.0)}})
        );
    } else {
        println!(
            "inclusion proofs at {size} entries (built in {build:.1}s): p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs (1000 proofs, server side, no RPC)",
            pct(0.5),
            pct(0.99),
            pct(1.0)
        );
    }
    drop(store);
    pipeline.join().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Builds a valid chain of `n` entries in memory and times the pure verifier
/// over it: the chain, the Merkle tree recomputed, and a checkpoint of the
/// whole tree checked against it.
fn verify_bench(n: u64) -> anyhow::Result<(u64, f64, f64)> {
    use carevault::audit::{AuditEntry, Claim, RawEntry, merkle, verify_log};
    let t0 = Instant::now();
    let mut entries = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
    let mut prev = [0u8; 32];
    let mut tree = merkle::CompactRange::new();
    for seq in 0..n {
        let mut e = if seq == 0 { AuditEntry::genesis(0) } else { AuditEntry::default() };
        if seq > 0 {
            e.actor = "desk-1@clinic.example".into();
            e.scopes = vec!["patients.read".into()];
            e.client_address = "10.0.0.7:53412".into();
            e.request_id = "01a20bfd-9fd0-70fd-9395-d352c2e543a4".into();
            e.action = "patient.read".into();
            e.resource_type = "patient".into();
            e.resource_id = "01a20bfd-9fdb-77ab-bbfc-c2df3c7515b0".into();
            e.patient_id = e.resource_id.clone();
            e.record_version = 3;
            e.outcome = "ok".into();
            e.key_version = 1;
        }
        e.sequence = seq;
        e.previous_hash = prev;
        e.time_micros = i64::try_from(seq).unwrap_or(0);
        let bytes = e.encode()?;
        prev = carevault::crypto::sha256(&bytes);
        tree.append(merkle::leaf_hash(&bytes));
        entries.push(RawEntry::stored(bytes, prev, seq));
    }
    let claim = Claim { size: tree.size(), root: tree.root(), saved: true };
    let build = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let report = verify_log(entries, None, None, &[claim]);
    anyhow::ensure!(report.is_ok(), "the synthetic chain did not verify: {:?}", report.failure);
    let secs = t1.elapsed().as_secs_f64();
    Ok((report.entries_checked, secs, build))
}

fn report(args: &BenchArgs, results: &[Outcome], preload_secs: f64, verify: Option<(u64, f64, f64)>) {
    let baseline = results.iter().find(|r| r.name == "baseline");
    let base_rate = baseline.map(Outcome::rate);
    let base_p99 = baseline.map(|b| b.pct(0.99));
    let echo = results.iter().find(|r| r.name == "echo");
    let echo_rate = echo.map(Outcome::rate);
    let echo_p99 = echo.map(|e| e.pct(0.99));
    if args.json {
        let rows: Vec<_> = results
            .iter()
            .map(|r| {
                serde_json::json!({
                    "workload": r.name,
                    "ops": r.ops,
                    "ops_per_sec": r.rate().round(),
                    "p50_ms": r.pct(0.50), "p95_ms": r.pct(0.95), "p99_ms": r.pct(0.99), "max_ms": r.pct(1.0),
                    "errors": r.errors,
                    "error_codes": r.error_codes,
                    "ratio_to_baseline": base_rate.map(|b| r.rate() / b),
                    "p99_ratio_to_baseline": base_p99.map(|b| r.pct(0.99) / b),
                    "ratio_to_echo": echo_rate.map(|e| r.rate() / e),
                    "p99_ratio_to_echo": echo_p99.map(|e| r.pct(0.99) / e),
                    "audit_entries": r.audit_entries,
                    "syncs": r.syncs,
                    "syncs_per_op": r.syncs_per_op(),
                })
            })
            .collect();
        let v = serde_json::json!({
            "patients": args.patients, "concurrency": args.concurrency, "channels": args.channels,
            "duration_secs": args.duration.as_secs_f64(), "ops_per_workload": args.ops, "preload_secs": preload_secs,
            "server": args.server.as_deref().unwrap_or("in-process"), "tls": args.tls || args.server.as_deref().is_some_and(|u| u.starts_with("https://")),
            "peak_rss_mib": peak_rss_mib(), "workloads": rows,
            "verify": verify.map(|(n, s, _)| serde_json::json!({"entries": n, "secs": s, "entries_per_sec": (n as f64 / s).round()})),
        });
        println!("{v}");
        return;
    }
    let transport = match (&args.server, args.tls) {
        (Some(url), _) => format!("server {url}"),
        (None, true) => "in-process server, mutual TLS".to_string(),
        (None, false) => "in-process server, plaintext loopback".to_string(),
    };
    let per_workload = match args.ops {
        Some(n) => format!("{n} operations"),
        None => format!("{:?}", args.duration),
    };
    println!(
        "carevault bench: {} patients preloaded in {:.1}s, {} in flight over {} channels, {per_workload} per workload, {transport}",
        args.patients, preload_secs, args.concurrency, args.channels
    );
    println!(
        "{:<16} {:>10} {:>8} {:>8} {:>8} {:>8} {:>7} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>9}",
        "workload",
        "ops/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms",
        "errors",
        "x base",
        "p99 x",
        "x echo",
        "p99 xe",
        "audit",
        "syncs",
        "sync/op"
    );
    for r in results {
        println!(
            "{:<16} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>8.1} {:>7} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>9}",
            r.name,
            r.rate(),
            r.pct(0.50),
            r.pct(0.95),
            r.pct(0.99),
            r.pct(1.0),
            r.errors,
            base_rate.map(|b| format!("{:.2}", r.rate() / b)).unwrap_or_default(),
            base_p99.map(|b| format!("{:.1}", r.pct(0.99) / b)).unwrap_or_default(),
            echo_rate.map(|e| format!("{:.2}", r.rate() / e)).unwrap_or_default(),
            echo_p99.map(|e| format!("{:.1}", r.pct(0.99) / e)).unwrap_or_default(),
            r.audit_entries,
            r.syncs.map_or("-".to_string(), |n| n.to_string()),
            r.syncs_per_op().map_or("-".to_string(), |x| format!("{x:.4}")),
        );
    }
    for r in results.iter().filter(|r| r.errors > 0) {
        let codes: Vec<String> = r.error_codes.iter().map(|(c, n)| format!("{c} {n}")).collect();
        println!("errors in {}: {}", r.name, codes.join(", "));
    }
    let whose = if args.server.is_none() { "server and client together" } else { "this client only" };
    println!("peak RSS ({whose}): {:.0} MiB", peak_rss_mib());
    if let Some((n, secs, _)) = verify {
        println!(
            "verify: {n} entries in {secs:.2}s = {:.0} entries/s (one core, pure verifier: chain, Merkle tree, one checkpoint)",
            n as f64 / secs
        );
    }
}
