//! Checks window results against the signal model, whichever way they came back: as Arrow
//! batches from a collecting sink, or as JSON rows from an MQTT result topic.

use std::collections::HashSet;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Float64Type, Int64Type, TimestampNanosecondType};
use weir_connectors::simulator::SignalModel;

/// One-second tumbling windows, in milliseconds.
pub const WINDOW_MS: i64 = 1000;

/// Expected RMS, peak and count per sensor and window of what a publisher sent.
pub struct WindowCheck {
    model: SignalModel,
    /// Event time of sample 0 (epoch ms); 1 kHz, so sample `k` is at `start_ms + k`.
    start_ms: i64,
    /// Samples per sensor that were published.
    samples: u64,
    seen: HashSet<(usize, i64)>,
    wrong: u64,
    duplicates: u64,
}

/// The outcome of a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Windows received.
    pub windows: usize,
    /// Windows with a wrong RMS, peak or count, or for an unknown sensor.
    pub wrong: u64,
    pub duplicates: u64,
    /// Windows with samples that were not received.
    pub missing: u64,
}

impl Verdict {
    pub fn correct(&self) -> bool {
        self.wrong == 0 && self.duplicates == 0 && self.missing == 0
    }
}

impl WindowCheck {
    pub fn new(model: SignalModel, start_ms: i64, samples: u64) -> Self {
        Self {
            model,
            start_ms,
            samples,
            seen: HashSet::new(),
            wrong: 0,
            duplicates: 0,
        }
    }

    /// (sum of squares, max |v|, count) of `sensor`'s published samples in the window
    /// starting at `window_start_ms`.
    fn expected(&self, sensor: usize, window_start_ms: i64) -> (f64, f64, i64) {
        let first = (window_start_ms - self.start_ms).max(0) as u64;
        let end = ((window_start_ms + WINDOW_MS - self.start_ms).max(0) as u64).min(self.samples);
        let (mut sum_sq, mut max_abs, mut n) = (0.0f64, 0.0f64, 0i64);
        for sample in first..end {
            if let Some(v) = self.model.value(sensor, sample) {
                sum_sq += v * v;
                max_abs = max_abs.max(v.abs());
                n += 1;
            }
        }
        (sum_sq, max_abs, n)
    }

    /// Checks one result row.
    pub fn record(
        &mut self,
        sensor: &str,
        window_start_ms: i64,
        rms: Option<f64>,
        peak: Option<f64>,
        count: i64,
    ) {
        let Some(sensor) = sensor
            .strip_prefix('s')
            .and_then(|n| n.parse::<usize>().ok())
            .and_then(|n| n.checked_sub(1))
            .filter(|&n| n < self.model.sensors())
        else {
            self.wrong += 1;
            return;
        };
        if !self.seen.insert((sensor, window_start_ms)) {
            self.duplicates += 1;
        }
        let (sum_sq, max_abs, n) = self.expected(sensor, window_start_ms);
        let close =
            |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() <= 1e-9 * b.abs().max(1.0));
        let expected_rms = (sum_sq / n as f64).sqrt();
        if n == 0 || count != n || !close(rms, expected_rms) || !close(peak, max_abs) {
            self.wrong += 1;
        }
    }

    /// Checks every row of a batch of `sensor, window_start, rms, peak, samples`.
    pub fn record_batch(&mut self, batch: &RecordBatch) -> anyhow::Result<()> {
        let column = |i: usize| {
            batch
                .columns()
                .get(i)
                .ok_or_else(|| anyhow::anyhow!("result batch has no column {i}"))
        };
        let sensors = column(0)?.as_string::<i32>();
        let starts = column(1)?.as_primitive::<TimestampNanosecondType>();
        let rms = column(2)?.as_primitive::<Float64Type>();
        let peak = column(3)?.as_primitive::<Float64Type>();
        let count = column(4)?.as_primitive::<Int64Type>();
        let float = |a: &arrow::array::PrimitiveArray<Float64Type>, row| {
            (!a.is_null(row)).then(|| a.value(row))
        };
        for row in 0..batch.num_rows() {
            self.record(
                sensors.value(row),
                starts.value(row).div_euclid(1_000_000),
                float(rms, row),
                float(peak, row),
                count.value(row),
            );
        }
        Ok(())
    }

    /// The verdict, counting as missing every window in `windows` (window starts, epoch ms)
    /// that has published samples for some sensor but was not received.
    pub fn verdict(&self, windows: impl IntoIterator<Item = i64>) -> Verdict {
        let mut missing = 0;
        for window_start in windows {
            for sensor in 0..self.model.sensors() {
                if !self.seen.contains(&(sensor, window_start))
                    && self.expected(sensor, window_start).2 > 0
                {
                    missing += 1;
                }
            }
        }
        Verdict {
            windows: self.seen.len(),
            wrong: self.wrong,
            duplicates: self.duplicates,
            missing,
        }
    }

    /// Starts of every window that holds a published sample.
    pub fn all_windows(&self) -> impl Iterator<Item = i64> + use<> {
        let first = self.start_ms.div_euclid(WINDOW_MS) * WINDOW_MS;
        let end = self.start_ms + self.samples as i64;
        (first..end).step_by(WINDOW_MS as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn right_rows_pass_and_wrong_missing_or_repeated_ones_fail() {
        let model = || SignalModel::new(3, 2, 1000, false);
        // Starts mid-window: the first window holds only the last 500 samples.
        let start_ms = 10_500;
        let samples = 2500;
        let mut check = WindowCheck::new(model(), start_ms, samples);
        let truth = |sensor: usize, from: u64, to: u64| {
            let values: Vec<f64> = (from..to)
                .filter_map(|k| model().value(sensor, k))
                .collect();
            let rms = (values.iter().map(|v| v * v).sum::<f64>() / values.len() as f64).sqrt();
            let peak = values.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            (rms, peak, values.len() as i64)
        };
        let windows: Vec<i64> = check.all_windows().collect();
        assert_eq!(windows, vec![10_000, 11_000, 12_000]);
        for (sensor, id) in [(0, "s0001"), (1, "s0002")] {
            for (start, from, to) in [(10_000, 0, 500), (11_000, 500, 1500), (12_000, 1500, 2500)] {
                let (rms, peak, n) = truth(sensor, from, to);
                check.record(id, start, Some(rms), Some(peak), n);
            }
        }
        assert!(check.verdict(windows.clone()).correct());

        let mut wrong = WindowCheck::new(model(), start_ms, samples);
        let (rms, peak, n) = truth(0, 0, 500);
        wrong.record("s0001", 10_000, Some(rms * 1.001), Some(peak), n);
        wrong.record("s0001", 10_000, Some(rms), Some(peak), n);
        wrong.record("s0009", 10_000, Some(rms), Some(peak), n);
        let verdict = wrong.verdict(windows);
        assert_eq!((verdict.wrong, verdict.duplicates), (2, 1));
        assert_eq!(verdict.missing, 5);
        assert!(!verdict.correct());
    }
}
