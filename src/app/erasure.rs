//! Erasure by crypto-shredding, and the legal hold that blocks it.
//!
//! `ErasePatient` (permission `patients.erase`, with a reason) does this:
//!
//! 1. Refuses while the patient is under a legal hold (`H` · patient in the
//!    `access` tree, set and cleared by `SetLegalHold`, permission
//!    `patients.legal_hold`).
//! 2. With every record write paused (the key manager's wrap gate, held
//!    exclusively for a few milliseconds), gives the patient's erasure bucket
//!    a new key generation (`erasure-keys` rewritten durably), then makes one
//!    sequencer commit (all or nothing across a crash) with the
//!    `patient.erase` audit entry: the removal of the patient's wrapped data key, of every stored version of
//!    the patient and its coverages, of their index entries, and tombstones
//!    (`E` · kind · id) that make later reads answer "erased".
//! 3. Rewraps the bucket's other data keys to the new generation (batches,
//!    each a `keys.erasure_rekey` audit entry) and rewrites `erasure-keys`
//!    without the old generation. From then on nothing in the data directory
//!    can open the old wrapped key, wherever sled's log still holds its bytes.
//!
//! A crash after step 2 leaves a bucket with two generations; the next start
//! finishes step 3 ([`App::finish_erasures`]). The audit trail keeps every
//! entry about the patient (they hold identifiers, never PHI) and verifies.
//!
//! Tombstone (JSON): `{"patient": uuid, "erased_at": µs, "erased_by":
//! subject, "reason": base64 note or null}`. The reason is sealed like a
//! break-glass reason (notes key, context `<patient uuid>/erasure`), only on
//! the patient's tombstone.

use serde::{Deserialize, Serialize};

use super::access::b64;
use super::call::Input;
use super::{App, CallContext, blocking, internal};
use crate::audit::AuditEntry;
use crate::crypto::{self, WrappedDataKey};
use crate::domain::{Action, Outcome, PatientId};
use crate::error::AppError;
use crate::keystore;
use crate::storage::{Change, Commit, CommitOutcome, Expect, RecordRef};

/// Data keys per rekey batch.
const BATCH: usize = 256;

/// An erasure tombstone.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Tombstone {
    pub patient: String,
    pub erased_at: i64,
    pub erased_by: String,
    /// Base64 of the sealed reason (the patient's tombstone only).
    pub reason: Option<String>,
}

/// What an erasure did, and what it cannot promise.
#[derive(Debug, Clone)]
pub struct Erasure {
    /// The patient.
    pub patient: PatientId,
    /// When (µs).
    pub erased_at: i64,
    /// The `patient.erase` audit entry.
    pub audit_sequence: u64,
    /// Coverages erased with the patient.
    pub coverages: u64,
    /// Stored record versions removed (patient and coverages).
    pub record_versions: u64,
    /// Other patients' data keys moved to the bucket's new generation.
    pub rekeyed: u64,
    /// Honest limits: backups, and keys wrapped before erasure buckets existed.
    pub caveats: Vec<String>,
}

/// `ErasePatient` input.
pub struct EraseRequest {
    /// The patient.
    pub patient: PatientId,
    /// Why (sealed; never in the audit entry).
    pub reason: String,
}

impl App {
    /// Places or lifts a legal hold.
    pub async fn set_legal_hold(&self, ctx: &CallContext, input: Input<(PatientId, bool)>) -> Result<bool, AppError> {
        let mut call = self.call(ctx, Action::AccessLegalHold, input.named).await;
        let result = async {
            let (id, hold) = call.accept(input.parsed)?;
            call.entry.details.push(format!("legal_hold={hold}"));
            self.existing(RecordRef::patient(id.bytes())).await?;
            call.stage(Change::LegalHold {
                patient: id.bytes(),
                since: hold.then(|| self.now()),
                expect: Expect::Anything,
            });
            Ok(hold)
        }
        .await;
        call.finish(result).await
    }

    /// Whether a patient is under a legal hold.
    pub(super) async fn on_legal_hold(&self, id: PatientId) -> Result<bool, AppError> {
        Ok(self.store.legal_hold_since(id.bytes()).await.map_err(internal)?.is_some())
    }

    /// Erases a patient by destroying its data key (see the module docs).
    pub async fn erase_patient(&self, ctx: &CallContext, input: Input<EraseRequest>) -> Result<Erasure, AppError> {
        let mut call = self.call(ctx, Action::PatientErase, input.named).await;
        let _one_at_a_time = self.erase_lock.lock().await;
        let mut gate = None;
        let mut staged = None;
        let result = async {
            let req = call.accept(input.parsed)?;
            let id = req.patient;
            call.name_patient(id);
            self.existing(RecordRef::patient(id.bytes())).await?;
            if self.on_legal_hold(id).await? {
                return Err(AppError::FailedPrecondition(
                    "the patient is under a legal hold; compliance must lift it before the patient can be erased",
                ));
            }
            // A bucket left with two generations by a crash is finished first.
            let bucket = self.keys.shreds().bucket_of(&id.bytes());
            self.finish_bucket(bucket).await?;
            gate = Some(self.keys.wrap_gate.write().await);
            let subject = ctx.subject().unwrap_or_default().to_string();
            let (changes, coverages, record_versions, generation, key_version) =
                self.erasure_writes(id, bucket, &req.reason, subject, self.now()).await?;
            // Every process reads erasure-keys again once this commits.
            let next = self.stage_key_state(|_| {}).await?;
            call.stage(next.change.clone());
            staged = Some(next);
            call.entry.key_version = key_version;
            call.entry.details = vec![
                format!("coverages={coverages}"),
                format!("record_versions={record_versions}"),
                format!("erasure_bucket={bucket}"),
                format!("bucket_generation={generation}"),
            ];
            for ch in changes {
                call.stage(ch);
            }
            Ok((id, bucket, coverages, record_versions))
        }
        .await;
        let (id, bucket, coverages, record_versions) = match result {
            Ok(v) => v,
            Err(e) => return Err(call.refuse(e).await),
        };
        let committed = call.commit(None).await;
        if let (Ok(_), Some(staged)) = (&committed, staged) {
            self.install_key_state(staged);
        }
        drop(gate);
        let committed = match committed {
            Ok(c) => c,
            Err(AppError::Conflict { .. }) => {
                return Err(AppError::FailedPrecondition(
                    "the patient was placed under a legal hold or changed while being erased; nothing was erased",
                ));
            }
            Err(e) => return Err(e),
        };
        let rekeyed = self.finish_bucket(bucket).await?;
        self.store.reclaim_erased().await;
        tracing::info!(audit_seq = committed.sequence, rekeyed, "patient erased");
        Ok(Erasure {
            patient: id,
            erased_at: committed.time_micros,
            audit_sequence: committed.sequence,
            coverages,
            record_versions,
            rekeyed,
            caveats: self.erasure_caveats(committed.time_micros),
        })
    }

    /// Moves the patient's bucket to a new generation, then lists what the
    /// erasure commits: everything stored for the patient and its coverages
    /// removed (if they are still exactly what was read), its data key
    /// removed (if unchanged), no hold placed since the check, tombstones.
    async fn erasure_writes(
        &self,
        id: PatientId,
        bucket: u16,
        reason: &str,
        subject: String,
        now: i64,
    ) -> Result<(Vec<Change>, u64, u64, u32, u32), AppError> {
        let keys = self.keys.clone();
        let next = blocking(move || {
            let next = keystore::update_erasure_keys(keys.data_dir(), |now| now.with_next_generation(bucket)).map_err(
                |e| {
                    tracing::error!(error = %e, "writing erasure-keys failed");
                    AppError::Internal
                },
            )?;
            keys.install_shreds(next.clone());
            Ok(next)
        })
        .await?;
        let generation = next.current(bucket).map_err(super::crypto_failure)?.generation();
        let patient = id.bytes();
        let coverages = self.store.coverages_of(patient).await.map_err(internal)?;
        let footprint = self.store.footprint(patient).await.map_err(internal)?;
        let wrapped = self.store.data_key(patient).await.map_err(internal)?;
        let key_version = match &wrapped {
            Some(w) => WrappedDataKey(w.clone()).master_version().map_err(|_| AppError::DataLoss)?,
            None => 0,
        };
        let reason = self
            .keys
            .ring()
            .seal_note(format!("{id}/erasure").as_bytes(), reason.as_bytes())
            .map_err(super::crypto_failure)?;
        let mut changes = vec![
            Change::ErasePatient { patient, coverages: coverages.clone() },
            Change::DataKey { patient, value: None, expect: wrapped.map_or(Expect::Absent, Expect::Equal) },
            // Refused if a hold was placed since the check.
            Change::LegalHold { patient, since: None, expect: Expect::Absent },
        ];
        let mut tomb =
            Tombstone { patient: id.to_string(), erased_at: now, erased_by: subject, reason: Some(b64(&reason)) };
        let value = serde_json::to_vec(&tomb).map_err(|_| AppError::Internal)?;
        changes.push(Change::Tombstone { record: RecordRef::patient(patient), value, expect: Expect::Anything });
        tomb.reason = None;
        let value = serde_json::to_vec(&tomb).map_err(|_| AppError::Internal)?;
        for c in &coverages {
            changes.push(Change::Tombstone {
                record: RecordRef::coverage(*c),
                value: value.clone(),
                expect: Expect::Anything,
            });
        }
        Ok((changes, footprint.coverages, footprint.record_versions, generation, key_version))
    }

    fn erasure_caveats(&self, at: i64) -> Vec<String> {
        let when = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at) * 1000)
            .ok()
            .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
            .unwrap_or_else(|| format!("{at} µs since the epoch"));
        let mut out = vec![format!(
            "backups of the data directory taken before {when} still hold this patient's wrapped data key and the erasure-bucket key that opens it: restoring one restores the patient, so erase the patient again after any restore"
        )];
        out.extend(self.store.erasure_caveat().map(str::to_string));
        let legacy = self.keys.pre_erasure_versions_alive();
        if !legacy.is_empty() {
            let list: Vec<String> = legacy.iter().map(u32::to_string).collect();
            out.push(format!(
                "this store wrapped data keys before erasure buckets existed: copies of this patient's key wrapped that way may remain in the database log, openable with master key version(s) {} until they are retired and destroyed (keys rotate, keys rewrap, keys retire, keys destroy)",
                list.join(", ")
            ));
        }
        out
    }

    /// Finishes any erasure a crash interrupted (a bucket with two
    /// generations). Called once the server runs.
    pub async fn finish_erasures(&self) -> Result<(), AppError> {
        let _one_at_a_time = self.erase_lock.lock().await;
        for (bucket, _) in self.keys.shreds().pending() {
            let n = self.finish_bucket(bucket).await?;
            tracing::info!(bucket, rekeyed = n, "finished an interrupted erasure");
        }
        Ok(())
    }

    /// Moves every data key of `bucket` to its current generation, then drops
    /// the older one from `erasure-keys`. Returns how many keys moved.
    async fn finish_bucket(&self, bucket: u16) -> Result<u64, AppError> {
        let shreds = self.keys.shreds();
        if !shreds.pending().iter().any(|(b, _)| *b == bucket) {
            return Ok(0);
        }
        let target = shreds.current(bucket).map_err(super::crypto_failure)?.generation();
        let mut moved = 0u64;
        loop {
            self.refresh_keys().await?;
            let guard = self.keys.raw();
            let batch = self.rekey_batch(bucket, target).await?;
            if batch.is_empty() {
                break;
            }
            let n = super::count(batch.len());
            let entry = rekey_entry(bucket, target, format!("batch={n}"));
            let mut batch = batch;
            batch.push(Change::KeyStateIs(guard));
            let committed = self.store.commit(Commit { entry, write: None, changes: batch }).await;
            match committed {
                Ok(c) if c.outcome == CommitOutcome::Written => moved += n,
                // A key changed under the batch (a rewrap or a write), or the
                // key state did (taken up at the top): read again.
                Ok(_) => {}
                Err(e) => return Err(super::call::audit_unavailable(e)),
            }
        }
        let keys = self.keys.clone();
        blocking(move || {
            keystore::update_erasure_keys(keys.data_dir(), |now| Ok(now.without_previous(bucket))).map_err(|e| {
                tracing::error!(error = %e, "writing erasure-keys failed");
                AppError::Internal
            })
        })
        .await?;
        // Every process drops the old generation once this commits.
        let entry = rekey_entry(bucket, target, "previous_generation_dropped=true".into());
        self.commit_key_state(entry, Vec::new(), |_| {}).await?;
        Ok(moved)
    }

    /// Up to [`BATCH`] data keys of `bucket` not on generation `target`, rewrapped to it
    /// (same master version), each applied only if unchanged.
    async fn rekey_batch(&self, bucket: u16, target: u32) -> Result<Vec<Change>, AppError> {
        let ring = self.keys.ring();
        let shreds = self.keys.shreds();
        let mut out = Vec::new();
        self.scan_data_keys(None, |patient, v| {
            let wrapped = WrappedDataKey(v);
            match wrapped.erasure_bucket().map_err(|_| AppError::DataLoss)? {
                Some((b, g)) if b == bucket && g != target => {}
                _ => return Ok(true),
            }
            let version = wrapped.master_version().map_err(|_| AppError::DataLoss)?;
            let new = match ring.rewrap_data_key(&patient, &wrapped, version, &shreds) {
                Ok(n) => n,
                Err(crypto::CryptoError::UnknownKeyVersion(_)) => {
                    return Err(AppError::FailedPrecondition(
                        "a data key in the bucket is on a retired master version",
                    ));
                }
                Err(e) => return Err(super::crypto_failure(e)),
            };
            out.push(Change::DataKey { patient, value: Some(new.0), expect: Expect::Equal(wrapped.0) });
            Ok(out.len() < BATCH)
        })
        .await?;
        Ok(out)
    }
}

/// A `keys.erasure_rekey` entry for `bucket` moving to generation `target`.
fn rekey_entry(bucket: u16, target: u32, detail: String) -> AuditEntry {
    AuditEntry {
        actor: "carevault".into(),
        action: Action::ErasureRekey.as_str().into(),
        resource_type: Action::ErasureRekey.resource_type().as_str().into(),
        outcome: Outcome::Ok.as_str().into(),
        details: vec![format!("erasure_bucket={bucket}"), format!("bucket_generation={target}"), detail],
        ..AuditEntry::default()
    }
}
