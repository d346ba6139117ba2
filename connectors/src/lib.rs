//! Weir's sources and sinks: everything that moves data into or out of a pipeline.
//!
//! ```text
//!   file (CSV / JSON lines) ───┐                        ┌──> file / stdout (JSON lines, CSV)
//!   simulator (vibration) ─────┼─> RecordBatch ─> ... ─>┼──> mqtt (JSON rows or arrays)
//!   mqtt (JSON/CSV/Sparkplug) ─┘   + dead letters       ├──> cloud (the gateway's uplink)
//!                                                         └──> null (benchmarks)
//! ```
//!
//! What lives here: one folder per connector with its typed config, the payload decoders that
//! write JSON straight into Arrow builders, and [`registry`], the one place that maps a
//! connector name from SQL's `WITH (connector = '...')` to a builder.
//!
//! What does not: SQL (the planner validates `WITH` options by calling [`registry`]), actors
//! and scheduling (the engine drives a [`Source`] and feeds a [`Sink`]), operators.
//!
//! Event time is always an Arrow `Timestamp(Nanosecond, None)` column holding UTC instants;
//! sinks render it as RFC 3339 in UTC unless configured otherwise.

pub mod cloud;
pub mod dead_letter;
pub mod decode;
pub mod error;
pub mod file;
pub mod mqtt;
pub mod null;
pub mod payload;
pub mod registry;
pub mod simulator;
pub mod time;

use std::future::Future;
use std::pin::Pin;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;

pub use dead_letter::{DeadLetter, DeadLetterQueue};
pub use error::{ConnectorError, Result};
pub use registry::{
    ConnectorSpec, SinkContext, build_sink, build_source, validate_sink, validate_source,
};

/// What a [`Source`] produced on one poll.
#[derive(Debug)]
pub enum SourceEvent {
    /// Rows in the source's schema. Never empty.
    Batch(RecordBatch),
    /// The source is finite and has nothing more to give.
    End,
}

/// A boxed future returned by [`Source::next_event`].
pub type SourceFuture<'a> = Pin<Box<dyn Future<Output = Result<SourceEvent>> + Send + 'a>>;

/// A producer of record batches in a fixed schema.
///
/// The engine polls `next_event` in a loop from its source actor and wraps each call with its
/// own idle timeout, so a source may wait as long as it needs for data (a live broker) and must
/// be cancel-safe: dropping the future loses no data already read. Malformed input never fails
/// the source: it goes to the [`DeadLetterQueue`] given at build time with a reason, and the
/// source carries on. An `Err` means the source itself is broken (file vanished, disk error) and
/// the pipeline's supervisor decides whether to restart.
pub trait Source: Send {
    /// The schema of every batch this source yields.
    fn schema(&self) -> SchemaRef;
    /// Waits for the next batch, or `End` for a finite source that is done.
    fn next_event(&mut self) -> SourceFuture<'_>;

    /// Where the source is, covering exactly the batches returned so far, for a checkpoint;
    /// `None` for a source that cannot resume from a position (MQTT: its broker redelivers
    /// what [`Self::committed`] did not acknowledge).
    fn position(&self) -> Option<Vec<u8>> {
        None
    }

    /// Continues after `position`, from a checkpoint of an earlier run of the same source.
    fn seek(&mut self, _position: &[u8]) -> Result<()> {
        Err(ConnectorError::Internal(
            "this source cannot resume from a position".into(),
        ))
    }

    /// Checkpoint `id` is taken now: it covers every batch returned so far.
    fn on_barrier(&mut self, _id: u64) {}

    /// Checkpoint `id` (and every earlier one) is on disk: what it covers may be
    /// acknowledged upstream (MQTT with `ack = 'checkpoint'`).
    fn committed(&mut self, _id: u64) {}

    /// Tells a source that batches rows while it waits for more (MQTT's `linger`) where
    /// event time matters downstream, so it can end a batch at the row that closes a window
    /// instead of holding that row until the batch fills or lingers out. Sources that
    /// produce batches without waiting ignore it.
    fn set_window_ends(&mut self, _ends: WindowEnds) {}
}

/// Where the windows downstream of a source close, in the source's event time.
///
/// The watermark is the latest event time seen less `delay_ns`; a window closes once the
/// watermark reaches its end, and every window end is a multiple of `every_ns` (windows are
/// aligned at the Unix epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowEnds {
    pub every_ns: i64,
    pub delay_ns: i64,
    /// Rows more than this far ahead of the wall clock are dropped before they can move the
    /// watermark (the engine's `max_event_ahead`), so they close no window either.
    pub max_ahead_ns: Option<i64>,
}

impl WindowEnds {
    /// The first window end after the watermark that event time `latest` gives.
    pub fn next_after(&self, latest: i64) -> i64 {
        let watermark = latest.saturating_sub(self.delay_ns);
        watermark
            .div_euclid(self.every_ns)
            .saturating_add(1)
            .saturating_mul(self.every_ns)
    }

    /// Whether the engine keeps a row at event time `ts`, rather than dropping it for being
    /// too far ahead of the wall clock.
    pub fn in_time(&self, ts: i64) -> bool {
        let Some(ahead) = self.max_ahead_ns else {
            return true;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
        ts <= now.saturating_add(ahead)
    }
}

/// A source position as big-endian 64-bit words, the form the simulator and file sources
/// checkpoint.
pub mod position {
    /// `words` as bytes.
    pub fn encode(words: &[u64]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_be_bytes()).collect()
    }

    /// Exactly `N` words, or `None` for bytes of another length.
    pub fn decode<const N: usize>(bytes: &[u8]) -> Option<[u64; N]> {
        if bytes.len() != N * 8 {
            return None;
        }
        let mut words = [0; N];
        for (word, chunk) in words.iter_mut().zip(bytes.chunks_exact(8)) {
            *word = u64::from_be_bytes(chunk.try_into().ok()?);
        }
        Some(words)
    }
}

/// Batches a transactional sink holds for the checkpoint that will commit them.
#[derive(Debug, Default)]
pub struct Staged {
    /// The uplink stream they go to.
    pub stream: String,
    pub batches: Vec<RecordBatch>,
}

/// A consumer of record batches.
///
/// Called from the engine's sink actor, one batch at a time, in order. `flush` is called on
/// every watermark and at the end of the stream so buffered output reaches its destination.
pub trait Sink: Send {
    fn write_batch(&mut self, batch: &RecordBatch) -> Result<()>;
    fn flush(&mut self) -> Result<()>;

    /// For a checkpoint: the batches written since the last one that this sink holds back
    /// so they are committed in the same atomic write as the checkpoint (the `cloud` sink
    /// when the engine takes checkpoints). Other sinks have written theirs already.
    fn take_staged(&mut self) -> Option<Staged> {
        None
    }

    /// Whether `write_batch` can wait on something outside the process, such as a broker
    /// that is away. The engine gives such a sink a thread of its own, so that while it
    /// waits (which is backpressure on its own pipeline) it holds up no other pipeline.
    fn may_block(&self) -> bool {
        false
    }
}
