//! The pipelines a gateway runs, and hot deploy: add, replace and remove pipelines while the
//! others keep running.
//!
//! Every change compiles first and changes nothing when the SQL is wrong. Each pipeline has
//! its own supervisor, actors and connections, so starting or stopping one never touches
//! another. Replacing stops the old version only after the new one has been built (so a
//! version that cannot run leaves the old one running), lets everything in flight reach the
//! sink, and, when the two versions have the same source and the same stateful operators,
//! hands the operators' state over so open windows carry on.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use serde::Serialize;
use weir_connectors::DeadLetterQueue;
use weir_engine::metrics::LatencySummary;
use weir_engine::{Engine, PipelineHandle, PipelineState, PlanFactory};
use weir_planner::{state_compatibility, state_loss};
use weir_proto::plan::PipelinePlan;

use crate::error::{GatewayError, Result};

/// One deployed pipeline.
struct Deployed {
    version: u64,
    sql: String,
    plan: PipelinePlan,
    handle: PipelineHandle,
    dead_letters: DeadLetterQueue,
    deployed_at: SystemTime,
    state: StateHandover,
    /// Deployed by the cloud: only the cloud replaces or removes it.
    managed: bool,
}

/// What happened to a pipeline's state when it was deployed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", content = "reason", rename_all = "snake_case")]
pub enum StateHandover {
    /// A new pipeline: nothing to keep.
    New,
    /// The replaced version's operator state was handed over: open windows carry on.
    Kept,
    /// The replaced version's state could not be used; the reason says why.
    Fresh(String),
}

/// The outcome of one deploy request, per pipeline.
#[derive(Debug, Clone, Serialize)]
pub struct Deployment {
    pub name: String,
    pub version: u64,
    #[serde(flatten)]
    pub state: StateHandover,
}

/// A pipeline's status as the admin API and `weir top` show it.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineStatus {
    pub name: String,
    pub version: u64,
    /// Deployed by the cloud (the version is the cloud's), not through the local admin API.
    pub managed: bool,
    /// `starting`, `running`, `restarting`, `finished`, `failed` or `stopped`.
    pub state: &'static str,
    /// Why the pipeline is restarting or failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub source: String,
    pub sink: String,
    /// Rows the source produced.
    pub rows_in: u64,
    /// Rows the sink received.
    pub rows_out: u64,
    pub late_rows: u64,
    pub invalid_rows: u64,
    pub errors: u64,
    pub dead_letters: u64,
    pub restarts: u64,
    /// Checkpoints committed by this run of the pipeline.
    pub checkpoints: u64,
    pub source_to_sink: LatencySummary,
    pub watermark_to_emit: LatencySummary,
    /// Seconds since the epoch.
    pub deployed_at: f64,
    pub state_handover: StateHandover,
    pub stages: Vec<StageStatus>,
}

/// Counters of one stage (source, operator or sink).
#[derive(Debug, Clone, Serialize)]
pub struct StageStatus {
    pub name: String,
    pub rows_in: u64,
    pub rows_out: u64,
    pub late_rows: u64,
    pub invalid_rows: u64,
    pub errors: u64,
    pub mailbox_depth: u64,
}

/// Every pipeline of the gateway; see the module docs.
pub struct Deployments {
    engine: Engine,
    pipelines: Mutex<BTreeMap<String, Deployed>>,
    /// Serialises changes; reads only take the map's lock.
    changes: tokio::sync::Mutex<()>,
    dead_letters_dir: Option<PathBuf>,
}

impl Deployments {
    /// Deployments on `engine`; dead letters go to `<dir>/<pipeline>.jsonl` when a directory
    /// is given, else they are kept in memory.
    pub fn new(engine: Engine, dead_letters_dir: Option<PathBuf>) -> Self {
        Self {
            engine,
            pipelines: Mutex::default(),
            changes: tokio::sync::Mutex::new(()),
            dead_letters_dir,
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Deployed>> {
        self.pipelines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts every pipeline of `sql`. Fails, changing nothing, if the SQL does not compile,
    /// defines no pipeline, names one that is deployed, or one cannot start. `file` names the
    /// SQL in error messages.
    /// Starts the pipelines of `sql`. One whose last checkpoint (left by a version with
    /// another source or other stateful operators) it cannot restore is refused, and none
    /// starts, unless `fresh`.
    pub async fn add(&self, sql: &str, file: &str, fresh: bool) -> Result<Vec<Deployment>> {
        let plans = compile(sql, file)?;
        let _changing = self.changes.lock().await;
        {
            let pipelines = self.lock();
            let existing: Vec<&str> = plans
                .iter()
                .filter(|p| pipelines.contains_key(&p.name))
                .map(|p| p.name.as_str())
                .collect();
            if !existing.is_empty() {
                return Err(GatewayError::Conflict(format!(
                    "pipeline '{}' is already deployed; replace it with `weir pipelines \
                     replace` (PUT /api/pipelines/NAME)",
                    existing.join("', '")
                )));
            }
        }
        let mut started = Vec::new();
        for plan in plans {
            match self.start(&plan, fresh) {
                Ok((handle, dead_letters, handover)) => {
                    started.push((plan, handle, dead_letters, handover))
                }
                Err(error) => {
                    for (_, handle, _, _) in &started {
                        handle.stop_and_wait().await;
                        self.engine.forget(&handle.name);
                    }
                    return Err(error);
                }
            }
        }
        // Compiling and starting ran code the pipelines will not need again.
        crate::memory::release_startup_code_logged();
        let mut pipelines = self.lock();
        let now = SystemTime::now();
        Ok(started
            .into_iter()
            .map(|(plan, handle, dead_letters, handover)| {
                let name = plan.name.clone();
                pipelines.insert(
                    name.clone(),
                    Deployed {
                        version: 1,
                        sql: sql.to_owned(),
                        plan,
                        handle,
                        dead_letters,
                        deployed_at: now,
                        state: handover.clone(),
                        managed: false,
                    },
                );
                Deployment {
                    name,
                    version: 1,
                    state: handover,
                }
            })
            .collect())
    }

    /// Deploys `sql`'s pipeline `name` as a new version of it, or as a new pipeline if none
    /// has that name. The SQL must define exactly that one pipeline.
    pub async fn replace(
        &self,
        name: &str,
        sql: &str,
        file: &str,
        fresh: bool,
    ) -> Result<Deployment> {
        let mut plans = compile(sql, file)?;
        let name = name.to_ascii_lowercase();
        if plans.len() != 1 || plans[0].name != name {
            let defined: Vec<&str> = plans.iter().map(|p| p.name.as_str()).collect();
            return Err(GatewayError::Invalid(format!(
                "to replace pipeline '{name}', the SQL must define exactly that pipeline; it \
                 defines: {}",
                if defined.is_empty() {
                    "none".to_owned()
                } else {
                    defined.join(", ")
                }
            )));
        }
        let plan = plans.remove(0);
        let _changing = self.changes.lock().await;
        if self.lock().get(&name).is_some_and(|d| d.managed) {
            return Err(GatewayError::Conflict(format!(
                "pipeline '{name}' is managed by the cloud; change it with `weir deploy`"
            )));
        }
        self.install(plan, sql, None, fresh).await
    }

    /// Runs a plan the cloud sent as `version` of its pipeline: starts it, or replaces the
    /// running version (keeping state where compatible; where not, only if the operator
    /// signed off on a `fresh` start). The same plan, under the same or a new version number,
    /// changes nothing but the number.
    pub async fn apply_plan(
        &self,
        plan: PipelinePlan,
        sql: &str,
        version: u64,
        fresh: bool,
    ) -> Result<Deployment> {
        let _changing = self.changes.lock().await;
        {
            let mut pipelines = self.lock();
            // The same plan, or the same plan under a new number (a rollback re-signs old
            // plans), keeps running. A different plan under the running number (a cloud
            // whose versions started over) is installed like any other.
            if let Some(running) = pipelines.get_mut(&plan.name)
                && running.managed
                && running.plan == plan
            {
                running.version = version;
                running.sql = sql.to_owned();
                return Ok(Deployment {
                    name: plan.name.clone(),
                    version,
                    state: StateHandover::Kept,
                });
            }
        }
        self.install(plan, sql, Some(version), fresh).await
    }

    /// Removes a pipeline the cloud no longer wants; local pipelines are left alone.
    pub async fn remove_managed(&self, name: &str) -> Result<()> {
        let _changing = self.changes.lock().await;
        let removed = {
            let mut pipelines = self.lock();
            match pipelines.get(name) {
                Some(d) if d.managed => pipelines.remove(name),
                _ => None,
            }
        };
        if let Some(removed) = removed {
            removed.handle.stop_and_wait().await;
            self.engine.forget(name);
            self.engine.forget_checkpoint(name);
            tracing::info!(pipeline = %name, "pipeline removed by the cloud");
        }
        Ok(())
    }

    /// Cloud-managed pipelines and the versions they run.
    pub fn managed_versions(&self) -> BTreeMap<String, u64> {
        self.lock()
            .iter()
            .filter(|(_, d)| d.managed)
            .map(|(name, d)| (name.clone(), d.version))
            .collect()
    }

    /// Starts `plan`, or replaces the pipeline of that name with it. `cloud_version` marks
    /// the pipeline as cloud-managed at that version; local versions count up from the old.
    /// A replacement that cannot take over the old version's state is refused unless
    /// `fresh`. The caller holds `changes`.
    async fn install(
        &self,
        plan: PipelinePlan,
        sql: &str,
        cloud_version: Option<u64>,
        fresh: bool,
    ) -> Result<Deployment> {
        let name = plan.name.clone();
        let managed = cloud_version.is_some();
        let old = self.lock().remove(&name);
        let Some(old) = old else {
            let (handle, dead_letters, handover) = self.start(&plan, fresh)?;
            crate::memory::release_startup_code_logged();
            self.lock().insert(
                name.clone(),
                Deployed {
                    version: cloud_version.unwrap_or(1),
                    sql: sql.to_owned(),
                    plan,
                    handle,
                    dead_letters,
                    deployed_at: SystemTime::now(),
                    state: handover.clone(),
                    managed,
                },
            );
            return Ok(Deployment {
                name,
                version: cloud_version.unwrap_or(1),
                state: handover,
            });
        };
        if let Some(reason) = state_loss(&old.plan, &plan)
            && !fresh
        {
            self.lock().insert(name.clone(), old);
            return Err(GatewayError::Conflict(format!(
                "pipeline '{name}' cannot keep its state: {reason}, so its open windows and \
                 detector history would start empty. The running version is unchanged; deploy \
                 again with `fresh` to start the new version without that state"
            )));
        }
        // Build the new version before stopping the old one: a version that cannot run
        // leaves the old one running.
        let factory = match PlanFactory::new(
            plan.clone(),
            old.dead_letters.clone(),
            self.engine.sink_context(),
        ) {
            Ok(factory) => factory,
            Err(error) => {
                self.lock().insert(name, old);
                return Err(error.into());
            }
        };
        let mut handover = match state_compatibility(&old.plan, &plan) {
            Ok(()) => StateHandover::Kept,
            Err(reason) => StateHandover::Fresh(reason),
        };
        let running = !old.handle.state.borrow().is_terminal();
        let state = if handover == StateHandover::Kept && running {
            let state = old.handle.stop_and_snapshot().await;
            if state.is_none() {
                handover = StateHandover::Fresh("the old version's state could not be read".into());
            }
            state
        } else {
            if handover == StateHandover::Kept {
                handover = StateHandover::Fresh("the old version was not running".into());
            }
            old.handle.stop_and_wait().await;
            None
        };
        self.engine.forget(&name);
        let handle = match self
            .engine
            .start_with_state(name.clone(), Arc::new(factory), state)
        {
            Ok(handle) => handle,
            Err(error) => {
                tracing::error!(pipeline = %name, %error, "new version did not start");
                return Err(error.into());
            }
        };
        crate::memory::release_startup_code_logged();
        let version = cloud_version.unwrap_or(old.version + 1);
        tracing::info!(pipeline = %name, version, state = ?handover, "pipeline replaced");
        self.lock().insert(
            name.clone(),
            Deployed {
                version,
                sql: sql.to_owned(),
                plan,
                handle,
                dead_letters: old.dead_letters,
                deployed_at: SystemTime::now(),
                state: handover.clone(),
                managed,
            },
        );
        Ok(Deployment {
            name,
            version,
            state: handover,
        })
    }

    /// Stops a pipeline, after what is in flight has reached its sink, and forgets it.
    pub async fn remove(&self, name: &str) -> Result<()> {
        let name = name.to_ascii_lowercase();
        let _changing = self.changes.lock().await;
        if self.lock().get(&name).is_some_and(|d| d.managed) {
            return Err(GatewayError::Conflict(format!(
                "pipeline '{name}' is managed by the cloud; remove it from its deployment there"
            )));
        }
        let removed = self.lock().remove(&name);
        let Some(removed) = removed else {
            return Err(GatewayError::NotFound(name));
        };
        removed.handle.stop_and_wait().await;
        self.engine.forget(&name);
        self.engine.forget_checkpoint(&name);
        tracing::info!(pipeline = %name, "pipeline removed");
        Ok(())
    }

    /// Starts the pipelines of every `.sql` file in `dir`, in name order. A file that does not
    /// compile or start is logged and skipped: one bad file must not keep a site dark.
    pub async fn load_dir(&self, dir: &Path) -> Result<usize> {
        let entries = std::fs::read_dir(dir).map_err(|source| GatewayError::Io {
            what: format!("reading {}", dir.display()),
            source,
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "sql"))
            .collect();
        files.sort();
        let mut started = 0;
        for file in files {
            let label = file.display().to_string();
            let sql = match std::fs::read_to_string(&file) {
                Ok(sql) => sql,
                Err(error) => {
                    tracing::error!(file = %label, %error, "cannot read pipeline file");
                    continue;
                }
            };
            match self.add(&sql, &label, false).await {
                Ok(deployed) => started += deployed.len(),
                Err(error) => tracing::error!("{label}: pipelines not started:\n{error}"),
            }
        }
        Ok(started)
    }

    /// Stops every pipeline, each after what it has in flight reached its sink.
    pub async fn shutdown(&self) {
        let _changing = self.changes.lock().await;
        let handles: Vec<PipelineHandle> = self.lock().values().map(|d| d.handle.clone()).collect();
        for handle in handles {
            handle.stop_and_wait().await;
        }
        self.engine.shutdown().await;
    }

    /// Every pipeline's status, by name.
    pub fn list(&self) -> Vec<PipelineStatus> {
        self.lock()
            .iter()
            .map(|(name, d)| status(name, d))
            .collect()
    }

    /// One pipeline's status, SQL and recent dead letters.
    pub fn get(&self, name: &str) -> Option<PipelineDetail> {
        let pipelines = self.lock();
        let deployed = pipelines.get(&name.to_ascii_lowercase())?;
        Some(PipelineDetail {
            status: status(name, deployed),
            sql: deployed.sql.clone(),
            explain: weir_planner::explain(&deployed.plan),
            dead_letters_by_reason: deployed.dead_letters.counts_by_reason(),
            recent_dead_letters: deployed
                .dead_letters
                .recent()
                .into_iter()
                .rev()
                .take(20)
                .map(|l| RecentDeadLetter {
                    reason: l.reason,
                    source: l.source,
                    payload: String::from_utf8_lossy(&l.payload).into_owned(),
                })
                .collect(),
        })
    }

    /// Dead-letter counts per pipeline and reason, for `/metrics`.
    pub fn dead_letter_counts(&self) -> Vec<(String, Vec<(String, u64)>)> {
        self.lock()
            .iter()
            .map(|(name, d)| (name.clone(), d.dead_letters.counts_by_reason()))
            .collect()
    }

    /// Starts `plan` as a new pipeline. It restores its last checkpoint if it has one that
    /// fits; one that does not fit is refused unless `fresh`, and then left behind.
    fn start(
        &self,
        plan: &PipelinePlan,
        fresh: bool,
    ) -> Result<(PipelineHandle, DeadLetterQueue, StateHandover)> {
        let name = &plan.name;
        let dead_letters = match &self.dead_letters_dir {
            Some(dir) => DeadLetterQueue::to_file(dir.join(format!("{}.jsonl", plan.name)))?,
            None => DeadLetterQueue::default(),
        };
        let factory = PlanFactory::new(
            plan.clone(),
            dead_letters.clone(),
            self.engine.sink_context(),
        )?;
        let handover = match self.engine.checkpoint_fits(name, &factory) {
            Some(false) if !fresh => {
                return Err(GatewayError::Conflict(format!(
                    "pipeline '{name}' has a checkpoint taken by a version with another source \
                     or other stateful operators, which this SQL cannot restore: starting it \
                     would lose those windows and positions. Deploy the SQL the checkpoint was \
                     taken with, or add it with `fresh` (weir pipelines add FILE --fresh) to \
                     start without that state"
                )));
            }
            Some(false) => {
                let reason = "its last checkpoint is of a version with another source or other \
                              stateful operators; it starts without that state";
                tracing::warn!(pipeline = %plan.name, "{reason}");
                StateHandover::Fresh(reason.into())
            }
            _ => StateHandover::New,
        };
        let handle = self
            .engine
            .start_with_state(plan.name.clone(), Arc::new(factory), None)?;
        tracing::info!(pipeline = %plan.name, "pipeline started");
        Ok((handle, dead_letters, handover))
    }
}

/// One pipeline in detail, for `GET /api/pipelines/NAME`.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineDetail {
    #[serde(flatten)]
    pub status: PipelineStatus,
    pub sql: String,
    pub explain: String,
    pub dead_letters_by_reason: Vec<(String, u64)>,
    pub recent_dead_letters: Vec<RecentDeadLetter>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RecentDeadLetter {
    pub reason: String,
    pub source: String,
    pub payload: String,
}

fn compile(sql: &str, file: &str) -> Result<Vec<PipelinePlan>> {
    let compiled = weir_planner::compile(sql).map_err(|error| GatewayError::Compile {
        rendered: error.render(file),
        diagnostics: error.diagnostics,
    })?;
    if compiled.pipelines.is_empty() {
        return Err(GatewayError::Invalid(format!(
            "{file}: defines no pipeline; add CREATE PIPELINE name AS INSERT INTO sink SELECT ..."
        )));
    }
    Ok(compiled.pipelines)
}

fn status(name: &str, deployed: &Deployed) -> PipelineStatus {
    let snapshot = deployed.handle.metrics.snapshot();
    let (state, error) = match &*deployed.handle.state.borrow() {
        PipelineState::Starting => ("starting", None),
        PipelineState::Running => ("running", None),
        PipelineState::Restarting { error, .. } => ("restarting", Some(error.clone())),
        PipelineState::Finished => ("finished", None),
        PipelineState::Failed(error) => ("failed", Some(error.clone())),
        PipelineState::Stopped => ("stopped", None),
    };
    let stages: Vec<StageStatus> = snapshot
        .stages
        .iter()
        .map(|s| StageStatus {
            name: s.name.clone(),
            rows_in: s.rows_in,
            rows_out: s.rows_out,
            late_rows: s.late_rows,
            invalid_rows: s.invalid_rows,
            errors: s.errors,
            mailbox_depth: s.mailbox_depth,
        })
        .collect();
    let sum = |f: fn(&StageStatus) -> u64| stages.iter().map(f).sum();
    PipelineStatus {
        name: name.to_owned(),
        version: deployed.version,
        managed: deployed.managed,
        state,
        error,
        source: deployed
            .plan
            .source
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_default(),
        sink: deployed
            .plan
            .sink
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_default(),
        rows_in: stages.first().map_or(0, |s| s.rows_out),
        rows_out: stages.last().map_or(0, |s| s.rows_in),
        late_rows: sum(|s| s.late_rows),
        invalid_rows: sum(|s| s.invalid_rows),
        errors: sum(|s| s.errors),
        dead_letters: deployed.dead_letters.count(),
        restarts: snapshot.restarts,
        checkpoints: deployed
            .handle
            .metrics
            .checkpoints
            .load(std::sync::atomic::Ordering::Relaxed),
        source_to_sink: snapshot.source_to_sink,
        watermark_to_emit: snapshot.watermark_to_emit,
        deployed_at: deployed
            .deployed_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64()),
        state_handover: deployed.state.clone(),
        stages,
    }
}
