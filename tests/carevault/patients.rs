use carevault::proto::v1 as pb;
use tonic::Code;

use crate::helpers::*;

#[tokio::test]
async fn a_created_patient_reads_back_with_id_version_and_times() {
    let s = TestServer::start().await;
    let created = create(&s, patient("Okafor", "Adaeze", "1984-03-09", "MRN-1001")).await;
    assert_eq!(created.version, 1);
    assert!(created.active);
    assert!(uuid::Uuid::parse_str(&created.id).unwrap().get_version_num() == 7);
    let got = s
        .patients()
        .get_patient(req(pb::GetPatientRequest { patient_id: created.id.clone() }, &s.admin()))
        .await
        .unwrap()
        .into_inner()
        .patient
        .unwrap();
    assert_eq!(got, created);
    assert_eq!(got.names[0].family, "Okafor");
    assert_eq!(got.contacts[0].name.as_ref().unwrap().family, "Kin");
}

#[tokio::test]
async fn an_update_with_the_current_version_bumps_it_and_a_stale_one_is_aborted() {
    let s = TestServer::start().await;
    let created = create(&s, patient("Lindqvist", "Maja", "1990-07-01", "MRN-2")).await;
    let mut changed = created.clone();
    changed.addresses[0].city = "Shelbyville".into();
    let updated = s
        .patients()
        .update_patient(req(pb::UpdatePatientRequest { patient: Some(changed.clone()) }, &s.admin()))
        .await
        .unwrap()
        .into_inner()
        .patient
        .unwrap();
    assert_eq!(updated.version, 2);
    assert_eq!(updated.addresses[0].city, "Shelbyville");
    assert_eq!(updated.create_time, created.create_time);

    // The same stale version again: ABORTED, nothing changes.
    let mut stale = changed.clone();
    stale.addresses[0].city = "Capital City".into();
    let err = s
        .patients()
        .update_patient(req(pb::UpdatePatientRequest { patient: Some(stale) }, &s.admin()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    let now = s
        .patients()
        .get_patient(req(pb::GetPatientRequest { patient_id: created.id.clone() }, &s.admin()))
        .await
        .unwrap()
        .into_inner()
        .patient
        .unwrap();
    assert_eq!(now.version, 2);
    assert_eq!(now.addresses[0].city, "Shelbyville");
    assert_eq!(s.last_event("patient.update").await.outcome, pb::AuditOutcome::Aborted as i32);
}

#[tokio::test]
async fn concurrent_updates_at_one_version_let_exactly_one_win() {
    let s = TestServer::start().await;
    let created = create(&s, patient("Race", "Condition", "1970", "MRN-R")).await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut client = s.patients();
        let token = s.admin();
        let mut p = created.clone();
        p.preferred_language = if i % 2 == 0 { "es".into() } else { "fr".into() };
        tasks.push(tokio::spawn(async move {
            client.update_patient(req(pb::UpdatePatientRequest { patient: Some(p) }, &token)).await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(e.code(), Code::Aborted),
        }
    }
    assert_eq!(ok, 1);
}

#[tokio::test]
async fn delete_is_soft_and_history_keeps_every_version() {
    let s = TestServer::start().await;
    let created = create(&s, patient("Moreau", "Jules", "1961-12", "MRN-3")).await;
    let deleted = s
        .patients()
        .delete_patient(req(pb::DeletePatientRequest { patient_id: created.id.clone(), version: 1 }, &s.admin()))
        .await
        .unwrap()
        .into_inner()
        .patient
        .unwrap();
    assert!(!deleted.active);
    assert!(deleted.delete_time.is_some());
    assert_eq!(deleted.version, 2);
    // Updating a deleted patient is refused.
    let err = s
        .patients()
        .update_patient(req(pb::UpdatePatientRequest { patient: Some(deleted.clone()) }, &s.admin()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let history = s
        .patients()
        .get_patient_history(req(pb::GetPatientHistoryRequest { patient_id: created.id.clone() }, &s.admin()))
        .await
        .unwrap()
        .into_inner()
        .versions;
    assert_eq!(history.iter().map(|p| p.version).collect::<Vec<_>>(), vec![1, 2]);
    assert!(history[0].active && !history[1].active);
}

#[tokio::test]
async fn list_pages_through_patients_and_hides_deleted_unless_asked() {
    let s = TestServer::start().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(create(&s, patient("Pager", &format!("N{i}"), "2000-01-01", &format!("MRN-P{i}"))).await.id);
    }
    s.patients()
        .delete_patient(req(pb::DeletePatientRequest { patient_id: ids[1].clone(), version: 1 }, &s.admin()))
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let r = s
            .patients()
            .list_patients(req(pb::ListPatientsRequest { page_size: 2, page_token, show_deleted: false }, &s.admin()))
            .await
            .unwrap()
            .into_inner();
        assert!(r.patients.len() <= 2);
        seen.extend(r.patients.into_iter().map(|p| p.id));
        if r.next_page_token.is_empty() {
            break;
        }
        page_token = r.next_page_token;
    }
    let expected: Vec<_> = ids.iter().enumerate().filter(|(i, _)| *i != 1).map(|(_, id)| id.clone()).collect();
    assert_eq!(seen, expected);
    let all = s
        .patients()
        .list_patients(req(
            pb::ListPatientsRequest { page_size: 50, page_token: String::new(), show_deleted: true },
            &s.admin(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.patients.len(), 5);
    let ev = s.last_event("patient.list").await;
    assert_eq!(ev.result_count, Some(5));
    assert_eq!(ev.returned_patient_ids, ids);
}

#[tokio::test]
async fn search_finds_by_identifier_and_by_accent_insensitive_name_and_birth_date() {
    let s = TestServer::start().await;
    let a = create(&s, patient("Núñez-García", "Sofía", "1975-05-20", "A-77-1")).await;
    let _b = create(&s, patient("Nunez", "Other", "1976-05-20", "B-2")).await;
    use pb::search_patients_request::Criterion;
    let by_id = search(
        &s,
        Criterion::Identifier(pb::IdentifierQuery {
            system: "HTTPS://hospital.example/mrn".into(),
            value: "a771".into(),
        }),
    )
    .await;
    assert_eq!(by_id.patients.iter().map(|p| &p.id).collect::<Vec<_>>(), vec![&a.id]);
    let by_name = search(
        &s,
        Criterion::NameBirthDate(pb::NameBirthDateQuery {
            family: "NUNEZ GARCIA".into(),
            birth_date: "1975-05-20".into(),
        }),
    )
    .await;
    assert_eq!(by_name.patients.len(), 1);
    assert_eq!(by_name.patients[0].id, a.id);
    let none = search(
        &s,
        Criterion::NameBirthDate(pb::NameBirthDateQuery {
            family: "Nunez-Garcia".into(),
            birth_date: "1975-05-21".into(),
        }),
    )
    .await;
    assert!(none.patients.is_empty());
    let ev = s.last_event("patient.search").await;
    assert_eq!(ev.result_count, Some(0));
}

#[tokio::test]
async fn search_follows_changes_made_by_updates() {
    let s = TestServer::start().await;
    let a = create(&s, patient("Before", "Name", "1988-08-08", "OLD-1")).await;
    let mut changed = a.clone();
    changed.identifiers[0].value = "NEW-1".into();
    s.patients().update_patient(req(pb::UpdatePatientRequest { patient: Some(changed) }, &s.admin())).await.unwrap();
    use pb::search_patients_request::Criterion;
    let find = |value: &str| pb::SearchPatientsRequest {
        criterion: Some(Criterion::Identifier(pb::IdentifierQuery {
            system: "https://hospital.example/mrn".into(),
            value: value.into(),
        })),
        show_deleted: false,
        page_size: 0,
    };
    let old = s.patients().search_patients(req(find("OLD-1"), &s.admin())).await.unwrap().into_inner();
    let new = s.patients().search_patients(req(find("NEW-1"), &s.admin())).await.unwrap().into_inner();
    assert!(old.patients.is_empty());
    assert_eq!(new.patients.len(), 1);
}

#[tokio::test]
async fn a_missing_patient_is_not_found_and_audited() {
    let s = TestServer::start().await;
    let id = uuid::Uuid::now_v7().to_string();
    let err =
        s.patients().get_patient(req(pb::GetPatientRequest { patient_id: id.clone() }, &s.admin())).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let ev = s.last_event("patient.read").await;
    assert_eq!(ev.outcome, pb::AuditOutcome::NotFound as i32);
    assert_eq!(ev.patient_id, id);
}

#[tokio::test]
async fn the_request_id_is_echoed_and_recorded() {
    let s = TestServer::start().await;
    let created = create(&s, patient("Echo", "Id", "1999", "E-1")).await;
    let mut r = req(pb::GetPatientRequest { patient_id: created.id.clone() }, &s.admin());
    r.metadata_mut().insert("x-request-id", "desk-42.req-7".parse().unwrap());
    let resp = s.patients().get_patient(r).await.unwrap();
    assert_eq!(resp.metadata().get("x-request-id").unwrap(), "desk-42.req-7");
    let ev = s.last_event("patient.read").await;
    assert_eq!(ev.request_id, "desk-42.req-7");
    // Without one, the server makes one up and returns it.
    let resp =
        s.patients().get_patient(req(pb::GetPatientRequest { patient_id: created.id }, &s.admin())).await.unwrap();
    let generated = resp.metadata().get("x-request-id").unwrap().to_str().unwrap().to_string();
    assert!(uuid::Uuid::parse_str(&generated).is_ok());
}

#[tokio::test]
async fn health_and_reflection_answer_without_a_token() {
    let s = TestServer::start().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(s.channel.clone());
    let r = health
        .check(tonic_health::pb::HealthCheckRequest { service: "carevault.v1.PatientService".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut refl = ServerReflectionClient::new(s.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl.server_reflection_info(tokio_stream::iter(vec![request])).await.unwrap().into_inner();
    let msg = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else { panic!("unexpected reply") };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for svc in ["carevault.v1.PatientService", "carevault.v1.CoverageService", "carevault.v1.AuditService"] {
        assert!(names.contains(&svc.to_string()), "{names:?}");
    }
    // Resolving a service's file needs its imports (google/protobuf/timestamp.proto) too.
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol("carevault.v1.PatientService".into())),
    };
    let mut stream = refl.server_reflection_info(tokio_stream::iter(vec![request])).await.unwrap().into_inner();
    let msg = stream.message().await.unwrap().unwrap();
    assert!(matches!(msg.message_response, Some(MessageResponse::FileDescriptorResponse(_))));

    // The older v1alpha protocol, which many Python and grpcurl builds still use.
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient as AlphaClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest as AlphaRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse as AlphaResponse;
    let mut alpha = AlphaClient::new(s.channel.clone());
    let request = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(AlphaRequest::ListServices(String::new())),
    };
    let mut stream = alpha.server_reflection_info(tokio_stream::iter(vec![request])).await.unwrap().into_inner();
    let msg = stream.message().await.unwrap().unwrap();
    let Some(AlphaResponse::ListServicesResponse(list)) = msg.message_response else { panic!("unexpected reply") };
    assert!(list.service.iter().any(|s| s.name == "carevault.v1.AuditService"));
}

fn create_with_key(p: &pb::Patient, token: &str, key: &str) -> tonic::Request<pb::CreatePatientRequest> {
    let mut r = req(pb::CreatePatientRequest { patient: Some(p.clone()) }, token);
    r.metadata_mut().insert("x-idempotency-key", key.parse().unwrap());
    r
}

/// A create retried with the same `x-idempotency-key` (the caller never
/// learned whether the first one committed) gets the patient the first one
/// made, never a second patient; the key is the caller's own; a malformed
/// key is refused naming the header, and audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_retried_with_its_idempotency_key_makes_one_patient() {
    let s = TestServer::start().await;
    let p = patient("Idem", "Potent", "1977-07-07", "IDEM-1");
    let first = s.patients().create_patient(create_with_key(&p, &s.admin(), "order-4711")).await.unwrap().into_inner();
    let again = s.patients().create_patient(create_with_key(&p, &s.admin(), "order-4711")).await.unwrap().into_inner();
    let (first, again) = (first.patient.unwrap(), again.patient.unwrap());
    assert_eq!(first.id, again.id, "the retry gets the first create's patient");
    assert_eq!(again.version, 1);
    let replay = s.last_event("patient.create").await;
    assert_eq!(replay.patient_id, first.id);
    assert!(replay.details.iter().any(|d| d == "idempotent_replay=true"), "{:?}", replay.details);
    // Another caller's same key is another key.
    let other = s.token("other-desk", ALL_SCOPES);
    let theirs = s.patients().create_patient(create_with_key(&p, &other, "order-4711")).await.unwrap().into_inner();
    assert_ne!(theirs.patient.unwrap().id, first.id);
    // Racing retries of one key: one patient.
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let (mut c, p, t) = (s.patients(), p.clone(), s.admin());
            tokio::spawn(async move { c.create_patient(create_with_key(&p, &t, "order-4712")).await })
        })
        .collect();
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => {
                ids.insert(r.into_inner().patient.unwrap().id);
            }
            Err(e) => assert_eq!(e.code(), Code::Aborted, "{e:?}"),
        }
    }
    assert_eq!(ids.len(), 1, "racing retries made one patient: {ids:?}");
    // Malformed keys: too long, or not visible ASCII.
    for bad in ["x".repeat(256), "has space".to_string()] {
        let err = s.patients().create_patient(create_with_key(&p, &s.admin(), &bad)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(bad_fields(&err), vec!["x-idempotency-key"]);
        assert_eq!(s.last_event("patient.create").await.outcome, pb::AuditOutcome::InvalidArgument as i32);
    }
}
