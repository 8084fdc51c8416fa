use carevault::proto::v1 as pb;
use tonic::Code;

use crate::helpers::*;

/// A change that makes a valid patient invalid in one field.
type Mutation = Box<dyn Fn(&mut pb::Patient)>;

async fn patient_count(s: &TestServer) -> usize {
    s.patients()
        .list_patients(req(
            pb::ListPatientsRequest { page_size: 200, page_token: String::new(), show_deleted: true },
            &s.admin(),
        ))
        .await
        .unwrap()
        .into_inner()
        .patients
        .len()
}

async fn rejected_fields(s: &TestServer, p: pb::Patient) -> Vec<String> {
    let err =
        s.patients().create_patient(req(pb::CreatePatientRequest { patient: Some(p) }, &s.admin())).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    bad_fields(&err)
}

#[tokio::test]
async fn each_invalid_field_is_named_nothing_is_written_and_the_attempt_is_audited() {
    let s = TestServer::start().await;
    let base = || patient("Valid", "Val", "1980-01-01", "MRN-V");
    let cases: Vec<(&str, Mutation)> = vec![
        ("patient.names", Box::new(|p| p.names.clear())),
        ("patient.names[0].family", Box::new(|p| p.names[0].family = "  ".into())),
        ("patient.names[0].family", Box::new(|p| p.names[0].family = "x".repeat(101))),
        ("patient.names[0].given", Box::new(|p| p.names[0].given = vec!["g".into(); 6])),
        ("patient.gender", Box::new(|p| p.gender = 99)),
        ("patient.birth_date", Box::new(|p| p.birth_date = "1980-02-30".into())),
        ("patient.birth_date", Box::new(|p| p.birth_date = "2999-01-01".into())),
        ("patient.birth_date", Box::new(|p| p.birth_date = "01/02/1980".into())),
        ("patient.telecom[0].value", Box::new(|p| p.telecom[0].value = "not a phone".into())),
        ("patient.telecom[1].value", Box::new(|p| p.telecom[1].value = "no-at-sign.example.org".into())),
        ("patient.telecom[0].system", Box::new(|p| p.telecom[0].system = 0)),
        ("patient.identifiers[0].system", Box::new(|p| p.identifiers[0].system = String::new())),
        ("patient.identifiers", Box::new(|p| p.identifiers = vec![p.identifiers[0].clone(); 21])),
        ("patient.addresses[0].lines[0]", Box::new(|p| p.addresses[0].lines[0] = "bell\u{7}".into())),
        ("patient.preferred_language", Box::new(|p| p.preferred_language = "english please".into())),
        ("patient.contacts[0].relationship", Box::new(|p| p.contacts[0].relationship = 0)),
        ("patient.contacts[0].name", Box::new(|p| p.contacts[0].name = None)),
    ];
    for (field, mutate) in &cases {
        let mut p = base();
        mutate(&mut p);
        let fields = rejected_fields(&s, p).await;
        assert!(fields.iter().any(|f| f == field), "expected {field} in {fields:?}");
    }
    assert_eq!(patient_count(&s).await, 0, "nothing may be written");
    let events = s.all_events().await;
    let invalid = events
        .iter()
        .filter(|e| e.action == "patient.create" && e.outcome == pb::AuditOutcome::InvalidArgument as i32)
        .count();
    assert_eq!(invalid, cases.len());
}

#[tokio::test]
async fn several_bad_fields_are_reported_together_without_echoing_values() {
    let s = TestServer::start().await;
    let mut p = patient("Valid", "Val", "1980-01-01", "MRN-V");
    p.birth_date = "SECRET-DOB-VALUE".into();
    p.telecom[1].value = "SECRET-EMAIL-VALUE".into();
    let err =
        s.patients().create_patient(req(pb::CreatePatientRequest { patient: Some(p) }, &s.admin())).await.unwrap_err();
    let fields = bad_fields(&err);
    assert_eq!(fields, vec!["patient.birth_date", "patient.telecom[1].value"]);
    let rendered = format!("{err:?}");
    assert!(!rendered.contains("SECRET"), "values must not be echoed: {rendered}");
}

#[tokio::test]
async fn an_oversized_request_is_rejected_and_audited() {
    let s = TestServer::start().await;
    let mut p = patient("Big", "Request", "1980", "MRN-B");
    // 400 identifiers of maximum size: about 155 KB, over the 64 KiB limit (and over the count limit).
    p.identifiers = vec![pb::Identifier { system: "s".repeat(256), value: "v".repeat(128), r#type: 1 }; 400];
    let fields = rejected_fields(&s, p).await;
    assert!(fields.contains(&"request".to_string()), "{fields:?}");
}

#[tokio::test]
async fn malformed_ids_page_tokens_and_missing_criteria_are_invalid_arguments() {
    let s = TestServer::start().await;
    let err =
        s.patients().get_patient(req(pb::GetPatientRequest { patient_id: "42".into() }, &s.admin())).await.unwrap_err();
    assert_eq!(bad_fields(&err), vec!["patient_id"]);
    let err = s
        .patients()
        .list_patients(req(
            pb::ListPatientsRequest { page_size: 500, page_token: "garbage".into(), show_deleted: false },
            &s.admin(),
        ))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&err), vec!["page_size", "page_token"]);
    let err = s.patients().search_patients(req(pb::SearchPatientsRequest::default(), &s.admin())).await.unwrap_err();
    assert_eq!(bad_fields(&err), vec!["criterion"]);
    let err = s
        .patients()
        .delete_patient(req(
            pb::DeletePatientRequest { patient_id: uuid::Uuid::now_v7().to_string(), version: 0 },
            &s.admin(),
        ))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&err), vec!["version"]);
    let err = s
        .coverages()
        .get_active_coverage(req(
            pb::GetActiveCoverageRequest { patient_id: uuid::Uuid::now_v7().to_string(), date: "2026-13-01".into() },
            &s.admin(),
        ))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&err), vec!["date"]);
}

#[tokio::test]
async fn coverage_fields_are_validated() {
    let s = TestServer::start().await;
    let p = create(&s, patient("Cov", "Valid", "1980", "MRN-CV")).await;
    let mut c = coverage(&p.id, "M-1", 0);
    c.status = 0;
    c.payor = None;
    c.period = Some(pb::Period { start: "2026-12-31".into(), end: "2026-01-01".into() });
    c.subscriber_id = "bad/chars!".into();
    let err = s
        .coverages()
        .create_coverage(req(pb::CreateCoverageRequest { coverage: Some(c) }, &s.admin()))
        .await
        .unwrap_err();
    assert_eq!(
        bad_fields(&err),
        vec!["coverage.status", "coverage.payor", "coverage.subscriber_id", "coverage.period.end", "coverage.order"]
    );
}
