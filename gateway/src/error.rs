//! Errors of the gateway process. Each says whose fault it is; the admin API maps them to
//! HTTP statuses in one place (`admin::ErrorResponse`).

use weir_planner::Diagnostic;

/// A gateway error.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The configuration is wrong (user; retrying will not help).
    #[error("configuration: {0}")]
    Config(String),
    /// SQL that does not compile (user). `rendered` is `FILE:LINE:COL: error: ...` lines.
    #[error("{rendered}")]
    Compile {
        rendered: String,
        diagnostics: Vec<Diagnostic>,
    },
    /// A request that contradicts the current state, e.g. adding a pipeline that exists.
    #[error("{0}")]
    Conflict(String),
    /// A pipeline that does not exist.
    #[error("no pipeline named '{0}'")]
    NotFound(String),
    /// A request that makes no sense on its own (user).
    #[error("{0}")]
    Invalid(String),
    /// A compiled pipeline this gateway cannot start (its connectors, its files).
    #[error("{0}")]
    Engine(#[from] weir_engine::EngineError),
    /// The embedded broker or another connector could not start.
    #[error("{0}")]
    Connector(#[from] weir_connectors::ConnectorError),
    /// An I/O failure outside the process (external; may pass).
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = GatewayError> = std::result::Result<T, E>;
