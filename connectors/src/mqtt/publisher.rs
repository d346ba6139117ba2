//! Simulated sensors publishing over MQTT, as a site's sensors would: the traffic of
//! `weir demo`, the MQTT benchmarks and the end-to-end tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, Outgoing};
use tokio::task::JoinHandle;

use super::config::{BrokerConfig, Qos};
use crate::error::{ConnectorError, Result};
use crate::simulator::{SensorMessages, sensor_id};

/// How the simulated sensors publish.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    /// The broker.
    pub url: String,
    /// Topic per sensor; `{sensor}` is replaced by the sensor's id, e.g.
    /// `plant1/{sensor}/vibration`.
    pub topic: String,
    pub qos: Qos,
    /// `true`: one tick per `block_size / rate_hz` of wall-clock time, as real sensors.
    /// `false`: as fast as the broker takes them.
    pub realtime: bool,
    /// Stop after this many ticks; `None`: until dropped.
    pub ticks: Option<u64>,
}

/// Counters of a publisher, readable while it runs.
#[derive(Debug, Default)]
pub struct PublisherStats {
    pub messages: AtomicU64,
    pub samples: AtomicU64,
    /// Messages the broker acknowledged (QoS 1 only).
    pub acknowledged: AtomicU64,
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Publishes `messages` tick by tick until `config.ticks` are done (then disconnects after
/// everything queued was sent and, with QoS 1, acknowledged) or the future is dropped.
pub async fn publish_sensors(
    config: PublisherConfig,
    mut messages: SensorMessages,
    rate_hz: u32,
    stats: Arc<PublisherStats>,
) -> Result<()> {
    let broker = BrokerConfig {
        url: Some(config.url.clone()),
        keep_alive: Duration::from_secs(30),
        ..BrokerConfig::default()
    };
    let mut options =
        broker.mqtt_options(&format!("weir-sensors-{:08x}", rand::random::<u32>()), true)?;
    options.set_inflight(1000);
    let (client, mut events) = AsyncClient::new(options, 8192);
    let (done_sender, done) = tokio::sync::oneshot::channel::<()>();
    // This run's acknowledgements (`stats` may be shared by several publishers).
    let (acks_sender, mut acks) = tokio::sync::watch::channel(0u64);
    let acknowledged = Arc::clone(&stats);
    let _events = AbortOnDrop(tokio::spawn(async move {
        let mut done_sender = Some(done_sender);
        loop {
            match events.poll().await {
                Ok(Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                    acknowledged.acknowledged.fetch_add(1, Ordering::Relaxed);
                    acks_sender.send_modify(|n| *n += 1);
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                    if let Some(sender) = done_sender.take() {
                        let _ = sender.send(());
                    }
                    return;
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::debug!(%error, "sensor publisher: broker unavailable, retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }));
    let topics: Vec<String> = (0..messages.sensors() as u32)
        .map(|i| config.topic.replace("{sensor}", &sensor_id(i)))
        .collect();
    let tick_length =
        Duration::from_secs_f64(f64::from(messages.block_size()) / f64::from(rate_hz));
    let mut clock = tokio::time::interval(tick_length);
    clock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let qos = config.qos.level();
    let mut outgoing: Vec<(usize, Vec<u8>)> = Vec::new();
    let mut tick = 0u64;
    let mut sent = 0u64;
    while config.ticks.is_none_or(|ticks| tick < ticks) {
        if config.realtime {
            clock.tick().await;
        }
        outgoing.clear();
        let samples = messages.tick(tick, |sensor, message| {
            outgoing.push((sensor, message.to_vec()));
        });
        for (sensor, payload) in outgoing.drain(..) {
            client
                .publish(topics[sensor].as_str(), qos, false, payload)
                .await
                .map_err(|e| ConnectorError::Internal(format!("sensor publisher: {e}")))?;
            stats.messages.fetch_add(1, Ordering::Relaxed);
            sent += 1;
        }
        stats.samples.fetch_add(samples, Ordering::Relaxed);
        tick += 1;
    }
    // Disconnecting drops what the broker has not acknowledged yet.
    if qos != rumqttc::QoS::AtMostOnce {
        let all = tokio::time::timeout(Duration::from_secs(60), acks.wait_for(|n| *n >= sent));
        if !matches!(all.await, Ok(Ok(_))) {
            return Err(ConnectorError::Internal(format!(
                "sensor publisher: the broker acknowledged {} of {sent} QoS 1 messages within 60 s",
                *acks.borrow()
            )));
        }
    }
    client
        .disconnect()
        .await
        .map_err(|e| ConnectorError::Internal(format!("sensor publisher: {e}")))?;
    let _ = done.await;
    Ok(())
}
