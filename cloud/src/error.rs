//! Errors of the control plane. Each says whose fault it is and whether a retry helps; they
//! become HTTP statuses and gRPC statuses here and nowhere else.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use weir_planner::Diagnostic;

/// A control-plane error.
#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    /// No credential, or one the cloud does not know (caller; retrying will not help).
    #[error("{0}")]
    Unauthenticated(String),
    /// A known caller whose role does not allow the call (caller).
    #[error("{0}")]
    Forbidden(String),
    /// The named thing does not exist (caller).
    #[error("{0}")]
    NotFound(String),
    /// A request that makes no sense: bad labels, a bad selector, bad JSON (caller).
    #[error("{0}")]
    Invalid(String),
    /// A request that contradicts the current state, e.g. a gateway name that is taken.
    #[error("{0}")]
    Conflict(String),
    /// SQL that does not compile (caller). `rendered` is `FILE:LINE:COL: error: ...` lines.
    #[error("{rendered}")]
    Compile {
        rendered: String,
        diagnostics: Vec<Diagnostic>,
    },
    /// The embedded store failed (internal or a full disk; a retry may help once fixed).
    #[error("storage: {0}")]
    Storage(String),
    /// A file of the data directory could not be read or written (external).
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = CloudError> = std::result::Result<T, E>;

impl CloudError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }

    /// Whether the same call may succeed later without the caller changing anything.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Storage(_) | Self::Io { .. })
    }

    fn http_status(&self) -> StatusCode {
        match self {
            Self::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Invalid(_) | Self::Compile { .. } => StatusCode::BAD_REQUEST,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Storage(_) | Self::Io { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl From<rocksdb::Error> for CloudError {
    fn from(error: rocksdb::Error) -> Self {
        Self::Storage(error.into_string())
    }
}

impl From<CloudError> for tonic::Status {
    fn from(error: CloudError) -> Self {
        let message = error.to_string();
        match error {
            CloudError::Unauthenticated(_) => Self::unauthenticated(message),
            CloudError::Forbidden(_) => Self::permission_denied(message),
            CloudError::NotFound(_) => Self::not_found(message),
            CloudError::Invalid(_) | CloudError::Compile { .. } => Self::invalid_argument(message),
            CloudError::Conflict(_) => Self::failed_precondition(message),
            CloudError::Storage(_) | CloudError::Io { .. } => Self::unavailable(message),
        }
    }
}

impl IntoResponse for CloudError {
    fn into_response(self) -> Response {
        let status = self.http_status();
        let mut body = json!({ "error": self.to_string(), "retryable": self.is_retryable() });
        if let Self::Compile { diagnostics, .. } = &self {
            body["diagnostics"] = diagnostics.iter().map(Diagnostic::to_json).collect();
        }
        (status, Json(body)).into_response()
    }
}
