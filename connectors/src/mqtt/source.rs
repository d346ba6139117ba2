//! The `mqtt` source: subscribe, decode messages in batches into Arrow, survive the broker.
//!
//! ```text
//!  broker ──> client task (rumqttc event loop) ──> Inbox ──> MqttSource::next_event
//!             reconnect, backoff, resubscribe       │        take every pending message,
//!                                                   │        decode until batch_size or linger
//!                                   waits while full (backpressure to the broker's socket)
//! ```
//!
//! The client task owns the connection and only moves messages into the [`Inbox`]: raw bytes
//! appended to one buffer, so a burst of small messages costs no allocation each. The source
//! takes the whole pending buffer at once, which batches naturally: when decoding keeps up,
//! each take holds the few messages that arrived meanwhile; when it falls behind, the buffer
//! grows until its cap, and then the task stops reading the socket, so the broker holds the
//! backlog rather than the gateway's memory. A large take is decoded a batch at a time, so a
//! batch never holds much more than `batch_size` rows however far decoding fell behind.
//!
//! A batch that is not full waits up to `linger` for more messages, except when a message
//! moves the watermark past the end of a window downstream: that batch leaves at once, so
//! the window's result does not wait for the messages that happen to follow.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, RecordBatch, StringBuilder};
use arrow::datatypes::{Schema, SchemaRef};
use futures::FutureExt as _;
use rumqttc::{
    ConnectionError, Event, EventLoop, MqttOptions, MqttState, Outgoing, Packet, PingReq, PubAck,
    Publish, QoS, Request, StateError, Subscribe,
};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use super::config::{AckMode, BrokerConfig, MessageFormat, MqttSourceConfig};
use super::topic::TopicPattern;
use super::{MqttStats, Reconnects, flushed};
use crate::dead_letter::DeadLetterQueue;
use crate::decode::json::array_elements;
use crate::decode::{CsvDecoder, DecodeError, JsonDecoder, SparkplugDecoder};
use crate::error::Result;
use crate::{Source, SourceEvent, SourceFuture, WindowEnds};

/// Pending messages from which on the client task stops reading from the broker (what it
/// read last, at most [`READ_PACKETS`] messages, still goes in).
const INBOX_MAX_MESSAGES: usize = 65_536;
/// Pending bytes from which on the client task stops reading from the broker.
const INBOX_MAX_BYTES: usize = 32 << 20;

/// Messages handed from the client task to the source, as one buffer of topics and one of
/// payloads plus offsets.
#[derive(Debug, Default)]
pub(crate) struct Messages {
    /// Kept as text, so that reading a topic back needs no UTF-8 check.
    topics: String,
    bytes: Vec<u8>,
    /// Per message: end of its topic (in `topics`), end of its payload (in `bytes`).
    ends: Vec<(usize, usize)>,
    /// With `ack = 'checkpoint'`: the QoS 1 messages to acknowledge later, in order, by
    /// their index here.
    acks: Vec<(usize, Ack)>,
}

/// A QoS 1 message to acknowledge once its checkpoint commits.
#[derive(Debug)]
struct Ack {
    /// Its packet id.
    pkid: u16,
    /// The broker session it came in: an acknowledgement is meaningless in another one, and
    /// could even acknowledge another message that reuses the packet id.
    session: u64,
}

impl Messages {
    fn push(&mut self, topic: &str, payload: &[u8]) {
        self.topics.push_str(topic);
        self.bytes.extend_from_slice(payload);
        self.ends.push((self.topics.len(), self.bytes.len()));
    }

    fn len(&self) -> usize {
        self.ends.len()
    }

    /// Moves every message of `other` after these, leaving `other` empty.
    fn append(&mut self, other: &mut Messages) {
        if self.len() == 0 {
            // Nothing to copy: the buffers change hands, and keep circulating.
            std::mem::swap(self, other);
            return;
        }
        let (topics, bytes, messages) = (self.topics.len(), self.bytes.len(), self.len());
        self.topics.push_str(&other.topics);
        self.bytes.extend_from_slice(&other.bytes);
        self.ends.extend(
            other
                .ends
                .iter()
                .map(|&(topic_end, end)| (topics + topic_end, bytes + end)),
        );
        self.acks
            .extend(other.acks.drain(..).map(|(i, ack)| (messages + i, ack)));
        other.clear();
    }

    fn clear(&mut self) {
        self.topics.clear();
        self.bytes.clear();
        self.ends.clear();
        self.acks.clear();
    }

    /// Each message from the `first` on as `(topic, payload)`.
    fn iter_from(&self, first: usize) -> impl Iterator<Item = (&str, &[u8])> {
        let (mut topic_start, mut start) = first
            .checked_sub(1)
            .map_or((0, 0), |previous| self.ends[previous]);
        self.ends[first..].iter().map(move |&(topic_end, end)| {
            let topic = &self.topics[topic_start..topic_end];
            let payload = &self.bytes[start..end];
            (topic_start, start) = (topic_end, end);
            (topic, payload)
        })
    }
}

/// The hand-over point between the client task and the source.
#[derive(Debug, Default)]
pub(crate) struct Inbox {
    pending: Mutex<Messages>,
    /// Counts broker sessions: the client task moves it on whenever the broker says it
    /// kept no session for this client.
    session: AtomicU64,
    /// Signalled when messages are added.
    arrived: Notify,
    /// Signalled when the source took the pending messages.
    taken: Notify,
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, Messages> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves `messages` into the inbox at once, first waiting while it is full.
    async fn put_all(&self, messages: &mut Messages) {
        loop {
            {
                let mut pending = self.lock();
                if pending.len() < INBOX_MAX_MESSAGES
                    && pending.topics.len() + pending.bytes.len() < INBOX_MAX_BYTES
                {
                    pending.append(messages);
                    drop(pending);
                    self.arrived.notify_one();
                    return;
                }
            }
            self.taken.notified().await;
        }
    }

    /// Swaps every pending message into `into` (which must be empty), waiting for one if
    /// there is none. Cancel-safe: nothing is taken until the swap, which does not wait.
    async fn take(&self, into: &mut Messages) {
        loop {
            {
                let mut pending = self.lock();
                if pending.len() > 0 {
                    std::mem::swap(&mut *pending, into);
                    drop(pending);
                    tracing::trace!(messages = into.len(), "took messages");
                    self.taken.notify_one();
                    return;
                }
            }
            self.arrived.notified().await;
        }
    }
}

/// Decodes message payloads of one format.
enum PayloadDecoder {
    Json {
        decoder: JsonDecoder,
        elements: Vec<std::ops::Range<usize>>,
    },
    Csv(CsvDecoder),
    Sparkplug(SparkplugDecoder),
}

impl PayloadDecoder {
    fn len(&self) -> usize {
        match self {
            Self::Json { decoder, .. } => decoder.len(),
            Self::Csv(decoder) => decoder.len(),
            Self::Sparkplug(decoder) => decoder.len(),
        }
    }

    fn latest_event_time(&self, from_row: usize) -> Option<i64> {
        match self {
            Self::Json { decoder, .. } => decoder.latest_event_time(from_row),
            Self::Csv(decoder) => decoder.latest_event_time(from_row),
            Self::Sparkplug(decoder) => decoder.latest_event_time(from_row),
        }
    }

    fn flush(&mut self) -> Result<Option<RecordBatch>> {
        match self {
            Self::Json { decoder, .. } => decoder.flush(),
            Self::Csv(decoder) => decoder.flush(),
            Self::Sparkplug(decoder) => decoder.flush(),
        }
    }

    /// Decodes one message; every rejected record goes to `reject`. Returns the rows added.
    fn decode(
        &mut self,
        topic: &str,
        payload: &[u8],
        reject: &mut impl FnMut(&DecodeError, &[u8]),
    ) -> usize {
        match self {
            Self::Json { decoder, elements } => match array_elements(payload, elements) {
                None => decoder.decode_record(payload).unwrap_or_else(|error| {
                    reject(&error, payload);
                    0
                }),
                Some(Err(error)) => {
                    reject(&error, payload);
                    0
                }
                Some(Ok(())) => {
                    let mut rows = 0;
                    for range in elements.iter() {
                        let element = &payload[range.clone()];
                        match decoder.decode_record(element) {
                            Ok(added) => rows += added,
                            Err(error) => reject(&error, element),
                        }
                    }
                    rows
                }
            },
            Self::Csv(decoder) => {
                let mut rows = 0;
                for line in crate::decode::csv::records(payload) {
                    let line = line.trim_ascii();
                    if line.is_empty() {
                        continue;
                    }
                    match decoder.decode_record(line) {
                        Ok(added) => rows += added,
                        Err(error) => reject(&error, line),
                    }
                }
                rows
            }
            Self::Sparkplug(decoder) => {
                decoder
                    .decode_message(topic, payload)
                    .unwrap_or_else(|error| {
                        reject(&error, payload);
                        0
                    })
            }
        }
    }
}

/// Where each column of the source's batches comes from.
#[derive(Debug, Clone, Copy)]
enum ColumnOrigin {
    /// Column `i` of the decoded payload batch.
    Payload(usize),
    /// Named topic level `i` of the pattern.
    Topic(usize),
}

/// Reads one MQTT subscription; see the module docs.
pub struct MqttSource {
    name: String,
    schema: SchemaRef,
    config: MqttSourceConfig,
    max_message_bytes: usize,
    pattern: TopicPattern,
    decoder: PayloadDecoder,
    origins: Vec<ColumnOrigin>,
    /// One builder per named topic level, filled alongside the decoder.
    levels: Vec<StringBuilder>,
    dead_letters: DeadLetterQueue,
    stats: Arc<MqttStats>,
    inbox: Arc<Inbox>,
    taken: Messages,
    /// The first message of `taken` not decoded yet.
    next_taken: usize,
    oldest_pending: Option<Instant>,
    client: Option<ClientTask>,
    connection: Option<(MqttOptions, QoS)>,
    /// `ack = 'checkpoint'`: QoS 1 messages taken and not yet acknowledged, by message
    /// number (counted from the start), oldest first.
    unacked: VecDeque<(u64, Ack)>,
    /// Messages decoded so far, and of those, the ones whose rows are in returned batches.
    decoded: u64,
    returned: u64,
    /// (checkpoint id, messages it covers), oldest first.
    barriers: VecDeque<(u64, u64)>,
    /// Where windows close downstream, with the next window end the watermark has not
    /// reached yet (`None` until the first row).
    window_ends: Option<(WindowEnds, Option<i64>)>,
    /// The last message decoded moved the watermark past a window end: its batch leaves now.
    closes_window: bool,
}

impl MqttSource {
    /// A source for `schema`, not yet connected: the connection is made on the first poll,
    /// inside the engine's runtime. Reads the TLS files, if any.
    pub fn new(
        name: &str,
        broker: &BrokerConfig,
        config: MqttSourceConfig,
        schema: SchemaRef,
        event_time: Option<&str>,
        dead_letters: DeadLetterQueue,
    ) -> Result<Self> {
        let mut source = Self::check(name, broker, config, schema, event_time, dead_letters)?;
        let client_id = broker
            .client_id
            .clone()
            .unwrap_or_else(|| format!("weir-{}-{:08x}", sanitize(name), rand::random::<u32>()));
        let mut options = broker.mqtt_options(&client_id, source.config.clean_session)?;
        options.set_manual_acks(source.config.ack == AckMode::Checkpoint);
        source.connection = Some((options, source.config.qos.level()));
        // Published only for a source that runs, not for one built to check the SQL.
        source.stats = MqttStats::named(name);
        Ok(source)
    }

    /// Checks the options and schema as [`Self::new`] does, without reading files (which
    /// exist only on the gateway, while the SQL may be compiled elsewhere).
    pub fn check(
        name: &str,
        broker: &BrokerConfig,
        config: MqttSourceConfig,
        schema: SchemaRef,
        event_time: Option<&str>,
        dead_letters: DeadLetterQueue,
    ) -> Result<Self> {
        broker.validate(config.clean_session)?;
        config.validate()?;
        let pattern = TopicPattern::parse(&config.topic, &schema)?;
        // Columns filled from the topic are not decoded from the payload.
        let mut origins = Vec::with_capacity(schema.fields().len());
        let mut payload_fields = Vec::new();
        for field in schema.fields() {
            match pattern.captures.iter().position(|(_, c)| c == field.name()) {
                Some(level) => origins.push(ColumnOrigin::Topic(level)),
                None => {
                    origins.push(ColumnOrigin::Payload(payload_fields.len()));
                    payload_fields.push(field.clone());
                }
            }
        }
        let payload_schema = Arc::new(Schema::new(payload_fields));
        let options = config.decode_options();
        let decoder = match config.format {
            MessageFormat::Json => PayloadDecoder::Json {
                decoder: JsonDecoder::new(payload_schema, event_time, options)?,
                elements: Vec::new(),
            },
            MessageFormat::Csv => {
                PayloadDecoder::Csv(CsvDecoder::new(payload_schema, event_time, options)?)
            }
            MessageFormat::Sparkplug => PayloadDecoder::Sparkplug(SparkplugDecoder::new(
                payload_schema,
                event_time,
                options,
            )?),
        };
        Ok(Self {
            name: name.to_owned(),
            levels: pattern
                .captures
                .iter()
                .map(|_| StringBuilder::new())
                .collect(),
            schema,
            max_message_bytes: broker.max_message_bytes,
            pattern,
            decoder,
            origins,
            dead_letters,
            stats: Arc::default(),
            inbox: Arc::default(),
            taken: Messages::default(),
            next_taken: 0,
            oldest_pending: None,
            client: None,
            connection: None,
            config,
            unacked: Default::default(),
            decoded: 0,
            returned: 0,
            barriers: Default::default(),
            window_ends: None,
            closes_window: false,
        })
    }

    /// Connection and message counters of this source.
    pub fn stats(&self) -> Arc<MqttStats> {
        Arc::clone(&self.stats)
    }

    fn start_client(&mut self) {
        if let Some((options, qos)) = self.connection.take() {
            self.client = Some(ClientTask::spawn(
                self.name.clone(),
                options,
                self.pattern.filter.clone(),
                qos,
                Arc::clone(&self.inbox),
                Arc::clone(&self.stats),
                self.config.ack == AckMode::Checkpoint,
            ));
        }
    }

    /// Numbers the messages just taken after every earlier one (all decoded by now), which
    /// is how their acknowledgements are found later, and counts them.
    fn number_taken(&mut self) {
        let first = self.decoded;
        self.unacked.extend(
            self.taken
                .acks
                .drain(..)
                .map(|(index, publish)| (first + index as u64, publish)),
        );
        self.stats
            .messages
            .fetch_add(self.taken.len() as u64, Ordering::Relaxed);
    }

    /// Decodes taken messages until the batch is full or none is left. A burst taken at
    /// once thus leaves in batches of `batch_size` (plus the rows of one message), the first
    /// of them as soon as it is full: its rows, and the watermark they move, do not wait
    /// while the rest of the burst is decoded. For the same reason decoding stops after a
    /// message that moves the watermark past a window end (see [`Source::set_window_ends`]).
    fn decode_taken(&mut self) {
        let Self {
            taken,
            next_taken,
            decoded,
            decoder,
            pattern,
            levels,
            dead_letters,
            name,
            stats,
            max_message_bytes,
            config,
            window_ends,
            closes_window,
            ..
        } = self;
        let mut rejected = 0u64;
        let first = *next_taken;
        // Borrowed from `taken`: no allocation per message.
        let mut captured: Vec<&str> = Vec::with_capacity(pattern.captures.len());
        for (topic, payload) in taken.iter_from(*next_taken) {
            if decoder.len() >= config.batch_size && *next_taken > first {
                break;
            }
            *next_taken += 1;
            *decoded += 1;
            if payload.len() > *max_message_bytes {
                dead_letters.push(name, "message too large", payload);
                rejected += 1;
                continue;
            }
            if !pattern.capture(topic, &mut captured) {
                dead_letters.push(name, "topic does not match the pattern", topic.as_bytes());
                rejected += 1;
                continue;
            }
            let before = decoder.len();
            let rows = decoder.decode(topic, payload, &mut |error, record| {
                dead_letters.push(name, &error.to_string(), record);
                rejected += 1;
            });
            for (builder, value) in levels.iter_mut().zip(&captured) {
                builder.append_value_n(value, rows);
            }
            if rows > 0
                && let Some((ends, next_end)) = window_ends
                && let Some(latest) = decoder.latest_event_time(before)
                && passes_window_end(ends, next_end, latest)
            {
                *closes_window = true;
                break;
            }
        }
        stats.rejected.fetch_add(rejected, Ordering::Relaxed);
        if *next_taken == taken.len() {
            taken.clear();
            *next_taken = 0;
        }
        if let PayloadDecoder::Sparkplug(decoder) = &mut self.decoder
            && self.config.rebirth
        {
            for (group, node) in decoder.rebirth_needed() {
                self.request_rebirth(&group, &node);
            }
        }
    }

    /// Publishes NCMD `Node Control/Rebirth` = true to the edge node `group`/`node`, which
    /// answers with new births, so its aliases and sequence numbers can be trusted again.
    fn request_rebirth(&self, group: &str, node: &str) {
        use prost::Message as _;
        use weir_proto::sparkplug::payload::{Metric, metric};
        let Some(client) = &self.client else {
            return;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let payload = weir_proto::sparkplug::Payload {
            timestamp: Some(now),
            metrics: vec![Metric {
                name: Some("Node Control/Rebirth".into()),
                timestamp: Some(now),
                datatype: Some(weir_proto::sparkplug::DataType::Boolean as u32),
                value: Some(metric::Value::BooleanValue(true)),
                ..Metric::default()
            }],
            ..weir_proto::sparkplug::Payload::default()
        };
        let topic = format!("spBv1.0/{group}/NCMD/{node}");
        let request = Request::Publish(Publish::new(
            &topic,
            QoS::AtMostOnce,
            payload.encode_to_vec(),
        ));
        if client.send(request) {
            self.stats.rebirths.fetch_add(1, Ordering::Relaxed);
            tracing::info!(source = %self.name, %group, %node, "asked the Sparkplug edge node for a rebirth");
        } else {
            tracing::warn!(source = %self.name, %group, %node, "cannot ask the Sparkplug edge node for a rebirth: the connection's task has ended");
        }
    }

    fn flush(&mut self) -> Result<Option<RecordBatch>> {
        self.oldest_pending = None;
        // Every message decoded so far is in this batch (or produced no rows).
        self.returned = self.decoded;
        let Some(payload) = self.decoder.flush()? else {
            return Ok(None);
        };
        // finish() leaves an empty builder; the next batch's starts with this one's size, so
        // its rows do not regrow (and copy) the buffers a doubling at a time.
        let levels: Vec<ArrayRef> = self
            .levels
            .iter_mut()
            .map(|b| {
                let rows = b.offsets_slice().len().saturating_sub(1);
                let next = StringBuilder::with_capacity(rows, b.values_slice().len());
                Arc::new(std::mem::replace(b, next).finish()) as ArrayRef
            })
            .collect();
        let columns = self
            .origins
            .iter()
            .map(|origin| match origin {
                ColumnOrigin::Payload(i) => Arc::clone(payload.column(*i)),
                ColumnOrigin::Topic(i) => Arc::clone(&levels[*i]),
            })
            .collect();
        let batch = RecordBatch::try_new(Arc::clone(&self.schema), columns)?;
        tracing::trace!(source = %self.name, rows = batch.num_rows(), "batch decoded");
        Ok(Some(batch))
    }

    async fn next(&mut self) -> Result<SourceEvent> {
        self.start_client();
        loop {
            let closes_window = std::mem::take(&mut self.closes_window);
            if (closes_window || self.decoder.len() >= self.config.batch_size)
                && let Some(batch) = self.flush()?
            {
                return Ok(SourceEvent::Batch(batch));
            }
            if self.next_taken == self.taken.len() {
                match self.oldest_pending {
                    None => self.inbox.take(&mut self.taken).await,
                    Some(oldest) => {
                        let deadline = tokio::time::Instant::from_std(oldest + self.config.linger);
                        let take = self.inbox.take(&mut self.taken);
                        if tokio::time::timeout_at(deadline, take).await.is_err() {
                            if let Some(batch) = self.flush()? {
                                return Ok(SourceEvent::Batch(batch));
                            }
                            continue;
                        }
                    }
                }
                self.number_taken();
            }
            self.decode_taken();
            if self.decoder.len() > 0 && self.oldest_pending.is_none() {
                self.oldest_pending = Some(Instant::now());
            }
        }
    }
}

impl Source for MqttSource {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn next_event(&mut self) -> SourceFuture<'_> {
        Box::pin(self.next())
    }

    fn set_window_ends(&mut self, ends: WindowEnds) {
        if ends.every_ns > 0 {
            self.window_ends = Some((ends, None));
        }
    }

    fn on_barrier(&mut self, id: u64) {
        if self.config.ack == AckMode::Checkpoint {
            self.barriers.push_back((id, self.returned));
        }
    }

    /// Acknowledges every message the committed checkpoint covers; the broker redelivers
    /// the rest after a crash. Acks the client cannot queue now go with the next commit.
    fn committed(&mut self, id: u64) {
        let mut covered = None;
        while self.barriers.front().is_some_and(|(b, _)| *b <= id) {
            covered = self.barriers.pop_front().map(|(_, n)| n);
        }
        let (Some(covered), Some(client)) = (covered, &self.client) else {
            return;
        };
        let session = self.inbox.session.load(Ordering::Acquire);
        while let Some((number, ack)) = self.unacked.front()
            && *number < covered
        {
            // A broker that lost its session has nothing to acknowledge.
            if ack.session == session && !client.send(Request::PubAck(PubAck::new(ack.pkid))) {
                break;
            }
            self.unacked.pop_front();
        }
    }
}

/// Whether event time `latest` moves the watermark past the window end `next_end`, which
/// then moves on to the first end after it. The first row only sets the first end: no window
/// of this source holds anything before it.
fn passes_window_end(ends: &WindowEnds, next_end: &mut Option<i64>, latest: i64) -> bool {
    let reached = match *next_end {
        Some(end) if latest.saturating_sub(ends.delay_ns) < end => return false,
        Some(_) => true,
        None => false,
    };
    // Rare (once per window end): only now is the wall clock read.
    if !ends.in_time(latest) {
        return false;
    }
    *next_end = Some(ends.next_after(latest));
    reached
}

/// A client id made only of characters every broker accepts.
pub(crate) fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect()
}

/// The task that owns the broker connection of a source; aborted when dropped.
struct ClientTask {
    task: JoinHandle<()>,
    /// Packets for the broker: acknowledgements, rebirth requests. The task writes them
    /// while connected.
    requests: mpsc::UnboundedSender<Request>,
    stats: Arc<MqttStats>,
}

impl ClientTask {
    fn spawn(
        name: String,
        options: MqttOptions,
        filter: String,
        qos: QoS,
        inbox: Arc<Inbox>,
        stats: Arc<MqttStats>,
        manual_acks: bool,
    ) -> Self {
        // The task keeps its own request queue; rumqttc's stays empty.
        let events = EventLoop::new(options, 1);
        let (requests, requests_rx) = mpsc::unbounded_channel();
        let client = Client {
            name,
            subscription: Subscription {
                filter,
                qos,
                manual_acks,
            },
            requests: requests.clone(),
            inbox,
            stats: Arc::clone(&stats),
            redeliveries: Redeliveries::default(),
            connected_before: false,
            ready: Messages::default(),
        };
        let task = tokio::spawn(client.run(events, requests_rx));
        Self {
            task,
            requests,
            stats,
        }
    }

    /// Queues a packet for the broker; `false` if the task has ended.
    fn send(&self, request: Request) -> bool {
        self.requests.send(request).is_ok()
    }
}

impl Drop for ClientTask {
    fn drop(&mut self) {
        self.task.abort();
        self.stats.up.store(0, Ordering::Relaxed);
    }
}

/// What a source's client subscribes to, and whether it keeps messages to acknowledge later.
struct Subscription {
    filter: String,
    qos: QoS,
    manual_acks: bool,
}

/// Packet ids of the QoS 1 messages a source with `ack = 'checkpoint'` has taken, so that a
/// broker sending them again after a reconnect does not count them twice.
///
/// MQTT brokers resend every unacknowledged QoS 1 message of a persistent session after a
/// reconnect, with its original packet id and the DUP flag, and never reuse the id of a
/// message still unacknowledged. So a DUP message whose id the source holds is one it
/// already has. One whose acknowledgement went out on a connection that then broke may not
/// have reached the broker; such a message is acknowledged again instead of taken again.
#[derive(Default)]
struct Redeliveries {
    /// Taken, not acknowledged yet.
    held: HashSet<u16>,
    /// Acknowledged on the current connection.
    acked: HashSet<u16>,
    /// Acknowledged on a connection that broke before the broker may have read it.
    maybe_acked: HashSet<u16>,
}

/// What to do with an incoming QoS 1 publish.
#[derive(Debug, PartialEq, Eq)]
enum Delivery {
    New,
    /// A copy of a message the source holds: drop it.
    Held,
    /// A copy of a message the source acknowledged: acknowledge it again and drop it.
    Acked,
}

impl Redeliveries {
    fn received(&mut self, pkid: u16, dup: bool) -> Delivery {
        if dup && self.held.contains(&pkid) {
            return Delivery::Held;
        }
        if self.maybe_acked.remove(&pkid) && dup {
            self.acked.insert(pkid);
            return Delivery::Acked;
        }
        self.held.insert(pkid);
        Delivery::New
    }

    fn ack_sent(&mut self, pkid: u16) {
        if self.held.remove(&pkid) {
            self.acked.insert(pkid);
        }
    }

    fn connection_lost(&mut self) {
        self.maybe_acked.extend(self.acked.drain());
    }

    /// The broker kept no session: it sends nothing again, and ids start over.
    fn session_lost(&mut self) {
        *self = Self::default();
    }
}

/// Packets read from the socket, at most, before what they carry goes to the source and the
/// acknowledgements of the QoS 1 ones to the broker.
const READ_PACKETS: usize = 1024;

/// The client task's side: moves publishes into the inbox, subscribes after every connect,
/// and reconnects with exponential backoff and jitter after any failure.
///
/// rumqttc connects, resends what the last connection left unacknowledged, and keeps the
/// session's state; its event loop hands out one packet per call, though, with a `select!`
/// and a flush for every ten. While connected, the task reads the socket itself instead:
/// every packet that has arrived, up to [`READ_PACKETS`], then one flush of the
/// acknowledgements and one hand-over of the messages to the source.
struct Client {
    name: String,
    subscription: Subscription,
    requests: mpsc::UnboundedSender<Request>,
    inbox: Arc<Inbox>,
    stats: Arc<MqttStats>,
    redeliveries: Redeliveries,
    connected_before: bool,
    /// Messages read, not yet in the inbox.
    ready: Messages,
}

impl Client {
    async fn run(mut self, mut events: EventLoop, mut requests: mpsc::UnboundedReceiver<Request>) {
        let mut reconnects = Reconnects::new("source", &self.name, Arc::clone(&self.stats));
        loop {
            let result = if events.network.is_some() && events.pending.is_empty() {
                self.stream(&mut events, &mut requests).await
            } else {
                // Connecting, or resending what the last connection left: rumqttc's loop.
                match events.poll().await {
                    Ok(event) => {
                        if let Event::Incoming(Packet::ConnAck(_)) = event {
                            reconnects.connected();
                        }
                        self.take(event);
                        self.deliver().await;
                        continue;
                    }
                    Err(error) => Err(error),
                }
            };
            match result {
                // Every sender of requests is gone (the source aborts the task before).
                Ok(()) => return,
                Err(error) => {
                    self.redeliveries.connection_lost();
                    // rumqttc's loop cleans up after its own failures; these are the task's.
                    if events.network.is_some() {
                        events.clean();
                    }
                    tokio::time::sleep(reconnects.failed(&error)).await;
                }
            }
        }
    }

    /// Reads and writes while the connection lasts; returns `Ok` once no one can send
    /// requests any more.
    async fn stream(
        &mut self,
        events: &mut EventLoop,
        requests: &mut mpsc::UnboundedReceiver<Request>,
    ) -> std::result::Result<(), ConnectionError> {
        let keep_alive = events.mqtt_options.keep_alive().max(Duration::from_secs(1));
        let flush_timeout = Duration::from_secs(events.network_options.connection_timeout());
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + keep_alive, keep_alive);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // What rumqttc's loop read and has not handed out yet comes first.
        while let Some(event) = events.state.events.pop_front() {
            self.take(event);
        }
        self.deliver().await;
        loop {
            let EventLoop { network, state, .. } = &mut *events;
            let Some(network) = network.as_mut() else {
                return Err(ConnectionError::MqttState(StateError::ConnectionAborted));
            };
            tokio::select! {
                // Acknowledgements and requests first: a stream of messages must not hold
                // them up.
                biased;
                request = requests.recv() => {
                    let Some(request) = request else {
                        return Ok(());
                    };
                    if let Some(packet) = state.handle_outgoing_packet(request)? {
                        network.write(packet).await?;
                    }
                    while let Ok(request) = requests.try_recv() {
                        if let Some(packet) = state.handle_outgoing_packet(request)? {
                            network.write(packet).await?;
                        }
                    }
                    flushed(flush_timeout, network.flush()).await?;
                }
                read = network.read() => {
                    let mut packet = read?;
                    let mut count = 1;
                    loop {
                        if let Some(reply) = self.incoming(packet, state)? {
                            network.write(reply).await?;
                        }
                        if count == READ_PACKETS {
                            break;
                        }
                        // Whatever else has arrived already, without waiting for more.
                        match network.read().now_or_never() {
                            Some(read) => packet = read?,
                            None => break,
                        }
                        count += 1;
                    }
                    flushed(flush_timeout, network.flush()).await?;
                }
                _ = ping.tick() => {
                    // A ping still unanswered from the last tick fails here: the broker is gone.
                    if let Some(packet) = state.handle_outgoing_packet(Request::PingReq(PingReq))? {
                        network.write(packet).await?;
                    }
                    flushed(flush_timeout, network.flush()).await?;
                }
            }
            while let Some(event) = events.state.events.pop_front() {
                self.take(event);
            }
            self.deliver().await;
        }
    }

    /// Moves what was read into the inbox, waiting while it is full (which holds the
    /// broker's messages in the broker).
    async fn deliver(&mut self) {
        if self.ready.len() > 0 {
            self.stats.reads.fetch_add(1, Ordering::Relaxed);
            self.inbox.put_all(&mut self.ready).await;
        }
    }

    /// Handles a packet read while streaming; returns the packet that answers it. Publishes
    /// go straight to `ready`, acknowledged here where rumqttc would (QoS 1 unless
    /// acknowledgements wait for checkpoints). rumqttc's state would clone each one into its
    /// event queue and read the clock; that and the moves after it took about a sixth of the
    /// thread while draining a backlog. Every other packet goes through that state, which
    /// keeps the session as before.
    fn incoming(
        &mut self,
        packet: Packet,
        state: &mut MqttState,
    ) -> std::result::Result<Option<Packet>, StateError> {
        match packet {
            Packet::Publish(publish) if publish.qos != QoS::ExactlyOnce => {
                let reply = (publish.qos == QoS::AtLeastOnce && !self.subscription.manual_acks)
                    .then(|| Packet::PubAck(PubAck::new(publish.pkid)));
                self.publish(&publish);
                Ok(reply)
            }
            packet => state.handle_incoming_packet(packet),
        }
    }

    /// Takes a message into `ready`, or drops a copy of one already taken.
    fn publish(&mut self, publish: &Publish) {
        if !self.subscription.manual_acks || publish.qos == QoS::AtMostOnce {
            self.ready.push(&publish.topic, &publish.payload);
            return;
        }
        match self.redeliveries.received(publish.pkid, publish.dup) {
            Delivery::New => {
                let ack = Ack {
                    pkid: publish.pkid,
                    session: self.inbox.session.load(Ordering::Acquire),
                };
                self.ready.acks.push((self.ready.len(), ack));
                self.ready.push(&publish.topic, &publish.payload);
            }
            Delivery::Held => {
                self.stats.redelivered.fetch_add(1, Ordering::Relaxed);
            }
            Delivery::Acked => {
                self.stats.redelivered.fetch_add(1, Ordering::Relaxed);
                let _ = self
                    .requests
                    .send(Request::PubAck(PubAck::new(publish.pkid)));
            }
        }
    }

    /// Handles one event of rumqttc's loop; publishes go to `ready`.
    fn take(&mut self, event: Event) {
        let Subscription {
            filter,
            qos,
            manual_acks,
        } = &self.subscription;
        match event {
            Event::Incoming(Packet::Publish(publish)) => self.publish(&publish),
            Event::Outgoing(Outgoing::PubAck(pkid)) => self.redeliveries.ack_sent(pkid),
            Event::Incoming(Packet::ConnAck(connack)) => {
                if self.connected_before && !connack.session_present {
                    self.redeliveries.session_lost();
                    self.inbox.session.fetch_add(1, Ordering::AcqRel);
                    if *manual_acks {
                        tracing::warn!(
                            source = %self.name,
                            "the broker kept no session for this client: messages taken and \
                             not yet checkpointed will not be sent again"
                        );
                    }
                }
                self.connected_before = true;
                // A clean session forgets subscriptions; a persistent one keeps them, and
                // subscribing again is harmless, so subscribe after every connect.
                let _ = self
                    .requests
                    .send(Request::Subscribe(Subscribe::new(filter.clone(), *qos)));
            }
            Event::Incoming(Packet::SubAck(ack)) => {
                use rumqttc::SubscribeReasonCode;
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, SubscribeReasonCode::Failure))
                {
                    self.stats
                        .subscribe_failures
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        source = %self.name,
                        topic = %filter,
                        "the broker refused the subscription (not authorised for this topic?)"
                    );
                } else {
                    self.stats.subscriptions.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};

    use super::{Ack, Delivery, Messages, MqttSource, Redeliveries};
    use crate::dead_letter::DeadLetterQueue;
    use crate::mqtt::config::{BrokerConfig, MqttSourceConfig};
    use crate::{Source, SourceEvent, WindowEnds};

    /// A source that is never connected, fed through its inbox as its client task would.
    fn unconnected(batch_size: usize) -> MqttSource {
        let schema = Arc::new(Schema::new(vec![
            Field::new("sensor", DataType::Utf8, false),
            Field::new("ts", DataType::Timestamp(TimeUnit::Nanosecond, None), false),
            Field::new("v", DataType::Float64, true),
        ]));
        let config = MqttSourceConfig {
            topic: "plant/{sensor}/vibration".into(),
            batch_size,
            linger: Duration::from_millis(5),
            ..MqttSourceConfig::default()
        };
        let broker = BrokerConfig::default();
        MqttSource::check(
            "vib",
            &broker,
            config,
            schema,
            Some("ts"),
            DeadLetterQueue::default(),
        )
        .expect("source")
    }

    #[tokio::test]
    async fn a_burst_of_messages_leaves_in_batches_of_batch_size() {
        let mut source = unconnected(10);
        {
            let mut pending = source.inbox.lock();
            for i in 0..23 {
                let payload = format!(r#"{{"ts":{},"v":{i}}}"#, 1_000 + i);
                pending.push(&format!("plant/s{}/vibration", i % 3), payload.as_bytes());
            }
        }
        let mut sizes = Vec::new();
        let mut values = Vec::new();
        let mut sensors = Vec::new();
        while sizes.iter().sum::<usize>() < 23 {
            let SourceEvent::Batch(batch) = source.next_event().await.expect("event") else {
                panic!("the source ended");
            };
            sizes.push(batch.num_rows());
            let v = batch
                .column(2)
                .as_any()
                .downcast_ref::<arrow::array::Float64Array>();
            values.extend(v.expect("v").values().iter().map(|v| *v as usize));
            let sensor = batch
                .column(0)
                .as_any()
                .downcast_ref::<arrow::array::StringArray>();
            sensors.extend(sensor.expect("sensor").iter().map(|s| s.map(str::to_owned)));
        }
        // A burst taken at once is not decoded into one batch: the first rows leave as soon
        // as a batch is full, and the rest follow, in order, with none lost.
        assert_eq!(sizes, [10, 10, 3]);
        assert_eq!(values, (0..23).collect::<Vec<_>>());
        // The key from the topic, in every batch (each starts with fresh builders).
        let expected: Vec<Option<String>> = (0..23).map(|i| Some(format!("s{}", i % 3))).collect();
        assert_eq!(sensors, expected);
        assert_eq!(source.decoded, 23);
    }

    /// Batches until `rows` rows came out, as their sizes.
    async fn batch_sizes(source: &mut MqttSource, rows: usize) -> Vec<usize> {
        let mut sizes = Vec::new();
        while sizes.iter().sum::<usize>() < rows {
            let SourceEvent::Batch(batch) = source.next_event().await.expect("event") else {
                panic!("the source ended");
            };
            sizes.push(batch.num_rows());
        }
        sizes
    }

    /// Messages one per 100 ms of event time from `from_ms` on, `count` of them, queued as
    /// one burst.
    fn queue_readings(source: &MqttSource, from_ms: i64, count: i64) {
        let mut pending = source.inbox.lock();
        for i in 0..count {
            let payload = format!(r#"{{"ts":{},"v":{i}}}"#, from_ms + 100 * i);
            pending.push("plant/s1/vibration", payload.as_bytes());
        }
    }

    const SECOND_NS: i64 = 1_000_000_000;

    #[tokio::test]
    async fn a_row_that_closes_a_window_ends_its_batch() {
        let mut source = unconnected(1000);
        source.set_window_ends(WindowEnds {
            every_ns: SECOND_NS,
            delay_ns: SECOND_NS,
            max_ahead_ns: None,
        });
        // Event time 10.0 s .. 12.4 s: the watermark (one second behind) reaches the window
        // end 10 s with the row at 11.0 s and 11 s with the row at 12.0 s.
        queue_readings(&source, 10_000, 25);
        // Without window ends, all 25 would wait in one batch for the linger.
        assert_eq!(batch_sizes(&mut source, 25).await, [11, 10, 4]);
        assert_eq!(source.decoded, 25);
    }

    #[tokio::test]
    async fn a_row_from_a_clock_far_ahead_closes_no_window() {
        let mut source = unconnected(1000);
        source.set_window_ends(WindowEnds {
            every_ns: SECOND_NS,
            delay_ns: SECOND_NS,
            max_ahead_ns: Some(60 * SECOND_NS),
        });
        let now_ms = i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_millis(),
        )
        .expect("ms");
        // The engine drops a row a day ahead, so it must not end a batch, nor move the next
        // window end a day away: the rows after it still end theirs.
        let base = now_ms - now_ms.rem_euclid(1000) - 10_000;
        queue_readings(&source, base, 5);
        queue_readings(&source, now_ms + 86_400_000, 1);
        queue_readings(&source, base + 500, 10);
        assert_eq!(batch_sizes(&mut source, 16).await, [12, 4]);
    }

    #[test]
    fn appended_messages_follow_in_order_with_their_acknowledgements() {
        let ack = |pkid| Ack { pkid, session: 0 };
        let mut inbox = Messages::default();
        let mut read = Messages::default();
        read.push("a/1", b"one");
        read.acks.push((1, ack(7)));
        read.push("a/2", b"two");
        // Into an empty inbox the buffers change hands.
        inbox.append(&mut read);
        assert_eq!(read.len(), 0);
        read.push("b/3", b"three");
        read.acks.push((0, ack(8)));
        read.push("b/4", b"");
        inbox.append(&mut read);
        assert_eq!(
            (
                read.len(),
                read.topics.len(),
                read.bytes.len(),
                read.acks.len()
            ),
            (0, 0, 0, 0)
        );
        let all: Vec<(&str, &[u8])> = inbox.iter_from(0).collect();
        assert_eq!(
            all,
            [
                ("a/1", &b"one"[..]),
                ("a/2", b"two"),
                ("b/3", b"three"),
                ("b/4", b"")
            ]
        );
        let acks: Vec<(usize, u16)> = inbox.acks.iter().map(|(i, a)| (*i, a.pkid)).collect();
        assert_eq!(acks, [(1, 7), (2, 8)]);
        assert_eq!(inbox.iter_from(3).next(), Some(("b/4", &b""[..])));
    }

    #[test]
    fn a_copy_of_a_held_message_is_dropped_and_a_new_one_is_taken() {
        let mut seen = Redeliveries::default();
        assert_eq!(seen.received(1, false), Delivery::New);
        assert_eq!(seen.received(2, false), Delivery::New);
        seen.connection_lost();
        // After the reconnect the broker sends both again, with DUP set.
        assert_eq!(seen.received(1, true), Delivery::Held);
        assert_eq!(seen.received(2, true), Delivery::Held);
        // Acknowledged now: the broker may reuse the id for a new message (DUP clear).
        seen.ack_sent(1);
        assert_eq!(seen.received(1, false), Delivery::New);
        // A DUP message the source never saw (its first copy was lost in transit) is new.
        assert_eq!(seen.received(7, true), Delivery::New);
    }

    #[test]
    fn an_acknowledgement_lost_with_the_connection_is_sent_again() {
        let mut seen = Redeliveries::default();
        assert_eq!(seen.received(3, false), Delivery::New);
        seen.ack_sent(3);
        seen.connection_lost();
        assert_eq!(seen.received(3, true), Delivery::Acked);
        // And again if that connection breaks too.
        seen.connection_lost();
        assert_eq!(seen.received(3, true), Delivery::Acked);
        // Once the broker reuses the id, it is a new message.
        assert_eq!(seen.received(3, false), Delivery::New);
    }

    #[test]
    fn a_broker_without_the_session_sends_nothing_again() {
        let mut seen = Redeliveries::default();
        assert_eq!(seen.received(1, false), Delivery::New);
        seen.session_lost();
        assert_eq!(seen.received(1, false), Delivery::New);
        assert_eq!(seen.received(1, true), Delivery::Held);
    }
}
