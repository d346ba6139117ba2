//! The simulated vibration signal and its fault schedule.
//!
//! Sample `k` of sensor `s` (time `t = k / rate_hz` seconds) is
//!
//! ```text
//! v(s, k) = Σ_{h=1..3} a_h(s) · sin(2π · h · f(s) · t + φ_h(s))   rotation and two harmonics
//!         + σ(s) · n(s, k)                                         noise
//!         + fault(s, k)                                            injected faults
//! ```
//!
//! with, per sensor, drawn from `StdRng` seeded by `(seed, s)`: rotation `f` 47.5–52.5 Hz,
//! `a_1` 0.5–1.5, `a_2` 20–50 % of `a_1`, `a_3` 5–20 % of `a_1`, phases uniform, and
//! `σ = 0.05 · a_1`. The noise `n` is a sum of four uniforms from a hash of `(seed, s, k)`
//! (mean 0, variance 1, bell-shaped), so any sample can be computed on its own, in any order:
//! that is what lets a benchmark recompute expected results without running the simulator.
//! Values are quantised to [`RESOLUTION`], as a 20-bit converter would, which also keeps their
//! JSON form short (`0.418213`) like a real sensor's.
//!
//! # Faults
//!
//! Time is cut into windows of [`FAULT_WINDOW_SECONDS`]. For each sensor and window, a hash of
//! `(seed, s, window)` picks, each with probability 1/16, one of:
//!
//! | fault | what the sensor reports |
//! | --- | --- |
//! | spike | one sample offset by ±20 · a_1, at a random point of the window |
//! | step | from a random point in the first half of the window to its end, a level shift of ±4 · a_1 |
//! | drift | an offset growing linearly from 0 to 3 · a_1 across the whole window |
//! | dropout | nothing at all for 1 to 3 seconds from a random point (cut at the window's end) |
//!
//! and otherwise (3/4 of windows) nothing. [`SignalModel::fault`] tells where each fault is.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The smallest step between two simulated readings.
pub const RESOLUTION: f64 = 1.0 / STEPS_PER_UNIT;

/// Readings are whole multiples of [`RESOLUTION`]; dividing by this exact power of ten (rather
/// than multiplying by the inexact `1e-6`) gives the double nearest to the decimal, whose
/// shortest form is then at most eight digits.
const STEPS_PER_UNIT: f64 = 1e6;

/// Length of a fault-schedule window.
pub const FAULT_WINDOW_SECONDS: u64 = 10;

/// A kind of injected fault; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// One wild sample.
    Spike,
    /// A sudden, lasting level shift.
    Step,
    /// A slowly growing offset.
    Drift,
    /// The sensor sends nothing.
    Dropout,
}

/// One scheduled fault of one sensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fault {
    /// What happens.
    pub kind: FaultKind,
    /// First affected sample index.
    pub start: u64,
    /// One past the last affected sample index.
    pub end: u64,
    /// Offset added to affected samples: constant for spikes and steps, reached at `end` for a
    /// drift, zero for a dropout.
    pub magnitude: f64,
}

/// The deterministic signal of every sensor of one simulator configuration.
#[derive(Debug, Clone)]
pub struct SignalModel {
    seed: u64,
    rate_hz: f64,
    window: u64,
    faults: bool,
    sensors: Vec<SensorSignal>,
}

#[derive(Debug, Clone)]
struct SensorSignal {
    /// 2π · f, radians per second.
    angular: f64,
    amplitude: [f64; 3],
    /// cos φ_h and sin φ_h.
    phase_cos: [f64; 3],
    phase_sin: [f64; 3],
    noise: f64,
}

impl SignalModel {
    /// The model for `sensors` sensors sampled at `rate_hz`, with or without faults.
    pub fn new(seed: u64, sensors: u32, rate_hz: u32, faults: bool) -> Self {
        let sensors = (0..u64::from(sensors))
            .map(|s| {
                let mut rng = StdRng::seed_from_u64(mix(seed, s, 0, SALT_SENSOR));
                let rotation_hz = rng.random_range(47.5..52.5);
                let fundamental = rng.random_range(0.5..1.5);
                let amplitude = [
                    fundamental,
                    fundamental * rng.random_range(0.2..0.5),
                    fundamental * rng.random_range(0.05..0.2),
                ];
                let phase = [(); 3].map(|()| rng.random_range(0.0..std::f64::consts::TAU));
                SensorSignal {
                    angular: std::f64::consts::TAU * rotation_hz,
                    amplitude,
                    phase_cos: phase.map(f64::cos),
                    phase_sin: phase.map(f64::sin),
                    noise: 0.05 * fundamental,
                }
            })
            .collect();
        Self {
            seed,
            rate_hz: f64::from(rate_hz.max(1)),
            window: FAULT_WINDOW_SECONDS * u64::from(rate_hz.max(1)),
            faults,
            sensors,
        }
    }

    /// How many sensors the model has.
    pub fn sensors(&self) -> usize {
        self.sensors.len()
    }

    /// Sample `sample` of sensor `sensor` (0-based), or `None` when the sensor is in a dropout
    /// (or does not exist).
    pub fn value(&self, sensor: usize, sample: u64) -> Option<f64> {
        let signal = self.sensors.get(sensor)?;
        let fault = if self.faults {
            self.fault(sensor, sample / self.window)
                .filter(|f| (f.start..f.end).contains(&sample))
        } else {
            None
        };
        let offset = match fault {
            None => 0.0,
            Some(fault) => match fault.kind {
                FaultKind::Dropout => return None,
                FaultKind::Spike | FaultKind::Step => fault.magnitude,
                FaultKind::Drift => {
                    fault.magnitude * (sample - fault.start) as f64
                        / (fault.end - fault.start) as f64
                }
            },
        };
        // The harmonics come from the fundamental by the multiple-angle formulas and each phase
        // by the angle-sum formula: one sin_cos per sample instead of three sines.
        let t = sample as f64 / self.rate_hz;
        let (s1, c1) = (signal.angular * t).sin_cos();
        let (s2, c2) = (2.0 * s1 * c1, c1 * c1 - s1 * s1);
        let (s3, c3) = (s1 * (3.0 - 4.0 * s1 * s1), c1 * (4.0 * c1 * c1 - 3.0));
        let mut value = 0.0;
        for (h, (sin, cos)) in [(s1, c1), (s2, c2), (s3, c3)].into_iter().enumerate() {
            value += signal.amplitude[h] * (sin * signal.phase_cos[h] + cos * signal.phase_sin[h]);
        }
        value += signal.noise * bell(mix(self.seed, sensor as u64, sample, SALT_NOISE));
        value += offset;
        Some((value * STEPS_PER_UNIT).round() / STEPS_PER_UNIT)
    }

    /// The fault of `sensor` in fault window `window` (samples `window · W .. (window + 1) · W`
    /// with `W` = [`FAULT_WINDOW_SECONDS`] · rate), if one is scheduled. Scheduled even when
    /// the model was built without faults, so callers can see what would have happened.
    pub fn fault(&self, sensor: usize, window: u64) -> Option<Fault> {
        let scale = self.sensors.get(sensor)?.amplitude[0];
        let hash = mix(self.seed, sensor as u64, window, SALT_FAULT);
        let kind = match hash >> 60 {
            0 => FaultKind::Spike,
            1 => FaultKind::Step,
            2 => FaultKind::Drift,
            3 => FaultKind::Dropout,
            _ => return None,
        };
        let width = self.window;
        let window_start = window * width;
        let window_end = window_start + width;
        let offset = (hash & 0xFFFF_FFFF) % width;
        let sign = if hash & (1 << 32) == 0 { 1.0 } else { -1.0 };
        let (start, end, magnitude) = match kind {
            FaultKind::Spike => (
                window_start + offset,
                window_start + offset + 1,
                sign * 20.0 * scale,
            ),
            FaultKind::Step => (window_start + offset / 2, window_end, sign * 4.0 * scale),
            FaultKind::Drift => (window_start, window_end, 3.0 * scale),
            FaultKind::Dropout => {
                let seconds = 1 + (hash >> 33) % 3;
                let length = (seconds as f64 * self.rate_hz) as u64;
                let start = window_start + offset;
                (start, (start + length).min(window_end), 0.0)
            }
        };
        Some(Fault {
            kind,
            start,
            end,
            magnitude,
        })
    }
}

const SALT_SENSOR: u64 = 0x5E45_0000_0000_0001;
const SALT_NOISE: u64 = 0x5E45_0000_0000_0002;
const SALT_FAULT: u64 = 0x5E45_0000_0000_0003;

/// A well-mixed 64-bit hash of three words, for counter-based randomness.
fn mix(seed: u64, a: u64, b: u64, salt: u64) -> u64 {
    splitmix(splitmix(splitmix(seed ^ salt) ^ a) ^ b)
}

/// The SplitMix64 finaliser.
fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Mean 0, variance 1, bell-shaped: the sum of four 16-bit uniforms (Irwin–Hall), centred and
/// scaled. Cheaper than Box–Muller and bounded (±3.46), which suits a sensor's noise floor.
fn bell(hash: u64) -> f64 {
    let mut sum = 0.0;
    for shift in [0, 16, 32, 48] {
        sum += (((hash >> shift) & 0xFFFF) as f64 + 0.5) / 65536.0;
    }
    (sum - 2.0) * 3f64.sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_signal_and_another_seed_does_not() {
        let a = SignalModel::new(42, 3, 1000, true);
        let b = SignalModel::new(42, 3, 1000, true);
        let c = SignalModel::new(43, 3, 1000, true);
        let values = |m: &SignalModel| (0..500).map(|k| m.value(1, k)).collect::<Vec<_>>();
        assert_eq!(values(&a), values(&b));
        assert_ne!(values(&a), values(&c));
    }

    #[test]
    fn readings_are_quantised_and_print_short() {
        let model = SignalModel::new(42, 2, 1000, true);
        for k in 0..2000 {
            let Some(value) = model.value(1, k) else {
                continue;
            };
            let printed = format!("{value:?}");
            assert!(printed.len() <= 12, "{printed}");
            assert_eq!((value * STEPS_PER_UNIT).round() / STEPS_PER_UNIT, value);
        }
    }

    #[test]
    fn signal_looks_like_vibration() {
        let model = SignalModel::new(7, 1, 1000, false);
        let values: Vec<f64> = (0..10_000).filter_map(|k| model.value(0, k)).collect();
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        let rms = (values.iter().map(|v| v * v).sum::<f64>() / values.len() as f64).sqrt();
        assert!(mean.abs() < 0.05, "mean {mean}");
        assert!((0.3..1.5).contains(&rms), "rms {rms}");
    }

    #[test]
    fn noise_is_centred_with_unit_variance() {
        let n = 100_000;
        let samples: Vec<f64> = (0..n).map(|i| bell(splitmix(i))).collect();
        let mean = samples.iter().sum::<f64>() / n as f64;
        let variance = samples.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((variance - 1.0).abs() < 0.02, "variance {variance}");
    }

    #[test]
    fn every_fault_kind_is_scheduled_and_applied() {
        let with = SignalModel::new(42, 10, 100, true);
        let without = SignalModel::new(42, 10, 100, false);
        let mut seen = Vec::new();
        for sensor in 0..10 {
            for window in 0..20 {
                let Some(fault) = with.fault(sensor, window) else {
                    continue;
                };
                seen.push(fault.kind);
                let inside = fault.start + (fault.end - fault.start) / 2;
                let (faulty, clean) = (with.value(sensor, inside), without.value(sensor, inside));
                match fault.kind {
                    FaultKind::Dropout => assert_eq!((faulty, clean.is_some()), (None, true)),
                    _ => {
                        let offset = faulty.zip(clean).map(|(f, c)| f - c).expect("values");
                        assert!(offset.abs() > 0.1, "{fault:?} offset {offset}");
                    }
                }
                let after = fault.end;
                if after % with.window != 0 {
                    assert_eq!(with.value(sensor, after), without.value(sensor, after));
                }
            }
        }
        for kind in [
            FaultKind::Spike,
            FaultKind::Step,
            FaultKind::Drift,
            FaultKind::Dropout,
        ] {
            assert!(seen.contains(&kind), "{kind:?} never scheduled in {seen:?}");
        }
    }
}
