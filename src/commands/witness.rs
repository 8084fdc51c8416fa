//! `carevault witness`: run by compliance staff on another machine with its
//! own key and state file. Each run fetches the log's newest checkpoint and a
//! consistency proof from the one it accepted last, checks both (the pure
//! `audit::witness::accept`), records the new one atomically (fsync, rename,
//! directory fsync) before anything else, and gives the log its
//! tlog-cosignature/v1. It never moves its state backwards.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{Context, bail};
use base64::Engine;
use carevault::audit::merkle::Hash;
use carevault::audit::note::{self, Note, Verifier};
use carevault::audit::witness::{Refusal, WitnessState, accept};
use carevault::cli::{WitnessCommand, WitnessRunArgs};
use carevault::crypto::SigningKey;
use carevault::proto::v1 as pb;
use carevault::proto::v1::audit_service_client::AuditServiceClient;
use tonic::transport::Channel;

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// `witness …`: 0 accepted, 1 refused, 2 any other error.
pub async fn run(cmd: WitnessCommand) -> anyhow::Result<i32> {
    match cmd {
        WitnessCommand::Init { key, name } => {
            let mut seed = zeroize::Zeroizing::new([0u8; 32]);
            carevault::crypto::random_fill(seed.as_mut()).map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&key)
                .with_context(|| format!("cannot create {} (it must not exist)", key.display()))?;
            f.write_all(hex::encode(seed.as_ref()).as_bytes())?;
            f.sync_all()?;
            let public = SigningKey::from_seed(seed.as_ref()).map_err(|e| anyhow::anyhow!("{e}"))?.public_key();
            let v = Verifier::cosigner(&name, public).map_err(|e| anyhow::anyhow!("--name: {e}"))?;
            println!("{}", v.to_vkey());
            Ok(0)
        }
        WitnessCommand::Run(args) => {
            let Some(every) = args.interval else { return once(&args).await };
            loop {
                let code = once(&args).await?;
                if code != 0 {
                    return Ok(code);
                }
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = tokio::signal::ctrl_c() => return Ok(0),
                }
            }
        }
    }
}

fn read_key(path: &Path) -> anyhow::Result<SigningKey> {
    let bytes = carevault::keystore::read_private(path)?;
    let seed = zeroize::Zeroizing::new(
        hex::decode(std::str::from_utf8(&bytes)?.trim()).with_context(|| format!("{}: not hex", path.display()))?,
    );
    SigningKey::from_seed(&seed).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn read_state(path: &Path) -> anyhow::Result<Option<WitnessState>> {
    match std::fs::read(path) {
        Ok(b) => {
            Ok(Some(serde_json::from_slice(&b).with_context(|| format!("{}: not a witness state", path.display()))?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Writes the state durably: a temporary file beside it, fsync, rename, directory fsync.
fn write_state(path: &Path, state: &WitnessState) -> anyhow::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state"),
        std::process::id()
    ));
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(state)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

fn request<T>(msg: T, token: &str) -> anyhow::Result<tonic::Request<T>> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert("authorization", format!("Bearer {token}").parse()?);
    Ok(r)
}

fn refused(args: &WitnessRunArgs, r: Refusal, size: u64) -> i32 {
    if args.json {
        println!("{}", serde_json::json!({"ok": false, "class": r.class(), "tree_size": size, "error": r.to_string()}));
    } else {
        println!("REFUSED: {r} ({}); the state is unchanged", r.class());
    }
    1
}

async fn once(args: &WitnessRunArgs) -> anyhow::Result<i32> {
    let logs = args
        .log_key
        .iter()
        .map(|k| Verifier::parse(k).map_err(|e| anyhow::anyhow!("--log-key: {e}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let key = read_key(&args.key)?;
    let me = Verifier::cosigner(&args.name, key.public_key()).map_err(|e| anyhow::anyhow!("--name: {e}"))?;
    let last = read_state(&args.state)?;
    let mut client: AuditServiceClient<Channel> =
        AuditServiceClient::new(super::connect(&args.server, &args.tls).await?);
    let got = client
        .get_checkpoint(request(pb::GetCheckpointRequest { tree_size: 0, cosigned: false }, &args.token)?)
        .await
        .map_err(|s| anyhow::anyhow!("checkpoint refused: {:?}: {}", s.code(), s.message()))?
        .into_inner()
        .checkpoint
        .context("the server sent no checkpoint")?;
    let c = match note::open_checkpoint(&got.note, &logs) {
        Ok(c) => c,
        Err(_) => return Ok(refused(args, Refusal::BadCheckpointSignature, got.tree_size)),
    };
    let last_parts = match &last {
        None => None,
        Some(s) => {
            let root: Hash = b64()
                .decode(&s.root)
                .ok()
                .and_then(|r| r.try_into().ok())
                .with_context(|| format!("{}: bad root", args.state.display()))?;
            Some((s.origin.clone(), s.size, root))
        }
    };
    let mut proof = Vec::new();
    if let Some((_, size, _)) = &last_parts
        && *size > 0
        && c.size > *size
    {
        let p = client
            .get_consistency_proof(request(
                pb::GetConsistencyProofRequest { old_size: *size, tree_size: c.size },
                &args.token,
            )?)
            .await
            .map_err(|s| anyhow::anyhow!("consistency proof refused: {:?}: {}", s.code(), s.message()))?
            .into_inner();
        for h in p.hashes {
            match <[u8; 32]>::try_from(h.as_slice()) {
                Ok(h) => proof.push(h),
                Err(_) => return Ok(refused(args, Refusal::Inconsistent, c.size)),
            }
        }
    }
    if let Err(r) = accept(last_parts.as_ref().map(|(o, s, r)| (o.as_str(), *s, *r)), &c, &proof) {
        return Ok(refused(args, r, c.size));
    }
    let grew = last.as_ref().is_none_or(|s| s.size < c.size);
    if grew {
        write_state(&args.state, &WitnessState { origin: c.origin.clone(), size: c.size, root: b64().encode(c.root) })?;
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let text = Note::parse(&got.note).map_err(|e| anyhow::anyhow!("{e}"))?.text;
    let cosig = note::cosign(&text, &me.name, &key, now).map_err(|e| anyhow::anyhow!("{e}"))?;
    let cosigned = Note { text, signatures: vec![cosig] };
    let added = client
        .add_cosignature(request(
            pb::AddCosignatureRequest { note: cosigned.encode(), witness_key: me.to_vkey() },
            &args.token,
        )?)
        .await;
    if let Err(s) = &added {
        bail!("the log did not take the cosignature: {:?}: {}", s.code(), s.message());
    }
    if args.json {
        println!("{}", serde_json::json!({"ok": true, "tree_size": c.size, "root": b64().encode(c.root), "new": grew}));
    } else {
        println!("OK: cosigned {} at tree size {}{}", c.origin, c.size, if grew { "" } else { " (unchanged)" });
    }
    Ok(0)
}
