use std::path::PathBuf;

use thiserror::Error;

/// Errors from loading models, tokenizing and running the forward pass.
#[derive(Debug, Error)]
pub enum EngineError {
    #[error("model file not found: {0}")]
    MissingFile(PathBuf),
    /// The I/O error is in the message, not the error chain: a chain would print it twice.
    #[error("I/O error on {path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("cannot read GGUF file {path}: {reason} (is it a complete, uncorrupted GGUF model?)")]
    Gguf { path: PathBuf, reason: String },
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// A model file's metadata value (or small tensor) that is missing or out of range.
    #[error("invalid model metadata `{key}`: {reason}")]
    Metadata { key: String, reason: String },
    #[error("invalid model configuration: {0}")]
    Config(String),
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the input needs {needed} positions but the model's context is {context} tokens")]
    ContextOverflow { needed: usize, context: usize },
    /// A request the engine cannot serve as asked (a rule that depends on how the engine
    /// runs, such as its prefill chunk); names the request field.
    #[error(transparent)]
    Request(crate::request::RequestError),
    #[error("model setup failed: {0}")]
    Setup(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Compress(#[from] kvmerger_compress::CompressError),
}

pub type Result<T> = std::result::Result<T, EngineError>;

/// A weight the kernels refuse is a configuration error of the model, as it was before the
/// kernels had their own crate.
impl From<kvmerger_kernels::KernelError> for EngineError {
    fn from(e: kvmerger_kernels::KernelError) -> Self {
        match e {
            kvmerger_kernels::KernelError::Weight(reason) => EngineError::Config(reason),
            kvmerger_kernels::KernelError::Candle(e) => EngineError::Candle(e),
        }
    }
}
