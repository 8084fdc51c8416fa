//! The PostgreSQL engine: carevault's own tables (see [`schema`]) in one
//! database that several carevault processes may share.
//!
//! - [`schema`]: the tables and their numbered migrations;
//! - [`connect`]: the `postgres://` URL, TLS with rustls, the pool;
//! - [`pipeline`]: group commit: one transaction per batch, under the chain
//!   head's row lock, so every process appends to one gapless chain;
//! - [`prefetch`]: what planning a batch reads, fetched under that lock.
//!
//! Every value is bytes carevault already made safe (ciphertext, wrapped
//! keys, HMACs, UUIDs, audit entries without PHI), passed as parameters of
//! prepared statements: no statement text carries data.

pub mod connect;
mod pipeline;
mod prefetch;
pub mod schema;
#[cfg(test)]
mod tests;
mod tree;

use std::sync::Arc;

use deadpool_postgres::Pool;
use tokio_postgres::Row;

use super::model::{
    CoverageNow, CoveragesNow, Current, Footprint, Head, IndexKey, JobName, Keyed, RecordRef, StoredAuditEntry,
    StoredCheckpoint,
};
use super::sequencer::{self, Sequencer};
use super::{Backend, StorageError};
use crate::audit::AuditEntry;
use crate::clock::Clock;
use crate::crypto::RecordKind;

/// An opened carevault database on PostgreSQL.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
}

/// A PostgreSQL error as a storage error: its SQLSTATE and message (which
/// name tables and constraints, never values: values travel as parameters).
pub(crate) fn pg_error(e: tokio_postgres::Error) -> StorageError {
    match e.as_db_error() {
        Some(db) => StorageError::Io(format!("postgresql {}: {}", db.code().code(), db.message())),
        None => {
            // The cause says what went wrong (a refused connection, an
            // untrusted certificate): keep the whole chain.
            let mut text = format!("postgresql: {e}");
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                text.push_str(&format!(": {c}"));
                cause = c.source();
            }
            StorageError::Io(text)
        }
    }
}

fn pool_error(e: deadpool_postgres::PoolError) -> StorageError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg_error(e),
        other => StorageError::Io(format!("postgresql connection pool: {other}")),
    }
}

/// A 16-byte id from a column.
fn id16(row: &Row, col: usize) -> Result<[u8; 16], StorageError> {
    let b: &[u8] = row.try_get(col).map_err(pg_error)?;
    b.try_into().map_err(|_| StorageError::Corrupt("an id column is not 16 bytes"))
}

fn hash32(row: &Row, col: usize) -> Result<[u8; 32], StorageError> {
    let b: &[u8] = row.try_get(col).map_err(pg_error)?;
    b.try_into().map_err(|_| StorageError::Corrupt("a hash column is not 32 bytes"))
}

fn u64_of(row: &Row, col: usize) -> Result<u64, StorageError> {
    let v: i64 = row.try_get(col).map_err(pg_error)?;
    u64::try_from(v).map_err(|_| StorageError::Corrupt("a negative sequence or version"))
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn limit_of(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

fn kind_of(row: &Row, col: usize) -> Result<RecordKind, StorageError> {
    let k: i16 = row.try_get(col).map_err(pg_error)?;
    u8::try_from(k).ok().and_then(RecordKind::from_tag).ok_or(StorageError::Corrupt("unknown record kind"))
}

fn record_of(row: &Row, kind: usize, id: usize) -> Result<RecordRef, StorageError> {
    Ok(RecordRef { kind: kind_of(row, kind)?, id: id16(row, id)? })
}

pub(crate) fn kind_tag(kind: RecordKind) -> i16 {
    i16::from(kind.tag())
}

pub(crate) fn encode_index_set(keys: &[IndexKey]) -> Vec<u8> {
    IndexKey::encode_set(keys)
}

pub(crate) fn decode_index_set(b: &[u8]) -> Result<Vec<IndexKey>, StorageError> {
    IndexKey::decode_set(b)
}

impl PgStore {
    /// Connects to `url`, migrating the schema to this binary's (each
    /// migration in one transaction; a newer schema is refused).
    pub async fn open(url: &str, now_micros: i64) -> Result<PgStore, StorageError> {
        let store = PgStore { pool: connect::pool(url, false)? };
        let mut client = store.client().await?;
        schema::migrate(&mut client, now_micros).await?;
        Ok(store)
    }

    /// Connects to `url` without creating or changing anything: the schema
    /// must be there, at this binary's version (for offline tools that only read).
    pub async fn open_existing(url: &str) -> Result<PgStore, StorageError> {
        let store = PgStore { pool: connect::pool(url, false)? };
        schema::check(&*store.client().await?).await?;
        Ok(store)
    }

    /// [`PgStore::open_existing`] with every transaction read only
    /// (`default_transaction_read_only`): for `verify`, which must not write.
    pub async fn open_existing_read_only(url: &str) -> Result<PgStore, StorageError> {
        let store = PgStore { pool: connect::pool(url, true)? };
        schema::check(&*store.client().await?).await?;
        Ok(store)
    }

    /// Whether the database at `url` holds a carevault chain (read only;
    /// a database without the schema has none).
    pub async fn has_chain(url: &str) -> Result<bool, StorageError> {
        let store = PgStore { pool: connect::pool(url, false)? };
        let client = store.client().await?;
        let exists: bool =
            client.query_one("SELECT to_regclass('chain_head') IS NOT NULL", &[]).await.map_err(pg_error)?.get(0);
        if !exists {
            return Ok(false);
        }
        let row =
            client.query_one("SELECT seq IS NOT NULL FROM chain_head WHERE id = 1", &[]).await.map_err(pg_error)?;
        row.try_get(0).map_err(pg_error)
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, StorageError> {
        self.pool.get().await.map_err(pool_error)
    }

    async fn rows(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>, StorageError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(sql).await.map_err(pg_error)?;
        client.query(&stmt, params).await.map_err(pg_error)
    }

    async fn opt_row(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Option<Row>, StorageError> {
        Ok(self.rows(sql, params).await?.into_iter().next())
    }

    async fn bytes(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Option<Vec<u8>>, StorageError> {
        self.opt_row(sql, params).await?.map(|r| r.try_get(0).map_err(pg_error)).transpose()
    }

    async fn count(&self, sql: &str) -> Result<u64, StorageError> {
        let rows = self.rows(sql, &[]).await?;
        let row = rows.first().ok_or(StorageError::Corrupt("count returned no row"))?;
        u64_of(row, 0)
    }

    async fn keyed(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Keyed>, StorageError> {
        self.rows(sql, params).await?.iter().map(|r| Ok((id16(r, 0)?, r.try_get(1).map_err(pg_error)?))).collect()
    }

    /// Starts the commit pipeline, writing the genesis entry into an empty
    /// chain first (exactly once per database, whichever process gets there first).
    pub async fn start(&self, clock: Arc<dyn Clock>) -> Result<(Sequencer, tokio::task::JoinHandle<()>), StorageError> {
        let head = pipeline::ensure_genesis(self, &AuditEntry::genesis(clock.now_micros())).await?;
        tree::build(self).await?;
        let syncs = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (sequencer, queue) = sequencer::channel(head, syncs.clone());
        let task = tokio::spawn(pipeline::run(self.clone(), clock, queue, syncs));
        Ok((sequencer, task))
    }
}

const AFTER_ZERO: [u8; 16] = [0; 16];

/// The tables an erasure deletes rows from.
const VACUUM_ERASED: &str = "VACUUM records, record_versions, data_keys, index_entries, index_sets";

#[async_trait::async_trait]
impl Backend for PgStore {
    async fn head(&self, record: RecordRef) -> Result<Option<Head>, StorageError> {
        let row = self
            .opt_row(
                "SELECT version, patient FROM records WHERE kind = $1 AND id = $2",
                &[&kind_tag(record.kind), &record.id.as_slice()],
            )
            .await?;
        row.map(|r| Ok(Head { version: u64_of(&r, 0)?, patient_id: id16(&r, 1)? })).transpose()
    }

    async fn record_version(&self, record: RecordRef, version: u64) -> Result<Option<Vec<u8>>, StorageError> {
        self.bytes(
            "SELECT sealed FROM record_versions WHERE kind = $1 AND id = $2 AND version = $3",
            &[&kind_tag(record.kind), &record.id.as_slice(), &i64_of(version)],
        )
        .await
    }

    async fn current(&self, record: RecordRef) -> Result<Option<Current>, StorageError> {
        let row = self
            .opt_row(
                "SELECT r.version, r.patient, v.sealed, k.wrapped, x.since_micros FROM records r \
                 LEFT JOIN record_versions v ON v.kind = r.kind AND v.id = r.id AND v.version = r.version \
                 LEFT JOIN data_keys k ON k.patient = r.patient \
                 LEFT JOIN restrictions x ON x.patient = r.patient \
                 WHERE r.kind = $1 AND r.id = $2",
                &[&kind_tag(record.kind), &record.id.as_slice()],
            )
            .await?;
        row.map(|r| {
            Ok(Current {
                head: Head { version: u64_of(&r, 0)?, patient_id: id16(&r, 1)? },
                sealed: r.try_get(2).map_err(pg_error)?,
                wrapped_key: r.try_get(3).map_err(pg_error)?,
                restricted_since: r.try_get(4).map_err(pg_error)?,
            })
        })
        .transpose()
    }

    async fn versions(&self, record: RecordRef) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        self.rows(
            "SELECT version, sealed FROM record_versions WHERE kind = $1 AND id = $2 ORDER BY version",
            &[&kind_tag(record.kind), &record.id.as_slice()],
        )
        .await?
        .iter()
        .map(|r| Ok((u64_of(r, 0)?, r.try_get(1).map_err(pg_error)?)))
        .collect()
    }

    async fn heads_after(
        &self,
        kind: Option<RecordKind>,
        after: Option<RecordRef>,
        limit: usize,
    ) -> Result<Vec<(RecordRef, Head)>, StorageError> {
        // (kind, id) > (0, 0…0) is every record: kinds start at 1.
        let (after_kind, after_id) = after.map_or((0i16, AFTER_ZERO), |r| (kind_tag(r.kind), r.id));
        let only: Option<i16> = kind.map(kind_tag);
        let rows = self
            .rows(
                "SELECT kind, id, version, patient FROM records \
                 WHERE (kind, id) > ($1, $2) AND ($3::smallint IS NULL OR kind = $3) \
                 ORDER BY kind, id LIMIT $4",
                &[&after_kind, &after_id.as_slice(), &only, &limit_of(limit)],
            )
            .await?;
        rows.iter()
            .map(|r| Ok((record_of(r, 0, 1)?, Head { version: u64_of(r, 2)?, patient_id: id16(r, 3)? })))
            .collect()
    }

    async fn count_records(&self) -> Result<u64, StorageError> {
        self.count("SELECT count(*) FROM records").await
    }

    async fn coverages_of(&self, patient: [u8; 16]) -> Result<Vec<[u8; 16]>, StorageError> {
        self.rows(
            "SELECT id FROM records WHERE patient = $1 AND kind = $2 ORDER BY id",
            &[&patient.as_slice(), &kind_tag(RecordKind::Coverage)],
        )
        .await?
        .iter()
        .map(|r| id16(r, 0))
        .collect()
    }

    async fn coverages_now(&self, patient: [u8; 16]) -> Result<Option<CoveragesNow>, StorageError> {
        // One row per coverage (or one with a NULL coverage if there is
        // none), no row if the patient does not exist; one snapshot.
        let rows = self
            .rows(
                "SELECT p.version, k.wrapped, x.since_micros, c.id, c.version, v.sealed FROM records p \
                 LEFT JOIN data_keys k ON k.patient = p.id \
                 LEFT JOIN restrictions x ON x.patient = p.id \
                 LEFT JOIN records c ON c.patient = p.id AND c.kind = $3 \
                 LEFT JOIN record_versions v ON v.kind = c.kind AND v.id = c.id AND v.version = c.version \
                 WHERE p.kind = $1 AND p.id = $2 ORDER BY c.id",
                &[&kind_tag(RecordKind::Patient), &patient.as_slice(), &kind_tag(RecordKind::Coverage)],
            )
            .await?;
        let Some(first) = rows.first() else { return Ok(None) };
        let mut coverages = Vec::with_capacity(rows.len());
        for r in &rows {
            let id: Option<&[u8]> = r.try_get(3).map_err(pg_error)?;
            if id.is_some() {
                coverages.push(CoverageNow {
                    id: id16(r, 3)?,
                    version: u64_of(r, 4)?,
                    sealed: r.try_get(5).map_err(pg_error)?,
                });
            }
        }
        Ok(Some(CoveragesNow {
            patient,
            patient_version: u64_of(first, 0)?,
            wrapped_key: first.try_get(1).map_err(pg_error)?,
            restricted_since: first.try_get(2).map_err(pg_error)?,
            coverages,
        }))
    }

    async fn footprint(&self, patient: [u8; 16]) -> Result<Footprint, StorageError> {
        let coverages = u64::try_from(self.coverages_of(patient).await?.len()).unwrap_or(u64::MAX);
        let rows = self
            .rows(
                "SELECT count(*) FROM record_versions v JOIN records r ON r.kind = v.kind AND r.id = v.id \
                 WHERE r.patient = $1",
                &[&patient.as_slice()],
            )
            .await?;
        let record_versions = u64_of(rows.first().ok_or(StorageError::Corrupt("count returned no row"))?, 0)?;
        Ok(Footprint { coverages, record_versions })
    }

    async fn data_key(&self, patient: [u8; 16]) -> Result<Option<Vec<u8>>, StorageError> {
        self.bytes("SELECT wrapped FROM data_keys WHERE patient = $1", &[&patient.as_slice()]).await
    }

    async fn data_keys_after(&self, after: Option<[u8; 16]>, limit: usize) -> Result<Vec<Keyed>, StorageError> {
        let after: Vec<u8> = after.map(|a| a.to_vec()).unwrap_or_default();
        self.keyed(
            "SELECT patient, wrapped FROM data_keys WHERE patient > $1 ORDER BY patient LIMIT $2",
            &[&after, &limit_of(limit)],
        )
        .await
    }

    async fn count_data_keys(&self) -> Result<u64, StorageError> {
        self.count("SELECT count(*) FROM data_keys").await
    }

    async fn blind_lookup(&self, tag: u8, mac: [u8; 16], limit: usize) -> Result<Vec<[u8; 16]>, StorageError> {
        self.rows(
            "SELECT DISTINCT patient FROM index_entries WHERE tag = $1 AND mac = $2 ORDER BY patient LIMIT $3",
            &[&i16::from(tag), &mac.as_slice(), &limit_of(limit)],
        )
        .await?
        .iter()
        .map(|r| id16(r, 0))
        .collect()
    }

    async fn index_set(&self, record: RecordRef) -> Result<Option<Vec<IndexKey>>, StorageError> {
        self.bytes(
            "SELECT keys FROM index_sets WHERE kind = $1 AND id = $2",
            &[&kind_tag(record.kind), &record.id.as_slice()],
        )
        .await?
        .map(|b| decode_index_set(&b))
        .transpose()
    }

    async fn index_sets_after(
        &self,
        after: Option<RecordRef>,
        limit: usize,
    ) -> Result<Vec<(RecordRef, Vec<IndexKey>)>, StorageError> {
        let (after_kind, after_id) = after.map_or((0i16, AFTER_ZERO), |r| (kind_tag(r.kind), r.id));
        self.rows(
            "SELECT kind, id, keys FROM index_sets WHERE (kind, id) > ($1, $2) ORDER BY kind, id LIMIT $3",
            &[&after_kind, &after_id.as_slice(), &limit_of(limit)],
        )
        .await?
        .iter()
        .map(|r| Ok((record_of(r, 0, 1)?, decode_index_set(r.try_get(2).map_err(pg_error)?)?)))
        .collect()
    }

    async fn index_entries_per_slot(&self) -> Result<[u64; 2], StorageError> {
        let mut out = [0u64; 2];
        for r in self.rows("SELECT ((tag / 16) % 2)::smallint, count(*) FROM index_entries GROUP BY 1", &[]).await? {
            let slot: i16 = r.try_get(0).map_err(pg_error)?;
            if let Ok(slot) = usize::try_from(slot)
                && let Some(n) = out.get_mut(slot)
            {
                *n = u64_of(&r, 1)?;
            }
        }
        Ok(out)
    }

    async fn restricted_since(&self, patient: [u8; 16]) -> Result<Option<i64>, StorageError> {
        let row =
            self.opt_row("SELECT since_micros FROM restrictions WHERE patient = $1", &[&patient.as_slice()]).await?;
        row.map(|r| r.try_get(0).map_err(pg_error)).transpose()
    }

    async fn legal_hold_since(&self, patient: [u8; 16]) -> Result<Option<i64>, StorageError> {
        let row =
            self.opt_row("SELECT since_micros FROM legal_holds WHERE patient = $1", &[&patient.as_slice()]).await?;
        row.map(|r| r.try_get(0).map_err(pg_error)).transpose()
    }

    async fn grant(&self, id: [u8; 16]) -> Result<Option<Vec<u8>>, StorageError> {
        self.bytes("SELECT grant_json FROM grants WHERE id = $1", &[&id.as_slice()]).await
    }

    async fn grants_after(&self, after: Option<[u8; 16]>, limit: usize) -> Result<Vec<Keyed>, StorageError> {
        let after: Vec<u8> = after.map(|a| a.to_vec()).unwrap_or_default();
        self.keyed("SELECT id, grant_json FROM grants WHERE id > $1 ORDER BY id LIMIT $2", &[&after, &limit_of(limit)])
            .await
    }

    async fn active_grant(
        &self,
        subject: [u8; 32],
        patient: [u8; 16],
    ) -> Result<Option<([u8; 16], i64)>, StorageError> {
        let row = self
            .opt_row(
                "SELECT grant_id, expires_micros FROM active_grants WHERE subject = $1 AND patient = $2",
                &[&subject.as_slice(), &patient.as_slice()],
            )
            .await?;
        row.map(|r| Ok((id16(&r, 0)?, r.try_get(1).map_err(pg_error)?))).transpose()
    }

    async fn tombstone(&self, record: RecordRef) -> Result<Option<Vec<u8>>, StorageError> {
        self.bytes(
            "SELECT tombstone_json FROM tombstones WHERE kind = $1 AND id = $2",
            &[&kind_tag(record.kind), &record.id.as_slice()],
        )
        .await
    }

    async fn tombstones_after(
        &self,
        kind: RecordKind,
        after: Option<[u8; 16]>,
        limit: usize,
    ) -> Result<Vec<Keyed>, StorageError> {
        let after: Vec<u8> = after.map(|a| a.to_vec()).unwrap_or_default();
        self.keyed(
            "SELECT id, tombstone_json FROM tombstones WHERE kind = $1 AND id > $2 ORDER BY id LIMIT $3",
            &[&kind_tag(kind), &after, &limit_of(limit)],
        )
        .await
    }

    async fn idempotent(&self, key: [u8; 32]) -> Result<Option<RecordRef>, StorageError> {
        let row = self.opt_row("SELECT kind, id FROM idempotency_keys WHERE key = $1", &[&key.as_slice()]).await?;
        row.map(|r| record_of(&r, 0, 1)).transpose()
    }

    async fn job(&self, name: JobName) -> Result<Option<Vec<u8>>, StorageError> {
        self.bytes("SELECT state_json FROM jobs WHERE name = $1", &[&name.as_str()]).await
    }

    async fn checkpoint(&self, size: Option<u64>) -> Result<Option<StoredCheckpoint>, StorageError> {
        let client = self.client().await?;
        let rows = match size {
            Some(n) => client
                .query("SELECT size, note, signed_micros FROM audit_checkpoints WHERE size = $1", &[&i64_of(n)])
                .await
                .map_err(pg_error)?,
            None => client
                .query("SELECT size, note, signed_micros FROM audit_checkpoints ORDER BY size DESC LIMIT 1", &[])
                .await
                .map_err(pg_error)?,
        };
        Ok(tree::checkpoints_of(&client, rows).await?.into_iter().next())
    }
    async fn checkpoints_after(&self, after: Option<u64>, limit: usize) -> Result<Vec<StoredCheckpoint>, StorageError> {
        let client = self.client().await?;
        let after = after.map_or(-1, i64_of);
        let rows = client
            .query(
                "SELECT size, note, signed_micros FROM audit_checkpoints WHERE size > $1 ORDER BY size LIMIT $2",
                &[&after, &limit_of(limit)],
            )
            .await
            .map_err(pg_error)?;
        tree::checkpoints_of(&client, rows).await
    }
    async fn cosigned_checkpoints(
        &self,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<StoredCheckpoint>, StorageError> {
        let client = self.client().await?;
        let before = before.map_or(i64::MAX, i64_of);
        let rows = client
            .query(
                "SELECT size, note, signed_micros FROM audit_checkpoints c WHERE size < $1 \
                 AND EXISTS (SELECT 1 FROM audit_cosignatures s WHERE s.size = c.size) ORDER BY size DESC LIMIT $2",
                &[&before, &limit_of(limit)],
            )
            .await
            .map_err(pg_error)?;
        tree::checkpoints_of(&client, rows).await
    }
    async fn save_checkpoint(&self, size: u64, note: &[u8], signed_micros: i64) -> Result<bool, StorageError> {
        let client = self.client().await?;
        client.batch_execute("SET synchronous_commit = on").await.map_err(pg_error)?;
        let n = client
            .execute(
                "INSERT INTO audit_checkpoints (size, note, signed_micros) VALUES ($1, $2, $3) ON CONFLICT (size) DO NOTHING",
                &[&i64_of(size), &note, &signed_micros],
            )
            .await
            .map_err(pg_error)?;
        Ok(n == 1)
    }
    async fn save_cosignature(
        &self,
        size: u64,
        witness: &str,
        key_id: [u8; 4],
        line: &str,
        now_micros: i64,
    ) -> Result<(), StorageError> {
        let client = self.client().await?;
        client.batch_execute("SET synchronous_commit = on").await.map_err(pg_error)?;
        client
            .execute(
                "INSERT INTO audit_cosignatures (size, witness, key_id, line, added_micros) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (size, witness, key_id) DO UPDATE SET line = EXCLUDED.line, added_micros = EXCLUDED.added_micros",
                &[&i64_of(size), &witness, &key_id.as_slice(), &line, &now_micros],
            )
            .await
            .map_err(pg_error)?;
        Ok(())
    }
    async fn tree_size(&self) -> Result<u64, StorageError> {
        let row = self.opt_row("SELECT tree_size FROM chain_head WHERE id = 1", &[]).await?;
        row.map_or(Ok(0), |r| u64_of(&r, 0))
    }
    async fn tree_nodes(&self, ids: &[crate::audit::merkle::NodeId]) -> Result<Vec<Option<[u8; 32]>>, StorageError> {
        let client = self.client().await?;
        let found = tree::stored_nodes(&client, ids).await?;
        Ok(ids.iter().map(|id| found.get(id).copied()).collect())
    }
    async fn audit_head(&self) -> Result<Option<(u64, [u8; 32])>, StorageError> {
        let row = self.opt_row("SELECT seq, hash FROM chain_head WHERE id = 1 AND seq IS NOT NULL", &[]).await?;
        row.map(|r| Ok((u64_of(&r, 0)?, hash32(&r, 1)?))).transpose()
    }

    async fn audit_entries(&self, from: u64, to: u64, limit: usize) -> Result<Vec<StoredAuditEntry>, StorageError> {
        if from > to {
            return Ok(Vec::new());
        }
        self.rows(
            "SELECT seq, entry, hash FROM audit_entries WHERE seq >= $1 AND seq <= $2 ORDER BY seq LIMIT $3",
            &[&i64_of(from), &i64_of(to), &limit_of(limit)],
        )
        .await?
        .iter()
        .map(|r| {
            Ok(StoredAuditEntry {
                sequence: u64_of(r, 0)?,
                bytes: r.try_get(1).map_err(pg_error)?,
                hash: hash32(r, 2)?,
            })
        })
        .collect()
    }

    /// `VACUUM` of the tables an erasure deletes from, in the background: the
    /// dead rows' space becomes reusable (their bytes stay in the WAL, in
    /// base backups and on replicas; see README.md).
    async fn reclaim_erased(&self) {
        let store = self.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let result = match store.client().await {
                Ok(c) => c.batch_execute(VACUUM_ERASED).await.map_err(pg_error),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => tracing::info!(
                    took_ms = started.elapsed().as_millis(),
                    "vacuumed the tables an erasure deleted from"
                ),
                Err(e) => tracing::warn!(error = %e, "VACUUM after an erasure failed; autovacuum will get to it"),
            }
        });
    }

    fn erasure_caveat(&self) -> Option<&'static str> {
        Some(
            "PostgreSQL keeps the bytes of deleted rows in its write-ahead log, in base backups and on replicas, and in table pages until VACUUM (started now) lets them be overwritten; those rows hold only ciphertext and the wrapped data key, which no erasure-bucket key opens any more",
        )
    }

    async fn audit_seqs_for_patient(
        &self,
        patient: [u8; 16],
        from: u64,
        limit: usize,
    ) -> Result<Vec<u64>, StorageError> {
        self.rows(
            "SELECT seq FROM audit_patients WHERE patient = $1 AND seq >= $2 ORDER BY seq LIMIT $3",
            &[&patient.as_slice(), &i64_of(from), &limit_of(limit)],
        )
        .await?
        .iter()
        .map(|r| u64_of(r, 0))
        .collect()
    }
}

/// Runs `futures` (queries on one connection) pipelined: each is polled once
/// in order, which sends its request (tokio-postgres sends on first poll),
/// then all are awaited. So the server receives them in this order, executes
/// them in this order, and they cost one round trip together.
pub(crate) async fn pipelined<T, F>(futures: Vec<F>) -> Result<Vec<T>, StorageError>
where
    F: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
{
    let mut futures: Vec<_> = futures.into_iter().map(|f| Box::pin(futures_util::future::maybe_done(f))).collect();
    for f in &mut futures {
        let _ = futures_util::poll!(f.as_mut());
    }
    let mut out = Vec::with_capacity(futures.len());
    for mut f in futures {
        f.as_mut().await;
        match f.as_mut().take_output() {
            Some(r) => out.push(r.map_err(pg_error)?),
            None => return Err(StorageError::Io("a pipelined query lost its result".into())),
        }
    }
    Ok(out)
}
