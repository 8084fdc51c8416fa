//! The PostgreSQL engine through the conformance suite (a database of its
//! own per case on one throwaway cluster), and what only this engine has:
//! migrations, several processes' pipelines on one chain, the prefetch rule.

use std::sync::Arc;

use super::PgStore;
use crate::clock::FixedClock;
use crate::storage::conformance::{self as suite, write};
use crate::storage::{Commit, CommitOutcome, Recovery, StorageError, Store};

#[path = "../../../tests/support/pg_cluster.rs"]
#[allow(dead_code)]
mod pg_cluster;

/// A fresh database's URL, or `None` where PostgreSQL is not installed (outside CI).
fn database() -> Option<String> {
    pg_cluster::shared().map(|c| c.fresh_database())
}

async fn open(url: &str) -> (Store, tokio::task::JoinHandle<()>) {
    let pg = PgStore::open(url, 1_000).await.unwrap();
    let (sequencer, task) = pg.start(Arc::new(FixedClock::new(1_000))).await.unwrap();
    (Store::new(Arc::new(pg), sequencer, Recovery::default()), task)
}

async fn stop(store: Store, task: tokio::task::JoinHandle<()>) {
    drop(store);
    task.await.unwrap();
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            let Some(url) = database() else { return };
            let (store, task) = open(&url).await;
            suite::$case(&store).await;
            stop(store, task).await;
        }
    )*};
}

suite::every_case!(conformance);

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(6))]

    #[test]
    fn writes_match_a_version_model_and_every_attempt_is_audited(
        ops in proptest::collection::vec((0u8..4, 0u64..4), 1..40)
    ) {
        let Some(url) = database() else { return Ok(()) };
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let result = rt.block_on(async {
            let (store, task) = open(&url).await;
            let result = suite::writes_match_a_version_model(&store, &ops).await;
            stop(store, task).await;
            result
        });
        proptest::prop_assert_eq!(result, Ok(()));
    }
}

/// Two pipelines (as two processes would run them) on one database append
/// to one gapless chain, and of two writes of the same version exactly one wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pipelines_on_one_database_make_one_gapless_chain() {
    let Some(url) = database() else { return };
    let (a, ta) = open(&url).await;
    let (b, tb) = open(&url).await;
    let created = a.commit(Commit { write: Some(write(1, 0)), ..Commit::entry(suite::entry("patient.create")) }).await;
    assert_eq!(created.unwrap().outcome, CommitOutcome::Written);
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let s = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move { s.commit(Commit::entry(suite::entry("patient.read"))).await.unwrap().sequence })
        })
        .collect();
    // Both race to write version 2 of the same record.
    let race = [a.clone(), b.clone()].map(|s| {
        tokio::spawn(async move {
            s.commit(Commit { write: Some(write(1, 1)), ..Commit::entry(suite::entry("patient.update")) })
                .await
                .unwrap()
        })
    });
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap());
    }
    let mut outcomes = Vec::new();
    for t in race {
        let c = t.await.unwrap();
        seqs.push(c.sequence);
        outcomes.push(c.outcome);
    }
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), 202, "every commit got its own sequence");
    assert_eq!(outcomes.iter().filter(|o| **o == CommitOutcome::Written).count(), 1, "{outcomes:?}");
    assert!(outcomes.contains(&CommitOutcome::Conflict { current: 2 }), "{outcomes:?}");
    assert_eq!(a.head(crate::storage::RecordRef::patient([1; 16])).await.unwrap().unwrap().version, 2);
    let head = b.audit_head().await.unwrap().unwrap().0;
    let entries = b.audit_entries(0, head, 10_000).await.unwrap();
    assert_eq!(entries.len() as u64, head + 1);
    let report = crate::audit::verify_chain(entries.into_iter().map(|e| e.raw()).collect::<Vec<_>>(), None);
    assert!(report.is_ok(), "{report:?}");
    stop(a, ta).await;
    stop(b, tb).await;
}

/// Opening again finds the schema in place; a newer schema is refused; a
/// database without carevault's schema is not one to read.
#[tokio::test]
async fn migrations_apply_once_and_a_newer_schema_is_refused() {
    let Some(url) = database() else { return };
    assert!(matches!(PgStore::open_existing(&url).await, Err(StorageError::NotInitialized)));
    let (store, task) = open(&url).await;
    stop(store, task).await;
    let again = PgStore::open(&url, 2_000).await.unwrap();
    let client = again.client().await.unwrap();
    let versions: Vec<i32> = client
        .query("SELECT version FROM schema_migrations WHERE version > 0 ORDER BY version", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, (1..=super::schema::current()).collect::<Vec<_>>());
    PgStore::open_existing(&url).await.unwrap();
    client
        .execute(
            "INSERT INTO schema_migrations (version, applied_at_micros) VALUES ($1, 0)",
            &[&(super::schema::current() + 1)],
        )
        .await
        .unwrap();
    for result in [PgStore::open(&url, 3_000).await.err(), PgStore::open_existing(&url).await.err()] {
        let e = result.expect("a newer schema is refused");
        assert!(matches!(e, StorageError::SchemaTooNew { .. }), "{e}");
        assert!(e.to_string().contains("upgrade carevault"), "{e}");
    }
}

/// Every genesis race ends with one genesis entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_starting_together_write_one_genesis() {
    let Some(url) = database() else { return };
    let opened = futures_util::future::join_all((0..4).map(|_| {
        let url = url.clone();
        tokio::spawn(async move { open(&url).await })
    }))
    .await;
    let stores: Vec<_> = opened.into_iter().map(|r| r.unwrap()).collect();
    let entries = stores[0].0.audit_entries(0, u64::MAX >> 1, 10).await.unwrap();
    assert_eq!(entries.len(), 1, "one genesis entry");
    for (s, t) in stores {
        stop(s, t).await;
    }
}

/// TLS to the database with rustls: the server's certificate must chain to
/// `sslrootcert`; the session is encrypted; a certificate from another CA is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_database_verifies_the_server_certificate() {
    let certs = tempfile::tempdir().unwrap();
    crate::auth::tls::write_dev_certs(certs.path()).unwrap();
    let files = |name: &str| certs.path().join(name);
    use crate::auth::tls::dev_files;
    let Some(cluster) =
        pg_cluster::PgCluster::start_with_tls(&files(dev_files::SERVER_CERT), &files(dev_files::SERVER_KEY))
    else {
        return;
    };
    let base = format!("postgres://{}@localhost:{}/postgres", pg_cluster::SUPERUSER, cluster.port);
    let ca = files(dev_files::CA_CERT);
    let url = format!("{base}?sslmode=verify-full&sslrootcert={}", ca.display());
    let store = PgStore::open(&url, 1_000).await.unwrap();
    let client = store.client().await.unwrap();
    let ssl: bool =
        client.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await.unwrap().get(0);
    assert!(ssl, "the session is encrypted");
    // Another CA's root: the server's certificate does not chain to it.
    let other = tempfile::tempdir().unwrap();
    crate::auth::tls::write_dev_certs(other.path()).unwrap();
    let wrong = format!("{base}?sslmode=require&sslrootcert={}", other.path().join(dev_files::CA_CERT).display());
    let e = PgStore::open(&wrong, 1_000).await.err().expect("a certificate from another CA is refused");
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
}

/// `pool_max_conns` bounds the connections; with a single one, commits and
/// reads take turns on it and all complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_pooled_connection_serves_concurrent_commits_and_reads() {
    let Some(url) = database() else { return };
    let (store, task) = open(&format!("{url}?pool_max_conns=1")).await;
    suite::concurrent_commits_are_gapless_and_share_syncs(&store).await;
    let reads: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.audit_head().await.unwrap() })
        })
        .collect();
    for r in reads {
        assert!(r.await.unwrap().is_some());
    }
    stop(store, task).await;
}

/// A pipeline that last saw the key state takes a commit by another
/// process's pipeline into account: the check fails once the other changed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_state_changed_by_another_pipeline_is_seen_at_the_next_commit() {
    use crate::storage::model::{Change, Expect, JobName};
    let Some(url) = database() else { return };
    let (a, task_a) = open(&url).await;
    let (b, task_b) = open(&url).await;
    let commit = |s: &Store, changes: Vec<Change>| {
        let s = s.clone();
        async move { s.commit(Commit { entry: suite::entry("keys.test"), write: None, changes }).await.unwrap().outcome }
    };
    let set = |v: &[u8], expect| Change::Job { name: JobName::KeyState, value: Some(v.to_vec()), expect };
    let is = |v: &[u8]| Change::KeyStateIs(v.to_vec());
    assert_eq!(commit(&a, vec![set(b"k1", Expect::Absent)]).await, CommitOutcome::Written);
    // A has seen k1 (its own change) and checks against it without reading it again.
    assert_eq!(commit(&a, vec![is(b"k1")]).await, CommitOutcome::Written);
    assert_eq!(commit(&a, vec![is(b"k1")]).await, CommitOutcome::Written);
    // B moves it; A's next check sees that.
    assert_eq!(commit(&b, vec![is(b"k1"), set(b"k2", Expect::Equal(b"k1".to_vec()))]).await, CommitOutcome::Written);
    assert_eq!(commit(&a, vec![is(b"k1")]).await, CommitOutcome::KeyStateMoved);
    assert_eq!(commit(&a, vec![is(b"k2")]).await, CommitOutcome::Written);
    // A batch with nothing to check leaves the next one to read it again, and right.
    assert_eq!(commit(&a, vec![]).await, CommitOutcome::Written);
    assert_eq!(commit(&b, vec![set(b"k3", Expect::Equal(b"k2".to_vec()))]).await, CommitOutcome::Written);
    assert_eq!(commit(&a, vec![is(b"k2")]).await, CommitOutcome::KeyStateMoved);
    stop(a, task_a).await;
    stop(b, task_b).await;
}

/// A database from before the tree (entries, no subtrees) gets them when a
/// server starts; two pipelines then grow one tree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_merkle_tree_is_built_for_a_chain_from_before_it() {
    use crate::audit::merkle;
    let Some(url) = database() else { return };
    let (store, task) = open(&url).await;
    for _ in 0..70 {
        store.commit(Commit::entry(suite::entry("patient.read"))).await.unwrap();
    }
    stop(store, task).await;
    let pg = PgStore::open(&url, 2_000).await.unwrap();
    let client = pg.client().await.unwrap();
    client.batch_execute("DELETE FROM audit_tree; UPDATE chain_head SET tree_size = 0").await.unwrap();
    drop(client);
    let (a, ta) = open(&url).await;
    let (b, tb) = open(&url).await;
    assert_eq!(a.tree_size().await.unwrap(), 71);
    for i in 0..30 {
        let s = if i % 2 == 0 { &a } else { &b };
        s.commit(Commit::entry(suite::entry("patient.read"))).await.unwrap();
    }
    let entries = a.audit_entries(0, 100, 1000).await.unwrap();
    let leaves: Vec<_> = entries.iter().map(|e| merkle::leaf_hash(&e.bytes)).collect();
    assert_eq!(leaves.len(), 101);
    for size in [71, 101] {
        assert_eq!(crate::storage::tree::root(&*b, size).await.unwrap(), merkle::root(&leaves[..size as usize]));
    }
    stop(a, ta).await;
    stop(b, tb).await;
}
