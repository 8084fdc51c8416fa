//! Black-box tests: a real carevault server on 127.0.0.1:0, called through
//! the generated gRPC clients (and the CLI binary where that is the interface).

mod helpers;

mod audit_trail;
mod auth;
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
