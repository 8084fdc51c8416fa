//! Rate and concurrency limits: RESOURCE_EXHAUSTED, audited, per principal.

use carevault::auth::limits::LimitSettings;
use carevault::proto::v1 as pb;
use tonic::Code;

use crate::helpers::*;

#[tokio::test]
async fn a_principal_over_its_rate_is_resource_exhausted_and_audited_while_others_proceed() {
    let limits = LimitSettings { per_principal_per_sec: 1, burst: 3, max_concurrent: 64 };
    let s = TestServer::start_with(Options { limits, ..Options::default() }).await;
    let runaway = s.token("runaway", "audit.read");
    let mut codes = Vec::new();
    for _ in 0..5 {
        let r = s.audit().get_audit_head(req(pb::GetAuditHeadRequest {}, &runaway)).await;
        codes.push(r.map(|_| Code::Ok).unwrap_or_else(|e| e.code()));
    }
    assert_eq!(codes[..3], [Code::Ok; 3]);
    assert_eq!(codes[3..], [Code::ResourceExhausted; 2]);
    let calm = s.token("calm", "audit.read");
    assert!(s.audit().get_audit_head(req(pb::GetAuditHeadRequest {}, &calm)).await.is_ok());

    // Read the trail as a principal that has not used its budget.
    let reader = s.token("reader", "audit.read");
    let events = s
        .audit()
        .list_audit_events(req(pb::ListAuditEventsRequest { actor: "runaway".into(), ..Default::default() }, &reader))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(accounted(&events, pb::AuditOutcome::ResourceExhausted, "audit.head"), 2);
}

#[tokio::test]
async fn requests_beyond_the_global_concurrency_cap_are_turned_away_and_audited() {
    let limits = LimitSettings { per_principal_per_sec: 0, burst: 0, max_concurrent: 2 };
    let s = TestServer::start_with(Options { limits, ..Options::default() }).await;
    let token = s.token("crowd", "audit.read");
    let calls: Vec<_> = (0..64)
        .map(|_| {
            let mut c = s.audit();
            let t = token.clone();
            tokio::spawn(async move { c.get_audit_head(req(pb::GetAuditHeadRequest {}, &t)).await.map(|_| ()) })
        })
        .collect();
    let mut ok = 0;
    let mut exhausted = 0u64;
    for c in calls {
        match c.await.unwrap() {
            Ok(()) => ok += 1,
            Err(e) if e.code() == Code::ResourceExhausted => exhausted += 1,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert!(ok > 0 && exhausted > 0, "ok {ok}, exhausted {exhausted}");
    let events: Vec<_> = s.all_events().await.into_iter().filter(|e| e.actor == "crowd").collect();
    let audited = accounted(&events, pb::AuditOutcome::ResourceExhausted, "audit.head");
    assert_eq!(audited, exhausted);
}
