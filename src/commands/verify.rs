//! `carevault verify`: offline over a stopped data directory, or online by
//! streaming ExportAuditEvents. Either way the pure `audit::verify_chain`
//! recomputes every hash.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, bail};
use carevault::audit::{RawEntry, Report, verify_from};
use carevault::cli::VerifyArgs;
use carevault::proto::v1::ExportAuditEventsRequest;
use carevault::proto::v1::audit_service_client::AuditServiceClient;
use carevault::storage::postgres::PgStore;
use carevault::storage::sled::{SledStore, snapshot};
use carevault::storage::{Backend, Location, Recovery, StorageError};

/// A failure to open a stopped data directory, said so a person can act on it.
pub fn open_error(e: StorageError) -> anyhow::Error {
    match e {
        StorageError::Locked => anyhow::anyhow!(
            "the data directory is in use by a running carevault server: stop it first, or verify the live server with --server URL --token T"
        ),
        other => anyhow::anyhow!("cannot open the database: {other}"),
    }
}

/// Says on stderr what inspecting a copy cost, and whether the store needed
/// the repair a restart would make (the copy was repaired, never the original).
pub fn note_copy(copy: &snapshot::Copy, took: std::time::Duration, recovery: Recovery) {
    eprintln!(
        "read a private copy of the database ({} files, {:.1} MiB, copied in {:.2} s); the data directory is unchanged",
        copy.files,
        copy.bytes as f64 / (1024.0 * 1024.0),
        took.as_secs_f64()
    );
    if recovery != Recovery::default() {
        eprintln!(
            "note: the store was not shut down cleanly: a batch of commits was interrupted ({} replayed, {} dropped, none acknowledged); the next server start repairs it the same way. Verified as it is on disk.",
            recovery.replayed, recovery.dropped
        );
    }
}

/// Returns the exit code: 0 verified, 1 failed verification.
pub async fn verify(args: VerifyArgs) -> anyhow::Result<i32> {
    let mut started = Instant::now();
    let read_error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let location = match (&args.store, &args.data_dir) {
        (Some(s), dir) => Some(Location::parse(s, dir.as_deref().unwrap_or(std::path::Path::new(".")))?),
        (None, Some(dir)) => Some(Location::default_for(dir)),
        (None, None) => None,
    };
    let report = match (location, &args.server) {
        (Some(Location::Postgres(url)), None) => {
            let store = PgStore::open_existing_read_only(&url).await.map_err(open_error)?;
            let (tx, rx) = std::sync::mpsc::sync_channel::<RawEntry>(8192);
            let (expect, from) = (args.expect_head, args.from);
            let verifier = tokio::task::spawn_blocking(move || verify_from(rx, from, expect));
            let mut next = from.map_or(0, |a| a.sequence.saturating_add(1));
            'pages: loop {
                match store.audit_entries(next, u64::MAX >> 1, 10_000).await {
                    Ok(page) if page.is_empty() => break,
                    Ok(page) => {
                        for e in page {
                            next = e.sequence.saturating_add(1);
                            if tx.send(e.raw()).is_err() {
                                break 'pages;
                            }
                        }
                    }
                    Err(e) => {
                        *read_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                        break;
                    }
                }
            }
            drop(tx);
            verifier.await?
        }
        (Some(Location::Sled(db)), None) => {
            let (Some(dir), Some(name)) = (db.parent(), db.file_name().and_then(|n| n.to_str())) else {
                bail!("{}: not a database directory", db.display());
            };
            if !db.exists() {
                bail!("{}: no carevault database here", dir.display());
            }
            // sled writes on every open: verify a copy, so the directory is left exactly as it was.
            let copy = snapshot::copy_data_dir(dir, Some(name)).map_err(open_error)?;
            let copied = started.elapsed();
            let store = SledStore::open(&copy.path().join(name), 64 * 1024 * 1024).map_err(open_error)?;
            note_copy(&copy, copied, store.recovery());
            // The rate reported is the verifier's, not the copy's.
            started = Instant::now();
            let (expect, from) = (args.expect_head, args.from);
            let errors = read_error.clone();
            tokio::task::spawn_blocking(move || {
                let first = from.map_or(0, |a| a.sequence.saturating_add(1));
                let entries = store.audit_range(first, u64::MAX).map_while(|r| match r {
                    Ok(e) => Some(e.raw()),
                    Err(err) => {
                        *errors.lock().unwrap_or_else(|p| p.into_inner()) = Some(err.to_string());
                        None
                    }
                });
                let report = verify_from(entries, from, expect);
                drop(copy);
                report
            })
            .await?
        }
        (None, Some(url)) => {
            let token = args.token.clone().context("--server needs --token (or CAREVAULT_TOKEN) with audit.read")?;
            let channel = super::connect(url, &args.tls).await?;
            let mut client = AuditServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
            let start_sequence = args.from.map_or(0, |a| a.sequence.saturating_add(1));
            let mut req = tonic::Request::new(ExportAuditEventsRequest { start_sequence });
            req.metadata_mut().insert("authorization", format!("Bearer {token}").parse()?);
            let mut stream = client.export_audit_events(req).await.context("export refused")?.into_inner();
            let (tx, rx) = std::sync::mpsc::sync_channel::<RawEntry>(8192);
            let (expect, from) = (args.expect_head, args.from);
            let verifier = tokio::task::spawn_blocking(move || verify_from(rx, from, expect));
            loop {
                match stream.message().await {
                    Ok(Some(msg)) => {
                        for e in msg.entries {
                            // A hash of the wrong length cannot match: it is compared as all zeros.
                            let stored_hash = <[u8; 32]>::try_from(e.hash.as_slice()).unwrap_or([0; 32]);
                            if tx.send(RawEntry::stored(e.entry, stored_hash, e.sequence)).is_err() {
                                break;
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        *read_error.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(format!("export stream failed: {}", status.message()));
                        break;
                    }
                }
            }
            drop(tx);
            verifier.await?
        }
        _ => bail!("give exactly one of --data-dir (or --store) or --server"),
    };
    if let Some(err) = read_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
        bail!("could not read the whole chain: {err}");
    }
    print_report(&report, started.elapsed().as_secs_f64(), args.json);
    Ok(if report.is_ok() { 0 } else { 1 })
}

fn print_report(r: &Report, secs: f64, json: bool) {
    let rate = if secs > 0.0 { r.entries_checked as f64 / secs } else { 0.0 };
    let head = r.head.map(|(s, h)| format!("{s}:{}", hex::encode(h)));
    if json {
        let v = serde_json::json!({
            "ok": r.is_ok(),
            "entries_checked": r.entries_checked,
            "head": head,
            "entries_per_second": rate.round(),
            "time_warnings": r.time_warnings,
            "failure": r.failure.as_ref().map(|f| serde_json::json!({"sequence": f.sequence, "class": f.class.as_str()})),
        });
        println!("{v}");
        return;
    }
    for seq in &r.time_warnings {
        println!("warning: entry {seq} has a time earlier than the entry before it");
    }
    match &r.failure {
        None => println!(
            "OK: {} entries verified; head {}; {:.0} entries/s",
            r.entries_checked,
            head.unwrap_or_default(),
            rate
        ),
        Some(f) => println!(
            "FAILED at sequence {}: {} ({}); {} entries verified before it",
            f.sequence,
            f.class.describe(),
            f.class.as_str(),
            r.entries_checked
        ),
    }
}
