//! The gRPC edge: one file per service. [`grpc`] admits and authenticates
//! each call from its headers (the [`CallContext`]: request id, peer, token,
//! client certificate identity, purpose); each handler then reads the body
//! ([`Edge::read`]: size, protobuf decoding, `convert` into domain input),
//! calls the app, and converts the result back. Errors become a `Status`
//! only through [`crate::error::to_status`].

pub mod access;
pub mod audit;
pub mod convert;
pub mod coverage;
pub mod grpc;
pub mod keys;
pub mod patient;
pub mod validate;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::app::{App, CallContext, Input, Named};
use crate::auth::Authenticator;
use crate::auth::limits::Limited;
use crate::auth::policy::Purpose;
use crate::auth::tls::service_identity;
use crate::clock::Clock;
use crate::domain::CalendarDate;
use crate::error::Description;
use validate::Checker;

pub use grpc::GrpcService;

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

    /// Who is calling and how, from the request's headers and connection
    /// alone: nothing of its body has been read.
    fn context(&self, headers: &http::HeaderMap, extensions: &http::Extensions) -> CallContext {
        let started = Instant::now();
        let request_id = headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|s| is_request_id(s))
            .map(str::to_string)
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let tls = extensions.get::<TlsConnectInfo<TcpConnectInfo>>();
        let remote = extensions
            .get::<TcpConnectInfo>()
            .and_then(TcpConnectInfo::remote_addr)
            .or_else(|| tls.and_then(|t| t.get_ref().remote_addr()));
        let client_address = remote.map(|a| a.to_string()).unwrap_or_default();
        let authorization = headers.get("authorization").and_then(|v| v.to_str().ok());
        let auth = self.auth.authenticate(authorization, self.clock.now_micros().div_euclid(1_000_000));
        // Taken first, so a call that is turned away holds no slot.
        let permit = self.app.limits().enter();
        let admission = match &permit {
            Err(l) => Err(*l),
            Ok(_) => {
                let rate_key = match &auth {
                    Ok(p) => format!("sub:{}", p.subject),
                    Err(_) => format!("addr:{}", remote.map(|a| a.ip().to_string()).unwrap_or_default()),
                };
                self.app.limits().check_rate(&rate_key)
            }
        };
        // rustls verified the chain against the client CA before this call existed;
        // only the leaf's identity is read here.
        let service =
            tls.and_then(|t| t.peer_certs()).and_then(|certs| certs.first().and_then(|c| service_identity(c.as_ref())));
        let purpose = match headers.get("x-purpose-of-use") {
            None => Ok(None),
            Some(v) => v.to_str().ok().and_then(|s| Purpose::parse(s.trim())).map(Some).ok_or(()),
        };
        let break_glass_reason = match headers.get("x-break-glass-reason") {
            None => Ok(None),
            Some(v) => v
                .to_str()
                .ok()
                .map(str::trim)
                .filter(|s| (1..=1000).contains(&s.len()) && s.bytes().all(|b| (0x20..0x7f).contains(&b)))
                .map(|s| Some(s.to_string()))
                .ok_or(()),
        };
        let idempotency_key = match headers.get("x-idempotency-key") {
            None => Ok(None),
            Some(v) => v
                .to_str()
                .ok()
                .filter(|s| (1..=255).contains(&s.len()) && s.bytes().all(|b| (0x21..0x7f).contains(&b)))
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
            idempotency_key,
            permit: permit.ok(),
            admission: admission.map_err(|l: Limited| l),
            started,
            local_operator: false,
        }
    }

    /// Reads a request body, but only for a caller that was admitted and
    /// authenticated (anyone else is refused without carevault decoding a
    /// byte): at most [`grpc::MAX_REQUEST_BYTES`] as received, then a
    /// protobuf `M`, then `parse` into domain input. Unknown fields are
    /// ignored: they count toward the size limit, and are neither stored nor
    /// echoed.
    fn read<M, T>(
        &self,
        ctx: &CallContext,
        body: &Bytes,
        parse: impl FnOnce(&mut Checker, &M) -> (Named, Option<T>),
    ) -> Input<T>
    where
        M: prost::Message + Default,
    {
        if !ctx.admitted() {
            return Input::unread();
        }
        let mut c = Checker::default();
        if body.len() > grpc::MAX_REQUEST_BYTES {
            c.bad("request", Description::TooLarge(grpc::MAX_REQUEST_BYTES));
            return Input::new(Named::default(), c.into_result(None));
        }
        let Ok(message) = M::decode(body.as_ref()) else {
            c.bad("request", "is not a valid protobuf encoding of the request message");
            return Input::new(Named::default(), c.into_result(None));
        };
        let (named, value) = parse(&mut c, &message);
        Input::new(named, c.into_result(value))
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
