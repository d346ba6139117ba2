//! Criterion micro-benchmarks of the hot path: JSON decoding (single samples and 100-sample
//! blocks), a filter, and 1-second tumbling window aggregation, each on realistic batches.
//! Run with `cargo bench --bench micro`; throughput is reported in samples.

use std::hint::black_box;
use std::sync::Arc;

use arrow::array::{Float64Array, RecordBatch, StringArray, TimestampNanosecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use weir_connectors::decode::{DecodeOptions, JsonDecoder};
use weir_operators::{Collector, ExprDecoder, Operator, Watermark};

const SENSORS: usize = 100;
const BLOCK: usize = 100;

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("sensor", DataType::Utf8, false),
        Field::new("ts", DataType::Timestamp(TimeUnit::Nanosecond, None), false),
        Field::new("v", DataType::Float64, true),
    ]))
}

fn value(sensor: usize, sample: usize) -> f64 {
    ((sample as f64) * 0.314 + sensor as f64).sin() * 0.8 + 0.01 * (sample % 7) as f64
}

fn payloads_rows(samples: usize) -> Vec<Vec<u8>> {
    (0..samples)
        .map(|i| {
            let (sensor, sample) = (i % SENSORS, i / SENSORS);
            format!(
                r#"{{"sensor":"s{sensor:04}","ts":{},"v":{}}}"#,
                1_704_067_200_000 + sample,
                value(sensor, sample)
            )
            .into_bytes()
        })
        .collect()
}

fn payloads_blocks(blocks: usize) -> Vec<Vec<u8>> {
    (0..blocks)
        .map(|b| {
            let (sensor, tick) = (b % SENSORS, b / SENSORS);
            let samples: Vec<String> = (0..BLOCK)
                .map(|i| value(sensor, tick * BLOCK + i).to_string())
                .collect();
            format!(
                r#"{{"sensor":"s{sensor:04}","t0":{},"rate_hz":1000,"samples":[{}]}}"#,
                1_704_067_200_000 + tick * BLOCK,
                samples.join(",")
            )
            .into_bytes()
        })
        .collect()
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    let rows = payloads_rows(10_000);
    group.throughput(Throughput::Elements(rows.len() as u64));
    group.bench_function("json_rows", |b| {
        let mut decoder =
            JsonDecoder::new(schema(), Some("ts"), DecodeOptions::default()).expect("decoder");
        b.iter(|| {
            for payload in &rows {
                let _ = decoder.decode_record(black_box(payload));
            }
            black_box(decoder.flush().expect("flush"))
        });
    });
    let blocks = payloads_blocks(100);
    group.throughput(Throughput::Elements((blocks.len() * BLOCK) as u64));
    group.bench_function("json_blocks", |b| {
        let mut decoder =
            JsonDecoder::new(schema(), Some("ts"), DecodeOptions::default()).expect("decoder");
        b.iter(|| {
            for payload in &blocks {
                let _ = decoder.decode_record(black_box(payload));
            }
            black_box(decoder.flush().expect("flush"))
        });
    });
    group.finish();
}

/// One second of 100 sensors at 1 kHz, in ten batches of 100-sample blocks; `interleaved`:
/// the sensors take turns sample by sample, as single-sample messages arrive.
fn batches(interleaved: bool) -> Vec<RecordBatch> {
    (0..10)
        .map(|tick| {
            let mut sensors = Vec::with_capacity(SENSORS * BLOCK);
            let mut times = Vec::with_capacity(SENSORS * BLOCK);
            let mut values = Vec::with_capacity(SENSORS * BLOCK);
            for n in 0..SENSORS * BLOCK {
                let (sensor, i) = match interleaved {
                    true => (n % SENSORS, n / SENSORS),
                    false => (n / BLOCK, n % BLOCK),
                };
                let sample = tick * BLOCK + i;
                sensors.push(format!("s{sensor:04}"));
                times.push(sample as i64 * 1_000_000);
                values.push(value(sensor, sample));
            }
            RecordBatch::try_new(
                schema(),
                vec![
                    Arc::new(StringArray::from(sensors)),
                    Arc::new(TimestampNanosecondArray::from(times)),
                    Arc::new(Float64Array::from(values)),
                ],
            )
            .expect("batch")
        })
        .collect()
}

fn plan_of(sql_select: &str) -> weir_proto::plan::PipelinePlan {
    let sql = format!(
        "CREATE SOURCE vibration (sensor TEXT NOT NULL, ts TIMESTAMP NOT NULL, v DOUBLE,
            WATERMARK FOR ts AS ts - INTERVAL '2' SECOND)
         WITH (connector = 'simulator');
         CREATE SINK out WITH (connector = 'null');
         CREATE PIPELINE p AS INSERT INTO out {sql_select};"
    );
    weir_planner::compile(&sql)
        .expect("compiles")
        .pipelines
        .remove(0)
}

/// Fresh operators for a plan: built outside the measured part of each iteration.
fn build(plan: &weir_proto::plan::PipelinePlan, decoder: &ExprDecoder) -> Vec<Box<dyn Operator>> {
    plan.operators
        .iter()
        .map(|n| weir_operators::build(n, decoder).expect("builds"))
        .collect()
}

fn run(operators: &mut [Box<dyn Operator>], batches: &[RecordBatch]) -> usize {
    let mut rows = 0;
    for batch in batches {
        let mut pending = vec![batch.clone()];
        for operator in operators.iter_mut() {
            let mut out = Collector::default();
            for input in pending {
                operator.process_batch(input, &mut out).expect("process");
            }
            pending = out.take_batches();
        }
        rows += pending.iter().map(RecordBatch::num_rows).sum::<usize>();
    }
    let mut pending = Vec::new();
    for operator in operators.iter_mut() {
        let mut out = Collector::default();
        for input in pending {
            operator.process_batch(input, &mut out).expect("process");
        }
        operator
            .on_watermark(Watermark::END, &mut out)
            .expect("watermark");
        pending = out.take_batches();
    }
    rows + pending.iter().map(RecordBatch::num_rows).sum::<usize>()
}

fn operators(c: &mut Criterion) {
    let input = batches(false);
    let samples = input.iter().map(RecordBatch::num_rows).sum::<usize>() as u64;
    let mut group = c.benchmark_group("operators");
    group.throughput(Throughput::Elements(samples));
    let decoder = ExprDecoder::new();
    let filter = plan_of("SELECT sensor, ts, v FROM vibration WHERE abs(v) > 0.5");
    group.bench_function("filter", |b| {
        b.iter_batched(
            || build(&filter, &decoder),
            |mut ops| black_box(run(&mut ops, &input)),
            BatchSize::SmallInput,
        );
    });
    let window = plan_of(
        "SELECT sensor, window_start, sqrt(avg(v * v)) AS rms, max(abs(v)) AS peak, count(*) AS n
         FROM TUMBLE(vibration, ts, INTERVAL '1' SECOND) GROUP BY sensor, window_start",
    );
    group.bench_function("tumble_rms_peak", |b| {
        b.iter_batched(
            || build(&window, &decoder),
            |mut ops| black_box(run(&mut ops, &input)),
            BatchSize::SmallInput,
        );
    });
    let interleaved = batches(true);
    group.bench_function("tumble_rms_peak_interleaved", |b| {
        b.iter_batched(
            || build(&window, &decoder),
            |mut ops| black_box(run(&mut ops, &interleaved)),
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

criterion_group!(benches, decode, operators);
criterion_main!(benches);
