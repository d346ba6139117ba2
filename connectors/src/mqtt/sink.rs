//! The `mqtt` sink: result rows as JSON messages, on topics built from their columns.
//!
//! Rows are rendered by the same [`RowFormatter`] as the file sink, so JSON looks the same
//! wherever it goes. The connection lives on a thread of its own (see [`connection`]),
//! started on the first write: building a sink to check a plan at deploy time connects to
//! nothing. Publishing hands a batch's messages to that thread's bounded queue in chunks,
//! which it writes to the socket together; when the broker is away and the queue is full,
//! `write_batch` waits (that is backpressure: the pipeline
//! slows down instead of buffering without bound) and gives up with an error after
//! [`PUBLISH_TIMEOUT`], so the pipeline's supervisor sees a broker that stays down. The sink
//! says it [may block](crate::Sink::may_block), so the engine runs it on a thread of its own
//! and the wait holds up no other pipeline.

mod connection;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::{Schema, SchemaRef};
use rumqttc::{MqttOptions, Publish};

use self::connection::{CHUNK_MESSAGES, SendError, SinkConnection};

use super::config::{BrokerConfig, MqttSinkConfig, PublishMode};
use super::source::sanitize;
use super::topic::TopicTemplate;
use super::{MqttStats, RateLimitedLog};
use crate::Sink;
use crate::error::{ConnectorError, Result};
use crate::file::{OutputFormat, RowFormatter};

/// How long a publish may wait for room in a full request queue.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

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
    connection: Option<SinkConnection>,
    /// Messages of the batch being written, not yet handed to the connection thread.
    chunk: Vec<Publish>,
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
            connection: None,
            chunk: Vec::new(),
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

    fn connection(&mut self) -> Result<&mut SinkConnection> {
        if let Some(options) = self.pending.take() {
            self.connection = Some(SinkConnection::start(
                self.name.clone(),
                options,
                self.config.qos.0 > 0,
                Arc::clone(&self.stats),
            )?);
        }
        self.connection
            .as_mut()
            .ok_or_else(|| ConnectorError::Internal("MQTT sink without a connection".into()))
    }

    /// Adds a message to the chunk that goes to the connection thread next.
    fn publish(&mut self, topic: String, payload: Vec<u8>) -> Result<()> {
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
        let mut publish = Publish::new(topic, self.config.qos.level(), payload);
        publish.retain = self.config.retain;
        self.chunk.push(publish);
        if self.chunk.len() == CHUNK_MESSAGES {
            self.send_chunk()?;
        }
        Ok(())
    }

    /// Hands the chunk to the connection thread, waiting while its queue is full.
    fn send_chunk(&mut self) -> Result<()> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        let mut chunk = std::mem::take(&mut self.chunk);
        let messages = chunk.len() as u64;
        let name = self.name.clone();
        let connection = self.connection()?;
        let started = Instant::now();
        loop {
            match connection.try_send(chunk) {
                Ok(()) => break,
                Err(SendError::Full(back)) => {
                    if started.elapsed() > PUBLISH_TIMEOUT {
                        return Err(ConnectorError::Internal(format!(
                            "MQTT sink '{name}': the broker has not taken a message for {}s",
                            PUBLISH_TIMEOUT.as_secs()
                        )));
                    }
                    chunk = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(SendError::Gone) => {
                    return Err(ConnectorError::Internal(format!(
                        "MQTT sink '{name}': its connection thread has ended"
                    )));
                }
            }
        }
        self.stats.messages.fetch_add(messages, Ordering::Relaxed);
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
        let mut topics = std::mem::take(&mut self.topics);
        let lines = std::mem::take(&mut self.lines);
        let line_ends = std::mem::take(&mut self.line_ends);
        let row = |i: usize| {
            let start = if i == 0 { 0 } else { line_ends[i - 1] + 1 };
            &lines[start..line_ends[i]]
        };
        let result = match self.config.mode {
            PublishMode::Row => (0..line_ends.len())
                .try_for_each(|i| self.publish(std::mem::take(&mut topics[i]), row(i).to_vec())),
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
                    self.publish(topic.to_owned(), array)
                })
            }
        }
        .and_then(|()| self.send_chunk());
        self.topics = topics;
        self.lines = lines;
        self.line_ends = line_ends;
        result
    }

    fn flush(&mut self) -> Result<()> {
        // `write_batch` hands every message to the connection thread before it returns, which
        // sends them as fast as the broker takes them; there is nothing buffered here.
        Ok(())
    }

    /// Waits while the broker is away and the client's queue is full.
    fn may_block(&self) -> bool {
        true
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
