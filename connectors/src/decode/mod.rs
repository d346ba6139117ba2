//! Payload decoders: bytes in, Arrow record batches out, malformed records out to the side.
//!
//! A decoder owns one Arrow builder per column of the target schema and appends each record
//! straight into them; [`RecordDecoder::flush`] turns what has accumulated into a batch.
//! A record is decoded in two steps: first every field is parsed and checked into small
//! reusable scratch state, and only when the whole record is valid are the builders touched.
//! So a rejected record never leaves half a row behind, and the caller can send it to the
//! [`DeadLetterQueue`] and carry on.
//!
//! - [`JsonDecoder`]: JSON objects, one sample per object or a block of samples per object.
//! - [`CsvDecoder`]: CSV lines, columns matched by the header row.
//! - [`SparkplugDecoder`]: Sparkplug B protobuf payloads with their MQTT topics, one row per
//!   metric, aliases resolved through the birth certificates.

pub mod csv;
pub mod json;
pub mod sparkplug;

use std::sync::Arc;

use arrow::array::StringArray;
use arrow::array::builder::NullBufferBuilder;
use arrow::array::{
    ArrayRef, BooleanBuilder, Float32Builder, Float64Builder, Int8Builder, Int16Builder,
    Int32Builder, Int64Builder, RecordBatch, TimestampNanosecondBuilder, UInt8Builder,
    UInt16Builder, UInt32Builder, UInt64Builder,
};
use arrow::buffer::{Buffer, OffsetBuffer, ScalarBuffer};
use arrow::datatypes::{DataType, Field, SchemaRef, TimeUnit as ArrowTimeUnit};

pub use self::csv::CsvDecoder;
pub use self::json::JsonDecoder;
pub use self::sparkplug::SparkplugDecoder;
use crate::dead_letter::DeadLetterQueue;
use crate::error::{ConnectorError, Result};
use crate::time::TimeUnit;

/// Options shared by the decoders.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Unit of epoch numbers in timestamp columns. Sparkplug ignores it: its timestamps are
    /// always milliseconds.
    pub time_unit: TimeUnit,
    /// Column that receives the samples of a JSON block; when `None`, the one numeric column
    /// (other than event time) that the block object does not name. For Sparkplug, the column
    /// that receives metric values; when `None`, the column named `value`.
    pub value_column: Option<String>,
}

/// Why one record was rejected.
///
/// The `Display` form is the dead-letter reason: short, stable, and free of the record's
/// values so that letters can be counted per reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The record is not UTF-8.
    #[error("invalid utf-8")]
    InvalidUtf8,
    /// The record is not well-formed JSON.
    #[error("invalid json")]
    InvalidJson,
    /// The record is JSON but not an object.
    #[error("expected a json object")]
    NotAnObject,
    /// A non-nullable column has no field in the record.
    #[error("missing field '{0}'")]
    MissingField(Arc<str>),
    /// A non-nullable column's field is `null` or empty.
    #[error("null for required field '{0}'")]
    NullField(Arc<str>),
    /// A field has a JSON type the column cannot hold.
    #[error("wrong type for '{column}': expected {expected}")]
    WrongType {
        /// The column.
        column: Arc<str>,
        /// What the column accepts, e.g. `number`.
        expected: &'static str,
    },
    /// A numeric field holds `NaN`, `Infinity` or such, bare or quoted: JSON has no
    /// non-finite numbers, and a sensor sending them is reporting a fault, not a reading.
    #[error("non-numeric value for '{0}'")]
    NonNumeric(Arc<str>),
    /// A number does not fit the column's type.
    #[error("value out of range for '{0}'")]
    OutOfRange(Arc<str>),
    /// A timestamp field is neither RFC 3339 nor an epoch number in range.
    #[error("invalid timestamp for '{0}'")]
    InvalidTimestamp(Arc<str>),
    /// A block's `rate_hz` is not a positive finite number.
    #[error("invalid rate_hz: expected a positive number")]
    InvalidRate,
    /// A block names every numeric column, so none is left for its samples.
    #[error("block has no value column")]
    NoValueColumn,
    /// A block leaves several numeric columns unnamed and no `value_column` is configured.
    #[error("block value column is ambiguous")]
    AmbiguousValueColumn,
    /// A CSV line has more fields than its header.
    #[error("wrong number of csv fields")]
    FieldCount,
    /// A CSV line has an unterminated or misplaced quote.
    #[error("invalid csv quoting")]
    InvalidCsv,
    /// An MQTT topic outside the `spBv1.0/{group}/{message type}/{edge node}[/{device}]`
    /// namespace, or with a message type Sparkplug B does not define.
    #[error("not a sparkplug topic")]
    NotSparkplugTopic,
    /// The payload is not a Sparkplug B protobuf, or breaks its rules: a `seq` above 255, a
    /// birth metric without a name or with a repeated alias, a metric with neither name nor
    /// alias.
    #[error("invalid sparkplug payload")]
    InvalidSparkplug,
    /// A data message names a metric by an alias that no birth certificate of the
    /// edge node or device defined, typically because the decoder started after the birth.
    #[error("sparkplug metric alias without a birth certificate")]
    UnknownSparkplugAlias,
}

type DecodeResult<T> = std::result::Result<T, DecodeError>;

/// A decoder of records into Arrow batches, as driven by a source.
pub trait RecordDecoder: Send {
    /// Decodes one record (one JSON object, one CSV line) into the pending rows; returns how
    /// many rows it added. On error nothing was added.
    fn decode_record(&mut self, record: &[u8]) -> DecodeResult<usize>;

    /// Rows decoded and not yet flushed.
    fn len(&self) -> usize;

    /// Whether no rows are pending.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Turns the pending rows into a batch; `None` when there are none.
    fn flush(&mut self) -> Result<Option<RecordBatch>>;

    /// Decodes newline-separated records, sending rejected ones to `dead_letters` as coming
    /// from `source`. Blank lines are skipped. Returns how many rows were added.
    fn decode_lines(
        &mut self,
        bytes: &[u8],
        source: &str,
        dead_letters: &DeadLetterQueue,
    ) -> usize {
        let mut rows = 0;
        let mut start = 0;
        while start < bytes.len() {
            let end = memchr::memchr(b'\n', &bytes[start..]).map_or(bytes.len(), |i| start + i);
            let line = bytes[start..end].trim_ascii();
            start = end + 1;
            if line.is_empty() {
                continue;
            }
            match self.decode_record(line) {
                Ok(added) => rows += added,
                Err(reason) => dead_letters.push(source, &reason.to_string(), line),
            }
        }
        rows
    }
}

/// What kind of value a column holds, as far as decoding is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ColumnKind {
    Utf8,
    Int8,
    Int16,
    Int32,
    Int64,
    UInt8,
    UInt16,
    UInt32,
    UInt64,
    Float32,
    Float64,
    Boolean,
    Timestamp,
}

impl ColumnKind {
    fn of(data_type: &DataType) -> Option<Self> {
        Some(match data_type {
            DataType::Utf8 => Self::Utf8,
            DataType::Int8 => Self::Int8,
            DataType::Int16 => Self::Int16,
            DataType::Int32 => Self::Int32,
            DataType::Int64 => Self::Int64,
            DataType::UInt8 => Self::UInt8,
            DataType::UInt16 => Self::UInt16,
            DataType::UInt32 => Self::UInt32,
            DataType::UInt64 => Self::UInt64,
            DataType::Float32 => Self::Float32,
            DataType::Float64 => Self::Float64,
            DataType::Boolean => Self::Boolean,
            DataType::Timestamp(ArrowTimeUnit::Nanosecond, _) => Self::Timestamp,
            _ => return None,
        })
    }

    pub(crate) fn is_numeric(self) -> bool {
        !matches!(self, Self::Utf8 | Self::Boolean | Self::Timestamp)
    }

    fn is_signed_int(self) -> bool {
        matches!(self, Self::Int8 | Self::Int16 | Self::Int32 | Self::Int64)
    }

    fn is_unsigned_int(self) -> bool {
        matches!(
            self,
            Self::UInt8 | Self::UInt16 | Self::UInt32 | Self::UInt64
        )
    }

    fn signed_range(self) -> (i64, i64) {
        match self {
            Self::Int8 => (i8::MIN.into(), i8::MAX.into()),
            Self::Int16 => (i16::MIN.into(), i16::MAX.into()),
            Self::Int32 => (i32::MIN.into(), i32::MAX.into()),
            _ => (i64::MIN, i64::MAX),
        }
    }

    fn unsigned_max(self) -> u64 {
        match self {
            Self::UInt8 => u8::MAX.into(),
            Self::UInt16 => u16::MAX.into(),
            Self::UInt32 => u32::MAX.into(),
            _ => u64::MAX,
        }
    }
}

/// A column of the target schema as the decoders see it.
#[derive(Debug)]
pub(crate) struct Column {
    pub(crate) name: Arc<str>,
    pub(crate) kind: ColumnKind,
    pub(crate) nullable: bool,
    data_type: DataType,
}

/// One parsed, checked field of the record being decoded. Strings are byte ranges into either
/// the record or the decoder's unescape buffer, so a cell never owns heap memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Cell {
    Null,
    Int(i64),
    UInt(u64),
    Float(f64),
    Bool(bool),
    Str {
        start: usize,
        end: usize,
        unescaped: bool,
    },
}

/// Where the bytes of [`Cell::Str`] live.
pub(crate) struct StrSources<'a> {
    pub(crate) record: &'a [u8],
    pub(crate) unescaped: &'a str,
}

impl StrSources<'_> {
    /// The text of a string cell. Decoders check a string is UTF-8 before making it a cell, so
    /// the fallback to `""` is never taken.
    fn get(&self, start: usize, end: usize, unescaped: bool) -> &str {
        if unescaped {
            self.unescaped.get(start..end).unwrap_or_default()
        } else {
            self.record
                .get(start..end)
                .and_then(|bytes| std::str::from_utf8(bytes).ok())
                .unwrap_or_default()
        }
    }
}

/// Builds a `Utf8` column like Arrow's `StringBuilder`, but repeats a value in bulk.
///
/// A block's key (its sensor) is one string for every sample of the block. Arrow's builder
/// copies it and converts its end offset once per row, which took a third of the decoding
/// time of 100-sample blocks; here the bytes are copied by doubling what is already there
/// (log2(n) copies) and the offsets are one arithmetic progression.
#[derive(Debug)]
pub(crate) struct Utf8Builder {
    values: Vec<u8>,
    /// Arrow's offsets: 0, then the end of every row's value.
    offsets: Vec<i32>,
    nulls: NullBufferBuilder,
}

impl Utf8Builder {
    pub(crate) fn with_capacity(rows: usize, bytes: usize) -> Self {
        let mut offsets = Vec::with_capacity(rows + 1);
        offsets.push(0);
        Self {
            values: Vec::with_capacity(bytes),
            offsets,
            nulls: NullBufferBuilder::new(rows),
        }
    }

    /// Where the next value starts. Panics past 2 GiB of strings in one batch, as Arrow's
    /// builder does (a batch holds at most a few thousand rows of bounded messages).
    fn end(&self) -> i32 {
        i32::try_from(self.values.len()).expect("a batch's strings exceed 2 GiB")
    }

    pub(crate) fn append_value(&mut self, value: &str) {
        self.values.extend_from_slice(value.as_bytes());
        let end = self.end();
        self.offsets.push(end);
        self.nulls.append_non_null();
    }

    pub(crate) fn append_value_n(&mut self, value: &str, n: usize) {
        let bytes = value.as_bytes();
        let start = self.values.len();
        let first = self.end();
        let total = bytes
            .len()
            .checked_mul(n)
            .expect("repeated string size overflows");
        self.values.reserve(total);
        self.values
            .extend_from_slice(&bytes[..bytes.len().min(total)]);
        while self.values.len() - start < total {
            let copied = self.values.len() - start;
            self.values
                .extend_from_within(start..start + copied.min(total - copied));
        }
        // Checked for the last end only: every end before it is smaller.
        let last = self.end();
        let length = bytes.len() as i32;
        self.offsets
            .extend((1..=n).map(|row| first + length * row as i32));
        debug_assert_eq!(self.offsets.last(), Some(&last));
        self.nulls.append_n_non_nulls(n);
    }

    pub(crate) fn append_nulls(&mut self, n: usize) {
        let end = self.end();
        self.offsets.extend(std::iter::repeat_n(end, n));
        self.nulls.append_n_nulls(n);
    }

    /// The column so far; the builder starts again empty.
    #[allow(unsafe_code)]
    pub(crate) fn finish(&mut self) -> StringArray {
        let rows = self.offsets.len() - 1;
        let mut offsets = Vec::with_capacity(rows + 1);
        offsets.push(0);
        let offsets = OffsetBuffer::new(ScalarBuffer::from(std::mem::replace(
            &mut self.offsets,
            offsets,
        )));
        let capacity = self.values.capacity();
        let values = Buffer::from_vec(std::mem::replace(
            &mut self.values,
            Vec::with_capacity(capacity),
        ));
        let nulls = self.nulls.finish();
        // SAFETY: the offsets are valid (checked by `OffsetBuffer::new`) and every value was
        // appended whole from a `&str`, so each row's bytes are UTF-8, as Arrow's own
        // builder relies on too.
        unsafe { StringArray::new_unchecked(offsets, values, nulls) }
    }
}

/// An Arrow builder for one [`ColumnKind`].
#[derive(Debug)]
pub(crate) enum ColumnBuilder {
    Utf8(Utf8Builder),
    Int8(Int8Builder),
    Int16(Int16Builder),
    Int32(Int32Builder),
    Int64(Int64Builder),
    UInt8(UInt8Builder),
    UInt16(UInt16Builder),
    UInt32(UInt32Builder),
    UInt64(UInt64Builder),
    Float32(Float32Builder),
    Float64(Float64Builder),
    Boolean(BooleanBuilder),
    Timestamp(TimestampNanosecondBuilder),
}

impl ColumnBuilder {
    fn new(kind: ColumnKind, data_type: &DataType, capacity: usize) -> Self {
        match kind {
            ColumnKind::Utf8 => Self::Utf8(Utf8Builder::with_capacity(capacity, capacity * 8)),
            ColumnKind::Int8 => Self::Int8(Int8Builder::with_capacity(capacity)),
            ColumnKind::Int16 => Self::Int16(Int16Builder::with_capacity(capacity)),
            ColumnKind::Int32 => Self::Int32(Int32Builder::with_capacity(capacity)),
            ColumnKind::Int64 => Self::Int64(Int64Builder::with_capacity(capacity)),
            ColumnKind::UInt8 => Self::UInt8(UInt8Builder::with_capacity(capacity)),
            ColumnKind::UInt16 => Self::UInt16(UInt16Builder::with_capacity(capacity)),
            ColumnKind::UInt32 => Self::UInt32(UInt32Builder::with_capacity(capacity)),
            ColumnKind::UInt64 => Self::UInt64(UInt64Builder::with_capacity(capacity)),
            ColumnKind::Float32 => Self::Float32(Float32Builder::with_capacity(capacity)),
            ColumnKind::Float64 => Self::Float64(Float64Builder::with_capacity(capacity)),
            ColumnKind::Boolean => Self::Boolean(BooleanBuilder::with_capacity(capacity)),
            ColumnKind::Timestamp => {
                let timezone = match data_type {
                    DataType::Timestamp(_, tz) => tz.clone(),
                    _ => None,
                };
                Self::Timestamp(
                    TimestampNanosecondBuilder::with_capacity(capacity).with_timezone_opt(timezone),
                )
            }
        }
    }

    /// Appends `cell` `n` times. The cell was checked against this column's kind, so the
    /// narrowing casts below cannot lose information.
    pub(crate) fn append_n(&mut self, cell: Cell, n: usize, strings: &StrSources<'_>) {
        match (self, cell) {
            (Self::Utf8(b), Cell::Null) => b.append_nulls(n),
            (Self::Int8(b), Cell::Null) => b.append_nulls(n),
            (Self::Int16(b), Cell::Null) => b.append_nulls(n),
            (Self::Int32(b), Cell::Null) => b.append_nulls(n),
            (Self::Int64(b), Cell::Null) => b.append_nulls(n),
            (Self::UInt8(b), Cell::Null) => b.append_nulls(n),
            (Self::UInt16(b), Cell::Null) => b.append_nulls(n),
            (Self::UInt32(b), Cell::Null) => b.append_nulls(n),
            (Self::UInt64(b), Cell::Null) => b.append_nulls(n),
            (Self::Float32(b), Cell::Null) => b.append_nulls(n),
            (Self::Float64(b), Cell::Null) => b.append_nulls(n),
            (Self::Boolean(b), Cell::Null) => b.append_nulls(n),
            (Self::Timestamp(b), Cell::Null) => b.append_nulls(n),
            (
                Self::Utf8(b),
                Cell::Str {
                    start,
                    end,
                    unescaped,
                },
            ) => b.append_value_n(strings.get(start, end, unescaped), n),
            (Self::Int8(b), Cell::Int(v)) => b.append_value_n(v as i8, n),
            (Self::Int16(b), Cell::Int(v)) => b.append_value_n(v as i16, n),
            (Self::Int32(b), Cell::Int(v)) => b.append_value_n(v as i32, n),
            (Self::Int64(b), Cell::Int(v)) => b.append_value_n(v, n),
            (Self::Timestamp(b), Cell::Int(v)) => b.append_value_n(v, n),
            (Self::UInt8(b), Cell::UInt(v)) => b.append_value_n(v as u8, n),
            (Self::UInt16(b), Cell::UInt(v)) => b.append_value_n(v as u16, n),
            (Self::UInt32(b), Cell::UInt(v)) => b.append_value_n(v as u32, n),
            (Self::UInt64(b), Cell::UInt(v)) => b.append_value_n(v, n),
            (Self::Float32(b), Cell::Float(v)) => b.append_value_n(v as f32, n),
            (Self::Float64(b), Cell::Float(v)) => b.append_value_n(v, n),
            (Self::Boolean(b), Cell::Bool(v)) => b.append_n(n, v),
            // Unreachable by construction; a null keeps the columns aligned if it ever is not.
            (builder, _) => builder.append_nulls(n),
        }
    }

    /// Appends one `cell`; the single-row twin of [`Self::append_n`].
    pub(crate) fn append(&mut self, cell: Cell, strings: &StrSources<'_>) {
        match (self, cell) {
            (
                Self::Utf8(b),
                Cell::Str {
                    start,
                    end,
                    unescaped,
                },
            ) => b.append_value(strings.get(start, end, unescaped)),
            (Self::Int8(b), Cell::Int(v)) => b.append_value(v as i8),
            (Self::Int16(b), Cell::Int(v)) => b.append_value(v as i16),
            (Self::Int32(b), Cell::Int(v)) => b.append_value(v as i32),
            (Self::Int64(b), Cell::Int(v)) => b.append_value(v),
            (Self::Timestamp(b), Cell::Int(v)) => b.append_value(v),
            (Self::UInt8(b), Cell::UInt(v)) => b.append_value(v as u8),
            (Self::UInt16(b), Cell::UInt(v)) => b.append_value(v as u16),
            (Self::UInt32(b), Cell::UInt(v)) => b.append_value(v as u32),
            (Self::UInt64(b), Cell::UInt(v)) => b.append_value(v),
            (Self::Float32(b), Cell::Float(v)) => b.append_value(v as f32),
            (Self::Float64(b), Cell::Float(v)) => b.append_value(v),
            (Self::Boolean(b), Cell::Bool(v)) => b.append_value(v),
            (builder, _) => builder.append_nulls(1),
        }
    }

    /// Appends a block's samples to a `DOUBLE` column; the samples at the positions in `nulls`
    /// are null.
    pub(crate) fn append_floats(&mut self, values: &[f64], nulls: &[usize]) {
        match self {
            Self::Float64(b) if nulls.is_empty() => b.append_slice(values),
            Self::Float64(b) => {
                let mut valid = vec![true; values.len()];
                for &null in nulls {
                    valid[null] = false;
                }
                b.append_values(values, &valid);
            }
            builder => builder.append_nulls(values.len()),
        }
    }

    /// Appends event times to a timestamp column.
    pub(crate) fn append_timestamps(&mut self, nanos: &[i64]) {
        match self {
            Self::Timestamp(b) => b.append_slice(nanos),
            builder => builder.append_nulls(nanos.len()),
        }
    }

    fn append_nulls(&mut self, n: usize) {
        self.append_n(
            Cell::Null,
            n,
            &StrSources {
                record: &[],
                unescaped: "",
            },
        );
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            Self::Utf8(b) => Arc::new(b.finish()),
            Self::Int8(b) => Arc::new(b.finish()),
            Self::Int16(b) => Arc::new(b.finish()),
            Self::Int32(b) => Arc::new(b.finish()),
            Self::Int64(b) => Arc::new(b.finish()),
            Self::UInt8(b) => Arc::new(b.finish()),
            Self::UInt16(b) => Arc::new(b.finish()),
            Self::UInt32(b) => Arc::new(b.finish()),
            Self::UInt64(b) => Arc::new(b.finish()),
            Self::Float32(b) => Arc::new(b.finish()),
            Self::Float64(b) => Arc::new(b.finish()),
            Self::Boolean(b) => Arc::new(b.finish()),
            Self::Timestamp(b) => Arc::new(b.finish()),
        }
    }
}

/// The target schema's columns and their builders, shared by the decoders.
#[derive(Debug)]
pub(crate) struct Columns {
    pub(crate) schema: SchemaRef,
    pub(crate) columns: Vec<Column>,
    pub(crate) builders: Vec<ColumnBuilder>,
    pub(crate) rows: usize,
    capacity: usize,
}

/// Rows a decoder preallocates for; builders grow past it as needed.
const INITIAL_CAPACITY: usize = 1024;

impl Columns {
    /// Builders for `schema`; `decoder` names the format in the error for an unsupported type.
    pub(crate) fn new(schema: SchemaRef, decoder: &'static str) -> Result<Self> {
        let mut columns = Vec::with_capacity(schema.fields().len());
        let mut builders = Vec::with_capacity(schema.fields().len());
        for field in schema.fields() {
            let kind = column_kind(field, decoder)?;
            builders.push(ColumnBuilder::new(
                kind,
                field.data_type(),
                INITIAL_CAPACITY,
            ));
            columns.push(Column {
                name: Arc::from(field.name().as_str()),
                kind,
                nullable: field.is_nullable(),
                data_type: field.data_type().clone(),
            });
        }
        Ok(Self {
            schema,
            columns,
            builders,
            rows: 0,
            capacity: INITIAL_CAPACITY,
        })
    }

    pub(crate) fn index_of(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| &*c.name == name)
    }

    /// The latest time in timestamp column `column` among the pending rows from `from_row`
    /// on; `None` when there is none (a null reads as the epoch, never the latest).
    pub(crate) fn latest_time(&self, column: usize, from_row: usize) -> Option<i64> {
        let ColumnBuilder::Timestamp(builder) = &self.builders[column] else {
            return None;
        };
        builder
            .values_slice()
            .get(from_row..)?
            .iter()
            .copied()
            .max()
    }

    pub(crate) fn flush(&mut self) -> Result<Option<RecordBatch>> {
        if self.rows == 0 {
            return Ok(None);
        }
        // Arrow's finish() hands the buffers over and leaves empty ones; preallocating the next
        // batch's builders for what this one needed avoids regrowing them row by row.
        self.capacity = self.capacity.max(self.rows);
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(self.builders.len());
        for (builder, column) in self.builders.iter_mut().zip(&self.columns) {
            arrays.push(builder.finish());
            *builder = ColumnBuilder::new(column.kind, &column.data_type, self.capacity);
        }
        self.rows = 0;
        Ok(Some(RecordBatch::try_new(self.schema.clone(), arrays)?))
    }
}

fn column_kind(field: &Field, decoder: &'static str) -> Result<ColumnKind> {
    ColumnKind::of(field.data_type()).ok_or_else(|| {
        ConnectorError::config(
            decoder,
            format!(
                "column '{}' has type {}, which the {decoder} decoder cannot fill; supported: \
                 TEXT, integers, FLOAT, DOUBLE, BOOLEAN, TIMESTAMP",
                field.name(),
                field.data_type()
            ),
        )
    })
}

/// Resolves the event-time column name to its index, checking its type.
pub(crate) fn event_time_index(
    columns: &Columns,
    event_time: Option<&str>,
    decoder: &'static str,
) -> Result<Option<usize>> {
    let Some(name) = event_time else {
        return Ok(None);
    };
    let index = columns.index_of(name).ok_or_else(|| {
        ConnectorError::config(
            decoder,
            format!("event-time column '{name}' is not in the schema"),
        )
    })?;
    if columns.columns[index].kind != ColumnKind::Timestamp {
        return Err(ConnectorError::config(
            decoder,
            format!("event-time column '{name}' must be a TIMESTAMP"),
        ));
    }
    Ok(Some(index))
}

/// Parses an integer written in plain decimal (`-12`, `7`) into a cell of `column`'s kind.
/// Anything with a fraction or exponent is rejected rather than truncated.
pub(crate) fn integer_cell(column: &Column, text: &[u8]) -> DecodeResult<Cell> {
    let (negative, digits) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, text),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(DecodeError::WrongType {
            column: column.name.clone(),
            expected: "integer",
        });
    }
    let out_of_range = || DecodeError::OutOfRange(column.name.clone());
    let mut magnitude: u64 = 0;
    for &d in digits {
        magnitude = magnitude
            .checked_mul(10)
            .and_then(|m| m.checked_add(u64::from(d - b'0')))
            .ok_or_else(out_of_range)?;
    }
    if column.kind.is_unsigned_int() {
        if negative && magnitude != 0 || magnitude > column.kind.unsigned_max() {
            return Err(out_of_range());
        }
        return Ok(Cell::UInt(magnitude));
    }
    let value = if negative {
        0i64.checked_sub_unsigned(magnitude)
    } else {
        i64::try_from(magnitude).ok()
    }
    .ok_or_else(out_of_range)?;
    let (min, max) = column.kind.signed_range();
    if value < min || value > max {
        return Err(out_of_range());
    }
    Ok(Cell::Int(value))
}

/// Parses a finite decimal number for a float or integer `column`. `text` must start like a
/// JSON number (a digit, or `-` and a digit); words such as `NaN` are the caller's business.
pub(crate) fn number_cell(column: &Column, text: &[u8]) -> DecodeResult<Cell> {
    if column.kind.is_signed_int() || column.kind.is_unsigned_int() {
        return integer_cell(column, text);
    }
    let wrong_type = || DecodeError::WrongType {
        column: column.name.clone(),
        expected: "number",
    };
    if !starts_like_number(text) {
        return Err(wrong_type());
    }
    let value = if column.kind == ColumnKind::Float32 {
        fast_float2::parse::<f32, _>(text).map(f64::from)
    } else {
        fast_float2::parse::<f64, _>(text)
    }
    .map_err(|_| wrong_type())?;
    if !value.is_finite() {
        return Err(DecodeError::OutOfRange(column.name.clone()));
    }
    Ok(Cell::Float(value))
}

/// Exact powers of ten up to the largest a short decimal needs.
const POW10: [f64; 16] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
];

/// Parses a plain decimal of at most 15 digits (`-12.345`, no exponent) at the start of
/// `text`, returning the value and the bytes used; `None` for anything else.
///
/// Sensors send short decimals, and for them this is Clinger's fast path without the generic
/// machinery of a full float parser: the digits fit a `u64` that converts to `f64` exactly,
/// the power of ten is exact, so the one division is correctly rounded. Callers fall back to
/// `fast-float2` when it returns `None`.
///
/// Reads eight bytes at a time: the integer and the fraction digits are each located and
/// converted with a few word operations instead of a loop over their bytes. A text too short
/// for the word reads (a number that ends its record, or one already cut to its own bytes) is
/// read from a zero-padded copy; zero is neither a digit nor a point, so parsing stops where
/// the text does.
#[inline]
pub(crate) fn parse_short_decimal(text: &[u8]) -> Option<(f64, usize)> {
    if text.len() < WORD_READS_SPAN {
        let mut padded = [0u8; WORD_READS_SPAN];
        padded[..text.len()].copy_from_slice(text);
        return parse_short_decimal_words(&padded);
    }
    parse_short_decimal_words(text)
}

/// The bytes [`parse_short_decimal_words`] reads at most: a sign, a word of integer digits
/// (seven used), the point and a word of fraction digits.
const WORD_READS_SPAN: usize = 17;

#[inline(always)]
fn parse_short_decimal_words(text: &[u8]) -> Option<(f64, usize)> {
    let negative = text.first() == Some(&b'-');
    let start = usize::from(negative);
    let Some(whole) = load_word(text, start) else {
        return parse_short_decimal_bytewise(text);
    };
    let whole_digits = leading_digits(whole);
    if whole_digits == 0 {
        return None;
    }
    if whole_digits == 8 {
        // A long integer part: rare, and it may run past the word.
        return parse_short_decimal_bytewise(text);
    }
    let mut mantissa = digits_value(whole, whole_digits);
    let mut i = start + whole_digits;
    let mut fraction_digits = 0;
    if text[i] == b'.' {
        let Some(fraction) = load_word(text, i + 1) else {
            return parse_short_decimal_bytewise(text);
        };
        fraction_digits = leading_digits(fraction);
        if fraction_digits == 0 {
            return None;
        }
        if fraction_digits == 8 {
            return parse_short_decimal_bytewise(text);
        }
        mantissa = mantissa * POW10_INT[fraction_digits] + digits_value(fraction, fraction_digits);
        i += 1 + fraction_digits;
    }
    if matches!(text.get(i), Some(b'e' | b'E')) {
        return None;
    }
    let magnitude = mantissa as f64 / POW10[fraction_digits];
    Some((if negative { -magnitude } else { magnitude }, i))
}

/// Integer powers of ten for the digits of one word.
const POW10_INT: [u64; 8] = [1, 10, 100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000];

/// The eight bytes at `at` as a little-endian word (first byte lowest), if there are eight.
#[inline(always)]
pub(crate) fn load_word(text: &[u8], at: usize) -> Option<u64> {
    let bytes = text.get(at..at.checked_add(8)?)?;
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

/// How many of the word's bytes, from the first, are ASCII digits.
#[inline(always)]
pub(crate) fn leading_digits(word: u64) -> usize {
    // A byte below '0' sets its top bit when '0' is subtracted, one above '9' when 0x46 is
    // added. Borrows and carries only move upwards, past the first non-digit, so they never
    // change where that is.
    let below = word.wrapping_sub(0x3030_3030_3030_3030);
    let above = word.wrapping_add(0x4646_4646_4646_4646);
    let non_digits = (below | above) & 0x8080_8080_8080_8080;
    (non_digits.trailing_zeros() / 8) as usize
}

/// The value of the first `count` (1 to 8) bytes of `word`, all ASCII digits.
#[inline(always)]
pub(crate) fn digits_value(word: u64, count: usize) -> u64 {
    // Keep the digits, shift them to the top (the freed low bytes read as leading zeros),
    // then combine pairs, quads and the two halves with three multiplications.
    let digits = (word.wrapping_sub(0x3030_3030_3030_3030) & (u64::MAX >> (64 - 8 * count)))
        << (8 * (8 - count));
    let pairs = (digits * 10 + (digits >> 8)) & 0x00ff_00ff_00ff_00ff;
    let quads = (pairs * 100 + (pairs >> 16)) & 0x0000_ffff_0000_ffff;
    (quads * 10_000 + (quads >> 32)) & 0xffff_ffff
}

/// The bytes [`parse_array_element`] looks at from the start of an element.
const ELEMENT_SPAN: usize = 24;

/// Parses the element of a JSON number array that starts at `at` in `b`, when it is a short
/// decimal (as [`parse_short_decimal`] reads them) followed at once by `,`: returns the value
/// and the element's length. `None` for anything else (whitespace, `null`, an exponent, a
/// long number, the last element, which `]` ends), which the caller reads the slow way.
///
/// This is the inner loop of a block's samples, and it is built so that finding where the
/// next element starts does not wait for this one's digits to be converted: the comma is
/// located first, with one word comparison over the next sixteen bytes, and the position of
/// the next element depends only on it. Reading the digits first and the separator after
/// them made each element wait for the one before it, about thirty cycles apart.
#[inline(always)]
pub(crate) fn parse_array_element(b: &[u8], at: usize) -> Option<(f64, usize)> {
    let mut padded = [0u8; ELEMENT_SPAN];
    let window: &[u8; ELEMENT_SPAN] = match b.get(at..at.checked_add(ELEMENT_SPAN)?) {
        Some(window) => window.try_into().ok()?,
        None => {
            let rest = b.get(at..)?;
            padded[..rest.len()].copy_from_slice(rest);
            &padded
        }
    };
    let first = u64::from_le_bytes(window[..8].try_into().ok()?);
    let second = u64::from_le_bytes(window[8..16].try_into().ok()?);
    // A comma past the end of the array (`1.5],"x":2`) is not taken for this element's end:
    // the `]` before it fails the digit checks below.
    let ends_first = bytes_equal(first, b',');
    let ends_second = bytes_equal(second, b',');
    let len = if ends_first != 0 {
        (ends_first.trailing_zeros() / 8) as usize
    } else if ends_second != 0 {
        8 + (ends_second.trailing_zeros() / 8) as usize
    } else {
        return None;
    };
    let negative = window[0] == b'-';
    let sign = usize::from(negative);
    let whole = u64::from_le_bytes(window[sign..sign + 8].try_into().ok()?);
    let whole_digits = leading_digits(whole);
    if whole_digits == 0 || whole_digits == 8 {
        return None;
    }
    let mut mantissa = digits_value(whole, whole_digits);
    let point = sign + whole_digits;
    let mut fraction_digits = 0;
    if point != len {
        if window[point] != b'.' {
            return None;
        }
        fraction_digits = len - point - 1;
        let fraction = u64::from_le_bytes(window[point + 1..point + 9].try_into().ok()?);
        if fraction_digits == 0
            || fraction_digits >= 8
            || leading_digits(fraction) != fraction_digits
        {
            return None;
        }
        mantissa = mantissa * POW10_INT[fraction_digits] + digits_value(fraction, fraction_digits);
    }
    // At most fifteen digits: the mantissa is below 2^53, so it converts exactly, and as a
    // signed integer, which takes one instruction where an unsigned one takes several.
    let magnitude = mantissa as i64 as f64 / POW10[fraction_digits];
    Some((if negative { -magnitude } else { magnitude }, len))
}

/// The top bit of every byte of `word` that equals `byte`, and no other bit. Exact, unlike the
/// shorter zero-byte test, whose borrows flag a byte one above a match: `-` after `,`.
#[inline(always)]
fn bytes_equal(word: u64, byte: u8) -> u64 {
    let x = word ^ (u64::from(byte) * 0x0101_0101_0101_0101);
    let low_bits_carry = (x & 0x7f7f_7f7f_7f7f_7f7f) + 0x7f7f_7f7f_7f7f_7f7f;
    !(low_bits_carry | x) & 0x8080_8080_8080_8080
}

/// [`parse_short_decimal`] a byte at a time, for the last bytes of a text and long numbers.
fn parse_short_decimal_bytewise(text: &[u8]) -> Option<(f64, usize)> {
    let negative = text.first() == Some(&b'-');
    let mut i = usize::from(negative);
    let mut mantissa: u64 = 0;
    let mut digits = 0;
    while let Some(&d) = text.get(i).filter(|d| d.is_ascii_digit()) {
        mantissa = mantissa * 10 + u64::from(d - b'0');
        digits += 1;
        i += 1;
        if digits > 15 {
            return None;
        }
    }
    if digits == 0 {
        return None;
    }
    let mut fraction_digits = 0;
    if text.get(i) == Some(&b'.') {
        i += 1;
        while let Some(&d) = text.get(i).filter(|d| d.is_ascii_digit()) {
            mantissa = mantissa * 10 + u64::from(d - b'0');
            digits += 1;
            fraction_digits += 1;
            i += 1;
            if digits > 15 {
                return None;
            }
        }
        if fraction_digits == 0 {
            return None;
        }
    }
    if matches!(text.get(i), Some(b'e' | b'E')) {
        return None;
    }
    let magnitude = mantissa as f64 / POW10[fraction_digits];
    Some((if negative { -magnitude } else { magnitude }, i))
}

pub(crate) fn starts_like_number(text: &[u8]) -> bool {
    match text {
        [b'-', d, ..] | [d, ..] => d.is_ascii_digit(),
        [] => false,
    }
}

/// Whether `text` spells a non-finite float the way Python, JavaScript or C print one.
pub(crate) fn is_non_finite_word(text: &[u8]) -> bool {
    let text = match text.split_first() {
        Some((b'-' | b'+', rest)) => rest,
        _ => text,
    };
    ["nan", "inf", "infinity"]
        .iter()
        .any(|word| text.eq_ignore_ascii_case(word.as_bytes()))
}

#[cfg(test)]
pub(crate) mod test_support {
    use std::sync::Arc;

    use arrow::array::RecordBatch;
    use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
    use arrow::util::pretty::pretty_format_batches;

    /// `sensor TEXT NOT NULL, ts TIMESTAMP NOT NULL, v DOUBLE`, the brief's vibration source.
    pub(crate) fn vibration_schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("sensor", DataType::Utf8, false),
            Field::new("ts", DataType::Timestamp(TimeUnit::Nanosecond, None), false),
            Field::new("v", DataType::Float64, true),
        ]))
    }

    /// A batch as the lines of its pretty-printed table, for readable assertions.
    pub(crate) fn table(batch: &RecordBatch) -> Vec<String> {
        pretty_format_batches(std::slice::from_ref(batch))
            .map(|t| t.to_string().lines().map(str::to_owned).collect())
            .unwrap_or_else(|e| vec![e.to_string()])
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn column(kind: ColumnKind) -> Column {
        Column {
            name: Arc::from("x"),
            kind,
            nullable: true,
            data_type: DataType::Null,
        }
    }

    #[test]
    fn the_utf8_builder_builds_what_arrows_builds() {
        use arrow::array::StringBuilder;
        let mut rng = SmallRng::seed_from_u64(7);
        let values = [
            "",
            "s1",
            "sensor-0042",
            "ünïcödé",
            "a longer sensor name, 33 bytes..",
        ];
        let mut ours = Utf8Builder::with_capacity(4, 8);
        let mut arrows = StringBuilder::new();
        // Several batches from one builder, as a decoder flushes them.
        for _ in 0..20 {
            for _ in 0..rng.random_range(0..12) {
                let value = values[rng.random_range(0..values.len())];
                let n = rng.random_range(0..150);
                match rng.random_range(0..3) {
                    0 => {
                        ours.append_value(value);
                        arrows.append_value(value);
                    }
                    1 => {
                        ours.append_value_n(value, n);
                        arrows.append_value_n(value, n);
                    }
                    _ => {
                        ours.append_nulls(n);
                        arrows.append_nulls(n);
                    }
                }
            }
            let (ours, arrows) = (ours.finish(), arrows.finish());
            arrow::array::Array::to_data(&ours)
                .validate_full()
                .expect("a valid array");
            assert_eq!(ours, arrows);
        }
    }

    #[test]
    fn integers_are_range_checked_per_type() {
        assert_eq!(
            integer_cell(&column(ColumnKind::Int8), b"-128"),
            Ok(Cell::Int(-128))
        );
        assert_eq!(
            integer_cell(&column(ColumnKind::Int8), b"128"),
            Err(DecodeError::OutOfRange(Arc::from("x")))
        );
        assert_eq!(
            integer_cell(&column(ColumnKind::UInt32), b"-1"),
            Err(DecodeError::OutOfRange(Arc::from("x")))
        );
        assert_eq!(
            integer_cell(&column(ColumnKind::Int64), b"-9223372036854775808"),
            Ok(Cell::Int(i64::MIN))
        );
        assert_eq!(
            integer_cell(&column(ColumnKind::Int64), b"1.5").map_err(|e| e.to_string()),
            Err("wrong type for 'x': expected integer".to_owned())
        );
    }

    #[test]
    fn short_decimals_parse_exactly_like_a_full_parser() {
        for text in [
            "0",
            "-0",
            "1",
            "0.1",
            "-12.345",
            "123456789012345",
            "0.00000000000001",
            "3.14159",
            "99999.99999",
            "1.5,",
            "7]",
        ] {
            let (value, used) = parse_short_decimal(text.as_bytes()).expect(text);
            let number = text.trim_end_matches([',', ']']);
            assert_eq!(used, number.len(), "{text}");
            let expected: f64 = number.parse().expect(text);
            assert_eq!(value.to_bits(), expected.to_bits(), "{text}");
        }
        for long in [
            "1234567890123456",
            "0.1234567890123456",
            "1e5",
            "1.",
            ".5",
            "-",
            "x",
        ] {
            assert_eq!(parse_short_decimal(long.as_bytes()), None, "{long}");
        }
        for i in 0..10_000u32 {
            let text = format!("{:.4}", f64::from(i) * 0.37 - 1000.0);
            let parsed = parse_short_decimal(text.as_bytes()).map(|(v, _)| v.to_bits());
            assert_eq!(parsed, text.parse::<f64>().ok().map(f64::to_bits), "{text}");
        }
    }

    #[test]
    fn short_decimals_read_by_words_match_reading_bytewise() {
        // Every shape near the word boundaries, followed by what may follow in JSON or by
        // garbage, with and without room for a whole word after each part.
        let mut rng = SmallRng::seed_from_u64(0x9e37_79b9_7f4a_7c15);
        let mut next = |bound: u64| rng.random_range(0..bound);
        let tails = [
            "",
            ",",
            "]",
            ",0.5,1.25]}",
            "e3,",
            "E-1",
            ".",
            "x",
            "\u{e9}",
            "  ,",
            "-",
        ];
        let mut checked = 0;
        for _ in 0..200_000 {
            let mut text = String::new();
            if next(3) == 0 {
                text.push('-');
            }
            for _ in 0..next(11) {
                text.push(char::from(b'0' + next(10) as u8));
            }
            if next(4) != 0 {
                text.push('.');
                for _ in 0..next(11) {
                    text.push(char::from(b'0' + next(10) as u8));
                }
            }
            text.push_str(tails[next(tails.len() as u64) as usize]);
            let bytes = text.as_bytes();
            let words = parse_short_decimal(bytes).map(|(v, used)| (v.to_bits(), used));
            let bytewise = parse_short_decimal_bytewise(bytes).map(|(v, used)| (v.to_bits(), used));
            assert_eq!(words, bytewise, "{text:?}");
            checked += usize::from(words.is_some());
        }
        assert!(checked > 50_000, "most inputs should be numbers: {checked}");
    }

    #[test]
    fn digit_words() {
        assert_eq!(leading_digits(u64::from_le_bytes(*b"1234567x")), 7);
        assert_eq!(leading_digits(u64::from_le_bytes(*b"12345678")), 8);
        assert_eq!(leading_digits(u64::from_le_bytes(*b"/:09\xff000")), 0);
        assert_eq!(leading_digits(u64::from_le_bytes(*b"9\xc3\xa900000")), 1);
        assert_eq!(digits_value(u64::from_le_bytes(*b"1234567,"), 7), 1_234_567);
        assert_eq!(digits_value(u64::from_le_bytes(*b"05]}xxxx"), 2), 5);
        assert_eq!(digits_value(u64::from_le_bytes(*b"9......."), 1), 9);
        assert_eq!(
            digits_value(u64::from_le_bytes(*b"12345678"), 8),
            12_345_678
        );
        assert_eq!(
            digits_value(u64::from_le_bytes(*b"99999999"), 8),
            99_999_999
        );
    }

    #[test]
    fn non_finite_words() {
        for word in ["NaN", "nan", "-Infinity", "inf", "+INF"] {
            assert!(is_non_finite_word(word.as_bytes()), "{word}");
        }
        assert!(!is_non_finite_word(b"info"));
    }
}
