//! The audit sequencer: one thread that orders every audit append and every
//! record write, and a sync thread that shares one disk sync among all
//! requests waiting for it (group commit).
//!
//! Each [`Commit`] carries an audit entry (without sequence, previous hash or
//! time, which the sequencer assigns) and optionally a [`RecordWrite`]. The
//! sequencer takes everything queued (up to [`MAX_BATCH`]), decides every
//! commit of the batch ([`plan`]: version, key-generation and precondition
//! checks, the chained entries), and writes the batch to sled in a
//! crash-recoverable order ([`commit_ops`], [`recover`]), so a record never
//! exists without its audit entry, nor the reverse. It then hands the batch
//! to the sync thread, which flushes and fdatasyncs ([`Durability`]) and only
//! then answers each request. Because the sequencer is the only writer, the
//! optimistic version check in a write is exact.
//!
//! Failure is closed: if writing a batch or syncing fails, every request
//! waiting on it gets an error, no data is returned, and the sequencer
//! refuses every later commit until a restart has recovered (a failed
//! fdatasync may have dropped dirty pages, so nothing may be chained after
//! what might not be on disk; PostgreSQL made the same choice in 2018). The
//! store then reports itself failed ([`Sequencer::failed`]), which health
//! checking turns into NOT_SERVING. The entries of a failed batch may still
//! be on disk after the restart; their writes were reported as failed
//! although applied, the usual ambiguity of a failed commit.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use tokio::sync::{mpsc, oneshot};

use super::audit_blocks::{block_len, encode_block};
use super::durability::Durability;
use super::{AuditIndexKey, BLIND_KEY_LEN, Head, StorageError, Store, decode_head, encode_head, head_key, record_key};
use crate::audit::AuditEntry;
use crate::clock::Clock;
use crate::crypto::{RecordKind, WrappedDataKey};
use crate::domain::PatientId;

/// Longest the sync thread waits for more commits when far fewer are
/// waiting than recent syncs carried (see [`sync_loop`]).
const MAX_LINGER: std::time::Duration = std::time::Duration::from_micros(200);

/// How long the sync thread waits for each further batch while it lingers.
const LINGER_STEP: std::time::Duration = std::time::Duration::from_micros(50);

/// Most commits the sequencer plans and writes as one batch.
pub const MAX_BATCH: usize = 512;

/// A record change to commit together with its audit entry.
pub struct RecordWrite {
    /// Record kind.
    pub kind: RecordKind,
    /// Record id.
    pub id: [u8; 16],
    /// Owning patient.
    pub patient_id: [u8; 16],
    /// The version the caller read; 0 means the record must not exist yet.
    pub expected_version: u64,
    /// Sealed bytes of version `expected_version + 1`.
    pub sealed: Vec<u8>,
    /// A new patient's wrapped data key.
    pub new_dek: Option<Vec<u8>>,
    /// The generation of the data key `sealed` was sealed with. Without
    /// `new_dek`, the write applies only if the patient's stored data key is
    /// still of this generation (not re-encrypted or erased since it was read).
    pub key_generation: u32,
    /// The record's complete new set of blind index keys (replaces the old set).
    pub index_keys: Vec<[u8; BLIND_KEY_LEN]>,
}

/// Which tree a [`MetaWrite`] changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetaTree {
    /// Restriction flags, legal holds, break-glass grants, erasure tombstones, job state.
    Access,
    /// Wrapped data keys (rewrap jobs, re-encryption, erasure).
    Deks,
    /// Record heads (erasure removes them).
    Heads,
    /// Sealed record versions (re-encryption replaces them, erasure removes them).
    Records,
    /// Blind index entries (erasure removes them).
    Blind,
    /// A record's blind index keys (erasure removes them).
    BlindOwner,
    /// A patient's coverage ids (erasure removes them).
    CoverageByPatient,
}

/// A change to any tree but the audit trees (access changes, rewrapped or
/// erased data keys, re-sealed or erased records), applied only if every
/// precondition of its commit holds.
#[derive(Debug, Clone)]
pub struct MetaWrite {
    /// The tree.
    pub tree: MetaTree,
    /// Key in the tree.
    pub key: Vec<u8>,
    /// New value; `None` removes the key.
    pub value: Option<Vec<u8>>,
    /// If set, the key's current value must equal this (`None`: must be absent).
    pub expect: Option<Option<Vec<u8>>>,
}

/// One request to the sequencer.
pub struct Commit {
    /// The audit entry; sequence, previous hash and time are assigned here.
    pub entry: AuditEntry,
    /// The write, if any.
    pub write: Option<RecordWrite>,
    /// Changes to the `access` tree, all or none together with `write`.
    pub meta: Vec<MetaWrite>,
}

impl Commit {
    /// An audit entry alone.
    pub fn entry(entry: AuditEntry) -> Commit {
        Commit { entry, write: None, meta: Vec::new() }
    }
}

/// What happened to a commit's write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    /// Entry (and write, if any) committed.
    Written,
    /// The record's version was not the expected one, or an access-tree
    /// precondition failed; only the audit entry (with outcome "aborted") was
    /// committed.
    Conflict {
        /// Version actually stored (0 if none, or for a failed access precondition).
        current: u64,
    },
    /// The patient's data key changed (re-encrypted or erased) after the
    /// write sealed with it; only the audit entry ("aborted") was committed.
    KeyChanged,
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
    /// Whether the write happened.
    pub outcome: CommitOutcome,
}

struct Pending {
    commit: Commit,
    reply: oneshot::Sender<Result<Committed, StorageError>>,
}

/// Handle to the sequencer thread. Cloning shares the thread.
#[derive(Clone)]
pub struct Sequencer {
    tx: mpsc::Sender<Pending>,
    head: Arc<Mutex<(u64, [u8; 32])>>,
    syncs: Arc<AtomicU64>,
    /// Becomes true, for good, when a write or a sync failed.
    failed: tokio::sync::watch::Receiver<bool>,
}

/// Where the sequencer and sync threads record that the store failed.
#[derive(Clone)]
struct Failed(Arc<tokio::sync::watch::Sender<bool>>);

impl Failed {
    fn set(&self) {
        self.0.send_replace(true);
    }

    fn get(&self) -> bool {
        *self.0.borrow()
    }
}

impl Sequencer {
    /// Starts the sequencer over `store`, writing the genesis entry if the chain is empty.
    /// The thread ends (after a final sync) when every handle is dropped.
    pub fn start(
        store: Store,
        clock: Arc<dyn Clock>,
        mut durability: Durability,
    ) -> Result<(Sequencer, std::thread::JoinHandle<()>), StorageError> {
        let syncs = durability.sync_counter();
        // Make whatever `Store::open` recovered durable before anything new is appended.
        durability.sync(&store.db)?;
        let head = match store.audit_head()? {
            Some(h) => h,
            None => {
                let genesis = AuditEntry::genesis(clock.now_micros());
                let bytes = genesis.encode().map_err(|e| StorageError::Unencodable(e.to_string()))?;
                let hash = crate::crypto::sha256(&bytes);
                let mut value = bytes;
                value.extend_from_slice(&hash);
                store.audit.insert(0u64.to_be_bytes(), encode_block([(0, value.as_slice())])?)?;
                durability.sync(&store.db)?;
                (0, hash)
            }
        };
        let head = Arc::new(Mutex::new(head));
        let (tx, rx) = mpsc::channel::<Pending>(4 * MAX_BATCH);
        let (failed_tx, failed) = tokio::sync::watch::channel(false);
        let thread_failed = Failed(Arc::new(failed_tx));
        let thread_head = head.clone();
        let span = tracing::info_span!("audit_sequencer");
        let handle = std::thread::Builder::new()
            .name("carevault-sequencer".into())
            .spawn(move || {
                let _enter = span.enter();
                run(store, clock, durability, rx, thread_head, thread_failed)
            })
            .map_err(StorageError::from)?;
        Ok((Sequencer { tx, head, syncs, failed }, handle))
    }

    /// Commits an entry (and write) durably. Returns only after fdatasync.
    pub async fn commit(&self, commit: Commit) -> Result<Committed, StorageError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Pending { commit, reply }).await.map_err(|_| StorageError::SequencerGone)?;
        rx.await.map_err(|_| StorageError::SequencerGone)?
    }

    /// The newest committed entry's sequence and hash.
    pub fn head(&self) -> (u64, [u8; 32]) {
        *self.head.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The shared counter of disk syncs (outlives the sequencer).
    pub fn sync_counter(&self) -> Arc<AtomicU64> {
        self.syncs.clone()
    }

    /// Whether the store has failed (a write or a sync): from then on every
    /// commit is refused until a restart. Changes at most once, to true.
    pub fn failed(&self) -> tokio::sync::watch::Receiver<bool> {
        self.failed.clone()
    }
}

/// A batch applied to sled and waiting for its sync: the replies to send
/// once the sync succeeds.
type Applied = Vec<(oneshot::Sender<Result<Committed, StorageError>>, Committed)>;

/// The sequencer loop: take everything queued (up to [`MAX_BATCH`]), plan
/// it, write it to sled, and hand the replies to the sync
/// thread. Applying and syncing overlap: while one sync runs, the next
/// batches are applied, and the sync thread then makes all of them durable
/// with one more sync (group commit). Requests arriving together share a
/// sync without anyone waiting on a timer.
fn run(
    store: Store,
    clock: Arc<dyn Clock>,
    durability: Durability,
    mut rx: mpsc::Receiver<Pending>,
    head: Arc<Mutex<(u64, [u8; 32])>>,
    failed: Failed,
) {
    let (to_sync, synced_rx) = std::sync::mpsc::channel::<Applied>();
    let db = store.db.clone();
    let sync_failed = failed.clone();
    let syncer = std::thread::Builder::new()
        .name("carevault-sync".into())
        .spawn(move || sync_loop(db, durability, synced_rx, sync_failed));
    let syncer = match syncer {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the sync thread; failing every commit closed");
            while let Some(p) = rx.blocking_recv() {
                let _ = p.reply.send(Err(StorageError::Io("sync thread unavailable".into())));
            }
            return;
        }
    };
    let mut current = *head.lock().unwrap_or_else(|p| p.into_inner());
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        drain(&mut rx, &mut batch);
        if failed.get() {
            refuse_all(batch, rx);
            break;
        }
        let now = clock.now_micros();
        let started = std::time::Instant::now();
        // Planning only reads: if it fails, nothing was written and the
        // sequencer goes on with the next batch.
        let planned = match plan(&store, &batch, current, now) {
            Ok(planned) => planned,
            Err(e) => {
                tracing::error!(error = %e, "audit batch could not be planned; nothing of it was written");
                for p in batch {
                    let _ = p.reply.send(Err(StorageError::Io("commit failed".into())));
                }
                continue;
            }
        };
        let plan_us = started.elapsed().as_micros();
        let written = commit_ops(&store, &planned);
        tracing::debug!(batch = batch.len(), plan_us, apply_us = started.elapsed().as_micros(), "batch applied");
        if let Err(e) = written {
            // Part of the batch may be in sled's memory. Nothing more may be
            // appended after it: every later commit fails closed until a
            // restart, whose recovery finishes or drops the batch.
            tracing::error!(error = %e, "audit commit failed; refusing every commit until restart");
            failed.set();
            refuse_all(batch, rx);
            break;
        }
        // The batch is in sled (in memory) whatever the sync does next, so the
        // chain continues from it.
        current = planned.head;
        *head.lock().unwrap_or_else(|p| p.into_inner()) = planned.head;
        let mut replies = Vec::with_capacity(batch.len());
        for (p, result) in batch.into_iter().zip(planned.results) {
            match result {
                Ok(committed) => replies.push((p.reply, committed)),
                Err(e) => {
                    tracing::error!(error = %e, "an audit entry could not be encoded; its call failed, nothing of it was written");
                    let _ = p.reply.send(Err(e));
                }
            }
        }
        if let Err(std::sync::mpsc::SendError(replies)) = to_sync.send(replies) {
            for (reply, _) in replies {
                let _ = reply.send(Err(StorageError::Io("sync thread unavailable".into())));
            }
        }
    }
    drop(to_sync);
    let _ = syncer.join();
}

/// The sync thread: wait for an applied batch, take every other one applied
/// meanwhile, make them all durable with one sync, then answer them.
///
/// If far fewer commits are waiting than recent syncs carried (requests
/// answered together tend to come back together, a little spread out), it
/// waits up to [`MAX_LINGER`] for the rest, so they share this sync instead of
/// each group paying for its own. A lone client (recent groups near 1) never waits.
fn sync_loop(db: sled::Db, mut durability: Durability, rx: std::sync::mpsc::Receiver<Applied>, failed: Failed) {
    let mut average = 1.0f64;
    while let Ok(first) = rx.recv() {
        let mut waiting = first;
        while let Ok(more) = rx.try_recv() {
            waiting.extend(more);
        }
        if failed.get() {
            // Applied after a failed write or sync: never made durable here.
            for (reply, _) in waiting {
                let _ = reply.send(Err(StorageError::Io("storage failed earlier; restart required".into())));
            }
            continue;
        }
        if average >= 4.0 && (waiting.len() as f64) < average / 2.0 {
            let deadline = std::time::Instant::now() + MAX_LINGER;
            while std::time::Instant::now() < deadline && (waiting.len() as f64) < average {
                match rx.recv_timeout(LINGER_STEP) {
                    Ok(more) => waiting.extend(more),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
        }
        average = 0.8 * average + 0.2 * waiting.len() as f64;
        let started = std::time::Instant::now();
        let synced = durability.sync(&db);
        tracing::debug!(commits = waiting.len(), sync_us = started.elapsed().as_micros(), "batch synced");
        match synced {
            Ok(()) => {
                for (reply, committed) in waiting {
                    let _ = reply.send(Ok(committed));
                }
            }
            Err(e) => {
                // After a failed fdatasync the kernel may have dropped the
                // dirty pages: nothing may be chained to this batch.
                tracing::error!(error = %e, "audit sync failed; refusing every commit until restart");
                failed.set();
                for (reply, _) in waiting {
                    let _ = reply.send(Err(StorageError::Io("sync failed".into())));
                }
            }
        }
    }
    if !failed.get()
        && let Err(e) = durability.sync(&db)
    {
        tracing::error!(error = %e, "final sync at shutdown failed");
    }
}

/// Fails `batch` and every commit after it (the store failed).
fn refuse_all(batch: Vec<Pending>, mut rx: mpsc::Receiver<Pending>) {
    for p in batch {
        let _ = p.reply.send(Err(StorageError::Io("commit failed".into())));
    }
    while let Some(p) = rx.blocking_recv() {
        let _ = p.reply.send(Err(StorageError::Io("storage failed earlier; restart required".into())));
    }
}

fn drain(rx: &mut mpsc::Receiver<Pending>, batch: &mut Vec<Pending>) {
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(p) => batch.push(p),
            Err(_) => break,
        }
    }
}

/// Sequence and hash of the newest entry.
type ChainHead = (u64, [u8; 32]);

/// Any tree the sequencer writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum TreeId {
    Data(MetaTree),
    Audit,
    AuditByPatient,
}

/// One change to one tree; `None` removes the key.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Op {
    tree: TreeId,
    key: Vec<u8>,
    value: Option<Vec<u8>>,
}

/// One commit as planned: its chained entry and the data changes it makes.
struct PlannedCommit {
    sequence: u64,
    /// The `audit` value: canonical entry bytes followed by their SHA-256.
    audit_value: Vec<u8>,
    /// The entry's `audit_by_patient_epoch` keys.
    index_keys: Vec<AuditIndexKey>,
    /// Changes to the data trees (none for an aborted commit or a read).
    ops: Vec<Op>,
}

/// What a batch does: each commit's entry and changes, each commit's result
/// (in batch order; a commit whose entry cannot be encoded fails alone), the
/// new chain head, and everything encoded that applying writes.
struct Planned {
    /// The commits that go ahead, in sequence order.
    commits: Vec<PlannedCommit>,
    results: Vec<Result<Committed, StorageError>>,
    head: ChainHead,
    /// The redo record, if any commit changes data.
    redo: Option<Vec<u8>>,
    blocks: Vec<Block>,
}

/// One `audit` value: its key, its bytes, and which planned commits it holds.
struct Block {
    key: [u8; 8],
    value: Vec<u8>,
    commits: std::ops::Range<usize>,
}

/// The store as the batch being planned sees it: the stored trees under the
/// batch's own earlier changes.
struct Overlay<'a> {
    store: &'a Store,
    changed: std::collections::HashMap<(TreeId, Vec<u8>), Option<Vec<u8>>>,
    ops: Vec<Op>,
}

impl Overlay<'_> {
    fn get(&self, tree: TreeId, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        if let Some(v) = self.changed.get(&(tree, key.to_vec())) {
            return Ok(v.clone());
        }
        Ok(tree_of(self.store, tree).get(key)?.map(|v| v.to_vec()))
    }

    fn set(&mut self, tree: TreeId, key: &[u8], value: Option<Vec<u8>>) {
        self.changed.insert((tree, key.to_vec()), value.clone());
        self.ops.push(Op { tree, key: key.to_vec(), value });
    }
}

fn tree_of(store: &Store, tree: TreeId) -> &sled::Tree {
    match tree {
        TreeId::Data(MetaTree::Access) => &store.access,
        TreeId::Data(MetaTree::Deks) => &store.deks,
        TreeId::Data(MetaTree::Heads) => &store.heads,
        TreeId::Data(MetaTree::Records) => &store.records,
        TreeId::Data(MetaTree::Blind) => &store.blind,
        TreeId::Data(MetaTree::BlindOwner) => &store.blind_owner,
        TreeId::Data(MetaTree::CoverageByPatient) => &store.coverage_by_patient,
        TreeId::Audit => &store.audit,
        TreeId::AuditByPatient => &store.audit_by_patient,
    }
}

/// Decides every commit of the batch (version and key-generation checks,
/// preconditions), builds and chains its audit entry, and lists the changes.
/// Runs outside any sled transaction: the sequencer is the only writer, so
/// what it reads cannot change before [`commit_ops`] applies the plan.
fn plan(store: &Store, batch: &[Pending], start: ChainHead, now: i64) -> Result<Planned, StorageError> {
    let mut ov = Overlay { store, changed: std::collections::HashMap::new(), ops: Vec::new() };
    let mut results = Vec::with_capacity(batch.len());
    let (mut seq, mut prev) = start;
    let mut commits = Vec::with_capacity(batch.len());
    for p in batch {
        let c = &p.commit;
        let first_op = ov.ops.len();
        let mut outcome = CommitOutcome::Written;
        for m in &c.meta {
            if let Some(expect) = &m.expect
                && ov.get(TreeId::Data(m.tree), &m.key)? != *expect
            {
                outcome = CommitOutcome::Conflict { current: 0 };
            }
        }
        if let (Some(w), CommitOutcome::Written) = (&c.write, outcome) {
            let hk = head_key(w.kind, &w.id);
            let current = match ov.get(TreeId::Data(MetaTree::Heads), &hk)? {
                Some(v) => decode_head(&v)?.version,
                None => 0,
            };
            let key_current = w.new_dek.is_some() || {
                let stored = ov.get(TreeId::Data(MetaTree::Deks), &w.patient_id)?;
                stored.and_then(|v| WrappedDataKey(v).generation().ok()) == Some(w.key_generation)
            };
            if current != w.expected_version {
                outcome = CommitOutcome::Conflict { current };
            } else if !key_current {
                outcome = CommitOutcome::KeyChanged;
            }
        }
        let mut entry = c.entry.clone();
        entry.sequence = seq + 1;
        entry.previous_hash = prev;
        entry.time_micros = now;
        if outcome != CommitOutcome::Written {
            entry.outcome = crate::domain::Outcome::Aborted.as_str().to_string();
        }
        // An entry that does not fit the format fails its commit alone,
        // before anything of it is planned, let alone written.
        let bytes = match entry.encode() {
            Ok(b) => b,
            Err(e) => {
                results.push(Err(StorageError::Unencodable(e.to_string())));
                continue;
            }
        };
        if outcome == CommitOutcome::Written {
            if let Some(w) = &c.write {
                plan_record(w, &mut ov)?;
            }
            for m in &c.meta {
                ov.set(TreeId::Data(m.tree), &m.key, m.value.clone());
            }
        }
        seq += 1;
        let hash = crate::crypto::sha256(&bytes);
        let mut audit_value = bytes;
        audit_value.extend_from_slice(&hash);
        let ops = ov.ops.split_off(first_op);
        commits.push(PlannedCommit { sequence: seq, audit_value, index_keys: audit_index_keys(&entry, seq), ops });
        prev = hash;
        results.push(Ok(Committed { sequence: seq, hash, time_micros: now, outcome }));
    }
    let redo = if commits.iter().any(|c| !c.ops.is_empty()) { Some(encode_redo(&commits)?) } else { None };
    let blocks = plan_blocks(&commits)?;
    Ok(Planned { commits, results, head: (seq, prev), redo, blocks })
}

/// The batch's entries as blocks of consecutive entries (see `audit_blocks`).
fn plan_blocks(commits: &[PlannedCommit]) -> Result<Vec<Block>, StorageError> {
    let mut blocks = Vec::new();
    let mut at = 0;
    while let Some(first) = commits.get(at) {
        let n = block_len(commits[at..].iter().map(|c| c.audit_value.len()));
        let entries = commits[at..at + n].iter().map(|c| (c.sequence, c.audit_value.as_slice()));
        blocks.push(Block { key: first.sequence.to_be_bytes(), value: encode_block(entries)?, commits: at..at + n });
        at += n;
    }
    Ok(blocks)
}

/// The index keys of an entry ([`super::audit_index_key`]: epoch · patient · sequence), for
/// the patient it names and every patient it returned.
fn audit_index_keys(entry: &AuditEntry, seq: u64) -> Vec<AuditIndexKey> {
    std::iter::once(&entry.patient_id)
        .chain(entry.returned_patient_ids.iter())
        .filter_map(|pid| PatientId::parse(pid))
        .map(|id| super::audit_index_key(&id.bytes(), seq))
        .collect()
}

/// The changes of one record write: sealed version, data key, head, coverage
/// link, and the record's blind index keys (the old set replaced).
///
/// Readers do not wait for a batch, so the order is the order in which they
/// may see the changes: the new version and the data key exist before the head
/// names them, and the head before any index entry or link leads to it.
fn plan_record(w: &RecordWrite, ov: &mut Overlay<'_>) -> Result<(), StorageError> {
    let data = TreeId::Data;
    let new_version = w.expected_version + 1;
    let owner = head_key(w.kind, &w.id);
    ov.set(data(MetaTree::Records), &record_key(w.kind, &w.id, new_version), Some(w.sealed.clone()));
    if let Some(dek) = &w.new_dek {
        ov.set(data(MetaTree::Deks), &w.patient_id, Some(dek.clone()));
    }
    ov.set(
        data(MetaTree::Heads),
        &owner,
        Some(encode_head(Head { version: new_version, patient_id: w.patient_id }).to_vec()),
    );
    if w.kind == RecordKind::Coverage && w.expected_version == 0 {
        let mut k = w.patient_id.to_vec();
        k.extend_from_slice(&w.id);
        ov.set(data(MetaTree::CoverageByPatient), &k, Some(Vec::new()));
    }
    if let Some(old) = ov.get(data(MetaTree::BlindOwner), &owner)? {
        for k in old.chunks(BLIND_KEY_LEN) {
            ov.set(data(MetaTree::Blind), k, None);
        }
    }
    let mut all = Vec::with_capacity(w.index_keys.len() * BLIND_KEY_LEN);
    for k in &w.index_keys {
        ov.set(data(MetaTree::Blind), &k[..], Some(Vec::new()));
        all.extend_from_slice(k);
    }
    ov.set(data(MetaTree::BlindOwner), &owner, Some(all));
    Ok(())
}

/// Key of the redo record in the `pending` tree.
const PENDING_KEY: &[u8] = b"batch";

/// Applies a planned batch with plain sled writes, in an order that a crash
/// at any point leaves recoverable (see the module docs of `storage` for the
/// argument): the redo record if the batch changes data, then per block of
/// entries the block, and per commit of the block its `audit_by_patient`
/// keys and its data changes, then the removal of the redo record.
///
/// sled transactions would make the batch atomic too, but the first one
/// switches sled (process-wide) to a global reader-writer lock that every
/// read then takes and every transaction holds exclusively: reads on all
/// tokio workers stall while a batch commits. This order needs no lock.
fn commit_ops(store: &Store, planned: &Planned) -> Result<(), StorageError> {
    if let Some(redo) = &planned.redo {
        store.pending.insert(PENDING_KEY, redo.as_slice())?;
    }
    for block in &planned.blocks {
        store.audit.insert(block.key, block.value.as_slice())?;
        for c in &planned.commits[block.commits.clone()] {
            for k in &c.index_keys {
                store.audit_by_patient.insert(k, &[])?;
            }
            apply_ops(store, &c.ops)?;
        }
    }
    if planned.redo.is_some() {
        store.pending.remove(PENDING_KEY)?;
    }
    Ok(())
}

fn apply_ops(store: &Store, ops: &[Op]) -> Result<(), StorageError> {
    for op in ops {
        let tree = tree_of(store, op.tree);
        match &op.value {
            Some(v) => tree.insert(op.key.as_slice(), v.as_slice())?,
            None => tree.remove(op.key.as_slice())?,
        };
    }
    Ok(())
}

/// Every tree the sequencer writes; a tree's redo-record tag is its position plus one.
const TREE_TAGS: [TreeId; 9] = [
    TreeId::Data(MetaTree::Access),
    TreeId::Data(MetaTree::Deks),
    TreeId::Data(MetaTree::Heads),
    TreeId::Data(MetaTree::Records),
    TreeId::Data(MetaTree::Blind),
    TreeId::Data(MetaTree::BlindOwner),
    TreeId::Data(MetaTree::CoverageByPatient),
    TreeId::Audit,
    TreeId::AuditByPatient,
];

fn tree_tag(tree: TreeId) -> u8 {
    let at = TREE_TAGS.iter().position(|t| *t == tree).unwrap_or(0);
    u8::try_from(at + 1).unwrap_or(0)
}

fn tree_from_tag(tag: u8) -> Option<TreeId> {
    TREE_TAGS.get(usize::from(tag).checked_sub(1)?).copied()
}

/// The redo record: for each commit that changes data, sequence (u64) ·
/// op count (u32) · ops, each op tree tag (u8) · key length (u32) · key ·
/// present (u8: 1 put, 0 remove) · [value length (u32) · value]. Integers big-endian.
fn encode_redo(commits: &[PlannedCommit]) -> Result<Vec<u8>, StorageError> {
    let size: usize = commits
        .iter()
        .flat_map(|c| c.ops.iter())
        .map(|op| 10 + op.key.len() + op.value.as_ref().map_or(0, Vec::len))
        .sum::<usize>()
        + 12 * commits.len();
    let mut out = Vec::with_capacity(size);
    for c in commits.iter().filter(|c| !c.ops.is_empty()) {
        out.extend_from_slice(&c.sequence.to_be_bytes());
        out.extend_from_slice(&length_u32(c.ops.len())?);
        for op in &c.ops {
            out.push(tree_tag(op.tree));
            out.extend_from_slice(&length_u32(op.key.len())?);
            out.extend_from_slice(&op.key);
            match &op.value {
                Some(v) => {
                    out.push(1);
                    out.extend_from_slice(&length_u32(v.len())?);
                    out.extend_from_slice(v);
                }
                None => out.push(0),
            }
        }
    }
    Ok(out)
}

/// A length or count as the u32 the redo record stores; longer is an error
/// (the batch is not written), never a saturated length.
fn length_u32(n: usize) -> Result<[u8; 4], StorageError> {
    u32::try_from(n).map(u32::to_be_bytes).map_err(|_| StorageError::Unencodable("redo record length".into()))
}

fn decode_redo(mut b: &[u8]) -> Result<Vec<(u64, Vec<Op>)>, StorageError> {
    const BAD: StorageError = StorageError::Corrupt("bad redo record");
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], StorageError> {
        if b.len() < n {
            return Err(BAD);
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Ok(head)
    }
    fn u32_of(b: &mut &[u8]) -> Result<usize, StorageError> {
        let s: [u8; 4] = take(b, 4)?.try_into().map_err(|_| BAD)?;
        usize::try_from(u32::from_be_bytes(s)).map_err(|_| BAD)
    }
    let mut commits = Vec::new();
    while !b.is_empty() {
        let seq: [u8; 8] = take(&mut b, 8)?.try_into().map_err(|_| BAD)?;
        let n = u32_of(&mut b)?;
        let mut ops = Vec::with_capacity(n.min(1 << 16));
        for _ in 0..n {
            let tree = tree_from_tag(take(&mut b, 1)?[0]).ok_or(BAD)?;
            let klen = u32_of(&mut b)?;
            let key = take(&mut b, klen)?.to_vec();
            let value = match take(&mut b, 1)?[0] {
                1 => {
                    let vlen = u32_of(&mut b)?;
                    Some(take(&mut b, vlen)?.to_vec())
                }
                0 => None,
                _ => return Err(BAD),
            };
            ops.push(Op { tree, key, value });
        }
        commits.push((u64::from_be_bytes(seq), ops));
    }
    Ok(commits)
}

/// What start-up recovery did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    /// Commits of an interrupted batch whose data changes were replayed.
    pub replayed: usize,
    /// Commits of an interrupted batch dropped because their audit entry never became durable.
    pub dropped: usize,
}

/// Finishes a batch a crash interrupted ([`Store::open`] runs this).
///
/// sled recovers a prefix of its log, and [`commit_ops`] writes a block of
/// entries before their index keys and data. So after a crash: every
/// durable entry but possibly those of the newest block has its index keys; a redo record
/// present means its batch may be partly applied; a commit in it whose entry
/// is durable is replayed (its changes are exact values, so replaying is
/// idempotent, and nothing later can have been applied over them, since the
/// next batch starts only after the record's removal), and one whose entry
/// is not durable is dropped: none of its changes can be durable either, and
/// it was never acknowledged.
pub fn recover(store: &Store) -> Result<Recovery, StorageError> {
    let head = store.audit_head()?.map_or(0, |(seq, _)| seq);
    let mut report = Recovery::default();
    let mut reindex: Vec<u64> = store.audit_newest_block()?;
    let redo = store.pending.get(PENDING_KEY)?;
    if let Some(redo) = &redo {
        for (seq, ops) in decode_redo(redo)? {
            if seq <= head {
                apply_ops(store, &ops)?;
                reindex.push(seq);
                report.replayed += 1;
            } else {
                report.dropped += 1;
            }
        }
    }
    // Only what is missing is written: opening an intact store (offline
    // `verify`, `backup`) changes nothing.
    for seq in reindex {
        if let Some(stored) = store.audit_entry(seq)? {
            let entry =
                AuditEntry::decode(&stored.bytes).map_err(|_| StorageError::Corrupt("undecodable audit entry"))?;
            for k in audit_index_keys(&entry, seq) {
                if !store.audit_by_patient.contains_key(k)? {
                    store.audit_by_patient.insert(k, &[])?;
                }
            }
        }
    }
    if redo.is_some() {
        store.pending.remove(PENDING_KEY)?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::FixedClock;

    fn start(dir: &std::path::Path) -> (Store, Sequencer, std::thread::JoinHandle<()>, Arc<AtomicU64>) {
        let store = Store::open(&dir.join("db"), 8 << 20).unwrap();
        let durability = Durability::open(&dir.join("db"), None).unwrap();
        let syncs = durability.sync_counter();
        let (seq, handle) = Sequencer::start(store.clone(), Arc::new(FixedClock::new(1_000)), durability).unwrap();
        (store, seq, handle, syncs)
    }

    fn entry(action: &str) -> AuditEntry {
        AuditEntry { action: action.into(), outcome: "ok".into(), ..AuditEntry::default() }
    }

    fn write(id: u8, expected: u64) -> RecordWrite {
        RecordWrite {
            kind: RecordKind::Patient,
            id: [id; 16],
            patient_id: [id; 16],
            expected_version: expected,
            sealed: vec![id, u8::try_from(expected).unwrap()],
            // A format-2 wrapped-key header naming generation 1 (the sequencer reads only that).
            new_dek: (expected == 0).then(|| vec![2, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1]),
            key_generation: 1,
            index_keys: vec![[id; BLIND_KEY_LEN]],
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_commits_share_one_sync_per_batch() {
        let dir = tempfile::tempdir().unwrap();
        let (store, seq, handle, syncs) = start(dir.path());
        let before = syncs.load(std::sync::atomic::Ordering::SeqCst);
        let tasks: Vec<_> = (0..400)
            .map(|_| {
                let s = seq.clone();
                tokio::spawn(async move { s.commit(Commit::entry(entry("patient.read"))).await.unwrap() })
            })
            .collect();
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.push(t.await.unwrap().sequence);
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=400).collect::<Vec<_>>(), "gapless, each sequence once");
        let used = syncs.load(std::sync::atomic::Ordering::SeqCst) - before;
        assert!(used <= 40, "{used} syncs for 400 commits: group commit is not batching");
        drop(seq);
        handle.join().unwrap();
        let stored: Vec<u64> = store.audit_all().map(|e| e.unwrap().sequence).collect();
        assert_eq!(stored, (0..=400).collect::<Vec<_>>(), "every entry reads back in order");
        assert!(store.audit.len() < 200, "{} audit values for 401 entries: entries are not blocked", store.audit.len());
        for seq in [0, 1, 199, 400] {
            assert_eq!(store.audit_entry(seq).unwrap().unwrap().sequence, seq);
        }
        assert!(store.audit_entry(401).unwrap().is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn meta_writes_land_in_their_own_tree_only_when_every_precondition_holds() {
        let dir = tempfile::tempdir().unwrap();
        let (store, seq, handle, _) = start(dir.path());
        let put = |tree, key: &[u8], value: &[u8], expect: Option<Option<Vec<u8>>>| MetaWrite {
            tree,
            key: key.to_vec(),
            value: Some(value.to_vec()),
            expect,
        };
        let both = vec![put(MetaTree::Deks, &[9; 16], b"w1", Some(None)), put(MetaTree::Access, b"Gx", b"g1", None)];
        let c = seq.commit(Commit { entry: entry("keys.rewrap_batch"), write: None, meta: both }).await.unwrap();
        assert_eq!(c.outcome, CommitOutcome::Written);
        assert_eq!(store.wrapped_dek(&[9; 16]).unwrap(), Some(b"w1".to_vec()));
        assert_eq!(store.access_get(b"Gx").unwrap(), Some(b"g1".to_vec()));
        assert_eq!(store.access_get(&[9; 16]).unwrap(), None, "a deks write never lands in access");
        // One stale precondition: nothing of the commit is applied, the entry says aborted.
        let stale = vec![
            put(MetaTree::Deks, &[9; 16], b"w2", Some(Some(b"w0".to_vec()))),
            put(MetaTree::Access, b"Gx", b"g2", Some(Some(b"g1".to_vec()))),
        ];
        let c = seq.commit(Commit { entry: entry("keys.rewrap_batch"), write: None, meta: stale }).await.unwrap();
        assert_eq!(c.outcome, CommitOutcome::Conflict { current: 0 });
        assert_eq!(store.wrapped_dek(&[9; 16]).unwrap(), Some(b"w1".to_vec()));
        assert_eq!(store.access_get(b"Gx").unwrap(), Some(b"g1".to_vec()));
        let aborted = AuditEntry::decode(&store.audit_entry(c.sequence).unwrap().unwrap().bytes).unwrap();
        assert_eq!(aborted.outcome, "aborted");
        drop(seq);
        handle.join().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stale_write_commits_only_an_aborted_entry_and_a_good_one_commits_both() {
        let dir = tempfile::tempdir().unwrap();
        let (store, seq, handle, _) = start(dir.path());
        let created = seq
            .commit(Commit { entry: entry("patient.create"), write: Some(write(1, 0)), meta: vec![] })
            .await
            .unwrap();
        assert_eq!(created.outcome, CommitOutcome::Written);
        let stale = seq
            .commit(Commit { entry: entry("patient.update"), write: Some(write(1, 0)), meta: vec![] })
            .await
            .unwrap();
        assert_eq!(stale.outcome, CommitOutcome::Conflict { current: 1 });
        assert_eq!(store.head(RecordKind::Patient, &[1; 16]).unwrap().unwrap().version, 1);
        let aborted = AuditEntry::decode(&store.audit_entry(stale.sequence).unwrap().unwrap().bytes).unwrap();
        assert_eq!(aborted.outcome, "aborted");
        let updated = seq
            .commit(Commit { entry: entry("patient.update"), write: Some(write(1, 1)), meta: vec![] })
            .await
            .unwrap();
        assert_eq!(updated.outcome, CommitOutcome::Written);
        assert_eq!(store.record(RecordKind::Patient, &[1; 16], 2).unwrap(), Some(vec![1, 1]));
        drop(seq);
        handle.join().unwrap();
    }

    fn queued(commit: Commit) -> Pending {
        let (reply, _) = oneshot::channel();
        Pending { commit, reply }
    }

    /// A queued create of patient `[id; 16]`, audited under that patient.
    fn created(id: u8) -> Pending {
        let mut e = entry("patient.create");
        e.patient_id = uuid::Uuid::from_bytes([id; 16]).to_string();
        queued(Commit { entry: e, write: Some(write(id, 0)), meta: vec![] })
    }

    #[test]
    fn an_interrupted_batch_is_replayed_if_its_entry_is_durable_and_dropped_if_not() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db"), 8 << 20).unwrap();
        let batch = vec![created(1), created(2)];
        let planned = plan(&store, &batch, (0, [0; 32]), 5).unwrap();
        // The entries went into two blocks (as larger entries would), and the
        // crash came after the redo record and the first block, before any
        // index key or data.
        store.pending.insert(PENDING_KEY, encode_redo(&planned.commits).unwrap()).unwrap();
        store
            .audit
            .insert(1u64.to_be_bytes(), encode_block([(1, planned.commits[0].audit_value.as_slice())]).unwrap())
            .unwrap();

        assert_eq!(recover(&store).unwrap(), Recovery { replayed: 1, dropped: 1 });
        assert_eq!(store.head(RecordKind::Patient, &[1; 16]).unwrap().unwrap().version, 1);
        assert_eq!(store.record(RecordKind::Patient, &[1; 16], 1).unwrap(), Some(vec![1, 0]));
        assert_eq!(store.blind.get([1u8; BLIND_KEY_LEN]).unwrap().map(|v| v.len()), Some(0));
        assert_eq!(store.audit_seqs_for_patient(&[1; 16], 0).collect::<Result<Vec<_>, _>>().unwrap(), vec![1]);
        assert_eq!(store.head(RecordKind::Patient, &[2; 16]).unwrap(), None, "its entry never became durable");
        assert_eq!(store.wrapped_dek(&[2; 16]).unwrap(), None);
        assert!(store.pending.is_empty());
        assert_eq!(recover(&store).unwrap(), Recovery::default(), "recovery is done once");
    }

    #[test]
    fn every_entry_of_a_durable_block_is_replayed_and_indexed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db"), 8 << 20).unwrap();
        let batch = vec![created(1), created(2), created(3)];
        let planned = plan(&store, &batch, (0, [0; 32]), 5).unwrap();
        // The crash came after the block, before any index key or data.
        store.pending.insert(PENDING_KEY, encode_redo(&planned.commits).unwrap()).unwrap();
        let entries = planned.commits.iter().map(|c| (c.sequence, c.audit_value.as_slice()));
        store.audit.insert(1u64.to_be_bytes(), encode_block(entries).unwrap()).unwrap();

        assert_eq!(recover(&store).unwrap(), Recovery { replayed: 3, dropped: 0 });
        for id in 1..=3u8 {
            assert_eq!(store.head(RecordKind::Patient, &[id; 16]).unwrap().unwrap().version, 1);
            let seqs = store.audit_seqs_for_patient(&[id; 16], 0).collect::<Result<Vec<_>, _>>().unwrap();
            assert_eq!(seqs, vec![u64::from(id)]);
        }
        assert_eq!(store.audit_entry(2).unwrap().unwrap().hash, planned.results[1].as_ref().unwrap().hash);
        assert_eq!(store.audit_head().unwrap(), Some((3, planned.head.1)));
    }

    fn seqs_of(store: &Store, patient: u8, from: u64) -> Vec<u64> {
        store.audit_seqs_for_patient(&[patient; 16], from).collect::<Result<Vec<_>, _>>().unwrap()
    }

    #[test]
    fn a_patients_entries_are_found_across_epochs_in_order_and_from_any_point() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db"), 8 << 20).unwrap();
        assert_eq!(seqs_of(&store, 1, 0), Vec::<u64>::new(), "an empty index");
        let epoch = 1u64 << super::super::AUDIT_EPOCH_BITS;
        let mine = [1, 2, epoch - 1, epoch, 3 * epoch + 5, 7 * epoch];
        for seq in mine {
            store.audit_by_patient.insert(super::super::audit_index_key(&[1; 16], seq), &[]).unwrap();
        }
        for seq in [3, epoch + 1, 9 * epoch] {
            store.audit_by_patient.insert(super::super::audit_index_key(&[2; 16], seq), &[]).unwrap();
        }
        assert_eq!(seqs_of(&store, 1, 0), mine);
        assert_eq!(seqs_of(&store, 1, 3), &mine[2..]);
        assert_eq!(seqs_of(&store, 1, epoch), &mine[3..]);
        assert_eq!(seqs_of(&store, 1, 3 * epoch + 6), &mine[5..]);
        assert_eq!(seqs_of(&store, 1, 9 * epoch), Vec::<u64>::new());
        assert_eq!(seqs_of(&store, 2, 0), vec![3, epoch + 1, 9 * epoch]);
        assert_eq!(seqs_of(&store, 3, 0), Vec::<u64>::new());
    }

    #[test]
    fn an_index_written_before_epochs_is_moved_once_when_the_store_opens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let epoch = 1u64 << super::super::AUDIT_EPOCH_BITS;
        {
            let db = sled::open(&path).unwrap();
            let old = db.open_tree("audit_by_patient").unwrap();
            for (patient, seq) in [(1u8, 1u64), (2, 2), (1, epoch + 3)] {
                let mut k = [patient; 16].to_vec();
                k.extend_from_slice(&seq.to_be_bytes());
                old.insert(k, &[]).unwrap();
            }
            db.flush().unwrap();
        }
        let store = Store::open(&path, 8 << 20).unwrap();
        assert_eq!(seqs_of(&store, 1, 0), vec![1, epoch + 3]);
        assert_eq!(seqs_of(&store, 2, 0), vec![2]);
        assert!(!store.db.tree_names().iter().any(|n| n.as_ref() == b"audit_by_patient"), "the old tree is dropped");
        drop(store);
        let store = Store::open(&path, 8 << 20).unwrap();
        assert_eq!(seqs_of(&store, 1, 0), vec![1, epoch + 3], "opening again changes nothing");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_entry_too_long_to_encode_fails_its_commit_alone_and_writes_nothing_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let (store, seq, handle, _) = start(dir.path());
        let mut huge = entry("patient.create");
        huge.details = vec!["x".repeat(crate::audit::MAX_ENTRY_BYTES)];
        let (a, b, c) = tokio::join!(
            seq.commit(Commit { entry: entry("patient.create"), write: Some(write(1, 0)), meta: vec![] }),
            seq.commit(Commit { entry: huge, write: Some(write(2, 0)), meta: vec![] }),
            seq.commit(Commit { entry: entry("patient.create"), write: Some(write(3, 0)), meta: vec![] }),
        );
        assert!(matches!(b, Err(StorageError::Unencodable(_))), "{b:?}");
        let mut written = [a.unwrap().sequence, c.unwrap().sequence];
        written.sort_unstable();
        assert_eq!(written, [1, 2], "the chain has no gap where the failed commit was");
        assert_eq!(store.head(RecordKind::Patient, &[2; 16]).unwrap(), None, "nothing of it was written");
        assert!(store.head(RecordKind::Patient, &[1; 16]).unwrap().is_some());
        drop(seq);
        handle.join().unwrap();
        let raw: Vec<_> =
            store.audit_all().map(|e| e.map(crate::storage::StoredAuditEntry::raw)).collect::<Result<_, _>>().unwrap();
        assert!(crate::audit::verify_chain(raw, None).is_ok());
    }

    #[test]
    fn lengths_that_do_not_fit_a_u32_are_errors_not_saturated() {
        let too_long = usize::try_from(u64::from(u32::MAX) + 1).unwrap();
        assert!(matches!(length_u32(too_long), Err(StorageError::Unencodable(_))));
        assert_eq!(length_u32(7).unwrap(), [0, 0, 0, 7]);
    }

    #[test]
    fn the_redo_record_round_trips_and_rejects_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db"), 8 << 20).unwrap();
        let meta = MetaWrite { tree: MetaTree::Access, key: b"Gx".to_vec(), value: None, expect: None };
        let batch = vec![
            queued(Commit { entry: entry("patient.read"), write: None, meta: vec![] }),
            queued(Commit { entry: entry("patient.create"), write: Some(write(3, 0)), meta: vec![meta] }),
        ];
        let planned = plan(&store, &batch, (7, [0; 32]), 5).unwrap();
        let bytes = encode_redo(&planned.commits).unwrap();
        let decoded = decode_redo(&bytes).unwrap();
        assert_eq!(decoded.len(), 1, "a commit without changes is not in the record");
        assert_eq!(decoded[0].0, 9);
        assert_eq!(decoded[0].1, planned.commits[1].ops);
        assert!(decoded[0].1.iter().any(|op| op.tree == TreeId::Data(MetaTree::Access) && op.value.is_none()));
        assert!(decode_redo(&bytes[..bytes.len() - 1]).is_err());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(12))]

        /// Model-based: any interleaving of writes with right and wrong
        /// versions leaves every record at the model's version, every attempt
        /// audited exactly once, and a chain that verifies.
        #[test]
        fn writes_match_a_version_model_and_every_attempt_is_audited(
            ops in proptest::collection::vec((0u8..4, 0u64..4), 1..40)
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let dir = tempfile::tempdir().unwrap();
            let (store, seq, handle, _) = start(dir.path());
            let mut model = std::collections::HashMap::<u8, u64>::new();
            rt.block_on(async {
                for (id, expected) in &ops {
                    let current = model.get(id).copied().unwrap_or(0);
                    let c = seq.commit(Commit { entry: entry("patient.update"), write: Some(write(*id + 1, *expected)), meta: vec![] }).await.unwrap();
                    if current == *expected {
                        proptest::prop_assert_eq!(c.outcome, CommitOutcome::Written);
                        model.insert(*id, current + 1);
                    } else {
                        proptest::prop_assert_eq!(c.outcome, CommitOutcome::Conflict { current });
                    }
                }
                Ok(())
            })?;
            drop(seq);
            handle.join().unwrap();
            for id in 0u8..4 {
                let stored = store.head(RecordKind::Patient, &[id + 1; 16]).unwrap().map(|h| h.version).unwrap_or(0);
                proptest::prop_assert_eq!(stored, model.get(&id).copied().unwrap_or(0));
            }
            let raw: Vec<_> = store
                .audit_all()
                .map(|e| e.map(crate::storage::StoredAuditEntry::raw))
                .collect::<Result<_, _>>()
                .unwrap();
            proptest::prop_assert_eq!(raw.len(), ops.len() + 1);
            let report = crate::audit::verify_chain(raw, None);
            proptest::prop_assert!(report.is_ok());
        }
    }
}
