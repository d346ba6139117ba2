//! The cloud agent: the gateway's one outbound connection to `weir cloud`.
//!
//! ```text
//!  start ─> credential on disk? ──no──> Enroll(token) ─> save credential
//!    │
//!    ├─> run the last accepted plans from disk (the cloud may be unreachable)
//!    └─> loop: ControlStream ─> Hello(running versions) ─> Welcome
//!                 DesiredState ─> verify each plan ─> hot deploy ─> PlanAck, StatusReport
//!                 every interval: Heartbeat + StatusReport
//!               stream lost ─> back off (200 ms .. max, with jitter) ─> reconnect
//! ```
//!
//! A plan runs only if its Ed25519 signature verifies with the key the gateway received at
//! enrollment, its format is one this build knows, and its version is not older than the one
//! running. Plans are applied through the same hot-deploy path as the local admin API, so the
//! other pipelines never notice. What was accepted is written to `<data_dir>/cloud-plans.pb`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use prost::Message as _;
use ring::signature::{ED25519, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use weir_proto::PLAN_FORMAT_VERSION;
use weir_proto::cloud::gateway_control_client::GatewayControlClient;
use weir_proto::cloud::{
    DesiredManifest, DesiredState, EnrollRequest, GatewayMessage, Heartbeat, Hello, PlanAck,
    PlanEnvelope, PlanResult, RunningPipeline, SignedPlan, StatusReport, cloud_message,
    gateway_message,
};

use crate::deploy::Deployments;
use crate::error::{GatewayError, Result};
use crate::uplink::{SenderOptions, Uplink, run_sender};

const CREDENTIAL_FILE: &str = "cloud-credential.json";
const PLANS_FILE: &str = "cloud-plans.pb";
const CA_FILE: &str = "cloud-ca.pem";

/// A channel to the cloud: TLS against the cloud's CA for `https://`, plain for `http://`.
fn endpoint(options: &AgentOptions) -> std::result::Result<Endpoint, String> {
    let endpoint =
        Endpoint::from_shared(options.url.clone()).map_err(|e| format!("bad cloud URL: {e}"))?;
    if !options.url.starts_with("https://") {
        return Ok(endpoint);
    }
    let saved = options.data_dir.join(CA_FILE);
    let ca_file = options.ca_file.clone().unwrap_or(saved);
    let ca = std::fs::read(&ca_file).map_err(|error| {
        format!(
            "an https:// cloud needs its certificate authority: cannot read {} ({error}); give --cloud-ca FILE (the cloud's tls/ca.pem)",
            ca_file.display()
        )
    })?;
    endpoint
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))
        .map_err(|e| format!("TLS: {e}"))
}

/// How the agent reaches the cloud.
#[derive(Clone)]
pub struct AgentOptions {
    pub url: String,
    pub data_dir: PathBuf,
    /// A one-time token from `weir cloud gateways add`; needed on the first start only.
    pub enroll_token: Option<String>,
    /// What the gateway calls itself, for the cloud's audit log.
    pub hostname: String,
    pub max_backoff: Duration,
    /// The CA an `https://` cloud's certificate is checked against; needed at enrollment,
    /// kept in the data directory after it.
    pub ca_file: Option<PathBuf>,
    /// The queue of results bound for the cloud, sent on every session.
    pub uplink: Arc<Uplink>,
    pub sender: SenderOptions,
}

/// The agent's connection as the local admin API shows it.
#[derive(Debug, Default)]
pub struct CloudLink {
    state: Mutex<CloudLinkState>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CloudLinkState {
    pub url: String,
    pub connected: bool,
    /// The name the cloud knows this gateway by.
    pub gateway: Option<String>,
    /// Successful connections since the gateway started.
    pub connects: u64,
    /// Why the last connection attempt or stream failed.
    pub last_error: Option<String>,
    /// Plans of the last desired state that this gateway refused, with the reason.
    pub rejected: Vec<String>,
}

impl CloudLink {
    pub fn snapshot(&self) -> CloudLinkState {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CloudLinkState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What enrollment gave this gateway, kept in `<data_dir>/cloud-credential.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Credential {
    cloud_url: String,
    gateway_id: String,
    name: String,
    credential: String,
    /// Base64 of the cloud's raw Ed25519 plan-signing key.
    plan_public_key: String,
}

/// Checks signed plans against the cloud's key.
pub struct PlanVerifier {
    key: UnparsedPublicKey<Vec<u8>>,
}

impl PlanVerifier {
    pub fn new(public_key: Vec<u8>) -> Self {
        Self {
            key: UnparsedPublicKey::new(&ED25519, public_key),
        }
    }

    /// The envelope of a plan whose signature, format and name hold; else why not.
    pub fn open(&self, signed: &SignedPlan) -> std::result::Result<PlanEnvelope, String> {
        if signed.signature.is_empty() {
            return Err("the plan is not signed".into());
        }
        self.key
            .verify(&signed.payload, &signed.signature)
            .map_err(|_| {
                "the plan's signature does not verify with this cloud's key (tampered, or signed by another cloud)".to_owned()
            })?;
        let envelope = PlanEnvelope::decode(signed.payload.as_slice())
            .map_err(|error| format!("the signed plan cannot be decoded: {error}"))?;
        let Some(plan) = &envelope.plan else {
            return Err("the signed envelope holds no plan".into());
        };
        if plan.format_version != PLAN_FORMAT_VERSION {
            return Err(format!(
                "plan format {} is not the one this gateway runs ({PLAN_FORMAT_VERSION}); upgrade the gateway",
                plan.format_version
            ));
        }
        if plan.name != envelope.pipeline {
            return Err(format!(
                "the envelope names pipeline '{}' but holds plan '{}'",
                envelope.pipeline, plan.name
            ));
        }
        Ok(envelope)
    }
}

impl PlanVerifier {
    /// Checks that `desired` is what the cloud signed for `gateway_id`: the manifest's
    /// signature, its gateway and revision, and that the plans are exactly the ones it lists.
    /// Plans that do not verify on their own are left to [`Self::open`].
    pub fn check_manifest(
        &self,
        desired: &DesiredState,
        gateway_id: &str,
    ) -> std::result::Result<(), String> {
        if desired.manifest_signature.is_empty() {
            return Err("the desired state is not signed".into());
        }
        self.key
            .verify(&desired.manifest, &desired.manifest_signature)
            .map_err(|_| {
                "the desired state's signature does not verify with this cloud's key".to_owned()
            })?;
        let manifest = DesiredManifest::decode(desired.manifest.as_slice())
            .map_err(|error| format!("the signed manifest cannot be decoded: {error}"))?;
        if manifest.gateway_id != gateway_id {
            return Err(format!(
                "the desired state was signed for gateway {}, not this one",
                manifest.gateway_id
            ));
        }
        if manifest.revision != desired.revision {
            return Err("the desired state's revision is not the signed one".into());
        }
        let listed: BTreeSet<(String, u64)> = manifest
            .plans
            .into_iter()
            .map(|p| (p.name, p.version))
            .collect();
        let sent: BTreeSet<(String, u64)> = desired
            .plans
            .iter()
            .filter_map(|p| PlanEnvelope::decode(p.payload.as_slice()).ok())
            .map(|e| (e.pipeline, e.version))
            .collect();
        if listed != sent || sent.len() != desired.plans.len() {
            return Err("the plans sent are not the ones the signed manifest lists".into());
        }
        Ok(())
    }
}

/// The pipeline a plan claims to be, read without trusting it: used only to keep that
/// pipeline running when its new version is refused.
fn claimed_pipeline(signed: &SignedPlan) -> Option<String> {
    PlanEnvelope::decode(signed.payload.as_slice())
        .ok()
        .map(|e| e.pipeline)
}

struct Agent {
    deployments: Arc<Deployments>,
    verifier: PlanVerifier,
    credential: Credential,
    options: AgentOptions,
    /// Pipeline -> the signed plan it runs, as persisted.
    accepted: Mutex<BTreeMap<String, SignedPlan>>,
    /// The revision of the last desired state applied: an older one is a replay.
    applied_revision: AtomicU64,
    started: Instant,
    link: Arc<CloudLink>,
}

/// The running agent; see the module docs.
pub struct CloudAgent {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl CloudAgent {
    /// Enrolls if needed, runs the last accepted plans, and starts holding the connection.
    /// Fails only when the gateway has no credential and cannot get one.
    pub async fn start(
        options: AgentOptions,
        deployments: Arc<Deployments>,
        link: Arc<CloudLink>,
    ) -> Result<Self> {
        link.lock().url = options.url.clone();
        std::fs::create_dir_all(&options.data_dir).map_err(|source| GatewayError::Io {
            what: format!("creating data directory {}", options.data_dir.display()),
            source,
        })?;
        let saved = load_credential(&options.data_dir)?;
        let credential = match (&options.enroll_token, saved) {
            (Some(token), saved) => match enroll(&options, token).await {
                Ok(credential) => {
                    save_credential(&options.data_dir, &credential)?;
                    if let Some(ca_file) = &options.ca_file {
                        let ca = std::fs::read(ca_file).map_err(|source| GatewayError::Io {
                            what: format!("reading {}", ca_file.display()),
                            source,
                        })?;
                        write_atomically(&options.data_dir.join(CA_FILE), &ca, false)?;
                    }
                    tracing::info!(gateway = %credential.name, "enrolled with the cloud");
                    credential
                }
                // A unit file that keeps `--enroll` after the first start must not break
                // the restarts: the credential from that first start still holds.
                Err(error) => match saved.filter(|c| c.cloud_url == options.url) {
                    Some(saved) => {
                        tracing::warn!(%error, "enrollment refused; using the saved credential");
                        saved
                    }
                    None => return Err(error),
                },
            },
            (None, Some(saved)) => saved,
            (None, None) => {
                return Err(GatewayError::Config(format!(
                    "this gateway is not enrolled with {}: start it once with --enroll TOKEN (printed by `weir cloud gateways add NAME`)",
                    options.url
                )));
            }
        };
        let key = STANDARD.decode(&credential.plan_public_key).map_err(|_| {
            GatewayError::Config(format!(
                "{}: the plan key is not valid base64; enroll again",
                options.data_dir.join(CREDENTIAL_FILE).display()
            ))
        })?;
        let agent = Arc::new(Agent {
            deployments,
            verifier: PlanVerifier::new(key),
            credential,
            options,
            accepted: Mutex::default(),
            applied_revision: AtomicU64::new(0),
            started: Instant::now(),
            link,
        });
        if let Some(saved) = load_plans(&agent.options.data_dir) {
            // The file is this gateway's own (0600); each plan in it is verified again.
            let results = agent.apply_plans(&saved).await;
            agent
                .applied_revision
                .store(saved.revision, Ordering::Release);
            let running = results.iter().filter(|r| r.accepted).count();
            tracing::info!(pipelines = running, "running the last plans the cloud sent");
        }
        let stop = CancellationToken::new();
        let task = tokio::spawn(Arc::clone(&agent).run(stop.clone()));
        Ok(Self { stop, task })
    }

    /// Closes the connection; the pipelines keep running until the gateway stops them.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

impl Agent {
    async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut attempt: u32 = 0;
        let mut last_logged: Option<(String, Instant)> = None;
        loop {
            let outcome = tokio::select! {
                _ = stop.cancelled() => return,
                outcome = self.session(&stop, &mut attempt) => outcome,
            };
            if stop.is_cancelled() {
                return;
            }
            let message = match outcome {
                Ok(()) => "the cloud closed the stream".to_owned(),
                Err(error) => error,
            };
            {
                let mut link = self.link.lock();
                link.connected = false;
                link.last_error = Some(message.clone());
            }
            // Log a failure when it changes, and a repeated one once a minute.
            let repeat = last_logged
                .as_ref()
                .is_some_and(|(m, at)| *m == message && at.elapsed() < Duration::from_secs(60));
            if !repeat {
                tracing::warn!(cloud = %self.options.url, "cloud connection: {message}; retrying");
                last_logged = Some((message, Instant::now()));
            }
            let delay = backoff(attempt, self.options.max_backoff);
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One connection, until it fails or the cloud ends it. Resets `attempt` once the cloud
    /// has welcomed the gateway.
    async fn session(
        &self,
        stop: &CancellationToken,
        attempt: &mut u32,
    ) -> std::result::Result<(), String> {
        let channel = endpoint(&self.options)?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .connect()
            .await
            .map_err(|e| format!("cannot connect: {}", error_chain(&e)))?;
        let mut client = GatewayControlClient::new(channel.clone());
        let (outbound, receiver) = mpsc::channel::<GatewayMessage>(16);
        let running = self
            .deployments
            .managed_versions()
            .into_iter()
            .map(|(name, version)| RunningPipeline { name, version })
            .collect();
        send(
            &outbound,
            gateway_message::Kind::Hello(Hello {
                agent_version: env!("CARGO_PKG_VERSION").to_owned(),
                running,
            }),
        )
        .await;
        let mut request = tonic::Request::new(ReceiverStream::new(receiver));
        let bearer: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
            format!("Bearer {}", self.credential.credential)
                .parse()
                .map_err(|_| "the saved credential is not valid text; enroll again".to_owned())?;
        request
            .metadata_mut()
            .insert("authorization", bearer.clone());
        let mut inbound = client
            .control_stream(request)
            .await
            .map_err(|status| describe_status(&status))?
            .into_inner();
        let mut ticker = tokio::time::interval(Duration::from_secs(5));
        // Heartbeats go from a task of their own, so that applying a slow plan change (a
        // pipeline draining to its sink) never makes the cloud think the gateway is gone.
        let mut _heartbeats: Option<Owned> = None;
        let mut _sender: Option<Owned> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                message = inbound.message() => {
                    let Some(message) = message.map_err(|s| describe_status(&s))? else {
                        return Ok(());
                    };
                    match message.kind {
                        Some(cloud_message::Kind::Welcome(welcome)) => {
                            *attempt = 0;
                            {
                                let mut link = self.link.lock();
                                link.connected = true;
                                link.connects += 1;
                                link.gateway = Some(welcome.name.clone());
                                link.last_error = None;
                            }
                            let every = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms.max(100)));
                            ticker = tokio::time::interval(every);
                            let beats = outbound.clone();
                            _heartbeats = Some(Owned(tokio::spawn(async move {
                                let mut tick = tokio::time::interval(every);
                                loop {
                                    tick.tick().await;
                                    let beat = GatewayMessage {
                                        kind: Some(gateway_message::Kind::Heartbeat(Heartbeat {
                                            sent_at_ms: weir_now_ms(),
                                        })),
                                    };
                                    if beats.send(beat).await.is_err() {
                                        return;
                                    }
                                }
                            })));
                            _sender = self.start_sender(channel.clone(), bearer.clone());
                            tracing::info!(gateway = %welcome.name, cloud = %self.options.url, "connected to the cloud");
                        }
                        Some(cloud_message::Kind::Desired(desired)) => {
                            let results = self.apply(&desired).await;
                            send(&outbound, gateway_message::Kind::Ack(PlanAck {
                                revision: desired.revision,
                                results,
                            })).await;
                            send(&outbound, gateway_message::Kind::Status(self.report())).await;
                        }
                        None => {}
                    }
                }
                _ = ticker.tick() => {
                    send(&outbound, gateway_message::Kind::Status(self.report())).await;
                }
            }
        }
    }

    /// Makes the cloud-managed pipelines what `desired` says, one plan at a time; a plan
    /// that is refused leaves that pipeline as it was.
    /// Applies a desired state from the cloud: only if the set as a whole is what the cloud
    /// signed for this gateway, and newer than the last one applied. Otherwise nothing
    /// changes and every plan is reported refused with the reason.
    async fn apply(&self, desired: &DesiredState) -> Vec<PlanResult> {
        let last = self.applied_revision.load(Ordering::Acquire);
        let refusal = match self
            .verifier
            .check_manifest(desired, &self.credential.gateway_id)
        {
            Err(reason) => Some(reason),
            Ok(()) if desired.revision <= last => Some(format!(
                "desired state revision {} is not newer than the one applied ({last}): a replay",
                desired.revision
            )),
            Ok(()) => None,
        };
        if let Some(reason) = refusal {
            tracing::error!(%reason, "desired state refused; nothing changes");
            let results: Vec<PlanResult> = desired
                .plans
                .iter()
                .map(|signed| PlanResult {
                    pipeline: claimed_pipeline(signed).unwrap_or_default(),
                    version: 0,
                    accepted: false,
                    reason: reason.clone(),
                })
                .collect();
            self.link.lock().rejected = vec![reason];
            return results;
        }
        self.applied_revision
            .store(desired.revision, Ordering::Release);
        self.apply_plans(desired).await
    }

    /// Makes the cloud-managed pipelines the verified plans of `desired`; see [`Self::apply`].
    async fn apply_plans(&self, desired: &DesiredState) -> Vec<PlanResult> {
        let running = self.deployments.managed_versions();
        let mut results = Vec::new();
        let mut keep = BTreeSet::new();
        for signed in &desired.plans {
            let envelope = match self.verifier.open(signed) {
                Ok(envelope) => envelope,
                Err(reason) => {
                    let claimed = claimed_pipeline(signed).unwrap_or_default();
                    tracing::error!(pipeline = %claimed, %reason, "plan rejected");
                    keep.insert(claimed.clone());
                    results.push(PlanResult {
                        pipeline: claimed,
                        version: 0,
                        accepted: false,
                        reason,
                    });
                    continue;
                }
            };
            let name = envelope.pipeline.clone();
            keep.insert(name.clone());
            let rejected = |reason: String| {
                tracing::error!(pipeline = %name, version = envelope.version, %reason, "plan rejected");
                PlanResult {
                    pipeline: name.clone(),
                    version: envelope.version,
                    accepted: false,
                    reason,
                }
            };
            if let Some(&current) = running.get(&name)
                && envelope.version < current
            {
                results.push(rejected(format!(
                    "version {} is older than the running version {current}",
                    envelope.version
                )));
                continue;
            }
            let Some(plan) = envelope.plan.clone() else {
                continue;
            };
            match self
                .deployments
                .apply_plan(plan, &envelope.sql, envelope.version, envelope.fresh)
                .await
            {
                Ok(deployment) => {
                    self.lock_accepted().insert(name.clone(), signed.clone());
                    tracing::info!(pipeline = %name, version = deployment.version, "plan applied");
                    results.push(PlanResult {
                        pipeline: name,
                        version: envelope.version,
                        accepted: true,
                        reason: String::new(),
                    });
                }
                Err(error) => results.push(rejected(format!("cannot start: {error}"))),
            }
        }
        for name in running.keys().filter(|n| !keep.contains(*n)) {
            if let Err(error) = self.deployments.remove_managed(name).await {
                tracing::error!(pipeline = %name, %error, "cannot remove pipeline");
            }
            self.lock_accepted().remove(name);
        }
        self.link.lock().rejected = results
            .iter()
            .filter(|r| !r.accepted)
            .map(|r| format!("{} v{}: {}", r.pipeline, r.version, r.reason))
            .collect();
        let saved = DesiredState {
            revision: desired.revision,
            plans: self.lock_accepted().values().cloned().collect(),
            ..DesiredState::default()
        };
        if let Err(error) = save_plans(&self.options.data_dir, &saved) {
            tracing::error!(%error, "the accepted plans were not saved; a restart without the cloud would not run them");
        }
        results
    }

    /// The uplink sender of this session: it restarts after a failure (a broken uplink
    /// stream, a storage error) while the session lasts.
    fn start_sender(
        &self,
        channel: tonic::transport::Channel,
        bearer: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    ) -> Option<Owned> {
        let store = match self.options.uplink.store() {
            Ok(store) => store,
            Err(error) => {
                tracing::error!(%error, "the uplink queue cannot be opened; results stay local");
                return None;
            }
        };
        let options = self.options.sender;
        Some(Owned(tokio::spawn(async move {
            let stop = CancellationToken::new();
            let _cancel = stop.clone().drop_guard();
            loop {
                let ended = run_sender(
                    channel.clone(),
                    bearer.clone(),
                    store.clone(),
                    options,
                    stop.clone(),
                )
                .await;
                if let Err(error) = ended {
                    tracing::warn!(%error, "uplink interrupted; resuming");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })))
    }

    fn lock_accepted(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, SignedPlan>> {
        self.accepted.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn report(&self) -> StatusReport {
        StatusReport {
            uptime_s: self.started.elapsed().as_secs(),
            pipelines: self
                .deployments
                .list()
                .into_iter()
                .map(|p| weir_proto::cloud::PipelineStatus {
                    version: if p.managed { p.version } else { 0 },
                    state: p.state.to_owned(),
                    error: p.error.unwrap_or_default(),
                    rows_in: p.rows_in,
                    rows_out: p.rows_out,
                    errors: p.errors,
                    dead_letters: p.dead_letters,
                    restarts: p.restarts,
                    late_rows: p.late_rows,
                    p50_ms: p.source_to_sink.p50_ms,
                    p99_ms: p.source_to_sink.p99_ms,
                    name: p.name,
                })
                .collect(),
            streams: self.options.uplink.status(),
        }
    }
}

/// A task that lives exactly as long as its owner: dropped, it is aborted.
struct Owned(JoinHandle<()>);

impl Drop for Owned {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn send(outbound: &mpsc::Sender<GatewayMessage>, kind: gateway_message::Kind) {
    // A closed channel means the stream is gone; the read side notices and reconnects.
    let _ = outbound.send(GatewayMessage { kind: Some(kind) }).await;
}

fn weir_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Exponential from 200 ms, capped, with up to 50% jitter so a fleet does not reconnect in
/// lock step after a cloud restart.
fn backoff(attempt: u32, max: Duration) -> Duration {
    let base = Duration::from_millis(200).saturating_mul(1u32 << attempt.min(16));
    base.min(max).mul_f64(rand::random_range(0.5..=1.0))
}

fn describe_status(status: &tonic::Status) -> String {
    match status.code() {
        tonic::Code::Unauthenticated => format!(
            "the cloud refused this gateway: {} (revoked? enroll again with a new token)",
            status.message()
        ),
        tonic::Code::Unavailable => format!("cloud unavailable: {}", status.message()),
        _ => format!("{:?}: {}", status.code(), status.message()),
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

async fn enroll(options: &AgentOptions, token: &str) -> Result<Credential> {
    let unreachable =
        |why: String| GatewayError::Config(format!("enrolling with {}: {why}", options.url));
    let channel = endpoint(options)
        .map_err(unreachable)?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| unreachable(format!("cannot connect: {}", error_chain(&e))))?;
    let response = GatewayControlClient::new(channel)
        .enroll(EnrollRequest {
            token: token.trim().to_owned(),
            hostname: options.hostname.clone(),
        })
        .await
        .map_err(|status| unreachable(status.message().to_owned()))?
        .into_inner();
    Ok(Credential {
        cloud_url: options.url.clone(),
        gateway_id: response.gateway_id,
        name: response.name,
        credential: response.credential,
        plan_public_key: STANDARD.encode(response.plan_public_key),
    })
}

fn load_credential(dir: &Path) -> Result<Option<Credential>> {
    let path = dir.join(CREDENTIAL_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|error| {
            GatewayError::Config(format!(
                "{}: cannot be read ({error}); delete it and enroll again",
                path.display()
            ))
        }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(GatewayError::Io {
            what: format!("reading {}", path.display()),
            source,
        }),
    }
}

fn save_credential(dir: &Path, credential: &Credential) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(credential).unwrap_or_default();
    write_atomically(&dir.join(CREDENTIAL_FILE), &bytes, true)
}

/// The last accepted plans, or nothing if there are none or the file is unreadable (the
/// cloud sends them again on connect).
fn load_plans(dir: &Path) -> Option<DesiredState> {
    let path = dir.join(PLANS_FILE);
    let bytes = std::fs::read(&path).ok()?;
    match DesiredState::decode(bytes.as_slice()) {
        Ok(saved) => Some(saved),
        Err(error) => {
            tracing::error!(path = %path.display(), %error, "saved plans unreadable; waiting for the cloud");
            None
        }
    }
}

fn save_plans(dir: &Path, plans: &DesiredState) -> Result<()> {
    // Plans carry their SQL, which may hold connector passwords.
    write_atomically(&dir.join(PLANS_FILE), &plans.encode_to_vec(), true)
}

/// Writes through a temporary file and a rename, so a crash leaves the old or the new file.
fn write_atomically(path: &Path, bytes: &[u8], secret: bool) -> Result<()> {
    use std::io::Write as _;
    let io = |source| GatewayError::Io {
        what: format!("writing {}", path.display()),
        source,
    };
    let temporary = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(&temporary).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&temporary, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use ring::rand::SystemRandom;
    use ring::signature::{Ed25519KeyPair, KeyPair};
    use weir_proto::plan::PipelinePlan;

    use super::*;

    fn key() -> Ed25519KeyPair {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("key");
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key")
    }

    fn signed(key: &Ed25519KeyPair, envelope: &PlanEnvelope) -> SignedPlan {
        let payload = envelope.encode_to_vec();
        SignedPlan {
            signature: key.sign(&payload).as_ref().to_vec(),
            payload,
        }
    }

    fn envelope(name: &str, format_version: u32) -> PlanEnvelope {
        PlanEnvelope {
            pipeline: name.into(),
            version: 2,
            plan: Some(PipelinePlan {
                format_version,
                name: name.into(),
                ..PipelinePlan::default()
            }),
            ..PlanEnvelope::default()
        }
    }

    #[test]
    fn only_plans_signed_by_the_enrolled_cloud_open() {
        let cloud = key();
        let other = key();
        let verifier = PlanVerifier::new(cloud.public_key().as_ref().to_vec());
        let good = signed(&cloud, &envelope("rms", PLAN_FORMAT_VERSION));
        assert_eq!(verifier.open(&good).expect("valid").pipeline, "rms");

        let mut tampered = good.clone();
        let last = tampered.payload.len() - 1;
        tampered.payload[last] ^= 0x01;
        let error = verifier.open(&tampered).expect_err("tampered");
        assert!(error.contains("does not verify"), "{error}");

        let foreign = signed(&other, &envelope("rms", PLAN_FORMAT_VERSION));
        assert!(
            verifier
                .open(&foreign)
                .expect_err("foreign")
                .contains("another cloud")
        );

        let unsigned = SignedPlan {
            signature: Vec::new(),
            ..good
        };
        assert_eq!(
            verifier.open(&unsigned).expect_err("unsigned"),
            "the plan is not signed"
        );
    }

    #[test]
    fn unknown_formats_and_mismatched_names_are_refused() {
        let cloud = key();
        let verifier = PlanVerifier::new(cloud.public_key().as_ref().to_vec());
        let future = signed(&cloud, &envelope("rms", PLAN_FORMAT_VERSION + 1));
        assert!(
            verifier
                .open(&future)
                .expect_err("format")
                .contains("upgrade the gateway")
        );
        let mut renamed = envelope("rms", PLAN_FORMAT_VERSION);
        renamed.pipeline = "other".into();
        let renamed = signed(&cloud, &renamed);
        assert!(
            verifier
                .open(&renamed)
                .expect_err("name")
                .contains("holds plan 'rms'")
        );
    }

    fn desired(
        key: &Ed25519KeyPair,
        gateway: &str,
        plans: Vec<SignedPlan>,
        listed: &[(&str, u64)],
    ) -> DesiredState {
        let manifest = DesiredManifest {
            gateway_id: gateway.into(),
            revision: 5,
            plans: listed
                .iter()
                .map(|(name, version)| RunningPipeline {
                    name: (*name).into(),
                    version: *version,
                })
                .collect(),
        }
        .encode_to_vec();
        DesiredState {
            revision: 5,
            plans,
            manifest_signature: key.sign(&manifest).as_ref().to_vec(),
            manifest,
        }
    }

    #[test]
    fn only_the_whole_set_signed_for_this_gateway_is_accepted() {
        let cloud = key();
        let verifier = PlanVerifier::new(cloud.public_key().as_ref().to_vec());
        let rms = signed(&cloud, &envelope("rms", PLAN_FORMAT_VERSION));
        let alerts = signed(&cloud, &envelope("alerts", PLAN_FORMAT_VERSION));
        let both = [("rms", 2), ("alerts", 2)];
        let whole = desired(&cloud, "gw_1", vec![rms.clone(), alerts.clone()], &both);
        assert_eq!(verifier.check_manifest(&whole, "gw_1"), Ok(()));

        let error = verifier
            .check_manifest(&whole, "gw_2")
            .expect_err("another gateway's");
        assert!(error.contains("signed for gateway gw_1"), "{error}");

        let omitted = desired(&cloud, "gw_1", vec![rms.clone()], &both);
        let error = verifier
            .check_manifest(&omitted, "gw_1")
            .expect_err("a plan left out");
        assert!(
            error.contains("not the ones the signed manifest lists"),
            "{error}"
        );

        let mut unsigned = whole.clone();
        unsigned.manifest_signature.clear();
        assert_eq!(
            verifier
                .check_manifest(&unsigned, "gw_1")
                .expect_err("unsigned"),
            "the desired state is not signed"
        );
        let mut renumbered = whole;
        renumbered.revision = 6;
        let error = verifier
            .check_manifest(&renumbered, "gw_1")
            .expect_err("revision");
        assert!(error.contains("revision"), "{error}");
    }

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let max = Duration::from_secs(30);
        let first = backoff(0, max);
        assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(200));
        let late = backoff(20, max);
        assert!(late >= max / 2 && late <= max, "{late:?}");
    }

    #[test]
    fn saved_plans_round_trip_and_garbage_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(load_plans(dir.path()).is_none());
        let state = DesiredState {
            revision: 7,
            plans: vec![SignedPlan {
                payload: vec![1, 2, 3],
                signature: vec![4],
            }],
            ..DesiredState::default()
        };
        save_plans(dir.path(), &state).expect("save");
        assert_eq!(load_plans(dir.path()), Some(state));
        std::fs::write(dir.path().join(PLANS_FILE), b"\xff\xff\xff").expect("write");
        assert!(load_plans(dir.path()).is_none());
    }
}
