//! Durability, proven: a server child process under concurrent creates,
//! updates and reads is killed with SIGKILL at a random moment. After
//! restart, everything acknowledged is there, every acknowledged read has its
//! audit entry, no record exists without its audit entry, and the chain verifies.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use carevault::clock::SystemClock;
use carevault::crypto::RecordKind;
use carevault::proto::v1 as pb;
use carevault::proto::v1::patient_service_client::PatientServiceClient;
use tonic::transport::Channel;

use crate::helpers::*;

async fn load(addr: String, token: String, acked: Arc<Mutex<Acked>>, worker: usize, stop: Instant) {
    let Ok(channel) = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await else { return };
    let mut c = PatientServiceClient::new(channel);
    let mut mine: Vec<pb::Patient> = Vec::new();
    let mut n = 0usize;
    while Instant::now() < stop {
        n += 1;
        let result: Result<(), tonic::Status> = async {
            match n % 4 {
                0 | 1 if !mine.is_empty() => {
                    let p = &mine[n % mine.len()];
                    let rid = format!("w{worker}-r{n}");
                    let mut r = req(pb::GetPatientRequest { patient_id: p.id.clone() }, &token);
                    r.metadata_mut().insert("x-request-id", rid.parse().unwrap());
                    c.get_patient(r).await?;
                    acked.lock().unwrap().reads.insert(rid);
                }
                2 if !mine.is_empty() => {
                    let i = n % mine.len();
                    let mut p = mine[i].clone();
                    p.preferred_language = if p.preferred_language == "en" { "es".into() } else { "en".into() };
                    let updated = c.update_patient(req(pb::UpdatePatientRequest { patient: Some(p) }, &token)).await?;
                    let updated = updated.into_inner().patient.unwrap();
                    acked.lock().unwrap().versions.insert(updated.id.clone(), u64::try_from(updated.version).unwrap());
                    mine[i] = updated;
                }
                _ => {
                    let p = patient("Crash", &format!("W{worker}N{n}"), "1980", &format!("CR-{worker}-{n}"));
                    let created = c.create_patient(req(pb::CreatePatientRequest { patient: Some(p) }, &token)).await?;
                    let created = created.into_inner().patient.unwrap();
                    acked.lock().unwrap().versions.insert(created.id.clone(), 1);
                    mine.push(created);
                }
            }
            Ok(())
        }
        .await;
        if result.is_err() {
            return; // the server died
        }
    }
}

/// Reads the log's newest checkpoint over and over, keeping every note seen.
async fn watch_checkpoints(addr: String, token: String, seen: Arc<Mutex<Vec<String>>>, stop: Instant) {
    let Ok(channel) = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await else { return };
    let mut c = carevault::proto::v1::audit_service_client::AuditServiceClient::new(channel);
    while Instant::now() < stop {
        match c.get_checkpoint(req(pb::GetCheckpointRequest { tree_size: 0, cosigned: false }, &token)).await {
            Ok(r) => seen.lock().unwrap().extend(r.into_inner().checkpoint.map(|c| c.note)),
            Err(_) => return, // the server died
        }
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
}

/// Every checkpoint anyone saw, and every one stored, names the root the
/// recovered log has at its size (a checkpoint is durable before it is
/// seen, and never signs what a crash could take back).
async fn checkpoints_hold(
    store: &dyn carevault::storage::Backend,
    entries: &[carevault::storage::StoredAuditEntry],
    seen: &[String],
    log_key: &carevault::audit::note::Verifier,
) -> usize {
    use carevault::audit::{merkle, note};
    let leaves: Vec<merkle::Hash> = entries.iter().map(|e| merkle::leaf_hash(&e.bytes)).collect();
    let mut notes: Vec<String> = seen.to_vec();
    let mut after = None;
    loop {
        let page = store.checkpoints_after(after, 1000).await.unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.size);
        notes.extend(page.into_iter().map(|c| String::from_utf8(c.note).unwrap()));
    }
    for n in &notes {
        let c = note::open_checkpoint(n, std::slice::from_ref(log_key)).unwrap();
        assert!(c.size as usize <= leaves.len(), "a checkpoint of {} entries, the log has {}", c.size, leaves.len());
        assert_eq!(c.root, merkle::root(&leaves[..c.size as usize]), "checkpoint at {} is not the log's", c.size);
    }
    notes.len()
}

async fn crash_once(seed: u64) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let keys = tmp.path().join("keys");
    // Checkpoints signed as often as they can be, so the kill lands among them.
    let (mut child, addr, _) = spawn_binary_server_logging(
        &data,
        &keys,
        "warn,carevault::commands=info",
        &["--checkpoint-every", "5", "--checkpoint-interval", "20ms"],
    );
    let der = std::fs::read(keys.join("issuer-ed25519.pk8")).unwrap();
    // The binary runs the embedded default policy: built-in roles from the token's roles claim.
    let token = mint(&der, "crash-test", "front_desk compliance");
    let acked = Arc::new(Mutex::new(Acked::default()));
    // Kill somewhere between 300 and 1300 ms into the load.
    let kill_after = Duration::from_millis(300 + seed % 1000);
    let stop = Instant::now() + kill_after + Duration::from_secs(2);
    let mut workers: Vec<_> =
        (0..12).map(|w| tokio::spawn(load(addr.clone(), token.clone(), acked.clone(), w, stop))).collect();
    let seen = Arc::new(Mutex::new(Vec::new()));
    workers.push(tokio::spawn(watch_checkpoints(addr.clone(), token.clone(), seen.clone(), stop)));
    tokio::time::sleep(kill_after).await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    for w in workers {
        w.await.unwrap();
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    assert!(!acked.versions.is_empty(), "the load made no progress before the kill");

    {
        let store = stored(&data).await;
        let entries = check_acknowledged(store.as_ref(), &acked, false).await;
        let write_entries: HashSet<(String, u64)> = entries
            .iter()
            .filter(|e| e.outcome == "ok" && (e.action == "patient.create" || e.action == "patient.update"))
            .map(|e| (e.resource_id.clone(), e.record_version))
            .collect();
        // No record version without its audit entry (including unacknowledged ones that landed).
        let mut records = 0;
        for (record, head) in store.heads_after(Some(RecordKind::Patient), None, usize::MAX).await.unwrap() {
            let id = record.id;
            let versions =
                store.versions(carevault::storage::RecordRef { kind: RecordKind::Patient, id }).await.unwrap();
            for (version, _) in versions {
                records += 1;
                let key = (uuid::Uuid::from_bytes(id).to_string(), version);
                assert!(write_entries.contains(&key), "record {key:?} exists without its audit entry");
            }
            assert!(head.version >= 1);
        }
        assert_eq!(records, write_entries.len(), "every ok write entry has its record");
        let state = carevault::keystore::KeyState::load(&data).unwrap();
        let log_key = state.log_verifiers().pop().expect("a log key");
        let all = stored_entries(store.as_ref()).await;
        let seen = seen.lock().unwrap().clone();
        let checked = checkpoints_hold(store.as_ref(), &all, &seen, &log_key).await;
        assert!(checked > 0, "no checkpoint was signed before the kill");
    }

    // Restart: everything acknowledged reads back through the real server.
    let s = TestServer::start_in(data, keys, Arc::new(SystemClock)).await;
    for (id, version) in &acked.versions {
        let got =
            s.patients().get_patient(req(pb::GetPatientRequest { patient_id: id.clone() }, &s.admin())).await.unwrap();
        assert!(u64::try_from(got.into_inner().patient.unwrap().version).unwrap() >= *version);
    }
    // The restarted server signs on: it refuses to sign anything inconsistent
    // with what was signed before the kill, so a checkpoint now proves it is not.
    let after =
        s.audit().get_checkpoint(req(pb::GetCheckpointRequest { tree_size: 0, cosigned: false }, &s.admin())).await;
    assert!(after.unwrap().into_inner().checkpoint.is_some());
    drop(tmp);
}

fn seeds(n: usize) -> Vec<u64> {
    (0..n).map(|_| u64::from_le_bytes(uuid::Uuid::new_v4().as_bytes()[..8].try_into().unwrap())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_acknowledged_is_lost_when_the_server_is_killed() {
    for seed in seeds(3) {
        crash_once(seed).await;
    }
}

/// The long run: `cargo test -- --ignored many_kills`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn many_kills_lose_nothing_acknowledged() {
    for seed in seeds(40) {
        crash_once(seed).await;
    }
}
