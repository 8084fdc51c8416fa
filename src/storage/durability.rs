//! Closing sled 0.34.7's durability gap.
//!
//! `sled::Db::flush` writes its buffers and calls `sync_file_range`, which
//! neither flushes the drive's write cache nor the file's size metadata, so
//! on Linux it does not make writes durable (sled issue #1452). After every
//! flush we therefore call `fdatasync` ourselves on sled's log file (`db`),
//! on any blob files sled wrote (large values; normally none), and on the
//! directory when it gained files. A reply is sent only after this returns.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Makes everything sled has accepted durable.
pub struct Durability {
    dir: PathBuf,
    log: File,
    synced_blobs: HashSet<OsString>,
    syncs: Arc<AtomicU64>,
    fail: Option<Arc<AtomicBool>>,
}

impl Durability {
    /// Opens sled's log file under `dir` and fsyncs the directories once so
    /// the files themselves are durable. `fail`, when set to true, makes every
    /// sync fail: a fault-injection hook for tests of fail-closed behaviour.
    pub fn open(dir: &Path, fail: Option<Arc<AtomicBool>>) -> std::io::Result<Self> {
        let log = File::open(dir.join("db"))?;
        sync_dir(dir)?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        Ok(Durability {
            dir: dir.to_path_buf(),
            log,
            synced_blobs: HashSet::new(),
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
        if self.fail.as_ref().is_some_and(|f| f.load(Ordering::SeqCst)) {
            return Err(std::io::Error::other("injected sync failure"));
        }
        db.flush().map_err(std::io::Error::other)?;
        self.log.sync_data()?;
        self.sync_new_blobs()?;
        self.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn sync_new_blobs(&mut self) -> std::io::Result<()> {
        let blob_dir = self.dir.join("blobs");
        let Ok(entries) = std::fs::read_dir(&blob_dir) else {
            return Ok(());
        };
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
            sync_dir(&blob_dir)?;
        }
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}
