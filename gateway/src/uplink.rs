//! The gateway's side of the store-and-forward uplink: the queue on disk and its sender.
//!
//! ```text
//!  cloud sinks ──append──> UplinkStore (<data_dir>/uplink, RocksDB)
//!                                │
//!  sender (one per cloud session)│  Uplink stream on the gateway's gRPC connection
//!    open: what do I hold? ──────┼──> cloud: what of it is stored already → deleted here
//!    live batches   (unpaced) ───┼──> cloud stores (gateway, stream, seq) once
//!    backlog batches (paced) ────┘    cloud: stored 41..=57  → deleted here
//! ```
//!
//! Batches appended after the session opened are *live* and go at once, highest priority
//! stream first. What was queued before (the backlog of an outage) drains in order behind
//! them, at most `drain_rate` bytes per second, alert streams before bulk ones, so a long
//! backlog never delays current results. A batch is deleted only when the cloud says it is
//! stored; one sent but not acknowledged when the stream breaks is sent again on the next,
//! and the cloud drops the duplicate.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use weir_connectors::cloud::{StreamSpec, UplinkAppender, UplinkWriter};
use weir_connectors::{ConnectorError, Result as ConnectorResult};
use weir_engine::uplink::{UplinkQueue, UplinkStore};
use weir_proto::cloud::gateway_control_client::GatewayControlClient;
use weir_proto::cloud::{
    ResultBatch, SeqRanges, StreamHolding, StreamStatus, UplinkMessage, UplinkOpen, uplink_message,
    uplink_reply,
};

/// The uplink store, opened on first use: a gateway without cloud sinks and without a cloud
/// never creates it.
pub struct Uplink {
    dir: PathBuf,
    store: Mutex<Option<UplinkStore>>,
}

impl Uplink {
    pub fn new(dir: PathBuf) -> Arc<Self> {
        Arc::new(Self {
            dir,
            store: Mutex::default(),
        })
    }

    /// The store, opening it if this is the first call.
    pub fn store(&self) -> weir_engine::Result<UplinkStore> {
        let mut store = self.store.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(store) = store.as_ref() {
            return Ok(store.clone());
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| {
            weir_engine::EngineError::Storage(format!(
                "cannot create the uplink directory {}: {e}",
                self.dir.display()
            ))
        })?;
        let opened = UplinkStore::open(&self.dir)?;
        *store = Some(opened.clone());
        Ok(opened)
    }

    /// Every stream's status for the cloud; empty if the store was never opened.
    pub fn status(&self) -> Vec<StreamStatus> {
        let store = self
            .store
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(store) = store else {
            return Vec::new();
        };
        let now = now_ms();
        match store.streams() {
            Ok(queues) => queues
                .iter()
                .map(|queue| {
                    let stats = queue.stats();
                    StreamStatus {
                        stream: queue.name().to_owned(),
                        priority: priority_name(stats.priority).to_owned(),
                        pending: stats.pending,
                        pending_bytes: stats.pending_bytes,
                        oldest_pending_age_ms: stats
                            .oldest_pending_ms
                            .map_or(0, |at| now.saturating_sub(at)),
                        next_seq: stats.next_seq,
                        dropped_oldest: stats.dropped_oldest,
                        refused_newest: stats.refused_newest,
                        expired: stats.expired,
                        merged: stats.merged,
                    }
                })
                .collect(),
            Err(error) => {
                tracing::warn!(%error, "cannot list uplink streams");
                Vec::new()
            }
        }
    }
}

fn priority_name(priority: weir_engine::uplink::StreamPriority) -> &'static str {
    use weir_engine::uplink::StreamPriority;
    match priority {
        StreamPriority::Alert => "alert",
        StreamPriority::Normal => "normal",
        StreamPriority::Bulk => "bulk",
    }
}

impl UplinkWriter for Uplink {
    fn open(&self, stream: &StreamSpec) -> ConnectorResult<Box<dyn UplinkAppender>> {
        let store = self
            .store()
            .map_err(|e| ConnectorError::Storage(e.to_string()))?;
        UplinkWriter::open(&store, stream)
    }
}

/// How the sender paces itself.
#[derive(Debug, Clone, Copy)]
pub struct SenderOptions {
    /// Backlog bytes per second; live batches are not paced.
    pub drain_rate: u64,
    /// Bytes sent and not yet acknowledged before the sender waits for the cloud.
    pub window: u64,
}

impl Default for SenderOptions {
    fn default() -> Self {
        Self {
            drain_rate: 4 << 20,
            window: 8 << 20,
        }
    }
}

/// Where the sender is in one stream.
struct Cursor {
    queue: Arc<UplinkQueue>,
    /// Entries from here on were appended during this session: live.
    live_from: u64,
    /// Next live entry to send.
    live_next: u64,
    /// Next backlog entry to send (below `live_from`).
    backlog_next: u64,
}

/// A batch sent and not yet acknowledged.
type InFlight = HashMap<(String, u64), u64>;

/// Streams the store's queues to the cloud until the stream breaks or `stop`; see the module
/// docs. Returns why it ended.
pub async fn run_sender(
    channel: Channel,
    bearer: MetadataValue<tonic::metadata::Ascii>,
    store: UplinkStore,
    options: SenderOptions,
    stop: CancellationToken,
) -> Result<(), String> {
    let appended = store.appended();
    let queues = store.streams().map_err(|e| e.to_string())?;
    let holdings = queues
        .iter()
        .map(|queue| {
            let stats = queue.stats();
            StreamHolding {
                stream: queue.name().to_owned(),
                first_pending: queue.first_pending().unwrap_or(stats.next_seq),
                next_seq: stats.next_seq,
            }
        })
        .collect();
    let (outbound, receiver) = mpsc::channel::<UplinkMessage>(32);
    let _ = outbound
        .send(UplinkMessage {
            kind: Some(uplink_message::Kind::Open(UplinkOpen { streams: holdings })),
        })
        .await;
    let mut request = tonic::Request::new(ReceiverStream::new(receiver));
    request.metadata_mut().insert("authorization", bearer);
    let mut client = GatewayControlClient::new(channel);
    let mut inbound = client
        .uplink(request)
        .await
        .map_err(|status| format!("uplink refused: {}", status.message()))?
        .into_inner();
    let first = inbound
        .message()
        .await
        .map_err(|status| format!("uplink: {}", status.message()))?;
    let Some(uplink_reply::Kind::Resume(stored)) = first.and_then(|m| m.kind) else {
        return Err("uplink: the cloud did not say what it has stored".into());
    };
    acknowledge(&queues, &stored);
    // Whatever of the queues the cloud did not name, it does not have.
    for queue in &queues {
        queue.settle();
    }

    let mut cursors: BTreeMap<String, Cursor> = BTreeMap::new();
    for queue in queues {
        add_cursor(&mut cursors, queue, true);
    }
    let mut in_flight = InFlight::new();
    let mut rejected: HashSet<(String, u64)> = HashSet::new();
    let mut pacer = Pacer::new(options.drain_rate);
    let mut rescan = tokio::time::interval(Duration::from_secs(1));
    loop {
        let wait = fill(
            &mut cursors,
            &mut in_flight,
            &rejected,
            &mut pacer,
            &options,
            &outbound,
        )
        .await?;
        let pace = tokio::time::sleep(wait.unwrap_or(Duration::from_secs(3600)));
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            reply = inbound.message() => {
                let reply = reply.map_err(|status| format!("uplink: {}", status.message()))?;
                let Some(reply) = reply else {
                    return Err("uplink: the cloud closed the stream".into());
                };
                match reply.kind {
                    Some(uplink_reply::Kind::Stored(stored)) => {
                        let queues: Vec<_> = cursors.values().map(|c| Arc::clone(&c.queue)).collect();
                        acknowledge(&queues, &stored);
                        for stream in &stored.streams {
                            in_flight.retain(|(name, seq), _| {
                                name != &stream.stream
                                    || !stream.ranges.iter().any(|r| (r.first..=r.last).contains(seq))
                            });
                        }
                    }
                    Some(uplink_reply::Kind::Rejected(refusal)) => {
                        tracing::error!(stream = %refusal.stream, seq = refusal.seq, reason = %refusal.reason,
                            "the cloud cannot store a result batch; it stays queued");
                        in_flight.remove(&(refusal.stream.clone(), refusal.seq));
                        rejected.insert((refusal.stream, refusal.seq));
                    }
                    Some(uplink_reply::Kind::Resume(_)) | None => {}
                }
            }
            _ = appended.notified() => {}
            _ = pace, if wait.is_some() => {}
            _ = rescan.tick() => {
                // Streams created after the session opened: everything in them is live.
                if let Ok(queues) = store.streams() {
                    for queue in queues {
                        if !cursors.contains_key(queue.name()) {
                            add_cursor(&mut cursors, queue, false);
                        }
                    }
                }
            }
        }
    }
}

fn add_cursor(cursors: &mut BTreeMap<String, Cursor>, queue: Arc<UplinkQueue>, backlog: bool) {
    let next = queue.stats().next_seq;
    let live_from = if backlog { next } else { 0 };
    cursors.insert(
        queue.name().to_owned(),
        Cursor {
            queue,
            live_from,
            live_next: live_from,
            backlog_next: 0,
        },
    );
}

/// Deletes what the cloud says it has stored.
fn acknowledge(queues: &[Arc<UplinkQueue>], stored: &SeqRanges) {
    for stream in &stored.streams {
        let Some(queue) = queues.iter().find(|q| q.name() == stream.stream) else {
            continue;
        };
        let ranges: Vec<(u64, u64)> = stream.ranges.iter().map(|r| (r.first, r.last)).collect();
        if let Err(error) = queue.ack_ranges(&ranges) {
            // The entries stay and are sent again; the cloud drops the duplicates.
            tracing::warn!(stream = %stream.stream, %error, "cannot delete stored batches");
        }
    }
}

/// Sends what the window and the pacer allow. Returns how long until the pacer lets the
/// backlog go on, if it is what holds the sender back.
async fn fill(
    cursors: &mut BTreeMap<String, Cursor>,
    in_flight: &mut InFlight,
    rejected: &HashSet<(String, u64)>,
    pacer: &mut Pacer,
    options: &SenderOptions,
    outbound: &mpsc::Sender<UplinkMessage>,
) -> Result<Option<Duration>, String> {
    let mut order: Vec<&String> = cursors.keys().collect();
    order.sort_by_key(|name| std::cmp::Reverse(cursors[*name].queue.priority()));
    let order: Vec<String> = order.into_iter().cloned().collect();
    loop {
        let used: u64 = in_flight.values().sum();
        if used >= options.window {
            return Ok(None);
        }
        let mut sent = false;
        // Live first, by priority.
        for name in &order {
            let cursor = cursors.get_mut(name).ok_or("stream vanished")?;
            if let Some(batch) = next_entry(cursor, cursor.live_next, u64::MAX, rejected)? {
                cursor.live_next = batch.seq + 1;
                cursor.queue.sent(batch.seq);
                send_batch(outbound, in_flight, batch).await?;
                sent = true;
                break;
            }
        }
        if sent {
            continue;
        }
        // Then the backlog, oldest first within a stream, paced.
        if let Some(wait) = pacer.wait() {
            let any_backlog = order.iter().any(|name| {
                let c = &cursors[name];
                c.backlog_next < c.live_from
                    && c.queue.first_pending().is_some_and(|s| s < c.live_from)
            });
            return Ok(any_backlog.then_some(wait));
        }
        for name in &order {
            let cursor = cursors.get_mut(name).ok_or("stream vanished")?;
            if cursor.backlog_next >= cursor.live_from {
                continue;
            }
            if let Some(batch) =
                next_entry(cursor, cursor.backlog_next, cursor.live_from, rejected)?
            {
                cursor.backlog_next = batch.seq + 1;
                pacer.spend(batch.arrow_ipc.len() as u64);
                cursor.queue.sent(batch.seq);
                send_batch(outbound, in_flight, batch).await?;
                sent = true;
                break;
            }
            cursor.backlog_next = cursor.live_from;
        }
        if !sent {
            return Ok(None);
        }
    }
}

/// The first entry of `cursor`'s queue in `from..below` that is neither rejected nor skipped.
fn next_entry(
    cursor: &Cursor,
    from: u64,
    below: u64,
    rejected: &HashSet<(String, u64)>,
) -> Result<Option<ResultBatch>, String> {
    let name = cursor.queue.name();
    let mut from = from;
    loop {
        let page = cursor.queue.pending(from, 8).map_err(|e| e.to_string())?;
        let full = page.len() == 8;
        for pending in page {
            if pending.seq >= below {
                return Ok(None);
            }
            from = pending.seq + 1;
            if rejected.contains(&(name.to_owned(), pending.seq)) {
                continue;
            }
            return Ok(Some(ResultBatch {
                stream: name.to_owned(),
                seq: pending.seq,
                arrow_ipc: pending.payload,
                enqueued_at_ms: pending.enqueued_at_ms,
            }));
        }
        // A page of batches the cloud refused: look past them.
        if !full {
            return Ok(None);
        }
    }
}

async fn send_batch(
    outbound: &mpsc::Sender<UplinkMessage>,
    in_flight: &mut InFlight,
    batch: ResultBatch,
) -> Result<(), String> {
    in_flight.insert(
        (batch.stream.clone(), batch.seq),
        batch.arrow_ipc.len() as u64,
    );
    outbound
        .send(UplinkMessage {
            kind: Some(uplink_message::Kind::Batch(batch)),
        })
        .await
        .map_err(|_| "uplink: the stream closed".to_owned())
}

/// A token bucket over backlog bytes: up to one second of burst.
struct Pacer {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Pacer {
    fn new(rate: u64) -> Self {
        Self {
            rate: rate.max(1) as f64,
            tokens: rate.max(1) as f64,
            at: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.rate);
        self.at = now;
    }

    /// `None` when a batch may go now, else how long until one may.
    fn wait(&mut self) -> Option<Duration> {
        self.refill();
        (self.tokens <= 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate + 0.001))
    }

    fn spend(&mut self, bytes: u64) {
        self.tokens -= bytes as f64;
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pacer_allows_a_second_of_burst_then_waits_in_proportion() {
        let mut pacer = Pacer::new(1000);
        assert_eq!(pacer.wait(), None);
        pacer.spend(1500);
        let wait = pacer.wait().expect("over budget");
        assert!(
            wait >= Duration::from_millis(450) && wait <= Duration::from_millis(520),
            "{wait:?}"
        );
    }
}
