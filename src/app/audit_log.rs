//! Audit trail queries: filtered listing, export and head. Each is itself audited.

use super::call::Input;
use super::{App, CallContext, internal};
use crate::audit::AuditEntry;
use crate::domain::{Action, Outcome, PatientId};
use crate::error::AppError;

/// Most entries examined by one ListAuditEvents call; the page token resumes the scan.
pub const SCAN_BUDGET: usize = 20_000;

/// Filters for listing audit events; `None` matches anything.
pub struct AuditFilter {
    /// Entries naming this patient (as subject or among returned patients).
    pub patient: Option<PatientId>,
    /// Actor (token subject).
    pub actor: Option<String>,
    /// Action string, e.g. "patient.read".
    pub action: Option<String>,
    /// Outcome.
    pub outcome: Option<Outcome>,
    /// Earliest time (inclusive), micros.
    pub start_micros: Option<i64>,
    /// Latest time (exclusive), micros.
    pub end_micros: Option<i64>,
    /// Maximum events.
    pub page_size: usize,
    /// First sequence to examine.
    pub from_sequence: u64,
}

impl AuditFilter {
    fn matches(&self, e: &AuditEntry) -> bool {
        self.actor.as_ref().is_none_or(|a| *a == e.actor)
            && self.action.as_ref().is_none_or(|a| *a == e.action)
            && self.outcome.is_none_or(|o| o.as_str() == e.outcome)
            && self.start_micros.is_none_or(|t| e.time_micros >= t)
            && self.end_micros.is_none_or(|t| e.time_micros < t)
    }
}

/// A page of decoded events with their stored hashes.
pub struct AuditPage {
    /// Matching entries.
    pub events: Vec<(AuditEntry, [u8; 32])>,
    /// Where to continue, if the scan did not reach the head.
    pub next_sequence: Option<u64>,
}

/// An authorized, audited export: stream entries `from..=to`.
pub struct ExportStart {
    /// First sequence requested.
    pub from: u64,
    /// The export's own audit entry (the head when it was authorized).
    pub to: u64,
}

impl App {
    /// Lists audit events matching a filter.
    pub async fn list_audit_events(&self, ctx: &CallContext, input: Input<AuditFilter>) -> Result<AuditPage, AppError> {
        let mut call = self.call(ctx, Action::AuditList, input.named).await;
        let result = async {
            let filter = call.accept(input.parsed)?;
            let head = self.store.audit_head().await.map_err(internal)?.map_or(0, |(seq, _)| seq);
            let page = self.scan_audit(&filter, head).await?;
            call.entry.result_count = Some(super::count(page.events.len()));
            Ok(page)
        }
        .await;
        call.finish(result).await
    }

    /// Examines entries from the filter's start (only those naming its
    /// patient, if it names one) up to `head`, at most [`SCAN_BUDGET`] of them.
    async fn scan_audit(&self, f: &AuditFilter, head: u64) -> Result<AuditPage, AppError> {
        const PAGE: usize = 512;
        let mut events = Vec::new();
        let mut examined = 0usize;
        let mut next = f.from_sequence;
        while next <= head {
            let stored = match f.patient {
                Some(p) => {
                    let seqs = self.store.audit_seqs_for_patient(p.bytes(), next, PAGE).await.map_err(internal)?;
                    let mut out = Vec::with_capacity(seqs.len());
                    for seq in seqs.into_iter().filter(|s| *s <= head) {
                        out.extend(self.store.audit_entry(seq).await.map_err(internal)?);
                    }
                    out
                }
                None => self.store.audit_entries(next, head, PAGE).await.map_err(internal)?,
            };
            if stored.is_empty() {
                break;
            }
            for e in stored {
                if events.len() == f.page_size || examined == SCAN_BUDGET {
                    return Ok(AuditPage { events, next_sequence: Some(e.sequence) });
                }
                examined += 1;
                next = e.sequence + 1;
                let entry = AuditEntry::decode(&e.bytes).map_err(|_| AppError::DataLoss)?;
                if f.matches(&entry) {
                    events.push((entry, e.hash));
                }
            }
        }
        Ok(AuditPage { events, next_sequence: None })
    }

    /// Authorizes and audits an export; the caller then streams `from..=to`.
    pub async fn start_export(&self, ctx: &CallContext, input: Input<u64>) -> Result<ExportStart, AppError> {
        let mut call = self.call(ctx, Action::AuditExport, input.named).await;
        match call.accept(input.parsed) {
            Ok(from) => call.commit(None).await.map(|c| ExportStart { from, to: c.sequence }),
            Err(e) => Err(call.refuse(e).await),
        }
    }

    /// The head of the chain, which is this call's own audit entry.
    pub async fn audit_head(&self, ctx: &CallContext, input: Input<()>) -> Result<(u64, [u8; 32]), AppError> {
        let mut call = self.call(ctx, Action::AuditHead, input.named).await;
        match call.accept(input.parsed) {
            Ok(()) => call.commit(None).await.map(|c| (c.sequence, c.hash)),
            Err(e) => Err(call.refuse(e).await),
        }
    }
}
