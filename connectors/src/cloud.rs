//! The `cloud` sink: results bound for the cloud, through the gateway's durable uplink.
//!
//! ```sql
//! CREATE SINK vibration_rms WITH (connector = 'cloud', priority = 'bulk',
//!     max_bytes = '512MiB', max_age = '7d', overflow = 'drop_oldest');
//! ```
//!
//! The sink does no network I/O. It hands every batch to an [`UplinkWriter`], which the
//! gateway provides through the [`SinkContext`]: the batch is on the gateway's disk, under the
//! stream's next sequence number, when `write_batch` returns. When the engine takes
//! checkpoints, the sink instead holds batches until the next one and hands them over
//! ([`Sink::take_staged`]), so they are committed in the same write as the pipeline's state
//! and a crash can neither lose nor repeat them. The gateway's sender streams the
//! queue to the cloud in order and deletes entries once the cloud has stored them. A pipeline
//! outside a gateway (`weir run`) has no uplink and refuses to build this sink.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::{Schema, SchemaRef};
use serde::{Deserialize, Serialize};

use crate::error::{ConnectorError, Result};
use crate::registry::{ConnectorSpec, SinkConnector, SinkContext, parse_options};
use crate::{Sink, Staged};

/// The `cloud` sink connector.
pub const SINK: SinkConnector = SinkConnector {
    name: "cloud",
    validate,
    build,
};

/// Which streams drain first after an outage: every `alert` stream before any `bulk` one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamPriority {
    Bulk,
    Normal,
    Alert,
}

/// What the queue does when a stream's byte budget is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    /// Delete the oldest queued batches: recent data matters most.
    DropOldest,
    /// Refuse new batches: the history already queued matters most.
    DropNewest,
    /// Merge the oldest fine-grained windows into coarser ones (`reaggregate_to`, with each
    /// column merged as `merge` says): a long outage keeps a lower-resolution history
    /// instead of a gap. Oldest batches are dropped only once everything is coarse.
    Reaggregate,
}

/// How one column of a window result merges when windows are combined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MergeFn {
    Sum,
    Min,
    Max,
    /// The value of the earliest window.
    First,
    /// The value of the latest window.
    Last,
    /// A mean, weighted by the named count column.
    Avg(String),
    /// A root mean square, weighted by the named count column: sqrt(sum(x^2 w) / sum(w)).
    Rms(String),
}

/// Re-aggregation of a stream's backlog: windows keyed by the columns not in `merges`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reaggregate {
    pub granularity: Duration,
    /// The window-start column (a timestamp); `window_end`, if present, is set to
    /// start + granularity.
    pub time_column: String,
    pub merges: Vec<(String, MergeFn)>,
}

impl Reaggregate {
    /// Parses `merge = 'rms:rms(samples), peak:max, samples:sum'`.
    pub fn parse(granularity: Duration, merge: &str) -> Result<Self> {
        let bad = |part: &str| {
            ConnectorError::config(
                "cloud",
                format!(
                    "option 'merge': '{part}' is not COLUMN:HOW with HOW one of sum, min, max, \
                     first, last, avg(COUNT_COLUMN), rms(COUNT_COLUMN)"
                ),
            )
        };
        let mut merges = Vec::new();
        for part in merge.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (column, how) = part.split_once(':').ok_or_else(|| bad(part))?;
            let how = how.trim().to_ascii_lowercase();
            let weighted = |name: &str| {
                how.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix('('))
                    .and_then(|rest| rest.strip_suffix(')'))
                    .map(|w| w.trim().to_owned())
            };
            let function = match how.as_str() {
                "sum" => MergeFn::Sum,
                "min" => MergeFn::Min,
                "max" => MergeFn::Max,
                "first" => MergeFn::First,
                "last" => MergeFn::Last,
                _ => match (weighted("avg"), weighted("rms")) {
                    (Some(weight), _) => MergeFn::Avg(weight),
                    (_, Some(weight)) => MergeFn::Rms(weight),
                    _ => return Err(bad(part)),
                },
            };
            merges.push((column.trim().to_owned(), function));
        }
        if merges.is_empty() {
            return Err(ConnectorError::config(
                "cloud",
                "overflow = 'reaggregate' needs option 'merge', e.g. 'rms:rms(samples), samples:sum'",
            ));
        }
        Ok(Self {
            granularity,
            time_column: "window_start".into(),
            merges,
        })
    }

    /// Checks the columns against the sink's schema.
    pub fn check(&self, schema: &Schema) -> Result<()> {
        let problem = |message: String| ConnectorError::config("cloud", message);
        match schema
            .field_with_name(&self.time_column)
            .map(|f| f.data_type())
        {
            Ok(arrow::datatypes::DataType::Timestamp(_, _)) => {}
            _ => {
                return Err(problem(format!(
                    "overflow = 'reaggregate' needs a TIMESTAMP column '{}' (the window start)",
                    self.time_column
                )));
            }
        }
        for (column, function) in &self.merges {
            let numeric = |name: &str| {
                schema
                    .field_with_name(name)
                    .is_ok_and(|f| f.data_type().is_numeric())
            };
            if !numeric(column) {
                return Err(problem(format!(
                    "option 'merge': '{column}' is not a numeric column of the sink"
                )));
            }
            if let MergeFn::Avg(weight) | MergeFn::Rms(weight) = function
                && !numeric(weight)
            {
                return Err(problem(format!(
                    "option 'merge': the weight '{weight}' of '{column}' is not a numeric column"
                )));
            }
        }
        Ok(())
    }
}

/// `WITH` options of the `cloud` sink.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CloudSinkConfig {
    /// The stream's name in the cloud, and the table `weir query` reads. Defaults to the
    /// sink's SQL name.
    pub stream: Option<String>,
    pub priority: StreamPriority,
    /// Disk the stream's queue may use, e.g. `'256MiB'`.
    pub max_bytes: String,
    /// Queued batches older than this are dropped, e.g. `'7d'`.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    pub overflow: Overflow,
    /// With `overflow = 'reaggregate'`: the coarser window, e.g. `'1m'`.
    #[serde(with = "humantime_serde")]
    pub reaggregate_to: Option<Duration>,
    /// With `overflow = 'reaggregate'`: how each value column merges, e.g.
    /// `'rms:rms(samples), peak:max, samples:sum'`; the other columns are keys.
    pub merge: Option<String>,
}

impl Default for CloudSinkConfig {
    fn default() -> Self {
        Self {
            stream: None,
            priority: StreamPriority::Normal,
            max_bytes: "256MiB".into(),
            max_age: Duration::from_secs(7 * 24 * 3600),
            overflow: Overflow::DropOldest,
            reaggregate_to: None,
            merge: None,
        }
    }
}

/// A stream as the sink asks the uplink for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSpec {
    pub name: String,
    pub priority: StreamPriority,
    pub max_bytes: u64,
    pub max_age: Duration,
    pub overflow: Overflow,
    pub reaggregate: Option<Reaggregate>,
}

impl CloudSinkConfig {
    /// The stream this config describes for a sink named `sink_name` (`pipeline/sink`).
    pub fn stream_spec(&self, sink_name: &str, schema: &Schema) -> Result<StreamSpec> {
        let name = match &self.stream {
            Some(name) => name.clone(),
            None => sink_name.rsplit('/').next().unwrap_or(sink_name).to_owned(),
        };
        check_stream_name(&name)?;
        let max_bytes = parse_bytes(&self.max_bytes)?;
        if max_bytes < 4 << 10 {
            return Err(ConnectorError::config(
                "cloud",
                format!(
                    "option 'max_bytes' must be at least 4KiB, not '{}'",
                    self.max_bytes
                ),
            ));
        }
        if self.max_age < Duration::from_secs(1) {
            return Err(ConnectorError::config(
                "cloud",
                "option 'max_age' must be at least 1s",
            ));
        }
        let reaggregate = match (self.overflow, self.reaggregate_to, &self.merge) {
            (Overflow::Reaggregate, Some(to), Some(merge)) => {
                if to < Duration::from_secs(1) {
                    return Err(ConnectorError::config(
                        "cloud",
                        "option 'reaggregate_to' must be at least 1s",
                    ));
                }
                let reaggregate = Reaggregate::parse(to, merge)?;
                reaggregate.check(schema)?;
                Some(reaggregate)
            }
            (Overflow::Reaggregate, _, _) => {
                return Err(ConnectorError::config(
                    "cloud",
                    "overflow = 'reaggregate' needs options 'reaggregate_to' (e.g. '1m') and \
                     'merge' (e.g. 'rms:rms(samples), samples:sum')",
                ));
            }
            (_, None, None) => None,
            _ => {
                return Err(ConnectorError::config(
                    "cloud",
                    "options 'reaggregate_to' and 'merge' need overflow = 'reaggregate'",
                ));
            }
        };
        Ok(StreamSpec {
            name,
            priority: self.priority,
            max_bytes,
            max_age: self.max_age,
            overflow: self.overflow,
            reaggregate,
        })
    }
}

/// Stream names become table names in the cloud and folder names on its disk.
fn check_stream_name(name: &str) -> Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 128
        && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(ConnectorError::config(
            "cloud",
            format!(
                "stream name '{name}' must be a plain SQL identifier (letters, digits and '_', \
                 not starting with a digit): it names the table in `weir query`"
            ),
        ))
    }
}

/// `'512MiB'`, `'2GB'`, `'65536'` as bytes.
pub fn parse_bytes(text: &str) -> Result<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "kib" | "k" => 1 << 10,
        "mb" => 1_000_000,
        "mib" | "m" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" | "g" => 1 << 30,
        _ => 0,
    };
    digits
        .parse::<u64>()
        .ok()
        .filter(|_| factor > 0)
        .and_then(|n| n.checked_mul(factor))
        .ok_or_else(|| {
            ConnectorError::config(
                "cloud",
                format!("option 'max_bytes' must be a size such as '256MiB', not '{text}'"),
            )
        })
}

/// Where the `cloud` sink puts batches: the gateway's durable queue, one per stream.
pub trait UplinkWriter: Send + Sync {
    /// The queue of `stream`, created on first use and shared by every sink writing it.
    fn open(&self, stream: &StreamSpec) -> Result<Box<dyn UplinkAppender>>;
}

/// One stream's queue, as the sink sees it.
pub trait UplinkAppender: Send {
    /// Stores `batch` durably under the stream's next sequence number. Returns `false` if the
    /// budget's policy refused it (counted by the queue, reported to the cloud).
    fn append(&mut self, batch: &RecordBatch) -> Result<bool>;
}

/// A sink writing into the uplink; see the module docs.
pub struct CloudSink {
    stream: String,
    queue: Box<dyn UplinkAppender>,
    /// With checkpoints: batches since the last one, committed with the next.
    staged: Option<Vec<RecordBatch>>,
}

impl Sink for CloudSink {
    fn write_batch(&mut self, batch: &RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        if let Some(staged) = &mut self.staged {
            staged.push(batch.clone());
            return Ok(());
        }
        if !self.queue.append(batch)? {
            tracing::debug!(stream = %self.stream, rows = batch.num_rows(), "uplink budget full: batch refused");
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        // Every append is already on disk, or waits for the next checkpoint.
        Ok(())
    }

    fn take_staged(&mut self) -> Option<Staged> {
        let batches = std::mem::take(self.staged.as_mut()?);
        Some(Staged {
            stream: self.stream.clone(),
            batches,
        })
    }
}

fn validate(spec: &ConnectorSpec, schema: &Schema) -> Result<()> {
    parse_options::<CloudSinkConfig>("cloud", spec)?
        .stream_spec(&spec.name, schema)
        .map(drop)
}

fn build(spec: &ConnectorSpec, schema: SchemaRef, context: &SinkContext) -> Result<Box<dyn Sink>> {
    let config: CloudSinkConfig = parse_options("cloud", spec)?;
    let stream = config.stream_spec(&spec.name, &schema)?;
    let uplink: &Arc<dyn UplinkWriter> = context.uplink.as_ref().ok_or_else(|| {
        ConnectorError::config(
            "cloud",
            "this process has no uplink to the cloud: run the pipeline on a gateway \
             (`weir gateway --cloud URL`)",
        )
    })?;
    Ok(Box::new(CloudSink {
        queue: uplink.open(&stream)?,
        stream: stream.name,
        staged: context.checkpoints.then(Vec::new),
    }))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use arrow::array::{ArrayRef, Int64Array};

    use super::*;
    use crate::registry::build_sink;

    #[derive(Default)]
    struct Recorder(Arc<Mutex<Vec<(StreamSpec, usize)>>>);

    struct Appender(StreamSpec, Arc<Mutex<Vec<(StreamSpec, usize)>>>);

    impl UplinkWriter for Recorder {
        fn open(&self, stream: &StreamSpec) -> Result<Box<dyn UplinkAppender>> {
            Ok(Box::new(Appender(stream.clone(), Arc::clone(&self.0))))
        }
    }

    impl UplinkAppender for Appender {
        fn append(&mut self, batch: &RecordBatch) -> Result<bool> {
            let mut seen = self.1.lock().expect("lock");
            seen.push((self.0.clone(), batch.num_rows()));
            Ok(true)
        }
    }

    fn batch(rows: i64) -> RecordBatch {
        let column: ArrayRef = Arc::new(Int64Array::from((0..rows).collect::<Vec<_>>()));
        RecordBatch::try_from_iter(vec![("x", column)]).expect("batch")
    }

    #[test]
    fn batches_go_to_the_stream_named_by_the_sink() {
        let recorder = Recorder::default();
        let seen = Arc::clone(&recorder.0);
        let context = SinkContext {
            uplink: Some(Arc::new(recorder)),
            checkpoints: false,
        };
        let spec = ConnectorSpec::new("cloud")
            .with_name("vibration/rms_out")
            .with_option("priority", "alert")
            .with_option("max_bytes", "1MiB");
        let mut sink = build_sink(&spec, batch(1).schema(), &context).expect("sink");
        sink.write_batch(&batch(3)).expect("write");
        sink.write_batch(&batch(0))
            .expect("empty batches are skipped");
        let seen = seen.lock().expect("lock");
        assert_eq!(seen.len(), 1);
        let (stream, rows) = &seen[0];
        assert_eq!(
            (
                stream.name.as_str(),
                stream.priority,
                stream.max_bytes,
                *rows
            ),
            ("rms_out", StreamPriority::Alert, 1 << 20, 3)
        );
    }

    #[test]
    fn bad_options_and_a_missing_uplink_are_explained() {
        let problem = |spec: ConnectorSpec| {
            build_sink(&spec, batch(1).schema(), &SinkContext::default())
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(problem(ConnectorSpec::new("cloud").with_name("p/s")).contains("no uplink"));
        assert!(
            problem(
                ConnectorSpec::new("cloud")
                    .with_name("p/s")
                    .with_option("stream", "9-lives")
            )
            .contains("plain SQL identifier")
        );
        assert!(
            problem(
                ConnectorSpec::new("cloud")
                    .with_name("p/s")
                    .with_option("max_bytes", "lots")
            )
            .contains("'max_bytes' must be a size")
        );
        assert!(
            problem(
                ConnectorSpec::new("cloud")
                    .with_name("p/s")
                    .with_option("priority", "urgent")
            )
            .contains("unknown variant")
        );
    }

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(parse_bytes("65536").ok(), Some(65536));
        assert_eq!(parse_bytes("512MiB").ok(), Some(512 << 20));
        assert_eq!(parse_bytes("2 GB").ok(), Some(2_000_000_000));
        assert!(parse_bytes("-1").is_err());
        assert!(parse_bytes("99999999999999999999G").is_err());
    }
}
