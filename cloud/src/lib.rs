//! The Weir control plane: what `weir cloud` runs.
//!
//! ```text
//!  weir deploy / status / cloud gateways ──HTTP/JSON──┐
//!                                                      ▼
//!             ┌──────────────── one port (HTTP/1.1 and HTTP/2) ────────────────┐
//!             │ api (axum, token roles) ─┐                                     │
//!             │                          ├─> Fleet: gateways, versions,        │
//!             │ grpc GatewayControl ─────┘   deployments, sessions ─> Store    │
//!             │ grpc health, reflection                        (RocksDB)      │
//!             └──────────────────────────────────────────────────────────────────┘
//!                                                      ▲
//!  weir gateway (dials out) ═ ControlStream (gRPC) ══╝
//! ```
//!
//! What lives here: the registry of gateways with enrollment ([`fleet`]), label selectors
//! ([`selector`]), plan signing ([`signing`]), the store trait and its RocksDB backend
//! ([`store`]), the gRPC service ([`grpc`]), the uplinked results as Parquet ([`results`])
//! and the HTTP API ([`api`]). What does not: SQL
//! (`weir-planner` compiles it here once), running pipelines (the gateways do that).

pub mod api;
pub mod error;
mod files;
pub mod fleet;
pub mod grpc;
pub mod metrics;
pub mod model;
pub mod results;
pub mod selector;
pub mod signing;
pub mod store;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use weir_proto::cloud::gateway_control_server::GatewayControlServer;

pub use crate::error::{CloudError, Result};
pub use crate::fleet::{DeployOutcome, DeploymentView, Fleet, GatewayView, PipelineView};
pub use crate::model::Role;

/// How `weir cloud` runs.
#[derive(Debug, Clone)]
pub struct CloudConfig {
    /// Where the store, the signing key and the first admin token live.
    pub data_dir: PathBuf,
    /// The one address for the HTTP API and gRPC.
    pub listen: SocketAddr,
    /// How often gateways send a heartbeat; three missed ones end a stream.
    pub heartbeat_interval: Duration,
    pub tls: tls::TlsMode,
    /// Serve without TLS on a non-loopback address (behind a TLS-terminating proxy).
    pub insecure: bool,
    /// Where uplinked results go: a directory, or `s3://bucket/prefix` (see
    /// [`results::ResultLocation::parse`]). `None`: `<data_dir>/results`.
    pub results: Option<String>,
}

impl Default for CloudConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("weir-cloud"),
            listen: SocketAddr::from(([127, 0, 0, 1], 8470)),
            heartbeat_interval: Duration::from_secs(5),
            tls: tls::TlsMode::Off,
            insecure: false,
            results: None,
        }
    }
}

/// A running control plane.
pub struct Cloud {
    fleet: Arc<Fleet>,
    results: Arc<results::ResultStore>,
    address: SocketAddr,
    admin_token: Option<String>,
    stop: CancellationToken,
    server: JoinHandle<()>,
    rollouts: JoinHandle<()>,
    ca_file: Option<PathBuf>,
}

impl Cloud {
    /// Opens the store (creating it, the signing key and an admin token on first start) and
    /// starts serving. Fails if the data directory is in use or the address is taken.
    pub async fn start(config: CloudConfig) -> Result<Self> {
        if config.tls == tls::TlsMode::Off && !config.listen.ip().is_loopback() && !config.insecure
        {
            return Err(CloudError::Invalid(format!(
                "listening on {} without TLS would send credentials and plans in the clear: \
                 add --tls (or --tls-cert/--tls-key), or --insecure behind a TLS proxy",
                config.listen
            )));
        }
        if config.heartbeat_interval < Duration::from_millis(100) {
            return Err(CloudError::Invalid(format!(
                "heartbeat interval {:?} is too short: gateways would be dropped between two beats; use 100ms or more",
                config.heartbeat_interval
            )));
        }
        let identity = tls::server_identity(&config.tls, &config.data_dir)?;
        let store = store::RocksStore::open(&config.data_dir.join("store"))?;
        let signer =
            signing::PlanSigner::load_or_create(&config.data_dir.join("plan-signing.key"))?;
        let fleet = Arc::new(Fleet::load(
            Arc::new(store),
            signer,
            config.heartbeat_interval,
        )?);
        fleet.restore_last_seen();
        let token_file = config.data_dir.join("admin.token");
        let admin_token =
            fleet.bootstrap_admin(|token| files::write_secret(&token_file, token.as_bytes()))?;
        let listener =
            tokio::net::TcpListener::bind(config.listen)
                .await
                .map_err(CloudError::io(format!(
                    "cannot listen on {}",
                    config.listen
                )))?;
        let address = listener
            .local_addr()
            .map_err(CloudError::io("listening address"))?;

        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<GatewayControlServer<grpc::ControlService>>()
            .await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(weir_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|error| CloudError::Storage(format!("gRPC reflection: {error}")))?;
        let location = match &config.results {
            Some(location) => results::ResultLocation::parse(location)?,
            None => results::ResultLocation::local(&config.data_dir.join("results"))?,
        };
        let results = Arc::new(
            results::ResultStore::open(location, results::ResultOptions::default()).await?,
        );
        let api = api::router(Arc::new(api::ApiState {
            fleet: Arc::clone(&fleet),
            results: Arc::clone(&results),
        }));
        let routes = Routes::from(api)
            .add_service(GatewayControlServer::new(grpc::ControlService::new(
                Arc::clone(&fleet),
                Arc::clone(&results),
            )))
            .add_service(health_service)
            .add_service(reflection);
        let stop = CancellationToken::new();
        let stopping = stop.clone();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let mut builder = tonic::transport::Server::builder();
        let ca_file = match identity {
            Some(identity) => {
                builder = builder
                    .tls_config(tonic::transport::ServerTlsConfig::new().identity(
                        tonic::transport::Identity::from_pem(identity.cert_pem, identity.key_pem),
                    ))
                    .map_err(|error| CloudError::Invalid(format!("TLS: {error}")))?;
                identity.ca_file
            }
            None => None,
        };
        let server = tokio::spawn(async move {
            let served = builder
                .accept_http1(true)
                .http2_keepalive_interval(Some(Duration::from_secs(20)))
                .add_routes(routes)
                .serve_with_incoming_shutdown(incoming, stopping.cancelled_owned())
                .await;
            if let Err(error) = served {
                tracing::error!(%error, "the cloud server stopped");
            }
        });
        let rollouts = {
            let fleet = Arc::clone(&fleet);
            let stopping = stop.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = stopping.cancelled() => return,
                        _ = tick.tick() => {
                            fleet.check_rollouts();
                        }
                    }
                }
            })
        };
        tracing::info!(%address, data = %config.data_dir.display(), "weir cloud listening");
        Ok(Self {
            fleet,
            results,
            address,
            admin_token,
            stop,
            server,
            rollouts,
            ca_file,
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    pub fn fleet(&self) -> &Arc<Fleet> {
        &self.fleet
    }

    /// The results gateways uplinked.
    pub fn results(&self) -> &Arc<results::ResultStore> {
        &self.results
    }

    /// The certificate authority file gateways and the CLI must trust, when the cloud made it.
    pub fn ca_file(&self) -> Option<&std::path::Path> {
        self.ca_file.as_deref()
    }

    /// The admin token created on this start, if this was the first one.
    pub fn first_admin_token(&self) -> Option<&str> {
        self.admin_token.as_deref()
    }

    /// Stops serving; gateway streams end and their agents reconnect to the next cloud.
    pub async fn shutdown(self) {
        if let Err(error) = self.fleet.persist_last_seen() {
            tracing::warn!(%error, "last-seen times not saved");
        }
        // Ending the sessions ends the gateway streams, so the graceful shutdown can finish.
        self.fleet.close_sessions();
        self.stop.cancel();
        let _ = self.rollouts.await;
        let mut server = self.server;
        if tokio::time::timeout(Duration::from_secs(5), &mut server)
            .await
            .is_err()
        {
            tracing::warn!("connections still open after 5 s; closing them");
            server.abort();
        }
    }
}
