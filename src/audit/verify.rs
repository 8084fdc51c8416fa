//! Pure verification of an audit chain.
//!
//! [`verify_chain`] (from genesis) and [`verify_from`] (from an anchor: a
//! sequence and hash recorded earlier) take entries in storage or export
//! order as raw bytes and recompute every hash themselves. What came stored
//! beside an entry (its hash, its sequence in the export wrapper or storage
//! block) is compared with what the entry's own bytes say, and never trusted
//! as proof of anything.
//!
//! Checks, in order, for the entry at each position; the first failure ends
//! verification, and every failure is reported at the sequence the chain
//! expected at that position (the first sequence not verified):
//! 1. it decodes: an unknown tag, or a version-1 tag after a version-2 entry
//!    -> `UnknownFormat`; any other decoding failure (truncation, trailing
//!    bytes, invalid UTF-8, a presence byte other than 0 or 1) -> `ContentAltered`
//! 2. SHA-256 of its bytes equals the hash stored with it, and the sequence
//!    stored with it equals its own field 2 -> `ContentAltered`
//! 3. its sequence (field 2) is the expected one: lower -> `OutOfOrder`;
//!    higher -> `Gap`, unless the entry after it decodes and has a sequence
//!    lower than this one's (two entries swapped) -> `OutOfOrder`
//! 4. at sequence 0, it is the genesis entry (action `audit.genesis`) -> `NoGenesis`
//! 5. its previous hash equals the recomputed hash of the entry before it (32
//!    zero bytes before genesis, the anchor's hash before the first entry
//!    after an anchor) -> `LinkBroken`
//! 6. its time is not before the previous entry's time -> a warning only
//!
//! With nothing to verify from genesis (no entries) the result is
//! `NoGenesis` at 0. After the last entry, an [`ExpectedHead`] must be on
//! what was verified (or be the anchor itself): missing -> `HeadMissing`
//! (truncation), different -> `HeadDifferent` (rewriting).

use std::iter::Peekable;

use super::entry::{AuditEntry, DecodeError, GENESIS_PREVIOUS_HASH};
use super::merkle::{CompactRange, leaf_hash};
use crate::crypto::sha256;

/// One entry as stored or exported: its canonical bytes and, if known, the
/// hash and sequence stored beside them.
#[derive(Debug, Clone)]
pub struct RawEntry {
    /// The canonical encoding.
    pub bytes: Vec<u8>,
    /// The hash the store recorded for these bytes, if any.
    pub stored_hash: Option<[u8; 32]>,
    /// The sequence the store or export recorded beside these bytes
    /// (`ExportedAuditEntry.sequence`, or the storage block's), if any.
    pub stored_sequence: Option<u64>,
}

impl RawEntry {
    /// An entry with the hash and sequence stored beside it.
    pub fn stored(bytes: Vec<u8>, hash: [u8; 32], sequence: u64) -> RawEntry {
        RawEntry { bytes, stored_hash: Some(hash), stored_sequence: Some(sequence) }
    }
}

/// A head recorded earlier: `SEQ:HEXHASH`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpectedHead {
    /// Sequence number of the recorded head.
    pub sequence: u64,
    /// Its hash.
    pub hash: [u8; 32],
}

impl std::str::FromStr for ExpectedHead {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (seq, hash) = s.split_once(':').ok_or("expected SEQ:HASH")?;
        let sequence = seq.trim().parse::<u64>().map_err(|_| "SEQ must be a non-negative integer")?;
        let mut h = [0u8; 32];
        hex::decode_to_slice(hash.trim(), &mut h).map_err(|_| "HASH must be 64 hex digits")?;
        Ok(ExpectedHead { sequence, hash: h })
    }
}

/// Class of the first problem found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// An entry's bytes do not match what was stored with them, or do not decode.
    ContentAltered,
    /// An entry's previous hash is not the hash of the entry before it.
    LinkBroken,
    /// One or more sequence numbers are missing.
    Gap,
    /// Entries appear out of sequence order (swapped, duplicated or moved).
    OutOfOrder,
    /// An entry has a format version this verifier does not know, or one not allowed where it is.
    UnknownFormat,
    /// The recorded head is beyond the end of the chain (truncation).
    HeadMissing,
    /// The entry at the recorded head's sequence has a different hash (rewriting).
    HeadDifferent,
    /// The chain is empty or does not start with a genesis entry at 0.
    NoGenesis,
    /// A checkpoint's signature does not verify with the log's key.
    BadCheckpointSignature,
    /// The log's own checkpoint names a root the entries do not have at its size.
    RootMismatch,
    /// The log is smaller than a checkpoint of it (entries were cut off).
    SizeRegression,
    /// The log at a saved checkpoint's size has another root: its history was rewritten (a fork).
    Inconsistent,
    /// No checkpoint of the log carries cosignatures of as many of the given witnesses as required.
    Unwitnessed,
}

impl FailureClass {
    /// Stable machine-readable name.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::ContentAltered => "content_altered",
            FailureClass::LinkBroken => "link_broken",
            FailureClass::Gap => "gap",
            FailureClass::OutOfOrder => "out_of_order",
            FailureClass::UnknownFormat => "unknown_format",
            FailureClass::HeadMissing => "recorded_head_missing",
            FailureClass::HeadDifferent => "recorded_head_different",
            FailureClass::NoGenesis => "no_genesis",
            FailureClass::BadCheckpointSignature => "bad_checkpoint_signature",
            FailureClass::RootMismatch => "root_mismatch",
            FailureClass::SizeRegression => "size_regression",
            FailureClass::Inconsistent => "inconsistent",
            FailureClass::Unwitnessed => "unwitnessed",
        }
    }

    /// Human-readable description.
    pub fn describe(self) -> &'static str {
        match self {
            FailureClass::ContentAltered => "content altered",
            FailureClass::LinkBroken => "link broken",
            FailureClass::Gap => "gap in sequence",
            FailureClass::OutOfOrder => "out of order",
            FailureClass::UnknownFormat => "unknown format version",
            FailureClass::HeadMissing => "recorded head missing (truncated)",
            FailureClass::HeadDifferent => "recorded head different (rewritten)",
            FailureClass::NoGenesis => "no genesis entry",
            FailureClass::BadCheckpointSignature => "checkpoint signature does not verify",
            FailureClass::RootMismatch => "the log's checkpoint does not match its entries",
            FailureClass::SizeRegression => "the log is smaller than a checkpoint of it (truncated)",
            FailureClass::Inconsistent => "the log is not consistent with a saved checkpoint (forked or rewritten)",
            FailureClass::Unwitnessed => "no checkpoint of the log is cosigned by enough of the given witnesses",
        }
    }
}

/// The first problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The sequence expected where the problem was found (for a recorded
    /// head, the head's sequence).
    pub sequence: u64,
    /// What kind of problem.
    pub class: FailureClass,
}

/// Result of a verification run. `failure: None` means the chain verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Entries whose hash and link were checked.
    pub entries_checked: u64,
    /// The last good entry's sequence and recomputed hash (the anchor, if
    /// nothing after it was checked).
    pub head: Option<(u64, [u8; 32])>,
    /// Sequences whose time is earlier than the entry before (warnings only).
    pub time_warnings: Vec<u64>,
    /// The first failure, if any.
    pub failure: Option<Failure>,
    /// The Merkle tree recomputed over every entry verified (size and root),
    /// when verification started at genesis.
    pub tree: Option<(u64, [u8; 32])>,
    /// The checkpoints whose roots were found in the tree, by size.
    pub checkpoints_checked: Vec<u64>,
}

/// A checkpoint to hold the log to (its signature checked by the caller,
/// see `note`): the tree size and root it names, and whose it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    /// Tree size.
    pub size: u64,
    /// Root hash at that size.
    pub root: [u8; 32],
    /// The log's own (stored) checkpoint, or one saved earlier by whoever verifies.
    pub saved: bool,
}

impl Report {
    /// True when no failure was found.
    pub fn is_ok(&self) -> bool {
        self.failure.is_none()
    }
}

/// Verifies a whole chain from entry 0. Pure: reads only its inputs.
pub fn verify_chain<I>(entries: I, expect_head: Option<ExpectedHead>) -> Report
where
    I: IntoIterator<Item = RawEntry>,
{
    verify_from(entries, None, expect_head)
}

/// Verifies the entries after `anchor` (a sequence and hash recorded
/// earlier, e.g. the head at the last verification): the first entry must be
/// `anchor.sequence + 1` and link to `anchor.hash`. Without an anchor this is
/// [`verify_chain`]. Pure: reads only its inputs.
pub fn verify_from<I>(entries: I, anchor: Option<ExpectedHead>, expect_head: Option<ExpectedHead>) -> Report
where
    I: IntoIterator<Item = RawEntry>,
{
    verify_log(entries, anchor, expect_head, &[])
}

/// [`verify_from`], and from genesis also the Merkle tree: it is recomputed
/// over the entries and every claim must name the root the entries have at
/// its size. A claim beyond the log is `SizeRegression`; a stored one with
/// another root is `RootMismatch`, a saved one `Inconsistent`. After an
/// anchor the tree cannot be recomputed and claims are not checked. Pure.
pub fn verify_log<I>(
    entries: I,
    anchor: Option<ExpectedHead>,
    expect_head: Option<ExpectedHead>,
    claims: &[Claim],
) -> Report
where
    I: IntoIterator<Item = RawEntry>,
{
    let mut claims: Vec<Claim> = if anchor.is_none() { claims.to_vec() } else { Vec::new() };
    claims.sort_by_key(|c| c.size);
    let mut tree = anchor.is_none().then(CompactRange::new);
    let mut it = entries
        .into_iter()
        .map(|raw| {
            let hash = sha256(&raw.bytes);
            let decoded = AuditEntry::decode_header(&raw.bytes).map(|h| Header {
                format: h.format,
                sequence: h.sequence,
                previous_hash: h.previous_hash,
                time_micros: h.time_micros,
                genesis: h.action == "audit.genesis",
            });
            (raw, hash, decoded)
        })
        .peekable();
    let start = match anchor {
        Some(a) => Position { expected: a.sequence.saturating_add(1), previous: a.hash },
        None => Position { expected: 0, previous: GENESIS_PREVIOUS_HASH },
    };
    let mut report = Report {
        entries_checked: 0,
        head: anchor.map(|a| (a.sequence, a.hash)),
        time_warnings: Vec::new(),
        failure: None,
        tree: None,
        checkpoints_checked: Vec::new(),
    };
    let mut head_hash: Option<[u8; 32]> = match (anchor, expect_head) {
        (Some(a), Some(h)) if a.sequence == h.sequence => Some(a.hash),
        _ => None,
    };
    let mut trees = Trees { range: tree.as_mut(), claims: &claims, next: 0 };
    let walked = walk(&mut it, &mut report, start, expect_head.map(|h| h.sequence), &mut head_hash, &mut trees);
    if let Some(range) = &tree {
        report.tree = Some((range.size(), range.root()));
    }
    if let Some(failure) = walked {
        report.failure = Some(failure);
        return report;
    }

    if report.head.is_none() {
        report.failure = Some(Failure { sequence: 0, class: FailureClass::NoGenesis });
        return report;
    }
    if let Some(expected) = expect_head {
        match head_hash {
            None => report.failure = Some(Failure { sequence: expected.sequence, class: FailureClass::HeadMissing }),
            Some(h) if h != expected.hash => {
                report.failure = Some(Failure { sequence: expected.sequence, class: FailureClass::HeadDifferent })
            }
            Some(_) => {}
        }
    }
    if let Some(range) = &tree
        && report.failure.is_none()
        && claims.iter().any(|c| c.size > range.size())
    {
        report.failure = Some(Failure { sequence: range.size(), class: FailureClass::SizeRegression });
    }
    report
}

/// What the walk checks of an entry (decoded without copying its strings).
struct Header {
    format: u8,
    sequence: u64,
    previous_hash: [u8; 32],
    time_micros: i64,
    genesis: bool,
}

type Item = (RawEntry, [u8; 32], Result<Header, DecodeError>);

/// The tree being recomputed during a walk, and the claims to check on the way.
struct Trees<'a> {
    range: Option<&'a mut CompactRange>,
    claims: &'a [Claim],
    next: usize,
}

impl Trees<'_> {
    /// Adds an entry's leaf; a claim at the new size must name its root.
    fn append(&mut self, bytes: &[u8], checked: &mut Vec<u64>) -> Option<FailureClass> {
        let range = self.range.as_mut()?;
        range.append(leaf_hash(bytes));
        while let Some(c) = self.claims.get(self.next).filter(|c| c.size <= range.size()) {
            self.next += 1;
            if c.size < range.size() {
                // A claim of size 0 names no tree; claims are sorted, so nothing else is skipped.
                continue;
            }
            if c.root != range.root() {
                return Some(if c.saved { FailureClass::Inconsistent } else { FailureClass::RootMismatch });
            }
            checked.push(c.size);
        }
        None
    }
}

/// Where the walk is: the sequence it expects next and the hash that entry must link to.
#[derive(Clone, Copy)]
struct Position {
    expected: u64,
    previous: [u8; 32],
}

fn walk<I: Iterator<Item = Item>>(
    it: &mut Peekable<I>,
    report: &mut Report,
    start: Position,
    remember: Option<u64>,
    head_hash: &mut Option<[u8; 32]>,
    trees: &mut Trees<'_>,
) -> Option<Failure> {
    let Position { expected: mut expected_seq, previous: mut prev_hash } = start;
    let mut prev_time: Option<i64> = None;
    let mut seen_v2 = false;
    while let Some((raw, hash, decoded)) = it.next() {
        let fail = |class| Some(Failure { sequence: expected_seq, class });
        let entry = match decoded {
            Ok(e) => e,
            Err(DecodeError::UnknownFormat) => return fail(FailureClass::UnknownFormat),
            Err(_) => return fail(FailureClass::ContentAltered),
        };
        if entry.format == 1 && seen_v2 {
            return fail(FailureClass::UnknownFormat);
        }
        seen_v2 |= entry.format >= 2;
        if raw.stored_hash.is_some_and(|stored| stored != hash)
            || raw.stored_sequence.is_some_and(|stored| stored != entry.sequence)
        {
            return fail(FailureClass::ContentAltered);
        }
        if entry.sequence < expected_seq {
            return fail(FailureClass::OutOfOrder);
        }
        if entry.sequence > expected_seq {
            // Ahead of where we are: a gap, unless the entry after it is
            // behind it (two entries swapped), which is an ordering problem.
            let next_is_behind =
                it.peek().and_then(|(_, _, d)| d.as_ref().ok()).is_some_and(|n| n.sequence < entry.sequence);
            return fail(if next_is_behind { FailureClass::OutOfOrder } else { FailureClass::Gap });
        }
        if entry.sequence == 0 && !entry.genesis {
            return fail(FailureClass::NoGenesis);
        }
        if entry.previous_hash != prev_hash {
            return fail(FailureClass::LinkBroken);
        }
        if let Some(t) = prev_time
            && entry.time_micros < t
        {
            report.time_warnings.push(entry.sequence);
        }
        prev_time = Some(entry.time_micros);
        if let Some(class) = trees.append(&raw.bytes, &mut report.checkpoints_checked) {
            return Some(Failure { sequence: entry.sequence, class });
        }
        prev_hash = hash;
        report.entries_checked += 1;
        report.head = Some((entry.sequence, hash));
        if remember == Some(entry.sequence) {
            *head_hash = Some(hash);
        }
        expected_seq = entry.sequence + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<RawEntry> {
        let mut out = Vec::new();
        let mut prev = GENESIS_PREVIOUS_HASH;
        for seq in 0..n {
            let mut e = if seq == 0 {
                AuditEntry::genesis(0)
            } else {
                AuditEntry { action: "patient.read".into(), ..AuditEntry::default() }
            };
            e.sequence = seq;
            e.previous_hash = prev;
            e.time_micros = i64::try_from(seq).unwrap() * 10;
            let bytes = e.encode().unwrap();
            prev = sha256(&bytes);
            out.push(RawEntry { bytes, stored_hash: Some(prev), stored_sequence: Some(seq) });
        }
        out
    }

    fn class(report: &Report) -> Option<(u64, FailureClass)> {
        report.failure.as_ref().map(|f| (f.sequence, f.class))
    }

    #[test]
    fn an_intact_chain_verifies_and_reports_its_head() {
        let c = chain(10);
        let head_hash = c[9].stored_hash.unwrap();
        let r = verify_chain(c, Some(ExpectedHead { sequence: 4, hash: chain(10)[4].stored_hash.unwrap() }));
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(r.entries_checked, 10);
        assert_eq!(r.head, Some((9, head_hash)));
    }

    #[test]
    fn a_flipped_byte_is_content_altered() {
        let mut c = chain(10);
        c[5].bytes[40] ^= 1;
        assert_eq!(class(&verify_chain(c, None)), Some((5, FailureClass::ContentAltered)));
    }

    #[test]
    fn a_rewritten_entry_with_a_matching_stored_hash_breaks_the_next_link() {
        let mut c = chain(10);
        let mut e = AuditEntry::decode(&c[5].bytes).unwrap();
        e.actor = "mallory".into();
        c[5].bytes = e.encode().unwrap();
        c[5].stored_hash = Some(sha256(&c[5].bytes));
        assert_eq!(class(&verify_chain(c, None)), Some((6, FailureClass::LinkBroken)));
    }

    #[test]
    fn a_deleted_entry_is_a_gap() {
        let mut c = chain(10);
        c.remove(4);
        assert_eq!(class(&verify_chain(c, None)), Some((4, FailureClass::Gap)));
    }

    #[test]
    fn swapped_entries_are_out_of_order() {
        let mut c = chain(10);
        c.swap(3, 4);
        assert_eq!(class(&verify_chain(c, None)), Some((3, FailureClass::OutOfOrder)));
    }

    #[test]
    fn truncation_below_a_recorded_head_is_caught() {
        let c = chain(10);
        let head = ExpectedHead { sequence: 8, hash: c[8].stored_hash.unwrap() };
        let truncated: Vec<_> = c.into_iter().take(6).collect();
        assert_eq!(class(&verify_chain(truncated, Some(head))), Some((8, FailureClass::HeadMissing)));
    }

    #[test]
    fn a_different_entry_at_the_recorded_head_is_caught() {
        let c = chain(10);
        let head = ExpectedHead { sequence: 8, hash: [1; 32] };
        assert_eq!(class(&verify_chain(c, Some(head))), Some((8, FailureClass::HeadDifferent)));
    }

    #[test]
    fn an_unknown_format_and_an_empty_chain_fail() {
        let mut c = chain(3);
        c[1].bytes[17] = b'9';
        c[1].stored_hash = None;
        assert_eq!(class(&verify_chain(c, None)), Some((1, FailureClass::UnknownFormat)));
        assert_eq!(class(&verify_chain(Vec::new(), None)), Some((0, FailureClass::NoGenesis)));
    }

    #[test]
    fn time_going_backwards_is_only_a_warning() {
        let mut c = chain(4);
        // Rebuild entries 2..4 with a time earlier than entry 1.
        let mut prev = c[1].stored_hash.unwrap();
        for raw in c.iter_mut().skip(2) {
            let mut e = AuditEntry::decode(&raw.bytes).unwrap();
            e.previous_hash = prev;
            e.time_micros = 1;
            raw.bytes = e.encode().unwrap();
            prev = sha256(&raw.bytes);
            raw.stored_hash = Some(prev);
        }
        let r = verify_chain(c, None);
        assert!(r.is_ok());
        assert_eq!(r.time_warnings, vec![2]);
    }

    /// `c` re-linked from `from` on: each entry's previous hash and stored hash recomputed.
    fn relink(c: &mut [RawEntry], from: usize) {
        for i in from..c.len() {
            let mut e = AuditEntry::decode(&c[i].bytes).unwrap();
            if i > 0 {
                e.previous_hash = c[i - 1].stored_hash.unwrap();
            }
            c[i].bytes = e.encode().unwrap();
            c[i].stored_hash = Some(sha256(&c[i].bytes));
        }
    }

    #[test]
    fn a_stored_sequence_that_differs_from_the_entrys_own_is_content_altered() {
        let mut c = chain(5);
        c[3].stored_sequence = Some(4);
        assert_eq!(class(&verify_chain(c, None)), Some((3, FailureClass::ContentAltered)));
    }

    #[test]
    fn gap_or_out_of_order_depends_on_whether_the_next_entrys_sequence_is_lower_than_this_ones() {
        let c = chain(6);
        let pick = |order: &[usize]| order.iter().map(|&i| c[i].clone()).collect::<Vec<_>>();
        assert_eq!(class(&verify_chain(pick(&[0, 1, 3, 4, 5]), None)), Some((2, FailureClass::Gap)));
        assert_eq!(class(&verify_chain(pick(&[0, 1, 3, 2, 4]), None)), Some((2, FailureClass::OutOfOrder)));
        // The next entry is higher than the expected one but lower than this one: still out of order.
        assert_eq!(class(&verify_chain(pick(&[0, 1, 4, 3, 5]), None)), Some((2, FailureClass::OutOfOrder)));
        let mut undecodable = pick(&[0, 1, 3]);
        undecodable.push(RawEntry { bytes: b"junk".to_vec(), stored_hash: None, stored_sequence: None });
        assert_eq!(class(&verify_chain(undecodable, None)), Some((2, FailureClass::Gap)));
        // A repeated entry is behind the expected sequence.
        assert_eq!(class(&verify_chain(pick(&[0, 1, 2, 1, 3]), None)), Some((3, FailureClass::OutOfOrder)));
    }

    #[test]
    fn a_chain_must_start_with_the_genesis_entry() {
        let mut c = chain(4);
        let mut e = AuditEntry::decode(&c[0].bytes).unwrap();
        e.action = "patient.read".into();
        c[0].bytes = e.encode().unwrap();
        relink(&mut c, 0);
        assert_eq!(class(&verify_chain(c, None)), Some((0, FailureClass::NoGenesis)));
        assert_eq!(class(&verify_chain(Vec::new(), None)), Some((0, FailureClass::NoGenesis)));
        // A chain that starts later than 0 is missing its first entries: a gap at 0.
        assert_eq!(class(&verify_chain(chain(4).split_off(1), None)), Some((0, FailureClass::Gap)));
    }

    #[test]
    fn invalid_utf8_and_presence_bytes_other_than_0_or_1_are_content_altered() {
        let mut c = chain(4);
        let e = AuditEntry { actor: "ab".into(), ..AuditEntry::decode(&c[2].bytes).unwrap() };
        let mut bytes = e.encode().unwrap();
        let at = bytes.windows(2).position(|w| w == b"ab").unwrap();
        bytes[at] = 0xff;
        c[2] = RawEntry { stored_hash: Some(sha256(&bytes)), bytes, stored_sequence: Some(2) };
        assert_eq!(class(&verify_chain(c, None)), Some((2, FailureClass::ContentAltered)));
        let mut c = chain(4);
        let e = AuditEntry::decode(&c[2].bytes).unwrap();
        let mut bytes = e.encode().unwrap();
        // The result_count presence byte follows key_version: 4 + 4 bytes after the outcome string.
        let outcome_end = bytes.len() - 4 - 1 - 4 - 6 * 4;
        bytes[outcome_end + 4] = 2;
        c[2] = RawEntry { stored_hash: Some(sha256(&bytes)), bytes, stored_sequence: Some(2) };
        assert_eq!(class(&verify_chain(c, None)), Some((2, FailureClass::ContentAltered)));
    }

    #[test]
    fn a_version_1_entry_may_precede_version_2_ones_but_never_follow_them() {
        let mut c = chain(5);
        for raw in c.iter_mut().take(3) {
            let e = AuditEntry::decode(&raw.bytes).unwrap();
            raw.bytes = AuditEntry { format: 1, ..e }.encode().unwrap();
        }
        relink(&mut c, 0);
        assert!(verify_chain(c.clone(), None).is_ok());
        let e = AuditEntry::decode(&c[4].bytes).unwrap();
        c[4].bytes = AuditEntry { format: 1, ..e }.encode().unwrap();
        relink(&mut c, 4);
        assert_eq!(class(&verify_chain(c, None)), Some((4, FailureClass::UnknownFormat)));
    }

    #[test]
    fn verifying_from_an_anchor_links_the_first_entry_to_the_anchors_hash() {
        let c = chain(10);
        let anchor = ExpectedHead { sequence: 5, hash: c[5].stored_hash.unwrap() };
        let tail: Vec<_> = c[6..].to_vec();
        let r = verify_from(tail.clone(), Some(anchor), None);
        assert!(r.is_ok(), "{r:?}");
        assert_eq!((r.entries_checked, r.head), (4, Some((9, c[9].stored_hash.unwrap()))));
        let wrong = ExpectedHead { hash: [7; 32], ..anchor };
        assert_eq!(class(&verify_from(tail.clone(), Some(wrong), None)), Some((6, FailureClass::LinkBroken)));
        assert_eq!(class(&verify_from(c[7..].to_vec(), Some(anchor), None)), Some((6, FailureClass::Gap)));
        // Nothing new since the anchor: verified, the head is the anchor, and it may be the expected head.
        let r = verify_from(Vec::new(), Some(anchor), Some(anchor));
        assert!(r.is_ok() && r.head == Some((5, anchor.hash)), "{r:?}");
        let before = ExpectedHead { sequence: 3, hash: c[3].stored_hash.unwrap() };
        assert_eq!(class(&verify_from(tail, Some(anchor), Some(before))), Some((3, FailureClass::HeadMissing)));
    }

    #[test]
    fn expected_heads_parse_from_seq_colon_hash() {
        let h: ExpectedHead = format!("12:{}", "ab".repeat(32)).parse().unwrap();
        assert_eq!(h.sequence, 12);
        assert!("12".parse::<ExpectedHead>().is_err());
        assert!("x:00".parse::<ExpectedHead>().is_err());
    }

    fn root_of(c: &[RawEntry]) -> [u8; 32] {
        crate::audit::merkle::root(&c.iter().map(|e| leaf_hash(&e.bytes)).collect::<Vec<_>>())
    }

    #[test]
    fn the_tree_is_recomputed_and_checkpoints_hold_the_log_to_what_it_signed() {
        let c = chain(40);
        let claim = |n: usize, saved| Claim { size: n as u64, root: root_of(&c[..n]), saved };
        let r = verify_log(chain(40), None, None, &[claim(17, false), claim(40, true), claim(1, true)]);
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(r.tree, Some((40, root_of(&c))));
        assert_eq!(r.checkpoints_checked, vec![1, 17, 40]);

        // Truncated below a checkpoint: the chain alone is fine, the checkpoint is not.
        let short: Vec<RawEntry> = chain(40).into_iter().take(30).collect();
        assert!(verify_chain(short.clone(), None).is_ok());
        let r = verify_log(short, None, None, &[claim(40, true)]);
        assert_eq!(class(&r), Some((30, FailureClass::SizeRegression)));

        // Recomputed from genesis with other content: consistent in itself, not with what was signed.
        let mut other = Vec::new();
        let mut prev = GENESIS_PREVIOUS_HASH;
        for (i, e) in chain(40).into_iter().enumerate() {
            let mut d = AuditEntry::decode(&e.bytes).unwrap();
            if i == 12 {
                d.actor = "someone-else".into();
            }
            d.previous_hash = prev;
            let bytes = d.encode().unwrap();
            prev = sha256(&bytes);
            other.push(RawEntry { bytes, stored_hash: Some(prev), stored_sequence: Some(i as u64) });
        }
        assert!(verify_chain(other.clone(), None).is_ok(), "a recomputed chain passes the chain checks");
        let r = verify_log(other.clone(), None, None, &[claim(20, true)]);
        assert_eq!(class(&r), Some((19, FailureClass::Inconsistent)));
        let r = verify_log(other.clone(), None, None, &[claim(20, false)]);
        assert_eq!(class(&r), Some((19, FailureClass::RootMismatch)));
        assert!(verify_log(other, None, None, &[claim(12, true)]).is_ok(), "the history before the change is the same");
    }
}
