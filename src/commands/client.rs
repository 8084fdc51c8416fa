//! `carevault client`: try the service by hand. JSON in and out follows the
//! proto3 JSON mapping (pbjson).

use std::io::Read;
use std::path::Path;

use anyhow::{Context, bail};
use base64::Engine;
use carevault::cli::{ClientArgs, ClientCommand};
use carevault::proto::v1 as pb;
use carevault::proto::v1::access_service_client::AccessServiceClient;
use carevault::proto::v1::audit_service_client::AuditServiceClient;
use carevault::proto::v1::coverage_service_client::CoverageServiceClient;
use carevault::proto::v1::patient_service_client::PatientServiceClient;

fn read_json(path: &Path) -> anyhow::Result<String> {
    if path == Path::new("-") {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        Ok(s)
    } else {
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
    }
}

fn print<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", super::output::json(v)?);
    Ok(())
}

struct Caller {
    token: String,
    purpose: Option<String>,
    break_glass_reason: Option<String>,
}

impl Caller {
    fn req<T>(&self, msg: T) -> anyhow::Result<tonic::Request<T>> {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut().insert("authorization", format!("Bearer {}", self.token).parse()?);
        if let Some(p) = &self.purpose {
            r.metadata_mut().insert("x-purpose-of-use", p.parse().context("--purpose must be ASCII")?);
        }
        if let Some(reason) = &self.break_glass_reason {
            r.metadata_mut().insert(
                "x-break-glass-reason",
                reason.parse().context("--break-glass-reason must be printable ASCII")?,
            );
        }
        Ok(r)
    }
}

use super::output::status;

/// Runs one client command.
pub async fn run(args: ClientArgs) -> anyhow::Result<()> {
    let token =
        args.token.context("--token (or CAREVAULT_TOKEN) is required; mint one with `carevault token issue`")?;
    let channel = super::connect(&args.server, &args.tls).await?;
    let c = Caller { token, purpose: args.purpose, break_glass_reason: args.break_glass_reason };
    let mut patients = PatientServiceClient::new(channel.clone());
    let mut coverages = CoverageServiceClient::new(channel.clone());
    let mut access = AccessServiceClient::new(channel.clone());
    let mut audit = AuditServiceClient::new(channel);
    match args.command {
        ClientCommand::CreatePatient { json } => {
            let patient: pb::Patient = serde_json::from_str(&read_json(&json)?).context("not a JSON Patient")?;
            let r = patients
                .create_patient(c.req(pb::CreatePatientRequest { patient: Some(patient) })?)
                .await
                .map_err(status)?;
            print(&r.into_inner())
        }
        ClientCommand::GetPatient { id } => {
            let r = patients.get_patient(c.req(pb::GetPatientRequest { patient_id: id })?).await.map_err(status)?;
            print(&r.into_inner())
        }
        ClientCommand::UpdatePatient { json } => {
            let patient: pb::Patient = serde_json::from_str(&read_json(&json)?).context("not a JSON Patient")?;
            let r = patients
                .update_patient(c.req(pb::UpdatePatientRequest { patient: Some(patient) })?)
                .await
                .map_err(status)?;
            print(&r.into_inner())
        }
        ClientCommand::DeletePatient { id, expected_version } => {
            let req = pb::DeletePatientRequest { patient_id: id, version: expected_version };
            let r = patients.delete_patient(c.req(req)?).await.map_err(status)?;
            print(&r.into_inner())
        }
        ClientCommand::PatientHistory { id } => {
            let req = pb::GetPatientHistoryRequest { patient_id: id };
            let r = patients.get_patient_history(c.req(req)?).await.map_err(status)?;
            print(&r.into_inner())
        }
        ClientCommand::GetCoverage { id } => {
            let r = coverages.get_coverage(c.req(pb::GetCoverageRequest { coverage_id: id })?).await.map_err(status)?;
            print(&r.into_inner())
        }
        ClientCommand::UpdateCoverage { json } => {
            let coverage: pb::Coverage = serde_json::from_str(&read_json(&json)?).context("not a JSON Coverage")?;
            let r = coverages
                .update_coverage(c.req(pb::UpdateCoverageRequest { coverage: Some(coverage) })?)
                .await
                .map_err(status)?;
            print(&r.into_inner())
        }
        ClientCommand::DeleteCoverage { id, expected_version } => {
            let req = pb::DeleteCoverageRequest { coverage_id: id, version: expected_version };
            let r = coverages.delete_coverage(c.req(req)?).await.map_err(status)?;
            print(&r.into_inner())
        }
        ClientCommand::Search { identifier, family, birth_date, member_id } => {
            use pb::search_patients_request::Criterion;
            let criterion = if let Some(i) = identifier {
                let (system, value) = i.split_once('=').context("--identifier takes SYSTEM=VALUE")?;
                Criterion::Identifier(pb::IdentifierQuery { system: system.into(), value: value.into() })
            } else if let Some(family) = family {
                Criterion::NameBirthDate(pb::NameBirthDateQuery { family, birth_date: birth_date.unwrap_or_default() })
            } else if let Some(m) = member_id {
                Criterion::MemberId(pb::MemberIdQuery { member_id: m })
            } else {
                bail!("give --identifier, --family with --birth-date, or --member-id");
            };
            let req = pb::SearchPatientsRequest { criterion: Some(criterion), show_deleted: false, page_size: 0 };
            let r = patients.search_patients(c.req(req)?).await.map_err(status)?;
            print(&r.into_inner())
        }
        ClientCommand::ListPatients { page_size } => {
            let req = pb::ListPatientsRequest { page_size, page_token: String::new(), show_deleted: false };
            let r = patients.list_patients(c.req(req)?).await.map_err(status)?;
            print(&r.into_inner())
        }
        ClientCommand::AddCoverage { json } => {
            let coverage: pb::Coverage = serde_json::from_str(&read_json(&json)?).context("not a JSON Coverage")?;
            let r = coverages
                .create_coverage(c.req(pb::CreateCoverageRequest { coverage: Some(coverage) })?)
                .await
                .map_err(status)?;
            print(&r.into_inner())
        }
        ClientCommand::ListCoverages { patient_id } => {
            let r = coverages
                .list_coverages(c.req(pb::ListCoveragesRequest { patient_id, show_deleted: false })?)
                .await
                .map_err(status)?;
            print(&r.into_inner())
        }
        ClientCommand::ActiveCoverage { patient_id, date } => {
            let r = coverages
                .get_active_coverage(c.req(pb::GetActiveCoverageRequest { patient_id, date })?)
                .await
                .map_err(status)?;
            print(&r.into_inner())
        }
        ClientCommand::AuditTail { count, patient_id } => {
            // Without a patient, the head is looked up first and the events
            // before that lookup's own entry are shown (not the lookup itself).
            let (from, before) = match &patient_id {
                Some(_) => (0, u64::MAX),
                None => {
                    let head =
                        audit.get_audit_head(c.req(pb::GetAuditHeadRequest {})?).await.map_err(status)?.into_inner();
                    (head.sequence.saturating_sub(u64::try_from(count).unwrap_or(u64::MAX)), head.sequence)
                }
            };
            let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("a1:{from}"));
            let mut events = Vec::new();
            let mut page_token = token;
            loop {
                let req = pb::ListAuditEventsRequest {
                    patient_id: patient_id.clone().unwrap_or_default(),
                    page_size: 1000,
                    page_token,
                    ..Default::default()
                };
                let r = audit.list_audit_events(c.req(req)?).await.map_err(status)?.into_inner();
                events.extend(r.events.into_iter().filter(|e| e.sequence < before));
                if r.next_page_token.is_empty() {
                    break;
                }
                page_token = r.next_page_token;
            }
            let skip = events.len().saturating_sub(count);
            print(&pb::ListAuditEventsResponse { events: events.split_off(skip), next_page_token: String::new() })
        }
        ClientCommand::AuditHead => {
            let r = audit.get_audit_head(c.req(pb::GetAuditHeadRequest {})?).await.map_err(status)?.into_inner();
            println!("{}:{}", r.sequence, hex::encode(&r.hash));
            Ok(())
        }
        ClientCommand::SetRestriction { patient_id, restricted } => {
            let req = pb::SetPatientRestrictionRequest { patient_id, restricted };
            let r = access.set_patient_restriction(c.req(req)?).await.map_err(status)?;
            print(&r.into_inner())
        }
        ClientCommand::SetLegalHold { patient_id, hold } => {
            let req = pb::SetLegalHoldRequest { patient_id, legal_hold: hold };
            let r = access.set_legal_hold(c.req(req)?).await.map_err(status)?;
            print(&r.into_inner())
        }
        ClientCommand::BreakGlassQueue { state } => {
            let state = match state.as_str() {
                "pending" => pb::ReviewState::Pending,
                "reviewed" => pb::ReviewState::Reviewed,
                "all" => pb::ReviewState::All,
                _ => bail!("--state is pending, reviewed or all"),
            };
            let req =
                pb::ListBreakGlassGrantsRequest { state: state as i32, page_size: 500, page_token: String::new() };
            let r = access.list_break_glass_grants(c.req(req)?).await.map_err(status)?;
            print(&r.into_inner())
        }
        ClientCommand::ReviewGrant { grant_id, note } => {
            let req = pb::ReviewBreakGlassGrantRequest { grant_id, note };
            let r = access.review_break_glass_grant(c.req(req)?).await.map_err(status)?;
            print(&r.into_inner())
        }
    }
}
