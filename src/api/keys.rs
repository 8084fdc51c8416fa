//! KeyService: master key status, rotation, rewrap, retirement, destruction,
//! re-encryption and erasure.

use bytes::Bytes;

use super::Edge;
use super::convert::{patient_id, timestamp};
use super::grpc::{Method, Methods, unary};
use super::validate::Checker;
use crate::app::{
    BlindIndexJob, CallContext, EraseRequest, Erasure, Input, KeyStatus, Named, ReencryptJob, ReencryptRequest,
    RewrapJob, RewrapRequest,
};
use crate::domain::Action;
use crate::error::AppError;
use crate::proto::v1 as pb;

/// A job as its proto message, with its rate at `now` (µs).
pub fn job_pb(j: &RewrapJob, now: i64) -> pb::RewrapJob {
    pb::RewrapJob {
        job_id: j.id.clone(),
        state: j.state.clone(),
        target_version: j.target,
        done: j.done,
        total: j.total,
        rate: j.rate(now),
        max_per_second: j.max_per_second,
        start_time: Some(timestamp(j.started_at)),
        finish_time: j.finished_at.map(timestamp),
    }
}

/// A re-encryption job as its proto message, with its rate at `now` (µs).
pub fn reencrypt_pb(j: &ReencryptJob, now: i64) -> pb::ReencryptJob {
    pb::ReencryptJob {
        job_id: j.id.clone(),
        state: j.state.clone(),
        patient_id: j.patient.clone().unwrap_or_default(),
        done: j.done,
        total: j.total,
        record_versions: j.record_versions,
        rate: j.rate(now),
        max_per_second: j.max_per_second,
        start_time: Some(timestamp(j.started_at)),
        finish_time: j.finished_at.map(timestamp),
    }
}

/// A blind-index rotation as its proto message.
pub fn blind_pb(j: &BlindIndexJob) -> pb::BlindIndexJob {
    pb::BlindIndexJob {
        job_id: j.id.clone(),
        state: j.state.clone(),
        from_version: j.from,
        to_version: j.to,
        reindexed: j.reindexed,
        total: j.total,
        dropped: j.dropped,
        start_time: Some(timestamp(j.started_at)),
        finish_time: j.finished_at.map(timestamp),
    }
}

/// An erasure's report as its proto message.
pub fn erasure_pb(e: &Erasure) -> pb::ErasePatientResponse {
    pb::ErasePatientResponse {
        patient_id: e.patient.to_string(),
        erase_time: Some(timestamp(e.erased_at)),
        audit_sequence: e.audit_sequence,
        coverages_erased: e.coverages,
        record_versions_erased: e.record_versions,
        data_keys_rekeyed: e.rekeyed,
        caveats: e.caveats.clone(),
    }
}

/// A status report as its proto message.
pub fn status_pb(s: &KeyStatus, now: i64) -> pb::GetKeyStatusResponse {
    pb::GetKeyStatusResponse {
        versions: s
            .versions
            .iter()
            .map(|v| pb::KeyVersionStatus {
                version: v.version,
                state: v.state.as_str().into(),
                primary: v.primary,
                data_keys: v.uses.data_keys,
                records: v.uses.records,
                index_entries: v.uses.index_entries,
                notes: v.uses.notes,
            })
            .collect(),
        primary_version: s.primary,
        blind_index_version: s.blind_index_version,
        key_source: s.source.clone(),
        job: s.job.as_ref().map(|j| job_pb(j, now)),
        reencrypt_job: s.reencrypt_job.as_ref().map(|j| reencrypt_pb(j, now)),
        blind_index_job: s.blind_index_job.as_ref().map(blind_pb),
        pending_operation: s.pending.as_ref().map(|p| pb::PendingKeyOperation {
            operation: p.operation.as_str().into(),
            version: p.version,
            request_id: p.request_id.clone(),
            started_by: p.started_by.clone(),
            start_time: Some(timestamp(p.started_at)),
        }),
        log_keys: s.log_keys.clone(),
    }
}

fn version(c: &mut Checker, v: u32) -> Option<u32> {
    if v == 0 {
        c.bad("version", "is required (versions start at 1)");
        return None;
    }
    Some(v)
}

/// The methods of `carevault.v1.KeyService`.
pub struct KeyService;

impl Methods for KeyService {
    const NAME: &'static str = "carevault.v1.KeyService";

    fn find(name: &str) -> Option<Method> {
        Some(match name {
            "GetKeyStatus" => unary!(Action::KeysStatus, get_key_status),
            "RotateMasterKey" => unary!(Action::KeysRotate, rotate_master_key),
            "RotateLogKey" => unary!(Action::KeysLogKeyRotate, rotate_log_key),
            "StartRewrap" => unary!(Action::KeysRewrap, start_rewrap),
            "GetRewrapJob" => unary!(Action::KeysStatus, get_rewrap_job),
            "RetireMasterKey" => unary!(Action::KeysRetire, retire_master_key),
            "DestroyMasterKey" => unary!(Action::KeysDestroy, destroy_master_key),
            "ErasePatient" => unary!(Action::PatientErase, erase_patient),
            "StartReencrypt" => unary!(Action::KeysReencrypt, start_reencrypt),
            "GetReencryptJob" => unary!(Action::KeysStatus, get_reencrypt_job),
            "RotateBlindIndexKey" => unary!(Action::KeysBlindIndexRotate, rotate_blind_index_key),
            "GetBlindIndexJob" => unary!(Action::KeysStatus, get_blind_index_job),
            _ => return None,
        })
    }
}

/// A request without fields (it must still decode).
fn empty<M: prost::Message + Default>(edge: &Edge, ctx: &CallContext, body: &Bytes) -> Input<()> {
    edge.read(ctx, body, |_, _: &M| (Named::default(), Some(())))
}

async fn get_key_status(edge: &Edge, ctx: &CallContext, body: Bytes) -> Result<pb::GetKeyStatusResponse, AppError> {
    let input = empty::<pb::GetKeyStatusRequest>(edge, ctx, &body);
    let now = edge.clock.now_micros();
    let s = edge.app.key_status(ctx, input).await?;
    Ok(status_pb(&s, now))
}

async fn rotate_master_key(
    edge: &Edge,
    ctx: &CallContext,
    body: Bytes,
) -> Result<pb::RotateMasterKeyResponse, AppError> {
    let input = empty::<pb::RotateMasterKeyRequest>(edge, ctx, &body);
    let (new_version, previous_primary) = edge.app.rotate_master_key(ctx, input).await?;
    Ok(pb::RotateMasterKeyResponse { new_version, previous_primary })
}

async fn rotate_log_key(edge: &Edge, ctx: &CallContext, body: Bytes) -> Result<pb::RotateLogKeyResponse, AppError> {
    let input = empty::<pb::RotateLogKeyRequest>(edge, ctx, &body);
    let (version, log_key) = edge.app.rotate_log_key(ctx, input).await?;
    Ok(pb::RotateLogKeyResponse { version, log_key })
}

async fn start_rewrap(edge: &Edge, ctx: &CallContext, body: Bytes) -> Result<pb::StartRewrapResponse, AppError> {
    let input = edge.read(ctx, &body, |_, r: &pb::StartRewrapRequest| {
        (Named::default(), Some(RewrapRequest { dry_run: r.dry_run, max_per_second: r.max_per_second }))
    });
    let now = edge.clock.now_micros();
    let j = edge.app.start_rewrap(ctx, input).await?;
    Ok(pb::StartRewrapResponse { job: Some(job_pb(&j, now)) })
}

async fn get_rewrap_job(edge: &Edge, ctx: &CallContext, body: Bytes) -> Result<pb::GetRewrapJobResponse, AppError> {
    let input = empty::<pb::GetRewrapJobRequest>(edge, ctx, &body);
    let now = edge.clock.now_micros();
    let j = edge.app.get_rewrap_job(ctx, input).await?;
    Ok(pb::GetRewrapJobResponse { job: j.as_ref().map(|j| job_pb(j, now)) })
}

async fn retire_master_key(
    edge: &Edge,
    ctx: &CallContext,
    body: Bytes,
) -> Result<pb::RetireMasterKeyResponse, AppError> {
    let input = edge.read(ctx, &body, |c, r: &pb::RetireMasterKeyRequest| (Named::default(), version(c, r.version)));
    let version = edge.app.retire_master_key(ctx, input).await?;
    Ok(pb::RetireMasterKeyResponse { version })
}

async fn destroy_master_key(
    edge: &Edge,
    ctx: &CallContext,
    body: Bytes,
) -> Result<pb::DestroyMasterKeyResponse, AppError> {
    let input = edge.read(ctx, &body, |c, r: &pb::DestroyMasterKeyRequest| (Named::default(), version(c, r.version)));
    let v = input.parsed.as_ref().ok().copied().unwrap_or_default();
    let material_removed = edge.app.destroy_master_key(ctx, input).await?;
    Ok(pb::DestroyMasterKeyResponse { version: v, material_removed })
}

async fn erase_patient(edge: &Edge, ctx: &CallContext, body: Bytes) -> Result<pb::ErasePatientResponse, AppError> {
    let input = edge.read(ctx, &body, |c, r: &pb::ErasePatientRequest| {
        let patient = patient_id(c, "patient_id", &r.patient_id);
        let reason = c.text("reason", &r.reason, 1000, true);
        (Named::patient(patient), patient.map(|patient| EraseRequest { patient, reason }))
    });
    let e = edge.app.erase_patient(ctx, input).await?;
    Ok(erasure_pb(&e))
}

async fn start_reencrypt(edge: &Edge, ctx: &CallContext, body: Bytes) -> Result<pb::StartReencryptResponse, AppError> {
    let input = edge.read(ctx, &body, |c, r: &pb::StartReencryptRequest| {
        let patient = if r.patient_id.is_empty() { None } else { patient_id(c, "patient_id", &r.patient_id) };
        let valid = r.patient_id.is_empty() || patient.is_some();
        (Named::patient(patient), valid.then_some(ReencryptRequest { patient, max_per_second: r.max_per_second }))
    });
    let now = edge.clock.now_micros();
    let j = edge.app.start_reencrypt(ctx, input).await?;
    Ok(pb::StartReencryptResponse { job: Some(reencrypt_pb(&j, now)) })
}

async fn rotate_blind_index_key(
    edge: &Edge,
    ctx: &CallContext,
    body: Bytes,
) -> Result<pb::RotateBlindIndexKeyResponse, AppError> {
    let input = empty::<pb::RotateBlindIndexKeyRequest>(edge, ctx, &body);
    let j = edge.app.rotate_blind_index(ctx, input).await?;
    Ok(pb::RotateBlindIndexKeyResponse { job: Some(blind_pb(&j)) })
}

async fn get_blind_index_job(
    edge: &Edge,
    ctx: &CallContext,
    body: Bytes,
) -> Result<pb::GetBlindIndexJobResponse, AppError> {
    let input = empty::<pb::GetBlindIndexJobRequest>(edge, ctx, &body);
    let j = edge.app.get_blind_index_job(ctx, input).await?;
    Ok(pb::GetBlindIndexJobResponse { job: j.as_ref().map(blind_pb) })
}

async fn get_reencrypt_job(
    edge: &Edge,
    ctx: &CallContext,
    body: Bytes,
) -> Result<pb::GetReencryptJobResponse, AppError> {
    let input = empty::<pb::GetReencryptJobRequest>(edge, ctx, &body);
    let now = edge.clock.now_micros();
    let j = edge.app.get_reencrypt_job(ctx, input).await?;
    Ok(pb::GetReencryptJobResponse { job: j.as_ref().map(|j| reencrypt_pb(j, now)) })
}
