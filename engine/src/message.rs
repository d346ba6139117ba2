use std::time::Instant;

use actix::Message;
use arrow::array::RecordBatch;
use weir_operators::Watermark;

use crate::error::Result;

/// What flows along every edge of a pipeline's actor graph, in order.
#[derive(Debug)]
pub enum StreamMessage {
    /// Rows, with the instant the source produced them (or, for window results, the instant
    /// the source produced the watermark that closed the window): end-to-end latency is
    /// measured from it.
    Batch { batch: RecordBatch, origin: Instant },
    /// Event time has advanced: no more rows at or before it.
    Watermark {
        watermark: Watermark,
        origin: Instant,
    },
    /// A checkpoint: every stage adds its state as the barrier passes, after every message
    /// before it and before every message after it, and the sink commits it.
    Barrier(Barrier),
    /// The source is finite and done; everything before has been sent.
    End,
}

/// A checkpoint on its way through the pipeline.
#[derive(Debug)]
pub struct Barrier {
    pub id: u64,
    /// The source's position once every batch before the barrier was sent.
    pub position: Option<Vec<u8>>,
    /// The operators' states, in graph order, filled in as the barrier passes them.
    pub states: Vec<Vec<u8>>,
}

impl Message for StreamMessage {
    /// The receiver's verdict: an error stops the sender, which reports to the supervisor.
    type Result = Result<()>;
}
