//! Coverage use cases: insurance records linked to a patient, sealed under
//! that patient's data key.

use super::Created;
use super::access::{Reach, groups};
use super::call::{Call, Input};
use super::{App, CallContext, Fetched, Opened, internal};
use crate::crypto::{BlindIndexKind, RecordAad, RecordKind};
use crate::domain::patient::PatientIdText;
use crate::domain::{Action, CalendarDate, Coverage, CoverageData, CoverageId, PatientId, normalize};
use crate::error::AppError;
use crate::storage::{Change, CoveragesNow, IndexKey, RecordRef, RecordWrite};

/// A new coverage for a patient.
pub struct CoverageCreate {
    /// The patient covered.
    pub patient_id: PatientId,
    /// Content.
    pub data: CoverageData,
}

/// A full replacement of a coverage at a known version.
pub struct CoverageUpdate {
    /// Which coverage.
    pub id: CoverageId,
    /// The version last read.
    pub expected_version: u64,
    /// If given, must equal the stored patient (a coverage cannot move).
    pub patient_id: Option<PatientId>,
    /// New content.
    pub data: CoverageData,
}

fn coverage_aad(id: CoverageId, patient: PatientId, version: u64) -> RecordAad {
    RecordAad { kind: RecordKind::Coverage, record_id: id.bytes(), patient_id: patient.bytes(), version }
}

impl App {
    pub(super) fn coverage_index_keys(&self, id: CoverageId, patient: PatientId, c: &Coverage) -> Vec<IndexKey> {
        if c.delete_time.is_some() || c.data.subscriber_id.is_empty() {
            return Vec::new();
        }
        let norm = normalize::identifier_value(&c.data.subscriber_id);
        let ring = self.keys.ring();
        let record = RecordRef::coverage(id.bytes());
        ring.blind_indexes(BlindIndexKind::MemberId, norm.as_bytes())
            .into_iter()
            .map(|(tag, mac)| IndexKey { tag, mac, patient: patient.bytes(), record })
            .collect()
    }

    /// Loads and opens a coverage's current version (read again if it fails
    /// to open, like `load_patient`).
    pub(super) async fn load_coverage(&self, id: CoverageId) -> Result<Opened<Coverage>, AppError> {
        self.load_fetched_coverage(id, None).await
    }

    /// [`App::load_coverage`], starting from a state already fetched if given.
    async fn load_fetched_coverage(
        &self,
        id: CoverageId,
        mut fetched: Option<Fetched>,
    ) -> Result<Opened<Coverage>, AppError> {
        super::reading_again(|| self.load_coverage_once(id, fetched.take())).await
    }

    async fn load_coverage_once(&self, id: CoverageId, fetched: Option<Fetched>) -> Result<Opened<Coverage>, AppError> {
        let (head, sealed, dek, key_version) = self.current_from(RecordRef::coverage(id.bytes()), fetched).await?;
        let patient = PatientId::from_bytes(head.patient_id);
        let record: Coverage = self.open(&dek, &coverage_aad(id, patient, head.version), &sealed)?;
        Ok(Opened { record, patient, dek, key_version })
    }

    /// A patient's coverages as they are now (`Backend::coverages_now`: one
    /// store lookup), with the keys to open them taken before the read;
    /// `None` if the patient does not exist.
    async fn fetch_coverages(&self, patient: PatientId) -> Result<Option<Fetched<CoveragesNow>>, AppError> {
        self.stamped(self.store.coverages_now(patient.bytes())).await
    }

    /// Opens every coverage fetched, primary first; read again while one
    /// fails to open (like `load_coverage`).
    async fn open_coverages(
        &self,
        patient: PatientId,
        fetched: Fetched<CoveragesNow>,
    ) -> Result<Vec<Coverage>, AppError> {
        let mut fetched = Some(fetched);
        let mut all = super::reading_again(|| self.open_coverages_once(patient, fetched.take())).await?;
        all.sort_by(|a, b| (a.data.order, a.create_time, &a.id).cmp(&(b.data.order, b.create_time, &b.id)));
        Ok(all)
    }

    async fn open_coverages_once(
        &self,
        patient: PatientId,
        fetched: Option<Fetched<CoveragesNow>>,
    ) -> Result<Vec<Coverage>, AppError> {
        // A patient without coverages needs no key unwrapped.
        if fetched.as_ref().is_some_and(|f| f.now.coverages.is_empty()) {
            return Ok(Vec::new());
        }
        let record = RecordRef::patient(patient.bytes());
        let (now, dek, _) = self.unlocked(fetched, || self.fetch_coverages(patient), record).await?;
        now.coverages
            .into_iter()
            .map(|c| {
                let id = CoverageId::from_bytes(c.id);
                let sealed = c.sealed.ok_or(AppError::DataLoss)?;
                self.open(&dek, &coverage_aad(id, patient, c.version), &sealed)
            })
            .collect()
    }

    /// Adds a coverage to an active patient.
    pub async fn create_coverage(&self, ctx: &CallContext, input: Input<CoverageCreate>) -> Result<Coverage, AppError> {
        let mut call = self.call(ctx, Action::CoverageCreate, input.named).await;
        // Shared with every write; an erasure takes it exclusively (see `erasure`).
        let _gate = self.keys.wrap_gate.read().await;
        let result = async {
            let req = call.accept(input.parsed)?;
            let idempotency = ctx.idempotency_hash(RecordKind::Coverage);
            if let Some(key) = idempotency
                && let Some(made) = self.store.idempotent(key).await.map_err(internal)?
            {
                let id = CoverageId::from_bytes(made.id);
                call.entry.resource_id = id.to_string();
                call.entry.details.push("idempotent_replay=true".into());
                return Ok(Created::Replayed(self.read_coverage(&mut call, id).await?));
            }
            let id = CoverageId::new_v7();
            call.entry.resource_id = id.to_string();
            if let Some(key) = idempotency {
                call.stage(Change::IdempotencyKey { key, record: RecordRef::coverage(id.bytes()) });
            }
            call.reach(req.patient_id, Reach::Write, RecordKind::Patient).await?;
            call.entry.disclosed = vec![groups::INSURANCE.into()];
            let Opened { record: patient, dek, key_version, .. } = self.load_patient(req.patient_id).await?;
            if !patient.active() {
                return Err(AppError::FailedPrecondition("patient is deleted"));
            }
            let now = self.now();
            let coverage = Coverage {
                id: id.to_string(),
                patient_id: PatientIdText::from(req.patient_id),
                version: 1,
                create_time: now,
                update_time: now,
                delete_time: None,
                data: req.data,
            };
            let sealed = self.seal(&dek, &coverage_aad(id, req.patient_id, 1), &coverage)?;
            call.entry.record_version = 1;
            call.entry.key_version = key_version;
            let write = RecordWrite {
                record: RecordRef::coverage(id.bytes()),
                patient_id: req.patient_id.bytes(),
                expected_version: 0,
                sealed,
                new_dek: None,
                key_generation: dek.generation(),
                index_keys: self.coverage_index_keys(id, req.patient_id, &coverage),
            };
            Ok(Created::New(coverage, write))
        }
        .await;
        call.finish_create(result).await
    }

    /// Reads a coverage.
    pub async fn get_coverage(&self, ctx: &CallContext, input: Input<CoverageId>) -> Result<Coverage, AppError> {
        let mut call = self.call(ctx, Action::CoverageRead, input.named).await;
        let result = async {
            let id = call.accept(input.parsed)?;
            self.read_coverage(&mut call, id).await
        }
        .await;
        call.finish(result).await
    }

    /// A coverage the caller may read, opened, with what the call's entry records of it.
    /// The coverage is read before the access check, in one lookup that
    /// also gives the check its patient's restriction; it is opened only once
    /// the check passed.
    async fn read_coverage(&self, call: &mut Call<'_>, id: CoverageId) -> Result<Coverage, AppError> {
        let record = RecordRef::coverage(id.bytes());
        let fetched = self.fetch(record).await?;
        if let Some(f) = &fetched {
            call.known_restriction = Some((PatientId::from_bytes(f.patient()), f.restricted_since()));
        }
        call.reach_coverage(id, Reach::Read).await?;
        call.entry.disclosed = vec![groups::INSURANCE.into()];
        let Some(fetched) = fetched else { return Err(self.missing(record).await) };
        let opened = self.load_fetched_coverage(id, Some(fetched)).await?;
        call.entry.patient_id = opened.patient.to_string();
        call.entry.record_version = opened.record.version;
        call.entry.key_version = opened.key_version;
        Ok(opened.record)
    }

    /// Replaces a coverage at a known version.
    pub async fn update_coverage(&self, ctx: &CallContext, input: Input<CoverageUpdate>) -> Result<Coverage, AppError> {
        let mut call = self.call(ctx, Action::CoverageUpdate, input.named).await;
        // Shared with every write; an erasure takes it exclusively (see `erasure`).
        let _gate = self.keys.wrap_gate.read().await;
        let result = async {
            let upd = call.accept(input.parsed)?;
            call.entry.record_version = upd.expected_version;
            call.reach_coverage(upd.id, Reach::Write).await?;
            let moved = upd.patient_id;
            self.write_coverage_version(&mut call, upd.id, upd.expected_version, moved, |current, now| Coverage {
                update_time: now,
                data: upd.data,
                ..current
            })
            .await
        }
        .await;
        call.finish_write(result).await
    }

    /// Soft-deletes a coverage at a known version.
    pub async fn delete_coverage(
        &self,
        ctx: &CallContext,
        input: Input<(CoverageId, u64)>,
    ) -> Result<Coverage, AppError> {
        let mut call = self.call(ctx, Action::CoverageDelete, input.named).await;
        // Shared with every write; an erasure takes it exclusively (see `erasure`).
        let _gate = self.keys.wrap_gate.read().await;
        let result = async {
            let (id, expected) = call.accept(input.parsed)?;
            call.entry.record_version = expected;
            call.reach_coverage(id, Reach::Write).await?;
            self.write_coverage_version(&mut call, id, expected, None, |current, now| Coverage {
                update_time: now,
                delete_time: Some(now),
                ..current
            })
            .await
        }
        .await;
        call.finish_write(result).await
    }

    /// The next version of a coverage, sealed with the key that opened the current one.
    async fn write_coverage_version(
        &self,
        call: &mut Call<'_>,
        id: CoverageId,
        expected: u64,
        claimed_patient: Option<PatientId>,
        change: impl FnOnce(Coverage, i64) -> Coverage,
    ) -> Result<(Coverage, RecordWrite), AppError> {
        let Opened { record: current, patient, dek, key_version } = self.load_coverage(id).await?;
        if claimed_patient.is_some_and(|p| p != patient) {
            return Err(AppError::invalid("coverage.patient_id", "a coverage cannot move to another patient"));
        }
        if current.delete_time.is_some() {
            return Err(AppError::FailedPrecondition("coverage is deleted"));
        }
        if current.version != expected {
            return Err(AppError::Conflict { current: current.version });
        }
        let mut next = change(current, self.now());
        next.version = expected + 1;
        let sealed = self.seal(&dek, &coverage_aad(id, patient, next.version), &next)?;
        call.entry.record_version = next.version;
        call.entry.key_version = key_version;
        let write = RecordWrite {
            record: RecordRef::coverage(id.bytes()),
            patient_id: patient.bytes(),
            expected_version: expected,
            sealed,
            new_dek: None,
            key_generation: dek.generation(),
            index_keys: self.coverage_index_keys(id, patient, &next),
        };
        Ok((next, write))
    }

    /// A patient's coverages, ordered primary first.
    pub async fn list_coverages(
        &self,
        ctx: &CallContext,
        input: Input<(PatientId, bool)>,
    ) -> Result<Vec<Coverage>, AppError> {
        let parsed = input.parsed.map(|(patient, show_deleted)| {
            (patient, Box::new(move |c: &Coverage| show_deleted || c.delete_time.is_none()) as CoverageFilter)
        });
        self.filtered_coverages(ctx, Action::CoverageList, Input::new(input.named, parsed)).await
    }

    /// The coverages in force on a date of service, primary first.
    pub async fn active_coverage(
        &self,
        ctx: &CallContext,
        input: Input<(PatientId, CalendarDate)>,
    ) -> Result<Vec<Coverage>, AppError> {
        let parsed = input
            .parsed
            .map(|(patient, date)| (patient, Box::new(move |c: &Coverage| c.in_force_on(date)) as CoverageFilter));
        self.filtered_coverages(ctx, Action::CoverageActive, Input::new(input.named, parsed)).await
    }

    async fn filtered_coverages(
        &self,
        ctx: &CallContext,
        action: Action,
        input: Input<(PatientId, CoverageFilter)>,
    ) -> Result<Vec<Coverage>, AppError> {
        let mut call = self.call(ctx, action, input.named).await;
        let result = async {
            let (patient, keep) = call.accept(input.parsed)?;
            let fetched = self.fetch_coverages(patient).await?;
            if let Some(f) = &fetched {
                call.known_restriction = Some((patient, f.restricted_since()));
            }
            call.reach(patient, Reach::Read, RecordKind::Patient).await?;
            call.entry.disclosed = vec![groups::INSURANCE.into()];
            let Some(fetched) = fetched else { return Err(self.missing(RecordRef::patient(patient.bytes())).await) };
            let all = self.open_coverages(patient, fetched).await?;
            let list: Vec<Coverage> = all.into_iter().filter(|c| keep(c)).collect();
            call.entry.result_count = Some(super::count(list.len()));
            Ok(list)
        }
        .await;
        call.finish(result).await
    }
}

/// Which of a patient's coverages a call returns.
type CoverageFilter = Box<dyn Fn(&Coverage) -> bool + Send>;
