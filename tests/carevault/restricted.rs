//! Restricted (confidential) patients, break-glass grants and their review,
//! and minimum-necessary writes.

use std::sync::Arc;

use carevault::auth::token::{TokenSpec, issue};
use carevault::clock::FixedClock;
use carevault::proto::v1 as pb;
use pb::search_patients_request::Criterion;
use tonic::Code;

use crate::helpers::*;

const REASON: &str = "unresponsive in ED bay 4, allergy check before sedation";

fn ssn_patient(family: &str, mrn: &str) -> pb::Patient {
    let mut p = patient(family, "Vera", "1961-07-07", mrn);
    p.identifiers.push(pb::Identifier {
        system: "http://hl7.org/fhir/sid/us-ssn".into(),
        value: "123-45-6789".into(),
        r#type: pb::IdentifierType::Ss as i32,
    });
    p
}

fn with_reason<T>(mut r: tonic::Request<T>, reason: &str) -> tonic::Request<T> {
    r.metadata_mut().insert("x-break-glass-reason", reason.parse().unwrap());
    r
}

async fn set_restricted(s: &TestServer, id: &str, restricted: bool) {
    let r = pb::SetPatientRestrictionRequest { patient_id: id.into(), restricted };
    s.access().set_patient_restriction(req_for(r, &s.token("privacy-officer", "compliance"), None)).await.unwrap();
}

async fn search_name(s: &TestServer, token: &str, purpose: &str) -> Vec<String> {
    let q = pb::NameBirthDateQuery { family: "Hidden".into(), birth_date: "1961-07-07".into() };
    let r = pb::SearchPatientsRequest { criterion: Some(Criterion::NameBirthDate(q)), ..Default::default() };
    let found = s.patients().search_patients(req_for(r, token, Some(purpose))).await.unwrap().into_inner();
    found.patients.into_iter().map(|p| p.id).collect()
}

#[tokio::test]
async fn a_restricted_patient_is_indistinguishable_from_a_missing_one_for_everyone_not_cleared() {
    let s = TestServer::start().await;
    let hidden = create(&s, ssn_patient("Hidden", "MRN-H1")).await;
    let visible = create(&s, ssn_patient("Hidden", "MRN-H2")).await;
    let cov = create_coverage(&s, coverage(&hidden.id, "VIP-1", 1)).await;
    set_restricted(&s, &hidden.id, true).await;

    let desk = s.token("desk-1", "front_desk");
    let missing = uuid::Uuid::now_v7().to_string();
    let get = |id: &str| req(pb::GetPatientRequest { patient_id: id.into() }, &desk);
    let real = s.patients().get_patient(get(&hidden.id)).await.unwrap_err();
    let absent = s.patients().get_patient(get(&missing)).await.unwrap_err();
    assert_eq!((real.code(), real.message()), (absent.code(), absent.message()));
    assert_eq!(real.code(), Code::NotFound);

    assert_eq!(search_name(&s, &desk, "TREAT").await, vec![visible.id.clone()]);
    let by_member = pb::SearchPatientsRequest {
        criterion: Some(Criterion::MemberId(pb::MemberIdQuery { member_id: "VIP-1".into() })),
        ..Default::default()
    };
    let found = s.patients().search_patients(req(by_member, &desk)).await.unwrap().into_inner();
    assert!(found.patients.is_empty() && !found.truncated);
    let listed = s
        .patients()
        .list_patients(req(pb::ListPatientsRequest { page_size: 100, ..Default::default() }, &desk))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.patients.iter().map(|p| p.id.clone()).collect::<Vec<_>>(), vec![visible.id.clone()]);

    let mut cc = s.coverages();
    let cov_err =
        cc.get_coverage(req(pb::GetCoverageRequest { coverage_id: cov.id.clone() }, &desk)).await.unwrap_err();
    assert_eq!((cov_err.code(), cov_err.message()), (Code::NotFound, "coverage not found"));
    let list_err = cc
        .list_coverages(req(pb::ListCoveragesRequest { patient_id: hidden.id.clone(), show_deleted: false }, &desk))
        .await
        .unwrap_err();
    assert_eq!(list_err.code(), Code::NotFound);
    let mut upd = hidden.clone();
    upd.preferred_language = "fr".into();
    let upd_err = s.patients().update_patient(req(pb::UpdatePatientRequest { patient: Some(upd) }, &desk)).await;
    assert_eq!(upd_err.unwrap_err().code(), Code::NotFound);

    // A cleared care team reads it; the entry says which permission reached it.
    let vip = s.token("vip-nurse", "vip_care");
    let read = s.patients().get_patient(req(pb::GetPatientRequest { patient_id: hidden.id.clone() }, &vip)).await;
    assert_eq!(read.unwrap().into_inner().patient.unwrap().id, hidden.id);
    assert_eq!(search_name(&s, &vip, "TREAT").await.len(), 2);

    let events = s.all_events().await;
    let desk_on_hidden: Vec<_> = events.iter().filter(|e| e.actor == "desk-1" && e.patient_id == hidden.id).collect();
    assert!(desk_on_hidden.len() >= 3);
    assert!(desk_on_hidden.iter().all(|e| e.outcome == pb::AuditOutcome::PermissionDenied as i32));
    let vip_read = events.iter().find(|e| e.actor == "vip-nurse" && e.action == "patient.read").unwrap();
    assert_eq!(vip_read.scopes, vec!["patients.read", "restricted.access"]);
    let flag = events.iter().find(|e| e.action == "access.restrict").unwrap();
    assert_eq!(flag.details, vec!["restricted=true"]);

    // Cleared again, the patient is back for everyone.
    set_restricted(&s, &hidden.id, false).await;
    assert_eq!(search_name(&s, &desk, "TREAT").await.len(), 2);
}

#[tokio::test]
async fn break_glass_grants_one_patient_for_a_limited_time_and_waits_for_review() {
    let start = now_secs();
    let clock = FixedClock::new(start * 1_000_000);
    let s = TestServer::start_with(Options { clock: Arc::new(clock.clone()), ..Options::default() }).await;
    let hidden = create(&s, ssn_patient("Hidden", "MRN-BG")).await;
    let other = create(&s, ssn_patient("Hidden", "MRN-BG2")).await;
    set_restricted(&s, &hidden.id, true).await;
    set_restricted(&s, &other.id, true).await;
    let at = |sub: &str, roles: &[&str], t: i64| issue(s.issuer_der(), &TokenSpec::new(sub, roles), t).unwrap();
    let doc = at("dr-grey", &["clinician"], start);
    let get = |id: &str, purpose| req_for(pb::GetPatientRequest { patient_id: id.into() }, &doc, Some(purpose));

    // Ordinary treatment purpose: hidden like anyone else.
    assert_eq!(s.patients().get_patient(get(&hidden.id, "TREAT")).await.unwrap_err().code(), Code::NotFound);
    // Emergency without a reason: told what is missing.
    let err = s.patients().get_patient(get(&hidden.id, "ETREAT")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("x-break-glass-reason"), "{}", err.message());
    // With a reason: granted; SSN still masked (clinicians lack fields.ssn).
    let got = s.patients().get_patient(with_reason(get(&hidden.id, "ETREAT"), REASON)).await.unwrap();
    let got = got.into_inner().patient.unwrap();
    assert!(got.identifiers.iter().any(|i| i.value == "***-**-6789"));
    // Within the grant, further reads need no reason; the grant covers this patient only.
    let cov =
        req_for(pb::ListCoveragesRequest { patient_id: hidden.id.clone(), show_deleted: false }, &doc, Some("ETREAT"));
    assert!(s.coverages().list_coverages(cov).await.is_ok());
    assert_eq!(s.patients().get_patient(get(&other.id, "ETREAT")).await.unwrap_err().code(), Code::PermissionDenied);
    assert_eq!(search_name(&s, &doc, "ETREAT").await, vec![hidden.id.clone()]);
    // Break-glass never writes.
    let mut upd = got.clone();
    upd.preferred_language = "de".into();
    let write = req_for(pb::UpdatePatientRequest { patient: Some(upd) }, &doc, Some("ETREAT"));
    assert_eq!(s.patients().update_patient(write).await.unwrap_err().code(), Code::PermissionDenied);

    let events = s.all_events().await;
    let granted: Vec<_> = events.iter().filter(|e| !e.break_glass_grant_id.is_empty()).collect();
    assert_eq!(granted.len(), 3, "the grant, the coverage list and the search");
    let grant_id = granted[0].break_glass_grant_id.clone();
    assert!(granted.iter().all(|e| e.break_glass_grant_id == grant_id && e.purpose == "ETREAT"));
    assert!(granted[0].details.contains(&"break_glass=granted".to_string()));
    assert!(granted[0].scopes.contains(&"break_glass".to_string()));
    // The reason is not in the audit trail, nor anywhere on disk in plaintext.
    assert!(!format!("{events:?}").contains("allergy check"));
    assert!(!dir_contains(&s.data_dir, b"allergy check"), "break-glass reason stored in plaintext");

    // 61 minutes later the grant has expired.
    clock.set((start + 61 * 60) * 1_000_000);
    let late = at("dr-grey", &["clinician"], start + 61 * 60);
    let again = req_for(pb::GetPatientRequest { patient_id: hidden.id.clone() }, &late, Some("ETREAT"));
    assert_eq!(s.patients().get_patient(again).await.unwrap_err().code(), Code::PermissionDenied);

    // Review queue: compliance sees it with the reason; the holder cannot review it.
    let officer = at("officer-1", &["compliance"], start + 61 * 60);
    let list = |state: pb::ReviewState, token: &str| {
        req_for(pb::ListBreakGlassGrantsRequest { state: state as i32, ..Default::default() }, token, None)
    };
    let pending = s.access().list_break_glass_grants(list(pb::ReviewState::Pending, &officer)).await.unwrap();
    let pending = pending.into_inner().grants;
    assert_eq!(pending.len(), 1);
    let g = &pending[0];
    assert_eq!(
        (g.grant_id.as_str(), g.subject.as_str(), g.patient_id.as_str()),
        (grant_id.as_str(), "dr-grey", hidden.id.as_str())
    );
    assert_eq!(g.reason, REASON);
    assert_eq!(g.expire_time.unwrap().seconds - g.grant_time.unwrap().seconds, 3600);
    assert!(!g.reviewed);
    let denied = s.access().list_break_glass_grants(list(pb::ReviewState::Pending, &late)).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);

    let self_review = at("dr-grey", &["compliance"], start + 61 * 60);
    let review = |token: &str, note: &str| {
        req_for(pb::ReviewBreakGlassGrantRequest { grant_id: grant_id.clone(), note: note.into() }, token, None)
    };
    let err = s.access().review_break_glass_grant(review(&self_review, "fine by me")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let done = s.access().review_break_glass_grant(review(&officer, "confirmed with ED chart")).await.unwrap();
    let done = done.into_inner().grant.unwrap();
    assert!(done.reviewed && done.reviewer == "officer-1" && done.review_note == "confirmed with ED chart");
    let twice = s.access().review_break_glass_grant(review(&officer, "again")).await.unwrap_err();
    assert_eq!(twice.code(), Code::FailedPrecondition);
    let pending = s.access().list_break_glass_grants(list(pb::ReviewState::Pending, &officer)).await.unwrap();
    assert!(pending.into_inner().grants.is_empty());
    let reviewed = s.access().list_break_glass_grants(list(pb::ReviewState::Reviewed, &officer)).await.unwrap();
    assert_eq!(reviewed.into_inner().grants.len(), 1);
    assert!(!dir_contains(&s.data_dir, b"confirmed with ED"), "review note stored in plaintext");

    let events = s.all_events().await;
    let review_entry = events.iter().find(|e| e.action == "access.break_glass_review" && e.outcome == 1).unwrap();
    assert_eq!(
        (review_entry.resource_id.as_str(), review_entry.patient_id.as_str()),
        (grant_id.as_str(), hidden.id.as_str())
    );
}

#[tokio::test]
async fn a_writer_without_fields_ssn_sees_it_masked_and_cannot_clobber_it_by_sending_it_back() {
    let s = TestServer::start().await;
    let p = create(&s, ssn_patient("Masky", "MRN-M1")).await;
    let desk = s.token("desk-2", "front_desk");
    let seen = s.patients().get_patient(req(pb::GetPatientRequest { patient_id: p.id.clone() }, &desk)).await.unwrap();
    let mut seen = seen.into_inner().patient.unwrap();
    assert!(seen.identifiers.iter().any(|i| i.value == "***-**-6789"));
    assert!(!seen.identifiers.iter().any(|i| i.value.contains("45")));
    seen.preferred_language = "es".into();
    let updated = s.patients().update_patient(req(pb::UpdatePatientRequest { patient: Some(seen) }, &desk)).await;
    let updated = updated.unwrap().into_inner().patient.unwrap();
    assert_eq!(updated.preferred_language, "es");
    assert!(updated.identifiers.iter().any(|i| i.value == "***-**-6789"), "the response is masked too");

    let biller = s.token("biller-1", "billing");
    let full = s
        .patients()
        .get_patient(req_for(pb::GetPatientRequest { patient_id: p.id.clone() }, &biller, Some("HPAYMT")))
        .await
        .unwrap()
        .into_inner()
        .patient
        .unwrap();
    assert!(full.identifiers.iter().any(|i| i.value == "123-45-6789"), "stored SSN kept");
    assert_eq!(full.preferred_language, "es");
    let update_entry = s.last_event("patient.update").await;
    assert_eq!(update_entry.disclosed, vec!["identity", "ssn_masked", "contact"]);
}

/// True when any file under `dir` contains `needle`.
fn dir_contains(dir: &std::path::Path, needle: &[u8]) -> bool {
    std::fs::read_dir(dir).unwrap().flatten().any(|e| {
        let path = e.path();
        if path.is_dir() {
            dir_contains(&path, needle)
        } else {
            std::fs::read(&path).map(|b| b.windows(needle.len()).any(|w| w == needle)).unwrap_or(false)
        }
    })
}
