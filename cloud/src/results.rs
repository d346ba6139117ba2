//! Results the gateways uplink: stored once, as Parquet, and queryable with SQL.
//!
//! ```text
//!  <data>/results/<stream>/date=2026-12-02/<gateway-id>-<first>-<last>-<n>.parquet
//!     each file: rows of one gateway and stream, a `gateway` column added in front,
//!     key-value metadata weir.gateway = id, weir.seqs = "41-57,60-61"
//! ```
//!
//! A batch is identified by (gateway, stream, sequence number). The store keeps, per gateway
//! and stream, the set of sequence numbers it holds, and drops (and counts) any batch it has
//! seen. Batches are buffered per gateway and stream and written as one file once there are
//! enough rows or the oldest waited long enough; only then are they acknowledged, so an
//! acknowledged batch is on disk: the file is written under a temporary name, synced and
//! renamed. The files are the truth: at start the store reads each file's footer to learn
//! what it holds, and a crash between writing and acknowledging only means the gateway sends
//! the batches again and they are dropped as duplicates.
//!
//! `weir query` runs SQL with DataFusion over every stream, one table per stream, with `date`
//! as a partition column so a `WHERE date = '...'` reads only that day.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::ipc::reader::StreamReader;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::ListingOptions;
use datafusion::execution::context::{SQLOptions, SessionContext};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{FileReader, SerializedFileReader};
use weir_proto::cloud::{SeqRange, SeqRanges, StreamHolding, StreamRanges};

use crate::error::{CloudError, Result};

const SEQS_KEY: &str = "weir.seqs";
const GATEWAY_KEY: &str = "weir.gateway";

/// When buffered batches are written.
#[derive(Debug, Clone, Copy)]
pub struct ResultOptions {
    pub flush_rows: usize,
    pub flush_after: Duration,
    /// Most rows a query returns; more is an error that asks for a LIMIT or an aggregate.
    pub max_query_rows: usize,
}

impl Default for ResultOptions {
    fn default() -> Self {
        Self {
            flush_rows: 50_000,
            flush_after: Duration::from_secs(1),
            max_query_rows: 1_000_000,
        }
    }
}

/// Sequence numbers as disjoint inclusive ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeqSet(BTreeMap<u64, u64>);

impl SeqSet {
    pub fn contains(&self, seq: u64) -> bool {
        self.0
            .range(..=seq)
            .next_back()
            .is_some_and(|(_, &last)| seq <= last)
    }

    pub fn insert_range(&mut self, first: u64, last: u64) {
        let (mut first, mut last) = (first, last);
        // Merge with every range that touches first..=last.
        let touching: Vec<(u64, u64)> = self
            .0
            .range(..=last.saturating_add(1))
            .rev()
            .take_while(|(_, end)| end.saturating_add(1) >= first)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (start, end) in touching {
            self.0.remove(&start);
            first = first.min(start);
            last = last.max(end);
        }
        self.0.insert(first, last);
    }

    pub fn insert(&mut self, seq: u64) {
        self.insert_range(seq, seq);
    }

    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.0.iter().map(|(&s, &e)| (s, e))
    }

    /// The part of the set within `from..below`.
    pub fn within(&self, from: u64, below: u64) -> Vec<(u64, u64)> {
        self.ranges()
            .filter(|&(s, e)| e >= from && s < below)
            .map(|(s, e)| (s.max(from), e.min(below.saturating_sub(1))))
            .collect()
    }

    pub fn max(&self) -> Option<u64> {
        self.0.values().next_back().copied()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `"1-5,9-9"`, the form kept in file metadata.
    pub fn to_text(&self) -> String {
        self.ranges()
            .map(|(s, e)| format!("{s}-{e}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn parse(text: &str) -> Option<Self> {
        let mut set = Self::default();
        for part in text.split(',').filter(|p| !p.is_empty()) {
            let (s, e) = part.split_once('-')?;
            let (s, e) = (s.parse().ok()?, e.parse().ok()?);
            if s > e {
                return None;
            }
            set.insert_range(s, e);
        }
        Some(set)
    }
}

/// Counters for `/metrics` and status.
#[derive(Debug, Default)]
pub struct ResultCounters {
    pub batches: AtomicU64,
    pub rows: AtomicU64,
    pub duplicates: AtomicU64,
    pub rejected: AtomicU64,
    pub files: AtomicU64,
    pub write_errors: AtomicU64,
}

/// One gateway's stream: what is stored and what waits to be written.
#[derive(Default)]
struct StreamState {
    stored: SeqSet,
    buffer: Vec<RecordBatch>,
    buffered: SeqSet,
    rows: usize,
    since: Option<Instant>,
    duplicates: u64,
}

/// What happened to a received batch.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// Waits in the buffer; acknowledged when written.
    Buffered,
    /// Stored before: dropped and counted. `stored` says whether it is already on disk (it
    /// may still be in a buffer).
    Duplicate { stored: bool },
}

/// Per gateway and stream: last stored sequence number and duplicates, for status.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StoredStream {
    pub stream: String,
    pub last_stored_seq: Option<u64>,
    pub duplicates: u64,
}

type Key = (String, String);

/// The store; see the module docs.
pub struct ResultStore {
    dir: PathBuf,
    options: ResultOptions,
    streams: Mutex<HashMap<Key, Arc<Mutex<StreamState>>>>,
    pub counters: ResultCounters,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ResultStore {
    /// Opens the store in `dir`, learning what it holds from the files' footers.
    pub fn open(dir: &Path, options: ResultOptions) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(CloudError::io(format!(
            "creating the results directory {}",
            dir.display()
        )))?;
        let store = Self {
            dir: dir.to_owned(),
            options,
            streams: Mutex::default(),
            counters: ResultCounters::default(),
        };
        let mut files = 0;
        for (stream, path) in store.files()? {
            if path.extension().is_some_and(|e| e == "tmp") {
                // A write that never finished: its batches were not acknowledged.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            match read_footer(&path) {
                Ok((gateway, seqs)) => {
                    let state = store.state(&gateway, &stream);
                    let mut state = lock(&state);
                    for (s, e) in seqs.ranges() {
                        state.stored.insert_range(s, e);
                    }
                    files += 1;
                }
                Err(error) => {
                    tracing::warn!(file = %path.display(), %error, "not a results file; ignored")
                }
            }
        }
        store.counters.files.store(files, Ordering::Relaxed);
        Ok(store)
    }

    /// Every (stream, file) under the results directory.
    fn files(&self) -> Result<Vec<(String, PathBuf)>> {
        let mut found = Vec::new();
        for stream in read_dir(&self.dir)? {
            let Some(name) = stream
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_owned)
            else {
                continue;
            };
            if !stream.is_dir() {
                continue;
            }
            for day in read_dir(&stream)?.into_iter().filter(|d| d.is_dir()) {
                for file in read_dir(&day)? {
                    found.push((name.clone(), file));
                }
            }
        }
        Ok(found)
    }

    fn state(&self, gateway: &str, stream: &str) -> Arc<Mutex<StreamState>> {
        Arc::clone(
            lock(&self.streams)
                .entry((gateway.to_owned(), stream.to_owned()))
                .or_default(),
        )
    }

    /// What the cloud holds of what a gateway says it still has: the answer to `UplinkOpen`.
    pub fn stored_within(&self, gateway_id: &str, holdings: &[StreamHolding]) -> SeqRanges {
        let streams = holdings
            .iter()
            .filter_map(|holding| {
                let state = self.state(gateway_id, &holding.stream);
                let state = lock(&state);
                let ranges = state.stored.within(holding.first_pending, holding.next_seq);
                (!ranges.is_empty()).then(|| stream_ranges(&holding.stream, ranges))
            })
            .collect();
        SeqRanges { streams }
    }

    /// Takes one batch from a gateway. A payload that is not an Arrow IPC stream, or a stream
    /// name that is not an identifier, is refused with the reason.
    pub fn receive(
        &self,
        gateway_id: &str,
        gateway_name: &str,
        stream: &str,
        seq: u64,
        arrow_ipc: &[u8],
    ) -> Result<Received> {
        check_stream(stream)?;
        let state = self.state(gateway_id, stream);
        let mut state = lock(&state);
        if state.stored.contains(seq) || state.buffered.contains(seq) {
            state.duplicates += 1;
            self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
            return Ok(Received::Duplicate {
                stored: state.stored.contains(seq),
            });
        }
        let batches = decode(arrow_ipc).inspect_err(|_| {
            self.counters.rejected.fetch_add(1, Ordering::Relaxed);
        })?;
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        for batch in batches {
            state.buffer.push(with_gateway(batch, gateway_name)?);
        }
        state.buffered.insert(seq);
        state.rows += rows;
        state.since.get_or_insert_with(Instant::now);
        self.counters.batches.fetch_add(1, Ordering::Relaxed);
        Ok(Received::Buffered)
    }

    /// Writes the buffers of `gateway_id` that are due (all of them with `force`) and returns
    /// what is now stored, for the acknowledgement. A write that fails leaves the batches
    /// buffered for the next try; nothing is acknowledged that is not on disk.
    pub fn flush(&self, gateway_id: &str, force: bool) -> Result<SeqRanges> {
        let due: Vec<(String, Arc<Mutex<StreamState>>)> = lock(&self.streams)
            .iter()
            .filter(|((gateway, _), _)| gateway == gateway_id)
            .map(|((_, stream), state)| (stream.clone(), Arc::clone(state)))
            .collect();
        let mut stored = Vec::new();
        let mut failure = None;
        for (stream, state) in due {
            let mut state = lock(&state);
            let ready = state.rows >= self.options.flush_rows
                || state
                    .since
                    .is_some_and(|t| t.elapsed() >= self.options.flush_after);
            if state.buffered.is_empty() || !(force || ready) {
                continue;
            }
            match self.write_file(gateway_id, &stream, &state.buffer, &state.buffered) {
                Ok(rows) => {
                    let written = std::mem::take(&mut state.buffered);
                    for (s, e) in written.ranges() {
                        state.stored.insert_range(s, e);
                    }
                    state.buffer.clear();
                    state.rows = 0;
                    state.since = None;
                    self.counters.rows.fetch_add(rows as u64, Ordering::Relaxed);
                    self.counters.files.fetch_add(1, Ordering::Relaxed);
                    stored.push(stream_ranges(&stream, written.ranges().collect()));
                }
                Err(error) => {
                    self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(%stream, gateway = gateway_id, %error, "cannot write results; they stay buffered and unacknowledged");
                    failure = Some(error);
                }
            }
        }
        match failure {
            Some(error) if stored.is_empty() => Err(error),
            _ => Ok(SeqRanges { streams: stored }),
        }
    }

    /// Whether (gateway, stream, seq) is on disk.
    pub fn is_stored(&self, gateway_id: &str, stream: &str, seq: u64) -> bool {
        let state = lock(&self.streams)
            .get(&(gateway_id.to_owned(), stream.to_owned()))
            .cloned();
        state.is_some_and(|state| lock(&state).stored.contains(seq))
    }

    /// Whether some buffer of `gateway_id` holds batches.
    pub fn has_buffered(&self, gateway_id: &str) -> bool {
        lock(&self.streams)
            .iter()
            .any(|((gateway, _), state)| gateway == gateway_id && !lock(state).buffered.is_empty())
    }

    /// Per stream of `gateway_id`: the last stored sequence number and duplicates dropped.
    pub fn gateway_streams(&self, gateway_id: &str) -> Vec<StoredStream> {
        let mut streams: Vec<StoredStream> = lock(&self.streams)
            .iter()
            .filter(|((gateway, _), _)| gateway == gateway_id)
            .map(|((_, stream), state)| {
                let state = lock(state);
                StoredStream {
                    stream: stream.clone(),
                    last_stored_seq: state.stored.max(),
                    duplicates: state.duplicates,
                }
            })
            .collect();
        streams.sort_by(|a, b| a.stream.cmp(&b.stream));
        streams
    }

    fn write_file(
        &self,
        gateway_id: &str,
        stream: &str,
        batches: &[RecordBatch],
        seqs: &SeqSet,
    ) -> Result<usize> {
        let day = chrono::Utc::now().format("%Y-%m-%d");
        let dir = self.dir.join(stream).join(format!("date={day}"));
        std::fs::create_dir_all(&dir)
            .map_err(CloudError::io(format!("creating {}", dir.display())))?;
        let (first, last) = (
            seqs.ranges().next().map_or(0, |r| r.0),
            seqs.max().unwrap_or(0),
        );
        let unique = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0);
        let name = format!("{gateway_id}-{first:020}-{last:020}-{unique}.parquet");
        let path = dir.join(&name);
        let temporary = dir.join(format!("{name}.tmp"));
        let rows = write_parquet(&temporary, gateway_id, batches, seqs).inspect_err(|_| {
            let _ = std::fs::remove_file(&temporary);
        })?;
        std::fs::rename(&temporary, &path)
            .map_err(CloudError::io(format!("renaming {}", temporary.display())))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(CloudError::io(format!("syncing {}", dir.display())))?;
        Ok(rows)
    }

    /// Names of the streams with stored results: the tables of [`Self::query`].
    pub fn tables(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = read_dir(&self.dir)?
            .into_iter()
            .filter(|p| p.is_dir())
            .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_owned))
            .filter(|n| check_stream(n).is_ok())
            .collect();
        names.sort();
        Ok(names)
    }

    /// Runs a read-only SQL query over the stored results.
    pub async fn query(&self, sql: &str) -> Result<Vec<RecordBatch>> {
        let context = SessionContext::new();
        let tables = self.tables()?;
        for table in &tables {
            let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
                .with_file_extension(".parquet")
                .with_table_partition_cols(vec![("date".to_owned(), DataType::Utf8)]);
            let path = format!("{}/", self.dir.join(table).display());
            context
                .register_listing_table(table.as_str(), path, options, None, None)
                .await
                .map_err(|e| CloudError::Storage(format!("reading stream '{table}': {e}")))?;
        }
        let read_only = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        let frame = context
            .sql_with_options(sql, read_only)
            .await
            .map_err(|e| query_error(&e.to_string(), &tables))?;
        let batches = frame
            .limit(0, Some(self.options.max_query_rows + 1))
            .map_err(|e| query_error(&e.to_string(), &tables))?
            .collect()
            .await
            .map_err(|e| query_error(&e.to_string(), &tables))?;
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        if rows > self.options.max_query_rows {
            return Err(CloudError::Invalid(format!(
                "the query returns more than {} rows; add a LIMIT or aggregate",
                self.options.max_query_rows
            )));
        }
        Ok(batches)
    }
}

fn query_error(message: &str, tables: &[String]) -> CloudError {
    let known = if tables.is_empty() {
        "no stream has stored results yet".to_owned()
    } else {
        format!("streams: {}", tables.join(", "))
    };
    CloudError::Invalid(format!("{message} ({known})"))
}

fn stream_ranges(stream: &str, ranges: Vec<(u64, u64)>) -> StreamRanges {
    StreamRanges {
        stream: stream.to_owned(),
        ranges: ranges
            .into_iter()
            .map(|(first, last)| SeqRange { first, last })
            .collect(),
    }
}

fn check_stream(stream: &str) -> Result<()> {
    let valid = !stream.is_empty()
        && stream.len() <= 128
        && stream.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && stream
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(CloudError::Invalid(format!(
            "stream name '{stream}' is not a plain SQL identifier"
        )))
    }
}

fn read_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries =
        std::fs::read_dir(dir).map_err(CloudError::io(format!("listing {}", dir.display())))?;
    Ok(entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
}

fn decode(bytes: &[u8]) -> Result<Vec<RecordBatch>> {
    let invalid = |e: arrow::error::ArrowError| {
        CloudError::Invalid(format!("the batch is not a valid Arrow IPC stream: {e}"))
    };
    StreamReader::try_new(bytes, None)
        .map_err(invalid)?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(invalid)
}

/// `batch` with a `gateway` column in front, unless it has one.
fn with_gateway(batch: RecordBatch, gateway: &str) -> Result<RecordBatch> {
    if batch.schema().column_with_name("gateway").is_some() {
        return Ok(batch);
    }
    let mut fields = vec![Arc::new(Field::new("gateway", DataType::Utf8, false))];
    fields.extend(batch.schema().fields().iter().cloned());
    let mut columns: Vec<ArrayRef> =
        vec![Arc::new(StringArray::from(vec![gateway; batch.num_rows()]))];
    columns.extend(batch.columns().iter().cloned());
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
        .map_err(|e| CloudError::Invalid(format!("the batch cannot be stored: {e}")))
}

/// Writes `batches` (one schema or compatible ones) to `path`, synced; returns the rows.
fn write_parquet(
    path: &Path,
    gateway_id: &str,
    batches: &[RecordBatch],
    seqs: &SeqSet,
) -> Result<usize> {
    let schema: SchemaRef = merged_schema(batches)?;
    let file =
        File::create(path).map_err(CloudError::io(format!("creating {}", path.display())))?;
    let properties = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_key_value_metadata(Some(vec![
            KeyValue::new(SEQS_KEY.to_owned(), seqs.to_text()),
            KeyValue::new(GATEWAY_KEY.to_owned(), gateway_id.to_owned()),
        ]))
        .build();
    let parquet_error = |e: parquet::errors::ParquetError| {
        CloudError::Storage(format!("writing {}: {e}", path.display()))
    };
    let mut writer =
        ArrowWriter::try_new(file, Arc::clone(&schema), Some(properties)).map_err(parquet_error)?;
    let mut rows = 0;
    for batch in batches {
        let batch = conform(batch, &schema)?;
        rows += batch.num_rows();
        writer.write(&batch).map_err(parquet_error)?;
    }
    let file = writer.into_inner().map_err(parquet_error)?;
    file.sync_all()
        .map_err(CloudError::io(format!("syncing {}", path.display())))?;
    Ok(rows)
}

/// One schema for the batches of a buffer: a new pipeline version may add columns, and
/// every column becomes nullable so that batches without it still fit.
fn merged_schema(batches: &[RecordBatch]) -> Result<SchemaRef> {
    let schemas = batches.iter().map(|b| {
        let fields: Vec<Field> = b
            .schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect();
        Schema::new(fields)
    });
    Schema::try_merge(schemas).map(Arc::new).map_err(|e| {
        CloudError::Invalid(format!(
            "batches of one stream disagree on a column's type: {e}"
        ))
    })
}

/// `batch` in `schema`: missing columns as nulls.
fn conform(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    let columns = schema
        .fields()
        .iter()
        .map(|field| match batch.column_by_name(field.name()) {
            Some(column) => Arc::clone(column),
            None => arrow::array::new_null_array(field.data_type(), batch.num_rows()),
        })
        .collect();
    RecordBatch::try_new(Arc::clone(schema), columns)
        .map_err(|e| CloudError::Invalid(format!("the batch cannot be stored: {e}")))
}

fn read_footer(path: &Path) -> std::result::Result<(String, SeqSet), String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    let reader = SerializedFileReader::new(file).map_err(|e| e.to_string())?;
    let metadata = reader.metadata().file_metadata().key_value_metadata();
    let value = |key: &str| {
        metadata
            .and_then(|kv| kv.iter().find(|k| k.key == key))
            .and_then(|k| k.value.clone())
    };
    let gateway = value(GATEWAY_KEY).ok_or("no weir.gateway metadata")?;
    let seqs = value(SEQS_KEY)
        .and_then(|text| SeqSet::parse(&text))
        .ok_or("no readable weir.seqs metadata")?;
    Ok((gateway, seqs))
}

#[cfg(test)]
mod tests {
    use arrow::array::{Float64Array, Int64Array};

    use super::*;

    fn ipc(first: i64, rows: i64) -> Vec<u8> {
        let batch = RecordBatch::try_from_iter(vec![
            (
                "n",
                Arc::new(Int64Array::from((first..first + rows).collect::<Vec<_>>())) as ArrayRef,
            ),
            (
                "rms",
                Arc::new(Float64Array::from(
                    (first..first + rows)
                        .map(|v| v as f64 / 2.0)
                        .collect::<Vec<_>>(),
                )) as ArrayRef,
            ),
        ])
        .expect("batch");
        let mut bytes = Vec::new();
        let mut writer =
            arrow::ipc::writer::StreamWriter::try_new(&mut bytes, &batch.schema()).expect("ipc");
        writer.write(&batch).expect("write");
        writer.finish().expect("finish");
        drop(writer);
        bytes
    }

    fn ranges(stored: &SeqRanges) -> Vec<(String, Vec<(u64, u64)>)> {
        stored
            .streams
            .iter()
            .map(|s| {
                (
                    s.stream.clone(),
                    s.ranges.iter().map(|r| (r.first, r.last)).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn seq_sets_merge_touching_ranges_and_round_trip_as_text() {
        let mut set = SeqSet::default();
        for seq in [5, 1, 2, 3, 9, 4, 11, 10] {
            set.insert(seq);
        }
        assert_eq!(set.to_text(), "1-5,9-11");
        assert!(set.contains(4) && set.contains(9) && !set.contains(6) && !set.contains(12));
        assert_eq!(set.within(3, 10), vec![(3, 5), (9, 9)]);
        assert_eq!(SeqSet::parse("1-5,9-11"), Some(set));
        assert_eq!(SeqSet::parse("5-1"), None);
        assert_eq!(SeqSet::parse("x"), None);
    }

    #[test]
    fn batches_are_stored_once_and_survive_a_restart() {
        let dir = tempfile::tempdir().expect("dir");
        let options = ResultOptions {
            flush_after: Duration::ZERO,
            ..ResultOptions::default()
        };
        {
            let store = ResultStore::open(dir.path(), options).expect("open");
            assert_eq!(
                store.receive("g1", "plant1-a", "rms", 0, &ipc(0, 3)).ok(),
                Some(Received::Buffered)
            );
            assert_eq!(
                store.receive("g1", "plant1-a", "rms", 0, &ipc(0, 3)).ok(),
                Some(Received::Duplicate { stored: false })
            );
            store
                .receive("g1", "plant1-a", "rms", 1, &ipc(3, 2))
                .expect("receive");
            let stored = store.flush("g1", false).expect("flush");
            assert_eq!(ranges(&stored), vec![("rms".to_owned(), vec![(0, 1)])]);
            assert!(!store.has_buffered("g1"));
            assert_eq!(store.counters.duplicates.load(Ordering::Relaxed), 1);
        }
        let store = ResultStore::open(dir.path(), options).expect("reopen");
        assert_eq!(
            store.receive("g1", "plant1-a", "rms", 1, &ipc(3, 2)).ok(),
            Some(Received::Duplicate { stored: true })
        );
        // Another gateway's sequence numbers are its own.
        assert_eq!(
            store.receive("g2", "plant1-b", "rms", 1, &ipc(3, 2)).ok(),
            Some(Received::Buffered)
        );
        let holding = StreamHolding {
            stream: "rms".into(),
            first_pending: 1,
            next_seq: 5,
        };
        assert_eq!(
            ranges(&store.stored_within("g1", &[holding])),
            vec![("rms".to_owned(), vec![(1, 1)])]
        );
        assert_eq!(
            store.gateway_streams("g1"),
            vec![StoredStream {
                stream: "rms".into(),
                last_stored_seq: Some(1),
                duplicates: 1
            }]
        );
    }

    #[test]
    fn stored_results_are_queryable_and_only_reading_is_allowed() {
        let dir = tempfile::tempdir().expect("dir");
        let options = ResultOptions {
            flush_after: Duration::ZERO,
            ..ResultOptions::default()
        };
        let store = ResultStore::open(dir.path(), options).expect("open");
        store
            .receive("g1", "plant1-a", "rms", 0, &ipc(0, 3))
            .expect("receive");
        store
            .receive("g2", "plant1-b", "rms", 0, &ipc(10, 2))
            .expect("receive");
        store.flush("g1", true).expect("flush");
        store.flush("g2", true).expect("flush");
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let batches = runtime
            .block_on(store.query(
                "SELECT gateway, count(*) AS rows, sum(n) AS total FROM rms GROUP BY gateway ORDER BY gateway",
            ))
            .expect("query");
        let text = arrow::util::pretty::pretty_format_batches(&batches)
            .expect("format")
            .to_string();
        assert!(text.contains("| plant1-a | 3    | 3     |"), "{text}");
        assert!(text.contains("| plant1-b | 2    | 21    |"), "{text}");
        let refused = runtime
            .block_on(store.query("CREATE EXTERNAL TABLE x STORED AS CSV LOCATION '/etc/passwd'"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            refused.contains("not supported") || refused.contains("DDL"),
            "{refused}"
        );
        let unknown = runtime
            .block_on(store.query("SELECT * FROM nope"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(unknown.contains("streams: rms"), "{unknown}");
    }

    #[test]
    fn garbage_and_bad_stream_names_are_refused_without_a_trace() {
        let dir = tempfile::tempdir().expect("dir");
        let store = ResultStore::open(dir.path(), ResultOptions::default()).expect("open");
        assert!(store.receive("g1", "a", "rms", 0, b"not arrow").is_err());
        assert!(store.receive("g1", "a", "../etc", 0, &ipc(0, 1)).is_err());
        assert!(!store.has_buffered("g1"));
        assert_eq!(store.counters.rejected.load(Ordering::Relaxed), 1);
    }
}
