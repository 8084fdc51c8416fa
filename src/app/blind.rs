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
use super::jobs::job_write;
use super::{App, CallContext, blocking, internal};
use crate::audit::AuditEntry;
use crate::crypto::RecordKind;
use crate::domain::{Action, CoverageId, Outcome, PatientId};
use crate::error::AppError;
use crate::storage::{BLIND_KEY_LEN, Commit, CommitOutcome, MetaTree, MetaWrite};

/// Records (building) or index owners (dropping) per batch.
const BATCH: usize = 128;

/// The `access` tree key of the job state.
const JOB_KEY: &[u8] = b"Jblind";

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
}

/// One batch: its writes, the last key it covered (`None`: the phase is
/// done) and how many records or entries it handled.
type Step = (Vec<MetaWrite>, Option<Vec<u8>>, u64);

fn slot_of(tag: u8) -> u8 {
    tag / 16
}

fn after(cursor: &Option<String>) -> Result<Vec<u8>, AppError> {
    match cursor {
        Some(c) => {
            let mut k = hex::decode(c).map_err(|_| AppError::DataLoss)?;
            k.push(0); // strictly after
            Ok(k)
        }
        None => Ok(Vec::new()),
    }
}

impl App {
    /// The job's state without an audit entry (status reports, the offline CLI).
    pub fn blind_index_progress(&self) -> Result<Option<BlindIndexJob>, AppError> {
        self.job_state(JOB_KEY)
    }

    /// The job's progress (audited).
    pub async fn get_blind_index_job(
        &self,
        ctx: &CallContext,
        input: Input<()>,
    ) -> Result<Option<BlindIndexJob>, AppError> {
        self.audited_job_state(ctx, input, JOB_KEY).await
    }

    /// Starts rotating the blind-index key to the primary version. A running job is returned as is.
    pub async fn rotate_blind_index(&self, ctx: &CallContext, input: Input<()>) -> Result<BlindIndexJob, AppError> {
        let mut call = self.call(ctx, Action::KeysBlindIndexRotate, input.named);
        let gate = self.keys.wrap_gate.write().await;
        let result = async {
            call.accept(input.parsed)?;
            let app = self.clone();
            let subject = ctx.subject().unwrap_or_default().to_string();
            let now = self.now();
            let (job, start) = blocking(move || {
                if let Some(job) = app.blind_index_progress()?
                    && job.state != "completed"
                {
                    return Ok((job, false));
                }
                let mut state = app.keys.state();
                let to = state.primary;
                if to == state.blind_index_version {
                    return Err(AppError::FailedPrecondition(
                        "the blind index is already keyed by the primary version; rotate the master key first",
                    ));
                }
                let from = state.blind_index_version;
                state.blind_index_next = Some(to);
                app.keys.apply(state).map_err(super::keys::key_error)?;
                let job = BlindIndexJob {
                    id: uuid::Uuid::now_v7().to_string(),
                    state: "building".into(),
                    from,
                    to,
                    cursor: None,
                    reindexed: 0,
                    total: super::count(app.store.heads.len()),
                    dropped: 0,
                    started_at: now,
                    finished_at: None,
                    started_by: subject,
                };
                Ok((job, true))
            })
            .await?;
            call.entry.key_version = job.to;
            call.entry.details = vec![
                format!("job={}", job.id),
                format!("from_version={}", job.from),
                format!("to_version={}", job.to),
                format!("total={}", job.total),
            ];
            if start {
                call.stage(job_write(JOB_KEY, &job)?);
            }
            Ok((job, start))
        }
        .await;
        let committed = call.finish(result).await;
        drop(gate);
        let (job, start) = committed?;
        if start {
            self.spawn_job("blind-index", |app| async move { app.run_blind_index().await });
        }
        Ok(job)
    }

    /// Continues an interrupted job (called from `resume_jobs`).
    pub(super) fn resume_blind_index(&self) {
        if let Ok(Some(job)) = self.blind_index_progress()
            && job.state != "completed"
        {
            tracing::info!(job = %job.id, state = %job.state, "resuming blind-index rotation");
            self.spawn_job("blind-index", |app| async move { app.run_blind_index().await });
        }
    }

    /// Runs the job to completion (one task at a time).
    pub async fn run_blind_index(&self) -> Result<(), AppError> {
        let _only_one = self.blind_lock.lock().await;
        loop {
            if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
                return Ok(());
            }
            let Some(job) = self.blind_index_progress()? else { return Ok(()) };
            let (action, mut meta, next) = match job.state.as_str() {
                "building" => {
                    let app = self.clone();
                    let j = job.clone();
                    let (meta, last, n) = blocking(move || app.reindex_batch(&j)).await?;
                    let mut next = job.clone();
                    next.reindexed += n;
                    match last {
                        Some(k) => next.cursor = Some(hex::encode(k)),
                        None => {
                            self.switch_blind_index(&job).await?;
                            continue;
                        }
                    }
                    (Action::KeysBlindIndexBatch, meta, next)
                }
                "dropping" => {
                    let app = self.clone();
                    let j = job.clone();
                    let (meta, last, n) = blocking(move || app.drop_batch(&j)).await?;
                    let mut next = job.clone();
                    next.dropped += n;
                    match last {
                        Some(k) => next.cursor = Some(hex::encode(k)),
                        None => {
                            let mut state = self.keys.state();
                            state.blind_index_previous = None;
                            self.keys.apply(state).map_err(super::keys::key_error)?;
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
                    (action, meta, next)
                }
                _ => return Ok(()),
            };
            meta.push(job_write(JOB_KEY, &next)?);
            let committed = self.sequencer.commit(Commit { entry: job_entry(action, &next), write: None, meta }).await;
            match committed.map_err(internal)?.outcome {
                CommitOutcome::Written if next.state == "completed" => {
                    tracing::info!(job = %next.id, "blind-index rotation completed");
                    return Ok(());
                }
                // A record changed under the batch: read it again.
                _ => continue,
            }
        }
    }

    /// Phase 3: searches move to the new index (writes paused for the switch).
    async fn switch_blind_index(&self, job: &BlindIndexJob) -> Result<(), AppError> {
        let _gate = self.keys.wrap_gate.write().await;
        let mut state = self.keys.state();
        state.blind_index_version = job.to;
        state.blind_index_slot = 1 - state.blind_index_slot;
        state.blind_index_next = None;
        state.blind_index_previous = Some(job.from);
        self.keys.apply(state).map_err(super::keys::key_error)?;
        let mut next = job.clone();
        next.state = "dropping".into();
        next.cursor = None;
        let meta = vec![job_write(JOB_KEY, &next)?];
        let entry = job_entry(Action::KeysBlindIndexSwitch, &next);
        self.sequencer.commit(Commit { entry, write: None, meta }).await.map_err(internal)?;
        Ok(())
    }

    /// Phase 2: the next records after the cursor, re-indexed in both slots.
    fn reindex_batch(&self, job: &BlindIndexJob) -> Result<Step, AppError> {
        let mut meta = Vec::new();
        let mut last = None;
        let mut n = 0u64;
        for kv in self.store.heads.range(after(&job.cursor)?..).take(BATCH) {
            let (k, head_value) = kv.map_err(|e| internal(e.into()))?;
            last = Some(k.to_vec());
            let id: [u8; 16] = k.get(1..17).and_then(|s| s.try_into().ok()).ok_or(AppError::DataLoss)?;
            let keys = if k[0] == RecordKind::Patient.tag() {
                let p = PatientId::from_bytes(id);
                match self.load_patient(p) {
                    Ok(o) => self.patient_index_keys(p, &o.record.data),
                    // Erased or removed since the scan: nothing to index.
                    Err(AppError::NotFound(_) | AppError::Erased(_)) => continue,
                    Err(e) => return Err(e),
                }
            } else {
                let c = CoverageId::from_bytes(id);
                match self.load_coverage(c) {
                    Ok(o) => self.coverage_index_keys(c, o.patient, &o.record),
                    Err(AppError::NotFound(_) | AppError::Erased(_)) => continue,
                    Err(e) => return Err(e),
                }
            };
            let old = self.store.blind_owner.get(&k).map_err(|e| internal(e.into()))?.map(|v| v.to_vec());
            let mut all = Vec::with_capacity(keys.len() * BLIND_KEY_LEN);
            for key in &keys {
                all.extend_from_slice(key);
                meta.push(MetaWrite {
                    tree: MetaTree::Blind,
                    key: key.to_vec(),
                    value: Some(Vec::new()),
                    expect: None,
                });
            }
            for stale in old.iter().flat_map(|o| o.chunks(BLIND_KEY_LEN)).filter(|c| !keys.iter().any(|k| &k[..] == *c))
            {
                meta.push(MetaWrite { tree: MetaTree::Blind, key: stale.to_vec(), value: None, expect: None });
            }
            meta.push(MetaWrite { tree: MetaTree::BlindOwner, key: k.to_vec(), value: Some(all), expect: Some(old) });
            meta.push(MetaWrite {
                tree: MetaTree::Heads,
                key: k.to_vec(),
                value: Some(head_value.to_vec()),
                expect: Some(Some(head_value.to_vec())),
            });
            n += 1;
        }
        Ok((meta, last, n))
    }

    /// Phase 4: old-slot entries of the next index owners after the cursor, removed.
    fn drop_batch(&self, job: &BlindIndexJob) -> Result<Step, AppError> {
        let keep = self.keys.state().blind_index_slot;
        let mut meta = Vec::new();
        let mut last = None;
        let mut n = 0u64;
        for kv in self.store.blind_owner.range(after(&job.cursor)?..).take(BATCH) {
            let (k, v) = kv.map_err(|e| internal(e.into()))?;
            last = Some(k.to_vec());
            let (kept, gone): (Vec<&[u8]>, Vec<&[u8]>) =
                v.chunks(BLIND_KEY_LEN).partition(|c| c.first().is_some_and(|t| slot_of(*t) == keep));
            if gone.is_empty() {
                continue;
            }
            n += super::count(gone.len());
            meta.extend(gone.iter().map(|g| MetaWrite {
                tree: MetaTree::Blind,
                key: g.to_vec(),
                value: None,
                expect: None,
            }));
            meta.push(MetaWrite {
                tree: MetaTree::BlindOwner,
                key: k.to_vec(),
                value: Some(kept.concat()),
                expect: Some(Some(v.to_vec())),
            });
        }
        Ok((meta, last, n))
    }

    /// Index entries per master version (by slot: the current index, the one
    /// being built, or the one being dropped).
    pub(super) fn index_entries_by_version(&self) -> Result<Vec<(u32, u64)>, AppError> {
        let state = self.keys.state();
        let mut per_slot = [0u64; 2];
        for kv in self.store.blind.iter().keys() {
            let k = kv.map_err(|e| internal(e.into()))?;
            if let Some(t) = k.first() {
                per_slot[usize::from(slot_of(*t) & 1)] += 1;
            }
        }
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
        resource_type: "key".into(),
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
        ],
        ..AuditEntry::default()
    }
}
