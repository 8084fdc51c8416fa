//! Use cases: authorize -> validate -> open/seal -> store with audit.
//!
//! Every use case starts an [`Attempt`] (the audit entry being built), and
//! every path out of it, success or failure, goes through
//! [`App::finish`] or [`App::commit_write`], which append the entry durably
//! before anything is returned. No proto types here.

mod access;
mod audit_log;
mod blind;
mod coverages;
mod erasure;
mod jobs;
mod keys;
mod patients;
mod reencrypt;
mod rewrap;

use std::sync::Arc;
use std::time::Instant;

pub use access::{BreakGlassGrant, GrantPage, GrantReview, GrantsRequest, ReviewFilter};
pub use audit_log::{AuditFilter, AuditPage, ExportStart};
pub use blind::BlindIndexJob;
pub use coverages::{CoverageCreate, CoverageUpdate};
pub use erasure::{EraseRequest, Erasure};
pub use keys::{KeyManager, KeyStatus, VersionStatus, VersionUse};
pub use patients::{PageRequest, PatientPage, PatientUpdate, SearchCriterion, SearchRequest, SearchResult};
pub use reencrypt::{ReencryptJob, ReencryptRequest};
pub use rewrap::{RewrapJob, RewrapRequest};

use crate::audit::AuditEntry;
use crate::auth::limits::{Limited, Limits};
use crate::auth::policy::{Grant, Identity, Policy, Purpose};
use crate::auth::{AuthFailure, Principal};
use crate::clock::Clock;
use crate::crypto::{self, DataKey, RecordAad, RecordKind, WrappedDataKey};
use crate::domain::{Action, Outcome, PatientId};
use crate::error::{AppError, FieldViolation};
use crate::storage::{Commit, CommitOutcome, Committed, Head, MetaWrite, RecordWrite, Sequencer, StorageError, Store};

/// Who is calling and how, as seen at the edge.
pub struct CallContext {
    /// x-request-id from the client if well-formed, else generated.
    pub request_id: String,
    /// The peer's ip:port, or "".
    pub client_address: String,
    /// The token check's result.
    pub auth: Result<Principal, AuthFailure>,
    /// The calling service's client-certificate identity (mutual TLS), if any.
    pub service: Option<String>,
    /// `x-purpose-of-use`: absent, a known code, or present but not a known code (`Err`).
    pub purpose: Result<Option<Purpose>, ()>,
    /// `x-break-glass-reason`: absent, or printable text of 1..=1000 chars (`Err` otherwise).
    /// Never logged or audited in plaintext.
    pub break_glass_reason: Result<Option<String>, ()>,
    /// A slot under the global concurrency cap, held for the whole call.
    pub permit: Result<tokio::sync::OwnedSemaphorePermit, Limited>,
    /// When the call arrived (for latency logs).
    pub started: Instant,
    /// An operator at the machine running an offline `carevault keys` command
    /// on a stopped data directory: holds the key_admin role whatever the
    /// policy says (they hold the key files already), and nothing else.
    pub local_operator: bool,
}

impl CallContext {
    /// The context of an offline key command run by `user` on this machine
    /// (audited as actor `offline:<user>`, address `local`).
    pub fn offline(app: &App, user: &str) -> CallContext {
        CallContext {
            request_id: uuid::Uuid::now_v7().to_string(),
            client_address: "local".into(),
            auth: Ok(Principal { subject: format!("offline:{user}"), token_roles: Vec::new() }),
            service: None,
            purpose: Ok(None),
            break_glass_reason: Ok(None),
            permit: app.limits().enter(),
            started: Instant::now(),
            local_operator: true,
        }
    }

    fn subject(&self) -> Option<&str> {
        self.auth.as_ref().ok().map(|p| p.subject.as_str())
    }

    fn purpose(&self) -> Option<Purpose> {
        self.purpose.ok().flatten()
    }
}

/// Input that either parsed or was rejected field by field.
pub type Parsed<T> = Result<T, Vec<FieldViolation>>;

/// An audit entry being built for one call.
pub struct Attempt {
    entry: AuditEntry,
    action: Action,
    /// What the caller's roles allow under the request's purpose (set by `authorize`).
    grant: Grant,
    /// Access-tree changes that commit with the entry if the call succeeds
    /// (a new break-glass grant).
    meta: Vec<MetaWrite>,
}

impl Attempt {
    fn patient(&mut self, id: PatientId) {
        self.entry.patient_id = id.to_string();
        if self.action.resource_type() == "patient" {
            self.entry.resource_id = id.to_string();
        }
    }
}

/// A record opened from storage, with the data key that opened it (so a
/// write that follows can seal with it without unwrapping the key again).
pub(super) struct Opened<T> {
    record: T,
    patient: PatientId,
    dek: DataKey,
    key_version: u32,
}

/// Access-control parts of the application.
pub struct AccessControl {
    /// Roles and permissions.
    pub policy: Policy,
    /// Rate and concurrency limits.
    pub limits: Limits,
    /// How long a break-glass grant lasts, microseconds.
    pub break_glass_micros: i64,
}

/// The application: storage, keys, sequencer, clock and access control.
#[derive(Clone)]
pub struct App {
    store: Store,
    sequencer: Sequencer,
    keys: Arc<KeyManager>,
    clock: Arc<dyn Clock>,
    access: Arc<AccessControl>,
    /// Held while a rewrap job runs, so only one runs at a time.
    rewrap_lock: Arc<tokio::sync::Mutex<()>>,
    /// Held by an erasure (and by finishing interrupted ones): one at a time.
    erase_lock: Arc<tokio::sync::Mutex<()>>,
    /// Held while a re-encryption job runs.
    reencrypt_lock: Arc<tokio::sync::Mutex<()>>,
    /// Held while a blind-index rotation runs.
    blind_lock: Arc<tokio::sync::Mutex<()>>,
    /// Set at shutdown: background jobs stop after their current batch.
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

impl App {
    /// Assembles the application from its parts.
    pub fn new(
        store: Store,
        sequencer: Sequencer,
        keys: KeyManager,
        clock: Arc<dyn Clock>,
        access: AccessControl,
    ) -> Self {
        App {
            store,
            sequencer,
            keys: Arc::new(keys),
            clock,
            access: Arc::new(access),
            rewrap_lock: Arc::new(tokio::sync::Mutex::new(())),
            erase_lock: Arc::new(tokio::sync::Mutex::new(())),
            reencrypt_lock: Arc::new(tokio::sync::Mutex::new(())),
            blind_lock: Arc::new(tokio::sync::Mutex::new(())),
            stopping: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        }
    }

    /// Waits until no background job runs (after [`App::stop_jobs`]).
    pub async fn wait_jobs(&self) {
        let _ = self.rewrap_lock.lock().await;
        let _ = self.reencrypt_lock.lock().await;
        let _ = self.blind_lock.lock().await;
    }

    /// Asks background jobs to stop after their current batch (shutdown).
    pub fn stop_jobs(&self) {
        self.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The limits (the edge takes concurrency permits from them).
    pub fn limits(&self) -> &Limits {
        &self.access.limits
    }

    /// The store (read-only use by the edge for exports).
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn begin(&self, ctx: &CallContext, action: Action) -> Attempt {
        let entry = AuditEntry {
            actor: ctx.auth.as_ref().map(|p| p.subject.clone()).unwrap_or_default(),
            client_address: ctx.client_address.clone(),
            request_id: ctx.request_id.clone(),
            action: action.as_str().to_string(),
            resource_type: action.resource_type().to_string(),
            service: ctx.service.clone().unwrap_or_default(),
            purpose: ctx.purpose().map(|p| p.as_str().to_string()).unwrap_or_default(),
            ..AuditEntry::default()
        };
        Attempt { entry, action, grant: Grant::default(), meta: Vec::new() }
    }

    /// Admits, authenticates and authorizes; a failure is audited and returned.
    ///
    /// Order: the global concurrency cap, the caller's rate (by subject, or
    /// by address for callers without a valid token), the token, the purpose
    /// header's syntax, then the policy decision for the action's permission
    /// under the stated purpose.
    async fn authorize(&self, ctx: &CallContext, attempt: &mut Attempt) -> Result<(), AppError> {
        match self.decide(ctx, attempt) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.fail(ctx, attempt, e).await),
        }
    }

    fn decide(&self, ctx: &CallContext, attempt: &mut Attempt) -> Result<(), AppError> {
        if let Err(l) = &ctx.permit {
            return Err(AppError::Limited(*l));
        }
        let rate_key = match &ctx.auth {
            Ok(p) => format!("sub:{}", p.subject),
            Err(_) => format!("addr:{}", ctx.client_address.rsplit_once(':').map_or("", |(ip, _)| ip)),
        };
        self.access.limits.check_rate(&rate_key).map_err(AppError::Limited)?;
        let principal = ctx.auth.as_ref().map_err(|f| AppError::Unauthenticated(*f))?;
        if ctx.purpose.is_err() {
            return Err(AppError::invalid("x-purpose-of-use", "must be an HL7 PurposeOfUse code such as TREAT"));
        }
        let who = Identity {
            subject: &principal.subject,
            token_roles: &principal.token_roles,
            service: ctx.service.as_deref(),
        };
        let roles = if ctx.local_operator {
            std::iter::once("key_admin".to_string()).collect()
        } else {
            self.access.policy.roles_for(who)
        };
        attempt.entry.roles = roles.iter().cloned().collect();
        let needed = attempt.action.required_permission();
        let grant = self
            .access
            .policy
            .decide(&roles, ctx.purpose(), needed, attempt.action.is_phi())
            .map_err(AppError::PermissionDenied)?;
        attempt.entry.scopes = vec![needed.as_str().to_string()];
        attempt.grant = grant;
        Ok(())
    }

    /// Unwraps parsed input, or audits and returns INVALID_ARGUMENT.
    async fn valid<T>(&self, ctx: &CallContext, attempt: &mut Attempt, input: Parsed<T>) -> Result<T, AppError> {
        match input {
            Ok(v) => Ok(v),
            Err(violations) => Err(self.fail(ctx, attempt, AppError::InvalidArgument(violations)).await),
        }
    }

    async fn fail(&self, ctx: &CallContext, attempt: &mut Attempt, err: AppError) -> AppError {
        let entry = std::mem::take(&mut attempt.entry);
        let attempt = Attempt { entry, action: attempt.action, grant: Grant::default(), meta: Vec::new() };
        match self.finish::<()>(ctx, attempt, Err(err)).await {
            Err(e) => e,
            Ok(()) => AppError::Internal,
        }
    }

    /// Records the outcome of a read-like call durably, then returns its result.
    /// If the entry cannot be made durable the result is discarded (fail closed).
    async fn finish<T>(
        &self,
        ctx: &CallContext,
        mut attempt: Attempt,
        result: Result<T, AppError>,
    ) -> Result<T, AppError> {
        let outcome = match &result {
            Ok(_) => Outcome::Ok,
            Err(e) => e.outcome(),
        };
        attempt.entry.outcome = outcome.as_str().to_string();
        // Access changes (a new break-glass grant) take effect only with a successful result.
        let meta = if result.is_ok() { std::mem::take(&mut attempt.meta) } else { Vec::new() };
        let committed = self.sequencer.commit(Commit { entry: attempt.entry, write: None, meta }).await;
        self.log(ctx, attempt.action, outcome, committed.as_ref().ok());
        match committed {
            Ok(c) if c.outcome == CommitOutcome::Written => result,
            Ok(_) => Err(AppError::Conflict { current: 0 }),
            Err(e) => Err(audit_unavailable(e)),
        }
    }

    /// Commits a write with its audit entry; a stale version becomes `Conflict`.
    async fn commit_write(
        &self,
        ctx: &CallContext,
        mut attempt: Attempt,
        write: RecordWrite,
    ) -> Result<Committed, AppError> {
        attempt.entry.outcome = Outcome::Ok.as_str().to_string();
        let meta = std::mem::take(&mut attempt.meta);
        let committed = self.sequencer.commit(Commit { entry: attempt.entry, write: Some(write), meta }).await;
        match committed {
            Ok(c) => match c.outcome {
                CommitOutcome::Written => {
                    self.log(ctx, attempt.action, Outcome::Ok, Some(&c));
                    Ok(c)
                }
                CommitOutcome::Conflict { current } => {
                    self.log(ctx, attempt.action, Outcome::Aborted, Some(&c));
                    Err(AppError::Conflict { current })
                }
                CommitOutcome::KeyChanged => {
                    self.log(ctx, attempt.action, Outcome::Aborted, Some(&c));
                    Err(AppError::KeyChanged)
                }
            },
            Err(e) => {
                self.log(ctx, attempt.action, Outcome::Internal, None);
                Err(audit_unavailable(e))
            }
        }
    }

    /// Appends an entry for a successful call (with its access changes) and
    /// returns the committed entry (used by audit head/export and access changes).
    async fn commit_ok(&self, ctx: &CallContext, mut attempt: Attempt) -> Result<Committed, AppError> {
        attempt.entry.outcome = Outcome::Ok.as_str().to_string();
        let meta = std::mem::take(&mut attempt.meta);
        let committed = self.sequencer.commit(Commit { entry: attempt.entry, write: None, meta }).await;
        match committed {
            Ok(c) if c.outcome == CommitOutcome::Written => {
                self.log(ctx, attempt.action, Outcome::Ok, Some(&c));
                Ok(c)
            }
            Ok(c) => {
                self.log(ctx, attempt.action, Outcome::Aborted, Some(&c));
                Err(AppError::Conflict { current: 0 })
            }
            Err(e) => {
                self.log(ctx, attempt.action, Outcome::Internal, None);
                Err(audit_unavailable(e))
            }
        }
    }

    fn log(&self, ctx: &CallContext, action: Action, outcome: Outcome, committed: Option<&Committed>) {
        let principal = ctx.subject().unwrap_or("");
        let latency_us = u64::try_from(ctx.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        tracing::info!(
            request_id = %ctx.request_id,
            method = action.as_str(),
            principal,
            service = ctx.service.as_deref().unwrap_or(""),
            outcome = outcome.as_str(),
            audit_seq = committed.map(|c| c.sequence),
            latency_us,
            "request"
        );
    }

    fn now(&self) -> i64 {
        self.clock.now_micros()
    }

    /// Loads and unwraps a patient's data key.
    fn data_key(&self, patient: PatientId) -> Result<(DataKey, u32), AppError> {
        let mut attempts = 0;
        loop {
            // The bucket keys are taken before the wrapped key is read: an
            // erasure in the same bucket may move the key to a newer
            // generation in between, which a second read then finds.
            let shreds = self.keys.shreds();
            let wrapped = match self.store.wrapped_dek(&patient.bytes()).map_err(internal)? {
                Some(w) => WrappedDataKey(w),
                None => return Err(self.missing(RecordKind::Patient, &patient.bytes())),
            };
            let version = wrapped.master_version().map_err(|_| AppError::DataLoss)?;
            match self.keys.ring().unwrap_data_key(&patient.bytes(), &wrapped, &shreds) {
                Ok(dek) => return Ok((dek, version)),
                Err(crypto::CryptoError::UnknownErasureKey(..)) if attempts < 3 => attempts += 1,
                Err(e) => return Err(crypto_failure(e)),
            }
        }
    }

    /// NOT_FOUND for a record that does not exist, or "erased" for one that was crypto-shredded.
    fn missing(&self, kind: RecordKind, id: &[u8; 16]) -> AppError {
        let what = match kind {
            RecordKind::Patient => "patient",
            RecordKind::Coverage => "coverage",
        };
        match self.store.access_get(&erasure::erased_key(kind, id)) {
            Ok(Some(_)) => AppError::Erased(what),
            Ok(None) => AppError::NotFound(what),
            Err(e) => internal(e),
        }
    }

    /// Opens one stored version of a record and decodes its JSON plaintext.
    fn open<T: serde::de::DeserializeOwned>(
        &self,
        dek: &DataKey,
        aad: &RecordAad,
        sealed: &[u8],
    ) -> Result<T, AppError> {
        let plain = zeroize::Zeroizing::new(crypto::open_record(dek, aad, sealed).map_err(crypto_failure)?);
        serde_json::from_slice(&plain).map_err(|_| AppError::DataLoss)
    }

    fn seal<T: serde::Serialize>(&self, dek: &DataKey, aad: &RecordAad, value: &T) -> Result<Vec<u8>, AppError> {
        let plain = zeroize::Zeroizing::new(serde_json::to_vec(value).map_err(|_| AppError::Internal)?);
        crypto::seal_record(dek, aad, &plain).map_err(crypto_failure)
    }

    fn head(&self, kind: RecordKind, id: &[u8; 16]) -> Result<Option<Head>, AppError> {
        self.store.head(kind, id).map_err(internal)
    }
}

fn internal(e: StorageError) -> AppError {
    tracing::error!(error = %e, "storage read failed");
    AppError::Internal
}

fn audit_unavailable(e: StorageError) -> AppError {
    tracing::error!(error = %e, "audit commit failed; request failed closed");
    AppError::AuditUnavailable
}

fn crypto_failure(e: crypto::CryptoError) -> AppError {
    match e {
        crypto::CryptoError::Random => {
            tracing::error!("random generator failed");
            AppError::Internal
        }
        other => {
            tracing::error!(error = %other, "stored ciphertext failed to open");
            AppError::DataLoss
        }
    }
}

/// A collection length as an audit count (lossless on every supported platform).
fn count(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

/// Blocking work (bulk decryption) off the async executor, keeping the span.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, AppError> + Send + 'static) -> Result<T, AppError> {
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(f)).await.map_err(|_| AppError::Internal)?
}
