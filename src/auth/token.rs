//! Minting tokens with the local development issuer key (`carevault token issue`).

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

/// The issuer (`iss`) the dev issuer writes and the server expects by default.
pub const DEFAULT_ISSUER: &str = "carevault-dev-issuer";
/// The audience (`aud`) the dev issuer writes and the server expects by default.
pub const DEFAULT_AUDIENCE: &str = "carevault";

/// What goes into a token.
#[derive(Debug, Clone)]
pub struct TokenSpec {
    /// Subject: the unique principal.
    pub subject: String,
    /// The `roles` claim (mapped to carevault roles by the policy).
    pub roles: Vec<String>,
    /// `iss`.
    pub issuer: String,
    /// `aud`.
    pub audience: String,
    /// Lifetime in seconds.
    pub ttl_secs: i64,
    /// `nbf` relative to `iat` (0: valid at once).
    pub not_before_offset_secs: i64,
}

impl TokenSpec {
    /// A token for `subject` with `roles`, the default issuer and audience, 10 minutes.
    pub fn new(subject: &str, roles: &[&str]) -> TokenSpec {
        TokenSpec {
            subject: subject.to_string(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            issuer: DEFAULT_ISSUER.into(),
            audience: DEFAULT_AUDIENCE.into(),
            ttl_secs: 600,
            not_before_offset_secs: 0,
        }
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    roles: &'a [String],
    iss: &'a str,
    aud: &'a str,
    iat: i64,
    nbf: i64,
    exp: i64,
    jti: String,
}

/// Error minting a token.
#[derive(Debug, thiserror::Error)]
#[error("could not sign token: {0}")]
pub struct IssueError(String);

/// Signs an EdDSA JWT per `spec`, issued at `now_secs`.
pub fn issue(pkcs8_der: &[u8], spec: &TokenSpec, now_secs: i64) -> Result<String, IssueError> {
    let claims = Claims {
        sub: &spec.subject,
        roles: &spec.roles,
        iss: &spec.issuer,
        aud: &spec.audience,
        iat: now_secs,
        nbf: now_secs.saturating_add(spec.not_before_offset_secs),
        exp: now_secs.saturating_add(spec.ttl_secs),
        jti: uuid::Uuid::now_v7().to_string(),
    };
    let header = Header::new(Algorithm::EdDSA);
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ed_der(pkcs8_der)).map_err(|e| IssueError(e.to_string()))
}
