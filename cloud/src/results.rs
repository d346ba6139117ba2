//! Results the gateways uplink: stored once, as Parquet, and queryable with SQL.
//!
//! ```text
//!  <location>/<stream>/date=2026-12-02/<gateway-id>-<first>-<last>-<n>.parquet
//!     each file: rows of one gateway and stream, a `gateway` column added in front,
//!     key-value metadata weir.gateway = id, weir.seqs = "41-57,60-61"
//! ```
//!
//! The location is a directory of the cloud's disk (`<data>/results` by default) or, to
//! scale out, a bucket of an object store with the S3 API (AWS S3, MinIO, ...), through the
//! `object_store` crate that DataFusion reads with too.
//!
//! A batch is identified by (gateway, stream, sequence number). The store keeps, per gateway
//! and stream, the set of sequence numbers it holds, and drops (and counts) any batch it has
//! seen. Batches are buffered per gateway and stream and written as one file once there are
//! enough rows or the oldest waited long enough; only then are they acknowledged, so an
//! acknowledged batch is stored: an object store puts a whole object or nothing, and on a
//! local disk the file is written under a temporary name, renamed and synced. The files are
//! the truth: at start the store reads each file's footer to learn
//! what it holds, and a crash between writing and acknowledging only means the gateway sends
//! the batches again and they are dropped as duplicates.
//!
//! `weir query` runs SQL with DataFusion over every stream, one table per stream, with `date`
//! as a partition column so a `WHERE date = '...'` reads only that day.

use std::collections::{BTreeMap, HashMap};
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
use futures::TryStreamExt as _;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt as _};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::{KeyValue, ParquetMetaDataReader};
use parquet::file::properties::WriterProperties;
use url::Url;
use weir_proto::cloud::{SeqRange, SeqRanges, StreamHolding, StreamRanges};

use crate::error::{CloudError, Result};

const SEQS_KEY: &str = "weir.seqs";
const GATEWAY_KEY: &str = "weir.gateway";

/// Where results are stored: a directory of the cloud's disk, or a bucket (and prefix) of
/// an object store with the S3 API.
#[derive(Clone)]
pub struct ResultLocation {
    store: Arc<dyn ObjectStore>,
    /// What DataFusion finds `store` under: `file:///` or `s3://bucket/`.
    base: Url,
    /// Where in `store` the streams are.
    prefix: ObjectPath,
    /// The directory, when on local disk: written files are synced there.
    local: Option<PathBuf>,
}

impl std::fmt::Debug for ResultLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl ResultLocation {
    /// A directory on the cloud's disk, created if missing.
    pub fn local(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(CloudError::io(format!(
            "creating the results directory {}",
            dir.display()
        )))?;
        let dir = dir.canonicalize().map_err(CloudError::io(format!(
            "resolving the results directory {}",
            dir.display()
        )))?;
        let prefix = ObjectPath::from_filesystem_path(&dir).map_err(|e| {
            CloudError::Invalid(format!("results directory {}: {e}", dir.display()))
        })?;
        Ok(Self {
            store: Arc::new(LocalFileSystem::new()),
            base: Url::parse("file:///").map_err(|e| CloudError::Invalid(e.to_string()))?,
            prefix,
            local: Some(dir),
        })
    }

    /// `s3://bucket[/prefix]`, with credentials, region and endpoint from the standard AWS
    /// environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`;
    /// for MinIO and other S3-compatible stores `AWS_ENDPOINT` and, over plain HTTP,
    /// `AWS_ALLOW_HTTP=true`). Anything else is a local directory.
    pub fn parse(location: &str) -> Result<Self> {
        let Some(rest) = location.strip_prefix("s3://") else {
            return Self::local(Path::new(location));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(CloudError::Invalid(format!(
                "results location '{location}': no bucket; use s3://bucket/prefix"
            )));
        }
        let store = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .build()
            .map_err(|e| CloudError::Invalid(format!("results location '{location}': {e}")))?;
        let base = Url::parse(&format!("s3://{bucket}/"))
            .map_err(|e| CloudError::Invalid(format!("results location '{location}': {e}")))?;
        Ok(Self {
            store: Arc::new(store),
            base,
            prefix: ObjectPath::from(prefix.trim_matches('/')),
            local: None,
        })
    }

    /// For logs: the directory or `s3://bucket/prefix`.
    pub fn describe(&self) -> String {
        match &self.local {
            Some(dir) => dir.display().to_string(),
            None => format!("{}{}", self.base, self.prefix),
        }
    }

    fn path(&self, parts: &[&str]) -> ObjectPath {
        parts
            .iter()
            .fold(self.prefix.clone(), |path, part| path.join(*part))
    }

    /// The URL of a stream's folder, for DataFusion.
    fn table_url(&self, stream: &str) -> String {
        format!("{}{}/", self.base, self.path(&[stream]))
    }
}

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
    /// Held while the buffer is written, so two flushes never write the same batches.
    writing: Arc<tokio::sync::Mutex<()>>,
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
    location: ResultLocation,
    options: ResultOptions,
    streams: Mutex<HashMap<Key, Arc<Mutex<StreamState>>>>,
    /// Per stream, the schema of all its files together: known from the footers read at
    /// start and from each file written, so a query does not read every footer again.
    schemas: Mutex<HashMap<String, SchemaRef>>,
    pub counters: ResultCounters,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ResultStore {
    /// Opens the store at `location`, learning what it holds from the files' footers.
    pub async fn open(location: ResultLocation, options: ResultOptions) -> Result<Self> {
        let store = Self {
            location,
            options,
            streams: Mutex::default(),
            schemas: Mutex::default(),
            counters: ResultCounters::default(),
        };
        let mut files = 0;
        for (stream, object) in store.files().await? {
            match store.read_footer(&object).await {
                Ok((gateway, seqs, schema)) => {
                    store.learn_schema(&stream, &schema);
                    let state = store.state(&gateway, &stream);
                    let mut state = lock(&state);
                    for (s, e) in seqs.ranges() {
                        state.stored.insert_range(s, e);
                    }
                    files += 1;
                }
                Err(error) => {
                    tracing::warn!(file = %object.location, %error, "not a results file; ignored")
                }
            }
        }
        store.counters.files.store(files, Ordering::Relaxed);
        tracing::info!(location = %store.location.describe(), files, "results store open");
        Ok(store)
    }

    /// Every (stream, Parquet file) at the location. Anything else (a write that never
    /// finished leaves a temporary file on local disk) is skipped: its batches were not
    /// acknowledged.
    async fn files(&self) -> Result<Vec<(String, object_store::ObjectMeta)>> {
        let prefix = &self.location.prefix;
        let objects: Vec<object_store::ObjectMeta> = self
            .location
            .store
            .list(Some(prefix))
            .try_collect()
            .await
            .map_err(|e| self.storage_error("listing", e))?;
        Ok(objects
            .into_iter()
            .filter_map(|object| {
                let parts: Vec<String> = object
                    .location
                    .prefix_match(prefix)?
                    .map(|part| part.as_ref().to_owned())
                    .collect();
                let [stream, day, name] = parts.as_slice() else {
                    return None;
                };
                (day.starts_with("date=") && name.ends_with(".parquet"))
                    .then(|| (stream.clone(), object))
            })
            .collect())
    }

    /// Widens `stream`'s schema by the columns of a file of it.
    fn learn_schema(&self, stream: &str, file: &Schema) {
        // Without the file's own metadata (its sequence numbers), which differs per file.
        let file = Schema::new(file.fields().clone());
        let mut schemas = lock(&self.schemas);
        let merged = match schemas.get(stream) {
            Some(known) => Schema::try_merge([known.as_ref().clone(), file.clone()]),
            None => Ok(file),
        };
        match merged {
            Ok(merged) => {
                schemas.insert(stream.to_owned(), Arc::new(merged));
            }
            Err(error) => {
                tracing::warn!(%stream, %error, "a results file disagrees on a column's type; its other columns are read as before")
            }
        }
    }

    fn storage_error(&self, what: &str, error: object_store::Error) -> CloudError {
        CloudError::Storage(format!(
            "{what} results at {}: {error}",
            self.location.describe()
        ))
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
    /// buffered for the next try; nothing is acknowledged that is not stored.
    pub async fn flush(&self, gateway_id: &str, force: bool) -> Result<SeqRanges> {
        let due: Vec<(String, Arc<Mutex<StreamState>>)> = lock(&self.streams)
            .iter()
            .filter(|((gateway, _), _)| gateway == gateway_id)
            .map(|((_, stream), state)| (stream.clone(), Arc::clone(state)))
            .collect();
        let mut stored = Vec::new();
        let mut failure = None;
        for (stream, state) in due {
            let writing = Arc::clone(&lock(&state).writing);
            let _writing = writing.lock().await;
            // What is due, taken under the lock; new batches may arrive while it is written.
            let (batches, seqs) = {
                let state = lock(&state);
                let ready = state.rows >= self.options.flush_rows
                    || state
                        .since
                        .is_some_and(|t| t.elapsed() >= self.options.flush_after);
                if state.buffered.is_empty() || !(force || ready) {
                    continue;
                }
                (state.buffer.clone(), state.buffered.clone())
            };
            match self.write_file(gateway_id, &stream, &batches, &seqs).await {
                Ok(rows) => {
                    let mut state = lock(&state);
                    for (s, e) in seqs.ranges() {
                        state.stored.insert_range(s, e);
                    }
                    let buffered = std::mem::take(&mut state.buffered);
                    state.buffered = buffered
                        .ranges()
                        .flat_map(|(s, e)| s..=e)
                        .filter(|seq| !seqs.contains(*seq))
                        .fold(SeqSet::default(), |mut set, seq| {
                            set.insert(seq);
                            set
                        });
                    state.buffer.drain(..batches.len());
                    state.rows = state.buffer.iter().map(RecordBatch::num_rows).sum();
                    state.since = (!state.buffer.is_empty()).then(Instant::now);
                    self.counters.rows.fetch_add(rows as u64, Ordering::Relaxed);
                    self.counters.files.fetch_add(1, Ordering::Relaxed);
                    stored.push(stream_ranges(&stream, seqs.ranges().collect()));
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

    async fn write_file(
        &self,
        gateway_id: &str,
        stream: &str,
        batches: &[RecordBatch],
        seqs: &SeqSet,
    ) -> Result<usize> {
        let day = format!("date={}", chrono::Utc::now().format("%Y-%m-%d"));
        let (first, last) = (
            seqs.ranges().next().map_or(0, |r| r.0),
            seqs.max().unwrap_or(0),
        );
        let unique = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0);
        let name = format!("{gateway_id}-{first:020}-{last:020}-{unique}.parquet");
        let path = self.location.path(&[stream, &day, &name]);
        let (bytes, rows, schema) = write_parquet(gateway_id, batches, seqs)?;
        // Whole or not at all: S3 by its API, the local store by a rename.
        self.location
            .store
            .put(&path, bytes.into())
            .await
            .map_err(|e| self.storage_error("writing", e))?;
        if let Some(dir) = &self.location.local {
            let day_dir = dir.join(stream).join(&day);
            let synced = std::fs::File::open(day_dir.join(&name))
                .and_then(|f| f.sync_all())
                .and_then(|()| std::fs::File::open(&day_dir)?.sync_all());
            synced.map_err(CloudError::io(format!("syncing {}", day_dir.display())))?;
        }
        self.learn_schema(stream, &schema);
        Ok(rows)
    }

    /// Names of the streams with stored results: the tables of [`Self::query`].
    pub async fn tables(&self) -> Result<Vec<String>> {
        let listing = self
            .location
            .store
            .list_with_delimiter(Some(&self.location.prefix))
            .await
            .map_err(|e| self.storage_error("listing", e))?;
        let mut names: Vec<String> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_owned))
            .filter(|n| check_stream(n).is_ok())
            .collect();
        names.sort();
        Ok(names)
    }

    /// Reads a file's footer: the gateway and sequence numbers it holds.
    async fn read_footer(
        &self,
        object: &object_store::ObjectMeta,
    ) -> std::result::Result<(String, SeqSet, Schema), String> {
        // A Parquet file ends with its footer, the footer's length (4 bytes LE) and "PAR1".
        let store = &self.location.store;
        let size = object.size;
        if size < 12 {
            return Err("too short for Parquet".into());
        }
        let tail = store
            .get_range(&object.location, size - 8..size)
            .await
            .map_err(|e| e.to_string())?;
        if &tail[4..] != b"PAR1" {
            return Err("no Parquet footer".into());
        }
        let length = u64::from(u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]));
        let start = (size - 8)
            .checked_sub(length)
            .ok_or("the footer length exceeds the file")?;
        let footer = store
            .get_range(&object.location, start..size - 8)
            .await
            .map_err(|e| e.to_string())?;
        let metadata =
            ParquetMetaDataReader::decode_metadata(&footer).map_err(|e| e.to_string())?;
        let pairs = metadata.file_metadata().key_value_metadata();
        let value = |key: &str| {
            pairs
                .and_then(|kv| kv.iter().find(|k| k.key == key))
                .and_then(|k| k.value.clone())
        };
        let gateway = value(GATEWAY_KEY).ok_or("no weir.gateway metadata")?;
        let seqs = value(SEQS_KEY)
            .and_then(|text| SeqSet::parse(&text))
            .ok_or("no readable weir.seqs metadata")?;
        let schema =
            parquet::arrow::parquet_to_arrow_schema(metadata.file_metadata().schema_descr(), pairs)
                .map_err(|e| e.to_string())?;
        Ok((gateway, seqs, schema))
    }

    /// Runs a read-only SQL query over the stored results.
    pub async fn query(&self, sql: &str) -> Result<Vec<RecordBatch>> {
        let context = SessionContext::new();
        context.register_object_store(&self.location.base, Arc::clone(&self.location.store));
        let tables = self.tables().await?;
        for table in &tables {
            let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
                .with_file_extension(".parquet")
                .with_table_partition_cols(vec![("date".to_owned(), DataType::Utf8)]);
            let path = self.location.table_url(table);
            // Known from the footers; `None` (files another tool put there) lets DataFusion
            // infer it.
            let schema = lock(&self.schemas).get(table).cloned();
            context
                .register_listing_table(table.as_str(), path, options, schema, None)
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

/// `batches` (one schema or compatible ones) as one Parquet file, and its rows.
fn write_parquet(
    gateway_id: &str,
    batches: &[RecordBatch],
    seqs: &SeqSet,
) -> Result<(Vec<u8>, usize, Schema)> {
    let schema: SchemaRef = merged_schema(batches)?;
    let properties = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_key_value_metadata(Some(vec![
            KeyValue::new(SEQS_KEY.to_owned(), seqs.to_text()),
            KeyValue::new(GATEWAY_KEY.to_owned(), gateway_id.to_owned()),
        ]))
        .build();
    let parquet_error =
        |e: parquet::errors::ParquetError| CloudError::Storage(format!("encoding Parquet: {e}"));
    let mut writer = ArrowWriter::try_new(Vec::new(), Arc::clone(&schema), Some(properties))
        .map_err(parquet_error)?;
    let mut rows = 0;
    for batch in batches {
        let batch = conform(batch, &schema)?;
        rows += batch.num_rows();
        writer.write(&batch).map_err(parquet_error)?;
    }
    let bytes = writer.into_inner().map_err(parquet_error)?;
    Ok((bytes, rows, schema.as_ref().clone()))
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

#[cfg(test)]
mod tests {
    use arrow::array::{Float64Array, Int64Array};

    use super::*;

    fn local(dir: &Path) -> ResultLocation {
        ResultLocation::local(dir).expect("results directory")
    }

    /// Options that write every buffer at the next flush.
    fn flush_at_once() -> ResultOptions {
        ResultOptions {
            flush_after: Duration::ZERO,
            ..ResultOptions::default()
        }
    }

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
        ipc_of(&batch)
    }

    fn ipc_of(batch: &RecordBatch) -> Vec<u8> {
        let mut bytes = Vec::new();
        let mut writer =
            arrow::ipc::writer::StreamWriter::try_new(&mut bytes, &batch.schema()).expect("ipc");
        writer.write(batch).expect("write");
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

    #[tokio::test]
    async fn batches_are_stored_once_and_survive_a_restart() {
        let dir = tempfile::tempdir().expect("dir");
        let options = flush_at_once();
        {
            let store = ResultStore::open(local(dir.path()), options)
                .await
                .expect("open");
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
            let stored = store.flush("g1", false).await.expect("flush");
            assert_eq!(ranges(&stored), vec![("rms".to_owned(), vec![(0, 1)])]);
            assert!(!store.has_buffered("g1"));
            assert_eq!(store.counters.duplicates.load(Ordering::Relaxed), 1);
        }
        let store = ResultStore::open(local(dir.path()), options)
            .await
            .expect("reopen");
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

    #[tokio::test]
    async fn stored_results_are_queryable_and_only_reading_is_allowed() {
        let dir = tempfile::tempdir().expect("dir");
        let options = flush_at_once();
        let store = ResultStore::open(local(dir.path()), options)
            .await
            .expect("open");
        store
            .receive("g1", "plant1-a", "rms", 0, &ipc(0, 3))
            .expect("receive");
        store
            .receive("g2", "plant1-b", "rms", 0, &ipc(10, 2))
            .expect("receive");
        store.flush("g1", true).await.expect("flush");
        store.flush("g2", true).await.expect("flush");
        let batches = store.query(
                "SELECT gateway, count(*) AS rows, sum(n) AS total FROM rms GROUP BY gateway ORDER BY gateway",
            )
            .await
            .expect("query");
        let text = arrow::util::pretty::pretty_format_batches(&batches)
            .expect("format")
            .to_string();
        assert!(text.contains("| plant1-a | 3    | 3     |"), "{text}");
        assert!(text.contains("| plant1-b | 2    | 21    |"), "{text}");
        let refused = store
            .query("CREATE EXTERNAL TABLE x STORED AS CSV LOCATION '/etc/passwd'")
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            refused.contains("not supported") || refused.contains("DDL"),
            "{refused}"
        );
        let unknown = store
            .query("SELECT * FROM nope")
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(unknown.contains("streams: rms"), "{unknown}");
    }

    #[tokio::test]
    async fn a_column_added_by_a_new_version_is_queryable_before_and_after_a_restart() {
        let dir = tempfile::tempdir().expect("dir");
        let options = flush_at_once();
        let with_peak = ipc_of(
            &RecordBatch::try_from_iter(vec![
                ("n", Arc::new(Int64Array::from(vec![7])) as ArrayRef),
                ("peak", Arc::new(Float64Array::from(vec![9.5])) as ArrayRef),
            ])
            .expect("batch"),
        );
        let sql = "SELECT n, peak FROM rms ORDER BY n";
        {
            let store = ResultStore::open(local(dir.path()), options)
                .await
                .expect("open");
            store.receive("g1", "a", "rms", 0, &ipc(0, 2)).expect("v1");
            store.flush("g1", true).await.expect("flush");
            store.receive("g1", "a", "rms", 1, &with_peak).expect("v2");
            store.flush("g1", true).await.expect("flush");
            let text =
                arrow::util::pretty::pretty_format_batches(&store.query(sql).await.expect("query"))
                    .expect("format")
                    .to_string();
            assert!(
                text.contains("| 0 |      |") && text.contains("| 7 | 9.5  |"),
                "{text}"
            );
        }
        let store = ResultStore::open(local(dir.path()), options)
            .await
            .expect("reopen");
        let text =
            arrow::util::pretty::pretty_format_batches(&store.query(sql).await.expect("query"))
                .expect("format")
                .to_string();
        assert!(text.contains("| 7 | 9.5  |"), "{text}");
    }

    #[tokio::test]
    async fn garbage_and_bad_stream_names_are_refused_without_a_trace() {
        let dir = tempfile::tempdir().expect("dir");
        let store = ResultStore::open(local(dir.path()), ResultOptions::default())
            .await
            .expect("open");
        assert!(store.receive("g1", "a", "rms", 0, b"not arrow").is_err());
        assert!(store.receive("g1", "a", "../etc", 0, &ipc(0, 1)).is_err());
        assert!(!store.has_buffered("g1"));
        assert_eq!(store.counters.rejected.load(Ordering::Relaxed), 1);
    }
}
