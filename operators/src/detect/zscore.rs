//! Rolling z-score: how many standard deviations a value lies from the mean of the previous
//! `n` values of the same key.
//!
//! `zscore(v, n)` is NULL until a key has `n` earlier values, NULL for NULL, NaN or infinite values
//! (which are not added to the history), and NULL when the history has no spread (standard
//! deviation 0), since any threshold on it would be meaningless. Per key the state is a ring
//! of `n` values in one flat vector shared by all keys, plus running sums that are recomputed
//! from the ring every `n` updates so floating-point error cannot accumulate.

use arrow::array::{Array, Float64Array, Float64Builder};
use datafusion::common::ScalarValue;
use serde::{Deserialize, Serialize};

use super::{DetectorKind, KeyedDetector};
use crate::error::{OperatorError, Result};

/// Upper bound on the history length, so a typo cannot allocate gigabytes per key.
const MAX_HISTORY: usize = 100_000;

pub struct ZScore;

impl DetectorKind for ZScore {
    fn name(&self) -> &'static str {
        "zscore"
    }

    fn usage(&self) -> &'static str {
        "zscore(value, n) OVER (PARTITION BY key ORDER BY ts): z-score against the previous n values"
    }

    fn parameter_count(&self) -> usize {
        1
    }

    fn create(&self, parameters: &[ScalarValue]) -> Result<Box<dyn KeyedDetector>> {
        let n = match parameters {
            [ScalarValue::Float64(Some(n))] if n.fract() == 0.0 && *n >= 2.0 => *n as usize,
            _ => {
                return Err(OperatorError::plan(format!(
                    "zscore history length must be a whole number >= 2, got {parameters:?}"
                )));
            }
        };
        if n > MAX_HISTORY {
            return Err(OperatorError::plan(format!(
                "zscore history length {n} exceeds the maximum of {MAX_HISTORY}"
            )));
        }
        Ok(Box::new(ZScoreState::new(n)))
    }
}

#[derive(Serialize, Deserialize)]
struct ZScoreState {
    n: usize,
    /// `n` slots per key, key-major.
    ring: Vec<f64>,
    /// Per key: values seen (saturating at `n`), next slot, running sum, running sum of squares,
    /// updates since the sums were last recomputed.
    keys: Vec<KeyHistory>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Default)]
struct KeyHistory {
    filled: usize,
    next: usize,
    sum: f64,
    sum_sq: f64,
    since_refresh: usize,
}

impl ZScoreState {
    fn new(n: usize) -> Self {
        Self {
            n,
            ring: Vec::new(),
            keys: Vec::new(),
        }
    }

    fn ensure_key(&mut self, key: usize) {
        if key >= self.keys.len() {
            self.keys.resize(key + 1, KeyHistory::default());
            self.ring.resize((key + 1) * self.n, 0.0);
        }
    }

    fn observe(&mut self, key: usize, value: f64) -> Option<f64> {
        self.ensure_key(key);
        let n = self.n;
        let history = &mut self.keys[key];
        let slots = &mut self.ring[key * n..(key + 1) * n];
        let z = (history.filled == n).then(|| {
            let mean = history.sum / n as f64;
            let variance = (history.sum_sq / n as f64 - mean * mean).max(0.0);
            let std = variance.sqrt();
            // A spread this small relative to the level is numerical noise, not signal.
            (std > mean.abs() * 1e-12 && std > 0.0).then(|| (value - mean) / std)
        });
        if history.filled == n {
            let old = slots[history.next];
            history.sum -= old;
            history.sum_sq -= old * old;
        } else {
            history.filled += 1;
        }
        slots[history.next] = value;
        history.sum += value;
        history.sum_sq += value * value;
        history.next = (history.next + 1) % n;
        history.since_refresh += 1;
        if history.since_refresh >= n {
            let filled = &slots[..history.filled.min(n)];
            history.sum = filled.iter().sum();
            history.sum_sq = filled.iter().map(|v| v * v).sum();
            history.since_refresh = 0;
        }
        z.flatten()
    }
}

impl KeyedDetector for ZScoreState {
    fn process(&mut self, keys: &[usize], values: &Float64Array, out: &mut Float64Builder) {
        for (row, &key) in keys.iter().enumerate() {
            if values.is_null(row) || !values.value(row).is_finite() {
                out.append_null();
                continue;
            }
            out.append_option(self.observe(key, values.value(row)));
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    fn restore(&mut self, state: &[u8]) -> Result<()> {
        let restored: ZScoreState = serde_json::from_slice(state)
            .map_err(|e| OperatorError::Restore(format!("bad zscore state: {e}")))?;
        if restored.n != self.n {
            return Err(OperatorError::Restore(format!(
                "zscore state has history {} but the plan says {}",
                restored.n, self.n
            )));
        }
        *self = restored;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(
        detector: &mut dyn KeyedDetector,
        keys: &[usize],
        values: Vec<Option<f64>>,
    ) -> Vec<Option<f64>> {
        let mut out = Float64Builder::new();
        detector.process(keys, &Float64Array::from(values), &mut out);
        out.finish().iter().collect()
    }

    #[test]
    fn null_until_history_is_full_then_scores_against_previous_values() {
        let mut z = ZScore
            .create(&[ScalarValue::Float64(Some(4.0))])
            .expect("valid");
        let out = run(
            z.as_mut(),
            &[0; 5],
            vec![Some(1.0), Some(3.0), Some(1.0), Some(3.0), Some(6.0)],
        );
        // History 1,3,1,3: mean 2, population std 1, so 6 is 4 standard deviations out.
        assert_eq!(out, vec![None, None, None, None, Some(4.0)]);
    }

    #[test]
    fn keys_have_separate_histories() {
        let mut z = ZScore
            .create(&[ScalarValue::Float64(Some(2.0))])
            .expect("valid");
        let out = run(
            z.as_mut(),
            &[0, 1, 0, 1, 0, 1],
            vec![
                Some(1.0),
                Some(10.0),
                Some(3.0),
                Some(30.0),
                Some(2.0),
                Some(20.0),
            ],
        );
        assert_eq!(out, vec![None, None, None, None, Some(0.0), Some(0.0)]);
    }

    #[test]
    fn null_and_nan_values_are_skipped_and_flat_history_scores_null() {
        let mut z = ZScore
            .create(&[ScalarValue::Float64(Some(2.0))])
            .expect("valid");
        let out = run(
            z.as_mut(),
            &[0; 5],
            vec![Some(5.0), None, Some(f64::NAN), Some(5.0), Some(9.0)],
        );
        assert_eq!(out, vec![None, None, None, None, None]);
    }

    #[test]
    fn rejects_bad_history_length() {
        assert!(ZScore.create(&[ScalarValue::Float64(Some(1.0))]).is_err());
        assert!(ZScore.create(&[ScalarValue::Float64(Some(2.5))]).is_err());
        assert!(ZScore.create(&[ScalarValue::Float64(None)]).is_err());
    }

    #[test]
    fn snapshot_restore_continues_identically() {
        let values = [1.0, 2.0, 4.0, 3.0, 8.0, 1.0, 2.0];
        let mut whole = ZScore
            .create(&[ScalarValue::Float64(Some(3.0))])
            .expect("valid");
        let expected = run(
            whole.as_mut(),
            &[0; 7],
            values.iter().copied().map(Some).collect(),
        );

        let mut first = ZScore
            .create(&[ScalarValue::Float64(Some(3.0))])
            .expect("valid");
        let mut got = run(
            first.as_mut(),
            &[0; 4],
            values[..4].iter().copied().map(Some).collect(),
        );
        let mut second = ZScore
            .create(&[ScalarValue::Float64(Some(3.0))])
            .expect("valid");
        second.restore(&first.snapshot()).expect("restore");
        got.extend(run(
            second.as_mut(),
            &[0; 3],
            values[4..].iter().copied().map(Some).collect(),
        ));
        assert_eq!(got, expected);
    }
}
