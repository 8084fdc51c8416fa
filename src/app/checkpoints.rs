//! Signed checkpoints of the audit log, proofs, and witnesses' cosignatures.
//!
//! The checkpointer signs, off the request path, a C2SP tlog checkpoint of
//! the Merkle tree as it is: every [`CheckpointPolicy::every_entries`] new
//! entries or [`CheckpointPolicy::interval`], at shutdown, and on request.
//! Before it signs size `n` it proves, from the stored tree, that the log at
//! `n` extends both the newest checkpoint in the store and the newest one
//! this data directory signed (`checkpoint-state`, beside the keys), and
//! refuses otherwise: carevault never signs two checkpoints that are not
//! consistent, across restarts and processes, even over a store rewritten
//! behind its back. A checkpoint is stored durably before anyone can read it.

use std::sync::Arc;
use std::time::Duration;

use super::call::Input;
use super::{App, CallContext, blocking, internal};
use crate::audit::AuditEntry;
use crate::audit::merkle::{self, Hash};
use crate::audit::note::{self, Checkpoint, Note, Verifier};
use crate::crypto::SigningKey;
use crate::domain::{Action, Outcome};
use crate::error::AppError;
use crate::keystore::{LogKeyInfo, SignedHead, VersionState};
use crate::storage::{StoredCheckpoint, tree};

/// When checkpoints are signed.
#[derive(Debug, Clone)]
pub struct CheckpointPolicy {
    /// The log's origin for a new log key (`None`: `carevault.local/audit/<id>`,
    /// from the genesis entry's hash). Once a log key exists, the key state's.
    pub origin: Option<String>,
    /// Sign once this many entries were added since the newest checkpoint.
    pub every_entries: u64,
    /// And at least this often while entries are added.
    pub interval: Duration,
}

/// Which checkpoint `GetCheckpoint` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointQuery {
    /// The one of this size, or the newest.
    At(Option<u64>),
    /// The newest with at least one cosignature, of a size below this one (or any).
    CosignedBelow(Option<u64>),
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        CheckpointPolicy { origin: None, every_entries: 1000, interval: Duration::from_secs(1) }
    }
}

/// The checkpointer's state in the app.
pub(super) struct Checkpointer {
    policy: CheckpointPolicy,
    /// One signing at a time; the log key last used, by version.
    signing: tokio::sync::Mutex<Option<(u32, Arc<SigningKey>)>>,
}

impl Checkpointer {
    pub(super) fn new(policy: CheckpointPolicy) -> Checkpointer {
        Checkpointer { policy, signing: tokio::sync::Mutex::new(None) }
    }
}

/// A checkpoint as served: parsed, and its note with every cosignature.
#[derive(Debug, Clone)]
pub struct ServedCheckpoint {
    /// What it commits to.
    pub checkpoint: Checkpoint,
    /// The signed note, the log's signature first, then the cosignatures.
    pub note: String,
    /// When the log signed it (µs).
    pub signed_micros: i64,
    /// How many cosignatures it carries.
    pub cosignatures: usize,
}

/// A proof as served.
#[derive(Debug, Clone)]
pub struct ServedProof {
    /// The tree size it is against.
    pub tree_size: u64,
    /// The hashes.
    pub hashes: Vec<Hash>,
    /// The entry's canonical bytes (inclusion proofs).
    pub entry: Option<Vec<u8>>,
    /// The checkpoint of `tree_size`, if one was signed.
    pub checkpoint: Option<ServedCheckpoint>,
}

/// The origin used when none is configured: unique per log.
fn default_origin(genesis_hash: &[u8; 32]) -> String {
    format!("carevault.local/audit/{}", hex::encode(&genesis_hash[..8]))
}

/// Whether `origin` can name a log (a note key name: no whitespace, no `+`, at most 255 bytes).
pub fn valid_origin(origin: &str) -> bool {
    !origin.is_empty()
        && origin.len() <= 255
        && !origin.chars().any(|c| c.is_whitespace() || c.is_control() || c == '+')
}

fn served(stored: &StoredCheckpoint) -> Result<ServedCheckpoint, AppError> {
    let text = std::str::from_utf8(&stored.note).map_err(|_| AppError::DataLoss)?;
    let mut n = Note::parse(text).map_err(|_| AppError::DataLoss)?;
    let checkpoint = Checkpoint::parse(&n.text).map_err(|_| AppError::DataLoss)?;
    let mut count = 0;
    for line in &stored.cosignatures {
        if let Ok(sig) = note::Signature::parse_line(line) {
            n.signatures.push(sig);
            count += 1;
        }
    }
    Ok(ServedCheckpoint { checkpoint, note: n.encode(), signed_micros: stored.signed_micros, cosignatures: count })
}

impl App {
    /// The log's verifier keys (every version, the signing one last) and origin.
    pub fn log_verifiers(&self) -> Result<Vec<Verifier>, AppError> {
        let state = self.keys.state();
        let Some(origin) = state.log_origin.clone() else { return Ok(Vec::new()) };
        state
            .log_keys
            .values()
            .map(|k| Verifier::new(&origin, k.public().ok_or(AppError::Internal)?).map_err(|_| AppError::Internal))
            .collect()
    }

    /// Creates the first log key (version 1, from the key source) if the key
    /// state has none, with a `keys.log_key_created` entry.
    pub async fn ensure_log_key(&self) -> Result<(), AppError> {
        if self.keys.state().signing_log_key().is_some() {
            return Ok(());
        }
        let _one = self.key_op_lock.lock().await;
        self.refresh_keys().await?;
        let state = self.keys.state();
        if state.signing_log_key().is_some() {
            return Ok(());
        }
        let version = state.log_keys.keys().last().copied().unwrap_or(0) + 1;
        let keys = self.keys.clone();
        let signer = blocking(move || keys.source.create_log(version).map_err(super::keys::key_error)).await?;
        let public = signer.public_key();
        let origin = match (&state.log_origin, &self.checkpoints.policy.origin) {
            (Some(o), _) | (None, Some(o)) => o.clone(),
            (None, None) => {
                let genesis = self.store.audit_entry(0).await.map_err(internal)?.ok_or(AppError::Internal)?;
                default_origin(&genesis.hash)
            }
        };
        let verifier = Verifier::new(&origin, public).map_err(|_| AppError::Internal)?;
        let entry = AuditEntry {
            actor: "carevault".into(),
            client_address: "local".into(),
            action: Action::KeysLogKeyCreated.as_str().into(),
            resource_type: Action::KeysLogKeyCreated.resource_type().as_str().into(),
            outcome: Outcome::Ok.as_str().into(),
            details: vec![format!("log_key_version={version}"), format!("log_key={}", verifier.to_vkey())],
            ..AuditEntry::default()
        };
        let now = self.clock.now_micros();
        let info = LogKeyInfo {
            public_key: base64::Engine::encode(&base64::engine::general_purpose::STANDARD, public),
            state: VersionState::Active,
            created_micros: now,
        };
        let edit = move |next: &mut crate::keystore::KeyState| {
            next.log_origin.get_or_insert_with(|| origin.clone());
            next.log_keys.insert(version, info.clone());
        };
        let committed = self.commit_key_state(entry, Vec::new(), edit).await?;
        if committed.outcome != crate::storage::CommitOutcome::Written {
            return Err(AppError::KeyStateMoved);
        }
        tracing::info!(version, vkey = %verifier.to_vkey(), "created the audit log key");
        Ok(())
    }

    /// Adds log key version N+1 (from the key source) and makes it the one
    /// that signs; older versions are retired (they still verify what they
    /// signed). The key state commits with the `keys.log_key_rotate` entry.
    pub async fn rotate_log_key(&self, ctx: &CallContext, input: Input<()>) -> Result<(u32, String), AppError> {
        let _one = self.key_op_lock.lock().await;
        let mut call = self.call(ctx, Action::KeysLogKeyRotate, input.named).await;
        let mut staged = None;
        let result = async {
            call.accept(input.parsed)?;
            self.refresh_keys().await?;
            let state = self.keys.state();
            let origin = state.log_origin.clone().ok_or(AppError::FailedPrecondition("the log has no log key yet"))?;
            let previous = state.signing_log_key().map_or(0, |(v, _)| v);
            let version = state.log_keys.keys().last().copied().unwrap_or(0) + 1;
            call.entry.details =
                vec![format!("log_key_version={version}"), format!("previous_log_key_version={previous}")];
            let keys = self.keys.clone();
            let signer = blocking(move || keys.source.create_log(version).map_err(super::keys::key_error)).await?;
            let verifier = Verifier::new(&origin, signer.public_key()).map_err(|_| AppError::Internal)?;
            let info = LogKeyInfo {
                public_key: base64::Engine::encode(&base64::engine::general_purpose::STANDARD, signer.public_key()),
                state: VersionState::Active,
                created_micros: self.clock.now_micros(),
            };
            let next = self
                .stage_key_state(move |s| {
                    for k in s.log_keys.values_mut() {
                        k.state = VersionState::Retired;
                    }
                    s.log_keys.insert(version, info);
                })
                .await?;
            call.stage(next.change.clone());
            staged = Some(next);
            call.entry.details.push(format!("log_key={}", verifier.to_vkey()));
            Ok((version, verifier.to_vkey()))
        }
        .await;
        let committed = call.finish(result).await;
        if let (Ok(_), Some(staged)) = (&committed, staged) {
            self.install_key_state(staged);
        }
        committed
    }

    /// The signing log key, checked against the public key the key state records.
    async fn log_signer(
        &self,
        cache: &mut Option<(u32, Arc<SigningKey>)>,
    ) -> Result<(String, u32, Arc<SigningKey>), AppError> {
        let state = self.keys.state();
        let origin = state.log_origin.clone().ok_or(AppError::FailedPrecondition("no log key"))?;
        let (version, info) = state.signing_log_key().ok_or(AppError::FailedPrecondition("no log key"))?;
        if let Some((v, k)) = cache.as_ref()
            && *v == version
        {
            return Ok((origin, version, k.clone()));
        }
        let want = info.public().ok_or(AppError::Internal)?;
        let keys = self.keys.clone();
        let key = blocking(move || {
            keys.source
                .fetch_log(version)
                .map_err(super::keys::key_error)?
                .ok_or(AppError::FailedPrecondition("log key missing"))
        })
        .await?;
        if key.public_key() != want {
            tracing::error!(version, "the log key from the key source is not the one the key state records");
            return Err(AppError::FailedPrecondition("log key mismatch"));
        }
        let key = Arc::new(key);
        *cache = Some((version, key.clone()));
        Ok((origin, version, key))
    }

    /// Checks, from the stored tree, that the tree of `size` leaves (root
    /// `root`) and `other` are consistent (one extends the other).
    async fn consistent_with(&self, size: u64, root: &Hash, other: SignedHead) -> Result<bool, AppError> {
        let (old, old_root, new, new_root) = if other.size <= size {
            (other.size, other.root, size, *root)
        } else {
            (size, *root, other.size, other.root)
        };
        if old == new {
            return Ok(old_root == new_root);
        }
        if new > self.store.tree_size().await.map_err(internal)? {
            return Ok(false);
        }
        let ranges = merkle::consistency_ranges(old, new).ok_or(AppError::Internal)?;
        let proof = tree::proof(&*self.store, &ranges).await.map_err(internal)?;
        Ok(merkle::verify_consistency(old, new, &old_root, &new_root, &proof).is_ok())
    }

    /// Signs and stores a checkpoint of the tree as it is, if it grew since
    /// the newest one; returns the newest checkpoint after.
    pub async fn sign_checkpoint(&self) -> Result<Option<StoredCheckpoint>, AppError> {
        let mut cache = self.checkpoints.signing.lock().await;
        if *self.store.sequencer().failed().borrow() {
            return Err(AppError::AuditUnavailable);
        }
        let size = self.store.tree_size().await.map_err(internal)?;
        let latest = self.store.checkpoint(None).await.map_err(internal)?;
        if latest.as_ref().is_some_and(|l| l.size >= size) {
            return Ok(latest);
        }
        let root = tree::root(&*self.store, size).await.map_err(internal)?;
        let (origin, _, key) = self.log_signer(&mut cache).await?;
        if let Some(l) = &latest {
            let c = served(l)?.checkpoint;
            if !self.consistent_with(size, &root, SignedHead { size: c.size, root: c.root }).await? {
                tracing::error!(
                    size,
                    latest = c.size,
                    "refusing to sign: the log is not consistent with its newest checkpoint"
                );
                return Err(AppError::FailedPrecondition("log inconsistent with its checkpoints"));
            }
        }
        let data_dir = self.keys.data_dir.clone();
        let mut seen = {
            let d = data_dir.clone();
            blocking(move || crate::keystore::read_signed_head(&d).map_err(super::keys::key_error)).await?
        };
        loop {
            if let Some(prev) = seen {
                if !self.consistent_with(size, &root, prev).await? {
                    tracing::error!(
                        size,
                        signed = prev.size,
                        "refusing to sign: the log is not consistent with the checkpoint this data directory signed last"
                    );
                    return Err(AppError::FailedPrecondition("log inconsistent with its checkpoints"));
                }
                if prev.size >= size {
                    // Another process signed this or a larger one meanwhile.
                    return self.store.checkpoint(None).await.map_err(internal);
                }
            }
            let d = data_dir.clone();
            let next = SignedHead { size, root };
            match blocking(move || crate::keystore::advance_signed_head(&d, seen, next).map_err(super::keys::key_error))
                .await?
            {
                Ok(()) => break,
                Err(now) => seen = now,
            }
        }
        let body = Checkpoint { origin: origin.clone(), size, root, extensions: Vec::new() }.body();
        let signed = note::sign(&body, &origin, &key).map_err(|_| AppError::Internal)?;
        let now = self.clock.now_micros();
        self.store
            .save_checkpoint(size, signed.encode().as_bytes(), now)
            .await
            .map_err(super::call::audit_unavailable)?;
        tracing::debug!(size, "signed a checkpoint");
        self.store.checkpoint(None).await.map_err(internal)
    }

    /// Runs the checkpointer until the app stops, then signs a last one
    /// (after [`App::ensure_log_key`]).
    pub fn watch_checkpoints(&self) {
        let app = self.clone();
        tokio::spawn(async move {
            let policy = app.checkpoints.policy.clone();
            let step = policy.interval.min(Duration::from_millis(100)).max(Duration::from_millis(10));
            let mut last_signed = std::time::Instant::now();
            loop {
                if !app.sleep_unless_stopped(step).await {
                    break;
                }
                let Ok(size) = app.store.tree_size().await else { continue };
                let signed = match app.store.checkpoint(None).await {
                    Ok(c) => c.map_or(0, |c| c.size),
                    Err(_) => continue,
                };
                let due = size > signed
                    && (size - signed >= policy.every_entries || last_signed.elapsed() >= policy.interval);
                if due {
                    if let Err(e) = app.sign_checkpoint().await {
                        tracing::warn!(error = %e, "signing a checkpoint failed");
                    }
                    last_signed = std::time::Instant::now();
                }
            }
            if let Err(e) = app.sign_checkpoint().await {
                tracing::warn!(error = %e, "signing the last checkpoint at shutdown failed");
            }
        });
    }

    /// The checkpoint asked for, with its cosignatures. Audited.
    pub async fn get_checkpoint(
        &self,
        ctx: &CallContext,
        input: Input<CheckpointQuery>,
    ) -> Result<ServedCheckpoint, AppError> {
        let mut call = self.call(ctx, Action::AuditCheckpoint, input.named).await;
        let query = match call.accept(input.parsed) {
            Ok(q) => q,
            Err(e) => return Err(call.refuse(e).await),
        };
        let shown = |s: Option<u64>| s.map_or("latest".into(), |s| s.to_string());
        let size = match query {
            CheckpointQuery::At(size) => {
                call.entry.details = vec![format!("tree_size={}", shown(size))];
                size
            }
            CheckpointQuery::CosignedBelow(below) => {
                call.entry.details = vec![format!("cosigned_below={}", shown(below))];
                call.commit(None).await?;
                let found = self.store.cosigned_checkpoints(below, 1).await.map_err(internal)?;
                return served(found.first().ok_or(AppError::NotFound("checkpoint"))?);
            }
        };
        call.commit(None).await?;
        let stored = self.store.checkpoint(size).await.map_err(internal)?;
        let stored = match stored {
            Some(s) => s,
            None if size.is_none() => self.sign_checkpoint().await?.ok_or(AppError::NotFound("checkpoint"))?,
            None => return Err(AppError::NotFound("checkpoint")),
        };
        served(&stored)
    }

    /// Checks a requested tree size against the tree: `0` means the newest
    /// checkpoint's size.
    async fn proof_size(&self, size: u64) -> Result<u64, AppError> {
        if size != 0 {
            let have = self.store.tree_size().await.map_err(internal)?;
            if size > have {
                return Err(AppError::invalid("tree_size", "is larger than the log"));
            }
            return Ok(size);
        }
        match self.store.checkpoint(None).await.map_err(internal)? {
            Some(c) => Ok(c.size),
            None => Ok(self.sign_checkpoint().await?.ok_or(AppError::NotFound("checkpoint"))?.size),
        }
    }

    /// The inclusion proof of entry `sequence` in the tree of `size` (0: the
    /// newest checkpoint's), with the entry and that checkpoint. Audited.
    pub async fn inclusion_proof(&self, ctx: &CallContext, input: Input<(u64, u64)>) -> Result<ServedProof, AppError> {
        let mut call = self.call(ctx, Action::AuditProof, input.named).await;
        let checked = match call.accept(input.parsed) {
            Ok((seq, size)) => self.proof_size(size).await.and_then(|size| {
                if seq >= size {
                    Err(AppError::invalid("sequence", "is not below the tree size"))
                } else {
                    Ok((seq, size))
                }
            }),
            Err(e) => Err(e),
        };
        let (seq, size) = match checked {
            Ok(v) => v,
            Err(e) => return Err(call.refuse(e).await),
        };
        call.entry.details = vec!["proof=inclusion".into(), format!("sequence={seq}"), format!("tree_size={size}")];
        call.commit(None).await?;
        let ranges = merkle::inclusion_ranges(seq, size).ok_or(AppError::Internal)?;
        let hashes = tree::proof(&*self.store, &ranges).await.map_err(internal)?;
        let entry = self.store.audit_entry(seq).await.map_err(internal)?.ok_or(AppError::DataLoss)?;
        let checkpoint = self.store.checkpoint(Some(size)).await.map_err(internal)?.map(|c| served(&c)).transpose()?;
        Ok(ServedProof { tree_size: size, hashes, entry: Some(entry.bytes), checkpoint })
    }

    /// The consistency proof from the tree of `old` to the tree of `new`
    /// (0: the newest checkpoint's). Audited.
    pub async fn consistency_proof(
        &self,
        ctx: &CallContext,
        input: Input<(u64, u64)>,
    ) -> Result<ServedProof, AppError> {
        let mut call = self.call(ctx, Action::AuditProof, input.named).await;
        let checked = match call.accept(input.parsed) {
            Ok((old, new)) => self.proof_size(new).await.and_then(|new| {
                if old == 0 || old > new {
                    Err(AppError::invalid("old_size", "must be at least 1 and at most the new size"))
                } else {
                    Ok((old, new))
                }
            }),
            Err(e) => Err(e),
        };
        let (old, new) = match checked {
            Ok(v) => v,
            Err(e) => return Err(call.refuse(e).await),
        };
        call.entry.details = vec!["proof=consistency".into(), format!("old_size={old}"), format!("tree_size={new}")];
        call.commit(None).await?;
        let ranges = merkle::consistency_ranges(old, new).ok_or(AppError::Internal)?;
        let hashes = tree::proof(&*self.store, &ranges).await.map_err(internal)?;
        let checkpoint = self.store.checkpoint(Some(new)).await.map_err(internal)?.map(|c| served(&c)).transpose()?;
        Ok(ServedProof { tree_size: new, hashes, entry: None, checkpoint })
    }

    /// Stores a witness's cosignature of a checkpoint: the note the witness
    /// cosigned (its text must be exactly a stored checkpoint's) and the
    /// witness's verifier key. The cosignature must verify. Audited.
    pub async fn add_cosignature(
        &self,
        ctx: &CallContext,
        input: Input<(String, Verifier)>,
    ) -> Result<ServedCheckpoint, AppError> {
        let mut call = self.call(ctx, Action::AuditCosign, input.named).await;
        let checked = match call.accept(input.parsed) {
            Ok((text, witness)) => {
                self.check_cosignature(&text, &witness).await.map(|(size, line)| (size, line, witness))
            }
            Err(e) => Err(e),
        };
        let (size, line, witness) = match checked {
            Ok(v) => v,
            Err(e) => return Err(call.refuse(e).await),
        };
        call.entry.details = vec![
            format!("tree_size={size}"),
            format!("witness={}", witness.name),
            format!("key_id={}", hex::encode(witness.id)),
        ];
        call.commit(None).await?;
        let now = self.clock.now_micros();
        self.store
            .save_cosignature(size, &witness.name, witness.id, &line, now)
            .await
            .map_err(super::call::audit_unavailable)?;
        let stored = self.store.checkpoint(Some(size)).await.map_err(internal)?.ok_or(AppError::Internal)?;
        served(&stored)
    }

    /// The size and the cosignature line of a cosigned note, if it cosigns a stored checkpoint.
    async fn check_cosignature(&self, text: &str, witness: &Verifier) -> Result<(u64, String), AppError> {
        let n = Note::parse(text).map_err(|_| AppError::invalid("note", "is not a signed note"))?;
        let c = Checkpoint::parse(&n.text).map_err(|_| AppError::invalid("note", "is not a checkpoint"))?;
        let stored = self.store.checkpoint(Some(c.size)).await.map_err(internal)?;
        let Some(stored) = stored else { return Err(AppError::NotFound("checkpoint")) };
        let ours = Note::parse(std::str::from_utf8(&stored.note).map_err(|_| AppError::DataLoss)?)
            .map_err(|_| AppError::DataLoss)?;
        if ours.text != n.text {
            return Err(AppError::invalid("note", "is not the checkpoint the log signed at that size"));
        }
        let sig = n
            .signatures
            .iter()
            .find(|s| s.name == witness.name && s.id == witness.id)
            .ok_or(AppError::invalid("note", "carries no signature by the witness key"))?;
        if note::verify_cosignature(witness, &n.text, sig).is_none() {
            return Err(AppError::invalid("note", "the witness's cosignature does not verify"));
        }
        Ok((c.size, sig.line()))
    }
}
