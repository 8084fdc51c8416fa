//! Who is calling and what they may do.
//!
//! - [`Authenticator`]: bearer JWTs signed with Ed25519 by a configured
//!   issuer, with issuer, audience, lifetime and clock-skew checks.
//! - [`tls`]: the calling service's identity from its client certificate.
//! - [`policy`]: principals to roles to permissions, purposes of use.
//! - [`limits`]: per-principal rate limits and the global concurrency limit.

pub mod limits;
pub mod policy;
pub mod tls;
pub mod token;

use std::collections::HashMap;
use std::sync::Mutex;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// An authenticated end user (or service account) from its bearer token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token subject: the unique principal.
    pub subject: String,
    /// The token's `roles` claim, as sent (the policy decides what they mean).
    pub token_roles: Vec<String>,
}

/// Why a caller is not authenticated. Client messages never echo the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    /// No authorization metadata.
    #[error("missing bearer token")]
    Missing,
    /// Not `Bearer <JWT>`, or the JWT or its claims are malformed.
    #[error("malformed token")]
    Malformed,
    /// Longer than [`MAX_TOKEN_LEN`] bytes.
    #[error("token too long")]
    TooLong,
    /// Signature does not verify under the issuer key, or wrong algorithm.
    #[error("bad signature")]
    BadSignature,
    /// Past `exp`.
    #[error("expired")]
    Expired,
    /// Before `nbf`.
    #[error("not yet valid")]
    NotYetValid,
    /// `exp` is further away than the maximum lifetime.
    #[error("lifetime exceeds maximum")]
    LifetimeTooLong,
    /// `iss` missing or not the configured issuer.
    #[error("wrong issuer")]
    WrongIssuer,
    /// `aud` missing or not the configured audience.
    #[error("wrong audience")]
    WrongAudience,
}

impl AuthFailure {
    /// The fixed message sent to the client.
    pub fn client_message(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing authorization: Bearer <token>",
            AuthFailure::Malformed => "malformed bearer token",
            AuthFailure::TooLong => "bearer token is longer than 8192 bytes",
            AuthFailure::BadSignature => "token signature is not valid for this server's issuer",
            AuthFailure::Expired => "token expired",
            AuthFailure::NotYetValid => "token not yet valid",
            AuthFailure::LifetimeTooLong => "token lifetime exceeds the server's maximum",
            AuthFailure::WrongIssuer => "token issuer is not the one this server trusts",
            AuthFailure::WrongAudience => "token audience is not this server",
        }
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: i64,
    #[serde(default)]
    iat: Option<i64>,
    #[serde(default)]
    nbf: Option<i64>,
    #[serde(default)]
    roles: Vec<String>,
}

/// Token checks, from configuration.
#[derive(Debug, Clone)]
pub struct TokenRules {
    /// Longest accepted lifetime (`exp - iat`, and `exp - now`), seconds.
    pub max_lifetime_secs: u64,
    /// Clock skew allowed on `exp` and `nbf`, seconds.
    pub leeway_secs: u64,
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud` (one of the token's audiences).
    pub audience: String,
}

/// Verifies bearer tokens.
///
/// Ed25519 verification costs about 50 µs, more than the rest of a read, and
/// clients reuse a token for many calls, so successfully verified tokens are
/// remembered (keyed by SHA-256 of the whole token) with their time claims.
/// A remembered token is re-checked against the clock on every use; only the
/// signature check is skipped, which cannot change for the same bytes.
pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
    max_lifetime_secs: i64,
    leeway_secs: i64,
    verified: Mutex<HashMap<[u8; 32], Verified>>,
}

/// Most tokens remembered; the cache is cleared when full.
const VERIFIED_CACHE_MAX: usize = 10_000;

#[derive(Clone)]
struct Verified {
    principal: Principal,
    exp: i64,
    nbf: Option<i64>,
}

/// Longest accepted token (bytes after `Bearer `).
pub const MAX_TOKEN_LEN: usize = 8192;

/// Longest accepted `sub`.
pub const MAX_SUBJECT_LEN: usize = 256;

impl Authenticator {
    /// From the issuer's Ed25519 public key (32 raw bytes) and the token rules.
    pub fn new(issuer_public_key: [u8; 32], rules: &TokenRules) -> Self {
        let key = DecodingKey::from_ed_der(&issuer_public_key);
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = rules.leeway_secs;
        // Time checks use the injected clock below, not the library's system time.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.set_issuer(&[rules.issuer.as_str()]);
        validation.set_audience(&[rules.audience.as_str()]);
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        Authenticator {
            key,
            validation,
            max_lifetime_secs: i64::try_from(rules.max_lifetime_secs).unwrap_or(i64::MAX),
            leeway_secs: i64::try_from(rules.leeway_secs).unwrap_or(0),
            verified: Mutex::new(HashMap::new()),
        }
    }

    /// Checks an `authorization` metadata value at time `now_secs`.
    pub fn authenticate(&self, authorization: Option<&str>, now_secs: i64) -> Result<Principal, AuthFailure> {
        let header = authorization.ok_or(AuthFailure::Missing)?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or(AuthFailure::Malformed)?
            .trim();
        if token.is_empty() {
            return Err(AuthFailure::Malformed);
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthFailure::TooLong);
        }
        let digest = crate::crypto::sha256(token.as_bytes());
        let cached = self.verified.lock().unwrap_or_else(|p| p.into_inner()).get(&digest).cloned();
        if let Some(v) = cached {
            self.check_times(v.exp, v.nbf, now_secs)?;
            return Ok(v.principal);
        }
        let verified = self.verify(token, now_secs)?;
        let mut cache = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= VERIFIED_CACHE_MAX {
            cache.clear();
        }
        cache.insert(digest, verified.clone());
        Ok(verified.principal)
    }

    fn check_times(&self, exp: i64, nbf: Option<i64>, now_secs: i64) -> Result<(), AuthFailure> {
        if exp.saturating_add(self.leeway_secs) < now_secs {
            return Err(AuthFailure::Expired);
        }
        if let Some(nbf) = nbf
            && nbf.saturating_sub(self.leeway_secs) > now_secs
        {
            return Err(AuthFailure::NotYetValid);
        }
        Ok(())
    }

    fn verify(&self, token: &str, now_secs: i64) -> Result<Verified, AuthFailure> {
        use jsonwebtoken::errors::ErrorKind;
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|e| match e.kind() {
            ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm | ErrorKind::InvalidEddsaKey => {
                AuthFailure::BadSignature
            }
            ErrorKind::InvalidIssuer => AuthFailure::WrongIssuer,
            ErrorKind::InvalidAudience => AuthFailure::WrongAudience,
            ErrorKind::MissingRequiredClaim(c) if c == "iss" => AuthFailure::WrongIssuer,
            ErrorKind::MissingRequiredClaim(c) if c == "aud" => AuthFailure::WrongAudience,
            _ => AuthFailure::Malformed,
        })?;
        let c = data.claims;
        self.check_times(c.exp, c.nbf, now_secs)?;
        if c.exp.saturating_sub(now_secs) > self.max_lifetime_secs.saturating_add(self.leeway_secs) {
            return Err(AuthFailure::LifetimeTooLong);
        }
        if let Some(iat) = c.iat
            && c.exp.saturating_sub(iat) > self.max_lifetime_secs
        {
            return Err(AuthFailure::LifetimeTooLong);
        }
        if c.sub.is_empty() || c.sub.len() > MAX_SUBJECT_LEN || c.sub.chars().any(char::is_control) {
            return Err(AuthFailure::Malformed);
        }
        if c.roles.len() > 32 || c.roles.iter().any(|r| r.len() > 64 || r.chars().any(char::is_control)) {
            return Err(AuthFailure::Malformed);
        }
        Ok(Verified { principal: Principal { subject: c.sub, token_roles: c.roles }, exp: c.exp, nbf: c.nbf })
    }
}

#[cfg(test)]
mod tests {
    use super::token::{TokenSpec, issue};
    use super::*;
    use crate::crypto::generate_issuer_key;

    const NOW: i64 = 1_800_000_000;

    fn rules() -> TokenRules {
        TokenRules {
            max_lifetime_secs: 3600,
            leeway_secs: 30,
            issuer: token::DEFAULT_ISSUER.into(),
            audience: token::DEFAULT_AUDIENCE.into(),
        }
    }

    fn setup() -> (crate::crypto::IssuerKeyPair, Authenticator) {
        let pair = generate_issuer_key().unwrap();
        let auth = Authenticator::new(pair.public_key, &rules());
        (pair, auth)
    }

    fn bearer(t: &str) -> String {
        format!("Bearer {t}")
    }

    fn spec(ttl: i64) -> TokenSpec {
        TokenSpec { ttl_secs: ttl, ..TokenSpec::new("x", &["front_desk"]) }
    }

    #[test]
    fn a_valid_token_yields_its_subject_and_roles_claim() {
        let (pair, auth) = setup();
        let t = issue(&pair.pkcs8_der, &TokenSpec::new("desk-1", &["front_desk", "bogus"]), NOW).unwrap();
        let p = auth.authenticate(Some(&bearer(&t)), NOW).unwrap();
        assert_eq!(p.subject, "desk-1");
        assert_eq!(p.token_roles, vec!["front_desk", "bogus"]);
    }

    #[test]
    fn bad_tokens_are_classified() {
        let (pair, auth) = setup();
        let mint = |s: &TokenSpec, now: i64| bearer(&issue(&pair.pkcs8_der, s, now).unwrap());
        assert_eq!(auth.authenticate(None, NOW), Err(AuthFailure::Missing));
        assert_eq!(auth.authenticate(Some("Basic abc"), NOW), Err(AuthFailure::Malformed));
        assert_eq!(auth.authenticate(Some("Bearer not.a.jwt"), NOW), Err(AuthFailure::Malformed));
        let other = generate_issuer_key().unwrap();
        let forged = issue(&other.pkcs8_der, &spec(600), NOW).unwrap();
        assert_eq!(auth.authenticate(Some(&bearer(&forged)), NOW), Err(AuthFailure::BadSignature));
        assert_eq!(auth.authenticate(Some(&mint(&spec(86_400), NOW)), NOW), Err(AuthFailure::LifetimeTooLong));
        assert_eq!(auth.authenticate(Some(&mint(&spec(60), 1_000_000_000)), NOW), Err(AuthFailure::Expired));
        assert_eq!(auth.authenticate(Some(&mint(&spec(600), NOW + 3600)), NOW), Err(AuthFailure::NotYetValid));
        let wrong_iss = TokenSpec { issuer: "someone-else".into(), ..spec(600) };
        assert_eq!(auth.authenticate(Some(&mint(&wrong_iss, NOW)), NOW), Err(AuthFailure::WrongIssuer));
        let wrong_aud = TokenSpec { audience: "another-service".into(), ..spec(600) };
        assert_eq!(auth.authenticate(Some(&mint(&wrong_aud, NOW)), NOW), Err(AuthFailure::WrongAudience));
    }

    #[test]
    fn clock_skew_is_allowed_up_to_the_leeway_on_nbf_and_exp() {
        let (pair, auth) = setup();
        let mint = |s: &TokenSpec| bearer(&issue(&pair.pkcs8_der, s, NOW).unwrap());
        // nbf 20 s ahead (issuer's clock fast): inside the 30 s leeway.
        let early = TokenSpec { not_before_offset_secs: 20, ..spec(600) };
        assert!(auth.authenticate(Some(&mint(&early)), NOW).is_ok());
        let too_early = TokenSpec { not_before_offset_secs: 45, ..spec(600) };
        assert_eq!(auth.authenticate(Some(&mint(&too_early)), NOW), Err(AuthFailure::NotYetValid));
        let t = mint(&spec(60));
        assert!(auth.authenticate(Some(&t), NOW + 80).is_ok(), "20 s past exp is within leeway");
        assert_eq!(auth.authenticate(Some(&t), NOW + 100), Err(AuthFailure::Expired));
    }

    #[test]
    fn a_remembered_token_still_expires_on_time() {
        let (pair, auth) = setup();
        let t = issue(&pair.pkcs8_der, &spec(600), NOW).unwrap();
        assert!(auth.authenticate(Some(&bearer(&t)), NOW).is_ok());
        assert!(auth.authenticate(Some(&bearer(&t)), NOW + 300).is_ok());
        assert_eq!(auth.authenticate(Some(&bearer(&t)), NOW + 700), Err(AuthFailure::Expired));
        // A token differing in one signature character is verified afresh and refused.
        let mut forged = t.clone();
        let last = forged.pop().unwrap();
        forged.push(if last == 'A' { 'B' } else { 'A' });
        assert!(auth.authenticate(Some(&bearer(&forged)), NOW).is_err());
    }
}
