//! Validation problems: every one with its path in the file and its line and column.

use std::fmt;

use serde_saphyr::Location;

/// One thing wrong with a rules file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    /// Path in the document, e.g. `rules[3].when.context_tokens`.
    pub path: String,
    pub line: Option<u64>,
    pub column: Option<u64>,
    pub message: String,
}

impl Problem {
    pub fn at(path: impl Into<String>, loc: Option<&Location>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            line: loc.map(|l| l.line()).filter(|l| *l > 0),
            column: loc
                .map(|l| l.column())
                .filter(|_| loc.is_some_and(|l| l.line() > 0)),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => {
                write!(f, "{} (line {l}, column {c}): {}", self.path, self.message)
            }
            _ => write!(f, "{}: {}", self.path, self.message),
        }
    }
}

/// Why a rules file was rejected. A file compiles whole or not at all.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("cannot read rules file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("rules file is {size} bytes; the limit is {limit}")]
    TooLarge { size: u64, limit: u64 },
    #[error("{} problem(s) in the rules file:\n{}", .0.len(), .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

impl RulesError {
    /// The individual problems (one for read/size errors).
    pub fn problems(&self) -> Vec<Problem> {
        match self {
            Self::Invalid(p) => p.clone(),
            other => vec![Problem::at("", None, other.to_string())],
        }
    }
}
