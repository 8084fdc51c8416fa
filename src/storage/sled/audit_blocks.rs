//! The `audit` tree: audit entries stored in blocks, several per sled value.
//!
//! The sequencer writes each batch's entries as a few blocks instead of one
//! sled value per entry: a sled insert (tree descent, log reservation, and a
//! leaf split every few inserts into an append-only tree) cost more than the
//! entry's own encoding and hashing, and every audited read paid for one.
//!
//! ```text
//! key    sequence of the block's first entry (u64, big-endian)
//! value  "CVAB" (4) ‖ count (u32) ‖ count × ( sequence (u64) ‖ length L (u32) ‖ E (L) ‖ SHA-256(E) (32) )
//! ```
//!
//! Entries in a block have consecutive, ascending sequences, and blocks do not
//! overlap, so the block holding sequence `s` is the one with the greatest
//! key ≤ `s`. A block is kept under [`BLOCK_TARGET_BYTES`] (a lone larger
//! entry gets a block of its own) so that a sled leaf of up to 17 blocks stays
//! below sled's 128 KiB threshold for writing a node out as a separate blob
//! file. A value not starting with `CVAB` is a single entry `E ‖ SHA-256(E)`
//! under its own sequence: the layout of stores written before blocks, still
//! read (`E` starts with the tag `carevault.audit.v`, never with `CVAB`).

use std::collections::VecDeque;

use super::SledStore;
use super::layout::u64_at;
use crate::storage::StorageError;
use crate::storage::model::StoredAuditEntry;

/// Magic at the start of a block value.
const BLOCK_MAGIC: &[u8; 4] = b"CVAB";

/// The size a block is kept under (see the module docs).
pub(crate) const BLOCK_TARGET_BYTES: usize = 6 * 1024;

/// Bytes a block spends on an entry beyond `E ‖ SHA-256(E)`: sequence and length.
const SLOT_OVERHEAD: usize = 12;

/// Bytes a block spends before its first entry: magic and count.
const BLOCK_HEADER: usize = 8;

/// Encodes entries, each `(sequence, E ‖ SHA-256(E))`, as one block value.
/// A length or count that does not fit its u32 is an error, never saturated.
pub(super) fn encode_block<'a>(entries: impl IntoIterator<Item = (u64, &'a [u8])>) -> Result<Vec<u8>, StorageError> {
    let too_long = || StorageError::Unencodable("audit block length".into());
    let mut out = BLOCK_MAGIC.to_vec();
    out.extend_from_slice(&[0; 4]);
    let mut count = 0u32;
    for (seq, value) in entries {
        let e_len = value.len().checked_sub(32).ok_or(StorageError::Corrupt("audit value without its hash"))?;
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&u32::try_from(e_len).map_err(|_| too_long())?.to_be_bytes());
        out.extend_from_slice(value);
        count = count.checked_add(1).ok_or_else(too_long)?;
    }
    out[4..8].copy_from_slice(&count.to_be_bytes());
    Ok(out)
}

/// How many of `sizes` (lengths of `E ‖ SHA-256(E)`, in order) go into the
/// next block: as many as fit under [`BLOCK_TARGET_BYTES`], and at least one.
pub(super) fn block_len(sizes: impl IntoIterator<Item = usize>) -> usize {
    let mut total = BLOCK_HEADER;
    let mut n = 0;
    for size in sizes {
        total += SLOT_OVERHEAD + size;
        if n > 0 && total > BLOCK_TARGET_BYTES {
            break;
        }
        n += 1;
    }
    n
}

/// Every entry of one `audit` value as `(sequence, E ‖ SHA-256(E))`.
fn slots<'a>(key: &[u8], value: &'a [u8]) -> Result<Vec<(u64, &'a [u8])>, StorageError> {
    const BAD: StorageError = StorageError::Corrupt("bad audit block");
    let Some(mut rest) = value.strip_prefix(BLOCK_MAGIC) else {
        return Ok(vec![(u64_at(key, 0)?, value)]);
    };
    let count = u32::from_be_bytes(rest.get(..4).ok_or(BAD)?.try_into().map_err(|_| BAD)?);
    rest = &rest[4..];
    let mut out = Vec::with_capacity(usize::try_from(count).unwrap_or(0).min(1024));
    for _ in 0..count {
        let seq = u64_at(rest, 0).map_err(|_| BAD)?;
        let e_len = usize::try_from(u32::from_be_bytes(rest.get(8..12).ok_or(BAD)?.try_into().map_err(|_| BAD)?))
            .map_err(|_| BAD)?;
        let end = e_len.checked_add(12 + 32).ok_or(BAD)?;
        out.push((seq, rest.get(12..end).ok_or(BAD)?));
        rest = &rest[end..];
    }
    if !rest.is_empty() {
        return Err(BAD);
    }
    Ok(out)
}

fn stored(sequence: u64, raw: &[u8]) -> Result<StoredAuditEntry, StorageError> {
    let split = raw.len().checked_sub(32).ok_or(StorageError::Corrupt("short audit value"))?;
    let (bytes, hash) = raw.split_at(split);
    let mut h = [0u8; 32];
    h.copy_from_slice(hash);
    Ok(StoredAuditEntry { sequence, bytes: bytes.to_vec(), hash: h })
}

/// Audit entries in stored order, block by block, limited to `from..=to`.
pub struct AuditIter {
    blocks: sled::Iter,
    buffered: VecDeque<StoredAuditEntry>,
    from: u64,
    to: u64,
    failed: bool,
}

impl Iterator for AuditIter {
    type Item = Result<StoredAuditEntry, StorageError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(e) = self.buffered.pop_front() {
                return Some(Ok(e));
            }
            if self.failed {
                return None;
            }
            let (k, v) = match self.blocks.next()? {
                Ok(kv) => kv,
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e.into()));
                }
            };
            let decoded = slots(&k, &v).and_then(|s| {
                s.into_iter()
                    .filter(|(seq, _)| (self.from..=self.to).contains(seq))
                    .map(|(seq, raw)| stored(seq, raw))
                    .collect::<Result<VecDeque<_>, _>>()
            });
            match decoded {
                Ok(entries) => self.buffered = entries,
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

impl SledStore {
    /// The block holding `seq`, if any: its key and value.
    fn audit_block_of(&self, seq: u64) -> Result<Option<(sled::IVec, sled::IVec)>, StorageError> {
        Ok(self.audit.range(..=seq.to_be_bytes()).next_back().transpose()?)
    }

    /// The newest audit entry's sequence and stored hash.
    pub fn audit_head_sync(&self) -> Result<Option<(u64, [u8; 32])>, StorageError> {
        let Some((k, v)) = self.audit.last()? else { return Ok(None) };
        let newest = slots(&k, &v)?.pop().ok_or(StorageError::Corrupt("empty audit block"))?;
        let e = stored(newest.0, newest.1)?;
        Ok(Some((e.sequence, e.hash)))
    }

    /// The sequences in the newest block (those whose index keys a crash may have cut short).
    pub(super) fn audit_newest_block(&self) -> Result<Vec<u64>, StorageError> {
        let Some((k, v)) = self.audit.last()? else { return Ok(Vec::new()) };
        Ok(slots(&k, &v)?.into_iter().map(|(seq, _)| seq).collect())
    }

    /// Audit entries from `from` through `to` inclusive, in stored order.
    pub fn audit_range(&self, from: u64, to: u64) -> AuditIter {
        // A failed lookup here fails again, and is reported, when the
        // iterator reads the same blocks.
        let start = match self.audit_block_of(from) {
            Ok(Some((k, _))) => u64_at(&k, 0).unwrap_or(from),
            _ => from,
        };
        AuditIter {
            blocks: self.audit.range(start.to_be_bytes()..=to.to_be_bytes()),
            buffered: VecDeque::new(),
            from,
            to,
            failed: false,
        }
    }

    /// Every audit entry in stored order.
    pub fn audit_all(&self) -> AuditIter {
        AuditIter { blocks: self.audit.iter(), buffered: VecDeque::new(), from: 0, to: u64::MAX, failed: false }
    }

    /// `read` applied to the stored `E ‖ SHA-256(E)` of entry `seq`, if present.
    fn audit_slot<T>(
        &self,
        seq: u64,
        read: impl FnOnce(&[u8]) -> Result<T, StorageError>,
    ) -> Result<Option<T>, StorageError> {
        let Some((k, v)) = self.audit_block_of(seq)? else { return Ok(None) };
        slots(&k, &v)?.into_iter().find(|(s, _)| *s == seq).map(|(_, raw)| read(raw)).transpose()
    }

    /// Raw value of an audit entry: `E ‖ SHA-256(E)`.
    pub fn audit_raw(&self, seq: u64) -> Result<Option<Vec<u8>>, StorageError> {
        self.audit_slot(seq, |raw| Ok(raw.to_vec()))
    }

    /// One audit entry.
    pub fn audit_entry_sync(&self, seq: u64) -> Result<Option<StoredAuditEntry>, StorageError> {
        self.audit_slot(seq, |raw| stored(seq, raw))
    }

    /// Raw access for tamper tests (the `testing` feature): overwrite (`E ‖ hash`)
    /// or remove one audit entry in place. An entry not stored yet is added
    /// as a single-entry value under its own sequence. Named `danger_`
    /// because it bypasses the sequencer and breaks the chain on purpose.
    #[cfg(any(test, feature = "testing"))]
    pub fn danger_put_audit_raw(&self, seq: u64, value: Option<Vec<u8>>) -> Result<(), StorageError> {
        let block = self.audit_block_of(seq)?;
        let holder = match &block {
            Some((k, v)) => Some((k, slots(k, v)?)).filter(|(_, s)| s.iter().any(|(s, _)| *s == seq)),
            None => None,
        };
        match holder {
            Some((k, entries)) => {
                let kept: Vec<(u64, &[u8])> = entries
                    .into_iter()
                    .filter_map(|(s, raw)| match (s == seq, &value) {
                        (false, _) => Some((s, raw)),
                        (true, Some(v)) => Some((s, v.as_slice())),
                        (true, None) => None,
                    })
                    .collect();
                if kept.is_empty() {
                    self.audit.remove(k)?;
                } else {
                    self.audit.insert(k, encode_block(kept)?)?;
                }
            }
            None => {
                if let Some(v) = value {
                    self.audit.insert(seq.to_be_bytes(), v)?;
                }
            }
        }
        self.db.flush()?;
        Ok(())
    }

    /// Raw access for tamper tests: swaps two stored entries, each moving
    /// with the sequence stored beside it (as an attacker reordering the
    /// trail would), so the trail reads them in the other order. Both must
    /// be stored in blocks. Named `danger_` because it breaks the chain on purpose.
    #[cfg(any(test, feature = "testing"))]
    pub fn danger_swap_audit_entries(&self, a: u64, b: u64) -> Result<(), StorageError> {
        const MISSING: StorageError = StorageError::Corrupt("no such audit entry in a block");
        let (ka, va) = self.audit_block_of(a)?.ok_or(MISSING)?;
        let (kb, vb) = self.audit_block_of(b)?.ok_or(MISSING)?;
        let (sa, sb) = (slots(&ka, &va)?, slots(&kb, &vb)?);
        let entry_a = sa.iter().find(|(s, _)| *s == a).map(|(_, r)| r.to_vec()).ok_or(MISSING)?;
        let entry_b = sb.iter().find(|(s, _)| *s == b).map(|(_, r)| r.to_vec()).ok_or(MISSING)?;
        let swap = |(s, raw): (u64, &[u8])| -> (u64, Vec<u8>) {
            match s {
                s if s == a => (b, entry_b.clone()),
                s if s == b => (a, entry_a.clone()),
                _ => (s, raw.to_vec()),
            }
        };
        let new_a: Vec<(u64, Vec<u8>)> = sa.into_iter().map(swap).collect();
        self.audit.insert(&ka, encode_block(new_a.iter().map(|(s, r)| (*s, r.as_slice())))?)?;
        if kb != ka {
            let new_b: Vec<(u64, Vec<u8>)> = sb.into_iter().map(swap).collect();
            self.audit.insert(&kb, encode_block(new_b.iter().map(|(s, r)| (*s, r.as_slice())))?)?;
        }
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(n: u8, len: usize) -> Vec<u8> {
        vec![n; len + 32]
    }

    #[test]
    fn a_block_round_trips_its_entries() {
        let a = value(1, 100);
        let b = value(2, 0);
        let block = encode_block([(7, a.as_slice()), (8, b.as_slice())]).unwrap();
        assert_eq!(&block[..8], b"CVAB\0\0\0\x02");
        assert_eq!(&block[8..20], &[0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 100]);
        assert_eq!(slots(&7u64.to_be_bytes(), &block).unwrap(), vec![(7, a.as_slice()), (8, b.as_slice())]);
    }

    #[test]
    fn a_value_without_the_block_magic_is_one_entry_under_its_key() {
        let legacy = b"carevault.audit.v2 and the rest".to_vec();
        assert_eq!(slots(&9u64.to_be_bytes(), &legacy).unwrap(), vec![(9, legacy.as_slice())]);
    }

    #[test]
    fn single_entry_values_and_blocks_read_as_one_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("db"), 8 << 20).unwrap();
        // An older store's single-entry values for 0 and 1, then blocks 2..=4 and 5.
        for seq in 0..2u8 {
            store.audit.insert(u64::from(seq).to_be_bytes(), value(seq, 20)).unwrap();
        }
        let (v2, v3, v4, v5) = (value(2, 5), value(3, 6), value(4, 7), value(5, 8));
        let block = encode_block([(2, v2.as_slice()), (3, v3.as_slice()), (4, v4.as_slice())]).unwrap();
        store.audit.insert(2u64.to_be_bytes(), block).unwrap();
        store.audit.insert(5u64.to_be_bytes(), encode_block([(5, v5.as_slice())]).unwrap()).unwrap();

        let all: Vec<u64> = store.audit_all().map(|e| e.unwrap().sequence).collect();
        assert_eq!(all, vec![0, 1, 2, 3, 4, 5]);
        let some: Vec<u64> = store.audit_range(1, 3).map(|e| e.unwrap().sequence).collect();
        assert_eq!(some, vec![1, 2, 3]);
        let inner: Vec<u64> = store.audit_range(3, 3).map(|e| e.unwrap().sequence).collect();
        assert_eq!(inner, vec![3]);
        let e3 = store.audit_entry_sync(3).unwrap().unwrap();
        assert_eq!((e3.bytes.as_slice(), e3.hash), (&v3[..6], [3u8; 32]));
        assert_eq!(store.audit_head_sync().unwrap(), Some((5, [5u8; 32])));
        assert_eq!(store.audit_newest_block().unwrap(), vec![5]);

        store.danger_put_audit_raw(3, None).unwrap();
        store.danger_put_audit_raw(1, Some(value(9, 1))).unwrap();
        let all: Vec<u64> = store.audit_all().map(|e| e.unwrap().sequence).collect();
        assert_eq!(all, vec![0, 1, 2, 4, 5], "removed in place, replaced in place");
        assert_eq!(store.audit_raw(1).unwrap(), Some(value(9, 1)));
        assert_eq!(store.audit_raw(3).unwrap(), None);
    }

    #[test]
    fn truncated_or_overlong_blocks_are_corrupt() {
        let a = value(1, 10);
        let block = encode_block([(1, a.as_slice())]).unwrap();
        for cut in [5, 9, 20, block.len() - 1] {
            assert!(slots(&1u64.to_be_bytes(), &block[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = block.clone();
        longer.push(0);
        assert!(slots(&1u64.to_be_bytes(), &longer).is_err());
    }

    #[test]
    fn blocks_stay_under_the_target_and_hold_at_least_one_entry() {
        assert_eq!(block_len([300; 100]), (BLOCK_TARGET_BYTES - BLOCK_HEADER) / (300 + SLOT_OVERHEAD));
        assert_eq!(block_len([BLOCK_TARGET_BYTES * 2, 10]), 1);
        assert_eq!(block_len(std::iter::empty()), 0);
    }
}
