//! `cloud-fanout`: one `weir cloud` process and G simulated gateway agents in this process,
//! each a real gRPC client with its own connection over loopback.
//!
//! Measured: the cloud's resident memory per connected gateway, the time from a deploy to
//! the moment every agent has verified the plan's signature and acknowledged it, and, after
//! the cloud is killed and restarted, the time until every agent is connected again.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use prost::Message as _;
use ring::signature::{ED25519, UnparsedPublicKey};
use serde::Serialize;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tonic::transport::{Channel, Endpoint};
use weir_proto::cloud::gateway_control_client::GatewayControlClient;
use weir_proto::cloud::{
    EnrollRequest, GatewayMessage, Heartbeat, Hello, PlanAck, PlanEnvelope, PlanResult,
    cloud_message, gateway_message,
};

#[derive(Debug, Serialize)]
pub struct FanoutResult {
    pub scenario: &'static str,
    pub gateways: usize,
    /// Cloud RSS growth from before the agents connected to after, per gateway.
    pub cloud_kb_per_gateway: f64,
    pub cloud_rss_mb: f64,
    /// Deploy request sent -> every agent verified and acknowledged the signed plan.
    pub deploy_to_all_s: f64,
    /// Cloud restarted (process spawned) -> every agent connected and welcomed again.
    pub reconnect_storm_s: f64,
    pub correct: bool,
}

const SQL: &str = "
CREATE SOURCE vib (sensor TEXT NOT NULL, ts TIMESTAMP NOT NULL, v DOUBLE,
    WATERMARK FOR ts AS ts - INTERVAL '2' SECOND)
WITH (connector = 'simulator', sensors = 10, rate_hz = 1000, realtime = true);
CREATE SINK rms_out WITH (connector = 'null');
CREATE PIPELINE vibration_rms AS INSERT INTO rms_out
SELECT sensor, window_start, window_end, sqrt(avg(v * v)) AS rms, max(abs(v)) AS peak
FROM TUMBLE(vib, ts, INTERVAL '1' SECOND) GROUP BY sensor, window_start, window_end;
";

struct CloudProcess {
    child: Child,
}

impl CloudProcess {
    fn start(data: &Path, port: u16) -> anyhow::Result<Self> {
        let child = Command::new(std::env::current_exe()?)
            .args(["cloud", "--heartbeat", "5s", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data")
            .arg(data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting weir cloud")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("weir cloud did not listen on {port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self { child })
    }

    fn rss_mb(&self) -> f64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
            .map_or(0.0, |kb| kb / 1024.0)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for CloudProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What all agents have reached, for the bench to wait on.
#[derive(Default)]
struct Progress {
    welcomed: AtomicUsize,
    acknowledged: AtomicUsize,
    bad_signatures: AtomicUsize,
    changed: Notify,
}

impl Progress {
    async fn wait(&self, counter: &AtomicUsize, target: usize, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let notified = self.changed.notified();
            if counter.load(Ordering::Acquire) >= target {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), notified).await;
        }
    }
}

pub fn run(gateways: usize) -> anyhow::Result<FanoutResult> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    runtime.block_on(fanout(gateways))
}

async fn fanout(gateways: usize) -> anyhow::Result<FanoutResult> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("cloud");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let mut cloud = CloudProcess::start(&data, port)?;
    let token = std::fs::read_to_string(data.join("admin.token"))?;
    let http = crate::http::client_builder(None)?.build()?;

    eprintln!("cloud-fanout: registering and enrolling {gateways} gateways...");
    let shared = Endpoint::from_shared(url.clone())?.connect().await?;
    let mut setup = JoinSet::new();
    let mut credentials = Vec::with_capacity(gateways);
    for i in 0..gateways {
        let (http, token, url, channel) =
            (http.clone(), token.clone(), url.clone(), shared.clone());
        setup.spawn(async move {
            let body: serde_json::Value = http
                .post(format!("{url}/api/v1/gateways"))
                .bearer_auth(token.trim())
                .json(&serde_json::json!({ "name": format!("gw{i:05}"), "labels": { "site": "bench" } }))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            let enrollment = body["enrollment_token"].as_str().unwrap_or_default().to_owned();
            let enrolled = GatewayControlClient::new(channel)
                .enroll(EnrollRequest { token: enrollment, hostname: "bench".into() })
                .await?
                .into_inner();
            anyhow::Ok((enrolled.credential, enrolled.plan_public_key))
        });
        // Bounded concurrency: each registration is a synced write in the cloud.
        if setup.len() >= 64
            && let Some(done) = setup.join_next().await
        {
            credentials.push(done??);
        }
    }
    while let Some(done) = setup.join_next().await {
        credentials.push(done??);
    }

    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline_mb = cloud.rss_mb();
    let progress = Arc::new(Progress::default());
    eprintln!("cloud-fanout: connecting {gateways} agents...");
    let mut agents = JoinSet::new();
    for (credential, key) in credentials {
        agents.spawn(agent(url.clone(), credential, key, Arc::clone(&progress)));
    }
    if !progress
        .wait(&progress.welcomed, gateways, Duration::from_secs(120))
        .await
    {
        bail!(
            "only {} of {gateways} agents connected",
            progress.welcomed.load(Ordering::Acquire)
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let connected_mb = cloud.rss_mb();

    let started = Instant::now();
    http.post(format!("{url}/api/v1/deployments"))
        .bearer_auth(token.trim())
        .json(&serde_json::json!({ "sql": SQL, "file": "bench.sql", "selector": "site=bench" }))
        .send()
        .await?
        .error_for_status()?;
    let reached = progress
        .wait(&progress.acknowledged, gateways, Duration::from_secs(120))
        .await;
    let deploy_to_all_s = started.elapsed().as_secs_f64();

    eprintln!("cloud-fanout: killing and restarting the cloud...");
    progress.welcomed.store(0, Ordering::Release);
    cloud.kill();
    let restarted = Instant::now();
    let cloud = CloudProcess::start(&data, port)?;
    let back = progress
        .wait(&progress.welcomed, gateways, Duration::from_secs(300))
        .await;
    let reconnect_storm_s = restarted.elapsed().as_secs_f64();
    let cloud_rss_mb = cloud.rss_mb();
    agents.abort_all();
    Ok(FanoutResult {
        scenario: "cloud-fanout",
        gateways,
        cloud_kb_per_gateway: (connected_mb - baseline_mb) * 1024.0 / gateways as f64,
        cloud_rss_mb,
        deploy_to_all_s,
        reconnect_storm_s,
        correct: reached && back && progress.bad_signatures.load(Ordering::Acquire) == 0,
    })
}

/// A simulated gateway: holds its stream, verifies and acknowledges every plan, sends a
/// heartbeat every 5 s, and reconnects with backoff and jitter when the stream ends.
async fn agent(url: String, credential: String, key: Vec<u8>, progress: Arc<Progress>) {
    let key = UnparsedPublicKey::new(&ED25519, key);
    let mut attempt = 0u32;
    loop {
        if let Ok(channel) =
            Endpoint::from_shared(url.clone()).map(|e| e.connect_timeout(Duration::from_secs(10)))
            && let Ok(channel) = channel.connect().await
            && stream(channel, &credential, &key, &progress).await
        {
            attempt = 0;
        }
        let delay = Duration::from_millis(200).saturating_mul(1 << attempt.min(6));
        tokio::time::sleep(delay.mul_f64(rand::random_range(0.5..=1.0))).await;
        attempt += 1;
    }
}

/// One stream; true if the cloud welcomed the agent.
async fn stream(
    channel: Channel,
    credential: &str,
    key: &UnparsedPublicKey<Vec<u8>>,
    progress: &Progress,
) -> bool {
    let (outbound, receiver) = mpsc::channel(4);
    let hello = GatewayMessage {
        kind: Some(gateway_message::Kind::Hello(Hello::default())),
    };
    if outbound.send(hello).await.is_err() {
        return false;
    }
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(receiver));
    let Ok(bearer) = format!("Bearer {credential}").parse() else {
        return false;
    };
    request.metadata_mut().insert("authorization", bearer);
    let Ok(response) = GatewayControlClient::new(channel)
        .control_stream(request)
        .await
    else {
        return false;
    };
    let mut inbound = response.into_inner();
    let mut welcomed = false;
    let mut heartbeat = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            message = inbound.message() => {
                let Ok(Some(message)) = message else { return welcomed };
                match message.kind {
                    Some(cloud_message::Kind::Welcome(_)) => {
                        welcomed = true;
                        progress.welcomed.fetch_add(1, Ordering::AcqRel);
                        progress.changed.notify_waiters();
                    }
                    Some(cloud_message::Kind::Desired(desired)) if !desired.plans.is_empty() => {
                        let mut results = Vec::new();
                        for plan in &desired.plans {
                            let verified = key.verify(&plan.payload, &plan.signature).is_ok();
                            let envelope = PlanEnvelope::decode(plan.payload.as_slice()).ok();
                            if !verified || envelope.is_none() {
                                progress.bad_signatures.fetch_add(1, Ordering::AcqRel);
                            }
                            let envelope = envelope.unwrap_or_default();
                            results.push(PlanResult {
                                pipeline: envelope.pipeline,
                                version: envelope.version,
                                accepted: verified,
                                reason: String::new(),
                            });
                        }
                        let ack = GatewayMessage {
                            kind: Some(gateway_message::Kind::Ack(PlanAck { revision: desired.revision, results })),
                        };
                        let _ = outbound.send(ack).await;
                        progress.acknowledged.fetch_add(1, Ordering::AcqRel);
                        progress.changed.notify_waiters();
                    }
                    _ => {}
                }
            }
            _ = heartbeat.tick() => {
                let beat = GatewayMessage { kind: Some(gateway_message::Kind::Heartbeat(Heartbeat::default())) };
                let _ = outbound.send(beat).await;
            }
        }
    }
}
