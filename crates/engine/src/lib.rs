//! Llama-family inference on candle with a KV cache that compression methods can rewrite.

mod attention;
pub mod chat;
mod config;
mod error;
pub mod fetch;
mod gguf_check;
mod linear;
mod loader;
mod model;
mod rope;
mod sampler;
mod session;
pub mod testing;
pub mod tokenizer;

pub use attention::{attend, AttentionOptions, AttentionShape};
pub use config::{ModelConfig, MAX_CONTEXT, SUPPORTED_ARCHITECTURES};
pub use error::{EngineError, Result};
pub use gguf_check::{check_gguf, GgufSummary, MAX_METADATA_BYTES};
pub use linear::{Linear, WeightFormat, WeightFormats, DECODE_ROWS};
pub use loader::{load_gguf, load_hf_folder, load_model, read_gguf_header, LoadedModel};
pub use model::{Block, ForwardOptions, Llama, Logits};
pub use sampler::{argmax, Sampler, SamplingConfig};
pub use session::{CompressionReport, Prefilled, Session, Timings};
