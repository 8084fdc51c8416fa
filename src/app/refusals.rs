//! Refusals at the door (unauthenticated, rate- or concurrency-limited),
//! audited without letting a flood of them grow the trail one entry a call.
//!
//! Calls are grouped by who was refused (the token subject if the token was
//! valid, else the client's IP address) and why (the outcome). The first
//! refusal of a group gets its own entry at once, like any call. Refusals of
//! the same group in the next [`WINDOW`] are counted, and when the window
//! ends one `access.refused` entry records how many there were, per action
//! (`result_count` = the total; details `window_start=`, `window_end=` in µs
//! and `<action>=<count>` per action). Each of those calls is answered only
//! once that entry is durable, so every refused call is accounted for before
//! its caller learns of the refusal, and a sustained flood writes at most
//! two entries per second per group. Each call still gets its own log line.
//!
//! Refused calls are turned away before their request is read, so these
//! entries name no patient.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::{App, CallContext};
use crate::audit::AuditEntry;
use crate::domain::{Action, Outcome};
use crate::storage::{Commit, StorageError};

/// How long refusals of one group are counted into one entry.
pub const WINDOW: Duration = Duration::from_secs(1);

/// Groups remembered before quiet ones are forgotten.
const MAX_GROUPS: usize = 10_000;

/// Who was refused, and why.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Group {
    outcome: &'static str,
    /// The token subject, or "" when the caller had no valid token.
    actor: String,
    /// The client's IP address (without port) when the caller had no valid token.
    address: String,
}

/// What the window's entry resolved to: its sequence, or a failure to record it.
type Resolved = Option<Result<u64, String>>;

struct Window {
    opened: Instant,
    opened_micros: i64,
    /// Refusals counted after the first (which has its own entry).
    counted: u64,
    per_action: BTreeMap<&'static str, u64>,
    /// Where the window's entry is announced to the calls waiting for it.
    done: watch::Sender<Resolved>,
    /// An example entry of the group (actor, address, service, outcome).
    template: AuditEntry,
}

/// The open windows.
#[derive(Default)]
pub struct Refusals {
    windows: Mutex<HashMap<Group, Window>>,
}

impl Refusals {
    /// Audits one refusal (see the module docs) and returns the sequence of
    /// the entry that accounts for it.
    pub(super) async fn account(
        &self,
        app: &App,
        ctx: &CallContext,
        action: Action,
        entry: AuditEntry,
    ) -> Result<u64, StorageError> {
        let address = match &ctx.auth {
            Ok(_) => String::new(),
            Err(_) => ip_of(&ctx.client_address).to_string(),
        };
        let group = Group { outcome: outcome_str(&entry.outcome), actor: entry.actor.clone(), address };
        let waiting = {
            let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
            if windows.len() >= MAX_GROUPS {
                windows.retain(|_, w| w.counted > 0 || w.opened.elapsed() < WINDOW);
            }
            match windows.get_mut(&group) {
                Some(w) if w.counted > 0 || w.opened.elapsed() < WINDOW => {
                    w.counted += 1;
                    *w.per_action.entry(action.as_str()).or_default() += 1;
                    if w.counted == 1 {
                        tokio::spawn(flush(app.clone(), group.clone(), w.opened + WINDOW));
                    }
                    Some(w.done.subscribe())
                }
                _ => {
                    let (done, _) = watch::channel(None);
                    let template = AuditEntry { request_id: String::new(), ..entry.clone() };
                    let window = Window {
                        opened: Instant::now(),
                        opened_micros: app.now(),
                        counted: 0,
                        per_action: BTreeMap::new(),
                        done,
                        template,
                    };
                    windows.insert(group, window);
                    None
                }
            }
        };
        match waiting {
            None => app.store.commit(Commit::entry(entry)).await.map(|c| c.sequence),
            Some(mut rx) => loop {
                if let Some(resolved) = rx.borrow_and_update().clone() {
                    return resolved.map_err(StorageError::Io);
                }
                if rx.changed().await.is_err() {
                    return Err(StorageError::SequencerGone);
                }
            },
        }
    }
}

/// At the end of a group's window: one entry for every refusal counted in it.
async fn flush(app: App, group: Group, at: Instant) {
    tokio::time::sleep_until(at.into()).await;
    let Some(window) = app.refusals.windows.lock().unwrap_or_else(|p| p.into_inner()).remove(&group) else {
        return;
    };
    let t = window.template;
    let entry = AuditEntry {
        actor: t.actor,
        client_address: if group.address.is_empty() { t.client_address } else { group.address },
        service: t.service,
        action: Action::AccessRefused.as_str().to_string(),
        resource_type: Action::AccessRefused.resource_type().as_str().to_string(),
        outcome: t.outcome,
        result_count: Some(window.counted),
        details: [format!("window_start={}", window.opened_micros), format!("window_end={}", app.now())]
            .into_iter()
            .chain(window.per_action.iter().map(|(a, n)| format!("{a}={n}")))
            .collect(),
        ..AuditEntry::default()
    };
    let result = app.store.commit(Commit::entry(entry)).await.map(|c| c.sequence).map_err(|e| e.to_string());
    if let Err(e) = &result {
        tracing::error!(error = %e, "the entry for refused calls could not be recorded; they fail closed");
    }
    window.done.send_replace(Some(result));
}

/// The IP address of an `ip:port` (or `[ip]:port`) string.
fn ip_of(address: &str) -> &str {
    address.rsplit_once(':').map_or(address, |(ip, _)| ip)
}

fn outcome_str(s: &str) -> &'static str {
    Outcome::parse(s).map_or("", Outcome::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_keeps_its_ip_without_the_port() {
        assert_eq!(ip_of("127.0.0.1:5000"), "127.0.0.1");
        assert_eq!(ip_of("[::1]:5000"), "[::1]");
        assert_eq!(ip_of(""), "");
    }
}
