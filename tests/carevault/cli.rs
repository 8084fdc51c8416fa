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
    assert_eq!(v["entries_checked"], 15); // genesis, the key state, the log key, 10 creates, the checkpoint read, the export
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
    assert!(head.starts_with("5:"), "{head}");

    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert_eq!(exit.code(), Some(0));
    // Stopped, the chain verifies offline and the recorded head is on it.
    let out = bin()
        .args(["verify", "--data-dir"])
        .arg(&data)
        .args(store_args(&data))
        .args(["--expect-head", &head])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("OK: 6 entries verified"));
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

sled_only! {
    #[tokio::test]
    async fn offline_verify_keys_status_and_backup_leave_every_byte_of_the_data_directory_unchanged() {
        let s = TestServer::start().await;
        for i in 0..20 {
            create(&s, patient("Still", &format!("R{i}"), "1980", &format!("RO-{i}"))).await;
        }
        let (data, keys, guard) = s.stop_keep().await;
        // sled releases its lock a moment after the server closes it.
        open_when_unlocked(|| carevault::storage::sled::snapshot::lock_shared(&data.join("db"))).await;
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
}

sled_only! {
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
}

sled_only! {
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
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{cmd:?} should fail: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn the_cli_client_covers_the_api_and_says_what_is_wrong_and_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, keys) = (tmp.path().join("data"), tmp.path().join("keys"));
    let (mut child, addr) = spawn_binary_server(&data, &keys);
    let url = format!("http://{addr}");
    let mint = |roles: &str| {
        run_ok(
            bin()
                .args(["token", "issue", "--sub", "cli", "--role", roles, "--ttl", "5m"])
                .env("CAREVAULT_KEY_DIR", &keys),
        )
        .trim()
        .to_string()
    };
    let (desk, officer) = (mint("front_desk"), mint("compliance"));
    let client = |token: &str| {
        let mut c = bin();
        c.args(["client", "--server", &url, "--token", token, "--purpose", "TREAT"]);
        c
    };
    let stdin_json = |mut cmd: Command, json: String| {
        use std::io::Write;
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(json.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    // Field violations are printed with their reasons.
    let bad = stdin_json(
        {
            let mut c = client(&desk);
            c.args(["create-patient", "-"]);
            c
        },
        r#"{"names":[{"family":"X"}],"birthDate":"1990-02-30"}"#.into(),
    );
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("patient.birth_date: "), "{err}");
    assert!(!err.contains("1990-02-30"), "the value is never echoed: {err}");
    let mut nope = bin();
    nope.args(["client", "--server", &url, "--token", &desk, "--purpose", "NOPE", "get-patient"]);
    let err = run_err(nope.arg(uuid::Uuid::now_v7().to_string()));
    assert!(err.contains("x-purpose-of-use") && err.contains("TREAT") && err.contains("ETREAT"), "{err}");

    // Create, update, history, delete; coverage get, update, delete; JSON as proto3 JSON with times in Z.
    let created = stdin_json(
        {
            let mut c = client(&desk);
            c.args(["create-patient", "-"]);
            c
        },
        r#"{"names":[{"family":"Cliff","given":["Ann"]}],"birthDate":"1990-01-02"}"#.into(),
    );
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let p: serde_json::Value = serde_json::from_slice(&created.stdout).unwrap();
    let id = p["patient"]["id"].as_str().unwrap().to_string();
    assert!(p["patient"]["createTime"].as_str().unwrap().ends_with('Z'), "{p}");
    let empty: serde_json::Value = serde_json::from_str(&run_ok(client(&desk).args(["list-coverages", &id]))).unwrap();
    assert_eq!(empty["coverages"], serde_json::json!([]), "an empty result is explicit");
    let mut changed = p["patient"].clone();
    changed["preferredLanguage"] = "es".into();
    let updated = stdin_json(
        {
            let mut c = client(&desk);
            c.args(["update-patient", "-"]);
            c
        },
        changed.to_string(),
    );
    assert!(updated.status.success(), "{}", String::from_utf8_lossy(&updated.stderr));
    let history: serde_json::Value =
        serde_json::from_str(&run_ok(client(&desk).args(["patient-history", &id]))).unwrap();
    assert_eq!(history["versions"].as_array().unwrap().len(), 2);
    let cov = format!(
        r#"{{"patientId":"{id}","status":"COVERAGE_STATUS_ACTIVE","type":"COVERAGE_TYPE_PPO","payor":{{"name":"Acme"}},"subscriberId":"M-1","relationship":"SUBSCRIBER_RELATIONSHIP_PATIENT","order":1}}"#
    );
    let added = stdin_json(
        {
            let mut c = client(&desk);
            c.args(["add-coverage", "-"]);
            c
        },
        cov,
    );
    assert!(added.status.success(), "{}", String::from_utf8_lossy(&added.stderr));
    let cv: serde_json::Value = serde_json::from_slice(&added.stdout).unwrap();
    let cid = cv["coverage"]["id"].as_str().unwrap().to_string();
    let got: serde_json::Value = serde_json::from_str(&run_ok(client(&desk).args(["get-coverage", &cid]))).unwrap();
    let mut c2 = got["coverage"].clone();
    c2["planName"] = "Gold".into();
    let upd = stdin_json(
        {
            let mut c = client(&desk);
            c.args(["update-coverage", "-"]);
            c
        },
        c2.to_string(),
    );
    assert!(upd.status.success(), "{}", String::from_utf8_lossy(&upd.stderr));
    run_ok(client(&desk).args(["delete-coverage", &cid, "--expected-version", "2"]));
    let deleted: serde_json::Value =
        serde_json::from_str(&run_ok(client(&desk).args(["delete-patient", &id, "--expected-version", "2"]))).unwrap();
    assert_eq!(deleted["patient"]["active"], false);

    // Audit tail: hashes in hex like audit-head, and not its own head lookup.
    let head = run_ok(client(&officer).arg("audit-head"));
    let (seq, hash) = head.trim().split_once(':').unwrap();
    assert_eq!(hash.len(), 64);
    let tail: serde_json::Value =
        serde_json::from_str(&run_ok(client(&officer).args(["audit-tail", "--count", "3"]))).unwrap();
    let events = tail["events"].as_array().unwrap();
    assert_eq!(events.len(), 3);
    let last = events.last().unwrap();
    assert_eq!(last["action"], "audit.head", "the newest shown is the earlier audit-head call");
    assert_eq!(last["sequence"].as_str(), Some(seq));
    assert_eq!(last["hash"].as_str(), Some(hash), "the same hash, in the same encoding");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn errors_name_each_cause_once_and_token_issue_warns_about_tokens_a_server_would_refuse() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tls");
    run_ok(bin().args(["certs", "dev", "--out"]).arg(&dir));
    let err = run_err(bin().args(["certs", "dev", "--out"]).arg(&dir));
    assert_eq!(err.matches("already exists").count(), 1, "{err}");
    let policy = tmp.path().join("bad.toml");
    std::fs::write(&policy, "[roles.x]\npermissions = [\"patients.raed\"]\n").unwrap();
    let data = tmp.path().join("data");
    let err = run_err(
        bin()
            .args(["serve", "--listen", "127.0.0.1:0", "--policy"])
            .arg(&policy)
            .env("CAREVAULT_DATA_DIR", &data)
            .env("CAREVAULT_KEY_DIR", tmp.path().join("k")),
    );
    assert_eq!(err.matches("unknown permission").count(), 1, "{err}");
    assert!(err.contains("line 2"), "{err}");
    assert!(!data.exists(), "a bad policy is refused before anything is created");
    let keys = tmp.path().join("keys");
    run_ok(bin().args(["init", "--data-dir"]).arg(tmp.path().join("d2")).arg("--key-dir").arg(&keys));
    let out = bin()
        .args(["token", "issue", "--sub", "x", "--role", "front_desk,schedulr", "--ttl", "8h"])
        .env("CAREVAULT_KEY_DIR", &keys)
        .output()
        .unwrap();
    assert!(out.status.success());
    let warn = String::from_utf8_lossy(&out.stderr);
    assert!(warn.contains("--ttl 8h is longer than") && warn.contains("\"schedulr\" is not a built-in role"), "{warn}");
    assert!(!warn.contains("\"front_desk\""), "{warn}");
}

#[test]
fn bench_runs_every_workload_and_takes_its_ratios_against_its_echo_floor() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("bench");
    let workloads = "baseline,echo,echo-bare,read,create,update,search,active-coverage,mixed";
    let out = bin()
        .args(["bench", "--patients", "12", "--duration", "300ms", "--concurrency", "4", "--channels", "2"])
        .args(["--json", "--workloads", workloads, "--data-dir"])
        .arg(&data)
        .args(store_args(&data))
        .env("CAREVAULT_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = v["workloads"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["workload"].as_str().unwrap()).collect();
    assert_eq!(names, workloads.split(',').collect::<Vec<_>>());
    for r in rows {
        let name = r["workload"].as_str().unwrap();
        assert!(r["ops"].as_u64().unwrap() > 0, "{name}: {r}");
        assert_eq!(r["errors"], 0, "{name}: {r}");
        assert!(r["ratio_to_echo"].as_f64().unwrap() > 0.0, "{name}: {r}");
        assert!(r["p99_ratio_to_echo"].as_f64().unwrap() > 0.0, "{name}: {r}");
        let (ops, audited) = (r["ops"].as_u64().unwrap(), r["audit_entries"].as_u64().unwrap());
        match name {
            // The floors touch no storage: nothing is audited.
            "baseline" | "echo" | "echo-bare" => assert_eq!(audited, 0, "{name}: {r}"),
            // Every record call is audited (an update is a read and a write).
            _ => assert!(audited >= ops, "{name}: {ops} operations, {audited} audit entries"),
        }
    }
    let echo = rows.iter().find(|r| r["workload"] == "echo").unwrap();
    assert_eq!(echo["ratio_to_echo"], 1.0);

    // The echo floor is the bench's own service: a remote server has none.
    let out = bin()
        .args(["bench", "--server", "http://127.0.0.1:9", "--token", "t", "--workloads", "echo"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("echo workload needs the in-process server"));
}
