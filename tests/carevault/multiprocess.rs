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
    assert_eq!(done.record_versions, 200, "every record version re-sealed once: {done:?}");
    let store = stored(&data_dir).await;
    for id in &ids {
        let bytes = *uuid::Uuid::parse_str(id).unwrap().as_bytes();
        let w = carevault::crypto::WrappedDataKey(store.data_key(bytes).await.unwrap().unwrap());
        assert_eq!(w.generation().unwrap(), 2, "re-encrypted exactly once");
    }
}
