//! The one place that maps a connector name from SQL to its code.
//!
//! The planner calls [`validate_source`] / [`validate_sink`] while compiling `CREATE SOURCE` and
//! `CREATE SINK`, so a typo in `WITH (...)` is reported at compile time, on the cloud, with a
//! hint. The engine calls [`build_source`] / [`build_sink`] on the gateway.
//!
//! Each connector describes itself with a [`SourceConnector`] or [`SinkConnector`] in its own
//! module; adding one means writing that module and adding one line to [`SOURCES`] or
//! [`SINKS`]. Options are deserialised into the connector's typed config with serde, so an
//! unknown option fails with serde's own "unknown field `x`, expected one of ..." message.

use std::sync::{Arc, OnceLock};

use arrow::datatypes::{DataType, Schema, SchemaRef, TimeUnit as ArrowTimeUnit};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::cloud::UplinkWriter;
use crate::dead_letter::DeadLetterQueue;
use crate::error::{ConnectorError, Result};
use crate::{Sink, Source, cloud, file, mqtt, null, simulator};

/// Every source connector, by name.
pub const SOURCES: &[SourceConnector] = &[file::SOURCE, simulator::SOURCE, mqtt::SOURCE];

/// Every sink connector, by name.
pub const SINKS: &[SinkConnector] = &[
    file::SINK,
    file::STDOUT_SINK,
    null::SINK,
    mqtt::SINK,
    cloud::SINK,
];

/// What SQL says about one source or sink: `WITH (connector = 'file', path = '...')`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectorSpec {
    /// The `connector` option: which connector to use.
    pub connector: String,
    /// The SQL name of the source or sink, for logs, counters and dead letters; may be empty.
    #[serde(default)]
    pub name: String,
    /// Every other `WITH` option. Quoted SQL values arrive as JSON strings, numbers and
    /// booleans as JSON numbers and booleans.
    #[serde(default)]
    pub options: Map<String, Value>,
    /// The event-time column, from the `WATERMARK FOR` clause; sources only.
    #[serde(default)]
    pub event_time: Option<String>,
}

impl ConnectorSpec {
    /// A spec for `connector` with no options.
    pub fn new(connector: impl Into<String>) -> Self {
        Self {
            connector: connector.into(),
            name: String::new(),
            options: Map::new(),
            event_time: None,
        }
    }

    /// Sets the SQL name of the source or sink.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Adds one option; handy in tests and for programmatic pipelines.
    pub fn with_option(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.options.insert(key.into(), value.into());
        self
    }

    /// Sets the event-time column.
    pub fn with_event_time(mut self, column: impl Into<String>) -> Self {
        self.event_time = Some(column.into());
        self
    }
}

/// Validates a source's options against its declared schema.
pub type ValidateFn = fn(&ConnectorSpec, &Schema) -> Result<()>;

/// How a source connector is checked and built.
#[derive(Debug, Clone, Copy)]
pub struct SourceConnector {
    /// The name used in `WITH (connector = '...')`.
    pub name: &'static str,
    /// Checks the options and schema without touching the outside world.
    pub validate: ValidateFn,
    /// Builds the source; may open files or connections.
    pub build: fn(&ConnectorSpec, SchemaRef, DeadLetterQueue) -> Result<Box<dyn Source>>,
}

/// How a sink connector is checked and built.
#[derive(Debug, Clone, Copy)]
pub struct SinkConnector {
    /// The name used in `WITH (connector = '...')`.
    pub name: &'static str,
    /// Checks the options and schema without touching the outside world.
    pub validate: ValidateFn,
    /// Builds the sink; may open files or connections.
    pub build: fn(&ConnectorSpec, SchemaRef, &SinkContext) -> Result<Box<dyn Sink>>,
}

/// What the process running a pipeline offers its sinks beyond their options.
#[derive(Clone, Default)]
pub struct SinkContext {
    /// The gateway's durable queue to the cloud, for the `cloud` sink; `None` outside a
    /// gateway.
    pub uplink: Option<Arc<dyn UplinkWriter>>,
    /// The engine takes checkpoints: a transactional sink holds its batches until the
    /// checkpoint that covers them commits them with the pipeline's state.
    pub checkpoints: bool,
}

impl std::fmt::Debug for SinkContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkContext")
            .field("uplink", &self.uplink.is_some())
            .field("checkpoints", &self.checkpoints)
            .finish()
    }
}

/// Names of every source connector, for error hints and `weir` help.
pub fn source_connectors() -> &'static [&'static str] {
    static NAMES: OnceLock<Vec<&'static str>> = OnceLock::new();
    NAMES.get_or_init(|| SOURCES.iter().map(|c| c.name).collect())
}

/// Names of every sink connector, for error hints and `weir` help.
pub fn sink_connectors() -> &'static [&'static str] {
    static NAMES: OnceLock<Vec<&'static str>> = OnceLock::new();
    NAMES.get_or_init(|| SINKS.iter().map(|c| c.name).collect())
}

/// Checks a `CREATE SOURCE`'s connector, options and event-time column.
pub fn validate_source(spec: &ConnectorSpec, schema: &Schema) -> Result<()> {
    let connector = source_connector(&spec.connector)?;
    check_event_time(connector.name, spec, schema)?;
    (connector.validate)(spec, schema)
}

/// Checks a `CREATE SINK`'s connector and options.
pub fn validate_sink(spec: &ConnectorSpec, schema: &Schema) -> Result<()> {
    (sink_connector(&spec.connector)?.validate)(spec, schema)
}

/// Builds the source a spec describes; rejected input will go to `dead_letters`.
pub fn build_source(
    spec: &ConnectorSpec,
    schema: SchemaRef,
    dead_letters: DeadLetterQueue,
) -> Result<Box<dyn Source>> {
    let connector = source_connector(&spec.connector)?;
    check_event_time(connector.name, spec, &schema)?;
    (connector.validate)(spec, &schema)?;
    (connector.build)(spec, schema, dead_letters)
}

/// Builds the sink a spec describes.
pub fn build_sink(
    spec: &ConnectorSpec,
    schema: SchemaRef,
    context: &SinkContext,
) -> Result<Box<dyn Sink>> {
    let connector = sink_connector(&spec.connector)?;
    (connector.validate)(spec, &schema)?;
    (connector.build)(spec, schema, context)
}

fn source_connector(name: &str) -> Result<&'static SourceConnector> {
    SOURCES
        .iter()
        .find(|c| c.name == name)
        .ok_or_else(|| unknown("source", name, source_connectors()))
}

fn sink_connector(name: &str) -> Result<&'static SinkConnector> {
    SINKS
        .iter()
        .find(|c| c.name == name)
        .ok_or_else(|| unknown("sink", name, sink_connectors()))
}

fn unknown(kind: &'static str, name: &str, known: &'static [&'static str]) -> ConnectorError {
    let suggestion = known
        .iter()
        .map(|k| {
            (
                strsim::damerau_levenshtein(&name.to_ascii_lowercase(), k),
                *k,
            )
        })
        .filter(|(distance, _)| *distance <= 2)
        .min()
        .map(|(_, k)| k);
    ConnectorError::UnknownConnector {
        kind,
        name: name.to_owned(),
        suggestion,
        known,
    }
}

fn check_event_time(connector: &'static str, spec: &ConnectorSpec, schema: &Schema) -> Result<()> {
    let Some(name) = &spec.event_time else {
        return Ok(());
    };
    match schema.field_with_name(name).map(|f| f.data_type()) {
        Ok(DataType::Timestamp(ArrowTimeUnit::Nanosecond, _)) => Ok(()),
        Ok(other) => Err(ConnectorError::config(
            connector,
            format!("event-time column '{name}' must be a TIMESTAMP, not {other}"),
        )),
        Err(_) => Err(ConnectorError::config(
            connector,
            format!("event-time column '{name}' is not in the schema"),
        )),
    }
}

/// Deserialises a connector's typed config from its `WITH` options, naming the offending
/// option in the error.
pub(crate) fn parse_options<T: DeserializeOwned>(
    connector: &'static str,
    spec: &ConnectorSpec,
) -> Result<T> {
    serde_path_to_error::deserialize(Value::Object(spec.options.clone())).map_err(|error| {
        let path = error.path().to_string();
        let message = if path == "." || error.inner().to_string().starts_with("unknown field") {
            error.inner().to_string()
        } else {
            format!("option '{path}': {}", error.inner())
        };
        ConnectorError::config(connector, message)
    })
}

/// Deserialisers that also accept a number or boolean written as a quoted SQL string
/// (`batch_size = '8192'`), since many SQL dialects quote every `WITH` value.
pub(crate) mod lenient {
    use std::fmt::Display;
    use std::str::FromStr;

    use serde::de::{DeserializeOwned, Error};
    use serde::{Deserialize, Deserializer};
    use serde_json::Value;

    /// A `T` written natively or as a string.
    pub(crate) fn value<'de, D, T>(deserializer: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: FromStr + DeserializeOwned,
        T::Err: Display,
    {
        match Value::deserialize(deserializer)? {
            Value::String(text) => text
                .trim()
                .parse()
                .map_err(|e| D::Error::custom(format!("'{text}': {e}"))),
            other => serde_json::from_value(other).map_err(D::Error::custom),
        }
    }

    /// An optional `T` written natively or as a string; JSON `null` is `None`.
    pub(crate) fn option<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: FromStr + DeserializeOwned,
        T::Err: Display,
    {
        match Value::deserialize(deserializer)? {
            Value::Null => Ok(None),
            Value::String(text) => text
                .trim()
                .parse()
                .map(Some)
                .map_err(|e| D::Error::custom(format!("'{text}': {e}"))),
            other => serde_json::from_value(other)
                .map(Some)
                .map_err(D::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::decode::test_support::vibration_schema;

    fn message<T>(result: Result<T>) -> String {
        match result {
            Ok(_) => "ok".into(),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn lists_every_connector() {
        assert_eq!(source_connectors(), ["file", "simulator", "mqtt"]);
        assert_eq!(
            sink_connectors(),
            ["file", "stdout", "null", "mqtt", "cloud"]
        );
    }

    #[test]
    fn unknown_connectors_get_a_hint() {
        let schema = vibration_schema();
        assert_eq!(
            message(validate_source(&ConnectorSpec::new("simulater"), &schema)),
            "unknown source connector 'simulater' (did you mean 'simulator'?); known source \
             connectors: file, simulator, mqtt"
        );
        assert_eq!(
            message(validate_sink(&ConnectorSpec::new("kafka"), &schema)),
            "unknown sink connector 'kafka'; known sink connectors: file, stdout, null, mqtt, cloud"
        );
        assert!(build_sink(&ConnectorSpec::new("nul"), schema, &SinkContext::default()).is_err());
    }

    #[test]
    fn unknown_options_name_the_expected_ones() {
        let spec = ConnectorSpec::new("file")
            .with_option("path", "/data/v.jsonl")
            .with_option("pth", "x");
        let error = message(validate_source(&spec, &vibration_schema()));
        assert!(
            error.starts_with("file: unknown field `pth`, expected one of `path`, `format`"),
            "{error}"
        );
    }

    #[test]
    fn option_types_are_checked_and_quoted_numbers_accepted() {
        let schema = vibration_schema();
        let quoted = ConnectorSpec::new("file")
            .with_option("path", "/data/v.jsonl")
            .with_option("batch_size", "512");
        assert_eq!(message(validate_source(&quoted, &schema)), "ok");
        let wrong = quoted.clone().with_option("batch_size", "lots");
        assert_eq!(
            message(validate_source(&wrong, &schema)),
            "file: option 'batch_size': 'lots': invalid digit found in string"
        );
        let bad_enum = quoted.with_option("format", "xml");
        assert_eq!(
            message(validate_source(&bad_enum, &schema)),
            "file: option 'format': unknown variant `xml`, expected `json` or `csv`"
        );
    }

    #[test]
    fn event_time_must_be_a_timestamp_column() {
        let schema = vibration_schema();
        let spec = ConnectorSpec::new("simulator");
        assert_eq!(
            message(validate_source(
                &spec.clone().with_event_time("ts"),
                &schema
            )),
            "ok"
        );
        assert_eq!(
            message(validate_source(&spec.clone().with_event_time("v"), &schema)),
            "simulator: event-time column 'v' must be a TIMESTAMP, not Float64"
        );
        assert_eq!(
            message(validate_source(&spec.with_event_time("time"), &schema)),
            "simulator: event-time column 'time' is not in the schema"
        );
    }

    #[test]
    fn specs_round_trip_through_json() {
        let spec = ConnectorSpec::new("file")
            .with_option("path", "out.jsonl")
            .with_event_time("ts");
        let json = serde_json::to_string(&spec).expect("serialize");
        let back: ConnectorSpec = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, spec);
        let minimal: ConnectorSpec =
            serde_json::from_str(r#"{"connector":"null"}"#).expect("deserialize");
        assert!(build_sink(&minimal, Arc::new(Schema::empty()), &SinkContext::default()).is_ok());
    }
}
