//! AuditService.

use bytes::Bytes;
use tonic::Status;
use tracing::Instrument;

use super::convert::{audit_event_pb, micros, outcome, patient_id};
use super::grpc::{Handler, HandlerFuture, Method, Methods, ReplyStream, unary};
use super::validate::Checker;
use super::{Edge, page_size};
use crate::app::checkpoints::CheckpointQuery;
use crate::app::{AuditFilter, CallContext, Input, Named};
use crate::domain::Action;
use crate::error::{AppError, to_status};
use crate::proto::v1 as pb;

/// Entries per ExportAuditEventsResponse message.
pub const EXPORT_BATCH: usize = 512;

const TOKEN_PREFIX: &str = "a1:";

fn decode_token(c: &mut Checker, token: &str) -> u64 {
    let parse = |n: &str| n.parse::<u64>().ok();
    super::decode_page_token(c, token, TOKEN_PREFIX, parse, "is not a token returned by ListAuditEvents").unwrap_or(0)
}

/// The methods of `carevault.v1.AuditService`.
pub struct AuditService;

impl Methods for AuditService {
    const NAME: &'static str = "carevault.v1.AuditService";

    fn find(name: &str) -> Option<Method> {
        Some(match name {
            "ListAuditEvents" => unary!(Action::AuditList, list_audit_events),
            "ExportAuditEvents" => {
                Method { action: Action::AuditExport, handler: Handler::ServerStreaming(export_audit_events) }
            }
            "GetAuditHead" => unary!(Action::AuditHead, get_audit_head),
            "GetCheckpoint" => unary!(Action::AuditCheckpoint, get_checkpoint),
            "GetInclusionProof" => unary!(Action::AuditProof, get_inclusion_proof),
            "GetConsistencyProof" => unary!(Action::AuditProof, get_consistency_proof),
            "AddCosignature" => unary!(Action::AuditCosign, add_cosignature),
            _ => return None,
        })
    }
}

async fn list_audit_events(
    edge: &Edge,
    ctx: &CallContext,
    body: Bytes,
) -> Result<pb::ListAuditEventsResponse, AppError> {
    let input = edge.read(ctx, &body, |c, r: &pb::ListAuditEventsRequest| {
        let patient = if r.patient_id.is_empty() { None } else { patient_id(c, "patient_id", &r.patient_id) };
        let actor = c.text("actor", &r.actor, 256, false);
        let action = c.text("action", &r.action, 64, false);
        let outcome = outcome(c, "outcome", r.outcome);
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
        let size = page_size(c, "page_size", r.page_size, 100, 1000);
        let from_sequence = decode_token(c, &r.page_token);
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
        (Named::patient(patient), Some(filter))
    });
    let page = edge.app.list_audit_events(ctx, input).await?;
    Ok(pb::ListAuditEventsResponse {
        events: page.events.iter().map(|(e, h)| audit_event_pb(e, h)).collect(),
        next_page_token: page.next_sequence.map(|s| super::encode_page_token(TOKEN_PREFIX, s)).unwrap_or_default(),
    })
}

fn export_audit_events<'a>(edge: &'a Edge, ctx: &'a CallContext, body: Bytes) -> HandlerFuture<'a, ReplyStream> {
    Box::pin(async move {
        let input: Input<u64> =
            edge.read(ctx, &body, |_, r: &pb::ExportAuditEventsRequest| (Named::default(), Some(r.start_sequence)));
        let start = edge.app.start_export(ctx, input).await?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Status>>(4);
        let store = edge.app.store().clone();
        let request_id = ctx.request_id.clone();
        tokio::spawn(
            async move {
                let mut next = start.from;
                while next <= start.to {
                    let page = match store.audit_entries(next, start.to, EXPORT_BATCH).await {
                        Ok(page) => page,
                        Err(err) => {
                            tracing::error!(error = %err, "audit export read failed");
                            let _ = tx.send(Err(to_status(&AppError::Internal, &request_id))).await;
                            return;
                        }
                    };
                    let Some(last) = page.last() else { return };
                    next = last.sequence + 1;
                    let entries = page
                        .into_iter()
                        .map(|e| pb::ExportedAuditEntry { sequence: e.sequence, entry: e.bytes, hash: e.hash.to_vec() })
                        .collect();
                    let msg = pb::ExportAuditEventsResponse { entries };
                    if tx.send(Ok(Bytes::from(prost::Message::encode_to_vec(&msg)))).await.is_err() {
                        return; // client went away
                    }
                }
            }
            .instrument(tracing::Span::current()),
        );
        let stream: ReplyStream = Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx));
        Ok(stream)
    })
}

async fn get_audit_head(edge: &Edge, ctx: &CallContext, body: Bytes) -> Result<pb::GetAuditHeadResponse, AppError> {
    let input = edge.read(ctx, &body, |_, _: &pb::GetAuditHeadRequest| (Named::default(), Some(())));
    let (sequence, hash) = edge.app.audit_head(ctx, input).await?;
    Ok(pb::GetAuditHeadResponse { sequence, hash: hash.to_vec() })
}

fn checkpoint_pb(c: crate::app::checkpoints::ServedCheckpoint) -> pb::SignedCheckpoint {
    pb::SignedCheckpoint {
        note: c.note,
        origin: c.checkpoint.origin,
        tree_size: c.checkpoint.size,
        root_hash: c.checkpoint.root.to_vec(),
        signed_at: Some(super::convert::timestamp(c.signed_micros)),
        cosignatures: u32::try_from(c.cosignatures).unwrap_or(u32::MAX),
    }
}

async fn get_checkpoint(edge: &Edge, ctx: &CallContext, body: Bytes) -> Result<pb::GetCheckpointResponse, AppError> {
    let input = edge.read(ctx, &body, |_, r: &pb::GetCheckpointRequest| {
        let size = (r.tree_size != 0).then_some(r.tree_size);
        let query = if r.cosigned { CheckpointQuery::CosignedBelow(size) } else { CheckpointQuery::At(size) };
        (Named::default(), Some(query))
    });
    let c = edge.app.get_checkpoint(ctx, input).await?;
    Ok(pb::GetCheckpointResponse { checkpoint: Some(checkpoint_pb(c)) })
}

async fn get_inclusion_proof(
    edge: &Edge,
    ctx: &CallContext,
    body: Bytes,
) -> Result<pb::GetInclusionProofResponse, AppError> {
    let input = edge
        .read(ctx, &body, |_, r: &pb::GetInclusionProofRequest| (Named::default(), Some((r.sequence, r.tree_size))));
    let sequence = input.parsed.as_ref().map_or(0, |(s, _)| *s);
    let p = edge.app.inclusion_proof(ctx, input).await?;
    Ok(pb::GetInclusionProofResponse {
        sequence,
        tree_size: p.tree_size,
        hashes: p.hashes.iter().map(|h| h.to_vec()).collect(),
        entry: p.entry.unwrap_or_default(),
        checkpoint: p.checkpoint.map(checkpoint_pb),
    })
}

async fn get_consistency_proof(
    edge: &Edge,
    ctx: &CallContext,
    body: Bytes,
) -> Result<pb::GetConsistencyProofResponse, AppError> {
    let input = edge
        .read(ctx, &body, |_, r: &pb::GetConsistencyProofRequest| (Named::default(), Some((r.old_size, r.tree_size))));
    let old_size = input.parsed.as_ref().map_or(0, |(s, _)| *s);
    let p = edge.app.consistency_proof(ctx, input).await?;
    Ok(pb::GetConsistencyProofResponse {
        old_size,
        tree_size: p.tree_size,
        hashes: p.hashes.iter().map(|h| h.to_vec()).collect(),
        checkpoint: p.checkpoint.map(checkpoint_pb),
    })
}

async fn add_cosignature(edge: &Edge, ctx: &CallContext, body: Bytes) -> Result<pb::AddCosignatureResponse, AppError> {
    let input = edge.read(ctx, &body, |c, r: &pb::AddCosignatureRequest| {
        if r.note.is_empty() {
            c.bad("note", "is required");
        } else if r.note.len() > 8192 {
            c.bad("note", crate::error::Description::TooLarge(8192));
        }
        let note = r.note.clone();
        let key = match crate::audit::note::Verifier::parse(&r.witness_key) {
            Ok(k) if k.alg == crate::audit::note::COSIGNATURE_V1 => Some(k),
            _ => {
                c.bad("witness_key", "must be a cosigner verifier key: name+keyid+base64(0x04 || Ed25519 key)");
                None
            }
        };
        (Named::default(), key.map(|k| (note, k)))
    });
    let c = edge.app.add_cosignature(ctx, input).await?;
    Ok(pb::AddCosignatureResponse { checkpoint: Some(checkpoint_pb(c)) })
}
