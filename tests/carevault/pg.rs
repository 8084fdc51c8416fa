//! The PostgreSQL test harness itself (see `tests/support/pg_cluster.rs`).

#[path = "../support/pg_cluster.rs"]
#[allow(dead_code)]
mod pg_cluster;

pub use pg_cluster::*;

#[tokio::test]
async fn a_throwaway_cluster_starts_takes_connections_and_commits_durably() {
    let Some(cluster) = PgCluster::start() else { return };
    let (client, conn) = tokio_postgres::connect(&cluster.url("postgres"), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let row = client.query_one("SHOW synchronous_commit", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "on");
    let row = client.query_one("SHOW fsync", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "on");
    client.batch_execute("CREATE DATABASE t").await.unwrap();
    let (db, conn) = tokio_postgres::connect(&cluster.url("t"), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    db.batch_execute("CREATE TABLE x (id bigint PRIMARY KEY, b bytea NOT NULL)").await.unwrap();
    db.execute("INSERT INTO x VALUES ($1, $2)", &[&1i64, &vec![0u8, 1, 2]]).await.unwrap();
    let row = db.query_one("SELECT b FROM x WHERE id = 1", &[]).await.unwrap();
    assert_eq!(row.get::<_, Vec<u8>>(0), vec![0u8, 1, 2]);
}
