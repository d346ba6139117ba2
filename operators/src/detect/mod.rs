//! Streaming anomaly detectors, written in SQL as window function calls:
//!
//! ```sql
//! SELECT sensor, ts, v, zscore(v, 100) OVER (PARTITION BY sensor ORDER BY ts) AS z
//! FROM vibration
//! ```
//!
//! A detector keeps compact per-key state and appends one column to each row it sees, in
//! arrival order. Adding a detector means one file implementing [`DetectorKind`] and one line
//! in [`registry`]: the planner learns its name and argument types from the registry (through
//! [`window_udfs`]) and the engine only ever sees an [`Operator`](crate::Operator).

mod operator;
mod zscore;

use std::sync::Arc;

use arrow::array::{Float64Array, Float64Builder};
use arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::common::{ScalarValue, not_impl_err};
use datafusion::logical_expr::function::{PartitionEvaluatorArgs, WindowUDFFieldArgs};
use datafusion::logical_expr::{
    PartitionEvaluator, Signature, Volatility, WindowUDF, WindowUDFImpl,
};

pub use operator::DetectorOperator;

use crate::Result;

/// A kind of detector: its SQL name, its parameters, and a factory for its per-key state.
pub trait DetectorKind: Send + Sync {
    /// The SQL function name, lower case.
    fn name(&self) -> &'static str;
    /// One line for `--help` and error hints, e.g. `zscore(value, n)`.
    fn usage(&self) -> &'static str;
    /// Number of literal parameters after the value argument.
    fn parameter_count(&self) -> usize;
    /// Checks the literal parameters and returns a fresh, empty detector.
    fn create(&self, parameters: &[ScalarValue]) -> Result<Box<dyn KeyedDetector>>;
}

/// The state of one detector across all keys. Keys are dense indexes handed out by the
/// operator (0, 1, 2, ... in order of first appearance), so state can live in flat vectors.
pub trait KeyedDetector: Send {
    /// For each row, updates the state of `keys[row]` with `values[row]` and appends the
    /// detector's output for that row (NULL where it has no opinion yet).
    fn process(&mut self, keys: &[usize], values: &Float64Array, out: &mut Float64Builder);
    /// The state of every key, in key-index order.
    fn snapshot(&self) -> Vec<u8>;
    fn restore(&mut self, state: &[u8]) -> Result<()>;
}

/// Every detector the language knows.
pub fn registry() -> &'static [&'static dyn DetectorKind] {
    &[&zscore::ZScore]
}

pub fn find(name: &str) -> Option<&'static dyn DetectorKind> {
    registry().iter().copied().find(|d| d.name() == name)
}

/// Window function stubs so DataFusion can parse and type detector calls. Only Weir's
/// streaming operator evaluates them; DataFusion's batch engine never runs a pipeline.
pub fn window_udfs() -> Vec<Arc<WindowUDF>> {
    registry()
        .iter()
        .map(|kind| Arc::new(WindowUDF::from(DetectorFunction::new(*kind))))
        .collect()
}

struct DetectorFunction {
    kind: &'static dyn DetectorKind,
    signature: Signature,
}

impl DetectorFunction {
    fn new(kind: &'static dyn DetectorKind) -> Self {
        // Every argument is coerced to Float64: the value and the numeric parameters.
        let arity = 1 + kind.parameter_count();
        Self {
            kind,
            signature: Signature::uniform(arity, vec![DataType::Float64], Volatility::Immutable),
        }
    }
}

impl std::fmt::Debug for DetectorFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DetectorFunction")
            .field("name", &self.kind.name())
            .finish()
    }
}

impl PartialEq for DetectorFunction {
    fn eq(&self, other: &Self) -> bool {
        self.kind.name() == other.kind.name()
    }
}

impl Eq for DetectorFunction {}

impl std::hash::Hash for DetectorFunction {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.kind.name().hash(state);
    }
}

impl WindowUDFImpl for DetectorFunction {
    fn name(&self) -> &str {
        self.kind.name()
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn partition_evaluator(
        &self,
        _args: PartitionEvaluatorArgs,
    ) -> datafusion::error::Result<Box<dyn PartitionEvaluator>> {
        not_impl_err!(
            "{} runs only inside a Weir streaming pipeline",
            self.kind.name()
        )
    }

    fn field(&self, field_args: WindowUDFFieldArgs) -> datafusion::error::Result<FieldRef> {
        Ok(Arc::new(Field::new(
            field_args.name(),
            DataType::Float64,
            true,
        )))
    }
}
