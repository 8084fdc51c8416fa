//! The black-box suite again, every server on a PostgreSQL database of its
//! own (one throwaway cluster for this test process; see `tests/support`).
//! The modules are the same files as `tests/carevault`'s; what only sled has
//! (its files on disk, its crash recovery, raw tampering with its trees) is
//! tested there alone.

// The sled-only tests are compiled out, leaving some helpers and imports unused here.
#![allow(dead_code, unused_imports)]

/// What only sled has is tested in `tests/carevault` alone.
macro_rules! sled_only {
    ($($item:item)*) => {};
}

#[path = "../carevault/helpers.rs"]
mod helpers;
#[path = "../carevault/pg.rs"]
mod pg;

/// This binary's engine.
pub const ENGINE: helpers::Engine = helpers::Engine::Postgres;

#[path = "../carevault/audit_trail.rs"]
mod audit_trail;
#[path = "../carevault/auth.rs"]
mod auth;
#[path = "../carevault/checkpoints.rs"]
mod checkpoints;
#[path = "../carevault/cli.rs"]
mod cli;
#[path = "../carevault/coverage.rs"]
mod coverage;
#[path = "../carevault/crash.rs"]
mod crash;
#[path = "../carevault/edge.rs"]
mod edge;
#[path = "../carevault/encryption.rs"]
mod encryption;
#[path = "../carevault/erasure.rs"]
mod erasure;
#[path = "../carevault/failover.rs"]
mod failover;
#[path = "../carevault/keys.rs"]
mod keys;
#[path = "../carevault/limits.rs"]
mod limits;
#[path = "../carevault/multiprocess.rs"]
mod multiprocess;
#[path = "../carevault/named.rs"]
mod named;
#[path = "../carevault/patients.rs"]
mod patients;
#[path = "../carevault/pg_at_rest.rs"]
mod pg_at_rest;
#[path = "../carevault/restricted.rs"]
mod restricted;
#[path = "../carevault/roles.rs"]
mod roles;
#[path = "../carevault/tls.rs"]
mod tls;
#[path = "../carevault/validation.rs"]
mod validation;
