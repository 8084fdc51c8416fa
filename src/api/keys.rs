//! KeyService: master key status, rotation, rewrap, retirement, destruction,
//! re-encryption and erasure.

use tonic::{Request, Response, Status};

use super::convert::{patient_id, timestamp};
use super::validate::Checker;
use super::{Edge, reply};
use crate::app::{
    BlindIndexJob, EraseRequest, Erasure, KeyStatus, ReencryptJob, ReencryptRequest, RewrapJob, RewrapRequest,
};
use crate::proto::v1 as pb;
use crate::proto::v1::key_service_server::KeyService;

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
    }
}

fn version(c: &mut Checker, v: u32) -> Option<u32> {
    if v == 0 {
        c.bad("version", "is required (versions start at 1)");
        return None;
    }
    Some(v)
}

#[tonic::async_trait]
impl KeyService for Edge {
    async fn get_key_status(
        &self,
        req: Request<pb::GetKeyStatusRequest>,
    ) -> Result<Response<pb::GetKeyStatusResponse>, Status> {
        let ctx = self.context(&req);
        let now = self.clock.now_micros();
        let result = self.app.key_status(&ctx).await;
        reply(&ctx, result.map(|s| status_pb(&s, now)))
    }

    async fn rotate_master_key(
        &self,
        req: Request<pb::RotateMasterKeyRequest>,
    ) -> Result<Response<pb::RotateMasterKeyResponse>, Status> {
        let ctx = self.context(&req);
        let result = self.app.rotate_master_key(&ctx).await;
        reply(
            &ctx,
            result.map(|(new_version, previous_primary)| pb::RotateMasterKeyResponse { new_version, previous_primary }),
        )
    }

    async fn start_rewrap(
        &self,
        req: Request<pb::StartRewrapRequest>,
    ) -> Result<Response<pb::StartRewrapResponse>, Status> {
        let ctx = self.context(&req);
        let r = req.get_ref();
        let input = Checker::default()
            .into_result(Some(RewrapRequest { dry_run: r.dry_run, max_per_second: r.max_per_second }));
        let now = self.clock.now_micros();
        let result = self.app.start_rewrap(&ctx, input).await;
        reply(&ctx, result.map(|j| pb::StartRewrapResponse { job: Some(job_pb(&j, now)) }))
    }

    async fn get_rewrap_job(
        &self,
        req: Request<pb::GetRewrapJobRequest>,
    ) -> Result<Response<pb::GetRewrapJobResponse>, Status> {
        let ctx = self.context(&req);
        let now = self.clock.now_micros();
        let result = self.app.get_rewrap_job(&ctx).await;
        reply(&ctx, result.map(|j| pb::GetRewrapJobResponse { job: j.as_ref().map(|j| job_pb(j, now)) }))
    }

    async fn retire_master_key(
        &self,
        req: Request<pb::RetireMasterKeyRequest>,
    ) -> Result<Response<pb::RetireMasterKeyResponse>, Status> {
        let ctx = self.context(&req);
        let mut c = Checker::default();
        let v = version(&mut c, req.get_ref().version);
        let result = self.app.retire_master_key(&ctx, c.into_result(v)).await;
        reply(&ctx, result.map(|version| pb::RetireMasterKeyResponse { version }))
    }

    async fn destroy_master_key(
        &self,
        req: Request<pb::DestroyMasterKeyRequest>,
    ) -> Result<Response<pb::DestroyMasterKeyResponse>, Status> {
        let ctx = self.context(&req);
        let mut c = Checker::default();
        let v = version(&mut c, req.get_ref().version);
        let result = self.app.destroy_master_key(&ctx, c.into_result(v)).await;
        let version = req.get_ref().version;
        reply(&ctx, result.map(|material_removed| pb::DestroyMasterKeyResponse { version, material_removed }))
    }

    async fn erase_patient(
        &self,
        req: Request<pb::ErasePatientRequest>,
    ) -> Result<Response<pb::ErasePatientResponse>, Status> {
        let ctx = self.context(&req);
        let r = req.get_ref();
        let mut c = Checker::default();
        let patient = patient_id(&mut c, "patient_id", &r.patient_id);
        let reason = c.text("reason", &r.reason, 1000, true);
        let input = c.into_result(patient.map(|patient| EraseRequest { patient, reason }));
        let result = self.app.erase_patient(&ctx, input).await;
        reply(&ctx, result.map(|e| erasure_pb(&e)))
    }

    async fn start_reencrypt(
        &self,
        req: Request<pb::StartReencryptRequest>,
    ) -> Result<Response<pb::StartReencryptResponse>, Status> {
        let ctx = self.context(&req);
        let r = req.get_ref();
        let mut c = Checker::default();
        let patient = if r.patient_id.is_empty() { None } else { patient_id(&mut c, "patient_id", &r.patient_id) };
        let valid = r.patient_id.is_empty() || patient.is_some();
        let input = c.into_result(valid.then_some(ReencryptRequest { patient, max_per_second: r.max_per_second }));
        let now = self.clock.now_micros();
        let result = self.app.start_reencrypt(&ctx, input).await;
        reply(&ctx, result.map(|j| pb::StartReencryptResponse { job: Some(reencrypt_pb(&j, now)) }))
    }

    async fn rotate_blind_index_key(
        &self,
        req: Request<pb::RotateBlindIndexKeyRequest>,
    ) -> Result<Response<pb::RotateBlindIndexKeyResponse>, Status> {
        let ctx = self.context(&req);
        let result = self.app.rotate_blind_index(&ctx).await;
        reply(&ctx, result.map(|j| pb::RotateBlindIndexKeyResponse { job: Some(blind_pb(&j)) }))
    }

    async fn get_blind_index_job(
        &self,
        req: Request<pb::GetBlindIndexJobRequest>,
    ) -> Result<Response<pb::GetBlindIndexJobResponse>, Status> {
        let ctx = self.context(&req);
        let result = self.app.get_blind_index_job(&ctx).await;
        reply(&ctx, result.map(|j| pb::GetBlindIndexJobResponse { job: j.as_ref().map(blind_pb) }))
    }

    async fn get_reencrypt_job(
        &self,
        req: Request<pb::GetReencryptJobRequest>,
    ) -> Result<Response<pb::GetReencryptJobResponse>, Status> {
        let ctx = self.context(&req);
        let now = self.clock.now_micros();
        let result = self.app.get_reencrypt_job(&ctx).await;
        reply(&ctx, result.map(|j| pb::GetReencryptJobResponse { job: j.as_ref().map(|j| reencrypt_pb(j, now)) }))
    }
}
