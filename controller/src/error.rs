//! Errors of the policy engine and its input loader.

use std::path::PathBuf;

/// One problem in one field of an input object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path, e.g. `spec.ingress[0].from[1].ipBlock.cidr`.
    pub path: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(path: impl Into<String>, reason: impl Into<String>) -> FieldError {
        FieldError {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "{}: {}", self.path, self.reason)
        }
    }
}

/// Why (part of) the input could not be used. Every variant names the file; invalid documents
/// also name the document (1-based, in file order) and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    #[error("{}: cannot read: {reason}", file.display())]
    Read { file: PathBuf, reason: String },
    #[error("{}: document {document}: not valid YAML: {reason}", file.display())]
    Yaml {
        file: PathBuf,
        document: usize,
        reason: String,
    },
    #[error("{}: document {document}: {path}: {reason}", file.display())]
    Invalid {
        file: PathBuf,
        document: usize,
        path: String,
        reason: String,
    },
}

impl InputError {
    pub fn invalid(file: &std::path::Path, document: usize, e: FieldError) -> InputError {
        InputError::Invalid {
            file: file.to_path_buf(),
            document,
            path: if e.path.is_empty() {
                "(document)".into()
            } else {
                e.path
            },
            reason: e.reason,
        }
    }

    /// A stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            InputError::Read { .. } => "read",
            InputError::Yaml { .. } => "yaml",
            InputError::Invalid { .. } => "invalid",
        }
    }
}

/// Errors of the policy engine itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error(
        "the {space} space is exhausted ({used} in use): split the cluster or reduce distinct label sets"
    )]
    SpaceExhausted { space: &'static str, used: usize },
    #[error("node {0} is unknown: list nodes with `bulkhead policy compile` to see the known ones")]
    UnknownNode(String),
}

impl EngineError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            EngineError::SpaceExhausted { .. } => "space_exhausted",
            EngineError::UnknownNode(_) => "unknown_node",
        }
    }
}
