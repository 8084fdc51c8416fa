#![forbid(unsafe_code)]
pub mod audit;
pub mod clock;
pub mod crypto;
pub mod domain;
pub mod storage;
pub mod proto {
    pub mod v1 {
        tonic::include_proto!("carevault.v1");
        include!(concat!(env!("OUT_DIR"), "/carevault.v1.serde.rs"));
    }
}
pub mod api;
pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod error;
pub mod keystore;
pub mod server;
