//! KVzip's scoring pass run on the model: the reconstruction's instructions and the prompt
//! again, fed on top of the prompt's cache, whose attention each forward pass records
//! ([`crate::reconstruction`]).

use std::sync::Arc;

use kvmerger_compress::{KvCache, Reconstruction, ReconstructionPass, StatsRequest};

use crate::error::{EngineError, Result};
use crate::forward::{BatchItem, Phase};
use crate::model::Llama;
use crate::reconstruction::ReconstructionPrompt;

/// Runs the reconstruction of `tokens`, whose every entry `cache` holds uncompressed,
/// feeding each chunk's tokens `piece` at a time, and leaves the scores in each head's
/// [`HeadCache::reconstruction_attention`].
pub fn score_by_reconstruction(
    model: &Llama,
    prompt: Option<&Arc<ReconstructionPrompt>>,
    tokens: &[u32],
    cache: &mut KvCache,
    how: Reconstruction,
    piece: usize,
    attention_chunk: usize,
) -> Result<()> {
    let prompt = prompt.ok_or_else(|| {
        EngineError::Unsupported(
            "KVzip needs its reconstruction instructions in the model's vocabulary: load the \
             model with its tokenizer"
                .into(),
        )
    })?;
    let c = &model.config;
    if (0..c.n_layers).any(|l| c.layer_window(l).is_some()) {
        return Err(EngineError::Unsupported(
            "KVzip's reconstruction would push the context out of sliding-window layers".into(),
        ));
    }
    let n = tokens.len();
    if cache.layers.iter().flatten().any(|h| h.len() != n) {
        return Err(EngineError::Setup(
            "KVzip scores a prompt whose every entry is still in the cache".into(),
        ));
    }
    let seen = cache.n_seen;
    cache.layers.iter_mut().flatten().for_each(|h| {
        h.reconstruction_attention_mut();
    });
    let step = how.chunk.max(1);
    for start in (0..n).step_by(step) {
        let chunk = start..(start + step).min(n);
        let pass = ReconstructionPass {
            sinks: how.sinks.min(start),
            context_start: chunk.start,
            context_end: chunk.end,
            appended: n,
        };
        let ids = prompt.tokens_for(tokens, chunk);
        let stats = StatsRequest { reconstruction_pass: Some(pass), ..StatsRequest::default() };
        let result = ids.chunks(piece.max(1)).try_for_each(|part| {
            let mut item = [BatchItem { tokens: part, cache: &mut *cache, logits: None, stats }];
            model.forward_batch(&mut item, Phase::Prefill, attention_chunk).map(|_| ())
        });
        cache.layers.iter_mut().flatten().for_each(|h| h.truncate(n));
        cache.n_seen = seen;
        result?;
    }
    Ok(())
}
