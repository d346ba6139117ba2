//! Event-time window aggregation: `GROUP BY key, window_start, window_end` over
//! `TUMBLE(...)` or `HOP(...)`.
//!
//! Each open window holds one DataFusion `GroupsAccumulator` per aggregate, so per-key state is
//! columnar (one slot per group in each accumulator, never a list of rows) and every DataFusion
//! aggregate works, including user-defined ones. Keys are encoded with the Arrow row format,
//! once per run of consecutive rows with equal keys (a block of samples, a device's burst);
//! a hash map from encoded key to group index is the only per-key structure. The most common
//! aggregates (`count`, and `sum`, `avg`, `min`, `max` of `DOUBLE`) use accumulators of
//! [`runs`] that take such a run in one step, with the same results as DataFusion's.
//!
//! A window `[start, end)` is emitted when the watermark reaches `end`. A row whose every
//! window has already been emitted is late: it is counted in [`Collector::late_rows`] and
//! dropped. Rows with a NULL event time are counted in [`Collector::invalid_rows`] and dropped.

use std::collections::{BTreeMap, HashMap};
use std::io::Cursor;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, RecordBatch, RecordBatchOptions,
    TimestampNanosecondArray, UInt32Array,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use arrow::row::{RowConverter, Rows, SortField};
use datafusion::logical_expr::{EmitTo, GroupsAccumulator};
use datafusion::physical_expr::GroupsAccumulatorAdapter;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;
use serde::{Deserialize, Serialize};

use self::runs::{RunAccumulator, RunKind};
use crate::error::{OperatorError, Result};
use crate::{Collector, EventTime, Operator, Watermark};

mod runs;

/// Upper bound on `size / slide` for hop windows: each row is added to that many windows.
pub const MAX_WINDOWS_PER_ROW: i64 = 10_000;

/// How rows are assigned to windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowKind {
    /// Fixed, non-overlapping windows of `size` nanoseconds aligned to the epoch.
    Tumble { size: i64 },
    /// Windows of `size` nanoseconds starting every `slide` nanoseconds; a row belongs to
    /// `size / slide` windows.
    Hop { size: i64, slide: i64 },
}

impl WindowKind {
    pub fn validate(&self) -> Result<()> {
        match *self {
            WindowKind::Tumble { size } if size <= 0 => {
                Err(OperatorError::plan("window size must be positive"))
            }
            WindowKind::Hop { size, slide } if size <= 0 || slide <= 0 => Err(OperatorError::plan(
                "window size and slide must be positive",
            )),
            WindowKind::Hop { size, slide } if slide > size => Err(OperatorError::plan(
                "hop slide must not exceed the window size",
            )),
            WindowKind::Hop { size, slide } if size / slide > MAX_WINDOWS_PER_ROW => {
                Err(OperatorError::plan(format!(
                    "a hop window may overlap at most {MAX_WINDOWS_PER_ROW} others (size / slide)"
                )))
            }
            _ => Ok(()),
        }
    }

    fn size(&self) -> i64 {
        match *self {
            WindowKind::Tumble { size } | WindowKind::Hop { size, .. } => size,
        }
    }

    fn slide(&self) -> i64 {
        match *self {
            WindowKind::Tumble { size } => size,
            WindowKind::Hop { slide, .. } => slide,
        }
    }

    /// Start of the last window that contains `ts`; `None` for times so close to the
    /// minimum that the window start is not representable.
    fn last_start(&self, ts: EventTime) -> Option<EventTime> {
        ts.checked_sub(ts.rem_euclid(self.slide()))
    }
}

/// One column of the aggregate's output, in the order SQL's GROUP BY produces them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputColumn {
    /// The n-th grouping key.
    Key(usize),
    WindowStart,
    WindowEnd,
    /// The n-th aggregate.
    Aggregate(usize),
}

/// An aggregate call ready to run: the DataFusion aggregate, the expressions that feed it
/// (arguments, then ORDER BY keys for order-sensitive aggregates) and its FILTER clause.
pub struct AggregateCall {
    pub function: Arc<AggregateFunctionExpr>,
    pub inputs: Vec<Arc<dyn PhysicalExpr>>,
    pub filter: Option<Arc<dyn PhysicalExpr>>,
}

impl AggregateCall {
    /// The accumulator for this call: one of [`runs`] when `run_kind` says it can be.
    fn new_accumulator(&self, run_kind: Option<RunKind>) -> Result<WindowAccumulator> {
        if let Some(kind) = run_kind {
            Ok(WindowAccumulator::Runs(RunAccumulator::new(kind)))
        } else if self.function.groups_accumulator_supported() {
            Ok(WindowAccumulator::Rows(
                self.function.create_groups_accumulator()?,
            ))
        } else {
            let function = Arc::clone(&self.function);
            Ok(WindowAccumulator::Rows(Box::new(
                GroupsAccumulatorAdapter::new(move || function.create_accumulator()),
            )))
        }
    }

    /// Whether the call can use an accumulator of [`runs`]: one of its aggregates, with one
    /// argument of a type it takes and no FILTER.
    fn run_kind(&self, input_schema: &Schema) -> Option<RunKind> {
        let [input] = self.inputs.as_slice() else {
            return None;
        };
        let input_type = input.data_type(input_schema).ok()?;
        self.filter
            .is_none()
            .then(|| RunKind::of(&self.function, &input_type))
            .flatten()
    }
}

/// One aggregate's state in one window.
enum WindowAccumulator {
    /// Takes runs of rows of one group at once.
    Runs(RunAccumulator),
    /// Any DataFusion aggregate: a group index per row.
    Rows(Box<dyn GroupsAccumulator>),
}

impl WindowAccumulator {
    fn groups(&mut self) -> &mut dyn GroupsAccumulator {
        match self {
            Self::Runs(runs) => runs,
            Self::Rows(rows) => rows.as_mut(),
        }
    }
}

/// The state of one open window.
struct OpenWindow {
    /// Encoded group keys, in group-index order.
    keys: Rows,
    /// Seeded per process, so keys from the outside cannot be chosen to collide.
    index: HashMap<Box<[u8]>, usize, foldhash::fast::RandomState>,
    accumulators: Vec<WindowAccumulator>,
}

impl OpenWindow {
    fn group_count(&self) -> usize {
        self.keys.num_rows()
    }

    /// The group index of `key`, adding the group if the window has not seen it.
    fn group_of(&mut self, key: arrow::row::Row<'_>) -> usize {
        match self.index.get(key.as_ref()) {
            Some(&group) => group,
            None => {
                let group = self.keys.num_rows();
                self.keys.push(key);
                self.index.insert(key.as_ref().into(), group);
                group
            }
        }
    }
}

pub struct WindowAggregate {
    kind: WindowKind,
    time_column: usize,
    keys: Vec<Arc<dyn PhysicalExpr>>,
    aggregates: Vec<AggregateCall>,
    /// Per aggregate, whether it uses an accumulator of [`runs`].
    run_kinds: Vec<Option<RunKind>>,
    /// Whether an aggregate takes a group index per row even where a batch comes in runs.
    needs_row_groups: bool,
    outputs: Vec<OutputColumn>,
    schema: SchemaRef,
    converter: RowConverter,
    /// Key columns in the row format: the grouping keys, or one constant column when the
    /// GROUP BY has no key besides the window, so every row lands in group 0.
    key_width: usize,
    /// Open windows by start time; BTreeMap so windows close in event-time order.
    open: BTreeMap<EventTime, OpenWindow>,
    watermark: Watermark,
    /// Reused per batch: the group index of each row in the window being updated.
    group_indices: Vec<usize>,
    /// Reused per batch: the group index of each run of equal keys.
    run_groups: Vec<usize>,
}

impl WindowAggregate {
    /// `input_schema` is the schema of incoming batches, `time_column` the index of its
    /// `Timestamp(Nanosecond)` event-time column. `key_types` are the data types of `keys`.
    pub fn try_new(
        kind: WindowKind,
        input_schema: &Schema,
        time_column: usize,
        keys: Vec<Arc<dyn PhysicalExpr>>,
        aggregates: Vec<AggregateCall>,
        outputs: Vec<OutputColumn>,
        schema: SchemaRef,
    ) -> Result<Self> {
        kind.validate()?;
        let time_type = input_schema.field(time_column).data_type();
        if time_type != &DataType::Timestamp(TimeUnit::Nanosecond, None) {
            return Err(OperatorError::plan(format!(
                "event-time column must be Timestamp(Nanosecond), not {time_type}"
            )));
        }
        if outputs.len() != schema.fields().len() {
            return Err(OperatorError::plan(format!(
                "window aggregate declares {} outputs for {} schema fields",
                outputs.len(),
                schema.fields().len()
            )));
        }
        let mut key_fields = keys
            .iter()
            .map(|key| Ok(SortField::new(key.data_type(input_schema)?)))
            .collect::<Result<Vec<_>>>()?;
        if key_fields.is_empty() {
            key_fields.push(SortField::new(DataType::Boolean));
        }
        let key_width = key_fields.len();
        let run_kinds: Vec<Option<RunKind>> = aggregates
            .iter()
            .map(|call| call.run_kind(input_schema))
            .collect();
        Ok(Self {
            kind,
            time_column,
            keys,
            aggregates,
            needs_row_groups: run_kinds.iter().any(Option::is_none),
            run_kinds,
            outputs,
            schema,
            converter: RowConverter::new(key_fields)?,
            key_width,
            open: BTreeMap::new(),
            watermark: Watermark::MIN,
            group_indices: Vec::new(),
            run_groups: Vec::new(),
        })
    }

    fn encode_keys(&self, batch: &RecordBatch) -> Result<BatchKeys> {
        let rows = batch.num_rows();
        if self.keys.is_empty() {
            let constant = [Arc::new(BooleanArray::new_null(1)) as ArrayRef];
            return Ok(BatchKeys {
                keys: self.converter.convert_columns(&constant)?,
                // One run of every row: with no keys, all rows share the one group.
                runs: std::iter::once(0..rows).collect(),
            });
        }
        let columns = self
            .keys
            .iter()
            .map(|key| key.evaluate(batch)?.into_array(rows))
            .collect::<datafusion::error::Result<Vec<_>>>()?;
        let runs = arrow::compute::partition(&columns)?.ranges();
        // Mostly distinct neighbours: encoding every row costs less than picking run starts.
        if runs.len() * 2 > rows {
            return Ok(BatchKeys {
                keys: self.converter.convert_columns(&columns)?,
                runs: (0..rows).map(|row| row..row + 1).collect(),
            });
        }
        let starts = UInt32Array::from_iter_values(runs.iter().map(|run| run.start as u32));
        let firsts = columns
            .iter()
            .map(|column| arrow::compute::take(column, &starts, None))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(BatchKeys {
            keys: self.converter.convert_columns(&firsts)?,
            runs,
        })
    }

    fn open_window(&self) -> Result<OpenWindow> {
        Ok(OpenWindow {
            keys: self.converter.empty_rows(64, 1024),
            index: HashMap::default(),
            accumulators: self
                .aggregates
                .iter()
                .zip(&self.run_kinds)
                .map(|(call, &kind)| call.new_accumulator(kind))
                .collect::<Result<_>>()?,
        })
    }

    /// Whether the window starting at `start` has already been emitted.
    fn is_closed(&self, start: EventTime) -> bool {
        start.saturating_add(self.kind.size()) <= self.watermark.0
    }

    fn emit_window(
        &self,
        start: EventTime,
        mut window: OpenWindow,
        out: &mut Collector,
    ) -> Result<()> {
        let groups = window.group_count();
        if groups == 0 {
            return Ok(());
        }
        let key_columns = self.converter.convert_rows(&window.keys)?;
        let mut aggregate_columns = Vec::with_capacity(window.accumulators.len());
        for accumulator in &mut window.accumulators {
            aggregate_columns.push(accumulator.groups().evaluate(EmitTo::All)?);
        }
        let end = start.saturating_add(self.kind.size());
        let columns = self
            .outputs
            .iter()
            .map(|output| match *output {
                OutputColumn::Key(i) => Arc::clone(&key_columns[i]),
                OutputColumn::Aggregate(i) => Arc::clone(&aggregate_columns[i]),
                OutputColumn::WindowStart => constant_timestamp(start, groups),
                OutputColumn::WindowEnd => constant_timestamp(end, groups),
            })
            .collect::<Vec<_>>();
        let options = RecordBatchOptions::new().with_row_count(Some(groups));
        out.emit(RecordBatch::try_new_with_options(
            Arc::clone(&self.schema),
            columns,
            &options,
        )?);
        Ok(())
    }

    /// The window at `start`, opened if it is not yet.
    fn window_at(&mut self, start: EventTime) -> Result<&mut OpenWindow> {
        if !self.open.contains_key(&start) {
            let window = self.open_window()?;
            self.open.insert(start, window);
        }
        self.open
            .get_mut(&start)
            .ok_or_else(|| OperatorError::plan("window vanished"))
    }

    /// [`Self::assign_groups`] for a batch whose every row falls into the window at `start`:
    /// one lookup per run of equal keys, its group written to `self.run_groups`, and to
    /// `self.group_indices` for each row only if an aggregate needs that.
    fn assign_run_groups(&mut self, start: EventTime, keys: &BatchKeys) -> Result<usize> {
        let rows = keys.runs.last().map_or(0, |run| run.end);
        let per_row = self.needs_row_groups;
        let mut indices = std::mem::take(&mut self.group_indices);
        let mut run_groups = std::mem::take(&mut self.run_groups);
        indices.clear();
        run_groups.clear();
        if per_row {
            indices.resize(rows, 0);
        }
        let window = self.window_at(start)?;
        for (run, rows) in keys.runs.iter().enumerate() {
            let group = window.group_of(keys.keys.row(run));
            run_groups.push(group);
            if per_row {
                indices[rows.clone()].fill(group);
            }
        }
        let groups = window.group_count();
        self.group_indices = indices;
        self.run_groups = run_groups;
        Ok(groups)
    }

    /// Rows of `batch` that fall into the window at `start`, as a mask, with the group index
    /// of each such row written to `self.group_indices`.
    fn assign_groups(
        &mut self,
        start: EventTime,
        times: &TimestampNanosecondArray,
        keys: &BatchKeys,
    ) -> Result<(Option<BooleanArray>, usize)> {
        let size = self.kind.size();
        let mut indices = std::mem::take(&mut self.group_indices);
        let window = self.window_at(start)?;
        indices.clear();
        indices.resize(times.len(), 0);
        let mut mask = Vec::with_capacity(times.len());
        let mut all = true;
        let end = start.saturating_add(size);
        for (run, rows) in keys.runs.iter().enumerate() {
            // The run's group, looked up once its first row falls into this window.
            let mut group = None;
            for row in rows.clone() {
                let inside = times.is_valid(row) && {
                    let ts = times.value(row);
                    ts >= start && ts < end
                };
                mask.push(inside);
                if !inside {
                    all = false;
                    continue;
                }
                indices[row] = *group.get_or_insert_with(|| window.group_of(keys.keys.row(run)));
            }
        }
        let groups = window.group_count();
        self.group_indices = indices;
        Ok(((!all).then(|| BooleanArray::from(mask)), groups))
    }
}

/// The group keys of a batch: `keys` holds one encoded key per run of consecutive rows with
/// equal keys, `runs` the rows of each.
struct BatchKeys {
    keys: Rows,
    runs: Vec<std::ops::Range<usize>>,
}

fn constant_timestamp(value: EventTime, len: usize) -> ArrayRef {
    Arc::new(TimestampNanosecondArray::from_value(value, len))
}

fn and_masks(a: Option<BooleanArray>, b: Option<&BooleanArray>) -> Result<Option<BooleanArray>> {
    Ok(match (a, b) {
        (None, None) => None,
        (Some(a), None) => Some(a),
        (None, Some(b)) => Some(b.clone()),
        (Some(a), Some(b)) => Some(arrow::compute::and(&a, b)?),
    })
}

impl Operator for WindowAggregate {
    fn name(&self) -> &str {
        "window_aggregate"
    }

    /// Windows start at multiples of the slide and end a size later: every end is a
    /// multiple of the two's greatest common divisor.
    fn emits_every(&self) -> Option<i64> {
        Some(crate::gcd(self.kind.size(), self.kind.slide()))
    }

    fn output_schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn process_batch(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<()> {
        let rows = batch.num_rows();
        if rows == 0 {
            return Ok(());
        }
        let times = batch
            .column(self.time_column)
            .as_primitive_opt::<arrow::datatypes::TimestampNanosecondType>()
            .ok_or_else(|| OperatorError::plan("event-time column is not Timestamp(Nanosecond)"))?
            .clone();

        // Which windows does this batch touch? Usually one or two, so a sorted small vec.
        // Counts stay local until the batch has been applied: a batch that fails is retried
        // in parts (see `process_isolating`) and must not be counted twice.
        let size = self.kind.size();
        let slide = self.kind.slide();
        let mut starts: Vec<EventTime> = Vec::new();
        let mut late = 0u64;
        let mut invalid = times.null_count() as u64;
        // Rows of one slide interval share their windows when the size is a whole number of
        // slides (always, for tumbling windows): consecutive rows usually do, so the interval
        // of the previous row answers without a division.
        let uniform = size % slide == 0;
        // When the earliest and the latest row share a slide interval, so do all rows between,
        // and the first row settles the whole batch (a block of samples usually does).
        let one_interval = match (uniform, times.null_count(), times.values().first()) {
            (true, 0, Some(&first)) => {
                let (earliest, latest) = times
                    .values()
                    .iter()
                    .fold((first, first), |(lo, hi), &t| (lo.min(t), hi.max(t)));
                let interval = self.kind.last_start(earliest);
                (interval.is_some() && interval == self.kind.last_start(latest)).then_some(earliest)
            }
            _ => None,
        };
        let mut same = (EventTime::MAX, EventTime::MIN, false);
        // How many slide intervals the rows fall into, counted up to two: with one (and every
        // row valid), every row is inside every window the batch touches.
        let mut intervals = 0;
        let mut visit = |ts: EventTime| {
            if uniform && ts >= same.0 && ts < same.1 {
                if !same.2 {
                    late += 1;
                }
                return;
            }
            intervals = 2.min(intervals + 1);
            let Some(last) = self.kind.last_start(ts) else {
                invalid += 1;
                return;
            };
            let mut start = last;
            let mut any_open = false;
            while start > ts.saturating_sub(size) {
                if !self.is_closed(start) {
                    any_open = true;
                    if let Err(at) = starts.binary_search(&start) {
                        starts.insert(at, start);
                    }
                }
                match start.checked_sub(slide) {
                    Some(previous) => start = previous,
                    None => break,
                }
            }
            if !any_open {
                late += 1;
            }
            same = (last, last.saturating_add(slide), any_open);
        };
        if let Some(earliest) = one_interval {
            visit(earliest);
        } else if times.null_count() == 0 {
            times.values().iter().copied().for_each(&mut visit);
        } else {
            times.iter().flatten().for_each(&mut visit);
        }
        if one_interval.is_some() && late > 0 {
            // Its windows are all closed: every row of the batch is late, not just the first.
            late = rows as u64;
        }
        let every_row_inside = uniform && intervals == 1 && invalid == 0 && late == 0;
        if starts.is_empty() {
            out.late_rows += late;
            out.invalid_rows += invalid;
            return Ok(());
        }

        // Evaluate everything before touching state, so an evaluation error leaves the
        // operator exactly as it was.
        let keys = self.encode_keys(&batch)?;
        let mut inputs = Vec::with_capacity(self.aggregates.len());
        let mut filters = Vec::with_capacity(self.aggregates.len());
        for call in &self.aggregates {
            let values = call
                .inputs
                .iter()
                .map(|input| input.evaluate(&batch)?.into_array(rows))
                .collect::<datafusion::error::Result<Vec<_>>>()?;
            inputs.push(values);
            let filter = match &call.filter {
                Some(filter) => Some(
                    filter
                        .evaluate(&batch)?
                        .into_array(rows)?
                        .as_boolean()
                        .clone(),
                ),
                None => None,
            };
            filters.push(filter);
        }

        for start in starts {
            let (mask, groups) = if every_row_inside {
                (None, self.assign_run_groups(start, &keys)?)
            } else {
                self.assign_groups(start, &times, &keys)?
            };
            let window = self
                .open
                .get_mut(&start)
                .ok_or_else(|| OperatorError::plan("window vanished"))?;
            for (i, accumulator) in window.accumulators.iter_mut().enumerate() {
                let updated = match accumulator {
                    WindowAccumulator::Runs(runs) if every_row_inside => {
                        runs.update_runs(&inputs[i][0], &keys.runs, &self.run_groups, groups)
                    }
                    accumulator => {
                        let mask = and_masks(mask.clone(), filters[i].as_ref())?;
                        accumulator.groups().update_batch(
                            &inputs[i],
                            &self.group_indices,
                            mask.as_ref(),
                            groups,
                        )
                    }
                };
                updated.map_err(|e| {
                    OperatorError::Internal(format!("aggregate update failed midway: {e}"))
                })?;
            }
        }
        out.late_rows += late;
        out.invalid_rows += invalid;
        Ok(())
    }

    fn on_watermark(&mut self, watermark: Watermark, out: &mut Collector) -> Result<()> {
        if watermark <= self.watermark {
            return Ok(());
        }
        self.watermark = watermark;
        let size = self.kind.size();
        while let Some(entry) = self.open.first_entry() {
            if entry.key().saturating_add(size) > watermark.0 {
                break;
            }
            let (start, window) = entry.remove_entry();
            self.emit_window(start, window, out)?;
        }
        Ok(())
    }

    fn snapshot(&mut self) -> Result<Vec<u8>> {
        let mut header = SnapshotHeader {
            watermark: self.watermark.0,
            windows: Vec::with_capacity(self.open.len()),
        };
        let mut batches = Vec::with_capacity(self.open.len());
        for (&start, window) in self.open.iter_mut() {
            let groups = window.keys.num_rows();
            let mut columns = self.converter.convert_rows(&window.keys)?;
            let mut fresh = Vec::with_capacity(window.accumulators.len());
            let calls = self.aggregates.iter().zip(&self.run_kinds);
            for (accumulator, (call, &kind)) in window.accumulators.iter_mut().zip(calls) {
                // `state` drains the accumulator, so the state is merged straight back into
                // a fresh one: the window keeps running as if nothing happened.
                let state = accumulator.groups().state(EmitTo::All)?;
                let mut replacement = call.new_accumulator(kind)?;
                let indices: Vec<usize> = (0..groups).collect();
                replacement.groups().merge_batch(&state, &indices, groups)?;
                fresh.push(replacement);
                columns.extend(state);
            }
            window.accumulators = fresh;
            header.windows.push(WindowHeader { start, groups });
            batches.push(columns);
        }
        let mut bytes = Vec::new();
        let header = serde_json::to_vec(&header)
            .map_err(|e| OperatorError::Restore(format!("cannot encode snapshot header: {e}")))?;
        bytes.extend_from_slice(&(header.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&header);
        for columns in batches {
            let fields = columns
                .iter()
                .enumerate()
                .map(|(i, c)| Field::new(format!("c{i}"), c.data_type().clone(), true))
                .collect::<Vec<_>>();
            let schema = Arc::new(Schema::new(fields));
            let rows = columns.first().map_or(0, |c| c.len());
            let options = RecordBatchOptions::new().with_row_count(Some(rows));
            let batch = RecordBatch::try_new_with_options(Arc::clone(&schema), columns, &options)?;
            let mut encoded = Vec::new();
            {
                let mut writer = StreamWriter::try_new(&mut encoded, &schema)?;
                writer.write(&batch)?;
                writer.finish()?;
            }
            bytes.extend_from_slice(&(encoded.len() as u64).to_le_bytes());
            bytes.extend_from_slice(&encoded);
        }
        Ok(bytes)
    }

    fn restore(&mut self, state: &[u8]) -> Result<()> {
        let mut reader = SnapshotReader { bytes: state };
        let header: SnapshotHeader = serde_json::from_slice(reader.next_chunk()?)
            .map_err(|e| OperatorError::Restore(format!("bad snapshot header: {e}")))?;
        let mut open = BTreeMap::new();
        let key_count = self.key_width;
        for window_header in header.windows {
            let chunk = reader.next_chunk()?;
            let mut stream = StreamReader::try_new(Cursor::new(chunk), None)?;
            let batch = stream
                .next()
                .ok_or_else(|| OperatorError::Restore("window state has no batch".into()))??;
            let groups = batch.num_rows();
            if groups != window_header.groups {
                return Err(OperatorError::Restore("window group count mismatch".into()));
            }
            let mut window = self.open_window()?;
            let key_columns = batch.columns().get(..key_count).ok_or_else(|| {
                OperatorError::Restore("snapshot has fewer key columns than the plan".into())
            })?;
            window.keys = self.converter.convert_columns(key_columns)?;
            for group in 0..groups {
                window
                    .index
                    .insert(window.keys.row(group).as_ref().into(), group);
            }
            let indices: Vec<usize> = (0..groups).collect();
            let mut offset = key_count;
            for (accumulator, call) in window.accumulators.iter_mut().zip(&self.aggregates) {
                let width = call.function.state_fields()?.len();
                let state = batch.columns().get(offset..offset + width).ok_or_else(|| {
                    OperatorError::Restore("snapshot has fewer state columns than the plan".into())
                })?;
                accumulator.groups().merge_batch(state, &indices, groups)?;
                offset += width;
            }
            open.insert(window_header.start, window);
        }
        self.open = open;
        self.watermark = Watermark(header.watermark);
        Ok(())
    }
}

#[derive(Serialize, Deserialize)]
struct SnapshotHeader {
    watermark: EventTime,
    windows: Vec<WindowHeader>,
}

#[derive(Serialize, Deserialize)]
struct WindowHeader {
    start: EventTime,
    groups: usize,
}

struct SnapshotReader<'a> {
    bytes: &'a [u8],
}

impl<'a> SnapshotReader<'a> {
    fn next_chunk(&mut self) -> Result<&'a [u8]> {
        let truncated = || OperatorError::Restore("snapshot is truncated".into());
        let (len, rest) = self.bytes.split_first_chunk::<8>().ok_or_else(truncated)?;
        let len = usize::try_from(u64::from_le_bytes(*len)).map_err(|_| truncated())?;
        if rest.len() < len {
            return Err(truncated());
        }
        let (chunk, rest) = rest.split_at(len);
        self.bytes = rest;
        Ok(chunk)
    }
}

#[cfg(test)]
mod tests {
    use datafusion::functions_aggregate::average::avg_udaf;
    use datafusion::functions_aggregate::count::count_udaf;
    use datafusion::functions_aggregate::sum::sum_udaf;
    use datafusion::logical_expr::AggregateUDF;
    use datafusion::physical_expr::aggregate::AggregateExprBuilder;
    use datafusion::physical_expr::expressions::col;

    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::testing::{batch, pretty, schema};

    const SECOND: i64 = 1_000_000_000;

    fn call(
        function: Arc<AggregateUDF>,
        column: &str,
        input: &SchemaRef,
        alias: &str,
    ) -> AggregateCall {
        let arg = col(column, input).expect("column");
        let function = AggregateExprBuilder::new(function, vec![Arc::clone(&arg)])
            .schema(Arc::clone(input))
            .alias(alias)
            .build()
            .expect("aggregate");
        AggregateCall {
            function: Arc::new(function),
            inputs: vec![arg],
            filter: None,
        }
    }

    /// `sensor, window_start, window_end, sum(v), count(v), avg(v)` over `kind`.
    fn aggregate(kind: WindowKind) -> WindowAggregate {
        let input = schema("sensor:utf8, ts:ts!, v:f64");
        let output =
            schema("sensor:utf8, window_start:ts!, window_end:ts!, total:f64, n:i64!, mean:f64");
        WindowAggregate::try_new(
            kind,
            &input,
            1,
            vec![col("sensor", &input).expect("column")],
            vec![
                call(sum_udaf(), "v", &input, "total"),
                call(count_udaf(), "v", &input, "n"),
                call(avg_udaf(), "v", &input, "mean"),
            ],
            vec![
                OutputColumn::Key(0),
                OutputColumn::WindowStart,
                OutputColumn::WindowEnd,
                OutputColumn::Aggregate(0),
                OutputColumn::Aggregate(1),
                OutputColumn::Aggregate(2),
            ],
            output,
        )
        .expect("valid window aggregate")
    }

    fn rows(json: &str) -> RecordBatch {
        batch(&schema("sensor:utf8, ts:ts!, v:f64"), json)
    }

    fn feed(op: &mut WindowAggregate, json: &str, out: &mut Collector) {
        op.process_batch(rows(json), out).expect("process");
    }

    fn at(seconds: f64) -> Watermark {
        Watermark((seconds * SECOND as f64) as i64)
    }

    #[test]
    fn tumbling_window_is_emitted_only_when_the_watermark_passes_its_end() {
        let mut op = aggregate(WindowKind::Tumble { size: SECOND });
        let mut out = Collector::default();
        feed(
            &mut op,
            r#"
            {"sensor":"a","ts":"1970-01-01T00:00:00.100Z","v":1.0}
            {"sensor":"b","ts":"1970-01-01T00:00:00.200Z","v":10.0}
            {"sensor":"a","ts":"1970-01-01T00:00:00.900Z","v":3.0}
            {"sensor":"a","ts":"1970-01-01T00:00:01.100Z","v":7.0}"#,
            &mut out,
        );
        op.on_watermark(at(0.999), &mut out).expect("watermark");
        assert!(
            out.batches().is_empty(),
            "window [0s, 1s) must stay open before the watermark reaches 1s"
        );
        op.on_watermark(at(1.0), &mut out).expect("watermark");
        assert_eq!(
            pretty(&out.take_batches()),
            "\
+--------+---------------------+---------------------+-------+---+------+
| sensor | window_start        | window_end          | total | n | mean |
+--------+---------------------+---------------------+-------+---+------+
| a      | 1970-01-01T00:00:00 | 1970-01-01T00:00:01 | 4.0   | 2 | 2.0  |
| b      | 1970-01-01T00:00:00 | 1970-01-01T00:00:01 | 10.0  | 1 | 10.0 |
+--------+---------------------+---------------------+-------+---+------+"
        );
        op.on_watermark(Watermark::END, &mut out)
            .expect("watermark");
        assert!(
            pretty(&out.take_batches()).contains(
                "| a      | 1970-01-01T00:00:01 | 1970-01-01T00:00:02 | 7.0   | 1 | 7.0  |"
            )
        );
    }

    #[test]
    fn out_of_order_rows_within_the_delay_count_and_late_rows_are_dropped() {
        let mut op = aggregate(WindowKind::Tumble { size: SECOND });
        let mut out = Collector::default();
        feed(
            &mut op,
            r#"{"sensor":"a","ts":"1970-01-01T00:00:01.500Z","v":1.0}"#,
            &mut out,
        );
        op.on_watermark(at(0.5), &mut out).expect("watermark");
        // Older than the latest row, but its window [0s, 1s) is still open: accepted.
        feed(
            &mut op,
            r#"{"sensor":"a","ts":"1970-01-01T00:00:00.200Z","v":2.0}"#,
            &mut out,
        );
        op.on_watermark(at(1.2), &mut out).expect("watermark");
        assert_eq!(out.late_rows, 0);
        // Window [0s, 1s) has been emitted: this row is late.
        feed(
            &mut op,
            r#"{"sensor":"a","ts":"1970-01-01T00:00:00.300Z","v":100.0}"#,
            &mut out,
        );
        assert_eq!(out.late_rows, 1);
        op.on_watermark(Watermark::END, &mut out)
            .expect("watermark");
        let text = pretty(&out.take_batches());
        assert!(
            text.contains(
                "| a      | 1970-01-01T00:00:00 | 1970-01-01T00:00:01 | 2.0   | 1 | 2.0  |"
            ),
            "{text}"
        );
        assert!(
            !text.contains("100"),
            "the late row must not be aggregated: {text}"
        );
    }

    #[test]
    fn null_values_are_skipped_nan_propagates_and_null_keys_form_a_group() {
        let mut op = aggregate(WindowKind::Tumble { size: SECOND });
        let mut out = Collector::default();
        let input = schema("sensor:utf8, ts:ts!, v:f64");
        let nan_batch = RecordBatch::try_new(
            Arc::clone(&input),
            vec![
                Arc::new(arrow::array::StringArray::from(vec![
                    Some("a"),
                    Some("a"),
                    None,
                    Some("b"),
                ])),
                Arc::new(TimestampNanosecondArray::from(vec![1, 2, 3, 4])),
                Arc::new(arrow::array::Float64Array::from(vec![
                    Some(1.0),
                    None,
                    Some(5.0),
                    Some(f64::NAN),
                ])),
            ],
        )
        .expect("batch");
        op.process_batch(nan_batch, &mut out).expect("process");
        op.on_watermark(Watermark::END, &mut out)
            .expect("watermark");
        assert_eq!(
            pretty(&out.take_batches()),
            "\
+--------+---------------------+---------------------+-------+---+------+
| sensor | window_start        | window_end          | total | n | mean |
+--------+---------------------+---------------------+-------+---+------+
| a      | 1970-01-01T00:00:00 | 1970-01-01T00:00:01 | 1.0   | 1 | 1.0  |
|        | 1970-01-01T00:00:00 | 1970-01-01T00:00:01 | 5.0   | 1 | 5.0  |
| b      | 1970-01-01T00:00:00 | 1970-01-01T00:00:01 | NaN   | 1 | NaN  |
+--------+---------------------+---------------------+-------+---+------+"
        );
    }

    #[test]
    fn null_event_times_are_counted_and_empty_batches_change_nothing() {
        let mut op = aggregate(WindowKind::Tumble { size: SECOND });
        let mut out = Collector::default();
        let input = schema("sensor:utf8, ts:ts, v:f64");
        let with_null_time = RecordBatch::try_new(
            input,
            vec![
                Arc::new(arrow::array::StringArray::from(vec!["a", "a"])),
                Arc::new(TimestampNanosecondArray::from(vec![None, Some(5)])),
                Arc::new(arrow::array::Float64Array::from(vec![1.0, 2.0])),
            ],
        )
        .expect("batch");
        op.process_batch(with_null_time, &mut out).expect("process");
        op.process_batch(
            RecordBatch::new_empty(schema("sensor:utf8, ts:ts!, v:f64")),
            &mut out,
        )
        .expect("empty");
        assert_eq!(out.invalid_rows, 1);
        op.on_watermark(Watermark::END, &mut out)
            .expect("watermark");
        let batches = out.take_batches();
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].num_rows(), 1);
        assert!(
            pretty(&batches).contains(
                "| a      | 1970-01-01T00:00:00 | 1970-01-01T00:00:01 | 2.0   | 1 | 2.0  |"
            )
        );
    }

    /// Runs `kind` over pseudo-random input, keys in runs and interleaved, times out of order
    /// with some rows late, and compares every emitted window with a direct computation.
    /// `dense` packs each batch into tens of milliseconds a second apart, so that most batches
    /// fall inside one slide interval (the common case of a live source) and some straddle two.
    fn matches_a_direct_computation(kind: WindowKind, dense: bool) {
        use arrow::array::{Float64Array, StringArray};
        let input = schema("sensor:utf8, ts:ts!, v:f64");
        let mut op = aggregate(kind);
        let mut out = Collector::default();
        let mut expected: BTreeMap<(EventTime, Option<String>), (f64, i64)> = BTreeMap::new();
        let mut rng = SmallRng::seed_from_u64(0x2545_f491_4f6c_dd1d);
        let mut next = |bound: u64| rng.random_range(0..bound);
        let keys = [Some("a"), Some("b"), Some("c"), None];
        let (size, slide) = (kind.size(), kind.slide());
        let mut watermark = EventTime::MIN;
        let mut clock = 10 * SECOND;
        let step = if dense { 10_000 } else { 1_000_000 };
        for _ in 0..40 {
            if dense {
                clock += SECOND;
            }
            let rows = 1 + next(300) as usize;
            let (mut sensors, mut times, mut values) = (vec![], vec![], vec![]);
            while sensors.len() < rows {
                let key = keys[next(4) as usize];
                for _ in 0..1 + next(12) {
                    clock += next(40) as i64 * step;
                    let ts = clock - next(3_000) as i64 * step;
                    let v = next(100) as f64;
                    sensors.push(key);
                    times.push(ts);
                    values.push(v);
                    let mut start = ts - ts.rem_euclid(slide);
                    while start > ts - size {
                        if start + size > watermark {
                            let slot = expected.entry((start, key.map(str::to_owned))).or_default();
                            slot.0 += v;
                            slot.1 += 1;
                        }
                        start -= slide;
                    }
                }
            }
            let batch = RecordBatch::try_new(
                Arc::clone(&input),
                vec![
                    Arc::new(StringArray::from(sensors)),
                    Arc::new(TimestampNanosecondArray::from(times)),
                    Arc::new(Float64Array::from(values)),
                ],
            )
            .expect("batch");
            op.process_batch(batch, &mut out).expect("process");
            watermark = clock - 2 * SECOND;
            op.on_watermark(Watermark(watermark), &mut out)
                .expect("watermark");
        }
        op.on_watermark(Watermark::END, &mut out)
            .expect("watermark");
        let mut emitted = BTreeMap::new();
        for batch in out.take_batches() {
            let sensors = batch.column(0).as_string::<i32>();
            let starts = batch
                .column(1)
                .as_primitive::<arrow::datatypes::TimestampNanosecondType>();
            let totals = batch
                .column(3)
                .as_primitive::<arrow::datatypes::Float64Type>();
            let counts = batch
                .column(4)
                .as_primitive::<arrow::datatypes::Int64Type>();
            for row in 0..batch.num_rows() {
                let key = sensors.is_valid(row).then(|| sensors.value(row).to_owned());
                let previous = emitted.insert(
                    (starts.value(row), key),
                    (totals.value(row), counts.value(row)),
                );
                assert!(previous.is_none(), "a window group was emitted twice");
            }
        }
        assert!(expected.len() > 50, "the input must span many windows");
        assert_eq!(emitted, expected);
    }

    #[test]
    fn tumbling_windows_match_a_direct_computation() {
        for dense in [false, true] {
            matches_a_direct_computation(WindowKind::Tumble { size: SECOND }, dense);
        }
    }

    #[test]
    fn hopping_windows_match_a_direct_computation_also_when_size_is_not_a_multiple_of_slide() {
        for dense in [false, true] {
            let overlapping = WindowKind::Hop {
                size: 2 * SECOND,
                slide: SECOND / 2,
            };
            matches_a_direct_computation(overlapping, dense);
            let ragged = WindowKind::Hop {
                size: 3 * SECOND,
                slide: 2 * SECOND,
            };
            matches_a_direct_computation(ragged, dense);
        }
    }

    #[test]
    fn every_window_end_is_a_multiple_of_the_period_the_operator_reports() {
        for (kind, period) in [
            (WindowKind::Tumble { size: SECOND }, SECOND),
            (
                WindowKind::Hop {
                    size: 2 * SECOND,
                    slide: SECOND / 2,
                },
                SECOND / 2,
            ),
            (
                WindowKind::Hop {
                    size: 3 * SECOND,
                    slide: 2 * SECOND,
                },
                SECOND,
            ),
        ] {
            let op = aggregate(kind);
            assert_eq!(op.emits_every(), Some(period), "{kind:?}");
            for ts in [-7 * SECOND / 3, 0, SECOND / 3, 41 * SECOND / 10] {
                let start = kind.last_start(ts).expect("start");
                assert_eq!((start + kind.size()).rem_euclid(period), 0, "{kind:?} {ts}");
            }
        }
    }

    #[test]
    fn hopping_windows_count_a_row_in_every_window_that_contains_it() {
        let mut op = aggregate(WindowKind::Hop {
            size: 2 * SECOND,
            slide: SECOND,
        });
        let mut out = Collector::default();
        feed(
            &mut op,
            r#"
            {"sensor":"a","ts":"1970-01-01T00:00:00.500Z","v":1.0}
            {"sensor":"a","ts":"1970-01-01T00:00:01.500Z","v":2.0}"#,
            &mut out,
        );
        op.on_watermark(Watermark::END, &mut out)
            .expect("watermark");
        assert_eq!(
            pretty(&out.take_batches()),
            "\
+--------+---------------------+---------------------+-------+---+------+
| sensor | window_start        | window_end          | total | n | mean |
+--------+---------------------+---------------------+-------+---+------+
| a      | 1969-12-31T23:59:59 | 1970-01-01T00:00:01 | 1.0   | 1 | 1.0  |
| a      | 1970-01-01T00:00:00 | 1970-01-01T00:00:02 | 3.0   | 2 | 1.5  |
| a      | 1970-01-01T00:00:01 | 1970-01-01T00:00:03 | 2.0   | 1 | 2.0  |
+--------+---------------------+---------------------+-------+---+------+"
        );
    }

    #[test]
    fn snapshot_and_restore_keep_open_windows() {
        let mut op = aggregate(WindowKind::Tumble { size: SECOND });
        let mut out = Collector::default();
        feed(
            &mut op,
            r#"
            {"sensor":"a","ts":"1970-01-01T00:00:00.100Z","v":1.0}
            {"sensor":"b","ts":"1970-01-01T00:00:01.100Z","v":4.0}"#,
            &mut out,
        );
        op.on_watermark(at(0.5), &mut out).expect("watermark");
        let state = op.snapshot().expect("snapshot");
        // The snapshot must not disturb the original either.
        feed(
            &mut op,
            r#"{"sensor":"a","ts":"1970-01-01T00:00:00.200Z","v":2.0}"#,
            &mut out,
        );
        op.on_watermark(Watermark::END, &mut out)
            .expect("watermark");
        let original = pretty(&out.take_batches());

        let mut restored = aggregate(WindowKind::Tumble { size: SECOND });
        restored.restore(&state).expect("restore");
        feed(
            &mut restored,
            r#"{"sensor":"a","ts":"1970-01-01T00:00:00.200Z","v":2.0}"#,
            &mut out,
        );
        restored
            .on_watermark(Watermark::END, &mut out)
            .expect("watermark");
        assert_eq!(pretty(&out.take_batches()), original);
        assert!(
            original.contains(
                "| a      | 1970-01-01T00:00:00 | 1970-01-01T00:00:01 | 3.0   | 2 | 1.5  |"
            ),
            "{original}"
        );
        assert!(
            restored.restore(&state[..state.len() / 2]).is_err(),
            "a truncated snapshot is refused"
        );
    }

    #[test]
    fn a_window_without_keys_aggregates_every_row_and_extreme_times_are_invalid() {
        let input = schema("sensor:utf8, ts:ts!, v:f64");
        let mut op = WindowAggregate::try_new(
            WindowKind::Tumble { size: SECOND },
            &input,
            1,
            vec![],
            vec![call(sum_udaf(), "v", &input, "total")],
            vec![OutputColumn::WindowStart, OutputColumn::Aggregate(0)],
            schema("window_start:ts!, total:f64"),
        )
        .expect("valid");
        let mut out = Collector::default();
        let extreme = RecordBatch::try_new(
            Arc::clone(&input),
            vec![
                Arc::new(arrow::array::StringArray::from(vec!["a", "b", "c"])),
                Arc::new(TimestampNanosecondArray::from(vec![i64::MIN, 100, 200])),
                Arc::new(arrow::array::Float64Array::from(vec![1.0, 2.0, 3.0])),
            ],
        )
        .expect("batch");
        op.process_batch(extreme, &mut out).expect("process");
        assert_eq!(
            out.invalid_rows, 1,
            "a time whose window start cannot be represented is invalid"
        );
        op.on_watermark(Watermark::END, &mut out)
            .expect("watermark");
        assert_eq!(
            pretty(&out.take_batches()),
            "\
+---------------------+-------+
| window_start        | total |
+---------------------+-------+
| 1970-01-01T00:00:00 | 5.0   |
+---------------------+-------+"
        );
    }

    #[test]
    fn zero_length_and_inverted_windows_are_refused() {
        assert!(WindowKind::Tumble { size: 0 }.validate().is_err());
        assert!(
            WindowKind::Hop {
                size: SECOND,
                slide: 0
            }
            .validate()
            .is_err()
        );
        assert!(
            WindowKind::Hop {
                size: SECOND,
                slide: 2 * SECOND
            }
            .validate()
            .is_err()
        );
        assert!(
            WindowKind::Hop {
                size: 2 * SECOND,
                slide: SECOND
            }
            .validate()
            .is_ok()
        );
        assert!(
            WindowKind::Hop {
                size: 86_400 * SECOND,
                slide: 1_000_000
            }
            .validate()
            .is_err(),
            "too many overlaps"
        );
    }
}
