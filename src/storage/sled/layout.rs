//! The sled engine's trees and key layouts (all integers big-endian). Only
//! this engine knows them; README.md documents them for independent readers.
//!
//! | tree                  | key                                                     | value |
//! |-----------------------|---------------------------------------------------------|-------|
//! | `heads`               | kind (1: patient, 2: coverage) · id (16)                 | current version (u64) · patient id (16) |
//! | `records`             | kind · id (16) · version (u64)                           | sealed record |
//! | `deks`                | patient id (16)                                          | wrapped data key |
//! | `blind`               | index key (50: tag · HMAC · patient · kind · record id)  | empty |
//! | `blind_owner`         | kind · record id (16)                                    | the record's index keys, concatenated |
//! | `coverage_by_patient` | patient (16) · coverage id (16)                          | empty |
//! | `audit`               | sequence of the block's first entry (u64)                | a block of entries (see `audit_blocks`) |
//! | `audit_by_patient_epoch` | epoch = sequence >> 16 (u32) · patient (16) · sequence (u64) | empty |
//! | `access`              | `R` · patient (16)                                       | restricted since (i64 µs) |
//! | `access`              | `G` · grant id (16)                                      | break-glass grant (JSON) |
//! | `access`              | `A` · SHA-256(subject) (32) · patient (16)               | grant id (16) · expires (i64 µs) |
//! | `access`              | `H` · patient (16)                                       | legal hold placed at (i64 µs) |
//! | `access`              | `E` · kind (1) · id (16)                                 | erasure tombstone (JSON) |
//! | `access`              | `J` · job name (`rewrap`, `reencrypt`, `blind`, `keyop`) | the job's state (JSON) |
//! | `access`              | `K` · idempotency key hash (32)                          | kind (1) · id (16) of the record the create made |
//! | `pending`             | `batch`                                                  | redo record of the batch being written |

use crate::storage::StorageError;
use crate::storage::model::{Head, IndexKey, JobName, RecordRef};

/// Every tree the engine writes, and its name on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Tree {
    Access,
    Deks,
    Heads,
    Records,
    Blind,
    BlindOwner,
    CoverageByPatient,
    Audit,
    AuditByPatient,
}

impl Tree {
    /// The trees a redo record may name; a tree's tag there is its position plus one.
    pub(super) const REDO_TAGS: [Tree; 9] = [
        Tree::Access,
        Tree::Deks,
        Tree::Heads,
        Tree::Records,
        Tree::Blind,
        Tree::BlindOwner,
        Tree::CoverageByPatient,
        Tree::Audit,
        Tree::AuditByPatient,
    ];

    /// Its tag in a redo record.
    pub(super) fn tag(self) -> u8 {
        let at = Tree::REDO_TAGS.iter().position(|t| *t == self).unwrap_or(0);
        u8::try_from(at + 1).unwrap_or(0)
    }

    /// The tree a redo-record tag names.
    pub(super) fn from_tag(tag: u8) -> Option<Tree> {
        Tree::REDO_TAGS.get(usize::from(tag).checked_sub(1)?).copied()
    }
}

/// `heads` key: kind · id.
pub(super) fn head_key(r: RecordRef) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = r.kind.tag();
    k[1..].copy_from_slice(&r.id);
    k
}

/// The record a `heads` or `blind_owner` key names.
pub(super) fn record_of(k: &[u8]) -> Result<RecordRef, StorageError> {
    let id = arr16(k.get(1..17).ok_or(StorageError::Corrupt("short record key"))?)?;
    RecordRef::from_tag(k[0], id).ok_or(StorageError::Corrupt("unknown record kind"))
}

/// `records` key: kind · id · version.
pub(super) fn version_key(r: RecordRef, version: u64) -> [u8; 25] {
    let mut k = [0u8; 25];
    k[..17].copy_from_slice(&head_key(r));
    k[17..].copy_from_slice(&version.to_be_bytes());
    k
}

/// `coverage_by_patient` key.
pub(super) fn coverage_link(patient: &[u8; 16], coverage: &[u8; 16]) -> [u8; 32] {
    let mut k = [0u8; 32];
    k[..16].copy_from_slice(patient);
    k[16..].copy_from_slice(coverage);
    k
}

fn access_key(prefix: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut k = prefix.to_vec();
    for p in parts {
        k.extend_from_slice(p);
    }
    k
}

pub(super) fn restricted_key(patient: &[u8; 16]) -> Vec<u8> {
    access_key(b"R", &[patient])
}

pub(super) fn hold_key(patient: &[u8; 16]) -> Vec<u8> {
    access_key(b"H", &[patient])
}

pub(super) fn grant_key(id: &[u8; 16]) -> Vec<u8> {
    access_key(b"G", &[id])
}

pub(super) fn active_grant_key(subject: &[u8; 32], patient: &[u8; 16]) -> Vec<u8> {
    access_key(b"A", &[subject, patient])
}

pub(super) fn tombstone_key(r: RecordRef) -> Vec<u8> {
    access_key(b"E", &[&[r.kind.tag()], &r.id])
}

pub(super) fn job_key(name: JobName) -> Vec<u8> {
    access_key(b"J", &[name.as_str().as_bytes()])
}

/// `access` key of the record a create made under an idempotency key; the value is kind · id.
pub(super) fn idempotency_key(key: &[u8; 32]) -> Vec<u8> {
    access_key(b"K", &[key])
}

/// `audit_by_patient_epoch` keys are grouped in epochs of 2^16 consecutive
/// entries, so that the index keys being written are those of the newest
/// epoch: a small, hot part of the tree, however many entries the store holds.
pub(super) const AUDIT_EPOCH_BITS: u32 = 16;

/// The epoch of an entry: its sequence shifted right by [`AUDIT_EPOCH_BITS`].
pub(super) fn audit_epoch(seq: u64) -> u32 {
    u32::try_from(seq >> AUDIT_EPOCH_BITS).unwrap_or(u32::MAX)
}

pub(super) fn key_epoch(k: &[u8]) -> u32 {
    k.get(..4).and_then(|b| b.try_into().ok()).map_or(0, u32::from_be_bytes)
}

/// An `audit_by_patient_epoch` key: epoch (u32) · patient (16) · sequence (u64).
pub(super) type AuditIndexKey = [u8; 28];

/// Where the patient and the sequence start in an [`AuditIndexKey`].
pub(super) const INDEX_PATIENT_AT: usize = 4;
pub(super) const INDEX_SEQ_AT: usize = 20;

pub(super) fn audit_index_key(patient: &[u8; 16], seq: u64) -> AuditIndexKey {
    let mut k = [0u8; 28];
    k[..INDEX_PATIENT_AT].copy_from_slice(&audit_epoch(seq).to_be_bytes());
    k[INDEX_PATIENT_AT..INDEX_SEQ_AT].copy_from_slice(patient);
    k[INDEX_SEQ_AT..].copy_from_slice(&seq.to_be_bytes());
    k
}

pub(super) fn arr16(b: &[u8]) -> Result<[u8; 16], StorageError> {
    b.try_into().map_err(|_| StorageError::Corrupt("bad id length"))
}

pub(super) fn u64_at(b: &[u8], at: usize) -> Result<u64, StorageError> {
    let s: [u8; 8] = b.get(at..at + 8).and_then(|s| s.try_into().ok()).ok_or(StorageError::Corrupt("bad u64"))?;
    Ok(u64::from_be_bytes(s))
}

pub(super) fn i64_of(b: &[u8]) -> Result<i64, StorageError> {
    let s: [u8; 8] = b.try_into().map_err(|_| StorageError::Corrupt("bad time"))?;
    Ok(i64::from_be_bytes(s))
}

/// Decodes a `heads` value.
pub(super) fn decode_head(v: &[u8]) -> Result<Head, StorageError> {
    if v.len() != 24 {
        return Err(StorageError::Corrupt("bad head"));
    }
    Ok(Head { version: u64_at(v, 0)?, patient_id: arr16(&v[8..24])? })
}

pub(super) fn encode_head(h: Head) -> [u8; 24] {
    let mut v = [0u8; 24];
    v[..8].copy_from_slice(&h.version.to_be_bytes());
    v[8..].copy_from_slice(&h.patient_id);
    v
}

/// Decodes a `blind_owner` value: the record's index keys, 50 bytes each.
pub(super) fn decode_index_set(v: &[u8]) -> Result<Vec<IndexKey>, StorageError> {
    IndexKey::decode_set(v)
}

pub(super) fn encode_index_set(keys: &[IndexKey]) -> Vec<u8> {
    IndexKey::encode_set(keys)
}
