use std::path::PathBuf;

use thiserror::Error;

/// Errors of the evaluation layer.
#[derive(Debug, Error)]
pub enum EvalError {
    #[error(transparent)]
    Engine(#[from] kvmerger_engine::EngineError),
    #[error(transparent)]
    Models(#[from] kvmerger_models::ModelsError),
    #[error(transparent)]
    Compress(#[from] kvmerger_compress::CompressError),
    /// The I/O error is in the message, not the error chain: a chain would print it twice.
    #[error("I/O error on {path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}, line {line}: {message}")]
    Dataset { path: PathBuf, line: usize, message: String },
    #[error("invalid task: {0}")]
    Task(String),
    #[error("invalid shard `{0}` (expected i/n with 1 <= i <= n)")]
    Shard(String),
    #[error("setup failed: {0}")]
    Setup(String),
    #[error("plot failed: {0}")]
    Plot(String),
}

impl EvalError {
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |error| Self::Io { path, error }
    }
}

pub type Result<T> = std::result::Result<T, EvalError>;
