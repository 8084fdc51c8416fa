//! The binary: serve from nothing, token issue, client, verify against a live server, exit codes.

use std::process::Command;

use crate::helpers::*;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_carevault"))
}

#[tokio::test]
async fn verify_against_a_live_server_streams_the_export_and_passes() {
    let s = TestServer::start().await;
    for i in 0..10 {
        create(&s, patient("Live", &format!("V{i}"), "1980", &format!("LV-{i}"))).await;
    }
    let url = format!("http://{}", s.addr);
    let token = s.token("compliance", "audit.read");
    let out = tokio::task::spawn_blocking(move || {
        bin().args(["verify", "--server", &url, "--token", &token, "--json"]).output().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["entries_checked"], 12); // genesis, 10 creates, the export
    // Without audit.read the export is refused: exit 2.
    let url = format!("http://{}", s.addr);
    let token = s.token("desk", "patients.read");
    let out = tokio::task::spawn_blocking(move || {
        bin().args(["verify", "--server", &url, "--token", &token]).output().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn verify_usage_errors_exit_2() {
    let out = bin().args(["verify"]).env_remove("CAREVAULT_DATA_DIR").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = bin().args(["verify", "--data-dir", "/nonexistent/carevault"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn serve_starts_from_nothing_serves_the_cli_client_and_stops_cleanly_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let keys = tmp.path().join("keys");
    let (mut child, addr) = spawn_binary_server(&data, &keys);
    let token = bin()
        .args(["token", "issue", "--sub", "cli-user", "--role", "front_desk,compliance", "--ttl", "5m"])
        .env("CAREVAULT_KEY_DIR", &keys)
        .output()
        .unwrap();
    assert!(token.status.success());
    let token = String::from_utf8(token.stdout).unwrap().trim().to_string();
    let json = tmp.path().join("p.json");
    std::fs::write(&json, r#"{"names":[{"family":"Cliton","given":["Ann"]}],"birthDate":"1990-01-02","gender":"ADMINISTRATIVE_GENDER_FEMALE"}"#).unwrap();
    let url = format!("http://{addr}");
    let out = bin()
        .args(["client", "--server", &url, "--token", &token, "--purpose", "TREAT", "create-patient"])
        .arg(&json)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(created["patient"]["version"], "1");
    let out = bin()
        .args([
            "client",
            "--server",
            &url,
            "--token",
            &token,
            "--purpose",
            "TREAT",
            "search",
            "--family",
            "CLITON",
            "--birth-date",
            "1990-01-02",
        ])
        .output()
        .unwrap();
    let found: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(found["patients"][0]["id"], created["patient"]["id"]);
    let out = bin().args(["client", "--server", &url, "--token", &token, "audit-head"]).output().unwrap();
    let head = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(head.starts_with("3:"), "{head}");

    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert_eq!(exit.code(), Some(0));
    // Stopped, the chain verifies offline and the recorded head is on it.
    let out = bin().args(["verify", "--data-dir"]).arg(&data).args(["--expect-head", &head]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("OK: 4 entries verified"));
}
