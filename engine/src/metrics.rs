//! Per-operator counters and latency histograms, registered once per pipeline run and shared
//! by handle: actors update them per batch, never per row.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

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
    /// The last [`WINDOW_CLOSES_KEPT`] watermarks that closed windows, oldest first.
    pub(crate) window_closes: Mutex<VecDeque<WindowClose>>,
}

/// How many recent window closes a pipeline keeps.
pub const WINDOW_CLOSES_KEPT: usize = 1024;

/// A watermark that closed windows.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct WindowClose {
    /// The watermark, in nanoseconds since the Unix epoch: every window ending at or before
    /// it is closed.
    pub watermark_ns: i64,
    /// When the source moved the watermark there, in milliseconds since the Unix epoch.
    pub passed_at_ms: f64,
    /// From then until the window operator emitted the closed windows.
    pub emitted_after_ms: f64,
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
    /// Records that the watermark `watermark_ns`, which the source sent at `passed`, closed
    /// windows just now.
    pub fn window_closed(&self, watermark_ns: i64, passed: Instant) {
        let elapsed = passed.elapsed();
        let passed_at = SystemTime::now()
            .checked_sub(elapsed)
            .and_then(|at| at.duration_since(SystemTime::UNIX_EPOCH).ok())
            .unwrap_or_default();
        let close = WindowClose {
            watermark_ns,
            passed_at_ms: passed_at.as_secs_f64() * 1000.0,
            emitted_after_ms: elapsed.as_secs_f64() * 1000.0,
        };
        if let Ok(mut closes) = self.window_closes.lock() {
            if closes.len() == WINDOW_CLOSES_KEPT {
                closes.pop_front();
            }
            closes.push_back(close);
        }
    }

    /// The recent window closes, oldest first: when each window's result began on its way,
    /// for latencies measured past the sink (a broker, a subscriber).
    pub fn window_closes(&self) -> Vec<WindowClose> {
        self.window_closes
            .lock()
            .map(|closes| closes.iter().copied().collect())
            .unwrap_or_default()
    }

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

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant, SystemTime};

    use super::{PipelineMetrics, WINDOW_CLOSES_KEPT};

    fn epoch_ms(at: SystemTime) -> f64 {
        at.duration_since(SystemTime::UNIX_EPOCH)
            .expect("after the epoch")
            .as_secs_f64()
            * 1000.0
    }

    #[test]
    fn a_window_close_is_dated_when_its_watermark_left_the_source() {
        let metrics = PipelineMetrics::default();
        let before = epoch_ms(SystemTime::now());
        let passed = Instant::now();
        std::thread::sleep(Duration::from_millis(20));
        metrics.window_closed(7_000_000_000, passed);
        let after = epoch_ms(SystemTime::now());
        let [close] = metrics.window_closes()[..] else {
            panic!("one close recorded");
        };
        assert_eq!(close.watermark_ns, 7_000_000_000);
        // Dated at the watermark's departure, not at the close 20 ms later.
        assert!(close.passed_at_ms >= before - 1.0 && close.passed_at_ms <= after - 19.0);
        assert!(close.emitted_after_ms >= 20.0);
    }

    #[test]
    fn only_the_latest_window_closes_are_kept_oldest_first() {
        let metrics = PipelineMetrics::default();
        let extra = 5;
        for watermark in 0..(WINDOW_CLOSES_KEPT + extra) as i64 {
            metrics.window_closed(watermark, Instant::now());
        }
        let closes = metrics.window_closes();
        assert_eq!(closes.len(), WINDOW_CLOSES_KEPT);
        assert_eq!(closes[0].watermark_ns, extra as i64);
        assert!(
            closes
                .windows(2)
                .all(|w| w[0].watermark_ns < w[1].watermark_ns)
        );
    }
}
