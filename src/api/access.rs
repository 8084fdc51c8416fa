//! AccessService: the restricted flag, legal holds and the break-glass review queue.

use tonic::{Request, Response, Status};

use super::convert::{patient_id, timestamp};
use super::validate::Checker;
use super::{Edge, page_size, reply};
use crate::app::{BreakGlassGrant, GrantsRequest, ReviewFilter};
use crate::proto::v1 as pb;
use crate::proto::v1::access_service_server::AccessService;

const PAGE_TOKEN_PREFIX: &str = "g1:";

fn decode_page_token(c: &mut Checker, token: &str) -> Option<uuid::Uuid> {
    let parse = |u: &str| uuid::Uuid::parse_str(u).ok();
    super::decode_page_token(c, token, PAGE_TOKEN_PREFIX, parse, "is not a token returned by ListBreakGlassGrants")
}

fn grant_id(c: &mut Checker, field: &str, s: &str) -> Option<uuid::Uuid> {
    match uuid::Uuid::try_parse(s) {
        Ok(u) if s.len() == 36 && s == u.to_string() => Some(u),
        _ => {
            c.bad(field, "must be a lowercase hyphenated UUID");
            None
        }
    }
}

fn grant_pb(g: &BreakGlassGrant) -> pb::BreakGlassGrant {
    pb::BreakGlassGrant {
        grant_id: g.id.clone(),
        subject: g.subject.clone(),
        service: g.service.clone(),
        patient_id: g.patient_id.clone(),
        grant_time: Some(timestamp(g.granted_at)),
        expire_time: Some(timestamp(g.expires_at)),
        reason: g.reason.clone(),
        reviewed: g.review.is_some(),
        reviewer: g.review.as_ref().map(|r| r.reviewer.clone()).unwrap_or_default(),
        review_time: g.review.as_ref().map(|r| timestamp(r.reviewed_at)),
        review_note: g.review.as_ref().map(|r| r.note.clone()).unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl AccessService for Edge {
    async fn set_patient_restriction(
        &self,
        req: Request<pb::SetPatientRestrictionRequest>,
    ) -> Result<Response<pb::SetPatientRestrictionResponse>, Status> {
        let ctx = self.context(&req);
        let r = req.get_ref();
        let mut c = Checker::default();
        let id = patient_id(&mut c, "patient_id", &r.patient_id);
        let input = c.into_result(id.map(|id| (id, r.restricted)));
        let result = self.app.set_restriction(&ctx, input).await;
        let patient_id = r.patient_id.clone();
        reply(&ctx, result.map(|restricted| pb::SetPatientRestrictionResponse { patient_id, restricted }))
    }

    async fn set_legal_hold(
        &self,
        req: Request<pb::SetLegalHoldRequest>,
    ) -> Result<Response<pb::SetLegalHoldResponse>, Status> {
        let ctx = self.context(&req);
        let r = req.get_ref();
        let mut c = Checker::default();
        let id = patient_id(&mut c, "patient_id", &r.patient_id);
        let input = c.into_result(id.map(|id| (id, r.legal_hold)));
        let result = self.app.set_legal_hold(&ctx, input).await;
        let patient_id = r.patient_id.clone();
        reply(&ctx, result.map(|legal_hold| pb::SetLegalHoldResponse { patient_id, legal_hold }))
    }

    async fn list_break_glass_grants(
        &self,
        req: Request<pb::ListBreakGlassGrantsRequest>,
    ) -> Result<Response<pb::ListBreakGlassGrantsResponse>, Status> {
        let ctx = self.context(&req);
        let r = req.get_ref();
        let mut c = Checker::default();
        let filter = match pb::ReviewState::try_from(r.state) {
            Ok(pb::ReviewState::Unspecified | pb::ReviewState::Pending) => ReviewFilter::Pending,
            Ok(pb::ReviewState::Reviewed) => ReviewFilter::Reviewed,
            Ok(pb::ReviewState::All) => ReviewFilter::All,
            Err(_) => {
                c.bad("state", "is not a known ReviewState");
                ReviewFilter::Pending
            }
        };
        let page_size = page_size(&mut c, "page_size", r.page_size, 50, 500);
        let after = decode_page_token(&mut c, &r.page_token);
        let result = self.app.list_grants(&ctx, c.into_result(Some(GrantsRequest { filter, page_size, after }))).await;
        reply(
            &ctx,
            result.map(|page| pb::ListBreakGlassGrantsResponse {
                grants: page.grants.iter().map(grant_pb).collect(),
                next_page_token: page
                    .next_after
                    .map(|a| super::encode_page_token(PAGE_TOKEN_PREFIX, a))
                    .unwrap_or_default(),
            }),
        )
    }

    async fn review_break_glass_grant(
        &self,
        req: Request<pb::ReviewBreakGlassGrantRequest>,
    ) -> Result<Response<pb::ReviewBreakGlassGrantResponse>, Status> {
        let ctx = self.context(&req);
        let r = req.get_ref();
        let mut c = Checker::default();
        let id = grant_id(&mut c, "grant_id", &r.grant_id);
        let note = c.text("note", &r.note, 2000, true);
        let result = self.app.review_grant(&ctx, c.into_result(id.map(|id| (id, note)))).await;
        reply(&ctx, result.map(|g| pb::ReviewBreakGlassGrantResponse { grant: Some(grant_pb(&g)) }))
    }
}
