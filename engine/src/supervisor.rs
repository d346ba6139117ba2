//! One supervisor per pipeline: builds the actor graph, restarts it with exponential backoff
//! when any stage fails or panics, and publishes the pipeline's state. Other pipelines never
//! notice: each has its own supervisor and its own actors.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::watch;
use weir_connectors::WindowEnds;
use weir_operators::emits_every;

use crate::actors::{
    OperatorActor, Outbox, SinkActor, SinkCheckpoints, SourceActor, SourceCheckpoints, Stop,
    StopAndSnapshot,
};
use crate::error::EngineError;
use crate::metrics::{PipelineMetrics, StageMetrics};
use crate::{EngineOptions, PipelineFactory, PipelineState};

#[derive(Message)]
#[rtype(result = "()")]
pub enum PipelineEvent {
    /// A stage of run `generation` failed; the whole run is torn down and restarted.
    Failed { generation: u64, error: EngineError },
    /// The source of run `generation` ended and everything reached the sink.
    Finished { generation: u64 },
}

/// Stops the pipeline for good, after every batch in flight has reached the sink. With
/// `snapshot`, answers with the state of each operator (in graph order) as it was once the
/// last batch passed, for a replacement pipeline to continue from; `None` when the pipeline
/// was not running or an operator could not write its state.
#[derive(Message)]
#[rtype(result = "Option<Vec<Vec<u8>>>")]
pub struct Shutdown {
    pub snapshot: bool,
}

struct Running {
    source: Addr<SourceActor>,
    operators: Vec<Addr<OperatorActor>>,
    sink: Addr<SinkActor>,
    /// Asks the source for a last checkpoint, so a graceful stop commits what the sink holds
    /// with the state that covers it; `None` without checkpoints.
    last_checkpoint: Option<tokio::sync::mpsc::UnboundedSender<tokio::sync::oneshot::Sender<()>>>,
    /// The sink's own thread, for a sink that may block ([`weir_connectors::Sink::may_block`]).
    sink_thread: Option<Arbiter>,
}

impl Running {
    /// Stops every actor in graph order and waits until each has handled the stop, so what
    /// was in flight reaches the sink, which flushes. With `snapshot`, each operator writes
    /// its state as it stops.
    async fn stop_and_wait(self, snapshot: bool) -> Option<Vec<Vec<u8>>> {
        if let Some(last) = &self.last_checkpoint {
            let (done, sent) = tokio::sync::oneshot::channel();
            if last.send(done).is_ok() {
                // The barrier is then ahead of the stops below in every mailbox.
                let _ = tokio::time::timeout(Duration::from_secs(10), sent).await;
            }
        }
        let _ = self.source.send(Stop).await;
        let mut states = Some(Vec::with_capacity(self.operators.len()));
        for operator in self.operators {
            if snapshot {
                let state = match operator.send(StopAndSnapshot).await {
                    Ok(Ok(state)) => Some(state),
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "operator state not kept: snapshot failed");
                        None
                    }
                    Err(_) => None,
                };
                states = states.zip(state).map(|(mut all, one)| {
                    all.push(one);
                    all
                });
            } else {
                let _ = operator.send(Stop).await;
            }
        }
        let _ = self.sink.send(Stop).await;
        if let Some(thread) = self.sink_thread {
            thread.stop();
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        if snapshot { states } else { None }
    }

    fn stop(self) {
        self.source.do_send(Stop);
        for operator in self.operators {
            operator.do_send(Stop);
        }
        self.sink.do_send(Stop);
        // Its thread ends once the sink has handled the stop (or given up waiting).
        if let Some(thread) = self.sink_thread {
            thread.stop();
        }
    }
}

pub struct PipelineSupervisor {
    pub(crate) name: String,
    pub(crate) factory: Arc<dyn PipelineFactory>,
    pub(crate) options: EngineOptions,
    pub(crate) arbiters: Vec<ArbiterHandle>,
    pub(crate) metrics: Arc<PipelineMetrics>,
    pub(crate) state: watch::Sender<PipelineState>,
    pub(crate) generation: u64,
    /// Failures of this pipeline so far; restarts stop after `max_restarts`.
    pub(crate) failures: u32,
    /// Operator state handed over by the version this pipeline replaced; restored on the
    /// first launch only.
    pub(crate) initial_state: Option<Vec<Vec<u8>>>,
    running: Option<Running>,
}

impl PipelineSupervisor {
    pub(crate) fn new(
        name: String,
        factory: Arc<dyn PipelineFactory>,
        options: EngineOptions,
        arbiters: Vec<ArbiterHandle>,
        metrics: Arc<PipelineMetrics>,
        state: watch::Sender<PipelineState>,
    ) -> Self {
        Self {
            name,
            factory,
            options,
            arbiters,
            metrics,
            state,
            generation: 0,
            failures: 0,
            initial_state: None,
            running: None,
        }
    }

    fn launch(&mut self, ctx: &mut Context<Self>) {
        self.generation += 1;
        let generation = self.generation;
        let mut parts = match self.factory.build() {
            Ok(parts) => parts,
            Err(error) => {
                self.on_failure(ctx, error);
                return;
            }
        };
        // Checkpoints: restore the last committed one (unless a replaced version handed its
        // state over), and take new ones from there.
        let checkpointing = self
            .options
            .checkpoints
            .clone()
            .zip(self.factory.fingerprint());
        let mut next_checkpoint = 1;
        if let Some((checkpoints, fingerprint)) = &checkpointing
            && self.initial_state.is_none()
        {
            match checkpoints.store.load(&self.name) {
                Ok(Some(checkpoint)) if checkpoint.fingerprint == *fingerprint => {
                    next_checkpoint = checkpoint.id + 1;
                    let restored = restore(
                        &mut parts,
                        &checkpoint.states,
                        checkpoint.position.as_deref(),
                    );
                    match restored {
                        Ok(()) => {
                            tracing::info!(pipeline = %self.name, checkpoint = checkpoint.id, "restored from the last checkpoint")
                        }
                        Err(error) => {
                            tracing::warn!(pipeline = %self.name, %error, "the last checkpoint cannot be restored; starting fresh");
                            parts = match self.factory.build() {
                                Ok(parts) => parts,
                                Err(error) => {
                                    self.on_failure(ctx, error);
                                    return;
                                }
                            };
                        }
                    }
                }
                Ok(Some(_)) => {
                    tracing::warn!(pipeline = %self.name, "the last checkpoint is of a version with other operators or another source; starting fresh");
                }
                Ok(None) => {}
                Err(error) => {
                    self.on_failure(ctx, error);
                    return;
                }
            }
        }
        let (commits, committed) = tokio::sync::watch::channel(None);
        let (last_checkpoint, last) = tokio::sync::mpsc::unbounded_channel();
        let sink_checkpoints =
            checkpointing
                .as_ref()
                .map(|(options, fingerprint)| SinkCheckpoints {
                    store: Arc::clone(&options.store),
                    pipeline: self.name.clone(),
                    fingerprint: *fingerprint,
                    committed: commits,
                });
        let source_checkpoints = checkpointing
            .as_ref()
            .map(|(options, _)| SourceCheckpoints {
                every: options.interval,
                next_id: next_checkpoint,
                committed,
                last: Some(last),
            });
        if let Some(states) = self.initial_state.take() {
            let restored = if states.len() == parts.operators.len() {
                parts
                    .operators
                    .iter_mut()
                    .zip(&states)
                    .try_for_each(|(operator, state)| operator.restore(state))
            } else {
                Err(weir_operators::OperatorError::Restore(
                    "the replaced version has a different number of operators".into(),
                ))
            };
            if let Err(error) = restored {
                // The deploy-time check makes this rare; starting fresh beats not starting.
                tracing::warn!(pipeline = %self.name, %error, "state of the replaced version not restored; starting fresh");
                parts = match self.factory.build() {
                    Ok(parts) => parts,
                    Err(error) => {
                        self.on_failure(ctx, error);
                        return;
                    }
                };
            }
        }
        let stage = |i: usize| Arc::clone(&self.metrics.stages[i]);
        let me = ctx.address();
        let arbiter = |i: usize| self.arbiters[i % self.arbiters.len()].clone();
        let limit = self.options.in_flight;
        let capacity = limit * 2 + 2;
        let pipeline = Arc::clone(&self.metrics);
        let sink_stage = stage(self.metrics.stages.len() - 1);
        let sink_parts = parts.sink;
        let sink_thread = sink_parts.may_block().then(Arbiter::new);
        let sink_home = sink_thread
            .as_ref()
            .map_or_else(|| arbiter(parts.operators.len() + 1), Arbiter::handle);
        let (sink_me, sink_pipeline) = (me.clone(), Arc::clone(&pipeline));
        let sink = SinkActor::start_in_arbiter(&sink_home, move |ctx| {
            ctx.set_mailbox_capacity(capacity);
            SinkActor {
                sink: sink_parts,
                checkpoints: sink_checkpoints,
                last_flush: std::time::Instant::now(),
                metrics: sink_stage,
                pipeline: sink_pipeline,
                supervisor: sink_me,
                generation,
            }
        });
        if let (Some(rule), Some(every_ns)) = (&parts.watermark, emits_every(&parts.operators)) {
            parts.source.set_window_ends(WindowEnds {
                every_ns,
                delay_ns: rule.delay_ns,
                max_ahead_ns: self
                    .options
                    .max_event_ahead
                    .map(|ahead| i64::try_from(ahead.as_nanos()).unwrap_or(i64::MAX)),
            });
        }
        let mut downstream = sink.clone().recipient();
        let mut operators = Vec::new();
        let count = parts.operators.len();
        for (i, operator) in parts.operators.into_iter().enumerate().rev() {
            let metrics = stage(i + 1);
            let outbox_metrics = Arc::clone(&metrics);
            let (op_me, op_pipeline, next) =
                (me.clone(), Arc::clone(&pipeline), downstream.clone());
            let dead_letters = parts.dead_letters.clone();
            let addr = OperatorActor::start_in_arbiter(&arbiter(i + 1), move |ctx| {
                ctx.set_mailbox_capacity(capacity);
                OperatorActor {
                    operator,
                    dead_letters,
                    outbox: Outbox::new(next, limit, outbox_metrics),
                    metrics,
                    pipeline: op_pipeline,
                    supervisor: op_me,
                    generation,
                    collector: Default::default(),
                }
            });
            downstream = addr.clone().recipient();
            operators.push(addr);
        }
        operators.reverse();
        debug_assert_eq!(operators.len(), count);
        let source_metrics = stage(0);
        let (source, watermark, idle_timeout) =
            (parts.source, parts.watermark, self.options.idle_timeout);
        let (max_ahead, source_dead_letters) =
            (self.options.max_event_ahead, parts.dead_letters.clone());
        let source = SourceActor::start_in_arbiter(&arbiter(0), move |_| SourceActor {
            source: Some(source),
            watermark,
            idle_timeout,
            checkpoints: source_checkpoints,
            outbox: Outbox::new(downstream, limit, Arc::clone(&source_metrics)),
            supervisor: me,
            generation,
            metrics: source_metrics,
            max_ahead,
            dead_letters: source_dead_letters,
            reading: None,
        });
        self.running = Some(Running {
            source,
            operators,
            sink,
            last_checkpoint: checkpointing.is_some().then_some(last_checkpoint),
            sink_thread,
        });
        let _ = self.state.send(PipelineState::Running);
    }

    fn on_failure(&mut self, ctx: &mut Context<Self>, error: EngineError) {
        if let Some(running) = self.running.take() {
            running.stop();
        }
        self.failures += 1;
        tracing::error!(pipeline = %self.name, attempt = self.failures, %error, "pipeline failed");
        let out_of_restarts = self.failures > self.options.max_restarts && !error.is_storage();
        if !error.is_retryable() || out_of_restarts {
            let _ = self.state.send(PipelineState::Failed(error.to_string()));
            ctx.stop();
            return;
        }
        self.metrics.restarts.fetch_add(1, Ordering::Relaxed);
        let backoff = self.options.backoff(self.failures);
        let _ = self.state.send(PipelineState::Restarting {
            attempt: self.failures,
            error: error.to_string(),
            backoff,
        });
        ctx.run_later(backoff, |supervisor, ctx| supervisor.launch(ctx));
    }
}

impl Actor for PipelineSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.launch(ctx);
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        if let Some(running) = self.running.take() {
            running.stop();
        }
    }
}

impl Handler<PipelineEvent> for PipelineSupervisor {
    type Result = ();

    fn handle(&mut self, event: PipelineEvent, ctx: &mut Self::Context) {
        match event {
            PipelineEvent::Failed { generation, error }
                if generation == self.generation && self.running.is_some() =>
            {
                self.on_failure(ctx, error);
            }
            PipelineEvent::Finished { generation } if generation == self.generation => {
                if let Some(running) = self.running.take() {
                    running.stop();
                }
                let _ = self.state.send(PipelineState::Finished);
                ctx.stop();
            }
            // Late news from a run that was already replaced.
            _ => {}
        }
    }
}

impl Handler<Shutdown> for PipelineSupervisor {
    type Result = ResponseActFuture<Self, Option<Vec<Vec<u8>>>>;

    fn handle(&mut self, shutdown: Shutdown, _: &mut Self::Context) -> Self::Result {
        let running = self.running.take();
        Box::pin(
            async move {
                match running {
                    Some(running) => running.stop_and_wait(shutdown.snapshot).await,
                    None => None,
                }
            }
            .into_actor(self)
            .map(|states, supervisor, ctx| {
                let _ = supervisor.state.send(PipelineState::Stopped);
                ctx.stop();
                states
            }),
        )
    }
}

/// Per-stage metrics in graph order: source, operators, sink.
pub(crate) fn stage_metrics(names: impl IntoIterator<Item = String>) -> Vec<Arc<StageMetrics>> {
    names
        .into_iter()
        .map(|n| Arc::new(StageMetrics::new(n)))
        .collect()
}

pub(crate) fn backoff(initial: Duration, max: Duration, attempt: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(16));
    initial.saturating_mul(factor).min(max)
}

/// Restores each operator from `states` and the source from `position`.
fn restore(
    parts: &mut crate::PipelineParts,
    states: &[Vec<u8>],
    position: Option<&[u8]>,
) -> Result<(), EngineError> {
    if states.len() != parts.operators.len() {
        return Err(EngineError::Plan(
            "the checkpoint has a different number of operators".into(),
        ));
    }
    for (operator, state) in parts.operators.iter_mut().zip(states) {
        operator.restore(state)?;
    }
    if let Some(position) = position {
        parts.source.seek(position)?;
    }
    Ok(())
}
