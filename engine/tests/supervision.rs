//! Engine behaviour that needs real actors: backpressure from a slow sink, and a panicking
//! pipeline restarted by its supervisor while another pipeline keeps producing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arrow::array::{Float64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use weir_connectors::{DeadLetterQueue, Sink, Source, SourceEvent, SourceFuture, WindowEnds};
use weir_engine::{
    Engine, EngineOptions, PipelineFactory, PipelineParts, PipelineState, WatermarkRule,
};
use weir_operators::{Collector, Operator};

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new("v", DataType::Float64, false)]))
}

fn batch(rows: usize) -> RecordBatch {
    RecordBatch::try_new(
        schema(),
        vec![Arc::new(Float64Array::from(vec![1.0; rows]))],
    )
    .expect("batch")
}

/// Yields `remaining` batches (endless if `None`), then ends.
struct TestSource {
    remaining: Option<usize>,
    rows: usize,
}

impl Source for TestSource {
    fn schema(&self) -> SchemaRef {
        schema()
    }

    fn next_event(&mut self) -> SourceFuture<'_> {
        Box::pin(async move {
            match &mut self.remaining {
                Some(0) => Ok(SourceEvent::End),
                Some(n) => {
                    *n -= 1;
                    // Let other tasks run, as a real source waiting on I/O would.
                    tokio::task::yield_now().await;
                    Ok(SourceEvent::Batch(batch(self.rows)))
                }
                None => {
                    tokio::task::yield_now().await;
                    Ok(SourceEvent::Batch(batch(self.rows)))
                }
            }
        })
    }
}

/// Counts rows; optionally sleeps per batch to play a slow destination.
struct CountingSink {
    rows: Arc<AtomicU64>,
    delay: Duration,
}

impl Sink for CountingSink {
    fn write_batch(&mut self, batch: &RecordBatch) -> weir_connectors::Result<()> {
        std::thread::sleep(self.delay);
        self.rows
            .fetch_add(batch.num_rows() as u64, Ordering::SeqCst);
        Ok(())
    }

    fn flush(&mut self) -> weir_connectors::Result<()> {
        Ok(())
    }
}

/// Passes batches through, but panics on its first batch in the first `panicking_runs` runs.
struct FlakyOperator {
    panics: bool,
}

impl Operator for FlakyOperator {
    fn name(&self) -> &str {
        "flaky"
    }

    fn output_schema(&self) -> SchemaRef {
        schema()
    }

    fn process_batch(
        &mut self,
        batch: RecordBatch,
        out: &mut Collector,
    ) -> weir_operators::Result<()> {
        assert!(!self.panics, "flaky operator panics on purpose");
        out.emit(batch);
        Ok(())
    }
}

struct TestFactory {
    batches: Option<usize>,
    rows_per_batch: usize,
    sink_rows: Arc<AtomicU64>,
    sink_delay: Duration,
    runs: Arc<AtomicU32>,
    panicking_runs: u32,
}

impl PipelineFactory for TestFactory {
    fn stage_names(&self) -> Vec<String> {
        vec!["source".into(), "flaky".into(), "sink".into()]
    }

    fn build(&self) -> weir_engine::Result<PipelineParts> {
        let run = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(PipelineParts {
            source: Box::new(TestSource {
                remaining: self.batches,
                rows: self.rows_per_batch,
            }),
            watermark: None,
            operators: vec![Box::new(FlakyOperator {
                panics: run <= self.panicking_runs,
            })],
            sink: Box::new(CountingSink {
                rows: Arc::clone(&self.sink_rows),
                delay: self.sink_delay,
            }),
            dead_letters: DeadLetterQueue::default(),
        })
    }
}

fn factory(
    batches: Option<usize>,
    rows: usize,
    delay: Duration,
    panicking_runs: u32,
) -> (Arc<TestFactory>, Arc<AtomicU64>, Arc<AtomicU32>) {
    let sink_rows = Arc::new(AtomicU64::new(0));
    let runs = Arc::new(AtomicU32::new(0));
    let factory = Arc::new(TestFactory {
        batches,
        rows_per_batch: rows,
        sink_rows: Arc::clone(&sink_rows),
        sink_delay: delay,
        runs: Arc::clone(&runs),
        panicking_runs,
    });
    (factory, sink_rows, runs)
}

fn system() -> actix_rt::SystemRunner {
    actix_rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

/// Polls `condition` until it holds or a generous deadline passes.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[test]
fn a_panicking_pipeline_is_restarted_while_another_keeps_producing() {
    system().block_on(async {
        let options = EngineOptions {
            initial_backoff: Duration::from_millis(20),
            ..EngineOptions::default()
        };
        let engine = Engine::new(options);
        let (flaky, flaky_rows, flaky_runs) = factory(Some(50), 10, Duration::ZERO, 2);
        let (steady, steady_rows, steady_runs) = factory(None, 10, Duration::ZERO, 0);
        let mut flaky_handle = engine.start("flaky".into(), flaky).expect("starts");
        let steady_handle = engine.start("steady".into(), steady).expect("starts");

        // The healthy pipeline keeps producing while the other one panics and restarts.
        let state = flaky_handle.wait().await;
        assert_eq!(state, PipelineState::Finished);
        assert_eq!(
            flaky_runs.load(Ordering::SeqCst),
            3,
            "two panicking runs, then one good run"
        );
        assert_eq!(flaky_handle.metrics.snapshot().restarts, 2);
        assert_eq!(
            flaky_rows.load(Ordering::SeqCst),
            500,
            "the good run delivers every row"
        );

        let before = steady_rows.load(Ordering::SeqCst);
        assert!(
            before > 0,
            "the steady pipeline produced while the flaky one restarted"
        );
        eventually("the steady pipeline to keep producing", || {
            steady_rows.load(Ordering::SeqCst) > before
        })
        .await;
        assert_eq!(
            steady_runs.load(Ordering::SeqCst),
            1,
            "the steady pipeline was never restarted"
        );
        assert_eq!(*steady_handle.state.borrow(), PipelineState::Running);
        engine.shutdown().await;
    });
}

#[test]
fn a_pipeline_that_keeps_failing_stops_after_its_restart_budget() {
    system().block_on(async {
        let options = EngineOptions {
            initial_backoff: Duration::from_millis(1),
            max_restarts: 3,
            ..EngineOptions::default()
        };
        let engine = Engine::new(options);
        let (always, _, runs) = factory(Some(5), 1, Duration::ZERO, u32::MAX);
        let mut handle = engine
            .start("always-panics".into(), always)
            .expect("starts");
        let state = handle.wait().await;
        assert!(
            matches!(&state, PipelineState::Failed(reason) if reason.contains("panicked")),
            "{state:?}"
        );
        assert_eq!(
            runs.load(Ordering::SeqCst),
            4,
            "the first run and three restarts"
        );
        engine.shutdown().await;
    });
}

#[test]
fn a_slow_sink_slows_the_source_instead_of_growing_memory() {
    system().block_on(async {
        let options = EngineOptions {
            in_flight: 4,
            workers: 4,
            ..EngineOptions::default()
        };
        let engine = Engine::new(options);
        let (endless, sink_rows, _) = factory(None, 1000, Duration::from_millis(2), 0);
        let handle = engine
            .start("backpressure".into(), endless)
            .expect("starts");
        eventually("the sink to take 200 batches", || {
            sink_rows.load(Ordering::SeqCst) >= 200 * 1000
        })
        .await;
        let snapshot = handle.metrics.snapshot();
        let produced = snapshot.stages[0].batches_out;
        let consumed = snapshot.stages[2].batches_in;
        // Two edges of at most `in_flight` unhandled messages each, plus what each of the
        // three actors holds while working: everything else must wait in the source.
        let bound = 2 * 4 + 3;
        assert!(
            produced <= consumed + bound,
            "source ran ahead of a slow sink: {produced} batches produced, {consumed} written"
        );
        engine.shutdown().await;
    });
}

/// Yields one batch of event times, then waits forever, like a sensor that went quiet.
/// Sends one batch with these event times, then nothing.
struct QuietSource {
    times: Vec<i64>,
    sent: bool,
}

fn time_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new(
        "ts",
        DataType::Timestamp(arrow::datatypes::TimeUnit::Nanosecond, None),
        false,
    )]))
}

impl Source for QuietSource {
    fn schema(&self) -> SchemaRef {
        time_schema()
    }

    fn next_event(&mut self) -> SourceFuture<'_> {
        Box::pin(async move {
            if self.sent {
                std::future::pending::<()>().await;
            }
            self.sent = true;
            let times = arrow::array::TimestampNanosecondArray::from(self.times.clone());
            Ok(SourceEvent::Batch(
                RecordBatch::try_new(time_schema(), vec![Arc::new(times)]).expect("batch"),
            ))
        })
    }
}

/// Records the highest watermark it has seen.
struct WatermarkProbe {
    seen: Arc<std::sync::atomic::AtomicI64>,
}

impl Operator for WatermarkProbe {
    fn name(&self) -> &str {
        "probe"
    }

    fn output_schema(&self) -> SchemaRef {
        time_schema()
    }

    fn process_batch(
        &mut self,
        batch: RecordBatch,
        out: &mut Collector,
    ) -> weir_operators::Result<()> {
        out.emit(batch);
        Ok(())
    }

    fn on_watermark(
        &mut self,
        watermark: weir_operators::Watermark,
        _: &mut Collector,
    ) -> weir_operators::Result<()> {
        self.seen.fetch_max(watermark.0, Ordering::SeqCst);
        Ok(())
    }
}

struct QuietFactory {
    seen: Arc<std::sync::atomic::AtomicI64>,
    times: Vec<i64>,
    rows: Arc<AtomicU64>,
    dead_letters: DeadLetterQueue,
}

impl QuietFactory {
    fn new(times: Vec<i64>) -> Self {
        Self {
            seen: Arc::new(std::sync::atomic::AtomicI64::new(i64::MIN)),
            times,
            rows: Arc::default(),
            dead_letters: DeadLetterQueue::default(),
        }
    }
}

impl PipelineFactory for QuietFactory {
    fn stage_names(&self) -> Vec<String> {
        vec!["source".into(), "probe".into(), "sink".into()]
    }

    fn build(&self) -> weir_engine::Result<PipelineParts> {
        Ok(PipelineParts {
            source: Box::new(QuietSource {
                times: self.times.clone(),
                sent: false,
            }),
            watermark: Some(weir_engine::WatermarkRule {
                column: 0,
                delay_ns: 2_000_000,
            }),
            operators: vec![Box::new(WatermarkProbe {
                seen: Arc::clone(&self.seen),
            })],
            sink: Box::new(CountingSink {
                rows: Arc::clone(&self.rows),
                delay: Duration::ZERO,
            }),
            dead_letters: self.dead_letters.clone(),
        })
    }
}

#[test]
fn an_idle_source_advances_its_watermark_by_the_wall_clock() {
    system().block_on(async {
        let options = EngineOptions {
            idle_timeout: Duration::from_millis(50),
            ..EngineOptions::default()
        };
        let engine = Engine::new(options);
        let factory = Arc::new(QuietFactory::new(vec![0, 5_000_000, 10_000_000]));
        let seen = Arc::clone(&factory.seen);
        let _handle = engine.start("quiet".into(), factory).expect("starts");
        // First from the data: max event time 10 ms minus the 2 ms delay.
        eventually("the data watermark", || {
            seen.load(Ordering::SeqCst) >= 8_000_000
        })
        .await;
        // Then, with no more data, event time follows the wall clock past the last row.
        eventually("the idle watermark to pass 200 ms of event time", || {
            seen.load(Ordering::SeqCst) > 200_000_000
        })
        .await;
        engine.shutdown().await;
    });
}

#[test]
fn a_row_from_a_clock_far_ahead_is_dead_lettered_instead_of_moving_the_watermark() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as i64;
    let hour = 3_600_000_000_000_i64;
    let times = vec![now - 1_000_000_000, now, now + hour];
    let run = |max_event_ahead: Option<Duration>| {
        let factory = Arc::new(QuietFactory::new(times.clone()));
        system().block_on(async {
            let engine = Engine::new(EngineOptions {
                idle_timeout: Duration::from_secs(60),
                max_event_ahead,
                ..EngineOptions::default()
            });
            let _handle = engine
                .start("clocks".into(), Arc::clone(&factory) as _)
                .expect("starts");
            eventually("the batch to pass", || {
                factory.seen.load(Ordering::SeqCst) > i64::MIN
            })
            .await;
            engine.shutdown().await;
        });
        factory
    };

    let bounded = run(Some(Duration::from_secs(300)));
    let watermark = bounded.seen.load(Ordering::SeqCst);
    assert_eq!(watermark, now - 2_000_000, "from the latest believable row");
    assert_eq!(bounded.rows.load(Ordering::SeqCst), 2);
    assert_eq!(
        bounded.dead_letters.counts_by_reason(),
        [(
            "event time more than 5m ahead of the gateway clock".to_owned(),
            1
        )]
    );

    // Without the bound, the one row pushes event time an hour ahead.
    let unbounded = run(None);
    assert_eq!(
        unbounded.seen.load(Ordering::SeqCst),
        now + hour - 2_000_000
    );
    assert_eq!(unbounded.rows.load(Ordering::SeqCst), 3);
}

/// Waits in `write_batch` until released, as a sink whose broker is away does.
struct StuckSink {
    entered: Arc<std::sync::atomic::AtomicBool>,
    released: Arc<std::sync::atomic::AtomicBool>,
}

impl Sink for StuckSink {
    fn write_batch(&mut self, _: &RecordBatch) -> weir_connectors::Result<()> {
        self.entered.store(true, Ordering::SeqCst);
        while !self.released.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    fn flush(&mut self) -> weir_connectors::Result<()> {
        Ok(())
    }

    fn may_block(&self) -> bool {
        true
    }
}

#[derive(Default)]
struct StuckFactory {
    entered: Arc<std::sync::atomic::AtomicBool>,
    released: Arc<std::sync::atomic::AtomicBool>,
}

impl PipelineFactory for StuckFactory {
    fn stage_names(&self) -> Vec<String> {
        vec!["source".into(), "flaky".into(), "sink".into()]
    }

    fn build(&self) -> weir_engine::Result<PipelineParts> {
        Ok(PipelineParts {
            source: Box::new(TestSource {
                remaining: None,
                rows: 10,
            }),
            watermark: None,
            operators: vec![Box::new(FlakyOperator { panics: false })],
            sink: Box::new(StuckSink {
                entered: Arc::clone(&self.entered),
                released: Arc::clone(&self.released),
            }),
            dead_letters: DeadLetterQueue::default(),
        })
    }
}

#[test]
fn a_sink_waiting_on_its_broker_holds_up_no_other_pipeline() {
    system().block_on(async {
        // One worker thread: without a thread of its own, the waiting sink would hold it.
        let engine = Engine::new(EngineOptions {
            workers: 1,
            ..EngineOptions::default()
        });
        let stuck = Arc::new(StuckFactory::default());
        let _waiting = engine
            .start("waiting".into(), Arc::clone(&stuck) as _)
            .expect("starts");
        eventually("the sink to wait", || stuck.entered.load(Ordering::SeqCst)).await;
        let (other, rows, _) = factory(None, 10, Duration::ZERO, 0);
        let _other = engine.start("other".into(), other).expect("starts");
        eventually("the other pipeline to keep producing", || {
            rows.load(Ordering::SeqCst) >= 10_000
        })
        .await;
        stuck.released.store(true, Ordering::SeqCst);
        engine.shutdown().await;
    });
}

/// Ends at once, keeping what it was told of the windows downstream.
struct EndsRecordingSource {
    told: Arc<std::sync::Mutex<Option<WindowEnds>>>,
}

impl Source for EndsRecordingSource {
    fn schema(&self) -> SchemaRef {
        schema()
    }

    fn next_event(&mut self) -> SourceFuture<'_> {
        Box::pin(async { Ok(SourceEvent::End) })
    }

    fn set_window_ends(&mut self, ends: WindowEnds) {
        *self.told.lock().expect("lock") = Some(ends);
    }
}

/// Passes batches through; says it emits on watermarks at multiples of `every`.
struct PeriodicOperator {
    every: Option<i64>,
}

impl Operator for PeriodicOperator {
    fn name(&self) -> &str {
        "periodic"
    }

    fn output_schema(&self) -> SchemaRef {
        schema()
    }

    fn process_batch(
        &mut self,
        batch: RecordBatch,
        out: &mut Collector,
    ) -> weir_operators::Result<()> {
        out.emit(batch);
        Ok(())
    }

    fn emits_every(&self) -> Option<i64> {
        self.every
    }
}

struct PeriodicFactory {
    periods: Vec<Option<i64>>,
    watermark: Option<WatermarkRule>,
    told: Arc<std::sync::Mutex<Option<WindowEnds>>>,
}

impl PipelineFactory for PeriodicFactory {
    fn stage_names(&self) -> Vec<String> {
        std::iter::once("source".to_string())
            .chain(self.periods.iter().map(|_| "periodic".to_string()))
            .chain(std::iter::once("sink".to_string()))
            .collect()
    }

    fn build(&self) -> weir_engine::Result<PipelineParts> {
        Ok(PipelineParts {
            source: Box::new(EndsRecordingSource {
                told: Arc::clone(&self.told),
            }),
            watermark: self.watermark,
            operators: self
                .periods
                .iter()
                .map(|&every| Box::new(PeriodicOperator { every }) as Box<dyn Operator>)
                .collect(),
            sink: Box::new(CountingSink {
                rows: Arc::default(),
                delay: Duration::ZERO,
            }),
            dead_letters: DeadLetterQueue::default(),
        })
    }
}

/// What a pipeline of operators with `periods` tells its source, under `watermark`.
fn window_ends_told(
    periods: Vec<Option<i64>>,
    watermark: Option<WatermarkRule>,
) -> Option<WindowEnds> {
    system().block_on(async {
        let engine = Engine::new(EngineOptions {
            max_event_ahead: Some(Duration::from_secs(60)),
            ..EngineOptions::default()
        });
        let told = Arc::new(std::sync::Mutex::new(None));
        let factory = Arc::new(PeriodicFactory {
            periods,
            watermark,
            told: Arc::clone(&told),
        });
        let mut handle = engine.start("periodic".into(), factory).expect("starts");
        assert_eq!(handle.wait().await, PipelineState::Finished);
        engine.shutdown().await;
        *told.lock().expect("lock")
    })
}

#[test]
fn the_source_learns_where_the_windows_downstream_close() {
    const SECOND: i64 = 1_000_000_000;
    let watermark = WatermarkRule {
        column: 0,
        delay_ns: SECOND / 2,
    };
    // A 2 s and a 3 s window after a stateless operator: some window ends at every whole
    // second, so the source may end a batch at any of them.
    assert_eq!(
        window_ends_told(
            vec![None, Some(2 * SECOND), Some(3 * SECOND)],
            Some(watermark)
        ),
        Some(WindowEnds {
            every_ns: SECOND,
            delay_ns: SECOND / 2,
            max_ahead_ns: Some(60 * SECOND),
        })
    );
    // Without windows, or without event time, there is nothing to tell.
    assert_eq!(window_ends_told(vec![None], Some(watermark)), None);
    assert_eq!(window_ends_told(vec![Some(SECOND)], None), None);
}

/// Hands over `batches` batches without ever waiting, as a source does with a burst that is
/// already in memory, counting them; then waits forever.
struct BurstSource {
    batches: u64,
    produced: Arc<AtomicU64>,
}

impl Source for BurstSource {
    fn schema(&self) -> SchemaRef {
        schema()
    }

    fn next_event(&mut self) -> SourceFuture<'_> {
        Box::pin(async move {
            if self.produced.load(Ordering::SeqCst) == self.batches {
                std::future::pending::<()>().await;
            }
            self.produced.fetch_add(1, Ordering::SeqCst);
            Ok(SourceEvent::Batch(batch(10)))
        })
    }
}

/// Notes how many batches the source had produced when the first one got here.
struct FirstSeenProbe {
    produced: Arc<AtomicU64>,
    seen_at: Arc<AtomicU64>,
}

impl Operator for FirstSeenProbe {
    fn name(&self) -> &str {
        "probe"
    }

    fn output_schema(&self) -> SchemaRef {
        schema()
    }

    fn process_batch(
        &mut self,
        batch: RecordBatch,
        out: &mut Collector,
    ) -> weir_operators::Result<()> {
        let produced = self.produced.load(Ordering::SeqCst);
        let _ = self
            .seen_at
            .compare_exchange(0, produced, Ordering::SeqCst, Ordering::SeqCst);
        out.emit(batch);
        Ok(())
    }
}

struct BurstFactory {
    produced: Arc<AtomicU64>,
    seen_at: Arc<AtomicU64>,
    sink_rows: Arc<AtomicU64>,
}

impl PipelineFactory for BurstFactory {
    fn stage_names(&self) -> Vec<String> {
        vec!["source".into(), "probe".into(), "sink".into()]
    }

    fn build(&self) -> weir_engine::Result<PipelineParts> {
        Ok(PipelineParts {
            source: Box::new(BurstSource {
                batches: 100,
                produced: Arc::clone(&self.produced),
            }),
            watermark: None,
            operators: vec![Box::new(FirstSeenProbe {
                produced: Arc::clone(&self.produced),
                seen_at: Arc::clone(&self.seen_at),
            })],
            sink: Box::new(CountingSink {
                rows: Arc::clone(&self.sink_rows),
                delay: Duration::ZERO,
            }),
            dead_letters: DeadLetterQueue::default(),
        })
    }
}

#[test]
fn a_burst_from_the_source_does_not_hold_up_the_operators_on_its_thread() {
    system().block_on(async {
        // One worker: the source, the probe and the sink share a thread. A bound on messages
        // in flight larger than the burst, so only the source's manners can let the probe in.
        let engine = Engine::new(EngineOptions {
            workers: 1,
            in_flight: 1000,
            ..EngineOptions::default()
        });
        let factory = Arc::new(BurstFactory {
            produced: Arc::default(),
            seen_at: Arc::default(),
            sink_rows: Arc::default(),
        });
        let _handle = engine
            .start(
                "burst".into(),
                Arc::clone(&factory) as Arc<dyn PipelineFactory>,
            )
            .expect("starts");
        eventually("the whole burst at the sink", || {
            factory.sink_rows.load(Ordering::SeqCst) == 100 * 10
        })
        .await;
        let seen_at = factory.seen_at.load(Ordering::SeqCst);
        assert!(
            (1..=2).contains(&seen_at),
            "the first batch reached the operator after the source had produced {seen_at}"
        );
        engine.shutdown().await;
    });
}
