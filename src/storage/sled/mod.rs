//! The embedded engine: sled 0.34 trees under `<data-dir>/db`.
//!
//! - [`layout`]: the trees and their key layouts (private to this engine);
//! - [`apply`]: writing a planned batch in a crash-recoverable order, and why it recovers;
//! - [`recovery`]: repairing at open what a crash cut short;
//! - [`pipeline`]: the sequencer and sync threads (group commit);
//! - [`audit_blocks`]: audit entries stored in blocks;
//! - [`durability`]: closing sled's fsync gap;
//! - [`snapshot`]: reading a stopped store without changing it.

mod apply;
mod audit_blocks;
pub mod durability;
mod layout;
mod merkle_tree;
mod pipeline;
mod recovery;
pub mod snapshot;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

pub use audit_blocks::AuditIter;
pub use recovery::Recovery;

use self::layout::Tree;
use super::model::{
    CoverageNow, CoveragesNow, Current, Footprint, Head, IndexKey, JobName, Keyed, RecordRef, StoredAuditEntry,
};
use super::sequencer::plan::{Snapshot, StateKey, StateValue};
use super::sequencer::{self, Sequencer};
use super::{FailSyncs, StorageError};
use crate::audit::AuditEntry;
use crate::clock::Clock;
use crate::crypto::RecordKind;

/// The opened sled database and its trees.
#[derive(Clone)]
pub struct SledStore {
    db: sled::Db,
    heads: sled::Tree,
    records: sled::Tree,
    deks: sled::Tree,
    blind: sled::Tree,
    blind_owner: sled::Tree,
    coverage_by_patient: sled::Tree,
    audit: sled::Tree,
    audit_by_patient: sled::Tree,
    access: sled::Tree,
    pending: sled::Tree,
    merkle: sled::Tree,
    checkpoints: sled::Tree,
    /// The pipeline's durable sync, shared with checkpoint writes once started.
    durability: Arc<std::sync::OnceLock<Arc<std::sync::Mutex<durability::Durability>>>>,
    /// The Merkle tree's durable size (see `merkle_tree`).
    tree_size: Arc<AtomicU64>,
    /// The newest checkpoint that is durable, so readable.
    visible_checkpoint: Arc<AtomicU64>,
    /// What opening the store had to repair.
    recovered: Recovery,
}

impl From<sled::Error> for StorageError {
    fn from(e: sled::Error) -> Self {
        let text = e.to_string();
        // sled reports its lock only as text; a second process racing past
        // the check in `SledStore::open` gets here.
        if text.contains("could not acquire lock") { StorageError::Locked } else { StorageError::Io(text) }
    }
}

/// A key (without its page prefix) and its value.
type KeyValue = (Vec<u8>, Vec<u8>);

/// The tree that holds the audit index.
const AUDIT_INDEX_TREE: &str = "audit_by_patient_epoch";

impl SledStore {
    /// Opens (or creates) the database under `dir`, finishing any batch of
    /// commits a crash interrupted. `cache_bytes` bounds sled's page cache.
    /// A database another process has open is [`StorageError::Locked`].
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<SledStore, StorageError> {
        drop(snapshot::lock_shared(dir)?);
        let db = sled::Config::new().path(dir).cache_capacity(cache_bytes).mode(sled::Mode::HighThroughput).open()?;
        let mut store = SledStore {
            heads: db.open_tree("heads")?,
            records: db.open_tree("records")?,
            deks: db.open_tree("deks")?,
            blind: db.open_tree("blind")?,
            blind_owner: db.open_tree("blind_owner")?,
            coverage_by_patient: db.open_tree("coverage_by_patient")?,
            audit: db.open_tree("audit")?,
            audit_by_patient: db.open_tree(AUDIT_INDEX_TREE)?,
            access: db.open_tree("access")?,
            pending: db.open_tree("pending")?,
            merkle: db.open_tree("merkle")?,
            checkpoints: db.open_tree("checkpoints")?,
            durability: Arc::new(std::sync::OnceLock::new()),
            tree_size: Arc::new(AtomicU64::new(0)),
            visible_checkpoint: Arc::new(AtomicU64::new(0)),
            recovered: Recovery::default(),
            db,
        };
        recovery::migrate_audit_index(&store)?;
        let recovered = recovery::recover(&store)?;
        if recovered != Recovery::default() {
            tracing::warn!(
                replayed = recovered.replayed,
                dropped = recovered.dropped,
                "finished a batch of commits that a crash interrupted"
            );
        }
        store.recovered = recovered;
        store.open_checkpoints()?;
        Ok(store)
    }

    /// What opening the store repaired (nothing for a clean store).
    pub fn recovery(&self) -> Recovery {
        self.recovered
    }

    /// Starts the commit pipeline (writing the genesis entry into an empty
    /// chain first). `fail_syncs` makes durable syncs fail on purpose in
    /// tests of fail-closed behaviour (see [`FailSyncs`]).
    pub fn start(
        &self,
        dir: &Path,
        clock: Arc<dyn Clock>,
        fail_syncs: FailSyncs,
    ) -> Result<(Sequencer, std::thread::JoinHandle<()>), StorageError> {
        let mut durability = durability::Durability::open(dir, fail_syncs)?;
        // Make whatever opening recovered durable before anything new is appended.
        durability.sync(&self.db)?;
        let head = match self.audit_head_sync()? {
            Some(h) => h,
            None => {
                let genesis = AuditEntry::genesis(clock.now_micros());
                let bytes = genesis.encode().map_err(|e| StorageError::Unencodable(e.to_string()))?;
                let hash = crate::crypto::sha256(&bytes);
                let mut value = bytes;
                value.extend_from_slice(&hash);
                self.audit.insert(0u64.to_be_bytes(), audit_blocks::encode_block([(0, value.as_slice())])?)?;
                durability.sync(&self.db)?;
                (0, hash)
            }
        };
        let tree = self.repair_tree()?;
        durability.sync(&self.db)?;
        let (sequencer, queue) = sequencer::channel(head, durability.sync_counter());
        let durability = Arc::new(std::sync::Mutex::new(durability));
        let _ = self.durability.set(durability.clone());
        let thread = pipeline::start(self.clone(), clock, durability, queue, tree)?;
        Ok((sequencer, thread))
    }

    fn tree(&self, t: Tree) -> &sled::Tree {
        match t {
            Tree::Access => &self.access,
            Tree::Deks => &self.deks,
            Tree::Heads => &self.heads,
            Tree::Records => &self.records,
            Tree::Blind => &self.blind,
            Tree::BlindOwner => &self.blind_owner,
            Tree::CoverageByPatient => &self.coverage_by_patient,
            Tree::Audit => &self.audit,
            Tree::AuditByPatient => &self.audit_by_patient,
        }
    }

    fn get(&self, t: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.tree(t).get(key)?.map(|v| v.to_vec()))
    }

    /// Up to `limit` values of `t` whose keys start with `prefix` and come after `after` (a key suffix).
    fn page(&self, t: Tree, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<KeyValue>, StorageError> {
        let mut start = prefix.to_vec();
        if let Some(a) = after {
            start.extend_from_slice(a);
            start.push(0); // strictly after
        }
        let mut out = Vec::new();
        for kv in self.tree(t).range(start..) {
            let (k, v) = kv?;
            if !k.starts_with(prefix) || out.len() == limit {
                break;
            }
            out.push((k[prefix.len()..].to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// A compacted, consistent copy into a new database at `dest` (which
    /// must not exist), made durable: every tree's live values, never sled's
    /// stale log segments. Returns the number of keys copied.
    pub fn backup_to(&self, dest: &Path) -> Result<u64, StorageError> {
        if dest.exists() {
            return Err(StorageError::Io(format!("{} already exists", dest.display())));
        }
        let out = sled::Config::new().path(dest).open()?;
        let mut copied = 0u64;
        for name in self.db.tree_names() {
            let from = self.db.open_tree(&name)?;
            let to = out.open_tree(&name)?;
            for kv in from.iter() {
                let (k, v) = kv?;
                to.insert(k, v)?;
                copied += 1;
            }
        }
        let mut durability = durability::Durability::open(dest, FailSyncs::never())?;
        durability.sync(&out)?;
        Ok(copied)
    }

    /// Raw access for tamper tests: overwrite a record version's sealed
    /// bytes. Named `danger_` because it bypasses the sequencer and the audit trail.
    #[cfg(any(test, feature = "testing"))]
    pub fn danger_put_record_raw(&self, record: RecordRef, version: u64, value: Vec<u8>) -> Result<(), StorageError> {
        self.records.insert(layout::version_key(record, version), value)?;
        self.db.flush()?;
        Ok(())
    }

    /// Raw access for tests that restore an old wrapped data key (to show a
    /// destroyed version cannot open it). Bypasses the sequencer and the audit trail.
    #[cfg(any(test, feature = "testing"))]
    pub fn danger_put_dek_raw(&self, patient: &[u8; 16], value: Vec<u8>) -> Result<(), StorageError> {
        self.deks.insert(patient, value)?;
        self.db.flush()?;
        Ok(())
    }

    // Reads: the `Backend` methods call these; offline tools and tests call them directly.

    /// See the `Backend` method of the same name.
    pub fn head(&self, r: RecordRef) -> Result<Option<Head>, StorageError> {
        self.heads.get(layout::head_key(r))?.map(|v| layout::decode_head(&v)).transpose()
    }

    /// See the `Backend` method of the same name.
    pub fn record_version(&self, r: RecordRef, version: u64) -> Result<Option<Vec<u8>>, StorageError> {
        self.get(Tree::Records, &layout::version_key(r, version))
    }

    /// See the `Backend` method of the same name: four gets in one call
    /// (the head first; see the write order in `apply`).
    pub fn current(&self, r: RecordRef) -> Result<Option<Current>, StorageError> {
        let Some(head) = self.head(r)? else { return Ok(None) };
        let sealed = self.record_version(r, head.version)?;
        let wrapped_key = self.data_key(&head.patient_id)?;
        let restricted_since = self.restricted_since(&head.patient_id)?;
        Ok(Some(Current { head, sealed, wrapped_key, restricted_since }))
    }

    /// See the `Backend` method of the same name.
    pub fn versions(&self, r: RecordRef) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        self.records
            .scan_prefix(layout::head_key(r))
            .map(|kv| {
                let (k, v) = kv?;
                Ok((layout::u64_at(&k, 17)?, v.to_vec()))
            })
            .collect()
    }

    /// See the `Backend` method of the same name.
    pub fn heads_after(
        &self,
        kind: Option<RecordKind>,
        after: Option<RecordRef>,
        limit: usize,
    ) -> Result<Vec<(RecordRef, Head)>, StorageError> {
        let start = match after {
            Some(r) => {
                let mut k = layout::head_key(r).to_vec();
                k.push(0); // strictly after
                k
            }
            None => kind.map(|k| vec![k.tag()]).unwrap_or_default(),
        };
        let mut out = Vec::new();
        for kv in self.heads.range(start..) {
            let (k, v) = kv?;
            let r = layout::record_of(&k)?;
            if kind.is_some_and(|kind| r.kind != kind) || out.len() == limit {
                break;
            }
            out.push((r, layout::decode_head(&v)?));
        }
        Ok(out)
    }

    /// See the `Backend` method of the same name.
    pub fn coverages_of(&self, patient: &[u8; 16]) -> Result<Vec<[u8; 16]>, StorageError> {
        self.coverage_by_patient
            .scan_prefix(patient)
            .map(|kv| {
                let (k, _) = kv?;
                layout::arr16(&k[16..])
            })
            .collect()
    }

    /// See the `Backend` method of the same name. Point reads in one call:
    /// the patient's head, key and restriction, its coverage ids, and each
    /// coverage's head and current version.
    pub fn coverages_now(&self, patient: &[u8; 16]) -> Result<Option<CoveragesNow>, StorageError> {
        let Some(head) = self.head(RecordRef::patient(*patient))? else { return Ok(None) };
        let wrapped_key = self.data_key(patient)?;
        let restricted_since = self.restricted_since(patient)?;
        let mut coverages = Vec::new();
        for id in self.coverages_of(patient)? {
            let record = RecordRef::coverage(id);
            if let Some(h) = self.head(record)? {
                coverages.push(CoverageNow { id, version: h.version, sealed: self.record_version(record, h.version)? });
            }
        }
        Ok(Some(CoveragesNow {
            patient: *patient,
            patient_version: head.version,
            wrapped_key,
            restricted_since,
            coverages,
        }))
    }

    /// See the `Backend` method of the same name.
    pub fn footprint(&self, patient: &[u8; 16]) -> Result<Footprint, StorageError> {
        let coverages = self.coverages_of(patient)?;
        let mut versions = self.records.scan_prefix(layout::head_key(RecordRef::patient(*patient))).count();
        for c in &coverages {
            versions += self.records.scan_prefix(layout::head_key(RecordRef::coverage(*c))).count();
        }
        Ok(Footprint {
            coverages: u64::try_from(coverages.len()).unwrap_or(u64::MAX),
            record_versions: u64::try_from(versions).unwrap_or(u64::MAX),
        })
    }

    /// See the `Backend` method of the same name.
    pub fn data_keys_after(&self, after: Option<[u8; 16]>, limit: usize) -> Result<Vec<Keyed>, StorageError> {
        self.page(Tree::Deks, &[], after.as_ref().map(|a| a.as_slice()), limit)?
            .into_iter()
            .map(|(k, v)| Ok((layout::arr16(&k)?, v)))
            .collect()
    }

    /// See the `Backend` method of the same name.
    pub fn blind_lookup(&self, tag: u8, mac: &[u8; 16], limit: usize) -> Result<Vec<[u8; 16]>, StorageError> {
        let mut prefix = Vec::with_capacity(17);
        prefix.push(tag);
        prefix.extend_from_slice(mac);
        let mut out: Vec<[u8; 16]> = Vec::new();
        for kv in self.blind.scan_prefix(&prefix) {
            let (k, _) = kv?;
            let p = layout::arr16(k.get(17..33).ok_or(StorageError::Corrupt("short blind key"))?)?;
            if !out.contains(&p) {
                out.push(p);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// See the `Backend` method of the same name.
    pub fn index_set(&self, r: RecordRef) -> Result<Option<Vec<IndexKey>>, StorageError> {
        self.blind_owner.get(layout::head_key(r))?.map(|v| layout::decode_index_set(&v)).transpose()
    }

    /// See the `Backend` method of the same name.
    pub fn index_sets_after(
        &self,
        after: Option<RecordRef>,
        limit: usize,
    ) -> Result<Vec<(RecordRef, Vec<IndexKey>)>, StorageError> {
        let start = after.map(|r| {
            let mut k = layout::head_key(r).to_vec();
            k.push(0);
            k
        });
        let mut out = Vec::new();
        for kv in self.blind_owner.range(start.unwrap_or_default()..).take(limit) {
            let (k, v) = kv?;
            out.push((layout::record_of(&k)?, layout::decode_index_set(&v)?));
        }
        Ok(out)
    }

    /// See the `Backend` method of the same name.
    pub fn index_entries_per_slot(&self) -> Result<[u64; 2], StorageError> {
        let mut per_slot = [0u64; 2];
        for kv in self.blind.iter().keys() {
            let k = kv?;
            if let Some(t) = k.first() {
                per_slot[usize::from((t / 16) & 1)] += 1;
            }
        }
        Ok(per_slot)
    }

    pub(super) fn micros(&self, key: &[u8]) -> Result<Option<i64>, StorageError> {
        self.get(Tree::Access, key)?.map(|v| layout::i64_of(&v)).transpose()
    }

    /// See the `Backend` method of the same name.
    pub fn grants_after(&self, after: Option<[u8; 16]>, limit: usize) -> Result<Vec<Keyed>, StorageError> {
        self.page(Tree::Access, b"G", after.as_ref().map(|a| a.as_slice()), limit)?
            .into_iter()
            .map(|(k, v)| Ok((layout::arr16(&k)?, v)))
            .collect()
    }

    /// See the `Backend` method of the same name.
    pub fn active_grant(
        &self,
        subject: &[u8; 32],
        patient: &[u8; 16],
    ) -> Result<Option<([u8; 16], i64)>, StorageError> {
        let Some(v) = self.get(Tree::Access, &layout::active_grant_key(subject, patient))? else { return Ok(None) };
        let (id, expires) = v.split_at_checked(16).ok_or(StorageError::Corrupt("bad active grant"))?;
        Ok(Some((layout::arr16(id)?, layout::i64_of(expires)?)))
    }

    /// See the `Backend` method of the same name.
    pub fn tombstones_after(
        &self,
        kind: RecordKind,
        after: Option<[u8; 16]>,
        limit: usize,
    ) -> Result<Vec<Keyed>, StorageError> {
        self.page(Tree::Access, &[b'E', kind.tag()], after.as_ref().map(|a| a.as_slice()), limit)?
            .into_iter()
            .map(|(k, v)| Ok((layout::arr16(&k)?, v)))
            .collect()
    }

    /// See the `Backend` method of the same name.
    pub fn audit_seqs_for_patient(
        &self,
        patient: &[u8; 16],
        from: u64,
        limit: usize,
    ) -> Result<Vec<u64>, StorageError> {
        let Some((last, _)) = self.audit_by_patient.last()? else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for epoch in layout::audit_epoch(from)..=layout::key_epoch(&last) {
            let start = layout::audit_index_key(patient, from.max(u64::from(epoch) << layout::AUDIT_EPOCH_BITS));
            let mut end = start;
            end[layout::INDEX_SEQ_AT..].copy_from_slice(&u64::MAX.to_be_bytes());
            for kv in self.audit_by_patient.range(start..=end) {
                let (k, _) = kv?;
                out.push(layout::u64_at(&k, layout::INDEX_SEQ_AT)?);
                if out.len() == limit {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }
}

/// What planning reads: the trees as they are (the sequencer thread is the
/// only writer, so they cannot change under a batch being planned).
impl Snapshot for SledStore {
    fn get(&self, key: &StateKey) -> Result<Option<StateValue>, StorageError> {
        let bytes = |v: Option<Vec<u8>>| v.map(StateValue::Bytes);
        Ok(match key {
            StateKey::Head(r) => self.head(*r)?.map(StateValue::Head),
            StateKey::DataKey(p) => bytes(self.get(Tree::Deks, p)?),
            StateKey::Version(r, v) => bytes(self.record_version(*r, *v)?),
            StateKey::IndexSet(r) => self.index_set(*r)?.map(StateValue::Index),
            StateKey::Grant(id) => bytes(self.get(Tree::Access, &layout::grant_key(id))?),
            StateKey::Tombstone(r) => bytes(self.get(Tree::Access, &layout::tombstone_key(*r))?),
            StateKey::Job(name) => bytes(self.get(Tree::Access, &layout::job_key(*name))?),
            StateKey::LegalHold(p) => self.micros(&layout::hold_key(p))?.map(StateValue::Micros),
            StateKey::Idempotency(k) => self.idempotent(k)?.map(StateValue::Record),
            StateKey::Coverages(p) => {
                let mut ids = self.coverages_of(p)?;
                ids.sort_unstable();
                (!ids.is_empty()).then_some(StateValue::Ids(ids))
            }
        })
    }
}

impl SledStore {
    /// See the `Backend` method of the same name.
    pub fn job(&self, name: JobName) -> Result<Option<Vec<u8>>, StorageError> {
        self.get(Tree::Access, &layout::job_key(name))
    }

    /// See the `Backend` method of the same name.
    pub fn idempotent(&self, key: &[u8; 32]) -> Result<Option<RecordRef>, StorageError> {
        self.get(Tree::Access, &layout::idempotency_key(key))?.map(|v| layout::record_of(&v)).transpose()
    }

    /// See the `Backend` method of the same name.
    pub fn tombstone(&self, r: RecordRef) -> Result<Option<Vec<u8>>, StorageError> {
        self.get(Tree::Access, &layout::tombstone_key(r))
    }

    /// See the `Backend` method of the same name.
    pub fn grant(&self, id: &[u8; 16]) -> Result<Option<Vec<u8>>, StorageError> {
        self.get(Tree::Access, &layout::grant_key(id))
    }

    /// See the `Backend` method of the same name.
    pub fn restricted_since(&self, p: &[u8; 16]) -> Result<Option<i64>, StorageError> {
        self.micros(&layout::restricted_key(p))
    }

    /// See the `Backend` method of the same name.
    pub fn legal_hold_since(&self, p: &[u8; 16]) -> Result<Option<i64>, StorageError> {
        self.micros(&layout::hold_key(p))
    }

    /// See the `Backend` method of the same name.
    pub fn data_key(&self, p: &[u8; 16]) -> Result<Option<Vec<u8>>, StorageError> {
        self.get(Tree::Deks, p)
    }

    /// See the `Backend` method of the same name.
    pub fn count_records(&self) -> u64 {
        u64::try_from(self.heads.len()).unwrap_or(u64::MAX)
    }

    /// See the `Backend` method of the same name.
    pub fn count_data_keys(&self) -> u64 {
        u64::try_from(self.deks.len()).unwrap_or(u64::MAX)
    }

    /// See the `Backend` method of the same name.
    pub fn audit_entries(&self, from: u64, to: u64, limit: usize) -> Result<Vec<StoredAuditEntry>, StorageError> {
        self.audit_range(from, to).take(limit).collect()
    }
}
