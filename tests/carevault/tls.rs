//! Transport security: which connections a mutual-TLS server accepts.

use std::path::{Path, PathBuf};

use carevault::auth::tls::{ClientAuth, DEV_CLIENT_IDENTITY, DevCa, dev_files};
use carevault::proto::v1 as pb;
use carevault::proto::v1::audit_service_client::AuditServiceClient;
use tonic::transport::Channel;

use crate::helpers::*;

/// True when a call over `channel` (if it connected at all) is answered.
async fn answered(s: &TestServer, channel: Result<Channel, tonic::transport::Error>) -> bool {
    let Ok(channel) = channel else { return false };
    let token = s.token("probe", "audit.read");
    AuditServiceClient::new(channel).get_audit_head(req(pb::GetAuditHeadRequest {}, &token)).await.is_ok()
}

fn write_pair(dir: &Path, name: &str, cert: &carevault::auth::tls::IssuedCert) -> (PathBuf, PathBuf) {
    let (c, k) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    std::fs::write(&c, &cert.cert_pem).unwrap();
    std::fs::write(&k, &cert.key_pem).unwrap();
    (c, k)
}

#[tokio::test]
async fn a_required_client_certificate_must_chain_to_the_configured_ca() {
    let s = TestServer::start_with(Options { mtls: Some(ClientAuth::Required), ..Options::default() }).await;
    let dir = s.tls_dir.clone().unwrap();
    let ca = dir.join(dev_files::CA_CERT);
    let good = (dir.join(dev_files::CLIENT_CERT), dir.join(dev_files::CLIENT_KEY));
    assert!(answered(&s, tls_channel(s.addr, &ca, Some(good)).await).await, "good client certificate refused");

    assert!(!answered(&s, tls_channel(s.addr, &ca, None).await).await, "no client certificate accepted");

    let scratch = tempfile::tempdir().unwrap();
    let self_signed = DevCa::new("mallory").unwrap().cert();
    let self_signed = write_pair(scratch.path(), "self", &self_signed);
    assert!(!answered(&s, tls_channel(s.addr, &ca, Some(self_signed)).await).await, "self-signed accepted");

    let other_ca = DevCa::new("another CA").unwrap();
    let foreign = write_pair(scratch.path(), "foreign", &other_ca.client(DEV_CLIENT_IDENTITY).unwrap());
    assert!(!answered(&s, tls_channel(s.addr, &ca, Some(foreign)).await).await, "wrong-CA certificate accepted");

    let plaintext = Channel::from_shared(format!("http://{}", s.addr)).unwrap().connect().await;
    assert!(!answered(&s, plaintext).await, "plaintext accepted on the TLS port");

    // A client that does not trust the server's CA refuses the server.
    let other_ca_file = scratch.path().join("other-ca.pem");
    std::fs::write(&other_ca_file, other_ca.cert().cert_pem).unwrap();
    let distrust = (dir.join(dev_files::CLIENT_CERT), dir.join(dev_files::CLIENT_KEY));
    assert!(!answered(&s, tls_channel(s.addr, &other_ca_file, Some(distrust)).await).await);
}

#[tokio::test]
async fn with_optional_client_certificates_a_call_without_one_is_served_and_audited_without_a_service() {
    let s = TestServer::start_with(Options { mtls: Some(ClientAuth::Optional), ..Options::default() }).await;
    let ca = s.tls_dir.clone().unwrap().join(dev_files::CA_CERT);
    let bare = tls_channel(s.addr, &ca, None).await.unwrap();
    let token = s.token("portal-user", "patients.read patients.write");
    let mut pc = carevault::proto::v1::patient_service_client::PatientServiceClient::new(bare);
    let p = patient("Optional", "Olga", "1975-05-05", "MRN-OPT");
    pc.create_patient(req(pb::CreatePatientRequest { patient: Some(p.clone()) }, &token)).await.unwrap();
    // The same through the mutual-TLS channel records the service identity.
    s.patients().create_patient(req(pb::CreatePatientRequest { patient: Some(p) }, &token)).await.unwrap();
    let services: Vec<String> =
        s.all_events().await.into_iter().filter(|e| e.actor == "portal-user").map(|e| e.service).collect();
    assert_eq!(services, vec!["".to_string(), DEV_CLIENT_IDENTITY.to_string()]);
}

#[test]
fn certs_dev_writes_a_ca_server_and_client_set_and_never_overwrites() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("tls");
    let run = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_carevault"))
            .args(["certs", "dev", "--out"])
            .arg(&out)
            .output()
            .unwrap()
    };
    let first = run();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    for f in ["ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key"] {
        assert!(out.join(f).exists(), "{f}");
    }
    let second = run();
    assert_eq!(second.status.code(), Some(2));
}

#[tokio::test]
async fn the_cli_client_and_verify_speak_mutual_tls() {
    let s = TestServer::start_with(Options { mtls: Some(ClientAuth::Required), ..Options::default() }).await;
    let dir = s.tls_dir.clone().unwrap();
    let url = format!("https://localhost:{}", s.addr.port());
    let token = s.token("cli-officer", "compliance");
    let run = move |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_carevault")).args(args).output().unwrap()
        })
    };
    let path = |f: &str| dir.join(f).display().to_string();
    let tls = vec![
        "--tls-ca".to_string(),
        path(dev_files::CA_CERT),
        "--tls-client-cert".into(),
        path(dev_files::CLIENT_CERT),
        "--tls-client-key".into(),
        path(dev_files::CLIENT_KEY),
    ];
    let mut head = vec!["client".to_string(), "--server".into(), url.clone(), "--token".into(), token.clone()];
    head.extend(tls.clone());
    head.push("audit-head".into());
    let out = run(head).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("3:"));

    let mut verify = vec!["verify".to_string(), "--server".into(), url.clone(), "--token".into(), token.clone()];
    verify.extend(tls.clone());
    let out = run(verify).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));

    // Without the client certificate the server refuses the CLI.
    let bare = vec![
        "client".to_string(),
        "--server".into(),
        url,
        "--token".into(),
        token,
        "--tls-ca".into(),
        tls[1].clone(),
        "audit-head".into(),
    ];
    let out = run(bare).await.unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn tls_mistakes_say_what_to_do_and_the_server_logs_refused_handshakes() {
    let tmp = tempfile::tempdir().unwrap();
    let tls = tmp.path().join("tls");
    let bin = || std::process::Command::new(env!("CARGO_BIN_EXE_carevault"));
    assert!(bin().args(["certs", "dev", "--out"]).arg(&tls).status().unwrap().success());
    let (data, keys) = (tmp.path().join("data"), tmp.path().join("keys"));
    let f = |name: &str| tls.join(name).to_str().unwrap().to_string();
    let (cert, key, ca) = (f(dev_files::SERVER_CERT), f(dev_files::SERVER_KEY), f(dev_files::CA_CERT));
    let args = ["--tls-cert", &cert, "--tls-key", &key, "--tls-client-ca", &ca, "--require-client-cert"];
    let (mut child, addr, logged) = spawn_binary_server_logging(&data, &keys, "", &args);
    let port = addr.rsplit_once(':').unwrap().1.to_string();
    let client = |url: &str, extra: &[&str]| {
        let out =
            bin().args(["client", "--server", url, "--token", "t"]).args(extra).arg("audit-head").output().unwrap();
        assert_eq!(out.status.code(), Some(2));
        String::from_utf8(out.stderr).unwrap()
    };
    let https = format!("https://localhost:{port}");
    let unknown_ca = client(&https, &[]);
    assert!(unknown_ca.contains("--tls-ca") && unknown_ca.contains("not signed by a CA"), "{unknown_ca}");
    assert_eq!(unknown_ca.matches("UnknownIssuer").count(), 1, "{unknown_ca}");
    let plaintext = client(&format!("http://127.0.0.1:{port}"), &[]);
    assert!(plaintext.contains("https://"), "{plaintext}");
    let no_cert = client(&https, &["--tls-ca", &ca]);
    assert!(no_cert.contains("--tls-client-cert"), "{no_cert}");
    let refused = eventually_blocking(|| {
        logged.lock().unwrap().iter().any(|l| l["fields"]["message"] == "tls accept error").then_some(())
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let seen: Vec<String> = logged.lock().unwrap().iter().map(|l| l["fields"].to_string()).collect();
    assert!(refused.is_some(), "a refused handshake is logged: {seen:?}");
    // A TLS client talking to a plaintext server is told so.
    let (mut plain, addr, _) = spawn_binary_server_logging(&tmp.path().join("d2"), &tmp.path().join("k2"), "", &[]);
    let port = addr.rsplit_once(':').unwrap().1;
    let mismatch = client(&format!("https://localhost:{port}"), &["--tls-ca", &ca]);
    plain.kill().unwrap();
    plain.wait().unwrap();
    assert!(mismatch.contains("does not speak TLS"), "{mismatch}");
}

/// Calls `check` every 50 ms until it yields a value, for at most 10 s.
fn eventually_blocking<T>(mut check: impl FnMut() -> Option<T>) -> Option<T> {
    for _ in 0..200 {
        if let Some(v) = check() {
            return Some(v);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    None
}
