//! One audited call: the entry being built, and the only ways out of a use case.
//!
//! A use case starts a [`Call`] with what its request names, then runs its
//! steps in an `async` block that returns early with `?`, and ends with
//! [`Call::finish`] (reads), [`Call::finish_write`] (record writes) or
//! [`Call::commit`] (calls whose success is a commit). Each of them appends
//! the entry durably, whatever the outcome, before the result leaves, so a
//! path out of a use case that skips the audit trail cannot be written:
//!
//! ```text
//! let mut call = self.call(ctx, Action::PatientRead, input.named);
//! let result = async { let id = call.accept(input.parsed)?; ...; Ok(patient) }.await;
//! call.finish(result).await
//! ```

use super::{App, CallContext};
use crate::audit::AuditEntry;
use crate::auth::policy::{Grant, Identity};
use crate::domain::{Action, CoverageId, Outcome, PatientId, ResourceType};
use crate::error::{AppError, FieldViolation};
use crate::storage::{Change, Commit, CommitOutcome, Committed, RecordRef, RecordWrite, StorageError};

/// Input that either parsed or was rejected field by field.
pub type Parsed<T> = Result<T, Vec<FieldViolation>>;

/// What a request names: recorded in its audit entry whatever the outcome,
/// so that a patient's audit view lists every call that named the patient,
/// refused and invalid ones included.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Named {
    /// The patient the request names directly.
    pub patient: Option<PatientId>,
    /// The coverage the request names (its patient is looked up).
    pub coverage: Option<CoverageId>,
}

impl Named {
    /// A request naming one patient (if its id parsed).
    pub fn patient(id: Option<PatientId>) -> Named {
        Named { patient: id, coverage: None }
    }

    /// A request naming one coverage (if its id parsed).
    pub fn coverage(id: Option<CoverageId>) -> Named {
        Named { patient: None, coverage: id }
    }
}

/// A request as the edge read it: what it names and its parsed content.
pub struct Input<T> {
    /// Recorded in the audit entry whatever the outcome.
    pub named: Named,
    /// The content, or every field that is wrong with it.
    pub parsed: Parsed<T>,
}

impl<T> Input<T> {
    /// A request that named `named` and parsed as `parsed`.
    pub fn new(named: Named, parsed: Parsed<T>) -> Input<T> {
        Input { named, parsed }
    }

    /// Input that needs no parsing (offline commands, requests without fields).
    pub fn ok(value: T) -> Input<T> {
        Input { named: Named::default(), parsed: Ok(value) }
    }

    /// A request the edge did not read because its caller was turned away
    /// first (not admitted or not authenticated): nothing was decoded.
    pub fn unread() -> Input<T> {
        Input { named: Named::default(), parsed: Err(Vec::new()) }
    }
}

/// One call in progress: its context and the audit entry being built.
pub(super) struct Call<'a> {
    pub(super) app: &'a App,
    pub(super) ctx: &'a CallContext,
    pub(super) action: Action,
    /// The entry; sequence, previous hash and time are the sequencer's.
    pub(super) entry: AuditEntry,
    /// What the caller's roles allow under the request's purpose (set by [`Call::accept`]).
    pub(super) grant: Grant,
    /// The patient of the coverage the request names, if it exists.
    pub(super) coverage_patient: Option<PatientId>,
    /// A patient's restriction read together with its record (see
    /// `App::fetch`), for the access check to use instead of reading it again.
    pub(super) known_restriction: Option<(PatientId, Option<i64>)>,
    /// Changes that commit with the entry, and only if the call succeeds
    /// (a new break-glass grant, a restriction, a job's state, ...).
    staged: Vec<Change>,
    /// The stored key state the call's keys come from (taken before any key
    /// is used): its commit goes ahead only if the store still holds it.
    key_state: Vec<u8>,
    /// Counts the call's commit as on its way from its start, so that the
    /// pipeline can wait for it to share a sync (see `sequencer::InFlight`).
    expected: crate::storage::Expected,
}

impl App {
    /// Starts an audited call of `action` naming `named`.
    pub(super) async fn call<'a>(&'a self, ctx: &'a CallContext, action: Action, named: Named) -> Call<'a> {
        let entry = AuditEntry {
            actor: ctx.auth.as_ref().map(|p| p.subject.clone()).unwrap_or_default(),
            client_address: ctx.client_address.clone(),
            request_id: ctx.request_id.clone(),
            action: action.as_str().to_string(),
            resource_type: action.resource_type().as_str().to_string(),
            service: ctx.service.clone().unwrap_or_default(),
            purpose: ctx.purpose().map(|p| p.as_str().to_string()).unwrap_or_default(),
            ..AuditEntry::default()
        };
        let mut call = Call {
            app: self,
            ctx,
            action,
            entry,
            grant: Grant::default(),
            coverage_patient: None,
            known_restriction: None,
            staged: Vec::new(),
            key_state: self.keys.raw(),
            expected: self.store.expect_commit(),
        };
        if let Some(c) = named.coverage {
            call.name_coverage(c).await;
        }
        if let Some(p) = named.patient {
            call.name_patient(p);
        }
        call
    }
}

impl Call<'_> {
    /// Records the patient the call is about.
    pub(super) fn name_patient(&mut self, id: PatientId) {
        self.entry.patient_id = id.to_string();
        if matches!(self.action.resource_type(), ResourceType::Patient | ResourceType::Access) {
            self.entry.resource_id = id.to_string();
        }
    }

    /// Records the coverage the call is about, and its patient if it exists.
    async fn name_coverage(&mut self, id: CoverageId) {
        self.entry.resource_id = id.to_string();
        match self.app.head(RecordRef::coverage(id.bytes())).await {
            Ok(Some(h)) => {
                let patient = PatientId::from_bytes(h.patient_id);
                self.coverage_patient = Some(patient);
                self.entry.patient_id = patient.to_string();
            }
            // A missing coverage names no patient; a failed read is logged
            // and the call fails on its own later read.
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "looking up a coverage's patient failed"),
        }
    }

    /// Stages a change that commits with the entry if the call succeeds.
    pub(super) fn stage(&mut self, change: Change) {
        self.staged.push(change);
    }

    /// Admits, authenticates and authorizes the caller, then takes its input.
    ///
    /// Order: the caller's admission (global concurrency cap and its rate, by
    /// subject or by address), the token, the syntax of the purpose and
    /// break-glass headers, the policy decision for the action's permission
    /// under the stated purpose, and only then the input's own violations.
    pub(super) fn accept<T>(&mut self, input: Parsed<T>) -> Result<T, AppError> {
        self.authorize()?;
        match input {
            Ok(v) => Ok(v),
            Err(violations) if violations.is_empty() => {
                tracing::error!("a request that was never read reached its use case");
                Err(AppError::Internal)
            }
            Err(violations) => Err(AppError::InvalidArgument(violations)),
        }
    }

    /// Admits, authenticates and authorizes the caller (see [`Call::accept`]).
    pub(super) fn authorize(&mut self) -> Result<(), AppError> {
        let ctx = self.ctx;
        ctx.admission.map_err(AppError::Limited)?;
        let principal = ctx.auth.as_ref().map_err(|f| AppError::Unauthenticated(*f))?;
        if ctx.purpose.is_err() {
            return Err(AppError::invalid("x-purpose-of-use", crate::error::Description::PURPOSE));
        }
        if ctx.break_glass_reason.is_err() {
            return Err(AppError::invalid("x-break-glass-reason", crate::error::Description::BREAK_GLASS_REASON));
        }
        if ctx.idempotency_key.is_err() {
            return Err(AppError::invalid("x-idempotency-key", crate::error::Description::IDEMPOTENCY_KEY));
        }
        let who = Identity {
            subject: &principal.subject,
            token_roles: &principal.token_roles,
            service: ctx.service.as_deref(),
        };
        let policy = &self.app.access.policy;
        let roles =
            if ctx.local_operator { std::iter::once("key_admin".to_string()).collect() } else { policy.roles_for(who) };
        self.entry.roles = roles.iter().cloned().collect();
        let needed = self.action.required_permission();
        let grant =
            policy.decide(&roles, ctx.purpose(), needed, self.action.is_phi()).map_err(AppError::PermissionDenied)?;
        self.entry.scopes = vec![needed.as_str().to_string()];
        self.grant = grant;
        Ok(())
    }

    /// Ends a call that reads (and commits only its staged changes): the
    /// entry is appended durably, then the result is returned. If the entry
    /// cannot be made durable, the result is discarded (fail closed).
    pub(super) async fn finish<T>(self, result: Result<T, AppError>) -> Result<T, AppError> {
        match result {
            Ok(value) => self.commit(None).await.map(|_| value),
            Err(e) => Err(self.refuse(e).await),
        }
    }

    /// Ends a call whose success is a record write: the write commits with
    /// the entry, or (stale version, changed data key) only the entry does.
    pub(super) async fn finish_write<T>(self, result: Result<(T, RecordWrite), AppError>) -> Result<T, AppError> {
        match result {
            Ok((value, write)) => self.commit(Some(write)).await.map(|_| value),
            Err(e) => Err(self.refuse(e).await),
        }
    }

    /// Ends a create: a new record commits with the entry (see
    /// [`Call::finish_write`]), a replayed one is answered as a read. A new
    /// record's only precondition that can fail is its idempotency key (its
    /// id is new), so a conflict means a concurrent request with the same
    /// key committed first.
    pub(super) async fn finish_create<T>(self, result: Result<super::Created<T>, AppError>) -> Result<T, AppError> {
        match result {
            Ok(super::Created::Replayed(record)) => self.finish(Ok(record)).await,
            Ok(super::Created::New(record, write)) => match self.finish_write(Ok((record, write))).await {
                Err(AppError::Conflict { .. }) => Err(AppError::IdempotencyRace),
                other => other,
            },
            Err(e) => Err(self.refuse(e).await),
        }
    }

    /// Ends a call that succeeded: appends its entry (outcome ok) with its
    /// staged changes and `write`, and returns the committed entry. A failed
    /// precondition commits the entry alone, as `aborted`.
    pub(super) async fn commit(mut self, write: Option<RecordWrite>) -> Result<Committed, AppError> {
        self.entry.outcome = Outcome::Ok.as_str().to_string();
        let mut changes = std::mem::take(&mut self.staged);
        changes.push(Change::KeyStateIs(std::mem::take(&mut self.key_state)));
        let commit = Commit { entry: self.entry, write, changes };
        let committed = self.app.store.commit_expected(commit, self.expected).await;
        let ctx = self.ctx;
        match committed {
            Ok(c) => match c.outcome {
                CommitOutcome::Written => {
                    self.app.log(ctx, self.action, Outcome::Ok, Some(c.sequence));
                    Ok(c)
                }
                CommitOutcome::Conflict { current } => {
                    self.app.log(ctx, self.action, Outcome::Aborted, Some(c.sequence));
                    Err(AppError::Conflict { current })
                }
                CommitOutcome::KeyChanged => {
                    self.app.log(ctx, self.action, Outcome::Aborted, Some(c.sequence));
                    Err(AppError::KeyChanged)
                }
                CommitOutcome::KeyStateMoved => {
                    self.app.log(ctx, self.action, Outcome::Aborted, Some(c.sequence));
                    if let Err(e) = self.app.refresh_keys().await {
                        tracing::error!(error = %e, "taking up the changed key state failed");
                    }
                    Err(AppError::KeyStateMoved)
                }
            },
            Err(e) => {
                self.app.log(ctx, self.action, Outcome::Internal, None);
                Err(audit_unavailable(e))
            }
        }
    }

    /// Audits a failed call and returns its error (or UNAVAILABLE if even
    /// the refusal could not be recorded). Refusals at the door
    /// (unauthenticated, limited) are counted by [`super::refusals`].
    pub(super) async fn refuse(mut self, e: AppError) -> AppError {
        let outcome = e.outcome();
        self.entry.outcome = outcome.as_str().to_string();
        if matches!(e, AppError::Unauthenticated(_) | AppError::Limited(_)) {
            let ctx = self.ctx;
            return match self.app.refusals.account(self.app, ctx, self.action, self.entry).await {
                Ok(seq) => {
                    self.app.log(ctx, self.action, outcome, Some(seq));
                    e
                }
                Err(failed) => {
                    self.app.log(ctx, self.action, outcome, None);
                    audit_unavailable(failed)
                }
            };
        }
        let committed = self.app.store.commit_expected(Commit::entry(self.entry), self.expected).await;
        self.app.log(self.ctx, self.action, outcome, committed.as_ref().ok().map(|c| c.sequence));
        match committed {
            Ok(_) => e,
            Err(failed) => audit_unavailable(failed),
        }
    }
}

impl App {
    /// Audits a call whose body the transport refused to read (too large,
    /// or not one gRPC message): the caller's admission, token and
    /// permission are decided first, as for any call.
    pub async fn refuse_unread(&self, ctx: &CallContext, action: Action, refused: AppError) -> AppError {
        let mut call = self.call(ctx, action, Named::default()).await;
        let e = call.authorize().err().unwrap_or(refused);
        call.refuse(e).await
    }

    /// The request log line: one per call, never PHI.
    pub(super) fn log(&self, ctx: &CallContext, action: Action, outcome: Outcome, audit_seq: Option<u64>) {
        let principal = ctx.subject().unwrap_or("");
        let latency_us = u64::try_from(ctx.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        tracing::info!(
            request_id = %ctx.request_id,
            method = action.as_str(),
            principal,
            service = ctx.service.as_deref().unwrap_or(""),
            outcome = outcome.as_str(),
            audit_seq,
            latency_us,
            "request"
        );
    }
}

pub(super) fn audit_unavailable(e: StorageError) -> AppError {
    if let StorageError::OutcomeUnknown = e {
        tracing::error!("the database did not confirm a commit; the caller is told its outcome is unknown");
        return AppError::OutcomeUnknown;
    }
    tracing::error!(error = %e, "audit commit failed; request failed closed");
    AppError::AuditUnavailable
}
