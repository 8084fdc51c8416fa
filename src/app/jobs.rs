//! What the key jobs (rewrap, re-encryption, blind-index rotation) share:
//! their state, persisted as JSON (a [`JobName`]'s state) and written in the
//! same commit as each batch; the audited progress read; the background
//! task; and throttling to a rate.

use std::future::Future;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::call::Input;
use super::{App, CallContext, internal};
use crate::domain::Action;
use crate::error::AppError;
use crate::storage::{Change, Expect, JobName};

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
