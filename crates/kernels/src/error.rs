//! What a kernel's constructor refuses: weights whose blocks do not make the matrix they claim.

use thiserror::Error;

/// Errors from taking weights into a kernel's layout.
#[derive(Debug, Error)]
pub enum KernelError {
    /// Block data that does not fit the matrix's shape and block type.
    #[error("{0}")]
    Weight(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, KernelError>;
