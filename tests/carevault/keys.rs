//! Master key rotation, online rewrap, retirement and destruction.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use carevault::proto::v1 as pb;
use carevault::proto::v1::key_service_client::KeyServiceClient;
use tonic::Code;

use crate::helpers::*;

fn keys(s: &TestServer) -> KeyServiceClient<tonic::transport::Channel> {
    KeyServiceClient::new(s.channel.clone())
}

async fn status(s: &TestServer) -> pb::GetKeyStatusResponse {
    let t = s.token("keyper", "key_admin");
    keys(s).get_key_status(req_for(pb::GetKeyStatusRequest {}, &t, None)).await.unwrap().into_inner()
}

fn on(st: &pb::GetKeyStatusResponse, version: u32) -> &pb::KeyVersionStatus {
    st.versions.iter().find(|v| v.version == version).unwrap()
}

async fn rewrap_to_completion(s: &TestServer) -> pb::RewrapJob {
    let t = s.token("keyper", "key_admin");
    let start = pb::StartRewrapRequest { dry_run: false, max_per_second: 0 };
    keys(s).start_rewrap(req_for(start, &t, None)).await.unwrap();
    for _ in 0..600 {
        let j = keys(s).get_rewrap_job(req_for(pb::GetRewrapJobRequest {}, &t, None)).await.unwrap().into_inner();
        if let Some(j) = j.job.filter(|j| j.state == "completed") {
            return j;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let j = keys(s).get_rewrap_job(req_for(pb::GetRewrapJobRequest {}, &t, None)).await.unwrap().into_inner();
    panic!("rewrap did not complete: {j:?}");
}

async fn make_patients(s: &TestServer, n: usize) -> Vec<pb::Patient> {
    let mut out = Vec::new();
    for i in 0..n {
        let p = create(s, patient("Rot", &format!("P{i}"), "1970-01-01", &format!("ROT-{i}"))).await;
        create_coverage(s, coverage(&p.id, &format!("ROTM{i}"), 1)).await;
        out.push(p);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_and_rewrapping_under_load_fails_no_request_and_leaves_nothing_on_the_old_version() {
    let s = TestServer::start().await;
    let patients = make_patients(&s, 300).await;
    // A break-glass reason sealed under v1 is moved too.
    let vip = create(&s, patient("Vip", "Vera", "1960-06-06", "VIP-1")).await;
    set_restricted_and_break_glass(&s, &vip.id).await;
    let before = status(&s).await;
    assert_eq!((on(&before, 1).data_keys, on(&before, 1).notes), (301, 1));

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let workers: Vec<_> = (0..6)
        .map(|w| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            let ids: Vec<String> = patients.iter().skip(w).step_by(6).map(|p| p.id.clone()).collect();
            let (mut pc, token) = (s.patients(), s.admin());
            tokio::spawn(async move {
                let mut i = 0usize;
                while !stop.load(Ordering::SeqCst) {
                    let id = ids[i % ids.len()].clone();
                    i += 1;
                    let r = async {
                        let p = pc.get_patient(req(pb::GetPatientRequest { patient_id: id }, &token)).await?;
                        let mut p = p.into_inner().patient.unwrap();
                        p.preferred_language = if i.is_multiple_of(2) { "en".into() } else { "es".into() };
                        pc.update_patient(req(pb::UpdatePatientRequest { patient: Some(p) }, &token)).await?;
                        if i.is_multiple_of(10) {
                            let np = patient("Fresh", "New", "1999-09-09", &format!("NEW-{w}-{i}"));
                            pc.create_patient(req(pb::CreatePatientRequest { patient: Some(np) }, &token)).await?;
                        }
                        Ok::<_, tonic::Status>(())
                    }
                    .await;
                    match r {
                        Ok(()) => ok.fetch_add(1, Ordering::SeqCst),
                        Err(e) => {
                            eprintln!("request failed during rotation: {e:?}");
                            failed.fetch_add(1, Ordering::SeqCst)
                        }
                    };
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = s.token("keyper", "key_admin");
    let rotated = keys(&s).rotate_master_key(req_for(pb::RotateMasterKeyRequest {}, &t, None)).await.unwrap();
    assert_eq!(rotated.into_inner().new_version, 2);
    let job = rewrap_to_completion(&s).await;
    assert_eq!(job.target_version, 2);
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::SeqCst), 0, "requests failed during rotation");
    assert!(ok.load(Ordering::SeqCst) > 50);

    let after = status(&s).await;
    assert_eq!((on(&after, 1).data_keys, on(&after, 1).notes), (0, 0), "something left on v1");
    assert!(on(&after, 2).data_keys >= 300 && on(&after, 2).primary);
    assert_eq!(on(&after, 2).notes, 1);
    for p in &patients {
        s.patients().get_patient(req(pb::GetPatientRequest { patient_id: p.id.clone() }, &s.admin())).await.unwrap();
    }
    // The job's start, checkpoints and completion are in the trail, and it still verifies.
    let events = s.all_events().await;
    let actions: Vec<&str> = events.iter().map(|e| e.action.as_str()).collect();
    assert!(actions.contains(&"keys.rotate") && actions.contains(&"keys.rewrap"));
    assert!(actions.contains(&"keys.rewrap_batch") && actions.contains(&"keys.rewrap_complete"));
    let reads: Vec<_> = events.iter().filter(|e| e.action == "patient.read").collect();
    assert!(reads.iter().any(|e| e.key_version == 1) && reads.iter().any(|e| e.key_version == 2));
}

async fn set_restricted_and_break_glass(s: &TestServer, id: &str) {
    let officer = s.token("officer", "compliance");
    let r = pb::SetPatientRestrictionRequest { patient_id: id.into(), restricted: true };
    s.access().set_patient_restriction(req_for(r, &officer, None)).await.unwrap();
    let doc = s.token("doc", "clinician");
    let mut r = req_for(pb::GetPatientRequest { patient_id: id.into() }, &doc, Some("ETREAT"));
    r.metadata_mut().insert("x-break-glass-reason", "cardiac arrest".parse().unwrap());
    s.patients().get_patient(r).await.unwrap();
}

#[tokio::test]
async fn retire_and_destroy_are_refused_while_anything_depends_on_a_version_and_a_destroyed_version_cannot_decrypt() {
    let s = TestServer::start().await;
    let patients = make_patients(&s, 20).await;
    let t = s.token("keyper", "key_admin");
    let mut k = keys(&s);
    let retire = |v| req_for(pb::RetireMasterKeyRequest { version: v }, &t, None);
    let destroy = |v| req_for(pb::DestroyMasterKeyRequest { version: v }, &t, None);

    k.rotate_master_key(req_for(pb::RotateMasterKeyRequest {}, &t, None)).await.unwrap();
    let err = k.retire_master_key(retire(1)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("blind-index"), "{}", err.message());
    rewrap_to_completion(&s).await;
    // Everything is on v2 now; snapshot one patient's v2-wrapped key.
    k.rotate_master_key(req_for(pb::RotateMasterKeyRequest {}, &t, None)).await.unwrap();
    let err = k.retire_master_key(retire(2)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("20 data keys"), "{}", err.message());
    let err = k.destroy_master_key(destroy(2)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("retire it first"));
    let err = k.retire_master_key(retire(3)).await.unwrap_err();
    assert!(err.message().contains("primary"));

    let (data_dir, key_dir, guard) = s.stop_keep().await;
    let first = uuid::Uuid::parse_str(&patients[0].id).unwrap().into_bytes();
    let old_v2_key = stored(&data_dir).await.data_key(first).await.unwrap().unwrap();
    let s = TestServer::start_in(data_dir, key_dir, Arc::new(carevault::clock::SystemClock)).await;
    rewrap_to_completion(&s).await;
    let t = s.token("keyper", "key_admin");
    let mut k = keys(&s);
    k.retire_master_key(req_for(pb::RetireMasterKeyRequest { version: 2 }, &t, None)).await.unwrap();
    let d = k.destroy_master_key(req_for(pb::DestroyMasterKeyRequest { version: 2 }, &t, None)).await.unwrap();
    assert!(d.into_inner().material_removed);
    assert!(!s.key_dir.join("master-2.key").exists());
    let st = status(&s).await;
    assert_eq!(on(&st, 2).state, "destroyed");
    assert_eq!(on(&st, 3).data_keys, 20);

    // Put the v2-wrapped key back behind the server's back: nothing can open it any more.
    let (data_dir, key_dir, _guard2) = s.stop_keep().await;
    danger_put_dek(&data_dir, first, old_v2_key).await;
    let s = TestServer::start_in(data_dir, key_dir, Arc::new(carevault::clock::SystemClock)).await;
    let err = s
        .patients()
        .get_patient(req(pb::GetPatientRequest { patient_id: patients[0].id.clone() }, &s.admin()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DataLoss);
    // Others still read, and every key operation is in the trail.
    s.patients()
        .get_patient(req(pb::GetPatientRequest { patient_id: patients[1].id.clone() }, &s.admin()))
        .await
        .unwrap();
    let events = s.all_events().await;
    let refused =
        events.iter().filter(|e| e.action == "keys.retire" && e.outcome == pb::AuditOutcome::FailedPrecondition as i32);
    assert_eq!(refused.count(), 3);
    assert!(events.iter().any(|e| e.action == "keys.destroy_complete" && e.details == vec!["material_removed=true"]));
    drop(guard);
}

#[tokio::test]
async fn key_operations_need_the_key_admin_role() {
    let s = TestServer::start().await;
    let desk = s.token("desk", "front_desk");
    let err = keys(&s).rotate_master_key(req(pb::RotateMasterKeyRequest {}, &desk)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let officer = s.token("officer", "compliance");
    let err = keys(&s).get_key_status(req_for(pb::GetKeyStatusRequest {}, &officer, None)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewrap_killed_midway_resumes_from_its_cursor_after_restart_and_completes() {
    use carevault::audit::verify_chain;
    use carevault::proto::v1::patient_service_client::PatientServiceClient;
    let tmp = tempfile::tempdir().unwrap();
    let (data, key_dir) = (tmp.path().join("data"), tmp.path().join("keys"));
    let (mut child, addr) = spawn_binary_server(&data, &key_dir);
    let der = std::fs::read(key_dir.join("issuer-ed25519.pk8")).unwrap();
    let (desk, ops) = (mint(&der, "desk", "front_desk"), mint(&der, "ops", "key_admin"));
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let creators: Vec<_> = (0..8)
        .map(|w| {
            let (mut pc, desk) = (PatientServiceClient::new(channel.clone()), desk.clone());
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..75 {
                    let p = patient("Kill", "Midway", "1980-01-01", &format!("KM-{w}-{i}"));
                    let r = pc.create_patient(req(pb::CreatePatientRequest { patient: Some(p) }, &desk)).await.unwrap();
                    ids.push(r.into_inner().patient.unwrap().id);
                }
                ids
            })
        })
        .collect();
    let mut ids = Vec::new();
    for c in creators {
        ids.extend(c.await.unwrap());
    }
    let mut k = KeyServiceClient::new(channel.clone());
    k.rotate_master_key(req_for(pb::RotateMasterKeyRequest {}, &ops, None)).await.unwrap();
    // 600 keys at 200/s: about three seconds of work.
    let start = pb::StartRewrapRequest { dry_run: false, max_per_second: 200 };
    let job = k.start_rewrap(req_for(start, &ops, None)).await.unwrap().into_inner().job.unwrap();
    assert_eq!(job.total, 600);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let midway = k.get_rewrap_job(req_for(pb::GetRewrapJobRequest {}, &ops, None)).await.unwrap();
    let midway = midway.into_inner().job.unwrap();
    assert!(midway.done > 0 && midway.done < 600, "not midway: {midway:?}");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    drop(k);
    drop(channel);

    let (mut child, addr) = spawn_binary_server(&data, &key_dir);
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut k = KeyServiceClient::new(channel.clone());
    let mut finished = None;
    for _ in 0..200 {
        let j = k.get_rewrap_job(req_for(pb::GetRewrapJobRequest {}, &ops, None)).await.unwrap().into_inner().job;
        let j = j.unwrap();
        assert_eq!(j.job_id, job.job_id, "the same job continues");
        if j.state == "completed" {
            finished = Some(j);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let finished = finished.expect("the job resumed and completed");
    assert_eq!(finished.done, 600, "every key counted once across the kill: {finished:?}");
    let st = k.get_key_status(req_for(pb::GetKeyStatusRequest {}, &ops, None)).await.unwrap().into_inner();
    assert_eq!(on(&st, 1).data_keys, 0);
    assert_eq!(on(&st, 2).data_keys, 600);
    let mut pc = PatientServiceClient::new(channel.clone());
    for id in &ids {
        pc.get_patient(req(pb::GetPatientRequest { patient_id: id.clone() }, &desk)).await.unwrap();
    }
    std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let store = stored(&data).await;
    let chain = stored_entries(store.as_ref()).await.into_iter().map(|e| e.raw());
    assert!(verify_chain(chain, None).is_ok());
}

#[tokio::test]
async fn keys_can_come_from_an_operator_command_and_a_wrong_one_stops_with_a_clear_error() {
    let s = TestServer::start().await;
    create(&s, patient("Cmd", "Key", "1980", "CK-1")).await;
    let (data_dir, key_dir, _guard) = s.stop_keep().await;
    let run = |cmd: String| {
        std::process::Command::new(env!("CARGO_BIN_EXE_carevault"))
            .args(["keys", "--data-dir"])
            .arg(&data_dir)
            .arg("--key-dir")
            .arg(&key_dir)
            .args(store_args(&data_dir))
            .args(["--master-key-command", &cmd, "--json", "status"])
            .output()
            .unwrap()
    };
    let good = run(format!("cat {}/master-$CAREVAULT_KEY_VERSION.key", key_dir.display()));
    assert!(good.status.success(), "{}", String::from_utf8_lossy(&good.stderr));
    let st: serde_json::Value = serde_json::from_slice(&good.stdout).unwrap();
    assert_eq!(st["keySource"], "operator command");
    assert_eq!(st["versions"][0]["dataKeys"], "1");
    let wrong = run(format!("echo {}", "ab".repeat(32)));
    assert_eq!(wrong.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("wrong master key"));
    let failing = run("exit 3".into());
    assert_eq!(failing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&failing.stderr).contains("--master-key-command failed for version 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_blind_index_key_rotates_online_while_searches_never_miss_and_then_the_old_version_retires() {
    let s = TestServer::start().await;
    let patients = make_patients(&s, 300).await;
    let t = s.token("keyper", "key_admin");
    let mut k = keys(&s);
    k.rotate_master_key(req_for(pb::RotateMasterKeyRequest {}, &t, None)).await.unwrap();
    rewrap_to_completion(&s).await;
    let err = k.retire_master_key(req_for(pb::RetireMasterKeyRequest { version: 1 }, &t, None)).await.unwrap_err();
    assert!(err.message().contains("blind-index"), "{}", err.message());
    let before = status(&s).await;
    let entries = on(&before, 1).index_entries;
    assert_eq!((before.blind_index_version, on(&before, 2).index_entries), (1, 0));
    assert!(entries >= 600, "{entries}");

    // Searches by identifier and member id, and updates, run throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let (misses, ops) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = Vec::new();
    for w in 0..3usize {
        let (ch, tok, stop, misses, ops) = (s.channel.clone(), s.admin(), stop.clone(), misses.clone(), ops.clone());
        let ps = patients.clone();
        load.push(tokio::spawn(async move {
            use pb::search_patients_request::Criterion;
            let mut client = pb::patient_service_client::PatientServiceClient::new(ch);
            let mut i = w;
            while !stop.load(Ordering::SeqCst) {
                let p = &ps[i % ps.len()];
                i += 3;
                let criterion = if i % 2 == 0 {
                    Criterion::Identifier(pb::IdentifierQuery {
                        system: p.identifiers[0].system.clone(),
                        value: p.identifiers[0].value.clone(),
                    })
                } else {
                    Criterion::MemberId(pb::MemberIdQuery { member_id: format!("ROTM{}", i % ps.len()) })
                };
                let r = pb::SearchPatientsRequest { criterion: Some(criterion), show_deleted: false, page_size: 0 };
                match client.search_patients(req(r, &tok)).await {
                    Ok(found) if found.get_ref().patients.len() == 1 => {}
                    _ => {
                        misses.fetch_add(1, Ordering::SeqCst);
                    }
                }
                if w == 0 {
                    // Re-save a patient (its index is rewritten in both slots).
                    let got = client.get_patient(req(pb::GetPatientRequest { patient_id: p.id.clone() }, &tok)).await;
                    let u = pb::UpdatePatientRequest { patient: got.unwrap().into_inner().patient };
                    if client.update_patient(req(u, &tok)).await.is_err() {
                        misses.fetch_add(1, Ordering::SeqCst);
                    }
                }
                ops.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    let job = k.rotate_blind_index_key(req_for(pb::RotateBlindIndexKeyRequest {}, &t, None)).await.unwrap();
    let job = job.into_inner().job.unwrap();
    assert_eq!((job.from_version, job.to_version, job.total), (1, 2, 600));
    let done = eventually(|| {
        let mut k = k.clone();
        let r = req_for(pb::GetBlindIndexJobRequest {}, &t, None);
        async move { k.get_blind_index_job(r).await.unwrap().into_inner().job.filter(|j| j.state == "completed") }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for l in load {
        l.await.unwrap();
    }
    let done = done.expect("blind-index rotation did not complete");
    // Updates after the switch remove their own old entries, so the job drops at most all of them.
    assert!(done.reindexed >= 600 && done.dropped <= entries && done.dropped > 0, "{done:?}");
    assert!(ops.load(Ordering::SeqCst) > 0);
    assert_eq!(misses.load(Ordering::SeqCst), 0, "every search found its patient and every update succeeded");

    let after = status(&s).await;
    assert_eq!((after.blind_index_version, on(&after, 1).index_entries, on(&after, 2).index_entries), (2, 0, entries));
    // A patient created afterwards is found through the new index; v1 can retire now.
    let late = create(&s, patient("Late", "Lou", "1999-09-09", "LATE-1")).await;
    let found = search(
        &s,
        pb::search_patients_request::Criterion::Identifier(pb::IdentifierQuery {
            system: late.identifiers[0].system.clone(),
            value: "LATE-1".into(),
        }),
    )
    .await;
    assert_eq!(found.patients.len(), 1);
    k.retire_master_key(req_for(pb::RetireMasterKeyRequest { version: 1 }, &t, None)).await.unwrap();
    let events = s.all_events().await;
    for action in
        ["keys.blind_index_rotate", "keys.blind_index_batch", "keys.blind_index_switch", "keys.blind_index_complete"]
    {
        assert!(events.iter().any(|e| e.action == action), "{action}");
    }
}

#[tokio::test]
async fn a_rotation_records_its_intent_before_changing_keys_and_its_completion_after() {
    let s = TestServer::start().await;
    let t = s.token("keyper", "key_admin");
    let mut k = keys(&s);
    let mut r = req_for(pb::RotateMasterKeyRequest {}, &t, None);
    r.metadata_mut().insert("x-request-id", "rotate-1".parse().unwrap());
    k.rotate_master_key(r).await.unwrap();
    let mut r = req_for(pb::RetireMasterKeyRequest { version: 1 }, &t, None);
    r.metadata_mut().insert("x-request-id", "retire-1".parse().unwrap());
    assert_eq!(k.retire_master_key(r).await.unwrap_err().code(), Code::FailedPrecondition);
    let events = s.all_events().await;
    let of = |rid: &str| {
        events
            .iter()
            .filter(|e| e.request_id == rid)
            .map(|e| (e.action.clone(), e.outcome, e.details.clone()))
            .collect::<Vec<_>>()
    };
    let ok = pb::AuditOutcome::Ok as i32;
    assert_eq!(
        of("rotate-1"),
        [
            (
                "keys.rotate".into(),
                ok,
                vec!["phase=intent".into(), "new_version=2".into(), "previous_primary=1".into()]
            ),
            ("keys.rotate_complete".into(), ok, vec!["new_version=2".into(), "previous_primary=1".into()]),
        ]
    );
    // A refused operation never gets as far as an intent.
    let retire = of("retire-1");
    assert_eq!(retire.len(), 1);
    assert_eq!((retire[0].0.as_str(), retire[0].1), ("keys.retire", pb::AuditOutcome::FailedPrecondition as i32));
    assert!(status(&s).await.pending_operation.is_none());
}

#[tokio::test]
async fn a_key_operation_killed_between_its_intent_and_completion_is_reported_and_settled_at_the_next_start() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, key_dir) = (tmp.path().join("data"), tmp.path().join("keys"));
    let s = TestServer::start_in(data.clone(), key_dir.clone(), Arc::new(carevault::clock::SystemClock)).await;
    drop(s.stop_keep().await);
    // Version 2 comes from a key source that takes its time to answer.
    let v2 = "cd".repeat(32);
    let cmd = format!(
        "case $CAREVAULT_KEY_VERSION in 1) cat {}/master-1.key;; *) sleep 60; echo {v2};; esac",
        key_dir.display()
    );
    let start = |cmd: &str| {
        spawn_binary_server_logging(&data, &key_dir, "warn,carevault::commands=info", &["--master-key-command", cmd])
    };
    let (mut child, addr, _) = start(&cmd);
    let issuer = std::fs::read(carevault::keystore::KeyPaths { dir: key_dir.clone() }.issuer_private()).unwrap();
    let (t, officer) = (mint(&issuer, "keyper", "key_admin"), mint(&issuer, "officer", "compliance"));
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut k = KeyServiceClient::new(channel.clone());
    let rotating = {
        let (mut k, t) = (k.clone(), t.clone());
        tokio::spawn(async move {
            let mut r = req_for(pb::RotateMasterKeyRequest {}, &t, None);
            r.metadata_mut().insert("x-request-id", "slow-rotate".parse().unwrap());
            k.rotate_master_key(r).await
        })
    };
    let pending = eventually(|| {
        let (mut k, t) = (k.clone(), t.clone());
        async move {
            let st = k.get_key_status(req_for(pb::GetKeyStatusRequest {}, &t, None)).await.ok()?.into_inner();
            st.pending_operation
        }
    })
    .await
    .expect("the intent is reported while the operation runs");
    assert_eq!(
        (pending.operation.as_str(), pending.version, pending.request_id.as_str()),
        ("rotate", 2, "slow-rotate")
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(rotating.await.unwrap().is_err(), "the caller never learned of a completion");

    let (mut child, addr, _) = start(&cmd);
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    k = KeyServiceClient::new(channel.clone());
    let mut audit = pb::audit_service_client::AuditServiceClient::new(channel);
    let settled = eventually(|| {
        let (mut audit, officer) = (audit.clone(), officer.clone());
        async move {
            let r = pb::ListAuditEventsRequest { action: "keys.rotate_complete".into(), ..Default::default() };
            let events = audit.list_audit_events(req_for(r, &officer, None)).await.ok()?.into_inner().events;
            events.into_iter().next()
        }
    })
    .await
    .expect("the interrupted rotation is settled at start");
    assert_eq!(settled.request_id, "slow-rotate");
    assert_eq!(settled.details, ["settled_at_start=true", "version=2", "applied=false"]);
    let st = k.get_key_status(req_for(pb::GetKeyStatusRequest {}, &t, None)).await.unwrap().into_inner();
    assert!(st.pending_operation.is_none());
    assert_eq!(st.primary_version, 1, "the rotation never took effect");
    let intent = audit
        .list_audit_events(req_for(
            pb::ListAuditEventsRequest { action: "keys.rotate".into(), ..Default::default() },
            &officer,
            None,
        ))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(intent.len(), 1);
    assert!(intent[0].sequence < settled.sequence);
    child.kill().unwrap();
    child.wait().unwrap();
}
