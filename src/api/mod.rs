//! The gRPC edge: one file per service. Each handler builds a
//! [`CallContext`] (request id, peer, token check), parses the request into
//! domain input (`convert`), calls the app, and converts the result back.
//! Errors become a `Status` only through [`crate::error::to_status`].

pub mod access;
pub mod audit;
pub mod convert;
pub mod coverage;
pub mod keys;
pub mod patient;
pub mod validate;

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};

use crate::app::{App, CallContext};
use crate::auth::Authenticator;
use crate::auth::policy::Purpose;
use crate::auth::tls::service_identity;
use crate::clock::Clock;
use crate::domain::CalendarDate;
use crate::error::{AppError, to_status};

/// State shared by the service implementations.
#[derive(Clone)]
pub struct Edge {
    app: App,
    auth: Arc<Authenticator>,
    clock: Arc<dyn Clock>,
}

impl Edge {
    /// Builds the edge over an app and an authenticator.
    pub fn new(app: App, auth: Arc<Authenticator>, clock: Arc<dyn Clock>) -> Self {
        Edge { app, auth, clock }
    }

    fn context<T>(&self, req: &Request<T>) -> CallContext {
        let started = Instant::now();
        let md = req.metadata();
        let request_id = md
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|s| is_request_id(s))
            .map(str::to_string)
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let client_address = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        // Taken first, so a call that is turned away holds no slot.
        let permit = self.app.limits().enter();
        let authorization = md.get("authorization").and_then(|v| v.to_str().ok());
        let auth = self.auth.authenticate(authorization, self.clock.now_micros().div_euclid(1_000_000));
        // rustls verified the chain against the client CA before this call existed;
        // only the leaf's identity is read here.
        let service = req.peer_certs().and_then(|certs| certs.first().and_then(|c| service_identity(c.as_ref())));
        let purpose = match md.get("x-purpose-of-use") {
            None => Ok(None),
            Some(v) => v.to_str().ok().and_then(|s| Purpose::parse(s.trim())).map(Some).ok_or(()),
        };
        let break_glass_reason = match md.get("x-break-glass-reason") {
            None => Ok(None),
            Some(v) => v
                .to_str()
                .ok()
                .map(str::trim)
                .filter(|s| (1..=1000).contains(&s.len()) && s.bytes().all(|b| (0x20..0x7f).contains(&b)))
                .map(|s| Some(s.to_string()))
                .ok_or(()),
        };
        CallContext {
            request_id,
            client_address,
            auth,
            service,
            purpose,
            break_glass_reason,
            permit,
            started,
            local_operator: false,
        }
    }

    /// The application behind the edge (offline key commands and job resumption).
    pub fn app(&self) -> &App {
        &self.app
    }

    fn today(&self) -> CalendarDate {
        CalendarDate::from_micros(self.clock.now_micros())
    }
}

/// A client-supplied request id is kept only if it is short and plain, so it
/// cannot smuggle PHI or control characters into logs and audit entries.
fn is_request_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// Builds the response (or status), both carrying x-request-id.
fn reply<T>(ctx: &CallContext, result: Result<T, AppError>) -> Result<Response<T>, Status> {
    match result {
        Ok(v) => {
            let mut resp = Response::new(v);
            if let Ok(val) = ctx.request_id.parse() {
                resp.metadata_mut().insert("x-request-id", val);
            }
            Ok(resp)
        }
        Err(e) => Err(to_status(&e, &ctx.request_id)),
    }
}

/// An opaque page token: URL-safe base64 of `prefix` followed by `position`.
fn encode_page_token(prefix: &str, position: impl std::fmt::Display) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{prefix}{position}"))
}

/// Decodes a token made by [`encode_page_token`] with the same `prefix`; an
/// empty token is `None`, a bad one a violation of `page_token` (`bad`
/// names the RPC that hands such tokens out).
fn decode_page_token<T>(
    c: &mut validate::Checker,
    token: &str,
    prefix: &str,
    parse: impl FnOnce(&str) -> Option<T>,
    bad: &'static str,
) -> Option<T> {
    use base64::Engine;
    if token.is_empty() {
        return None;
    }
    let parsed = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.strip_prefix(prefix).and_then(parse));
    if parsed.is_none() {
        c.bad("page_token", bad);
    }
    parsed
}

/// Page size: 0 means `default`; otherwise 1..=max.
fn page_size(c: &mut validate::Checker, field: &str, v: i32, default: usize, max: usize) -> usize {
    match usize::try_from(v) {
        Ok(0) => default,
        Ok(n) if n <= max => n,
        _ => {
            c.bad(field, "must be between 0 and the maximum page size");
            default
        }
    }
}
