use carevault::proto::v1 as pb;
use tonic::Code;

use crate::helpers::*;

async fn add(s: &TestServer, c: pb::Coverage) -> Result<pb::Coverage, tonic::Status> {
    s.coverages()
        .create_coverage(req(pb::CreateCoverageRequest { coverage: Some(c) }, &s.admin()))
        .await
        .map(|r| r.into_inner().coverage.unwrap())
}

async fn active(s: &TestServer, patient_id: &str, date: &str) -> Vec<pb::Coverage> {
    s.coverages()
        .get_active_coverage(req(
            pb::GetActiveCoverageRequest { patient_id: patient_id.into(), date: date.into() },
            &s.admin(),
        ))
        .await
        .unwrap()
        .into_inner()
        .coverages
}

#[tokio::test]
async fn active_coverage_on_a_date_is_ordered_primary_first() {
    let s = TestServer::start().await;
    let p = create(&s, patient("Insured", "Ina", "1970-01-01", "MRN-C1")).await;
    let secondary = add(&s, coverage(&p.id, "SEC-2", 2)).await.unwrap();
    let primary = add(&s, coverage(&p.id, "PRI-1", 1)).await.unwrap();
    let mut lapsed = coverage(&p.id, "OLD-9", 1);
    lapsed.period = Some(pb::Period { start: "2020-01-01".into(), end: "2020-12-31".into() });
    add(&s, lapsed).await.unwrap();
    let mut cancelled = coverage(&p.id, "CAN-3", 3);
    cancelled.status = pb::CoverageStatus::Cancelled as i32;
    add(&s, cancelled).await.unwrap();

    let on = active(&s, &p.id, "2026-06-15").await;
    assert_eq!(on.iter().map(|c| c.id.clone()).collect::<Vec<_>>(), vec![primary.id.clone(), secondary.id.clone()]);
    assert_eq!(active(&s, &p.id, "2020-06-01").await.len(), 1);
    assert!(active(&s, &p.id, "2019-06-01").await.is_empty());
    let ev = s.last_event("coverage.active").await;
    assert_eq!(ev.patient_id, p.id);
    assert_eq!(ev.result_count, Some(0));

    let all = s
        .coverages()
        .list_coverages(req(pb::ListCoveragesRequest { patient_id: p.id.clone(), show_deleted: false }, &s.admin()))
        .await
        .unwrap()
        .into_inner()
        .coverages;
    assert_eq!(all.len(), 4);
    assert!(all.windows(2).all(|w| w[0].order <= w[1].order));
}

#[tokio::test]
async fn coverage_updates_check_versions_and_deletes_leave_active_lists() {
    let s = TestServer::start().await;
    let p = create(&s, patient("Cov", "Ered", "1980", "MRN-C2")).await;
    let c = add(&s, coverage(&p.id, "M-100", 1)).await.unwrap();
    let mut changed = c.clone();
    changed.plan_name = "Acme PPO Platinum".into();
    let updated = s
        .coverages()
        .update_coverage(req(pb::UpdateCoverageRequest { coverage: Some(changed.clone()) }, &s.admin()))
        .await
        .unwrap()
        .into_inner()
        .coverage
        .unwrap();
    assert_eq!(updated.version, 2);
    assert_eq!(updated.plan_name, "Acme PPO Platinum");
    let stale = s
        .coverages()
        .update_coverage(req(pb::UpdateCoverageRequest { coverage: Some(changed) }, &s.admin()))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);

    let deleted = s
        .coverages()
        .delete_coverage(req(pb::DeleteCoverageRequest { coverage_id: c.id.clone(), version: 2 }, &s.admin()))
        .await
        .unwrap()
        .into_inner()
        .coverage
        .unwrap();
    assert!(deleted.delete_time.is_some());
    assert!(active(&s, &p.id, "2026-03-01").await.is_empty());
    let got = s
        .coverages()
        .get_coverage(req(pb::GetCoverageRequest { coverage_id: c.id.clone() }, &s.admin()))
        .await
        .unwrap()
        .into_inner()
        .coverage
        .unwrap();
    assert_eq!(got.version, 3);
    let listed = s
        .coverages()
        .list_coverages(req(pb::ListCoveragesRequest { patient_id: p.id.clone(), show_deleted: true }, &s.admin()))
        .await
        .unwrap()
        .into_inner()
        .coverages;
    assert_eq!(listed.len(), 1);
}

#[tokio::test]
async fn member_id_search_finds_the_patient_until_the_coverage_is_deleted() {
    let s = TestServer::start().await;
    let p = create(&s, patient("Member", "Search", "1955-02-02", "MRN-C3")).await;
    let c = add(&s, coverage(&p.id, "XKZ-4455-01", 1)).await.unwrap();
    use pb::search_patients_request::Criterion;
    let find = || pb::SearchPatientsRequest {
        criterion: Some(Criterion::MemberId(pb::MemberIdQuery { member_id: "xkz 4455 01".into() })),
        show_deleted: false,
        page_size: 0,
    };
    let r = s.patients().search_patients(req(find(), &s.admin())).await.unwrap().into_inner();
    assert_eq!(r.patients.iter().map(|p| p.id.clone()).collect::<Vec<_>>(), vec![p.id.clone()]);
    s.coverages()
        .delete_coverage(req(pb::DeleteCoverageRequest { coverage_id: c.id, version: 1 }, &s.admin()))
        .await
        .unwrap();
    let r = s.patients().search_patients(req(find(), &s.admin())).await.unwrap().into_inner();
    assert!(r.patients.is_empty());
}

#[tokio::test]
async fn coverage_needs_an_existing_active_patient_and_cannot_move() {
    let s = TestServer::start().await;
    let missing = add(&s, coverage(&uuid::Uuid::now_v7().to_string(), "M-1", 1)).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let p = create(&s, patient("Mover", "Not", "1980", "MRN-C4")).await;
    let other = create(&s, patient("Other", "Person", "1981", "MRN-C5")).await;
    let c = add(&s, coverage(&p.id, "M-2", 1)).await.unwrap();
    let mut moved = c.clone();
    moved.patient_id = other.id.clone();
    let err = s
        .coverages()
        .update_coverage(req(pb::UpdateCoverageRequest { coverage: Some(moved) }, &s.admin()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    s.patients()
        .delete_patient(req(pb::DeletePatientRequest { patient_id: p.id.clone(), version: 1 }, &s.admin()))
        .await
        .unwrap();
    let err = add(&s, coverage(&p.id, "M-3", 2)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn a_dependent_coverage_needs_the_subscriber() {
    let s = TestServer::start().await;
    let p = create(&s, patient("Child", "Dependent", "2015-04-04", "MRN-C6")).await;
    let mut c = coverage(&p.id, "FAM-1", 1);
    c.relationship = pb::SubscriberRelationship::Child as i32;
    let err = add(&s, c.clone()).await.unwrap_err();
    assert_eq!(bad_fields(&err), vec!["coverage.subscriber"]);
    c.subscriber = Some(pb::Subscriber { name: Some(name("Parent", "Pat")), birth_date: "1985-01-01".into() });
    let ok = add(&s, c).await.unwrap();
    assert_eq!(ok.subscriber.unwrap().name.unwrap().family, "Parent");
}

/// A coverage create retried with its `x-idempotency-key` gets the first
/// one's coverage; the same key on a patient create is another key.
#[tokio::test]
async fn a_coverage_create_retried_with_its_idempotency_key_makes_one_coverage() {
    let s = TestServer::start().await;
    let p = create(&s, patient("Idem", "Cov", "1970-01-01", "IDEM-C")).await;
    let send = |key: &str| {
        let mut r = req(pb::CreateCoverageRequest { coverage: Some(coverage(&p.id, "IDEMCOV1", 1)) }, &s.admin());
        r.metadata_mut().insert("x-idempotency-key", key.parse().unwrap());
        r
    };
    let first = s.coverages().create_coverage(send("claim-1")).await.unwrap().into_inner().coverage.unwrap();
    let again = s.coverages().create_coverage(send("claim-1")).await.unwrap().into_inner().coverage.unwrap();
    assert_eq!(first.id, again.id);
    let replay = s.last_event("coverage.create").await;
    assert!(replay.details.iter().any(|d| d == "idempotent_replay=true"), "{:?}", replay.details);
    let mut r =
        req(pb::CreatePatientRequest { patient: Some(patient("Idem", "Other", "1971-01-01", "IDEM-D")) }, &s.admin());
    r.metadata_mut().insert("x-idempotency-key", "claim-1".parse().unwrap());
    let other = s.patients().create_patient(r).await.unwrap().into_inner().patient.unwrap();
    assert_ne!(other.id, p.id, "a patient create with the same key is a create of its own");
    let listed = s
        .coverages()
        .list_coverages(req(pb::ListCoveragesRequest { patient_id: p.id.clone(), ..Default::default() }, &s.admin()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.coverages.len(), 1, "one coverage");
}
