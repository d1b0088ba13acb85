//! Loading a model file together with what running it needs from the model's side: KVzip's
//! reconstruction instructions, which sit in the model's own chat turn.

use std::path::Path;
use std::sync::Arc;

use kvmerger_engine::{LoadedModel, ReconstructionPrompt, WeightFormats};

use crate::chat::ChatTemplate;
use crate::error::Result;

/// Loads the GGUF file or Hugging Face folder at `path` in `formats` (see
/// [`kvmerger_engine::load_model`]) with its reconstruction instructions set.
pub fn load_model(path: &Path, formats: WeightFormats) -> Result<LoadedModel> {
    let mut loaded = kvmerger_engine::load_model(path, formats)?;
    // A model without a chat template reads the context after a newline.
    let opening = match ChatTemplate::for_tokenizer(&loaded.tokenizer) {
        Ok(template) => template.assistant_opening()?,
        Err(_) => "\n".to_string(),
    };
    let instructions = ReconstructionPrompt::new(&loaded.tokenizer, &opening)?;
    loaded.model.reconstruction = Some(Arc::new(instructions));
    Ok(loaded)
}
