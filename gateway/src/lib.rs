//! The Weir site process: what `weir gateway` runs on an industrial PC at each site.
//!
//! ```text
//!  sensors ──MQTT──> embedded broker (rumqttd) or the site's broker
//!                          │
//!        ┌─────────────────┴──── Deployments: pipelines by name, each its own actors ─┐
//!        │  mqtt source ─> operators ─> mqtt / file sink      (weir-engine)           │
//!        └────────────────────────────────────────────────────────────────────────────┘
//!  admin API (axum, loopback): list, add, replace, remove, /metrics, /health
//!  cloud agent (gRPC, outbound): enroll, signed plans in, status out, results out from
//!    the durable uplink queue (<data_dir>/uplink)
//! ```
//!
//! What lives here: the layered configuration ([`config`]), hot deploy ([`deploy`]), the
//! admin API ([`admin`]), the cloud agent ([`agent`]), Prometheus metrics ([`metrics`]) and
//! the process lifecycle
//! ([`Gateway`]). What does not: running pipelines (`weir-engine`), connectors and the broker
//! itself (`weir-connectors`), SQL (`weir-planner`).

pub mod admin;
pub mod agent;
pub mod config;
pub mod deploy;
pub mod error;
pub mod memory;
pub mod metrics;
pub mod uplink;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use weir_connectors::mqtt::EmbeddedBroker;
use weir_engine::Engine;

pub use crate::config::{BrokerMode, GatewayConfig, Overrides};
pub use crate::deploy::{Deployment, Deployments, PipelineStatus, StateHandover};
pub use crate::error::{GatewayError, Result};

/// A running gateway. Create it inside an actix system (the engine's actors live there).
pub struct Gateway {
    config: GatewayConfig,
    deployments: Arc<Deployments>,
    broker: Option<EmbeddedBroker>,
    broker_url: Option<String>,
    admin_address: SocketAddr,
    admin: JoinHandle<()>,
    stop_admin: CancellationToken,
    agent: Option<agent::CloudAgent>,
}

impl Gateway {
    /// Starts the broker (if embedded), the engine, the admin API, then the pipelines of
    /// `pipelines_dir`. Fails if the broker or the admin API cannot listen.
    pub async fn start(config: GatewayConfig) -> Result<Self> {
        Self::start_enrolling(config, None).await
    }

    /// Like [`Self::start`], enrolling with the cloud first when given a one-time token.
    pub async fn start_enrolling(
        config: GatewayConfig,
        enroll_token: Option<String>,
    ) -> Result<Self> {
        if enroll_token.is_some() && config.cloud.url.is_none() {
            return Err(GatewayError::Config(
                "--enroll needs the cloud's address: --cloud URL or cloud.url".into(),
            ));
        }
        let started = Instant::now();
        let (broker, broker_url, broker_label) = match config.broker.mode {
            BrokerMode::Embedded => {
                let broker = EmbeddedBroker::start(&config.broker.embedded)?;
                let url = broker.url();
                let label = format!("embedded {}", broker.address());
                (Some(broker), Some(url), label)
            }
            BrokerMode::External => {
                let url = config.broker.url.clone().unwrap_or_default();
                (None, Some(url.clone()), format!("external {url}"))
            }
            BrokerMode::None => (None, None, "none".to_owned()),
        };
        if let Some(url) = &broker_url {
            weir_connectors::mqtt::set_default_url(url);
        }
        if let Some(dir) = &config.dead_letters {
            std::fs::create_dir_all(dir).map_err(|source| GatewayError::Io {
                what: format!("creating dead-letter directory {}", dir.display()),
                source,
            })?;
        }
        let uplink = uplink::Uplink::new(config.data_dir.join("uplink"));
        let drain_rate = config.cloud.drain_rate_bytes()?;
        let mut engine_options = config.engine.options();
        engine_options.sinks.uplink = Some(Arc::clone(&uplink) as _);
        if !config.engine.checkpoint_interval.is_zero() {
            // Opened now, so a data directory in use by another gateway fails the start.
            let store = uplink.store()?;
            engine_options.checkpoints = Some(weir_engine::CheckpointOptions {
                store: Arc::new(store),
                interval: config.engine.checkpoint_interval,
            });
            engine_options.sinks.checkpoints = true;
        }
        let engine = Engine::new(engine_options);
        let deployments = Arc::new(Deployments::new(engine, config.dead_letters.clone()));
        let listener = tokio::net::TcpListener::bind(config.admin.listen)
            .await
            .map_err(|source| GatewayError::Io {
                what: format!("admin API cannot listen on {}", config.admin.listen),
                source,
            })?;
        let admin_address = listener.local_addr().map_err(|source| GatewayError::Io {
            what: "admin API address".into(),
            source,
        })?;
        let cloud_link = config
            .cloud
            .url
            .as_ref()
            .map(|_| Arc::new(agent::CloudLink::default()));
        let state = Arc::new(admin::AdminState {
            deployments: Arc::clone(&deployments),
            gateway: config.name.clone(),
            broker: broker_label,
            started,
            token: config.admin.effective_token()?,
            cloud: cloud_link.clone(),
            uplink: Arc::clone(&uplink),
        });
        let stop_admin = CancellationToken::new();
        let stopping = stop_admin.clone();
        let admin = tokio::spawn(async move {
            let served = axum::serve(listener, admin::router(state))
                .with_graceful_shutdown(stopping.cancelled_owned())
                .await;
            if let Err(error) = served {
                tracing::error!(%error, "admin API stopped");
            }
        });
        tracing::info!(address = %admin_address, "admin API listening");
        if let Some(dir) = &config.pipelines_dir {
            let started = deployments.load_dir(dir).await?;
            tracing::info!(dir = %dir.display(), pipelines = started, "pipelines loaded");
        }
        let agent = match (&config.cloud.url, cloud_link) {
            (Some(url), Some(link)) => Some(
                agent::CloudAgent::start(
                    agent::AgentOptions {
                        url: url.clone(),
                        data_dir: config.data_dir.clone(),
                        enroll_token,
                        hostname: config.name.clone(),
                        max_backoff: config.cloud.max_backoff,
                        ca_file: config.cloud.ca_file.clone(),
                        uplink: Arc::clone(&uplink),
                        sender: uplink::SenderOptions {
                            drain_rate,
                            ..uplink::SenderOptions::default()
                        },
                    },
                    Arc::clone(&deployments),
                    link,
                )
                .await?,
            ),
            _ => None,
        };
        Ok(Self {
            config,
            deployments,
            broker,
            broker_url,
            admin_address,
            admin,
            stop_admin,
            agent,
        })
    }

    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }

    pub fn deployments(&self) -> &Arc<Deployments> {
        &self.deployments
    }

    /// Where the admin API listens.
    pub fn admin_address(&self) -> SocketAddr {
        self.admin_address
    }

    /// The broker pipelines use by default, if any.
    pub fn broker_url(&self) -> Option<&str> {
        self.broker_url.as_deref()
    }

    /// The embedded broker, when the gateway runs one.
    pub fn embedded_broker(&self) -> Option<&EmbeddedBroker> {
        self.broker.as_ref()
    }

    /// Stops the cloud agent, then the pipelines (each after its in-flight batches reached the sink), then the
    /// admin API. Returns `false` if that took longer than `shutdown_timeout`.
    pub async fn shutdown(mut self) -> bool {
        if let Some(agent) = self.agent.take() {
            agent.stop().await;
        }
        let drained =
            tokio::time::timeout(self.config.shutdown_timeout, self.deployments.shutdown())
                .await
                .is_ok();
        if !drained {
            tracing::warn!(
                timeout = ?self.config.shutdown_timeout,
                "pipelines did not drain within the shutdown timeout"
            );
        }
        self.stop_admin.cancel();
        let _ = self.admin.await;
        drained
    }
}

/// Waits for Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
