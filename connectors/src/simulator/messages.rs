//! The simulator's signal as JSON messages, the way sensors send them: for the MQTT
//! publisher of `weir demo`, the benchmarks and tests.
//!
//! Time advances in ticks of `block_size` samples. Per tick and sensor there is either one
//! block message (`{"t0":...,"rate_hz":...,"samples":[...]}`; a dropout splits it into runs)
//! or one message per sample (`{"ts":...,"v":...}`). Times are epoch milliseconds. Floats are
//! written in their shortest round-trip form, so a decoder reads back exactly the model's
//! values.

use std::io::Write;

use super::SignalModel;

/// How samples are grouped into messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageShape {
    /// One message per sample.
    Rows,
    /// One message per tick and sensor (more where a dropout splits the block).
    Blocks,
}

/// Encodes ticks of a [`SignalModel`] as JSON messages.
pub struct SensorMessages {
    model: SignalModel,
    rate_hz: u32,
    block_size: u32,
    start_ms: i64,
    shape: MessageShape,
    /// `"sensor":"s0001",` per sensor when the sensor goes in the payload, else empty.
    sensor_fields: Vec<String>,
    float: ryu::Buffer,
    message: Vec<u8>,
}

impl SensorMessages {
    /// Messages for `model`'s sensors starting at `start_ms`. With `sensor_field`, each
    /// message names its sensor (`"sensor":"s0001"`); without, the topic must.
    pub fn new(
        model: SignalModel,
        rate_hz: u32,
        block_size: u32,
        start_ms: i64,
        shape: MessageShape,
        sensor_field: bool,
    ) -> Self {
        let sensor_fields = (0..model.sensors() as u32)
            .map(|i| {
                if sensor_field {
                    format!(r#""sensor":"{}","#, super::sensor_id(i))
                } else {
                    String::new()
                }
            })
            .collect();
        Self {
            model,
            rate_hz,
            block_size: block_size.max(1),
            start_ms,
            shape,
            sensor_fields,
            float: ryu::Buffer::new(),
            message: Vec::with_capacity(4096),
        }
    }

    pub fn sensors(&self) -> usize {
        self.model.sensors()
    }

    pub fn model(&self) -> &SignalModel {
        &self.model
    }

    /// Samples per tick and sensor.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Epoch milliseconds of sample `sample`.
    fn time_ms(&self, sample: u64) -> i64 {
        self.start_ms + (sample * 1000 / u64::from(self.rate_hz)) as i64
    }

    /// Calls `emit(sensor, message)` for every message of `tick`; returns the samples sent.
    pub fn tick(&mut self, tick: u64, mut emit: impl FnMut(usize, &[u8])) -> u64 {
        let block = u64::from(self.block_size);
        let first = tick * block;
        let mut samples = 0;
        for sensor in 0..self.model.sensors() {
            match self.shape {
                MessageShape::Rows => {
                    for sample in first..first + block {
                        let Some(v) = self.model.value(sensor, sample) else {
                            continue;
                        };
                        self.message.clear();
                        let _ = write!(
                            self.message,
                            r#"{{{}"ts":{},"v":{}}}"#,
                            self.sensor_fields[sensor],
                            self.time_ms(sample),
                            self.float.format(v)
                        );
                        emit(sensor, &self.message);
                        samples += 1;
                    }
                }
                MessageShape::Blocks => {
                    let mut sample = first;
                    while sample < first + block {
                        if self.model.value(sensor, sample).is_none() {
                            sample += 1;
                            continue;
                        }
                        self.message.clear();
                        let _ = write!(
                            self.message,
                            r#"{{{}"t0":{},"rate_hz":{},"samples":["#,
                            self.sensor_fields[sensor],
                            self.time_ms(sample),
                            self.rate_hz
                        );
                        let mut first_value = true;
                        while sample < first + block {
                            let Some(v) = self.model.value(sensor, sample) else {
                                break;
                            };
                            if !first_value {
                                self.message.push(b',');
                            }
                            first_value = false;
                            self.message
                                .extend_from_slice(self.float.format(v).as_bytes());
                            sample += 1;
                            samples += 1;
                        }
                        self.message.extend_from_slice(b"]}");
                        emit(sensor, &self.message);
                    }
                }
            }
        }
        samples
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_and_rows_carry_the_same_samples() {
        let model = || SignalModel::new(3, 2, 1000, false);
        let mut blocks = SensorMessages::new(model(), 1000, 4, 1_000, MessageShape::Blocks, true);
        let mut messages = Vec::new();
        let samples = blocks.tick(1, |sensor, m| {
            messages.push((sensor, String::from_utf8_lossy(m).into_owned()))
        });
        assert_eq!(samples, 8);
        assert_eq!(messages.len(), 2);
        let text = |sample| {
            ryu::Buffer::new()
                .format(model().value(0, sample).expect("v"))
                .to_owned()
        };
        let expected_first = format!(
            r#"{{"sensor":"s0001","t0":1004,"rate_hz":1000,"samples":[{},{},{},{}]}}"#,
            text(4),
            text(5),
            text(6),
            text(7),
        );
        assert_eq!(messages[0], (0, expected_first));

        let mut rows = SensorMessages::new(model(), 1000, 4, 1_000, MessageShape::Rows, false);
        let mut row_messages = Vec::new();
        assert_eq!(
            rows.tick(1, |_, m| row_messages
                .push(String::from_utf8_lossy(m).into_owned())),
            8
        );
        assert_eq!(row_messages[1], format!(r#"{{"ts":1005,"v":{}}}"#, text(5)));
    }
}
