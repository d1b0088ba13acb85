//! Llama-family inference on candle with a KV cache that compression methods can rewrite.

#![forbid(unsafe_code)]

mod attention;
mod compression;
mod config;
mod embedding;
mod error;
mod forward;
mod gguf_check;
mod linear;
mod loader;
mod model;
mod pool;
mod prefill;
mod profile;
mod query_moments;
mod reconstruction;
mod reconstruction_pass;
mod request;
mod rope;
mod runtime;
mod sampler;
mod scheduler;
mod sequence;
mod session;
/// Random-weight models and a reference forward for the tests of this crate and those
/// above it: not part of the engine's interface.
#[doc(hidden)]
pub mod testing;
pub mod tokenizer;

pub use compression::CompressionReport;
pub use config::{Activation, ArchFeatures, ModelConfig, SlidingWindow, MAX_CONTEXT};
pub use embedding::Embedding;
pub use error::{EngineError, Result};
pub use forward::{BatchItem, Logits, Phase};
pub use linear::{Linear, WeightFormat, WeightFormats};
pub use loader::{load_gguf, load_hf_folder, load_model, read_gguf_header, LoadedModel};
pub use model::{Block, BlockNorms, Llama};
pub use pool::KvPool;
pub use prefill::{PrefillCompression, PrefillOptions, PrefillPlan};
pub use profile::{Part, StepProfile};
pub use reconstruction::ReconstructionPrompt;
pub use request::{
    check_kv_dtype, check_max_kv, check_prompt, check_prompt_text, check_sampling,
    resolve_max_tokens, GenerationRequest, RequestError, RequestField, RequestLimits,
    RequestOptions,
};
pub use runtime::{AddError, Engine, EngineConfig, EngineHandle, Event, EventSink, RuntimeMetrics};
pub use sampler::{argmax, Sampler, SamplingConfig};
pub use scheduler::Refusal;
pub use sequence::{
    entry_bytes, CachePeak, FinishReason, Prefilled, Reservation, SeqId, SeqState, Sequence, Usage,
};
pub use session::{Session, Timings};

/// The kernels' CPU level, for the command line's `kernels` listing and bench reports.
pub use kvmerger_kernels::{kernel_report, KernelLevel};
