//! The `mqtt` sink: result rows as JSON messages, on topics built from their columns.
//!
//! Rows are rendered by the same [`RowFormatter`] as the file sink, so JSON looks the same
//! wherever it goes. The connection lives on a thread of its own (rumqttc's blocking client),
//! started on the first write: building a sink to check a plan at deploy time connects to
//! nothing. Publishing hands messages to the client's bounded request queue; when the broker
//! is away and the queue is full, `write_batch` waits (that is backpressure: the pipeline
//! slows down instead of buffering without bound) and gives up with an error after
//! [`PUBLISH_TIMEOUT`], so the pipeline's supervisor sees a broker that stays down. The sink
//! says it [may block](crate::Sink::may_block), so the engine runs it on a thread of its own
//! and the wait holds up no other pipeline.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::{Schema, SchemaRef};
use rumqttc::{Client, ClientError, Event, MqttOptions, Outgoing, Packet, QoS};

use super::config::{BrokerConfig, MqttSinkConfig, PublishMode};
use super::source::sanitize;
use super::topic::TopicTemplate;
use super::{MqttStats, RateLimitedLog, Reconnects};
use crate::Sink;
use crate::error::{ConnectorError, Result};
use crate::file::{OutputFormat, RowFormatter};

/// How long a publish may wait for room in a full request queue.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);
/// Requests the client queues before publishing waits.
const REQUEST_QUEUE: usize = 4096;
/// How long dropping the sink waits for queued messages to reach the broker.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

/// Publishes result rows to an MQTT broker; see the module docs.
pub struct MqttSink {
    name: String,
    config: MqttSinkConfig,
    template: TopicTemplate,
    max_message_bytes: usize,
    formatter: RowFormatter,
    lines: Vec<u8>,
    line_ends: Vec<usize>,
    topics: Vec<String>,
    pending: Option<MqttOptions>,
    client: Option<SinkClient>,
    stats: Arc<MqttStats>,
    too_large: RateLimitedLog,
}

impl MqttSink {
    /// A sink for rows of `schema`; connects on the first write. Reads the TLS files, if any.
    pub fn new(
        name: &str,
        broker: &BrokerConfig,
        config: MqttSinkConfig,
        schema: SchemaRef,
    ) -> Result<Self> {
        let template = Self::check(broker, &config, &schema)
            .and_then(|()| TopicTemplate::parse(&config.topic, &schema))?;
        let client_id = broker
            .client_id
            .clone()
            .unwrap_or_else(|| format!("weir-{}-{:08x}", sanitize(name), rand::random::<u32>()));
        let options = broker.mqtt_options(&client_id, true)?;
        Ok(Self {
            name: name.to_owned(),
            formatter: RowFormatter::new(OutputFormat::Json, config.timestamps),
            config,
            template,
            max_message_bytes: broker.max_message_bytes,
            lines: Vec::new(),
            line_ends: Vec::new(),
            topics: Vec::new(),
            pending: Some(options),
            client: None,
            stats: MqttStats::named(name),
            too_large: RateLimitedLog::new(Duration::from_secs(30)),
        })
    }

    /// Checks the options against the rows' schema without reading files.
    pub fn check(broker: &BrokerConfig, config: &MqttSinkConfig, schema: &Schema) -> Result<()> {
        broker.validate(true)?;
        TopicTemplate::parse(&config.topic, schema).map(drop)
    }

    /// Connection and traffic counters of this sink.
    pub fn stats(&self) -> Arc<MqttStats> {
        Arc::clone(&self.stats)
    }

    fn client(&mut self) -> Result<&mut SinkClient> {
        if let Some(options) = self.pending.take() {
            self.client = Some(SinkClient::start(
                self.name.clone(),
                options,
                self.config.qos.0 > 0,
                Arc::clone(&self.stats),
            )?);
        }
        match &mut self.client {
            Some(client) => Ok(client),
            None => Err(ConnectorError::Internal(
                "MQTT sink without a client".into(),
            )),
        }
    }

    fn publish(&mut self, topic: &str, payload: Vec<u8>) -> Result<()> {
        if payload.len() > self.max_message_bytes {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = self.too_large.allow() {
                tracing::warn!(
                    sink = %self.name,
                    bytes = payload.len(),
                    limit = self.max_message_bytes,
                    suppressed,
                    "result message larger than max_message_bytes not published"
                );
            }
            return Ok(());
        }
        let qos: QoS = self.config.qos.level();
        let retain = self.config.retain;
        let name = self.name.clone();
        let client = self.client()?;
        let started = Instant::now();
        let mut payload = payload;
        loop {
            match client.client.try_publish(topic, qos, retain, payload) {
                Ok(()) => {
                    client.queued += 1;
                    break;
                }
                Err(ClientError::TryRequest(rumqttc::Request::Publish(publish))) => {
                    if started.elapsed() > PUBLISH_TIMEOUT {
                        return Err(ConnectorError::Internal(format!(
                            "MQTT sink '{name}': the broker has not taken a message for {}s",
                            PUBLISH_TIMEOUT.as_secs()
                        )));
                    }
                    payload = publish.payload.to_vec();
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(error) => {
                    return Err(ConnectorError::Internal(format!(
                        "MQTT sink '{name}': {error}"
                    )));
                }
            }
        }
        self.stats.messages.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

impl Sink for MqttSink {
    fn write_batch(&mut self, batch: &RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        self.lines.clear();
        self.line_ends.clear();
        self.formatter
            .write_batch(batch, &mut self.lines)
            .map_err(|e| ConnectorError::Internal(format!("formatting rows: {e}")))?;
        // The formatter ends every row with a newline and escapes newlines inside strings.
        for (i, byte) in self.lines.iter().enumerate() {
            if *byte == b'\n' {
                self.line_ends.push(i);
            }
        }
        self.topics.clear();
        let topics = &mut self.topics;
        self.template
            .for_each_row(batch, |_, topic| topics.push(topic.to_owned()))?;
        let topics = std::mem::take(&mut self.topics);
        let lines = std::mem::take(&mut self.lines);
        let line_ends = std::mem::take(&mut self.line_ends);
        let row = |i: usize| {
            let start = if i == 0 { 0 } else { line_ends[i - 1] + 1 };
            &lines[start..line_ends[i]]
        };
        let result = match self.config.mode {
            PublishMode::Row => {
                (0..line_ends.len()).try_for_each(|i| self.publish(&topics[i], row(i).to_vec()))
            }
            PublishMode::Batch => {
                // One array per topic, split where it would exceed the message limit.
                let mut arrays: Vec<(&str, Vec<u8>)> = Vec::new();
                let mut open: HashMap<&str, usize> = HashMap::new();
                for (i, topic) in topics.iter().enumerate() {
                    let topic = topic.as_str();
                    let line = row(i);
                    let slot = match open.get(topic) {
                        Some(&slot)
                            if arrays[slot].1.len() + line.len() + 2 <= self.max_message_bytes =>
                        {
                            slot
                        }
                        _ => {
                            arrays.push((topic, Vec::with_capacity(line.len() * 16)));
                            open.insert(topic, arrays.len() - 1);
                            arrays.len() - 1
                        }
                    };
                    let array = &mut arrays[slot].1;
                    array.push(if array.is_empty() { b'[' } else { b',' });
                    array.extend_from_slice(line);
                }
                arrays.into_iter().try_for_each(|(topic, mut array)| {
                    array.push(b']');
                    self.publish(topic, array)
                })
            }
        };
        self.topics = topics;
        self.lines = lines;
        self.line_ends = line_ends;
        result
    }

    fn flush(&mut self) -> Result<()> {
        // Messages are already queued to the client, which sends them as fast as the broker
        // takes them; there is nothing buffered here.
        Ok(())
    }

    /// Waits while the broker is away and the client's queue is full.
    fn may_block(&self) -> bool {
        true
    }
}

/// The connection thread of a sink.
struct SinkClient {
    client: Client,
    /// Messages handed to the client.
    queued: u64,
    /// Messages written to the socket (QoS 0) or acknowledged by the broker (QoS 1).
    delivered: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    finished: mpsc::Receiver<()>,
    thread: Option<JoinHandle<()>>,
}

impl SinkClient {
    fn start(
        name: String,
        options: MqttOptions,
        acknowledged: bool,
        stats: Arc<MqttStats>,
    ) -> Result<Self> {
        let (client, mut connection) = Client::new(options, REQUEST_QUEUE);
        // Results leave in bursts of small messages. With Nagle's algorithm on, a burst's
        // tail waits for the broker's ACK, and a broker that sends nothing back (QoS 0)
        // delays that ACK by up to 40 ms.
        let mut network = connection.eventloop.network_options();
        network.set_tcp_nodelay(true);
        connection.eventloop.set_network_options(network);
        let stop = Arc::new(AtomicBool::new(false));
        let (done, finished) = mpsc::channel();
        let stopping = Arc::clone(&stop);
        let delivered = Arc::new(AtomicU64::new(0));
        let delivering = Arc::clone(&delivered);
        let thread = std::thread::Builder::new()
            .name(format!("mqtt-sink-{}", sanitize(&name)))
            .spawn(move || {
                let mut reconnects = Reconnects::new("sink", &name, Arc::clone(&stats));
                for notification in connection.iter() {
                    if let Ok(Event::Outgoing(Outgoing::Publish(_))) = &notification {
                        tracing::trace!(sink = %name, "published");
                    }
                    match notification {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => reconnects.connected(),
                        Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                        Ok(Event::Outgoing(Outgoing::Publish(_))) if !acknowledged => {
                            delivering.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Event::Incoming(Packet::PubAck(_))) => {
                            delivering.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        Err(error) => {
                            if stopping.load(Ordering::Relaxed) {
                                break;
                            }
                            let delay = reconnects.failed(&error);
                            let until = Instant::now() + delay;
                            while Instant::now() < until && !stopping.load(Ordering::Relaxed) {
                                std::thread::sleep(Duration::from_millis(20));
                            }
                        }
                    }
                }
                stats.up.store(0, Ordering::Relaxed);
                let _ = done.send(());
            })
            .map_err(|e| ConnectorError::Internal(format!("cannot start MQTT thread: {e}")))?;
        Ok(Self {
            client,
            queued: 0,
            delivered,
            stop,
            finished,
            thread: Some(thread),
        })
    }
}

impl Drop for SinkClient {
    fn drop(&mut self) {
        // Wait until the broker has every queued message (acknowledged at QoS 1), then say
        // goodbye: disconnecting at once can cut off the last messages still in flight.
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while self.delivered.load(Ordering::Relaxed) < self.queued && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        if self.client.try_disconnect().is_err() {
            self.stop.store(true, Ordering::Relaxed);
        }
        match self.finished.recv_timeout(Duration::from_secs(1)) {
            Ok(()) => {
                if let Some(thread) = self.thread.take() {
                    let _ = thread.join();
                }
            }
            Err(_) => {
                tracing::warn!("MQTT sink: queued results not sent within {DRAIN_TIMEOUT:?}");
                self.stop.store(true, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use arrow::array::StringArray;
    use arrow::datatypes::{DataType, Field};

    use super::*;
    use crate::mqtt::broker::{EmbeddedBroker, EmbeddedBrokerConfig, find_socket};

    #[test]
    fn the_sinks_connection_has_nagle_off() {
        let broker = EmbeddedBroker::start(&EmbeddedBrokerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..EmbeddedBrokerConfig::default()
        })
        .expect("broker starts");
        let schema = Arc::new(Schema::new(vec![Field::new(
            "sensor",
            DataType::Utf8,
            false,
        )]));
        let config = MqttSinkConfig {
            topic: "results/{sensor}".into(),
            ..MqttSinkConfig::default()
        };
        let broker_config = BrokerConfig {
            url: Some(broker.url()),
            ..BrokerConfig::default()
        };
        let mut sink =
            MqttSink::new("nagle", &broker_config, config, Arc::clone(&schema)).expect("sink");
        let batch = RecordBatch::try_new(schema, vec![Arc::new(StringArray::from(vec!["s1"]))])
            .expect("batch");
        sink.write_batch(&batch).expect("write");
        let stats = sink.stats();
        let deadline = Instant::now() + Duration::from_secs(10);
        while stats.connects.load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "the sink never connected");
            std::thread::sleep(Duration::from_millis(10));
        }
        // The sink's end of its connection: the one whose peer is the broker.
        let nodelay = find_socket(|socket| {
            let peer = socket.peer_addr().ok().and_then(|a| a.as_socket());
            (peer == Some(broker.address())).then(|| socket.tcp_nodelay())
        })
        .expect("descriptors readable")
        .expect("a connection to the broker")
        .expect("TCP_NODELAY readable");
        assert!(nodelay, "Nagle is on for the sink's connection");
    }
}
