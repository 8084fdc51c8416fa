//! The rewrap job: moves every wrapped data key, then every sealed note, from
//! older master key versions to the primary, while the service keeps serving.
//!
//! The job works in batches. Each batch is one sequencer commit: the new
//! wrapped keys (each applied only if the stored one is still the one that
//! was read), the job's state with its cursor, and a checkpoint audit entry.
//! So a crash loses at most the batch in progress, and a restart resumes from
//! the persisted cursor ([`App::resume_jobs`]). Requests never wait on it:
//! readers unwrap with whichever version a key names, and both are in the
//! keyring until the old one is retired. New patients are wrapped with the
//! primary from the moment it changes, so nothing written during the job is
//! left on an old version.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::call::Input;
use super::jobs::{job_advance, job_write, throttle};
use super::{App, CallContext, internal};
use crate::audit::AuditEntry;
use crate::crypto::WrappedDataKey;
use crate::domain::{Action, Outcome};
use crate::error::AppError;
use crate::storage::{Change, Commit, CommitOutcome, Expect, JobName};

/// Data keys per batch.
const BATCH: usize = 256;

/// Where the job state is stored.
const JOB: JobName = JobName::Rewrap;

/// The persisted job state (JSON).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RewrapJob {
    /// Job id (UUID v7).
    pub id: String,
    /// "running", "completed" or "dry_run".
    pub state: String,
    /// Version everything moves to.
    pub target: u32,
    /// Last patient id (hex) handled in the data-key phase; `None` before the first batch.
    pub cursor: Option<String>,
    /// True once every data key is done and notes are being rewrapped.
    pub notes_phase: bool,
    /// Rewrapped so far.
    pub done: u64,
    /// Not on the target when the job started.
    pub total: u64,
    /// Data keys per second at most (0: unlimited).
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

impl RewrapJob {
    /// Rewraps per second since the start, at `now` (µs).
    pub fn rate(&self, now: i64) -> f64 {
        let end = self.finished_at.unwrap_or(now);
        let secs = (end - self.started_at) as f64 / 1e6;
        if secs > 0.0 { self.done as f64 / secs } else { 0.0 }
    }
}

/// What `StartRewrap` asks for.
pub struct RewrapRequest {
    /// Count only.
    pub dry_run: bool,
    /// Data keys per second at most (0: unlimited).
    pub max_per_second: u32,
}

/// How often a process looks for a running key job nobody here works on.
const JOB_WATCH: std::time::Duration = std::time::Duration::from_secs(5);

impl App {
    /// Data keys and notes not on `target`, plus format-1 data keys on it
    /// (written before erasure buckets; the job rewrites them as format 2).
    async fn rewrap_backlog(&self, target: u32) -> Result<u64, AppError> {
        let mut n = super::count(self.note_versions().await?.into_iter().filter(|v| *v != target).count());
        self.scan_data_keys(None, |_, v| {
            if needs_rewrap(&WrappedDataKey(v), target)? {
                n += 1;
            }
            Ok(true)
        })
        .await?;
        Ok(n)
    }

    /// Starts the job (or counts, for a dry run). A running job is returned as is.
    pub async fn start_rewrap(&self, ctx: &CallContext, input: Input<RewrapRequest>) -> Result<RewrapJob, AppError> {
        let mut call = self.call(ctx, Action::KeysRewrap, input.named).await;
        let result = async {
            let req = call.accept(input.parsed)?;
            let now = self.now();
            let (job, start) = match self.rewrap_progress().await? {
                Some(job) if job.state == "running" => (job, false),
                _ => {
                    let target = self.keys.ring().primary_version();
                    let job = RewrapJob {
                        id: uuid::Uuid::now_v7().to_string(),
                        state: if req.dry_run { "dry_run".into() } else { "running".into() },
                        target,
                        cursor: None,
                        notes_phase: false,
                        done: 0,
                        total: self.rewrap_backlog(target).await?,
                        max_per_second: req.max_per_second,
                        started_at: now,
                        finished_at: req.dry_run.then_some(now),
                        started_by: ctx.subject().unwrap_or_default().to_string(),
                        lease: None,
                    };
                    (job, !req.dry_run)
                }
            };
            call.entry.key_version = job.target;
            call.entry.details = super::jobs::start_details(&job.id, &job.state, job.total, job.max_per_second);
            if start {
                call.stage(job_write(JOB, &job)?);
            }
            Ok((job, start))
        }
        .await;
        let (job, start) = call.finish(result).await?;
        if start {
            self.spawn_job("rewrap", |app| async move { app.run_rewrap().await });
        }
        Ok(job)
    }

    /// The job's state, if a job ever ran, without an audit entry (status
    /// reports, the offline CLI's progress bar).
    pub async fn rewrap_progress(&self) -> Result<Option<RewrapJob>, AppError> {
        self.job_state(JOB).await
    }

    /// The job's progress (audited like every call).
    pub async fn get_rewrap_job(&self, ctx: &CallContext, input: Input<()>) -> Result<Option<RewrapJob>, AppError> {
        self.audited_job_state(ctx, input, JOB).await
    }

    /// Continues a job interrupted by a stop or crash, settles a key
    /// operation and finishes any erasure a crash interrupted. Called once
    /// the server runs.
    pub fn resume_jobs(&self) {
        let app = self.clone();
        tokio::spawn(async move {
            if let Err(e) = app.settle_key_operation().await {
                tracing::error!(error = %e, "settling an interrupted key operation failed; it is retried at the next start");
            }
            if let Err(e) = app.finish_erasures().await {
                tracing::error!(error = %e, "finishing an interrupted erasure failed; it is retried at the next start");
            }
        });
        let app = self.clone();
        tokio::spawn(async move {
            app.resume_rewrap().await;
            app.resume_reencrypt().await;
            app.resume_blind_index().await;
        });
    }

    /// Every [`JOB_WATCH`], takes up a running key job that nobody in this
    /// process works on: one started through another process sharing the
    /// database, or one whose runner died (with its process, or on an
    /// error). Two processes on one job take turns batch by batch: a batch
    /// commits only if the job is still where its runner read it.
    pub fn watch_jobs(&self) {
        let app = self.clone();
        tokio::spawn(async move {
            loop {
                if !app.sleep_unless_stopped(JOB_WATCH).await {
                    return;
                }
                // Take up a key state changed through another process, even when idle.
                if let Err(e) = app.refresh_keys().await {
                    tracing::warn!(error = %e, "reading the key state failed");
                }
                // A key operation abandoned by a process that died (not while one runs here).
                let idle = app.key_op_lock.try_lock().is_ok();
                if idle && let Err(e) = app.settle_key_operation().await {
                    tracing::warn!(error = %e, "settling an interrupted key operation failed");
                }
                if app.rewrap_lock.try_lock().is_ok() {
                    app.resume_rewrap().await;
                }
                if app.reencrypt_lock.try_lock().is_ok() {
                    app.resume_reencrypt().await;
                }
                if app.blind_lock.try_lock().is_ok() {
                    app.resume_blind_index().await;
                }
            }
        });
    }

    /// Continues an interrupted rewrap job.
    async fn resume_rewrap(&self) {
        if let Ok(Some(job)) = self.rewrap_progress().await
            && job.state == "running"
            && self.may_run(&job.lease)
        {
            tracing::info!(job = %job.id, done = job.done, total = job.total, "resuming rewrap job");
            self.spawn_job("rewrap", |app| async move { app.run_rewrap().await });
        }
    }

    /// Runs the job to completion. One task at a time: a second caller finds the job's
    /// state advanced by the first, and its conflicting batches are retried.
    pub async fn run_rewrap(&self) -> Result<(), AppError> {
        let _only_one = self.rewrap_lock.lock().await;
        loop {
            let Some((job, read)) = self.job_state_read::<RewrapJob>(JOB).await? else { return Ok(()) };
            if job.state != "running" || !self.may_run(&job.lease) {
                // Done, or another process's runner holds it.
                return Ok(());
            }
            if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
                self.release_job(JOB, job, read, Action::KeysRewrapBatch).await;
                return Ok(());
            }
            let started = Instant::now();
            // Wrapped keys are committed under the gate, so an erasure never
            // sees a key land under a bucket generation it is dropping.
            // Keys as the store's key state has them now (another process may
            // have changed it), checked again at commit.
            self.refresh_keys().await?;
            let guard = self.keys.raw();
            let gate = self.keys.wrap_gate.read().await;
            let (batch, mut next) = self.next_batch(&job).await?;
            let n = u64::try_from(batch.len()).unwrap_or(u64::MAX);
            next.done = next.done.saturating_add(n);
            let finished = next.state == "completed";
            if finished {
                next.finished_at = Some(self.now());
            }
            next.lease = (!finished).then(|| self.lease());
            let mut changes = batch;
            changes.push(job_advance(JOB, &next, read)?);
            changes.push(Change::KeyStateIs(guard));
            let entry = AuditEntry {
                actor: "carevault".into(),
                action: if finished { Action::KeysRewrapComplete } else { Action::KeysRewrapBatch }.as_str().into(),
                resource_type: "key".into(),
                outcome: Outcome::Ok.as_str().into(),
                key_version: next.target,
                details: vec![
                    format!("job={}", next.id),
                    format!("batch={n}"),
                    format!("done={}", next.done),
                    format!("total={}", next.total),
                    format!("started_by={}", next.started_by),
                    format!("runner={}", self.process_id),
                ],
                ..AuditEntry::default()
            };
            let committed = self.store.commit(Commit { entry, write: None, changes }).await.map_err(internal)?;
            drop(gate);
            if committed.outcome != CommitOutcome::Written {
                // A key changed under the batch (a concurrent erase); read it again.
                continue;
            }
            if finished {
                tracing::info!(job = %next.id, done = next.done, "rewrap job completed");
                return Ok(());
            }
            throttle(started, n, next.max_per_second).await;
        }
    }

    /// The next batch of rewrites after the job's cursor, and the job advanced past it.
    async fn next_batch(&self, job: &RewrapJob) -> Result<(Vec<Change>, RewrapJob), AppError> {
        let ring = self.keys.ring();
        let shreds = self.keys.shreds();
        let mut next = job.clone();
        let mut writes = Vec::new();
        if !job.notes_phase {
            let start = match &job.cursor {
                Some(c) => Some(super::cursor_id(c)?),
                None => None,
            };
            let mut last = None;
            self.scan_data_keys(start, |patient, v| {
                last = Some(patient);
                let wrapped = WrappedDataKey(v);
                if !needs_rewrap(&wrapped, job.target)? {
                    return Ok(true);
                }
                let new =
                    ring.rewrap_data_key(&patient, &wrapped, job.target, &shreds).map_err(super::crypto_failure)?;
                writes.push(Change::DataKey { patient, value: Some(new.0), expect: Expect::Equal(wrapped.0) });
                Ok(writes.len() < BATCH)
            })
            .await?;
            match (writes.len() == BATCH, last) {
                (true, Some(k)) => next.cursor = Some(hex::encode(k)),
                _ => next.notes_phase = true,
            }
            return Ok((writes, next));
        }
        let writes = self.rewrap_notes(job.target, BATCH).await?;
        if writes.is_empty() {
            next.state = "completed".into();
        }
        Ok((writes, next))
    }
}

/// A data key not on `target`, or in format 1 (written before erasure buckets).
fn needs_rewrap(w: &WrappedDataKey, target: u32) -> Result<bool, AppError> {
    let format_2 = w.erasure_bucket().map_err(|_| AppError::DataLoss)?.is_some();
    Ok(w.master_version().map_err(|_| AppError::DataLoss)? != target || !format_2)
}
