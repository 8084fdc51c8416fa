//! Key operations: status, rotate, retire, destroy (the rewrap job is in
//! `rewrap.rs`).
//!
//! The key state is stored in the store and changes only in commits with
//! their audit entries (see [`KeyManager`]). The live keyring is swapped
//! atomically once a change commits, so requests in flight keep the keyring
//! they started with (their commits then fail the key-state check and are
//! run again) and the next ones see the new one.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use super::call::{Call, Input};
use super::{App, CallContext, blocking, internal};
use crate::audit::AuditEntry;
use crate::crypto::{Keyring, ShredKeys, WrappedDataKey};
use crate::domain::{Action, Outcome};
use crate::error::AppError;
use crate::keystore::{Destroyed, KeyError, KeySource, KeyState, LocalKeys, VersionInfo, VersionState};
use crate::storage::{Change, Commit, CommitOutcome, Committed, Expect, JobName, StorageError, Store};

/// Where a key operation's intent is stored (see [`PendingKeyOperation`]).
const KEY_OP: JobName = JobName::KeyOperation;

/// Where the key state is stored.
const KEY_STATE: JobName = JobName::KeyState;

/// How many unwrapped data keys a process keeps by default (about 200
/// bytes each).
pub const DEFAULT_KEY_CACHE: usize = 16_384;

/// The keys a process works with, all from one key state: the state, its
/// stored bytes, the keyring built from it and the erasure bucket keys.
pub(super) struct Live {
    /// The key state.
    pub state: KeyState,
    /// Its bytes as stored (what a commit checks it against).
    pub raw: Vec<u8>,
    /// The keyring of its active versions.
    pub ring: Arc<Keyring>,
    /// The erasure bucket keys read with it.
    pub shreds: Arc<ShredKeys>,
}

/// The live keys, and the key state behind them.
///
/// The key state is stored in the store ([`JobName::KeyState`]) and changes
/// only in commits with their audit entries. Every audited call's commit
/// checks that the stored state is still the one its keys came from
/// ([`Change::KeyStateIs`]); if a key operation through another process
/// changed it, the commit is aborted, this process takes the new state up
/// (and reads `erasure-keys` again), and the edge retries the call.
/// `keycheck.json` in the data directory is a copy, written before each
/// change commits, so the next start can check the master keys before the
/// store is opened.
pub struct KeyManager {
    pub(super) source: KeySource,
    pub(super) data_dir: PathBuf,
    live: RwLock<Arc<Live>>,
    /// One refresh at a time.
    refreshing: tokio::sync::Mutex<()>,
    /// Held shared by everything that wraps a data key, from the wrap until
    /// its commit is durable (creates, rewrap batches, re-encryption), and
    /// exclusively by an erasure while it moves a bucket to a new generation,
    /// so no key is committed under a generation that is being dropped.
    pub(super) wrap_gate: tokio::sync::RwLock<()>,
    /// Data keys unwrapped recently; emptied whenever other keys are installed.
    pub(super) data_keys: crate::crypto::DataKeyCache,
}

impl KeyManager {
    /// Takes up the store's key state: checks it against the key source and
    /// `local` (the data directory's, already checked), or records the local
    /// one in the store if the store has none yet (a store from before key
    /// state was stored, or a new one), with a `keys.state_recorded` entry.
    pub async fn load(
        store: &Store,
        source: KeySource,
        data_dir: PathBuf,
        local: LocalKeys,
    ) -> Result<KeyManager, KeyError> {
        let storage = |e: StorageError| KeyError::Store(e.to_string());
        let shreds = Arc::new(local.shreds);
        let mine = local.state;
        let mut local_ring = local.ring;
        for _ in 0..3 {
            if let Some(raw) = store.job(KEY_STATE).await.map_err(storage)? {
                let state = KeyState::from_bytes(&raw)?;
                if let Some(mine) = &mine {
                    for (v, info) in &mine.master_keys {
                        if state.master_keys.get(v).is_some_and(|i| i.kcv != info.kcv) {
                            return Err(KeyError::WrongKey(*v));
                        }
                    }
                }
                let ring = {
                    let (state, source) = (state.clone(), source.clone());
                    tokio::task::spawn_blocking(move || state.keyring(&source))
                        .await
                        .map_err(|_| KeyError::StoredState)??
                };
                check_shreds(store, &ring, &shreds, &data_dir).await?;
                if mine.as_ref() != Some(&state) {
                    state.write(&data_dir)?;
                }
                let live = Live { state, raw, ring: Arc::new(ring), shreds };
                return Ok(KeyManager::new(source, data_dir, live));
            }
            let Some(state) = &mine else { return Err(KeyError::NoKeyCheck(data_dir)) };
            let ring = match local_ring.take() {
                Some(ring) => ring,
                None => {
                    let (state, source) = (state.clone(), source.clone());
                    tokio::task::spawn_blocking(move || state.keyring(&source))
                        .await
                        .map_err(|_| KeyError::StoredState)??
                }
            };
            let raw = state.to_bytes();
            let entry = AuditEntry {
                actor: "carevault".into(),
                client_address: "local".into(),
                action: Action::KeysStateRecorded.as_str().into(),
                resource_type: Action::KeysStateRecorded.resource_type().as_str().into(),
                outcome: Outcome::Ok.as_str().into(),
                key_version: state.primary,
                details: vec![format!("primary={}", state.primary), format!("generation={}", state.generation)],
                ..AuditEntry::default()
            };
            let changes = vec![Change::Job { name: KEY_STATE, value: Some(raw.clone()), expect: Expect::Absent }];
            let committed = store.commit(Commit { entry, write: None, changes }).await.map_err(storage)?;
            if committed.outcome == CommitOutcome::Written {
                check_shreds(store, &ring, &shreds, &data_dir).await?;
                let live = Live { state: state.clone(), raw, ring: Arc::new(ring), shreds };
                return Ok(KeyManager::new(source, data_dir, live));
            }
            // Another process recorded its state first: take that one up.
        }
        Err(KeyError::StoredState)
    }

    fn new(source: KeySource, data_dir: PathBuf, live: Live) -> KeyManager {
        KeyManager {
            source,
            data_dir,
            live: RwLock::new(Arc::new(live)),
            refreshing: tokio::sync::Mutex::new(()),
            wrap_gate: tokio::sync::RwLock::new(()),
            data_keys: crate::crypto::DataKeyCache::new(DEFAULT_KEY_CACHE),
        }
    }

    /// Keeps at most `entries` unwrapped data keys (0: none).
    pub fn with_key_cache(mut self, entries: usize) -> KeyManager {
        self.data_keys = crate::crypto::DataKeyCache::new(entries);
        self
    }

    /// The data directory (`keycheck.json`, `erasure-keys`).
    pub(super) fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    fn live(&self) -> Arc<Live> {
        self.live.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn install(&self, live: Live) {
        *self.live.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(live);
        self.data_keys.clear();
    }

    /// The current keyring.
    pub fn ring(&self) -> Arc<Keyring> {
        self.live().ring.clone()
    }

    /// The current erasure bucket keys.
    pub fn shreds(&self) -> Arc<ShredKeys> {
        self.live().shreds.clone()
    }

    /// The stored bytes of the key state the live keys come from.
    pub(super) fn raw(&self) -> Vec<u8> {
        self.live().raw.clone()
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
        self.live().state.clone()
    }

    /// Builds the live keys of `next` (the keyring checked against the key
    /// source, `erasure-keys` read again) and writes `keycheck.json`: done
    /// before the change commits (blocking).
    fn prepare(&self, next: KeyState) -> Result<Live, KeyError> {
        let ring = next.keyring(&self.source)?;
        let shreds = crate::keystore::read_erasure_keys(&self.data_dir)?;
        next.write(&self.data_dir)?;
        Ok(Live { raw: next.to_bytes(), state: next, ring: Arc::new(ring), shreds: Arc::new(shreds) })
    }

    /// Makes `shreds` live at once, with the key state unchanged (this
    /// process's own erasure, before its commit).
    pub(super) fn install_shreds(&self, shreds: ShredKeys) {
        let live = self.live();
        self.install(Live {
            state: live.state.clone(),
            raw: live.raw.clone(),
            ring: live.ring.clone(),
            shreds: Arc::new(shreds),
        });
    }
}

/// Refuses erasure bucket keys that cannot open the store's first data key.
async fn check_shreds(
    store: &Store,
    ring: &Keyring,
    shreds: &ShredKeys,
    data_dir: &std::path::Path,
) -> Result<(), KeyError> {
    let first = store.data_keys_after(None, 1).await.map_err(|e| KeyError::Store(e.to_string()))?;
    if let Some((patient, wrapped)) = first.into_iter().next()
        && let Err(crate::crypto::CryptoError::UnknownErasureKey(..) | crate::crypto::CryptoError::Open) =
            ring.unwrap_data_key(&patient, &WrappedDataKey(wrapped), shreds)
    {
        return Err(KeyError::ForeignErasureKeys(data_dir.join(crate::keystore::ERASURE_KEYS_FILE)));
    }
    Ok(())
}

/// A key state change staged in a call: the change, and the live keys it
/// makes once committed.
pub(super) struct StagedKeyState {
    pub change: Change,
    pub live: Live,
}

impl App {
    /// Takes up the store's key state if it moved (a key operation or an
    /// erasure through another process). True if it had.
    pub(super) async fn refresh_keys(&self) -> Result<bool, AppError> {
        let _one = self.keys.refreshing.lock().await;
        let Some(raw) = self.store.job(KEY_STATE).await.map_err(internal)? else { return Ok(false) };
        if raw == self.keys.raw() {
            return Ok(false);
        }
        let next = KeyState::from_bytes(&raw).map_err(key_error)?;
        let keys = self.keys.clone();
        let live = blocking(move || keys.prepare(next).map_err(key_error)).await?;
        tracing::info!(generation = live.state.generation, primary = live.state.primary, "took up a changed key state");
        self.keys.install(Live { raw, ..live });
        Ok(true)
    }

    /// Stages, from the live key state, the change `edit` makes (for a call
    /// whose commit carries it; [`KeyManager::install`] it once committed).
    pub(super) async fn stage_key_state(
        &self,
        edit: impl FnOnce(&mut KeyState) + Send + 'static,
    ) -> Result<StagedKeyState, AppError> {
        let live = self.keys.live();
        let mut next = live.state.clone();
        edit(&mut next);
        next.generation += 1;
        let keys = self.keys.clone();
        let prepared = blocking(move || keys.prepare(next).map_err(key_error)).await?;
        let change =
            Change::Job { name: KEY_STATE, value: Some(prepared.raw.clone()), expect: Expect::Equal(live.raw.clone()) };
        Ok(StagedKeyState { change, live: prepared })
    }

    /// Makes a committed staged key state live.
    pub(super) fn install_key_state(&self, staged: StagedKeyState) {
        self.keys.install(staged.live);
    }

    /// Commits `entry` and `changes` with the key state `edit` makes of the
    /// stored one, which must still be the one read: if another process
    /// changed it in between, it is read again and `edit` applied again.
    /// The new state is live here once committed. Returns the commit (its
    /// outcome says whether `changes`' own preconditions held).
    pub(super) async fn commit_key_state(
        &self,
        entry: AuditEntry,
        changes: Vec<Change>,
        edit: impl Fn(&mut KeyState) + Send + Sync + Clone + 'static,
    ) -> Result<Committed, AppError> {
        for _ in 0..5 {
            let raw = self.store.job(KEY_STATE).await.map_err(internal)?.ok_or(AppError::Internal)?;
            let mut next = KeyState::from_bytes(&raw).map_err(key_error)?;
            edit(&mut next);
            next.generation += 1;
            let keys = self.keys.clone();
            let live = blocking(move || keys.prepare(next).map_err(key_error)).await?;
            let mut all = changes.clone();
            all.push(Change::Job {
                name: KEY_STATE,
                value: Some(live.raw.clone()),
                expect: Expect::Equal(raw.clone()),
            });
            let committed = self.store.commit(Commit { entry: entry.clone(), write: None, changes: all }).await;
            let committed = committed.map_err(super::call::audit_unavailable)?;
            if committed.outcome == CommitOutcome::Written {
                self.keys.install(live);
                return Ok(committed);
            }
            if self.store.job(KEY_STATE).await.map_err(internal)?.as_deref() == Some(raw.as_slice()) {
                // Another precondition failed; the caller decides.
                return Ok(committed);
            }
        }
        tracing::error!("the key state kept changing under a key state change");
        Err(AppError::KeyStateMoved)
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
    /// The audit log's verifier keys (vkeys), oldest first.
    pub log_keys: Vec<String>,
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
    /// The process that recorded it (absent in records written before processes shared a store).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub process: String,
}

/// How long a key operation may sit between its two entries before another
/// process on the store settles it as interrupted (the operation itself
/// takes milliseconds; its own process settles it at once after a crash).
const KEY_OP_GRACE_MICROS: i64 = 15_000_000;

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
            log_keys: state.log_verifiers().iter().map(|v| v.to_vkey()).collect(),
        })
    }

    /// Adds a master key version and makes it primary: the new state
    /// commits with the completion entry.
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
        let intent = self.key_intent(call, result.map(|_| (KeyOperation::Rotate, version)), None).await?;
        let keys = self.keys.clone();
        let created = blocking(move || {
            let key = keys.source.create(version).map_err(key_error)?;
            let check = Keyring::new(vec![(version, key)], version, version).map_err(|_| AppError::Internal)?;
            check.key_check_value(version).ok_or(AppError::Internal)
        })
        .await;
        let details = vec![format!("new_version={version}"), format!("previous_primary={previous}")];
        let applied = match created {
            Ok(kcv) => {
                let edit = move |next: &mut KeyState| {
                    next.master_keys.insert(version, VersionInfo { kcv: kcv.clone(), state: VersionState::Active });
                    next.primary = version;
                };
                self.key_completion(ctx, intent, Ok(details), Some(edit)).await
            }
            Err(e) => {
                self.key_completion(ctx, intent, Err(&e), None::<fn(&mut KeyState)>).await?;
                Err(e)
            }
        };
        applied.map(|()| (version, previous))
    }

    /// Retires a version: refused while anything depends on it. The new
    /// state commits with the completion entry.
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
        let intent = self.key_intent(call, result, None).await?;
        let version = intent.version;
        let edit = move |next: &mut KeyState| {
            if let Some(i) = next.master_keys.get_mut(&version) {
                i.state = VersionState::Retired;
            }
        };
        self.key_completion(ctx, intent, Ok(Vec::new()), Some(edit)).await?;
        Ok(version)
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

    /// Destroys a retired version's material: the state says "destroyed"
    /// from the intent entry on (nothing may use it from then), and the
    /// material is removed after that commit.
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
        let staged = match &result {
            Ok((_, version)) => {
                let version = *version;
                let staged = self
                    .stage_key_state(move |next| {
                        if let Some(i) = next.master_keys.get_mut(&version) {
                            i.state = VersionState::Destroyed;
                        }
                    })
                    .await;
                match staged {
                    Ok(s) => Some(s),
                    Err(e) => return Err(call.refuse(e).await),
                }
            }
            Err(_) => None,
        };
        let intent = self.key_intent(call, result, staged).await?;
        let (keys, version) = (self.keys.clone(), intent.version);
        let applied = blocking(move || remove_material(&keys, version)).await;
        let details = applied.as_ref().map(|removed| vec![format!("material_removed={removed}")]);
        self.key_completion(ctx, intent, details, None::<fn(&mut KeyState)>).await?;
        applied
    }

    /// Commits a key operation's intent entry with its pending record (and
    /// a staged key state change, made live once committed), or audits why
    /// it was refused.
    async fn key_intent(
        &self,
        mut call: Call<'_>,
        decided: Result<(KeyOperation, u32), AppError>,
        staged: Option<StagedKeyState>,
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
            process: self.process_id.to_string(),
        };
        let json = serde_json::to_vec(&pending).map_err(|_| AppError::Internal)?;
        // Only one operation at a time: an unsettled one must be settled first.
        call.stage(Change::Job { name: KEY_OP, value: Some(json), expect: Expect::Absent });
        if let Some(s) = &staged {
            call.stage(s.change.clone());
        }
        let template = AuditEntry { details: Vec::new(), ..call.entry.clone() };
        match call.commit(None).await {
            Ok(_) => {
                if let Some(s) = staged {
                    self.install_key_state(s);
                }
                Ok(Intent { operation, version, template })
            }
            Err(AppError::Conflict { .. }) => Err(AppError::FailedPrecondition(
                "another key operation is in progress, or was interrupted and is not settled yet (it is settled within 15 s); retry later",
            )),
            Err(e) => Err(e),
        }
    }

    /// Commits a key operation's completion entry (outcome ok, or why it
    /// failed) and removes its pending record; with `edit`, the key state
    /// change commits with it.
    async fn key_completion(
        &self,
        ctx: &CallContext,
        intent: Intent,
        applied: Result<Vec<String>, &AppError>,
        edit: Option<impl Fn(&mut KeyState) + Send + Sync + Clone + 'static>,
    ) -> Result<(), AppError> {
        let action = intent.operation.completion_action();
        let (outcome, details) = match applied {
            Ok(details) => (Outcome::Ok, details),
            Err(e) => (e.outcome(), vec!["applied=false".to_string()]),
        };
        let entry =
            AuditEntry { action: action.as_str().into(), outcome: outcome.as_str().into(), details, ..intent.template };
        let changes = vec![Change::Job { name: KEY_OP, value: None, expect: Expect::Anything }];
        let committed = match edit {
            Some(edit) => self.commit_key_state(entry, changes, edit).await,
            None => {
                self.store.commit(Commit { entry, write: None, changes }).await.map_err(super::call::audit_unavailable)
            }
        };
        self.log(ctx, action, outcome, committed.as_ref().ok().map(|c| c.sequence));
        committed.map(|_| ())
    }

    /// Settles a key operation interrupted between its two entries: whether
    /// it took effect is read from the key state (a rotation or retirement
    /// takes effect with its completion entry, so it did not; a destroy did,
    /// with its intent, and its material removal is repeated), and a
    /// completion entry says so. Called once the server runs, and every few
    /// seconds after: an operation another process recorded is left to it
    /// for 15 s (it may still be running), unless the store is this
    /// process's alone.
    pub(super) async fn settle_key_operation(&self) -> Result<(), AppError> {
        let _one_at_a_time = self.key_op_lock.lock().await;
        let Some(pending) = self.job_state::<PendingKeyOperation>(KEY_OP).await? else { return Ok(()) };
        let others = !pending.process.is_empty() && pending.process != *self.process_id;
        if others && !self.store.exclusive() && self.now() - pending.started_at < KEY_OP_GRACE_MICROS {
            return Ok(());
        }
        self.refresh_keys().await?;
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
                    let removed = blocking(move || remove_material(&keys, pending.version)).await?;
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

/// Removes a destroyed version's material. True if carevault removed it itself.
fn remove_material(keys: &KeyManager, version: u32) -> Result<bool, AppError> {
    let removed = keys.source.destroy(version).map_err(key_error)?;
    Ok(removed == Destroyed::Removed)
}
