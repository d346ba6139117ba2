use datafusion::arrow::error::ArrowError;
use datafusion::error::DataFusionError;

/// Errors from building or running an operator.
///
/// None of these is caused by a bad row: operators count and skip rows they cannot use. An
/// error here means the plan is invalid for this build (a user or version problem found at
/// deploy time, not worth retrying) or an internal fault (a bug; the supervisor restarts the
/// pipeline, which may help if the fault was transient).
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// The plan cannot be turned into an operator: unknown function, malformed expression,
    /// unsupported format version. Retrying the same plan does not help.
    #[error("invalid plan: {0}")]
    Plan(String),
    /// A saved state does not fit this operator. Retrying does not help.
    #[error("cannot restore operator state: {0}")]
    Restore(String),
    /// The operator's state changed partway through a batch and the batch cannot be retried.
    #[error("internal operator error: {0}")]
    Internal(String),
    /// DataFusion failed while evaluating an expression or aggregate.
    #[error("expression evaluation failed: {0}")]
    DataFusion(#[from] DataFusionError),
    /// An Arrow kernel failed.
    #[error("arrow error: {0}")]
    Arrow(#[from] ArrowError),
}

pub type Result<T, E = OperatorError> = std::result::Result<T, E>;

impl OperatorError {
    pub(crate) fn plan(message: impl Into<String>) -> Self {
        Self::Plan(message.into())
    }
}
