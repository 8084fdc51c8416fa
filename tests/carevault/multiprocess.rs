//! Two carevault server processes on one PostgreSQL database (the
//! PostgreSQL suite only): concurrent creates, updates and reads through
//! both; afterwards every acknowledged write is there at its acknowledged
//! version, every acknowledged read has its entry, exactly one of two racing
//! updates of one version won, state set through one server holds in the
//! other at once, and the single chain verifies.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use carevault::proto::v1 as pb;
use carevault::proto::v1::access_service_client::AccessServiceClient;
use carevault::proto::v1::patient_service_client::PatientServiceClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::helpers::*;

async fn client(addr: &str) -> PatientServiceClient<Channel> {
    PatientServiceClient::new(Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap())
}

/// Creates, then alternately reads and updates its own patients, through one server.
async fn load(addr: String, token: String, acked: Arc<Mutex<Acked>>, worker: usize, stop: Instant) {
    let mut c = client(&addr).await;
    let mut mine: Vec<pb::Patient> = Vec::new();
    let mut n = 0usize;
    while Instant::now() < stop {
        n += 1;
        if n.is_multiple_of(3) || mine.is_empty() {
            let p = patient("Multi", &format!("W{worker}N{n}"), "1980", &format!("MP-{worker}-{n}"));
            let created = c.create_patient(req(pb::CreatePatientRequest { patient: Some(p) }, &token)).await.unwrap();
            let created = created.into_inner().patient.unwrap();
            acked.lock().unwrap().versions.insert(created.id.clone(), 1);
            mine.push(created);
        } else if n % 3 == 1 {
            let p = &mine[n % mine.len()];
            let rid = format!("mp{worker}-r{n}");
            let mut r = req(pb::GetPatientRequest { patient_id: p.id.clone() }, &token);
            r.metadata_mut().insert("x-request-id", rid.parse().unwrap());
            c.get_patient(r).await.unwrap();
            acked.lock().unwrap().reads.insert(rid);
        } else {
            let i = n % mine.len();
            let mut p = mine[i].clone();
            p.preferred_language = if p.preferred_language == "en" { "es".into() } else { "en".into() };
            let updated = c.update_patient(req(pb::UpdatePatientRequest { patient: Some(p) }, &token)).await.unwrap();
            let updated = updated.into_inner().patient.unwrap();
            acked.lock().unwrap().versions.insert(updated.id.clone(), u64::try_from(updated.version).unwrap());
            mine[i] = updated;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_one_database_make_one_chain_and_lose_nothing_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, keys) = (tmp.path().join("data"), tmp.path().join("keys"));
    // The first creates the keys, the key state and the schema; the second shares them.
    let (mut a, addr_a) = spawn_binary_server(&data, &keys);
    let (mut b, addr_b) = spawn_binary_server(&data, &keys);
    let der = std::fs::read(keys.join("issuer-ed25519.pk8")).unwrap();
    let token = mint(&der, "multi-test", "front_desk compliance");

    // Two updates of the same version race, one through each server: one wins.
    let shared = client(&addr_a)
        .await
        .create_patient(req(
            pb::CreatePatientRequest { patient: Some(patient("Race", "Both", "1970", "MP-R")) },
            &token,
        ))
        .await
        .unwrap()
        .into_inner()
        .patient
        .unwrap();
    let race = [(addr_a.clone(), "es"), (addr_b.clone(), "fr")].map(|(addr, language)| {
        let (mut p, token) = (shared.clone(), token.clone());
        p.preferred_language = language.into();
        tokio::spawn(async move {
            client(&addr).await.update_patient(req(pb::UpdatePatientRequest { patient: Some(p) }, &token)).await
        })
    });
    let mut won = 0;
    for r in race {
        match r.await.unwrap() {
            Ok(_) => won += 1,
            Err(e) => assert_eq!(e.code(), Code::Aborted, "{e:?}"),
        }
    }
    assert_eq!(won, 1, "exactly one of two racing updates wins");

    // A restriction set through one server holds in the other at once.
    let mut access =
        AccessServiceClient::new(Channel::from_shared(format!("http://{addr_a}")).unwrap().connect().await.unwrap());
    let r = pb::SetPatientRestrictionRequest { patient_id: shared.id.clone(), restricted: true };
    access.set_patient_restriction(req_for(r, &token, None)).await.unwrap();
    let hidden =
        client(&addr_b).await.get_patient(req(pb::GetPatientRequest { patient_id: shared.id.clone() }, &token)).await;
    assert_eq!(hidden.unwrap_err().code(), Code::NotFound, "the other server sees the restriction");

    let acked = Arc::new(Mutex::new(Acked::default()));
    let stop = Instant::now() + Duration::from_secs(2);
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let addr = if w % 2 == 0 { addr_a.clone() } else { addr_b.clone() };
            tokio::spawn(load(addr, token.clone(), acked.clone(), w, stop))
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    a.kill().unwrap();
    b.kill().unwrap();
    a.wait().unwrap();
    b.wait().unwrap();
    let acked = std::mem::take(&mut *acked.lock().unwrap());

    let store = stored(&data).await;
    let entries = check_acknowledged(store.as_ref(), &acked, true).await;
    assert!(acked.versions.len() > 8 && acked.reads.len() > 8, "both servers made progress");
    let aborted = entries.iter().filter(|e| e.action == "patient.update" && e.outcome == "aborted").count();
    assert_eq!(aborted, 1, "the losing update is audited as aborted");
}

/// A key job is shared by the servers on one database. One started through
/// the first server, which then stops mid-job, is taken up by the others:
/// a second server and the first one restarted both resume it and take
/// turns batch by batch, while reads go on through both. Every patient is
/// re-encrypted exactly once and counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_job_left_by_one_server_is_finished_by_the_others_counting_every_patient_once() {
    use carevault::proto::v1::key_service_client::KeyServiceClient;
    let clock = || std::sync::Arc::new(carevault::clock::SystemClock);
    let a = TestServer::start().await;
    let mut ids = Vec::new();
    for i in 0..200 {
        ids.push(create(&a, patient("Shared", &format!("Job{i}"), "1980-01-01", &format!("SJ-{i}"))).await.id);
    }
    let keyper = a.token("keyper", "key_admin");
    let job = |s: &TestServer| {
        let (c, t) = (s.channel.clone(), keyper.clone());
        async move {
            KeyServiceClient::new(c)
                .get_reencrypt_job(req_for(pb::GetReencryptJobRequest {}, &t, None))
                .await
                .unwrap()
                .into_inner()
                .job
                .unwrap()
        }
    };
    // 100 patients a second: about two seconds of work.
    let start = pb::StartReencryptRequest { patient_id: String::new(), max_per_second: 100 };
    KeyServiceClient::new(a.channel.clone()).start_reencrypt(req_for(start, &keyper, None)).await.unwrap();
    eventually(|| async { (job(&a).await.done > 0).then_some(()) }).await.expect("the job started");
    let (data_dir, key_dir, _guard) = a.stop_keep().await;
    // The first server stopped mid-job; two servers start on the same database and key state.
    let b = TestServer::start_in(data_dir.clone(), key_dir.clone(), clock()).await;
    let a = TestServer::start_in(data_dir.clone(), key_dir.clone(), clock()).await;
    let left = job(&b).await;
    assert_eq!(left.state, "running");
    assert!(left.done < 200, "the job was left unfinished: {left:?}");
    let reads: Vec<_> = [&a, &b]
        .iter()
        .map(|s| {
            let (mut c, t, ids) = (s.patients(), s.admin(), ids.clone());
            tokio::spawn(async move {
                for id in ids.iter().step_by(5) {
                    c.get_patient(req(pb::GetPatientRequest { patient_id: id.clone() }, &t)).await.unwrap();
                }
            })
        })
        .collect();
    for r in reads {
        r.await.unwrap();
    }
    let done = eventually(|| async {
        let j = job(&a).await;
        (j.state == "completed").then_some(j)
    })
    .await
    .expect("the re-encryption completed");
    assert_eq!((done.done, done.total), (200, 200), "every patient counted once: {done:?}");
    // The stopped server let go of the job, and from then on one runner held it.
    let store = stored(&data_dir).await;
    let entries: Vec<_> = stored_entries(store.as_ref())
        .await
        .into_iter()
        .map(|e| carevault::audit::AuditEntry::decode(&e.bytes).unwrap())
        .filter(|e| e.action.starts_with("keys.reencrypt_"))
        .collect();
    let released = entries.iter().position(|e| e.details.iter().any(|d| d == "lease_released=true"));
    let released = released.expect("the stopping server released its lease");
    let runners: std::collections::HashSet<_> = entries[released + 1..]
        .iter()
        .filter(|e| e.outcome == "ok")
        .filter_map(|e| e.details.iter().find(|d| d.starts_with("runner=")).cloned())
        .collect();
    assert_eq!(runners.len(), 1, "one runner after the hand-over: {runners:?}");
    assert_eq!(done.record_versions, 200, "every record version re-sealed once: {done:?}");
    let store = stored(&data_dir).await;
    for id in &ids {
        let bytes = *uuid::Uuid::parse_str(id).unwrap().as_bytes();
        let w = carevault::crypto::WrappedDataKey(store.data_key(bytes).await.unwrap().unwrap());
        assert_eq!(w.generation().unwrap(), 2, "re-encrypted exactly once");
    }
}

/// Key state is shared by the servers on one database: a rotation, a
/// rewrap, a retirement, a blind-index rotation and an erasure made through
/// one server take effect in the other at once, while reads and creates go
/// on through both and none of them fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_operations_through_one_server_take_effect_in_the_other_at_once_with_reads_in_flight() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use carevault::proto::v1::key_service_client::KeyServiceClient;
    let a = TestServer::start().await;
    let b =
        TestServer::start_in(a.data_dir.clone(), a.key_dir.clone(), std::sync::Arc::new(carevault::clock::SystemClock))
            .await;
    let mut people = Vec::new();
    for i in 0..120 {
        let server = if i % 2 == 0 { &a } else { &b };
        people.push(create(server, patient("Keyshare", &format!("Both{i}"), "1975-05-05", &format!("KS-{i}"))).await);
    }
    let keyper = a.token("keyper", "key_admin");
    let keys = |s: &TestServer| KeyServiceClient::new(s.channel.clone());
    let wrapped_version = |id: &str| {
        let (data, id) = (a.data_dir.clone(), *uuid::Uuid::parse_str(id).unwrap().as_bytes());
        async move {
            let w = stored(&data).await.data_key(id).await.unwrap().unwrap();
            carevault::crypto::WrappedDataKey(w).master_version().unwrap()
        }
    };

    // Reads through both servers, all the time; every one must succeed.
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let (reads, failures) = (std::sync::Arc::new(AtomicU64::new(0)), std::sync::Arc::new(AtomicU64::new(0)));
    let readers: Vec<_> = [&a, &b]
        .iter()
        .flat_map(|s| [(s.patients(), s.admin()), (s.patients(), s.admin())])
        .enumerate()
        .map(|(w, (mut c, t))| {
            let ids: Vec<String> = people.iter().skip(1).map(|p| p.id.clone()).collect();
            let (stop, reads, failures) = (stop.clone(), reads.clone(), failures.clone());
            tokio::spawn(async move {
                let mut i = w;
                while !stop.load(Ordering::SeqCst) {
                    i += 7;
                    match c.get_patient(req(pb::GetPatientRequest { patient_id: ids[i % ids.len()].clone() }, &t)).await
                    {
                        Ok(_) => reads.fetch_add(1, Ordering::SeqCst),
                        Err(e) => {
                            eprintln!("read failed: {e:?}");
                            failures.fetch_add(1, Ordering::SeqCst)
                        }
                    };
                }
            })
        })
        .collect();

    // Rotation through A: B wraps its very next new patient under v2.
    let rotated = keys(&a).rotate_master_key(req_for(pb::RotateMasterKeyRequest {}, &keyper, None)).await.unwrap();
    assert_eq!(rotated.into_inner().new_version, 2);
    let after_rotation = create(&b, patient("Keyshare", "Late", "1976-06-06", "KS-LATE")).await;
    assert_eq!(wrapped_version(&after_rotation.id).await, 2, "B wrapped with the new primary at once");

    // Rewrap started through B (it runs in either); then v1 retires through A.
    keys(&b)
        .start_rewrap(req_for(pb::StartRewrapRequest { dry_run: false, max_per_second: 0 }, &keyper, None))
        .await
        .unwrap();
    eventually(|| {
        let mut k = keys(&a);
        let r = req_for(pb::GetRewrapJobRequest {}, &keyper, None);
        async move { k.get_rewrap_job(r).await.unwrap().into_inner().job.filter(|j| j.state == "completed") }
    })
    .await
    .expect("the rewrap completed");
    for p in people.iter().step_by(10) {
        assert_eq!(wrapped_version(&p.id).await, 2);
    }

    // Blind-index rotation through A; searches through B use the new index.
    keys(&a).rotate_blind_index_key(req_for(pb::RotateBlindIndexKeyRequest {}, &keyper, None)).await.unwrap();
    eventually(|| {
        let mut k = keys(&b);
        let r = req_for(pb::GetBlindIndexJobRequest {}, &keyper, None);
        async move { k.get_blind_index_job(r).await.unwrap().into_inner().job.filter(|j| j.state == "completed") }
    })
    .await
    .expect("the blind-index rotation completed");
    let criterion = |n: usize| {
        pb::search_patients_request::Criterion::Identifier(pb::IdentifierQuery {
            system: people[n].identifiers[0].system.clone(),
            value: format!("KS-{n}"),
        })
    };
    for n in [3, 50, 101] {
        assert_eq!(search(&b, criterion(n)).await.patients.len(), 1, "B searches the new index");
        assert_eq!(search(&a, criterion(n)).await.patients.len(), 1, "A searches the new index");
    }
    keys(&a).retire_master_key(req_for(pb::RetireMasterKeyRequest { version: 1 }, &keyper, None)).await.unwrap();
    let status = keys(&b).get_key_status(req_for(pb::GetKeyStatusRequest {}, &keyper, None)).await.unwrap();
    let status = status.into_inner();
    let v1 = status.versions.iter().find(|v| v.version == 1).unwrap();
    assert_eq!(v1.state, "retired", "B sees the retirement made through A: {status:?}");

    // Erasure through B: A answers "erased" at once, and still reads the erased
    // patient's bucket neighbours (rewrapped under the bucket's new key).
    let victim = &people[0];
    let erase = pb::ErasePatientRequest { patient_id: victim.id.clone(), reason: "patient request".into() };
    keys(&b).erase_patient(req_for(erase, &keyper, None)).await.unwrap();
    let gone = a.patients().get_patient(req(pb::GetPatientRequest { patient_id: victim.id.clone() }, &a.admin())).await;
    assert_eq!(gone.unwrap_err().code(), Code::NotFound);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    for r in readers {
        r.await.unwrap();
    }
    assert_eq!(failures.load(Ordering::SeqCst), 0, "no read failed");
    eprintln!("reads during the key operations: {}", reads.load(Ordering::SeqCst));
    assert!(reads.load(Ordering::SeqCst) > 100, "reads went on throughout");
    for p in &people[1..] {
        a.patients().get_patient(req(pb::GetPatientRequest { patient_id: p.id.clone() }, &a.admin())).await.unwrap();
    }
    // One chain, every key-state change in it.
    let store = stored(&a.data_dir).await;
    let entries = stored_entries(store.as_ref()).await;
    let report = carevault::audit::verify_chain(entries.iter().cloned().map(|e| e.raw()), None);
    assert!(report.is_ok(), "{report:?}");
}

/// A server joining a database that holds data takes the key state from the
/// database; it needs only the master keys and the shared `erasure-keys`,
/// and refuses to start without them, or with bucket keys of another store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_server_takes_the_stored_key_state_but_needs_the_shared_erasure_keys() {
    let a = TestServer::start().await;
    let p = create(&a, patient("Joiner", "Jo", "1981-01-01", "JN-1")).await;
    let keyper = a.token("keyper", "key_admin");
    carevault::proto::v1::key_service_client::KeyServiceClient::new(a.channel.clone())
        .rotate_master_key(req_for(pb::RotateMasterKeyRequest {}, &keyper, None))
        .await
        .unwrap();
    let joiner = a.data_dir.parent().unwrap().join("joiner");
    let url = std::fs::read_to_string(a.data_dir.parent().unwrap().join("data.store-url")).unwrap();
    std::fs::write(a.data_dir.parent().unwrap().join("joiner.store-url"), url).unwrap();
    let open = |dir: std::path::PathBuf| {
        let cfg = config(dir, a.key_dir.clone());
        async move {
            let options = || carevault::server::OpenOptions {
                clock: std::sync::Arc::new(carevault::clock::SystemClock),
                fail_syncs: carevault::storage::FailSyncs::never(),
            };
            carevault::server::open(&cfg, options()).await
        }
    };
    std::fs::create_dir_all(&joiner).unwrap();
    let refused = open(joiner.clone()).await.err().expect("refused without erasure-keys").to_string();
    assert!(refused.contains("no erasure-keys"), "{refused}");
    // Bucket keys of another store do not open this one's data keys.
    carevault::keystore::write_erasure_keys(
        &joiner,
        &carevault::crypto::ShredKeys::generate(carevault::crypto::shred::DEFAULT_BUCKETS).unwrap(),
    )
    .unwrap();
    let refused = open(joiner.clone()).await.err().expect("refused with foreign erasure-keys").to_string();
    assert!(refused.contains("does not open this store's data keys"), "{refused}");
    // With the shared file it starts on the stored key state (v2 primary) and reads.
    std::fs::copy(a.data_dir.join("erasure-keys"), joiner.join("erasure-keys")).unwrap();
    let b = TestServer::start_in(joiner.clone(), a.key_dir.clone(), std::sync::Arc::new(carevault::clock::SystemClock))
        .await;
    let got = b.patients().get_patient(req(pb::GetPatientRequest { patient_id: p.id.clone() }, &b.admin())).await;
    assert_eq!(got.unwrap().into_inner().patient.unwrap().id, p.id);
    let copy: serde_json::Value =
        serde_json::from_slice(&std::fs::read(joiner.join("keycheck.json")).unwrap()).unwrap();
    assert_eq!(copy["primary"], 2, "the joiner wrote its copy of the stored key state: {copy}");
}

/// A key job whose server died (kill -9) holding its lease is taken up by
/// another server once the lease runs out, and finishes, every patient
/// counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_job_of_a_killed_server_is_taken_up_when_its_lease_runs_out() {
    use carevault::proto::v1::key_service_client::KeyServiceClient;
    let tmp = tempfile::tempdir().unwrap();
    let (data, keys) = (tmp.path().join("data"), tmp.path().join("keys"));
    let (mut a, addr_a) = spawn_binary_server(&data, &keys);
    let der = std::fs::read(keys.join("issuer-ed25519.pk8")).unwrap();
    let token = mint(&der, "lease-test", "front_desk key_admin");
    let mut c = client(&addr_a).await;
    for i in 0..150 {
        let p = patient("Lease", &format!("L{i}"), "1980", &format!("LE-{i}"));
        c.create_patient(req(pb::CreatePatientRequest { patient: Some(p) }, &token)).await.unwrap();
    }
    let channel = Channel::from_shared(format!("http://{addr_a}")).unwrap().connect().await.unwrap();
    let start = pb::StartReencryptRequest { patient_id: String::new(), max_per_second: 40 };
    KeyServiceClient::new(channel.clone()).start_reencrypt(req_for(start, &token, None)).await.unwrap();
    let progress = |channel: Channel| {
        let t = token.clone();
        async move {
            let r = req_for(pb::GetReencryptJobRequest {}, &t, None);
            KeyServiceClient::new(channel).get_reencrypt_job(r).await.unwrap().into_inner().job.unwrap()
        }
    };
    eventually(|| async { (progress(channel.clone()).await.done > 0).then_some(()) }).await.expect("started");
    a.kill().unwrap();
    a.wait().unwrap();
    let killed_at = Instant::now();
    let b = TestServer::start_in(data.clone(), keys.clone(), std::sync::Arc::new(carevault::clock::SystemClock)).await;
    let left = progress(b.channel.clone()).await;
    assert!(left.state == "running" && left.done < 150, "left mid-job: {left:?}");
    let mut done = None;
    for _ in 0..60 {
        let j = progress(b.channel.clone()).await;
        if j.state == "completed" {
            done = Some(j);
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let done = done.expect("the job completed after the lease ran out");
    assert_eq!((done.done, done.total), (150, 150), "every patient counted once: {done:?}");
    assert!(killed_at.elapsed() >= Duration::from_secs(5), "taken up only after the lease ran out");
}

/// A key operation recorded by another process is left to it while it may
/// still be running, and settled as interrupted once it is a minute old.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_operation_of_another_process_is_settled_only_once_it_is_abandoned() {
    use carevault::proto::v1::key_service_client::KeyServiceClient;
    let s = TestServer::start().await;
    let carevault::storage::Location::Postgres(url) = store_for(&s.data_dir) else { return };
    let db = sql(&url).await;
    let now = carevault::clock::Clock::now_micros(&carevault::clock::SystemClock);
    let pending = |started_at: i64| {
        format!(
            r#"{{"operation":"rotate","version":2,"request_id":"elsewhere","started_by":"ops","started_at":{started_at},"process":"another-process"}}"#
        )
        .into_bytes()
    };
    db.execute("INSERT INTO jobs (name, state_json) VALUES ('keyop', $1)", &[&pending(now)]).await.unwrap();
    let keyper = s.token("keyper", "key_admin");
    let mut keys = KeyServiceClient::new(s.channel.clone());
    tokio::time::sleep(Duration::from_secs(6)).await;
    let busy = keys.rotate_master_key(req_for(pb::RotateMasterKeyRequest {}, &keyper, None)).await.unwrap_err();
    assert_eq!(busy.code(), Code::FailedPrecondition, "a live operation elsewhere is left alone: {busy:?}");
    // Two minutes old: abandoned; the watcher settles it and the next rotation goes ahead.
    db.execute("UPDATE jobs SET state_json = $1 WHERE name = 'keyop'", &[&pending(now - 120_000_000)]).await.unwrap();
    let rotated = eventually(|| {
        let (mut k, r) = (keys.clone(), req_for(pb::RotateMasterKeyRequest {}, &keyper, None));
        async move { k.rotate_master_key(r).await.ok() }
    })
    .await;
    assert_eq!(rotated.expect("rotated once the old operation was settled").into_inner().new_version, 2);
    let entries = stored_entries(stored(&s.data_dir).await.as_ref()).await;
    let settled = entries
        .iter()
        .map(|e| carevault::audit::AuditEntry::decode(&e.bytes).unwrap())
        .find(|e| e.request_id == "elsewhere" && e.details.iter().any(|d| d == "applied=false"));
    assert!(settled.is_some(), "the abandoned operation was settled as not applied");
}

/// A store from before the key state was stored (no `keystate` row) gets it
/// from `keycheck.json` at its next start, with a `keys.state_recorded` entry,
/// and serves as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_without_a_stored_key_state_records_it_from_keycheck_json_at_start() {
    let s = TestServer::start().await;
    let p = create(&s, patient("Older", "Store", "1960-06-06", "OS-1")).await;
    let carevault::storage::Location::Postgres(url) = store_for(&s.data_dir) else { return };
    let (data, keys, guard) = s.stop_keep().await;
    sql(&url).await.execute("DELETE FROM jobs WHERE name = 'keystate'", &[]).await.unwrap();
    let s = TestServer::start_in(data.clone(), keys, std::sync::Arc::new(carevault::clock::SystemClock)).await;
    let got = s.patients().get_patient(req(pb::GetPatientRequest { patient_id: p.id.clone() }, &s.admin())).await;
    assert_eq!(got.unwrap().into_inner().patient.unwrap().id, p.id);
    let store = stored(&data).await;
    let recorded: Vec<_> = stored_entries(store.as_ref())
        .await
        .into_iter()
        .map(|e| carevault::audit::AuditEntry::decode(&e.bytes).unwrap())
        .filter(|e| e.action == "keys.state_recorded")
        .collect();
    assert_eq!(recorded.len(), 2, "recorded at the first start, and again after it was gone");
    let stored_state = store.job(carevault::storage::JobName::KeyState).await.unwrap().expect("recorded again");
    let copy: serde_json::Value = serde_json::from_slice(&std::fs::read(data.join("keycheck.json")).unwrap()).unwrap();
    let stored_state: serde_json::Value = serde_json::from_slice(&stored_state).unwrap();
    assert_eq!(stored_state["master_keys"], copy["master_keys"]);
    drop(guard);
}
