//! Coverage use cases: insurance records linked to a patient, sealed under
//! that patient's data key.

use super::access::{Reach, groups};
use super::patients::blind_key;
use super::{App, Attempt, CallContext, Opened, Parsed, blocking, internal};
use crate::crypto::{BlindIndexKind, RecordAad, RecordKind};
use crate::domain::patient::PatientIdText;
use crate::domain::{Action, CalendarDate, Coverage, CoverageData, CoverageId, PatientId, normalize};
use crate::error::AppError;
use crate::storage::{BLIND_KEY_LEN, RecordWrite};

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
    pub(super) fn coverage_index_keys(
        &self,
        id: CoverageId,
        patient: PatientId,
        c: &Coverage,
    ) -> Vec<[u8; BLIND_KEY_LEN]> {
        if c.delete_time.is_some() || c.data.subscriber_id.is_empty() {
            return Vec::new();
        }
        let norm = normalize::identifier_value(&c.data.subscriber_id);
        let ring = self.keys.ring();
        ring.blind_indexes(BlindIndexKind::MemberId, norm.as_bytes())
            .into_iter()
            .map(|(tag, mac)| blind_key(tag, mac, patient.bytes(), RecordKind::Coverage, id.bytes()))
            .collect()
    }

    /// Loads and opens a coverage's current version (read again once if it
    /// fails to open, like `load_patient`).
    pub(super) fn load_coverage(&self, id: CoverageId) -> Result<Opened<Coverage>, AppError> {
        match self.load_coverage_once(id) {
            Err(AppError::DataLoss) => self.load_coverage_once(id),
            other => other,
        }
    }

    fn load_coverage_once(&self, id: CoverageId) -> Result<Opened<Coverage>, AppError> {
        let head = self
            .head(RecordKind::Coverage, &id.bytes())?
            .ok_or_else(|| self.missing(RecordKind::Coverage, &id.bytes()))?;
        let patient = PatientId::from_bytes(head.patient_id);
        let sealed = self
            .store
            .record(RecordKind::Coverage, &id.bytes(), head.version)
            .map_err(internal)?
            .ok_or(AppError::DataLoss)?;
        let (dek, key_version) = self.data_key(patient)?;
        let record: Coverage = self.open(&dek, &coverage_aad(id, patient, head.version), &sealed)?;
        Ok(Opened { record, patient, dek, key_version })
    }

    fn load_coverages_of(&self, patient: PatientId) -> Result<Vec<Coverage>, AppError> {
        let ids = self.store.coverages_of(&patient.bytes()).map_err(internal)?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push(self.load_coverage(CoverageId::from_bytes(id))?.record);
        }
        out.sort_by(|a, b| (a.data.order, a.create_time, &a.id).cmp(&(b.data.order, b.create_time, &b.id)));
        Ok(out)
    }

    /// Adds a coverage to an active patient.
    pub async fn create_coverage(
        &self,
        ctx: &CallContext,
        input: Parsed<CoverageCreate>,
    ) -> Result<Coverage, AppError> {
        let mut attempt = self.begin(ctx, Action::CoverageCreate);
        self.authorize(ctx, &mut attempt).await?;
        let req = self.valid(ctx, &mut attempt, input).await?;
        let id = CoverageId::new_v7();
        attempt.entry.patient_id = req.patient_id.to_string();
        attempt.entry.resource_id = id.to_string();
        self.reach(ctx, &mut attempt, req.patient_id, Reach::Write).await?;
        attempt.entry.disclosed = vec![groups::INSURANCE.into()];
        // Shared with every write; an erasure takes it exclusively (see `erasure`).
        let _gate = self.keys.wrap_gate.read().await;
        let prepared = (|| {
            let Opened { record: patient, dek, key_version: kv, .. } = self.load_patient(req.patient_id)?;
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
            Ok((coverage, sealed, kv, dek.generation()))
        })();
        let (coverage, sealed, kv, key_generation) = match prepared {
            Ok(v) => v,
            Err(e) => return Err(self.fail(ctx, &mut attempt, e).await),
        };
        attempt.entry.record_version = 1;
        attempt.entry.key_version = kv;
        let write = RecordWrite {
            kind: RecordKind::Coverage,
            id: id.bytes(),
            patient_id: req.patient_id.bytes(),
            expected_version: 0,
            sealed,
            new_dek: None,
            key_generation,
            index_keys: self.coverage_index_keys(id, req.patient_id, &coverage),
        };
        self.commit_write(ctx, attempt, write).await?;
        Ok(coverage)
    }

    /// Reads a coverage.
    pub async fn get_coverage(&self, ctx: &CallContext, input: Parsed<CoverageId>) -> Result<Coverage, AppError> {
        let mut attempt = self.begin(ctx, Action::CoverageRead);
        self.authorize(ctx, &mut attempt).await?;
        let id = self.valid(ctx, &mut attempt, input).await?;
        attempt.entry.resource_id = id.to_string();
        self.reach_coverage(ctx, &mut attempt, id, Reach::Read).await?;
        attempt.entry.disclosed = vec![groups::INSURANCE.into()];
        let result = self.load_coverage(id).map(|opened| {
            attempt.entry.patient_id = opened.patient.to_string();
            attempt.entry.record_version = opened.record.version;
            attempt.entry.key_version = opened.key_version;
            opened.record
        });
        self.finish(ctx, attempt, result).await
    }

    /// Replaces a coverage at a known version.
    pub async fn update_coverage(
        &self,
        ctx: &CallContext,
        input: Parsed<CoverageUpdate>,
    ) -> Result<Coverage, AppError> {
        let mut attempt = self.begin(ctx, Action::CoverageUpdate);
        self.authorize(ctx, &mut attempt).await?;
        let upd = self.valid(ctx, &mut attempt, input).await?;
        attempt.entry.resource_id = upd.id.to_string();
        attempt.entry.record_version = upd.expected_version;
        self.reach_coverage(ctx, &mut attempt, upd.id, Reach::Write).await?;
        let moved = upd.patient_id;
        self.write_coverage_version(ctx, attempt, upd.id, upd.expected_version, moved, |current, now| Coverage {
            update_time: now,
            data: upd.data,
            ..current
        })
        .await
    }

    /// Soft-deletes a coverage at a known version.
    pub async fn delete_coverage(
        &self,
        ctx: &CallContext,
        input: Parsed<(CoverageId, u64)>,
    ) -> Result<Coverage, AppError> {
        let mut attempt = self.begin(ctx, Action::CoverageDelete);
        self.authorize(ctx, &mut attempt).await?;
        let (id, expected) = self.valid(ctx, &mut attempt, input).await?;
        attempt.entry.resource_id = id.to_string();
        attempt.entry.record_version = expected;
        self.reach_coverage(ctx, &mut attempt, id, Reach::Write).await?;
        self.write_coverage_version(ctx, attempt, id, expected, None, |current, now| Coverage {
            update_time: now,
            delete_time: Some(now),
            ..current
        })
        .await
    }

    async fn write_coverage_version(
        &self,
        ctx: &CallContext,
        mut attempt: Attempt,
        id: CoverageId,
        expected: u64,
        claimed_patient: Option<PatientId>,
        change: impl FnOnce(Coverage, i64) -> Coverage,
    ) -> Result<Coverage, AppError> {
        // Shared with every write; an erasure takes it exclusively (see `erasure`).
        let _gate = self.keys.wrap_gate.read().await;
        let prepared = (|| {
            let Opened { record: current, patient, dek, key_version: kv } = self.load_coverage(id)?;
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
            Ok((next, patient, sealed, kv, dek.generation()))
        })();
        let (next, patient, sealed, kv, key_generation) = match prepared {
            Ok(v) => v,
            Err(e) => return Err(self.fail(ctx, &mut attempt, e).await),
        };
        attempt.entry.patient_id = patient.to_string();
        attempt.entry.record_version = next.version;
        attempt.entry.key_version = kv;
        let write = RecordWrite {
            kind: RecordKind::Coverage,
            id: id.bytes(),
            patient_id: patient.bytes(),
            expected_version: expected,
            sealed,
            new_dek: None,
            key_generation,
            index_keys: self.coverage_index_keys(id, patient, &next),
        };
        self.commit_write(ctx, attempt, write).await?;
        Ok(next)
    }

    /// Checks the caller may reach the patient a coverage belongs to (a
    /// missing coverage is audited as NOT_FOUND here).
    async fn reach_coverage(
        &self,
        ctx: &CallContext,
        attempt: &mut Attempt,
        id: CoverageId,
        how: Reach,
    ) -> Result<(), AppError> {
        let patient = match self.head(RecordKind::Coverage, &id.bytes()) {
            Ok(Some(h)) => PatientId::from_bytes(h.patient_id),
            Ok(None) => {
                let e = self.missing(RecordKind::Coverage, &id.bytes());
                return Err(self.fail(ctx, attempt, e).await);
            }
            Err(e) => return Err(self.fail(ctx, attempt, e).await),
        };
        self.reach(ctx, attempt, patient, how).await
    }

    /// A patient's coverages, ordered primary first.
    pub async fn list_coverages(
        &self,
        ctx: &CallContext,
        input: Parsed<(PatientId, bool)>,
    ) -> Result<Vec<Coverage>, AppError> {
        let input = input.map(|(patient, show_deleted)| {
            (patient, Box::new(move |c: &Coverage| show_deleted || c.delete_time.is_none()) as CoverageFilter)
        });
        self.filtered_coverages(ctx, Action::CoverageList, input).await
    }

    /// The coverages in force on a date of service, primary first.
    pub async fn active_coverage(
        &self,
        ctx: &CallContext,
        input: Parsed<(PatientId, CalendarDate)>,
    ) -> Result<Vec<Coverage>, AppError> {
        let input =
            input.map(|(patient, date)| (patient, Box::new(move |c: &Coverage| c.in_force_on(date)) as CoverageFilter));
        self.filtered_coverages(ctx, Action::CoverageActive, input).await
    }

    async fn filtered_coverages(
        &self,
        ctx: &CallContext,
        action: Action,
        input: Parsed<(PatientId, CoverageFilter)>,
    ) -> Result<Vec<Coverage>, AppError> {
        let mut attempt = self.begin(ctx, action);
        self.authorize(ctx, &mut attempt).await?;
        let (patient, keep) = self.valid(ctx, &mut attempt, input).await?;
        attempt.entry.patient_id = patient.to_string();
        self.reach(ctx, &mut attempt, patient, Reach::Read).await?;
        attempt.entry.disclosed = vec![groups::INSURANCE.into()];
        let app = self.clone();
        let result = blocking(move || {
            app.head(RecordKind::Patient, &patient.bytes())?
                .ok_or_else(|| app.missing(RecordKind::Patient, &patient.bytes()))?;
            let all = app.load_coverages_of(patient)?;
            Ok(all.into_iter().filter(|c| keep(c)).collect::<Vec<_>>())
        })
        .await;
        if let Ok(list) = &result {
            attempt.entry.result_count = Some(super::count(list.len()));
        }
        self.finish(ctx, attempt, result).await
    }
}

/// Which of a patient's coverages a call returns.
type CoverageFilter = Box<dyn Fn(&Coverage) -> bool + Send>;
