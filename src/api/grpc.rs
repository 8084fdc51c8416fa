//! The gRPC transport of carevault's services.
//!
//! Requests arrive as raw bytes (a pass-through codec) instead of being
//! decoded by generated server code, so that carevault decides about every
//! call it can see:
//!
//! 1. the caller is admitted (concurrency cap, rate) and authenticated from
//!    the request headers alone; a refused caller's body is never decoded;
//! 2. the size limit ([`MAX_REQUEST_BYTES`]) is measured on the bytes
//!    received, unknown fields included;
//! 3. a body that does not decode is INVALID_ARGUMENT (field `request`),
//!    audited and logged like any invalid request;
//! 4. a body over the transport limit ([`MAX_TRANSPORT_BYTES`]), which tonic
//!    refuses before any handler runs, is RESOURCE_EXHAUSTED and audited too.
//!
//! Each service file lists its methods ([`Methods`]); replies are encoded
//! with prost.

use std::convert::Infallible;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes};
use tokio_stream::Stream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{Body as HttpBody, StdError, http};
use tonic::server::{Grpc, NamedService, ServerStreamingService, UnaryService};
use tonic::{Code, Request, Response, Status};

use super::Edge;
use crate::app::CallContext;
use crate::domain::Action;
use crate::error::{AppError, to_status};

/// Largest request accepted for processing: bytes of the message as
/// received. Larger ones are INVALID_ARGUMENT (field `request`), audited.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Largest message the transport reads at all; larger ones are refused
/// before they are buffered (RESOURCE_EXHAUSTED, audited).
pub const MAX_TRANSPORT_BYTES: usize = 1024 * 1024;

/// Largest HTTP/2 header list (all request metadata together) the server
/// accepts, so that an over-long token still reaches carevault and is
/// refused as UNAUTHENTICATED (audited) rather than by the HTTP/2 layer.
pub const MAX_HEADER_LIST_BYTES: u32 = 256 * 1024;

/// A future a handler returns, borrowing the edge and the call's context.
pub type HandlerFuture<'a, T> = Pin<Box<dyn std::future::Future<Output = Result<T, AppError>> + Send + 'a>>;

/// Reply messages of a server-streaming method, encoded.
pub type ReplyStream = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send>>;

/// How one method is served.
#[derive(Clone, Copy)]
pub enum Handler {
    /// One request, one reply (encoded).
    Unary(for<'a> fn(&'a Edge, &'a CallContext, Bytes) -> HandlerFuture<'a, Bytes>),
    /// One request, a stream of replies.
    ServerStreaming(for<'a> fn(&'a Edge, &'a CallContext, Bytes) -> HandlerFuture<'a, ReplyStream>),
}

/// One method of a service.
#[derive(Clone, Copy)]
pub struct Method {
    /// What a call of it is audited as.
    pub action: Action,
    /// Its handler.
    pub handler: Handler,
}

/// The methods of one proto service.
pub trait Methods: Send + Sync + 'static {
    /// The full service name, e.g. `carevault.v1.PatientService`.
    const NAME: &'static str;
    /// The method called `name` (e.g. `GetPatient`), if the service has one.
    fn find(name: &str) -> Option<Method>;
}

/// Declares a unary method: `unary!(Action, handler)`, where `handler` is an
/// `async fn(&Edge, &CallContext, Bytes) -> Result<impl prost::Message, AppError>`.
/// Runs a unary call again (up to twice) if it was aborted because the key
/// state changed while it ran (a key operation or an erasure through another
/// process; this process has taken the new state up by then), or because
/// the patient's data key changed between reading it and committing a write
/// sealed with it (a re-encryption batch; the next attempt reads the new
/// key). Each attempt has its own audit entry, the aborted one included; the
/// attempt changed nothing.
pub(crate) async fn retrying_key_state<T, F, Fut>(mut attempt: F) -> Result<T, AppError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, AppError>>,
{
    for _ in 0..2 {
        match attempt().await {
            Err(AppError::KeyStateMoved) => tracing::info!("the key state moved under a call; running it again"),
            Err(AppError::KeyChanged) => tracing::info!("a data key changed under a write; running it again"),
            other => return other,
        }
    }
    attempt().await
}

macro_rules! unary {
    ($action:expr, $handler:path) => {{
        fn serve<'a>(
            edge: &'a $crate::api::Edge,
            ctx: &'a $crate::app::CallContext,
            body: ::bytes::Bytes,
        ) -> $crate::api::grpc::HandlerFuture<'a, ::bytes::Bytes> {
            Box::pin(async move {
                $crate::api::grpc::retrying_key_state(|| $handler(edge, ctx, body.clone()))
                    .await
                    .map(|m| ::bytes::Bytes::from(::prost::Message::encode_to_vec(&m)))
            })
        }
        $crate::api::grpc::Method { action: $action, handler: $crate::api::grpc::Handler::Unary(serve) }
    }};
}
pub(crate) use unary;

/// Serves the methods `S` lists over the edge.
pub struct GrpcService<S> {
    edge: Edge,
    methods: PhantomData<fn() -> S>,
}

impl<S> GrpcService<S> {
    /// The service over `edge`.
    pub fn new(edge: Edge) -> Self {
        GrpcService { edge, methods: PhantomData }
    }
}

impl<S> Clone for GrpcService<S> {
    fn clone(&self) -> Self {
        GrpcService { edge: self.edge.clone(), methods: PhantomData }
    }
}

impl<S: Methods> NamedService for GrpcService<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tonic::codegen::Service<http::Request<B>> for GrpcService<S>
where
    S: Methods,
    B: HttpBody + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let edge = self.edge.clone();
        Box::pin(async move {
            let method = req.uri().path().rsplit_once('/').and_then(|(_, name)| S::find(name));
            let Some(method) = method else {
                return Ok(Status::unimplemented("no such method").into_http());
            };
            let ctx = edge.context(req.headers(), req.extensions());
            Ok(serve(edge, method, ctx, req).await)
        })
    }
}

/// Runs one call through tonic's framing with the pass-through codec. If
/// tonic refuses the body before the handler runs, the refusal is audited
/// here, with the context built from the headers.
async fn serve<B>(
    edge: Edge,
    method: Method,
    ctx: CallContext,
    req: http::Request<B>,
) -> http::Response<tonic::body::Body>
where
    B: HttpBody + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    let slot = Arc::new(Mutex::new(Some(ctx)));
    let mut grpc = Grpc::new(RawCodec).apply_max_message_size_config(Some(MAX_TRANSPORT_BYTES), Some(usize::MAX));
    let call = Call { edge: edge.clone(), slot: slot.clone(), handler: method.handler };
    let response = match method.handler {
        Handler::Unary(_) => grpc.unary(call, req).await,
        Handler::ServerStreaming(_) => grpc.server_streaming(call, req).await,
    };
    let unread = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
    let Some(ctx) = unread else { return response };
    let code = Status::from_header_map(response.headers()).map_or(Code::Unknown, |s| s.code());
    let refused = match code {
        Code::OutOfRange => AppError::TooLarge,
        _ => AppError::invalid("request", "is not one gRPC message this server can read (uncompressed protobuf)"),
    };
    let e = edge.app().refuse_unread(&ctx, method.action, refused).await;
    to_status(&e, &ctx.request_id).into_http()
}

/// One call handed to tonic: the handler, and the context it takes once the
/// body has arrived.
struct Call {
    edge: Edge,
    slot: Arc<Mutex<Option<CallContext>>>,
    handler: Handler,
}

impl Call {
    fn take(&self) -> Result<CallContext, Status> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner()).take().ok_or_else(|| Status::internal("internal error"))
    }
}

fn respond<T>(ctx: &CallContext, result: Result<T, AppError>) -> Result<Response<T>, Status> {
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

type CallFuture<T> = Pin<Box<dyn std::future::Future<Output = Result<Response<T>, Status>> + Send>>;

impl UnaryService<Bytes> for Call {
    type Response = Bytes;
    type Future = CallFuture<Bytes>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let (edge, handler, ctx) = (self.edge.clone(), self.handler, self.take());
        Box::pin(async move {
            let ctx = ctx?;
            let Handler::Unary(handler) = handler else { return Err(Status::internal("internal error")) };
            let result = handler(&edge, &ctx, request.into_inner()).await;
            respond(&ctx, result)
        })
    }
}

impl ServerStreamingService<Bytes> for Call {
    type Response = Bytes;
    type ResponseStream = ReplyStream;
    type Future = CallFuture<ReplyStream>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let (edge, handler, ctx) = (self.edge.clone(), self.handler, self.take());
        Box::pin(async move {
            let ctx = ctx?;
            let Handler::ServerStreaming(handler) = handler else { return Err(Status::internal("internal error")) };
            let result = handler(&edge, &ctx, request.into_inner()).await;
            respond(&ctx, result)
        })
    }
}

/// Requests pass through as the bytes received; replies are already encoded.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n)))
    }
}
