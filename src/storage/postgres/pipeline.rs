//! Group commit on PostgreSQL: each batch is one transaction.
//!
//! 1. `SELECT … FROM chain_head … FOR UPDATE`: the chain head's row lock.
//!    Every writer of every process takes it first, so batches of all
//!    processes are serialized, and every data row is changed only under it
//!    (no deadlocks, no lost updates);
//! 2. fetch what planning reads (`prefetch`): under READ COMMITTED each
//!    statement sees every transaction committed before it began, including
//!    the previous holder of the lock, so the preconditions planning checks
//!    are exact across processes;
//! 3. plan (engine-neutral: versions, key generations, preconditions,
//!    chaining after the head just read), then send the batch's statements
//!    together (pipelined, executed in order);
//! 4. move the head, `COMMIT` (with `synchronous_commit = on` for this
//!    transaction, whatever the server's default), and only then answer.
//!
//! A failed statement rolls the whole transaction back: nothing of the batch
//! is written and every commit of it fails (a precondition that fails is not
//! such a failure: it aborts only its own commit, in planning). A `COMMIT`
//! whose answer never came (the connection dropped) leaves the outcome
//! unknown to this process; its callers are told so, and the next batch
//! chains after whatever the database holds.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio_postgres::types::ToSql;

use super::{PgStore, encode_index_set, hash32, i64_of, kind_tag, pg_error, pool_error, u64_of};
use crate::audit::AuditEntry;
use crate::audit::merkle::CompactRange;
use crate::clock::Clock;
use crate::storage::StorageError;
use crate::storage::model::{Change, Head, IndexKey, JobName, RecordRef, RecordWrite};
use crate::storage::sequencer::plan::{Planned, PlannedCommit, StateKey, StateValue, keys_read, plan};
use crate::storage::sequencer::{Pending, Queue, drain, refuse};

type Param = Box<dyn ToSql + Sync + Send>;

/// One statement of a batch and its parameters.
struct Op {
    sql: &'static str,
    params: Vec<Param>,
}

fn op(sql: &'static str, params: Vec<Param>) -> Op {
    Op { sql, params }
}

fn b(v: &[u8]) -> Param {
    Box::new(v.to_vec())
}

const LOCK_HEAD: &str = "SELECT seq, hash, time_micros, tree_size FROM chain_head WHERE id = 1 FOR UPDATE";
const MOVE_HEAD: &str = "UPDATE chain_head SET seq = $1, hash = $2, time_micros = $3, tree_size = $4 WHERE id = 1";
const INSERT_ENTRIES: &str =
    "INSERT INTO audit_entries (seq, entry, hash) SELECT * FROM UNNEST($1::bigint[], $2::bytea[], $3::bytea[])";
const INSERT_AUDIT_PATIENTS: &str =
    "INSERT INTO audit_patients (patient, seq) SELECT * FROM UNNEST($1::bytea[], $2::bigint[])";
const INSERT_VERSION: &str = "INSERT INTO record_versions (kind, id, version, sealed) VALUES ($1, $2, $3, $4)";
const RESEAL: &str = "UPDATE record_versions SET sealed = $4 WHERE kind = $1 AND id = $2 AND version = $3";
const PUT_HEAD: &str = "INSERT INTO records (kind, id, version, patient) VALUES ($1, $2, $3, $4) \
     ON CONFLICT (kind, id) DO UPDATE SET version = EXCLUDED.version, patient = EXCLUDED.patient";
const PUT_DATA_KEY: &str = "INSERT INTO data_keys (patient, wrapped) VALUES ($1, $2) \
     ON CONFLICT (patient) DO UPDATE SET wrapped = EXCLUDED.wrapped";
const DELETE_DATA_KEY: &str = "DELETE FROM data_keys WHERE patient = $1";
/// A record's index entries that its new set (`$3`-`$5`) lacks.
const DELETE_INDEX_NOT_IN: &str = "DELETE FROM index_entries WHERE kind = $1 AND id = $2 \
     AND (tag, mac, patient) NOT IN (SELECT * FROM UNNEST($3::smallint[], $4::bytea[], $5::bytea[]))";
const INSERT_INDEX: &str = "INSERT INTO index_entries (tag, mac, patient, kind, id) \
     SELECT * FROM UNNEST($1::smallint[], $2::bytea[], $3::bytea[], $4::smallint[], $5::bytea[]) \
     ON CONFLICT DO NOTHING";
const PUT_INDEX_SET: &str = "INSERT INTO index_sets (kind, id, keys) VALUES ($1, $2, $3) \
     ON CONFLICT (kind, id) DO UPDATE SET keys = EXCLUDED.keys WHERE index_sets.keys IS DISTINCT FROM EXCLUDED.keys";
const PUT_RESTRICTION: &str = "INSERT INTO restrictions (patient, since_micros) VALUES ($1, $2) \
     ON CONFLICT (patient) DO UPDATE SET since_micros = EXCLUDED.since_micros";
const DELETE_RESTRICTION: &str = "DELETE FROM restrictions WHERE patient = $1";
const PUT_HOLD: &str = "INSERT INTO legal_holds (patient, since_micros) VALUES ($1, $2) \
     ON CONFLICT (patient) DO UPDATE SET since_micros = EXCLUDED.since_micros";
const DELETE_HOLD: &str = "DELETE FROM legal_holds WHERE patient = $1";
const PUT_GRANT: &str = "INSERT INTO grants (id, grant_json) VALUES ($1, $2) \
     ON CONFLICT (id) DO UPDATE SET grant_json = EXCLUDED.grant_json";
const PUT_ACTIVE_GRANT: &str = "INSERT INTO active_grants (subject, patient, grant_id, expires_micros) \
     VALUES ($1, $2, $3, $4) ON CONFLICT (subject, patient) \
     DO UPDATE SET grant_id = EXCLUDED.grant_id, expires_micros = EXCLUDED.expires_micros";
const PUT_TOMBSTONE: &str = "INSERT INTO tombstones (kind, id, tombstone_json) VALUES ($1, $2, $3) \
     ON CONFLICT (kind, id) DO UPDATE SET tombstone_json = EXCLUDED.tombstone_json";
const PUT_JOB: &str = "INSERT INTO jobs (name, state_json) VALUES ($1, $2) \
     ON CONFLICT (name) DO UPDATE SET state_json = EXCLUDED.state_json";
const DELETE_JOB: &str = "DELETE FROM jobs WHERE name = $1";
const PUT_IDEMPOTENCY: &str = "INSERT INTO idempotency_keys (key, kind, id) VALUES ($1, $2, $3)";
const ERASE_VERSIONS: &str = "DELETE FROM record_versions v USING records r \
     WHERE r.patient = $1 AND v.kind = r.kind AND v.id = r.id";
const ERASE_INDEX: &str = "DELETE FROM index_entries e USING records r \
     WHERE r.patient = $1 AND e.kind = r.kind AND e.id = r.id";
const ERASE_INDEX_SETS: &str = "DELETE FROM index_sets s USING records r \
     WHERE r.patient = $1 AND s.kind = r.kind AND s.id = r.id";
const ERASE_RECORDS: &str = "DELETE FROM records WHERE patient = $1";

/// The chain head as stored: sequence, hash, time of the newest entry, and
/// how many entries the Merkle tree's stored subtrees cover.
type ChainHead = (u64, [u8; 32], i64, u64);

async fn lock_head(tx: &deadpool_postgres::Transaction<'_>) -> Result<Option<ChainHead>, StorageError> {
    let row = tx.query_one(LOCK_HEAD, &[]).await.map_err(pg_error)?;
    let seq: Option<i64> = row.try_get(0).map_err(pg_error)?;
    if seq.is_none() {
        return Ok(None);
    }
    Ok(Some((
        u64_of(&row, 0)?,
        hash32(&row, 1)?,
        row.try_get::<_, Option<i64>>(2).map_err(pg_error)?.unwrap_or(0),
        u64_of(&row, 3)?,
    )))
}

/// Writes the genesis entry if the chain is empty (once per database, under
/// the head's lock); returns the chain's head.
pub(super) async fn ensure_genesis(store: &PgStore, genesis: &AuditEntry) -> Result<(u64, [u8; 32]), StorageError> {
    let mut client = store.client().await?;
    let tx = client.transaction().await.map_err(pg_error)?;
    if let Some((seq, hash, _, _)) = lock_head(&tx).await? {
        tx.rollback().await.map_err(pg_error)?;
        return Ok((seq, hash));
    }
    let bytes = genesis.encode().map_err(|e| StorageError::Unencodable(e.to_string()))?;
    let hash = crate::crypto::sha256(&bytes);
    tx.execute("SET LOCAL synchronous_commit = on", &[]).await.map_err(pg_error)?;
    tx.execute("INSERT INTO audit_entries (seq, entry, hash) VALUES (0, $1, $2)", &[&bytes, &hash.as_slice()])
        .await
        .map_err(pg_error)?;
    tx.execute(MOVE_HEAD, &[&0i64, &hash.as_slice(), &genesis.time_micros, &1i64]).await.map_err(pg_error)?;
    tx.commit().await.map_err(pg_error)?;
    Ok((0, hash))
}

/// The pipeline task: one transaction per batch, until every sequencer handle is gone.
pub(super) async fn run(store: PgStore, clock: Arc<dyn Clock>, queue: Queue, syncs: Arc<AtomicU64>) {
    // Unlike sled's, this pipeline never fails for good: a failed batch left
    // nothing behind in memory, and the next one starts from the database's head.
    let Queue { mut rx, head, .. } = queue;
    let mut key_state = KeyStateCache::default();
    let mut tree = TreeCache::default();
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        drain(&mut rx, &mut batch);
        let started = std::time::Instant::now();
        match commit_batch(&store, &batch, clock.now_micros(), &mut key_state, &mut tree).await {
            Ok((planned, committed, lock_wait)) => {
                if committed {
                    syncs.fetch_add(1, Ordering::Relaxed);
                }
                tracing::debug!(
                    batch = batch.len(),
                    commit_us = started.elapsed().as_micros(),
                    lock_wait_us = lock_wait.as_micros(),
                    "batch committed"
                );
                *head.lock().unwrap_or_else(|p| p.into_inner()) = planned.head;
                for (p, result) in batch.into_iter().zip(planned.results) {
                    if let Err(e) = &result {
                        tracing::error!(error = %e, "an audit entry could not be encoded; its call failed, nothing of it was written");
                    }
                    p.reply.send(result);
                }
            }
            Err(BatchError::Before(e)) => {
                tracing::error!(error = %e, "audit batch failed; nothing of it was committed");
                refuse(batch, "commit failed");
            }
            Err(BatchError::AtCommit(e)) => {
                tracing::error!(error = %e, "the database did not confirm a commit; its outcome is unknown");
                for p in batch {
                    p.reply.send(Err(StorageError::OutcomeUnknown));
                }
            }
        }
    }
}

enum BatchError {
    /// Nothing was committed.
    Before(StorageError),
    /// `COMMIT` was sent and no answer came.
    AtCommit(StorageError),
}

impl From<StorageError> for BatchError {
    fn from(e: StorageError) -> Self {
        BatchError::Before(e)
    }
}

/// The key state as this pipeline last saw it, and the chain head it was
/// current at. Nearly every commit checks the key state; as long as the head
/// under the lock is still the one this pipeline left (no other process
/// committed since), nothing in the database changed, so the key state need
/// not be fetched again.
#[derive(Default)]
struct KeyStateCache(Option<(u64, Option<StateValue>)>);

impl KeyStateCache {
    /// The cached key state, if it is current at head `seq`.
    fn at(&self, seq: u64) -> Option<Option<StateValue>> {
        self.0.as_ref().filter(|(s, _)| *s == seq).map(|(_, v)| v.clone())
    }
}

/// The Merkle tree's right edge as this pipeline last left it, and the head
/// it belongs to: loaded again (O(log n) rows) only after another process
/// committed.
#[derive(Default)]
struct TreeCache(Option<((u64, [u8; 32]), CompactRange)>);

/// One batch, one transaction. Returns the plan, whether anything was
/// committed, and how long taking the chain head's lock took.
async fn commit_batch(
    store: &PgStore,
    batch: &[Pending],
    now: i64,
    cache: &mut KeyStateCache,
    trees: &mut TreeCache,
) -> Result<(Planned, bool, std::time::Duration), BatchError> {
    let known = std::mem::take(cache);
    let known_tree = std::mem::take(trees);
    let mut client = store.pool.get().await.map_err(pool_error)?;
    let tx = client.transaction().await.map_err(pg_error)?;
    let locking = std::time::Instant::now();
    let head = lock_head(&tx).await?;
    let lock_wait = locking.elapsed();
    let Some((seq, hash, last_time, tree_size)) = head else {
        return Err(StorageError::Corrupt("the chain has no genesis entry").into());
    };
    if tree_size != seq + 1 {
        return Err(StorageError::Corrupt("the Merkle tree does not cover the chain").into());
    }
    let tree = match known_tree.0 {
        Some((at, tree)) if at == (seq, hash) => tree,
        _ => super::tree::compact_range(&tx, seq + 1).await?,
    };
    let key_state = StateKey::Job(JobName::KeyState);
    let mut keys = keys_read(batch);
    let cached = known.at(seq).filter(|_| keys.contains(&key_state));
    if cached.is_some() {
        keys.retain(|k| *k != key_state);
    }
    let mut snapshot = super::prefetch::fetch(&tx, keys).await?;
    if let Some(v) = cached {
        snapshot.known(key_state.clone(), v);
    }
    let stored_key_state = snapshot.value(&key_state).cloned();
    // Clocks of several processes disagree a little: an entry's time never
    // goes before the previous entry's.
    let planned = plan(&snapshot, batch, (seq, hash), &tree, now.max(last_time))?;
    // The key state once this batch commits: its last change of it, or as read.
    let mut after = stored_key_state;
    for c in &planned.commits {
        for ch in &c.changes {
            if let Change::Job { name: JobName::KeyState, value, .. } = ch {
                after = value.clone().map(StateValue::Bytes);
            }
        }
    }
    let read = snapshot.read(&key_state);
    if planned.commits.is_empty() {
        tx.rollback().await.map_err(pg_error)?;
        *trees = TreeCache(Some(((seq, hash), tree)));
        if read {
            *cache = KeyStateCache(Some((seq, after)));
        }
        return Ok((planned, false, lock_wait));
    }
    let mut ops = vec![op("SET LOCAL synchronous_commit = on", Vec::new())];
    ops.extend(batch_ops(&planned.commits));
    if !planned.nodes.is_empty() {
        let (levels, idx, hashes) = super::tree::node_columns(&planned.nodes);
        ops.push(op(super::tree::INSERT_NODES, vec![Box::new(levels), Box::new(idx), Box::new(hashes)]));
    }
    let time = planned.results.iter().flatten().map(|c| c.time_micros).max().unwrap_or(now);
    ops.push(op(
        MOVE_HEAD,
        vec![
            Box::new(i64_of(planned.head.0)),
            b(&planned.head.1),
            Box::new(time),
            Box::new(i64_of(planned.tree.size())),
        ],
    ));
    let mut statements = std::collections::HashMap::new();
    for o in &ops {
        if !statements.contains_key(o.sql) {
            statements.insert(o.sql, tx.prepare_cached(o.sql).await.map_err(pg_error)?);
        }
    }
    let params: Vec<Vec<&(dyn ToSql + Sync)>> =
        ops.iter().map(|o| o.params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect()).collect();
    // Sent together, executed in order.
    super::pipelined(ops.iter().zip(&params).map(|(o, p)| tx.execute(&statements[o.sql], p)).collect()).await?;
    tx.commit().await.map_err(|e| BatchError::AtCommit(pg_error(e)))?;
    if read {
        *cache = KeyStateCache(Some((planned.head.0, after)));
    }
    *trees = TreeCache(Some((planned.head, planned.tree.clone())));
    Ok((planned, true, lock_wait))
}

/// Every statement of a batch, in an order that gives the planned result:
/// all entries and their patient index at once, then each commit's changes
/// in sequence order.
fn batch_ops(commits: &[PlannedCommit]) -> Vec<Op> {
    let mut ops = Vec::new();
    let seqs: Vec<i64> = commits.iter().map(|c| i64_of(c.sequence)).collect();
    let entries: Vec<Vec<u8>> = commits.iter().map(|c| c.entry.clone()).collect();
    let hashes: Vec<Vec<u8>> = commits.iter().map(|c| c.hash.to_vec()).collect();
    ops.push(op(INSERT_ENTRIES, vec![Box::new(seqs), Box::new(entries), Box::new(hashes)]));
    let (mut patients, mut pseqs) = (Vec::<Vec<u8>>::new(), Vec::<i64>::new());
    for c in commits {
        for p in &c.patients {
            patients.push(p.to_vec());
            pseqs.push(i64_of(c.sequence));
        }
    }
    if !patients.is_empty() {
        ops.push(op(INSERT_AUDIT_PATIENTS, vec![Box::new(patients), Box::new(pseqs)]));
    }
    for c in commits {
        if let Some(w) = &c.write {
            write_ops(w, &mut ops);
        }
        for ch in &c.changes {
            change_ops(ch, &mut ops);
        }
    }
    ops
}

fn record_params(r: RecordRef) -> Vec<Param> {
    vec![Box::new(kind_tag(r.kind)), b(&r.id)]
}

/// Replaces a record's index entries with `keys`, touching only the rows
/// that change: the entries the new set lacks are deleted, the new ones
/// inserted (those already there are left alone), and the set's row is
/// rewritten only if it differs. An update that leaves its indexed fields
/// alone deletes and inserts no index row.
fn replace_index(record: RecordRef, keys: &[IndexKey], ops: &mut Vec<Op>) {
    let tags: Vec<i16> = keys.iter().map(|k| i16::from(k.tag)).collect();
    let macs: Vec<Vec<u8>> = keys.iter().map(|k| k.mac.to_vec()).collect();
    let patients: Vec<Vec<u8>> = keys.iter().map(|k| k.patient.to_vec()).collect();
    let mut params = record_params(record);
    params.push(Box::new(tags.clone()));
    params.push(Box::new(macs.clone()));
    params.push(Box::new(patients.clone()));
    ops.push(op(DELETE_INDEX_NOT_IN, params));
    if !keys.is_empty() {
        let kinds: Vec<i16> = keys.iter().map(|k| kind_tag(k.record.kind)).collect();
        let ids: Vec<Vec<u8>> = keys.iter().map(|k| k.record.id.to_vec()).collect();
        ops.push(op(
            INSERT_INDEX,
            vec![Box::new(tags), Box::new(macs), Box::new(patients), Box::new(kinds), Box::new(ids)],
        ));
    }
    let mut params = record_params(record);
    params.push(Box::new(encode_index_set(keys)));
    ops.push(op(PUT_INDEX_SET, params));
}

fn write_ops(w: &RecordWrite, ops: &mut Vec<Op>) {
    let version = w.expected_version + 1;
    let mut params = record_params(w.record);
    params.push(Box::new(i64_of(version)));
    params.push(b(&w.sealed));
    ops.push(op(INSERT_VERSION, params));
    if let Some(dek) = &w.new_dek {
        ops.push(op(PUT_DATA_KEY, vec![b(&w.patient_id), b(dek)]));
    }
    let head = Head { version, patient_id: w.patient_id };
    let mut params = record_params(w.record);
    params.push(Box::new(i64_of(head.version)));
    params.push(b(&head.patient_id));
    ops.push(op(PUT_HEAD, params));
    replace_index(w.record, &w.index_keys, ops);
}

fn change_ops(ch: &Change, ops: &mut Vec<Op>) {
    match ch {
        Change::Restriction { patient, since } => match since {
            Some(t) => ops.push(op(PUT_RESTRICTION, vec![b(patient), Box::new(*t)])),
            None => ops.push(op(DELETE_RESTRICTION, vec![b(patient)])),
        },
        Change::LegalHold { patient, since, .. } => match since {
            Some(t) => ops.push(op(PUT_HOLD, vec![b(patient), Box::new(*t)])),
            None => ops.push(op(DELETE_HOLD, vec![b(patient)])),
        },
        Change::Grant { id, value, .. } => ops.push(op(PUT_GRANT, vec![b(id), b(value)])),
        Change::ActiveGrant { subject, patient, grant, expires } => {
            ops.push(op(PUT_ACTIVE_GRANT, vec![b(subject), b(patient), b(grant), Box::new(*expires)]))
        }
        Change::Tombstone { record, value, .. } => {
            let mut params = record_params(*record);
            params.push(b(value));
            ops.push(op(PUT_TOMBSTONE, params));
        }
        Change::DataKey { patient, value, .. } => match value {
            Some(v) => ops.push(op(PUT_DATA_KEY, vec![b(patient), b(v)])),
            None => ops.push(op(DELETE_DATA_KEY, vec![b(patient)])),
        },
        Change::Reseal { record, version, value, .. } => {
            let mut params = record_params(*record);
            params.push(Box::new(i64_of(*version)));
            params.push(b(value));
            ops.push(op(RESEAL, params));
        }
        Change::IndexSet { record, keys, .. } => replace_index(*record, keys, ops),
        Change::Job { name, value, .. } => match value {
            Some(v) => ops.push(op(PUT_JOB, vec![Box::new(name.as_str().to_string()), b(v)])),
            None => ops.push(op(DELETE_JOB, vec![Box::new(name.as_str().to_string())])),
        },
        Change::IdempotencyKey { key, record } => {
            let mut params = vec![b(key)];
            params.extend(record_params(*record));
            ops.push(op(PUT_IDEMPOTENCY, params));
        }
        // Versions, index entries and index sets go through the records
        // table, so the records go last.
        Change::ErasePatient { patient, .. } => {
            for sql in [ERASE_VERSIONS, ERASE_INDEX, ERASE_INDEX_SETS, ERASE_RECORDS] {
                ops.push(op(sql, vec![b(patient)]));
            }
        }
        // A check only (planning dropped it).
        Change::KeyStateIs(_) => {}
    }
}
