//! carevault's PostgreSQL schema, created and migrated by carevault in
//! numbered migrations, each inside one transaction. README.md documents
//! the tables for independent readers.
//!
//! Concurrent processes migrating the same database take turns on a row
//! lock (`schema_migrations` row 0) rather than an advisory lock, so the
//! SQL stays portable; a database whose schema is newer than this binary
//! knows is refused.

use tokio_postgres::Client;

use super::pg_error;
use crate::storage::StorageError;

/// Every migration, in order: migration `i + 1` is `MIGRATIONS[i]`.
pub const MIGRATIONS: &[&str] = &[
    // 1: the chain, records, keys, index, access state and jobs.
    r#"
CREATE TABLE chain_head (
    id smallint PRIMARY KEY CHECK (id = 1),
    seq bigint,
    hash bytea,
    time_micros bigint
);
INSERT INTO chain_head (id) VALUES (1);

CREATE TABLE audit_entries (
    seq bigint PRIMARY KEY,
    entry bytea NOT NULL,
    hash bytea NOT NULL
);

CREATE TABLE audit_patients (
    patient bytea NOT NULL,
    seq bigint NOT NULL,
    PRIMARY KEY (patient, seq)
);

CREATE TABLE records (
    kind smallint NOT NULL,
    id bytea NOT NULL,
    version bigint NOT NULL,
    patient bytea NOT NULL,
    PRIMARY KEY (kind, id)
);
CREATE INDEX records_by_patient ON records (patient, kind, id);

CREATE TABLE record_versions (
    kind smallint NOT NULL,
    id bytea NOT NULL,
    version bigint NOT NULL,
    sealed bytea NOT NULL,
    PRIMARY KEY (kind, id, version)
);

CREATE TABLE data_keys (
    patient bytea PRIMARY KEY,
    wrapped bytea NOT NULL
);

CREATE TABLE index_entries (
    tag smallint NOT NULL,
    mac bytea NOT NULL,
    patient bytea NOT NULL,
    kind smallint NOT NULL,
    id bytea NOT NULL,
    PRIMARY KEY (tag, mac, patient, kind, id)
);
CREATE INDEX index_entries_by_record ON index_entries (kind, id);

CREATE TABLE index_sets (
    kind smallint NOT NULL,
    id bytea NOT NULL,
    keys bytea NOT NULL,
    PRIMARY KEY (kind, id)
);

CREATE TABLE restrictions (
    patient bytea PRIMARY KEY,
    since_micros bigint NOT NULL
);

CREATE TABLE legal_holds (
    patient bytea PRIMARY KEY,
    since_micros bigint NOT NULL
);

CREATE TABLE grants (
    id bytea PRIMARY KEY,
    grant_json bytea NOT NULL
);

CREATE TABLE active_grants (
    subject bytea NOT NULL,
    patient bytea NOT NULL,
    grant_id bytea NOT NULL,
    expires_micros bigint NOT NULL,
    PRIMARY KEY (subject, patient)
);

CREATE TABLE tombstones (
    kind smallint NOT NULL,
    id bytea NOT NULL,
    tombstone_json bytea NOT NULL,
    PRIMARY KEY (kind, id)
);

CREATE TABLE jobs (
    name text PRIMARY KEY,
    state_json bytea NOT NULL
);
"#,
    // 2: idempotency keys of creates.
    r#"
CREATE TABLE idempotency_keys (
    key bytea PRIMARY KEY,
    kind smallint NOT NULL,
    id bytea NOT NULL
);
"#,
    // 3: the Merkle tree's stored subtrees, signed checkpoints and their cosignatures.
    r#"
ALTER TABLE chain_head ADD COLUMN tree_size bigint NOT NULL DEFAULT 0;

CREATE TABLE audit_tree (
    level smallint NOT NULL,
    idx bigint NOT NULL,
    hash bytea NOT NULL,
    PRIMARY KEY (level, idx)
);

CREATE TABLE audit_checkpoints (
    size bigint PRIMARY KEY,
    note bytea NOT NULL,
    signed_micros bigint NOT NULL
);

CREATE TABLE audit_cosignatures (
    size bigint NOT NULL REFERENCES audit_checkpoints (size),
    witness text NOT NULL,
    key_id bytea NOT NULL,
    line text NOT NULL,
    added_micros bigint NOT NULL,
    PRIMARY KEY (size, witness, key_id)
);
"#,
];

/// The schema version this binary writes.
pub fn current() -> i32 {
    i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX)
}

const CREATE_MIGRATIONS: &str =
    "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, applied_at_micros bigint NOT NULL)";

/// Brings the database to [`current`], applying each missing migration in
/// its own transaction. Refuses a newer schema.
pub async fn migrate(client: &mut Client, now_micros: i64) -> Result<(), StorageError> {
    // Two processes creating the table at once can collide in the catalog;
    // the loser finds it there on its second try.
    if client.batch_execute(CREATE_MIGRATIONS).await.is_err() {
        client.batch_execute(CREATE_MIGRATIONS).await.map_err(pg_error)?;
    }
    client
        .execute(
            "INSERT INTO schema_migrations (version, applied_at_micros) VALUES (0, $1) ON CONFLICT (version) DO NOTHING",
            &[&now_micros],
        )
        .await
        .map_err(pg_error)?;
    loop {
        let tx = client.transaction().await.map_err(pg_error)?;
        // Row 0 is the migrators' lock: one at a time.
        tx.query_one("SELECT version FROM schema_migrations WHERE version = 0 FOR UPDATE", &[])
            .await
            .map_err(pg_error)?;
        let at: i32 = tx
            .query_one("SELECT coalesce(max(version), 0) FROM schema_migrations", &[])
            .await
            .map_err(pg_error)?
            .get(0);
        refuse_newer(at)?;
        if at == current() {
            tx.rollback().await.map_err(pg_error)?;
            return Ok(());
        }
        let next = at + 1;
        let sql = MIGRATIONS[usize::try_from(at).map_err(|_| StorageError::Corrupt("negative schema version"))?];
        tx.batch_execute(sql).await.map_err(pg_error)?;
        tx.execute("INSERT INTO schema_migrations (version, applied_at_micros) VALUES ($1, $2)", &[&next, &now_micros])
            .await
            .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)?;
        tracing::info!(version = next, "applied a schema migration");
    }
}

/// Checks, without changing anything, that the database holds carevault's
/// schema at the version this binary knows.
pub async fn check(client: &Client) -> Result<(), StorageError> {
    let exists: bool =
        client.query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[]).await.map_err(pg_error)?.get(0);
    if !exists {
        return Err(StorageError::NotInitialized);
    }
    let at: i32 = client
        .query_one("SELECT coalesce(max(version), 0) FROM schema_migrations", &[])
        .await
        .map_err(pg_error)?
        .get(0);
    refuse_newer(at)?;
    if at < current() {
        return Err(StorageError::SchemaTooOld { found: at, known: current() });
    }
    Ok(())
}

fn refuse_newer(at: i32) -> Result<(), StorageError> {
    if at > current() {
        return Err(StorageError::SchemaTooNew { found: at, known: current() });
    }
    Ok(())
}
