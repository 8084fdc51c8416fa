//! PatientService.

use bytes::Bytes;

use super::convert::{patient_data, patient_id, patient_pb, version};
use super::grpc::{Method, Methods, unary};
use super::validate::Checker;
use super::{Edge, page_size};
use crate::app::{CallContext, Named, PageRequest, PatientUpdate, SearchCriterion, SearchRequest};
use crate::domain::{Action, PatientId};
use crate::error::AppError;
use crate::proto::v1 as pb;

const PAGE_TOKEN_PREFIX: &str = "p1:";

fn encode_page_token(after: PatientId) -> String {
    super::encode_page_token(PAGE_TOKEN_PREFIX, after)
}

fn decode_page_token(c: &mut Checker, token: &str) -> Option<PatientId> {
    super::decode_page_token(c, token, PAGE_TOKEN_PREFIX, PatientId::parse, "is not a token returned by ListPatients")
}

/// The methods of `carevault.v1.PatientService`.
pub struct PatientService;

impl Methods for PatientService {
    const NAME: &'static str = "carevault.v1.PatientService";

    fn find(name: &str) -> Option<Method> {
        Some(match name {
            "CreatePatient" => unary!(Action::PatientCreate, create_patient),
            "GetPatient" => unary!(Action::PatientRead, get_patient),
            "UpdatePatient" => unary!(Action::PatientUpdate, update_patient),
            "DeletePatient" => unary!(Action::PatientDelete, delete_patient),
            "ListPatients" => unary!(Action::PatientList, list_patients),
            "SearchPatients" => unary!(Action::PatientSearch, search_patients),
            "GetPatientHistory" => unary!(Action::PatientHistory, get_patient_history),
            _ => return None,
        })
    }
}

async fn create_patient(edge: &Edge, ctx: &CallContext, body: Bytes) -> Result<pb::CreatePatientResponse, AppError> {
    let input = edge.read(ctx, &body, |c, r: &pb::CreatePatientRequest| {
        let data = match &r.patient {
            Some(p) => patient_data(c, "patient", p, edge.today()),
            None => {
                c.bad("patient", "is required");
                None
            }
        };
        (Named::default(), data)
    });
    let p = edge.app.create_patient(ctx, input).await?;
    Ok(pb::CreatePatientResponse { patient: Some(patient_pb(&p)) })
}

async fn get_patient(edge: &Edge, ctx: &CallContext, body: Bytes) -> Result<pb::GetPatientResponse, AppError> {
    let input = edge.read(ctx, &body, |c, r: &pb::GetPatientRequest| {
        let id = patient_id(c, "patient_id", &r.patient_id);
        (Named::patient(id), id)
    });
    let p = edge.app.get_patient(ctx, input).await?;
    Ok(pb::GetPatientResponse { patient: Some(patient_pb(&p)) })
}

async fn update_patient(edge: &Edge, ctx: &CallContext, body: Bytes) -> Result<pb::UpdatePatientResponse, AppError> {
    let input = edge.read(ctx, &body, |c, r: &pb::UpdatePatientRequest| match &r.patient {
        Some(p) => {
            let id = patient_id(c, "patient.id", &p.id);
            let expected_version = version(c, "patient.version", p.version);
            let data = patient_data(c, "patient", p, edge.today());
            (Named::patient(id), id.zip(data).map(|(id, data)| PatientUpdate { id, expected_version, data }))
        }
        None => {
            c.bad("patient", "is required");
            (Named::default(), None)
        }
    });
    let p = edge.app.update_patient(ctx, input).await?;
    Ok(pb::UpdatePatientResponse { patient: Some(patient_pb(&p)) })
}

async fn delete_patient(edge: &Edge, ctx: &CallContext, body: Bytes) -> Result<pb::DeletePatientResponse, AppError> {
    let input = edge.read(ctx, &body, |c, r: &pb::DeletePatientRequest| {
        let id = patient_id(c, "patient_id", &r.patient_id);
        let v = version(c, "version", r.version);
        (Named::patient(id), id.map(|id| (id, v)))
    });
    let p = edge.app.delete_patient(ctx, input).await?;
    Ok(pb::DeletePatientResponse { patient: Some(patient_pb(&p)) })
}

async fn list_patients(edge: &Edge, ctx: &CallContext, body: Bytes) -> Result<pb::ListPatientsResponse, AppError> {
    let input = edge.read(ctx, &body, |c, r: &pb::ListPatientsRequest| {
        let size = page_size(c, "page_size", r.page_size, 50, 200);
        let after = decode_page_token(c, &r.page_token);
        (Named::default(), Some(PageRequest { page_size: size, after, show_deleted: r.show_deleted }))
    });
    let page = edge.app.list_patients(ctx, input).await?;
    Ok(pb::ListPatientsResponse {
        patients: page.patients.iter().map(patient_pb).collect(),
        next_page_token: page.next_after.map(encode_page_token).unwrap_or_default(),
    })
}

async fn search_patients(edge: &Edge, ctx: &CallContext, body: Bytes) -> Result<pb::SearchPatientsResponse, AppError> {
    let input = edge.read(ctx, &body, |c, r: &pb::SearchPatientsRequest| {
        use pb::search_patients_request::Criterion;
        let criterion = match &r.criterion {
            Some(Criterion::Identifier(q)) => {
                let system = c.text("identifier.system", &q.system, 256, true);
                let value = c.text("identifier.value", &q.value, 128, true);
                Some(SearchCriterion::Identifier { system, value })
            }
            Some(Criterion::NameBirthDate(q)) => {
                let family = c.text("name_birth_date.family", &q.family, 100, true);
                if q.birth_date.is_empty() {
                    c.bad("name_birth_date.birth_date", "is required");
                }
                let birth = super::convert::fhir_date(c, "name_birth_date.birth_date", &q.birth_date, edge.today());
                if !family.is_empty() && crate::domain::normalize::family_name(&family).is_empty() {
                    c.bad("name_birth_date.family", "must contain a letter or digit");
                }
                birth.map(|birth_date| SearchCriterion::NameBirthDate { family, birth_date })
            }
            Some(Criterion::MemberId(q)) => {
                let m = c.text("member_id.member_id", &q.member_id, 64, true);
                Some(SearchCriterion::MemberId(m))
            }
            None => {
                c.bad("criterion", "one of identifier, name_birth_date or member_id is required");
                None
            }
        };
        let limit = page_size(c, "page_size", r.page_size, 50, 200);
        (Named::default(), criterion.map(|criterion| SearchRequest { criterion, show_deleted: r.show_deleted, limit }))
    });
    let s = edge.app.search_patients(ctx, input).await?;
    Ok(pb::SearchPatientsResponse { patients: s.patients.iter().map(patient_pb).collect(), truncated: s.truncated })
}

async fn get_patient_history(
    edge: &Edge,
    ctx: &CallContext,
    body: Bytes,
) -> Result<pb::GetPatientHistoryResponse, AppError> {
    let input = edge.read(ctx, &body, |c, r: &pb::GetPatientHistoryRequest| {
        let id = patient_id(c, "patient_id", &r.patient_id);
        (Named::patient(id), id)
    });
    let versions = edge.app.patient_history(ctx, input).await?;
    Ok(pb::GetPatientHistoryResponse { versions: versions.iter().map(patient_pb).collect() })
}
