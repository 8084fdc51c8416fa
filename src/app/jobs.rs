//! What the key jobs (rewrap, re-encryption, blind-index rotation) share:
//! their state, persisted as JSON (a [`JobName`]'s state) and written in the
//! same commit as each batch; the lease that gives a job one runner among
//! the processes on a store; the audited progress read; the background
//! task; and throttling to a rate.

use std::future::Future;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::call::Input;
use super::{App, CallContext, internal};
use crate::audit::AuditEntry;
use crate::domain::{Action, Outcome};
use crate::error::AppError;
use crate::storage::{Change, Commit, Expect, JobName};

/// How long a job's runner holds it without committing a batch. Every batch
/// renews it; a runner that stops lets go at once; one whose process died
/// loses it when it runs out, and another process takes the job up.
pub const JOB_LEASE: Duration = Duration::from_secs(10);

/// Which process runs a job, until when: written with every batch, so of two
/// processes that take a job up at once only one's first batch commits, and
/// the other, reading the job again, leaves it to the holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The holder's process id (a random UUID per server process).
    pub holder: String,
    /// Until when (µs).
    pub until: i64,
}

/// A job state that carries a lease.
pub(super) trait Leased: Serialize {
    /// The job's id.
    fn id(&self) -> &str;
    /// Its lease.
    fn lease(&self) -> &Option<Lease>;
    /// Replaces its lease.
    fn set_lease(&mut self, lease: Option<Lease>);
}

macro_rules! leased {
    ($($t:ty),*) => {$(
        impl Leased for $t {
            fn id(&self) -> &str {
                &self.id
            }
            fn lease(&self) -> &Option<Lease> {
                &self.lease
            }
            fn set_lease(&mut self, lease: Option<Lease>) {
                self.lease = lease;
            }
        }
    )*};
}
leased!(super::rewrap::RewrapJob, super::reencrypt::ReencryptJob, super::blind::BlindIndexJob);

impl App {
    /// A job's persisted state, if it ever ran.
    pub(super) async fn job_state<T: DeserializeOwned>(&self, name: JobName) -> Result<Option<T>, AppError> {
        match self.store.job(name).await.map_err(internal)? {
            None => Ok(None),
            Some(raw) => serde_json::from_slice(&raw).map(Some).map_err(|_| AppError::DataLoss),
        }
    }

    /// A job's persisted state with its stored bytes: a batch that advances
    /// the job commits only if the state is still those bytes (see [`job_advance`]).
    pub(super) async fn job_state_read<T: DeserializeOwned>(
        &self,
        name: JobName,
    ) -> Result<Option<(T, Vec<u8>)>, AppError> {
        match self.store.job(name).await.map_err(internal)? {
            None => Ok(None),
            Some(raw) => serde_json::from_slice(&raw).map(|job| Some((job, raw))).map_err(|_| AppError::DataLoss),
        }
    }

    /// Whether this process may run a job leased as `lease`: nobody holds
    /// it, this process does, the lease ran out, or the store is this
    /// process's alone (whoever held it before is gone).
    pub(super) fn may_run(&self, lease: &Option<Lease>) -> bool {
        self.store.exclusive() || lease.as_ref().is_none_or(|l| l.holder == *self.process_id || l.until <= self.now())
    }

    /// A lease for this process from now.
    pub(super) fn lease(&self) -> Lease {
        let micros = i64::try_from(JOB_LEASE.as_micros()).unwrap_or(i64::MAX);
        Lease { holder: self.process_id.to_string(), until: self.now().saturating_add(micros) }
    }

    /// At shutdown: lets go of a job this process holds, so another process
    /// takes it up at once (a `batch` entry of 0 with `lease_released=true`).
    pub(super) async fn release_job<T: Leased>(&self, name: JobName, mut job: T, read: Vec<u8>, action: Action) {
        if job.lease().as_ref().is_none_or(|l| l.holder != *self.process_id) {
            return;
        }
        job.set_lease(None);
        let Ok(change) = job_advance(name, &job, read) else { return };
        let entry = AuditEntry {
            actor: "carevault".into(),
            action: action.as_str().into(),
            resource_type: action.resource_type().as_str().into(),
            outcome: Outcome::Ok.as_str().into(),
            details: vec![
                format!("job={}", job.id()),
                "batch=0".into(),
                "lease_released=true".into(),
                format!("runner={}", self.process_id),
            ],
            ..AuditEntry::default()
        };
        if let Err(e) = self.store.commit(Commit { entry, write: None, changes: vec![change] }).await {
            tracing::warn!(error = %e, "could not let go of a key job; another process takes it up when its lease runs out");
        }
    }

    /// A job's state, read by an audited call (`keys.status`).
    pub(super) async fn audited_job_state<T: DeserializeOwned>(
        &self,
        ctx: &CallContext,
        input: Input<()>,
        name: JobName,
    ) -> Result<Option<T>, AppError> {
        let mut call = self.call(ctx, Action::KeysStatus, input.named).await;
        let result = match call.accept(input.parsed) {
            Ok(()) => self.job_state(name).await,
            Err(e) => Err(e),
        };
        call.finish(result).await
    }

    /// Runs a job in the background; an error is logged and the job resumes at the next start.
    pub(super) fn spawn_job<F>(&self, name: &'static str, run: impl FnOnce(App) -> F)
    where
        F: Future<Output = Result<(), AppError>> + Send + 'static,
    {
        let job = run(self.clone());
        tokio::spawn(async move {
            if let Err(e) = job.await {
                tracing::error!(error = %e, job = name, "key job stopped; it resumes at the next start");
            }
        });
    }
}

/// The change that persists a job's state with its batch.
pub(super) fn job_write<T: Serialize>(name: JobName, job: &T) -> Result<Change, AppError> {
    let json = serde_json::to_vec(job).map_err(|_| AppError::Internal)?;
    Ok(Change::Job { name, value: Some(json), expect: Expect::Anything })
}

/// The change that moves a job from the state `read` (its stored bytes)
/// to `next`: it applies only if nobody advanced the job since, so two
/// runners (two processes resuming the same job) never both count or
/// apply one batch; the loser reads the job again and goes on from there.
pub(super) fn job_advance<T: Serialize>(name: JobName, next: &T, read: Vec<u8>) -> Result<Change, AppError> {
    let json = serde_json::to_vec(next).map_err(|_| AppError::Internal)?;
    Ok(Change::Job { name, value: Some(json), expect: Expect::Equal(read) })
}

/// The details of a rewrap or re-encryption job's start entry.
pub(super) fn start_details(id: &str, state: &str, total: u64, max_per_second: u32) -> Vec<String> {
    vec![
        format!("job={id}"),
        format!("state={state}"),
        format!("total={total}"),
        format!("max_per_second={max_per_second}"),
    ]
}

/// Sleeps so that `n` items done since `started` stay under `max_per_second` (0: unlimited).
pub(super) async fn throttle(started: Instant, n: u64, max_per_second: u32) {
    if max_per_second == 0 || n == 0 {
        return;
    }
    let budget = Duration::from_secs_f64(n as f64 / f64::from(max_per_second));
    if let Some(rest) = budget.checked_sub(started.elapsed()) {
        tokio::time::sleep(rest).await;
    }
}
