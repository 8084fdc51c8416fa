//! Patient use cases: create, read, update, soft delete, list, search, history.

use super::Created;
use super::access::{Reach, Visibility, disclose, keep_undisclosed, note_grants};
use super::call::{Call, Input};
use super::{App, CallContext, Opened, internal};
use crate::auth::policy::Grant;
use crate::crypto::{BlindIndexKind, RecordAad, RecordKind};
use crate::domain::{Action, FhirDate, Patient, PatientData, PatientId, normalize};
use crate::error::AppError;
use crate::storage::{Change, IndexKey, RecordRef, RecordWrite};

/// A full replacement of a patient's data at a known version.
pub struct PatientUpdate {
    /// Which patient.
    pub id: PatientId,
    /// The version the caller last read.
    pub expected_version: u64,
    /// New content.
    pub data: PatientData,
}

/// A page of a listing.
pub struct PageRequest {
    /// Maximum patients to return.
    pub page_size: usize,
    /// Continue after this id.
    pub after: Option<PatientId>,
    /// Include deleted patients.
    pub show_deleted: bool,
}

/// One page of patients.
pub struct PatientPage {
    /// The patients.
    pub patients: Vec<Patient>,
    /// Where the next page starts, if there is one.
    pub next_after: Option<PatientId>,
    /// Break-glass grants that made restricted patients visible.
    pub(super) via_grants: Vec<uuid::Uuid>,
}

/// How to search.
pub enum SearchCriterion {
    /// Identifier system + value.
    Identifier {
        /// System.
        system: String,
        /// Value.
        value: String,
    },
    /// Family name + birth date.
    NameBirthDate {
        /// Family name.
        family: String,
        /// Birth date.
        birth_date: FhirDate,
    },
    /// Insurance member id.
    MemberId(String),
}

/// A search.
pub struct SearchRequest {
    /// The criterion.
    pub criterion: SearchCriterion,
    /// Include deleted patients.
    pub show_deleted: bool,
    /// Maximum results.
    pub limit: usize,
}

/// Search results.
pub struct SearchResult {
    /// Matching patients.
    pub patients: Vec<Patient>,
    /// More matched than `limit`.
    pub truncated: bool,
    /// Break-glass grants that made restricted patients visible.
    pub(super) via_grants: Vec<uuid::Uuid>,
}

fn patient_aad(id: PatientId, version: u64) -> RecordAad {
    RecordAad { kind: RecordKind::Patient, record_id: id.bytes(), patient_id: id.bytes(), version }
}

impl App {
    pub(super) fn patient_index_keys(&self, id: PatientId, data: &PatientData) -> Vec<IndexKey> {
        let p = id.bytes();
        let record = RecordRef::patient(p);
        let ring = self.keys.ring();
        let mut keys = Vec::new();
        for ident in &data.identifiers {
            let norm = normalize::identifier_key(&ident.system, &ident.value);
            for (tag, mac) in ring.blind_indexes(BlindIndexKind::Identifier, &norm) {
                keys.push(IndexKey { tag, mac, patient: p, record });
            }
        }
        if let Some(birth) = data.birth_date {
            for name in &data.names {
                let norm = normalize::name_birth_date_key(&name.family, &birth.to_string());
                for (tag, mac) in ring.blind_indexes(BlindIndexKind::NameBirthDate, &norm) {
                    keys.push(IndexKey { tag, mac, patient: p, record });
                }
            }
        }
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// Loads and opens the current version of a patient. A record that fails
    /// to open is read again (see `REOPEN_WAITS`): a re-encryption
    /// batch may have committed, or be being written, between reading the
    /// key and reading the record.
    pub(super) async fn load_patient(&self, id: PatientId) -> Result<Opened<Patient>, AppError> {
        self.load_fetched_patient(id, None).await
    }

    /// [`App::load_patient`], starting from a state already fetched if given
    /// (the second read is always a fresh one).
    async fn load_fetched_patient(
        &self,
        id: PatientId,
        mut fetched: Option<super::Fetched>,
    ) -> Result<Opened<Patient>, AppError> {
        super::reading_again(|| self.load_patient_once(id, fetched.take())).await
    }

    async fn load_patient_once(
        &self,
        id: PatientId,
        fetched: Option<super::Fetched>,
    ) -> Result<Opened<Patient>, AppError> {
        let record = RecordRef::patient(id.bytes());
        let (head, sealed, dek, key_version) = self.current_from(record, fetched).await?;
        let record: Patient = self.open(&dek, &patient_aad(id, head.version), &sealed)?;
        Ok(Opened { record, patient: id, dek, key_version })
    }

    /// Registers a new patient.
    ///
    /// With an `x-idempotency-key`, the create is remembered under it (for
    /// this caller) in the same commit, and a retry with the same key gets
    /// the patient that create made (as it is now) instead of a second one.
    pub async fn create_patient(&self, ctx: &CallContext, input: Input<PatientData>) -> Result<Patient, AppError> {
        let mut call = self.call(ctx, Action::PatientCreate, input.named).await;
        // Shared with every write; an erasure takes it exclusively (see `erasure`).
        let _gate = self.keys.wrap_gate.read().await;
        let result = async {
            let data = call.accept(input.parsed)?;
            let idempotency = ctx.idempotency_hash(RecordKind::Patient);
            if let Some(key) = idempotency
                && let Some(made) = self.store.idempotent(key).await.map_err(super::internal)?
            {
                let id = PatientId::from_bytes(made.id);
                call.name_patient(id);
                call.entry.details.push("idempotent_replay=true".into());
                return Ok(Created::Replayed(self.read_patient(&mut call, id).await?));
            }
            let id = PatientId::new_v7();
            call.name_patient(id);
            if let Some(key) = idempotency {
                call.stage(Change::IdempotencyKey { key, record: RecordRef::patient(id.bytes()) });
            }
            let now = self.now();
            let patient =
                Patient { id: id.into(), version: 1, create_time: now, update_time: now, delete_time: None, data };
            let shreds = self.keys.shreds();
            let (dek, wrapped) = self.keys.ring().new_data_key(&id.bytes(), &shreds).map_err(super::crypto_failure)?;
            let sealed = self.seal(&dek, &patient_aad(id, 1), &patient)?;
            call.entry.record_version = 1;
            call.entry.key_version = self.keys.ring().primary_version();
            let write = RecordWrite {
                record: RecordRef::patient(id.bytes()),
                patient_id: id.bytes(),
                expected_version: 0,
                sealed,
                new_dek: Some(wrapped.0),
                key_generation: 1,
                index_keys: self.patient_index_keys(id, &patient.data),
            };
            Ok(Created::New(show(&mut call, patient), write))
        }
        .await;
        call.finish_create(result).await
    }

    /// Reads a patient's current version.
    pub async fn get_patient(&self, ctx: &CallContext, input: Input<PatientId>) -> Result<Patient, AppError> {
        let mut call = self.call(ctx, Action::PatientRead, input.named).await;
        let result = async {
            let id = call.accept(input.parsed)?;
            self.read_patient(&mut call, id).await
        }
        .await;
        call.finish(result).await
    }

    /// A patient the caller may read, opened and shown as the caller may see
    /// it, with what the call's entry records of it.
    ///
    /// The record and its patient's restriction are read in one lookup
    /// before the access check; nothing is opened until the check passed.
    async fn read_patient(&self, call: &mut Call<'_>, id: PatientId) -> Result<Patient, AppError> {
        let record = RecordRef::patient(id.bytes());
        let fetched = self.fetch(record).await?;
        if let Some(f) = &fetched {
            call.known_restriction = Some((id, f.restricted_since()));
        }
        call.reach(id, Reach::Read, RecordKind::Patient).await?;
        let Some(fetched) = fetched else { return Err(self.missing(record).await) };
        let opened = self.load_fetched_patient(id, Some(fetched)).await?;
        call.entry.record_version = opened.record.version;
        call.entry.key_version = opened.key_version;
        Ok(show(call, opened.record))
    }

    /// Replaces a patient's data if the caller's version is current.
    pub async fn update_patient(&self, ctx: &CallContext, input: Input<PatientUpdate>) -> Result<Patient, AppError> {
        let mut call = self.call(ctx, Action::PatientUpdate, input.named).await;
        // Shared with every write; an erasure takes it exclusively (see `erasure`).
        let _gate = self.keys.wrap_gate.read().await;
        let result = async {
            let upd = call.accept(input.parsed)?;
            call.entry.record_version = upd.expected_version;
            call.reach(upd.id, Reach::Write, RecordKind::Patient).await?;
            let grant = call.grant.clone();
            self.write_patient_version(&mut call, upd.id, upd.expected_version, move |current, now| Patient {
                update_time: now,
                data: keep_undisclosed(&grant, &current.data, upd.data),
                ..current
            })
            .await
        }
        .await;
        call.finish_write(result).await
    }

    /// Soft-deletes a patient at a known version.
    pub async fn delete_patient(&self, ctx: &CallContext, input: Input<(PatientId, u64)>) -> Result<Patient, AppError> {
        let mut call = self.call(ctx, Action::PatientDelete, input.named).await;
        // Shared with every write; an erasure takes it exclusively (see `erasure`).
        let _gate = self.keys.wrap_gate.read().await;
        let result = async {
            let (id, expected) = call.accept(input.parsed)?;
            call.entry.record_version = expected;
            call.reach(id, Reach::Write, RecordKind::Patient).await?;
            self.write_patient_version(&mut call, id, expected, |current, now| Patient {
                update_time: now,
                delete_time: Some(now),
                ..current
            })
            .await
        }
        .await;
        call.finish_write(result).await
    }

    /// The next version of a patient, sealed with the key that opened the current one.
    async fn write_patient_version(
        &self,
        call: &mut Call<'_>,
        id: PatientId,
        expected: u64,
        change: impl FnOnce(Patient, i64) -> Patient,
    ) -> Result<(Patient, RecordWrite), AppError> {
        let Opened { record: current, dek, key_version, .. } = self.load_patient(id).await?;
        if current.delete_time.is_some() {
            return Err(AppError::FailedPrecondition("patient is deleted"));
        }
        if current.version != expected {
            return Err(AppError::Conflict { current: current.version });
        }
        let mut next = change(current, self.now());
        next.version = expected + 1;
        let sealed = self.seal(&dek, &patient_aad(id, next.version), &next)?;
        call.entry.record_version = next.version;
        call.entry.key_version = key_version;
        let write = RecordWrite {
            record: RecordRef::patient(id.bytes()),
            patient_id: id.bytes(),
            expected_version: expected,
            sealed,
            new_dek: None,
            key_generation: dek.generation(),
            index_keys: self.patient_index_keys(id, &next.data),
        };
        Ok((show(call, next), write))
    }

    /// Lists patients in id order.
    pub async fn list_patients(&self, ctx: &CallContext, input: Input<PageRequest>) -> Result<PatientPage, AppError> {
        let mut call = self.call(ctx, Action::PatientList, input.named).await;
        let result = async {
            let req = call.accept(input.parsed)?;
            let mut page = self.list_page(&req, ctx.subject(), &call.grant).await?;
            call.entry.result_count = Some(super::count(page.patients.len()));
            call.entry.returned_patient_ids = page.patients.iter().map(|p| p.id.0.clone()).collect();
            note_grants(&mut call, &page.via_grants);
            page.patients = show_all(&mut call, page.patients);
            Ok(page)
        }
        .await;
        call.finish(result).await
    }

    async fn list_page(
        &self,
        req: &PageRequest,
        subject: Option<&str>,
        grant: &Grant,
    ) -> Result<PatientPage, AppError> {
        // Scan at most this many heads per call so a store full of deleted
        // patients cannot make one call unbounded.
        let scan_budget = req.page_size.saturating_mul(10).max(100);
        let mut patients = Vec::new();
        let mut via_grants = Vec::new();
        let mut after = req.after.map(|a| RecordRef::patient(a.bytes()));
        let mut scanned = 0usize;
        let kind = Some(RecordKind::Patient);
        loop {
            let limit = req.page_size.min(scan_budget - scanned);
            let batch = self.store.heads_after(kind, after, limit).await.map_err(internal)?;
            if batch.is_empty() {
                return Ok(PatientPage { patients, next_after: None, via_grants });
            }
            for (record, _) in &batch {
                scanned += 1;
                after = Some(*record);
                let pid = PatientId::from_bytes(record.id);
                let through = match self.visible(subject, grant, pid).await? {
                    Visibility::Hidden => continue,
                    Visibility::Visible => None,
                    Visibility::ThroughGrant(g) => Some(g),
                };
                let p = self.load_patient(pid).await?.record;
                if req.show_deleted || p.active() {
                    patients.push(p);
                    via_grants.extend(through);
                }
                if patients.len() == req.page_size || scanned >= scan_budget {
                    // There may be more: hand out a token; an empty next page is harmless.
                    let more = !self.store.heads_after(kind, after, 1).await.map_err(internal)?.is_empty();
                    return Ok(PatientPage {
                        patients,
                        next_after: if more { after.map(|r| PatientId::from_bytes(r.id)) } else { None },
                        via_grants,
                    });
                }
            }
        }
    }

    /// Finds patients through the blind indexes.
    pub async fn search_patients(
        &self,
        ctx: &CallContext,
        input: Input<SearchRequest>,
    ) -> Result<SearchResult, AppError> {
        let mut call = self.call(ctx, Action::PatientSearch, input.named).await;
        let result = async {
            let req = call.accept(input.parsed)?;
            let mut r = self.search(&req, ctx.subject(), &call.grant).await?;
            call.entry.result_count = Some(super::count(r.patients.len()));
            call.entry.returned_patient_ids = r.patients.iter().map(|p| p.id.0.clone()).collect();
            note_grants(&mut call, &r.via_grants);
            r.patients = show_all(&mut call, r.patients);
            Ok(r)
        }
        .await;
        call.finish(result).await
    }

    async fn search(
        &self,
        req: &SearchRequest,
        subject: Option<&str>,
        grant: &Grant,
    ) -> Result<SearchResult, AppError> {
        let (kind, normalized) = match &req.criterion {
            SearchCriterion::Identifier { system, value } => {
                (BlindIndexKind::Identifier, normalize::identifier_key(system, value))
            }
            SearchCriterion::NameBirthDate { family, birth_date } => {
                (BlindIndexKind::NameBirthDate, normalize::name_birth_date_key(family, &birth_date.to_string()))
            }
            SearchCriterion::MemberId(m) => (BlindIndexKind::MemberId, normalize::identifier_value(m).into_bytes()),
        };
        let ring = self.keys.ring();
        let mac = ring.blind_index(kind, &normalized);
        // Candidates beyond the limit tell us whether the result was truncated;
        // deleted patients filtered out below need headroom too.
        let candidates = self
            .store
            .blind_lookup(ring.blind_tag(kind), mac, req.limit.saturating_mul(4).saturating_add(1))
            .await
            .map_err(internal)?;
        let mut patients = Vec::new();
        let mut via_grants = Vec::new();
        let mut truncated = false;
        for id in candidates {
            let pid = PatientId::from_bytes(id);
            // The record and its restriction in one lookup; opened only if visible.
            let record = RecordRef::patient(id);
            let fetched = self.fetch(record).await?;
            let restricted = match &fetched {
                Some(f) => f.restricted_since().is_some(),
                None => self.is_restricted(pid).await?,
            };
            let through = match self.visible_given(subject, grant, pid, restricted).await? {
                Visibility::Hidden => continue,
                Visibility::Visible => None,
                Visibility::ThroughGrant(g) => Some(g),
            };
            let Some(fetched) = fetched else { return Err(self.missing(record).await) };
            let p = self.load_fetched_patient(pid, Some(fetched)).await?.record;
            if !req.show_deleted && !p.active() {
                continue;
            }
            if patients.len() == req.limit {
                truncated = true;
                break;
            }
            patients.push(p);
            via_grants.extend(through);
        }
        Ok(SearchResult { patients, truncated, via_grants })
    }

    /// Every version of a patient, oldest first.
    pub async fn patient_history(&self, ctx: &CallContext, input: Input<PatientId>) -> Result<Vec<Patient>, AppError> {
        let mut call = self.call(ctx, Action::PatientHistory, input.named).await;
        let result = async {
            let id = call.accept(input.parsed)?;
            call.reach(id, Reach::Read, RecordKind::Patient).await?;
            let record = RecordRef::patient(id.bytes());
            let head = self.existing(record).await?;
            let (dek, kv) = self.data_key(id).await?;
            let versions = self.store.versions(record).await.map_err(internal)?;
            if super::count(versions.len()) != head.version {
                return Err(AppError::DataLoss);
            }
            let patients = versions
                .iter()
                .map(|(v, sealed)| self.open::<Patient>(&dek, &patient_aad(id, *v), sealed))
                .collect::<Result<Vec<_>, _>>()?;
            let version = head.version;
            call.entry.key_version = kv;
            call.entry.record_version = version;
            call.entry.result_count = Some(super::count(patients.len()));
            Ok(show_all(&mut call, patients))
        }
        .await;
        call.finish(result).await
    }
}

/// What the call's grant discloses of a patient; records the groups.
fn show(call: &mut Call<'_>, p: Patient) -> Patient {
    let (p, groups) = disclose(&call.grant, p);
    for g in groups {
        if !call.entry.disclosed.iter().any(|d| d == g) {
            call.entry.disclosed.push(g.to_string());
        }
    }
    p
}

fn show_all(call: &mut Call<'_>, patients: Vec<Patient>) -> Vec<Patient> {
    patients.into_iter().map(|p| show(call, p)).collect()
}
