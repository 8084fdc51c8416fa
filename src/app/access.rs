//! Patient-level access: restricted (confidential) patients, break-glass
//! grants and their review queue, and minimum-necessary disclosure (field
//! groups, SSN masking).
//!
//! A restricted patient is reachable only by callers holding
//! `restricted.access`, or through an unexpired break-glass grant. Everyone
//! else gets exactly what a missing patient looks like (NOT_FOUND), from
//! reads, writes, listings, searches and coverage calls alike; the audit entry
//! says `permission_denied`.
//!
//! Break-glass: a caller holding `break_glass` who sends purpose ETREAT and an
//! `x-break-glass-reason` gets a grant for that one patient, for a limited time
//! (read-only). The grant is stored with the reason sealed under the notes key
//! (never in the audit entry, which carries the grant id) and waits in the
//! review queue until a compliance officer other than its holder reviews it.

use serde::{Deserialize, Serialize};

use super::call::{Call, Input};
use super::{App, CallContext, internal};
use crate::auth::policy::{Grant, Permission, Purpose};
use crate::crypto::{self, RecordKind};
use crate::domain::{Action, IdentifierType, Patient, PatientData, PatientId};
use crate::error::AppError;
use crate::storage::{Change, Expect, RecordRef};

/// Grants or tombstones read per page when scanning them all.
const SCAN_PAGE: usize = 512;

/// The FHIR identifier system of US social security numbers.
pub const SSN_SYSTEM: &str = "http://hl7.org/fhir/sid/us-ssn";

/// Field group names recorded in audit entries.
pub mod groups {
    /// Names, gender, birth date, identifiers other than SSN, language.
    pub const IDENTITY: &str = "identity";
    /// Telecom, addresses, contacts.
    pub const CONTACT: &str = "contact";
    /// The full SSN.
    pub const SSN: &str = "ssn";
    /// The SSN masked to its last four digits.
    pub const SSN_MASKED: &str = "ssn_masked";
    /// Coverage records.
    pub const INSURANCE: &str = "insurance";
}

/// A stored break-glass grant (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct GrantRecord {
    id: String,
    subject: String,
    service: String,
    patient_id: String,
    granted_at: i64,
    expires_at: i64,
    /// `Keyring::seal_note` of the reason, base64; context "<id>/reason".
    reason: String,
    review: Option<ReviewRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ReviewRecord {
    reviewer: String,
    reviewed_at: i64,
    /// `Keyring::seal_note` of the note, base64; context "<id>/review".
    note: String,
}

/// A break-glass grant as compliance staff see it (reason decrypted).
#[derive(Debug, Clone)]
pub struct BreakGlassGrant {
    /// Grant id.
    pub id: String,
    /// Who broke the glass.
    pub subject: String,
    /// Through which service ("" without mTLS).
    pub service: String,
    /// Which patient.
    pub patient_id: String,
    /// When, µs.
    pub granted_at: i64,
    /// Until, µs.
    pub expires_at: i64,
    /// The stated reason.
    pub reason: String,
    /// The review, once done.
    pub review: Option<GrantReview>,
}

/// A completed review.
#[derive(Debug, Clone)]
pub struct GrantReview {
    /// Reviewer's subject.
    pub reviewer: String,
    /// When, µs.
    pub reviewed_at: i64,
    /// The reviewer's note.
    pub note: String,
}

/// Which grants to list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReviewFilter {
    /// Awaiting review.
    Pending,
    /// Already reviewed.
    Reviewed,
    /// Both.
    All,
}

/// A page request over grants.
pub struct GrantsRequest {
    /// Which grants.
    pub filter: ReviewFilter,
    /// At most this many.
    pub page_size: usize,
    /// Continue after this grant id.
    pub after: Option<uuid::Uuid>,
}

/// A page of grants.
pub struct GrantPage {
    /// Oldest first.
    pub grants: Vec<BreakGlassGrant>,
    /// Continue after this id, if there may be more.
    pub next_after: Option<uuid::Uuid>,
}

/// Whether a listing may show a patient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Visibility {
    Visible,
    /// Only through this unexpired break-glass grant.
    ThroughGrant(uuid::Uuid),
    Hidden,
}

/// Records on the entry the break-glass grants a listing relied on.
pub(super) fn note_grants(call: &mut Call<'_>, grants: &[uuid::Uuid]) {
    if let Some(first) = grants.first() {
        call.entry.break_glass = first.to_string();
        call.entry.scopes.push(Permission::BreakGlass.as_str().to_string());
        call.entry.details.extend(grants.iter().map(|g| format!("break_glass_grant={g}")));
    }
}

/// Whether an access reads or changes the patient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reach {
    Read,
    Write,
}

/// The masked form of an SSN: `***-**-` and its last four digits.
pub fn mask_ssn(value: &str) -> String {
    let digits: Vec<char> = value.chars().filter(char::is_ascii_digit).collect();
    let tail: String = if digits.len() >= 4 { digits[digits.len() - 4..].iter().collect() } else { "****".into() };
    format!("***-**-{tail}")
}

fn is_ssn(i: &crate::domain::Identifier) -> bool {
    i.r#type == Some(IdentifierType::Ss) || i.system == SSN_SYSTEM
}

/// What of a patient the grant discloses: the patient with undisclosed
/// groups removed or masked, and the groups disclosed.
pub(super) fn disclose(grant: &Grant, mut p: Patient) -> (Patient, Vec<&'static str>) {
    let mut shown = Vec::new();
    let d = &mut p.data;
    if grant.has(Permission::FieldsIdentity) {
        shown.push(groups::IDENTITY);
        if d.identifiers.iter().any(is_ssn) {
            if grant.has(Permission::FieldsSsn) {
                shown.push(groups::SSN);
            } else {
                shown.push(groups::SSN_MASKED);
                for i in d.identifiers.iter_mut().filter(|i| is_ssn(i)) {
                    i.value = mask_ssn(&i.value);
                }
            }
        }
    } else {
        // Without the identity group only the id and metadata are returned.
        d.identifiers.clear();
        d.names.clear();
        d.gender = None;
        d.birth_date = None;
        d.preferred_language = None;
    }
    if grant.has(Permission::FieldsContact) {
        shown.push(groups::CONTACT);
    } else {
        d.telecom.clear();
        d.addresses.clear();
        d.contacts.clear();
    }
    (p, shown)
}

/// A caller cannot mean to change what it cannot see: groups the grant does
/// not disclose keep their stored values, and an SSN sent back in its masked
/// form keeps the stored SSN.
pub(super) fn keep_undisclosed(grant: &Grant, stored: &PatientData, mut new: PatientData) -> PatientData {
    if !grant.has(Permission::FieldsContact) {
        new.telecom = stored.telecom.clone();
        new.addresses = stored.addresses.clone();
        new.contacts = stored.contacts.clone();
    }
    if !grant.has(Permission::FieldsIdentity) {
        new.identifiers = stored.identifiers.clone();
        new.names = stored.names.clone();
        new.gender = stored.gender;
        new.birth_date = stored.birth_date;
        new.preferred_language = stored.preferred_language.clone();
    } else if !grant.has(Permission::FieldsSsn) {
        for i in new.identifiers.iter_mut().filter(|i| is_ssn(i)) {
            if let Some(old) = stored.identifiers.iter().find(|o| is_ssn(o) && mask_ssn(&o.value) == i.value) {
                i.value = old.value.clone();
            }
        }
    }
    new
}

pub(super) fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub(super) fn unb64(s: &str) -> Result<Vec<u8>, AppError> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).map_err(|_| AppError::DataLoss)
}

impl App {
    /// True when the patient is flagged restricted.
    pub(super) async fn is_restricted(&self, patient: PatientId) -> Result<bool, AppError> {
        Ok(self.store.restricted_since(patient.bytes()).await.map_err(internal)?.is_some())
    }

    /// The subject's unexpired break-glass grant for `patient`, if any.
    async fn active_grant(&self, subject: &str, patient: PatientId) -> Result<Option<uuid::Uuid>, AppError> {
        let found =
            self.store.active_grant(crypto::sha256(subject.as_bytes()), patient.bytes()).await.map_err(internal)?;
        Ok(found.filter(|(_, expires)| *expires > self.now()).map(|(id, _)| uuid::Uuid::from_bytes(id)))
    }

    /// May this caller see `patient` in a listing or search result? (Never
    /// creates a grant.)
    pub(super) async fn visible(
        &self,
        subject: Option<&str>,
        grant: &Grant,
        patient: PatientId,
    ) -> Result<Visibility, AppError> {
        if grant.has(Permission::RestrictedAccess) {
            return Ok(Visibility::Visible);
        }
        let restricted = self.is_restricted(patient).await?;
        self.visible_given(subject, grant, patient, restricted).await
    }

    /// [`App::visible`], with whether the patient is restricted already read.
    pub(super) async fn visible_given(
        &self,
        subject: Option<&str>,
        grant: &Grant,
        patient: PatientId,
        restricted: bool,
    ) -> Result<Visibility, AppError> {
        if grant.has(Permission::RestrictedAccess) || !restricted {
            return Ok(Visibility::Visible);
        }
        match subject {
            Some(s) if grant.has(Permission::BreakGlass) => {
                Ok(self.active_grant(s, patient).await?.map_or(Visibility::Hidden, Visibility::ThroughGrant))
            }
            _ => Ok(Visibility::Hidden),
        }
    }

    /// Every patient tombstone (the ones that carry a sealed reason), page by page.
    async fn patient_tombstones(&self) -> Result<Vec<([u8; 16], Vec<u8>)>, AppError> {
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let page = self.store.tombstones_after(RecordKind::Patient, after, SCAN_PAGE).await.map_err(internal)?;
            after = page.last().map(|(id, _)| *id);
            let done = page.len() < SCAN_PAGE;
            out.extend(page);
            if done {
                return Ok(out);
            }
        }
    }

    /// Every break-glass grant, page by page.
    async fn all_grants(&self) -> Result<Vec<([u8; 16], Vec<u8>)>, AppError> {
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let page = self.store.grants_after(after, SCAN_PAGE).await.map_err(internal)?;
            after = page.last().map(|(id, _)| *id);
            let done = page.len() < SCAN_PAGE;
            out.extend(page);
            if done {
                return Ok(out);
            }
        }
    }

    /// The master version of every sealed note (break-glass reasons, review
    /// notes, erasure reasons).
    pub(super) async fn note_versions(&self) -> Result<Vec<u32>, AppError> {
        let mut out = Vec::new();
        for (_, raw) in self.patient_tombstones().await? {
            let tomb: super::erasure::Tombstone = serde_json::from_slice(&raw).map_err(|_| AppError::DataLoss)?;
            if let Some(sealed) = tomb.reason {
                out.push(crypto::Keyring::note_version(&unb64(&sealed)?).map_err(|_| AppError::DataLoss)?);
            }
        }
        for (_, raw) in self.all_grants().await? {
            let rec: GrantRecord = serde_json::from_slice(&raw).map_err(|_| AppError::DataLoss)?;
            let sealed = std::iter::once(&rec.reason).chain(rec.review.as_ref().map(|r| &r.note));
            for s in sealed {
                out.push(crypto::Keyring::note_version(&unb64(s)?).map_err(|_| AppError::DataLoss)?);
            }
        }
        Ok(out)
    }

    /// Up to `max` notes re-sealed under `target` (each applied only if the
    /// record holding it is unchanged when the batch commits).
    pub(super) async fn rewrap_notes(&self, target: u32, max: usize) -> Result<Vec<Change>, AppError> {
        let ring = self.keys.ring();
        let mut writes = Vec::new();
        for (id, raw) in self.patient_tombstones().await? {
            let mut tomb: super::erasure::Tombstone = serde_json::from_slice(&raw).map_err(|_| AppError::DataLoss)?;
            let Some(reason) = &tomb.reason else { continue };
            let sealed = unb64(reason)?;
            if crypto::Keyring::note_version(&sealed).map_err(|_| AppError::DataLoss)? == target {
                continue;
            }
            let context = format!("{}/erasure", tomb.patient);
            tomb.reason = Some(b64(&ring.reseal_note(context.as_bytes(), &sealed).map_err(super::crypto_failure)?));
            let value = serde_json::to_vec(&tomb).map_err(|_| AppError::Internal)?;
            writes.push(Change::Tombstone { record: RecordRef::patient(id), value, expect: Expect::Equal(raw) });
            if writes.len() == max {
                return Ok(writes);
            }
        }
        for (id, raw) in self.all_grants().await? {
            let mut rec: GrantRecord = serde_json::from_slice(&raw).map_err(|_| AppError::DataLoss)?;
            let mut changed = false;
            let mut reseal = |field: &mut String, context: String| -> Result<(), AppError> {
                let sealed = unb64(field)?;
                if crypto::Keyring::note_version(&sealed).map_err(|_| AppError::DataLoss)? != target {
                    *field = b64(&ring.reseal_note(context.as_bytes(), &sealed).map_err(super::crypto_failure)?);
                    changed = true;
                }
                Ok(())
            };
            reseal(&mut rec.reason, format!("{}/reason", rec.id))?;
            if let Some(r) = rec.review.as_mut() {
                reseal(&mut r.note, format!("{}/review", rec.id))?;
            }
            if changed {
                let value = serde_json::to_vec(&rec).map_err(|_| AppError::Internal)?;
                writes.push(Change::Grant { id, value, expect: Expect::Equal(raw) });
                if writes.len() == max {
                    break;
                }
            }
        }
        Ok(writes)
    }

    /// Flags a patient restricted, or clears the flag.
    pub async fn set_restriction(&self, ctx: &CallContext, input: Input<(PatientId, bool)>) -> Result<bool, AppError> {
        let mut call = self.call(ctx, Action::AccessRestrict, input.named).await;
        let result = async {
            let (id, restricted) = call.accept(input.parsed)?;
            call.entry.details.push(format!("restricted={restricted}"));
            self.existing(RecordRef::patient(id.bytes())).await?;
            call.stage(Change::Restriction { patient: id.bytes(), since: restricted.then(|| self.now()) });
            Ok(restricted)
        }
        .await;
        call.finish(result).await
    }

    async fn load_grant(&self, id: &uuid::Uuid) -> Result<Option<(Vec<u8>, GrantRecord)>, AppError> {
        let Some(raw) = self.store.grant(*id.as_bytes()).await.map_err(internal)? else { return Ok(None) };
        let rec: GrantRecord = serde_json::from_slice(&raw).map_err(|_| AppError::DataLoss)?;
        Ok(Some((raw, rec)))
    }

    fn reveal(&self, rec: GrantRecord) -> Result<BreakGlassGrant, AppError> {
        let open = |ctx: String, b: &str| -> Result<String, AppError> {
            let plain = self.keys.ring().open_note(ctx.as_bytes(), &unb64(b)?).map_err(super::crypto_failure)?;
            String::from_utf8(plain.to_vec()).map_err(|_| AppError::DataLoss)
        };
        let reason = open(format!("{}/reason", rec.id), &rec.reason)?;
        let review = match rec.review {
            Some(r) => Some(GrantReview {
                note: open(format!("{}/review", rec.id), &r.note)?,
                reviewer: r.reviewer,
                reviewed_at: r.reviewed_at,
            }),
            None => None,
        };
        Ok(BreakGlassGrant {
            id: rec.id,
            subject: rec.subject,
            service: rec.service,
            patient_id: rec.patient_id,
            granted_at: rec.granted_at,
            expires_at: rec.expires_at,
            reason,
            review,
        })
    }

    /// Lists break-glass grants, oldest first (the review queue).
    pub async fn list_grants(&self, ctx: &CallContext, input: Input<GrantsRequest>) -> Result<GrantPage, AppError> {
        let mut call = self.call(ctx, Action::BreakGlassList, input.named).await;
        let result = async {
            let req = call.accept(input.parsed)?;
            let page = self.grant_page(&req).await?;
            call.entry.result_count = Some(super::count(page.grants.len()));
            call.entry.details = page.grants.iter().map(|g| format!("grant={}", g.id)).collect();
            Ok(page)
        }
        .await;
        call.finish(result).await
    }

    async fn grant_page(&self, req: &GrantsRequest) -> Result<GrantPage, AppError> {
        let mut grants = Vec::new();
        let mut next_after = None;
        let all = self.all_grants().await?;
        for (id, v) in all {
            let id = uuid::Uuid::from_bytes(id);
            if req.after.is_some_and(|a| id <= a) {
                continue;
            }
            let rec: GrantRecord = serde_json::from_slice(&v).map_err(|_| AppError::DataLoss)?;
            let keep = match req.filter {
                ReviewFilter::Pending => rec.review.is_none(),
                ReviewFilter::Reviewed => rec.review.is_some(),
                ReviewFilter::All => true,
            };
            if !keep {
                continue;
            }
            if grants.len() == req.page_size {
                next_after = grants.last().and_then(|g: &BreakGlassGrant| uuid::Uuid::parse_str(&g.id).ok());
                break;
            }
            grants.push(self.reveal(rec)?);
        }
        Ok(GrantPage { grants, next_after })
    }

    /// Marks a grant reviewed with a note. Nobody reviews their own grant.
    pub async fn review_grant(
        &self,
        ctx: &CallContext,
        input: Input<(uuid::Uuid, String)>,
    ) -> Result<BreakGlassGrant, AppError> {
        let mut call = self.call(ctx, Action::BreakGlassReview, input.named).await;
        let result = async {
            let (id, note) = call.accept(input.parsed)?;
            call.entry.resource_id = id.to_string();
            let (raw, mut rec) = self.load_grant(&id).await?.ok_or(AppError::NotFound("break-glass grant"))?;
            call.entry.patient_id = rec.patient_id.clone();
            if rec.review.is_some() {
                return Err(AppError::FailedPrecondition("break-glass grant is already reviewed"));
            }
            if Some(rec.subject.as_str()) == ctx.subject() {
                return Err(AppError::Forbidden(
                    "a break-glass grant must be reviewed by someone other than its holder",
                ));
            }
            let sealed = self
                .keys
                .ring()
                .seal_note(format!("{id}/review").as_bytes(), note.as_bytes())
                .map_err(super::crypto_failure)?;
            rec.review = Some(ReviewRecord {
                reviewer: ctx.subject().unwrap_or_default().to_string(),
                reviewed_at: self.now(),
                note: b64(&sealed),
            });
            let value = serde_json::to_vec(&rec).map_err(|_| AppError::Internal)?;
            // Opened before the commit: an "ok" review entry means the reviewer got the grant back.
            let revealed = self.reveal(rec)?;
            call.stage(Change::Grant { id: *id.as_bytes(), value, expect: Expect::Equal(raw) });
            Ok(revealed)
        }
        .await;
        call.finish(result).await
    }
}

impl Call<'_> {
    /// Checks that the caller may reach `patient` (see the module docs).
    /// `named` is what the request named (the patient, or one of its
    /// coverages): a refusal looks exactly like that record missing. A new
    /// break-glass grant is staged and commits with the entry.
    pub(super) async fn reach(&mut self, patient: PatientId, how: Reach, named: RecordKind) -> Result<(), AppError> {
        let app = self.app;
        let restricted = match self.known_restriction.take() {
            Some((known, since)) if known == patient => since.is_some(),
            _ => app.is_restricted(patient).await?,
        };
        if !restricted {
            // A break-glass read without a reason is refused for a missing
            // patient exactly as for a restricted one, so the answer never
            // tells which of the two an id is.
            if self.breaking_without_reason(how) && app.head(RecordRef::patient(patient.bytes())).await?.is_none() {
                return Err(needs_reason());
            }
            return Ok(());
        }
        if self.grant.has(Permission::RestrictedAccess) {
            self.entry.scopes.push(Permission::RestrictedAccess.as_str().to_string());
            return Ok(());
        }
        let breaking = self.breaking(how);
        let subject = self.ctx.subject().ok_or(AppError::Internal)?;
        if !breaking {
            return Err(AppError::Hidden(kind_name(named)));
        }
        if let Some(id) = app.active_grant(subject, patient).await? {
            self.entry.break_glass = id.to_string();
            self.entry.scopes.push(Permission::BreakGlass.as_str().to_string());
            return Ok(());
        }
        let Ok(Some(reason)) = &self.ctx.break_glass_reason else { return Err(needs_reason()) };
        let id = uuid::Uuid::now_v7();
        let now = app.now();
        let sealed = app
            .keys
            .ring()
            .seal_note(format!("{id}/reason").as_bytes(), reason.as_bytes())
            .map_err(super::crypto_failure)?;
        let record = GrantRecord {
            id: id.to_string(),
            subject: subject.to_string(),
            service: self.ctx.service.clone().unwrap_or_default(),
            patient_id: patient.to_string(),
            granted_at: now,
            expires_at: now.saturating_add(app.access.break_glass_micros),
            reason: b64(&sealed),
            review: None,
        };
        let value = serde_json::to_vec(&record).map_err(|_| AppError::Internal)?;
        self.stage(Change::Grant { id: *id.as_bytes(), value, expect: Expect::Absent });
        self.stage(Change::ActiveGrant {
            subject: crypto::sha256(subject.as_bytes()),
            patient: patient.bytes(),
            grant: *id.as_bytes(),
            expires: record.expires_at,
        });
        self.entry.break_glass = id.to_string();
        self.entry.scopes.push(Permission::BreakGlass.as_str().to_string());
        self.entry.details.push("break_glass=granted".into());
        self.entry.details.push(format!("break_glass_expires={}", record.expires_at));
        Ok(())
    }

    /// Checks that the caller may reach the patient a coverage belongs to;
    /// a missing coverage is NOT_FOUND (or, for a break-glass read without a
    /// reason, the same refusal a restricted patient's coverage gets).
    pub(super) async fn reach_coverage(
        &mut self,
        id: crate::domain::CoverageId,
        how: Reach,
    ) -> Result<PatientId, AppError> {
        let record = RecordRef::coverage(id.bytes());
        let patient = match self.coverage_patient {
            Some(p) => p,
            None => match self.app.head(record).await? {
                Some(h) => PatientId::from_bytes(h.patient_id),
                None if self.breaking_without_reason(how) => return Err(needs_reason()),
                None => return Err(self.app.missing(record).await),
            },
        };
        self.entry.patient_id = patient.to_string();
        self.reach(patient, how, RecordKind::Coverage).await?;
        Ok(patient)
    }

    /// A read by a break-glass holder under purpose ETREAT.
    fn breaking(&self, how: Reach) -> bool {
        how == Reach::Read && self.grant.has(Permission::BreakGlass) && self.ctx.purpose() == Some(Purpose::ETREAT)
    }

    fn breaking_without_reason(&self, how: Reach) -> bool {
        self.breaking(how) && matches!(self.ctx.break_glass_reason, Ok(None))
    }
}

fn needs_reason() -> AppError {
    AppError::Forbidden("break-glass access needs a reason: send x-break-glass-reason with purpose ETREAT")
}

fn kind_name(kind: RecordKind) -> &'static str {
    match kind {
        RecordKind::Patient => "patient",
        RecordKind::Coverage => "coverage",
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::domain::Identifier;

    fn grant(perms: &[Permission]) -> Grant {
        Grant { permissions: perms.iter().copied().collect::<BTreeSet<_>>() }
    }

    fn data(ssn: &str) -> PatientData {
        PatientData {
            identifiers: vec![
                Identifier { system: SSN_SYSTEM.into(), value: ssn.into(), r#type: Some(IdentifierType::Ss) },
                Identifier { system: "urn:mrn".into(), value: "MRN-1".into(), r#type: Some(IdentifierType::Mr) },
            ],
            names: vec![],
            gender: None,
            birth_date: None,
            telecom: vec![crate::domain::ContactPoint {
                system: crate::domain::ContactPointSystem::Phone,
                value: "555".into(),
                contact_use: None,
            }],
            addresses: vec![],
            preferred_language: None,
            contacts: vec![],
        }
    }

    fn patient(ssn: &str) -> Patient {
        Patient {
            id: crate::domain::patient::PatientIdText("x".into()),
            version: 1,
            create_time: 0,
            update_time: 0,
            delete_time: None,
            data: data(ssn),
        }
    }

    #[test]
    fn ssns_are_masked_to_the_last_four_digits() {
        assert_eq!(mask_ssn("123-45-6789"), "***-**-6789");
        assert_eq!(mask_ssn("123456789"), "***-**-6789");
        assert_eq!(mask_ssn("12"), "***-**-****");
    }

    #[test]
    fn without_fields_ssn_the_ssn_is_masked_and_the_groups_say_so() {
        let (p, groups) =
            disclose(&grant(&[Permission::FieldsIdentity, Permission::FieldsContact]), patient("123-45-6789"));
        assert_eq!(p.data.identifiers[0].value, "***-**-6789");
        assert_eq!(p.data.identifiers[1].value, "MRN-1");
        assert_eq!(groups, vec!["identity", "ssn_masked", "contact"]);
        let (p, groups) =
            disclose(&grant(&[Permission::FieldsIdentity, Permission::FieldsSsn]), patient("123-45-6789"));
        assert_eq!(p.data.identifiers[0].value, "123-45-6789");
        assert!(p.data.telecom.is_empty());
        assert_eq!(groups, vec!["identity", "ssn"]);
    }

    #[test]
    fn an_update_cannot_clobber_what_the_caller_cannot_see() {
        let g = grant(&[Permission::FieldsIdentity]);
        let stored = data("123-45-6789");
        let mut sent = data("***-**-6789");
        sent.telecom.clear();
        let kept = keep_undisclosed(&g, &stored, sent);
        assert_eq!(kept.identifiers[0].value, "123-45-6789");
        assert_eq!(kept.telecom, stored.telecom);
        // A full new SSN is a real change and is kept as sent.
        let changed = keep_undisclosed(&g, &stored, data("987-65-4321"));
        assert_eq!(changed.identifiers[0].value, "987-65-4321");
    }
}
