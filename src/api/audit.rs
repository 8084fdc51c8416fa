//! AuditService.

use std::pin::Pin;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::convert::{audit_event_pb, micros, outcome, patient_id};
use super::validate::Checker;
use super::{Edge, page_size, reply};
use crate::app::AuditFilter;
use crate::error::{AppError, to_status};
use crate::proto::v1 as pb;
use crate::proto::v1::audit_service_server::AuditService;

/// Entries per ExportAuditEventsResponse message.
pub const EXPORT_BATCH: usize = 512;

const TOKEN_PREFIX: &str = "a1:";

fn decode_token(c: &mut Checker, token: &str) -> u64 {
    let parse = |n: &str| n.parse::<u64>().ok();
    super::decode_page_token(c, token, TOKEN_PREFIX, parse, "is not a token returned by ListAuditEvents").unwrap_or(0)
}

type ExportStream = Pin<Box<dyn Stream<Item = Result<pb::ExportAuditEventsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AuditService for Edge {
    async fn list_audit_events(
        &self,
        req: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let ctx = self.context(&req);
        let r = req.get_ref();
        let mut c = Checker::default();
        let patient = if r.patient_id.is_empty() { None } else { patient_id(&mut c, "patient_id", &r.patient_id) };
        let actor = c.text("actor", &r.actor, 256, false);
        let action = c.text("action", &r.action, 64, false);
        let outcome = outcome(&mut c, "outcome", r.outcome);
        let mut time = |field: &str, ts: &Option<pbjson_types::Timestamp>| match ts {
            Some(t) => {
                let m = micros(t);
                if m.is_none() {
                    c.bad(field, "is not a valid timestamp");
                }
                m
            }
            None => None,
        };
        let start_micros = time("start_time", &r.start_time);
        let end_micros = time("end_time", &r.end_time);
        let size = page_size(&mut c, "page_size", r.page_size, 100, 1000);
        let from_sequence = decode_token(&mut c, &r.page_token);
        let filter = AuditFilter {
            patient,
            actor: (!actor.is_empty()).then_some(actor),
            action: (!action.is_empty()).then_some(action),
            outcome,
            start_micros,
            end_micros,
            page_size: size,
            from_sequence,
        };
        let result = self.app.list_audit_events(&ctx, c.into_result(Some(filter))).await;
        reply(
            &ctx,
            result.map(|page| pb::ListAuditEventsResponse {
                events: page.events.iter().map(|(e, h)| audit_event_pb(e, h)).collect(),
                next_page_token: page
                    .next_sequence
                    .map(|s| super::encode_page_token(TOKEN_PREFIX, s))
                    .unwrap_or_default(),
            }),
        )
    }

    type ExportAuditEventsStream = ExportStream;

    async fn export_audit_events(
        &self,
        req: Request<pb::ExportAuditEventsRequest>,
    ) -> Result<Response<Self::ExportAuditEventsStream>, Status> {
        let ctx = self.context(&req);
        let from = req.get_ref().start_sequence;
        let start = match self.app.start_export(&ctx, Ok(from)).await {
            Ok(s) => s,
            Err(e) => return Err(to_status(&e, &ctx.request_id)),
        };
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::ExportAuditEventsResponse, Status>>(4);
        let store = self.app.store().clone();
        let request_id = ctx.request_id.clone();
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            let _enter = span.enter();
            let mut batch = Vec::with_capacity(EXPORT_BATCH);
            for item in store.audit_range(start.from, start.to) {
                match item {
                    Ok(e) => batch.push(pb::ExportedAuditEntry {
                        sequence: e.sequence,
                        entry: e.bytes,
                        hash: e.hash.to_vec(),
                    }),
                    Err(err) => {
                        tracing::error!(error = %err, "audit export read failed");
                        let _ = tx.blocking_send(Err(to_status(&AppError::Internal, &request_id)));
                        return;
                    }
                }
                if batch.len() == EXPORT_BATCH {
                    let msg = pb::ExportAuditEventsResponse { entries: std::mem::take(&mut batch) };
                    if tx.blocking_send(Ok(msg)).is_err() {
                        return; // client went away
                    }
                }
            }
            if !batch.is_empty() {
                let _ = tx.blocking_send(Ok(pb::ExportAuditEventsResponse { entries: batch }));
            }
        });
        let stream: ExportStream = Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx));
        reply(&ctx, Ok(stream))
    }

    async fn get_audit_head(
        &self,
        req: Request<pb::GetAuditHeadRequest>,
    ) -> Result<Response<pb::GetAuditHeadResponse>, Status> {
        let ctx = self.context(&req);
        let result = self.app.audit_head(&ctx).await;
        reply(&ctx, result.map(|(sequence, hash)| pb::GetAuditHeadResponse { sequence, hash: hash.to_vec() }))
    }
}
