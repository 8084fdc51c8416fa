//! The edge: bodies that do not decode, sizes measured on the bytes received,
//! the transport limit, and metadata too large for HTTP/2 defaults. Each is
//! decided, answered and audited by carevault, after the caller is authenticated.

use prost::Message;
use tonic::Code;

use carevault::proto::v1 as pb;

use crate::helpers::*;

const GET_PATIENT: &str = "/carevault.v1.PatientService/GetPatient";
const CREATE_PATIENT: &str = "/carevault.v1.PatientService/CreatePatient";

/// Bytes that are not a GetPatientRequest, each in its own way.
fn undecodable(valid: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    // Field 99 as a group (wire type 3), nested deeper than prost's recursion limit.
    let deep = encode_key_bytes(99, prost::encoding::WireType::StartGroup).repeat(200);
    vec![
        ("random bytes", vec![0xff; 12]),
        ("a truncated message", valid[..valid.len() - 5].to_vec()),
        ("a wrong wire type", vec![0x0d, 1, 2, 3, 4]),
        ("invalid UTF-8 in a string", vec![0x0a, 2, 0xff, 0xfe]),
        ("groups nested past the recursion limit", deep),
    ]
}

fn encode_key_bytes(field: u32, wire: prost::encoding::WireType) -> Vec<u8> {
    let mut b = Vec::new();
    prost::encoding::encode_key(field, wire, &mut b);
    b
}

#[tokio::test]
async fn a_body_that_does_not_decode_is_an_audited_invalid_argument_naming_request() {
    let s = TestServer::start().await;
    let p = create(&s, patient("Edge", "Decode", "1980", "MRN-ED")).await;
    let valid = pb::GetPatientRequest { patient_id: p.id.clone() }.encode_to_vec();
    let token = s.admin();
    let cases = undecodable(&valid);
    for (label, body) in &cases {
        let err = raw_call(&s.channel, GET_PATIENT, Some(&token), body.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{label}: {err:?}");
        assert_eq!(bad_fields(&err), ["request"], "{label}");
        assert!(!err.message().contains("\u{fffd}") && !err.message().contains("decode"), "{label}: {err:?}");
        assert!(err.metadata().get("x-request-id").is_some(), "{label}");
    }
    let events = s.all_events().await;
    let invalid = events
        .iter()
        .filter(|e| e.action == "patient.read" && e.outcome == pb::AuditOutcome::InvalidArgument as i32)
        .count();
    assert_eq!(invalid, cases.len(), "each undecodable body is audited");
    // The valid body still works through the same path.
    let reply = raw_call(&s.channel, GET_PATIENT, Some(&token), valid).await.unwrap();
    assert_eq!(pb::GetPatientResponse::decode(reply.as_slice()).unwrap().patient.unwrap().id, p.id);
}

#[tokio::test]
async fn garbage_without_a_valid_token_is_unauthenticated_and_never_decoded() {
    let s = TestServer::start().await;
    for (label, body) in undecodable(&[0x0a, 3, b'a', b'b', b'c']) {
        let err = raw_call(&s.channel, GET_PATIENT, None, body.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{label}");
        let err = raw_call(&s.channel, GET_PATIENT, Some("not.a.token"), body).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{label}");
    }
    // Over the transport limit too: the token is decided first.
    let err = raw_call(&s.channel, CREATE_PATIENT, None, vec![0x0a; 2 << 20]).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn the_request_limit_counts_the_bytes_received_unknown_fields_included() {
    let s = TestServer::start().await;
    let token = s.admin();
    let body = pb::CreatePatientRequest { patient: Some(patient("Pad", "Ded", "1980", "MRN-PAD")) }.encode_to_vec();
    // Unknown field 1000, length-delimited, 100 KiB.
    let mut padded = body.clone();
    padded.extend(encode_key_bytes(1000, prost::encoding::WireType::LengthDelimited));
    prost::encoding::encode_varint(100 * 1024, &mut padded);
    padded.extend(std::iter::repeat_n(b'Z', 100 * 1024));
    let err = raw_call(&s.channel, CREATE_PATIENT, Some(&token), padded).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violations(&err), [("request".to_string(), "is larger than 65536 bytes".to_string())]);
    let listed = s
        .patients()
        .list_patients(req(pb::ListPatientsRequest::default(), &token))
        .await
        .unwrap()
        .into_inner()
        .patients;
    assert!(listed.is_empty(), "nothing was stored");
    let ev = s.last_event("patient.create").await;
    assert_eq!(ev.outcome, pb::AuditOutcome::InvalidArgument as i32);

    // A small unknown field is ignored: accepted, neither stored nor echoed.
    let mut marked = body;
    marked.extend(encode_key_bytes(999, prost::encoding::WireType::LengthDelimited));
    prost::encoding::encode_varint(13, &mut marked);
    marked.extend_from_slice(b"UNKNOWNMARKER");
    let reply = raw_call(&s.channel, CREATE_PATIENT, Some(&token), marked).await.unwrap();
    let created = pb::CreatePatientResponse::decode(reply.as_slice()).unwrap().patient.unwrap();
    let read = raw_call(
        &s.channel,
        GET_PATIENT,
        Some(&token),
        pb::GetPatientRequest { patient_id: created.id }.encode_to_vec(),
    )
    .await
    .unwrap();
    assert!(!read.windows(13).any(|w| w == b"UNKNOWNMARKER"));
}

#[tokio::test]
async fn a_message_over_the_transport_limit_is_resource_exhausted_and_audited() {
    let s = TestServer::start().await;
    let token = s.admin();
    let err = raw_call(&s.channel, CREATE_PATIENT, Some(&token), vec![0; (1 << 20) + 1]).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("transport limit"), "{}", err.message());
    assert!(err.metadata().get("x-request-id").is_some());
    let ev = s.last_event("patient.create").await;
    assert_eq!(ev.outcome, pb::AuditOutcome::ResourceExhausted as i32);
    assert_eq!(ev.actor, "tester");
    // A caller without the permission is told that first.
    let reader = s.token("reader", "audit.read");
    let err = raw_call(&s.channel, CREATE_PATIENT, Some(&reader), vec![0; (1 << 20) + 1]).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn an_over_long_token_is_unauthenticated_by_carevault_and_audited() {
    let s = TestServer::start().await;
    for len in [16 * 1024, 100 * 1024] {
        let token = "A".repeat(len);
        let err = raw_call(&s.channel, GET_PATIENT, Some(&token), Vec::new()).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{len}: {err:?}");
        assert!(err.message().contains("longer than 8192 bytes"), "{}", err.message());
    }
    let events = s.all_events().await;
    assert_eq!(accounted(&events, pb::AuditOutcome::Unauthenticated, "patient.read"), 2);
}

#[tokio::test]
async fn refused_and_unreadable_calls_each_get_a_request_log_line() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, keys) = (tmp.path().join("data"), tmp.path().join("keys"));
    let (mut child, addr, logged) = spawn_binary_server_logging(&data, &keys, "warn,carevault=info", &[]);
    let issuer = std::fs::read(carevault::keystore::KeyPaths { dir: keys.clone() }.issuer_private()).unwrap();
    let token = mint(&issuer, "desk-1", "front_desk");
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let err = raw_call(&channel, GET_PATIENT, Some(&token), vec![0xff; 12]).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = raw_call(&channel, GET_PATIENT, Some(&"A".repeat(20_000)), Vec::new()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let found = eventually(|| {
        let logged = logged.clone();
        async move {
            let lines = logged.lock().unwrap().clone();
            let outcomes: Vec<String> = lines
                .iter()
                .filter(|l| l["fields"]["message"] == "request" && l["fields"]["method"] == "patient.read")
                .map(|l| l["fields"]["outcome"].as_str().unwrap_or_default().to_string())
                .collect();
            (outcomes.len() == 2).then_some(outcomes)
        }
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(found.expect("two request log lines"), ["invalid_argument", "unauthenticated"]);
}
