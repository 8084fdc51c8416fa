//! What a witness decides, as a pure function: whether to accept (and
//! cosign) a log's new checkpoint, given the one it accepted last and a
//! consistency proof between them. A witness never moves backwards: it
//! refuses a smaller tree (rollback), the same size with another root, and a
//! proof that fails (a fork).

use super::merkle::{self, Hash};
use super::note::{Checkpoint, Note, Verifier, verify_cosignature};

/// What a witness last accepted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WitnessState {
    /// The log's origin.
    pub origin: String,
    /// Tree size.
    pub size: u64,
    /// Root hash, base64.
    pub root: String,
}

/// Why a witness refuses a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The checkpoint is not signed by the log's key.
    #[error("the checkpoint's signature does not verify with the log key")]
    BadCheckpointSignature,
    /// It names another log than the one witnessed.
    #[error("the checkpoint is of another log (origin)")]
    WrongOrigin,
    /// Its tree is smaller than the one accepted before.
    #[error("the log's tree is smaller than the checkpoint accepted before (rollback)")]
    Rollback,
    /// The same size with another root, or a consistency proof that fails.
    #[error("the log is not consistent with the checkpoint accepted before (fork)")]
    Inconsistent,
}

impl Refusal {
    /// Stable machine-readable name.
    pub fn class(self) -> &'static str {
        match self {
            Refusal::BadCheckpointSignature => "bad_checkpoint_signature",
            Refusal::WrongOrigin => "wrong_origin",
            Refusal::Rollback => "rollback",
            Refusal::Inconsistent => "inconsistent",
        }
    }
}

/// How many of `witnesses` cosigned `note`: those with a C2SP
/// tlog-cosignature/v1 line among its signatures that verifies over its
/// body. A witness given twice counts once. Pure.
pub fn count_cosigners(note: &Note, witnesses: &[Verifier]) -> usize {
    let mut seen: Vec<(&str, [u8; 4])> = Vec::new();
    for w in witnesses {
        if seen.contains(&(w.name.as_str(), w.id)) {
            continue;
        }
        if note.signatures.iter().any(|s| verify_cosignature(w, &note.text, s).is_some()) {
            seen.push((w.name.as_str(), w.id));
        }
    }
    seen.len()
}

/// Whether `new` (its signature already checked) may be accepted after
/// `last` (size, root) with `proof` (RFC 9162 PROOF from `last.size` to `new.size`).
pub fn accept(last: Option<(&str, u64, Hash)>, new: &Checkpoint, proof: &[Hash]) -> Result<(), Refusal> {
    let Some((origin, size, root)) = last else { return Ok(()) };
    if origin != new.origin {
        return Err(Refusal::WrongOrigin);
    }
    if new.size < size {
        return Err(Refusal::Rollback);
    }
    if new.size == size {
        return if new.root == root { Ok(()) } else { Err(Refusal::Inconsistent) };
    }
    if size == 0 {
        return Ok(());
    }
    merkle::verify_consistency(size, new.size, &root, &new.root, proof).map_err(|_| Refusal::Inconsistent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_witness_accepts_growth_and_refuses_rollback_and_forks() {
        let leaves: Vec<Hash> = (0..30u8).map(|i| merkle::leaf_hash(&[i])).collect();
        let cp = |n: usize| Checkpoint {
            origin: "log".into(),
            size: n as u64,
            root: merkle::root(&leaves[..n]),
            extensions: vec![],
        };
        let last = |n: usize| Some(("log", n as u64, merkle::root(&leaves[..n])));
        let proof = merkle::consistency_proof(&leaves[..20], 12).unwrap();
        assert_eq!(accept(None, &cp(20), &[]), Ok(()));
        assert_eq!(accept(last(12), &cp(20), &proof), Ok(()));
        assert_eq!(accept(last(20), &cp(20), &[]), Ok(()));
        assert_eq!(accept(last(20), &cp(12), &[]), Err(Refusal::Rollback));
        let mut forked = cp(20);
        forked.root[0] ^= 1;
        assert_eq!(accept(last(20), &forked, &[]), Err(Refusal::Inconsistent));
        assert_eq!(accept(last(12), &forked, &proof), Err(Refusal::Inconsistent));
        let mut other = cp(20);
        other.origin = "another".into();
        assert_eq!(accept(last(12), &other, &proof), Err(Refusal::WrongOrigin));
    }

    #[test]
    fn cosigners_are_counted_once_each_and_only_with_a_valid_cosignature() {
        use crate::audit::note::{self, cosign};
        use crate::crypto::SigningKey;
        let key = || SigningKey::from_pkcs8(&crate::crypto::generate_issuer_key().unwrap().pkcs8_der).unwrap();
        let (log, w1, w2, w3) = (key(), key(), key(), key());
        let cp = Checkpoint { origin: "log.example/a".into(), size: 5, root: [3; 32], extensions: vec![] };
        let mut n = note::sign(&cp.body(), "log.example/a", &log).unwrap();
        let v = |name: &str, k: &SigningKey| Verifier::cosigner(name, k.public_key()).unwrap();
        let (v1, v2, v3) = (v("w1.example", &w1), v("w2.example", &w2), v("w3.example", &w3));
        assert_eq!(count_cosigners(&n, &[v1.clone(), v2.clone()]), 0);
        n.signatures.push(cosign(&n.text, "w1.example", &w1, 1_700_000_000).unwrap());
        n.signatures.push(cosign(&n.text, "w2.example", &w2, 1_700_000_001).unwrap());
        // w3's name on a cosignature made with w2's key does not count for w3.
        n.signatures.push(cosign(&n.text, "w3.example", &w2, 1_700_000_002).unwrap());
        assert_eq!(count_cosigners(&n, &[v1.clone(), v2.clone(), v3.clone()]), 2);
        assert_eq!(count_cosigners(&n, &[v1.clone(), v1.clone()]), 1);
        assert_eq!(count_cosigners(&n, &[v3]), 0);
        // A cosignature of another body does not count.
        let other = Checkpoint { size: 6, ..cp };
        let mut m = note::sign(&other.body(), "log.example/a", &log).unwrap();
        m.signatures.push(n.signatures[1].clone());
        assert_eq!(count_cosigners(&m, &[v1]), 0);
        // The log's own signature is not a cosignature.
        let as_witness = Verifier::cosigner("log.example/a", log.public_key()).unwrap();
        assert_eq!(count_cosigners(&n, &[as_witness, v2]), 1);
    }
}
