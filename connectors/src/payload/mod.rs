//! A source fed with raw payloads from inside the process: the decoding half of any
//! message-based connector (MQTT in the live gateway, the publisher of `weir bench`).
//!
//! Payloads arrive in [`Payloads`] chunks over a bounded channel, are decoded straight into
//! Arrow builders, and leave as a batch when `batch_size` rows are pending or `linger` has
//! passed since the first pending row, whichever comes first. Malformed payloads go to the
//! dead-letter queue. The source ends when every sender is dropped.

use std::time::Duration;

use arrow::datatypes::SchemaRef;
use tokio::sync::mpsc;

use crate::dead_letter::DeadLetterQueue;
use crate::decode::{DecodeOptions, JsonDecoder};
use crate::{Result, Source, SourceEvent, SourceFuture};

/// Many payloads in one allocation: a chunk is what crosses the channel.
#[derive(Debug, Default, Clone)]
pub struct Payloads {
    data: Vec<u8>,
    ends: Vec<usize>,
}

impl Payloads {
    pub fn with_capacity(payloads: usize, bytes: usize) -> Self {
        Self {
            data: Vec::with_capacity(bytes),
            ends: Vec::with_capacity(payloads),
        }
    }

    pub fn push(&mut self, payload: &[u8]) {
        self.data.extend_from_slice(payload);
        self.ends.push(self.data.len());
    }

    /// Appends a payload written in place by `write`.
    pub fn push_with(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        write(&mut self.data);
        self.ends.push(self.data.len());
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(self.ends.iter().copied())
            .map(|(start, end)| &self.data[start..end])
    }
}

/// Decodes JSON payloads received on a channel.
pub struct PayloadSource {
    name: String,
    receiver: mpsc::Receiver<Payloads>,
    decoder: JsonDecoder,
    dead_letters: DeadLetterQueue,
    batch_size: usize,
    linger: Duration,
    closed: bool,
}

impl PayloadSource {
    /// A source and the sender that feeds it; `capacity` chunks may wait in the channel.
    pub fn channel(
        name: impl Into<String>,
        schema: SchemaRef,
        event_time: Option<&str>,
        options: DecodeOptions,
        dead_letters: DeadLetterQueue,
        capacity: usize,
    ) -> Result<(Self, mpsc::Sender<Payloads>)> {
        let (sender, receiver) = mpsc::channel(capacity.max(1));
        let source = Self {
            name: name.into(),
            receiver,
            decoder: JsonDecoder::new(schema, event_time, options)?,
            dead_letters,
            batch_size: 8192,
            linger: Duration::from_millis(50),
            closed: false,
        };
        Ok((source, sender))
    }

    /// Rows per batch (at least 1) and the longest a decoded row waits for its batch.
    pub fn with_batching(mut self, batch_size: usize, linger: Duration) -> Self {
        self.batch_size = batch_size.max(1);
        self.linger = linger;
        self
    }

    fn decode(&mut self, payloads: &Payloads) {
        for payload in payloads.iter() {
            if let Err(error) = self.decoder.decode_record(payload) {
                self.dead_letters
                    .push(&self.name, &error.to_string(), payload);
            }
        }
    }

    async fn next(&mut self) -> Result<SourceEvent> {
        loop {
            let due =
                self.decoder.len() >= self.batch_size || (self.closed && !self.decoder.is_empty());
            if due && let Some(batch) = self.decoder.flush()? {
                return Ok(SourceEvent::Batch(batch));
            }
            if self.closed {
                return Ok(SourceEvent::End);
            }
            let received = if self.decoder.is_empty() {
                self.receiver.recv().await
            } else {
                match tokio::time::timeout(self.linger, self.receiver.recv()).await {
                    Ok(received) => received,
                    // Linger elapsed: hand over what is pending.
                    Err(_) => match self.decoder.flush()? {
                        Some(batch) => return Ok(SourceEvent::Batch(batch)),
                        None => continue,
                    },
                }
            };
            match received {
                Some(payloads) => self.decode(&payloads),
                None => self.closed = true,
            }
        }
    }
}

impl Source for PayloadSource {
    fn schema(&self) -> SchemaRef {
        self.decoder.schema()
    }

    fn next_event(&mut self) -> SourceFuture<'_> {
        Box::pin(self.next())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};

    use super::*;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("sensor", DataType::Utf8, false),
            Field::new("ts", DataType::Timestamp(TimeUnit::Nanosecond, None), false),
            Field::new("v", DataType::Float64, true),
        ]))
    }

    #[tokio::test]
    async fn decodes_chunks_into_batches_dead_letters_bad_payloads_and_ends_when_senders_drop() {
        let dead_letters = DeadLetterQueue::default();
        let (source, sender) = PayloadSource::channel(
            "test",
            schema(),
            Some("ts"),
            DecodeOptions::default(),
            dead_letters.clone(),
            4,
        )
        .expect("source");
        let mut source = source.with_batching(3, Duration::from_secs(60));
        let mut chunk = Payloads::default();
        chunk.push(br#"{"sensor":"a","ts":1000,"v":1.5}"#);
        chunk.push(b"not json");
        chunk.push(br#"{"sensor":"b","t0":2000,"rate_hz":1000,"samples":[1.0,2.0]}"#);
        chunk.push(br#"{"sensor":"c","ts":5000,"v":3.0}"#);
        sender.send(chunk).await.expect("send");
        drop(sender);
        let SourceEvent::Batch(first) = source.next_event().await.expect("event") else {
            panic!("expected a batch")
        };
        assert_eq!(
            first.num_rows(),
            4,
            "one sample, a block of two, one sample"
        );
        assert!(matches!(
            source.next_event().await.expect("event"),
            SourceEvent::End
        ));
        assert_eq!(dead_letters.count(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_partial_batch_leaves_after_the_linger_time() {
        let (source, sender) = PayloadSource::channel(
            "test",
            schema(),
            Some("ts"),
            DecodeOptions::default(),
            DeadLetterQueue::default(),
            4,
        )
        .expect("source");
        let mut source = source.with_batching(1000, Duration::from_millis(20));
        let mut chunk = Payloads::default();
        chunk.push(br#"{"sensor":"a","ts":1000,"v":1.5}"#);
        sender.send(chunk).await.expect("send");
        let SourceEvent::Batch(batch) = source.next_event().await.expect("event") else {
            panic!("expected a batch")
        };
        assert_eq!(batch.num_rows(), 1);
        drop(sender);
    }
}
