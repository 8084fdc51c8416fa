//! The application error type and the one place it becomes a `tonic::Status`.
//!
//! Clients get a code and a fixed, safe message (plus google.rpc.BadRequest
//! field violations for invalid input, and the request id). Causes are
//! logged by the app layer without PHI; nothing here carries PHI, keys,
//! tokens, file paths or ciphertext.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::auth::AuthFailure;
use crate::auth::limits::Limited;
use crate::auth::policy::Denial;
use crate::domain::Outcome;

/// One bad field: a path like `patient.names[0].family` and a description
/// that never echoes the submitted value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// Field path in the request.
    pub field: String,
    /// What is wrong with it.
    pub description: Description,
}

/// What is wrong with a field. It can be built only from fixed text and
/// numbers (the limit that was exceeded), so a description can never carry
/// what the client sent, which may be PHI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Description {
    /// Fixed text, e.g. "is required".
    Fixed(&'static str),
    /// Longer than this many characters.
    TooLong(usize),
    /// More than this many entries.
    TooMany(usize),
    /// Larger than this many bytes.
    TooLarge(usize),
    /// Not an HL7 PurposeOfUse code carevault knows: the message lists them.
    UnknownPurpose,
}

impl Description {
    /// `x-purpose-of-use` that is not a known code.
    pub const PURPOSE: Description = Description::UnknownPurpose;
    /// `x-break-glass-reason` that is not 1-1000 printable ASCII characters.
    pub const BREAK_GLASS_REASON: Description = Description::Fixed("must be 1 to 1000 printable ASCII characters");
    /// `x-idempotency-key`.
    pub const IDEMPOTENCY_KEY: Description = Description::Fixed("must be 1 to 255 visible ASCII characters");
}

impl From<&'static str> for Description {
    fn from(s: &'static str) -> Self {
        Description::Fixed(s)
    }
}

impl std::fmt::Display for Description {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Description::Fixed(s) => f.write_str(s),
            Description::TooLong(max) => write!(f, "is too long (at most {max} characters)"),
            Description::TooMany(max) => write!(f, "too many entries (at most {max})"),
            Description::TooLarge(max) => write!(f, "is larger than {max} bytes"),
            Description::UnknownPurpose => {
                write!(f, "must be an HL7 PurposeOfUse code, one of: {}", crate::auth::policy::PURPOSE_CODES.join(", "))
            }
        }
    }
}

/// Every way a call can fail.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// No valid token.
    #[error("unauthenticated: {0}")]
    Unauthenticated(AuthFailure),
    /// The policy does not allow the call.
    #[error("permission denied: {0:?}")]
    PermissionDenied(Denial),
    /// Denied for a reason outside the role check; the message is fixed and safe.
    #[error("forbidden: {0}")]
    Forbidden(&'static str),
    /// The caller may not know the record exists (restricted patient): the
    /// client sees exactly what a missing patient looks like; the audit entry
    /// says permission_denied.
    #[error("restricted {0} hidden")]
    Hidden(&'static str),
    /// A rate or concurrency limit.
    #[error("limited: {0:?}")]
    Limited(Limited),
    /// The request is invalid; each violation names its field.
    #[error("invalid argument ({} violations)", .0.len())]
    InvalidArgument(Vec<FieldViolation>),
    /// The named resource does not exist.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The record was crypto-shredded: it exists in the audit trail only.
    #[error("{0} erased")]
    Erased(&'static str),
    /// The patient's data key changed (re-encryption or erasure) while the call ran.
    #[error("data key changed")]
    KeyChanged,
    /// The key state changed (a key operation through another process)
    /// while the request ran; the edge retries it.
    #[error("key state changed")]
    KeyStateMoved,
    /// The caller's version is stale.
    #[error("version conflict: current version is {current}")]
    Conflict {
        /// The version stored now.
        current: u64,
    },
    /// Another create with the same idempotency key committed first.
    #[error("idempotency key taken by a concurrent request")]
    IdempotencyRace,
    /// The resource's state forbids the call.
    #[error("failed precondition: {0}")]
    FailedPrecondition(&'static str),
    /// A key version cannot be retired: the message names what depends on it
    /// (counts and version numbers only).
    #[error("in use: {0}")]
    InUse(String),
    /// A stored ciphertext failed to open: tampering, corruption or a wrong key.
    #[error("stored record failed to authenticate")]
    DataLoss,
    /// The request is larger than the transport reads at all.
    #[error("request over the transport limit")]
    TooLarge,
    /// The audit entry could not be made durable, so the call did not happen.
    #[error("audit trail unavailable")]
    AuditUnavailable,
    /// The commit of the call's entry (and write) was sent, and the database
    /// never confirmed it: it may or may not have happened.
    #[error("commit outcome unknown")]
    OutcomeUnknown,
    /// Anything else; the cause was logged.
    #[error("internal error")]
    Internal,
}

impl AppError {
    /// The outcome recorded in the audit entry.
    pub fn outcome(&self) -> Outcome {
        match self {
            AppError::Unauthenticated(_) => Outcome::Unauthenticated,
            AppError::PermissionDenied(_) | AppError::Forbidden(_) | AppError::Hidden(_) => Outcome::PermissionDenied,
            AppError::Limited(_) | AppError::TooLarge => Outcome::ResourceExhausted,
            AppError::InvalidArgument(_) => Outcome::InvalidArgument,
            AppError::NotFound(_) | AppError::Erased(_) => Outcome::NotFound,
            AppError::Conflict { .. } | AppError::KeyChanged | AppError::KeyStateMoved | AppError::IdempotencyRace => {
                Outcome::Aborted
            }
            AppError::FailedPrecondition(_) | AppError::InUse(_) => Outcome::FailedPrecondition,
            AppError::DataLoss => Outcome::DataLoss,
            AppError::AuditUnavailable | AppError::OutcomeUnknown | AppError::Internal => Outcome::Internal,
        }
    }

    /// Shorthand for a single invalid field.
    pub fn invalid(field: impl Into<String>, description: impl Into<Description>) -> AppError {
        AppError::InvalidArgument(vec![FieldViolation { field: field.into(), description: description.into() }])
    }
}

/// Converts an error into the status sent to the client. The only such conversion.
pub fn to_status(err: &AppError, request_id: &str) -> Status {
    let mut status = match err {
        AppError::Unauthenticated(f) => Status::unauthenticated(f.client_message()),
        AppError::PermissionDenied(denial) => Status::permission_denied(match denial {
            Denial::Missing(p) => format!("your roles do not grant the {} permission", p.as_str()),
            Denial::PurposeRequired(p) => format!(
                "purpose of use required for {}: send x-purpose-of-use with an HL7 PurposeOfUse code such as TREAT",
                p.as_str()
            ),
            Denial::PurposeNotAllowed(p, purpose) => {
                format!("purpose of use {} does not permit {} for your roles", purpose.as_str(), p.as_str())
            }
        }),
        AppError::Forbidden(why) => Status::permission_denied(*why),
        AppError::Hidden(what) => Status::not_found(format!("{what} not found")),
        AppError::Limited(Limited::Rate) => {
            Status::resource_exhausted("request rate limit exceeded for this principal; slow down and retry")
        }
        AppError::Limited(Limited::Concurrency) => {
            Status::resource_exhausted("server is at its concurrent request limit; retry shortly")
        }
        AppError::TooLarge => Status::resource_exhausted(format!(
            "request is larger than the {} byte transport limit (requests are limited to {} bytes)",
            crate::api::grpc::MAX_TRANSPORT_BYTES,
            crate::api::grpc::MAX_REQUEST_BYTES
        )),
        AppError::InvalidArgument(violations) => {
            let mut details = ErrorDetails::new();
            for v in violations {
                details.add_bad_request_violation(v.field.clone(), v.description.to_string());
            }
            let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
            Status::with_error_details(
                Code::InvalidArgument,
                format!("invalid request: {}", fields.join(", ")),
                details,
            )
        }
        AppError::NotFound(what) => Status::not_found(format!("{what} not found")),
        AppError::Erased(what) => Status::not_found(format!(
            "{what} was erased (crypto-shredded): its records can no longer be decrypted; the audit trail keeps its history"
        )),
        AppError::KeyChanged => Status::aborted(
            "the patient's data key changed while this request ran (re-encryption or erasure); read again and retry",
        ),
        AppError::KeyStateMoved => Status::aborted(
            "the key state changed while this request ran (a key operation or an erasure through another server); retry",
        ),
        AppError::Conflict { current } => {
            Status::aborted(format!("version conflict: the record is at version {current}; read it again and retry"))
        }
        AppError::IdempotencyRace => Status::aborted(
            "another request with this x-idempotency-key was committed first; retry to get that request's result",
        ),
        AppError::FailedPrecondition(why) => Status::failed_precondition(*why),
        AppError::InUse(why) => Status::failed_precondition(why.clone()),
        AppError::DataLoss => Status::data_loss("stored record failed to authenticate"),
        AppError::OutcomeUnknown => Status::unavailable(
            "the database did not confirm this request's commit, so it may or may not have been performed: read before retrying, and retry a create with the same x-idempotency-key",
        ),
        AppError::AuditUnavailable => {
            Status::unavailable("the audit trail could not record this request, so it was not performed")
        }
        AppError::Internal => Status::internal("internal error"),
    };
    if let Ok(v) = request_id.parse() {
        status.metadata_mut().insert("x-request-id", v);
    }
    status
}
