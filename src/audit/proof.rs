//! The self-contained inclusion proof document `carevault audit prove`
//! prints and `carevault verify-proof` checks offline: one audit entry, its
//! RFC 9162 inclusion proof, and the signed checkpoint it is proved against.
//!
//! ```json
//! {
//!   "format": "carevault-inclusion-proof/v1",
//!   "sequence": 12,            // the entry's sequence = its leaf index
//!   "tree_size": 40,           // the checkpoint's size
//!   "entry": "<base64 of the canonical entry bytes E>",
//!   "hashes": ["<base64 of 32 bytes>", ...],   // RFC 9162 PATH, leaf to root
//!   "checkpoint": "<the signed note: checkpoint body, blank line, signature lines>"
//! }
//! ```
//!
//! It verifies when the checkpoint is signed by the given log key (named by
//! the checkpoint's origin), its size is `tree_size`, `E` decodes and names
//! `sequence`, and the proof leads from `SHA-256(0x00 ‖ E)` to the
//! checkpoint's root. Pure functions over bytes.

use base64::Engine;
use serde::{Deserialize, Serialize};

use super::AuditEntry;
use super::merkle::{self, Hash};
use super::note::{self, Checkpoint, Verifier};

/// The document's `format`.
pub const FORMAT: &str = "carevault-inclusion-proof/v1";

/// An inclusion proof document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProofDocument {
    /// Always [`FORMAT`].
    pub format: String,
    /// The entry's sequence (its leaf index).
    pub sequence: u64,
    /// The tree size proved against (the checkpoint's).
    pub tree_size: u64,
    /// The canonical entry bytes, base64.
    pub entry: String,
    /// The proof's hashes, base64.
    pub hashes: Vec<String>,
    /// The signed checkpoint note.
    pub checkpoint: String,
}

/// Why a proof document does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofDocError {
    /// Not a document of this format.
    #[error("not a carevault inclusion proof: {0}")]
    Malformed(&'static str),
    /// The checkpoint is not signed by the log key.
    #[error("the checkpoint's signature does not verify with the log key: {0}")]
    BadCheckpointSignature(note::NoteError),
    /// The entry does not decode, or names another sequence.
    #[error("the entry is not the one the proof is for")]
    WrongEntry,
    /// The proof does not lead to the checkpoint's root.
    #[error("the proof does not lead to the checkpoint's root: {0}")]
    NotIncluded(merkle::ProofError),
}

impl ProofDocError {
    /// Stable machine-readable name.
    pub fn class(&self) -> &'static str {
        match self {
            ProofDocError::Malformed(_) => "malformed",
            ProofDocError::BadCheckpointSignature(_) => "bad_checkpoint_signature",
            ProofDocError::WrongEntry => "wrong_entry",
            ProofDocError::NotIncluded(_) => "not_included",
        }
    }
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

impl ProofDocument {
    /// A document from an entry, its proof and the checkpoint note.
    pub fn new(sequence: u64, tree_size: u64, entry: &[u8], hashes: &[Hash], checkpoint: &str) -> ProofDocument {
        ProofDocument {
            format: FORMAT.into(),
            sequence,
            tree_size,
            entry: b64().encode(entry),
            hashes: hashes.iter().map(|h| b64().encode(h)).collect(),
            checkpoint: checkpoint.into(),
        }
    }

    /// Checks the document against the log's verifier keys; returns the
    /// proved entry and the checkpoint.
    pub fn verify(&self, log_keys: &[Verifier]) -> Result<(AuditEntry, Checkpoint), ProofDocError> {
        if self.format != FORMAT {
            return Err(ProofDocError::Malformed("unknown format"));
        }
        let c = note::open_checkpoint(&self.checkpoint, log_keys).map_err(ProofDocError::BadCheckpointSignature)?;
        if c.size != self.tree_size {
            return Err(ProofDocError::Malformed("tree_size is not the checkpoint's size"));
        }
        let entry = b64().decode(&self.entry).map_err(|_| ProofDocError::Malformed("entry is not base64"))?;
        let hashes = self
            .hashes
            .iter()
            .map(|h| b64().decode(h).map_err(|_| ProofDocError::Malformed("a hash is not base64")))
            .collect::<Result<Vec<_>, _>>()?;
        let decoded = AuditEntry::decode(&entry).map_err(|_| ProofDocError::WrongEntry)?;
        if decoded.sequence != self.sequence {
            return Err(ProofDocError::WrongEntry);
        }
        merkle::verify_inclusion(self.sequence, self.tree_size, &merkle::leaf_hash(&entry), &hashes, &c.root)
            .map_err(ProofDocError::NotIncluded)?;
        Ok((decoded, c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::SigningKey;

    fn log(n: u64) -> (Vec<Vec<u8>>, Vec<Hash>) {
        let entries: Vec<Vec<u8>> = (0..n)
            .map(|seq| {
                let e = AuditEntry { sequence: seq, action: "patient.read".into(), ..AuditEntry::default() };
                e.encode().unwrap()
            })
            .collect();
        let leaves = entries.iter().map(|e| merkle::leaf_hash(e)).collect();
        (entries, leaves)
    }

    #[test]
    fn a_proof_document_verifies_offline_and_every_change_to_it_is_caught() {
        let key = SigningKey::from_seed(&[3; 32]).unwrap();
        let origin = "carevault.test/audit";
        let v = Verifier::new(origin, key.public_key()).unwrap();
        let (entries, leaves) = log(21);
        let root = merkle::root(&leaves);
        let body = Checkpoint { origin: origin.into(), size: 21, root, extensions: vec![] }.body();
        let signed = note::sign(&body, origin, &key).unwrap().encode();
        let proof = merkle::inclusion_proof(&leaves, 7).unwrap();
        let doc = ProofDocument::new(7, 21, &entries[7], &proof, &signed);
        let json = serde_json::to_string(&doc).unwrap();
        let back: ProofDocument = serde_json::from_str(&json).unwrap();
        let (e, c) = back.verify(std::slice::from_ref(&v)).unwrap();
        assert_eq!((e.sequence, c.size), (7, 21));

        // Another key, a changed entry, a changed proof, the wrong sequence.
        let other = Verifier::new(origin, SigningKey::from_seed(&[4; 32]).unwrap().public_key()).unwrap();
        assert_eq!(doc.verify(&[other]).unwrap_err().class(), "bad_checkpoint_signature");
        let mut changed = AuditEntry::decode(&entries[7]).unwrap();
        changed.actor = "someone".into();
        let bad = ProofDocument::new(7, 21, &changed.encode().unwrap(), &proof, &signed);
        assert_eq!(bad.verify(std::slice::from_ref(&v)).unwrap_err().class(), "not_included");
        let mut p2 = proof.clone();
        p2[1][0] ^= 1;
        let bad = ProofDocument::new(7, 21, &entries[7], &p2, &signed);
        assert_eq!(bad.verify(std::slice::from_ref(&v)).unwrap_err().class(), "not_included");
        let bad = ProofDocument::new(8, 21, &entries[7], &proof, &signed);
        assert_eq!(bad.verify(std::slice::from_ref(&v)).unwrap_err().class(), "wrong_entry");
        let bad = ProofDocument::new(7, 22, &entries[7], &proof, &signed);
        assert_eq!(bad.verify(std::slice::from_ref(&v)).unwrap_err().class(), "malformed");
    }
}
