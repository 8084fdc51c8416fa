//! Signed checkpoints, proofs and cosignatures through AuditService, on
//! every engine: what a compliance officer or a witness checks from outside.

use carevault::audit::merkle;
use carevault::audit::note::{self, Checkpoint, Note, Verifier};
use carevault::proto::v1 as pb;

use crate::helpers::*;

/// The log's verifier key, from its key file and the checkpoint's origin.
fn log_verifier(s: &TestServer, origin: &str) -> Verifier {
    let seed = hex::decode(std::fs::read_to_string(s.key_dir.join("log-1.key")).unwrap().trim()).unwrap();
    let key = carevault::crypto::SigningKey::from_seed(&seed).unwrap();
    Verifier::new(origin, key.public_key()).unwrap()
}

/// The checkpoint of `size` (0: the newest).
pub async fn checkpoint(s: &TestServer, size: u64) -> pb::SignedCheckpoint {
    let r =
        s.audit().get_checkpoint(req(pb::GetCheckpointRequest { tree_size: size, cosigned: false }, &s.admin())).await;
    r.unwrap().into_inner().checkpoint.unwrap()
}

#[tokio::test]
async fn checkpoints_are_signed_and_every_entry_is_proved_against_them() {
    let mut s = TestServer::start().await;
    for i in 0..12 {
        create(&s, patient("Merkle", &format!("E{i}"), "1980", &format!("MK-{i}"))).await;
    }
    let first = checkpoint(&s, 0).await;
    let v = log_verifier(&s, &first.origin);
    let n = Note::parse(&first.note).unwrap();
    assert_eq!(n.verify(std::slice::from_ref(&v)).unwrap(), vec![first.origin.clone()]);
    let c = Checkpoint::parse(&n.text).unwrap();
    assert_eq!((c.size, c.root.to_vec()), (first.tree_size, first.root_hash.clone()));
    // An independent implementation (Cloudflare's signed_note, tlog_tiles) agrees.
    let theirs = signed_note::StandardVerifier::new(&v.to_vkey()).unwrap();
    let list = signed_note::VerifierList::new(vec![Box::new(theirs)]);
    signed_note::Note::from_bytes(first.note.as_bytes()).unwrap().verify(&list).unwrap();
    let tc = tlog_tiles::Checkpoint::from_bytes(n.text.as_bytes()).unwrap();
    assert_eq!((tc.size(), tc.hash().0.to_vec()), (first.tree_size, first.root_hash.clone()));
    assert!(first.tree_size >= 15, "genesis, key state, log key, 12 creates: {}", first.tree_size);

    // Every entry is in the tree the checkpoint signs.
    for seq in 0..first.tree_size {
        let p = s
            .audit()
            .get_inclusion_proof(req(
                pb::GetInclusionProofRequest { sequence: seq, tree_size: if seq == 0 { 0 } else { first.tree_size } },
                &s.admin(),
            ))
            .await
            .unwrap()
            .into_inner();
        let leaf = merkle::leaf_hash(&p.entry);
        if seq == 0 {
            // Against the newest checkpoint, whichever that is by now.
            let c = p.checkpoint.unwrap();
            merkle::verify_inclusion(seq, p.tree_size, &leaf, &p.hashes, &c.root_hash).unwrap();
            continue;
        }
        assert_eq!(p.tree_size, first.tree_size);
        merkle::verify_inclusion(seq, p.tree_size, &leaf, &p.hashes, &first.root_hash).unwrap();
        let proof: Vec<tlog_tiles::Hash> =
            p.hashes.iter().map(|h| tlog_tiles::Hash(h.as_slice().try_into().unwrap())).collect();
        let root = tlog_tiles::Hash(first.root_hash.as_slice().try_into().unwrap());
        tlog_tiles::check_record(&proof, p.tree_size, root, seq, tlog_tiles::Hash(leaf)).unwrap();
        assert_eq!(p.checkpoint.unwrap().note, first.note);
    }

    // More entries, a newer checkpoint, consistent with the first.
    for i in 0..5 {
        create(&s, patient("Merkle", &format!("F{i}"), "1981", &format!("MF-{i}"))).await;
    }
    let later = loop {
        let c = checkpoint(&s, 0).await;
        if c.tree_size > first.tree_size + 5 {
            break c;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    Note::parse(&later.note).unwrap().verify(std::slice::from_ref(&v)).unwrap();
    let p = s
        .audit()
        .get_consistency_proof(req(
            pb::GetConsistencyProofRequest { old_size: first.tree_size, tree_size: later.tree_size },
            &s.admin(),
        ))
        .await
        .unwrap()
        .into_inner();
    merkle::verify_consistency(first.tree_size, later.tree_size, &first.root_hash, &later.root_hash, &p.hashes)
        .unwrap();
    assert_eq!(checkpoint(&s, first.tree_size).await.note, first.note, "an older checkpoint is still served");

    // A witness cosigns; the checkpoint is served with the cosignature.
    let wkey = carevault::crypto::SigningKey::from_seed(&[7; 32]).unwrap();
    let witness = Verifier::cosigner("witness.example/w1", wkey.public_key()).unwrap();
    let text = Note::parse(&later.note).unwrap().text;
    let mut cosigned = Note::parse(&later.note).unwrap();
    cosigned.signatures = vec![note::cosign(&text, &witness.name, &wkey, 1_700_000_000).unwrap()];
    let added = s
        .audit()
        .add_cosignature(req(
            pb::AddCosignatureRequest { note: cosigned.encode(), witness_key: witness.to_vkey() },
            &s.admin(),
        ))
        .await
        .unwrap()
        .into_inner()
        .checkpoint
        .unwrap();
    assert_eq!(added.cosignatures, 1);
    let served = Note::parse(&checkpoint(&s, later.tree_size).await.note).unwrap();
    assert_eq!(served.signatures.len(), 2);
    assert_eq!(note::verify_cosignature(&witness, &served.text, &served.signatures[1]), Some(1_700_000_000));
    served.verify(std::slice::from_ref(&v)).unwrap();

    // A forged cosignature, a wrong key and nonsense are refused.
    let mut forged = cosigned.clone();
    forged.signatures[0].signature[20] ^= 1;
    let e = s
        .audit()
        .add_cosignature(req(
            pb::AddCosignatureRequest { note: forged.encode(), witness_key: witness.to_vkey() },
            &s.admin(),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = s
        .audit()
        .add_cosignature(req(
            pb::AddCosignatureRequest { note: cosigned.encode(), witness_key: v.to_vkey() },
            &s.admin(),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(bad_fields(&e).contains(&"witness_key".to_string()), "{e:?}");
    s.stop().await;
}

#[tokio::test]
async fn proofs_need_audit_read_and_sizes_in_range_and_are_audited() {
    let mut s = TestServer::start().await;
    let desk = s.token("desk-1", "patients.read patients.write");
    let e = s
        .audit()
        .get_checkpoint(req(pb::GetCheckpointRequest { tree_size: 0, cosigned: false }, &desk))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    let e = s
        .audit()
        .get_inclusion_proof(req(pb::GetInclusionProofRequest { sequence: 0, tree_size: 1 << 40 }, &s.admin()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert_eq!(bad_fields(&e), vec!["tree_size".to_string()]);
    let e = s
        .audit()
        .get_inclusion_proof(req(pb::GetInclusionProofRequest { sequence: 99, tree_size: 2 }, &s.admin()))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&e), vec!["sequence".to_string()]);
    let e = s
        .audit()
        .get_consistency_proof(req(pb::GetConsistencyProofRequest { old_size: 0, tree_size: 2 }, &s.admin()))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&e), vec!["old_size".to_string()]);
    let e = s
        .audit()
        .get_checkpoint(req(pb::GetCheckpointRequest { tree_size: 2, cosigned: false }, &s.admin()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let events = s.all_events().await;
    let actions: Vec<(&str, i32)> = events.iter().map(|e| (e.action.as_str(), e.outcome)).collect();
    for want in [
        ("audit.checkpoint", pb::AuditOutcome::PermissionDenied as i32),
        ("audit.proof", pb::AuditOutcome::InvalidArgument as i32),
        ("audit.checkpoint", pb::AuditOutcome::Ok as i32),
    ] {
        assert!(actions.contains(&want), "{want:?} in {actions:?}");
    }
    s.stop().await;
}

#[tokio::test]
async fn the_log_key_rotates_with_an_audited_entry_and_older_checkpoints_still_verify() {
    let mut s = TestServer::start().await;
    create(&s, patient("Rotate", "Log", "1980", "RL-1")).await;
    let before = checkpoint(&s, 0).await;
    let old = log_verifier(&s, &before.origin);
    let admin = s.token("keyper", "key_admin");
    let mut keys = pb::key_service_client::KeyServiceClient::new(s.channel.clone());
    let r = keys.rotate_log_key(req_for(pb::RotateLogKeyRequest {}, &admin, None)).await.unwrap().into_inner();
    assert_eq!(r.version, 2);
    let new = Verifier::parse(&r.log_key).unwrap();
    assert_ne!(new.id, old.id);
    create(&s, patient("Rotate", "Log", "1981", "RL-2")).await;
    let after = loop {
        let c = checkpoint(&s, 0).await;
        if c.tree_size > before.tree_size + 1 {
            break c;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let n = Note::parse(&after.note).unwrap();
    n.verify(std::slice::from_ref(&new)).unwrap();
    assert!(n.verify(std::slice::from_ref(&old)).is_err(), "the retired key signs no more");
    Note::parse(&checkpoint(&s, before.tree_size).await.note).unwrap().verify(std::slice::from_ref(&old)).unwrap();
    let p = s
        .audit()
        .get_consistency_proof(req(
            pb::GetConsistencyProofRequest { old_size: before.tree_size, tree_size: after.tree_size },
            &s.admin(),
        ))
        .await
        .unwrap()
        .into_inner();
    merkle::verify_consistency(before.tree_size, after.tree_size, &before.root_hash, &after.root_hash, &p.hashes)
        .unwrap();
    let status = keys.get_key_status(req_for(pb::GetKeyStatusRequest {}, &admin, None)).await.unwrap().into_inner();
    assert_eq!(status.log_keys, vec![old.to_vkey(), new.to_vkey()]);
    let events = s.all_events().await;
    let rotated = events.iter().find(|e| e.action == "keys.log_key_rotate").expect("audited");
    assert_eq!(rotated.outcome, pb::AuditOutcome::Ok as i32);
    // Without key_admin it is refused, and audited.
    let e = keys.rotate_log_key(req_for(pb::RotateLogKeyRequest {}, &s.admin(), None)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    s.stop().await;
}

/// The binary, for the outside tools (keys log-key, witness, audit prove, verify-proof).
pub fn bin() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_carevault"))
}

/// Runs `cmd`, which must succeed; its standard output.
pub fn run_ok(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a blocking command off the runtime (the server it calls runs on it).
pub async fn off(mut cmd: std::process::Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap()
}

/// `witness run` against `url` as witness `witness.example/w1`.
pub fn witness_run(
    url: &str,
    token: &str,
    log_key: &str,
    key: &std::path::Path,
    state: &std::path::Path,
) -> std::process::Command {
    let mut c = bin();
    c.args(["witness", "run", "--json", "--server", url, "--token", token, "--log-key", log_key]);
    c.args(["--name", "witness.example/w1", "--key"]).arg(key).arg("--state").arg(state);
    c
}

#[tokio::test]
async fn a_witness_follows_the_log_and_a_proof_document_verifies_offline() {
    let mut s = TestServer::start().await;
    for i in 0..4 {
        create(&s, patient("Witness", &format!("E{i}"), "1980", &format!("WO-{i}"))).await;
    }
    let (url, token) = (format!("http://{}", s.addr), s.token("witness-2", "audit.read"));
    let vkey = run_ok(bin().args(["keys", "log-key", "--data-dir"]).arg(&s.data_dir).arg("--key-dir").arg(&s.key_dir))
        .trim()
        .to_string();
    let w = tempfile::tempdir().unwrap();
    let (wkey, wstate) = (w.path().join("witness.key"), w.path().join("witness.state"));
    let wvkey = run_ok(bin().args(["witness", "init", "--name", "witness.example/w1", "--key"]).arg(&wkey));
    let wvkey = wvkey.trim().to_string();
    // Nothing is cosigned yet.
    let none =
        s.audit().get_checkpoint(req(pb::GetCheckpointRequest { tree_size: 0, cosigned: true }, &s.admin())).await;
    assert_eq!(none.unwrap_err().code(), tonic::Code::NotFound);
    let out = off(witness_run(&url, &token, &vkey, &wkey, &wstate)).await;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let first: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    create(&s, patient("Witness", "F", "1981", "WO-F")).await;
    while checkpoint(&s, 0).await.tree_size <= first["tree_size"].as_u64().unwrap() {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let out = off(witness_run(&url, &token, &vkey, &wkey, &wstate)).await;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let second: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(second["tree_size"].as_u64() > first["tree_size"].as_u64(), "{second}");
    assert_eq!(
        checkpoint(&s, second["tree_size"].as_u64().unwrap()).await.cosignatures,
        1,
        "the log keeps the cosignature"
    );
    // The newest cosigned checkpoint, then the one before it, then none.
    let cosigned = |below: u64| {
        let audit = s.audit();
        let admin = s.admin();
        async move {
            let mut a = audit;
            a.get_checkpoint(req(pb::GetCheckpointRequest { tree_size: below, cosigned: true }, &admin))
                .await
                .map(|r| r.into_inner().checkpoint.unwrap().tree_size)
                .map_err(|e| e.code())
        }
    };
    let (newest, older) = (second["tree_size"].as_u64().unwrap(), first["tree_size"].as_u64().unwrap());
    assert_eq!(cosigned(0).await, Ok(newest));
    assert_eq!(cosigned(newest).await, Ok(older));
    assert_eq!(cosigned(older).await, Err(tonic::Code::NotFound));
    let mut prove = bin();
    prove.args(["audit", "prove", "5", "--server", &url, "--token", &token]);
    let doc = off(prove).await;
    assert_eq!(doc.status.code(), Some(0), "{}", String::from_utf8_lossy(&doc.stderr));
    let file = w.path().join("proof.json");
    std::fs::write(&file, &doc.stdout).unwrap();
    let ok: serde_json::Value =
        serde_json::from_str(&run_ok(bin().args(["verify-proof", "--json", "--log-key", &vkey]).arg(&file))).unwrap();
    assert_eq!((ok["ok"].as_bool(), ok["sequence"].as_u64()), (Some(true), Some(5)));

    // A reader that requires the witness finds the newest checkpoint it cosigned and holds the log to it.
    let witnessed = second["tree_size"].as_u64().unwrap();
    let verify = |extra: &[&str]| {
        let mut c = bin();
        c.args(["verify", "--json", "--log-key", &vkey, "--witness-key", &wvkey]).args(extra);
        c
    };
    let out = off(verify(&["--server", &url, "--token", &token])).await;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["witnessed"]["tree_size"].as_u64(), v["witnessed"]["witnesses"].as_u64()),
        (Some(witnessed), Some(1))
    );
    assert!(v["checkpoints_checked"].as_array().unwrap().contains(&witnessed.into()), "{v}");
    // Requiring a second witness, which never cosigned: no checkpoint has enough.
    let w2 = w.path().join("w2.key");
    let w2vkey = run_ok(bin().args(["witness", "init", "--name", "witness.example/w2", "--key"]).arg(&w2));
    let two = ["--witness-key", w2vkey.trim(), "--min-witnesses", "2"];
    let out = off(verify(&[&["--server", &url, "--token", &token][..], &two[..]].concat())).await;
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["failure"]["class"], "unwitnessed", "{v}");
    // More witnesses required than given is a usage error.
    let out = off(verify(&["--server", &url, "--token", &token, "--min-witnesses", "2"])).await;
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    s.stop().await;

    // Offline, over the stopped store: the same.
    let data = s.data_dir.to_str().unwrap().to_string();
    let store = store_args(&s.data_dir);
    let store: Vec<&str> = store.iter().map(String::as_str).collect();
    let out = off(verify(&[&["--data-dir", &data][..], &store[..]].concat())).await;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["witnessed"]["tree_size"].as_u64(), Some(witnessed), "{v}");
    let out = off(verify(&[&["--data-dir", &data][..], &store[..], &two[..]].concat())).await;
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["failure"]["class"], "unwitnessed", "{v}");
}
