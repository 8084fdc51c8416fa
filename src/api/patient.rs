//! PatientService.

use prost::Message;
use tonic::{Request, Response, Status};

use super::convert::{patient_data, patient_id, patient_pb, version};
use super::validate::Checker;
use super::{Edge, page_size, reply};
use crate::app::{PageRequest, PatientUpdate, SearchCriterion, SearchRequest};
use crate::domain::PatientId;
use crate::proto::v1 as pb;
use crate::proto::v1::patient_service_server::PatientService;

const PAGE_TOKEN_PREFIX: &str = "p1:";

fn encode_page_token(after: PatientId) -> String {
    super::encode_page_token(PAGE_TOKEN_PREFIX, after)
}

fn decode_page_token(c: &mut Checker, token: &str) -> Option<PatientId> {
    super::decode_page_token(c, token, PAGE_TOKEN_PREFIX, PatientId::parse, "is not a token returned by ListPatients")
}

#[tonic::async_trait]
impl PatientService for Edge {
    async fn create_patient(
        &self,
        req: Request<pb::CreatePatientRequest>,
    ) -> Result<Response<pb::CreatePatientResponse>, Status> {
        let ctx = self.context(&req);
        let r = req.get_ref();
        let mut c = Checker::default();
        c.size(r.encoded_len());
        let data = match &r.patient {
            Some(p) => patient_data(&mut c, "patient", p, self.today()),
            None => {
                c.bad("patient", "is required");
                None
            }
        };
        let result = self.app.create_patient(&ctx, c.into_result(data)).await;
        reply(&ctx, result.map(|p| pb::CreatePatientResponse { patient: Some(patient_pb(&p)) }))
    }

    async fn get_patient(
        &self,
        req: Request<pb::GetPatientRequest>,
    ) -> Result<Response<pb::GetPatientResponse>, Status> {
        let ctx = self.context(&req);
        let mut c = Checker::default();
        let id = patient_id(&mut c, "patient_id", &req.get_ref().patient_id);
        let result = self.app.get_patient(&ctx, c.into_result(id)).await;
        reply(&ctx, result.map(|p| pb::GetPatientResponse { patient: Some(patient_pb(&p)) }))
    }

    async fn update_patient(
        &self,
        req: Request<pb::UpdatePatientRequest>,
    ) -> Result<Response<pb::UpdatePatientResponse>, Status> {
        let ctx = self.context(&req);
        let r = req.get_ref();
        let mut c = Checker::default();
        c.size(r.encoded_len());
        let parsed = match &r.patient {
            Some(p) => {
                let id = patient_id(&mut c, "patient.id", &p.id);
                let expected_version = version(&mut c, "patient.version", p.version);
                let data = patient_data(&mut c, "patient", p, self.today());
                id.zip(data).map(|(id, data)| PatientUpdate { id, expected_version, data })
            }
            None => {
                c.bad("patient", "is required");
                None
            }
        };
        let result = self.app.update_patient(&ctx, c.into_result(parsed)).await;
        reply(&ctx, result.map(|p| pb::UpdatePatientResponse { patient: Some(patient_pb(&p)) }))
    }

    async fn delete_patient(
        &self,
        req: Request<pb::DeletePatientRequest>,
    ) -> Result<Response<pb::DeletePatientResponse>, Status> {
        let ctx = self.context(&req);
        let r = req.get_ref();
        let mut c = Checker::default();
        let id = patient_id(&mut c, "patient_id", &r.patient_id);
        let v = version(&mut c, "version", r.version);
        let result = self.app.delete_patient(&ctx, c.into_result(id.map(|id| (id, v)))).await;
        reply(&ctx, result.map(|p| pb::DeletePatientResponse { patient: Some(patient_pb(&p)) }))
    }

    async fn list_patients(
        &self,
        req: Request<pb::ListPatientsRequest>,
    ) -> Result<Response<pb::ListPatientsResponse>, Status> {
        let ctx = self.context(&req);
        let r = req.get_ref();
        let mut c = Checker::default();
        let size = page_size(&mut c, "page_size", r.page_size, 50, 200);
        let after = decode_page_token(&mut c, &r.page_token);
        let parsed = c.into_result(Some(PageRequest { page_size: size, after, show_deleted: r.show_deleted }));
        let result = self.app.list_patients(&ctx, parsed).await;
        reply(
            &ctx,
            result.map(|page| pb::ListPatientsResponse {
                patients: page.patients.iter().map(patient_pb).collect(),
                next_page_token: page.next_after.map(encode_page_token).unwrap_or_default(),
            }),
        )
    }

    async fn search_patients(
        &self,
        req: Request<pb::SearchPatientsRequest>,
    ) -> Result<Response<pb::SearchPatientsResponse>, Status> {
        let ctx = self.context(&req);
        let r = req.get_ref();
        let mut c = Checker::default();
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
                let birth =
                    super::convert::fhir_date(&mut c, "name_birth_date.birth_date", &q.birth_date, self.today());
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
        let limit = page_size(&mut c, "page_size", r.page_size, 50, 200);
        let parsed =
            c.into_result(criterion.map(|criterion| SearchRequest { criterion, show_deleted: r.show_deleted, limit }));
        let result = self.app.search_patients(&ctx, parsed).await;
        reply(
            &ctx,
            result.map(|s| pb::SearchPatientsResponse {
                patients: s.patients.iter().map(patient_pb).collect(),
                truncated: s.truncated,
            }),
        )
    }

    async fn get_patient_history(
        &self,
        req: Request<pb::GetPatientHistoryRequest>,
    ) -> Result<Response<pb::GetPatientHistoryResponse>, Status> {
        let ctx = self.context(&req);
        let mut c = Checker::default();
        let id = patient_id(&mut c, "patient_id", &req.get_ref().patient_id);
        let result = self.app.patient_history(&ctx, c.into_result(id)).await;
        reply(&ctx, result.map(|v| pb::GetPatientHistoryResponse { versions: v.iter().map(patient_pb).collect() }))
    }
}
