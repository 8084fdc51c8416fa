//! The RFC 6962 / RFC 9162 Merkle tree over the audit entries, as pure
//! functions over bytes: hashing, roots, inclusion and consistency proofs
//! (making them from a tree's leaves, and verifying them), and the compact
//! range a log keeps to extend its root one leaf at a time.
//!
//! - leaf `i`: `SHA-256(0x00 ‖ E_i)`, `E_i` the entry's canonical bytes;
//! - interior node: `SHA-256(0x01 ‖ left ‖ right)`;
//! - the root of `n` leaves (MTH): the empty string's SHA-256 for `n = 0`,
//!   the leaf hash for `n = 1`, else `node(MTH(first k), MTH(rest))` with `k`
//!   the largest power of two below `n`.
//!
//! Verification follows RFC 9162 §2.1.3.2 and §2.1.4.2 and rejects what
//! transparency-dev/merkle rejects (its test vectors run in the tests):
//! proofs of the wrong length, indexes or sizes out of range, and any
//! consistency proof from the empty tree.

use std::ops::Range;

use crate::crypto::{sha256, sha256_parts};

/// A SHA-256 hash.
pub type Hash = [u8; 32];

/// Why a proof does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// The index is not below the tree size, or the sizes are out of order.
    #[error("index or size out of range")]
    OutOfRange,
    /// The proof has too many or too few hashes, or one is not 32 bytes.
    #[error("proof has the wrong shape")]
    Malformed,
    /// The proof leads to another root.
    #[error("proof does not lead to the root")]
    Mismatch,
    /// A consistency proof from the empty tree proves nothing.
    #[error("a consistency proof from the empty tree proves nothing")]
    EmptyTree,
}

/// The leaf hash of an entry's canonical bytes.
pub fn leaf_hash(entry: &[u8]) -> Hash {
    sha256_parts(&[&[0], entry])
}

/// An interior node's hash.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut b = [0u8; 65];
    b[0] = 1;
    b[1..33].copy_from_slice(left);
    b[33..].copy_from_slice(right);
    sha256(&b)
}

/// The root of the empty tree.
pub fn empty_root() -> Hash {
    sha256(b"")
}

/// The largest power of two strictly below `n` (`n >= 2`).
fn split(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1 << (u64::BITS - 1 - (n - 1).leading_zeros())
}

/// The root (MTH) of a tree with these leaf hashes.
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = split(n as u64) as usize;
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// A complete subtree: the `index`-th run of `2^level` leaves (level 0:
/// the leaf itself). What a log stores to answer proofs without its leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId {
    /// Height: the subtree has `2^level` leaves.
    pub level: u8,
    /// Position among the subtrees of that height, from 0.
    pub index: u64,
}

impl NodeId {
    /// The leaves it covers.
    pub fn leaves(&self) -> Range<u64> {
        let start = self.index << self.level;
        start..start + (1u64 << self.level)
    }
}

/// The complete subtrees that make up leaves `lo..hi`, largest first: at each
/// position the largest aligned subtree that fits. For the ranges proofs name
/// (see [`inclusion_ranges`]) their roots fold, right to left, into the
/// range's MTH; for `0..n` they are the tree's peaks.
pub fn range_nodes(range: Range<u64>) -> Vec<NodeId> {
    let mut out = Vec::new();
    let mut at = range.start;
    while at < range.end {
        let align = if at == 0 { 63 } else { at.trailing_zeros() };
        let fits = 63 - (range.end - at).leading_zeros();
        let level = align.min(fits);
        out.push(NodeId { level: level as u8, index: at >> level });
        at += 1u64 << level;
    }
    out
}

/// The MTH of a range from its [`range_nodes`]' hashes, in that order.
pub fn fold_nodes(hashes: &[Hash]) -> Hash {
    let mut it = hashes.iter().rev();
    match it.next() {
        None => empty_root(),
        Some(last) => it.fold(*last, |acc, left| node_hash(left, &acc)),
    }
}

/// The leaf ranges whose MTHs make up the inclusion proof (RFC 9162 PATH)
/// of leaf `index` in a tree of `size` leaves, in proof order, or `None` if
/// the index is out of range.
pub fn inclusion_ranges(index: u64, size: u64) -> Option<Vec<Range<u64>>> {
    if index >= size {
        return None;
    }
    let mut out = Vec::new();
    path(0..size, index, &mut out);
    Some(out)
}

fn path(r: Range<u64>, m: u64, out: &mut Vec<Range<u64>>) {
    let n = r.end - r.start;
    if n <= 1 {
        return;
    }
    let k = split(n);
    let mid = r.start + k;
    if m < k {
        path(r.start..mid, m, out);
        out.push(mid..r.end);
    } else {
        path(mid..r.end, m - k, out);
        out.push(r.start..mid);
    }
}

/// The leaf ranges whose MTHs make up the consistency proof (RFC 9162
/// PROOF) of the tree of `old` leaves with the tree of `size`, in proof
/// order, or `None` unless `0 < old <= size`.
pub fn consistency_ranges(old: u64, size: u64) -> Option<Vec<Range<u64>>> {
    if old == 0 || old > size {
        return None;
    }
    let mut out = Vec::new();
    subproof(0..size, old, true, &mut out);
    Some(out)
}

fn subproof(r: Range<u64>, m: u64, complete: bool, out: &mut Vec<Range<u64>>) {
    let n = r.end - r.start;
    if m == n {
        if !complete {
            out.push(r);
        }
        return;
    }
    let k = split(n);
    let mid = r.start + k;
    if m <= k {
        subproof(r.start..mid, m, complete, out);
        out.push(mid..r.end);
    } else {
        subproof(mid..r.end, m - k, false, out);
        out.push(r.start..mid);
    }
}

/// Every stored subtree that proofs over `ranges` need, sorted, once each.
pub fn nodes_needed<'a>(ranges: impl IntoIterator<Item = &'a Range<u64>>) -> Vec<NodeId> {
    let mut out: Vec<NodeId> = ranges.into_iter().flat_map(|r| range_nodes(r.clone())).collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// A proof's hashes from the stored subtrees `lookup` finds; `None` if one is missing.
pub fn assemble(ranges: &[Range<u64>], lookup: impl Fn(NodeId) -> Option<Hash>) -> Option<Vec<Hash>> {
    ranges
        .iter()
        .map(|r| range_nodes(r.clone()).into_iter().map(&lookup).collect::<Option<Vec<_>>>().map(|h| fold_nodes(&h)))
        .collect()
}

/// The MTH of leaves `lo..hi` of `leaves`.
fn range_root(leaves: &[Hash], r: &Range<u64>) -> Hash {
    root(&leaves[r.start as usize..r.end as usize])
}

/// The inclusion proof (RFC 9162 PATH) of leaf `index` in the tree of these
/// leaves, or `None` if the index is out of range.
pub fn inclusion_proof(leaves: &[Hash], index: usize) -> Option<Vec<Hash>> {
    let ranges = inclusion_ranges(index as u64, leaves.len() as u64)?;
    Some(ranges.iter().map(|r| range_root(leaves, r)).collect())
}

/// The consistency proof (RFC 9162 PROOF) of the tree of the first `old`
/// leaves with the tree of all of them, or `None` unless `0 < old <= n`.
pub fn consistency_proof(leaves: &[Hash], old: usize) -> Option<Vec<Hash>> {
    let ranges = consistency_ranges(old as u64, leaves.len() as u64)?;
    Some(ranges.iter().map(|r| range_root(leaves, r)).collect())
}

fn hash_of(b: &[u8]) -> Result<Hash, ProofError> {
    b.try_into().map_err(|_| ProofError::Malformed)
}

/// Checks that `proof` proves leaf `index` (hash `leaf`) in the tree of
/// `size` leaves whose root is `root`.
pub fn verify_inclusion(
    index: u64,
    size: u64,
    leaf: &[u8],
    proof: &[impl AsRef<[u8]>],
    root: &[u8],
) -> Result<(), ProofError> {
    if index >= size {
        return Err(ProofError::OutOfRange);
    }
    let mut r = hash_of(leaf)?;
    let (mut f, mut s) = (index, size - 1);
    for p in proof {
        let p = hash_of(p.as_ref())?;
        if s == 0 {
            return Err(ProofError::Malformed);
        }
        if f & 1 == 1 || f == s {
            r = node_hash(&p, &r);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            r = node_hash(&r, &p);
        }
        f >>= 1;
        s >>= 1;
    }
    if s != 0 {
        return Err(ProofError::Malformed);
    }
    if r.as_slice() != root {
        return Err(ProofError::Mismatch);
    }
    Ok(())
}

/// Checks that `proof` proves the tree of `old_size` leaves (root
/// `old_root`) a prefix of the tree of `new_size` leaves (root `new_root`).
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &[u8],
    new_root: &[u8],
    proof: &[impl AsRef<[u8]>],
) -> Result<(), ProofError> {
    if old_size > new_size {
        return Err(ProofError::OutOfRange);
    }
    if old_size == 0 {
        return Err(ProofError::EmptyTree);
    }
    if old_size == new_size {
        if !proof.is_empty() {
            return Err(ProofError::Malformed);
        }
        return if old_root == new_root { Ok(()) } else { Err(ProofError::Mismatch) };
    }
    let mut nodes = proof.iter().map(|p| hash_of(p.as_ref())).collect::<Result<Vec<_>, _>>()?;
    if nodes.is_empty() {
        return Err(ProofError::Malformed);
    }
    if old_size.is_power_of_two() {
        nodes.insert(0, hash_of(old_root)?);
    }
    let (mut f, mut s) = (old_size - 1, new_size - 1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let (mut fr, mut sr) = (nodes[0], nodes[0]);
    for c in &nodes[1..] {
        if s == 0 {
            return Err(ProofError::Malformed);
        }
        if f & 1 == 1 || f == s {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        f >>= 1;
        s >>= 1;
    }
    if s != 0 {
        return Err(ProofError::Malformed);
    }
    if fr.as_slice() != old_root || sr.as_slice() != new_root {
        return Err(ProofError::Mismatch);
    }
    Ok(())
}

/// The right edge of a tree: the roots of its maximal complete subtrees,
/// largest first (one per set bit of the size). Enough to append a leaf and
/// to compute the root, in O(log n), without the leaves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactRange {
    size: u64,
    peaks: Vec<Hash>,
}

impl CompactRange {
    /// The empty tree.
    pub fn new() -> CompactRange {
        CompactRange::default()
    }

    /// A range from its size and peaks, if they fit together.
    pub fn from_parts(size: u64, peaks: Vec<Hash>) -> Option<CompactRange> {
        (peaks.len() == size.count_ones() as usize).then_some(CompactRange { size, peaks })
    }

    /// Leaves so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The peaks, largest subtree first.
    pub fn peaks(&self) -> &[Hash] {
        &self.peaks
    }

    /// Appends a leaf hash.
    pub fn append(&mut self, leaf: Hash) {
        self.append_with(leaf, |_, _| {});
    }

    /// Appends a leaf hash, calling `completed` for each subtree it completes:
    /// the leaf itself first, then each larger one, smallest first.
    pub fn append_with(&mut self, leaf: Hash, mut completed: impl FnMut(NodeId, Hash)) {
        let index = self.size;
        let mut h = leaf;
        completed(NodeId { level: 0, index }, h);
        let mut size = self.size;
        let mut level = 0u8;
        // Each trailing one bit is a complete subtree the new one merges with.
        while size & 1 == 1 {
            let left = self.peaks.pop().unwrap_or(h);
            h = node_hash(&left, &h);
            size >>= 1;
            level += 1;
            completed(NodeId { level, index: index >> level }, h);
        }
        self.peaks.push(h);
        self.size += 1;
    }

    /// The tree's root.
    pub fn root(&self) -> Hash {
        fold_nodes(&self.peaks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::vectors;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n).map(|i| leaf_hash(format!("entry {i}").as_bytes())).collect()
    }

    #[test]
    fn the_compact_range_has_the_root_of_the_whole_tree_at_every_size() {
        let all = leaves(70);
        let mut range = CompactRange::new();
        assert_eq!(range.root(), empty_root());
        for (i, l) in all.iter().enumerate() {
            range.append(*l);
            assert_eq!(range.root(), root(&all[..=i]), "size {}", i + 1);
            assert_eq!(range.peaks().len(), (i + 1).count_ones() as usize);
        }
        let again = CompactRange::from_parts(range.size(), range.peaks().to_vec()).unwrap();
        assert_eq!(again, range);
        assert!(CompactRange::from_parts(3, vec![[0; 32]]).is_none());
    }

    #[test]
    fn proofs_assembled_from_the_subtrees_a_log_stores_equal_proofs_from_the_leaves() {
        let all = leaves(45);
        let mut stored = std::collections::HashMap::new();
        let mut range = CompactRange::new();
        for l in &all {
            range.append_with(*l, |id, h| {
                assert!(stored.insert(id, h).is_none(), "{id:?} completed twice");
            });
        }
        for (id, h) in &stored {
            let r = id.leaves();
            assert_eq!(*h, root(&all[r.start as usize..r.end as usize]), "{id:?}");
        }
        let lookup = |id: NodeId| stored.get(&id).copied();
        for n in 1..=all.len() as u64 {
            let whole = vec![Range { start: 0, end: n }];
            let peaks = assemble(&whole, lookup).unwrap();
            assert_eq!(peaks, vec![root(&all[..n as usize])]);
            assert_eq!(range_nodes(0..n).len(), n.count_ones() as usize);
            for i in 0..n {
                let ranges = inclusion_ranges(i, n).unwrap();
                assert!(nodes_needed(&ranges).len() <= 2 * 64);
                assert_eq!(assemble(&ranges, lookup), inclusion_proof(&all[..n as usize], i as usize));
            }
            for m in 1..=n {
                let ranges = consistency_ranges(m, n).unwrap();
                assert_eq!(assemble(&ranges, lookup), consistency_proof(&all[..n as usize], m as usize));
            }
        }
        let beyond = vec![Range { start: 0, end: 46 }];
        assert_eq!(assemble(&beyond, lookup), None, "a missing subtree is reported, never guessed");
        assert_eq!(inclusion_ranges(5, 5), None);
        assert_eq!(consistency_ranges(0, 5), None);
        assert_eq!(consistency_ranges(6, 5), None);
    }

    #[test]
    fn a_proof_at_ten_million_leaves_needs_few_stored_subtrees() {
        let n = 10_000_000u64;
        for i in [0, 1, 4_999_999, 9_999_998, 9_999_999] {
            let needed = nodes_needed(&inclusion_ranges(i, n).unwrap());
            assert!(needed.len() <= 2 * 24 + 1, "{i}: {}", needed.len());
        }
        let needed = nodes_needed(&consistency_ranges(1_234_567, n).unwrap());
        assert!(needed.len() <= 3 * 24, "{}", needed.len());
    }

    #[test]
    fn every_proof_made_verifies_and_a_changed_one_does_not() {
        let all = leaves(21);
        for n in 1..=all.len() {
            let r = root(&all[..n]);
            for i in 0..n {
                let p = inclusion_proof(&all[..n], i).unwrap();
                verify_inclusion(i as u64, n as u64, &all[i], &p, &r).unwrap();
                let other = (i + 1) % n;
                if other != i {
                    assert!(verify_inclusion(other as u64, n as u64, &all[i], &p, &r).is_err(), "{i} in {n}");
                }
                if let Some(first) = p.first() {
                    let mut bad = p.clone();
                    bad[0][0] ^= 1;
                    assert_ne!(&bad[0], first);
                    assert_eq!(verify_inclusion(i as u64, n as u64, &all[i], &bad, &r), Err(ProofError::Mismatch));
                }
            }
            for m in 1..=n {
                let p = consistency_proof(&all[..n], m).unwrap();
                let old = root(&all[..m]);
                verify_consistency(m as u64, n as u64, &old, &r, &p).unwrap();
                if m < n {
                    let forked = root(&leaves(n)[..m].iter().map(|l| node_hash(l, l)).collect::<Vec<_>>());
                    assert!(verify_consistency(m as u64, n as u64, &forked, &r, &p).is_err(), "{m} of {n}");
                }
            }
        }
        assert_eq!(inclusion_proof(&all, all.len()), None);
        assert_eq!(consistency_proof(&all, 0), None);
    }

    fn b64(v: &serde_json::Value) -> Vec<u8> {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap_or("")).unwrap()
    }

    fn b64s(v: &serde_json::Value) -> Vec<Vec<u8>> {
        v.as_array().map(|a| a.iter().map(b64).collect()).unwrap_or_default()
    }

    /// Every JSON file under `dir` (at any depth), with its path and content.
    fn cases(dir: &std::path::Path) -> Vec<(String, serde_json::Value)> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for f in std::fs::read_dir(&d).unwrap() {
                let f = f.unwrap().path();
                if f.is_dir() {
                    stack.push(f);
                } else if f.extension().is_some_and(|e| e == "json") {
                    let v = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
                    out.push((f.strip_prefix(dir).unwrap().display().to_string(), v));
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    #[test]
    fn the_rfc6962_roots_of_sizes_0_to_8_match() {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(vectors().join("rfc6962/tree-roots.json")).unwrap()).unwrap();
        let inputs: Vec<Vec<u8>> =
            v["leafInputs"].as_array().unwrap().iter().map(|x| hex::decode(x.as_str().unwrap()).unwrap()).collect();
        let hashes: Vec<Hash> = inputs.iter().map(|i| leaf_hash(i)).collect();
        for (h, want) in hashes.iter().zip(v["leafHashes"].as_array().unwrap()) {
            assert_eq!(hex::encode(h), want.as_str().unwrap());
        }
        let mut range = CompactRange::new();
        for (n, want) in v["rootHashes"].as_array().unwrap().iter().enumerate() {
            assert_eq!(hex::encode(root(&hashes[..n])), want.as_str().unwrap(), "root of {n}");
            assert_eq!(hex::encode(range.root()), want.as_str().unwrap(), "compact root of {n}");
            if n < hashes.len() {
                range.append(hashes[n]);
            }
        }
    }

    #[test]
    fn transparency_dev_inclusion_vectors_verify_and_every_mutation_is_rejected() {
        let all = cases(&vectors().join("rfc6962/testdata/inclusion"));
        assert!(all.len() > 40, "{} inclusion cases", all.len());
        for (name, c) in all {
            let got = verify_inclusion(
                c["leafIdx"].as_u64().unwrap(),
                c["treeSize"].as_u64().unwrap(),
                &b64(&c["leafHash"]),
                &b64s(&c["proof"]),
                &b64(&c["root"]),
            );
            assert_eq!(got.is_err(), c["wantErr"].as_bool().unwrap(), "{name}: {got:?}");
        }
    }

    #[test]
    fn transparency_dev_consistency_vectors_verify_and_every_mutation_is_rejected() {
        let all = cases(&vectors().join("rfc6962/testdata/consistency"));
        assert!(all.len() > 40, "{} consistency cases", all.len());
        for (name, c) in all {
            let got = verify_consistency(
                c["size1"].as_u64().unwrap(),
                c["size2"].as_u64().unwrap(),
                &b64(&c["root1"]),
                &b64(&c["root2"]),
                &b64s(&c["proof"]),
            );
            assert_eq!(got.is_err(), c["wantErr"].as_bool().unwrap(), "{name}: {got:?}");
        }
    }

    #[test]
    fn proofs_made_here_match_the_vectors_happy_paths() {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(vectors().join("rfc6962/tree-roots.json")).unwrap()).unwrap();
        let hashes: Vec<Hash> = v["leafInputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| leaf_hash(&hex::decode(x.as_str().unwrap()).unwrap()))
            .collect();
        let mut checked = 0;
        for (name, c) in cases(&vectors().join("rfc6962/testdata/inclusion")) {
            if !name.ends_with("happy-path.json") || c["treeSize"].as_u64() > Some(8) {
                continue;
            }
            let (i, n) = (c["leafIdx"].as_u64().unwrap() as usize, c["treeSize"].as_u64().unwrap() as usize);
            if b64(&c["leafHash"]) != hashes[i] {
                continue;
            }
            let made: Vec<Vec<u8>> = inclusion_proof(&hashes[..n], i).unwrap().iter().map(|h| h.to_vec()).collect();
            assert_eq!(made, b64s(&c["proof"]), "{name}");
            checked += 1;
        }
        for (name, c) in cases(&vectors().join("rfc6962/testdata/consistency")) {
            if !name.ends_with("happy-path.json") {
                continue;
            }
            let (m, n) = (c["size1"].as_u64().unwrap() as usize, c["size2"].as_u64().unwrap() as usize);
            let made: Vec<Vec<u8>> = consistency_proof(&hashes[..n], m).unwrap().iter().map(|h| h.to_vec()).collect();
            assert_eq!(made, b64s(&c["proof"]), "{name}");
            checked += 1;
        }
        assert!(checked >= 6, "{checked} happy paths compared");
    }
}
