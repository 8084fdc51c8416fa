//! Insurance coverage, aligned with FHIR R4 Coverage.

use serde::{Deserialize, Serialize};

use super::patient::{HumanName, PatientIdText, code_enum};
use super::{CalendarDate, FhirDate, Micros};

code_enum!(
    /// FHIR fm-status.
    CoverageStatus { Active => "active" / 1, Cancelled => "cancelled" / 2, Draft => "draft" / 3, EnteredInError => "entered-in-error" / 4 }
);
code_enum!(
    /// Kind of plan.
    CoverageType { Hmo => "HMO" / 1, Ppo => "PPO" / 2, Epo => "EPO" / 3, Pos => "POS" / 4, Hdhp => "HDHP" / 5, Medicare => "medicare" / 6,
                   Medicaid => "medicaid" / 7, Tricare => "tricare" / 8, WorkersComp => "workers-comp" / 9,
                   SelfPay => "self-pay" / 10, Other => "other" / 11 }
);
code_enum!(
    /// FHIR subscriber-relationship (subset).
    SubscriberRelationship { Patient => "self" / 1, Spouse => "spouse" / 2, Child => "child" / 3, Other => "other" / 4 }
);

/// The insurer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payor {
    /// Name.
    pub name: String,
    /// Payer id used on claims.
    pub payer_id: String,
}

/// The policy holder when not the patient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscriber {
    /// Name.
    pub name: HumanName,
    /// Birth date if known.
    pub birth_date: Option<FhirDate>,
}

/// Inclusive period; open-ended where a bound is absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Period {
    /// First day in force.
    pub start: Option<CalendarDate>,
    /// Last day in force.
    pub end: Option<CalendarDate>,
}

impl Period {
    /// True when `date` is within the period.
    pub fn contains(&self, date: CalendarDate) -> bool {
        self.start.is_none_or(|s| s <= date) && self.end.is_none_or(|e| date <= e)
    }
}

/// Client-supplied content of a coverage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoverageData {
    /// Status.
    pub status: CoverageStatus,
    /// Kind of plan.
    pub coverage_type: CoverageType,
    /// Insurer.
    pub payor: Payor,
    /// Member id; empty for self-pay.
    pub subscriber_id: String,
    /// Policy holder when not the patient.
    pub subscriber: Option<Subscriber>,
    /// Patient's relationship to the subscriber.
    pub relationship: SubscriberRelationship,
    /// Group number.
    pub group_number: String,
    /// Plan name.
    pub plan_name: String,
    /// When in force.
    pub period: Period,
    /// 1 = primary.
    pub order: u8,
}

/// A stored coverage version; this struct is the sealed plaintext.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coverage {
    /// Coverage id.
    pub id: String,
    /// Owning patient.
    pub patient_id: PatientIdText,
    /// Version, 1 on create.
    pub version: u64,
    /// When created.
    pub create_time: Micros,
    /// When this version was written.
    pub update_time: Micros,
    /// When deleted, if deleted.
    pub delete_time: Option<Micros>,
    /// Content.
    pub data: CoverageData,
}

impl Coverage {
    /// In force on `date`: active status, not deleted, period contains the date.
    pub fn in_force_on(&self, date: CalendarDate) -> bool {
        self.delete_time.is_none() && self.data.status == CoverageStatus::Active && self.data.period.contains(date)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_are_inclusive_and_open_ended() {
        let d = |s| CalendarDate::parse(s).unwrap();
        let p = Period { start: Some(d("2026-01-01")), end: Some(d("2026-12-31")) };
        assert!(p.contains(d("2026-01-01")));
        assert!(p.contains(d("2026-12-31")));
        assert!(!p.contains(d("2027-01-01")));
        assert!(Period::default().contains(d("1999-05-05")));
    }
}
