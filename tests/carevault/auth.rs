use carevault::auth::token::{self, TokenSpec};
use carevault::proto::v1 as pb;
use tonic::Code;

use crate::helpers::*;

fn get(id: &str) -> pb::GetPatientRequest {
    pb::GetPatientRequest { patient_id: id.into() }
}

#[tokio::test]
async fn calls_without_a_valid_token_are_unauthenticated_and_audited() {
    let s = TestServer::start().await;
    let p = create(&s, patient("Auth", "Target", "1980", "MRN-A")).await;
    let other_issuer = carevault::crypto::generate_issuer_key().unwrap();
    let forged = mint(&other_issuer.pkcs8_der, "mallory", ALL_SCOPES);
    let spec = |sub: &str, ttl: i64| TokenSpec { ttl_secs: ttl, ..TokenSpec::new(sub, &["tester"]) };
    let expired = token::issue(s.issuer_der(), &spec("late", 60), now_secs() - 3600).unwrap();
    let too_long = token::issue(s.issuer_der(), &spec("greedy", 7 * 24 * 3600), now_secs()).unwrap();
    let mut tampered = s.admin();
    tampered.replace_range(tampered.len() - 6.., "AAAAAA");
    let cases: Vec<(&str, Option<String>)> = vec![
        ("missing", None),
        ("not bearer", Some("Basic dXNlcjpwYXNz".into())),
        ("garbage", Some("Bearer abc.def.ghi".into())),
        ("forged", Some(format!("Bearer {forged}"))),
        ("tampered", Some(format!("Bearer {tampered}"))),
        ("expired", Some(format!("Bearer {expired}"))),
        ("lifetime too long", Some(format!("Bearer {too_long}"))),
    ];
    for (label, header) in &cases {
        let mut r = tonic::Request::new(get(&p.id));
        if let Some(h) = header {
            r.metadata_mut().insert("authorization", h.parse().unwrap());
        }
        let err = s.patients().get_patient(r).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{label}");
        assert!(!err.message().contains("eyJ"), "token must not be echoed");
    }
    let events = s.all_events().await;
    let n = u64::try_from(cases.len()).unwrap();
    assert_eq!(accounted(&events, pb::AuditOutcome::Unauthenticated, "patient.read"), n);
    let unauth: Vec<_> = events.iter().filter(|e| e.outcome == pb::AuditOutcome::Unauthenticated as i32).collect();
    assert!(unauth.iter().all(|e| e.actor.is_empty() && e.scopes.is_empty() && !e.client_address.is_empty()));
}

#[tokio::test]
async fn a_token_without_the_scope_is_permission_denied_and_audited() {
    let s = TestServer::start().await;
    let p = create(&s, patient("Scope", "Target", "1980", "MRN-S")).await;
    let reader = s.token("scheduler", "coverage.read");
    let err = s.patients().get_patient(req(get(&p.id), &reader)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("patients.read"));
    let err = s
        .patients()
        .create_patient(req(
            pb::CreatePatientRequest { patient: Some(patient("X", "Y", "1980", "Z")) },
            &s.token("ro", "patients.read"),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err =
        s.audit().get_audit_head(req(pb::GetAuditHeadRequest {}, &s.token("ro", "patients.read"))).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let ev = s.last_event("patient.read").await;
    assert_eq!(ev.outcome, pb::AuditOutcome::PermissionDenied as i32);
    assert_eq!(ev.actor, "scheduler");
    assert!(ev.scopes.is_empty());
}

#[tokio::test]
async fn authentication_is_checked_before_input_so_bad_input_without_a_token_is_unauthenticated() {
    let s = TestServer::start().await;
    let err = s.patients().get_patient(tonic::Request::new(get("not-a-uuid"))).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn a_flood_of_unauthenticated_calls_is_counted_exactly_in_a_few_entries() {
    let s = TestServer::start().await;
    let before = s.all_events().await.len();
    let started = std::time::Instant::now();
    let calls: Vec<_> = (0..300)
        .map(|i| {
            let mut c = s.patients();
            tokio::spawn(async move {
                let mut r = tonic::Request::new(get("not-a-uuid"));
                if i % 2 == 0 {
                    r.metadata_mut().insert("authorization", "Bearer abc.def.ghi".parse().unwrap());
                }
                c.get_patient(r).await.unwrap_err().code()
            })
        })
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap(), Code::Unauthenticated);
    }
    let secs = started.elapsed().as_secs();
    let events = s.all_events().await;
    // After the earlier listing's own entry.
    let new = &events[before + 1..];
    assert_eq!(accounted(new, pb::AuditOutcome::Unauthenticated, "patient.read"), 300, "every refusal is counted");
    let bound = 2 * (usize::try_from(secs).unwrap() + 1);
    assert!(new.len() <= bound, "{} entries for 300 refusals in {secs} s (at most {bound})", new.len());
    let grouped = new.iter().find(|e| e.action == "access.refused").expect("an entry counting refusals together");
    assert_eq!(grouped.resource_type, "");
    assert!(grouped.patient_id.is_empty() && grouped.actor.is_empty());
    assert_eq!(grouped.client_address, "127.0.0.1", "grouped by address without port");
    assert!(grouped.details.iter().any(|d| d.starts_with("window_start=")));
    assert_eq!(
        grouped.result_count,
        grouped.details.iter().find_map(|d| d.strip_prefix("patient.read=")?.parse().ok())
    );
}
