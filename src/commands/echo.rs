//! The bench's echo floor: a gRPC service that only `carevault bench` serves,
//! on its in-process server beside the product's services (never by
//! `carevault serve`, and not in proto/).
//!
//! `carevault.bench.v1.EchoService/GetPatient` takes a `GetPatientRequest`
//! with the same bearer token and purpose-of-use headers as a real call,
//! and replies with a `GetPatientResponse` holding a stored patient's message
//! (one of up to [`SAMPLE`] patients the preload created, as CreatePatient
//! returned them, its id set to the one asked for). It decodes the request and
//! encodes the reply with prost through tonic's framing, as every carevault
//! call does, and nothing else: no token check beyond its presence, no
//! storage, no crypto, no audit. What it costs is the floor any
//! authenticated, record-sized RPC pays on this machine. `GetPatientBare` is
//! the same call sent without the bearer token (the `echo-bare` workload):
//! the difference is what carrying the token costs, which a caller
//! identified by its client certificate alone would not pay.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use carevault::proto::v1 as pb;
use tonic::codegen::{Body as HttpBody, StdError, http};
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// The service's full name.
pub const NAME: &str = "carevault.bench.v1.EchoService";
/// Its method's path.
const PATH: &str = "/carevault.bench.v1.EchoService/GetPatient";
/// The same method without a token: what a caller identified by its client
/// certificate alone would send (the `echo-bare` workload).
const BARE_PATH: &str = "/carevault.bench.v1.EchoService/GetPatientBare";
/// How many stored patients' messages the echo keeps to reply with.
pub const SAMPLE: usize = 1024;

/// The echo service; clones share the sample.
#[derive(Clone, Default)]
pub struct Echo {
    sample: Arc<RwLock<Vec<pb::Patient>>>,
}

impl Echo {
    /// Keeps `patient` (a stored patient's message) to reply with, up to [`SAMPLE`].
    pub fn keep(&self, patient: pb::Patient) {
        let mut sample = self.sample.write().unwrap_or_else(|p| p.into_inner());
        if sample.len() < SAMPLE {
            sample.push(patient);
        }
    }

    fn reply(&self, patient_id: String) -> Result<pb::GetPatientResponse, Status> {
        let sample = self.sample.read().unwrap_or_else(|p| p.into_inner());
        if sample.is_empty() {
            return Err(Status::failed_precondition("the echo service holds no patient yet"));
        }
        // The same id gets the same stored message; FNV-1a spreads ids over the sample.
        let h =
            patient_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        let mut patient = sample[(h % sample.len() as u64) as usize].clone();
        patient.id = patient_id;
        Ok(pb::GetPatientResponse { patient: Some(patient) })
    }
}

impl NamedService for Echo {
    const NAME: &'static str = NAME;
}

impl<B> tonic::codegen::Service<http::Request<B>> for Echo
where
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
        let me = self.clone();
        Box::pin(async move {
            let bare = match req.uri().path() {
                PATH => false,
                BARE_PATH => true,
                _ => return Ok(Status::unimplemented("no such method").into_http()),
            };
            let mut grpc =
                Grpc::new(tonic_prost::ProstCodec::<pb::GetPatientResponse, pb::GetPatientRequest>::default());
            Ok(grpc.unary(Method { echo: me, bare }, req).await)
        })
    }
}

/// One call of a method: with a token required, or bare.
struct Method {
    echo: Echo,
    bare: bool,
}

impl UnaryService<pb::GetPatientRequest> for Method {
    type Response = pb::GetPatientResponse;
    type Future = std::future::Ready<Result<Response<pb::GetPatientResponse>, Status>>;

    fn call(&mut self, request: Request<pb::GetPatientRequest>) -> Self::Future {
        let bearer = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("Bearer "));
        let result = if bearer || self.bare {
            self.echo.reply(request.into_inner().patient_id).map(Response::new)
        } else {
            Err(Status::unauthenticated("a bearer token is required"))
        };
        std::future::ready(result)
    }
}

/// Calls the echo's GetPatient over `ch` (`bare`: GetPatientBare, which needs no token).
pub async fn get_patient(
    ch: &Channel,
    request: Request<pb::GetPatientRequest>,
    bare: bool,
) -> Result<Response<pb::GetPatientResponse>, Status> {
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready().await.map_err(|e| Status::unavailable(format!("the channel is not ready: {e}")))?;
    let codec = tonic_prost::ProstCodec::<pb::GetPatientRequest, pb::GetPatientResponse>::default();
    let path = http::uri::PathAndQuery::from_static(if bare { BARE_PATH } else { PATH });
    grpc.unary(request, path, codec).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_echo_replies_with_a_kept_patient_under_the_id_asked_for() {
        let echo = Echo::default();
        assert_eq!(echo.reply("a".into()).unwrap_err().code(), tonic::Code::FailedPrecondition);
        for i in 0..SAMPLE + 10 {
            echo.keep(pb::Patient { id: format!("p{i}"), birth_date: "1980-01-02".into(), ..Default::default() });
        }
        assert_eq!(echo.sample.read().unwrap().len(), SAMPLE);
        let got = echo.reply("0190c2a0-0000-7000-8000-000000000001".into()).unwrap().patient.unwrap();
        assert_eq!(got.id, "0190c2a0-0000-7000-8000-000000000001");
        assert_eq!(got.birth_date, "1980-01-02");
        let again = echo.reply("0190c2a0-0000-7000-8000-000000000001".into()).unwrap();
        assert_eq!(again.patient.unwrap(), got);
    }

    #[tokio::test]
    async fn get_patient_needs_a_bearer_token_and_get_patient_bare_does_not() {
        let echo = Echo::default();
        echo.keep(pb::Patient { id: "p".into(), ..Default::default() });
        let ask = |token: Option<&str>| {
            let mut r = Request::new(pb::GetPatientRequest { patient_id: "q".into() });
            if let Some(t) = token {
                r.metadata_mut().insert("authorization", t.parse().unwrap());
            }
            r
        };
        let mut with = Method { echo: echo.clone(), bare: false };
        let mut bare = Method { echo, bare: true };
        assert_eq!(with.call(ask(None)).await.unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(with.call(ask(Some("Basic x"))).await.unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(with.call(ask(Some("Bearer t"))).await.unwrap().into_inner().patient.unwrap().id, "q");
        assert_eq!(bare.call(ask(None)).await.unwrap().into_inner().patient.unwrap().id, "q");
    }
}
