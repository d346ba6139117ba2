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
    /// The source is finite and done; everything before has been sent.
    End,
}

impl Message for StreamMessage {
    /// The receiver's verdict: an error stops the sender, which reports to the supervisor.
    type Result = Result<()>;
}
