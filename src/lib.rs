//! carevault: audited, encrypted patient records over gRPC.
//!
//! How one call flows (open these files in order):
//!
//! 1. `server.rs`   tonic server, health, reflection; wires an [`api::Edge`] per service.
//! 2. `api/*.rs`    build the [`app::CallContext`] (request id, peer, bearer token and client
//!    certificate identity via [`auth`], purpose of use, a concurrency slot), parse the proto into
//!    domain input (`api/convert.rs`), or collect field violations.
//! 3. `app/*.rs`    start an audit entry, authorize (limits, token, policy and purpose), reach the
//!    patient (restricted, break-glass), check the input, open or seal records with [`crypto`]
//!    under the patient's data key, and disclose only the field groups the roles allow.
//! 4. `storage/sequencer.rs` writes the record change and its audit entry in a crash-recoverable
//!    order (a redo record, then the block of entries, then the data), batches concurrent
//!    commits, fdatasyncs on a sync thread, and only then answers.
//! 5. back in `api`, the domain result becomes a proto response; errors become a `Status` only in
//!    [`error::to_status`].
//!
//! [`audit`] holds the canonical entry encoding and the pure verifier used by `carevault verify`.

#![forbid(unsafe_code)]

pub mod api;
pub mod app;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod domain;
pub mod error;
pub mod keystore;
pub mod server;
pub mod storage;

/// Generated protobuf types, gRPC clients and servers, and proto3-JSON serde impls.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    /// Package `carevault.v1`.
    pub mod v1 {
        tonic::include_proto!("carevault.v1");
        include!(concat!(env!("OUT_DIR"), "/carevault.v1.serde.rs"));
    }
}
