//! The MQTT scenarios of `weir bench`: simulated sensors in a separate process publish through
//! a real broker (the embedded rumqttd or a Mosquitto child process) into the real `mqtt`
//! source, the vibration RMS pipeline, and a collecting or `mqtt` sink.
//!
//! ```text
//!  weir bench-publisher ──MQTT──> broker ──MQTT──> mqtt source ─> 1 s tumble ─> sink
//!  (own process)                   │                  (this process)
//!                                  └──MQTT──> null subscriber (counts, decodes nothing)
//! ```
//!
//! - `mqtt-rows`: one sample per message, published as fast as the broker takes them (QoS 0),
//!   first to the null subscriber, then, with the same messages, to the pipeline.
//! - `mqtt-blocks-realtime`: many sensors publishing 100-sample blocks at their real rate;
//!   CPU, memory and latency of the process that runs the pipeline.
//! - `mqtt-backlog`: messages queued by the broker for persistent sessions while their
//!   subscribers were away, drained by the null subscriber and by the pipeline.
//!
//! Each scenario runs on one broker in a process of its own (see `bench.rs`): rumqttd cannot
//! be stopped, and its memory and threads would otherwise count against the next scenario.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use rumqttc::QoS;
use weir_connectors::mqtt::mosquitto::Mosquitto;
use weir_connectors::mqtt::{EmbeddedBroker, EmbeddedBrokerConfig, MqttStats};
use weir_connectors::simulator::SimulatorConfig;
use weir_connectors::{DeadLetterQueue, Source, SourceEvent, SourceFuture};
use weir_engine::{
    Engine, EngineOptions, PipelineFactory, PipelineHandle, PipelineParts, PipelineSnapshot,
    PipelineState, PlanFactory,
};

use super::check::{WINDOW_MS, WindowCheck};
use super::clients::{NullSubscriber, ResultReader, Session, prepare_session};
use super::procfs::{CpuMark, peak_rss_mb, reset_peak_rss};
use super::publisher::{
    BLOCK_SAMPLES, PublisherArgs, PublisherProcess, PublisherReport, Shape, epoch_ms_now,
};
use super::{BenchArgs, CollectingSink, MqttFigures, ScenarioResult};

/// Where the simulated sensors publish; `{sensor}` is the sensor id.
pub const SENSOR_TOPIC: &str = "plant1/{sensor}/vibration";
const SENSOR_FILTER: &str = "plant1/+/vibration";
const RESULT_FILTER: &str = "plant1/+/rms";
/// The pipeline's name, and so the prefix of its connectors' counters.
const PIPELINE: &str = "vibration_rms";
/// Names the source's [`MqttStats`] may have: per pipeline, or (older engines) per source.
const SOURCE_STATS: [&str; 2] = ["vibration_rms/vibration", "vibration"];
/// Persistent sessions of the backlog scenario.
const NULL_CLIENT: &str = "weir-bench-null";
const PIPELINE_CLIENT: &str = "weir-bench-pipeline";
/// How long a drain waits without any message before it gives up and reports what it got.
const STALL: Duration = Duration::from_secs(5);
/// One 100-sample block at 1 kHz.
const BLOCK_MS: i64 = 100;
/// The realtime pipeline's watermark delay (as in examples/gateway/vibration.sql).
const REALTIME_DELAY_MS: i64 = 1000;
/// Seconds of the realtime run not counted in CPU and latency: connections, first windows.
const WARMUP_MS: i64 = 3000;

/// A broker to run a scenario on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    /// rumqttd inside this process, as `weir gateway` runs it.
    Embedded,
    /// A Mosquitto child process on a free loopback port.
    Mosquitto,
}

impl BrokerKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Embedded => "embedded",
            Self::Mosquitto => "mosquitto",
        }
    }
}

/// The MQTT scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttScenario {
    Rows,
    BlocksRealtime,
    Backlog,
}

impl MqttScenario {
    pub const ALL: [Self; 3] = [Self::Rows, Self::BlocksRealtime, Self::Backlog];

    pub fn name(self) -> &'static str {
        match self {
            Self::Rows => "mqtt-rows",
            Self::BlocksRealtime => "mqtt-blocks-realtime",
            Self::Backlog => "mqtt-backlog",
        }
    }
}

/// A running broker; Mosquitto is killed when this is dropped, rumqttd lives as long as the
/// process.
struct Broker {
    kind: BrokerKind,
    url: String,
    /// The embedded broker's segments and segment size.
    embedded_retention: (usize, usize),
    mosquitto: Option<Mosquitto>,
    _embedded: Option<EmbeddedBroker>,
}

impl Broker {
    /// Starts a broker. The embedded one gets room for `hold_messages` single-sample messages
    /// per subscription: rumqttd keeps each subscription filter's
    /// messages in a log of segments and drops the oldest segment when it has too many, so a
    /// subscriber that falls further behind than that loses messages.
    fn start(kind: BrokerKind, hold_messages: u64) -> anyhow::Result<Self> {
        Self::start_with(kind, |config| {
            // rumqttd counts 4 + topic + payload bytes per message, about 70 here.
            const COUNTED_BYTES: u64 = 128;
            config.segment_bytes = 16 << 20;
            let segments =
                (hold_messages * COUNTED_BYTES).div_ceil(config.segment_bytes as u64) + 2;
            config.segments = config.segments.max(segments as usize);
        })
    }

    /// Starts a broker; `configure` adjusts the embedded broker's settings (the gateway's
    /// defaults, on a free loopback port).
    fn start_with(
        kind: BrokerKind,
        configure: impl FnOnce(&mut EmbeddedBrokerConfig),
    ) -> anyhow::Result<Self> {
        match kind {
            BrokerKind::Embedded => {
                let mut config = EmbeddedBrokerConfig {
                    listen: "127.0.0.1:0".parse()?,
                    ..EmbeddedBrokerConfig::default()
                };
                configure(&mut config);
                let broker = EmbeddedBroker::start(&config)?;
                Ok(Self {
                    kind,
                    url: broker.url(),
                    embedded_retention: (config.segments, config.segment_bytes),
                    mosquitto: None,
                    _embedded: Some(broker),
                })
            }
            BrokerKind::Mosquitto => {
                let broker = Mosquitto::start().context(
                    "cannot start Mosquitto (apt-get install mosquitto, or --broker embedded)",
                )?;
                Ok(Self {
                    kind,
                    url: broker.url(),
                    embedded_retention: (0, 0),
                    mosquitto: Some(broker),
                    _embedded: None,
                })
            }
        }
    }

    /// The broker's own process, if it has one.
    fn pid(&self) -> Option<u32> {
        self.mosquitto.as_ref().and_then(Mosquitto::pid)
    }
}

/// Runs one MQTT scenario on one broker in this process. `qos` applies to the backlog's
/// messages and to the realtime scenario's results.
pub fn run(
    scenario: MqttScenario,
    broker: BrokerKind,
    qos: u8,
    args: &BenchArgs,
) -> anyhow::Result<ScenarioResult> {
    crate::gateway::runtime().block_on(async move {
        match scenario {
            MqttScenario::Rows => {
                let hold = u64::from(args.sensors) * u64::from(args.seconds) * 1000;
                rows(&Broker::start(broker, hold)?, args).await
            }
            MqttScenario::BlocksRealtime => {
                let broker = Broker::start_with(broker, |config| {
                    if let Some(bytes) = args.embedded_segment_bytes {
                        config.segment_bytes = bytes;
                    }
                    if let Some(segments) = args.embedded_segments {
                        config.segments = segments;
                    }
                })?;
                realtime(&broker, args, qos).await
            }
            MqttScenario::Backlog => {
                let broker = Broker::start(broker, args.backlog)?;
                backlog(&broker, args, qos).await
            }
        }
    })
}

/// Event time of the reproducible runs' first sample, epoch ms (aligned to a second).
fn reproducible_start_ms() -> anyhow::Result<i64> {
    Ok(SimulatorConfig::default().reproducible_start_nanos()? / 1_000_000)
}

fn qos_level(qos: u8) -> QoS {
    if qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

/// Messages per second between two instants.
fn rate(count: u64, from: Option<Instant>, to: Option<Instant>) -> f64 {
    match (from, to) {
        (Some(from), Some(to)) if to > from => count as f64 / to.duration_since(from).as_secs_f64(),
        _ => 0.0,
    }
}

/// The single-sample pipeline: every message checked, results kept in memory.
fn rows_sql(url: &str, qos: u8, session: &str) -> String {
    format!(
        "CREATE SOURCE vibration (
            sensor TEXT NOT NULL,
            ts     TIMESTAMP NOT NULL,
            v      DOUBLE,
            WATERMARK FOR ts AS ts - INTERVAL '2' SECOND
        ) WITH (connector = 'mqtt', url = '{url}', topic = '{SENSOR_TOPIC}', format = 'json',
                qos = {qos}{session});
        CREATE SINK results WITH (connector = 'null');
        CREATE PIPELINE {PIPELINE} AS
        INSERT INTO results
        SELECT sensor, window_start, sqrt(avg(v * v)) AS rms, max(abs(v)) AS peak,
               count(*) AS samples
        FROM TUMBLE(vibration, ts, INTERVAL '1' SECOND)
        GROUP BY sensor, window_start;"
    )
}

/// The gateway's vibration pipeline (examples/gateway/vibration.sql) with a broker URL,
/// epoch-millisecond times in the results, unrounded values to check, and results published
/// at `results_qos`.
fn realtime_sql(url: &str, results_qos: u8) -> String {
    format!(
        "CREATE SOURCE vibration (
            sensor TEXT NOT NULL,
            ts     TIMESTAMP NOT NULL,
            v      DOUBLE,
            WATERMARK FOR ts AS ts - INTERVAL '{delay}' SECOND
        ) WITH (connector = 'mqtt', url = '{url}', topic = '{SENSOR_TOPIC}', format = 'json',
                qos = 0);
        CREATE SINK rms_topic WITH (connector = 'mqtt', url = '{url}',
                                    topic = 'plant1/{{sensor}}/rms', timestamps = 'epoch_ms',
                                    qos = {results_qos});
        CREATE PIPELINE {PIPELINE} AS
        INSERT INTO rms_topic
        SELECT sensor, window_start, window_end, sqrt(avg(v * v)) AS rms, max(abs(v)) AS peak,
               count(*) AS samples
        FROM TUMBLE(vibration, ts, INTERVAL '1' SECOND)
        GROUP BY sensor, window_start, window_end;",
        delay = REALTIME_DELAY_MS / 1000
    )
}

fn compile(sql: &str) -> anyhow::Result<weir_proto::plan::PipelinePlan> {
    weir_planner::compile(sql)
        .map_err(|e| anyhow::anyhow!("{}", e.render("bench.sql")))?
        .pipelines
        .into_iter()
        .next()
        .context("bench SQL has a pipeline")
}

/// What a counted source saw.
#[derive(Debug, Default, Clone, Copy)]
struct SourceProgress {
    rows: u64,
    first_batch: Option<Instant>,
    last_batch: Option<Instant>,
    /// The source ended because nothing arrived for [`STALL`], not because all came.
    stalled: bool,
}

/// Wraps the plan's `mqtt` source so that the stream ends once `expected` rows came (or
/// nothing came for [`STALL`]): the end closes every window, so the run finishes with all
/// results in the sink and its duration is the time to process everything.
struct CountedSource {
    inner: Box<dyn Source>,
    /// u64::MAX until the publisher has said how many it sent.
    expected: Arc<AtomicU64>,
    built: Instant,
    progress: Arc<Mutex<SourceProgress>>,
    local: SourceProgress,
}

impl CountedSource {
    async fn next(&mut self) -> weir_connectors::Result<SourceEvent> {
        // Short polls so a newly known count or a stall is noticed; the `mqtt` source is
        // cancel-safe.
        const POLL: Duration = Duration::from_millis(20);
        loop {
            let expected = self.expected.load(Ordering::Acquire);
            if self.local.rows >= expected {
                return Ok(SourceEvent::End);
            }
            let quiet_since = self.local.last_batch.unwrap_or(self.built);
            if expected != u64::MAX && quiet_since.elapsed() > STALL {
                self.local.stalled = true;
                self.publish_progress();
                return Ok(SourceEvent::End);
            }
            match tokio::time::timeout(POLL, self.inner.next_event()).await {
                Err(_) => {}
                Ok(Ok(SourceEvent::Batch(batch))) => {
                    let now = Instant::now();
                    self.local.rows += batch.num_rows() as u64;
                    self.local.first_batch.get_or_insert(now);
                    self.local.last_batch = Some(now);
                    self.publish_progress();
                    return Ok(SourceEvent::Batch(batch));
                }
                Ok(other) => return other,
            }
        }
    }

    fn publish_progress(&self) {
        if let Ok(mut progress) = self.progress.lock() {
            *progress = self.local;
        }
    }
}

impl Source for CountedSource {
    fn schema(&self) -> SchemaRef {
        self.inner.schema()
    }

    fn next_event(&mut self) -> SourceFuture<'_> {
        Box::pin(self.next())
    }
}

/// The plan's parts with the source counted and the sink collecting.
struct CountedFactory {
    plan: PlanFactory,
    expected: Arc<AtomicU64>,
    progress: Arc<Mutex<SourceProgress>>,
    results: Arc<Mutex<Vec<RecordBatch>>>,
}

impl PipelineFactory for CountedFactory {
    fn stage_names(&self) -> Vec<String> {
        self.plan.stage_names()
    }

    fn build(&self) -> weir_engine::Result<PipelineParts> {
        let mut parts = self.plan.build()?;
        parts.source = Box::new(CountedSource {
            inner: parts.source,
            expected: Arc::clone(&self.expected),
            built: Instant::now(),
            progress: Arc::clone(&self.progress),
            local: SourceProgress::default(),
        });
        parts.sink = Box::new(CollectingSink(Arc::clone(&self.results)));
        Ok(parts)
    }
}

/// A pipeline run of the rows and backlog scenarios.
struct CountedRun {
    engine: Engine,
    handle: PipelineHandle,
    progress: Arc<Mutex<SourceProgress>>,
    results: Arc<Mutex<Vec<RecordBatch>>>,
    stats: Arc<MqttStats>,
    messages_before: u64,
    subscriptions_before: u64,
    dead_letters: DeadLetterQueue,
    /// Just before the pipeline started (and so connected).
    started: Instant,
}

/// How a counted run ended.
struct CountedOutcome {
    state: PipelineState,
    progress: SourceProgress,
    /// Messages the source took from the broker.
    messages: u64,
    finished: Instant,
    started: Instant,
    snapshot: PipelineSnapshot,
    results: Vec<RecordBatch>,
    dead_letters: u64,
}

impl CountedOutcome {
    /// When the pipeline was done with everything it received: when it finished, or, if it
    /// stopped waiting for messages that never came, when the last batch arrived.
    fn done(&self) -> Instant {
        match self.progress.last_batch {
            Some(last) if self.progress.stalled => last,
            _ => self.finished,
        }
    }
}

impl CountedRun {
    /// Starts the pipeline of `sql`; must run inside the actix system.
    fn start(sql: &str, expected: Arc<AtomicU64>) -> anyhow::Result<Self> {
        let dead_letters = DeadLetterQueue::default();
        let plan = PlanFactory::new(compile(sql)?, dead_letters.clone(), Default::default())?;
        let progress = Arc::default();
        let results = Arc::default();
        let factory = CountedFactory {
            plan,
            expected,
            progress: Arc::clone(&progress),
            results: Arc::clone(&results),
        };
        // No wall-clock watermark: the counted source ends the stream, which closes windows.
        let engine = Engine::new(EngineOptions {
            idle_timeout: Duration::from_secs(600),
            max_restarts: 0,
            ..EngineOptions::default()
        });
        let stats = source_stats()?;
        let messages_before = MqttStats::get(&stats.messages);
        let subscriptions_before = MqttStats::get(&stats.subscriptions);
        let started = Instant::now();
        let handle = engine.start(PIPELINE.into(), Arc::new(factory))?;
        Ok(Self {
            engine,
            handle,
            progress,
            results,
            stats,
            messages_before,
            subscriptions_before,
            dead_letters,
            started,
        })
    }

    /// Waits until the broker confirmed the source's subscription.
    async fn subscribed(&self) -> anyhow::Result<()> {
        subscribed(&self.stats, self.subscriptions_before)
            .await
            .with_context(|| {
                format!(
                    "pipeline state {:?}, {} connects, {} connect failures",
                    *self.handle.state.borrow(),
                    MqttStats::get(&self.stats.connects),
                    MqttStats::get(&self.stats.connect_failures)
                )
            })
    }

    async fn finish(mut self) -> CountedOutcome {
        let state = self.handle.wait().await;
        let finished = Instant::now();
        let snapshot = self.handle.metrics.snapshot();
        self.engine.shutdown().await;
        CountedOutcome {
            state,
            progress: self.progress.lock().map(|p| *p).unwrap_or_default(),
            messages: MqttStats::get(&self.stats.messages) - self.messages_before,
            finished,
            started: self.started,
            snapshot,
            results: self
                .results
                .lock()
                .map(|mut r| std::mem::take(&mut *r))
                .unwrap_or_default(),
            dead_letters: self.dead_letters.count(),
        }
    }
}

/// The counters of the bench pipeline's `mqtt` source, registered when its plan was built.
fn source_stats() -> anyhow::Result<Arc<MqttStats>> {
    MqttStats::all()
        .into_iter()
        .find(|(name, _)| SOURCE_STATS.contains(&name.as_str()))
        .map(|(_, stats)| stats)
        .context("the bench pipeline's mqtt source has no counters")
}

/// Waits until a source's subscription count passes `before`.
async fn subscribed(stats: &MqttStats, before: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while MqttStats::get(&stats.subscriptions) <= before {
        if Instant::now() > deadline {
            bail!("the pipeline's mqtt source did not subscribe within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Runs the publisher to its end and then tells `expected` how many it sent (0 if it failed).
async fn publish_and_count(
    process: PublisherProcess,
    expected: &AtomicU64,
) -> anyhow::Result<PublisherReport> {
    let report = process.finish().await;
    expected.store(report.as_ref().map_or(0, |r| r.messages), Ordering::Release);
    report
}

fn check_results(
    publisher: &PublisherArgs,
    results: &[RecordBatch],
) -> anyhow::Result<super::check::Verdict> {
    let mut check = WindowCheck::new(
        publisher.model(),
        publisher.start_ms,
        publisher.ticks * u64::from(BLOCK_SAMPLES),
    );
    for batch in results {
        check.record_batch(batch)?;
    }
    Ok(check.verdict(check.all_windows()))
}

async fn rows(broker: &Broker, args: &BenchArgs) -> anyhow::Result<ScenarioResult> {
    let scenario = MqttScenario::Rows.name();
    let on = broker.kind.name();
    let publisher = PublisherArgs {
        url: broker.url.clone(),
        sensors: args.sensors,
        ticks: u64::from(args.seconds) * 10,
        shape: Shape::Rows,
        qos: 0,
        realtime: false,
        start_ms: reproducible_start_ms()?,
        first_tick_at_ms: None,
        seed: 42,
        faults: true,
    };

    eprintln!("{scenario} on {on}: null subscriber phase");
    let null = NullSubscriber::start(&broker.url, &Session::Clean, SENSOR_FILTER, QoS::AtMostOnce)?;
    null.subscribed().await?;
    let expected = AtomicU64::new(u64::MAX);
    let since = Instant::now();
    let process = PublisherProcess::spawn(&publisher)?;
    let (null_publisher, drained) = tokio::join!(
        publish_and_count(process, &expected),
        null.drain(since, &expected, STALL)
    );
    let null_publisher = null_publisher?;
    null.stop().await;
    let null_rate = rate(drained.received, drained.first, drained.last);

    eprintln!("{scenario} on {on}: pipeline phase");
    reset_peak_rss();
    let expected = Arc::new(AtomicU64::new(u64::MAX));
    let run = CountedRun::start(&rows_sql(&broker.url, 0, ""), Arc::clone(&expected))?;
    run.subscribed().await?;
    let cpu_start = CpuMark::now(None);
    let broker_start = broker.pid().map(|pid| CpuMark::now(Some(pid)));
    let process = PublisherProcess::spawn(&publisher)?;
    let (report, outcome) = tokio::join!(publish_and_count(process, &expected), run.finish());
    let report = report?;
    let cpu_end = CpuMark::now(None);
    let broker_end = broker.pid().map(|pid| CpuMark::now(Some(pid)));
    let peak = peak_rss_mb(None).unwrap_or(0.0);

    let verdict = check_results(&publisher, &outcome.results)?;
    let seconds = outcome.progress.first_batch.map_or(0.0, |first| {
        outcome.done().duration_since(first).as_secs_f64()
    });
    let pipeline_rate = rate(
        outcome.messages,
        outcome.progress.first_batch,
        Some(outcome.done()),
    );
    let mut notes = vec![
        format!(
            "rates: messages received / (last - first arrival); pipeline: from its first batch \
             to every window emitted; publisher {:.0} msg/s (null phase {:.0} msg/s)",
            report.messages_per_sec(),
            null_publisher.messages_per_sec()
        ),
        format!(
            "null subscriber received {} of {}, pipeline {} of {}",
            drained.received, null_publisher.messages, outcome.messages, report.messages
        ),
    ];
    if broker.kind == BrokerKind::Embedded {
        notes.push("cpu% and peak RSS include the embedded broker (same process)".into());
    }
    pipeline_notes(&outcome, &mut notes);
    Ok(ScenarioResult {
        input_mb: None,
        process_cpu_percent: None,
        scenario: scenario.into(),
        samples: outcome.progress.rows,
        seconds,
        samples_per_sec: outcome.progress.rows as f64 / seconds.max(1e-9),
        p50_ms: outcome.snapshot.watermark_to_emit.p50_ms,
        p99_ms: outcome.snapshot.watermark_to_emit.p99_ms,
        peak_rss_mb: peak,
        windows: verdict.windows,
        correct: outcome.state == PipelineState::Finished
            && verdict.correct()
            && outcome.messages == report.messages
            && drained.complete,
        mqtt: Some(MqttFigures {
            broker: on.into(),
            qos: 0,
            published: report.messages,
            publish_per_sec: report.messages_per_sec(),
            received: outcome.messages,
            messages_per_sec: pipeline_rate,
            null_received: Some(drained.received),
            null_messages_per_sec: Some(null_rate),
            ratio: (null_rate > 0.0).then(|| pipeline_rate / null_rate),
            cpu_percent: cpu_start.percent_until(&cpu_end),
            broker_cpu_percent: broker_start
                .zip(broker_end)
                .and_then(|(s, e)| s.percent_until(&e)),
            publisher_cpu_percent: None,
            broker_peak_rss_mb: broker.pid().and_then(|pid| peak_rss_mb(Some(pid))),
            e2e_p50_ms: None,
            e2e_p99_ms: None,
            e2e_max_ms: None,
            result_p99_ms: None,
            dead_letters: outcome.dead_letters,
            notes,
        }),
    })
}

/// Notes on a pipeline run that did not go as it should.
fn pipeline_notes(outcome: &CountedOutcome, notes: &mut Vec<String>) {
    if outcome.state != PipelineState::Finished {
        notes.push(format!("pipeline ended as {:?}", outcome.state));
    }
    if outcome.progress.stalled {
        notes.push(format!(
            "the pipeline stopped waiting after {} s without messages",
            STALL.as_secs()
        ));
    }
    if outcome.dead_letters > 0 {
        notes.push(format!("{} dead letters", outcome.dead_letters));
    }
}

async fn backlog(broker: &Broker, args: &BenchArgs, qos: u8) -> anyhow::Result<ScenarioResult> {
    let scenario = MqttScenario::Backlog.name();
    let on = broker.kind.name();
    let level = qos_level(qos);
    let per_tick = u64::from(args.sensors) * u64::from(BLOCK_SAMPLES);
    // Without faults every sample is a message, so the backlog is exactly ticks x per_tick.
    let publisher = PublisherArgs {
        url: broker.url.clone(),
        sensors: args.sensors,
        ticks: args.backlog.div_ceil(per_tick).max(1),
        shape: Shape::Rows,
        qos,
        realtime: false,
        start_ms: reproducible_start_ms()?,
        first_tick_at_ms: None,
        seed: 42,
        faults: false,
    };

    eprintln!("{scenario} on {on}, QoS {qos}: two persistent sessions subscribe and leave");
    prepare_session(&broker.url, NULL_CLIENT, SENSOR_FILTER, level).await?;
    prepare_session(&broker.url, PIPELINE_CLIENT, SENSOR_FILTER, level).await?;
    eprintln!(
        "{scenario} on {on}, QoS {qos}: publishing {} messages",
        publisher.ticks * per_tick
    );
    let report = PublisherProcess::spawn(&publisher)?.finish().await?;
    // Let the broker route what is still in its socket buffers before anyone drains.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let published = report.messages;

    eprintln!("{scenario} on {on}, QoS {qos}: null subscriber drains its session");
    let expected = AtomicU64::new(published);
    let since = Instant::now();
    let null_cpu = CpuMark::now(None);
    let null = NullSubscriber::start(
        &broker.url,
        &Session::Persistent(NULL_CLIENT.into()),
        SENSOR_FILTER,
        level,
    )?;
    let drained = null.drain(since, &expected, STALL).await;
    let null_cpu_end = CpuMark::now(None);
    null.stop().await;
    let null_rate = rate(drained.received, Some(since), drained.last);

    eprintln!("{scenario} on {on}, QoS {qos}: the pipeline drains its session");
    reset_peak_rss();
    let session = format!(", clean_session = false, client_id = '{PIPELINE_CLIENT}'");
    let cpu_start = CpuMark::now(None);
    let broker_start = broker.pid().map(|pid| CpuMark::now(Some(pid)));
    let run = CountedRun::start(
        &rows_sql(&broker.url, qos, &session),
        Arc::new(AtomicU64::new(published)),
    )?;
    let outcome = run.finish().await;
    let cpu_end = CpuMark::now(None);
    let broker_end = broker.pid().map(|pid| CpuMark::now(Some(pid)));
    let peak = peak_rss_mb(None).unwrap_or(0.0);

    let verdict = check_results(&publisher, &outcome.results)?;
    let last = outcome.progress.last_batch.map(|_| outcome.done());
    let pipeline_rate = rate(outcome.messages, Some(outcome.started), last);
    let seconds = outcome.done().duration_since(outcome.started).as_secs_f64();
    let mut notes = vec![
        format!(
            "backlog of {published} messages published at QoS {qos} ({:.0} msg/s) while both \
             persistent sessions were away; rates: messages received / (last arrival - connect)",
            report.messages_per_sec()
        ),
        format!(
            "null subscriber received {} of {published}, pipeline {} of {published}",
            drained.received, outcome.messages
        ),
        format!(
            "null phase cpu {:.0}% of one core",
            null_cpu.percent_until(&null_cpu_end).unwrap_or(0.0)
        ),
    ];
    if qos == 1 {
        notes.push(format!(
            "the broker acknowledged {} of the publisher's {} QoS 1 publishes before it \
             disconnected",
            report.acknowledged, report.messages
        ));
    }
    if broker.kind == BrokerKind::Mosquitto && qos == 0 && drained.received < published {
        notes.push(
            "Mosquitto queues QoS 0 messages for offline sessions only with \
             queue_qos0_messages true"
                .into(),
        );
    }
    if broker.kind == BrokerKind::Embedded {
        notes.push(
            "peak RSS includes the embedded broker holding the backlog (same process)".into(),
        );
    }
    pipeline_notes(&outcome, &mut notes);
    Ok(ScenarioResult {
        input_mb: None,
        process_cpu_percent: None,
        scenario: scenario.into(),
        samples: outcome.progress.rows,
        seconds,
        samples_per_sec: outcome.progress.rows as f64 / seconds.max(1e-9),
        p50_ms: outcome.snapshot.watermark_to_emit.p50_ms,
        p99_ms: outcome.snapshot.watermark_to_emit.p99_ms,
        peak_rss_mb: peak,
        windows: verdict.windows,
        correct: outcome.state == PipelineState::Finished
            && verdict.correct()
            && outcome.messages == published
            && drained.complete,
        mqtt: Some(MqttFigures {
            broker: on.into(),
            qos,
            published,
            publish_per_sec: report.messages_per_sec(),
            received: outcome.messages,
            messages_per_sec: pipeline_rate,
            null_received: Some(drained.received),
            null_messages_per_sec: Some(null_rate),
            ratio: (null_rate > 0.0).then(|| pipeline_rate / null_rate),
            cpu_percent: cpu_start.percent_until(&cpu_end),
            broker_cpu_percent: broker_start
                .zip(broker_end)
                .and_then(|(s, e)| s.percent_until(&e)),
            publisher_cpu_percent: None,
            broker_peak_rss_mb: broker.pid().and_then(|pid| peak_rss_mb(Some(pid))),
            e2e_p50_ms: None,
            e2e_p99_ms: None,
            e2e_max_ms: None,
            result_p99_ms: None,
            dead_letters: outcome.dead_letters,
            notes,
        }),
    })
}

/// Sleeps until the wall clock reads `epoch_ms`.
async fn sleep_until_wall(epoch_ms: i64) {
    let now = epoch_ms_now();
    if epoch_ms > now {
        tokio::time::sleep(Duration::from_millis((epoch_ms - now) as u64)).await;
    }
}

/// The value at quantile `q` (nearest rank) of sorted `values`.
fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

async fn realtime(
    broker: &Broker,
    args: &BenchArgs,
    results_qos: u8,
) -> anyhow::Result<ScenarioResult> {
    let scenario = MqttScenario::BlocksRealtime.name();
    let on = broker.kind.name();
    let sensors = args.realtime_sensors;
    let ticks = u64::from(args.seconds) * 10;

    let engine = Engine::new(EngineOptions::default());
    let dead_letters = DeadLetterQueue::default();
    let mut handle = engine.start_plan(
        compile(&realtime_sql(&broker.url, results_qos))?,
        dead_letters.clone(),
    )?;
    // As the gateway does after a deploy.
    weir_gateway::memory::release_startup_code_logged();
    // A fresh process: the source has not connected yet, so it has no subscription.
    let stats = source_stats()?;
    subscribed(&stats, 0).await?;
    // The reader subscribes at the results' QoS: a consumer that wants them acknowledged.
    let reader = ResultReader::start(&broker.url, RESULT_FILTER, qos_level(results_qos)).await?;

    // The first tick on a whole second, and blocks sent when their last sample is due, as a
    // sensor would: the block [t, t + 100 ms) leaves at t + 100 ms.
    let first_tick = (epoch_ms_now() + 1500).div_euclid(1000) * 1000 + 1000;
    let publisher = PublisherArgs {
        url: broker.url.clone(),
        sensors,
        ticks,
        shape: Shape::Blocks,
        qos: 0,
        realtime: true,
        start_ms: first_tick - BLOCK_MS,
        first_tick_at_ms: Some(first_tick),
        seed: 42,
        faults: true,
    };
    let last_tick = first_tick + (ticks as i64 - 1) * BLOCK_MS;
    eprintln!(
        "{scenario} on {on}: {sensors} sensors x 1 kHz in 100-sample blocks for {} s",
        args.seconds
    );
    let process = PublisherProcess::spawn(&publisher)?;
    let publisher_pid = process.pid();
    reset_peak_rss();
    sleep_until_wall(first_tick + WARMUP_MS).await;
    let marks = |pid: Option<u32>| pid.map(|pid| CpuMark::now(Some(pid)));
    let (cpu_start, broker_start, publisher_start) = (
        CpuMark::now(None),
        marks(broker.pid()),
        marks(publisher_pid),
    );
    let steady_from = epoch_ms_now();
    sleep_until_wall(last_tick + BLOCK_MS).await;
    let (cpu_end, broker_end, publisher_end) = (
        CpuMark::now(None),
        marks(broker.pid()),
        marks(publisher_pid),
    );
    let report = process.finish().await?;
    // Results of the last windows closed by data are on their way.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (arrivals, unreadable) = reader.stop();
    let peak = peak_rss_mb(None).unwrap_or(0.0);
    let broker_peak = broker.pid().and_then(|pid| peak_rss_mb(Some(pid)));
    let snapshot = handle.metrics.snapshot();
    let closes = handle.metrics.window_closes();
    let state = handle.state.borrow().clone();
    engine.shutdown().await;
    let _ = handle.wait().await;

    // The watermark passes window end E with the first block holding sample E + delay: the
    // tick that starts there, due at E + delay + one block period. What counts is when that
    // tick's first message actually left the publisher, which it reports per tick.
    let due = |window_end: i64| window_end + REALTIME_DELAY_MS + BLOCK_MS;
    let watermark_passes = |window_end: i64| {
        let tick = (window_end + REALTIME_DELAY_MS - publisher.start_ms).div_euclid(BLOCK_MS);
        usize::try_from(tick)
            .ok()
            .and_then(|tick| report.tick_sent_ms.get(tick).copied())
    };
    let closed_by_data = |window_end: i64| due(window_end) <= last_tick;
    // When the engine's source moved the watermark past the window end (epoch ms).
    let engine_passes = |window_end: i64| {
        closes
            .iter()
            .find(|close| close.watermark_ns >= window_end.saturating_mul(1_000_000))
            .map(|close| close.passed_at_ms)
    };
    let lateness: Vec<f64> = {
        let mut late: Vec<f64> = report
            .tick_sent_ms
            .iter()
            .enumerate()
            .map(|(tick, &sent)| sent - (first_tick + tick as i64 * BLOCK_MS) as f64)
            .collect();
        late.sort_by(f64::total_cmp);
        late
    };
    let mut check = WindowCheck::new(
        publisher.model(),
        publisher.start_ms,
        ticks * u64::from(BLOCK_SAMPLES),
    );
    let mut latencies = Vec::new();
    let mut from_watermark = Vec::new();
    // Per window end: the first and the last result's latency, to tell the time until the
    // window closes from the time to publish and deliver all of its results.
    let mut spread: std::collections::BTreeMap<i64, (f64, f64)> = Default::default();
    for arrival in &arrivals {
        let row = &arrival.row;
        if !closed_by_data(row.window_end) {
            continue;
        }
        check.record(
            &row.sensor,
            row.window_start,
            row.rms,
            row.peak,
            row.samples,
        );
        if due(row.window_end) >= steady_from
            && let Some(passed) = watermark_passes(row.window_end)
        {
            let latency = arrival.arrived_ms - passed;
            latencies.push(latency);
            from_watermark
                .extend(engine_passes(row.window_end).map(|passed| arrival.arrived_ms - passed));
            let entry = spread.entry(row.window_end).or_insert((latency, latency));
            *entry = (entry.0.min(latency), entry.1.max(latency));
        }
    }
    latencies.sort_by(f64::total_cmp);
    from_watermark.sort_by(f64::total_cmp);
    let mut firsts: Vec<f64> = spread.values().map(|v| v.0).collect();
    let mut lasts: Vec<f64> = spread.values().map(|v| v.1).collect();
    firsts.sort_by(f64::total_cmp);
    lasts.sort_by(f64::total_cmp);
    let windows: Vec<i64> = check
        .all_windows()
        .filter(|start| closed_by_data(start + WINDOW_MS))
        .collect();
    let verdict = check.verdict(windows.iter().copied());
    let received = MqttStats::get(&stats.messages);
    let rows = snapshot.stages.first().map_or(0, |s| s.rows_out);
    let seconds = (report.seconds).max(1e-9);
    let mut notes = vec![
        format!(
            "cpu% = this process's user+system CPU / wall time from {} s after the first tick \
             to the last tick, as % of one core; it includes the bench's own result reader \
             (one MQTT client reading and parsing every result message)",
            WARMUP_MS / 1000
        ),
        format!(
            "e2e = arrival on plant1/+/rms - the moment the watermark passed window_end: when \
             the publisher sent the first message of the tick due at window_end + {} ms \
             watermark delay + {} ms block period (ticks left p50 {:.2} ms / p99 {:.2} ms \
             after they were due); {} results in steady state",
            REALTIME_DELAY_MS,
            BLOCK_MS,
            quantile(&lateness, 0.5).unwrap_or(f64::NAN),
            quantile(&lateness, 0.99).unwrap_or(f64::NAN),
            latencies.len()
        ),
        format!(
            "res = arrival on plant1/+/rms - the moment the engine's source moved the \
             watermark past window_end, as the engine records it: the same results without \
             the sensors' messages' way through the broker; p50 {:.1} ms, p99 {:.1} ms, max \
             {:.1} ms",
            quantile(&from_watermark, 0.5).unwrap_or(f64::NAN),
            quantile(&from_watermark, 0.99).unwrap_or(f64::NAN),
            from_watermark.last().copied().unwrap_or(f64::NAN),
        ),
        "p50/p99 = engine's watermark arrival at the window operator -> windows emitted \
         (whole run)"
            .into(),
        format!(
            "per window, the first result arrived p50 {:.1} ms / max {:.1} ms and the last \
             p50 {:.1} ms / max {:.1} ms after the watermark passed; engine source batch -> \
             sink write p50 {:.2} ms, p99 {:.2} ms",
            quantile(&firsts, 0.5).unwrap_or(f64::NAN),
            firsts.last().copied().unwrap_or(f64::NAN),
            quantile(&lasts, 0.5).unwrap_or(f64::NAN),
            lasts.last().copied().unwrap_or(f64::NAN),
            snapshot.source_to_sink.p50_ms,
            snapshot.source_to_sink.p99_ms
        ),
        format!(
            "publisher (own process) sent {} messages, {} samples in {:.1} s",
            report.messages, report.samples, report.seconds
        ),
        format!(
            "windows closed by data: {} received, {} missing, {} wrong, {} duplicated",
            verdict.windows, verdict.missing, verdict.wrong, verdict.duplicates
        ),
    ];
    match broker.kind {
        BrokerKind::Embedded => notes.push(format!(
            "the embedded broker runs in this process: its CPU and memory are included in \
             cpu% and peak RSS; it keeps up to {} segments of {} MiB of the sensors' messages \
             (--embedded-segments, --embedded-segment-bytes)",
            broker.embedded_retention.0,
            broker.embedded_retention.1 >> 20
        )),
        BrokerKind::Mosquitto => notes.push(
            "Mosquitto's own CPU and peak RSS are reported separately (broker cpu%, broker MB)"
                .into(),
        ),
    }
    if !matches!(state, PipelineState::Running) {
        notes.push(format!("pipeline state at the end: {state:?}"));
    }
    if dead_letters.count() > 0 {
        notes.push(format!("{} dead letters", dead_letters.count()));
    }
    if unreadable > 0 {
        notes.push(format!(
            "{unreadable} result messages were not readable JSON rows"
        ));
    }
    Ok(ScenarioResult {
        input_mb: None,
        process_cpu_percent: None,
        scenario: scenario.into(),
        samples: rows,
        seconds,
        samples_per_sec: rows as f64 / seconds,
        p50_ms: snapshot.watermark_to_emit.p50_ms,
        p99_ms: snapshot.watermark_to_emit.p99_ms,
        peak_rss_mb: peak,
        windows: verdict.windows,
        correct: verdict.correct()
            && unreadable == 0
            && !windows.is_empty()
            && matches!(state, PipelineState::Running),
        mqtt: Some(MqttFigures {
            broker: on.into(),
            qos: results_qos,
            published: report.messages,
            publish_per_sec: report.messages_per_sec(),
            received,
            messages_per_sec: received as f64 / seconds,
            null_received: None,
            null_messages_per_sec: None,
            ratio: None,
            cpu_percent: cpu_start.percent_until(&cpu_end),
            broker_cpu_percent: broker_start
                .zip(broker_end)
                .and_then(|(s, e)| s.percent_until(&e)),
            publisher_cpu_percent: publisher_start
                .zip(publisher_end)
                .and_then(|(s, e)| s.percent_until(&e)),
            broker_peak_rss_mb: broker_peak,
            e2e_p50_ms: quantile(&latencies, 0.5),
            e2e_p99_ms: quantile(&latencies, 0.99),
            e2e_max_ms: latencies.last().copied(),
            result_p99_ms: quantile(&from_watermark, 0.99),
            dead_letters: dead_letters.count(),
            notes,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&values, 0.5), Some(50.0));
        assert_eq!(quantile(&values, 0.99), Some(99.0));
        assert_eq!(quantile(&values, 1.0), Some(100.0));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn the_bench_sql_compiles() {
        assert!(compile(&rows_sql("mqtt://127.0.0.1:1883", 1, ", client_id = 'x'")).is_ok());
        assert!(compile(&realtime_sql("mqtt://127.0.0.1:1883", 1)).is_ok());
    }
}
