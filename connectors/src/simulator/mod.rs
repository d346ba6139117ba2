//! The built-in sensor simulator: vibration telemetry from a fleet of synthetic sensors, with
//! injected faults for the detectors to find, reproducible from a seed.
//!
//! ```text
//! tick n ──> one batch: for each sensor s0001.., block_size samples (sensor-major order)
//!            event time of sample k = start + floor(k · 1e9 / rate_hz) ns
//! ```
//!
//! The simulator fills three columns of whatever schema the SQL declared: the key (the first
//! `TEXT` column) with sensor ids, the event time (the `WATERMARK` column, else the first
//! `TIMESTAMP`) and the reading (the first `DOUBLE`). Other columns are null, so they must be
//! nullable. The values come from [`SignalModel`]; [`sample_value`] recomputes any of them
//! independently, which is how benchmarks check the engine's results.
//!
//! With `payload = 'json'` or `'json_blocks'` each tick is encoded as JSON and decoded back
//! through [`JsonDecoder`], so a benchmark pays for decoding as it would with real payloads.
//! Block payloads give the same rows except that, when `1e9 / rate_hz` is not a whole number,
//! event times may differ by a nanosecond (the decoder counts from each block's `t0`).

mod config;
pub mod messages;
mod signal;

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{
    ArrayBuilder, ArrayRef, Float64Builder, RecordBatch, StringBuilder, TimestampNanosecondBuilder,
    new_null_array,
};
use arrow::datatypes::{DataType, Schema, SchemaRef, TimeUnit as ArrowTimeUnit};
use tokio::time::Instant;

pub use self::config::{DEFAULT_START, SimulatorConfig, SimulatorPayload};
pub use self::messages::{MessageShape, SensorMessages};
pub use self::signal::{FAULT_WINDOW_SECONDS, Fault, FaultKind, RESOLUTION, SignalModel};
use crate::dead_letter::DeadLetterQueue;
use crate::decode::{DecodeOptions, JsonDecoder};
use crate::error::{ConnectorError, Result};
use crate::registry::{ConnectorSpec, SourceConnector, parse_options};
use crate::time::format_rfc3339;
use crate::{Source, SourceEvent, SourceFuture};

/// The `simulator` source connector.
pub const SOURCE: SourceConnector = SourceConnector {
    name: "simulator",
    validate,
    build,
};

/// Dead letters from the simulator's own JSON (there should be none) carry this source name.
const DEAD_LETTER_SOURCE: &str = "simulator";

/// Sample `sample` (0-based, counted from the start) of sensor `sensor` (0-based) as the
/// simulator configured by `config` produces it; `None` during a dropout.
///
/// Builds a [`SignalModel`] per call: to check many values, build one and call
/// [`SignalModel::value`].
pub fn sample_value(config: &SimulatorConfig, sensor: u32, sample: u64) -> Option<f64> {
    SignalModel::new(config.seed, config.sensors, config.rate_hz, config.faults)
        .value(sensor as usize, sample)
}

/// Event time of sample `sample` for a simulator starting at `start_nanos`.
pub fn sample_time(start_nanos: i64, rate_hz: u32, sample: u64) -> i64 {
    const NANOS: u64 = 1_000_000_000;
    let rate = u64::from(rate_hz.max(1));
    // Most rates divide a second evenly; the 128-bit division is only for the others, as it
    // costs more than computing the sample's value.
    if NANOS.is_multiple_of(rate)
        && let Some(offset) = sample
            .checked_mul(NANOS / rate)
            .and_then(|o| i64::try_from(o).ok())
    {
        return start_nanos.saturating_add(offset);
    }
    let offset = i128::from(sample) * i128::from(NANOS) / i128::from(rate);
    i64::try_from(i128::from(start_nanos) + offset).unwrap_or(i64::MAX)
}

/// The id of sensor `index` (0-based): `s0001`, `s0002`, ...
pub fn sensor_id(index: u32) -> String {
    format!("s{:04}", u64::from(index) + 1)
}

/// Which columns of the declared schema the simulator fills.
#[derive(Debug, Clone, Copy)]
struct Layout {
    key: Option<usize>,
    time: Option<usize>,
    value: usize,
}

impl Layout {
    fn of(schema: &Schema, event_time: Option<&str>) -> Result<Self> {
        let fields = schema.fields();
        let first =
            |wanted: fn(&DataType) -> bool| fields.iter().position(|f| wanted(f.data_type()));
        let is_time = |t: &DataType| matches!(t, DataType::Timestamp(ArrowTimeUnit::Nanosecond, _));
        let time = match event_time {
            Some(name) => Some(
                schema
                    .index_of(name)
                    .ok()
                    .filter(|&i| is_time(fields[i].data_type()))
                    .ok_or_else(|| {
                        ConnectorError::config(
                            "simulator",
                            format!("event-time column '{name}' must be a TIMESTAMP column"),
                        )
                    })?,
            ),
            None => first(is_time),
        };
        let layout = Self {
            key: first(|t| *t == DataType::Utf8),
            time,
            value: first(|t| *t == DataType::Float64).ok_or_else(|| {
                ConnectorError::config(
                    "simulator",
                    "the schema needs a DOUBLE column for the readings",
                )
            })?,
        };
        for (i, field) in fields.iter().enumerate() {
            if !field.is_nullable()
                && ![layout.key, layout.time, Some(layout.value)].contains(&Some(i))
            {
                return Err(ConnectorError::config(
                    "simulator",
                    format!(
                        "column '{}' is NOT NULL but the simulator only fills the sensor id, \
                         event time and reading; make it nullable",
                        field.name()
                    ),
                ));
            }
        }
        Ok(layout)
    }
}

fn validate(spec: &ConnectorSpec, schema: &Schema) -> Result<()> {
    let config: SimulatorConfig = parse_options("simulator", spec)?;
    config.validate()?;
    Layout::of(schema, spec.event_time.as_deref()).map(drop)
}

fn build(
    spec: &ConnectorSpec,
    schema: SchemaRef,
    dead_letters: DeadLetterQueue,
) -> Result<Box<dyn Source>> {
    let config: SimulatorConfig = parse_options("simulator", spec)?;
    Ok(Box::new(SimulatorSource::new(
        config,
        schema,
        spec.event_time.as_deref(),
        dead_letters,
    )?))
}

/// The simulator as a [`Source`]; see the module docs.
///
/// Cancel-safe: a generated batch waits in the source until it is returned, so a dropped
/// `next_event` (during a realtime sleep) loses nothing.
#[derive(Debug)]
pub struct SimulatorSource {
    config: SimulatorConfig,
    schema: SchemaRef,
    layout: Layout,
    model: SignalModel,
    sensor_ids: Vec<String>,
    /// Event-time origin; resolved on the first poll in realtime mode without `start`.
    start: Option<i64>,
    tick: u64,
    total_samples: Option<u64>,
    /// Realtime mode: when tick 0 began on the wall clock, as an instant and in UTC
    /// nanoseconds (which a checkpoint keeps, so a resumed source keeps the same pace).
    wall_start: Option<Instant>,
    wall_origin: Option<i64>,
    /// A generated batch, when it is due, and the tick after it.
    pending: Option<(RecordBatch, Option<Instant>, u64)>,
    /// The tick after the last batch returned: the source's position.
    returned: u64,
    json: Option<JsonPayloads>,
    dead_letters: DeadLetterQueue,
}

/// The JSON encoding of ticks and the decoder they go back through.
#[derive(Debug)]
struct JsonPayloads {
    decoder: JsonDecoder,
    blocks: bool,
    /// `"sensor":` and friends, escaped once.
    key_field: Option<String>,
    time_field: Option<String>,
    value_field: String,
    payload: String,
}

impl SimulatorSource {
    /// A simulator filling `schema`; `event_time` names the event-time column, if any.
    pub fn new(
        config: SimulatorConfig,
        schema: SchemaRef,
        event_time: Option<&str>,
        dead_letters: DeadLetterQueue,
    ) -> Result<Self> {
        config.validate()?;
        let layout = Layout::of(&schema, event_time)?;
        let json = match config.payload {
            SimulatorPayload::Arrow => None,
            payload => Some(JsonPayloads::new(
                &schema,
                layout,
                payload == SimulatorPayload::JsonBlocks,
            )?),
        };
        let start = match (config.start_nanos()?, config.realtime) {
            (Some(start), _) => Some(start),
            (None, true) => None,
            (None, false) => Some(config.reproducible_start_nanos()?),
        };
        Ok(Self {
            model: SignalModel::new(config.seed, config.sensors, config.rate_hz, config.faults),
            sensor_ids: (0..config.sensors).map(sensor_id).collect(),
            total_samples: config.total_samples(),
            config,
            schema,
            layout,
            start,
            tick: 0,
            wall_start: None,
            wall_origin: None,
            pending: None,
            returned: 0,
            json,
            dead_letters,
        })
    }

    async fn next(&mut self) -> Result<SourceEvent> {
        if self.pending.is_none() {
            match self.generate()? {
                Some(batch) => {
                    let due = self.wall_start.map(|wall| {
                        let seconds = (self.tick * u64::from(self.config.block_size)) as f64
                            / f64::from(self.config.rate_hz);
                        wall + Duration::from_secs_f64(seconds)
                    });
                    self.pending = Some((batch, due, self.tick));
                }
                None => return Ok(SourceEvent::End),
            }
        }
        if let Some((_, Some(due), _)) = &self.pending {
            tokio::time::sleep_until(*due).await;
        }
        match self.pending.take() {
            Some((batch, _, after)) => {
                self.returned = after;
                Ok(SourceEvent::Batch(batch))
            }
            None => Err(ConnectorError::Internal(
                "simulator lost its pending batch".into(),
            )),
        }
    }

    /// Produces the next non-empty tick, or `None` after `duration_s`.
    fn generate(&mut self) -> Result<Option<RecordBatch>> {
        if self.config.realtime && self.wall_start.is_none() {
            let now = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default();
            self.wall_start = Some(Instant::now());
            self.wall_origin = Some(now);
            if self.start.is_none() {
                self.start = Some(now);
            }
        }
        let start = self.start.unwrap_or_default();
        let block = u64::from(self.config.block_size);
        loop {
            let first = self.tick * block;
            let count = match self.total_samples {
                Some(total) => block.min(total.saturating_sub(first)),
                None => block,
            };
            if count == 0 {
                return Ok(None);
            }
            self.tick += 1;
            let samples = first..first + count;
            let batch = match self.json.take() {
                None => self.arrow_tick(start, samples)?,
                Some(mut json) => {
                    let batch = json.tick(self, start, samples);
                    self.json = Some(json);
                    batch?
                }
            };
            if let Some(batch) = batch {
                return Ok(Some(batch));
            }
        }
    }

    fn arrow_tick(&self, start: i64, samples: std::ops::Range<u64>) -> Result<Option<RecordBatch>> {
        let capacity = self.sensor_ids.len() * (samples.end - samples.start) as usize;
        let mut keys = StringBuilder::with_capacity(capacity, capacity * 5);
        let mut times = TimestampNanosecondBuilder::with_capacity(capacity);
        let mut values = Float64Builder::with_capacity(capacity);
        for (sensor, id) in self.sensor_ids.iter().enumerate() {
            for k in samples.clone() {
                if let Some(value) = self.model.value(sensor, k) {
                    keys.append_value(id);
                    times.append_value(sample_time(start, self.config.rate_hz, k));
                    values.append_value(value);
                }
            }
        }
        let rows = values.len();
        if rows == 0 {
            return Ok(None);
        }
        let mut keys = Some(keys.finish());
        let mut times = Some(times.finish());
        let mut values = Some(values.finish());
        let columns = self
            .schema
            .fields()
            .iter()
            .enumerate()
            .map(|(i, field)| -> ArrayRef {
                let filled: Option<ArrayRef> = if Some(i) == self.layout.key {
                    keys.take().map(|a| Arc::new(a) as ArrayRef)
                } else if Some(i) == self.layout.time {
                    let timezone = match field.data_type() {
                        DataType::Timestamp(_, tz) => tz.clone(),
                        _ => None,
                    };
                    times
                        .take()
                        .map(|a| Arc::new(a.with_timezone_opt(timezone)) as ArrayRef)
                } else if i == self.layout.value {
                    values.take().map(|a| Arc::new(a) as ArrayRef)
                } else {
                    None
                };
                filled.unwrap_or_else(|| new_null_array(field.data_type(), rows))
            })
            .collect();
        Ok(Some(RecordBatch::try_new(self.schema.clone(), columns)?))
    }

    /// The signal model, for checking results against it.
    pub fn model(&self) -> &SignalModel {
        &self.model
    }
}

impl JsonPayloads {
    fn new(schema: &Schema, layout: Layout, blocks: bool) -> Result<Self> {
        let name = |i: usize| schema.field(i).name().as_str();
        let field = |i: usize| -> Result<String> {
            let mut key = serde_json::to_string(name(i))
                .map_err(|e| ConnectorError::Internal(format!("encoding a column name: {e}")))?;
            key.push(':');
            Ok(key)
        };
        let options = DecodeOptions {
            value_column: Some(name(layout.value).to_owned()),
            ..DecodeOptions::default()
        };
        Ok(Self {
            decoder: JsonDecoder::new(Arc::new(schema.clone()), layout.time.map(name), options)?,
            blocks,
            key_field: layout.key.map(field).transpose()?,
            time_field: layout.time.map(field).transpose()?,
            value_field: field(layout.value)?,
            payload: String::with_capacity(4096),
        })
    }

    /// Encodes one tick as JSON and decodes it back into a batch.
    fn tick(
        &mut self,
        source: &SimulatorSource,
        start: i64,
        samples: std::ops::Range<u64>,
    ) -> Result<Option<RecordBatch>> {
        let rate = source.config.rate_hz;
        // Shortest round-trip float formatting, several times faster than `{:?}`.
        let mut floats = ryu::Buffer::new();
        for (sensor, id) in source.sensor_ids.iter().enumerate() {
            if self.blocks {
                let mut k = samples.start;
                while k < samples.end {
                    // One block per run of samples between dropouts.
                    self.begin(id);
                    if self.time_field.is_some() {
                        self.payload.push_str("\"t0\":\"");
                        format_rfc3339(sample_time(start, rate, k), &mut self.payload);
                        let _ = write!(self.payload, "\",\"rate_hz\":{rate},");
                    }
                    self.payload.push_str("\"samples\":[");
                    let mut any = false;
                    while k < samples.end {
                        let Some(value) = source.model.value(sensor, k) else {
                            break;
                        };
                        if any {
                            self.payload.push(',');
                        }
                        self.payload.push_str(floats.format(value));
                        any = true;
                        k += 1;
                    }
                    self.payload.push_str("]}");
                    if any {
                        self.decode(&source.dead_letters);
                    }
                    while k < samples.end && source.model.value(sensor, k).is_none() {
                        k += 1;
                    }
                }
            } else {
                for k in samples.clone() {
                    let Some(value) = source.model.value(sensor, k) else {
                        continue;
                    };
                    self.begin(id);
                    if let Some(time_field) = &self.time_field {
                        self.payload.push_str(time_field);
                        self.payload.push('"');
                        format_rfc3339(sample_time(start, rate, k), &mut self.payload);
                        self.payload.push_str("\",");
                    }
                    self.payload.push_str(&self.value_field);
                    self.payload.push_str(floats.format(value));
                    self.payload.push('}');
                    self.decode(&source.dead_letters);
                }
            }
        }
        self.decoder.flush()
    }

    /// Starts an object with the sensor id field.
    fn begin(&mut self, id: &str) {
        self.payload.clear();
        self.payload.push('{');
        if let Some(key_field) = &self.key_field {
            self.payload.push_str(key_field);
            self.payload.push('"');
            self.payload.push_str(id);
            self.payload.push_str("\",");
        }
    }

    fn decode(&mut self, dead_letters: &DeadLetterQueue) {
        if let Err(reason) = self.decoder.decode_record(self.payload.as_bytes()) {
            dead_letters.push(
                DEAD_LETTER_SOURCE,
                &reason.to_string(),
                self.payload.as_bytes(),
            );
        }
    }
}

impl Source for SimulatorSource {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn next_event(&mut self) -> SourceFuture<'_> {
        Box::pin(self.next())
    }

    /// The event-time origin, the next tick and (realtime) when tick 0 was due: 24 bytes.
    fn position(&self) -> Option<Vec<u8>> {
        let start = self.start?;
        // Signed times keep their bit patterns.
        Some(crate::position::encode(&[
            start as u64,
            self.returned,
            self.wall_origin.unwrap_or(i64::MIN) as u64,
        ]))
    }

    /// Goes on with the tick after `position`. In realtime mode a tick is due when the wall
    /// clock reaches its event time, so a source resumed after a crash catches up at full
    /// speed and then keeps pace again.
    fn seek(&mut self, position: &[u8]) -> Result<()> {
        let Some([start, tick, origin]) = crate::position::decode(position) else {
            return Err(ConnectorError::config(
                "simulator",
                "the checkpointed position is not a simulator position",
            ));
        };
        let (start, origin) = (start as i64, origin as i64);
        self.start = Some(start);
        self.tick = tick;
        self.returned = tick;
        self.pending = None;
        if self.config.realtime {
            let now = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default();
            let origin = if origin == i64::MIN { now } else { origin };
            let since = Duration::from_nanos(now.saturating_sub(origin).max(0) as u64);
            self.wall_origin = Some(origin);
            self.wall_start = Some(
                Instant::now()
                    .checked_sub(since)
                    .unwrap_or_else(Instant::now),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Field, Float64Type, TimestampNanosecondType};

    use super::*;
    use crate::decode::test_support::{table, vibration_schema};

    fn simulator(config: SimulatorConfig) -> SimulatorSource {
        SimulatorSource::new(
            config,
            vibration_schema(),
            Some("ts"),
            DeadLetterQueue::default(),
        )
        .expect("simulator")
    }

    async fn batches(source: &mut SimulatorSource, limit: usize) -> Vec<RecordBatch> {
        let mut out = Vec::new();
        while out.len() < limit {
            match source.next_event().await {
                Ok(SourceEvent::Batch(batch)) => out.push(batch),
                Ok(SourceEvent::End) => break,
                Err(error) => panic!("simulator failed: {error}"),
            }
        }
        out
    }

    fn small() -> SimulatorConfig {
        SimulatorConfig {
            sensors: 3,
            rate_hz: 100,
            block_size: 50,
            ..SimulatorConfig::default()
        }
    }

    #[tokio::test]
    async fn one_batch_per_tick_with_every_sensor_block() {
        let mut source = simulator(SimulatorConfig {
            faults: false,
            ..small()
        });
        let first = batches(&mut source, 2).await;
        assert_eq!(first[0].num_rows(), 150);
        let rows = table(&first[1]);
        assert!(
            rows[3].starts_with("| s0001  | 2024-01-01T00:00:00.500 |"),
            "{}",
            rows[3]
        );
        assert!(
            rows[152].starts_with("| s0003  | 2024-01-01T00:00:00.990 |"),
            "{}",
            rows[152]
        );
    }

    #[tokio::test]
    async fn same_seed_same_batches_and_another_seed_differs() {
        let a = batches(&mut simulator(small()), 5).await;
        let b = batches(&mut simulator(small()), 5).await;
        let c = batches(&mut simulator(SimulatorConfig { seed: 7, ..small() }), 5).await;
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[tokio::test]
    async fn values_match_the_pure_sample_function_including_dropouts() {
        let config = SimulatorConfig {
            duration_s: Some(60.0),
            block_size: 500,
            ..small()
        };
        let model = SignalModel::new(config.seed, config.sensors, config.rate_hz, true);
        let dropped: u64 = (0..3usize)
            .flat_map(|s| (0..6000).map(move |k| (s, k)))
            .filter(|&(s, k)| model.value(s, k).is_none())
            .count() as u64;
        assert!(
            dropped > 0,
            "seed 42 schedules a dropout in the first minute"
        );

        let all = batches(&mut simulator(config.clone()), usize::MAX).await;
        let rows: usize = all.iter().map(RecordBatch::num_rows).sum();
        assert_eq!(rows as u64, 3 * 6000 - dropped);
        let start = config.reproducible_start_nanos().expect("start");
        for batch in &all {
            let ids = batch.column(0).as_string::<i32>();
            let times = batch.column(1).as_primitive::<TimestampNanosecondType>();
            let values = batch.column(2).as_primitive::<Float64Type>();
            for row in 0..batch.num_rows() {
                let sensor: u32 = ids.value(row)[1..].parse::<u32>().expect("id") - 1;
                let k = ((times.value(row) - start) / 10_000_000) as u64;
                assert_eq!(times.value(row), sample_time(start, 100, k));
                assert_eq!(Some(values.value(row)), sample_value(&config, sensor, k));
            }
        }
    }

    #[tokio::test]
    async fn json_payloads_decode_to_the_same_batches() {
        let arrow = batches(&mut simulator(small()), 4).await;
        for payload in [SimulatorPayload::Json, SimulatorPayload::JsonBlocks] {
            let dlq = DeadLetterQueue::default();
            let mut source = SimulatorSource::new(
                SimulatorConfig { payload, ..small() },
                vibration_schema(),
                Some("ts"),
                dlq.clone(),
            )
            .expect("simulator");
            assert_eq!(batches(&mut source, 4).await, arrow, "{payload:?}");
            assert_eq!(dlq.count(), 0);
        }
    }

    #[tokio::test]
    async fn a_source_resumed_from_its_position_continues_with_the_same_batches() {
        let mut whole = simulator(small());
        let all = batches(&mut whole, 6).await;
        let mut first = simulator(small());
        let head = batches(&mut first, 2).await;
        let position = first.position().expect("a position after two batches");
        let mut resumed = simulator(small());
        resumed.seek(&position).expect("seek");
        let tail = batches(&mut resumed, 4).await;
        assert_eq!(head, all[..2].to_vec());
        assert_eq!(tail, all[2..].to_vec());
        assert!(resumed.seek(b"short").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn realtime_paces_ticks_to_the_wall_clock() {
        let config = SimulatorConfig {
            realtime: true,
            duration_s: Some(2.0),
            ..small()
        };
        let started = Instant::now();
        let all = batches(&mut simulator(config), usize::MAX).await;
        assert_eq!(all.len(), 4);
        assert_eq!(Instant::now() - started, Duration::from_secs(2));
    }

    #[test]
    fn schema_requirements_are_config_errors() {
        let check = |fields: Vec<Field>| {
            Layout::of(&Schema::new(fields), None)
                .map(drop)
                .map_err(|e| e.to_string())
        };
        assert_eq!(
            check(vec![Field::new("sensor", DataType::Utf8, false)]),
            Err("simulator: the schema needs a DOUBLE column for the readings".to_owned())
        );
        assert!(
            check(vec![
                Field::new("v", DataType::Float64, false),
                Field::new("site", DataType::Int32, false)
            ])
            .is_err_and(|e| e.contains("column 'site' is NOT NULL"))
        );
        assert_eq!(
            check(vec![
                Field::new("v", DataType::Float64, false),
                Field::new("site", DataType::Int32, true)
            ]),
            Ok(())
        );
        let only_values = Arc::new(Schema::new(vec![Field::new("v", DataType::Float64, false)]));
        let mut source =
            SimulatorSource::new(small(), only_values, None, DeadLetterQueue::default())
                .expect("simulator");
        assert!(
            source
                .generate()
                .ok()
                .flatten()
                .is_some_and(|b| b.column(0).null_count() == 0)
        );
    }
}
