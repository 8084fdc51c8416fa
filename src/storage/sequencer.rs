//! The audit sequencer: one thread that orders every audit append and every
//! record write, and shares one disk sync among all requests waiting for it
//! (group commit).
//!
//! Each [`Commit`] carries an audit entry (without sequence, previous hash or
//! time, which the sequencer assigns) and optionally a [`RecordWrite`]. The
//! thread takes everything queued (up to [`MAX_BATCH`]), applies the whole
//! batch in one sled transaction across all trees (so a record never exists
//! without its audit entry, nor the reverse), then flushes and fdatasyncs
//! ([`Durability`]), and only then answers each request. Because this thread
//! is the only writer, the optimistic version check in a write is exact.
//!
//! Failure is closed: if the transaction fails, nothing of the batch is
//! written and every request gets an error; if the sync fails, every request
//! of the batch gets an error and no data is returned (the entries may still
//! reach disk with a later sync; their writes are then reported as failed
//! although applied, the usual ambiguity of a failed commit).

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use tokio::sync::{mpsc, oneshot};

use super::durability::Durability;
use super::{BLIND_KEY_LEN, Head, StorageError, Store, decode_head, encode_head, head_key, record_key};
use crate::audit::AuditEntry;
use crate::clock::Clock;
use crate::crypto::{RecordKind, WrappedDataKey};
use crate::domain::PatientId;

/// Most commits applied in one transaction and one sync.
pub const MAX_BATCH: usize = 512;

/// Longest the sequencer waits for more commits before syncing a batch that
/// is much smaller than recent ones (see [`run`]).
const MAX_LINGER: std::time::Duration = std::time::Duration::from_micros(200);

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
        let head = match store.audit_head()? {
            Some(h) => h,
            None => {
                let genesis = AuditEntry::genesis(clock.now_micros());
                let bytes = genesis.encode();
                let hash = crate::crypto::sha256(&bytes);
                let mut value = bytes;
                value.extend_from_slice(&hash);
                store.audit.insert(0u64.to_be_bytes(), value)?;
                durability.sync(&store.db)?;
                (0, hash)
            }
        };
        let head = Arc::new(Mutex::new(head));
        let (tx, rx) = mpsc::channel::<Pending>(4 * MAX_BATCH);
        let thread_head = head.clone();
        let span = tracing::info_span!("audit_sequencer");
        let handle = std::thread::Builder::new()
            .name("carevault-sequencer".into())
            .spawn(move || {
                let _enter = span.enter();
                run(store, clock, durability, rx, thread_head)
            })
            .map_err(StorageError::from)?;
        Ok((Sequencer { tx, head, syncs }, handle))
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
}

/// The sequencer loop. Group commit: take everything queued; if that is much
/// less than the recent average batch (requests answered together tend to
/// come back together, a little spread out), wait up to [`MAX_LINGER`] for
/// the rest so they share this sync instead of each paying for their own. A
/// lone client (average batch near 1) never waits.
fn run(
    store: Store,
    clock: Arc<dyn Clock>,
    mut durability: Durability,
    mut rx: mpsc::Receiver<Pending>,
    head: Arc<Mutex<(u64, [u8; 32])>>,
) {
    let mut current = *head.lock().unwrap_or_else(|p| p.into_inner());
    let mut average_batch = 1.0f64;
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        drain(&mut rx, &mut batch);
        if average_batch >= 4.0 && (batch.len() as f64) < average_batch / 2.0 {
            let deadline = std::time::Instant::now() + MAX_LINGER;
            while std::time::Instant::now() < deadline
                && (batch.len() as f64) < average_batch
                && batch.len() < MAX_BATCH
            {
                std::thread::sleep(std::time::Duration::from_micros(25));
                drain(&mut rx, &mut batch);
            }
        }
        average_batch = 0.8 * average_batch + 0.2 * batch.len() as f64;
        let now = clock.now_micros();
        let started = std::time::Instant::now();
        let applied = apply(&store, &batch, current, now);
        let apply_us = started.elapsed().as_micros();
        match applied {
            Ok((results, new_head)) => {
                // The batch is in sled (in memory) whatever the sync does next,
                // so the chain continues from it.
                current = new_head;
                *head.lock().unwrap_or_else(|p| p.into_inner()) = new_head;
                let synced = durability.sync(&store.db);
                tracing::debug!(
                    batch = batch.len(),
                    apply_us,
                    sync_us = started.elapsed().as_micros() - apply_us,
                    "batch committed"
                );
                match synced {
                    Ok(()) => {
                        for (p, r) in batch.into_iter().zip(results) {
                            let _ = p.reply.send(Ok(r));
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "audit sync failed; failing the batch closed");
                        for p in batch {
                            let _ = p.reply.send(Err(StorageError::Io("sync failed".into())));
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "audit transaction failed; nothing of the batch was written");
                for p in batch {
                    let _ = p.reply.send(Err(StorageError::Io("commit failed".into())));
                }
            }
        }
    }
    if let Err(e) = durability.sync(&store.db) {
        tracing::error!(error = %e, "final sync at shutdown failed");
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

type Tx = ConflictableTransactionError<StorageError>;

/// Sequence and hash of the newest entry.
type ChainHead = (u64, [u8; 32]);

fn apply(
    store: &Store,
    batch: &[Pending],
    start: (u64, [u8; 32]),
    now: i64,
) -> Result<(Vec<Committed>, ChainHead), StorageError> {
    let trees = (
        &store.heads,
        &store.records,
        &store.deks,
        &store.blind,
        &store.blind_owner,
        &store.coverage_by_patient,
        &store.audit,
        &store.audit_by_patient,
        &store.access,
    );
    let result =
        trees.transaction(|(heads, records, deks, blind, blind_owner, cov, audit, audit_by_patient, access)| {
            let mut results = Vec::with_capacity(batch.len());
            let (mut seq, mut prev) = start;
            for p in batch {
                let c = &p.commit;
                let mut outcome = CommitOutcome::Written;
                let tree_of = |t: MetaTree| match t {
                    MetaTree::Access => access,
                    MetaTree::Deks => deks,
                    MetaTree::Heads => heads,
                    MetaTree::Records => records,
                    MetaTree::Blind => blind,
                    MetaTree::BlindOwner => blind_owner,
                    MetaTree::CoverageByPatient => cov,
                };
                for m in &c.meta {
                    let tree = tree_of(m.tree);
                    if let Some(expect) = &m.expect
                        && tree.get(&m.key)?.map(|v| v.to_vec()) != *expect
                    {
                        outcome = CommitOutcome::Conflict { current: 0 };
                    }
                }
                if let (Some(w), CommitOutcome::Written) = (&c.write, outcome) {
                    let hk = head_key(w.kind, &w.id);
                    let current = match heads.get(hk)? {
                        Some(v) => decode_head(&v).map_err(ConflictableTransactionError::Abort)?.version,
                        None => 0,
                    };
                    let key_current = w.new_dek.is_some() || {
                        let stored = deks.get(w.patient_id)?;
                        stored.and_then(|v| WrappedDataKey(v.to_vec()).generation().ok()) == Some(w.key_generation)
                    };
                    if current != w.expected_version {
                        outcome = CommitOutcome::Conflict { current };
                    } else if !key_current {
                        outcome = CommitOutcome::KeyChanged;
                    } else {
                        write_record(w, heads, records, deks, blind, blind_owner, cov)?;
                    }
                }
                if outcome == CommitOutcome::Written {
                    for m in &c.meta {
                        let tree = tree_of(m.tree);
                        match &m.value {
                            Some(v) => tree.insert(m.key.as_slice(), v.as_slice())?,
                            None => tree.remove(m.key.as_slice())?,
                        };
                    }
                }
                seq += 1;
                let mut entry = c.entry.clone();
                entry.sequence = seq;
                entry.previous_hash = prev;
                entry.time_micros = now;
                if outcome != CommitOutcome::Written {
                    entry.outcome = crate::domain::Outcome::Aborted.as_str().to_string();
                }
                let bytes = entry.encode();
                let hash = crate::crypto::sha256(&bytes);
                let mut value = bytes;
                value.extend_from_slice(&hash);
                audit.insert(&seq.to_be_bytes(), value)?;
                for pid in std::iter::once(&entry.patient_id).chain(entry.returned_patient_ids.iter()) {
                    if let Some(id) = PatientId::parse(pid) {
                        let mut k = id.bytes().to_vec();
                        k.extend_from_slice(&seq.to_be_bytes());
                        audit_by_patient.insert(k, &[])?;
                    }
                }
                prev = hash;
                results.push(Committed { sequence: seq, hash, time_micros: now, outcome });
            }
            Ok((results, (seq, prev)))
        });
    match result {
        Ok(r) => Ok(r),
        Err(TransactionError::Abort(e)) => Err(e),
        Err(TransactionError::Storage(e)) => Err(e.into()),
    }
}

fn write_record(
    w: &RecordWrite,
    heads: &TransactionalTree,
    records: &TransactionalTree,
    deks: &TransactionalTree,
    blind: &TransactionalTree,
    blind_owner: &TransactionalTree,
    cov: &TransactionalTree,
) -> Result<(), Tx> {
    let new_version = w.expected_version + 1;
    heads.insert(&head_key(w.kind, &w.id), &encode_head(Head { version: new_version, patient_id: w.patient_id }))?;
    records.insert(&record_key(w.kind, &w.id, new_version), w.sealed.as_slice())?;
    if let Some(dek) = &w.new_dek {
        deks.insert(&w.patient_id, dek.as_slice())?;
    }
    if w.kind == RecordKind::Coverage && w.expected_version == 0 {
        let mut k = w.patient_id.to_vec();
        k.extend_from_slice(&w.id);
        cov.insert(k, &[])?;
    }
    let owner = head_key(w.kind, &w.id);
    if let Some(old) = blind_owner.get(owner)? {
        for k in old.chunks(BLIND_KEY_LEN) {
            blind.remove(k)?;
        }
    }
    let mut all = Vec::with_capacity(w.index_keys.len() * BLIND_KEY_LEN);
    for k in &w.index_keys {
        blind.insert(&k[..], &[])?;
        all.extend_from_slice(k);
    }
    blind_owner.insert(&owner, all)?;
    Ok(())
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
        let (_store, seq, handle, syncs) = start(dir.path());
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
                .map(|e| e.map(|e| crate::audit::RawEntry { bytes: e.bytes, stored_hash: Some(e.hash) }))
                .collect::<Result<_, _>>()
                .unwrap();
            proptest::prop_assert_eq!(raw.len(), ops.len() + 1);
            let report = crate::audit::verify_chain(raw, None);
            proptest::prop_assert!(report.is_ok());
        }
    }
}
