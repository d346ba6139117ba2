//! The gRPC side: `GatewayControl`, the service gateways dial out to.
//!
//! `ControlStream` authenticates the gateway by the credential in its `authorization` metadata,
//! waits for its `Hello`, then answers with a `Welcome` followed by every change of its
//! desired state (only the newest is sent if several pile up). A reader task owned by the
//! stream takes heartbeats, status reports and acknowledgements; three heartbeat intervals of
//! silence end the stream, and the gateway reconnects.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::wrappers::WatchStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use weir_proto::cloud::gateway_control_server::GatewayControl;
use weir_proto::cloud::{
    CloudMessage, EnrollRequest, EnrollResponse, GatewayMessage, cloud_message, gateway_message,
};

use crate::fleet::{Fleet, SessionUpdate};

pub struct ControlService {
    fleet: Arc<Fleet>,
}

impl ControlService {
    pub fn new(fleet: Arc<Fleet>) -> Self {
        Self { fleet }
    }
}

type CloudStream = Pin<Box<dyn Stream<Item = Result<CloudMessage, Status>> + Send>>;

fn bearer<T>(request: &Request<T>) -> Result<&str, Status> {
    request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            Status::unauthenticated(
                "no gateway credential: send `authorization: Bearer <credential>` (enroll first)",
            )
        })
}

#[tonic::async_trait]
impl GatewayControl for ControlService {
    async fn enroll(
        &self,
        request: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        let request = request.into_inner();
        let response = self.fleet.enroll(request.token.trim(), &request.hostname)?;
        Ok(Response::new(response))
    }

    type ControlStreamStream = CloudStream;

    async fn control_stream(
        &self,
        request: Request<Streaming<GatewayMessage>>,
    ) -> Result<Response<Self::ControlStreamStream>, Status> {
        let gateway = self.fleet.authenticate_gateway(bearer(&request)?)?;
        let mut inbound = request.into_inner();
        let silence = self.fleet.heartbeat_interval() * 3;
        let first = tokio::time::timeout(silence, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello from the gateway"))??;
        let Some(GatewayMessage {
            kind: Some(gateway_message::Kind::Hello(hello)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "the first message of a stream must be Hello",
            ));
        };
        let (connection, welcome, desired) = self.fleet.connect(&gateway, hello.running)?;
        tracing::info!(gateway = %gateway.name, agent = %hello.agent_version, "gateway connected");

        let fleet = Arc::clone(&self.fleet);
        let id = gateway.id.clone();
        // The reader lives as long as the stream: it ends when the gateway hangs up, goes
        // silent, or the fleet drops the session (revoked or replaced).
        tokio::spawn(async move {
            let why = loop {
                let message = match tokio::time::timeout(silence, inbound.message()).await {
                    Err(_) => break "missed heartbeats",
                    Ok(Err(_)) => break "stream error",
                    Ok(Ok(None)) => break "stream closed",
                    Ok(Ok(Some(message))) => message,
                };
                let update = match message.kind {
                    Some(gateway_message::Kind::Heartbeat(_)) => SessionUpdate::Heartbeat,
                    Some(gateway_message::Kind::Status(report)) => SessionUpdate::Status(report),
                    Some(gateway_message::Kind::Ack(ack)) => SessionUpdate::Ack(ack),
                    Some(gateway_message::Kind::Hello(_)) | None => SessionUpdate::Heartbeat,
                };
                if !fleet.seen(&id, connection, update) {
                    break "session replaced or revoked";
                }
            };
            fleet.disconnect(&id, connection, why);
        });

        let welcome = tokio_stream::once(Ok(CloudMessage {
            kind: Some(cloud_message::Kind::Welcome(welcome)),
        }));
        let changes = WatchStream::new(desired).filter_map(|desired| {
            desired.map(|d| {
                Ok(CloudMessage {
                    kind: Some(cloud_message::Kind::Desired(d)),
                })
            })
        });
        Ok(Response::new(Box::pin(welcome.chain(changes))))
    }
}
