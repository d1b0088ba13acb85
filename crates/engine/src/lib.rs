//! Llama-family inference on candle with a KV cache that compression methods can rewrite.

mod error;
pub mod tokenizer;

pub use error::{EngineError, Result};
