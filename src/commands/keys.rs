//! `carevault keys`: master key operations, online (KeyService) or offline
//! (the same use cases on a stopped data directory, audited as `offline:<user>`).

use std::time::Duration;

use anyhow::Context;
use carevault::api::keys::{blind_pb, erasure_pb, job_pb, reencrypt_pb, status_pb};
use carevault::app::{App, CallContext, EraseRequest, Input, Named, ReencryptRequest, RewrapRequest};
use carevault::cli::{KeysArgs, KeysCommand};
use carevault::clock::{Clock, SystemClock};
use carevault::config::ServiceConfig;
use carevault::domain::PatientId;
use carevault::proto::v1 as pb;
use carevault::proto::v1::key_service_client::KeyServiceClient;
use carevault::server::{self, OpenOptions};
use carevault::storage::sled::snapshot;
use indicatif::{ProgressBar, ProgressStyle};

use super::output::status;

fn app_error(e: carevault::error::AppError) -> anyhow::Error {
    let s = carevault::error::to_status(&e, "offline");
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

fn print<T: serde::Serialize>(json: bool, v: &T, human: impl FnOnce() -> String) -> anyhow::Result<()> {
    if json {
        println!("{}", super::output::json(v)?);
    } else {
        println!("{}", human());
    }
    Ok(())
}

fn human_status(s: &pb::GetKeyStatusResponse) -> String {
    let mut out = format!(
        "key source: {}\nprimary: v{}   blind index: v{}\nversion  state      data keys    records  index entries  notes\n",
        s.key_source, s.primary_version, s.blind_index_version
    );
    for v in &s.versions {
        out += &format!(
            "v{:<7} {:<10} {:>9} {:>10} {:>14} {:>6}{}\n",
            v.version,
            v.state,
            v.data_keys,
            v.records,
            v.index_entries,
            v.notes,
            if v.primary { "  (primary)" } else { "" }
        );
    }
    if let Some(j) = &s.job {
        out += &format!(
            "rewrap job {}: {} to v{}, {}/{} done, {:.0}/s\n",
            j.job_id, j.state, j.target_version, j.done, j.total, j.rate
        );
    }
    if let Some(j) = &s.reencrypt_job {
        out += &(human_reencrypt(j) + "\n");
    }
    if let Some(j) = &s.blind_index_job {
        out += &(human_blind(j) + "\n");
    }
    if let Some(p) = &s.pending_operation {
        out += &format!(
            "UNSETTLED: {} of v{} (request {}, by {}) has an intent entry but no completion entry; the server settles it at its next start\n",
            p.operation, p.version, p.request_id, p.started_by
        );
    }
    out.trim_end().to_string()
}

fn human_blind(j: &pb::BlindIndexJob) -> String {
    format!(
        "blind-index rotation {} v{} -> v{}: {}/{} records re-indexed, {} old entries dropped",
        j.state, j.from_version, j.to_version, j.reindexed, j.total, j.dropped
    )
}

fn human_erasure(r: &pb::ErasePatientResponse) -> String {
    let mut out = format!(
        "patient {} erased (audit entry {}): {} coverages, {} record versions; {} other data keys moved to a new erasure key\n",
        r.patient_id, r.audit_sequence, r.coverages_erased, r.record_versions_erased, r.data_keys_rekeyed
    );
    for c in &r.caveats {
        out += &format!("note: {c}\n");
    }
    out.trim_end().to_string()
}

fn human_reencrypt(j: &pb::ReencryptJob) -> String {
    format!(
        "re-encryption {}: {}/{} patients, {} record versions re-sealed, {:.0} patients/s",
        j.state, j.done, j.total, j.record_versions, j.rate
    )
}

fn patient_arg(s: &str) -> anyhow::Result<PatientId> {
    PatientId::parse(s).with_context(|| format!("--patient {s:?} is not a lowercase hyphenated UUID"))
}

fn bar(total: u64) -> ProgressBar {
    bar_of(total, "rewrapped")
}

fn bar_of(total: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(total);
    if let Ok(style) =
        ProgressStyle::with_template(&format!("{{bar:40}} {{pos}}/{{len}} {what}, {{per_sec}}, eta {{eta}}"))
    {
        pb.set_style(style);
    }
    pb
}

/// Runs a `keys` subcommand.
pub async fn run(args: KeysArgs) -> anyhow::Result<()> {
    match &args.server {
        Some(url) => online(url, &args).await,
        None => offline(&args).await,
    }
}

async fn online(url: &str, args: &KeysArgs) -> anyhow::Result<()> {
    let token = args.token.clone().context("--server needs --token (or CAREVAULT_TOKEN) with the key_admin role")?;
    let mut client = KeyServiceClient::new(super::connect(url, &args.tls).await?);
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse()?;
    macro_rules! req {
        ($m:expr) => {{
            let mut r = tonic::Request::new($m);
            r.metadata_mut().insert("authorization", bearer.clone());
            r
        }};
    }
    match &args.command {
        KeysCommand::Status => {
            let s = client.get_key_status(req!(pb::GetKeyStatusRequest {})).await.map_err(status)?.into_inner();
            print(args.json, &s, || human_status(&s))
        }
        KeysCommand::LogKey => {
            let s = client.get_key_status(req!(pb::GetKeyStatusRequest {})).await.map_err(status)?.into_inner();
            print_log_keys(args.json, &s.log_keys)
        }
        KeysCommand::RotateLogKey => {
            let r = client.rotate_log_key(req!(pb::RotateLogKeyRequest {})).await.map_err(status)?.into_inner();
            print(args.json, &r, || format!("log key v{} signs from now on: {}", r.version, r.log_key))
        }
        KeysCommand::Rotate => {
            let r = client.rotate_master_key(req!(pb::RotateMasterKeyRequest {})).await.map_err(status)?.into_inner();
            print(args.json, &r, || {
                format!("v{} is primary (was v{}); run `keys rewrap` next", r.new_version, r.previous_primary)
            })
        }
        KeysCommand::Retire { key_version: version } => {
            let r = client
                .retire_master_key(req!(pb::RetireMasterKeyRequest { version: *version }))
                .await
                .map_err(status)?;
            print(args.json, &r.into_inner(), || format!("v{version} retired: it can no longer decrypt"))
        }
        KeysCommand::Destroy { key_version: version } => {
            let r = client
                .destroy_master_key(req!(pb::DestroyMasterKeyRequest { version: *version }))
                .await
                .map_err(status)?;
            let r = r.into_inner();
            print(args.json, &r, || destroyed_message(*version, r.material_removed))
        }
        KeysCommand::RotateBlindIndex { no_wait } => {
            let m = pb::RotateBlindIndexKeyRequest {};
            let job =
                client.rotate_blind_index_key(req!(m)).await.map_err(status)?.into_inner().job.context("no job")?;
            if *no_wait || job.state == "completed" {
                return print(args.json, &job, || human_blind(&job));
            }
            let pb = bar_of(job.total, "records re-indexed");
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let j = client.get_blind_index_job(req!(pb::GetBlindIndexJobRequest {})).await.map_err(status)?;
                let Some(j) = j.into_inner().job else { continue };
                pb.set_position(j.reindexed);
                if j.state == "completed" {
                    pb.finish_and_clear();
                    return print(args.json, &j, || human_blind(&j));
                }
            }
        }
        KeysCommand::Erase { patient, reason } => {
            let m = pb::ErasePatientRequest { patient_id: patient.clone(), reason: reason.clone() };
            let r = client.erase_patient(req!(m)).await.map_err(status)?.into_inner();
            print(args.json, &r, || human_erasure(&r))
        }
        KeysCommand::Reencrypt { patient, max_per_second, no_wait } => {
            let m = pb::StartReencryptRequest {
                patient_id: patient.clone().unwrap_or_default(),
                max_per_second: *max_per_second,
            };
            let job = client.start_reencrypt(req!(m)).await.map_err(status)?.into_inner().job.context("no job")?;
            if *no_wait || job.state != "running" {
                return print(args.json, &job, || human_reencrypt(&job));
            }
            let pb = bar_of(job.total, "patients re-encrypted");
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let j = client.get_reencrypt_job(req!(pb::GetReencryptJobRequest {})).await.map_err(status)?;
                let Some(j) = j.into_inner().job else { continue };
                pb.set_position(j.done);
                if j.state == "completed" {
                    pb.finish_and_clear();
                    return print(args.json, &j, || human_reencrypt(&j));
                }
            }
        }
        KeysCommand::Rewrap { dry_run, max_per_second, no_wait } => {
            let start = pb::StartRewrapRequest { dry_run: *dry_run, max_per_second: *max_per_second };
            let job = client.start_rewrap(req!(start)).await.map_err(status)?.into_inner().job.context("no job")?;
            if *dry_run || *no_wait || job.state != "running" {
                return print(args.json, &job, || {
                    format!("{}: {} data keys and notes to rewrap to v{}", job.state, job.total, job.target_version)
                });
            }
            let pb = bar(job.total);
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let j = client.get_rewrap_job(req!(pb::GetRewrapJobRequest {})).await.map_err(status)?.into_inner();
                let Some(j) = j.job else { continue };
                pb.set_position(j.done);
                if j.state == "completed" {
                    pb.finish_and_clear();
                    return print(args.json, &j, || {
                        format!("rewrap complete: {} rewrapped to v{} at {:.0}/s", j.done, j.target_version, j.rate)
                    });
                }
            }
        }
    }
}

fn destroyed_message(version: u32, removed: bool) -> String {
    if removed {
        format!("v{version} destroyed: its key file is removed")
    } else {
        format!("v{version} marked destroyed: remove its material from your key source now")
    }
}

async fn offline(args: &KeysArgs) -> anyhow::Result<()> {
    let (data_dir, key_dir) = super::dirs(&args.dirs);
    if !data_dir.join("keycheck.json").exists() {
        anyhow::bail!("{} is not a carevault data directory (no keycheck.json)", data_dir.display());
    }
    if matches!(args.command, KeysCommand::LogKey) {
        let state = carevault::keystore::KeyState::load(&data_dir)?;
        let keys: Vec<String> = state.log_verifiers().iter().map(|v| v.to_vkey()).collect();
        return print_log_keys(args.json, &keys);
    }
    let source = super::key_source(&args.custody, &key_dir)?;
    let store = super::store(args.dirs.store.as_deref(), &data_dir)?;
    if matches!(args.command, KeysCommand::Status) {
        return offline_status(args, &data_dir, key_dir, source, store).await;
    }
    let config = ServiceConfig { key_source: Some(source), store, ..ServiceConfig::new(data_dir, key_dir) };
    // The issuer key is not needed offline, but `open` reads it; an absent one is an error worth seeing.
    let service = server::open(&config, OpenOptions::system())
        .await
        .context("cannot open the data directory (is a server running on it?)")?;
    let app = service.edge.app().clone();
    let user = std::env::var("USER").unwrap_or_else(|_| "operator".into());
    let result = offline_command(&app, &user, args).await;
    drop(app); // the sequencer stops once every handle is gone
    service.close().await;
    result
}

/// Offline status reads a private copy of the data directory (sled writes on
/// every open), so the directory is left exactly as it was; and, changing
/// nothing, it appends no audit entry either.
async fn offline_status(
    args: &KeysArgs,
    data_dir: &std::path::Path,
    key_dir: std::path::PathBuf,
    source: carevault::keystore::KeySource,
    store: carevault::storage::Location,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let copy = snapshot::copy_data_dir(data_dir, None).map_err(super::verify::open_error)?;
    // The copy's own sled database, or the same PostgreSQL database (read
    // only: opening it writes nothing once its schema and genesis exist).
    let store = match store {
        carevault::storage::Location::Sled(_) => carevault::storage::Location::default_for(copy.path()),
        pg => pg,
    };
    let config =
        ServiceConfig { key_source: Some(source), store, ..ServiceConfig::new(copy.path().to_path_buf(), key_dir) };
    let service =
        server::open(&config, OpenOptions::system()).await.context("cannot open the copy of the data directory")?;
    super::verify::note_copy(&copy, started.elapsed(), service.edge.app().store().recovery());
    let status = service.edge.app().key_status_now().await.map_err(app_error);
    service.close().await;
    let s = status_pb(&status?, SystemClock.now_micros());
    print(args.json, &s, || human_status(&s))
}

async fn offline_command(app: &App, user: &str, args: &KeysArgs) -> anyhow::Result<()> {
    let ctx = CallContext::offline(user);
    let now = SystemClock.now_micros();
    match &args.command {
        // `offline` sends status to `offline_status`, which reads a copy.
        KeysCommand::Status | KeysCommand::LogKey => anyhow::bail!("offline status reads a copy of the data directory"),
        KeysCommand::Rotate => {
            let (new_version, previous_primary) =
                app.rotate_master_key(&ctx, Input::ok(())).await.map_err(app_error)?;
            let r = pb::RotateMasterKeyResponse { new_version, previous_primary };
            print(args.json, &r, || {
                format!("v{new_version} is primary (was v{previous_primary}); run `keys rewrap` next")
            })
        }
        KeysCommand::RotateLogKey => {
            let (version, log_key) = app.rotate_log_key(&ctx, Input::ok(())).await.map_err(app_error)?;
            let r = pb::RotateLogKeyResponse { version, log_key };
            print(args.json, &r, || format!("log key v{} signs from now on: {}", r.version, r.log_key))
        }
        KeysCommand::Retire { key_version: version } => {
            app.retire_master_key(&ctx, Input::ok(*version)).await.map_err(app_error)?;
            print(args.json, &pb::RetireMasterKeyResponse { version: *version }, || {
                format!("v{version} retired: it can no longer decrypt")
            })
        }
        KeysCommand::Destroy { key_version: version } => {
            let removed = app.destroy_master_key(&ctx, Input::ok(*version)).await.map_err(app_error)?;
            let r = pb::DestroyMasterKeyResponse { version: *version, material_removed: removed };
            print(args.json, &r, || destroyed_message(*version, removed))
        }
        KeysCommand::RotateBlindIndex { .. } => {
            let job = app.rotate_blind_index(&ctx, Input::ok(())).await.map_err(app_error)?;
            let pb = bar_of(job.total, "records re-indexed");
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let Some(j) = app.blind_index_progress().await.map_err(app_error)? else { continue };
                pb.set_position(j.reindexed);
                if j.state == "completed" {
                    pb.finish_and_clear();
                    let j = blind_pb(&j);
                    return print(args.json, &j, || human_blind(&j));
                }
            }
        }
        KeysCommand::Erase { patient, reason } => {
            let req = EraseRequest { patient: patient_arg(patient)?, reason: reason.trim().to_string() };
            if req.reason.is_empty() {
                anyhow::bail!("--reason is required");
            }
            let r = erasure_pb(
                &app.erase_patient(&ctx, Input::new(Named::patient(Some(req.patient)), Ok(req)))
                    .await
                    .map_err(app_error)?,
            );
            print(args.json, &r, || human_erasure(&r))
        }
        KeysCommand::Reencrypt { patient, max_per_second, .. } => {
            let patient = patient.as_deref().map(patient_arg).transpose()?;
            let req = ReencryptRequest { patient, max_per_second: *max_per_second };
            let job =
                app.start_reencrypt(&ctx, Input::new(Named::patient(req.patient), Ok(req))).await.map_err(app_error)?;
            let pb = bar_of(job.total, "patients re-encrypted");
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let Some(j) = app.reencrypt_progress().await.map_err(app_error)? else { continue };
                pb.set_position(j.done);
                if j.state == "completed" {
                    pb.finish_and_clear();
                    let j = reencrypt_pb(&j, SystemClock.now_micros());
                    return print(args.json, &j, || human_reencrypt(&j));
                }
            }
        }
        KeysCommand::Rewrap { dry_run, max_per_second, .. } => {
            let req = RewrapRequest { dry_run: *dry_run, max_per_second: *max_per_second };
            let job = app.start_rewrap(&ctx, Input::ok(req)).await.map_err(app_error)?;
            if job.state != "running" {
                let j = job_pb(&job, now);
                return print(args.json, &j, || {
                    format!("{}: {} data keys and notes to rewrap to v{}", j.state, j.total, j.target_version)
                });
            }
            let pb = bar(job.total);
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let Some(j) = app.rewrap_progress().await.map_err(app_error)? else { continue };
                pb.set_position(j.done);
                if j.state == "completed" {
                    pb.finish_and_clear();
                    let j = job_pb(&j, SystemClock.now_micros());
                    return print(args.json, &j, || {
                        format!("rewrap complete: {} rewrapped to v{} at {:.0}/s", j.done, j.target_version, j.rate)
                    });
                }
            }
        }
    }
}

/// Prints the log's verifier keys: the signing one (the last), or with
/// `--json` all of them, oldest first.
fn print_log_keys(json: bool, keys: &[String]) -> anyhow::Result<()> {
    let Some(signing) = keys.last() else {
        anyhow::bail!("the log has no log key yet (a server creates it at its first start)")
    };
    if json {
        println!("{}", serde_json::json!({ "log_key": signing, "all": keys }));
    } else {
        println!("{signing}");
    }
    Ok(())
}
