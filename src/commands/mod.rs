//! Command implementations (binary edge: errors are `anyhow`).

pub mod bench;
pub mod client;
pub mod serve;
pub mod token;
pub mod verify;

use std::path::PathBuf;

use carevault::cli::DirArgs;
use carevault::config::{default_data_dir, default_key_dir};

/// Data and key directories with defaults applied.
pub fn dirs(args: &DirArgs) -> (PathBuf, PathBuf) {
    (args.data_dir.clone().unwrap_or_else(default_data_dir), args.key_dir.clone().unwrap_or_else(default_key_dir))
}
