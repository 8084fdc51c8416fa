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

/// Every file under `dir` with the SHA-256 of its bytes, in path order.
fn tree_digest(dir: &std::path::Path) -> Vec<(std::path::PathBuf, [u8; 32])> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_path_buf();
                out.push((rel, carevault::crypto::sha256(&std::fs::read(&p).unwrap())));
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn offline_verify_keys_status_and_backup_leave_every_byte_of_the_data_directory_unchanged() {
    let s = TestServer::start().await;
    for i in 0..20 {
        create(&s, patient("Still", &format!("R{i}"), "1980", &format!("RO-{i}"))).await;
    }
    let (data, keys, guard) = s.stop_keep().await;
    // sled releases its lock a moment after the server closes it.
    open_when_unlocked(|| carevault::storage::snapshot::lock_shared(&data.join("db"))).await;
    let before = tree_digest(&data);
    let run = |args: &[&str]| {
        let mut cmd = bin();
        cmd.args(args).arg("--data-dir").arg(&data);
        if args[0] == "keys" {
            cmd.arg("--key-dir").arg(&keys);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out
    };
    let verified = run(&["verify", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&verified.stdout).unwrap();
    assert_eq!(v["ok"], true);
    let head = v["head"].as_str().unwrap().to_string();
    let status = run(&["keys", "status", "--json"]);
    let st: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(st["versions"][0]["dataKeys"], "20");
    // Options before or after the subcommand mean the same.
    run(&["keys", "--json", "status"]);
    let out = guard.as_ref().unwrap().path().join("backup");
    run(&["backup", "--out", out.to_str().unwrap()]);
    assert_eq!(tree_digest(&data), before, "the data directory changed");
    // Nothing was appended either: the chain still ends at the same head.
    let again = run(&["verify", "--json", "--expect-head", &head]);
    let v: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(v["head"].as_str(), Some(head.as_str()));
    // The backup itself is a complete store.
    let out_copy = bin().args(["verify", "--json", "--data-dir"]).arg(&out).output().unwrap();
    assert_eq!(out_copy.status.code(), Some(0), "{}", String::from_utf8_lossy(&out_copy.stderr));
}

#[tokio::test]
async fn offline_tools_refuse_a_data_directory_a_server_has_open_and_say_so() {
    let s = TestServer::start().await;
    let data = s.data_dir.clone();
    let out = tokio::task::spawn_blocking(move || bin().args(["verify", "--data-dir"]).arg(&data).output().unwrap())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by a running carevault server"), "{err}");
    assert!(err.contains("--server"), "{err}");
}

#[tokio::test]
async fn serve_creates_nothing_when_its_port_is_taken_and_says_so_when_the_data_directory_is_in_use() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let (data, keys) = (tmp.path().join("data"), tmp.path().join("keys"));
    let out = bin()
        .args(["serve", "--listen", &port])
        .env("CAREVAULT_DATA_DIR", &data)
        .env("CAREVAULT_KEY_DIR", &keys)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot listen on"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!data.exists() && !keys.exists(), "nothing is created before the port is bound");

    let s = TestServer::start().await;
    let (data, keys) = (s.data_dir.clone(), s.key_dir.clone());
    let out = tokio::task::spawn_blocking(move || {
        bin()
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("CAREVAULT_DATA_DIR", &data)
            .env("CAREVAULT_KEY_DIR", &keys)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another process"), "{err}");
}
