//! Planning a batch, the same for every engine: decide each commit (record
//! version and data-key generation checks, change preconditions), chain and
//! encode its audit entry, and list what it changes.
//!
//! Planning reads the store through a [`Snapshot`] (the engine's current
//! state, under whatever lock makes it the only writer) seen through the
//! batch's own earlier changes. It writes nothing: if it fails, nothing of
//! the batch was written. A commit whose entry cannot be encoded fails
//! alone; the rest of the batch goes on.

use std::collections::HashMap;

use super::{CommitOutcome, Committed, Pending};
use crate::audit::AuditEntry;
use crate::audit::merkle::{CompactRange, Hash, NodeId, leaf_hash};
use crate::crypto::WrappedDataKey;
use crate::domain::PatientId;
use crate::storage::StorageError;
use crate::storage::model::{Change, Expect, Head, IndexKey, JobName, RecordRef, RecordWrite};

/// A stored value planning may read.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StateKey {
    /// A record's head.
    Head(RecordRef),
    /// A patient's wrapped data key.
    DataKey([u8; 16]),
    /// A stored version's ciphertext.
    Version(RecordRef, u64),
    /// A record's blind-index entries.
    IndexSet(RecordRef),
    /// A break-glass grant.
    Grant([u8; 16]),
    /// An erasure tombstone.
    Tombstone(RecordRef),
    /// A job's state.
    Job(JobName),
    /// A patient's legal hold (since, µs).
    LegalHold([u8; 16]),
    /// The ids of a patient's coverages.
    Coverages([u8; 16]),
    /// The record a create made under an idempotency key.
    Idempotency([u8; 32]),
}

/// A stored value, as planning sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateValue {
    /// A head.
    Head(Head),
    /// Bytes: a wrapped key, a ciphertext, a JSON document.
    Bytes(Vec<u8>),
    /// Index entries.
    Index(Vec<IndexKey>),
    /// A time (µs).
    Micros(i64),
    /// Record ids, sorted.
    Ids(Vec<[u8; 16]>),
    /// A record.
    Record(RecordRef),
}

/// The engine's stored state, read by planning.
pub trait Snapshot {
    /// The value stored under `key`, if any.
    fn get(&self, key: &StateKey) -> Result<Option<StateValue>, StorageError>;
}

/// Every key planning `batch` may read: an engine that fetches remotely
/// fetches these first (see `postgres`).
pub fn keys_read(batch: &[Pending]) -> Vec<StateKey> {
    let mut keys = Vec::new();
    for p in batch {
        let c = &p.commit;
        if let Some(w) = &c.write {
            keys.push(StateKey::Head(w.record));
            keys.push(StateKey::DataKey(w.patient_id));
            if w.record.kind == crate::crypto::RecordKind::Coverage && w.expected_version == 0 {
                keys.push(StateKey::Coverages(w.patient_id));
            }
        }
        for ch in &c.changes {
            keys.extend(expected_key(ch));
        }
    }
    keys.sort_by_key(|k| format!("{k:?}"));
    keys.dedup();
    keys
}

/// The stored state seen through the batch's own earlier changes.
struct Overlay<'a> {
    store: &'a dyn Snapshot,
    changed: HashMap<StateKey, Option<StateValue>>,
}

impl Overlay<'_> {
    fn get(&self, key: &StateKey) -> Result<Option<StateValue>, StorageError> {
        match self.changed.get(key) {
            Some(v) => Ok(v.clone()),
            None => self.store.get(key),
        }
    }

    fn set(&mut self, key: StateKey, value: Option<StateValue>) {
        self.changed.insert(key, value);
    }

    fn bytes(&self, key: &StateKey) -> Result<Option<Vec<u8>>, StorageError> {
        match self.get(key)? {
            None => Ok(None),
            Some(StateValue::Bytes(b)) => Ok(Some(b)),
            Some(_) => Err(StorageError::Corrupt("stored value of the wrong kind")),
        }
    }

    fn head(&self, record: RecordRef) -> Result<Option<Head>, StorageError> {
        match self.get(&StateKey::Head(record))? {
            None => Ok(None),
            Some(StateValue::Head(h)) => Ok(Some(h)),
            Some(_) => Err(StorageError::Corrupt("stored value of the wrong kind")),
        }
    }
}

/// One commit that goes ahead: its chained entry and what it changes
/// (nothing, for an aborted commit or a read).
#[derive(Debug, Clone)]
pub struct PlannedCommit {
    /// The entry's sequence.
    pub sequence: u64,
    /// The canonical entry bytes.
    pub entry: Vec<u8>,
    /// SHA-256 of `entry`.
    pub hash: [u8; 32],
    /// The patients the entry names (its patient and every patient it returned), for the audit index.
    pub patients: Vec<[u8; 16]>,
    /// The record write, if it applies.
    pub write: Option<RecordWrite>,
    /// The other changes, if they apply.
    pub changes: Vec<Change>,
}

impl PlannedCommit {
    /// Whether the commit changes anything besides the audit trail.
    pub fn changes_data(&self) -> bool {
        self.write.is_some() || !self.changes.is_empty()
    }
}

/// What a batch does: the commits that go ahead (in sequence order), each
/// commit's result (in batch order), the new chain head, and the Merkle
/// tree's growth.
#[derive(Debug)]
pub struct Planned {
    /// The commits that go ahead.
    pub commits: Vec<PlannedCommit>,
    /// Each queued commit's result, in queue order.
    pub results: Vec<Result<Committed, StorageError>>,
    /// The newest entry after the batch.
    pub head: (u64, [u8; 32]),
    /// The tree's right edge after the batch.
    pub tree: CompactRange,
    /// Every subtree the batch's entries completed that engines store (see
    /// `storage::tree`), in the order they completed.
    pub nodes: Vec<(NodeId, Hash)>,
}

/// Decides every commit of `batch` against `snapshot`, chaining entries
/// after `start` with time `now`, and growing `tree` (the tree of every
/// entry through `start`) by their leaves.
pub fn plan(
    snapshot: &dyn Snapshot,
    batch: &[Pending],
    start: (u64, [u8; 32]),
    tree: &CompactRange,
    now: i64,
) -> Result<Planned, StorageError> {
    if tree.size() != start.0 + 1 {
        return Err(StorageError::Corrupt("the Merkle tree's size is not the chain's length"));
    }
    let mut tree = tree.clone();
    let mut nodes = Vec::with_capacity(batch.len() * 2 + 8);
    let mut ov = Overlay { store: snapshot, changed: HashMap::new() };
    let mut results = Vec::with_capacity(batch.len());
    let (mut seq, mut prev) = start;
    let mut commits = Vec::with_capacity(batch.len());
    for p in batch {
        let c = &p.commit;
        let mut outcome = CommitOutcome::Written;
        for ch in &c.changes {
            if !precondition_holds(ch, &ov)? {
                outcome = match (ch, outcome) {
                    (Change::KeyStateIs(_), _) | (_, CommitOutcome::KeyStateMoved) => CommitOutcome::KeyStateMoved,
                    _ => CommitOutcome::Conflict { current: 0 },
                };
            }
        }
        if let (Some(w), CommitOutcome::Written) = (&c.write, outcome) {
            let current = ov.head(w.record)?.map_or(0, |h| h.version);
            let key_current = w.new_dek.is_some() || {
                let stored = ov.bytes(&StateKey::DataKey(w.patient_id))?;
                stored.and_then(|v| WrappedDataKey(v).generation().ok()) == Some(w.key_generation)
            };
            if current != w.expected_version {
                outcome = CommitOutcome::Conflict { current };
            } else if !key_current {
                outcome = CommitOutcome::KeyChanged;
            }
        }
        let mut entry = c.entry.clone();
        entry.sequence = seq + 1;
        entry.previous_hash = prev;
        entry.time_micros = now;
        if outcome != CommitOutcome::Written {
            entry.outcome = crate::domain::Outcome::Aborted.as_str().to_string();
        }
        // An entry that does not fit the format fails its commit alone,
        // before anything of it is planned, let alone written.
        let bytes = match entry.encode() {
            Ok(b) => b,
            Err(e) => {
                results.push(Err(StorageError::Unencodable(e.to_string())));
                continue;
            }
        };
        let written = outcome == CommitOutcome::Written;
        if written {
            if let Some(w) = &c.write {
                apply_write(w, &mut ov)?;
            }
            for ch in &c.changes {
                apply_change(ch, &mut ov)?;
            }
        }
        seq += 1;
        let hash = crate::crypto::sha256(&bytes);
        tree.append_with(leaf_hash(&bytes), |id, h| {
            if crate::storage::tree::stored(id) {
                nodes.push((id, h))
            }
        });
        commits.push(PlannedCommit {
            sequence: seq,
            entry: bytes,
            hash,
            patients: named_patients(&entry),
            write: if written { c.write.clone() } else { None },
            // A key-state check writes nothing.
            changes: if written {
                c.changes.iter().filter(|ch| !matches!(ch, Change::KeyStateIs(_))).cloned().collect()
            } else {
                Vec::new()
            },
        });
        prev = hash;
        results.push(Ok(Committed { sequence: seq, hash, time_micros: now, outcome }));
    }
    Ok(Planned { commits, results, head: (seq, prev), tree, nodes })
}

/// The patients an entry names: its patient and every patient it returned.
fn named_patients(entry: &AuditEntry) -> Vec<[u8; 16]> {
    let mut out: Vec<[u8; 16]> = std::iter::once(&entry.patient_id)
        .chain(entry.returned_patient_ids.iter())
        .filter_map(|pid| PatientId::parse(pid))
        .map(|id| id.bytes())
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// The key a change's precondition reads, if it has one.
fn expected_key(ch: &Change) -> Vec<StateKey> {
    match ch {
        Change::Restriction { .. } | Change::ActiveGrant { .. } => Vec::new(),
        Change::LegalHold { patient, .. } => vec![StateKey::LegalHold(*patient)],
        Change::Grant { id, .. } => vec![StateKey::Grant(*id)],
        Change::Tombstone { record, .. } => vec![StateKey::Tombstone(*record)],
        Change::DataKey { patient, .. } => vec![StateKey::DataKey(*patient)],
        Change::Reseal { record, version, .. } => vec![StateKey::Version(*record, *version)],
        Change::IndexSet { record, .. } => vec![StateKey::IndexSet(*record), StateKey::Head(*record)],
        Change::Job { name, .. } => vec![StateKey::Job(*name)],
        Change::KeyStateIs(_) => vec![StateKey::Job(JobName::KeyState)],
        Change::IdempotencyKey { key, .. } => vec![StateKey::Idempotency(*key)],
        Change::ErasePatient { patient, .. } => {
            vec![StateKey::Head(RecordRef::patient(*patient)), StateKey::Coverages(*patient)]
        }
    }
}

fn ids(v: Option<StateValue>) -> Result<Vec<[u8; 16]>, StorageError> {
    match v {
        None => Ok(Vec::new()),
        Some(StateValue::Ids(ids)) => Ok(ids),
        Some(_) => Err(StorageError::Corrupt("stored value of the wrong kind")),
    }
}

fn bytes_hold(expect: &Expect<Vec<u8>>, ov: &Overlay<'_>, key: &StateKey) -> Result<bool, StorageError> {
    Ok(expect.holds(ov.bytes(key)?.as_ref()))
}

fn precondition_holds(ch: &Change, ov: &Overlay<'_>) -> Result<bool, StorageError> {
    match ch {
        Change::Restriction { .. } | Change::ActiveGrant { .. } => Ok(true),
        Change::LegalHold { patient, expect, .. } => {
            let current = match ov.get(&StateKey::LegalHold(*patient))? {
                None => None,
                Some(StateValue::Micros(t)) => Some(t),
                Some(_) => return Err(StorageError::Corrupt("stored value of the wrong kind")),
            };
            Ok(expect.holds(current.as_ref()))
        }
        Change::Grant { id, expect, .. } => bytes_hold(expect, ov, &StateKey::Grant(*id)),
        Change::Tombstone { record, expect, .. } => bytes_hold(expect, ov, &StateKey::Tombstone(*record)),
        Change::DataKey { patient, expect, .. } => bytes_hold(expect, ov, &StateKey::DataKey(*patient)),
        Change::Job { name, expect, .. } => bytes_hold(expect, ov, &StateKey::Job(*name)),
        Change::KeyStateIs(bytes) => Ok(ov.bytes(&StateKey::Job(JobName::KeyState))?.as_ref() == Some(bytes)),
        Change::IdempotencyKey { key, .. } => Ok(ov.get(&StateKey::Idempotency(*key))?.is_none()),
        Change::Reseal { record, version, expect, .. } => {
            Ok(ov.bytes(&StateKey::Version(*record, *version))?.as_ref() == Some(expect))
        }
        Change::IndexSet { record, expect, expect_head, .. } => {
            let current = match ov.get(&StateKey::IndexSet(*record))? {
                None => None,
                Some(StateValue::Index(v)) => Some(v),
                Some(_) => return Err(StorageError::Corrupt("stored value of the wrong kind")),
            };
            let head_ok = match expect_head {
                None => true,
                Some(h) => ov.head(*record)? == Some(*h),
            };
            Ok(current == *expect && head_ok)
        }
        // The patient must exist, with exactly the coverages that were read.
        Change::ErasePatient { patient, coverages } => {
            let mut expected = coverages.clone();
            expected.sort_unstable();
            Ok(ov.head(RecordRef::patient(*patient))?.is_some()
                && ids(ov.get(&StateKey::Coverages(*patient))?)? == expected)
        }
    }
}

fn apply_write(w: &RecordWrite, ov: &mut Overlay<'_>) -> Result<(), StorageError> {
    let version = w.expected_version + 1;
    if w.record.kind == crate::crypto::RecordKind::Coverage && w.expected_version == 0 {
        let key = StateKey::Coverages(w.patient_id);
        let mut set = ids(ov.get(&key)?)?;
        set.push(w.record.id);
        set.sort_unstable();
        ov.set(key, Some(StateValue::Ids(set)));
    }
    ov.set(StateKey::Version(w.record, version), Some(StateValue::Bytes(w.sealed.clone())));
    if let Some(dek) = &w.new_dek {
        ov.set(StateKey::DataKey(w.patient_id), Some(StateValue::Bytes(dek.clone())));
    }
    ov.set(StateKey::Head(w.record), Some(StateValue::Head(Head { version, patient_id: w.patient_id })));
    ov.set(StateKey::IndexSet(w.record), Some(StateValue::Index(w.index_keys.clone())));
    Ok(())
}

fn apply_change(ch: &Change, ov: &mut Overlay<'_>) -> Result<(), StorageError> {
    let bytes = |v: &Option<Vec<u8>>| v.clone().map(StateValue::Bytes);
    match ch {
        Change::Restriction { .. } | Change::ActiveGrant { .. } | Change::KeyStateIs(_) => {}
        Change::LegalHold { patient, since, .. } => {
            ov.set(StateKey::LegalHold(*patient), since.map(StateValue::Micros));
        }
        Change::Grant { id, value, .. } => ov.set(StateKey::Grant(*id), Some(StateValue::Bytes(value.clone()))),
        Change::Tombstone { record, value, .. } => {
            ov.set(StateKey::Tombstone(*record), Some(StateValue::Bytes(value.clone())))
        }
        Change::DataKey { patient, value, .. } => ov.set(StateKey::DataKey(*patient), bytes(value)),
        Change::Reseal { record, version, value, .. } => {
            ov.set(StateKey::Version(*record, *version), Some(StateValue::Bytes(value.clone())))
        }
        Change::IndexSet { record, keys, .. } => {
            ov.set(StateKey::IndexSet(*record), Some(StateValue::Index(keys.clone())))
        }
        Change::Job { name, value, .. } => ov.set(StateKey::Job(*name), bytes(value)),
        Change::IdempotencyKey { key, record } => {
            ov.set(StateKey::Idempotency(*key), Some(StateValue::Record(*record)))
        }
        Change::ErasePatient { patient, coverages } => {
            for r in
                std::iter::once(RecordRef::patient(*patient)).chain(coverages.iter().map(|c| RecordRef::coverage(*c)))
            {
                ov.set(StateKey::Head(r), None);
                ov.set(StateKey::IndexSet(r), None);
            }
            ov.set(StateKey::Coverages(*patient), None);
        }
    }
    Ok(())
}
