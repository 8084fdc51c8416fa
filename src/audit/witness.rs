//! What a witness decides, as a pure function: whether to accept (and
//! cosign) a log's new checkpoint, given the one it accepted last and a
//! consistency proof between them. A witness never moves backwards: it
//! refuses a smaller tree (rollback), the same size with another root, and a
//! proof that fails (a fork).

use super::merkle::{self, Hash};
use super::note::Checkpoint;

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
}
