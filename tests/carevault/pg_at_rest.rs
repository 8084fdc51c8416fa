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
