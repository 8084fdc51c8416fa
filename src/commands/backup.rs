//! `carevault backup`: a consistent, compacted copy of a stopped data directory.
//! It reads a private copy of the directory (see `storage::snapshot`), so the
//! directory itself is left exactly as it was.
//!
//! The copy holds the database (every tree's live values, written into a new
//! sled database and fsynced), `keycheck.json` and `erasure-keys`. Master keys
//! are not copied: back the key directory up separately. Because only live
//! values are copied, a backup taken after an erasure holds nothing of the
//! erased patient but its audit entries.

use std::fs;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::Context;
use carevault::cli::BackupArgs;
use carevault::config::default_data_dir;
use carevault::keystore::ERASURE_KEYS_FILE;
use carevault::storage::Location;
use carevault::storage::sled::{SledStore, snapshot};

fn copy_durably(from: &Path, to: &Path, mode: u32) -> anyhow::Result<()> {
    let bytes = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(to)
        .with_context(|| format!("creating {}", to.display()))?;
    std::io::Write::write_all(&mut f, &bytes)?;
    f.sync_all()?;
    Ok(())
}

/// Runs `backup`.
pub fn run(args: BackupArgs) -> anyhow::Result<()> {
    let data_dir = args.data_dir.unwrap_or_else(default_data_dir);
    if !data_dir.join("keycheck.json").exists() {
        anyhow::bail!("{} is not a carevault data directory (no keycheck.json)", data_dir.display());
    }
    if args.out.exists() {
        anyhow::bail!("{} already exists; choose a new directory", args.out.display());
    }
    if let Location::Postgres(url) = super::store(args.store.as_deref(), &data_dir)? {
        return key_state_only(&data_dir, &args.out, &url);
    }
    // sled writes on every open: back up from a private copy, so the data
    // directory itself is left exactly as it was.
    let started = std::time::Instant::now();
    let copy = snapshot::copy_data_dir(&data_dir, None).map_err(super::verify::open_error)?;
    let store = SledStore::open(&copy.path().join("db"), 64 << 20).map_err(super::verify::open_error)?;
    super::verify::note_copy(&copy, started.elapsed(), store.recovery());
    fs::create_dir_all(&args.out)?;
    fs::set_permissions(&args.out, fs::Permissions::from_mode(0o700))?;
    let copied = store.backup_to(&args.out.join("db")).context("copying the database")?;
    copy_durably(&copy.path().join("keycheck.json"), &args.out.join("keycheck.json"), 0o644)?;
    let erasure = copy.path().join(ERASURE_KEYS_FILE);
    if erasure.exists() {
        copy_durably(&erasure, &args.out.join(ERASURE_KEYS_FILE), 0o600)?;
    }
    fs::File::open(&args.out)?.sync_all()?;
    let head = store.audit_head_sync()?.map(|(seq, hash)| format!("{seq}:{}", hex::encode(hash))).unwrap_or_default();
    println!(
        "backed up {copied} keys to {} (audit head {head}); back up the key directory separately",
        args.out.display()
    );
    Ok(())
}

/// On PostgreSQL the database is backed up by PostgreSQL's tools; what lives
/// in the data directory (the key state) is copied here.
fn key_state_only(data_dir: &std::path::Path, out: &std::path::Path, url: &str) -> anyhow::Result<()> {
    fs::create_dir_all(out)?;
    fs::set_permissions(out, fs::Permissions::from_mode(0o700))?;
    copy_durably(&data_dir.join("keycheck.json"), &out.join("keycheck.json"), 0o644)?;
    let erasure = data_dir.join(ERASURE_KEYS_FILE);
    if erasure.exists() {
        copy_durably(&erasure, &out.join(ERASURE_KEYS_FILE), 0o600)?;
    }
    fs::File::open(out)?.sync_all()?;
    println!(
        "copied keycheck.json and erasure-keys to {}; back up the key directory separately.\n\
         The database {} is backed up with PostgreSQL's own tools, while servers run:\n\
         - pg_basebackup (a physical copy; with WAL archiving, point-in-time recovery), or\n\
         - pg_dump --format=custom (a logical copy of carevault's tables, restored with pg_restore).\n\
         Either copy holds only ciphertext, wrapped keys, HMACs and audit entries; keep it as carefully as the database.",
        out.display(),
        carevault::storage::postgres::connect::redacted(url)
    );
    Ok(())
}
