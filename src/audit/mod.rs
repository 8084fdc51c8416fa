//! The audit trail's canonical entry encoding and its pure verifier.
//!
//! * [`entry`]: [`AuditEntry`], its canonical, versioned, length-prefixed
//!   encoding and the entry hash (documented there byte by byte).
//! * [`verify`]: a pure function over entry bytes, shared by the CLI
//!   (offline and against a server) and the tests.

pub mod entry;
pub mod verify;

pub use entry::{AuditEntry, DecodeError, EncodeError, GENESIS_PREVIOUS_HASH, MAX_ENTRY_BYTES};
pub use verify::{ExpectedHead, Failure, FailureClass, RawEntry, Report, verify_chain, verify_from};
