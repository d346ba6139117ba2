/// Errors from the gateway runtime.
///
/// `Plan` and `Config` are the user's to fix (retrying does not help); `Connector` may be
/// external (a file that vanished, a disk error) and is retried by the supervisor; `Operator`
/// and `Internal` are faults in a pipeline that the supervisor restarts with backoff.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("plan cannot run on this gateway: {0}")]
    Plan(String),
    #[error("connector failed: {0}")]
    Connector(#[from] weir_connectors::ConnectorError),
    #[error("operator failed: {0}")]
    Operator(#[from] weir_operators::OperatorError),
    #[error("operator panicked: {0}")]
    Panic(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// The gateway's disk store failed: a full disk or a damaged file (external; a retry
    /// helps once the cause is fixed). The message says which store and what failed.
    #[error("storage: {0}")]
    Storage(String),
}

impl EngineError {
    /// Whether restarting the pipeline may help.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, EngineError::Plan(_))
    }

    /// The gateway's own disk failed (full, or a RocksDB error): the pipeline is retried for
    /// as long as it takes, since it clears when space returns.
    pub fn is_storage(&self) -> bool {
        matches!(
            self,
            EngineError::Storage(_)
                | EngineError::Connector(weir_connectors::ConnectorError::Storage(_))
        )
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
