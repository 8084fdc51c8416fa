//! Every call that names a patient is in that patient's audit view, whatever
//! its outcome; and a restricted patient gets exactly the answers a missing
//! one gets, on every path.

use carevault::proto::v1 as pb;
use tonic::Code;

use crate::helpers::*;

/// A request with a token, an optional purpose, an optional break-glass reason and a request id.
fn call<T>(msg: T, token: &str, purpose: Option<&str>, reason: Option<&str>, rid: &str) -> tonic::Request<T> {
    let mut r = req_for(msg, token, purpose);
    if let Some(reason) = reason {
        r.metadata_mut().insert("x-break-glass-reason", reason.parse().unwrap());
    }
    r.metadata_mut().insert("x-request-id", rid.parse().unwrap());
    r
}

async fn patient_view(s: &TestServer, patient_id: &str) -> Vec<pb::AuditEvent> {
    let officer = s.token("officer", "compliance");
    let r = pb::ListAuditEventsRequest { patient_id: patient_id.into(), page_size: 1000, ..Default::default() };
    s.audit().list_audit_events(req_for(r, &officer, None)).await.unwrap().into_inner().events
}

#[tokio::test]
async fn every_kind_of_call_naming_a_patient_is_in_its_audit_view_whatever_the_outcome() {
    let s = TestServer::start().await;
    let p = create(&s, patient("Named", "Always", "1970-03-04", "MRN-NA")).await;
    let cov = create_coverage(&s, coverage(&p.id, "NA-1", 1)).await;
    let id = p.id.clone();
    let (desk, clin, bill) = (s.token("desk", "front_desk"), s.token("doc", "clinician"), s.token("bill", "billing"));
    let (officer, keys) = (s.token("officer", "compliance"), s.token("keeper", "key_admin"));
    let mut expected: Vec<(&str, Code, pb::AuditOutcome)> = Vec::new();
    let (mut pc, mut cc, mut ac) = (s.patients(), s.coverages(), s.access());
    let mut kc = carevault::proto::v1::key_service_client::KeyServiceClient::new(s.channel.clone());
    let get = || pb::GetPatientRequest { patient_id: id.clone() };
    let update = |birth: &str| {
        let mut q = p.clone();
        q.birth_date = birth.into();
        pb::UpdatePatientRequest { patient: Some(q) }
    };
    let denied = pb::AuditOutcome::PermissionDenied;
    let invalid = pb::AuditOutcome::InvalidArgument;

    let r = pc.update_patient(call(update("1970-03-04"), &clin, Some("TREAT"), None, "clinician-update")).await;
    expected.push(("clinician-update", r.unwrap_err().code(), denied));
    let r = pc
        .delete_patient(call(
            pb::DeletePatientRequest { patient_id: id.clone(), version: 1 },
            &clin,
            Some("TREAT"),
            None,
            "clinician-delete",
        ))
        .await;
    expected.push(("clinician-delete", r.unwrap_err().code(), denied));
    let r = pc.update_patient(call(update("1970-03-04"), &bill, Some("HPAYMT"), None, "billing-update")).await;
    expected.push(("billing-update", r.unwrap_err().code(), denied));
    let r = pc.get_patient(call(get(), &desk, None, None, "missing-purpose")).await;
    expected.push(("missing-purpose", r.unwrap_err().code(), denied));
    let r = pc.get_patient(call(get(), &desk, Some("HMARKT"), None, "purpose-not-served")).await;
    expected.push(("purpose-not-served", r.unwrap_err().code(), denied));
    let r = pc.get_patient(call(get(), &officer, Some("TREAT"), None, "compliance-read")).await;
    expected.push(("compliance-read", r.unwrap_err().code(), denied));
    let r = pc.get_patient(call(get(), &keys, Some("TREAT"), None, "key-admin-read")).await;
    expected.push(("key-admin-read", r.unwrap_err().code(), denied));
    let restrict = pb::SetPatientRestrictionRequest { patient_id: id.clone(), restricted: true };
    let r = ac.set_patient_restriction(call(restrict.clone(), &desk, None, None, "desk-restrict")).await;
    expected.push(("desk-restrict", r.unwrap_err().code(), denied));
    let erase = pb::ErasePatientRequest { patient_id: id.clone(), reason: "asked to".into() };
    let r = kc.erase_patient(call(erase, &desk, None, None, "desk-erase")).await;
    expected.push(("desk-erase", r.unwrap_err().code(), denied));
    let r = pc.update_patient(call(update("1970-13-40"), &desk, Some("TREAT"), None, "bad-birth-date")).await;
    expected.push(("bad-birth-date", r.unwrap_err().code(), invalid));
    let r = pc.get_patient(call(get(), &desk, Some("NOPE"), None, "unknown-purpose")).await;
    expected.push(("unknown-purpose", r.unwrap_err().code(), invalid));
    let mut bad_cov = coverage(&id, "NA-2", 1);
    bad_cov.subscriber_id = "x".repeat(500);
    let r = cc
        .create_coverage(call(
            pb::CreateCoverageRequest { coverage: Some(bad_cov) },
            &desk,
            Some("TREAT"),
            None,
            "bad-coverage",
        ))
        .await;
    expected.push(("bad-coverage", r.unwrap_err().code(), invalid));
    let active = pb::GetActiveCoverageRequest { patient_id: id.clone(), date: "2026-02-30".into() };
    let r = cc.get_active_coverage(call(active, &desk, Some("TREAT"), None, "bad-date")).await;
    expected.push(("bad-date", r.unwrap_err().code(), invalid));
    let mut stale = cov.clone();
    stale.version = 7;
    let r = cc
        .update_coverage(call(pb::UpdateCoverageRequest { coverage: Some(stale) }, &desk, Some("TREAT"), None, "stale"))
        .await;
    expected.push(("stale", r.unwrap_err().code(), pb::AuditOutcome::Aborted));
    // Restricted from now on: the front desk's coverage calls are hidden, and still the patient's.
    ac.set_patient_restriction(req_for(restrict, &officer, None)).await.unwrap();
    let get_cov = pb::GetCoverageRequest { coverage_id: cov.id.clone() };
    let r = cc.get_coverage(call(get_cov, &desk, Some("TREAT"), None, "restricted-coverage-read")).await;
    expected.push(("restricted-coverage-read", r.unwrap_err().code(), denied));
    let r = cc
        .update_coverage(call(
            pb::UpdateCoverageRequest { coverage: Some(cov.clone()) },
            &desk,
            Some("TREAT"),
            None,
            "restricted-coverage-update",
        ))
        .await;
    expected.push(("restricted-coverage-update", r.unwrap_err().code(), denied));

    let view = patient_view(&s, &id).await;
    for (rid, code, outcome) in expected {
        assert_ne!(code, Code::Ok, "{rid} should have failed");
        let entry = view.iter().find(|e| e.request_id == rid);
        let entry = entry.unwrap_or_else(|| panic!("{rid} ({code:?}) is missing from the patient's audit view"));
        assert_eq!(entry.outcome, outcome as i32, "{rid}");
        assert_eq!(entry.patient_id, id, "{rid}");
    }
}

/// One call that names a patient (`P`) or a coverage (`C`), answered as (code, message).
#[derive(Clone, Copy, Debug)]
enum Probe {
    Get,
    Update,
    Delete,
    History,
    ListCoverages,
    Active,
    CreateCoverage,
    GetCoverage,
    UpdateCoverage,
    DeleteCoverage,
}

const PROBES: [Probe; 10] = [
    Probe::Get,
    Probe::Update,
    Probe::Delete,
    Probe::History,
    Probe::ListCoverages,
    Probe::Active,
    Probe::CreateCoverage,
    Probe::GetCoverage,
    Probe::UpdateCoverage,
    Probe::DeleteCoverage,
];

struct Target {
    patient: pb::Patient,
    coverage: pb::Coverage,
}

/// A caller: its token, purpose and break-glass reason.
type Who<'a> = (&'a str, Option<&'a str>, Option<&'a str>);

async fn answer(s: &TestServer, probe: Probe, t: &Target, who: Who<'_>) -> (Code, String) {
    let (token, purpose, reason) = who;
    macro_rules! r {
        ($m:expr) => {
            call($m, token, purpose, reason, "probe")
        };
    }
    let (pid, cid) = (t.patient.id.clone(), t.coverage.id.clone());
    let (mut pc, mut cc) = (s.patients(), s.coverages());
    let result = match probe {
        Probe::Get => pc.get_patient(r!(pb::GetPatientRequest { patient_id: pid })).await.map(|_| ()),
        Probe::Update => {
            pc.update_patient(r!(pb::UpdatePatientRequest { patient: Some(t.patient.clone()) })).await.map(|_| ())
        }
        Probe::Delete => {
            pc.delete_patient(r!(pb::DeletePatientRequest { patient_id: pid, version: 1 })).await.map(|_| ())
        }
        Probe::History => {
            pc.get_patient_history(r!(pb::GetPatientHistoryRequest { patient_id: pid })).await.map(|_| ())
        }
        Probe::ListCoverages => {
            cc.list_coverages(r!(pb::ListCoveragesRequest { patient_id: pid, show_deleted: false })).await.map(|_| ())
        }
        Probe::Active => cc
            .get_active_coverage(r!(pb::GetActiveCoverageRequest { patient_id: pid, date: "2026-06-01".into() }))
            .await
            .map(|_| ()),
        Probe::CreateCoverage => cc
            .create_coverage(r!(pb::CreateCoverageRequest { coverage: Some(coverage(&pid, "NEW-1", 2)) }))
            .await
            .map(|_| ()),
        Probe::GetCoverage => cc.get_coverage(r!(pb::GetCoverageRequest { coverage_id: cid })).await.map(|_| ()),
        Probe::UpdateCoverage => {
            cc.update_coverage(r!(pb::UpdateCoverageRequest { coverage: Some(t.coverage.clone()) })).await.map(|_| ())
        }
        Probe::DeleteCoverage => {
            cc.delete_coverage(r!(pb::DeleteCoverageRequest { coverage_id: cid, version: 1 })).await.map(|_| ())
        }
    };
    match result {
        Ok(()) => (Code::Ok, String::new()),
        Err(e) => (e.code(), e.message().to_string()),
    }
}

#[tokio::test]
async fn a_restricted_patient_and_a_missing_one_get_the_same_answer_on_every_path() {
    let s = TestServer::start().await;
    let real = create(&s, patient("Hidden", "Real", "1966-06-06", "MRN-HR")).await;
    let real_cov = create_coverage(&s, coverage(&real.id, "HR-1", 1)).await;
    let officer = s.token("officer", "compliance");
    let restrict = pb::SetPatientRestrictionRequest { patient_id: real.id.clone(), restricted: true };
    s.access().set_patient_restriction(req_for(restrict, &officer, None)).await.unwrap();
    // The same requests, about ids that do not exist.
    let mut ghost = real.clone();
    ghost.id = uuid::Uuid::now_v7().to_string();
    let mut ghost_cov = real_cov.clone();
    ghost_cov.id = uuid::Uuid::now_v7().to_string();
    ghost_cov.patient_id = ghost.id.clone();
    let (restricted, missing) =
        (Target { patient: real, coverage: real_cov }, Target { patient: ghost, coverage: ghost_cov });

    let (desk, clin, bill) = (s.token("desk", "front_desk"), s.token("doc", "clinician"), s.token("bill", "billing"));
    let long_reason = "x".repeat(1001);
    let callers: Vec<(&str, Who<'_>)> = vec![
        ("front desk", (&desk, Some("TREAT"), None)),
        ("clinician", (&clin, Some("TREAT"), None)),
        ("clinician breaking the glass without a reason", (&clin, Some("ETREAT"), None)),
        ("clinician with a malformed reason", (&clin, Some("ETREAT"), Some(&long_reason))),
        ("billing", (&bill, Some("HPAYMT"), None)),
    ];
    for (label, who) in &callers {
        for probe in PROBES {
            let a = answer(&s, probe, &restricted, *who).await;
            let b = answer(&s, probe, &missing, *who).await;
            assert_eq!(a, b, "{label}, {probe:?}: restricted and missing must look the same");
            assert_ne!(a.0, Code::Ok, "{label}, {probe:?}");
        }
    }
}
