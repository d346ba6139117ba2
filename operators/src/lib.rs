//! Pure, synchronous streaming operators over Arrow record batches.
//!
//! ```text
//!  batch ──> Operator::process_batch ──> Collector (0..n batches out)
//!  watermark ──> Operator::on_watermark ──> Collector (closed windows, flushed state)
//!  snapshot() / restore(bytes): the operator's whole state, for checkpoints
//! ```
//!
//! What lives here: the [`Operator`] trait, filter/projection over DataFusion physical
//! expressions, window aggregation driven by event time, and the anomaly detectors, plus
//! [`build`], which turns one decoded plan node into a ready operator, and [`functions`],
//! every function a pipeline may call.
//!
//! What does not: I/O, async, actors, timers, wall clocks. Operators see batches and
//! watermarks and nothing else, so every behaviour is testable with batches in, batches out.

pub mod build;
pub mod detect;
pub mod error;
pub mod expr;
pub mod filter;
pub mod functions;
pub mod project;
pub mod testing;
pub mod window;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;

pub use build::build;
pub use error::{OperatorError, Result};
pub use expr::{ExprDecoder, encode_expr, encode_schema};
pub use functions::{Functions, functions};

/// Event time in nanoseconds since the Unix epoch (UTC). Every event-time column in a Weir
/// pipeline is `Timestamp(Nanosecond, None)` with this meaning.
pub type EventTime = i64;

/// The promise that no row with an event time at or below this value will arrive any more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Watermark(pub EventTime);

impl Watermark {
    /// The watermark that closes everything: sent at the end of a finite stream.
    pub const END: Watermark = Watermark(EventTime::MAX);
    pub const MIN: Watermark = Watermark(EventTime::MIN);
}

/// Where an operator puts what it produces, plus the counters it reports.
#[derive(Debug, Default)]
pub struct Collector {
    batches: Vec<RecordBatch>,
    /// Rows dropped because they arrived after the watermark had passed their window.
    pub late_rows: u64,
    /// Rows dropped because they cannot be placed in event time (NULL event time).
    pub invalid_rows: u64,
}

impl Collector {
    /// Emits a batch downstream. Empty batches are dropped here so no operator has to care.
    pub fn emit(&mut self, batch: RecordBatch) {
        if batch.num_rows() > 0 {
            self.batches.push(batch);
        }
    }

    /// Takes the batches emitted so far, leaving the collector empty but keeping counters.
    pub fn take_batches(&mut self) -> Vec<RecordBatch> {
        std::mem::take(&mut self.batches)
    }

    pub fn batches(&self) -> &[RecordBatch] {
        &self.batches
    }
}

/// One step of a pipeline: batches in, batches out, state that can be saved and restored.
///
/// Operators are driven by one caller at a time (the engine gives each its own actor) and never
/// block, sleep or do I/O. Errors returned here are bugs or invalid plans, not bad rows: rows
/// an operator cannot handle are its to count and skip, so one bad row never stops a pipeline.
///
/// A stateless operator only implements [`Operator::process_batch`]:
///
/// ```
/// use arrow::array::RecordBatch;
/// use arrow::datatypes::SchemaRef;
/// use weir_operators::{Collector, Operator, Result};
///
/// struct PassThrough(SchemaRef);
///
/// impl Operator for PassThrough {
///     fn name(&self) -> &str { "pass" }
///     fn output_schema(&self) -> SchemaRef { self.0.clone() }
///     fn process_batch(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<()> {
///         out.emit(batch);
///         Ok(())
///     }
/// }
/// ```
pub trait Operator: Send {
    /// A short name for EXPLAIN-like output, logs and metrics labels.
    fn name(&self) -> &str;

    /// The schema of every batch this operator emits.
    fn output_schema(&self) -> SchemaRef;

    /// Consumes one input batch (possibly empty) and emits zero or more batches.
    fn process_batch(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<()>;

    /// Called when the input watermark advances. Windowed operators emit what it closes.
    fn on_watermark(&mut self, _watermark: Watermark, _out: &mut Collector) -> Result<()> {
        Ok(())
    }

    /// For an operator that emits on the watermark: a period, in nanoseconds of event time,
    /// of which every watermark it emits at is a multiple (a window's end). The engine tells
    /// the source, which then ends its batch at the row that reaches one.
    fn emits_every(&self) -> Option<i64> {
        None
    }

    /// The operator's complete state as bytes; empty for stateless operators.
    fn snapshot(&mut self) -> Result<Vec<u8>> {
        Ok(Vec::new())
    }

    /// Replaces the operator's state with one produced by [`Operator::snapshot`].
    fn restore(&mut self, state: &[u8]) -> Result<()> {
        if state.is_empty() {
            Ok(())
        } else {
            Err(OperatorError::Restore(format!(
                "operator '{}' is stateless but was given {} bytes of state",
                self.name(),
                state.len()
            )))
        }
    }
}

/// Rows an operator could not process, with the reason.
#[derive(Debug)]
pub struct RejectedRows {
    pub rows: RecordBatch,
    pub reason: String,
}

/// Runs `process_batch`, and if evaluating the batch fails (say `sqrt` of a negative number
/// in one row), narrows the failure down by halving until the failing rows are found: those
/// are returned as rejected, every other row is processed normally. One bad row thus costs
/// itself, not its batch or the pipeline. The bisection only runs on the error path.
///
/// Operators evaluate all their expressions before changing state, so retrying a part of a
/// batch that failed is safe.
pub fn process_isolating(
    operator: &mut dyn Operator,
    batch: RecordBatch,
    out: &mut Collector,
) -> Result<Vec<RejectedRows>> {
    let mut rejected = Vec::new();
    let mut pending = vec![batch];
    while let Some(batch) = pending.pop() {
        match operator.process_batch(batch.clone(), out) {
            Ok(()) => {}
            Err(error @ (OperatorError::DataFusion(_) | OperatorError::Arrow(_))) => {
                if batch.num_rows() <= 1 {
                    rejected.push(RejectedRows {
                        rows: batch,
                        reason: error.to_string(),
                    });
                } else {
                    let half = batch.num_rows() / 2;
                    // Pushed in reverse so the first half is processed first: order is kept.
                    pending.push(batch.slice(half, batch.num_rows() - half));
                    pending.push(batch.slice(0, half));
                }
            }
            Err(other) => return Err(other),
        }
    }
    Ok(rejected)
}

/// The period of which every watermark some of `operators` emits at is a multiple (see
/// [`Operator::emits_every`]); `None` when none of them emits on the watermark.
pub fn emits_every(operators: &[Box<dyn Operator>]) -> Option<i64> {
    operators
        .iter()
        .filter_map(|operator| operator.emits_every())
        .reduce(gcd)
}

/// The greatest common divisor of two positive periods.
pub(crate) fn gcd(mut a: i64, mut b: i64) -> i64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}
