//! Domain types: what carevault stores, independent of the wire format.
//!
//! Values here are built by parsing (see `api::convert`) and are never
//! invalid. Records encode (`plaintext`) only as the bytes that get sealed;
//! those bytes never leave the process unencrypted.

pub mod coverage;
pub mod date;
pub mod ids;
pub mod normalize;
pub mod patient;
pub mod plaintext;

pub use coverage::{
    Coverage, CoverageData, CoverageStatus, CoverageType, Payor, Period, Subscriber, SubscriberRelationship,
};
pub use date::{CalendarDate, FhirDate};
pub use ids::{CoverageId, PatientId};
pub use patient::{
    Address, AddressUse, ContactPoint, ContactPointSystem, ContactPointUse, ContactRelationship, Gender, HumanName,
    Identifier, IdentifierType, NameUse, Patient, PatientContact, PatientData,
};

use crate::auth::policy::Permission;

/// Microseconds since the Unix epoch, UTC.
pub type Micros = i64;

/// Outcome recorded in an audit entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Succeeded.
    Ok,
    /// Rejected input.
    InvalidArgument,
    /// No valid token.
    Unauthenticated,
    /// Token lacks the permission.
    PermissionDenied,
    /// No such record.
    NotFound,
    /// Stale version.
    Aborted,
    /// The record's state forbids it (e.g. updating a deleted patient).
    FailedPrecondition,
    /// A ciphertext failed to open.
    DataLoss,
    /// Server-side failure.
    Internal,
    /// A limit was hit.
    ResourceExhausted,
}

impl Outcome {
    /// All outcomes.
    pub const ALL: [Outcome; 10] = [
        Outcome::Ok,
        Outcome::InvalidArgument,
        Outcome::Unauthenticated,
        Outcome::PermissionDenied,
        Outcome::NotFound,
        Outcome::Aborted,
        Outcome::FailedPrecondition,
        Outcome::DataLoss,
        Outcome::Internal,
        Outcome::ResourceExhausted,
    ];

    /// The string recorded in audit entries.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::InvalidArgument => "invalid_argument",
            Outcome::Unauthenticated => "unauthenticated",
            Outcome::PermissionDenied => "permission_denied",
            Outcome::NotFound => "not_found",
            Outcome::Aborted => "aborted",
            Outcome::FailedPrecondition => "failed_precondition",
            Outcome::DataLoss => "data_loss",
            Outcome::Internal => "internal",
            Outcome::ResourceExhausted => "resource_exhausted",
        }
    }

    /// Parses the audit string form.
    pub fn parse(s: &str) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == s)
    }
}

/// What an audited call attempted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Action {
    PatientCreate,
    PatientRead,
    PatientUpdate,
    PatientDelete,
    PatientList,
    PatientSearch,
    PatientHistory,
    CoverageCreate,
    CoverageRead,
    CoverageUpdate,
    CoverageDelete,
    CoverageList,
    CoverageActive,
    AuditList,
    AuditExport,
    AuditHead,
    AccessRestrict,
    BreakGlassList,
    BreakGlassReview,
    KeysStatus,
    KeysRotate,
    KeysRewrap,
    KeysRewrapBatch,
    KeysRewrapComplete,
    KeysRetire,
    KeysDestroy,
    PatientErase,
    ErasureRekey,
    KeysReencrypt,
    KeysReencryptBatch,
    KeysReencryptComplete,
    KeysBlindIndexRotate,
    KeysBlindIndexBatch,
    KeysBlindIndexSwitch,
    KeysBlindIndexComplete,
    AccessLegalHold,
    AccessRefused,
    KeysRotateComplete,
    KeysRetireComplete,
    KeysDestroyComplete,
    /// The key state recorded in the store (first start with this version).
    KeysStateRecorded,
    /// A signed checkpoint of the audit log read.
    AuditCheckpoint,
    /// An inclusion or consistency proof read.
    AuditProof,
    /// A witness's cosignature of a checkpoint added.
    AuditCosign,
    /// A log key (signing checkpoints) created.
    KeysLogKeyCreated,
    /// A new log key version made the signing one.
    KeysLogKeyRotate,
}

/// What kind of thing an audited action is about (`resource_type` in the entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceType {
    /// A patient record.
    Patient,
    /// A coverage record.
    Coverage,
    /// The audit trail itself.
    Audit,
    /// A patient's access settings (restriction, legal hold).
    Access,
    /// A break-glass grant.
    Grant,
    /// Master keys, blind-index keys, erasure keys and their jobs.
    Key,
    /// Nothing in particular (refusals counted by `access.refused`, genesis).
    None,
}

impl ResourceType {
    /// The string recorded in audit entries.
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceType::Patient => "patient",
            ResourceType::Coverage => "coverage",
            ResourceType::Audit => "audit",
            ResourceType::Access => "access",
            ResourceType::Grant => "grant",
            ResourceType::Key => "key",
            ResourceType::None => "",
        }
    }
}

impl Action {
    /// The string recorded in audit entries.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::PatientCreate => "patient.create",
            Action::PatientRead => "patient.read",
            Action::PatientUpdate => "patient.update",
            Action::PatientDelete => "patient.delete",
            Action::PatientList => "patient.list",
            Action::PatientSearch => "patient.search",
            Action::PatientHistory => "patient.history",
            Action::CoverageCreate => "coverage.create",
            Action::CoverageRead => "coverage.read",
            Action::CoverageUpdate => "coverage.update",
            Action::CoverageDelete => "coverage.delete",
            Action::CoverageList => "coverage.list",
            Action::CoverageActive => "coverage.active",
            Action::AuditList => "audit.list",
            Action::AuditExport => "audit.export",
            Action::AuditHead => "audit.head",
            Action::AccessRestrict => "access.restrict",
            Action::BreakGlassList => "access.break_glass_list",
            Action::BreakGlassReview => "access.break_glass_review",
            Action::KeysStatus => "keys.status",
            Action::KeysRotate => "keys.rotate",
            Action::KeysRewrap => "keys.rewrap",
            Action::KeysRewrapBatch => "keys.rewrap_batch",
            Action::KeysRewrapComplete => "keys.rewrap_complete",
            Action::KeysRetire => "keys.retire",
            Action::KeysDestroy => "keys.destroy",
            Action::PatientErase => "patient.erase",
            Action::ErasureRekey => "keys.erasure_rekey",
            Action::KeysReencrypt => "keys.reencrypt",
            Action::KeysReencryptBatch => "keys.reencrypt_batch",
            Action::KeysReencryptComplete => "keys.reencrypt_complete",
            Action::KeysBlindIndexRotate => "keys.blind_index_rotate",
            Action::KeysBlindIndexBatch => "keys.blind_index_batch",
            Action::KeysBlindIndexSwitch => "keys.blind_index_switch",
            Action::KeysBlindIndexComplete => "keys.blind_index_complete",
            Action::AccessLegalHold => "access.legal_hold",
            Action::AccessRefused => "access.refused",
            Action::KeysRotateComplete => "keys.rotate_complete",
            Action::KeysRetireComplete => "keys.retire_complete",
            Action::KeysDestroyComplete => "keys.destroy_complete",
            Action::KeysStateRecorded => "keys.state_recorded",
            Action::AuditCheckpoint => "audit.checkpoint",
            Action::AuditProof => "audit.proof",
            Action::AuditCosign => "audit.cosign",
            Action::KeysLogKeyCreated => "keys.log_key_created",
            Action::KeysLogKeyRotate => "keys.log_key_rotate",
        }
    }

    /// The permission that authorizes this action.
    pub fn required_permission(self) -> Permission {
        match self {
            Action::PatientRead | Action::PatientList | Action::PatientSearch | Action::PatientHistory => {
                Permission::PatientsRead
            }
            Action::PatientCreate | Action::PatientUpdate | Action::PatientDelete => Permission::PatientsWrite,
            Action::CoverageRead | Action::CoverageList | Action::CoverageActive => Permission::CoverageRead,
            Action::CoverageCreate | Action::CoverageUpdate | Action::CoverageDelete => Permission::CoverageWrite,
            Action::AuditList
            | Action::AuditExport
            | Action::AuditHead
            | Action::AuditCheckpoint
            | Action::AuditProof
            | Action::AuditCosign => Permission::AuditRead,
            Action::AccessRestrict => Permission::PatientsRestrict,
            Action::BreakGlassList | Action::BreakGlassReview => Permission::AuditReview,
            Action::KeysStatus
            | Action::KeysRotate
            | Action::KeysRotateComplete
            | Action::KeysRewrap
            | Action::KeysRewrapBatch
            | Action::KeysRewrapComplete
            | Action::KeysRetire
            | Action::KeysRetireComplete
            | Action::KeysDestroy
            | Action::KeysDestroyComplete
            | Action::KeysStateRecorded
            | Action::KeysLogKeyCreated
            | Action::KeysLogKeyRotate
            | Action::KeysReencrypt
            | Action::KeysReencryptBatch
            | Action::KeysReencryptComplete
            | Action::KeysBlindIndexRotate
            | Action::KeysBlindIndexBatch
            | Action::KeysBlindIndexSwitch
            | Action::KeysBlindIndexComplete => Permission::KeysAdmin,
            Action::PatientErase | Action::ErasureRekey => Permission::PatientsErase,
            Action::AccessLegalHold => Permission::PatientsLegalHold,
            // Recorded by carevault itself for calls refused before any permission was checked.
            Action::AccessRefused => Permission::AuditRead,
        }
    }

    /// True when the action reads or writes PHI (and so needs a purpose of use).
    pub fn is_phi(self) -> bool {
        // An erasure names a patient but discloses nothing.
        matches!(self.resource_type(), ResourceType::Patient | ResourceType::Coverage) && self != Action::PatientErase
    }

    /// The resource type recorded with this action.
    pub fn resource_type(self) -> ResourceType {
        match self {
            Action::PatientCreate
            | Action::PatientRead
            | Action::PatientUpdate
            | Action::PatientDelete
            | Action::PatientList
            | Action::PatientSearch
            | Action::PatientHistory
            | Action::PatientErase => ResourceType::Patient,
            Action::CoverageCreate
            | Action::CoverageRead
            | Action::CoverageUpdate
            | Action::CoverageDelete
            | Action::CoverageList
            | Action::CoverageActive => ResourceType::Coverage,
            Action::AuditList
            | Action::AuditExport
            | Action::AuditHead
            | Action::AuditCheckpoint
            | Action::AuditProof
            | Action::AuditCosign => ResourceType::Audit,
            Action::AccessRestrict | Action::AccessLegalHold => ResourceType::Access,
            Action::AccessRefused => ResourceType::None,
            Action::BreakGlassList | Action::BreakGlassReview => ResourceType::Grant,
            Action::KeysStatus
            | Action::KeysRotate
            | Action::KeysRotateComplete
            | Action::KeysRewrap
            | Action::KeysRewrapBatch
            | Action::KeysRewrapComplete
            | Action::KeysRetire
            | Action::KeysRetireComplete
            | Action::KeysDestroy
            | Action::KeysDestroyComplete
            | Action::KeysStateRecorded
            | Action::KeysLogKeyCreated
            | Action::KeysLogKeyRotate
            | Action::ErasureRekey
            | Action::KeysReencrypt
            | Action::KeysReencryptBatch
            | Action::KeysReencryptComplete
            | Action::KeysBlindIndexRotate
            | Action::KeysBlindIndexBatch
            | Action::KeysBlindIndexSwitch
            | Action::KeysBlindIndexComplete => ResourceType::Key,
        }
    }
}
