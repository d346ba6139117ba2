//! The gRPC side: `GatewayControl`, the service gateways dial out to.
//!
//! `ControlStream` authenticates the gateway by the credential in its `authorization` metadata,
//! waits for its `Hello`, then answers with a `Welcome` followed by every change of its
//! desired state (only the newest is sent if several pile up). A reader task owned by the
//! stream takes heartbeats, status reports and acknowledgements; three heartbeat intervals of
//! silence end the stream, and the gateway reconnects.
//!
//! `Uplink` takes result batches: it answers the gateway's `UplinkOpen` with what the
//! [`ResultStore`] already holds, then acknowledges batches once they are written (see
//! [`crate::results`]). Duplicates are acknowledged too, so the gateway can delete them.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, WatchStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use weir_proto::cloud::gateway_control_server::GatewayControl;
use weir_proto::cloud::{
    BatchRejected, CloudMessage, EnrollRequest, EnrollResponse, GatewayMessage, SeqRange,
    SeqRanges, StreamRanges, UplinkMessage, UplinkReply, cloud_message, gateway_message,
    uplink_message, uplink_reply,
};

use crate::fleet::{Fleet, SessionUpdate};
use crate::results::{Received, ResultStore};

pub struct ControlService {
    fleet: Arc<Fleet>,
    results: Arc<ResultStore>,
}

impl ControlService {
    pub fn new(fleet: Arc<Fleet>, results: Arc<ResultStore>) -> Self {
        Self { fleet, results }
    }
}

type CloudStream = Pin<Box<dyn Stream<Item = Result<CloudMessage, Status>> + Send>>;
type ReplyStream = Pin<Box<dyn Stream<Item = Result<UplinkReply, Status>> + Send>>;

fn reply(kind: uplink_reply::Kind) -> Result<UplinkReply, Status> {
    Ok(UplinkReply { kind: Some(kind) })
}

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

    type UplinkStream = ReplyStream;

    async fn uplink(
        &self,
        request: Request<Streaming<UplinkMessage>>,
    ) -> Result<Response<Self::UplinkStream>, Status> {
        let credential = bearer(&request)?.to_owned();
        let gateway = self.fleet.authenticate_gateway(&credential)?;
        let mut inbound = request.into_inner();
        let silence = self.fleet.heartbeat_interval() * 3;
        let first = tokio::time::timeout(silence, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no UplinkOpen from the gateway"))??;
        let Some(UplinkMessage {
            kind: Some(uplink_message::Kind::Open(open)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "the first message of an uplink must be UplinkOpen",
            ));
        };
        let (replies, receiver) = mpsc::channel(64);
        let _ = replies
            .send(reply(uplink_reply::Kind::Resume(
                self.results.stored_within(&gateway.id, &open.streams),
            )))
            .await;
        let fleet = Arc::clone(&self.fleet);
        let results = Arc::clone(&self.results);
        tokio::spawn(async move {
            let id = gateway.id.clone();
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            // Duplicates of batches another (older) stream of this gateway still buffers:
            // acknowledged here once that stream has written them.
            let mut awaiting: Vec<(String, u64)> = Vec::new();
            loop {
                tokio::select! {
                    message = inbound.message() => {
                        let batch = match message {
                            Ok(Some(UplinkMessage { kind: Some(uplink_message::Kind::Batch(batch)) })) => batch,
                            Ok(Some(_)) => continue,
                            Ok(None) | Err(_) => break,
                        };
                        let answer = match results.receive(&id, &gateway.name, &batch.stream, batch.seq, &batch.arrow_ipc) {
                            Ok(Received::Buffered) => None,
                            Ok(Received::Duplicate { stored: false }) => {
                                awaiting.push((batch.stream.clone(), batch.seq));
                                None
                            }
                            Ok(Received::Duplicate { stored: true }) => Some(uplink_reply::Kind::Stored(SeqRanges {
                                streams: vec![StreamRanges {
                                    stream: batch.stream.clone(),
                                    ranges: vec![SeqRange { first: batch.seq, last: batch.seq }],
                                }],
                            })),
                            Err(error) => {
                                tracing::warn!(gateway = %gateway.name, stream = %batch.stream, seq = batch.seq, %error, "result batch refused");
                                Some(uplink_reply::Kind::Rejected(BatchRejected {
                                    stream: batch.stream.clone(),
                                    seq: batch.seq,
                                    reason: error.to_string(),
                                }))
                            }
                        };
                        if let Some(answer) = answer
                            && replies.send(reply(answer)).await.is_err()
                        {
                            break;
                        }
                    }
                    _ = tick.tick() => {
                        // A revoked gateway's uplink ends with its control stream.
                        if fleet.authenticate_gateway(&credential).is_err() {
                            break;
                        }
                        let (done, waiting): (Vec<_>, Vec<_>) = awaiting
                            .drain(..)
                            .partition(|(stream, seq)| results.is_stored(&id, stream, *seq));
                        awaiting = waiting;
                        if !done.is_empty() {
                            let streams = done
                                .into_iter()
                                .map(|(stream, seq)| StreamRanges {
                                    stream,
                                    ranges: vec![SeqRange { first: seq, last: seq }],
                                })
                                .collect();
                            if replies.send(reply(uplink_reply::Kind::Stored(SeqRanges { streams }))).await.is_err() {
                                break;
                            }
                        }
                        if !results.has_buffered(&id) {
                            continue;
                        }
                        let stored = results.flush(&id, false).await;
                        match stored {
                            Ok(stored) if !stored.streams.is_empty() => {
                                if replies.send(reply(uplink_reply::Kind::Stored(stored))).await.is_err() {
                                    break;
                                }
                            }
                            Ok(_) => {}
                            // Logged by the store; the batches stay buffered and unacknowledged.
                            Err(_) => {}
                        }
                    }
                }
            }
            // Write what is buffered even though no acknowledgement can reach the gateway:
            // the gateway sends the batches again and they are dropped as duplicates.
            if let Err(error) = results.flush(&id, true).await {
                tracing::warn!(gateway = %gateway.name, %error, "results of a closed uplink not written");
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}
