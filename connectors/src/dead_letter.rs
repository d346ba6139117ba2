//! The dead-letter queue: where malformed input goes instead of failing a pipeline.
//!
//! A source that cannot decode a record pushes it here with a short, stable reason
//! (`invalid json`, `missing field 'ts'`) and moves on. The queue counts letters per reason for
//! metrics, keeps the most recent ones for inspection in the console, and can append every
//! letter to a JSON-lines file for offline forensics.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::Serialize;

use crate::error::{ConnectorError, Result};

/// Payloads are cut to this many bytes: enough to see what went wrong, bounded in memory.
pub const MAX_PAYLOAD_BYTES: usize = 4096;

/// How many recent letters a queue keeps unless told otherwise.
pub const DEFAULT_CAPACITY: usize = 1000;

/// One rejected record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Which source rejected it, e.g. `file:/data/vibration.jsonl`.
    pub source: String,
    /// Why, as a short stable string suitable for counting.
    pub reason: String,
    /// The raw record, truncated to [`MAX_PAYLOAD_BYTES`].
    pub payload: Vec<u8>,
}

/// A shared handle to a dead-letter queue; clones push into the same queue.
///
/// Thread-safe. Its lock is held only for the few instructions of a push or a read, never
/// across an `.await`.
#[derive(Debug, Clone)]
pub struct DeadLetterQueue {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    capacity: usize,
    total: AtomicU64,
    write_failures: AtomicU64,
    state: Mutex<State>,
    file: Option<Mutex<BufWriter<File>>>,
}

#[derive(Debug, Default)]
struct State {
    counts: HashMap<String, u64>,
    recent: VecDeque<DeadLetter>,
}

/// The JSON-lines form of a letter in the dead-letter file.
#[derive(Serialize)]
struct DeadLetterLine<'a> {
    source: &'a str,
    reason: &'a str,
    payload: &'a str,
}

impl Default for DeadLetterQueue {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

impl DeadLetterQueue {
    /// A queue that keeps the `capacity` most recent letters in memory.
    pub fn new(capacity: usize) -> Self {
        Self::with_file(capacity, None)
    }

    /// A queue that also appends every letter as one JSON line to the file at `path`
    /// (created if missing).
    pub fn to_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| ConnectorError::io("opening dead-letter file", path, e))?;
        Ok(Self::with_file(DEFAULT_CAPACITY, Some(file)))
    }

    fn with_file(capacity: usize, file: Option<File>) -> Self {
        Self {
            inner: Arc::new(Inner {
                capacity,
                total: AtomicU64::new(0),
                write_failures: AtomicU64::new(0),
                state: Mutex::new(State::default()),
                file: file.map(|f| Mutex::new(BufWriter::new(f))),
            }),
        }
    }

    /// Records a rejected `payload` from `source` for `reason`.
    ///
    /// Never fails: a dead-letter file that cannot be written is counted in
    /// [`Self::write_failures`], because losing forensics must not stop the data.
    pub fn push(&self, source: &str, reason: &str, payload: &[u8]) {
        let payload = &payload[..payload.len().min(MAX_PAYLOAD_BYTES)];
        self.inner.total.fetch_add(1, Ordering::Relaxed);
        {
            let mut state = lock(&self.inner.state);
            match state.counts.get_mut(reason) {
                Some(count) => *count += 1,
                None => {
                    state.counts.insert(reason.to_owned(), 1);
                }
            }
            if self.inner.capacity > 0 {
                let letter = if state.recent.len() >= self.inner.capacity {
                    // Reuse the evicted letter's buffers.
                    let mut old = state.recent.pop_front().unwrap_or_else(empty_letter);
                    old.source.clear();
                    old.source.push_str(source);
                    old.reason.clear();
                    old.reason.push_str(reason);
                    old.payload.clear();
                    old.payload.extend_from_slice(payload);
                    old
                } else {
                    DeadLetter {
                        source: source.to_owned(),
                        reason: reason.to_owned(),
                        payload: payload.to_vec(),
                    }
                };
                state.recent.push_back(letter);
            }
        }
        if let Some(file) = &self.inner.file {
            let line = DeadLetterLine {
                source,
                reason,
                payload: &String::from_utf8_lossy(payload),
            };
            let mut writer = lock(file);
            let written = serde_json::to_writer(&mut *writer, &line)
                .map_err(std::io::Error::from)
                .and_then(|()| writer.write_all(b"\n"))
                // Flushed per letter so the file can be tailed while the pipeline runs; dead
                // letters are rare enough for the extra write call not to matter.
                .and_then(|()| writer.flush());
            if written.is_err() {
                self.inner.write_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Total letters pushed since the queue was created.
    pub fn count(&self) -> u64 {
        self.inner.total.load(Ordering::Relaxed)
    }

    /// Letters per reason, most frequent first (ties by reason, for stable output).
    pub fn counts_by_reason(&self) -> Vec<(String, u64)> {
        let mut counts: Vec<(String, u64)> = lock(&self.inner.state)
            .counts
            .iter()
            .map(|(reason, count)| (reason.clone(), *count))
            .collect();
        counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        counts
    }

    /// The most recent letters, oldest first.
    pub fn recent(&self) -> Vec<DeadLetter> {
        lock(&self.inner.state).recent.iter().cloned().collect()
    }

    /// How many letters could not be appended to the dead-letter file.
    pub fn write_failures(&self) -> u64 {
        self.inner.write_failures.load(Ordering::Relaxed)
    }
}

fn empty_letter() -> DeadLetter {
    DeadLetter {
        source: String::new(),
        reason: String::new(),
        payload: Vec::new(),
    }
}

/// Locks `mutex`, recovering from poisoning: the guarded data is counters and copies that stay
/// consistent even if a holder panicked.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_reason_and_keeps_only_the_most_recent() {
        let dlq = DeadLetterQueue::new(2);
        dlq.push("test", "invalid json", b"{");
        dlq.push("test", "missing field 'ts'", b"{}");
        dlq.push("test", "invalid json", b"[");
        assert_eq!(dlq.count(), 3);
        assert_eq!(
            dlq.counts_by_reason(),
            vec![
                ("invalid json".to_owned(), 2),
                ("missing field 'ts'".to_owned(), 1)
            ]
        );
        let recent: Vec<Vec<u8>> = dlq.recent().into_iter().map(|l| l.payload).collect();
        assert_eq!(recent, vec![b"{}".to_vec(), b"[".to_vec()]);
    }

    #[test]
    fn clones_share_one_queue_and_payloads_are_truncated() {
        let dlq = DeadLetterQueue::default();
        let clone = dlq.clone();
        clone.push("test", "too big", &vec![b'x'; 10_000]);
        assert_eq!(dlq.count(), 1);
        assert_eq!(dlq.recent()[0].payload.len(), MAX_PAYLOAD_BYTES);
    }

    #[test]
    fn file_gets_one_json_line_per_letter() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("dead.jsonl");
        let dlq = DeadLetterQueue::to_file(&path).expect("open");
        dlq.push("file:a.jsonl", "invalid json", b"{\"v\":");
        dlq.push("file:a.jsonl", "invalid utf-8", b"\xff");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(
            text,
            "{\"source\":\"file:a.jsonl\",\"reason\":\"invalid json\",\"payload\":\"{\\\"v\\\":\"}\n\
             {\"source\":\"file:a.jsonl\",\"reason\":\"invalid utf-8\",\"payload\":\"\u{fffd}\"}\n"
        );
        assert_eq!(dlq.write_failures(), 0);
    }
}
