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
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arrow::array::RecordBatch;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use rocksdb::{DB, Direction, IteratorMode, Options, WriteBatch, WriteOptions};
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

/// What to do when a stream's budget is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverflowPolicy {
    /// Delete the oldest entries until the new one fits: recent data matters most.
    #[default]
    DropOldest,
    /// Refuse the new entry: the history already queued matters most.
    DropNewest,
}

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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct UplinkStats {
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
}

/// The on-disk store of every stream's queue.
#[derive(Clone)]
pub struct UplinkStore {
    db: Arc<DB>,
    /// One queue per stream, whoever asks: two would hand out the same sequence numbers.
    queues: Arc<Mutex<HashMap<String, Arc<UplinkQueue>>>>,
}

impl UplinkStore {
    /// Opens (or creates) the store in `dir`; fails if another process holds it.
    pub fn open(dir: &Path) -> Result<Self> {
        let mut options = Options::default();
        options.create_if_missing(true);
        options.set_write_buffer_size(8 << 20);
        options.set_max_open_files(128);
        let db = DB::open(&options, dir).map_err(|error| {
            EngineError::Storage(format!(
                "cannot open the uplink store in {}: {error}",
                dir.display()
            ))
        })?;
        Ok(Self {
            db: Arc::new(db),
            queues: Arc::default(),
        })
    }

    /// The queue of `stream`, with what an earlier run left in it. Asking again returns the
    /// same queue; `budget` applies when the queue is first opened.
    pub fn queue(&self, stream: &str, budget: UplinkBudget) -> Result<Arc<UplinkQueue>> {
        let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(queue) = queues.get(stream) {
            return Ok(Arc::clone(queue));
        }
        let queue = Arc::new(UplinkQueue::open(Arc::clone(&self.db), stream, budget)?);
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
}

struct Index {
    next_seq: u64,
    /// (seq, bytes, enqueued_at_ms) of every pending entry, oldest first.
    entries: VecDeque<(u64, u64, u64)>,
    bytes: u64,
}

/// One stream's queue; see the module docs.
pub struct UplinkQueue {
    db: Arc<DB>,
    stream: String,
    budget: UplinkBudget,
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

fn storage(what: &str, stream: &str) -> impl FnOnce(rocksdb::Error) -> EngineError {
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
    fn open(db: Arc<DB>, stream: &str, budget: UplinkBudget) -> Result<Self> {
        if stream.is_empty() || stream.contains('\0') {
            return Err(EngineError::Plan(format!(
                "uplink stream name '{stream}' must be non-empty text"
            )));
        }
        let mut entries = VecDeque::new();
        let mut bytes = 0;
        let first = key(stream, ENTRY, 0);
        for item in db.iterator(IteratorMode::From(&first, Direction::Forward)) {
            let (k, v) = item.map_err(storage("reading the queue", stream))?;
            if !k.starts_with(&first[..first.len() - 8]) {
                break;
            }
            let seq = u64::from_be_bytes(k[k.len() - 8..].try_into().unwrap_or([0; 8]));
            let enqueued = v
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_be_bytes);
            entries.push_back((seq, v.len() as u64, enqueued));
            bytes += v.len() as u64;
        }
        let stored_next = db
            .get(key(stream, NEXT_SEQ, 0))
            .map_err(storage("reading the next sequence number", stream))?
            .and_then(|v| v.as_slice().try_into().ok())
            .map_or(0, u64::from_be_bytes);
        let next_seq = stored_next.max(entries.back().map_or(0, |(seq, _, _)| seq + 1));
        let losses = db
            .get(key(stream, LOSSES, 0))
            .map_err(storage("reading the loss counters", stream))?
            .filter(|v| v.len() == 24)
            .map_or([0u64; 3], |v| {
                let word = |i: usize| v[i * 8..i * 8 + 8].try_into().map_or(0, u64::from_be_bytes);
                [word(0), word(1), word(2)]
            });
        let counters = Counters::default();
        counters.dropped_oldest.store(losses[0], Ordering::Relaxed);
        counters.refused_newest.store(losses[1], Ordering::Relaxed);
        counters.expired.store(losses[2], Ordering::Relaxed);
        Ok(Self {
            db,
            stream: stream.to_owned(),
            budget,
            index: Mutex::new(Index {
                next_seq,
                entries,
                bytes,
            }),
            counters,
        })
    }

    /// The loss counters as they will be once `dropped`, `refused` and `expired` more are
    /// counted: the value of the LOSSES key.
    fn losses_after(&self, dropped: u64, refused: u64, expired: u64) -> Vec<u8> {
        let c = &self.counters;
        [
            c.dropped_oldest.load(Ordering::Relaxed) + dropped,
            c.refused_newest.load(Ordering::Relaxed) + refused,
            c.expired.load(Ordering::Relaxed) + expired,
        ]
        .iter()
        .flat_map(|n| n.to_be_bytes())
        .collect()
    }

    /// Counts a refused batch, on disk as well so a restart does not forget it.
    fn refuse(&self) -> Result<Appended> {
        let mut writes = WriteBatch::default();
        writes.put(key(&self.stream, LOSSES, 0), self.losses_after(0, 1, 0));
        // The count must not be lost with the batch; if even that cannot be written, say so.
        self.write(writes, "counting a refused batch")?;
        self.counters.refused_newest.fetch_add(1, Ordering::Relaxed);
        Ok(Appended::Refused)
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self, batch: WriteBatch, what: &str) -> Result<()> {
        let mut options = WriteOptions::default();
        options.set_sync(true);
        self.db
            .write_opt(batch, &options)
            .map_err(storage(what, &self.stream))
    }

    /// Stores `batch` under the next sequence number, making room by the budget's policy.
    pub fn append(&self, batch: &RecordBatch) -> Result<Appended> {
        let ipc = encode(batch)?;
        let enqueued = now_ms();
        let mut value = Vec::with_capacity(ipc.len() + 8);
        value.extend_from_slice(&enqueued.to_be_bytes());
        value.extend_from_slice(&ipc);
        let size = value.len() as u64;
        let mut index = self.lock();
        let mut evict = 0;
        let mut freed = 0;
        while index.bytes - freed + size > self.budget.max_bytes && evict < index.entries.len() {
            if self.budget.policy == OverflowPolicy::DropNewest {
                return self.refuse();
            }
            freed += index.entries[evict].1;
            evict += 1;
        }
        if size > self.budget.max_bytes {
            // Larger than the whole budget: nothing can make room for it.
            return self.refuse();
        }
        let seq = index.next_seq;
        let mut writes = WriteBatch::default();
        for &(old, _, _) in index.entries.iter().take(evict) {
            writes.delete(key(&self.stream, ENTRY, old));
        }
        writes.put(key(&self.stream, ENTRY, seq), &value);
        writes.put(key(&self.stream, NEXT_SEQ, 0), (seq + 1).to_be_bytes());
        if evict > 0 {
            writes.put(
                key(&self.stream, LOSSES, 0),
                self.losses_after(evict as u64, 0, 0),
            );
        }
        self.write(writes, "storing a result batch")?;
        index.entries.drain(..evict);
        index.bytes = index.bytes - freed + size;
        index.entries.push_back((seq, size, enqueued));
        index.next_seq = seq + 1;
        self.counters.appended.fetch_add(1, Ordering::Relaxed);
        self.counters
            .dropped_oldest
            .fetch_add(evict as u64, Ordering::Relaxed);
        Ok(Appended::Stored { seq })
    }

    /// Up to `max` pending entries from `from_seq` on, in order.
    pub fn pending(&self, from_seq: u64, max: usize) -> Result<Vec<Pending>> {
        let start = key(&self.stream, ENTRY, from_seq);
        let prefix = &start[..start.len() - 8];
        let mut out = Vec::new();
        for item in self
            .db
            .iterator(IteratorMode::From(&start, Direction::Forward))
        {
            if out.len() >= max {
                break;
            }
            let (k, v) = item.map_err(storage("reading the queue", &self.stream))?;
            if !k.starts_with(prefix) {
                break;
            }
            let seq = u64::from_be_bytes(k[k.len() - 8..].try_into().unwrap_or([0; 8]));
            let (stamp, payload) = v.split_at(v.len().min(8));
            out.push(Pending {
                seq,
                enqueued_at_ms: stamp.try_into().map_or(0, u64::from_be_bytes),
                payload: payload.to_vec(),
            });
        }
        Ok(out)
    }

    /// Deletes every entry up to and including `through_seq`: the cloud has stored them.
    /// Returns how many were deleted.
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
        index.bytes -= freed;
        self.counters
            .acknowledged
            .fetch_add(done as u64, Ordering::Relaxed);
        Ok(done)
    }

    /// Drops entries older than the budget's age, counting them; returns how many.
    pub fn expire(&self) -> Result<usize> {
        let cutoff = now_ms().saturating_sub(self.budget.max_age.as_millis() as u64);
        let mut index = self.lock();
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

    pub fn stats(&self) -> UplinkStats {
        let index = self.lock();
        let c = &self.counters;
        UplinkStats {
            pending: index.entries.len() as u64,
            pending_bytes: index.bytes,
            oldest_pending_ms: index.entries.front().map(|(_, _, at)| *at),
            next_seq: index.next_seq,
            appended: c.appended.load(Ordering::Relaxed),
            acknowledged: c.acknowledged.load(Ordering::Relaxed),
            dropped_oldest: c.dropped_oldest.load(Ordering::Relaxed),
            refused_newest: c.refused_newest.load(Ordering::Relaxed),
            expired: c.expired.load(Ordering::Relaxed),
        }
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
}
