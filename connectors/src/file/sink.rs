//! The `file` and `stdout` sinks: rows rendered as JSON lines or CSV.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufWriter, Stdout, Write};
use std::path::PathBuf;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{
    DataType, Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type, TimeUnit,
    TimestampMicrosecondType, TimestampMillisecondType, TimestampNanosecondType,
    TimestampSecondType, UInt8Type, UInt16Type, UInt32Type, UInt64Type,
};
use arrow::util::display::{ArrayFormatter, FormatOptions};

use super::config::{FileSinkConfig, OutputFormat, StdoutSinkConfig, TimestampFormat};
use crate::Sink;
use crate::error::{ConnectorError, Result};
use crate::time::format_rfc3339;

/// Renders batches as text lines: JSON objects or CSV records, columns in schema order.
///
/// Strings are escaped for JSON or quoted for CSV, floats use Rust's shortest round-trip form
/// (`0.1`, `1.0`, `1e-7`; NaN and infinities, which JSON lacks, become null), timestamps of any
/// unit follow [`TimestampFormat`], and other types (decimals, dates, lists) are written as
/// strings in Arrow's display form. One `String` is reused for every row, so writing allocates
/// only when a row is longer than any before it.
#[derive(Debug)]
pub struct RowFormatter {
    format: OutputFormat,
    timestamps: TimestampFormat,
    header_written: bool,
    line: String,
    /// Rendered `"name":` per column (JSON) or the header line (CSV), for the current schema.
    keys: Vec<String>,
    /// Arrow's display form of a value of a type written as a string, before escaping.
    display: String,
}

/// One column of a batch, downcast once per batch rather than once per row.
enum ColumnView<'a> {
    Utf8(&'a arrow::array::StringArray),
    LargeUtf8(&'a arrow::array::LargeStringArray),
    Utf8View(&'a arrow::array::StringViewArray),
    Boolean(&'a arrow::array::BooleanArray),
    Int(Box<dyn Fn(usize) -> i64 + 'a>),
    UInt(&'a arrow::array::UInt64Array),
    SmallUInt(Box<dyn Fn(usize) -> u32 + 'a>),
    Float64(&'a arrow::array::Float64Array),
    Float32(&'a arrow::array::Float32Array),
    /// Nanoseconds since the epoch, whatever the column's unit.
    Timestamp(Box<dyn Fn(usize) -> i64 + 'a>),
    /// Anything else, in Arrow's display form, written as a string.
    Other(ArrayFormatter<'a>),
}

impl RowFormatter {
    /// A formatter for `format`, writing timestamps as `timestamps`.
    pub fn new(format: OutputFormat, timestamps: TimestampFormat) -> Self {
        Self {
            format,
            timestamps,
            header_written: false,
            line: String::with_capacity(256),
            keys: Vec::new(),
            display: String::new(),
        }
    }

    /// Writes every row of `batch` to `out`, preceded by the CSV header on the first batch.
    pub fn write_batch(
        &mut self,
        batch: &RecordBatch,
        out: &mut impl Write,
    ) -> std::io::Result<()> {
        let options = FormatOptions::default();
        let mut views = Vec::with_capacity(batch.num_columns());
        for column in batch.columns() {
            let array = column.as_ref();
            views.push((array, view(array, &options).map_err(std::io::Error::other)?));
        }
        self.prepare_keys(batch);
        if self.format == OutputFormat::Csv && !self.header_written {
            out.write_all(self.keys[0].as_bytes())?;
            self.header_written = true;
        }
        for row in 0..batch.num_rows() {
            self.line.clear();
            match self.format {
                OutputFormat::Json => self.json_row(&views, row),
                OutputFormat::Csv => self.csv_row(&views, row),
            }
            out.write_all(self.line.as_bytes())?;
        }
        Ok(())
    }

    fn prepare_keys(&mut self, batch: &RecordBatch) {
        self.keys.clear();
        let schema = batch.schema();
        match self.format {
            OutputFormat::Json => {
                for field in schema.fields() {
                    let mut key = String::new();
                    push_json_string(&mut key, field.name());
                    key.push(':');
                    self.keys.push(key);
                }
            }
            OutputFormat::Csv => {
                let mut header = String::new();
                for (i, field) in schema.fields().iter().enumerate() {
                    if i > 0 {
                        header.push(',');
                    }
                    push_csv_field(&mut header, field.name());
                }
                header.push('\n');
                self.keys.push(header);
            }
        }
    }

    fn json_row(&mut self, views: &[(&dyn Array, ColumnView<'_>)], row: usize) {
        let line = &mut self.line;
        line.push('{');
        for (i, (view, key)) in views.iter().zip(&self.keys).enumerate() {
            if i > 0 {
                line.push(',');
            }
            line.push_str(key);
            write_value(
                line,
                &mut self.display,
                view,
                row,
                self.timestamps,
                Target::Json,
            );
        }
        line.push_str("}\n");
    }

    fn csv_row(&mut self, views: &[(&dyn Array, ColumnView<'_>)], row: usize) {
        let line = &mut self.line;
        for (i, view) in views.iter().enumerate() {
            if i > 0 {
                line.push(',');
            }
            write_value(
                line,
                &mut self.display,
                view,
                row,
                self.timestamps,
                Target::Csv,
            );
        }
        line.push('\n');
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Target {
    Json,
    Csv,
}

fn view<'a>(
    array: &'a dyn Array,
    options: &'a FormatOptions<'a>,
) -> std::result::Result<ColumnView<'a>, arrow::error::ArrowError> {
    Ok(match array.data_type() {
        DataType::Utf8 => ColumnView::Utf8(array.as_string::<i32>()),
        DataType::LargeUtf8 => ColumnView::LargeUtf8(array.as_string::<i64>()),
        DataType::Utf8View => ColumnView::Utf8View(array.as_string_view()),
        DataType::Boolean => ColumnView::Boolean(array.as_boolean()),
        DataType::Int8 => {
            let a = array.as_primitive::<Int8Type>();
            ColumnView::Int(Box::new(move |i| a.value(i).into()))
        }
        DataType::Int16 => {
            let a = array.as_primitive::<Int16Type>();
            ColumnView::Int(Box::new(move |i| a.value(i).into()))
        }
        DataType::Int32 => {
            let a = array.as_primitive::<Int32Type>();
            ColumnView::Int(Box::new(move |i| a.value(i).into()))
        }
        DataType::Int64 => {
            let a = array.as_primitive::<Int64Type>();
            ColumnView::Int(Box::new(move |i| a.value(i)))
        }
        DataType::UInt8 => {
            let a = array.as_primitive::<UInt8Type>();
            ColumnView::SmallUInt(Box::new(move |i| a.value(i).into()))
        }
        DataType::UInt16 => {
            let a = array.as_primitive::<UInt16Type>();
            ColumnView::SmallUInt(Box::new(move |i| a.value(i).into()))
        }
        DataType::UInt32 => {
            let a = array.as_primitive::<UInt32Type>();
            ColumnView::SmallUInt(Box::new(move |i| a.value(i)))
        }
        DataType::UInt64 => ColumnView::UInt(array.as_primitive::<UInt64Type>()),
        DataType::Float32 => ColumnView::Float32(array.as_primitive::<Float32Type>()),
        DataType::Float64 => ColumnView::Float64(array.as_primitive::<Float64Type>()),
        DataType::Timestamp(unit, _) => {
            let nanos: Box<dyn Fn(usize) -> i64 + 'a> = match unit {
                TimeUnit::Second => {
                    let a = array.as_primitive::<TimestampSecondType>();
                    Box::new(move |i| a.value(i).saturating_mul(1_000_000_000))
                }
                TimeUnit::Millisecond => {
                    let a = array.as_primitive::<TimestampMillisecondType>();
                    Box::new(move |i| a.value(i).saturating_mul(1_000_000))
                }
                TimeUnit::Microsecond => {
                    let a = array.as_primitive::<TimestampMicrosecondType>();
                    Box::new(move |i| a.value(i).saturating_mul(1_000))
                }
                TimeUnit::Nanosecond => {
                    let a = array.as_primitive::<TimestampNanosecondType>();
                    Box::new(move |i| a.value(i))
                }
            };
            ColumnView::Timestamp(nanos)
        }
        _ => ColumnView::Other(ArrayFormatter::try_new(array, options)?),
    })
}

/// Appends one value. Writing into a `String` cannot fail, so `write!` results are ignored.
fn write_value(
    line: &mut String,
    display: &mut String,
    (array, view): &(&dyn Array, ColumnView<'_>),
    row: usize,
    timestamps: TimestampFormat,
    target: Target,
) {
    let null = if target == Target::Json { "null" } else { "" };
    if array.is_null(row) {
        line.push_str(null);
        return;
    }
    let text = |line: &mut String, s: &str| match target {
        Target::Json => push_json_string(line, s),
        Target::Csv => push_csv_field(line, s),
    };
    match view {
        ColumnView::Utf8(a) => text(line, a.value(row)),
        ColumnView::LargeUtf8(a) => text(line, a.value(row)),
        ColumnView::Utf8View(a) => text(line, a.value(row)),
        ColumnView::Boolean(a) => line.push_str(if a.value(row) { "true" } else { "false" }),
        ColumnView::Int(value) => {
            let _ = write!(line, "{}", value(row));
        }
        ColumnView::UInt(a) => {
            let _ = write!(line, "{}", a.value(row));
        }
        ColumnView::SmallUInt(value) => {
            let _ = write!(line, "{}", value(row));
        }
        ColumnView::Float64(a) => {
            let value = a.value(row);
            if value.is_finite() {
                let _ = write!(line, "{value:?}");
            } else {
                line.push_str(null);
            }
        }
        ColumnView::Float32(a) => {
            let value = a.value(row);
            if value.is_finite() {
                let _ = write!(line, "{value:?}");
            } else {
                line.push_str(null);
            }
        }
        ColumnView::Timestamp(nanos) => {
            let nanos = nanos(row);
            match timestamps {
                TimestampFormat::Rfc3339 if target == Target::Json => {
                    line.push('"');
                    format_rfc3339(nanos, line);
                    line.push('"');
                }
                TimestampFormat::Rfc3339 => format_rfc3339(nanos, line),
                TimestampFormat::EpochMs => {
                    let _ = write!(line, "{}", nanos.div_euclid(1_000_000));
                }
                TimestampFormat::EpochNs => {
                    let _ = write!(line, "{nanos}");
                }
            }
        }
        ColumnView::Other(formatter) => {
            display.clear();
            let _ = write!(display, "{}", formatter.value(row));
            text(line, display);
        }
    }
}

fn push_json_string(line: &mut String, s: &str) {
    line.push('"');
    let mut run = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..0x20 => "",
            _ => continue,
        };
        line.push_str(&s[run..i]);
        if escape.is_empty() {
            let _ = write!(line, "\\u{b:04x}");
        } else {
            line.push_str(escape);
        }
        run = i + 1;
    }
    line.push_str(&s[run..]);
    line.push('"');
}

fn push_csv_field(line: &mut String, s: &str) {
    if s.bytes().any(|b| matches!(b, b',' | b'"' | b'\n' | b'\r')) {
        line.push('"');
        line.push_str(&s.replace('"', "\"\""));
        line.push('"');
    } else {
        line.push_str(s);
    }
}

/// Writes rows to a file or to standard output; see [`FileSinkConfig`].
#[derive(Debug)]
pub struct FileSink<W: Write = File> {
    destination: PathBuf,
    out: BufWriter<W>,
    formatter: RowFormatter,
}

/// The `stdout` sink.
pub type StdoutSink = FileSink<Stdout>;

impl FileSink<File> {
    /// Creates (or truncates) the file at `config.path`.
    pub fn create(config: &FileSinkConfig) -> Result<Self> {
        config.validate()?;
        let file = File::create(&config.path)
            .map_err(|e| ConnectorError::io("creating", &config.path, e))?;
        Ok(Self::new(
            config.path.clone(),
            file,
            RowFormatter::new(config.format, config.timestamp_format),
        ))
    }
}

impl FileSink<Stdout> {
    /// A sink on this process's standard output.
    pub fn stdout(config: &StdoutSinkConfig) -> Self {
        Self::new(
            PathBuf::from("<stdout>"),
            std::io::stdout(),
            RowFormatter::new(config.format, config.timestamp_format),
        )
    }
}

impl<W: Write> FileSink<W> {
    /// A sink writing through `formatter` into `out`; `destination` names it in errors.
    pub fn new(destination: PathBuf, out: W, formatter: RowFormatter) -> Self {
        Self {
            destination,
            out: BufWriter::with_capacity(64 * 1024, out),
            formatter,
        }
    }

    /// The underlying writer, after flushing; for tests.
    pub fn into_inner(self) -> Result<W> {
        let destination = self.destination;
        self.out
            .into_inner()
            .map_err(|e| ConnectorError::io("flushing", destination, e.into_error()))
    }
}

impl<W: Write + Send> Sink for FileSink<W> {
    fn write_batch(&mut self, batch: &RecordBatch) -> Result<()> {
        self.formatter
            .write_batch(batch, &mut self.out)
            .map_err(|e| ConnectorError::io("writing", &self.destination, e))
    }

    fn flush(&mut self) -> Result<()> {
        self.out
            .flush()
            .map_err(|e| ConnectorError::io("flushing", &self.destination, e))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{
        ArrayRef, BooleanArray, Float64Array, Int64Array, ListArray, StringArray,
        TimestampMillisecondArray, TimestampNanosecondArray,
    };
    use arrow::datatypes::Int32Type;

    use super::*;

    const T0: i64 = 1_704_067_200_000_000_000;

    fn batch() -> RecordBatch {
        let columns: Vec<(&str, ArrayRef)> = vec![
            (
                "sensor",
                Arc::new(StringArray::from(vec![Some("s1"), Some("a,\"b\"\n"), None])),
            ),
            (
                "window_start",
                Arc::new(TimestampNanosecondArray::from(vec![
                    Some(T0),
                    Some(T0 + 250_000_000),
                    None,
                ])),
            ),
            (
                "rms",
                Arc::new(Float64Array::from(vec![
                    Some(0.1),
                    Some(f64::NAN),
                    Some(1e21),
                ])),
            ),
            (
                "samples",
                Arc::new(Int64Array::from(vec![Some(1000), Some(-1), None])),
            ),
            (
                "alarm",
                Arc::new(BooleanArray::from(vec![Some(true), None, Some(false)])),
            ),
        ];
        RecordBatch::try_from_iter(columns).expect("batch")
    }

    fn render(
        format: OutputFormat,
        timestamps: TimestampFormat,
        batches: &[RecordBatch],
    ) -> String {
        let mut sink = FileSink::new(
            PathBuf::from("test"),
            Vec::new(),
            RowFormatter::new(format, timestamps),
        );
        for batch in batches {
            sink.write_batch(batch).expect("write");
        }
        sink.flush().expect("flush");
        String::from_utf8(sink.into_inner().expect("inner")).expect("utf-8")
    }

    #[test]
    fn json_lines_in_schema_order() {
        assert_eq!(
            render(OutputFormat::Json, TimestampFormat::Rfc3339, &[batch()]),
            concat!(
                r#"{"sensor":"s1","window_start":"2024-01-01T00:00:00Z","rms":0.1,"samples":1000,"alarm":true}"#,
                "\n",
                r#"{"sensor":"a,\"b\"\n","window_start":"2024-01-01T00:00:00.250Z","rms":null,"samples":-1,"alarm":null}"#,
                "\n",
                r#"{"sensor":null,"window_start":null,"rms":1e21,"samples":null,"alarm":false}"#,
                "\n",
            )
        );
    }

    #[test]
    fn csv_writes_the_header_once() {
        let batch = batch();
        assert_eq!(
            render(
                OutputFormat::Csv,
                TimestampFormat::EpochMs,
                &[batch.clone(), batch.slice(0, 1)]
            ),
            concat!(
                "sensor,window_start,rms,samples,alarm\n",
                "s1,1704067200000,0.1,1000,true\n",
                "\"a,\"\"b\"\"\n\",1704067200250,,-1,\n",
                ",,1e21,,false\n",
                "s1,1704067200000,0.1,1000,true\n",
            )
        );
    }

    #[test]
    fn other_types_render_as_strings_and_timestamps_in_any_unit() {
        let list =
            ListArray::from_iter_primitive::<Int32Type, _, _>(vec![Some(vec![Some(1), Some(2)])]);
        let columns: Vec<(&str, ArrayRef)> = vec![
            (
                "ms",
                Arc::new(TimestampMillisecondArray::from(vec![1_704_067_200_001])),
            ),
            ("list", Arc::new(list)),
        ];
        let batch = RecordBatch::try_from_iter(columns).expect("batch");
        assert_eq!(
            render(OutputFormat::Json, TimestampFormat::EpochNs, &[batch]),
            "{\"ms\":1704067200001000000,\"list\":\"[1, 2]\"}\n"
        );
    }

    #[test]
    fn file_sink_creates_and_flushes_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = FileSinkConfig {
            path: dir.path().join("out.jsonl"),
            ..FileSinkConfig::default()
        };
        let mut sink = FileSink::create(&config).expect("sink");
        sink.write_batch(&batch().slice(0, 1)).expect("write");
        sink.flush().expect("flush");
        let written = std::fs::read_to_string(&config.path).expect("read");
        assert!(written.starts_with("{\"sensor\":\"s1\""));
        assert_eq!(written.lines().count(), 1);
    }
}
