//! Per-operator counters and latency histograms, registered once per pipeline run and shared
//! by handle: actors update them per batch, never per row.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Counters for one stage of a pipeline: the source, an operator or the sink.
#[derive(Debug, Default)]
pub struct StageMetrics {
    pub name: String,
    pub rows_in: AtomicU64,
    pub rows_out: AtomicU64,
    pub batches_in: AtomicU64,
    pub batches_out: AtomicU64,
    pub late_rows: AtomicU64,
    pub invalid_rows: AtomicU64,
    pub errors: AtomicU64,
    /// Messages sent downstream and not yet handled there.
    pub mailbox_depth: AtomicU64,
}

impl StageMetrics {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// A latency histogram in microseconds, 1 us to 1 hour at 3 significant digits.
#[derive(Debug)]
pub struct Latency(Mutex<Histogram<u64>>);

impl Default for Latency {
    fn default() -> Self {
        let histogram =
            Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant bounds are valid");
        Self(Mutex::new(histogram))
    }
}

impl Latency {
    pub fn record(&self, elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        if let Ok(mut histogram) = self.0.lock() {
            histogram.saturating_record(micros);
        }
    }

    pub fn summary(&self) -> LatencySummary {
        let Ok(histogram) = self.0.lock() else {
            return LatencySummary::default();
        };
        let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
        LatencySummary {
            count: histogram.len(),
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            max_ms: histogram.max() as f64 / 1000.0,
        }
    }
}

#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Everything measured about one pipeline.
#[derive(Debug, Default)]
pub struct PipelineMetrics {
    pub stages: Vec<Arc<StageMetrics>>,
    /// From the moment a source produced a batch (or the watermark that closed a window) to the
    /// moment the sink wrote the result.
    pub source_to_sink: Latency,
    /// From a watermark arriving at a window operator to the closed windows being emitted.
    pub watermark_to_emit: Latency,
    pub restarts: AtomicU64,
    pub dead_letters: AtomicU64,
    /// Checkpoints committed, and how long each commit took at the sink.
    pub checkpoints: AtomicU64,
    pub checkpoint_duration: Latency,
}

#[derive(Debug, Serialize)]
pub struct StageSnapshot {
    pub name: String,
    pub rows_in: u64,
    pub rows_out: u64,
    pub batches_in: u64,
    pub batches_out: u64,
    pub late_rows: u64,
    pub invalid_rows: u64,
    pub errors: u64,
    pub mailbox_depth: u64,
}

#[derive(Debug, Serialize)]
pub struct PipelineSnapshot {
    pub stages: Vec<StageSnapshot>,
    pub source_to_sink: LatencySummary,
    pub watermark_to_emit: LatencySummary,
    pub restarts: u64,
}

impl PipelineMetrics {
    pub fn snapshot(&self) -> PipelineSnapshot {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PipelineSnapshot {
            stages: self
                .stages
                .iter()
                .map(|s| StageSnapshot {
                    name: s.name.clone(),
                    rows_in: load(&s.rows_in),
                    rows_out: load(&s.rows_out),
                    batches_in: load(&s.batches_in),
                    batches_out: load(&s.batches_out),
                    late_rows: load(&s.late_rows),
                    invalid_rows: load(&s.invalid_rows),
                    errors: load(&s.errors),
                    mailbox_depth: load(&s.mailbox_depth),
                })
                .collect(),
            source_to_sink: self.source_to_sink.summary(),
            watermark_to_emit: self.watermark_to_emit.summary(),
            restarts: load(&self.restarts),
        }
    }
}
