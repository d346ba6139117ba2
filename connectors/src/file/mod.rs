//! Files: replaying recorded telemetry as a source, writing results as a sink.
//!
//! - `file` source: JSON lines (each line a sample or a block, see [`crate::decode::json`])
//!   or CSV with a header row, streamed in chunks, optionally paced to the recorded event time.
//! - `file` sink: JSON lines or CSV, columns in schema order, for golden tests and exports.
//! - `stdout` sink: the same writer on standard output, for `weir run` and demos.

mod config;
mod sink;
mod source;

use arrow::datatypes::{Schema, SchemaRef};

pub use self::config::{
    FileFormat, FileSinkConfig, FileSourceConfig, OutputFormat, StdoutSinkConfig, TimestampFormat,
};
pub use self::sink::{FileSink, RowFormatter, StdoutSink};
pub use self::source::FileSource;
use crate::dead_letter::DeadLetterQueue;
use crate::error::Result;
use crate::registry::{ConnectorSpec, SinkConnector, SinkContext, SourceConnector, parse_options};
use crate::{Sink, Source};

/// The `file` source connector.
pub const SOURCE: SourceConnector = SourceConnector {
    name: "file",
    validate: validate_source,
    build: build_source,
};

/// The `file` sink connector.
pub const SINK: SinkConnector = SinkConnector {
    name: "file",
    validate: validate_sink,
    build: build_sink,
};

/// The `stdout` sink connector.
pub const STDOUT_SINK: SinkConnector = SinkConnector {
    name: "stdout",
    validate: validate_stdout,
    build: build_stdout,
};

fn validate_source(spec: &ConnectorSpec, schema: &Schema) -> Result<()> {
    let config: FileSourceConfig = parse_options("file", spec)?;
    config.validate(schema, spec.event_time.as_deref())
}

fn build_source(
    spec: &ConnectorSpec,
    schema: SchemaRef,
    dead_letters: DeadLetterQueue,
) -> Result<Box<dyn Source>> {
    let config: FileSourceConfig = parse_options("file", spec)?;
    Ok(Box::new(FileSource::new(
        config,
        schema,
        spec.event_time.as_deref(),
        dead_letters,
    )?))
}

fn validate_sink(spec: &ConnectorSpec, _schema: &Schema) -> Result<()> {
    parse_options::<FileSinkConfig>("file", spec)?.validate()
}

fn build_sink(
    spec: &ConnectorSpec,
    _schema: SchemaRef,
    _context: &SinkContext,
) -> Result<Box<dyn Sink>> {
    let config: FileSinkConfig = parse_options("file", spec)?;
    Ok(Box::new(FileSink::create(&config)?))
}

fn validate_stdout(spec: &ConnectorSpec, _schema: &Schema) -> Result<()> {
    parse_options::<StdoutSinkConfig>("stdout", spec).map(drop)
}

fn build_stdout(
    spec: &ConnectorSpec,
    _schema: SchemaRef,
    _context: &SinkContext,
) -> Result<Box<dyn Sink>> {
    let config: StdoutSinkConfig = parse_options("stdout", spec)?;
    Ok(Box::new(StdoutSink::stdout(&config)))
}
