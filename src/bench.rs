//! `weir bench`: workload V, S sensors x 1 kHz vibration -> 1-second tumbling RMS and peak per
//! sensor, in-process: a publisher thread encodes the simulator's signal as JSON payloads, a
//! payload source decodes them into Arrow, the real planner and engine aggregate, and every
//! result is checked against a direct computation from the signal model.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Float64Type, Int64Type, TimestampNanosecondType};
use serde::Serialize;
use weir_connectors::decode::DecodeOptions;
use weir_connectors::payload::{PayloadSource, Payloads};
use weir_connectors::simulator::{SignalModel, SimulatorConfig};
use weir_connectors::{DeadLetterQueue, Sink};
use weir_engine::{
    Engine, EngineOptions, PipelineFactory, PipelineParts, PipelineState, PlanFactory,
};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Which scenario to run: json-rows, blocks or all.
    #[arg(long, default_value = "all")]
    scenario: String,
    /// Number of simulated 1 kHz sensors.
    #[arg(long, default_value_t = 100)]
    sensors: u32,
    /// Seconds of event time to simulate per scenario.
    #[arg(long, default_value_t = 20)]
    seconds: u32,
    /// Print one JSON object per scenario instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct ScenarioResult {
    scenario: String,
    samples: u64,
    seconds: f64,
    samples_per_sec: f64,
    /// Watermark created at the source -> closed window emitted by the window operator.
    p50_ms: f64,
    p99_ms: f64,
    peak_rss_mb: f64,
    windows: usize,
    correct: bool,
}

fn bench_schema() -> arrow::datatypes::SchemaRef {
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    Arc::new(Schema::new(vec![
        Field::new("sensor", DataType::Utf8, false),
        Field::new("ts", DataType::Timestamp(TimeUnit::Nanosecond, None), false),
        Field::new("v", DataType::Float64, true),
    ]))
}

/// Encodes the simulator's signal as JSON payloads (epoch-millisecond times) and sends them in
/// chunks: one payload per sample, or one per run of samples of a 100-sample block (a dropout
/// splits a block). Returns when everything is sent.
fn publish(
    sender: &tokio::sync::mpsc::Sender<Payloads>,
    sensors: u32,
    seconds: u32,
    blocks: bool,
) -> anyhow::Result<()> {
    use std::io::Write;
    let config = SimulatorConfig {
        sensors,
        seed: 42,
        faults: true,
        ..SimulatorConfig::default()
    };
    let model = SignalModel::new(config.seed, config.sensors, config.rate_hz, config.faults);
    let start_ms = config.reproducible_start_nanos()? / 1_000_000;
    let ids: Vec<String> = (0..sensors)
        .map(weir_connectors::simulator::sensor_id)
        .collect();
    let mut float = ryu::Buffer::new();
    let ticks = u64::from(seconds) * 10;
    for tick in 0..ticks {
        let mut chunk = Payloads::with_capacity(
            if blocks {
                sensors as usize
            } else {
                sensors as usize * 100
            },
            1 << 16,
        );
        for (sensor, id) in ids.iter().enumerate() {
            let first = tick * 100;
            if blocks {
                let mut sample = first;
                while sample < first + 100 {
                    if model.value(sensor, sample).is_none() {
                        sample += 1;
                        continue;
                    }
                    let run_start = sample;
                    chunk.push_with(|out| {
                        let _ = write!(
                            out,
                            r#"{{"sensor":"{id}","t0":{},"rate_hz":1000,"samples":["#,
                            start_ms + run_start as i64
                        );
                        let mut first_value = true;
                        while sample < first + 100 {
                            let Some(v) = model.value(sensor, sample) else {
                                break;
                            };
                            if !first_value {
                                out.push(b',');
                            }
                            first_value = false;
                            out.extend_from_slice(float.format(v).as_bytes());
                            sample += 1;
                        }
                        out.extend_from_slice(b"]}");
                    });
                }
            } else {
                for sample in first..first + 100 {
                    if let Some(v) = model.value(sensor, sample) {
                        chunk.push_with(|out| {
                            let _ = write!(
                                out,
                                r#"{{"sensor":"{id}","ts":{},"v":{}}}"#,
                                start_ms + sample as i64,
                                float.format(v)
                            );
                        });
                    }
                }
            }
        }
        sender
            .blocking_send(chunk)
            .map_err(|_| anyhow::anyhow!("the pipeline stopped reading"))?;
    }
    Ok(())
}

const SQL: &str = "
CREATE SOURCE vibration (
    sensor TEXT NOT NULL,
    ts     TIMESTAMP NOT NULL,
    v      DOUBLE,
    WATERMARK FOR ts AS ts - INTERVAL '2' SECOND
) WITH (connector = 'simulator', sensors = {sensors}, rate_hz = 1000, block_size = 100,
        duration_s = {seconds}, seed = 42, faults = true, payload = '{payload}');
CREATE SINK results WITH (connector = 'null');
CREATE PIPELINE vibration_rms AS
INSERT INTO results
SELECT sensor, window_start, sqrt(avg(v * v)) AS rms, max(abs(v)) AS peak, count(*) AS samples
FROM TUMBLE(vibration, ts, INTERVAL '1' SECOND)
GROUP BY sensor, window_start;
";

pub fn bench(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let scenarios: Vec<(&str, &str)> = match args.scenario.as_str() {
        "all" => vec![("json-rows", "json"), ("blocks", "json_blocks")],
        "json-rows" => vec![("json-rows", "json")],
        "blocks" => vec![("blocks", "json_blocks")],
        other => bail!("unknown scenario '{other}': use json-rows, blocks or all"),
    };
    if args.sensors == 0 || args.seconds == 0 {
        bail!("--sensors and --seconds must be positive");
    }
    if cfg!(debug_assertions) {
        eprintln!(
            "note: this is a debug build; run `cargo run --release -- bench` for real figures"
        );
    }
    let mut results = Vec::new();
    for (name, payload) in scenarios {
        let result = run_scenario(name, payload, &args)?;
        if args.json {
            println!("{}", serde_json::to_string(&result)?);
        }
        results.push(result);
    }
    if !args.json {
        println!(
            "{:<10} {:>12} {:>8} {:>14} {:>8} {:>8} {:>9} {:>8} {:>8}",
            "scenario",
            "samples",
            "seconds",
            "samples/s",
            "p50 ms",
            "p99 ms",
            "peak MB",
            "windows",
            "correct"
        );
        for r in &results {
            println!(
                "{:<10} {:>12} {:>8.2} {:>14.0} {:>8.3} {:>8.3} {:>9.1} {:>8} {:>8}",
                r.scenario,
                r.samples,
                r.seconds,
                r.samples_per_sec,
                r.p50_ms,
                r.p99_ms,
                r.peak_rss_mb,
                r.windows,
                r.correct
            );
        }
    }
    Ok(if results.iter().all(|r| r.correct) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The plan's parts with the simulator swapped for a source fed by the publisher thread, and
/// the null sink for one that keeps the results to check.
struct CheckedFactory {
    plan: PlanFactory,
    source: Mutex<Option<PayloadSource>>,
    results: Arc<Mutex<Vec<RecordBatch>>>,
}

impl PipelineFactory for CheckedFactory {
    fn stage_names(&self) -> Vec<String> {
        self.plan.stage_names()
    }

    fn build(&self) -> weir_engine::Result<PipelineParts> {
        let mut parts = self.plan.build()?;
        let source = self
            .source
            .lock()
            .ok()
            .and_then(|mut s| s.take())
            .ok_or_else(|| {
                weir_engine::EngineError::Internal(
                    "the bench pipeline cannot restart: its publisher is gone".into(),
                )
            })?;
        parts.source = Box::new(source);
        parts.sink = Box::new(CollectingSink(Arc::clone(&self.results)));
        Ok(parts)
    }
}

struct CollectingSink(Arc<Mutex<Vec<RecordBatch>>>);

impl Sink for CollectingSink {
    fn write_batch(&mut self, batch: &RecordBatch) -> weir_connectors::Result<()> {
        if let Ok(mut results) = self.0.lock() {
            results.push(batch.clone());
        }
        Ok(())
    }

    fn flush(&mut self) -> weir_connectors::Result<()> {
        Ok(())
    }
}

fn run_scenario(name: &str, payload: &str, args: &BenchArgs) -> anyhow::Result<ScenarioResult> {
    let sql = SQL
        .replace("{sensors}", &args.sensors.to_string())
        .replace("{seconds}", &args.seconds.to_string())
        .replace("{payload}", payload);
    let compiled =
        weir_planner::compile(&sql).map_err(|e| anyhow::anyhow!("{}", e.render("bench.sql")))?;
    let plan = compiled
        .pipelines
        .into_iter()
        .next()
        .context("bench SQL has a pipeline")?;
    let results = Arc::new(Mutex::new(Vec::new()));
    let plan_factory = PlanFactory::new(plan, DeadLetterQueue::default())?;
    let (source, sender) = PayloadSource::channel(
        "bench",
        bench_schema(),
        Some("ts"),
        DecodeOptions::default(),
        DeadLetterQueue::default(),
        8,
    )?;
    let factory = CheckedFactory {
        plan: plan_factory,
        source: Mutex::new(Some(source)),
        results: Arc::clone(&results),
    };

    reset_peak_rss();
    let system = actix_rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime can be built")
    });
    let blocks = payload == "json_blocks";
    let (sensors, seconds) = (args.sensors, args.seconds);
    let (state, elapsed, snapshot) = system.block_on(async move {
        let engine = Engine::new(EngineOptions::default());
        let started = Instant::now();
        let mut handle = engine.start("vibration_rms".into(), Arc::new(factory))?;
        // The publisher plays the sensors and the broker: it encodes payloads on its own
        // thread, as devices do, so the figures are Weir's decoding and processing.
        let publisher = std::thread::spawn(move || publish(&sender, sensors, seconds, blocks));
        let state = handle.wait().await;
        let elapsed = started.elapsed();
        engine.shutdown().await;
        publisher
            .join()
            .map_err(|_| anyhow::anyhow!("the publisher thread panicked"))??;
        Ok::<_, anyhow::Error>((state, elapsed, handle.metrics.snapshot()))
    })?;
    if state != PipelineState::Finished {
        bail!("scenario {name} did not finish: {state:?}");
    }
    let samples = snapshot.stages.first().map_or(0, |s| s.rows_out);
    let batches = results.lock().map(|r| r.clone()).unwrap_or_default();
    let (windows, correct) = check(&batches, args)?;
    let seconds = elapsed
        .as_secs_f64()
        .max(Duration::from_micros(1).as_secs_f64());
    Ok(ScenarioResult {
        scenario: name.to_string(),
        samples,
        seconds,
        samples_per_sec: samples as f64 / seconds,
        p50_ms: snapshot.watermark_to_emit.p50_ms,
        p99_ms: snapshot.watermark_to_emit.p99_ms,
        peak_rss_mb: peak_rss_mb(),
        windows,
        correct,
    })
}

/// Recomputes every window from the signal model and compares; also checks that no window
/// is missing or duplicated.
fn check(batches: &[RecordBatch], args: &BenchArgs) -> anyhow::Result<(usize, bool)> {
    let config = SimulatorConfig {
        sensors: args.sensors,
        seed: 42,
        faults: true,
        ..SimulatorConfig::default()
    };
    let model = SignalModel::new(config.seed, config.sensors, config.rate_hz, config.faults);
    let start = config.reproducible_start_nanos()?;
    let rate = u64::from(config.rate_hz);
    let mut seen = std::collections::HashSet::new();
    let mut correct = true;
    for batch in batches {
        let sensors = batch.column(0).as_string::<i32>();
        let starts = batch.column(1).as_primitive::<TimestampNanosecondType>();
        let rms = batch.column(2).as_primitive::<Float64Type>();
        let peak = batch.column(3).as_primitive::<Float64Type>();
        let count = batch.column(4).as_primitive::<Int64Type>();
        for row in 0..batch.num_rows() {
            let sensor: u32 = sensors
                .value(row)
                .trim_start_matches('s')
                .parse::<u32>()?
                .saturating_sub(1);
            let second = u64::try_from((starts.value(row) - start) / 1_000_000_000)?;
            if !seen.insert((sensor, second)) {
                correct = false;
            }
            let (mut sum_sq, mut max_abs, mut n) = (0.0f64, 0.0f64, 0i64);
            for sample in second * rate..(second + 1) * rate {
                if let Some(v) = model.value(sensor as usize, sample) {
                    sum_sq += v * v;
                    max_abs = max_abs.max(v.abs());
                    n += 1;
                }
            }
            let expected_rms = (sum_sq / n as f64).sqrt();
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1.0);
            if count.value(row) != n
                || !close(rms.value(row), expected_rms)
                || !close(peak.value(row), max_abs)
                || rms.is_null(row)
            {
                correct = false;
            }
        }
    }
    // Every sensor-second with at least one sample must be there.
    for sensor in 0..args.sensors {
        for second in 0..u64::from(args.seconds) {
            let any = (second * rate..(second + 1) * rate)
                .any(|s| model.value(sensor as usize, s).is_some());
            if any && !seen.contains(&(sensor, second)) {
                correct = false;
            }
        }
    }
    Ok((seen.len(), correct))
}

/// Resets the kernel's peak-RSS counter so each scenario reports its own peak.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
