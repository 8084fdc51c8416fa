//! Blind-index key rotation: build the new index beside the old one online,
//! switch searches over when it is complete, drop the old one.
//!
//! Index entries live in one of two slots, told apart by the first byte of
//! the `blind` key (index kind 1-3 in slot 0, 17-19 in slot 1; see
//! `Keyring::blind_tag`). The job (`keys.blind_index_*` audit entries, state
//! JSON under `Jblind` in the `access` tree, cursor persisted per batch):
//!
//! 1. **start**: with writes paused for a moment (the wrap gate, exclusive),
//!    the key state gains `blind_index_next` = the primary version; from then
//!    on every write indexes its record in both slots.
//! 2. **building**: every record's current version is opened and re-indexed
//!    (its index set replaced by one holding both slots), in batches applied
//!    only if the record and its index set are unchanged since read.
//! 3. **switch**: with writes paused again, `blind_index_version` becomes the
//!    new version and `blind_index_slot` the other slot; searches use it from
//!    the next request. `blind_index_previous` remembers the old version.
//! 4. **dropping**: every old-slot entry is removed, in batches; then the
//!    old version no longer keys anything and may be retired.

use serde::{Deserialize, Serialize};

use super::call::Input;
use super::jobs::{job_advance, job_write};
use super::{App, CallContext, internal};
use crate::audit::AuditEntry;
use crate::crypto::RecordKind;
use crate::domain::{Action, CoverageId, Outcome, PatientId};
use crate::error::AppError;
use crate::storage::{Change, Commit, CommitOutcome, JobName, RecordRef};

/// Records (building) or index owners (dropping) per batch.
const BATCH: usize = 128;

/// Where the job state is stored.
const JOB: JobName = JobName::BlindIndex;

/// The persisted job state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BlindIndexJob {
    /// Job id (UUID v7).
    pub id: String,
    /// "building", "dropping" or "completed".
    pub state: String,
    /// The version the old index is keyed by.
    pub from: u32,
    /// The version the new index is keyed by.
    pub to: u32,
    /// Last key (hex) handled in the current phase.
    pub cursor: Option<String>,
    /// Records re-indexed.
    pub reindexed: u64,
    /// Records when the job started.
    pub total: u64,
    /// Old-slot entries removed.
    pub dropped: u64,
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

/// One batch: its changes, the last record it covered (`None`: the phase
/// is done) and how many records or entries it handled.
type Step = (Vec<Change>, Option<RecordRef>, u64);

/// The job's cursor: hex of the record's kind tag and id.
fn cursor_of(r: RecordRef) -> String {
    let mut k = vec![r.kind.tag()];
    k.extend_from_slice(&r.id);
    hex::encode(k)
}

fn after(cursor: &Option<String>) -> Result<Option<RecordRef>, AppError> {
    let Some(c) = cursor else { return Ok(None) };
    let k = hex::decode(c).map_err(|_| AppError::DataLoss)?;
    let id: [u8; 16] = k.get(1..).and_then(|b| b.try_into().ok()).ok_or(AppError::DataLoss)?;
    RecordRef::from_tag(k[0], id).map(Some).ok_or(AppError::DataLoss)
}

impl App {
    /// The job's state without an audit entry (status reports, the offline CLI).
    pub async fn blind_index_progress(&self) -> Result<Option<BlindIndexJob>, AppError> {
        self.job_state(JOB).await
    }

    /// The job's progress (audited).
    pub async fn get_blind_index_job(
        &self,
        ctx: &CallContext,
        input: Input<()>,
    ) -> Result<Option<BlindIndexJob>, AppError> {
        self.audited_job_state(ctx, input, JOB).await
    }

    /// Starts rotating the blind-index key to the primary version. A running job is returned as is.
    pub async fn rotate_blind_index(&self, ctx: &CallContext, input: Input<()>) -> Result<BlindIndexJob, AppError> {
        let mut call = self.call(ctx, Action::KeysBlindIndexRotate, input.named).await;
        let gate = self.keys.wrap_gate.write().await;
        let mut staged = None;
        let result = async {
            call.accept(input.parsed)?;
            let now = self.now();
            let (job, start) = match self.blind_index_progress().await? {
                Some(job) if job.state != "completed" => (job, false),
                _ => {
                    let state = self.keys.state();
                    let to = state.primary;
                    if to == state.blind_index_version {
                        return Err(AppError::FailedPrecondition(
                            "the blind index is already keyed by the primary version; rotate the master key first",
                        ));
                    }
                    let from = state.blind_index_version;
                    // Writes index into both slots from the commit on (in every process).
                    let next = self.stage_key_state(move |s| s.blind_index_next = Some(to)).await?;
                    call.stage(next.change.clone());
                    staged = Some(next);
                    let job = BlindIndexJob {
                        id: uuid::Uuid::now_v7().to_string(),
                        state: "building".into(),
                        from,
                        to,
                        cursor: None,
                        reindexed: 0,
                        total: self.store.count_records().await.map_err(internal)?,
                        dropped: 0,
                        started_at: now,
                        finished_at: None,
                        started_by: ctx.subject().unwrap_or_default().to_string(),
                        lease: None,
                    };
                    (job, true)
                }
            };
            call.entry.key_version = job.to;
            call.entry.details = vec![
                format!("job={}", job.id),
                format!("from_version={}", job.from),
                format!("to_version={}", job.to),
                format!("total={}", job.total),
            ];
            if start {
                call.stage(job_write(JOB, &job)?);
            }
            Ok((job, start))
        }
        .await;
        let committed = call.finish(result).await;
        if let (Ok(_), Some(staged)) = (&committed, staged) {
            self.install_key_state(staged);
        }
        drop(gate);
        let (job, start) = committed?;
        if start {
            self.spawn_job("blind-index", |app| async move { app.run_blind_index().await });
        }
        Ok(job)
    }

    /// Continues an interrupted job (called from `resume_jobs`).
    pub(super) async fn resume_blind_index(&self) {
        if let Ok(Some(job)) = self.blind_index_progress().await
            && job.state != "completed"
            && self.may_run(&job.lease)
        {
            tracing::info!(job = %job.id, state = %job.state, "resuming blind-index rotation");
            self.spawn_job("blind-index", |app| async move { app.run_blind_index().await });
        }
    }

    /// Runs the job to completion (one task at a time).
    pub async fn run_blind_index(&self) -> Result<(), AppError> {
        let _only_one = self.blind_lock.lock().await;
        loop {
            let Some((job, read)) = self.job_state_read::<BlindIndexJob>(JOB).await? else { return Ok(()) };
            if job.state == "completed" || !self.may_run(&job.lease) {
                // Done, or another process's runner holds it.
                return Ok(());
            }
            if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
                self.release_job(JOB, job, read, Action::KeysBlindIndexBatch).await;
                return Ok(());
            }
            // The key state the batch's index keys come from, checked at commit.
            self.refresh_keys().await?;
            let guard = self.keys.raw();
            let (action, mut changes, mut next) = match job.state.as_str() {
                "building" => {
                    let (changes, last, n) = self.reindex_batch(&job).await?;
                    let mut next = job.clone();
                    next.reindexed += n;
                    match last {
                        Some(r) => next.cursor = Some(cursor_of(r)),
                        None => {
                            self.switch_blind_index(&job).await?;
                            continue;
                        }
                    }
                    (Action::KeysBlindIndexBatch, changes, next)
                }
                "dropping" => {
                    let (changes, last, n) = self.drop_batch(&job).await?;
                    let mut next = job.clone();
                    next.dropped += n;
                    match last {
                        Some(r) => next.cursor = Some(cursor_of(r)),
                        None => {
                            next.state = "completed".into();
                            next.cursor = None;
                            next.finished_at = Some(self.now());
                        }
                    }
                    let action = if next.state == "completed" {
                        Action::KeysBlindIndexComplete
                    } else {
                        Action::KeysBlindIndexBatch
                    };
                    (action, changes, next)
                }
                _ => return Ok(()),
            };
            next.lease = (next.state != "completed").then(|| self.lease());
            changes.push(job_advance(JOB, &next, read)?);
            let entry = job_entry(action, &next);
            let committed = if next.state == "completed" {
                // The old index is gone: the key state says so with the completion entry.
                self.commit_key_state(entry, changes, |s| s.blind_index_previous = None).await?
            } else {
                changes.push(Change::KeyStateIs(guard));
                self.store.commit(Commit { entry, write: None, changes }).await.map_err(internal)?
            };
            match committed.outcome {
                CommitOutcome::Written if next.state == "completed" => {
                    tracing::info!(job = %next.id, "blind-index rotation completed");
                    return Ok(());
                }
                // A record changed under the batch, or the key state did
                // (taken up at the top): read it again.
                _ => continue,
            }
        }
    }

    /// Phase 3: searches move to the new index (writes paused for the switch).
    async fn switch_blind_index(&self, job: &BlindIndexJob) -> Result<(), AppError> {
        let _gate = self.keys.wrap_gate.write().await;
        let mut next = job.clone();
        next.state = "dropping".into();
        next.cursor = None;
        next.lease = Some(self.lease());
        let changes = vec![job_write(JOB, &next)?];
        let entry = job_entry(Action::KeysBlindIndexSwitch, &next);
        let (to, from) = (job.to, job.from);
        // Searches in every process use the new slot from this commit on.
        self.commit_key_state(entry, changes, move |s| {
            if s.blind_index_next == Some(to) {
                s.blind_index_version = to;
                s.blind_index_slot = 1 - s.blind_index_slot;
                s.blind_index_next = None;
                s.blind_index_previous = Some(from);
            }
        })
        .await?;
        Ok(())
    }

    /// Phase 2: the next records after the cursor, re-indexed in both slots.
    async fn reindex_batch(&self, job: &BlindIndexJob) -> Result<Step, AppError> {
        let mut changes = Vec::new();
        let mut last = None;
        let mut n = 0u64;
        for (record, head) in self.store.heads_after(None, after(&job.cursor)?, BATCH).await.map_err(internal)? {
            last = Some(record);
            let keys = match record.kind {
                RecordKind::Patient => {
                    let p = PatientId::from_bytes(record.id);
                    match self.load_patient(p).await {
                        Ok(o) => self.patient_index_keys(p, &o.record.data),
                        // Erased or removed since the scan: nothing to index.
                        Err(AppError::NotFound(_) | AppError::Erased(_)) => continue,
                        Err(e) => return Err(e),
                    }
                }
                RecordKind::Coverage => {
                    let c = CoverageId::from_bytes(record.id);
                    match self.load_coverage(c).await {
                        Ok(o) => self.coverage_index_keys(c, o.patient, &o.record),
                        Err(AppError::NotFound(_) | AppError::Erased(_)) => continue,
                        Err(e) => return Err(e),
                    }
                }
            };
            let current = self.store.index_set(record).await.map_err(internal)?;
            changes.push(Change::IndexSet { record, keys, expect: current, expect_head: Some(head) });
            n += 1;
        }
        Ok((changes, last, n))
    }

    /// Phase 4: old-slot entries of the next index owners after the cursor, removed.
    async fn drop_batch(&self, job: &BlindIndexJob) -> Result<Step, AppError> {
        let keep = self.keys.state().blind_index_slot;
        let mut changes = Vec::new();
        let mut last = None;
        let mut n = 0u64;
        for (record, set) in self.store.index_sets_after(after(&job.cursor)?, BATCH).await.map_err(internal)? {
            last = Some(record);
            let (kept, gone): (Vec<_>, Vec<_>) = set.iter().copied().partition(|k| k.slot() == keep);
            if gone.is_empty() {
                continue;
            }
            n += super::count(gone.len());
            changes.push(Change::IndexSet { record, keys: kept, expect: Some(set), expect_head: None });
        }
        Ok((changes, last, n))
    }

    /// Index entries per master version (by slot: the current index, the one
    /// being built, or the one being dropped).
    pub(super) async fn index_entries_by_version(&self) -> Result<Vec<(u32, u64)>, AppError> {
        let state = self.keys.state();
        let per_slot = self.store.index_entries_per_slot().await.map_err(internal)?;
        let current = usize::from(state.blind_index_slot & 1);
        let mut out = vec![(state.blind_index_version, per_slot[current])];
        if let Some(other) = state.blind_index_next.or(state.blind_index_previous) {
            out.push((other, per_slot[1 - current]));
        }
        Ok(out)
    }
}

fn job_entry(action: Action, job: &BlindIndexJob) -> AuditEntry {
    AuditEntry {
        actor: "carevault".into(),
        action: action.as_str().into(),
        resource_type: action.resource_type().as_str().into(),
        outcome: Outcome::Ok.as_str().into(),
        key_version: job.to,
        details: vec![
            format!("job={}", job.id),
            format!("state={}", job.state),
            format!("from_version={}", job.from),
            format!("to_version={}", job.to),
            format!("reindexed={}", job.reindexed),
            format!("total={}", job.total),
            format!("dropped={}", job.dropped),
            format!("started_by={}", job.started_by),
        ]
        .into_iter()
        .chain(job.lease.as_ref().map(|l| format!("runner={}", l.holder)))
        .collect(),
        ..AuditEntry::default()
    }
}
