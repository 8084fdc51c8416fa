//! Minting tokens with the local development issuer key (`carevault token issue`).

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    scope: &'a str,
    iat: i64,
    nbf: i64,
    exp: i64,
    jti: String,
}

/// Error minting a token.
#[derive(Debug, thiserror::Error)]
#[error("could not sign token: {0}")]
pub struct IssueError(String);

/// Signs an EdDSA JWT for `sub` with space-separated `scope`, valid for `ttl_secs` from `now_secs`.
pub fn issue(pkcs8_der: &[u8], sub: &str, scope: &str, ttl_secs: i64, now_secs: i64) -> Result<String, IssueError> {
    let claims = Claims {
        sub,
        scope,
        iat: now_secs,
        nbf: now_secs,
        exp: now_secs.saturating_add(ttl_secs),
        jti: uuid::Uuid::now_v7().to_string(),
    };
    let header = Header::new(Algorithm::EdDSA);
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ed_der(pkcs8_der)).map_err(|e| IssueError(e.to_string()))
}
