//! Writing a planned batch to sled in a crash-recoverable order.
//!
//! # Why the order recovers
//!
//! sled recovers a prefix of its log: after a crash, if a write is
//! recovered, so is every write made before it (recovery stops at the first
//! torn or missing message). A batch is written as:
//!
//! 1. if any commit of the batch changes data: the redo record (`pending`
//!    tree), holding every data change of the batch as exact tree operations,
//!    each with its commit's sequence;
//! 2. for each block of entries (consecutive commits, see `audit_blocks`): the
//!    block, then for each of its commits in sequence order its
//!    `audit_by_patient_epoch` keys, then its data changes;
//! 3. the Merkle subtrees the batch completed (`merkle_tree`: derived from
//!    the entries, rebuilt from them at start if a crash cut them short);
//! 4. the removal of the redo record.
//!
//! So after a crash: every durable entry but possibly those of the newest
//! block has its index keys; a redo record present means its batch may be
//! partly applied; a commit in it whose entry is durable may be missing some
//! changes, and one whose entry is not durable has none (its changes come
//! after its block) and was never acknowledged. [`super::recovery`] writes
//! the newest block's index keys again and replays the redo record's
//! operations of every commit whose entry is durable (exact values, so
//! replaying is idempotent, and nothing later can have been written over
//! them: the next batch starts only after the record's removal), dropping
//! the others.
//!
//! sled transactions would give the same atomicity, but the first
//! transaction switches sled, for the whole process, to a global
//! reader-writer lock that every read takes and each transaction holds
//! exclusively, stalling reads on every worker while a batch is written.
//! This order needs no lock: the sequencer thread is the only writer.

use std::collections::HashMap;

use super::SledStore;
use super::audit_blocks::{block_len, encode_block};
use super::layout::{self, Tree};
use super::merkle_tree::node_key;
use crate::audit::merkle::{Hash, NodeId};
use crate::storage::StorageError;
use crate::storage::model::{Change, Head, IndexKey, RecordRef, RecordWrite};
use crate::storage::sequencer::plan::PlannedCommit;

/// Key of the redo record in the `pending` tree.
pub(super) const PENDING_KEY: &[u8] = b"batch";

/// One change to one tree; `None` removes the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Op {
    pub(super) tree: Tree,
    pub(super) key: Vec<u8>,
    pub(super) value: Option<Vec<u8>>,
}

/// A batch as sled writes it: per commit, its index keys and tree
/// operations; the blocks of entries; the redo record.
pub(super) struct Writes {
    commits: Vec<CommitWrites>,
    blocks: Vec<(u64, Vec<u8>, std::ops::Range<usize>)>,
    nodes: Vec<([u8; 9], Hash)>,
    pub(super) redo: Option<Vec<u8>>,
}

struct CommitWrites {
    sequence: u64,
    index_keys: Vec<layout::AuditIndexKey>,
    ops: Vec<Op>,
}

/// The trees as the batch being translated sees them: stored state under
/// the batch's own earlier operations.
struct Builder<'a> {
    store: &'a SledStore,
    changed: HashMap<(Tree, Vec<u8>), Option<Vec<u8>>>,
    ops: Vec<Op>,
}

impl Builder<'_> {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        if let Some(v) = self.changed.get(&(tree, key.to_vec())) {
            return Ok(v.clone());
        }
        Ok(self.store.tree(tree).get(key)?.map(|v| v.to_vec()))
    }

    /// Keys under `prefix`, stored or added by the batch, minus those it removed.
    fn keys_with_prefix(&self, tree: Tree, prefix: &[u8]) -> Result<Vec<Vec<u8>>, StorageError> {
        let mut keys = std::collections::BTreeSet::new();
        for kv in self.store.tree(tree).scan_prefix(prefix) {
            keys.insert(kv?.0.to_vec());
        }
        for ((t, k), v) in &self.changed {
            if *t == tree && k.starts_with(prefix) {
                if v.is_some() {
                    keys.insert(k.clone());
                } else {
                    keys.remove(k);
                }
            }
        }
        Ok(keys.into_iter().collect())
    }

    fn set(&mut self, tree: Tree, key: &[u8], value: Option<Vec<u8>>) {
        self.changed.insert((tree, key.to_vec()), value.clone());
        self.ops.push(Op { tree, key: key.to_vec(), value });
    }

    /// Replaces a record's index entries with `keys`: only the keys of the
    /// old set that the new one lacks are removed and only the new set's
    /// keys the old one lacks are added; the owner list is rewritten only if
    /// the set changed (an update that leaves its indexed fields alone
    /// writes no index key at all).
    fn replace_index(&mut self, record: RecordRef, keys: &[IndexKey]) -> Result<(), StorageError> {
        let owner = layout::head_key(record);
        let new = layout::encode_index_set(keys);
        let old = self.get(Tree::BlindOwner, &owner)?;
        if old.as_deref() == Some(new.as_slice()) {
            return Ok(());
        }
        let old = match &old {
            Some(v) => layout::decode_index_set(v)?,
            None => Vec::new(),
        };
        for k in old.iter().filter(|k| !keys.contains(k)) {
            self.set(Tree::Blind, &k.to_bytes(), None);
        }
        for k in keys.iter().filter(|k| !old.contains(k)) {
            self.set(Tree::Blind, &k.to_bytes(), Some(Vec::new()));
        }
        self.set(Tree::BlindOwner, &owner, Some(new));
        Ok(())
    }

    /// The operations of one record write: sealed version, data key, head,
    /// coverage link, and the record's index entries (the old set replaced).
    ///
    /// Readers do not wait for a batch, so the order is the order in which
    /// they may see the changes: the new version and the data key exist
    /// before the head names them, and the head before any index entry or
    /// link leads to it.
    fn write(&mut self, w: &RecordWrite) -> Result<(), StorageError> {
        let version = w.expected_version + 1;
        self.set(Tree::Records, &layout::version_key(w.record, version), Some(w.sealed.clone()));
        if let Some(dek) = &w.new_dek {
            self.set(Tree::Deks, &w.patient_id, Some(dek.clone()));
        }
        let head = layout::encode_head(Head { version, patient_id: w.patient_id });
        self.set(Tree::Heads, &layout::head_key(w.record), Some(head.to_vec()));
        if w.record.kind == crate::crypto::RecordKind::Coverage && w.expected_version == 0 {
            self.set(Tree::CoverageByPatient, &layout::coverage_link(&w.patient_id, &w.record.id), Some(Vec::new()));
        }
        self.replace_index(w.record, &w.index_keys)
    }

    fn change(&mut self, ch: &Change) -> Result<(), StorageError> {
        let micros = |t: &Option<i64>| t.map(|t| t.to_be_bytes().to_vec());
        match ch {
            Change::Restriction { patient, since } => {
                self.set(Tree::Access, &layout::restricted_key(patient), micros(since))
            }
            Change::LegalHold { patient, since, .. } => {
                self.set(Tree::Access, &layout::hold_key(patient), micros(since))
            }
            Change::Grant { id, value, .. } => self.set(Tree::Access, &layout::grant_key(id), Some(value.clone())),
            Change::ActiveGrant { subject, patient, grant, expires } => {
                let mut v = grant.to_vec();
                v.extend_from_slice(&expires.to_be_bytes());
                self.set(Tree::Access, &layout::active_grant_key(subject, patient), Some(v));
            }
            Change::Tombstone { record, value, .. } => {
                self.set(Tree::Access, &layout::tombstone_key(*record), Some(value.clone()))
            }
            Change::DataKey { patient, value, .. } => self.set(Tree::Deks, patient, value.clone()),
            Change::Reseal { record, version, value, .. } => {
                self.set(Tree::Records, &layout::version_key(*record, *version), Some(value.clone()))
            }
            Change::IndexSet { record, keys, .. } => self.replace_index(*record, keys)?,
            Change::Job { name, value, .. } => self.set(Tree::Access, &layout::job_key(*name), value.clone()),
            Change::IdempotencyKey { key, record } => {
                self.set(Tree::Access, &layout::idempotency_key(key), Some(layout::head_key(*record).to_vec()))
            }
            Change::ErasePatient { patient, .. } => self.erase(patient)?,
            // A check only (planning dropped it).
            Change::KeyStateIs(_) => {}
        }
        Ok(())
    }

    /// Everything stored for a patient and every coverage it has now.
    fn erase(&mut self, patient: &[u8; 16]) -> Result<(), StorageError> {
        let mut owners = vec![RecordRef::patient(*patient)];
        for link in self.keys_with_prefix(Tree::CoverageByPatient, patient)? {
            let coverage = layout::arr16(link.get(16..).ok_or(StorageError::Corrupt("short coverage link"))?)?;
            owners.push(RecordRef::coverage(coverage));
            self.set(Tree::CoverageByPatient, &link, None);
        }
        for owner in owners {
            let hk = layout::head_key(owner);
            for k in self.keys_with_prefix(Tree::Records, &hk)? {
                self.set(Tree::Records, &k, None);
            }
            if let Some(index) = self.get(Tree::BlindOwner, &hk)? {
                for k in layout::decode_index_set(&index)? {
                    self.set(Tree::Blind, &k.to_bytes(), None);
                }
                self.set(Tree::BlindOwner, &hk, None);
            }
            self.set(Tree::Heads, &hk, None);
        }
        Ok(())
    }
}

/// Translates a planned batch into sled writes (reading what replacing
/// index sets and erasing need), encodes its blocks and redo record.
pub(super) fn translate(
    store: &SledStore,
    commits: &[PlannedCommit],
    nodes: &[(NodeId, Hash)],
) -> Result<Writes, StorageError> {
    let mut b = Builder { store, changed: HashMap::new(), ops: Vec::new() };
    let mut out = Vec::with_capacity(commits.len());
    for c in commits {
        let first = b.ops.len();
        if let Some(w) = &c.write {
            b.write(w)?;
        }
        for ch in &c.changes {
            b.change(ch)?;
        }
        let index_keys = c.patients.iter().map(|p| layout::audit_index_key(p, c.sequence)).collect();
        out.push(CommitWrites { sequence: c.sequence, index_keys, ops: b.ops.split_off(first) });
    }
    let redo = if out.iter().any(|c| !c.ops.is_empty()) { Some(encode_redo(&out)?) } else { None };
    let mut blocks = Vec::new();
    let mut at = 0;
    while let Some(first) = commits.get(at) {
        let n = block_len(commits[at..].iter().map(|c| c.entry.len() + 32));
        let values: Vec<Vec<u8>> = commits[at..at + n]
            .iter()
            .map(|c| {
                let mut v = c.entry.clone();
                v.extend_from_slice(&c.hash);
                v
            })
            .collect();
        let entries = commits[at..at + n].iter().zip(&values).map(|(c, v)| (c.sequence, v.as_slice()));
        blocks.push((first.sequence, encode_block(entries)?, at..at + n));
        at += n;
    }
    let nodes = nodes.iter().map(|(id, h)| (node_key(*id), *h)).collect();
    Ok(Writes { commits: out, blocks, nodes, redo })
}

#[cfg(test)]
impl Writes {
    /// Every data change of the batch, in order.
    pub(super) fn ops(&self) -> impl Iterator<Item = &Op> {
        self.commits.iter().flat_map(|c| &c.ops)
    }
}

/// Writes a translated batch in the order the module docs justify.
pub(super) fn write(store: &SledStore, w: &Writes) -> Result<(), StorageError> {
    if let Some(redo) = &w.redo {
        store.pending.insert(PENDING_KEY, redo.as_slice())?;
    }
    for (key, value, commits) in &w.blocks {
        store.audit.insert(key.to_be_bytes(), value.as_slice())?;
        for c in &w.commits[commits.clone()] {
            for k in &c.index_keys {
                store.audit_by_patient.insert(k, &[])?;
            }
            apply_ops(store, &c.ops)?;
        }
    }
    for (k, h) in &w.nodes {
        store.merkle.insert(k, h)?;
    }
    if w.redo.is_some() {
        store.pending.remove(PENDING_KEY)?;
    }
    Ok(())
}

pub(super) fn apply_ops(store: &SledStore, ops: &[Op]) -> Result<(), StorageError> {
    for op in ops {
        let tree = store.tree(op.tree);
        match &op.value {
            Some(v) => tree.insert(op.key.as_slice(), v.as_slice())?,
            None => tree.remove(op.key.as_slice())?,
        };
    }
    Ok(())
}

/// The redo record: for each commit that changes data, sequence (u64) ·
/// op count (u32) · ops, each op tree tag (u8) · key length (u32) · key ·
/// present (u8: 1 put, 0 remove) · [value length (u32) · value]. Integers big-endian.
fn encode_redo(commits: &[CommitWrites]) -> Result<Vec<u8>, StorageError> {
    let size: usize = commits
        .iter()
        .flat_map(|c| c.ops.iter())
        .map(|op| 10 + op.key.len() + op.value.as_ref().map_or(0, Vec::len))
        .sum::<usize>()
        + 12 * commits.len();
    let mut out = Vec::with_capacity(size);
    for c in commits.iter().filter(|c| !c.ops.is_empty()) {
        out.extend_from_slice(&c.sequence.to_be_bytes());
        out.extend_from_slice(&length_u32(c.ops.len())?);
        for op in &c.ops {
            out.push(op.tree.tag());
            out.extend_from_slice(&length_u32(op.key.len())?);
            out.extend_from_slice(&op.key);
            match &op.value {
                Some(v) => {
                    out.push(1);
                    out.extend_from_slice(&length_u32(v.len())?);
                    out.extend_from_slice(v);
                }
                None => out.push(0),
            }
        }
    }
    Ok(out)
}

/// A length or count as the u32 the redo record stores; longer is an error
/// (the batch is not written), never a saturated length.
fn length_u32(n: usize) -> Result<[u8; 4], StorageError> {
    u32::try_from(n).map(u32::to_be_bytes).map_err(|_| StorageError::Unencodable("redo record length".into()))
}

/// Parses a redo record: each commit's sequence and operations.
pub(super) fn decode_redo(mut b: &[u8]) -> Result<Vec<(u64, Vec<Op>)>, StorageError> {
    const BAD: StorageError = StorageError::Corrupt("bad redo record");
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], StorageError> {
        if b.len() < n {
            return Err(BAD);
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Ok(head)
    }
    fn u32_of(b: &mut &[u8]) -> Result<usize, StorageError> {
        let s: [u8; 4] = take(b, 4)?.try_into().map_err(|_| BAD)?;
        usize::try_from(u32::from_be_bytes(s)).map_err(|_| BAD)
    }
    let mut commits = Vec::new();
    while !b.is_empty() {
        let seq: [u8; 8] = take(&mut b, 8)?.try_into().map_err(|_| BAD)?;
        let n = u32_of(&mut b)?;
        let mut ops = Vec::with_capacity(n.min(1 << 16));
        for _ in 0..n {
            let tree = Tree::from_tag(take(&mut b, 1)?[0]).ok_or(BAD)?;
            let klen = u32_of(&mut b)?;
            let key = take(&mut b, klen)?.to_vec();
            let value = match take(&mut b, 1)?[0] {
                1 => {
                    let vlen = u32_of(&mut b)?;
                    Some(take(&mut b, vlen)?.to_vec())
                }
                0 => None,
                _ => return Err(BAD),
            };
            ops.push(Op { tree, key, value });
        }
        commits.push((u64::from_be_bytes(seq), ops));
    }
    Ok(commits)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    #[test]
    fn lengths_that_do_not_fit_a_u32_are_errors_not_saturated() {
        let too_long = usize::try_from(u64::from(u32::MAX) + 1).unwrap();
        assert!(matches!(length_u32(too_long), Err(StorageError::Unencodable(_))));
        assert_eq!(length_u32(7).unwrap(), [0, 0, 0, 7]);
    }

    #[test]
    fn the_redo_record_round_trips_and_rejects_truncation() {
        let ops = vec![
            Op { tree: Tree::Access, key: b"Gx".to_vec(), value: None },
            Op { tree: Tree::Records, key: vec![1; 25], value: Some(vec![7; 40]) },
        ];
        let commits = vec![
            CommitWrites { sequence: 8, index_keys: vec![], ops: vec![] },
            CommitWrites { sequence: 9, index_keys: vec![], ops: ops.clone() },
        ];
        let bytes = encode_redo(&commits).unwrap();
        let decoded = decode_redo(&bytes).unwrap();
        assert_eq!(decoded, vec![(9, ops)], "a commit without changes is not in the record");
        assert!(decode_redo(&bytes[..bytes.len() - 1]).is_err());
    }
}
