use std::path::PathBuf;

use thiserror::Error;

/// Errors from finding, fetching and verifying model files, and from chat templates.
#[derive(Debug, Error)]
pub enum ModelsError {
    #[error("model file not found: {0}")]
    MissingFile(PathBuf),
    #[error("`{given}` is neither a file nor a known model (known: {known})")]
    UnknownModel { given: PathBuf, known: String },
    #[error("{path} is corrupt: expected {expected}, got {actual} (the file was removed)")]
    Digest { path: PathBuf, expected: String, actual: String },
    /// The I/O error is in the message, not the error chain: a chain would print it twice.
    #[error("I/O error on {path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("fetching the model failed: {0}")]
    Fetch(String),
    /// The model has no chat template, or one that cannot be compiled.
    #[error("unsupported model: {0}")]
    ChatTemplate(String),
    /// The chat template refused the conversation (its own `raise_exception` or a
    /// rendering error); the request field at fault is `messages`.
    #[error("invalid `messages`: {0}")]
    Messages(String),
    /// Loading the model file itself.
    #[error(transparent)]
    Engine(#[from] kvmerger_engine::EngineError),
}

pub type Result<T> = std::result::Result<T, ModelsError>;
