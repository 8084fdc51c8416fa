//! Key operations: status, rotate, retire, destroy (the rewrap job is in
//! `rewrap.rs`).
//!
//! The live keyring is swapped atomically when the key state changes, so
//! requests in flight keep the keyring they started with and the next ones
//! see the new one. Every change is written to `keycheck.json` (atomic
//! rename) before it takes effect in memory and is audited.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};

use super::call::{Call, Input};
use super::{App, CallContext, blocking, internal};
use crate::audit::AuditEntry;
use crate::crypto::{Keyring, ShredKeys, WrappedDataKey};
use crate::domain::{Action, Outcome};
use crate::error::AppError;
use crate::keystore::{Destroyed, KeyError, KeySource, KeyState, VersionInfo, VersionState};
use crate::storage::{Change, Commit, CommitOutcome, Expect, JobName};

/// Where a key operation's intent is stored (see [`PendingKeyOperation`]).
const KEY_OP: JobName = JobName::KeyOperation;

/// The live keyring, the erasure bucket keys, and the key state behind them.
pub struct KeyManager {
    source: KeySource,
    data_dir: PathBuf,
    state: Mutex<KeyState>,
    ring: RwLock<Arc<Keyring>>,
    shreds: RwLock<Arc<ShredKeys>>,
    /// Held shared by everything that wraps a data key, from the wrap until
    /// its commit is durable (creates, rewrap batches, re-encryption), and
    /// exclusively by an erasure while it moves a bucket to a new generation,
    /// so no key is committed under a generation that is being dropped.
    pub(super) wrap_gate: tokio::sync::RwLock<()>,
}

impl KeyManager {
    /// Wraps an opened keyring, its state and the erasure bucket keys.
    pub fn new(source: KeySource, data_dir: PathBuf, ring: Keyring, state: KeyState, shreds: ShredKeys) -> KeyManager {
        KeyManager {
            source,
            data_dir,
            state: Mutex::new(state),
            ring: RwLock::new(Arc::new(ring)),
            shreds: RwLock::new(Arc::new(shreds)),
            wrap_gate: tokio::sync::RwLock::new(()),
        }
    }

    /// The current keyring.
    pub fn ring(&self) -> Arc<Keyring> {
        self.ring.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The current erasure bucket keys.
    pub fn shreds(&self) -> Arc<ShredKeys> {
        self.shreds.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Persists new erasure bucket keys (atomic rewrite of `erasure-keys`), then makes them live.
    pub(super) fn apply_shreds(&self, next: ShredKeys) -> Result<(), KeyError> {
        crate::keystore::write_erasure_keys(&self.data_dir, &next)?;
        *self.shreds.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        Ok(())
    }

    /// Master versions that wrapped data keys before erasure buckets existed and are not destroyed.
    pub(super) fn pre_erasure_versions_alive(&self) -> Vec<u32> {
        let state = self.state();
        state
            .pre_erasure_versions
            .iter()
            .copied()
            .filter(|v| state.master_keys.get(v).is_some_and(|i| i.state != VersionState::Destroyed))
            .collect()
    }

    pub(super) fn state(&self) -> KeyState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Persists a new state, then makes it live.
    pub(super) fn apply(&self, next: KeyState) -> Result<(), KeyError> {
        let ring = next.keyring(&self.source)?;
        next.write(&self.data_dir)?;
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = next;
        *self.ring.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ring);
        Ok(())
    }
}

/// What depends on one version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VersionUse {
    /// Wrapped data keys.
    pub data_keys: u64,
    /// Current records (patients and coverages) whose data key is under it.
    pub records: u64,
    /// Blind index entries keyed by it.
    pub index_entries: u64,
    /// Sealed notes.
    pub notes: u64,
}

impl VersionUse {
    fn total(&self) -> u64 {
        self.data_keys + self.index_entries + self.notes
    }
}

/// One version in a status report.
#[derive(Debug, Clone)]
pub struct VersionStatus {
    /// Number.
    pub version: u32,
    /// Life-cycle state.
    pub state: VersionState,
    /// Primary for new wraps.
    pub primary: bool,
    /// Dependents.
    pub uses: VersionUse,
}

/// `keys status`.
#[derive(Debug, Clone)]
pub struct KeyStatus {
    /// Every version.
    pub versions: Vec<VersionStatus>,
    /// Primary version.
    pub primary: u32,
    /// Blind-index version.
    pub blind_index_version: u32,
    /// Key source description.
    pub source: String,
    /// The rewrap job, if one ever ran.
    pub job: Option<super::rewrap::RewrapJob>,
    /// The re-encryption job, if one ever ran.
    pub reencrypt_job: Option<super::reencrypt::ReencryptJob>,
    /// The blind-index rotation, if one ever ran.
    pub blind_index_job: Option<super::blind::BlindIndexJob>,
    /// A rotate, retire or destroy whose intent is recorded but whose
    /// completion is not (it was interrupted; the next start settles it).
    pub pending: Option<PendingKeyOperation>,
}

/// Which key operation changes key material or key state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyOperation {
    /// Adds a version and makes it primary.
    Rotate,
    /// Makes a version unable to decrypt.
    Retire,
    /// Removes a retired version's material.
    Destroy,
}

impl KeyOperation {
    fn completion_action(self) -> Action {
        match self {
            KeyOperation::Rotate => Action::KeysRotateComplete,
            KeyOperation::Retire => Action::KeysRetireComplete,
            KeyOperation::Destroy => Action::KeysDestroyComplete,
        }
    }

    /// The name used in audit details and status reports.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyOperation::Rotate => "rotate",
            KeyOperation::Retire => "retire",
            KeyOperation::Destroy => "destroy",
        }
    }
}

/// A key operation between its two audit entries. Rotate, retire and
/// destroy change key files or `keycheck.json`, which the sequencer cannot
/// commit atomically with an entry, so each commits an intent entry (with
/// this record, JSON stored as the key-operation job state) durably before it
/// changes anything, and a completion entry (removing the record) after.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingKeyOperation {
    /// What is being done.
    pub operation: KeyOperation,
    /// The version it adds, retires or destroys.
    pub version: u32,
    /// The request that recorded the intent.
    pub request_id: String,
    /// Who asked.
    pub started_by: String,
    /// When the intent was recorded (µs).
    pub started_at: i64,
}

pub(super) fn key_error(e: KeyError) -> AppError {
    tracing::error!(error = %e, "key operation failed");
    match e {
        KeyError::NotProvisioned(_) => AppError::FailedPrecondition(
            "the new master key version is not provisioned in the key source; provision it there first",
        ),
        _ => AppError::Internal,
    }
}

impl App {
    /// Counts what depends on each master key version (scans keys, heads,
    /// the blind index and notes; no decryption).
    pub(super) async fn key_usage(&self) -> Result<BTreeMap<u32, VersionUse>, AppError> {
        let mut usage: BTreeMap<u32, VersionUse> = BTreeMap::new();
        let mut patient_version: std::collections::HashMap<[u8; 16], u32> = std::collections::HashMap::new();
        self.scan_data_keys(None, |patient, v| {
            let version = WrappedDataKey(v).master_version().map_err(|_| AppError::DataLoss)?;
            usage.entry(version).or_default().data_keys += 1;
            patient_version.insert(patient, version);
            Ok(true)
        })
        .await?;
        let mut after = None;
        loop {
            const PAGE: usize = 1024;
            let page = self.store.heads_after(None, after, PAGE).await.map_err(internal)?;
            for (record, head) in &page {
                after = Some(*record);
                if let Some(version) = patient_version.get(&head.patient_id) {
                    usage.entry(*version).or_default().records += 1;
                }
            }
            if page.len() < PAGE {
                break;
            }
        }
        for (version, n) in self.index_entries_by_version().await? {
            usage.entry(version).or_default().index_entries += n;
        }
        for version in self.note_versions().await? {
            usage.entry(version).or_default().notes += 1;
        }
        Ok(usage)
    }

    /// Key status.
    pub async fn key_status(&self, ctx: &CallContext, input: Input<()>) -> Result<KeyStatus, AppError> {
        let mut call = self.call(ctx, Action::KeysStatus, input.named).await;
        let result = async {
            call.accept(input.parsed)?;
            self.key_status_now().await
        }
        .await;
        call.finish(result).await
    }

    /// The key status as it is now (no audit entry: the callers audit).
    pub async fn key_status_now(&self) -> Result<KeyStatus, AppError> {
        let usage = self.key_usage().await?;
        let state = self.keys.state();
        let versions = state
            .master_keys
            .iter()
            .map(|(v, info)| VersionStatus {
                version: *v,
                state: info.state,
                primary: *v == state.primary,
                uses: usage.get(v).cloned().unwrap_or_default(),
            })
            .collect();
        Ok(KeyStatus {
            versions,
            primary: state.primary,
            blind_index_version: state.blind_index_version,
            source: self.keys.source.describe(),
            job: self.rewrap_progress().await?,
            reencrypt_job: self.reencrypt_progress().await?,
            blind_index_job: self.blind_index_progress().await?,
            pending: self.job_state(KEY_OP).await?,
        })
    }

    /// Adds a master key version and makes it primary.
    pub async fn rotate_master_key(&self, ctx: &CallContext, input: Input<()>) -> Result<(u32, u32), AppError> {
        let _one_at_a_time = self.key_op_lock.lock().await;
        let mut call = self.call(ctx, Action::KeysRotate, input.named).await;
        let result = call.accept(input.parsed).map(|()| {
            let state = self.keys.state();
            let version = state.master_keys.keys().last().copied().unwrap_or(0) + 1;
            call.entry.key_version = version;
            call.entry.details = vec![format!("new_version={version}"), format!("previous_primary={}", state.primary)];
            (version, state.primary)
        });
        let (version, previous) = result.as_ref().map_or((0, 0), |v| *v);
        let intent = self.key_intent(call, result.map(|_| (KeyOperation::Rotate, version))).await?;
        let keys = self.keys.clone();
        let applied = blocking(move || {
            let mut next = keys.state();
            let key = keys.source.create(version).map_err(key_error)?;
            let check = Keyring::new(vec![(version, key)], version, version).map_err(|_| AppError::Internal)?;
            let kcv = check.key_check_value(version).ok_or(AppError::Internal)?;
            next.master_keys.insert(version, VersionInfo { kcv, state: VersionState::Active });
            next.primary = version;
            keys.apply(next).map_err(key_error)
        })
        .await;
        let details = vec![format!("new_version={version}"), format!("previous_primary={previous}")];
        self.key_completion(ctx, intent, applied.as_ref().map(|()| details)).await?;
        applied.map(|()| (version, previous))
    }

    /// Retires a version: refused while anything depends on it.
    pub async fn retire_master_key(&self, ctx: &CallContext, input: Input<u32>) -> Result<u32, AppError> {
        let _one_at_a_time = self.key_op_lock.lock().await;
        let mut call = self.call(ctx, Action::KeysRetire, input.named).await;
        let result = async {
            let version = call.accept(input.parsed)?;
            call.entry.key_version = version;
            let checked = self.retirable(version).await;
            if let Err(AppError::InUse(why)) = &checked {
                call.entry.details = vec![format!("refused={}", why.split(':').nth(1).unwrap_or("").trim())];
            }
            checked.map(|()| (KeyOperation::Retire, version))
        }
        .await;
        let intent = self.key_intent(call, result).await?;
        let (keys, version) = (self.keys.clone(), intent.version);
        let applied = blocking(move || {
            let mut next = keys.state();
            if let Some(i) = next.master_keys.get_mut(&version) {
                i.state = VersionState::Retired;
            }
            keys.apply(next).map_err(key_error)
        })
        .await;
        self.key_completion(ctx, intent, applied.as_ref().map(|()| Vec::new())).await?;
        applied.map(|()| version)
    }

    /// Why `version` cannot be retired now, if it cannot.
    async fn retirable(&self, version: u32) -> Result<(), AppError> {
        let state = self.keys.state();
        let info = state.master_keys.get(&version).ok_or(AppError::NotFound("master key version"))?;
        if info.state != VersionState::Active {
            return Err(AppError::FailedPrecondition("the version is not active"));
        }
        if version == state.primary {
            return Err(AppError::FailedPrecondition("the primary version cannot be retired; rotate first"));
        }
        let uses = self.key_usage().await?.remove(&version).unwrap_or_default();
        if version == state.blind_index_version || state.blind_index_next == Some(version) {
            return Err(AppError::InUse(format!(
                "master key version {version} is still in use: the blind-index key ({} entries) is derived from it; run keys rotate-blind-index first",
                uses.index_entries
            )));
        }
        if uses.total() > 0 {
            return Err(AppError::InUse(format!(
                "master key version {version} is still in use: {} data keys ({} records), {} blind index entries, {} notes; run keys rewrap (and rotate the blind-index key) first",
                uses.data_keys, uses.records, uses.index_entries, uses.notes
            )));
        }
        Ok(())
    }

    /// Destroys a retired version's material.
    pub async fn destroy_master_key(&self, ctx: &CallContext, input: Input<u32>) -> Result<bool, AppError> {
        let _one_at_a_time = self.key_op_lock.lock().await;
        let mut call = self.call(ctx, Action::KeysDestroy, input.named).await;
        let result = call.accept(input.parsed).and_then(|version| {
            call.entry.key_version = version;
            let state = self.keys.state();
            let info = state.master_keys.get(&version).ok_or(AppError::NotFound("master key version"))?;
            match info.state {
                VersionState::Active => {
                    Err(AppError::FailedPrecondition("only a retired version can be destroyed; retire it first"))
                }
                VersionState::Destroyed => Err(AppError::FailedPrecondition("the version is already destroyed")),
                VersionState::Retired => Ok((KeyOperation::Destroy, version)),
            }
        });
        let intent = self.key_intent(call, result).await?;
        let (keys, version) = (self.keys.clone(), intent.version);
        let applied = blocking(move || destroy(&keys, version)).await;
        let details = applied.as_ref().map(|removed| vec![format!("material_removed={removed}")]);
        self.key_completion(ctx, intent, details).await?;
        applied
    }

    /// Commits a key operation's intent entry with its pending record, or
    /// audits why it was refused.
    async fn key_intent(
        &self,
        mut call: Call<'_>,
        decided: Result<(KeyOperation, u32), AppError>,
    ) -> Result<Intent, AppError> {
        let (operation, version) = match decided {
            Ok(v) => v,
            Err(e) => return Err(call.refuse(e).await),
        };
        call.entry.details.insert(0, "phase=intent".into());
        let pending = PendingKeyOperation {
            operation,
            version,
            request_id: call.ctx.request_id.clone(),
            started_by: call.entry.actor.clone(),
            started_at: self.now(),
        };
        let json = serde_json::to_vec(&pending).map_err(|_| AppError::Internal)?;
        // Only one operation at a time: an unsettled one must be settled first.
        call.stage(Change::Job { name: KEY_OP, value: Some(json), expect: Expect::Absent });
        let template = AuditEntry { details: Vec::new(), ..call.entry.clone() };
        match call.commit(None).await {
            Ok(_) => Ok(Intent { operation, version, template }),
            Err(AppError::Conflict { .. }) => Err(AppError::FailedPrecondition(
                "an earlier key operation was interrupted and is not settled yet; restart the server to settle it",
            )),
            Err(e) => Err(e),
        }
    }

    /// Commits a key operation's completion entry (outcome ok, or why it
    /// failed) and removes its pending record.
    async fn key_completion(
        &self,
        ctx: &CallContext,
        intent: Intent,
        applied: Result<Vec<String>, &AppError>,
    ) -> Result<(), AppError> {
        let action = intent.operation.completion_action();
        let (outcome, details) = match applied {
            Ok(details) => (Outcome::Ok, details),
            Err(e) => (e.outcome(), vec!["applied=false".to_string()]),
        };
        let entry =
            AuditEntry { action: action.as_str().into(), outcome: outcome.as_str().into(), details, ..intent.template };
        let changes = vec![Change::Job { name: KEY_OP, value: None, expect: Expect::Anything }];
        let committed = self.store.commit(Commit { entry, write: None, changes }).await;
        self.log(ctx, action, outcome, committed.as_ref().ok().map(|c| c.sequence));
        committed.map(|_| ()).map_err(super::call::audit_unavailable)
    }

    /// Settles a key operation interrupted between its two entries: whether
    /// it took effect is read from the key state (a destroy is finished), and
    /// a completion entry says so. Called once the server runs.
    pub(super) async fn settle_key_operation(&self) -> Result<(), AppError> {
        let _one_at_a_time = self.key_op_lock.lock().await;
        let Some(pending) = self.job_state::<PendingKeyOperation>(KEY_OP).await? else { return Ok(()) };
        let state = self.keys.state();
        let info = state.master_keys.get(&pending.version).map(|i| i.state);
        let mut details = vec!["settled_at_start=true".to_string(), format!("version={}", pending.version)];
        let applied = match pending.operation {
            KeyOperation::Rotate => info.is_some() && state.primary == pending.version,
            KeyOperation::Retire => matches!(info, Some(VersionState::Retired | VersionState::Destroyed)),
            KeyOperation::Destroy => {
                let destroyed = info == Some(VersionState::Destroyed);
                if destroyed {
                    let keys = self.keys.clone();
                    let removed = blocking(move || destroy(&keys, pending.version)).await?;
                    details.push(format!("material_removed={removed}"));
                }
                destroyed
            }
        };
        details.push(format!("applied={applied}"));
        let action = pending.operation.completion_action();
        let entry = AuditEntry {
            actor: "carevault".into(),
            client_address: "local".into(),
            request_id: pending.request_id.clone(),
            action: action.as_str().into(),
            resource_type: action.resource_type().as_str().into(),
            outcome: Outcome::Ok.as_str().into(),
            key_version: pending.version,
            details,
            ..AuditEntry::default()
        };
        let raw = serde_json::to_vec(&pending).map_err(|_| AppError::Internal)?;
        let changes = vec![Change::Job { name: KEY_OP, value: None, expect: Expect::Equal(raw) }];
        let committed = self.store.commit(Commit { entry, write: None, changes }).await.map_err(internal)?;
        if committed.outcome == CommitOutcome::Written {
            tracing::warn!(
                operation = pending.operation.as_str(),
                version = pending.version,
                applied,
                "settled a key operation that was interrupted"
            );
        }
        Ok(())
    }
}

/// A key operation whose intent entry is durable.
struct Intent {
    operation: KeyOperation,
    version: u32,
    /// The intent entry, as the completion entry's template (same request).
    template: AuditEntry,
}

/// Marks `version` destroyed (first, so a crash between the two leaves a
/// "destroyed" version whose material removal is simply repeated), then
/// removes its material. True if carevault removed it itself.
fn destroy(keys: &KeyManager, version: u32) -> Result<bool, AppError> {
    let mut next = keys.state();
    if let Some(i) = next.master_keys.get_mut(&version) {
        i.state = VersionState::Destroyed;
    }
    keys.apply(next).map_err(key_error)?;
    let removed = keys.source.destroy(version).map_err(key_error)?;
    Ok(removed == Destroyed::Removed)
}
