//! The `file` source: streams a JSON-lines or CSV file through a decoder.

use std::collections::VecDeque;
use std::path::PathBuf;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{SchemaRef, TimestampNanosecondType};
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use super::config::{FileFormat, FileSourceConfig};
use crate::dead_letter::DeadLetterQueue;
use crate::decode::{CsvDecoder, JsonDecoder};
use crate::error::{ConnectorError, Result};
use crate::{Source, SourceEvent, SourceFuture};

/// Bytes requested from the file per read; tiny in tests so that records straddle reads.
const READ_CHUNK: usize = if cfg!(test) { 256 } else { 256 * 1024 };

/// A line longer than this is dead-lettered rather than buffered without bound.
const MAX_LINE: usize = if cfg!(test) { 4096 } else { 16 * 1024 * 1024 };

/// When replaying, batches are cut so that each covers at most this much wall time, so rows are
/// released close to their due time instead of a whole batch at once. A batch is released when
/// its last row is due: never early, at most this late.
const REPLAY_SLICE_SECONDS: f64 = 0.1;

/// Reads a file of recorded telemetry; see [`FileSourceConfig`].
///
/// Cancel-safe: every `.await` either reads into the source's own buffer (tokio keeps a read
/// that was interrupted) or sleeps before releasing a batch that stays queued until then.
#[derive(Debug)]
pub struct FileSource {
    config: FileSourceConfig,
    schema: SchemaRef,
    decoder: LineDecoder,
    dead_letters: DeadLetterQueue,
    /// The dead-letter source name, `file:<path>`.
    label: String,
    file: Option<tokio::fs::File>,
    /// Bytes read and not yet decoded start at `consumed`.
    buffer: Vec<u8>,
    consumed: usize,
    /// Discarding the rest of an over-long line.
    skipping_line: bool,
    eof: bool,
    finished: bool,
    /// Cut batches, each with the file offset of the first line of the flush it came from
    /// and the rows of that flush up to and including it: where a checkpoint resumes.
    ready: VecDeque<(RecordBatch, u64, u64)>,
    event_time: Option<usize>,
    replay: Option<Replay>,
    /// File offset of `buffer[0]`.
    base: u64,
    /// File offset of the first line in the decoder since the last flush.
    origin: Option<u64>,
    /// (flush origin, rows of it returned) after the last batch returned.
    position: (u64, u64),
    /// Resuming: lines ending at or before this offset are skipped (a CSV header is still
    /// read), then the first `rows` rows of the flush starting there.
    resume: Option<(u64, u64)>,
}

#[derive(Debug)]
enum LineDecoder {
    Json(Box<JsonDecoder>),
    Csv {
        decoder: Box<CsvDecoder>,
        header_seen: bool,
    },
}

impl LineDecoder {
    /// Where the first record of `input` ends: its newline (for CSV, one outside quotes).
    fn record_end(&self, input: &[u8]) -> Option<usize> {
        match self {
            Self::Json(_) => memchr::memchr(b'\n', input),
            Self::Csv { .. } => crate::decode::csv::record_end(input),
        }
    }

    /// Decodes one line; a malformed record becomes a dead letter, a bad CSV header an error.
    fn decode_line(
        &mut self,
        line: &[u8],
        dead_letters: &DeadLetterQueue,
        source: &str,
    ) -> Result<()> {
        let line = line.trim_ascii();
        if line.is_empty() {
            return Ok(());
        }
        let decoded = match self {
            Self::Json(decoder) => decoder.decode_record(line),
            Self::Csv {
                header_seen: header_seen @ false,
                decoder,
            } => {
                decoder.set_header(line)?;
                *header_seen = true;
                return Ok(());
            }
            Self::Csv { decoder, .. } => decoder.decode_record(line),
        };
        if let Err(reason) = decoded {
            dead_letters.push(source, &reason.to_string(), line);
        }
        Ok(())
    }

    fn len(&self) -> usize {
        match self {
            Self::Json(decoder) => decoder.len(),
            Self::Csv { decoder, .. } => decoder.len(),
        }
    }

    fn flush(&mut self) -> Result<Option<RecordBatch>> {
        match self {
            Self::Json(decoder) => decoder.flush(),
            Self::Csv { decoder, .. } => decoder.flush(),
        }
    }
}

/// Paces batches to their event time.
#[derive(Debug)]
struct Replay {
    speed: f64,
    /// The first row's event time and the instant it was released.
    origin: Option<(i64, Instant)>,
}

impl Replay {
    /// When a batch whose event times run from `first` to `last` may be released.
    fn due(&mut self, event_times: Option<(i64, i64)>) -> Instant {
        let now = Instant::now();
        let Some((first, last)) = event_times else {
            return now;
        };
        let (origin, start) = *self.origin.get_or_insert((first, now));
        let ahead = (last - origin) as f64 / 1e9 / self.speed;
        if ahead <= 0.0 {
            return now;
        }
        start + std::time::Duration::from_secs_f64(ahead.min(1e9))
    }
}

impl FileSource {
    /// A source over `config.path`, decoding into `schema`. The file is opened on the first
    /// poll, so building a pipeline does not fail on a file that appears later.
    pub fn new(
        config: FileSourceConfig,
        schema: SchemaRef,
        event_time: Option<&str>,
        dead_letters: DeadLetterQueue,
    ) -> Result<Self> {
        config.validate(&schema, event_time)?;
        let options = config.decode_options();
        let decoder = match config.format {
            FileFormat::Json => LineDecoder::Json(Box::new(JsonDecoder::new(
                schema.clone(),
                event_time,
                options,
            )?)),
            FileFormat::Csv => LineDecoder::Csv {
                decoder: Box::new(CsvDecoder::new(schema.clone(), event_time, options)?),
                header_seen: false,
            },
        };
        let event_time = event_time.and_then(|name| schema.index_of(name).ok());
        Ok(Self {
            label: format!("file:{}", config.path.display()),
            replay: config.replay_speed.map(|speed| Replay {
                speed,
                origin: None,
            }),
            config,
            schema,
            decoder,
            dead_letters,
            file: None,
            buffer: Vec::with_capacity(READ_CHUNK),
            consumed: 0,
            skipping_line: false,
            eof: false,
            finished: false,
            ready: VecDeque::new(),
            event_time,
            base: 0,
            origin: None,
            position: (0, 0),
            resume: None,
        })
    }

    async fn next(&mut self) -> Result<SourceEvent> {
        loop {
            // Batches a resumed source returned before its checkpoint: skipped.
            if let (Some((origin, rows)), Some((_, batch_origin, through))) =
                (self.resume, self.ready.front())
                && *batch_origin == origin
            {
                if *through <= rows {
                    self.position = (origin, *through);
                    self.ready.pop_front();
                    continue;
                }
                self.resume = None;
            }
            if let Some((batch, _, _)) = self.ready.front() {
                if let Some(replay) = &mut self.replay {
                    let due = replay.due(event_time_range(batch, self.event_time));
                    tokio::time::sleep_until(due).await;
                }
                if let Some((batch, origin, through)) = self.ready.pop_front() {
                    self.position = (origin, through);
                    return Ok(SourceEvent::Batch(batch));
                }
            }
            if self.finished {
                return Ok(SourceEvent::End);
            }
            self.decode_buffered()?;
            if self.decoder.len() >= self.config.batch_size {
                self.flush()?;
                continue;
            }
            if self.eof {
                // The last line may lack its newline.
                let start = self.base + self.consumed as u64;
                if !self.skipping_line && !self.skipped(self.base + self.buffer.len() as u64) {
                    if !self.header_pending() {
                        self.origin.get_or_insert(start);
                    }
                    let rest = &self.buffer[self.consumed..];
                    self.decoder
                        .decode_line(rest, &self.dead_letters, &self.label)?;
                }
                self.buffer.clear();
                self.consumed = 0;
                self.flush()?;
                self.finished = true;
                continue;
            }
            self.fill_buffer().await?;
        }
    }

    /// Reads the next chunk, making room by dropping bytes already decoded.
    async fn fill_buffer(&mut self) -> Result<()> {
        if self.file.is_none() {
            let file = tokio::fs::File::open(&self.config.path)
                .await
                .map_err(|e| ConnectorError::io("opening", &self.config.path, e))?;
            self.file = Some(file);
        }
        self.buffer.drain(..self.consumed);
        self.base += self.consumed as u64;
        self.consumed = 0;
        if self.buffer.len() > MAX_LINE {
            let reason = format!("line longer than {MAX_LINE} bytes");
            self.dead_letters.push(&self.label, &reason, &self.buffer);
            self.base += self.buffer.len() as u64;
            self.buffer.clear();
            self.skipping_line = true;
        }
        self.buffer.reserve(READ_CHUNK);
        let Some(file) = self.file.as_mut() else {
            return Err(ConnectorError::Internal("file source lost its file".into()));
        };
        let read = file
            .read_buf(&mut self.buffer)
            .await
            .map_err(|e| ConnectorError::io("reading", &self.config.path, e))?;
        if read == 0 {
            self.eof = true;
        }
        Ok(())
    }

    /// Decodes complete lines from the buffer until a batch is full or no complete line is
    /// left.
    fn decode_buffered(&mut self) -> Result<()> {
        while self.decoder.len() < self.config.batch_size {
            let start = self.base + self.consumed as u64;
            let pending = &self.buffer[self.consumed..];
            let end = if self.skipping_line {
                memchr::memchr(b'\n', pending)
            } else {
                self.decoder.record_end(pending)
            };
            let Some(newline) = end else {
                if self.skipping_line {
                    self.consumed = self.buffer.len();
                }
                return Ok(());
            };
            self.consumed += newline + 1;
            if self.skipping_line {
                self.skipping_line = false;
                continue;
            }
            if self.skipped(self.base + self.consumed as u64) {
                continue;
            }
            if !self.header_pending() {
                self.origin.get_or_insert(start);
            }
            let pending = &self.buffer[start as usize - self.base as usize..];
            self.decoder
                .decode_line(&pending[..newline], &self.dead_letters, &self.label)?;
        }
        Ok(())
    }

    /// Moves the decoded rows to the ready queue, cut to `batch_size` and, when replaying, to
    /// short spans of event time.
    fn flush(&mut self) -> Result<()> {
        let origin = self.origin.take();
        let Some(batch) = self.decoder.flush()? else {
            return Ok(());
        };
        let origin = origin.unwrap_or(self.base + self.consumed as u64);
        let times = match (&self.replay, self.event_time) {
            (Some(replay), Some(column)) => Some((
                batch
                    .column(column)
                    .as_primitive::<TimestampNanosecondType>()
                    .clone(),
                (REPLAY_SLICE_SECONDS * replay.speed * 1e9) as i64,
            )),
            _ => None,
        };
        let mut offset = 0;
        let mut through = 0;
        while offset < batch.num_rows() {
            let mut length = self.config.batch_size.min(batch.num_rows() - offset);
            if let Some((times, span)) = &times {
                let first = times.value(offset);
                length = (1..length)
                    .find(|&i| {
                        times.is_valid(offset + i) && times.value(offset + i) - first > *span
                    })
                    .unwrap_or(length);
            }
            through += length as u64;
            self.ready
                .push_back((batch.slice(offset, length), origin, through));
            offset += length;
        }
        Ok(())
    }

    /// Whether a resumed source skips the line ending at `end`: it came before the
    /// checkpoint. A CSV header is never skipped.
    fn skipped(&self, end: u64) -> bool {
        self.resume
            .is_some_and(|(origin, _)| end <= origin && !self.header_pending())
    }

    /// A CSV source that has not read its header yet.
    fn header_pending(&self) -> bool {
        matches!(
            self.decoder,
            LineDecoder::Csv {
                header_seen: false,
                ..
            }
        )
    }

    /// The schema of every batch.
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// The file being read.
    pub fn path(&self) -> &PathBuf {
        &self.config.path
    }
}

/// The first and last non-null event times of a batch, in row order.
fn event_time_range(batch: &RecordBatch, column: Option<usize>) -> Option<(i64, i64)> {
    let times = batch
        .column(column?)
        .as_primitive_opt::<TimestampNanosecondType>()?;
    let first = (0..times.len()).find(|&i| times.is_valid(i))?;
    let last = (0..times.len()).rev().find(|&i| times.is_valid(i))?;
    Some((times.value(first), times.value(last)))
}

impl Source for FileSource {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn next_event(&mut self) -> SourceFuture<'_> {
        Box::pin(self.next())
    }

    /// The file offset of the first line of the batch's flush and the rows of that flush
    /// returned: 16 bytes. Decoding the same file from the same line gives the same flush.
    fn position(&self) -> Option<Vec<u8>> {
        Some(crate::position::encode(&[self.position.0, self.position.1]))
    }

    /// Resumes after `position`: earlier lines are skipped without decoding.
    fn seek(&mut self, position: &[u8]) -> Result<()> {
        let Some([origin, rows]) = crate::position::decode(position) else {
            return Err(ConnectorError::config(
                "file",
                "the checkpointed position is not a file position",
            ));
        };
        self.resume = Some((origin, rows));
        self.position = (origin, rows);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::decode::test_support::{table, vibration_schema};
    use crate::time::TimeUnit;

    fn write_file(contents: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(contents.as_bytes()).expect("write");
        file
    }

    fn source(
        file: &tempfile::NamedTempFile,
        config: FileSourceConfig,
        dlq: &DeadLetterQueue,
    ) -> FileSource {
        let config = FileSourceConfig {
            path: file.path().to_path_buf(),
            ..config
        };
        FileSource::new(config, vibration_schema(), Some("ts"), dlq.clone()).expect("source")
    }

    async fn drain(source: &mut FileSource) -> Vec<RecordBatch> {
        let mut batches = Vec::new();
        loop {
            match source.next_event().await {
                Ok(SourceEvent::Batch(batch)) => batches.push(batch),
                Ok(SourceEvent::End) => return batches,
                Err(error) => panic!("source failed: {error}"),
            }
        }
    }

    #[tokio::test]
    async fn reads_json_lines_in_batches_and_dead_letters_bad_lines() {
        let file = write_file(concat!(
            "{\"sensor\":\"s1\",\"ts\":1704067200000,\"v\":1.5}\n",
            "\n",
            "{\"sensor\":\"s1\",\"ts\":1704067200001,\"v\":oops}\n",
            "{\"sensor\":\"s2\",\"t0\":\"2024-01-01T00:00:01Z\",\"rate_hz\":10,\"samples\":[1,2,3]}\r\n",
            "{\"sensor\":\"s3\",\"ts\":1704067200002}",
        ));
        let dlq = DeadLetterQueue::default();
        let config = FileSourceConfig {
            batch_size: 3,
            ..FileSourceConfig::default()
        };
        let mut source = source(&file, config, &dlq);
        let batches = drain(&mut source).await;
        assert_eq!(
            batches
                .iter()
                .map(RecordBatch::num_rows)
                .collect::<Vec<_>>(),
            vec![3, 1, 1]
        );
        assert_eq!(dlq.counts_by_reason(), vec![("invalid json".to_owned(), 1)]);
        assert_eq!(
            dlq.recent()[0].source,
            format!("file:{}", file.path().display())
        );
        assert_eq!(
            table(&batches[2])[3],
            "| s3     | 2024-01-01T00:00:00.002 |   |"
        );
        assert!(matches!(source.next_event().await, Ok(SourceEvent::End)));
    }

    #[tokio::test]
    async fn reads_csv_with_a_header_across_many_chunks() {
        let mut contents = String::from("ts,sensor,v\n");
        for i in 0..50_000 {
            contents.push_str(&format!("{},s{},{}.5\n", 1_704_067_200 + i, i % 7, i));
        }
        contents.push_str("not-a-time,s1,1\n");
        let file = write_file(&contents);
        let dlq = DeadLetterQueue::default();
        let config = FileSourceConfig {
            format: FileFormat::Csv,
            time_unit: TimeUnit::Seconds,
            ..FileSourceConfig::default()
        };
        let batches = drain(&mut source(&file, config, &dlq)).await;
        assert!(batches.iter().all(|b| b.num_rows() <= 8192));
        assert_eq!(
            batches.iter().map(RecordBatch::num_rows).sum::<usize>(),
            50_000
        );
        assert_eq!(
            dlq.counts_by_reason(),
            vec![("invalid timestamp for 'ts'".to_owned(), 1)]
        );
        let last = batches.last().expect("batches");
        assert_eq!(
            table(last)[last.num_rows() + 2],
            "| s5     | 2024-01-01T13:53:19 | 49999.5 |"
        );
    }

    #[tokio::test]
    async fn a_quoted_csv_field_may_span_lines() {
        let file = write_file(concat!(
            "ts,sensor,v\n",
            "1704067200,\"pump 1\nwest hall\",1.5\n",
            "1704067201,\"say \"\"hi\"\"\r\n, twice\",2.5\r\n",
            "1704067202,plain,3.5\n",
            "1704067203,\"never closed,4.5\n",
        ));
        let dlq = DeadLetterQueue::default();
        let config = FileSourceConfig {
            format: FileFormat::Csv,
            time_unit: TimeUnit::Seconds,
            ..FileSourceConfig::default()
        };
        let batches = drain(&mut source(&file, config, &dlq)).await;
        let sensors: Vec<String> = batches
            .iter()
            .flat_map(|b| {
                let column = b.column(0).as_string::<i32>();
                (0..b.num_rows()).map(move |i| column.value(i).to_owned())
            })
            .collect();
        assert_eq!(
            sensors,
            ["pump 1\nwest hall", "say \"hi\"\r\n, twice", "plain"]
        );
        // A quote that is never closed takes the rest of the file, which is then refused.
        assert_eq!(dlq.count(), 1, "{:?}", dlq.counts_by_reason());
    }

    #[tokio::test]
    async fn a_csv_header_missing_a_required_column_fails_the_source() {
        let file = write_file("sensor,v\ns1,1\n");
        let config = FileSourceConfig {
            format: FileFormat::Csv,
            ..FileSourceConfig::default()
        };
        let mut source = source(&file, config, &DeadLetterQueue::default());
        let error = source
            .next_event()
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        assert_eq!(
            error,
            Err("csv decoder: header row: no field for NOT NULL column 'ts'".to_owned())
        );
    }

    #[tokio::test]
    async fn an_endless_line_is_dead_lettered_and_skipped() {
        let mut contents = format!("{{\"sensor\":\"{}", "x".repeat(3 * MAX_LINE));
        contents.push_str("\"}\n{\"sensor\":\"s1\",\"ts\":0}\n");
        let file = write_file(&contents);
        let dlq = DeadLetterQueue::default();
        let batches = drain(&mut source(&file, FileSourceConfig::default(), &dlq)).await;
        assert_eq!(batches.iter().map(RecordBatch::num_rows).sum::<usize>(), 1);
        assert_eq!(
            dlq.counts_by_reason(),
            vec![(format!("line longer than {MAX_LINE} bytes"), 1)]
        );
    }

    #[tokio::test]
    async fn a_missing_file_is_an_external_error() {
        let config = FileSourceConfig {
            path: "/nonexistent/weir/input.jsonl".into(),
            ..FileSourceConfig::default()
        };
        let mut source = FileSource::new(
            config,
            vibration_schema(),
            Some("ts"),
            DeadLetterQueue::default(),
        )
        .expect("source");
        match source.next_event().await {
            Err(error) => assert_eq!(error.fault(), crate::error::Fault::External),
            Ok(event) => panic!("expected an error, got {event:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn replay_paces_rows_to_their_event_time() {
        let mut contents = String::new();
        for i in 0..=20 {
            contents.push_str(&format!(
                "{{\"sensor\":\"s1\",\"ts\":{},\"v\":{i}}}\n",
                1_704_067_200_000i64 + i * 100
            ));
        }
        let file = write_file(&contents);
        let config = FileSourceConfig {
            replay_speed: Some(2.0),
            ..FileSourceConfig::default()
        };
        let mut source = source(&file, config, &DeadLetterQueue::default());
        let start = Instant::now();
        let batches = drain(&mut source).await;
        // 2 s of recorded time at double speed, measured on tokio's paused virtual clock.
        assert_eq!(Instant::now() - start, std::time::Duration::from_secs(1));
        assert_eq!(batches.iter().map(RecordBatch::num_rows).sum::<usize>(), 21);
        // Each batch spans at most 0.1 s of wall time, 0.2 s of event time at double speed.
        assert_eq!(batches.len(), 7);
    }

    #[tokio::test]
    async fn a_source_resumed_from_its_position_returns_exactly_the_rest() {
        for format in [FileFormat::Json, FileFormat::Csv] {
            let mut contents = String::new();
            if format == FileFormat::Csv {
                contents.push_str("ts,sensor,v\n");
            }
            for i in 0..5_000 {
                contents.push_str(&match format {
                    FileFormat::Json => format!(
                        "{{\"ts\":{},\"sensor\":\"s{}\",\"v\":{i}.5}}\n",
                        1_704_067_200 + i,
                        i % 7
                    ),
                    FileFormat::Csv => format!("{},s{},{i}.5\n", 1_704_067_200 + i, i % 7),
                });
            }
            let file = write_file(&contents);
            let dlq = DeadLetterQueue::default();
            let config = FileSourceConfig {
                format,
                time_unit: TimeUnit::Seconds,
                batch_size: 700,
                ..FileSourceConfig::default()
            };
            let whole = drain(&mut source(&file, config.clone(), &dlq)).await;
            for taken in [0, 1, 3, whole.len()] {
                let mut first = source(&file, config.clone(), &dlq);
                for _ in 0..taken {
                    let Ok(SourceEvent::Batch(_)) = first.next_event().await else {
                        panic!("a batch");
                    };
                }
                let position = first.position().expect("position");
                let mut resumed = source(&file, config.clone(), &dlq);
                resumed.seek(&position).expect("seek");
                let rest = drain(&mut resumed).await;
                assert_eq!(rest, whole[taken..].to_vec(), "{format:?} after {taken}");
            }
        }
    }
}
