//! `carevault verify`: offline over a stopped data directory, or online by
//! streaming ExportAuditEvents. Either way the pure `audit::verify_chain`
//! recomputes every hash.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, bail};
use carevault::audit::note::{self, Verifier};
use carevault::audit::witness;
use carevault::audit::{Claim, Failure, FailureClass, RawEntry, Report, verify_log};
use carevault::cli::VerifyArgs;
use carevault::proto::v1::ExportAuditEventsRequest;
use carevault::proto::v1::audit_service_client::AuditServiceClient;
use carevault::storage::postgres::PgStore;
use carevault::storage::sled::{SledStore, snapshot};
use carevault::storage::{Backend, Location, Recovery, StorageError, StoredCheckpoint};

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

/// What the log's checkpoints say, gathered before the walk: the claims to
/// hold the entries to, and a checkpoint whose signature failed.
#[derive(Default)]
struct Checkpoints {
    /// Verifier keys: `--log-key`, else the key state's.
    verifiers: Vec<Verifier>,
    claims: Vec<Claim>,
    /// The size of a checkpoint whose signature did not verify.
    bad_signature: Option<u64>,
    /// Said on stderr.
    notes: Vec<String>,
    /// `--witness-key`: witnesses whose cosignatures are required.
    witnesses: Vec<Verifier>,
    /// `--min-witnesses`.
    min_witnesses: usize,
    /// The newest checkpoint cosigned by enough of them: its size and how many.
    witnessed: Option<(u64, usize)>,
    /// Witnesses were required and no checkpoint had enough.
    unwitnessed: bool,
}

/// Cosigned checkpoints read per page while looking for a witnessed one.
const COSIGNED_PAGE: usize = 100;

/// A stored checkpoint as served: its note with the cosignature lines added.
fn served_text(c: &StoredCheckpoint) -> String {
    let text = String::from_utf8_lossy(&c.note).into_owned();
    let Ok(mut n) = note::Note::parse(&text) else { return text };
    n.signatures.extend(c.cosignatures.iter().filter_map(|l| note::Signature::parse_line(l).ok()));
    n.encode()
}

impl Checkpoints {
    /// From `--log-key` (falling back to `stored_keys`) and `--checkpoint` files.
    fn new(args: &VerifyArgs, stored_keys: Vec<Verifier>) -> anyhow::Result<Checkpoints> {
        let mut verifiers = Vec::new();
        for k in &args.log_key {
            verifiers.push(Verifier::parse(k).map_err(|e| anyhow::anyhow!("--log-key: {e}"))?);
        }
        let mut witnesses = Vec::new();
        for k in &args.witness_key {
            witnesses.push(Verifier::parse(k).map_err(|e| anyhow::anyhow!("--witness-key: {e}"))?);
        }
        let min_witnesses = usize::try_from(args.min_witnesses).unwrap_or(usize::MAX);
        let mut out = Checkpoints { verifiers, witnesses, min_witnesses, ..Checkpoints::default() };
        if out.verifiers.is_empty() {
            if !stored_keys.is_empty() {
                out.notes.push(
                    "checking checkpoints with the log keys the store's key state records (pin them with --log-key)"
                        .into(),
                );
            }
            out.verifiers = stored_keys;
        }
        if !out.witnesses.is_empty() && out.verifiers.is_empty() {
            bail!("--witness-key needs the log's key too: give --log-key");
        }
        if !out.witnesses.is_empty() && out.min_witnesses > out.witnesses.len() {
            bail!("--min-witnesses {} is more than the {} --witness-key given", out.min_witnesses, out.witnesses.len());
        }
        for path in &args.checkpoint {
            let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            if out.verifiers.is_empty() {
                bail!("--checkpoint needs the log's key: give --log-key");
            }
            match note::open_checkpoint(&text, &out.verifiers) {
                Ok(c) => out.claims.push(Claim { size: c.size, root: c.root, saved: true }),
                Err(note::NoteError::BadSignature(_)) | Err(note::NoteError::Unsigned) => {
                    let size = note::Note::parse(&text)
                        .ok()
                        .and_then(|n| note::Checkpoint::parse(&n.text).ok())
                        .map_or(0, |c| c.size);
                    out.bad_signature.get_or_insert(size);
                }
                Err(e) => bail!("{}: {e}", path.display()),
            }
        }
        Ok(out)
    }

    /// The log's own newest checkpoint (its note).
    fn stored(&mut self, note_bytes: Option<Vec<u8>>) {
        let Some(bytes) = note_bytes else {
            self.notes.push("the log has no signed checkpoint yet".into());
            return;
        };
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let parsed = note::Note::parse(&text).ok().and_then(|n| note::Checkpoint::parse(&n.text).ok());
        let Some(c) = parsed else {
            self.bad_signature.get_or_insert(0);
            return;
        };
        if self.verifiers.is_empty() {
            self.notes.push(format!(
                "the checkpoint at size {} is checked against the entries, not its signature (give --log-key)",
                c.size
            ));
            self.claims.push(Claim { size: c.size, root: c.root, saved: false });
            return;
        }
        match note::open_checkpoint(&text, &self.verifiers) {
            Ok(c) => self.claims.push(Claim { size: c.size, root: c.root, saved: false }),
            Err(_) => {
                self.bad_signature.get_or_insert(c.size);
            }
        }
    }

    /// Whether cosigned checkpoints are to be looked through.
    fn wants_witnesses(&self) -> bool {
        !self.witnesses.is_empty()
    }

    /// One cosigned checkpoint (as served: its note with the cosignature
    /// lines), newest first; true once the search is over. The first whose
    /// log signature verifies and that enough of the witnesses cosigned is
    /// held to the log like a saved checkpoint; a log signature that does not
    /// verify ends the search as a failure.
    fn consider_cosigned(&mut self, text: &str) -> bool {
        let parsed = note::Note::parse(text).ok().and_then(|n| note::Checkpoint::parse(&n.text).ok().map(|c| (n, c)));
        let Some((n, c)) = parsed else {
            self.bad_signature.get_or_insert(0);
            return true;
        };
        if note::open_checkpoint(text, &self.verifiers).is_err() {
            self.bad_signature.get_or_insert(c.size);
            return true;
        }
        let count = witness::count_cosigners(&n, &self.witnesses);
        if count < self.min_witnesses {
            return false;
        }
        self.claims.push(Claim { size: c.size, root: c.root, saved: true });
        self.witnessed = Some((c.size, count));
        true
    }

    /// With `--witness-key`: looks through a store's cosigned checkpoints,
    /// newest first, a page (`page(before)`) at a time.
    async fn search_store<F, Fut>(&mut self, mut page: F) -> anyhow::Result<()>
    where
        F: FnMut(Option<u64>) -> Fut,
        Fut: std::future::Future<Output = Result<Vec<StoredCheckpoint>, StorageError>>,
    {
        if !self.wants_witnesses() {
            return Ok(());
        }
        let mut before = None;
        'search: loop {
            let found = page(before).await.map_err(open_error)?;
            if found.is_empty() {
                break;
            }
            for c in &found {
                before = Some(c.size);
                if self.consider_cosigned(&served_text(c)) {
                    break 'search;
                }
            }
        }
        self.searched();
        Ok(())
    }

    /// After the search: none found is `unwitnessed`.
    fn searched(&mut self) {
        if self.witnessed.is_none() && self.bad_signature.is_none() {
            self.unwitnessed = true;
        }
    }

    /// The report, with a bad signature (or no witnessed checkpoint) as its
    /// failure if nothing failed before.
    fn finish(&self, mut report: Report) -> Report {
        if report.failure.is_none()
            && let Some(size) = self.bad_signature
        {
            report.failure =
                Some(Failure { sequence: size.saturating_sub(1), class: FailureClass::BadCheckpointSignature });
        }
        if report.failure.is_none() && self.unwitnessed {
            report.failure = Some(Failure { sequence: report.entries_checked, class: FailureClass::Unwitnessed });
        }
        report
    }
}

/// The log verifier keys a stored key state records.
fn stored_log_keys(raw: Option<Vec<u8>>) -> Vec<Verifier> {
    raw.and_then(|r| carevault::keystore::KeyState::from_bytes(&r).ok()).map(|s| s.log_verifiers()).unwrap_or_default()
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
    let (report, cps) = match (location, &args.server) {
        (Some(Location::Postgres(url)), None) => {
            let store = PgStore::open_existing_read_only(&url).await.map_err(open_error)?;
            let keys = store.job(carevault::storage::JobName::KeyState).await.map_err(open_error)?;
            let mut cps = Checkpoints::new(&args, stored_log_keys(keys))?;
            cps.stored(store.checkpoint(None).await.map_err(open_error)?.map(|c| c.note));
            cps.search_store(|before| store.cosigned_checkpoints(before, COSIGNED_PAGE)).await?;
            let (tx, rx) = std::sync::mpsc::sync_channel::<RawEntry>(8192);
            let (expect, from, claims) = (args.expect_head, args.from, cps.claims.clone());
            let verifier = tokio::task::spawn_blocking(move || verify_log(rx, from, expect, &claims));
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
            (verifier.await?, cps)
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
            let keys = store.job(carevault::storage::JobName::KeyState).map_err(open_error)?;
            let mut cps = Checkpoints::new(&args, stored_log_keys(keys))?;
            cps.stored(store.checkpoint_sync(None).map_err(open_error)?.map(|c| c.note));
            cps.search_store(|before| std::future::ready(store.cosigned_checkpoints_sync(before, COSIGNED_PAGE)))
                .await?;
            // The rate reported is the verifier's, not the copy's.
            started = Instant::now();
            let (expect, from, claims) = (args.expect_head, args.from, cps.claims.clone());
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
                let report = verify_log(entries, from, expect, &claims);
                drop(copy);
                report
            })
            .await
            .map(|r| (r, cps))?
        }
        (None, Some(url)) => {
            let token = args.token.clone().context("--server needs --token (or CAREVAULT_TOKEN) with audit.read")?;
            let channel = super::connect(url, &args.tls).await?;
            let mut client = AuditServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
            let mut cps = Checkpoints::new(&args, Vec::new())?;
            let mut req =
                tonic::Request::new(carevault::proto::v1::GetCheckpointRequest { tree_size: 0, cosigned: false });
            req.metadata_mut().insert("authorization", format!("Bearer {token}").parse()?);
            match client.get_checkpoint(req).await {
                Ok(r) => cps.stored(r.into_inner().checkpoint.map(|c| c.note.into_bytes())),
                Err(s) => cps.notes.push(format!("the server gave no checkpoint: {}", s.message())),
            }
            if cps.wants_witnesses() {
                let mut before = 0;
                loop {
                    let mut req = tonic::Request::new(carevault::proto::v1::GetCheckpointRequest {
                        tree_size: before,
                        cosigned: true,
                    });
                    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse()?);
                    let c = match client.get_checkpoint(req).await {
                        Ok(r) => r.into_inner().checkpoint.context("the server answered without a checkpoint")?,
                        Err(s) if s.code() == tonic::Code::NotFound => break,
                        Err(s) => bail!("the server refused to list cosigned checkpoints: {}", s.message()),
                    };
                    before = c.tree_size;
                    if cps.consider_cosigned(&c.note) || before <= 1 {
                        break;
                    }
                }
                cps.searched();
            }
            let start_sequence = args.from.map_or(0, |a| a.sequence.saturating_add(1));
            let mut req = tonic::Request::new(ExportAuditEventsRequest { start_sequence });
            req.metadata_mut().insert("authorization", format!("Bearer {token}").parse()?);
            let mut stream = client.export_audit_events(req).await.context("export refused")?.into_inner();
            let (tx, rx) = std::sync::mpsc::sync_channel::<RawEntry>(8192);
            let (expect, from, claims) = (args.expect_head, args.from, cps.claims.clone());
            let verifier = tokio::task::spawn_blocking(move || verify_log(rx, from, expect, &claims));
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
            (verifier.await?, cps)
        }
        _ => bail!("give exactly one of --data-dir (or --store) or --server"),
    };
    if let Some(err) = read_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
        bail!("could not read the whole chain: {err}");
    }
    let report = cps.finish(report);
    for n in &cps.notes {
        eprintln!("note: {n}");
    }
    if args.from.is_some() && !cps.claims.is_empty() {
        eprintln!("note: with --from the Merkle tree is not recomputed, so checkpoints are not checked");
    }
    print_report(&report, cps.witnessed, started.elapsed().as_secs_f64(), args.json);
    Ok(if report.is_ok() { 0 } else { 1 })
}

fn print_report(r: &Report, witnessed: Option<(u64, usize)>, secs: f64, json: bool) {
    let rate = if secs > 0.0 { r.entries_checked as f64 / secs } else { 0.0 };
    let head = r.head.map(|(s, h)| format!("{s}:{}", hex::encode(h)));
    if json {
        let v = serde_json::json!({
            "ok": r.is_ok(),
            "entries_checked": r.entries_checked,
            "head": head,
            "entries_per_second": rate.round(),
            "time_warnings": r.time_warnings,
            "tree_size": r.tree.map(|t| t.0),
            "tree_root": r.tree.map(|t| b64(&t.1)),
            "checkpoints_checked": r.checkpoints_checked,
            "witnessed": witnessed.map(|(size, n)| serde_json::json!({"tree_size": size, "witnesses": n})),
            "failure": r.failure.as_ref().map(|f| serde_json::json!({"sequence": f.sequence, "class": f.class.as_str()})),
        });
        println!("{v}");
        return;
    }
    for seq in &r.time_warnings {
        println!("warning: entry {seq} has a time earlier than the entry before it");
    }
    match &r.failure {
        None => {
            println!(
                "OK: {} entries verified; head {}; {:.0} entries/s",
                r.entries_checked,
                head.unwrap_or_default(),
                rate
            );
            if let Some((size, root)) = r.tree {
                println!("tree: size {size}, root {}", b64(&root));
            }
            for size in &r.checkpoints_checked {
                println!("checkpoint at size {size}: signature and root verified");
            }
            if let Some((size, n)) = witnessed {
                println!("checkpoint at size {size}: cosigned by {n} of the given witnesses");
            }
        }
        Some(f) => println!(
            "FAILED at sequence {}: {} ({}); {} entries verified before it",
            f.sequence,
            f.class.describe(),
            f.class.as_str(),
            r.entries_checked
        ),
    }
}

fn b64(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}
