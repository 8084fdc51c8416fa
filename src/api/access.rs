//! AccessService: the restricted flag, legal holds and the break-glass review queue.

use bytes::Bytes;

use super::convert::{patient_id, timestamp};
use super::grpc::{Method, Methods, unary};
use super::validate::Checker;
use super::{Edge, page_size};
use crate::app::{BreakGlassGrant, CallContext, GrantsRequest, Named, ReviewFilter};
use crate::domain::Action;
use crate::error::AppError;
use crate::proto::v1 as pb;

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

/// The methods of `carevault.v1.AccessService`.
pub struct AccessService;

impl Methods for AccessService {
    const NAME: &'static str = "carevault.v1.AccessService";

    fn find(name: &str) -> Option<Method> {
        Some(match name {
            "SetPatientRestriction" => unary!(Action::AccessRestrict, set_patient_restriction),
            "SetLegalHold" => unary!(Action::AccessLegalHold, set_legal_hold),
            "ListBreakGlassGrants" => unary!(Action::BreakGlassList, list_break_glass_grants),
            "ReviewBreakGlassGrant" => unary!(Action::BreakGlassReview, review_break_glass_grant),
            _ => return None,
        })
    }
}

async fn set_patient_restriction(
    edge: &Edge,
    ctx: &CallContext,
    body: Bytes,
) -> Result<pb::SetPatientRestrictionResponse, AppError> {
    let input = edge.read(ctx, &body, |c, r: &pb::SetPatientRestrictionRequest| {
        let id = patient_id(c, "patient_id", &r.patient_id);
        (Named::patient(id), id.map(|id| (id, r.restricted)))
    });
    let patient = input.named.patient;
    let restricted = edge.app.set_restriction(ctx, input).await?;
    Ok(pb::SetPatientRestrictionResponse { patient_id: patient.map(|p| p.to_string()).unwrap_or_default(), restricted })
}

async fn set_legal_hold(edge: &Edge, ctx: &CallContext, body: Bytes) -> Result<pb::SetLegalHoldResponse, AppError> {
    let input = edge.read(ctx, &body, |c, r: &pb::SetLegalHoldRequest| {
        let id = patient_id(c, "patient_id", &r.patient_id);
        (Named::patient(id), id.map(|id| (id, r.legal_hold)))
    });
    let patient = input.named.patient;
    let legal_hold = edge.app.set_legal_hold(ctx, input).await?;
    Ok(pb::SetLegalHoldResponse { patient_id: patient.map(|p| p.to_string()).unwrap_or_default(), legal_hold })
}

async fn list_break_glass_grants(
    edge: &Edge,
    ctx: &CallContext,
    body: Bytes,
) -> Result<pb::ListBreakGlassGrantsResponse, AppError> {
    let input = edge.read(ctx, &body, |c, r: &pb::ListBreakGlassGrantsRequest| {
        let filter = match pb::ReviewState::try_from(r.state) {
            Ok(pb::ReviewState::Unspecified | pb::ReviewState::Pending) => ReviewFilter::Pending,
            Ok(pb::ReviewState::Reviewed) => ReviewFilter::Reviewed,
            Ok(pb::ReviewState::All) => ReviewFilter::All,
            Err(_) => {
                c.bad("state", "is not a known ReviewState");
                ReviewFilter::Pending
            }
        };
        let page_size = page_size(c, "page_size", r.page_size, 50, 500);
        let after = decode_page_token(c, &r.page_token);
        (Named::default(), Some(GrantsRequest { filter, page_size, after }))
    });
    let page = edge.app.list_grants(ctx, input).await?;
    Ok(pb::ListBreakGlassGrantsResponse {
        grants: page.grants.iter().map(grant_pb).collect(),
        next_page_token: page.next_after.map(|a| super::encode_page_token(PAGE_TOKEN_PREFIX, a)).unwrap_or_default(),
    })
}

async fn review_break_glass_grant(
    edge: &Edge,
    ctx: &CallContext,
    body: Bytes,
) -> Result<pb::ReviewBreakGlassGrantResponse, AppError> {
    let input = edge.read(ctx, &body, |c, r: &pb::ReviewBreakGlassGrantRequest| {
        let id = grant_id(c, "grant_id", &r.grant_id);
        let note = c.text("note", &r.note, 2000, true);
        (Named::default(), id.map(|id| (id, note)))
    });
    let g = edge.app.review_grant(ctx, input).await?;
    Ok(pb::ReviewBreakGlassGrantResponse { grant: Some(grant_pb(&g)) })
}
