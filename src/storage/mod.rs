//! Persistence: sled trees, their key layouts, and the audit sequencer.
//!
//! Storage holds only ciphertext, HMAC blind indexes, UUIDs, version numbers
//! and audit entries (which hold identifiers, never PHI). Every write goes
//! through the [`sequencer`], which commits the record change with its audit
//! entry (all or nothing, across a crash) and makes them durable with
//! fdatasync before anyone is answered.
//!
//! # Crash atomicity without sled transactions
//!
//! sled recovers a prefix of its log: after a crash, if a write is recovered,
//! so is every write made before it (recovery stops at the first torn or
//! missing message). The sequencer writes each batch in this order:
//!
//! 1. if any commit of the batch changes data: the redo record (`pending` tree),
//!    holding every data change of the batch with its commit's sequence;
//! 2. for each block of entries (consecutive commits, see `audit_blocks`): the
//!    block, then for each of its commits in sequence order its
//!    `audit_by_patient_epoch` keys, then its data changes;
//! 3. the removal of the redo record.
//!
//! [`Store::open`] then repairs whatever a crash cut short: the index keys of
//! the newest block's entries are written again, and if a redo record is present, the changes
//! of each commit whose entry was recovered are applied again (exact values,
//! so replaying is idempotent) and the others are dropped (their entries were
//! not recovered, so neither was any change after them, and none of them was
//! acknowledged). sled transactions would give the same atomicity, but the
//! first transaction switches sled, for the whole process, to a global
//! reader-writer lock that every read takes and each transaction holds
//! exclusively, stalling reads on every worker while a batch is written.
//!
//! # Trees and key layouts (all integers big-endian)
//!
//! | tree                  | key                                                     | value |
//! |-----------------------|---------------------------------------------------------|-------|
//! | `heads`               | kind (1: patient, 2: coverage) · id (16)                 | current version (u64) · patient id (16) |
//! | `records`             | kind · id (16) · version (u64)                           | sealed record (crypto::envelope) |
//! | `deks`                | patient id (16)                                          | wrapped data key (crypto::keyring) |
//! | `blind`               | index kind (1) · HMAC (16) · patient (16) · kind (1) · record id (16) | empty |
//! | `blind_owner`         | kind · record id (16)                                    | the record's `blind` keys, concatenated (50 bytes each) |
//! | `coverage_by_patient` | patient (16) · coverage id (16)                          | empty |
//! | `audit`               | sequence of the block's first entry (u64)                | a block of entries, each canonical bytes · SHA-256 of them (see `audit_blocks`) |
//! | `audit_by_patient_epoch` | epoch = sequence >> 16 (u32) · patient (16) · sequence (u64) | empty |
//! | `access`              | `R` · patient (16)                                       | restricted since (i64 µs); absent: not restricted |
//! | `access`              | `G` · grant id (16)                                      | break-glass grant (JSON, see `app::access`) |
//! | `access`              | `A` · SHA-256(subject) (32) · patient (16)               | grant id (16) · expires (i64 µs): the subject's latest grant |
//! | `access`              | `H` · patient (16)                                       | legal hold placed at (i64 µs); absent: no hold |
//! | `access`              | `E` · kind (1) · id (16)                                 | erasure tombstone (JSON, see `app::erasure`) |
//! | `access`              | `Jrewrap`                                                | the rewrap job (JSON, see `app::rewrap`) |
//! | `pending`             | `batch`                                                  | redo record of the batch being written (see `sequencer`), absent between batches |

mod audit_blocks;
pub mod durability;
pub mod sequencer;
pub mod snapshot;

use std::path::Path;

use crate::crypto::RecordKind;

pub use audit_blocks::AuditIter;
pub use sequencer::{Commit, CommitOutcome, Committed, MetaTree, MetaWrite, RecordWrite, Recovery, Sequencer};

/// A key and its value.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// Length of a `blind` tree key.
pub const BLIND_KEY_LEN: usize = 50;

/// Storage failures. Messages carry no PHI (sled errors may name files; they
/// are logged, never sent to clients).
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The database or the disk failed.
    #[error("storage I/O error: {0}")]
    Io(String),
    /// Stored bytes are not in the expected layout.
    #[error("storage corrupt: {0}")]
    Corrupt(&'static str),
    /// The sequencer has stopped (shutting down).
    #[error("audit sequencer unavailable")]
    SequencerGone,
    /// Something to be written does not fit its format (an over-long audit
    /// entry field, a length beyond u32); nothing of it was written.
    #[error("cannot encode for storage: {0}")]
    Unencodable(String),
    /// Another process (a running server) has the database open.
    #[error("the database is in use by another process (is a carevault server running on this data directory?)")]
    Locked,
}

impl From<sled::Error> for StorageError {
    fn from(e: sled::Error) -> Self {
        let text = e.to_string();
        // sled reports its lock only as text; a second process racing past
        // the check in `Store::open` gets here.
        if text.contains("could not acquire lock") { StorageError::Locked } else { StorageError::Io(text) }
    }
}

impl From<std::io::Error> for StorageError {
    fn from(e: std::io::Error) -> Self {
        StorageError::Io(e.to_string())
    }
}

/// Current version of a record and the patient it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// Current version.
    pub version: u64,
    /// Owning patient (the record itself for patients).
    pub patient_id: [u8; 16],
}

/// The opened sled database and its trees.
#[derive(Clone)]
pub struct Store {
    pub(crate) db: sled::Db,
    pub(crate) heads: sled::Tree,
    pub(crate) records: sled::Tree,
    pub(crate) deks: sled::Tree,
    pub(crate) blind: sled::Tree,
    pub(crate) blind_owner: sled::Tree,
    pub(crate) coverage_by_patient: sled::Tree,
    pub(crate) audit: sled::Tree,
    pub(crate) audit_by_patient: sled::Tree,
    pub(crate) access: sled::Tree,
    pub(crate) pending: sled::Tree,
    /// What opening the store had to repair.
    recovered: Recovery,
}

fn head_key(kind: RecordKind, id: &[u8; 16]) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = kind.tag();
    k[1..].copy_from_slice(id);
    k
}

pub(crate) fn record_key(kind: RecordKind, id: &[u8; 16], version: u64) -> [u8; 25] {
    let mut k = [0u8; 25];
    k[..17].copy_from_slice(&head_key(kind, id));
    k[17..].copy_from_slice(&version.to_be_bytes());
    k
}

/// `audit_by_patient_epoch` keys are grouped in epochs of 2^16 consecutive entries, so
/// that the index keys being written are those of the newest epoch: a small,
/// hot part of the tree, however many patients and entries the store holds.
pub(crate) const AUDIT_EPOCH_BITS: u32 = 16;

/// The tree of audit index keys.
const AUDIT_INDEX_TREE: &str = "audit_by_patient_epoch";

/// Where stores written before epochs kept the index (see [`Store::migrate_audit_index`]).
const LEGACY_AUDIT_INDEX_TREE: &[u8] = b"audit_by_patient";

/// The epoch of an entry: its sequence shifted right by [`AUDIT_EPOCH_BITS`].
fn audit_epoch(seq: u64) -> u32 {
    u32::try_from(seq >> AUDIT_EPOCH_BITS).unwrap_or(u32::MAX)
}

fn key_epoch(k: &[u8]) -> u32 {
    k.get(..4).and_then(|b| b.try_into().ok()).map_or(0, u32::from_be_bytes)
}

/// An `audit_by_patient_epoch` key: epoch (u32) · patient (16) · sequence (u64).
pub(crate) type AuditIndexKey = [u8; 28];

/// Where the patient and the sequence start in an [`AuditIndexKey`].
const INDEX_PATIENT_AT: usize = 4;
const INDEX_SEQ_AT: usize = 20;

pub(crate) fn audit_index_key(patient: &[u8; 16], seq: u64) -> AuditIndexKey {
    let mut k = [0u8; 28];
    k[..INDEX_PATIENT_AT].copy_from_slice(&audit_epoch(seq).to_be_bytes());
    k[INDEX_PATIENT_AT..INDEX_SEQ_AT].copy_from_slice(patient);
    k[INDEX_SEQ_AT..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn arr16(b: &[u8]) -> Result<[u8; 16], StorageError> {
    b.try_into().map_err(|_| StorageError::Corrupt("bad id length"))
}

fn u64_at(b: &[u8], at: usize) -> Result<u64, StorageError> {
    let s: [u8; 8] = b.get(at..at + 8).and_then(|s| s.try_into().ok()).ok_or(StorageError::Corrupt("bad u64"))?;
    Ok(u64::from_be_bytes(s))
}

/// Decodes a `heads` value.
pub(crate) fn decode_head(v: &[u8]) -> Result<Head, StorageError> {
    if v.len() != 24 {
        return Err(StorageError::Corrupt("bad head"));
    }
    Ok(Head { version: u64_at(v, 0)?, patient_id: arr16(&v[8..24])? })
}

fn encode_head(h: Head) -> [u8; 24] {
    let mut v = [0u8; 24];
    v[..8].copy_from_slice(&h.version.to_be_bytes());
    v[8..].copy_from_slice(&h.patient_id);
    v
}

/// Every stored key that belongs to one patient (its record, its coverages,
/// their versions, index entries and data key): what an erasure removes.
#[derive(Debug, Default)]
pub struct Footprint {
    /// (tree, key) pairs to remove.
    pub keys: Vec<(MetaTree, Vec<u8>)>,
    /// The patient's coverage ids.
    pub coverages: Vec<[u8; 16]>,
    /// Stored record versions (patient and coverages).
    pub record_versions: u64,
}

/// A stored audit entry: its canonical bytes and the hash stored beside them.
#[derive(Debug, Clone)]
pub struct StoredAuditEntry {
    /// The sequence stored beside the entry (its block slot, or its key).
    pub sequence: u64,
    /// Canonical encoding.
    pub bytes: Vec<u8>,
    /// Stored SHA-256 of `bytes`.
    pub hash: [u8; 32],
}

impl StoredAuditEntry {
    /// The entry as the verifier takes it: bytes, and the hash and sequence stored beside them.
    pub fn raw(self) -> crate::audit::RawEntry {
        crate::audit::RawEntry::stored(self.bytes, self.hash, self.sequence)
    }
}

impl Store {
    /// Opens (or creates) the database under `dir`, finishing any batch of
    /// commits a crash interrupted (see [`sequencer::recover`]). `cache_bytes`
    /// bounds sled's page cache.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Store, StorageError> {
        drop(snapshot::lock_shared(dir)?);
        let db = sled::Config::new().path(dir).cache_capacity(cache_bytes).mode(sled::Mode::HighThroughput).open()?;
        let mut store = Store {
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
            recovered: Recovery::default(),
            db,
        };
        store.migrate_audit_index()?;
        let recovered = sequencer::recover(&store)?;
        if recovered != Recovery::default() {
            tracing::warn!(
                replayed = recovered.replayed,
                dropped = recovered.dropped,
                "finished a batch of commits that a crash interrupted"
            );
        }
        store.recovered = recovered;
        Ok(store)
    }

    /// What opening the store repaired: the commits of a batch a crash
    /// interrupted that were replayed or dropped (none for a clean store).
    pub fn recovery(&self) -> Recovery {
        self.recovered
    }

    /// Moves the index of a store written before epochs (tree `audit_by_patient`,
    /// keys patient (16) · sequence (u64)) into the epoch-keyed tree, then drops
    /// the old tree. Rerun in full if a crash interrupts it: sled recovers a
    /// prefix of its log, so once the drop is durable every insert before it is.
    fn migrate_audit_index(&self) -> Result<(), StorageError> {
        if !self.db.tree_names().iter().any(|n| n.as_ref() == LEGACY_AUDIT_INDEX_TREE) {
            return Ok(());
        }
        let old = self.db.open_tree(LEGACY_AUDIT_INDEX_TREE)?;
        let mut moved = 0u64;
        for kv in old.iter() {
            let (k, _) = kv?;
            let patient = arr16(k.get(..16).ok_or(StorageError::Corrupt("short audit index key"))?)?;
            self.audit_by_patient.insert(audit_index_key(&patient, u64_at(&k, 16)?), &[])?;
            moved += 1;
        }
        self.db.drop_tree(LEGACY_AUDIT_INDEX_TREE)?;
        self.db.flush()?;
        tracing::info!(keys = moved, "moved the audit index to epoch-grouped keys");
        Ok(())
    }

    /// Copies every tree into a new database at `dest` (which must not
    /// exist) and makes it durable: a compacted, consistent backup of a
    /// store no server is using. Only live values are copied, never sled's
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
        let mut durability = durability::Durability::open(dest, None)?;
        durability.sync(&out)?;
        Ok(copied)
    }

    /// Current version and owner of a record.
    pub fn head(&self, kind: RecordKind, id: &[u8; 16]) -> Result<Option<Head>, StorageError> {
        self.heads.get(head_key(kind, id))?.map(|v| decode_head(&v)).transpose()
    }

    /// A record's sealed bytes at a version.
    pub fn record(&self, kind: RecordKind, id: &[u8; 16], version: u64) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.records.get(record_key(kind, id, version))?.map(|v| v.to_vec()))
    }

    /// Every stored version of a record, oldest first.
    pub fn versions(&self, kind: RecordKind, id: &[u8; 16]) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        self.records
            .scan_prefix(head_key(kind, id))
            .map(|kv| {
                let (k, v) = kv?;
                Ok((u64_at(&k, 17)?, v.to_vec()))
            })
            .collect()
    }

    /// Everything stored for a patient (see [`Footprint`]).
    pub fn footprint(&self, patient: &[u8; 16]) -> Result<Footprint, StorageError> {
        let mut f = Footprint { coverages: self.coverages_of(patient)?, ..Footprint::default() };
        let mut owners = vec![head_key(RecordKind::Patient, patient)];
        for c in &f.coverages {
            let mut k = patient.to_vec();
            k.extend_from_slice(c);
            f.keys.push((MetaTree::CoverageByPatient, k));
            owners.push(head_key(RecordKind::Coverage, c));
        }
        for owner in owners {
            if self.heads.contains_key(owner)? {
                f.keys.push((MetaTree::Heads, owner.to_vec()));
            }
            for kv in self.records.scan_prefix(owner) {
                let (k, _) = kv?;
                f.keys.push((MetaTree::Records, k.to_vec()));
                f.record_versions += 1;
            }
            if let Some(index) = self.blind_owner.get(owner)? {
                f.keys.extend(index.chunks(BLIND_KEY_LEN).map(|k| (MetaTree::Blind, k.to_vec())));
                f.keys.push((MetaTree::BlindOwner, owner.to_vec()));
            }
        }
        Ok(f)
    }

    /// A value in the `access` tree.
    pub fn access_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.access.get(key)?.map(|v| v.to_vec()))
    }

    /// Every `access` entry under `prefix`, in key order.
    pub fn access_scan(&self, prefix: &[u8]) -> Result<Vec<KeyValue>, StorageError> {
        self.access
            .scan_prefix(prefix)
            .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(Into::into))
            .collect()
    }

    /// A patient's wrapped data key.
    pub fn wrapped_dek(&self, patient: &[u8; 16]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.deks.get(patient)?.map(|v| v.to_vec()))
    }

    /// Up to `limit` records of a kind with ids after `after`, in id order.
    pub fn list(
        &self,
        kind: RecordKind,
        after: Option<[u8; 16]>,
        limit: usize,
    ) -> Result<Vec<([u8; 16], Head)>, StorageError> {
        let start = match after {
            Some(id) => {
                let mut k = head_key(kind, &id).to_vec();
                k.push(0); // strictly after
                k
            }
            None => vec![kind.tag()],
        };
        let end = vec![kind.tag() + 1];
        self.heads
            .range(start..end)
            .take(limit)
            .map(|kv| {
                let (k, v) = kv?;
                Ok((arr16(&k[1..])?, decode_head(&v)?))
            })
            .collect()
    }

    /// Distinct patients whose blind index entry of `index_kind` has this HMAC, up to `limit`.
    pub fn blind_lookup(&self, index_kind: u8, mac: &[u8; 16], limit: usize) -> Result<Vec<[u8; 16]>, StorageError> {
        let mut prefix = Vec::with_capacity(17);
        prefix.push(index_kind);
        prefix.extend_from_slice(mac);
        let mut out: Vec<[u8; 16]> = Vec::new();
        for kv in self.blind.scan_prefix(&prefix) {
            let (k, _) = kv?;
            let p = arr16(k.get(17..33).ok_or(StorageError::Corrupt("short blind key"))?)?;
            if !out.contains(&p) {
                out.push(p);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Ids of a patient's coverages.
    pub fn coverages_of(&self, patient: &[u8; 16]) -> Result<Vec<[u8; 16]>, StorageError> {
        self.coverage_by_patient
            .scan_prefix(patient)
            .map(|kv| {
                let (k, _) = kv?;
                arr16(&k[16..])
            })
            .collect()
    }

    /// Sequences of entries that name `patient`, from `from` onwards, in order:
    /// one range per epoch, from `from`'s epoch to the newest one indexed.
    pub fn audit_seqs_for_patient(
        &self,
        patient: &[u8; 16],
        from: u64,
    ) -> impl Iterator<Item = Result<u64, StorageError>> + '_ {
        let (epochs, failed) = match self.audit_by_patient.last() {
            Ok(Some((k, _))) => (Some(audit_epoch(from)..=key_epoch(&k)), None),
            Ok(None) => (None, None),
            Err(e) => (None, Some(Err(StorageError::from(e)))),
        };
        let patient = *patient;
        failed.into_iter().chain(epochs.into_iter().flatten().flat_map(move |e| {
            let start = audit_index_key(&patient, from.max(u64::from(e) << AUDIT_EPOCH_BITS));
            let mut end = start;
            end[INDEX_SEQ_AT..].copy_from_slice(&u64::MAX.to_be_bytes());
            self.audit_by_patient.range(start..=end).map(|kv| {
                let (k, _) = kv?;
                u64_at(&k, INDEX_SEQ_AT)
            })
        }))
    }

    /// Raw access for tamper tests: overwrite a record's sealed bytes.
    /// Named `danger_` because it bypasses the sequencer and the audit trail.
    pub fn danger_put_record_raw(
        &self,
        kind: RecordKind,
        id: &[u8; 16],
        version: u64,
        value: Vec<u8>,
    ) -> Result<(), StorageError> {
        self.records.insert(record_key(kind, id, version), value)?;
        self.db.flush()?;
        Ok(())
    }

    /// Raw access for tests that restore an old wrapped data key (to show a
    /// destroyed version cannot open it). Bypasses the sequencer and the audit trail.
    pub fn danger_put_dek_raw(&self, patient: &[u8; 16], value: Vec<u8>) -> Result<(), StorageError> {
        self.deks.insert(patient, value)?;
        self.db.flush()?;
        Ok(())
    }
}
