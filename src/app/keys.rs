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

use super::{App, CallContext, Parsed, blocking, internal};
use crate::crypto::{Keyring, ShredKeys, WrappedDataKey};
use crate::domain::Action;
use crate::error::AppError;
use crate::keystore::{Destroyed, KeyError, KeySource, KeyState, VersionInfo, VersionState};
use crate::storage::Head;

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
    pub(super) fn key_usage(&self) -> Result<BTreeMap<u32, VersionUse>, AppError> {
        let mut usage: BTreeMap<u32, VersionUse> = BTreeMap::new();
        let mut patient_version: std::collections::HashMap<[u8; 16], u32> = std::collections::HashMap::new();
        for kv in self.store.deks.iter() {
            let (k, v) = kv.map_err(|e| internal(e.into()))?;
            let version = WrappedDataKey(v.to_vec()).master_version().map_err(|_| AppError::DataLoss)?;
            usage.entry(version).or_default().data_keys += 1;
            if let Ok(id) = <[u8; 16]>::try_from(k.as_ref()) {
                patient_version.insert(id, version);
            }
        }
        for kv in self.store.heads.iter() {
            let (_, v) = kv.map_err(|e| internal(e.into()))?;
            let head: Head = crate::storage::decode_head(&v).map_err(internal)?;
            if let Some(version) = patient_version.get(&head.patient_id) {
                usage.entry(*version).or_default().records += 1;
            }
        }
        for (version, n) in self.index_entries_by_version()? {
            usage.entry(version).or_default().index_entries += n;
        }
        for version in self.note_versions()? {
            usage.entry(version).or_default().notes += 1;
        }
        Ok(usage)
    }

    /// Key status.
    pub async fn key_status(&self, ctx: &CallContext) -> Result<KeyStatus, AppError> {
        let mut attempt = self.begin(ctx, Action::KeysStatus);
        self.authorize(ctx, &mut attempt).await?;
        let app = self.clone();
        let result = blocking(move || {
            let usage = app.key_usage()?;
            let state = app.keys.state();
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
                source: app.keys.source.describe(),
                job: app.rewrap_progress()?,
                reencrypt_job: app.reencrypt_progress()?,
                blind_index_job: app.blind_index_progress()?,
            })
        })
        .await;
        self.finish(ctx, attempt, result).await
    }

    /// Adds a master key version and makes it primary.
    pub async fn rotate_master_key(&self, ctx: &CallContext) -> Result<(u32, u32), AppError> {
        let mut attempt = self.begin(ctx, Action::KeysRotate);
        self.authorize(ctx, &mut attempt).await?;
        let keys = self.keys.clone();
        let result = blocking(move || {
            let mut next = keys.state();
            let previous = next.primary;
            let version = next.master_keys.keys().last().copied().unwrap_or(0) + 1;
            let key = keys.source.create(version).map_err(key_error)?;
            let check = Keyring::new(vec![(version, key)], version, version).map_err(|_| AppError::Internal)?;
            let kcv = check.key_check_value(version).ok_or(AppError::Internal)?;
            next.master_keys.insert(version, VersionInfo { kcv, state: VersionState::Active });
            next.primary = version;
            keys.apply(next).map_err(key_error)?;
            Ok((version, previous))
        })
        .await;
        if let Ok((new, old)) = &result {
            attempt.entry.key_version = *new;
            attempt.entry.details = vec![format!("new_version={new}"), format!("previous_primary={old}")];
        }
        self.finish(ctx, attempt, result).await
    }

    /// Retires a version: refused while anything depends on it.
    pub async fn retire_master_key(&self, ctx: &CallContext, input: Parsed<u32>) -> Result<u32, AppError> {
        let mut attempt = self.begin(ctx, Action::KeysRetire);
        self.authorize(ctx, &mut attempt).await?;
        let version = self.valid(ctx, &mut attempt, input).await?;
        attempt.entry.key_version = version;
        let app = self.clone();
        let result = blocking(move || {
            let state = app.keys.state();
            let info = state.master_keys.get(&version).ok_or(AppError::NotFound("master key version"))?;
            if info.state != VersionState::Active {
                return Err(AppError::FailedPrecondition("the version is not active"));
            }
            if version == state.primary {
                return Err(AppError::FailedPrecondition("the primary version cannot be retired; rotate first"));
            }
            let uses = app.key_usage()?.remove(&version).unwrap_or_default();
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
            let mut next = state;
            if let Some(i) = next.master_keys.get_mut(&version) {
                i.state = VersionState::Retired;
            }
            app.keys.apply(next).map_err(key_error)?;
            Ok(version)
        })
        .await;
        if let Err(AppError::InUse(why)) = &result {
            attempt.entry.details = vec![format!("refused={}", why.split(':').nth(1).unwrap_or("").trim())];
        }
        self.finish(ctx, attempt, result).await
    }

    /// Destroys a retired version's material.
    pub async fn destroy_master_key(&self, ctx: &CallContext, input: Parsed<u32>) -> Result<bool, AppError> {
        let mut attempt = self.begin(ctx, Action::KeysDestroy);
        self.authorize(ctx, &mut attempt).await?;
        let version = self.valid(ctx, &mut attempt, input).await?;
        attempt.entry.key_version = version;
        let keys = self.keys.clone();
        let result = blocking(move || {
            let state = keys.state();
            let info = state.master_keys.get(&version).ok_or(AppError::NotFound("master key version"))?;
            match info.state {
                VersionState::Active => {
                    return Err(AppError::FailedPrecondition(
                        "only a retired version can be destroyed; retire it first",
                    ));
                }
                VersionState::Destroyed => {
                    return Err(AppError::FailedPrecondition("the version is already destroyed"));
                }
                VersionState::Retired => {}
            }
            let mut next = state;
            if let Some(i) = next.master_keys.get_mut(&version) {
                i.state = VersionState::Destroyed;
            }
            // Record the decision first: a crash between the two leaves a
            // "destroyed" version whose file removal is simply repeated.
            keys.apply(next).map_err(key_error)?;
            let removed = keys.source.destroy(version).map_err(key_error)?;
            Ok(removed == Destroyed::Removed)
        })
        .await;
        if let Ok(removed) = &result {
            attempt.entry.details = vec![format!("material_removed={removed}")];
        }
        self.finish(ctx, attempt, result).await
    }
}
