//! What planning a batch reads, fetched in one pipelined round of queries
//! after the chain head's row lock is held (so no other process can change
//! it before the batch commits), and served to `plan` as a [`Snapshot`].
//!
//! Every key planning may read is listed by `sequencer::plan::keys_read`;
//! asking for one that was not fetched is an error, never a silent "absent".

use std::collections::{HashMap, HashSet};

use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::{decode_index_set, id16, kind_tag, pg_error, record_of, u64_of};
use crate::storage::StorageError;
use crate::storage::model::{Head, JobName, RecordRef};
use crate::storage::sequencer::plan::{Snapshot, StateKey, StateValue};

/// The values of the keys fetched; a fetched key without a value is absent.
pub(super) struct Fetched {
    fetched: HashSet<StateKey>,
    values: HashMap<StateKey, StateValue>,
}

impl Fetched {
    /// Adds a value known without asking the database (see `pipeline::KeyStateCache`).
    pub(super) fn known(&mut self, key: StateKey, value: Option<StateValue>) {
        if let Some(v) = value {
            self.values.insert(key.clone(), v);
        }
        self.fetched.insert(key);
    }

    /// Whether `key` was fetched (or known).
    pub(super) fn read(&self, key: &StateKey) -> bool {
        self.fetched.contains(key)
    }

    /// A fetched value (`None`: absent, or not fetched).
    pub(super) fn value(&self, key: &StateKey) -> Option<&StateValue> {
        self.values.get(key)
    }
}

impl Snapshot for Fetched {
    fn get(&self, key: &StateKey) -> Result<Option<StateValue>, StorageError> {
        if !self.fetched.contains(key) {
            return Err(StorageError::Corrupt("planning read a value that was not fetched under the lock"));
        }
        Ok(self.values.get(key).cloned())
    }
}

/// Which query fetches a key, and its parameters.
#[derive(Default)]
struct Wanted {
    heads: (Vec<i16>, Vec<Vec<u8>>),
    versions: (Vec<i16>, Vec<Vec<u8>>, Vec<i64>),
    index_sets: (Vec<i16>, Vec<Vec<u8>>),
    tombstones: (Vec<i16>, Vec<Vec<u8>>),
    data_keys: Vec<Vec<u8>>,
    grants: Vec<Vec<u8>>,
    holds: Vec<Vec<u8>>,
    coverages: Vec<Vec<u8>>,
    idempotency: Vec<Vec<u8>>,
    jobs: Vec<String>,
}

fn push_record(to: &mut (Vec<i16>, Vec<Vec<u8>>), r: &RecordRef) {
    to.0.push(kind_tag(r.kind));
    to.1.push(r.id.to_vec());
}

const HEADS: &str = "SELECT r.kind, r.id, r.version, r.patient FROM records r \
     JOIN UNNEST($1::smallint[], $2::bytea[]) AS k(kind, id) ON r.kind = k.kind AND r.id = k.id";
const VERSIONS: &str = "SELECT v.kind, v.id, v.version, v.sealed FROM record_versions v \
     JOIN UNNEST($1::smallint[], $2::bytea[], $3::bigint[]) AS k(kind, id, version) \
     ON v.kind = k.kind AND v.id = k.id AND v.version = k.version";
const INDEX_SETS: &str = "SELECT s.kind, s.id, s.keys FROM index_sets s \
     JOIN UNNEST($1::smallint[], $2::bytea[]) AS k(kind, id) ON s.kind = k.kind AND s.id = k.id";
const TOMBSTONES: &str = "SELECT t.kind, t.id, t.tombstone_json FROM tombstones t \
     JOIN UNNEST($1::smallint[], $2::bytea[]) AS k(kind, id) ON t.kind = k.kind AND t.id = k.id";
const DATA_KEYS: &str = "SELECT patient, wrapped FROM data_keys WHERE patient = ANY($1)";
const GRANTS: &str = "SELECT id, grant_json FROM grants WHERE id = ANY($1)";
const HOLDS: &str = "SELECT patient, since_micros FROM legal_holds WHERE patient = ANY($1)";
const COVERAGES: &str = "SELECT patient, id FROM records WHERE kind = 2 AND patient = ANY($1)";
const JOBS: &str = "SELECT name, state_json FROM jobs WHERE name = ANY($1)";
const IDEMPOTENCY: &str = "SELECT key, kind, id FROM idempotency_keys WHERE key = ANY($1)";

/// Fetches `keys` through `tx` (which holds the chain head's lock).
pub(super) async fn fetch(
    tx: &deadpool_postgres::Transaction<'_>,
    keys: Vec<StateKey>,
) -> Result<Fetched, StorageError> {
    let mut w = Wanted::default();
    for k in &keys {
        match k {
            StateKey::Head(r) => push_record(&mut w.heads, r),
            StateKey::Version(r, v) => {
                w.versions.0.push(kind_tag(r.kind));
                w.versions.1.push(r.id.to_vec());
                w.versions.2.push(super::i64_of(*v));
            }
            StateKey::IndexSet(r) => push_record(&mut w.index_sets, r),
            StateKey::Tombstone(r) => push_record(&mut w.tombstones, r),
            StateKey::DataKey(p) => w.data_keys.push(p.to_vec()),
            StateKey::Grant(id) => w.grants.push(id.to_vec()),
            StateKey::LegalHold(p) => w.holds.push(p.to_vec()),
            StateKey::Coverages(p) => w.coverages.push(p.to_vec()),
            StateKey::Job(name) => w.jobs.push(name.as_str().to_string()),
            StateKey::Idempotency(k) => w.idempotency.push(k.to_vec()),
        }
    }
    let mut queries: Vec<(&'static str, Vec<&(dyn ToSql + Sync)>)> = Vec::new();
    if !w.heads.0.is_empty() {
        queries.push((HEADS, vec![&w.heads.0, &w.heads.1]));
    }
    if !w.versions.0.is_empty() {
        queries.push((VERSIONS, vec![&w.versions.0, &w.versions.1, &w.versions.2]));
    }
    if !w.index_sets.0.is_empty() {
        queries.push((INDEX_SETS, vec![&w.index_sets.0, &w.index_sets.1]));
    }
    if !w.tombstones.0.is_empty() {
        queries.push((TOMBSTONES, vec![&w.tombstones.0, &w.tombstones.1]));
    }
    for (sql, list) in [
        (DATA_KEYS, &w.data_keys),
        (GRANTS, &w.grants),
        (HOLDS, &w.holds),
        (COVERAGES, &w.coverages),
        (IDEMPOTENCY, &w.idempotency),
    ] {
        if !list.is_empty() {
            queries.push((sql, vec![list]));
        }
    }
    if !w.jobs.is_empty() {
        queries.push((JOBS, vec![&w.jobs]));
    }
    let mut statements = Vec::with_capacity(queries.len());
    for (sql, _) in &queries {
        statements.push(tx.prepare_cached(sql).await.map_err(pg_error)?);
    }
    // Sent together, answered in order: one round trip for all of them.
    let results =
        super::pipelined(queries.iter().zip(&statements).map(|((_, params), stmt)| tx.query(stmt, params)).collect())
            .await?;
    let mut values = HashMap::new();
    let mut coverages: HashMap<[u8; 16], Vec<[u8; 16]>> = HashMap::new();
    for ((sql, _), rows) in queries.iter().zip(results) {
        for row in &rows {
            decode_row(sql, row, &mut values, &mut coverages)?;
        }
    }
    for (patient, mut ids) in coverages {
        ids.sort_unstable();
        values.insert(StateKey::Coverages(patient), StateValue::Ids(ids));
    }
    Ok(Fetched { fetched: keys.into_iter().collect(), values })
}

fn bytes(row: &Row, col: usize) -> Result<Vec<u8>, StorageError> {
    row.try_get(col).map_err(pg_error)
}

fn decode_row(
    sql: &str,
    row: &Row,
    values: &mut HashMap<StateKey, StateValue>,
    coverages: &mut HashMap<[u8; 16], Vec<[u8; 16]>>,
) -> Result<(), StorageError> {
    match sql {
        HEADS => {
            let head = Head { version: u64_of(row, 2)?, patient_id: id16(row, 3)? };
            values.insert(StateKey::Head(record_of(row, 0, 1)?), StateValue::Head(head));
        }
        VERSIONS => {
            let key = StateKey::Version(record_of(row, 0, 1)?, u64_of(row, 2)?);
            values.insert(key, StateValue::Bytes(bytes(row, 3)?));
        }
        INDEX_SETS => {
            let keys = decode_index_set(&bytes(row, 2)?)?;
            values.insert(StateKey::IndexSet(record_of(row, 0, 1)?), StateValue::Index(keys));
        }
        TOMBSTONES => {
            values.insert(StateKey::Tombstone(record_of(row, 0, 1)?), StateValue::Bytes(bytes(row, 2)?));
        }
        DATA_KEYS => {
            values.insert(StateKey::DataKey(id16(row, 0)?), StateValue::Bytes(bytes(row, 1)?));
        }
        GRANTS => {
            values.insert(StateKey::Grant(id16(row, 0)?), StateValue::Bytes(bytes(row, 1)?));
        }
        HOLDS => {
            let since: i64 = row.try_get(1).map_err(pg_error)?;
            values.insert(StateKey::LegalHold(id16(row, 0)?), StateValue::Micros(since));
        }
        COVERAGES => coverages.entry(id16(row, 0)?).or_default().push(id16(row, 1)?),
        IDEMPOTENCY => {
            let key: &[u8] = row.try_get(0).map_err(pg_error)?;
            let key = key.try_into().map_err(|_| StorageError::Corrupt("an idempotency key is not 32 bytes"))?;
            values.insert(StateKey::Idempotency(key), StateValue::Record(record_of(row, 1, 2)?));
        }
        JOBS => {
            let name: &str = row.try_get(0).map_err(pg_error)?;
            let job = JobName::ALL
                .into_iter()
                .find(|j| j.as_str() == name)
                .ok_or(StorageError::Corrupt("unknown job name"))?;
            values.insert(StateKey::Job(job), StateValue::Bytes(bytes(row, 1)?));
        }
        _ => return Err(StorageError::Corrupt("unknown prefetch query")),
    }
    Ok(())
}
