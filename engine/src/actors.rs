//! The actors of one pipeline run: a source, one actor per operator, a sink.
//!
//! ```text
//!  SourceActor ──StreamMessage──> OperatorActor ──> ... ──> SinkActor
//!       │  (bounded: at most `in_flight` unhandled messages per edge)       │
//!       └──────── Failed / Finished ──> PipelineSupervisor <── Failed ──────┘
//! ```
//!
//! Backpressure: a sender keeps at most `in_flight` messages that the receiver has not handled
//! yet; the next send waits for the oldest to be handled, and an actor handles nothing new while
//! it waits. A slow sink therefore stalls every stage up to the source, which stops reading,
//! and memory stays flat. Each actor handles its messages strictly in order.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use actix::prelude::*;
use arrow::array::{Array, AsArray, BooleanArray, RecordBatch};
use arrow::datatypes::TimestampNanosecondType;
use weir_connectors::{DeadLetterQueue, Sink, Source, SourceEvent};
use weir_operators::{Collector, EventTime, Operator, Watermark};

use crate::checkpoint::CheckpointStore;
use crate::error::{EngineError, Result};
use crate::message::{Barrier, StreamMessage};
use crate::metrics::{PipelineMetrics, StageMetrics};
use crate::supervisor::{PipelineEvent, PipelineSupervisor};

/// Tells a pipeline's actors to stop now, dropping what they hold.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Stop;

/// A message sent downstream and not answered yet.
type Request = Pin<Box<RecipientRequest<StreamMessage>>>;

/// The sending half of one edge, with the bound on messages not yet handled downstream.
///
/// Every request stays in `in_flight` until it has been answered, even while it is awaited:
/// a request whose mailbox was full still holds its message and delivers it only when
/// polled, so dropping one would lose the message. A stopping actor [`Outbox::flush`]es.
#[derive(Clone)]
pub struct Outbox {
    recipient: Recipient<StreamMessage>,
    in_flight: Rc<RefCell<VecDeque<Request>>>,
    limit: usize,
    metrics: Arc<StageMetrics>,
}

impl Outbox {
    pub fn new(
        recipient: Recipient<StreamMessage>,
        limit: usize,
        metrics: Arc<StageMetrics>,
    ) -> Self {
        Self {
            recipient,
            in_flight: Rc::default(),
            limit: limit.max(1),
            metrics,
        }
    }

    /// Queues `message` without waiting.
    fn push(&self, message: StreamMessage) {
        let mut in_flight = self.in_flight.borrow_mut();
        in_flight.push_back(Box::pin(self.recipient.send(message)));
        self.metrics
            .mailbox_depth
            .store(in_flight.len() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Waits for the oldest requests until at most `keep` are unanswered. A request leaves
    /// the queue only once answered, so cancelling this wait loses nothing.
    async fn settle(&self, keep: usize) -> Result<()> {
        loop {
            let answer = std::future::poll_fn(|cx| {
                let mut in_flight = self.in_flight.borrow_mut();
                if in_flight.len() <= keep {
                    return Poll::Ready(None);
                }
                let Some(oldest) = in_flight.front_mut() else {
                    return Poll::Ready(None);
                };
                match oldest.as_mut().poll(cx) {
                    Poll::Ready(answer) => {
                        in_flight.pop_front();
                        self.metrics
                            .mailbox_depth
                            .store(in_flight.len() as u64, std::sync::atomic::Ordering::Relaxed);
                        Poll::Ready(Some(answer))
                    }
                    Poll::Pending => Poll::Pending,
                }
            })
            .await;
            match answer {
                None => return Ok(()),
                Some(answer) => answer.map_err(|e| {
                    EngineError::Internal(format!("downstream actor is gone: {e}"))
                })??,
            }
        }
    }

    /// Waits until downstream has handled everything sent so far; what it answers no longer
    /// matters to a stopping actor.
    async fn flush(&self) {
        while self.settle(0).await.is_err() {}
    }

    /// Sends messages in order, waiting only as much as the bound requires (for the end of
    /// the stream: until everything is handled).
    pub async fn send_all(&self, messages: Vec<StreamMessage>) -> Result<()> {
        let mut end = false;
        for message in messages {
            end |= matches!(message, StreamMessage::End);
            self.push(message);
        }
        self.settle(if end { 0 } else { self.limit }).await
    }
}

/// How a source's watermark follows its event time: the latest time seen less `delay_ns`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatermarkRule {
    /// Index of the event-time column in the source's batches.
    pub column: usize,
    pub delay_ns: i64,
}

/// What a source's checkpoints need: how often, the next barrier id, and news of commits.
pub struct SourceCheckpoints {
    pub every: Duration,
    pub next_id: u64,
    /// The id of each committed checkpoint, from the sink.
    pub committed: tokio::sync::watch::Receiver<Option<u64>>,
    /// A request for a last barrier before a graceful stop: the source sends it, answers,
    /// and produces nothing more.
    pub last: Option<tokio::sync::mpsc::UnboundedReceiver<tokio::sync::oneshot::Sender<()>>>,
}

pub struct SourceActor {
    pub source: Option<Box<dyn Source>>,
    pub watermark: Option<WatermarkRule>,
    pub idle_timeout: Duration,
    pub checkpoints: Option<SourceCheckpoints>,
    pub outbox: Outbox,
    pub supervisor: Addr<PipelineSupervisor>,
    pub generation: u64,
    pub metrics: Arc<StageMetrics>,
    /// Rows with an event time further ahead of the wall clock than this are dead-lettered
    /// instead of pushing the watermark into the future.
    pub max_ahead: Option<Duration>,
    pub dead_letters: DeadLetterQueue,
    /// The running read loop, cancelled by [`Stop`].
    pub reading: Option<SpawnHandle>,
}

impl Actor for SourceActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let Some(source) = self.source.take() else {
            return;
        };
        let run = SourceLoop {
            source,
            watermark: self.watermark.take(),
            idle_timeout: self.idle_timeout,
            checkpoints: self.checkpoints.take(),
            outbox: self.outbox.clone(),
            metrics: Arc::clone(&self.metrics),
            max_ahead: self.max_ahead,
            dead_letters: self.dead_letters.clone(),
        };
        let supervisor = self.supervisor.clone();
        let generation = self.generation;
        self.reading = Some(
            ctx.spawn(
                async move {
                    let event = match run.run().await {
                        Ok(()) => PipelineEvent::Finished { generation },
                        Err(error) => PipelineEvent::Failed { generation, error },
                    };
                    supervisor.do_send(event);
                }
                .into_actor(self),
            ),
        );
    }
}

/// Stops reading, then stops once downstream has everything already sent.
impl Handler<Stop> for SourceActor {
    type Result = AtomicResponse<Self, ()>;
    fn handle(&mut self, _: Stop, ctx: &mut Self::Context) -> Self::Result {
        if let Some(reading) = self.reading.take() {
            ctx.cancel_future(reading);
        }
        let outbox = self.outbox.clone();
        AtomicResponse::new(Box::pin(
            async move { outbox.flush().await }
                .into_actor(self)
                .map(|(), _, ctx| ctx.stop()),
        ))
    }
}

struct SourceLoop {
    source: Box<dyn Source>,
    watermark: Option<WatermarkRule>,
    idle_timeout: Duration,
    checkpoints: Option<SourceCheckpoints>,
    outbox: Outbox,
    metrics: Arc<StageMetrics>,
    max_ahead: Option<Duration>,
    dead_letters: DeadLetterQueue,
}

impl SourceLoop {
    async fn run(mut self) -> Result<()> {
        let mut max_event: Option<EventTime> = None;
        let mut current = Watermark::MIN;
        let mut last_data = Instant::now();
        let delay = self.watermark.as_ref().map_or(0, |w| w.delay_ns);
        let column = self.watermark.as_ref().map(|w| w.column);
        let mut idle = tokio::time::interval(self.idle_timeout.max(Duration::from_millis(10)));
        idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let every = self
            .checkpoints
            .as_ref()
            .map_or(Duration::from_secs(3600), |c| c.every);
        let mut checkpoint = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        checkpoint.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let checkpointing = self.checkpoints.is_some();
        let mut last = self.checkpoints.as_mut().and_then(|c| c.last.take());
        let mut commits_open = checkpointing;
        let mut next = self.source.next_event();
        loop {
            tokio::select! {
                _ = checkpoint.tick(), if checkpointing => {
                    drop(next);
                    let barrier = self.barrier();
                    self.outbox.send_all(vec![barrier]).await?;
                    next = self.source.next_event();
                }
                request = last_request(&mut last), if last.is_some() => {
                    let Some(done) = request else {
                        last = None;
                        continue;
                    };
                    drop(next);
                    let barrier = self.barrier();
                    self.outbox.send_all(vec![barrier]).await?;
                    let _ = done.send(());
                    // Stopped from outside next; nothing more is read.
                    std::future::pending::<()>().await;
                    return Ok(());
                }
                changed = committed(&mut self.checkpoints), if commits_open => {
                    drop(next);
                    match changed {
                        Some(id) => self.source.committed(id),
                        None => commits_open = false,
                    }
                    next = self.source.next_event();
                }
                event = &mut next => {
                    match event? {
                        SourceEvent::Batch(batch) => {
                            let batch = match (column, self.max_ahead) {
                                (Some(column), Some(ahead)) => {
                                    without_future_rows(batch, column, ahead, &self.metrics, &self.dead_letters)
                                }
                                _ => batch,
                            };
                            let origin = Instant::now();
                            let rows = batch.num_rows() as u64;
                            StageMetrics::add(&self.metrics.rows_out, rows);
                            StageMetrics::add(&self.metrics.batches_out, 1);
                            let range = column.and_then(|column| event_range(&batch, column));
                            let (before, after) = match range {
                                Some(range) => {
                                    let (before, after, max) = watermarks_around(current, max_event, range, delay);
                                    max_event = Some(max);
                                    (before, after)
                                }
                                None => (None, None),
                            };
                            let mut messages = Vec::with_capacity(3);
                            let mut advance = |watermark: Option<Watermark>, messages: &mut Vec<StreamMessage>| {
                                if let Some(watermark) = watermark {
                                    current = watermark;
                                    messages.push(StreamMessage::Watermark { watermark, origin });
                                }
                            };
                            advance(before, &mut messages);
                            messages.push(StreamMessage::Batch { batch, origin });
                            advance(after, &mut messages);
                            drop(next);
                            self.outbox.send_all(messages).await?;
                            // Operators of this or other pipelines may share this thread; a
                            // source with a burst in memory never waits on its own, so it
                            // lets them run between batches (the results of a window closed
                            // by this batch must not wait until the burst is decoded).
                            tokio::task::yield_now().await;
                            // Time spent waiting on a slow downstream is not idleness: without
                            // this, a stall would let the wall clock push the watermark past
                            // rows that are already buffered upstream.
                            last_data = Instant::now();
                            idle.reset();
                            next = self.source.next_event();
                        }
                        SourceEvent::End => {
                            drop(next);
                            let origin = Instant::now();
                            let mut last = vec![StreamMessage::Watermark { watermark: Watermark::END, origin }];
                            // A last checkpoint commits what the sink still holds.
                            if checkpointing {
                                last.push(self.barrier());
                            }
                            last.push(StreamMessage::End);
                            self.outbox.send_all(last).await?;
                            return Ok(());
                        }
                    }
                }
                _ = idle.tick() => {
                    // An idle source lets event time follow the wall clock, so the last
                    // windows close even when no more data comes.
                    let idle_for = last_data.elapsed();
                    if idle_for < self.idle_timeout {
                        continue;
                    }
                    let Some(max) = max_event else { continue };
                    let advanced = max
                        .saturating_add(i64::try_from(idle_for.as_nanos()).unwrap_or(i64::MAX))
                        .saturating_sub(delay);
                    if advanced > current.0 {
                        current = Watermark(advanced);
                        let message = StreamMessage::Watermark { watermark: current, origin: Instant::now() };
                        // Sending borrows only the outbox; the pending read stays in place.
                        self.outbox.send_all(vec![message]).await?;
                    }
                }
            }
        }
    }
}

impl SourceLoop {
    /// A barrier at the source's current position.
    fn barrier(&mut self) -> StreamMessage {
        let checkpoints = self.checkpoints.as_mut();
        let id = checkpoints.map_or(0, |c| {
            c.next_id += 1;
            c.next_id - 1
        });
        self.source.on_barrier(id);
        StreamMessage::Barrier(Barrier {
            id,
            position: self.source.position(),
            states: Vec::new(),
        })
    }
}

/// The earliest and latest event time in `batch`, if it has any.
fn event_range(batch: &RecordBatch, column: usize) -> Option<(EventTime, EventTime)> {
    let times = batch
        .column(column)
        .as_primitive_opt::<TimestampNanosecondType>()?;
    if times.null_count() > 0 {
        return Some((arrow::compute::min(times)?, arrow::compute::max(times)?));
    }
    // Both in one pass over the values: at a block of samples per message this runs once per
    // eight thousand rows, and two generic passes cost as much as decoding the timestamps.
    let values = times.values();
    let first = *values.first()?;
    Some(
        values
            .iter()
            .fold((first, first), |(lo, hi), &t| (lo.min(t), hi.max(t))),
    )
}

/// Where a batch with event times in `range` moves the watermark, as `(before, after,
/// latest)`: the watermark to send ahead of the batch, the one to send after it (each only
/// when it moves), and the latest event time seen once the batch is in.
///
/// The windows that end before the batch's earliest row get nothing from it, so they close
/// before it rather than after: their results then need not wait while the batch is
/// aggregated, which at a burst of many sensors is most of the way from the watermark passing
/// a window's end to its result. Rows of the batch are judged by the same watermark as
/// before, so what is late and what every window holds stay exactly as they were.
fn watermarks_around(
    current: Watermark,
    latest: Option<EventTime>,
    (earliest, batch_latest): (EventTime, EventTime),
    delay: i64,
) -> (Option<Watermark>, Option<Watermark>, EventTime) {
    let latest = latest.map_or(batch_latest, |seen| seen.max(batch_latest));
    let target = Watermark(latest.saturating_sub(delay));
    let before = target.min(Watermark(earliest.saturating_sub(1)));
    let before = (before > current).then_some(before);
    let after = (target > before.unwrap_or(current)).then_some(target);
    (before, after, latest)
}

/// `batch` without the rows whose event time is more than `ahead` past the wall clock (a
/// sensor with a wrong clock): they would move the watermark so far that every other row
/// became late. They are dead-lettered and counted as invalid.
fn without_future_rows(
    batch: RecordBatch,
    column: usize,
    ahead: Duration,
    metrics: &StageMetrics,
    dead_letters: &DeadLetterQueue,
) -> RecordBatch {
    let Some(times) = batch
        .column(column)
        .as_primitive_opt::<TimestampNanosecondType>()
    else {
        return batch;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    let limit = now.saturating_add(ahead.as_nanos().min(i64::MAX as u128) as i64);
    if arrow::compute::max(times).is_none_or(|max| max <= limit) {
        return batch;
    }
    let keep: BooleanArray = times
        .iter()
        .map(|t| Some(t.is_none_or(|t| t <= limit)))
        .collect();
    let (Ok(kept), Ok(future)) = (
        arrow::compute::filter_record_batch(&batch, &keep),
        arrow::compute::not(&keep)
            .and_then(|future| arrow::compute::filter_record_batch(&batch, &future)),
    ) else {
        return batch;
    };
    StageMetrics::add(&metrics.invalid_rows, future.num_rows() as u64);
    let reason = format!(
        "event time more than {} ahead of the gateway clock",
        humantime::format_duration(ahead)
    );
    dead_letters.push(&metrics.name, &reason, &rows_as_json(&future));
    kept
}

/// A request for the last barrier; `None` once nobody can ask any more.
async fn last_request(
    last: &mut Option<tokio::sync::mpsc::UnboundedReceiver<tokio::sync::oneshot::Sender<()>>>,
) -> Option<tokio::sync::oneshot::Sender<()>> {
    match last.as_mut() {
        Some(requests) => requests.recv().await,
        None => std::future::pending().await,
    }
}

/// The id of the next committed checkpoint; `None` once the sink is gone.
async fn committed(checkpoints: &mut Option<SourceCheckpoints>) -> Option<u64> {
    let receiver = &mut checkpoints.as_mut()?.committed;
    receiver.changed().await.ok()?;
    *receiver.borrow_and_update()
}

pub struct OperatorActor {
    pub operator: Box<dyn Operator>,
    /// Where rows that fail to evaluate go, with the reason.
    pub dead_letters: DeadLetterQueue,
    pub outbox: Outbox,
    pub metrics: Arc<StageMetrics>,
    pub pipeline: Arc<PipelineMetrics>,
    pub supervisor: Addr<PipelineSupervisor>,
    pub generation: u64,
    pub collector: Collector,
}

impl Actor for OperatorActor {
    type Context = Context<Self>;
}

/// Stops once downstream has everything this operator already sent.
impl Handler<Stop> for OperatorActor {
    type Result = AtomicResponse<Self, ()>;
    fn handle(&mut self, _: Stop, _: &mut Self::Context) -> Self::Result {
        let outbox = self.outbox.clone();
        AtomicResponse::new(Box::pin(
            async move { outbox.flush().await }
                .into_actor(self)
                .map(|(), _, ctx| ctx.stop()),
        ))
    }
}

/// Stops an operator after writing its state to bytes, for a replacement to restore. Like
/// [`Stop`], it queues behind the batches already in the mailbox, so the state covers them.
#[derive(Message)]
#[rtype(result = "Result<Vec<u8>>")]
pub struct StopAndSnapshot;

impl Handler<StopAndSnapshot> for OperatorActor {
    type Result = AtomicResponse<Self, Result<Vec<u8>>>;
    fn handle(&mut self, _: StopAndSnapshot, _: &mut Self::Context) -> Self::Result {
        let state = self.operator.snapshot().map_err(EngineError::from);
        let outbox = self.outbox.clone();
        AtomicResponse::new(Box::pin(
            async move { outbox.flush().await }
                .into_actor(self)
                .map(move |(), _, ctx| {
                    ctx.stop();
                    state
                }),
        ))
    }
}

impl OperatorActor {
    fn run(&mut self, message: StreamMessage) -> Result<Vec<StreamMessage>> {
        let operator = &mut self.operator;
        let collector = &mut self.collector;
        let (origin, forward, outcome) = match message {
            StreamMessage::Batch { batch, origin } => {
                StageMetrics::add(&self.metrics.rows_in, batch.num_rows() as u64);
                StageMetrics::add(&self.metrics.batches_in, 1);
                let dead_letters = &self.dead_letters;
                let name = operator.name().to_string();
                let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    let rejected =
                        weir_operators::process_isolating(operator.as_mut(), batch, collector)?;
                    for rows in rejected {
                        StageMetrics::add(&self.metrics.errors, rows.rows.num_rows() as u64);
                        dead_letters.push(&name, &rows.reason, &rows_as_json(&rows.rows));
                    }
                    Ok(())
                }));
                (origin, None, outcome)
            }
            StreamMessage::Watermark { watermark, origin } => {
                let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    operator.on_watermark(watermark, collector)
                }));
                (
                    origin,
                    Some(StreamMessage::Watermark { watermark, origin }),
                    outcome,
                )
            }
            StreamMessage::Barrier(mut barrier) => {
                let state = std::panic::catch_unwind(AssertUnwindSafe(|| operator.snapshot()));
                return match state {
                    Ok(Ok(state)) => {
                        barrier.states.push(state);
                        Ok(vec![StreamMessage::Barrier(barrier)])
                    }
                    Ok(Err(error)) => Err(error.into()),
                    Err(panic) => Err(EngineError::Panic(format!(
                        "{} (snapshot): {}",
                        operator.name(),
                        panic_message(&panic)
                    ))),
                };
            }
            StreamMessage::End => return Ok(vec![StreamMessage::End]),
        };
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                StageMetrics::add(&self.metrics.errors, 1);
                return Err(error.into());
            }
            Err(panic) => {
                StageMetrics::add(&self.metrics.errors, 1);
                return Err(EngineError::Panic(format!(
                    "{}: {}",
                    self.operator.name(),
                    panic_message(&panic)
                )));
            }
        }
        StageMetrics::add(
            &self.metrics.late_rows,
            std::mem::take(&mut self.collector.late_rows),
        );
        StageMetrics::add(
            &self.metrics.invalid_rows,
            std::mem::take(&mut self.collector.invalid_rows),
        );
        let batches = self.collector.take_batches();
        if let Some(StreamMessage::Watermark { watermark, .. }) = &forward
            && !batches.is_empty()
        {
            self.pipeline.watermark_to_emit.record(origin.elapsed());
            self.pipeline.window_closed(watermark.0, origin);
            tracing::trace!(
                operator = %self.operator.name(),
                batches = batches.len(),
                "watermark closed windows"
            );
        }
        let mut messages = Vec::with_capacity(batches.len() + 1);
        for batch in batches {
            StageMetrics::add(&self.metrics.rows_out, batch.num_rows() as u64);
            StageMetrics::add(&self.metrics.batches_out, 1);
            messages.push(StreamMessage::Batch { batch, origin });
        }
        messages.extend(forward);
        Ok(messages)
    }
}

/// Rejected rows as JSON lines, for the dead-letter queue. Only on the error path.
fn rows_as_json(rows: &arrow::array::RecordBatch) -> Vec<u8> {
    let mut writer = arrow::json::LineDelimitedWriter::new(Vec::new());
    if writer.write(rows).is_err() || writer.finish().is_err() {
        return b"<rows not printable>".to_vec();
    }
    writer.into_inner()
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}

impl Handler<StreamMessage> for OperatorActor {
    type Result = AtomicResponse<Self, Result<()>>;

    fn handle(&mut self, message: StreamMessage, _: &mut Self::Context) -> Self::Result {
        let outcome = self.run(message);
        let outbox = self.outbox.clone();
        let supervisor = self.supervisor.clone();
        let generation = self.generation;
        AtomicResponse::new(Box::pin(
            async move {
                match outcome {
                    Ok(messages) => outbox.send_all(messages).await,
                    Err(error) => {
                        let text = error.to_string();
                        supervisor.do_send(PipelineEvent::Failed { generation, error });
                        Err(EngineError::Internal(format!("stopped after: {text}")))
                    }
                }
            }
            .into_actor(self),
        ))
    }
}

/// How long a sink may hold written results in its buffers.
const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// What the sink needs to commit checkpoints.
pub struct SinkCheckpoints {
    pub store: Arc<dyn CheckpointStore>,
    pub pipeline: String,
    pub fingerprint: u64,
    pub committed: tokio::sync::watch::Sender<Option<u64>>,
}

pub struct SinkActor {
    pub sink: Box<dyn Sink>,
    pub checkpoints: Option<SinkCheckpoints>,
    pub last_flush: Instant,
    pub metrics: Arc<StageMetrics>,
    pub pipeline: Arc<PipelineMetrics>,
    pub supervisor: Addr<PipelineSupervisor>,
    pub generation: u64,
}

impl Actor for SinkActor {
    type Context = Context<Self>;
}

impl Handler<Stop> for SinkActor {
    type Result = ();
    fn handle(&mut self, _: Stop, ctx: &mut Self::Context) {
        let _ = self.sink.flush();
        ctx.stop();
    }
}

impl Handler<StreamMessage> for SinkActor {
    type Result = Result<()>;

    fn handle(&mut self, message: StreamMessage, _: &mut Self::Context) -> Result<()> {
        let result = match message {
            StreamMessage::Batch { batch, origin } => {
                StageMetrics::add(&self.metrics.rows_in, batch.num_rows() as u64);
                StageMetrics::add(&self.metrics.batches_in, 1);
                let written = self.sink.write_batch(&batch);
                self.pipeline.source_to_sink.record(origin.elapsed());
                tracing::trace!(rows = batch.num_rows(), "sink wrote batch");
                written
            }
            // Flushing per watermark would cost a write per batch; results still leave within
            // FLUSH_INTERVAL, and at once at the end of the stream.
            StreamMessage::Watermark { .. } if self.last_flush.elapsed() < FLUSH_INTERVAL => Ok(()),
            StreamMessage::Watermark { .. } | StreamMessage::End => {
                self.last_flush = Instant::now();
                self.sink.flush()
            }
            StreamMessage::Barrier(barrier) => {
                self.last_flush = Instant::now();
                match self.sink.flush() {
                    Ok(()) => return self.commit(barrier),
                    Err(error) => Err(error),
                }
            }
        };
        result.map_err(|error| {
            StageMetrics::add(&self.metrics.errors, 1);
            let error = EngineError::from(error);
            let text = error.to_string();
            self.supervisor.do_send(PipelineEvent::Failed {
                generation: self.generation,
                error,
            });
            EngineError::Internal(format!("sink stopped after: {text}"))
        })
    }
}

impl SinkActor {
    /// Commits the checkpoint `barrier` carries, with what the sink held back for it, then
    /// tells the source.
    fn commit(&mut self, barrier: Barrier) -> Result<()> {
        let Some(checkpoints) = &self.checkpoints else {
            return Ok(());
        };
        let started = Instant::now();
        let checkpoint = weir_proto::engine::Checkpoint {
            id: barrier.id,
            fingerprint: checkpoints.fingerprint,
            position: barrier.position.clone(),
            states: barrier.states,
            committed_at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        };
        let staged = self.sink.take_staged();
        if let Err(error) = checkpoints
            .store
            .commit(&checkpoints.pipeline, &checkpoint, staged)
        {
            StageMetrics::add(&self.metrics.errors, 1);
            let text = error.to_string();
            self.supervisor.do_send(PipelineEvent::Failed {
                generation: self.generation,
                error,
            });
            return Err(EngineError::Internal(format!("sink stopped after: {text}")));
        }
        self.pipeline
            .checkpoints
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.pipeline.checkpoint_duration.record(started.elapsed());
        checkpoints.committed.send_replace(Some(barrier.id));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_ending_before_a_batch_close_ahead_of_it() {
        // Seen up to 5, no delay: the batch [10, 20] closes everything before its first row
        // ahead of it, and up to 20 after it.
        let marks = watermarks_around(Watermark(5), Some(5), (10, 20), 0);
        assert_eq!(marks, (Some(Watermark(9)), Some(Watermark(20)), 20));
        // A delay holds both back, the one before never past the batch's earliest row.
        let marks = watermarks_around(Watermark(0), Some(5), (10, 20), 5);
        assert_eq!(marks, (Some(Watermark(9)), Some(Watermark(15)), 20));
        let marks = watermarks_around(Watermark(0), Some(5), (10, 12), 5);
        assert_eq!(marks, (Some(Watermark(7)), None, 12));
    }

    #[test]
    fn a_batch_with_rows_behind_the_watermark_moves_it_only_afterwards() {
        // Its earliest row (3) lies behind the watermark (8): nothing may close before the
        // batch, or rows the window still accepts would count as late.
        let marks = watermarks_around(Watermark(8), Some(10), (3, 30), 2);
        assert_eq!(marks, (None, Some(Watermark(28)), 30));
        // Wholly behind the latest row seen: the watermark stays.
        let marks = watermarks_around(Watermark(8), Some(10), (1, 9), 2);
        assert_eq!(marks, (None, None, 10));
    }

    #[test]
    fn event_range_spans_the_rows_with_a_time() {
        use arrow::array::{Int64Array, TimestampNanosecondArray};
        use arrow::datatypes::{DataType, Field, Schema, TimeUnit};

        let schema = Arc::new(Schema::new(vec![
            Field::new("ts", DataType::Timestamp(TimeUnit::Nanosecond, None), true),
            Field::new("n", DataType::Int64, false),
        ]));
        let range = |times: Vec<Option<i64>>| {
            let rows = times.len() as i64;
            let batch = RecordBatch::try_new(
                Arc::clone(&schema),
                vec![
                    Arc::new(TimestampNanosecondArray::from(times)),
                    Arc::new(Int64Array::from_iter_values(0..rows)),
                ],
            )
            .expect("batch");
            event_range(&batch, 0)
        };
        assert_eq!(
            range(vec![Some(7), Some(-3), Some(12), Some(5)]),
            Some((-3, 12))
        );
        assert_eq!(range(vec![Some(7), None, Some(2)]), Some((2, 7)));
        assert_eq!(range(vec![None, None]), None);
        assert_eq!(range(vec![]), None);
        assert_eq!(
            event_range(&RecordBatch::new_empty(Arc::clone(&schema)), 1),
            None
        );
    }

    #[test]
    fn the_first_batch_starts_the_watermark() {
        let marks = watermarks_around(Watermark::MIN, None, (100, 200), 50);
        assert_eq!(marks, (Some(Watermark(99)), Some(Watermark(150)), 200));
    }
}
