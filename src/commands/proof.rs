//! `carevault audit prove SEQ` and `carevault verify-proof FILE`: an entry's
//! inclusion proof as one self-contained document, and its offline check
//! (the pure `audit::proof`).

use anyhow::{Context, bail};
use carevault::audit::note::Verifier;
use carevault::audit::proof::ProofDocument;
use carevault::cli::{AuditArgs, AuditCommand, VerifyProofArgs};
use carevault::proto::v1 as pb;
use carevault::proto::v1::audit_service_client::AuditServiceClient;

/// `audit …`.
pub async fn audit(args: AuditArgs) -> anyhow::Result<i32> {
    let url = args.server.clone().context("audit prove needs --server URL")?;
    let token = args.token.clone().context("--server needs --token (or CAREVAULT_TOKEN) with audit.read")?;
    let mut client = AuditServiceClient::new(super::connect(&url, &args.tls).await?);
    match args.command {
        AuditCommand::Prove { sequence, tree_size } => {
            let mut req = tonic::Request::new(pb::GetInclusionProofRequest { sequence, tree_size });
            req.metadata_mut().insert("authorization", format!("Bearer {token}").parse()?);
            let p = client
                .get_inclusion_proof(req)
                .await
                .map_err(|s| anyhow::anyhow!("proof refused: {:?}: {}", s.code(), s.message()))?
                .into_inner();
            let Some(checkpoint) = p.checkpoint else {
                bail!("the log signed no checkpoint at size {}: give --tree-size of one it signed", p.tree_size)
            };
            let hashes = p
                .hashes
                .iter()
                .map(|h| <[u8; 32]>::try_from(h.as_slice()))
                .collect::<Result<Vec<_>, _>>()
                .context("the server sent a hash that is not 32 bytes")?;
            let doc = ProofDocument::new(p.sequence, p.tree_size, &p.entry, &hashes, &checkpoint.note);
            println!("{}", serde_json::to_string_pretty(&doc)?);
            Ok(0)
        }
    }
}

/// `verify-proof FILE --log-key VKEY`: 0 verified, 1 not.
pub fn verify_proof(args: VerifyProofArgs) -> anyhow::Result<i32> {
    let text = if args.file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(&args.file).with_context(|| format!("cannot read {}", args.file.display()))?
    };
    let keys = args
        .log_key
        .iter()
        .map(|k| Verifier::parse(k).map_err(|e| anyhow::anyhow!("--log-key: {e}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let doc: ProofDocument = serde_json::from_str(&text).context("not a proof document (JSON)")?;
    match doc.verify(&keys) {
        Ok((entry, checkpoint)) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "ok": true, "sequence": entry.sequence, "tree_size": checkpoint.size,
                        "origin": checkpoint.origin, "action": entry.action, "actor": entry.actor,
                        "patient_id": entry.patient_id, "time_micros": entry.time_micros, "outcome": entry.outcome,
                    })
                );
            } else {
                println!(
                    "OK: entry {} ({} by {}, outcome {}) is in the log {} at tree size {}",
                    entry.sequence, entry.action, entry.actor, entry.outcome, checkpoint.origin, checkpoint.size
                );
            }
            Ok(0)
        }
        Err(e) => {
            if args.json {
                println!("{}", serde_json::json!({ "ok": false, "class": e.class(), "error": e.to_string() }));
            } else {
                println!("FAILED: {e} ({})", e.class());
            }
            Ok(1)
        }
    }
}
