//! The Merkle tree's stored subtrees on PostgreSQL (see `storage::tree`):
//! table `audit_tree`, one row per stored subtree, inserted in the batch
//! transaction that commits the entries completing it; `chain_head.tree_size`
//! is the number of entries they cover, moved with the head.
//!
//! A database migrated from schema 2 has entries and no subtrees:
//! [`build`] adds them once, under the head's row lock, when a server starts.

use std::collections::HashMap;

use deadpool_postgres::GenericClient;

use super::{PgStore, hash32, i64_of, pg_error, u64_of};
use crate::audit::merkle::{self, CompactRange, Hash, NodeId};
use crate::storage::StorageError;
use crate::storage::tree;

/// Inserts stored subtrees.
pub(super) const INSERT_NODES: &str =
    "INSERT INTO audit_tree (level, idx, hash) SELECT * FROM UNNEST($1::smallint[], $2::bigint[], $3::bytea[])";

const SELECT_NODES: &str = "SELECT t.level, t.idx, t.hash FROM audit_tree t \
     JOIN UNNEST($1::smallint[], $2::bigint[]) AS w(level, idx) ON t.level = w.level AND t.idx = w.idx";

/// Entries to rebuild from, per statement.
const BUILD_PAGE: i64 = 10_000;

/// The columns of [`INSERT_NODES`] for `nodes`.
pub(super) fn node_columns(nodes: &[(NodeId, Hash)]) -> (Vec<i16>, Vec<i64>, Vec<Vec<u8>>) {
    let levels = nodes.iter().map(|(id, _)| i16::from(id.level)).collect();
    let idx = nodes.iter().map(|(id, _)| i64_of(id.index)).collect();
    let hashes = nodes.iter().map(|(_, h)| h.to_vec()).collect();
    (levels, idx, hashes)
}

/// Stored subtree hashes of `ids` (those stored), through `c`.
pub(super) async fn stored_nodes(
    c: &impl GenericClient,
    ids: &[NodeId],
) -> Result<HashMap<NodeId, Hash>, StorageError> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let levels: Vec<i16> = ids.iter().map(|id| i16::from(id.level)).collect();
    let idx: Vec<i64> = ids.iter().map(|id| i64_of(id.index)).collect();
    let rows = c.query(SELECT_NODES, &[&levels, &idx]).await.map_err(pg_error)?;
    let mut out = HashMap::with_capacity(rows.len());
    for r in rows {
        let level: i16 = r.try_get(0).map_err(pg_error)?;
        let id = NodeId {
            level: u8::try_from(level).map_err(|_| StorageError::Corrupt("bad Merkle node level"))?,
            index: u64_of(&r, 1)?,
        };
        out.insert(id, hash32(&r, 2)?);
    }
    Ok(out)
}

/// The hashes of `ids`, through `c` (a pooled client or a batch's transaction).
pub(super) async fn read_nodes(c: &impl GenericClient, ids: &[NodeId]) -> Result<HashMap<NodeId, Hash>, StorageError> {
    let want = tree::fetch(ids);
    let nodes = stored_nodes(c, &want.nodes).await?;
    let mut leaves = HashMap::new();
    for r in &want.leaves {
        let rows = c
            .query(
                "SELECT seq, entry FROM audit_entries WHERE seq >= $1 AND seq < $2",
                &[&i64_of(r.start), &i64_of(r.end)],
            )
            .await
            .map_err(pg_error)?;
        for row in rows {
            let entry: Vec<u8> = row.try_get(1).map_err(pg_error)?;
            leaves.insert(u64_of(&row, 0)?, merkle::leaf_hash(&entry));
        }
    }
    tree::resolve(ids, &nodes, &leaves)
}

/// The tree's right edge at `size` leaves, through `c`.
pub(super) async fn compact_range(c: &impl GenericClient, size: u64) -> Result<CompactRange, StorageError> {
    let peaks = merkle::range_nodes(0..size);
    tree::compact_range(size, &read_nodes(c, &peaks).await?)
}

/// Adds the subtrees of entries the tree does not cover yet (a database
/// from before the tree), in one transaction under the head's row lock.
pub(super) async fn build(store: &PgStore) -> Result<(), StorageError> {
    let mut client = store.client().await?;
    let tx = client.transaction().await.map_err(pg_error)?;
    let row =
        tx.query_one("SELECT seq, tree_size FROM chain_head WHERE id = 1 FOR UPDATE", &[]).await.map_err(pg_error)?;
    let seq: Option<i64> = row.try_get(0).map_err(pg_error)?;
    let size = seq.map_or(0, |s| s as u64 + 1);
    let covered = u64_of(&row, 1)?;
    if covered >= size {
        tx.rollback().await.map_err(pg_error)?;
        return Ok(());
    }
    // The subtrees stored are exactly those of the first `covered` entries
    // (they commit together), so the tree goes on from there.
    let mut range = compact_range(&tx, covered).await?;
    while range.size() < size {
        let rows = tx
            .query(
                "SELECT seq, entry FROM audit_entries WHERE seq >= $1 ORDER BY seq LIMIT $2",
                &[&i64_of(range.size()), &BUILD_PAGE],
            )
            .await
            .map_err(pg_error)?;
        if rows.is_empty() {
            return Err(StorageError::Corrupt("audit entries missing under the Merkle tree"));
        }
        let mut nodes = Vec::new();
        for row in rows {
            if u64_of(&row, 0)? != range.size() {
                return Err(StorageError::Corrupt("audit entries missing under the Merkle tree"));
            }
            let entry: Vec<u8> = row.try_get(1).map_err(pg_error)?;
            range.append_with(merkle::leaf_hash(&entry), |id, h| {
                if tree::stored(id) {
                    nodes.push((id, h));
                }
            });
        }
        let (levels, idx, hashes) = node_columns(&nodes);
        tx.execute(INSERT_NODES, &[&levels, &idx, &hashes]).await.map_err(pg_error)?;
    }
    tx.execute("UPDATE chain_head SET tree_size = $1 WHERE id = 1", &[&i64_of(size)]).await.map_err(pg_error)?;
    tx.commit().await.map_err(pg_error)?;
    tracing::info!(entries = size - covered, "built the Merkle tree over the audit entries");
    Ok(())
}

/// The checkpoints (with their cosignatures) of `rows` (size, note, signed_micros).
pub(super) async fn checkpoints_of(
    c: &impl GenericClient,
    rows: Vec<tokio_postgres::Row>,
) -> Result<Vec<crate::storage::StoredCheckpoint>, StorageError> {
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let size = u64_of(&r, 0)?;
        let cosignatures = c
            .query("SELECT line FROM audit_cosignatures WHERE size = $1 ORDER BY witness, key_id", &[&i64_of(size)])
            .await
            .map_err(pg_error)?
            .iter()
            .map(|row| row.try_get::<_, String>(0).map_err(pg_error))
            .collect::<Result<Vec<_>, _>>()?;
        out.push(crate::storage::StoredCheckpoint {
            size,
            note: r.try_get(1).map_err(pg_error)?,
            signed_micros: r.try_get(2).map_err(pg_error)?,
            cosignatures,
        });
    }
    Ok(out)
}
