//! Inspecting a stopped data directory without changing a byte of it.
//!
//! sled 0.34 writes to its files on every open, even with nothing to recover
//! (it has no read-only mode), and carevault's own recovery writes what a
//! crash left unfinished. So offline tools that only read (`verify`, offline
//! `keys status`, `backup`) work on a copy: the database's lock is taken
//! shared (so no server can be running, or start, while the files are
//! copied), every file is copied into a private temporary directory, and the
//! copy is opened and recovered there. The copy is removed when dropped.
//!
//! Copying costs one sequential read and write of the data directory (see
//! BENCHMARKS.md for the figure at a million entries); it holds ciphertext,
//! wrapped keys and audit entries only.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::storage::StorageError;

/// A private copy of (part of) a data directory, removed when dropped.
pub struct Copy {
    dir: tempfile::TempDir,
    /// Bytes copied.
    pub bytes: u64,
    /// Files copied.
    pub files: u64,
}

impl Copy {
    /// Where the copy is.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// The file sled locks while a database is open.
fn lock_file(db_dir: &Path) -> PathBuf {
    db_dir.join("db")
}

/// Fails with [`StorageError::Locked`] if a process has the database under
/// `db_dir` open (sled holds an exclusive lock on it), else returns the file
/// holding a shared lock, so that none can open it while it is held.
pub fn lock_shared(db_dir: &Path) -> Result<Option<File>, StorageError> {
    let path = lock_file(db_dir);
    if !path.exists() {
        return Ok(None);
    }
    let file = File::open(&path)?;
    match file.try_lock_shared() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Err(StorageError::Locked),
        Err(std::fs::TryLockError::Error(e)) => Err(e.into()),
    }
}

/// Copies `data_dir` (the whole directory, or only `only` under it) into a
/// new private temporary directory, with the database locked shared for the
/// whole copy. Nothing under `data_dir` is written.
pub fn copy_data_dir(data_dir: &Path, only: Option<&str>) -> Result<Copy, StorageError> {
    let _held = lock_shared(&data_dir.join("db"))?;
    let dir = tempfile::Builder::new().prefix("carevault-inspect-").tempdir()?;
    let mut copy = Copy { dir, bytes: 0, files: 0 };
    match only {
        Some(name) => {
            let to = copy.dir.path().join(name);
            copy_tree(&data_dir.join(name), &to, &mut copy.bytes, &mut copy.files)?;
        }
        None => {
            let to = copy.dir.path().to_path_buf();
            copy_tree(data_dir, &to, &mut copy.bytes, &mut copy.files)?;
        }
    }
    Ok(copy)
}

fn copy_tree(from: &Path, to: &Path, bytes: &mut u64, files: &mut u64) -> Result<(), StorageError> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            copy_tree(&entry.path(), &target, bytes, files)?;
        } else if kind.is_file() {
            *bytes += std::fs::copy(entry.path(), &target)?;
            *files += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_database_cannot_be_copied_and_a_closed_one_is_copied_whole() {
        let dir = tempfile::tempdir().unwrap();
        let db_dir = dir.path().join("db");
        let db = sled::open(&db_dir).unwrap();
        db.insert(b"k", b"v").unwrap();
        db.flush().unwrap();
        std::fs::write(dir.path().join("keycheck.json"), b"{}").unwrap();
        assert!(matches!(copy_data_dir(dir.path(), None), Err(StorageError::Locked)));
        drop(db);
        // sled releases its lock once its flusher thread notices the drop.
        let copy = (0..100)
            .find_map(|_| match copy_data_dir(dir.path(), None) {
                Err(StorageError::Locked) => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    None
                }
                other => Some(other.unwrap()),
            })
            .unwrap();
        assert!(copy.path().join("keycheck.json").exists());
        assert!(copy.files >= 3 && copy.bytes > 0);
        let again = sled::open(copy.path().join("db")).unwrap();
        assert_eq!(again.get(b"k").unwrap().as_deref(), Some(&b"v"[..]));
    }
}
