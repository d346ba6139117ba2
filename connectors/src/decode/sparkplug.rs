//! Sparkplug B payloads (Eclipse Sparkplug 3.0) decoded straight into Arrow builders, one row
//! per metric.
//!
//! A Sparkplug payload means nothing without its MQTT topic, so the source hands both over:
//!
//! ```text
//! spBv1.0/{group}/NBIRTH|NDATA|NDEATH/{edge node}            -> the edge node's own metrics
//! spBv1.0/{group}/DBIRTH|DDATA|DDEATH/{edge node}/{device}   -> a device's metrics
//! spBv1.0/{group}/NCMD|DCMD/...,  spBv1.0/STATE/...          -> ignored: no rows, no error
//! anything else                                               -> "not a sparkplug topic"
//! ```
//!
//! # Rows
//!
//! Every metric of a birth or data message is a row: a birth is also the first reading of each
//! metric. Death messages give no rows: they only end sessions, and the one metric of an
//! NDEATH, `bdSeq`, is bookkeeping registered with the broker long before the death, not a
//! reading. Columns are filled by name:
//!
//! | column                          | filled with                                            |
//! |---------------------------------|--------------------------------------------------------|
//! | `group`                         | the group id from the topic                            |
//! | `node`                          | the edge node id                                       |
//! | `device`                        | the device id; NULL for the edge node's own metrics    |
//! | `metric`                        | the metric name, sent or resolved through its alias    |
//! | the event-time column           | the metric's timestamp, else the payload's (ms -> ns)  |
//! | `value_column`, else `value`    | the metric's value, see below                          |
//!
//! `group`, `node`, `device` and `metric` must be `TEXT`. Any other column stays NULL, so it
//! must be nullable; the value column is required. Sparkplug timestamps are always epoch
//! milliseconds, so [`DecodeOptions::time_unit`] is not used.
//!
//! # Values
//!
//! The metric's `datatype` (sent with the metric, else remembered from its birth) says how to
//! read the value; the value column's type says what it may become:
//!
//! - `Int8` .. `Int64`: two's complement bits in `int_value` / `long_value`, narrowed to the
//!   datatype's width, so encoders that sign-extend an `Int8` to 32 bits and encoders that do
//!   not both read right. `UInt8` .. `UInt64` and `DateTime` (epoch milliseconds, kept as a
//!   number) are read as sent.
//! - Integers fit any numeric column if in range (else "value out of range"); integer columns
//!   take floats only when they are whole numbers.
//! - `Float` / `Double` are kept as sent, NaN and infinities included: Sparkplug carries real
//!   IEEE floats, and a device that sends NaN is saying "no valid reading" on purpose (JSON,
//!   which has no NaN, rejects them as a fault instead). Integer columns reject them, a `FLOAT`
//!   column rejects a finite double beyond its range.
//! - `Boolean` goes to a `BOOLEAN` column, or as 1 / 0 to a numeric one: every NBIRTH carries
//!   the boolean `Node Control/Rebirth`, and digital I/O is routinely charted as 0 / 1.
//! - `String`, `Text` and `UUID` go to a `TEXT` column only. In a node that reports text
//!   metrics (make, model, firmware) beside numeric ones, a numeric value column skips the
//!   text metrics (counted in [`skipped_metrics`](SparkplugDecoder::skipped_metrics)) and keeps
//!   the rest of the message; a `BOOLEAN` column likewise skips numbers. A `TEXT` value column
//!   takes every scalar, numbers and booleans written as text.
//! - `is_null`, or no value at all: NULL, or "null for required field" if the column is
//!   `NOT NULL`.
//! - `DataSet`, `Template`, `Bytes`, `File`, the array types and extension values have no
//!   scalar form: they give no row and are counted in
//!   [`skipped_metrics`](SparkplugDecoder::skipped_metrics).
//!
//! # Sessions
//!
//! The decoder keeps each edge node's session, because data messages name metrics by alias
//! and carry a sequence number:
//!
//! - NBIRTH starts a session: it records the node's alias -> (name, datatype) map, its
//!   `bdSeq`, and its `seq`, and forgets the devices' births. DBIRTH records a device's map.
//! - `seq` runs 0..=255 per edge node across the node and its devices. A message whose `seq`
//!   is not the previous one plus 1 (mod 256) is still decoded, but counted in
//!   [`sequence_gaps`](SparkplugDecoder::sequence_gaps).
//! - A data message naming a metric only by an alias its birth did not define is rejected
//!   whole ("sparkplug metric alias without a birth certificate").
//! - NDEATH ends the session: the node's and its devices' births are forgotten, unless its
//!   `bdSeq` differs from the NBIRTH's, which makes it the late will of an older session.
//!   DDEATH forgets the device's birth.
//! - A gap, data from a node or device without a birth, or an unknown alias marks the node for
//!   a rebirth, which [`rebirth_needed`](SparkplugDecoder::rebirth_needed) hands out once so the
//!   caller can publish `Node Control/Rebirth` in an NCMD. Only the first such event of a
//!   session is logged, so a lossy link does not flood the log.
//!
//! A message is decoded in two steps, as in the other decoders: its rows go to scratch state
//! first and reach the builders only when every metric is valid, so a rejected message leaves
//! no rows behind. Its session bookkeeping does count, though: the message was received, so a
//! birth rejected for one ill-typed metric still defines the aliases of the data that follows,
//! and the next message is not miscounted as a gap.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use prost::Message;
use weir_proto::sparkplug::payload::{Metric, metric};
use weir_proto::sparkplug::{DataType as SparkplugType, Payload};

use super::{
    Cell, Column, ColumnKind, Columns, DecodeError, DecodeOptions, DecodeResult, StrSources,
    event_time_index,
};
use crate::error::{ConnectorError, Result};

const NAMESPACE: &str = "spBv1.0";
/// The group id position holds `STATE` in host application state topics.
const STATE: &str = "STATE";
const COMPONENT: &str = "sparkplug decoder";
const DEFAULT_VALUE_COLUMN: &str = "value";
/// The metric by which NBIRTH and NDEATH of one MQTT session are matched.
const BD_SEQ: &str = "bdSeq";
const NANOS_PER_MILLI: i64 = 1_000_000;

/// Decodes Sparkplug B messages into batches of a fixed schema; see the module docs.
#[derive(Debug)]
pub struct SparkplugDecoder {
    columns: Columns,
    layout: Layout,
    scratch: Scratch,
    /// Edge node sessions, found through `node_index` by `"{group}/{node}"`: a topic segment
    /// cannot contain `/`, so the key is unambiguous.
    nodes: Vec<EdgeNode>,
    node_index: HashMap<String, usize>,
    node_key: String,
    sequence_gaps: u64,
    skipped_metrics: u64,
}

/// Which schema column receives what.
#[derive(Debug)]
struct Layout {
    roles: Vec<Role>,
    value: usize,
    event_time: Option<usize>,
    device: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Group,
    Node,
    Device,
    Metric,
    EventTime,
    Value,
    /// A column the decoder has nothing for: always NULL.
    Unfilled,
}

/// The rows of the message being decoded; strings live in `text`.
#[derive(Debug)]
struct Scratch {
    text: String,
    group: Cell,
    node: Cell,
    device: Cell,
    names: Vec<Cell>,
    times: Vec<Cell>,
    values: Vec<Cell>,
    skipped: u64,
}

impl Scratch {
    fn clear(&mut self) {
        self.text.clear();
        self.group = Cell::Null;
        self.node = Cell::Null;
        self.device = Cell::Null;
        self.names.clear();
        self.times.clear();
        self.values.clear();
        self.skipped = 0;
    }
}

/// What the decoder knows of one edge node's current session.
#[derive(Debug)]
struct EdgeNode {
    group: String,
    node: String,
    /// `None` until an NBIRTH is seen, and again after an NDEATH.
    birth: Option<BirthCertificate>,
    devices: HashMap<String, BirthCertificate>,
    last_seq: Option<u8>,
    bd_seq: Option<u64>,
    rebirth: Rebirth,
}

/// Whether the edge node should be asked to publish its births again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rebirth {
    NotNeeded,
    /// Not yet handed out by [`SparkplugDecoder::rebirth_needed`].
    Needed,
    /// Handed out; stays so until the next NBIRTH or NDEATH, so the node is asked once.
    Requested,
}

/// The metrics an NBIRTH or DBIRTH declared.
#[derive(Debug, Default)]
struct BirthCertificate {
    aliases: HashMap<u64, (Arc<str>, Option<u32>)>,
    datatypes: HashMap<Arc<str>, u32>,
}

impl BirthCertificate {
    /// Fails if a metric has no name or an alias is used twice: data naming that alias could
    /// not be attributed.
    fn from_metrics(metrics: &[Metric]) -> DecodeResult<Self> {
        let mut birth = Self::default();
        for metric in metrics {
            let name: Arc<str> = Arc::from(
                metric
                    .name
                    .as_deref()
                    .ok_or(DecodeError::InvalidSparkplug)?,
            );
            if let Some(alias) = metric.alias
                && birth
                    .aliases
                    .insert(alias, (name.clone(), metric.datatype))
                    .is_some()
            {
                return Err(DecodeError::InvalidSparkplug);
            }
            if let Some(datatype) = metric.datatype {
                birth.datatypes.insert(name, datatype);
            }
        }
        Ok(birth)
    }
}

/// The name and datatype of `metric`, from the metric itself or through `birth`.
fn resolve<'a>(
    birth: Option<&'a BirthCertificate>,
    metric: &'a Metric,
) -> DecodeResult<(&'a str, Option<u32>)> {
    if let Some(name) = metric.name.as_deref() {
        let datatype = metric
            .datatype
            .or_else(|| birth.and_then(|b| b.datatypes.get(name).copied()));
        return Ok((name, datatype));
    }
    let alias = metric.alias.ok_or(DecodeError::InvalidSparkplug)?;
    let (name, datatype) = birth
        .and_then(|b| b.aliases.get(&alias))
        .ok_or(DecodeError::UnknownSparkplugAlias)?;
    Ok((name, metric.datatype.or(*datatype)))
}

impl EdgeNode {
    fn new(group: &str, node: &str) -> Self {
        Self {
            group: group.to_owned(),
            node: node.to_owned(),
            birth: None,
            devices: HashMap::new(),
            last_seq: None,
            bd_seq: None,
            rebirth: Rebirth::NotNeeded,
        }
    }

    fn start_session(&mut self, birth: BirthCertificate, seq: Option<u8>, bd_seq: Option<u64>) {
        self.birth = Some(birth);
        self.devices.clear();
        self.last_seq = seq;
        self.bd_seq = bd_seq;
        self.rebirth = Rebirth::NotNeeded;
    }

    fn end_session(&mut self) {
        self.birth = None;
        self.devices.clear();
        self.last_seq = None;
        self.bd_seq = None;
        self.rebirth = Rebirth::NotNeeded;
    }

    /// Records `seq`; returns whether it broke the sequence.
    fn track_sequence(&mut self, seq: Option<u8>) -> bool {
        let Some(seq) = seq else {
            return false;
        };
        let previous = self.last_seq.replace(seq);
        let Some(expected) = previous.map(|last| last.wrapping_add(1)) else {
            return false;
        };
        if seq == expected {
            return false;
        }
        if self.rebirth == Rebirth::NotNeeded {
            tracing::warn!(
                group = %self.group,
                node = %self.node,
                expected,
                received = seq,
                "sparkplug sequence gap: messages were lost or reordered; the edge node needs a rebirth"
            );
            self.rebirth = Rebirth::Needed;
        }
        true
    }

    fn missing_birth(&mut self) {
        if self.rebirth == Rebirth::NotNeeded {
            tracing::warn!(
                group = %self.group,
                node = %self.node,
                "sparkplug data without a birth certificate; the edge node needs a rebirth"
            );
            self.rebirth = Rebirth::Needed;
        }
    }
}

/// The Sparkplug message types that carry metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MessageType {
    NodeBirth,
    NodeData,
    NodeDeath,
    DeviceBirth,
    DeviceData,
    DeviceDeath,
}

impl MessageType {
    fn is_device(self) -> bool {
        matches!(
            self,
            Self::DeviceBirth | Self::DeviceData | Self::DeviceDeath
        )
    }
}

/// A parsed topic of a message that carries metrics.
#[derive(Debug)]
struct Topic<'a> {
    group: &'a str,
    message: MessageType,
    node: &'a str,
    device: Option<&'a str>,
}

impl<'a> Topic<'a> {
    /// `None` for Sparkplug topics without metrics for us: host STATE and commands.
    fn parse(topic: &'a str) -> DecodeResult<Option<Self>> {
        let mut parts = topic.split('/');
        if parts.next() != Some(NAMESPACE) {
            return Err(DecodeError::NotSparkplugTopic);
        }
        let group = match parts.next() {
            Some(STATE) => return Ok(None),
            Some(group) if !group.is_empty() => group,
            _ => return Err(DecodeError::NotSparkplugTopic),
        };
        let message = match parts.next() {
            Some("NBIRTH") => MessageType::NodeBirth,
            Some("NDATA") => MessageType::NodeData,
            Some("NDEATH") => MessageType::NodeDeath,
            Some("DBIRTH") => MessageType::DeviceBirth,
            Some("DDATA") => MessageType::DeviceData,
            Some("DDEATH") => MessageType::DeviceDeath,
            Some("NCMD" | "DCMD") => return Ok(None),
            _ => return Err(DecodeError::NotSparkplugTopic),
        };
        let node = parts
            .next()
            .filter(|n| !n.is_empty())
            .ok_or(DecodeError::NotSparkplugTopic)?;
        let device = parts.next();
        if parts.next().is_some()
            || device.is_some_and(str::is_empty)
            || device.is_some() != message.is_device()
        {
            return Err(DecodeError::NotSparkplugTopic);
        }
        Ok(Some(Self {
            group,
            message,
            node,
            device,
        }))
    }
}

impl SparkplugDecoder {
    /// A decoder for `schema`; `event_time` names the event-time column. Fails with a
    /// configuration error for a column type the decoder cannot fill, a missing or non-scalar
    /// value column, `group` / `node` / `device` / `metric` columns that are not `TEXT`, or a
    /// `NOT NULL` column the decoder has nothing for.
    pub fn new(
        schema: SchemaRef,
        event_time: Option<&str>,
        options: DecodeOptions,
    ) -> Result<Self> {
        let columns = Columns::new(schema, COMPONENT)?;
        let event_time = event_time_index(&columns, event_time, COMPONENT)?;
        let value_name = options
            .value_column
            .as_deref()
            .unwrap_or(DEFAULT_VALUE_COLUMN);
        let value = columns.index_of(value_name).ok_or_else(|| {
            ConnectorError::config(
                COMPONENT,
                format!(
                    "value column '{value_name}' is not in the schema; name a column \
                     '{DEFAULT_VALUE_COLUMN}' or set value_column"
                ),
            )
        })?;
        let value_kind = columns.columns[value].kind;
        if Some(value) == event_time
            || !(value_kind.is_numeric()
                || matches!(value_kind, ColumnKind::Boolean | ColumnKind::Utf8))
        {
            return Err(ConnectorError::config(
                COMPONENT,
                format!(
                    "value column '{value_name}' must be a number, BOOLEAN or TEXT column \
                     other than event time"
                ),
            ));
        }
        let mut roles = Vec::with_capacity(columns.columns.len());
        for (index, column) in columns.columns.iter().enumerate() {
            let role = if Some(index) == event_time {
                Role::EventTime
            } else if index == value {
                Role::Value
            } else {
                match &*column.name {
                    "group" => Role::Group,
                    "node" => Role::Node,
                    "device" => Role::Device,
                    "metric" => Role::Metric,
                    _ => Role::Unfilled,
                }
            };
            let text_role = matches!(role, Role::Group | Role::Node | Role::Device | Role::Metric);
            if text_role && column.kind != ColumnKind::Utf8 {
                return Err(ConnectorError::config(
                    COMPONENT,
                    format!("column '{}' must be TEXT", column.name),
                ));
            }
            if role == Role::Unfilled && !column.nullable {
                return Err(ConnectorError::config(
                    COMPONENT,
                    format!(
                        "column '{}' is NOT NULL but Sparkplug has nothing to fill it with; the \
                         decoder fills group, node, device, metric, the event-time column and \
                         the value column",
                        column.name
                    ),
                ));
            }
            roles.push(role);
        }
        let device = roles.iter().position(|r| *r == Role::Device);
        Ok(Self {
            columns,
            layout: Layout {
                roles,
                value,
                event_time,
                device,
            },
            scratch: Scratch {
                text: String::new(),
                group: Cell::Null,
                node: Cell::Null,
                device: Cell::Null,
                names: Vec::new(),
                times: Vec::new(),
                values: Vec::new(),
                skipped: 0,
            },
            nodes: Vec::new(),
            node_index: HashMap::new(),
            node_key: String::new(),
            sequence_gaps: 0,
            skipped_metrics: 0,
        })
    }

    /// The schema of the batches this decoder produces.
    pub fn schema(&self) -> SchemaRef {
        self.columns.schema.clone()
    }

    /// Decodes the message `payload` received on `topic`; returns the rows it added (0 for
    /// ignored topics, deaths and messages without scalar metrics). On error the pending rows are
    /// exactly as before the call, though the edge node's session still takes the message
    /// into account (see the module docs).
    pub fn decode_message(&mut self, topic: &str, payload: &[u8]) -> DecodeResult<usize> {
        let Some(topic) = Topic::parse(topic)? else {
            return Ok(0);
        };
        let payload = Payload::decode(payload).map_err(|_| DecodeError::InvalidSparkplug)?;
        let seq = payload
            .seq
            .map(|seq| u8::try_from(seq).map_err(|_| DecodeError::InvalidSparkplug))
            .transpose()?;
        if payload
            .metrics
            .iter()
            .any(|m| m.name.is_none() && m.alias.is_none())
        {
            return Err(DecodeError::InvalidSparkplug);
        }
        let birth = match topic.message {
            MessageType::NodeBirth | MessageType::DeviceBirth => {
                Some(BirthCertificate::from_metrics(&payload.metrics)?)
            }
            _ => None,
        };

        let node = self.edge_node(topic.group, topic.node);
        let node = &mut self.nodes[node];
        let device = topic.device.unwrap_or_default();
        let in_session = !matches!(
            topic.message,
            MessageType::NodeBirth | MessageType::NodeDeath
        );
        if in_session && node.track_sequence(seq) {
            self.sequence_gaps += 1;
        }
        match (topic.message, birth) {
            (MessageType::NodeBirth, Some(birth)) => {
                node.start_session(birth, seq, bd_seq(&payload));
            }
            (MessageType::DeviceBirth, Some(birth)) => {
                node.devices.insert(device.to_owned(), birth);
                if node.birth.is_none() {
                    node.missing_birth();
                }
            }
            (MessageType::NodeData, _) if node.birth.is_none() => node.missing_birth(),
            (MessageType::DeviceData, _)
                if node.birth.is_none() || !node.devices.contains_key(device) =>
            {
                node.missing_birth();
            }
            (MessageType::NodeDeath, _) => {
                // A will registered by an earlier connection can arrive after the new birth.
                let stale = matches!(
                    (node.bd_seq, bd_seq(&payload)),
                    (Some(current), Some(ended)) if current != ended
                );
                if !stale {
                    node.end_session();
                }
                return Ok(0);
            }
            (MessageType::DeviceDeath, _) => {
                node.devices.remove(device);
                return Ok(0);
            }
            _ => {}
        }

        let birth = if topic.message.is_device() {
            node.devices.get(device)
        } else {
            node.birth.as_ref()
        };
        let staged = self.layout.stage(
            &mut self.scratch,
            &self.columns.columns,
            &topic,
            &payload,
            birth,
        );
        if matches!(staged, Err(DecodeError::UnknownSparkplugAlias)) {
            node.missing_birth();
        }
        staged?;
        Ok(self.append_staged())
    }

    /// Rows decoded and not yet flushed.
    pub fn len(&self) -> usize {
        self.columns.rows
    }

    /// The latest event time among the pending rows from `from_row` on.
    pub fn latest_event_time(&self, from_row: usize) -> Option<i64> {
        self.columns.latest_time(self.layout.event_time?, from_row)
    }

    /// Whether no rows are pending.
    pub fn is_empty(&self) -> bool {
        self.columns.rows == 0
    }

    /// Turns the pending rows into a batch; `None` when there are none.
    pub fn flush(&mut self) -> Result<Option<RecordBatch>> {
        self.columns.flush()
    }

    /// How many messages so far had a `seq` that did not follow the previous message of their
    /// edge node.
    pub fn sequence_gaps(&self) -> u64 {
        self.sequence_gaps
    }

    /// How many metrics so far were left out because their value has no scalar form (data
    /// sets, templates, bytes, files, arrays).
    pub fn skipped_metrics(&self) -> u64 {
        self.skipped_metrics
    }

    /// The `(group, edge node)` pairs that should be sent an NCMD with `Node Control/Rebirth`
    /// = true: a sequence gap was seen, or data arrived for a node or device whose birth this
    /// decoder has not seen. Each node is returned once until its next NBIRTH or NDEATH.
    pub fn rebirth_needed(&mut self) -> Vec<(String, String)> {
        self.nodes
            .iter_mut()
            .filter(|node| node.rebirth == Rebirth::Needed)
            .map(|node| {
                node.rebirth = Rebirth::Requested;
                (node.group.clone(), node.node.clone())
            })
            .collect()
    }

    /// The index in `nodes` of the session of `group` / `node`, created on first sight.
    fn edge_node(&mut self, group: &str, node: &str) -> usize {
        self.node_key.clear();
        self.node_key.push_str(group);
        self.node_key.push('/');
        self.node_key.push_str(node);
        if let Some(&index) = self.node_index.get(self.node_key.as_str()) {
            return index;
        }
        let index = self.nodes.len();
        self.nodes.push(EdgeNode::new(group, node));
        self.node_index.insert(self.node_key.clone(), index);
        index
    }

    /// Moves the staged rows into the builders, a column at a time.
    fn append_staged(&mut self) -> usize {
        let scratch = &self.scratch;
        let rows = scratch.values.len();
        let strings = StrSources {
            record: &[],
            unescaped: &scratch.text,
        };
        for (builder, role) in self.columns.builders.iter_mut().zip(&self.layout.roles) {
            let per_row = match role {
                Role::Group => {
                    builder.append_n(scratch.group, rows, &strings);
                    continue;
                }
                Role::Node => {
                    builder.append_n(scratch.node, rows, &strings);
                    continue;
                }
                Role::Device => {
                    builder.append_n(scratch.device, rows, &strings);
                    continue;
                }
                Role::Unfilled => {
                    builder.append_n(Cell::Null, rows, &strings);
                    continue;
                }
                Role::Metric => &scratch.names,
                Role::EventTime => &scratch.times,
                Role::Value => &scratch.values,
            };
            for cell in per_row {
                builder.append(*cell, &strings);
            }
        }
        self.columns.rows += rows;
        self.skipped_metrics += scratch.skipped;
        rows
    }
}

impl Layout {
    /// Checks every metric of `payload` and stages its row in `scratch`.
    fn stage(
        &self,
        scratch: &mut Scratch,
        columns: &[Column],
        topic: &Topic<'_>,
        payload: &Payload,
        birth: Option<&BirthCertificate>,
    ) -> DecodeResult<()> {
        scratch.clear();
        scratch.group = push_str(&mut scratch.text, topic.group);
        scratch.node = push_str(&mut scratch.text, topic.node);
        if let Some(device) = topic.device {
            scratch.device = push_str(&mut scratch.text, device);
        }
        let value_column = &columns[self.value];
        for metric in &payload.metrics {
            let (name, datatype) = resolve(birth, metric)?;
            if has_no_scalar_form(datatype, metric.value.as_ref()) {
                scratch.skipped += 1;
                continue;
            }
            let reading = reading(metric, datatype);
            if !fits(value_column.kind, &reading) {
                // A node's text metrics (make, model, firmware) next to its numeric ones are
                // normal; skipping them keeps the numeric rows of the same message.
                scratch.skipped += 1;
                continue;
            }
            let value = value_cell(value_column, reading, &mut scratch.text)?;
            let time = match self.event_time {
                Some(c) => time_cell(&columns[c], metric.timestamp.or(payload.timestamp))?,
                None => Cell::Null,
            };
            let name = push_str(&mut scratch.text, name);
            scratch.names.push(name);
            scratch.times.push(time);
            scratch.values.push(value);
        }
        if let Some(c) = self.device
            && topic.device.is_none()
            && !columns[c].nullable
            && !scratch.values.is_empty()
        {
            return Err(DecodeError::NullField(columns[c].name.clone()));
        }
        Ok(())
    }
}

/// Appends `s` to `text` and returns the cell that refers to it.
fn push_str(text: &mut String, s: &str) -> Cell {
    let start = text.len();
    text.push_str(s);
    Cell::Str {
        start,
        end: text.len(),
        unescaped: true,
    }
}

/// The `bdSeq` metric's value, which ties an NDEATH to its NBIRTH.
fn bd_seq(payload: &Payload) -> Option<u64> {
    let metric = payload
        .metrics
        .iter()
        .find(|m| m.name.as_deref() == Some(BD_SEQ))?;
    match metric.value {
        Some(metric::Value::IntValue(v)) => Some(u64::from(v)),
        Some(metric::Value::LongValue(v)) => Some(v),
        _ => None,
    }
}

/// Whether the metric is a data set, template, bytes, file, array or extension.
fn has_no_scalar_form(datatype: Option<u32>, value: Option<&metric::Value>) -> bool {
    let compound_type = SparkplugType::DataSet as u32..=SparkplugType::DateTimeArray as u32;
    datatype.is_some_and(|d| compound_type.contains(&d))
        || matches!(
            value,
            Some(
                metric::Value::BytesValue(_)
                    | metric::Value::DatasetValue(_)
                    | metric::Value::TemplateValue(_)
                    | metric::Value::ExtensionValue(_)
            )
        )
}

/// A scalar metric value, interpreted by its datatype.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Reading<'a> {
    Null,
    Int(i64),
    UInt(u64),
    Float(f64),
    Bool(bool),
    Str(&'a str),
}

fn reading(metric: &Metric, datatype: Option<u32>) -> Reading<'_> {
    if metric.is_null == Some(true) {
        return Reading::Null;
    }
    let signed_width = datatype.and_then(signed_width);
    match &metric.value {
        Some(metric::Value::IntValue(v)) => match signed_width {
            Some(width) => Reading::Int(from_twos_complement(u64::from(*v), width.min(32))),
            None => Reading::UInt(u64::from(*v)),
        },
        Some(metric::Value::LongValue(v)) => match signed_width {
            Some(width) => Reading::Int(from_twos_complement(*v, width)),
            None => Reading::UInt(*v),
        },
        Some(metric::Value::FloatValue(v)) => Reading::Float(f64::from(*v)),
        Some(metric::Value::DoubleValue(v)) => Reading::Float(*v),
        Some(metric::Value::BooleanValue(v)) => Reading::Bool(*v),
        Some(metric::Value::StringValue(v)) => Reading::Str(v),
        // The other variants are skipped before a reading is taken.
        _ => Reading::Null,
    }
}

/// The width in bits of a signed integer datatype.
fn signed_width(datatype: u32) -> Option<u32> {
    const INT8: u32 = SparkplugType::Int8 as u32;
    const INT16: u32 = SparkplugType::Int16 as u32;
    const INT32: u32 = SparkplugType::Int32 as u32;
    const INT64: u32 = SparkplugType::Int64 as u32;
    match datatype {
        INT8 => Some(8),
        INT16 => Some(16),
        INT32 => Some(32),
        INT64 => Some(64),
        _ => None,
    }
}

/// The signed integer held in the low `width` bits of `bits`.
fn from_twos_complement(bits: u64, width: u32) -> i64 {
    let unused = 64 - width;
    ((bits << unused) as i64) >> unused
}

/// Whether `reading` has a place in a column of `kind` at all: text only in text columns,
/// numbers not in boolean columns.
fn fits(kind: ColumnKind, reading: &Reading<'_>) -> bool {
    match reading {
        Reading::Null => true,
        Reading::Str(_) => kind == ColumnKind::Utf8,
        Reading::Bool(_) => true,
        Reading::Int(_) | Reading::UInt(_) | Reading::Float(_) => kind != ColumnKind::Boolean,
    }
}

/// The cell for `reading` in the value column; see the module docs for the mapping.
fn value_cell(column: &Column, reading: Reading<'_>, text: &mut String) -> DecodeResult<Cell> {
    let wrong_type = |expected| DecodeError::WrongType {
        column: column.name.clone(),
        expected,
    };
    match (reading, column.kind) {
        (Reading::Null, _) if column.nullable => Ok(Cell::Null),
        (Reading::Null, _) => Err(DecodeError::NullField(column.name.clone())),
        (Reading::Str(s), ColumnKind::Utf8) => Ok(push_str(text, s)),
        (Reading::Bool(b), ColumnKind::Boolean) => Ok(Cell::Bool(b)),
        (Reading::Bool(b), ColumnKind::Utf8) => {
            Ok(push_str(text, if b { "true" } else { "false" }))
        }
        (Reading::Int(v), ColumnKind::Utf8) => Ok(push_str(text, &v.to_string())),
        (Reading::UInt(v), ColumnKind::Utf8) => Ok(push_str(text, &v.to_string())),
        (Reading::Float(v), ColumnKind::Utf8) => Ok(push_str(text, &v.to_string())),
        (_, ColumnKind::Boolean) => Err(wrong_type("boolean")),
        (Reading::Str(_), _) => Err(wrong_type("number")),
        (Reading::Int(v), _) => whole_number_cell(column, i128::from(v)),
        (Reading::UInt(v), _) => whole_number_cell(column, i128::from(v)),
        (Reading::Bool(b), _) => whole_number_cell(column, i128::from(b)),
        (Reading::Float(v), _) => float_cell(column, v),
    }
}

/// An integer for a numeric column, range-checked for integer columns.
fn whole_number_cell(column: &Column, value: i128) -> DecodeResult<Cell> {
    let out_of_range = || DecodeError::OutOfRange(column.name.clone());
    if column.kind.is_signed_int() {
        let (min, max) = column.kind.signed_range();
        i64::try_from(value)
            .ok()
            .filter(|v| (min..=max).contains(v))
            .map(Cell::Int)
            .ok_or_else(out_of_range)
    } else if column.kind.is_unsigned_int() {
        u64::try_from(value)
            .ok()
            .filter(|v| *v <= column.kind.unsigned_max())
            .map(Cell::UInt)
            .ok_or_else(out_of_range)
    } else {
        // A float column takes the nearest float, as any integer-to-float conversion does.
        Ok(Cell::Float(value as f64))
    }
}

/// A float for a numeric column: kept as is, NaN included, for float columns; whole and in
/// range for integer columns.
fn float_cell(column: &Column, value: f64) -> DecodeResult<Cell> {
    match column.kind {
        ColumnKind::Float64 => Ok(Cell::Float(value)),
        ColumnKind::Float32 if value.is_finite() && (value as f32).is_infinite() => {
            Err(DecodeError::OutOfRange(column.name.clone()))
        }
        ColumnKind::Float32 => Ok(Cell::Float(value)),
        _ if !value.is_finite() => Err(DecodeError::NonNumeric(column.name.clone())),
        _ if value.fract() != 0.0 => Err(DecodeError::WrongType {
            column: column.name.clone(),
            expected: "integer",
        }),
        _ => whole_number_cell(column, value as i128),
    }
}

/// The event time for a Sparkplug timestamp in epoch milliseconds.
fn time_cell(column: &Column, millis: Option<u64>) -> DecodeResult<Cell> {
    match millis {
        None if column.nullable => Ok(Cell::Null),
        None => Err(DecodeError::MissingField(column.name.clone())),
        Some(millis) => i64::try_from(millis)
            .ok()
            .and_then(|ms| ms.checked_mul(NANOS_PER_MILLI))
            .map(Cell::Int)
            .ok_or_else(|| DecodeError::InvalidTimestamp(column.name.clone())),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Array, Float64Array};
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit as ArrowTimeUnit};
    use weir_proto::sparkplug::payload::DataSet;
    use weir_proto::sparkplug::payload::metric::Value;

    use super::*;
    use crate::decode::test_support::table;

    /// 2024-01-01T00:00:00Z in epoch milliseconds.
    const T0: u64 = 1_704_067_200_000;

    /// `group, node, device, metric, ts NOT NULL, value DOUBLE`.
    fn schema_with_value(value: DataType, nullable: bool) -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("group", DataType::Utf8, false),
            Field::new("node", DataType::Utf8, false),
            Field::new("device", DataType::Utf8, true),
            Field::new("metric", DataType::Utf8, false),
            Field::new(
                "ts",
                DataType::Timestamp(ArrowTimeUnit::Nanosecond, None),
                false,
            ),
            Field::new("value", value, nullable),
        ]))
    }

    fn decoder() -> SparkplugDecoder {
        decoder_with_value(DataType::Float64, true)
    }

    fn decoder_with_value(value: DataType, nullable: bool) -> SparkplugDecoder {
        SparkplugDecoder::new(
            schema_with_value(value, nullable),
            Some("ts"),
            DecodeOptions::default(),
        )
        .expect("decoder")
    }

    fn node_topic(message: &str) -> String {
        format!("spBv1.0/plant/{message}/edge1")
    }

    fn device_topic(message: &str) -> String {
        format!("spBv1.0/plant/{message}/edge1/pump1")
    }

    /// A metric as births send it: name, alias and datatype.
    fn born(name: &str, alias: Option<u64>, datatype: SparkplugType, value: Value) -> Metric {
        Metric {
            name: Some(name.to_owned()),
            alias,
            datatype: Some(datatype as u32),
            value: Some(value),
            ..Metric::default()
        }
    }

    /// A metric as data messages of an aliasing node send it: the alias alone.
    fn aliased(alias: u64, value: Value) -> Metric {
        Metric {
            alias: Some(alias),
            value: Some(value),
            ..Metric::default()
        }
    }

    fn payload(seq: Option<u64>, metrics: Vec<Metric>) -> Vec<u8> {
        Payload {
            timestamp: Some(T0),
            seq,
            metrics,
            ..Payload::default()
        }
        .encode_to_vec()
    }

    /// The NBIRTH of `edge1`: bdSeq 3, `temperature` (alias 1) and `rpm` (alias 2).
    fn node_birth() -> Vec<u8> {
        payload(
            Some(0),
            vec![
                born(BD_SEQ, None, SparkplugType::Int64, Value::LongValue(3)),
                born(
                    "temperature",
                    Some(1),
                    SparkplugType::Double,
                    Value::DoubleValue(21.5),
                ),
                born("rpm", Some(2), SparkplugType::Int32, Value::IntValue(1200)),
            ],
        )
    }

    fn node_death(bd_seq: u64) -> Vec<u8> {
        Payload {
            metrics: vec![born(
                BD_SEQ,
                None,
                SparkplugType::Int64,
                Value::LongValue(bd_seq),
            )],
            ..Payload::default()
        }
        .encode_to_vec()
    }

    /// The DBIRTH of `pump1`: `pressure` (alias 10).
    fn device_birth(seq: u64) -> Vec<u8> {
        payload(
            Some(seq),
            vec![born(
                "pressure",
                Some(10),
                SparkplugType::Float,
                Value::FloatValue(2.5),
            )],
        )
    }

    fn decoded(decoder: &mut SparkplugDecoder) -> Vec<String> {
        match decoder.flush() {
            Ok(Some(batch)) => table(&batch),
            other => vec![format!("{other:?}")],
        }
    }

    fn reason(result: DecodeResult<usize>) -> String {
        match result {
            Ok(rows) => format!("accepted {rows} rows"),
            Err(reason) => reason.to_string(),
        }
    }

    #[test]
    fn birth_then_data_resolves_aliases() {
        let mut decoder = decoder();
        assert_eq!(
            decoder.decode_message(&node_topic("NBIRTH"), &node_birth()),
            Ok(3)
        );
        let mut negative_rpm = aliased(2, Value::IntValue(-5_i32 as u32));
        negative_rpm.timestamp = Some(T0 + 250);
        let data = payload(
            Some(1),
            vec![aliased(1, Value::DoubleValue(22.25)), negative_rpm],
        );
        assert_eq!(decoder.decode_message(&node_topic("NDATA"), &data), Ok(2));
        assert_eq!(decoder.len(), 5);
        assert_eq!(
            decoded(&mut decoder),
            vec![
                "+-------+-------+--------+-------------+-------------------------+--------+",
                "| group | node  | device | metric      | ts                      | value  |",
                "+-------+-------+--------+-------------+-------------------------+--------+",
                "| plant | edge1 |        | bdSeq       | 2024-01-01T00:00:00     | 3.0    |",
                "| plant | edge1 |        | temperature | 2024-01-01T00:00:00     | 21.5   |",
                "| plant | edge1 |        | rpm         | 2024-01-01T00:00:00     | 1200.0 |",
                "| plant | edge1 |        | temperature | 2024-01-01T00:00:00     | 22.25  |",
                "| plant | edge1 |        | rpm         | 2024-01-01T00:00:00.250 | -5.0   |",
                "+-------+-------+--------+-------------+-------------------------+--------+",
            ]
        );
        assert_eq!(decoder.sequence_gaps(), 0);
        assert!(decoder.rebirth_needed().is_empty());
        assert!(decoder.is_empty());
    }

    #[test]
    fn alias_without_birth_is_rejected_and_appends_nothing() {
        let mut decoder = decoder();
        let data = payload(
            Some(7),
            vec![
                born(
                    "temperature",
                    None,
                    SparkplugType::Double,
                    Value::DoubleValue(1.0),
                ),
                aliased(1, Value::DoubleValue(2.0)),
            ],
        );
        assert_eq!(
            reason(decoder.decode_message(&node_topic("NDATA"), &data)),
            "sparkplug metric alias without a birth certificate"
        );
        assert_eq!(decoder.len(), 0);
        assert_eq!(
            decoder.rebirth_needed(),
            vec![("plant".to_owned(), "edge1".to_owned())]
        );
        // Handed out once: the caller asked, now it waits for the birth.
        assert_eq!(
            decoder.decode_message(&node_topic("NDATA"), &data),
            Err(DecodeError::UnknownSparkplugAlias)
        );
        assert!(decoder.rebirth_needed().is_empty());
        assert_eq!(decoder.flush().ok(), Some(None));

        // An alias the birth did not define is as unknown as one without any birth.
        assert_eq!(
            decoder.decode_message(&node_topic("NBIRTH"), &node_birth()),
            Ok(3)
        );
        let unknown = payload(Some(1), vec![aliased(99, Value::DoubleValue(2.0))]);
        assert_eq!(
            decoder.decode_message(&node_topic("NDATA"), &unknown),
            Err(DecodeError::UnknownSparkplugAlias)
        );
        assert_eq!(decoder.len(), 3);
        assert_eq!(
            decoder.rebirth_needed(),
            vec![("plant".to_owned(), "edge1".to_owned())]
        );
    }

    #[test]
    fn sequence_gaps_are_counted_and_still_decoded() {
        let mut decoder = decoder();
        assert_eq!(
            decoder.decode_message(&node_topic("NBIRTH"), &node_birth()),
            Ok(3)
        );
        let data = |seq| payload(Some(seq), vec![aliased(1, Value::DoubleValue(1.0))]);
        for seq in [1, 2, 5, 6] {
            assert_eq!(
                decoder.decode_message(&node_topic("NDATA"), &data(seq)),
                Ok(1)
            );
        }
        assert_eq!(decoder.sequence_gaps(), 1);
        assert_eq!(
            decoder.rebirth_needed(),
            vec![("plant".to_owned(), "edge1".to_owned())]
        );

        // Device messages share the node's counter, and 255 wraps to 0.
        let mut rebirth = Payload::decode(node_birth().as_slice()).expect("birth");
        rebirth.seq = Some(254);
        let rebirth = rebirth.encode_to_vec();
        assert_eq!(
            decoder.decode_message(&node_topic("NBIRTH"), &rebirth),
            Ok(3)
        );
        assert_eq!(
            decoder.decode_message(&device_topic("DBIRTH"), &device_birth(255)),
            Ok(1)
        );
        assert_eq!(
            decoder.decode_message(&node_topic("NDATA"), &data(0)),
            Ok(1)
        );
        assert_eq!(decoder.sequence_gaps(), 1);
        assert!(decoder.rebirth_needed().is_empty());

        assert_eq!(
            decoder.decode_message(&node_topic("NDATA"), &data(0)),
            Ok(1)
        );
        assert_eq!(decoder.sequence_gaps(), 2);
        assert_eq!(decoder.len(), 13);
    }

    #[test]
    fn device_metrics_get_the_device_column() {
        let mut decoder = decoder();
        assert_eq!(
            decoder.decode_message(&node_topic("NBIRTH"), &node_birth()),
            Ok(3)
        );
        decoder.flush().expect("flush");
        assert_eq!(
            decoder.decode_message(&device_topic("DBIRTH"), &device_birth(1)),
            Ok(1)
        );
        let device_data = payload(Some(2), vec![aliased(10, Value::FloatValue(3.0))]);
        assert_eq!(
            decoder.decode_message(&device_topic("DDATA"), &device_data),
            Ok(1)
        );
        let node_data = payload(Some(3), vec![aliased(1, Value::DoubleValue(20.0))]);
        assert_eq!(
            decoder.decode_message(&node_topic("NDATA"), &node_data),
            Ok(1)
        );
        // A device's aliases are its own: the node's alias 10 does not exist.
        let wrong_level = payload(Some(4), vec![aliased(10, Value::DoubleValue(1.0))]);
        assert_eq!(
            decoder.decode_message(&node_topic("NDATA"), &wrong_level),
            Err(DecodeError::UnknownSparkplugAlias)
        );
        assert_eq!(
            decoded(&mut decoder),
            vec![
                "+-------+-------+--------+-------------+---------------------+-------+",
                "| group | node  | device | metric      | ts                  | value |",
                "+-------+-------+--------+-------------+---------------------+-------+",
                "| plant | edge1 | pump1  | pressure    | 2024-01-01T00:00:00 | 2.5   |",
                "| plant | edge1 | pump1  | pressure    | 2024-01-01T00:00:00 | 3.0   |",
                "| plant | edge1 |        | temperature | 2024-01-01T00:00:00 | 20.0  |",
                "+-------+-------+--------+-------------+---------------------+-------+",
            ]
        );
    }

    #[test]
    fn ndeath_clears_births_unless_it_is_stale() {
        let mut decoder = decoder();
        let node_data = payload(Some(2), vec![aliased(1, Value::DoubleValue(20.0))]);
        let device_data = payload(Some(3), vec![aliased(10, Value::FloatValue(3.0))]);
        assert_eq!(
            decoder.decode_message(&node_topic("NBIRTH"), &node_birth()),
            Ok(3)
        );
        assert_eq!(
            decoder.decode_message(&device_topic("DBIRTH"), &device_birth(1)),
            Ok(1)
        );

        // The will of an earlier session (bdSeq 2) arriving late must not end this one.
        assert_eq!(
            decoder.decode_message(&node_topic("NDEATH"), &node_death(2)),
            Ok(0)
        );
        assert_eq!(
            decoder.decode_message(&node_topic("NDATA"), &node_data),
            Ok(1)
        );
        assert_eq!(
            decoder.decode_message(&device_topic("DDATA"), &device_data),
            Ok(1)
        );

        assert_eq!(
            decoder.decode_message(&node_topic("NDEATH"), &node_death(3)),
            Ok(0)
        );
        assert_eq!(
            decoder.decode_message(&node_topic("NDATA"), &node_data),
            Err(DecodeError::UnknownSparkplugAlias)
        );
        assert_eq!(
            decoder.decode_message(&device_topic("DDATA"), &device_data),
            Err(DecodeError::UnknownSparkplugAlias)
        );
        assert_eq!(decoder.len(), 6);
        // After the death, seq restarts with the next birth: no gaps were counted.
        assert_eq!(decoder.sequence_gaps(), 0);
    }

    #[test]
    fn ddeath_clears_the_device_birth_only() {
        let mut decoder = decoder();
        assert_eq!(
            decoder.decode_message(&node_topic("NBIRTH"), &node_birth()),
            Ok(3)
        );
        assert_eq!(
            decoder.decode_message(&device_topic("DBIRTH"), &device_birth(1)),
            Ok(1)
        );
        assert_eq!(
            decoder.decode_message(&device_topic("DDEATH"), &payload(Some(2), vec![])),
            Ok(0)
        );
        let device_data = payload(Some(3), vec![aliased(10, Value::FloatValue(3.0))]);
        assert_eq!(
            decoder.decode_message(&device_topic("DDATA"), &device_data),
            Err(DecodeError::UnknownSparkplugAlias)
        );
        let node_data = payload(Some(4), vec![aliased(1, Value::DoubleValue(20.0))]);
        assert_eq!(
            decoder.decode_message(&node_topic("NDATA"), &node_data),
            Ok(1)
        );
    }

    #[test]
    fn garbage_and_foreign_topics_are_rejected_with_their_reason() {
        let mut decoder = decoder();
        let topic = node_topic("NDATA");
        for garbage in [
            &b"\xff\xff\xff"[..],
            br#"{"sensor":"s1","v":1}"#,
            b"\x0a\x05ab",
        ] {
            assert_eq!(
                reason(decoder.decode_message(&topic, garbage)),
                "invalid sparkplug payload",
                "{garbage:?}"
            );
        }
        let seq_out_of_range = payload(Some(256), vec![]);
        assert_eq!(
            decoder.decode_message(&topic, &seq_out_of_range),
            Err(DecodeError::InvalidSparkplug)
        );
        let nameless = payload(
            Some(0),
            vec![Metric {
                value: Some(Value::DoubleValue(1.0)),
                ..Metric::default()
            }],
        );
        assert_eq!(
            decoder.decode_message(&topic, &nameless),
            Err(DecodeError::InvalidSparkplug)
        );
        let duplicate_alias = payload(
            Some(0),
            vec![
                born("a", Some(1), SparkplugType::Double, Value::DoubleValue(1.0)),
                born("b", Some(1), SparkplugType::Double, Value::DoubleValue(2.0)),
            ],
        );
        assert_eq!(
            decoder.decode_message(&node_topic("NBIRTH"), &duplicate_alias),
            Err(DecodeError::InvalidSparkplug)
        );

        for topic in [
            "sensors/plant/edge1",
            "spBv1.0",
            "spBv1.0/plant",
            "spBv1.0/plant/NDATA",
            "spBv1.0//NDATA/edge1",
            "spBv1.0/plant/NDATA/edge1/pump1",
            "spBv1.0/plant/DDATA/edge1",
            "spBv1.0/plant/DDATA/edge1/",
            "spBv1.0/plant/DDATA/edge1/pump1/extra",
            "spBv1.0/plant/NSTATUS/edge1",
            "spAv1.0/plant/NDATA/edge1",
        ] {
            assert_eq!(
                reason(decoder.decode_message(topic, &node_birth())),
                "not a sparkplug topic",
                "{topic}"
            );
        }
        // Host state and commands are Sparkplug, just not data: ignored whatever they carry.
        for topic in [
            "spBv1.0/STATE/scada1",
            "spBv1.0/plant/NCMD/edge1",
            "spBv1.0/plant/DCMD/edge1/pump1",
        ] {
            assert_eq!(decoder.decode_message(topic, b"{\"online\":true}"), Ok(0));
        }
        assert!(decoder.is_empty());
    }

    #[test]
    fn nan_and_infinite_doubles_are_kept() {
        let mut decoder = decoder();
        let data = payload(
            None,
            vec![
                born(
                    "a",
                    None,
                    SparkplugType::Double,
                    Value::DoubleValue(f64::NAN),
                ),
                born(
                    "b",
                    None,
                    SparkplugType::Float,
                    Value::FloatValue(f32::NEG_INFINITY),
                ),
            ],
        );
        assert_eq!(decoder.decode_message(&node_topic("NDATA"), &data), Ok(2));
        let batch = decoder.flush().ok().flatten().expect("batch");
        let values = batch
            .column(5)
            .as_any()
            .downcast_ref::<Float64Array>()
            .expect("doubles");
        assert!(values.value(0).is_nan());
        assert_eq!(values.value(1), f64::NEG_INFINITY);
        assert_eq!(values.null_count(), 0);

        // An integer column has no NaN, and a FLOAT column no double beyond its range.
        let mut integers = decoder_with_value(DataType::Int64, true);
        assert_eq!(
            reason(integers.decode_message(&node_topic("NDATA"), &data)),
            "non-numeric value for 'value'"
        );
        let mut floats = decoder_with_value(DataType::Float32, true);
        let huge = payload(
            None,
            vec![born(
                "a",
                None,
                SparkplugType::Double,
                Value::DoubleValue(1e300),
            )],
        );
        assert_eq!(
            reason(floats.decode_message(&node_topic("NDATA"), &huge)),
            "value out of range for 'value'"
        );
        assert_eq!(floats.decode_message(&node_topic("NDATA"), &data), Ok(2));
    }

    #[test]
    fn event_time_is_the_metric_timestamp_else_the_payload_timestamp() {
        let mut decoder = decoder();
        let mut stamped = born("a", None, SparkplugType::Double, Value::DoubleValue(1.0));
        stamped.timestamp = Some(T0 - 1_500);
        let unstamped = born("b", None, SparkplugType::Double, Value::DoubleValue(2.0));
        let data = payload(None, vec![stamped.clone(), unstamped.clone()]);
        assert_eq!(decoder.decode_message(&node_topic("NDATA"), &data), Ok(2));
        assert_eq!(
            decoded(&mut decoder)[3..5],
            [
                "| plant | edge1 |        | a      | 2023-12-31T23:59:58.500 | 1.0   |",
                "| plant | edge1 |        | b      | 2024-01-01T00:00:00     | 2.0   |",
            ]
        );

        let untimed = Payload {
            metrics: vec![stamped.clone(), unstamped.clone()],
            ..Payload::default()
        }
        .encode_to_vec();
        assert_eq!(
            reason(decoder.decode_message(&node_topic("NDATA"), &untimed)),
            "missing field 'ts'"
        );
        let mut far_future = stamped;
        far_future.timestamp = Some(u64::MAX / 2);
        let data = payload(None, vec![far_future]);
        assert_eq!(
            reason(decoder.decode_message(&node_topic("NDATA"), &data)),
            "invalid timestamp for 'ts'"
        );
        assert!(decoder.is_empty());

        // Without an event-time column, timestamps are not needed at all.
        let mut timeless = SparkplugDecoder::new(
            Arc::new(Schema::new(vec![
                Field::new("metric", DataType::Utf8, false),
                Field::new("value", DataType::Float64, true),
            ])),
            None,
            DecodeOptions::default(),
        )
        .expect("decoder");
        assert_eq!(
            timeless.decode_message(&node_topic("NDATA"), &untimed),
            Ok(2)
        );
    }

    #[test]
    fn values_convert_to_the_value_column_type() {
        let topic = node_topic("NDATA");
        let one = |datatype, value| payload(Some(0), vec![born("m", None, datatype, value)]);
        let mut doubles = decoder();
        for (datatype, value) in [
            // Signed integers read right whether or not the encoder sign-extended them.
            (SparkplugType::Int8, Value::IntValue(0xFF)),
            (SparkplugType::Int8, Value::IntValue(u32::MAX)),
            (SparkplugType::Int16, Value::IntValue(0xFFFF_8000)),
            (SparkplugType::Int64, Value::LongValue(u64::MAX)),
            (SparkplugType::UInt32, Value::IntValue(u32::MAX)),
            (SparkplugType::UInt64, Value::LongValue(u64::MAX)),
            (SparkplugType::DateTime, Value::LongValue(T0)),
            (SparkplugType::Boolean, Value::BooleanValue(true)),
        ] {
            assert_eq!(doubles.decode_message(&topic, &one(datatype, value)), Ok(1));
        }
        let batch = doubles.flush().ok().flatten().expect("batch");
        let values = batch
            .column(5)
            .as_any()
            .downcast_ref::<Float64Array>()
            .expect("doubles");
        assert_eq!(
            values.values().to_vec(),
            vec![
                -1.0,
                -1.0,
                -32768.0,
                -1.0,
                4_294_967_295.0,
                u64::MAX as f64,
                T0 as f64,
                1.0
            ]
        );

        // Text has no place in a numeric column: skipped and counted, not a rejection.
        let string = one(SparkplugType::String, Value::StringValue("run".into()));
        assert_eq!(doubles.decode_message(&topic, &string), Ok(0));
        assert_eq!(doubles.skipped_metrics(), 1);

        let mut small = decoder_with_value(DataType::Int16, false);
        assert_eq!(
            small.decode_message(
                &topic,
                &one(SparkplugType::Int16, Value::IntValue(0xFFFF_8000))
            ),
            Ok(1)
        );
        assert_eq!(
            small.decode_message(
                &topic,
                &one(SparkplugType::Double, Value::DoubleValue(42.0))
            ),
            Ok(1)
        );
        for (datatype, value, expected) in [
            (
                SparkplugType::UInt32,
                Value::IntValue(40_000),
                "value out of range for 'value'",
            ),
            (
                SparkplugType::Double,
                Value::DoubleValue(1.5),
                "wrong type for 'value': expected integer",
            ),
        ] {
            assert_eq!(
                reason(small.decode_message(&topic, &one(datatype, value))),
                expected
            );
        }
        let null = payload(
            Some(0),
            vec![Metric {
                is_null: Some(true),
                ..born("m", None, SparkplugType::Int16, Value::IntValue(1))
            }],
        );
        assert_eq!(
            reason(small.decode_message(&topic, &null)),
            "null for required field 'value'"
        );
        assert_eq!(doubles.decode_message(&topic, &null), Ok(1));
        assert_eq!(
            decoded(&mut doubles)[3],
            "| plant | edge1 |        | m      | 2024-01-01T00:00:00 |       |"
        );
        assert_eq!(
            decoded(&mut small)[3..5],
            [
                "| plant | edge1 |        | m      | 2024-01-01T00:00:00 | -32768 |",
                "| plant | edge1 |        | m      | 2024-01-01T00:00:00 | 42     |",
            ]
        );

        let mut texts = decoder_with_value(DataType::Utf8, true);
        assert_eq!(texts.decode_message(&topic, &string), Ok(1));
        // A text column takes every scalar, written as text.
        assert_eq!(
            texts.decode_message(&topic, &one(SparkplugType::Int32, Value::IntValue(1))),
            Ok(1)
        );
        let mut flags = decoder_with_value(DataType::Boolean, true);
        assert_eq!(
            flags.decode_message(
                &topic,
                &one(SparkplugType::Boolean, Value::BooleanValue(false))
            ),
            Ok(1)
        );
        assert_eq!(flags.decode_message(&topic, &string), Ok(0));
        assert_eq!(flags.skipped_metrics(), 1);
        assert_eq!(
            decoded(&mut texts)[3..5],
            [
                "| plant | edge1 |        | m      | 2024-01-01T00:00:00 | run   |",
                "| plant | edge1 |        | m      | 2024-01-01T00:00:00 | 1     |",
            ]
        );
        assert_eq!(
            decoded(&mut flags)[3],
            "| plant | edge1 |        | m      | 2024-01-01T00:00:00 | false |"
        );
    }

    #[test]
    fn metrics_without_a_scalar_form_are_skipped_and_counted() {
        let mut decoder = decoder();
        let data = payload(
            Some(0),
            vec![
                born(
                    "table",
                    Some(1),
                    SparkplugType::DataSet,
                    Value::DatasetValue(DataSet {
                        num_of_columns: Some(1),
                        columns: vec!["x".into()],
                        types: vec![SparkplugType::Int32 as u32],
                        ..DataSet::default()
                    }),
                ),
                born(
                    "blob",
                    Some(2),
                    SparkplugType::Bytes,
                    Value::BytesValue(vec![1, 2, 3]),
                ),
                born(
                    "samples",
                    Some(3),
                    SparkplugType::DoubleArray,
                    Value::BytesValue(1.0_f64.to_le_bytes().to_vec()),
                ),
                born(
                    "kept",
                    Some(4),
                    SparkplugType::Double,
                    Value::DoubleValue(1.0),
                ),
            ],
        );
        assert_eq!(decoder.decode_message(&node_topic("NBIRTH"), &data), Ok(1));
        assert_eq!(decoder.skipped_metrics(), 3);
        // Their aliases are still known: data naming them is skipped, not rejected.
        let later = payload(Some(1), vec![aliased(2, Value::BytesValue(vec![4]))]);
        assert_eq!(decoder.decode_message(&node_topic("NDATA"), &later), Ok(0));
        assert_eq!(decoder.skipped_metrics(), 4);
    }

    #[test]
    fn text_metrics_beside_numeric_ones_are_skipped_and_the_rest_kept() {
        let mut decoder = decoder();
        let birth = payload(
            Some(0),
            vec![
                born(
                    "firmware",
                    Some(1),
                    SparkplugType::String,
                    Value::StringValue("4.2.1".into()),
                ),
                born(
                    "temperature",
                    Some(2),
                    SparkplugType::Double,
                    Value::DoubleValue(20.0),
                ),
            ],
        );
        assert_eq!(decoder.decode_message(&node_topic("NBIRTH"), &birth), Ok(1));
        assert_eq!(decoder.skipped_metrics(), 1);
    }

    #[test]
    fn a_birth_rejected_for_its_values_still_defines_the_session() {
        let mut decoder = decoder_with_value(DataType::Int16, true);
        let birth = payload(
            Some(0),
            vec![
                born(
                    "flow",
                    Some(1),
                    SparkplugType::Double,
                    Value::DoubleValue(1e9),
                ),
                born(
                    "temperature",
                    Some(2),
                    SparkplugType::Double,
                    Value::DoubleValue(20.0),
                ),
            ],
        );
        assert_eq!(
            decoder.decode_message(&node_topic("NBIRTH"), &birth),
            Err(DecodeError::OutOfRange(Arc::from("value")))
        );
        assert!(decoder.is_empty());
        let data = payload(Some(1), vec![aliased(2, Value::DoubleValue(21.0))]);
        assert_eq!(decoder.decode_message(&node_topic("NDATA"), &data), Ok(1));
        assert_eq!(decoder.sequence_gaps(), 0);
        assert!(decoder.rebirth_needed().is_empty());
    }

    #[test]
    fn unusable_schemas_are_config_errors() {
        let error = |fields: Vec<Field>, value_column: Option<&str>| {
            SparkplugDecoder::new(
                Arc::new(Schema::new(fields)),
                Some("ts"),
                DecodeOptions {
                    value_column: value_column.map(str::to_owned),
                    ..DecodeOptions::default()
                },
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
        };
        let ts = || {
            Field::new(
                "ts",
                DataType::Timestamp(ArrowTimeUnit::Nanosecond, None),
                false,
            )
        };
        let value = || Field::new("value", DataType::Float64, true);
        assert_eq!(error(vec![ts(), value()], None), Ok(()));
        assert_eq!(
            error(
                vec![ts(), Field::new("reading", DataType::Float64, true)],
                Some("reading")
            ),
            Ok(())
        );
        for (fields, value_column, message) in [
            (
                vec![ts()],
                None,
                "value column 'value' is not in the schema",
            ),
            (
                vec![ts(), value()],
                Some("v"),
                "value column 'v' is not in the schema",
            ),
            (
                vec![ts(), value()],
                Some("ts"),
                "must be a number, BOOLEAN or TEXT",
            ),
            (
                vec![ts(), value(), Field::new("node", DataType::Int32, true)],
                None,
                "column 'node' must be TEXT",
            ),
            (
                vec![ts(), value(), Field::new("site", DataType::Utf8, false)],
                None,
                "column 'site' is NOT NULL",
            ),
            (
                vec![value()],
                None,
                "event-time column 'ts' is not in the schema",
            ),
        ] {
            let result = error(fields, value_column);
            assert!(
                result.as_ref().is_err_and(|e| e.contains(message)),
                "{result:?} should contain {message:?}"
            );
        }
    }

    #[test]
    fn a_not_null_device_column_rejects_node_metrics() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("device", DataType::Utf8, false),
            Field::new("value", DataType::Float64, true),
        ]));
        let mut decoder =
            SparkplugDecoder::new(schema, None, DecodeOptions::default()).expect("decoder");
        assert_eq!(
            reason(decoder.decode_message(&node_topic("NBIRTH"), &node_birth())),
            "null for required field 'device'"
        );
        assert_eq!(
            decoder.decode_message(&device_topic("DBIRTH"), &device_birth(1)),
            Ok(1)
        );
    }
}
