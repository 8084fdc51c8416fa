//! The re-encryption job (`keys reencrypt`), for a suspected data-key
//! compromise: each patient gets the next generation of its data key, and
//! every stored version of the patient and its coverages is opened with the
//! old key and sealed again with the new one (fresh nonces, fresh one-time
//! keys, associated data naming the new generation).
//!
//! Like the rewrap job it runs in batches (up to [`BATCH`] patients), each
//! one sequencer commit carrying the new wrapped keys and ciphertexts (each
//! applied only if unchanged since read), the job state with its cursor and
//! a `keys.reencrypt_batch` audit entry, so a crash resumes from the cursor.
//! A batch holds the key manager's wrap gate exclusively from its first read
//! to its commit, so no write can add a ciphertext under a key generation
//! the batch is replacing; writes wait a few milliseconds, none fails.
//! Reads are not gated: one that read the old key just before a batch
//! committed finds the new ciphertext, and reads again (see `App::load_patient`).

use std::time::Instant;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::call::Input;
use super::jobs::{job_advance, job_write, throttle};
use super::{App, CallContext, internal};
use crate::audit::AuditEntry;
use crate::crypto::{self, RecordAad, WrappedDataKey};
use crate::domain::{Action, Outcome, PatientId};
use crate::error::AppError;
use crate::storage::{Change, Commit, CommitOutcome, Expect, JobName, RecordRef};

/// Patients per batch.
const BATCH: usize = 32;

/// Where the job state is stored.
const JOB: JobName = JobName::Reencrypt;

/// The persisted job state (JSON).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReencryptJob {
    /// Job id (UUID v7).
    pub id: String,
    /// "running" or "completed".
    pub state: String,
    /// One patient (UUID), or `None` for all.
    pub patient: Option<String>,
    /// Last patient id (hex) done; `None` before the first batch.
    pub cursor: Option<String>,
    /// Patients re-encrypted so far.
    pub done: u64,
    /// Patients to do when the job started.
    pub total: u64,
    /// Record versions re-sealed so far.
    pub record_versions: u64,
    /// Patients per second at most (0: unlimited).
    pub max_per_second: u32,
    /// µs.
    pub started_at: i64,
    /// µs, when completed.
    pub finished_at: Option<i64>,
    /// Who started it.
    pub started_by: String,
    /// The process running it, and until when (absent: nobody; see `jobs::Lease`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<super::jobs::Lease>,
}

impl ReencryptJob {
    /// Patients per second since the start, at `now` (µs).
    pub fn rate(&self, now: i64) -> f64 {
        let end = self.finished_at.unwrap_or(now);
        let secs = (end - self.started_at) as f64 / 1e6;
        if secs > 0.0 { self.done as f64 / secs } else { 0.0 }
    }
}

/// What `StartReencrypt` asks for.
pub struct ReencryptRequest {
    /// One patient, or all.
    pub patient: Option<PatientId>,
    /// Patients per second at most (0: unlimited).
    pub max_per_second: u32,
}

/// One batch: its writes, how many patients and record versions, and the last patient.
struct Batch {
    writes: Vec<Change>,
    patients: u64,
    versions: u64,
    last: Option<[u8; 16]>,
}

impl App {
    /// Starts the job. A running job is returned as is.
    pub async fn start_reencrypt(
        &self,
        ctx: &CallContext,
        input: Input<ReencryptRequest>,
    ) -> Result<ReencryptJob, AppError> {
        let mut call = self.call(ctx, Action::KeysReencrypt, input.named).await;
        let result = async {
            let req = call.accept(input.parsed)?;
            let now = self.now();
            let (job, start) = match self.reencrypt_progress().await? {
                Some(job) if job.state == "running" => (job, false),
                _ => {
                    let total = match req.patient {
                        Some(p) => {
                            if self.store.data_key(p.bytes()).await.map_err(internal)?.is_none() {
                                return Err(self.missing(RecordRef::patient(p.bytes())).await);
                            }
                            1
                        }
                        None => self.store.count_data_keys().await.map_err(internal)?,
                    };
                    let job = ReencryptJob {
                        id: uuid::Uuid::now_v7().to_string(),
                        state: "running".into(),
                        patient: req.patient.map(|p| p.to_string()),
                        cursor: None,
                        done: 0,
                        total,
                        record_versions: 0,
                        max_per_second: req.max_per_second,
                        started_at: now,
                        finished_at: None,
                        started_by: ctx.subject().unwrap_or_default().to_string(),
                        lease: None,
                    };
                    (job, true)
                }
            };
            call.entry.details = super::jobs::start_details(&job.id, &job.state, job.total, job.max_per_second);
            if start {
                call.stage(job_write(JOB, &job)?);
            }
            Ok((job, start))
        }
        .await;
        let (job, start) = call.finish(result).await?;
        if start {
            self.spawn_job("reencrypt", |app| async move { app.run_reencrypt().await });
        }
        Ok(job)
    }

    /// The job's state without an audit entry (status reports, the offline CLI's progress bar).
    pub async fn reencrypt_progress(&self) -> Result<Option<ReencryptJob>, AppError> {
        self.job_state(JOB).await
    }

    /// The job's progress (audited like every call).
    pub async fn get_reencrypt_job(
        &self,
        ctx: &CallContext,
        input: Input<()>,
    ) -> Result<Option<ReencryptJob>, AppError> {
        self.audited_job_state(ctx, input, JOB).await
    }

    /// Continues an interrupted job (called from `resume_jobs`).
    pub(super) async fn resume_reencrypt(&self) {
        if let Ok(Some(job)) = self.reencrypt_progress().await
            && job.state == "running"
            && self.may_run(&job.lease)
        {
            tracing::info!(job = %job.id, done = job.done, total = job.total, "resuming re-encryption job");
            self.spawn_job("reencrypt", |app| async move { app.run_reencrypt().await });
        }
    }

    /// Runs the job to completion (one task at a time).
    pub async fn run_reencrypt(&self) -> Result<(), AppError> {
        let _only_one = self.reencrypt_lock.lock().await;
        loop {
            let Some((job, read)) = self.job_state_read::<ReencryptJob>(JOB).await? else { return Ok(()) };
            if job.state != "running" || !self.may_run(&job.lease) {
                // Done, or another process's runner holds it.
                return Ok(());
            }
            if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
                self.release_job(JOB, job, read, Action::KeysReencryptBatch).await;
                return Ok(());
            }
            let started = Instant::now();
            self.refresh_keys().await?;
            let guard = self.keys.raw();
            let gate = self.keys.wrap_gate.write().await;
            let batch = self.reencrypt_batch(&job).await?;
            let mut next = job.clone();
            next.done = next.done.saturating_add(batch.patients);
            next.record_versions = next.record_versions.saturating_add(batch.versions);
            match (batch.last, &job.patient) {
                (Some(last), None) if batch.patients == u64::try_from(BATCH).unwrap_or(u64::MAX) => {
                    next.cursor = Some(hex::encode(last));
                }
                _ => {
                    next.state = "completed".into();
                    next.finished_at = Some(self.now());
                }
            }
            let finished = next.state == "completed";
            next.lease = (!finished).then(|| self.lease());
            let mut changes = batch.writes;
            changes.push(job_advance(JOB, &next, read)?);
            changes.push(Change::KeyStateIs(guard));
            let entry = AuditEntry {
                actor: "carevault".into(),
                action: if finished { Action::KeysReencryptComplete } else { Action::KeysReencryptBatch }
                    .as_str()
                    .into(),
                key_version: self.keys.ring().primary_version(),
                resource_type: "key".into(),
                outcome: Outcome::Ok.as_str().into(),
                patient_id: job.patient.clone().unwrap_or_default(),
                details: vec![
                    format!("job={}", next.id),
                    format!("batch={}", batch.patients),
                    format!("record_versions={}", batch.versions),
                    format!("done={}", next.done),
                    format!("total={}", next.total),
                    format!("state={}", next.state),
                    format!("started_by={}", next.started_by),
                    format!("runner={}", self.process_id),
                ],
                ..AuditEntry::default()
            };
            let committed = self.store.commit(Commit { entry, write: None, changes }).await;
            drop(gate);
            let committed = committed.map_err(internal)?;
            if committed.outcome != CommitOutcome::Written {
                // A key changed under the batch (a rewrap batch or an erasure); read it again.
                continue;
            }
            if finished {
                tracing::info!(job = %next.id, done = next.done, "re-encryption job completed");
                return Ok(());
            }
            throttle(started, batch.patients, next.max_per_second).await;
        }
    }

    async fn reencrypt_batch(&self, job: &ReencryptJob) -> Result<Batch, AppError> {
        let mut batch = Batch { writes: Vec::new(), patients: 0, versions: 0, last: None };
        let patients: Vec<([u8; 16], Vec<u8>)> = match &job.patient {
            Some(p) => {
                let id = PatientId::parse(p).ok_or(AppError::DataLoss)?;
                match self.store.data_key(id.bytes()).await.map_err(internal)? {
                    // Erased since the job started: nothing left to do.
                    None => Vec::new(),
                    Some(w) => vec![(id.bytes(), w)],
                }
            }
            None => {
                let start = job.cursor.as_deref().map(super::cursor_id).transpose()?;
                self.store.data_keys_after(start, BATCH).await.map_err(internal)?
            }
        };
        let ring = self.keys.ring();
        let shreds = self.keys.shreds();
        for (patient, wrapped_bytes) in patients {
            let wrapped = WrappedDataKey(wrapped_bytes.clone());
            let old = ring.unwrap_data_key(&patient, &wrapped, &shreds).map_err(super::crypto_failure)?;
            let generation = old.generation().checked_add(1).ok_or(AppError::Internal)?;
            let (new, new_wrapped) =
                ring.fresh_data_key(&patient, generation, &shreds).map_err(super::crypto_failure)?;
            let mut owners = vec![RecordRef::patient(patient)];
            owners
                .extend(self.store.coverages_of(patient).await.map_err(internal)?.into_iter().map(RecordRef::coverage));
            for record in owners {
                for (version, sealed) in self.store.versions(record).await.map_err(internal)? {
                    let aad = RecordAad { kind: record.kind, record_id: record.id, patient_id: patient, version };
                    let plain =
                        Zeroizing::new(crypto::open_record(&old, &aad, &sealed).map_err(super::crypto_failure)?);
                    let resealed = crypto::seal_record(&new, &aad, &plain).map_err(super::crypto_failure)?;
                    batch.writes.push(Change::Reseal { record, version, value: resealed, expect: sealed });
                    batch.versions += 1;
                }
            }
            batch.writes.push(Change::DataKey {
                patient,
                value: Some(new_wrapped.0),
                expect: Expect::Equal(wrapped_bytes),
            });
            batch.patients += 1;
            batch.last = Some(patient);
        }
        Ok(batch)
    }
}
