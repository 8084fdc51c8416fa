//! The sled engine through the conformance suite, and what only sled has:
//! recovery of a cut-short batch, audit blocks, epochs, the index migration.

use std::sync::Arc;

use super::SledStore;
use super::apply::{self, PENDING_KEY};
use super::layout;
use super::recovery::{Recovery, recover};
use crate::clock::FixedClock;
use crate::storage::conformance::{self as suite, write};
use crate::storage::model::RecordRef;
use crate::storage::sequencer::plan::plan;
use crate::storage::sequencer::{Commit, Pending};
use crate::storage::{Store, StoredAuditEntry};

/// A fresh store with its pipeline running, and the directory that holds it.
fn open() -> (Store, SledStore, std::thread::JoinHandle<()>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let sled = SledStore::open(&path, 8 << 20).unwrap();
    let (sequencer, thread) =
        sled.start(&path, Arc::new(FixedClock::new(1_000)), crate::storage::FailSyncs::never()).unwrap();
    let store = Store::new(Arc::new(sled.clone()), sequencer, Recovery::default());
    (store, sled, thread, dir)
}

fn stop(store: Store, thread: std::thread::JoinHandle<()>) {
    drop(store);
    thread.join().unwrap();
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            let (store, _, thread, _dir) = open();
            suite::$case(&store).await;
            stop(store, thread);
        }
    )*};
}

suite::every_case!(conformance);

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(12))]

    #[test]
    fn writes_match_a_version_model_and_every_attempt_is_audited(
        ops in proptest::collection::vec((0u8..4, 0u64..4), 1..40)
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let (store, _, thread, _dir) = open();
        let result = rt.block_on(suite::writes_match_a_version_model(&store, &ops));
        stop(store, thread);
        proptest::prop_assert_eq!(result, Ok(()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_are_stored_in_blocks_several_to_a_value() {
    let (store, sled, thread, _dir) = open();
    let tasks: Vec<_> = (0..400)
        .map(|_| {
            let s = store.clone();
            tokio::spawn(async move { s.commit(Commit::entry(suite::entry("patient.read"))).await.unwrap() })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    stop(store, thread);
    assert!(sled.audit.len() < 200, "{} audit values for 401 entries: entries are not blocked", sled.audit.len());
    for seq in [0, 1, 199, 400] {
        assert_eq!(sled.audit_entry_sync(seq).unwrap().unwrap().sequence, seq);
    }
}

/// A queued create of patient `[id; 16]`, audited under that patient.
fn created(id: u8) -> Pending {
    let reply = crate::storage::sequencer::Reply::nobody();
    let mut e = suite::entry("patient.create");
    e.patient_id = uuid::Uuid::from_bytes([id; 16]).to_string();
    Pending { commit: Commit { entry: e, write: Some(write(id, 0)), changes: vec![] }, reply }
}

/// The tree of a chain holding only its first entry.
fn one_leaf() -> crate::audit::merkle::CompactRange {
    crate::audit::merkle::CompactRange::from_parts(1, vec![[0; 32]]).unwrap()
}

/// The audit value of a planned commit: its entry followed by its hash.
fn value(c: &crate::storage::sequencer::plan::PlannedCommit) -> Vec<u8> {
    let mut v = c.entry.clone();
    v.extend_from_slice(&c.hash);
    v
}

#[test]
fn an_interrupted_batch_is_replayed_if_its_entry_is_durable_and_dropped_if_not() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(&dir.path().join("db"), 8 << 20).unwrap();
    let batch = vec![created(1), created(2)];
    let planned = plan(&store, &batch, (0, [0; 32]), &one_leaf(), 5).unwrap();
    let writes = apply::translate(&store, &planned.commits, &planned.nodes).unwrap();
    // The entries went into two blocks (as larger entries would), and the
    // crash came after the redo record and the first block, before any
    // index key or data.
    store.pending.insert(PENDING_KEY, writes.redo.clone().unwrap()).unwrap();
    let first = value(&planned.commits[0]);
    store
        .audit
        .insert(1u64.to_be_bytes(), super::audit_blocks::encode_block([(1, first.as_slice())]).unwrap())
        .unwrap();

    assert_eq!(recover(&store).unwrap(), Recovery { replayed: 1, dropped: 1 });
    assert_eq!(store.head(RecordRef::patient([1; 16])).unwrap().unwrap().version, 1);
    assert_eq!(store.record_version(RecordRef::patient([1; 16]), 1).unwrap(), Some(vec![1, 0]));
    assert_eq!(store.blind_lookup(1, &[1; 16], 10).unwrap(), vec![[1; 16]]);
    assert_eq!(store.audit_seqs_for_patient(&[1; 16], 0, 10).unwrap(), vec![1]);
    assert_eq!(store.head(RecordRef::patient([2; 16])).unwrap(), None, "its entry never became durable");
    assert_eq!(store.data_key(&[2; 16]).unwrap(), None);
    assert!(store.pending.is_empty());
    assert_eq!(recover(&store).unwrap(), Recovery::default(), "recovery is done once");
}

#[test]
fn every_entry_of_a_durable_block_is_replayed_and_indexed() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(&dir.path().join("db"), 8 << 20).unwrap();
    let batch = vec![created(1), created(2), created(3)];
    let planned = plan(&store, &batch, (0, [0; 32]), &one_leaf(), 5).unwrap();
    let writes = apply::translate(&store, &planned.commits, &planned.nodes).unwrap();
    // The crash came after the block, before any index key or data.
    store.pending.insert(PENDING_KEY, writes.redo.clone().unwrap()).unwrap();
    let values: Vec<Vec<u8>> = planned.commits.iter().map(value).collect();
    let entries = planned.commits.iter().zip(&values).map(|(c, v)| (c.sequence, v.as_slice()));
    store.audit.insert(1u64.to_be_bytes(), super::audit_blocks::encode_block(entries).unwrap()).unwrap();

    assert_eq!(recover(&store).unwrap(), Recovery { replayed: 3, dropped: 0 });
    for id in 1..=3u8 {
        assert_eq!(store.head(RecordRef::patient([id; 16])).unwrap().unwrap().version, 1);
        assert_eq!(store.audit_seqs_for_patient(&[id; 16], 0, 10).unwrap(), vec![u64::from(id)]);
    }
    let stored: StoredAuditEntry = store.audit_entry_sync(2).unwrap().unwrap();
    assert_eq!(stored.hash, planned.results[1].as_ref().unwrap().hash);
    assert_eq!(store.audit_head_sync().unwrap(), Some((3, planned.head.1)));
}

fn seqs_of(store: &SledStore, patient: u8, from: u64) -> Vec<u64> {
    store.audit_seqs_for_patient(&[patient; 16], from, usize::MAX).unwrap()
}

#[test]
fn a_patients_entries_are_found_across_epochs_in_order_and_from_any_point() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(&dir.path().join("db"), 8 << 20).unwrap();
    assert_eq!(seqs_of(&store, 1, 0), Vec::<u64>::new(), "an empty index");
    let epoch = 1u64 << layout::AUDIT_EPOCH_BITS;
    let mine = [1, 2, epoch - 1, epoch, 3 * epoch + 5, 7 * epoch];
    for seq in mine {
        store.audit_by_patient.insert(layout::audit_index_key(&[1; 16], seq), &[]).unwrap();
    }
    for seq in [3, epoch + 1, 9 * epoch] {
        store.audit_by_patient.insert(layout::audit_index_key(&[2; 16], seq), &[]).unwrap();
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
    let epoch = 1u64 << layout::AUDIT_EPOCH_BITS;
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
    let store = SledStore::open(&path, 8 << 20).unwrap();
    assert_eq!(seqs_of(&store, 1, 0), vec![1, epoch + 3]);
    assert_eq!(seqs_of(&store, 2, 0), vec![2]);
    assert!(!store.db.tree_names().iter().any(|n| n.as_ref() == b"audit_by_patient"), "the old tree is dropped");
    drop(store);
    let store = loop {
        match SledStore::open(&path, 8 << 20) {
            Err(crate::storage::StorageError::Locked) => std::thread::sleep(std::time::Duration::from_millis(50)),
            other => break other.unwrap(),
        }
    };
    assert_eq!(seqs_of(&store, 1, 0), vec![1, epoch + 3], "opening again changes nothing");
}

/// Commits `n` reads and returns the tree's root at the end, computed from the entries.
async fn reads_and_root(store: &Store, n: usize) -> crate::audit::merkle::Hash {
    for _ in 0..n {
        store.commit(Commit::entry(suite::entry("patient.read"))).await.unwrap();
    }
    let head = store.audit_head().await.unwrap().unwrap().0;
    let leaves: Vec<_> = store
        .audit_entries(0, head, usize::MAX)
        .await
        .unwrap()
        .iter()
        .map(|e| crate::audit::merkle::leaf_hash(&e.bytes))
        .collect();
    crate::audit::merkle::root(&leaves)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_merkle_tree_is_rebuilt_at_start_where_a_crash_cut_it_short_or_it_never_was() {
    let (store, sled, thread, dir) = open();
    let want = reads_and_root(&store, 100).await;
    stop(store, thread);
    let path = dir.path().join("db");
    let all: Vec<_> = sled.merkle.iter().map(|kv| kv.unwrap()).collect();
    assert!(all.len() >= 6, "{} stored subtrees for 101 entries", all.len());
    let restart = |sled: SledStore| {
        let (sequencer, thread) =
            sled.start(&path, Arc::new(FixedClock::new(1_000)), crate::storage::FailSyncs::never()).unwrap();
        (Store::new(Arc::new(sled), sequencer, Recovery::default()), thread)
    };
    // A crash after the entries, before their last subtrees (the newest
    // height-4 one and everything completed after it).
    for (k, _) in &all {
        let id = crate::audit::merkle::NodeId { level: k[0], index: u64::from_be_bytes(k[1..9].try_into().unwrap()) };
        if id.leaves().end > 80 {
            sled.merkle.remove(k).unwrap();
        }
    }
    drop(sled);
    let sled = SledStore::open(&path, 8 << 20).unwrap();
    let (store, thread) = restart(sled.clone());
    assert_eq!(store.tree_size().await.unwrap(), 101);
    assert_eq!(crate::storage::tree::root(&*store, 101).await.unwrap(), want);
    let stored_again: Vec<_> = sled.merkle.iter().map(|kv| kv.unwrap()).collect();
    assert_eq!(stored_again, all, "the same subtrees, rebuilt");
    stop(store, thread);
    // A store from before the tree: none stored.
    sled.merkle.clear().unwrap();
    drop(sled);
    let sled = SledStore::open(&path, 8 << 20).unwrap();
    let (store, thread) = restart(sled.clone());
    assert_eq!(crate::storage::tree::root(&*store, 101).await.unwrap(), want);
    let want = reads_and_root(&store, 40).await;
    assert_eq!(crate::storage::tree::root(&*store, 141).await.unwrap(), want, "and it grows on from there");
    stop(store, thread);
}

/// The data changes of `batch` planned against `store` at its current head, written.
fn write_batch(store: &SledStore, batch: &[Pending]) -> Vec<apply::Op> {
    let head = store.audit_head_sync().unwrap().unwrap_or((0, [0; 32]));
    let mut range = one_leaf();
    if head.0 > 0 {
        for e in store.audit_range(1, head.0) {
            range.append(crate::audit::merkle::leaf_hash(&e.unwrap().bytes));
        }
    }
    let planned = plan(store, batch, head, &range, 5).unwrap();
    assert!(planned.results.iter().all(Result::is_ok), "{:?}", planned.results);
    let writes = apply::translate(store, &planned.commits, &planned.nodes).unwrap();
    apply::write(store, &writes).unwrap();
    writes.ops().cloned().collect()
}

/// A queued update of patient `[id; 16]` from `version`, with these index keys.
fn updated(id: u8, version: u64, index_keys: Vec<crate::storage::IndexKey>) -> Pending {
    let reply = crate::storage::sequencer::Reply::nobody();
    let mut e = suite::entry("patient.update");
    e.patient_id = uuid::Uuid::from_bytes([id; 16]).to_string();
    let mut w = write(id, version);
    w.index_keys = index_keys;
    Pending { commit: Commit { entry: e, write: Some(w), changes: vec![] }, reply }
}

#[test]
fn an_update_writes_only_the_index_keys_that_changed() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(&dir.path().join("db"), 8 << 20).unwrap();
    let p = RecordRef::patient([1; 16]);
    let (a, b) = (suite::index(1, p, [1; 16]), suite::index(2, p, [1; 16]));
    let index_ops = |ops: &[apply::Op]| {
        ops.iter()
            .filter(|o| matches!(o.tree, layout::Tree::Blind | layout::Tree::BlindOwner))
            .map(|o| (o.tree, o.key.clone(), o.value.is_some()))
            .collect::<Vec<_>>()
    };
    let ops = write_batch(&store, &[created(1)]);
    assert_eq!(index_ops(&ops).len(), 2, "a create adds its key and its owner list");

    let ops = write_batch(&store, &[updated(1, 1, vec![a])]);
    assert_eq!(index_ops(&ops), vec![], "the same keys: nothing to write");
    assert!(ops.iter().any(|o| o.tree == layout::Tree::Heads), "the head still moves");

    let ops = write_batch(&store, &[updated(1, 2, vec![a, b])]);
    let owner = layout::head_key(p).to_vec();
    assert_eq!(
        index_ops(&ops),
        vec![(layout::Tree::Blind, b.to_bytes().to_vec(), true), (layout::Tree::BlindOwner, owner.clone(), true)],
        "one key more: only it is added"
    );
    let ops = write_batch(&store, &[updated(1, 3, vec![b])]);
    assert_eq!(
        index_ops(&ops),
        vec![(layout::Tree::Blind, a.to_bytes().to_vec(), false), (layout::Tree::BlindOwner, owner, true)],
        "one key fewer: only it is removed"
    );
    assert_eq!(store.blind_lookup(2, &[2; 16], 10).unwrap(), vec![[1; 16]]);
    assert_eq!(store.blind_lookup(1, &[1; 16], 10).unwrap(), Vec::<[u8; 16]>::new());
    assert_eq!(store.index_set(p).unwrap(), Some(vec![b]));
}
