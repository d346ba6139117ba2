//! The connection thread of an `mqtt` sink: writes a batch's messages to the socket together.
//!
//! rumqttc's event loop writes and flushes each request on its own, so a window's results,
//! a burst of small messages, would cost a system call, a TCP segment and a wake-up of the
//! broker each. This thread drives rumqttc's [`EventLoop`] itself instead: rumqttc connects,
//! reconnects and resends what a broken connection left unacknowledged (`poll`), and keeps
//! the session's state (packet ids, messages in flight, acknowledgements); while connected,
//! the thread takes a chunk of messages at a time from the sink, writes as many as the
//! in-flight limit allows and flushes once.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rumqttc::{
    ConnectionError, Disconnect, Event, EventLoop, MqttOptions, Outgoing, Packet, PingReq, Publish,
    Request, StateError,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::super::source::sanitize;
use super::super::{MqttStats, Reconnects, flushed};
use crate::error::{ConnectorError, Result};

/// Messages the sink may hand over before publishing waits.
const QUEUED_MESSAGES: usize = 4096;
/// Messages in one chunk: what the thread writes before it flushes, at most.
pub(super) const CHUNK_MESSAGES: usize = 256;
/// How long dropping the sink waits for queued messages to reach the broker.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

/// A chunk of messages and the room it takes in the queue, given back when the thread takes it.
type Chunk = (Vec<Publish>, OwnedSemaphorePermit);

/// The sink's handle on its connection thread.
pub(super) struct SinkConnection {
    chunks: Option<mpsc::UnboundedSender<Chunk>>,
    room: Arc<Semaphore>,
    /// Messages handed to the thread.
    queued: u64,
    /// Messages written to the socket (QoS 0) or acknowledged by the broker (QoS 1).
    delivered: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    finished: std_mpsc::Receiver<()>,
    thread: Option<JoinHandle<()>>,
}

/// What [`SinkConnection::try_send`] could not do.
pub(super) enum SendError {
    /// The queue has no room for the chunk now; it is handed back.
    Full(Vec<Publish>),
    /// The thread has ended.
    Gone,
}

impl SinkConnection {
    pub(super) fn start(
        name: String,
        options: MqttOptions,
        acknowledged: bool,
        stats: Arc<MqttStats>,
    ) -> Result<Self> {
        // The sink keeps its own queue; rumqttc's request channel stays empty.
        let mut eventloop = EventLoop::new(options, 1);
        // Results leave in bursts of small messages. With Nagle's algorithm on, a burst's
        // tail waits for the broker's ACK, and a broker that sends nothing back (QoS 0)
        // delays that ACK by up to 40 ms.
        let mut network = eventloop.network_options();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        let (chunks, receiver) = mpsc::unbounded_channel();
        let stop = Arc::new(AtomicBool::new(false));
        let delivered = Arc::new(AtomicU64::new(0));
        let (done, finished) = std_mpsc::channel();
        let mut driver = Driver {
            name: name.clone(),
            reconnects: Reconnects::new("sink", &name, Arc::clone(&stats)),
            eventloop,
            chunks: receiver,
            backlog: VecDeque::new(),
            acknowledged,
            delivered: Arc::clone(&delivered),
            stop: Arc::clone(&stop),
            stats: Arc::clone(&stats),
        };
        let thread = std::thread::Builder::new()
            .name(format!("mqtt-sink-{}", sanitize(&name)))
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime.block_on(driver.run()),
                    Err(error) => {
                        tracing::error!(sink = %name, %error, "cannot start MQTT runtime")
                    }
                }
                stats.up.store(0, Ordering::Relaxed);
                let _ = done.send(());
            })
            .map_err(|e| ConnectorError::Internal(format!("cannot start MQTT thread: {e}")))?;
        Ok(Self {
            chunks: Some(chunks),
            room: Arc::new(Semaphore::new(QUEUED_MESSAGES)),
            queued: 0,
            delivered,
            stop,
            finished,
            thread: Some(thread),
        })
    }

    /// Hands `chunk` (at most [`CHUNK_MESSAGES`]) to the thread if the queue has room for it.
    pub(super) fn try_send(&mut self, chunk: Vec<Publish>) -> std::result::Result<(), SendError> {
        let Ok(permit) = Arc::clone(&self.room).try_acquire_many_owned(chunk.len() as u32) else {
            return Err(SendError::Full(chunk));
        };
        let messages = chunk.len() as u64;
        let chunks = self.chunks.as_ref().ok_or(SendError::Gone)?;
        chunks.send((chunk, permit)).map_err(|_| SendError::Gone)?;
        self.queued += messages;
        Ok(())
    }
}

impl Drop for SinkConnection {
    fn drop(&mut self) {
        // Wait until the broker has every queued message (acknowledged at QoS 1), then say
        // goodbye: disconnecting at once can cut off the last messages still in flight.
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while self.delivered.load(Ordering::Relaxed) < self.queued && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        // A closed queue tells a connected thread to disconnect; one still trying to connect
        // sees `stop`.
        self.chunks = None;
        self.stop.store(true, Ordering::Relaxed);
        match self.finished.recv_timeout(Duration::from_secs(1)) {
            Ok(()) => {
                if let Some(thread) = self.thread.take() {
                    let _ = thread.join();
                }
            }
            Err(_) => {
                tracing::warn!("MQTT sink: queued results not sent within {DRAIN_TIMEOUT:?}");
            }
        }
    }
}

/// The thread's side: rumqttc's event loop and the messages not yet written.
struct Driver {
    name: String,
    reconnects: Reconnects,
    eventloop: EventLoop,
    chunks: mpsc::UnboundedReceiver<Chunk>,
    /// Taken from the queue, not yet written: waits for room in flight or for a connection.
    backlog: VecDeque<Publish>,
    acknowledged: bool,
    delivered: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    stats: Arc<MqttStats>,
}

impl Driver {
    async fn run(&mut self) {
        loop {
            if self.stop.load(Ordering::Relaxed) && !self.connected() {
                return;
            }
            // rumqttc connects, and resends one by one what the last connection left
            // unacknowledged; the thread streams only once that is done.
            let result = if self.connected() && self.eventloop.pending.is_empty() {
                self.stream().await
            } else {
                match self.eventloop.poll().await {
                    Ok(event) => {
                        self.count(&event);
                        continue;
                    }
                    Err(error) => Err(error),
                }
            };
            match result {
                // The sink is gone and the broker has been told.
                Ok(()) => return,
                Err(error) => {
                    if self.stop.load(Ordering::Relaxed) {
                        return;
                    }
                    // Unacknowledged messages go back to rumqttc, which resends them after
                    // the next connect when the broker kept the session.
                    if self.eventloop.network.is_some() {
                        self.eventloop.clean();
                    }
                    let until = Instant::now() + self.reconnects.failed(&error);
                    while Instant::now() < until && !self.stop.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }
    }

    fn connected(&self) -> bool {
        self.eventloop.network.is_some()
    }

    /// Writes queued messages as they come while the connection lasts; returns `Ok` once the
    /// sink is gone and the broker has been told.
    async fn stream(&mut self) -> std::result::Result<(), ConnectionError> {
        let keep_alive = self
            .eventloop
            .mqtt_options
            .keep_alive()
            .max(Duration::from_secs(1));
        let flush_timeout =
            Duration::from_secs(self.eventloop.network_options.connection_timeout());
        let max_inflight = self.eventloop.mqtt_options.inflight();
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + keep_alive, keep_alive);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let EventLoop { network, state, .. } = &mut self.eventloop;
            let Some(network) = network.as_mut() else {
                return Err(ConnectionError::MqttState(StateError::ConnectionAborted));
            };
            let room = |state: &rumqttc::MqttState| {
                state.collision.is_none() && state.inflight() < max_inflight
            };
            if room(state) && !self.backlog.is_empty() {
                let mut written = 0;
                while room(state)
                    && let Some(publish) = self.backlog.pop_front()
                {
                    if let Some(packet) = state.handle_outgoing_packet(Request::Publish(publish))? {
                        network.write(packet).await?;
                        written += 1;
                    }
                }
                flushed(flush_timeout, network.flush()).await?;
                if written > 0 {
                    self.stats.writes.fetch_add(1, Ordering::Relaxed);
                }
                self.count_buffered();
                continue;
            }
            let take = self.backlog.is_empty() && room(state);
            tokio::select! {
                read = network.readb(state) => {
                    read?;
                    // Acknowledgements of what the broker sent (QoS 1 from the broker).
                    flushed(flush_timeout, network.flush()).await?;
                }
                chunk = self.chunks.recv(), if take => match chunk {
                    Some((chunk, _room)) => self.backlog.extend(chunk),
                    None => {
                        if let Some(packet) =
                            state.handle_outgoing_packet(Request::Disconnect(Disconnect))?
                        {
                            network.write(packet).await?;
                        }
                        flushed(flush_timeout, network.flush()).await?;
                        return Ok(());
                    }
                },
                _ = ping.tick() => {
                    // A ping still unanswered from the last tick fails here: the broker is gone.
                    if let Some(packet) = state.handle_outgoing_packet(Request::PingReq(PingReq))? {
                        network.write(packet).await?;
                    }
                    flushed(flush_timeout, network.flush()).await?;
                }
            }
            self.count_buffered();
        }
    }

    /// Counts the events rumqttc buffered while the thread wrote and read.
    fn count_buffered(&mut self) {
        while let Some(event) = self.eventloop.state.events.pop_front() {
            self.count(&event);
        }
    }

    fn count(&mut self, event: &Event) {
        if let Event::Outgoing(Outgoing::Publish(_)) = event {
            tracing::trace!(sink = %self.name, "published");
        }
        match event {
            Event::Incoming(Packet::ConnAck(_)) => self.reconnects.connected(),
            Event::Outgoing(Outgoing::Publish(_)) if !self.acknowledged => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Event::Incoming(Packet::PubAck(_)) => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}
