//! The durable store-and-forward queue of results bound for the cloud.
//!
//! ```text
//!  cloud sink ──append(batch)──> UplinkQueue (stream "vibration_rms")  ── RocksDB, <data>/uplink
//!                                   │ seq 41 · 42 · 43 · 44 ...          (one store, many streams)
//!  sender  <──pending(from, max)────┘
//!  sender  ──ack(through = 42)──> deletes 41, 42: the cloud has stored them
//! ```
//!
//! A batch counts as emitted once `append` returns: it is on disk, under the next sequence
//! number of its stream. Sequence numbers never repeat, even after every entry was acknowledged
//! and the gateway restarted, so the cloud can drop duplicates by (gateway, stream, sequence).
//! Batches are kept as Arrow IPC streams, exactly as the sink received them.
//!
//! Each stream has a budget of bytes on disk and of age. When it is full, the policy decides:
//! drop the oldest entries to make room, or refuse the newest. Every drop is counted, on disk
//! with the change itself, so the cloud can be told what a long outage cost even after a
//! restart. A storage error (a full disk) is returned to the
//! caller with what failed; the queue's state on disk stays consistent, because each change is
//! one atomic write batch.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arrow::array::RecordBatch;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use prost::Message as _;
use rocksdb::{DB, Direction, IteratorMode, Options, WriteBatch, WriteOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use weir_connectors::cloud::{Reaggregate, StreamSpec, UplinkAppender, UplinkWriter};
use weir_connectors::{ConnectorError, Result as ConnectorResult, Staged};
use weir_proto::engine::Checkpoint;

use crate::checkpoint::CheckpointStore;
use crate::error::{EngineError, Result};

/// What to do when a stream's budget is full: the `cloud` sink's `overflow` option.
pub use weir_connectors::cloud::Overflow as OverflowPolicy;
pub use weir_connectors::cloud::StreamPriority;

/// How much one stream may keep on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UplinkBudget {
    pub max_bytes: u64,
    /// Entries older than this are dropped (and counted) by [`UplinkQueue::expire`].
    pub max_age: Duration,
    pub policy: OverflowPolicy,
}

impl Default for UplinkBudget {
    fn default() -> Self {
        Self {
            max_bytes: 256 << 20,
            max_age: Duration::from_secs(7 * 24 * 3600),
            policy: OverflowPolicy::DropOldest,
        }
    }
}

/// What `append` did with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    Stored {
        seq: u64,
    },
    /// The budget was full and the policy is [`OverflowPolicy::DropNewest`].
    Refused,
}

/// One queued batch.
#[derive(Debug, Clone)]
pub struct Pending {
    pub seq: u64,
    pub enqueued_at_ms: u64,
    /// The batch as an Arrow IPC stream.
    pub payload: Vec<u8>,
}

impl Pending {
    pub fn batches(&self) -> Result<Vec<RecordBatch>> {
        decode(&self.payload)
    }
}

/// A stream's counters, for metrics and for the report to the cloud.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct UplinkStats {
    pub priority: StreamPriority,
    pub pending: u64,
    pub pending_bytes: u64,
    pub oldest_pending_ms: Option<u64>,
    /// The next sequence number `append` will give.
    pub next_seq: u64,
    pub appended: u64,
    pub acknowledged: u64,
    pub dropped_oldest: u64,
    pub refused_newest: u64,
    pub expired: u64,
    /// Entries merged into coarser ones by re-aggregation.
    pub merged: u64,
}

/// The database, opened again after a failed write: RocksDB refuses every write after one
/// failed (a full disk) until it is reopened, which works, with nothing lost, once space
/// has returned. Attempts are at most once a second.
struct Disk {
    path: PathBuf,
    db: RwLock<Option<DB>>,
    failed: AtomicBool,
    last_attempt: Mutex<Option<Instant>>,
}

fn db_options() -> Options {
    let mut options = Options::default();
    options.create_if_missing(true);
    options.set_write_buffer_size(8 << 20);
    options.set_max_open_files(128);
    options
}

impl Disk {
    fn open(path: &Path) -> Result<Self> {
        let db = DB::open(&db_options(), path).map_err(|error| {
            EngineError::Storage(format!(
                "cannot open the uplink store in {}: {error}",
                path.display()
            ))
        })?;
        Ok(Self {
            path: path.to_owned(),
            db: RwLock::new(Some(db)),
            failed: AtomicBool::new(false),
            last_attempt: Mutex::default(),
        })
    }

    /// Runs `f` on the database, reopening it first if a write failed before.
    fn with<T>(
        &self,
        f: impl FnOnce(&DB) -> std::result::Result<T, rocksdb::Error>,
    ) -> std::result::Result<T, String> {
        if self.failed.load(Ordering::Acquire) {
            self.reopen();
        }
        let db = self.db.read().unwrap_or_else(PoisonError::into_inner);
        let db = db.as_ref().ok_or_else(|| {
            format!(
                "the store in {} is unavailable after a failed write; retrying once space returns",
                self.path.display()
            )
        })?;
        f(db).map_err(|error| error.to_string())
    }

    /// A synced write; a failure marks the database for reopening.
    fn write(&self, batch: WriteBatch) -> std::result::Result<(), String> {
        let mut options = WriteOptions::default();
        options.set_sync(true);
        self.with(|db| db.write_opt(batch, &options))
            .inspect_err(|_| {
                self.failed.store(true, Ordering::Release);
            })
    }

    fn reopen(&self) {
        {
            let mut last = self
                .last_attempt
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if last.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
                return;
            }
            *last = Some(Instant::now());
        }
        let mut db = self.db.write().unwrap_or_else(PoisonError::into_inner);
        // The old handle must be closed first: it holds the directory's lock.
        drop(db.take());
        match DB::open(&db_options(), &self.path) {
            Ok(opened) => {
                *db = Some(opened);
                self.failed.store(false, Ordering::Release);
                tracing::info!(store = %self.path.display(), "uplink store writable again");
            }
            Err(error) => {
                tracing::warn!(store = %self.path.display(), %error, "uplink store still cannot be reopened");
            }
        }
    }
}

/// The on-disk store of every stream's queue.
#[derive(Clone)]
pub struct UplinkStore {
    db: Arc<Disk>,
    /// One queue per stream, whoever asks: two would hand out the same sequence numbers.
    queues: Arc<Mutex<HashMap<String, Arc<UplinkQueue>>>>,
    /// Woken after every append, so the sender need not poll.
    appended: Arc<Notify>,
}

/// What the store remembers of a stream beyond its entries, so that a sender after a restart
/// drains a stream whose pipeline is gone with the priority it had.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StreamMeta {
    priority: StreamPriority,
    max_bytes: u64,
    max_age_ms: u64,
    policy: OverflowPolicy,
    #[serde(default)]
    reaggregate: Option<Reaggregate>,
}

/// Keys of stream metadata: `\0s` then the name (names never hold `\0`).
const META_PREFIX: &[u8] = b"\0s";

impl UplinkStore {
    /// Opens (or creates) the store in `dir`; fails if another process holds it.
    pub fn open(dir: &Path) -> Result<Self> {
        Ok(Self {
            db: Arc::new(Disk::open(dir)?),
            queues: Arc::default(),
            appended: Arc::default(),
        })
    }

    /// Notified after every append to any stream.
    pub fn appended(&self) -> Arc<Notify> {
        Arc::clone(&self.appended)
    }

    /// The queue a `cloud` sink asks for: its budget and priority are remembered on disk and
    /// replace those of an earlier version of the stream.
    pub fn open_stream(&self, spec: &StreamSpec) -> Result<Arc<UplinkQueue>> {
        let budget = UplinkBudget {
            max_bytes: spec.max_bytes,
            max_age: spec.max_age,
            policy: spec.overflow,
        };
        let queue = self.queue(&spec.name, budget)?;
        queue.configure(budget, spec.priority, spec.reaggregate.clone());
        let meta = StreamMeta {
            priority: spec.priority,
            max_bytes: budget.max_bytes,
            max_age_ms: budget.max_age.as_millis() as u64,
            policy: budget.policy,
            reaggregate: spec.reaggregate.clone(),
        };
        let mut key = META_PREFIX.to_vec();
        key.extend_from_slice(spec.name.as_bytes());
        let value = serde_json::to_vec(&meta)
            .map_err(|e| EngineError::Internal(format!("stream settings: {e}")))?;
        let mut writes = WriteBatch::default();
        writes.put(key, value);
        self.db
            .write(writes)
            .map_err(storage("remembering the stream's settings", &spec.name))?;
        Ok(queue)
    }

    /// Every stream this store holds, including those whose pipeline is gone, each with the
    /// settings it last had.
    pub fn streams(&self) -> Result<Vec<Arc<UplinkQueue>>> {
        let listed = self
            .db
            .with(|db| {
                let mut listed = Vec::new();
                for item in db.iterator(IteratorMode::From(META_PREFIX, Direction::Forward)) {
                    let (key, value) = item?;
                    let Some(name) = key.strip_prefix(META_PREFIX) else {
                        break;
                    };
                    listed.push((String::from_utf8_lossy(name).into_owned(), value));
                }
                Ok(listed)
            })
            .map_err(storage("listing streams", "*"))?;
        let mut found = Vec::new();
        for (name, value) in listed {
            match serde_json::from_slice::<StreamMeta>(&value) {
                Ok(meta) => found.push((name, meta)),
                Err(error) => {
                    tracing::warn!(stream = %name, %error, "unreadable stream settings; skipped")
                }
            }
        }
        found
            .into_iter()
            .map(|(name, meta)| {
                let budget = UplinkBudget {
                    max_bytes: meta.max_bytes,
                    max_age: Duration::from_millis(meta.max_age_ms),
                    policy: meta.policy,
                };
                let queue = self.queue(&name, budget)?;
                // A queue opened this run already has its sink's settings.
                if !queue.lock().configured {
                    queue.configure(budget, meta.priority, meta.reaggregate);
                }
                Ok(queue)
            })
            .collect()
    }

    /// The queue of `stream`, with what an earlier run left in it. Asking again returns the
    /// same queue; `budget` applies when the queue is first opened.
    pub fn queue(&self, stream: &str, budget: UplinkBudget) -> Result<Arc<UplinkQueue>> {
        let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(queue) = queues.get(stream) {
            return Ok(Arc::clone(queue));
        }
        let queue = Arc::new(UplinkQueue::open(
            Arc::clone(&self.db),
            stream,
            budget,
            Arc::clone(&self.appended),
        )?);
        queues.insert(stream.to_owned(), Arc::clone(&queue));
        Ok(queue)
    }
}

#[derive(Default)]
struct Counters {
    appended: AtomicU64,
    acknowledged: AtomicU64,
    dropped_oldest: AtomicU64,
    refused_newest: AtomicU64,
    expired: AtomicU64,
    merged: AtomicU64,
}

/// Marks a coarse (re-aggregated) entry in the top bit of its enqueue time, so that the
/// entry says what it is to anyone reading the store.
const COARSE: u64 = 1 << 63;

struct Index {
    budget: UplinkBudget,
    priority: StreamPriority,
    next_seq: u64,
    /// (seq, bytes, enqueued_at_ms) of every pending entry, oldest first.
    entries: VecDeque<(u64, u64, u64)>,
    bytes: u64,
    /// How to re-aggregate, with [`OverflowPolicy::Reaggregate`].
    reaggregate: Option<Arc<Reaggregate>>,
    /// Budget, priority and re-aggregation were set, by a sink or from the stored settings.
    configured: bool,
    /// Entries the cloud may hold without having acknowledged them: sent on a stream whose
    /// answer never came. Re-aggregating one could store its windows twice, so they are
    /// left alone until the cloud says, when the next stream opens, what it holds.
    unsettled: std::collections::BTreeSet<u64>,
    /// Entries below this were there when the queue opened: a previous process may have
    /// sent them. Unsettled, too, until the next stream opens.
    unsettled_below: u64,
}

impl Index {
    fn settled(&self, seq: u64) -> bool {
        seq >= self.unsettled_below && !self.unsettled.contains(&seq)
    }
}

/// One stream's queue; see the module docs.
pub struct UplinkQueue {
    db: Arc<Disk>,
    stream: String,
    appended: Arc<Notify>,
    index: Mutex<Index>,
    counters: Counters,
}

const ENTRY: u8 = b'e';
const NEXT_SEQ: u8 = b'n';
/// What budgets cost the stream, kept across restarts so the cloud can be told:
/// dropped oldest, refused newest, expired (three big-endian u64).
const LOSSES: u8 = b'l';

fn key(stream: &str, kind: u8, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(stream.len() + 10);
    key.extend_from_slice(stream.as_bytes());
    key.push(0);
    key.push(kind);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn storage<E: std::fmt::Display>(what: &str, stream: &str) -> impl FnOnce(E) -> EngineError {
    let what = format!("uplink stream '{stream}': {what}");
    move |error| EngineError::Storage(format!("{what}: {error}"))
}

/// A batch as an Arrow IPC stream.
pub fn encode(batch: &RecordBatch) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut writer = StreamWriter::try_new(&mut bytes, &batch.schema())
        .map_err(|e| EngineError::Internal(format!("encoding a result batch: {e}")))?;
    writer
        .write(batch)
        .and_then(|()| writer.finish())
        .map_err(|e| EngineError::Internal(format!("encoding a result batch: {e}")))?;
    drop(writer);
    Ok(bytes)
}

fn decode(bytes: &[u8]) -> Result<Vec<RecordBatch>> {
    let reader = StreamReader::try_new(bytes, None)
        .map_err(|e| EngineError::Storage(format!("a queued batch cannot be read: {e}")))?;
    reader
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| EngineError::Storage(format!("a queued batch cannot be read: {e}")))
}

impl UplinkQueue {
    fn open(
        db: Arc<Disk>,
        stream: &str,
        budget: UplinkBudget,
        appended: Arc<Notify>,
    ) -> Result<Self> {
        if stream.is_empty() || stream.contains('\0') {
            return Err(EngineError::Plan(format!(
                "uplink stream name '{stream}' must be non-empty text"
            )));
        }
        let mut entries = VecDeque::new();
        let mut bytes = 0;
        let first = key(stream, ENTRY, 0);
        let (stored_next, losses) = db
            .with(|db| {
                for item in db.iterator(IteratorMode::From(&first, Direction::Forward)) {
                    let (k, v) = item?;
                    if !k.starts_with(&first[..first.len() - 8]) {
                        break;
                    }
                    let seq = u64::from_be_bytes(k[k.len() - 8..].try_into().unwrap_or([0; 8]));
                    let stamp = v
                        .get(..8)
                        .and_then(|b| b.try_into().ok())
                        .map_or(0, u64::from_be_bytes);
                    entries.push_back((seq, v.len() as u64, stamp & !COARSE));
                    bytes += v.len() as u64;
                }
                Ok((
                    db.get(key(stream, NEXT_SEQ, 0))?,
                    db.get(key(stream, LOSSES, 0))?,
                ))
            })
            .map_err(storage("reading the queue", stream))?;
        let stored_next = stored_next
            .and_then(|v| v.as_slice().try_into().ok())
            .map_or(0, u64::from_be_bytes);
        let next_seq = stored_next.max(entries.back().map_or(0, |(seq, _, _)| seq + 1));
        let losses = losses
            .filter(|v| v.len() == 24 || v.len() == 32)
            .map_or([0u64; 4], |v| {
                let word = |i: usize| {
                    v.get(i * 8..i * 8 + 8)
                        .and_then(|b| b.try_into().ok())
                        .map_or(0, u64::from_be_bytes)
                };
                [word(0), word(1), word(2), word(3)]
            });
        let counters = Counters::default();
        counters.dropped_oldest.store(losses[0], Ordering::Relaxed);
        counters.refused_newest.store(losses[1], Ordering::Relaxed);
        counters.expired.store(losses[2], Ordering::Relaxed);
        counters.merged.store(losses[3], Ordering::Relaxed);
        Ok(Self {
            db,
            stream: stream.to_owned(),
            appended,
            index: Mutex::new(Index {
                budget,
                priority: StreamPriority::Normal,
                next_seq,
                entries,
                bytes,
                reaggregate: None,
                configured: false,
                unsettled: Default::default(),
                unsettled_below: next_seq,
            }),
            counters,
        })
    }

    /// The loss counters as they will be once `dropped`, `refused` and `expired` more are
    /// counted: the value of the LOSSES key.
    fn losses_after(&self, dropped: u64, refused: u64, expired: u64) -> Vec<u8> {
        self.losses_with(dropped, refused, expired, 0)
    }

    fn losses_with(&self, dropped: u64, refused: u64, expired: u64, merged: u64) -> Vec<u8> {
        let c = &self.counters;
        [
            c.dropped_oldest.load(Ordering::Relaxed) + dropped,
            c.refused_newest.load(Ordering::Relaxed) + refused,
            c.expired.load(Ordering::Relaxed) + expired,
            c.merged.load(Ordering::Relaxed) + merged,
        ]
        .iter()
        .flat_map(|n| n.to_be_bytes())
        .collect()
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self, batch: WriteBatch, what: &str) -> Result<()> {
        self.db.write(batch).map_err(storage(what, &self.stream))
    }

    /// Stores `batch` under the next sequence number, making room by the budget's policy.
    pub fn append(&self, batch: &RecordBatch) -> Result<Appended> {
        let appended = self.append_with(std::slice::from_ref(batch), WriteBatch::default())?;
        Ok(appended.into_iter().next().unwrap_or(Appended::Refused))
    }

    /// Stores `batches` in order, making room by the budget's policy, in one synced write
    /// together with whatever `writes` already holds (a checkpoint). Either all of it is on
    /// disk afterwards or none of it.
    fn append_with(
        &self,
        batches: &[RecordBatch],
        mut writes: WriteBatch,
    ) -> Result<Vec<Appended>> {
        let enqueued = now_ms();
        let values = batches
            .iter()
            .map(|batch| {
                let ipc = encode(batch)?;
                let mut value = Vec::with_capacity(ipc.len() + 8);
                value.extend_from_slice(&enqueued.to_be_bytes());
                value.extend_from_slice(&ipc);
                Ok(value)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut index = self.lock();
        let incoming: u64 = values.iter().map(|v| v.len() as u64).sum();
        if index.budget.policy == OverflowPolicy::Reaggregate
            && index.bytes + incoming > index.budget.max_bytes
        {
            self.reaggregate_oldest(&mut index)?;
        }
        let budget = index.budget;
        let mut bytes = index.bytes;
        let mut next_seq = index.next_seq;
        // Evicted from the front of the queue, then from this call's own new entries.
        let (mut evicted, mut evicted_fresh, mut refused) = (0usize, 0usize, 0u64);
        let mut fresh: Vec<(u64, u64, u64)> = Vec::new();
        let mut results = Vec::with_capacity(values.len());
        for value in values {
            let size = value.len() as u64;
            let mut fits = size <= budget.max_bytes;
            while fits && bytes + size > budget.max_bytes {
                if budget.policy == OverflowPolicy::DropNewest {
                    fits = false;
                } else if evicted < index.entries.len() {
                    bytes -= index.entries[evicted].1;
                    writes.delete(key(&self.stream, ENTRY, index.entries[evicted].0));
                    evicted += 1;
                } else {
                    let (seq, old, _) = fresh[evicted_fresh];
                    bytes -= old;
                    writes.delete(key(&self.stream, ENTRY, seq));
                    evicted_fresh += 1;
                }
            }
            if !fits {
                refused += 1;
                results.push(Appended::Refused);
                continue;
            }
            let seq = next_seq;
            next_seq += 1;
            writes.put(key(&self.stream, ENTRY, seq), &value);
            fresh.push((seq, size, enqueued));
            bytes += size;
            results.push(Appended::Stored { seq });
        }
        let dropped = (evicted + evicted_fresh) as u64;
        writes.put(key(&self.stream, NEXT_SEQ, 0), next_seq.to_be_bytes());
        if dropped > 0 || refused > 0 {
            // The count must not be lost with the batches: it is written with them.
            writes.put(
                key(&self.stream, LOSSES, 0),
                self.losses_after(dropped, refused, 0),
            );
        }
        self.write(writes, "storing result batches")?;
        index.entries.drain(..evicted);
        index
            .entries
            .extend(fresh.iter().skip(evicted_fresh).copied());
        index.bytes = bytes;
        index.next_seq = next_seq;
        drop(index);
        let c = &self.counters;
        c.appended.fetch_add(fresh.len() as u64, Ordering::Relaxed);
        c.dropped_oldest.fetch_add(dropped, Ordering::Relaxed);
        c.refused_newest.fetch_add(refused, Ordering::Relaxed);
        if !fresh.is_empty() {
            self.appended.notify_one();
        }
        Ok(results)
    }

    /// Merges the oldest entries, up to half the budget, into one coarse entry under a new
    /// sequence number, in one synced write, counting them as merged. Coarse entries of the
    /// same coarse window merge again into one. Nothing happens if there are fewer than two,
    /// if merging would not save space (all coarse already, each its own window), or if they
    /// cannot be merged (a schema change): the caller then drops the oldest as usual.
    fn reaggregate_oldest(&self, index: &mut Index) -> Result<()> {
        let Some(spec) = index.reaggregate.clone() else {
            return Ok(());
        };
        let half = index.budget.max_bytes / 2;
        let mut chosen = Vec::new();
        let mut chosen_bytes = 0;
        for &(seq, size, at) in index
            .entries
            .iter()
            .filter(|(seq, _, _)| index.settled(*seq))
        {
            if chosen_bytes >= half {
                break;
            }
            chosen.push((seq, size, at));
            chosen_bytes += size;
        }
        if chosen.len() < 2 {
            return Ok(());
        }
        let keys: Vec<Vec<u8>> = chosen
            .iter()
            .map(|(seq, _, _)| key(&self.stream, ENTRY, *seq))
            .collect();
        let values = self
            .db
            .with(|db| {
                db.multi_get(&keys)
                    .into_iter()
                    .collect::<std::result::Result<Vec<_>, _>>()
            })
            .map_err(storage("reading batches to re-aggregate", &self.stream))?;
        let mut batches = Vec::new();
        for value in values.into_iter().flatten() {
            batches.extend(decode(value.get(8..).unwrap_or_default())?);
        }
        let merged = match crate::reaggregate::coarsen(&batches, &spec) {
            Ok(merged) => merged,
            Err(error) => {
                tracing::warn!(stream = %self.stream, %error, "backlog cannot be re-aggregated; dropping the oldest instead");
                return Ok(());
            }
        };
        let oldest = chosen
            .iter()
            .map(|(_, _, at)| *at)
            .min()
            .unwrap_or_else(now_ms);
        let ipc = encode(&merged)?;
        if ipc.len() as u64 + 8 >= chosen_bytes {
            return Ok(());
        }
        let mut value = Vec::with_capacity(ipc.len() + 8);
        value.extend_from_slice(&(oldest | COARSE).to_be_bytes());
        value.extend_from_slice(&ipc);
        let seq = index.next_seq;
        let mut writes = WriteBatch::default();
        for key in &keys {
            writes.delete(key);
        }
        writes.put(key(&self.stream, ENTRY, seq), &value);
        writes.put(key(&self.stream, NEXT_SEQ, 0), (seq + 1).to_be_bytes());
        writes.put(
            key(&self.stream, LOSSES, 0),
            self.losses_with(0, 0, 0, chosen.len() as u64),
        );
        self.write(writes, "storing a re-aggregated batch")?;
        let gone: std::collections::HashSet<u64> = chosen.iter().map(|(s, _, _)| *s).collect();
        index.entries.retain(|(s, _, _)| !gone.contains(s));
        index.entries.push_back((seq, value.len() as u64, oldest));
        index.bytes = index.bytes - chosen_bytes + value.len() as u64;
        index.next_seq = seq + 1;
        self.counters
            .merged
            .fetch_add(chosen.len() as u64, Ordering::Relaxed);
        tracing::info!(stream = %self.stream, merged = chosen.len(), to = ?spec.granularity, "backlog re-aggregated to fit its budget");
        Ok(())
    }

    /// Up to `max` pending entries from `from_seq` on, in order.
    pub fn pending(&self, from_seq: u64, max: usize) -> Result<Vec<Pending>> {
        let start = key(&self.stream, ENTRY, from_seq);
        let prefix = &start[..start.len() - 8];
        self.db
            .with(|db| {
                let mut out = Vec::new();
                for item in db.iterator(IteratorMode::From(&start, Direction::Forward)) {
                    if out.len() >= max {
                        break;
                    }
                    let (k, v) = item?;
                    if !k.starts_with(prefix) {
                        break;
                    }
                    let seq = u64::from_be_bytes(k[k.len() - 8..].try_into().unwrap_or([0; 8]));
                    let (stamp, payload) = v.split_at(v.len().min(8));
                    out.push(Pending {
                        seq,
                        enqueued_at_ms: stamp.try_into().map_or(0, u64::from_be_bytes) & !COARSE,
                        payload: payload.to_vec(),
                    });
                }
                Ok(out)
            })
            .map_err(storage("reading the queue", &self.stream))
    }

    /// Deletes every entry up to and including `through_seq`: the cloud has stored them.
    /// Returns how many were deleted.
    /// Notes that entry `seq` is on its way to the cloud: until the cloud says whether it
    /// stored it, it is not re-aggregated.
    pub fn sent(&self, seq: u64) {
        self.lock().unsettled.insert(seq);
    }

    /// The cloud has said what it holds (the answer to a stream's opening, applied with
    /// [`Self::ack_ranges`]): what is still queued, it does not have.
    pub fn settle(&self) {
        let mut index = self.lock();
        index.unsettled.clear();
        index.unsettled_below = 0;
    }

    pub fn ack(&self, through_seq: u64) -> Result<usize> {
        let mut index = self.lock();
        let done = index
            .entries
            .iter()
            .take_while(|(seq, _, _)| *seq <= through_seq)
            .count();
        if done == 0 {
            return Ok(0);
        }
        let mut writes = WriteBatch::default();
        writes.delete_range(
            key(&self.stream, ENTRY, 0),
            key(&self.stream, ENTRY, through_seq.saturating_add(1)),
        );
        self.write(writes, "deleting acknowledged batches")?;
        let freed: u64 = index.entries.drain(..done).map(|(_, bytes, _)| bytes).sum();
        index.unsettled = index.unsettled.split_off(&through_seq.saturating_add(1));
        index.bytes -= freed;
        self.counters
            .acknowledged
            .fetch_add(done as u64, Ordering::Relaxed);
        Ok(done)
    }

    /// Drops entries older than the budget's age, counting them; returns how many.
    pub fn expire(&self) -> Result<usize> {
        let mut index = self.lock();
        let cutoff = now_ms().saturating_sub(index.budget.max_age.as_millis() as u64);
        let stale = index
            .entries
            .iter()
            .take_while(|(_, _, enqueued)| *enqueued < cutoff)
            .count();
        if stale == 0 {
            return Ok(0);
        }
        let mut writes = WriteBatch::default();
        for &(seq, _, _) in index.entries.iter().take(stale) {
            writes.delete(key(&self.stream, ENTRY, seq));
        }
        writes.put(
            key(&self.stream, LOSSES, 0),
            self.losses_after(0, 0, stale as u64),
        );
        self.write(writes, "dropping expired batches")?;
        let freed: u64 = index
            .entries
            .drain(..stale)
            .map(|(_, bytes, _)| bytes)
            .sum();
        index.bytes -= freed;
        self.counters
            .expired
            .fetch_add(stale as u64, Ordering::Relaxed);
        Ok(stale)
    }

    /// Deletes the pending entries within `ranges` (each `first..=last`, in any order):
    /// the cloud has stored them. Unlike [`Self::ack`], the rest need not be a prefix: live
    /// batches overtake a draining backlog.
    pub fn ack_ranges(&self, ranges: &[(u64, u64)]) -> Result<usize> {
        if ranges.is_empty() {
            return Ok(0);
        }
        let wanted = |seq: &u64| {
            ranges
                .iter()
                .any(|(first, last)| (first..=last).contains(&seq))
        };
        let mut index = self.lock();
        let mut writes = WriteBatch::default();
        let mut done = 0;
        for &(seq, _, _) in index.entries.iter().filter(|(s, _, _)| wanted(s)) {
            writes.delete(key(&self.stream, ENTRY, seq));
            done += 1;
        }
        if done == 0 {
            return Ok(0);
        }
        self.write(writes, "deleting acknowledged batches")?;
        let mut freed = 0;
        index.unsettled.retain(|seq| !wanted(seq));
        index.entries.retain(|&(seq, bytes, _)| {
            let gone = wanted(&seq);
            if gone {
                freed += bytes;
            }
            !gone
        });
        index.bytes -= freed;
        self.counters
            .acknowledged
            .fetch_add(done as u64, Ordering::Relaxed);
        Ok(done)
    }

    /// The stream's name.
    pub fn name(&self) -> &str {
        &self.stream
    }

    pub fn priority(&self) -> StreamPriority {
        self.lock().priority
    }

    /// The sequence number of the oldest pending entry, if any.
    pub fn first_pending(&self) -> Option<u64> {
        self.lock().entries.front().map(|(seq, _, _)| *seq)
    }

    fn configure(
        &self,
        budget: UplinkBudget,
        priority: StreamPriority,
        reaggregate: Option<Reaggregate>,
    ) {
        let mut index = self.lock();
        index.budget = budget;
        index.priority = priority;
        index.reaggregate = reaggregate.map(Arc::new);
        index.configured = true;
    }

    pub fn stats(&self) -> UplinkStats {
        let index = self.lock();
        let c = &self.counters;
        UplinkStats {
            priority: index.priority,
            pending: index.entries.len() as u64,
            pending_bytes: index.bytes,
            oldest_pending_ms: index.entries.front().map(|(_, _, at)| *at),
            next_seq: index.next_seq,
            appended: c.appended.load(Ordering::Relaxed),
            acknowledged: c.acknowledged.load(Ordering::Relaxed),
            dropped_oldest: c.dropped_oldest.load(Ordering::Relaxed),
            refused_newest: c.refused_newest.load(Ordering::Relaxed),
            expired: c.expired.load(Ordering::Relaxed),
            merged: c.merged.load(Ordering::Relaxed),
        }
    }
}

/// Keys of checkpoints: `\0c` then the pipeline's name.
const CHECKPOINT_PREFIX: &[u8] = b"\0c";

fn checkpoint_key(pipeline: &str) -> Vec<u8> {
    let mut key = CHECKPOINT_PREFIX.to_vec();
    key.extend_from_slice(pipeline.as_bytes());
    key
}

/// Checkpoints live in the uplink store, so that a checkpoint and the results it covers are
/// one atomic write.
impl CheckpointStore for UplinkStore {
    fn load(&self, pipeline: &str) -> Result<Option<Checkpoint>> {
        let Some(bytes) = self
            .db
            .with(|db| db.get(checkpoint_key(pipeline)))
            .map_err(storage("reading the checkpoint", pipeline))?
        else {
            return Ok(None);
        };
        Checkpoint::decode(bytes.as_slice()).map(Some).map_err(|e| {
            EngineError::Storage(format!(
                "the checkpoint of '{pipeline}' cannot be read: {e}"
            ))
        })
    }

    fn commit(
        &self,
        pipeline: &str,
        checkpoint: &Checkpoint,
        staged: Option<Staged>,
    ) -> Result<()> {
        let mut writes = WriteBatch::default();
        writes.put(checkpoint_key(pipeline), checkpoint.encode_to_vec());
        match staged {
            Some(staged) if !staged.batches.is_empty() => {
                let queue = self.queue(&staged.stream, UplinkBudget::default())?;
                queue.append_with(&staged.batches, writes)?;
                Ok(())
            }
            _ => self
                .db
                .write(writes)
                .map_err(storage("writing the checkpoint", pipeline)),
        }
    }

    fn forget(&self, pipeline: &str) -> Result<()> {
        let mut writes = WriteBatch::default();
        writes.delete(checkpoint_key(pipeline));
        self.db
            .write(writes)
            .map_err(storage("deleting the checkpoint", pipeline))
    }
}

/// The engine's side of the `cloud` sink: a stream's queue in this store.
impl UplinkWriter for UplinkStore {
    fn open(&self, stream: &StreamSpec) -> ConnectorResult<Box<dyn UplinkAppender>> {
        let queue = self.open_stream(stream).map_err(to_connector)?;
        Ok(Box::new(QueueAppender(queue)))
    }
}

struct QueueAppender(Arc<UplinkQueue>);

impl UplinkAppender for QueueAppender {
    fn append(&mut self, batch: &RecordBatch) -> ConnectorResult<bool> {
        // Age is enforced where batches arrive, so it holds while the cloud is unreachable.
        self.0.expire().map_err(to_connector)?;
        match self.0.append(batch).map_err(to_connector)? {
            Appended::Stored { .. } => Ok(true),
            Appended::Refused => Ok(false),
        }
    }
}

fn to_connector(error: EngineError) -> ConnectorError {
    match error {
        EngineError::Storage(message) => ConnectorError::Storage(message),
        other => ConnectorError::Internal(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Float64Array, Int64Array};
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn batch(first: i64, rows: usize) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("n", DataType::Int64, false),
            Field::new("rms", DataType::Float64, true),
        ]));
        let n: Vec<i64> = (first..first + rows as i64).collect();
        let rms: Vec<f64> = n.iter().map(|v| *v as f64 / 10.0).collect();
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(n)),
                Arc::new(Float64Array::from(rms)),
            ],
        )
        .expect("batch")
    }

    fn first_n(pending: &Pending) -> i64 {
        let batches = pending.batches().expect("decode");
        batches[0]
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("ints")
            .value(0)
    }

    fn budget(max_bytes: u64, policy: OverflowPolicy) -> UplinkBudget {
        UplinkBudget {
            max_bytes,
            policy,
            ..UplinkBudget::default()
        }
    }

    #[test]
    fn batches_come_back_in_order_and_acknowledged_ones_are_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = UplinkStore::open(dir.path()).expect("open");
        let queue = store.queue("rms", UplinkBudget::default()).expect("queue");
        for i in 0..5 {
            assert_eq!(
                queue.append(&batch(i * 10, 3)).expect("append"),
                Appended::Stored { seq: i as u64 }
            );
        }
        let pending = queue.pending(0, 10).expect("pending");
        let seqs: Vec<u64> = pending.iter().map(|p| p.seq).collect();
        assert_eq!(seqs, [0, 1, 2, 3, 4]);
        assert_eq!(pending[2].batches().expect("decode")[0], batch(20, 3));
        assert_eq!(queue.ack(2).expect("ack"), 3);
        let seqs: Vec<u64> = queue
            .pending(0, 10)
            .expect("pending")
            .iter()
            .map(|p| p.seq)
            .collect();
        assert_eq!(seqs, [3, 4]);
        assert_eq!(queue.pending(4, 10).expect("from 4").len(), 1);
        assert_eq!(queue.pending(0, 1).expect("at most one").len(), 1);
        assert_eq!(
            queue.ack(2).expect("again"),
            0,
            "acknowledging twice changes nothing"
        );
        let stats = queue.stats();
        assert_eq!(
            (stats.pending, stats.appended, stats.acknowledged),
            (2, 5, 3)
        );
    }

    #[test]
    fn a_restart_keeps_what_is_pending_and_never_reuses_a_sequence_number() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = UplinkStore::open(dir.path()).expect("open");
            let queue = store.queue("rms", UplinkBudget::default()).expect("queue");
            for i in 0..3 {
                queue.append(&batch(i, 1)).expect("append");
            }
            queue.ack(0).expect("ack");
            let alerts = store
                .queue("alerts", UplinkBudget::default())
                .expect("queue");
            alerts.append(&batch(100, 1)).expect("append");
            alerts.ack(0).expect("ack everything");
        }
        let store = UplinkStore::open(dir.path()).expect("reopen");
        let queue = store.queue("rms", UplinkBudget::default()).expect("queue");
        let pending = queue.pending(0, 10).expect("pending");
        assert_eq!(pending.iter().map(|p| p.seq).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(first_n(&pending[0]), 1);
        assert_eq!(
            queue.append(&batch(9, 1)).expect("append"),
            Appended::Stored { seq: 3 }
        );
        let alerts = store
            .queue("alerts", UplinkBudget::default())
            .expect("queue");
        assert!(
            alerts.pending(0, 10).expect("pending").is_empty(),
            "streams are apart"
        );
        assert_eq!(
            alerts.append(&batch(0, 1)).expect("append"),
            Appended::Stored { seq: 1 },
            "an emptied stream goes on from its last number"
        );
    }

    #[test]
    fn a_full_budget_drops_the_oldest_or_refuses_the_newest_and_counts_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = UplinkStore::open(dir.path()).expect("open");
        let one = encode(&batch(0, 4)).expect("encode").len() as u64 + 8;
        let oldest = store
            .queue("bulk", budget(3 * one, OverflowPolicy::DropOldest))
            .expect("queue");
        for i in 0..5 {
            oldest.append(&batch(i, 4)).expect("append");
        }
        let kept = oldest.pending(0, 10).expect("pending");
        assert_eq!(kept.iter().map(|p| p.seq).collect::<Vec<_>>(), [2, 3, 4]);
        let stats = oldest.stats();
        assert_eq!((stats.dropped_oldest, stats.pending_bytes), (2, 3 * one));

        let newest = store
            .queue("history", budget(3 * one, OverflowPolicy::DropNewest))
            .expect("queue");
        let outcomes: Vec<Appended> = (0..5)
            .map(|i| newest.append(&batch(i, 4)).expect("append"))
            .collect();
        assert_eq!(outcomes[3], Appended::Refused);
        assert_eq!(outcomes[4], Appended::Refused);
        let kept = newest.pending(0, 10).expect("pending");
        assert_eq!(kept.iter().map(|p| p.seq).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(newest.stats().refused_newest, 2);

        let tiny = store
            .queue("tiny", budget(one / 2, OverflowPolicy::DropOldest))
            .expect("queue");
        assert_eq!(
            tiny.append(&batch(0, 4)).expect("append"),
            Appended::Refused
        );
        assert!(tiny.pending(0, 10).expect("pending").is_empty());
    }

    #[test]
    fn what_the_budget_cost_is_remembered_across_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let one = encode(&batch(0, 4)).expect("encode").len() as u64 + 8;
        {
            let store = UplinkStore::open(dir.path()).expect("open");
            let oldest = store
                .queue("bulk", budget(one, OverflowPolicy::DropOldest))
                .expect("queue");
            for i in 0..3 {
                oldest.append(&batch(i, 4)).expect("append");
            }
            let newest = store
                .queue("history", budget(one, OverflowPolicy::DropNewest))
                .expect("queue");
            for i in 0..3 {
                newest.append(&batch(i, 4)).expect("append");
            }
        }
        let store = UplinkStore::open(dir.path()).expect("reopen");
        let bulk = store
            .queue("bulk", UplinkBudget::default())
            .expect("queue")
            .stats();
        assert_eq!((bulk.dropped_oldest, bulk.refused_newest), (2, 0));
        let history = store
            .queue("history", UplinkBudget::default())
            .expect("queue")
            .stats();
        assert_eq!((history.dropped_oldest, history.refused_newest), (0, 2));
    }

    #[test]
    fn entries_older_than_the_budget_expire_and_are_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = UplinkStore::open(dir.path()).expect("open");
        let queue = store
            .queue(
                "rms",
                UplinkBudget {
                    max_age: Duration::ZERO,
                    ..UplinkBudget::default()
                },
            )
            .expect("queue");
        queue.append(&batch(0, 1)).expect("append");
        queue.append(&batch(1, 1)).expect("append");
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(queue.expire().expect("expire"), 2);
        assert!(queue.pending(0, 10).expect("pending").is_empty());
        assert_eq!(queue.stats().expired, 2);
        assert_eq!(
            queue.append(&batch(2, 1)).expect("append"),
            Appended::Stored { seq: 2 }
        );
    }

    #[test]
    fn asking_twice_for_a_stream_gives_the_same_queue() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = UplinkStore::open(dir.path()).expect("open");
        let first = store.queue("rms", UplinkBudget::default()).expect("queue");
        let second = store.queue("rms", UplinkBudget::default()).expect("queue");
        assert_eq!(
            first.append(&batch(0, 1)).expect("append"),
            Appended::Stored { seq: 0 }
        );
        assert_eq!(
            second.append(&batch(1, 1)).expect("append"),
            Appended::Stored { seq: 1 }
        );
        assert_eq!(first.stats().pending, 2);
    }

    #[test]
    fn bad_stream_names_and_a_store_in_use_are_clear_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = UplinkStore::open(dir.path()).expect("open");
        assert!(store.queue("", UplinkBudget::default()).is_err());
        let Err(error) = UplinkStore::open(dir.path()) else {
            panic!("a second open must fail");
        };
        assert!(
            error.to_string().contains("cannot open the uplink store"),
            "{error}"
        );
    }

    #[test]
    fn a_checkpoint_commits_with_the_results_it_covers_and_can_be_forgotten() {
        let dir = tempfile::tempdir().expect("dir");
        let store = UplinkStore::open(dir.path()).expect("open");
        let spec = StreamSpec {
            name: "rms".into(),
            priority: StreamPriority::Bulk,
            max_bytes: 1 << 20,
            max_age: Duration::from_secs(3600),
            overflow: OverflowPolicy::DropOldest,
            reaggregate: None,
        };
        store.open_stream(&spec).expect("stream");
        assert!(store.load("p").expect("load").is_none());
        let checkpoint = Checkpoint {
            id: 7,
            fingerprint: 42,
            position: Some(vec![1, 2, 3]),
            states: vec![vec![9; 10], Vec::new()],
            committed_at_ms: 1,
        };
        let staged = Staged {
            stream: "rms".into(),
            batches: vec![batch(0, 3), batch(3, 2)],
        };
        store
            .commit("p", &checkpoint, Some(staged))
            .expect("commit");
        let queue = store.queue("rms", UplinkBudget::default()).expect("queue");
        let pending = queue.pending(0, 10).expect("pending");
        assert_eq!(pending.iter().map(first_n).collect::<Vec<_>>(), vec![0, 3]);
        assert_eq!(store.load("p").expect("load"), Some(checkpoint.clone()));
        // After a restart both are still there, and the stream keeps its priority.
        drop((queue, store));
        let store = UplinkStore::open(dir.path()).expect("reopen");
        assert_eq!(store.load("p").expect("load"), Some(checkpoint));
        let streams = store.streams().expect("streams");
        assert_eq!(streams.len(), 1);
        assert_eq!(streams[0].priority(), StreamPriority::Bulk);
        assert_eq!(streams[0].stats().pending, 2);
        store.forget("p").expect("forget");
        assert!(store.load("p").expect("load").is_none());
    }

    #[test]
    fn entries_acknowledged_out_of_order_are_gone_and_the_rest_stay() {
        let dir = tempfile::tempdir().expect("dir");
        let store = UplinkStore::open(dir.path()).expect("open");
        let queue = store.queue("rms", UplinkBudget::default()).expect("queue");
        for i in 0..5 {
            queue.append(&batch(i * 10, 1)).expect("append");
        }
        assert_eq!(queue.ack_ranges(&[(3, 4), (1, 1)]).expect("ack"), 3);
        let left: Vec<u64> = queue
            .pending(0, 10)
            .expect("pending")
            .iter()
            .map(|p| p.seq)
            .collect();
        assert_eq!(left, vec![0, 2]);
        assert_eq!(queue.first_pending(), Some(0));
        assert_eq!(queue.stats().pending, 2);
    }

    /// A small filesystem of its own, so the test can fill it: tmpfs, which needs root (the
    /// test command runs as root on CI machines).
    struct SmallDisk(tempfile::TempDir);

    impl SmallDisk {
        fn mount(bytes: u64) -> Self {
            let dir = tempfile::tempdir().expect("dir");
            let status = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
                .arg(dir.path())
                .status()
                .expect("mount runs");
            assert!(status.success(), "cannot mount a tmpfs (needs root)");
            Self(dir)
        }

        /// Writes a file until the disk is full; returns its path.
        fn fill(&self) -> std::path::PathBuf {
            use std::io::Write as _;
            let path = self.0.path().join("filler");
            let mut file = std::fs::File::create(&path).expect("filler");
            while file.write_all(&[0u8; 1 << 16]).is_ok() {}
            path
        }
    }

    impl Drop for SmallDisk {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg(self.0.path())
                .status();
        }
    }

    #[test]
    fn a_full_disk_is_a_clear_error_loses_nothing_stored_and_heals_when_space_returns() {
        let disk = SmallDisk::mount(24 << 20);
        let dir = disk.0.path().join("uplink");
        let store = UplinkStore::open(&dir).expect("open");
        let queue = store.queue("rms", UplinkBudget::default()).expect("queue");
        for i in 0..3 {
            queue.append(&batch(i * 10, 100)).expect("append");
        }
        let filler = disk.fill();
        // RocksDB preallocates its log: writes go on until that space is used up.
        let mut stored = 3;
        let error = loop {
            match queue.append(&batch(stored * 10, 20_000)) {
                Ok(_) => stored += 1,
                Err(error) => break error.to_string(),
            }
            assert!(stored < 1000, "the disk never filled up");
        };
        assert!(
            error.contains("storing result batches") && error.contains("No space left"),
            "{error}"
        );
        let checkpoint = Checkpoint::default();
        // What was stored before is still readable.
        assert_eq!(queue.stats().pending, stored as u64);

        std::fs::remove_file(filler).expect("free space");
        let deadline = Instant::now() + Duration::from_secs(10);
        let appended = loop {
            match queue.append(&batch(stored * 10, 100)) {
                Ok(appended) => break appended,
                Err(error) => {
                    assert!(Instant::now() < deadline, "no recovery: {error}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        };
        assert_eq!(appended, Appended::Stored { seq: stored as u64 });
        store.commit("p", &checkpoint, None).expect("commit");
        drop((queue, store));
        let store = UplinkStore::open(&dir).expect("reopen");
        let queue = store.queue("rms", UplinkBudget::default()).expect("queue");
        let pending = queue.pending(0, 2000).expect("pending");
        assert_eq!(
            pending.iter().map(first_n).collect::<Vec<_>>(),
            (0..=stored).map(|i| i * 10).collect::<Vec<_>>()
        );
        assert_eq!(store.load("p").expect("load"), Some(checkpoint));
    }

    use arrow::array::AsArray;

    /// One second of RMS windows for `sensors` sensors, 100 samples each.
    fn second(at: i64, sensors: usize) -> RecordBatch {
        use arrow::array::{StringArray, TimestampNanosecondArray};
        let schema = Arc::new(Schema::new(vec![
            Field::new("sensor", DataType::Utf8, false),
            Field::new(
                "window_start",
                DataType::Timestamp(arrow::datatypes::TimeUnit::Nanosecond, None),
                false,
            ),
            Field::new("rms", DataType::Float64, true),
            Field::new("samples", DataType::Int64, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(
                    (0..sensors).map(|s| format!("s{s}")).collect::<Vec<_>>(),
                )),
                Arc::new(TimestampNanosecondArray::from(vec![
                    at * 1_000_000_000;
                    sensors
                ])),
                Arc::new(Float64Array::from(
                    (0..sensors)
                        .map(|s| (at + s as i64) as f64 * 0.01)
                        .collect::<Vec<_>>(),
                )),
                Arc::new(Int64Array::from(vec![100; sensors])),
            ],
        )
        .expect("batch")
    }

    #[test]
    fn a_full_budget_re_aggregates_the_oldest_seconds_into_minutes_that_sum_correctly() {
        let dir = tempfile::tempdir().expect("dir");
        let store = UplinkStore::open(dir.path()).expect("open");
        let one = encode(&second(0, 4)).expect("encode").len() as u64 + 8;
        let spec = StreamSpec {
            name: "rms".into(),
            priority: StreamPriority::Bulk,
            max_bytes: 40 * one,
            max_age: Duration::from_secs(3600),
            overflow: OverflowPolicy::Reaggregate,
            reaggregate: Some(
                Reaggregate::parse(Duration::from_secs(60), "rms:rms(samples), samples:sum")
                    .expect("spec"),
            ),
        };
        let queue = store.open_stream(&spec).expect("stream");
        // Five minutes of seconds: far beyond a budget of 40.
        for at in 0..300 {
            queue.append(&second(at, 4)).expect("append");
        }
        let stats = queue.stats();
        assert!(stats.merged > 0, "{stats:?}");
        assert!(stats.pending_bytes <= 40 * one, "{stats:?}");
        // Every sample is still accounted for, merged or not, in windows that do not overlap
        // and an RMS that is the RMS of what they cover, unless the oldest were dropped when
        // all was coarse already.
        let mut samples: std::collections::BTreeMap<(String, i64), (i64, f64)> = Default::default();
        for pending in queue.pending(0, 1000).expect("pending") {
            for batch in pending.batches().expect("decode") {
                let sensors = batch.column(0).as_string::<i32>();
                let starts = batch
                    .column(1)
                    .as_primitive::<arrow::datatypes::TimestampNanosecondType>();
                let rms = batch
                    .column(2)
                    .as_primitive::<arrow::datatypes::Float64Type>();
                let n = batch
                    .column(3)
                    .as_primitive::<arrow::datatypes::Int64Type>();
                for row in 0..batch.num_rows() {
                    let minute = starts.value(row) / 60_000_000_000;
                    let entry = samples
                        .entry((sensors.value(row).to_owned(), minute))
                        .or_default();
                    entry.0 += n.value(row);
                    entry.1 += rms.value(row).powi(2) * n.value(row) as f64;
                }
            }
        }
        let dropped = stats.dropped_oldest;
        for ((sensor, minute), (n, squares)) in &samples {
            let s: i64 = sensor[1..].parse().expect("sensor");
            let seconds = (minute * 60..minute * 60 + 60).filter(|at| *at < 300);
            let expected_n = seconds.clone().count() as i64 * 100;
            if dropped == 0 || *minute > 0 {
                assert_eq!(*n, expected_n, "{sensor} minute {minute}");
                let expected: f64 = seconds
                    .map(|at| ((at + s) as f64 * 0.01).powi(2) * 100.0)
                    .sum();
                assert!(
                    (squares - expected).abs() < 1e-6 * expected,
                    "{sensor} minute {minute}"
                );
            }
        }
        // The counts survive a restart.
        drop((queue, store));
        let store = UplinkStore::open(dir.path()).expect("reopen");
        let streams = store.streams().expect("streams");
        assert_eq!(streams[0].stats().merged, stats.merged);
    }

    #[test]
    fn batches_the_cloud_may_hold_are_not_re_aggregated_until_it_says() {
        let dir = tempfile::tempdir().expect("dir");
        let one = encode(&second(0, 4)).expect("encode").len() as u64 + 8;
        let spec = StreamSpec {
            name: "rms".into(),
            priority: StreamPriority::Bulk,
            max_bytes: 20 * one,
            max_age: Duration::from_secs(3600),
            overflow: OverflowPolicy::Reaggregate,
            reaggregate: Some(
                Reaggregate::parse(Duration::from_secs(60), "rms:rms(samples), samples:sum")
                    .expect("spec"),
            ),
        };
        // The seconds appended, by their sequence number; merged entries get new ones.
        let seconds = std::cell::RefCell::new(std::collections::BTreeSet::new());
        let append = |queue: &UplinkQueue, at: i64| {
            if let Appended::Stored { seq } = queue.append(&second(at, 4)).expect("append") {
                seconds.borrow_mut().insert(seq);
            }
        };
        // The seconds still queued as they were appended.
        let fine = |queue: &UplinkQueue| -> Vec<u64> {
            let pending = queue.pending(0, 1000).expect("pending");
            pending
                .iter()
                .map(|p| p.seq)
                .filter(|seq| seconds.borrow().contains(seq))
                .collect()
        };
        {
            let store = UplinkStore::open(dir.path()).expect("open");
            let queue = store.open_stream(&spec).expect("stream");
            for at in 0..4 {
                append(&queue, at);
            }
            // Sent, then the WAN broke before the answer: the cloud may have stored them.
            queue.sent(0);
            queue.sent(1);
            for at in 4..30 {
                append(&queue, at);
            }
            assert!(queue.stats().merged > 0);
            let kept = fine(&queue);
            assert!(kept.starts_with(&[0, 1]), "{kept:?}");
            assert!(!kept.contains(&2), "unsent seconds merge: {kept:?}");
        }
        // After a restart, what was queued before may have been sent by the old process.
        let store = UplinkStore::open(dir.path()).expect("reopen");
        let queue = store.open_stream(&spec).expect("stream");
        let before = fine(&queue);
        for at in 30..60 {
            append(&queue, at);
        }
        let after = fine(&queue);
        assert_eq!(
            queue.stats().dropped_oldest,
            0,
            "merging the new seconds made room"
        );
        assert!(
            before.iter().all(|seq| after.contains(seq)),
            "{before:?} {after:?}"
        );
        // The cloud answered: now everything still queued may merge.
        queue.settle();
        for at in 60..90 {
            append(&queue, at);
        }
        let settled = fine(&queue);
        assert!(!settled.contains(&0), "{settled:?}");
    }
}
