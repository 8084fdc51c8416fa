//! Pure verification of an audit chain.
//!
//! [`verify_chain`] takes entries in storage (or export) order as raw bytes
//! and recomputes every hash itself. A hash that came with an entry (the one
//! the server stored) is used only to classify a failure as "content altered";
//! it is never trusted as proof of anything.
//!
//! Checks, in order, for each entry:
//! 1. it decodes as a known format version            -> `UnknownFormat` / `ContentAltered`
//! 2. SHA-256 of its bytes equals the hash stored with it -> `ContentAltered`
//! 3. its sequence number is the expected next one     -> `Gap` (ahead) / `OutOfOrder` (behind, or
//!    ahead and followed by the missing one, as when two entries are swapped)
//! 4. its previous hash equals the recomputed hash of the entry before it -> `LinkBroken`
//! 5. its time is not before the previous entry's time -> a warning only
//!
//! After the last entry, an [`ExpectedHead`] (a sequence and hash recorded
//! earlier) must be on the chain: missing -> `HeadMissing` (truncation),
//! different -> `HeadDifferent` (rewriting).

use std::iter::Peekable;

use super::entry::{AuditEntry, DecodeError, GENESIS_PREVIOUS_HASH};
use crate::crypto::sha256;

/// One entry as stored or exported: its canonical bytes and, if known, the hash stored beside them.
#[derive(Debug, Clone)]
pub struct RawEntry {
    /// The canonical encoding.
    pub bytes: Vec<u8>,
    /// The hash the store recorded for these bytes, if any.
    pub stored_hash: Option<[u8; 32]>,
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
    /// An entry's bytes do not match its stored hash, or do not decode.
    ContentAltered,
    /// An entry's previous hash is not the hash of the entry before it.
    LinkBroken,
    /// One or more sequence numbers are missing.
    Gap,
    /// Entries appear out of sequence order (swapped, duplicated or moved).
    OutOfOrder,
    /// An entry has a format version this verifier does not know.
    UnknownFormat,
    /// The recorded head is beyond the end of the chain (truncation).
    HeadMissing,
    /// The entry at the recorded head's sequence has a different hash (rewriting).
    HeadDifferent,
    /// The chain is empty or does not start with a genesis entry at 0.
    NoGenesis,
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
        }
    }
}

/// The first problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Sequence number where the problem was found (the expected one for gaps).
    pub sequence: u64,
    /// What kind of problem.
    pub class: FailureClass,
}

/// Result of a verification run. `failure: None` means the chain verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Entries whose hash and link were checked.
    pub entries_checked: u64,
    /// The last good entry's sequence and recomputed hash.
    pub head: Option<(u64, [u8; 32])>,
    /// Sequences whose time is earlier than the entry before (warnings only).
    pub time_warnings: Vec<u64>,
    /// The first failure, if any.
    pub failure: Option<Failure>,
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
    let mut it = entries
        .into_iter()
        .map(|raw| {
            let hash = sha256(&raw.bytes);
            let decoded = AuditEntry::decode(&raw.bytes);
            (raw, hash, decoded)
        })
        .peekable();
    let mut report = Report { entries_checked: 0, head: None, time_warnings: Vec::new(), failure: None };
    let mut hashes_seen: Vec<(u64, [u8; 32])> = Vec::new();
    if let Some(failure) = walk(&mut it, &mut report, expect_head.map(|h| h.sequence), &mut hashes_seen) {
        report.failure = Some(failure);
        return report;
    }
    if report.head.is_none() {
        report.failure = Some(Failure { sequence: 0, class: FailureClass::NoGenesis });
        return report;
    }
    if let Some(expected) = expect_head {
        match hashes_seen.iter().find(|(s, _)| *s == expected.sequence) {
            None => report.failure = Some(Failure { sequence: expected.sequence, class: FailureClass::HeadMissing }),
            Some((_, h)) if *h != expected.hash => {
                report.failure = Some(Failure { sequence: expected.sequence, class: FailureClass::HeadDifferent })
            }
            Some(_) => {}
        }
    }
    report
}

type Item = (RawEntry, [u8; 32], Result<AuditEntry, DecodeError>);

fn walk<I: Iterator<Item = Item>>(
    it: &mut Peekable<I>,
    report: &mut Report,
    remember: Option<u64>,
    hashes_seen: &mut Vec<(u64, [u8; 32])>,
) -> Option<Failure> {
    let mut expected_seq: u64 = 0;
    let mut prev_hash = GENESIS_PREVIOUS_HASH;
    let mut prev_time: Option<i64> = None;
    while let Some((raw, hash, decoded)) = it.next() {
        let entry = match decoded {
            Ok(e) => e,
            Err(DecodeError::UnknownFormat) => {
                return Some(Failure { sequence: expected_seq, class: FailureClass::UnknownFormat });
            }
            Err(_) => return Some(Failure { sequence: expected_seq, class: FailureClass::ContentAltered }),
        };
        if let Some(stored) = raw.stored_hash
            && stored != hash
        {
            return Some(Failure { sequence: expected_seq, class: FailureClass::ContentAltered });
        }
        if entry.sequence < expected_seq {
            return Some(Failure { sequence: expected_seq.saturating_sub(1), class: FailureClass::OutOfOrder });
        }
        if entry.sequence > expected_seq {
            // Ahead of where we are: a gap, unless the missing entry comes
            // next (two entries swapped), which is an ordering problem.
            let next_is_behind =
                it.peek().and_then(|(_, _, d)| d.as_ref().ok()).is_some_and(|n| n.sequence < entry.sequence);
            let class = if next_is_behind { FailureClass::OutOfOrder } else { FailureClass::Gap };
            return Some(Failure { sequence: expected_seq, class });
        }
        if entry.previous_hash != prev_hash {
            return Some(Failure { sequence: entry.sequence, class: FailureClass::LinkBroken });
        }
        if let Some(t) = prev_time
            && entry.time_micros < t
        {
            report.time_warnings.push(entry.sequence);
        }
        prev_time = Some(entry.time_micros);
        prev_hash = hash;
        report.entries_checked += 1;
        report.head = Some((entry.sequence, hash));
        if remember == Some(entry.sequence) {
            hashes_seen.push((entry.sequence, hash));
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
            let mut e = if seq == 0 { AuditEntry::genesis(0) } else { AuditEntry::default() };
            e.sequence = seq;
            e.previous_hash = prev;
            e.time_micros = i64::try_from(seq).unwrap() * 10;
            e.action = "patient.read".into();
            let bytes = e.encode().unwrap();
            prev = sha256(&bytes);
            out.push(RawEntry { bytes, stored_hash: Some(prev) });
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

    #[test]
    fn expected_heads_parse_from_seq_colon_hash() {
        let h: ExpectedHead = format!("12:{}", "ab".repeat(32)).parse().unwrap();
        assert_eq!(h.sequence, 12);
        assert!("12".parse::<ExpectedHead>().is_err());
        assert!("x:00".parse::<ExpectedHead>().is_err());
    }
}
