//! JSON payloads decoded straight into Arrow builders.
//!
//! Two shapes are recognised per record, with no configuration:
//!
//! ```text
//! sample: {"sensor":"s1","ts":"2024-01-01T00:00:00Z","v":0.12}
//!         -> one row; fields matched to columns by name, unknown fields ignored
//!
//! block:  {"sensor":"s1","t0":"2024-01-01T00:00:00Z","rate_hz":1000,"samples":[0.1,0.2,...]}
//!         -> one row per sample; event time = t0 + i * 1e9 / rate_hz ns, the sample goes to
//!            the value column, every other column is copied from the object
//! ```
//!
//! A record with a `samples` key is a block. Its value column is the configured
//! `value_column`, or else the one numeric column, other than event time, that the object does
//! not name. `t0` may also be written under the event-time column's own name.
//!
//! The scanner is specialised for the flat objects sensors send: it finds each field's value
//! by position, parses short decimals itself and other numbers with `fast-float2`, reads a
//! block's samples in the same pass that finds its keys, borrows strings from the record
//! (unescaping only those that contain a backslash) and allocates nothing per record once
//! warmed up.
//! Nested values of unknown fields are skipped, not validated, and UTF-8 is checked only in the
//! strings that are kept: a block is nearly all digits, and validating them all cost an eighth
//! of the decoding time.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;

use super::{
    Cell, Column, ColumnKind, Columns, DecodeError, DecodeOptions, DecodeResult, RecordDecoder,
    StrSources, event_time_index, integer_cell, is_non_finite_word, leading_digits, load_word,
    parse_array_element, parse_short_decimal, starts_like_number,
};
use crate::dead_letter::DeadLetterQueue;
use crate::error::{ConnectorError, Result};
use crate::time::{TimeUnit, parse_epoch, parse_timestamp};

const T0: &str = "t0";
const RATE_HZ: &str = "rate_hz";
const SAMPLES: &str = "samples";

/// Key positions remembered from the previous record; producers repeat their key order.
const MAX_KEY_HINTS: usize = 64;

/// Decodes JSON objects into batches of a fixed schema; see the module docs.
#[derive(Debug)]
pub struct JsonDecoder {
    columns: Columns,
    event_time: Option<usize>,
    value_column: Option<usize>,
    time_unit: TimeUnit,
    scratch: Scratch,
    t0_name: Arc<str>,
    rate_hz_name: Arc<str>,
    samples_name: Arc<str>,
}

/// Per-record state, reused from record to record.
#[derive(Debug, Default)]
struct Scratch {
    /// Where each column's field is in the current record.
    values: Vec<Value>,
    cells: Vec<Cell>,
    t0: Value,
    rate_hz: Value,
    samples: Value,
    /// Whether `sample_floats` / `sample_nulls` already hold the samples, read during the scan.
    samples_read: bool,
    key_hints: Vec<KeyTarget>,
    key: String,
    unescaped: String,
    sample_floats: Vec<f64>,
    /// Positions of the null samples in `sample_floats` (which holds 0.0 there); rare, so
    /// listed rather than flagged per sample.
    sample_nulls: Vec<usize>,
    sample_cells: Vec<Cell>,
    sample_times: Vec<i64>,
}

/// A JSON value located in the record, not yet interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Value {
    #[default]
    Absent,
    Null,
    Bool(bool),
    Str {
        start: usize,
        end: usize,
        escaped: bool,
    },
    Num {
        start: usize,
        end: usize,
    },
    /// Bare `NaN`, `Infinity` or `-Infinity`, as Python's `json.dumps` writes them.
    NonFinite,
    /// From the `[` to just past the `]`.
    Array {
        start: usize,
        end: usize,
    },
    Object,
}

/// What a key of the record feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyTarget {
    Column(usize),
    T0,
    RateHz,
    Samples,
    Ignored,
}

/// Sample offsets from `t0` for a block's rate, in integer arithmetic whenever the rate is a
/// whole number so that sample times do not drift over long blocks.
#[derive(Debug, Clone, Copy)]
enum SampleClock {
    /// The period is a whole number of nanoseconds, as at 1 kHz (but not at 1024 Hz).
    Step(i64),
    /// Integer rate: offset = floor(i * 1e9 / rate).
    IntegerRate(i128),
    /// Fractional rate: offset = round(i * period).
    Period(f64),
}

impl SampleClock {
    fn new(rate_hz: f64) -> Self {
        const NANOS: i128 = 1_000_000_000;
        if rate_hz.fract() == 0.0 && rate_hz <= 1e12 {
            let rate = rate_hz as i128;
            if NANOS % rate == 0 {
                Self::Step((NANOS / rate) as i64)
            } else {
                Self::IntegerRate(rate)
            }
        } else {
            Self::Period(1e9 / rate_hz)
        }
    }

    fn offset(self, index: usize) -> i64 {
        match self {
            Self::Step(step) => index as i64 * step,
            Self::IntegerRate(rate) => (index as i128 * 1_000_000_000 / rate) as i64,
            Self::Period(period) => (index as f64 * period).round() as i64,
        }
    }

    /// Appends the times of `count` samples from `t0` to `times`; `t0` plus the last offset
    /// must fit (the caller checks).
    fn extend_times(self, t0: i64, count: usize, times: &mut Vec<i64>) {
        match self {
            // The common case as a loop of its own, which the compiler vectorises.
            Self::Step(step) => times.extend((0..count as i64).map(|i| t0 + i * step)),
            clock => times.extend((0..count).map(|i| t0 + clock.offset(i))),
        }
    }
}

impl JsonDecoder {
    /// A decoder for `schema`. `event_time` names the event-time column (a block's `t0` maps
    /// to it). Fails with a configuration error for a column type JSON cannot fill or a
    /// `value_column` that is not a numeric column of the schema.
    pub fn new(
        schema: SchemaRef,
        event_time: Option<&str>,
        options: DecodeOptions,
    ) -> Result<Self> {
        let columns = Columns::new(schema, "json decoder")?;
        let event_time = event_time_index(&columns, event_time, "json decoder")?;
        let value_column = match &options.value_column {
            None => None,
            Some(name) => {
                let index = columns
                    .index_of(name)
                    .filter(|&i| columns.columns[i].kind.is_numeric() && Some(i) != event_time);
                Some(index.ok_or_else(|| {
                    ConnectorError::config(
                        "json decoder",
                        format!("value_column '{name}' must name a numeric column of the schema"),
                    )
                })?)
            }
        };
        let width = columns.columns.len();
        Ok(Self {
            columns,
            event_time,
            value_column,
            time_unit: options.time_unit,
            scratch: Scratch {
                values: vec![Value::Absent; width],
                cells: vec![Cell::Null; width],
                ..Scratch::default()
            },
            t0_name: Arc::from(T0),
            rate_hz_name: Arc::from(RATE_HZ),
            samples_name: Arc::from(SAMPLES),
        })
    }

    /// The schema of the batches this decoder produces.
    pub fn schema(&self) -> SchemaRef {
        self.columns.schema.clone()
    }

    /// Decodes one JSON object; returns the rows it added (0 for an empty block). On error the
    /// pending rows are exactly as before the call.
    pub fn decode_record(&mut self, record: &[u8]) -> DecodeResult<usize> {
        self.scan_object(record)?;
        self.scratch.unescaped.clear();
        if self.scratch.samples == Value::Absent {
            self.decode_sample(record)
        } else {
            self.decode_block(record)
        }
    }

    /// Decodes JSON lines; see [`RecordDecoder::decode_lines`].
    pub fn decode_lines(
        &mut self,
        bytes: &[u8],
        source: &str,
        dead_letters: &DeadLetterQueue,
    ) -> usize {
        <Self as RecordDecoder>::decode_lines(self, bytes, source, dead_letters)
    }

    /// Rows decoded and not yet flushed.
    pub fn len(&self) -> usize {
        self.columns.rows
    }

    /// The latest event time among the pending rows from `from_row` on.
    pub fn latest_event_time(&self, from_row: usize) -> Option<i64> {
        self.columns.latest_time(self.event_time?, from_row)
    }

    /// Whether no rows are pending.
    pub fn is_empty(&self) -> bool {
        self.columns.rows == 0
    }

    /// Turns the pending rows into a batch; `None` when there are none.
    pub fn flush(&mut self) -> Result<Option<RecordBatch>> {
        self.columns.flush()
    }

    /// Locates every field of the object in `b` without interpreting values.
    fn scan_object(&mut self, b: &[u8]) -> DecodeResult<()> {
        let scratch = &mut self.scratch;
        scratch.values.fill(Value::Absent);
        scratch.t0 = Value::Absent;
        scratch.rate_hz = Value::Absent;
        scratch.samples = Value::Absent;
        scratch.samples_read = false;
        let mut i = skip_ws(b, 0);
        match b.get(i) {
            Some(b'{') => {}
            None => return Err(DecodeError::InvalidJson),
            Some(_) => {
                // Tell a valid non-object apart from garbage for a more useful reason.
                let (_, end) = scan_value(b, i)?;
                return Err(if skip_ws(b, end) == b.len() {
                    DecodeError::NotAnObject
                } else {
                    DecodeError::InvalidJson
                });
            }
        }
        i = skip_ws(b, i + 1);
        if b.get(i) == Some(&b'}') {
            i += 1;
        } else {
            let mut position = 0;
            loop {
                if b.get(i) != Some(&b'"') {
                    return Err(DecodeError::InvalidJson);
                }
                let (key_start, key_end, escaped, next) = scan_string(b, i)?;
                i = skip_ws(b, next);
                if b.get(i) != Some(&b':') {
                    return Err(DecodeError::InvalidJson);
                }
                let value_start = skip_ws(b, i + 1);
                let key = &b[key_start..key_end];
                let target = if escaped {
                    scratch.key.clear();
                    unescape(key, &mut scratch.key)?;
                    resolve_key(
                        &self.columns.columns,
                        &mut scratch.key_hints,
                        scratch.key.as_bytes(),
                        position,
                    )
                } else {
                    resolve_key(&self.columns.columns, &mut scratch.key_hints, key, position)
                };
                // Reading a block's samples during the scan saves walking the array twice,
                // which matters: the array is nearly all of the record.
                let samples_end = if target == KeyTarget::Samples {
                    read_float_array(
                        b,
                        value_start,
                        &mut scratch.sample_floats,
                        &mut scratch.sample_nulls,
                    )
                } else {
                    None
                };
                let (value, next) = match samples_end {
                    Some(end) => (
                        Value::Array {
                            start: value_start,
                            end,
                        },
                        end,
                    ),
                    None => scan_value(b, value_start)?,
                };
                match target {
                    KeyTarget::Column(c) => scratch.values[c] = value,
                    KeyTarget::T0 => scratch.t0 = value,
                    KeyTarget::RateHz => scratch.rate_hz = value,
                    KeyTarget::Samples => {
                        scratch.samples = value;
                        scratch.samples_read = samples_end.is_some();
                    }
                    KeyTarget::Ignored => {}
                }
                i = skip_ws(b, next);
                match b.get(i) {
                    Some(b',') => {
                        i = skip_ws(b, i + 1);
                        position += 1;
                    }
                    Some(b'}') => {
                        i += 1;
                        break;
                    }
                    _ => return Err(DecodeError::InvalidJson),
                }
            }
        }
        if skip_ws(b, i) != b.len() {
            return Err(DecodeError::InvalidJson);
        }
        Ok(())
    }

    fn decode_sample(&mut self, b: &[u8]) -> DecodeResult<usize> {
        let scratch = &mut self.scratch;
        for ((cell, value), column) in scratch
            .cells
            .iter_mut()
            .zip(&scratch.values)
            .zip(&self.columns.columns)
        {
            json_cell(
                cell,
                column,
                *value,
                b,
                self.time_unit,
                &mut scratch.unescaped,
            )?;
        }
        let strings = StrSources {
            record: b,
            unescaped: &scratch.unescaped,
        };
        for (builder, cell) in self.columns.builders.iter_mut().zip(&scratch.cells) {
            builder.append(*cell, &strings);
        }
        self.columns.rows += 1;
        Ok(1)
    }

    fn decode_block(&mut self, b: &[u8]) -> DecodeResult<usize> {
        let scratch = &mut self.scratch;
        let columns = &self.columns.columns;
        let Value::Array { start, end } = scratch.samples else {
            return Err(DecodeError::WrongType {
                column: self.samples_name.clone(),
                expected: "array of numbers",
            });
        };
        let value_column = match self.value_column {
            Some(c) => c,
            None => {
                let mut found = None;
                for (c, column) in columns.iter().enumerate() {
                    if Some(c) == self.event_time
                        || !column.kind.is_numeric()
                        || scratch.values[c] != Value::Absent
                    {
                        continue;
                    }
                    if found.is_some() {
                        return Err(DecodeError::AmbiguousValueColumn);
                    }
                    found = Some(c);
                }
                found.ok_or(DecodeError::NoValueColumn)?
            }
        };
        let timing = match self.event_time {
            None => None,
            Some(event_time) => {
                let t0 = match scratch.t0 {
                    Value::Absent => scratch.values[event_time],
                    t0 => t0,
                };
                let t0 = match t0 {
                    Value::Absent | Value::Null => {
                        return Err(DecodeError::MissingField(self.t0_name.clone()));
                    }
                    Value::Str { start, end, .. } => std::str::from_utf8(&b[start..end])
                        .ok()
                        .and_then(|t| parse_timestamp(t, self.time_unit)),
                    Value::Num { start, end } => parse_epoch(&b[start..end], self.time_unit),
                    _ => None,
                }
                .ok_or_else(|| DecodeError::InvalidTimestamp(self.t0_name.clone()))?;
                let rate = match scratch.rate_hz {
                    Value::Absent | Value::Null => {
                        return Err(DecodeError::MissingField(self.rate_hz_name.clone()));
                    }
                    Value::Num { start, end } => fast_float2::parse::<f64, _>(&b[start..end])
                        .ok()
                        .filter(|r| r.is_finite() && *r > 0.0)
                        .ok_or(DecodeError::InvalidRate)?,
                    _ => return Err(DecodeError::InvalidRate),
                };
                Some((event_time, t0, SampleClock::new(rate)))
            }
        };
        for (c, (cell, column)) in scratch.cells.iter_mut().zip(columns).enumerate() {
            if c == value_column || Some(c) == self.event_time {
                *cell = Cell::Null;
            } else {
                let value = scratch.values[c];
                json_cell(
                    cell,
                    column,
                    value,
                    b,
                    self.time_unit,
                    &mut scratch.unescaped,
                )?;
            }
        }
        let value = &columns[value_column];
        let float_samples = value.kind == ColumnKind::Float64;
        let count = if float_samples && scratch.samples_read {
            if !value.nullable && !scratch.sample_nulls.is_empty() {
                return Err(DecodeError::NullField(value.name.clone()));
            }
            scratch.sample_floats.len()
        } else if float_samples {
            scan_float_samples(b, start, end, value, scratch)?
        } else {
            scan_samples(b, start, end, value, self.time_unit, scratch)?
        };
        if let Some((event_time, t0, clock)) = timing
            && count > 0
            && t0.checked_add(clock.offset(count - 1)).is_none()
        {
            return Err(DecodeError::InvalidTimestamp(
                columns[event_time].name.clone(),
            ));
        }

        let strings = StrSources {
            record: b,
            unescaped: &scratch.unescaped,
        };
        for (c, builder) in self.columns.builders.iter_mut().enumerate() {
            if c == value_column {
                if float_samples {
                    builder.append_floats(&scratch.sample_floats, &scratch.sample_nulls);
                } else {
                    for cell in &scratch.sample_cells {
                        builder.append(*cell, &strings);
                    }
                }
            } else if let Some((event_time, t0, clock)) = timing
                && c == event_time
            {
                scratch.sample_times.clear();
                clock.extend_times(t0, count, &mut scratch.sample_times);
                builder.append_timestamps(&scratch.sample_times);
            } else {
                builder.append_n(scratch.cells[c], count, &strings);
            }
        }
        self.columns.rows += count;
        Ok(count)
    }
}

impl RecordDecoder for JsonDecoder {
    fn decode_record(&mut self, record: &[u8]) -> DecodeResult<usize> {
        JsonDecoder::decode_record(self, record)
    }

    fn len(&self) -> usize {
        self.columns.rows
    }

    fn flush(&mut self) -> Result<Option<RecordBatch>> {
        self.columns.flush()
    }
}

/// Finds what `key` (the `position`-th key of the object) feeds, trying the previous record's
/// answer for that position first.
#[inline]
fn resolve_key(
    columns: &[Column],
    hints: &mut Vec<KeyTarget>,
    key: &[u8],
    position: usize,
) -> KeyTarget {
    let name_of = |target: KeyTarget| -> &[u8] {
        match target {
            KeyTarget::Column(c) => columns[c].name.as_bytes(),
            KeyTarget::T0 => T0.as_bytes(),
            KeyTarget::RateHz => RATE_HZ.as_bytes(),
            KeyTarget::Samples => SAMPLES.as_bytes(),
            KeyTarget::Ignored => &[],
        }
    };
    if let Some(&hint) = hints.get(position)
        && hint != KeyTarget::Ignored
        && same_key(name_of(hint), key)
    {
        return hint;
    }
    // Columns win over the block keys, so a schema may have a column called `t0`.
    let target = match columns.iter().position(|c| c.name.as_bytes() == key) {
        Some(c) => KeyTarget::Column(c),
        None if key == T0.as_bytes() => KeyTarget::T0,
        None if key == RATE_HZ.as_bytes() => KeyTarget::RateHz,
        None if key == SAMPLES.as_bytes() => KeyTarget::Samples,
        None => KeyTarget::Ignored,
    };
    if position < MAX_KEY_HINTS {
        if hints.len() <= position {
            hints.resize(position + 1, KeyTarget::Ignored);
        }
        hints[position] = target;
    }
    target
}

/// Whether two keys are equal, compared inline: keys are a few bytes long, and a call into
/// `memcmp` for each of them cost more than the comparison.
#[inline(always)]
fn same_key(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x == y)
}

/// Interprets one located value for `column` into `cell`.
///
/// Writes through `cell` rather than returning it: a returned enum is built on the stack and
/// copied, and that copy of a partly written value stalls store forwarding on every field.
#[inline(always)]
fn json_cell(
    cell: &mut Cell,
    column: &Column,
    value: Value,
    b: &[u8],
    time_unit: TimeUnit,
    unescaped: &mut String,
) -> DecodeResult<()> {
    let wrong_type = |expected| DecodeError::WrongType {
        column: column.name.clone(),
        expected,
    };
    *cell = match (column.kind, value) {
        (_, Value::Absent) if column.nullable => Cell::Null,
        (_, Value::Absent) => return Err(DecodeError::MissingField(column.name.clone())),
        (_, Value::Null) if column.nullable => Cell::Null,
        (_, Value::Null) => return Err(DecodeError::NullField(column.name.clone())),
        (
            ColumnKind::Utf8,
            Value::Str {
                start,
                end,
                escaped: false,
            },
        ) => {
            // Sensor ids and such are ASCII, checked faster than by the full UTF-8 validator.
            let text = &b[start..end];
            if !text.is_ascii() {
                std::str::from_utf8(text).map_err(|_| DecodeError::InvalidUtf8)?;
            }
            Cell::Str {
                start,
                end,
                unescaped: false,
            }
        }
        (ColumnKind::Utf8, Value::Str { start, end, .. }) => {
            let from = unescaped.len();
            unescape(&b[start..end], unescaped)?;
            Cell::Str {
                start: from,
                end: unescaped.len(),
                unescaped: true,
            }
        }
        (ColumnKind::Utf8, _) => return Err(wrong_type("string")),
        (ColumnKind::Boolean, Value::Bool(v)) => Cell::Bool(v),
        (ColumnKind::Boolean, _) => return Err(wrong_type("boolean")),
        (ColumnKind::Timestamp, Value::Str { start, end, .. }) => {
            std::str::from_utf8(&b[start..end])
                .ok()
                .and_then(|t| parse_timestamp(t, time_unit))
                .map(Cell::Int)
                .ok_or_else(|| DecodeError::InvalidTimestamp(column.name.clone()))?
        }
        (ColumnKind::Timestamp, Value::Num { start, end }) => {
            parse_epoch(&b[start..end], time_unit)
                .map(Cell::Int)
                .ok_or_else(|| DecodeError::InvalidTimestamp(column.name.clone()))?
        }
        (ColumnKind::Timestamp, Value::NonFinite) => {
            return Err(DecodeError::InvalidTimestamp(column.name.clone()));
        }
        (ColumnKind::Timestamp, _) => return Err(wrong_type("timestamp")),
        (_, Value::Num { start, end }) => json_number(column, &b[start..end])?,
        (_, Value::NonFinite) => return Err(DecodeError::NonNumeric(column.name.clone())),
        (_, Value::Str { start, end, .. }) if is_non_finite_word(&b[start..end]) => {
            return Err(DecodeError::NonNumeric(column.name.clone()));
        }
        (_, _) => return Err(wrong_type("number")),
    };
    Ok(())
}

/// A JSON number for a numeric column. A malformed number is invalid JSON; a well-formed one
/// that the column cannot hold (a fraction for an integer column) is the wrong type.
#[inline]
fn json_number(column: &Column, text: &[u8]) -> DecodeResult<Cell> {
    if column.kind == ColumnKind::Float64
        && let Some((value, used)) = parse_short_decimal(text)
        && used == text.len()
    {
        return Ok(Cell::Float(value));
    }
    if column.kind == ColumnKind::Float64 || column.kind == ColumnKind::Float32 {
        let value = if column.kind == ColumnKind::Float32 {
            fast_float2::parse::<f32, _>(text).map(f64::from)
        } else {
            fast_float2::parse::<f64, _>(text)
        }
        .map_err(|_| DecodeError::InvalidJson)?;
        if !value.is_finite() {
            return Err(DecodeError::OutOfRange(column.name.clone()));
        }
        return Ok(Cell::Float(value));
    }
    integer_cell(column, text).map_err(|error| match error {
        DecodeError::WrongType { .. } if fast_float2::parse::<f64, _>(text).is_err() => {
            DecodeError::InvalidJson
        }
        other => other,
    })
}

/// Reads the samples of a block into `scratch.sample_floats` / `sample_nulls`: the hot loop
/// for vibration data, one `fast-float2` call per sample.
fn scan_float_samples(
    b: &[u8],
    start: usize,
    end: usize,
    column: &Column,
    scratch: &mut Scratch,
) -> DecodeResult<usize> {
    let floats = &mut scratch.sample_floats;
    let nulls = &mut scratch.sample_nulls;
    floats.clear();
    nulls.clear();
    // `end` is just past the closing bracket.
    let body = &b[..end - 1];
    let mut i = skip_ws(body, start + 1);
    if i == body.len() {
        return Ok(0);
    }
    loop {
        if starts_like_number(&body[i..]) {
            let (value, length) = fast_float2::parse_partial::<f64, _>(&body[i..])
                .map_err(|_| DecodeError::InvalidJson)?;
            if !value.is_finite() {
                return Err(DecodeError::OutOfRange(column.name.clone()));
            }
            floats.push(value);
            i += length;
        } else {
            let (value, next) = scan_value(body, i)?;
            match value {
                Value::Null if column.nullable => {
                    nulls.push(floats.len());
                    floats.push(0.0);
                }
                Value::Null => return Err(DecodeError::NullField(column.name.clone())),
                Value::NonFinite => return Err(DecodeError::NonNumeric(column.name.clone())),
                Value::Str { start, end, .. } if is_non_finite_word(&b[start..end]) => {
                    return Err(DecodeError::NonNumeric(column.name.clone()));
                }
                _ => {
                    return Err(DecodeError::WrongType {
                        column: column.name.clone(),
                        expected: "number",
                    });
                }
            }
            i = next;
        }
        i = skip_ws(body, i);
        match body.get(i) {
            None => return Ok(floats.len()),
            Some(b',') => i = skip_ws(body, i + 1),
            Some(_) => return Err(DecodeError::InvalidJson),
        }
    }
}

/// Reads an array of finite numbers and nulls starting at the `[` at `i`, returning the
/// position after its `]`; `None` if it holds anything else (the caller then takes the slower
/// path that explains what is wrong).
fn read_float_array(
    b: &[u8],
    i: usize,
    floats: &mut Vec<f64>,
    nulls: &mut Vec<usize>,
) -> Option<usize> {
    floats.clear();
    nulls.clear();
    if b.get(i) != Some(&b'[') {
        return None;
    }
    let mut i = skip_ws(b, i + 1);
    if b.get(i) == Some(&b']') {
        return Some(i + 1);
    }
    // A block's samples share one format; after a sample too long for the short-decimal path,
    // going straight to the full parser saves scanning the digits twice.
    let mut short = true;
    loop {
        if short && let Some((value, length)) = parse_array_element(b, i) {
            floats.push(value);
            i += length + 1;
            continue;
        }
        i = skip_ws(b, i);
        let rest = b.get(i..)?;
        if starts_like_number(rest) {
            let parsed = if short {
                parse_short_decimal(rest)
            } else {
                None
            };
            short = parsed.is_some();
            let (value, length) =
                parsed.or_else(|| fast_float2::parse_partial::<f64, _>(rest).ok())?;
            if !value.is_finite() {
                return None;
            }
            floats.push(value);
            i += length;
        } else if rest.starts_with(b"null") {
            nulls.push(floats.len());
            floats.push(0.0);
            i += 4;
        } else {
            return None;
        }
        match b.get(i) {
            Some(b',') => i += 1,
            Some(b']') => return Some(i + 1),
            _ => {
                i = skip_ws(b, i);
                match b.get(i) {
                    Some(b',') => i += 1,
                    Some(b']') => return Some(i + 1),
                    _ => return None,
                }
            }
        }
        i = skip_ws(b, i);
    }
}

/// Reads the samples of a block for a value column that is not `DOUBLE`.
fn scan_samples(
    b: &[u8],
    start: usize,
    end: usize,
    column: &Column,
    time_unit: TimeUnit,
    scratch: &mut Scratch,
) -> DecodeResult<usize> {
    scratch.sample_cells.clear();
    let body = &b[..end - 1];
    let mut i = skip_ws(body, start + 1);
    if i == body.len() {
        return Ok(0);
    }
    loop {
        let (value, next) = scan_value(body, i)?;
        let mut cell = Cell::Null;
        json_cell(
            &mut cell,
            column,
            value,
            b,
            time_unit,
            &mut scratch.unescaped,
        )?;
        scratch.sample_cells.push(cell);
        i = skip_ws(body, next);
        match body.get(i) {
            None => return Ok(scratch.sample_cells.len()),
            Some(b',') => i = skip_ws(body, i + 1),
            Some(_) => return Err(DecodeError::InvalidJson),
        }
    }
}

#[inline]
fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = b.get(i) {
        i += 1;
    }
    i
}

/// Scans the string whose opening quote is at `i`; returns the content range, whether it
/// holds escapes, and the position after the closing quote.
#[inline]
fn scan_string(b: &[u8], i: usize) -> DecodeResult<(usize, usize, bool, usize)> {
    let start = i + 1;
    let mut j = start;
    let mut escaped = false;
    loop {
        match b.get(j) {
            Some(b'"') => return Ok((start, j, escaped, j + 1)),
            Some(b'\\') => {
                escaped = true;
                j += 2;
            }
            Some(&c) if c >= 0x20 => j += 1,
            _ => return Err(DecodeError::InvalidJson),
        }
    }
}

/// When `payload` is a JSON array, writes the byte range of each element into `out` (so that
/// each element can be decoded, or rejected, as a record of its own) and returns
/// `Some(Ok(()))`; returns `None` when the payload is not an array at all.
pub fn array_elements(
    payload: &[u8],
    out: &mut Vec<std::ops::Range<usize>>,
) -> Option<DecodeResult<()>> {
    let mut i = skip_ws(payload, 0);
    if payload.get(i) != Some(&b'[') {
        return None;
    }
    out.clear();
    i = skip_ws(payload, i + 1);
    if payload.get(i) == Some(&b']') {
        i += 1;
    } else {
        loop {
            let end = match scan_value(payload, i) {
                Ok((_, end)) => end,
                Err(error) => return Some(Err(error)),
            };
            out.push(i..end);
            i = skip_ws(payload, end);
            match payload.get(i) {
                Some(b',') => i = skip_ws(payload, i + 1),
                Some(b']') => {
                    i += 1;
                    break;
                }
                _ => return Some(Err(DecodeError::InvalidJson)),
            }
        }
    }
    Some(if skip_ws(payload, i) == payload.len() {
        Ok(())
    } else {
        Err(DecodeError::InvalidJson)
    })
}

/// Locates the value starting at `i`; returns it and the position just after it.
#[inline(always)]
fn scan_value(b: &[u8], i: usize) -> DecodeResult<(Value, usize)> {
    let literal = |word: &[u8], value: Value| {
        if b.get(i..i + word.len()) == Some(word) {
            Ok((value, i + word.len()))
        } else {
            Err(DecodeError::InvalidJson)
        }
    };
    match b.get(i) {
        Some(b'"') => {
            let (start, end, escaped, next) = scan_string(b, i)?;
            Ok((
                Value::Str {
                    start,
                    end,
                    escaped,
                },
                next,
            ))
        }
        Some(b'-') if b.get(i + 1) == Some(&b'I') => literal(b"-Infinity", Value::NonFinite),
        Some(b'-' | b'0'..=b'9') => {
            let end = number_end(b, i);
            Ok((Value::Num { start: i, end }, end))
        }
        Some(b't') => literal(b"true", Value::Bool(true)),
        Some(b'f') => literal(b"false", Value::Bool(false)),
        Some(b'n') => literal(b"null", Value::Null),
        Some(b'N') => literal(b"NaN", Value::NonFinite),
        Some(b'I') => literal(b"Infinity", Value::NonFinite),
        Some(b'[') => {
            let end = skip_nested(b, i)?;
            Ok((Value::Array { start: i, end }, end))
        }
        Some(b'{') => Ok((Value::Object, skip_nested(b, i)?)),
        _ => Err(DecodeError::InvalidJson),
    }
}

/// The end of the number-like characters from `i` on (digits, signs, points, exponents):
/// digits eight at a time where a whole word is left, as most of an epoch timestamp's are.
#[inline]
fn number_end(b: &[u8], mut i: usize) -> usize {
    loop {
        if let Some(word) = load_word(b, i) {
            let digits = leading_digits(word);
            i += digits;
            if digits == 8 {
                continue;
            }
        }
        match b.get(i) {
            Some(b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') => i += 1,
            _ => return i,
        }
    }
}

/// Skips the array or object opening at `i`, returning the position after its close. Only
/// brackets and strings are checked: nested values of ignored fields need not be parsed.
fn skip_nested(b: &[u8], i: usize) -> DecodeResult<usize> {
    let mut depth = 0usize;
    let mut j = i;
    while let Some(&c) = b.get(j) {
        match c {
            b'"' => {
                j = scan_string(b, j)?.3;
                continue;
            }
            b'[' | b'{' => depth += 1,
            b']' | b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Ok(j + 1);
                }
            }
            _ => {}
        }
        j += 1;
    }
    Err(DecodeError::InvalidJson)
}

/// Appends the unescaped form of the JSON string body `raw` to `out`.
fn unescape(raw: &[u8], out: &mut String) -> DecodeResult<()> {
    let text = std::str::from_utf8(raw).map_err(|_| DecodeError::InvalidUtf8)?;
    let mut run_start = 0;
    let mut i = 0;
    while i < raw.len() {
        if raw[i] != b'\\' {
            i += 1;
            continue;
        }
        out.push_str(text.get(run_start..i).ok_or(DecodeError::InvalidJson)?);
        let escape = raw.get(i + 1).ok_or(DecodeError::InvalidJson)?;
        i += 2;
        let c = match escape {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let high = hex4(raw, i)?;
                i += 4;
                let code = if (0xD800..0xDC00).contains(&high) {
                    if raw.get(i..i + 2) != Some(b"\\u") {
                        return Err(DecodeError::InvalidJson);
                    }
                    let low = hex4(raw, i + 2)?;
                    if !(0xDC00..0xE000).contains(&low) {
                        return Err(DecodeError::InvalidJson);
                    }
                    i += 6;
                    0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00)
                } else {
                    high
                };
                char::from_u32(code).ok_or(DecodeError::InvalidJson)?
            }
            _ => return Err(DecodeError::InvalidJson),
        };
        out.push(c);
        run_start = i;
    }
    out.push_str(text.get(run_start..).ok_or(DecodeError::InvalidJson)?);
    Ok(())
}

fn hex4(raw: &[u8], at: usize) -> DecodeResult<u32> {
    let digits = raw.get(at..at + 4).ok_or(DecodeError::InvalidJson)?;
    let mut value = 0;
    for &d in digits {
        let nibble = (d as char).to_digit(16).ok_or(DecodeError::InvalidJson)?;
        value = value * 16 + nibble;
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::datatypes::{DataType, Field, Schema, TimeUnit as ArrowTimeUnit};

    use super::*;
    use crate::decode::test_support::{table, vibration_schema};

    fn decoder() -> JsonDecoder {
        JsonDecoder::new(vibration_schema(), Some("ts"), DecodeOptions::default()).expect("decoder")
    }

    #[test]
    fn a_number_ends_where_its_characters_end_in_a_word_or_at_the_end() {
        let cases = [
            ("1700000000123,", 13),
            ("17000000001234567,\"x\":1", 17),
            ("12345678", 8),
            ("-0.1234}", 7),
            ("1.5e-3]", 6),
            ("-12345678.87654321E+12 ", 22),
            ("0", 1),
            ("7}                 ", 1),
        ];
        for (text, end) in cases {
            assert_eq!(number_end(text.as_bytes(), 0), end, "{text}");
            let shifted = format!("[{text}");
            assert_eq!(number_end(shifted.as_bytes(), 1), end + 1, "{shifted}");
        }
    }

    fn rejection(record: &str) -> String {
        let mut decoder = decoder();
        match decoder.decode_record(record.as_bytes()) {
            Ok(rows) => format!("accepted {rows} rows"),
            Err(reason) => reason.to_string(),
        }
    }

    fn decoded(decoder: &mut JsonDecoder) -> Vec<String> {
        match decoder.flush() {
            Ok(Some(batch)) => table(&batch),
            other => vec![format!("{other:?}")],
        }
    }

    /// The samples reader against serde_json on arrays of every element shape a sensor may
    /// send: short and long decimals, signs, exponents, nulls, whitespace; and on garbage, which
    /// it must refuse (the slow path then says why) rather than misread. (It is laxer than JSON
    /// about a few number spellings, `1.` and leading zeros, so those are not generated.)
    #[test]
    fn sample_arrays_read_like_serde_json() {
        use rand::rngs::SmallRng;
        use rand::{Rng, SeedableRng};

        let mut rng = SmallRng::seed_from_u64(7);
        let elements = [
            "0",
            "-0",
            "1.5",
            "-2.427498",
            "12.345678",
            "0.0609",
            "1234567.1234567",
            "5",
            "-7.25",
            "1e3",
            "2.5E-2",
            "0.123456789012",
            "123456789",
            "null",
            " 3.25",
            "4.5 ",
            "-0.000001",
            "99999999.5",
            ".5",
            "--1",
            "1.2.3",
            "\"x\"",
            "NaN",
            "1,",
        ];
        let mut checked = 0;
        for _ in 0..50_000 {
            let n = rng.random_range(0..12);
            let mut text = String::from("[");
            for k in 0..n {
                if k > 0 {
                    text.push(',');
                }
                // Mostly plain samples, sometimes anything.
                let pick = if rng.random_range(0..4) == 0 {
                    rng.random_range(0..elements.len())
                } else {
                    rng.random_range(0..8)
                };
                text.push_str(elements[pick]);
            }
            text.push(']');
            // What may follow the array inside a record.
            text.push_str(["}", "", ",\"x\":1}", "  }"][rng.random_range(0..4)]);
            let array_end = text.rfind(']').map_or(0, |i| i + 1);
            let expected = serde_json::from_str::<Vec<Option<f64>>>(&text[..array_end]).ok();
            let (mut floats, mut nulls) = (Vec::new(), Vec::new());
            let read = read_float_array(text.as_bytes(), 0, &mut floats, &mut nulls);
            match expected {
                Some(values) if read.is_some() => {
                    assert_eq!(read, Some(array_end), "{text}");
                    let got: Vec<Option<u64>> = floats
                        .iter()
                        .enumerate()
                        .map(|(i, v)| (!nulls.contains(&i)).then_some(v.to_bits()))
                        .collect();
                    let want: Vec<Option<u64>> =
                        values.iter().map(|v| v.map(f64::to_bits)).collect();
                    assert_eq!(got, want, "{text}");
                    checked += 1;
                }
                Some(_) => panic!("refused valid {text}"),
                None => assert_eq!(read, None, "accepted invalid {text}"),
            }
        }
        assert!(checked > 20_000, "most arrays should be valid: {checked}");
    }

    #[test]
    fn single_samples_match_fields_by_name() {
        let mut decoder = decoder();
        let lines = concat!(
            r#"{"sensor":"s1","ts":"2024-01-01T00:00:00Z","v":0.12}"#,
            "\n",
            r#"{ "v" : -3e2 , "extra": {"nested": [1, "]"]}, "ts": 1704067200500, "sensor": "s\u00e9\n" }"#,
            "\n",
            r#"{"sensor":"s3","ts":"2024-01-01T00:00:01.25+00:00","v":null}"#,
            "\n",
            r#"{"sensor":"s4","ts":"2024-01-01T00:00:02Z"}"#,
            "\n",
        );
        let dlq = DeadLetterQueue::default();
        assert_eq!(decoder.decode_lines(lines.as_bytes(), "test", &dlq), 4);
        assert_eq!(dlq.count(), 0);
        assert_eq!(
            decoded(&mut decoder),
            vec![
                "+--------+-------------------------+--------+",
                "| sensor | ts                      | v      |",
                "+--------+-------------------------+--------+",
                "| s1     | 2024-01-01T00:00:00     | 0.12   |",
                "| sé     | 2024-01-01T00:00:00.500 | -300.0 |",
                "|        |                         |        |",
                "| s3     | 2024-01-01T00:00:01.250 |        |",
                "| s4     | 2024-01-01T00:00:02     |        |",
                "+--------+-------------------------+--------+",
            ]
        );
        assert!(decoder.is_empty());
        assert_eq!(decoder.flush().ok(), Some(None));
    }

    #[test]
    fn blocks_expand_to_one_row_per_sample() {
        let mut decoder = decoder();
        let record = r#"{"sensor":"s1","t0":"2024-01-01T00:00:00Z","rate_hz":4,"samples":[0.5,-1,2e-1,null]}"#;
        assert_eq!(decoder.decode_record(record.as_bytes()), Ok(4));
        assert_eq!(
            decoded(&mut decoder),
            vec![
                "+--------+-------------------------+------+",
                "| sensor | ts                      | v    |",
                "+--------+-------------------------+------+",
                "| s1     | 2024-01-01T00:00:00     | 0.5  |",
                "| s1     | 2024-01-01T00:00:00.250 | -1.0 |",
                "| s1     | 2024-01-01T00:00:00.500 | 0.2  |",
                "| s1     | 2024-01-01T00:00:00.750 |      |",
                "+--------+-------------------------+------+",
            ]
        );
    }

    #[test]
    fn block_times_use_exact_integer_math_for_uneven_rates() {
        let mut decoder = decoder();
        let record = r#"{"sensor":"s1","ts":0,"rate_hz":3,"samples":[1,2,3,4]}"#;
        assert_eq!(decoder.decode_record(record.as_bytes()), Ok(4));
        let batch = decoder.flush().ok().flatten().expect("batch");
        let ts = batch
            .column(1)
            .as_any()
            .downcast_ref::<arrow::array::TimestampNanosecondArray>()
            .expect("timestamps");
        assert_eq!(
            ts.values().to_vec(),
            vec![0, 333_333_333, 666_666_666, 1_000_000_000]
        );
    }

    #[test]
    fn block_value_column_is_the_one_numeric_column_not_named() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("sensor", DataType::Utf8, false),
            Field::new(
                "ts",
                DataType::Timestamp(ArrowTimeUnit::Nanosecond, None),
                false,
            ),
            Field::new("axis", DataType::Int32, true),
            Field::new("v", DataType::Float64, true),
            Field::new("temp", DataType::Float32, true),
        ]));
        let mut decoder = JsonDecoder::new(schema.clone(), Some("ts"), DecodeOptions::default())
            .expect("decoder");
        let ambiguous = r#"{"sensor":"s1","axis":2,"t0":0,"rate_hz":1,"samples":[1]}"#;
        assert_eq!(
            decoder.decode_record(ambiguous.as_bytes()),
            Err(DecodeError::AmbiguousValueColumn)
        );
        let resolved = r#"{"sensor":"s1","axis":2,"temp":21.5,"t0":0,"rate_hz":1,"samples":[1,2]}"#;
        assert_eq!(decoder.decode_record(resolved.as_bytes()), Ok(2));
        let all_named =
            r#"{"sensor":"s1","axis":2,"temp":21.5,"v":1,"t0":0,"rate_hz":1,"samples":[1]}"#;
        assert_eq!(
            decoder.decode_record(all_named.as_bytes()),
            Err(DecodeError::NoValueColumn)
        );

        let options = DecodeOptions {
            value_column: Some("temp".into()),
            ..DecodeOptions::default()
        };
        let mut explicit = JsonDecoder::new(schema, Some("ts"), options).expect("decoder");
        assert_eq!(explicit.decode_record(ambiguous.as_bytes()), Ok(1));
        assert_eq!(
            decoded(&mut decoder)[3],
            "| s1     | 1970-01-01T00:00:00 | 2    | 1.0 | 21.5 |"
        );
        assert_eq!(
            decoded(&mut explicit)[3],
            "| s1     | 1970-01-01T00:00:00 | 2    |   | 1.0  |"
        );
    }

    #[test]
    fn each_rejection_has_its_reason() {
        for (record, reason) in [
            (r#"{"sensor":"s1","ts":0,"v":1"#, "invalid json"),
            (r#"{"sensor":"s1" "ts":0}"#, "invalid json"),
            (r#"{"sensor":"s1","ts":0,"v":1} trailing"#, "invalid json"),
            (r#"{"sensor":"s1","ts":0,"v":1.2.3}"#, "invalid json"),
            (r#"{"sensor":"s1","ts":0,"v":tru}"#, "invalid json"),
            ("", "invalid json"),
            (r#"[1,2]"#, "expected a json object"),
            (r#"{"ts":0,"v":1}"#, "missing field 'sensor'"),
            (r#"{"sensor":"s1","v":1}"#, "missing field 'ts'"),
            (
                r#"{"sensor":null,"ts":0}"#,
                "null for required field 'sensor'",
            ),
            (
                r#"{"sensor":"s1","ts":0,"v":"0.5"}"#,
                "wrong type for 'v': expected number",
            ),
            (
                r#"{"sensor":"s1","ts":0,"v":true}"#,
                "wrong type for 'v': expected number",
            ),
            (
                r#"{"sensor":7,"ts":0}"#,
                "wrong type for 'sensor': expected string",
            ),
            (
                r#"{"sensor":"s1","ts":0,"v":"NaN"}"#,
                "non-numeric value for 'v'",
            ),
            (
                r#"{"sensor":"s1","ts":0,"v":NaN}"#,
                "non-numeric value for 'v'",
            ),
            (
                r#"{"sensor":"s1","ts":0,"v":-Infinity}"#,
                "non-numeric value for 'v'",
            ),
            (
                r#"{"sensor":"s1","ts":0,"v":1e999}"#,
                "value out of range for 'v'",
            ),
            (
                r#"{"sensor":"s1","ts":"yesterday"}"#,
                "invalid timestamp for 'ts'",
            ),
            (r#"{"sensor":"s1","ts":1e30}"#, "invalid timestamp for 'ts'"),
            (
                r#"{"sensor":"s1","ts":[0]}"#,
                "wrong type for 'ts': expected timestamp",
            ),
            (
                r#"{"sensor":"s1","rate_hz":10,"samples":[1]}"#,
                "missing field 't0'",
            ),
            (
                r#"{"sensor":"s1","t0":0,"samples":[1]}"#,
                "missing field 'rate_hz'",
            ),
            (
                r#"{"sensor":"s1","t0":0,"rate_hz":0,"samples":[1]}"#,
                "invalid rate_hz: expected a positive number",
            ),
            (
                r#"{"sensor":"s1","t0":"x","rate_hz":1,"samples":[1]}"#,
                "invalid timestamp for 't0'",
            ),
            (
                r#"{"sensor":"s1","t0":0,"rate_hz":1,"samples":3}"#,
                "wrong type for 'samples': expected array of numbers",
            ),
            (
                r#"{"sensor":"s1","t0":0,"rate_hz":1,"samples":[1,"x"]}"#,
                "wrong type for 'v': expected number",
            ),
            (
                r#"{"sensor":"s1","t0":0,"rate_hz":1,"samples":[1,NaN]}"#,
                "non-numeric value for 'v'",
            ),
            (
                r#"{"sensor":"s1","t0":0,"rate_hz":1,"samples":[1 2]}"#,
                "invalid json",
            ),
            (
                r#"{"sensor":"s1","t0":0,"rate_hz":1,"samples":[1,]}"#,
                "invalid json",
            ),
            (
                r#"{"sensor":"s1","v":1,"t0":0,"rate_hz":1,"samples":[1]}"#,
                "block has no value column",
            ),
        ] {
            assert_eq!(rejection(record), reason, "{record}");
        }
        let mut decoder = decoder();
        assert_eq!(
            decoder.decode_record(b"{\"sensor\":\"\xff\",\"ts\":0}"),
            Err(DecodeError::InvalidUtf8)
        );
        // Only kept strings are checked: bytes in a field the schema ignores do not matter.
        assert_eq!(
            decoder.decode_record(b"{\"sensor\":\"s1\",\"ts\":0,\"note\":\"\xff\"}"),
            Ok(1)
        );
    }

    #[test]
    fn a_rejected_record_leaves_no_partial_row() {
        let mut decoder = decoder();
        let good = br#"{"sensor":"s1","ts":0,"v":1}"#;
        assert_eq!(decoder.decode_record(good), Ok(1));
        // Each of these fails after earlier columns were already parsed.
        for bad in [
            &br#"{"sensor":"s2","ts":0,"v":"oops"}"#[..],
            br#"{"sensor":"s\u0041","ts":"bad"}"#,
            br#"{"sensor":"s3","t0":0,"rate_hz":1,"samples":[1,2,"x"]}"#,
        ] {
            assert!(decoder.decode_record(bad).is_err());
        }
        assert_eq!(decoder.len(), 1);
        assert_eq!(decoder.decode_record(good), Ok(1));
        let batch = decoder.flush().ok().flatten().expect("batch");
        assert_eq!(batch.num_rows(), 2);
        assert_eq!(table(&batch)[3], table(&batch)[4]);
    }

    #[test]
    fn integer_boolean_and_unsigned_columns() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::UInt16, false),
            Field::new("delta", DataType::Int8, true),
            Field::new("ok", DataType::Boolean, true),
        ]));
        let mut decoder =
            JsonDecoder::new(schema, None, DecodeOptions::default()).expect("decoder");
        assert_eq!(
            decoder.decode_record(br#"{"id":65535,"delta":-128,"ok":false}"#),
            Ok(1)
        );
        assert_eq!(
            decoder.decode_record(br#"{"id":65536}"#),
            Err(DecodeError::OutOfRange(Arc::from("id")))
        );
        assert_eq!(
            decoder
                .decode_record(br#"{"id":1.5}"#)
                .map_err(|e| e.to_string()),
            Err("wrong type for 'id': expected integer".to_owned())
        );
        assert_eq!(
            decoder
                .decode_record(br#"{"id":1,"ok":"yes"}"#)
                .map_err(|e| e.to_string()),
            Err("wrong type for 'ok': expected boolean".to_owned())
        );
        assert_eq!(decoded(&mut decoder)[3], "| 65535 | -128  | false |");
    }

    #[test]
    fn unsupported_column_types_and_bad_value_columns_are_config_errors() {
        let schema = Arc::new(Schema::new(vec![Field::new(
            "tags",
            DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
            true,
        )]));
        let error = JsonDecoder::new(schema, None, DecodeOptions::default())
            .map(|_| ())
            .map_err(|e| e.to_string());
        assert!(error.is_err_and(|e| e.contains("column 'tags' has type List")));

        let options = DecodeOptions {
            value_column: Some("sensor".into()),
            ..DecodeOptions::default()
        };
        assert!(JsonDecoder::new(vibration_schema(), Some("ts"), options).is_err());
        assert!(JsonDecoder::new(vibration_schema(), Some("v"), DecodeOptions::default()).is_err());
    }

    #[test]
    fn unescapes_surrogate_pairs_and_rejects_bad_escapes() {
        let mut out = String::new();
        assert_eq!(unescape(br#"a\"b\\\/\n\ud83d\ude00"#, &mut out), Ok(()));
        assert_eq!(out, "a\"b\\/\n\u{1F600}");
        for bad in [&br#"\x"#[..], br#"\ud83d"#, br#"\u12"#] {
            assert_eq!(
                unescape(bad, &mut String::new()),
                Err(DecodeError::InvalidJson)
            );
        }
    }

    #[test]
    fn arrays_split_into_their_elements() {
        let mut ranges = Vec::new();
        let payload = br#" [ {"a":1}, {"b":[1,2]} ,3 ] "#;
        assert_eq!(array_elements(payload, &mut ranges), Some(Ok(())));
        let elements: Vec<&[u8]> = ranges.iter().map(|r| &payload[r.clone()]).collect();
        assert_eq!(elements, [&br#"{"a":1}"#[..], br#"{"b":[1,2]}"#, b"3"]);
        assert_eq!(array_elements(b"[]", &mut ranges), Some(Ok(())));
        assert!(ranges.is_empty());
        assert_eq!(array_elements(br#"{"a":1}"#, &mut ranges), None);
        assert_eq!(
            array_elements(b"[1,", &mut ranges),
            Some(Err(DecodeError::InvalidJson))
        );
        assert_eq!(
            array_elements(b"[1] x", &mut ranges),
            Some(Err(DecodeError::InvalidJson))
        );
    }
}
