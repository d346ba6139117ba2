//! The crate's one error type.
//!
//! Every variant says who is at fault, so the engine can decide between reporting to the
//! analyst (a bad `WITH` option), retrying (a file or socket failed) and filing a bug.
//! Malformed records are not errors at this level: they are [`DecodeError`]s that end up in the
//! dead-letter queue while the source carries on.
//!
//! [`DecodeError`]: crate::decode::DecodeError

use std::io;
use std::path::PathBuf;

/// Result of connector operations.
pub type Result<T, E = ConnectorError> = std::result::Result<T, E>;

/// Who caused a [`ConnectorError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The pipeline's author: fix the SQL or the connector options. Retrying will not help.
    User,
    /// Something outside the process: a file, a disk, a broker. Retrying may help.
    External,
    /// A bug in Weir.
    Internal,
}

/// Errors raised while validating, building or running a connector.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    /// The SQL names a connector that does not exist.
    #[error("unknown {kind} connector '{name}'{}; known {kind} connectors: {}", did_you_mean(.suggestion), .known.join(", "))]
    UnknownConnector {
        /// `"source"` or `"sink"`.
        kind: &'static str,
        /// The name as written in `WITH (connector = '...')`.
        name: String,
        /// The closest known name, if one is close enough to be a likely typo.
        suggestion: Option<&'static str>,
        /// Every connector of this kind.
        known: &'static [&'static str],
    },
    /// The connector options or the declared schema do not make sense (user error).
    #[error("{component}: {message}")]
    Config {
        /// What rejected the configuration: a connector name such as `file`, or a decoder.
        component: &'static str,
        /// What is wrong and, where possible, how to fix it.
        message: String,
    },
    /// Reading or writing outside the process failed (external, a retry may help).
    #[error("{operation} '{}': {source}", .path.display())]
    Io {
        /// What was being done, e.g. `reading`.
        operation: &'static str,
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The gateway's durable storage (the uplink queue) failed: a full disk, a RocksDB
    /// error (external, a retry may help once space returns).
    #[error("storage: {0}")]
    Storage(String),
    /// Arrow refused a batch this crate built: a bug in Weir.
    #[error("internal error building a record batch: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// An invariant of this crate does not hold: a bug in Weir.
    #[error("internal error: {0}")]
    Internal(String),
}

fn did_you_mean(suggestion: &Option<&'static str>) -> String {
    match suggestion {
        Some(name) => format!(" (did you mean '{name}'?)"),
        None => String::new(),
    }
}

impl ConnectorError {
    /// A user error in the configuration of `component` (a connector or decoder name).
    pub fn config(component: &'static str, message: impl Into<String>) -> Self {
        Self::Config {
            component,
            message: message.into(),
        }
    }

    /// An I/O failure on `path` while doing `operation` (e.g. `"opening"`).
    pub fn io(operation: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io {
            operation,
            path: path.into(),
            source,
        }
    }

    /// Who is at fault.
    pub fn fault(&self) -> Fault {
        match self {
            Self::UnknownConnector { .. } | Self::Config { .. } => Fault::User,
            Self::Io { .. } | Self::Storage(_) => Fault::External,
            Self::Arrow(_) | Self::Internal(_) => Fault::Internal,
        }
    }

    /// Whether trying the same operation again may succeed.
    pub fn is_retryable(&self) -> bool {
        self.fault() == Fault::External
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_connector_message_names_the_closest_and_all_known() {
        let err = ConnectorError::UnknownConnector {
            kind: "source",
            name: "fiel".into(),
            suggestion: Some("file"),
            known: &["file", "simulator"],
        };
        assert_eq!(
            err.to_string(),
            "unknown source connector 'fiel' (did you mean 'file'?); known source connectors: file, simulator"
        );
        assert_eq!(err.fault(), Fault::User);
        assert!(!err.is_retryable());
    }

    #[test]
    fn io_errors_are_external_and_retryable() {
        let err = ConnectorError::io(
            "opening",
            "/no/such/file",
            io::Error::from(io::ErrorKind::NotFound),
        );
        assert_eq!(err.fault(), Fault::External);
        assert!(err.is_retryable());
        assert!(err.to_string().starts_with("opening '/no/such/file': "));
    }
}
