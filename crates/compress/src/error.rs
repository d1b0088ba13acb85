use thiserror::Error;

/// Errors raised while configuring or applying a compression method.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum CompressError {
    /// A parameter is out of its valid range; names the parameter.
    #[error("invalid parameter `{name}`: {reason}")]
    InvalidParameter { name: String, reason: String },
    /// The method name is not one we know; `known` lists the names we do.
    #[error("unknown compression method `{name}` (expected one of: {known})")]
    UnknownMethod { name: String, known: String },
    /// Key/value data handed to the cache has the wrong length.
    #[error("shape mismatch: {0}")]
    Shape(String),
}

impl CompressError {
    pub fn invalid(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidParameter { name: name.into(), reason: reason.into() }
    }
}

pub type Result<T> = std::result::Result<T, CompressError>;
