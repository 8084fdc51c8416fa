//! Each tamper class is caught by `carevault verify` on a stopped data directory.

use std::path::Path;
use std::process::Command;

use carevault::storage::sled::SledStore as Store;

use crate::checkpoints::{bin, checkpoint, off, run_ok, witness_run};
use crate::helpers::*;

async fn chain_of(n: usize) -> (std::path::PathBuf, Option<tempfile::TempDir>, String) {
    let s = TestServer::start().await;
    for i in 0..n {
        create(&s, patient("Chain", &format!("E{i}"), "1980", &format!("CH-{i}"))).await;
    }
    let head = s
        .audit()
        .get_audit_head(req(carevault::proto::v1::GetAuditHeadRequest {}, &s.admin()))
        .await
        .unwrap()
        .into_inner();
    let head = format!("{}:{}", head.sequence, hex::encode(head.hash));
    let (data_dir, _keys, guard) = s.stop_keep().await;
    (data_dir, guard, head)
}

fn verify(data_dir: &Path, expect_head: Option<&str>) -> (i32, serde_json::Value) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_carevault"));
    cmd.arg("verify").arg("--data-dir").arg(data_dir).arg("--json");
    if let Some(h) = expect_head {
        cmd.arg("--expect-head").arg(h);
    }
    let out = cmd.output().unwrap();
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.code().unwrap(), json)
}

fn failure(v: &serde_json::Value) -> (u64, String) {
    let f = &v["failure"];
    (f["sequence"].as_u64().unwrap(), f["class"].as_str().unwrap().to_string())
}

fn with_store(data_dir: &Path, f: impl FnOnce(&Store)) {
    let store = Store::open(&data_dir.join("db"), 8 << 20).unwrap();
    f(&store);
}

#[tokio::test]
async fn an_untouched_chain_verifies_with_its_recorded_head() {
    let (dir, _g, head) = chain_of(5).await;
    let (code, v) = verify(&dir, Some(&head));
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["ok"], true);
    assert_eq!(v["entries_checked"], 9);
}

#[tokio::test]
async fn a_flipped_byte_is_reported_as_content_altered() {
    let (dir, _g, _) = chain_of(5).await;
    with_store(&dir, |s| {
        let mut raw = s.audit_raw(3).unwrap().unwrap();
        raw[60] ^= 0x01;
        s.danger_put_audit_raw(3, Some(raw)).unwrap();
    });
    let (code, v) = verify(&dir, None);
    assert_eq!(code, 1);
    assert_eq!(failure(&v), (3, "content_altered".into()));
}

#[tokio::test]
async fn a_deleted_entry_is_reported_as_a_gap() {
    let (dir, _g, _) = chain_of(5).await;
    with_store(&dir, |s| s.danger_put_audit_raw(2, None).unwrap());
    let (code, v) = verify(&dir, None);
    assert_eq!(code, 1);
    assert_eq!(failure(&v), (2, "gap".into()));
}

#[tokio::test]
async fn swapped_entries_are_reported_out_of_order() {
    let (dir, _g, _) = chain_of(5).await;
    with_store(&dir, |s| s.danger_swap_audit_entries(2, 3).unwrap());
    let (code, v) = verify(&dir, None);
    assert_eq!(code, 1);
    assert_eq!(failure(&v), (2, "out_of_order".into()));
}

#[tokio::test]
async fn an_entry_moved_under_another_stored_sequence_is_content_altered() {
    let (dir, _g, _) = chain_of(5).await;
    with_store(&dir, |s| {
        let a = s.audit_raw(2).unwrap().unwrap();
        let b = s.audit_raw(3).unwrap().unwrap();
        s.danger_put_audit_raw(2, Some(b)).unwrap();
        s.danger_put_audit_raw(3, Some(a)).unwrap();
    });
    let (code, v) = verify(&dir, None);
    assert_eq!(code, 1);
    assert_eq!(failure(&v), (2, "content_altered".into()));
}

#[tokio::test]
async fn truncation_below_a_recorded_head_is_caught_only_with_that_head() {
    let (dir, _g, head) = chain_of(5).await;
    with_store(&dir, |s| {
        for seq in 6..=8 {
            s.danger_put_audit_raw(seq, None).unwrap();
        }
    });
    // The chain alone is self-consistent; the log's own checkpoint (signed
    // at shutdown, of every entry) says it was longer:
    let (code, v) = verify(&dir, None);
    assert_eq!(code, 1, "{v}");
    assert_eq!(failure(&v), (6, "size_regression".into()));
    let (code, v) = verify(&dir, Some(&head));
    assert_eq!(code, 1);
    assert_eq!(failure(&v), (8, "recorded_head_missing".into()));
}

#[tokio::test]
async fn a_rewritten_chain_tail_is_caught_by_the_recorded_head() {
    let (dir, _g, head) = chain_of(3).await;
    let seq: u64 = head.split(':').next().unwrap().parse().unwrap();
    let wrong = format!("{seq}:{}", "00".repeat(32));
    let (code, v) = verify(&dir, Some(&wrong));
    assert_eq!(code, 1);
    assert_eq!(failure(&v), (seq, "recorded_head_different".into()));
}

#[tokio::test]
async fn verify_from_a_recorded_head_checks_only_what_came_after_it() {
    let (dir, _g, head) = chain_of(3).await;
    let s = TestServer::start_in(
        dir.clone(),
        dir.parent().unwrap().join("keys"),
        std::sync::Arc::new(carevault::clock::SystemClock),
    )
    .await;
    for i in 0..4 {
        create(&s, patient("Later", &format!("L{i}"), "1980", &format!("LA-{i}"))).await;
    }
    // Online: the export starts after the anchor.
    let url = format!("http://{}", s.addr);
    let token = s.token("officer", "audit.read");
    let (h, u, t) = (head.clone(), url.clone(), token.clone());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_carevault"))
            .args(["verify", "--server", &u, "--token", &t, "--from", &h, "--json"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["entries_checked"], 6, "four creates, the checkpoint read and the export itself");
    drop(s.stop_keep().await);
    // Offline, the same; and an anchor that is not on the chain breaks the first link.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_carevault"));
    let out = cmd.arg("verify").arg("--data-dir").arg(&dir).args(["--json", "--from", &head]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((out.status.code(), v["entries_checked"].as_u64()), (Some(0), Some(6)));
    let seq: u64 = head.split(':').next().unwrap().parse().unwrap();
    let forged = format!("{seq}:{}", "11".repeat(32));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_carevault"));
    let out = cmd.arg("verify").arg("--data-dir").arg(&dir).args(["--json", "--from", &forged]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(failure(&v), (seq + 1, "link_broken".into()));
}

/// Rewrites entry `at` (another actor) and recomputes every hash after it,
/// as someone with write access to the store could.
fn recompute_from_genesis(s: &Store, at: u64) {
    let mut prev = carevault::audit::GENESIS_PREVIOUS_HASH;
    let mut seq = 0;
    while let Some(raw) = s.audit_raw(seq).unwrap() {
        let mut e = carevault::audit::AuditEntry::decode(&raw[..raw.len() - 32]).unwrap();
        if seq == at {
            e.actor = "nobody".into();
        }
        e.previous_hash = prev;
        let mut bytes = e.encode().unwrap();
        prev = carevault::crypto::sha256(&bytes);
        bytes.extend_from_slice(&prev);
        s.danger_put_audit_raw(seq, Some(bytes)).unwrap();
        seq += 1;
    }
}

/// The log's newest checkpoint, saved to a file as compliance staff would.
async fn saved_checkpoint(s: &TestServer, dir: &Path) -> std::path::PathBuf {
    let c = s
        .audit()
        .get_checkpoint(req(carevault::proto::v1::GetCheckpointRequest { tree_size: 0, cosigned: false }, &s.admin()))
        .await
        .unwrap()
        .into_inner()
        .checkpoint
        .unwrap();
    let path = dir.join("saved-checkpoint");
    std::fs::write(&path, c.note).unwrap();
    path
}

#[tokio::test]
async fn a_chain_recomputed_from_genesis_is_caught_by_checkpoints() {
    let s = TestServer::start().await;
    for i in 0..6 {
        create(&s, patient("Fork", &format!("E{i}"), "1980", &format!("FK-{i}"))).await;
    }
    let saved_dir = tempfile::tempdir().unwrap();
    let saved = saved_checkpoint(&s, saved_dir.path()).await;
    let (dir, _keys, _g) = s.stop_keep().await;
    with_store(&dir, |s| recompute_from_genesis(s, 4));
    // The log's own checkpoint no longer matches its entries.
    let (code, v) = verify(&dir, None);
    assert_eq!(code, 1, "{v}");
    assert_eq!(failure(&v).1, "root_mismatch");
    // Someone who can rewrite the chain can remove the checkpoints too: the
    // chain checks pass, a checkpoint saved elsewhere does not.
    with_store(&dir, |s| s.danger_clear_checkpoints().unwrap());
    assert_eq!(verify(&dir, None).0, 0, "a recomputed chain is consistent in itself");
    let out = Command::new(env!("CARGO_BIN_EXE_carevault"))
        .arg("verify")
        .arg("--data-dir")
        .arg(&dir)
        .arg("--json")
        .arg("--checkpoint")
        .arg(&saved)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{v}");
    let (seq, class) = failure(&v);
    assert_eq!(class, "inconsistent");
    assert!(seq >= 4, "{seq}");
}

#[tokio::test]
async fn a_saved_checkpoint_with_a_forged_signature_is_refused() {
    let s = TestServer::start().await;
    create(&s, patient("Sig", "E", "1980", "SG-1")).await;
    let saved_dir = tempfile::tempdir().unwrap();
    let saved = saved_checkpoint(&s, saved_dir.path()).await;
    let (dir, _keys, _g) = s.stop_keep().await;
    let text = std::fs::read_to_string(&saved).unwrap();
    let mut n = carevault::audit::note::Note::parse(&text).unwrap();
    n.signatures[0].signature[3] ^= 1;
    std::fs::write(&saved, n.encode()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_carevault"))
        .args(["verify", "--json", "--data-dir"])
        .arg(&dir)
        .arg("--checkpoint")
        .arg(&saved)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{v}");
    assert_eq!(failure(&v).1, "bad_checkpoint_signature");
    // And the untouched log verifies, its tree and its checkpoint included.
    let (code, v) = verify(&dir, None);
    assert_eq!(code, 0, "{v}");
    assert!(!v["checkpoints_checked"].as_array().unwrap().is_empty(), "{v}");
    assert_eq!(v["tree_size"], v["entries_checked"]);
}

#[tokio::test]
async fn a_witness_cosigns_growth_proofs_verify_offline_and_a_rewritten_history_is_refused() {
    let s = TestServer::start().await;
    for i in 0..5 {
        create(&s, patient("Witness", &format!("E{i}"), "1980", &format!("WI-{i}"))).await;
    }
    let (url, token) = (format!("http://{}", s.addr), s.token("witness-1", "audit.read"));
    let vkey = run_ok(bin().args(["keys", "log-key", "--data-dir"]).arg(&s.data_dir).arg("--key-dir").arg(&s.key_dir))
        .trim()
        .to_string();
    let w = tempfile::tempdir().unwrap();
    let (wkey, wstate) = (w.path().join("witness.key"), w.path().join("witness.state"));
    let wvkey = run_ok(bin().args(["witness", "init", "--name", "witness.example/w1", "--key"]).arg(&wkey));
    assert!(wvkey.starts_with("witness.example/w1+"), "{wvkey}");
    let witness = || witness_run(&url, &token, &vkey, &wkey, &wstate);
    let out = off(witness()).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let first: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(first["ok"], true);
    assert!(checkpoint(&s, 0).await.cosignatures >= 1);

    // The log grows; the witness follows it through a consistency proof.
    for i in 0..3 {
        create(&s, patient("Witness", &format!("F{i}"), "1981", &format!("WF-{i}"))).await;
    }
    while checkpoint(&s, 0).await.tree_size <= first["tree_size"].as_u64().unwrap() + 3 {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let out = off(witness()).await;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let second: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(second["tree_size"].as_u64() > first["tree_size"].as_u64(), "{second}");

    // A compliance officer's proof of entry 4, checked offline with the log key only.
    let mut prove = bin();
    prove.args(["audit", "prove", "4", "--server", &url, "--token", &token]);
    let doc = off(prove).await;
    assert_eq!(doc.status.code(), Some(0), "{}", String::from_utf8_lossy(&doc.stderr));
    let file = w.path().join("proof.json");
    std::fs::write(&file, &doc.stdout).unwrap();
    let ok = run_ok(bin().args(["verify-proof", "--json", "--log-key", &vkey]).arg(&file));
    let ok: serde_json::Value = serde_json::from_str(&ok).unwrap();
    assert_eq!((ok["ok"].as_bool(), ok["sequence"].as_u64()), (Some(true), Some(4)));
    let mut changed: serde_json::Value = serde_json::from_slice(&doc.stdout).unwrap();
    let e =
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, changed["entry"].as_str().unwrap()).unwrap();
    let mut entry = carevault::audit::AuditEntry::decode(&e).unwrap();
    entry.actor = "someone-else".into();
    changed["entry"] =
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, entry.encode().unwrap()).into();
    std::fs::write(&file, changed.to_string()).unwrap();
    let out = bin().args(["verify-proof", "--json", "--log-key", &vkey]).arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["class"], "not_included");

    // Someone with write access to everything rewrites history from genesis,
    // removes the tree, the checkpoints and carevault's checkpoint-state, and
    // restarts: the log signs the new history; the witness refuses it.
    let state_before = std::fs::read(&wstate).unwrap();
    let (dir, keys, _g) = s.stop_keep().await;
    with_store(&dir, |st| {
        recompute_from_genesis(st, 3);
        st.danger_clear_checkpoints().unwrap();
        st.danger_clear_tree().unwrap();
    });
    std::fs::remove_file(dir.join("checkpoint-state")).unwrap();
    let s = TestServer::start_in(dir.clone(), keys, std::sync::Arc::new(carevault::clock::SystemClock)).await;
    let (url, token) = (format!("http://{}", s.addr), s.token("witness-1", "audit.read"));
    let out = off(witness_run(&url, &token, &vkey, &wkey, &wstate)).await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["class"], "inconsistent", "{v}");
    assert_eq!(std::fs::read(&wstate).unwrap(), state_before, "the witness's state never moves");
    // The rewritten log verifies in itself, and against its own new checkpoints; a reader that
    // requires the witness finds nothing the witness cosigned.
    let mut plain = bin();
    plain.args(["verify", "--json", "--server", &url, "--token", &token, "--log-key", &vkey]);
    let out = off(plain).await;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    let mut witnessed = bin();
    witnessed.args(["verify", "--json", "--server", &url, "--token", &token, "--log-key", &vkey]);
    witnessed.args(["--witness-key", wvkey.trim()]);
    let out = off(witnessed).await;
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["failure"]["class"], "unwitnessed", "{v}");
    drop(s.stop_keep().await);

    // Cut back below what the witness saw: a rollback.
    with_store(&dir, |st| {
        let head = st.audit_head_sync().unwrap().unwrap().0;
        for seq in 8..=head {
            st.danger_put_audit_raw(seq, None).unwrap();
        }
        st.danger_clear_checkpoints().unwrap();
        st.danger_clear_tree().unwrap();
    });
    std::fs::remove_file(dir.join("checkpoint-state")).unwrap();
    let s = TestServer::start_in(
        dir.clone(),
        dir.parent().unwrap().join("keys"),
        std::sync::Arc::new(carevault::clock::SystemClock),
    )
    .await;
    let (url, token) = (format!("http://{}", s.addr), s.token("witness-1", "audit.read"));
    let out = off(witness_run(&url, &token, &vkey, &wkey, &wstate)).await;
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["class"], "rollback", "{v}");
    drop(s.stop_keep().await);
}
