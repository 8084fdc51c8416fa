//! The sequencer: every audit append and every change goes through it, in
//! one order per chain, in batches that share one durable commit (group
//! commit).
//!
//! A [`Commit`] carries an audit entry (without sequence, previous hash or
//! time, which are assigned when it is planned), optionally a record write,
//! and changes with their preconditions. An engine's commit pipeline takes
//! everything queued (up to [`MAX_BATCH`]), plans the batch with [`plan`]
//! (engine-neutral: preconditions, chaining, encoding), makes it durable its
//! own way, and only then answers each request.
//!
//! Failure is closed: once a write or a durable sync fails, the pipeline
//! records it ([`Sequencer::failed`]) and refuses every later commit until a
//! restart has recovered.

pub mod plan;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot, watch};

use super::StorageError;
use super::model::{Change, RecordWrite};
use crate::audit::AuditEntry;

/// Most commits planned and made durable as one batch.
pub const MAX_BATCH: usize = 512;

/// One request to the sequencer.
pub struct Commit {
    /// The audit entry; sequence, previous hash and time are assigned when planned.
    pub entry: AuditEntry,
    /// The record write, if any.
    pub write: Option<RecordWrite>,
    /// Other changes, all or none together with `write`.
    pub changes: Vec<Change>,
}

impl Commit {
    /// An audit entry alone.
    pub fn entry(entry: AuditEntry) -> Commit {
        Commit { entry, write: None, changes: Vec::new() }
    }
}

/// What happened to a commit's write and changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    /// Entry, write and changes committed.
    Written,
    /// The record's version was not the expected one, or a change's
    /// precondition failed; only the audit entry (outcome "aborted") was committed.
    Conflict {
        /// Version actually stored (0 if none, or for a failed change precondition).
        current: u64,
    },
    /// The patient's data key changed (re-encrypted or erased) after the
    /// write sealed with it; only the audit entry ("aborted") was committed.
    KeyChanged,
    /// The key state is not the one the commit was prepared under (a key
    /// operation through another process); only the audit entry
    /// ("aborted") was committed.
    KeyStateMoved,
}

/// A durable commit.
#[derive(Debug, Clone, Copy)]
pub struct Committed {
    /// The entry's sequence number.
    pub sequence: u64,
    /// The entry's hash.
    pub hash: [u8; 32],
    /// The entry's time.
    pub time_micros: i64,
    /// Whether the write and changes happened.
    pub outcome: CommitOutcome,
}

/// A commit waiting in the queue, with where to send its result.
pub struct Pending {
    /// The commit.
    pub commit: Commit,
    /// Where its result goes once it is durable (or failed).
    pub reply: oneshot::Sender<Result<Committed, StorageError>>,
}

/// Handle to an engine's commit pipeline. Cloning shares the pipeline; it
/// stops (after a final sync) when every handle is gone.
#[derive(Clone)]
pub struct Sequencer {
    tx: mpsc::Sender<Pending>,
    head: Arc<Mutex<(u64, [u8; 32])>>,
    syncs: Arc<AtomicU64>,
    failed: watch::Receiver<bool>,
}

/// What an engine's pipeline gets: the queue, and where to report its head and failure.
pub struct Queue {
    /// Commits to plan and make durable.
    pub rx: mpsc::Receiver<Pending>,
    /// The newest committed entry (this process's view).
    pub head: Arc<Mutex<(u64, [u8; 32])>>,
    /// Set, for good, when a write or a durable sync failed.
    pub failed: Failed,
}

/// Creates a sequencer handle and the queue an engine's pipeline serves;
/// `head` is the chain's newest entry when the pipeline starts.
pub fn channel(head: (u64, [u8; 32]), syncs: Arc<AtomicU64>) -> (Sequencer, Queue) {
    let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
    let (failed_tx, failed) = watch::channel(false);
    let head = Arc::new(Mutex::new(head));
    let queue = Queue { rx, head: head.clone(), failed: Failed(Arc::new(failed_tx)) };
    (Sequencer { tx, head, syncs, failed }, queue)
}

impl Sequencer {
    /// Commits an entry (with its write and changes) durably. Returns only
    /// once the engine has made it durable.
    pub async fn commit(&self, commit: Commit) -> Result<Committed, StorageError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Pending { commit, reply }).await.map_err(|_| StorageError::SequencerGone)?;
        rx.await.map_err(|_| StorageError::SequencerGone)?
    }

    /// The newest entry this process committed: its sequence and hash.
    pub fn head(&self) -> (u64, [u8; 32]) {
        *self.head.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The shared counter of durable syncs (outlives the sequencer).
    pub fn sync_counter(&self) -> Arc<AtomicU64> {
        self.syncs.clone()
    }

    /// Whether the store has failed (a write or a sync): from then on every
    /// commit is refused until a restart. Changes at most once, to true.
    pub fn failed(&self) -> watch::Receiver<bool> {
        self.failed.clone()
    }
}

/// Where a pipeline records that the store failed.
#[derive(Clone)]
pub struct Failed(Arc<watch::Sender<bool>>);

impl Failed {
    /// Records the failure, for good.
    pub fn set(&self) {
        self.0.send_replace(true);
    }

    /// Whether the store has failed.
    pub fn get(&self) -> bool {
        *self.0.borrow()
    }
}

/// Takes whatever else is queued into `batch`, up to [`MAX_BATCH`].
pub fn drain(rx: &mut mpsc::Receiver<Pending>, batch: &mut Vec<Pending>) {
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(p) => batch.push(p),
            Err(_) => break,
        }
    }
}

/// Fails every commit of `batch` (`why`).
pub fn refuse(batch: Vec<Pending>, why: &str) {
    for p in batch {
        let _ = p.reply.send(Err(StorageError::Io(why.into())));
    }
}
