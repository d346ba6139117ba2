//! Options of the `simulator` source.

use serde::{Deserialize, Serialize};

use crate::error::{ConnectorError, Result};
use crate::registry::lenient;
use crate::time::parse_rfc3339;

/// Synthetic event time starts here unless `start` says otherwise, so runs are reproducible.
pub const DEFAULT_START: &str = "2024-01-01T00:00:00Z";

/// Most rows the simulator puts in one batch (`sensors · block_size`).
const MAX_ROWS_PER_TICK: u64 = 10_000_000;

/// How the simulator hands its samples to the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SimulatorPayload {
    /// Arrow batches built directly: measures the pipeline alone.
    #[default]
    Arrow,
    /// One JSON object per sample, decoded by the JSON decoder: measures decoding too.
    Json,
    /// One JSON block per sensor and tick, decoded by the JSON decoder.
    JsonBlocks,
}

/// `WITH` options of the `simulator` source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimulatorConfig {
    /// Number of simulated sensors, named `s0001`, `s0002`, ...
    #[serde(deserialize_with = "lenient::value")]
    pub sensors: u32,
    /// Samples per second per sensor.
    #[serde(deserialize_with = "lenient::value")]
    pub rate_hz: u32,
    /// Samples per sensor in each emitted batch; a batch holds `sensors · block_size` rows.
    #[serde(deserialize_with = "lenient::value")]
    pub block_size: u32,
    /// Seed of every random choice: the same seed gives the same data.
    #[serde(deserialize_with = "lenient::value")]
    pub seed: u64,
    /// Seconds of event time to produce before ending; unset runs forever.
    #[serde(deserialize_with = "lenient::option")]
    pub duration_s: Option<f64>,
    /// RFC 3339 start of event time. Unset: 2024-01-01T00:00:00Z, or the wall clock when
    /// `realtime` is on.
    pub start: Option<String>,
    /// `false`: produce as fast as the pipeline takes it; `true`: pace to the wall clock.
    #[serde(deserialize_with = "lenient::value")]
    pub realtime: bool,
    /// Inject spikes, steps, drifts and dropouts (see the signal docs).
    #[serde(deserialize_with = "lenient::value")]
    pub faults: bool,
    /// `arrow`, `json` (one JSON object per sample) or `json_blocks` (one block per sensor and
    /// tick); the JSON forms go through the JSON decoder like real payloads.
    pub payload: SimulatorPayload,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        Self {
            sensors: 10,
            rate_hz: 1000,
            block_size: 100,
            seed: 42,
            duration_s: None,
            start: None,
            realtime: false,
            faults: true,
            payload: SimulatorPayload::Arrow,
        }
    }
}

impl SimulatorConfig {
    /// Checks the options.
    pub fn validate(&self) -> Result<()> {
        let invalid = |message: String| Err(ConnectorError::config("simulator", message));
        if self.sensors == 0 || self.sensors > 1_000_000 {
            return invalid(format!(
                "option 'sensors' must be between 1 and 1000000, not {}",
                self.sensors
            ));
        }
        if self.rate_hz == 0 || self.rate_hz > 1_000_000_000 {
            return invalid(format!(
                "option 'rate_hz' must be between 1 and 1e9, not {}",
                self.rate_hz
            ));
        }
        if self.block_size == 0 {
            return invalid("option 'block_size' must be at least 1".into());
        }
        let rows = u64::from(self.sensors) * u64::from(self.block_size);
        if rows > MAX_ROWS_PER_TICK {
            return invalid(format!(
                "sensors · block_size = {rows} rows per batch; at most {MAX_ROWS_PER_TICK}"
            ));
        }
        if let Some(duration) = self.duration_s
            && !(duration.is_finite() && duration > 0.0)
        {
            return invalid(format!(
                "option 'duration_s' must be a positive number, not {duration}"
            ));
        }
        self.start_nanos()?;
        Ok(())
    }

    /// The configured start of event time in nanoseconds; `None` when unset.
    pub fn start_nanos(&self) -> Result<Option<i64>> {
        match &self.start {
            None => Ok(None),
            Some(text) => parse_rfc3339(text).map(Some).ok_or_else(|| {
                ConnectorError::config(
                    "simulator",
                    format!("option 'start' must be an RFC 3339 timestamp, not '{text}'"),
                )
            }),
        }
    }

    /// Start of event time for reproducible runs: `start`, or [`DEFAULT_START`].
    pub fn reproducible_start_nanos(&self) -> Result<i64> {
        Ok(self
            .start_nanos()?
            .or_else(|| parse_rfc3339(DEFAULT_START))
            .unwrap_or_default())
    }

    /// Samples per sensor before the end, or `None` for an endless run.
    pub fn total_samples(&self) -> Option<u64> {
        self.duration_s
            .map(|seconds| (seconds * f64::from(self.rate_hz)).round() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(json: &str) -> String {
        let config: SimulatorConfig = serde_json::from_str(json).expect("config");
        match config.validate() {
            Ok(()) => "ok".into(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn defaults_and_validation() {
        assert_eq!(problem("{}"), "ok");
        assert_eq!(problem(r#"{"sensors":"3","realtime":"true"}"#), "ok");
        assert_eq!(
            problem(r#"{"sensors":0}"#),
            "simulator: option 'sensors' must be between 1 and 1000000, not 0"
        );
        assert_eq!(
            problem(r#"{"duration_s":-1}"#),
            "simulator: option 'duration_s' must be a positive number, not -1"
        );
        assert_eq!(
            problem(r#"{"start":"soon"}"#),
            "simulator: option 'start' must be an RFC 3339 timestamp, not 'soon'"
        );
        assert_eq!(
            problem(r#"{"sensors":100000,"block_size":1000}"#),
            "simulator: sensors · block_size = 100000000 rows per batch; at most 10000000"
        );
        let config = SimulatorConfig {
            duration_s: Some(1.5),
            ..SimulatorConfig::default()
        };
        assert_eq!(config.total_samples(), Some(1500));
        assert_eq!(
            config.reproducible_start_nanos().ok(),
            Some(1_704_067_200_000_000_000)
        );
    }
}
