//! Checkpoints: consistent snapshots of a running pipeline, committed atomically with the
//! results they cover.
//!
//! ```text
//!  source ──batch··batch··[Barrier 7: position]──> operator ──> ... ──> sink
//!                                   │ each operator appends its state     │
//!                                   ▼                                     ▼
//!              one synced RocksDB write: checkpoint 7 (position, states) + the results the
//!              `cloud` sink held since checkpoint 6 → then the source may acknowledge (MQTT)
//! ```
//!
//! The graph is a chain and every edge keeps order, so a barrier needs no alignment: when it
//! reaches a stage, that stage has seen exactly the data before it. After a crash the
//! pipeline restores every operator from the last committed checkpoint and the source seeks
//! to its position (or, for MQTT, the broker redelivers what was never acknowledged); the
//! results after that checkpoint were never committed, so they are produced again, once.

use std::sync::Arc;
use std::time::Duration;

use weir_connectors::Staged;
use weir_proto::engine::Checkpoint;

use crate::error::Result;

/// Where checkpoints are kept; the gateway's uplink store, so results and state commit in
/// one write.
pub trait CheckpointStore: Send + Sync {
    /// The last committed checkpoint of `pipeline`.
    fn load(&self, pipeline: &str) -> Result<Option<Checkpoint>>;
    /// Writes `checkpoint` and the batches `staged` in one atomic, synced write.
    fn commit(&self, pipeline: &str, checkpoint: &Checkpoint, staged: Option<Staged>)
    -> Result<()>;
    /// Deletes `pipeline`'s checkpoint: it was removed, or replaced by an incompatible
    /// version.
    fn forget(&self, pipeline: &str) -> Result<()>;
}

/// How the engine takes checkpoints.
#[derive(Clone)]
pub struct CheckpointOptions {
    pub store: Arc<dyn CheckpointStore>,
    pub interval: Duration,
}

impl std::fmt::Debug for CheckpointOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointOptions")
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}
