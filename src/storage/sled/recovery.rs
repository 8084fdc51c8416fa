//! Repairing, when the store opens, what a crash cut short (why this is
//! enough is argued once, in `apply`), and moving a store written before the
//! epoch-grouped audit index to it.

use super::SledStore;
use super::apply::{PENDING_KEY, apply_ops, decode_redo};
use super::layout;
use crate::audit::AuditEntry;
use crate::domain::PatientId;
use crate::storage::StorageError;

/// What opening a store had to repair after a crash.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    /// Commits of an interrupted batch whose data changes were replayed.
    pub replayed: usize,
    /// Commits of an interrupted batch dropped because their audit entry never became durable.
    pub dropped: usize,
}

/// Finishes a batch a crash interrupted: the newest block's index keys are
/// written again, and a redo record present is replayed for every commit
/// whose entry is durable and dropped for the others. Only what is missing
/// is written: opening an intact store changes nothing.
pub(super) fn recover(store: &SledStore) -> Result<Recovery, StorageError> {
    let head = store.audit_head_sync()?.map_or(0, |(seq, _)| seq);
    let mut report = Recovery::default();
    let mut reindex: Vec<u64> = store.audit_newest_block()?;
    let redo = store.pending.get(PENDING_KEY)?;
    if let Some(redo) = &redo {
        for (seq, ops) in decode_redo(redo)? {
            if seq <= head {
                apply_ops(store, &ops)?;
                reindex.push(seq);
                report.replayed += 1;
            } else {
                report.dropped += 1;
            }
        }
    }
    for seq in reindex {
        if let Some(stored) = store.audit_entry_sync(seq)? {
            let entry =
                AuditEntry::decode(&stored.bytes).map_err(|_| StorageError::Corrupt("undecodable audit entry"))?;
            for patient in std::iter::once(&entry.patient_id).chain(entry.returned_patient_ids.iter()) {
                let Some(p) = PatientId::parse(patient) else { continue };
                let k = layout::audit_index_key(&p.bytes(), seq);
                if !store.audit_by_patient.contains_key(k)? {
                    store.audit_by_patient.insert(k, &[])?;
                }
            }
        }
    }
    if redo.is_some() {
        store.pending.remove(PENDING_KEY)?;
    }
    Ok(report)
}

/// Where stores written before epochs kept the audit index.
const LEGACY_AUDIT_INDEX_TREE: &[u8] = b"audit_by_patient";

/// Moves the index of a store written before epochs (tree `audit_by_patient`,
/// keys patient (16) · sequence (u64)) into the epoch-keyed tree, then drops
/// the old tree. Rerun in full if a crash interrupts it: sled recovers a
/// prefix of its log, so once the drop is durable every insert before it is.
pub(super) fn migrate_audit_index(store: &SledStore) -> Result<(), StorageError> {
    if !store.db.tree_names().iter().any(|n| n.as_ref() == LEGACY_AUDIT_INDEX_TREE) {
        return Ok(());
    }
    let old = store.db.open_tree(LEGACY_AUDIT_INDEX_TREE)?;
    let mut moved = 0u64;
    for kv in old.iter() {
        let (k, _) = kv?;
        let patient = layout::arr16(k.get(..16).ok_or(StorageError::Corrupt("short audit index key"))?)?;
        store.audit_by_patient.insert(layout::audit_index_key(&patient, layout::u64_at(&k, 16)?), &[])?;
        moved += 1;
    }
    store.db.drop_tree(LEGACY_AUDIT_INDEX_TREE)?;
    store.db.flush()?;
    tracing::info!(keys = moved, "moved the audit index to epoch-grouped keys");
    Ok(())
}
