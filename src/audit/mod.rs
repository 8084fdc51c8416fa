//! The audit trail's canonical entry encoding and its pure verifier.
//!
//! * [`entry`]: [`AuditEntry`], its canonical, versioned, length-prefixed
//!   encoding and the entry hash (documented there byte by byte).
//! * [`verify`]: a pure function over entry bytes, shared by the CLI
//!   (offline and against a server) and the tests.
//! * [`merkle`]: the RFC 6962 Merkle tree over the entries: roots, and
//!   inclusion and consistency proofs, made and verified as pure functions.
//! * [`note`]: C2SP signed notes and tlog checkpoints (Ed25519), signed and
//!   verified as pure functions.

#[cfg(test)]
mod differential;
pub mod entry;
pub mod merkle;
pub mod note;
pub mod proof;
pub mod verify;
pub mod witness;

/// Known-answer vectors from outside (RFC 6962 roots and proofs, a C2SP
/// signed note): `$CAREVAULT_VECTORS`, or `../shared/vectors` beside the
/// project. A test that needs them fails without them.
#[cfg(test)]
pub(crate) fn vectors() -> std::path::PathBuf {
    let dir = match std::env::var_os("CAREVAULT_VECTORS") {
        Some(d) => std::path::PathBuf::from(d),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/vectors"),
    };
    assert!(dir.is_dir(), "the known-answer vectors are missing: {}", dir.display());
    dir
}

pub use entry::{AuditEntry, DecodeError, EncodeError, GENESIS_PREVIOUS_HASH, MAX_ENTRY_BYTES};
pub use verify::{Claim, ExpectedHead, Failure, FailureClass, RawEntry, Report, verify_chain, verify_from, verify_log};
