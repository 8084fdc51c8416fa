//! The Merkle tree over the audit entries as every engine stores it.
//!
//! Leaf `i` is entry `i`'s leaf hash (the genesis entry is leaf 0, so a
//! chain whose newest entry has sequence `s` is a tree of `s + 1` leaves).
//! An engine stores the hash of every complete subtree of height
//! [`STORED_FROM_LEVEL`] or more (16 leaves and up), written with the entries
//! that complete it, in the same crash-recoverable write. Lower subtrees are
//! computed from the entries themselves (at most 15 of them, neighbours in
//! one or two storage blocks): storing them would cost more writes per entry
//! than the entries' own blocks.
//!
//! A proof or a root at size `n` names a few subtrees ([`merkle::range_nodes`]
//! of its ranges): O(log n) stored ones, plus the leaves of at most two runs of
//! 16 entries. [`Fetch`] says which to read; [`resolve`] turns what was read
//! into the subtrees' hashes. Both are pure, so each engine reads its own way
//! (sled synchronously, PostgreSQL inside a batch's transaction or on the pool).

use std::collections::HashMap;
use std::ops::Range;

use super::{Backend, StorageError};
use crate::audit::merkle::{self, CompactRange, Hash, NodeId};

/// The lowest height of the subtrees an engine stores.
pub const STORED_FROM_LEVEL: u8 = 4;

/// Whether an engine stores this subtree's hash.
pub fn stored(id: NodeId) -> bool {
    id.level >= STORED_FROM_LEVEL
}

/// What to read to know some subtrees' hashes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fetch {
    /// Stored subtrees, sorted.
    pub nodes: Vec<NodeId>,
    /// Entry sequences whose leaf hashes are needed, as sorted disjoint ranges.
    pub leaves: Vec<Range<u64>>,
}

/// What to read for `ids`.
pub fn fetch(ids: &[NodeId]) -> Fetch {
    let mut nodes: Vec<NodeId> = ids.iter().copied().filter(|id| stored(*id)).collect();
    nodes.sort_unstable();
    nodes.dedup();
    let mut low: Vec<Range<u64>> = ids.iter().filter(|id| !stored(**id)).map(|id| id.leaves()).collect();
    low.sort_by_key(|r| r.start);
    let mut leaves: Vec<Range<u64>> = Vec::new();
    for r in low {
        match leaves.last_mut() {
            // Neighbours, or in one run of 16 entries (one read either way).
            Some(last)
                if r.start <= last.end || r.start >> STORED_FROM_LEVEL == (last.end - 1) >> STORED_FROM_LEVEL =>
            {
                last.end = last.end.max(r.end)
            }
            _ => leaves.push(r),
        }
    }
    Fetch { nodes, leaves }
}

/// The hashes of `ids` from the stored subtrees and leaf hashes that were
/// read for them; a missing one is [`StorageError::Corrupt`].
pub fn resolve(
    ids: &[NodeId],
    nodes: &HashMap<NodeId, Hash>,
    leaves: &HashMap<u64, Hash>,
) -> Result<HashMap<NodeId, Hash>, StorageError> {
    let mut out = HashMap::with_capacity(ids.len());
    for id in ids {
        let h = if stored(*id) {
            *nodes.get(id).ok_or(StorageError::Corrupt("a stored Merkle subtree is missing"))?
        } else {
            let hashes = id
                .leaves()
                .map(|i| leaves.get(&i).copied())
                .collect::<Option<Vec<_>>>()
                .ok_or(StorageError::Corrupt("an audit entry under the Merkle tree is missing"))?;
            merkle::root(&hashes)
        };
        out.insert(*id, h);
    }
    Ok(out)
}

/// The right edge of the tree of `size` leaves, from its peaks' hashes.
pub fn compact_range(size: u64, hashes: &HashMap<NodeId, Hash>) -> Result<CompactRange, StorageError> {
    let peaks = merkle::range_nodes(0..size)
        .into_iter()
        .map(|id| hashes.get(&id).copied().ok_or(StorageError::Corrupt("a Merkle peak is missing")))
        .collect::<Result<Vec<_>, _>>()?;
    CompactRange::from_parts(size, peaks).ok_or(StorageError::Corrupt("Merkle peaks do not fit the size"))
}

/// Reads through the store's [`Backend`]: the hashes of `ids` in a tree of
/// at least `size` leaves (every id must lie within it).
pub async fn read_nodes(b: &dyn Backend, ids: &[NodeId]) -> Result<HashMap<NodeId, Hash>, StorageError> {
    let want = fetch(ids);
    let nodes: HashMap<NodeId, Hash> = want
        .nodes
        .iter()
        .copied()
        .zip(b.tree_nodes(&want.nodes).await?)
        .filter_map(|(id, h)| h.map(|h| (id, h)))
        .collect();
    let mut leaves = HashMap::new();
    for r in &want.leaves {
        let len = usize::try_from(r.end - r.start).unwrap_or(usize::MAX);
        for e in b.audit_entries(r.start, r.end - 1, len).await? {
            leaves.insert(e.sequence, merkle::leaf_hash(&e.bytes));
        }
    }
    resolve(ids, &nodes, &leaves)
}

/// The tree's root at `size` leaves.
pub async fn root(b: &dyn Backend, size: u64) -> Result<Hash, StorageError> {
    let ids = merkle::range_nodes(0..size);
    let hashes = read_nodes(b, &ids).await?;
    Ok(compact_range(size, &hashes)?.root())
}

/// The hashes of a proof over `ranges` (from [`merkle::inclusion_ranges`] or
/// [`merkle::consistency_ranges`]).
pub async fn proof(b: &dyn Backend, ranges: &[Range<u64>]) -> Result<Vec<Hash>, StorageError> {
    let ids = merkle::nodes_needed(ranges);
    let hashes = read_nodes(b, &ids).await?;
    merkle::assemble(ranges, |id| hashes.get(&id).copied()).ok_or(StorageError::Corrupt("a Merkle subtree is missing"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_subtrees_are_read_as_leaves_and_high_ones_as_stored_nodes() {
        let leaves: Vec<Hash> = (0..100u32).map(|i| merkle::leaf_hash(&i.to_be_bytes())).collect();
        let mut range = CompactRange::new();
        let mut all = HashMap::new();
        for l in &leaves {
            range.append_with(*l, |id, h| {
                all.insert(id, h);
            });
        }
        let stored_nodes: HashMap<NodeId, Hash> =
            all.iter().filter(|(id, _)| stored(**id)).map(|(k, v)| (*k, *v)).collect();
        assert!(stored_nodes.len() < leaves.len() / 8 + 1, "{} stored for {}", stored_nodes.len(), leaves.len());
        for n in 1..=100u64 {
            for i in (0..n).step_by(7) {
                let ranges = merkle::inclusion_ranges(i, n).unwrap();
                let ids = merkle::nodes_needed(&ranges);
                let want = fetch(&ids);
                assert!(want.leaves.len() <= 2, "{i} of {n}: {:?}", want.leaves);
                assert!(want.leaves.iter().map(|r| r.end - r.start).sum::<u64>() <= 32);
                let read: HashMap<u64, Hash> =
                    want.leaves.iter().flat_map(|r| r.clone()).map(|i| (i, leaves[i as usize])).collect();
                let got = resolve(&ids, &stored_nodes, &read).unwrap();
                let proof = merkle::assemble(&ranges, |id| got.get(&id).copied()).unwrap();
                assert_eq!(Some(proof), merkle::inclusion_proof(&leaves[..n as usize], i as usize));
            }
            let ids = merkle::range_nodes(0..n);
            let want = fetch(&ids);
            let read: HashMap<u64, Hash> =
                want.leaves.iter().flat_map(|r| r.clone()).map(|i| (i, leaves[i as usize])).collect();
            let got = resolve(&ids, &stored_nodes, &read).unwrap();
            assert_eq!(compact_range(n, &got).unwrap().root(), merkle::root(&leaves[..n as usize]));
        }
        let ids = merkle::range_nodes(0..100);
        assert!(resolve(&ids, &HashMap::new(), &HashMap::new()).is_err(), "nothing stored is an error");
    }
}
