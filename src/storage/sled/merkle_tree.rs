//! The `merkle` tree: the stored subtrees of the audit entries' Merkle tree
//! (see `storage::tree`).
//!
//! ```text
//! key    height (u8, 4 or more) ‖ index (u64, big-endian)
//! value  the subtree's hash (32)
//! ```
//!
//! The `checkpoints` tree: signed checkpoints and witnesses' cosignatures.
//!
//! ```text
//! key  `N` ‖ tree size (u64)                                   value  signed at (i64 µs) ‖ the signed note
//! key  `C` ‖ tree size (u64) ‖ key id (4) ‖ witness name (UTF-8)  value  added at (i64 µs) ‖ the cosignature line (UTF-8)
//! ```
//!
//! Each is written once with a flush and fdatasync before it is answered.
//!
//! A batch's subtrees are written after its entries and data, before its redo
//! record is removed, in the order they completed. As sled recovers a prefix
//! of its writes, after a crash every subtree completed before the newest
//! stored height-4 one is there; [`SledStore::repair_tree`] rebuilds from that
//! one on (at most the entries of one batch, and every entry of a store
//! written before the tree existed) when the store is started.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use super::SledStore;
use super::layout::u64_at;
use crate::audit::merkle::{self, CompactRange, Hash, NodeId};
use crate::storage::tree::{self, STORED_FROM_LEVEL};
use crate::storage::{StorageError, StoredCheckpoint};

/// Subtrees written per sled batch while rebuilding.
const REBUILD_BATCH: usize = 4096;

/// A subtree's key.
pub(super) fn node_key(id: NodeId) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = id.level;
    k[1..].copy_from_slice(&id.index.to_be_bytes());
    k
}

fn checkpoint_key(size: u64) -> [u8; 9] {
    let mut k = [b'N'; 9];
    k[1..].copy_from_slice(&size.to_be_bytes());
    k
}

fn cosignature_prefix(size: u64) -> [u8; 9] {
    let mut k = [b'C'; 9];
    k[1..].copy_from_slice(&size.to_be_bytes());
    k
}

impl SledStore {
    fn checkpoint_of(&self, key: &[u8], value: &[u8]) -> Result<StoredCheckpoint, StorageError> {
        const BAD: StorageError = StorageError::Corrupt("bad stored checkpoint");
        let size = u64_at(key, 1)?;
        let signed_micros = i64::from_be_bytes(value.get(..8).ok_or(BAD)?.try_into().map_err(|_| BAD)?);
        let mut cosignatures = Vec::new();
        for kv in self.checkpoints.scan_prefix(cosignature_prefix(size)) {
            let (_, v) = kv?;
            let line = std::str::from_utf8(v.get(8..).ok_or(BAD)?).map_err(|_| BAD)?;
            cosignatures.push(line.to_string());
        }
        Ok(StoredCheckpoint { size, note: value[8..].to_vec(), signed_micros, cosignatures })
    }

    /// See the `Backend` method of the same name.
    pub fn checkpoint_sync(&self, size: Option<u64>) -> Result<Option<StoredCheckpoint>, StorageError> {
        let visible = self.visible_checkpoint();
        let found = match size {
            Some(n) if n > visible => None,
            Some(n) => self.checkpoints.get(checkpoint_key(n))?.map(|v| (checkpoint_key(n).to_vec().into(), v)),
            None => self.checkpoints.range(checkpoint_key(0)..=checkpoint_key(visible)).next_back().transpose()?,
        };
        found.map(|(k, v)| self.checkpoint_of(&k, &v)).transpose()
    }

    /// See the `Backend` method of the same name.
    pub fn checkpoints_after_sync(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<StoredCheckpoint>, StorageError> {
        let start = match after {
            None => checkpoint_key(0).to_vec(),
            Some(n) => match n.checked_add(1) {
                Some(m) => checkpoint_key(m).to_vec(),
                None => return Ok(Vec::new()),
            },
        };
        let mut out = Vec::new();
        for kv in self.checkpoints.range(start..) {
            let (k, v) = kv?;
            if k.first() != Some(&b'N') || out.len() == limit || u64_at(&k, 1)? > self.visible_checkpoint() {
                break;
            }
            out.push(self.checkpoint_of(&k, &v)?);
        }
        Ok(out)
    }

    /// See the `Backend` method of the same name. Cosignature keys sort by
    /// tree size, so this walks them backwards from `before`.
    pub fn cosigned_checkpoints_sync(
        &self,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<StoredCheckpoint>, StorageError> {
        let end = match before {
            Some(n) => cosignature_prefix(n).to_vec(),
            None => vec![b'D'],
        };
        let mut out: Vec<StoredCheckpoint> = Vec::new();
        for kv in self.checkpoints.range(cosignature_prefix(0).to_vec()..end).rev() {
            let (k, _) = kv?;
            let size = u64_at(&k, 1)?;
            if out.last().is_some_and(|c| c.size == size) {
                continue;
            }
            if out.len() == limit {
                break;
            }
            if let Some(c) = self.checkpoint_sync(Some(size))? {
                out.push(c);
            }
        }
        Ok(out)
    }

    /// Makes what sled holds durable, through the pipeline's [`Durability`](super::durability::Durability).
    fn sync_now(&self) -> Result<(), StorageError> {
        let durability = self.durability.get().ok_or(StorageError::SequencerGone)?;
        durability.lock().unwrap_or_else(|p| p.into_inner()).sync(&self.db).map_err(StorageError::from)
    }

    /// Raw access for tamper tests: removes every stored checkpoint and
    /// cosignature. Named `danger_` because it bypasses the checkpointer.
    #[cfg(any(test, feature = "testing"))]
    pub fn danger_clear_checkpoints(&self) -> Result<(), StorageError> {
        self.checkpoints.clear()?;
        self.visible_checkpoint.store(0, Ordering::Release);
        self.db.flush()?;
        Ok(())
    }

    /// Raw access for tamper tests: removes every stored Merkle subtree (the
    /// next start rebuilds them from the entries as they are then).
    #[cfg(any(test, feature = "testing"))]
    pub fn danger_clear_tree(&self) -> Result<(), StorageError> {
        self.merkle.clear()?;
        self.db.flush()?;
        Ok(())
    }

    /// See the `Backend` method of the same name.
    pub fn save_checkpoint_sync(&self, size: u64, note: &[u8], signed_micros: i64) -> Result<bool, StorageError> {
        let mut value = signed_micros.to_be_bytes().to_vec();
        value.extend_from_slice(note);
        let swapped = self.checkpoints.compare_and_swap(checkpoint_key(size), None as Option<&[u8]>, Some(value))?;
        self.sync_now()?;
        self.visible_checkpoint.fetch_max(size, Ordering::AcqRel);
        Ok(swapped.is_ok())
    }

    /// See the `Backend` method of the same name.
    pub fn save_cosignature_sync(
        &self,
        size: u64,
        witness: &str,
        key_id: [u8; 4],
        line: &str,
        now_micros: i64,
    ) -> Result<(), StorageError> {
        let mut key = cosignature_prefix(size).to_vec();
        key.extend_from_slice(&key_id);
        key.extend_from_slice(witness.as_bytes());
        let mut value = now_micros.to_be_bytes().to_vec();
        value.extend_from_slice(line.as_bytes());
        self.checkpoints.insert(key, value)?;
        self.sync_now()
    }

    /// Stored subtree hashes, in the order asked.
    pub fn tree_nodes_sync(&self, ids: &[NodeId]) -> Result<Vec<Option<Hash>>, StorageError> {
        ids.iter()
            .map(|id| match self.merkle.get(node_key(*id))? {
                None => Ok(None),
                Some(v) => v.as_ref().try_into().map(Some).map_err(|_| StorageError::Corrupt("bad Merkle node")),
            })
            .collect()
    }

    /// The hashes of `ids`, from stored subtrees and entries.
    pub(super) fn read_nodes_sync(&self, ids: &[NodeId]) -> Result<HashMap<NodeId, Hash>, StorageError> {
        let want = tree::fetch(ids);
        let nodes = want
            .nodes
            .iter()
            .copied()
            .zip(self.tree_nodes_sync(&want.nodes)?)
            .filter_map(|(id, h)| h.map(|h| (id, h)))
            .collect();
        let mut leaves = HashMap::new();
        for r in &want.leaves {
            for e in self.audit_range(r.start, r.end - 1) {
                let e = e?;
                leaves.insert(e.sequence, merkle::leaf_hash(&e.bytes));
            }
        }
        tree::resolve(ids, &nodes, &leaves)
    }

    /// The tree's durable size: the entries the sync thread has made durable
    /// (only those may be signed or proved; a crash could take back the rest).
    pub fn tree_size_sync(&self) -> u64 {
        self.tree_size.load(Ordering::Acquire)
    }

    /// Called by the sync thread once a batch (and its subtrees) is durable.
    pub(super) fn publish_tree_size(&self, size: u64) {
        self.tree_size.fetch_max(size, Ordering::AcqRel);
    }

    /// At open: every checkpoint stored is durable (what survived a crash is:
    /// sled recovers a prefix of its log), so all may be read.
    pub(super) fn open_checkpoints(&self) -> Result<(), StorageError> {
        let newest = match self.checkpoints.scan_prefix(b"N").next_back() {
            Some(kv) => u64_at(&kv?.0, 1)?,
            None => 0,
        };
        self.visible_checkpoint.store(newest, Ordering::Release);
        Ok(())
    }

    /// The newest checkpoint that may be read: one is readable only once its
    /// write is durable.
    fn visible_checkpoint(&self) -> u64 {
        self.visible_checkpoint.load(Ordering::Acquire)
    }

    /// Brings the stored subtrees level with the entries (see the module
    /// docs) and returns the tree's right edge. Run before the pipeline starts.
    pub(super) fn repair_tree(&self) -> Result<CompactRange, StorageError> {
        let size = match self.audit_head_sync()? {
            Some((seq, _)) => seq + 1,
            None => 0,
        };
        // The newest stored height-4 subtree; every subtree completed before
        // it is stored, those it completed may not all be.
        let from = match self.merkle.scan_prefix([STORED_FROM_LEVEL]).next_back() {
            None => 0,
            Some(kv) => {
                let (k, _) = kv?;
                u64_at(&k, 1)? << STORED_FROM_LEVEL
            }
        };
        if from + (1 << STORED_FROM_LEVEL) > size && from != 0 {
            return Err(StorageError::Corrupt("the Merkle tree covers entries the chain does not have"));
        }
        let peaks = merkle::range_nodes(0..from);
        let mut range = tree::compact_range(from, &self.read_nodes_sync(&peaks)?)?;
        let mut batch = sled::Batch::default();
        let mut pending = 0usize;
        for e in self.audit_range(from, size.saturating_sub(1)).take((size - from) as usize) {
            let e = e?;
            if e.sequence != range.size() {
                return Err(StorageError::Corrupt("audit entries out of sequence under the Merkle tree"));
            }
            range.append_with(merkle::leaf_hash(&e.bytes), |id, h| {
                if tree::stored(id) {
                    batch.insert(&node_key(id), &h);
                    pending += 1;
                }
            });
            if pending >= REBUILD_BATCH {
                self.merkle.apply_batch(std::mem::take(&mut batch))?;
                pending = 0;
            }
        }
        self.merkle.apply_batch(batch)?;
        if range.size() != size {
            return Err(StorageError::Corrupt("audit entries missing under the Merkle tree"));
        }
        if size - from > (1 << STORED_FROM_LEVEL) {
            tracing::info!(entries = size - from, "built the Merkle tree over the audit entries");
        }
        self.publish_tree_size(size);
        Ok(range)
    }
}
