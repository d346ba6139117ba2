//! The Weir gateway runtime: pipeline plans become graphs of actix actors passing Arrow batches.
//!
//! ```text
//!   Engine ──start(plan)──> PipelineSupervisor (one per pipeline, restarts with backoff)
//!                               │ builds, per run:
//!                               ▼
//!        SourceActor ──> OperatorActor ──> ... ──> SinkActor      (bounded edges)
//!            watermarks flow with the data; End flushes every window
//! ```
//!
//! What lives here: actors, watermark generation (including the idle-source rule), bounded
//! edges for backpressure, supervision, metrics, and the durable store-and-forward queue of
//! results bound for the cloud ([`uplink`]). The actors run on a small pool of actix
//! arbiters (one OS thread each) inside the actix system of the caller, which hosts actix in a
//! multi-threaded tokio runtime (`actix_rt::System::with_tokio_rt`).
//!
//! What does not: SQL (planner), operator logic (operators), connector I/O (connectors).

mod actors;
pub mod checkpoint;
pub mod error;
pub mod message;
pub mod metrics;
pub mod reaggregate;
mod supervisor;
pub mod uplink;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use arrow::datatypes::Schema;
use tokio::sync::watch;
use weir_connectors::{ConnectorSpec, DeadLetterQueue, Sink, SinkContext, Source};
use weir_operators::{ExprDecoder, Operator};
use weir_proto::plan::PipelinePlan;

pub use crate::actors::WatermarkRule;
pub use crate::checkpoint::{CheckpointOptions, CheckpointStore};
pub use crate::error::{EngineError, Result};
pub use crate::message::Barrier;
pub use crate::metrics::{PipelineMetrics, PipelineSnapshot, WindowClose};
use crate::supervisor::{PipelineSupervisor, Shutdown};

/// How the engine runs pipelines.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// After this long without data, a source advances its watermark by wall-clock time.
    pub idle_timeout: Duration,
    /// Messages an edge may hold that its receiver has not handled yet.
    pub in_flight: usize,
    /// Worker threads (actix arbiters) shared by all pipelines.
    pub workers: usize,
    /// First restart delay; doubles per failure up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// A pipeline that failed more often than this stays failed.
    pub max_restarts: u32,
    /// What sinks may use beyond their options: the gateway's uplink for `cloud` sinks.
    pub sinks: SinkContext,
    /// Take checkpoints (the gateway does, into its uplink store); `None`: a pipeline that
    /// restarts starts with empty state.
    pub checkpoints: Option<CheckpointOptions>,
    /// Rows whose event time is further ahead of the wall clock than this are dead-lettered
    /// rather than moving the watermark into the future; `None`: no bound (replaying data).
    pub max_event_ahead: Option<Duration>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(2),
            in_flight: 4,
            workers: std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .clamp(2, 8),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            max_restarts: 10,
            sinks: SinkContext::default(),
            checkpoints: None,
            max_event_ahead: None,
        }
    }
}

impl EngineOptions {
    pub fn backoff(&self, attempt: u32) -> Duration {
        supervisor::backoff(self.initial_backoff, self.max_backoff, attempt)
    }
}

/// Where a pipeline is in its life.
#[derive(Debug, Clone, PartialEq)]
pub enum PipelineState {
    Starting,
    Running,
    Restarting {
        attempt: u32,
        error: String,
        backoff: Duration,
    },
    /// A finite source ended and every result reached the sink.
    Finished,
    /// Failed for good: not retryable, or out of restarts.
    Failed(String),
    /// Stopped on request.
    Stopped,
}

impl PipelineState {
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Finished | Self::Failed(_) | Self::Stopped)
    }
}

/// The parts of one pipeline run, built fresh for every (re)start.
pub struct PipelineParts {
    pub source: Box<dyn Source>,
    pub watermark: Option<WatermarkRule>,
    pub operators: Vec<Box<dyn Operator>>,
    pub sink: Box<dyn Sink>,
    /// Receives input the source cannot decode and rows the operators cannot evaluate.
    pub dead_letters: DeadLetterQueue,
}

/// Builds a pipeline's parts. The plan-based factory is the normal one; tests and benchmarks
/// may supply their own.
pub trait PipelineFactory: Send + Sync {
    /// Stage names for metrics: source, each operator, sink.
    fn stage_names(&self) -> Vec<String>;
    fn build(&self) -> Result<PipelineParts>;
    /// Identifies the source and operators, for checkpoints: a checkpoint is restored only
    /// into parts with the same fingerprint. `None`: this pipeline takes no checkpoints.
    fn fingerprint(&self) -> Option<u64> {
        None
    }
}

/// Builds pipeline parts from a compiled plan.
pub struct PlanFactory {
    plan: PipelinePlan,
    dead_letters: DeadLetterQueue,
    sinks: SinkContext,
}

impl PlanFactory {
    pub fn new(
        plan: PipelinePlan,
        dead_letters: DeadLetterQueue,
        sinks: SinkContext,
    ) -> Result<Self> {
        if plan.format_version != weir_proto::PLAN_FORMAT_VERSION {
            return Err(EngineError::Plan(format!(
                "plan format {} is not supported by this gateway (expects {})",
                plan.format_version,
                weir_proto::PLAN_FORMAT_VERSION
            )));
        }
        let factory = Self {
            plan,
            dead_letters,
            sinks,
        };
        // Build once up front so an unrunnable plan is refused at deploy time.
        factory.build()?;
        Ok(factory)
    }
}

/// The connector spec a plan node describes: name, `WITH` options and event-time column.
pub fn connector_spec(
    connector: Option<&weir_proto::plan::Connector>,
    event_time: Option<String>,
) -> Result<ConnectorSpec> {
    let connector = connector.ok_or_else(|| EngineError::Plan("no connector".into()))?;
    let options = match serde_json::from_str(&connector.options_json) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => {
            return Err(EngineError::Plan(format!(
                "bad options for connector {}",
                connector.name
            )));
        }
    };
    Ok(ConnectorSpec {
        connector: connector.name.clone(),
        name: String::new(),
        options,
        event_time,
    })
}

/// FNV-1a: stable across builds and platforms, unlike the standard library's hasher, so a
/// checkpoint written by one build of the gateway is recognised by the next.
fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl PipelineFactory for PlanFactory {
    fn fingerprint(&self) -> Option<u64> {
        use prost::Message as _;
        let mut bytes = self
            .plan
            .source
            .as_ref()
            .map(|s| s.encode_to_vec())
            .unwrap_or_default();
        // The shape of the state, as `weir_planner::state_compatibility` sees it: stateless
        // operators count by position only, so a changed filter keeps the windows.
        for operator in &self.plan.operators {
            if weir_operators::build::is_stateful(operator) {
                bytes.extend(operator.encode_to_vec());
            } else {
                bytes.push(0);
            }
        }
        Some(fnv1a(bytes))
    }

    fn stage_names(&self) -> Vec<String> {
        let source = self
            .plan
            .source
            .as_ref()
            .map_or("source".to_string(), |s| format!("source:{}", s.name));
        let sink = self
            .plan
            .sink
            .as_ref()
            .map_or("sink".to_string(), |s| format!("sink:{}", s.name));
        std::iter::once(source)
            .chain(self.plan.operators.iter().map(|o| o.id.clone()))
            .chain(std::iter::once(sink))
            .collect()
    }

    fn build(&self) -> Result<PipelineParts> {
        let decoder = ExprDecoder::new();
        let source = self
            .plan
            .source
            .as_ref()
            .ok_or_else(|| EngineError::Plan("plan has no source".into()))?;
        let sink = self
            .plan
            .sink
            .as_ref()
            .ok_or_else(|| EngineError::Plan("plan has no sink".into()))?;
        let source_schema: Arc<Schema> =
            Arc::new(decoder.schema(&source.schema)?.as_arrow().clone());
        let watermark = match &source.watermark {
            Some(rule) => Some(WatermarkRule {
                column: source_schema.index_of(&rule.column).map_err(|_| {
                    EngineError::Plan(format!("no watermark column {}", rule.column))
                })?,
                delay_ns: rule.delay_ns,
            }),
            None => None,
        };
        let source_spec = connector_spec(
            source.connector.as_ref(),
            source.watermark.as_ref().map(|w| w.column.clone()),
        )?
        .with_name(format!("{}/{}", self.plan.name, source.name));
        let operators = self
            .plan
            .operators
            .iter()
            .map(|node| weir_operators::build(node, &decoder))
            .collect::<weir_operators::Result<Vec<_>>>()?;
        let sink_schema = Arc::new(decoder.schema(&sink.schema)?.as_arrow().clone());
        // Named per pipeline: two pipelines reading one source have their own connections,
        // counters and dead letters.
        let sink_spec = connector_spec(sink.connector.as_ref(), None)?
            .with_name(format!("{}/{}", self.plan.name, sink.name));
        Ok(PipelineParts {
            source: weir_connectors::build_source(
                &source_spec,
                source_schema,
                self.dead_letters.clone(),
            )?,
            watermark,
            operators,
            sink: weir_connectors::build_sink(&sink_spec, sink_schema, &self.sinks)?,
            dead_letters: self.dead_letters.clone(),
        })
    }
}

/// A running pipeline, as seen from outside.
#[derive(Clone)]
pub struct PipelineHandle {
    pub name: String,
    pub metrics: Arc<PipelineMetrics>,
    pub state: watch::Receiver<PipelineState>,
    supervisor: Addr<PipelineSupervisor>,
}

impl PipelineHandle {
    /// Waits until the pipeline finishes, fails for good or is stopped.
    pub async fn wait(&mut self) -> PipelineState {
        loop {
            let state = self.state.borrow().clone();
            if state.is_terminal() {
                return state;
            }
            if self.state.changed().await.is_err() {
                return self.state.borrow().clone();
            }
        }
    }

    pub fn stop(&self) {
        self.supervisor.do_send(Shutdown { snapshot: false });
    }

    /// Stops the pipeline and waits until its sink has flushed.
    pub async fn stop_and_wait(&self) {
        let _ = self.supervisor.send(Shutdown { snapshot: false }).await;
    }

    /// Stops the pipeline like [`Self::stop_and_wait`] and returns the state of each operator
    /// once the last batch in flight passed it, for [`Engine::start_with_state`]; `None` when
    /// the pipeline was not running or its state could not be written.
    pub async fn stop_and_snapshot(&self) -> Option<Vec<Vec<u8>>> {
        self.supervisor
            .send(Shutdown { snapshot: true })
            .await
            .ok()
            .flatten()
    }
}

/// Runs many pipelines in one process. Must be created inside a running actix system.
pub struct Engine {
    options: EngineOptions,
    arbiters: Vec<ArbiterHandle>,
    /// The worker threads, joined at shutdown: their actors hold sinks and RocksDB handles,
    /// which must be closed before the process exits (RocksDB aborts if a database closes
    /// after its static state is gone).
    threads: Mutex<Vec<Arbiter>>,
    pipelines: Mutex<HashMap<String, PipelineHandle>>,
    supervisors_started: std::sync::atomic::AtomicUsize,
}

impl Engine {
    pub fn new(options: EngineOptions) -> Self {
        let threads: Vec<Arbiter> = (0..options.workers.max(1))
            .map(|_| Arbiter::new())
            .collect();
        let arbiters = threads.iter().map(Arbiter::handle).collect();
        Self {
            options,
            arbiters,
            threads: Mutex::new(threads),
            pipelines: Mutex::new(HashMap::new()),
            supervisors_started: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Starts a compiled pipeline; fails at once if this gateway cannot run the plan.
    pub fn start_plan(
        &self,
        plan: PipelinePlan,
        dead_letters: DeadLetterQueue,
    ) -> Result<PipelineHandle> {
        let name = plan.name.clone();
        let factory = PlanFactory::new(plan, dead_letters, self.options.sinks.clone())?;
        self.start(name, Arc::new(factory))
    }

    /// Starts a pipeline from any factory, under its own supervisor.
    ///
    /// Names are unique: starting a pipeline under a name that is running is refused, so two
    /// copies never write to the same sink. Replacing a running pipeline is the live gateway's
    /// job (stop, wait, start).
    pub fn start(&self, name: String, factory: Arc<dyn PipelineFactory>) -> Result<PipelineHandle> {
        self.start_with_state(name, factory, None)
    }

    /// Starts a pipeline whose operators first restore `state`, as returned by
    /// [`PipelineHandle::stop_and_snapshot`] of the version it replaces. The caller checks
    /// that the two versions have the same operators; if a restore fails anyway, the pipeline
    /// starts with empty state and says so in the log.
    pub fn start_with_state(
        &self,
        name: String,
        factory: Arc<dyn PipelineFactory>,
        state: Option<Vec<Vec<u8>>>,
    ) -> Result<PipelineHandle> {
        if let Ok(pipelines) = self.pipelines.lock()
            && pipelines
                .get(&name)
                .is_some_and(|p| !p.state.borrow().is_terminal())
        {
            return Err(EngineError::Plan(format!(
                "a pipeline named '{name}' is already running"
            )));
        }
        let metrics = Arc::new(PipelineMetrics {
            stages: supervisor::stage_metrics(factory.stage_names()),
            ..PipelineMetrics::default()
        });
        let (state_sender, receiver) = watch::channel(PipelineState::Starting);
        let arbiters = self.arbiters.clone();
        let mut supervisor = PipelineSupervisor::new(
            name.clone(),
            factory,
            self.options.clone(),
            arbiters,
            Arc::clone(&metrics),
            state_sender,
        );
        supervisor.initial_state = state;
        // Started on a worker arbiter rather than the caller's: callers such as the admin API
        // run on plain tokio threads, where an actor cannot live.
        let home = self.arbiters[self.next_home()].clone();
        let supervisor = PipelineSupervisor::start_in_arbiter(&home, move |_| supervisor);
        let handle = PipelineHandle {
            name: name.clone(),
            metrics,
            state: receiver,
            supervisor,
        };
        if let Ok(mut pipelines) = self.pipelines.lock() {
            pipelines.insert(name, handle.clone());
        }
        Ok(handle)
    }

    /// What this engine offers sinks; for factories built outside [`Self::start_plan`].
    pub fn sink_context(&self) -> SinkContext {
        self.options.sinks.clone()
    }

    /// Whether `name`'s last committed checkpoint can be restored into what `factory`
    /// builds; `None` when there is none to restore (or checkpoints are off).
    pub fn checkpoint_fits(&self, name: &str, factory: &dyn PipelineFactory) -> Option<bool> {
        let checkpoints = self.options.checkpoints.as_ref()?;
        let fingerprint = factory.fingerprint()?;
        match checkpoints.store.load(name) {
            Ok(checkpoint) => checkpoint.map(|c| c.fingerprint == fingerprint),
            Err(_) => None,
        }
    }

    /// Deletes the checkpoint of a pipeline that was removed, so a later pipeline of the
    /// same name starts fresh.
    pub fn forget_checkpoint(&self, name: &str) {
        if let Some(checkpoints) = &self.options.checkpoints
            && let Err(error) = checkpoints.store.forget(name)
        {
            tracing::warn!(pipeline = %name, %error, "checkpoint not deleted");
        }
    }

    /// Forgets a pipeline that has stopped, so that it is no longer listed.
    pub fn forget(&self, name: &str) {
        if let Ok(mut pipelines) = self.pipelines.lock()
            && pipelines
                .get(name)
                .is_some_and(|p| p.state.borrow().is_terminal())
        {
            pipelines.remove(name);
        }
    }

    /// The worker arbiter of the next supervisor, round robin.
    fn next_home(&self) -> usize {
        self.supervisors_started
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            % self.arbiters.len()
    }

    pub fn pipelines(&self) -> Vec<PipelineHandle> {
        self.pipelines
            .lock()
            .map(|p| p.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Stops every pipeline, waits until their sinks have flushed, then stops the workers and
    /// waits for their threads to end.
    pub async fn shutdown(&self) {
        for pipeline in self.pipelines() {
            pipeline.stop_and_wait().await;
        }
        let threads: Vec<Arbiter> = self
            .threads
            .lock()
            .map(|mut threads| threads.drain(..).collect())
            .unwrap_or_default();
        for arbiter in &threads {
            arbiter.stop();
        }
        let joined = tokio::task::spawn_blocking(move || {
            for arbiter in threads {
                let _ = arbiter.join();
            }
        });
        let _ = joined.await;
    }
}
