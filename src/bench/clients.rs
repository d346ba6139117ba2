//! The bench's own MQTT clients: the null subscriber (the baseline a pipeline is compared
//! with), the persistent sessions of the backlog scenario, and the reader of result topics.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use rumqttc::{AsyncClient, Event, EventLoop, Outgoing, Packet, Publish, QoS};
use serde::Deserialize;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use weir_connectors::mqtt::BrokerConfig;

/// How long a client may take to connect and subscribe.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which MQTT session a client uses.
#[derive(Debug, Clone)]
pub enum Session {
    /// A fresh session, forgotten on disconnect.
    Clean,
    /// The broker keeps the session, and queues messages, under this client id.
    Persistent(String),
}

/// rumqttc options as the `mqtt` source builds them, so the baseline connects the same way.
/// `role` names a clean session's client.
fn client(
    url: &str,
    session: &Session,
    role: &str,
    capacity: usize,
) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let (client_id, clean) = match session {
        Session::Clean => (format!("weir-bench-{role}-{:08x}", rand_suffix()), true),
        Session::Persistent(id) => (id.clone(), false),
    };
    let broker = BrokerConfig {
        url: Some(url.to_owned()),
        client_id: Some(client_id.clone()),
        ..BrokerConfig::default()
    };
    let options = broker.mqtt_options(&client_id, clean)?;
    Ok(AsyncClient::new(options, capacity))
}

fn rand_suffix() -> u32 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id()
}

/// Connects as `client_id` with a persistent session, subscribes to `filter` and disconnects
/// cleanly: from then on the broker queues matching messages for that client id.
pub async fn prepare_session(
    url: &str,
    client_id: &str,
    filter: &str,
    qos: QoS,
) -> anyhow::Result<()> {
    let (client, mut events) = client(
        url,
        &Session::Persistent(client_id.to_owned()),
        "session",
        16,
    )?;
    let run = async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    client.try_subscribe(filter, qos)?;
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                    {
                        bail!("the broker refused the subscription of {client_id}");
                    }
                    client.try_disconnect()?;
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return Ok(()),
                Ok(_) => {}
                Err(error) => bail!("session {client_id}: {error}"),
            }
        }
    };
    tokio::time::timeout(SUBSCRIBE_TIMEOUT, run)
        .await
        .with_context(|| format!("session {client_id}: no subscription within 10 s"))?
}

/// A client that subscribes and counts the messages it receives, decoding nothing: what the
/// broker and the MQTT client library deliver, without any of Weir's work.
pub struct NullSubscriber {
    counters: Arc<Counters>,
    /// Origin of the nanosecond times in `counters`.
    base: Instant,
    task: JoinHandle<()>,
    client: AsyncClient,
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    /// Nanoseconds after the subscriber's `base` of the first and the latest message; 0
    /// before the first.
    first_ns: AtomicU64,
    last_ns: AtomicU64,
    subscribed: AtomicBool,
    subscribed_signal: Notify,
}

/// What a subscriber received until it stopped waiting.
#[derive(Debug, Clone, Copy)]
pub struct Drained {
    pub received: u64,
    pub first: Option<Instant>,
    pub last: Option<Instant>,
    /// Every expected message arrived (rather than the wait running out).
    pub complete: bool,
}

impl NullSubscriber {
    /// Connects and subscribes to `filter`; returns at once, see [`Self::subscribed`].
    pub fn start(url: &str, session: &Session, filter: &str, qos: QoS) -> anyhow::Result<Self> {
        let (client, events) = client(url, session, "null", 64)?;
        let counters = Arc::new(Counters::default());
        let base = Instant::now();
        let task = tokio::spawn(count_messages(
            client.clone(),
            events,
            filter.to_owned(),
            qos,
            Arc::clone(&counters),
            base,
        ));
        Ok(Self {
            counters,
            base,
            task,
            client,
        })
    }

    /// Waits until the broker confirmed the subscription.
    pub async fn subscribed(&self) -> anyhow::Result<()> {
        let wait = async {
            loop {
                let notified = self.counters.subscribed_signal.notified();
                if self.counters.subscribed.load(Ordering::Acquire) {
                    break;
                }
                notified.await;
            }
        };
        tokio::time::timeout(SUBSCRIBE_TIMEOUT, wait)
            .await
            .context("the null subscriber got no subscription within 10 s")
    }

    /// Waits until `expected` messages arrived, or, once `expected` is known (it is u64::MAX
    /// until then and may be set while waiting), until nothing arrived for `stall` (counted
    /// from `since` before the first message).
    pub async fn drain(&self, since: Instant, expected: &AtomicU64, stall: Duration) -> Drained {
        loop {
            let received = self.counters.received.load(Ordering::Acquire);
            let at = |ns: u64| (ns > 0).then(|| self.base + Duration::from_nanos(ns));
            let first = at(self.counters.first_ns.load(Ordering::Acquire));
            let last = at(self.counters.last_ns.load(Ordering::Acquire));
            let known = expected.load(Ordering::Acquire);
            let done = received >= known;
            if done || (known != u64::MAX && last.unwrap_or(since).elapsed() > stall) {
                return Drained {
                    received,
                    first,
                    last,
                    complete: done,
                };
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Disconnects and stops the client.
    pub async fn stop(self) {
        let _ = self.client.try_disconnect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.task.abort();
    }
}

async fn count_messages(
    client: AsyncClient,
    mut events: EventLoop,
    filter: String,
    qos: QoS,
    counters: Arc<Counters>,
    base: Instant,
) {
    let mut received = 0u64;
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::Publish(_))) => {
                received += 1;
                let ns = (base.elapsed().as_nanos() as u64).max(1);
                if received == 1 {
                    counters.first_ns.store(ns, Ordering::Release);
                }
                counters.last_ns.store(ns, Ordering::Release);
                counters.received.store(received, Ordering::Release);
            }
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                // `try_`: this task is what drains the client's request channel.
                let _ = client.try_subscribe(filter.clone(), qos);
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                counters.subscribed.store(true, Ordering::Release);
                counters.subscribed_signal.notify_waiters();
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// One result row as the `mqtt` sink publishes it (`timestamps = 'epoch_ms'`).
#[derive(Debug, Clone, Deserialize)]
pub struct ResultRow {
    pub sensor: String,
    pub window_start: i64,
    pub window_end: i64,
    pub rms: Option<f64>,
    pub peak: Option<f64>,
    pub samples: i64,
}

/// A result row and when it arrived, in epoch milliseconds (with a fraction).
#[derive(Debug, Clone)]
pub struct Arrival {
    pub row: ResultRow,
    pub arrived_ms: f64,
}

/// Subscribes to result topics and keeps every message with its arrival time; the rows are
/// parsed only when the reader stops, so parsing one message never delays the time stamp of
/// the next. It subscribes at the QoS it is given, as a consumer of results published at
/// that QoS would: at QoS 1 it acknowledges each message.
pub struct ResultReader {
    received: Arc<Mutex<Vec<(Publish, f64)>>>,
    subscriber_ready: Arc<Notify>,
    ready: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl ResultReader {
    pub async fn start(url: &str, filter: &str, qos: QoS) -> anyhow::Result<Self> {
        let (client, mut events) = client(url, &Session::Clean, "results", 64)?;
        let received = Arc::new(Mutex::new(Vec::new()));
        let ready = Arc::new(AtomicBool::new(false));
        let subscriber_ready = Arc::new(Notify::new());
        let task = {
            let (received, ready, signal) = (
                Arc::clone(&received),
                Arc::clone(&ready),
                Arc::clone(&subscriber_ready),
            );
            let filter = filter.to_owned();
            tokio::spawn(async move {
                loop {
                    match events.poll().await {
                        Ok(Event::Incoming(Packet::Publish(message))) => {
                            let arrived_ms = super::publisher::epoch_ms_now_f64();
                            tracing::trace!(topic = %message.topic, "result arrived");
                            if let Ok(mut received) = received.lock() {
                                received.push((message, arrived_ms));
                            }
                        }
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            let _ = client.try_subscribe(filter.clone(), qos);
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            ready.store(true, Ordering::Release);
                            signal.notify_waiters();
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            })
        };
        let reader = Self {
            received,
            subscriber_ready,
            ready,
            task,
        };
        let wait = async {
            while !reader.ready.load(Ordering::Acquire) {
                let notified = reader.subscriber_ready.notified();
                if reader.ready.load(Ordering::Acquire) {
                    break;
                }
                notified.await;
            }
        };
        tokio::time::timeout(SUBSCRIBE_TIMEOUT, wait)
            .await
            .context("the result reader got no subscription within 10 s")?;
        Ok(reader)
    }

    /// Stops reading; returns the rows with their arrival times and how many messages were
    /// not readable result rows.
    pub fn stop(self) -> (Vec<Arrival>, u64) {
        self.task.abort();
        let received = self
            .received
            .lock()
            .map(|mut r| std::mem::take(&mut *r))
            .unwrap_or_default();
        let mut unreadable = 0;
        let arrivals = received
            .into_iter()
            .filter_map(|(message, arrived_ms)| {
                match serde_json::from_slice::<ResultRow>(&message.payload) {
                    Ok(row) => Some(Arrival { row, arrived_ms }),
                    Err(_) => {
                        unreadable += 1;
                        None
                    }
                }
            })
            .collect();
        (arrivals, unreadable)
    }
}
