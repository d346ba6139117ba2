//! The cloud over real gRPC and HTTP on loopback: standard health checking and reflection
//! (what grpcurl uses), enrollment refusals, and a hand-written gateway client that receives
//! signed plans for its labels.

use std::time::Duration;

use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use weir_cloud::fleet::{Caller, DeployRequest};
use weir_cloud::selector::parse_labels;
use weir_cloud::{Cloud, CloudConfig, Role};
use weir_proto::cloud::gateway_control_client::GatewayControlClient;
use weir_proto::cloud::{
    EnrollRequest, GatewayMessage, Hello, PlanEnvelope, cloud_message, gateway_message,
};

async fn start(dir: &std::path::Path) -> Cloud {
    Cloud::start(CloudConfig {
        data_dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().expect("address"),
        heartbeat_interval: Duration::from_millis(200),
        ..CloudConfig::default()
    })
    .await
    .expect("the cloud starts")
}

const SQL: &str = "
CREATE SOURCE vib (sensor TEXT NOT NULL, ts TIMESTAMP NOT NULL, v DOUBLE)
WITH (connector = 'simulator', sensors = 1, rate_hz = 10);
CREATE SINK out WITH (connector = 'null');
CREATE PIPELINE copy AS INSERT INTO out SELECT sensor, ts, v FROM vib;
";

fn admin() -> Caller {
    Caller {
        name: "test".into(),
        role: Role::Admin,
    }
}

#[tokio::test]
async fn bad_settings_are_refused_before_anything_listens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Err(error) = Cloud::start(CloudConfig {
        data_dir: dir.path().to_path_buf(),
        listen: "0.0.0.0:0".parse().expect("address"),
        ..CloudConfig::default()
    })
    .await
    else {
        panic!("plain HTTP on every address must be refused");
    };
    assert!(error.to_string().contains("add --tls"), "{error}");
    let Err(error) = Cloud::start(CloudConfig {
        data_dir: dir.path().to_path_buf(),
        listen: "127.0.0.1:0".parse().expect("address"),
        heartbeat_interval: Duration::ZERO,
        ..CloudConfig::default()
    })
    .await
    else {
        panic!("a zero heartbeat must be refused");
    };
    assert!(error.to_string().contains("too short"), "{error}");
}

#[tokio::test]
async fn standard_grpc_tools_see_health_and_every_service() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = start(dir.path()).await;
    let url = format!("http://{}", cloud.address());

    let channel = tonic::transport::Endpoint::from_shared(url)
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel.clone());
    let answer = health
        .check(HealthCheckRequest {
            service: "weir.cloud.v1.GatewayControl".into(),
        })
        .await
        .expect("health check")
        .into_inner();
    assert_eq!(answer.status, ServingStatus::Serving as i32);

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::once(request))
        .await
        .expect("reflection")
        .into_inner();
    let Some(Ok(answer)) = answers.next().await else {
        panic!("no reflection answer");
    };
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"weir.cloud.v1.GatewayControl".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );
    cloud.shutdown().await;
}

#[tokio::test]
async fn an_enrolled_gateway_receives_signed_plans_for_its_labels_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = start(dir.path()).await;
    let url = format!("http://{}", cloud.address());
    let fleet = cloud.fleet().clone();
    let labels = parse_labels(["site=plant1"]).expect("labels");
    let (_, token) = fleet.add_gateway(&admin(), "gw1", labels).expect("add");

    let mut client = GatewayControlClient::connect(url).await.expect("connect");
    let refused = client
        .enroll(EnrollRequest {
            token: "we_unknown".into(),
            hostname: "h".into(),
        })
        .await
        .expect_err("unknown token");
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert_eq!(refused.message(), "the enrollment token is not valid");

    let enrolled = client
        .enroll(EnrollRequest {
            token: token.clone(),
            hostname: "h".into(),
        })
        .await
        .expect("enroll")
        .into_inner();
    assert_eq!(enrolled.name, "gw1");
    assert_eq!(enrolled.plan_public_key.len(), 32);
    let reused = client
        .enroll(EnrollRequest {
            token,
            hostname: "h".into(),
        })
        .await
        .expect_err("a token works once");
    assert_eq!(reused.message(), "the enrollment token is not valid");

    // No credential, no stream.
    let hello = GatewayMessage {
        kind: Some(gateway_message::Kind::Hello(Hello::default())),
    };
    let anonymous = client
        .control_stream(tokio_stream::once(hello.clone()))
        .await
        .expect_err("no credential");
    assert_eq!(anonymous.code(), Code::Unauthenticated);

    let (outbound, receiver) = tokio::sync::mpsc::channel(4);
    outbound.send(hello).await.expect("send");
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(receiver));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", enrolled.credential)
            .parse()
            .expect("header"),
    );
    let mut inbound = client
        .control_stream(request)
        .await
        .expect("stream")
        .into_inner();
    let first = inbound
        .message()
        .await
        .expect("welcome")
        .expect("a message");
    assert!(matches!(first.kind, Some(cloud_message::Kind::Welcome(_))));
    let empty = inbound
        .message()
        .await
        .expect("desired")
        .expect("a message");
    let Some(cloud_message::Kind::Desired(empty)) = empty.kind else {
        panic!("expected the desired state");
    };
    assert!(empty.plans.is_empty(), "nothing is deployed yet");

    let deploy = |selector: &str| DeployRequest {
        name: Some(format!("to-{}", selector.replace(['=', ','], "-"))),
        sql: SQL.into(),
        file: "copy.sql".into(),
        selector: selector.into(),
        priority: 0,
        canary: 0,
        bake: Duration::ZERO,
        max_errors: 0,
        fresh: false,
    };
    fleet
        .deploy(&admin(), deploy("site=plant2"))
        .expect("deploy elsewhere");
    let outcome = fleet
        .deploy(&admin(), deploy("site=plant1"))
        .expect("deploy here");
    assert_eq!(outcome.targets, ["gw1"]);
    let desired = inbound
        .message()
        .await
        .expect("desired")
        .expect("a message");
    let Some(cloud_message::Kind::Desired(desired)) = desired.kind else {
        panic!("expected the desired state");
    };
    assert_eq!(desired.plans.len(), 1);
    let key = ring::signature::UnparsedPublicKey::new(
        &ring::signature::ED25519,
        enrolled.plan_public_key.clone(),
    );
    let plan = &desired.plans[0];
    key.verify(&plan.payload, &plan.signature)
        .expect("the plan is signed by the key given at enrollment");
    let envelope: PlanEnvelope = prost::Message::decode(plan.payload.as_slice()).expect("envelope");
    assert_eq!((envelope.pipeline.as_str(), envelope.version), ("copy", 2));
    assert_eq!(envelope.deployment, "to-site-plant1");
    drop(outbound);
    cloud.shutdown().await;
}
