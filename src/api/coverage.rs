//! CoverageService.

use prost::Message;
use tonic::{Request, Response, Status};

use super::convert::{calendar_date, coverage_data, coverage_id, coverage_pb, patient_id, version};
use super::validate::Checker;
use super::{Edge, reply};
use crate::app::{CoverageCreate, CoverageUpdate};
use crate::proto::v1 as pb;
use crate::proto::v1::coverage_service_server::CoverageService;

#[tonic::async_trait]
impl CoverageService for Edge {
    async fn create_coverage(
        &self,
        req: Request<pb::CreateCoverageRequest>,
    ) -> Result<Response<pb::CreateCoverageResponse>, Status> {
        let ctx = self.context(&req);
        let r = req.get_ref();
        let mut c = Checker::default();
        c.size(r.encoded_len());
        let parsed = match &r.coverage {
            Some(cv) => {
                let patient = patient_id(&mut c, "coverage.patient_id", &cv.patient_id);
                let data = coverage_data(&mut c, "coverage", cv, self.today());
                patient.zip(data).map(|(patient_id, data)| CoverageCreate { patient_id, data })
            }
            None => {
                c.bad("coverage", "is required");
                None
            }
        };
        let result = self.app.create_coverage(&ctx, c.into_result(parsed)).await;
        reply(&ctx, result.map(|cv| pb::CreateCoverageResponse { coverage: Some(coverage_pb(&cv)) }))
    }

    async fn get_coverage(
        &self,
        req: Request<pb::GetCoverageRequest>,
    ) -> Result<Response<pb::GetCoverageResponse>, Status> {
        let ctx = self.context(&req);
        let mut c = Checker::default();
        let id = coverage_id(&mut c, "coverage_id", &req.get_ref().coverage_id);
        let result = self.app.get_coverage(&ctx, c.into_result(id)).await;
        reply(&ctx, result.map(|cv| pb::GetCoverageResponse { coverage: Some(coverage_pb(&cv)) }))
    }

    async fn update_coverage(
        &self,
        req: Request<pb::UpdateCoverageRequest>,
    ) -> Result<Response<pb::UpdateCoverageResponse>, Status> {
        let ctx = self.context(&req);
        let r = req.get_ref();
        let mut c = Checker::default();
        c.size(r.encoded_len());
        let parsed = match &r.coverage {
            Some(cv) => {
                let id = coverage_id(&mut c, "coverage.id", &cv.id);
                let expected_version = version(&mut c, "coverage.version", cv.version);
                let patient = if cv.patient_id.is_empty() {
                    None
                } else {
                    patient_id(&mut c, "coverage.patient_id", &cv.patient_id)
                };
                let data = coverage_data(&mut c, "coverage", cv, self.today());
                id.zip(data).map(|(id, data)| CoverageUpdate { id, expected_version, patient_id: patient, data })
            }
            None => {
                c.bad("coverage", "is required");
                None
            }
        };
        let result = self.app.update_coverage(&ctx, c.into_result(parsed)).await;
        reply(&ctx, result.map(|cv| pb::UpdateCoverageResponse { coverage: Some(coverage_pb(&cv)) }))
    }

    async fn delete_coverage(
        &self,
        req: Request<pb::DeleteCoverageRequest>,
    ) -> Result<Response<pb::DeleteCoverageResponse>, Status> {
        let ctx = self.context(&req);
        let r = req.get_ref();
        let mut c = Checker::default();
        let id = coverage_id(&mut c, "coverage_id", &r.coverage_id);
        let v = version(&mut c, "version", r.version);
        let result = self.app.delete_coverage(&ctx, c.into_result(id.map(|id| (id, v)))).await;
        reply(&ctx, result.map(|cv| pb::DeleteCoverageResponse { coverage: Some(coverage_pb(&cv)) }))
    }

    async fn list_coverages(
        &self,
        req: Request<pb::ListCoveragesRequest>,
    ) -> Result<Response<pb::ListCoveragesResponse>, Status> {
        let ctx = self.context(&req);
        let r = req.get_ref();
        let mut c = Checker::default();
        let id = patient_id(&mut c, "patient_id", &r.patient_id);
        let result = self.app.list_coverages(&ctx, c.into_result(id.map(|id| (id, r.show_deleted)))).await;
        reply(&ctx, result.map(|list| pb::ListCoveragesResponse { coverages: list.iter().map(coverage_pb).collect() }))
    }

    async fn get_active_coverage(
        &self,
        req: Request<pb::GetActiveCoverageRequest>,
    ) -> Result<Response<pb::GetActiveCoverageResponse>, Status> {
        let ctx = self.context(&req);
        let r = req.get_ref();
        let mut c = Checker::default();
        let id = patient_id(&mut c, "patient_id", &r.patient_id);
        if r.date.is_empty() {
            c.bad("date", "is required");
        }
        let date = calendar_date(&mut c, "date", &r.date);
        let result = self.app.active_coverage(&ctx, c.into_result(id.zip(date))).await;
        reply(
            &ctx,
            result.map(|list| pb::GetActiveCoverageResponse { coverages: list.iter().map(coverage_pb).collect() }),
        )
    }
}
