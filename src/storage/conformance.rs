//! The cases every engine runs through the same way (in the spirit of akd's
//! storage test suite): commits and their preconditions, group commit,
//! typed changes, paging, and a model-based test of versions. Each engine's
//! tests open a fresh store and call every case (see `sled::tests`).

use std::collections::HashMap;

use super::model::{Change, CoverageNow, Expect, Head, IndexKey, JobName, RecordRef, RecordWrite};
use super::{Commit, CommitOutcome, Store};
use crate::audit::{AuditEntry, MAX_ENTRY_BYTES, RawEntry, verify_chain};
use crate::crypto::RecordKind;

/// Calls `$run!` with the name of every case, for each engine's tests to
/// run them all the same way (see `sled::tests`, `postgres::tests`).
macro_rules! every_case {
    ($run:ident) => {
        $run!(
            concurrent_commits_are_gapless_and_share_syncs,
            a_stale_write_commits_only_an_aborted_entry,
            changes_apply_only_when_every_precondition_holds,
            commits_in_one_batch_see_each_others_changes,
            records_index_sets_and_pages_read_back,
            erasing_a_patient_removes_everything_but_its_audit_trail,
            a_patients_entries_are_found_in_order_from_any_point,
            an_entry_too_long_to_encode_fails_alone,
            an_idempotency_key_is_taken_once,
            a_commit_goes_ahead_only_under_the_key_state_it_was_prepared_under,
            the_merkle_tree_grows_with_the_chain_and_proves_every_entry,
            a_records_current_state_reads_back_in_one_lookup,
            an_update_replaces_exactly_the_index_keys_that_changed,
            a_patients_coverages_read_back_in_one_lookup,
        );
    };
}
pub(crate) use every_case;

pub(crate) fn entry(action: &str) -> AuditEntry {
    AuditEntry { action: action.into(), outcome: "ok".into(), ..AuditEntry::default() }
}

/// A format-2 wrapped-key header naming generation 1 (the sequencer reads only that).
pub(crate) const WRAPPED_GEN_1: [u8; 15] = [2, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1];

pub(crate) fn index(tag: u8, record: RecordRef, patient: [u8; 16]) -> IndexKey {
    IndexKey { tag, mac: [tag; 16], patient, record }
}

/// Version `expected + 1` of patient `[id; 16]`.
pub(crate) fn write(id: u8, expected: u64) -> RecordWrite {
    let record = RecordRef::patient([id; 16]);
    RecordWrite {
        record,
        patient_id: [id; 16],
        expected_version: expected,
        sealed: vec![id, u8::try_from(expected).unwrap_or(u8::MAX)],
        new_dek: (expected == 0).then(|| WRAPPED_GEN_1.to_vec()),
        key_generation: 1,
        index_keys: vec![index(1, record, [id; 16])],
    }
}

/// A coverage `[cov; 16]` of patient `[patient; 16]`, version `expected + 1`.
pub(crate) fn coverage_write(cov: u8, patient: u8, expected: u64) -> RecordWrite {
    let record = RecordRef::coverage([cov; 16]);
    RecordWrite {
        record,
        patient_id: [patient; 16],
        expected_version: expected,
        sealed: vec![cov, 0xc0],
        new_dek: None,
        key_generation: 1,
        index_keys: vec![index(3, record, [patient; 16])],
    }
}

async fn commit(store: &Store, action: &str, write: Option<RecordWrite>, changes: Vec<Change>) -> super::Committed {
    store.commit(Commit { entry: entry(action), write, changes }).await.unwrap()
}

async fn chain(store: &Store) -> Vec<RawEntry> {
    let head = store.audit_head().await.unwrap().map_or(0, |h| h.0);
    let mut out = Vec::new();
    let mut next = 0;
    while next <= head {
        let page = store.audit_entries(next, head, 1000).await.unwrap();
        let Some(last) = page.last() else { break };
        next = last.sequence + 1;
        out.extend(page.into_iter().map(super::StoredAuditEntry::raw));
    }
    out
}

/// Concurrent commits get gapless sequences and share durable syncs.
pub(crate) async fn concurrent_commits_are_gapless_and_share_syncs(store: &Store) {
    let syncs = store.sequencer().sync_counter();
    let before = syncs.load(std::sync::atomic::Ordering::SeqCst);
    let first = store.audit_head().await.unwrap().map_or(0, |h| h.0) + 1;
    let tasks: Vec<_> = (0..400)
        .map(|_| {
            let s = store.clone();
            tokio::spawn(async move { s.commit(Commit::entry(entry("patient.read"))).await.unwrap() })
        })
        .collect();
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap().sequence);
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (first..first + 400).collect::<Vec<_>>(), "gapless, each sequence once");
    let used = syncs.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert!(used <= 40, "{used} syncs for 400 commits: group commit is not batching");
    let stored: Vec<u64> = chain(store).await.iter().map(|e| e.stored_sequence.unwrap()).collect();
    assert_eq!(stored, (0..first + 400).collect::<Vec<_>>(), "every entry reads back in order");
    assert!(verify_chain(chain(store).await, None).is_ok());
    assert_eq!(super::audit_entry(&**store, first + 399).await.unwrap().unwrap().sequence, first + 399);
    assert!(super::audit_entry(&**store, first + 400).await.unwrap().is_none());
}

/// A stale write commits only an aborted entry; a current one commits both.
pub(crate) async fn a_stale_write_commits_only_an_aborted_entry(store: &Store) {
    let created = commit(store, "patient.create", Some(write(1, 0)), vec![]).await;
    assert_eq!(created.outcome, CommitOutcome::Written);
    let stale = commit(store, "patient.update", Some(write(1, 0)), vec![]).await;
    assert_eq!(stale.outcome, CommitOutcome::Conflict { current: 1 });
    let p = RecordRef::patient([1; 16]);
    assert_eq!(store.head(p).await.unwrap().unwrap().version, 1);
    let aborted = super::audit_entry(&**store, stale.sequence).await.unwrap().unwrap();
    assert_eq!(AuditEntry::decode(&aborted.bytes).unwrap().outcome, "aborted");
    let updated = commit(store, "patient.update", Some(write(1, 1)), vec![]).await;
    assert_eq!(updated.outcome, CommitOutcome::Written);
    assert_eq!(store.record_version(p, 2).await.unwrap(), Some(vec![1, 1]));
    assert_eq!(store.versions(p).await.unwrap().len(), 2);
    assert_eq!(store.data_key([1; 16]).await.unwrap(), Some(WRAPPED_GEN_1.to_vec()));
    assert_eq!(store.blind_lookup(1, [1; 16], 10).await.unwrap(), vec![[1; 16]]);
    // A write sealed under a data key of another generation is refused.
    let mut old_gen = write(1, 2);
    old_gen.key_generation = 7;
    assert_eq!(commit(store, "patient.update", Some(old_gen), vec![]).await.outcome, CommitOutcome::KeyChanged);
}

/// Changes apply only if every precondition of their commit holds.
pub(crate) async fn changes_apply_only_when_every_precondition_holds(store: &Store) {
    let both = vec![
        Change::DataKey { patient: [9; 16], value: Some(b"w1".to_vec()), expect: Expect::Absent },
        Change::Grant { id: [7; 16], value: b"g1".to_vec(), expect: Expect::Anything },
        Change::Job { name: JobName::Rewrap, value: Some(b"j1".to_vec()), expect: Expect::Absent },
        Change::Restriction { patient: [9; 16], since: Some(5) },
        Change::LegalHold { patient: [9; 16], since: Some(6), expect: Expect::Absent },
        Change::ActiveGrant { subject: [3; 32], patient: [9; 16], grant: [7; 16], expires: 99 },
        Change::Tombstone { record: RecordRef::coverage([8; 16]), value: b"t".to_vec(), expect: Expect::Absent },
    ];
    assert_eq!(commit(store, "keys.rewrap_batch", None, both).await.outcome, CommitOutcome::Written);
    assert_eq!(store.data_key([9; 16]).await.unwrap(), Some(b"w1".to_vec()));
    assert_eq!(store.grant([7; 16]).await.unwrap(), Some(b"g1".to_vec()));
    assert_eq!(store.job(JobName::Rewrap).await.unwrap(), Some(b"j1".to_vec()));
    assert_eq!(store.job(JobName::Reencrypt).await.unwrap(), None);
    assert_eq!(store.restricted_since([9; 16]).await.unwrap(), Some(5));
    assert_eq!(store.legal_hold_since([9; 16]).await.unwrap(), Some(6));
    assert_eq!(store.active_grant([3; 32], [9; 16]).await.unwrap(), Some(([7; 16], 99)));
    assert_eq!(store.tombstone(RecordRef::coverage([8; 16])).await.unwrap(), Some(b"t".to_vec()));
    assert_eq!(store.tombstone(RecordRef::patient([8; 16])).await.unwrap(), None);
    // One stale precondition: nothing of the commit is applied, the entry says aborted.
    let stale = vec![
        Change::DataKey { patient: [9; 16], value: Some(b"w2".to_vec()), expect: Expect::Equal(b"w1".to_vec()) },
        Change::Grant { id: [7; 16], value: b"g2".to_vec(), expect: Expect::Equal(b"g0".to_vec()) },
        Change::Restriction { patient: [9; 16], since: None },
    ];
    let c = commit(store, "keys.rewrap_batch", None, stale).await;
    assert_eq!(c.outcome, CommitOutcome::Conflict { current: 0 });
    assert_eq!(store.data_key([9; 16]).await.unwrap(), Some(b"w1".to_vec()));
    assert_eq!(store.grant([7; 16]).await.unwrap(), Some(b"g1".to_vec()));
    assert_eq!(store.restricted_since([9; 16]).await.unwrap(), Some(5));
    // Removals.
    let gone = vec![
        Change::Restriction { patient: [9; 16], since: None },
        Change::LegalHold { patient: [9; 16], since: None, expect: Expect::Equal(6) },
        Change::Job { name: JobName::Rewrap, value: None, expect: Expect::Equal(b"j1".to_vec()) },
        Change::DataKey { patient: [9; 16], value: None, expect: Expect::Anything },
    ];
    assert_eq!(commit(store, "x", None, gone).await.outcome, CommitOutcome::Written);
    assert_eq!(store.restricted_since([9; 16]).await.unwrap(), None);
    assert_eq!(store.legal_hold_since([9; 16]).await.unwrap(), None);
    assert_eq!(store.job(JobName::Rewrap).await.unwrap(), None);
    assert_eq!(store.data_key([9; 16]).await.unwrap(), None);
}

/// Within one batch, a commit sees the changes of the commits before it.
pub(crate) async fn commits_in_one_batch_see_each_others_changes(store: &Store) {
    let (a, b, c) = tokio::join!(
        store.commit(Commit { entry: entry("patient.create"), write: Some(write(4, 0)), changes: vec![] }),
        store.commit(Commit { entry: entry("patient.update"), write: Some(write(4, 1)), changes: vec![] }),
        store.commit(Commit { entry: entry("patient.update"), write: Some(write(4, 2)), changes: vec![] }),
    );
    let written = [a, b, c].iter().filter(|r| r.as_ref().unwrap().outcome == CommitOutcome::Written).count();
    let head = store.head(RecordRef::patient([4; 16])).await.unwrap().unwrap();
    assert_eq!(u64::try_from(written).unwrap(), head.version, "each applied write moved the version by one");
}

/// Coverages, index sets, reseals and paging.
pub(crate) async fn records_index_sets_and_pages_read_back(store: &Store) {
    commit(store, "patient.create", Some(write(5, 0)), vec![]).await;
    commit(store, "patient.create", Some(write(6, 0)), vec![]).await;
    commit(store, "coverage.create", Some(coverage_write(0xa1, 5, 0)), vec![]).await;
    commit(store, "coverage.create", Some(coverage_write(0xa2, 5, 0)), vec![]).await;
    assert_eq!(store.coverages_of([5; 16]).await.unwrap(), vec![[0xa1; 16], [0xa2; 16]]);
    assert_eq!(store.head(RecordRef::coverage([0xa1; 16])).await.unwrap().unwrap().patient_id, [5; 16]);
    let patients = store.heads_after(Some(RecordKind::Patient), None, 100).await.unwrap();
    assert!(patients.iter().all(|(r, _)| r.kind == RecordKind::Patient));
    let first = store.heads_after(None, None, 1).await.unwrap();
    let rest = store.heads_after(None, Some(first[0].0), 100).await.unwrap();
    assert!(rest.iter().all(|(r, _)| *r > first[0].0), "pages continue strictly after");
    assert_eq!(store.count_records().await.unwrap(), u64::try_from(first.len() + rest.len()).unwrap());
    // Replacing an index set (blind-index rotation) checks the set and the head read.
    let record = RecordRef::patient([5; 16]);
    let head = store.head(record).await.unwrap();
    let current = store.index_set(record).await.unwrap();
    let both = vec![index(1, record, [5; 16]), index(17, record, [5; 16])];
    let change = Change::IndexSet { record, keys: both.clone(), expect: current.clone(), expect_head: head };
    assert_eq!(commit(store, "keys.blind_index_batch", None, vec![change]).await.outcome, CommitOutcome::Written);
    assert_eq!(store.index_set(record).await.unwrap(), Some(both.clone()));
    assert_eq!(store.blind_lookup(17, [17; 16], 10).await.unwrap(), vec![[5; 16]]);
    let per_slot = store.index_entries_per_slot().await.unwrap();
    assert!(per_slot[1] >= 1 && per_slot[0] >= 1, "{per_slot:?}");
    let stale = Change::IndexSet { record, keys: vec![], expect: current, expect_head: head };
    assert_eq!(commit(store, "x", None, vec![stale]).await.outcome, CommitOutcome::Conflict { current: 0 });
    let sets = store.index_sets_after(None, 100).await.unwrap();
    assert!(sets.iter().any(|(r, s)| *r == record && *s == both));
    // Resealing a version checks the ciphertext read.
    let sealed = store.record_version(record, 1).await.unwrap().unwrap();
    let reseal = Change::Reseal { record, version: 1, value: b"new".to_vec(), expect: sealed.clone() };
    assert_eq!(commit(store, "keys.reencrypt_batch", None, vec![reseal.clone()]).await.outcome, CommitOutcome::Written);
    assert_eq!(store.record_version(record, 1).await.unwrap(), Some(b"new".to_vec()));
    assert_eq!(commit(store, "x", None, vec![reseal]).await.outcome, CommitOutcome::Conflict { current: 0 });
    // Data keys page by patient id.
    let keys = store.data_keys_after(None, 1).await.unwrap();
    let more = store.data_keys_after(Some(keys[0].0), 100).await.unwrap();
    assert!(more.iter().all(|(p, _)| *p > keys[0].0));
    assert_eq!(store.count_data_keys().await.unwrap(), u64::try_from(keys.len() + more.len()).unwrap());
}

/// `current` reads a record's head, the version it names, its patient's data
/// key and its patient's restriction together.
pub(crate) async fn a_records_current_state_reads_back_in_one_lookup(store: &Store) {
    let patient = RecordRef::patient([0x31; 16]);
    assert_eq!(store.current(patient).await.unwrap(), None);
    commit(store, "patient.create", Some(write(0x31, 0)), vec![]).await;
    commit(store, "patient.update", Some(write(0x31, 1)), vec![]).await;
    let now = store.current(patient).await.unwrap().unwrap();
    assert_eq!(now.head, Head { version: 2, patient_id: [0x31; 16] });
    assert_eq!(now.sealed, Some(write(0x31, 1).sealed));
    assert_eq!(now.wrapped_key.as_deref(), Some(WRAPPED_GEN_1.as_slice()));
    let coverage = RecordRef::coverage([0xb1; 16]);
    commit(store, "coverage.create", Some(coverage_write(0xb1, 0x31, 0)), vec![]).await;
    let cov = store.current(coverage).await.unwrap().unwrap();
    assert_eq!(cov.head, Head { version: 1, patient_id: [0x31; 16] });
    assert_eq!(cov.sealed, Some(coverage_write(0xb1, 0x31, 0).sealed));
    assert_eq!(cov.wrapped_key.as_deref(), Some(WRAPPED_GEN_1.as_slice()), "the patient's key");
    assert_eq!(cov.restricted_since, None);
    let restrict = Change::Restriction { patient: [0x31; 16], since: Some(77) };
    assert_eq!(commit(store, "x", None, vec![restrict]).await.outcome, CommitOutcome::Written);
    assert_eq!(store.current(coverage).await.unwrap().unwrap().restricted_since, Some(77), "the patient's restriction");
    assert_eq!(store.current(patient).await.unwrap().unwrap().restricted_since, Some(77));
    // A key that is gone reads as missing, not as an error.
    let gone = Change::DataKey { patient: [0x31; 16], value: None, expect: Expect::Anything };
    assert_eq!(commit(store, "x", None, vec![gone]).await.outcome, CommitOutcome::Written);
    assert_eq!(store.current(patient).await.unwrap().unwrap().wrapped_key, None);
}

/// Updates that keep, add or drop index keys leave exactly the new set searchable.
pub(crate) async fn an_update_replaces_exactly_the_index_keys_that_changed(store: &Store) {
    let record = RecordRef::patient([0x32; 16]);
    let (a, b) = (index(1, record, [0x32; 16]), index(2, record, [0x32; 16]));
    let with = |expected: u64, keys: Vec<IndexKey>| RecordWrite { index_keys: keys, ..write(0x32, expected) };
    let found = |tag: u8| async move { store.blind_lookup(tag, [tag; 16], 100).await.unwrap().contains(&[0x32; 16]) };
    commit(store, "patient.create", Some(with(0, vec![a])), vec![]).await;
    for (expected, keys) in [(1, vec![a]), (2, vec![a, b]), (3, vec![a, b]), (4, vec![b]), (5, vec![]), (6, vec![a])] {
        let done = commit(store, "patient.update", Some(with(expected, keys.clone())), vec![]).await;
        assert_eq!(done.outcome, CommitOutcome::Written);
        assert_eq!(store.index_set(record).await.unwrap(), Some(keys.clone()), "after version {}", expected + 1);
        assert_eq!((found(1).await, found(2).await), (keys.contains(&a), keys.contains(&b)));
    }
}

/// Erasing removes everything of the patient, and refuses if its coverages changed.
pub(crate) async fn erasing_a_patient_removes_everything_but_its_audit_trail(store: &Store) {
    commit(store, "patient.create", Some(write(0x50, 0)), vec![]).await;
    commit(store, "patient.update", Some(write(0x50, 1)), vec![]).await;
    commit(store, "coverage.create", Some(coverage_write(0x51, 0x50, 0)), vec![]).await;
    let p = [0x50; 16];
    let footprint = store.footprint(p).await.unwrap();
    assert_eq!((footprint.coverages, footprint.record_versions), (1, 3));
    let stale = Change::ErasePatient { patient: p, coverages: vec![] };
    assert_eq!(commit(store, "patient.erase", None, vec![stale]).await.outcome, CommitOutcome::Conflict { current: 0 });
    let erase = vec![
        Change::ErasePatient { patient: p, coverages: vec![[0x51; 16]] },
        Change::DataKey { patient: p, value: None, expect: Expect::Equal(WRAPPED_GEN_1.to_vec()) },
    ];
    assert_eq!(commit(store, "patient.erase", None, erase).await.outcome, CommitOutcome::Written);
    for r in [RecordRef::patient(p), RecordRef::coverage([0x51; 16])] {
        assert_eq!(store.head(r).await.unwrap(), None);
        assert!(store.versions(r).await.unwrap().is_empty());
        assert_eq!(store.index_set(r).await.unwrap(), None);
    }
    assert!(store.coverages_of(p).await.unwrap().is_empty());
    assert_eq!(store.data_key(p).await.unwrap(), None);
    assert!(store.blind_lookup(1, [1; 16], 100).await.unwrap().iter().all(|x| *x != p));
    assert!(store.blind_lookup(3, [3; 16], 100).await.unwrap().iter().all(|x| *x != p));
    assert!(verify_chain(chain(store).await, None).is_ok(), "the audit trail is untouched");
}

/// The audit index finds a patient's entries in order, from any point.
pub(crate) async fn a_patients_entries_are_found_in_order_from_any_point(store: &Store) {
    let named = |p: u8| AuditEntry { patient_id: uuid::Uuid::from_bytes([p; 16]).to_string(), ..entry("patient.read") };
    let mut mine = Vec::new();
    for i in 0..30u8 {
        let e = if i % 3 == 0 { named(0x61) } else { named(0x62) };
        let c = store.commit(Commit::entry(e)).await.unwrap();
        if i % 3 == 0 {
            mine.push(c.sequence);
        }
    }
    let returned = AuditEntry {
        returned_patient_ids: vec![uuid::Uuid::from_bytes([0x61; 16]).to_string()],
        ..entry("patient.search")
    };
    mine.push(store.commit(Commit::entry(returned)).await.unwrap().sequence);
    assert_eq!(store.audit_seqs_for_patient([0x61; 16], 0, 1000).await.unwrap(), mine);
    assert_eq!(store.audit_seqs_for_patient([0x61; 16], mine[3], 1000).await.unwrap(), &mine[3..]);
    assert_eq!(store.audit_seqs_for_patient([0x61; 16], 0, 2).await.unwrap(), &mine[..2]);
    assert!(store.audit_seqs_for_patient([0x63; 16], 0, 1000).await.unwrap().is_empty());
}

/// An entry too long to encode fails its own commit; the batch goes on.
pub(crate) async fn an_entry_too_long_to_encode_fails_alone(store: &Store) {
    let mut huge = entry("patient.create");
    huge.details = vec!["x".repeat(MAX_ENTRY_BYTES)];
    let (a, b, c) = tokio::join!(
        store.commit(Commit { entry: entry("patient.create"), write: Some(write(0x71, 0)), changes: vec![] }),
        store.commit(Commit { entry: huge, write: Some(write(0x72, 0)), changes: vec![] }),
        store.commit(Commit { entry: entry("patient.create"), write: Some(write(0x73, 0)), changes: vec![] }),
    );
    assert!(matches!(b, Err(super::StorageError::Unencodable(_))), "{b:?}");
    let mut written = [a.unwrap().sequence, c.unwrap().sequence];
    written.sort_unstable();
    assert_eq!(written[1], written[0] + 1, "the chain has no gap where the failed commit was");
    assert_eq!(store.head(RecordRef::patient([0x72; 16])).await.unwrap(), None, "nothing of it was written");
    assert!(verify_chain(chain(store).await, None).is_ok());
}

/// Model-based: any interleaving of writes with right and wrong versions
/// leaves every record at the model's version, every attempt audited once.
pub(crate) async fn writes_match_a_version_model(store: &Store, ops: &[(u8, u64)]) -> Result<(), String> {
    let before = store.audit_head().await.unwrap().map_or(0, |h| h.0);
    let mut model = HashMap::<u8, u64>::new();
    for (id, expected) in ops {
        let current = model.get(id).copied().unwrap_or(0);
        let c = commit(store, "patient.update", Some(write(0x80 + *id, *expected)), vec![]).await;
        if current == *expected {
            if c.outcome != CommitOutcome::Written {
                return Err(format!("{id} at {expected}: {:?}", c.outcome));
            }
            model.insert(*id, current + 1);
        } else if c.outcome != (CommitOutcome::Conflict { current }) {
            return Err(format!("{id} at {expected} (current {current}): {:?}", c.outcome));
        }
    }
    for id in 0u8..4 {
        let stored = store.head(RecordRef::patient([0x80 + id; 16])).await.unwrap().map_or(0, |h| h.version);
        if stored != model.get(&id).copied().unwrap_or(0) {
            return Err(format!("record {id} at {stored}"));
        }
    }
    let after = store.audit_head().await.unwrap().map_or(0, |h| h.0);
    if after - before != u64::try_from(ops.len()).unwrap() {
        return Err("an attempt was not audited exactly once".into());
    }
    if !verify_chain(chain(store).await, None).is_ok() {
        return Err("the chain does not verify".into());
    }
    Ok(())
}

/// An idempotency key is remembered with the create that took it, and only once.
pub(crate) async fn an_idempotency_key_is_taken_once(store: &Store) {
    let key = [7u8; 32];
    assert_eq!(store.idempotent(key).await.unwrap(), None);
    let take = |id: u8| Change::IdempotencyKey { key, record: RecordRef::patient([id; 16]) };
    let first = commit(store, "patient.create", Some(write(41, 0)), vec![take(41)]).await;
    assert_eq!(first.outcome, CommitOutcome::Written);
    assert_eq!(store.idempotent(key).await.unwrap(), Some(RecordRef::patient([41; 16])));
    let second = commit(store, "patient.create", Some(write(42, 0)), vec![take(42)]).await;
    assert_eq!(second.outcome, CommitOutcome::Conflict { current: 0 });
    assert_eq!(store.head(RecordRef::patient([42; 16])).await.unwrap(), None, "the losing create wrote nothing");
    assert_eq!(store.idempotent(key).await.unwrap(), Some(RecordRef::patient([41; 16])));
}

pub(crate) async fn a_commit_goes_ahead_only_under_the_key_state_it_was_prepared_under(store: &Store) {
    let is = |b: &[u8]| Change::KeyStateIs(b.to_vec());
    // No key state stored: a check against any bytes fails.
    let none = commit(store, "patient.read", None, vec![is(b"k1")]).await;
    assert_eq!(none.outcome, CommitOutcome::KeyStateMoved);
    let set = |v: &[u8], expect| Change::Job { name: JobName::KeyState, value: Some(v.to_vec()), expect };
    assert_eq!(
        commit(store, "keys.state_recorded", None, vec![set(b"k1", Expect::Absent)]).await.outcome,
        CommitOutcome::Written
    );
    assert_eq!(store.job(JobName::KeyState).await.unwrap().as_deref(), Some(&b"k1"[..]));
    // Under the stored state a write goes ahead; the check itself writes nothing.
    let ok = commit(store, "patient.create", Some(write(51, 0)), vec![is(b"k1")]).await;
    assert_eq!(ok.outcome, CommitOutcome::Written);
    assert_eq!(store.job(JobName::KeyState).await.unwrap().as_deref(), Some(&b"k1"[..]));
    // The state moves; a write prepared under the old one is aborted, and only its entry is committed.
    let moved = set(b"k2", Expect::Equal(b"k1".to_vec()));
    assert_eq!(commit(store, "keys.rotate_complete", None, vec![moved]).await.outcome, CommitOutcome::Written);
    let stale = commit(store, "patient.create", Some(write(52, 0)), vec![is(b"k1")]).await;
    assert_eq!(stale.outcome, CommitOutcome::KeyStateMoved);
    assert_eq!(store.head(RecordRef::patient([52; 16])).await.unwrap(), None, "the stale write wrote nothing");
    let entries = chain(store).await;
    let last = AuditEntry::decode(&entries.last().unwrap().bytes).unwrap();
    assert_eq!((last.action.as_str(), last.outcome.as_str()), ("patient.create", "aborted"));
    // A second failed precondition does not hide that the key state moved.
    let both = commit(store, "patient.update", Some(write(51, 0)), vec![is(b"k1")]).await;
    assert_eq!(both.outcome, CommitOutcome::KeyStateMoved);
    // A key state change that expects the old bytes fails like any job change.
    let late = set(b"k3", Expect::Equal(b"k1".to_vec()));
    assert_eq!(
        commit(store, "keys.retire_complete", None, vec![late]).await.outcome,
        CommitOutcome::Conflict { current: 0 }
    );
}

/// The tree covers every committed entry; its root and proofs, read from the
/// stored subtrees, equal those computed from the entries themselves.
pub(crate) async fn the_merkle_tree_grows_with_the_chain_and_proves_every_entry(store: &Store) {
    use crate::audit::merkle;
    use crate::storage::tree;
    let mut sizes = Vec::new();
    for round in 0..5u8 {
        let tasks: Vec<_> = (0..(7 + 13 * usize::from(round)))
            .map(|_| {
                let s = store.clone();
                tokio::spawn(async move { s.commit(Commit::entry(entry("patient.read"))).await.unwrap() })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        sizes.push(store.tree_size().await.unwrap());
    }
    let entries = chain(store).await;
    let leaves: Vec<merkle::Hash> = entries.iter().map(|e| merkle::leaf_hash(&e.bytes)).collect();
    let n = leaves.len() as u64;
    assert_eq!(*sizes.last().unwrap(), n, "the tree covers every entry");
    assert_eq!(store.audit_head().await.unwrap().unwrap().0 + 1, n);
    for size in sizes.iter().copied().chain([1, 2, 15, 16, 17, 33]).filter(|s| *s <= n) {
        let want = merkle::root(&leaves[..size as usize]);
        assert_eq!(tree::root(&**store, size).await.unwrap(), want, "root at {size}");
        for i in (0..size).step_by(5).chain([size - 1]) {
            let proof = tree::proof(&**store, &merkle::inclusion_ranges(i, size).unwrap()).await.unwrap();
            merkle::verify_inclusion(i, size, &leaves[i as usize], &proof, &want).unwrap();
        }
        for old in [1, size / 2 + 1, size] {
            let proof = tree::proof(&**store, &merkle::consistency_ranges(old, size).unwrap()).await.unwrap();
            let old_root = merkle::root(&leaves[..old as usize]);
            merkle::verify_consistency(old, size, &old_root, &want, &proof).unwrap();
        }
    }
}

/// A patient's coverages come back at their current versions, by id, with
/// the patient's version, key and restriction.
pub(crate) async fn a_patients_coverages_read_back_in_one_lookup(store: &Store) {
    let p = [0x33; 16];
    assert_eq!(store.coverages_now(p).await.unwrap(), None);
    commit(store, "patient.create", Some(write(0x33, 0)), vec![]).await;
    let alone = store.coverages_now(p).await.unwrap().unwrap();
    assert_eq!((alone.patient_version, alone.coverages.len()), (1, 0));
    assert_eq!(alone.wrapped_key.as_deref(), Some(WRAPPED_GEN_1.as_slice()));
    assert_eq!(alone.restricted_since, None);
    // Created out of id order; one updated; another patient's coverage is not among them.
    commit(store, "patient.create", Some(write(0x34, 0)), vec![]).await;
    for (cov, patient) in [(0xc2, 0x33), (0xc1, 0x33), (0xc0, 0x34)] {
        commit(store, "coverage.create", Some(coverage_write(cov, patient, 0)), vec![]).await;
    }
    let update = RecordWrite { sealed: vec![0xc2, 0xc1], ..coverage_write(0xc2, 0x33, 1) };
    commit(store, "coverage.update", Some(update), vec![]).await;
    commit(store, "patient.update", Some(write(0x33, 1)), vec![]).await;
    let restrict = Change::Restriction { patient: p, since: Some(5) };
    commit(store, "access.restrict", None, vec![restrict]).await;
    let now = store.coverages_now(p).await.unwrap().unwrap();
    assert_eq!(now.patient_version, 2);
    assert_eq!(now.restricted_since, Some(5));
    assert_eq!(
        now.coverages,
        vec![
            CoverageNow { id: [0xc1; 16], version: 1, sealed: Some(coverage_write(0xc1, 0x33, 0).sealed) },
            CoverageNow { id: [0xc2; 16], version: 2, sealed: Some(vec![0xc2, 0xc1]) },
        ]
    );
    let other = store.coverages_now([0x34; 16]).await.unwrap().unwrap();
    assert_eq!(other.coverages.iter().map(|c| c.id).collect::<Vec<_>>(), vec![[0xc0; 16]]);
}
