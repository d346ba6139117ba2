//! MQTT: the `mqtt` source and sink (rumqttc), and the broker a gateway can embed (rumqttd).
//!
//! ```sql
//! CREATE SOURCE vibration (sensor TEXT NOT NULL, ts TIMESTAMP NOT NULL, v DOUBLE,
//!                          WATERMARK FOR ts AS ts - INTERVAL '2' SECOND)
//! WITH (connector = 'mqtt', topic = 'plant1/{sensor}/vibration', format = 'json');
//!
//! CREATE SINK alerts WITH (connector = 'mqtt', topic = 'alerts/{sensor}', qos = 1);
//! ```
//!
//! - [`source`]: topic filters with wildcards and `{column}` levels, QoS 0/1, clean or
//!   persistent sessions; payloads in JSON (sample, array of samples, block), CSV lines or
//!   Sparkplug B, decoded in batches; reconnects with backoff and jitter, resubscribes.
//! - [`sink`]: JSON rows, one message per row or one array per batch and topic; topic
//!   templates from columns; QoS 1 by default; retain.
//! - [`broker`]: the embedded broker of `weir gateway`.
//!
//! Every source and sink publishes its connection counters as [`MqttStats`] under its name,
//! for the gateway's `/metrics`.

pub mod broker;
pub mod config;
pub mod mosquitto;
pub mod publisher;
pub mod sink;
pub mod source;
pub mod topic;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use arrow::datatypes::{Schema, SchemaRef};

pub use self::broker::{EmbeddedBroker, EmbeddedBrokerConfig};
pub use self::config::{
    BrokerConfig, MessageFormat, MqttSinkConfig, MqttSourceConfig, PublishMode, default_url,
    set_default_url,
};
pub use self::sink::MqttSink;
pub use self::source::MqttSource;
pub use self::topic::{TopicPattern, TopicTemplate};
use crate::dead_letter::DeadLetterQueue;
use crate::error::Result;
use crate::registry::{ConnectorSpec, SinkConnector, SinkContext, SourceConnector};
use crate::{Sink, Source};

/// The `mqtt` source connector.
pub const SOURCE: SourceConnector = SourceConnector {
    name: "mqtt",
    validate: validate_source,
    build: build_source,
};

/// The `mqtt` sink connector.
pub const SINK: SinkConnector = SinkConnector {
    name: "mqtt",
    validate: validate_sink,
    build: build_sink,
};

fn validate_source(spec: &ConnectorSpec, schema: &Schema) -> Result<()> {
    let (broker, config): (BrokerConfig, MqttSourceConfig) = config::split_options(spec)?;
    MqttSource::check(
        &spec.name,
        &broker,
        config,
        Arc::new(schema.clone()),
        spec.event_time.as_deref(),
        DeadLetterQueue::default(),
    )
    .map(drop)
}

fn build_source(
    spec: &ConnectorSpec,
    schema: SchemaRef,
    dead_letters: DeadLetterQueue,
) -> Result<Box<dyn Source>> {
    let (broker, config): (BrokerConfig, MqttSourceConfig) = config::split_options(spec)?;
    Ok(Box::new(MqttSource::new(
        &spec.name,
        &broker,
        config,
        schema,
        spec.event_time.as_deref(),
        dead_letters,
    )?))
}

fn validate_sink(spec: &ConnectorSpec, schema: &Schema) -> Result<()> {
    let (broker, config): (BrokerConfig, MqttSinkConfig) = config::split_options(spec)?;
    MqttSink::check(&broker, &config, schema)
}

fn build_sink(
    spec: &ConnectorSpec,
    schema: SchemaRef,
    _context: &SinkContext,
) -> Result<Box<dyn Sink>> {
    let (broker, config): (BrokerConfig, MqttSinkConfig) = config::split_options(spec)?;
    Ok(Box::new(MqttSink::new(
        &spec.name, &broker, config, schema,
    )?))
}

/// Connection and traffic counters of one MQTT source or sink.
#[derive(Debug, Default)]
pub struct MqttStats {
    /// Successful connections (the first one included).
    pub connects: AtomicU64,
    /// Connections lost after being established.
    pub disconnects: AtomicU64,
    /// Failed connection attempts and lost connections.
    pub connect_failures: AtomicU64,
    /// Subscriptions the broker confirmed (one per connect for a source).
    pub subscriptions: AtomicU64,
    /// Subscriptions the broker refused.
    pub subscribe_failures: AtomicU64,
    /// 1 while connected.
    pub up: AtomicU64,
    /// Messages received (source) or published (sink).
    pub messages: AtomicU64,
    /// Writes to the socket that carried messages (sink): messages / writes is how many a
    /// write carried on average.
    pub writes: AtomicU64,
    /// Reads from the socket that handed messages to the source: messages / reads is how
    /// many a read brought on average.
    pub reads: AtomicU64,
    /// Messages or records dead-lettered (source) or refused by the client (sink).
    pub rejected: AtomicU64,
    /// QoS 1 messages the broker sent again after a reconnect that the source already held
    /// (`ack = 'checkpoint'`), dropped so they count once.
    pub redelivered: AtomicU64,
    /// Sparkplug rebirth requests (NCMD) sent to edge nodes.
    pub rebirths: AtomicU64,
}

impl MqttStats {
    /// The counters published under `name`, created on first use. Restarts of the same
    /// pipeline keep counting into the same counters.
    pub fn named(name: &str) -> Arc<Self> {
        let mut registry = registry().lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(registry.entry(name.to_owned()).or_default())
    }

    /// Every published set of counters, by name.
    pub fn all() -> Vec<(String, Arc<Self>)> {
        let registry = registry().lock().unwrap_or_else(PoisonError::into_inner);
        let mut all: Vec<_> = registry
            .iter()
            .map(|(name, stats)| (name.clone(), Arc::clone(stats)))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

fn registry() -> &'static Mutex<HashMap<String, Arc<MqttStats>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<String, Arc<MqttStats>>>> = OnceLock::new();
    REGISTRY.get_or_init(Mutex::default)
}

/// The connection bookkeeping shared by sources and sinks: counters, a reconnect log line
/// at most every 30 s, and the next retry delay (exponential backoff with jitter, 100 ms up
/// to 10 s, reset by a successful connect).
pub(crate) struct Reconnects {
    /// `source` or `sink`, and its name, for the log.
    role: &'static str,
    name: String,
    stats: Arc<MqttStats>,
    backoff: backon::ExponentialBuilder,
    delays: backon::ExponentialBackoff,
    failures: RateLimitedLog,
    connected: bool,
}

impl Reconnects {
    pub(crate) fn new(role: &'static str, name: &str, stats: Arc<MqttStats>) -> Self {
        use backon::BackoffBuilder;
        let backoff = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(10))
            .with_jitter()
            .without_max_times();
        Self {
            role,
            name: name.to_owned(),
            stats,
            delays: backoff.build(),
            backoff,
            failures: RateLimitedLog::new(Duration::from_secs(30)),
            connected: false,
        }
    }

    /// The broker accepted the connection.
    pub(crate) fn connected(&mut self) {
        use backon::BackoffBuilder;
        if self.stats.connects.fetch_add(1, Ordering::Relaxed) > 0 {
            tracing::info!(role = self.role, name = %self.name, "reconnected to the MQTT broker");
        }
        self.connected = true;
        self.stats.up.store(1, Ordering::Relaxed);
        self.delays = self.backoff.build();
        self.failures.reset();
    }

    /// A connection attempt failed or an established connection broke; returns how long to
    /// wait before the next attempt.
    pub(crate) fn failed(&mut self, error: &rumqttc::ConnectionError) -> Duration {
        if self.connected {
            self.stats.disconnects.fetch_add(1, Ordering::Relaxed);
        }
        self.connected = false;
        self.stats.up.store(0, Ordering::Relaxed);
        self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = self.failures.allow() {
            tracing::warn!(
                role = self.role,
                name = %self.name,
                error = %describe(error),
                suppressed,
                "MQTT broker unavailable; retrying with backoff"
            );
        }
        self.delays.next().unwrap_or(Duration::from_secs(10))
    }
}

/// A connection error as a person would say it.
pub(crate) fn describe(error: &rumqttc::ConnectionError) -> String {
    match error {
        rumqttc::ConnectionError::ConnectionRefused(code) => {
            format!("the broker refused the connection ({code:?}); check username and password")
        }
        rumqttc::ConnectionError::Io(io) => format!("network: {io}"),
        other => other.to_string(),
    }
}

/// Lets a repeated warning through once per interval, counting what it held back, so a
/// broker that stays down is logged every half minute rather than on every retry.
#[derive(Debug)]
pub(crate) struct RateLimitedLog {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    pub(crate) fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(held back since the last one)` when this occurrence should be logged.
    pub(crate) fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(last) if now.duration_since(last) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }

    #[cfg(test)]
    fn suppressed(&self) -> u64 {
        self.suppressed
    }

    /// Forgets the last occurrence: the next one is logged at once.
    pub(crate) fn reset(&mut self) {
        self.last = None;
        self.suppressed = 0;
    }
}

/// Waits for a flush of the connection, at most `timeout` (a broker that stopped reading).
pub(crate) async fn flushed(
    timeout: std::time::Duration,
    flush: impl Future<Output = std::result::Result<(), rumqttc::StateError>>,
) -> std::result::Result<(), rumqttc::ConnectionError> {
    match tokio::time::timeout(timeout, flush).await {
        Ok(flushed) => Ok(flushed?),
        Err(_) => Err(rumqttc::ConnectionError::FlushTimeout),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limited_log_lets_one_through_per_interval_and_counts_the_rest() {
        let mut log = RateLimitedLog::new(Duration::from_secs(3600));
        assert_eq!(log.allow(), Some(0));
        assert_eq!(log.allow(), None);
        assert_eq!(log.allow(), None);
        assert_eq!(log.suppressed(), 2);
        log.reset();
        assert_eq!(log.allow(), Some(0));
        let mut every_time = RateLimitedLog::new(Duration::ZERO);
        assert_eq!(every_time.allow(), Some(0));
        assert_eq!(every_time.allow(), Some(0));
    }

    #[test]
    fn stats_are_shared_by_name() {
        let a = MqttStats::named("stats-test-source");
        a.messages.fetch_add(3, Ordering::Relaxed);
        let b = MqttStats::named("stats-test-source");
        assert_eq!(MqttStats::get(&b.messages), 3);
        assert!(
            MqttStats::all()
                .iter()
                .any(|(n, _)| n == "stats-test-source")
        );
    }
}
