use carevault::audit::{AuditEntry, RawEntry, verify_chain};
use carevault::proto::v1 as pb;

use crate::helpers::*;

#[tokio::test]
async fn every_call_appends_one_entry_with_identifiers_and_no_phi() {
    let s = TestServer::start().await;
    let p = create(&s, patient("Phiname", "Secretgiven", "1966-06-06", "MRN-PHI-123")).await;
    let token = s.token("desk-7", ALL_SCOPES);
    let mut r = req(pb::GetPatientRequest { patient_id: p.id.clone() }, &token);
    r.metadata_mut().insert("x-request-id", "rq-1".parse().unwrap());
    s.patients().get_patient(r).await.unwrap();
    let events = s.all_events().await;
    // genesis, the key state, the log key, create, read (the list call that fetched them is appended after its scan)
    assert_eq!(
        events.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
        vec!["audit.genesis", "keys.state_recorded", "keys.log_key_created", "patient.create", "patient.read"]
    );
    let read = &events[4];
    assert_eq!(read.sequence, 4);
    assert_eq!(read.actor, "desk-7");
    assert_eq!(read.scopes, vec!["patients.read"]);
    assert_eq!(read.request_id, "rq-1");
    assert_eq!(read.resource_type, "patient");
    assert_eq!(read.resource_id, p.id);
    assert_eq!(read.patient_id, p.id);
    assert_eq!(read.record_version, 1);
    assert_eq!(read.key_version, 1);
    assert_eq!(read.outcome, pb::AuditOutcome::Ok as i32);
    assert!(read.client_address.starts_with("127.0.0.1:"));
    assert_eq!(read.previous_hash, events[3].hash);
    let dump = format!("{events:?}");
    // The phone number, whole and as digits ("555" alone is also in some port numbers).
    for phi in ["Phiname", "Secretgiven", "1966-06-06", "MRN-PHI-123", "Elm Street", "010-0199", "5550100199"] {
        assert!(!dump.contains(phi), "audit events must not contain {phi}");
    }
}

#[tokio::test]
async fn list_filters_by_patient_actor_action_and_outcome_and_pages() {
    let s = TestServer::start().await;
    let a = create(&s, patient("Filter", "A", "1980", "F-A")).await;
    let b = create(&s, patient("Filter", "B", "1980", "F-B")).await;
    let nosy = s.token("nosy", ALL_SCOPES);
    for _ in 0..3 {
        s.patients().get_patient(req(pb::GetPatientRequest { patient_id: a.id.clone() }, &nosy)).await.unwrap();
    }
    s.patients().get_patient(req(pb::GetPatientRequest { patient_id: b.id.clone() }, &s.admin())).await.unwrap();
    // Search results name the patients they returned, so they count as access too.
    use pb::search_patients_request::Criterion;
    s.patients()
        .search_patients(req(
            pb::SearchPatientsRequest {
                criterion: Some(Criterion::NameBirthDate(pb::NameBirthDateQuery {
                    family: "filter".into(),
                    birth_date: "1980".into(),
                })),
                ..Default::default()
            },
            &nosy,
        ))
        .await
        .unwrap();
    let list = |f: pb::ListAuditEventsRequest| {
        let mut c = s.audit();
        let t = s.admin();
        async move { c.list_audit_events(req(f, &t)).await.unwrap().into_inner() }
    };
    let who_saw_a = list(pb::ListAuditEventsRequest { patient_id: a.id.clone(), ..Default::default() }).await;
    let actions: Vec<_> = who_saw_a.events.iter().map(|e| (e.action.as_str(), e.actor.as_str())).collect();
    assert_eq!(
        actions,
        vec![
            ("patient.create", "tester"),
            ("patient.read", "nosy"),
            ("patient.read", "nosy"),
            ("patient.read", "nosy"),
            ("patient.search", "nosy")
        ]
    );
    let by_actor =
        list(pb::ListAuditEventsRequest { actor: "nosy".into(), action: "patient.read".into(), ..Default::default() })
            .await;
    assert_eq!(by_actor.events.len(), 3);
    let ok_only = list(pb::ListAuditEventsRequest {
        outcome: pb::AuditOutcome::Ok as i32,
        action: "patient.create".into(),
        ..Default::default()
    })
    .await;
    assert_eq!(ok_only.events.len(), 2);
    let page1 = list(pb::ListAuditEventsRequest { page_size: 2, ..Default::default() }).await;
    assert_eq!(page1.events.len(), 2);
    let page2 = list(pb::ListAuditEventsRequest {
        page_size: 2,
        page_token: page1.next_page_token.clone(),
        ..Default::default()
    })
    .await;
    assert_eq!(page2.events[0].sequence, page1.events[1].sequence + 1);
    let future = pbjson_types::Timestamp { seconds: now_secs() + 3600, nanos: 0 };
    let none = list(pb::ListAuditEventsRequest { start_time: Some(future), ..Default::default() }).await;
    assert!(none.events.is_empty());
}

#[tokio::test]
async fn export_streams_the_exact_hashed_bytes_and_they_verify_to_the_head() {
    let s = TestServer::start().await;
    for i in 0..20 {
        create(&s, patient("Export", &format!("P{i}"), "1980", &format!("EX-{i}"))).await;
    }
    let head_before = s.audit().get_audit_head(req(pb::GetAuditHeadRequest {}, &s.admin())).await.unwrap().into_inner();
    let mut stream = s
        .audit()
        .export_audit_events(req(pb::ExportAuditEventsRequest { start_sequence: 0 }, &s.admin()))
        .await
        .unwrap()
        .into_inner();
    let mut entries = Vec::new();
    while let Some(msg) = stream.message().await.unwrap() {
        entries.extend(msg.entries);
    }
    // genesis + the key state + the log key + 20 creates + head + the export itself
    assert_eq!(entries.len(), 25);
    assert_eq!(entries.last().map(|e| AuditEntry::decode(&e.entry).unwrap().action), Some("audit.export".to_string()));
    let head_entry = &entries[usize::try_from(head_before.sequence).unwrap()];
    assert_eq!(carevault::crypto::sha256(&head_entry.entry).to_vec(), head_before.hash);
    let raw = entries.iter().map(|e| RawEntry {
        bytes: e.entry.clone(),
        stored_hash: e.hash.as_slice().try_into().ok(),
        stored_sequence: Some(e.sequence),
    });
    let expect = carevault::audit::ExpectedHead {
        sequence: head_before.sequence,
        hash: head_before.hash.clone().try_into().unwrap(),
    };
    let report = verify_chain(raw, Some(expect));
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.entries_checked, 25);
}

#[tokio::test]
async fn every_stored_version_has_its_ok_audit_entry_and_every_ok_write_entry_its_version() {
    let s = TestServer::start().await;
    let mut ids = Vec::new();
    for i in 0..4 {
        let p = create(&s, patient("Atomic", &format!("A{i}"), "1980", &format!("AT-{i}"))).await;
        let c = create_coverage(&s, coverage(&p.id, &format!("M{i}"), 1)).await;
        let mut changed = p.clone();
        changed.preferred_language = "es".into();
        s.patients()
            .update_patient(req(pb::UpdatePatientRequest { patient: Some(changed.clone()) }, &s.admin()))
            .await
            .unwrap();
        // A stale retry: audited as aborted, writes nothing.
        let _ = s.patients().update_patient(req(pb::UpdatePatientRequest { patient: Some(changed) }, &s.admin())).await;
        ids.push((p.id, c.id));
    }
    let (data_dir, _keys, _guard) = s.stop_keep().await;
    let store = stored(&data_dir).await;
    let entries: Vec<AuditEntry> =
        stored_entries(store.as_ref()).await.iter().map(|e| AuditEntry::decode(&e.bytes).unwrap()).collect();
    let writes: Vec<(String, String, u64)> = entries
        .iter()
        .filter(|e| {
            e.outcome == "ok"
                && (e.action.ends_with(".create") || e.action.ends_with(".update") || e.action.ends_with(".delete"))
        })
        .map(|e| (e.resource_type.clone(), e.resource_id.clone(), e.record_version))
        .collect();
    let mut stored = Vec::new();
    for (patient_id, coverage_id) in &ids {
        for (kind, kind_name, id) in [
            (carevault::crypto::RecordKind::Patient, "patient", patient_id),
            (carevault::crypto::RecordKind::Coverage, "coverage", coverage_id),
        ] {
            let bytes = *uuid::Uuid::parse_str(id).unwrap().as_bytes();
            for (version, _) in store.versions(carevault::storage::RecordRef { kind, id: bytes }).await.unwrap() {
                stored.push((kind_name.to_string(), id.clone(), version));
            }
        }
    }
    stored.sort();
    let mut audited = writes.clone();
    audited.sort();
    assert_eq!(stored, audited, "records and their ok write entries must match one to one");
    assert_eq!(entries.iter().filter(|e| e.outcome == "aborted").count(), 4);
}
