//! What PostgreSQL holds and logs (the PostgreSQL suite only): with every
//! statement logged, and after a checkpoint, no PHI appears in the server's
//! statement log, the database's files or the WAL, neither as text nor as
//! the hex PostgreSQL logs `bytea` parameters in.

use crate::encryption::{PHI_NEEDLES, contains, files_under, store_every_kind_of_phi};
use crate::helpers::*;

#[tokio::test]
async fn no_phi_reaches_the_statement_log_the_tables_or_the_wal() {
    let tmp = tempfile::tempdir().unwrap();
    let (data_dir, key_dir) = (tmp.path().join("data"), tmp.path().join("keys"));
    let carevault::storage::Location::Postgres(url) = store_for(&data_dir) else { panic!("the PostgreSQL suite") };
    let admin = sql(&url).await;
    let db: String = admin.query_one("SELECT current_database()", &[]).await.unwrap().get(0);
    // Every statement carevault's sessions run is logged, with its parameters.
    admin.batch_execute(&format!("ALTER DATABASE \"{db}\" SET log_statement = 'all'")).await.unwrap();
    let s = TestServer::start_in(data_dir, key_dir, std::sync::Arc::new(carevault::clock::SystemClock)).await;
    store_every_kind_of_phi(&s).await;
    let _stopped = s.stop_keep().await;
    admin.batch_execute("CHECKPOINT").await.unwrap();
    let oid: u32 = admin.query_one("SELECT oid FROM pg_database WHERE datname = $1", &[&db]).await.unwrap().get(0);

    let cluster = crate::pg::shared().unwrap().dir().to_path_buf();
    let log = std::fs::read(cluster.join("server.log")).unwrap();
    assert!(contains(&log, b"INSERT INTO audit_entries"), "the statement log must hold carevault's statements");
    assert!(contains(&log, b"parameters: $1 = '\\x"), "and their parameters");
    let mut files = files_under(&cluster.join("data").join("base").join(oid.to_string()));
    let tables: Vec<u8> = files.iter().flat_map(|f| std::fs::read(f).unwrap_or_default()).collect();
    assert!(
        contains(&tables, b"carevault.audit.v"),
        "the search must reach the rows (audit entries are stored as they are)"
    );
    files.extend(files_under(&cluster.join("data").join("pg_wal")));
    files.push(cluster.join("server.log"));
    for f in &files {
        let Ok(bytes) = std::fs::read(f) else { continue };
        for n in PHI_NEEDLES {
            assert!(!contains(&bytes, n), "{} contains {}", f.display(), String::from_utf8_lossy(n));
            assert!(
                !contains(&bytes, hex::encode(n).as_bytes()),
                "{} contains hex of {}",
                f.display(),
                String::from_utf8_lossy(n)
            );
        }
    }
}

/// An erasure on PostgreSQL deletes the rows, says what PostgreSQL still
/// keeps of them, and VACUUMs the tables it deleted from.
#[tokio::test]
async fn an_erasure_deletes_the_rows_says_what_postgresql_keeps_and_vacuums() {
    let s = TestServer::start().await;
    let victim = create(&s, patient("Erasable", "Pat", "1961-01-01", "PG-ER-1")).await;
    let id = *uuid::Uuid::parse_str(&victim.id).unwrap().as_bytes();
    let r = carevault::proto::v1::ErasePatientRequest {
        patient_id: victim.id.clone(),
        reason: "patient request, ticket PG-1".into(),
    };
    let erased = carevault::proto::v1::key_service_client::KeyServiceClient::new(s.channel.clone())
        .erase_patient(req_for(r, &s.token("keyper", "key_admin"), None))
        .await
        .unwrap()
        .into_inner();
    assert!(erased.caveats.iter().any(|c| c.contains("write-ahead log")), "{:?}", erased.caveats);
    let carevault::storage::Location::Postgres(url) = store_for(&s.data_dir) else { panic!("the PostgreSQL suite") };
    let db = sql(&url).await;
    for table in ["records", "record_versions", "data_keys"] {
        let column = if table == "data_keys" { "patient" } else { "id" };
        let n: i64 = db
            .query_one(&format!("SELECT count(*) FROM {table} WHERE {column} = $1"), &[&id.as_slice()])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "{table} still holds the erased patient");
    }
    let vacuumed = eventually(|| async {
        let row = db
            .query_one("SELECT last_vacuum IS NOT NULL FROM pg_stat_user_tables WHERE relname = 'record_versions'", &[])
            .await
            .unwrap();
        row.get::<_, bool>(0).then_some(())
    })
    .await;
    assert!(vacuumed.is_some(), "record_versions was not vacuumed after the erasure");
}
