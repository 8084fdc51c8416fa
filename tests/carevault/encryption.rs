use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use carevault::clock::SystemClock;
use carevault::keystore::KeyError;
use carevault::proto::v1 as pb;
use carevault::server::{self, OpenOptions, ServerError};
use tonic::Code;

use crate::helpers::*;

pub fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() { out.extend(files_under(&p)) } else { out.push(p) }
    }
    out
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(hay, needle).is_some()
}

/// PHI that [`store_every_kind_of_phi`] stores, in every form it could
/// take in plaintext (as given, normalized for a blind index, upper case).
pub const PHI_NEEDLES: &[&[u8]] = &[
    b"Quixotewidget",
    b"quixotewidget",
    b"QUIXOTEWIDGET",
    b"Zanzibarella",
    b"Middlenamequark",
    b"078-05-1120",
    b"078051120",
    b"MRN-ZQX-7731",
    b"MRNZQX7731",
    b"MBRXQ99812",
    b"Platypusplan",
    b"1973-04-05",
    b"Elm Street",
    b"pat@example.org",
];

/// Creates, updates and searches a patient and a coverage holding every kind of PHI.
pub async fn store_every_kind_of_phi(s: &TestServer) {
    let mut p = patient("Quixotewidget", "Zanzibarella", "1973-04-05", "MRN-ZQX-7731");
    p.identifiers.push(pb::Identifier {
        system: "http://hl7.org/fhir/sid/us-ssn".into(),
        value: "078-05-1120".into(),
        r#type: pb::IdentifierType::Ss as i32,
    });
    let p = create(s, p).await;
    let mut c = coverage(&p.id, "MBRXQ99812", 1);
    c.plan_name = "Platypusplan Gold".into();
    create_coverage(s, c).await;
    let mut changed = p.clone();
    changed.names[0].given = vec!["Zanzibarella".into(), "Middlenamequark".into()];
    s.patients().update_patient(req(pb::UpdatePatientRequest { patient: Some(changed) }, &s.admin())).await.unwrap();
    use pb::search_patients_request::Criterion;
    search(
        s,
        Criterion::NameBirthDate(pb::NameBirthDateQuery {
            family: "Quixotewidget".into(),
            birth_date: "1973-04-05".into(),
        }),
    )
    .await;
}

sled_only! {
    #[tokio::test]
    async fn no_phi_appears_anywhere_in_the_data_directory() {
        let s = TestServer::start().await;
        store_every_kind_of_phi(&s).await;
        let (data_dir, key_dir, _guard) = s.stop_keep().await;
        let needles = PHI_NEEDLES;
        let files = files_under(&data_dir);
        assert!(files.iter().any(|f| f.ends_with("db")), "the database must be among the files searched");
        for f in &files {
            let bytes = std::fs::read(f).unwrap();
            for n in needles {
                assert!(!contains(&bytes, n), "{} contains {}", f.display(), String::from_utf8_lossy(n));
            }
        }
        // And the key material is not in the data directory either.
        let master = std::fs::read_to_string(key_dir.join("master-1.key")).unwrap();
        for f in &files {
            assert!(!contains(&std::fs::read(f).unwrap(), master.trim().as_bytes()));
        }
    }
}

#[tokio::test]
async fn swapping_two_records_ciphertexts_is_caught_on_read_as_data_loss_and_audited() {
    let s = TestServer::start().await;
    let a = create(&s, patient("Swap", "Alpha", "1980", "SW-A")).await;
    let b = create(&s, patient("Swap", "Beta", "1981", "SW-B")).await;
    let (data_dir, key_dir, guard) = s.stop_keep().await;
    let ra = carevault::storage::RecordRef::patient(*uuid::Uuid::parse_str(&a.id).unwrap().as_bytes());
    let rb = carevault::storage::RecordRef::patient(*uuid::Uuid::parse_str(&b.id).unwrap().as_bytes());
    let (ca, cb) = {
        let store = stored(&data_dir).await;
        (store.record_version(ra, 1).await.unwrap().unwrap(), store.record_version(rb, 1).await.unwrap().unwrap())
    };
    danger_put_record(&data_dir, ra, 1, cb).await;
    danger_put_record(&data_dir, rb, 1, ca).await;
    let s = TestServer::start_in(data_dir, key_dir, Arc::new(SystemClock)).await;
    for id in [&a.id, &b.id] {
        let err = s
            .patients()
            .get_patient(req(pb::GetPatientRequest { patient_id: id.clone() }, &s.admin()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::DataLoss);
    }
    let ev = s.last_event("patient.read").await;
    assert_eq!(ev.outcome, pb::AuditOutcome::DataLoss as i32);
    assert_eq!(ev.patient_id, b.id);
    drop(guard);
}

#[tokio::test]
async fn a_wrong_master_key_fails_at_start_up_before_the_data_is_touched() {
    let s = TestServer::start().await;
    create(&s, patient("Key", "Check", "1980", "KC-1")).await;
    let (data_dir, key_dir, _guard) = s.stop_keep().await;
    let snapshot: Vec<_> =
        files_under(&data_dir).into_iter().map(|f| (f.clone(), std::fs::read(&f).unwrap())).collect();
    std::fs::write(key_dir.join("master-1.key"), format!("{}\n", "ab".repeat(32))).unwrap();
    let result = server::open(&config(data_dir.clone(), key_dir.clone()), OpenOptions::system()).await;
    match result {
        Err(ServerError::Keys(KeyError::WrongKey(1))) => {}
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a wrong key must not open"),
    }
    let msg = KeyError::WrongKey(1).to_string();
    assert!(msg.contains("wrong master key") && msg.contains("nothing was modified"));
    for (f, bytes) in snapshot {
        assert_eq!(std::fs::read(&f).unwrap(), bytes, "{} changed", f.display());
    }
    // A missing key is just as clear.
    std::fs::remove_file(key_dir.join("master-1.key")).unwrap();
    let result = server::open(&config(data_dir, key_dir), OpenOptions::system()).await;
    assert!(matches!(result, Err(ServerError::Keys(KeyError::MissingVersion(1)))));
}

#[tokio::test]
async fn a_key_file_readable_by_others_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let key_dir = tmp.path().join("keys");
    carevault::keystore::ensure_keys(&carevault::keystore::KeyPaths { dir: key_dir.clone() }).unwrap();
    std::fs::set_permissions(key_dir.join("master-1.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let result = server::open(&config(tmp.path().join("data"), key_dir), OpenOptions::system()).await;
    assert!(matches!(result, Err(ServerError::Keys(KeyError::Permissions(_)))));
}

sled_only! {
    #[tokio::test]
    async fn after_a_failed_sync_no_data_leaves_and_nothing_succeeds_until_a_restart() {
        let s = TestServer::start().await;
        let p = create(&s, patient("Fail", "Closed", "1980", "FC-1")).await;
        s.fail_syncs.store(true, Ordering::SeqCst);
        let err = s
            .patients()
            .get_patient(req(pb::GetPatientRequest { patient_id: p.id.clone() }, &s.admin()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        assert!(!format!("{err:?}").contains("Closed"));
        // The disk works again, but what the failed sync covered may be lost:
        // nothing may be chained after it, so every later call fails too.
        s.fail_syncs.store(false, Ordering::SeqCst);
        let get = || req(pb::GetPatientRequest { patient_id: p.id.clone() }, &s.admin());
        for _ in 0..3 {
            assert_eq!(s.patients().get_patient(get()).await.unwrap_err().code(), Code::Unavailable);
        }
        let create_req =
            req(pb::CreatePatientRequest { patient: Some(patient("Fail", "Write", "1980", "FC-2")) }, &s.admin());
        assert_eq!(s.patients().create_patient(create_req).await.unwrap_err().code(), Code::Unavailable);
        let head = s.audit().get_audit_head(req(pb::GetAuditHeadRequest {}, &s.admin())).await.unwrap_err();
        assert_eq!(head.code(), Code::Unavailable);
        let mut health = tonic_health::pb::health_client::HealthClient::new(s.channel.clone());
        let status = eventually(|| {
            let mut h = health.clone();
            async move {
                let r = h.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.ok()?.into_inner();
                (r.status == tonic_health::pb::health_check_response::ServingStatus::NotServing as i32).then_some(r.status)
            }
        })
        .await;
        assert!(status.is_some(), "health reports NOT_SERVING");
        let r = health
            .check(tonic_health::pb::HealthCheckRequest { service: "carevault.v1.PatientService".into() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, tonic_health::pb::health_check_response::ServingStatus::NotServing as i32);

        // A restart recovers: the patient reads again and the chain verifies.
        let (data_dir, key_dir, _guard) = s.stop_keep().await;
        let s = TestServer::start_in(data_dir, key_dir, Arc::new(SystemClock)).await;
        let got = s.patients().get_patient(get_for(&s, &p.id)).await.unwrap();
        assert_eq!(got.into_inner().patient.unwrap().names[0].given[0], "Closed");
        let (data_dir, _, _guard2) = s.stop_keep().await;
        let store = open_when_unlocked(|| carevault::storage::sled::SledStore::open(&data_dir.join("db"), 8 << 20)).await;
        assert!(carevault::audit::verify_chain(raw_chain(&store), None).is_ok());
    }
}

fn get_for(s: &TestServer, id: &str) -> tonic::Request<pb::GetPatientRequest> {
    req(pb::GetPatientRequest { patient_id: id.into() }, &s.admin())
}

/// The keys a stopped data directory's records open with, as an operator holding the key directory has them.
fn offline_keys(
    data_dir: &std::path::Path,
    key_dir: &std::path::Path,
) -> (carevault::crypto::Keyring, carevault::crypto::ShredKeys) {
    use carevault::keystore::{self, KeyPaths, KeySource};
    let local =
        keystore::open_for_data_dir(&KeySource::Files(KeyPaths { dir: key_dir.to_path_buf() }), data_dir).unwrap();
    (local.ring.expect("keycheck.json"), local.shreds)
}

#[tokio::test]
async fn records_sealed_as_json_by_earlier_releases_still_read_and_their_next_version_is_binary() {
    use carevault::crypto::{self, RecordAad, RecordKind, WrappedDataKey};
    use carevault::domain::plaintext::Plaintext;
    use carevault::domain::{Coverage, Patient};
    use carevault::storage::RecordRef;

    let s = TestServer::start().await;
    let p = create(&s, patient("Legacy", "Lena", "1950-06-07", "LEG-1")).await;
    let c = create_coverage(&s, coverage(&p.id, "LEGMEMBER1", 1)).await;
    let (data_dir, key_dir, guard) = s.stop_keep().await;

    // Rewrite both records' version 1 as an earlier release sealed them: the JSON of the record.
    let pid = *uuid::Uuid::parse_str(&p.id).unwrap().as_bytes();
    let cid = *uuid::Uuid::parse_str(&c.id).unwrap().as_bytes();
    let (ring, shreds) = offline_keys(&data_dir, &key_dir);
    let store = stored(&data_dir).await;
    let dek =
        ring.unwrap_data_key(&pid, &WrappedDataKey(store.data_key(pid).await.unwrap().unwrap()), &shreds).unwrap();
    let aad = |kind, id| RecordAad { kind, record_id: id, patient_id: pid, version: 1 };
    let (pa, ca) = (aad(RecordKind::Patient, pid), aad(RecordKind::Coverage, cid));
    let sealed_p = store.record_version(RecordRef::patient(pid), 1).await.unwrap().unwrap();
    let sealed_c = store.record_version(RecordRef::coverage(cid), 1).await.unwrap().unwrap();
    let plain_p = crypto::open_record(&dek, &pa, &sealed_p).unwrap();
    let plain_c = crypto::open_record(&dek, &ca, &sealed_c).unwrap();
    assert_eq!((plain_p[0], plain_c[0]), (0x02, 0x02), "records are written in format 2");
    let json_p = serde_json::to_vec(&Patient::from_plaintext(&plain_p).unwrap()).unwrap();
    let json_c = serde_json::to_vec(&Coverage::from_plaintext(&plain_c).unwrap()).unwrap();
    drop(store);
    danger_put_record(&data_dir, RecordRef::patient(pid), 1, crypto::seal_record(&dek, &pa, &json_p).unwrap()).await;
    danger_put_record(&data_dir, RecordRef::coverage(cid), 1, crypto::seal_record(&dek, &ca, &json_c).unwrap()).await;

    let s = TestServer::start_in(data_dir, key_dir, Arc::new(SystemClock)).await;
    let got = s.patients().get_patient(req(pb::GetPatientRequest { patient_id: p.id.clone() }, &s.admin())).await;
    assert_eq!(got.unwrap().into_inner().patient.unwrap(), p);
    let got = s.coverages().get_coverage(req(pb::GetCoverageRequest { coverage_id: c.id.clone() }, &s.admin())).await;
    assert_eq!(got.unwrap().into_inner().coverage.unwrap(), c);
    // An update reads the JSON version and writes version 2 in format 2.
    let mut changed = p.clone();
    changed.preferred_language = "es".into();
    let updated =
        s.patients().update_patient(req(pb::UpdatePatientRequest { patient: Some(changed) }, &s.admin())).await;
    assert_eq!(updated.unwrap().into_inner().patient.unwrap().version, 2);
    let (data_dir, _key_dir, _guard2) = s.stop_keep().await;
    let store = stored(&data_dir).await;
    let v2 = store.record_version(RecordRef::patient(pid), 2).await.unwrap().unwrap();
    let plain = crypto::open_record(&dek, &RecordAad { version: 2, ..pa }, &v2).unwrap();
    assert_eq!(plain[0], 0x02);
    assert_eq!(Patient::from_plaintext(&plain).unwrap().data.preferred_language.as_deref(), Some("es"));
    drop(guard);
}
