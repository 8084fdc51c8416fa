//! Erasure by crypto-shredding, legal holds, and re-encryption.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use carevault::crypto::{CryptoError, WrappedDataKey};
use carevault::keystore::{self, KeyPaths, KeySource};
use carevault::proto::v1 as pb;
use carevault::proto::v1::key_service_client::KeyServiceClient;
use carevault::storage::sled::SledStore as Store;
use tonic::Code;

use crate::helpers::*;

fn keys(s: &TestServer) -> KeyServiceClient<tonic::transport::Channel> {
    KeyServiceClient::new(s.channel.clone())
}

/// The erasure bucket of a patient, computed from the README's definition.
fn bucket_of(id: &str) -> u16 {
    let mut msg = b"carevault/v1/erasure-bucket".to_vec();
    msg.extend_from_slice(uuid::Uuid::parse_str(id).unwrap().as_bytes());
    let h = carevault::crypto::sha256(&msg);
    u16::from_be_bytes([h[0], h[1]]) % 1024
}

/// Bucket `b`'s current key, read from `erasure-keys` by its documented layout.
fn bucket_key_from_file(data: &Path, bucket: u16) -> Vec<u8> {
    let bytes = std::fs::read(data.join("erasure-keys")).unwrap();
    assert_eq!(&bytes[..7], b"CVEK\x01\x04\x00");
    let mut at = 7;
    for b in 0..=bucket {
        let n = usize::from(bytes[at]);
        if b == bucket {
            let last = at + 1 + (n - 1) * 36;
            return bytes[last + 4..last + 36].to_vec();
        }
        at += 1 + n * 36;
    }
    unreachable!()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() { out.extend(files_under(&p)) } else { out.push(p) }
    }
    out
}

fn contains(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        // A running server may rename a temporary file (checkpoint-state) between the listing and the read.
        .filter(|f| std::fs::read(f).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle)))
        .collect()
}

/// Opens a stopped data directory the way an attacker holding the master keys would.
type Offline = (carevault::crypto::Keyring, carevault::crypto::ShredKeys, Store);

fn open_offline(data: &Path, key_dir: &Path) -> Result<Offline, carevault::storage::StorageError> {
    let source = KeySource::Files(KeyPaths { dir: key_dir.to_path_buf() });
    let local = keystore::open_for_data_dir(&source, data).unwrap();
    let ring = local.ring.expect("keycheck.json");
    Ok((ring, local.shreds, Store::open(&data.join("db"), 8 << 20)?))
}

fn id16(id: &str) -> [u8; 16] {
    *uuid::Uuid::parse_str(id).unwrap().as_bytes()
}

fn erase_req(id: &str, reason: &str) -> pb::ErasePatientRequest {
    pb::ErasePatientRequest { patient_id: id.into(), reason: reason.into() }
}

sled_only! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_erased_patient_reads_as_erased_and_nothing_in_the_data_directory_or_a_fresh_backup_can_open_it() {
        let s = TestServer::start().await;
        // Enough patients that two share an erasure bucket: the victim's neighbour must survive.
        let mut by_bucket: HashMap<u16, Vec<pb::Patient>> = HashMap::new();
        let (victim, neighbour) = loop {
            let i = by_bucket.values().map(Vec::len).sum::<usize>();
            let p = create(&s, patient(&format!("Shred{i}"), "Sam", "1971-02-03", &format!("SHRED-{i}"))).await;
            let same = by_bucket.entry(bucket_of(&p.id)).or_default();
            same.push(p);
            if same.len() == 2 {
                break (same[1].clone(), same[0].clone());
            }
        };
        let c1 = create_coverage(&s, coverage(&victim.id, "ERASEME-1", 1)).await;
        create_coverage(&s, coverage(&victim.id, "ERASEME-2", 2)).await;
        let mut upd = victim.clone();
        upd.telecom.clear();
        s.patients().update_patient(req(pb::UpdatePatientRequest { patient: Some(upd) }, &s.admin())).await.unwrap();

        let compliance = s.token("carla", "compliance");
        let keyper = s.token("keyper", "key_admin");
        let reason = "patient request under state privacy law, ticket PRIV-20931";

        // A legal hold blocks the erasure; lifting it allows it.
        let hold = pb::SetLegalHoldRequest { patient_id: victim.id.clone(), legal_hold: true };
        s.access().set_legal_hold(req_for(hold, &compliance, None)).await.unwrap();
        let refused = keys(&s).erase_patient(req_for(erase_req(&victim.id, reason), &keyper, None)).await.unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition);
        assert!(refused.message().contains("legal hold"), "{}", refused.message());
        assert_eq!(s.last_event("patient.erase").await.outcome, pb::AuditOutcome::FailedPrecondition as i32);
        // Neither a key admin may lift a hold, nor a compliance officer erase.
        let lift = pb::SetLegalHoldRequest { patient_id: victim.id.clone(), legal_hold: false };
        let denied = s.access().set_legal_hold(req_for(lift.clone(), &keyper, None)).await.unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied);
        let denied = keys(&s).erase_patient(req_for(erase_req(&victim.id, reason), &compliance, None)).await.unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied);
        s.access().set_legal_hold(req_for(lift, &compliance, None)).await.unwrap();
        let no_reason = keys(&s).erase_patient(req_for(erase_req(&victim.id, " "), &keyper, None)).await.unwrap_err();
        assert_eq!(bad_fields(&no_reason), vec!["reason"]);

        // Before: the master keys and the data directory together open the victim's data key.
        let (data, key_dir, tmp) = s.stop_keep().await;
        let (old_wrapped, old_bucket_key) = {
            let (ring, shreds, store) = open_when_unlocked(|| open_offline(&data, &key_dir)).await;
            let wrapped = WrappedDataKey(store.data_key(&id16(&victim.id)).unwrap().unwrap());
            assert!(ring.unwrap_data_key(&id16(&victim.id), &wrapped, &shreds).is_ok());
            let key = bucket_key_from_file(&data, bucket_of(&victim.id));
            assert_eq!(contains(&data, &key), vec![data.join("erasure-keys")], "the search can find a key");
            (wrapped, key)
        };
        let s = TestServer::start_in(data.clone(), key_dir.clone(), Arc::new(carevault::clock::SystemClock)).await;

        let erased =
            keys(&s).erase_patient(req_for(erase_req(&victim.id, reason), &keyper, None)).await.unwrap().into_inner();
        assert_eq!((erased.coverages_erased, erased.record_versions_erased), (2, 4));
        assert!(erased.data_keys_rekeyed >= 1, "the neighbour's key moves to the bucket's new generation");
        assert!(erased.caveats.iter().any(|c| c.contains("backups")), "{:?}", erased.caveats);
        let entry = s.last_event("patient.erase").await;
        assert_eq!((entry.outcome, entry.patient_id.as_str()), (pb::AuditOutcome::Ok as i32, victim.id.as_str()));

        // Every read says erased; the neighbour reads as before; search finds nothing.
        let get = pb::GetPatientRequest { patient_id: victim.id.clone() };
        let gone = s.patients().get_patient(req(get, &s.admin())).await.unwrap_err();
        assert_eq!(gone.code(), Code::NotFound);
        assert!(gone.message().contains("erased"), "{}", gone.message());
        let cov = pb::GetCoverageRequest { coverage_id: c1.id.clone() };
        let gone = s.coverages().get_coverage(req(cov, &s.admin())).await.unwrap_err();
        assert!(gone.code() == Code::NotFound && gone.message().contains("erased"), "{}", gone.message());
        let again = keys(&s).erase_patient(req_for(erase_req(&victim.id, reason), &keyper, None)).await.unwrap_err();
        assert!(again.code() == Code::NotFound && again.message().contains("erased"));
        let get = pb::GetPatientRequest { patient_id: neighbour.id.clone() };
        let got = s.patients().get_patient(req(get, &s.admin())).await.unwrap().into_inner().patient.unwrap();
        assert_eq!(got.names, neighbour.names);
        let found = search(
            &s,
            pb::search_patients_request::Criterion::Identifier(pb::IdentifierQuery {
                system: "https://hospital.example/mrn".into(),
                value: victim.identifiers[0].value.clone(),
            }),
        )
        .await;
        assert!(found.patients.is_empty());
        // The reason is nowhere in the audit trail.
        assert!(s.all_events().await.iter().all(|e| !format!("{e:?}").contains("PRIV-20931")));

        // After: a fresh backup, then a byte search of both directories.
        let (data, key_dir, _tmp2) = s.stop_keep().await;
        let backup = tmp.as_ref().unwrap().path().join("backup");
        open_when_unlocked(|| {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_carevault"))
                .args(["backup", "--data-dir", data.to_str().unwrap(), "--out", backup.to_str().unwrap()])
                .output()
                .unwrap();
            if out.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&out.stderr).to_string()) }
        })
        .await;
        for dir in [&data, &backup] {
            assert!(contains(dir, &old_bucket_key).is_empty(), "the old erasure key survives in {dir:?}");
            assert!(contains(dir, victim.names[0].family.as_bytes()).is_empty());
            let (ring, shreds, store) = open_when_unlocked(|| open_offline(dir, &key_dir)).await;
            assert_eq!(store.data_key(&id16(&victim.id)).unwrap(), None);
            // The old wrapped key may linger in sled's log, but nothing left can open it.
            assert_eq!(
                ring.unwrap_data_key(&id16(&victim.id), &old_wrapped, &shreds).err(),
                Some(CryptoError::UnknownErasureKey(bucket_of(&victim.id), 1))
            );
            let chain = raw_chain(&store);
            assert!(carevault::audit::verify_chain(chain, None).is_ok());
        }
        assert!(contains(&backup, &old_wrapped.0).is_empty(), "a fresh backup holds only live values");
        let verify = std::process::Command::new(env!("CARGO_BIN_EXE_carevault"))
            .args(["verify", "--data-dir", data.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reencryption_gives_every_patient_a_new_key_generation_while_reads_and_writes_continue() {
    let s = TestServer::start().await;
    let mut patients = Vec::new();
    for i in 0..120 {
        let p = create(&s, patient("Reenc", &format!("R{i}"), "1980-01-01", &format!("RE-{i}"))).await;
        create_coverage(&s, coverage(&p.id, &format!("REM{i}"), 1)).await;
        patients.push(p);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let ops = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for w in 0..4 {
        let (ch, t, stop, errors, ops, ids) = (
            s.channel.clone(),
            s.admin(),
            stop.clone(),
            errors.clone(),
            ops.clone(),
            patients.iter().map(|p| p.id.clone()).collect::<Vec<_>>(),
        );
        load.push(tokio::spawn(async move {
            let mut client = pb::patient_service_client::PatientServiceClient::new(ch);
            let mut i = w;
            while !stop.load(Ordering::SeqCst) {
                let id = ids[i % ids.len()].clone();
                i += 7;
                let got = client.get_patient(req(pb::GetPatientRequest { patient_id: id }, &t)).await;
                let ok = match got {
                    Ok(p) if w == 0 => {
                        // One writer: update what it read.
                        let u = pb::UpdatePatientRequest { patient: p.into_inner().patient };
                        match client.update_patient(req(u, &t)).await {
                            Ok(_) => true,
                            Err(e) => {
                                eprintln!("update failed during re-encryption: {e:?}");
                                false
                            }
                        }
                    }
                    Ok(_) => true,
                    Err(e) => {
                        eprintln!("request failed during re-encryption: {e:?}");
                        false
                    }
                };
                if !ok {
                    errors.fetch_add(1, Ordering::SeqCst);
                }
                ops.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    let keyper = s.token("keyper", "key_admin");
    let start = pb::StartReencryptRequest { patient_id: String::new(), max_per_second: 0 };
    let job = keys(&s).start_reencrypt(req_for(start, &keyper, None)).await.unwrap().into_inner().job.unwrap();
    assert_eq!((job.state.as_str(), job.total), ("running", 120));
    let reencrypted = || {
        let (mut k, r) = (keys(&s), req_for(pb::GetReencryptJobRequest {}, &keyper, None));
        async move { k.get_reencrypt_job(r).await.unwrap().into_inner().job.filter(|j| j.state == "completed") }
    };
    let done = eventually(reencrypted).await;
    stop.store(true, Ordering::SeqCst);
    for l in load {
        l.await.unwrap();
    }
    let done = done.expect("re-encryption did not complete");
    assert_eq!(done.done, 120);
    assert!(done.record_versions >= 240, "{}", done.record_versions);
    assert!(ops.load(Ordering::SeqCst) > 0);
    assert_eq!(errors.load(Ordering::SeqCst), 0, "no request fails because of re-encryption");
    let events = s.all_events().await;
    assert!(events.iter().any(|e| e.action == "keys.reencrypt_batch"));
    assert!(events.iter().any(|e| e.action == "keys.reencrypt_complete"));

    // One patient again: generation 3 for it alone.
    let one = pb::StartReencryptRequest { patient_id: patients[5].id.clone(), max_per_second: 0 };
    keys(&s).start_reencrypt(req_for(one, &keyper, None)).await.unwrap();
    eventually(reencrypted).await.expect("the one-patient re-encryption did not complete");
    for p in &patients {
        let got = s.patients().get_patient(req(pb::GetPatientRequest { patient_id: p.id.clone() }, &s.admin())).await;
        assert_eq!(got.unwrap().into_inner().patient.unwrap().names, p.names);
    }
    let (data, _, _tmp) = s.stop_keep().await;
    let store = stored(&data).await;
    for (i, p) in patients.iter().enumerate() {
        let w = WrappedDataKey(store.data_key(id16(&p.id)).await.unwrap().unwrap());
        assert_eq!(w.generation().unwrap(), if i == 5 { 3 } else { 2 });
    }
}

/// How many key generations bucket `b` holds in `erasure-keys`.
fn generations_in_file(data: &Path, bucket: u16) -> usize {
    let bytes = std::fs::read(data.join("erasure-keys")).unwrap();
    let mut at = 7;
    for _ in 0..bucket {
        at += 1 + usize::from(bytes[at]) * 36;
    }
    usize::from(bytes[at])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_interrupted_before_the_old_bucket_generation_was_dropped_finishes_at_the_next_start() {
    let s = TestServer::start().await;
    let p = create(&s, patient("Crashy", "Cal", "1960-01-01", "CR-1")).await;
    let (data, key_dir, _tmp) = s.stop_keep().await;
    // The state a crash leaves between an erasure's commit and its last step: the
    // bucket holds two generations and a neighbour's key still names the old one.
    let bucket = bucket_of(&p.id);
    let old_key = bucket_key_from_file(&data, bucket);
    let source = KeySource::Files(KeyPaths { dir: key_dir.clone() });
    let shreds = keystore::open_for_data_dir(&source, &data).unwrap().shreds;
    keystore::write_erasure_keys(&data, &shreds.with_next_generation(bucket).unwrap()).unwrap();
    assert_eq!(generations_in_file(&data, bucket), 2);

    let s = TestServer::start_in(data.clone(), key_dir, Arc::new(carevault::clock::SystemClock)).await;
    let finished = eventually(|| async { (generations_in_file(&data, bucket) == 1).then_some(()) }).await;
    assert!(finished.is_some(), "the interrupted erasure was not finished");
    assert!(contains(&data, &old_key).is_empty());
    let got = s.patients().get_patient(req(pb::GetPatientRequest { patient_id: p.id.clone() }, &s.admin())).await;
    assert_eq!(got.unwrap().into_inner().patient.unwrap().names, p.names);
    let rekey = s.last_event("keys.erasure_rekey").await;
    assert!(rekey.details.contains(&format!("erasure_bucket={bucket}")), "{:?}", rekey.details);
}
