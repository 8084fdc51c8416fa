//! Every built-in role against every RPC, through the real server over mutual
//! TLS; purpose-of-use enforcement; policy and token checks at start-up and
//! per call.

use carevault::auth::tls::{ClientAuth, DEV_CLIENT_IDENTITY};
use carevault::proto::v1 as pb;
use tonic::Code;

use crate::helpers::*;

/// What a role should get from an RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Succeeds (for GetPatient: with the full SSN).
    Ok,
    /// Succeeds, with the SSN masked to its last four digits.
    Masked,
    /// PERMISSION_DENIED.
    Denied,
    /// Passes authorization and fails later with this code (e.g. reviewing a grant that does not exist).
    Code(Code),
}

use Expect::*;

const RPCS: [&str; 22] = [
    "CreatePatient",
    "GetPatient",
    "UpdatePatient",
    "DeletePatient",
    "ListPatients",
    "SearchPatients",
    "GetPatientHistory",
    "CreateCoverage",
    "GetCoverage",
    "UpdateCoverage",
    "DeleteCoverage",
    "ListCoverages",
    "GetActiveCoverage",
    "ListAuditEvents",
    "ExportAuditEvents",
    "GetAuditHead",
    "SetPatientRestriction",
    "ListBreakGlassGrants",
    "ReviewBreakGlassGrant",
    "GetKeyStatus",
    "SetLegalHold",
    "ErasePatient",
];

/// (role, purpose it works under, expectation per RPC in `RPCS` order).
fn table() -> Vec<(&'static str, Option<&'static str>, [Expect; 22])> {
    let nf = Code(Code::NotFound);
    vec![
        (
            "front_desk",
            Some("TREAT"),
            [
                Masked, Masked, Ok, Ok, Masked, Masked, Masked, Ok, Ok, Ok, Ok, Ok, Ok, Denied, Denied, Denied, Denied,
                Denied, Denied, Denied, Denied, Denied,
            ],
        ),
        (
            "clinician",
            Some("TREAT"),
            [
                Denied, Masked, Denied, Denied, Masked, Masked, Masked, Denied, Ok, Denied, Denied, Ok, Ok, Denied,
                Denied, Denied, Denied, Denied, Denied, Denied, Denied, Denied,
            ],
        ),
        (
            "billing",
            Some("HPAYMT"),
            [
                Denied, Ok, Denied, Denied, Ok, Ok, Ok, Ok, Ok, Ok, Ok, Ok, Ok, Denied, Denied, Denied, Denied, Denied,
                Denied, Denied, Denied, Denied,
            ],
        ),
        (
            "compliance",
            None,
            [
                Denied, Denied, Denied, Denied, Denied, Denied, Denied, Denied, Denied, Denied, Denied, Denied, Denied,
                Ok, Ok, Ok, Ok, Ok, nf, Denied, Ok, Denied,
            ],
        ),
        (
            "key_admin",
            None,
            [
                Denied, Denied, Denied, Denied, Denied, Denied, Denied, Denied, Denied, Denied, Denied, Denied, Denied,
                Denied, Denied, Denied, Denied, Denied, Denied, Ok, Denied, Ok,
            ],
        ),
    ]
}

const SSN: &str = "123-45-6789";

fn patient_with_ssn(family: &str) -> pb::Patient {
    let mut p = patient(family, "Tab", "1970-01-01", &format!("MRN-{family}"));
    p.identifiers.push(pb::Identifier {
        system: "http://hl7.org/fhir/sid/us-ssn".into(),
        value: SSN.into(),
        r#type: pb::IdentifierType::Ss as i32,
    });
    p
}

fn ssn_of(p: &pb::Patient) -> String {
    p.identifiers.iter().find(|i| i.r#type == pb::IdentifierType::Ss as i32).map(|i| i.value.clone()).unwrap()
}

/// The result of one call: the code, and for patient reads the SSN seen.
async fn call(s: &TestServer, rpc: &str, token: &str, purpose: Option<&str>, n: usize) -> (Code, Option<String>) {
    // Fresh fixtures for every call, made by the test's own all-permission token.
    let family = format!("Table{n}");
    let p = create(s, patient_with_ssn(&family)).await;
    let cov = create_coverage(s, coverage(&p.id, &format!("M{n}"), 1)).await;
    macro_rules! r {
        ($m:expr) => {
            req_for($m, token, purpose)
        };
    }
    let (mut pc, mut cc, mut ac, mut xc) = (s.patients(), s.coverages(), s.audit(), s.access());
    let first_ssn = |ps: &[pb::Patient]| ps.first().map(ssn_of);
    let result: Result<Option<String>, tonic::Status> = match rpc {
        "CreatePatient" => pc
            .create_patient(r!(pb::CreatePatientRequest { patient: Some(patient_with_ssn("Newcomer")) }))
            .await
            .map(|x| x.into_inner().patient.as_ref().map(ssn_of)),
        "GetPatient" => pc
            .get_patient(r!(pb::GetPatientRequest { patient_id: p.id.clone() }))
            .await
            .map(|x| x.into_inner().patient.as_ref().map(ssn_of)),
        "UpdatePatient" => {
            let mut upd = p.clone();
            upd.preferred_language = "es".into();
            pc.update_patient(r!(pb::UpdatePatientRequest { patient: Some(upd) })).await.map(|_| None)
        }
        "DeletePatient" => {
            pc.delete_patient(r!(pb::DeletePatientRequest { patient_id: p.id.clone(), version: 1 })).await.map(|_| None)
        }
        "ListPatients" => pc
            .list_patients(r!(pb::ListPatientsRequest { page_size: 1, ..Default::default() }))
            .await
            .map(|x| first_ssn(&x.into_inner().patients)),
        "SearchPatients" => {
            use pb::search_patients_request::Criterion;
            let q = pb::NameBirthDateQuery { family: family.clone(), birth_date: "1970-01-01".into() };
            let m = pb::SearchPatientsRequest { criterion: Some(Criterion::NameBirthDate(q)), ..Default::default() };
            pc.search_patients(r!(m)).await.map(|x| first_ssn(&x.into_inner().patients))
        }
        "GetPatientHistory" => pc
            .get_patient_history(r!(pb::GetPatientHistoryRequest { patient_id: p.id.clone() }))
            .await
            .map(|x| first_ssn(&x.into_inner().versions)),
        "CreateCoverage" => cc
            .create_coverage(r!(pb::CreateCoverageRequest { coverage: Some(coverage(&p.id, "NEW", 2)) }))
            .await
            .map(|_| None),
        "GetCoverage" => {
            cc.get_coverage(r!(pb::GetCoverageRequest { coverage_id: cov.id.clone() })).await.map(|_| None)
        }
        "UpdateCoverage" => {
            let mut upd = cov.clone();
            upd.group_number = "GRP-2".into();
            cc.update_coverage(r!(pb::UpdateCoverageRequest { coverage: Some(upd) })).await.map(|_| None)
        }
        "DeleteCoverage" => cc
            .delete_coverage(r!(pb::DeleteCoverageRequest { coverage_id: cov.id.clone(), version: 1 }))
            .await
            .map(|_| None),
        "ListCoverages" => cc
            .list_coverages(r!(pb::ListCoveragesRequest { patient_id: p.id.clone(), show_deleted: false }))
            .await
            .map(|_| None),
        "GetActiveCoverage" => cc
            .get_active_coverage(r!(pb::GetActiveCoverageRequest {
                patient_id: p.id.clone(),
                date: "2026-06-01".into()
            }))
            .await
            .map(|_| None),
        "ListAuditEvents" => ac
            .list_audit_events(r!(pb::ListAuditEventsRequest { page_size: 5, ..Default::default() }))
            .await
            .map(|_| None),
        "ExportAuditEvents" => {
            match ac.export_audit_events(r!(pb::ExportAuditEventsRequest { start_sequence: 0 })).await {
                Err(e) => Err(e),
                Result::Ok(stream) => {
                    let mut stream = stream.into_inner();
                    loop {
                        match stream.message().await {
                            Result::Ok(Some(_)) => continue,
                            Result::Ok(None) => break Result::Ok(None),
                            Err(e) => break Err(e),
                        }
                    }
                }
            }
        }
        "GetAuditHead" => ac.get_audit_head(r!(pb::GetAuditHeadRequest {})).await.map(|_| None),
        "SetPatientRestriction" => xc
            .set_patient_restriction(r!(pb::SetPatientRestrictionRequest {
                patient_id: p.id.clone(),
                restricted: false
            }))
            .await
            .map(|_| None),
        "ListBreakGlassGrants" => {
            xc.list_break_glass_grants(r!(pb::ListBreakGlassGrantsRequest::default())).await.map(|_| None)
        }
        "ReviewBreakGlassGrant" => xc
            .review_break_glass_grant(r!(pb::ReviewBreakGlassGrantRequest {
                grant_id: uuid::Uuid::now_v7().to_string(),
                note: "checked".into(),
            }))
            .await
            .map(|_| None),
        "GetKeyStatus" => carevault::proto::v1::key_service_client::KeyServiceClient::new(s.channel.clone())
            .get_key_status(r!(pb::GetKeyStatusRequest {}))
            .await
            .map(|_| None),
        "SetLegalHold" => xc
            .set_legal_hold(r!(pb::SetLegalHoldRequest { patient_id: p.id.clone(), legal_hold: true }))
            .await
            .map(|_| None),
        "ErasePatient" => carevault::proto::v1::key_service_client::KeyServiceClient::new(s.channel.clone())
            .erase_patient(r!(pb::ErasePatientRequest { patient_id: p.id.clone(), reason: "table test".into() }))
            .await
            .map(|_| None),
        other => panic!("unknown rpc {other}"),
    };
    match result {
        Result::Ok(ssn) => (Code::Ok, ssn),
        Err(status) => (status.code(), None),
    }
}

#[tokio::test]
async fn every_built_in_role_gets_exactly_its_permissions_on_every_rpc_over_mutual_tls() {
    let s = TestServer::start_with(Options { mtls: Some(ClientAuth::Required), ..Options::default() }).await;
    let mut n = 0;
    let mut failures = Vec::new();
    for (role, purpose, expected) in table() {
        let token = s.token(&format!("{role}-user"), role);
        for (rpc, want) in RPCS.iter().zip(expected) {
            n += 1;
            let (code, ssn) = call(&s, rpc, &token, purpose, n).await;
            let ok = match want {
                Ok => code == Code::Ok && ssn.as_deref().is_none_or(|v| v == SSN),
                Masked => code == Code::Ok && ssn.as_deref() == Some("***-**-6789"),
                Denied => code == Code::PermissionDenied,
                Code(c) => code == c,
            };
            if !ok {
                failures.push(format!("{role} {rpc}: want {want:?}, got {code:?} ssn {ssn:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Every entry made over this connection names the calling service next to the person.
    let events = s.all_events().await;
    let by_role: Vec<_> = events.iter().filter(|e| e.actor.ends_with("-user")).collect();
    assert!(by_role.len() >= 5 * RPCS.len());
    assert!(by_role.iter().all(|e| e.service == DEV_CLIENT_IDENTITY), "service identity missing");
    let denied = by_role.iter().filter(|e| e.outcome == pb::AuditOutcome::PermissionDenied as i32).count();
    let expected_denied = table().iter().flat_map(|(_, _, e)| e.iter()).filter(|e| **e == Denied).count();
    assert_eq!(denied, expected_denied, "every denial is audited");
    let read = by_role.iter().find(|e| e.actor == "clinician-user" && e.action == "patient.read").unwrap();
    assert_eq!(read.purpose, "TREAT");
    assert_eq!(read.roles, vec!["clinician"]);
    assert_eq!(read.disclosed, vec!["identity", "ssn_masked", "contact"]);
    let billing = by_role.iter().find(|e| e.actor == "billing-user" && e.action == "patient.read").unwrap();
    assert_eq!(billing.disclosed, vec!["identity", "ssn", "contact"]);
}

#[tokio::test]
async fn a_phi_request_without_a_purpose_is_denied_with_a_message_saying_so_and_audited() {
    let s = TestServer::start().await;
    let p = create(&s, patient("Purpose", "Pat", "1980-02-02", "MRN-PUR")).await;
    let desk = s.token("desk-9", "front_desk");
    let get = |purpose| req_for(pb::GetPatientRequest { patient_id: p.id.clone() }, &desk, purpose);
    let err = s.patients().get_patient(get(None)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("purpose of use required"), "{}", err.message());
    assert!(err.message().contains("x-purpose-of-use"));
    let err = s.patients().get_patient(get(Some("HMARKT"))).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("HMARKT"), "{}", err.message());
    let err = s.patients().get_patient(get(Some("SHOPPING"))).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(bad_fields(&err), vec!["x-purpose-of-use"]);
    assert!(s.patients().get_patient(get(Some("TREAT"))).await.is_ok());

    let events: Vec<_> = s.all_events().await.into_iter().filter(|e| e.actor == "desk-9").collect();
    let outcomes: Vec<_> = events.iter().map(|e| (e.outcome, e.purpose.as_str())).collect();
    use pb::AuditOutcome as O;
    assert_eq!(
        outcomes,
        vec![
            (O::PermissionDenied as i32, ""),
            (O::PermissionDenied as i32, "HMARKT"),
            (O::InvalidArgument as i32, ""),
            (O::Ok as i32, "TREAT"),
        ]
    );
}

#[tokio::test]
async fn tokens_from_another_issuer_or_for_another_audience_are_unauthenticated() {
    use carevault::auth::token::{TokenSpec, issue};
    let s = TestServer::start().await;
    let wrong_iss = TokenSpec { issuer: "https://idp.elsewhere".into(), ..TokenSpec::new("x", &["front_desk"]) };
    let wrong_aud = TokenSpec { audience: "billing-api".into(), ..TokenSpec::new("x", &["front_desk"]) };
    for (spec, msg) in [(wrong_iss, "issuer"), (wrong_aud, "audience")] {
        let t = issue(s.issuer_der(), &spec, now_secs()).unwrap();
        let err = s.audit().get_audit_head(req(pb::GetAuditHeadRequest {}, &t)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        assert!(err.message().contains(msg), "{}", err.message());
    }
}

#[test]
fn serve_refuses_a_policy_with_an_unknown_permission_naming_the_line() {
    let tmp = tempfile::tempdir().unwrap();
    let policy = tmp.path().join("policy.toml");
    std::fs::write(&policy, "[roles.scheduler]\npermissions = [\n  \"patients.read\",\n  \"patients.raed\",\n]\n")
        .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_carevault"))
        .args(["serve", "--listen", "127.0.0.1:0", "--policy"])
        .arg(&policy)
        .env("CAREVAULT_DATA_DIR", tmp.path().join("data"))
        .env("CAREVAULT_KEY_DIR", tmp.path().join("keys"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 4") && err.contains("patients.raed"), "{err}");
}

#[test]
fn serve_refuses_plaintext_on_a_non_loopback_address_without_the_insecure_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_carevault"))
        .args(["serve", "--listen", "0.0.0.0:0"])
        .env("CAREVAULT_DATA_DIR", tmp.path().join("data"))
        .env("CAREVAULT_KEY_DIR", tmp.path().join("keys"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing to serve plaintext") && err.contains("--insecure-plaintext"), "{err}");
}
