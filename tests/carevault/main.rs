//! Black-box tests: a real carevault server on 127.0.0.1:0, called through
//! the generated gRPC clients (and the CLI binary where that is the interface).

/// This binary's engine: sled (`tests/postgres` runs the suite on PostgreSQL).
pub const ENGINE: helpers::Engine = helpers::Engine::Sled;

/// Tests of what only sled has (its files, its lock, its fault hook): here,
/// and compiled out of `tests/postgres`.
macro_rules! sled_only {
    ($($item:item)*) => { $($item)* };
}

mod helpers;

mod audit_trail;
mod auth;
mod checkpoints;
mod cli;
mod coverage;
mod crash;
mod edge;
mod encryption;
mod erasure;
mod keys;
mod limits;
mod named;
mod patients;
mod pg;
mod restricted;
mod roles;
mod tamper;
mod tls;
mod validation;
