//! Closing sled 0.34.7's durability gap.
//!
//! `sled::Db::flush` writes its buffers and calls `sync_file_range`, which
//! neither flushes the drive's write cache nor the file's size metadata, so
//! on Linux it does not make writes durable (sled issue #1452). After every
//! flush we therefore call `fdatasync` ourselves on sled's log file (`db`),
//! on any blob files sled wrote (large values; normally none), and on the
//! directory when it gained files. A reply is sent only after this returns.
//!
//! Listing the blob directory on every sync cost a few percent of CPU, so it
//! is listed only when its modification time differs from the one seen at the
//! last listing, or when that time was less than [`MTIME_SLACK`] older than
//! the listing itself. Creating a file sets the directory's time to the
//! current (coarse, a few milliseconds behind) clock, so a file created after
//! a listing that trusted an older time always changes the time it sees.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::storage::FailSyncs;
use std::time::{Duration, SystemTime};

/// How much older than a listing the blob directory's modification time must
/// be for an unchanged time to prove that no file was added since: far more
/// than the lag of the kernel's coarse clock that stamps it.
const MTIME_SLACK: Duration = Duration::from_secs(1);

/// Makes everything sled has accepted durable.
pub struct Durability {
    blob_dir: PathBuf,
    log: File,
    synced_blobs: HashSet<OsString>,
    /// The blob directory's modification time when it was last listed, if
    /// that time was old enough to be trusted (see the module docs).
    trusted_blob_mtime: Option<SystemTime>,
    syncs: Arc<AtomicU64>,
    fail: FailSyncs,
}

impl Durability {
    /// Opens sled's log file under `dir` and fsyncs the directories once so
    /// the files themselves are durable. `fail` makes syncs fail on purpose
    /// in tests of fail-closed behaviour (see [`FailSyncs`]).
    pub fn open(dir: &Path, fail: FailSyncs) -> std::io::Result<Self> {
        let log = File::open(dir.join("db"))?;
        sync_dir(dir)?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        Ok(Durability {
            blob_dir: dir.join("blobs"),
            log,
            synced_blobs: HashSet::new(),
            trusted_blob_mtime: None,
            syncs: Arc::new(AtomicU64::new(0)),
            fail,
        })
    }

    /// The count of completed syncs (shared, so it can be read after the sequencer owns this).
    pub fn sync_counter(&self) -> Arc<AtomicU64> {
        self.syncs.clone()
    }

    /// `db.flush()`, then fdatasync of the log file and any new blob files.
    pub fn sync(&mut self, db: &sled::Db) -> std::io::Result<()> {
        if self.fail.now() {
            return Err(std::io::Error::other("injected sync failure"));
        }
        db.flush().map_err(std::io::Error::other)?;
        self.log.sync_data()?;
        self.sync_new_blobs()?;
        self.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn sync_new_blobs(&mut self) -> std::io::Result<()> {
        let listing_started = SystemTime::now();
        let mtime = match std::fs::metadata(&self.blob_dir) {
            Ok(m) => m.modified()?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if self.trusted_blob_mtime == Some(mtime) {
            return Ok(());
        }
        let blob_dir = &self.blob_dir;
        let entries = std::fs::read_dir(blob_dir)?;
        let mut new_files = false;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            if !self.synced_blobs.contains(&name) {
                File::open(entry.path())?.sync_data()?;
                self.synced_blobs.insert(name);
                new_files = true;
            }
        }
        if new_files {
            sync_dir(blob_dir)?;
        }
        self.trusted_blob_mtime =
            listing_started.duration_since(mtime).is_ok_and(|age| age > MTIME_SLACK).then_some(mtime);
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn durability_in(dir: &Path) -> Durability {
        std::fs::write(dir.join("db"), b"").unwrap();
        Durability::open(dir, FailSyncs::never()).unwrap()
    }

    fn age_dir(dir: &Path, by: Duration) {
        File::open(dir).unwrap().set_modified(SystemTime::now() - by).unwrap();
    }

    #[test]
    fn a_blob_created_after_a_trusted_listing_is_still_synced() {
        let tmp = tempfile::tempdir().unwrap();
        let blobs = tmp.path().join("blobs");
        std::fs::create_dir(&blobs).unwrap();
        std::fs::write(blobs.join("1"), b"one").unwrap();
        age_dir(&blobs, Duration::from_secs(60));
        let mut d = durability_in(tmp.path());

        d.sync_new_blobs().unwrap();
        assert!(d.synced_blobs.contains(&OsString::from("1")));
        assert!(d.trusted_blob_mtime.is_some(), "an old directory time is trusted");

        std::fs::write(blobs.join("2"), b"two").unwrap();
        d.sync_new_blobs().unwrap();
        assert!(d.synced_blobs.contains(&OsString::from("2")));
        assert!(d.trusted_blob_mtime.is_none(), "a fresh directory time is not trusted");
    }

    #[test]
    fn a_recently_changed_blob_directory_is_listed_on_every_sync() {
        let tmp = tempfile::tempdir().unwrap();
        let blobs = tmp.path().join("blobs");
        std::fs::create_dir(&blobs).unwrap();
        let mut d = durability_in(tmp.path());
        d.sync_new_blobs().unwrap();
        assert!(d.trusted_blob_mtime.is_none());
        // The directory time the listing saw was too recent to rule out a
        // file created in the same clock tick, so the next sync lists again.
        std::fs::write(blobs.join("3"), b"three").unwrap();
        d.sync_new_blobs().unwrap();
        assert!(d.synced_blobs.contains(&OsString::from("3")));
    }

    #[test]
    fn a_missing_blob_directory_needs_no_sync() {
        let tmp = tempfile::tempdir().unwrap();
        let mut d = durability_in(tmp.path());
        d.sync_new_blobs().unwrap();
        assert!(d.synced_blobs.is_empty());
    }
}
