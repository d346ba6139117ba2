use std::fmt;

/// A position in the SQL file, 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Position {
    pub line: u64,
    pub column: u64,
}

/// One problem found in a SQL file: where, what, and how to fix it when we can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub position: Position,
    pub message: String,
    pub hint: Option<String>,
}

impl Diagnostic {
    /// The diagnostic as the HTTP APIs send it: `{line, column, message, hint}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "line": self.position.line,
            "column": self.position.column,
            "message": self.message,
            "hint": self.hint,
        })
    }

    pub fn new(position: Position, message: impl Into<String>) -> Self {
        Self {
            position,
            message: message.into(),
            hint: None,
        }
    }

    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = message.into();
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// `FILE:LINE:COL: error: message`, then the hint on its own line.
    pub fn render(&self, file: &str) -> String {
        let mut text = format!(
            "{file}:{}:{}: error: {}",
            self.position.line, self.position.column, self.message
        );
        if let Some(hint) = &self.hint {
            text.push_str("\n  hint: ");
            text.push_str(hint);
        }
        text
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render("<sql>"))
    }
}

/// Everything wrong with a SQL file. Always the user's to fix; retrying does not help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} error(s) in SQL", diagnostics.len())]
pub struct PlanError {
    pub diagnostics: Vec<Diagnostic>,
}

impl PlanError {
    pub fn render(&self, file: &str) -> String {
        self.diagnostics
            .iter()
            .map(|d| d.render(file))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl From<Diagnostic> for PlanError {
    fn from(diagnostic: Diagnostic) -> Self {
        Self {
            diagnostics: vec![diagnostic],
        }
    }
}

pub type Result<T, E = PlanError> = std::result::Result<T, E>;
