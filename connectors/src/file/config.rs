//! Options of the `file` source, the `file` sink and the `stdout` sink.

use std::path::PathBuf;

use arrow::datatypes::Schema;
use serde::{Deserialize, Serialize};

use crate::decode::{CsvDecoder, DecodeOptions, JsonDecoder};
use crate::error::{ConnectorError, Result};
use crate::registry::lenient;
use crate::time::TimeUnit;

/// Largest accepted `batch_size`: beyond this a batch stops fitting a gateway's cache and
/// delays every downstream operator.
const MAX_BATCH_SIZE: usize = 1 << 20;

/// Layout of an input file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    /// JSON lines: one object per line, a single sample or a block of samples.
    #[default]
    Json,
    /// CSV with a header row naming the columns.
    Csv,
}

/// `WITH` options of the `file` source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileSourceConfig {
    /// Path of the file to read, on the gateway.
    pub path: PathBuf,
    /// `json` (JSON lines, each line a sample or a block) or `csv` (with a header row).
    pub format: FileFormat,
    /// Most rows in one emitted batch.
    #[serde(deserialize_with = "lenient::value")]
    pub batch_size: usize,
    /// Unit of epoch-number timestamps: `s`, `ms`, `us` or `ns`.
    pub time_unit: TimeUnit,
    /// Unset: read as fast as possible. `1.0`: replay at the recorded pace given by the
    /// event-time column, relative to the first row; `10.0`: ten times faster.
    #[serde(deserialize_with = "lenient::option")]
    pub replay_speed: Option<f64>,
    /// JSON blocks: the column that receives the samples, when more than one numeric column
    /// could.
    pub value_column: Option<String>,
}

impl Default for FileSourceConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::new(),
            format: FileFormat::Json,
            batch_size: 8192,
            time_unit: TimeUnit::Millis,
            replay_speed: None,
            value_column: None,
        }
    }
}

impl FileSourceConfig {
    /// Checks the options against the declared schema and event-time column.
    pub fn validate(&self, schema: &Schema, event_time: Option<&str>) -> Result<()> {
        let invalid = |message: String| Err(ConnectorError::config("file", message));
        if self.path.as_os_str().is_empty() {
            return invalid("option 'path' is required".into());
        }
        if self.batch_size == 0 || self.batch_size > MAX_BATCH_SIZE {
            return invalid(format!(
                "option 'batch_size' must be between 1 and {MAX_BATCH_SIZE}, not {}",
                self.batch_size
            ));
        }
        if let Some(speed) = self.replay_speed {
            if !(speed.is_finite() && speed > 0.0) {
                return invalid(format!(
                    "option 'replay_speed' must be a positive number, not {speed}"
                ));
            }
            if event_time.is_none() {
                return invalid(
                    "option 'replay_speed' needs an event-time column: add a WATERMARK clause"
                        .into(),
                );
            }
        }
        // Building a decoder checks that every column type can be decoded.
        let schema = std::sync::Arc::new(schema.clone());
        match self.format {
            FileFormat::Json => {
                JsonDecoder::new(schema, event_time, self.decode_options()).map(drop)
            }
            FileFormat::Csv => {
                if self.value_column.is_some() {
                    return invalid("option 'value_column' applies to JSON blocks only".into());
                }
                CsvDecoder::new(schema, event_time, self.decode_options()).map(drop)
            }
        }
    }

    pub(crate) fn decode_options(&self) -> DecodeOptions {
        DecodeOptions {
            time_unit: self.time_unit,
            value_column: self.value_column.clone(),
        }
    }
}

/// Layout of written rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// One JSON object per line, keys in schema order.
    #[default]
    Json,
    /// CSV with a header line.
    Csv,
}

/// How timestamp columns are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestampFormat {
    /// `2024-01-01T00:00:00.250Z`, always UTC.
    #[default]
    Rfc3339,
    /// Integer milliseconds since the epoch (rounded down).
    EpochMs,
    /// Integer nanoseconds since the epoch.
    EpochNs,
}

/// `WITH` options of the `file` sink.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileSinkConfig {
    /// Path of the file to write on the gateway; replaced if it exists.
    pub path: PathBuf,
    /// `json` (JSON lines) or `csv`.
    pub format: OutputFormat,
    /// `rfc3339`, `epoch_ms` or `epoch_ns`.
    pub timestamp_format: TimestampFormat,
}

impl Default for FileSinkConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::new(),
            format: OutputFormat::Json,
            timestamp_format: TimestampFormat::Rfc3339,
        }
    }
}

impl FileSinkConfig {
    /// Checks the options.
    pub fn validate(&self) -> Result<()> {
        if self.path.as_os_str().is_empty() {
            return Err(ConnectorError::config("file", "option 'path' is required"));
        }
        Ok(())
    }
}

/// `WITH` options of the `stdout` sink.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StdoutSinkConfig {
    /// `json` (JSON lines) or `csv`.
    pub format: OutputFormat,
    /// `rfc3339`, `epoch_ms` or `epoch_ns`.
    pub timestamp_format: TimestampFormat,
}

impl Default for StdoutSinkConfig {
    fn default() -> Self {
        Self {
            format: OutputFormat::Json,
            timestamp_format: TimestampFormat::Rfc3339,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::test_support::vibration_schema;

    fn config(json: &str) -> FileSourceConfig {
        serde_json::from_str(json).expect("config")
    }

    fn problem(config: &FileSourceConfig, event_time: Option<&str>) -> String {
        match config.validate(&vibration_schema(), event_time) {
            Ok(()) => "ok".into(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn defaults_and_validation() {
        let defaults = config(r#"{"path":"v.jsonl"}"#);
        assert_eq!(defaults.batch_size, 8192);
        assert_eq!(defaults.format, FileFormat::Json);
        assert_eq!(defaults.time_unit, TimeUnit::Millis);
        assert_eq!(problem(&defaults, Some("ts")), "ok");
        assert_eq!(
            problem(&config("{}"), None),
            "file: option 'path' is required"
        );
        assert_eq!(
            problem(&config(r#"{"path":"v","batch_size":0}"#), None),
            "file: option 'batch_size' must be between 1 and 1048576, not 0"
        );
        assert_eq!(
            problem(&config(r#"{"path":"v","replay_speed":"2"}"#), None),
            "file: option 'replay_speed' needs an event-time column: add a WATERMARK clause"
        );
        assert_eq!(
            problem(&config(r#"{"path":"v","replay_speed":-1}"#), Some("ts")),
            "file: option 'replay_speed' must be a positive number, not -1"
        );
        assert_eq!(
            problem(
                &config(r#"{"path":"v","value_column":"sensor"}"#),
                Some("ts")
            ),
            "json decoder: value_column 'sensor' must name a numeric column of the schema"
        );
    }

    #[test]
    fn sink_config_names() {
        let sink: FileSinkConfig = serde_json::from_str(
            r#"{"path":"o.csv","format":"csv","timestamp_format":"epoch_ms"}"#,
        )
        .expect("config");
        assert_eq!(sink.format, OutputFormat::Csv);
        assert_eq!(sink.timestamp_format, TimestampFormat::EpochMs);
        assert!(FileSinkConfig::default().validate().is_err());
    }
}
