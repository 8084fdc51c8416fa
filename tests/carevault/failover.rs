//! Failover (the PostgreSQL suite only): a primary and a synchronous
//! standby on loopback ports, a carevault server given both hosts with
//! `target_session_attrs=read-write`, load with idempotent creates and
//! reads; kill -9 the primary, promote the standby; carevault reconnects by
//! itself. Afterwards every acknowledged write and audited read is on the
//! promoted server, the chain verifies, and no create made two patients.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use carevault::crypto::RecordKind;
use carevault::proto::v1 as pb;
use carevault::proto::v1::patient_service_client::PatientServiceClient;
use tonic::transport::Channel;

use crate::helpers::*;
use crate::pg::PgCluster;

/// What the load attempted: every idempotency key a create was sent with.
#[derive(Default)]
struct Attempted {
    keys: HashSet<String>,
    unknown_outcomes: usize,
}

async fn load(
    addr: String,
    token: String,
    acked: Arc<Mutex<Acked>>,
    tried: Arc<Mutex<Attempted>>,
    worker: usize,
    stop: Instant,
) {
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut c = PatientServiceClient::new(channel);
    let mut mine: Vec<String> = Vec::new();
    let mut n = 0usize;
    while Instant::now() < stop {
        n += 1;
        if n % 2 == 1 || mine.is_empty() {
            // A create, retried with its key until it is acknowledged.
            let key = format!("fo-{worker}-{n}");
            tried.lock().unwrap().keys.insert(key.clone());
            let p = patient("Failover", &format!("W{worker}N{n}"), "1980", &format!("FO-{worker}-{n}"));
            while Instant::now() < stop {
                let mut r = req(pb::CreatePatientRequest { patient: Some(p.clone()) }, &token);
                r.metadata_mut().insert("x-idempotency-key", key.parse().unwrap());
                match c.create_patient(r).await {
                    Ok(created) => {
                        let id = created.into_inner().patient.unwrap().id;
                        acked.lock().unwrap().versions.insert(id.clone(), 1);
                        mine.push(id);
                        break;
                    }
                    Err(e) => {
                        if e.message().contains("may or may not have been performed") {
                            tried.lock().unwrap().unknown_outcomes += 1;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        } else {
            let rid = format!("fo{worker}-r{n}");
            let mut r = req(pb::GetPatientRequest { patient_id: mine[n % mine.len()].clone() }, &token);
            r.metadata_mut().insert("x-request-id", rid.parse().unwrap());
            match c.get_patient(r).await {
                Ok(_) => {
                    acked.lock().unwrap().reads.insert(rid);
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_under_load_fails_over_to_its_synchronous_standby_losing_nothing_acknowledged() {
    let Some(primary) = PgCluster::start() else { return };
    primary.psql("CREATE DATABASE failover").unwrap();
    let Some(standby) = PgCluster::standby_of(&primary) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (data, keys) = (tmp.path().join("data"), tmp.path().join("keys"));
    // Both hosts; a connection is taken only from the one that takes writes.
    let url = format!(
        "postgres://{}@127.0.0.1:{},127.0.0.1:{}/failover?target_session_attrs=read-write&connect_timeout=2",
        crate::pg::SUPERUSER,
        primary.port,
        standby.port
    );
    std::fs::write(tmp.path().join("data.store-url"), &url).unwrap();
    let (mut server, addr) = spawn_binary_server(&data, &keys);
    let der = std::fs::read(keys.join("issuer-ed25519.pk8")).unwrap();
    let token = mint(&der, "failover-test", "front_desk compliance");

    let acked = Arc::new(Mutex::new(Acked::default()));
    let tried = Arc::new(Mutex::new(Attempted::default()));
    let stop = Instant::now() + Duration::from_secs(8);
    let workers: Vec<_> = (0..6)
        .map(|w| tokio::spawn(load(addr.clone(), token.clone(), acked.clone(), tried.clone(), w, stop)))
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = acked.lock().unwrap().versions.len();
    assert!(before > 0, "the load made progress before the failover");
    primary.kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    standby.promote();
    let at_promotion = acked.lock().unwrap().versions.len();
    for w in workers {
        w.await.unwrap();
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    let tried = std::mem::take(&mut *tried.lock().unwrap());
    assert!(
        acked.versions.len() > at_promotion,
        "carevault went on writing after the failover, on the promoted server"
    );
    server.kill().unwrap();
    server.wait().unwrap();

    // The promoted server holds everything acknowledged, on one chain.
    let store = stored(&data).await;
    check_acknowledged(store.as_ref(), &acked, true).await;
    let patients = store.heads_after(Some(RecordKind::Patient), None, usize::MAX).await.unwrap().len();
    assert!(patients >= acked.versions.len(), "every acknowledged create is there");
    assert!(
        patients <= tried.keys.len(),
        "no retried create made a second patient: {patients} patients from {} keys ({} outcomes reported unknown)",
        tried.keys.len(),
        tried.unknown_outcomes
    );
    drop(standby);
    drop(primary);
}

/// While the database is down every call fails closed and health says
/// NOT_SERVING; once it is back, health says SERVING and calls succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_not_serving_while_the_database_is_unreachable() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let Some(cluster) = PgCluster::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::write(tmp.path().join("data.store-url"), cluster.url("postgres")).unwrap();
    let s = TestServer::start_in(data, tmp.path().join("keys"), Arc::new(carevault::clock::SystemClock)).await;
    let p = create(&s, patient("Health", "Probe", "1970-07-07", "HP-1")).await;
    let status = |s: &TestServer| {
        let mut h = tonic_health::pb::health_client::HealthClient::new(s.channel.clone());
        async move {
            let r = tonic_health::pb::HealthCheckRequest { service: "carevault.v1.PatientService".into() };
            h.check(r).await.unwrap().into_inner().status
        }
    };
    assert_eq!(status(&s).await, ServingStatus::Serving as i32);
    cluster.stop();
    let down = eventually(|| async { (status(&s).await == ServingStatus::NotServing as i32).then_some(()) }).await;
    assert!(down.is_some(), "health turned NOT_SERVING");
    let read = s.patients().get_patient(req(pb::GetPatientRequest { patient_id: p.id.clone() }, &s.admin())).await;
    assert!(read.is_err(), "a read with the database down fails closed");
    cluster.restart();
    let up = eventually(|| async { (status(&s).await == ServingStatus::Serving as i32).then_some(()) }).await;
    assert!(up.is_some(), "health turned SERVING again");
    let read = eventually(|| {
        let (mut c, r) = (s.patients(), req(pb::GetPatientRequest { patient_id: p.id.clone() }, &s.admin()));
        async move { c.get_patient(r).await.ok() }
    })
    .await;
    assert!(read.is_some(), "reads succeed again");
}
