//! CoverageService.

use bytes::Bytes;

use super::Edge;
use super::convert::{calendar_date, coverage_data, coverage_id, coverage_pb, patient_id, version};
use super::grpc::{Method, Methods, unary};
use crate::app::{CallContext, CoverageCreate, CoverageUpdate, Named};
use crate::domain::Action;
use crate::error::AppError;
use crate::proto::v1 as pb;

/// The methods of `carevault.v1.CoverageService`.
pub struct CoverageService;

impl Methods for CoverageService {
    const NAME: &'static str = "carevault.v1.CoverageService";

    fn find(name: &str) -> Option<Method> {
        Some(match name {
            "CreateCoverage" => unary!(Action::CoverageCreate, create_coverage),
            "GetCoverage" => unary!(Action::CoverageRead, get_coverage),
            "UpdateCoverage" => unary!(Action::CoverageUpdate, update_coverage),
            "DeleteCoverage" => unary!(Action::CoverageDelete, delete_coverage),
            "ListCoverages" => unary!(Action::CoverageList, list_coverages),
            "GetActiveCoverage" => unary!(Action::CoverageActive, get_active_coverage),
            _ => return None,
        })
    }
}

async fn create_coverage(edge: &Edge, ctx: &CallContext, body: Bytes) -> Result<pb::CreateCoverageResponse, AppError> {
    let input = edge.read(ctx, &body, |c, r: &pb::CreateCoverageRequest| match &r.coverage {
        Some(cv) => {
            let patient = patient_id(c, "coverage.patient_id", &cv.patient_id);
            let data = coverage_data(c, "coverage", cv, edge.today());
            (Named::patient(patient), patient.zip(data).map(|(patient_id, data)| CoverageCreate { patient_id, data }))
        }
        None => {
            c.bad("coverage", "is required");
            (Named::default(), None)
        }
    });
    let cv = edge.app.create_coverage(ctx, input).await?;
    Ok(pb::CreateCoverageResponse { coverage: Some(coverage_pb(&cv)) })
}

async fn get_coverage(edge: &Edge, ctx: &CallContext, body: Bytes) -> Result<pb::GetCoverageResponse, AppError> {
    let input = edge.read(ctx, &body, |c, r: &pb::GetCoverageRequest| {
        let id = coverage_id(c, "coverage_id", &r.coverage_id);
        (Named::coverage(id), id)
    });
    let cv = edge.app.get_coverage(ctx, input).await?;
    Ok(pb::GetCoverageResponse { coverage: Some(coverage_pb(&cv)) })
}

async fn update_coverage(edge: &Edge, ctx: &CallContext, body: Bytes) -> Result<pb::UpdateCoverageResponse, AppError> {
    let input = edge.read(ctx, &body, |c, r: &pb::UpdateCoverageRequest| match &r.coverage {
        Some(cv) => {
            let id = coverage_id(c, "coverage.id", &cv.id);
            let expected_version = version(c, "coverage.version", cv.version);
            let patient =
                if cv.patient_id.is_empty() { None } else { patient_id(c, "coverage.patient_id", &cv.patient_id) };
            let data = coverage_data(c, "coverage", cv, edge.today());
            let update =
                id.zip(data).map(|(id, data)| CoverageUpdate { id, expected_version, patient_id: patient, data });
            (Named::coverage(id), update)
        }
        None => {
            c.bad("coverage", "is required");
            (Named::default(), None)
        }
    });
    let cv = edge.app.update_coverage(ctx, input).await?;
    Ok(pb::UpdateCoverageResponse { coverage: Some(coverage_pb(&cv)) })
}

async fn delete_coverage(edge: &Edge, ctx: &CallContext, body: Bytes) -> Result<pb::DeleteCoverageResponse, AppError> {
    let input = edge.read(ctx, &body, |c, r: &pb::DeleteCoverageRequest| {
        let id = coverage_id(c, "coverage_id", &r.coverage_id);
        let v = version(c, "version", r.version);
        (Named::coverage(id), id.map(|id| (id, v)))
    });
    let cv = edge.app.delete_coverage(ctx, input).await?;
    Ok(pb::DeleteCoverageResponse { coverage: Some(coverage_pb(&cv)) })
}

async fn list_coverages(edge: &Edge, ctx: &CallContext, body: Bytes) -> Result<pb::ListCoveragesResponse, AppError> {
    let input = edge.read(ctx, &body, |c, r: &pb::ListCoveragesRequest| {
        let id = patient_id(c, "patient_id", &r.patient_id);
        (Named::patient(id), id.map(|id| (id, r.show_deleted)))
    });
    let list = edge.app.list_coverages(ctx, input).await?;
    Ok(pb::ListCoveragesResponse { coverages: list.iter().map(coverage_pb).collect() })
}

async fn get_active_coverage(
    edge: &Edge,
    ctx: &CallContext,
    body: Bytes,
) -> Result<pb::GetActiveCoverageResponse, AppError> {
    let input = edge.read(ctx, &body, |c, r: &pb::GetActiveCoverageRequest| {
        let id = patient_id(c, "patient_id", &r.patient_id);
        if r.date.is_empty() {
            c.bad("date", "is required");
        }
        let date = calendar_date(c, "date", &r.date);
        (Named::patient(id), id.zip(date))
    });
    let list = edge.app.active_coverage(ctx, input).await?;
    Ok(pb::GetActiveCoverageResponse { coverages: list.iter().map(coverage_pb).collect() })
}
