//! `weir bench`: workload V, S sensors x 1 kHz vibration -> 1-second tumbling RMS and peak per
//! sensor.
//!
//! - In-process scenarios (`json-rows`, `blocks`, `blocks-realtime`): the simulator's signal
//!   is encoded as JSON payloads (ahead of the clock, or paced at the sensors' rate), a payload
//!   source decodes them into Arrow, the real planner and engine aggregate, and every result is
//!   checked against a direct computation from the signal model.
//! - MQTT scenarios (`mqtt-rows`, `mqtt-blocks-realtime`, `mqtt-backlog`, see [`mqtt`]): the
//!   same workload through a real broker, with the publisher in a process of its own. Each
//!   runs per broker in a child process (`weir bench --isolated ...`), so that one broker's
//!   memory and threads never count against the next measurement.

mod check;
mod clients;
mod drain;
mod fanout;
mod mqtt;
mod procfs;
mod publisher;

use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Float64Type, Int64Type, TimestampNanosecondType};
use serde::{Deserialize, Serialize};
use weir_connectors::decode::DecodeOptions;
use weir_connectors::payload::{PayloadSource, Payloads};
use weir_connectors::simulator::{SignalModel, SimulatorConfig};
use weir_connectors::{DeadLetterQueue, Sink};
use weir_engine::{
    Engine, EngineOptions, PipelineFactory, PipelineParts, PipelineState, PlanFactory,
};

use self::mqtt::{BrokerKind, MqttScenario};
pub use self::publisher::{PublisherArgs, publisher};

/// Which brokers the MQTT scenarios run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BrokerChoice {
    Embedded,
    Mosquitto,
    Both,
}

impl BrokerChoice {
    fn brokers(self) -> Vec<BrokerKind> {
        match self {
            Self::Embedded => vec![BrokerKind::Embedded],
            Self::Mosquitto => vec![BrokerKind::Mosquitto],
            Self::Both => vec![BrokerKind::Embedded, BrokerKind::Mosquitto],
        }
    }
}

/// QoS levels of the backlog scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum QosChoice {
    #[value(name = "0")]
    Zero,
    #[value(name = "1")]
    One,
    Both,
}

impl QosChoice {
    fn levels(self) -> Vec<u8> {
        match self {
            Self::Zero => vec![0],
            Self::One => vec![1],
            Self::Both => vec![0, 1],
        }
    }
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Scenarios to run, comma-separated: json-rows, blocks, json-rows-ckpt and blocks-ckpt
    /// (the same with a checkpoint every second), blocks-realtime (in-process at the real
    /// rate of --realtime-sensors), mqtt-rows, mqtt-blocks-realtime, mqtt-backlog, or all; or
    /// cloud-fanout, uplink-drain or recovery on its own.
    #[arg(long, default_value = "all")]
    scenario: String,
    /// recovery: how many times the gateway is killed (SIGKILL) under load.
    #[arg(long, default_value_t = 20)]
    kills: u32,
    /// Simulated gateway agents of cloud-fanout, each with its own gRPC connection.
    #[arg(long, default_value_t = 1000)]
    gateways: usize,
    /// Brokers for the MQTT scenarios: embedded (rumqttd in this process), mosquitto (a
    /// child process) or both.
    #[arg(long, value_enum, default_value = "both")]
    broker: BrokerChoice,
    /// Number of simulated 1 kHz sensors (json-rows, blocks, mqtt-rows, mqtt-backlog).
    #[arg(long, default_value_t = 100)]
    sensors: u32,
    /// Seconds of event time to simulate per scenario; for the realtime ones, seconds of
    /// wall-clock time.
    #[arg(long, default_value_t = 20)]
    seconds: u32,
    /// Sensors of blocks-realtime and mqtt-blocks-realtime, each 1 kHz in 100-sample blocks
    /// (10 messages/s).
    #[arg(long, default_value_t = 1000)]
    realtime_sensors: u32,
    /// Messages queued for the persistent sessions of mqtt-backlog (rounded up to whole
    /// 100-sample ticks of all sensors).
    #[arg(long, default_value_t = 2_000_000)]
    backlog: u64,
    /// mqtt-blocks-realtime: segments the embedded broker keeps per subscription filter
    /// (default: the gateway's, 4).
    #[arg(long)]
    embedded_segments: Option<usize>,
    /// mqtt-blocks-realtime: size of one embedded-broker segment in bytes (default: the
    /// gateway's, 2 MiB). With the two above, bounds what the broker holds in memory.
    #[arg(long)]
    embedded_segment_bytes: Option<usize>,
    /// QoS levels of mqtt-backlog: 0, 1 or both.
    #[arg(long, value_enum, default_value = "both")]
    backlog_qos: QosChoice,
    /// QoS levels the pipeline of mqtt-blocks-realtime publishes its results at: 0, 1 (the
    /// MQTT sink's default) or both.
    #[arg(long, value_enum, default_value = "both")]
    results_qos: QosChoice,
    /// Print one JSON object per scenario instead of a table.
    #[arg(long)]
    json: bool,
    /// Run exactly one MQTT scenario on one broker (and QoS) in this process.
    #[arg(long, hide = true)]
    isolated: bool,
}

/// One scenario's figures; `--json` prints one per line.
#[derive(Debug, Serialize, Deserialize)]
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
    /// In-process throughput scenarios: the encoded input, held in memory from before the
    /// clock starts (part of the peak RSS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    input_mb: Option<f64>,
    /// blocks-realtime: this process's CPU, % of one core, publisher thread included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    process_cpu_percent: Option<f64>,
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    mqtt: Option<MqttFigures>,
}

/// What the MQTT scenarios measure besides the common figures.
#[derive(Debug, Serialize, Deserialize)]
struct MqttFigures {
    broker: String,
    qos: u8,
    /// Messages the publisher process sent (in the pipeline's phase).
    published: u64,
    publish_per_sec: f64,
    /// Messages the pipeline's `mqtt` source took from the broker.
    received: u64,
    /// The pipeline's rate; see `notes` for what it is timed from and to.
    messages_per_sec: f64,
    /// The same for the null subscriber, which only counts messages.
    null_received: Option<u64>,
    null_messages_per_sec: Option<f64>,
    /// messages_per_sec / null_messages_per_sec.
    ratio: Option<f64>,
    /// This process (pipeline; with the embedded broker, the broker too), % of one core.
    cpu_percent: Option<f64>,
    /// Mosquitto's process, % of one core, over the same interval.
    broker_cpu_percent: Option<f64>,
    publisher_cpu_percent: Option<f64>,
    broker_peak_rss_mb: Option<f64>,
    /// mqtt-blocks-realtime: result arrival on the sink topic after the watermark passed.
    e2e_p50_ms: Option<f64>,
    e2e_p99_ms: Option<f64>,
    e2e_max_ms: Option<f64>,
    /// mqtt-blocks-realtime: the same arrivals after the engine's source moved the watermark
    /// past the window end (without the sensors' messages' way through the broker).
    result_p99_ms: Option<f64>,
    dead_letters: u64,
    /// What was measured, how, and anything that did not go as it should.
    notes: Vec<String>,
}

/// A scenario as selected on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    InProcess(InProcess),
    Mqtt(MqttScenario),
}

/// An in-process scenario: the publisher thread hands JSON payloads straight to the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct InProcess {
    name: &'static str,
    /// One sample per payload, or 100-sample blocks.
    blocks: bool,
    /// A checkpoint every second into a RocksDB store on disk.
    checkpoints: bool,
    /// At the sensors' real rate (`--realtime-sensors` at 1 kHz), encoded as it goes, for
    /// CPU and memory at a given load; else every payload is encoded before the clock starts
    /// and handed over as fast as the pipeline takes it, for throughput.
    paced: bool,
}

impl InProcess {
    const ALL: [InProcess; 5] = [
        InProcess::new("json-rows", false, false, false),
        InProcess::new("blocks", true, false, false),
        InProcess::new("json-rows-ckpt", false, true, false),
        InProcess::new("blocks-ckpt", true, true, false),
        InProcess::new("blocks-realtime", true, false, true),
    ];

    const fn new(name: &'static str, blocks: bool, checkpoints: bool, paced: bool) -> Self {
        Self {
            name,
            blocks,
            checkpoints,
            paced,
        }
    }
}

fn scenarios(list: &str) -> anyhow::Result<Vec<Scenario>> {
    let all = InProcess::ALL
        .into_iter()
        .map(Scenario::InProcess)
        .chain(MqttScenario::ALL.into_iter().map(Scenario::Mqtt));
    let mut selected = Vec::new();
    for name in list.split(',').map(str::trim) {
        let found: Vec<Scenario> = match name {
            "all" => all.clone().collect(),
            _ => all
                .clone()
                .filter(|s| match s {
                    Scenario::InProcess(s) => s.name == name,
                    Scenario::Mqtt(m) => m.name() == name,
                })
                .collect(),
        };
        if found.is_empty() {
            bail!(
                "unknown scenario '{name}': use json-rows, blocks, json-rows-ckpt, blocks-ckpt, \
                 blocks-realtime, mqtt-rows, mqtt-blocks-realtime, mqtt-backlog or all"
            );
        }
        for scenario in found {
            if !selected.contains(&scenario) {
                selected.push(scenario);
            }
        }
    }
    Ok(selected)
}

fn bench_schema() -> arrow::datatypes::SchemaRef {
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    Arc::new(Schema::new(vec![
        Field::new("sensor", DataType::Utf8, false),
        Field::new("ts", DataType::Timestamp(TimeUnit::Nanosecond, None), false),
        Field::new("v", DataType::Float64, true),
    ]))
}

/// Encodes the simulator's signal as JSON payloads with epoch-millisecond times, a chunk per
/// tick (100 samples of every sensor): one payload per sample, or one per run of samples of a
/// 100-sample block (a dropout splits a block).
struct Encoder {
    model: SignalModel,
    start_ms: i64,
    ids: Vec<String>,
    blocks: bool,
    float: ryu::Buffer,
}

impl Encoder {
    fn new(sensors: u32, blocks: bool) -> anyhow::Result<Self> {
        let config = simulator_config(sensors);
        Ok(Self {
            model: SignalModel::new(config.seed, config.sensors, config.rate_hz, config.faults),
            start_ms: config.reproducible_start_nanos()? / 1_000_000,
            ids: (0..sensors)
                .map(weir_connectors::simulator::sensor_id)
                .collect(),
            blocks,
            float: ryu::Buffer::new(),
        })
    }

    fn tick(&mut self, tick: u64) -> Payloads {
        use std::io::Write;
        let Self {
            model,
            start_ms,
            ids,
            blocks,
            float,
        } = self;
        let payloads = if *blocks { ids.len() } else { ids.len() * 100 };
        let mut chunk =
            Payloads::with_capacity(payloads, payloads * if *blocks { 2048 } else { 48 });
        let first = tick * 100;
        for (sensor, id) in ids.iter().enumerate() {
            if *blocks {
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
                            *start_ms + run_start as i64
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
                                *start_ms + sample as i64,
                                float.format(v)
                            );
                        });
                    }
                }
            }
        }
        chunk
    }
}

fn simulator_config(sensors: u32) -> SimulatorConfig {
    SimulatorConfig {
        sensors,
        seed: 42,
        faults: true,
        ..SimulatorConfig::default()
    }
}

/// What the publisher thread plays: chunks encoded before the clock started, or the sensors
/// at their real rate, encoding each tick as it comes.
enum Input {
    Encoded(Vec<Payloads>),
    Paced { encoder: Encoder, ticks: u64 },
}

impl Input {
    /// Sends everything; returns when the last chunk is in the channel.
    fn publish(self, sender: &tokio::sync::mpsc::Sender<Payloads>) -> anyhow::Result<()> {
        let gone = |_| anyhow::anyhow!("the pipeline stopped reading");
        match self {
            Input::Encoded(chunks) => {
                for chunk in chunks {
                    sender.blocking_send(chunk).map_err(gone)?;
                }
            }
            Input::Paced { mut encoder, ticks } => {
                let started = Instant::now();
                for tick in 0..ticks {
                    let chunk = encoder.tick(tick);
                    let due = started + Duration::from_millis(100 * tick);
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                    sender.blocking_send(chunk).map_err(gone)?;
                }
            }
        }
        Ok(())
    }
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
    if args.scenario == "cloud-fanout" {
        return cloud_fanout(&args);
    }
    if args.scenario == "uplink-drain" {
        return uplink_drain(&args);
    }
    if args.scenario == "recovery" {
        return crate::soak::recovery_bench(args.kills, args.json);
    }
    let selected = scenarios(&args.scenario)?;
    if args.sensors == 0 || args.seconds == 0 || args.realtime_sensors == 0 || args.backlog == 0 {
        bail!("--sensors, --seconds, --realtime-sensors and --backlog must be positive");
    }
    if args.isolated {
        return isolated(&selected, &args);
    }
    if cfg!(debug_assertions) {
        eprintln!(
            "note: this is a debug build; run `cargo run --release -- bench` for real figures"
        );
    }
    let mut results = Vec::new();
    for scenario in selected {
        match scenario {
            Scenario::InProcess(scenario) => {
                let result = run_scenario(scenario, &args)?;
                if args.json {
                    println!("{}", serde_json::to_string(&result)?);
                }
                results.push(result);
            }
            Scenario::Mqtt(mqtt) => {
                for broker in args.broker.brokers() {
                    for qos in qos_levels(mqtt, &args) {
                        let result = run_isolated(mqtt, broker, qos, &args)?;
                        if args.json {
                            println!("{}", serde_json::to_string(&result)?);
                        }
                        results.push(result);
                    }
                }
            }
        }
    }
    if !args.json {
        print_tables(&results);
    }
    Ok(if results.iter().all(|r| r.correct) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `cloud-fanout`, which measures the control plane rather than the vibration workload.
/// The backlog of a `--seconds` outage of `--sensors` sensors, drained to a cloud.
fn uplink_drain(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let result = drain::run(u64::from(args.seconds), args.sensors as usize)?;
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        println!("| scenario | batches | rows | MB | seconds | rows/s | MB/s | correct |");
        println!("|---|--:|--:|--:|--:|--:|--:|---|");
        println!(
            "| {} | {} | {} | {:.1} | {:.2} | {:.0} | {:.1} | {} |",
            result.scenario,
            result.batches,
            result.rows,
            result.megabytes,
            result.seconds,
            result.rows_per_sec,
            result.megabytes_per_sec,
            result.correct
        );
    }
    Ok(if result.correct {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn cloud_fanout(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    if args.gateways == 0 {
        bail!("--gateways must be positive");
    }
    let result = fanout::run(args.gateways)?;
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        println!(
            "| scenario | gateways | deploy reaches all (s) | cloud KB / gateway | cloud RSS MB | reconnect storm (s) | correct |"
        );
        println!("|---|--:|--:|--:|--:|--:|---|");
        println!(
            "| {} | {} | {:.2} | {:.1} | {:.0} | {:.2} | {} |",
            result.scenario,
            result.gateways,
            result.deploy_to_all_s,
            result.cloud_kb_per_gateway,
            result.cloud_rss_mb,
            result.reconnect_storm_s,
            result.correct
        );
    }
    Ok(if result.correct {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The QoS levels an MQTT scenario runs at: the backlog's messages, the realtime results.
fn qos_levels(scenario: MqttScenario, args: &BenchArgs) -> Vec<u8> {
    match scenario {
        MqttScenario::Backlog => args.backlog_qos.levels(),
        MqttScenario::BlocksRealtime => args.results_qos.levels(),
        MqttScenario::Rows => vec![0],
    }
}

/// `--isolated`: one MQTT scenario, one broker, one QoS, here; the result as one JSON line.
fn isolated(selected: &[Scenario], args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let &[Scenario::Mqtt(scenario)] = selected else {
        bail!("--isolated runs exactly one MQTT scenario on one broker with one QoS");
    };
    let (&[broker], &[qos]) = (
        args.broker.brokers().as_slice(),
        qos_levels(scenario, args).as_slice(),
    ) else {
        bail!("--isolated runs exactly one MQTT scenario on one broker with one QoS");
    };
    let result = mqtt::run(scenario, broker, qos, args)?;
    println!("{}", serde_json::to_string(&result)?);
    Ok(ExitCode::SUCCESS)
}

/// Runs one MQTT scenario in a child process of this executable and reads back its result.
fn run_isolated(
    scenario: MqttScenario,
    broker: BrokerKind,
    qos: u8,
    args: &BenchArgs,
) -> anyhow::Result<ScenarioResult> {
    let exe = std::env::current_exe().context("cannot find the weir executable")?;
    let output = std::process::Command::new(exe)
        .args([
            "bench".to_owned(),
            "--isolated".to_owned(),
            format!("--scenario={}", scenario.name()),
            format!("--broker={}", broker.name()),
            format!("--backlog-qos={qos}"),
            format!("--results-qos={qos}"),
            format!("--sensors={}", args.sensors),
            format!("--seconds={}", args.seconds),
            format!("--realtime-sensors={}", args.realtime_sensors),
            format!("--backlog={}", args.backlog),
        ])
        .args(
            args.embedded_segments
                .map(|n| format!("--embedded-segments={n}")),
        )
        .args(
            args.embedded_segment_bytes
                .map(|n| format!("--embedded-segment-bytes={n}")),
        )
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {} on {}", scenario.name(), broker.name()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    if !output.status.success() || line.is_empty() {
        bail!(
            "{} on {} failed ({})",
            scenario.name(),
            broker.name(),
            output.status
        );
    }
    serde_json::from_str(line).with_context(|| format!("unreadable scenario result: {line:?}"))
}

fn print_tables(results: &[ScenarioResult]) {
    let (in_process, mqtt): (Vec<_>, Vec<_>) = results.iter().partition(|r| r.mqtt.is_none());
    let or_dash = |value: Option<f64>, decimals: usize| {
        value.map_or("-".to_owned(), |v| format!("{v:.decimals$}"))
    };
    if !in_process.is_empty() {
        println!(
            "{:<15} {:>12} {:>8} {:>14} {:>8} {:>8} {:>9} {:>9} {:>6} {:>8} {:>8}",
            "scenario",
            "samples",
            "seconds",
            "samples/s",
            "p50 ms",
            "p99 ms",
            "peak MB",
            "input MB",
            "cpu%",
            "windows",
            "correct"
        );
        for r in &in_process {
            println!(
                "{:<15} {:>12} {:>8.2} {:>14.0} {:>8.3} {:>8.3} {:>9.1} {:>9} {:>6} {:>8} {:>8}",
                r.scenario,
                r.samples,
                r.seconds,
                r.samples_per_sec,
                r.p50_ms,
                r.p99_ms,
                r.peak_rss_mb,
                or_dash(r.input_mb, 1),
                or_dash(r.process_cpu_percent, 1),
                r.windows,
                r.correct
            );
        }
        println!(
            "(input MB: payloads encoded before the clock starts, part of the peak; \
             cpu%: of one core, publisher thread included)"
        );
    }
    if mqtt.is_empty() {
        return;
    }
    if !in_process.is_empty() {
        println!();
    }
    println!(
        "{:<20} {:<9} {:>3} {:>17} {:>10} {:>10} {:>6} {:>6} {:>7} {:>7} {:>7} {:>8} {:>8} {:>8} {:>7}",
        "scenario",
        "broker",
        "qos",
        "received/sent",
        "msg/s",
        "null/s",
        "ratio",
        "cpu%",
        "brk cpu",
        "peak MB",
        "brk MB",
        "p99 wm",
        "p99 res",
        "p99 e2e",
        "correct"
    );
    for r in &mqtt {
        let Some(m) = &r.mqtt else { continue };
        println!(
            "{:<20} {:<9} {:>3} {:>17} {:>10.0} {:>10} {:>6} {:>6} {:>7} {:>7.1} {:>7} {:>8.3} {:>8} {:>8} {:>7}",
            r.scenario,
            m.broker,
            m.qos,
            format!("{}/{}", m.received, m.published),
            m.messages_per_sec,
            or_dash(m.null_messages_per_sec, 0),
            or_dash(m.ratio, 2),
            or_dash(m.cpu_percent, 1),
            or_dash(m.broker_cpu_percent, 1),
            r.peak_rss_mb,
            or_dash(m.broker_peak_rss_mb, 1),
            r.p99_ms,
            or_dash(m.result_p99_ms, 1),
            or_dash(m.e2e_p99_ms, 1),
            r.correct
        );
    }
    println!();
    for r in &mqtt {
        let Some(m) = &r.mqtt else { continue };
        println!("{} on {} (QoS {}):", r.scenario, m.broker, m.qos);
        for note in &m.notes {
            println!("  - {note}");
        }
    }
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

    fn fingerprint(&self) -> Option<u64> {
        self.plan.fingerprint()
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

fn run_scenario(scenario: InProcess, args: &BenchArgs) -> anyhow::Result<ScenarioResult> {
    let InProcess {
        name,
        blocks,
        checkpoints,
        paced,
    } = scenario;
    let (sensors, seconds) = match paced {
        true => (args.realtime_sensors, args.seconds),
        false => (args.sensors, args.seconds),
    };
    let payload = if blocks { "json_blocks" } else { "json" };
    let sql = SQL
        .replace("{sensors}", &sensors.to_string())
        .replace("{seconds}", &seconds.to_string())
        .replace("{payload}", payload);
    let compiled =
        weir_planner::compile(&sql).map_err(|e| anyhow::anyhow!("{}", e.render("bench.sql")))?;
    let plan = compiled
        .pipelines
        .into_iter()
        .next()
        .context("bench SQL has a pipeline")?;
    let results = Arc::new(Mutex::new(Vec::new()));
    let plan_factory = PlanFactory::new(plan, DeadLetterQueue::default(), Default::default())?;
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

    let mut encoder = Encoder::new(sensors, blocks)?;
    let ticks = u64::from(seconds) * 10;
    let (input, input_mb) = match paced {
        true => (Input::Paced { encoder, ticks }, None),
        false => {
            let chunks: Vec<Payloads> = (0..ticks).map(|tick| encoder.tick(tick)).collect();
            let bytes: usize = chunks
                .iter()
                .flat_map(Payloads::iter)
                .map(<[u8]>::len)
                .sum();
            (
                Input::Encoded(chunks),
                Some(bytes as f64 / (1024.0 * 1024.0)),
            )
        }
    };

    let system = actix_rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime can be built")
    });
    // Checkpoints every second into a store on disk, committed with synced writes, as on a
    // gateway (the bench source cannot seek, so they hold the operators' state).
    let store_dir = tempfile::tempdir()?;
    let options = EngineOptions {
        checkpoints: match checkpoints {
            true => Some(weir_engine::CheckpointOptions {
                store: Arc::new(weir_engine::uplink::UplinkStore::open(store_dir.path())?),
                interval: Duration::from_secs(1),
            }),
            false => None,
        },
        ..EngineOptions::default()
    };
    let (state, elapsed, cpu, snapshot, committed) = system.block_on(async move {
        let engine = Engine::new(options);
        let cpu_start = procfs::CpuMark::now(None);
        let started = Instant::now();
        let mut handle = engine.start("vibration_rms".into(), Arc::new(factory))?;
        // As `weir run` does once its pipelines started; the peak counts from here.
        weir_gateway::memory::release_startup_code_logged();
        procfs::reset_peak_rss();
        // The publisher plays the sensors and the broker, on its own thread: the figures are
        // Weir's decoding and processing.
        let publisher = std::thread::spawn(move || input.publish(&sender));
        let state = handle.wait().await;
        let elapsed = started.elapsed();
        let cpu = cpu_start.percent_until(&procfs::CpuMark::now(None));
        engine.shutdown().await;
        publisher
            .join()
            .map_err(|_| anyhow::anyhow!("the publisher thread panicked"))??;
        let committed = handle
            .metrics
            .checkpoints
            .load(std::sync::atomic::Ordering::Relaxed);
        Ok::<_, anyhow::Error>((state, elapsed, cpu, handle.metrics.snapshot(), committed))
    })?;
    if checkpoints && committed == 0 {
        bail!("scenario {name} committed no checkpoint");
    }
    if state != PipelineState::Finished {
        bail!("scenario {name} did not finish: {state:?}");
    }
    let samples = snapshot.stages.first().map_or(0, |s| s.rows_out);
    let batches = results.lock().map(|r| r.clone()).unwrap_or_default();
    let (windows, correct) = check(&batches, sensors, seconds)?;
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
        peak_rss_mb: procfs::peak_rss_mb(None).unwrap_or(0.0),
        mqtt: None,
        windows,
        correct,
        input_mb,
        process_cpu_percent: cpu.filter(|_| paced),
    })
}

/// Recomputes every window from the signal model and compares; also checks that no window
/// is missing or duplicated.
fn check(batches: &[RecordBatch], sensors: u32, seconds: u32) -> anyhow::Result<(usize, bool)> {
    let config = simulator_config(sensors);
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
    for sensor in 0..sensors {
        for second in 0..u64::from(seconds) {
            let any = (second * rate..(second + 1) * rate)
                .any(|s| model.value(sensor as usize, s).is_some());
            if any && !seen.contains(&(sensor, second)) {
                correct = false;
            }
        }
    }
    Ok((seen.len(), correct))
}
