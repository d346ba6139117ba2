//! The `null` sink: drops every batch, counting rows and batches. For benchmarks, where the
//! cost of a real sink would hide the cost of the pipeline.
//!
//! Counters are published under a name (option `counters`, default `null`) in a process-wide
//! table, because the engine holds sinks as `Box<dyn Sink>`: a benchmark reads them with
//! [`NullSinkCounters::named`] while the pipeline runs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use arrow::array::RecordBatch;
use arrow::datatypes::{Schema, SchemaRef};
use serde::{Deserialize, Serialize};

use crate::Sink;
use crate::error::{ConnectorError, Result};
use crate::registry::{ConnectorSpec, SinkConnector, SinkContext, parse_options};

/// The `null` sink connector.
pub const SINK: SinkConnector = SinkConnector {
    name: "null",
    validate,
    build,
};

/// `WITH` options of the `null` sink.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NullSinkConfig {
    /// Name under which the row and batch counters are published; sinks sharing a name add
    /// to the same counters.
    pub counters: String,
}

impl Default for NullSinkConfig {
    fn default() -> Self {
        Self {
            counters: "null".into(),
        }
    }
}

impl NullSinkConfig {
    /// Checks the options.
    pub fn validate(&self) -> Result<()> {
        if self.counters.is_empty() {
            return Err(ConnectorError::config(
                "null",
                "option 'counters' must not be empty",
            ));
        }
        Ok(())
    }
}

/// Shared row and batch counters of null sinks; clones count together.
#[derive(Debug, Clone, Default)]
pub struct NullSinkCounters {
    rows: Arc<AtomicU64>,
    batches: Arc<AtomicU64>,
}

impl NullSinkCounters {
    /// Fresh counters, not published.
    pub fn new() -> Self {
        Self::default()
    }

    /// The counters published under `name`, created at zero on first use.
    pub fn named(name: &str) -> Self {
        static PUBLISHED: OnceLock<Mutex<HashMap<String, NullSinkCounters>>> = OnceLock::new();
        let mut published = PUBLISHED
            .get_or_init(Mutex::default)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        published.entry(name.to_owned()).or_default().clone()
    }

    /// Rows dropped so far.
    pub fn rows(&self) -> u64 {
        self.rows.load(Ordering::Relaxed)
    }

    /// Batches dropped so far.
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    /// The raw row counter, for a benchmark that polls it in a tight loop.
    pub fn rows_handle(&self) -> Arc<AtomicU64> {
        self.rows.clone()
    }

    /// The raw batch counter.
    pub fn batches_handle(&self) -> Arc<AtomicU64> {
        self.batches.clone()
    }
}

/// A sink that drops what it is given; see the module docs.
#[derive(Debug, Default)]
pub struct NullSink {
    counters: NullSinkCounters,
}

impl NullSink {
    /// A sink counting into `counters`.
    pub fn new(counters: NullSinkCounters) -> Self {
        Self { counters }
    }

    /// This sink's counters.
    pub fn counters(&self) -> NullSinkCounters {
        self.counters.clone()
    }
}

impl Sink for NullSink {
    fn write_batch(&mut self, batch: &RecordBatch) -> Result<()> {
        self.counters
            .rows
            .fetch_add(batch.num_rows() as u64, Ordering::Relaxed);
        self.counters.batches.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
}

fn validate(spec: &ConnectorSpec, _schema: &Schema) -> Result<()> {
    parse_options::<NullSinkConfig>("null", spec)?.validate()
}

fn build(
    spec: &ConnectorSpec,
    _schema: SchemaRef,
    _context: &SinkContext,
) -> Result<Box<dyn Sink>> {
    let config: NullSinkConfig = parse_options("null", spec)?;
    Ok(Box::new(NullSink::new(NullSinkCounters::named(
        &config.counters,
    ))))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Int64Array};

    use super::*;
    use crate::registry::build_sink;

    #[test]
    fn counts_rows_and_batches_under_the_configured_name() {
        let spec = ConnectorSpec::new("null").with_option("counters", "null-sink-test");
        let column: ArrayRef = Arc::new(Int64Array::from(vec![1, 2, 3]));
        let batch = RecordBatch::try_from_iter(vec![("x", column)]).expect("batch");
        let mut sink = build_sink(&spec, batch.schema(), &SinkContext::default()).expect("sink");
        sink.write_batch(&batch).expect("write");
        sink.write_batch(&batch.slice(0, 1)).expect("write");
        sink.flush().expect("flush");
        let counters = NullSinkCounters::named("null-sink-test");
        assert_eq!((counters.rows(), counters.batches()), (4, 2));
        assert_eq!(NullSinkCounters::named("another-name").rows(), 0);
    }
}
