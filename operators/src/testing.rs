//! Small helpers for tests across the workspace: batches from a readable text form and back.

use std::io::Cursor;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::json::ReaderBuilder;
use arrow::util::pretty::pretty_format_batches;

/// A schema from `"name:type, ..."`, types `utf8`, `i64`, `f64`, `bool`, `ts` (event time,
/// `Timestamp(Nanosecond)`); a trailing `!` marks a column NOT NULL.
pub fn schema(spec: &str) -> SchemaRef {
    let fields = spec
        .split(',')
        .map(|column| {
            let (name, ty) = column.trim().split_once(':').expect("name:type");
            let (ty, nullable) = match ty.strip_suffix('!') {
                Some(ty) => (ty, false),
                None => (ty, true),
            };
            let data_type = match ty {
                "utf8" => DataType::Utf8,
                "i64" => DataType::Int64,
                "f64" => DataType::Float64,
                "bool" => DataType::Boolean,
                "ts" => DataType::Timestamp(TimeUnit::Nanosecond, None),
                other => panic!("unknown test type {other}"),
            };
            Field::new(name, data_type, nullable)
        })
        .collect::<Vec<_>>();
    Arc::new(Schema::new(fields))
}

/// A batch from JSON lines, e.g. `{"sensor":"a","ts":"1970-01-01T00:00:01Z","v":1.5}`.
/// Event times may be RFC 3339 strings or integer nanoseconds.
pub fn batch(schema: &SchemaRef, json_lines: &str) -> RecordBatch {
    let mut reader = ReaderBuilder::new(Arc::clone(schema))
        .with_batch_size(1 << 20)
        .build(Cursor::new(json_lines.trim().as_bytes()))
        .expect("reader");
    match reader.next() {
        Some(batch) => batch.expect("valid test batch"),
        None => RecordBatch::new_empty(Arc::clone(schema)),
    }
}

/// The batches as an aligned text table, for assertions that read like the data.
pub fn pretty(batches: &[RecordBatch]) -> String {
    pretty_format_batches(batches)
        .expect("printable")
        .to_string()
}
