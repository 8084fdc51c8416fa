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

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
    pub reply: Reply,
}

/// Where a commit's result goes. Until it is sent (or dropped) the commit
/// counts as in flight (see [`InFlight`]).
pub struct Reply {
    tx: oneshot::Sender<Result<Committed, StorageError>>,
    _expected: Expected,
}

impl Reply {
    /// Answers the commit; a caller that went away is not an error.
    pub fn send(self, result: Result<Committed, StorageError>) {
        let _ = self.tx.send(result);
    }

    /// A reply nobody waits for, counted by a counter of its own (for tests
    /// that queue commits by hand).
    #[cfg(test)]
    pub(crate) fn nobody() -> Reply {
        let (tx, _) = oneshot::channel();
        let in_flight = InFlight::default();
        in_flight.0.fetch_add(1, Ordering::Relaxed);
        Reply { tx, _expected: Expected(in_flight) }
    }
}

/// A commit on its way: taken when a call that will commit starts
/// ([`Sequencer::expect`]) and handed to the pipeline with the commit, it
/// counts in [`InFlight`] until the commit is answered, or it is dropped.
pub struct Expected(InFlight);

impl Drop for Expected {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How many commits are on their way and not answered yet: of calls that
/// started and will commit, or queued, being planned or written, or waiting
/// for their sync. A pipeline that groups commits into one sync can wait
/// for those without ever waiting for a commit nobody is making.
#[derive(Clone, Default)]
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    /// Commits on their way and not answered.
    pub fn count(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// Handle to an engine's commit pipeline. Cloning shares the pipeline; it
/// stops (after a final sync) when every handle is gone.
#[derive(Clone)]
pub struct Sequencer {
    tx: mpsc::Sender<Pending>,
    head: Arc<Mutex<(u64, [u8; 32])>>,
    syncs: Arc<AtomicU64>,
    failed: watch::Receiver<bool>,
    in_flight: InFlight,
}

/// What an engine's pipeline gets: the queue, and where to report its head and failure.
pub struct Queue {
    /// Commits to plan and make durable.
    pub rx: mpsc::Receiver<Pending>,
    /// The newest committed entry (this process's view).
    pub head: Arc<Mutex<(u64, [u8; 32])>>,
    /// Set, for good, when a write or a durable sync failed.
    pub failed: Failed,
    /// Commits submitted and not yet answered.
    pub in_flight: InFlight,
}

/// Creates a sequencer handle and the queue an engine's pipeline serves;
/// `head` is the chain's newest entry when the pipeline starts.
pub fn channel(head: (u64, [u8; 32]), syncs: Arc<AtomicU64>) -> (Sequencer, Queue) {
    let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
    let (failed_tx, failed) = watch::channel(false);
    let head = Arc::new(Mutex::new(head));
    let in_flight = InFlight::default();
    let queue = Queue { rx, head: head.clone(), failed: Failed(Arc::new(failed_tx)), in_flight: in_flight.clone() };
    (Sequencer { tx, head, syncs, failed, in_flight }, queue)
}

impl Sequencer {
    /// Commits an entry (with its write and changes) durably. Returns only
    /// once the engine has made it durable.
    pub async fn commit(&self, commit: Commit) -> Result<Committed, StorageError> {
        self.commit_expected(commit, self.expect()).await
    }

    /// Counts a commit as on its way from now on (a call that will commit
    /// has started), until it is answered or the result is dropped.
    pub fn expect(&self) -> Expected {
        self.in_flight.0.fetch_add(1, Ordering::Relaxed);
        Expected(self.in_flight.clone())
    }

    /// [`Sequencer::commit`], for a commit already counted by `expected`.
    pub async fn commit_expected(&self, commit: Commit, expected: Expected) -> Result<Committed, StorageError> {
        let (tx, rx) = oneshot::channel();
        let reply = Reply { tx, _expected: expected };
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
        p.reply.send(Err(StorageError::Io(why.into())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_commit_counts_as_in_flight_from_its_call_to_its_answer() {
        let (seq, mut queue) = channel((0, [0; 32]), Arc::new(AtomicU64::new(0)));
        let expected = seq.expect();
        assert_eq!(queue.in_flight.count(), 1, "a call that will commit counts from its start");
        let committing = tokio::spawn({
            let seq = seq.clone();
            async move { seq.commit_expected(Commit::entry(AuditEntry::default()), expected).await }
        });
        let pending = queue.rx.recv().await.unwrap();
        assert_eq!(queue.in_flight.count(), 1, "queued, it is the same commit, counted once");
        let dropped = seq.expect();
        assert_eq!(queue.in_flight.count(), 2);
        drop(dropped);
        assert_eq!(queue.in_flight.count(), 1, "a call that ends without committing stops counting");
        let answer = Committed { sequence: 1, hash: [0; 32], time_micros: 0, outcome: CommitOutcome::Written };
        pending.reply.send(Ok(answer));
        assert_eq!(queue.in_flight.count(), 0, "answered, it is no longer in flight");
        assert_eq!(committing.await.unwrap().unwrap().sequence, 1);
        let failing = tokio::spawn({
            let seq = seq.clone();
            async move { seq.commit(Commit::entry(AuditEntry::default())).await }
        });
        drop(queue.rx.recv().await.unwrap());
        assert!(failing.await.unwrap().is_err(), "a commit dropped unanswered fails");
        assert_eq!(queue.in_flight.count(), 0, "and is no longer in flight");
    }
}
